//! Gimlet: a pingora reverse-proxy gateway that gives legacy web apps real
//! sessions without touching their code.
//!
//! The crate is split so that the session core never sees a pingora type:
//!
//! - [`config`]: the YAML file, validated into typed settings;
//! - [`codec`]: sealing and opening cookie values (AES-256-GCM or HMAC-SHA256);
//! - [`cookie`]: cookie names, `Cookie` parsing and `Set-Cookie` lines;
//! - [`session`]: the session model, what is forwarded, how directives apply;
//! - [`directives`]: parsing `X-Session-*` response headers;
//! - [`store`]: the store trait and one file per backend;
//! - [`routes`]: host and path routing;
//! - [`proxy`]: the thin pingora hooks; [`server`]: wiring and signals;
//! - [`metrics`] and [`admin`]: Prometheus and health;
//! - [`demo`]: the built-in demo app; [`cli`]: the command line.

pub mod admin;
pub mod cli;
pub mod codec;
pub mod config;
pub mod cookie;
pub mod demo;
pub mod directives;
pub mod headers;
pub mod logging;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod session;
pub mod store;

/// Current time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
