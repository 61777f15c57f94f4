//! Micro-benchmarks of the request path's own pieces, the ones issue 12
//! optimized (`cargo bench --bench request`): header-name folding and
//! stripping, reading the response's directives, opening the request
//! cookie, and building the upstream's headers. The whole-request cost is
//! held in instructions by `bench/run --instructions`; these show which
//! piece moved when that number does.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use gimlet::config::Config;
use gimlet::exchange::{self, Incoming, State};
use gimlet::model::{Channel, Flags, Meta, Payload, SessionId};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

const CONFIG: &str = r#"
session:
  secrets: ["bench-secret-0123456789abcdefghijklmnopq"]
  keys:
    ca: { clientside: true }
    cb: { clientside: true }
    cc: { clientside: true }
store: { kind: memory }
routes:
  - name: off
    match: { path_prefix: /off }
    upstreams: ["127.0.0.1:1"]
    session: { read: none, write: none }
  - name: app
    upstreams: ["127.0.0.1:1"]
    session: { headers: { X-Remote-User: ca } }
"#;

/// What Chrome sends for a page load, plus a cookie.
const BROWSER: [(&str, &[u8]); 14] = [
    ("host", b"app.example.com"),
    ("connection", b"keep-alive"),
    ("cache-control", b"max-age=0"),
    ("sec-ch-ua", b"\"Chromium\";v=\"131\", \"Not_A Brand\";v=\"24\""),
    ("sec-ch-ua-mobile", b"?0"),
    ("sec-ch-ua-platform", b"\"Linux\""),
    ("upgrade-insecure-requests", b"1"),
    ("user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"),
    ("accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("sec-fetch-site", b"none"),
    ("sec-fetch-mode", b"navigate"),
    ("accept-encoding", b"gzip, deflate, br, zstd"),
    ("accept-language", b"en-GB,en;q=0.9"),
    ("cookie", b"theme=dark; _ga=GA1.1.123456789.1700000000"),
];

/// An app's response headers, without and with one directive.
const RESPONSE: [(&str, &[u8]); 6] = [
    ("content-type", b"text/html; charset=utf-8"),
    ("content-length", b"5120"),
    ("cache-control", b"private, max-age=0"),
    ("x-powered-by", b"PHP/8.2.7"),
    ("date", b"Wed, 02 Dec 2026 12:00:00 GMT"),
    ("x-session-set", b"cart=3"),
];

fn state() -> State {
    State::new(Config::parse(CONFIG, Path::new("/tmp/bench.yaml")).unwrap()).unwrap()
}

/// Our cookie with three clientside keys, as the gateway would have set it.
fn cookie(state: &State) -> String {
    let values = BTreeMap::from([
        ("ca".to_string(), "alice".to_string()),
        ("cb".to_string(), "admin".to_string()),
        ("cc".to_string(), "1700000000".to_string()),
    ]);
    let now = gimlet::model::now_ms();
    let p = Payload {
        meta: Meta {
            id: SessionId::random(),
            tag: 1,
            created: now,
            expires: now + 3_600_000,
            touched: now,
        },
        flags: Flags::NONE,
        values,
    };
    let name = state.config.session.cookie.name(Channel::Perm);
    format!("{name}={}", state.codec.seal(name, &p))
}

fn incoming<'a>(path: &'a str, cookie: &'a [u8]) -> Incoming<'a, std::option::IntoIter<&'a [u8]>> {
    Incoming {
        host: Some("app.example.com"),
        path,
        cookies: (!cookie.is_empty()).then_some(cookie).into_iter(),
        forwarded_https: false,
        tls: false,
        client_ip: Some("192.168.10.200".parse().unwrap()),
        forwarded_for: None,
        now: gimlet::model::now_ms(),
    }
}

fn headers(c: &mut Criterion) {
    let s = state();
    let mapped = &s.router.mapped_names;
    let mut g = c.benchmark_group("request");
    g.bench_function("strip/browser-14", |b| {
        b.iter(|| {
            BROWSER
                .iter()
                .filter(|(n, _)| exchange::spoofable(black_box(n.as_bytes()), mapped, false))
                .count()
        })
    });
    g.bench_function("read_response/plain-5", |b| {
        b.iter(|| exchange::read_response(200, black_box(RESPONSE[..5].iter().copied()), 256))
    });
    g.bench_function("read_response/set-1", |b| {
        b.iter(|| exchange::read_response(200, black_box(RESPONSE.iter().copied()), 256))
    });
    let ours = cookie(&s);
    let both = format!("theme=dark; {ours}; _ga=GA1.1.123456789.1700000000");
    g.bench_function("strip_ours/cookie-3", |b| {
        b.iter(|| {
            gimlet::cookie::strip_ours(
                &s.config.session.cookie,
                std::iter::once(black_box(both.as_bytes())),
            )
        })
    });
    g.finish();
}

fn session(c: &mut Criterion) {
    let s = state();
    let ours = cookie(&s);
    let mut g = c.benchmark_group("request");
    g.bench_function("open/no-cookie", |b| {
        b.iter(|| {
            exchange::open(&s, incoming(black_box("/off/"), b""))
                .ok()
                .unwrap()
        })
    });
    g.bench_function("open/cookie-3", |b| {
        b.iter(|| {
            exchange::open(&s, incoming(black_box("/"), ours.as_bytes()))
                .ok()
                .unwrap()
        })
    });
    let o = exchange::open(&s, incoming("/", ours.as_bytes()))
        .ok()
        .unwrap();
    assert!(o.session.meta.is_some(), "the bench cookie opens");
    let route = &s.router.routes()[o.route];
    g.bench_function("forward/cookie-3", |b| {
        b.iter(|| {
            exchange::admit(&s, route, black_box(&o.session), false, "/")
                .ok()
                .unwrap()
        })
    });
    let addr: IpAddr = "192.168.10.200".parse().unwrap();
    let ip = Some(addr);
    g.bench_function("upstream_headers/cookie-3", |b| {
        b.iter_batched(
            || {
                exchange::admit(&s, route, &o.session, false, "/")
                    .ok()
                    .unwrap()
            },
            |f| o.session.upstream_headers(f, false, black_box(ip), &[]),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("upstream_headers/no-session", |b| {
        b.iter_batched(
            Default::default,
            |f| gimlet::session::Session::default().upstream_headers(f, false, black_box(ip), &[]),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("push_ip/v4", |b| {
        b.iter_batched(
            || String::with_capacity(16),
            |mut out| {
                gimlet::headers::push_ip(&mut out, black_box(addr));
                out
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, headers, session);
criterion_main!(benches);
