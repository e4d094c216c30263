//! Balances and payout items: the engine side of the approvals queue.
//!
//! Per (program, partner) the engine keeps what was paid, what is in flight
//! (planned or sent) and the approved net of the partner's closed orders.
//! The available balance at a time is the approved net of its lines (open
//! and closed) minus paid minus in flight: a payout may never take more,
//! so nobody is paid twice for a line, and a refund after payment leaves the
//! balance negative (a clawback netted from the next payout).

use std::sync::Arc;

use afflio_rules::Program;
use chrono::{DateTime, Utc};
use hashbrown::HashMap;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::validate::{reject, Reject};
use super::Engine;
use crate::event::{Event, PayoutEvent, PayoutStatus};
use crate::output::{Balance, PayoutRow, Reason};
use crate::state::LineStatus;

/// One partner's payout state in one program.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct PartnerBalance {
    pub(crate) paid: Decimal,
    pub(crate) in_flight: Decimal,
    /// Approved (or paid) net of the partner's orders closed by retention.
    pub(crate) closed_approved: Decimal,
    /// batch id -> item. Bounded by the batches planned.
    pub(crate) items: HashMap<Box<str>, ItemState>,
}

/// A payout item as the engine knows it: its identity with the provider
/// (fixed when planned) and where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemState {
    pub amount: Decimal,
    pub tds: Decimal,
    pub status: PayoutStatus,
    pub provider_ref: Option<Box<str>>,
    pub provider: Option<Box<str>>,
    pub idempotency_key: Option<Box<str>>,
    pub provider_batch: Option<Box<str>>,
    pub destination: Option<Box<str>>,
    /// Event time of the last state change.
    pub updated: DateTime<Utc>,
    /// Requests sent to the provider so far (records with `attempted_at`).
    pub attempts: u32,
    /// When the first request was sent (wall clock): the provider's
    /// idempotency window counts from it.
    pub first_attempt: Option<DateTime<Utc>>,
    /// The last detail recorded (the provider's reason, or why the outcome
    /// is not known).
    pub detail: Option<Box<str>>,
}

/// A payout item with where it belongs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayoutItem {
    pub program_id: String,
    pub partner_id: String,
    pub batch_id: String,
    pub state: ItemState,
}

impl Engine {
    /// The approved (or paid) net and the pending net of a partner's open
    /// lines as of `at`.
    fn open_nets(&self, prog: u32, partner_id: &str, at: DateTime<Utc>) -> (Decimal, Decimal) {
        let (mut approved, mut pending) = (Decimal::ZERO, Decimal::ZERO);
        for seq in self.orders.of_partner(prog, partner_id) {
            let Some(o) = self.orders.get(seq) else { continue };
            for l in o.lines.iter().filter(|l| &*l.partner_id == partner_id) {
                match self.line_status(o, l, at) {
                    LineStatus::Approved | LineStatus::Paid => approved += l.net,
                    LineStatus::Pending => pending += l.net,
                    LineStatus::Rejected => {}
                }
            }
        }
        (approved, pending)
    }

    /// One partner's balance in a program as of `at`.
    pub(super) fn partner_balance(&self, prog: u32, program: &Program, partner_id: &str, at: DateTime<Utc>) -> Balance {
        let (approved, pending) = self.open_nets(prog, partner_id, at);
        let pb = self.names.get(partner_id).and_then(|p| self.balances.get(&(prog, p)));
        let (paid, in_flight, closed) =
            pb.map_or((Decimal::ZERO, Decimal::ZERO, Decimal::ZERO), |b| (b.paid, b.in_flight, b.closed_approved));
        Balance {
            program_id: self.names.name(prog).clone(),
            partner_id: Arc::from(partner_id),
            currency: program.currency,
            pending,
            available: approved + closed - paid - in_flight,
            in_flight,
            paid,
        }
    }

    /// Every partner's balance in `program_id` as of `at` (partners with
    /// lines or payouts), sorted by partner.
    pub fn balances(&self, program_id: &str, at: DateTime<Utc>) -> Vec<Balance> {
        let Some(program) = self.rules.program(program_id) else { return Vec::new() };
        let Some(prog) = self.names.get(program_id) else { return Vec::new() };
        let mut partners: std::collections::BTreeSet<Arc<str>> = std::collections::BTreeSet::new();
        for o in self.orders.iter().filter(|o| *o.program_id == *program_id) {
            for l in &o.lines {
                partners.insert(l.partner_id.clone());
            }
        }
        for ((p, partner), _) in self.balances.iter() {
            if *p == prog {
                partners.insert(self.names.name(*partner).clone());
            }
        }
        partners.into_iter().map(|partner| self.partner_balance(prog, program, &partner, at)).collect()
    }

    /// The payout items of a program, by partner then batch.
    pub fn payout_items(&self, program_id: &str) -> Vec<PayoutItem> {
        let Some(prog) = self.names.get(program_id) else { return Vec::new() };
        let mut v: Vec<PayoutItem> = self
            .balances
            .iter()
            .filter(|((p, _), _)| *p == prog)
            .flat_map(|((_, partner), pb)| {
                let partner = self.names.name(*partner).to_string();
                pb.items.iter().map(move |(batch, s)| PayoutItem {
                    program_id: program_id.to_string(),
                    partner_id: partner.clone(),
                    batch_id: batch.to_string(),
                    state: s.clone(),
                })
            })
            .collect();
        v.sort_by(|a, b| (&a.partner_id, &a.batch_id).cmp(&(&b.partner_id, &b.batch_id)));
        v
    }

    /// Every payout item of every program that `keep` selects, by program,
    /// partner and batch (for webhooks, which name an item by its provider
    /// identity only).
    pub fn find_payout_items(&self, keep: impl Fn(&ItemState) -> bool) -> Vec<PayoutItem> {
        let mut v: Vec<PayoutItem> = self
            .balances
            .iter()
            .flat_map(|((prog, partner), pb)| {
                pb.items.iter().filter(|(_, s)| keep(s)).map(move |(batch, s)| PayoutItem {
                    program_id: self.names.name(*prog).to_string(),
                    partner_id: self.names.name(*partner).to_string(),
                    batch_id: batch.to_string(),
                    state: s.clone(),
                })
            })
            .collect();
        v.sort_by(|a, b| (&a.program_id, &a.partner_id, &a.batch_id).cmp(&(&b.program_id, &b.partner_id, &b.batch_id)));
        v
    }

    /// Adds a closed order's approved lines to its partners' balances.
    pub(super) fn close_into_balances(&mut self, prog: u32, order: &crate::state::Order, statuses: &[LineStatus]) {
        for (l, s) in order.lines.iter().zip(statuses) {
            if matches!(s, LineStatus::Approved | LineStatus::Paid) && !l.net.is_zero() {
                let partner = self.names.intern(&l.partner_id);
                self.balances.get_or_default((prog, partner)).closed_approved += l.net;
            }
        }
    }

    pub(super) fn apply_payout(
        &mut self,
        e: &Event<'_>,
        p: &PayoutEvent<'_>,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        let invalid = |field: &'static str, detail: String| reject(Reason::InvalidPayout, field, detail);
        if p.currency != program.currency.code() {
            return Err(reject(
                Reason::CurrencyMismatch,
                "currency",
                format!("currency {:?} is not program {:?}'s {}", p.currency, program.id, program.currency.code()),
            ));
        }
        if p.amount <= Decimal::ZERO || p.tds < Decimal::ZERO || p.tds > p.amount {
            return Err(reject(
                Reason::InvalidAmount,
                "amount",
                format!("amount {} must be positive and tds {} between 0 and the amount", p.amount, p.tds),
            ));
        }
        if self.find_partner(&self.rules, &p.partner_id).is_none_or(|x| x.program_id != program.id) {
            return Err(invalid(
                "partner_id",
                format!("partner_id {:?} is no partner of program {:?}", p.partner_id, program.id),
            ));
        }
        let partner = self.names.intern(&p.partner_id);
        let item = self.balances.get(&(prog, partner)).and_then(|b| b.items.get(p.batch_id.as_ref())).cloned();
        let what = || format!("payout of {} to {} in batch {}", p.amount, p.partner_id, p.batch_id);
        match (&item, p.status) {
            (None, PayoutStatus::Planned) => {
                for (field, v) in [("idempotency_key", &p.idempotency_key), ("destination", &p.destination)] {
                    if v.as_deref().is_none_or(str::is_empty) {
                        return Err(invalid(field, format!("{} is planned without its {field}", what())));
                    }
                }
                let available = self.partner_balance(prog, program, &p.partner_id, e.ts).available;
                if p.amount > available {
                    return Err(invalid(
                        "amount",
                        format!(
                            "{} exceeds the approved balance available as of {}: {available}",
                            what(),
                            e.ts.to_rfc3339()
                        ),
                    ));
                }
            }
            (None, s) => {
                return Err(invalid("batch_id", format!("{} is {} but was never planned", what(), s.as_str())))
            }
            (Some(i), _) if i.amount != p.amount => {
                return Err(invalid("amount", format!("{} does not match the planned amount {}", what(), i.amount)))
            }
            (Some(i), to) => {
                // What was fixed when planned cannot change.
                let fixed = [
                    ("idempotency_key", &i.idempotency_key, &p.idempotency_key),
                    ("provider_batch", &i.provider_batch, &p.provider_batch),
                    ("destination", &i.destination, &p.destination),
                ];
                for (field, was, now) in fixed {
                    if let Some(now) = now.as_deref() {
                        if was.as_deref() != Some(now) {
                            return Err(invalid(field, format!("{} changes its {field}, fixed when planned", what())));
                        }
                    }
                }
                use PayoutStatus::*;
                let ok = matches!(
                    (i.status, to),
                    (Planned, Sent | Unknown | Paid | Failed)
                        | (Unknown, Sent | Unknown | Paid | Failed | Reversed)
                        | (Sent, Paid | Failed | Reversed)
                        | (Paid | Failed, Reversed)
                );
                if p.attempted_at.is_some() && to != Unknown {
                    return Err(invalid(
                        "attempted_at",
                        format!("{} records an attempt with status {} (attempts are `unknown`)", what(), to.as_str()),
                    ));
                }
                if !ok {
                    return Err(invalid(
                        "status",
                        format!("{} cannot go from {} to {}", what(), i.status.as_str(), to.as_str()),
                    ));
                }
            }
        }
        // Validated: apply.
        let from = item.as_ref().map(|i| i.status);
        let pb = self.balances.get_or_default((prog, partner));
        use PayoutStatus::*;
        match (from, p.status) {
            (None, Planned) => pb.in_flight += p.amount,
            (Some(Planned | Sent | Unknown), Paid) => {
                pb.in_flight -= p.amount;
                pb.paid += p.amount;
            }
            (Some(Planned | Sent | Unknown), Failed) => pb.in_flight -= p.amount,
            (Some(Paid), Reversed) => pb.paid -= p.amount,
            (Some(Sent | Unknown), Reversed) => pb.in_flight -= p.amount,
            // Failed -> reversed: the money had already come back.
            _ => {}
        }
        assert!(
            pb.in_flight >= Decimal::ZERO && pb.paid >= Decimal::ZERO,
            "internal error: payout balances below zero (in flight {}, paid {})",
            pb.in_flight,
            pb.paid
        );
        let boxed = |v: &Option<std::borrow::Cow<'_, str>>| v.as_deref().map(Box::from);
        let state = match item {
            None => ItemState {
                amount: p.amount,
                tds: p.tds,
                status: p.status,
                provider_ref: boxed(&p.provider_ref),
                provider: boxed(&p.provider),
                idempotency_key: boxed(&p.idempotency_key),
                provider_batch: boxed(&p.provider_batch),
                destination: boxed(&p.destination),
                updated: e.ts,
                attempts: 0,
                first_attempt: None,
                detail: boxed(&p.detail),
            },
            Some(i) => ItemState {
                status: p.status,
                provider_ref: boxed(&p.provider_ref).or(i.provider_ref.clone()),
                updated: e.ts,
                attempts: i.attempts + u32::from(p.attempted_at.is_some()),
                first_attempt: i.first_attempt.or(p.attempted_at),
                detail: boxed(&p.detail).or(i.detail.clone()),
                ..i
            },
        };
        // Every row of the item carries its fixed identity, whatever the event repeated.
        let text = |v: &Option<Box<str>>| v.as_deref().map(str::to_string);
        let (provider, provider_ref) = (text(&state.provider), text(&state.provider_ref));
        let (idempotency_key, provider_batch, destination) =
            (text(&state.idempotency_key), text(&state.provider_batch), text(&state.destination));
        pb.items.insert(p.batch_id.as_ref().into(), state);
        if matches!(p.status, PayoutStatus::Paid | PayoutStatus::Reversed) {
            self.mark_paid(prog, partner, &p.partner_id, e.ts);
        }
        self.note_balance_changed(prog, partner);
        self.meta.stats.applied_payouts += 1;
        self.out.payouts.push(PayoutRow {
            event_id: e.event_id.to_string(),
            ts: e.ts,
            program_id: self.names.name(prog).clone(),
            batch_id: p.batch_id.to_string(),
            partner_id: p.partner_id.to_string(),
            currency: p.currency.to_string(),
            amount: p.amount,
            tds: p.tds,
            status: p.status,
            provider,
            provider_ref,
            detail: p.detail.as_deref().map(str::to_string),
            idempotency_key,
            provider_batch,
            destination,
            attempted_at: p.attempted_at,
        });
        Ok(())
    }

    /// Marks the partner's approved lines paid, oldest eligible first, as
    /// far as its paid total (beyond closed orders) covers them whole.
    fn mark_paid(&mut self, prog: u32, partner: u32, partner_id: &str, at: DateTime<Utc>) {
        let pb = self.balances.get(&(prog, partner));
        let mut cover = pb.map_or(Decimal::ZERO, |b| b.paid - b.closed_approved);
        let mut lines: Vec<(DateTime<Utc>, Box<str>, u64, usize)> = Vec::new();
        for seq in self.orders.of_partner(prog, partner_id) {
            let Some(o) = self.orders.get(seq) else { continue };
            for (li, l) in o.lines.iter().enumerate().filter(|(_, l)| &*l.partner_id == partner_id) {
                let s = self.line_status(o, l, at);
                if matches!(s, LineStatus::Approved | LineStatus::Paid) {
                    lines.push((o.eligible_at, o.order_id.clone(), seq, li));
                }
            }
        }
        lines.sort_by(|a, b| (a.0, &a.1, a.3).cmp(&(b.0, &b.1, b.3)));
        let mut covering = true;
        for (_, _, seq, li) in lines {
            let net = self.orders.get(seq).expect("listed above").lines[li].net;
            let paid = covering && net <= cover;
            if paid {
                cover -= net;
            } else {
                covering = false;
            }
            if self.orders.get(seq).expect("listed above").lines[li].paid != paid {
                self.orders.get_mut(seq).expect("listed above").lines[li].paid = paid;
                self.orders.touch_for_store(seq);
            }
        }
    }
}
