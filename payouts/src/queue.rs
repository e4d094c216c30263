//! The approvals queue: plan a batch from approved balances, send it, ask
//! the providers where it stands, take their webhooks, and let a person
//! settle what no provider can answer.
//!
//! The protocol that keeps a partner from being paid twice:
//! - **Identity fixed at plan.** Each planned item records its idempotency
//!   key, its request group (PayPal `sender_batch_id`; chunks numbered at
//!   plan time) and its destination. A request is always rebuilt from that
//!   record, never from the current rules.
//! - **Write ahead.** Before a request leaves, every item in it is recorded
//!   `unknown` with the attempt's wall-clock time. A `planned` item was
//!   therefore never sent; an `unknown` one may have been.
//! - **Unknown is looked up, not re-sent.** A timeout, 5xx, 429 or conflict
//!   leaves the item `unknown`. Resolving it asks the provider first (by
//!   provider id, or RazorpayX by `reference_id`). Only an item the provider
//!   does not have is sent again — with the same key and body, and only
//!   within the provider's idempotency window. After the window, an item
//!   RazorpayX does not have fails (it was never made); a PayPal item with
//!   no batch id stays `unknown` for a person to settle.
//! - **Only a definite refusal returns money**: a validation error on a
//!   first request, or a provider status of failed / rejected / denied /
//!   returned / reversed.
//!
//! The queue reads and records through a [`Book`]: the replayed store
//! offline, the live engine through the event stream in the service.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use afflio_engine::rules::{PayoutProvider, Rules};
use afflio_engine::{Engine, PayoutItem, PayoutStatus};
use chrono::{DateTime, Utc};
use http::HeaderMap;
use rust_decimal::Decimal;
use serde_json::json;

use crate::provider::{HttpSettings, Provider};
use crate::request::{group_id, item_key, provider_name, Answer, Planned, Request, Target, Webhook, WebhookError};
use crate::{paypal, razorpayx};

/// Why a [`Book`] could not read or record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookError {
    /// External: the store, the broker or the engine is not reachable now.
    #[error("the ledger is unavailable: {0}")]
    Unavailable(String),
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Where the queue reads payout state and records its changes.
pub trait Book: Send {
    /// Runs `f` on the engine with every change recorded so far applied.
    fn read<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&Engine) -> R + Send + 'static,
    ) -> impl Future<Output = Result<R, BookError>> + Send;

    /// Records `payout` events (JSON texts) durably, in order, and applies
    /// them. Returns once they are applied (a refused one is kept with its
    /// reason, like any rejected event; the queue reads back what happened).
    fn record(&mut self, events: Vec<String>) -> impl Future<Output = Result<(), BookError>> + Send;

    /// The event time of records about `program_id` now.
    fn event_time(&mut self, program_id: String) -> impl Future<Output = Result<DateTime<Utc>, BookError>> + Send;
}

/// Why a queue operation stopped. Who is at fault is in the variant.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The configuration's (or the request's: an unknown program).
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Book(#[from] BookError),
    /// The request's: what it asks for cannot be done.
    #[error("{0}")]
    Refused(String),
}

/// A planned item, for reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PlannedItem {
    pub partner_id: String,
    pub provider: &'static str,
    pub amount: Decimal,
    pub tds: Decimal,
    pub group: String,
}

/// What `plan` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub batch_id: String,
    pub items: Vec<PlannedItem>,
    /// Partners with an approved balance that cannot be paid now, and why.
    pub skipped: Vec<(String, String)>,
}

/// What a send, sync, webhook or resolution did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Requests made (groups sent, first time or again).
    pub requests: usize,
    pub sent: usize,
    pub paid: usize,
    pub failed: usize,
    pub reversed: usize,
    /// Items whose outcome is not known yet: (partner, why). Looked up on
    /// the next send or sync.
    pub unknown: Vec<(String, String)>,
    /// Items no provider can answer for: a person must look and settle them
    /// (`afflio payouts resolve`).
    pub needs_person: Vec<(String, String)>,
    /// Groups not handled (e.g. their provider is not configured).
    pub skipped: Vec<(String, String)>,
    /// Provider notices (RazorpayX downtime).
    pub notices: Vec<String>,
    /// Webhook events acknowledged without effect (not ours, or no change).
    pub ignored: Vec<String>,
}

impl Report {
    fn count(&mut self, status: PayoutStatus) {
        match status {
            PayoutStatus::Sent => self.sent += 1,
            PayoutStatus::Paid => self.paid += 1,
            PayoutStatus::Failed => self.failed += 1,
            PayoutStatus::Reversed => self.reversed += 1,
            PayoutStatus::Planned | PayoutStatus::Unknown => {}
        }
    }
}

/// Whether the provider's answer moves an item (the engine's rules; a
/// stale or repeated answer does not).
fn moves(from: PayoutStatus, to: PayoutStatus) -> bool {
    use PayoutStatus::*;
    matches!(
        (from, to),
        (Planned, Sent | Paid | Failed)
            | (Unknown, Sent | Paid | Failed | Reversed)
            | (Sent, Paid | Failed | Reversed)
            | (Paid, Reversed)
    )
}

/// A payout event's text.
struct Change<'a> {
    item: &'a PayoutItem,
    status: PayoutStatus,
    provider_ref: Option<&'a str>,
    detail: Option<&'a str>,
    attempted_at: Option<DateTime<Utc>>,
    /// What makes the id unique among this item's records of this status.
    suffix: Option<String>,
}

/// Request groups whose attempts are recorded together (a bound on what
/// one record holds, and on what a crash leaves to be looked up).
const RECORD_GROUPS: usize = 500;

/// Items by request group.
type Groups = BTreeMap<(String, String), Vec<PayoutItem>>;

/// The queue, with its rules and providers.
pub struct Queue {
    rules: Arc<Rules>,
    providers: BTreeMap<&'static str, Arc<dyn Provider>>,
    /// Items per PayPal request group (PayPal's limit; smaller in tests).
    paypal_group: usize,
}

impl Queue {
    /// A queue over the given providers.
    pub fn new(rules: Arc<Rules>, providers: Vec<Arc<dyn Provider>>) -> Queue {
        let providers = providers.into_iter().map(|p| (p.name(), p)).collect();
        Queue { rules, providers, paypal_group: paypal::MAX_BATCH_ITEMS }
    }

    /// A queue over the providers the rules configure, with credentials
    /// from the environment.
    pub fn from_env(rules: Arc<Rules>, http: HttpSettings) -> Result<Queue, String> {
        let p = rules.payouts();
        let mut v: Vec<Arc<dyn Provider>> = Vec::new();
        if let Some(r) = &p.razorpayx {
            v.push(Arc::new(razorpayx::Razorpayx::from_env(r.clone(), http.clone())?));
        }
        if let Some(pp) = &p.paypal {
            v.push(Arc::new(paypal::Paypal::from_env(pp.clone(), http)?));
        }
        Ok(Queue::new(rules, v))
    }

    /// Items per PayPal request group (at most PayPal's 15,000).
    pub fn with_paypal_group(mut self, n: usize) -> Queue {
        self.paypal_group = n.clamp(1, paypal::MAX_BATCH_ITEMS);
        self
    }

    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    fn currency(&self, program_id: &str) -> Result<String, QueueError> {
        self.rules
            .program(program_id)
            .map(|p| p.currency.code().to_string())
            .ok_or_else(|| QueueError::Config(format!("no program {program_id:?} in the config")))
    }

    fn event(&self, c: Change<'_>, ts: DateTime<Utc>) -> Result<String, QueueError> {
        let it = c.item;
        let key = it.state.idempotency_key.as_deref().unwrap_or_default();
        let mut id = format!("afflio:payout:{key}:{}", c.status.as_str());
        if let Some(s) = &c.suffix {
            id.push(':');
            id.push_str(s);
        }
        let ts = ts.max(it.state.updated);
        let mut ev = json!({
            "type": "payout",
            "event_id": id,
            "ts": ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "program_id": it.program_id,
            "batch_id": it.batch_id,
            "partner_id": it.partner_id,
            "currency": self.currency(&it.program_id)?,
            "amount": it.state.amount.to_string(),
            "tds": it.state.tds.to_string(),
            "status": c.status.as_str(),
        });
        for (k, v) in
            [("provider", it.state.provider.as_deref()), ("provider_ref", c.provider_ref), ("detail", c.detail)]
        {
            if let Some(v) = v {
                ev[k] = json!(v);
            }
        }
        if let Some(t) = c.attempted_at {
            ev["attempted_at"] = json!(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
        }
        Ok(ev.to_string())
    }

    fn provider(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }

    /// Builds a batch for `program_id` from the approved balances as of `at`
    /// (default: the book's time): every partner with a payout destination,
    /// at least `min_payout` available and an amount its provider accepts.
    /// Each item's identity is fixed here. Nothing is sent.
    pub async fn plan<B: Book>(
        &self,
        book: &mut B,
        program_id: &str,
        at: Option<DateTime<Utc>>,
    ) -> Result<Plan, QueueError> {
        let program = self
            .rules
            .program(program_id)
            .ok_or_else(|| QueueError::Config(format!("no program {program_id:?} in the config")))?
            .clone();
        let at = match at {
            Some(t) => t,
            None => book.event_time(program_id.to_string()).await?,
        };
        let batch_id = format!("{program_id}-{}", at.format("%Y%m%dT%H%M%SZ"));
        let pid = program_id.to_string();
        // Destinations with the balances: a marketplace partner's lives in the registry.
        let (balances, destinations) = book
            .read(move |e| {
                let b = e.balances(&pid, at);
                let d: Vec<_> = b.iter().map(|x| e.partner_payout(&x.partner_id)).collect();
                (b, d)
            })
            .await?;
        let mut plan = Plan { batch_id: batch_id.clone(), ..Plan::default() };
        let mut planned: BTreeMap<&'static str, Vec<(String, Planned)>> = BTreeMap::new();
        for (b, dest) in balances.into_iter().zip(destinations) {
            let partner = b.partner_id.to_string();
            let skip = |plan: &mut Plan, why: String| plan.skipped.push((partner.clone(), why));
            if b.available <= Decimal::ZERO {
                if b.available < Decimal::ZERO {
                    skip(&mut plan, format!("clawback of {} to net first", -b.available));
                }
                continue;
            }
            if b.available < program.min_payout {
                skip(&mut plan, format!("{} is under the minimum payout {}", b.available, program.min_payout));
                continue;
            }
            let Some(dest) = dest else {
                skip(&mut plan, "no payout destination configured".into());
                continue;
            };
            let decided = match dest.provider {
                PayoutProvider::Razorpayx => match &self.rules.payouts().razorpayx {
                    Some(s) => razorpayx::plan(s, program.currency, b.available, &partner, &dest),
                    None => Err("no [payouts.razorpayx] in the config".into()),
                },
                PayoutProvider::Paypal => match &self.rules.payouts().paypal {
                    Some(_) => paypal::plan(program.currency, b.available, &partner, &dest),
                    None => Err("no [payouts.paypal] in the config".into()),
                },
            };
            match decided {
                Ok(p) if p.amount > b.available => {
                    skip(&mut plan, format!("internal error: planned {} over the available {}", p.amount, b.available))
                }
                Ok(p) if p.amount < program.min_payout => {
                    skip(&mut plan, format!("{} is under the minimum payout {}", p.amount, program.min_payout))
                }
                Ok(p) => planned.entry(provider_name(dest.provider)).or_default().push((partner, p)),
                Err(why) => skip(&mut plan, why),
            }
        }
        let mut events = Vec::new();
        let mut keys = Vec::new();
        for (provider, items) in &planned {
            for (n, (partner, p)) in items.iter().enumerate() {
                let key = item_key(program_id, &batch_id, partner);
                keys.push(key.clone());
                let group = match *provider {
                    "paypal" => Some(group_id(program_id, &batch_id, provider, n / self.paypal_group)),
                    _ => None,
                };
                let mut ev = json!({
                    "type": "payout",
                    "event_id": format!("afflio:payout:{key}:planned"),
                    "ts": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    "program_id": program_id,
                    "batch_id": batch_id,
                    "partner_id": partner,
                    "currency": program.currency.code(),
                    "amount": p.amount.to_string(),
                    "tds": p.tds.to_string(),
                    "status": "planned",
                    "provider": provider,
                    "idempotency_key": key,
                    "destination": p.destination.recorded(),
                });
                if let Some(g) = &group {
                    ev["provider_batch"] = json!(g);
                }
                events.push(ev.to_string());
            }
        }
        book.record(events).await?;
        let (pid, bid) = (program_id.to_string(), batch_id.clone());
        let items = book.read(move |e| e.payout_items(&pid)).await?;
        // What this plan recorded (an item planned before is not planned again).
        let recorded = |i: &PayoutItem| {
            i.batch_id == bid
                && i.state.status == PayoutStatus::Planned
                && i.state.idempotency_key.as_deref().is_some_and(|k| keys.iter().any(|x| x == k))
        };
        for it in items.into_iter().filter(recorded) {
            plan.items.push(PlannedItem {
                provider: match it.state.provider.as_deref() {
                    Some("paypal") => "paypal",
                    _ => "razorpayx",
                },
                group: it.state.provider_batch.as_deref().or(it.state.idempotency_key.as_deref()).unwrap_or("").into(),
                partner_id: it.partner_id,
                amount: it.state.amount,
                tds: it.state.tds,
            });
        }
        Ok(plan)
    }

    async fn groups<B: Book>(&self, book: &mut B, program_id: &str) -> Result<Groups, QueueError> {
        self.currency(program_id)?;
        let pid = program_id.to_string();
        let items = book.read(move |e| e.payout_items(&pid)).await?;
        Ok(group(items))
    }

    /// Sends the planned items of `batch` (of every batch without one), one
    /// request group at a time, and resolves the batch's items whose
    /// outcome is unknown. Safe to run again at any time.
    pub async fn send<B: Book>(
        &self,
        book: &mut B,
        program_id: &str,
        batch: Option<&str>,
        wall: DateTime<Utc>,
    ) -> Result<Report, QueueError> {
        let mut report = Report::default();
        let mut fresh = Vec::new();
        let mut open = Vec::new();
        for ((provider, group), items) in self.groups(book, program_id).await? {
            if batch.is_some_and(|b| items.iter().all(|i| i.batch_id != b)) {
                continue;
            }
            let Some(p) = self.provider(&provider).cloned() else {
                report.skipped.push((group, format!("no [payouts.{provider}] provider configured")));
                continue;
            };
            if items.iter().all(|i| i.state.status == PayoutStatus::Planned) {
                fresh.push((p, items));
            } else if items.iter().any(|i| matches!(i.state.status, PayoutStatus::Planned | PayoutStatus::Unknown)) {
                open.push((p, items));
            }
        }
        // Groups never sent go first, their attempts recorded together.
        for chunk in fresh.chunks(RECORD_GROUPS) {
            self.attempt_many(book, chunk.to_vec(), true, wall, &mut report).await?;
        }
        for (p, items) in open {
            self.resolve(book, &*p, items, wall, &mut report).await?;
        }
        Ok(report)
    }

    /// Asks the providers where items stand: unknown ones are resolved,
    /// sent ones (and ones paid in the last 30 days, for reversals) read.
    pub async fn sync<B: Book>(
        &self,
        book: &mut B,
        program_id: &str,
        wall: DateTime<Utc>,
    ) -> Result<Report, QueueError> {
        let mut report = Report::default();
        let now = book.event_time(program_id.to_string()).await?;
        for ((provider, group), items) in self.groups(book, program_id).await? {
            let Some(p) = self.provider(&provider).cloned() else {
                report.skipped.push((group, format!("no [payouts.{provider}] provider configured")));
                continue;
            };
            let status = |s: PayoutStatus| items.iter().any(|i| i.state.status == s);
            if status(PayoutStatus::Unknown) {
                self.resolve(book, &*p, items, wall, &mut report).await?;
            } else if status(PayoutStatus::Planned) {
                report.skipped.push((group, "planned, not sent: run send".into()));
            } else if status(PayoutStatus::Sent)
                || items
                    .iter()
                    .any(|i| i.state.status == PayoutStatus::Paid && now - i.state.updated < chrono::Duration::days(30))
            {
                let reqs = self.requests(&items)?;
                let answers = p.lookup(&reqs).await;
                self.apply(book, &items, &answers, &mut report).await?;
            }
        }
        Ok(report)
    }

    fn requests(&self, items: &[PayoutItem]) -> Result<Vec<Request>, QueueError> {
        items.iter().map(|i| Request::of(i, &self.currency(&i.program_id)?).map_err(QueueError::Refused)).collect()
    }

    /// Records the write-ahead attempt for the group's open items, sends the
    /// group as recorded and records the answers.
    async fn attempt<B: Book>(
        &self,
        book: &mut B,
        provider: &dyn Provider,
        items: Vec<PayoutItem>,
        first: bool,
        wall: DateTime<Utc>,
        report: &mut Report,
    ) -> Result<(), QueueError> {
        let p = self
            .provider(provider.name())
            .cloned()
            .ok_or_else(|| QueueError::Config(format!("no [payouts.{}] provider configured", provider.name())))?;
        self.attempt_many(book, vec![(p, items)], first, wall, report).await
    }

    /// [`Queue::attempt`] for many groups of one program: their attempts are
    /// recorded at once before any request leaves, their answers at once
    /// after the last (an attempt whose answer is never recorded is looked
    /// up: it stays `unknown`).
    async fn attempt_many<B: Book>(
        &self,
        book: &mut B,
        groups: Vec<(Arc<dyn Provider>, Vec<PayoutItem>)>,
        first: bool,
        wall: DateTime<Utc>,
        report: &mut Report,
    ) -> Result<(), QueueError> {
        let open = |i: &PayoutItem| matches!(i.state.status, PayoutStatus::Planned | PayoutStatus::Unknown);
        let Some(program_id) = groups.first().map(|(_, items)| items[0].program_id.clone()) else { return Ok(()) };
        let ts = book.event_time(program_id.to_string()).await?;
        let mut intents = Vec::new();
        let mut want = Vec::new();
        for (provider, items) in &groups {
            for it in items.iter().filter(|i| open(i)) {
                let n = it.state.attempts + 1;
                let detail = format!("attempt {n}: sending to {}", provider.name());
                intents.push(self.event(
                    Change {
                        item: it,
                        status: PayoutStatus::Unknown,
                        provider_ref: None,
                        detail: Some(&detail),
                        attempted_at: Some(wall),
                        suffix: Some(format!("attempt{n}")),
                    },
                    ts,
                )?);
                want.push((it.state.idempotency_key.clone(), n));
            }
        }
        book.record(intents).await?;
        // Read back: only what is now recorded as this attempt is sent.
        let pid = program_id.clone();
        let now_items = book.read(move |e| e.payout_items(&pid)).await?;
        let mut events = Vec::new();
        let ts = book.event_time(program_id.to_string()).await?;
        for (provider, items) in groups {
            let keys: Vec<Option<Box<str>>> = items.iter().map(|i| i.state.idempotency_key.clone()).collect();
            let mut current: Vec<PayoutItem> =
                now_items.iter().filter(|i| keys.contains(&i.state.idempotency_key)).cloned().collect();
            current.sort_by(|a, b| a.partner_id.cmp(&b.partner_id));
            let recorded = want.iter().filter(|(k, _)| keys.contains(k)).all(|(key, n)| {
                current.iter().any(|i| {
                    i.state.idempotency_key == *key && i.state.status == PayoutStatus::Unknown && i.state.attempts == *n
                })
            });
            if !recorded || current.len() != items.len() {
                let group = items[0].state.provider_batch.as_deref().or(items[0].state.idempotency_key.as_deref());
                report.skipped.push((
                    group.unwrap_or("?").to_string(),
                    "the attempt could not be recorded (changed meanwhile): nothing sent".into(),
                ));
                continue;
            }
            let reqs = self.requests(&current)?;
            report.requests += 1;
            let answers = provider.create(&reqs, first).await;
            for (it, a) in current.iter().zip(&answers) {
                if let Some(ev) = self.change_for(it, a, ts, report)? {
                    events.push(ev);
                }
            }
        }
        book.record(events).await?;
        Ok(())
    }

    /// Asks the provider about a group with open items; sends again what it
    /// does not have (same key, same body) within its window; after it,
    /// fails what is definitely not there and leaves the rest to a person.
    async fn resolve<B: Book>(
        &self,
        book: &mut B,
        provider: &dyn Provider,
        items: Vec<PayoutItem>,
        wall: DateTime<Utc>,
        report: &mut Report,
    ) -> Result<(), QueueError> {
        let reqs = self.requests(&items)?;
        let answers = provider.lookup(&reqs).await;
        let missing: Vec<&PayoutItem> = items
            .iter()
            .zip(&answers)
            .filter(|(i, a)| {
                **a == Answer::NotFound && matches!(i.state.status, PayoutStatus::Planned | PayoutStatus::Unknown)
            })
            .map(|(i, _)| i)
            .collect();
        let found: Vec<Answer> = answers
            .iter()
            .map(|a| if *a == Answer::NotFound { Answer::Unknown(String::new()) } else { a.clone() })
            .collect();
        // What the provider has is recorded first.
        if missing.is_empty() {
            return self.apply(book, &items, &found, report).await;
        }
        let within = missing.iter().all(|i| i.state.first_attempt.is_none_or(|t| wall - t < provider.key_window()));
        if within {
            // Never made, or still in flight: the same request again is safe.
            return self.attempt(book, provider, items, false, wall, report).await;
        }
        let ts = book.event_time(items[0].program_id.to_string()).await?;
        let mut events = Vec::new();
        for it in &missing {
            let key = it.state.idempotency_key.as_deref().unwrap_or_default();
            if provider.lookup_is_definite() {
                let why = format!(
                    "{} has no payout under key {key} and its idempotency window has passed: it was never made",
                    provider.name()
                );
                events.push(self.event(
                    Change {
                        item: it,
                        status: PayoutStatus::Failed,
                        provider_ref: None,
                        detail: Some(&why),
                        attempted_at: None,
                        suffix: None,
                    },
                    ts,
                )?);
                report.failed += 1;
            } else {
                let group = it.state.provider_batch.as_deref().unwrap_or(key);
                report.needs_person.push((
                    it.partner_id.clone(),
                    format!(
                        "{} cannot be asked about request group {group} after its {}-day window and never gave a batch id: \
                         look it up in the provider's dashboard, then `afflio payouts resolve`",
                        provider.name(),
                        provider.key_window().num_days()
                    ),
                ));
            }
        }
        book.record(events).await?;
        let rest: Vec<(PayoutItem, Answer)> = items
            .iter()
            .zip(found)
            .filter(|(i, _)| !missing.iter().any(|m| m.state.idempotency_key == i.state.idempotency_key))
            .map(|(i, a)| (i.clone(), a))
            .collect();
        let (rest_items, rest_answers): (Vec<_>, Vec<_>) = rest.into_iter().unzip();
        self.apply(book, &rest_items, &rest_answers, report).await
    }

    /// Records what the answers change.
    async fn apply<B: Book>(
        &self,
        book: &mut B,
        items: &[PayoutItem],
        answers: &[Answer],
        report: &mut Report,
    ) -> Result<(), QueueError> {
        let Some(first) = items.first() else { return Ok(()) };
        let ts = book.event_time(first.program_id.to_string()).await?;
        let mut events = Vec::new();
        for (it, a) in items.iter().zip(answers) {
            if let Some(ev) = self.change_for(it, a, ts, report)? {
                events.push(ev);
            }
        }
        book.record(events).await?;
        Ok(())
    }

    /// The record an answer makes for an item, if any.
    fn change_for(
        &self,
        it: &PayoutItem,
        a: &Answer,
        ts: DateTime<Utc>,
        report: &mut Report,
    ) -> Result<Option<String>, QueueError> {
        let from = it.state.status;
        let open = matches!(from, PayoutStatus::Planned | PayoutStatus::Unknown);
        let change = |status, provider_ref, detail, suffix| Change {
            item: it,
            status,
            provider_ref,
            detail,
            attempted_at: None,
            suffix,
        };
        Ok(match a {
            Answer::Status { status, provider_ref, detail } if moves(from, *status) => {
                report.count(*status);
                Some(self.event(change(*status, provider_ref.as_deref(), detail.as_deref(), None), ts)?)
            }
            Answer::Status { .. } => None,
            Answer::Refused(why) if open => {
                report.count(PayoutStatus::Failed);
                Some(self.event(change(PayoutStatus::Failed, None, Some(why), None), ts)?)
            }
            Answer::Unknown(why) if from == PayoutStatus::Unknown && !why.is_empty() => {
                report.unknown.push((it.partner_id.clone(), why.clone()));
                let tag = format!("{}n{:08x}", it.state.attempts, xxhash_rust::xxh3::xxh3_64(why.as_bytes()) as u32);
                Some(self.event(change(PayoutStatus::Unknown, None, Some(why), Some(tag)), ts)?)
            }
            Answer::Unknown(why) if open && !why.is_empty() => {
                report.unknown.push((it.partner_id.clone(), why.clone()));
                None
            }
            _ => None,
        })
    }

    /// Verifies a provider's webhook and records what it reports. Webhooks
    /// about payouts Afflio did not make, repeated ones and ones older than
    /// what is recorded change nothing.
    pub async fn webhook<B: Book>(
        &self,
        book: &mut B,
        provider: &str,
        headers: HeaderMap,
        body: Vec<u8>,
    ) -> Result<Report, WebhookError> {
        let name: &'static str = match provider {
            "razorpayx" => "razorpayx",
            "paypal" => "paypal",
            other => return Err(WebhookError::NotConfigured("?", format!("no payout provider {other:?}"))),
        };
        let Some(p) = self.provider(name).cloned() else {
            return Err(WebhookError::NotConfigured(name, format!("no [payouts.{name}] in the config")));
        };
        let mut report = Report::default();
        match p.webhook(&headers, &body).await? {
            Webhook::Notice(n) => report.notices.push(n),
            Webhook::Ignored(why) => report.ignored.push(why),
            Webhook::Updates(updates) => {
                let unavailable = |e: BookError| WebhookError::Unavailable(e.to_string());
                let mut events = Vec::new();
                for u in updates {
                    let (target, provider) = (u.target.clone(), name.to_string());
                    let items = book.read(move |e| targeted(e, &provider, &target)).await.map_err(unavailable)?;
                    if items.is_empty() {
                        report.ignored.push(format!("{:?}: no such payout item", u.target));
                        continue;
                    }
                    for it in &items {
                        let ts = book.event_time(it.program_id.to_string()).await.map_err(unavailable)?;
                        match self.change_for(it, &u.answer, ts, &mut report) {
                            Ok(Some(ev)) => events.push(ev),
                            Ok(None) => report.ignored.push(format!("{}: no change", it.partner_id)),
                            Err(e) => return Err(WebhookError::Malformed(e.to_string())),
                        }
                    }
                }
                book.record(events).await.map_err(unavailable)?;
            }
        }
        Ok(report)
    }

    /// Settles an item no provider can answer for, on a person's word
    /// (what the provider's dashboard shows): `paid` or `failed`.
    #[allow(clippy::too_many_arguments)] // the item, the verdict and who gave it, all required
    pub async fn resolve_by_hand<B: Book>(
        &self,
        book: &mut B,
        program_id: &str,
        batch_id: &str,
        partner_id: &str,
        status: PayoutStatus,
        by: &str,
        note: &str,
    ) -> Result<Report, QueueError> {
        if !matches!(status, PayoutStatus::Paid | PayoutStatus::Failed) {
            return Err(QueueError::Refused(format!("an item is resolved as paid or failed, not {}", status.as_str())));
        }
        let (pid, bid, part) = (program_id.to_string(), batch_id.to_string(), partner_id.to_string());
        let item = book
            .read(move |e| e.payout_items(&pid).into_iter().find(|i| i.batch_id == bid && i.partner_id == part))
            .await?
            .ok_or_else(|| QueueError::Refused(format!("no payout item for {partner_id} in batch {batch_id}")))?;
        if !matches!(item.state.status, PayoutStatus::Unknown | PayoutStatus::Sent) {
            return Err(QueueError::Refused(format!(
                "the item is {}: only an unknown or sent item is resolved by hand",
                item.state.status.as_str()
            )));
        }
        let mut report = Report::default();
        let detail = format!("resolved by {by}: {note}");
        let ts = book.event_time(program_id.to_string()).await?;
        let ev = self.event(
            Change { item: &item, status, provider_ref: None, detail: Some(&detail), attempted_at: None, suffix: None },
            ts,
        )?;
        book.record(vec![ev]).await?;
        report.count(status);
        Ok(report)
    }
}

/// The items of `provider` a webhook's target names.
fn targeted(e: &Engine, provider: &str, target: &Target) -> Vec<PayoutItem> {
    e.find_payout_items(|s| {
        s.provider.as_deref() == Some(provider)
            && match target {
                Target::Key(k) => s.idempotency_key.as_deref() == Some(k.as_str()),
                Target::Group(g) => s.provider_batch.as_deref() == Some(g.as_str()),
            }
    })
}

/// Items by (provider, request group), each group sorted by partner.
fn group(items: Vec<PayoutItem>) -> Groups {
    let mut g: Groups = BTreeMap::new();
    for it in items {
        let provider = it.state.provider.as_deref().unwrap_or("?").to_string();
        let group = it
            .state
            .provider_batch
            .as_deref()
            .or(it.state.idempotency_key.as_deref())
            .unwrap_or(&it.batch_id)
            .to_string();
        g.entry((provider, group)).or_default().push(it);
    }
    for v in g.values_mut() {
        v.sort_by(|a, b| a.partner_id.cmp(&b.partner_id));
    }
    g
}
