//! Who an order is credited to: clicks are remembered per (program,
//! visitor); an order's first capture decides its credit once, from its
//! promo codes and its visitor's clicks in the attribution window.

use std::borrow::Cow;

use afflio_rules::{normalize_code, AttributionModel, FraudAction, Program, Rules};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::detect::FlagSpec;
use super::validate::{unknown_link, Reject};
use super::{micros, Engine};
use crate::event::{Capture, Click, Event};
use crate::fraud::Hit;
use crate::output::{AttributionKind, FraudRule};
use crate::sessions::scoped_key;
use crate::state::{CodeIssue, Credit, Line, Order};

impl Engine {
    pub(super) fn apply_click(
        &mut self,
        e: &Event<'_>,
        c: &Click<'_>,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        // Links already clicked under these rules resolve with one lookup.
        let cached = self.link_targets.get(c.link_id.as_ref()).filter(|(_, p)| *p == prog);
        let target = match cached {
            Some(&(t, _)) => t,
            None => {
                let link = match self.find_link(rules, &c.link_id) {
                    Some(l) if l.program_id == program.id => (l.id.clone(), l.partner_id.clone()),
                    _ => return Err(unknown_link(program, &c.link_id)),
                };
                let (l, p) = (self.names.intern(&link.0), self.names.intern(&link.1));
                let t = self.sessions.target(l, p, prog);
                self.link_targets.insert(link.0.as_str().into(), (t, prog));
                t
            }
        };
        let key = scoped_key(&program.id, &c.visitor_id);
        let (rec, dropped, evicted) = self.sessions.record(key, e.ts.timestamp_micros(), target);
        let stats = &mut self.meta.stats;
        stats.applied_clicks += 1;
        stats.clicks_dropped += dropped;
        stats.visitors_evicted_capacity += evicted;
        let n = |i: u32| &**self.names.name(i);
        self.out.clicks.push(e, n(rec.program), n(rec.link), n(rec.partner), c);
        Ok(())
    }

    pub(super) fn apply_capture(
        &mut self,
        e: &Event<'_>,
        c: &Capture<'_>,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        self.check_capture_totals(c, program, prog)?;
        let existing = self.orders.seq_of(prog, &c.order_id);
        if let Some(o) = existing.and_then(|s| self.orders.get(s)) {
            if o.kind() != crate::state::OrderKind::Sale {
                return Err(super::validate::reject(
                    crate::output::Reason::DuplicateId,
                    "order_id",
                    format!(
                        "order_id {:?} is a {} of program {:?}, not an order",
                        c.order_id,
                        o.kind().as_str(),
                        program.id
                    ),
                ));
            }
        }
        if existing.is_none() {
            if let Some(sub) = &c.extra.subscription_id {
                self.check_new_subscription(prog, program, sub)?;
            }
        }
        // Validated: from here on nothing can fail.
        let seq = match existing {
            Some(s) => s,
            None => {
                let seq = self.open_order(e, c, rules, program, prog);
                if self.notices {
                    if let Some(cr) = self.orders.get(seq).and_then(|o| o.credit.clone()) {
                        let detail =
                            vec![("attribution", cr.kind.as_str().to_string()), ("source", cr.source.to_string())];
                        self.notice("order.attributed", e, Some(cr.partner_id), &c.order_id, detail);
                    }
                }
                if let Some(sub) = &c.extra.subscription_id {
                    self.start_subscription(seq, e, prog, sub, c.extra.plan.as_deref());
                }
                seq
            }
        };
        let order = self.orders.get_mut(seq).expect("open order");
        order.captured += c.amount;
        order.captures += 1;
        order.last_activity = order.last_activity.max(e.ts);
        if e.ts > order.last_capture_ts {
            order.last_capture_ts = e.ts;
        }
        let eligible_at = order.last_capture_ts + program.hold;
        let credit = order.credit.clone();
        self.orders.set_eligible_at(seq, eligible_at);
        self.meta.stats.applied_captures += 1;
        if let Some(cr) = &credit {
            let days = program.fraud.refund_rate_window.num_days();
            self.refund_windows(prog, &cr.partner_id, |w| w.captured(e.ts.timestamp_micros(), c.amount, days));
        }
        self.accrue(seq, e, &super::commission::Sale::of_capture(c), rules, program);
        Ok(())
    }

    /// The first capture of an order: decides attribution, once.
    pub(super) fn open_order(
        &mut self,
        e: &Event<'_>,
        c: &Capture<'_>,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) -> u64 {
        let ts = e.ts;
        // 1. Promo codes, in typed order.
        let mut codes: Vec<Box<str>> = Vec::with_capacity(c.codes.len());
        let mut issues = Vec::new();
        // The rules file's codes are borrowed from the rules; a registry code is
        // copied (the registry is a part of the engine changed below).
        let mut valid: Vec<Cow<'_, afflio_rules::Code>> = Vec::new();
        for typed in &c.codes {
            let norm = normalize_code(typed);
            if norm.is_empty() || codes.iter().any(|k| **k == *norm) {
                continue;
            }
            codes.push(norm.clone().into());
            let found = match program.codes.get(&norm) {
                Some(code) => Some(Cow::Borrowed(code)),
                None => self.registry_code(prog, &norm).cloned().map(Cow::Owned),
            };
            let issue = match found {
                None => Some(CodeIssue::Unknown),
                Some(code) if code.starts_at.is_some_and(|s| ts < s) => Some(CodeIssue::NotStarted),
                Some(code) if code.expires_at.is_some_and(|x| ts >= x) => Some(CodeIssue::Expired),
                Some(code) if code.max_uses.is_some_and(|m| self.code_uses(prog, &code.normalized) >= m) => {
                    Some(CodeIssue::Exhausted)
                }
                Some(code) => {
                    valid.push(code);
                    None
                }
            };
            if let Some(issue) = issue {
                issues.push((norm.into_boxed_str(), issue));
            }
        }
        let by_code = valid.first().map(|code| Credit {
            kind: AttributionKind::Code,
            source: code.code.as_str().into(),
            partner_id: code.partner_id.as_str().into(),
        });
        // 2. Link clicks of this visitor in the window.
        let won = c.visitor_id.as_deref().and_then(|v| self.winning_click(v, prog, ts, program));
        let click_ts = won.as_ref().map(|(_, t)| *t);
        let by_click = won.map(|(credit, _)| credit);
        // 3. Priority.
        let credit = if program.code_priority { by_code.or(by_click) } else { by_click.or(by_code) };
        match credit.as_ref().map(|c| c.kind) {
            Some(AttributionKind::Code) => {
                self.meta.stats.orders_by_code += 1;
                if let Some(code) = valid.first() {
                    let k = self.names.intern(&code.normalized);
                    *self.code_uses.get_or_default((prog, k)) += 1;
                }
            }
            Some(AttributionKind::Link) => self.meta.stats.orders_by_link += 1,
            None => self.meta.stats.orders_unattributed += 1,
        }
        let mut order = self.new_order(prog, &c.order_id, ts, credit, rules, program);
        order.codes = codes;
        order.code_issues = issues;
        // Fraud rules, decided with the attribution.
        let mut hits: Vec<(FraudRule, Hit)> = Vec::new();
        if let Some(cr) = order.credit.clone() {
            let valid: Vec<&afflio_rules::Code> = valid.iter().map(|c| &**c).collect();
            self.detect(&mut hits, e, c, &cr, &valid, click_ts, rules, program, prog);
        }
        let seq = self.orders.insert(prog, order);
        for (rule, hit) in hits {
            let action = super::detect::rule_action(&program.fraud, rule);
            if action == FraudAction::Off {
                continue;
            }
            let Hit { value, baseline, threshold, score, detail, reason, current, retro } = hit;
            let flag = FlagSpec { rule, action, value, baseline, threshold, score, detail };
            for (id, why) in retro.iter().filter(|(id, _)| **id != *c.order_id) {
                if let Some(s) = self.orders.seq_of(prog, id) {
                    self.flag_order(s, &flag, why.as_deref(), e, true);
                }
            }
            if current {
                self.flag_order(seq, &flag, reason.as_deref(), e, false);
            }
        }
        seq
    }

    /// A new order with no money yet: lines for the credited partner (tier 0)
    /// and its ancestors for each override tier.
    pub(super) fn new_order(
        &self,
        prog: u32,
        order_id: &str,
        ts: DateTime<Utc>,
        credit: Option<Credit>,
        rules: &Rules,
        program: &Program,
    ) -> Order {
        let mut lines = Vec::new();
        if let Some(cr) = &credit {
            let line = |partner_id, tier| Line {
                partner_id,
                tier,
                accrued: Decimal::ZERO,
                net: Decimal::ZERO,
                review: None,
                paid: false,
            };
            lines.push(line(cr.partner_id.clone(), 0));
            for (i, anc) in rules.ancestors(&cr.partner_id, program.overrides.len()).enumerate() {
                lines.push(line(anc.id.as_str().into(), (i + 1) as u8));
            }
        }
        Order {
            seq: 0,
            program_id: self.names.name(prog).clone(),
            order_id: order_id.into(),
            currency: program.currency,
            first_capture_ts: ts,
            last_capture_ts: ts,
            eligible_at: ts + program.hold,
            credit,
            captured: Decimal::ZERO,
            refunded: Decimal::ZERO,
            chargeback_amount: Decimal::ZERO,
            chargeback: false,
            codes: Vec::new(),
            code_issues: Vec::new(),
            flags: Vec::new(),
            lines,
            captures: 0,
            refunds: 0,
            last_activity: ts,
            held: false,
            extra: None,
        }
    }

    fn code_uses(&self, prog: u32, norm: &str) -> u64 {
        self.names.get(norm).and_then(|k| self.code_uses.get(&(prog, k))).copied().unwrap_or(0)
    }

    /// The winning click's credit and time.
    fn winning_click(&self, visitor: &str, prog: u32, ts: DateTime<Utc>, program: &Program) -> Option<(Credit, i64)> {
        let t = ts.timestamp_micros();
        let from = t.saturating_sub(micros(program.window));
        let key = scoped_key(&program.id, visitor);
        // Clicks come in application order: ties in time go to the later applied.
        let candidates = self.sessions.clicks(key).filter(|c| c.program == prog && c.ts >= from && c.ts <= t);
        let best = match program.model {
            AttributionModel::LastClick => candidates.max_by_key(|c| c.ts),
            AttributionModel::FirstClick => candidates.rev().min_by_key(|c| c.ts),
        }?;
        let credit = Credit {
            kind: AttributionKind::Link,
            source: self.names.name(best.link).clone(),
            partner_id: self.names.name(best.partner).clone(),
        };
        Some((credit, best.ts))
    }
}
