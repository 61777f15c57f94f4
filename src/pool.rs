//! A route's upstreams as a `pingora-load-balancing` pool: which upstream a
//! request goes to (round robin, least connections, or sticky: Ketama
//! consistent hashing of the session's tag), the active probes that find an
//! upstream dead or back, and passive ejection of an upstream that failed a
//! connection. Built once per config load; the probes run in the server's
//! `gimlet upstream health` service.

use crate::config::{HealthCheck, Probe, RouteConfig};
use crate::metrics::UpstreamMetrics;
use crate::model::Selection;
use async_trait::async_trait;
use pingora::lb::health_check::{HealthCheck as Check, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::{consistent::KetamaHashing, RoundRobin};
use pingora::lb::{Backend, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A route's upstream TLS, parsed from the config's PEM once.
pub struct PeerTls {
    /// The CAs to verify against; none: the system's roots.
    pub ca: Option<Arc<pingora::protocols::tls::CaType>>,
    pub client: Option<Arc<pingora::utils::tls::CertKey>>,
    pub verify: bool,
}

impl PeerTls {
    pub fn new(t: &crate::config::UpstreamTls, at: &str) -> Result<PeerTls, String> {
        use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |pem: &[u8], field: &str| -> Result<Vec<Vec<u8>>, String> {
            let v: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem)
                .map(|c| c.map(|c| c.to_vec()))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{at}.{field}: not a PEM certificate: {e}"))?;
            if v.is_empty() {
                return Err(format!("{at}.{field}: holds no certificate"));
            }
            Ok(v)
        };
        let ca = match &t.ca {
            Some(pem) => {
                let list: Vec<WrappedX509> = certs(pem, "ca")?
                    .into_iter()
                    .map(|der| WrappedX509::new(der, parse_x509))
                    .collect();
                Some(Arc::from(list.into_boxed_slice()))
            }
            None => None,
        };
        let client = match &t.client {
            Some((cert, key)) => {
                let chain = certs(cert, "cert")?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|_| format!("{at}.key: not a PEM private key"))?;
                Some(Arc::new(CertKey::new(chain, key.secret_der().to_vec())))
            }
            None => None,
        };
        if !t.verify {
            tracing::warn!(
                "{at}.verify is off: the upstream's certificate and name are not checked, so \
                 anyone on the path can read and change what the app sees"
            );
        }
        Ok(PeerTls {
            ca,
            client,
            verify: t.verify,
        })
    }
}

/// One upstream of a pool.
pub struct Member {
    pub addr: SocketAddr,
    /// `host:port` as configured: the metric label, and the probe's Host.
    pub name: String,
    /// The name TLS sends and verifies (its host, or `upstream_tls.sni`).
    pub sni: String,
    backend: Backend,
    /// Passive ejection: skipped until this time (unix ms); 0: never was.
    ejected_until: AtomicU64,
    /// Requests of this gateway in flight to it (`least_conn` only).
    in_flight: Arc<AtomicUsize>,
    /// Its metric series, resolved on first use.
    pub metrics: OnceLock<UpstreamMetrics>,
    /// The health last reported (gauge and log), for the probe service.
    pub reported: AtomicBool,
}

/// The pingora balancer behind a selection: round robin for
/// `round_robin` (and for the health readiness `least_conn` consults),
/// Ketama for `sticky`.
enum Balancer {
    RoundRobin(LoadBalancer<RoundRobin>),
    Sticky(LoadBalancer<KetamaHashing>),
}

pub struct Pool {
    pub selection: Selection,
    balancer: Balancer,
    pub members: Vec<Member>,
    pub tls: Option<PeerTls>,
    pub health: HealthCheck,
    h2: bool,
    connect_timeout: Duration,
    read_timeout: Duration,
    /// `least_conn`: where the scan for the least loaded starts, so ties
    /// are spread.
    next: AtomicUsize,
    /// The probe service started this pool's watcher.
    watched: AtomicBool,
}

/// Decrements its upstream's in-flight count when the request ends.
pub struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A set of member indexes (a route has at most 64 upstreams).
pub type Tried = u64;

fn bit(i: usize) -> Tried {
    1 << i
}

impl Pool {
    /// `upstreams` holds each upstream's address and TLS name, in the
    /// config's order.
    pub fn new(
        c: &RouteConfig,
        upstreams: Vec<(SocketAddr, String)>,
        tls: Option<PeerTls>,
    ) -> Result<Pool, String> {
        // `Tried` is a bit per upstream (config load says the same).
        if upstreams.len() > Tried::BITS as usize {
            return Err(format!(
                "routes `{}`: more than {} upstreams",
                c.name,
                Tried::BITS
            ));
        }
        let addrs: Vec<SocketAddr> = upstreams.iter().map(|(a, _)| *a).collect();
        for (j, a) in addrs.iter().enumerate() {
            if addrs[..j].contains(a) {
                return Err(format!(
                    "routes `{}`: upstreams `{}` and another resolve to the same address {a}",
                    c.name, c.upstreams[j]
                ));
            }
        }
        let members: Vec<Member> = upstreams
            .into_iter()
            .zip(&c.upstreams)
            .map(|((addr, sni), name)| Member {
                addr,
                name: name.clone(),
                sni,
                backend: Backend {
                    addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
                    weight: 1,
                    ext: Default::default(),
                },
                ejected_until: AtomicU64::new(0),
                in_flight: Arc::new(AtomicUsize::new(0)),
                metrics: OnceLock::new(),
                reported: AtomicBool::new(true),
            })
            .collect();
        let mut pool = Pool {
            selection: c.selection,
            balancer: Balancer::RoundRobin(lb(&addrs)?),
            members,
            tls,
            health: c.health.clone(),
            h2: c.h2,
            connect_timeout: c.connect_timeout,
            read_timeout: c.read_timeout,
            next: AtomicUsize::new(0),
            watched: AtomicBool::new(false),
        };
        if c.selection == Selection::Sticky {
            pool.balancer = Balancer::Sticky(lb(&addrs)?);
        }
        if let Some(probe) = &c.health.probe {
            let checks = Probes::new(&c.name, probe, &pool);
            match &mut pool.balancer {
                Balancer::RoundRobin(b) => b.set_health_check(Box::new(checks)),
                Balancer::Sticky(b) => b.set_health_check(Box::new(checks)),
            }
        }
        Ok(pool)
    }

    /// The connector's view of member `i`: its address, TLS and timeouts.
    pub fn peer(&self, i: usize) -> HttpPeer {
        let m = &self.members[i];
        let mut peer = match &self.tls {
            None => HttpPeer::new(m.addr, false, String::new()),
            Some(t) => {
                let mut p = HttpPeer::new(m.addr, true, m.sni.clone());
                p.options.ca = t.ca.clone();
                p.client_cert_key = t.client.clone();
                p.options.verify_cert = t.verify;
                p.options.verify_hostname = t.verify;
                p
            }
        };
        if self.h2 {
            // Over TLS: ALPN h2, else HTTP/1.1; over TCP: h2c.
            peer.options
                .set_http_version(2, if self.tls.is_some() { 1 } else { 2 });
        }
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer
    }

    /// The upstream for a request: healthy (by the probes), not ejected
    /// (by a failed connection) and not `tried` by this request yet, chosen
    /// by the route's selection; `key` is the sticky hash input. When every
    /// untried upstream is down, one of them is chosen anyway: a probe that
    /// is wrong about all of them must not take the route down. `None`:
    /// every upstream was tried.
    pub fn pick(&self, key: &[u8], tried: Tried, now_ms: u64) -> Option<usize> {
        let n = self.members.len();
        if n == 1 {
            return (tried & 1 == 0).then_some(0);
        }
        let untried = |i: usize| tried & bit(i) == 0;
        let usable = |i: usize, healthy: bool| healthy && untried(i) && !self.is_ejected(i, now_ms);
        let by_balancer = |accept: &dyn Fn(usize, bool) -> bool| {
            // A Ketama ring holds 160 points per upstream; round robin
            // falls back to pseudo-random steps: bound both.
            let steps = 160 * n;
            let found = match &self.balancer {
                Balancer::RoundRobin(b) => b.select_with(key, steps, |b, h| {
                    self.index(b).is_some_and(|i| accept(i, h))
                }),
                Balancer::Sticky(b) => b.select_with(key, steps, |b, h| {
                    self.index(b).is_some_and(|i| accept(i, h))
                }),
            };
            found.and_then(|b| self.index(&b))
        };
        // Nothing usable (an outage): straight to panic mode, without
        // walking the ring 160 times per upstream first.
        let any = (0..n).any(|i| usable(i, self.healthy(i)));
        let chosen = match self.selection {
            _ if !any => None,
            Selection::LeastConn => self.least_loaded(&usable),
            _ => by_balancer(&usable),
        };
        chosen
            // Round robin's steps after the first are pseudo-random and
            // bounded: scan in order before saying none is usable.
            .or_else(|| (0..n).find(|&i| usable(i, self.healthy(i))))
            .or_else(|| match self.selection {
                Selection::Sticky => by_balancer(&|i, _| untried(i)),
                _ => {
                    let start = self.next.fetch_add(1, Ordering::Relaxed);
                    (0..n).map(|k| (start + k) % n).find(|&i| untried(i))
                }
            })
    }

    fn least_loaded(&self, usable: &dyn Fn(usize, bool) -> bool) -> Option<usize> {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, usize)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if !usable(i, self.healthy(i)) {
                continue;
            }
            let load = self.members[i].in_flight.load(Ordering::Relaxed);
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i)
    }

    fn index(&self, b: &Backend) -> Option<usize> {
        let addr = b.addr.as_inet()?;
        self.members.iter().position(|m| m.addr == *addr)
    }

    /// What the probes last said (true without probes).
    pub fn healthy(&self, i: usize) -> bool {
        let b = &self.members[i].backend;
        match &self.balancer {
            Balancer::RoundRobin(lb) => lb.backends().ready(b),
            Balancer::Sticky(lb) => lb.backends().ready(b),
        }
    }

    pub fn is_ejected(&self, i: usize, now_ms: u64) -> bool {
        self.members[i].ejected_until.load(Ordering::Relaxed) > now_ms
    }

    /// Member `i` failed a connection: skip it for `eject_for`.
    pub fn eject(&self, i: usize, now_ms: u64) {
        let until = now_ms.saturating_add(self.health.eject_for.as_millis() as u64);
        self.members[i]
            .ejected_until
            .store(until, Ordering::Relaxed);
    }

    /// Serving: healthy and not ejected (the health gauge).
    pub fn serving(&self, i: usize, now_ms: u64) -> bool {
        self.healthy(i) && !self.is_ejected(i, now_ms)
    }

    /// `least_conn`: count a request to member `i` until the guard drops.
    pub fn start_request(&self, i: usize) -> Option<Busy> {
        (self.selection == Selection::LeastConn).then(|| {
            let c = &self.members[i].in_flight;
            c.fetch_add(1, Ordering::Relaxed);
            Busy(c.clone())
        })
    }

    /// Run every probe once (nothing without a probe).
    pub async fn probe(&self) {
        match &self.balancer {
            Balancer::RoundRobin(b) => b.backends().run_health_check(true).await,
            Balancer::Sticky(b) => b.backends().run_health_check(true).await,
        }
    }

    /// True the first time: the caller starts this pool's watcher.
    pub fn claim_watch(&self) -> bool {
        !self.watched.swap(true, Ordering::Relaxed)
    }
}

fn lb<S>(addrs: &[SocketAddr]) -> Result<LoadBalancer<S>, String>
where
    S: pingora::lb::selection::BackendSelection + 'static,
    S::Iter: pingora::lb::selection::BackendIter,
{
    LoadBalancer::try_from_iter(addrs.iter().copied()).map_err(|e| e.to_string())
}

/// A pool's probes: one TCP connect check, or one HTTP check per member
/// (each has its own TLS name and Host).
struct Probes {
    route: String,
    names: Vec<(SocketAddr, String)>,
    kind: ProbeKind,
    /// The whole probe: pingora bounds the connect and each read, not a
    /// health endpoint that trickles its body (one hung probe would stall
    /// the pool's every later check).
    timeout: std::time::Duration,
}

enum ProbeKind {
    Tcp(Box<TcpHealthCheck>),
    Http(Vec<(SocketAddr, HttpHealthCheck)>),
}

impl Probes {
    fn new(route: &str, probe: &Probe, pool: &Pool) -> Probes {
        let timeout = pool.health.timeout;
        let names = pool
            .members
            .iter()
            .map(|m| (m.addr, m.name.clone()))
            .collect();
        let kind = match probe {
            Probe::Tcp => {
                let mut c = TcpHealthCheck::default();
                c.peer_template.options.connection_timeout = Some(timeout);
                ProbeKind::Tcp(Box::new(c))
            }
            Probe::Http { path, expect, host } => ProbeKind::Http(
                (0..pool.members.len())
                    .map(|i| {
                        let m = &pool.members[i];
                        let host = host.as_deref().unwrap_or(&m.name);
                        let mut c = HttpHealthCheck::new(host, pool.tls.is_some());
                        let mut peer = pool.peer(i);
                        peer.options.connection_timeout = Some(timeout);
                        peer.options.read_timeout = Some(timeout);
                        peer.options.total_connection_timeout = Some(timeout);
                        c.peer_template = peer;
                        c.req.set_uri(
                            http::Uri::try_from(path.as_str()).expect("validated at config load"),
                        );
                        let expect = *expect;
                        c.validator = Some(Box::new(move |resp| {
                            let got = resp.status.as_u16();
                            if got == expect {
                                Ok(())
                            } else {
                                pingora::Error::e_explain(
                                    pingora::ErrorType::CustomCode("unexpected status", got),
                                    format!("the probe expects {expect}"),
                                )
                            }
                        }));
                        (m.addr, c)
                    })
                    .collect(),
            ),
        };
        Probes {
            route: route.to_string(),
            names,
            kind,
            timeout,
        }
    }

    fn name(&self, addr: Option<&SocketAddr>) -> &str {
        self.names
            .iter()
            .find(|(a, _)| Some(a) == addr)
            .map_or("?", |(_, n)| n.as_str())
    }
}

#[async_trait]
impl Check for Probes {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        let check = async {
            match &self.kind {
                ProbeKind::Tcp(c) => c.check(target).await,
                ProbeKind::Http(list) => {
                    let addr = target.addr.as_inet();
                    match list.iter().find(|(a, _)| Some(a) == addr) {
                        Some((_, c)) => c.check(target).await,
                        None => Ok(()),
                    }
                }
            }
        };
        match tokio::time::timeout(self.timeout, check).await {
            Ok(r) => r,
            Err(_) => pingora::Error::e_explain(
                pingora::ErrorType::ReadTimedout,
                format!("the probe took longer than {:?}", self.timeout),
            ),
        }
    }

    /// pingora logs each flip with this ("... becomes unhealthy, why").
    fn backend_summary(&self, target: &Backend) -> String {
        format!(
            "route {} upstream {}",
            self.route,
            self.name(target.addr.as_inet())
        )
    }

    /// One failed probe takes an upstream out, one good one brings it
    /// back: ejection within one interval, as the README says.
    fn health_threshold(&self, _success: bool) -> usize {
        1
    }
}
