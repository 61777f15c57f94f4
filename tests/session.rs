//! End-to-end session behaviour: the gateway binary in front of an echoing
//! upstream (see tests/common).

mod common;
use common::*;

const MEM: &str = "{ kind: memory }";

fn gw(session: &str, store: &str, route: &str) -> (Upstream, Gateway) {
    let up = Upstream::start();
    let g = Gateway::start(&config(&up, session, store, route));
    (up, g)
}

fn has_no_session_headers(r: &Resp) {
    for (n, _) in r.got() {
        assert!(
            !n.starts_with("x-session") || n == "x-session-secure",
            "upstream got {n}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lazy_start_then_set_forward_and_no_rewrite() {
    let (up, g) = gw("", MEM, "");
    let mut b = Browser::new(&g);

    // No cookie: no session headers, no Set-Cookie, no store I/O.
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200);
    has_no_session_headers(&r);
    assert!(r.set_cookies.is_empty());
    assert_eq!(
        g.metric("gimlet_store_operations_total{op=\"read\",result=\"ok\"}")
            .await,
        0.0
    );

    // First write: a cookie, private caching, directives hidden.
    let r = b
        .get("/login", &[("X-Session-Set", "user=alice&role=admin")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.session_cookies().len(), 1, "{:?}", r.set_cookies);
    let c = &r.set_cookies[0];
    assert!(c.starts_with("gimlet="), "{c}");
    for attr in [
        "HttpOnly",
        "Path=/",
        "SameSite=Lax",
        "Max-Age=604800",
        "Expires=",
    ] {
        assert!(c.contains(attr), "{attr} missing in {c}");
    }
    assert!(!c.contains("Secure"), "{c}");
    assert_eq!(r.header("cache-control"), Some("private"));
    assert!(r.header("vary").unwrap().contains("Cookie"));
    assert!(
        r.headers.iter().all(|(n, _)| !n.starts_with("x-session")),
        "{:?}",
        r.headers
    );

    // Next request: the session reaches the upstream.
    let r = b.get("/page", &[]).await;
    let id = r.got_header("x-session-id").unwrap();
    assert_eq!(id.len(), 32);
    assert!(id
        .bytes()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    let created: u64 = r.got_header("x-session-created").unwrap().parse().unwrap();
    let expires: u64 = r.got_header("x-session-expires").unwrap().parse().unwrap();
    assert_eq!(expires - created, 7 * 86400);
    assert_eq!(r.got_header("x-session").unwrap(), "role=admin&user=alice");
    // Read-only request without an idle timeout: no Set-Cookie at all.
    assert!(r.set_cookies.is_empty(), "{:?}", r.set_cookies);
    // Our cookie never reaches the upstream.
    assert_eq!(r.got_header("cookie"), None);
    assert_eq!(
        g.metric("gimlet_sessions_total{event=\"created\"}").await,
        1.0
    );
    assert_eq!(
        g.metric("gimlet_directives_total{directive=\"set\"}").await,
        2.0
    );
    assert!(up.hits.load(std::sync::atomic::Ordering::SeqCst) >= 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_cookies_are_new_visitors() {
    let (_up, g) = gw("", MEM, "");
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice")]).await;
    let good = b.jar.get("gimlet").unwrap().to_string();

    let mut flipped = good.clone().into_bytes();
    let mid = flipped.len() / 2;
    flipped[mid] = if flipped[mid] == b'A' { b'B' } else { b'A' };
    let cases = [
        (
            "flipped byte",
            format!("gimlet={}", String::from_utf8(flipped).unwrap()),
        ),
        ("truncated", format!("gimlet={}", &good[..good.len() - 10])),
        ("garbage", "gimlet=not-a-cookie!!".to_string()),
        ("empty", "gimlet=".to_string()),
        ("moved to another name", format!("gimlet-t={good}")),
        ("huge", format!("gimlet={}", "A".repeat(9000))),
    ];
    let stranger = Browser::new(&g);
    for (what, cookie) in &cases {
        let r = stranger.get_with("/", &[], &[("cookie", cookie)]).await;
        assert_eq!(r.status, 200, "{what}");
        assert_eq!(
            r.got_header("x-session-id"),
            None,
            "{what}: treated as a session"
        );
        assert!(r.session().is_empty(), "{what}");
        assert!(
            r.set_cookies.iter().any(|c| c.contains("Max-Age=0")),
            "{what}: the bad cookie is not cleared: {:?}",
            r.set_cookies
        );
    }
    let m = g.metrics().await;
    assert!(
        metric_value(&m, "gimlet_cookies_rejected_total{reason=\"bad_mac\"}") >= 2.0,
        "{m}"
    );
    assert!(
        metric_value(&m, "gimlet_cookies_rejected_total{reason=\"malformed\"}") >= 3.0,
        "{m}"
    );
    // The good cookie still works.
    let r = b.get("/", &[]).await;
    assert_eq!(r.session().get("user").unwrap(), "alice");
}

#[tokio::test(flavor = "multi_thread")]
async fn cookie_from_another_secret_is_unknown_key() {
    let (_u1, g1) = gw("", MEM, "");
    let up2 = Upstream::start();
    let g2 = Gateway::start(&config(&up2, "", MEM, "").replace(SECRET, SECRET2));
    let mut b1 = Browser::new(&g1);
    b1.get("/", &[("X-Session-Set", "user=alice")]).await;
    let mut b2 = Browser::new(&g2);
    b2.jar = b1.jar.clone();
    let r = b2.get("/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.got_header("x-session-id"), None);
    assert_eq!(
        g2.metric("gimlet_cookies_rejected_total{reason=\"unknown_key\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_headers_are_stripped() {
    let (_up, g) = gw(
        "  keys: { user: { clientside: true } }\n",
        MEM,
        "    session: { headers: { X-Remote-User: user } }\n",
    );
    let mut b = Browser::new(&g);
    let forged = [
        ("X-Session-Id", "0123456789abcdef0123456789abcdef"),
        ("x-session", "user=admin"),
        ("X_Session_User", "admin"),
        ("X-SESSION-SECURE", "1"),
        ("X-Remote-User", "admin"),
        ("X_Remote_User", "admin"),
        ("x-remote_user", "admin"),
        ("X-Forwarded-Proto", "https"),
        ("Cookie", "other=1; gimlet-t=forged; theme=dark"),
    ];
    let r = b.get_with("/", &[], &forged).await;
    assert_eq!(r.status, 200);
    let got = r.got();
    for (n, v) in &got {
        assert!(
            !n.starts_with("x-session"),
            "forged {n}: {v} reached the upstream"
        );
        assert!(
            !n.replace('_', "-").starts_with("x-remote-user"),
            "forged {n} reached the upstream"
        );
        assert!(!v.contains("admin"), "{n}: {v}");
    }
    assert_eq!(r.got_header("x-forwarded-proto").unwrap(), "http");
    assert_eq!(r.got_header("x-forwarded-for").unwrap(), "127.0.0.1");
    assert_eq!(r.got_header("cookie").unwrap(), "other=1; theme=dark");

    // With a real session, the mapped header carries the real value only.
    b.get("/", &[("X-Session-Set", "user=alice")]).await;
    let r = b
        .get_with(
            "/",
            &[],
            &[("X-Remote-User", "admin"), ("X-Forwarded-For", "10.0.0.1")],
        )
        .await;
    let users: Vec<_> = r
        .got()
        .into_iter()
        .filter(|(n, _)| n == "x-remote-user")
        .collect();
    assert_eq!(
        users,
        vec![("x-remote-user".to_string(), "alice".to_string())]
    );
    assert_eq!(
        r.got_header("x-forwarded-for").unwrap(),
        "10.0.0.1, 127.0.0.1"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_then_set_gives_a_new_session() {
    let (_up, g) = gw("  keys: { cart: { clientside: true } }\n", MEM, "");
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice&cart=apple")])
        .await;
    let old_jar = b.jar.clone();
    let old_id = b.get("/", &[]).await.got_header("x-session-id").unwrap();

    let r = b
        .get(
            "/logout",
            &[("X-Session-Destroy", "1"), ("X-Session-Set", "flash=bye")],
        )
        .await;
    assert_eq!(r.status, 200);
    let r = b.get("/", &[]).await;
    let new_id = r.got_header("x-session-id").unwrap();
    assert_ne!(new_id, old_id);
    assert_eq!(
        r.session().into_iter().collect::<Vec<_>>(),
        vec![("flash".into(), "bye".into())]
    );

    // Destroy alone clears the cookies.
    let r = b.get("/", &[("X-Session-Destroy", "1")]).await;
    assert!(
        r.set_cookies.iter().all(|c| c.contains("Max-Age=0")),
        "{:?}",
        r.set_cookies
    );
    assert!(!r.set_cookies.is_empty());
    // Only the browser binding cookie is left (it is the browser's, not
    // the session's).
    assert!(b.jar.without_binding().cookies.is_empty(), "{:?}", b.jar);
    assert_eq!(b.get("/", &[]).await.got_header("x-session-id"), None);

    // A replayed old cookie keeps its clientside values but no server data.
    let mut replay = Browser::new(&g);
    replay.jar = old_jar.without_binding();
    let r = replay.get("/", &[]).await;
    let s = r.session();
    assert_eq!(s.get("cart").map(String::as_str), Some("apple"));
    assert_eq!(s.get("user"), None, "server-side data survived Destroy");
    assert_eq!(
        g.metric("gimlet_sessions_total{event=\"destroyed\"}").await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn regenerate_moves_data_and_kills_the_old_id() {
    let (_up, g) = gw("  keys: { cart: { clientside: true } }\n", MEM, "");
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice&cart=pear")])
        .await;
    let r = b.get("/", &[]).await;
    let (old_id, created) = (
        r.got_header("x-session-id").unwrap(),
        r.got_header("x-session-created").unwrap(),
    );
    let old_jar = b.jar.clone();

    let r = b.get("/login", &[("X-Session-Regenerate", "1")]).await;
    assert_eq!(r.status, 200);
    assert!(!r.set_cookies.is_empty());
    let r = b.get("/", &[]).await;
    assert_ne!(r.got_header("x-session-id").unwrap(), old_id);
    assert_eq!(
        r.got_header("x-session-created").unwrap(),
        created,
        "Regenerate keeps the times"
    );
    let s = r.session();
    assert_eq!(s["user"], "alice");
    assert_eq!(s["cart"], "pear");

    // A replay by somebody else (within the regenerate grace only the
    // browser that logged in, holding its binding cookie, continues as the
    // new session: tests/grace.rs).
    let mut replay = Browser::new(&g);
    replay.jar = old_jar.without_binding();
    let r = replay
        .get_with("/", &[], &[("user-agent", "replay/1.0")])
        .await;
    assert_eq!(r.got_header("x-session-id").unwrap(), old_id);
    assert_eq!(
        r.session().get("user"),
        None,
        "the old id still reads server data"
    );
    assert_eq!(
        g.metric("gimlet_sessions_total{event=\"regenerated\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn incr_sequences_and_errors() {
    let (_up, g) = gw("  keys: { c: { clientside: true } }\n", MEM, "");
    let mut b = Browser::new(&g);
    for key in ["n", "c"] {
        for _ in 0..3 {
            let r = b.get("/", &[("X-Session-Incr", &format!("{key}=1"))]).await;
            assert_eq!(r.status, 200);
        }
        b.get("/", &[("X-Session-Incr", &format!("{key}=-5"))])
            .await;
        b.get("/", &[("X-Session-Incr", &format!("{key}=2&{key}=1"))])
            .await;
        assert_eq!(b.get("/", &[]).await.session()[key], "1", "{key}");
    }
    // Set and Incr in one response: Set first.
    b.get("/", &[("X-Session-Incr", "n=5"), ("X-Session-Set", "n=10")])
        .await;
    assert_eq!(b.get("/", &[]).await.session()["n"], "15");

    // Incr on a stored non-integer: 502, nothing of that response applied.
    b.get("/", &[("X-Session-Set", "word=hello")]).await;
    for key in ["word", "word2"] {
        if key == "word2" {
            b.get(
                "/",
                &[("X-Session-Set", "word2=x"), ("X-Session-Set", "c=notnum")],
            )
            .await;
        }
        let r = b
            .get(
                "/",
                &[
                    ("X-Session-Set", "other=1"),
                    ("X-Session-Incr", &format!("{key}=1")),
                ],
            )
            .await;
        assert_eq!(r.status, 502, "{key}: {}", r.body);
        assert!(r.body.contains("not_integer"), "{}", r.body);
        assert!(r.set_cookies.is_empty());
        assert_eq!(
            b.get("/", &[]).await.session().get("other"),
            None,
            "half-applied"
        );
    }
    // Past 64 bits.
    b.get("/", &[("X-Session-Set", "big=9223372036854775800")])
        .await;
    let r = b.get("/", &[("X-Session-Incr", "big=100")]).await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("overflow"), "{}", r.body);
    assert_eq!(
        b.get("/", &[]).await.session()["big"],
        "9223372036854775800"
    );
    let m = g.metrics().await;
    assert_eq!(
        metric_value(&m, "gimlet_directive_errors_total{reason=\"not_integer\"}"),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "gimlet_directive_errors_total{reason=\"overflow\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_directives_apply_nothing() {
    let (_up, g) = gw("  keys: { c: { clientside: true } }\n", MEM, "");
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "keep=1&c=1")]).await;
    let bad: &[&[(&str, &str)]] = &[
        &[
            ("X-Session-Set", "a=1&c=2"),
            ("X-Session-Delete", "keep,,x"),
        ],
        &[
            ("X-Session-Set", "a=1"),
            ("X-Session-Set", "no-equals-sign"),
        ],
        &[("X-Session-Set", "a=%zz")],
        &[("X-Session-Set", "bad key=1")],
        &[
            ("X-Session-Delete", "keep"),
            ("X-Session-Regenerate", "yes"),
        ],
        &[("X-Session-Destroy", "true")],
        &[("X-Session-Set", "a=1"), ("X-Session-Frobnicate", "1")],
        &[("X-Session-Incr", "n=1.5")],
    ];
    for d in bad {
        let r = b.get("/", d).await;
        assert_eq!(r.status, 502, "{d:?}");
        assert!(r.header("content-type").unwrap().starts_with("text/plain"));
        assert!(r.body.contains("rejected"), "{}", r.body);
        assert!(r.set_cookies.is_empty(), "{d:?}");
        let s = b.get("/", &[]).await.session();
        assert_eq!(s.get("keep").map(String::as_str), Some("1"), "{d:?}");
        assert_eq!(s.get("c").map(String::as_str), Some("1"), "{d:?}");
        assert_eq!(s.get("a"), None, "{d:?}");
    }
    // Directives apply whatever the upstream status.
    let r = b
        .get("/?status=404", &[("X-Session-Set", "seen404=1")])
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(b.get("/", &[]).await.session()["seen404"], "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn ignore_mode_passes_the_response_untouched() {
    let (_up, g) = gw("", MEM, "    on_directive_error: ignore\n");
    let mut b = Browser::new(&g);
    let r = b
        .get("/", &[("X-Session-Set", "a=1"), ("X-Session-Set", "oops")])
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["path"].is_string());
    assert!(r.headers.iter().all(|(n, _)| !n.starts_with("x-session")));
    assert!(r.set_cookies.is_empty());
    assert_eq!(b.get("/", &[]).await.got_header("x-session-id"), None);
    assert_eq!(
        g.metric("gimlet_directive_errors_total{reason=\"malformed\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_parallel_sets_of_different_keys_are_all_kept() {
    let (_up, g) = gw("", MEM, "");
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "start=1")]).await;
    let urls = (0..50)
        .map(|i| {
            format!(
                "{}{}",
                b.base,
                path_with("/", &[("X-Session-Set", &format!("k{i}={i}"))])
            )
        })
        .collect();
    all_at_once(urls, &b.jar.header()).await;
    let s = b.get("/", &[]).await.session();
    for i in 0..50 {
        assert_eq!(s.get(&format!("k{i}")), Some(&i.to_string()), "k{i} lost");
    }
    assert_eq!(s.len(), 51);
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_incr_is_atomic() {
    let (_up, g) = gw("", MEM, "");
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "start=1")]).await;
    let url = format!(
        "{}{}",
        b.base,
        path_with("/", &[("X-Session-Incr", "hits=1")])
    );
    all_at_once(vec![url; 60], &b.jar.header()).await;
    assert_eq!(b.get("/", &[]).await.session()["hits"], "60");
}

#[tokio::test(flavor = "multi_thread")]
async fn read_and_write_allow_lists() {
    let up = Upstream::start();
    let yaml = format!(
        "session:\n  secrets: [\"{SECRET}\"]\n  keys: {{ cart: {{ clientside: true }} }}\nstore: {{ kind: memory }}\nroutes:\n  - name: shop\n    match: {{ path_prefix: /shop }}\n    upstreams: [\"{a}\"]\n    session: {{ read: [cart], write: [cart] }}\n  - name: ro\n    match: {{ path_prefix: /ro }}\n    upstreams: [\"{a}\"]\n    session: {{ read: none, write: none }}\n  - name: app\n    upstreams: [\"{a}\"]\n",
        a = up.addr
    );
    let g = Gateway::start(&yaml);
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice&cart=1")]).await;

    let r = b.get("/shop/x", &[]).await;
    assert_eq!(
        r.session().into_iter().collect::<Vec<_>>(),
        vec![("cart".into(), "1".into())]
    );
    assert!(r.got_header("x-session-id").is_some());
    let r = b.get("/shop", &[("X-Session-Set", "user=mallory")]).await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("(not_allowed)"), "{}", r.body);
    assert_eq!(
        b.get("/shop", &[("X-Session-Set", "cart=2")]).await.status,
        200
    );

    // read: none -> no X-Session, and no store read at all.
    let before = g
        .metric("gimlet_store_operations_total{op=\"read\",result=\"ok\"}")
        .await;
    let r = b.get("/ro", &[]).await;
    assert_eq!(r.got_header("x-session"), None);
    assert!(r.got_header("x-session-id").is_some());
    assert_eq!(
        g.metric("gimlet_store_operations_total{op=\"read\",result=\"ok\"}")
            .await,
        before
    );
    for d in [
        ("X-Session-Destroy", "1"),
        ("X-Session-Regenerate", "1"),
        ("X-Session-Delete", "cart"),
    ] {
        assert_eq!(b.get("/ro", &[d]).await.status, 502, "{d:?}");
    }
    let s = b.get("/", &[]).await.session();
    assert_eq!(s["user"], "alice");
    assert_eq!(s["cart"], "2");
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_store_reads_for_cookie_only_sessions() {
    let (_up, g) = gw("  keys: { cart: { clientside: true } }\n", MEM, "");
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "cart=1")]).await;
    for _ in 0..3 {
        assert_eq!(b.get("/", &[]).await.session()["cart"], "1");
    }
    let m = g.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "gimlet_store_operations_total{op=\"read\",result=\"ok\"}"
        ),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "gimlet_store_operations_total{op=\"write\",result=\"ok\"}"
        ),
        0.0,
        "{m}"
    );
    // The first server-side key: one write; later reads: one each.
    b.get("/", &[("X-Session-Set", "user=bob")]).await;
    b.get("/", &[]).await;
    let m = g.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "gimlet_store_operations_total{op=\"write\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "gimlet_store_operations_total{op=\"read\",result=\"ok\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn require_gate_redirects_or_answers_status() {
    let up = Upstream::start();
    let yaml = format!(
        "session:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: memory }}\nroutes:\n  - name: acct\n    match: {{ path_prefix: /account }}\n    upstreams: [\"{a}\"]\n    session: {{ read: [user], require: [user], on_missing: {{ redirect: \"/login?next={{path}}\" }} }}\n  - name: api\n    match: {{ path_prefix: /api }}\n    upstreams: [\"{a}\"]\n    session: {{ require: [token], on_missing: {{ status: 403 }} }}\n  - name: app\n    upstreams: [\"{a}\"]\n",
        a = up.addr
    );
    let g = Gateway::start(&yaml);
    let mut b = Browser::new(&g);
    let r = b.get("/account/settings?tab=a b&x=1", &[]).await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location").unwrap(),
        "/login?next=%2Faccount%2Fsettings%3Ftab%3Da%2520b%26x%3D1",
        "the request target, percent-encoded once more"
    );
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(b.get("/api/x", &[]).await.status, 403);
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        hits,
        "the upstream was called"
    );
    b.get("/", &[("X-Session-Set", "user=&token=t")]).await;
    // An empty string counts as set.
    assert_eq!(b.get("/account", &[]).await.status, 200);
    assert_eq!(b.get("/api", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_route_is_404_plain_text() {
    let up = Upstream::start();
    let yaml = format!(
        "session:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: memory }}\nroutes:\n  - name: app\n    match: {{ host: app.test, path_prefix: /api }}\n    upstreams: [\"{}\"]\n",
        up.addr
    );
    let g = Gateway::start(&yaml);
    let c = client();
    let r = send(&c, c.get(g.url("/api/x")).header("host", "other.test")).await;
    assert_eq!(r.status, 404);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert!(r.body.contains("no route"));
    let r = send(&c, c.get(g.url("/apix")).header("host", "app.test")).await;
    assert_eq!(r.status, 404);
    let r = send(&c, c.get(g.url("/api/x")).header("host", "APP.test:8080")).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_cannot_set_our_cookies() {
    let (_up, g) = gw("", MEM, "");
    let mut b = Browser::new(&g);
    let r = b
        .get(
            "/",
            &[
                ("Set-Cookie", "gimlet=forged; Path=/"),
                ("Set-Cookie", "__Secure-gimlet-t=x"),
                ("Set-Cookie", "theme=dark; Path=/"),
            ],
        )
        .await;
    assert_eq!(r.set_cookies, vec!["theme=dark; Path=/".to_string()]);
    assert_eq!(g.metric("gimlet_upstream_cookies_dropped_total").await, 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_are_directive_errors_and_forward_budget_is_500() {
    let (_up, g) = gw(
        "  limits: { value_bytes: 100, keys: 3, session_bytes: 400, forward_bytes: 300 }\n  keys: { c: { clientside: true } }\n",
        MEM,
        "",
    );
    let mut b = Browser::new(&g);
    let big = "x".repeat(101);
    let r = b.get("/", &[("X-Session-Set", &format!("a={big}"))]).await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("value_too_large"), "{}", r.body);
    b.get("/", &[("X-Session-Set", "a=1&b=2&c=3")]).await;
    let r = b.get("/", &[("X-Session-Set", "d=4")]).await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("too_many_keys"), "{}", r.body);
    let v = "y".repeat(99);
    let r = b
        .get("/", &[("X-Session-Set", &format!("a={v}&b={v}&c={v}"))])
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // 3 keys of 100 bytes: 303 urlencoded bytes > forward_bytes (300).
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 500);
    assert!(r.body.contains("forward_bytes"), "{}", r.body);
    assert_eq!(
        g.metric("gimlet_forward_too_large_total{route=\"app\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clientside_overflow_spills_to_the_store() {
    let (_up, g) = gw(
        "  keys: { a: { clientside: true }, b: { clientside: true } }\n",
        MEM,
        "",
    );
    let mut b = Browser::new(&g);
    let v = "v".repeat(3000);
    let r = b
        .get("/", &[("X-Session-Set", &format!("a={v}&b={v}"))])
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for c in &r.set_cookies {
        assert!(c.len() <= 4096, "Set-Cookie of {} bytes", c.len());
    }
    let s = b.get("/", &[]).await.session();
    assert_eq!(s["a"].len(), 3000);
    assert_eq!(s["b"].len(), 3000);
    assert!(
        g.metric("gimlet_store_operations_total{op=\"write\",result=\"ok\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clientside_overflow_without_store_is_an_error() {
    let (_up, g) = gw("", "{ kind: none }", "");
    let mut b = Browser::new(&g);
    let v = "v".repeat(5000);
    let r = b.get("/", &[("X-Session-Set", &format!("a={v}"))]).await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("cookie_too_large"), "{}", r.body);
    // Cookie-only sessions work.
    let r = b.get("/", &[("X-Session-Set", "a=1")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(b.get("/", &[]).await.session()["a"], "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_and_secure_channels() {
    let (_up, g) = gw(
        "  keys:\n    flash: { clientside: true, permanent: false }\n    tmp: { permanent: false }\n    csrf: { secure: true }\n",
        MEM,
        "",
    );
    let mut b = Browser::new(&g);
    let r = b.get("/", &[("X-Session-Set", "flash=hi")]).await;
    assert_eq!(r.session_cookies().len(), 1);
    assert!(r.set_cookies[0].starts_with("gimlet-t="));
    assert!(
        !r.set_cookies[0].contains("Max-Age"),
        "{}",
        r.set_cookies[0]
    );
    b.get("/", &[("X-Session-Set", "tmp=server")]).await;
    assert_eq!(b.get("/", &[]).await.session()["tmp"], "server");
    // The browser closes: transient cookie gone, so are transient keys.
    b.jar.cookies.remove("gimlet-t");
    let r = b.get("/", &[]).await;
    assert_eq!(
        r.got_header("x-session-id"),
        None,
        "a transient-only session left something"
    );

    // A secure key over plain HTTP is a directive error.
    let r = b.get("/", &[("X-Session-Set", "csrf=t")]).await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("secure_over_http"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_insecure_makes_secure_keys_work_over_http() {
    let (_up, g) = gw(
        "  dev_insecure: true\n  keys: { csrf: { secure: true, clientside: true } }\n",
        MEM,
        "",
    );
    let mut b = Browser::new(&g);
    let r = b.get("/", &[("X-Session-Set", "csrf=tok")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.set_cookies[0].starts_with("gimlet-s="),
        "{:?}",
        r.set_cookies
    );
    assert!(!r.set_cookies[0].contains("Secure"));
    let r = b.get("/", &[]).await;
    assert_eq!(r.session()["csrf"], "tok");
    assert_eq!(r.got_header("x-session-secure").unwrap(), "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn header_map_encoding_and_sorted_x_session() {
    let (_up, g) = gw(
        "",
        MEM,
        "    session: { headers: { X-Remote-User: user } }\n",
    );
    let mut b = Browser::new(&g);
    b.get(
        "/",
        &[(
            "X-Session-Set",
            "user=%20J%C3%BCrgen%0D%0AX:%25 &zeta=1&alpha=a%26b%3Dc",
        )],
    )
    .await;
    let r = b.get("/", &[]).await;
    assert_eq!(
        r.got_header("x-remote-user").unwrap(),
        "%20J%C3%BCrgen%0D%0AX:%25%20"
    );
    assert_eq!(
        r.got_header("x-session").unwrap(),
        "alpha=a%26b%3Dc&user=+J%C3%BCrgen%0D%0AX%3A%25+&zeta=1"
    );
    assert_eq!(r.session()["user"], " Jürgen\r\nX:% ");
}

#[tokio::test(flavor = "multi_thread")]
async fn several_cookie_headers_are_read_and_merged() {
    let (_up, g) = gw("", MEM, "");
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice")]).await;
    let ours = format!("gimlet={}", b.jar.get("gimlet").unwrap());
    // Two Cookie fields, as HTTP/2 clients send them.
    let url = g.url("/");
    let mut h = reqwest::header::HeaderMap::new();
    h.append("cookie", "a=1".parse().unwrap());
    h.append("cookie", ours.parse().unwrap());
    h.append("cookie", "b=2".parse().unwrap());
    let r = send(&b.c, b.c.get(url).headers(h)).await;
    assert_eq!(r.session()["user"], "alice");
    let cookies: Vec<_> = r.got().into_iter().filter(|(n, _)| n == "cookie").collect();
    assert_eq!(
        cookies,
        vec![("cookie".to_string(), "a=1; b=2".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn undeclared_keys_reject() {
    let (_up, g) = gw("  undeclared_keys: reject\n  keys: { user: {} }\n", MEM, "");
    let mut b = Browser::new(&g);
    assert_eq!(b.get("/", &[("X-Session-Set", "user=a")]).await.status, 200);
    let r = b.get("/", &[("X-Session-Set", "other=a")]).await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("undeclared"), "{}", r.body);
}
