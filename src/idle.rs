//! Idle keep-alive connections that hold no request state.
//!
//! pingora builds the whole state of the next request (a 13 KB future, a
//! 4 KiB header buffer) as soon as a response is sent, and keeps it for as
//! long as the client stays silent: with 10,000 idle clients that is most
//! of the gateway's memory. [`Lean`] waits for the next request's first
//! byte before asking pingora for it, so a silent HTTP/1 connection costs
//! the socket and pingora's connection task only. TLS and HTTP/2
//! connections go to pingora's own loop unchanged.
//!
//! The loop is pingora's (`HttpServerApp::process_new`, the HTTP/1 branch)
//! with the wait added; pingora documents `process_new_http` for custom
//! accept loops. The wait costs one more `recv` per request (a 1-byte read
//! that pingora's stream hands back to the parser).

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use std::time::Duration;

/// How long a connection may stay silent before its next request:
/// pingora's own keep-alive default, which it also applies to the wait
/// for the first request.
pub const KEEPALIVE: Duration = Duration::from_secs(60);

pub struct Lean<A>(pub Arc<A>);

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Lean<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let app = &self.0;
        let h2c = app.server_options().is_some_and(|o| o.h2c);
        if stream.get_ssl_digest().is_some() || h2c {
            return ServerApp::process_new(app, stream, shutdown).await;
        }
        // The first request: pingora's defaults; later ones: what the
        // previous request left (keep-alive, reuses remaining).
        let mut first_request = true;
        let mut settings = None;
        loop {
            let mut shutdown = shutdown.clone();
            let mut byte = [0u8; 1];
            tokio::select! {
                // try_peek reads the byte and puts it back in the stream.
                r = tokio::time::timeout(KEEPALIVE, stream.try_peek(&mut byte)) => match r {
                    Ok(Ok(true)) => {}
                    // A stream that cannot peek (none here): pingora's loop.
                    Ok(Ok(false)) => return ServerApp::process_new(app, stream, &shutdown).await,
                    // Closed, reset, or silent past the keep-alive.
                    Ok(Err(_)) | Err(_) => return None,
                },
                // Shutting down: an idle connection just closes.
                _ = shutdown.changed(), if !first_request => return None,
            }
            let mut session = ServerSession::new_http1(stream);
            if first_request {
                first_request = false;
                // pingora: no keep-alive once shutting down.
                session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE.as_secs()));
                session.set_keepalive_reuses_remaining(
                    app.server_options().and_then(|o| o.keepalive_request_limit),
                );
            } else if let Some(s) = settings.take() {
                HttpPersistentSettings::apply_to_session(s, &mut session);
            }
            let (next, persistent) = app.process_new_http(session, &shutdown).await?.consume();
            stream = next;
            settings = persistent;
        }
    }

    async fn cleanup(&self) {
        self.0.http_cleanup().await;
    }
}
