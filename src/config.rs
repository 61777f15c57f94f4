//! The YAML config file (SPEC section 7): parsed strictly (unknown fields are
//! errors), every string `${VAR}`-expanded, then validated into [`Config`].
//!
//! Every error names the field (`routes[1].session.write`) and its line.
//! serde_yaml reports syntax and type errors with a path and a line; for
//! errors found after parsing, [`LineIndex`] maps a field path back to the
//! line it was written on.

use crate::cookie::{CookieSpec, SameSite, SecureMode};
use crate::model::{
    valid_key, KeyPolicies, KeySet, Limits, OnDirectiveError, OnError, OnMissing, Policy, Settings,
};
use crate::store::redis::RedisOptions;
use ipnet::IpNet;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config error: the field path, its line (when known) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(l) = self.line {
            write!(f, " (line {l})")?;
        }
        Ok(())
    }
}

/// All errors of one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}:", self.file.display())?;
        for e in &self.errors {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------------------
// The validated config.

#[derive(Clone, Debug)]
pub struct Config {
    /// The file this came from (for reload and relative paths).
    pub file: PathBuf,
    pub listen: Vec<Listener>,
    pub admin: Option<SocketAddr>,
    pub trusted_proxies: Vec<IpNet>,
    pub log: LogConfig,
    pub session: SessionConfig,
    pub store: StoreConfig,
    pub server: ServerConfig,
    pub paths: PathsConfig,
    pub routes: Vec<RouteConfig>,
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

#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Key material; never logged.
    pub secrets: Vec<String>,
    pub encrypt: bool,
    pub cookie: CookieSpec,
    pub settings: Settings,
    pub revocation: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    None,
    Memory,
    Embedded {
        path: PathBuf,
        /// Sessions kept in memory in front of the file (0: none).
        cache: usize,
    },
    Redis(RedisOptions),
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
}

// ---------------------------------------------------------------------------
// Leaf types: every string goes through `${VAR}` expansion.

/// Where `${VAR}` is looked up: the process environment, or (tests, the
/// demo) a map handed in, so nothing has to call `set_var`.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment as an [`Env`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Expand `${VAR}` and `${VAR:-default}` from `env`.
pub fn expand_env(s: &str, env: Env) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated `${` (write `${NAME}`)".to_string())?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("`${{{inner}}}` is not a valid variable reference"));
        }
        match (env(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable `{name}` is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A string field as written; `${VAR}` expansion and parsing happen in
/// [`build`], where the field's path is known (serde_yaml would report the
/// enclosing mapping instead).
type Str = String;

/// `read:` / `write:` as written: `all`, `none`, or a list of keys.
#[derive(Clone, Debug, PartialEq, Eq)]
enum KeySel {
    Word(String),
    List(Vec<String>),
}

impl<'de> Deserialize<'de> for KeySel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeySel;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`all`, `none`, or a list of keys")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeySel, E> {
                Ok(KeySel::Word(v.to_string()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<KeySel, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = seq.next_element::<String>()? {
                    keys.push(k);
                }
                Ok(KeySel::List(keys))
            }
        }
        d.deserialize_any(V)
    }
}

/// A key policy as written under `session.keys` / `undeclared_keys`.
#[derive(Deserialize, Clone, Copy, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    clientside: Option<bool>,
    permanent: Option<bool>,
    secure: Option<bool>,
}

/// `undeclared_keys`: `reject` or a policy.
#[derive(Clone, Copy, Debug)]
enum Undeclared {
    Reject,
    Policy(RawPolicy),
}

impl<'de> Deserialize<'de> for Undeclared {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Undeclared;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`reject` or {clientside, permanent, secure}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Undeclared, E> {
                if v == "reject" {
                    Ok(Undeclared::Reject)
                } else {
                    Err(E::custom(format!(
                        "expected `reject` or a mapping {{clientside, permanent, secure}}, found `{v}`"
                    )))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Undeclared, A::Error> {
                RawPolicy::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(Undeclared::Policy)
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// The file as written.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Vec<RawListener>>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    trusted_proxies: Vec<Str>,
    #[serde(default)]
    log: RawLog,
    session: RawSession,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    paths: RawPaths,
    routes: Vec<RawRoute>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPaths {
    escaped_separators: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    addr: Str,
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Str,
    key: Str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    addr: Str,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<Str>,
    level: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    secrets: Vec<Str>,
    #[serde(default = "yes")]
    encrypt: bool,
    #[serde(default)]
    cookie: RawCookie,
    lifetime: Option<Str>,
    idle_timeout: Option<Str>,
    touch_interval: Option<Str>,
    undeclared_keys: Option<Undeclared>,
    #[serde(default)]
    keys: BTreeMap<String, RawPolicy>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    dev_insecure: bool,
    #[serde(default)]
    revocation: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCookie {
    name: Option<Str>,
    path: Option<Str>,
    domain: Option<Str>,
    same_site: Option<Str>,
    secure: Option<Str>,
    #[serde(default)]
    host_prefix: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    value_bytes: Option<usize>,
    keys: Option<usize>,
    session_bytes: Option<usize>,
    forward_bytes: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<Str>,
    path: Option<Str>,
    url: Option<Str>,
    cluster: Option<Vec<Str>>,
    prefix: Option<Str>,
    cache: Option<usize>,
    timeout: Option<Str>,
    on_error: Option<Str>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    threads: Option<usize>,
    grace_period: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Str,
    #[serde(rename = "match", default)]
    matches: RawMatch,
    upstreams: Vec<Str>,
    #[serde(default)]
    session: RawRouteSession,
    on_directive_error: Option<Str>,
    connect_timeout: Option<Str>,
    read_timeout: Option<Str>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    host: Option<Str>,
    path_prefix: Option<Str>,
    #[serde(default)]
    ignore_case: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRouteSession {
    read: Option<KeySel>,
    write: Option<KeySel>,
    #[serde(default)]
    headers: BTreeMap<String, Str>,
    #[serde(default)]
    require: Vec<Str>,
    on_missing: Option<RawOnMissing>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOnMissing {
    redirect: Option<Str>,
    status: Option<u16>,
}

// ---------------------------------------------------------------------------
// Line index: field path -> line, from the YAML event stream.

/// Maps field paths as serde_yaml spells them (`routes[1].session.write`) to
/// the 1-based line where the field's key (or the sequence item) starts.
#[derive(Default, Debug)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

struct IndexBuilder {
    stack: Vec<Frame>,
    index: LineIndex,
}

impl IndexBuilder {
    /// Path of the node that starts now, recording its line; advances the
    /// parent frame. Returns None when this scalar is a mapping key.
    fn node_path(&mut self, line: usize, is_scalar: bool, scalar: &str) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key }) => match key.take() {
                None => {
                    if is_scalar {
                        let p = join(path, scalar);
                        self.index.lines.entry(p).or_insert(line);
                        *key = Some(scalar.to_string());
                    }
                    None
                }
                Some(k) => Some(join(path, &k)),
            },
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                self.index.lines.entry(p.clone()).or_insert(line);
                Some(p)
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for IndexBuilder {
    fn on_event(&mut self, ev: yaml_rust2::Event, mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::Event;
        let line = mark.line();
        match ev {
            Event::Scalar(s, ..) => {
                self.node_path(line, true, &s);
            }
            Event::Alias(_) => {
                self.node_path(line, false, "");
            }
            Event::MappingStart(..) => {
                if let Some(p) = self.node_path(line, false, "") {
                    self.stack.push(Frame::Map { path: p, key: None });
                } else {
                    // A complex mapping key: track it so the stack stays balanced.
                    self.stack.push(Frame::Map {
                        path: "?".into(),
                        key: None,
                    });
                }
            }
            Event::SequenceStart(..) => {
                let p = self
                    .node_path(line, false, "")
                    .unwrap_or_else(|| "?".into());
                self.stack.push(Frame::Seq { path: p, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl LineIndex {
    pub fn build(text: &str) -> LineIndex {
        let mut b = IndexBuilder {
            stack: Vec::new(),
            index: LineIndex::default(),
        };
        let mut parser = yaml_rust2::parser::Parser::new_from_str(text);
        // Syntax errors are reported by serde_yaml; the index is best effort.
        let _ = parser.load(&mut b, false);
        b.index
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// The deepest path under `parent` that starts on `line`.
    fn field_on_line(&self, parent: &str, line: usize) -> Option<&str> {
        self.lines
            .iter()
            .filter(|(p, l)| **l == line && (parent.is_empty() || p.starts_with(parent)))
            .map(|(p, _)| p.as_str())
            .max_by_key(|p| p.len())
    }
}

// ---------------------------------------------------------------------------
// Loading.

struct Errors<'a> {
    index: &'a LineIndex,
    env: Env<'a>,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let line = self.index.line(&path);
        self.list.push(ConfigError {
            path: scrub_path(&path),
            line,
            message: scrub(&message.into()),
        });
    }
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
            serde_yaml::from_str(text).map_err(|e| fail(vec![serde_error(&e, &index)]))?;
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
fn serde_error(e: &serde_yaml::Error, index: &LineIndex) -> ConfigError {
    let text = e.to_string();
    let line = e.location().map(|l| l.line());
    // serde_yaml prints "path: message at line L column C".
    let body = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => &text,
    };
    let (path, message) = match body.split_once(": ") {
        Some((p, m)) if !p.contains(' ') => (p.to_string(), m.to_string()),
        _ => (String::new(), body.to_string()),
    };
    // serde quotes the offending value (`invalid type: string "..."`): a
    // secret written where a list belongs must not reach a terminal or a
    // log. Name the field and the kind of value, never the value.
    let message = scrub(&redact_quoted(&message));
    // Custom errors carry the container's path; name the field on that line.
    let path = match line.and_then(|l| index.field_on_line(&path, l)) {
        Some(p) if p.len() > path.len() => p.to_string(),
        _ => path,
    };
    ConfigError {
        path: scrub_path(&path),
        line,
        message,
    }
}

/// A value this long could be a secret (the shortest allowed is 32
/// characters): errors name it by its length, never show it.
const SHOWN_MAX: usize = 31;

/// Every `` `quoted` `` value of more than [`SHOWN_MAX`] characters becomes
/// `a value of N characters`. Messages quote what was written in backticks
/// (``invalid duration `…` ``, serde's ``unknown field `…` ``), so a secret
/// pasted into the wrong field is named, never echoed.
fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('`') {
        let Some(len) = rest[open + 1..].find('`') else {
            break;
        };
        let token = &rest[open + 1..open + 1 + len];
        out.push_str(&rest[..open]);
        let n = token.chars().count();
        if n > SHOWN_MAX {
            out.push_str(&format!("a value of {n} characters"));
        } else {
            out.push('`');
            out.push_str(token);
            out.push('`');
        }
        rest = &rest[open + len + 2..];
    }
    out.push_str(rest);
    out
}

/// A field path whose parts are keys the user wrote (`session.<key>`):
/// overlong parts are named by their length, like values.
fn scrub_path(path: &str) -> String {
    path.split('.')
        .map(|part| {
            // `routes[3]`: judge the key, keep the index.
            let (key, index) = part.split_at(part.find('[').unwrap_or(part.len()));
            let n = key.chars().count();
            if n > SHOWN_MAX {
                format!("<{n}-character key>{index}")
            } else {
                part.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// `invalid type: string "s3cr3t", expected a sequence` ->
/// `invalid type: a string, expected a sequence`; every other quoted value
/// becomes `"…"`.
fn redact_quoted(message: &str) -> String {
    let (Some(start), Some(end)) = (message.find('"'), message.rfind('"')) else {
        return message.to_string();
    };
    if end <= start {
        return message.to_string();
    }
    let before = &message[..start];
    let after = &message[end + 1..];
    match before.strip_suffix("string ") {
        Some(head) => format!("{head}a string{after}"),
        None => format!("{before}\"…\"{after}"),
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl Errors<'_> {
    /// A string field after `${VAR}` expansion.
    fn text(&mut self, path: &str, raw: &str) -> String {
        match expand_env(raw, self.env) {
            Ok(v) => v,
            Err(m) => {
                self.add(path, m);
                String::new()
            }
        }
    }

    fn opt_text(&mut self, path: &str, raw: &Option<String>) -> Option<String> {
        raw.as_ref().map(|r| self.text(path, r))
    }

    fn duration(&mut self, path: &str, raw: &Option<String>, default: Duration) -> Duration {
        let Some(r) = raw else { return default };
        let s = self.text(path, r);
        match humantime::parse_duration(s.trim()) {
            Ok(d) => d,
            Err(err) => {
                self.add(
                    path,
                    format!(
                        "invalid duration `{s}`: {err} (write e.g. 250ms, 90s, 2h, 7d, 1h 30m)"
                    ),
                );
                default
            }
        }
    }

    fn addr(&mut self, path: &str, raw: &str) -> Option<SocketAddr> {
        let s = self.text(path, raw);
        match s.trim().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.add(
                    path,
                    format!(
                        "invalid address `{s}` (write ip:port, e.g. 0.0.0.0:8080 or [::1]:8080)"
                    ),
                );
                None
            }
        }
    }

    fn key_set(&mut self, path: &str, raw: &Option<KeySel>) -> KeySet {
        match raw {
            None => KeySet::All,
            Some(KeySel::Word(w)) => match self.text(path, w).as_str() {
                "all" => KeySet::All,
                "none" => KeySet::None,
                other => {
                    self.add(
                        path,
                        format!("expected `all`, `none`, or a list of keys, found `{other}`"),
                    );
                    KeySet::All
                }
            },
            Some(KeySel::List(keys)) => KeySet::Only(
                keys.iter()
                    .enumerate()
                    .map(|(i, k)| self.key(&format!("{path}[{i}]"), k))
                    .collect(),
            ),
        }
    }

    fn key(&mut self, path: &str, raw: &str) -> String {
        let k = self.text(path, raw);
        if !valid_key(&k) {
            self.add(
                path,
                format!("invalid key `{k}` ({})", crate::model::KEY_SYNTAX),
            );
        }
        k
    }

    /// One of `choices` (the first is the default).
    fn choice<'c>(&mut self, path: &str, raw: &Option<String>, choices: &[&'c str]) -> &'c str {
        let Some(r) = raw else { return choices[0] };
        let v = self.text(path, r);
        match choices.iter().find(|c| c.eq_ignore_ascii_case(v.trim())) {
            Some(c) => c,
            None => {
                self.add(
                    path,
                    format!("expected one of {}, found `{v}`", choices.join(", ")),
                );
                choices[0]
            }
        }
    }
}

fn build(raw: RawConfig, file: &Path, base: &Path, e: &mut Errors) -> Config {
    let listen: Vec<Listener> = match &raw.listen {
        None => vec![Listener {
            addr: "0.0.0.0:8080".parse().unwrap(),
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
        format: match e.choice("log.format", &raw.log.format, &["text", "json"]) {
            "json" => LogFormat::Json,
            _ => LogFormat::Text,
        },
        level: e
            .choice(
                "log.level",
                &raw.log.level,
                &["info", "error", "warn", "debug", "trace"],
            )
            .to_string(),
    };

    let store = build_store(&raw.store, base, e);
    let session = build_session(&raw.session, &store, base, e);

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
            Duration::from_secs(5),
        ),
    };

    let paths = PathsConfig {
        keep_escaped_separators: e.choice(
            "paths.escaped_separators",
            &raw.paths.escaped_separators,
            &["reject", "keep"],
        ) == "keep",
    };

    let routes = build_routes(&raw.routes, e);

    Config {
        file: file.to_path_buf(),
        listen,
        admin,
        trusted_proxies,
        log,
        session,
        store,
        server,
        paths,
        routes,
    }
}

fn build_store(raw: &RawStore, base: &Path, e: &mut Errors) -> StoreConfig {
    let kind_name = e.choice(
        "store.kind",
        &raw.kind,
        &["embedded", "memory", "redis", "none"],
    );
    let only = |e: &mut Errors, field: &str, set: bool, kinds: &str| {
        if set {
            e.add(
                format!("store.{field}"),
                format!("only used with kind: {kinds}"),
            );
        }
    };
    if kind_name != "embedded" {
        only(e, "path", raw.path.is_some(), "embedded");
        only(e, "cache", raw.cache.is_some(), "embedded");
    }
    if kind_name != "redis" {
        only(e, "url", raw.url.is_some(), "redis");
        only(e, "cluster", raw.cluster.is_some(), "redis");
        only(e, "prefix", raw.prefix.is_some(), "redis");
    }
    let kind = match kind_name {
        "none" => StoreKind::None,
        "memory" => StoreKind::Memory,
        "embedded" => {
            let p = e.opt_text("store.path", &raw.path);
            StoreKind::Embedded {
                path: resolve(base, p.as_deref().unwrap_or("data/sessions.redb")),
                cache: raw.cache.unwrap_or(10_000),
            }
        }
        _ => {
            let url = e.opt_text("store.url", &raw.url);
            let cluster: Vec<String> = raw
                .cluster
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, u)| e.text(&format!("store.cluster[{i}]"), u))
                .collect();
            match (&url, cluster.is_empty()) {
                (None, true) => e.add(
                    "store",
                    "kind: redis needs `url` (standalone) or `cluster` (node URLs)",
                ),
                (Some(_), false) => {
                    e.add("store.cluster", "give either `url` or `cluster`, not both")
                }
                _ => {}
            }
            let all: Vec<(String, String)> = url
                .iter()
                .map(|u| ("store.url".to_string(), u.clone()))
                .chain(
                    cluster
                        .iter()
                        .enumerate()
                        .map(|(i, u)| (format!("store.cluster[{i}]"), u.clone())),
                )
                .collect();
            for (field, u) in all {
                if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                    e.add(field, "expected a redis:// or rediss:// URL");
                } else if redis::Client::open(u.as_str()).is_err() {
                    e.add(field, "invalid Redis URL");
                }
            }
            let prefix = e
                .opt_text("store.prefix", &raw.prefix)
                .unwrap_or_else(|| "gimlet:".into());
            if prefix.contains(['{', '}']) {
                e.add(
                    "store.prefix",
                    "must not contain `{` or `}` (the gateway adds its own hash tags)",
                );
            }
            StoreKind::Redis(RedisOptions {
                url,
                cluster,
                prefix,
            })
        }
    };
    let timeout = e.duration("store.timeout", &raw.timeout, Duration::from_millis(250));
    if timeout.is_zero() {
        e.add("store.timeout", "must be longer than 0");
    }
    let on_error = match e.choice("store.on_error", &raw.on_error, &["fail", "degrade"]) {
        "degrade" => OnError::Degrade,
        _ => OnError::Fail,
    };
    StoreConfig {
        kind,
        timeout,
        on_error,
    }
}

fn build_session(
    raw: &RawSession,
    store: &StoreConfig,
    base: &Path,
    e: &mut Errors,
) -> SessionConfig {
    let mut secrets = Vec::new();
    if raw.secrets.is_empty() {
        e.add(
            "session.secrets",
            "at least one secret is needed (generate one with `gimlet keygen`)",
        );
    }
    for (i, s) in raw.secrets.iter().enumerate() {
        let field = format!("session.secrets[{i}]");
        let s = e.text(&field, s);
        let value = match s.strip_prefix("file:") {
            Some(path) => match std::fs::read_to_string(resolve(base, path.trim())) {
                Ok(v) => {
                    let v = v.strip_suffix('\n').unwrap_or(&v);
                    v.strip_suffix('\r').unwrap_or(v).to_string()
                }
                Err(err) => {
                    e.add(
                        field,
                        format!("cannot read secret file {}: {err}", path.trim()),
                    );
                    continue;
                }
            },
            None => s,
        };
        // The length is fine to report; the secret never is.
        let n = value.chars().count();
        if n < 32 {
            e.add(
                field,
                format!("secret has {n} characters, at least 32 are needed (generate one with `gimlet keygen`)"),
            );
            continue;
        }
        secrets.push(value);
    }

    let c = &raw.cookie;
    let name = e
        .opt_text("session.cookie.name", &c.name)
        .unwrap_or_else(|| "gimlet".into());
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || name.starts_with("__")
    {
        e.add(
            "session.cookie.name",
            format!("`{name}` is not a valid cookie name (letters, digits, `-`, `_`, `.`; no `__` prefix)"),
        );
    }
    let path = e
        .opt_text("session.cookie.path", &c.path)
        .unwrap_or_else(|| "/".into());
    if !path.starts_with('/')
        || path
            .bytes()
            .any(|b| b == b';' || b.is_ascii_control() || b == b' ')
    {
        e.add(
            "session.cookie.path",
            "must start with `/` and hold no `;`, spaces or control bytes",
        );
    }
    let domain = e.opt_text("session.cookie.domain", &c.domain);
    if let Some(d) = &domain {
        if d.is_empty()
            || d.bytes()
                .any(|b| !(b.is_ascii_alphanumeric() || b == b'.' || b == b'-'))
        {
            e.add(
                "session.cookie.domain",
                format!("`{d}` is not a valid domain"),
            );
        }
    }
    let same_site = match e.choice(
        "session.cookie.same_site",
        &c.same_site,
        &["lax", "strict", "none"],
    ) {
        "strict" => SameSite::Strict,
        "none" => SameSite::None,
        _ => SameSite::Lax,
    };
    let secure = match e.choice(
        "session.cookie.secure",
        &c.secure,
        &["auto", "always", "never"],
    ) {
        "always" => SecureMode::Always,
        "never" => SecureMode::Never,
        _ => SecureMode::Auto,
    };
    if c.host_prefix {
        // Browsers accept a `__Host-` cookie only with Secure, Path=/ and
        // no Domain; anything else would silently never be stored.
        if secure != SecureMode::Always || raw.dev_insecure {
            e.add(
                "session.cookie.host_prefix",
                "host_prefix: true needs secure: always (and no dev_insecure): browsers drop __Host- cookies without Secure",
            );
        }
        if path != "/" {
            e.add(
                "session.cookie.host_prefix",
                "host_prefix: true needs path: /",
            );
        }
        if domain.is_some() {
            e.add(
                "session.cookie.host_prefix",
                "host_prefix: true cannot be combined with domain:",
            );
        }
    }
    if same_site == SameSite::None && secure != SecureMode::Always && !raw.dev_insecure {
        e.add(
            "session.cookie.same_site",
            "same_site: none needs secure: always (browsers drop SameSite=None cookies without Secure)",
        );
    }

    let has_store = store.kind != StoreKind::None;
    let default_policy = Policy {
        clientside: !has_store,
        permanent: true,
        secure: false,
    };
    let fill = |p: &RawPolicy, d: Policy| Policy {
        clientside: p.clientside.unwrap_or(d.clientside),
        permanent: p.permanent.unwrap_or(d.permanent),
        secure: p.secure.unwrap_or(d.secure),
    };
    let undeclared = match &raw.undeclared_keys {
        None => Some(default_policy),
        Some(Undeclared::Reject) => None,
        Some(Undeclared::Policy(p)) => Some(fill(p, default_policy)),
    };
    if let Some(p) = undeclared {
        if !p.clientside && !has_store {
            e.add(
                "session.undeclared_keys.clientside",
                "server-side keys need a store (store.kind is none)",
            );
        }
        if p.secure && secure == SecureMode::Never {
            e.add(
                "session.undeclared_keys.secure",
                "secure keys cannot work with cookie.secure: never",
            );
        }
    }
    let mut declared = HashMap::new();
    for (k, p) in &raw.keys {
        let field = format!("session.keys.{k}");
        if !valid_key(k) {
            e.add(
                field.clone(),
                format!("invalid key `{k}` ({})", crate::model::KEY_SYNTAX),
            );
        }
        // Fields a declaration leaves out: server-side, permanent, not secure.
        let p = fill(p, Policy::SERVER);
        if !p.clientside && !has_store {
            e.add(
                field.clone(),
                "a server-side key needs a store (store.kind is none); add `clientside: true`",
            );
        }
        if p.secure && secure == SecureMode::Never {
            e.add(
                "session.cookie.secure",
                format!("secure: never contradicts the secure key `{k}`"),
            );
        }
        declared.insert(k.clone(), p);
    }

    let lifetime = e.duration(
        "session.lifetime",
        &raw.lifetime,
        Duration::from_secs(7 * 86400),
    );
    if lifetime.is_zero() {
        e.add("session.lifetime", "must be longer than 0");
    }
    let idle = raw
        .idle_timeout
        .as_ref()
        .map(|_| e.duration("session.idle_timeout", &raw.idle_timeout, Duration::ZERO))
        .filter(|d| !d.is_zero());
    let touch = e.duration(
        "session.touch_interval",
        &raw.touch_interval,
        Duration::from_secs(60),
    );
    if let Some(idle) = idle {
        if touch >= idle {
            e.add(
                "session.touch_interval",
                "must be shorter than session.idle_timeout, or sessions expire before they are touched",
            );
        }
    }

    let l = &raw.limits;
    let d = Limits::default();
    let limits = Limits {
        value_bytes: l.value_bytes.unwrap_or(d.value_bytes),
        keys: l.keys.unwrap_or(d.keys),
        session_bytes: l.session_bytes.unwrap_or(d.session_bytes),
        forward_bytes: l.forward_bytes.unwrap_or(d.forward_bytes),
    };
    for (name, v) in [
        ("value_bytes", limits.value_bytes),
        ("keys", limits.keys),
        ("session_bytes", limits.session_bytes),
        ("forward_bytes", limits.forward_bytes),
    ] {
        if v == 0 {
            e.add(format!("session.limits.{name}"), "must be at least 1");
        }
    }
    if raw.revocation && !has_store {
        e.add(
            "session.revocation",
            "revocation needs a store (store.kind is none)",
        );
    }

    let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
    SessionConfig {
        secrets,
        encrypt: raw.encrypt,
        cookie: CookieSpec::new(&name, path, domain, same_site, secure, raw.dev_insecure)
            .with_host_prefix(c.host_prefix),
        settings: Settings {
            policies: KeyPolicies {
                declared,
                undeclared,
                fallback: default_policy,
            },
            limits,
            lifetime: ms(lifetime),
            idle_timeout: idle.map(ms),
            touch_interval: ms(touch),
            has_store,
            dev_insecure: raw.dev_insecure,
        },
        revocation: raw.revocation,
    }
}

/// An HTTP header name token.
fn valid_header_name(n: &str) -> bool {
    http::HeaderName::from_bytes(n.as_bytes()).is_ok()
}

fn valid_upstream(u: &str) -> bool {
    let Some((host, port)) = u.rsplit_once(':') else {
        return false;
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    !host.is_empty()
        && port.parse::<u16>().is_ok_and(|p| p != 0)
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:_".contains(&b))
}

fn build_routes(raw: &[RawRoute], e: &mut Errors) -> Vec<RouteConfig> {
    if raw.is_empty() {
        e.add("routes", "at least one route is needed");
    }
    let mut out: Vec<RouteConfig> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let at = |f: &str| format!("routes[{i}].{f}");
        let name = e.text(&at("name"), &r.name);
        if name.is_empty() || name.chars().any(|c| c.is_control()) {
            e.add(at("name"), "must be a non-empty name");
        } else if out.iter().any(|o| o.name == name) {
            e.add(at("name"), format!("route name `{name}` is used twice"));
        }
        let host = e
            .opt_text(&at("match.host"), &r.matches.host)
            .map(|h| h.to_ascii_lowercase());
        if let Some(h) = &host {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            if bare.is_empty() || bare.contains(['*', ':', '/', ' ']) {
                e.add(
                    at("match.host"),
                    format!("`{h}` is not a host (write app.example.com or *.example.com, without a port)"),
                );
            }
        }
        let path_prefix = e
            .opt_text(&at("match.path_prefix"), &r.matches.path_prefix)
            .unwrap_or_else(|| "/".into());
        // Judged like request paths, so `/%61ccount` and `/account` agree.
        let path_prefix = if !path_prefix.starts_with('/') {
            e.add(at("match.path_prefix"), "must start with `/`");
            path_prefix
        } else {
            match crate::path::normalize(path_prefix.as_bytes(), true) {
                Ok(p) => crate::path::route_path(&p).into_owned(),
                Err(err) => {
                    e.add(
                        at("match.path_prefix"),
                        format!("not a valid path ({})", err.label()),
                    );
                    path_prefix
                }
            }
        };
        if r.upstreams.is_empty() {
            e.add(at("upstreams"), "at least one upstream address is needed");
        }
        let upstreams: Vec<String> = r
            .upstreams
            .iter()
            .enumerate()
            .map(|(j, u)| {
                let path = format!("routes[{i}].upstreams[{j}]");
                let u = e.text(&path, u).trim().to_string();
                if !valid_upstream(&u) {
                    e.add(path, format!("`{u}` is not host:port"));
                }
                u
            })
            .collect();
        let read = e.key_set(&at("session.read"), &r.session.read);
        let write = e.key_set(&at("session.write"), &r.session.write);
        let mut headers = Vec::new();
        for (h, key) in &r.session.headers {
            let field = format!("routes[{i}].session.headers.{h}");
            if !valid_header_name(h) {
                e.add(field.clone(), format!("`{h}` is not a valid header name"));
            } else if crate::directives::is_session_header(&crate::headers::folded(h)) {
                e.add(
                    field.clone(),
                    "names starting with X-Session are reserved for the gateway",
                );
            }
            let key = e.key(&field, key);
            if valid_key(&key) && !read.contains(&key) {
                e.add(
                    field,
                    format!("key `{key}` is not readable on this route (add it to read:)"),
                );
            }
            headers.push((h.clone(), key));
        }
        let require: Vec<String> = r
            .session
            .require
            .iter()
            .enumerate()
            .map(|(j, k)| e.key(&format!("routes[{i}].session.require[{j}]"), k))
            .collect();
        let on_missing = match &r.session.on_missing {
            None => OnMissing::Status(401),
            Some(RawOnMissing {
                redirect: Some(to),
                status: None,
            }) => {
                let to = e.text(&at("session.on_missing.redirect"), to);
                if to.is_empty() || to.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                    e.add(
                        at("session.on_missing.redirect"),
                        "must be a URL or path without spaces",
                    );
                }
                OnMissing::Redirect(to)
            }
            Some(RawOnMissing {
                redirect: None,
                status: Some(s),
            }) => {
                if !(200..=599).contains(s) {
                    e.add(
                        at("session.on_missing.status"),
                        "must be an HTTP status between 200 and 599",
                    );
                }
                OnMissing::Status(*s)
            }
            Some(_) => {
                e.add(
                    at("session.on_missing"),
                    "give exactly one of `redirect` or `status`",
                );
                OnMissing::Status(401)
            }
        };
        let on_directive_error = match e.choice(
            &at("on_directive_error"),
            &r.on_directive_error,
            &["reject", "ignore"],
        ) {
            "ignore" => OnDirectiveError::Ignore,
            _ => OnDirectiveError::Reject,
        };
        let connect_timeout = e.duration(
            &at("connect_timeout"),
            &r.connect_timeout,
            Duration::from_secs(5),
        );
        let read_timeout = e.duration(
            &at("read_timeout"),
            &r.read_timeout,
            Duration::from_secs(60),
        );
        out.push(RouteConfig {
            name,
            host,
            path_prefix,
            ignore_case: r.matches.ignore_case,
            upstreams,
            read,
            write,
            headers,
            require,
            on_missing,
            on_directive_error,
            connect_timeout,
            read_timeout,
        });
    }
    out
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
            StoreKind::Embedded {
                path: "/etc/gimlet/data/sessions.redb".into(),
                cache: 10_000
            }
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
            e.contains("session.lifetyme: unknown field `lifetyme`"),
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
}
