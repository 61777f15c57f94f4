//! The pingora hooks. Each one reads what pingora hands in, calls one
//! pingora-free function ([`crate::exchange`], [`Session`]), and writes the
//! answer back; talking to the store and counting are the only other things
//! done here.
//!
//! ```text
//! request_filter           target -> open -> store read -> admit (local answers here)
//! upstream_peer            round robin
//! upstream_request_filter  strip spoofable headers and our cookies, add ours
//! upstream_response_filter remove X-Session-*, keep the directives, drop our Set-Cookies
//! response_filter          apply -> one store write -> settle -> Set-Cookie
//! fail_to_proxy            our 502 / 503 answers for failures after the upstream
//! logging                  metrics and the access line
//! ```

use crate::directives::Directives;
use crate::exchange::{self, Commit, Incoming, Opened, Refused, State};
use crate::metrics::{status_label, Metrics, RouteMetrics, UpstreamMetrics};
use crate::model::{DirectiveError, LocalAnswer, OnDirectiveError, Selection};
use crate::model::{Step, Steps};
use crate::routes::Route;
use crate::session::{Forward, Outcome, Session, WriteContext};
use crate::store::{Read, Refusal, Store, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shared by the proxy, the admin app and the reloader.
pub struct Shared {
    pub state: arc_swap::ArcSwap<State>,
    /// `None` when `store.kind: none`. A reload keeps the store.
    pub store: Option<Store>,
    pub metrics: Metrics,
    /// `tracing.otlp`, started with the process.
    pub tracer: Option<crate::telemetry::Tracer>,
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

/// A store round trip in flight (see [`Gateway::measured`]).
type StoreCall<'a, T> = std::pin::Pin<
    Box<dyn std::future::Future<Output = std::result::Result<T, StoreError>> + Send + 'a>,
>;

pub struct Ctx {
    /// The config this request started with (a reload does not change it).
    state: Arc<State>,
    route: Option<usize>,
    https: bool,
    /// The client is in `trusted_proxies`.
    trusted: bool,
    /// The upstream picked (for our own error lines).
    peer: Option<std::net::SocketAddr>,
    /// Its index in the route's pool, while this request uses it.
    member: Option<usize>,
    /// The upstreams this request failed to connect to.
    tried: crate::pool::Tried,
    /// `least_conn`: counts this request against its upstream.
    busy: Option<crate::pool::Busy>,
    /// The upstream's status (its final response's).
    upstream_status: u16,
    /// `sticky`, no session yet: the tag a new session gets, chosen with
    /// the upstream.
    new_tag: Option<u32>,
    now: u64,
    start: Instant,
    session: Session,
    /// The client's address (behind a trusted proxy, the one it appended).
    client_ip: Option<std::net::IpAddr>,
    /// `session.track`: what the user's index records (set only then).
    tracked_ip: Option<String>,
    tracked_ua: Option<String>,
    /// Sessions `session.max_per_user` pushed out by this response's login.
    evicted: Vec<crate::store::UserSession>,
    forward: Forward,
    directives: Option<std::result::Result<Directives, DirectiveError>>,
    upstream_start: Option<Instant>,
    /// When the store and the upstream were busy (metrics, Server-Timing,
    /// trace spans).
    steps: Steps,
    /// The W3C trace context (only with `tracing.otlp`).
    trace: Option<crate::telemetry::Trace>,
    store_round_trips: u32,
    applied: u32,
    /// Our own answer, written by `fail_to_proxy`.
    answer: Option<LocalAnswer>,
    /// Why the response's directives were rejected (for the access line).
    rejected: Option<&'static str>,
    _inflight: InFlight,
}

impl Ctx {
    fn route(&self) -> Option<&Route> {
        self.route.map(|i| &self.state.router.routes()[i])
    }

    fn route_name(&self) -> &str {
        self.route().map_or("(none)", |r| r.cfg.name.as_str())
    }

    fn write_context<'a>(&'a self, route: &'a Route) -> WriteContext<'a> {
        let c = &self.state.config.session;
        WriteContext {
            settings: &c.settings,
            codec: &self.state.codec,
            spec: &c.cookie,
            encrypt: c.encrypt,
            write: &route.cfg.write,
            https: self.https,
            now: self.now,
            ip: self.tracked_ip.as_deref(),
            user_agent: self.tracked_ua.as_deref(),
            tag: self.new_tag,
        }
    }
}

type Session_ = pingora::proxy::Session;

// Looked up on every request: a `HeaderName` finds its entry directly, a
// `&str` is parsed into one first.
static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");

fn client_ip(session: &Session_) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// What [`exchange::open`] needs from the request pingora read.
fn incoming(session: &Session_, now: u64) -> Incoming<'_, impl Iterator<Item = &[u8]>> {
    let req = session.req_header();
    Incoming {
        host: req.uri.host().or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        }),
        path: req.uri.path(),
        cookies: req
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .map(|v| v.as_bytes()),
        forwarded_https: req
            .headers
            .get(&X_FORWARDED_PROTO)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https")),
        tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
        client_ip: client_ip(session),
        forwarded_for: req
            .headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok()),
        now,
    }
}

/// Normalize the request target in place (see [`judge_target`]).
fn normalize_target(
    session: &mut Session_,
    keep: bool,
) -> std::result::Result<(), crate::path::PathError> {
    let target = judge_target(session.req_header().raw_path(), keep)?;
    let req = session.req_header_mut();
    if let Some(t) = &target.rewrite {
        // Only a target pingora itself would accept is ever built here.
        req.set_raw_path(t)
            .map_err(|_| crate::path::PathError::NotAbsolute)?;
    }
    if let Some(a) = target.authority {
        // An absolute-form target names the host (pingora has checked
        // that a Host header, if any, agrees): route on it, and keep it as
        // the Host the upstream receives.
        if !req.headers.contains_key(http::header::HOST) {
            req.insert_header(http::header::HOST, a)
                .map_err(|_| crate::path::PathError::NotAbsolute)?;
        }
    }
    Ok(())
}

/// Remove what the client may not send the upstream (see
/// [`exchange::spoofable`]) and our cookies; returns the client's own
/// `X-Forwarded-For` values, which are kept and extended.
fn strip_client_headers(up: &mut RequestHeader, ctx: &Ctx) -> Result<Vec<String>> {
    // The client's X-Forwarded-For (exact name) is kept and extended;
    // read it before every spelling of it is stripped.
    let prior_xff: Vec<String> = up
        .headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let mapped = &ctx.state.router.mapped_names;
    let strip: Vec<http::HeaderName> = up
        .headers
        .keys()
        .filter(|n| exchange::spoofable(n.as_str().as_bytes(), mapped, ctx.trusted))
        .cloned()
        .collect();
    for name in &strip {
        up.remove_header(name);
    }
    if !up.headers.contains_key(http::header::COOKIE) {
        return Ok(prior_xff);
    }
    let cookies = up
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .map(|v| v.as_bytes());
    let merged = crate::cookie::strip_ours(&ctx.state.config.session.cookie, cookies);
    up.remove_header(&http::header::COOKIE);
    if let Some(c) = merged {
        up.insert_header(http::header::COOKIE, c)?;
    }
    Ok(prior_xff)
}

/// Write one of our answers.
async fn respond(session: &mut Session_, a: &LocalAnswer) -> Result<()> {
    let mut resp = ResponseHeader::build(a.status, Some(4 + a.headers.len()))?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", a.body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    for (k, v) in &a.headers {
        resp.append_header(*k, v.as_str())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(Bytes::copy_from_slice(a.body.as_bytes())), true)
            .await?;
    }
    Ok(())
}

/// Answer locally from `request_filter` (the upstream is not called).
async fn answer(session: &mut Session_, a: &LocalAnswer) -> Result<bool> {
    respond(session, a).await?;
    Ok(true)
}

impl Gateway {
    /// Take the opened request into the context and count what its cookies
    /// said.
    fn opened(&self, ctx: &mut Ctx, o: Opened) {
        let m = &self.shared.metrics;
        for r in &o.session.rejections {
            m.cookies_rejected.with_label_values(&[r.label()]).inc();
        }
        if o.session.expired {
            m.sessions.with_label_values(&["expired"]).inc();
        }
        (
            ctx.route,
            ctx.https,
            ctx.trusted,
            ctx.session,
            ctx.client_ip,
        ) = (Some(o.route), o.https, o.trusted, o.session, o.client_ip);
    }

    /// The store read, if the request needs one; `Err` when it failed under
    /// `on_error: fail`.
    async fn load(&self, ctx: &mut Ctx, route: &Route) -> std::result::Result<(), StoreError> {
        let Some(store) = &self.shared.store else {
            return Ok(());
        };
        let state = ctx.state.clone();
        let cfg = &state.config;
        let settings = &cfg.session.settings;
        let Some(mut asked) =
            ctx.session
                .load_request(settings, &route.cfg.read, &route.cfg.require)
        else {
            return Ok(());
        };
        ctx.store_round_trips += 1;
        let t = Instant::now();
        let mut read = self
            .timed(
                "read",
                cfg.store.timeout,
                store.load(&asked.key, asked.mask, asked.check),
            )
            .await;
        ctx.steps.read = Some(Step::since(t));
        let followed = match &read {
            Ok(Read {
                moved: Some(moved), ..
            }) => exchange::follow(&state, &ctx.session, moved, ctx.https, ctx.now),
            _ => None,
        };
        if let Some(next) = followed {
            // A request that left before its login's answer: it goes on as
            // the new session (one hop; a second read, on this rare path only).
            self.continue_as(ctx, next);
            let Some(next) =
                ctx.session
                    .load_request(settings, &route.cfg.read, &route.cfg.require)
            else {
                return Ok(());
            };
            asked = next;
            asked.check.moved = false;
            ctx.store_round_trips += 1;
            read = self
                .timed(
                    "read",
                    cfg.store.timeout,
                    store.load(&asked.key, asked.mask, asked.check),
                )
                .await;
            ctx.steps.read = Some(Step::since(t));
        }
        if let Err(e) = &read {
            tracing::warn!(route = %route.cfg.name, error = %e, "session store read failed");
        }
        if asked.check.ended {
            let result = match &read {
                Ok(r) if r.ended => "ended",
                Ok(_) => "live",
                Err(_) => "error",
            };
            self.shared
                .metrics
                .revocation_checks
                .with_label_values(&[result])
                .inc();
        }
        ctx.session.absorb(read, &asked, cfg.store.on_error)
    }

    /// `gimlet_upstream_requests_total`; `status` 0: no response.
    fn count_upstream(&self, route: &Route, i: usize, status: u16) {
        let m = &self.shared.metrics;
        let member = &route.pool.members[i];
        member
            .metrics
            .get_or_init(|| UpstreamMetrics::new(m, &route.cfg.name, &member.name))
            .requests(m, &route.cfg.name, &member.name, status)
            .inc();
    }

    fn count_refusal(&self, route: &Route, r: &Refused, limit: usize) {
        if let Some(size) = r.too_large {
            self.shared
                .metrics
                .forward_too_large
                .with_label_values(&[route.cfg.name.as_str()])
                .inc();
            tracing::error!(
                route = %route.cfg.name,
                bytes = size,
                limit,
                "readable session data exceeds session.limits.forward_bytes"
            );
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

    /// The one store write of a response, if its outcome has a batch.
    async fn write(
        &self,
        ctx: &mut Ctx,
        outcome: &std::result::Result<Outcome, DirectiveError>,
    ) -> Option<std::result::Result<(), StoreError>> {
        let (Ok(o), Some(store)) = (outcome, &self.shared.store) else {
            return None;
        };
        let timeout = ctx.state.config.store.timeout;
        let settings = &ctx.state.config.session.settings;
        let Some(b) = &o.batch else {
            // Cookies for the carried session without a store write (its
            // keys live in the cookie): with revocation (SPEC section 6's one
            // exception to "no store I/O for clientside keys"), first ask
            // whether it ended or moved meanwhile, so a request that raced a
            // logout or a login cannot set the old cookie over the new one.
            let check = crate::store::Check {
                ended: settings.revocation,
                moved: settings.revocation && settings.regenerate_grace > 0,
            };
            let carried = ctx
                .session
                .meta
                .filter(|_| o.sets_a_cookie() && o.meta.is_some());
            let key = carried.filter(|_| check.ended)?;
            ctx.store_round_trips += 1;
            let read = self
                .timed(
                    "read",
                    timeout,
                    store.load(&key.into(), crate::model::ChannelSet::NONE, check),
                )
                .await;
            return Some(match read {
                Ok(Read { moved: Some(m), .. }) => Err(StoreError::Rejected(Refusal::Moved(m))),
                Ok(Read { ended: true, .. }) => Err(StoreError::Rejected(Refusal::Ended)),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            });
        };
        ctx.store_round_trips += 1;
        let written = self.measured("write", store.write_within(b, timeout)).await;
        Some(written.map(|w| {
            ctx.evicted = w.evicted;
        }))
    }

    /// The request goes on as the session a regenerate grace handed it.
    fn continue_as(&self, ctx: &mut Ctx, next: Session) {
        ctx.session = next;
        self.shared
            .metrics
            .sessions
            .with_label_values(&["followed"])
            .inc();
    }

    /// A session that went idle on a request answered without applying its
    /// response (a gate, a rejected directive): still remember its id as
    /// ended, or a busy copy of the cookie would outlive it.
    async fn end_idle(&self, ctx: &mut Ctx) {
        let (Some(m), Some(store)) = (ctx.session.idle_ended.take(), &self.shared.store) else {
            return;
        };
        let timeout = ctx.state.config.store.timeout;
        let key = crate::store::StoreKey::from(m);
        let until = crate::store::ended_until(m.expires);
        ctx.store_round_trips += 1;
        if let Err(e) = self
            .timed("write", timeout, store.end(&[(key, until)], None))
            .await
        {
            tracing::warn!(route = ctx.route_name(), error = %e, "remembering an idle session as ended failed");
        }
    }

    /// After a committed write: end the sessions a login pushed past
    /// `session.max_per_user`, and on `X-Session-Destroy: user` every other
    /// session of the user (their own round trips, on these paths only).
    async fn end_others(&self, ctx: &mut Ctx, o: &Outcome) -> std::result::Result<(), StoreError> {
        let Some(store) = &self.shared.store else {
            return Ok(());
        };
        let timeout = ctx.state.config.store.timeout;
        let m = &self.shared.metrics;
        let evicted: Vec<_> = std::mem::take(&mut ctx.evicted)
            .iter()
            .filter_map(|e| e.key().map(|k| (k, crate::store::ended_until(e.expires))))
            .collect();
        if !evicted.is_empty() {
            // The login's user: its index still lists the evicted sessions
            // until they are ended here.
            let user = o.batch.as_ref().and_then(|b| {
                b.users.iter().find_map(|u| match u {
                    crate::store::UserWrite::Join {
                        user, max: Some(_), ..
                    } => Some(user.as_str()),
                    _ => None,
                })
            });
            ctx.store_round_trips += 1;
            self.timed("write", timeout, store.end(&evicted, user))
                .await?;
            m.sessions
                .with_label_values(&["evicted"])
                .inc_by(evicted.len() as u64);
        }
        if let Some(user) = &o.end_user {
            ctx.store_round_trips += 2;
            let all = self
                .timed("read", timeout, store.user_sessions(user))
                .await?;
            // Not the session this response keeps (a fresh login here).
            let keep = o.meta.map(|m| m.id.hex());
            let keys: Vec<_> = all
                .iter()
                .filter(|e| Some(&e.id) != keep.as_ref())
                .filter_map(|e| e.key().map(|k| (k, crate::store::ended_until(e.expires))))
                .collect();
            self.timed("write", timeout, store.end(&keys, Some(user)))
                .await?;
            m.sessions
                .with_label_values(&["revoked"])
                .inc_by(keys.len() as u64);
        }
        Ok(())
    }

    /// Count what a response applied and add its cookies (and the caching
    /// headers that must come with them).
    fn send_cookies(&self, resp: &mut ResponseHeader, ctx: &mut Ctx, o: Outcome) -> Result<()> {
        let m = &self.shared.metrics;
        for (label, n) in o.applied.by_label() {
            if n > 0 {
                m.directives.with_label_values(&[label]).inc_by(n as u64);
            }
        }
        ctx.applied = o.directives_applied();
        for (event, happened) in [
            ("created", o.created),
            ("regenerated", o.regenerated),
            ("destroyed", o.destroyed),
        ] {
            if happened {
                m.sessions.with_label_values(&[event]).inc();
            }
        }
        if o.set_cookies.is_empty() {
            return Ok(());
        }
        for line in o.set_cookies {
            m.set_cookie_bytes.observe(line.len() as f64);
            resp.append_header(http::header::SET_COOKIE, line)?;
        }
        let (control, vary) = exchange::cache_headers(
            resp.headers
                .get(http::header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok()),
            resp.headers
                .get_all(http::header::VARY)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        );
        if let Some(c) = control {
            resp.insert_header(http::header::CACHE_CONTROL, c)?;
        }
        if let Some(v) = vary {
            // One Vary header: the app's values and Cookie.
            resp.insert_header(http::header::VARY, v)?;
        }
        Ok(())
    }

    /// A response whose directives were refused: count it, then (unless
    /// the route ignores directive errors) answer 502, or 503 when the store
    /// write failed under `on_error: fail`.
    fn refuse(&self, ctx: &mut Ctx, route: &Route, commit: Commit) -> Result<()> {
        match commit {
            Commit::Applied(_) => Ok(()),
            Commit::Rejected(e) => {
                self.count_directive_error(ctx, &e);
                ctx.rejected = Some(e.label());
                if route.cfg.on_directive_error == OnDirectiveError::Ignore {
                    return Ok(());
                }
                ctx.answer = Some(exchange::rejected_answer(&e));
                Error::e_explain(HTTPStatus(502), "session directive rejected")
            }
            Commit::Unavailable(e) => {
                let id = ctx.session.meta.map(|m| m.id);
                let mut answer = LocalAnswer::store_unavailable();
                if let StoreError::Unknown(_) = e {
                    // Never claim less than what happened: the client must
                    // not take this 503 for "nothing applied".
                    tracing::error!(route = %route.cfg.name, session = ?id, error = %e, "session store write outcome unknown (all of the response's directives or none); answering 503 with X-Session-Write: unknown");
                    answer
                        .headers
                        .push(("x-session-write", "unknown".to_string()));
                } else {
                    tracing::error!(route = %route.cfg.name, session = ?id, error = %e, "session store write failed after the upstream answered, nothing applied; answering 503");
                }
                ctx.answer = Some(answer);
                Error::e_explain(HTTPStatus(503), "session store write failed")
            }
        }
    }

    /// The upstream cannot set our cookies: drop (and count) its
    /// `Set-Cookie` lines that would.
    fn drop_our_cookies(&self, resp: &mut ResponseHeader, ctx: &Ctx) -> Result<()> {
        let ours =
            |v: &http::HeaderValue| exchange::upstream_cookie_is_ours(&ctx.state, v.as_bytes());
        let lines: Vec<http::HeaderValue> = resp
            .headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .cloned()
            .collect();
        if !lines.iter().any(ours) {
            return Ok(());
        }
        resp.remove_header(&http::header::SET_COOKIE);
        for v in lines {
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
        Ok(())
    }

    /// A store round trip bounded by `timeout` (a timeout is a plain
    /// failure: reads, and writes that cannot have run), counted.
    fn timed<'a, T: Send + 'a>(
        &'a self,
        op: &'static str,
        timeout: Duration,
        f: impl std::future::Future<Output = std::result::Result<T, StoreError>> + Send + 'a,
    ) -> StoreCall<'a, T> {
        self.measured(op, async move {
            match tokio::time::timeout(timeout, f).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Timeout),
            }
        })
    }

    /// A store round trip that bounds itself, counted. Boxed: a store
    /// client's future is kilobytes, and inline it would make every hook's
    /// future that large, copied whole into pingora's box on every request
    /// (about 19,000 instructions of memcpy per request, store I/O or not).
    /// Boxed, it is built only for a round trip that happens.
    fn measured<'a, T: Send + 'a>(
        &'a self,
        op: &'static str,
        f: impl std::future::Future<Output = std::result::Result<T, StoreError>> + Send + 'a,
    ) -> StoreCall<'a, T> {
        Box::pin(async move {
            let t = Instant::now();
            let r = f.await;
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
        })
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    // Boxed: pingora keeps the context inline in its per-request future,
    // up to three copies of it, and allocates that future whole for every
    // idle keep-alive connection; 8 bytes there instead of 1 KB each.
    type CTX = Box<Ctx>;

    /// Called as soon as pingora has parsed a request header (the
    /// connection context is set for every HTTP/1 request, its first one
    /// too, by [`crate::downstream`]): the header arrived within
    /// `server.header_timeout`, so its clock stops.
    fn on_connection_reuse(
        &self,
        _session: &mut pingora::proxy::Session,
        _ctx: &mut Box<Ctx>,
        prev: Box<dyn std::any::Any + Send + Sync>,
    ) {
        if let Some(header_read) = prev.downcast_ref::<Arc<std::sync::atomic::AtomicBool>>() {
            header_read.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    fn new_ctx(&self) -> Box<Ctx> {
        Box::new(Ctx {
            state: self.shared.state.load_full(),
            route: None,
            https: false,
            trusted: false,
            peer: None,
            member: None,
            tried: 0,
            busy: None,
            upstream_status: 0,
            new_tag: None,
            now: 0,
            start: Instant::now(),
            session: Session::default(),
            client_ip: None,
            tracked_ip: None,
            tracked_ua: None,
            evicted: Vec::new(),
            forward: Forward::default(),
            directives: None,
            upstream_start: None,
            steps: Steps::default(),
            trace: None,
            store_round_trips: 0,
            applied: 0,
            answer: None,
            rejected: None,
            _inflight: InFlight::new(&self.shared),
        })
    }

    async fn request_filter(&self, session: &mut Session_, ctx: &mut Box<Ctx>) -> Result<bool> {
        ctx.now = crate::model::now_ms();
        let state = ctx.state.clone();
        if let (Some(t), Some(o)) = (&self.shared.tracer, &state.config.tracing) {
            let h = &session.req_header().headers;
            let value = |name: &str| h.get(name).map(|v| v.as_bytes());
            ctx.trace = Some(t.begin(
                value("traceparent"),
                value("tracestate"),
                o.sample_ratio,
                ctx.start,
            ));
        }
        if let Err(e) = normalize_target(session, state.config.paths.keep_escaped_separators) {
            tracing::info!(reason = e.label(), "request target refused");
            let body = format!("bad request path ({})\n", e.label());
            return answer(session, &LocalAnswer::text(400, body)).await;
        }
        match exchange::open(&state, incoming(session, ctx.now)) {
            Ok(o) => {
                self.opened(ctx, o);
                if let Some(u) = &state.config.session.settings.users {
                    let req = session.req_header();
                    if u.track_ip {
                        ctx.tracked_ip = ctx.client_ip.map(|ip| ip.to_string());
                    }
                    if u.track_user_agent {
                        ctx.tracked_ua = req
                            .headers
                            .get(http::header::USER_AGENT)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                    }
                }
            }
            Err(a) => return answer(session, &a).await,
        }
        let route = &state.router.routes()[ctx.route.expect("opened")];
        if self.load(ctx, route).await.is_err() {
            return answer(session, &LocalAnswer::store_unavailable()).await;
        }
        let req = session.req_header();
        let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
        match exchange::admit(&state, route, &ctx.session, ctx.https, pq) {
            Ok(f) => ctx.forward = f,
            Err(r) => {
                self.count_refusal(
                    route,
                    &r,
                    state.config.session.settings.limits.forward_bytes,
                );
                self.end_idle(ctx).await;
                return answer(session, &r.answer).await;
            }
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session_,
        ctx: &mut Box<Ctx>,
    ) -> Result<Box<HttpPeer>> {
        let state = ctx.state.clone();
        let route = ctx
            .route
            .map(|i| &state.router.routes()[i])
            .ok_or_else(|| Error::explain(InternalError, "no route"))?;
        let pool = &route.pool;
        let tag = match (pool.selection, &ctx.session.meta) {
            (Selection::Sticky, Some(m)) => m.tag,
            (Selection::Sticky, None) => *ctx.new_tag.get_or_insert_with(crate::model::random_tag),
            _ => 0,
        };
        let Some(i) = pool.pick(&tag.to_le_bytes(), ctx.tried, ctx.now) else {
            return Err(Error::explain(ConnectError, "every upstream failed to connect").into_up());
        };
        let peer = pool.peer(i);
        let addr = pool.members[i].addr;
        ctx.member = Some(i);
        ctx.busy = pool.start_request(i);
        ctx.peer = Some(addr);
        ctx.upstream_start = Some(Instant::now());
        if let (Some(t), Some(trace)) = (&self.shared.tracer, &mut ctx.trace) {
            t.upstream(trace, addr);
        }
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session_,
        up: &mut RequestHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        let prior_xff = strip_client_headers(up, ctx)?;
        let forward = std::mem::take(&mut ctx.forward);
        let ip = client_ip(session);
        for (name, value) in ctx
            .session
            .upstream_headers(forward, ctx.https, ip, &prior_xff)
        {
            let value = match value {
                // Only `upstream_headers`' own literals are borrowed.
                Cow::Borrowed(v) => http::HeaderValue::from_static(v),
                Cow::Owned(v) => http::HeaderValue::try_from(v)
                    .map_err(|_| Error::explain(InternalError, "invalid upstream header value"))?,
            };
            match name {
                Cow::Borrowed(n) => up.insert_header(n, value)?,
                Cow::Owned(n) => up.insert_header(n, value)?,
            }
        }
        if let Some(t) = &ctx.trace {
            // Ours replace the client's: the upstream's parent is our span.
            up.remove_header("tracestate");
            up.insert_header("traceparent", t.traceparent())?;
            if let Some(state) = t.tracestate() {
                up.insert_header("tracestate", state)?;
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session_,
        resp: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        ctx.upstream_status = status;
        if let (false, Some(t)) = (exchange::is_interim(status), ctx.upstream_start) {
            ctx.steps.upstream = Some(Step::since(t));
        }
        let max_pairs = ctx.state.config.session.settings.limits.keys;
        let headers = resp.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
        let read = exchange::read_response(status, headers, max_pairs);
        for name in &read.strip {
            resp.remove_header(name.as_str());
        }
        if read.directives.is_some() {
            ctx.directives = read.directives;
        }
        self.drop_our_cookies(resp, ctx)
    }

    async fn response_filter(
        &self,
        _session: &mut Session_,
        resp: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        let state = ctx.state.clone();
        let Some(route) = ctx.route.map(|i| &state.router.routes()[i]) else {
            return Ok(());
        };
        if exchange::is_interim(resp.status.as_u16()) {
            return Ok(());
        }
        let parsed = ctx
            .directives
            .take()
            .unwrap_or_else(|| Ok(Directives::default()));
        let apply = |ctx: &Ctx| match &parsed {
            Ok(d) => ctx.session.apply(d, &ctx.write_context(route)),
            Err(e) => Err(e.clone()),
        };
        let mut outcome = apply(ctx.as_ref());
        let (write_start, trips) = (Instant::now(), ctx.store_round_trips);
        let mut write = self.write(ctx, &outcome).await;
        let followed = match &write {
            Some(Err(StoreError::Rejected(Refusal::Moved(moved)))) => {
                exchange::follow(&state, &ctx.session, moved, ctx.https, ctx.now)
            }
            _ => None,
        };
        if let Some(next) = followed {
            // A parallel request regenerated the session while this one was
            // at the app: its directives apply to the new session (one hop).
            // Anyone else's is refused whole (`session_ended`).
            self.continue_as(ctx, next);
            outcome = apply(ctx.as_ref());
            write = self.write(ctx, &outcome).await;
        }
        let mut commit = exchange::settle(outcome, write, state.config.store.on_error);
        if let Commit::Applied(o) = &commit {
            if let Err(e) = self.end_others(ctx, o).await {
                // The user's other sessions live on: never report that done.
                tracing::warn!(route = %route.cfg.name, error = %e, "ending a user's sessions failed");
                commit = Commit::Unavailable(e);
            }
        }
        if ctx.store_round_trips > trips {
            ctx.steps.write = Some(Step::since(write_start));
        }
        let timing = route.cfg.server_timing.then(|| {
            let (directives, set_cookies) = match (&commit, &parsed) {
                (Commit::Applied(o), Ok(d)) => (Ok(d), o.set_cookies.as_slice()),
                (Commit::Applied(o), Err(e)) => (Err(e.label()), o.set_cookies.as_slice()),
                (Commit::Rejected(e), _) => (Err(e.label()), &[][..]),
                (Commit::Unavailable(_), _) => (Err("store_unavailable"), &[][..]),
            };
            exchange::server_timing(&exchange::Did {
                steps: &ctx.steps,
                had_session: ctx.session.meta.is_some(),
                round_trips: ctx.store_round_trips,
                directives,
                set_cookies,
            })
        });
        match commit {
            Commit::Applied(o) => {
                if let Some(t) = timing {
                    resp.append_header("server-timing", t)?;
                }
                self.send_cookies(resp, ctx, o)
            }
            refused => {
                self.end_idle(ctx).await;
                let r = self.refuse(ctx, route, refused);
                match (timing, &mut ctx.answer) {
                    // Our own 502 or 503 says it too.
                    (Some(t), Some(a)) => a.headers.push(("server-timing", t)),
                    (Some(t), None) => {
                        resp.append_header("server-timing", t)?;
                    }
                    _ => {}
                }
                r
            }
        }
    }

    /// pingora's error lines carry this; keep the query string (tokens,
    /// session-ish parameters) out of logs.
    fn request_summary(&self, session: &Session_, ctx: &Box<Ctx>) -> String {
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
    fn suppress_error_log(&self, _session: &Session_, _ctx: &Box<Ctx>, _error: &Error) -> bool {
        true
    }

    /// No downstream modules: the default adds a (disabled) compression
    /// module that would still run on every request.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    /// A failed connection: the upstream is ejected for `eject_for`, and
    /// the request (not sent yet, whatever its method) goes to another
    /// upstream, each tried once.
    fn fail_to_connect(
        &self,
        session: &mut Session_,
        _peer: &HttpPeer,
        ctx: &mut Box<Ctx>,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let state = ctx.state.clone();
        if let (Some(route), Some(i)) = (ctx.route.map(|r| &state.router.routes()[r]), ctx.member) {
            route.pool.eject(i, crate::model::now_ms());
            self.count_upstream(route, i, 0);
            ctx.member = None;
            ctx.busy = None;
            ctx.tried |= 1 << i;
            let others = ctx.tried.count_ones() < route.pool.members.len() as u32;
            // A body already partly sent by an earlier attempt (on a reused
            // connection that failed) cannot be sent again whole.
            if others && ctx.answer.is_none() && !session.as_ref().retry_buffer_truncated() {
                tracing::warn!(route = %route.cfg.name, upstream = %route.pool.members[i].name, error = e.etype().as_str(), "upstream connection failed; ejected, trying another");
                e.set_retry(true);
            }
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session_,
        e: Box<Error>,
        ctx: &mut Box<Ctx>,
        client_reused: bool,
    ) -> Box<Error> {
        let _ = (session, ctx, client_reused);
        let mut e = e.more_context(format!("Peer: {peer}"));
        // Never send a request twice. The error came after the request (or
        // part of it) went out: even a reused keep-alive connection that
        // closed may have delivered it, and the app may have acted on it.
        // pingora would retry idempotent methods here; a POST-like GET of a
        // legacy app is not idempotent, and the headers forwarded for the
        // session are spent. Only a failed connect is retried
        // (`fail_to_connect`).
        e.set_retry(false);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session_,
        e: &Error,
        ctx: &mut Box<Ctx>,
    ) -> FailToProxy {
        // pingora drops the client connection after a failure past this
        // point; say so, so a client does not reuse it.
        session.set_keepalive(None);
        let code = failure_status(ctx.answer.as_ref(), e);
        let a = match ctx.answer.take() {
            Some(a) => a,
            None => {
                // The error type and where it came from, never its context
                // text (it may quote the request) — except a TLS failure's,
                // which is the handshake's own words (an unknown issuer, a
                // name the certificate is not valid for) and the SNI.
                if matches!(
                    e.etype(),
                    pingora::ErrorType::TLSHandshakeFailure | pingora::ErrorType::InvalidCert
                ) {
                    tracing::error!(route = ctx.route_name(), peer = ?ctx.peer, status = code, error = e.etype().as_str(), source = e.esource().as_str(), why = %e, "failed to proxy: upstream TLS");
                } else {
                    tracing::error!(route = ctx.route_name(), peer = ?ctx.peer, status = code, error = e.etype().as_str(), source = e.esource().as_str(), "failed to proxy");
                }
                LocalAnswer::text(code, failure_body(code))
            }
        };
        if code > 0 {
            if let Err(err) = respond(session, &a).await {
                tracing::debug!(error = %err, "could not write the error answer");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session_, e: Option<&Error>, ctx: &mut Box<Ctx>) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let trace = ctx.trace.take();
        let route = ctx.route_name();
        let m = &self.shared.metrics;
        let elapsed = ctx.start.elapsed();
        if let (Some(r), Some(i)) = (ctx.route(), ctx.member) {
            self.count_upstream(r, i, ctx.upstream_status);
        }
        match ctx.route() {
            Some(r) => {
                let rm = r.metrics.get_or_init(|| RouteMetrics::new(m, route));
                rm.requests(m, route, status).inc();
                rm.request_duration.observe(elapsed.as_secs_f64());
                if let Some(t) = ctx.steps.upstream {
                    rm.upstream_duration.observe(t.took.as_secs_f64());
                }
            }
            // Refused before routing (a bad target, no route): rare.
            None => {
                m.requests
                    .with_label_values(&[route, status_label(status)])
                    .inc();
                m.request_duration
                    .with_label_values(&[route])
                    .observe(elapsed.as_secs_f64());
            }
        }
        let req = session.req_header();
        // Our own 502 for rejected directives is said by directive_error.
        let error = ctx.rejected.or_else(|| e.map(|e| e.etype().as_str()));
        if let (Some(t), Some(mut trace)) = (&self.shared.tracer, trace) {
            t.finish(
                &mut trace,
                &crate::telemetry::Finished {
                    method: req.method.as_str(),
                    path: req.uri.path(),
                    route,
                    status,
                    steps: &ctx.steps,
                    session: ctx.session.meta.is_some(),
                    round_trips: ctx.store_round_trips,
                    directives: ctx.applied,
                    error,
                },
            );
        }
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
            directive_error = ctx.rejected,
            // Our own 502 for rejected directives is said by directive_error.
            error = e.filter(|_| ctx.rejected.is_none()).map(|e| e.etype().as_str()),
        );
    }
}

/// The status of a failure answer: ours, or from the error's kind and
/// where it came from (0: the client is gone, nothing to write).
fn failure_status(ours: Option<&LocalAnswer>, e: &Error) -> u16 {
    match (ours, e.etype()) {
        (Some(a), _) => a.status,
        (None, HTTPStatus(code)) => *code,
        (None, _) => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                WriteError | ReadError | ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

/// The body of a failure answer that is not one of ours.
fn failure_body(code: u16) -> &'static str {
    match code {
        502 => "upstream unavailable\n",
        504 => "upstream timed out\n",
        400 => "bad request\n",
        _ => "gateway error\n",
    }
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
