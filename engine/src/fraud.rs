//! State of the statistical fraud detectors: streaming, event time, bounded.
//!
//! Each detector keeps only what its rule needs, per program:
//! - velocity: per hashed key (customer id, e-mail hash, IP), the orders of
//!   the last window, at most `max_orders + 1` of them; keys with no order in
//!   the window are swept, and the number of keys is capped;
//! - conversion_spike: per program the order counts of the last
//!   [`SPIKE_BUCKETS`] buckets; per configured partner a [`RateMonitor`] (its
//!   learned share of those orders, the CUSUM evidence, the current run of at
//!   most [`RUN_ORDERS`] orders, an open alarm), its click-to-order times
//!   ([`Gaps`]) and its code-only share, which give each order its signals;
//! - coupon_leak: per configured code, its last `min_orders` redemptions, its
//!   usual no-click share and a [`RateMonitor`] on its no-click redemptions;
//! - refund_rate: per partner and per program, orders, refunds and money per
//!   day of first capture over the window ([`RefundWindow`]).
//!
//! A detector returns the orders to flag, including earlier orders of the
//! same attack that are still in its state ("retroactive" flags): an attack is
//! recognised on its n-th order, but all n orders belong to it. The
//! arithmetic is described in docs/FRAUD.md.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use hashbrown::HashMap;

use crate::state::tracked::Tracked;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Buckets of program order counts kept for conversion_spike.
pub(crate) const SPIKE_BUCKETS: usize = 64;
/// Velocity keys tracked per program; beyond it new keys are not tracked
/// until the sweep frees room (counted in `velocity_keys_dropped`).
pub(crate) const VELOCITY_MAX_KEYS: usize = 2_000_000;

/// What a detector found: the measured value against its baseline and
/// threshold, a reviewer's explanation, whether the current order is
/// flagged, and earlier orders of the same attack (each with its own reason
/// when the rule has one).
#[derive(Debug)]
pub(crate) struct Hit {
    pub(crate) value: f64,
    pub(crate) baseline: Option<f64>,
    pub(crate) threshold: f64,
    pub(crate) score: f64,
    pub(crate) detail: String,
    /// The current order's own reason, appended to `detail`.
    pub(crate) reason: Option<String>,
    pub(crate) current: bool,
    pub(crate) retro: Vec<(Arc<str>, Option<String>)>,
}

impl Hit {
    /// A hit on the current order alone.
    pub(crate) fn on_order(value: f64, threshold: f64, score: f64, detail: String) -> Hit {
        Hit { value, baseline: None, threshold, score, detail, reason: None, current: true, retro: Vec::new() }
    }
}

/// The kind of a velocity key.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KeyKind {
    CustomerId,
    EmailSha256,
    Ip,
}

impl KeyKind {
    fn tag(self) -> u8 {
        match self {
            KeyKind::CustomerId => 1,
            KeyKind::EmailSha256 => 2,
            KeyKind::Ip => 3,
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            KeyKind::CustomerId => "customer id",
            KeyKind::EmailSha256 => "email_sha256",
            KeyKind::Ip => "ip",
        }
    }
}

/// A key's orders in the window: most keys see one order, kept inline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum KeyOrders {
    One(i64, Arc<str>),
    Many(VecDeque<(i64, Arc<str>)>),
}

impl KeyOrders {
    fn newest(&self) -> i64 {
        match self {
            KeyOrders::One(t, _) => *t,
            KeyOrders::Many(q) => q.back().map_or(i64::MIN, |(t, _)| *t),
        }
    }
}

/// Orders per (program, key) within the window.
#[derive(Clone, Debug, Default)]
pub(crate) struct Velocity {
    pub(crate) keys: Tracked<(u32, u64), KeyOrders>,
    /// Keys per program (derived).
    counts: HashMap<u32, usize>,
}

impl Velocity {
    /// The 64-bit hash a key is kept under.
    pub(crate) fn key_hash(kind: KeyKind, value: &str) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&[kind.tag()]);
        h.update(value.as_bytes());
        h.digest()
    }

    /// Recounts keys per program (after a restore).
    pub(crate) fn recount(&mut self) {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for ((p, _), _) in self.keys.iter() {
            *counts.entry(*p).or_default() += 1;
        }
        self.counts = counts;
    }

    /// Records an order at `ts` for `value` in `program`; when the key has
    /// more than `max` orders in `(ts - window, ts]`, returns them all (the
    /// newest last). `Err(())` when the program tracks too many keys to add
    /// this one.
    #[allow(clippy::too_many_arguments, clippy::result_unit_err)]
    pub(crate) fn record(
        &mut self,
        program: u32,
        kind: KeyKind,
        value: &str,
        ts: i64,
        order_id: &Arc<str>,
        window: i64,
        max: usize,
    ) -> Result<Option<Vec<Arc<str>>>, ()> {
        let key = (program, Velocity::key_hash(kind, value));
        let count = self.counts.entry(program).or_default();
        let q = match self.keys.get_mut(&key) {
            None if *count >= VELOCITY_MAX_KEYS => return Err(()),
            None => {
                *count += 1;
                self.keys.insert(key, KeyOrders::One(ts, order_id.clone()));
                return Ok((max == 0).then(|| vec![order_id.clone()]));
            }
            Some(k) if k.newest() <= ts.saturating_sub(window) => {
                // Every order of the key has left the window.
                *k = KeyOrders::One(ts, order_id.clone());
                return Ok((max == 0).then(|| vec![order_id.clone()]));
            }
            Some(k) => {
                if let KeyOrders::One(t, o) = k {
                    let first = (*t, o.clone());
                    *k = KeyOrders::Many(VecDeque::from([first]));
                }
                let KeyOrders::Many(q) = k else { unreachable!("converted above") };
                q
            }
        };
        q.retain(|(t, _)| *t > ts.saturating_sub(window));
        q.push_back((ts, order_id.clone()));
        // Bounded: only "more than max" matters.
        while q.len() > max + 1 {
            q.pop_front();
        }
        debug_assert!(q.len() <= max + 1);
        Ok((q.len() > max).then(|| q.iter().map(|(_, o)| o.clone()).collect()))
    }

    /// Forgets keys with no order after their program's cutoff.
    pub(crate) fn sweep(&mut self, cutoff: impl Fn(u32) -> Option<i64>) {
        let counts = &mut self.counts;
        self.keys.retain(|(p, _), q| {
            let kept = cutoff(*p).is_none_or(|c| q.newest() > c);
            if !kept {
                if let Some(n) = counts.get_mut(p) {
                    *n = n.saturating_sub(1);
                }
            }
            (kept, false)
        });
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

/// One partner's orders (or, under the program's key, every credited
/// order's), refunds and money per day of first capture, over a sliding
/// window (refund_rate).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct RefundWindow {
    /// (day, orders, refunds, captured, refunded), oldest first, within the window.
    days: VecDeque<(i64, u32, u32, Decimal, Decimal)>,
    /// The partner was over the line at its last order (its earlier orders
    /// in the window have been flagged once).
    pub(crate) alarm: bool,
}

const DAY: i64 = 86_400_000_000;

/// A partner's refunds against its program's, over the window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RefundShare {
    pub(crate) orders: u32,
    pub(crate) refunds: u32,
    /// Refunded money / captured money of the window's orders.
    pub(crate) money_share: f64,
}

impl RefundShare {
    /// Refunds per order.
    pub(crate) fn rate(&self) -> f64 {
        if self.orders == 0 {
            0.0
        } else {
            f64::from(self.refunds) / f64::from(self.orders)
        }
    }
}

impl RefundWindow {
    fn day(&mut self, ts: i64, window_days: i64) -> Option<&mut (i64, u32, u32, Decimal, Decimal)> {
        let d = ts.div_euclid(DAY);
        let newest = self.days.back().map_or(d, |b| b.0.max(d));
        while self.days.front().is_some_and(|f| f.0 <= newest - window_days) {
            self.days.pop_front();
        }
        if d <= newest - window_days {
            return None;
        }
        let i = match self.days.iter().rposition(|b| b.0 <= d) {
            Some(i) if self.days[i].0 == d => i,
            Some(i) => {
                self.days.insert(i + 1, (d, 0, 0, Decimal::ZERO, Decimal::ZERO));
                i + 1
            }
            None => {
                self.days.push_front((d, 0, 0, Decimal::ZERO, Decimal::ZERO));
                0
            }
        };
        debug_assert!(self.days.len() as i64 <= window_days);
        self.days.get_mut(i)
    }

    pub(crate) fn order(&mut self, ts: i64, window_days: i64) {
        if let Some(b) = self.day(ts, window_days) {
            b.1 += 1;
        }
    }

    pub(crate) fn captured(&mut self, ts: i64, amount: Decimal, window_days: i64) {
        if let Some(b) = self.day(ts, window_days) {
            b.3 += amount;
        }
    }

    /// A refund (or chargeback) of an order first captured at `cohort`.
    pub(crate) fn refunded(&mut self, cohort: i64, amount: Decimal, window_days: i64) {
        if let Some(b) = self.day(cohort, window_days) {
            b.2 += 1;
            b.4 += amount;
        }
    }

    /// Orders and refunds in the window.
    pub(crate) fn counts(&self) -> (u32, u32) {
        self.days.iter().fold((0, 0), |a, b| (a.0 + b.1, a.1 + b.2))
    }

    /// Orders, refunds and the refunded share of captured money in the window.
    pub(crate) fn share(&self) -> RefundShare {
        let (orders, refunds, c, r) = self
            .days
            .iter()
            .fold((0, 0, Decimal::ZERO, Decimal::ZERO), |a, b| (a.0 + b.1, a.1 + b.2, a.2 + b.3, a.3 + b.4));
        // A ratio for a threshold, not money: f64 is fine.
        let money_share = if c.is_zero() { 0.0 } else { (r / c).to_f64().unwrap_or(0.0) };
        RefundShare { orders, refunds, money_share }
    }
}

/// What a refund_rate judgement needs from the config.
pub(crate) struct RefundParams {
    pub(crate) min_orders: u32,
    pub(crate) max_share: f64,
    pub(crate) ratio: f64,
    pub(crate) threshold: f64,
}

/// Judges a partner's refunds against its program's over the same window:
/// `Some((value, baseline, limit))` when the partner has at least
/// `min_orders` orders and either its refunds per order exceed `ratio` times
/// the program's and stand `threshold` standard deviations (Poisson) above
/// what the program's rate predicts, or its refunded share of captured money
/// exceeds `max_share`. Only the program's orders and refunds are read.
pub(crate) fn refund_verdict(
    partner: &RefundShare,
    program: &RefundShare,
    p: &RefundParams,
) -> Option<(f64, f64, f64)> {
    if partner.orders < p.min_orders {
        return None;
    }
    let base = program.rate();
    let n = f64::from(partner.orders);
    let expected = base * n;
    // The refunds per order at which both tests pass.
    let limit = (p.ratio * base).max(base + p.threshold * (expected + 1.0).sqrt() / n);
    let rate = partner.rate();
    if rate > limit {
        return Some((rate, base, limit));
    }
    (partner.money_share > p.max_share).then_some((partner.money_share, base, p.max_share))
}

/// Per-order signals that tell a burst's orders from a partner's usual ones.
pub(crate) mod signal {
    /// Clicked much more recently before the order than the partner's
    /// shoppers usually do (below the fifth of its click-to-order times).
    pub(crate) const FRESH: u8 = 1;
    /// No click from the partner although most of its orders come after one.
    pub(crate) const CODE_ONLY: u8 = 2;
    /// Its IP or customer (id or e-mail) appears on another order of the run.
    pub(crate) const REPEAT: u8 = 4;

    /// The signals as words for a reviewer.
    pub(crate) fn describe(bits: u8) -> String {
        let mut words = Vec::new();
        if bits & FRESH != 0 {
            words.push("fresh click");
        }
        if bits & CODE_ONLY != 0 {
            words.push("code with no click");
        }
        if bits & REPEAT != 0 {
            words.push("ip or customer repeated in the run");
        }
        if words.is_empty() {
            "like the partner's usual orders".to_string()
        } else {
            words.join(", ")
        }
    }
}

/// One order of a run of evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunOrder {
    pub(crate) id: Arc<str>,
    pub(crate) signals: u8,
    /// Hashes of its IP and customer (0: none).
    pub(crate) ip: u64,
    pub(crate) customer: u64,
}

/// An alarm: the evidence crossed the threshold and has not fallen back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Alarm {
    /// Event time of the order that raised it.
    pub(crate) since: i64,
    /// Hold every order of the run (the signals do not explain the excess),
    /// or only the orders with a signal.
    pub(crate) all: bool,
}

/// Evidence that one key's orders (a partner's, or a code's redemptions with
/// no click) run above their learned share of the program's orders: a
/// one-sided Poisson CUSUM per bucket of event time against a baseline
/// learned online.
///
/// The baseline is the key's share of the program's orders, a decayed sum
/// over `memory` buckets (buckets in alarm are not learned). Each bucket adds
/// `c·ln(ratio) − (ratio − 1)·e` to the evidence (`c` the key's orders, `e`
/// the baseline's expectation given the program's orders): the log-likelihood
/// ratio of "`ratio` times the usual rate" against "the usual rate". The
/// evidence never goes below 0, is capped at [`EVIDENCE_CAP`] × threshold,
/// and halves after a bucket with none of the key's orders, so an alarm ends
/// soon after the burst does. The current bucket is judged as its orders
/// arrive.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct RateMonitor {
    bucket: i64,
    count: u32,
    num: f64,
    den: f64,
    /// The key's usual rate by hour of day and day of week, relative to its share.
    profile: Profile,
    /// Buckets folded into the baseline.
    seen: u32,
    /// At the end of the previous bucket.
    evidence: f64,
    /// The orders since the evidence last was 0 (at most [`RUN_ORDERS`]).
    run: Vec<RunOrder>,
    run_count: u32,
    /// The baseline's expectation over the run's finished buckets.
    run_expected: f64,
    pub(crate) alarm: Option<Alarm>,
}

/// A key's orders against what its share predicted, per hour of day (UTC)
/// and per day of week, decayed: the factor by which the key's usual rate at
/// this hour and day differs from its share (a creator whose audience is
/// awake when the program's is not, a weekend-heavy one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Profile {
    hour: [(f32, f32); 24],
    day: [(f32, f32); 7],
    /// The day being counted (days since the epoch) and its sums: a day is
    /// learned once it is over, so a burst never raises its own day's factor.
    today: (i64, f32, f32),
}

impl Default for Profile {
    fn default() -> Self {
        Profile { hour: [(0.0, 0.0); 24], day: [(0.0, 0.0); 7], today: (i64::MIN, 0.0, 0.0) }
    }
}

/// Expected orders of prior weight pulling a factor toward 1 (few data: no change).
const PROFILE_PRIOR: f32 = 3.0;
/// Days an hour-of-day slot remembers; weeks a day-of-week slot remembers.
const PROFILE_DAYS: f32 = 14.0;
const PROFILE_WEEKS: f32 = 4.0;

impl Profile {
    fn slots(ts: i64) -> (usize, usize) {
        let hours = ts.div_euclid(3_600_000_000);
        (hours.rem_euclid(24) as usize, Profile::weekday(hours.div_euclid(24)))
    }

    /// 1970-01-01 was a Thursday: Monday is 0.
    fn weekday(days: i64) -> usize {
        (days + 3).rem_euclid(7) as usize
    }

    /// The factor on the key's expectation at `ts`: never below 1. The
    /// profile only raises what is expected at the key's busy hours and days
    /// (which would otherwise look like bursts every day); lowering it at its
    /// quiet ones would turn the noise of a few days' estimates into alarms.
    pub(crate) fn factor(&self, ts: i64) -> f64 {
        let (h, d) = Profile::slots(ts);
        let f = |(obs, exp): (f32, f32)| f64::from((obs + PROFILE_PRIOR) / (exp + PROFILE_PRIOR)).max(1.0);
        f(self.hour[h]) * f(self.day[d])
    }

    /// Learns a bucket starting at `ts`: `c` orders where the share alone
    /// predicted `flat`, with weight `w`.
    fn learn(&mut self, ts: i64, c: u32, flat: f64, w: f64) {
        let (h, _) = Profile::slots(ts);
        let (c, flat, w) = (c as f32, flat as f32, w as f32);
        // An hour slot sees one bucket a day.
        let decay = 1.0 - w / PROFILE_DAYS;
        let slot = &mut self.hour[h];
        *slot = (slot.0 * decay + w * c, slot.1 * decay + w * flat);
        let day = ts.div_euclid(86_400_000_000);
        if day != self.today.0 {
            if self.today.0 != i64::MIN {
                let decay = 1.0 - 1.0 / PROFILE_WEEKS;
                let slot = &mut self.day[Profile::weekday(self.today.0)];
                *slot = (slot.0 * decay + self.today.1, slot.1 * decay + self.today.2);
            }
            self.today = (day, 0.0, 0.0);
        }
        self.today.1 += w * c;
        self.today.2 += w * flat;
    }
}

/// Orders of one run remembered for retroactive flags.
pub(crate) const RUN_ORDERS: usize = 256;
/// The weight a bucket in alarm is learned with.
pub(crate) const ALARM_WEIGHT: f64 = 0.1;
/// The evidence's cap, as a multiple of the threshold.
pub(crate) const EVIDENCE_CAP: f64 = 1.5;

/// What a rate judgement needs from the config.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RateParams {
    pub(crate) bucket: i64,
    pub(crate) threshold: f64,
    pub(crate) ratio: f64,
    pub(crate) min_orders: u32,
    pub(crate) warmup: u32,
    pub(crate) memory: u32,
    /// Choose the orders to hold by their signals (conversion_spike) or hold
    /// every order of the run (coupon_leak, whose orders all lack a click).
    pub(crate) select: bool,
}

/// A judged run above the baseline.
#[derive(Debug)]
pub(crate) struct RateHit {
    pub(crate) evidence: f64,
    /// The key's orders in the current bucket, the baseline's expectation
    /// for them, the program's orders in it.
    pub(crate) count: u32,
    pub(crate) expected: f64,
    pub(crate) program_count: u32,
    /// The learned share of the program's orders.
    pub(crate) baseline: f64,
    pub(crate) run_count: u32,
    pub(crate) run_expected: f64,
    /// Orders of the run with a signal.
    pub(crate) suspicious: u32,
    pub(crate) all: bool,
    /// Whether the current order is held.
    pub(crate) current: bool,
    /// The earlier orders to flag (the run's, when the alarm is raised).
    pub(crate) retro: Vec<RunOrder>,
    pub(crate) since: i64,
}

impl RateHit {
    /// The flag's measures and earlier orders (each with `reason_of` its
    /// signals); the current order is held as the monitor decided.
    pub(crate) fn into_hit(self, threshold: f64, detail: String, reason_of: impl Fn(u8) -> Option<String>) -> Hit {
        Hit {
            value: self.evidence,
            baseline: Some(self.baseline),
            threshold,
            score: self.evidence / threshold,
            detail,
            reason: None,
            current: self.current,
            retro: self.retro.into_iter().map(|o| (o.id, reason_of(o.signals))).collect(),
        }
    }
}

fn program_count(buckets: &VecDeque<(i64, u32)>, bucket: i64) -> u32 {
    buckets.iter().rev().find(|(b, _)| *b == bucket).map_or(0, |(_, n)| *n)
}

impl RateMonitor {
    fn mean(&self) -> f64 {
        if self.den > 0.0 {
            self.num / self.den
        } else {
            0.0
        }
    }

    fn clear_run(&mut self) {
        self.run.clear();
        self.run_count = 0;
        self.run_expected = 0.0;
        self.alarm = None;
    }

    /// Folds the finished bucket `k` with `c` of the key's orders of the program's `n`.
    fn fold(&mut self, k: i64, c: u32, n: u32, p: &RateParams) {
        if n == 0 && c == 0 {
            return;
        }
        let n = n.max(c);
        let start = k.saturating_mul(p.bucket);
        let flat = self.mean() * f64::from(n);
        let e = flat * self.profile.factor(start);
        if self.seen >= p.warmup {
            let llr = f64::from(c) * p.ratio.ln() - (p.ratio - 1.0) * e;
            self.evidence = (self.evidence + llr).clamp(0.0, EVIDENCE_CAP * p.threshold);
            if c == 0 {
                self.evidence /= 2.0;
            }
            self.run_expected += e;
        }
        // A bucket in alarm is learned at a tenth of its weight: a burst
        // does not become the new normal, a lasting change eventually does.
        let w = if self.alarm.is_none() { 1.0 } else { ALARM_WEIGHT };
        if self.seen > 0 {
            self.profile.learn(start, c, flat, w);
        }
        let d = 1.0 - w / f64::from(p.memory.max(2));
        self.num = self.num * d + w * f64::from(c);
        self.den = self.den * d + w * f64::from(n);
        self.seen = self.seen.saturating_add(1);
        if self.evidence < 1e-9 {
            self.evidence = 0.0;
            self.clear_run();
        } else if self.alarm.is_some() && self.evidence < p.threshold {
            // The key is back near its baseline: the window ends.
            self.clear_run();
        }
        debug_assert!(self.evidence >= 0.0 && self.evidence <= EVIDENCE_CAP * p.threshold);
    }

    /// Records an order of the key at `ts`; `program` holds the program's
    /// orders per bucket (this order included). Returns a hit while the
    /// evidence is over the threshold; an alarm is raised only while the
    /// caller's other condition (`allowed`) holds, and lasts without it.
    pub(crate) fn record(
        &mut self,
        ts: i64,
        program: &VecDeque<(i64, u32)>,
        mut order: RunOrder,
        p: &RateParams,
        allowed: bool,
    ) -> Option<RateHit> {
        if !self.advance(ts, program, p) {
            // A late order: its bucket was judged already.
            return None;
        }
        self.count += 1;
        if order.ip != 0 || order.customer != 0 {
            for o in &mut self.run {
                if (order.ip != 0 && o.ip == order.ip) || (order.customer != 0 && o.customer == order.customer) {
                    o.signals |= signal::REPEAT;
                    order.signals |= signal::REPEAT;
                }
            }
        }
        self.run_count += 1;
        let signals = order.signals;
        if self.run.len() < RUN_ORDERS {
            self.run.push(order);
        }
        if self.seen < p.warmup {
            return None;
        }
        let n = program_count(program, self.bucket).max(self.count);
        let expected = self.mean() * f64::from(n) * self.profile.factor(ts);
        let evidence = self.evidence + f64::from(self.count) * p.ratio.ln() - (p.ratio - 1.0) * expected;
        if evidence < p.threshold || self.run_count < p.min_orders || (self.alarm.is_none() && !allowed) {
            return None;
        }
        let suspicious = self.run.iter().filter(|o| o.signals != 0).count() as u32;
        let run_expected = self.run_expected + expected;
        // Hold the orders with a signal while they explain at least half the
        // excess over the baseline; otherwise every order of the run.
        let excess = f64::from(self.run_count) - run_expected;
        let explained = p.select && f64::from(suspicious) >= 0.5 * excess;
        let (retro, all, since) = match &mut self.alarm {
            Some(a) if a.all || explained => (Vec::new(), a.all, a.since),
            Some(a) => {
                // The signals no longer explain the run: hold the rest of it.
                a.all = true;
                (self.run.iter().filter(|o| o.signals == 0).cloned().collect(), true, a.since)
            }
            None => {
                let all = !explained;
                self.alarm = Some(Alarm { since: ts, all });
                let retro: Vec<RunOrder> = self.run.iter().filter(|o| all || o.signals != 0).cloned().collect();
                (retro, all, ts)
            }
        };
        Some(RateHit {
            evidence,
            count: self.count,
            expected,
            program_count: n,
            baseline: self.mean(),
            run_count: self.run_count,
            run_expected,
            suspicious,
            all,
            current: all || signals != 0,
            retro,
            since,
        })
    }

    /// Moves to the bucket of `ts`, folding the finished ones; false when
    /// `ts` lies in a bucket already folded.
    pub(crate) fn advance(&mut self, ts: i64, program: &VecDeque<(i64, u32)>, p: &RateParams) -> bool {
        let b = ts.div_euclid(p.bucket);
        if self.count == 0 && self.seen == 0 && self.den == 0.0 {
            self.bucket = b;
        }
        if b < self.bucket {
            return false;
        }
        if b > self.bucket {
            if b - self.bucket > program.len() as i64 {
                // Dormant for longer than the program's buckets are kept.
                self.fold(self.bucket, self.count, program_count(program, self.bucket), p);
                self.evidence = 0.0;
                self.clear_run();
            } else {
                for k in self.bucket..b {
                    let c = if k == self.bucket { self.count } else { 0 };
                    self.fold(k, c, program_count(program, k), p);
                }
            }
            self.bucket = b;
            self.count = 0;
        }
        true
    }

    /// Buckets folded into the baseline.
    #[cfg(test)]
    pub(crate) fn seen(&self) -> u32 {
        self.seen
    }
}

/// Click-to-order times on a log2 scale of seconds, decayed by halving.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Gaps {
    counts: [u32; 24],
    total: u32,
}

/// Past this many times the histogram halves (it follows the recent mix).
const GAPS_MAX: u32 = 2_000;

impl Gaps {
    fn slot(secs: i64) -> usize {
        (63 - secs.max(1).leading_zeros() as usize).min(23)
    }

    pub(crate) fn record(&mut self, secs: i64) {
        self.counts[Gaps::slot(secs)] += 1;
        self.total += 1;
        if self.total > GAPS_MAX {
            self.counts.iter_mut().for_each(|c| *c /= 2);
            self.total = self.counts.iter().sum();
        }
    }

    /// The share of times in slots below `secs`'s, with `prior` (weighted as
    /// `weight` observations) standing in for a partner with few.
    pub(crate) fn below(&self, secs: i64, prior: Option<&Gaps>, weight: f64) -> f64 {
        let s = Gaps::slot(secs);
        let own: u32 = self.counts[..s].iter().sum();
        let (mut num, mut den) = (f64::from(own), f64::from(self.total));
        if let Some(pr) = prior.filter(|p| p.total > 0) {
            let theirs: u32 = pr.counts[..s].iter().sum();
            num += weight * f64::from(theirs) / f64::from(pr.total);
            den += weight;
        }
        if den == 0.0 {
            1.0
        } else {
            num / den
        }
    }
}

/// One partner's conversion_spike state: its rate monitor, its shoppers'
/// click-to-order times, and how many of its orders came by code alone.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SpikePartner {
    pub(crate) monitor: RateMonitor,
    pub(crate) gaps: Gaps,
    /// Decayed counts: orders with no click from the partner, all orders.
    pub(crate) code_only: f32,
    pub(crate) orders: f32,
}

/// No buckets (a program with no counted order yet).
pub(crate) static NO_BUCKETS: VecDeque<(i64, u32)> = VecDeque::new();

/// The key the program's own click-to-order times are kept under.
pub(crate) const PROGRAM_KEY: u32 = u32::MAX;

/// Per program: orders per bucket; per partner (and per program under
/// [`PROGRAM_KEY`]) its state.
#[derive(Clone, Debug, Default)]
pub(crate) struct Spike {
    /// program -> (bucket, orders), oldest first, at most [`SPIKE_BUCKETS`].
    pub(crate) buckets: BTreeMap<u32, VecDeque<(i64, u32)>>,
    pub(crate) partners: Tracked<(u32, u32), SpikePartner>,
}

impl Spike {
    /// Counts a credited order of `program` in its bucket.
    pub(crate) fn count(&mut self, program: u32, ts: i64, bucket: i64) -> &VecDeque<(i64, u32)> {
        let b = ts.div_euclid(bucket);
        let buckets = self.buckets.entry(program).or_default();
        match buckets.back_mut() {
            Some((last, n)) if *last == b => *n += 1,
            Some((last, _)) if *last > b => {
                // A late order: counted in its bucket if still known.
                if let Some(slot) = buckets.iter_mut().find(|(k, _)| *k == b) {
                    slot.1 += 1;
                }
            }
            _ => {
                buckets.push_back((b, 1));
                while buckets.len() > SPIKE_BUCKETS {
                    buckets.pop_front();
                }
            }
        }
        buckets
    }
}

/// The last redemptions of one code (whether a click from the code's partner
/// preceded each) and the rate of its redemptions with no click.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct LeakWindow {
    recent: VecDeque<bool>,
    pub(crate) redemptions: u64,
    /// Decayed counts of its redemptions with no click and of all of them
    /// (its usual no-click share; not learned while in alarm).
    no_click: f32,
    all: f32,
    pub(crate) monitor: RateMonitor,
}

/// Redemptions a code's usual no-click share remembers (decayed).
const LEAK_MEMORY: f32 = 500.0;

impl LeakWindow {
    /// Records a redemption; returns the share with no click of the last
    /// `min_orders` once that many are known, and the code's usual share.
    pub(crate) fn share(&mut self, clicked: bool, min_orders: usize) -> Option<(f64, f64)> {
        self.redemptions += 1;
        let usual = if self.all > 0.0 { f64::from(self.no_click / self.all) } else { 0.0 };
        if self.monitor.alarm.is_none() {
            let d = 1.0 - 1.0 / LEAK_MEMORY;
            self.all = self.all * d + 1.0;
            self.no_click = self.no_click * d + if clicked { 0.0 } else { 1.0 };
        }
        self.recent.push_back(clicked);
        while self.recent.len() > min_orders {
            self.recent.pop_front();
        }
        if self.recent.len() < min_orders {
            return None;
        }
        let no_click = self.recent.iter().filter(|c| !**c).count();
        Some((no_click as f64 / self.recent.len() as f64, usual))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    const H: i64 = 3_600_000_000;

    fn params() -> RateParams {
        RateParams { bucket: H, threshold: 10.0, ratio: 3.0, min_orders: 5, warmup: 24, memory: 168, select: true }
    }

    fn order(n: u64, signals: u8) -> RunOrder {
        RunOrder { id: id(&format!("o{n}")), signals, ip: 0, customer: 0 }
    }

    /// A hit at hour `h`: (hour, retro ids, the current order held).
    type Seen = Vec<(i64, Vec<Arc<str>>, bool)>;

    /// `hours` of traffic: the program gets `base × season(h) × scale(h)`
    /// orders an hour, partner 1 a steady tenth of them plus `extra(h)`
    /// (with `signals`); returns the hits on partner 1.
    fn feed(
        hours: i64,
        base: u32,
        scale: impl Fn(i64) -> u32,
        extra: impl Fn(i64) -> u32,
        signals: u8,
    ) -> (Seen, RateMonitor) {
        let (mut sp, mut m, mut seen) = (Spike::default(), RateMonitor::default(), Vec::new());
        let mut n = 0;
        for h in 0..hours {
            let season = if h % 24 < 8 { 1 } else { 4 };
            let total = base * season * scale(h);
            let extra = extra(h);
            for i in 0..total + extra {
                let ts = h * H + i64::from(i) * (H / i64::from(total + extra + 1));
                n += 1;
                let buckets = sp.count(0, ts, H).clone();
                // Every tenth order is partner 1's; the extra ones come last.
                let mine = i >= total || i % 10 == 0;
                if mine {
                    let s = if i >= total { signals } else { 0 };
                    if let Some(hit) = m.record(ts, &buckets, order(n, s), &params(), true) {
                        seen.push((h, hit.retro.iter().map(|o| o.id.clone()).collect(), hit.current));
                    }
                }
            }
        }
        (seen, m)
    }

    #[test]
    fn seasonal_traffic_and_a_sale_day_are_not_a_spike() {
        // Hours 72..96: the whole program triples (a sale day).
        let (seen, m) = feed(24 * 5, 50, |h| if (72..96).contains(&h) { 3 } else { 1 }, |_| 0, 0);
        assert!(seen.is_empty(), "{seen:?}");
        assert!(m.seen() >= 24 * 4, "{}", m.seen());
    }

    #[test]
    fn a_burst_after_warm_up_is_flagged_with_its_run_and_the_window_ends() {
        let (seen, _) = feed(24 * 3, 50, |_| 1, |h| if h == 60 { 40 } else { 0 }, signal::FRESH);
        assert!(!seen.is_empty());
        assert!(seen.iter().all(|(h, ..)| (60..=62).contains(h)), "the alarm ends soon after: {seen:?}");
        let (h, retro, _) = &seen[0];
        assert_eq!(*h, 60);
        // The burst's orders before the alarm are returned once.
        assert!(retro.len() >= 5, "{}", retro.len());
        assert!(seen[1..].iter().all(|(_, r, _)| r.is_empty()));
    }

    #[test]
    fn a_partner_whose_audience_buys_at_night_is_learned_by_hour_of_day() {
        // The program: 40 orders every hour. Partner 1: 8 an hour from 00:00
        // to 08:00 UTC (its audience's evening), 1 an hour otherwise; on day
        // 6 at 14:00 a burst of 20 more.
        let (mut sp, mut m, mut hits) = (Spike::default(), RateMonitor::default(), Vec::new());
        let mut n = 0;
        for h in 0..24 * 8 {
            let mine = if h % 24 < 8 { 8 } else { 1 } + if h == 24 * 6 + 14 { 20 } else { 0 };
            let total = 40 + mine;
            for i in 0..total {
                n += 1;
                let ts = h * H + i64::from(i) * (H / i64::from(total + 1));
                let b = sp.count(0, ts, H).clone();
                // The partner's orders are spread through the hour.
                if i % (total / mine) == 0 {
                    if let Some(hit) = m.record(ts, &b, order(n, 0), &params(), true) {
                        hits.push((h, hit.evidence));
                    }
                }
            }
        }
        assert!(hits.iter().all(|(h, _)| *h < 24 * 4 || (24 * 6 + 14..=24 * 6 + 17).contains(h)), "{hits:?}");
        assert!(hits.iter().any(|(h, _)| *h == 24 * 6 + 14), "the daytime burst is caught: {hits:?}");
        let night = m.profile.factor(24 * 7 * H + 3 * H);
        let day = m.profile.factor(24 * 7 * H + 15 * H);
        // The audience's hours raise what is expected; its quiet hours never lower it.
        assert!(night > 1.5 && day == 1.0, "night {night}, day {day}");
    }

    #[test]
    fn no_judgement_during_warm_up() {
        let (seen, _) = feed(20, 50, |_| 1, |h| if h == 10 { 200 } else { 0 }, 0);
        assert!(seen.is_empty(), "{seen:?}");
    }

    #[test]
    fn a_small_partner_ramping_up_accumulates_evidence_over_buckets() {
        // Base 10 an hour at night: partner 1 has one order an hour; from
        // hour 50 three more an hour: no single bucket is extreme.
        let (seen, _) = feed(24 * 3, 10, |_| 1, |h| if h >= 50 { 3 } else { 0 }, 0);
        let first = seen.first().map(|(h, ..)| *h).expect("the ramp is caught");
        assert!(first > 50 && first <= 56, "caught at hour {first}");
        // The earlier orders of the run (from hour 50) are flagged too.
        assert!(seen[0].1.len() >= 6, "{:?}", seen[0]);
    }

    #[test]
    fn signals_choose_the_burst_orders_when_they_explain_it() {
        let mut m = RateMonitor::default();
        let mut sp = Spike::default();
        let p = params();
        // Warm up: one order of the partner in each of 30 buckets of 10.
        let mut n = 0;
        for h in 0..30 {
            for i in 0..10 {
                n += 1;
                let ts = h * H + i * 1000;
                let b = sp.count(0, ts, H).clone();
                if i == 0 {
                    assert!(m.record(ts, &b, order(n, 0), &p, true).is_none());
                }
            }
        }
        // Hour 30: 20 orders of the partner, 16 with a signal, 4 without.
        let mut hits = Vec::new();
        for i in 0..20 {
            n += 1;
            let ts = 30 * H + i * 1000;
            let b = sp.count(0, ts, H).clone();
            let s = if i % 5 == 4 { 0 } else { signal::REPEAT };
            if let Some(h) = m.record(ts, &b, order(n, s), &p, true) {
                hits.push((s, h));
            }
        }
        let (_, first) = &hits[0];
        assert!(!first.all);
        assert!(first.retro.iter().all(|o| o.signals != 0), "only the signalled orders are held");
        assert!(hits.iter().all(|(s, h)| h.current == (*s != 0)));
    }

    #[test]
    fn an_order_sharing_an_ip_with_the_run_is_marked_with_the_earlier_one() {
        let mut m = RateMonitor::default();
        let b = VecDeque::from([(0, 3)]);
        let p = params();
        let mut a = order(1, 0);
        a.ip = 7;
        let mut c = order(2, 0);
        c.ip = 7;
        m.record(0, &b, a, &p, true);
        m.record(1, &b, order(3, 0), &p, true);
        m.record(2, &b, c, &p, true);
        let marks: Vec<u8> = m.run.iter().map(|o| o.signals).collect();
        assert_eq!(marks, vec![signal::REPEAT, 0, signal::REPEAT]);
    }

    #[test]
    fn no_alarm_is_raised_while_the_callers_condition_fails() {
        let mut m = RateMonitor::default();
        let mut sp = Spike::default();
        let p = RateParams { select: false, min_orders: 1, ..params() };
        let mut n = 0;
        for h in 0..30 {
            for i in 0..10 {
                n += 1;
                let b = sp.count(0, h * H + i, H).clone();
                if i == 0 {
                    m.record(h * H, &b, order(n, 0), &p, true);
                }
            }
        }
        for i in 0..15 {
            n += 1;
            let ts = 30 * H + i;
            let b = sp.count(0, ts, H).clone();
            assert!(m.record(ts, &b, order(n, 0), &p, false).is_none());
        }
        assert!(m.alarm.is_none());
        // Once allowed, the whole run is returned.
        n += 1;
        let b = sp.count(0, 30 * H + 100, H).clone();
        let hit = m.record(30 * H + 100, &b, order(n, 0), &p, true).unwrap();
        assert!(hit.all && hit.retro.len() == 16, "{}", hit.retro.len());
    }

    #[test]
    fn refunds_are_judged_against_the_programs_rate() {
        let p = RefundParams { min_orders: 20, max_share: 0.5, ratio: 3.0, threshold: 4.0 };
        let program = RefundShare { orders: 10_000, refunds: 200, money_share: 0.02 };
        let share = |orders, refunds, money_share| RefundShare { orders, refunds, money_share };
        // 2% usual: 8 of 40 is far above (limit max(6%, 2% + 4·sqrt(1.8)/40 = 15.4%)).
        let (v, base, limit) = refund_verdict(&share(40, 8, 0.2), &program, &p).unwrap();
        assert_eq!((v, base), (0.2, 0.02));
        assert!((limit - (0.02 + 4.0 * 1.8f64.sqrt() / 40.0)).abs() < 1e-12, "{limit}");
        assert!(refund_verdict(&share(40, 6, 0.15), &program, &p).is_none(), "6 of 40 is within the noise");
        assert!(refund_verdict(&share(19, 19, 1.0), &program, &p).is_none(), "too few orders");
        // A large partner: the ratio decides (3 × 2% = 6%).
        assert!(refund_verdict(&share(5_000, 290, 0.05), &program, &p).is_none());
        assert!(refund_verdict(&share(5_000, 310, 0.06), &program, &p).is_some());
        // Money alone: more than half of it refunded.
        let none = RefundShare { orders: 0, refunds: 0, money_share: 0.0 };
        let (v, _, limit) = refund_verdict(&share(20, 0, 0.6), &none, &p).unwrap();
        assert_eq!((v, limit), (0.6, 0.5));
    }

    #[test]
    fn gaps_compare_with_the_partners_usual_times_and_the_programs_for_few() {
        let mut g = Gaps::default();
        for s in [600, 1200, 1800, 3600, 7200] {
            g.record(s);
        }
        assert_eq!(g.below(30, None, 0.0), 0.0);
        assert_eq!(g.below(1800, None, 0.0), 0.2, "600 lies in a lower slot; 1200 shares 1800's");
        let mut program = Gaps::default();
        for _ in 0..10 {
            program.record(10);
        }
        // With the program's times as a prior of 5 observations: (0 + 5) / (5 + 5).
        assert_eq!(g.below(30, Some(&program), 5.0), 0.5);
        for _ in 0..5_000 {
            g.record(100);
        }
        assert!(g.total <= GAPS_MAX, "the histogram halves");
    }

    #[test]
    fn a_codes_share_is_judged_against_its_usual_share() {
        let mut l = LeakWindow::default();
        assert!(l.share(false, 4).is_none());
        for _ in 0..2 {
            l.share(true, 4);
        }
        let (share, usual) = l.share(false, 4).unwrap();
        assert_eq!(share, 0.5);
        assert!((usual - 1.0 / 3.0).abs() < 0.01, "{usual}");
    }

    #[test]
    fn velocity_returns_every_order_of_the_key_in_the_window_once_over_the_limit() {
        let mut v = Velocity::default();
        let w = 60 * 1_000_000;
        assert!(v.record(0, KeyKind::Ip, "1.2.3.4", 0, &id("a"), w, 2).unwrap().is_none());
        assert!(v.record(0, KeyKind::Ip, "1.2.3.4", 10, &id("b"), w, 2).unwrap().is_none());
        // Another kind with the same value is another key.
        assert!(v.record(0, KeyKind::CustomerId, "1.2.3.4", 20, &id("z"), w, 2).unwrap().is_none());
        let hit = v.record(0, KeyKind::Ip, "1.2.3.4", 20, &id("c"), w, 2).unwrap().unwrap();
        assert_eq!(hit, vec!["a".into(), "b".into(), "c".into()] as Vec<Arc<str>>);
        // Exactly one window later the first order has left it: b, c, e.
        assert!(v.record(0, KeyKind::Ip, "5.5.5.5", w, &id("d"), w, 2).unwrap().is_none());
        let hit = v.record(0, KeyKind::Ip, "1.2.3.4", w, &id("e"), w, 2).unwrap().unwrap();
        assert_eq!(hit, vec!["b".into(), "c".into(), "e".into()] as Vec<Arc<str>>);
        // One more microsecond and b has left too: c, e.
        assert!(v.record(0, KeyKind::Ip, "1.2.3.4", w + 10, &id("f"), w, 2).unwrap().is_some(), "c, e, f");
        assert!(v.record(0, KeyKind::Ip, "1.2.3.4", w + 21, &id("g"), w, 2).unwrap().is_some(), "e, f, g");
        v.sweep(|_| Some(w + 20));
        assert_eq!(v.len(), 1, "only 1.2.3.4 has an order after the cutoff");
        v.sweep(|p| (p == 1).then_some(w + 21));
        assert_eq!(v.len(), 1, "another program's cutoff leaves it");
        v.sweep(|_| Some(w + 21));
        assert_eq!(v.len(), 0);
    }

    #[test]
    fn refund_share_slides_with_event_time() {
        let mut w = RefundWindow::default();
        let d = |n: i64| n * DAY;
        w.order(d(0), 7);
        w.captured(d(0), Decimal::from(100), 7);
        w.refunded(d(0), Decimal::from(50), 7);
        assert_eq!(w.share(), RefundShare { orders: 1, refunds: 1, money_share: 0.5 });
        w.order(d(6), 7);
        w.captured(d(6), Decimal::from(100), 7);
        assert_eq!(w.share(), RefundShare { orders: 2, refunds: 1, money_share: 0.25 });
        // Day 7: day 0 has left the 7-day window (days 1..=7 remain).
        w.order(d(7), 7);
        w.captured(d(7), Decimal::from(100), 7);
        assert_eq!(w.share(), RefundShare { orders: 2, refunds: 0, money_share: 0.0 });
        // Older than the window: ignored.
        w.refunded(d(0), Decimal::from(100), 7);
        assert_eq!(w.share().refunds, 0);
        assert!(w.days.len() <= 7);
    }

    #[test]
    fn refunds_count_on_their_orders_capture_day_so_the_share_never_exceeds_one() {
        // The engine passes an order's first capture time: a partner whose
        // attack stopped (its orders left the window) and whose old orders
        // are refunded now is judged on the window's own orders only.
        let mut w = RefundWindow::default();
        let d = |n: i64| n * DAY;
        for day in 0..3 {
            w.order(d(day), 7);
            w.captured(d(day), Decimal::from(100), 7);
        }
        // Day 10: a genuine order; refunds of the day-0..2 orders arrive now.
        w.order(d(10), 7);
        w.captured(d(10), Decimal::from(100), 7);
        for day in 0..3 {
            w.refunded(d(day), Decimal::from(100), 7);
        }
        assert_eq!(
            w.share(),
            RefundShare { orders: 1, refunds: 0, money_share: 0.0 },
            "the refunds of orders older than the window count for none"
        );
        w.refunded(d(10), Decimal::from(40), 7);
        assert_eq!(w.share(), RefundShare { orders: 1, refunds: 1, money_share: 0.4 });
    }
}
