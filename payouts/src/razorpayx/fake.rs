//! A fake of RazorpayX Payouts as strict as the real API reference says it
//! is: mandatory `X-Payout-Idempotency` of 4 to 36 allowed characters, a
//! reused key with a different body refused, keys forgotten after 7 days
//! (a forgotten key makes a second payout, as the real one would), amounts
//! in paise of at least 100 within the mode's limits, fund accounts and
//! modes that must agree, asynchronous statuses moved by [`State::step`]
//! with signed webhooks queued for the test to deliver (in any order, any
//! number of times), and faults armed per request.

#![allow(clippy::result_large_err)] // handlers' errors are the answers themselves

use std::collections::{HashMap, VecDeque};
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

use super::mode_limits;

pub const KEY_ID: &str = "rzp_test_key";
pub const KEY_SECRET: &str = "rzp_test_secret";
pub const ACCOUNT: &str = "2323230000000001";
pub const WEBHOOK_SECRET: &str = "rzp_webhook_secret";
/// How long RazorpayX remembers an idempotency key.
pub const KEY_DAYS: i64 = 7;

/// A fault armed for the next payout request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 500 before anything is made.
    FailBefore,
    /// The payout is made, but the answer is a 500.
    FailAfter,
    /// The payout is made; the answer comes after this long (past the
    /// client's time limit, it never arrives).
    SlowAfter(Duration),
    /// 429 (nothing made).
    RateLimited,
    /// 401 (nothing made).
    Unauthorized,
}

/// One payout the fake made.
#[derive(Clone, Debug)]
pub struct Payout {
    pub id: String,
    pub key: String,
    pub reference_id: String,
    /// The UPI address or account number the money goes to.
    pub to: String,
    pub amount_paise: i64,
    pub mode: String,
    pub status: String,
    /// Statuses still to come, one per [`State::step`].
    pub path: VecDeque<String>,
    pub entity: Value,
}

struct KeyEntry {
    at: DateTime<Utc>,
    body: Value,
    answer: Value,
}

/// Everything the fake knows and did.
pub struct State {
    pub now: DateTime<Utc>,
    contacts: Vec<(Value, String)>,
    fund_accounts: Vec<(Value, String, String, &'static str)>,
    keys: HashMap<String, KeyEntry>,
    pub payouts: Vec<Payout>,
    /// Faults for the next payout requests, in order.
    pub faults: VecDeque<Fault>,
    /// What a new payout to a destination does on each step (default:
    /// `processed`): e.g. `["reversed"]` (the failure path), `["processed",
    /// "reversed"]` (reversed days later), `["rejected"]`.
    pub paths: HashMap<String, Vec<String>>,
    /// Signed webhooks waiting to be delivered: (body, X-Razorpay-Signature).
    pub webhooks: Vec<(Vec<u8>, String)>,
    /// New payouts are `queued` (RazorpayX's answer when the balance is low).
    pub low_balance: bool,
    /// Every lookup settles the payout (for the sandbox).
    pub auto_settle: bool,
    /// Payout creation requests received (whatever their answer).
    pub create_requests: usize,
}

impl Default for State {
    fn default() -> Self {
        State {
            now: DateTime::parse_from_rfc3339("2026-11-03T00:00:00Z").expect("valid").with_timezone(&Utc),
            contacts: Vec::new(),
            fund_accounts: Vec::new(),
            keys: HashMap::new(),
            payouts: Vec::new(),
            faults: VecDeque::new(),
            paths: HashMap::new(),
            webhooks: Vec::new(),
            low_balance: false,
            auto_settle: false,
            create_requests: 0,
        }
    }
}

impl State {
    /// Moves the clock (keys older than 7 days are forgotten).
    pub fn advance(&mut self, d: chrono::Duration) {
        self.now += d;
    }

    /// Moves every payout one status along its path, queuing a webhook for
    /// each change. Returns how many changed.
    pub fn step(&mut self) -> usize {
        let mut changed = Vec::new();
        for p in &mut self.payouts {
            if let Some(next) = p.path.pop_front() {
                p.status = next.clone();
                p.entity["status"] = json!(next);
                changed.push(p.entity.clone());
            }
        }
        let n = changed.len();
        for e in changed {
            self.queue_webhook(&e);
        }
        n
    }

    /// Steps until nothing moves.
    pub fn settle(&mut self) {
        while self.step() > 0 {}
    }

    fn queue_webhook(&mut self, entity: &Value) {
        let status = entity["status"].as_str().unwrap_or_default();
        let event = match status {
            "processed" | "reversed" | "failed" | "rejected" | "queued" | "pending" => format!("payout.{status}"),
            "processing" => "payout.initiated".into(),
            _ => "payout.updated".into(),
        };
        let body = json!({
            "entity": "event", "account_id": "acc_fake", "event": event, "contains": ["payout"],
            "payload": { "payout": { "entity": entity } }, "created_at": self.now.timestamp(),
        })
        .to_string()
        .into_bytes();
        let sig = super::sign(&body, WEBHOOK_SECRET);
        self.webhooks.push((body, sig));
    }

    /// Queues a `payout.downtime.*` webhook for a mode.
    pub fn downtime(&mut self, mode: &str, started: bool) {
        let kind = if started { "started" } else { "resolved" };
        let body = json!({
            "entity": "event", "event": format!("payout.downtime.{kind}"),
            "payload": { "payout.downtime": { "entity": { "method": mode, "status": kind, "severity": "high" } } },
            "created_at": self.now.timestamp(),
        })
        .to_string()
        .into_bytes();
        let sig = super::sign(&body, WEBHOOK_SECRET);
        self.webhooks.push((body, sig));
    }

    /// A payout made by someone else on the same account (its webhooks reach
    /// Afflio too).
    pub fn foreign_payout(&mut self, status: &str) {
        let entity = json!({ "id": format!("pout_foreign{}", self.payouts.len()), "entity": "payout",
                             "status": status, "reference_id": "erp-4711", "amount": 100 });
        self.queue_webhook(&entity);
    }

    /// Payouts made to a destination (UPI address or account number).
    pub fn made_to(&self, to: &str) -> Vec<&Payout> {
        self.payouts.iter().filter(|p| p.to == to).collect()
    }

    /// Paise that arrived at a destination (processed, not reversed).
    pub fn paid_to(&self, to: &str) -> i64 {
        self.made_to(to).iter().filter(|p| p.status == "processed").map(|p| p.amount_paise).sum()
    }
}

pub type Shared = Arc<Mutex<State>>;

fn bad(field: Option<&str>, description: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": { "code": "BAD_REQUEST_ERROR", "description": description.into(), "source": "business",
                                "step": null, "reason": "input_validation_failed", "metadata": {}, "field": field } })),
    )
        .into_response()
}

fn authorized(h: &HeaderMap) -> Result<(), Response> {
    let want = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{KEY_ID}:{KEY_SECRET}")));
    match h.get("authorization").and_then(|v| v.to_str().ok()) {
        Some(v) if v == want => Ok(()),
        _ => Err((
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": { "code": "BAD_REQUEST_ERROR", "description": "The api key provided is invalid" } })),
        )
            .into_response()),
    }
}

fn valid_key(k: &str) -> bool {
    (4..=36).contains(&k.len()) && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == ' ')
}

async fn contacts(AxState(s): AxState<Shared>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    if let Err(r) = authorized(&h) {
        return r;
    }
    let name = b["name"].as_str().unwrap_or_default();
    if name.is_empty() || name.len() > 50 {
        return bad(Some("name"), "The name field is required and must be at most 50 characters.");
    }
    if b["reference_id"].as_str().is_some_and(|r| r.len() > 40) {
        return bad(Some("reference_id"), "The reference id may not be greater than 40 characters.");
    }
    let canon = json!({ "name": name, "type": b["type"], "reference_id": b["reference_id"] });
    let mut st = s.lock().expect("not poisoned");
    if let Some((_, id)) = st.contacts.iter().find(|(c, _)| *c == canon) {
        return (StatusCode::OK, Json(json!({ "id": id, "entity": "contact", "name": name }))).into_response();
    }
    let id = format!("cont_{:014}", st.contacts.len() + 1);
    st.contacts.push((canon, id.clone()));
    (StatusCode::CREATED, Json(json!({ "id": id, "entity": "contact", "name": name }))).into_response()
}

async fn fund_accounts(AxState(s): AxState<Shared>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    if let Err(r) = authorized(&h) {
        return r;
    }
    let mut st = s.lock().expect("not poisoned");
    let contact = b["contact_id"].as_str().unwrap_or_default();
    if !st.contacts.iter().any(|(_, id)| id == contact) {
        return bad(Some("contact_id"), "The id provided does not exist");
    }
    let (to, kind) = match b["account_type"].as_str() {
        Some("vpa") => {
            let a = b["vpa"]["address"].as_str().unwrap_or_default();
            if !a.contains('@') || a.starts_with('@') || a.ends_with('@') {
                return bad(Some("vpa.address"), "Invalid VPA. Please enter a valid Virtual Payment Address");
            }
            (a.to_string(), "vpa")
        }
        Some("bank_account") => {
            let ba = &b["bank_account"];
            let ifsc = ba["ifsc"].as_str().unwrap_or_default();
            let ifsc_ok = ifsc.len() == 11
                && ifsc[..4].chars().all(|c| c.is_ascii_uppercase())
                && ifsc.as_bytes()[4] == b'0'
                && ifsc[5..].chars().all(|c| c.is_ascii_alphanumeric());
            if !ifsc_ok {
                return bad(Some("ifsc"), format!("{ifsc} is not a valid IFSC code"));
            }
            let acc = ba["account_number"].as_str().unwrap_or_default();
            if !(5..=35).contains(&acc.len()) || !acc.chars().all(|c| c.is_ascii_alphanumeric()) {
                return bad(Some("account_number"), "The account number must be 5 to 35 letters or digits");
            }
            if ba["name"].as_str().is_none_or(str::is_empty) {
                return bad(Some("name"), "The name field is required.");
            }
            (acc.to_string(), "bank_account")
        }
        _ => return bad(Some("account_type"), "The account type field is invalid."),
    };
    if let Some((_, id, _, _)) = st.fund_accounts.iter().find(|(c, ..)| *c == b) {
        return (StatusCode::OK, Json(json!({ "id": id, "entity": "fund_account", "contact_id": contact })))
            .into_response();
    }
    let id = format!("fa_{:016}", st.fund_accounts.len() + 1);
    st.fund_accounts.push((b.clone(), id.clone(), to, kind));
    (StatusCode::CREATED, Json(json!({ "id": id, "entity": "fund_account", "contact_id": contact }))).into_response()
}

/// Validates a payout body as RazorpayX does; the destination and mode on success.
fn validate(st: &State, b: &Value) -> Result<(String, String, i64), Response> {
    if b["account_number"].as_str() != Some(ACCOUNT) {
        return Err(bad(Some("account_number"), "The account number is invalid."));
    }
    let fund = b["fund_account_id"].as_str().unwrap_or_default();
    let Some((_, _, to, kind)) = st.fund_accounts.iter().find(|(_, id, ..)| id == fund) else {
        return Err(bad(Some("fund_account_id"), "The id provided does not exist"));
    };
    if b["currency"].as_str() != Some("INR") {
        return Err(bad(Some("currency"), "Currency is not supported"));
    }
    let Some(amount) = b["amount"].as_i64() else {
        return Err(bad(Some("amount"), "The amount must be an integer (paise)."));
    };
    let mode = b["mode"].as_str().unwrap_or_default();
    let Some((least, most)) = mode_limits(mode) else {
        return Err(bad(Some("mode"), format!("{mode} is not a valid payout mode")));
    };
    if (*kind == "vpa") != (mode == "UPI") {
        return Err(bad(Some("mode"), format!("Mode {mode} is not supported for fund account type {kind}")));
    }
    if amount < least || most.is_some_and(|m| amount > m) {
        return Err(bad(Some("amount"), format!("Amount {amount} is outside the limits of mode {mode}")));
    }
    let purposes = ["refund", "cashback", "payout", "salary", "utility bill", "vendor bill"];
    if !b["purpose"].as_str().is_some_and(|p| purposes.contains(&p)) {
        return Err(bad(Some("purpose"), "The purpose is invalid."));
    }
    if b["reference_id"].as_str().is_some_and(|r| r.len() > 40) {
        return Err(bad(Some("reference_id"), "The reference id may not be greater than 40 characters."));
    }
    if b["narration"]
        .as_str()
        .is_some_and(|n| n.len() > 30 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == ' '))
    {
        return Err(bad(Some("narration"), "The narration may have at most 30 letters, digits and spaces."));
    }
    if let Some(notes) = b["notes"].as_object() {
        if notes.len() > 15 || notes.values().any(|v| v.as_str().is_none_or(|s| s.len() > 256)) {
            return Err(bad(Some("notes"), "At most 15 notes of at most 256 characters each."));
        }
    }
    Ok((to.clone(), mode.to_string(), amount))
}

async fn create_payout(AxState(s): AxState<Shared>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    if let Err(r) = authorized(&h) {
        return r;
    }
    let Some(key) = h.get("x-payout-idempotency").and_then(|v| v.to_str().ok()).map(str::to_string) else {
        return bad(
            Some("X-Payout-Idempotency"),
            "Idempotency key is missing. Include idempotency header and key in the request.",
        );
    };
    if !valid_key(&key) {
        return bad(
            Some("X-Payout-Idempotency"),
            "The idempotency key must be 4 to 36 letters, digits, hyphens, underscores or spaces.",
        );
    }
    let (answer, fault) = {
        let mut st = s.lock().expect("not poisoned");
        st.create_requests += 1;
        let fault = st.faults.pop_front();
        match fault {
            Some(Fault::FailBefore) => {
                return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": { "code": "SERVER_ERROR" } })))
                    .into_response()
            }
            Some(Fault::RateLimited) => {
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    Json(json!({ "error": { "code": "BAD_REQUEST_ERROR",
                         "description": "Too many requests" } })),
                )
                    .into_response()
            }
            Some(Fault::Unauthorized) => {
                return (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({ "error": { "code": "BAD_REQUEST_ERROR",
                         "description": "The api key provided is invalid" } })),
                )
                    .into_response()
            }
            _ => {}
        }
        let now = st.now;
        st.keys.retain(|_, e| now - e.at < chrono::Duration::days(KEY_DAYS));
        if let Some(e) = st.keys.get(&key) {
            if e.body != b {
                return bad(Some("X-Payout-Idempotency"), "Different request body sent for the same idempotency key.");
            }
            (e.answer.clone(), fault)
        } else {
            let (to, mode, amount) = match validate(&st, &b) {
                Ok(v) => v,
                Err(r) => return r,
            };
            let id = format!("pout_{:014}", st.payouts.len() + 1);
            let status = if st.low_balance { "queued" } else { "processing" };
            let mut path: VecDeque<String> =
                st.paths.get(&to).cloned().unwrap_or_else(|| vec!["processed".to_string()]).into_iter().collect();
            if st.low_balance {
                path.push_front("processing".into());
            }
            let entity = json!({
                "id": id, "entity": "payout", "fund_account_id": b["fund_account_id"], "amount": amount,
                "currency": "INR", "notes": b["notes"], "fees": 0, "tax": 0, "status": status,
                "purpose": b["purpose"], "utr": null, "mode": mode, "reference_id": b["reference_id"],
                "narration": b["narration"], "batch_id": null, "status_details": null,
                "created_at": now.timestamp(),
            });
            st.payouts.push(Payout {
                id,
                key: key.clone(),
                reference_id: b["reference_id"].as_str().unwrap_or_default().to_string(),
                to,
                amount_paise: amount,
                mode,
                status: status.into(),
                path,
                entity: entity.clone(),
            });
            st.keys.insert(key, KeyEntry { at: now, body: b, answer: entity.clone() });
            (entity, fault)
        }
    };
    match fault {
        Some(Fault::FailAfter) => {
            (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": { "code": "SERVER_ERROR" } }))).into_response()
        }
        Some(Fault::SlowAfter(d)) => {
            tokio::time::sleep(d).await;
            (StatusCode::OK, Json(answer)).into_response()
        }
        _ => (StatusCode::OK, Json(answer)).into_response(),
    }
}

fn current(st: &mut State, i: usize) -> Value {
    if st.auto_settle {
        while let Some(next) = st.payouts[i].path.pop_front() {
            st.payouts[i].status = next.clone();
            st.payouts[i].entity["status"] = json!(next);
        }
    }
    st.payouts[i].entity.clone()
}

async fn get_payout(AxState(s): AxState<Shared>, h: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = authorized(&h) {
        return r;
    }
    let mut st = s.lock().expect("not poisoned");
    match st.payouts.iter().position(|p| p.id == id) {
        Some(i) => (StatusCode::OK, Json(current(&mut st, i))).into_response(),
        None => bad(Some("id"), "The id provided does not exist"),
    }
}

async fn list_payouts(AxState(s): AxState<Shared>, h: HeaderMap, Query(q): Query<HashMap<String, String>>) -> Response {
    if let Err(r) = authorized(&h) {
        return r;
    }
    if q.get("account_number").map(String::as_str) != Some(ACCOUNT) {
        return bad(Some("account_number"), "The account number field is required.");
    }
    let mut st = s.lock().expect("not poisoned");
    let idx: Vec<usize> = (0..st.payouts.len())
        .filter(|i| q.get("reference_id").is_none_or(|r| st.payouts[*i].reference_id == *r))
        .collect();
    let items: Vec<Value> = idx.into_iter().map(|i| current(&mut st, i)).collect();
    (StatusCode::OK, Json(json!({ "entity": "collection", "count": items.len(), "items": items }))).into_response()
}

/// The fake's routes (RazorpayX's paths).
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/contacts", post(contacts))
        .route("/v1/fund_accounts", post(fund_accounts))
        .route("/v1/payouts", post(create_payout).get(list_payouts))
        .route("/v1/payouts/{id}", get(get_payout))
        .with_state(state)
}
