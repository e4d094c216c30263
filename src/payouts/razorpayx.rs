//! RazorpayX Payouts (INR bank and UPI transfers): contacts, fund accounts,
//! payouts in paise with `X-Payout-Idempotency`, status polling, and
//! webhooks signed with HMAC-SHA256 (`X-Razorpay-Signature`).

use afflio_engine::rules::RazorpayxSettings;
use afflio_engine::PayoutStatus;
use anyhow::Context;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::{ProviderAnswer, SendItem};

pub(crate) struct Razorpayx {
    settings: RazorpayxSettings,
    key_id: String,
    key_secret: String,
    http: reqwest::Client,
}

/// Maps a RazorpayX payout status to ours.
fn status_of(s: &str) -> Option<PayoutStatus> {
    Some(match s {
        "queued" | "pending" | "processing" | "scheduled" => PayoutStatus::Sent,
        "processed" => PayoutStatus::Paid,
        "reversed" => PayoutStatus::Reversed,
        "rejected" | "cancelled" | "failed" => PayoutStatus::Failed,
        _ => return None,
    })
}

fn answer_of(v: &Value) -> ProviderAnswer {
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let status = v["status"].as_str().unwrap_or_default();
    match status_of(status) {
        Some(s) => {
            let detail =
                v["status_details"]["description"].as_str().or(v["failure_reason"].as_str()).map(str::to_string);
            ProviderAnswer::Status { status: s, provider_ref: id, detail }
        }
        None => ProviderAnswer::Retry(format!("unknown payout status {status:?}")),
    }
}

/// Paise from rupees: exact, or an error (more than 2 decimals cannot be sent).
fn paise(amount: Decimal) -> anyhow::Result<i64> {
    let p = amount * Decimal::from(100);
    anyhow::ensure!(p.fract().is_zero(), "{amount} INR is not a whole number of paise");
    i64::try_from(p.trunc().mantissa() / 10i128.pow(p.trunc().scale())).context("amount out of range")
}

impl Razorpayx {
    pub(crate) fn new(settings: RazorpayxSettings, key_id: String, key_secret: String) -> anyhow::Result<Razorpayx> {
        Ok(Razorpayx { settings, key_id, key_secret, http: super::http_client()? })
    }

    async fn post(&self, path: &str, body: &Value, idempotency: Option<&str>) -> Result<Value, ProviderAnswer> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.settings.base_url))
            .basic_auth(&self.key_id, Some(&self.key_secret))
            .json(body);
        if let Some(k) = idempotency {
            req = req.header("X-Payout-Idempotency", k);
        }
        let resp = req.send().await.map_err(|e| ProviderAnswer::Retry(format!("razorpayx {path}: {e}")))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(ProviderAnswer::Retry(format!("razorpayx {path}: HTTP {status}")));
        }
        if !status.is_success() {
            let why = v["error"]["description"].as_str().unwrap_or("no description");
            return Err(ProviderAnswer::Refused(format!("razorpayx {path}: HTTP {status}: {why}")));
        }
        Ok(v)
    }

    /// Creates (or finds: RazorpayX deduplicates identical contacts and fund
    /// accounts) the partner's contact and fund account, then the payout.
    pub(crate) async fn send(&self, item: &SendItem) -> ProviderAnswer {
        match self.try_send(item).await {
            Ok(a) | Err(a) => a,
        }
    }

    async fn try_send(&self, item: &SendItem) -> Result<ProviderAnswer, ProviderAnswer> {
        if item.currency != "INR" {
            return Ok(ProviderAnswer::Refused(format!("razorpayx pays INR only, not {}", item.currency)));
        }
        let amount = paise(item.transfer()).map_err(|e| ProviderAnswer::Refused(e.to_string()))?;
        let d = &item.destination;
        let name = d.name.clone().unwrap_or_else(|| item.partner_id.clone());
        let contact = self
            .post("/v1/contacts", &json!({ "name": name, "type": "vendor", "reference_id": item.partner_id }), None)
            .await?;
        let contact_id = contact["id"].as_str().unwrap_or_default();
        let (fund_body, mode) = match (&d.vpa, &d.account_number, &d.ifsc) {
            (Some(vpa), _, _) => (
                json!({ "contact_id": contact_id, "account_type": "vpa", "vpa": { "address": vpa } }),
                "UPI".to_string(),
            ),
            (None, Some(acc), Some(ifsc)) => (
                json!({ "contact_id": contact_id, "account_type": "bank_account",
                        "bank_account": { "name": name, "ifsc": ifsc, "account_number": acc } }),
                self.settings.bank_mode.clone(),
            ),
            _ => return Ok(ProviderAnswer::Refused("no UPI address or bank account".into())),
        };
        let fund = self.post("/v1/fund_accounts", &fund_body, None).await?;
        let fund_id = fund["id"].as_str().unwrap_or_default();
        // reference_id is limited to 40 characters: a digest of the key.
        let reference = format!("afflio-{:016x}", xxhash_rust::xxh3::xxh3_64(item.idempotency_key.as_bytes()));
        let body = json!({
            "account_number": self.settings.account_number,
            "fund_account_id": fund_id,
            "amount": amount,
            "currency": "INR",
            "mode": mode,
            "purpose": "payout",
            "queue_if_low_balance": true,
            "reference_id": reference,
            "narration": "Afflio commission",
            "notes": {
                "program_id": item.program_id,
                "batch_id": item.batch_id,
                "partner_id": item.partner_id,
                "gross": item.amount.to_string(),
                "tds": item.tds.to_string(),
            },
        });
        let v = self.post("/v1/payouts", &body, Some(&item.idempotency_key)).await?;
        Ok(answer_of(&v))
    }

    pub(crate) async fn status(&self, provider_ref: &str) -> ProviderAnswer {
        let resp = self
            .http
            .get(format!("{}/v1/payouts/{provider_ref}", self.settings.base_url))
            .basic_auth(&self.key_id, Some(&self.key_secret))
            .send()
            .await;
        match resp {
            Err(e) => ProviderAnswer::Retry(format!("razorpayx status: {e}")),
            Ok(r) if !r.status().is_success() => {
                ProviderAnswer::Retry(format!("razorpayx status: HTTP {}", r.status()))
            }
            Ok(r) => match r.json::<Value>().await {
                Ok(v) => answer_of(&v),
                Err(e) => ProviderAnswer::Retry(format!("razorpayx status: {e}")),
            },
        }
    }
}

pub use afflio_ingest::webhooks::verify_razorpayx_signature as verify_webhook_signature;

/// The payout updates in a (verified) webhook body: (program, batch, partner, answer).
pub(crate) fn webhook_updates(body: &[u8]) -> anyhow::Result<Vec<(String, String, String, ProviderAnswer)>> {
    let v: Value = serde_json::from_slice(body).context("the webhook body is not JSON")?;
    let event = v["event"].as_str().unwrap_or_default();
    if !event.starts_with("payout.") {
        return Ok(Vec::new());
    }
    let p = &v["payload"]["payout"]["entity"];
    let note = |k: &str| {
        p["notes"][k].as_str().map(str::to_string).with_context(|| format!("webhook payout without notes.{k}"))
    };
    Ok(vec![(note("program_id")?, note("batch_id")?, note("partner_id")?, answer_of(p))])
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    #[test]
    fn paise_are_exact() {
        assert_eq!(paise("1234.50".parse().unwrap()).unwrap(), 123_450);
        assert_eq!(paise("0.01".parse().unwrap()).unwrap(), 1);
        assert!(paise("0.001".parse().unwrap()).is_err());
    }

    #[test]
    fn webhook_signatures_are_checked() {
        let body = br#"{"event":"payout.processed"}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec").unwrap();
        mac.update(body);
        let sig = hex::encode(mac.finalize().into_bytes());
        assert!(verify_webhook_signature(body, &sig, "whsec"));
        assert!(!verify_webhook_signature(body, &sig, "other"));
        assert!(!verify_webhook_signature(b"{}", &sig, "whsec"));
        assert!(!verify_webhook_signature(body, "zz", "whsec"));
    }
}
