//! Fraud rules on a new order: every enabled detector runs when the order's
//! attribution is decided; a rule whose action is `hold` holds every line of
//! the order (and of the earlier orders of the same attack) for review.

use std::borrow::Cow;
use std::sync::Arc;

use afflio_rules::{normalize_code, FraudAction, Program, Rules};
use chrono::DateTime;

use super::{micros, Engine};
use crate::event::{Capture, Event};
use crate::fraud::{
    refund_verdict, signal, Hit, KeyKind, RateParams, RefundParams, RefundShare, RunOrder, NO_BUCKETS, PROGRAM_KEY,
};
use crate::output::{AttributionKind, Flag, FraudRule};
use crate::sessions::scoped_key;
use crate::state::{Credit, Review};

/// A flag about to be recorded on one or more orders.
pub(super) struct FlagSpec {
    pub(super) rule: FraudRule,
    pub(super) action: FraudAction,
    pub(super) value: f64,
    pub(super) baseline: Option<f64>,
    pub(super) threshold: f64,
    pub(super) score: f64,
    pub(super) detail: String,
}

impl Engine {
    /// Records `flag` on the order `seq` unless the rule already flagged it;
    /// `reason` (the order's own) is appended to the flag's detail.
    pub(super) fn flag_order(
        &mut self,
        seq: u64,
        flag: &FlagSpec,
        reason: Option<&str>,
        e: &Event<'_>,
        retroactive: bool,
    ) {
        let already = self.orders.get(seq).is_none_or(|o| o.credit.is_none() || o.flags.contains(&flag.rule));
        if already {
            return;
        }
        let order = self.orders.get_mut(seq).expect("checked above");
        let Some(cr) = &order.credit else { return };
        if flag.action == FraudAction::Hold {
            order.held = true;
            for l in &mut order.lines {
                // New evidence reopens a review that had cleared or approved
                // the line; a paid or rejected line stays what it is.
                if matches!(l.review, Some(Review::Cleared | Review::Approved)) {
                    l.review = None;
                }
            }
        }
        order.flags.push(flag.rule);
        self.meta.stats.flags += 1;
        self.out.flags.push(Flag {
            program_id: order.program_id.clone(),
            order_id: order.order_id.to_string(),
            partner_id: cr.partner_id.clone(),
            rule: flag.rule,
            action: flag.action,
            score: flag.score,
            value: flag.value,
            baseline: flag.baseline,
            threshold: flag.threshold,
            detail: match reason {
                Some(r) => format!("{}; this order: {r}", flag.detail),
                None => flag.detail.clone(),
            },
            ts: e.ts,
            event_id: e.event_id.to_string(),
            retroactive,
        });
        if flag.action == FraudAction::Hold {
            self.note_lines_changed(seq);
        }
    }

    /// Runs every enabled detector on a new order credited to `cr`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn detect(
        &mut self,
        hits: &mut Vec<(FraudRule, Hit)>,
        e: &Event<'_>,
        c: &Capture<'_>,
        cr: &Credit,
        valid: &[&afflio_rules::Code],
        click_ts: Option<i64>,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) {
        let fraud = &program.fraud;
        let ts = e.ts.timestamp_micros();
        // One allocation of the order id, shared by every detector's state.
        let oid: Arc<str> = Arc::from(&*c.order_id);
        let one = |detail: String| Hit::on_order(1.0, 1.0, 1.0, detail);
        if fraud.self_referral != FraudAction::Off {
            if let Some(detail) = self_referral(self.find_partner(rules, &cr.partner_id), &cr.partner_id, c) {
                hits.push((FraudRule::SelfReferral, one(detail)));
            }
        }
        if fraud.coupon_stacking != FraudAction::Off {
            let mut partners: Vec<&str> = valid.iter().map(|v| v.partner_id.as_str()).collect();
            partners.sort_unstable();
            partners.dedup();
            if partners.len() >= 2 {
                let codes: Vec<&str> = valid.iter().map(|v| v.code.as_str()).collect();
                let detail = format!(
                    "valid codes of {} partners on one order: {} (partners {})",
                    partners.len(),
                    codes.join(", "),
                    partners.join(", ")
                );
                hits.push((FraudRule::CouponStacking, one(detail)));
            }
        }
        if fraud.velocity != FraudAction::Off {
            let window = micros(fraud.velocity_window);
            let max = fraud.velocity_max_orders as usize;
            let cu = c.customer.as_ref();
            let keys = [
                cu.and_then(|cu| cu.id.as_deref()).map(|v| (KeyKind::CustomerId, Cow::Borrowed(v))),
                cu.and_then(|cu| cu.email_sha256.as_deref()).map(|v| {
                    let v = v.trim();
                    let v = if v.bytes().any(|b| b.is_ascii_uppercase()) {
                        Cow::Owned(v.to_ascii_lowercase())
                    } else {
                        Cow::Borrowed(v)
                    };
                    (KeyKind::EmailSha256, v)
                }),
                c.ip.as_deref().map(|v| (KeyKind::Ip, Cow::Borrowed(v))),
            ];
            let v = &mut self.velocity;
            let mut worst: Option<(KeyKind, Cow<'_, str>, Vec<Arc<str>>)> = None;
            for (kind, value) in keys.into_iter().flatten() {
                let found = match v.record(prog, kind, &value, ts, &oid, window, max) {
                    Ok(found) => found,
                    Err(()) => {
                        self.meta.stats.velocity_keys_dropped += 1;
                        None
                    }
                };
                if let Some(orders) = found {
                    match &mut worst {
                        Some(w) => {
                            for o in orders {
                                if !w.2.contains(&o) {
                                    w.2.push(o);
                                }
                            }
                        }
                        None => worst = Some((kind, value, orders)),
                    }
                }
            }
            if let Some((kind, value, retro)) = worst {
                let n = retro.len();
                let detail = format!(
                    "{n} orders from {} {value} within {} (limit {max})",
                    kind.label(),
                    afflio_rules::format_duration(fraud.velocity_window),
                );
                let (value, threshold) = (n as f64, max as f64);
                let mut hit = Hit::on_order(value, threshold, value / threshold, detail);
                hit.retro = retro.into_iter().map(|o| (o, None)).collect();
                hits.push((FraudRule::Velocity, hit));
            }
        }
        // The program's credited orders per bucket: the baseline of
        // conversion_spike and coupon_leak.
        let bucket = micros(fraud.conversion_spike_bucket);
        let rated = fraud.conversion_spike != FraudAction::Off || fraud.coupon_leak != FraudAction::Off;
        if rated {
            self.spike.count(prog, ts, bucket);
        }
        // Did the visitor click one of the credited partner's links in the window?
        let partner = self.names.intern(&cr.partner_id);
        let gap = click_ts.filter(|_| cr.kind == AttributionKind::Link).map(|t| (ts - t) / 1_000_000);
        let clicked = match cr.kind {
            AttributionKind::Link => true,
            // Only the rate rules ask; the session lookup is skipped otherwise.
            AttributionKind::Code if !rated => false,
            AttributionKind::Code => {
                let from = ts.saturating_sub(micros(program.window));
                c.visitor_id.as_deref().is_some_and(|v| {
                    self.sessions
                        .clicks(scoped_key(&program.id, v))
                        .any(|k| k.program == prog && k.partner == partner && k.ts >= from && k.ts <= ts)
                })
            }
        };
        // An order of a leaked code is the leak's, not its partner's spike.
        let mut leaked = false;
        if fraud.coupon_leak != FraudAction::Off && cr.kind == AttributionKind::Code {
            let min = fraud.coupon_leak_min_orders as usize;
            // Keyed by the code as configured (the credit's source).
            // One lookup; the key is allocated only for a code seen the first time.
            let code = self.names.intern(&normalize_code(&cr.source));
            let w = self.leak.get_or_default((prog, code));
            let share = w.share(clicked, min);
            let params = RateParams {
                bucket,
                threshold: fraud.coupon_leak_threshold,
                ratio: fraud.coupon_leak_ratio,
                min_orders: 1,
                warmup: fraud.conversion_spike_warmup,
                memory: fraud.conversion_spike_memory,
                select: false,
            };
            let program_buckets = self.spike.buckets.get(&prog).unwrap_or(&NO_BUCKETS);
            if clicked {
                // Only redemptions with no click are counted; a clicked one
                // moves the code's buckets on.
                w.monitor.advance(ts, program_buckets, &params);
            } else {
                // The recent share must have moved `max_share` of the way from
                // the code's usual share to 100%: a code whose whole audience
                // grew (clicks too) is not a leak.
                let limit = |usual: f64| usual + fraud.coupon_leak_max_share * (1.0 - usual);
                let over = share.filter(|(s, usual)| *s > limit(*usual));
                let order = RunOrder { id: oid.clone(), signals: signal::CODE_ONLY, ip: 0, customer: 0 };
                let rate = w.monitor.record(ts, program_buckets, order, &params, over.is_some());
                leaked = w.monitor.alarm.is_some();
                // The share gates the alarm (see RateMonitor::record); once
                // raised, it lasts while the rate stays up.
                if let (Some((share, usual)), Some(h)) = (share, rate) {
                    let detail = format!(
                        "code {}: {:.0}% of its last {min} redemptions had no click from {}'s links, usually {:.0}% \
                         (limit {:.0}%); {} redemptions with no click in the {} bucket, {:.1} expected from its usual \
                         {:.2}% of the program's {} orders; {} in the run since {} ({:.1} expected): evidence {:.1} \
                         for a {}x rise (limit {})",
                        cr.source,
                        share * 100.0,
                        cr.partner_id,
                        usual * 100.0,
                        limit(usual) * 100.0,
                        h.count,
                        afflio_rules::format_duration(fraud.conversion_spike_bucket),
                        h.expected,
                        h.baseline * 100.0,
                        h.program_count,
                        h.run_count,
                        rfc3339(h.since),
                        h.run_expected,
                        h.evidence,
                        fraud.coupon_leak_ratio,
                        fraud.coupon_leak_threshold
                    );
                    let hit = h.into_hit(fraud.coupon_leak_threshold, detail, |_| None);
                    hits.push((FraudRule::CouponLeak, Hit { current: true, ..hit }));
                }
            }
        }
        if fraud.conversion_spike != FraudAction::Off && !leaked {
            let params = RateParams {
                bucket,
                threshold: fraud.conversion_spike_threshold,
                ratio: fraud.conversion_spike_ratio,
                min_orders: fraud.conversion_spike_min_orders,
                warmup: fraud.conversion_spike_warmup,
                memory: fraud.conversion_spike_memory,
                select: true,
            };
            // The per-order signals, against the partner's usual orders.
            let mut signals = 0;
            {
                let parts = &self.spike.partners;
                let program_gaps = parts.get(&(prog, PROGRAM_KEY)).map(|p| &p.gaps);
                // A partner's first order has nothing of its own to compare with.
                if let Some(sp) = parts.get(&(prog, partner)) {
                    if gap.is_some_and(|g| sp.gaps.below(g, program_gaps, 20.0) < 0.2) {
                        signals |= signal::FRESH;
                    }
                    if !clicked && sp.orders >= 10.0 && sp.code_only < 0.5 * sp.orders {
                        signals |= signal::CODE_ONLY;
                    }
                }
            }
            let hash = |kind: KeyKind, v: Option<&str>| v.map_or(0, |v| crate::fraud::Velocity::key_hash(kind, v));
            let cu = c.customer.as_ref();
            let customer = match cu.and_then(|cu| cu.id.as_deref()) {
                Some(id) => hash(KeyKind::CustomerId, Some(id)),
                None => hash(KeyKind::EmailSha256, cu.and_then(|cu| cu.email_sha256.as_deref())),
            };
            let order = RunOrder { id: oid.clone(), signals, ip: hash(KeyKind::Ip, c.ip.as_deref()), customer };
            let program_buckets = self.spike.buckets.get(&prog).unwrap_or(&NO_BUCKETS);
            let sp = self.spike.partners.get_or_default((prog, partner));
            let h = sp.monitor.record(ts, program_buckets, order, &params, true);
            let learn = sp.monitor.alarm.is_none();
            if learn {
                // The partner's usual orders (not those of a burst).
                if let Some(g) = gap {
                    sp.gaps.record(g);
                }
                let decay = 1.0 - 1.0 / 500.0;
                sp.orders = sp.orders * decay + 1.0;
                sp.code_only = sp.code_only * decay + if clicked { 0.0 } else { 1.0 };
                if let Some(g) = gap {
                    self.spike.partners.get_or_default((prog, PROGRAM_KEY)).gaps.record(g);
                }
            }
            if let Some(h) = h {
                let mode = if h.all {
                    format!(
                        "holding every order of the run: {} of its {} orders have a signal, too few to explain the \
                         excess",
                        h.suspicious, h.run_count
                    )
                } else {
                    format!("holding the run's {} orders with a signal of its {}", h.suspicious, h.run_count)
                };
                let detail = format!(
                    "partner {} has {} of the program's {} orders in the {} bucket, {:.1} expected from its usual \
                     {:.2}%; {} orders since {} where {:.1} were expected: evidence {:.1} for a {}x rise (limit {}); {mode}",
                    cr.partner_id,
                    h.count,
                    h.program_count,
                    afflio_rules::format_duration(fraud.conversion_spike_bucket),
                    h.expected,
                    h.baseline * 100.0,
                    h.run_count,
                    rfc3339(h.since),
                    h.run_expected,
                    h.evidence,
                    fraud.conversion_spike_ratio,
                    fraud.conversion_spike_threshold
                );
                let hit = h.into_hit(fraud.conversion_spike_threshold, detail, |s| Some(signal::describe(s)));
                hits.push((FraudRule::ConversionSpike, Hit { reason: Some(signal::describe(signals)), ..hit }));
            }
        }
        if fraud.refund_rate != FraudAction::Off {
            let days = fraud.refund_rate_window.num_days();
            // Counts only (the money sums are Decimal): the program's rate,
            // and the partner's money share once it has enough orders to judge.
            let program_share = {
                let w = self.refunds_by_partner.get_or_default((prog, PROGRAM_KEY));
                let (orders, refunds) = w.counts();
                w.order(ts, days);
                RefundShare { orders, refunds, money_share: 0.0 }
            };
            let r = self.refunds_by_partner.get_or_default((prog, partner));
            // Judged on the partner's window before this order.
            let (orders, refunds) = r.counts();
            let share = if orders >= fraud.refund_rate_min_orders {
                r.share()
            } else {
                RefundShare { orders, refunds, money_share: 0.0 }
            };
            r.order(ts, days);
            let params = RefundParams {
                min_orders: fraud.refund_rate_min_orders,
                max_share: fraud.refund_rate_max_share,
                ratio: fraud.refund_rate_ratio,
                threshold: fraud.refund_rate_threshold,
            };
            let verdict = refund_verdict(&share, &program_share, &params);
            let first = verdict.is_some() && !r.alarm;
            r.alarm = verdict.is_some();
            if let Some((value, baseline, limit)) = verdict {
                let detail = format!(
                    "partner {}: {} refunds on its {} orders first captured in the last {} ({:.1}% per order, {:.0}% \
                     of captured money), against the program's {:.1}% per order; limit {:.1}% per order ({}x the \
                     program's and {} standard deviations) or {:.0}% of money",
                    cr.partner_id,
                    share.refunds,
                    share.orders,
                    afflio_rules::format_duration(fraud.refund_rate_window),
                    share.rate() * 100.0,
                    share.money_share * 100.0,
                    baseline * 100.0,
                    limit * 100.0,
                    fraud.refund_rate_ratio,
                    fraud.refund_rate_threshold,
                    fraud.refund_rate_max_share * 100.0
                );
                // The first time over the line, the partner's earlier orders
                // of the window are flagged too.
                let retro = if first { self.partner_orders_since(prog, &cr.partner_id, ts, days) } else { Vec::new() };
                let hit = Hit {
                    value,
                    baseline: Some(baseline),
                    threshold: limit,
                    score: value / limit.max(1e-9),
                    detail,
                    reason: None,
                    current: true,
                    retro: retro.into_iter().map(|o| (o, None)).collect(),
                };
                hits.push((FraudRule::RefundRate, hit));
            }
        }
        if fraud.fast_conversion != FraudAction::Off {
            if let (Some(t), AttributionKind::Link) = (click_ts, cr.kind) {
                let gap = ts - t;
                let min = micros(fraud.fast_conversion_min);
                if gap < min {
                    let detail = format!(
                        "captured {:.1}s after the winning click on {} (minimum {}s)",
                        gap as f64 / 1e6,
                        cr.source,
                        fraud.fast_conversion_min.num_seconds()
                    );
                    let (value, threshold) = (gap as f64 / 1e6, min as f64 / 1e6);
                    let score = 1.0 - gap as f64 / min as f64;
                    hits.push((FraudRule::FastConversion, Hit::on_order(value, threshold, score, detail)));
                }
            }
        }
    }
}

impl Engine {
    /// Applies `f` to the refund_rate windows of `partner` and of its
    /// program, when the rule keeps them.
    pub(super) fn refund_windows(&mut self, prog: u32, partner: &str, f: impl Fn(&mut crate::fraud::RefundWindow)) {
        if let Some(pi) = self.names.get(partner) {
            if let Some(w) = self.refunds_by_partner.get_mut(&(prog, pi)) {
                f(w);
                if let Some(w) = self.refunds_by_partner.get_mut(&(prog, PROGRAM_KEY)) {
                    f(w);
                }
            }
        }
    }

    /// The partner's orders first captured in the `days` (whole UTC days)
    /// up to `ts`, newest first, at most [`crate::fraud::RUN_ORDERS`].
    fn partner_orders_since(&self, prog: u32, partner: &str, ts: i64, days: i64) -> Vec<Arc<str>> {
        let from = (ts.div_euclid(86_400_000_000) - days + 1) * 86_400_000_000;
        // Seqs follow first captures: walk back from the newest.
        self.orders
            .of_partner(prog, partner)
            .rev()
            .filter_map(|s| self.orders.get(s))
            .take_while(|o| o.first_capture_ts.timestamp_micros() >= from)
            .filter(|o| o.credit.as_ref().is_some_and(|c| &*c.partner_id == partner))
            .take(crate::fraud::RUN_ORDERS)
            .map(|o| Arc::from(&*o.order_id))
            .collect()
    }
}

fn rfc3339(micros: i64) -> String {
    DateTime::from_timestamp_micros(micros)
        .unwrap_or(DateTime::UNIX_EPOCH)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The configured action of `rule`.
pub(super) fn rule_action(f: &afflio_rules::FraudSettings, rule: FraudRule) -> FraudAction {
    match rule {
        FraudRule::SelfReferral => f.self_referral,
        FraudRule::CouponStacking => f.coupon_stacking,
        FraudRule::Velocity => f.velocity,
        FraudRule::FastConversion => f.fast_conversion,
        FraudRule::CouponLeak => f.coupon_leak,
        FraudRule::RefundRate => f.refund_rate,
        FraudRule::ConversionSpike => f.conversion_spike,
    }
}

fn self_referral(partner: Option<&afflio_rules::Partner>, partner_id: &str, c: &Capture<'_>) -> Option<String> {
    let partner = partner?;
    let cu = c.customer.as_ref()?;
    if let Some(h) = cu.email_sha256.as_deref() {
        if partner.email_sha256.contains(&h.trim().to_ascii_lowercase()) {
            return Some(format!(
                "customer email_sha256 {}… is an identity of partner {partner_id:?}",
                &h.trim()[..h.trim().len().min(12)]
            ));
        }
    }
    if let Some(id) = cu.id.as_deref() {
        if partner.customer_ids.contains(id) {
            return Some(format!("customer id {id:?} is an identity of partner {partner_id:?}"));
        }
    }
    None
}
