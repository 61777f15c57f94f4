//! `gimlet demo`: the gateway on the embedded store in front of a small app
//! that shows what it receives. The app knows nothing about cookies: it reads
//! `X-Session*` request headers and answers with `X-Session-*` directives.

use crate::config::Config;
use crate::server::StartError;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use std::path::Path;

const CONFIG: &str = include_str!("../config/demo.yaml");

/// `--listen` / `--admin`: `ip:port`, or a bare port on 127.0.0.1.
fn listen_addr(flag: &str, listen: &str) -> Result<std::net::SocketAddr, StartError> {
    let l = listen.trim();
    let full = if l.bytes().all(|b| b.is_ascii_digit()) && !l.is_empty() {
        format!("127.0.0.1:{l}")
    } else {
        l.to_string()
    };
    full.parse().map_err(|_| {
        StartError::Demo(format!(
            "--{flag} `{listen}` is not an address (write 127.0.0.1:8080, or a port such as 8080)"
        ))
    })
}

/// The demo's admin port: fixed (so it can be bookmarked) unless taken.
const DEMO_ADMIN: &str = "127.0.0.1:9464";

pub fn run(listen: &str, admin: Option<&str>, data: &Path) -> Result<(), StartError> {
    let listen = listen_addr("listen", listen)?.to_string();
    let listen = listen.as_str();
    let admin = match admin {
        Some(a) => listen_addr("admin", a)?.to_string(),
        None if std::net::TcpListener::bind(DEMO_ADMIN).is_ok() => DEMO_ADMIN.to_string(),
        None => "127.0.0.1:0".to_string(),
    };
    std::fs::create_dir_all(data)
        .map_err(|e| StartError::Demo(format!("cannot create {}: {e}", data.display())))?;
    let data = data
        .canonicalize()
        .map_err(|e| StartError::Demo(format!("cannot resolve {}: {e}", data.display())))?;
    // A per-checkout secret, so demo sessions survive a restart.
    let secret_file = data.join("demo-secret");
    if !secret_file.exists() {
        std::fs::write(&secret_file, crate::codec::keygen() + "\n").map_err(|e| {
            StartError::Demo(format!("cannot write {}: {e}", secret_file.display()))
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600));
        }
    }
    let app_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| StartError::Demo(format!("cannot find a port for the demo app: {e}")))?;
    // The config reads these through ${...}; anything else from the process
    // environment.
    let env = |name: &str| match name {
        "GIMLET_DEMO_LISTEN" => Some(listen.to_string()),
        "GIMLET_DEMO_ADMIN" => Some(admin.clone()),
        "GIMLET_DEMO_UPSTREAM" => Some(app_addr.to_string()),
        "GIMLET_DEMO_SECRET" => Some(format!("file:{}", secret_file.display())),
        "GIMLET_DEMO_DATA" => Some(data.display().to_string()),
        other => crate::config::process_env(other),
    };
    let config = Config::parse_with(CONFIG, &data.join("demo.yaml"), &env)?;
    crate::logging::init(&config.log);

    let mut app = Service::new("gimlet demo app".to_string(), HttpServer::new_app(DemoApp));
    app.add_tcp(&app_addr.to_string());
    println!();
    println!("  Gimlet demo: open http://{listen}/ in a browser.");
    println!(
        "  The gateway keeps sessions in {}/sessions.redb;",
        data.display()
    );
    println!("  the demo app on {app_addr} only sees headers. Ctrl-C stops both.");
    println!();
    crate::server::run(config, vec![Box::new(app)]).map_err(|e| match e {
        // redb refuses a file another process holds open.
        StartError::Store(m) if m.contains("already open") => StartError::Demo(format!(
            "another gimlet demo is running with the data directory {}; stop it, or start this one with --data DIR and --listen ADDR",
            data.display()
        )),
        other => other,
    })
}

pub struct DemoApp;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn header(session: &ServerSession, name: &str) -> Option<String> {
    session
        .req_header()
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn redirect(to: &str, directives: &[(&str, String)]) -> Response<Vec<u8>> {
    let mut r = Response::builder()
        .status(303)
        .header("location", to)
        .header("content-length", "0");
    for (k, v) in directives {
        r = r.header(*k, v.as_str());
    }
    r.body(Vec::new()).expect("valid response")
}

fn enc(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

#[async_trait]
impl ServeHttp for DemoApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let data: Vec<(String, String)> = header(session, "x-session")
            .map(|s| form_urlencoded::parse(s.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let get = |k: &str| data.iter().find(|(dk, _)| dk == k).map(|(_, v)| v.clone());
        let mut body = Vec::new();
        if method == http::Method::POST {
            while let Ok(Some(chunk)) = session.read_request_body().await {
                if body.len() + chunk.len() > 16 * 1024 {
                    break;
                }
                body.extend_from_slice(&chunk);
            }
        }
        let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
        let field = |k: &str| {
            form.iter()
                .find(|(fk, _)| fk == k)
                .map(|(_, v)| v.trim().to_string())
        };
        match (method.as_str(), path.as_str()) {
            ("POST", "/login") => {
                let name = field("name")
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| "guest".into());
                let name: String = name.chars().take(40).collect();
                let welcome = format!("Welcome, {name}. Your session id changed (Regenerate).");
                redirect(
                    "/",
                    &[
                        (
                            "x-session-set",
                            enc(&[("user", &name), ("flash", &welcome)]),
                        ),
                        ("x-session-regenerate", "1".into()),
                    ],
                )
            }
            ("POST", "/count") => redirect("/", &[("x-session-incr", "visits=1".into())]),
            ("POST", "/cart") => {
                let item = field("item")
                    .filter(|i| !i.is_empty())
                    .unwrap_or_else(|| "apple".into());
                let item: String = item.chars().filter(|c| *c != ',').take(30).collect();
                let cart = match get("cart") {
                    Some(c) if !c.is_empty() => format!("{c},{item}"),
                    _ => item,
                };
                redirect("/", &[("x-session-set", enc(&[("cart", &cart)]))])
            }
            ("POST", "/cart/clear") => redirect("/", &[("x-session-delete", "cart".into())]),
            ("POST", "/logout") => redirect(
                "/",
                &[
                    ("x-session-destroy", "1".into()),
                    (
                        "x-session-set",
                        enc(&[("flash", "Logged out: the session was destroyed.")]),
                    ),
                ],
            ),
            ("GET", "/account") => page(session, &data, true),
            ("GET", "/") => page(session, &data, false),
            _ => Response::builder()
                .status(404)
                .header("content-type", "text/plain")
                .body(b"not found\n".to_vec())
                .expect("valid response"),
        }
    }
}

fn page(session: &ServerSession, data: &[(String, String)], account: bool) -> Response<Vec<u8>> {
    let get = |k: &str| data.iter().find(|(dk, _)| dk == k).map(|(_, v)| v.as_str());
    let user = header(session, "x-remote-user").or_else(|| get("user").map(str::to_string));
    let mut h = String::new();
    h.push_str("<!doctype html><html><head><meta charset=utf-8><title>Gimlet demo</title><style>body{font:15px/1.45 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}code,pre{background:#f4f4f4;padding:.1rem .3rem;border-radius:3px}pre{padding:.6rem;overflow:auto}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:left}form{display:inline-block;margin:.2rem .6rem .2rem 0}.flash{background:#e8f5e9;padding:.5rem .8rem;border-radius:4px}</style></head><body>");
    h.push_str("<h1>Gimlet demo</h1><p>This app has no session code. The gateway in front of it reads a signed, encrypted cookie, loads the session, and sends it here as request headers; the app answers with <code>X-Session-*</code> response headers, which the gateway turns into writes.</p>");
    if let Some(f) = get("flash") {
        h.push_str(&format!("<p class=flash>{}</p>", esc(f)));
    }
    if account {
        h.push_str(&format!(
            "<h2>Account</h2><p>This page is behind <code>require: [user]</code>: the gateway redirected anyone without a session user. You are <b>{}</b>; this route may read only <code>user</code> and <code>visits</code>.</p><p><a href=/>Back</a></p>",
            esc(user.as_deref().unwrap_or("?"))
        ));
    } else {
        match &user {
            Some(u) => h.push_str(&format!(
                "<p>Logged in as <b>{}</b>. <form method=post action=/logout><button>Log out (Destroy)</button></form> <a href=/account>Account page (gated)</a></p>",
                esc(u)
            )),
            None => h.push_str("<form method=post action=/login><input name=name placeholder='your name' maxlength=40> <button>Log in (Set user + Regenerate)</button></form> <a href=/account>Account page (gated)</a>"),
        }
        h.push_str(&format!(
            "<p>Counter <code>visits</code> (server-side, atomic <code>X-Session-Incr</code>): <b>{}</b> <form method=post action=/count><button>+1</button></form></p>",
            esc(get("visits").unwrap_or("0"))
        ));
        h.push_str(&format!(
            "<p>Cart <code>cart</code> (clientside: lives inside the cookie, zero store I/O): <b>{}</b> <form method=post action=/cart><input name=item placeholder=item maxlength=30> <button>Add</button></form><form method=post action=/cart/clear><button>Empty (Delete)</button></form></p>",
            esc(get("cart").unwrap_or("empty"))
        ));
    }
    h.push_str("<h2>What the app received</h2><table><tr><th>header</th><th>value</th></tr>");
    let mut names: Vec<(String, String)> = session
        .req_header()
        .headers
        .iter()
        .filter(|(n, _)| {
            let n = n.as_str();
            n.starts_with("x-session")
                || n == "x-remote-user"
                || n == "cookie"
                || n.starts_with("x-forwarded")
        })
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    names.sort();
    for (n, v) in &names {
        h.push_str(&format!(
            "<tr><td><code>{}</code></td><td><code>{}</code></td></tr>",
            esc(n),
            esc(v)
        ));
    }
    if names.is_empty() {
        h.push_str("<tr><td colspan=2>no session yet: nothing is stored and no cookie is set until the first write</td></tr>");
    }
    h.push_str("</table><p>The gateway's cookie never reaches the app (no <code>cookie</code> row above holds it), and a client cannot forge these headers: the gateway strips them from every request.</p>");
    if !data.is_empty() {
        h.push_str(
            "<h2>Decoded <code>X-Session</code></h2><table><tr><th>key</th><th>value</th></tr>",
        );
        for (k, v) in data {
            h.push_str(&format!("<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(v)));
        }
        h.push_str("</table>");
    }
    h.push_str("</body></html>");
    let mut r = Response::builder()
        .status(200)
        .header("content-type", "text/html; charset=utf-8")
        .header("cache-control", "no-store")
        .header("content-length", h.len());
    if get("flash").is_some() && !account {
        // Show a flash message once.
        r = r.header("x-session-delete", "flash");
    }
    r.body(h.into_bytes()).expect("valid response")
}
