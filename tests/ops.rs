//! Operations: TLS and HTTPS-only keys, trusted proxies, metrics, logs,
//! reload (SIGHUP) and graceful shutdown (SIGTERM).

mod common;
use common::*;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// A self-signed certificate for 127.0.0.1 / localhost.
fn cert(dir: &Path) -> (String, String) {
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&k)
        .arg("-out")
        .arg(&c)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl failed");
    (
        c.to_string_lossy().into_owned(),
        k.to_string_lossy().into_owned(),
    )
}

fn insecure_client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn start(dir: &Path, yaml: &str) -> Gateway {
    let f = dir.join("gimlet.yaml");
    std::fs::write(&f, yaml).unwrap();
    Gateway::spawn(dir, &f)
}

#[tokio::test(flavor = "multi_thread")]
async fn https_gets_secure_header_and_secure_cookies() {
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = cert(dir.path());
    let up = Upstream::start();
    let g = start(
        dir.path(),
        &format!(
            "listen:\n  - addr: 127.0.0.1:0\n    tls: {{ cert: {c}, key: {k} }}\n  - addr: 127.0.0.1:0\nsession:\n  secrets: [\"{SECRET}\"]\n  keys:\n    csrf: {{ secure: true, clientside: true }}\n    token: {{ secure: true }}\nstore: {{ kind: memory }}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n",
            up.addr
        ),
    );
    let https = g.https.unwrap();
    let client = insecure_client();
    let mut jar = Jar::default();
    let url = |p: &str, d: &[(&str, &str)]| format!("https://{https}{}", path_with(p, d));

    let r = send(
        &client,
        client.get(url("/", &[("X-Session-Set", "csrf=abc&token=t1&user=u")])),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    jar.update(&r);
    let names: Vec<&str> = r
        .set_cookies
        .iter()
        .map(|c| c.split('=').next().unwrap())
        .collect();
    assert!(names.contains(&"__Secure-gimlet"), "{names:?}");
    assert!(names.contains(&"gimlet"), "{names:?}");
    for line in &r.set_cookies {
        assert!(
            line.contains("; Secure"),
            "no Secure over HTTPS (secure: auto): {line}"
        );
    }
    let r = send(
        &client,
        client.get(url("/", &[])).header("cookie", jar.header()),
    )
    .await;
    assert_eq!(r.got_header("x-session-secure").as_deref(), Some("1"));
    assert_eq!(r.got_header("x-forwarded-proto").as_deref(), Some("https"));
    let s = r.session();
    assert_eq!(
        (s["csrf"].as_str(), s["token"].as_str(), s["user"].as_str()),
        ("abc", "t1", "u")
    );

    // HTTP/2 is offered by ALPN.
    let h2 = send(
        &client,
        client.get(url("/", &[])).version(reqwest::Version::HTTP_2),
    )
    .await;
    assert_eq!(h2.status, 200);
    let r = client.get(url("/", &[])).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);

    // The same cookies over plain HTTP: secure keys hidden, not writable.
    let plain = common::client();
    let r = send(&plain, plain.get(g.url("/")).header("cookie", jar.header())).await;
    assert_eq!(r.got_header("x-session-secure"), None);
    assert_eq!(r.got_header("x-forwarded-proto").as_deref(), Some("http"));
    let s = r.session();
    assert_eq!(s.get("user").map(String::as_str), Some("u"));
    assert_eq!(s.get("csrf"), None, "secure key over HTTP");
    assert_eq!(s.get("token"), None, "secure key over HTTP");
    let r = send(
        &plain,
        plain
            .get(format!(
                "http://{}{}",
                g.addr,
                path_with("/", &[("X-Session-Set", "csrf=x")])
            ))
            .header("cookie", jar.header()),
    )
    .await;
    assert_eq!(r.status, 502);
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_proto_counts_only_from_trusted_proxies() {
    let up = Upstream::start();
    let base = |trusted: &str| {
        format!(
            "trusted_proxies: [{trusted}]\nsession:\n  secrets: [\"{SECRET}\"]\n  keys: {{ csrf: {{ secure: true, clientside: true }} }}\nstore: {{ kind: memory }}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n",
            up.addr
        )
    };
    let trusted = Gateway::start(&base("127.0.0.1/32"));
    let untrusted = Gateway::start(&base("10.0.0.0/8"));
    let c = client();
    for (g, secure) in [(&trusted, true), (&untrusted, false)] {
        let url = format!(
            "http://{}{}",
            g.addr,
            path_with("/", &[("X-Session-Set", "csrf=1")])
        );
        let r = send(&c, c.get(url).header("X-Forwarded-Proto", "https")).await;
        assert_eq!(r.status, if secure { 200 } else { 502 }, "{}", r.body);
        let r = if secure {
            r
        } else {
            send(&c, c.get(g.url("/")).header("X-Forwarded-Proto", "https")).await
        };
        assert_eq!(r.got_header("x-session-secure").is_some(), secure);
        assert_eq!(
            r.got_header("x-forwarded-proto").unwrap(),
            if secure { "https" } else { "http" }
        );
        if secure {
            assert!(
                r.set_cookies[0].starts_with("__Secure-gimlet=")
                    && r.set_cookies[0].contains("; Secure")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_family_moves() {
    let up = Upstream::start();
    let g = Gateway::start(&config(&up, "  lifetime: 1s\n", "{ kind: memory }", ""));
    let m0 = g.metrics().await;
    assert_eq!(
        metric_value(&m0, "gimlet_build_info{version=\"0.1.0\"}"),
        1.0,
        "{m0}"
    );
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "a=1"), ("X-Session-Incr", "n=1")])
        .await;
    b.get("/", &[("X-Session-Delete", "a")]).await;
    b.get("/", &[("X-Session-Regenerate", "1")]).await;
    b.get("/", &[("X-Session-Destroy", "1")]).await;
    b.get("/", &[("X-Session-Set", "oops")]).await;
    // Rejected cookies, one per reason.
    let other = gimlet::codec::Codec::new(&[SECRET2], true);
    let payload = gimlet::model::Payload {
        meta: gimlet::model::Meta {
            id: gimlet::model::SessionId::random(),
            tag: 1,
            created: gimlet::model::now_ms(),
            expires: gimlet::model::now_ms() + 60_000,
            touched: gimlet::model::now_ms(),
        },
        flags: gimlet::model::Flags::NONE,
        values: Default::default(),
    };
    let stranger = Browser::new(&g);
    for cookie in [
        format!("gimlet={}", other.seal("gimlet", &payload)),
        "gimlet=garbage!".to_string(),
        format!(
            "gimlet={}",
            gimlet::codec::Codec::new(&[SECRET], true).seal("gimlet-t", &payload)
        ),
    ] {
        stranger.get_with("/", &[], &[("cookie", &cookie)]).await;
    }
    b.get("/", &[("X-Session-Set", "x=1")]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    b.get("/", &[]).await;
    let m = g.metrics().await;
    for sample in [
        "gimlet_requests_total{route=\"app\",status=\"200\"}",
        "gimlet_requests_total{route=\"app\",status=\"502\"}",
        "gimlet_request_duration_seconds_count{route=\"app\"}",
        "gimlet_upstream_duration_seconds_count{route=\"app\"}",
        "gimlet_sessions_total{event=\"created\"}",
        "gimlet_sessions_total{event=\"regenerated\"}",
        "gimlet_sessions_total{event=\"destroyed\"}",
        "gimlet_sessions_total{event=\"expired\"}",
        "gimlet_cookies_rejected_total{reason=\"bad_mac\"}",
        "gimlet_cookies_rejected_total{reason=\"malformed\"}",
        "gimlet_cookies_rejected_total{reason=\"expired\"}",
        "gimlet_cookies_rejected_total{reason=\"unknown_key\"}",
        "gimlet_directives_total{directive=\"set\"}",
        "gimlet_directives_total{directive=\"delete\"}",
        "gimlet_directives_total{directive=\"incr\"}",
        "gimlet_directives_total{directive=\"regenerate\"}",
        "gimlet_directives_total{directive=\"destroy\"}",
        "gimlet_directive_errors_total{reason=\"malformed\"}",
        "gimlet_store_operations_total{op=\"read\",result=\"ok\"}",
        "gimlet_store_operations_total{op=\"write\",result=\"ok\"}",
        "gimlet_store_duration_seconds_count{op=\"read\"}",
        "gimlet_store_duration_seconds_count{op=\"write\"}",
        "gimlet_set_cookie_bytes_count",
    ] {
        assert!(
            metric_value(&m0, sample) == 0.0,
            "{sample} was not 0 at start"
        );
        assert!(
            metric_value(&m, sample) >= 1.0,
            "{sample} did not move:\n{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn store_error_and_timeout_metrics() {
    let mut r = RedisServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&config(
        &up,
        "",
        &format!("{{ kind: redis, url: \"{}\", timeout: 150ms }}", r.url()),
        "",
    ));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=a")]).await;
    // A stopped (not dead) Redis: the read times out.
    let pid = r
        .cli(&["INFO", "server"])
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    let t = Instant::now();
    assert_eq!(b.get("/", &[]).await.status, 503);
    assert!(t.elapsed() < Duration::from_secs(2));
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    assert!(
        g.metric("gimlet_store_operations_total{op=\"read\",result=\"timeout\"}")
            .await
            >= 1.0
    );
    r.kill();
    assert_eq!(b.get("/", &[]).await.status, 503);
    let m = g.metrics().await;
    assert!(failed_reads(&m) >= 2.0, "{m}");
}

fn raw_get(s: &mut std::net::TcpStream, path: &str) -> (u16, String) {
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
        if response_len(&buf).is_some() {
            let text = String::from_utf8_lossy(&buf).to_string();
            let end = text.find("\r\n\r\n").unwrap();
            let status = text[9..12].parse().unwrap();
            return (status, text[end + 4..].to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_routes_and_secrets_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let yaml = |secrets: &str, routes: &str| {
        format!(
            "listen:\n  - addr: 127.0.0.1:0\nadmin: {{ addr: 127.0.0.1:0 }}\nsession:\n  secrets: [{secrets}]\nstore: {{ kind: memory }}\nroutes:\n  - name: a\n    match: {{ path_prefix: /a }}\n    upstreams: [\"{u}\"]\n{routes}",
            u = up.addr
        )
    };
    let g = start(dir.path(), &yaml(&format!("\"{SECRET}\""), ""));
    let mut b = Browser::new(&g);
    b.get("/a", &[("X-Session-Set", "user=alice")]).await;
    assert_eq!(b.get("/b", &[]).await.status, 404);
    let mut conn = std::net::TcpStream::connect(g.addr).unwrap();
    assert_eq!(raw_get(&mut conn, "/a/x").0, 200);

    // A new route and a rotated secret (the old one still verifies).
    std::fs::write(
        &g.config,
        yaml(
            &format!("\"{SECRET2}\", \"{SECRET}\""),
            &format!(
                "  - name: b\n    match: {{ path_prefix: /b }}\n    upstreams: [\"{}\"]\n",
                up.addr
            ),
        ),
    )
    .unwrap();
    g.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.metric("gimlet_config_reloads_total{result=\"ok\"}").await < 1.0 {
        assert!(Instant::now() < deadline, "no reload: {}", g.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        raw_get(&mut conn, "/b/x").0,
        200,
        "the kept-alive connection was dropped"
    );
    let r = b.get("/b", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.session()["user"],
        "alice",
        "the old cookie stopped working"
    );
    assert_eq!(
        r.session_cookies().len(),
        1,
        "not re-issued under the new secret"
    );

    // An invalid file: the running config stays, the failure is counted.
    std::fs::write(&g.config, "session: {}\nroutes: nope\n").unwrap();
    g.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while g
        .metric("gimlet_config_reloads_total{result=\"error\"}")
        .await
        < 1.0
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.get("/b", &[]).await.session()["user"], "alice");
    assert!(g.log().contains("config reload failed"), "{}", g.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_parse_and_hold_no_secrets_or_values() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let f = dir.path().join("gimlet.yaml");
    std::fs::write(
        &f,
        format!(
            "listen:\n  - addr: 127.0.0.1:0\nlog: {{ format: json, level: trace }}\nsession:\n  secrets: [\"{SECRET}\"]\n  keys: {{ cart: {{ clientside: true }} }}\nstore: {{ kind: memory }}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n",
            up.addr
        ),
    )
    .unwrap();
    let g = Gateway::spawn_with(dir.path(), &f, false);
    let mut b = Browser::new(&g);
    b.get(
        "/",
        &[("X-Session-Set", "user=SENSITIVE-USER&cart=SENSITIVE-CART")],
    )
    .await;
    b.get("/", &[("X-Session-Incr", "user=1")]).await;
    b.get("/", &[("X-Session-Set", "bad key=SENSITIVE-BAD")])
        .await;
    b.get_with("/", &[], &[("cookie", "gimlet=SENSITIVE-FORGED")])
        .await;
    let cookies: Vec<String> = b.jar.cookies.values().cloned().collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = g.log();
    let mut access = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for needle in ["SENSITIVE", SECRET] {
            assert!(!line.contains(needle), "{needle} in a log line: {line}");
        }
        for c in &cookies {
            assert!(
                !line.contains(c.as_str()),
                "a cookie value in a log line: {line}"
            );
        }
        if v["target"] == "gimlet::access" {
            access += 1;
            for field in [
                "route",
                "status",
                "duration_ms",
                "session",
                "store_round_trips",
                "directives",
            ] {
                assert!(!v[field].is_null(), "{field} missing: {line}");
            }
        }
    }
    assert_eq!(access, 4, "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_the_request_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let mut g = start(
        dir.path(),
        &format!(
            "listen:\n  - addr: 127.0.0.1:0\nserver: {{ grace_period: 10s }}\nsession:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: memory }}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n",
            up.addr
        ),
    );
    let c = client();
    let url = g.url("/slow?sleep_ms=1500");
    let inflight = tokio::spawn(async move { send(&c, c.get(url)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    g.signal("TERM");
    let r = inflight.await.unwrap();
    assert_eq!(r.status, 200, "the request in flight was cut: {}", r.body);
    let status = g
        .wait(Duration::from_secs(5))
        .expect("did not exit after draining");
    assert!(status.success(), "{status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "waited out the whole grace period: {:?}",
        t.elapsed()
    );
    assert!(
        std::net::TcpStream::connect(g.addr).is_err(),
        "still accepting"
    );
}

/// A listener (or the admin port) that cannot bind is a startup error that
/// names the address, exits non-zero at once, and never says "listening".
#[test]
fn a_taken_port_is_fatal_at_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let up = Upstream::start();
    for (listen, admin) in [
        (addr.to_string(), "127.0.0.1:0".to_string()),
        ("127.0.0.1:0".to_string(), addr.to_string()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("gimlet.yaml");
        std::fs::write(
            &f,
            format!(
                "listen:\n  - addr: {listen}\nadmin: {{ addr: {admin} }}\n{}",
                config(&up, "", "{ kind: memory }", "")
            ),
        )
        .unwrap();
        let (out_f, err_f) = (dir.path().join("out"), dir.path().join("err"));
        let mut child = std::process::Command::new(bin())
            .args(["run", "-c"])
            .arg(&f)
            .stdout(std::fs::File::create(&out_f).unwrap())
            .stderr(std::fs::File::create(&err_f).unwrap())
            .spawn()
            .unwrap();
        // Never wait for a half-alive process: give it 3 s, then kill it.
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if start.elapsed() > Duration::from_secs(3) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = std::fs::read_to_string(&out_f).unwrap();
        let stderr = std::fs::read_to_string(&err_f).unwrap();
        let status = status.unwrap_or_else(|| panic!("still running after 3 s: {stdout} {stderr}"));
        assert!(!status.success(), "{listen} / {admin}: {stdout} {stderr}");
        assert!(!stdout.contains("listening"), "{stdout}");
        assert!(
            stderr.contains(&format!("listen {addr}")) && stderr.contains("in use"),
            "{stderr}"
        );
    }
    drop(taken);
}

/// Probes, reload state and in-flight gauges, and every labelled family
/// present before its first event (issue 13, item 6).
#[tokio::test(flavor = "multi_thread")]
async fn probes_reload_gauges_and_families_from_the_start() {
    let up = Upstream::start();
    let yaml = config(&up, "", "{ kind: memory }", "");
    let mut g = Gateway::start(&yaml);
    let admin = g.admin.unwrap();
    let c = client();
    for path in ["/healthz", "/livez"] {
        let r = send(&c, c.get(format!("http://{admin}{path}"))).await;
        assert_eq!(r.status, 200, "{path}");
    }
    let r = send(&c, c.get(format!("http://{admin}/readyz?verbose"))).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("[+] store: memory answers"), "{}", r.body);
    assert!(r.body.contains("[+] config"), "{}", r.body);

    let m = g.metrics().await;
    for sample in [
        "gimlet_config_last_reload_successful 1",
        "gimlet_requests_in_flight 0",
        "gimlet_forward_too_large_total{route=\"app\"} 0",
        "gimlet_directive_errors_total{reason=\"not_allowed\"} 0",
        "gimlet_directive_errors_total{reason=\"store_unavailable\"} 0",
    ] {
        assert!(m.lines().any(|l| l == sample), "{sample} missing:\n{m}");
    }
    let t = metric_value(&m, "gimlet_config_last_reload_success_timestamp_seconds");
    assert!(t > 1.7e9, "{t}");

    // A broken file on SIGHUP: the gauge says so; a good one restores it.
    let path = g.dir.join("gimlet.yaml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, "routes: [").unwrap();
    g.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.metric("gimlet_config_last_reload_successful").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the failed reload was not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = send(&c, c.get(format!("http://{admin}/readyz?verbose"))).await;
    assert!(r.body.contains("[-] config"), "{}", r.body);
    std::fs::write(&path, good).unwrap();
    g.signal("HUP");
    while g.metric("gimlet_config_last_reload_successful").await != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the good reload was not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    g.stop();
}

/// One `Vary` with the app's values and Cookie; a directive error shows a
/// plain "Bad gateway" with the reason label, and the access line names the
/// reason (issue 13, item 8).
#[tokio::test(flavor = "multi_thread")]
async fn one_vary_and_a_plain_bad_gateway() {
    let up = Upstream::start();
    let g = Gateway::start(&config(
        &up,
        "",
        "{ kind: memory }",
        "    session: { write: [user] }\n",
    ));
    let mut b = Browser::new(&g);
    let r = b
        .get(
            "/",
            &[("Vary", "Accept-Encoding"), ("X-Session-Set", "user=u")],
        )
        .await;
    let vary: Vec<&String> = r
        .headers
        .iter()
        .filter(|(n, _)| n == "vary")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(vary, vec!["Accept-Encoding, Cookie"], "{:?}", r.headers);
    let r = b.get("/", &[("X-Session-Set", "other=1")]).await;
    assert_eq!(r.status, 502);
    assert_eq!(
        r.body,
        "Bad gateway: the app's session directives were rejected (not_allowed)\n"
    );
    std::thread::sleep(Duration::from_millis(200));
    let log = g.log();
    let line = log
        .lines()
        .rfind(|l| l.contains("gimlet::access") && l.contains("status=502"))
        .unwrap_or_else(|| panic!("no access line:\n{log}"));
    assert!(line.contains("directive_error=\"not_allowed\""), "{line}");
    assert!(!line.contains("HTTPStatus"), "{line}");
}
