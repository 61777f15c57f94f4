//! Client connections: pingora's HTTP/1 loop, with three things added.
//!
//! - **Idle connections hold no request state.** pingora builds the whole
//!   state of the next request (a 13 KB future, a 4 KiB header buffer) as
//!   soon as a response is sent, and keeps it for as long as the client
//!   stays silent: with 10,000 idle clients that is most of the gateway's
//!   memory. [`Downstream`] waits for the next request's first byte (up to
//!   `server.keepalive_timeout`) before asking pingora for it, so a silent
//!   plain HTTP/1 connection costs the socket and pingora's connection task
//!   only. The wait costs one more `recv` per request (a 1-byte read that
//!   pingora's stream hands back to the parser).
//! - **A whole request header within `server.header_timeout`.** pingora
//!   bounds each read, not the header: a client sending one byte every few
//!   seconds (slowloris) would hold its connection for as long as it likes.
//!   The clock runs from the accept (a connection's first request) or the
//!   request's first byte (later ones) until pingora has parsed the header,
//!   which the proxy says through the connection context pingora hands to
//!   `ProxyHttp::on_connection_reuse` (an `Arc<AtomicBool>`, set to true).
//!   TLS streams cannot be peeked: there a later request's clock starts when
//!   the previous response ends, and runs for `keepalive_timeout +
//!   header_timeout`.
//! - **At most `server.max_connections` at once.** One more is answered
//!   `503` with `Connection: close` (after reading its request header, at
//!   most a second, so the client sees the answer rather than a reset) and
//!   closed; an HTTP/2 one is closed.
//!
//! HTTP/2 connections go to pingora's own loop (`h2_idle_timeout` bounds
//! them); the HTTP/1 loop is pingora's (`HttpServerApp::process_new`, the
//! HTTP/1 branch), which pingora documents `process_new_http` for.

use crate::config::ServerConfig;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::http::ResponseHeader;
use pingora::protocols;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use prometheus::{IntCounter, IntGauge};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How long a connection over the cap may take to send its request
/// header before it is closed without an answer.
const REFUSE_READ: Duration = Duration::from_secs(1);
/// A client that stops reading a response: nginx's `send_timeout` (the
/// wait for one write). Reads from clients have pingora's 60 s per read
/// (nginx's `client_body_timeout`).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
const REFUSE_BODY: &[u8] =
    b"gimlet: too many connections (server.max_connections); try again shortly\n";

/// The `server` settings that apply per connection, changed by a reload
/// (connections already open keep what they started with for the request
/// in progress).
pub struct Limits {
    header_timeout_ms: AtomicU64,
    keepalive_ms: AtomicU64,
    max: AtomicUsize,
    open: AtomicUsize,
    open_gauge: IntGauge,
    refused_full: IntCounter,
    refused_slow: IntCounter,
    /// Unix seconds of the last "connections refused" warning: at most
    /// one a second, whatever the flood.
    warned: AtomicU64,
}

impl Limits {
    pub fn new(s: &ServerConfig, metrics: &crate::metrics::Metrics) -> Arc<Limits> {
        let l = Limits {
            header_timeout_ms: AtomicU64::new(0),
            keepalive_ms: AtomicU64::new(0),
            max: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            open_gauge: metrics.connections_open.clone(),
            refused_full: metrics
                .connections_refused
                .with_label_values(&["max_connections"]),
            refused_slow: metrics
                .connections_refused
                .with_label_values(&["header_timeout"]),
            warned: AtomicU64::new(0),
        };
        l.set(s);
        Arc::new(l)
    }

    /// Take the settings of a (re)loaded config.
    pub fn set(&self, s: &ServerConfig) {
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        self.header_timeout_ms
            .store(ms(s.header_timeout), Ordering::Relaxed);
        self.keepalive_ms
            .store(ms(s.keepalive_timeout), Ordering::Relaxed);
        self.max.store(s.max_connections, Ordering::Relaxed);
    }

    fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms.load(Ordering::Relaxed))
    }

    fn keepalive(&self) -> Duration {
        Duration::from_millis(self.keepalive_ms.load(Ordering::Relaxed))
    }

    fn acquire(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max.load(Ordering::Relaxed);
        // Counted only below the cap: a refused connection never holds a
        // place another one could have had.
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.open_gauge.inc();
        Some(Slot(self.clone()))
    }

    fn warn_full(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.warned.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(
                max_connections = self.max.load(Ordering::Relaxed),
                "connections refused: server.max_connections reached (503)"
            );
        }
    }
}

/// One connection counted against `max_connections` until dropped.
struct Slot(Arc<Limits>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.open_gauge.dec();
    }
}

pub struct Downstream<A> {
    pub app: Arc<A>,
    pub limits: Arc<Limits>,
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Downstream<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        let Some(_slot) = self.limits.acquire() else {
            self.refuse(stream).await;
            return None;
        };
        let app = &self.app;
        // (Gimlet never turns h2c on; with it, pingora's loop would take
        // every plain connection.)
        let h2c = app.server_options().is_some_and(|o| o.h2c);
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            let stream: Stream = Box::new(PrefaceDeadline {
                inner: stream,
                missing: H2_PREFACE_LEN,
                deadline: Box::pin(tokio::time::sleep_until(
                    accepted + self.limits.header_timeout(),
                )),
                timeouts: self.limits.refused_slow.clone(),
            });
            return ServerApp::process_new(app, stream, shutdown).await;
        }
        if h2c {
            return ServerApp::process_new(app, stream, shutdown).await;
        }
        let tls = stream.get_ssl_digest().is_some();
        let limits = &self.limits;
        // The first request: pingora's defaults; later ones: what the
        // previous request left (keep-alive, reuses remaining).
        let mut first_request = true;
        let mut settings: Option<HttpPersistentSettings> = None;
        // Set by the proxy once a request header is parsed; one per
        // connection, cleared for each request.
        let header_read = Arc::new(AtomicBool::new(false));
        loop {
            let header_timeout = limits.header_timeout();
            let keepalive = limits.keepalive();
            let mut shutdown = shutdown.clone();
            let deadline = if tls {
                // No peek: pingora's keep-alive bounds the silence (per
                // read), this the whole wait and header.
                if first_request {
                    accepted + header_timeout
                } else {
                    Instant::now() + keepalive + header_timeout
                }
            } else {
                let wait = if first_request {
                    header_timeout.saturating_sub(accepted.elapsed())
                } else {
                    keepalive
                };
                let mut byte = [0u8; 1];
                tokio::select! {
                    // try_peek reads the byte and puts it back in the stream.
                    r = tokio::time::timeout(wait, stream.try_peek(&mut byte)) => match r {
                        Ok(Ok(true)) => {}
                        // A stream that cannot peek (none here): pingora's loop.
                        Ok(Ok(false)) => return ServerApp::process_new(app, stream, &shutdown).await,
                        // Closed or reset.
                        Ok(Err(_)) => return None,
                        // Silent past the keep-alive, or a new connection
                        // silent past the header timeout.
                        Err(_) => {
                            if first_request {
                                limits.refused_slow.inc();
                            }
                            return None;
                        }
                    },
                    // Shutting down: an idle connection just closes.
                    _ = shutdown.changed(), if !first_request => return None,
                }
                if first_request {
                    accepted + header_timeout
                } else {
                    Instant::now() + header_timeout
                }
            };
            let mut session = ServerSession::new_http1(stream);
            if first_request {
                // pingora: no keep-alive once shutting down.
                session.set_keepalive((!*shutdown.borrow()).then_some(whole_secs(keepalive)));
                session.set_keepalive_reuses_remaining(
                    app.server_options().and_then(|o| o.keepalive_request_limit),
                );
            }
            header_read.store(false, Ordering::Release);
            let signal: Box<dyn std::any::Any + Send + Sync> = Box::new(header_read.clone());
            match settings.take() {
                Some(mut persist) if !first_request => {
                    persist.set_user_context(signal);
                    persist.apply_to_session(&mut session);
                }
                // The first request: no settings to apply (applying them
                // counts a reuse).
                _ => session.set_connection_user_context(Some(signal)),
            }
            session.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
            first_request = false;

            let serve = app.process_new_http(session, &shutdown);
            let header_clock = async {
                tokio::time::sleep_until(deadline).await;
                if header_read.load(Ordering::Acquire) {
                    // In time: the request goes on as long as it needs.
                    std::future::pending::<()>().await;
                }
            };
            let reused = tokio::select! {
                biased;
                r = serve => r,
                () = header_clock => {
                    limits.refused_slow.inc();
                    tracing::debug!("request header not received within server.header_timeout; closing");
                    return None;
                }
            };
            let (next, persistent) = reused?.consume();
            stream = next;
            settings = persistent;
        }
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

impl<A> Downstream<A> {
    /// Over `max_connections`: a plain `503` for an HTTP/1 client, once its
    /// request header is in (an answer before it would race the client's
    /// send, and a close with unread data is a reset).
    async fn refuse(&self, stream: Stream) {
        self.limits.refused_full.inc();
        self.limits.warn_full();
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return;
        }
        let mut session = ServerSession::new_http1(stream);
        let read = REFUSE_READ.min(self.limits.header_timeout());
        if !matches!(
            tokio::time::timeout(read, session.read_request()).await,
            Ok(Ok(true))
        ) {
            return;
        }
        let Ok(mut resp) = ResponseHeader::build(503, Some(4)) else {
            return;
        };
        let headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Retry-After", "1"),
            ("Connection", "close"),
        ];
        for (name, value) in headers {
            let _ = resp.insert_header(name, value);
        }
        let _ = resp.set_content_length(REFUSE_BODY.len());
        let _ = tokio::time::timeout(
            REFUSE_READ,
            session.write_error_response(resp, Bytes::from_static(REFUSE_BODY)),
        )
        .await;
    }
}

/// pingora counts keep-alive in whole seconds (0 would mean forever).
fn whole_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// Raise the soft limit of open files to the hard one (most systems start
/// services at 1,024), and say so when `max_connections` cannot be met: a
/// client connection can take a second descriptor for its upstream, and
/// running out fails accepts and upstream connects alike.
pub fn raise_fd_limit(max_connections: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write/read the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(256);
    if lim.rlim_cur < needed {
        tracing::warn!(
            max_connections,
            open_files_limit = lim.rlim_cur,
            needed,
            "server.max_connections needs more open files than the process may have; raise LimitNOFILE (systemd) or ulimit -n, or lower max_connections"
        );
    }
}

/// An HTTP/2 connection's stream until the client preface is in: reads
/// fail once `header_timeout` has passed. pingora's HTTP/2 handshake waits
/// for the preface without a bound (its idle timeout starts after it), so a
/// TLS client that negotiates `h2` and then says nothing would hold a
/// connection slot for good. Past the preface the wrapper is a pass-through;
/// pingora's `h2_idle_timeout` bounds a connection with no stream.
#[derive(Debug)]
struct PrefaceDeadline {
    inner: Stream,
    /// Preface bytes still to come; 0: no deadline any more.
    missing: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeouts: IntCounter,
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const H2_PREFACE_LEN: usize = 24;

impl AsyncRead for PrefaceDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                this.missing = this.missing.saturating_sub(n);
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.missing > 0 && this.deadline.as_mut().poll(cx).is_ready() => {
                this.missing = 0;
                this.timeouts.inc();
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within server.header_timeout",
                )))
            }
            other => other,
        }
    }
}

impl AsyncWrite for PrefaceDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl protocols::Shutdown for PrefaceDeadline {
    async fn shutdown(&mut self) {
        protocols::Shutdown::shutdown(self.inner.as_mut()).await
    }
}

impl protocols::UniqueID for PrefaceDeadline {
    fn id(&self) -> protocols::UniqueIDType {
        self.inner.id()
    }
}

impl protocols::Ssl for PrefaceDeadline {
    fn get_ssl(&self) -> Option<&protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl protocols::GetTimingDigest for PrefaceDeadline {
    fn get_timing_digest(&self) -> Vec<Option<protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl protocols::GetProxyDigest for PrefaceDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl protocols::GetSocketDigest for PrefaceDeadline {
    fn get_socket_digest(&self) -> Option<Arc<protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl protocols::Peek for PrefaceDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
