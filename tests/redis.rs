//! The Redis store against private redis-server processes (standalone and a
//! three-master Cluster), started on free loopback ports by each test.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn redis_yaml(up: &Upstream, store: &str, extra_session: &str) -> String {
    format!(
        "session:\n  secrets: [\"{SECRET}\"]\n  keys: {{ cart: {{ clientside: true }} }}\n{extra_session}store: {store}\nroutes:\n  - name: ro\n    match: {{ path_prefix: /ro }}\n    upstreams: [\"{a}\"]\n    session: {{ read: none, write: none }}\n  - name: cartonly\n    match: {{ path_prefix: /cart }}\n    upstreams: [\"{a}\"]\n    session: {{ read: [cart], write: [cart] }}\n  - name: app\n    upstreams: [\"{a}\"]\n",
        a = up.addr
    )
}

fn store_for(r: &RedisServer, extra: &str) -> String {
    format!(
        "{{ kind: redis, url: \"{}\", timeout: 200ms{extra} }}",
        r.url()
    )
}

fn total(stats: &BTreeMap<String, u64>) -> u64 {
    stats.values().sum()
}

fn writes(stats: &BTreeMap<String, u64>) -> u64 {
    [
        "evalsha",
        "eval",
        "hset",
        "hdel",
        "hincrby",
        "del",
        "pexpireat",
        "expire",
        "exec",
        "multi",
        "rename",
        "set",
    ]
    .iter()
    .map(|c| stats.get(*c).copied().unwrap_or(0))
    .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_per_request() {
    let r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&redis_yaml(&up, &store_for(&r, ""), ""));
    let mut b = Browser::new(&g);

    // Warm the script cache so that one write is exactly one EVALSHA.
    let mut warm = Browser::new(&g);
    warm.get("/", &[("X-Session-Set", "w=1")]).await;

    r.reset_stats();
    b.get("/", &[]).await;
    assert_eq!(
        total(&r.commandstats()),
        0,
        "no cookie: {:?}",
        r.commandstats()
    );

    // A cookie-only session: no store I/O in either direction.
    b.get("/", &[("X-Session-Set", "cart=apple")]).await;
    b.get("/", &[]).await;
    b.get("/cart", &[("X-Session-Set", "cart=pear")]).await;
    assert_eq!(
        total(&r.commandstats()),
        0,
        "cookie-only: {:?}",
        r.commandstats()
    );

    // The first server-side key: one write round trip, no read.
    b.get("/", &[("X-Session-Set", "user=alice")]).await;
    let s = r.commandstats();
    assert_eq!(s.get("evalsha"), Some(&1), "{s:?}");
    assert_eq!(s.get("hgetall"), None, "{s:?}");
    r.reset_stats();

    // A server-side read: one HGETALL, no write command.
    let resp = b.get("/", &[]).await;
    assert_eq!(resp.session()["user"], "alice");
    let s = r.commandstats();
    assert_eq!(s.get("hgetall"), Some(&1), "{s:?}");
    assert_eq!(writes(&s), 0, "{s:?}");
    r.reset_stats();

    // read: none, and a route that reads clientside keys only: zero.
    b.get("/ro", &[]).await;
    b.get("/cart", &[]).await;
    assert_eq!(total(&r.commandstats()), 0, "{:?}", r.commandstats());

    // Directives: one read (the route reads all) and one EVALSHA.
    b.get(
        "/",
        &[
            ("X-Session-Set", "a=1&b=2"),
            ("X-Session-Delete", "w"),
            ("X-Session-Incr", "n=3"),
        ],
    )
    .await;
    let s = r.commandstats();
    assert_eq!(s.get("evalsha"), Some(&1), "{s:?}");
    assert_eq!(s.get("hgetall"), Some(&1), "{s:?}");
    let s = b.get("/", &[]).await.session();
    assert_eq!(
        (s["a"].as_str(), s["b"].as_str(), s["n"].as_str()),
        ("1", "2", "3")
    );

    // A clientside write on a route that reads nothing from the store: no
    // read, and one EVALSHA that checks the session limits over the store
    // data this request did not read (SPEC section 1; issue 8 item 12).
    r.reset_stats();
    b.get("/ro?x", &[]).await;
    b.get("/cart", &[("X-Session-Set", "cart=fig")]).await;
    let s = r.commandstats();
    assert_eq!(s.get("evalsha"), Some(&1), "{s:?}");
    assert_eq!(s.get("hgetall"), None, "{s:?}");
    assert_eq!(s.get("hset"), None, "a limit check writes nothing: {s:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_sets_and_incr_across_two_gateways() {
    let r = RedisServer::start();
    let up = Upstream::start();
    let g1 = Gateway::start(&redis_yaml(&up, &store_for(&r, ""), ""));
    let g2 = Gateway::start(&redis_yaml(&up, &store_for(&r, ""), ""));
    let mut b = Browser::new(&g1);
    b.get("/", &[("X-Session-Set", "start=1")]).await;
    let urls = (0..100)
        .map(|i| {
            let gw = if i % 2 == 0 { &g1 } else { &g2 };
            let set = format!("k{i}={i}");
            let mut d = vec![("X-Session-Incr", "hits=1")];
            if i < 50 {
                d.push(("X-Session-Set", &set));
            }
            format!("http://{}{}", gw.addr, path_with("/", &d))
        })
        .collect();
    all_at_once(urls, &b.jar.header()).await;
    let s = b.get("/", &[]).await.session();
    assert_eq!(s["hits"], "100");
    for i in 0..50 {
        assert_eq!(s.get(&format!("k{i}")), Some(&i.to_string()), "k{i} lost");
    }
    // The other gateway sees the same session.
    b.base = format!("http://{}", g2.addr);
    assert_eq!(b.get("/", &[]).await.session()["hits"], "100");
}

#[tokio::test(flavor = "multi_thread")]
async fn ttl_destroy_and_regenerate_leave_no_keys() {
    let r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&redis_yaml(
        &up,
        &store_for(&r, ", prefix: \"t:\""),
        "  lifetime: 1h\n",
    ));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice&cart=x")]).await;
    let id = b.get("/", &[]).await.got_header("x-session-id").unwrap();
    let keys = r.keys("t:*");
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(
        keys[0].starts_with("t:{") && keys[0].ends_with(&format!(":{id}:p")),
        "{keys:?}"
    );
    let ttl: i64 = r.cli(&["PTTL", &keys[0]]).trim().parse().unwrap();
    assert!(ttl > 3_590_000 && ttl <= 3_600_000, "ttl {ttl}");

    // Regenerate: data moves, nothing stays under the old id (over plain
    // HTTP there is no regenerate grace, so no forward either).
    b.get("/", &[("X-Session-Regenerate", "1")]).await;
    let new_id = b.get("/", &[]).await.got_header("x-session-id").unwrap();
    assert_ne!(new_id, id);
    assert!(r.keys(&format!("*{id}*")).is_empty(), "{:?}", r.keys("t:*"));
    let keys = r.keys("t:*");
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].contains(&new_id), "{keys:?}");
    let ttl: i64 = r.cli(&["PTTL", &keys[0]]).trim().parse().unwrap();
    assert!(ttl > 0 && ttl <= 3_600_000);
    assert_eq!(b.get("/", &[]).await.session()["user"], "alice");

    // Transient and permanent channels; Destroy removes every one.
    b.get("/", &[("X-Session-Set", "more=1")]).await;
    b.get("/", &[("X-Session-Destroy", "1")]).await;
    let left: Vec<String> = r
        .keys("t:*")
        .into_iter()
        .filter(|k| !k.ends_with(":f"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Destroy + Set: only the new session's keys remain.
    b.get("/", &[("X-Session-Set", "user=bob")]).await;
    let id2 = b.get("/", &[]).await.got_header("x-session-id").unwrap();
    b.get(
        "/",
        &[("X-Session-Destroy", "1"), ("X-Session-Set", "user=carol")],
    )
    .await;
    let id3 = b.get("/", &[]).await.got_header("x-session-id").unwrap();
    assert!(r.keys(&format!("*{id2}*")).is_empty());
    let left: Vec<String> = r
        .keys("t:*")
        .into_iter()
        .filter(|k| !k.ends_with(":f"))
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains(&id3));
    assert_eq!(b.get("/", &[]).await.session()["user"], "carol");
}

#[tokio::test(flavor = "multi_thread")]
async fn incr_errors_and_limits_are_atomic_in_redis() {
    let r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&redis_yaml(
        &up,
        &store_for(&r, ""),
        "  limits: { keys: 4 }\n",
    ));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "word=hi&big=9223372036854775807")])
        .await;
    for (d, reason) in [("word=1", "not_integer"), ("big=1", "overflow")] {
        let resp = b
            .get(
                "/",
                &[("X-Session-Set", "side=effect"), ("X-Session-Incr", d)],
            )
            .await;
        assert_eq!(resp.status, 502, "{d}");
        assert!(resp.body.contains(reason), "{}", resp.body);
    }
    let s = b.get("/", &[]).await.session();
    assert_eq!(s.get("side"), None, "half-applied");
    assert_eq!(s["big"], "9223372036854775807");
    // Limits: 2 keys + 3 more > 4.
    let resp = b.get("/", &[("X-Session-Set", "c=1&d=2&e=3")]).await;
    assert_eq!(resp.status, 502);
    assert!(resp.body.contains("too_many_keys"), "{}", resp.body);
    assert_eq!(
        b.get("/", &[("X-Session-Set", "c=1&d=2")]).await.status,
        200
    );
}

/// Incr on a value only the store knows (the route reads nothing): the
/// check happens inside the store's atomic write.
#[tokio::test(flavor = "multi_thread")]
async fn incr_check_without_a_read() {
    let r = RedisServer::start();
    let up = Upstream::start();
    let yaml = format!(
        "session:\n  secrets: [\"{SECRET}\"]\nstore: {}\nroutes:\n  - name: blind\n    match: {{ path_prefix: /blind }}\n    upstreams: [\"{a}\"]\n    session: {{ read: none }}\n  - name: app\n    upstreams: [\"{a}\"]\n",
        store_for(&r, ""),
        a = up.addr
    );
    let g = Gateway::start(&yaml);
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "word=hi&n=5")]).await;
    r.reset_stats();
    assert_eq!(
        b.get("/blind", &[("X-Session-Incr", "n=2")]).await.status,
        200
    );
    let s = r.commandstats();
    assert_eq!(s.get("hgetall"), None, "{s:?}");
    assert_eq!(s.get("evalsha"), Some(&1), "{s:?}");
    let resp = b.get("/blind", &[("X-Session-Incr", "word=1&n=1")]).await;
    assert_eq!(resp.status, 502);
    assert_eq!(b.get("/", &[]).await.session()["n"], "7");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_fail_mode_then_back() {
    let mut r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&redis_yaml(&up, &store_for(&r, ""), ""));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice&cart=pear")])
        .await;
    assert_eq!(b.get("/", &[]).await.session()["user"], "alice");
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);

    r.kill();
    for _ in 0..5 {
        let t = Instant::now();
        let resp = b.get("/", &[]).await;
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "took {:?}",
            t.elapsed()
        );
        assert_eq!(resp.status, 503, "{}", resp.body);
        assert_eq!(resp.header("retry-after"), Some("1"));
    }
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        hits,
        "the upstream was called"
    );
    // A write that fails after the upstream answered: 503, no Set-Cookie.
    let mut fresh = Browser::new(&g);
    let resp = fresh.get("/", &[("X-Session-Set", "user=bob")]).await;
    assert_eq!(resp.status, 503);
    assert!(resp.set_cookies.is_empty());
    // Requests that need no store still work.
    assert_eq!(b.get("/ro", &[]).await.status, 200);
    assert_eq!(b.get("/cart", &[]).await.session()["cart"], "pear");
    let m = g.metrics().await;
    assert!(failed_reads(&m) >= 5.0, "{m}");

    // Back on the same port (empty: it keeps nothing): works again.
    r.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = b.get("/", &[("X-Session-Set", "user=carol")]).await;
        if resp.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never recovered: {}",
            resp.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.get("/", &[]).await.session()["user"], "carol");
}

/// Redis dies and comes back while four clients keep sending: every answer
/// is a 200 or a 503 within the timeout, nothing hangs, and the gateway
/// recovers on its own.
#[tokio::test(flavor = "multi_thread")]
async fn redis_killed_and_restarted_under_load() {
    let mut r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&redis_yaml(&up, &store_for(&r, ""), ""));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice")]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for n in 0..4 {
        let (stop, jar, addr) = (stop.clone(), b.jar.clone(), g.addr);
        clients.push(tokio::spawn(async move {
            let mut c = Browser::new_at(addr);
            c.jar = jar;
            let mut seen = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                let t = Instant::now();
                let d = format!("k{n}={i}");
                let resp = c.get("/", &[("X-Session-Set", &d)]).await;
                seen.push((resp.status, t.elapsed()));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    r.restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut failed = 0;
    for c in clients {
        let seen = c.await.unwrap();
        for (status, took) in &seen {
            assert!(*status == 200 || *status == 503, "status {status}");
            assert!(
                *took < Duration::from_millis(1500),
                "a request took {took:?}"
            );
        }
        failed += seen.iter().filter(|(s, _)| *s == 503).count();
        assert_eq!(
            seen.last().unwrap().0,
            200,
            "not recovered: {:?}",
            &seen[seen.len().saturating_sub(5)..]
        );
    }
    assert!(failed > 0, "Redis was down and nobody noticed");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_degrade_mode() {
    let mut r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&redis_yaml(&up, &store_for(&r, ", on_error: degrade"), ""));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice&cart=pear")])
        .await;
    r.kill();
    let t = Instant::now();
    let resp = b.get("/", &[]).await;
    assert!(t.elapsed() < Duration::from_millis(1500));
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.got_header("x-session-degraded").as_deref(), Some("1"));
    let s = resp.session();
    assert_eq!(s.get("cart").map(String::as_str), Some("pear"));
    assert_eq!(s.get("user"), None);
    // Server-side writes are refused; clientside ones still work.
    let resp = b.get("/", &[("X-Session-Set", "user=mallory")]).await;
    assert_eq!(resp.status, 502);
    assert!(resp.body.contains("store_unavailable"), "{}", resp.body);
    assert_eq!(
        b.get("/", &[("X-Session-Set", "cart=fig")]).await.status,
        200
    );
    r.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while b
        .get("/", &[])
        .await
        .got_header("x-session-degraded")
        .is_some()
    {
        assert!(Instant::now() < deadline, "still degraded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.get("/", &[]).await.session()["cart"], "fig");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_follows_redis() {
    let mut r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&redis_yaml(&up, &store_for(&r, ""), ""));
    let admin = g.admin.unwrap();
    let c = client();
    let ready = || async {
        send(&c, c.get(format!("http://{admin}/readyz")))
            .await
            .status
    };
    assert_eq!(ready().await, 200);
    r.kill();
    assert_eq!(ready().await, 503);
    assert_eq!(
        send(&c, c.get(format!("http://{admin}/healthz")))
            .await
            .status,
        200
    );
    r.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready().await != 200 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cluster_shared_session_and_reshard() {
    let cluster = Cluster::start();
    let up = Upstream::start();
    let g1 = Gateway::start(&redis_yaml(&up, &cluster.store(), ""));
    let g2 = Gateway::start(&redis_yaml(&up, &cluster.store(), ""));
    let mut b = Browser::new(&g1);
    b.get(
        "/",
        &[("X-Session-Set", "user=alice"), ("X-Session-Incr", "n=1")],
    )
    .await;
    let id = b.get("/", &[]).await.got_header("x-session-id").unwrap();

    // Two gateways serve one session interchangeably.
    for i in 0..6 {
        b.base = format!("http://{}", if i % 2 == 0 { g2.addr } else { g1.addr });
        let resp = b.get("/", &[("X-Session-Incr", "n=1")]).await;
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
    assert_eq!(b.get("/", &[]).await.session()["n"], "7");

    // Find the session's slot and move it (with every other slot of its
    // master) to another master while requests keep flowing.
    let key = cluster.nodes[0]
        .cli(&[
            "--cluster",
            "call",
            &format!("127.0.0.1:{}", cluster.nodes[0].port),
            "KEYS",
            &format!("*{id}*"),
        ])
        .lines()
        .find_map(|l| {
            l.split(": ")
                .nth(1)
                .filter(|k| k.contains(&id))
                .map(str::to_string)
        })
        .expect("session key in the cluster");
    let slot: u16 = cluster.nodes[0]
        .cli(&["CLUSTER", "KEYSLOT", &key])
        .trim()
        .parse()
        .unwrap();
    let (from, from_port, count) = cluster.owner(slot);
    let to = cluster.other_master(&from);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let (jar, addrs) = (b.jar.clone(), [g1.addr, g2.addr]);
    let load = tokio::spawn(async move {
        let mut b = Browser::new_at(addrs[0]);
        b.jar = jar;
        let mut ok = 0;
        let mut i = 0;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            b.base = format!("http://{}", addrs[i % 2]);
            i += 1;
            let resp = b.get("/", &[("X-Session-Incr", "n=1")]).await;
            assert_eq!(resp.status, 200, "during reshard: {}", resp.body);
            let read = b.get("/", &[]).await;
            assert_eq!(read.status, 200, "read during reshard: {}", read.body);
            assert_eq!(read.session()["user"], "alice");
            ok += 1;
        }
        ok
    });
    let from2 = from.clone();
    let out = tokio::task::spawn_blocking(move || {
        let from = from2;
        std::process::Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{from_port}"),
                "--cluster-from",
                &from,
                "--cluster-to",
                &to,
                "--cluster-slots",
                &count.to_string(),
                "--cluster-yes",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let ok = load.await.unwrap();
    assert!(ok > 0);
    assert_ne!(cluster.owner(slot).0, from, "the slot did not move");
    let s = b.get("/", &[]).await.session();
    assert_eq!(
        s["n"],
        (7 + ok).to_string(),
        "increments lost during the reshard"
    );
    assert_eq!(
        b.get("/", &[("X-Session-Regenerate", "1")]).await.status,
        200
    );
    assert_eq!(b.get("/", &[]).await.session()["user"], "alice");
}

/// The first request after Redis was killed and restarted on the same port
/// succeeds — read, write and `/readyz` — instead of failing on the dead
/// connection the gateway still held (issue 15, item 2).
#[tokio::test(flavor = "multi_thread")]
async fn the_first_request_after_a_redis_restart_succeeds() {
    let mut r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&redis_yaml(&up, &store_for(&r, ""), ""));
    let c = client();
    let admin = g.admin.unwrap();
    for what in ["read", "write", "readyz"] {
        let mut b = Browser::new(&g);
        b.get("/", &[("X-Session-Set", "user=alice")]).await;
        assert_eq!(b.get("/", &[]).await.session()["user"], "alice");
        r.kill();
        r.restart();
        // Long enough for the old connection to be dead, not yet noticed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = match what {
            "read" => b.get("/", &[]).await.status,
            "write" => b.get("/", &[("X-Session-Set", "user=bob")]).await.status,
            _ => {
                send(&c, c.get(format!("http://{admin}/readyz")))
                    .await
                    .status
            }
        };
        assert_eq!(status, 200, "the first {what} after a restart failed");
    }
}

/// The write script is sent as `EVALSHA`; a server that lost it (restart,
/// failover, `SCRIPT FLUSH`) answers NOSCRIPT, and the gateway loads it and
/// runs the write once more: the request succeeds and is written once.
#[tokio::test(flavor = "multi_thread")]
async fn a_flushed_write_script_is_loaded_again() {
    let r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&redis_yaml(&up, &store_for(&r, ""), ""));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "n=1")]).await;
    for round in 0..3 {
        assert_eq!(r.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
        r.reset_stats();
        let resp = b.get("/", &[("X-Session-Incr", "n=1")]).await;
        assert_eq!(resp.status, 200, "round {round}");
        let s = r.commandstats();
        // One refused EVALSHA (counted or not, by Redis version), one
        // SCRIPT LOAD, one EVALSHA that ran; the count below says it ran
        // exactly once.
        assert!(
            matches!(s.get("evalsha"), Some(1 | 2)),
            "round {round}: {s:?}"
        );
        assert_eq!(s.get("script|load"), Some(&1), "round {round}: {s:?}");
        assert_eq!(
            b.get("/", &[]).await.session()["n"],
            (round + 2).to_string()
        );
    }
}

fn totals_yaml(up: &Upstream, r: &RedisServer, extra_session: &str) -> String {
    format!(
        "session:\n  secrets: [\"{SECRET}\"]\n  keys: {{ tk: {{ permanent: false }} }}\n{extra_session}store: {}\nroutes:\n  - name: app\n    upstreams: [\"{a}\"]\n",
        store_for(r, ", prefix: \"s:\""),
        a = up.addr
    )
}

/// The commands a write ran inside its script: everything but the
/// `EVALSHA` itself and what the same request without the directive (the
/// route's read) ran.
fn script_commands(
    write: &BTreeMap<String, u64>,
    read: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    let mut s = write.clone();
    assert_eq!(s.remove("evalsha"), Some(1), "one write: {write:?}");
    assert_eq!(read.get("evalsha"), None, "a read writes nothing: {read:?}");
    for (c, n) in read {
        let left = s.get(c).copied().unwrap_or(0).checked_sub(*n);
        let left = left.unwrap_or_else(|| panic!("{c}: write {write:?} read {read:?}"));
        s.insert(c.clone(), left);
    }
    s.retain(|_, n| *n > 0);
    s
}

/// Issue 11: the write script keeps running totals, so a one-key write
/// costs the same few commands in a 1-key and a 200-key session, under
/// every setting that adds to it (idle timeout: the TTL moves; revocation:
/// the ended check).
#[tokio::test(flavor = "multi_thread")]
async fn a_one_key_write_costs_the_same_whatever_the_sessions_size() {
    let many: Vec<String> = (0..200).map(|i| format!("k{i}=v{i}")).collect();
    let many = many.join("&");
    for (extra, at_most) in [
        ("  regenerate_grace: 0s\n", 3),
        ("", 4),
        ("  idle_timeout: 30m\n", 4),
        ("  revocation: true\n", 4),
        ("  idle_timeout: 30m\n  revocation: true\n", 4),
    ] {
        let r = RedisServer::start();
        let up = Upstream::start();
        let g = Gateway::start(&totals_yaml(&up, &r, extra));
        let mut small = Browser::new(&g);
        small.get("/", &[("X-Session-Set", "user=alice")]).await;
        let mut big = Browser::new(&g);
        big.get("/", &[("X-Session-Set", &many)]).await;
        big.get("/", &[("X-Session-Set", "user=alice")]).await;
        assert_eq!(big.get("/", &[]).await.session().len(), 201, "{extra}");
        let mut seen = Vec::new();
        for (name, b) in [("1 key", &mut small), ("201 keys", &mut big)] {
            let mut per = Vec::new();
            for d in [
                ("X-Session-Set", "user=bob"),     // replaces, other size
                ("X-Session-Set", "new=1"),        // adds a key
                ("X-Session-Incr", "n=5"),         // adds by Incr
                ("X-Session-Delete", "new"),       // removes a key
                ("X-Session-Set", "tk=transient"), // another channel
            ] {
                r.reset_stats();
                b.get("/", &[]).await;
                let read = r.commandstats();
                r.reset_stats();
                assert_eq!(b.get("/", &[d]).await.status, 200, "{extra}{d:?}");
                let s = script_commands(&r.commandstats(), &read);
                let n: u64 = s.values().sum();
                println!("{extra:?} {name} {d:?}: {n} commands {s:?}");
                // A Delete also runs its HDEL; a transient key also
                // updates the totals in the p hash.
                let bound = match d {
                    ("X-Session-Delete", _) => at_most + 1,
                    (_, "tk=transient") => at_most + 3,
                    _ => at_most,
                };
                assert!(n <= bound, "{extra:?} {name} {d:?}: {s:?}");
                per.push(s);
            }
            seen.push(per);
        }
        assert_eq!(seen[0], seen[1], "{extra:?}: the same for 1 and 201 keys");
        // The limits still count the whole session.
        let s = big.get("/", &[]).await.session();
        assert_eq!((s["user"].as_str(), s["n"].as_str()), ("bob", "5"));
        assert_eq!(s.get("new"), None);
    }
}

/// The totals a session's p hash carries against a recount of its hashes,
/// and every hash's TTL against the session's expiry.
fn check_totals(r: &RedisServer, id: &str) {
    let keys = r.keys(&format!("s:*:{id}:*"));
    let hashes: Vec<&String> = keys
        .iter()
        .filter(|k| {
            ["p", "t", "sp", "st"]
                .iter()
                .any(|c| k.ends_with(&format!(":{c}")))
        })
        .collect();
    let mut want = [0u64; 8];
    let mut ttls = Vec::new();
    for h in &hashes {
        let c = ["p", "t", "sp", "st"]
            .iter()
            .position(|c| h.ends_with(&format!(":{c}")))
            .unwrap();
        let fields: Vec<String> = r
            .cli(&["HKEYS", h])
            .lines()
            .filter(|l| !l.is_empty() && *l != "#")
            .map(String::from)
            .collect();
        for f in &fields {
            let len: u64 = r.cli(&["HSTRLEN", h, f]).trim().parse().unwrap();
            want[2 * c] += 1;
            want[2 * c + 1] += f.len() as u64 + len;
        }
        assert!(!fields.is_empty() || c == 0, "an empty hash {h}");
        ttls.push(r.cli(&["PEXPIRETIME", h]).trim().parse::<i64>().unwrap());
    }
    if hashes.is_empty() {
        return;
    }
    let p = hashes
        .iter()
        .find(|h| h.ends_with(":p"))
        .expect("the p hash holds the totals");
    let tot = r.cli(&["HGET", p, "#"]);
    let got: Vec<u64> = tot.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(got.len(), 9, "{tot}");
    assert_eq!(got[1..], want[..], "totals of {id}");
    assert!(want.iter().step_by(2).sum::<u64>() > 0, "totals of nothing");
    for t in ttls {
        assert_eq!(t as u64, got[0], "a hash's TTL is the session's expiry");
    }
}

/// Issue 11: whatever sequence of directives a session sees, its running
/// totals equal a recount and each hash expires with the session: Set,
/// Delete, Incr, a cleared transient channel (browser closed), Regenerate,
/// a sliding expiry, and the last key deleted.
#[tokio::test(flavor = "multi_thread")]
async fn running_totals_match_a_recount_after_every_write() {
    let r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&totals_yaml(&up, &r, "  idle_timeout: 30m\n"));
    let mut b = Browser::new(&g);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let names = ["a", "b", "c", "tk"];
    for step in 0..120 {
        let k = names[next(names.len() as u64) as usize];
        let v = "x".repeat(next(40) as usize);
        let d = match next(10) {
            0..=3 => ("X-Session-Set", format!("{k}={v}")),
            4 => ("X-Session-Delete", k.to_string()),
            5 => ("X-Session-Delete", "n".to_string()),
            6..=7 => ("X-Session-Incr", format!("n={}", next(1000))),
            8 => ("X-Session-Regenerate", "1".to_string()),
            _ => {
                // The browser closes: its transient cookie is gone, and the
                // next transient write starts that channel afresh.
                b.jar.cookies.remove("gimlet-t");
                ("X-Session-Set", format!("tk={v}"))
            }
        };
        let resp = b.get("/", &[(d.0, d.1.as_str())]).await;
        assert_eq!(resp.status, 200, "step {step} {d:?}: {}", resp.body);
        if let Some(id) = b.get("/", &[]).await.got_header("x-session-id") {
            check_totals(&r, &id);
        }
    }
    // Every key deleted: no hash is left, not even the totals.
    let id = b.get("/", &[]).await.got_header("x-session-id").unwrap();
    b.get("/", &[("X-Session-Delete", "a,b,c,tk,n")]).await;
    assert!(b.get("/", &[]).await.session().is_empty());
    let left: Vec<String> = r
        .keys(&format!("s:*:{id}:*"))
        .into_iter()
        .filter(|k| !k.ends_with(":f"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A session written before the totals existed (no `#` field) is counted
/// at its next write, exactly, and keeps totals from then on.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_without_totals_are_counted_at_their_next_write() {
    let r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&totals_yaml(&up, &r, "  limits: { keys: 4 }\n"));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "a=1&b=2&tk=3")]).await;
    let id = b.get("/", &[]).await.got_header("x-session-id").unwrap();
    let p = r.keys(&format!("s:*:{id}:p")).pop().unwrap();
    assert_eq!(r.cli(&["HDEL", &p, "#"]).trim(), "1");
    // 3 keys + 2 > 4: refused, so the 3 were counted.
    let resp = b.get("/", &[("X-Session-Set", "c=1&d=2")]).await;
    assert_eq!(resp.status, 502);
    assert!(resp.body.contains("too_many_keys"), "{}", resp.body);
    assert_eq!(
        r.cli(&["HEXISTS", &p, "#"]).trim(),
        "0",
        "refused: untouched"
    );
    assert_eq!(b.get("/", &[("X-Session-Set", "c=1")]).await.status, 200);
    check_totals(&r, &id);
    assert_eq!(b.get("/", &[]).await.session().len(), 4);
}

/// Review finding: a Delete of a channel's last key and a Set in the same
/// channel in one response. Redis drops the hash with its last field, so
/// the Set makes a new hash, which needs its TTL even though the session's
/// expiry did not move.
#[tokio::test(flavor = "multi_thread")]
async fn a_hash_emptied_and_refilled_in_one_write_keeps_its_ttl() {
    let r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&totals_yaml(&up, &r, ""));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice&tk=1")]).await;
    let id = b.get("/", &[]).await.got_header("x-session-id").unwrap();
    let resp = b
        .get(
            "/",
            &[("X-Session-Delete", "tk"), ("X-Session-Set", "tk=2")],
        )
        .await;
    assert_eq!(resp.status, 200);
    check_totals(&r, &id);
    let t = r.keys(&format!("s:*:{id}:t")).pop().expect("the t hash");
    let ttl: i64 = r.cli(&["PTTL", &t]).trim().parse().unwrap();
    assert!(ttl > 0, "the refilled t hash has no TTL ({ttl})");
}

/// Review finding: a gateway from before the totals (a rolling upgrade)
/// writes the p hash without updating them. The next write notices (the
/// field count differs) and counts again, so limits stay exact and no key
/// the other gateway wrote is lost.
#[tokio::test(flavor = "multi_thread")]
async fn keys_written_without_the_totals_are_counted_again() {
    let r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&totals_yaml(&up, &r, "  limits: { keys: 3 }\n"));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "a=1")]).await;
    let id = b.get("/", &[]).await.got_header("x-session-id").unwrap();
    let p = r.keys(&format!("s:*:{id}:p")).pop().unwrap();
    // What an older gateway's script does: HSET, no totals.
    assert_eq!(r.cli(&["HSET", &p, "b", "2", "c", "3"]).trim(), "2");
    // 3 keys now: a fourth is refused, so b and c were counted.
    let resp = b.get("/", &[("X-Session-Set", "d=4")]).await;
    assert_eq!(resp.status, 502, "{}", resp.body);
    assert!(resp.body.contains("too_many_keys"), "{}", resp.body);
    // Deleting the key this gateway knew of leaves the other two.
    assert_eq!(b.get("/", &[("X-Session-Delete", "a")]).await.status, 200);
    let s = b.get("/", &[]).await.session();
    assert_eq!(
        (
            s.get("b").map(String::as_str),
            s.get("c").map(String::as_str)
        ),
        (Some("2"), Some("3"))
    );
    check_totals(&r, &id);
}
