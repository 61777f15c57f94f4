//! The command line: `run`, `check`, `migrate`, `keygen`, `health`, `demo`,
//! `sessions`.

use crate::config::Config;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "gimlet",
    version,
    about = "A session gateway: signed, encrypted cookie sessions for the web app behind it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a config file.
    Run {
        /// The YAML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file and exit (non-zero with the errors).
    Check {
        /// The YAML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Also connect to the configured store.
        #[arg(long)]
        connect: bool,
        /// Print the effective config (defaults filled, `${}` expanded,
        /// secrets redacted).
        #[arg(long)]
        print: bool,
    },
    /// Create or update the SQL store's tables and functions
    /// (`store.kind: sql`), then exit.
    Migrate {
        /// The YAML config file.
        #[arg(short, long, value_name = "FILE", required_unless_present = "print")]
        config: Option<PathBuf>,
        /// Print the schema's SQL for `postgres` (the default) or `mysql`
        /// (MySQL and MariaDB) instead of applying it.
        #[arg(long, value_name = "DIALECT", num_args = 0..=1, default_missing_value = "postgres")]
        print: Option<SchemaDialect>,
    },
    /// Print a new random secret for `session.secrets`.
    Keygen,
    /// Print the JSON Schema of the config file (for editors and CI).
    Schema,
    /// Probe a health endpoint (for container HEALTHCHECKs without curl):
    /// exit 0 on a 2xx answer within two seconds.
    Health {
        /// An http:// URL on the admin listener.
        #[arg(default_value = "http://127.0.0.1:9464/healthz")]
        url: String,
    },
    /// Run the gateway on the embedded store in front of a built-in demo app.
    Demo {
        /// Where the gateway listens (`ip:port`, or a port on 127.0.0.1).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// The admin listener (/metrics, /healthz); by default 127.0.0.1:9464,
        /// or any free port when that one is taken.
        #[arg(long)]
        admin: Option<String>,
        /// Directory for the demo's session file and secret.
        #[arg(long, default_value = "data")]
        data: PathBuf,
    },
    /// Manage sessions through the running gateway's admin API
    /// (`admin.addr` and `admin.token` from the config).
    Sessions {
        /// The gateway's YAML config file.
        #[arg(short, long, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        /// Print the API's JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        op: SessionsOp,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SchemaDialect {
    Postgres,
    Mysql,
}

#[derive(Subcommand)]
enum SessionsOp {
    /// A user's live sessions (`session.user_key`).
    List {
        #[arg(long)]
        user: String,
    },
    /// One session's metadata and key names (never values).
    Show {
        id: String,
        /// Its hash tag (Redis; listed by `list`).
        #[arg(long)]
        tag: Option<String>,
    },
    /// End one session, or every session of a user.
    Revoke {
        #[arg(required_unless_present = "user", conflicts_with = "user")]
        id: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        tag: Option<String>,
    },
}

/// Run the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => match Config::load(&config) {
            Ok(c) => {
                crate::logging::init(&c.log);
                match crate::server::run(c, Vec::new()) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("gimlet: {e}");
                        1
                    }
                }
            }
            Err(e) => {
                eprintln!("gimlet: {e}");
                2
            }
        },
        Command::Check {
            config,
            connect,
            print,
        } => check(&config, connect, print),
        Command::Migrate { config, print } => migrate(config, print),
        Command::Keygen => {
            println!("{}", crate::codec::keygen());
            0
        }
        Command::Schema => {
            print!("{}", crate::config::schema());
            0
        }
        Command::Health { url } => match health(&url) {
            Ok(status) => {
                println!("{url}: {status}");
                if (200..300).contains(&status) {
                    0
                } else {
                    1
                }
            }
            Err(e) => {
                eprintln!("{url}: {e}");
                1
            }
        },
        Command::Demo {
            listen,
            admin,
            data,
        } => match crate::demo::run(&listen, admin.as_deref(), &data) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("gimlet demo: {e}");
                1
            }
        },
        Command::Sessions { config, json, op } => match sessions(config, json, op) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("gimlet sessions: {e}");
                1
            }
        },
    }
}

/// `gimlet sessions ...`: one admin API call, printed.
fn sessions(config: Option<PathBuf>, json: bool, op: SessionsOp) -> Result<(), String> {
    let file = config.ok_or("give the gateway's config with -c FILE")?;
    let c = Config::load(&file).map_err(|e| e.to_string())?;
    let addr = c
        .admin
        .ok_or("the config has no admin listener (admin.addr)")?;
    let token = c
        .admin_token
        .clone()
        .ok_or("the config has no admin.token: the session API is off")?;
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let with_tag = |path: String, tag: &Option<String>| match tag {
        Some(t) => format!("{path}?tag={}", enc(t)),
        None => path,
    };
    let (method, path) = match &op {
        SessionsOp::List { user } => ("GET", format!("/sessions?user={}", enc(user))),
        SessionsOp::Show { id, tag } => ("GET", with_tag(format!("/sessions/{}", enc(id)), tag)),
        SessionsOp::Revoke {
            id: Some(id), tag, ..
        } => ("DELETE", with_tag(format!("/sessions/{}", enc(id)), tag)),
        SessionsOp::Revoke { user, .. } => (
            "DELETE",
            format!("/sessions?user={}", enc(user.as_deref().unwrap_or(""))),
        ),
    };
    // An IPv6 address goes in brackets in a Host header.
    let host = match addr.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let auth = format!("Bearer {}", &*token);
    let (status, body) = http_call(
        method,
        &host,
        addr.port(),
        &path,
        &[("authorization", &auth)],
    )?;
    if json {
        println!("{body}");
        return if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("the admin API answered {status}"))
        };
    }
    let v: serde_json::Value = serde_json::from_str(&body)
        .map_err(|_| format!("the admin API answered {status}: {body}"))?;
    if !(200..300).contains(&status) {
        return Err(format!(
            "{status}: {}",
            v["error"].as_str().unwrap_or(body.as_str())
        ));
    }
    print!("{}", render(&op, &v));
    Ok(())
}

/// A unix-seconds field as an RFC 3339 time.
fn when(v: &serde_json::Value) -> String {
    v.as_u64()
        .map(|s| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
            )
            .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

fn render(op: &SessionsOp, v: &serde_json::Value) -> String {
    let text = |x: &serde_json::Value| x.as_str().unwrap_or("-").to_string();
    match op {
        SessionsOp::List { .. } => {
            let rows: Vec<[String; 7]> = v["sessions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    [
                        text(&s["id"]),
                        text(&s["tag"]),
                        when(&s["created"]),
                        when(&s["last_seen"]),
                        when(&s["expires"]),
                        text(&s["ip"]),
                        text(&s["user_agent"]),
                    ]
                })
                .collect();
            let head = [
                "ID",
                "TAG",
                "CREATED",
                "LAST SEEN",
                "EXPIRES",
                "IP",
                "USER AGENT",
            ];
            let mut width = head.map(str::len);
            for r in &rows {
                for (w, c) in width.iter_mut().zip(r) {
                    *w = (*w).max(c.len());
                }
            }
            let line = |cells: Vec<&str>| {
                let mut s = cells
                    .iter()
                    .zip(width)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ");
                s.truncate(s.trim_end().len());
                s + "\n"
            };
            let mut out = line(head.to_vec());
            for r in &rows {
                out += &line(r.iter().map(String::as_str).collect());
            }
            out + &format!(
                "{} session{}\n",
                rows.len(),
                if rows.len() == 1 { "" } else { "s" }
            )
        }
        SessionsOp::Show { .. } => {
            let mut out = format!(
                "id:            {}\ntag:           {}\nended:         {}\ndata expires:  {}\n",
                text(&v["id"]),
                text(&v["tag"]),
                v["ended"].as_bool().unwrap_or(false),
                when(&v["data_expires"]),
            );
            if let Some(keys) = v["keys"].as_object() {
                for (ch, names) in keys {
                    let names: Vec<String> =
                        names.as_array().into_iter().flatten().map(text).collect();
                    out += &format!(
                        "keys ({ch}):{:pad$}{}\n",
                        "",
                        names.join(", "),
                        pad = 9usize.saturating_sub(ch.len())
                    );
                }
            }
            out
        }
        SessionsOp::Revoke { .. } => {
            let n = v["ended"].as_u64().unwrap_or(0);
            format!("ended {n} session{}\n", if n == 1 { "" } else { "s" })
        }
    }
}

/// The embedded store file: openable, or held by a running gateway, or its
/// directory writable (it is created on first start). Never creates it.
fn check_embedded(path: &std::path::Path) -> Result<String, String> {
    if !path.exists() {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let mut d = dir;
        while !d.exists() {
            d = d.parent().unwrap_or(std::path::Path::new("/"));
        }
        let meta = std::fs::metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
        if meta.permissions().readonly() {
            return Err(format!("{} is not writable", d.display()));
        }
        return Ok(format!(
            "embedded store will be created at {}",
            path.display()
        ));
    }
    match redb::Database::open(path) {
        Ok(_) => Ok(format!("embedded store reachable at {}", path.display())),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Ok(format!(
            "embedded store at {} is open in a running gateway",
            path.display()
        )),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// GET `url` with pingora's HTTP client; the response status.
fn health(url: &str) -> Result<u16, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// URLs".into());
    }
    let host = uri.host().ok_or("URL without a host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    http_call("GET", &host, port, &path, &[]).map(|(status, _)| status)
}

/// One plain-HTTP request with pingora's client, within two seconds: the
/// status and the body (at most 1 MiB).
fn http_call(
    method: &str,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let probe = async {
            let peer = pingora::upstreams::peer::HttpPeer::new(
                (host.trim_start_matches('[').trim_end_matches(']'), port),
                false,
                String::new(),
            );
            let connector = pingora::connectors::http::Connector::new(None);
            let (mut s, _) = connector
                .get_http_session(&peer)
                .await
                .map_err(|e| e.to_string())?;
            let mut req = pingora::http::RequestHeader::build(method, path.as_bytes(), None)
                .map_err(|e| e.to_string())?;
            req.insert_header("host", host).map_err(|e| e.to_string())?;
            for (n, v) in headers {
                req.insert_header(n.to_string(), v.to_string())
                    .map_err(|e| e.to_string())?;
            }
            s.write_request_header(Box::new(req))
                .await
                .map_err(|e| e.to_string())?;
            s.finish_request_body().await.map_err(|e| e.to_string())?;
            s.read_response_header().await.map_err(|e| e.to_string())?;
            let status = s
                .response_header()
                .map(|r| r.status.as_u16())
                .ok_or_else(|| "no response".to_string())?;
            let mut body = Vec::new();
            while let Some(chunk) = s.read_response_body().await.map_err(|e| e.to_string())? {
                body.extend_from_slice(&chunk);
                if body.len() > 1 << 20 {
                    return Err("the answer is too large".to_string());
                }
            }
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(std::time::Duration::from_secs(2), probe)
            .await
            .map_err(|_| "timed out".to_string())?
    })
}

/// A runtime for one command's store calls (`None`: said why on stderr).
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| eprintln!("cannot start a runtime: {e}"))
        .ok()
}

/// `gimlet migrate`: the SQL schema applied (or printed).
fn migrate(file: Option<PathBuf>, print: Option<SchemaDialect>) -> i32 {
    use crate::store::sql::Dialect;
    if let Some(d) = print {
        let d = match d {
            SchemaDialect::Postgres => Dialect::Postgres,
            SchemaDialect::Mysql => Dialect::Mysql,
        };
        print!("{}", d.schema());
        return 0;
    }
    let Some(file) = file else { return 2 };
    let c = match Config::load(&file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let crate::config::StoreKind::Sql(o) = &c.store.kind else {
        eprintln!(
            "{}: store.kind is not sql; there is no schema to migrate",
            file.display()
        );
        return 1;
    };
    let store = match crate::store::sql::SqlStore::new(
        (**o).clone(),
        c.store.timeout.max(std::time::Duration::from_secs(5)),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let Some(rt) = runtime() else { return 1 };
    match rt.block_on(store.migrate()) {
        Ok(()) => {
            println!("{}: schema up to date", file.display());
            0
        }
        Err(e) => {
            eprintln!("{}: migrate failed: {e}", file.display());
            1
        }
    }
}

fn check(file: &std::path::Path, connect: bool, print: bool) -> i32 {
    let c = match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if print {
        print!("{}", c.effective());
        if !connect {
            return 0;
        }
    }
    if connect {
        let Some(rt) = runtime() else { return 1 };
        let result = rt.block_on(async {
            if let crate::config::StoreKind::Embedded(o) = &c.store.kind {
                return check_embedded(&o.path);
            }
            match crate::server::open_store(&c).map_err(|e| e.to_string())? {
                None => Ok("no store (kind: none)".to_string()),
                Some(store) => tokio::time::timeout(
                    c.store.timeout.max(std::time::Duration::from_secs(1)),
                    store.ping(),
                )
                .await
                .map_err(|_| "the store did not answer in time".to_string())?
                .map(|_| format!("{} store reachable", store.kind()))
                .map_err(|e| e.to_string()),
            }
        });
        match result {
            Ok(msg) => println!("{}: ok ({msg})", file.display()),
            Err(e) => {
                eprintln!("{}: store check failed: {e}", file.display());
                return 1;
            }
        }
    } else {
        println!(
            "{}: ok ({} route{}, store {})",
            file.display(),
            c.routes.len(),
            if c.routes.len() == 1 { "" } else { "s" },
            match &c.store.kind {
                crate::config::StoreKind::None => "none",
                crate::config::StoreKind::Memory => "memory",
                crate::config::StoreKind::Embedded(_) => "embedded",
                crate::config::StoreKind::Redis(_) => "redis",
                crate::config::StoreKind::Sql(_) => "sql",
            }
        );
    }
    0
}
