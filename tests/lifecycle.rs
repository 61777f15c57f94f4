//! Lifetimes, restarts, key rotation and the embedded store.

mod common;
use common::*;
use std::time::Duration;

fn yaml(up: &Upstream, secrets: &[&str], session: &str, store: &str) -> String {
    let list: Vec<String> = secrets.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "session:\n  secrets: [{}]\n{session}store: {store}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n",
        list.join(", "),
        up.addr
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_store_survives_a_restart() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let store = "{ kind: embedded, path: sessions.redb }";
    let mut g = Gateway::start_in(dir.path(), &yaml(&up, &[SECRET], "", store));
    let mut b = Browser::new(&g);
    b.get(
        "/",
        &[("X-Session-Set", "user=alice"), ("X-Session-Incr", "n=41")],
    )
    .await;
    b.get("/", &[("X-Session-Incr", "n=1")]).await;
    let id = b.get("/", &[]).await.got_header("x-session-id").unwrap();
    g.stop();
    assert!(dir.path().join("sessions.redb").exists());

    let g = Gateway::start_in(dir.path(), &yaml(&up, &[SECRET], "", store));
    b.base = format!("http://{}", g.addr);
    let r = b.get("/", &[]).await;
    assert_eq!(r.got_header("x-session-id").unwrap(), id);
    let s = r.session();
    assert_eq!(s["user"], "alice");
    assert_eq!(s["n"], "42");
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_store_parallel_writes_and_destroy() {
    let up = Upstream::start();
    let g = Gateway::start(&yaml(&up, &[SECRET], "", "{ kind: embedded }"));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "start=1")]).await;
    let urls = (0..50)
        .map(|i| {
            let set = format!("k{i}={i}");
            format!(
                "{}{}",
                b.base,
                path_with("/", &[("X-Session-Set", &set), ("X-Session-Incr", "n=1")])
            )
        })
        .collect();
    all_at_once(urls, &b.jar.header()).await;
    let s = b.get("/", &[]).await.session();
    for i in 0..50 {
        assert_eq!(s.get(&format!("k{i}")), Some(&i.to_string()), "k{i} lost");
    }
    assert_eq!(s["n"], "50");
    let old = b.jar.clone();
    b.get("/", &[("X-Session-Destroy", "1")]).await;
    let mut replay = Browser::new(&g);
    replay.jar = old;
    assert!(replay.get("/", &[]).await.session().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn key_rotation_across_restarts() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let store = "{ kind: embedded, path: s.redb }";
    let session = "  keys: { cart: { clientside: true } }\n";
    let mut g = Gateway::start_in(dir.path(), &yaml(&up, &[SECRET], session, store));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice&cart=pear")])
        .await;
    let old_cookie = b.jar.get("gimlet").unwrap().to_string();
    g.stop();

    // New secret first, old one still verifies: accepted and re-issued.
    let mut g = Gateway::start_in(dir.path(), &yaml(&up, &[SECRET2, SECRET], session, store));
    b.base = format!("http://{}", g.addr);
    let r = b.get("/", &[]).await;
    assert_eq!(r.session()["user"], "alice");
    assert_eq!(r.session()["cart"], "pear");
    assert_eq!(
        r.session_cookies().len(),
        1,
        "not re-issued under the new secret"
    );
    let new_cookie = b.jar.get("gimlet").unwrap().to_string();
    assert_ne!(new_cookie, old_cookie);
    // Once re-issued, no more Set-Cookie.
    assert!(b.get("/", &[]).await.set_cookies.is_empty());
    g.stop();

    // The old secret retired: the re-issued cookie works, the old one does not.
    let g = Gateway::start_in(dir.path(), &yaml(&up, &[SECRET2], session, store));
    b.base = format!("http://{}", g.addr);
    assert_eq!(b.get("/", &[]).await.session()["user"], "alice");
    let stale = Browser::new(&g);
    let r = stale
        .get_with("/", &[], &[("cookie", &format!("gimlet={old_cookie}"))])
        .await;
    assert_eq!(r.got_header("x-session-id"), None);
    assert_eq!(
        g.metric("gimlet_cookies_rejected_total{reason=\"unknown_key\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn absolute_lifetime_of_a_few_seconds() {
    let up = Upstream::start();
    let g = Gateway::start(&yaml(
        &up,
        &[SECRET],
        "  lifetime: 2s\n",
        "{ kind: memory }",
    ));
    let mut b = Browser::new(&g);
    let r = b.get("/", &[("X-Session-Set", "user=alice")]).await;
    assert!(
        r.set_cookies[0].contains("Max-Age=2;"),
        "{}",
        r.set_cookies[0]
    );
    let r = b.get("/", &[]).await;
    let created: u64 = r.got_header("x-session-created").unwrap().parse().unwrap();
    let expires: u64 = r.got_header("x-session-expires").unwrap().parse().unwrap();
    assert_eq!(expires - created, 2);
    // Writes do not extend an absolute lifetime.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    b.get("/", &[("X-Session-Set", "more=1")]).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = b.get("/", &[]).await;
    assert_eq!(
        r.got_header("x-session-id"),
        None,
        "expired session still forwarded"
    );
    assert!(r
        .set_cookies
        .iter()
        .any(|c| c.starts_with("gimlet=;") && c.contains("Max-Age=0")));
    let m = g.metrics().await;
    assert_eq!(
        metric_value(&m, "gimlet_sessions_total{event=\"expired\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "gimlet_cookies_rejected_total{reason=\"expired\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_with_touch() {
    let up = Upstream::start();
    let g = Gateway::start(&yaml(
        &up,
        &[SECRET],
        "  idle_timeout: 2s\n  touch_interval: 500ms\n",
        "{ kind: memory }",
    ));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice")]).await;
    // Requests within the touch interval: no Set-Cookie.
    assert!(b.get("/", &[]).await.set_cookies.is_empty());
    // Keep it alive past the idle timeout by touching it.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let r = b.get("/", &[]).await;
        assert_eq!(r.session()["user"], "alice", "session died while in use");
        assert_eq!(r.session_cookies().len(), 1, "a touch re-issues the cookie");
    }
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let r = b.get("/", &[]).await;
    assert_eq!(
        r.got_header("x-session-id"),
        None,
        "idle session still alive"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn store_ttl_follows_the_session() {
    // The store forgets data when the session ends: a replayed cookie past
    // its expiry is refused, and the data is gone from the store too.
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let g = Gateway::start_in(
        dir.path(),
        &yaml(
            &up,
            &[SECRET],
            "  lifetime: 1s\n",
            "{ kind: embedded, path: s.redb }",
        ),
    );
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice")]).await;
    assert_eq!(b.get("/", &[]).await.session()["user"], "alice");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(b.get("/", &[]).await.session().is_empty());
}
