//! Provider webhooks into the event stream: RazorpayX payout events,
//! verified with HMAC-SHA256 (`X-Razorpay-Signature`) and turned into
//! `payout` events, whose ids derive from batch, partner and status (a
//! redelivered webhook is a duplicate).

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// The id of a payout item's state change: in the service's own namespace
/// (a client cannot send an event with it), the same for a redelivery.
pub fn payout_event_id(batch: &str, partner: &str, status: &str) -> String {
    format!("{}payout:{batch}:{partner}:{status}", crate::http::RESERVED_ID_PREFIX)
}

/// Checks `X-Razorpay-Signature`: hex HMAC-SHA256 of the raw body with the
/// webhook secret, compared in constant time.
pub fn verify_razorpayx_signature(body: &[u8], signature: &str, secret: &str) -> bool {
    let Ok(expected) = hex::decode(signature.trim()) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// The payout event a (verified) RazorpayX webhook stands for, as JSON text,
/// or `None` for events that do not change a payout's status. Its time is the
/// webhook's `created_at` (so a redelivery is the same event), else `ts`
/// (the time of receipt).
pub fn razorpayx_payout_event(body: &[u8], ts: &str) -> Result<Option<String>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("the webhook body is not JSON: {e}"))?;
    let event = v["event"].as_str().unwrap_or_default();
    let status = match event {
        "payout.processed" => "paid",
        "payout.reversed" => "reversed",
        "payout.failed" | "payout.rejected" | "payout.cancelled" => "failed",
        _ => return Ok(None),
    };
    let created = v["created_at"].as_i64().and_then(|s| chrono::DateTime::from_timestamp(s, 0));
    let ts = created.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).unwrap_or_else(|| ts.to_string());
    let p = &v["payload"]["payout"]["entity"];
    let note = |k: &str| p["notes"][k].as_str().map(str::to_string).ok_or_else(|| format!("payout without notes.{k}"));
    let (program, batch, partner) = (note("program_id")?, note("batch_id")?, note("partner_id")?);
    let detail = p["status_details"]["description"].as_str().or(p["failure_reason"].as_str());
    let mut ev = json!({
        "type": "payout",
        "event_id": payout_event_id(&batch, &partner, status),
        "ts": ts,
        "program_id": program,
        "batch_id": batch,
        "partner_id": partner,
        "currency": "INR",
        "amount": note("gross")?,
        "tds": note("tds")?,
        "status": status,
        "provider": "razorpayx",
        "provider_ref": p["id"].as_str().unwrap_or_default(),
    });
    if let Some(d) = detail {
        ev["detail"] = json!(d);
    }
    Ok(Some(ev.to_string()))
}
