//! Test harness: the real `gimlet` binary on port 0 in front of a real HTTP
//! upstream that echoes what it received and answers with the directives a
//! test asks for.
//!
//! Upstream protocol (query parameters of the request path):
//! - `h=Name:Value` (repeatable): add this response header, e.g.
//!   `h=X-Session-Set:user%3Dalice` (percent-encode the parameter);
//! - `status=N`: answer with status N;
//! - `sleep_ms=N`: wait before answering.
//!
//! The body is JSON: `{"method": .., "path": .., "headers": [[name, value], ..]}`.
#![allow(dead_code)]

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SECRET: &str = "test-secret-0123456789abcdefghijklmnop";
pub const SECRET2: &str = "test-secret-2-0123456789abcdefghijklmn";

/// An echoing upstream on 127.0.0.1:0, served from its own thread.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Upstream {
    pub fn start() -> Upstream {
        Upstream::start_with(false)
    }

    /// The same echo, speaking HTTP/2 with prior knowledge (h2c) only.
    pub fn start_h2c() -> Upstream {
        Upstream::start_with(true)
    }

    fn start_with(h2c: bool) -> Upstream {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(l.local_addr().unwrap()).unwrap();
                let serve = async {
                    loop {
                        let (tcp, _) = match l.accept().await {
                            Ok(c) => c,
                            Err(_) => continue,
                        };
                        let h = h.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                h.fetch_add(1, Ordering::SeqCst);
                                echo(req)
                            });
                            let io = hyper_util::rt::TokioIo::new(tcp);
                            if h2c {
                                let _ = hyper::server::conn::http2::Builder::new(
                                    hyper_util::rt::TokioExecutor::new(),
                                )
                                .serve_connection(io, svc)
                                .await;
                            } else {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(io, svc)
                                    .await;
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stop_rx => {}
                }
            });
        });
        Upstream {
            addr: addr_rx.recv().unwrap(),
            hits,
            _stop: stop_tx,
        }
    }
}

async fn echo(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let mut headers = header_pairs(req.headers());
    headers.sort();
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let _ = req.into_body().collect().await;
    let mut resp = hyper::Response::builder();
    let mut status = 200u16;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "h" => {
                if let Some((n, val)) = v.split_once(':') {
                    resp = resp.header(n.trim(), val.trim_start());
                }
            }
            "status" => status = v.parse().unwrap(),
            "sleep_ms" => tokio::time::sleep(Duration::from_millis(v.parse().unwrap())).await,
            _ => {}
        }
    }
    let body = serde_json::json!({ "method": method, "version": version, "path": path, "query": query, "headers": headers });
    Ok(resp
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap())
}

/// A running `gimlet run` process with its config in a temp dir.
pub struct Gateway {
    /// The first plain-HTTP listener (or the first listener of any kind).
    pub addr: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub dir: PathBuf,
    pub config: PathBuf,
    child: Child,
    pub stderr_log: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_gimlet")
}

impl Gateway {
    /// Start with `yaml` (without `listen:`/`admin:`, which the harness adds)
    /// in a fresh temp dir.
    pub fn start(yaml: &str) -> Gateway {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut g = Gateway::start_in(&dir, yaml);
        g._tmp = Some(tmp);
        g
    }

    /// Start in `dir` (kept by the caller, e.g. across restarts).
    pub fn start_in(dir: &Path, yaml: &str) -> Gateway {
        let config = dir.join("gimlet.yaml");
        let full = format!(
            "listen:\n  - addr: 127.0.0.1:0\nadmin: {{ addr: 127.0.0.1:0 }}\nserver: {{ threads: 2, grace_period: 1s }}\n{yaml}"
        );
        std::fs::write(&config, full).unwrap();
        Gateway::spawn(dir, &config)
    }

    /// Run the binary on an existing config file (with `listen` on port 0).
    pub fn spawn(dir: &Path, config: &Path) -> Gateway {
        Gateway::spawn_with(dir, config, true)
    }

    /// `rust_log: false` leaves `RUST_LOG` unset, so `log:` in the file rules.
    pub fn spawn_with(dir: &Path, config: &Path, rust_log: bool) -> Gateway {
        let level = std::env::var("GIMLET_TEST_LOG").unwrap_or_else(|_| "gimlet=info,warn".into());
        Gateway::spawn_logged(dir, config, rust_log.then_some(level.as_str()))
    }

    /// Run with `RUST_LOG` set to `rust_log` (`None`: unset).
    pub fn spawn_logged(dir: &Path, config: &Path, rust_log: Option<&str>) -> Gateway {
        let stderr_log = dir.join(format!("gimlet-{}.log", unique()));
        let mut cmd = Command::new(bin());
        cmd.args(["run", "-c"]).arg(config).env_remove("RUST_LOG");
        if let Some(level) = rust_log {
            cmd.env("RUST_LOG", level);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .spawn()
            .expect("gimlet binary runs");
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut addr: Option<SocketAddr> = None;
        let mut https: Option<SocketAddr> = None;
        let mut admin = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap() == 0 || std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                panic!("gimlet did not start: {log}");
            }
            let l = line.trim();
            if let Some(a) = l.strip_prefix("gimlet listening on http://") {
                addr = addr.or(Some(a.parse().unwrap()));
            } else if let Some(a) = l.strip_prefix("gimlet listening on https://") {
                https = https.or(Some(a.parse().unwrap()));
            } else if let Some(a) = l.strip_prefix("gimlet admin on http://") {
                admin = Some(a.parse().unwrap());
            } else if l.starts_with("gimlet started") {
                break;
            }
        }
        if let Some(a) = https {
            wait_port(a);
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        let addr: SocketAddr = addr.or(https).unwrap();
        wait_port(addr);
        if let Some(a) = admin {
            wait_port(a);
        }
        Gateway {
            addr,
            https,
            admin,
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            child,
            stderr_log,
            _tmp: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait for the process to exit; returns its status.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn metrics(&self) -> String {
        let a = self.admin.expect("admin listener");
        reqwest::get(format!("http://{a}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one metric sample, e.g. `gimlet_sessions_total{event="created"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, sample)
    }
}

pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

fn unique() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

pub fn wait_port(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "{addr} never opened");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A config with one catch-all route to `up`; `session` is the YAML body of
/// `session:` after `secrets`, `route` extra lines of the route's mapping.
pub fn config(up: &Upstream, session: &str, store: &str, route: &str) -> String {
    format!(
        "session:\n  secrets: [\"{SECRET}\"]\n{session}store: {store}\nroutes:\n  - name: app\n    upstreams: [\"{}\"]\n{route}",
        up.addr
    )
}

/// A manual cookie jar: name -> value, updated from Set-Cookie lines.
#[derive(Default, Clone, Debug)]
pub struct Jar {
    pub cookies: BTreeMap<String, String>,
}

impl Jar {
    pub fn header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn update(&mut self, resp: &Resp) {
        for line in &resp.set_cookies {
            let first = line.split(';').next().unwrap();
            let (name, value) = first.split_once('=').unwrap();
            if line.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_string(), value.to_string());
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.cookies.get(name).map(|s| s.as_str())
    }

    /// The session cookies without the browser binding cookie (`…-b`):
    /// what an attacker who planted or lifted the session cookie holds.
    pub fn without_binding(&self) -> Jar {
        Jar {
            cookies: self
                .cookies
                .iter()
                .filter(|(n, _)| !n.ends_with("-b"))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect(),
        }
    }
}

/// A response, read fully.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub set_cookies: Vec<String>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|_| panic!("not JSON ({}): {}", self.status, self.body))
    }

    /// Headers the upstream received (lowercase names).
    pub fn got(&self) -> Vec<(String, String)> {
        self.json()["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_string(),
                    p[1].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    pub fn got_header(&self, name: &str) -> Option<String> {
        self.got()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// The `Set-Cookie` lines of the session's cookies (not the browser
    /// binding cookie `…-b` a regenerate grace adds to a new session).
    pub fn session_cookies(&self) -> Vec<&String> {
        self.set_cookies
            .iter()
            .filter(|l| !l.split('=').next().unwrap_or("").ends_with("-b"))
            .collect()
    }

    /// The upstream's decoded `X-Session` pairs.
    pub fn session(&self) -> BTreeMap<String, String> {
        self.got_header("x-session")
            .map(|s| form_urlencoded::parse(s.as_bytes()).into_owned().collect())
            .unwrap_or_default()
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// Path with directive headers for the upstream to send back.
pub fn path_with(path: &str, headers: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (n, v) in headers {
        s.append_pair("h", &format!("{n}:{v}"));
    }
    let q = s.finish();
    if q.is_empty() {
        path.to_string()
    } else if path.contains('?') {
        format!("{path}&{q}")
    } else {
        format!("{path}?{q}")
    }
}

pub async fn send(c: &reqwest::Client, req: reqwest::RequestBuilder) -> Resp {
    let _ = c;
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = header_pairs(r.headers());
    let set_cookies = headers
        .iter()
        .filter(|(n, _)| n == "set-cookie")
        .map(|(_, v)| v.clone())
        .collect();
    let body = r.text().await.unwrap_or_default();
    Resp {
        status,
        headers,
        set_cookies,
        body,
    }
}

/// A browser-like session: a client and a jar.
pub struct Browser {
    pub c: reqwest::Client,
    pub jar: Jar,
    pub base: String,
}

impl Browser {
    pub fn new(g: &Gateway) -> Browser {
        Browser::new_at(g.addr)
    }

    pub fn new_at(addr: SocketAddr) -> Browser {
        Browser {
            c: client(),
            jar: Jar::default(),
            base: format!("http://{addr}"),
        }
    }

    /// GET `path`, the upstream answering with `directives`; cookies kept.
    pub async fn get(&mut self, path: &str, directives: &[(&str, &str)]) -> Resp {
        let url = format!("{}{}", self.base, path_with(path, directives));
        let mut req = self.c.get(url);
        if !self.jar.cookies.is_empty() {
            req = req.header("cookie", self.jar.header());
        }
        let r = send(&self.c, req).await;
        self.jar.update(&r);
        r
    }

    /// Like `get` with extra request headers, without updating the jar.
    pub async fn get_with(
        &self,
        path: &str,
        directives: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Resp {
        let url = format!("{}{}", self.base, path_with(path, directives));
        let mut req = self.c.get(url);
        if !self.jar.cookies.is_empty() {
            req = req.header("cookie", self.jar.header());
        }
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        send(&self.c, req).await
    }
}

/// A private redis-server on a free loopback port (so a test can kill and
/// restart it).
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port p below 45536 with p + 10000 free too (a Cluster node's bus).
pub fn free_cluster_port() -> u16 {
    use std::sync::atomic::AtomicU16;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64)
        % 20000;
    loop {
        let step = NEXT.fetch_add(1, Ordering::Relaxed) as u64;
        let p = 20000 + ((seed + step * 37) % 25000) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(p) && free(p + 10000) {
            return p;
        }
    }
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> RedisServer {
        // A Cluster node also listens on port + 10000 (its bus): pick a
        // port where both are free and below 65536.
        let cluster = args.contains(&"--cluster-enabled");
        let mut r = RedisServer {
            port: if cluster {
                free_cluster_port()
            } else {
                free_port()
            },
            child: None,
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)start on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (make deps)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self
            .try_cli(&["PING"])
            .map(|s| s.trim() != "PONG")
            .unwrap_or(true)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP: the server holds its data but answers nothing.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).expect("redis-cli")
    }

    pub fn reset_stats(&self) {
        self.cli(&["CONFIG", "RESETSTAT"]);
    }

    /// Calls per command since the last reset (INFO and CONFIG excluded).
    pub fn commandstats(&self) -> BTreeMap<String, u64> {
        parse_commandstats(&self.cli(&["INFO", "commandstats"]))
    }

    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut k: Vec<String> = self
            .cli(&["--scan", "--pattern", pattern])
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect();
        k.sort();
        k
    }
}

pub fn parse_commandstats(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .filter(|(n, _)| n != "info" && !n.starts_with("config"))
        .collect()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GET every URL at once, all with the same `Cookie`; every response must be
/// a 200.
pub async fn all_at_once(urls: Vec<String>, cookie: &str) {
    let c = client();
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let (c, cookie) = (c.clone(), cookie.to_string());
            tokio::spawn(async move { send(&c, c.get(url).header("cookie", cookie)).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

/// (name, value) pairs of a header map, values read lossily as UTF-8.
pub fn header_pairs(h: &http::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Store reads that failed or timed out, from a /metrics text.
pub fn failed_reads(metrics: &str) -> f64 {
    metric_value(
        metrics,
        "gimlet_store_operations_total{op=\"read\",result=\"error\"}",
    ) + metric_value(
        metrics,
        "gimlet_store_operations_total{op=\"read\",result=\"timeout\"}",
    )
}

/// One HTTP/1.1 request written byte for byte (paths and header names that
/// reqwest would normalize or refuse), read to the end (`Connection: close`).
pub fn raw_request(addr: SocketAddr, head: &str) -> Resp {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_raw_response(&buf)
}

/// `GET target` with extra header lines (each `Name: value`).
pub fn raw_get(addr: SocketAddr, target: &str, headers: &[String]) -> Resp {
    let mut head = format!("GET {target} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    raw_request(addr, &head)
}

/// The length of the first response in `buf` once it is all there (head
/// and `Content-Length` body), for readers of a keep-alive connection.
pub fn response_len(buf: &[u8]) -> Option<usize> {
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut hs);
    let Ok(httparse::Status::Complete(head)) = r.parse(buf) else {
        return None;
    };
    let body = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map_or(0, |h| {
            std::str::from_utf8(h.value)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        });
    (buf.len() >= head + body).then_some(head + body)
}

/// The last response in `buf` (interim 1xx responses skipped, kept in
/// `headers` as `(":interim", status)` entries followed by their fields).
pub fn parse_raw_response(buf: &[u8]) -> Resp {
    let mut rest = buf;
    let mut interim: Vec<(String, String)> = Vec::new();
    loop {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut hs);
        let n = match r.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => {
                return Resp {
                    status: 0,
                    headers: interim,
                    set_cookies: vec![],
                    body: String::from_utf8_lossy(rest).into_owned(),
                }
            }
        };
        let status = r.code.unwrap();
        let headers: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        rest = &rest[n..];
        if (100..200).contains(&status) && status != 101 {
            interim.push((":interim".into(), status.to_string()));
            interim.extend(headers);
            continue;
        }
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_vec()
        };
        let set_cookies = headers
            .iter()
            .filter(|(n, _)| n == "set-cookie")
            .map(|(_, v)| v.clone())
            .collect();
        let mut all = interim;
        all.extend(headers);
        return Resp {
            status,
            headers: all,
            set_cookies,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            std::str::from_utf8(&b[..eol])
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        b = &b[eol + 2..];
        out.extend_from_slice(&b[..size.min(b.len())]);
        b = &b[(size + 2).min(b.len())..];
    }
}

/// An upstream that answers every request with the same raw bytes (for
/// responses no HTTP library would write: broken header lines, 1xx).
pub struct RawUpstream {
    pub addr: SocketAddr,
}

impl RawUpstream {
    pub fn start(response: &'static [u8]) -> RawUpstream {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = c.write_all(response);
                    let _ = c.flush();
                });
            }
        });
        RawUpstream { addr }
    }
}

/// `gimlet demo` on a free port with its data in a temp dir; killed on drop.
pub struct Demo {
    pub base: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Demo {
    pub fn start() -> Demo {
        let dir = tempfile::tempdir().unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let child = Command::new(bin())
            .args([
                "demo",
                "--listen",
                &listen,
                "--admin",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_port(listen.parse().unwrap());
        // The demo app is another listener of the same process, bound a
        // moment after the gateway's: until it is, the gateway answers 502.
        let deadline = Instant::now() + Duration::from_secs(10);
        while raw_get(listen.parse().unwrap(), "/", &[]).status == 502 {
            assert!(Instant::now() < deadline, "the demo app never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Demo {
            base: format!("http://{listen}"),
            dir,
            child,
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three masters with `--cluster-enabled yes`, joined by redis-cli.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            while !n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster never became ok");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Cluster { nodes }
    }

    pub fn store(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect();
        format!(
            "{{ kind: redis, cluster: [{}], timeout: 500ms }}",
            urls.join(", ")
        )
    }

    /// (node id, port, slot count) of the master holding `slot`.
    pub fn owner(&self, slot: u16) -> (String, u16, usize) {
        let nodes = self.nodes[0].cli(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if !f[2].contains("master") {
                continue;
            }
            let mut count = 0;
            let mut owns = false;
            for range in &f[8..] {
                let (a, b) = match range.split_once('-') {
                    Some((a, b)) => (a.parse::<u16>().unwrap(), b.parse::<u16>().unwrap()),
                    None => match range.parse::<u16>() {
                        Ok(s) => (s, s),
                        Err(_) => continue,
                    },
                };
                count += (b - a + 1) as usize;
                owns |= (a..=b).contains(&slot);
            }
            if owns {
                let port = f[1]
                    .split('@')
                    .next()
                    .unwrap()
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                return (f[0].to_string(), port, count);
            }
        }
        panic!("no owner for slot {slot}: {nodes}");
    }

    pub fn other_master(&self, not: &str) -> String {
        let nodes = self.nodes[0].cli(&["CLUSTER", "NODES"]);
        nodes
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f[2].contains("master") && f[0] != not)
            .map(|f| f[0].to_string())
            .unwrap()
    }
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM` ...).
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A private PostgreSQL server for one test: `initdb` into a temp dir, then
/// `pg_ctl` on a free loopback port (trust auth, no fsync), so the test can
/// stop and start it. As root, the server runs as the `postgres` user
/// (PostgreSQL refuses root).
pub struct PgServer {
    pub port: u16,
    dir: tempfile::TempDir,
    running: bool,
}

/// Debian's server binaries are not on PATH: the newest installed major.
fn pg_bin(name: &str) -> PathBuf {
    let mut majors: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    majors.sort();
    majors
        .into_iter()
        .rev()
        .map(|b| b.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn as_postgres(bin: &str) -> Command {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(bin));
        c
    } else {
        Command::new(pg_bin(bin))
    }
}

impl PgServer {
    pub fn start() -> PgServer {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let root = std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false);
        if root {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown the data dir to postgres");
        }
        let out = as_postgres("initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()
            .expect("initdb is installed (make deps: postgresql)");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut p = PgServer {
            port: free_port(),
            dir,
            running: false,
        };
        p.restart();
        p
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn restart(&mut self) {
        assert!(!self.running, "already running");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c full_page_writes=off -c shared_preload_libraries=pg_stat_statements \
             -c pg_stat_statements.track=top -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let out = as_postgres("pg_ctl")
            .args(["-w", "-t", "30", "-l"])
            .arg(self.dir.path().join("log"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
        self.running = true;
    }

    /// Stop at once (no shutdown checkpoint): like a crash, connections cut.
    pub fn kill(&mut self) {
        if !self.running {
            return;
        }
        let _ = as_postgres("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .output();
        self.running = false;
    }

    /// One statement through psql; its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("psql is installed (make deps: postgresql-client)");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Statements the server ran since the last reset, by query text
    /// (`pg_stat_statements`, top-level only), the test's own psql calls
    /// left out.
    pub fn statements(&self) -> BTreeMap<String, u64> {
        self.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
        self.psql(
            "SELECT calls, query FROM pg_stat_statements \
             WHERE query NOT ILIKE '%pg_stat_statements%' AND query NOT ILIKE 'CREATE EXTENSION%'",
        )
        .lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(n, q)| (q.to_string(), n.parse().unwrap_or(0)))
        .fold(BTreeMap::new(), |mut m, (q, n)| {
            *m.entry(q).or_insert(0) += n;
            m
        })
    }

    pub fn reset_statements(&self) {
        self.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
        self.psql("SELECT pg_stat_statements_reset()");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private MariaDB server for one test: `mariadb-install-db` into a temp
/// dir, then `mariadbd` on a free loopback port with a database `gimlet`,
/// root without a password; the test can kill and restart it.
pub struct MariaServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl MariaServer {
    pub fn start() -> MariaServer {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mariadb-install-db")
            .args(["--no-defaults", "--auth-root-authentication-method=normal"])
            .args(["--skip-test-db", "--user=root"])
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .output()
            .expect("mariadb-install-db is installed (make deps: mariadb-server)");
        assert!(
            out.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut m = MariaServer {
            port: free_port(),
            dir,
            child: None,
        };
        m.restart();
        m.sql("CREATE DATABASE IF NOT EXISTS gimlet");
        m
    }

    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/gimlet", self.port)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let d = self.dir.path();
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", d.join("sock").display()))
            .arg(format!("--pid-file={}", d.join("pid").display()))
            .arg(format!("--port={}", self.port))
            .args(["--bind-address=127.0.0.1", "--user=root", "--skip-log-bin"])
            .args(["--skip-name-resolve", "--innodb-buffer-pool-size=64M"])
            .args([
                "--innodb-flush-log-at-trx-commit=2",
                "--max-connections=300",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("log")).unwrap())
            .spawn()
            .expect("mariadbd is installed (make deps: mariadb-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.try_sql("SELECT 1").is_none() {
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start: {}",
                std::fs::read_to_string(d.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: connections cut, committed data kept.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn try_sql(&self, sql: &str) -> Option<String> {
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-h127.0.0.1", "-uroot", "-N", "-B"])
            .arg(format!("-P{}", self.port))
            .args(["-e", sql])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// One statement through the mariadb client, in database `gimlet`
    /// once it exists; its tab-separated output.
    pub fn sql(&self, sql: &str) -> String {
        let full = if sql.starts_with("CREATE DATABASE") {
            sql.to_string()
        } else {
            format!("USE gimlet; {sql}")
        };
        self.try_sql(&full)
            .unwrap_or_else(|| panic!("mariadb: {sql} failed"))
    }

    /// Prepared statements executed by clients (the gateway's queries;
    /// the mariadb client's own go as plain queries and are not counted).
    pub fn executes(&self) -> u64 {
        self.status("Com_stmt_execute")
    }

    /// `CALL`s run (the gateway's writes and cleanups).
    pub fn calls(&self) -> u64 {
        self.status("Com_call_procedure")
    }

    fn status(&self, name: &str) -> u64 {
        self.sql(&format!("SHOW GLOBAL STATUS LIKE '{name}'"))
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MariaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `openssl ARGS` in `dir`, which must succeed.
pub fn openssl(args: &[&str], dir: &Path) {
    let ok = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed")
        .success();
    assert!(ok, "openssl {args:?}");
}

/// `NAME-ca.pem` (a CA) and, signed by it, `NAME-server.pem`/`-key.pem`
/// for 127.0.0.1 and localhost, and `NAME-client.pem`/`-key.pem`.
pub fn pki(dir: &Path, name: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = format!("{name}-ca.pem");
    let ca_key = format!("{name}-ca-key.pem");
    let subject = format!("/CN={name} test CA");
    let mut a = vec!["req", "-x509", "-days", "2", "-subj", &subject];
    a.extend(ec);
    a.extend(["-keyout", &ca_key, "-out", &ca]);
    a.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    a.extend(["-addext", "keyUsage=critical,keyCertSign"]);
    openssl(&a, dir);
    for (who, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        let key = format!("{name}-{who}-key.pem");
        let csr = format!("{name}-{who}.csr");
        let crt = format!("{name}-{who}.pem");
        let extfile = format!("{name}-{who}.ext");
        std::fs::write(dir.join(&extfile), ext).unwrap();
        let mut a = vec!["req", "-new", "-subj", "/CN=127.0.0.1"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr]);
        openssl(&a, dir);
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &extfile,
                "-out",
                &crt,
            ],
            dir,
        );
    }
}

/// What `gimlet check` said of a config: its exit, stdout and stderr.
pub struct Checked {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// `gimlet check [--print] -c FILE` on `yaml` written into `dir`, with
/// `env` set.
pub fn check_yaml(dir: &Path, yaml: &str, print: bool, env: &[(&str, &str)]) -> Checked {
    let f = dir.join("checked.yaml");
    std::fs::write(&f, yaml).unwrap();
    let mut c = Command::new(bin());
    c.arg("check");
    if print {
        c.arg("--print");
    }
    let out = c
        .arg("-c")
        .arg(&f)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Checked {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
