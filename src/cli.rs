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
    /// Run the gateway on the embedded store in front of a built-in demo app.
    Demo {
        /// Where the gateway listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
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
            println!("{}", keygen());
            0
        }
        Command::Demo { listen, data } => match crate::demo::run(&listen, &data) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("gimlet demo: {e}");
                1
            }
        },
    }
}

/// 32 random bytes, base64url: 43 characters.
pub fn keygen() -> String {
    use base64::Engine;
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the OS random number generator failed");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
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
            match crate::server::open_store(&c)? {
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
                crate::config::StoreKind::Embedded { .. } => "embedded",
                crate::config::StoreKind::Redis(_) => "redis",
            }
        );
    }
    0
}
