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

/// The answer to a form's POST: a 303 to `to` for a plain form, or, for the
/// page's script (`Accept: application/json`), a 200 saying where to go, so
/// the script can read the `Server-Timing` of the very response that carried
/// the directives. Both carry the same directives.
fn done(json: bool, to: &str, directives: &[(&str, String)]) -> Response<Vec<u8>> {
    let body = if json {
        serde_json::json!({ "next": to }).to_string().into_bytes()
    } else {
        Vec::new()
    };
    let mut r = Response::builder()
        .status(if json { 200 } else { 303 })
        .header("cache-control", "no-store")
        .header("content-length", body.len());
    r = if json {
        r.header("content-type", "application/json")
    } else {
        r.header("location", to)
    };
    for (k, v) in directives {
        r = r.header(*k, v.as_str());
    }
    r.body(body).expect("valid response")
}

fn enc(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

/// Where a login may send the browser next: a path on this site only. A
/// `next` of `//evil.example` or `/\evil.example` is a link to another site
/// in a browser's eyes (an open redirect); anything but a plain local path
/// goes home.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n
                    .bytes()
                    .any(|b| b == b'\\' || b.is_ascii_control() || b == b' ')
                && n.len() <= 200 =>
        {
            n
        }
        _ => "/",
    }
}

/// The first 8 hex digits of a session id: enough to tell two apart, and
/// never the whole bearer token on a page.
fn short_id(id: Option<&str>) -> String {
    match id {
        Some(i) if i.len() >= 8 => format!("{}…", &i[..8]),
        _ => "none".into(),
    }
}

#[async_trait]
impl ServeHttp for DemoApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query: Vec<(String, String)> = session
            .req_header()
            .uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let json = header(session, "accept").is_some_and(|a| a.contains("application/json"));
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
                let old = short_id(header(session, "x-session-id").as_deref());
                let next = field("next");
                done(
                    json,
                    safe_next(next.as_deref()),
                    &[
                        (
                            "x-session-set",
                            enc(&[("user", &name), ("flash", &welcome), ("prev_id", &old)]),
                        ),
                        ("x-session-regenerate", "1".into()),
                    ],
                )
            }
            ("POST", "/count") => done(json, "/", &[("x-session-incr", "visits=1".into())]),
            ("POST", "/cart") => {
                let item = field("item")
                    .filter(|i| !i.is_empty())
                    .unwrap_or_else(|| "apple".into());
                let item: String = item.chars().filter(|c| *c != ',').take(30).collect();
                let cart = match get("cart") {
                    Some(c) if !c.is_empty() => format!("{c},{item}"),
                    _ => item,
                };
                done(json, "/", &[("x-session-set", enc(&[("cart", &cart)]))])
            }
            ("POST", "/cart/clear") => done(json, "/", &[("x-session-delete", "cart".into())]),
            ("POST", "/logout") => done(
                json,
                "/",
                &[
                    ("x-session-destroy", "1".into()),
                    (
                        "x-session-set",
                        enc(&[("flash", "Logged out: the session was destroyed.")]),
                    ),
                ],
            ),
            ("GET", "/account") => page(session, &data, &query, true),
            ("GET", "/") => page(session, &data, &query, false),
            _ => Response::builder()
                .status(404)
                .header("content-type", "text/plain")
                .body(b"not found\n".to_vec())
                .expect("valid response"),
        }
    }
}

const STYLE: &str = r#"
:root{--bg:#f5f6fb;--card:#fff;--ink:#171827;--mute:#646781;--line:#e6e8f1;--soft:#f3f4fa;--brand:#4f46e5;--brand2:#7c3aed;--ok:#0b7a4b;--okbg:#e6f6ee;--warn:#8a4b00;--warnbg:#fff3dc;--mono:ui-monospace,SFMono-Regular,"SF Mono",Menlo,Consolas,"Cascadia Mono","DejaVu Sans Mono","Liberation Mono",monospace}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Noto Sans",Ubuntu,"Helvetica Neue",Arial,sans-serif;-webkit-font-smoothing:antialiased}
code{font:.92em var(--mono);white-space:nowrap}
header{background:linear-gradient(120deg,var(--brand),var(--brand2));color:#fff;padding:22px 16px 64px}
.in{max-width:1000px;margin:0 auto}
main{max-width:1032px;margin:-44px auto 0;padding:0 16px 40px}
.logo{display:flex;align-items:center;gap:10px;font-weight:700;font-size:19px;letter-spacing:-.01em}
.logo i{display:inline-grid;place-items:center;width:32px;height:32px;border-radius:10px;background:rgba(255,255,255,.2);font-style:normal}
.logo small{margin-left:auto;font-weight:500;font-size:12px;padding:3px 9px;border-radius:999px;background:rgba(255,255,255,.16)}
header p{margin:12px 0 0;max-width:660px;color:rgba(255,255,255,.9)}
header code{color:#fff}
.grid{display:grid;gap:16px;grid-template-columns:minmax(0,1fr)}
@media (min-width:640px){.grid{grid-template-columns:repeat(2,minmax(0,1fr))}}
@media (min-width:920px){.grid{grid-template-columns:repeat(3,minmax(0,1fr))}.span2{grid-column:span 2}}
.wide{grid-column:1/-1}
.card{background:var(--card);border:1px solid var(--line);border-radius:16px;padding:18px;box-shadow:0 1px 2px rgba(23,24,39,.04),0 8px 24px rgba(23,24,39,.05);min-width:0}
.card h2{margin:0 0 2px;font-size:15.5px;letter-spacing:-.005em}
.card>:last-child{margin-bottom:0}
.sub{margin:0 0 14px;color:var(--mute);font-size:13px}
.big{font-size:30px;font-weight:700;letter-spacing:-.02em;line-height:1.1;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
.row{display:flex;flex-wrap:wrap;gap:8px;align-items:center}
.spread{justify-content:space-between}
.grow{flex:1 1 170px}
p.big{margin:2px 0 14px}
.items{margin:0 0 12px;min-height:24px}
form{margin:0}
input{font:inherit;padding:9px 12px;border:1px solid #d9dce8;border-radius:10px;min-width:0;flex:1 1 120px;background:#fbfbfe;color:inherit}
input:focus{outline:3px solid #dcdafd;border-color:var(--brand)}
button{font:inherit;font-weight:600;border:0;border-radius:10px;padding:9px 16px;background:var(--brand);color:#fff;cursor:pointer;box-shadow:0 1px 2px rgba(79,70,229,.3)}
button:hover{background:#4338ca}
button.ghost{background:#eef0fd;color:var(--brand);box-shadow:none}
button.ghost:hover{background:#e2e5fb}
a{color:var(--brand);font-weight:600;text-decoration:none}
a:hover{text-decoration:underline}
.note{border-radius:14px;padding:12px 16px;margin:0 0 16px;font-weight:500;box-shadow:0 8px 24px rgba(23,24,39,.06)}
.flash{background:var(--okbg);color:var(--ok);border:1px solid #c4ecd8}
.gate{background:var(--warnbg);color:var(--warn);border:1px solid #f7dca6}
.chips{display:flex;flex-wrap:wrap;gap:6px;margin:0;padding:0;list-style:none}
.chip{font:12px/1.2 var(--mono);background:#eef0fd;color:#3730a3;border-radius:999px;padding:5px 10px;max-width:100%;overflow-wrap:anywhere}
.chip.cookie{background:#fdf0e6;color:#9a3412}
.chip.none{background:var(--soft);color:var(--mute)}
.chip.err{background:#fde8e8;color:#9b1c1c}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(130px,1fr));gap:8px;margin:0 0 14px}
.stat{background:var(--soft);border-radius:12px;padding:10px 12px;min-width:0}
.stat span{display:block;color:var(--mute);font-size:12px}
.stat b{display:block;font-size:16px;letter-spacing:-.01em}
.stat small{display:block;color:var(--mute);font-size:12px}
dl.kv{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:10px 14px;margin:0;align-items:baseline}
dl.kv dt{color:var(--mute);font-size:13px}
dl.kv dd{margin:0;min-width:0}
.ids{font:14px/2.2 var(--mono)}
.ids b{display:inline-block;line-height:1.4;background:var(--soft);border-radius:9px;padding:6px 10px;font-weight:600}
.ids i{font-style:normal;color:var(--brand);font-weight:700;margin:0 6px}
.mono{font-family:var(--mono);font-size:13px}
table{width:100%;border-collapse:collapse;table-layout:fixed}
th,td{text-align:left;padding:8px 6px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:var(--mute);font-weight:600}
th:first-child{width:28%}
td.n{font:12.5px var(--mono);white-space:nowrap;overflow:hidden;text-overflow:ellipsis;color:var(--mute)}
td.v{font:12.5px var(--mono);overflow-wrap:anywhere}
.muted{color:var(--mute);font-size:13px}
footer{max-width:1000px;margin:0 auto;padding:0 16px 32px;color:var(--mute);font-size:12.5px;text-align:center}
@media (max-width:560px){.big{font-size:26px}table,tbody,tr,td{display:block}tr:first-child{display:none}td.n{width:auto;border:0;padding:8px 0 0}td.v{padding:2px 0 8px}}
"#;

/// The page's script: forms post with `fetch` so the `Server-Timing` of the
/// response that carried the directives can be read (a redirect hides it),
/// and the panels show it; without JavaScript the forms still work.
const SCRIPT: &str = r#"
(function(){
function parse(h){var out=[];(h||'').replace(/([a-z-]+)((?:;[a-z]+=(?:"[^"]*"|[^;,]*))*)/g,function(_,name,params){var e={name:name,duration:0,description:''};params.replace(/;([a-z]+)=("([^"]*)"|[^;,]*)/g,function(_,k,v,q){if(k==='dur')e.duration=parseFloat(v);if(k==='desc')e.description=q!==undefined?q:v;});out.push(e);});return out;}
function ms(d){return d<0.05?'0 ms':(d<10?d.toFixed(2):d.toFixed(1))+' ms';}
function chip(text,cls){var li=document.createElement('li');li.className='chip'+(cls?' '+cls:'');li.textContent=text;return li;}
function stat(label,value,note){var d=document.createElement('div');d.className='stat';[['span',label],['b',value],['small',note]].forEach(function(p){if(!p[1])return;var e=document.createElement(p[0]);e.textContent=p[1];d.appendChild(e);});return d;}
function render(el,entries){
  if(!el)return;
  var by={};entries.forEach(function(e){(by[e.name]=by[e.name]||[]).push(e);});
  function one(n){return (by[n]||[])[0];}
  var st=document.createElement('div');st.className='stats';
  var r=one('read'),w=one('write'),a=one('app'),t=one('round-trips');
  var place={none:'nothing',cookie:'the cookie',store:'the store'};
  function note(e,none){return e.description==='store'?ms(e.duration):(e.description==='cookie'?'no store I/O':none);}
  if(r)st.appendChild(stat('Session read from',r.description==='none'?'no session':(place[r.description]||r.description),note(r,'no cookie yet')));
  if(a)st.appendChild(stat('App',ms(a.duration),'at the upstream'));
  if(w)st.appendChild(stat('Written to',place[w.description]||w.description,note(w,'no change')));
  if(t)st.appendChild(stat('Store round trips',t.description,t.description==='0'?'none at all':''));
  var dl=document.createElement('dl');dl.className='kv';
  function row(k,v){var dt=document.createElement('dt');dt.textContent=k;var dd=document.createElement('dd');dd.appendChild(v);dl.appendChild(dt);dl.appendChild(dd);}
  var d=document.createElement('ul');d.className='chips';
  (by['directive']||[]).forEach(function(e){d.appendChild(chip(e.description));});
  (by['directive-error']||[]).forEach(function(e){d.appendChild(chip('refused: '+e.description,'err'));});
  if(!d.children.length)d.appendChild(chip('none','none'));
  row('Directives',d);
  var c=document.createElement('ul');c.className='chips';
  (by['cookie']||[]).forEach(function(e){var p=e.description.split(' ');c.appendChild(chip(p[0]==='set'?'set '+p[1]+' · '+p[2]+' B':'cleared '+p[1],'cookie'));});
  if(!c.children.length)c.appendChild(chip('none','none'));
  row('Cookies',c);
  el.innerHTML='';el.appendChild(st);el.appendChild(dl);
}
var last=null;try{last=JSON.parse(sessionStorage.getItem('gimlet-last')||'null');sessionStorage.removeItem('gimlet-last');}catch(e){}
var lastBox=document.getElementById('last');
if(last&&lastBox){document.getElementById('last-title').textContent='Your last action: '+last.action;render(lastBox,parse(last.timing));document.getElementById('last-card').hidden=false;}
var nav=(performance.getEntriesByType&&performance.getEntriesByType('navigation')[0])||null;
if(nav&&nav.serverTiming&&nav.serverTiming.length){render(document.getElementById('load'),nav.serverTiming.map(function(s){return {name:s.name,duration:s.duration,description:s.description};}));}
document.querySelectorAll('time[data-unix]').forEach(function(t){var d=new Date(parseInt(t.dataset.unix,10)*1000);t.textContent=d.toLocaleString(undefined,{dateStyle:'medium',timeStyle:'short'});});
document.querySelectorAll('form[data-action]').forEach(function(f){f.addEventListener('submit',function(ev){ev.preventDefault();
  var b=f.querySelector('button');if(b)b.disabled=true;
  fetch(f.action,{method:'POST',body:new URLSearchParams(new FormData(f)),headers:{'Accept':'application/json'},credentials:'same-origin'}).then(function(r){
    var timing=r.headers.get('server-timing')||'';
    // Not the app's JSON (the gateway answered itself, e.g. an error page): show it as is.
    if(!/json/.test(r.headers.get('content-type')||''))return r.text().then(function(t){var pre=document.createElement('pre');pre.className='note gate';pre.textContent=r.status+' '+t;document.querySelector('main').prepend(pre);});
    return r.json().then(function(j){sessionStorage.setItem('gimlet-last',JSON.stringify({action:f.dataset.action,timing:timing}));location.href=j.next||'/';});
  },function(){f.submit();});});});
})();
"#;

/// "in 7 days", "3 minutes ago".
fn relative(unix: u64, now: u64) -> String {
    let (d, future) = if unix > now {
        (unix - now, true)
    } else {
        (now - unix, false)
    };
    let (n, unit) = match d {
        0..=59 => {
            return if future {
                "in a moment".into()
            } else {
                "just now".into()
            }
        }
        // Rounded to the nearest unit: a 7-day lifetime read a second
        // after it began is "in 7 days", not "in 6 days".
        60..=3_569 => ((d + 30) / 60, "minute"),
        3_570..=84_599 => ((d + 1_800) / 3_600, "hour"),
        _ => ((d + 43_200) / 86_400, "day"),
    };
    let s = if n == 1 { "" } else { "s" };
    if future {
        format!("in {n} {unit}{s}")
    } else {
        format!("{n} {unit}{s} ago")
    }
}

fn when(unix: Option<u64>, now: u64) -> String {
    match unix {
        Some(u) => {
            let date =
                httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(u));
            format!(
                "<time data-unix={u} datetime=\"{u}\">{}</time> <span class=muted>({})</span>",
                esc(&date),
                relative(u, now)
            )
        }
        None => "—".into(),
    }
}

fn page(
    session: &ServerSession,
    data: &[(String, String)],
    query: &[(String, String)],
    account: bool,
) -> Response<Vec<u8>> {
    let get = |k: &str| data.iter().find(|(dk, _)| dk == k).map(|(_, v)| v.as_str());
    let user = header(session, "x-remote-user").or_else(|| get("user").map(str::to_string));
    let id = header(session, "x-session-id");
    let num = |h: &str| header(session, h).and_then(|v| v.parse::<u64>().ok());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let next = query
        .iter()
        .find(|(k, _)| k == "next")
        .map(|(_, v)| safe_next(Some(v)).to_string())
        .filter(|n| n != "/");
    let mut h = String::with_capacity(16 * 1024);
    h.push_str("<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width,initial-scale=1\"><title>Gimlet demo</title><style>");
    h.push_str(STYLE);
    h.push_str("</style></head><body><header><div class=in><div class=logo><i>G</i>Gimlet demo<small>live</small></div><p>This app has no session code. The gateway in front of it owns the cookie and the store: it hands the session to the app as request headers, and applies the <code>X-Session-*</code> headers the app answers with.</p></div></header><main>");
    if let Some(f) = get("flash") {
        h.push_str(&format!("<p class='note flash' id=flash>{}</p>", esc(f)));
    }
    if let (Some(n), None) = (&next, &user) {
        h.push_str(&format!(
            "<p class='note gate' id=gate>Please log in to see <b>{}</b>. The gateway sent you here because that page requires a session user.</p>",
            esc(n)
        ));
    }
    h.push_str("<div class=grid>");
    if let (Some(old), Some(new)) = (get("prev_id"), &id) {
        h.push_str(&format!(
            "<section class='card wide'><h2>Session id changed on login</h2><p class=sub>Regenerate gives the logged-in session a new id, so a cookie planted before the login is worth nothing after it.</p><div class=ids id=ids><b>{}</b> <i>→</i> <b>{}</b></div></section>",
            esc(old),
            esc(&short_id(Some(new)))
        ));
    }
    h.push_str("<section class='card wide' id=last-card hidden><h2 id=last-title>Your last action</h2><p class=sub>What the gateway did with the app's answer (read from its <code>Server-Timing</code> header).</p><div id=last></div></section>");
    if account {
        h.push_str(&format!(
            "<section class='card wide' id=account><h2>Account</h2><p class=sub>This page is behind <code>require: [user]</code>: without a session user the gateway redirects to the home page, and this route may read only <code>user</code> and <code>visits</code>.</p><p>Signed in as <b id=who>{}</b> · visits <b>{}</b></p><p><a href=/>← Back home</a></p></section>",
            esc(user.as_deref().unwrap_or("?")),
            esc(get("visits").unwrap_or("0"))
        ));
    } else {
        match &user {
            Some(u) => h.push_str(&format!(
                "<section class=card id=user><h2>Signed in</h2><p class=sub>The user lives in the store; the cookie holds only the session's id.</p><p class=big id=who>{}</p><div class=row><form method=post action=/logout data-action='Log out'><button class=ghost id=logout>Log out</button></form><a href=/account>Account page →</a></div></section>",
                esc(u)
            )),
            None => h.push_str(&format!(
                "<section class=card id=user><h2>Sign in</h2><p class=sub>Sets <code>user</code> and regenerates the session id.</p><form method=post action=/login data-action='Log in' class=row><input name=name placeholder='Your name' maxlength=40 aria-label=name><input type=hidden name=next value=\"{}\"><button id=login>Log in</button></form><p class=muted><a href=/account>Account page →</a> (needs a login)</p></section>",
                esc(next.as_deref().unwrap_or("/"))
            )),
        }
        h.push_str(&format!(
            "<section class=card><h2>Counter</h2><p class=sub><code>visits</code>, server-side, atomic <code>X-Session-Incr</code>.</p><div class='row spread'><span class=big id=visits>{}</span><form method=post action=/count data-action='Counter +1'><button id=count aria-label='Add one'>+1</button></form></div></section>",
            esc(get("visits").unwrap_or("0"))
        ));
        let cart = get("cart").filter(|c| !c.is_empty());
        h.push_str(&format!(
            "<section class=card><h2>Cart</h2><p class=sub><code>cart</code>, clientside: it lives inside the cookie, no store I/O.</p><div id=cart class=items>{}</div><div class=row><form method=post action=/cart data-action='Add to cart' class='row grow'><input name=item placeholder='e.g. pear' maxlength=30 aria-label=item><button id=add>Add</button></form><form method=post action=/cart/clear data-action='Empty cart'><button class=ghost id=empty>Empty</button></form></div></section>",
            match cart {
                Some(c) => format!(
                    "<span class=chips>{}</span>",
                    c.split(',')
                        .map(|i| format!("<span class=chip>{}</span>", esc(i)))
                        .collect::<String>()
                ),
                None => "<span class=muted>The cart is empty.</span>".into(),
            }
        ));
    }
    h.push_str(&format!(
        "<section class=card id=session><h2>This session</h2><p class=sub>As the gateway told the app.</p><dl class=kv><dt>id</dt><dd class=mono>{}</dd><dt>created</dt><dd>{}</dd><dt>expires</dt><dd>{}</dd></dl></section>",
        esc(&short_id(id.as_deref())),
        when(num("x-session-created"), now),
        when(num("x-session-expires"), now)
    ));
    h.push_str("<section class='card span2' id=load-card><h2>What the gateway did on this page load</h2><p class=sub>From this page's own <code>Server-Timing</code> header.</p><div id=load><p class=muted>Your browser does not expose <code>Server-Timing</code>.</p></div></section>");
    h.push_str("<section class='card wide'><h2>What the app received</h2><p class=sub>The gateway's cookie never reaches the app, and a client cannot forge these headers: the gateway strips them from every request.</p><table><tr><th>header</th><th>value</th></tr>");
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
        // The id is a bearer token: a page shows only its start.
        let v = if n == "x-session-id" {
            short_id(Some(v))
        } else {
            v.clone()
        };
        h.push_str(&format!(
            "<tr><td class=n title=\"{0}\">{0}</td><td class=v>{1}</td></tr>",
            esc(n),
            esc(&v)
        ));
    }
    if names.is_empty() {
        h.push_str("<tr><td colspan=2 class=muted>No session yet: nothing is stored and no cookie is set until the first write.</td></tr>");
    }
    h.push_str("</table></section></div></main><footer>One page, inline CSS and a little script, no external assets. The forms work without JavaScript too.</footer><script>");
    h.push_str(SCRIPT);
    h.push_str("</script></body></html>");
    let mut r = Response::builder()
        .status(200)
        .header("content-type", "text/html; charset=utf-8")
        .header("cache-control", "no-store")
        .header("content-length", h.len());
    let shown: Vec<&str> = ["flash", "prev_id"]
        .into_iter()
        .filter(|k| get(k).is_some())
        .collect();
    if !shown.is_empty() && !account {
        // Show these once.
        r = r.header("x-session-delete", shown.join(","));
    }
    r.body(h.into_bytes()).expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_this_site() {
        for (next, want) in [
            (Some("/account"), "/account"),
            (Some("/account?tab=1"), "/account?tab=1"),
            (Some("/%2F%2Fevil.example"), "/%2F%2Fevil.example"),
            (None, "/"),
            (Some(""), "/"),
            (Some("//evil.example"), "/"),
            (Some("///evil.example"), "/"),
            (Some("/\\evil.example"), "/"),
            (Some("\\\\evil.example"), "/"),
            (Some("https://evil.example"), "/"),
            (Some("javascript:alert(1)"), "/"),
            (Some("evil.example"), "/"),
            (Some("\t//evil.example"), "/"),
            (Some("/\t/evil.example"), "/"),
            (Some("/\r\nSet-Cookie: x=1"), "/"),
            (Some(" /account"), "/"),
        ] {
            assert_eq!(safe_next(next), want, "{next:?}");
        }
    }

    #[test]
    fn relative_times_read_like_words() {
        assert_eq!(relative(1000, 1000), "just now");
        assert_eq!(relative(1030, 1000), "in a moment");
        assert_eq!(relative(1000 + 7 * 86_400, 1000), "in 7 days");
        assert_eq!(relative(1000, 1000 + 180), "3 minutes ago");
        assert_eq!(relative(1000 + 3600, 1000), "in 1 hour");
        assert_eq!(relative(1000 + 7 * 86_400 - 5, 1000), "in 7 days");
        assert_eq!(relative(1000 + 3_599, 1000), "in 1 hour");
        assert_eq!(relative(1000 + 2 * 3_600 - 60, 1000), "in 2 hours");
    }
}
