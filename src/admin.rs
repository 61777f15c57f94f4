//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process
//! serves), `/readyz` (the store answers).

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
        match path.as_str() {
            "/metrics" => reply(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                self.shared.metrics.render(),
            ),
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
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
                b"not found (try /metrics, /healthz, /readyz)\n".to_vec(),
            ),
        }
    }
}
