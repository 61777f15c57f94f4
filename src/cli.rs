//! The command line: `run`, `check`, `keygen`, `demo`.

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
    },
    /// Print a new random secret for `session.secrets`.
    Keygen,
    /// Probe a health endpoint (for container HEALTHCHECKs without curl):
    /// exit 0 on a 2xx answer within two seconds.
    Health {
        /// An http:// URL on the admin listener.
        #[arg(default_value = "http://127.0.0.1:9090/healthz")]
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
        Command::Check { config, connect } => check(&config, connect),
        Command::Keygen => {
            println!("{}", crate::codec::keygen());
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let probe = async {
            let peer = pingora::upstreams::peer::HttpPeer::new(
                (host.as_str(), port),
                false,
                String::new(),
            );
            let connector = pingora::connectors::http::Connector::new(None);
            let (mut s, _) = connector
                .get_http_session(&peer)
                .await
                .map_err(|e| e.to_string())?;
            let mut req = pingora::http::RequestHeader::build("GET", path.as_bytes(), None)
                .map_err(|e| e.to_string())?;
            req.insert_header("host", host.as_str())
                .map_err(|e| e.to_string())?;
            s.write_request_header(Box::new(req))
                .await
                .map_err(|e| e.to_string())?;
            s.finish_request_body().await.map_err(|e| e.to_string())?;
            s.read_response_header().await.map_err(|e| e.to_string())?;
            s.response_header()
                .map(|r| r.status.as_u16())
                .ok_or_else(|| "no response".to_string())
        };
        tokio::time::timeout(std::time::Duration::from_secs(2), probe)
            .await
            .map_err(|_| "timed out".to_string())?
    })
}

fn check(file: &std::path::Path, connect: bool) -> i32 {
    let c = match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if connect {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("cannot start a runtime: {e}");
                return 1;
            }
        };
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
            }
        );
    }
    0
}
