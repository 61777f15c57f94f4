//! The command line: check, keygen, help, startup errors, shipped configs.

mod common;
use common::*;
use std::process::Command;

fn gimlet(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn keygen_prints_a_usable_secret() {
    let (code, out, _) = gimlet(&["keygen"]);
    assert_eq!(code, 0);
    let s = out.trim();
    assert!(s.len() >= 32, "{s}");
    let (_, out2, _) = gimlet(&["keygen"]);
    assert_ne!(s, out2.trim());
}

#[test]
fn help_on_each_command() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["check", "--help"],
        &["keygen", "--help"],
        &["demo", "--help"],
    ] {
        let (code, out, _) = gimlet(args);
        assert_eq!(code, 0, "{args:?}");
        assert!(out.contains("Usage"), "{args:?}: {out}");
    }
}

#[test]
fn check_reports_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "session:\n  secrets: [\"short\"]\nroutes:\n  - name: a\n    upstreams: [127.0.0.1:1]\n",
            "session.secrets[0]",
            "line 2",
        ),
        (
            &*format!("session:\n  secrets: [\"{SECRET}\"]\n  lifetime: forever\nroutes:\n  - name: a\n    upstreams: [127.0.0.1:1]\n"),
            "session.lifetime: invalid duration",
            "line 3",
        ),
        (
            &*format!("session:\n  secrets: [\"{SECRET}\"]\nroutes:\n  - name: a\n    upstreams: [127.0.0.1:1]\n    sesion: {{}}\n"),
            "routes[0].sesion: unknown field, did you mean session?",
            "line 6",
        ),
        (
            &*format!("listen:\n  - addr: nowhere\nsession:\n  secrets: [\"{SECRET}\"]\nroutes:\n  - name: a\n    upstreams: [127.0.0.1:1]\n"),
            "listen[0].addr: invalid address",
            "line 2",
        ),
        (
            &*format!("listen:\n  - addr: 127.0.0.1:8443\n    tls: {{ cert: nope.pem, key: nope.key }}\nsession:\n  secrets: [\"{SECRET}\"]\nroutes:\n  - name: a\n    upstreams: [127.0.0.1:1]\n"),
            "listen[0].tls.cert: file not found",
            "line 3",
        ),
        (
            &*format!("session:\n  secrets: [\"{SECRET}\"]\n  cookie: {{ same_site: none }}\nroutes:\n  - name: a\n    upstreams: [127.0.0.1:1]\n"),
            "session.cookie.same_site",
            "line 3",
        ),
        (
            &*format!("session:\n  secrets: [\"{SECRET}\"]\n  cookie: {{ secure: never }}\n  keys:\n    csrf: {{ secure: true }}\nroutes:\n  - name: a\n    upstreams: [127.0.0.1:1]\n"),
            "secure: never contradicts the secure key `csrf`",
            "line 3",
        ),
        ("session: [\n", "", "line"),
    ];
    for (i, (yaml, want, line)) in cases.iter().enumerate() {
        let f = write(dir.path(), &format!("bad{i}.yaml"), yaml);
        let (code, _, err) = gimlet(&["check", "-c", &f]);
        assert_ne!(code, 0, "case {i} accepted");
        assert!(err.contains(want), "case {i}: {err}");
        assert!(err.contains(line), "case {i}: {err}");
        // A bad config is a startup error too.
        let (code, _, err) = gimlet(&["run", "-c", &f]);
        assert_ne!(code, 0, "run accepted case {i}");
        assert!(err.contains(want), "run case {i}: {err}");
    }
    let (code, _, err) = gimlet(&["check", "-c", "/nonexistent.yaml"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn check_never_prints_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "c.yaml",
        "session:\n  secrets: [\"my-secret-value-123\"]\nroutes:\n  - name: a\n    upstreams: [127.0.0.1:1]\n",
    );
    let (_, out, err) = gimlet(&["check", "-c", &f]);
    assert!(
        !out.contains("my-secret-value") && !err.contains("my-secret-value"),
        "{err}"
    );
}

#[test]
fn check_connect_reaches_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "c.yaml",
        &format!("session:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: embedded, path: s.redb }}\nroutes:\n  - name: a\n    upstreams: [127.0.0.1:1]\n"),
    );
    let (code, out, err) = gimlet(&["check", "-c", &f, "--connect"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("will be created"), "{out}");
    assert!(
        !dir.path().join("s.redb").exists(),
        "check created the store"
    );
    drop(redb::Database::create(dir.path().join("s.redb")).unwrap());
    let (code, out, err) = gimlet(&["check", "-c", &f, "--connect"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("embedded store reachable"), "{out}");
}

/// Every config shipped in the repository passes `gimlet check`.
#[test]
fn shipped_configs_pass_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["config", "deploy", "examples"] {
        collect_yaml(&root.join(dir), &mut files);
    }
    let configs: Vec<_> = files
        .into_iter()
        .filter(|f| {
            let t = std::fs::read_to_string(f).unwrap();
            t.contains("routes:") && t.contains("session:")
        })
        .collect();
    assert!(!configs.is_empty());
    for f in configs {
        let out = Command::new(bin())
            .args(["check", "-c"])
            .arg(&f)
            .env("GIMLET_SECRET", SECRET)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn collect_yaml(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_yaml(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_serves_the_app_on_the_embedded_store() {
    let demo = Demo::start();
    let c = client();
    let base = &demo.base;
    let r = send(&c, c.get(format!("{base}/"))).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("Gimlet demo"));
    let r = send(
        &c,
        c.post(format!("{base}/login"))
            .body("name=Ada")
            .header("content-type", "application/x-www-form-urlencoded"),
    )
    .await;
    assert_eq!(r.status, 303);
    let mut jar = Jar::default();
    jar.update(&r);
    assert!(jar.get("gimlet").is_some());
    let r = send(
        &c,
        c.post(format!("{base}/count"))
            .header("cookie", jar.header()),
    )
    .await;
    jar.update(&r);
    let r = send(
        &c,
        c.get(format!("{base}/account"))
            .header("cookie", jar.header()),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("Ada"), "{}", r.body);
    let r = send(&c, c.get(format!("{base}/")).header("cookie", jar.header())).await;
    assert!(r.body.contains("id=visits>1<"), "counter: {}", r.body);
    let r = send(&c, c.get(format!("{base}/account"))).await;
    assert_eq!(r.status, 302);
    assert!(demo.dir.path().join("sessions.redb").exists());
}

/// `gimlet demo` edge cases (issue 13, item 3): a second demo on the same
/// data directory says so; `--listen` takes a bare port; a bad `--listen`
/// is named.
#[tokio::test(flavor = "multi_thread")]
async fn demo_edge_cases_say_what_to_do() {
    let first = Demo::start();
    let run = |args: &[&str]| {
        let mut child = Command::new(bin())
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return (status, err);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("gimlet demo {args:?} still running after 5 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let data = first.dir.path().to_str().unwrap().to_string();
    let port = free_port().to_string();
    let (status, err) = run(&[
        "demo",
        "--listen",
        &port,
        "--admin",
        "127.0.0.1:0",
        "--data",
        &data,
    ]);
    assert!(!status.success());
    assert!(err.contains("another gimlet demo is running"), "{err}");
    assert!(err.contains("--data") && err.contains("--listen"), "{err}");
    let (status, err) = run(&["demo", "--listen", "eighty", "--data", &data]);
    assert!(!status.success());
    assert!(err.contains("--listen `eighty` is not an address"), "{err}");

    // A bare port listens on 127.0.0.1.
    let other = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(bin())
        .args([
            "demo",
            "--listen",
            &port.to_string(),
            "--admin",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(other.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_port(format!("127.0.0.1:{port}").parse().unwrap());
    let c = client();
    // The demo app is a second pingora service, bound in the same start
    // as the gateway's listener but not necessarily first: on a loaded
    // machine the very first request may meet it not yet listening (502).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let r = loop {
        let r = send(&c, c.get(format!("http://127.0.0.1:{port}/"))).await;
        if r.status != 502 || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(r.status, 200);
    let _ = child.kill();
    let _ = child.wait();
}

/// `config/gimlet.schema.json` is `gimlet schema`'s output: regenerate it
/// with `gimlet schema > config/gimlet.schema.json` when the config types
/// change. Shipped configs point editors at it.
#[test]
fn the_schema_file_is_current_and_shipped_configs_use_it() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(common::bin())
        .arg("schema")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let file = std::fs::read_to_string(root.join("config/gimlet.schema.json")).unwrap();
    assert!(
        printed == file,
        "config/gimlet.schema.json is stale: run `gimlet schema > config/gimlet.schema.json`"
    );
    let schema: serde_json::Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(
        schema["additionalProperties"], false,
        "unknown fields are errors"
    );
    let session = &schema["$defs"]["RawSession"]["properties"];
    for field in [
        "secrets",
        "revocation",
        "regenerate_grace",
        "user_key",
        "track",
    ] {
        assert!(
            session.get(field).is_some(),
            "session.{field} missing from the schema"
        );
    }
    for (config, schema_path) in [
        ("config/demo.yaml", "gimlet.schema.json"),
        (
            "deploy/systemd/gimlet.yaml",
            "../../config/gimlet.schema.json",
        ),
        ("deploy/gimlet.compose.yaml", "../config/gimlet.schema.json"),
        (
            "deploy/kubernetes/gimlet-config.yaml",
            "../../config/gimlet.schema.json",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(config)).unwrap();
        let first = text.lines().next().unwrap();
        assert_eq!(
            first,
            format!("# yaml-language-server: $schema={schema_path}"),
            "{config}"
        );
        let dir = root.join(config).parent().unwrap().to_path_buf();
        assert!(dir.join(schema_path).exists(), "{config}: {schema_path}");
    }
}

/// `gimlet check --print`: the effective config, defaults filled, `${}`
/// expanded, every secret redacted.
#[test]
fn check_print_shows_the_effective_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("g.yaml");
    std::fs::write(
        &f,
        "admin: { addr: 127.0.0.1:9464, token: \"${ADMIN_TOKEN}\" }\nsession:\n  secrets: [\"${S}\"]\n  revocation: true\nstore: { kind: redis, url: \"redis://:hunter2-password@127.0.0.1:6379/0\" }\nroutes:\n  - name: app\n    upstreams: [\"${UP:-127.0.0.1:8000}\"]\n",
    )
    .unwrap();
    let secret = "printed-secret-0123456789abcdefghijkl";
    let token = "printed-admin-token-0123456789";
    let out = std::process::Command::new(common::bin())
        .args(["check", "--print", "-c"])
        .arg(&f)
        .env("S", secret)
        .env("ADMIN_TOKEN", token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for hidden in [secret, token, "hunter2-password"] {
        assert!(!text.contains(hidden), "{hidden} printed:\n{text}");
    }
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(v["session"]["secrets"][0].as_str(), Some("<redacted>"));
    assert_eq!(v["admin"]["token"].as_str(), Some("<redacted>"));
    assert_eq!(v["session"]["lifetime"].as_str(), Some("7days"));
    assert_eq!(v["session"]["regenerate_grace"].as_str(), Some("10s"));
    assert_eq!(
        v["store"]["url"].as_str(),
        Some("redis://:<redacted>@127.0.0.1:6379/0")
    );
    assert_eq!(v["store"]["timeout"].as_str(), Some("250ms"));
    assert_eq!(
        v["routes"][0]["upstreams"][0].as_str(),
        Some("127.0.0.1:8000")
    );
    assert_eq!(v["routes"][0]["session"]["read"].as_str(), Some("all"));
}
