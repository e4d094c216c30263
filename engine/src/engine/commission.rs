//! Commissions: an accrual per tier for every capture, a reversal per tier
//! for every refund or chargeback, each rounded once to the currency's minor
//! units.

use afflio_rules::{PaymentKind, Program, RewardPay, Rules};
use rust_decimal::Decimal;

use super::validate::{reject, Reject};
use super::Engine;
use crate::event::{Capture, Event, Item, Refund, SaleExtra};
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

    /// Accrues a sale's commission on every line of the order: tier 0 by the
    /// rates and reward rules, each override tier its rate of the basis.
    pub(super) fn accrue(&mut self, seq: u64, e: &Event<'_>, sale: &Sale<'_, '_>, rules: &Rules, program: &Program) {
        let (names, registry) = (&self.names, &self.registry);
        let Some(order) = self.orders.get_mut(seq) else { return };
        let Some(credit) = order.credit.clone() else { return };
        let basis = basis_of(program, sale.amount, sale.extra);
        let first = order.captures == 1;
        for i in 0..order.lines.len() {
            let line = &mut order.lines[i];
            let (exact, rate, reward) = if line.tier == 0 {
                let partner = super::registry::lookup_partner(names, registry, rules, &line.partner_id);
                tier0_commission(partner, program, sale, basis, first)
            } else {
                let r = program.overrides.get(usize::from(line.tier) - 1).map_or(Decimal::ZERO, |r| r.fraction());
                (basis * r, Some(r), None)
            };
            let amount = round_money(exact, order.currency);
            line.accrued += amount;
            line.net += amount;
            let row = Posting { kind: EntryKind::Accrual, basis, amount, rate, rules_version: rules.version(), reward };
            self.out.ledger.push(row.entry(e, order, &order.lines[i], &credit));
            self.meta.stats.ledger_entries += 1;
        }
        self.note_lines_changed(seq);
    }

    /// Accrues a flat reward (a lead, a stage): tier 0 gets `reward`, each
    /// override tier its rate of it.
    pub(super) fn accrue_flat(
        &mut self,
        seq: u64,
        e: &Event<'_>,
        reward: Decimal,
        label: &str,
        rules: &Rules,
        program: &Program,
    ) {
        let Some(order) = self.orders.get_mut(seq) else { return };
        let Some(credit) = order.credit.clone() else { return };
        let label: std::sync::Arc<str> = label.into();
        for i in 0..order.lines.len() {
            let line = &mut order.lines[i];
            let (exact, rate) = if line.tier == 0 {
                (reward, None)
            } else {
                let r = program.overrides.get(usize::from(line.tier) - 1).map_or(Decimal::ZERO, |r| r.fraction());
                (reward * r, Some(r))
            };
            let amount = round_money(exact, order.currency);
            line.accrued += amount;
            line.net += amount;
            let row = Posting {
                kind: EntryKind::Accrual,
                basis: reward,
                amount,
                rate,
                rules_version: rules.version(),
                reward: Some(label.clone()),
            };
            self.out.ledger.push(row.entry(e, order, &order.lines[i], &credit));
            self.meta.stats.ledger_entries += 1;
        }
        self.note_lines_changed(seq);
    }

    /// Reverses every line's net (a disqualified lead): one reversal per line.
    pub(super) fn reverse_all(&mut self, seq: u64, e: &Event<'_>, label: &str, rules: &Rules) {
        let Some(order) = self.orders.get_mut(seq) else { return };
        let Some(credit) = order.credit.clone() else { return };
        let label: std::sync::Arc<str> = label.into();
        for i in 0..order.lines.len() {
            let line = &mut order.lines[i];
            let amount = -line.net;
            line.net = Decimal::ZERO;
            let row = Posting {
                kind: EntryKind::Reversal,
                basis: -line.accrued,
                amount,
                rate: None,
                rules_version: rules.version(),
                reward: Some(label.clone()),
            };
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
        if order.kind() == crate::state::OrderKind::Lead {
            return Err(reject(
                Reason::UnknownOrder,
                "order_id",
                format!("order_id {:?} is a lead: a lead is disqualified by a stage, not refunded", r.order_id),
            ));
        }
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
                reward: None,
            };
            self.out.ledger.push(row.entry(e, order, &order.lines[i], &credit));
            self.meta.stats.ledger_entries += 1;
        }
        // refund_rate counts a refund on the day its order was first captured
        // (its cohort), so the share of the window's orders refunded never
        // exceeds 1, and refunds of orders older than the window count for none.
        let cohort = order.first_capture_ts.timestamp_micros();
        let days = program.fraud.refund_rate_window.num_days();
        self.refund_windows(prog, &credit.partner_id, |w| w.refunded(cohort, r.amount, days));
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
    reward: Option<std::sync::Arc<str>>,
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
            reward: self.reward,
        }
    }
}

/// A sale as commission sees it: a capture or a subscription payment.
pub(super) struct Sale<'a, 'e> {
    pub(super) amount: Decimal,
    pub(super) items: &'a Option<Vec<Item<'e>>>,
    pub(super) extra: &'a SaleExtra<'e>,
    /// `First` for a capture that starts a subscription.
    pub(super) payment: Option<PaymentKind>,
}

impl<'a, 'e> Sale<'a, 'e> {
    pub(super) fn of_capture(c: &'a Capture<'e>) -> Sale<'a, 'e> {
        let payment = c.extra.subscription_id.as_ref().map(|_| PaymentKind::First);
        Sale { amount: c.amount, items: &c.items, extra: &c.extra, payment }
    }
}

/// The commission basis: the amount less the parts the program leaves out.
pub(super) fn basis_of(program: &Program, amount: Decimal, x: &SaleExtra<'_>) -> Decimal {
    let b = &program.basis;
    let mut basis = amount;
    for (on, part) in [(b.exclude_tax, x.tax), (b.exclude_shipping, x.shipping), (b.exclude_discount, x.discount)] {
        if on {
            basis -= part.unwrap_or(Decimal::ZERO);
        }
    }
    basis
}

/// Tier-0 commission before rounding, the rate when one rate applies to the
/// whole basis, and the reward rule that decided it. Per item (or for the
/// whole basis when there are no items), first match wins: the partner's
/// category rate, the partner's rate, the program's reward rules in order,
/// the program's renewal rate (renewals), the program's category rate, the
/// program's rate. A flat reward rule pays its amount once per order (on its
/// first capture) instead of a rate. Items share the basis in proportion to
/// their amounts.
pub(super) fn tier0_commission(
    partner: Option<&afflio_rules::Partner>,
    program: &Program,
    sale: &Sale<'_, '_>,
    basis: Decimal,
    first_capture: bool,
) -> (Decimal, Option<Decimal>, Option<std::sync::Arc<str>>) {
    let partner = partner.filter(|p| p.program_id == program.id);
    let plan = sale.extra.plan.as_deref();
    let order_matches = |r: &afflio_rules::Reward| {
        r.new_customer.is_none_or(|n| sale.extra.new_customer == Some(n))
            && r.payment.is_none_or(|p| sale.payment == Some(p))
            && r.plan.as_deref().is_none_or(|p| plan == Some(p))
    };
    let renewal = matches!(sale.payment, Some(PaymentKind::Renewal));
    // What decides the rate of one item: (rate, the reward rule's index).
    let decide = |category: Option<&str>, sku: Option<&str>| -> (Decimal, Option<usize>) {
        if let Some(r) = category.and_then(|c| partner.and_then(|p| p.category_rates.get(c))) {
            return (r.fraction(), None);
        }
        if let Some(r) = partner.and_then(|p| p.rate) {
            return (r.fraction(), None);
        }
        for (i, rw) in program.rewards.iter().enumerate() {
            let item_ok = rw.category.as_deref().is_none_or(|c| category == Some(c))
                && rw.product.as_deref().is_none_or(|s| sku == Some(s));
            if item_ok && order_matches(rw) {
                return match rw.pay {
                    RewardPay::Rate(r) => (r.fraction(), Some(i)),
                    RewardPay::Flat(_) => (Decimal::ZERO, Some(i)),
                };
            }
        }
        if renewal {
            if let Some(r) = program.subscriptions.as_ref().and_then(|s| s.renewal_rate) {
                return (r.fraction(), Some(usize::MAX));
            }
        }
        let cat = category.and_then(|c| program.category_rates.get(c));
        (cat.copied().unwrap_or(program.rate).fraction(), None)
    };
    // The items, or the whole amount as one unit (no allocation: this runs per capture).
    let items = sale.items.as_deref().filter(|i| !i.is_empty());
    let units = items
        .into_iter()
        .flatten()
        .map(|it| (it.category.as_deref(), it.sku.as_deref(), it.amount))
        .chain(items.is_none().then_some((None, None, sale.amount)));
    let mut total = Decimal::ZERO;
    let mut uniform: Option<Option<Decimal>> = None;
    // Flat rules that matched (each pays once per order).
    let mut flats: Vec<usize> = Vec::new();
    let mut decided_by: Option<usize> = None;
    for (category, sku, amount) in units {
        let (r, rule) = decide(category, sku);
        decided_by = decided_by.or(rule);
        let flat = rule.filter(|&i| program.rewards.get(i).is_some_and(|rw| matches!(rw.pay, RewardPay::Flat(_))));
        if let Some(i) = flat {
            if !flats.contains(&i) {
                flats.push(i);
            }
            uniform = Some(None);
            continue;
        }
        // The item's share of the basis (the whole basis when one unit).
        let share = if sale.amount.is_zero() || basis == sale.amount { amount } else { amount * basis / sale.amount };
        total += share * r;
        uniform = match uniform {
            None => Some(Some(r)),
            Some(Some(u)) if u == r => Some(Some(u)),
            Some(_) => Some(None),
        };
    }
    if first_capture {
        for rw in flats.iter().filter_map(|&i| program.rewards.get(i)) {
            if let RewardPay::Flat(f) = rw.pay {
                total += f;
            }
        }
    }
    let label = decided_by.map(|i| match program.rewards.get(i) {
        Some(rw) => std::sync::Arc::<str>::from(rw.name.as_str()),
        None => std::sync::Arc::<str>::from("renewal_rate"),
    });
    (total, uniform.flatten(), label)
}
