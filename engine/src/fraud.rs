//! State of the statistical fraud detectors: streaming, event time, bounded.
//!
//! Each detector keeps only what its rule needs, per program:
//! - velocity: per hashed key (customer id, e-mail hash, IP), the orders of
//!   the last window, at most `max_orders + 1` of them; keys with no order in
//!   the window are swept, and the number of keys is capped;
//! - coupon_leak: per configured code, the last `min_orders` redemptions;
//! - conversion_spike: per configured partner, an EWMA of its share of the
//!   program's orders per bucket and the current bucket's orders, and per
//!   program the order counts of the last [`SPIKE_BUCKETS`] buckets.
//!
//! A detector returns the orders to flag, including earlier orders of the
//! same attack that are still in its state ("retroactive" flags): an attack is
//! recognised on its n-th order, but all n orders belong to it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use hashbrown::HashMap;

use crate::state::tracked::Tracked;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Buckets of program order counts kept for conversion_spike.
pub(crate) const SPIKE_BUCKETS: usize = 64;
/// Orders of one partner's current bucket remembered for retroactive flags.
pub(crate) const SPIKE_RETRO: usize = 256;
/// Velocity keys tracked per program; beyond it new keys are not tracked
/// until the sweep frees room (counted in `velocity_keys_dropped`).
pub(crate) const VELOCITY_MAX_KEYS: usize = 2_000_000;

/// What a detector found: the measured value against its threshold, a
/// reviewer's explanation, and earlier orders of the same attack.
#[derive(Debug)]
pub(crate) struct Hit {
    pub(crate) value: f64,
    pub(crate) threshold: f64,
    pub(crate) score: f64,
    pub(crate) detail: String,
    pub(crate) retro: Vec<Arc<str>>,
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
    fn hash(kind: KeyKind, value: &str) -> u64 {
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
        let key = (program, Velocity::hash(kind, value));
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

/// One partner's orders, captured and refunded money per day of event
/// time, over a sliding window (refund_rate).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct RefundWindow {
    /// (day, orders, captured, refunded), oldest first, within the window.
    days: VecDeque<(i64, u32, Decimal, Decimal)>,
}

const DAY: i64 = 86_400_000_000;

impl RefundWindow {
    fn day(&mut self, ts: i64, window_days: i64) -> Option<&mut (i64, u32, Decimal, Decimal)> {
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
                self.days.insert(i + 1, (d, 0, Decimal::ZERO, Decimal::ZERO));
                i + 1
            }
            None => {
                self.days.push_front((d, 0, Decimal::ZERO, Decimal::ZERO));
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
            b.2 += amount;
        }
    }

    pub(crate) fn refunded(&mut self, ts: i64, amount: Decimal, window_days: i64) {
        if let Some(b) = self.day(ts, window_days) {
            b.3 += amount;
        }
    }

    /// Orders and refunded share of captured money in the window.
    pub(crate) fn share(&self) -> (u32, f64) {
        let (n, c, r) =
            self.days.iter().fold((0, Decimal::ZERO, Decimal::ZERO), |a, b| (a.0 + b.1, a.1 + b.2, a.2 + b.3));
        // A ratio for a threshold, not money: f64 is fine.
        let share = if c.is_zero() { 0.0 } else { (r / c).to_f64().unwrap_or(0.0) };
        (n, share)
    }
}

/// The last redemptions of one code: whether a click from the code's
/// partner preceded each, and the order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct LeakWindow {
    recent: VecDeque<(bool, Arc<str>)>,
    pub(crate) redemptions: u64,
}

impl LeakWindow {
    /// Records a redemption; once `min_orders` redemptions are known and more
    /// than `max_share` of the last `min_orders` had no click, returns the
    /// share and the no-click orders among them (the current one included
    /// when it had no click).
    pub(crate) fn record(
        &mut self,
        clicked: bool,
        order_id: &Arc<str>,
        min_orders: usize,
        max_share: f64,
    ) -> Option<(f64, Vec<Arc<str>>)> {
        self.redemptions += 1;
        self.recent.push_back((clicked, order_id.clone()));
        while self.recent.len() > min_orders {
            self.recent.pop_front();
        }
        if self.recent.len() < min_orders || clicked {
            return None;
        }
        let no_click = self.recent.iter().filter(|(c, _)| !c).count();
        let share = no_click as f64 / self.recent.len() as f64;
        (share > max_share).then(|| (share, self.recent.iter().filter(|(c, _)| !c).map(|(_, o)| o.clone()).collect()))
    }
}

/// One partner's learned share of its program's orders per bucket.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SpikePartner {
    bucket: i64,
    count: u32,
    /// Orders of the current bucket, for retroactive flags.
    orders: Vec<Arc<str>>,
    /// The current bucket was judged a spike: it is not learned from.
    spiking: bool,
    mean: f64,
    var: f64,
    /// Buckets folded into the baseline.
    seen: u32,
}

/// Per program: orders per bucket, and each partner's baseline.
#[derive(Clone, Debug, Default)]
pub(crate) struct Spike {
    /// program -> (bucket, orders), oldest first, at most [`SPIKE_BUCKETS`].
    pub(crate) buckets: BTreeMap<u32, VecDeque<(i64, u32)>>,
    pub(crate) partners: Tracked<(u32, u32), SpikePartner>,
}

/// What a conversion_spike judgement needs from the config.
pub(crate) struct SpikeParams {
    pub(crate) bucket: i64,
    pub(crate) min_orders: u32,
    pub(crate) threshold: f64,
    pub(crate) warmup: u32,
}

/// A judged spike.
#[derive(Debug)]
pub(crate) struct SpikeHit {
    pub(crate) z: f64,
    pub(crate) count: u32,
    pub(crate) expected: f64,
    pub(crate) program_count: u32,
    pub(crate) bucket_start: i64,
    pub(crate) retro: Vec<Arc<str>>,
}

fn program_count(buckets: &VecDeque<(i64, u32)>, bucket: i64) -> Option<u32> {
    buckets.iter().rev().find(|(b, _)| *b == bucket).map(|(_, n)| *n)
}

impl Spike {
    /// Records an order of `program` attributed to `partner` at `ts`.
    pub(crate) fn record(
        &mut self,
        program: u32,
        partner: u32,
        ts: i64,
        order_id: &Arc<str>,
        p: &SpikeParams,
    ) -> Option<SpikeHit> {
        let b = ts.div_euclid(p.bucket);
        let buckets = self.buckets.entry(program).or_default();
        match buckets.back_mut() {
            Some((last, n)) if *last == b => *n += 1,
            Some((last, _)) if *last > b => {
                // A late order: counted in its bucket if still known, never judged.
                if let Some(slot) = buckets.iter_mut().find(|(k, _)| *k == b) {
                    slot.1 += 1;
                }
                return None;
            }
            _ => {
                buckets.push_back((b, 1));
                while buckets.len() > SPIKE_BUCKETS {
                    buckets.pop_front();
                }
            }
        }
        let alpha = 2.0 / (f64::from(p.warmup) + 1.0);
        let program_total = program_count(buckets, b);
        let buckets = &*buckets;
        let sp = self
            .partners
            .get_or_insert_with((program, partner), || SpikePartner { bucket: b, ..SpikePartner::default() });
        if sp.bucket > b {
            return None;
        }
        if sp.bucket < b {
            // Fold the partner's finished bucket, then the buckets since in
            // which the program had orders and the partner none.
            let folds: Vec<(i64, f64)> = buckets
                .iter()
                .filter(|(k, n)| *k >= sp.bucket && *k < b && *n > 0)
                .map(|(k, n)| (*k, if *k == sp.bucket { f64::from(sp.count) / f64::from(*n) } else { 0.0 }))
                .collect();
            for (k, share) in folds {
                if k == sp.bucket && sp.spiking {
                    continue;
                }
                if sp.seen == 0 {
                    sp.mean = share;
                    sp.var = 0.0;
                } else {
                    let diff = share - sp.mean;
                    let incr = alpha * diff;
                    sp.mean += incr;
                    sp.var = (1.0 - alpha) * (sp.var + diff * incr);
                }
                sp.seen = sp.seen.saturating_add(1);
            }
            sp.bucket = b;
            sp.count = 0;
            sp.orders.clear();
            sp.spiking = false;
        }
        sp.count += 1;
        if sp.orders.len() < SPIKE_RETRO {
            sp.orders.push(order_id.clone());
        }
        let total = program_total.unwrap_or(sp.count).max(sp.count);
        let mut hit = None;
        if sp.seen >= p.warmup && sp.count >= p.min_orders {
            let n = f64::from(total);
            let expected = sp.mean * n;
            // Counting noise of the expected orders plus the baseline's own
            // variability, scaled to this bucket's volume.
            let sd = (expected + sp.var * n * n + 1.0).sqrt();
            let z = (f64::from(sp.count) - expected) / sd;
            if z >= p.threshold {
                let retro = if sp.spiking { Vec::new() } else { std::mem::take(&mut sp.orders) };
                sp.spiking = true;
                hit = Some(SpikeHit {
                    z,
                    count: sp.count,
                    expected,
                    program_count: total,
                    bucket_start: b * p.bucket,
                    retro,
                });
            }
        }
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn params() -> SpikeParams {
        SpikeParams { bucket: 3_600_000_000, min_orders: 5, threshold: 4.0, warmup: 24 }
    }

    const H: i64 = 3_600_000_000;

    /// `hours` of traffic: the program gets `base * seasonality` orders per
    /// hour, partner 1 a steady tenth of them; returns the hits.
    fn feed(sp: &mut Spike, hours: i64, base: u32, extra: impl Fn(i64) -> u32) -> Vec<(i64, SpikeHit)> {
        let mut hits = Vec::new();
        let mut n = 0;
        for h in 0..hours {
            let season = if h % 24 < 8 { 1 } else { 4 };
            let total = base * season;
            for i in 0..total {
                let ts = h * H + i64::from(i) * (H / i64::from(total + 1));
                let partner = if i % 10 == 0 { 1 } else { 2 };
                n += 1;
                if let Some(hit) = sp.record(0, partner, ts, &id(&format!("o{n}")), &params()) {
                    hits.push((h, hit));
                }
            }
            for j in 0..extra(h) {
                n += 1;
                let ts = h * H + H / 2 + i64::from(j);
                if let Some(hit) = sp.record(0, 1, ts, &id(&format!("x{n}")), &params()) {
                    hits.push((h, hit));
                }
            }
        }
        hits
    }

    #[test]
    fn seasonal_traffic_is_not_a_spike() {
        let mut sp = Spike::default();
        let hits = feed(&mut sp, 24 * 5, 50, |_| 0);
        assert!(hits.is_empty(), "{hits:?}");
    }

    #[test]
    fn a_burst_after_warm_up_is_flagged_in_its_bucket_with_its_earlier_orders() {
        let mut sp = Spike::default();
        let hits = feed(&mut sp, 24 * 3, 50, |h| if h == 60 { 40 } else { 0 });
        assert!(!hits.is_empty());
        assert!(hits.iter().all(|(h, _)| *h == 60), "{hits:?}");
        let (_, first) = &hits[0];
        assert!(first.z >= 4.0);
        // Orders of the bucket before the spike was recognised are returned once.
        assert!(first.retro.len() >= 5, "{}", first.retro.len());
        assert!(hits[1..].iter().all(|(_, h)| h.retro.is_empty()));
        assert_eq!(first.bucket_start, 60 * H);
    }

    #[test]
    fn no_judgement_during_warm_up() {
        let mut sp = Spike::default();
        let hits = feed(&mut sp, 20, 50, |h| if h == 10 { 200 } else { 0 });
        assert!(hits.is_empty(), "{hits:?}");
    }

    #[test]
    fn a_spike_bucket_is_not_learned() {
        let mut sp = Spike::default();
        let hits = feed(&mut sp, 24 * 3, 50, |h| if h == 50 || h == 51 { 40 } else { 0 });
        assert!(hits.iter().any(|(h, _)| *h == 50));
        assert!(hits.iter().any(|(h, _)| *h == 51), "the second burst hour is still a spike");
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
        w.refunded(d(2), Decimal::from(50), 7);
        assert_eq!(w.share(), (1, 0.5));
        w.order(d(6), 7);
        w.captured(d(6), Decimal::from(100), 7);
        assert_eq!(w.share(), (2, 0.25));
        // Day 7: day 0 has left the 7-day window (days 1..=7 remain).
        w.order(d(7), 7);
        w.captured(d(7), Decimal::from(100), 7);
        assert_eq!(w.share(), (2, 0.25), "50 refunded of 200 captured");
        // Older than the window: ignored.
        w.refunded(d(0), Decimal::from(100), 7);
        assert_eq!(w.share(), (2, 0.25));
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
        assert_eq!(w.share(), (1, 0.0), "the refunds of orders older than the window count for none");
        w.refunded(d(10), Decimal::from(40), 7);
        assert_eq!(w.share(), (1, 0.4));
    }

    #[test]
    fn leak_judges_the_last_redemptions_only() {
        let mut l = LeakWindow::default();
        for i in 0..4 {
            assert!(l.record(i % 2 == 0, &id(&format!("o{i}")), 4, 0.5).is_none());
        }
        // Last 4: clicked, no, no(o4 clicked?) -> o1 no, o2 yes, o3 no, o4 no: 3/4 > 0.5.
        let (share, orders) = l.record(false, &id("o4"), 4, 0.5).unwrap();
        assert_eq!(share, 0.75);
        assert_eq!(orders, vec!["o1".into(), "o3".into(), "o4".into()] as Vec<Arc<str>>);
        // A clicked redemption is never flagged.
        assert!(l.record(true, &id("o5"), 4, 0.5).is_none());
        // At exactly the share the code is not judged leaked: o3 no, o4 no, o5 yes, o6 yes = 0.5.
        assert!(l.record(true, &id("o6"), 4, 0.5).is_none());
        assert!(l.record(false, &id("o7"), 4, 0.5).is_none(), "o4 no, o5 yes, o6 yes, o7 no = 0.5");
    }
}
