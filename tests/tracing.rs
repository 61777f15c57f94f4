//! `tracing.otlp` (OTLP/HTTP spans, W3C trace context to the upstream) and
//! `routes[].server_timing`, against the real binary: a small OTLP/HTTP
//! receiver here decodes what the gateway exports.

mod common;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the receiver got: each export's raw body, decoded, and its
/// `authorization` header.
#[derive(Default)]
struct Received {
    raw: Vec<Vec<u8>>,
    spans: Vec<Span>,
    auth: Vec<String>,
}

struct Collector {
    addr: std::net::SocketAddr,
    got: Arc<Mutex<Received>>,
}

impl Collector {
    fn start() -> Collector {
        let got = Arc::new(Mutex::new(Received::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        let g = got.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((tcp, _)) = l.accept().await else {
                        continue;
                    };
                    let g = g.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(
                            move |req: hyper::Request<hyper::body::Incoming>| {
                                let g = g.clone();
                                async move {
                                    assert_eq!(req.uri().path(), "/v1/traces");
                                    assert_eq!(
                                        req.headers()["content-type"],
                                        "application/x-protobuf"
                                    );
                                    let auth = req
                                        .headers()
                                        .get("authorization")
                                        .map(|v| v.to_str().unwrap().to_string());
                                    let body = req.into_body().collect().await.unwrap().to_bytes();
                                    let export = ExportTraceServiceRequest::decode(body.as_ref())
                                        .expect("an OTLP protobuf export");
                                    let mut r = g.lock().unwrap();
                                    r.raw.push(body.to_vec());
                                    r.auth.extend(auth);
                                    for rs in export.resource_spans {
                                        for ss in rs.scope_spans {
                                            r.spans.extend(ss.spans);
                                        }
                                    }
                                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                        Full::new(Bytes::new()),
                                    ))
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                            .await;
                    });
                }
            });
        });
        Collector {
            addr: rx.recv().unwrap(),
            got,
        }
    }

    /// The spans of one trace, once its server span has arrived.
    fn trace(&self, trace_id: &str, want: usize) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans: Vec<Span> = self
                .got
                .lock()
                .unwrap()
                .spans
                .iter()
                .filter(|s| hex(&s.trace_id) == trace_id)
                .cloned()
                .collect();
            if spans.len() >= want || Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            Value::BoolValue(b) => b.to_string(),
            other => format!("{other:?}"),
        })
}

fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no `{name}` span in {:?}", names(spans)))
}

fn names(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

/// `00-trace-parent-flags`, split.
fn traceparent(v: &str) -> (String, String, String) {
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!(p.len(), 4, "{v}");
    assert_eq!(p[0], "00");
    assert_eq!((p[1].len(), p[2].len(), p[3].len()), (32, 16, 2), "{v}");
    (p[1].into(), p[2].into(), p[3].into())
}

fn traced(up: &Upstream, collector: &Collector, ratio: &str) -> String {
    config(
        up,
        "  keys: { user: { clientside: false }, theme: { clientside: true } }\n",
        "{ kind: memory }",
        "",
    )
    .replace(
        "routes:",
        &format!(
            "tracing:\n  otlp:\n    endpoint: http://{}\n    sample_ratio: {ratio}\n    headers: {{ authorization: \"Bearer ${{TEST_OTLP_TOKEN:-t0ken-for-the-collector}}\" }}\nroutes:",
            collector.addr
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_the_collector_and_the_trace_context_reaches_the_upstream() {
    let up = Upstream::start();
    let collector = Collector::start();
    let g = Gateway::start(&traced(&up, &collector, "1.0"));
    let mut b = Browser::new(&g);

    // A login: no traceparent from the client; a store write.
    let login = b
        .get(
            "/login",
            &[("X-Session-Set", "user=alice-secret-value&theme=dark-secret")],
        )
        .await;
    assert_eq!(login.status, 200);
    let (trace_a, parent_a, flags_a) = traceparent(&login.got_header("traceparent").unwrap());
    assert_eq!(flags_a, "01", "sampled: the upstream is told so");
    let spans = collector.trace(&trace_a, 3);
    let server = named(&spans, "GET app");
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert!(
        server.parent_span_id.is_empty(),
        "a new trace has no parent"
    );
    let upstream = named(&spans, "upstream");
    assert_eq!(
        hex(&upstream.span_id),
        parent_a,
        "the app's parent is our upstream span"
    );
    assert_eq!(upstream.parent_span_id, server.span_id);
    assert_eq!(upstream.kind, SpanKind::Client as i32);
    let write = named(&spans, "store write");
    assert_eq!(write.parent_span_id, server.span_id);
    assert!(write.start_time_unix_nano >= server.start_time_unix_nano);
    assert!(write.end_time_unix_nano <= server.end_time_unix_nano);
    assert!(upstream.end_time_unix_nano <= write.start_time_unix_nano);
    for (key, want) in [
        ("http.request.method", "GET"),
        ("url.path", "/login"),
        ("http.route", "app"),
        ("gimlet.route", "app"),
        ("http.response.status_code", "200"),
        ("gimlet.store.round_trips", "1"),
        ("gimlet.directives", "2"),
        ("gimlet.session", "false"),
    ] {
        assert_eq!(attr(server, key).as_deref(), Some(want), "{key}");
    }

    // The client continues its own trace (its sampled flag off: ours
    // decides); its tracestate passes on.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_parent = "00f067aa0ba902b7";
    let next = b
        .get_with(
            "/page?token=query-secret",
            &[],
            &[
                (
                    "traceparent",
                    &format!("00-{client_trace}-{client_parent}-00"),
                ),
                ("tracestate", "vendor=abc"),
            ],
        )
        .await;
    assert_eq!(next.status, 200);
    let (trace_b, parent_b, flags_b) = traceparent(&next.got_header("traceparent").unwrap());
    assert_eq!(trace_b, client_trace);
    assert_ne!(
        parent_b, client_parent,
        "the app's parent is our span, not the client's"
    );
    assert_eq!(flags_b, "01");
    assert_eq!(next.got_header("tracestate").as_deref(), Some("vendor=abc"));
    let spans = collector.trace(client_trace, 3);
    let server = named(&spans, "GET app");
    assert_eq!(hex(&server.parent_span_id), client_parent);
    assert_eq!(hex(&named(&spans, "upstream").span_id), parent_b);
    named(&spans, "store read");
    assert_eq!(attr(server, "gimlet.session").as_deref(), Some("true"));
    assert_eq!(attr(server, "url.path").as_deref(), Some("/page"));

    // Malformed trace contexts start a new trace (and their tracestate is
    // not passed on).
    for bad in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    ] {
        let r = b
            .get_with(
                "/",
                &[],
                &[("traceparent", bad), ("tracestate", "vendor=x")],
            )
            .await;
        let got = r.got_header("traceparent").unwrap();
        let (t, _, _) = traceparent(&got);
        assert_ne!(t, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
        assert_ne!(t, "00000000000000000000000000000000", "{bad}");
        assert_eq!(r.got_header("tracestate"), None, "{bad}");
    }

    // Nothing exported holds a session value, a cookie, an id or the query.
    let cookie = b.jar.header();
    let id = next.got_header("x-session-id").unwrap();
    let got = collector.got.lock().unwrap();
    assert!(!got.raw.is_empty());
    for body in &got.raw {
        let text = String::from_utf8_lossy(body);
        for secret in [
            "alice-secret-value",
            "dark-secret",
            "query-secret",
            id.as_str(),
            cookie.split_once('=').unwrap().1,
        ] {
            assert!(!text.contains(secret), "an export holds `{secret}`");
        }
    }
    assert!(got
        .auth
        .iter()
        .all(|a| a == "Bearer t0ken-for-the-collector"));
    assert!(!got.auth.is_empty());
    assert!(
        !g.log().contains("t0ken-for-the-collector"),
        "the exporter's header is a secret"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsampled_request_passes_a_trace_context_and_exports_nothing() {
    let up = Upstream::start();
    let collector = Collector::start();
    let g = Gateway::start(&traced(&up, &collector, "0"));
    let mut b = Browser::new(&g);
    // A client asks for sampling with its flag and with a trace id a ratio
    // sampler would always take: neither makes Gimlet record it.
    let low = "00000000000000000000000000000001";
    let r = b
        .get_with(
            "/",
            &[],
            &[("traceparent", &format!("00-{low}-00f067aa0ba902b7-01"))],
        )
        .await;
    let (t, p, flags) = traceparent(&r.got_header("traceparent").unwrap());
    assert_eq!((t.as_str(), flags.as_str()), (low, "00"));
    assert_ne!(p, "00f067aa0ba902b7");
    let r = b.get("/", &[]).await;
    let (_, _, flags) = traceparent(&r.got_header("traceparent").unwrap());
    assert_eq!(flags, "00");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(collector.got.lock().unwrap().spans.is_empty());

    // A reload changes the ratio: the next request is recorded.
    let reload = |from: &str, to: &str, n: f64| {
        let yaml = std::fs::read_to_string(&g.config).unwrap();
        std::fs::write(&g.config, yaml.replace(from, to)).unwrap();
        g.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(5);
        let rt = tokio::runtime::Handle::current();
        while tokio::task::block_in_place(|| {
            rt.block_on(g.metric("gimlet_config_reloads_total{result=\"ok\"}"))
        }) < n
        {
            assert!(Instant::now() < deadline, "no reload: {}", g.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    reload("sample_ratio: 0\n", "sample_ratio: 1\n", 1.0);
    let r = b.get("/", &[]).await;
    let (t, _, flags) = traceparent(&r.got_header("traceparent").unwrap());
    assert_eq!(flags, "01");
    assert!(
        !collector.trace(&t, 2).is_empty(),
        "recorded after the reload"
    );
    // A new endpoint needs a restart, and the reload says so.
    reload(&collector.addr.to_string(), "127.0.0.1:9", 2.0);
    assert!(
        g.log().contains("tracing.otlp endpoint or headers changed"),
        "{}",
        g.log()
    );

    // Without tracing.otlp, the client's trace context is not ours to touch.
    let plain = Gateway::start(&config(&up, "", "{ kind: memory }", ""));
    let theirs = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = Browser::new(&plain)
        .get_with("/", &[], &[("traceparent", theirs)])
        .await;
    assert_eq!(r.got_header("traceparent").as_deref(), Some(theirs));
}

#[tokio::test(flavor = "multi_thread")]
async fn server_timing_says_what_the_gateway_did() {
    let up = Upstream::start();
    let yaml = config(
        &up,
        "  keys: { user: { clientside: false }, theme: { clientside: true } }\n",
        "{ kind: memory }",
        "    server_timing: true\n  - name: quiet\n    match: { path_prefix: /quiet }\n    upstreams: [\"UP\"]\n",
    )
    .replace("UP", &up.addr.to_string());
    let g = Gateway::start(&yaml);
    let mut b = Browser::new(&g);
    let timing = |r: &Resp| r.header("server-timing").unwrap_or("").to_string();

    let r = b.get("/", &[]).await;
    assert!(
        timing(&r).starts_with(r#"read;dur=0.000;desc="none", app;dur="#),
        "{}",
        timing(&r)
    );
    assert!(timing(&r).ends_with(r#"write;dur=0.000;desc="none", round-trips;desc="0""#));

    let r = b
        .get(
            "/",
            &[
                ("X-Session-Set", "user=alice-secret&theme=dark"),
                ("X-Session-Regenerate", "1"),
            ],
        )
        .await;
    let t = timing(&r);
    for part in [
        r#"read;dur=0.000;desc="none""#,
        r#"desc="store", round-trips;desc="1""#,
        r#"directive;desc="set user""#,
        r#"directive;desc="set theme""#,
        r#"directive;desc="regenerate""#,
    ] {
        assert!(t.contains(part), "{part} in {t}");
    }
    for line in r.session_cookies() {
        let name = line.split('=').next().unwrap();
        let want = format!("cookie;desc=\"set {name} {}\"", line.len());
        assert!(t.contains(&want), "{want} in {t}");
    }
    assert!(!t.contains("alice-secret") && !t.contains("dark"));

    let r = b.get("/", &[]).await;
    assert!(
        timing(&r).starts_with(r#"read;dur="#) && timing(&r).contains(r#"desc="store", app"#),
        "{}",
        timing(&r)
    );
    let r = b.get("/", &[("X-Session-Destroy", "1")]).await;
    let t = timing(&r);
    assert!(t.contains(r#"directive;desc="destroy""#), "{t}");
    assert!(t.contains(r#"cookie;desc="clear "#), "{t}");
    b.get("/", &[("X-Session-Set", "theme=dark")]).await;
    let r = b.get("/", &[("X-Session-Incr", "theme=1")]).await;
    assert!(
        timing(&r).contains(r#"directive-error;desc="#),
        "{}",
        timing(&r)
    );

    // A route without server_timing says nothing.
    let r = b.get("/quiet", &[("X-Session-Set", "theme=x")]).await;
    assert_eq!(r.header("server-timing"), None);
}
