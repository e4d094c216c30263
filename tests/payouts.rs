//! Payouts end to end against local fakes of RazorpayX and PayPal (started
//! here on free ports) that check auth, required fields, amounts and
//! idempotency, and inject faults: a timeout after the provider accepted,
//! a 5xx, a payout reversed after success, duplicate and forged webhooks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use afflio::payouts::{self, WebhookError};
use afflio::review::{review, ReviewRequest};
use afflio_engine::rules::Rules;
use afflio_engine::Decision;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const RZP_AUTH: &str = "Basic cnpwX2tleTpyenBfc2VjcmV0"; // rzp_key:rzp_secret
const PAYPAL_AUTH: &str = "Basic cHBfaWQ6cHBfc2VjcmV0"; // pp_id:pp_secret
const ACCOUNT: &str = "2323230000000001";

#[derive(Default)]
struct Fake {
    /// Idempotency key -> payout (RazorpayX), or request id -> response (PayPal).
    payouts: HashMap<String, Value>,
    /// Money that left: (receiver, amount in minor units or decimal text).
    transfers: Vec<(String, String)>,
    /// Faults armed per receiver: "slow" (accept, then answer too late), "5xx" (once).
    faults: HashMap<String, &'static str>,
    /// Status the next GET reports, by provider id.
    statuses: HashMap<String, String>,
    seen_batch_ids: Vec<String>,
    n: u64,
}

type Shared = Arc<Mutex<Fake>>;

fn bad(status: StatusCode, why: &str) -> (StatusCode, Json<Value>) {
    (status, Json(json!({ "error": { "description": why }, "message": why })))
}

fn auth(h: &HeaderMap, want: &str) -> Result<(), (StatusCode, Json<Value>)> {
    match h.get("authorization").and_then(|v| v.to_str().ok()) {
        Some(v) if v == want => Ok(()),
        _ => Err(bad(StatusCode::UNAUTHORIZED, "bad credentials")),
    }
}

async fn rzp_contact(h: HeaderMap, Json(b): Json<Value>) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    auth(&h, RZP_AUTH)?;
    let name = b["name"].as_str().ok_or_else(|| bad(StatusCode::BAD_REQUEST, "name is required"))?;
    Ok(Json(json!({ "id": format!("cont_{name}"), "entity": "contact" })))
}

async fn rzp_fund_account(h: HeaderMap, Json(b): Json<Value>) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    auth(&h, RZP_AUTH)?;
    let contact = b["contact_id"].as_str().ok_or_else(|| bad(StatusCode::BAD_REQUEST, "contact_id is required"))?;
    let dest = match b["account_type"].as_str() {
        Some("vpa") => b["vpa"]["address"].as_str().map(str::to_string),
        Some("bank_account") => {
            let ifsc = b["bank_account"]["ifsc"].as_str().unwrap_or_default();
            (ifsc.len() == 11).then(|| b["bank_account"]["account_number"].as_str().unwrap_or_default().to_string())
        }
        _ => None,
    };
    let dest = dest.ok_or_else(|| bad(StatusCode::BAD_REQUEST, "invalid fund account"))?;
    Ok(Json(json!({ "id": format!("fa_{dest}"), "contact_id": contact })))
}

async fn rzp_payout(
    State(s): State<Shared>,
    h: HeaderMap,
    Json(b): Json<Value>,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    auth(&h, RZP_AUTH)?;
    let key = h
        .get("x-payout-idempotency")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad(StatusCode::BAD_REQUEST, "X-Payout-Idempotency is required"))?
        .to_string();
    if b["account_number"] != ACCOUNT || b["currency"] != "INR" || b["purpose"].as_str().is_none() {
        return Err(bad(StatusCode::BAD_REQUEST, "account_number, currency INR and purpose are required"));
    }
    let amount =
        b["amount"].as_i64().filter(|a| *a > 0).ok_or_else(|| bad(StatusCode::BAD_REQUEST, "amount in paise"))?;
    if !["UPI", "IMPS", "NEFT", "RTGS"].contains(&b["mode"].as_str().unwrap_or_default()) {
        return Err(bad(StatusCode::BAD_REQUEST, "bad mode"));
    }
    let fund = b["fund_account_id"].as_str().unwrap_or_default().to_string();
    let fault = {
        let mut f = s.lock().unwrap();
        if let Some(p) = f.payouts.get(&key) {
            // The same key: the same payout, no second transfer.
            return Ok(Json(p.clone()));
        }
        let fault = f.faults.remove(&fund);
        if fault == Some("5xx") {
            return Err(bad(StatusCode::BAD_GATEWAY, "upstream bank unavailable"));
        }
        f.n += 1;
        let p = json!({ "id": format!("pout_{}", f.n), "status": "processing", "amount": amount, "notes": b["notes"],
                        "fund_account_id": fund });
        f.payouts.insert(key, p);
        f.transfers.push((fund, amount.to_string()));
        fault
    };
    if fault == Some("slow") {
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let f = s.lock().unwrap();
    Ok(Json(f.payouts.values().find(|p| p["fund_account_id"] == b["fund_account_id"]).cloned().unwrap_or(Value::Null)))
}

async fn rzp_get(
    State(s): State<Shared>,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    auth(&h, RZP_AUTH)?;
    let f = s.lock().unwrap();
    let mut p = f
        .payouts
        .values()
        .find(|p| p["id"] == id)
        .cloned()
        .ok_or_else(|| bad(StatusCode::NOT_FOUND, "no such payout"))?;
    if let Some(st) = f.statuses.get(&id) {
        p["status"] = json!(st);
    }
    Ok(Json(p))
}

async fn pp_token(h: HeaderMap, body: String) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    auth(&h, PAYPAL_AUTH)?;
    if body != "grant_type=client_credentials" {
        return Err(bad(StatusCode::BAD_REQUEST, "grant_type"));
    }
    Ok(Json(json!({ "access_token": "pp-token", "token_type": "Bearer", "expires_in": 32400 })))
}

async fn pp_payouts(
    State(s): State<Shared>,
    h: HeaderMap,
    Json(b): Json<Value>,
) -> Result<(StatusCode, Json<Value>), (StatusCode, Json<Value>)> {
    auth(&h, "Bearer pp-token")?;
    let request_id = h.get("paypal-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let mut f = s.lock().unwrap();
    if let Some(r) = f.payouts.get(&request_id) {
        return Ok((StatusCode::CREATED, Json(r.clone())));
    }
    let batch = b["sender_batch_header"]["sender_batch_id"].as_str().unwrap_or_default().to_string();
    if batch.is_empty() || f.seen_batch_ids.contains(&batch) {
        return Err(bad(StatusCode::BAD_REQUEST, "DUPLICATE_REQUEST_ID or missing sender_batch_id"));
    }
    let items = b["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() || items.len() > 15_000 {
        return Err(bad(StatusCode::BAD_REQUEST, "1 to 15000 items"));
    }
    for it in &items {
        let value = it["amount"]["value"].as_str().unwrap_or_default();
        let ok_amount =
            value.split_once('.').is_none_or(|(_, c)| c.len() <= 2) && value.parse::<f64>().is_ok_and(|v| v > 0.0);
        if !ok_amount
            || it["receiver"].as_str().is_none_or(|r| !r.contains('@'))
            || it["sender_item_id"].as_str().is_none()
        {
            return Err(bad(StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR"));
        }
        f.transfers.push((it["receiver"].as_str().unwrap().to_string(), value.to_string()));
    }
    f.seen_batch_ids.push(batch);
    f.n += 1;
    let id = format!("PB-{}", f.n);
    let resp = json!({ "batch_header": { "payout_batch_id": id, "batch_status": "PENDING" } });
    let stored = json!({ "items": items.iter().map(|i| json!({ "payout_item": { "sender_item_id": i["sender_item_id"] },
                         "transaction_status": "PENDING" })).collect::<Vec<_>>() });
    f.payouts.insert(request_id, resp.clone());
    f.payouts.insert(id, stored);
    Ok((StatusCode::CREATED, Json(resp)))
}

async fn pp_get(
    State(s): State<Shared>,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    auth(&h, "Bearer pp-token")?;
    let f = s.lock().unwrap();
    let mut v = f.payouts.get(&id).cloned().ok_or_else(|| bad(StatusCode::NOT_FOUND, "no such batch"))?;
    for it in v["items"].as_array_mut().into_iter().flatten() {
        let key = format!("{id}/{}", it["payout_item"]["sender_item_id"].as_str().unwrap_or_default());
        if let Some(st) = f.statuses.get(&key) {
            it["transaction_status"] = json!(st);
        }
    }
    Ok(Json(v))
}

async fn start(state: Shared) -> SocketAddr {
    let app = Router::new()
        .route("/v1/contacts", post(rzp_contact))
        .route("/v1/fund_accounts", post(rzp_fund_account))
        .route("/v1/payouts", post(rzp_payout))
        .route("/v1/payouts/{id}", get(rzp_get))
        .route("/v1/oauth2/token", post(pp_token))
        .route("/v1/payments/payouts", post(pp_payouts))
        .route("/v1/payments/payouts/{id}", get(pp_get))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

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
    let addr = rt.block_on(start(fake.clone()));
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
