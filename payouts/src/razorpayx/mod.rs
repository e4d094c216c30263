//! RazorpayX Payouts (India: INR to bank accounts by IMPS/NEFT/RTGS and to
//! UPI addresses).
//!
//! - Every payout carries `X-Payout-Idempotency` (mandatory; 4 to 36
//!   letters, digits, `-`, `_`, space): the item's key, fixed at plan time,
//!   with a body that never changes (a different body under the same key is
//!   refused; keys are remembered for 7 days).
//! - `reference_id` is the key too, so a payout whose answer was lost can be
//!   found by `GET /v1/payouts?reference_id=` long after the key is
//!   forgotten: the lookup is definite.
//! - Statuses: `queued`, `pending`, `scheduled`, `processing` are sent;
//!   `processed` is paid; `reversed` (from processing or processed) returns
//!   the money; `rejected`, `cancelled`, `failed` fail the item.
//! - Webhooks are signed with HMAC-SHA256 of the raw body
//!   (`X-Razorpay-Signature`); webhooks for payouts Afflio did not make are
//!   acknowledged and ignored; `payout.downtime.*` is kept as a notice.

pub mod fake;

use afflio_engine::rules::{Currency, Payout, RazorpayxSettings};
use afflio_engine::{round_money, PayoutStatus};
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::provider::{call, secret, Failure, HttpSettings, Provider};
use crate::request::{Answer, Destination, Planned, Request, Target, Update, Webhook, WebhookError};

/// The smallest payout RazorpayX makes: ₹1 (100 paise).
pub const MIN_PAISE: i64 = 100;

/// What a mode can carry, in paise: (least, most). Documented limits of
/// the rails: UPI up to ₹1,00,000; IMPS up to ₹5,00,000; NEFT any amount;
/// RTGS from ₹2,00,000.
#[allow(clippy::inconsistent_digit_grouping)] // paise in Indian grouping: lakh and crore
pub fn mode_limits(mode: &str) -> Option<(i64, Option<i64>)> {
    Some(match mode {
        "UPI" => (MIN_PAISE, Some(1_00_000_00)),
        "IMPS" => (MIN_PAISE, Some(5_00_000_00)),
        "NEFT" => (MIN_PAISE, None),
        "RTGS" => (2_00_000_00, None),
        _ => return None,
    })
}

/// Paise from rupees: exact, or an error (more than 2 decimals cannot be sent).
pub fn paise(amount: Decimal) -> Result<i64, String> {
    let p = amount * Decimal::from(100);
    if !p.fract().is_zero() {
        return Err(format!("{amount} INR is not a whole number of paise"));
    }
    i64::try_from(p.trunc()).map_err(|_| format!("{amount} INR is out of range"))
}

fn rupees(p: i64) -> String {
    format!("₹{}", Decimal::new(p, 2))
}

/// Checks at plan time that a balance can be paid to this partner, and
/// fixes what will be sent: the gross, the TDS withheld and the
/// destination with its mode.
pub fn plan(
    settings: &RazorpayxSettings,
    currency: Currency,
    available: Decimal,
    partner_id: &str,
    payout: &Payout,
) -> Result<Planned, String> {
    if currency.code() != "INR" {
        return Err(format!("RazorpayX pays INR only; the program's currency is {}", currency.code()));
    }
    let name = payout.name.clone().unwrap_or_else(|| partner_id.to_string());
    let destination = match (&payout.vpa, &payout.account_number, &payout.ifsc) {
        (Some(vpa), _, _) => Destination::Upi { vpa: vpa.clone(), name },
        (None, Some(acc), Some(ifsc)) => Destination::Bank {
            account_number: acc.clone(),
            ifsc: ifsc.clone(),
            name,
            mode: settings.bank_mode.clone(),
        },
        _ => return Err("no UPI address (vpa) or bank account (account_number and ifsc) configured".into()),
    };
    let mode = match &destination {
        Destination::Bank { mode, .. } => mode.as_str(),
        _ => "UPI",
    };
    let amount = round_money(available, currency);
    let tds = round_money(amount * settings.tds.fraction(), currency);
    let transfer = paise(amount - tds)?;
    let (least, most) = mode_limits(mode).ok_or_else(|| format!("unknown RazorpayX mode {mode:?}"))?;
    if transfer < least {
        return Err(format!("transfer {} is under {mode}'s minimum of {}", rupees(transfer), rupees(least)));
    }
    if let Some(most) = most.filter(|m| transfer > *m) {
        return Err(format!(
            "transfer {} is over {mode}'s limit of {}: give the partner a bank account, or set bank_mode = \"NEFT\"",
            rupees(transfer),
            rupees(most)
        ));
    }
    Ok(Planned { amount, tds, destination })
}

/// The RazorpayX adapter.
pub struct Razorpayx {
    settings: RazorpayxSettings,
    key_id: String,
    key_secret: String,
    webhook_secret: Option<String>,
    http_settings: HttpSettings,
    http: reqwest::Client,
}

/// Maps a RazorpayX payout status to an item status.
pub fn status_of(s: &str) -> Option<PayoutStatus> {
    Some(match s {
        "queued" | "pending" | "scheduled" | "processing" => PayoutStatus::Sent,
        "processed" => PayoutStatus::Paid,
        "reversed" => PayoutStatus::Reversed,
        "rejected" | "cancelled" | "failed" => PayoutStatus::Failed,
        _ => return None,
    })
}

/// The answer a payout entity stands for.
fn answer_of(v: &Value) -> Answer {
    let status = v["status"].as_str().unwrap_or_default();
    match status_of(status) {
        Some(s) => {
            let detail = v["status_details"]["description"]
                .as_str()
                .or(v["failure_reason"].as_str())
                .map(|d| format!("{status}: {d}"))
                .or_else(|| Some(status.to_string()));
            Answer::Status { status: s, provider_ref: v["id"].as_str().map(str::to_string), detail }
        }
        None => Answer::Unknown(format!("RazorpayX reports payout status {status:?}, which is not documented")),
    }
}

fn description(body: &Value) -> String {
    body["error"]["description"].as_str().unwrap_or("no description").to_string()
}

/// A reference id for a contact (at most 40 characters).
fn contact_reference(partner_id: &str) -> String {
    if partner_id.len() <= 40 {
        partner_id.to_string()
    } else {
        format!("afl{:016x}", xxhash_rust::xxh3::xxh3_64(partner_id.as_bytes()))
    }
}

/// Checks `X-Razorpay-Signature`: hex HMAC-SHA256 of the raw body with the
/// webhook secret, compared in constant time.
pub fn verify_signature(body: &[u8], signature: &str, secret: &str) -> bool {
    let Ok(expected) = hex::decode(signature.trim()) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// Signs a body as RazorpayX does (for the fake and the tests).
pub fn sign(body: &[u8], secret: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

impl Razorpayx {
    /// The adapter, with credentials read from the environment variables the
    /// settings name.
    pub fn from_env(settings: RazorpayxSettings, http: HttpSettings) -> Result<Razorpayx, String> {
        let key_id = secret(&settings.key_id_env, "payouts.razorpayx.key_id_env")?;
        let key_secret = secret(&settings.key_secret_env, "payouts.razorpayx.key_secret_env")?;
        let webhook_secret = match &settings.webhook_secret_env {
            Some(var) => Some(secret(var, "payouts.razorpayx.webhook_secret_env")?),
            None => None,
        };
        Ok(Razorpayx { key_id, key_secret, webhook_secret, http: http.client()?, http_settings: http, settings })
    }

    fn post(&self, path: &str, body: &Value, key: Option<&str>) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .post(format!("{}{path}", self.settings.base_url))
            .basic_auth(&self.key_id, Some(&self.key_secret))
            .json(body);
        if let Some(k) = key {
            req = req.header("X-Payout-Idempotency", k);
        }
        req
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.settings.base_url)).basic_auth(&self.key_id, Some(&self.key_secret))
    }

    /// The payout's body: the same bytes' meaning on every attempt.
    fn payout_body(&self, r: &Request, fund_account_id: &str) -> Result<Value, String> {
        let mode = match &r.destination {
            Destination::Upi { .. } => "UPI",
            Destination::Bank { mode, .. } => mode.as_str(),
            Destination::Paypal { .. } => return Err("a PayPal destination cannot be paid by RazorpayX".into()),
        };
        Ok(json!({
            "account_number": self.settings.account_number,
            "fund_account_id": fund_account_id,
            "amount": paise(r.transfer())?,
            "currency": "INR",
            "mode": mode,
            "purpose": "payout",
            "queue_if_low_balance": true,
            "reference_id": r.key,
            "narration": "Afflio commission",
            "notes": {
                "program_id": r.program_id,
                "batch_id": r.batch_id,
                "partner_id": r.partner_id,
                "gross": r.amount.to_string(),
                "tds": r.tds.to_string(),
            },
        }))
    }

    /// Contact and fund account (RazorpayX answers the same details with
    /// the same ids), then the payout under the item's key.
    async fn create_one(&self, r: &Request, first: bool) -> Answer {
        let refuse_or_unknown = |what: &str, f: Failure| match f {
            Failure::Client(reply) if first => {
                Answer::Refused(format!("RazorpayX refused the {what}: {}", description(&reply.body)))
            }
            Failure::Client(reply) => Answer::Unknown(format!(
                "RazorpayX answered a repeated {what} with HTTP {}: {}",
                reply.status,
                description(&reply.body)
            )),
            other => Answer::Unknown(other.unknown(what)),
        };
        let (name, fund_body) = match &r.destination {
            Destination::Upi { vpa, name } => (name, json!({ "account_type": "vpa", "vpa": { "address": vpa } })),
            Destination::Bank { account_number, ifsc, name, .. } => (
                name,
                json!({ "account_type": "bank_account",
                        "bank_account": { "name": name, "ifsc": ifsc, "account_number": account_number } }),
            ),
            Destination::Paypal { .. } => {
                return Answer::Refused("a PayPal destination cannot be paid by RazorpayX".into())
            }
        };
        let contact_body = json!({ "name": name, "type": "vendor", "reference_id": contact_reference(&r.partner_id) });
        let contact =
            match call(&self.http_settings, "contact", || self.post("/v1/contacts", &contact_body, None)).await {
                Ok(c) => c,
                Err(f) => return refuse_or_unknown("contact", f),
            };
        let Some(contact_id) = contact.body["id"].as_str() else {
            return Answer::Unknown("RazorpayX answered the contact without an id".into());
        };
        let mut fund_body = fund_body;
        fund_body["contact_id"] = json!(contact_id);
        let fund = match call(&self.http_settings, "fund account", || self.post("/v1/fund_accounts", &fund_body, None))
            .await
        {
            Ok(f) => f,
            Err(f) => return refuse_or_unknown("fund account", f),
        };
        let Some(fund_id) = fund.body["id"].as_str() else {
            return Answer::Unknown("RazorpayX answered the fund account without an id".into());
        };
        let body = match self.payout_body(r, fund_id) {
            Ok(b) => b,
            Err(e) => return Answer::Refused(e),
        };
        match call(&self.http_settings, "payout", || self.post("/v1/payouts", &body, Some(&r.key))).await {
            Ok(reply) => answer_of(&reply.body),
            Err(f) => refuse_or_unknown("payout", f),
        }
    }

    async fn lookup_one(&self, r: &Request) -> Answer {
        if let Some(id) = &r.provider_ref {
            return match call(&self.http_settings, "payout status", || self.get(&format!("/v1/payouts/{id}"))).await {
                Ok(reply) => answer_of(&reply.body),
                Err(f) => Answer::Unknown(f.unknown("payout status")),
            };
        }
        let path = format!("/v1/payouts?account_number={}&reference_id={}", self.settings.account_number, r.key);
        match call(&self.http_settings, "payout search", || self.get(&path)).await {
            Ok(reply) => {
                let items = reply.body["items"].as_array().cloned().unwrap_or_default();
                match items.iter().find(|p| p["reference_id"].as_str() == Some(r.key.as_str())) {
                    Some(p) => answer_of(p),
                    None => Answer::NotFound,
                }
            }
            Err(f) => Answer::Unknown(f.unknown("payout search")),
        }
    }
}

impl Provider for Razorpayx {
    fn name(&self) -> &'static str {
        "razorpayx"
    }

    fn key_window(&self) -> chrono::Duration {
        // Keys are remembered for 7 days; a day of margin.
        chrono::Duration::days(6)
    }

    fn lookup_is_definite(&self) -> bool {
        true
    }

    fn create<'a>(&'a self, group: &'a [Request], first: bool) -> BoxFuture<'a, Vec<Answer>> {
        Box::pin(async move {
            let mut v = Vec::with_capacity(group.len());
            for r in group {
                v.push(self.create_one(r, first).await);
            }
            v
        })
    }

    fn lookup<'a>(&'a self, group: &'a [Request]) -> BoxFuture<'a, Vec<Answer>> {
        Box::pin(async move {
            let mut v = Vec::with_capacity(group.len());
            for r in group {
                v.push(self.lookup_one(r).await);
            }
            v
        })
    }

    fn webhook<'a>(&'a self, headers: &'a HeaderMap, body: &'a [u8]) -> BoxFuture<'a, Result<Webhook, WebhookError>> {
        Box::pin(async move { webhook(self.webhook_secret.as_deref(), headers, body) })
    }
}

/// Verifies and reads a RazorpayX webhook.
pub fn webhook(secret: Option<&str>, headers: &HeaderMap, body: &[u8]) -> Result<Webhook, WebhookError> {
    let secret = secret.ok_or_else(|| {
        WebhookError::NotConfigured("razorpayx", "no payouts.razorpayx.webhook_secret_env in the config".into())
    })?;
    let signature = headers.get("x-razorpay-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !verify_signature(body, signature, secret) {
        return Err(WebhookError::BadSignature("X-Razorpay-Signature is not the HMAC-SHA256 of the body".into()));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| WebhookError::Malformed(format!("not JSON: {e}")))?;
    let event = v["event"].as_str().unwrap_or_default();
    if let Some(kind) = event.strip_prefix("payout.downtime.") {
        let d = &v["payload"]["payout.downtime"]["entity"];
        return Ok(Webhook::Notice(format!(
            "RazorpayX downtime {kind}: mode {} ({}), {}",
            d["method"].as_str().or(d["mode"].as_str()).unwrap_or("?"),
            d["severity"].as_str().unwrap_or("?"),
            d["status"].as_str().unwrap_or("?"),
        )));
    }
    if !event.starts_with("payout.") {
        return Ok(Webhook::Ignored(format!("event {event:?} is not about a payout")));
    }
    let p = &v["payload"]["payout"]["entity"];
    let Some(key) = p["reference_id"].as_str().filter(|k| k.starts_with("afl")) else {
        return Ok(Webhook::Ignored("a payout Afflio did not make (no reference_id of ours)".into()));
    };
    Ok(Webhook::Updates(vec![Update { target: Target::Key(key.to_string()), answer: answer_of(p) }]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paise_are_exact() {
        assert_eq!(paise("1234.50".parse().unwrap()).unwrap(), 123_450);
        assert_eq!(paise("0.01".parse().unwrap()).unwrap(), 1);
        assert!(paise("0.001".parse().unwrap()).is_err());
    }

    #[test]
    fn every_documented_status_maps() {
        let check = |s: &str, want: Option<PayoutStatus>| assert_eq!(status_of(s), want, "{s}");
        for s in ["queued", "pending", "scheduled", "processing"] {
            check(s, Some(PayoutStatus::Sent));
        }
        check("processed", Some(PayoutStatus::Paid));
        check("reversed", Some(PayoutStatus::Reversed));
        for s in ["rejected", "cancelled", "failed"] {
            check(s, Some(PayoutStatus::Failed));
        }
        check("exploded", None);
    }

    #[test]
    fn signatures_are_checked() {
        let body = br#"{"event":"payout.processed"}"#;
        let sig = sign(body, "whsec");
        assert!(verify_signature(body, &sig, "whsec"));
        assert!(!verify_signature(body, &sig, "other"));
        assert!(!verify_signature(b"{}", &sig, "whsec"));
        assert!(!verify_signature(body, "zz", "whsec"));
    }

    #[test]
    fn foreign_payouts_and_downtime_are_not_updates() {
        let hook = |v: Value| {
            let body = v.to_string().into_bytes();
            let mut h = HeaderMap::new();
            h.insert("x-razorpay-signature", sign(&body, "s").parse().unwrap());
            webhook(Some("s"), &h, &body).unwrap()
        };
        let foreign = json!({"event": "payout.processed", "payload": {"payout": {"entity": {"id": "pout_1", "status": "processed", "reference_id": "someone else's"}}}});
        assert!(matches!(hook(foreign), Webhook::Ignored(_)));
        let down = json!({"event": "payout.downtime.started", "payload": {"payout.downtime": {"entity": {"method": "IMPS", "status": "started", "severity": "high"}}}});
        assert!(matches!(hook(down), Webhook::Notice(n) if n.contains("IMPS")));
        let ours = json!({"event": "payout.reversed", "payload": {"payout": {"entity": {"id": "pout_1", "status": "reversed", "reference_id": "afl00"}}}});
        match hook(ours) {
            Webhook::Updates(u) => {
                assert!(matches!(&u[0].answer, Answer::Status { status: PayoutStatus::Reversed, .. }))
            }
            other => panic!("{other:?}"),
        }
    }
}
