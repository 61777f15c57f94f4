//! Gimlet: a pingora reverse-proxy gateway that gives legacy web apps real
//! sessions without touching their code.
//!
//! The modules form layers; each imports only from the layers below it, and
//! the session core (everything up to [`session`]) never sees a pingora type.
//! Bottom to top:
//!
//! 1. [`model`]: the shared words (ids, channels, key policies, limits, cookie
//!    payloads, error kinds); [`path`]: the request path normalizer;
//!    [`headers`]: header-name folding and the spoofable names.
//! 2. [`codec`]: sealing and opening cookie values (AES-256-GCM or
//!    HMAC-SHA256), key generation; [`cookie`]: cookie names, `Cookie`
//!    parsing, `Set-Cookie` lines; [`directives`]: parsing `X-Session-*`
//!    response headers.
//! 3. [`store`]: the store trait, the write batch, one file per backend, each
//!    owning its options type.
//! 4. [`session`]: the per-request session: read from cookies and the store,
//!    what is forwarded, how directives apply.
//! 5. [`config`]: the YAML file, validated into typed settings.
//! 6. [`pool`]: a route's upstreams (pingora-load-balancing selection,
//!    health probes, passive ejection); [`routes`], [`metrics`], [`logging`], [`telemetry`] (OTLP spans and the
//!    W3C trace context); [`exchange`]: one request's way
//!    through the gateway, without pingora; [`proxy`]: the pingora hooks that
//!    call it; [`admin`]: metrics, health and the session API.
//! 7. [`server`]: wiring and signals; [`downstream`]: pingora's HTTP/1 loop,
//!    with idle connections that hold no request state, the header timeout
//!    and the connection cap; [`demo`]: the built-in
//!    demo app.
//! 8. [`cli`]: the command line.

pub mod admin;
pub mod cli;
pub mod codec;
pub mod config;
pub mod cookie;
pub mod demo;
pub mod directives;
pub mod downstream;
pub mod exchange;
pub mod headers;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod path;
pub mod pool;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod session;
pub mod store;
pub mod telemetry;
