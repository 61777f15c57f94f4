//! The README's PHP snippet behind the gateway (`php -S`, Debian's php-cli;
//! `make deps` installs it): no spelling of a forged `X-Session` or mapped
//! header reaches `$_SERVER`. PHP is the reason the header fold exists: it
//! turns `-`, `.` and ` ` in header names into `_` and upper-cases them.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};

/// The first ```php block of the README, as users copy it.
fn readme_snippet() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("```php\n").expect("README has a PHP snippet") + 7;
    let len = readme[start..].find("```").unwrap();
    readme[start..start + len].to_string()
}

/// Dumps every `HTTP_*` entry of `$_SERVER` as JSON.
const DUMP: &str = r#"<?php
header('Content-Type: application/json');
$h = [];
foreach ($_SERVER as $k => $v) { if (strncmp($k, 'HTTP_', 5) === 0) { $h[$k] = $v; } }
echo json_encode($h);
"#;

struct Php(Child);

impl Drop for Php {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn php_server(dir: &std::path::Path) -> (Php, std::net::SocketAddr) {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new("php")
        .args(["-S", &addr.to_string(), "-t"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("php-cli is installed (make deps)");
    wait_port(addr);
    (Php(child), addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn php_app_never_sees_a_forged_session_or_user() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.php"), readme_snippet()).unwrap();
    std::fs::create_dir(dir.path().join("plain")).unwrap();
    std::fs::write(dir.path().join("dump.php"), DUMP).unwrap();
    std::fs::write(dir.path().join("plain/dump.php"), DUMP).unwrap();
    let (_php, php) = php_server(dir.path());
    let g = Gateway::start(&format!(
        "session:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: memory }}\nroutes:\n  - name: plain\n    match: {{ path_prefix: /plain }}\n    upstreams: [\"{php}\"]\n  - name: app\n    upstreams: [\"{php}\"]\n    session: {{ read: all, headers: {{ X-Remote-User: user }} }}\n"
    ));

    // Log in as mallory through the README's own /login.
    let c = client();
    let r = send(
        &c,
        c.post(g.url("/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("name=mallory"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut jar = Jar::default();
    jar.update(&r);
    assert!(jar.get("gimlet").is_some(), "{:?}", r.set_cookies);

    let mut spellings: Vec<String> = Vec::new();
    for sep in b"!#$%&'*+-.^_`|~" {
        let s = *sep as char;
        spellings.push(format!("X{s}Session"));
        spellings.push(format!("x{s}SESSION"));
    }
    let mut users: Vec<String> = Vec::new();
    for sep in b"!#$%&'*+-.^_`|~" {
        let s = *sep as char;
        users.push(format!("X{s}Remote{s}User"));
    }
    for name in &spellings {
        for cookie in [None, Some(jar.header())] {
            let mut req = c.get(g.url("/")).header(name.as_str(), "user=admin");
            if let Some(ck) = &cookie {
                req = req.header("cookie", ck);
            }
            let r = send(&c, req).await;
            assert_eq!(r.status, 200, "{name}");
            let want = if cookie.is_some() {
                "Hello mallory"
            } else {
                "Hello stranger"
            };
            assert_eq!(r.body, want, "{name}: {}", r.body);
        }
    }
    // PHP reads a space as `_` as well; HTTP/1.1 forbids it in a name, so
    // the request is refused or the header stripped, never seen as ours.
    let r = raw_get(g.addr, "/dump.php", &["X Session: user=admin".into()]);
    assert!(r.status == 400 || !r.body.contains("admin"), "{r:?}");

    for (path, mapped) in [("/dump.php", true), ("/plain/dump.php", false)] {
        let mut req = c.get(g.url(path)).header("cookie", jar.header());
        for n in users.iter().chain(&spellings) {
            req = req.header(n.as_str(), "admin");
        }
        let r = send(&c, req).await;
        let seen: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&r.body).unwrap();
        for (k, v) in &seen {
            assert!(
                !v.as_str().unwrap_or("").contains("admin"),
                "{path}: PHP saw {k} = {v}"
            );
        }
        assert_eq!(
            seen.get("HTTP_X_REMOTE_USER").and_then(|v| v.as_str()),
            mapped.then_some("mallory"),
            "{path}: {seen:?}"
        );
    }
}
