//! TLS and HTTP/2 to the upstreams (issue 14, item 1): `https://` upstreams verified
//! against a CA the test makes (`upstream_tls.ca`), the system roots, a
//! name that does not match, `verify: false`, and a client certificate for
//! an upstream that asks for one. The upstream is `openssl s_server -www`,
//! which answers every GET with a page describing the TLS session.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};

struct TlsUpstream {
    port: u16,
    child: Child,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `openssl s_server` with the `up` PKI's server certificate (127.0.0.1 and
/// localhost); `extra`: e.g. asking for a client certificate.
fn s_server(dir: &Path, extra: &[&str]) -> TlsUpstream {
    let port = free_port();
    let child = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
        .args(["-cert", "up-server.pem", "-key", "up-server-key.pem"])
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed");
    wait_port(([127, 0, 0, 1], port).into());
    TlsUpstream { port, child }
}

fn yaml(upstream: &str, tls: &str) -> String {
    format!(
        "session:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: memory }}\nroutes:\n  - name: app\n    upstreams: [\"{upstream}\"]\n{tls}"
    )
}

async fn get(g: &Gateway) -> Resp {
    let c = client();
    send(&c, c.get(g.url("/"))).await
}

#[tokio::test(flavor = "multi_thread")]
async fn https_upstreams_are_verified_and_said_why_when_not() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "up");
    pki(dir.path(), "other");
    let up = s_server(dir.path(), &[]);
    let ca = dir.path().join("up-ca.pem");
    let other_ca = dir.path().join("other-ca.pem");
    let https = format!("https://localhost:{}", up.port);

    // The CA that signed it: TLS, and the page says so.
    let g = Gateway::start(&yaml(
        &https,
        &format!("    upstream_tls: {{ ca: \"{}\" }}\n", ca.display()),
    ));
    let r = get(&g).await;
    assert_eq!(r.status, 200, "{}", g.log());
    assert!(r.body.contains("Cipher is"), "{}", r.body);
    // An IP address upstream with the name given as sni.
    let g = Gateway::start(&yaml(
        &format!("https://127.0.0.1:{}", up.port),
        &format!(
            "    upstream_tls: {{ ca: \"{}\", sni: localhost }}\n",
            ca.display()
        ),
    ));
    assert_eq!(get(&g).await.status, 200, "{}", g.log());

    // Refused, each with a 502 and a log line saying why.
    for (what, tls, why) in [
        ("the system roots", String::new(), "UnknownIssuer"),
        (
            "another CA",
            format!("    upstream_tls: {{ ca: \"{}\" }}\n", other_ca.display()),
            "UnknownIssuer",
        ),
        (
            "a name the certificate is not for",
            format!(
                "    upstream_tls: {{ ca: \"{}\", sni: app.internal }}\n",
                ca.display()
            ),
            "not valid for name",
        ),
    ] {
        let g = Gateway::start(&yaml(&https, &tls));
        let r = get(&g).await;
        assert_eq!(r.status, 502, "{what}: {}", r.body);
        let log = g.log();
        assert!(
            log.contains("failed to proxy: upstream TLS") && log.contains(why),
            "{what}: {log}"
        );
    }

    // verify: false takes any certificate, and warns at start.
    let g = Gateway::start(&yaml(&https, "    upstream_tls: { verify: false }\n"));
    assert_eq!(get(&g).await.status, 200, "{}", g.log());
    assert!(
        g.log().contains("routes[0].upstream_tls.verify is off"),
        "{}",
        g.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_for_an_upstream_that_asks() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "up");
    // Requires a client certificate signed by the up CA.
    let up = s_server(dir.path(), &["-Verify", "1", "-CAfile", "up-ca.pem"]);
    let p = |f: &str| dir.path().join(f).display().to_string();
    let https = format!("https://localhost:{}", up.port);
    let with = format!(
        "    upstream_tls: {{ ca: \"{}\", cert: \"{}\", key: \"{}\" }}\n",
        p("up-ca.pem"),
        p("up-client.pem"),
        p("up-client-key.pem")
    );
    let g = Gateway::start(&yaml(&https, &with));
    let r = get(&g).await;
    assert_eq!(r.status, 200, "{}", g.log());
    assert!(r.body.contains("Cipher is"), "{}", r.body);
    let without = format!("    upstream_tls: {{ ca: \"{}\" }}\n", p("up-ca.pem"));
    let g = Gateway::start(&yaml(&https, &without));
    assert_eq!(get(&g).await.status, 502);
}

/// `upstream_h2: true` over plain TCP speaks HTTP/2 with prior knowledge
/// (h2c): the upstream sees HTTP/2 and the session headers; without it,
/// an h2c-only upstream cannot be reached.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_h2_speaks_http2_to_the_app() {
    let up = Upstream::start_h2c();
    let g = Gateway::start(&yaml(&up.addr.to_string(), "    upstream_h2: true\n"));
    let mut b = Browser::new(&g);
    let r = b.get("/", &[("X-Session-Set", "user=ada")]).await;
    assert_eq!(r.status, 200, "{}", g.log());
    assert_eq!(r.json()["version"], "HTTP/2.0");
    let r = b.get("/", &[]).await;
    assert_eq!(r.json()["version"], "HTTP/2.0");
    assert_eq!(r.session()["user"], "ada");
    let g = Gateway::start(&yaml(&up.addr.to_string(), ""));
    assert_eq!(get(&g).await.status, 502);
    // An HTTP/1 upstream still answers the plain route (the echo says 1.1).
    let h1 = Upstream::start();
    let g = Gateway::start(&yaml(&h1.addr.to_string(), ""));
    assert_eq!(get(&g).await.json()["version"], "HTTP/1.1");
}

#[test]
fn upstream_tls_config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "up");
    let ca = dir.path().join("up-ca.pem").display().to_string();
    let not_pem = dir.path().join("up-server.ext").display().to_string();
    let cases = [
        (
            "[\"http://a:1\"]",
            format!("    upstream_tls: {{ ca: \"{ca}\" }}\n"),
            "routes[0].upstreams: an http:// upstream cannot have upstream_tls",
        ),
        (
            "[\"https://a:1\", \"http://b:1\"]",
            String::new(),
            "routes[0].upstreams: mixes http:// and https:// upstreams",
        ),
        (
            "[\"ftp://a:1\"]",
            String::new(),
            "routes[0].upstreams[0]: `ftp://`: expected http:// or https://",
        ),
        (
            "[\"https://a:1\"]",
            "    upstream_tls: { ca: /nonexistent/ca.pem }\n".to_string(),
            "routes[0].upstream_tls.ca: cannot read /nonexistent/ca.pem",
        ),
        (
            "[\"https://a:1\"]",
            format!("    upstream_tls: {{ ca: \"{not_pem}\" }}\n"),
            "is not a PEM file",
        ),
        (
            "[\"https://a:1\"]",
            format!("    upstream_tls: {{ cert: \"{ca}\" }}\n"),
            "routes[0].upstream_tls.key: is needed with cert",
        ),
        (
            "[\"https://a:1\"]",
            "    upstream_tls: { sni: \"a b\" }\n".to_string(),
            "routes[0].upstream_tls.sni: must be a host name",
        ),
    ];
    let yaml = |ups: &str, tls: &str| {
        format!("session:\n  secrets: [\"{SECRET}\"]\nroutes:\n  - name: a\n    upstreams: {ups}\n{tls}")
    };
    for (ups, tls, want) in cases {
        let c = check_yaml(dir.path(), &yaml(ups, &tls), false, &[]);
        assert!(!c.ok, "{ups} {tls}");
        assert!(c.stderr.contains(want), "{ups} {tls}: {}", c.stderr);
    }
    // https:// without a port means 443; the effective config says https.
    let c = check_yaml(
        dir.path(),
        &yaml("[\"https://127.0.0.1\"]", "    upstream_h2: true\n"),
        true,
        &[],
    );
    assert!(c.ok, "{}", c.stderr);
    assert!(c.stdout.contains("https://127.0.0.1:443"), "{}", c.stdout);
    assert!(c.stdout.contains("upstream_h2: true"), "{}", c.stdout);
}
