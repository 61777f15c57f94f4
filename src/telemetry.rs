//! `tracing.otlp`: request spans exported over OTLP/HTTP, and the W3C trace
//! context passed to the upstream.
//!
//! Every proxied request gets a trace context: the client's `traceparent`
//! continued (its trace id, and its span as the parent), or a new trace. A
//! request is sampled by Gimlet's own draw against `sample_ratio`, never by
//! what the client sent: a client that sets the sampled flag, or picks a
//! trace id a ratio sampler would always take, cannot make every request
//! exported. The upstream always receives a `traceparent` whose parent is
//! Gimlet's upstream span and whose flag says whether that span is recorded.
//!
//! A sampled request is one server span with a child per step (store read,
//! upstream, store write). Spans carry the route, method, path (never the
//! query), status, store round trips and directive counts: never a cookie,
//! a session id or a session value.

use crate::config::OtlpConfig;
use crate::model::{Step, Steps};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler, SdkTracer,
    SdkTracerProvider,
};
use std::time::{Instant, SystemTime};

/// The exporter, started once per process (a reload keeps it; its
/// `sample_ratio` is read from each request's config).
pub struct Tracer {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    ids: RandomIdGenerator,
    /// What it was started with (a reload that changes it says so).
    pub config: OtlpConfig,
}

/// How long spans wait in the queue before a batch is sent.
const EXPORT_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
/// Spans queued beyond this (a collector down) are dropped, not buffered.
const QUEUE: usize = 4096;
/// The longest `tracestate` passed on (the W3C's advice: at least 512).
const TRACESTATE_BYTES: usize = 512;

impl Tracer {
    /// Build the exporter (its HTTP client and batch thread). Call outside
    /// any async runtime.
    pub fn start(cfg: &OtlpConfig) -> Result<Tracer, String> {
        let headers = cfg
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(cfg.endpoint.clone())
            .with_timeout(cfg.timeout)
            .with_headers(headers)
            .build()
            .map_err(|e| format!("tracing.otlp: {e}"))?;
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(EXPORT_DELAY)
                    .with_max_queue_size(QUEUE)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            // The sampling decision is made before any span exists (see
            // `begin`); every span built is one to export.
            .with_sampler(Sampler::AlwaysOn)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(cfg.service_name.clone())
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("gimlet");
        Ok(Tracer {
            provider,
            tracer,
            ids: RandomIdGenerator::default(),
            config: cfg.clone(),
        })
    }

    /// Send what is queued and stop (on shutdown).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing trace spans on shutdown failed");
        }
    }

    /// The trace context of a new request: the client's `traceparent`
    /// continued when it is valid, a new trace otherwise; sampled by our own
    /// draw. The server span starts at `start`.
    pub fn begin(
        &self,
        traceparent: Option<&[u8]>,
        tracestate: Option<&[u8]>,
        ratio: f64,
        start: Instant,
    ) -> Trace {
        let client = traceparent.and_then(parse_traceparent);
        // 53 random bits as a number in [0, 1).
        let draw = (u64::from_be_bytes(self.ids.new_span_id().to_bytes()) >> 11) as f64
            / (1u64 << 53) as f64;
        let sampled = draw < ratio;
        let state = client
            .and(tracestate)
            .filter(|s| s.len() <= TRACESTATE_BYTES)
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let trace_id = client.map_or_else(|| self.ids.new_trace_id(), |(t, _)| t);
        let parent = match client {
            Some((t, p)) => Context::new().with_remote_span_context(SpanContext::new(
                t,
                p,
                TraceFlags::SAMPLED,
                true,
                state.clone(),
            )),
            None => Context::new(),
        };
        let recorded = sampled.then(|| {
            let span = self
                .tracer
                .span_builder("request")
                .with_kind(SpanKind::Server)
                .with_start_time(wall(start))
                .start_with_context(&self.tracer, &parent);
            Box::new(Recorded {
                cx: parent.with_span(span),
                upstream: None,
            })
        });
        let trace_id = recorded
            .as_ref()
            .map_or(trace_id, |r| r.cx.span().span_context().trace_id());
        Trace {
            trace_id,
            upstream_span: self.ids.new_span_id(),
            state,
            recorded,
        }
    }

    /// The upstream step starts now: its span (when sampled) is the parent
    /// the upstream sees.
    pub fn upstream(&self, t: &mut Trace, peer: std::net::SocketAddr) {
        if let Some(r) = &mut t.recorded {
            let span = self
                .tracer
                .span_builder("upstream")
                .with_kind(SpanKind::Client)
                .with_attributes([
                    KeyValue::new("server.address", peer.ip().to_string()),
                    KeyValue::new("server.port", i64::from(peer.port())),
                ])
                .start_with_context(&self.tracer, &r.cx);
            t.upstream_span = span.span_context().span_id();
            r.upstream = Some(span);
        } else {
            t.upstream_span = self.ids.new_span_id();
        }
    }

    /// End a request's spans (when sampled) with what it did.
    pub fn finish(&self, t: &mut Trace, r: &Finished) {
        let Some(mut rec) = t.recorded.take() else {
            return;
        };
        let end = SystemTime::now();
        let error = r.error.map(|e| Status::Error {
            description: e.into(),
        });
        for (name, step) in [("store read", r.steps.read), ("store write", r.steps.write)] {
            if let Some(s) = step {
                let mut span = self
                    .tracer
                    .span_builder(name)
                    .with_kind(SpanKind::Client)
                    .with_start_time(wall(s.start))
                    .start_with_context(&self.tracer, &rec.cx);
                span.end_with_timestamp(step_end(s));
            }
        }
        if let Some(mut span) = rec.upstream.take() {
            match r.steps.upstream {
                Some(s) => span.end_with_timestamp(step_end(s)),
                None => {
                    span.set_status(Status::Error {
                        description: "no response from the upstream".into(),
                    });
                    span.end_with_timestamp(end);
                }
            }
        }
        let span = rec.cx.span();
        span.update_name(format!("{} {}", r.method, r.route));
        let path: String = r.path.chars().take(256).collect();
        span.set_attributes([
            KeyValue::new("http.request.method", r.method.to_string()),
            KeyValue::new("url.path", path),
            KeyValue::new("http.route", r.route.to_string()),
            KeyValue::new("http.response.status_code", i64::from(r.status)),
            KeyValue::new("gimlet.route", r.route.to_string()),
            KeyValue::new("gimlet.session", r.session),
            KeyValue::new("gimlet.store.round_trips", i64::from(r.round_trips)),
            KeyValue::new("gimlet.directives", i64::from(r.directives)),
        ]);
        if let Some(e) = r.error {
            span.set_attribute(KeyValue::new("error.type", e));
        }
        if let Some(s) = error.filter(|_| r.status >= 500 || r.status == 0) {
            span.set_status(s);
        }
        span.end_with_timestamp(end);
    }
}

/// One request's trace context.
pub struct Trace {
    trace_id: TraceId,
    /// The parent id the upstream is given.
    upstream_span: SpanId,
    state: TraceState,
    /// The spans, when this request is sampled.
    recorded: Option<Box<Recorded>>,
}

struct Recorded {
    /// The server span, as the parent of the others.
    cx: Context,
    upstream: Option<opentelemetry_sdk::trace::Span>,
}

impl Trace {
    /// The `traceparent` for the upstream.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.upstream_span,
            u8::from(self.recorded.is_some())
        )
    }

    /// The `tracestate` for the upstream (`None`: send none).
    pub fn tracestate(&self) -> Option<String> {
        let s = self.state.header();
        (!s.is_empty()).then_some(s)
    }
}

/// What a finished request did, for its server span.
pub struct Finished<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub steps: &'a Steps,
    pub session: bool,
    pub round_trips: u32,
    pub directives: u32,
    /// The error label (a directive error reason or pingora's error type).
    pub error: Option<&'static str>,
}

/// A version-00 `traceparent` (W3C Trace Context, level 1): its trace id
/// and parent span id; `None` when malformed or all-zero. Later versions
/// are read by their first four fields, as the spec asks.
pub fn parse_traceparent(v: &[u8]) -> Option<(TraceId, SpanId)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let b = s.as_bytes();
    if b.len() < 55 || (b.len() > 55 && (s.starts_with("00") || b[55] != b'-')) {
        return None;
    }
    let hex = |r: std::ops::Range<usize>| {
        let part = &s[r];
        part.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            .then_some(part)
    };
    let version = hex(0..2)?;
    if version == "ff" || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace = TraceId::from_hex(hex(3..35)?).ok()?;
    let parent = SpanId::from_hex(hex(36..52)?).ok()?;
    hex(53..55)?;
    (trace != TraceId::INVALID && parent != SpanId::INVALID).then_some((trace, parent))
}

/// An `Instant` as wall-clock time (spans carry wall-clock timestamps).
fn wall(t: Instant) -> SystemTime {
    SystemTime::now() - t.elapsed()
}

fn step_end(s: Step) -> SystemTime {
    wall(s.start) + s.took
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_read_strictly() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, p) = parse_traceparent(ok.as_bytes()).unwrap();
        assert_eq!(format!("{t:032x}"), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(format!("{p:016x}"), "00f067aa0ba902b7");
        // A later version with more fields is read by its first four.
        assert!(parse_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
        )
        .is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
    }
}
