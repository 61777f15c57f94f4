//! `session.regenerate_grace`: requests that left with the pre-login cookie
//! (a parallel XHR racing the login) continue as the new session for the
//! grace window, from the same client only; after it the old id is dead.

mod common;
use common::*;
use std::time::Duration;

fn yaml(up: &Upstream, store: &str, revocation: bool) -> String {
    format!(
        "session:\n  secrets: [\"{SECRET}\"]\n  revocation: {revocation}\n  regenerate_grace: 2s\n  keys: {{ user: {{ clientside: true }}, cart: {{ clientside: false }}, n: {{ clientside: false }} }}\nstore: {store}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n",
        up.addr
    )
}

fn copy_of(b: &Browser) -> Browser {
    Browser {
        c: client(),
        jar: b.jar.clone(),
        base: b.base.clone(),
    }
}

#[track_caller]
fn id_and_keys(r: &Resp) -> (Option<String>, std::collections::BTreeMap<String, String>) {
    assert_eq!(r.status, 200, "{}", r.body);
    (r.got_header("x-session-id"), r.session())
}

async fn racing_requests_land_in_the_new_session(store: &str, revocation: bool) {
    let case = format!("{store}, revocation {revocation}");
    let up = Upstream::start();
    let g = Gateway::start(&yaml(&up, store, revocation));
    let mut victim = Browser::new(&g);
    victim.get("/", &[("X-Session-Set", "cart=1")]).await;
    let (old_id, _) = id_and_keys(&victim.get("/", &[]).await);
    let before_login = copy_of(&victim);

    // An XHR that left before the login and writes after it.
    let xhr = copy_of(&victim);
    let racing = tokio::spawn(async move {
        xhr.get_with("/xhr?sleep_ms=700", &[("X-Session-Incr", "n=1")], &[])
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let login = victim
        .get(
            "/login",
            &[
                ("X-Session-Regenerate", "1"),
                ("X-Session-Set", "user=alice"),
            ],
        )
        .await;
    assert_eq!(login.status, 200, "{case}: {}", login.body);
    let (new_id, _) = id_and_keys(&victim.get("/", &[]).await);
    assert!(new_id.is_some() && new_id != old_id, "{case}");

    // Its write landed in the new session, and it was given the new cookie.
    let r = racing.await.unwrap();
    assert_eq!(r.status, 200, "{case}: {}", r.body);
    let mut jar = before_login.jar.clone();
    jar.update(&r);
    let mut after = Browser {
        c: client(),
        jar,
        base: victim.base.clone(),
    };
    let (id, keys) = id_and_keys(&after.get("/", &[]).await);
    assert_eq!(id, new_id, "{case}: the racing response's cookie");
    assert_eq!(
        keys.get("user").map(String::as_str),
        Some("alice"),
        "{case}"
    );
    let (_, keys) = id_and_keys(&victim.get("/", &[]).await);
    assert_eq!(
        keys.get("n").map(String::as_str),
        Some("1"),
        "{case}: {keys:?}"
    );
    assert_eq!(keys.get("cart").map(String::as_str), Some("1"), "{case}");

    // A request that arrives later with the old cookie reads the new
    // session (its clientside values included) and gets its cookie.
    let r = before_login.get_with("/", &[], &[]).await;
    let (id, keys) = id_and_keys(&r);
    assert_eq!(id, new_id, "{case}");
    assert_eq!(
        keys.get("user").map(String::as_str),
        Some("alice"),
        "{case}"
    );
    assert!(!r.set_cookies.is_empty(), "{case}: no new cookie");

    // Not for somebody else holding the old cookie (session fixation).
    let r = before_login
        .get_with("/", &[], &[("user-agent", "attacker/1.0")])
        .await;
    let (id, keys) = id_and_keys(&r);
    assert_ne!(id, new_id, "{case}: a planted cookie was handed the login");
    assert!(
        !keys.contains_key("user") && !keys.contains_key("cart"),
        "{case}"
    );
    let r = before_login
        .get_with(
            "/",
            &[("X-Session-Set", "cart=7")],
            &[("user-agent", "attacker/1.0")],
        )
        .await;
    if revocation {
        // The old id is no session: the write starts a fresh one.
        assert_eq!(id_and_keys(&r).0, None, "{case}");
        assert_eq!(r.set_cookies.len(), 1, "{case}");
    } else {
        // Its write to the old id is refused whole: that login is not its own.
        assert_eq!(r.status, 502, "{case}: {}", r.body);
        assert!(
            r.body.contains("(session_ended)") && r.set_cookies.is_empty(),
            "{case}"
        );
    }

    // After the grace the old id is dead: no data; with revocation, no session.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (id, keys) = id_and_keys(&before_login.get_with("/", &[], &[]).await);
    assert!(
        !keys.contains_key("cart") && !keys.contains_key("n"),
        "{case}"
    );
    if revocation {
        assert_eq!(id, None, "{case}");
    } else {
        assert_eq!(id, old_id, "{case}");
    }
    let (_, keys) = id_and_keys(&victim.get("/", &[]).await);
    assert_eq!(keys.get("cart").map(String::as_str), Some("1"), "{case}");
    assert!(g.metric("gimlet_sessions_total{event=\"followed\"}").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_racing_a_login_continue_as_the_new_session_on_every_store() {
    let r = RedisServer::start();
    let redis = format!("{{ kind: redis, url: \"{}\", timeout: 500ms }}", r.url());
    for store in ["{ kind: memory }", "{ kind: embedded }", redis.as_str()] {
        for revocation in [false, true] {
            racing_requests_land_in_the_new_session(store, revocation).await;
        }
    }
    let cluster = Cluster::start();
    racing_requests_land_in_the_new_session(&cluster.store(), true).await;
}

/// `regenerate_grace: 0s`: the old cookie never follows.
#[tokio::test(flavor = "multi_thread")]
async fn no_grace_no_follow() {
    let up = Upstream::start();
    let y = yaml(&up, "{ kind: memory }", false).replace("2s", "0s");
    let g = Gateway::start(&y);
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "cart=1")]).await;
    let old = copy_of(&b);
    b.get("/login", &[("X-Session-Regenerate", "1")]).await;
    let (id, keys) = id_and_keys(&old.get_with("/", &[], &[]).await);
    assert!(id.is_some() && !keys.contains_key("cart"));
    assert_ne!(id, id_and_keys(&b.get("/", &[]).await).0);
}
