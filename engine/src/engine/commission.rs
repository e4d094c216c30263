//! Commissions: an accrual per tier for every capture, a reversal per tier
//! for every refund or chargeback, each rounded once to the currency's minor
//! units.

use afflio_rules::{Program, Rules};
use rust_decimal::Decimal;

use super::validate::{reject, Reject};
use super::Engine;
use crate::event::{Capture, Event, Item, Refund};
use crate::money::{max_amount, round_money};
use crate::output::{EntryKind, LedgerEntry, Reason};
use crate::state::{Credit, Line, Order};

impl Engine {
    /// Refuses a capture that would take the order's captured total out of
    /// what the store can hold (`Decimal128(18, 4)`), before anything changes.
    pub(super) fn check_capture_totals(&self, c: &Capture<'_>, program: &Program, prog: u32) -> Result<(), Reject> {
        let _ = program;
        let Some(o) = self.orders.seq_of(prog, &c.order_id).and_then(|s| self.orders.get(s)) else { return Ok(()) };
        let total = o.captured.checked_add(c.amount);
        if total.is_none_or(|t| t >= max_amount()) {
            return Err(reject(
                Reason::InvalidAmount,
                "amount",
                format!(
                    "amount {} would take order {:?}'s captured total {} to {} or more, over what the store holds",
                    c.amount,
                    o.order_id,
                    o.captured,
                    max_amount()
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn accrue(&mut self, seq: u64, e: &Event<'_>, c: &Capture<'_>, rules: &Rules, program: &Program) {
        let (names, registry) = (&self.names, &self.registry);
        let Some(order) = self.orders.get_mut(seq) else { return };
        let Some(credit) = order.credit.clone() else { return };
        for i in 0..order.lines.len() {
            let line = &mut order.lines[i];
            let (exact, rate) = if line.tier == 0 {
                let partner = super::registry::lookup_partner(names, registry, rules, &line.partner_id);
                tier0_commission(partner, program, c.amount, &c.items)
            } else {
                let r = program.overrides.get(usize::from(line.tier) - 1).map_or(Decimal::ZERO, |r| r.fraction());
                (c.amount * r, Some(r))
            };
            let amount = round_money(exact, order.currency);
            line.accrued += amount;
            line.net += amount;
            let row =
                Posting { kind: EntryKind::Accrual, basis: c.amount, amount, rate, rules_version: rules.version() };
            self.out.ledger.push(row.entry(e, order, &order.lines[i], &credit));
            self.meta.stats.ledger_entries += 1;
        }
        self.note_lines_changed(seq);
    }

    pub(super) fn apply_refund(
        &mut self,
        e: &Event<'_>,
        r: &Refund<'_>,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        let seq = self.orders.seq_of(prog, &r.order_id).ok_or_else(|| {
            reject(
                Reason::UnknownOrder,
                "order_id",
                format!("order_id {:?} has no capture in program {:?}", r.order_id, program.id),
            )
        })?;
        let order = self.orders.get(seq).expect("indexed order");
        let open = order.captured - order.refunded;
        if r.amount > open {
            return Err(reject(
                Reason::RefundExceedsCapture,
                "amount",
                format!(
                    "amount {} exceeds what is captured and not yet refunded ({open} of {})",
                    r.amount, order.captured
                ),
            ));
        }
        // Validated: apply.
        let order = self.orders.get_mut(seq).expect("indexed order");
        order.refunded += r.amount;
        order.refunds += 1;
        order.last_activity = order.last_activity.max(e.ts);
        if r.chargeback {
            order.chargeback = true;
            order.chargeback_amount += r.amount;
            self.meta.stats.applied_chargebacks += 1;
        } else {
            self.meta.stats.applied_refunds += 1;
        }
        let full = order.fully_refunded();
        let Some(credit) = order.credit.clone() else { return Ok(()) };
        for i in 0..order.lines.len() {
            let line = &mut order.lines[i];
            let share = if full {
                line.net
            } else {
                round_money(r.amount * line.accrued / order.captured, order.currency).min(line.net)
            };
            let amount = -share;
            line.net += amount;
            assert!(!line.net.is_sign_negative() || line.net.is_zero(), "internal error: line net below zero");
            assert!(!full || line.net.is_zero(), "internal error: fully refunded line not zero");
            let row = Posting {
                kind: EntryKind::Reversal,
                basis: -r.amount,
                amount,
                rate: None,
                rules_version: rules.version(),
            };
            self.out.ledger.push(row.entry(e, order, &order.lines[i], &credit));
            self.meta.stats.ledger_entries += 1;
        }
        if let Some(pi) = self.names.get(&credit.partner_id) {
            if let Some(w) = self.refunds_by_partner.get_mut(&(prog, pi)) {
                w.refunded(e.ts.timestamp_micros(), r.amount, program.fraud.refund_rate_window.num_days());
            }
        }
        self.note_lines_changed(seq);
        Ok(())
    }
}

/// The amounts of one ledger row; the rest comes from the event, order and line.
struct Posting {
    kind: EntryKind,
    basis: Decimal,
    amount: Decimal,
    rate: Option<Decimal>,
    rules_version: u64,
}

impl Posting {
    fn entry(self, e: &Event<'_>, order: &Order, line: &Line, credit: &Credit) -> LedgerEntry {
        LedgerEntry {
            entry_id: format!("{}:{}", e.event_id, line.tier),
            event_id: e.event_id.to_string(),
            ts: e.ts,
            program_id: order.program_id.clone(),
            order_id: order.order_id.to_string(),
            partner_id: line.partner_id.clone(),
            tier: line.tier,
            kind: self.kind,
            basis: self.basis,
            amount: self.amount,
            currency: order.currency,
            attribution: credit.kind,
            source: credit.source.clone(),
            eligible_at: order.eligible_at,
            rate: self.rate,
            rules_version: self.rules_version,
        }
    }
}

/// Tier-0 commission before rounding, and the rate when one rate applies to
/// the whole amount. First match wins: partner's category rate, partner's
/// rate, program's category rate, program's rate.
pub(super) fn tier0_commission(
    partner: Option<&afflio_rules::Partner>,
    program: &Program,
    amount: Decimal,
    items: &Option<Vec<Item<'_>>>,
) -> (Decimal, Option<Decimal>) {
    let partner = partner.filter(|p| p.program_id == program.id);
    let rate_for = |category: Option<&str>| -> Decimal {
        let cat = category.and_then(|c| {
            partner.and_then(|p| p.category_rates.get(c)).or_else(|| {
                // Partner's own rate beats the program's category rate.
                if partner.and_then(|p| p.rate).is_some() {
                    None
                } else {
                    program.category_rates.get(c)
                }
            })
        });
        cat.copied().or_else(|| partner.and_then(|p| p.rate)).unwrap_or(program.rate).fraction()
    };
    match items {
        Some(items) if !items.is_empty() => {
            let mut total = Decimal::ZERO;
            let mut uniform: Option<Option<Decimal>> = None;
            for it in items {
                let r = rate_for(it.category.as_deref());
                total += it.amount * r;
                uniform = match uniform {
                    None => Some(Some(r)),
                    Some(Some(u)) if u == r => Some(Some(u)),
                    Some(_) => Some(None),
                };
            }
            (total, uniform.flatten())
        }
        _ => {
            let r = rate_for(None);
            (amount * r, Some(r))
        }
    }
}
