//! Every default of the config file, named, in one place (SPEC section 7
//! and the README's field reference say the same).

use std::time::Duration;

/// `listen:` left out: one plain listener.
pub const LISTEN: &str = "0.0.0.0:8080";
/// `server.grace_period`: how long SIGTERM lets requests finish.
pub const GRACE_PERIOD: Duration = Duration::from_secs(5);
/// `server.header_timeout`: Go's and most gateways' advice for slow
/// clients; nginx's `client_header_timeout` is 60s.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `server.keepalive_timeout`: pingora's own keep-alive default.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// `server.max_connections`: client connections at once.
pub const MAX_CONNECTIONS: usize = 10_000;

/// `session.cookie.name`.
pub const COOKIE_NAME: &str = "gimlet";
/// `session.cookie.path`, and `match.path_prefix`.
pub const PATH: &str = "/";
/// `session.lifetime`: seven days.
pub const LIFETIME: Duration = Duration::from_secs(7 * 86400);
/// `session.touch_interval`.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(60);
/// `session.regenerate_grace`.
pub const REGENERATE_GRACE: Duration = Duration::from_secs(10);

/// `store.path` (embedded), relative to the config file.
pub const EMBEDDED_PATH: &str = "data/sessions.redb";
/// `store.cache` (embedded): sessions kept in memory in front of the file.
pub const EMBEDDED_CACHE: usize = 10_000;
/// `store.prefix` (Redis).
pub const REDIS_PREFIX: &str = "gimlet:";
/// `store.timeout`: bounds every store round trip.
pub const STORE_TIMEOUT: Duration = Duration::from_millis(250);

/// `routes[].session.on_missing`: `{status: 401}`.
pub const ON_MISSING_STATUS: u16 = 401;
/// `routes[].connect_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `routes[].read_timeout`.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// `routes[].health_check.interval`: how often each upstream is probed.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// `routes[].health_check.timeout`: one probe (connect, and the response).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// `routes[].health_check.expect`: the probe's status.
pub const HEALTH_EXPECT: u16 = 200;
/// `routes[].health_check.eject_for`: how long an upstream that failed a
/// connection is skipped (passive ejection; on without a probe too).
pub const EJECT_FOR: Duration = Duration::from_secs(10);
/// The most upstreams one route may list (a request remembers the ones it
/// tried in one 64-bit word).
pub const MAX_UPSTREAMS: usize = 64;

/// `tracing.otlp.sample_ratio`: every request (the OpenTelemetry default).
pub const SAMPLE_RATIO: f64 = 1.0;
/// `tracing.otlp.service_name`.
pub const SERVICE_NAME: &str = "gimlet";
/// `tracing.otlp.timeout`: one export.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// `store.sql.cleanup_interval`.
pub const SQL_CLEANUP_INTERVAL: Duration = Duration::from_secs(60);
/// `store.sql.pool`: connections per gateway process.
pub const SQL_POOL: u32 = 16;
