//! A real browser through the pages: a creator applies in the marketplace,
//! the brand approves in the console, the creator's page shows the new link
//! and code, a click on the link and orders through both show up, finance
//! approves what is eligible and the balance changes. Headless Chromium
//! (Debian's `chromium` and `chromium-driver`; `.ci/run` installs them)
//! driven over WebDriver; a screenshot of each page is saved under
//! `target/screenshots/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};

const BRAND: &str = "acme-brand-key-0123456789";
const INGEST: &str = "acme-ingest-key-0123456789";
const FINANCE: &str = "acme-finance-key-0123456789";

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rules(dir: &Path, landing: &str) -> PathBuf {
    let t = format!(
        r#"
[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
hold = "2s"
[programs.attribution]
window = "30d"
[programs.marketplace]
listed = true
name = "Acme Outdoor"
description = "Tents, boots and gadgets for people who go outside."
terms = "No bidding on our brand name."
category = "outdoor"
link_pattern = "acme-{{partner}}"
code_pattern = "{{PARTNER}}10"
destination = "{landing}"
[[api_keys]]
program_id = "acme"
key = "{BRAND}"
role = "brand"
[[api_keys]]
program_id = "acme"
key = "{INGEST}"
role = "ingest"
[[api_keys]]
program_id = "acme"
key = "{FINANCE}"
role = "finance"
"#
    );
    let p = dir.join("rules.toml");
    std::fs::write(&p, t).unwrap();
    p
}

fn screenshots() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("..").join("screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

/// The page's text (retried while a navigation replaces the page).
async fn text(c: &Client) -> String {
    let start = Instant::now();
    loop {
        if let Ok(main) = c.find(Locator::Css("main")).await {
            if let Ok(t) = main.text().await {
                return t;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no page text");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reloads `url` until its text satisfies `ok` (the store commits every 100 ms).
async fn until(c: &Client, url: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        c.goto(url).await.unwrap();
        let t = text(c).await;
        if ok(&t) {
            return t;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}; the page says:\n{t}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The page's text once it holds `want` (a click's navigation may not have
/// replaced the page yet); the text as it is after 15 s otherwise.
async fn text_with(c: &Client, want: &str) -> String {
    let start = Instant::now();
    loop {
        let t = text(c).await;
        if t.contains(want) || start.elapsed() > Duration::from_secs(15) {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fill(c: &Client, id: &str, value: &str) {
    c.find(Locator::Id(id)).await.unwrap().send_keys(value).await.unwrap();
}

#[test]
fn a_creator_applies_is_approved_earns_and_is_approved_for_payout_in_a_real_browser() {
    if std::env::var_os("AFFLIO_SKIP_BROWSER").is_some() {
        eprintln!("AFFLIO_SKIP_BROWSER is set: the browser test is skipped");
        return;
    }
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().find(|p| Path::new(p).exists());
    let chromedriver = Path::new("/usr/bin/chromedriver");
    assert!(
        chromium.is_some() && chromedriver.exists(),
        "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does), or AFFLIO_SKIP_BROWSER=1"
    );
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(&dir.path().join("nats"));
    // The brand's shop the link sends shoppers to (no network here): a page on localhost.
    let shop = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let landing = format!("http://127.0.0.1:{}/tents?landed=1", shop.local_addr().unwrap().port());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for s in shop.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let page = "<html><body><main><h1>Acme shop: tents</h1></main></body></html>";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    let rules = rules(dir.path(), &landing);
    let mut svc = Service::start(&rules, &nats.url(), &dir.path().join("data"), &dir.path().join("state"));
    let base = format!("http://127.0.0.1:{}", svc.port);

    let driver_port = free_port();
    let driver = Driver(
        Command::new(chromedriver)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("chromedriver", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", driver_port)).is_ok()
    });
    let profile = dir.path().join("chromium-profile");
    // Two TLS back ends are linked (the WebDriver client's is never used here, the driver is on localhost).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium.unwrap(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--window-size=1200,1000",
                    // A shopper's browser, not a bot's: headless Chrome's own user agent is a known bot's.
                    "--user-agent=Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }),
        );
        let c = ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
            .expect("chromedriver session");

        // 1. The marketplace, then the program's page, and the creator applies.
        c.goto(&format!("{base}/marketplace")).await.unwrap();
        assert!(text(&c).await.contains("Acme Outdoor"));
        shot(&c, "1-marketplace").await;
        c.find(Locator::LinkText("Acme Outdoor")).await.unwrap().click().await.unwrap();
        assert!(text_with(&c, "10% of each captured sale").await.contains("10% of each captured sale"));
        fill(&c, "partner_id", "maya").await;
        fill(&c, "display_name", "Maya Rao").await;
        fill(&c, "email", "maya@example.com").await;
        fill(&c, "audience", "120k hikers on video").await;
        fill(&c, "channels", "https://video.example/@maya").await;
        shot(&c, "2-apply").await;
        c.find(Locator::Id("apply-submit")).await.unwrap().click().await.unwrap();
        let t = text_with(&c, "Application pending").await;
        assert!(t.contains("Application pending"), "{t}");
        let token = c.find(Locator::Id("token")).await.unwrap().text().await.unwrap();
        assert!(token.starts_with("pt_"), "{token}");
        shot(&c, "3-partner-pending").await;

        // 2. The brand signs in to the console and approves.
        c.goto(&format!("{base}/console")).await.unwrap();
        fill(&c, "key", BRAND).await;
        c.find(Locator::Css("#console-login button")).await.unwrap().click().await.unwrap();
        let t = text_with(&c, "Applications to decide").await;
        assert!(t.contains("Maya Rao") && t.contains("Applications to decide"), "{t}");
        shot(&c, "4-console-applications").await;
        c.find(Locator::Css("button.approve")).await.unwrap().click().await.unwrap();
        let t = text_with(&c, "Application approved").await;
        assert!(t.contains("Application approved") && t.contains("None waiting"), "{t}");

        // 3. The creator's page has the link and the code.
        c.goto(&format!("{base}/partner")).await.unwrap();
        let t = text(&c).await;
        assert!(t.contains("Application approved") && t.contains("/r/acme-maya") && t.contains("MAYA10"), "{t}");

        // 4. A shopper follows the link (the browser gets the visitor cookie);
        //    the checkout reports an order for that visitor and one with the code.
        c.goto(&format!("{base}/r/acme-maya")).await.unwrap();
        assert!(c.current_url().await.unwrap().as_str().contains("landed=1"));
        let visitor = c.get_named_cookie("afflio_vid").await.expect("the visitor cookie").value().to_string();
        let now = chrono::Utc::now();
        let ts = |s: i64| (now + chrono::Duration::seconds(s)).to_rfc3339();
        let events = [
            format!(r#"{{"type":"capture","event_id":"cap-1","ts":"{}","program_id":"acme","order_id":"o-1","amount":"200.00","currency":"USD","visitor_id":"{visitor}"}}"#, ts(1)),
            format!(r#"{{"type":"capture","event_id":"cap-2","ts":"{}","program_id":"acme","order_id":"o-2","amount":"50.00","currency":"USD","codes":["maya10"]}}"#, ts(2)),
        ];
        for e in &events {
            let (s, b) = http(svc.port, "POST", "/v1/events", Some(INGEST), e);
            assert_eq!(s, 202, "{b}");
        }
        let t = until(&c, &format!("{base}/partner"), "the orders on the partner page", |t| {
            t.contains("o-1") && t.contains("o-2") && t.contains("25.0000")
        })
        .await;
        assert!(t.contains("link acme-maya") && t.contains("code MAYA10"), "{t}");
        let clicks = c.find(Locator::Id("clicks")).await.unwrap().text().await.unwrap();
        assert_eq!(clicks, "1", "the browser's click on the link");
        shot(&c, "5-partner-earning").await;

        // 5. Finance, after the return window (2 s), approves what is eligible.
        tokio::time::sleep(Duration::from_secs(3)).await;
        c.delete_all_cookies().await.unwrap();
        c.goto(&format!("{base}/console")).await.unwrap();
        fill(&c, "key", FINANCE).await;
        c.find(Locator::Css("#console-login button")).await.unwrap().click().await.unwrap();
        text_with(&c, "signed in with a finance key").await;
        let t = until(&c, &format!("{base}/console"), "eligible lines", |t| t.contains("2 line(s)")).await;
        assert!(t.contains("Approvals queue") && t.contains("Payout batches"), "{t}");
        shot(&c, "6-console-approvals").await;
        c.find(Locator::Css("#approve-all button")).await.unwrap().click().await.unwrap();
        assert!(text_with(&c, "Every eligible line is approved").await.contains("Every eligible line is approved"));

        // 6. The creator's balance moved from pending to approved.
        c.delete_all_cookies().await.unwrap();
        c.goto(&format!("{base}/partner")).await.unwrap();
        fill(&c, "token", &token).await;
        c.find(Locator::Css("#partner-login button")).await.unwrap().click().await.unwrap();
        text_with(&c, "Your tracking link").await;
        until(&c, &format!("{base}/partner"), "the approved balance", |t| t.contains("approved 2 25.0000 USD")).await;
        let approved = c.find(Locator::Css("#balance td.approved")).await.unwrap().text().await.unwrap();
        assert_eq!(approved, "25.0000");
        shot(&c, "7-partner-approved").await;
        c.close().await.unwrap();
    });
    drop(driver);
    svc.kill9();
    eprintln!("screenshots in {}", screenshots().display());
}
