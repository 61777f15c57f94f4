//! Prometheus metrics (SPEC section 9), in a registry owned by the process
//! (not the global one) so each gateway instance counts on its own.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub sessions: IntCounterVec,
    pub cookies_rejected: IntCounterVec,
    /// `session.revocation` checks, by result (live, ended, error).
    pub revocation_checks: IntCounterVec,
    pub directives: IntCounterVec,
    pub directive_errors: IntCounterVec,
    pub store_ops: IntCounterVec,
    /// `store.kind: sql`: expired sessions the cleanup task deleted, and
    /// its passes by result.
    pub store_cleanup_deleted: IntCounter,
    pub store_cleanups: IntCounterVec,
    pub store_duration: HistogramVec,
    pub set_cookie_bytes: Histogram,
    pub config_reloads: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub forward_too_large: IntCounterVec,
    pub upstream_cookies_dropped: IntCounter,
    /// 1 when the last config load (start or SIGHUP) succeeded.
    pub reload_ok: IntGauge,
    /// When the config was last loaded successfully (unix seconds).
    pub reload_ok_time: Gauge,
    /// Requests in flight (set when scraped).
    pub in_flight: IntGauge,
    /// Session API calls, by operation and status.
    pub admin_requests: IntCounterVec,
    /// 1 while an upstream is in service (probes pass, not ejected).
    pub upstream_health: IntGaugeVec,
    /// Requests sent to each upstream, by the upstream's status (`error`:
    /// no response: a failed connection, a timeout, a reset).
    pub upstream_requests: IntCounterVec,
    /// Client connections open on the proxy listeners.
    pub connections_open: IntGauge,
    /// Connections turned away: `max_connections` (answered `503`) or
    /// `header_timeout` (closed).
    pub connections_refused: IntCounterVec,
}

const LATENCY: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const STORE_LATENCY: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        let histo = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                    labels,
                )
                .unwrap(),
            )
        };
        let m = Metrics {
            requests: counter(
                "gimlet_requests_total",
                "Requests answered, by route and status.",
                &["route", "status"],
            ),
            request_duration: histo(
                "gimlet_request_duration_seconds",
                "Time from request start to the end of the response, by route.",
                &["route"],
                LATENCY,
            ),
            upstream_duration: histo(
                "gimlet_upstream_duration_seconds",
                "Time from choosing an upstream to its response header, by route.",
                &["route"],
                LATENCY,
            ),
            sessions: counter(
                "gimlet_sessions_total",
                "Session lifecycle events.",
                &["event"],
            ),
            cookies_rejected: counter(
                "gimlet_cookies_rejected_total",
                "Request cookies treated as no session, by reason.",
                &["reason"],
            ),
            revocation_checks: counter(
                "gimlet_revocation_checks_total",
                "session.revocation checks of request sessions, by result.",
                &["result"],
            ),
            directives: counter(
                "gimlet_directives_total",
                "Directives applied, by kind.",
                &["directive"],
            ),
            directive_errors: counter(
                "gimlet_directive_errors_total",
                "Responses whose directives were rejected, by reason.",
                &["reason"],
            ),
            store_ops: counter(
                "gimlet_store_operations_total",
                "Store round trips, by operation and result.",
                &["op", "result"],
            ),
            store_cleanup_deleted: reg(
                &registry,
                IntCounter::new(
                    "gimlet_store_cleanup_deleted_total",
                    "Expired sessions the SQL store's cleanup task deleted.",
                )
                .unwrap(),
            ),
            store_cleanups: counter(
                "gimlet_store_cleanups_total",
                "SQL store cleanup passes, by result (ok, error).",
                &["result"],
            ),
            store_duration: histo(
                "gimlet_store_duration_seconds",
                "Store round trip time, by operation.",
                &["op"],
                STORE_LATENCY,
            ),
            set_cookie_bytes: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "gimlet_set_cookie_bytes",
                        "Size of each Set-Cookie value sent.",
                    )
                    .buckets(vec![
                        64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 3072.0, 4096.0,
                    ]),
                )
                .unwrap(),
            ),
            config_reloads: counter(
                "gimlet_config_reloads_total",
                "Config reloads (SIGHUP), by result.",
                &["result"],
            ),
            build_info: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new("gimlet_build_info", "Build information."),
                    &["version"],
                )
                .unwrap(),
            ),
            forward_too_large: counter(
                "gimlet_forward_too_large_total",
                "Requests answered 500 because the readable session exceeded limits.forward_bytes.",
                &["route"],
            ),
            upstream_cookies_dropped: reg(
                &registry,
                IntCounter::new(
                    "gimlet_upstream_cookies_dropped_total",
                    "Set-Cookie lines from upstreams that used the gateway's cookie names.",
                )
                .unwrap(),
            ),
            reload_ok: reg(
                &registry,
                IntGauge::new(
                    "gimlet_config_last_reload_successful",
                    "Whether the last config load (start or SIGHUP) succeeded.",
                )
                .unwrap(),
            ),
            reload_ok_time: reg(
                &registry,
                Gauge::new(
                    "gimlet_config_last_reload_success_timestamp_seconds",
                    "When the config was last loaded successfully.",
                )
                .unwrap(),
            ),
            in_flight: reg(
                &registry,
                IntGauge::new("gimlet_requests_in_flight", "Requests being served.").unwrap(),
            ),
            connections_open: reg(
                &registry,
                IntGauge::new(
                    "gimlet_connections_open",
                    "Client connections open on the proxy listeners.",
                )
                .unwrap(),
            ),
            connections_refused: counter(
                "gimlet_connections_refused_total",
                "Client connections turned away: max_connections (answered 503) or header_timeout (closed).",
                &["reason"],
            ),
            admin_requests: counter(
                "gimlet_admin_requests_total",
                "Session API calls on the admin listener, by operation and status.",
                &["op", "status"],
            ),
            upstream_health: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "gimlet_upstream_health",
                        "1 while the upstream is in service (its probes pass and it is not ejected after a failed connection).",
                    ),
                    &["route", "upstream"],
                )
                .unwrap(),
            ),
            upstream_requests: counter(
                "gimlet_upstream_requests_total",
                "Requests sent to each upstream, by its status (error: no response).",
                &["route", "upstream", "status"],
            ),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Pre-create the fixed label sets so that every family shows at 0.
        for e in [
            "created",
            "regenerated",
            "destroyed",
            "expired",
            "followed",
            "revoked",
            "evicted",
        ] {
            m.sessions.with_label_values(&[e]);
        }
        for r in crate::model::Rejection::ALL {
            m.cookies_rejected.with_label_values(&[r.label()]);
        }
        for r in ["live", "ended", "error"] {
            m.revocation_checks.with_label_values(&[r]);
        }
        for k in crate::model::DirectiveErrorKind::ALL {
            m.directive_errors.with_label_values(&[k.label()]);
        }
        for d in crate::model::DIRECTIVE_LABELS {
            m.directives.with_label_values(&[d]);
        }
        for op in ["read", "write"] {
            for res in ["ok", "error", "timeout"] {
                m.store_ops.with_label_values(&[op, res]);
            }
        }
        m.store_ops.with_label_values(&["write", "unknown"]);
        for r in ["ok", "error"] {
            m.config_reloads.with_label_values(&[r]);
        }
        for r in ["max_connections", "header_timeout"] {
            m.connections_refused.with_label_values(&[r]);
        }
        m
    }

    /// A config was loaded: say so, and create the per-route label sets so
    /// every family shows at 0 before its first event.
    pub fn loaded(&self, routes: &[&str]) {
        self.reload_ok.set(1);
        self.reload_ok_time
            .set(crate::model::now_ms() as f64 / 1000.0);
        for r in routes {
            self.forward_too_large.with_label_values(&[r]);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        buf
    }
}

/// The status as a label, without an allocation per request.
pub fn status_label(s: u16) -> &'static str {
    STATUS_LABELS
        .get(s as usize)
        .map_or("other", |s| s.as_str())
}

static STATUS_LABELS: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| (0..600).map(|c| c.to_string()).collect());

/// One route's per-request series, resolved once per route (and per status
/// the route answers with) instead of on every request: `with_label_values`
/// hashes its labels and takes the family's lock each time.
pub struct RouteMetrics {
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    /// `gimlet_requests_total` by status (0..600, then "other"), filled the
    /// first time the route answers with that status, so only statuses seen
    /// are exported, as before.
    requests: Box<[std::sync::OnceLock<IntCounter>]>,
}

impl RouteMetrics {
    pub fn new(m: &Metrics, route: &str) -> RouteMetrics {
        RouteMetrics {
            request_duration: m.request_duration.with_label_values(&[route]),
            upstream_duration: m.upstream_duration.with_label_values(&[route]),
            requests: (0..=600).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    pub fn requests(&self, m: &Metrics, route: &str, status: u16) -> &IntCounter {
        let i = (status as usize).min(600);
        self.requests[i]
            .get_or_init(|| m.requests.with_label_values(&[route, status_label(status)]))
    }
}

/// One upstream's series, resolved once per upstream (and status).
pub struct UpstreamMetrics {
    pub health: IntGauge,
    /// By status (1..600, then "other"); index 0: `error`.
    requests: Box<[std::sync::OnceLock<IntCounter>]>,
}

impl UpstreamMetrics {
    pub fn new(m: &Metrics, route: &str, upstream: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            health: m.upstream_health.with_label_values(&[route, upstream]),
            requests: (0..=600).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    /// `status` 0: no response.
    pub fn requests(&self, m: &Metrics, route: &str, upstream: &str, status: u16) -> &IntCounter {
        let i = (status as usize).min(600);
        self.requests[i].get_or_init(|| {
            let label = if status == 0 {
                "error"
            } else {
                status_label(status)
            };
            m.upstream_requests
                .with_label_values(&[route, upstream, label])
        })
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
