//! The admin listener: `/metrics` (Prometheus text), `/healthz` and `/livez`
//! (the process serves), `/readyz` (the store answers; `?verbose` lists each
//! check), and with `admin.token` the session API under `/sessions`
//! ([`sessions_api`]: pingora-free).

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
        if path == "/sessions" || path.starts_with("/sessions/") {
            let req = session.req_header();
            let call = ApiCall {
                method: req.method.as_str(),
                path: &path,
                query: req.uri.query().unwrap_or(""),
                authorization: req
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes()),
            };
            let (status, body) = sessions_api(&self.shared, call).await;
            let mut r = reply(status, "application/json", body.into_bytes());
            if status == 401 {
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
            }
            return r;
        }
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

/// One call to the session API, as the admin listener read it.
pub struct ApiCall<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub authorization: Option<&'a [u8]>,
}

fn json_error(msg: &str) -> String {
    serde_json::json!({ "error": msg }).to_string()
}

/// The session API (issue: operators manage sessions): list a user's
/// sessions, show one (metadata and key names, never values), end one or
/// all of a user's. Off (404) unless `admin.token` is set; `401` without
/// the right `Authorization: Bearer` token (compared in constant time).
/// Every call is logged (never the token or a user's name, which is a
/// session value) and counted in `gimlet_admin_requests_total{op,status}`.
pub async fn sessions_api(shared: &Shared, call: ApiCall<'_>) -> (u16, String) {
    let state = shared.state.load_full();
    let params: Vec<(String, String)> = form_urlencoded::parse(call.query.as_bytes())
        .into_owned()
        .collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let id_part = call.path.strip_prefix("/sessions/");
    let op = match (call.method, id_part) {
        ("GET", None) => "list",
        ("GET", Some(_)) => "show",
        ("DELETE", None) => "revoke_user",
        ("DELETE", Some(_)) => "revoke",
        _ => "other",
    };
    let (status, body) = match &state.config.admin_token {
        None => (
            404,
            json_error("the session API is off: set admin.token to turn it on"),
        ),
        Some(token) if !authorized(token, call.authorization) => (
            401,
            json_error("a valid Authorization: Bearer token is needed"),
        ),
        Some(_) => match &shared.store {
            None => (404, json_error("store.kind is none: no sessions to manage")),
            Some(store) => {
                let lifetime = state.config.session.settings.lifetime;
                let call = api_op(store, op, id_part, param("user"), param("tag"), lifetime);
                // A SCAN of a large keyspace, or a store that hangs, is
                // bounded like any request.
                let bound = state
                    .config
                    .store
                    .timeout
                    .saturating_mul(20)
                    .max(Duration::from_secs(5));
                match tokio::time::timeout(bound, call).await {
                    Ok(r) => r,
                    Err(_) => (503, json_error("the store did not answer in time")),
                }
            }
        },
    };
    shared
        .metrics
        .admin_requests
        .with_label_values(&[op, &status.to_string()])
        .inc();
    let user = param("user").map(crate::store::user_hash);
    tracing::info!(target: "gimlet::admin", op, status, id = id_part.unwrap_or(""), user_hash = user.as_deref().unwrap_or(""), "session API call");
    (status, body)
}

fn authorized(token: &str, header: Option<&[u8]>) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
        return false;
    };
    // Digests, so the comparison does not even reveal the token's length.
    bool::from(Sha256::digest(given).ct_eq(&Sha256::digest(token.as_bytes())))
}

/// `ms` as unix seconds, like `X-Session-Created`.
fn secs(ms: u64) -> u64 {
    ms / 1000
}

fn entry_json(e: &crate::store::UserSession) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": e.id,
        "tag": format!("{:08x}", e.tag),
        "created": secs(e.created),
        "last_seen": secs(e.seen),
        "expires": secs(e.expires),
    });
    if let Some(ip) = &e.ip {
        v["ip"] = ip.clone().into();
    }
    if let Some(ua) = &e.user_agent {
        v["user_agent"] = ua.clone().into();
    }
    v
}

async fn api_op(
    store: &crate::store::Store,
    op: &str,
    id: Option<&str>,
    user: Option<&str>,
    tag: Option<&str>,
    lifetime: u64,
) -> (u16, String) {
    use crate::model::SessionId;
    use crate::store::{user_hash, StoreKey};
    let failed = |e: crate::store::StoreError| (503, json_error(&format!("the store failed: {e}")));
    let tag = match tag {
        None => None,
        Some(t) if t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u32::from_str_radix(t, 16).ok()
        }
        Some(_) => return (400, json_error("tag is 8 hex digits")),
    };
    match op {
        "list" | "revoke_user" => {
            let Some(user) = user.filter(|u| !u.is_empty()) else {
                return (400, json_error("give ?user=NAME"));
            };
            let hashed = user_hash(user);
            let sessions = match store.user_sessions(&hashed).await {
                Ok(s) => s,
                Err(e) => return failed(e),
            };
            if op == "list" {
                let list: Vec<_> = sessions.iter().map(entry_json).collect();
                return (200, serde_json::json!({ "sessions": list }).to_string());
            }
            let keys: Vec<_> = sessions
                .iter()
                .filter_map(|e| e.key().map(|k| (k, crate::store::ended_until(e.expires))))
                .collect();
            match store.end(&keys, Some(&hashed)).await {
                Ok(()) => (200, serde_json::json!({ "ended": keys.len() }).to_string()),
                Err(e) => failed(e),
            }
        }
        "show" | "revoke" => {
            let Some(sid) = id.and_then(SessionId::from_hex) else {
                return (400, json_error("a session id is 32 lowercase hex digits"));
            };
            let found = match store.inspect(&sid, tag).await {
                Ok(f) => f,
                Err(crate::store::StoreError::Unsupported(m)) => return (400, json_error(&m)),
                Err(e) => return failed(e),
            };
            if op == "show" {
                return match found {
                    Some(i) => (200, inspected_json(&i).to_string()),
                    None => (404, json_error("no such session in the store")),
                };
            }
            // Memory and embedded key ended ids by id alone; Redis needs the
            // tag (given, or found with the session's data).
            let tag = match (tag, &found, store.kind()) {
                (Some(t), _, _) => t,
                (None, Some(i), _) => i.tag,
                (None, None, "redis") => {
                    return (404, json_error("no such session in the store; a session whose keys all live in its cookie is ended through its user (DELETE /sessions?user=...) or with ?tag="))
                }
                (None, None, _) => 0,
            };
            let until = crate::store::ended_until(crate::model::now_ms().saturating_add(lifetime));
            match store.end(&[(StoreKey { id: sid, tag }, until)], None).await {
                // `found: false`: nothing of it was in the store (a session
                // whose keys all live in its cookie, or a wrong tag); its id
                // is remembered as ended all the same.
                Ok(()) => (
                    200,
                    serde_json::json!({ "ended": 1, "found": found.is_some() }).to_string(),
                ),
                Err(e) => failed(e),
            }
        }
        _ => (
            405,
            json_error("use GET or DELETE on /sessions or /sessions/{id}"),
        ),
    }
}

fn inspected_json(i: &crate::store::Inspected) -> serde_json::Value {
    serde_json::json!({
        "id": i.id,
        "tag": format!("{:08x}", i.tag),
        "data_expires": i.data_expires.map(secs),
        "keys": i.keys,
        "ended": i.ended,
    })
}
