//! Redis over TLS with an ACL user (issue 11): a private redis-server with
//! a TLS port that asks for client certificates, a CA the test makes, and
//! a user with a password; then what a wrong CA, a missing client
//! certificate and a wrong password do.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

struct TlsRedis {
    plain: RedisServer,
    tls_port: u16,
    dir: tempfile::TempDir,
}

const PASSWORD: &str = "acl-password-7f3b9c";

/// redis-server with a plain port (for the test's own redis-cli) and a TLS
/// port that requires a client certificate; user `gimlet` with
/// [`PASSWORD`].
fn start() -> TlsRedis {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "good");
    pki(dir.path(), "other");
    let tls_port = free_port();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let user_rule = format!(">{PASSWORD}");
    let plain = RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &p("good-server.pem"),
        "--tls-key-file",
        &p("good-server-key.pem"),
        "--tls-ca-cert-file",
        &p("good-ca.pem"),
        "--tls-auth-clients",
        "yes",
        // The README's minimal ACL for Gimlet.
        "--user",
        "gimlet",
        "on",
        &user_rule,
        "~gimlet:*",
        "+@read",
        "+@write",
        "+@scripting",
        "+@connection",
        "-@dangerous",
    ]);
    wait_port(([127, 0, 0, 1], tls_port).into());
    TlsRedis {
        plain,
        tls_port,
        dir,
    }
}

impl TlsRedis {
    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn store(&self, password: &str, ca: &str, client: bool) -> String {
        std::fs::write(self.path("password"), format!("{password}\n")).unwrap();
        let client = if client {
            format!(
                ", cert: \"{}\", key: \"{}\"",
                self.path("good-client.pem").display(),
                self.path("good-client-key.pem").display()
            )
        } else {
            String::new()
        };
        format!(
            "{{ kind: redis, url: \"rediss://127.0.0.1:{}\", username: gimlet, password: \"file:{}\", timeout: 2s, tls: {{ ca: \"{}\"{client} }} }}",
            self.tls_port,
            self.path("password").display(),
            self.path(ca).display(),
        )
    }
}

fn yaml(up: &Upstream, store: &str) -> String {
    format!(
        "session:\n  secrets: [\"{SECRET}\"]\nstore: {store}\nroutes:\n  - name: app\n    upstreams: [\"{a}\"]\n",
        a = up.addr
    )
}

fn check_connect(dir: &Path, yaml: &str) -> (bool, String) {
    let f = dir.join("check.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = Command::new(bin())
        .args(["check", "--connect", "-c"])
        .arg(&f)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_over_tls_as_an_acl_user() {
    let r = start();
    let up = Upstream::start();
    let g = Gateway::start(&yaml(&up, &r.store(PASSWORD, "good-ca.pem", true)));
    let mut b = Browser::new(&g);
    assert_eq!(
        b.get("/", &[("X-Session-Set", "user=alice")]).await.status,
        200
    );
    assert_eq!(b.get("/", &[]).await.session()["user"], "alice");
    // What else a session does, all allowed by the minimal ACL: a large
    // Incr (Redis' own INCRBY inside the script), Regenerate (RENAME),
    // Delete.
    let big = [("X-Session-Set", "big=9007199254740993")];
    assert_eq!(b.get("/", &big).await.status, 200);
    let incr = [("X-Session-Incr", "big=1"), ("X-Session-Regenerate", "1")];
    assert_eq!(b.get("/", &incr).await.status, 200);
    assert_eq!(b.get("/", &[]).await.session()["big"], "9007199254740994");
    assert_eq!(b.get("/", &[("X-Session-Delete", "big")]).await.status, 200);
    assert_eq!(b.get("/", &[]).await.session().len(), 1);
    // The data is in this Redis, written by user gimlet over the TLS port.
    assert_eq!(r.plain.keys("gimlet:*").len(), 1);
    let clients = r.plain.cli(&["CLIENT", "LIST"]);
    let ours: Vec<&str> = clients
        .lines()
        .filter(|l| l.contains(&format!("laddr=127.0.0.1:{}", r.tls_port)))
        .collect();
    assert!(!ours.is_empty(), "no client on the TLS port: {clients}");
    assert!(ours.iter().all(|l| l.contains(" user=gimlet ")), "{ours:?}");
    let (ok, out) = check_connect(
        r.dir.path(),
        &yaml(&up, &r.store(PASSWORD, "good-ca.pem", true)),
    );
    assert!(ok, "{out}");
    assert!(!g.log().contains(PASSWORD), "the password was logged");

    // insecure_skip_verify: no CA given, the server's certificate taken as
    // is (the password inline this time), and a warning at startup.
    let store = format!(
        "{{ kind: redis, url: \"rediss://127.0.0.1:{}\", username: gimlet, password: \"{PASSWORD}\", tls: {{ insecure_skip_verify: true, cert: \"{}\", key: \"{}\" }} }}",
        r.tls_port,
        r.path("good-client.pem").display(),
        r.path("good-client-key.pem").display()
    );
    let g = Gateway::start(&yaml(&up, &store));
    let mut b = Browser::new(&g);
    assert_eq!(
        b.get("/", &[("X-Session-Set", "user=bob")]).await.status,
        200
    );
    assert_eq!(b.get("/", &[]).await.session()["user"], "bob");
    let log = g.log();
    assert!(log.contains("insecure_skip_verify"), "{log}");
    assert!(!log.contains(PASSWORD), "the password was logged");
}

/// Each failure: the store is unavailable (a write is a 503 under
/// `on_error: fail`), `gimlet check --connect` fails saying why, and the
/// password is never printed.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_ca_certificate_or_password_is_refused_and_said() {
    let r = start();
    let up = Upstream::start();
    for (what, store, says) in [
        (
            "a server certificate from another CA",
            r.store(PASSWORD, "other-ca.pem", true),
            "invalid peer certificate: UnknownIssuer",
        ),
        (
            "no client certificate",
            r.store(PASSWORD, "good-ca.pem", false),
            "CertificateRequired",
        ),
        (
            "a wrong password",
            r.store("not-the-password", "good-ca.pem", true),
            "Password authentication failed",
        ),
    ] {
        let g = Gateway::start(&yaml(&up, &store));
        let mut b = Browser::new(&g);
        let resp = b.get("/", &[("X-Session-Set", "user=alice")]).await;
        assert_eq!(resp.status, 503, "{what}: {}", resp.body);
        let log = g.log();
        assert!(
            log.contains(says),
            "{what}: the log does not say {says}: {log}"
        );
        let (ok, out) = check_connect(r.dir.path(), &yaml(&up, &store));
        assert!(!ok, "{what}: check --connect passed: {out}");
        assert!(out.contains(says), "{what}: {out}");
        for text in [&log, &out] {
            assert!(
                !text.contains(PASSWORD) && !text.contains("not-the-password"),
                "{what}: {text}"
            );
        }
    }
    assert!(r.plain.keys("gimlet:*").is_empty());
}

/// Config errors name the field: Sentinel with a URL or without nodes, TLS
/// options with a plain URL, a client
/// certificate without its key, an unreadable CA file, a file that is not
/// PEM, and the options under another store kind.
#[test]
fn redis_store_config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notpem.txt"), "hello").unwrap();
    let store = |s: &str| {
        format!("session:\n  secrets: [\"{SECRET}\"]\nstore: {s}\nroutes:\n  - name: a\n    upstreams: [127.0.0.1:1]\n")
    };
    for (s, says) in [
        (
            "{ kind: redis, url: \"redis://h:1\", tls: { insecure_skip_verify: true } }",
            "store.tls: needs rediss:// URLs",
        ),
        (
            "{ kind: redis, url: \"rediss://h:1\", tls: { cert: notpem.txt } }",
            "store.tls.key: is needed with store.tls.cert",
        ),
        (
            "{ kind: redis, url: \"rediss://h:1\", tls: { ca: missing.pem } }",
            "store.tls.ca: cannot read",
        ),
        (
            "{ kind: redis, url: \"rediss://h:1\", tls: { ca: notpem.txt } }",
            "is not a PEM file",
        ),
        (
            "{ kind: redis, url: \"rediss://h:1\", password: \"file:nope\" }",
            "store.password: cannot read secret file",
        ),
        (
            "{ kind: redis, url: \"redis://h:1\", sentinel: { master: m, nodes: [\"redis://h:26379\"] } }",
            "store.sentinel: give `sentinel` without `url` or `cluster`",
        ),
        (
            "{ kind: redis, sentinel: { master: m, nodes: [] } }",
            "store.sentinel.nodes: must list at least one sentinel",
        ),
        (
            "{ kind: redis, sentinel: { master: m, nodes: [\"http://h:26379\"] } }",
            "store.sentinel.nodes[0]: expected a redis:// or rediss:// URL",
        ),
        (
            "{ kind: memory, password: x }",
            "store.password: only used with kind: redis",
        ),
        (
            "{ kind: embedded, tls: {} }",
            "store.tls: only used with kind: redis",
        ),
    ] {
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, store(s)).unwrap();
        let out = Command::new(bin())
            .args(["check", "-c"])
            .arg(&f)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{s}: passed");
        assert!(err.contains(says), "{s}: {err}");
    }
}
