//! Answers never claim less than what happened (issue 15, item 1): a write
//! answered 503 is either withdrawn (embedded: its deadline passed before
//! the writer applied it) or marked `X-Session-Write: unknown` (Redis: sent,
//! no answer in time).

mod common;
use common::*;
use std::time::Duration;

/// `/count` increments `n` without reading anything first.
fn yaml(up: &Upstream, store: &str) -> String {
    format!(
        "session:\n  secrets: [\"{SECRET}\"]\n  keys: {{ n: {{ clientside: false }} }}\nstore: {store}\nroutes:\n  - name: count\n    match: {{ path_prefix: /count }}\n    upstreams: [\"{a}\"]\n    session: {{ read: none, write: [n] }}\n  - name: app\n    upstreams: [\"{a}\"]\n",
        a = up.addr
    )
}

#[allow(dead_code)]
async fn counter(b: &mut Browser) -> i64 {
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.session().get("n").map_or(0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_embedded_write_answered_503_was_not_applied() {
    let up = Upstream::start();
    let g = Gateway::start(&yaml(&up, "{ kind: embedded, timeout: 1ms }"));
    // Eight clients at once, so that batches queue behind each other's
    // commits and some wait past their deadline.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut b = Browser::new(&g);
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0i64, 0i64);
            for _ in 0..60 {
                let r = b.get("/count", &[("X-Session-Incr", "n=1")]).await;
                match r.status {
                    200 => ok += 1,
                    503 => {
                        assert_eq!(r.header("x-session-write"), None, "embedded knows");
                        refused += 1
                    }
                    s => panic!("{s}: {}", r.body),
                }
            }
            // Read the counter back.
            let mut n = None;
            for _ in 0..300 {
                let r = b.get("/", &[]).await;
                if r.status != 200 {
                    // A read may miss its 1 ms too on a loaded machine.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
                n = Some(
                    r.session()
                        .get("n")
                        .map_or(0, |v| v.parse::<i64>().unwrap()),
                );
                break;
            }
            (ok, refused, n.expect("the counter reads back"))
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (o, r, n) = t.await.unwrap();
        assert_eq!(
            n,
            o,
            "{r} writes answered 503 and {} of them applied anyway",
            n - o
        );
        ok += o;
        refused += r;
    }
    println!(
        "embedded, timeout 1ms, 8 clients: {ok} acknowledged, {refused} answered 503, none applied"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_write_without_an_answer_says_its_outcome_is_unknown() {
    let r = RedisServer::start();
    let up = Upstream::start();
    let store = format!("{{ kind: redis, url: \"{}\", timeout: 200ms }}", r.url());
    let g = Gateway::start(&yaml(&up, &store));
    let mut b = Browser::new(&g);
    b.get("/count", &[("X-Session-Incr", "n=1")]).await;
    r.pause();
    let mut unknown = 0;
    for _ in 0..5 {
        let resp = b.get("/count", &[("X-Session-Incr", "n=1")]).await;
        assert_eq!(resp.status, 503, "{}", resp.body);
        assert_eq!(
            resp.header("x-session-write"),
            Some("unknown"),
            "{:?}",
            resp.headers
        );
        assert!(resp.set_cookies.is_empty());
        unknown += 1;
    }
    r.resume();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Each was all of its directives or none: the counter is between.
    let n = counter(&mut b).await;
    println!("redis paused: {unknown} answered 503 unknown, counter {n}");
    assert!((1..=1 + unknown).contains(&n), "counter {n}");
    assert_eq!(
        g.metric("gimlet_store_operations_total{op=\"write\",result=\"unknown\"}")
            .await,
        unknown as f64
    );
    assert!(g.log().contains("outcome unknown"));
}
