//! PayPal Payouts: an OAuth2 client-credentials token, `POST
//! /v1/payments/payouts` batches (at most 15,000 items each) whose
//! `sender_batch_id` and `PayPal-Request-Id` make a retry idempotent, items
//! named by `sender_item_id`, and batch status polling.

use afflio_engine::rules::PaypalSettings;
use afflio_engine::PayoutStatus;
use serde_json::{json, Value};

use super::{ProviderAnswer, SendItem};

/// PayPal's limit of items per payout batch.
pub(crate) const MAX_BATCH_ITEMS: usize = 15_000;

pub(crate) struct Paypal {
    settings: PaypalSettings,
    client_id: String,
    client_secret: String,
    http: reqwest::Client,
}

fn status_of(s: &str) -> Option<PayoutStatus> {
    Some(match s {
        "SUCCESS" => PayoutStatus::Paid,
        "PENDING" | "UNCLAIMED" | "ONHOLD" | "NEW" => PayoutStatus::Sent,
        "FAILED" | "RETURNED" | "BLOCKED" | "DENIED" | "CANCELED" => PayoutStatus::Failed,
        "REFUNDED" | "REVERSED" => PayoutStatus::Reversed,
        _ => return None,
    })
}

impl Paypal {
    pub(crate) fn new(settings: PaypalSettings, client_id: String, client_secret: String) -> anyhow::Result<Paypal> {
        Ok(Paypal { settings, client_id, client_secret, http: super::http_client()? })
    }

    async fn token(&self) -> Result<String, ProviderAnswer> {
        let resp = self
            .http
            .post(format!("{}/v1/oauth2/token", self.settings.base_url))
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .map_err(|e| ProviderAnswer::Retry(format!("paypal token: {e}")))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        match v["access_token"].as_str() {
            Some(t) if status.is_success() => Ok(t.to_string()),
            _ if status.is_server_error() => Err(ProviderAnswer::Retry(format!("paypal token: HTTP {status}"))),
            // Bad credentials are a configuration problem: nothing was sent.
            _ => Err(ProviderAnswer::Retry(format!("paypal token refused: HTTP {status}"))),
        }
    }

    /// Sends the items in batches of at most 15,000; one answer per item.
    pub(crate) async fn send(&self, items: &[&SendItem]) -> Vec<ProviderAnswer> {
        let token = match self.token().await {
            Ok(t) => t,
            Err(a) => return items.iter().map(|_| a.clone()).collect(),
        };
        let mut answers = Vec::with_capacity(items.len());
        for (n, chunk) in items.chunks(MAX_BATCH_ITEMS).enumerate() {
            let sender_batch_id = format!("{}-{n}", chunk[0].batch_id);
            let body = json!({
                "sender_batch_header": {
                    "sender_batch_id": sender_batch_id,
                    "email_subject": "You have a commission payout",
                    "recipient_type": "EMAIL",
                },
                "items": chunk.iter().map(|i| json!({
                    "recipient_type": "EMAIL",
                    "amount": { "value": i.transfer().to_string(), "currency": i.currency },
                    "receiver": i.destination.email,
                    "sender_item_id": i.partner_id,
                    "note": format!("Commission {}", i.batch_id),
                })).collect::<Vec<_>>(),
            });
            let resp = self
                .http
                .post(format!("{}/v1/payments/payouts", self.settings.base_url))
                .bearer_auth(&token)
                .header("PayPal-Request-Id", &sender_batch_id)
                .json(&body)
                .send()
                .await;
            let answer = match resp {
                Err(e) => ProviderAnswer::Retry(format!("paypal payouts: {e}")),
                Ok(r) => {
                    let status = r.status();
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    if status.is_success() {
                        let id = v["batch_header"]["payout_batch_id"].as_str().unwrap_or_default().to_string();
                        ProviderAnswer::Status { status: PayoutStatus::Sent, provider_ref: id, detail: None }
                    } else if status.is_server_error() || status.as_u16() == 429 {
                        ProviderAnswer::Retry(format!("paypal payouts: HTTP {status}"))
                    } else {
                        let why = v["message"].as_str().or(v["name"].as_str()).unwrap_or("no message");
                        ProviderAnswer::Refused(format!("paypal payouts: HTTP {status}: {why}"))
                    }
                }
            };
            answers.extend(chunk.iter().map(|_| answer.clone()));
        }
        answers
    }

    /// The status of partner `sender_item_id`'s item in batch `payout_batch_id`.
    pub(crate) async fn status(&self, payout_batch_id: &str, sender_item_id: &str) -> ProviderAnswer {
        let token = match self.token().await {
            Ok(t) => t,
            Err(a) => return a,
        };
        let resp = self
            .http
            .get(format!("{}/v1/payments/payouts/{payout_batch_id}", self.settings.base_url))
            .bearer_auth(&token)
            .send()
            .await;
        let v: Value = match resp {
            Err(e) => return ProviderAnswer::Retry(format!("paypal status: {e}")),
            Ok(r) if !r.status().is_success() => {
                return ProviderAnswer::Retry(format!("paypal status: HTTP {}", r.status()))
            }
            Ok(r) => r.json().await.unwrap_or(Value::Null),
        };
        let items = v["items"].as_array().cloned().unwrap_or_default();
        let Some(it) = items.iter().find(|i| i["payout_item"]["sender_item_id"].as_str() == Some(sender_item_id))
        else {
            return ProviderAnswer::Retry(format!("paypal batch {payout_batch_id} has no item {sender_item_id} yet"));
        };
        let s = it["transaction_status"].as_str().unwrap_or_default();
        match status_of(s) {
            Some(status) => ProviderAnswer::Status {
                status,
                provider_ref: payout_batch_id.to_string(),
                detail: it["errors"]["message"].as_str().map(str::to_string),
            },
            None => ProviderAnswer::Retry(format!("unknown paypal item status {s:?}")),
        }
    }
}
