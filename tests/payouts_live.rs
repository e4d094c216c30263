//! Payouts in the live service: a brand's finance key plans, sends and
//! syncs over HTTP; the providers' webhooks come to `/webhooks/{provider}`;
//! a lost answer is resolved without paying twice; other keys are refused;
//! the service is killed right after it recorded an attempt and, restarted,
//! looks the payout up instead of making it again; what happened is in the
//! store's payouts table.

mod common;

use std::time::Duration;

use afflio_payouts::paypal::fake as ppf;
use afflio_payouts::razorpayx::fake::{self as rzf, Fault};
use afflio_payouts::sandbox::Sandbox;
use common::*;

const INGEST: [(&str, &str); 2] = [("bharat", "bharat-ingest-key-0123456789"), ("acme", "acme-ingest-key-0123456789")];
const REVIEW: [(&str, &str); 2] = [("bharat", "bharat-review-key-0123456789"), ("acme", "acme-review-key-0123456789")];
const FINANCE: [(&str, &str); 2] =
    [("bharat", "bharat-finance-key-0123456789"), ("acme", "acme-finance-key-0123456789")];

fn rules(dir: &std::path::Path, base: &str) -> std::path::PathBuf {
    let mut t = format!(
        r#"
[payouts.razorpayx]
base_url = "{base}"
key_id_env = "AFFLIO_LIVE_RZP_KEY"
key_secret_env = "AFFLIO_LIVE_RZP_SECRET"
webhook_secret_env = "AFFLIO_LIVE_RZP_WEBHOOK"
account_number = "{}"
tds = "10%"
[payouts.paypal]
base_url = "{base}"
client_id_env = "AFFLIO_LIVE_PP_ID"
client_secret_env = "AFFLIO_LIVE_PP_SECRET"
webhook_id = "{}"
[[programs]]
id = "bharat"
currency = "INR"
rate = "10%"
hold = "1d"
[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
hold = "1d"
[[partners]]
id = "ravi"
program_id = "bharat"
payout = {{ provider = "razorpayx", vpa = "ravi@upi" }}
[[partners]]
id = "meena"
program_id = "bharat"
payout = {{ provider = "razorpayx", vpa = "meena@upi" }}
[[partners]]
id = "alice"
program_id = "acme"
payout = {{ provider = "paypal", email = "alice@example.com" }}
[[codes]]
code = "RAVI"
partner_id = "ravi"
[[codes]]
code = "MEENA"
partner_id = "meena"
[[codes]]
code = "ALICE"
partner_id = "alice"
"#,
        rzf::ACCOUNT,
        ppf::WEBHOOK_ID
    );
    for (keys, role) in [(INGEST, "ingest"), (REVIEW, "review"), (FINANCE, "finance")] {
        for (p, k) in keys {
            t.push_str(&format!("[[api_keys]]\nprogram_id = \"{p}\"\nkey = \"{k}\"\nrole = \"{role}\"\n"));
        }
    }
    let path = dir.join("rules.toml");
    std::fs::write(&path, t).unwrap();
    path
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// POSTs a JSON body with a key; (status, JSON).
fn call(port: u16, path: &str, key: &str, body: &str) -> (u16, serde_json::Value) {
    let (s, b) = http(port, "POST", path, Some(key), body);
    (s, if b.is_empty() { serde_json::Value::Null } else { json(&b) })
}

fn items(port: u16, key: &str) -> Vec<(String, String)> {
    let (s, b) = http(port, "GET", "/v1/payouts", Some(key), "");
    assert_eq!(s, 200, "{b}");
    json(&b)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["partner_id"].as_str().unwrap().to_string(), i["status"].as_str().unwrap().to_string()))
        .collect()
}

/// Posts a webhook with its headers; the status.
fn hook(rt: &tokio::runtime::Runtime, port: u16, provider: &str, headers: &[(String, String)], body: &[u8]) -> u16 {
    rt.block_on(async {
        let mut req = reqwest::Client::new().post(format!("http://127.0.0.1:{port}/webhooks/{provider}"));
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.body(body.to_vec()).send().await.unwrap().status().as_u16()
    })
}

#[test]
fn finance_runs_payouts_over_http_and_a_crash_after_an_attempt_never_pays_twice() {
    for (k, v) in [
        ("AFFLIO_LIVE_RZP_KEY", rzf::KEY_ID),
        ("AFFLIO_LIVE_RZP_SECRET", rzf::KEY_SECRET),
        ("AFFLIO_LIVE_RZP_WEBHOOK", rzf::WEBHOOK_SECRET),
        ("AFFLIO_LIVE_PP_ID", ppf::CLIENT_ID),
        ("AFFLIO_LIVE_PP_SECRET", ppf::CLIENT_SECRET),
        ("AFFLIO_PAYOUT_TIMEOUT_SECS", "1"),
    ] {
        std::env::set_var(k, v);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let sandbox = Sandbox::default();
    let addr = rt.block_on(sandbox.start("127.0.0.1:0".parse().unwrap())).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let rules = rules(tmp.path(), &format!("http://{addr}"));
    let nats = Nats::start(&tmp.path().join("js"));
    let (data, state) = (tmp.path().join("data"), tmp.path().join("state"));
    let mut svc = Service::start(&rules, &nats.url(), &data, &state);
    wait_for("ready", Duration::from_secs(60), || http(svc.port, "GET", "/readyz", None, "").0 == 200);

    // Orders two days ago, approved now (their one-day hold has passed).
    let ago = (chrono::Utc::now() - chrono::Duration::days(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let capture = |id: &str, p: &str, cur: &str, code: &str| {
        format!(
            r#"{{"type":"capture","event_id":"{id}","ts":"{ago}","program_id":"{p}","order_id":"{id}","amount":"10000.00","currency":"{cur}","codes":["{code}"]}}"#
        )
    };
    let bharat = format!("{}\n{}\n", capture("o1", "bharat", "INR", "RAVI"), capture("o2", "bharat", "INR", "MEENA"));
    assert_eq!(post(svc.port, INGEST[0].1, &bharat), 2);
    assert_eq!(post(svc.port, INGEST[1].1, &capture("o3", "acme", "USD", "ALICE")), 1);
    for (p, k) in REVIEW {
        let review = format!(
            r#"{{"type":"review","event_id":"approve-{p}","ts":"{ago}","program_id":"{p}","decision":"approve","reviewer":"fin"}}"#
        );
        assert_eq!(post(svc.port, k, &review), 1);
    }
    wait_for("the engine", Duration::from_secs(30), || svc.metric("afflio_engine_events_total") >= 5);

    // Only a finance key of the program runs its payouts.
    assert_eq!(call(svc.port, "/v1/payouts/plan", INGEST[0].1, "").0, 403);
    assert_eq!(call(svc.port, "/v1/payouts/plan", REVIEW[0].1, "").0, 403);
    assert_eq!(http(svc.port, "POST", "/v1/payouts/plan", None, "").0, 401);
    assert_eq!(call(svc.port, "/v1/payouts/plan", FINANCE[0].1, r#"{"at": "yesterday"}"#).0, 400);

    let (s, plan) = call(svc.port, "/v1/payouts/plan", FINANCE[0].1, "");
    assert_eq!(s, 200, "{plan}");
    assert_eq!(plan["items"].as_array().unwrap().len(), 2, "{plan}");
    // acme's finance key sees only acme's items.
    assert!(items(svc.port, FINANCE[1].1).is_empty());

    // The first request's payout is made but its answer is lost.
    sandbox.razorpayx.lock().unwrap().faults.push_back(Fault::FailAfter);
    let (s, r) = call(svc.port, "/v1/payouts/send", FINANCE[0].1, "");
    assert_eq!(s, 200, "{r}");
    assert_eq!((r["sent"].as_u64(), r["unknown"].as_array().unwrap().len()), (Some(1), 1), "{r}");
    let (s, r) = call(svc.port, "/v1/payouts/send", FINANCE[0].1, "");
    assert_eq!((s, r["sent"].as_u64(), r["requests"].as_u64()), (200, Some(1), Some(0)), "found, not sent again: {r}");
    assert_eq!(sandbox.razorpayx.lock().unwrap().payouts.len(), 2);

    // RazorpayX processes both; one webhook arrives (twice), a forged one is refused; sync reads the other.
    sandbox.razorpayx.lock().unwrap().step();
    let (body, sig) = sandbox.razorpayx.lock().unwrap().webhooks[0].clone();
    let sig_header = |s: &str| vec![("X-Razorpay-Signature".to_string(), s.to_string())];
    assert_eq!(hook(&rt, svc.port, "razorpayx", &sig_header("00"), &body), 401);
    assert_eq!(hook(&rt, svc.port, "razorpayx", &sig_header(&sig), &body), 200);
    assert_eq!(hook(&rt, svc.port, "razorpayx", &sig_header(&sig), &body), 200);
    let paid = items(svc.port, FINANCE[0].1).iter().filter(|(_, s)| s == "paid").count();
    assert_eq!(paid, 1);
    let (s, r) = call(svc.port, "/v1/payouts/sync", FINANCE[0].1, "");
    assert_eq!((s, r["paid"].as_u64()), (200, Some(1)), "{r}");
    assert!(items(svc.port, FINANCE[0].1).iter().all(|(_, s)| s == "paid"));

    // PayPal for acme: a crash right after the attempt is recorded (before
    // the request leaves or its answer is recorded) leaves the item unknown;
    // after the restart it is looked up, not paid twice.
    let (s, _) = call(svc.port, "/v1/payouts/plan", FINANCE[1].1, "");
    assert_eq!(s, 200);
    sandbox.paypal.lock().unwrap().faults.push_back(ppf::Fault::SlowAfter(Duration::from_millis(4000)));
    let port = svc.port;
    let sender = std::thread::spawn(move || call(port, "/v1/payouts/send", FINANCE[1].1, ""));
    wait_for("the batch at PayPal", Duration::from_secs(30), || !sandbox.paypal.lock().unwrap().batches.is_empty());
    svc.kill9();
    let _ = sender.join();
    svc.restart();
    wait_for("ready", Duration::from_secs(60), || http(svc.port, "GET", "/readyz", None, "").0 == 200);
    assert_eq!(items(svc.port, FINANCE[1].1), [("alice".to_string(), "unknown".to_string())]);
    let (s, r) = call(svc.port, "/v1/payouts/send", FINANCE[1].1, "");
    assert_eq!((s, r["sent"].as_u64()), (200, Some(1)), "{r}");
    sandbox.paypal.lock().unwrap().step();
    let (body, headers) = sandbox.paypal.lock().unwrap().webhooks[0].clone();
    let mut forged = headers.clone();
    forged.retain(|(k, _)| k != "paypal-transmission-sig");
    forged.push(("paypal-transmission-sig".into(), "forged".into()));
    assert_eq!(hook(&rt, svc.port, "paypal", &forged, &body), 401);
    assert_eq!(hook(&rt, svc.port, "paypal", &headers, &body), 200);
    assert_eq!(items(svc.port, FINANCE[1].1), [("alice".to_string(), "paid".to_string())]);
    {
        let pp = sandbox.paypal.lock().unwrap();
        assert_eq!((pp.batches.len(), pp.items_to("alice@example.com").len()), (1, 1), "paid once");
    }

    // The store's payouts table, once committed.
    assert_eq!(svc.term(), Some(0));
    let rows = sql(
        &data,
        "SELECT program_id, partner_id, count(*) AS n FROM payouts WHERE status = 'paid' GROUP BY program_id, partner_id ORDER BY program_id, partner_id",
    );
    assert_eq!(rows, "program_id,partner_id,n\nacme,alice,1\nbharat,meena,1\nbharat,ravi,1\n");
    drop(nats);
}
