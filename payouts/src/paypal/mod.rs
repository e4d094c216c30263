//! PayPal Payouts (international partners, by email).
//!
//! - One OAuth2 client-credentials token, cached until shortly before it
//!   expires (and fetched again once if PayPal says it is no longer valid).
//! - A planned batch is sent as fixed request groups of at most 15,000
//!   items, each with its own `sender_batch_id` (also the
//!   `PayPal-Request-Id`); items are named by `sender_item_id` (the item's
//!   key). PayPal refuses a `sender_batch_id` used in the last 30 days with a
//!   400 and a link to the original batch: that answer is followed, never
//!   taken as a refusal.
//! - Batch status is read page by page (1,000 items a page). A `DENIED`
//!   batch fails its items; `SUCCESS` is paid; `UNCLAIMED`, `PENDING`,
//!   `ONHOLD`, `NEW` are sent (an unclaimed payment is `RETURNED` after 30
//!   days: failed); `FAILED`, `RETURNED`, `BLOCKED`, `DENIED`, `CANCELED` fail;
//!   `REFUNDED` and `REVERSED` reverse.
//! - Webhooks (`PAYMENT.PAYOUTS-ITEM.*`, `PAYMENT.PAYOUTSBATCH.DENIED`) are
//!   verified by PayPal's verify-webhook-signature call.
//! - Currencies: PayPal's payout currencies only; HUF, JPY and TWD in whole
//!   units; INR never (PayPal's Indian accounts are domestic only).

pub mod fake;

use std::time::Instant;

use afflio_engine::rules::{Currency, Payout, PaypalSettings};
use afflio_engine::PayoutStatus;
use futures::future::BoxFuture;
use http::HeaderMap;
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Value};

use crate::provider::{call, secret, Failure, HttpSettings, Provider, Reply};
use crate::request::{Answer, Destination, Planned, Request, Target, Update, Webhook, WebhookError};

/// PayPal's limit of items in one payout request.
pub const MAX_BATCH_ITEMS: usize = 15_000;
/// Items per page of batch status (PayPal's largest page).
pub const PAGE_SIZE: usize = 1_000;

/// Currencies PayPal pays out in.
pub const CURRENCIES: &[&str] = &[
    "AUD", "BRL", "CAD", "CNY", "CZK", "DKK", "EUR", "HKD", "HUF", "ILS", "JPY", "MYR", "MXN", "TWD", "NZD", "NOK",
    "PHP", "PLN", "GBP", "SGD", "SEK", "CHF", "THB", "USD",
];
/// Currencies PayPal takes in whole units only.
pub const WHOLE_UNITS: &[&str] = &["HUF", "JPY", "TWD"];

/// Checks at plan time that a balance can be paid by PayPal, and fixes the
/// amount (whole units where PayPal wants them: the fraction stays in the
/// balance for the next batch) and the destination.
pub fn plan(currency: Currency, available: Decimal, partner_id: &str, payout: &Payout) -> Result<Planned, String> {
    let code = currency.code();
    if code == "INR" {
        return Err("PayPal cannot pay INR (Indian PayPal accounts are domestic only): give the partner a RazorpayX destination".into());
    }
    if !CURRENCIES.contains(&code) {
        return Err(format!("PayPal does not pay out in {code}"));
    }
    let Some(email) = payout.email.clone() else {
        return Err(format!("partner {partner_id} has no PayPal email"));
    };
    let places = if WHOLE_UNITS.contains(&code) { 0 } else { 2 };
    let amount = available.round_dp_with_strategy(places, RoundingStrategy::ToZero);
    if amount <= Decimal::ZERO {
        return Err(format!("{available} {code} is less than one unit PayPal can send"));
    }
    Ok(Planned { amount, tds: Decimal::ZERO, destination: Destination::Paypal { email } })
}

/// Maps a PayPal item `transaction_status` to an item status.
pub fn status_of(s: &str) -> Option<PayoutStatus> {
    Some(match s {
        "SUCCESS" => PayoutStatus::Paid,
        "PENDING" | "UNCLAIMED" | "ONHOLD" | "NEW" => PayoutStatus::Sent,
        "FAILED" | "RETURNED" | "BLOCKED" | "DENIED" | "CANCELED" => PayoutStatus::Failed,
        "REFUNDED" | "REVERSED" => PayoutStatus::Reversed,
        _ => return None,
    })
}

/// PayPal's text for an amount: whole units where required, else 2 places.
pub fn amount_text(amount: Decimal, currency: &str) -> String {
    let places = if WHOLE_UNITS.contains(&currency) { 0 } else { 2 };
    format!("{:.*}", places, amount)
}

/// The PayPal adapter.
pub struct Paypal {
    settings: PaypalSettings,
    client_id: String,
    client_secret: String,
    http_settings: HttpSettings,
    http: reqwest::Client,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

fn error_text(body: &Value) -> String {
    let mut s = body["message"].as_str().or(body["name"].as_str()).unwrap_or("no message").to_string();
    for d in body["details"].as_array().into_iter().flatten() {
        s.push_str(&format!("; {}: {}", d["field"].as_str().unwrap_or("?"), d["issue"].as_str().unwrap_or("?")));
    }
    s
}

/// The original batch's id, when a 400 says the `sender_batch_id` was used.
fn duplicate_of(reply: &Reply) -> Option<String> {
    let links = reply.body["links"].as_array()?;
    let href = links.iter().find(|l| l["rel"].as_str() == Some("self"))?["href"].as_str()?;
    let id = href.split('?').next()?.rsplit('/').next()?;
    (!id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')).then(|| id.to_string())
}

impl Paypal {
    /// The adapter, with credentials read from the environment variables the
    /// settings name.
    pub fn from_env(settings: PaypalSettings, http: HttpSettings) -> Result<Paypal, String> {
        let client_id = secret(&settings.client_id_env, "payouts.paypal.client_id_env")?;
        let client_secret = secret(&settings.client_secret_env, "payouts.paypal.client_secret_env")?;
        Ok(Paypal {
            client_id,
            client_secret,
            http: http.client()?,
            http_settings: http,
            settings,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The cached token, or a new one.
    async fn token(&self, fresh: bool) -> Result<String, Failure> {
        let mut held = self.token.lock().await;
        if let Some((t, until)) = held.as_ref() {
            if !fresh && Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let url = format!("{}/v1/oauth2/token", self.settings.base_url);
        let reply = call(&self.http_settings, "token", || {
            self.http
                .post(&url)
                .basic_auth(&self.client_id, Some(&self.client_secret))
                .form(&[("grant_type", "client_credentials")])
        })
        .await
        .map_err(|f| match f {
            // A token refused is a credentials problem, never a payout's.
            Failure::Client(r) => Failure::Auth(format!("PayPal refused the credentials: HTTP {}", r.status)),
            other => other,
        })?;
        let token = reply.body["access_token"]
            .as_str()
            .ok_or_else(|| Failure::Unknown("PayPal's token answer has no access_token".into()))?
            .to_string();
        let lasts = reply.body["expires_in"].as_u64().unwrap_or(0).saturating_sub(60);
        *held = Some((token.clone(), Instant::now() + std::time::Duration::from_secs(lasts)));
        Ok(token)
    }

    /// A call with the token; once more with a fresh token if it was refused.
    async fn authed(&self, what: &str, build: impl Fn(&str) -> reqwest::RequestBuilder) -> Result<Reply, Failure> {
        let token = self.token(false).await?;
        match call(&self.http_settings, what, || build(&token)).await {
            Err(Failure::Auth(_)) => {
                let token = self.token(true).await?;
                call(&self.http_settings, what, || build(&token)).await
            }
            other => other,
        }
    }

    fn body(group: &[Request]) -> Result<Value, String> {
        let header = &group[0];
        let items: Result<Vec<Value>, String> = group
            .iter()
            .map(|r| match &r.destination {
                Destination::Paypal { email } => Ok(json!({
                    "recipient_type": "EMAIL",
                    "amount": { "value": amount_text(r.transfer(), &r.currency), "currency": r.currency },
                    "receiver": email,
                    "sender_item_id": r.key,
                    "note": "Commission payout",
                })),
                _ => Err(format!("partner {}: not a PayPal destination", r.partner_id)),
            })
            .collect();
        Ok(json!({
            "sender_batch_header": {
                "sender_batch_id": header.group,
                "email_subject": "You have a commission payout",
                "recipient_type": "EMAIL",
            },
            "items": items?,
        }))
    }

    /// Every item of batch `id`, page by page, as answers for `group`.
    async fn batch_answers(&self, id: &str, group: &[Request]) -> Vec<Answer> {
        let mut items: Vec<Value> = Vec::new();
        let mut batch_status = String::new();
        let max_pages = MAX_BATCH_ITEMS.div_ceil(PAGE_SIZE) + 1;
        for page in 1..=max_pages {
            let url = format!(
                "{}/v1/payments/payouts/{id}?page={page}&page_size={PAGE_SIZE}&total_required=true",
                self.settings.base_url
            );
            let reply = match self.authed("batch status", |t| self.http.get(&url).bearer_auth(t)).await {
                Ok(r) => r,
                Err(f) => {
                    let why = f.unknown("batch status");
                    return group.iter().map(|_| Answer::Unknown(why.clone())).collect();
                }
            };
            batch_status = reply.body["batch_header"]["batch_status"].as_str().unwrap_or_default().to_string();
            let got = reply.body["items"].as_array().cloned().unwrap_or_default();
            let n = got.len();
            items.extend(got);
            let total_pages = reply.body["total_pages"].as_u64().unwrap_or(1) as usize;
            if page >= total_pages || n < PAGE_SIZE {
                break;
            }
        }
        group
            .iter()
            .map(|r| {
                if batch_status == "DENIED" {
                    return Answer::Status {
                        status: PayoutStatus::Failed,
                        provider_ref: Some(id.to_string()),
                        detail: Some("PayPal denied the batch".into()),
                    };
                }
                let Some(it) = items.iter().find(|i| i["payout_item"]["sender_item_id"].as_str() == Some(&r.key))
                else {
                    return Answer::Unknown(format!("PayPal batch {id} does not list item {}", r.key));
                };
                let s = it["transaction_status"].as_str().unwrap_or_default();
                match status_of(s) {
                    Some(status) => Answer::Status {
                        status,
                        provider_ref: Some(id.to_string()),
                        detail: Some(match it["errors"]["message"].as_str() {
                            Some(m) => format!("{s}: {m}"),
                            None => s.to_string(),
                        }),
                    },
                    None => Answer::Unknown(format!("PayPal reports item status {s:?}, which is not documented")),
                }
            })
            .collect()
    }

    async fn create_group(&self, group: &[Request], first: bool) -> Vec<Answer> {
        let all = |a: Answer| group.iter().map(|_| a.clone()).collect::<Vec<_>>();
        let body = match Self::body(group) {
            Ok(b) => b,
            Err(e) => return all(Answer::Refused(e)),
        };
        let url = format!("{}/v1/payments/payouts", self.settings.base_url);
        let batch = &group[0].group;
        let sent = self
            .authed("payout batch", |t| {
                self.http.post(&url).bearer_auth(t).header("PayPal-Request-Id", batch.as_str()).json(&body)
            })
            .await;
        match sent {
            Ok(reply) => {
                let id = reply.body["batch_header"]["payout_batch_id"].as_str().unwrap_or_default().to_string();
                if id.is_empty() {
                    return all(Answer::Unknown("PayPal accepted the batch without a payout_batch_id".into()));
                }
                if reply.body["batch_header"]["batch_status"].as_str() == Some("DENIED") {
                    return all(Answer::Status {
                        status: PayoutStatus::Failed,
                        provider_ref: Some(id),
                        detail: Some("PayPal denied the batch".into()),
                    });
                }
                all(Answer::Status { status: PayoutStatus::Sent, provider_ref: Some(id), detail: None })
            }
            Err(Failure::Client(reply)) => match duplicate_of(&reply) {
                // Sent before: what happened is in the original batch.
                Some(id) => self.batch_answers(&id, group).await,
                None if first => all(Answer::Refused(format!(
                    "PayPal refused the batch (HTTP {}): {}",
                    reply.status,
                    error_text(&reply.body)
                ))),
                None => all(Answer::Unknown(format!(
                    "PayPal answered a repeated batch with HTTP {}: {}",
                    reply.status,
                    error_text(&reply.body)
                ))),
            },
            Err(f) => all(Answer::Unknown(f.unknown("payout batch"))),
        }
    }
}

impl Provider for Paypal {
    fn name(&self) -> &'static str {
        "paypal"
    }

    fn key_window(&self) -> chrono::Duration {
        // sender_batch_id is remembered for 30 days; two days of margin.
        chrono::Duration::days(28)
    }

    fn lookup_is_definite(&self) -> bool {
        false
    }

    fn create<'a>(&'a self, group: &'a [Request], first: bool) -> BoxFuture<'a, Vec<Answer>> {
        Box::pin(self.create_group(group, first))
    }

    fn lookup<'a>(&'a self, group: &'a [Request]) -> BoxFuture<'a, Vec<Answer>> {
        Box::pin(async move {
            match group.iter().find_map(|r| r.provider_ref.clone()) {
                Some(id) => self.batch_answers(&id, group).await,
                None => group.iter().map(|_| Answer::NotFound).collect(),
            }
        })
    }

    fn webhook<'a>(&'a self, headers: &'a HeaderMap, body: &'a [u8]) -> BoxFuture<'a, Result<Webhook, WebhookError>> {
        Box::pin(async move {
            let Some(webhook_id) = self.settings.webhook_id.as_deref() else {
                return Err(WebhookError::NotConfigured("paypal", "no payouts.paypal.webhook_id in the config".into()));
            };
            let event: Value =
                serde_json::from_slice(body).map_err(|e| WebhookError::Malformed(format!("not JSON: {e}")))?;
            let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            let check = json!({
                "auth_algo": h("paypal-auth-algo"),
                "cert_url": h("paypal-cert-url"),
                "transmission_id": h("paypal-transmission-id"),
                "transmission_sig": h("paypal-transmission-sig"),
                "transmission_time": h("paypal-transmission-time"),
                "webhook_id": webhook_id,
                "webhook_event": event,
            });
            let url = format!("{}/v1/notifications/verify-webhook-signature", self.settings.base_url);
            let reply = self
                .authed("verify webhook", |t| self.http.post(&url).bearer_auth(t).json(&check))
                .await
                .map_err(|f| match f {
                    Failure::Client(r) => {
                        WebhookError::BadSignature(format!("PayPal did not verify it: HTTP {}", r.status))
                    }
                    other => WebhookError::Unavailable(other.unknown("verify webhook")),
                })?;
            if reply.body["verification_status"].as_str() != Some("SUCCESS") {
                return Err(WebhookError::BadSignature(format!(
                    "PayPal's verification status is {}",
                    reply.body["verification_status"]
                )));
            }
            read_webhook(&event)
        })
    }
}

/// What a (verified) PayPal webhook event reports.
pub fn read_webhook(event: &Value) -> Result<Webhook, WebhookError> {
    let kind = event["event_type"].as_str().unwrap_or_default();
    let r = &event["resource"];
    if kind.starts_with("PAYMENT.PAYOUTS-ITEM.") {
        let Some(key) = r["payout_item"]["sender_item_id"].as_str().filter(|k| k.starts_with("afl")) else {
            return Ok(Webhook::Ignored("a payout item Afflio did not make".into()));
        };
        let s = r["transaction_status"].as_str().unwrap_or_default();
        let answer = match status_of(s) {
            Some(status) => Answer::Status {
                status,
                provider_ref: r["payout_batch_id"].as_str().map(str::to_string),
                detail: Some(match r["errors"]["message"].as_str() {
                    Some(m) => format!("{s}: {m}"),
                    None => s.to_string(),
                }),
            },
            None => return Err(WebhookError::Malformed(format!("{kind}: item status {s:?} is not documented"))),
        };
        return Ok(Webhook::Updates(vec![Update { target: Target::Key(key.to_string()), answer }]));
    }
    if kind == "PAYMENT.PAYOUTSBATCH.DENIED" {
        let h = &r["batch_header"];
        let Some(group) = h["sender_batch_header"]["sender_batch_id"].as_str().filter(|g| g.starts_with("afl")) else {
            return Ok(Webhook::Ignored("a payout batch Afflio did not make".into()));
        };
        return Ok(Webhook::Updates(vec![Update {
            target: Target::Group(group.to_string()),
            answer: Answer::Status {
                status: PayoutStatus::Failed,
                provider_ref: h["payout_batch_id"].as_str().map(str::to_string),
                detail: Some("PayPal denied the batch".into()),
            },
        }]));
    }
    Ok(Webhook::Ignored(format!("event {kind:?} changes no item")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_item_status_maps() {
        let check = |s: &str, want: Option<PayoutStatus>| assert_eq!(status_of(s), want, "{s}");
        check("SUCCESS", Some(PayoutStatus::Paid));
        for s in ["PENDING", "UNCLAIMED", "ONHOLD", "NEW"] {
            check(s, Some(PayoutStatus::Sent));
        }
        for s in ["FAILED", "RETURNED", "BLOCKED", "DENIED", "CANCELED"] {
            check(s, Some(PayoutStatus::Failed));
        }
        for s in ["REFUNDED", "REVERSED"] {
            check(s, Some(PayoutStatus::Reversed));
        }
        check("LOST", None);
    }

    #[test]
    fn amounts_follow_the_currency() {
        assert_eq!(amount_text("1234.5".parse().unwrap(), "USD"), "1234.50");
        assert_eq!(amount_text("1234".parse().unwrap(), "JPY"), "1234");
    }

    #[test]
    fn duplicate_answers_name_the_original() {
        let reply = Reply {
            status: 400,
            body: json!({"name": "USER_BUSINESS_ERROR", "links": [{"href": "https://api-m.paypal.com/v1/payments/payouts/5UXD2E8A7EBQJ", "rel": "self", "method": "GET"}]}),
        };
        assert_eq!(duplicate_of(&reply).as_deref(), Some("5UXD2E8A7EBQJ"));
        let other = Reply { status: 422, body: json!({"name": "VALIDATION_ERROR"}) };
        assert_eq!(duplicate_of(&other), None);
    }
}
