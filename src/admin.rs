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
                let (ok, store) = self.store_check().await;
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
            "/readyz" => {
                let Some(store) = &self.shared.store else {
                    return reply(200, "text/plain", b"ready (no store)\n".to_vec());
                };
                let timeout = self
                    .shared
                    .state
                    .load()
                    .config
                    .store
                    .timeout
                    .max(Duration::from_millis(100));
                match tokio::time::timeout(timeout, store.ping()).await {
                    Ok(Ok(())) => reply(
                        200,
                        "text/plain",
                        format!("ready ({} store)\n", store.kind()).into_bytes(),
                    ),
                    Ok(Err(e)) => {
                        reply(503, "text/plain", format!("not ready: {e}\n").into_bytes())
                    }
                    Err(_) => reply(503, "text/plain", b"not ready: store timed out\n".to_vec()),
                }
            }
            _ => reply(
                404,
                "text/plain",
                b"not found (try /metrics, /healthz, /livez, /readyz)\n".to_vec(),
            ),
        }
    }
}

impl AdminApp {
    /// Does the store answer? (and what to say about it)
    async fn store_check(&self) -> (bool, String) {
        let Some(store) = &self.shared.store else {
            return (true, "none configured".into());
        };
        let timeout = self
            .shared
            .state
            .load()
            .config
            .store
            .timeout
            .max(Duration::from_millis(100));
        match tokio::time::timeout(timeout, store.ping()).await {
            Ok(Ok(())) => (true, format!("{} answers", store.kind())),
            Ok(Err(e)) => (false, format!("{} fails: {e}", store.kind())),
            Err(_) => (false, format!("{} timed out", store.kind())),
        }
    }
}
