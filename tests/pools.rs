//! Upstream pools (issue 14, item 2): pingora-load-balancing selection
//! (round_robin, least_conn, sticky), active probes (TCP, HTTP), passive
//! ejection, a retry on another upstream after a failed connect, the
//! `gimlet_upstream_*` metrics, and the config errors.
//!
//! The backends are small hyper servers that name themselves in each
//! answer, can be killed and started again on the same port, and can be told
//! to fail their `/healthz` while still accepting connections.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A backend on a fixed loopback port, answering `{"backend": PORT}` (and
/// any `?h=Name:value` header, as the echo upstream does); `/healthz`
/// answers `health` (200 unless told otherwise).
struct Backend {
    port: u16,
    health: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
    stop: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Backend {
    fn start() -> Backend {
        let mut b = Backend {
            port: free_port(),
            health: Arc::new(AtomicU16::new(200)),
            hits: Arc::new(AtomicUsize::new(0)),
            stop: None,
        };
        b.resume();
        b
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Close the listener and every connection.
    fn kill(&mut self) {
        if let Some((tx, thread)) = self.stop.take() {
            let _ = tx.send(());
            thread.join().unwrap();
        }
    }

    /// Listen again on the same port.
    fn resume(&mut self) {
        assert!(self.stop.is_none());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (port, health, hits) = (self.port, self.health.clone(), self.hits.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .unwrap();
                ready_tx.send(()).unwrap();
                let serve = async {
                    loop {
                        let Ok((tcp, _)) = l.accept().await else {
                            continue;
                        };
                        let (health, hits) = (health.clone(), hits.clone());
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let (health, hits) = (health.clone(), hits.clone());
                                async move { answer(port, &health, &hits, req).await }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = rx => {}
                }
            });
            // Dropping the runtime closes every connection it served.
        });
        ready_rx.recv().unwrap();
        self.stop = Some((tx, thread));
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn answer(
    port: u16,
    health: &AtomicU16,
    hits: &AtomicUsize,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body_len = req
        .into_body()
        .collect()
        .await
        .map_or(0, |b| b.to_bytes().len());
    let mut resp = hyper::Response::builder();
    if path == "/healthz" {
        return Ok(resp
            .status(health.load(Ordering::SeqCst))
            .body(Default::default())
            .unwrap());
    }
    hits.fetch_add(1, Ordering::SeqCst);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "h" => {
                if let Some((n, val)) = v.split_once(':') {
                    resp = resp.header(n.trim(), val.trim_start());
                }
            }
            "sleep_ms" => tokio::time::sleep(Duration::from_millis(v.parse().unwrap())).await,
            _ => {}
        }
    }
    let body = serde_json::json!({ "backend": port, "body_len": body_len }).to_string();
    Ok(resp
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap())
}

fn yaml(backends: &[String], extra: &str) -> String {
    let list = backends
        .iter()
        .map(|b| format!("\"{b}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "session:\n  secrets: [\"{SECRET}\"]\n  dev_insecure: true\nstore: {{ kind: memory }}\nroutes:\n  - name: app\n    connect_timeout: 1s\n    upstreams: [{list}]\n{extra}"
    )
}

fn served_by(r: &Resp) -> u16 {
    assert_eq!(r.status, 200, "{} {}", r.status, r.body);
    r.json()["backend"].as_u64().unwrap() as u16
}

async fn health(g: &Gateway, b: &Backend) -> f64 {
    g.metric(&format!(
        "gimlet_upstream_health{{route=\"app\",upstream=\"{}\"}}",
        b.addr()
    ))
    .await
}

/// Wait (up to `limit`) for `b`'s health gauge to read `want`; how long it took.
async fn until_health(g: &Gateway, b: &Backend, want: f64, limit: Duration) -> Duration {
    let t = Instant::now();
    while health(g, b).await != want {
        assert!(
            t.elapsed() < limit,
            "upstream {} never reached health {want} in {limit:?}\n{}",
            b.addr(),
            g.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

async fn spread(g: &Gateway, n: usize) -> BTreeMap<u16, usize> {
    let c = client();
    let mut by = BTreeMap::new();
    for _ in 0..n {
        *by.entry(served_by(&send(&c, c.get(g.url("/"))).await))
            .or_default() += 1;
    }
    by
}

/// A backend that dies is out of service within one probe interval (by the
/// probe alone: nothing is sent to it meanwhile), and back within one
/// interval of its return, for a TCP probe and for an HTTP probe (whose
/// `/healthz` fails while the port still accepts).
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_upstream_is_skipped_within_one_interval_and_used_again_when_back() {
    let interval = Duration::from_millis(500);
    for probe in ["tcp: true", "path: /healthz, expect: 200"] {
        let mut bs: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
        let addrs: Vec<String> = bs.iter().map(Backend::addr).collect();
        let g = Gateway::start(&yaml(
            &addrs,
            &format!("    health_check: {{ {probe}, interval: 500ms, timeout: 200ms }}\n"),
        ));
        until_health(&g, &bs[1], 1.0, Duration::from_secs(5)).await;
        let before = spread(&g, 30).await;
        assert_eq!(before.len(), 3, "{probe}: round robin over all: {before:?}");
        assert!(before.values().all(|&n| n == 10), "{probe}: {before:?}");

        // Down: killed (TCP), or /healthz failing (HTTP, the port still open).
        let http = probe.starts_with("path");
        if http {
            bs[1].health.store(503, Ordering::SeqCst);
        } else {
            bs[1].kill();
        }
        let hits = bs[1].hits.load(Ordering::SeqCst);
        let took = until_health(&g, &bs[1], 0.0, interval * 3).await;
        println!("{probe}: out of service {took:?} after it died (interval {interval:?})");
        assert!(
            took <= interval + Duration::from_millis(400),
            "{probe}: ejected after {took:?}"
        );
        let during = spread(&g, 40).await;
        assert!(!during.contains_key(&bs[1].port), "{probe}: {during:?}");
        assert_eq!(during.values().sum::<usize>(), 40);
        assert_eq!(bs[1].hits.load(Ordering::SeqCst), hits, "{probe}");
        assert!(
            g.log()
                .contains(&format!("upstream {} becomes unhealthy", bs[1].addr())),
            "{probe}: the flip is logged\n{}",
            g.log()
        );

        // Back.
        if http {
            bs[1].health.store(200, Ordering::SeqCst);
        } else {
            bs[1].resume();
        }
        let took = until_health(&g, &bs[1], 1.0, interval * 3).await;
        println!("{probe}: back in service {took:?} after it returned");
        assert!(
            took <= interval + Duration::from_millis(400),
            "{probe}: back after {took:?}"
        );
        let after = spread(&g, 30).await;
        assert_eq!(after.get(&bs[1].port), Some(&10), "{probe}: {after:?}");
    }
}

/// Without a probe: a connection that fails ejects the upstream (for
/// `eject_for`) and the request, a POST too, goes to another upstream at
/// once; every upstream down is a 502, one attempt each.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_connect_is_retried_on_another_upstream_and_ejects_it() {
    let live = Backend::start();
    let dead = free_port();
    let dead_addr = format!("127.0.0.1:{dead}");
    let g = Gateway::start(&yaml(
        &[dead_addr.clone(), live.addr()],
        "    health_check: { eject_for: 2s }\n",
    ));
    let c = client();
    let errors = format!(
        "gimlet_upstream_requests_total{{route=\"app\",status=\"error\",upstream=\"{dead_addr}\"}}"
    );
    let ok = format!(
        "gimlet_upstream_requests_total{{route=\"app\",status=\"200\",upstream=\"{}\"}}",
        live.addr()
    );
    for i in 0..20 {
        let req = if i % 2 == 0 {
            c.post(g.url("/")).body("a body")
        } else {
            c.get(g.url("/"))
        };
        let r = send(&c, req).await;
        assert_eq!(served_by(&r), live.port, "request {i}");
        assert_eq!(
            r.json()["body_len"],
            if i % 2 == 0 { 6 } else { 0 },
            "request {i}"
        );
    }
    // Ejected at the first failure: tried once in 20 requests.
    assert_eq!(g.metric(&errors).await, 1.0, "{}", g.metrics().await);
    assert_eq!(g.metric(&ok).await, 20.0);
    let gauge = format!("gimlet_upstream_health{{route=\"app\",upstream=\"{dead_addr}\"}}");
    let t = Instant::now();
    while g.metric(&gauge).await != 0.0 || !g.metrics().await.contains(&gauge) {
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{}",
            g.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(g
        .log()
        .contains("upstream connection failed; ejected, trying another"));
    // After eject_for it is tried again (and ejected again).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for _ in 0..4 {
        assert_eq!(served_by(&send(&c, c.get(g.url("/"))).await), live.port);
    }
    assert_eq!(g.metric(&errors).await, 2.0);

    // Every upstream down: 502 after one attempt at each.
    drop(live);
    let r = send(&c, c.get(g.url("/"))).await;
    assert_eq!(r.status, 502, "{}", r.body);
}

/// `sticky`: 1,000 sessions each stay on the upstream that served the
/// request that created them (and across Regenerate); when one upstream
/// dies only its sessions move, and they move back when it returns.
/// Sessionless requests spread over all upstreams.
#[tokio::test(flavor = "multi_thread")]
async fn sticky_keeps_each_session_on_its_upstream_and_moves_only_a_dead_ones() {
    let mut bs: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let addrs: Vec<String> = bs.iter().map(Backend::addr).collect();
    let g = Gateway::start(&yaml(
        &addrs,
        "    selection: sticky\n    health_check: { tcp: true, interval: 300ms, timeout: 200ms }\n",
    ));
    until_health(&g, &bs[2], 1.0, Duration::from_secs(5)).await;
    let c = client();
    let base = format!("http://{}", g.addr);

    // Sessionless: spread.
    let loose = spread(&g, 600).await;
    assert_eq!(loose.len(), 3, "{loose:?}");
    assert!(loose.values().all(|&n| n >= 120), "uneven: {loose:?}");

    // 1,000 sessions, 50 at a time; where each was created.
    let mut sessions: Vec<(Browser, u16)> = Vec::new();
    for chunk in 0..20 {
        let mut tasks = Vec::new();
        for k in 0..50 {
            let mut b = Browser {
                c: c.clone(),
                jar: Jar::default(),
                base: base.clone(),
            };
            let user = format!("u{}", chunk * 50 + k);
            tasks.push(tokio::spawn(async move {
                let r = b
                    .get("/", &[("X-Session-Set", &format!("user={user}"))])
                    .await;
                let home = served_by(&r);
                assert!(b.jar.get("gimlet").is_some(), "{:?}", r.headers);
                (b, home)
            }));
        }
        for t in tasks {
            sessions.push(t.await.unwrap());
        }
    }
    let mut homes: BTreeMap<u16, usize> = BTreeMap::new();
    for (_, h) in &sessions {
        *homes.entry(*h).or_default() += 1;
    }
    assert_eq!(homes.len(), 3, "{homes:?}");

    // Every later request of a session goes home; a Regenerate too.
    let seen = revisit(sessions, true).await;
    let moved: Vec<_> = seen.iter().filter(|(_, h, now)| h != now).collect();
    assert!(moved.is_empty(), "{} of 1000 moved", moved.len());
    let sessions: Vec<(Browser, u16)> = seen.into_iter().map(|(b, h, _)| (b, h)).collect();

    // One dies: its sessions move, nobody else's does.
    let dead = bs[0].port;
    bs[0].kill();
    until_health(&g, &bs[0], 0.0, Duration::from_secs(2)).await;
    let seen = revisit(sessions, false).await;
    let mut moved = 0;
    for (_, home, now) in &seen {
        if *home == dead {
            assert_ne!(*now, dead);
            moved += 1;
        } else {
            assert_eq!(home, now, "a live upstream's session moved");
        }
    }
    assert_eq!(moved, homes[&dead]);
    let sessions: Vec<(Browser, u16)> = seen.into_iter().map(|(b, h, _)| (b, h)).collect();

    // It returns: they go home again.
    bs[0].resume();
    until_health(&g, &bs[0], 1.0, Duration::from_secs(2)).await;
    let seen = revisit(sessions, false).await;
    assert!(seen.iter().all(|(_, h, now)| h == now));
}

/// One more request of each session, 50 at a time: (session, where it
/// was created, where this one went).
async fn revisit(sessions: Vec<(Browser, u16)>, regenerate: bool) -> Vec<(Browser, u16, u16)> {
    let mut out = Vec::new();
    let mut all = sessions.into_iter();
    loop {
        let chunk: Vec<(Browser, u16)> = all.by_ref().take(50).collect();
        if chunk.is_empty() {
            return out;
        }
        let mut tasks = Vec::new();
        for (mut b, home) in chunk {
            tasks.push(tokio::spawn(async move {
                let d: &[(&str, &str)] = if regenerate {
                    &[("X-Session-Regenerate", "1")]
                } else {
                    &[]
                };
                let before = b.jar.get("gimlet").map(str::to_string);
                let r = b.get("/", d).await;
                if regenerate {
                    assert_ne!(
                        b.jar.get("gimlet").map(str::to_string),
                        before,
                        "regenerated"
                    );
                }
                (b, home, served_by(&r))
            }));
        }
        for t in tasks {
            out.push(t.await.unwrap());
        }
    }
}

/// `least_conn`: while one upstream holds a slow request, the others get
/// the next ones (round robin would alternate).
#[tokio::test(flavor = "multi_thread")]
async fn least_conn_sends_to_the_upstream_with_fewer_requests_in_flight() {
    let bs: Vec<Backend> = (0..2).map(|_| Backend::start()).collect();
    let addrs: Vec<String> = bs.iter().map(Backend::addr).collect();
    let g = Gateway::start(&yaml(&addrs, "    selection: least_conn\n"));
    let c = client();
    let slow = {
        let (c, url) = (c.clone(), g.url("/?sleep_ms=1500"));
        tokio::spawn(async move { served_by(&send(&c, c.get(url)).await) })
    };
    // The slow one is in flight on one of them.
    let t = Instant::now();
    while bs
        .iter()
        .map(|b| b.hits.load(Ordering::SeqCst))
        .sum::<usize>()
        == 0
    {
        assert!(t.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let quick = spread(&g, 10).await;
    let busy = slow.await.unwrap();
    assert_eq!(quick.len(), 1, "{quick:?}");
    assert!(!quick.contains_key(&busy), "{quick:?} (busy {busy})");
    // Idle again: both used.
    assert_eq!(spread(&g, 10).await.len(), 2);
}

/// Requests are counted per upstream and status; a reload that drops an
/// upstream drops its health series.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_metrics_count_by_status_and_follow_reloads() {
    let bs: Vec<Backend> = (0..2).map(|_| Backend::start()).collect();
    let addrs: Vec<String> = bs.iter().map(Backend::addr).collect();
    let g = Gateway::start(&yaml(&addrs, ""));
    spread(&g, 10).await;
    for b in &bs {
        let sample = format!(
            "gimlet_upstream_requests_total{{route=\"app\",status=\"200\",upstream=\"{}\"}}",
            b.addr()
        );
        assert_eq!(g.metric(&sample).await, 5.0, "{}", g.metrics().await);
        until_health(&g, b, 1.0, Duration::from_secs(3)).await;
    }
    let full = std::fs::read_to_string(&g.config).unwrap();
    std::fs::write(
        &g.config,
        full.replace(&format!(", \"{}\"", bs[1].addr()), ""),
    )
    .unwrap();
    g.signal("HUP");
    let t = Instant::now();
    let gone = format!(
        "gimlet_upstream_health{{route=\"app\",upstream=\"{}\"}}",
        bs[1].addr()
    );
    while g.metrics().await.contains(&gone) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{}",
            g.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health(&g, &bs[0]).await, 1.0);
    assert_eq!(spread(&g, 4).await.len(), 1);
}

#[test]
fn pool_config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let two = ["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
    for (extra, want) in [
        ("    selection: fastest\n", "routes[0].selection: expected one of round_robin, least_conn, sticky"),
        ("    health_check: { tcp: true, path: /h }\n", "routes[0].health_check: give `tcp: true` or `path`, not both"),
        ("    health_check: { path: healthz }\n", "routes[0].health_check.path: must start with `/`"),
        ("    health_check: { path: \"/h<x>\" }\n", "routes[0].health_check.path: must start with `/` and be a valid request target"),
        ("    health_check: { path: \"/h#frag\" }\n", "routes[0].health_check.path: must start with `/` and be a valid request target"),
        ("    health_check: { path: \"/h`x\" }\n", "routes[0].health_check.path: must start with `/` and be a valid request target"),
        ("    health_check: { path: /h, expect: 700 }\n", "routes[0].health_check.expect: must be an HTTP status"),
        ("    health_check: { tcp: true, interval: 10ms }\n", "routes[0].health_check.interval: must be at least 100ms"),
        ("    health_check: { tcp: true, interval: 1s, timeout: 2s }\n", "routes[0].health_check.timeout: must not be longer than the interval"),
        ("    health_check: { interval: 1s }\n", "`interval` and `timeout` need a probe"),
        ("    health_check: { expect: 204 }\n", "routes[0].health_check.expect: only an HTTP probe"),
        ("    health_check: { tcp: true, every: 1s }\n", "routes[0].health_check.every: unknown field (known: tcp, path, expect, host, interval, timeout, eject_for)"),
        ("    health_check: { eject_for: soon }\n", "routes[0].health_check.eject_for: invalid duration"),
    ] {
        let c = check_yaml(dir.path(), &yaml(&two, extra), false, &[]);
        assert!(!c.ok, "{extra}");
        assert!(c.stderr.contains(want), "{extra}: {}", c.stderr);
    }
    let twice = ["127.0.0.1:1".to_string(), "127.0.0.1:1".to_string()];
    let c = check_yaml(dir.path(), &yaml(&twice, ""), false, &[]);
    assert!(
        c.stderr
            .contains("routes[0].upstreams[1]: `127.0.0.1:1` is listed twice"),
        "{}",
        c.stderr
    );
    // Defaults, printed.
    let c = check_yaml(
        dir.path(),
        &yaml(&two, "    health_check: { path: /healthz }\n"),
        true,
        &[],
    );
    assert!(c.ok, "{}", c.stderr);
    for want in [
        "selection: round_robin",
        "path: /healthz",
        "expect: 200",
        "interval: 5s",
        "timeout: 1s",
        "eject_for: 10s",
    ] {
        assert!(c.stdout.contains(want), "{want}: {}", c.stdout);
    }
}

/// A request that reached an upstream is never sent again, not even a GET
/// on a reused keep-alive connection that the upstream closes instead of
/// answering (pingora would retry it, on another upstream and without the
/// session's headers). The upstream here answers the first request of each
/// connection, then reads the second and hangs up.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_reached_an_upstream_is_never_sent_twice() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let seen = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                for nth in 0..2 {
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    if nth == 0 {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                    }
                }
                // The second request: read, then closed without an answer.
            });
        }
    });
    let other = Backend::start();
    let g = Gateway::start(&yaml(&[addr.to_string(), other.addr()], ""));
    let c = client();
    // Round robin over two: requests 1 and 3 go to the closing upstream,
    // the third on the connection the first left in the pool.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(send(&c, c.get(g.url("/once"))).await.status);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 502).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "the closing upstream saw a request twice"
    );
    assert_eq!(
        other.hits.load(Ordering::SeqCst),
        2,
        "the failed request was replayed on the other upstream"
    );
}
