//! Fraud rules on a new order: every enabled detector runs when the order's
//! attribution is decided; a rule whose action is `hold` holds every line of
//! the order (and of the earlier orders of the same attack) for review.

use std::borrow::Cow;
use std::sync::Arc;

use afflio_rules::{normalize_code, FraudAction, Program, Rules};
use chrono::DateTime;

use super::{micros, Engine};
use crate::event::{Capture, Event};
use crate::fraud::{Hit, KeyKind, SpikeParams};
use crate::output::{AttributionKind, Flag, FraudRule};
use crate::sessions::scoped_key;
use crate::state::{Credit, Review};

/// A flag about to be recorded on one or more orders.
pub(super) struct FlagSpec {
    pub(super) rule: FraudRule,
    pub(super) action: FraudAction,
    pub(super) value: f64,
    pub(super) threshold: f64,
    pub(super) score: f64,
    pub(super) detail: String,
}

impl Engine {
    /// Records `flag` on the order `seq` unless the rule already flagged it.
    pub(super) fn flag_order(&mut self, seq: u64, flag: &FlagSpec, e: &Event<'_>, retroactive: bool) {
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
            threshold: flag.threshold,
            detail: flag.detail.clone(),
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
        let one = |detail: String| Hit { value: 1.0, threshold: 1.0, score: 1.0, detail, retro: Vec::new() };
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
                hits.push((FraudRule::Velocity, Hit { value, threshold, score: value / threshold, detail, retro }));
            }
        }
        if fraud.coupon_leak != FraudAction::Off && cr.kind == AttributionKind::Code {
            let partner = self.names.get(&cr.partner_id);
            let from = ts.saturating_sub(micros(program.window));
            let clicked = c.visitor_id.as_deref().is_some_and(|v| {
                self.sessions
                    .clicks(scoped_key(&program.id, v))
                    .any(|k| k.program == prog && Some(k.partner) == partner && k.ts >= from && k.ts <= ts)
            });
            let min = fraud.coupon_leak_min_orders as usize;
            // Keyed by the code as configured (the credit's source).
            // One lookup; the key is allocated only for a code seen the first time.
            let code = self.names.intern(&normalize_code(&cr.source));
            let w = self.leak.get_or_default((prog, code));
            if let Some((share, retro)) = w.record(clicked, &oid, min, fraud.coupon_leak_max_share) {
                let detail = format!(
                    "code {}: {:.0}% of its last {min} redemptions had no click from {}'s links (limit {:.0}%)",
                    cr.source,
                    share * 100.0,
                    cr.partner_id,
                    fraud.coupon_leak_max_share * 100.0
                );
                let threshold = fraud.coupon_leak_max_share;
                hits.push((FraudRule::CouponLeak, Hit { value: share, threshold, score: share, detail, retro }));
            }
        }
        if fraud.conversion_spike != FraudAction::Off {
            // Partners are configured: interning them is bounded.
            let partner = self.names.intern(&cr.partner_id);
            {
                let params = SpikeParams {
                    bucket: micros(fraud.conversion_spike_bucket),
                    min_orders: fraud.conversion_spike_min_orders,
                    threshold: fraud.conversion_spike_threshold,
                    warmup: fraud.conversion_spike_warmup,
                };
                if let Some(h) = self.spike.record(prog, partner, ts, &oid, &params) {
                    let start = DateTime::from_timestamp_micros(h.bucket_start).unwrap_or(DateTime::UNIX_EPOCH);
                    let detail = format!(
                        "partner {} has {} of the program's {} orders in the {} bucket from {}, {:.1} expected \
                         from its baseline: {:.1} standard deviations above (limit {})",
                        cr.partner_id,
                        h.count,
                        h.program_count,
                        afflio_rules::format_duration(fraud.conversion_spike_bucket),
                        start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        h.expected,
                        h.z,
                        fraud.conversion_spike_threshold
                    );
                    let threshold = fraud.conversion_spike_threshold;
                    let hit = Hit { value: h.z, threshold, score: h.z / threshold, detail, retro: h.retro };
                    hits.push((FraudRule::ConversionSpike, hit));
                }
            }
        }
        if fraud.refund_rate != FraudAction::Off {
            let partner = self.names.intern(&cr.partner_id);
            let r = self.refunds_by_partner.get_or_default((prog, partner));
            // Judged on the partner's window before this order.
            let (n, share) = r.share();
            r.order(ts, fraud.refund_rate_window.num_days());
            if n >= fraud.refund_rate_min_orders && share > fraud.refund_rate_max_share {
                let detail = format!(
                    "partner {} has {:.0}% of captured revenue refunded over {n} orders in the last {} (limit {:.0}%)",
                    cr.partner_id,
                    share * 100.0,
                    afflio_rules::format_duration(fraud.refund_rate_window),
                    fraud.refund_rate_max_share * 100.0
                );
                let threshold = fraud.refund_rate_max_share;
                hits.push((
                    FraudRule::RefundRate,
                    Hit { value: share, threshold, score: share, detail, retro: vec![] },
                ));
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
                    hits.push((FraudRule::FastConversion, Hit { value, threshold, score, detail, retro: vec![] }));
                }
            }
        }
    }
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
