//! One request's way through the gateway, without pingora. Each hook in
//! the proxy module reads what pingora hands in, calls one function here (or
//! on [`Session`]), and writes the answer back, so every decision below is
//! unit-tested without a server:
//!
//! ```text
//! request_filter           open -> Session::load_request / absorb -> admit
//! upstream_request_filter  spoofable, Session::upstream_headers
//! upstream_response_filter read_response, upstream_cookie_is_ours
//! response_filter          Session::apply -> (store write) -> settle -> cache_headers
//! ```

use crate::codec::Codec;
use crate::config::Config;
use crate::directives::{self, Directives};
use crate::headers;
use crate::model::{DirectiveError, DirectiveErrorKind, LocalAnswer, OnError, Step, Steps};
use crate::routes::{Route, Router};
use crate::session::{Forward, Outcome, RequestInfo, Session};
use crate::store::StoreError;
use ipnet::IpNet;
use std::net::IpAddr;

/// Everything a request needs that a reload may replace.
pub struct State {
    pub config: Config,
    pub codec: Codec,
    pub router: Router,
}

impl State {
    pub fn new(config: Config) -> Result<State, String> {
        let router = Router::new(&config.routes)?;
        let codec = Codec::new(&config.session.secrets, config.session.encrypt);
        Ok(State {
            config,
            codec,
            router,
        })
    }
}

/// What the request hook read from pingora.
pub struct Incoming<'a, C> {
    /// From the URI (h2 `:authority`) or the `Host` header, with any port.
    pub host: Option<&'a str>,
    /// The normalized path ([`crate::path`]).
    pub path: &'a str,
    /// Every `Cookie` header value.
    pub cookies: C,
    /// `X-Forwarded-Proto: https` was sent (believed from trusted proxies only).
    pub forwarded_https: bool,
    /// The request came in over TLS.
    pub tls: bool,
    pub client_ip: Option<IpAddr>,
    /// The last `X-Forwarded-For` header value (believed from trusted
    /// proxies only).
    pub forwarded_for: Option<&'a str>,
    pub now: u64,
}

/// The request, routed and its cookies read.
pub struct Opened {
    /// Index into [`Router::routes`].
    pub route: usize,
    pub https: bool,
    /// The client is in `trusted_proxies`.
    pub trusted: bool,
    pub session: Session,
    /// The client's address: behind a trusted proxy, the one it appended.
    pub client_ip: Option<IpAddr>,
}

fn is_trusted(proxies: &[IpNet], ip: Option<IpAddr>) -> bool {
    ip.is_some_and(|ip| proxies.iter().any(|n| n.contains(&ip)))
}

/// Route the request (404 when nothing matches), decide its scheme, and
/// read its cookies.
pub fn open<'c, C: Iterator<Item = &'c [u8]>>(
    state: &State,
    req: Incoming<'_, C>,
) -> Result<Opened, LocalAnswer> {
    let route = crate::path::route_path(req.path);
    let Some(idx) = state.router.find(req.host, &route) else {
        return Err(LocalAnswer::text(404, "no route for this host and path\n"));
    };
    let cfg = &state.config;
    let trusted = is_trusted(&cfg.trusted_proxies, req.client_ip);
    let https = req.tls || cfg.session.settings.dev_insecure || (req.forwarded_https && trusted);
    // Behind a trusted proxy, the client is the address it appended.
    let client_ip = match req.forwarded_for.filter(|_| trusted) {
        Some(xff) => xff
            .rsplit(',')
            .next()
            .and_then(|a| a.trim().parse().ok())
            .or(req.client_ip),
        None => req.client_ip,
    };

    let session = Session::from_cookies(
        &state.codec,
        &cfg.session.cookie,
        &cfg.session.settings,
        req.cookies,
        RequestInfo {
            https,
            now: req.now,
        },
    );
    Ok(Opened {
        route: idx,
        https,
        trusted,
        session,
        client_ip,
    })
}

/// The session a request continues when the store says its id was
/// regenerated within `session.regenerate_grace` (`moved`: the sealed
/// forward). `None` when it is not this browser's to continue.
pub fn follow(
    state: &State,
    current: &Session,
    moved: &str,
    https: bool,
    now: u64,
) -> Option<Session> {
    let s = &state.config.session;
    current.follow(
        &state.codec,
        &s.cookie,
        &s.settings,
        moved,
        RequestInfo { https, now },
    )
}

/// Why [`admit`] answered locally.
pub struct Refused {
    pub answer: LocalAnswer,
    /// `Some(bytes)`: the readable keys exceed `limits.forward_bytes`.
    pub too_large: Option<usize>,
}

/// After the store read: the `require:` gate, then what to forward (500
/// when the readable keys exceed `limits.forward_bytes`).
pub fn admit(
    state: &State,
    route: &Route,
    session: &Session,
    https: bool,
    path_and_query: &str,
) -> Result<Forward, Refused> {
    let s = &state.config.session;
    let r = &route.cfg;
    if let Some(answer) = session.gate(
        &s.settings,
        &r.require,
        &r.on_missing,
        &s.cookie,
        https,
        path_and_query,
    ) {
        return Err(Refused {
            answer,
            too_large: None,
        });
    }
    session
        .forward(&s.settings, &r.read, &r.headers, https)
        .map_err(|size| Refused {
            answer: LocalAnswer::text(
                500,
                format!(
                    "the session data this route reads is {size} bytes, more than session.limits.forward_bytes ({}); narrow the route's read: list\n",
                    s.settings.limits.forward_bytes
                ),
            ),
            too_large: Some(size),
        })
}

/// Must this client request header go before the request is forwarded?
/// Our namespace, every route's mapped names, the forwarding headers we
/// write, path overrides, and, from clients that are not trusted proxies,
/// the headers frameworks derive scheme and host from (all folded, see
/// [`headers`]).
pub fn spoofable(name: &[u8], mapped: &[String], trusted: bool) -> bool {
    headers::in_session_namespace(name)
        || headers::OURS.iter().any(|o| headers::same_name(name, o))
        || mapped.iter().any(|m| headers::same_name(name, m))
        || headers::is_path_override(name)
        || (!trusted && headers::is_forwarding(name))
}

/// What the upstream's response headers say to the session.
pub struct ResponseRead {
    /// Header names to remove before the response goes on (our namespace,
    /// every spelling).
    pub strip: Vec<String>,
    /// The directives, `None` for an informational response.
    pub directives: Option<Result<Directives, DirectiveError>>,
}

/// A 1xx response other than `101 Switching Protocols`: its directives are
/// removed and never applied (SPEC section 4).
pub fn is_interim(status: u16) -> bool {
    (100..200).contains(&status) && status != 101
}

/// Collect and parse the `X-Session*` response headers.
pub fn read_response<'a>(
    status: u16,
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    max_pairs: usize,
) -> ResponseRead {
    let mut strip: Vec<String> = Vec::new();
    let mut lines: Vec<(&str, &[u8])> = Vec::new();
    for (name, value) in headers {
        if headers::in_session_namespace(name.as_bytes()) {
            if !strip.iter().any(|n| n == name) {
                strip.push(name.to_string());
            }
            lines.push((name, value));
        }
    }
    let directives = (!is_interim(status)).then(|| directives::parse(lines.into_iter(), max_pairs));
    ResponseRead { strip, directives }
}

/// Does an upstream `Set-Cookie` line set one of our cookies, as a browser
/// would store it? (SPEC section 2: any case, `__Secure-`/`__Host-`, and
/// nameless `=gimlet=…` cookies.)
pub fn upstream_cookie_is_ours(state: &State, line: &[u8]) -> bool {
    state
        .config
        .session
        .cookie
        .is_ours(crate::cookie::set_cookie_name(line))
}

/// What a response did, as `routes[].server_timing` reports it.
pub struct Did<'a> {
    pub steps: &'a Steps,
    /// A session came with the request (a valid cookie).
    pub had_session: bool,
    pub round_trips: u32,
    /// The app's directives, applied; or why they were refused.
    pub directives: Result<&'a Directives, &'static str>,
    pub set_cookies: &'a [String],
}

/// The `Server-Timing` value for one response (README, "Server-Timing"):
/// where the session came from, the app's time, what was written, the
/// store round trips, each applied directive (key names, never values) and
/// each of our cookies set (with its size) or cleared.
pub fn server_timing(d: &Did) -> String {
    use std::fmt::Write;
    let ms = |s: Option<Step>| s.map_or(0.0, |s| s.took.as_secs_f64() * 1000.0);
    let from = match (d.steps.read, d.had_session) {
        (Some(_), _) => "store",
        (None, true) => "cookie",
        (None, false) => "none",
    };
    let wrote = match (d.steps.write, d.set_cookies.is_empty()) {
        (Some(_), _) => "store",
        (None, false) => "cookie",
        (None, true) => "none",
    };
    let mut out = String::with_capacity(160);
    let _ = write!(
        out,
        "read;dur={:.3};desc=\"{from}\", app;dur={:.3}, write;dur={:.3};desc=\"{wrote}\", round-trips;desc=\"{}\"",
        ms(d.steps.read),
        ms(d.steps.upstream),
        ms(d.steps.write),
        d.round_trips
    );
    let mut entry = |name: &str, op: &str, key: &str| {
        let _ = write!(out, ", {name};desc=\"{op}");
        if !key.is_empty() {
            out.push(' ');
            quoted_text(&mut out, key);
        }
        out.push('"');
    };
    match d.directives {
        Ok(ds) => {
            for (k, _) in &ds.set {
                entry("directive", "set", k);
            }
            for k in &ds.delete {
                entry("directive", "delete", k);
            }
            for (k, _) in &ds.incr {
                entry("directive", "incr", k);
            }
            if ds.regenerate {
                entry("directive", "regenerate", "");
            }
            if ds.destroy {
                entry(
                    "directive",
                    if ds.destroy_user {
                        "destroy user"
                    } else {
                        "destroy"
                    },
                    "",
                );
            }
        }
        Err(reason) => entry("directive-error", reason, ""),
    }
    for line in d.set_cookies {
        let name = crate::cookie::set_cookie_name(line.as_bytes());
        let name = std::str::from_utf8(name).unwrap_or("?");
        if line.contains("=; Max-Age=0") {
            entry("cookie", "clear", name);
        } else {
            entry("cookie", &format!("set {name}"), &line.len().to_string());
        }
    }
    out
}

/// `s` inside a quoted-string, bounded, with only visible ASCII other than
/// `"` and `\` (the app names its keys; a header value must stay valid).
fn quoted_text(out: &mut String, s: &str) {
    for c in s.chars().take(64) {
        out.push(match c {
            '!' | '#'..='[' | ']'..='~' => c,
            _ => '?',
        });
    }
}

/// How a response's directives ended, once the store has spoken.
// Built and matched once per response, on the stack: boxing the large
// variant would add an allocation to every request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Commit {
    /// Applied (or nothing to apply): send these cookies.
    Applied(Outcome),
    /// A directive error: nothing applied.
    Rejected(DirectiveError),
    /// The store write failed under `on_error: fail`: answer 503.
    Unavailable(StoreError),
}

/// Combine the computed outcome with the store write's result (`None`: no
/// write was needed).
pub fn settle(
    outcome: Result<Outcome, DirectiveError>,
    write: Option<Result<(), StoreError>>,
    on_error: OnError,
) -> Commit {
    match (outcome, write) {
        (Err(e), _) => Commit::Rejected(e),
        (Ok(o), None | Some(Ok(()))) => Commit::Applied(o),
        (Ok(_), Some(Err(StoreError::Rejected(r)))) => Commit::Rejected(r.into()),
        // Whatever `on_error` says: it may have been applied, so it is
        // never reported as a rejection ("nothing applied").
        (Ok(_), Some(Err(e @ StoreError::Unknown(_)))) => Commit::Unavailable(e),
        (Ok(_), Some(Err(e))) if on_error == OnError::Fail => Commit::Unavailable(e),
        (Ok(_), Some(Err(e))) => Commit::Rejected(DirectiveError::new(
            DirectiveErrorKind::StoreUnavailable,
            format!("the session store is unavailable ({e})"),
        )),
    }
}

/// The 502 answer for a rejected response under `on_directive_error:
/// reject`: the reason label only, since the detail names keys.
pub fn rejected_answer(e: &DirectiveError) -> LocalAnswer {
    LocalAnswer::text(
        502,
        format!(
            "Bad gateway: the app's session directives were rejected ({})\n",
            e.label()
        ),
    )
}

/// A response that sets one of our cookies must not be cached for anyone
/// else (SPEC section 2): the `Cache-Control` to set (`None`: leave the
/// upstream's `no-store` alone) and the one `Vary` to set, the app's own
/// values with `Cookie` merged in (`None`: it already varies on cookies).
pub fn cache_headers<'a>(
    cache_control: Option<&str>,
    vary: impl Iterator<Item = &'a str>,
) -> (Option<String>, Option<String>) {
    let cc = cache_control.map(str::to_ascii_lowercase);
    let control = if cc.as_deref().is_some_and(|c| c.contains("no-store")) {
        None
    } else {
        let kept: Vec<&str> = cc
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|d| {
                !d.is_empty() && *d != "public" && *d != "private" && !d.starts_with("s-maxage")
            })
            .collect();
        Some(if kept.is_empty() {
            "private".to_string()
        } else {
            format!("private, {}", kept.join(", "))
        })
    };
    let mut values: Vec<&str> = vary
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if values
        .iter()
        .any(|t| t.eq_ignore_ascii_case("cookie") || *t == "*")
    {
        return (control, None);
    }
    values.push("Cookie");
    (control, Some(values.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(yaml_routes: &str) -> State {
        let y = format!(
            "trusted_proxies: [10.0.0.1]\nsession:\n  secrets: [\"0123456789abcdef0123456789abcdef\"]\nstore: {{ kind: memory }}\nroutes:\n{yaml_routes}"
        );
        State::new(Config::parse(&y, std::path::Path::new("/tmp/g.yaml")).unwrap()).unwrap()
    }

    fn incoming<'a>(
        path: &'a str,
        forwarded_https: bool,
        ip: &str,
    ) -> Incoming<'a, std::iter::Empty<&'a [u8]>> {
        Incoming {
            host: Some("app.test"),
            path,
            cookies: std::iter::empty(),
            forwarded_https,
            tls: false,
            client_ip: Some(ip.parse().unwrap()),
            forwarded_for: None,
            now: 1,
        }
    }

    const ROUTES: &str = "  - name: acct\n    match: { path_prefix: /account }\n    upstreams: [127.0.0.1:1]\n    session: { read: [user], require: [user], on_missing: { redirect: \"/login?next={path}\" } }\n  - name: api\n    match: { host: api.test }\n    upstreams: [127.0.0.1:1]\n";

    #[test]
    fn open_routes_on_the_path_without_parameters_and_trusts_only_proxies() {
        let s = state(ROUTES);
        let o = open(&s, incoming("/account;jsessionid=1", false, "10.0.0.2"))
            .ok()
            .unwrap();
        assert_eq!(s.router.routes()[o.route].cfg.name, "acct");
        assert!(!o.https && !o.trusted);
        let o = open(&s, incoming("/account", true, "10.0.0.2"))
            .ok()
            .unwrap();
        assert!(!o.https, "X-Forwarded-Proto from anyone");
        let o = open(&s, incoming("/account", true, "10.0.0.1"))
            .ok()
            .unwrap();
        assert!(o.https && o.trusted);
        let e = open(&s, incoming("/other", false, "10.0.0.2"))
            .err()
            .unwrap();
        assert_eq!(e.status, 404);
    }

    #[test]
    fn admit_gates_with_the_route_answer() {
        let s = state(ROUTES);
        let o = open(&s, incoming("/account/x", false, "10.0.0.2"))
            .ok()
            .unwrap();
        let r = &s.router.routes()[o.route];
        let refused = admit(&s, r, &o.session, o.https, "/account/x?a=1")
            .err()
            .unwrap();
        assert_eq!(refused.answer.status, 302);
        assert_eq!(
            refused.answer.headers,
            vec![("location", "/login?next=%2Faccount%2Fx%3Fa%3D1".to_string())]
        );
        assert!(refused.too_large.is_none());
    }

    #[test]
    fn spoofable_names() {
        let mapped = vec!["x-remote-user".to_string()];
        for (name, trusted, want) in [
            ("X.Session", true, true),
            ("x_remote_user", true, true),
            ("X-Forwarded-Proto", true, true),
            ("x_forwarded_for", true, true),
            ("X-Original-URL", true, true),
            ("X-Forwarded-Host", false, true),
            ("X-Forwarded-Host", true, false),
            ("Accept", false, false),
            ("Cookie", false, false),
        ] {
            assert_eq!(spoofable(name.as_bytes(), &mapped, trusted), want, "{name}");
        }
    }

    #[test]
    fn responses_strip_every_spelling_and_ignore_interim_directives() {
        let h = [
            ("x-session-set", &b"a=1"[..]),
            ("x.session.incr", b"n=2"),
            ("content-type", b"text/plain"),
        ];
        let r = read_response(200, h.iter().copied(), 256);
        assert_eq!(r.strip, vec!["x-session-set", "x.session.incr"]);
        let d = r.directives.unwrap().unwrap();
        assert_eq!((d.set.len(), d.incr.len()), (1, 1));
        let r = read_response(103, h.iter().copied(), 256);
        assert_eq!(r.strip.len(), 2);
        assert!(r.directives.is_none());
        assert!(read_response(101, h.iter().copied(), 256)
            .directives
            .is_some());
    }

    #[test]
    fn settle_maps_store_results() {
        let ok = || Ok(Outcome::default());
        assert!(matches!(
            settle(ok(), None, OnError::Fail),
            Commit::Applied(_)
        ));
        assert!(matches!(
            settle(ok(), Some(Ok(())), OnError::Fail),
            Commit::Applied(_)
        ));
        assert!(matches!(
            settle(ok(), Some(Err(StoreError::Timeout)), OnError::Fail),
            Commit::Unavailable(StoreError::Timeout)
        ));
        match settle(ok(), Some(Err(StoreError::Timeout)), OnError::Degrade) {
            Commit::Rejected(e) => assert_eq!(e.kind, DirectiveErrorKind::StoreUnavailable),
            other => panic!("{other:?}"),
        }
        let limits = crate::store::Refusal::TooManyKeys { keys: 5, max: 3 };
        match settle(ok(), Some(Err(StoreError::Rejected(limits))), OnError::Fail) {
            Commit::Rejected(e) => assert_eq!(e.label(), "too_many_keys"),
            other => panic!("{other:?}"),
        }
        let body = rejected_answer(&DirectiveError::new(
            DirectiveErrorKind::NotAllowed,
            "key `k`",
        ));
        assert_eq!(body.status, 502);
        assert!(body.body.contains("(not_allowed)") && !body.body.contains("key"));
    }

    #[test]
    fn cache_headers_keep_no_store_and_add_vary_once() {
        assert_eq!(
            cache_headers(None, std::iter::empty()),
            (Some("private".into()), Some("Cookie".into()))
        );
        assert_eq!(
            cache_headers(
                Some("public, max-age=60, s-maxage=600"),
                ["Accept", "Accept-Encoding, Origin"].into_iter()
            ),
            (
                Some("private, max-age=60".into()),
                Some("Accept, Accept-Encoding, Origin, Cookie".into())
            )
        );
        assert_eq!(
            cache_headers(Some("no-store"), ["Cookie"].into_iter()),
            (None, None)
        );
        assert!(cache_headers(None, ["accept, *"].into_iter()).1.is_none());
    }

    #[test]
    fn server_timing_says_what_was_done_and_never_a_value() {
        let t0 = std::time::Instant::now();
        let step = |ms: u64| Step {
            start: t0,
            took: std::time::Duration::from_millis(ms),
        };
        let login = Directives {
            set: vec![("user".into(), "alice-secret".into())],
            regenerate: true,
            incr: vec![("visits".into(), 1)],
            ..Default::default()
        };
        let logout = Directives {
            destroy: true,
            destroy_user: true,
            delete: vec!["bad\"key\\ é".into()],
            ..Default::default()
        };
        let set = vec!["gimlet=abc; Path=/; HttpOnly".to_string()];
        let clear = vec!["gimlet.t=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT".to_string()];
        let none = Steps::default();
        let stored = Steps {
            read: Some(step(1)),
            upstream: Some(step(2)),
            write: Some(step(3)),
        };
        let cases: [(Did, &str); 4] = [
            (
                Did {
                    steps: &none,
                    had_session: false,
                    round_trips: 0,
                    directives: Ok(&Directives::default()),
                    set_cookies: &[],
                },
                r#"read;dur=0.000;desc="none", app;dur=0.000, write;dur=0.000;desc="none", round-trips;desc="0""#,
            ),
            (
                Did {
                    steps: &stored,
                    had_session: true,
                    round_trips: 2,
                    directives: Ok(&login),
                    set_cookies: &set,
                },
                r#"read;dur=1.000;desc="store", app;dur=2.000, write;dur=3.000;desc="store", round-trips;desc="2", directive;desc="set user", directive;desc="incr visits", directive;desc="regenerate", cookie;desc="set gimlet 28""#,
            ),
            (
                Did {
                    steps: &none,
                    had_session: true,
                    round_trips: 0,
                    directives: Ok(&logout),
                    set_cookies: &clear,
                },
                r#"read;dur=0.000;desc="cookie", app;dur=0.000, write;dur=0.000;desc="cookie", round-trips;desc="0", directive;desc="delete bad?key???", directive;desc="destroy user", cookie;desc="clear gimlet.t""#,
            ),
            (
                Did {
                    steps: &stored,
                    had_session: true,
                    round_trips: 1,
                    directives: Err("not_allowed"),
                    set_cookies: &[],
                },
                r#"read;dur=1.000;desc="store", app;dur=2.000, write;dur=3.000;desc="store", round-trips;desc="1", directive-error;desc="not_allowed""#,
            ),
        ];
        for (did, want) in cases {
            let got = server_timing(&did);
            assert_eq!(got, want);
            assert!(!got.contains("alice-secret"));
            assert!(http::HeaderValue::from_str(&got).is_ok(), "{got}");
        }
    }
}
