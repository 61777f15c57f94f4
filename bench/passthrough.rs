//! The bare pingora pass-through the instruction counts are a ratio to
//! (`bench/run --instructions`): the same pingora version and build
//! settings as the gateway, a `ProxyHttp` with only `upstream_peer`, one
//! worker thread, the same L4 buffers as Gimlet's plain listeners.
//!
//!     passthrough LISTEN_ADDR UPSTREAM_ADDR [--like-gateway]
//!
//! `--like-gateway` does what any production pingora proxy does and the
//! gateway must: the peer gets the gateway's default `connect_timeout` and
//! `read_timeout`, its address is resolved once, and the upstream request
//! gets `X-Forwarded-Proto` and `X-Forwarded-For`. It is the like-for-like
//! reference: what is left above it is Gimlet's own work.
use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

// The gateway's allocator, so the ratio compares the code, not malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Pass(String);

#[async_trait]
impl ProxyHttp for Pass {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.0.as_str(),
            false,
            String::new(),
        )))
    }
}

struct Like(std::net::SocketAddr);

#[async_trait]
impl ProxyHttp for Like {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.0, false, String::new());
        peer.options.connection_timeout = Some(std::time::Duration::from_secs(5));
        peer.options.read_timeout = Some(std::time::Duration::from_secs(60));
        Ok(Box::new(peer))
    }
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        _: &mut (),
    ) -> Result<()> {
        up.insert_header("x-forwarded-proto", http::HeaderValue::from_static("http"))?;
        if let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            let mut xff = String::new();
            gimlet::headers::push_ip(&mut xff, ip);
            up.insert_header("x-forwarded-for", xff)?;
        }
        Ok(())
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (listen, upstream) = (
        args.next().expect("LISTEN_ADDR"),
        args.next().expect("UPSTREAM_ADDR"),
    );
    let conf = ServerConf {
        threads: 1,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let listener = ListenerConfig::tcp(&listen).l4_buffer(L4BufferSettings::new(0, 1460));
    if args.next().as_deref() == Some("--like-gateway") {
        let addr = upstream.parse().expect("UPSTREAM_ADDR is ip:port");
        let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, Like(addr));
        proxy.add_listener(listener);
        server.add_service(proxy);
    } else {
        let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, Pass(upstream));
        proxy.add_listener(listener);
        server.add_service(proxy);
    }
    server.run_forever();
}
