//! The SQL store through the gateway, on PostgreSQL and on MariaDB, against
//! private servers the tests start themselves (`initdb` + `pg_ctl`,
//! `mariadb-install-db` + `mariadbd`, on free loopback ports), so they can
//! stop and start them. The store's semantics are in `tests/conformance.rs`;
//! this file is what a user sees: statements per request, lost updates,
//! outages, expiry cleanup, the schema commands. Each test runs on both.

mod common;
use common::*;
use std::time::{Duration, Instant};

enum Db {
    Pg(PgServer),
    Maria(MariaServer),
}

impl Db {
    fn url(&self) -> String {
        match self {
            Db::Pg(p) => p.url(),
            Db::Maria(m) => m.url(),
        }
    }

    fn kill(&mut self) {
        match self {
            Db::Pg(p) => p.kill(),
            Db::Maria(m) => m.kill(),
        }
    }

    fn restart(&mut self) {
        match self {
            Db::Pg(p) => p.restart(),
            Db::Maria(m) => m.restart(),
        }
    }

    /// One statement through the server's own client; its output.
    fn q(&self, sql: &str) -> String {
        match self {
            Db::Pg(p) => p.psql(sql),
            Db::Maria(m) => m.sql(sql),
        }
    }

    fn count(&self, table: &str) -> String {
        self.q(&format!("SELECT count(*) FROM {table}"))
    }

    fn value(&self, id: &str, name: &str) -> String {
        let v = match self {
            Db::Pg(_) => "convert_from(value, 'UTF8')",
            Db::Maria(_) => "value",
        };
        self.q(&format!(
            "SELECT {v} FROM gimlet_data WHERE id = '{id}' AND name = '{name}'"
        ))
    }

    /// Do the session's running totals agree with its rows?
    fn totals_match(&self, id: &str) -> bool {
        self.q(&format!(
            "SELECT CASE WHEN s.key_count = count(*) AND \
             s.byte_count = sum(octet_length(d.name) + octet_length(d.value)) THEN 'yes' ELSE 'no' END \
             FROM gimlet_sessions s JOIN gimlet_data d ON d.id = s.id WHERE s.id = '{id}' \
             GROUP BY s.key_count, s.byte_count"
        )) == "yes"
    }

    fn port(&self) -> u16 {
        match self {
            Db::Pg(p) => p.port,
            Db::Maria(m) => m.port,
        }
    }
}

/// Statements the gateways sent, counted by the server: PostgreSQL's
/// `pg_stat_statements` (top level only), MariaDB's prepared statement
/// executions (sqlx prepares every statement; a procedure's inner
/// statements are not counted).
struct Stats<'a> {
    db: &'a Db,
    base: (u64, u64),
}

impl<'a> Stats<'a> {
    fn reset(db: &'a Db) -> Stats<'a> {
        let base = match db {
            Db::Pg(p) => {
                p.reset_statements();
                (0, 0)
            }
            Db::Maria(m) => (m.executes(), m.calls()),
        };
        Stats { db, base }
    }

    /// (reads, writes, all).
    fn counts(&self) -> (u64, u64, u64) {
        match self.db {
            Db::Pg(p) => {
                let s = p.statements();
                let of = |f: &dyn Fn(&str) -> bool| -> u64 {
                    s.iter().filter(|(q, _)| f(q)).map(|(_, n)| n).sum()
                };
                (
                    of(&|q| q.contains("UNION ALL")),
                    of(&|q| q.contains("gimlet_write_v1")),
                    of(&|_| true),
                )
            }
            Db::Maria(m) => {
                let all = m.executes() - self.base.0;
                let calls = m.calls() - self.base.1;
                (all.saturating_sub(calls), calls, all)
            }
        }
    }
}

macro_rules! on_both {
    ($test:ident) => {
        mod $test {
            use super::*;
            #[tokio::test(flavor = "multi_thread")]
            async fn postgres() {
                super::$test(Db::Pg(PgServer::start())).await;
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn mariadb() {
                super::$test(Db::Maria(MariaServer::start())).await;
            }
        }
    };
}

fn sql_yaml(up: &Upstream, store: &str, extra_session: &str) -> String {
    format!(
        "session:\n  secrets: [\"{SECRET}\"]\n  keys: {{ cart: {{ clientside: true }} }}\n{extra_session}store: {store}\nroutes:\n  - name: ro\n    match: {{ path_prefix: /ro }}\n    upstreams: [\"{a}\"]\n    session: {{ read: none, write: none }}\n  - name: cartonly\n    match: {{ path_prefix: /cart }}\n    upstreams: [\"{a}\"]\n    session: {{ read: [cart], write: [cart] }}\n  - name: app\n    upstreams: [\"{a}\"]\n",
        a = up.addr
    )
}

fn store_for(db: &Db, extra: &str) -> String {
    format!(
        "{{ kind: sql, url: \"{}\", timeout: 500ms{extra} }}",
        db.url()
    )
}

/// Statements per request, counted by the server: none without
/// server-side data, one per read, one per write whatever it carries.
async fn statements_per_request(db: Db) {
    let up = Upstream::start();
    let g = Gateway::start(&sql_yaml(&up, &store_for(&db, ", sql: { pool: 1 }"), ""));
    let mut b = Browser::new(&g);

    // Warm: the schema made, each statement prepared once.
    let mut warm = Browser::new(&g);
    warm.get("/", &[("X-Session-Set", "w=1")]).await;
    warm.get("/", &[("X-Session-Set", "w=2")]).await;

    let s = Stats::reset(&db);
    b.get("/", &[]).await;
    assert_eq!(s.counts(), (0, 0, 0), "no cookie");

    // A cookie-only session: no store I/O in either direction.
    b.get("/", &[("X-Session-Set", "cart=apple")]).await;
    b.get("/", &[]).await;
    b.get("/cart", &[("X-Session-Set", "cart=pear")]).await;
    assert_eq!(s.counts(), (0, 0, 0), "cookie-only");

    // The first server-side key: one write statement, no read.
    b.get("/", &[("X-Session-Set", "user=alice")]).await;
    assert_eq!(s.counts(), (0, 1, 1), "first key");

    // A server-side read: one SELECT.
    let s = Stats::reset(&db);
    let resp = b.get("/", &[]).await;
    assert_eq!(resp.session()["user"], "alice");
    assert_eq!(s.counts(), (1, 0, 1), "a read");

    // read: none, and a route that reads clientside keys only: zero.
    let s = Stats::reset(&db);
    b.get("/ro", &[]).await;
    b.get("/cart", &[]).await;
    assert_eq!(s.counts(), (0, 0, 0), "no server-side read");

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
    assert_eq!(s.counts(), (1, 1, 2), "directives");
    let got = b.get("/", &[]).await.session();
    assert_eq!(
        (got["a"].as_str(), got["b"].as_str(), got["n"].as_str()),
        ("1", "2", "3")
    );

    // A session of 200 keys: a one-key Set is still one read and one write
    // statement, and the totals stay right.
    let many: Vec<String> = (0..200).map(|i| format!("k{i}=v{i}")).collect();
    b.get("/", &[("X-Session-Set", &many.join("&"))]).await;
    let id = b.get("/", &[]).await.got_header("x-session-id").unwrap();
    let s = Stats::reset(&db);
    b.get("/", &[("X-Session-Set", "k7=changed")]).await;
    assert_eq!(
        s.counts(),
        (1, 1, 2),
        "a one-key write to a 204-key session"
    );
    assert_eq!(db.value(&id, "k7"), "changed");
    assert_eq!(
        db.q(&format!(
            "SELECT key_count FROM gimlet_sessions WHERE id = '{id}'"
        )),
        "204"
    );
    assert!(db.totals_match(&id));
}
on_both!(statements_per_request);

/// Lost updates: 50 parallel Sets of different keys and 100 parallel Incr,
/// half through each of two gateways.
async fn parallel_sets_and_incr_across_two_gateways(db: Db) {
    let up = Upstream::start();
    let g1 = Gateway::start(&sql_yaml(&up, &store_for(&db, ""), ""));
    let g2 = Gateway::start(&sql_yaml(&up, &store_for(&db, ""), ""));
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
    assert!(db.totals_match(&id));
}
on_both!(parallel_sets_and_incr_across_two_gateways);

async fn down_in_fail_mode_then_back(mut db: Db) {
    let up = Upstream::start();
    let g = Gateway::start(&sql_yaml(&up, &store_for(&db, ""), ""));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice&cart=pear")])
        .await;
    assert_eq!(b.get("/", &[]).await.session()["user"], "alice");
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);

    db.kill();
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

    // Back: the session outlived the outage (the database keeps its data),
    // and the first request on the new connections succeeds.
    db.restart();
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
on_both!(down_in_fail_mode_then_back);

async fn the_first_request_after_a_restart_succeeds(mut db: Db) {
    let up = Upstream::start();
    let g = Gateway::start(&sql_yaml(&up, &store_for(&db, ""), ""));
    let c = client();
    let admin = g.admin.unwrap();
    for what in ["read", "write", "readyz", "write only, after 6 s idle"] {
        let mut b = Browser::new(&g);
        b.get("/", &[("X-Session-Set", "user=alice")]).await;
        assert_eq!(b.get("/", &[]).await.session()["user"], "alice");
        db.kill();
        db.restart();
        let status = match what {
            "read" => b.get("/", &[]).await.status,
            "write" => b.get("/", &[("X-Session-Set", "user=bob")]).await.status,
            "write only, after 6 s idle" => {
                // A new visitor's first key: a write and no read, on a
                // pooled connection the restart killed; idle past 5 s, it
                // is pinged (and replaced) before the write is sent.
                tokio::time::sleep(Duration::from_secs(6)).await;
                let mut fresh = Browser::new(&g);
                fresh
                    .get("/", &[("X-Session-Set", "user=carol")])
                    .await
                    .status
            }
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
on_both!(the_first_request_after_a_restart_succeeds);

async fn down_in_degrade_mode(mut db: Db) {
    let up = Upstream::start();
    let g = Gateway::start(&sql_yaml(&up, &store_for(&db, ", on_error: degrade"), ""));
    let mut b = Browser::new(&g);
    b.get("/", &[("X-Session-Set", "user=alice&cart=pear")])
        .await;
    db.kill();
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
    db.restart();
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
on_both!(down_in_degrade_mode);

async fn readyz_and_check_connect_follow_the_database(mut db: Db) {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let yaml = sql_yaml(&up, &store_for(&db, ""), "");
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
    db.kill();
    assert_eq!(ready().await, 503);
    let out = check();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("store check failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    db.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready().await != 200 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
on_both!(readyz_and_check_connect_follow_the_database);

/// Expired sessions are invisible at once and deleted by the cleanup task
/// (`store.sql.cleanup_interval`), with old marks and user-index entries,
/// counted in a metric.
async fn expired_sessions_are_cleaned_up(db: Db) {
    let up = Upstream::start();
    let g = Gateway::start(&sql_yaml(
        &up,
        &store_for(&db, ", sql: { cleanup_interval: 500ms }"),
        "  lifetime: 2s\n",
    ));
    // A second gateway on the same database whose sessions live longer
    // (and whose first cleanup is an hour away).
    let g2 = Gateway::start(&sql_yaml(
        &up,
        &store_for(&db, ", sql: { cleanup_interval: 1h }"),
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
    db.q("INSERT INTO gimlet_marks (id, ended_until) VALUES ('old', 1)");
    db.q("INSERT INTO gimlet_users VALUES ('someone', 'old', 1, 1, '{}')");
    assert_eq!(db.q("SELECT count(*) FROM gimlet_sessions"), "31");
    assert_eq!(db.q("SELECT count(*) FROM gimlet_data"), "61");
    assert_eq!(first.get("/", &[]).await.session()["user"], "u0");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    // Past its expiry a session reads as empty, swept or not.
    assert_eq!(first.get("/", &[]).await.session().get("user"), None);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = [
            db.count("gimlet_sessions"),
            db.count("gimlet_marks"),
            db.count("gimlet_users"),
        ];
        if left == ["1", "0", "0"] {
            break;
        }
        assert!(Instant::now() < deadline, "not cleaned up: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(db.q("SELECT count(*) FROM gimlet_data"), "1");
    assert_eq!(keep.get("/", &[]).await.session()["user"], "kept");
    assert_eq!(g.metric("gimlet_store_cleanup_deleted_total").await, 30.0);
    assert!(g.metric("gimlet_store_cleanups_total{result=\"ok\"}").await >= 2.0);
}
on_both!(expired_sessions_are_cleaned_up);

/// `create_schema: false`: the gateway does not touch the schema; until
/// `gimlet migrate` made it, the store is not ready. `migrate --print`
/// shows the SQL a DBA would run.
async fn migrate_makes_the_schema_the_gateway_does_not(db: Db) {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let yaml = sql_yaml(&up, &store_for(&db, ", sql: { create_schema: false }"), "");
    let g = Gateway::start_in(dir.path(), &yaml);
    let file = dir.path().join("m.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let mut b = Browser::new(&g);
    let resp = b.get("/", &[("X-Session-Set", "user=alice")]).await;
    assert_eq!(resp.status, 503, "{}", resp.body);
    let tables = match &db {
        Db::Pg(_) => "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'gimlet%'",
        Db::Maria(_) => {
            "SELECT count(*) FROM information_schema.TABLES WHERE TABLE_NAME LIKE 'gimlet%'"
        }
    };
    assert_eq!(db.q(tables), "0");

    let dialect = match &db {
        Db::Pg(_) => "postgres",
        Db::Maria(_) => "mysql",
    };
    let out = std::process::Command::new(bin())
        .args(["migrate", "--print", dialect])
        .output()
        .unwrap();
    let ddl = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        ddl.contains("CREATE TABLE IF NOT EXISTS gimlet_data"),
        "{ddl}"
    );
    assert!(ddl.contains("gimlet_write_v1"), "{ddl}");
    assert!(!ddl.contains(&db.port().to_string()));

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
    // Sessions, data, marks, users (and MySQL's user locks).
    let want = match &db {
        Db::Pg(_) => "4",
        Db::Maria(_) => "5",
    };
    assert_eq!(db.q(tables), want);
}
on_both!(migrate_makes_the_schema_the_gateway_does_not);

/// Config errors name the field; the password never shows.
#[test]
fn sql_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let up_addr = "127.0.0.1:9";
    let cases = [
        ("{ kind: sql }", "store.url: kind: sql needs `url`"),
        (
            "{ kind: sql, url: \"mysql://root:hunter2@h:notaport/db\" }",
            "invalid MySQL URL",
        ),
        (
            "{ kind: sql, url: \"postgres://u:hunter2@h:notaport/db\" }",
            "invalid PostgreSQL URL",
        ),
        (
            "{ kind: sql, url: \"redis://:hunter2@h\" }",
            "expected a postgres://, postgresql://, mysql:// or mariadb:// URL",
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
    let yaml = |store: &str| {
        format!(
            "session:\n  secrets: [\"{SECRET}\"]\nstore: {store}\nroutes:\n  - name: a\n    upstreams: [\"{up_addr}\"]\n"
        )
    };
    for (store, want) in cases {
        let c = check_yaml(dir.path(), &yaml(store), false, &[]);
        assert!(!c.ok, "{store}");
        assert!(c.stderr.contains(want), "{store}: {}", c.stderr);
        assert!(!c.stderr.contains("hunter2"), "{store}: {}", c.stderr);
    }
    // The effective config hides the password.
    let c = check_yaml(
        dir.path(),
        &yaml("{ kind: sql, url: \"postgres://u:hunter2@h/db\" }"),
        true,
        &[],
    );
    assert!(c.ok, "{}", c.stderr);
    assert!(c.stdout.contains("cleanup_interval: 1m"), "{}", c.stdout);
    assert!(!c.stdout.contains("hunter2"), "{}", c.stdout);
    // The URL from the environment, as secrets may be.
    let c = check_yaml(
        dir.path(),
        &yaml("{ kind: sql, url: \"${GIMLET_TEST_DB_URL}\" }"),
        true,
        &[("GIMLET_TEST_DB_URL", "mariadb://app:hunter2@db:3306/app")],
    );
    assert!(c.ok, "{}", c.stderr);
    assert!(
        c.stdout.contains("mariadb://app:<redacted>@db:3306/app"),
        "{}",
        c.stdout
    );
}
