//! Payouts end to end against local fakes of RazorpayX and PayPal (started
//! here on free ports) that check auth, required fields, amounts and
//! idempotency, and inject faults: a timeout after the provider accepted,
//! a 5xx, a payout reversed after success, duplicate and forged webhooks.

use std::path::Path;
use std::sync::Arc;

use afflio::payouts::sandbox::{start, Shared, ACCOUNT};
use afflio::payouts::{self, WebhookError};
use afflio::review::{review, ReviewRequest};
use afflio_engine::rules::Rules;
use afflio_engine::Decision;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

fn rules_text(base: &str) -> String {
    format!(
        r#"
[payouts.razorpayx]
base_url = "{base}"
key_id_env = "AFFLIO_TEST_RZP_KEY"
key_secret_env = "AFFLIO_TEST_RZP_SECRET"
webhook_secret_env = "AFFLIO_TEST_RZP_WEBHOOK"
account_number = "{ACCOUNT}"
tds = "10%"
[payouts.paypal]
base_url = "{base}"
client_id_env = "AFFLIO_TEST_PP_ID"
client_secret_env = "AFFLIO_TEST_PP_SECRET"

[[programs]]
id = "bharat"
currency = "INR"
rate = "10%"
hold = "1d"
min_payout = "100"
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
payout = {{ provider = "razorpayx", account_number = "50100123456789", ifsc = "HDFC0001234", name = "Meena R" }}
[[partners]]
id = "tiny"
program_id = "bharat"
payout = {{ provider = "razorpayx", vpa = "tiny@upi" }}
[[partners]]
id = "alice"
program_id = "acme"
payout = {{ provider = "paypal", email = "alice@example.com" }}
[[partners]]
id = "bob"
program_id = "acme"
payout = {{ provider = "paypal", email = "bob@example.com" }}
[[codes]]
code = "RAVI"
partner_id = "ravi"
[[codes]]
code = "MEENA"
partner_id = "meena"
[[codes]]
code = "TINY"
partner_id = "tiny"
[[codes]]
code = "ALICE"
partner_id = "alice"
[[codes]]
code = "BOB"
partner_id = "bob"
"#
    )
}

const EVENTS: &str = r#"{"type":"capture","event_id":"c1","ts":"2026-11-01T10:00:00Z","program_id":"bharat","order_id":"b1","amount":"10000.00","currency":"INR","codes":["RAVI"]}
{"type":"capture","event_id":"c2","ts":"2026-11-01T11:00:00Z","program_id":"bharat","order_id":"b2","amount":"5000.00","currency":"INR","codes":["RAVI"]}
{"type":"capture","event_id":"c3","ts":"2026-11-01T12:00:00Z","program_id":"bharat","order_id":"b3","amount":"8000.00","currency":"INR","codes":["MEENA"]}
{"type":"capture","event_id":"c4","ts":"2026-11-01T13:00:00Z","program_id":"bharat","order_id":"b4","amount":"500.00","currency":"INR","codes":["TINY"]}
{"type":"capture","event_id":"c5","ts":"2026-11-01T14:00:00Z","program_id":"acme","order_id":"a1","amount":"100.00","currency":"USD","codes":["ALICE"]}
{"type":"capture","event_id":"c6","ts":"2026-11-01T15:00:00Z","program_id":"acme","order_id":"a2","amount":"200.00","currency":"USD","codes":["BOB"]}
"#;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn sql(data: &Path, q: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(afflio_sinks::query(data, q, afflio_sinks::OutputFormat::Csv)).unwrap()
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_test").unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[test]
fn approve_plan_send_and_reconcile_through_both_providers_surviving_every_fault() {
    for (k, v) in [
        ("AFFLIO_TEST_RZP_KEY", "rzp_key"),
        ("AFFLIO_TEST_RZP_SECRET", "rzp_secret"),
        ("AFFLIO_TEST_RZP_WEBHOOK", "whsec_test"),
        ("AFFLIO_TEST_PP_ID", "pp_id"),
        ("AFFLIO_TEST_PP_SECRET", "pp_secret"),
        ("AFFLIO_PAYOUT_TIMEOUT_SECS", "1"),
    ] {
        std::env::set_var(k, v);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let fake: Shared = Arc::default();
    let addr = rt.block_on(start(fake.clone(), "127.0.0.1:0".parse().unwrap())).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let text = rules_text(&format!("http://{addr}"));
    let rules = || Rules::parse("payouts.toml", &text).unwrap();
    let data = tmp.path().join("store");
    afflio::replay::replay(rules(), EVENTS.as_bytes(), "events", &data, None, |_| {}).unwrap();

    // Finance approves both programs' eligible lines in bulk once the 1-day hold has passed.
    for program in ["bharat", "acme"] {
        let req = ReviewRequest {
            decision: Decision::Approve,
            program_id: Some(program.into()),
            order_id: None,
            partner_id: None,
            tier: None,
            reason: None,
            reviewer: "fin".into(),
            at: Some(at("2026-11-03T00:00:00Z")),
            event_id: None,
        };
        review(rules(), &data, &req).unwrap();
    }
    // Planning is deterministic and sends nothing; tiny's 50 INR is under the 100 minimum.
    let plan = payouts::plan(rules(), &data, "bharat", Some(at("2026-11-03T00:00:00Z"))).unwrap();
    assert_eq!(plan.batch_id, "bharat-20261103T000000Z");
    let items: Vec<(String, String, String)> =
        plan.items.iter().map(|i| (i.partner_id.clone(), i.amount.to_string(), i.tds.to_string())).collect();
    assert_eq!(
        items,
        [("meena".into(), "800.00".into(), "80.00".into()), ("ravi".into(), "1500.00".into(), "150.00".into())]
    );
    assert!(plan.skipped.iter().any(|(p, why)| p == "tiny" && why.contains("under the minimum")), "{:?}", plan.skipped);
    assert!(fake.lock().unwrap().transfers.is_empty());
    // Planning again as of the same time finds nothing left to pay.
    assert!(payouts::plan(rules(), &data, "bharat", Some(at("2026-11-03T00:00:00Z"))).unwrap().items.is_empty());

    // Faults: meena's payout is accepted but answered too late; ravi's gets a 502.
    {
        let mut f = fake.lock().unwrap();
        f.faults.insert("fa_50100123456789".into(), "slow");
        f.faults.insert("fa_ravi@upi".into(), "5xx");
    }
    let r = rt.block_on(payouts::send(rules(), &data, "bharat", None)).unwrap();
    assert_eq!((r.sent, r.retry.len()), (0, 2), "{r:?}");
    assert_eq!(fake.lock().unwrap().transfers.len(), 1, "meena's payout was made even though we timed out");
    // The re-send uses the same idempotency keys: meena is not paid twice.
    let r = rt.block_on(payouts::send(rules(), &data, "bharat", None)).unwrap();
    assert_eq!((r.sent, r.retry.len()), (2, 0), "{r:?}");
    let transfers = fake.lock().unwrap().transfers.clone();
    assert_eq!(
        transfers,
        [("fa_50100123456789".to_string(), "72000".to_string()), ("fa_ravi@upi".to_string(), "135000".to_string())],
        "net of 10% TDS, in paise, once each"
    );
    // Nothing left to send.
    assert_eq!(rt.block_on(payouts::send(rules(), &data, "bharat", None)).unwrap(), payouts::Report::default());

    // PayPal: token, one batch, idempotent by sender_batch_id / PayPal-Request-Id.
    let plan = payouts::plan(rules(), &data, "acme", Some(at("2026-11-03T00:00:00Z"))).unwrap();
    assert_eq!(plan.items.len(), 2);
    let r = rt.block_on(payouts::send(rules(), &data, "acme", Some(&plan.batch_id))).unwrap();
    assert_eq!(r.sent, 2, "{r:?}");
    let sent_usd: Vec<(String, String)> = fake.lock().unwrap().transfers[2..].to_vec();
    assert_eq!(
        sent_usd,
        [("alice@example.com".to_string(), "10.00".to_string()), ("bob@example.com".to_string(), "20.00".to_string())]
    );

    // Providers report: both INR payouts processed; alice succeeded, bob's returned.
    {
        let mut f = fake.lock().unwrap();
        f.statuses.insert("pout_1".into(), "processed".into());
        f.statuses.insert("pout_2".into(), "processed".into());
        f.statuses.insert("PB-3/alice".into(), "SUCCESS".into());
        f.statuses.insert("PB-3/bob".into(), "RETURNED".into());
    }
    let r = rt.block_on(payouts::sync(rules(), &data, "bharat")).unwrap();
    assert_eq!((r.paid, r.failed), (2, 0), "{r:?}");
    let r = rt.block_on(payouts::sync(rules(), &data, "acme")).unwrap();
    assert_eq!((r.paid, r.failed), (1, 1), "{r:?}");

    // A webhook says meena's payout was reversed by her bank; it arrives twice, and a forged one too.
    let hook = json!({ "event": "payout.reversed", "payload": { "payout": { "entity": {
        "id": "pout_1", "status": "reversed", "status_details": { "description": "beneficiary account closed" },
        "notes": { "program_id": "bharat", "batch_id": "bharat-20261103T000000Z", "partner_id": "meena" } } } } })
    .to_string();
    let forged = payouts::apply_webhook(rules(), &data, "razorpayx", hook.as_bytes(), &sign(b"something else"));
    assert!(matches!(forged, Err(WebhookError::BadSignature)), "{forged:?}");
    let r = payouts::apply_webhook(rules(), &data, "razorpayx", hook.as_bytes(), &sign(hook.as_bytes())).unwrap();
    assert_eq!(r.reversed, 1);
    let r = payouts::apply_webhook(rules(), &data, "razorpayx", hook.as_bytes(), &sign(hook.as_bytes())).unwrap();
    assert_eq!(r, payouts::Report::default(), "a redelivered webhook changes nothing");

    // What finance sees in SQL.
    let balances = sql(&data, "SELECT program_id, partner_id, pending, approved, in_flight, paid, clawback FROM balances ORDER BY program_id, partner_id");
    assert_eq!(
        balances,
        "program_id,partner_id,pending,approved,in_flight,paid,clawback\n\
         acme,alice,0.0000,0.0000,0.0000,10.0000,0.0000\n\
         acme,bob,0.0000,20.0000,0.0000,0.0000,0.0000\n\
         bharat,meena,0.0000,800.0000,0.0000,0.0000,0.0000\n\
         bharat,ravi,0.0000,0.0000,0.0000,1500.0000,0.0000\n\
         bharat,tiny,0.0000,50.0000,0.0000,0.0000,0.0000\n",
        "meena's and bob's money is back in their approved balance"
    );
    let lines =
        sql(&data, "SELECT order_id, partner_id, status FROM lines WHERE program_id = 'bharat' ORDER BY order_id");
    assert_eq!(lines, "order_id,partner_id,status\nb1,ravi,paid\nb2,ravi,paid\nb3,meena,approved\nb4,tiny,approved\n");
    let rows = sql(
        &data,
        "SELECT partner_id, status, amount, tds, transfer_amount, provider_ref FROM payouts WHERE program_id = 'bharat' ORDER BY ts, partner_id, event_id",
    );
    assert!(rows.contains("meena,reversed,800.0000,80.0000,720.0000,pout_1"), "{rows}");
    assert!(rows.contains("ravi,paid,1500.0000,150.0000,1350.0000,pout_2"), "{rows}");

    // The next batch pays meena again (a new batch, a new idempotency key); ravi has nothing left.
    let plan = payouts::plan(rules(), &data, "bharat", Some(at("2026-11-05T00:00:00Z"))).unwrap();
    let again: Vec<&str> = plan.items.iter().map(|i| i.partner_id.as_str()).collect();
    assert_eq!(again, ["meena"]);
    rt.shutdown_background();
}
