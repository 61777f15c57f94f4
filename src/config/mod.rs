//! The YAML config file (SPEC section 7): parsed strictly (unknown fields are
//! errors), every string `${VAR}`-expanded, then validated into [`Config`].
//!
//! Every error names the field (`routes[1].session.write`) and its line.
//! serde_yaml reports syntax and type errors with a path and a line; for
//! errors found after parsing, [`LineIndex`] maps a field path back to the
//! line it was written on.
//!
//! The files: this one holds the public types, loading and the top-level
//! sections; [`raw`] the file as written (serde structs); [`lines`] field
//! paths to lines; [`errors`] error collection and redaction; [`source`]
//! `${VAR}`, `file:` and relative paths; [`defaults`] every default in one
//! place; [`store`], [`session`] and [`routes`] build their sections.

mod defaults;
mod errors;
mod lines;
mod print;
mod raw;
mod routes;
mod session;
mod source;
mod store;

pub use errors::{ConfigError, ConfigErrors};
pub use lines::LineIndex;
pub use source::{expand_env, process_env, Env};

use crate::cookie::CookieSpec;
use crate::model::{KeySet, OnDirectiveError, OnError, OnMissing, Settings};
use crate::store::embedded::EmbeddedOptions;
use crate::store::redis::RedisOptions;
use errors::{serde_error, Errors};
use ipnet::IpNet;
use raw::*;
use source::resolve;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

// ---------------------------------------------------------------------------
// The validated config.

#[derive(Clone, Debug)]
pub struct Config {
    /// The file this came from (for reload and relative paths).
    pub file: PathBuf,
    pub listen: Vec<Listener>,
    pub admin: Option<SocketAddr>,
    /// `admin.token`: the session admin API is on when set.
    pub admin_token: Option<Redacted>,
    pub trusted_proxies: Vec<IpNet>,
    pub log: LogConfig,
    pub session: SessionConfig,
    pub store: StoreConfig,
    pub server: ServerConfig,
    pub paths: PathsConfig,
    /// `tracing.otlp`: `None` when traces are off.
    pub tracing: Option<OtlpConfig>,
    pub routes: Vec<RouteConfig>,
}

/// `tracing.otlp` (README, "Tracing").
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpConfig {
    /// The full URL spans are posted to (`.../v1/traces`).
    pub endpoint: String,
    pub sample_ratio: f64,
    pub service_name: String,
    pub headers: Vec<(String, Redacted)>,
    pub timeout: Duration,
}

/// `paths:` (SPEC section 3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathsConfig {
    /// `escaped_separators: keep`: pass `%2F` / `%5C` on undecoded instead
    /// of answering 400.
    pub keep_escaped_separators: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: Option<TlsFiles>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// A secret that never shows in `Debug` output (logs, panics).
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::ops::Deref for Redacted {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Key material; never logged.
    pub secrets: Vec<String>,
    pub encrypt: bool,
    pub cookie: CookieSpec,
    pub settings: Settings,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    None,
    Memory,
    Embedded(EmbeddedOptions),
    Redis(Box<RedisOptions>),
    Sql(Box<crate::store::sql::SqlOptions>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub timeout: Duration,
    pub on_error: OnError,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub threads: usize,
    pub grace_period: Duration,
    /// From a connection's accept (its first request) or a request's first
    /// byte (later ones) to the end of its header.
    pub header_timeout: Duration,
    /// Silence allowed between two requests on one connection.
    pub keepalive_timeout: Duration,
    pub max_connections: usize,
}

#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub name: String,
    /// Lowercase; `*.suffix` for wildcards.
    pub host: Option<String>,
    /// Normalized (see [`crate::path`]), without `;` parameters.
    pub path_prefix: String,
    /// `match.ignore_case`: compare `path_prefix` case-insensitively.
    pub ignore_case: bool,
    /// `host:port` strings, resolved when the gateway starts.
    pub upstreams: Vec<String>,
    pub read: KeySet,
    pub write: KeySet,
    /// (header name, session key)
    pub headers: Vec<(String, String)>,
    pub require: Vec<String>,
    pub on_missing: OnMissing,
    pub on_directive_error: OnDirectiveError,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// `server_timing: true`: answer with a `Server-Timing` header.
    pub server_timing: bool,
    /// TLS to the upstreams (`https://` upstreams or `upstream_tls`).
    pub tls: Option<UpstreamTls>,
    /// `upstream_h2`: offer HTTP/2 to the upstreams.
    pub h2: bool,
    pub selection: crate::model::Selection,
    pub health: HealthCheck,
}

/// `routes[].health_check`: how a route finds its upstreams dead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// The active probe; none: passive ejection only.
    pub probe: Option<Probe>,
    pub interval: Duration,
    pub timeout: Duration,
    /// How long an upstream that failed a connection is skipped.
    pub eject_for: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            probe: None,
            interval: defaults::HEALTH_INTERVAL,
            timeout: defaults::HEALTH_TIMEOUT,
            eject_for: defaults::EJECT_FOR,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connect (no TLS, no request).
    Tcp,
    /// `GET path` with `Host: host` (none: the upstream's host:port),
    /// answered with `expect`.
    Http {
        path: String,
        expect: u16,
        host: Option<String>,
    },
}

/// TLS to a route's upstreams. The PEM files are read when the config is.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM CA bundle; none: the system's roots.
    pub ca: Option<Vec<u8>>,
    /// PEM certificate chain and private key.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
    /// The name sent and verified; none: each upstream's host.
    pub sni: Option<String>,
    pub verify: bool,
}

/// Without the key material.
impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("ca", &self.ca.as_ref().map(|_| "<pem>"))
            .field("client", &self.client.as_ref().map(|_| "<pem>"))
            .field("sni", &self.sni)
            .field("verify", &self.verify)
            .finish()
    }
}

/// The JSON Schema of the config file, derived from the types the file is
/// read into (`gimlet schema`; `config/gimlet.schema.json` is its output).
pub fn schema() -> String {
    let mut s = schemars::schema_for!(raw::RawConfig);
    s.insert("title".into(), "Gimlet config".into());
    s.insert(
        "description".into(),
        "The YAML file `gimlet run -c` reads. Field meanings: README, Configuration.".into(),
    );
    serde_json::to_string_pretty(&s).expect("a schema serializes") + "\n"
}

impl Config {
    /// Read and validate a config file.
    pub fn load(file: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigErrors {
            file: file.to_path_buf(),
            errors: vec![ConfigError {
                path: String::new(),
                line: None,
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        Config::parse(&text, file)
    }

    /// Validate config text; `file` anchors relative paths and messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigErrors> {
        Config::parse_with(text, file, &process_env)
    }

    /// [`Config::parse`] with `${VAR}` looked up in `env`.
    pub fn parse_with(text: &str, file: &Path, env: Env) -> Result<Config, ConfigErrors> {
        let index = LineIndex::build(text);
        let fail = |errors| ConfigErrors {
            file: file.to_path_buf(),
            errors,
        };
        let raw: RawConfig =
            serde_yaml::from_str(text).map_err(|e| fail(vec![serde_error(&e, &index, text)]))?;
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut errs = Errors {
            index: &index,
            env,
            list: Vec::new(),
        };
        let cfg = build(raw, file, &base, &mut errs);
        if errs.list.is_empty() {
            Ok(cfg)
        } else {
            Err(fail(errs.list))
        }
    }
}

/// Turn a serde_yaml error into "field: message (line N)".
fn build(raw: RawConfig, file: &Path, base: &Path, e: &mut Errors) -> Config {
    let listen: Vec<Listener> = match &raw.listen {
        None => vec![Listener {
            addr: defaults::LISTEN.parse().expect("a valid address"),
            tls: None,
        }],
        Some(l) => l
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let addr = e.addr(&format!("listen[{i}].addr"), &l.addr);
                let tls = l.tls.as_ref().map(|t| {
                    let cert = e.text(&format!("listen[{i}].tls.cert"), &t.cert);
                    let key = e.text(&format!("listen[{i}].tls.key"), &t.key);
                    let files = TlsFiles {
                        cert: resolve(base, &cert),
                        key: resolve(base, &key),
                    };
                    for (field, p) in [("cert", &files.cert), ("key", &files.key)] {
                        if !p.is_file() {
                            e.add(
                                format!("listen[{i}].tls.{field}"),
                                format!("file not found: {}", p.display()),
                            );
                        }
                    }
                    files
                });
                addr.map(|addr| Listener { addr, tls })
            })
            .collect(),
    };
    if raw.listen.as_ref().is_some_and(|l| l.is_empty()) {
        e.add("listen", "at least one listener is needed");
    }
    for (i, l) in listen.iter().enumerate() {
        if listen[..i]
            .iter()
            .any(|o| o.addr == l.addr && l.addr.port() != 0)
        {
            e.add(
                format!("listen[{i}].addr"),
                format!("{} is listed twice", l.addr),
            );
        }
    }
    let admin = raw
        .admin
        .as_ref()
        .and_then(|a| e.addr("admin.addr", &a.addr));
    let admin_token = raw
        .admin
        .as_ref()
        .and_then(|a| a.token.as_ref())
        .and_then(|t| session::read_secret(e, "admin.token", t, base))
        .filter(|t| {
            let n = t.chars().count();
            if n < 16 {
                e.add(
                    "admin.token",
                    format!("token has {n} characters, at least 16 are needed (generate one with `gimlet keygen`)"),
                );
            }
            n >= 16
        });

    let trusted_proxies = raw
        .trusted_proxies
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let path = format!("trusted_proxies[{i}]");
            let s = e.text(&path, s);
            let s = s.trim();
            let parsed = s
                .parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => Some(n),
                Err(_) => {
                    e.add(
                        path,
                        format!("invalid CIDR `{s}` (write e.g. 10.0.0.0/8 or 127.0.0.1)"),
                    );
                    None
                }
            }
        })
        .collect();

    let log = LogConfig {
        format: e.pick("log.format", &raw.log.format),
        level: e
            .choice(
                "log.level",
                &raw.log.level,
                &["info", "error", "warn", "debug", "trace"],
            )
            .to_string(),
    };

    let store = store::build_store(&raw.store, base, e);
    let session = session::build_session(&raw.session, &store, base, e);

    let server = ServerConfig {
        threads: match raw.server.threads {
            Some(0) => {
                e.add("server.threads", "must be at least 1");
                1
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
        },
        grace_period: e.duration(
            "server.grace_period",
            &raw.server.grace_period,
            defaults::GRACE_PERIOD,
        ),
        header_timeout: e.duration(
            "server.header_timeout",
            &raw.server.header_timeout,
            defaults::HEADER_TIMEOUT,
        ),
        keepalive_timeout: e.duration(
            "server.keepalive_timeout",
            &raw.server.keepalive_timeout,
            defaults::KEEPALIVE_TIMEOUT,
        ),
        max_connections: match raw.server.max_connections {
            Some(0) => {
                e.add("server.max_connections", "must be at least 1");
                1
            }
            Some(n) => n,
            None => defaults::MAX_CONNECTIONS,
        },
    };
    if server.header_timeout < Duration::from_millis(100) {
        e.add("server.header_timeout", "must be at least 100ms");
    }
    // pingora counts keep-alive in whole seconds.
    if server.keepalive_timeout < Duration::from_secs(1) {
        e.add("server.keepalive_timeout", "must be at least 1s");
    }

    let paths = PathsConfig {
        keep_escaped_separators: e.choice(
            "paths.escaped_separators",
            &raw.paths.escaped_separators,
            &["reject", "keep"],
        ) == "keep",
    };

    let tracing = raw.tracing.otlp.as_ref().map(|o| build_otlp(o, base, e));
    let routes = routes::build_routes(&raw.routes, base, e);

    Config {
        file: file.to_path_buf(),
        listen,
        admin,
        admin_token: admin_token.map(Redacted),
        trusted_proxies,
        log,
        session,
        store,
        server,
        paths,
        tracing,
        routes,
    }
}

fn build_otlp(o: &raw::RawOtlp, base: &Path, e: &mut Errors) -> OtlpConfig {
    let url = e.text("tracing.otlp.endpoint", &o.endpoint);
    let url = url.trim();
    let endpoint = match url.split_once("://") {
        Some(("http", rest)) if !rest.is_empty() && !rest.starts_with('/') => {
            if rest.contains('/') && !rest.ends_with('/') {
                url.to_string()
            } else {
                format!("{}/v1/traces", url.trim_end_matches('/'))
            }
        }
        _ => {
            e.add(
                "tracing.otlp.endpoint",
                format!("expected the http:// URL of an OTLP/HTTP collector (e.g. http://collector:4318; for a TLS collector, export through a local collector agent), found `{url}`"),
            );
            String::new()
        }
    };
    let sample_ratio = o.sample_ratio.unwrap_or(defaults::SAMPLE_RATIO);
    if !(0.0..=1.0).contains(&sample_ratio) {
        e.add("tracing.otlp.sample_ratio", "must be between 0 and 1");
    }
    let service_name = e
        .opt_text("tracing.otlp.service_name", &o.service_name)
        .unwrap_or_else(|| defaults::SERVICE_NAME.to_string());
    let headers = o
        .headers
        .iter()
        .filter_map(|(name, v)| {
            let field = format!("tracing.otlp.headers.{name}");
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                e.add(field, "not a valid header name");
                return None;
            }
            let value = session::read_secret(e, &field, v, base)?;
            if http::HeaderValue::from_str(&value).is_err() {
                e.add(field, "not a valid header value");
                return None;
            }
            Some((name.clone(), Redacted(value)))
        })
        .collect();
    let timeout = e.duration("tracing.otlp.timeout", &o.timeout, defaults::EXPORT_TIMEOUT);
    OtlpConfig {
        endpoint,
        sample_ratio,
        service_name,
        headers,
        timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn parse(y: &str) -> Result<Config, ConfigErrors> {
        Config::parse(y, Path::new("/etc/gimlet/gimlet.yaml"))
    }

    fn minimal(extra_session: &str) -> String {
        format!(
            "session:\n  secrets: [\"{SECRET}\"]\n{extra_session}routes:\n  - name: app\n    upstreams: [127.0.0.1:8000]\n"
        )
    }

    #[test]
    fn minimal_config_defaults() {
        let c = parse(&minimal("")).unwrap();
        assert_eq!(c.listen[0].addr.to_string(), "0.0.0.0:8080");
        assert_eq!(
            c.store.kind,
            StoreKind::Embedded(EmbeddedOptions {
                path: "/etc/gimlet/data/sessions.redb".into(),
                cache: 10_000
            })
        );
        assert_eq!(c.session.settings.lifetime, 7 * 86400 * 1000);
        assert_eq!(c.session.settings.idle_timeout, None);
        assert_eq!(c.routes[0].read, KeySet::All);
        assert_eq!(c.routes[0].path_prefix, "/");
        assert!(c
            .session
            .settings
            .policies
            .for_write("x")
            .is_some_and(|p| !p.clientside));
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let y = format!("session:\n  secrets: [\"{SECRET}\"]\n  lifetyme: 1d\nroutes: []\n");
        let e = parse(&y).unwrap_err().to_string();
        assert!(
            e.contains("session.lifetyme: unknown field, did you mean lifetime?"),
            "{e}"
        );
        assert!(e.contains("(line 3)"), "{e}");
    }

    #[test]
    fn bad_duration_names_field_and_line() {
        let e = parse(&minimal("  idle_timeout: 2 fortnights\n")).unwrap_err();
        let err = &e.errors[0];
        assert_eq!(err.path, "session.idle_timeout");
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("invalid duration"), "{}", err.message);
    }

    #[test]
    fn short_secret_is_an_error_without_the_secret() {
        let y = "session:\n  secrets: [\"tooshort-secret-value\"]\nroutes:\n  - name: a\n    upstreams: [127.0.0.1:1]\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.contains("session.secrets[0]"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(!e.contains("tooshort-secret-value"), "{e}");
    }

    #[test]
    fn misplaced_secret_is_never_echoed() {
        let secret = "s3cr3t-value-that-must-not-print-0123456789";
        for session in [
            format!("session:\n  secrets: \"{secret}\"\n"),
            format!("session:\n  secrets: [\"{SECRET}\"]\n  encrypt: \"{secret}\"\n"),
            format!("session:\n  secrets: [\"{SECRET}\"]\n  lifetime: [\"{secret}\"]\n"),
            format!("session:\n  secrets: [[\"{secret}\"]]\n"),
        ] {
            let y = format!("{session}routes:\n  - name: app\n    upstreams: [127.0.0.1:8000]\n");
            let err = parse(&y).unwrap_err().to_string();
            assert!(!err.contains(secret), "{err}");
            assert!(err.contains("session."), "names the field: {err}");
        }
        // Backtick-quoted values and keys, serde's and ours.
        for session in [
            "  secrets: [\"{S}\"]\n  lifetime: {V}\n".to_string(),
            "  secrets: [\"{S}\"]\n  cookie: {{ same_site: {V} }}\n".to_string(),
            "  secrets: [\"{S}\"]\n  undeclared_keys: {V}\n".to_string(),
            "  secrets: [\"{S}\"]\n  cookie: {{ name: \"{V} x\" }}\n".to_string(),
            "  secrets: [\"{S}\"]\n  {V}: 1\n".to_string(),
            "  secrets: {{ {V}: 1 }}\n".to_string(),
            "  secrets: [{{ {V}: 1 }}]\n".to_string(),
            "  secrets: 12345678901234567890123456789012345\n".to_string(),
        ] {
            let session = session.replace("{S}", SECRET).replace("{V}", secret);
            let y = format!(
                "session:\n{session}routes:\n  - name: app\n    upstreams: [127.0.0.1:8000]\n"
            );
            let err = parse(&y).unwrap_err().to_string();
            assert!(!err.contains(secret), "{err}");
            assert!(
                !err.contains("12345678901234567890123456789012345"),
                "{err}"
            );
            assert!(err.contains("session"), "names the field: {err}");
        }
        let y = format!("session:\n  secrets: \"{secret}\"\nroutes: []\n");
        let err = parse(&y).unwrap_err().to_string();
        assert!(
            err.contains("session.secrets: invalid type: a string, expected a sequence"),
            "{err}"
        );
    }

    #[test]
    fn env_and_file_secrets() {
        let env = |n: &str| (n == "GIMLET_TEST_SECRET_X").then(|| SECRET.to_string());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, format!("{SECRET}-from-file\n")).unwrap();
        let y = format!(
            "session:\n  secrets: [\"${{GIMLET_TEST_SECRET_X}}\", \"file:{}\"]\nroutes:\n  - name: a\n    upstreams: [\"${{GIMLET_TEST_UP:-127.0.0.1:9}}\"]\n",
            f.display()
        );
        let c = Config::parse_with(&y, Path::new("/etc/gimlet/gimlet.yaml"), &env).unwrap();
        assert_eq!(
            c.session.secrets,
            vec![SECRET.to_string(), format!("{SECRET}-from-file")]
        );
        assert_eq!(c.routes[0].upstreams, vec!["127.0.0.1:9"]);
        // A relative `file:` path is read next to the config file.
        let y = "session:\n  secrets: [\"file:s\"]\nroutes:\n  - name: a\n    upstreams: [a:1]\n";
        let c = Config::parse(y, &dir.path().join("gimlet.yaml")).unwrap();
        assert_eq!(c.session.secrets, vec![format!("{SECRET}-from-file")]);
        let y = "session:\n  secrets: [\"${GIMLET_TEST_UNSET_VAR}\"]\nroutes: []\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.contains("GIMLET_TEST_UNSET_VAR` is not set"), "{e}");
        let y = "session:\n  secrets: [\"file:/nonexistent/secret\"]\nroutes:\n  - name: a\n    upstreams: [a:1]\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(
            e.contains("cannot read secret file /nonexistent/secret"),
            "{e}"
        );
    }

    #[test]
    fn cross_field_errors_have_lines() {
        let y = format!(
            "session:\n  secrets: [\"{SECRET}\"]\n  cookie: {{ same_site: none }}\nroutes:\n  - name: app\n    upstreams: [127.0.0.1:8000]\n    session:\n      read: [user]\n      headers: {{ X-Remote-Role: role }}\n"
        );
        let e = parse(&y).unwrap_err();
        let msgs: Vec<String> = e.errors.iter().map(|e| e.to_string()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("session.cookie.same_site") && m.ends_with("(line 3)")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("routes[0].session.headers.X-Remote-Role")
                    && m.contains("not readable")
                    && m.ends_with("(line 9)")),
            "{msgs:?}"
        );
    }

    #[test]
    fn route_validation() {
        let y = format!(
            "session:\n  secrets: [\"{SECRET}\"]\nroutes:\n  - name: a\n    match: {{ path_prefix: api }}\n    upstreams: [nope]\n    session: {{ read: some, on_missing: {{ status: 401, redirect: /x }} }}\n"
        );
        let e = parse(&y).unwrap_err().to_string();
        assert!(
            e.contains("routes[0].session.read: expected `all`, `none`, or a list of keys"),
            "{e}"
        );
        let y = format!(
            "session:\n  secrets: [\"{SECRET}\"]\nroutes:\n  - name: a\n    match: {{ path_prefix: api }}\n    upstreams: [nope]\n    session: {{ on_missing: {{ status: 401, redirect: /x }} }}\n  - name: a\n    upstreams: [x:1]\n"
        );
        let e = parse(&y).unwrap_err().to_string();
        assert!(
            e.contains("routes[0].match.path_prefix: must start with `/`"),
            "{e}"
        );
        assert!(
            e.contains("routes[0].upstreams[0]: `nope` is not host:port"),
            "{e}"
        );
        assert!(e.contains("give exactly one of"), "{e}");
        assert!(e.contains("route name `a` is used twice"), "{e}");
    }

    #[test]
    fn store_none_policies() {
        let c = parse(&minimal("").replace("routes:", "store: { kind: none }\nroutes:")).unwrap();
        assert!(!c.session.settings.has_store);
        assert!(
            c.session
                .settings
                .policies
                .for_write("x")
                .unwrap()
                .clientside
        );
        let y =
            minimal("  keys: { big: {} }\n").replace("routes:", "store: { kind: none }\nroutes:");
        assert!(parse(&y)
            .unwrap_err()
            .to_string()
            .contains("session.keys.big"));
        let y =
            minimal("  revocation: true\n").replace("routes:", "store: { kind: none }\nroutes:");
        assert!(parse(&y)
            .unwrap_err()
            .to_string()
            .contains("revocation needs a store"));
    }

    #[test]
    fn redis_store_fields() {
        let y = minimal("").replace("routes:", "store: { kind: redis }\nroutes:");
        assert!(parse(&y).unwrap_err().to_string().contains("needs `url`"));
        let y = minimal("").replace(
            "routes:",
            "store: { kind: redis, url: \"http://x\" }\nroutes:",
        );
        assert!(parse(&y)
            .unwrap_err()
            .to_string()
            .contains("redis:// or rediss://"));
        let y = minimal("").replace(
            "routes:",
            "store: { kind: redis, url: \"redis://:pw@127.0.0.1:6379/2\", timeout: 100ms, on_error: degrade }\nroutes:",
        );
        let c = parse(&y).unwrap();
        assert_eq!(c.store.timeout, Duration::from_millis(100));
        assert_eq!(c.store.on_error, OnError::Degrade);
    }

    #[test]
    fn line_index_paths() {
        let y = "a:\n  b: 1\n  c:\n    - x: 1\n    - {y: 2, z: [1, 2]}\nd: 3\n";
        let i = LineIndex::build(y);
        assert_eq!(i.line("a.b"), Some(2));
        assert_eq!(i.line("a.c[0].x"), Some(4));
        assert_eq!(i.line("a.c[1].z"), Some(5));
        assert_eq!(i.line("d"), Some(6));
        assert_eq!(i.line("a.c[1].nope"), Some(5));
    }

    #[test]
    fn env_expansion() {
        let env = |n: &str| (n == "GIMLET_TEST_A").then(|| "x".to_string());
        let expand_env = |s: &str| super::expand_env(s, &env);
        assert_eq!(
            expand_env("a${GIMLET_TEST_A}b${GIMLET_TEST_A}").unwrap(),
            "axbx"
        );
        assert_eq!(expand_env("${GIMLET_TEST_NOPE:-dflt}").unwrap(), "dflt");
        assert!(expand_env("${").is_err());
        assert!(expand_env("${A B}").is_err());
        assert_eq!(expand_env("no vars $HOME").unwrap(), "no vars $HOME");
    }

    /// Broken configs a user writes, and the exact error each gets: a
    /// missing field names its parent, an unknown field names itself and
    /// the closest known one, a tab says so, one cause gives one error.
    #[test]
    fn broken_configs_get_errors_that_point_at_the_field() {
        let env = |_: &str| None;
        let cases: &[(&str, &str)] = &[
            ("session:\n  lifetime: 7d\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "session: missing field secrets (line 1)"),
            ("session:\n  secrets: [\"{S}\"]\nroutes:\n  - match: { path_prefix: / }\n    upstreams: [a:1]\n", "routes[0]: missing field name (line 4)"),
            ("session:\n  secrets: [\"{S}\"]\n", "missing field routes"),
            ("routes:\n  - name: a\n    upstreams: [a:1]\n", "missing field session"),
            ("session:\n  secrets: [\"{S}\"]\nroutes:\n  - name: a\n    upstream: [a:1]\n", "routes[0].upstream: unknown field, did you mean upstreams? (line 5)"),
            ("session:\n  secrets: [\"{S}\"]\nrotes:\n  - name: a\n    upstreams: [a:1]\n", "rotes: unknown field, did you mean routes? (line 3)"),
            ("session:\n  secrets: [\"{S}\"]\n  lifetme: 7d\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "session.lifetme: unknown field, did you mean lifetime? (line 3)"),
            ("session:\n  secrets: [\"{S}\"]\n  cookie: { same_sit: lax }\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "session.cookie.same_sit: unknown field, did you mean same_site? (line 3)"),
            ("session:\n\tsecrets: [\"{S}\"]\nroutes: []\n", "a tab in the indentation (YAML indents with spaces) (line 2)"),
            ("session:\n  secrets: [\"${GIMLET_NOPE}\"]\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "session.secrets[0]: environment variable `GIMLET_NOPE` is not set (line 2)"),
            ("session:\n  secrets: [\"short\"]\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "session.secrets[0]: secret has 5 characters, at least 32 are needed (generate one with `gimlet keygen`) (line 2)"),
            ("session:\n  secrets: [\"{S}\"]\n  lifetime: 7 days please\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "session.lifetime: invalid duration `7 days please`: expected number at 7 (write e.g. 250ms, 90s, 2h, 7d, 1h 30m) (line 3)"),
            ("listen:\n  - addr: nowhere\nsession:\n  secrets: [\"{S}\"]\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "listen[0].addr: invalid address `nowhere` (write ip:port, e.g. 0.0.0.0:8080 or [::1]:8080) (line 2)"),
            ("listen:\n  - tls: { cert: a, key: b }\nsession:\n  secrets: [\"{S}\"]\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "listen[0]: missing field addr (line 2)"),
            ("admin: {}\nsession:\n  secrets: [\"{S}\"]\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "admin: missing field addr (line 1)"),
            ("session:\n  secrets: [\"{S}\"]\nroutes:\n  - name: a\n", "routes[0]: missing field upstreams (line 4)"),
            ("session:\n  secrets: [\"{S}\"]\nstore: { kind: mongo }\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "store.kind: expected one of embedded, memory, redis, sql, none, found `mongo` (line 3)"),
            ("session:\n  secrets: [\"{S}\"]\nstore: { kind: memory, on_error: maybe }\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "store.on_error: expected one of fail, degrade, found `maybe` (line 3)"),
            ("session:\n  secrets: [\"{S}\"]\n  cookie: { same_site: lots }\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "session.cookie.same_site: expected one of lax, strict, none, found `lots` (line 3)"),
            ("session:\n  secrets: [\"{S}\"]\nroutes:\n  - name: a\n    upstreams: [a:1]\n    session: { read: [cart], headers: { X-User: user } }\n", "routes[0].session.headers.X-User: key `user` is not readable on this route (add it to read:) (line 6)"),
            ("session:\n  secrets: \"{S}\"\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "session.secrets: invalid type: a string, expected a sequence (line 2)"),
            ("session:\n  secrets: [\"{S}\"]\nroutes:\n  - name: a\n    upstreams: [nope]\n", "routes[0].upstreams[0]: `nope` is not host:port or an http(s):// URL of one (line 5)"),
            ("session:\n  secrets: [\"{S}\"]\nroutes:\n  - name: a\n    match: { path_prefx: /a }\n    upstreams: [a:1]\n", "routes[0].match.path_prefx: unknown field, did you mean path_prefix? (line 5)"),
            ("session:\n  secrets: [\"{S}\"]\ntracing:\n  otlp: { endpoint: \"https://c:4318\" }\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "tracing.otlp.endpoint: expected the http:// URL of an OTLP/HTTP collector (e.g. http://collector:4318; for a TLS collector, export through a local collector agent), found `https://c:4318` (line 4)"),
            ("session:\n  secrets: [\"{S}\"]\ntracing:\n  otlp: { endpoint: \"http://c:4318\", sample_ratio: 2 }\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "tracing.otlp.sample_ratio: must be between 0 and 1 (line 4)"),
            ("session:\n  secrets: [\"{S}\"]\ntracing:\n  otlp: { sample_ratio: 0.5 }\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "tracing.otlp: missing field endpoint (line 4)"),
            ("session:\n  secrets: [\"{S}\"]\ntracing:\n  otlp: { endpoint: \"http://c:4318\", headers: { \"bad name\": x } }\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "tracing.otlp.headers.bad name: not a valid header name (line 4)"),
            ("session:\n  secrets: [\"{S}\"]\n  zzz: 1\nroutes:\n  - name: a\n    upstreams: [a:1]\n", "session.zzz: unknown field (known: secrets, encrypt, cookie, lifetime, idle_timeout, touch_interval, undeclared_keys, keys, limits, dev_insecure, revocation, regenerate_grace, user_key, max_per_user, track) (line 3)"),
        ];
        let mut wrong = Vec::new();
        for (yaml, want) in cases {
            let yaml = yaml.replace("{S}", SECRET);
            let errs = Config::parse_with(&yaml, Path::new("/etc/gimlet/gimlet.yaml"), &env)
                .unwrap_err()
                .errors;
            let got: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            if got.len() != 1 || got[0] != *want {
                wrong.push(format!("{yaml:?}\n  want {want:?}\n  got  {got:?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
