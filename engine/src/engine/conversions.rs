//! Conversions beyond one-off sales: leads (a flat reward, then stages that
//! may pay more or disqualify the lead), and subscriptions (the capture that
//! starts one is attributed; later payments earn for the same partner until
//! the program's `max_duration` or a cancellation).
//!
//! A lead and each later payment is an order of the engine (kind `lead` or
//! `payment`): the same lines, lifecycle, reviews, holds, payouts and
//! reversals as a sale's.

use afflio_rules::{Program, Rules};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::commission::Sale;
use super::validate::{reject, Reject};
use super::Engine;
use crate::event::{Cancel, Capture, Event, Lead, LeadStage, Payment, SaleExtra};
use crate::output::Reason;
use crate::state::{Credit, OrderExtra, OrderKind};

/// At most this many subscriptions are tracked at once; a subscription is
/// forgotten `order_retention` after its last activity once it is cancelled
/// or past its `max_duration`.
pub(crate) const MAX_SUBSCRIPTIONS: usize = 10_000_000;

/// A subscription as the engine knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Subscription {
    pub(crate) id: Box<str>,
    pub(crate) program: u32,
    /// Who won it (its first order's credit); `None`: nobody earns.
    pub(crate) credit: Option<Credit>,
    pub(crate) started: DateTime<Utc>,
    pub(crate) cancelled_at: Option<DateTime<Utc>>,
    pub(crate) plan: Option<Box<str>>,
    pub(crate) payments: u32,
    pub(crate) last_activity: DateTime<Utc>,
}

/// The key of a subscription: a 128-bit hash of (program, id), so that the
/// map's keys are fixed-size (the id itself is kept and compared).
pub(crate) fn sub_key(prog: u32, id: &str) -> u128 {
    let mut buf = Vec::with_capacity(4 + id.len());
    buf.extend_from_slice(&prog.to_le_bytes());
    buf.extend_from_slice(id.as_bytes());
    xxhash_rust::xxh3::xxh3_128(&buf)
}

impl Engine {
    fn subscription(&self, prog: u32, id: &str) -> Option<&Subscription> {
        self.subscriptions.get(&sub_key(prog, id)).filter(|s| *s.id == *id && s.program == prog).map(|s| &**s)
    }

    pub(super) fn check_new_subscription(&self, prog: u32, program: &Program, id: &str) -> Result<(), Reject> {
        if self.subscription(prog, id).is_some() {
            return Err(reject(
                Reason::DuplicateId,
                "subscription_id",
                format!(
                    "subscription_id {id:?} of program {:?} was started before: its later payments are subscription_payment events",
                    program.id
                ),
            ));
        }
        if self.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return Err(reject(
                Reason::LimitReached,
                "subscription_id",
                format!("{MAX_SUBSCRIPTIONS} subscriptions are tracked, the limit: send it again once ended ones are forgotten"),
            ));
        }
        Ok(())
    }

    /// The capture that opened order `seq` starts subscription `id`.
    pub(super) fn start_subscription(&mut self, seq: u64, e: &Event<'_>, prog: u32, id: &str, plan: Option<&str>) {
        let Some(order) = self.orders.get_mut(seq) else { return };
        order.extra = Some(Box::new(OrderExtra {
            kind: OrderKind::Sale,
            subtype: Some("first".into()),
            subscription_id: Some(id.into()),
            ..OrderExtra::default()
        }));
        let sub = Subscription {
            id: id.into(),
            program: prog,
            credit: order.credit.clone(),
            started: e.ts,
            cancelled_at: None,
            plan: plan.map(Into::into),
            payments: 1,
            last_activity: e.ts,
        };
        self.subscriptions.insert(sub_key(prog, id), Box::new(sub));
        self.meta.stats.subscriptions_started += 1;
    }

    pub(super) fn apply_lead(
        &mut self,
        e: &Event<'_>,
        l: &Lead<'_>,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        let leads = program.leads.as_ref().expect("validated: the program takes leads");
        if self.orders.seq_of(prog, &l.lead_id).is_some() {
            return Err(reject(
                Reason::DuplicateId,
                "lead_id",
                format!("lead_id {:?} is taken by an open lead or order of program {:?}", l.lead_id, program.id),
            ));
        }
        // Validated: attribute it as an order of no money.
        let view = Capture {
            order_id: l.lead_id.clone(),
            amount: Decimal::ZERO,
            currency: program.currency.code().into(),
            visitor_id: l.visitor_id.clone(),
            codes: l.codes.clone(),
            customer: l.customer.clone(),
            ip: l.ip.clone(),
            items: None,
            extra: SaleExtra::default(),
        };
        let seq = self.open_order(e, &view, rules, program, prog);
        let order = self.orders.get_mut(seq).expect("open lead");
        order.extra = Some(Box::new(OrderExtra {
            kind: OrderKind::Lead,
            subtype: Some(l.kind.as_ref().into()),
            ..OrderExtra::default()
        }));
        let credited = order.credit.as_ref().map(|c| c.partner_id.clone());
        self.orders.set_eligible_at(seq, e.ts + leads.hold);
        self.meta.stats.applied_leads += 1;
        self.notice("lead.created", e, credited.clone(), &l.lead_id, vec![("kind", l.kind.to_string())]);
        let Some(partner) = credited else {
            self.orders.touch_for_store(seq);
            return Ok(());
        };
        let own = super::registry::lookup_partner(&self.names, &self.registry, rules, &partner)
            .filter(|p| p.program_id == program.id)
            .and_then(|p| p.lead_reward);
        let reward = own.unwrap_or_else(|| leads.reward_of(&l.kind));
        self.accrue_flat(seq, e, reward, &format!("lead:{}", l.kind), rules, program);
        Ok(())
    }

    pub(super) fn apply_lead_stage(
        &mut self,
        e: &Event<'_>,
        s: &LeadStage<'_>,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        let leads = program.leads.as_ref().expect("validated: the program takes leads");
        let stage = leads.stage(&s.stage).expect("validated: a stage of the program");
        let seq = self
            .orders
            .seq_of(prog, &s.lead_id)
            .filter(|&q| self.orders.get(q).is_some_and(|o| o.kind() == OrderKind::Lead))
            .ok_or_else(|| {
                reject(
                    Reason::UnknownLead,
                    "lead_id",
                    format!("lead_id {:?} names no open lead of program {:?}", s.lead_id, program.id),
                )
            })?;
        let order = self.orders.get(seq).expect("indexed lead");
        let x = order.extra.as_deref().expect("a lead has its extra part");
        if x.disqualified {
            return Err(reject(
                Reason::InvalidStage,
                "stage",
                format!("lead {:?} was disqualified ({}): no stage follows", s.lead_id, x.stages.join(" -> ")),
            ));
        }
        if x.stages.iter().any(|r| **r == *stage.name) {
            return Err(reject(
                Reason::InvalidStage,
                "stage",
                format!("lead {:?} reached stage {:?} before ({})", s.lead_id, stage.name, x.stages.join(" -> ")),
            ));
        }
        // Validated: apply.
        let order = self.orders.get_mut(seq).expect("indexed lead");
        order.last_activity = order.last_activity.max(e.ts);
        let x = order.extra.as_deref_mut().expect("a lead has its extra part");
        x.stages.push(stage.name.as_str().into());
        x.disqualified = stage.disqualify;
        let partner = order.credit.as_ref().map(|c| c.partner_id.clone());
        self.meta.stats.applied_stages += 1;
        let credited = partner.is_some();
        self.notice("lead.stage_changed", e, partner, &s.lead_id, vec![("stage", stage.name.clone())]);
        if stage.disqualify {
            self.reverse_all(seq, e, "disqualified", rules);
        } else if !stage.reward.is_zero() && credited {
            self.orders.set_eligible_at(seq, e.ts + leads.hold);
            self.accrue_flat(seq, e, stage.reward, &format!("stage:{}", stage.name), rules, program);
        }
        self.touch_order_for_store(seq);
        Ok(())
    }

    pub(super) fn apply_payment(
        &mut self,
        e: &Event<'_>,
        p: &Payment<'_>,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        let subs = program.subscriptions.as_ref().expect("validated: the program takes subscriptions");
        let Some(sub) = self.subscription(prog, &p.subscription_id) else {
            return Err(reject(
                Reason::UnknownSubscription,
                "subscription_id",
                format!(
                    "subscription_id {:?} names no subscription of program {:?} (a capture with it starts one)",
                    p.subscription_id, program.id
                ),
            ));
        };
        if self.orders.seq_of(prog, &p.payment_id).is_some() {
            return Err(reject(
                Reason::DuplicateId,
                "payment_id",
                format!("payment_id {:?} is taken by an open order of program {:?}", p.payment_id, program.id),
            ));
        }
        let uncredited = if sub.cancelled_at.is_some_and(|c| e.ts >= c) {
            Some("cancelled")
        } else if subs.max_duration.end(sub.started).is_some_and(|end| e.ts >= end) {
            Some("ended")
        } else {
            None
        };
        let credit = if uncredited.is_none() { sub.credit.clone() } else { None };
        let plan = p.extra.plan.as_deref().map(Box::<str>::from).or_else(|| sub.plan.clone());
        // Validated: apply.
        let mut order = self.new_order(prog, &p.payment_id, e.ts, credit, rules, program);
        order.extra = Some(Box::new(OrderExtra {
            kind: OrderKind::Payment,
            subtype: Some(p.kind.as_str().into()),
            subscription_id: Some(p.subscription_id.as_ref().into()),
            uncredited: uncredited.filter(|_| sub.credit.is_some()).map(Into::into),
            ..OrderExtra::default()
        }));
        order.captured = p.amount;
        order.captures = 1;
        let credited = order.credit.as_ref().map(|c| c.partner_id.clone());
        let seq = self.orders.insert(prog, order);
        if let Some(c) = credited.clone() {
            let detail =
                vec![("subscription_id", p.subscription_id.to_string()), ("payment", p.kind.as_str().to_string())];
            self.notice("order.attributed", e, Some(c), &p.payment_id, detail);
        }
        let key = sub_key(prog, &p.subscription_id);
        if let Some(s) = self.subscriptions.get_mut(&key) {
            s.payments += 1;
            s.last_activity = s.last_activity.max(e.ts);
            if p.extra.plan.is_some() {
                s.plan = plan.clone();
            }
        }
        self.meta.stats.applied_payments += 1;
        if let Some(c) = &credited {
            let days = program.fraud.refund_rate_window.num_days();
            self.refund_windows(prog, c, |w| w.captured(e.ts.timestamp_micros(), p.amount, days));
        }
        let mut extra = p.extra.clone();
        extra.plan = plan.map(|p| std::borrow::Cow::Owned(p.into_string()));
        let sale = Sale { amount: p.amount, items: &p.items, extra: &extra, payment: Some(p.kind) };
        self.accrue(seq, e, &sale, rules, program);
        self.touch_order_for_store(seq);
        Ok(())
    }

    pub(super) fn apply_cancel(
        &mut self,
        e: &Event<'_>,
        c: &Cancel<'_>,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        let Some(sub) = self.subscription(prog, &c.subscription_id) else {
            return Err(reject(
                Reason::UnknownSubscription,
                "subscription_id",
                format!("subscription_id {:?} names no subscription of program {:?}", c.subscription_id, program.id),
            ));
        };
        if let Some(at) = sub.cancelled_at {
            return Err(reject(
                Reason::AlreadyDecided,
                "subscription_id",
                format!("subscription {:?} was cancelled at {}", c.subscription_id, at.to_rfc3339()),
            ));
        }
        let key = sub_key(prog, &c.subscription_id);
        if let Some(s) = self.subscriptions.get_mut(&key) {
            s.cancelled_at = Some(e.ts);
            s.last_activity = s.last_activity.max(e.ts);
        }
        self.meta.stats.applied_cancels += 1;
        Ok(())
    }

    /// Forgets a program's subscriptions that can earn no more (cancelled,
    /// or past their `max_duration`) and saw nothing since `cutoff`.
    pub(super) fn forget_subscriptions_before(&mut self, prog: u32, program: &Program, cutoff: DateTime<Utc>) {
        let Some(subs) = program.subscriptions.as_ref() else { return };
        self.subscriptions.retain(|_, s| {
            let done = s.program == prog
                && s.last_activity < cutoff
                && (s.cancelled_at.is_some() || subs.max_duration.end(s.started).is_some_and(|end| end < cutoff));
            (!done, false)
        });
    }

    /// Subscriptions tracked (for metrics and tests).
    pub fn subscriptions_tracked(&self) -> usize {
        self.subscriptions.len()
    }
}
