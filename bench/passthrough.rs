//! The bare pingora pass-through the instruction counts are a ratio to
//! (`bench/run --instructions`): the same pingora version and build
//! settings as the gateway, a `ProxyHttp` with only `upstream_peer`, one
//! worker thread, the same L4 buffers as Gimlet's plain listeners.
//!
//!     passthrough LISTEN_ADDR UPSTREAM_ADDR
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
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, Pass(upstream));
    proxy.add_listener(ListenerConfig::tcp(listen).l4_buffer(L4BufferSettings::new(0, 1460)));
    server.add_service(proxy);
    server.run_forever();
}
