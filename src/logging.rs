//! Log setup: `tracing` with text or JSON lines. `log.level` governs Gimlet's
//! own targets; libraries (pingora logs request headers at debug) stay at
//! `warn` unless `RUST_LOG` names them.
//!
//! No line may hold a secret, a cookie or a session value (SPEC section 9),
//! and the libraries' lines are not ours to trust: pingora's debug lines
//! print whole request and response headers, and its error contexts quote
//! raw header buffers (`buf: ... X-Session-Set: user=alice ...`). So every
//! line from a target outside `gimlet` is written by [`Sanitized`]: only
//! its level, target and message, the message cut before anything that can
//! quote request or response data.

use crate::config::{LogConfig, LogFormat};
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Install the global subscriber (once per process; later calls are no-ops).
pub fn init(cfg: &LogConfig) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::new(v),
        _ => EnvFilter::new(format!("warn,gimlet={}", cfg.level)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(Sanitized {
                inner: tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
                json: true,
            })
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(false)
            .event_format(Sanitized {
                inner: tracing_subscriber::fmt::format().with_ansi(false),
                json: false,
            })
            .try_init(),
    };
}

/// Gimlet's own events go to `inner`; every other target's are rewritten.
struct Sanitized<F> {
    inner: F,
    json: bool,
}

#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            use fmt::Write;
            let _ = write!(self.0, "{value:?}");
        }
    }
}

/// Words after which a library message may quote headers, cookies, buffers
/// or request and response structures (compared lower-cased).
const MARKERS: [&str; 11] = [
    "buf", "header:", " header", "headers", "cookie", "session", "{", "frame", "event", "task",
    "\"",
];

/// The part of a library message that cannot quote request data.
pub fn sanitize(message: &str) -> String {
    let lower = message.to_ascii_lowercase();
    let cut = MARKERS.iter().filter_map(|m| lower.find(m)).min();
    match cut {
        None => message.to_string(),
        Some(i) => {
            let head = message[..i].trim_end_matches([' ', ':', ',', '(', '=']);
            format!("{head} [rest withheld: it may quote request or response data]")
        }
    }
}

impl<S, N, F> FormatEvent<S, N> for Sanitized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let target = meta.target();
        if target == "gimlet" || target.starts_with("gimlet::") {
            return self.inner.format_event(ctx, writer, event);
        }
        let mut m = Message::default();
        event.record(&mut m);
        let message = sanitize(&m.0);
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        if self.json {
            let line = serde_json::json!({
                "timestamp": time,
                "level": meta.level().as_str(),
                "target": target,
                "message": message,
            });
            writeln!(writer, "{line}")
        } else {
            writeln!(
                writer,
                "{time} {:>5} {target}: {message}",
                meta.level().as_str()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sanitize;

    #[test]
    fn library_lines_lose_what_can_quote_data() {
        for (line, kept) in [
            (
                "Fail to proxy: Upstream InvalidHTTPHeader context: buf: HTTP/1.1 200\\r\\nX-Session-Set: user=alice",
                "Fail to proxy: Upstream InvalidHTTPHeader context",
            ),
            ("Response header: ResponseHeader { base: Parts", "Response"),
            ("Sending header to upstream RequestHeader", "Sending"),
            ("upstream event: Header(..)", "upstream"),
            ("Request header: cookie: gimlet=abc", "Request"),
        ] {
            let s = sanitize(line);
            assert!(s.starts_with(kept), "{s}");
            assert!(!s.contains("alice") && !s.contains("gimlet=abc"), "{s}");
            assert!(s.contains("withheld"), "{s}");
        }
        assert_eq!(
            sanitize("Connection refused (os error 111)"),
            "Connection refused (os error 111)"
        );
    }
}
