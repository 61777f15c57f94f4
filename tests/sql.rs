//! The SQL store (PostgreSQL) through the gateway, against private servers
//! the tests start themselves (`initdb` + `pg_ctl` on free loopback ports),
//! so they can stop and start them. The store's semantics are in
//! `tests/conformance.rs`; this file is what a user sees: statements per
//! request, lost updates, outages, expiry cleanup, the schema commands.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn sql_yaml(up: &Upstream, store: &str, extra_session: &str) -> String {
    format!(
        "session:\n  secrets: [\"{SECRET}\"]\n  keys: {{ cart: {{ clientside: true }} }}\n{extra_session}store: {store}\nroutes:\n  - name: ro\n    match: {{ path_prefix: /ro }}\n    upstreams: [\"{a}\"]\n    session: {{ read: none, write: none }}\n  - name: cartonly\n    match: {{ path_prefix: /cart }}\n    upstreams: [\"{a}\"]\n    session: {{ read: [cart], write: [cart] }}\n  - name: app\n    upstreams: [\"{a}\"]\n",
        a = up.addr
    )
}

fn store_for(pg: &PgServer, extra: &str) -> String {
    format!(
        "{{ kind: sql, url: \"{}\", timeout: 500ms{extra} }}",
        pg.url()
    )
}

fn total(stats: &BTreeMap<String, u64>) -> u64 {
    stats.values().sum()
}

/// Calls of the statements whose text starts with `prefix`.
fn calls(stats: &BTreeMap<String, u64>, prefix: &str) -> u64 {
    stats
        .iter()
        .filter(|(q, _)| q.starts_with(prefix))
        .map(|(_, n)| n)
        .sum()
}

const READ: &str = "SELECT d.ch, d.name, d.value";
const WRITE: &str = "SELECT gimlet_write_v1(";

/// Statements per request, counted by the server (`pg_stat_statements`):
/// none without server-side data, one `SELECT` per read, one statement
/// per write whatever it carries.
#[tokio::test(flavor = "multi_thread")]
async fn statements_per_request() {
    let pg = PgServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&sql_yaml(&up, &store_for(&pg, ", sql: { pool: 1 }"), ""));
    let mut b = Browser::new(&g);

    // Warm: the schema made, each statement prepared once.
    let mut warm = Browser::new(&g);
    warm.get("/", &[("X-Session-Set", "w=1")]).await;
    warm.get("/", &[("X-Session-Set", "w=2")]).await;

    pg.reset_statements();
    b.get("/", &[]).await;
    assert_eq!(
        total(&pg.statements()),
        0,
        "no cookie: {:?}",
        pg.statements()
    );

    // A cookie-only session: no store I/O in either direction.
    b.get("/", &[("X-Session-Set", "cart=apple")]).await;
    b.get("/", &[]).await;
    b.get("/cart", &[("X-Session-Set", "cart=pear")]).await;
    assert_eq!(
        total(&pg.statements()),
        0,
        "cookie-only: {:?}",
        pg.statements()
    );

    // The first server-side key: one write statement, no read.
    b.get("/", &[("X-Session-Set", "user=alice")]).await;
    let s = pg.statements();
    assert_eq!((calls(&s, WRITE), total(&s)), (1, 1), "{s:?}");
    pg.reset_statements();

    // A server-side read: one SELECT.
    let resp = b.get("/", &[]).await;
    assert_eq!(resp.session()["user"], "alice");
    let s = pg.statements();
    assert_eq!((calls(&s, READ), total(&s)), (1, 1), "{s:?}");
    pg.reset_statements();

    // read: none, and a route that reads clientside keys only: zero.
    b.get("/ro", &[]).await;
    b.get("/cart", &[]).await;
    assert_eq!(total(&pg.statements()), 0, "{:?}", pg.statements());

    // Directives: one read (the route reads all) and one write.
    b.get(
        "/",
        &[
            ("X-Session-Set", "a=1&b=2"),
            ("X-Session-Delete", "w"),
            ("X-Session-Incr", "n=3"),
        ],
    )
    .await;
    let s = pg.statements();
    assert_eq!(
        (calls(&s, READ), calls(&s, WRITE), total(&s)),
        (1, 1, 2),
        "{s:?}"
    );
    let s = b.get("/", &[]).await.session();
    assert_eq!(
        (s["a"].as_str(), s["b"].as_str(), s["n"].as_str()),
        ("1", "2", "3")
    );

    // A session of 200 keys: a one-key Set is still one statement, and
    // touches one key row and the session row.
    let many: Vec<String> = (0..200).map(|i| format!("k{i}=v{i}")).collect();
    b.get("/", &[("X-Session-Set", &many.join("&"))]).await;
    let id = b.get("/", &[]).await.got_header("x-session-id").unwrap();
    pg.reset_statements();
    pg.psql("SELECT pg_stat_reset()");
    b.get("/", &[("X-Session-Set", "k7=changed")]).await;
    let s = pg.statements();
    assert_eq!(calls(&s, WRITE), 1, "{s:?}");
    assert_eq!(
        pg.psql(&format!(
            "SELECT value FROM gimlet_data WHERE id = '{id}' AND name = 'k7'"
        )),
        "changed"
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT keys FROM gimlet_sessions WHERE id = '{id}'"
        )),
        "204"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_sets_and_incr_across_two_gateways() {
    let pg = PgServer::start();
    let up = Upstream::start();
    let g1 = Gateway::start(&sql_yaml(&up, &store_for(&pg, ""), ""));
    let g2 = Gateway::start(&sql_yaml(&up, &store_for(&pg, ""), ""));
    let mut b = Browser::new(&g1);
    b.get("/", &[("X-Session-Set", "start=1")]).await;
    let urls = (0..100)
        .map(|i| {
            let gw = if i % 2 == 0 { &g1 } else { &g2 };
            let set = format!("k{i}={i}");
            let mut d = vec![("X-Session-Incr", "hits=1")];
            if i < 50 {
                d.push(("X-Session-Set", &set));
            }
            format!("http://{}{}", gw.addr, path_with("/", &d))
        })
        .collect();
    all_at_once(urls, &b.jar.header()).await;
    let s = b.get("/", &[]).await.session();
    assert_eq!(s["hits"], "100");
    for i in 0..50 {
        assert_eq!(s.get(&format!("k{i}")), Some(&i.to_string()), "k{i} lost");
    }
    b.base = format!("http://{}", g2.addr);
    assert_eq!(b.get("/", &[]).await.session()["hits"], "100");
    // The running totals agree with the rows.
    let id = b.get("/", &[]).await.got_header("x-session-id").unwrap();
    assert_eq!(
        pg.psql(&format!(
            "SELECT s.keys = count(d.*) AND s.bytes = sum(octet_length(d.name) + octet_length(d.value)) \
             FROM gimlet_sessions s JOIN gimlet_data d ON d.id = s.id WHERE s.id = '{id}' GROUP BY s.keys, s.bytes"
        )),
        "t"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_down_fail_mode_then_back() {
    let mut pg = PgServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&sql_yaml(&up, &store_for(&pg, ""), ""));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice&cart=pear")])
        .await;
    assert_eq!(b.get("/", &[]).await.session()["user"], "alice");
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);

    pg.kill();
    for _ in 0..5 {
        let t = Instant::now();
        let resp = b.get("/", &[]).await;
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "took {:?}",
            t.elapsed()
        );
        assert_eq!(resp.status, 503, "{}", resp.body);
        assert_eq!(resp.header("retry-after"), Some("1"));
    }
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        hits,
        "the upstream was called"
    );
    let mut fresh = Browser::new(&g);
    let resp = fresh.get("/", &[("X-Session-Set", "user=bob")]).await;
    assert_eq!(resp.status, 503);
    assert!(resp.set_cookies.is_empty());
    assert_eq!(b.get("/ro", &[]).await.status, 200);
    assert_eq!(b.get("/cart", &[]).await.session()["cart"], "pear");
    let m = g.metrics().await;
    assert!(failed_reads(&m) >= 5.0, "{m}");

    // Back: the session outlived the outage (PostgreSQL keeps its data),
    // and the first request on the new connections succeeds.
    pg.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = b.get("/", &[]).await;
        if resp.status == 200 {
            assert_eq!(resp.session()["user"], "alice");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never recovered: {}",
            resp.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        b.get("/", &[("X-Session-Set", "user=carol")]).await.status,
        200
    );
    assert_eq!(b.get("/", &[]).await.session()["user"], "carol");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_request_after_a_postgres_restart_succeeds() {
    let mut pg = PgServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&sql_yaml(&up, &store_for(&pg, ""), ""));
    let c = client();
    let admin = g.admin.unwrap();
    for what in ["read", "write", "readyz"] {
        let mut b = Browser::new(&g);
        b.get("/", &[("X-Session-Set", "user=alice")]).await;
        assert_eq!(b.get("/", &[]).await.session()["user"], "alice");
        pg.kill();
        pg.restart();
        let status = match what {
            "read" => b.get("/", &[]).await.status,
            "write" => b.get("/", &[("X-Session-Set", "user=bob")]).await.status,
            _ => {
                send(&c, c.get(format!("http://{admin}/readyz")))
                    .await
                    .status
            }
        };
        assert_eq!(
            status,
            200,
            "the first {what} after a restart failed: {}",
            g.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_down_degrade_mode() {
    let mut pg = PgServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&sql_yaml(&up, &store_for(&pg, ", on_error: degrade"), ""));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice&cart=pear")])
        .await;
    pg.kill();
    let t = Instant::now();
    let resp = b.get("/", &[]).await;
    assert!(t.elapsed() < Duration::from_millis(1500));
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.got_header("x-session-degraded").as_deref(), Some("1"));
    let s = resp.session();
    assert_eq!(s.get("cart").map(String::as_str), Some("pear"));
    assert_eq!(s.get("user"), None);
    let resp = b.get("/", &[("X-Session-Set", "user=mallory")]).await;
    assert_eq!(resp.status, 502);
    assert!(resp.body.contains("store_unavailable"), "{}", resp.body);
    assert_eq!(
        b.get("/", &[("X-Session-Set", "cart=fig")]).await.status,
        200
    );
    pg.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while b
        .get("/", &[])
        .await
        .got_header("x-session-degraded")
        .is_some()
    {
        assert!(Instant::now() < deadline, "still degraded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = b.get("/", &[]).await.session();
    assert_eq!((s["cart"].as_str(), s["user"].as_str()), ("fig", "alice"));
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_and_check_connect_follow_postgres() {
    let mut pg = PgServer::start();
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let yaml = sql_yaml(&up, &store_for(&pg, ""), "");
    let g = Gateway::start_in(dir.path(), &yaml);
    let file = dir.path().join("check.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let check = || {
        std::process::Command::new(bin())
            .args(["check", "--connect", "-c"])
            .arg(&file)
            .output()
            .unwrap()
    };
    let admin = g.admin.unwrap();
    let c = client();
    let ready = || async {
        send(&c, c.get(format!("http://{admin}/readyz")))
            .await
            .status
    };
    assert_eq!(ready().await, 200);
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("sql store reachable"));
    pg.kill();
    assert_eq!(ready().await, 503);
    let out = check();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("store check failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready().await != 200 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Expired sessions are invisible at once and deleted by the cleanup task
/// (`store.sql.cleanup_interval`), with old marks and user-index entries,
/// counted in a metric.
#[tokio::test(flavor = "multi_thread")]
async fn expired_sessions_are_cleaned_up() {
    let pg = PgServer::start();
    let up = Upstream::start();
    let g = Gateway::start(&sql_yaml(
        &up,
        &store_for(&pg, ", sql: { cleanup_interval: 500ms }"),
        "  lifetime: 2s\n",
    ));
    // A second gateway on the same database whose sessions live longer
    // (and whose cleanup runs only at its start).
    let g2 = Gateway::start(&sql_yaml(
        &up,
        &store_for(&pg, ", sql: { cleanup_interval: 1h }"),
        "",
    ));
    let mut keep = Browser::new(&g2);
    keep.get("/", &[("X-Session-Set", "user=kept")]).await;
    let mut first = Browser::new(&g);
    for i in 0..30 {
        let mut b = Browser::new(&g);
        b.get("/", &[("X-Session-Set", &format!("user=u{i}&n=1"))])
            .await;
        if i == 0 {
            first = b;
        }
    }
    pg.psql("INSERT INTO gimlet_marks (id, ended_until) VALUES ('old', 1)");
    pg.psql("INSERT INTO gimlet_users VALUES ('someone', 'old', 1, 1, '{}')");
    assert_eq!(pg.psql("SELECT count(*) FROM gimlet_sessions"), "31");
    assert_eq!(pg.psql("SELECT count(*) FROM gimlet_data"), "61");
    assert_eq!(first.get("/", &[]).await.session()["user"], "u0");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    // Past its expiry a session reads as empty, swept or not.
    assert_eq!(first.get("/", &[]).await.session().get("user"), None);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = pg.psql(
            "SELECT (SELECT count(*) FROM gimlet_sessions) || ' ' || \
             (SELECT count(*) FROM gimlet_marks) || ' ' || (SELECT count(*) FROM gimlet_users)",
        );
        if left == "1 0 0" {
            break;
        }
        assert!(Instant::now() < deadline, "not cleaned up: {left}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(pg.psql("SELECT count(*) FROM gimlet_data"), "1");
    assert_eq!(keep.get("/", &[]).await.session()["user"], "kept");
    assert_eq!(g.metric("gimlet_store_cleanup_deleted_total").await, 30.0);
    assert!(g.metric("gimlet_store_cleanups_total{result=\"ok\"}").await >= 2.0);
}

/// `create_schema: false`: the gateway does not touch the schema; until
/// `gimlet migrate` made it, the store is not ready. `migrate --print`
/// shows the SQL a DBA would run.
#[tokio::test(flavor = "multi_thread")]
async fn migrate_makes_the_schema_the_gateway_does_not() {
    let pg = PgServer::start();
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let yaml = sql_yaml(&up, &store_for(&pg, ", sql: { create_schema: false }"), "");
    let g = Gateway::start_in(dir.path(), &yaml);
    let file = dir.path().join("m.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let mut b = Browser::new(&g);
    let resp = b.get("/", &[("X-Session-Set", "user=alice")]).await;
    assert_eq!(resp.status, 503, "{}", resp.body);
    assert_eq!(
        pg.psql("SELECT to_regclass('gimlet_sessions') IS NULL"),
        "t"
    );

    let out = std::process::Command::new(bin())
        .args(["migrate", "--print"])
        .output()
        .unwrap();
    let ddl = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        ddl.contains("CREATE TABLE IF NOT EXISTS gimlet_data"),
        "{ddl}"
    );
    assert!(!ddl.contains(&pg.port.to_string()));

    for _ in 0..2 {
        // Twice: migrate is idempotent.
        let out = std::process::Command::new(bin())
            .args(["migrate", "-c"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("schema up to date"));
    }
    assert_eq!(
        b.get("/", &[("X-Session-Set", "user=alice")]).await.status,
        200
    );
    assert_eq!(b.get("/", &[]).await.session()["user"], "alice");

    // A config of another store kind: nothing to migrate, said so.
    let other = dir.path().join("mem.yaml");
    std::fs::write(&other, sql_yaml(&up, "{ kind: memory }", "")).unwrap();
    let out = std::process::Command::new(bin())
        .args(["migrate", "-c"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not sql"));
}

/// Config errors name the field; the password never shows.
#[test]
fn sql_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let up_addr = "127.0.0.1:9";
    let cases = [
        ("{ kind: sql }", "store.url: kind: sql needs `url`"),
        (
            "{ kind: sql, url: \"mysql://root:hunter2@h/db\" }",
            "MySQL and MariaDB are not supported yet",
        ),
        (
            "{ kind: sql, url: \"redis://:hunter2@h\" }",
            "expected a postgres:// or postgresql:// URL",
        ),
        (
            "{ kind: sql, url: \"postgres://u:hunter2@h/db\", sql: { cleanup_interval: 0s } }",
            "store.sql.cleanup_interval: must be longer than 0",
        ),
        (
            "{ kind: sql, url: \"postgres://u:hunter2@h/db\", sql: { pool: 0 } }",
            "store.sql.pool: must be at least 1",
        ),
        (
            "{ kind: redis, url: \"redis://h\", sql: { pool: 2 } }",
            "store.sql: only used with kind: sql",
        ),
    ];
    for (store, want) in cases {
        let f = dir.path().join("c.yaml");
        std::fs::write(
            &f,
            format!(
                "session:\n  secrets: [\"{SECRET}\"]\nstore: {store}\nroutes:\n  - name: a\n    upstreams: [\"{up_addr}\"]\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(bin())
            .args(["check", "-c"])
            .arg(&f)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{store}");
        assert!(err.contains(want), "{store}: {err}");
        assert!(!err.contains("hunter2"), "{store}: {err}");
    }
    // The effective config hides the password.
    let f = dir.path().join("ok.yaml");
    std::fs::write(
        &f,
        format!(
            "session:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: sql, url: \"postgres://u:hunter2@h/db\" }}\nroutes:\n  - name: a\n    upstreams: [\"{up_addr}\"]\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", "--print", "-c"])
        .arg(&f)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("cleanup_interval: 1m"), "{printed}");
    assert!(!printed.contains("hunter2"), "{printed}");
}
