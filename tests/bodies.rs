//! Bodies stream through (issue 14, item 6): a 200 MB upload and a 200 MB
//! download raise the gateway's peak RSS by less than 16 MB, and
//! `Expect: 100-continue` works. Its own test binary, so nothing else runs
//! in the gateway while its memory is measured.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const SIZE: u64 = 200 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// A plain HTTP/1.1 upstream on its own threads: `POST` answers the number
/// of body bytes it read (and a checksum); `GET /download?n=N` sends N
/// bytes. With `Expect: 100-continue` it sends the interim `100` first, as
/// servers do.
fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            std::thread::spawn(move || serve(c));
        }
    });
    addr
}

fn serve(c: TcpStream) {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut w = c;
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_string());
        }
        let header = |name: &str| {
            head.iter().find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let target = head[0].split(' ').nth(1).unwrap_or("/").to_string();
        if let Some(n) = target.strip_prefix("/download?n=") {
            let n: u64 = n.parse().unwrap();
            write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").unwrap();
            let chunk = vec![b'x'; CHUNK];
            let mut left = n;
            while left > 0 {
                let k = left.min(CHUNK as u64) as usize;
                if w.write_all(&chunk[..k]).is_err() {
                    return;
                }
                left -= k as u64;
            }
            continue;
        }
        if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
        }
        let len: u64 = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (mut got, mut sum) = (0u64, 0u64);
        let mut buf = vec![0u8; CHUNK];
        while got < len {
            let k = (len - got).min(CHUNK as u64) as usize;
            let n = r.read(&mut buf[..k]).unwrap();
            if n == 0 {
                return;
            }
            sum = buf[..n]
                .iter()
                .fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(*b as u64));
            got += n as u64;
        }
        let body = format!("{got} {sum}");
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    }
}

/// The checksum `serve` computes, of the body `upload` sends.
fn body_byte(i: u64) -> u8 {
    (i % 251) as u8
}

fn expected_sum(len: u64) -> u64 {
    (0..len).fold(0u64, |s, i| {
        s.wrapping_mul(31).wrapping_add(body_byte(i) as u64)
    })
}

/// Peak RSS of the process so far, kB. (The kernel sums per-CPU counters
/// lazily, so two readings can go down by a few pages: compared with
/// `saturating_sub`.)
fn hwm_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "VmHWM")
}

/// Read one response: status, and the body (read and counted, not kept,
/// past 64 bytes).
fn response(r: &mut BufReader<TcpStream>) -> (u16, u64, String) {
    let mut status = 0;
    let mut len = 0u64;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line.starts_with("HTTP/1.1 ") {
            status = line[9..12].parse().unwrap();
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            if status == 100 {
                continue;
            }
            break;
        }
    }
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    let mut start = Vec::new();
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        let n = r.read(&mut buf[..k]).unwrap();
        assert!(n > 0, "the body ended early");
        if start.len() < 64 {
            start.extend_from_slice(&buf[..n.min(64)]);
        }
        left -= n as u64;
    }
    (status, len, String::from_utf8_lossy(&start).into_owned())
}

fn gateway() -> (Gateway, SocketAddr) {
    let up = upstream();
    let g = Gateway::start(&format!(
        "session:\n  secrets: [\"{SECRET}\"]\nstore: {{ kind: memory }}\nroutes:\n  - name: app\n    upstreams: [\"{up}\"]\n    read_timeout: 60s\n"
    ));
    (g, up)
}

fn connect(g: &Gateway) -> (TcpStream, BufReader<TcpStream>) {
    let c = TcpStream::connect(g.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let r = BufReader::new(c.try_clone().unwrap());
    (c, r)
}

fn upload(c: &mut TcpStream, len: u64, expect: bool) {
    let expect = if expect {
        "Expect: 100-continue\r\n"
    } else {
        ""
    };
    write!(
        c,
        "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n{expect}\r\n"
    )
    .unwrap();
}

fn send_body(c: &mut TcpStream, len: u64) {
    let mut i = 0u64;
    let mut chunk = Vec::with_capacity(CHUNK);
    while i < len {
        chunk.clear();
        let end = (i + CHUNK as u64).min(len);
        chunk.extend((i..end).map(body_byte));
        c.write_all(&chunk).unwrap();
        i = end;
    }
}

#[test]
fn two_hundred_megabytes_stream_through_both_ways() {
    let (g, _up) = gateway();
    // Warm up: the first requests' one-time allocations do not count.
    for _ in 0..5 {
        let (mut c, mut r) = connect(&g);
        upload(&mut c, 1 << 20, false);
        send_body(&mut c, 1 << 20);
        assert_eq!(response(&mut r).0, 200);
    }
    let before = hwm_kb(g.pid());

    let (mut c, mut r) = connect(&g);
    upload(&mut c, SIZE, false);
    send_body(&mut c, SIZE);
    let (status, _, body) = response(&mut r);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!("{SIZE} {}", expected_sum(SIZE)),
        "the upload arrived whole"
    );
    let after_upload = hwm_kb(g.pid());

    let (mut c, mut r) = connect(&g);
    write!(c, "GET /download?n={SIZE} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let (status, len, start) = response(&mut r);
    assert_eq!((status, len), (200, SIZE));
    assert!(start.bytes().all(|b| b == b'x'));
    let after_download = hwm_kb(g.pid());

    println!(
        "peak RSS: {before} kB before, +{} kB after a 200 MB upload, +{} kB after a 200 MB download",
        after_upload.saturating_sub(before),
        after_download.saturating_sub(before)
    );
    assert!(
        after_upload.saturating_sub(before) < 16 * 1024,
        "upload: +{} kB",
        after_upload.saturating_sub(before)
    );
    assert!(
        after_download.saturating_sub(before) < 16 * 1024,
        "download: +{} kB",
        after_download.saturating_sub(before)
    );
}

/// The client waits for `100 Continue` before it sends the body: the
/// interim answer reaches it, and then the body reaches the app.
#[test]
fn expect_100_continue_gets_its_interim_answer() {
    let (g, _up) = gateway();
    let (mut c, mut r) = connect(&g);
    upload(&mut c, 11, true);
    // Nothing sent yet but the head: the interim answer must come first.
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = String::new();
    r.read_line(&mut line)
        .expect("an interim answer within 5 s");
    assert!(line.starts_with("HTTP/1.1 100"), "{line:?}");
    let mut blank = String::new();
    r.read_line(&mut blank).unwrap();
    assert_eq!(blank, "\r\n");
    send_body(&mut c, 11);
    let (status, _, body) = response(&mut r);
    assert_eq!((status, body), (200, format!("11 {}", expected_sum(11))));
}
