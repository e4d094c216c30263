//! A fake of PayPal Payouts as strict as PayPal's API reference says it
//! is: OAuth2 tokens that expire, at most 15,000 items per batch, a
//! `sender_batch_id` used in the last 30 days answered 400 with a link to
//! the original batch, `PayPal-Request-Id` answers replayed (or not, to
//! exercise the 400), currency rules (HUF, JPY, TWD whole; INR refused),
//! batch status in pages of at most 1,000 items, unclaimed payments
//! returned after 30 days, denied batches, asynchronous statuses moved by
//! [`State::step`] with webhooks queued for the test to deliver, and the
//! verify-webhook-signature call that knows which transmissions it sent.

#![allow(clippy::result_large_err)] // handlers' errors are the answers themselves

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::{CURRENCIES, MAX_BATCH_ITEMS, PAGE_SIZE, WHOLE_UNITS};

/// A webhook waiting to be delivered: its body and headers.
pub type Delivery = (Vec<u8>, Vec<(String, String)>);

pub const CLIENT_ID: &str = "pp_test_client";
pub const CLIENT_SECRET: &str = "pp_test_secret";
pub const WEBHOOK_ID: &str = "WH-FAKE-0001";
/// How long PayPal remembers a `sender_batch_id`.
pub const BATCH_ID_DAYS: i64 = 30;

/// A fault armed for the next payout request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 500 before anything is made.
    FailBefore,
    /// The batch is made, but the answer is a 500.
    FailAfter,
    /// The batch is made; the answer comes after this long.
    SlowAfter(Duration),
    /// 429 (nothing made).
    RateLimited,
    /// Every token issued so far stops being valid (the call gets 401).
    ExpireTokens,
}

/// One item of a batch.
#[derive(Clone, Debug)]
pub struct Item {
    pub payout_item_id: String,
    pub sender_item_id: String,
    pub receiver: String,
    pub value: String,
    pub currency: String,
    pub status: String,
    pub path: VecDeque<String>,
    pub since: DateTime<Utc>,
}

/// One batch PayPal made.
#[derive(Clone, Debug)]
pub struct Batch {
    pub id: String,
    pub sender_batch_id: String,
    pub created: DateTime<Utc>,
    pub status: String,
    pub items: Vec<Item>,
}

/// Everything the fake knows and did.
pub struct State {
    pub now: DateTime<Utc>,
    tokens: HashMap<String, DateTime<Utc>>,
    /// How long a token lasts.
    pub token_ttl: chrono::Duration,
    pub token_requests: usize,
    pub batches: Vec<Batch>,
    request_ids: HashMap<String, (DateTime<Utc>, Value)>,
    /// Answer a repeated `PayPal-Request-Id` with the first answer (when
    /// false, only the `sender_batch_id` check protects).
    pub honor_request_ids: bool,
    pub faults: VecDeque<Fault>,
    /// Receivers with no PayPal account: their items stay UNCLAIMED, then
    /// are RETURNED after 30 days.
    pub unclaimed: HashSet<String>,
    /// What an item to a receiver does on each step (default: SUCCESS).
    pub paths: HashMap<String, Vec<String>>,
    /// New batches are denied.
    pub deny: bool,
    /// Webhooks waiting to be delivered: (body, headers).
    pub webhooks: Vec<Delivery>,
    transmissions: HashMap<String, (String, Value)>,
    pub auto_settle: bool,
    pub create_requests: usize,
    pub status_pages_read: usize,
}

impl Default for State {
    fn default() -> Self {
        State {
            now: DateTime::parse_from_rfc3339("2026-11-03T00:00:00Z").expect("valid").with_timezone(&Utc),
            tokens: HashMap::new(),
            token_ttl: chrono::Duration::hours(9),
            token_requests: 0,
            batches: Vec::new(),
            request_ids: HashMap::new(),
            honor_request_ids: true,
            faults: VecDeque::new(),
            unclaimed: HashSet::new(),
            paths: HashMap::new(),
            deny: false,
            webhooks: Vec::new(),
            transmissions: HashMap::new(),
            auto_settle: false,
            create_requests: 0,
            status_pages_read: 0,
        }
    }
}

fn item_json(batch_id: &str, sender_batch_id: &str, it: &Item) -> Value {
    json!({
        "payout_item_id": it.payout_item_id,
        "transaction_status": it.status,
        "payout_batch_id": batch_id,
        "sender_batch_id": sender_batch_id,
        "payout_item": { "recipient_type": "EMAIL", "amount": { "value": it.value, "currency": it.currency },
                          "receiver": it.receiver, "sender_item_id": it.sender_item_id },
        "time_processed": null,
    })
}

impl State {
    pub fn advance(&mut self, d: chrono::Duration) {
        self.now += d;
    }

    /// Moves every item one status along (an unclaimed one is returned once
    /// 30 days have passed), queuing a webhook per change; batches whose
    /// items are all final are SUCCESS. Returns how many changed.
    pub fn step(&mut self) -> usize {
        let now = self.now;
        let mut changed = Vec::new();
        for b in &mut self.batches {
            if b.status == "DENIED" {
                continue;
            }
            let (bid, sbid) = (b.id.clone(), b.sender_batch_id.clone());
            for it in &mut b.items {
                let next = match it.path.pop_front() {
                    Some(n) => Some(n),
                    None if it.status == "UNCLAIMED" && now - it.since >= chrono::Duration::days(30) => {
                        Some("RETURNED".to_string())
                    }
                    None => None,
                };
                if let Some(n) = next {
                    it.status = n;
                    it.since = now;
                    changed.push(item_json(&bid, &sbid, it));
                }
            }
            let settled = b.items.iter().all(|i| !matches!(i.status.as_str(), "PENDING" | "UNCLAIMED" | "ONHOLD"));
            b.status = if settled { "SUCCESS".into() } else { "PROCESSING".into() };
        }
        let n = changed.len();
        for resource in changed {
            let kind = match resource["transaction_status"].as_str().unwrap_or_default() {
                "SUCCESS" => "SUCCEEDED",
                "CANCELED" => "CANCELED",
                s => s,
            }
            .to_string();
            self.queue_webhook(&format!("PAYMENT.PAYOUTS-ITEM.{kind}"), resource);
        }
        n
    }

    pub fn settle(&mut self) {
        while self.step() > 0 {}
    }

    fn queue_webhook(&mut self, event_type: &str, resource: Value) {
        let id = format!("WH-{:08}", self.transmissions.len() + 1);
        let event = json!({ "id": id, "event_version": "1.0", "create_time": self.now.to_rfc3339(),
                            "resource_type": "payouts_item", "event_type": event_type, "resource": resource });
        let transmission = format!("tx-{:08}", self.transmissions.len() + 1);
        let sig = format!("sig-{:016x}", xxhash_rust::xxh3::xxh3_64(event.to_string().as_bytes()));
        self.transmissions.insert(transmission.clone(), (sig.clone(), event.clone()));
        let headers = vec![
            ("paypal-transmission-id".to_string(), transmission),
            ("paypal-transmission-time".to_string(), self.now.to_rfc3339()),
            ("paypal-transmission-sig".to_string(), sig),
            ("paypal-cert-url".to_string(), "https://api.paypal.com/v1/notifications/certs/CERT-fake".to_string()),
            ("paypal-auth-algo".to_string(), "SHA256withRSA".to_string()),
        ];
        self.webhooks.push((event.to_string().into_bytes(), headers));
    }

    /// Queues `PAYMENT.PAYOUTSBATCH.DENIED` for a batch (and denies it).
    pub fn deny_batch(&mut self, sender_batch_id: &str) {
        let Some(b) = self.batches.iter_mut().find(|b| b.sender_batch_id == sender_batch_id) else { return };
        b.status = "DENIED".into();
        let resource = json!({ "batch_header": { "payout_batch_id": b.id, "batch_status": "DENIED",
                               "sender_batch_header": { "sender_batch_id": b.sender_batch_id } } });
        self.queue_webhook("PAYMENT.PAYOUTSBATCH.DENIED", resource);
    }

    /// Sets an item's status by receiver (e.g. REVERSED after SUCCESS) and
    /// queues its webhook.
    pub fn set_status(&mut self, receiver: &str, status: &str) {
        let mut changed = Vec::new();
        for b in &mut self.batches {
            let (bid, sbid) = (b.id.clone(), b.sender_batch_id.clone());
            for it in b.items.iter_mut().filter(|i| i.receiver == receiver) {
                it.status = status.to_string();
                changed.push(item_json(&bid, &sbid, it));
            }
        }
        for r in changed {
            self.queue_webhook(&format!("PAYMENT.PAYOUTS-ITEM.{status}"), r);
        }
    }

    /// Items made for a receiver, across batches.
    pub fn items_to(&self, receiver: &str) -> Vec<&Item> {
        self.batches.iter().flat_map(|b| b.items.iter()).filter(|i| i.receiver == receiver).collect()
    }
}

pub type Shared = Arc<Mutex<State>>;

fn error(status: StatusCode, name: &str, message: &str, details: Vec<Value>) -> Response {
    (status, Json(json!({ "name": name, "message": message, "debug_id": "fakedebug", "details": details })))
        .into_response()
}

fn validation(field: &str, issue: &str) -> Response {
    error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "VALIDATION_ERROR",
        "Invalid request - see details",
        vec![json!({ "field": field, "location": "body", "issue": issue })],
    )
}

fn bearer(st: &State, h: &HeaderMap) -> Result<(), Response> {
    let token = h.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match token.and_then(|t| st.tokens.get(t)) {
        Some(until) if *until > st.now => Ok(()),
        _ => Err((
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "invalid_token", "error_description": "Access Token not found in cache" })),
        )
            .into_response()),
    }
}

async fn token(AxState(s): AxState<Shared>, h: HeaderMap, body: String) -> Response {
    let want =
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}")));
    if h.get("authorization").and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "invalid_client", "error_description": "Client Authentication failed" })),
        )
            .into_response();
    }
    if body != "grant_type=client_credentials" {
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": "unsupported_grant_type" }))).into_response();
    }
    let mut st = s.lock().expect("not poisoned");
    st.token_requests += 1;
    let t = format!("A21AA{:08}", st.token_requests);
    let until = st.now + st.token_ttl;
    st.tokens.insert(t.clone(), until);
    let ttl = st.token_ttl.num_seconds();
    Json(json!({ "scope": "https://uri.paypal.com/services/payments/payouts", "access_token": t,
                 "token_type": "Bearer", "app_id": "APP-fake", "expires_in": ttl, "nonce": "n" }))
    .into_response()
}

fn validate_items(items: &[Value]) -> Result<(), Response> {
    if items.is_empty() || items.len() > MAX_BATCH_ITEMS {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            "Invalid request - see details",
            vec![json!({ "field": "items", "location": "body", "issue": "Batch must have 1 to 15000 items" })],
        ));
    }
    let mut seen = HashSet::new();
    for (n, it) in items.iter().enumerate() {
        let field = |f: &str| format!("items[{n}].{f}");
        let currency = it["amount"]["currency"].as_str().unwrap_or_default();
        if currency == "INR" || !CURRENCIES.contains(&currency) {
            return Err(validation(&field("amount.currency"), "CURRENCY_NOT_SUPPORTED_FOR_RECEIVER"));
        }
        let value = it["amount"]["value"].as_str().unwrap_or_default();
        let places = value.split_once('.').map_or(0, |(_, f)| f.len());
        if WHOLE_UNITS.contains(&currency) && places > 0 {
            return Err(validation(&field("amount.value"), "DECIMALS_NOT_SUPPORTED"));
        }
        let positive = value.parse::<rust_decimal::Decimal>().is_ok_and(|v| v > rust_decimal::Decimal::ZERO);
        if places > 2 || !positive {
            return Err(validation(&field("amount.value"), "INVALID_AMOUNT"));
        }
        let receiver = it["receiver"].as_str().unwrap_or_default();
        if !receiver.contains('@') || receiver.len() > 127 {
            return Err(validation(&field("receiver"), "RECEIVER_INVALID"));
        }
        let sid = it["sender_item_id"].as_str().unwrap_or_default();
        if sid.len() > 63 {
            return Err(validation(&field("sender_item_id"), "SENDER_ITEM_ID_TOO_LONG"));
        }
        if !sid.is_empty() && !seen.insert(sid.to_string()) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "DUPLICATE_ITEM",
                "This transaction is duplicated in this batch. Please check the Ref_ID / Sender_Item_ID.",
                vec![],
            ));
        }
    }
    Ok(())
}

async fn create(AxState(s): AxState<Shared>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    let host = h.get("host").and_then(|v| v.to_str().ok()).unwrap_or("127.0.0.1").to_string();
    let (answer, fault) = {
        let mut st = s.lock().expect("not poisoned");
        st.create_requests += 1;
        let fault = st.faults.pop_front();
        if fault == Some(Fault::ExpireTokens) {
            st.tokens.clear();
        }
        if let Err(r) = bearer(&st, &h) {
            return r;
        }
        match fault {
            Some(Fault::FailBefore) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "INTERNAL_SERVICE_ERROR",
                    "An internal service error has occurred",
                    vec![],
                )
            }
            Some(Fault::RateLimited) => {
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "RATE_LIMIT_REACHED",
                    "Too many requests. Blocked due to rate limiting.",
                    vec![],
                )
            }
            _ => {}
        }
        let now = st.now;
        let window = chrono::Duration::days(BATCH_ID_DAYS);
        let request_id = h.get("paypal-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        st.request_ids.retain(|_, (at, _)| now - *at < window);
        if let (true, Some(rid)) = (st.honor_request_ids, &request_id) {
            if let Some((_, a)) = st.request_ids.get(rid) {
                return (StatusCode::CREATED, Json(a.clone())).into_response();
            }
        }
        let sender_batch_id = b["sender_batch_header"]["sender_batch_id"].as_str().unwrap_or_default().to_string();
        if sender_batch_id.len() > 256 {
            return validation("sender_batch_header.sender_batch_id", "VALUE_TOO_LONG");
        }
        if b["sender_batch_header"]["email_subject"].as_str().is_some_and(|e| e.len() > 255) {
            return validation("sender_batch_header.email_subject", "VALUE_TOO_LONG");
        }
        if let Some(orig) = st
            .batches
            .iter()
            .find(|x| !sender_batch_id.is_empty() && x.sender_batch_id == sender_batch_id && now - x.created < window)
        {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({
                    "name": "USER_BUSINESS_ERROR",
                    "message": "User business error.",
                    "debug_id": "fakedebug",
                    "information_link": "https://developer.paypal.com/docs/api/payments.payouts-batch/#errors",
                    "details": [{ "field": "SENDER_BATCH_ID", "location": "body",
                                  "issue": format!("Batch with given sender_batch_id {sender_batch_id} already exists") }],
                    "links": [{ "href": format!("http://{host}/v1/payments/payouts/{}", orig.id),
                                "rel": "self", "method": "GET", "encType": "application/json" }],
                })),
            )
                .into_response();
        }
        let items = b["items"].as_array().cloned().unwrap_or_default();
        if let Err(r) = validate_items(&items) {
            return r;
        }
        let id = format!("PB{:011}", st.batches.len() + 1);
        let mut made = Vec::new();
        for (n, it) in items.iter().enumerate() {
            let receiver = it["receiver"].as_str().unwrap_or_default().to_string();
            let path: VecDeque<String> = if st.unclaimed.contains(&receiver) {
                VecDeque::from(["UNCLAIMED".to_string()])
            } else {
                st.paths.get(&receiver).cloned().unwrap_or_else(|| vec!["SUCCESS".into()]).into_iter().collect()
            };
            made.push(Item {
                payout_item_id: format!("{id}I{n:05}"),
                sender_item_id: it["sender_item_id"].as_str().unwrap_or_default().to_string(),
                receiver,
                value: it["amount"]["value"].as_str().unwrap_or_default().to_string(),
                currency: it["amount"]["currency"].as_str().unwrap_or_default().to_string(),
                status: "PENDING".into(),
                path,
                since: now,
            });
        }
        let status = if st.deny { "DENIED" } else { "PENDING" };
        st.batches.push(Batch {
            id: id.clone(),
            sender_batch_id: sender_batch_id.clone(),
            created: now,
            status: status.into(),
            items: made,
        });
        let answer = json!({ "batch_header": { "payout_batch_id": id, "batch_status": status,
                             "sender_batch_header": { "sender_batch_id": sender_batch_id } },
                             "links": [{ "href": format!("http://{host}/v1/payments/payouts/{id}"), "rel": "self", "method": "GET" }] });
        if let Some(rid) = request_id {
            st.request_ids.insert(rid, (now, answer.clone()));
        }
        (answer, fault)
    };
    match fault {
        Some(Fault::FailAfter) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_SERVICE_ERROR",
            "An internal service error has occurred",
            vec![],
        ),
        Some(Fault::SlowAfter(d)) => {
            tokio::time::sleep(d).await;
            (StatusCode::CREATED, Json(answer)).into_response()
        }
        _ => (StatusCode::CREATED, Json(answer)).into_response(),
    }
}

async fn batch(
    AxState(s): AxState<Shared>,
    h: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut st = s.lock().expect("not poisoned");
    if let Err(r) = bearer(&st, &h) {
        return r;
    }
    st.status_pages_read += 1;
    if st.auto_settle {
        st.settle();
    }
    let Some(b) = st.batches.iter().find(|b| b.id == id) else {
        return error(StatusCode::NOT_FOUND, "INVALID_RESOURCE_ID", "Requested resource ID was not found.", vec![]);
    };
    let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1).max(1);
    let size: usize = q.get("page_size").and_then(|p| p.parse().ok()).unwrap_or(PAGE_SIZE);
    if !(1..=PAGE_SIZE).contains(&size) {
        return validation("page_size", "page_size must be 1 to 1000");
    }
    let total = b.items.len();
    let pages = total.div_ceil(size).max(1);
    let items: Vec<Value> =
        b.items.iter().skip((page - 1) * size).take(size).map(|i| item_json(&b.id, &b.sender_batch_id, i)).collect();
    let mut v = json!({
        "batch_header": { "payout_batch_id": b.id, "batch_status": b.status,
                          "sender_batch_header": { "sender_batch_id": b.sender_batch_id } },
        "items": items,
    });
    if q.get("total_required").map(String::as_str) == Some("true") {
        v["total_items"] = json!(total);
        v["total_pages"] = json!(pages);
    }
    Json(v).into_response()
}

async fn verify(AxState(s): AxState<Shared>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    let st = s.lock().expect("not poisoned");
    if let Err(r) = bearer(&st, &h) {
        return r;
    }
    for f in ["auth_algo", "cert_url", "transmission_id", "transmission_sig", "transmission_time", "webhook_id"] {
        if b[f].as_str().is_none_or(str::is_empty) {
            return validation(f, "MISSING_REQUIRED_PARAMETER");
        }
    }
    let ok = b["webhook_id"].as_str() == Some(WEBHOOK_ID)
        && st
            .transmissions
            .get(b["transmission_id"].as_str().unwrap_or_default())
            .is_some_and(|(sig, event)| b["transmission_sig"].as_str() == Some(sig) && b["webhook_event"] == *event);
    Json(json!({ "verification_status": if ok { "SUCCESS" } else { "FAILURE" } })).into_response()
}

/// The fake's routes (PayPal's paths).
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/oauth2/token", post(token))
        .route("/v1/payments/payouts", post(create))
        .route("/v1/payments/payouts/{id}", get(batch))
        .route("/v1/notifications/verify-webhook-signature", post(verify))
        .with_state(state)
}
