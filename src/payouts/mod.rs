//! The payouts queue on a replayed store: plan a batch from approved
//! balances, send it to the providers, reconcile statuses.
//!
//! Every state change is a `payout` event applied by the engine (validated
//! against the available balance, deduplicated by an id derived from batch,
//! partner and status) and recorded in the `payouts` table. Each item's
//! idempotency key is derived from its batch and partner, so a crash and a
//! re-send can never pay twice: the provider answers a repeated key with
//! the payout it already made.

mod paypal;
mod razorpayx;
pub mod sandbox;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use afflio_engine::rules::{Payout, PayoutProvider, Rules};
use afflio_engine::{round_money, Arrival, Engine, Outcome, PayoutItem, PayoutStatus};
use afflio_ingest::decode_event;
use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::json;

pub use razorpayx::verify_webhook_signature;

/// One item as sent to a provider.
#[derive(Clone, Debug)]
pub struct SendItem {
    pub program_id: String,
    pub batch_id: String,
    pub partner_id: String,
    pub currency: String,
    /// Gross (what leaves the balance).
    pub amount: Decimal,
    pub tds: Decimal,
    pub destination: Payout,
    /// `{batch}:{partner}`: the same on every attempt.
    pub idempotency_key: String,
}

impl SendItem {
    /// What is transferred: gross less withheld tax.
    pub fn transfer(&self) -> Decimal {
        self.amount - self.tds
    }
}

/// What a provider said about an item.
#[derive(Clone, Debug, PartialEq)]
pub enum ProviderAnswer {
    /// Accepted (queued or processing), or already final.
    Status { status: PayoutStatus, provider_ref: String, detail: Option<String> },
    /// Refused for good (bad destination, insufficient funds): the item failed.
    Refused(String),
    /// Not known to have happened (timeout, 5xx, connection): try again later
    /// with the same idempotency key.
    Retry(String),
}

/// HTTP client settings shared by the adapters.
pub(crate) fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(
            std::env::var("AFFLIO_PAYOUT_TIMEOUT_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(20),
        ))
        .build()
        .context("cannot build the HTTP client")
}

fn secret(var: &str, what: &str) -> anyhow::Result<String> {
    std::env::var(var).with_context(|| format!("{what}: environment variable {var} is not set"))
}

/// Applies one payout state change to the engine; refusals are errors.
fn apply(
    engine: &mut Engine,
    ts: DateTime<Utc>,
    item: &SendItem,
    status: PayoutStatus,
    provider_ref: Option<&str>,
    detail: Option<&str>,
) -> anyhow::Result<bool> {
    let mut ev = json!({
        "type": "payout",
        "event_id": afflio_ingest::webhooks::payout_event_id(&item.batch_id, &item.partner_id, status.as_str()),
        "ts": ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "program_id": item.program_id,
        "batch_id": item.batch_id,
        "partner_id": item.partner_id,
        "currency": item.currency,
        "amount": item.amount.to_string(),
        "tds": item.tds.to_string(),
        "status": status.as_str(),
        "provider": match item.destination.provider { PayoutProvider::Paypal => "paypal", PayoutProvider::Razorpayx => "razorpayx" },
    });
    if let Some(r) = provider_ref {
        ev["provider_ref"] = json!(r);
    }
    if let Some(d) = detail {
        ev["detail"] = json!(d);
    }
    let text = ev.to_string();
    let event =
        decode_event(&text).map_err(|e| anyhow::anyhow!("internal error: payout event does not decode: {e}"))?;
    match engine.apply(&event, &text, Arrival { ts: Utc::now(), origin: &"afflio payouts", clock: None }) {
        Outcome::Applied => Ok(true),
        Outcome::Duplicate => Ok(false),
        Outcome::Rejected(r) => {
            let detail = engine.pending_output().rejections.last().map(|r| r.detail.clone()).unwrap_or_default();
            bail!("payout refused ({}): {detail}", r.as_str())
        }
    }
}

fn save(
    data: &Path,
    engine: &mut Engine,
    now: DateTime<Utc>,
    store_now: crate::review::StoreNow,
    tag: &str,
) -> anyhow::Result<()> {
    crate::review::amend(data, engine, now, store_now, tag)
}

/// A planned item, for printing.
#[derive(Clone, Debug)]
pub struct PlannedItem {
    pub partner_id: String,
    pub provider: &'static str,
    pub amount: Decimal,
    pub tds: Decimal,
}

/// What `plan` did.
#[derive(Clone, Debug)]
pub struct Plan {
    pub batch_id: String,
    pub items: Vec<PlannedItem>,
    /// Partners with an approved balance that cannot be paid now, and why.
    pub skipped: Vec<(String, String)>,
}

/// Builds a batch for `program_id` from the approved balances as of `at`
/// (default: the store's "now"): every partner with a payout destination
/// and at least the program's `min_payout` available. Deterministic;
/// nothing is sent.
pub fn plan(rules: Rules, data: &Path, program_id: &str, at: Option<DateTime<Utc>>) -> anyhow::Result<Plan> {
    let program =
        rules.program(program_id).with_context(|| format!("no program {program_id:?} in the config"))?.clone();
    let partners: BTreeMap<String, Option<Payout>> =
        rules.partners().filter(|p| p.program_id == program_id).map(|p| (p.id.clone(), p.payout.clone())).collect();
    let tds_rate = rules.payouts().razorpayx.as_ref().map(|r| r.tds.fraction()).unwrap_or(Decimal::ZERO);
    let (mut engine, store_now) = crate::review::load_state(data, rules)?;
    let now = store_now.of(&engine, program_id);
    let at = at.unwrap_or(now);
    let batch_id = format!("{program_id}-{}", at.format("%Y%m%dT%H%M%SZ"));
    let mut plan = Plan { batch_id: batch_id.clone(), items: Vec::new(), skipped: Vec::new() };
    for b in engine.balances(program_id, at) {
        if b.available <= Decimal::ZERO {
            if b.available < Decimal::ZERO {
                plan.skipped.push((b.partner_id.to_string(), format!("clawback of {} to net first", -b.available)));
            }
            continue;
        }
        if b.available < program.min_payout {
            plan.skipped.push((
                b.partner_id.to_string(),
                format!("{} is under the minimum payout {}", b.available, program.min_payout),
            ));
            continue;
        }
        let Some(Some(dest)) = partners.get(&*b.partner_id) else {
            plan.skipped.push((b.partner_id.to_string(), "no payout destination configured".into()));
            continue;
        };
        let provider = match dest.provider {
            PayoutProvider::Paypal => "paypal",
            PayoutProvider::Razorpayx => "razorpayx",
        };
        let tds = if dest.provider == PayoutProvider::Razorpayx {
            round_money(b.available * tds_rate, program.currency)
        } else {
            Decimal::ZERO
        };
        let item = SendItem {
            program_id: program_id.to_string(),
            batch_id: batch_id.clone(),
            partner_id: b.partner_id.to_string(),
            currency: program.currency.code().to_string(),
            amount: b.available,
            tds,
            destination: dest.clone(),
            idempotency_key: format!("{batch_id}:{}", b.partner_id),
        };
        if apply(&mut engine, at, &item, PayoutStatus::Planned, None, None)? {
            plan.items.push(PlannedItem { partner_id: item.partner_id, provider, amount: item.amount, tds });
        }
    }
    save(data, &mut engine, now.max(at), store_now, "plan")?;
    Ok(plan)
}

/// The providers, built from the config and the environment.
pub struct Providers {
    razorpayx: Option<razorpayx::Razorpayx>,
    paypal: Option<paypal::Paypal>,
}

impl Providers {
    pub fn from_rules(rules: &Rules) -> anyhow::Result<Providers> {
        let p = rules.payouts();
        let razorpayx = match &p.razorpayx {
            None => None,
            Some(r) => Some(razorpayx::Razorpayx::new(
                r.clone(),
                secret(&r.key_id_env, "payouts.razorpayx.key_id_env")?,
                secret(&r.key_secret_env, "payouts.razorpayx.key_secret_env")?,
            )?),
        };
        let paypal = match &p.paypal {
            None => None,
            Some(pp) => Some(paypal::Paypal::new(
                pp.clone(),
                secret(&pp.client_id_env, "payouts.paypal.client_id_env")?,
                secret(&pp.client_secret_env, "payouts.paypal.client_secret_env")?,
            )?),
        };
        Ok(Providers { razorpayx, paypal })
    }
}

fn send_items(
    rules: &Rules,
    engine: &Engine,
    program_id: &str,
    batch: Option<&str>,
    want: &[PayoutStatus],
) -> anyhow::Result<Vec<(SendItem, PayoutItem)>> {
    let program = rules.program(program_id).with_context(|| format!("no program {program_id:?} in the config"))?;
    let mut v = Vec::new();
    for it in engine.payout_items(program_id) {
        if batch.is_some_and(|b| b != it.batch_id) || !want.contains(&it.state.status) {
            continue;
        }
        let dest = rules
            .partner(&it.partner_id)
            .and_then(|p| p.payout.clone())
            .with_context(|| format!("partner {:?} has no payout destination any more", it.partner_id))?;
        v.push((
            SendItem {
                program_id: program_id.to_string(),
                batch_id: it.batch_id.clone(),
                partner_id: it.partner_id.clone(),
                currency: program.currency.code().to_string(),
                amount: it.state.amount,
                tds: it.state.tds,
                destination: dest,
                idempotency_key: format!("{}:{}", it.batch_id, it.partner_id),
            },
            it,
        ));
    }
    Ok(v)
}

/// Counts of what a send or sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub sent: usize,
    pub paid: usize,
    pub failed: usize,
    pub reversed: usize,
    /// Not known to have happened: left as they were, to retry.
    pub retry: Vec<(String, String)>,
}

fn record(
    engine: &mut Engine,
    now: DateTime<Utc>,
    item: &SendItem,
    from: PayoutStatus,
    answer: ProviderAnswer,
    report: &mut Report,
) -> anyhow::Result<()> {
    match answer {
        ProviderAnswer::Status { status, provider_ref, detail } => {
            // Walk the allowed path: planned -> sent -> paid -> reversed.
            let path: &[PayoutStatus] = match (from, status) {
                (_, s) if s == from => &[],
                (PayoutStatus::Planned, PayoutStatus::Sent) => &[PayoutStatus::Sent],
                (PayoutStatus::Planned, PayoutStatus::Paid) => &[PayoutStatus::Sent, PayoutStatus::Paid],
                (PayoutStatus::Planned | PayoutStatus::Sent, PayoutStatus::Failed) => &[PayoutStatus::Failed],
                (PayoutStatus::Sent, PayoutStatus::Paid) => &[PayoutStatus::Paid],
                (PayoutStatus::Planned, PayoutStatus::Reversed) => {
                    &[PayoutStatus::Sent, PayoutStatus::Paid, PayoutStatus::Reversed]
                }
                (PayoutStatus::Sent, PayoutStatus::Reversed) => &[PayoutStatus::Paid, PayoutStatus::Reversed],
                (PayoutStatus::Paid, PayoutStatus::Reversed) => &[PayoutStatus::Reversed],
                _ => &[],
            };
            for s in path {
                if apply(engine, now, item, *s, Some(&provider_ref), detail.as_deref())? {
                    match s {
                        PayoutStatus::Sent => report.sent += 1,
                        PayoutStatus::Paid => report.paid += 1,
                        PayoutStatus::Failed => report.failed += 1,
                        PayoutStatus::Reversed => report.reversed += 1,
                        PayoutStatus::Planned => {}
                    }
                }
            }
        }
        ProviderAnswer::Refused(reason) => {
            if apply(engine, now, item, PayoutStatus::Failed, None, Some(&reason))? {
                report.failed += 1;
            }
        }
        ProviderAnswer::Retry(reason) => report.retry.push((item.partner_id.clone(), reason)),
    }
    Ok(())
}

/// Sends the planned items of `batch_id` (or of every batch) to their
/// providers. Safe to run again after a crash or a timeout.
pub async fn send(rules: Rules, data: &Path, program_id: &str, batch_id: Option<&str>) -> anyhow::Result<Report> {
    let providers = Providers::from_rules(&rules)?;
    let (mut engine, store_now) = crate::review::load_state(data, rules.clone())?;
    let now = store_now.of(&engine, program_id);
    let items = send_items(&rules, &engine, program_id, batch_id, &[PayoutStatus::Planned])?;
    let mut report = Report::default();
    let (rx, pp): (Vec<_>, Vec<_>) =
        items.into_iter().partition(|(i, _)| i.destination.provider == PayoutProvider::Razorpayx);
    if !rx.is_empty() {
        let p = providers
            .razorpayx
            .as_ref()
            .context("razorpayx partners in the batch but no [payouts.razorpayx] in the config")?;
        for (item, state) in &rx {
            let answer = p.send(item).await;
            record(&mut engine, now, item, state.state.status, answer, &mut report)?;
        }
    }
    if !pp.is_empty() {
        let p =
            providers.paypal.as_ref().context("paypal partners in the batch but no [payouts.paypal] in the config")?;
        let items: Vec<&SendItem> = pp.iter().map(|(i, _)| i).collect();
        for (item, answer) in items.iter().zip(p.send(&items).await) {
            record(&mut engine, now, item, PayoutStatus::Planned, answer, &mut report)?;
        }
    }
    crate::review::amend_async(data, &mut engine, now, store_now, "send").await?;
    Ok(report)
}

/// Asks the providers where sent (and paid, for reversals) items stand.
pub async fn sync(rules: Rules, data: &Path, program_id: &str) -> anyhow::Result<Report> {
    let providers = Providers::from_rules(&rules)?;
    let (mut engine, store_now) = crate::review::load_state(data, rules.clone())?;
    let now = store_now.of(&engine, program_id);
    let items = send_items(&rules, &engine, program_id, None, &[PayoutStatus::Sent, PayoutStatus::Paid])?;
    let mut report = Report::default();
    for (item, state) in &items {
        let Some(provider_ref) = state.state.provider_ref.as_deref() else { continue };
        let answer = match item.destination.provider {
            PayoutProvider::Razorpayx => match &providers.razorpayx {
                Some(p) => p.status(provider_ref).await,
                None => continue,
            },
            PayoutProvider::Paypal => match &providers.paypal {
                Some(p) => p.status(provider_ref, &item.partner_id).await,
                None => continue,
            },
        };
        record(&mut engine, now, item, state.state.status, answer, &mut report)?;
    }
    crate::review::amend_async(data, &mut engine, now, store_now, "sync").await?;
    Ok(report)
}

/// Every status: a webhook may repeat one already recorded.
const ALL_STATUSES: [PayoutStatus; 5] =
    [PayoutStatus::Planned, PayoutStatus::Sent, PayoutStatus::Paid, PayoutStatus::Failed, PayoutStatus::Reversed];

/// Why a webhook was not applied.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook signature does not verify: rejected, nothing applied")]
    BadSignature,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Verifies a provider webhook's signature with the configured secret and
/// applies its payout updates to the store. A redelivered webhook changes
/// nothing the second time.
pub fn apply_webhook(
    rules: Rules,
    data: &Path,
    provider: &str,
    body: &[u8],
    signature: &str,
) -> Result<Report, WebhookError> {
    let secret_var = match provider {
        "razorpayx" => rules
            .payouts()
            .razorpayx
            .as_ref()
            .and_then(|r| r.webhook_secret_env.clone())
            .context("no payouts.razorpayx.webhook_secret_env in the config")?,
        other => return Err(anyhow::anyhow!("webhooks from {other:?} are not supported (razorpayx)").into()),
    };
    let secret = secret(&secret_var, "payouts.razorpayx.webhook_secret_env")?;
    if !verify_webhook_signature(body, signature, &secret) {
        return Err(WebhookError::BadSignature);
    }
    Ok(apply_verified_webhook(rules, data, provider, body)?)
}

fn apply_verified_webhook(rules: Rules, data: &Path, provider: &str, body: &[u8]) -> anyhow::Result<Report> {
    let (mut engine, store_now) = crate::review::load_state(data, rules.clone())?;
    let mut report = Report::default();
    let updates = match provider {
        "razorpayx" => razorpayx::webhook_updates(body)?,
        other => bail!("webhooks from {other:?} are not supported (razorpayx)"),
    };
    let mut now = DateTime::UNIX_EPOCH;
    for (program_id, batch_id, partner_id, answer) in updates {
        now = now.max(store_now.of(&engine, &program_id));
        let found = send_items(&rules, &engine, &program_id, Some(&batch_id), &ALL_STATUSES)?
            .into_iter()
            .find(|(i, _)| i.partner_id == partner_id);
        let Some((item, state)) = found else {
            bail!("webhook for an unknown payout item: program {program_id}, batch {batch_id}, partner {partner_id}");
        };
        record(&mut engine, now, &item, state.state.status, answer, &mut report)?;
    }
    save(data, &mut engine, now, store_now, "webhook")?;
    Ok(report)
}
