//! Per-user sessions (`session.user_key`): logging a user out everywhere,
//! `max_per_user`, the admin API on the admin listener and the `gimlet
//! sessions` CLI, on every store.

mod common;
use common::*;
use std::path::Path;

const TOKEN: &str = "admin-token-0123456789abcdef";

fn yaml(up: &Upstream, store: &str, admin_port: u16, extra: &str) -> String {
    format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin: {{ addr: \"127.0.0.1:{admin_port}\", token: \"{TOKEN}\" }}\nserver: {{ threads: 2, grace_period: 1s }}\nsession:\n  secrets: [\"{SECRET}\"]\n  revocation: true\n  user_key: user\n  max_per_user: 3\n  track: [ip, user_agent]\n  keys: {{ user: {{ clientside: true }}, cart: {{ clientside: false }} }}\n{extra}store: {store}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n",
        up.addr
    )
}

fn start(dir: &Path, yaml: &str) -> Gateway {
    let config = dir.join("gimlet.yaml");
    std::fs::write(&config, yaml).unwrap();
    Gateway::spawn(dir, &config)
}

/// A browser with its own `User-Agent`.
struct Device {
    b: Browser,
    ua: String,
}

impl Device {
    fn new(g: &Gateway, ua: &str) -> Device {
        Device {
            b: Browser::new(g),
            ua: ua.to_string(),
        }
    }

    async fn get(&mut self, path: &str, directives: &[(&str, &str)]) -> Resp {
        let r = self
            .b
            .get_with(path, directives, &[("user-agent", &self.ua)])
            .await;
        self.b.jar.update(&r);
        r
    }

    async fn login(&mut self, user: &str) -> String {
        let set = format!("user={user}&cart=1");
        let r = self
            .get(
                "/login",
                &[("X-Session-Regenerate", "1"), ("X-Session-Set", &set)],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        self.id().await.expect("logged in")
    }

    /// The session id the app sees now (`None`: no session).
    async fn id(&mut self) -> Option<String> {
        let r = self.get("/", &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.got_header("x-session-id")
    }
}

async fn api(
    g: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let c = client();
    let url = format!("http://{}{path}", g.admin.unwrap());
    let mut req = c.request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = send(&c, req).await;
    let v = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status, v)
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

async fn users_on(store: &str) {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let g = start(dir.path(), &yaml(&up, store, free_port(), ""));
    let mut d: Vec<Device> = (1..=3)
        .map(|i| Device::new(&g, &format!("device-{i}")))
        .collect();
    let mut alice = Vec::new();
    for dev in &mut d {
        alice.push(dev.login("alice").await);
    }
    let mut bob = Device::new(&g, "bob-phone");
    let bob_id = bob.login("bob").await;

    // The index: three sessions, with what `track` records, never values.
    let (status, v) = api(&g, "GET", "/sessions?user=alice", Some(TOKEN)).await;
    assert_eq!(status, 200, "{store}: {v}");
    assert_eq!(ids(&v), sorted(alice.clone()), "{store}");
    let text = v.to_string();
    assert!(!text.contains("alice") && !text.contains("\"1\""), "{text}");
    for s in v["sessions"].as_array().unwrap() {
        assert_eq!(s["ip"], "127.0.0.1", "{s}");
        assert!(s["user_agent"].as_str().unwrap().starts_with("device-"));
        let (c, seen, exp) = (
            s["created"].as_u64().unwrap(),
            s["last_seen"].as_u64().unwrap(),
            s["expires"].as_u64().unwrap(),
        );
        assert!(c <= seen && seen < exp, "{s}");
    }
    let tag = |v: &serde_json::Value, id: &str| {
        v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .map(|s| s["tag"].as_str().unwrap().to_string())
            .unwrap()
    };
    let tag2 = tag(&v, &alice[1]);

    // A fourth login pushes out the oldest session.
    let mut d4 = Device::new(&g, "device-4");
    let fourth = d4.login("alice").await;
    assert_eq!(
        d[0].id().await,
        None,
        "{store}: the oldest session lives on"
    );
    assert_eq!(d[1].id().await.as_ref(), Some(&alice[1]));
    let (_, v) = api(&g, "GET", "/sessions?user=alice", Some(TOKEN)).await;
    assert_eq!(
        ids(&v),
        sorted(vec![alice[1].clone(), alice[2].clone(), fourth.clone()]),
        "{store}"
    );
    assert_eq!(
        g.metric("gimlet_sessions_total{event=\"evicted\"}").await,
        1.0
    );

    // One session's metadata and key names, never values.
    let (status, v) = api(
        &g,
        "GET",
        &format!("/sessions/{}?tag={tag2}", alice[1]),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{store}: {v}");
    assert_eq!(v["keys"]["p"], serde_json::json!(["cart"]), "{v}");
    assert_eq!(v["ended"], false);

    // Log out everywhere: every session of alice ends, bob's does not.
    let r = d[1].get("/logout", &[("X-Session-Destroy", "user")]).await;
    assert_eq!(r.status, 200, "{store}: {}", r.body);
    for dev in d.iter_mut().skip(1) {
        assert_eq!(dev.id().await, None, "{store}: {} lives on", dev.ua);
    }
    assert_eq!(d4.id().await, None, "{store}");
    assert_eq!(bob.id().await, Some(bob_id.clone()), "{store}");
    let (_, v) = api(&g, "GET", "/sessions?user=alice", Some(TOKEN)).await;
    assert!(ids(&v).is_empty(), "{store}: {v}");
    assert_eq!(
        g.metric("gimlet_sessions_total{event=\"revoked\"}").await,
        2.0
    );
    let (_, v) = api(
        &g,
        "GET",
        &format!("/sessions/{}?tag={tag2}", alice[1]),
        Some(TOKEN),
    )
    .await;
    assert_eq!(v["ended"], true, "{store}: {v}");

    // A later login is unaffected, and the API ends it.
    let mut d5 = Device::new(&g, "device-5");
    let fifth = d5.login("alice").await;
    assert_eq!(d5.id().await, Some(fifth.clone()));
    let (_, v) = api(&g, "GET", "/sessions?user=alice", Some(TOKEN)).await;
    assert_eq!(ids(&v), vec![fifth.clone()]);
    let t5 = tag(&v, &fifth);
    let (status, v) = api(
        &g,
        "DELETE",
        &format!("/sessions/{fifth}?tag={t5}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        (status, v["ended"].as_u64()),
        (200, Some(1)),
        "{store}: {v}"
    );
    assert_eq!(d5.id().await, None, "{store}");

    // "Log out the other devices, stay here": Destroy: user + a new login
    // of the same user ends the others and keeps this one.
    let mut e1 = Device::new(&g, "device-6");
    let mut e2 = Device::new(&g, "device-7");
    e1.login("alice").await;
    let other = e2.login("alice").await;
    let r = e1
        .get(
            "/others-out",
            &[
                ("X-Session-Destroy", "user"),
                ("X-Session-Set", "user=alice"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{store}: {}", r.body);
    let kept = e1.id().await.expect("still logged in here");
    assert_eq!(e2.id().await, None, "{store}: the other device lives on");
    let (_, v) = api(&g, "GET", "/sessions?user=alice", Some(TOKEN)).await;
    assert_eq!(ids(&v), vec![kept.clone()], "{store}: {v}");
    assert_ne!(kept, other);
    // The user key cannot be incremented (the index would not know it).
    let r = e1.get("/", &[("X-Session-Incr", "user=1")]).await;
    assert_eq!(r.status, 502, "{store}: {}", r.body);
    assert!(r.body.contains("(not_allowed)"));
    // A tag is exactly 8 hex digits.
    let (status, _) = api(&g, "GET", &format!("/sessions/{kept}?tag=+1f"), Some(TOKEN)).await;
    assert_eq!(status, 400);

    // All of a user's, through the API.
    let (status, v) = api(&g, "DELETE", "/sessions?user=bob", Some(TOKEN)).await;
    assert_eq!(
        (status, v["ended"].as_u64()),
        (200, Some(1)),
        "{store}: {v}"
    );
    assert_eq!(bob.id().await, None, "{store}");

    // Without the token, nothing.
    let (status, _) = api(&g, "GET", "/sessions?user=alice", None).await;
    assert_eq!(status, 401);
    let (status, _) = api(
        &g,
        "DELETE",
        "/sessions?user=alice",
        Some("wrong-token-0123456789"),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        g.metric("gimlet_admin_requests_total{op=\"list\",status=\"401\"}")
            .await,
        1.0
    );
    assert_eq!(
        g.metric("gimlet_admin_requests_total{op=\"revoke_user\",status=\"200\"}")
            .await,
        1.0
    );
    assert!(!g.log().contains(TOKEN), "the token was logged");
    assert!(!g.log().contains("alice"), "a user's name was logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn logout_everywhere_max_per_user_and_the_admin_api_on_every_store() {
    users_on("{ kind: memory }").await;
    users_on("{ kind: embedded }").await;
    let r = RedisServer::start();
    users_on(&format!(
        "{{ kind: redis, url: \"{}\", timeout: 500ms }}",
        r.url()
    ))
    .await;
    let cluster = Cluster::start();
    users_on(&cluster.store()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_api_is_off_without_a_token() {
    let up = Upstream::start();
    let g = Gateway::start(&config(&up, "", "{ kind: memory }", ""));
    let (status, v) = api(&g, "GET", "/sessions?user=alice", Some(TOKEN)).await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("admin.token"));
}

#[tokio::test(flavor = "multi_thread")]
async fn user_key_needs_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("g.yaml");
    std::fs::write(
        &f,
        format!("session:\n  secrets: [\"{SECRET}\"]\n  user_key: user\n  max_per_user: 0\nroutes:\n  - name: a\n    upstreams: [\"127.0.0.1:1\"]\n"),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", "-c"])
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("session.user_key: needs session.revocation: true"),
        "{err}"
    );
    assert!(
        err.contains("session.max_per_user: must be at least 1"),
        "{err}"
    );
    std::fs::write(
        &f,
        format!("session:\n  secrets: [\"{SECRET}\"]\n  revocation: true\n  user_key: user\n  keys: {{ user: {{ secure: true }} }}\nroutes:\n  - name: a\n    upstreams: [\"127.0.0.1:1\"]\n"),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", "-c"])
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("session.user_key: must not be a secure key"),
        "{err}"
    );
}

fn cli(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin())
        .arg("sessions")
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sessions_cli_lists_shows_and_revokes() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    // The token from a file, as an operator would keep it.
    std::fs::write(dir.path().join("admin.token"), format!("{TOKEN}\n")).unwrap();
    let y = yaml(&up, "{ kind: embedded }", free_port(), "").replace(
        &format!("token: \"{TOKEN}\""),
        "token: \"file:admin.token\"",
    );
    let g = start(dir.path(), &y);
    let mut a = Device::new(&g, "Firefox/1");
    let mut b = Device::new(&g, "Safari/2");
    let ia = a.login("alice").await;
    let ib = b.login("alice").await;
    let (ok, out, err) = cli(&g.config, &["list", "--user", "alice"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("LAST SEEN"),
        "{out}"
    );
    assert!(
        out.contains(&ia) && out.contains(&ib) && out.contains("Firefox/1"),
        "{out}"
    );
    assert_eq!(lines.last(), Some(&"2 sessions"), "{out}");
    let (ok, out, _) = cli(&g.config, &["list", "--user", "alice", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sessions"].as_array().unwrap().len(), 2);
    let (ok, out, err) = cli(&g.config, &["show", &ia]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("id:            {ia}")) && out.contains("cart"),
        "{out}"
    );
    let (ok, out, err) = cli(&g.config, &["revoke", &ia]);
    assert!(ok && out.contains("ended 1 session"), "{out}{err}");
    assert_eq!(a.id().await, None);
    let (ok, out, err) = cli(&g.config, &["revoke", "--user", "alice"]);
    assert!(ok && out.contains("ended 1 session"), "{out}{err}");
    assert_eq!(b.id().await, None);
    let (ok, out, _) = cli(&g.config, &["list", "--user", "alice"]);
    assert!(ok && out.ends_with("0 sessions\n"), "{out}");
    let (ok, _, err) = cli(&g.config, &["show", "nothex"]);
    assert!(!ok && err.contains("400"), "{err}");
}
