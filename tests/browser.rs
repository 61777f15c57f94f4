//! The demo in a real browser: headless Chromium driven over WebDriver
//! (chromedriver), clicking through what a first-time visitor does. It
//! saves screenshots under `target/demo-screenshots/` for a person to look
//! at. `make test` installs `chromium` and `chromium-driver` when missing.

mod common;
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A chromedriver process (killed on drop) and its port.
struct Driver(Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser(width: u32, height: u32) -> (Driver, Client) {
    for bin in ["chromium", "chromedriver"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success(),
            "{bin} is not installed: `make deps` installs chromium and chromium-driver"
        );
    }
    let port = free_port();
    let driver = Driver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        port,
    );
    wait_port(format!("127.0.0.1:{port}").parse().unwrap());
    let mut options = json!({
        "binary": "/usr/bin/chromium",
        "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-dev-shm-usage",
            format!("--window-size={width},{height}"),
        ],
    });
    if width < 500 {
        // Headless windows do not go below 500 px: emulate the phone.
        options["mobileEmulation"] = json!({
            "deviceMetrics": { "width": width, "height": height, "pixelRatio": 2 },
        });
    }
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), options);
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let c = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a chromedriver session");
    (driver, c)
}

/// Wait until `js` (an expression) is true on a fully loaded page.
async fn until(c: &Client, what: &str, js: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let script = format!("return document.readyState === 'complete' && !!({js});");
    loop {
        if let Ok(v) = c.execute(&script, vec![]).await {
            if v.as_bool() == Some(true) {
                return;
            }
        }
        if Instant::now() > deadline {
            let src = c.source().await.unwrap_or_default();
            panic!("timed out waiting for {what} ({js}); page:\n{src}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A screenshot of the whole page, not just the window, for a person to look
/// at: WebDriver's own screenshot stops at the fold, so this asks Chromium
/// through chromedriver's DevTools passthrough.
async fn shot(d: &Driver, c: &Client, name: &str) {
    use base64::Engine as _;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/demo-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let size = c
        .execute(
            "return [window.innerWidth, document.documentElement.scrollHeight];",
            vec![],
        )
        .await
        .unwrap();
    let id = c.session_id().await.unwrap().unwrap();
    let r = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/session/{id}/goog/cdp/execute",
            d.1
        ))
        .header("content-type", "application/json")
        .body(
            json!({
                "cmd": "Page.captureScreenshot",
                "params": {
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": { "x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1 },
                },
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&r).unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(r["value"]["data"].as_str().expect("a screenshot"))
        .unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

/// Nothing on the page is wider than the window (no sideways scrolling).
async fn fits(c: &Client, page: &str) {
    let w = c
        .execute(
            "return [document.documentElement.scrollWidth, window.innerWidth];",
            vec![],
        )
        .await
        .unwrap();
    let (scroll, inner) = (w[0].as_u64().unwrap(), w[1].as_u64().unwrap());
    assert!(
        scroll <= inner,
        "{page}: {scroll} px wide in a {inner} px window"
    );
}

/// The value of a panel's tile (`#last` or `#load`), e.g. "Store round trips".
async fn stat(c: &Client, panel: &str, label: &str) -> String {
    let v = c
        .execute(
            "const [panel, label] = arguments; \
             const s = [...document.querySelectorAll(panel + ' .stat')] \
               .find(s => s.firstChild.textContent === label); \
             return s ? s.querySelector('b').textContent : null;",
            vec![json!(panel), json!(label)],
        )
        .await
        .unwrap();
    v.as_str()
        .unwrap_or_else(|| panic!("no {label} in {panel}"))
        .to_string()
}

/// The size in bytes of each gateway cookie a panel says was set:
/// `("gimlet", 212)` from a chip "set gimlet · 212 B".
async fn cookies_set(c: &Client, panel: &str) -> Vec<(String, usize)> {
    let v = c
        .execute(
            "return [...document.querySelectorAll(arguments[0] + ' .chip.cookie')].map(c => c.textContent);",
            vec![json!(panel)],
        )
        .await
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|t| {
            let t = t.as_str()?.strip_prefix("set ")?.strip_suffix(" B")?;
            let (name, bytes) = t.split_once(" · ")?;
            Some((name.to_string(), bytes.parse().ok()?))
        })
        .collect()
}

/// Click and wait for the next page to show `ready`.
async fn click(c: &Client, css: &str, ready: &str) {
    c.execute("window.__old = true;", vec![]).await.unwrap();
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(c, ready, &format!("!window.__old && ({ready})")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_works_in_a_real_browser_on_a_phone() {
    let demo = Demo::start();
    let base = demo.base.clone();
    let (driver, c) = browser(390, 844).await;

    // A first visit: no session, nothing stored.
    c.goto(&format!("{base}/")).await.unwrap();
    until(&c, "the home page", "document.querySelector('#login')").await;
    assert_eq!(c.title().await.unwrap(), "Gimlet demo");
    assert!(
        text(&c, "#load").await.contains("none"),
        "no directives yet"
    );
    fits(&c, "home").await;
    shot(&driver, &c, "01-home.png").await;

    // The counter creates the session (a store write).
    click(
        &c,
        "#count",
        "document.querySelector('#visits').textContent === '1'",
    )
    .await;
    let last = text(&c, "#last").await;
    assert!(last.contains("incr visits"), "{last}");
    assert!(last.contains("store"), "{last}");
    assert!(
        last.contains("set gimlet"),
        "the first write sets the cookie: {last}"
    );
    assert!(text(&c, "#last-title").await.contains("Counter +1"));

    // The gated page sends an anonymous visitor to log in, and back after.
    c.goto(&format!("{base}/account")).await.unwrap();
    until(&c, "the gate", "document.querySelector('#gate')").await;
    assert!(c
        .current_url()
        .await
        .unwrap()
        .as_str()
        .contains("next=%2Faccount"));
    assert!(text(&c, "#gate")
        .await
        .contains("Please log in to see /account"));
    fits(&c, "gated").await;
    shot(&driver, &c, "02-gated.png").await;
    c.find(Locator::Css("input[name=name]"))
        .await
        .unwrap()
        .send_keys("alice")
        .await
        .unwrap();
    click(&c, "#login", "document.querySelector('#account')").await;
    assert_eq!(c.current_url().await.unwrap().path(), "/account");
    assert_eq!(text(&c, "#who").await, "alice");
    let last = text(&c, "#last").await;
    for want in ["set user", "regenerate", "set gimlet"] {
        assert!(last.contains(want), "{want} in {last}");
    }
    let set = cookies_set(&c, "#last").await;
    assert!(
        set.iter()
            .any(|(n, b)| n == "gimlet" && *b > 50 && *b < 4096),
        "the session cookie, with its size: {set:?}"
    );
    assert_eq!(stat(&c, "#last", "Written to").await, "the store");
    shot(&driver, &c, "03-account.png").await;

    // Home: the id changed on login, shown once (8 hex digits each).
    c.goto(&format!("{base}/")).await.unwrap();
    until(&c, "home, logged in", "document.querySelector('#logout')").await;
    let ids = text(&c, "#ids").await;
    let parts: Vec<&str> = ids.split(" → ").collect();
    assert_eq!(parts.len(), 2, "{ids}");
    assert_ne!(parts[0], parts[1], "{ids}");
    assert!(parts.iter().all(|p| p.len() == 8 + "…".len()), "{ids}");
    assert_eq!(text(&c, "#visits").await, "1");
    let load = text(&c, "#load").await;
    assert!(
        load.contains("store"),
        "this page load read the store: {load}"
    );
    assert!(
        load.contains("delete"),
        "the flash is deleted after showing: {load}"
    );

    click(
        &c,
        "#count",
        "document.querySelector('#visits').textContent === '2'",
    )
    .await;
    let last = text(&c, "#last").await;
    assert!(last.contains("incr visits"), "{last}");
    let trips: u32 = stat(&c, "#last", "Store round trips")
        .await
        .parse()
        .unwrap();
    assert!(trips >= 1, "an Incr is a store round trip: {last}");
    assert!(c.find(Locator::Css("#ids")).await.is_err(), "shown once");

    // The cart lives in the cookie: no store write, a bigger cookie.
    c.find(Locator::Css("input[name=item]"))
        .await
        .unwrap()
        .send_keys("pear")
        .await
        .unwrap();
    click(
        &c,
        "#add",
        "document.querySelector('#cart').textContent.includes('pear')",
    )
    .await;
    let last = text(&c, "#last").await;
    assert!(last.contains("set cart"), "{last}");
    assert_eq!(stat(&c, "#last", "Written to").await, "the cookie");
    assert!(
        cookies_set(&c, "#last")
            .await
            .iter()
            .any(|(n, _)| n == "gimlet"),
        "{last}"
    );
    fits(&c, "logged in").await;
    shot(&driver, &c, "04-logged-in.png").await;

    // Log out: Destroy, the cookie cleared (and a flash in a new one).
    click(&c, "#logout", "document.querySelector('#login')").await;
    let last = text(&c, "#last").await;
    assert!(last.contains("destroy"), "{last}");
    assert!(last.contains("cleared gimlet"), "{last}");
    assert!(text(&c, "#flash").await.contains("Logged out"));
    assert_eq!(text(&c, "#visits").await, "0");
    shot(&driver, &c, "05-logged-out.png").await;
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_reads_well_on_a_desktop_and_without_javascript() {
    let demo = Demo::start();
    let base = demo.base.clone();
    let (driver, c) = browser(1280, 900).await;
    c.goto(&format!("{base}/")).await.unwrap();
    until(&c, "home", "document.querySelector('#login')").await;
    // Without the script, the forms post and redirect as plain HTML.
    c.execute(
        "document.querySelectorAll('form').forEach(f => f.removeAttribute('data-action'));",
        vec![],
    )
    .await
    .unwrap();
    c.execute(
        "document.querySelectorAll('form').forEach(f => { const g = f.cloneNode(true); f.replaceWith(g); });",
        vec![],
    )
    .await
    .unwrap();
    c.find(Locator::Css("input[name=name]"))
        .await
        .unwrap()
        .send_keys("bob")
        .await
        .unwrap();
    click(&c, "#login", "document.querySelector('#logout')").await;
    assert_eq!(text(&c, "#who").await, "bob");
    assert!(text(&c, "#flash").await.contains("Welcome, bob"));
    fits(&c, "desktop").await;
    shot(&driver, &c, "06-desktop.png").await;
    c.close().await.unwrap();
}
