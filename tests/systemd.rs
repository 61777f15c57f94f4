//! systemd `Type=notify` (issue 13, item 7): `READY=1` once the listeners
//! serve, `RELOADING=1` / `READY=1` around a SIGHUP reload. Its own test
//! binary: it sets `NOTIFY_SOCKET` for the gateways it starts.

mod common;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_and_each_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // This binary starts no other gateway, so the variable reaches only it.
    std::env::set_var("NOTIFY_SOCKET", &path);
    let up = Upstream::start();
    let g = Gateway::start(&config(&up, "", "{ kind: memory }", ""));
    assert_eq!(next(&sock).trim(), "READY=1");
    // Ready means serving.
    assert_eq!(Browser::new(&g).get("/", &[]).await.status, 200);
    g.signal("HUP");
    let reloading = next(&sock);
    assert!(reloading.contains("RELOADING=1"), "{reloading}");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    assert_eq!(next(&sock).trim(), "READY=1");
    assert_eq!(
        g.metric("gimlet_config_reloads_total{result=\"ok\"}").await,
        1.0
    );
}
