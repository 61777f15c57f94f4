//! Routing: host (exact, `*.suffix`, or any) and the longest path prefix on a
//! segment boundary; each route's upstreams resolved into its [`Pool`] (and
//! their TLS material, in the form pingora's connector takes), once per
//! config load.

use crate::config::RouteConfig;
use crate::headers::folded;
use crate::pool::{PeerTls, Pool};
use std::net::ToSocketAddrs;

pub struct Route {
    pub cfg: RouteConfig,
    /// The upstreams, their health, and how one is chosen.
    pub pool: Pool,
    /// This route's metric series, resolved on its first request.
    pub metrics: std::sync::OnceLock<crate::metrics::RouteMetrics>,
}

pub struct Router {
    /// Routes in match priority order.
    routes: Vec<Route>,
    /// Folded names of every route's `headers:` map. A client's header of
    /// any of these names is stripped on *every* route: the app behind a
    /// route that maps nothing may still read `X-Remote-User`.
    pub mapped_names: Vec<String>,
}

enum HostRank {
    Exact = 0,
    Wildcard = 1,
    Any = 2,
}

fn rank(host: &Option<String>) -> usize {
    match host {
        None => HostRank::Any as usize,
        Some(h) if h.starts_with("*.") => HostRank::Wildcard as usize,
        Some(_) => HostRank::Exact as usize,
    }
}

impl Router {
    /// Build the table, resolving each upstream `host:port` (done once, when
    /// the gateway starts or reloads).
    pub fn new(cfgs: &[RouteConfig]) -> Result<Router, String> {
        let mut routes = Vec::with_capacity(cfgs.len());
        for (i, c) in cfgs.iter().enumerate() {
            let mut upstreams = Vec::new();
            let tls = c
                .tls
                .as_ref()
                .map(|t| PeerTls::new(t, &format!("routes[{i}].upstream_tls")))
                .transpose()?;
            for (j, u) in c.upstreams.iter().enumerate() {
                let addr = u
                    .to_socket_addrs()
                    .map_err(|e| format!("routes[{i}].upstreams[{j}]: cannot resolve `{u}`: {e}"))?
                    .next()
                    .ok_or_else(|| {
                        format!("routes[{i}].upstreams[{j}]: `{u}` resolves to no address")
                    })?;
                let host = u.rsplit_once(':').map_or(u.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let sni = c
                    .tls
                    .as_ref()
                    .and_then(|t| t.sni.clone())
                    .unwrap_or_else(|| host.to_string());
                upstreams.push((addr, sni));
            }
            routes.push((
                (rank(&c.host), usize::MAX - c.path_prefix.len(), i),
                Route {
                    cfg: c.clone(),
                    pool: Pool::new(c, upstreams, tls)?,
                    metrics: std::sync::OnceLock::new(),
                },
            ));
        }
        routes.sort_by_key(|(k, _)| *k);
        let mut mapped_names: Vec<String> = cfgs
            .iter()
            .flat_map(|c| c.headers.iter().map(|(h, _)| folded(h)))
            .collect();
        mapped_names.sort();
        mapped_names.dedup();
        Ok(Router {
            routes: routes.into_iter().map(|(_, r)| r).collect(),
            mapped_names,
        })
    }

    /// The index (into [`Router::routes`]) of the route for a request.
    /// `host` may carry a port; it is ignored. `path` is the normalized
    /// path without `;` parameters ([`crate::path::route_path`]).
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
        let host = host.map(strip_port);
        self.routes.iter().position(|r| {
            host_matches(r.cfg.host.as_deref(), host)
                && prefix_matches(&r.cfg.path_prefix, path, r.cfg.ignore_case)
        })
    }

    pub fn get(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.cfg.name == name)
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// The host without its port. Hand-written on purpose: parsing an
/// `http::uri::Authority` would copy the header on every request.
fn strip_port(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    }
}

fn host_matches(pattern: Option<&str>, host: Option<&str>) -> bool {
    let Some(pattern) = pattern else { return true };
    let Some(host) = host else { return false };
    let host = host.strip_suffix('.').unwrap_or(host);
    match pattern.strip_prefix("*.") {
        // One or more labels before the suffix, never the bare suffix.
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => host.eq_ignore_ascii_case(pattern),
    }
}

/// `/api` matches `/api` and `/api/x`, not `/apix`.
fn prefix_matches(prefix: &str, path: &str, ignore_case: bool) -> bool {
    let head = path.as_bytes().get(..prefix.len());
    let starts = match head {
        Some(h) if ignore_case => h.eq_ignore_ascii_case(prefix.as_bytes()),
        Some(h) => h == prefix.as_bytes(),
        None => false,
    };
    starts
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KeySet;
    use crate::model::{OnDirectiveError, OnMissing};
    use std::time::Duration;

    fn route(name: &str, host: Option<&str>, prefix: &str) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            host: host.map(Into::into),
            path_prefix: prefix.into(),
            ignore_case: false,
            upstreams: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            read: KeySet::All,
            write: KeySet::All,
            headers: vec![],
            require: vec![],
            on_missing: OnMissing::Status(401),
            on_directive_error: OnDirectiveError::Reject,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            server_timing: false,
            tls: None,
            h2: false,
            selection: crate::model::Selection::RoundRobin,
            health: Default::default(),
        }
    }

    #[test]
    fn ranking() {
        let r = Router::new(&[
            route("any", None, "/"),
            route("any-api", None, "/api"),
            route("wild", Some("*.example.com"), "/"),
            route("exact", Some("app.example.com"), "/"),
            route("exact-acct", Some("app.example.com"), "/account"),
            route("dup", Some("app.example.com"), "/account"),
        ])
        .unwrap();
        let f = |h: Option<&str>, p: &str| r.find(h, p).map(|i| r.routes()[i].cfg.name.as_str());
        assert_eq!(f(Some("app.example.com"), "/"), Some("exact"));
        assert_eq!(
            f(Some("APP.example.com:8080"), "/account/x"),
            Some("exact-acct")
        );
        assert_eq!(f(Some("app.example.com"), "/accounts"), Some("exact"));
        assert_eq!(f(Some("app.example.com"), "/api/x"), Some("exact"));
        assert_eq!(f(Some("a.b.example.com"), "/api"), Some("wild"));
        assert_eq!(f(Some("example.com"), "/api"), Some("any-api"));
        assert_eq!(f(Some("other.org"), "/apix"), Some("any"));
        assert_eq!(f(None, "/api"), Some("any-api"));
    }

    #[test]
    fn no_match_and_round_robin() {
        let r = Router::new(&[route("a", Some("a.test"), "/x")]).unwrap();
        assert!(r.find(Some("a.test"), "/").is_none());
        assert!(r.find(Some("b.test"), "/x").is_none());
        let rt = &r.routes()[r.find(Some("a.test"), "/x/y").unwrap()];
        let pick = || rt.pool.pick(b"", 0, 0).unwrap();
        let a = pick();
        let b = pick();
        assert_ne!(a, b);
        assert_eq!(pick(), a);
        // A request that tried one is sent to the other.
        assert_eq!(rt.pool.pick(b"", 1 << a, 0), Some(b));
        assert_eq!(rt.pool.pick(b"", 0b11, 0), None);
    }

    #[test]
    fn ports_and_v6() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("a.b"), "a.b");
        assert!(prefix_matches("/", "/anything", false));
        assert!(prefix_matches("/api/", "/api/x", false));
        assert!(!prefix_matches("/api/", "/api", false));
        assert!(!prefix_matches("/account", "/ACCOUNT/x", false));
        assert!(prefix_matches("/account", "/ACCOUNT/x", true));
        assert!(!prefix_matches("/account", "/ACCOUNTS", true));
        assert!(!prefix_matches("/account", "/acc", true));
    }
}
