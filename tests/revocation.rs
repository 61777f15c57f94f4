//! `session.revocation: true` (SPEC section 5): a copy of a cookie taken
//! before a logout, a login (Regenerate) or an idle timeout is no session
//! afterwards — its clientside values included — on every store.

mod common;
use common::*;
use std::time::Duration;

/// `user` lives in the cookie only; `cart` in the store.
fn yaml(up: &Upstream, store: &str, extra: &str) -> String {
    format!(
        "session:\n  secrets: [\"{SECRET}\"]\n  revocation: true\n  keys: {{ user: {{ clientside: true }}, cart: {{ clientside: false }} }}\n{extra}store: {store}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n",
        up.addr
    )
}

/// A copy of a victim's cookies, used by the same browser (a parallel
/// request) or by somebody else (another `User-Agent`).
fn thief(victim: &Browser) -> Browser {
    Browser {
        c: client(),
        jar: victim.jar.clone(),
        base: victim.base.clone(),
    }
}

/// Somebody else holding a copy of `victim`'s session cookie (not its
/// browser binding cookie, which a regenerate grace is bound to).
fn other(victim: &Browser) -> Browser {
    Browser {
        c: client(),
        jar: victim.jar.without_binding(),
        base: victim.base.clone(),
    }
}

/// A request from somebody else holding `b`'s cookies.
async fn stolen(b: &Browser, path: &str, directives: &[(&str, &str)]) -> Resp {
    b.get_with(path, directives, &[("user-agent", "thief/1.0")])
        .await
}

/// The id and keys the app saw.
fn seen(r: &Resp) -> (Option<String>, Vec<String>) {
    assert_eq!(r.status, 200, "{}", r.body);
    (
        r.got_header("x-session-id"),
        r.session().into_keys().collect(),
    )
}

async fn copies_die_with_their_session(store: &str, label: &str) {
    let up = Upstream::start();
    let g = Gateway::start(&yaml(&up, store, ""));
    for (ends, directive) in [
        ("Destroy", ("X-Session-Destroy", "1")),
        ("Regenerate", ("X-Session-Regenerate", "1")),
    ] {
        // A cookie-only login, and one with store data.
        for keys in ["user=alice", "user=alice&cart=3"] {
            let case = format!("{label}, {ends}, {keys}");
            let mut victim = Browser::new(&g);
            victim.get("/login", &[("X-Session-Set", keys)]).await;
            let copy = other(&victim);
            let (id, before) = seen(&stolen(&copy, "/", &[]).await);
            assert!(
                id.is_some() && before.contains(&"user".to_string()),
                "{case}"
            );
            let r = victim.get("/out", &[directive]).await;
            assert_eq!(r.status, 200, "{case}: {}", r.body);
            // The copy is no session: no id, no clientside value, no data
            // (within the regenerate grace too: it is not the victim's browser).
            let r = stolen(&copy, "/", &[]).await;
            assert_eq!(seen(&r), (None, vec![]), "{case}: the copy still works");
            // ... and it cannot write its way back in.
            let r = stolen(&copy, "/", &[("X-Session-Set", "cart=9")]).await;
            let new_id = seen(&r).0;
            assert_ne!(new_id, id, "{case}");
            // The victim is logged out, or keeps the regenerated session.
            let (vid, vkeys) = seen(&victim.get("/", &[]).await);
            if ends == "Destroy" {
                assert_eq!((vid, vkeys), (None, vec![]), "{case}");
            } else {
                assert!(vid.is_some() && vid != id, "{case}");
                assert!(vkeys.contains(&"user".to_string()), "{case}: {vkeys:?}");
            }
        }
    }
    assert!(
        g.metric("gimlet_revocation_checks_total{result=\"ended\"}")
            .await
            >= 8.0
    );
    assert_eq!(
        g.metric("gimlet_revocation_checks_total{result=\"error\"}")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copied_cookie_is_no_session_after_logout_or_login_on_every_store() {
    copies_die_with_their_session("{ kind: memory }", "memory").await;
    copies_die_with_their_session("{ kind: embedded }", "embedded").await;
    let r = RedisServer::start();
    let redis = format!("{{ kind: redis, url: \"{}\", timeout: 500ms }}", r.url());
    copies_die_with_their_session(&redis, "redis").await;
    let cluster = Cluster::start();
    copies_die_with_their_session(&cluster.store(), "cluster").await;
}

/// A thief who keeps the copy busy cannot keep the session alive past the
/// victim's idle timeout: the victim's idle cookie ends the id.
#[tokio::test(flavor = "multi_thread")]
async fn idle_expiry_ends_every_copy() {
    let r = RedisServer::start();
    let redis = format!("{{ kind: redis, url: \"{}\", timeout: 500ms }}", r.url());
    for store in ["{ kind: memory }", "{ kind: embedded }", redis.as_str()] {
        let up = Upstream::start();
        let g = Gateway::start(&yaml(
            &up,
            store,
            "  idle_timeout: 2s\n  touch_interval: 500ms\n",
        ));
        let mut victim = Browser::new(&g);
        victim
            .get("/login", &[("X-Session-Set", "user=alice&cart=1")])
            .await;
        let mut copy = thief(&victim);
        let (id, _) = seen(&copy.get("/", &[]).await);
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert_eq!(seen(&copy.get("/", &[]).await).0, id, "{store}");
        }
        // The victim comes back after 3 s: idle, and that ends the id.
        let r = victim.get("/", &[]).await;
        assert_eq!(seen(&r), (None, vec![]), "{store}");
        assert!(r.set_cookies.iter().all(|c| c.contains("Max-Age=0")));
        let r = copy.get("/", &[]).await;
        assert_eq!(seen(&r), (None, vec![]), "{store}: the busy copy lives on");
    }
}

/// A request that read the session before a logout cannot write it after.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_racing_a_logout_is_refused() {
    let r = RedisServer::start();
    let redis = format!("{{ kind: redis, url: \"{}\", timeout: 500ms }}", r.url());
    for store in ["{ kind: memory }", "{ kind: embedded }", redis.as_str()] {
        let up = Upstream::start();
        let g = Gateway::start(&yaml(&up, store, ""));
        let mut victim = Browser::new(&g);
        victim.get("/login", &[("X-Session-Set", "cart=1")]).await;
        let copy = thief(&victim);
        let slow = tokio::spawn(async move {
            copy.get_with(
                "/slow?sleep_ms=700",
                &[("X-Session-Set", "cart=2"), ("X-Session-Regenerate", "1")],
                &[],
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        victim.get("/out", &[("X-Session-Destroy", "1")]).await;
        let r = slow.await.unwrap();
        assert_eq!(r.status, 502, "{store}: {}", r.body);
        assert!(r.body.contains("(session_ended)"), "{}", r.body);
        assert!(r.set_cookies.is_empty(), "{store}: {:?}", r.set_cookies);
        assert_eq!(
            g.metric("gimlet_directive_errors_total{reason=\"session_ended\"}")
                .await,
            1.0
        );
    }
    let stale: Vec<String> = r
        .keys("gimlet:*")
        .into_iter()
        .filter(|k| !k.ends_with(":x"))
        .collect();
    assert!(stale.is_empty(), "data left behind: {stale:?}");
}

/// One round trip per request that carries a session, the check and the
/// read pipelined; none without a cookie.
#[tokio::test(flavor = "multi_thread")]
async fn the_check_shares_the_read_round_trip() {
    let r = RedisServer::start();
    let up = Upstream::start();
    let redis = format!("{{ kind: redis, url: \"{}\", timeout: 500ms }}", r.url());
    let g = Gateway::start(&yaml(&up, &redis, ""));
    let mut cookie_only = Browser::new(&g);
    cookie_only
        .get("/login", &[("X-Session-Set", "user=a")])
        .await;
    let mut stored = Browser::new(&g);
    stored.get("/login", &[("X-Session-Set", "cart=1")]).await;
    let reads = || g.metric("gimlet_store_operations_total{op=\"read\",result=\"ok\"}");
    let before = reads().await;
    r.reset_stats();
    Browser::new(&g).get("/", &[]).await;
    assert_eq!(reads().await, before, "no cookie, no check");
    cookie_only.get("/", &[]).await;
    stored.get("/", &[]).await;
    assert_eq!(reads().await, before + 2.0);
    let stats = r.commandstats();
    assert_eq!(stats.get("exists"), Some(&2), "{stats:?}");
    // The regenerate grace's forward, asked in the same pipeline.
    assert_eq!(stats.get("get"), Some(&2), "{stats:?}");
    // The cookie says only the permanent channel holds store data.
    assert_eq!(stats.get("hgetall"), Some(&1), "{stats:?}");
    assert_eq!(stats.len(), 3, "{stats:?}");
}

/// A failed check follows `store.on_error`: `fail` answers 503; `degrade`
/// forwards no session and applies no directive, and leaves the cookie be.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_check_follows_on_error() {
    let r = RedisServer::start();
    for on_error in ["fail", "degrade"] {
        let up = Upstream::start();
        let store = format!(
            "{{ kind: redis, url: \"{}\", timeout: 200ms, on_error: {on_error} }}",
            r.url()
        );
        let g = Gateway::start(&yaml(&up, &store, ""));
        let mut b = Browser::new(&g);
        b.get("/login", &[("X-Session-Set", "user=alice")]).await;
        let jar = b.jar.clone();
        r.pause();
        let plain = b.get("/", &[]).await;
        let write = b.get("/", &[("X-Session-Set", "user=mallory")]).await;
        r.resume();
        if on_error == "fail" {
            assert_eq!((plain.status, write.status), (503, 503));
        } else {
            assert_eq!(seen(&plain), (None, vec![]));
            assert_eq!(plain.got_header("x-session-degraded").as_deref(), Some("1"));
            assert_eq!(write.status, 502, "{}", write.body);
            assert!(write.body.contains("(store_unavailable)"));
        }
        assert!(plain.set_cookies.is_empty() && write.set_cookies.is_empty());
        assert_eq!(b.jar.cookies, jar.cookies);
        assert!(
            g.metric("gimlet_revocation_checks_total{result=\"error\"}")
                .await
                >= 2.0
        );
        // Back: the session was never lost.
        let (id, keys) = seen(&b.get("/", &[]).await);
        assert!(
            id.is_some() && keys == vec!["user".to_string()],
            "{on_error}"
        );
    }
}

/// A victim whose idle cookie meets a `require:` gate (answered by the
/// gateway, the app never called) still ends the id.
#[tokio::test(flavor = "multi_thread")]
async fn idle_expiry_on_a_gated_route_ends_every_copy() {
    let up = Upstream::start();
    let y = yaml(&up, "{ kind: memory }", "  idle_timeout: 2s\n  touch_interval: 500ms\n")
        .replace(
            "routes:\n",
            &format!(
                "routes:\n  - name: acct\n    match: {{ path_prefix: /account }}\n    upstreams: [\"{}\"]\n    session: {{ require: [user] }}\n",
                up.addr
            ),
        );
    let g = Gateway::start(&y);
    let mut victim = Browser::new(&g);
    victim
        .get("/login", &[("X-Session-Set", "user=alice&cart=1")])
        .await;
    let mut copy = thief(&victim);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(seen(&copy.get("/", &[]).await).0.is_some());
    }
    let r = victim.get("/account", &[]).await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = copy.get("/", &[]).await;
    assert_eq!(seen(&r), (None, vec![]), "the busy copy lives on");
}
