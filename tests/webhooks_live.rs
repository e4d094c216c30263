//! Webhooks out against a live service: test receivers verify every
//! signature with their own implementation of the Standard Webhooks scheme
//! (HMAC-SHA256 over `id.timestamp.body`, base64, `v1,` prefixed, one per
//! secret), count deliveries through 5xx answers, timeouts, a kill -9 of the
//! service and a 410, check the order per subject, and that a slow endpoint
//! delays no other.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use hmac::{Hmac, Mac};

const BRAND: &str = "acme-brand-key-0123456789";
const INGEST: &str = "acme-ingest-key-0123456789";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SLOW_SECRET: &str = "whsec_c2xvdyBlbmRwb2ludCBzZWNyZXQgMTIzNDU2";

/// What a receiver does with its n-th request (0-based).
type Behaviour = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

#[derive(Clone, Copy)]
enum Reply {
    Status(u16),
    /// Answers 200 after this long.
    SlowOk(Duration),
    /// Answers after this long, past the service's timeout (recorded as no answer).
    Hang(Duration),
}

#[derive(Clone, Debug)]
struct Received {
    id: String,
    kind: String,
    subject: String,
    status: u16,
    at: Instant,
}

/// A webhook receiver on a free port; checks every signature with `secrets`.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    bad_signatures: Arc<Mutex<Vec<String>>>,
}

/// The Standard Webhooks verification, written here from the specification
/// (not the service's code): any `v1,` signature of the header matching one
/// of the secrets, a timestamp within five minutes.
fn verify(secrets: &[&str], id: &str, ts: &str, sig_header: &str, body: &[u8]) -> bool {
    let now = chrono::Utc::now().timestamp();
    let Ok(t) = ts.parse::<i64>() else { return false };
    if (now - t).abs() > 300 {
        return false;
    }
    let mut signed = format!("{id}.{ts}.").into_bytes();
    signed.extend_from_slice(body);
    secrets.iter().any(|s| {
        let key = base64::engine::general_purpose::STANDARD.decode(s.trim_start_matches("whsec_")).unwrap();
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(&signed);
        let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        sig_header.split(' ').any(|p| p.strip_prefix("v1,") == Some(want.as_str()))
    })
}

impl Receiver {
    fn start(secrets: Vec<String>, behaviour: Behaviour) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let n = Arc::new(Mutex::new(0usize));
        let (g, b) = (got.clone(), bad.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let (g, b, n, secrets, behaviour) =
                    (g.clone(), b.clone(), n.clone(), secrets.clone(), behaviour.clone());
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    let (head, body) = loop {
                        let Ok(k) = s.read(&mut chunk) else { return };
                        if k == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..k]);
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..p]).to_string();
                            let len: usize = head
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse().unwrap())
                                })
                                .unwrap_or(0);
                            while buf.len() < p + 4 + len {
                                let Ok(k) = s.read(&mut chunk) else { return };
                                if k == 0 {
                                    return;
                                }
                                buf.extend_from_slice(&chunk[..k]);
                            }
                            break (head, buf[p + 4..p + 4 + len].to_vec());
                        }
                    };
                    let h = |name: &str| {
                        head.lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                            })
                            .unwrap_or_default()
                    };
                    let (id, ts, sig) = (h("webhook-id"), h("webhook-timestamp"), h("webhook-signature"));
                    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
                    if !verify(&secrets, &id, &ts, &sig, &body) {
                        b.lock().unwrap().push(id.clone());
                    }
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let kind = v["type"].as_str().unwrap().to_string();
                    let d = &v["data"];
                    let subject = [&d["order_id"], &d["lead_id"], &d["application_id"]]
                        .iter()
                        .find_map(|x| x.as_str())
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("{}:{}", d["batch_id"], d["partner_id"]));
                    let i = {
                        let mut n = n.lock().unwrap();
                        *n += 1;
                        *n - 1
                    };
                    let status = match behaviour(i) {
                        Reply::Status(c) => c,
                        Reply::SlowOk(d) => {
                            std::thread::sleep(d);
                            200
                        }
                        Reply::Hang(d) => {
                            std::thread::sleep(d);
                            0
                        }
                    };
                    g.lock().unwrap().push(Received { id, kind, subject, status, at: Instant::now() });
                    let status = if status == 0 { 200 } else { status };
                    let _ = write!(s, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                });
            }
        });
        Receiver { port, got, bad_signatures: bad }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Message ids delivered with a 2xx.
    fn delivered(&self) -> BTreeSet<String> {
        self.got.lock().unwrap().iter().filter(|r| (200..300).contains(&r.status)).map(|r| r.id.clone()).collect()
    }

    fn requests(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

fn rules(dir: &std::path::Path, brand: &Receiver, slow: &Receiver) -> std::path::PathBuf {
    let t = format!(
        r#"
[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
overrides = ["2%"]
hold = "30d"
[[partners]]
id = "agency"
program_id = "acme"
[[partners]]
id = "alice"
program_id = "acme"
parent = "agency"
[[partners]]
id = "bob"
program_id = "acme"
[[codes]]
code = "ALICE"
partner_id = "alice"
[[codes]]
code = "BOB"
partner_id = "bob"
[[api_keys]]
program_id = "acme"
key = "{BRAND}"
role = "brand"
[[api_keys]]
program_id = "acme"
key = "{INGEST}"
[[webhooks]]
id = "brand-hook"
program_id = "acme"
url = "{}"
events = ["order.attributed", "commission.created", "commission.reversed"]
secret_env = "AFFLIO_TEST_WHSEC"
[[webhooks]]
id = "slow-hook"
program_id = "acme"
url = "{}"
events = ["commission.created"]
secret_env = "AFFLIO_TEST_SLOW_WHSEC"
"#,
        brand.url("/hook"),
        slow.url("/slow"),
    );
    let p = dir.join("rules.toml");
    std::fs::write(&p, t).unwrap();
    p
}

fn orders(from: usize, to: usize) -> String {
    let mut body = String::new();
    for i in from..to {
        let code = if i % 2 == 0 { "ALICE" } else { "BOB" };
        body.push_str(&format!(
            r#"{{"type":"capture","event_id":"cap{i}","ts":"2026-11-10T10:{:02}:00Z","program_id":"acme","order_id":"o{i}","amount":"100.00","currency":"USD","codes":["{code}"]}}"#,
            i % 60
        ));
        body.push('\n');
    }
    body
}

/// Message types by subject, in the order of their first successful delivery.
fn by_subject(r: &Receiver) -> BTreeMap<String, Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for g in r.got.lock().unwrap().iter().filter(|g| g.status == 200) {
        if seen.insert(g.id.clone()) {
            out.entry(g.subject.clone()).or_default().push(g.kind.clone());
        }
    }
    out
}

#[test]
fn webhooks_are_signed_delivered_at_least_once_in_order_through_faults_and_a_slow_endpoint_delays_no_other() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("AFFLIO_TEST_WHSEC", SECRET);
    std::env::set_var("AFFLIO_TEST_SLOW_WHSEC", SLOW_SECRET);
    // The brand's endpoint: three 500s, then one answer after the 2 s timeout, then 200s.
    let brand = Receiver::start(
        vec![SECRET.into()],
        Arc::new(|i| match i {
            0..=2 => Reply::Status(500),
            3 => Reply::Hang(Duration::from_millis(3_500)),
            _ => Reply::Status(200),
        }),
    );
    // A slow endpoint: every answer takes 1.2 s (within the timeout).
    let slow = Receiver::start(vec![SLOW_SECRET.into()], Arc::new(|_| Reply::SlowOk(Duration::from_millis(1_200))));
    let nats = Nats::start(&dir.path().join("nats"));
    let rules = rules(dir.path(), &brand, &slow);
    let (data, state) = (dir.path().join("data"), dir.path().join("state"));
    let mut svc = Service::start(&rules, &nats.url(), &data, &state);
    svc.args.extend(
        [
            "--webhook-timeout-secs",
            "2",
            "--webhook-retry-base-ms",
            "200",
            "--webhook-retry-max-secs",
            "1",
            "--webhook-lanes",
            "2",
        ]
        .map(String::from),
    );
    svc.kill9();
    svc.restart();
    let port = svc.port;

    // The API: endpoints listed without secrets; a partner's endpoint cannot
    // take fraud flags; one registered here answers 410 and is disabled.
    // Right after a restart the service answers 503 `unavailable` until it
    // has loaded the endpoints from the broker: a client retries.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (s, v) = loop {
        let (s, v) = call(port, "GET", "/v1/webhooks/endpoints", Some(BRAND), "");
        if s != 503 || Instant::now() > deadline {
            break (s, v);
        }
        assert_eq!(v["reason"].as_str(), Some("unavailable"), "{v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 2);
    assert!(!v.to_string().contains("whsec_"), "no secret is ever shown: {v}");
    let (s, v) = call(port, "GET", "/v1/webhooks/endpoints", Some(INGEST), "");
    assert_eq!((s, v["reason"].as_str()), (403, Some("forbidden")));
    let gone = Receiver::start(vec![], Arc::new(|_| Reply::Status(410)));
    let body = format!(r#"{{"url":"{}","events":["flag.raised"],"partner_id":"alice"}}"#, gone.url("/x"));
    let (s, v) = call(port, "POST", "/v1/webhooks/endpoints", Some(BRAND), &body);
    assert_eq!((s, v["field"].as_str()), (422, Some("events[0]")), "{v}");
    let (s, v) = call(port, "POST", "/v1/webhooks/endpoints", Some(BRAND), r#"{"url":"ftp://x","events":["nope"]}"#);
    assert_eq!(s, 422, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("ftp://x") && v["detail"].as_str().unwrap().contains("nope"),
        "every problem: {v}"
    );
    let body = format!(r#"{{"url":"{}","events":["commission.created"]}}"#, gone.url("/x"));
    let (s, v) = call(port, "POST", "/v1/webhooks/endpoints", Some(BRAND), &body);
    assert_eq!(s, 201, "{v}");
    assert!(v["secret"].as_str().unwrap().starts_with("whsec_"), "shown once: {v}");
    let gone_id = v["id"].as_str().unwrap().to_string();
    let (s, v) = call(port, "POST", &format!("/v1/webhooks/endpoints/{gone_id}/rotate"), Some(BRAND), "");
    assert_eq!(s, 200, "{v}");
    assert!(v["previous_secret_expires_at"].is_string());

    // Ten orders and a refund.
    assert_eq!(post(port, INGEST, &orders(0, 10)), 10);
    let refund = r#"{"type":"refund","event_id":"ref0","ts":"2026-11-10T11:00:00Z","program_id":"acme","order_id":"o0","amount":"40.00","currency":"USD"}"#;
    assert_eq!(post(port, INGEST, refund), 1);
    // Per order: order.attributed, commission.created per line (alice's orders
    // have two lines: alice, agency); o0 also commission.reversed x2.
    let expected_first = 10 + (5 * 2 + 5) + 2;
    wait_for("the brand's endpoint to receive the first batch", Duration::from_secs(60), || {
        brand.delivered().len() >= expected_first
    });
    wait_for("the 410 endpoint to be disabled", Duration::from_secs(30), || {
        let (_, v) = call(port, "GET", &format!("/v1/webhooks/endpoints/{gone_id}"), Some(BRAND), "");
        v["enabled"] == false
    });
    let gone_calls = gone.requests();
    assert!((1..=2).contains(&gone_calls), "one call per lane at most: {gone_calls}");
    // The delivery log (written every second or so) has the 410 and the retries.
    wait_for("the deliveries log", Duration::from_secs(20), || {
        sql(&data, "SELECT COUNT(*) > 0 AS yes FROM deliveries WHERE status = 'disabled'").contains("true")
    });
    let retries = sql(
        &data,
        "SELECT endpoint_id, response_code, error IS NOT NULL AS failed FROM deliveries WHERE status = 'retrying' AND endpoint_id = 'brand-hook' ORDER BY ts LIMIT 4",
    );
    assert!(retries.contains("brand-hook,500,false"), "{retries}");
    assert!(retries.contains("brand-hook,,true"), "a timeout is retried: {retries}");

    // kill -9 with messages in flight; the restart delivers them.
    assert_eq!(post(port, INGEST, &orders(10, 30)), 20);
    svc.kill9();
    svc.restart();
    let expected = expected_first + 20 + 10 * 2 + 10;
    wait_for("every message after the kill -9", Duration::from_secs(90), || brand.delivered().len() >= expected);
    assert_eq!(brand.delivered().len(), expected, "no message is made up");
    assert_eq!(gone.requests(), gone_calls, "a disabled endpoint is called no more");
    assert!(brand.bad_signatures.lock().unwrap().is_empty(), "every signature verifies");
    assert!(slow.bad_signatures.lock().unwrap().is_empty(), "every signature verifies");

    // In order per subject: attributed, then created (tier 0 then 1), then reversed.
    let subjects = by_subject(&brand);
    assert_eq!(
        subjects["o0"],
        ["order.attributed", "commission.created", "commission.created", "commission.reversed", "commission.reversed"]
    );
    for i in 1..30 {
        let s = &subjects[&format!("o{i}")];
        assert_eq!(s[0], "order.attributed", "o{i}: {s:?}");
        assert!(s[1..].iter().all(|k| k == "commission.created"), "o{i}: {s:?}");
    }

    // The slow endpoint still has a backlog when the brand's is done: it
    // delayed no one. (Measured: printed.)
    let done = brand.got.lock().unwrap().iter().map(|g| g.at).max().unwrap();
    let slow_count = slow.delivered().len();
    let slow_expected = 5 * 2 + 5 + 20 + 10;
    println!(
        "brand endpoint: {expected} messages delivered; slow endpoint: {slow_count} of {slow_expected} at that time"
    );
    assert!(slow_count < slow_expected, "the slow endpoint ({slow_count}) is behind");
    wait_for("the slow endpoint to catch up", Duration::from_secs(120), || slow.delivered().len() >= slow_expected);
    let slow_done = slow.got.lock().unwrap().iter().map(|g| g.at).max().unwrap();
    println!("the slow endpoint finished {:?} after the brand's", slow_done.duration_since(done));

    // Redelivery by hand: one message, again.
    let id = brand.delivered().into_iter().next().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_afflio"))
        .args([
            "webhooks",
            "replay",
            "--nats",
            &nats.url(),
            "--data",
            data.to_str().unwrap(),
            "--endpoint",
            "brand-hook",
            "--message-id",
            &id,
        ])
        .envs(nats_env())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("matched 1, delivered 1, failed 0"));
    let again = brand.got.lock().unwrap().iter().filter(|g| g.id == id && g.status == 200).count();
    assert!(again >= 2, "replayed: {again}");
    let replayed = sql(&data, "SELECT status FROM deliveries WHERE status = 'replayed'");
    assert!(replayed.contains("replayed"), "{replayed}");
}
