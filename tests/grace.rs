//! `session.regenerate_grace`: requests that left with the pre-login cookie
//! (a parallel XHR racing the login) continue as the new session for the
//! grace window, from the same client only; after it the old id is dead.

mod common;
use common::*;
use std::time::Duration;

fn yaml(up: &Upstream, store: &str, revocation: bool) -> String {
    format!(
        "session:\n  secrets: [\"{SECRET}\"]\n  dev_insecure: true\n  revocation: {revocation}\n  regenerate_grace: 2s\n  keys: {{ user: {{ clientside: true }}, cart: {{ clientside: false }}, n: {{ clientside: false }} }}\nstore: {store}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n",
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

    // Not for somebody else holding the old cookie (session fixation): the
    // forward is bound to the victim's browser binding cookie, which the
    // attacker who planted the session cookie does not have.
    assert!(before_login.jar.cookies.keys().any(|n| n.ends_with("-b")));
    let attacker = Browser {
        c: client(),
        jar: before_login.jar.without_binding(),
        base: victim.base.clone(),
    };
    let r = attacker.get_with("/", &[], &[]).await;
    let (id, keys) = id_and_keys(&r);
    assert_ne!(id, new_id, "{case}: a planted cookie was handed the login");
    assert!(
        !keys.contains_key("user") && !keys.contains_key("cart"),
        "{case}"
    );
    let r = attacker
        .get_with("/", &[("X-Session-Set", "cart=7")], &[])
        .await;
    if revocation {
        // The old id is no session: the write starts a fresh one.
        assert_eq!(id_and_keys(&r).0, None, "{case}");
        assert_eq!(r.session_cookies().len(), 1, "{case}");
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

/// A login over HTTPS is never continued over plain HTTP: a network
/// attacker who can make the victim's browser send a plain request with the
/// pre-login cookie (and even the binding's value) gets no session cookie
/// in the clear.
#[tokio::test(flavor = "multi_thread")]
async fn an_https_login_is_not_continued_over_http() {
    let up = Upstream::start();
    // A real HTTPS deployment (behind a trusted TLS proxy), not dev_insecure.
    let y = format!(
        "trusted_proxies: [127.0.0.1/32]\n{}",
        yaml(&up, "{ kind: memory }", true).replace("  dev_insecure: true\n", "")
    );
    let g = Gateway::start(&y);
    let https = [("x-forwarded-proto", "https")];
    let mut b = Browser::new(&g);
    let r = b
        .get_with("/", &[("X-Session-Set", "cart=1")], &https)
        .await;
    b.jar.update(&r);
    let binding = b
        .jar
        .get("__Host-gimlet-b")
        .expect("a binding over HTTPS")
        .to_string();
    let before = b.jar.clone();
    let r = b
        .get_with(
            "/login",
            &[
                ("X-Session-Regenerate", "1"),
                ("X-Session-Set", "user=alice"),
            ],
            &https,
        )
        .await;
    b.jar.update(&r);
    // Within the grace, the same browser over HTTPS follows ...
    let old = Browser {
        c: client(),
        jar: before.clone(),
        base: b.base.clone(),
    };
    let r = old.get_with("/", &[], &https).await;
    assert_eq!(r.session().get("user").map(String::as_str), Some("alice"));
    // ... but a plain-HTTP request with the old cookie does not, even with
    // the binding's value under its plain name.
    let mut jar = before.without_binding();
    jar.cookies.insert("gimlet-b".into(), binding);
    let plain = Browser {
        c: client(),
        jar,
        base: b.base.clone(),
    };
    let r = plain.get_with("/", &[], &[]).await;
    assert_eq!(r.status, 200);
    assert!(!r.session().contains_key("user"), "{:?}", r.session());
    assert!(
        r.set_cookies.iter().all(|c| !c.starts_with("gimlet=")),
        "{:?}",
        r.set_cookies
    );
}

/// With revocation, a racing request whose keys all live in the cookie
/// (no store write of its own) also lands in the new session instead of
/// setting the old cookie over the login's.
#[tokio::test(flavor = "multi_thread")]
async fn a_clientside_write_racing_a_login_follows_it() {
    let up = Upstream::start();
    let y = yaml(&up, "{ kind: memory }", true)
        .replace("cart: { clientside: false }", "cart: { clientside: true }");
    let g = Gateway::start(&y);
    let mut victim = Browser::new(&g);
    victim.get("/", &[("X-Session-Set", "cart=1")]).await;
    let xhr = copy_of(&victim);
    let racing = tokio::spawn(async move {
        xhr.get_with("/xhr?sleep_ms=600", &[("X-Session-Set", "cart=2")], &[])
            .await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    victim
        .get(
            "/login",
            &[
                ("X-Session-Regenerate", "1"),
                ("X-Session-Set", "user=alice"),
            ],
        )
        .await;
    let (new_id, _) = id_and_keys(&victim.get("/", &[]).await);
    let r = racing.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // The browser stores the racing response's cookie last: it must be
    // the logged-in session, with the racing write in it.
    victim.jar.update(&r);
    let (id, keys) = id_and_keys(&victim.get("/", &[]).await);
    assert_eq!(id, new_id, "the login was lost");
    assert_eq!(keys.get("user").map(String::as_str), Some("alice"));
    assert_eq!(keys.get("cart").map(String::as_str), Some("2"));
}

/// Two binding cookies (the browser's and one planted beside it): neither
/// is trusted, so nothing follows.
#[tokio::test(flavor = "multi_thread")]
async fn two_binding_cookies_bind_nothing() {
    let up = Upstream::start();
    let g = Gateway::start(&yaml(&up, "{ kind: memory }", false));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "cart=1")]).await;
    let before = b.jar.clone();
    let binding = before.get("gimlet-b").expect("a binding").to_string();
    b.get(
        "/login",
        &[
            ("X-Session-Regenerate", "1"),
            ("X-Session-Set", "user=alice"),
        ],
    )
    .await;
    let bare = Browser {
        c: client(),
        jar: Jar::default(),
        base: b.base.clone(),
    };
    let header = format!("{}; gimlet-b={}", before.header(), "0".repeat(32));
    let r = bare.get_with("/", &[], &[("cookie", &header)]).await;
    assert_eq!(r.status, 200);
    assert!(
        !r.session().contains_key("user"),
        "followed with two bindings"
    );
    // The browser's own binding alone follows.
    let header = before.header();
    assert!(header.contains(&binding));
    let r = bare.get_with("/", &[], &[("cookie", &header)]).await;
    assert_eq!(r.session().get("user").map(String::as_str), Some("alice"));
}
