//! Redis Sentinel (issue 11): a master, a replica and three sentinels on
//! loopback, started by the test; the master is killed under load and the
//! gateway follows the promoted replica.

mod common;
use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Sentinels {
    ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start_sentinels(master: u16) -> Sentinels {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sentinels {
        ports: Vec::new(),
        children: Vec::new(),
        _dir: tempfile::tempdir().unwrap(),
    };
    for i in 0..3 {
        let port = free_port();
        let conf = dir.path().join(format!("sentinel-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {master} 2\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\nsentinel parallel-syncs mymaster 1\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs as a sentinel");
        s.ports.push(port);
        s.children.push(child);
    }
    s._dir = dir;
    // Ready when every sentinel knows the replica and the two others.
    let deadline = Instant::now() + Duration::from_secs(30);
    for &p in &s.ports {
        loop {
            let m = cli(p, &["SENTINEL", "master", "mymaster"]);
            let field = |name: &str| {
                let lines: Vec<&str> = m.lines().collect();
                lines
                    .iter()
                    .position(|l| *l == name)
                    .and_then(|i| lines.get(i + 1))
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0)
            };
            if field("num-slaves") >= 1 && field("num-other-sentinels") >= 2 {
                break;
            }
            assert!(Instant::now() < deadline, "sentinel {p} not ready: {m}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_follow_a_sentinel_failover() {
    let mut master = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let sentinels = start_sentinels(master.port);
    let up = Upstream::start();
    let nodes: Vec<String> = sentinels
        .ports
        .iter()
        .map(|p| format!("\"redis://127.0.0.1:{p}\""))
        .collect();
    let g = Gateway::start(&format!(
        "session:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: redis, timeout: 500ms, sentinel: {{ master: mymaster, nodes: [{}] }} }}\nroutes:\n  - name: app\n    upstreams: [\"{a}\"]\n",
        nodes.join(", "),
        a = up.addr
    ));
    let mut b = Browser::new(&g);
    assert_eq!(
        b.get("/", &[("X-Session-Set", "user=alice")]).await.status,
        200
    );
    assert_eq!(b.get("/", &[]).await.session()["user"], "alice");
    assert_eq!(master.keys("gimlet:*").len(), 1, "written to the master");
    // Replicated before the master dies.
    let deadline = Instant::now() + Duration::from_secs(10);
    while replica.keys("gimlet:*").is_empty() {
        assert!(Instant::now() < deadline, "not replicated");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Under load: one request after another, each an Incr.
    let mut counted = 0u64;
    for _ in 0..20 {
        assert_eq!(b.get("/", &[("X-Session-Incr", "n=1")]).await.status, 200);
        counted += 1;
    }
    let killed = Instant::now();
    master.kill();
    let mut failed = 0;
    let mut unknown = 0;
    let back = loop {
        let resp = b.get("/", &[("X-Session-Incr", "n=1")]).await;
        match resp.status {
            200 => {
                counted += 1;
                break killed.elapsed();
            }
            503 => {
                failed += 1;
                // Sent and not answered: it may have run.
                if resp.header("x-session-write") == Some("unknown") {
                    unknown += 1;
                }
            }
            s => panic!("only 503s while the master is gone, got {s}: {}", resp.body),
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "no failover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("failover: sessions back after {back:?}, {failed} requests answered 503 ({unknown} with X-Session-Write: unknown)");
    // The replica is the master now, and holds the session.
    let addr = cli(
        sentinels.ports[0],
        &["SENTINEL", "get-master-addr-by-name", "mymaster"],
    );
    assert!(addr.contains(&replica.port.to_string()), "{addr}");
    let mut ok = 0;
    for _ in 0..50 {
        assert_eq!(b.get("/", &[("X-Session-Incr", "n=1")]).await.status, 200);
        ok += 1;
    }
    counted += ok;
    let s = b.get("/", &[]).await.session();
    assert_eq!(s["user"], "alice");
    let n: u64 = s["n"].parse().unwrap();
    // Every 200 counted; a 503 marked unknown may have counted too.
    assert!(
        n >= counted && n <= counted + unknown,
        "n {n}, counted {counted}, unknown {unknown}"
    );
    // A new session lands on the new master.
    let mut c = Browser::new(&g);
    assert_eq!(
        c.get("/", &[("X-Session-Set", "user=bob")]).await.status,
        200
    );
    assert_eq!(replica.keys("gimlet:*").len(), 2);
}
