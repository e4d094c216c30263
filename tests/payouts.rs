//! Payouts end to end on a replayed store (the CLI's path), against the
//! strict fakes of RazorpayX and PayPal started here on a free port: a
//! lost answer and a 5xx resolved without paying twice, a returned PayPal
//! payment, a reversal days later by webhook (delivered twice, and a forged
//! one refused), and what finance sees in SQL.

use std::path::Path;

use afflio::payouts;
use afflio::review::{review, ReviewRequest};
use afflio_engine::rules::Rules;
use afflio_engine::Decision;
use afflio_payouts::paypal::fake as ppf;
use afflio_payouts::razorpayx::fake::{self as rzf, Fault};
use afflio_payouts::sandbox::Sandbox;
use chrono::{DateTime, Utc};

fn rules_text(base: &str) -> String {
    format!(
        r#"
[payouts.razorpayx]
base_url = "{base}"
key_id_env = "AFFLIO_TEST_RZP_KEY"
key_secret_env = "AFFLIO_TEST_RZP_SECRET"
webhook_secret_env = "AFFLIO_TEST_RZP_WEBHOOK"
account_number = "{}"
tds = "10%"
[payouts.paypal]
base_url = "{base}"
client_id_env = "AFFLIO_TEST_PP_ID"
client_secret_env = "AFFLIO_TEST_PP_SECRET"
webhook_id = "{}"

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
"#,
        rzf::ACCOUNT,
        ppf::WEBHOOK_ID
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

fn env() {
    for (k, v) in [
        ("AFFLIO_TEST_RZP_KEY", rzf::KEY_ID),
        ("AFFLIO_TEST_RZP_SECRET", rzf::KEY_SECRET),
        ("AFFLIO_TEST_RZP_WEBHOOK", rzf::WEBHOOK_SECRET),
        ("AFFLIO_TEST_PP_ID", ppf::CLIENT_ID),
        ("AFFLIO_TEST_PP_SECRET", ppf::CLIENT_SECRET),
        ("AFFLIO_PAYOUT_TIMEOUT_SECS", "1"),
    ] {
        std::env::set_var(k, v);
    }
}

#[test]
fn approve_plan_send_and_reconcile_through_both_providers_surviving_every_fault() {
    env();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let sandbox = Sandbox::default();
    let addr = rt.block_on(sandbox.start("127.0.0.1:0".parse().unwrap())).unwrap();
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
    let plan = rt.block_on(payouts::plan(rules(), &data, "bharat", Some(at("2026-11-03T00:00:00Z")))).unwrap();
    assert_eq!(plan.batch_id, "bharat-20261103T000000Z");
    let items: Vec<(String, String, String)> =
        plan.items.iter().map(|i| (i.partner_id.clone(), i.amount.to_string(), i.tds.to_string())).collect();
    assert_eq!(
        items,
        [("meena".into(), "800.00".into(), "80.00".into()), ("ravi".into(), "1500.00".into(), "150.00".into())]
    );
    assert!(plan.skipped.iter().any(|(p, why)| p == "tiny" && why.contains("under the minimum")), "{:?}", plan.skipped);
    assert!(sandbox.razorpayx.lock().unwrap().payouts.is_empty());
    // Planning again as of the same time finds nothing left to pay.
    let again = rt.block_on(payouts::plan(rules(), &data, "bharat", Some(at("2026-11-03T00:00:00Z")))).unwrap();
    assert!(again.items.is_empty());

    // The first request's payout is made but answered too late; the
    // second is refused with a 500 before anything is made. meena's bank
    // reverses her payout days after it was processed.
    {
        let mut f = sandbox.razorpayx.lock().unwrap();
        f.faults.extend([Fault::SlowAfter(std::time::Duration::from_millis(2500)), Fault::FailBefore]);
        f.paths.insert("50100123456789".into(), vec!["processed".into(), "reversed".into()]);
    }
    let r = rt.block_on(payouts::send(rules(), &data, "bharat", None)).unwrap();
    assert_eq!((r.sent, r.unknown.len()), (0, 2), "{r:?}");
    assert_eq!(sandbox.razorpayx.lock().unwrap().payouts.len(), 1, "one payout was made though the answer was lost");
    // The next send finds that one by its reference id and sends the other again under the same key.
    let r = rt.block_on(payouts::send(rules(), &data, "bharat", None)).unwrap();
    assert_eq!((r.sent, r.unknown.len()), (2, 0), "{r:?}");
    {
        let f = sandbox.razorpayx.lock().unwrap();
        let mut made: Vec<(String, i64)> = f.payouts.iter().map(|p| (p.to.clone(), p.amount_paise)).collect();
        made.sort();
        assert_eq!(
            made,
            [("50100123456789".to_string(), 72_000), ("ravi@upi".to_string(), 135_000)],
            "net of 10% TDS, in paise, once each"
        );
    }
    // Nothing left to send.
    assert_eq!(rt.block_on(payouts::send(rules(), &data, "bharat", None)).unwrap().requests, 0);

    // PayPal: one token, one batch; bob has no PayPal account: his payment comes back.
    sandbox.paypal.lock().unwrap().paths.insert("bob@example.com".into(), vec!["RETURNED".into()]);
    let plan = rt.block_on(payouts::plan(rules(), &data, "acme", Some(at("2026-11-03T00:00:00Z")))).unwrap();
    assert_eq!(plan.items.len(), 2);
    let r = rt.block_on(payouts::send(rules(), &data, "acme", Some(&plan.batch_id))).unwrap();
    assert_eq!((r.requests, r.sent), (1, 2), "{r:?}");
    {
        let f = sandbox.paypal.lock().unwrap();
        let made: Vec<(String, String)> =
            f.batches.iter().flat_map(|b| &b.items).map(|i| (i.receiver.clone(), i.value.clone())).collect();
        assert_eq!(
            made,
            [
                ("alice@example.com".to_string(), "10.00".to_string()),
                ("bob@example.com".to_string(), "20.00".to_string())
            ]
        );
    }

    // The providers move on; a sync reads where everything stands.
    sandbox.razorpayx.lock().unwrap().step();
    sandbox.paypal.lock().unwrap().settle();
    let r = rt.block_on(payouts::sync(rules(), &data, "bharat")).unwrap();
    assert_eq!((r.paid, r.failed), (2, 0), "{r:?}");
    let r = rt.block_on(payouts::sync(rules(), &data, "acme")).unwrap();
    assert_eq!((r.paid, r.failed), (1, 1), "{r:?}");

    // meena's reversal arrives by webhook, twice; a forged one is refused.
    sandbox.razorpayx.lock().unwrap().step();
    let (body, sig) = sandbox.razorpayx.lock().unwrap().webhooks.last().cloned().unwrap();
    assert!(String::from_utf8_lossy(&body).contains("payout.reversed"));
    let headers = |sig: &str| {
        let mut h = http::HeaderMap::new();
        h.insert("x-razorpay-signature", sig.parse().unwrap());
        h
    };
    let forged = rt.block_on(payouts::webhook(rules(), &data, "razorpayx", headers("00ff"), body.clone()));
    assert!(matches!(forged, Err(payouts::WebhookError::BadSignature(_))), "{forged:?}");
    let r = rt.block_on(payouts::webhook(rules(), &data, "razorpayx", headers(&sig), body.clone())).unwrap();
    assert_eq!(r.reversed, 1, "{r:?}");
    let r = rt.block_on(payouts::webhook(rules(), &data, "razorpayx", headers(&sig), body.clone())).unwrap();
    assert_eq!((r.reversed, r.paid, r.failed), (0, 0, 0), "a redelivered webhook changes nothing: {r:?}");

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
        "SELECT partner_id, status, amount, tds, transfer_amount FROM payouts WHERE program_id = 'bharat' AND status IN ('paid', 'reversed') ORDER BY partner_id, status",
    );
    assert_eq!(
        rows,
        "partner_id,status,amount,tds,transfer_amount\n\
         meena,paid,800.0000,80.0000,720.0000\n\
         meena,reversed,800.0000,80.0000,720.0000\n\
         ravi,paid,1500.0000,150.0000,1350.0000\n"
    );
    let refs = sql(
        &data,
        "SELECT partner_id, count(DISTINCT provider_ref) AS refs FROM payouts WHERE program_id = 'bharat' AND provider_ref IS NOT NULL GROUP BY partner_id ORDER BY partner_id",
    );
    assert_eq!(refs, "partner_id,refs\nmeena,1\nravi,1\n", "one RazorpayX payout each");
    // Each planned item's identity, and the destination masked.
    let planned = sql(
        &data,
        "SELECT partner_id, length(idempotency_key) AS key_len, destination FROM payouts WHERE status = 'planned' AND program_id = 'bharat' ORDER BY partner_id",
    );
    assert_eq!(
        planned,
        "partner_id,key_len,destination\nmeena,35,bank IMPS HDFC0001234 ****6789\nravi,35,upi r***@upi\n"
    );
    // Every row of an item carries its identity (an analyst joins on the key;
    // RazorpayX has no request group, so provider_batch stays empty there).
    let keyed = sql(
        &data,
        "SELECT count(DISTINCT idempotency_key) AS keys, count(*) FILTER (WHERE idempotency_key IS NULL OR destination IS NULL OR provider IS NULL) AS bare FROM payouts WHERE program_id = 'bharat' AND batch_id = (SELECT min(batch_id) FROM payouts WHERE program_id = 'bharat')",
    );
    assert_eq!(keyed, "keys,bare\n2,0\n");
    let attempts = sql(
        &data,
        "SELECT partner_id, count(*) AS attempts FROM payouts WHERE attempted_at IS NOT NULL AND program_id = 'bharat' GROUP BY partner_id ORDER BY partner_id",
    );
    assert!(
        ["partner_id,attempts\nmeena,1\nravi,2\n", "partner_id,attempts\nmeena,2\nravi,1\n"]
            .contains(&attempts.as_str()),
        "the lost answer was looked up, the refused request sent again: {attempts}"
    );

    // The next batch pays meena again (a new batch, a new idempotency key); ravi has nothing left.
    let plan = rt.block_on(payouts::plan(rules(), &data, "bharat", Some(at("2026-11-05T00:00:00Z")))).unwrap();
    let again: Vec<&str> = plan.items.iter().map(|i| i.partner_id.as_str()).collect();
    assert_eq!(again, ["meena"]);
    rt.shutdown_background();
}
