//! A local sandbox of the RazorpayX and PayPal payout APIs, for trying the
//! payouts queue without accounts (`afflio payouts sandbox`) and for the
//! tests. It checks credentials (`rzp_key`/`rzp_secret`, `pp_id`/`pp_secret`),
//! required fields, amounts and idempotency keys, keeps every transfer, and
//! can inject faults: a timeout after accepting, a 5xx, a later status.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

pub const RZP_AUTH: &str = "Basic cnpwX2tleTpyenBfc2VjcmV0"; // rzp_key:rzp_secret
pub const PAYPAL_AUTH: &str = "Basic cHBfaWQ6cHBfc2VjcmV0"; // pp_id:pp_secret
pub const ACCOUNT: &str = "2323230000000001";

/// The sandbox's state: what it was asked to do and what it did.
#[derive(Default)]
pub struct Fake {
    /// Idempotency key -> payout (RazorpayX), or request id -> response (PayPal).
    pub payouts: HashMap<String, Value>,
    /// Money that left: (receiver, amount in minor units or decimal text).
    pub transfers: Vec<(String, String)>,
    /// Faults armed per receiver: "slow" (accept, then answer too late), "5xx" (once).
    pub faults: HashMap<String, &'static str>,
    /// Status the next GET reports, by provider id.
    pub statuses: HashMap<String, String>,
    pub seen_batch_ids: Vec<String>,
    pub n: u64,
    /// Report every payout as completed when asked (processed / SUCCESS).
    pub auto_settle: bool,
}

pub type Shared = Arc<Mutex<Fake>>;

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
    } else if f.auto_settle {
        p["status"] = json!("processed");
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
        } else if f.auto_settle {
            it["transaction_status"] = json!("SUCCESS");
        }
    }
    Ok(Json(v))
}

/// The sandbox's routes.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/contacts", post(rzp_contact))
        .route("/v1/fund_accounts", post(rzp_fund_account))
        .route("/v1/payouts", post(rzp_payout))
        .route("/v1/payouts/{id}", get(rzp_get))
        .route("/v1/oauth2/token", post(pp_token))
        .route("/v1/payments/payouts", post(pp_payouts))
        .route("/v1/payments/payouts/{id}", get(pp_get))
        .with_state(state)
}

/// Serves the sandbox on `addr` (port 0: any free port) in the background.
pub async fn start(state: Shared, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = router(state);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}
