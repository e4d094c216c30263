//! Balances and payout items: the engine side of the approvals queue.
//!
//! Per (program, partner) the engine keeps what was paid, what is in flight
//! (planned or sent) and the approved net of the partner's closed orders.
//! The available balance at a time is the approved net of its lines (open
//! and closed) minus paid minus in flight: a payout may never take more,
//! so nobody is paid twice for a line, and a refund after payment leaves the
//! balance negative (a clawback netted from the next payout).

use hashbrown::HashMap;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{reject, Engine, Reject};
use crate::event::{Event, PayoutEvent, PayoutStatus};
use crate::output::{Balance, PayoutRow, Reason};
use crate::state::LineStatus;
use afflio_rules::Program;
use chrono::{DateTime, Utc};

/// One partner's payout state in one program.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct PartnerBalance {
    pub(crate) paid: Decimal,
    pub(crate) in_flight: Decimal,
    /// Approved (or paid) net of the partner's orders closed by retention.
    pub(crate) closed_approved: Decimal,
    /// batch id -> item. Bounded by the batches planned.
    pub(crate) items: HashMap<Box<str>, ItemState>,
}

/// A payout item as the engine knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemState {
    pub amount: Decimal,
    pub tds: Decimal,
    pub status: PayoutStatus,
    pub provider_ref: Option<Box<str>>,
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
    /// The approved (or paid) net of a partner's open lines as of `at`.
    fn approved_open(&self, program_id: &str, partner_id: &str, at: DateTime<Utc>) -> Decimal {
        let mut sum = Decimal::ZERO;
        for o in self.orders.iter().filter(|o| &*o.program_id == program_id) {
            for l in o.lines.iter().filter(|l| &*l.partner_id == partner_id) {
                if matches!(self.line_status(o, l, at), LineStatus::Approved | LineStatus::Paid) {
                    sum += l.net;
                }
            }
        }
        sum
    }

    /// Every partner's balance in `program_id` as of `at` (partners with
    /// lines or payouts), sorted by partner.
    pub fn balances(&self, program_id: &str, at: DateTime<Utc>) -> Vec<Balance> {
        let Some(program) = self.rules.program(program_id) else { return Vec::new() };
        let mut by: std::collections::BTreeMap<std::sync::Arc<str>, Balance> = std::collections::BTreeMap::new();
        let blank = |partner: std::sync::Arc<str>| Balance {
            program_id: program_id.into(),
            partner_id: partner,
            currency: program.currency,
            pending: Decimal::ZERO,
            available: Decimal::ZERO,
            in_flight: Decimal::ZERO,
            paid: Decimal::ZERO,
        };
        for o in self.orders.iter().filter(|o| &*o.program_id == program_id) {
            for l in &o.lines {
                let b = by.entry(l.partner_id.clone()).or_insert_with(|| blank(l.partner_id.clone()));
                match self.line_status(o, l, at) {
                    LineStatus::Pending => b.pending += l.net,
                    LineStatus::Approved | LineStatus::Paid => b.available += l.net,
                    LineStatus::Rejected => {}
                }
            }
        }
        if let Some(m) = self.names.get(program_id).and_then(|p| self.balances.get(&p)) {
            for (partner, pb) in m {
                let key: std::sync::Arc<str> = partner.as_ref().into();
                let b = by.entry(key.clone()).or_insert_with(|| blank(key));
                b.available += pb.closed_approved - pb.paid - pb.in_flight;
                b.in_flight = pb.in_flight;
                b.paid = pb.paid;
            }
        }
        by.into_values().collect()
    }

    /// The payout items of a program, by partner then batch.
    pub fn payout_items(&self, program_id: &str) -> Vec<PayoutItem> {
        let Some(m) = self.names.get(program_id).and_then(|p| self.balances.get(&p)) else { return Vec::new() };
        let mut v: Vec<PayoutItem> = m
            .iter()
            .flat_map(|(partner, pb)| {
                pb.items.iter().map(move |(batch, s)| PayoutItem {
                    program_id: program_id.to_string(),
                    partner_id: partner.to_string(),
                    batch_id: batch.to_string(),
                    state: s.clone(),
                })
            })
            .collect();
        v.sort_by(|a, b| (&a.partner_id, &a.batch_id).cmp(&(&b.partner_id, &b.batch_id)));
        v
    }

    /// Adds a closed order's approved lines to its partners' balances.
    pub(super) fn close_into_balances(&mut self, order: &crate::state::Order, statuses: &[LineStatus]) {
        let Some(prog) = self.names.get(&order.program_id) else { return };
        for (l, s) in order.lines.iter().zip(statuses) {
            if matches!(s, LineStatus::Approved | LineStatus::Paid) && !l.net.is_zero() {
                let pb = self.balances.entry(prog).or_default().entry(l.partner_id.as_ref().into()).or_default();
                pb.closed_approved += l.net;
            }
        }
    }

    pub(super) fn apply_payout(&mut self, e: &Event<'_>, p: &PayoutEvent<'_>, program: &Program) -> Result<(), Reject> {
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
        let prog = self.names.intern(&program.id);
        let item = self
            .balances
            .get(&prog)
            .and_then(|m| m.get(p.partner_id.as_ref()))
            .and_then(|b| b.items.get(p.batch_id.as_ref()))
            .map(|i| (i.amount, i.status));
        let what = || format!("payout of {} to {} in batch {}", p.amount, p.partner_id, p.batch_id);
        match (item, p.status) {
            (None, PayoutStatus::Planned) => {
                let pb = self.balances.get(&prog).and_then(|m| m.get(p.partner_id.as_ref()));
                let (paid, in_flight, closed) = pb.map_or((Decimal::ZERO, Decimal::ZERO, Decimal::ZERO), |b| {
                    (b.paid, b.in_flight, b.closed_approved)
                });
                let available = self.approved_open(&program.id, &p.partner_id, e.ts) + closed - paid - in_flight;
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
            (Some((amount, _)), _) if amount != p.amount => {
                return Err(invalid("amount", format!("{} does not match the planned amount {amount}", what())))
            }
            (Some((_, from)), to) => {
                use PayoutStatus::*;
                let ok = matches!((from, to), (Planned, Sent) | (Planned | Sent, Paid | Failed) | (Paid, Reversed));
                if !ok {
                    return Err(invalid(
                        "status",
                        format!("{} cannot go from {} to {}", what(), from.as_str(), to.as_str()),
                    ));
                }
            }
        }
        // Validated: apply.
        let pb = self.balances.entry(prog).or_default().entry(p.partner_id.as_ref().into()).or_default();
        match p.status {
            PayoutStatus::Planned => pb.in_flight += p.amount,
            PayoutStatus::Sent => {}
            PayoutStatus::Paid => {
                pb.in_flight -= p.amount;
                pb.paid += p.amount;
            }
            PayoutStatus::Failed => pb.in_flight -= p.amount,
            PayoutStatus::Reversed => pb.paid -= p.amount,
        }
        debug_assert!(pb.in_flight >= Decimal::ZERO && pb.paid >= Decimal::ZERO);
        let provider_ref = p
            .provider_ref
            .as_deref()
            .map(Box::from)
            .or_else(|| pb.items.get(p.batch_id.as_ref()).and_then(|i| i.provider_ref.clone()));
        let state = ItemState { amount: p.amount, tds: p.tds, status: p.status, provider_ref };
        pb.items.insert(p.batch_id.as_ref().into(), state);
        if matches!(p.status, PayoutStatus::Paid | PayoutStatus::Reversed) {
            self.mark_paid(prog, &program.id, &p.partner_id, e.ts);
        }
        self.stats.applied_payouts += 1;
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
            provider: p.provider.as_deref().map(str::to_string),
            provider_ref: p.provider_ref.as_deref().map(str::to_string),
            detail: p.detail.as_deref().map(str::to_string),
        });
        Ok(())
    }

    /// Marks the partner's approved lines paid, oldest eligible first, as
    /// far as its paid total (beyond closed orders) covers them whole.
    fn mark_paid(&mut self, prog: u32, program_id: &str, partner_id: &str, at: DateTime<Utc>) {
        let pb = self.balances.get(&prog).and_then(|m| m.get(partner_id));
        let mut cover = pb.map_or(Decimal::ZERO, |b| b.paid - b.closed_approved);
        let mut lines: Vec<(DateTime<Utc>, usize, usize)> = Vec::new();
        for (oi, o) in self.orders.iter().enumerate().filter(|(_, o)| &*o.program_id == program_id) {
            for (li, l) in o.lines.iter().enumerate().filter(|(_, l)| &*l.partner_id == partner_id) {
                let s = self.line_status(o, l, at);
                if matches!(s, LineStatus::Approved | LineStatus::Paid) {
                    lines.push((o.eligible_at, oi, li));
                }
            }
        }
        lines.sort_by(|a, b| (a.0, &self.orders[a.1].order_id, a.2).cmp(&(b.0, &self.orders[b.1].order_id, b.2)));
        let mut covering = true;
        for (_, oi, li) in lines {
            let net = self.orders[oi].lines[li].net;
            let paid = covering && net <= cover;
            if paid {
                cover -= net;
            } else {
                covering = false;
            }
            self.orders[oi].lines[li].paid = paid;
        }
    }
}
