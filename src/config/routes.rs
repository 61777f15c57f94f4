//! `routes:`: matching, upstreams, and what each route may read and write.

use super::defaults;
use super::errors::Errors;
use super::raw::*;
use super::{HealthCheck, Probe, RouteConfig};
use crate::model::{valid_key, OnDirectiveError, OnMissing};

/// An HTTP header name token.
fn valid_header_name(n: &str) -> bool {
    http::HeaderName::from_bytes(n.as_bytes()).is_ok()
}

/// Does `host:port` (or `[v6]:port`) end in a port?
fn has_port(u: &str) -> bool {
    match u.rsplit_once(':') {
        Some((h, p)) => {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']'))
        }
        None => false,
    }
}

/// `upstream_tls` (or its defaults for `https://` upstreams).
fn upstream_tls(
    t: Option<&RawUpstreamTls>,
    at: &str,
    base: &std::path::Path,
    e: &mut Errors,
) -> crate::config::UpstreamTls {
    let none = RawUpstreamTls::default();
    let t = t.unwrap_or(&none);
    let ca = super::store::read_pem(e, &format!("{at}.ca"), &t.ca, base);
    let cert = super::store::read_pem(e, &format!("{at}.cert"), &t.cert, base);
    let key = super::store::read_pem(e, &format!("{at}.key"), &t.key, base);
    let client = match (cert, key, t.cert.is_some(), t.key.is_some()) {
        (Some(c), Some(k), _, _) => Some((c, k)),
        (_, _, true, false) => {
            e.add(format!("{at}.key"), "is needed with cert");
            None
        }
        (_, _, false, true) => {
            e.add(format!("{at}.cert"), "is needed with key");
            None
        }
        _ => None,
    };
    let sni = e.opt_text(&format!("{at}.sni"), &t.sni);
    if sni
        .as_deref()
        .is_some_and(|s| s.is_empty() || s.contains(['/', ' ', ':']))
    {
        e.add(format!("{at}.sni"), "must be a host name");
    }
    crate::config::UpstreamTls {
        ca,
        client,
        sni,
        verify: t.verify.unwrap_or(true),
    }
}

/// `health_check`: a TCP or HTTP probe (or none: passive ejection only),
/// its timing, and how long a failed upstream is skipped.
fn health_check(raw: Option<&RawHealthCheck>, at: &str, e: &mut Errors) -> HealthCheck {
    let Some(h) = raw else {
        return HealthCheck::default();
    };
    let field = |f: &str| format!("{at}.{f}");
    let path = e.opt_text(&field("path"), &h.path);
    let probe = match (h.tcp.unwrap_or(false), path) {
        (true, Some(_)) => {
            e.add(at, "give `tcp: true` or `path`, not both");
            None
        }
        (true, None) => Some(Probe::Tcp),
        (false, Some(p)) => {
            let p = p.trim().to_string();
            // The probe sends it as its request target: what the http
            // crate takes as one (no `#`, no `<>` or spaces), and short.
            if !p.starts_with('/')
                || p.len() > 1024
                || p.contains('#')
                || p.bytes().any(|b| b.is_ascii_control() || b == b' ')
                || http::Uri::try_from(p.as_str()).is_err()
            {
                e.add(
                    field("path"),
                    "must start with `/` and be a valid request target (no spaces or `#`, at most 1024 bytes)",
                );
            }
            let expect = h.expect.unwrap_or(defaults::HEALTH_EXPECT);
            if !(100..=599).contains(&expect) {
                e.add(
                    field("expect"),
                    "must be an HTTP status between 100 and 599",
                );
            }
            let host = e
                .opt_text(&field("host"), &h.host)
                .map(|v| v.trim().to_string());
            if host.as_deref().is_some_and(|v| {
                v.is_empty() || v.bytes().any(|b| b.is_ascii_control() || b == b' ')
            }) {
                e.add(field("host"), "must be a host name without spaces");
            }
            Some(Probe::Http {
                path: p,
                expect,
                host,
            })
        }
        (false, None) => {
            for (name, given) in [("expect", h.expect.is_some()), ("host", h.host.is_some())] {
                if given {
                    e.add(field(name), "only an HTTP probe (`path`) has one");
                }
            }
            None
        }
    };
    if probe.is_none() && (h.interval.is_some() || h.timeout.is_some()) {
        e.add(
            at,
            "`interval` and `timeout` need a probe: add `tcp: true` or `path: /healthz`",
        );
    }
    let interval = e.duration(&field("interval"), &h.interval, defaults::HEALTH_INTERVAL);
    let timeout = e.duration(&field("timeout"), &h.timeout, defaults::HEALTH_TIMEOUT);
    let eject_for = e.duration(&field("eject_for"), &h.eject_for, defaults::EJECT_FOR);
    if interval < std::time::Duration::from_millis(100) {
        e.add(field("interval"), "must be at least 100ms");
    }
    if timeout.is_zero() {
        e.add(field("timeout"), "must be more than 0s");
    } else if timeout > interval {
        e.add(field("timeout"), "must not be longer than the interval");
    }
    HealthCheck {
        probe,
        interval,
        timeout,
        eject_for,
    }
}

fn valid_upstream(u: &str) -> bool {
    let Some((host, port)) = u.rsplit_once(':') else {
        return false;
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    !host.is_empty()
        && port.parse::<u16>().is_ok_and(|p| p != 0)
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:_".contains(&b))
}

pub(super) fn build_routes(
    raw: &[RawRoute],
    base: &std::path::Path,
    e: &mut Errors,
) -> Vec<RouteConfig> {
    if raw.is_empty() {
        e.add("routes", "at least one route is needed");
    }
    let mut out: Vec<RouteConfig> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let at = |f: &str| format!("routes[{i}].{f}");
        let name = e.text(&at("name"), &r.name);
        if name.is_empty() || name.chars().any(|c| c.is_control()) {
            e.add(at("name"), "must be a non-empty name");
        } else if out.iter().any(|o| o.name == name) {
            e.add(at("name"), format!("route name `{name}` is used twice"));
        }
        let host = e
            .opt_text(&at("match.host"), &r.matches.host)
            .map(|h| h.to_ascii_lowercase());
        if let Some(h) = &host {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            if bare.is_empty() || bare.contains(['*', ':', '/', ' ']) {
                e.add(
                    at("match.host"),
                    format!("`{h}` is not a host (write app.example.com or *.example.com, without a port)"),
                );
            }
        }
        let path_prefix = e
            .opt_text(&at("match.path_prefix"), &r.matches.path_prefix)
            .unwrap_or_else(|| defaults::PATH.into());
        // Judged like request paths, so `/%61ccount` and `/account` agree.
        let path_prefix = if !path_prefix.starts_with('/') {
            e.add(at("match.path_prefix"), "must start with `/`");
            path_prefix
        } else {
            match crate::path::normalize(path_prefix.as_bytes(), true) {
                Ok(p) => crate::path::route_path(&p).into_owned(),
                Err(err) => {
                    e.add(
                        at("match.path_prefix"),
                        format!("not a valid path ({})", err.label()),
                    );
                    path_prefix
                }
            }
        };
        if r.upstreams.is_empty() {
            e.add(at("upstreams"), "at least one upstream address is needed");
        }
        // `host:port`, `http://host[:port]` or `https://host[:port]`; one
        // route's upstreams are all TLS or all plain (one app behind them).
        let mut schemes = (false, false);
        let upstreams: Vec<String> = r
            .upstreams
            .iter()
            .enumerate()
            .map(|(j, u)| {
                let path = format!("routes[{i}].upstreams[{j}]");
                let u = e.text(&path, u).trim().to_string();
                let (hostport, default_port) = match u.split_once("://") {
                    Some(("https", rest)) => {
                        schemes.1 = true;
                        (rest, Some(443))
                    }
                    Some(("http", rest)) => {
                        schemes.0 = true;
                        (rest, Some(80))
                    }
                    Some((other, _)) => {
                        e.add(
                            path.clone(),
                            format!("`{other}://`: expected http:// or https://"),
                        );
                        (u.as_str(), None)
                    }
                    None => (u.as_str(), None),
                };
                let hostport = hostport.strip_suffix('/').unwrap_or(hostport);
                let hostport = match default_port {
                    Some(p) if !has_port(hostport) => format!("{hostport}:{p}"),
                    _ => hostport.to_string(),
                };
                if !valid_upstream(&hostport) {
                    e.add(
                        path,
                        format!("`{u}` is not host:port or an http(s):// URL of one"),
                    );
                }
                hostport
            })
            .collect();
        let tls = if schemes.1 || r.upstream_tls.is_some() {
            if schemes.0 {
                e.add(
                    at("upstreams"),
                    if schemes.1 {
                        "mixes http:// and https:// upstreams"
                    } else {
                        "an http:// upstream cannot have upstream_tls (use https://)"
                    },
                );
            }
            Some(upstream_tls(
                r.upstream_tls.as_ref(),
                &at("upstream_tls"),
                base,
                e,
            ))
        } else {
            None
        };
        let read = e.key_set(&at("session.read"), &r.session.read);
        let write = e.key_set(&at("session.write"), &r.session.write);
        let mut headers = Vec::new();
        for (h, key) in &r.session.headers {
            let field = format!("routes[{i}].session.headers.{h}");
            if !valid_header_name(h) {
                e.add(field.clone(), format!("`{h}` is not a valid header name"));
            } else if crate::directives::is_session_header(&crate::headers::folded(h)) {
                e.add(
                    field.clone(),
                    "names starting with X-Session are reserved for the gateway",
                );
            }
            let key = e.key(&field, key);
            if valid_key(&key) && !read.contains(&key) {
                e.add(
                    field,
                    format!("key `{key}` is not readable on this route (add it to read:)"),
                );
            }
            headers.push((h.clone(), key));
        }
        let require: Vec<String> = r
            .session
            .require
            .iter()
            .enumerate()
            .map(|(j, k)| e.key(&format!("routes[{i}].session.require[{j}]"), k))
            .collect();
        let on_missing = match &r.session.on_missing {
            None => OnMissing::Status(defaults::ON_MISSING_STATUS),
            Some(RawOnMissing {
                redirect: Some(to),
                status: None,
            }) => {
                let to = e.text(&at("session.on_missing.redirect"), to);
                if to.is_empty() || to.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                    e.add(
                        at("session.on_missing.redirect"),
                        "must be a URL or path without spaces",
                    );
                }
                OnMissing::Redirect(to)
            }
            Some(RawOnMissing {
                redirect: None,
                status: Some(s),
            }) => {
                if !(200..=599).contains(s) {
                    e.add(
                        at("session.on_missing.status"),
                        "must be an HTTP status between 200 and 599",
                    );
                }
                OnMissing::Status(*s)
            }
            Some(_) => {
                e.add(
                    at("session.on_missing"),
                    "give exactly one of `redirect` or `status`",
                );
                OnMissing::Status(defaults::ON_MISSING_STATUS)
            }
        };
        let on_directive_error: OnDirectiveError =
            e.pick(&at("on_directive_error"), &r.on_directive_error);
        let connect_timeout = e.duration(
            &at("connect_timeout"),
            &r.connect_timeout,
            defaults::CONNECT_TIMEOUT,
        );
        let read_timeout = e.duration(&at("read_timeout"), &r.read_timeout, defaults::READ_TIMEOUT);
        if upstreams.len() > defaults::MAX_UPSTREAMS {
            e.add(
                at("upstreams"),
                format!("at most {} upstreams per route", defaults::MAX_UPSTREAMS),
            );
        }
        for (j, u) in upstreams.iter().enumerate() {
            if upstreams[..j].contains(u) {
                e.add(
                    format!("routes[{i}].upstreams[{j}]"),
                    format!("`{u}` is listed twice"),
                );
            }
        }
        let selection = e.pick(&at("selection"), &r.selection);
        let health = health_check(r.health_check.as_ref(), &at("health_check"), e);
        out.push(RouteConfig {
            name,
            host,
            path_prefix,
            ignore_case: r.matches.ignore_case,
            upstreams,
            read,
            write,
            headers,
            require,
            on_missing,
            on_directive_error,
            connect_timeout,
            read_timeout,
            server_timing: r.server_timing,
            tls,
            h2: r.upstream_h2.unwrap_or(false),
            selection,
            health,
        });
    }
    out
}
