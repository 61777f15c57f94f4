//! Memory per idle connection (issue 15, item 3): pingora gave every
//! accepted connection a 64 KiB read buffer, so 2,000 connections that had
//! not sent a request yet held ~230 MB. Its own test binary: it measures the
//! gateway's RSS while nothing else runs against it.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// RSS growth per connection of `N` idle connections on a fresh gateway
/// (fresh, so no memory freed earlier hides the cost).
fn growth_per_connection(send_a_request: bool) -> u64 {
    const N: u64 = 2000;
    let up = Upstream::start();
    let g = Gateway::start(&config(&up, "", "{ kind: memory }", ""));
    // Warm up, so the first requests' one-time allocations do not count.
    for _ in 0..20 {
        raw_get(g.addr, "/", &[]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kb(g.pid());
    let mut conns = Vec::new();
    for _ in 0..N {
        let mut s = TcpStream::connect(g.addr).unwrap();
        if send_a_request {
            s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        }
        conns.push(s);
    }
    std::thread::sleep(Duration::from_secs(2));
    rss_kb(g.pid()).saturating_sub(before) / N
}

#[test]
fn idle_connections_cost_little_memory() {
    let silent = growth_per_connection(false);
    let kept = growth_per_connection(true);
    println!("per idle connection: {silent} KB before a request, {kept} KB after one");
    // The 64 KiB read buffer alone used to come with each connection
    // (2,000 silent connections: +228 MB, 114 KB each, in a debug build).
    assert!(silent < 64, "{silent} KB per connection that sent nothing");
    assert!(kept < 64, "{kept} KB per idle keep-alive connection");
}
