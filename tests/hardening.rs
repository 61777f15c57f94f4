//! Issue 8: every way a client, an app or a path could forge an identity,
//! skip a gate or fix a session, replayed against the real binary. Each test
//! sends the attack and asserts what the app received, what the browser got,
//! what the store holds and what the log says.

mod common;

use common::*;
use std::time::Duration;

/// Every `tchar` of RFC 9110 that is not a letter or a digit.
const SEPARATORS: &[u8] = b"!#$%&'*+-.^_`|~";

/// The test's own fold (not the gateway's): lower-case letters and digits,
/// every other byte `-`.
fn fold(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                b.to_ascii_lowercase() as char
            } else {
                '-'
            }
        })
        .collect()
}

/// Stores the store-dependent rules are checked on: name, `store:` YAML,
/// and the Redis server kept alive for the test.
fn stores() -> Vec<(&'static str, String, Option<RedisServer>)> {
    let r = RedisServer::start();
    let url = r.url();
    vec![
        ("memory", "{ kind: memory }".to_string(), None),
        (
            "embedded",
            "{ kind: embedded, path: sessions.redb }".to_string(),
            None,
        ),
        (
            "redis",
            format!("{{ kind: redis, url: \"{url}\" }}"),
            Some(r),
        ),
    ]
}

// 1 and 2. Forged identity headers, every separator, every route.
#[tokio::test(flavor = "multi_thread")]
async fn forged_identity_headers_never_reach_the_app() {
    let up = Upstream::start();
    let a = up.addr;
    let g = Gateway::start(&format!(
        "session:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: memory }}\nroutes:\n  - name: acct\n    match: {{ path_prefix: /account }}\n    upstreams: [\"{a}\"]\n    session: {{ read: [user, role], headers: {{ X-Remote-User: user, X-Remote-Role: role }} }}\n  - name: app\n    upstreams: [\"{a}\"]\n"
    ));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=mallory")]).await;
    assert!(b.jar.get("gimlet").is_some());

    for &sep in SEPARATORS {
        let s = sep as char;
        let forged: Vec<(String, String)> = [
            format!("X{s}Session"),
            format!("x{s}session{s}id"),
            format!("X{s}Session{s}Secure"),
            format!("X{s}SESSION{s}Created"),
            format!("X{s}Session{s}Degraded"),
            format!("X{s}Remote{s}User"),
            format!("x{s}remote{s}ROLE"),
            format!("X-Session{s}"),
        ]
        .into_iter()
        .map(|n| (n, "user=admin&forged=1".to_string()))
        .collect();
        let headers: Vec<(&str, &str)> = forged
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .chain([("X-Remote-User", "admin"), ("X-Session", "user=admin")])
            .collect();
        for path in ["/", "/account"] {
            let r = b.get_with(path, &[], &headers).await;
            assert_eq!(r.status, 200, "{s} {path}: {}", r.body);
            for (name, value) in r.got() {
                let f = fold(&name);
                if f.starts_with("x-session") {
                    assert!(
                        [
                            "x-session",
                            "x-session-id",
                            "x-session-created",
                            "x-session-expires"
                        ]
                        .contains(&name.as_str()),
                        "separator {s:?} on {path}: the app got {name}: {value}"
                    );
                    assert!(!value.contains("admin"), "{name}: {value}");
                }
                if f == "x-remote-user" {
                    assert_eq!(
                        path, "/account",
                        "mapped header on an unmapping route: {name}"
                    );
                    assert_eq!(
                        (name.as_str(), value.as_str()),
                        ("x-remote-user", "mallory")
                    );
                }
                assert_ne!(
                    f, "x-remote-role",
                    "{s:?} {path}: role is unset, got {name}"
                );
            }
            assert_eq!(r.session().get("user").map(String::as_str), Some("mallory"));
        }
    }
}

// 2, as shipped: the demo's account page.
#[tokio::test(flavor = "multi_thread")]
async fn demo_account_page_cannot_be_told_another_user() {
    let demo = Demo::start();
    let c = client();
    let base = &demo.base;
    let r = send(
        &c,
        c.post(format!("{base}/login"))
            .body("name=mallory")
            .header("content-type", "application/x-www-form-urlencoded"),
    )
    .await;
    let mut jar = Jar::default();
    jar.update(&r);
    for forged in [
        "X-Remote-User",
        "X_Remote_User",
        "X.Remote.User",
        "x~remote~user",
    ] {
        for path in ["/account", "/"] {
            let r = send(
                &c,
                c.get(format!("{base}{path}"))
                    .header("cookie", jar.header())
                    .header(forged, "alice"),
            )
            .await;
            assert_eq!(r.status, 200, "{forged} {path}");
            assert!(r.body.contains("mallory"), "{forged} {path}: {}", r.body);
            assert!(!r.body.contains("alice"), "{forged} {path}: {}", r.body);
        }
    }
}

// 3. Path tricks: every dot-segment, double-slash and escape form.
#[tokio::test(flavor = "multi_thread")]
async fn path_tricks_cannot_skip_a_gate() {
    let up = Upstream::start();
    let a = up.addr;
    let g = Gateway::start(&format!(
        "session:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: memory }}\nroutes:\n  - name: acct\n    match: {{ path_prefix: /account }}\n    upstreams: [\"{a}\"]\n    session: {{ read: [user], require: [user], on_missing: {{ status: 401 }} }}\n  - name: admin\n    match: {{ path_prefix: /Admin, ignore_case: true }}\n    upstreams: [\"{a}\"]\n    session: {{ read: [user], require: [admin], on_missing: {{ status: 403 }} }}\n  - name: app\n    upstreams: [\"{a}\"]\n"
    ));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=u&other=1")]).await;
    let cookie = format!("Cookie: {}", b.jar.header());

    let prefixes = [
        "/",
        "//",
        "///",
        "/./",
        "/.//",
        "/%2e/",
        "/%2E/",
        "/x/../",
        "/x/%2e%2e/",
        "/x/.%2e/",
        "/x/%2E./",
        "/x/..;/",
        "/x/..;p=1/",
        "/x;p/../",
        "/x/y/../../",
        "/../",
        "/%2e%2e/",
        "//x//..//",
        "/x/./../",
    ];
    let names = [
        "account",
        "%61ccount",
        "a%63%63ount",
        "accoun%74",
        "%61%63%63%6f%75%6e%74",
    ];
    let suffixes = [
        ("", "/account", ""),
        ("/", "/account/", ""),
        (";jsessionid=1", "/account;jsessionid=1", ""),
        ("/.", "/account/", ""),
        ("/x/..", "/account/", ""),
        ("/x/%2e%2e", "/account/", ""),
        ("/;x", "/account/;x", ""),
        ("//x?q=%2F..&r=%zz", "/account/x", "q=%2F..&r=%zz"),
    ];
    let mut tried = 0;
    for p in prefixes {
        for n in names {
            for (suffix, want_path, want_query) in suffixes {
                let target = format!("{p}{n}{suffix}");
                let r = raw_get(g.addr, &target, &[]);
                assert_eq!(r.status, 401, "{target} skipped the gate: {}", r.body);
                let r = raw_get(g.addr, &target, std::slice::from_ref(&cookie));
                assert_eq!(r.status, 200, "{target}: {}", r.body);
                let j = r.json();
                assert_eq!(j["path"], want_path, "{target}");
                assert_eq!(j["query"], want_query, "{target}");
                // The account route reads only `user`.
                assert_eq!(r.session().get("other"), None, "{target} routed elsewhere");
                tried += 1;
            }
        }
    }
    assert!(tried > 700);

    // Refused: encoded separators and controls, raw backslashes, bad escapes.
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);
    for target in [
        "/account%2fx",
        "/x%2F..%2Faccount",
        "/x%2f%2e%2e%2faccount",
        "/..%5caccount",
        "/x/..%5Caccount",
        "/account%00",
        "/account%0a",
        "/account%0D%0A",
        "/acc%7fount",
        "/%zzaccount",
        "/account%",
        "/account%4",
        "/x\\..\\account",
        "/..\\account",
    ] {
        let r = raw_get(g.addr, target, std::slice::from_ref(&cookie));
        assert_eq!(r.status, 400, "{target}: {}", r.body);
    }
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        hits,
        "a refused path reached the app"
    );

    // Targets that are not origin-form: pingora keeps their bytes for the
    // wire while its URI says `/`. Refused, never routed as `/`.
    for target in [
        "account/x",
        "x/../account",
        "..//account",
        "*",
        "account",
        "http:/account",
    ] {
        let r = raw_get(g.addr, target, std::slice::from_ref(&cookie));
        assert_eq!(r.status, 400, "{target}: {}", r.body);
    }
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), hits);
    // Absolute-form targets are judged like any other: gated, normalized,
    // and forwarded in origin-form.
    for target in [
        "http://app.test/%61ccount",
        "http://app.test//x/../account;p",
        "HTTP://app.test/account",
    ] {
        let r = raw_get(g.addr, target, &[]);
        assert_eq!(r.status, 401, "{target}: {}", r.body);
        let r = raw_get(g.addr, target, std::slice::from_ref(&cookie));
        assert_eq!(r.status, 200, "{target}: {}", r.body);
        assert!(
            r.json()["path"].as_str().unwrap().starts_with("/account"),
            "{target}"
        );
    }

    // ignore_case: one route compares its prefix case-insensitively.
    for target in [
        "/admin",
        "/ADMIN",
        "/aDmIn/x",
        "/%41dmin",
        "//admin/",
        "/x/../ADMIN;y",
    ] {
        let r = raw_get(g.addr, target, std::slice::from_ref(&cookie));
        assert_eq!(r.status, 403, "{target}");
    }
    let r = raw_get(g.addr, "/administrator", std::slice::from_ref(&cookie));
    assert_eq!(r.status, 200, "segment boundaries still hold");
    // Case-sensitive by default: `/ACCOUNT` is not `/account`.
    let r = raw_get(g.addr, "/ACCOUNT", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/ACCOUNT");
}

// An absolute-form target without a Host header routes on its authority.
#[tokio::test(flavor = "multi_thread")]
async fn absolute_form_targets_route_on_their_host() {
    let up = Upstream::start();
    let a = up.addr;
    let g = Gateway::start(&format!(
        "session:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: memory }}\nroutes:\n  - name: admin\n    match: {{ host: admin.example.com }}\n    upstreams: [\"{a}\"]\n    session: {{ require: [user] }}\n  - name: www\n    upstreams: [\"{a}\"]\n"
    ));
    for (target, version) in [
        ("http://admin.example.com/secret", "HTTP/1.1"),
        ("http://admin.example.com:80/secret", "HTTP/1.1"),
        ("http://ADMIN.example.com/secret", "HTTP/1.0"),
        ("http://admin.example.com", "HTTP/1.1"),
    ] {
        let r = raw_request(
            g.addr,
            &format!("GET {target} {version}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(r.status, 401, "{target} {version}: {}", r.body);
    }
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    // And the upstream gets an origin-form target with the Host it named.
    let r = raw_request(
        g.addr,
        "GET http://www.example.com/a/./b HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["path"], "/a/b");
    assert_eq!(r.got_header("host").as_deref(), Some("www.example.com"));
}

#[tokio::test(flavor = "multi_thread")]
async fn escaped_separators_keep_passes_them_undecoded() {
    let up = Upstream::start();
    let g = Gateway::start(&format!(
        "paths: {{ escaped_separators: keep }}\n{}",
        config(&up, "", "{ kind: memory }", "")
    ));
    let r = raw_get(g.addr, "/files/a%2fb%5Cc/./d", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["path"], "/files/a%2Fb%5Cc/d");
    let r = raw_get(g.addr, "/files/%00", &[]);
    assert_eq!(r.status, 400, "controls stay refused");
}

// 4. Nameless (and every other spelling of) upstream cookies with our name.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_cannot_set_our_cookie_in_any_spelling() {
    let up = Upstream::start();
    let g = Gateway::start(&config(&up, "", "{ kind: memory }", ""));
    let mut b = Browser::new(&g);
    let forged = [
        "=gimlet=FORGED; Path=/account",
        "= GIMLET=FORGED",
        "=__Secure-gimlet=FORGED; Secure",
        "=__Host-gimlet-t=FORGED; Secure; Path=/",
        "=gimlet-t=FORGED",
        "gimlet-s=FORGED",
        "__host-GIMLET=FORGED",
        "GiMlEt-T=FORGED",
        "__SECURE-Gimlet-st=FORGED",
        "=gimletFORGED=x",
    ];
    let mut d: Vec<(&str, &str)> = forged.iter().map(|f| ("Set-Cookie", *f)).collect();
    d.push(("Set-Cookie", "appsid=keep; Path=/"));
    d.push(("X-Session-Set", "user=real"));
    let r = b.get("/", &d).await;
    assert_eq!(r.status, 200);
    let sent: Vec<&String> = r
        .set_cookies
        .iter()
        .filter(|c| c.contains("FORGED"))
        .collect();
    // `=gimletFORGED=x` is sent back as `gimletFORGED=x`: not our name.
    assert_eq!(sent, vec!["=gimletFORGED=x"], "{:?}", r.set_cookies);
    assert!(r.set_cookies.iter().any(|c| c.starts_with("appsid=keep")));
    assert!(r
        .set_cookies
        .iter()
        .any(|c| c.starts_with("gimlet=") && !c.contains("FORGED")));
    assert_eq!(
        g.metric("gimlet_upstream_cookies_dropped_total").await,
        (forged.len() - 1) as f64
    );
    // The real session is intact.
    let s = b.get("/", &[]).await.session();
    assert_eq!(s.get("user").map(String::as_str), Some("real"));
}

/// A gateway where `X-Forwarded-Proto: https` from 127.0.0.1 makes a request
/// HTTPS (a TLS-terminating proxy in front), so a test can speak both.
fn https_gateway(store: &str, keys: &str) -> (Upstream, Gateway) {
    let up = Upstream::start();
    let g = Gateway::start(&format!(
        "trusted_proxies: [127.0.0.1/32]\nsession:\n  secrets: [\"{SECRET}\"]\n  keys: {keys}\nstore: {store}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n",
        up.addr
    ));
    (up, g)
}

const HTTPS: (&str, &str) = ("X-Forwarded-Proto", "https");

/// The jar's cookies a browser sends over plain HTTP (no `__Secure-`).
fn plain_only(jar: &Jar) -> String {
    jar.cookies
        .iter()
        .filter(|(k, _)| !k.starts_with("__Secure-"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

// 5. A plain cookie cannot shadow (or clear) the secure session.
#[tokio::test(flavor = "multi_thread")]
async fn plain_cookie_cannot_shadow_the_secure_session() {
    let (_up, g) = https_gateway(
        "{ kind: memory }",
        "{ csrf: { secure: true, clientside: true }, token: { secure: true } }",
    );
    let mut victim = Browser::new(&g);
    let r = victim
        .get_with(
            "/",
            &[("X-Session-Set", "user=victim&csrf=v&token=tv")],
            &[HTTPS],
        )
        .await;
    victim.jar.update(&r);
    let r = victim.get_with("/", &[], &[HTTPS]).await;
    let victim_id = r.got_header("x-session-id").unwrap();
    let victim_secure = victim.jar.get("__Secure-gimlet").unwrap().to_string();

    let mut attacker = Browser::new(&g);
    attacker
        .get("/", &[("X-Session-Set", "user=attacker")])
        .await;
    let planted = attacker.jar.get("gimlet").unwrap().to_string();

    for cookie in [
        format!("gimlet={planted}; __Secure-gimlet={victim_secure}"),
        format!("__Secure-gimlet={victim_secure}; gimlet={planted}"),
    ] {
        let r = send(
            &victim.c,
            victim
                .c
                .get(g.url("/"))
                .header("cookie", &cookie)
                .header(HTTPS.0, HTTPS.1),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.got_header("x-session-id").as_deref(),
            Some(victim_id.as_str())
        );
        let s = r.session();
        assert_ne!(s.get("user").map(String::as_str), Some("attacker"), "{s:?}");
        assert_eq!(s.get("csrf").map(String::as_str), Some("v"));
        assert!(
            !r.set_cookies
                .iter()
                .any(|c| c.starts_with("__Secure-gimlet=;")),
            "the secure cookie was cleared: {:?}",
            r.set_cookies
        );
        assert!(
            r.set_cookies.iter().any(|c| c.starts_with("gimlet=;")),
            "the planted cookie stays: {:?}",
            r.set_cookies
        );
    }

    // Two cookies of one name (the planted one at a longer path comes
    // first): the victim's own is used, and nothing of theirs is cleared.
    let victim_plain = victim.jar.get("gimlet").unwrap().to_string();
    let r = send(
        &victim.c,
        victim
            .c
            .get(g.url("/"))
            .header(
                "cookie",
                format!("gimlet={planted}; gimlet={victim_plain}; __Secure-gimlet={victim_secure}"),
            )
            .header(HTTPS.0, HTTPS.1),
    )
    .await;
    assert_eq!(
        r.got_header("x-session-id").as_deref(),
        Some(victim_id.as_str())
    );
    let s = r.session();
    assert_eq!(s.get("user").map(String::as_str), Some("victim"), "{s:?}");
    assert!(r.set_cookies.is_empty(), "{:?}", r.set_cookies);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_prefix_names_every_cookie_host_only() {
    let up = Upstream::start();
    let g = Gateway::start(&format!(
        "trusted_proxies: [127.0.0.1/32]\nsession:\n  secrets: [\"{SECRET}\"]\n  cookie: {{ host_prefix: true, secure: always }}\n  keys: {{ csrf: {{ secure: true, clientside: true }}, cart: {{ clientside: true, permanent: false }} }}\nstore: {{ kind: memory }}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n",
        up.addr
    ));
    let mut b = Browser::new(&g);
    let r = b
        .get_with("/", &[("X-Session-Set", "user=u&csrf=c&cart=x")], &[HTTPS])
        .await;
    b.jar.update(&r);
    let mut names: Vec<&str> = r
        .set_cookies
        .iter()
        .map(|c| c.split('=').next().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "__Host-gimlet",
            "__Host-gimlet-b",
            "__Host-gimlet-s",
            "__Host-gimlet-t"
        ]
    );
    for line in &r.set_cookies {
        assert!(
            line.contains("; Secure") && line.contains("; Path=/;"),
            "{line}"
        );
        assert!(!line.contains("Domain"), "{line}");
    }
    let r = b.get_with("/", &[], &[HTTPS]).await;
    assert_eq!(r.session().get("csrf").map(String::as_str), Some("c"));
    // A sibling subdomain can only plant plain names: they are no session.
    let value = b.jar.get("__Host-gimlet").unwrap();
    let r = send(
        &b.c,
        b.c.get(g.url("/"))
            .header("cookie", format!("gimlet={value}"))
            .header(HTTPS.0, HTTPS.1),
    )
    .await;
    assert_eq!(r.got_header("x-session-id"), None);
    assert_eq!(
        r.got_header("cookie").as_deref(),
        None,
        "our names never reach the app"
    );

    // host_prefix needs secure: always, path: / and no domain.
    let dir = tempfile::tempdir().unwrap();
    for (cookie, want) in [
        ("{ host_prefix: true }", "needs secure: always"),
        (
            "{ host_prefix: true, secure: always, path: /app }",
            "needs path: /",
        ),
        (
            "{ host_prefix: true, secure: always, domain: example.com }",
            "domain",
        ),
    ] {
        let f = dir.path().join("g.yaml");
        std::fs::write(
            &f,
            format!("session:\n  secrets: [\"{SECRET}\"]\n  cookie: {cookie}\nroutes:\n  - name: app\n    upstreams: [127.0.0.1:1]\n"),
        )
        .unwrap();
        let out = std::process::Command::new(bin())
            .args(["check", "-c"])
            .arg(&f)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{cookie}");
        assert!(
            text.contains("session.cookie.host_prefix") && text.contains(want),
            "{cookie}: {text}"
        );
    }
}

// 6. Logout (and Regenerate) over plain HTTP ends secure server-side data,
// on every store.
#[tokio::test(flavor = "multi_thread")]
async fn destroy_and_regenerate_over_http_end_secure_data_on_every_store() {
    for (store, yaml, _redis) in stores() {
        for directive in ["X-Session-Destroy", "X-Session-Regenerate"] {
            let (_up, g) = https_gateway(
                &yaml,
                "{ user: { clientside: true }, csrf: { secure: true } }",
            );
            let mut b = Browser::new(&g);
            let r = b
                .get_with(
                    "/",
                    &[("X-Session-Set", "user=u&csrf=secret-data")],
                    &[HTTPS],
                )
                .await;
            b.jar.update(&r);
            let old_secure = b.jar.get("__Secure-gimlet").unwrap().to_string();
            // Over plain HTTP the browser sends only the plain cookie.
            let r = send(
                &b.c,
                b.c.get(g.url(&path_with("/", &[(directive, "1")])))
                    .header("cookie", plain_only(&b.jar)),
            )
            .await;
            assert_eq!(r.status, 200, "{store} {directive}: {}", r.body);
            // The browser could not clear or replace its secure cookie.
            let r = send(
                &b.c,
                b.c.get(g.url("/"))
                    .header("cookie", format!("__Secure-gimlet={old_secure}"))
                    .header(HTTPS.0, HTTPS.1),
            )
            .await;
            assert_eq!(
                r.session().get("csrf"),
                None,
                "{store} {directive} over HTTP left secure data: {:?}",
                r.session()
            );
        }
    }
}

// 7. Destroy (and Regenerate) under `degrade` with the store away.
#[tokio::test(flavor = "multi_thread")]
async fn destroy_under_degrade_is_refused_while_data_lives_on() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&config(
        &up,
        "",
        &format!(
            "{{ kind: redis, url: \"{}\", timeout: 300ms, on_error: degrade }}",
            redis.url()
        ),
        "",
    ));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=u")]).await;
    let before = redis.keys("gimlet:*");
    assert!(!before.is_empty());
    redis.pause();
    for directive in ["X-Session-Destroy", "X-Session-Regenerate"] {
        let r = b.get_with("/", &[(directive, "1")], &[]).await;
        assert_eq!(r.status, 502, "{directive}: {}", r.body);
        assert!(r.body.contains("store_unavailable"), "{}", r.body);
        assert!(r.set_cookies.is_empty(), "{directive}: {:?}", r.set_cookies);
    }
    redis.resume();
    assert_eq!(redis.keys("gimlet:*"), before, "the data is still there");
    let r = b.get("/", &[]).await;
    assert_eq!(r.session().get("user").map(String::as_str), Some("u"));
    assert_eq!(
        g.metric("gimlet_directive_errors_total{reason=\"store_unavailable\"}")
            .await,
        2.0
    );
    // And with the store back, the logout works and leaves nothing.
    let r = b.get("/", &[("X-Session-Destroy", "1")]).await;
    assert_eq!(r.status, 200);
    assert!(redis.keys("gimlet:*").is_empty());
}

// 8. No value, cookie or secret in any log line, pingora's included; the
// 502 body names the reason label only.
#[tokio::test(flavor = "multi_thread")]
async fn logs_hold_no_values_even_from_pingora() {
    static BROKEN: &[u8] = b"HTTP/1.1 200 OK\r\nX-Session-Set: user=alice&apitoken=TOPSECRET1\r\nSet-Cookie: appsid=APPCOOKIE2\r\nBroken Header Line Without Colon\r\nContent-Length: 2\r\n\r\nok";
    let raw = RawUpstream::start(BROKEN);
    let up = Upstream::start();
    for rust_log in [None, Some("trace"), Some("debug")] {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("gimlet.yaml");
        std::fs::write(
            &f,
            format!(
                "listen:\n  - addr: 127.0.0.1:0\nadmin: {{ addr: 127.0.0.1:0 }}\nserver: {{ threads: 1, grace_period: 1s }}\nlog: {{ level: trace }}\nsession:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: memory }}\nroutes:\n  - name: broken\n    match: {{ path_prefix: /broken }}\n    upstreams: [\"{}\"]\n  - name: app\n    upstreams: [\"{}\"]\n    session: {{ write: [user] }}\n",
                raw.addr, up.addr
            ),
        )
        .unwrap();
        let g = Gateway::spawn_logged(dir.path(), &f, rust_log);
        let mut b = Browser::new(&g);
        let r = b.get("/", &[("X-Session-Set", "user=CLIENTVALUE3")]).await;
        assert_eq!(r.status, 200, "{rust_log:?}: {} {}", r.body, g.log());
        let our_cookie = b.jar.get("gimlet").unwrap().to_string();
        let r = b
            .get_with(
                "/broken?t=QUERYTOKEN4",
                &[],
                &[("cookie", "other=CLIENTCOOKIE5")],
            )
            .await;
        assert_eq!(r.status, 502, "{}", r.body);
        let r = b
            .get("/", &[("X-Session-Set", "forbiddenkey=VALUE6")])
            .await;
        assert_eq!(r.status, 502);
        assert!(r.body.contains("(not_allowed)"), "{}", r.body);
        assert!(
            !r.body.contains("forbiddenkey") && !r.body.contains("VALUE6"),
            "{}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(300));
        let log = g.log();
        assert!(
            log.contains("failed to proxy"),
            "a sanitized line replaces pingora's: {log}"
        );
        for secret in [
            "TOPSECRET1",
            "APPCOOKIE2",
            "alice",
            "CLIENTVALUE3",
            "QUERYTOKEN4",
            "CLIENTCOOKIE5",
            "VALUE6",
            SECRET,
            our_cookie.as_str(),
        ] {
            assert!(
                !log.contains(secret),
                "{rust_log:?}: the log holds {secret}:\n{log}"
            );
        }
    }
}

// 9. A secret in the wrong shape is named, never echoed.
#[test]
fn config_errors_never_echo_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "my-production-secret-0123456789abcdefXYZ";
    for session in [
        format!("  secrets: \"{secret}\"\n"),
        format!("  secrets: {{ a: \"{secret}\" }}\n"),
        format!("  secrets: [\"{SECRET}\"]\n  encrypt: \"{secret}\"\n"),
        format!("  secrets: [\"{SECRET}\"]\n  limits: {{ keys: \"{secret}\" }}\n"),
        format!("  secrets: [\"{SECRET}\"]\n  lifetime: {secret}\n"),
        format!("  secrets: [\"{SECRET}\"]\n  cookie: {{ secure: {secret} }}\n"),
        format!("  secrets: [\"{SECRET}\"]\n  cookie: {{ domain: \"{secret}/x\" }}\n"),
        format!("  secrets: [\"{SECRET}\"]\n  {secret}: 1\n"),
        format!("  secrets: [{{ {secret}: 1 }}]\n"),
    ] {
        let f = dir.path().join("g.yaml");
        std::fs::write(
            &f,
            format!("session:\n{session}routes:\n  - name: app\n    upstreams: [127.0.0.1:1]\n"),
        )
        .unwrap();
        for cmd in ["check", "run"] {
            let out = std::process::Command::new(bin())
                .args([cmd, "-c"])
                .arg(&f)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            assert!(!out.status.success(), "{session}");
            assert!(text.contains("session."), "names the field: {text}");
            assert!(!text.contains(secret), "{cmd}: {text}");
        }
    }
}

// 10. Directives in an informational response are stripped and ignored.
#[tokio::test(flavor = "multi_thread")]
async fn early_hints_never_write_the_session() {
    static HINTS: &[u8] = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\nX-Session-Set: user=early\r\nX-Session-Destroy: 1\r\n\r\nHTTP/1.1 200 OK\r\nX-Session-Set: role=final\r\nContent-Length: 2\r\n\r\nok";
    let raw = RawUpstream::start(HINTS);
    let up = Upstream::start();
    let (r_addr, a) = (raw.addr, up.addr);
    let g = Gateway::start(&format!(
        "session:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: memory }}\nroutes:\n  - name: hints\n    match: {{ path_prefix: /hints }}\n    upstreams: [\"{r_addr}\"]\n  - name: app\n    upstreams: [\"{a}\"]\n"
    ));
    let r = raw_get(g.addr, "/hints", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "ok");
    for (n, v) in &r.headers {
        assert!(
            !fold(n).starts_with("x-session"),
            "{n}: {v} reached the client"
        );
    }
    // One Set-Cookie in all: none on the 103 (where browsers ignore it).
    let all_cookies = r.headers.iter().filter(|(n, _)| n == "set-cookie").count();
    assert_eq!(all_cookies, r.set_cookies.len(), "{:?}", r.headers);
    assert_eq!(r.session_cookies().len(), 1, "{:?}", r.set_cookies);
    let cookie = r.set_cookies[0].split(';').next().unwrap().to_string();
    assert!(cookie.starts_with("gimlet="));
    let r = raw_get(g.addr, "/", &[format!("Cookie: {cookie}")]);
    let s = r.session();
    assert_eq!(s.get("role").map(String::as_str), Some("final"));
    assert_eq!(
        s.get("user"),
        None,
        "the 103's directive was applied: {s:?}"
    );
    // Nothing was written for the 103: one session, one Set.
    assert_eq!(
        g.metric("gimlet_sessions_total{event=\"created\"}").await,
        1.0
    );
    assert_eq!(
        g.metric("gimlet_directives_total{directive=\"set\"}").await,
        1.0
    );
    assert_eq!(
        g.metric("gimlet_directives_total{directive=\"destroy\"}")
            .await,
        0.0
    );
}

// 11. Forwarding headers from clients that are not trusted proxies.
#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_pass_only_from_trusted_proxies() {
    let forged: &[(&str, &str)] = &[
        ("Forwarded", "for=6.6.6.6;proto=https;host=evil.test"),
        ("X-Forwarded-Host", "evil.test"),
        ("X-Forwarded-Port", "443"),
        ("X-Forwarded-Ssl", "on"),
        ("X_Forwarded_Ssl", "on"),
        ("X-Forwarded-Scheme", "https"),
        ("X.Forwarded.Scheme", "https"),
        ("X-Url-Scheme", "https"),
        ("Front-End-Https", "on"),
        ("X-Real-IP", "6.6.6.6"),
        ("X~Real~Ip", "6.6.6.6"),
        ("X_Forwarded_Proto", "https"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("X.Forwarded.For", "6.6.6.6"),
        ("X-Forwarded-Prefix", "/admin"),
        ("X-Forwarded-Uri", "/admin"),
        ("X-Host", "evil.test"),
        ("True-Client-IP", "6.6.6.6"),
        ("X-Original-URL", "/account"),
        ("X_Rewrite_Url", "/account"),
        ("X.Original.URI", "/account"),
    ];
    let up = Upstream::start();
    let untrusted = Gateway::start(&config(&up, "", "{ kind: memory }", ""));
    let trusted = Gateway::start(&format!(
        "trusted_proxies: [127.0.0.1/32]\n{}",
        config(&up, "", "{ kind: memory }", "")
    ));
    let forwarding = [
        "forwarded",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "x-url-scheme",
        "front-end-https",
        "x-real-ip",
        "x-forwarded-prefix",
        "x-forwarded-uri",
        "x-host",
        "true-client-ip",
    ];
    // Routed on instead of the request line by some frameworks: removed
    // from everyone.
    let overrides = ["x-original-url", "x-rewrite-url", "x-original-uri"];
    let b = Browser::new(&untrusted);
    let r = b.get_with("/", &[], forged).await;
    for (n, v) in r.got() {
        assert!(
            !forwarding.contains(&fold(&n).as_str()),
            "untrusted client sent {n}: {v}"
        );
        assert!(!overrides.contains(&fold(&n).as_str()), "{n}: {v}");
        if fold(&n) == "x-forwarded-proto" || fold(&n) == "x-forwarded-for" {
            assert!(
                n == "x-forwarded-proto" || n == "x-forwarded-for",
                "{n}: {v}"
            );
        }
    }
    assert_eq!(r.got_header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        r.got_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(r.got_header("x-session-secure"), None);

    let b = Browser::new(&trusted);
    let r = b.get_with("/", &[], forged).await;
    let got = r.got();
    for name in forwarding {
        assert!(
            got.iter().any(|(n, _)| fold(n) == name),
            "trusted proxy's {name} dropped"
        );
    }
    assert_eq!(
        r.got_header("x-forwarded-host").as_deref(),
        Some("evil.test")
    );
    for (n, v) in &got {
        assert!(
            !overrides.contains(&fold(n).as_str()),
            "trusted proxy's {n}: {v} passed"
        );
    }
}

// 12. Limits hold on clientside writes over unread store data, every store.
#[tokio::test(flavor = "multi_thread")]
async fn limits_hold_for_clientside_writes_on_routes_that_read_nothing() {
    for (store, yaml, _redis) in stores() {
        for (limits, server, client, reason) in [
            ("{ keys: 3 }", "s1=1&s2=2", "c1=1&c2=2", "too_many_keys"),
            (
                "{ session_bytes: 60 }",
                "s1=0123456789012345678901234567890",
                "c1=0123456789012345678901234567890",
                "session_too_large",
            ),
        ] {
            let up = Upstream::start();
            let a = up.addr;
            let g = Gateway::start(&format!(
                "session:\n  secrets: [\"{SECRET}\"]\n  limits: {limits}\n  keys: {{ c1: {{ clientside: true }}, c2: {{ clientside: true }} }}\nstore: {yaml}\nroutes:\n  - name: ro\n    match: {{ path_prefix: /ro }}\n    upstreams: [\"{a}\"]\n    session: {{ read: none }}\n  - name: app\n    upstreams: [\"{a}\"]\n"
            ));
            let mut b = Browser::new(&g);
            let r = b.get("/", &[("X-Session-Set", server)]).await;
            assert_eq!(r.status, 200, "{store}: {}", r.body);
            let r = b.get("/ro", &[("X-Session-Set", client)]).await;
            assert_eq!(r.status, 502, "{store} {limits}: {}", r.body);
            assert!(r.body.contains(reason), "{store}: {}", r.body);
            assert!(r.set_cookies.is_empty());
            let s = b.get("/", &[]).await.session();
            assert_eq!(s.get("c1"), None, "{store}: half-applied");
            // Within the limits the same route still writes.
            let r = b.get("/ro", &[("X-Session-Set", "c1=1")]).await;
            assert_eq!(r.status, 200, "{store} {limits}: {}", r.body);
        }
    }
}
