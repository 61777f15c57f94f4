//! Wiring: build the pingora server from a [`Config`], run it, reload it.
//!
//! Signals: SIGTERM drains (in-flight requests finish within
//! `server.grace_period`), SIGINT stops at once, SIGHUP reloads routes, keys
//! and secrets from the same file (an invalid file keeps the running config).

use crate::admin::AdminApp;
use crate::config::{Config, StoreKind};
use crate::downstream::{Downstream, Limits};
use crate::exchange::State;
use crate::metrics::Metrics;
use crate::proxy::{Gateway, Shared};
use crate::store::{
    embedded::EmbeddedStore, memory::MemoryStore, redis::RedisStore, sql::SqlStore, Store,
};
use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Why the gateway could not start (the CLI prints it and exits non-zero).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigErrors),
    /// The store could not be opened (`store.path`, a Redis URL).
    #[error("{0}")]
    Store(String),
    /// An upstream address that does not resolve.
    #[error("{0}")]
    Routes(String),
    /// A listener: no free port, or its TLS files.
    #[error("listen {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    /// The demo's data directory or app port.
    #[error("{0}")]
    Demo(String),
    /// The OTLP exporter could not be built.
    #[error("{0}")]
    Tracing(String),
}

/// Open the configured store. Embedded opens its file now (a startup error
/// if it cannot); Redis connects lazily inside the proxy's runtime.
pub fn open_store(config: &Config) -> Result<Option<Store>, StartError> {
    Ok(match &config.store.kind {
        StoreKind::None => None,
        StoreKind::Memory => Some(Store::Memory(MemoryStore::new())),
        StoreKind::Embedded(o) => Some(Store::Embedded(
            EmbeddedStore::open(&o.path, o.cache)
                .map_err(|e| StartError::Store(format!("store.path: {e}")))?,
        )),
        StoreKind::Redis(r) => Some(Store::Redis(Box::new(
            RedisStore::new((**r).clone(), config.store.timeout).map_err(StartError::Store)?,
        ))),
        StoreKind::Sql(o) => Some(Store::Sql(Box::new(
            SqlStore::new((**o).clone(), config.store.timeout).map_err(StartError::Store)?,
        ))),
    })
}

/// The address a listener will serve on, checked by binding it before
/// anything says "listening": an address in use (or not ours) is a startup
/// error naming it, not a process that reports healthy and serves nothing.
/// Port 0 means "any free port": one is picked here so it can be printed
/// (and read by tests and scripts). pingora binds it a moment later.
fn concrete(addr: SocketAddr) -> Result<SocketAddr, StartError> {
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map_err(|e| StartError::Listen {
            addr,
            reason: if addr.port() == 0 {
                format!("cannot find a free port: {e}")
            } else {
                format!("cannot bind: {e}")
            },
        })
}

/// A panic in any thread (a serving thread that could not build its
/// listeners, a bug) ends the process with a non-zero status: a gateway half
/// alive, answering `/healthz` while serving nothing, is worse than one that
/// a supervisor restarts.
fn exit_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!("gimlet: a thread panicked; exiting");
        std::process::exit(101);
    }));
}

/// Serve until a signal says stop. `extra` services (the demo app) run in the
/// same server.
pub fn run(
    config: Config,
    extra: Vec<Box<dyn pingora::services::ServiceWithDependents>>,
) -> Result<(), StartError> {
    if config.session.settings.dev_insecure {
        tracing::warn!("session.dev_insecure is ON: every request counts as HTTPS and cookies lose Secure. Never use this in production.");
        eprintln!("gimlet: WARNING: session.dev_insecure is on (local development only)");
    }
    let store = open_store(&config)?;
    let state = State::new(config.clone()).map_err(StartError::Routes)?;
    let tracer = config
        .tracing
        .as_ref()
        .map(crate::telemetry::Tracer::start)
        .transpose()
        .map_err(StartError::Tracing)?;
    let shared = Arc::new(Shared {
        state: arc_swap::ArcSwap::from_pointee(state),
        store,
        tracer,
        metrics: Metrics::new(),
        inflight: Default::default(),
    });
    let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    shared.metrics.loaded(&names);

    let grace = config
        .server
        .grace_period
        .as_secs()
        .max(if config.server.grace_period.is_zero() {
            0
        } else {
            1
        });
    let mut conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(grace),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    // Graceful upgrade is not used; keep its socket out of shared /tmp names.
    let run_dir = std::env::temp_dir().join(format!("gimlet-{}", std::process::id()));
    conf.upgrade_sock = run_dir.join("upgrade.sock").to_string_lossy().into_owned();
    conf.pid_file = run_dir.join("gimlet.pid").to_string_lossy().into_owned();
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let gateway = Gateway {
        shared: shared.clone(),
    };
    let mut app = pingora::proxy::http_proxy(&server.configuration, gateway);
    let mut options = pingora::apps::HttpServerOptions::default();
    // HTTP/2 connections: pingora's own loop; silent ones close after the
    // keep-alive timeout too.
    options.h2_idle_timeout = Some(config.server.keepalive_timeout);
    app.server_options = Some(options);
    let limits = Limits::new(&config.server, &shared.metrics);
    crate::downstream::raise_fd_limit(config.server.max_connections);
    let mut proxy = Service::new(
        "gimlet proxy".to_string(),
        Downstream {
            app: Arc::new(app),
            limits: limits.clone(),
        },
    );
    let mut lines = Vec::new();
    // Every address the process will serve on, for the readiness notice.
    let mut bound = Vec::new();
    for l in &config.listen {
        let addr = concrete(l.addr)?;
        bound.push(addr);
        match &l.tls {
            Some(t) => {
                let mut tls =
                    TlsSettings::intermediate(&t.cert.to_string_lossy(), &t.key.to_string_lossy())
                        .map_err(|e| StartError::Listen {
                            addr,
                            reason: format!("TLS certificate or key: {e}"),
                        })?;
                tls.enable_h2();
                proxy.add_listener(
                    ListenerConfig::tcp(addr.to_string())
                        .tls(tls)
                        .l4_buffer(L4BufferSettings::new(TLS_READ_BUFFER, L4_WRITE_BUFFER)),
                );
                lines.push(format!("gimlet listening on https://{addr}"));
            }
            None => {
                proxy.add_listener(
                    ListenerConfig::tcp(addr.to_string())
                        .l4_buffer(L4BufferSettings::new(TCP_READ_BUFFER, L4_WRITE_BUFFER)),
                );
                lines.push(format!("gimlet listening on http://{addr}"));
            }
        }
    }
    server.add_service(proxy);

    if let Some(addr) = config.admin {
        let addr = concrete(addr)?;
        bound.push(addr);
        let mut admin = Service::new(
            "gimlet admin".to_string(),
            HttpServer::new_app(AdminApp {
                shared: shared.clone(),
            }),
        );
        admin.add_tcp(&addr.to_string());
        server.add_service(admin);
        lines.push(format!("gimlet admin on http://{addr}"));
    }
    for svc in extra {
        server.add_boxed_service(svc);
    }
    if let Some(Store::Sql(_)) = &shared.store {
        server.add_service(background_service(
            "gimlet sql cleanup",
            SqlCleanup {
                shared: shared.clone(),
            },
        ));
    }
    server.add_service(background_service(
        "gimlet upstream health",
        UpstreamHealth {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "gimlet reloader",
        Reloader {
            shared: shared.clone(),
            file: config.file.clone(),
            limits,
        },
    ));

    for l in &lines {
        println!("{l}");
    }
    println!("gimlet started (pid {})", std::process::id());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(
        store = shared.store.as_ref().map_or("none", |s| s.kind()),
        routes = config.routes.len(),
        "gimlet started"
    );
    exit_on_panic();
    notify_ready_when_serving(bound);
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            shared: shared.clone(),
            grace: config.server.grace_period,
            run_dir: run_dir.clone(),
        }),
    });
    let _ = std::fs::remove_dir_all(&run_dir);
    if let Some(t) = &shared.tracer {
        t.shutdown();
    }
    Ok(())
}

/// SIGTERM (and SIGQUIT): stop accepting, let requests in flight finish, exit
/// as soon as none is left or `server.grace_period` has passed. SIGINT: now.
struct Signals {
    shared: Arc<Shared>,
    grace: std::time::Duration,
    /// Removed on every way out, the early drained exit included.
    run_dir: PathBuf,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping now");
                return ShutdownSignal::FastShutdown;
            }
            _ = term.recv() => {}
            _ = quit.recv() => {}
        }
        let in_flight = self.shared.inflight.load(Ordering::Acquire);
        tracing::info!(in_flight, grace_period = ?self.grace, "SIGTERM: draining");
        // pingora waits out the whole grace period; exit as soon as the
        // last request in flight is done instead.
        let shared = self.shared.clone();
        let run_dir = self.run_dir.clone();
        let deadline = std::time::Instant::now() + self.grace;
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            while std::time::Instant::now() < deadline {
                if shared.inflight.load(Ordering::Acquire) == 0 {
                    // pingora would sleep out the whole grace period; leave
                    // now, after the cleanup `run` does on its way out.
                    tracing::info!("drained: exiting");
                    let _ = std::fs::remove_dir_all(&run_dir);
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                    let _ = std::io::stderr().flush();
                    std::process::exit(0);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
        ShutdownSignal::GracefulTerminate
    }
}

/// The read buffer pingora gives each accepted plain-TCP connection: none.
/// Its default (64 KiB, allocated at accept) made every idle connection
/// cost about 110 KB; the HTTP parser reads headers into its own 4 KiB
/// buffer and bodies into theirs, so a buffer under them only adds a copy.
const TCP_READ_BUFFER: usize = 0;
/// TLS reads whole records (up to 16 KiB): one fits.
const TLS_READ_BUFFER: usize = 16 * 1024;
/// pingora's default (one MSS).
const L4_WRITE_BUFFER: usize = 1460;

/// systemd `Type=notify`: say `READY=1` once every listener accepts
/// connections (pingora binds them as `server.run` starts). Nothing without
/// `NOTIFY_SOCKET`.
fn notify_ready_when_serving(addrs: Vec<SocketAddr>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for a in &addrs {
            let probe = if a.ip().is_unspecified() {
                SocketAddr::new(
                    match a {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    },
                    a.port(),
                )
            } else {
                *a
            };
            while std::net::TcpStream::connect_timeout(&probe, Duration::from_millis(200)).is_err()
            {
                if std::time::Instant::now() > deadline {
                    tracing::error!(addr = %a, "not serving after 30s; not telling systemd ready");
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "could not tell systemd the gateway is ready");
        }
    });
}

/// systemd: tell it a reload starts (`RELOADING=1` with the monotonic time
/// `Type=notify-reload` needs) or ended (`READY=1`).
fn notify_reload(starting: bool) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let r = if starting {
        sd_notify::NotifyState::monotonic_usec_now()
            .and_then(|now| sd_notify::notify(false, &[sd_notify::NotifyState::Reloading, now]))
    } else {
        sd_notify::notify(false, &[sd_notify::NotifyState::Ready])
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not tell systemd about the reload");
    }
}

/// `store.kind: sql`: delete expired sessions every
/// `store.sql.cleanup_interval`, in bounded batches.
struct SqlCleanup {
    shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for SqlCleanup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(Store::Sql(store)) = &self.shared.store else {
            return;
        };
        let m = &self.shared.metrics;
        // The first pass one interval after the start, not at it: gateways
        // restarted together do not all sweep at once.
        let every = store.cleanup_interval();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => match store.cleanup().await {
                    Ok(n) => {
                        m.store_cleanups.with_label_values(&["ok"]).inc();
                        m.store_cleanup_deleted.inc_by(n);
                        if n > 0 {
                            tracing::debug!(deleted = n, "sql store: expired sessions deleted");
                        }
                    }
                    Err(e) => {
                        m.store_cleanups.with_label_values(&["error"]).inc();
                        tracing::warn!(error = %e, "sql store: cleanup failed; trying again at the next interval");
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Every route's upstreams: a watcher per pool, started when the pool first
/// shows up (at start, after each reload), that probes it every
/// `health_check.interval` and keeps `gimlet_upstream_health` current. A
/// watcher ends when its config is gone (a reload replaced it and the last
/// request that started under it has finished).
struct UpstreamHealth {
    shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for UpstreamHealth {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let state = self.shared.state.load_full();
                    for (i, r) in state.router.routes().iter().enumerate() {
                        if r.pool.claim_watch() {
                            tokio::spawn(watch_pool(Arc::downgrade(&state), i, self.shared.clone(), shutdown.clone()));
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

async fn watch_pool(
    state: std::sync::Weak<crate::exchange::State>,
    route: usize,
    shared: Arc<Shared>,
    mut shutdown: ShutdownWatch,
) {
    let m = &shared.metrics;
    let labels: Vec<(String, String)> = match state.upgrade() {
        Some(st) => {
            let r = &st.router.routes()[route];
            r.pool
                .members
                .iter()
                .map(|u| (r.cfg.name.clone(), u.name.clone()))
                .collect()
        }
        None => return,
    };
    loop {
        // A config no longer served stops probing (requests still draining
        // on it rely on passive ejection), and a reload that dropped this
        // upstream (or its route) drops its series.
        let current = shared.state.load();
        let st = match state.upgrade() {
            Some(st) if std::ptr::eq(current.as_ref(), st.as_ref()) => st,
            _ => {
                for (route, upstream) in &labels {
                    let kept = current
                        .router
                        .get(route)
                        .is_some_and(|r| r.pool.members.iter().any(|u| &u.name == upstream));
                    if !kept {
                        let _ = m.upstream_health.remove_label_values(&[route, upstream]);
                        for status in (1..=600).map(crate::metrics::status_label).chain(["error"]) {
                            let _ = m
                                .upstream_requests
                                .remove_label_values(&[route, upstream, status]);
                        }
                    }
                }
                return;
            }
        };
        drop(current);
        let r = &st.router.routes()[route];
        let pool = &r.pool;
        if pool.health.probe.is_some() {
            tokio::select! {
                _ = pool.probe() => {}
                _ = shutdown.changed() => return,
            }
        }
        let now = crate::model::now_ms();
        let current = shared.state.load();
        for (i, member) in pool.members.iter().enumerate() {
            // Only the config being served reports; an older one still
            // draining requests must not overwrite its gauges.
            if !std::ptr::eq(current.as_ref(), st.as_ref()) {
                break;
            }
            let up = pool.serving(i, now);
            member
                .metrics
                .get_or_init(|| crate::metrics::UpstreamMetrics::new(m, &r.cfg.name, &member.name))
                .health
                .set(up as i64);
            if member
                .reported
                .swap(up, std::sync::atomic::Ordering::Relaxed)
                != up
            {
                if up {
                    tracing::info!(route = %r.cfg.name, upstream = %member.name, "upstream back in service");
                } else {
                    tracing::warn!(route = %r.cfg.name, upstream = %member.name, ejected = pool.is_ejected(i, now), "upstream out of service");
                }
            }
        }
        drop(current);
        let every = if pool.health.probe.is_some() {
            pool.health.interval
        } else {
            // No probe: only passive ejection changes the gauge.
            std::time::Duration::from_secs(1)
        };
        drop(st);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Reload on SIGHUP; sweep the memory store now and then.
struct Reloader {
    shared: Arc<Shared>,
    file: PathBuf,
    /// `server.header_timeout`, `keepalive_timeout`, `max_connections`.
    limits: Arc<Limits>,
}

impl Reloader {
    fn reload(&self) {
        notify_reload(true);
        self.apply_reload();
        notify_reload(false);
    }

    fn apply_reload(&self) {
        let m = &self.shared.metrics;
        let result = Config::load(&self.file)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                let old = self.shared.state.load();
                if c.store != old.config.store {
                    tracing::warn!(
                        "reload: store settings changed; they take effect after a restart"
                    );
                }
                if c.listen != old.config.listen || c.admin != old.config.admin {
                    tracing::warn!("reload: listener changes take effect after a restart");
                }
                // The exporter runs for the process: a reload can change the
                // sample ratio or turn traces off, not start or move them.
                match (&c.tracing, self.shared.tracer.as_ref().map(|t| &t.config)) {
                    (Some(_), None) => tracing::warn!(
                        "reload: tracing.otlp was off at start; traces start after a restart"
                    ),
                    (Some(new), Some(started))
                        if new.endpoint != started.endpoint || new.headers != started.headers =>
                    {
                        tracing::warn!("reload: tracing.otlp endpoint or headers changed; they take effect after a restart")
                    }
                    _ => {}
                }
                State::new(c)
            });
        match result {
            Ok(state) => {
                let routes = state.router.routes().len();
                let secrets = state.config.session.secrets.len();
                let names: Vec<&str> = state
                    .config
                    .routes
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect();
                m.loaded(&names);
                self.limits.set(&state.config.server);
                crate::downstream::raise_fd_limit(state.config.server.max_connections);
                self.shared.state.store(Arc::new(state));
                m.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(routes, secrets, "config reloaded");
            }
            Err(e) => {
                m.config_reloads.with_label_values(&["error"]).inc();
                m.reload_ok.set(0);
                tracing::error!(error = %e, "config reload failed; keeping the running config");
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload disabled");
                return;
            }
        };
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = hup.recv() => self.reload(),
                _ = tick.tick() => {
                    if let Some(Store::Memory(m)) = &self.shared.store {
                        m.sweep(crate::model::now_ms());
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
