//! Slow and idle clients (issue 14, item 4): `server.header_timeout`,
//! `server.keepalive_timeout`, `server.max_connections`. The gateway
//! binary on port 0 in front of a real HTTP upstream, attacked with raw
//! sockets: idle keep-alive connections, slowloris clients (a header line,
//! then one byte every 300 ms), silent ones, over plain TCP and TLS.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn start(dir: &Path, up: &Upstream, listen: &str, server: &str) -> Gateway {
    let f = dir.join("gimlet.yaml");
    std::fs::write(&f, yaml(up, listen, server)).unwrap();
    Gateway::spawn(dir, &f)
}

fn yaml(up: &Upstream, listen: &str, server: &str) -> String {
    format!(
        "listen:\n  - addr: 127.0.0.1:0\n{listen}admin: {{ addr: 127.0.0.1:0 }}\nserver: {{ threads: 2, grace_period: 1s, {server} }}\nsession:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: memory }}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n",
        up.addr
    )
}

/// `gimlet_connections_refused_total{reason}`.
async fn refused(g: &Gateway, reason: &str) -> f64 {
    g.metric(&format!(
        "gimlet_connections_refused_total{{reason=\"{reason}\"}}"
    ))
    .await
}

/// 2,200 client sockets here and as many in the gateway: raise this
/// process's open-files limit (the gateway inherits it and raises its own).
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert!(
        lim.rlim_max >= want,
        "this test needs {want} open files; the hard limit is {}",
        lim.rlim_max
    );
    lim.rlim_cur = lim.rlim_max;
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

/// One request on `s`, read to the end of its (small, Content-Length)
/// response.
async fn request(s: &mut TcpStream) -> String {
    s.write_all(b"GET /idle HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    read_response(s).await
}

async fn read_response(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        if response_len(&got).is_some() {
            return String::from_utf8_lossy(&got).into_owned();
        }
    }
}

/// Waits until the peer closes `s` (EOF or reset); the time it took.
async fn closed_after(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A slowloris client: a request line, then one header byte every 300 ms
/// for as long as the gateway lets it. Returns how long the connection
/// lived and whether the gateway ever answered.
async fn slowloris(addr: std::net::SocketAddr) -> (Duration, bool) {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => {
                return (t.elapsed(), matches!(r, Ok(n) if n > 0));
            }
            () = tokio::time::sleep(Duration::from_millis(300)) => {
                if s.write_all(b"a").await.is_err() {
                    return (t.elapsed(), false);
                }
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never closed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_slowloris_clients_do_not_slow_normal_requests() {
    raise_nofile(6000);
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let g = start(
        dir.path(),
        &up,
        "",
        "header_timeout: 2s, keepalive_timeout: 5s",
    );
    let addr = g.addr;

    // 2,000 idle keep-alive connections, each served one request.
    let mut idle = Vec::new();
    for chunk in 0..20 {
        let batch: Vec<_> = (0..100)
            .map(|_| {
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    let r = request(&mut s).await;
                    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
                    s
                })
            })
            .collect();
        for b in batch {
            idle.push(b.await.unwrap());
        }
        let _ = chunk;
    }
    let idle_since = Instant::now();
    // 200 slowloris clients and 20 that connect and say nothing.
    let started = Instant::now();
    let slow: Vec<_> = (0..200).map(|_| tokio::spawn(slowloris(addr))).collect();
    let silent: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                closed_after(&mut s, Duration::from_secs(10)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        g.metric("gimlet_connections_open").await >= 2200.0,
        "{}",
        g.metric("gimlet_connections_open").await
    );

    // Normal requests meanwhile, each on a new connection.
    let mut took = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET /n{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let r = read_response(&mut s).await;
        took.push(t.elapsed());
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            started.elapsed() < Duration::from_millis(1800),
            "too slow to test under the slow clients"
        );
    }
    took.sort();
    let p50 = took[took.len() / 2];
    let p99 = took[took.len() * 99 / 100];
    println!(
        "under 2,000 idle + 200 slowloris + 20 silent: p50 {p50:?}, p99 {p99:?}, max {:?}",
        took[took.len() - 1]
    );
    assert!(p99 < Duration::from_millis(50), "p99 {p99:?}");

    // Every slowloris and silent client is closed at header_timeout (2s
    // from its accept), never answered.
    for s in slow {
        let (lived, answered) = s.await.unwrap();
        assert!(!answered, "a slowloris client was answered");
        assert!(
            lived >= Duration::from_millis(1900) && lived < Duration::from_millis(3500),
            "slowloris lived {lived:?}"
        );
    }
    for s in silent {
        let lived = s.await.unwrap().expect("a silent client was never closed");
        assert!(
            lived >= Duration::from_millis(1900) && lived < Duration::from_millis(3500),
            "silent lived {lived:?}"
        );
    }
    assert_eq!(refused(&g, "header_timeout").await, 220.0);
    // The idle keep-alive connections are still open (they sent their
    // header in time), and still served.
    assert!(
        idle_since.elapsed() < Duration::from_millis(4500),
        "slow test machine"
    );
    assert!(g.metric("gimlet_connections_open").await >= 2000.0);
    let r = request(&mut idle[7]).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // ... until keepalive_timeout (5s) of silence closes them.
    let t = Instant::now();
    for s in idle.iter_mut().skip(8) {
        let lived = closed_after(s, Duration::from_secs(8))
            .await
            .expect("an idle connection outlived keepalive_timeout");
        let _ = lived;
    }
    let closed_at = idle_since.elapsed();
    assert!(
        closed_at >= Duration::from_millis(4900) && closed_at < Duration::from_millis(7500),
        "idle connections closed {closed_at:?} after their response ({:?} waited)",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_header_dribbled_over_tls_is_cut_at_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "gw");
    let c = dir
        .path()
        .join("gw-server.pem")
        .to_string_lossy()
        .into_owned();
    let k = dir
        .path()
        .join("gw-server-key.pem")
        .to_string_lossy()
        .into_owned();
    let up = Upstream::start();
    let g = start(
        dir.path(),
        &up,
        &format!("  - addr: 127.0.0.1:0\n    tls: {{ cert: {c}, key: {k} }}\n"),
        "header_timeout: 1500ms",
    );
    let https = g.https.unwrap();
    // openssl s_client as the client: a request line, then one byte every
    // 300 ms; it exits when the gateway closes the connection.
    let t = Instant::now();
    let mut client = Command::new("openssl")
        .args(["s_client", "-quiet", "-alpn", "http/1.1", "-connect"])
        .arg(https.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\nX-Slow: ");
        for _ in 0..60 {
            std::thread::sleep(Duration::from_millis(300));
            if stdin.write_all(b"a").and_then(|_| stdin.flush()).is_err() {
                break;
            }
        }
    });
    let out = tokio::task::spawn_blocking(move || client.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let lived = t.elapsed();
    let _ = feeder.join();
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        lived >= Duration::from_millis(1400) && lived < Duration::from_millis(4000),
        "a TLS slowloris lived {lived:?}"
    );
    // An HTTP/2 client (ALPN h2) that never sends its preface is closed
    // at header_timeout too (pingora's HTTP/2 handshake would wait forever).
    let t = Instant::now();
    let mut silent = Command::new("openssl")
        .args(["s_client", "-quiet", "-alpn", "h2", "-connect"])
        .arg(https.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdin = silent.stdin.take().unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let r = silent.wait();
        drop(stdin);
        r
    });
    let status = tokio::time::timeout(Duration::from_secs(10), status)
        .await
        .expect("a silent HTTP/2 client was never closed")
        .unwrap()
        .unwrap();
    let lived = t.elapsed();
    let _ = status;
    assert!(
        lived >= Duration::from_millis(1400) && lived < Duration::from_millis(4000),
        "a silent HTTP/2 client lived {lived:?}"
    );
    // A normal HTTPS request is served, over HTTP/2 as over HTTP/1.1.
    let h2 = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap()
        .get(format!("https://{https}/ok"))
        .send()
        .await
        .unwrap();
    assert_eq!(h2.status(), 200);
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    let r = reqwest::Client::builder()
        .http1_only()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap()
        .get(format!("https://{https}/ok"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(refused(&g, "header_timeout").await, 2.0);
}

/// The header clock stops at the end of the header: a body sent slowly
/// and an answer that takes long are not cut.
#[tokio::test(flavor = "multi_thread")]
async fn slow_bodies_and_long_answers_outlive_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let g = start(dir.path(), &up, "", "header_timeout: 1s");
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    let t = Instant::now();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n")
        .await
        .unwrap();
    for b in b"0123456789" {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(&[*b]).await.unwrap();
    }
    let r = read_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(t.elapsed() > Duration::from_millis(2400));
    // On the same connection: an answer that takes 2 s.
    let t = Instant::now();
    s.write_all(b"GET /slow?sleep_ms=2000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(t.elapsed() >= Duration::from_millis(2000));
    assert_eq!(refused(&g, "header_timeout").await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_max_connections_get_a_clear_503_and_reload_moves_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let g = start(dir.path(), &up, "", "max_connections: 20");
    let addr = g.addr;
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut s).await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // The 21st and 22nd: a 503 that says why, then a close.
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let r = request(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        let lower = r.to_ascii_lowercase();
        assert!(lower.contains("retry-after: 1"), "{r}");
        assert!(lower.contains("connection: close"), "{r}");
        assert!(
            r.contains("too many connections (server.max_connections)"),
            "{r}"
        );
        assert!(closed_after(&mut s, Duration::from_secs(3)).await.is_some());
    }
    // The upstream never saw them; the admin listener is not capped.
    assert_eq!(g.metric("gimlet_connections_open").await, 20.0);
    assert_eq!(refused(&g, "max_connections").await, 2.0);
    assert!(
        g.log().contains("server.max_connections reached"),
        "{}",
        g.log()
    );
    // The held connections are still served.
    assert!(request(&mut held[0]).await.starts_with("HTTP/1.1 200"));

    // Closing five frees five slots.
    held.truncate(15);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut s).await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(request(&mut s).await.starts_with("HTTP/1.1 503"));

    // A reload raises the cap for new connections.
    std::fs::write(&g.config, yaml(&up, "", "max_connections: 30")).unwrap();
    let before = g.metric("gimlet_config_reloads_total{result=\"ok\"}").await;
    g.signal("HUP");
    let t = Instant::now();
    while g.metric("gimlet_config_reloads_total{result=\"ok\"}").await == before {
        assert!(t.elapsed() < Duration::from_secs(5), "no reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut s).await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(request(&mut s).await.starts_with("HTTP/1.1 503"));
    assert_eq!(g.metric("gimlet_connections_open").await, 30.0);
    drop(held);
    let t = Instant::now();
    while g.metric("gimlet_connections_open").await != 0.0 {
        assert!(t.elapsed() < Duration::from_secs(5), "slots not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn server_limit_config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let base = |server: &str| {
        format!(
            "server: {{ {server} }}\nsession:\n  secrets: [\"{SECRET}\"]\nroutes:\n  - name: a\n    upstreams: [127.0.0.1:1]\n"
        )
    };
    for (server, want) in [
        (
            "header_timeout: 10ms",
            "server.header_timeout: must be at least 100ms",
        ),
        (
            "header_timeout: soon",
            "server.header_timeout: invalid duration",
        ),
        (
            "keepalive_timeout: 500ms",
            "server.keepalive_timeout: must be at least 1s",
        ),
        (
            "max_connections: 0",
            "server.max_connections: must be at least 1",
        ),
        ("max_connections: many", "server.max_connections"),
        ("max_conns: 5", "server.max_conns: unknown field"),
    ] {
        let c = check_yaml(dir.path(), &base(server), false, &[]);
        assert!(!c.ok, "{server}");
        assert!(c.stderr.contains(want), "{server}: {}", c.stderr);
    }
    let c = check_yaml(dir.path(), &base(""), true, &[]);
    assert!(c.ok, "{}", c.stderr);
    for want in [
        "header_timeout: 10s",
        "keepalive_timeout: 1m",
        "max_connections: 10000",
    ] {
        assert!(c.stdout.contains(want), "{want}: {}", c.stdout);
    }
}
