//! The admin listener: `/metrics` (Prometheus text), `/healthz` and `/livez`
//! (the process serves), `/readyz` (the store answers; `?verbose` lists each
//! check).

use crate::proxy::Shared;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::Arc;
use std::time::Duration;

pub struct AdminApp {
    pub shared: Arc<Shared>,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body)
        .expect("static response parts are valid")
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let verbose = session
            .req_header()
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "verbose"));
        match path.as_str() {
            "/metrics" => {
                let m = &self.shared.metrics;
                m.in_flight.set(
                    self.shared
                        .inflight
                        .load(std::sync::atomic::Ordering::Acquire) as i64,
                );
                reply(200, "text/plain; version=0.0.4; charset=utf-8", m.render())
            }
            "/healthz" | "/livez" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" if verbose => {
                let (ok, store) = match self.ping().await {
                    None => (true, "none configured".to_string()),
                    Some((kind, Ok(()))) => (true, format!("{kind} answers")),
                    Some((kind, Err(e))) => (false, format!("{kind}: {e}")),
                };
                let config = if self.shared.metrics.reload_ok.get() == 1 {
                    "[+] config: the last load succeeded"
                } else {
                    "[-] config: the last reload failed; serving the previous config"
                };
                let body = format!(
                    "[{}] store: {store}\n{config}\n{}\n",
                    if ok { '+' } else { '-' },
                    if ok { "ready" } else { "not ready" }
                );
                reply(if ok { 200 } else { 503 }, "text/plain", body.into_bytes())
            }
            "/readyz" => match self.ping().await {
                None => reply(200, "text/plain", b"ready (no store)\n".to_vec()),
                Some((kind, Ok(()))) => reply(
                    200,
                    "text/plain",
                    format!("ready ({kind} store)\n").into_bytes(),
                ),
                Some((_, Err(e))) => {
                    reply(503, "text/plain", format!("not ready: {e}\n").into_bytes())
                }
            },
            _ => reply(
                404,
                "text/plain",
                b"not found (try /metrics, /healthz, /livez, /readyz)\n".to_vec(),
            ),
        }
    }
}

impl AdminApp {
    /// Ping the store within its timeout: `None` without a store, else its
    /// kind and whether it answered.
    async fn ping(&self) -> Option<(&'static str, Result<(), String>)> {
        let store = self.shared.store.as_ref()?;
        let timeout = self
            .shared
            .state
            .load()
            .config
            .store
            .timeout
            .max(Duration::from_millis(100));
        let result = match tokio::time::timeout(timeout, store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("store timed out".to_string()),
        };
        Some((store.kind(), result))
    }
}
