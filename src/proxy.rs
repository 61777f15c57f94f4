//! The pingora hooks. Each one is thin: it moves header bytes between pingora
//! and the session core, talks to the store, and counts.
//!
//! ```text
//! request_filter           route, scheme, cookies -> Session, store read,
//!                          require: gate, X-Session budget (local answers here)
//! upstream_peer            round robin
//! upstream_request_filter  strip spoofable headers and our cookies, add ours
//! upstream_response_filter parse and remove X-Session-*, drop our Set-Cookies
//! response_filter          apply directives: one store write, then Set-Cookie
//! fail_to_proxy            our 502 / 503 answers for failures after the upstream
//! logging                  metrics and the access line
//! ```

use crate::codec::Codec;
use crate::config::{Config, OnDirectiveError, OnError, OnMissing};
use crate::directives::{self, Directives};
use crate::headers;
use crate::metrics::Metrics;
use crate::model::{DirectiveError, DirectiveErrorKind};
use crate::routes::{Route, Router};
use crate::session::{Forward, RequestInfo, Session, WriteContext};
use crate::store::{Store, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use ipnet::IpNet;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything a request needs that a reload may replace.
pub struct State {
    pub config: Config,
    pub codec: Codec,
    pub router: Router,
}

impl State {
    pub fn new(config: Config) -> Result<State, String> {
        let router = Router::new(&config.routes)?;
        let codec = Codec::new(&config.session.secrets, config.session.encrypt);
        Ok(State {
            config,
            codec,
            router,
        })
    }
}

/// Shared by the proxy, the admin app and the reloader.
pub struct Shared {
    pub state: arc_swap::ArcSwap<State>,
    /// `None` when `store.kind: none`. A reload keeps the store.
    pub store: Option<Store>,
    pub metrics: Metrics,
    /// Requests in flight (a graceful shutdown exits when this reaches 0).
    pub inflight: std::sync::atomic::AtomicUsize,
}

/// Counts a request in flight for as long as its context lives.
pub struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> InFlight {
        shared
            .inflight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .inflight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

pub struct Gateway {
    pub shared: Arc<Shared>,
}

/// A response the gateway writes itself after the upstream answered.
struct LocalAnswer {
    status: u16,
    body: String,
    retry_after: bool,
}

pub struct Ctx {
    state: Arc<State>,
    route: Option<usize>,
    https: bool,
    /// The client is in `trusted_proxies`.
    trusted: bool,
    /// The upstream picked (for our own error lines).
    peer: Option<std::net::SocketAddr>,
    now: u64,
    start: Instant,
    session: Session,
    forward: Forward,
    directives: Option<Result<Directives, DirectiveError>>,
    upstream_start: Option<Instant>,
    upstream_time: Option<Duration>,
    store_round_trips: u32,
    applied: u32,
    answer: Option<LocalAnswer>,
    _inflight: InFlight,
}

impl Ctx {
    fn route(&self) -> Option<&Route> {
        self.route.map(|i| &self.state.router.routes()[i])
    }

    fn route_name(&self) -> &str {
        self.route().map_or("(none)", |r| r.cfg.name.as_str())
    }
}

fn is_tls(session: &Session_) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

type Session_ = pingora::proxy::Session;

fn client_ip(session: &Session_) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

fn trusted(proxies: &[IpNet], ip: Option<std::net::IpAddr>) -> bool {
    ip.is_some_and(|ip| proxies.iter().any(|n| n.contains(&ip)))
}

/// Write a short plain-text answer ourselves.
async fn respond(
    session: &mut Session_,
    status: u16,
    body: &str,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4 + extra.len()))?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    for (k, v) in extra {
        resp.append_header(*k, v.as_str())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(Bytes::copy_from_slice(body.as_bytes())), true)
            .await?;
    }
    Ok(())
}

impl Gateway {
    fn write_context<'a>(&self, ctx: &'a Ctx, route: &'a Route) -> WriteContext<'a> {
        let c = &ctx.state.config.session;
        WriteContext {
            settings: &c.settings,
            codec: &ctx.state.codec,
            spec: &c.cookie,
            encrypt: c.encrypt,
            write: &route.cfg.write,
            https: ctx.https,
            now: ctx.now,
        }
    }

    fn count_directive_error(&self, ctx: &Ctx, e: &DirectiveError) {
        self.shared
            .metrics
            .directive_errors
            .with_label_values(&[e.label()])
            .inc();
        tracing::warn!(route = ctx.route_name(), reason = e.label(), detail = %e.detail, "directive error: nothing applied");
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        f: impl std::future::Future<Output = std::result::Result<T, StoreError>>,
    ) -> std::result::Result<T, StoreError> {
        let t = Instant::now();
        let r = match tokio::time::timeout(timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout),
        };
        let m = &self.shared.metrics;
        m.store_duration
            .with_label_values(&[op])
            .observe(t.elapsed().as_secs_f64());
        let result = match &r {
            Ok(_) | Err(StoreError::Rejected(_)) => "ok",
            Err(e) => e.result_label(),
        };
        m.store_ops.with_label_values(&[op, result]).inc();
        r
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            state: self.shared.state.load_full(),
            route: None,
            https: false,
            trusted: false,
            peer: None,
            now: 0,
            start: Instant::now(),
            session: Session::default(),
            forward: Forward::default(),
            directives: None,
            upstream_start: None,
            upstream_time: None,
            store_round_trips: 0,
            applied: 0,
            answer: None,
            _inflight: InFlight::new(&self.shared),
        }
    }

    async fn request_filter(&self, session: &mut Session_, ctx: &mut Ctx) -> Result<bool> {
        ctx.now = crate::model::now_ms();
        let state = ctx.state.clone();
        // One path for the gateway and the app: normalized before routing,
        // and the normalized path is what the upstream receives.
        // The raw target is judged, not the parsed URI: pingora leaves the
        // URI at `/` for targets it cannot classify and keeps their bytes
        // for the wire.
        let keep = state.config.paths.keep_escaped_separators;
        let target = match judge_target(session.req_header().raw_path(), keep) {
            Ok(t) => t,
            Err(e) => {
                tracing::info!(reason = e.label(), "request target refused");
                let body = format!("bad request path ({})\n", e.label());
                respond(session, 400, &body, &[]).await?;
                return Ok(true);
            }
        };
        if let Some(t) = &target.rewrite {
            session
                .req_header_mut()
                .set_raw_path(t)
                .map_err(|_| Error::explain(InternalError, "normalized target refused"))?;
        }
        if let Some(a) = target.authority {
            // An absolute-form target names the host (pingora has checked
            // that a Host header, if any, agrees): route on it, and keep it
            // as the Host the upstream receives.
            if !session
                .req_header()
                .headers
                .contains_key(http::header::HOST)
            {
                session
                    .req_header_mut()
                    .insert_header(http::header::HOST, a)?;
            }
        }
        let req = session.req_header();
        let host = req.uri.host().or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        let route_path = crate::path::route_path(req.uri.path());
        let Some(idx) = state.router.find(host, &route_path) else {
            respond(session, 404, "no route for this host and path\n", &[]).await?;
            return Ok(true);
        };
        ctx.route = Some(idx);
        let route = &state.router.routes()[idx];
        let cfg = &state.config;
        let settings = &cfg.session.settings;

        let forwarded_https = req
            .headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
        ctx.trusted = trusted(&cfg.trusted_proxies, client_ip(session));
        ctx.https = is_tls(session) || settings.dev_insecure || (forwarded_https && ctx.trusted);

        let req = session.req_header();
        ctx.session = Session::from_cookies(
            &state.codec,
            &cfg.session.cookie,
            settings,
            req.headers
                .get_all(http::header::COOKIE)
                .iter()
                .map(|v| v.as_bytes()),
            RequestInfo {
                https: ctx.https,
                now: ctx.now,
            },
        );
        let m = &self.shared.metrics;
        for r in &ctx.session.rejections {
            m.cookies_rejected.with_label_values(&[r.label()]).inc();
        }
        if ctx.session.expired {
            m.sessions.with_label_values(&["expired"]).inc();
        }

        let plan = ctx
            .session
            .load_plan(settings, &route.cfg.read, &route.cfg.require);
        if let (false, Some(store), Some(meta)) =
            (plan.is_empty(), &self.shared.store, ctx.session.meta)
        {
            ctx.store_round_trips += 1;
            let key = crate::store::StoreKey {
                id: meta.id,
                tag: meta.tag,
            };
            match self
                .timed("read", cfg.store.timeout, store.load(&key, plan.0))
                .await
            {
                Ok(loaded) => ctx.session.stored = loaded,
                Err(e) => {
                    tracing::warn!(route = %route.cfg.name, error = %e, "session store read failed");
                    if cfg.store.on_error == OnError::Fail {
                        respond(
                            session,
                            503,
                            "session store unavailable, try again\n",
                            &[("retry-after", "1".to_string())],
                        )
                        .await?;
                        return Ok(true);
                    }
                    ctx.session.degraded = true;
                }
            }
        }

        if !route.cfg.require.is_empty()
            && !ctx.session.has_all(settings, &route.cfg.require, ctx.https)
        {
            // Rejected cookies are cleared even on a gate answer.
            let spec = &cfg.session.cookie;
            let mut extra: Vec<(&'static str, String)> = crate::model::CHANNELS
                .into_iter()
                .filter(|ch| ctx.session.clear[ch.index()])
                .map(|ch| ("set-cookie", spec.clear_line(ch, ctx.https)))
                .collect();
            match &route.cfg.on_missing {
                OnMissing::Redirect(target) => {
                    let pq = session
                        .req_header()
                        .uri
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_string();
                    let enc = percent_encoding::utf8_percent_encode(
                        &pq,
                        percent_encoding::NON_ALPHANUMERIC,
                    )
                    .to_string();
                    extra.push(("location", target.replace("{path}", &enc)));
                    respond(session, 302, "login required\n", &extra).await?;
                }
                OnMissing::Status(code) => {
                    respond(session, *code, "session required\n", &extra).await?;
                }
            }
            return Ok(true);
        }

        match ctx
            .session
            .forward(settings, &route.cfg.read, &route.cfg.headers, ctx.https)
        {
            Ok(f) => ctx.forward = f,
            Err(size) => {
                m.forward_too_large
                    .with_label_values(&[route.cfg.name.as_str()])
                    .inc();
                tracing::error!(
                    route = %route.cfg.name,
                    bytes = size,
                    limit = settings.limits.forward_bytes,
                    "readable session data exceeds session.limits.forward_bytes"
                );
                let body = format!(
                    "the session data this route reads is {size} bytes, more than session.limits.forward_bytes ({}); narrow the route's read: list\n",
                    settings.limits.forward_bytes
                );
                respond(session, 500, &body, &[]).await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session_, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let route = ctx
            .route()
            .ok_or_else(|| Error::explain(InternalError, "no route"))?;
        let addr = route.pick();
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(route.cfg.connect_timeout);
        peer.options.read_timeout = Some(route.cfg.read_timeout);
        ctx.peer = Some(addr);
        ctx.upstream_start = Some(Instant::now());
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session_,
        up: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let state = ctx.state.clone();
        let route = ctx
            .route()
            .ok_or_else(|| Error::explain(InternalError, "no route"))?;
        let _ = route;
        // The client's X-Forwarded-For (exact name) is kept and extended;
        // read it before every spelling of it is stripped below.
        let prior_xff: Vec<String> = up
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        // Spoofable headers, every spelling an app may read as ours (see
        // `headers`): our namespace, every route's mapped names, the
        // forwarding headers we write, and, from clients that are not
        // trusted proxies, the ones frameworks derive scheme and host from.
        let mapped = &state.router.mapped_names;
        let trusted = ctx.trusted;
        let strip: Vec<http::HeaderName> = up
            .headers
            .keys()
            .filter(|name| spoofable(name.as_str().as_bytes(), mapped, trusted))
            .cloned()
            .collect();
        for name in &strip {
            up.remove_header(name);
        }

        let spec = &state.config.session.cookie;
        let merged = crate::cookie::strip_ours(
            spec,
            up.headers
                .get_all(http::header::COOKIE)
                .iter()
                .map(|v| v.as_bytes()),
        );
        up.remove_header(&http::header::COOKIE);
        if let Some(c) = merged {
            up.insert_header(http::header::COOKIE, c)?;
        }

        up.insert_header(
            "x-forwarded-proto",
            if ctx.https { "https" } else { "http" },
        )?;
        if let Some(ip) = client_ip(session) {
            let value = if prior_xff.is_empty() {
                ip.to_string()
            } else {
                format!("{}, {ip}", prior_xff.join(", "))
            };
            up.insert_header("x-forwarded-for", value)?;
        } else if !prior_xff.is_empty() {
            up.insert_header("x-forwarded-for", prior_xff.join(", "))?;
        }

        if let Some(m) = ctx.session.meta {
            up.insert_header("x-session-id", m.id.hex())?;
            up.insert_header("x-session-created", (m.created / 1000).to_string())?;
            up.insert_header("x-session-expires", (m.expires / 1000).to_string())?;
        }
        if ctx.https {
            up.insert_header("x-session-secure", "1")?;
        }
        if ctx.session.degraded {
            up.insert_header("x-session-degraded", "1")?;
        }
        if let Some(x) = ctx.forward.x_session.take() {
            up.insert_header("x-session", x)?;
        }
        for (name, value) in std::mem::take(&mut ctx.forward.mapped) {
            up.insert_header(name, value)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session_,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let interim = is_interim(resp);
        if !interim {
            if let Some(t) = ctx.upstream_start {
                ctx.upstream_time = Some(t.elapsed());
            }
        }
        let state = ctx.state.clone();
        let settings = &state.config.session.settings;
        let mut names: Vec<http::HeaderName> = Vec::new();
        let mut lines: Vec<(String, Vec<u8>)> = Vec::new();
        for (name, value) in resp.headers.iter() {
            if headers::in_session_namespace(name.as_str().as_bytes()) {
                if !names.contains(name) {
                    names.push(name.clone());
                }
                lines.push((name.as_str().to_string(), value.as_bytes().to_vec()));
            }
        }
        for n in &names {
            resp.remove_header(n);
        }
        // Only the final response's directives count: a `103 Early Hints`
        // never reaches the session (browsers ignore its Set-Cookie).
        if !interim {
            ctx.directives = Some(directives::parse(
                lines.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
                settings.limits.keys,
            ));
        }

        // The upstream cannot set our cookies.
        let spec = &state.config.session.cookie;
        let cookies: Vec<http::HeaderValue> = resp
            .headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .cloned()
            .collect();
        let ours =
            |v: &http::HeaderValue| spec.is_ours(crate::cookie::set_cookie_name(v.as_bytes()));
        if cookies.iter().any(ours) {
            resp.remove_header(&http::header::SET_COOKIE);
            for v in cookies {
                if ours(&v) {
                    self.shared.metrics.upstream_cookies_dropped.inc();
                    tracing::warn!(
                        route = ctx.route_name(),
                        "upstream Set-Cookie with a gateway cookie name dropped"
                    );
                } else {
                    resp.append_header(http::header::SET_COOKIE, v)?;
                }
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session_,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if is_interim(resp) {
            return Ok(());
        }
        let state = ctx.state.clone();
        let Some(idx) = ctx.route else { return Ok(()) };
        let route = &state.router.routes()[idx];
        let parsed = ctx
            .directives
            .take()
            .unwrap_or_else(|| Ok(Directives::default()));
        let mut outcome =
            parsed.and_then(|d| ctx.session.apply(&d, &self.write_context(ctx, route)));

        if let Ok(o) = &outcome {
            if let (Some(batch), Some(store)) = (&o.batch, &self.shared.store) {
                ctx.store_round_trips += 1;
                match self
                    .timed("write", state.config.store.timeout, store.write(batch))
                    .await
                {
                    Ok(()) => {}
                    Err(StoreError::Rejected(e)) => outcome = Err(e),
                    Err(e) if state.config.store.on_error == OnError::Fail => {
                        tracing::error!(
                            route = %route.cfg.name,
                            session = %batch.key.id,
                            error = %e,
                            "session store write failed after the upstream answered; answering 503, nothing applied"
                        );
                        ctx.answer = Some(LocalAnswer {
                            status: 503,
                            body: "session store unavailable, try again\n".into(),
                            retry_after: true,
                        });
                        return Error::e_explain(HTTPStatus(503), "session store write failed");
                    }
                    Err(e) => {
                        outcome = Err(DirectiveError::new(
                            DirectiveErrorKind::StoreUnavailable,
                            format!("the session store is unavailable ({e})"),
                        ))
                    }
                }
            }
        }

        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                self.count_directive_error(ctx, &e);
                if route.cfg.on_directive_error == OnDirectiveError::Reject {
                    ctx.answer = Some(LocalAnswer {
                        status: 502,
                        // The reason label only: the detail names keys, and
                        // the client must learn nothing of the session.
                        body: format!(
                            "gimlet: the upstream's session directives were rejected ({})\n",
                            e.label()
                        ),
                        retry_after: false,
                    });
                    return Error::e_explain(HTTPStatus(502), "session directive rejected");
                }
                return Ok(());
            }
        };

        let m = &self.shared.metrics;
        for (i, n) in outcome.applied.iter().enumerate() {
            if *n > 0 {
                m.directives
                    .with_label_values(&[crate::model::DIRECTIVE_LABELS[i]])
                    .inc_by(*n as u64);
            }
        }
        ctx.applied = outcome.directives_applied();
        for (event, happened) in [
            ("created", outcome.created),
            ("regenerated", outcome.regenerated),
            ("destroyed", outcome.destroyed),
        ] {
            if happened {
                m.sessions.with_label_values(&[event]).inc();
            }
        }
        if outcome.set_cookies.is_empty() {
            return Ok(());
        }
        for line in outcome.set_cookies {
            m.set_cookie_bytes.observe(line.len() as f64);
            resp.append_header(http::header::SET_COOKIE, line)?;
        }
        // Never cache a response that carries someone's session cookie.
        let cc = resp
            .headers
            .get(http::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);
        if !cc.as_deref().is_some_and(|c| c.contains("no-store")) {
            let kept: Vec<&str> = cc
                .as_deref()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|d| {
                    !d.is_empty() && *d != "public" && *d != "private" && !d.starts_with("s-maxage")
                })
                .collect();
            let value = if kept.is_empty() {
                "private".to_string()
            } else {
                format!("private, {}", kept.join(", "))
            };
            resp.insert_header(http::header::CACHE_CONTROL, value)?;
        }
        let vary: Vec<String> = resp
            .headers
            .get_all(http::header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        let has = vary
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("cookie") || t.trim() == "*");
        if !has {
            resp.append_header(http::header::VARY, "Cookie")?;
        }
        Ok(())
    }

    /// pingora's error lines carry this; keep the query string (tokens,
    /// session-ish parameters) out of logs.
    fn request_summary(&self, session: &Session_, ctx: &Ctx) -> String {
        let req = session.req_header();
        format!(
            "{} {} (route {})",
            req.method,
            req.uri.path(),
            ctx.route_name()
        )
    }

    /// pingora's own error line prints the error's context, which can
    /// quote raw header buffers (`buf: ... X-Session-Set: user=alice ...`):
    /// it never runs; `fail_to_proxy` logs a sanitized line instead.
    fn suppress_error_log(&self, _session: &Session_, _ctx: &Ctx, _error: &Error) -> bool {
        true
    }

    /// No downstream modules: the default adds a (disabled) compression
    /// module that would still run on every request.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session_,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if ctx.answer.is_some()
            || !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
        {
            // Our own answers are final: never replay the request upstream.
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session_, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        // pingora drops the client connection after a failure past this
        // point; say so, so a client does not reuse it.
        session.set_keepalive(None);
        if let Some(a) = &ctx.answer {
            let extra: Vec<(&'static str, String)> = if a.retry_after {
                vec![("retry-after", "1".to_string())]
            } else {
                vec![]
            };
            if let Err(err) = respond(session, a.status, &a.body, &extra).await {
                tracing::debug!(error = %err, "could not write the error answer");
            }
            return FailToProxy {
                error_code: a.status,
                can_reuse_downstream: false,
            };
        }
        let code = match e.etype() {
            HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    WriteError | ReadError | ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        // The error type and where it came from, never its context text.
        tracing::error!(
            route = ctx.route_name(),
            peer = ?ctx.peer,
            status = code,
            error = e.etype().as_str(),
            source = e.esource().as_str(),
            "failed to proxy"
        );
        if code > 0 {
            let body = match code {
                502 => "upstream unavailable\n",
                504 => "upstream timed out\n",
                400 => "bad request\n",
                _ => "gateway error\n",
            };
            if let Err(err) = respond(session, code, body, &[]).await {
                tracing::debug!(error = %err, "could not write the error answer");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session_, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route = ctx.route_name().to_string();
        let m = &self.shared.metrics;
        let elapsed = ctx.start.elapsed();
        m.requests
            .with_label_values(&[route.as_str(), status_label(status)])
            .inc();
        m.request_duration
            .with_label_values(&[route.as_str()])
            .observe(elapsed.as_secs_f64());
        if let Some(t) = ctx.upstream_time {
            m.upstream_duration
                .with_label_values(&[route.as_str()])
                .observe(t.as_secs_f64());
        }
        let req = session.req_header();
        tracing::info!(
            target: "gimlet::access",
            method = %req.method,
            path = %req.uri.path(),
            route = %route,
            status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            session = ctx.session.meta.is_some(),
            store_round_trips = ctx.store_round_trips,
            directives = ctx.applied,
            error = e.map(|e| e.etype().as_str()),
        );
    }
}

/// A 1xx response other than `101 Switching Protocols`.
fn is_interim(resp: &ResponseHeader) -> bool {
    resp.status.is_informational() && resp.status != http::StatusCode::SWITCHING_PROTOCOLS
}

/// Must this client request header go before the request is forwarded?
fn spoofable(name: &[u8], mapped: &[String], trusted: bool) -> bool {
    headers::in_session_namespace(name)
        || headers::OURS.iter().any(|o| headers::same_name(name, o))
        || mapped.iter().any(|m| headers::same_name(name, m))
        || headers::is_path_override(name)
        || (!trusted && headers::is_forwarding(name))
}

/// What the gateway makes of a request target (SPEC section 3, Path).
struct Target {
    /// A new origin-form target (normalized path, query unchanged) to send
    /// instead of the one received; `None` when that was already it.
    rewrite: Option<Vec<u8>>,
    /// The host of an absolute-form target (`GET http://host/path`).
    authority: Option<Vec<u8>>,
}

/// Judge a raw request target: origin-form (`/path?query`) or an http(s)
/// absolute-form target; anything else (`*`, `account/x`, an ambiguous
/// authority) is refused, since the upstream might read it as a path the
/// gateway never routed.
fn judge_target(raw: &[u8], keep: bool) -> std::result::Result<Target, crate::path::PathError> {
    use pingora::http::authority::{
        is_http_family_scheme, raw_target_authority, RawTargetAuthority,
    };
    let (authority, pq) = if raw.first() == Some(&b'/') {
        (None, raw)
    } else {
        match raw_target_authority(raw) {
            RawTargetAuthority::Absolute {
                scheme,
                authority,
                path_and_query,
            } if is_http_family_scheme(scheme) && !authority.is_empty() => {
                (Some(authority), path_and_query)
            }
            _ => return Err(crate::path::PathError::NotAbsolute),
        }
    };
    // A fragment is never part of the target.
    let pq = pq.split(|&b| b == b'#').next().unwrap_or(pq);
    let (path, query) = match pq.iter().position(|&b| b == b'?') {
        Some(i) => (&pq[..i], Some(&pq[i + 1..])),
        None => (pq, None),
    };
    let path: &[u8] = if path.is_empty() { b"/" } else { path };
    let normalized = crate::path::normalize(path, keep)?;
    let changed = matches!(normalized, std::borrow::Cow::Owned(_))
        || authority.is_some()
        || pq.len() != raw.len();
    let rewrite = changed.then(|| {
        let mut t = normalized.as_bytes().to_vec();
        if let Some(q) = query {
            t.push(b'?');
            t.extend_from_slice(q);
        }
        t
    });
    Ok(Target {
        rewrite,
        authority: authority.map(<[u8]>::to_vec),
    })
}

static STATUS_LABELS: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| (0..600).map(|c| c.to_string()).collect());

/// The status as a label without an allocation per request.
fn status_label(s: u16) -> &'static str {
    STATUS_LABELS
        .get(s as usize)
        .map_or("other", |s| s.as_str())
}
