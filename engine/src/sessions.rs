//! Clicks per visitor, kept for the longest attribution window behind the
//! event-time watermark, with a bound on clicks per visitor and on visitors.

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

/// One remembered click, interned: 32 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClickRec {
    pub(crate) ts: i64,
    /// Order of application: breaks ties in `ts` towards the later-applied click.
    pub(crate) seq: u64,
    pub(crate) link: u32,
    pub(crate) partner: u32,
    pub(crate) program: u32,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Visitor {
    clicks: Vec<ClickRec>,
    last_ts: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Sessions {
    visitors: HashMap<Box<str>, Visitor>,
    max_per_visitor: usize,
    max_visitors: usize,
    pub(crate) clicks_dropped: u64,
    pub(crate) evicted_capacity: u64,
}

impl Sessions {
    pub(crate) fn new(max_per_visitor: usize, max_visitors: usize) -> Sessions {
        Sessions {
            visitors: HashMap::new(),
            max_per_visitor: max_per_visitor.max(1),
            max_visitors: max_visitors.max(1),
            clicks_dropped: 0,
            evicted_capacity: 0,
        }
    }

    pub(crate) fn set_limits(&mut self, max_per_visitor: usize, max_visitors: usize) {
        self.max_per_visitor = max_per_visitor.max(1);
        self.max_visitors = max_visitors.max(1);
    }

    pub(crate) fn record(&mut self, visitor: &str, click: ClickRec) {
        if !self.visitors.contains_key(visitor) && self.visitors.len() >= self.max_visitors {
            self.evict_for_capacity();
        }
        let v = match self.visitors.get_mut(visitor) {
            Some(v) => v,
            None => self.visitors.entry(visitor.into()).or_default(),
        };
        v.clicks.push(click);
        v.last_ts = v.last_ts.max(click.ts);
        if v.clicks.len() > self.max_per_visitor {
            // Drop the oldest click (ties: the earlier applied).
            if let Some((i, _)) = v.clicks.iter().enumerate().min_by_key(|(_, c)| (c.ts, c.seq)) {
                v.clicks.swap_remove(i);
                self.clicks_dropped += 1;
            }
        }
        debug_assert!(v.clicks.len() <= self.max_per_visitor);
    }

    /// The clicks of a visitor (any order).
    pub(crate) fn clicks(&self, visitor: &str) -> &[ClickRec] {
        self.visitors.get(visitor).map_or(&[], |v| v.clicks.as_slice())
    }

    /// Forgets clicks older than `cutoff` (event time); they can no longer
    /// fall in any attribution window.
    pub(crate) fn evict_before(&mut self, cutoff: i64) {
        self.visitors.retain(|_, v| {
            if v.last_ts < cutoff {
                return false;
            }
            v.clicks.retain(|c| c.ts >= cutoff);
            true
        });
    }

    /// Evicts the tenth of visitors whose last click is oldest.
    fn evict_for_capacity(&mut self) {
        let mut last: Vec<i64> = self.visitors.values().map(|v| v.last_ts).collect();
        let k = last.len().div_ceil(10).max(1) - 1;
        let (_, cut, _) = last.select_nth_unstable(k);
        let cut = *cut;
        let before = self.visitors.len();
        self.visitors.retain(|_, v| v.last_ts > cut);
        self.evicted_capacity += (before - self.visitors.len()) as u64;
        debug_assert!(self.visitors.len() < self.max_visitors || self.max_visitors == 1);
    }

    pub(crate) fn visitors(&self) -> usize {
        self.visitors.len()
    }

    pub(crate) fn tracked_clicks(&self) -> usize {
        self.visitors.values().map(|v| v.clicks.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn click(ts: i64, seq: u64) -> ClickRec {
        ClickRec { ts, seq, link: 0, partner: 0, program: 0 }
    }

    #[test]
    fn per_visitor_bound_drops_the_oldest() {
        let mut s = Sessions::new(2, 10);
        s.record("v", click(10, 1));
        s.record("v", click(5, 2));
        s.record("v", click(20, 3));
        let mut ts: Vec<_> = s.clicks("v").iter().map(|c| c.ts).collect();
        ts.sort();
        assert_eq!(ts, [10, 20]);
        assert_eq!(s.clicks_dropped, 1);
    }

    #[test]
    fn watermark_eviction_forgets_old_clicks_and_visitors() {
        let mut s = Sessions::new(10, 10);
        s.record("old", click(10, 1));
        s.record("mixed", click(10, 2));
        s.record("mixed", click(100, 3));
        s.evict_before(50);
        assert_eq!(s.visitors(), 1);
        assert_eq!(s.clicks("mixed").len(), 1);
        assert!(s.clicks("old").is_empty());
    }

    #[test]
    fn visitor_bound_evicts_the_stalest() {
        let mut s = Sessions::new(10, 3);
        for (i, v) in ["a", "b", "c"].iter().enumerate() {
            s.record(v, click(i as i64, i as u64));
        }
        s.record("d", click(99, 9));
        assert!(s.visitors() <= 3);
        assert!(s.clicks("a").is_empty(), "the stalest visitor goes first");
        assert_eq!(s.clicks("d").len(), 1);
        assert_eq!(s.evicted_capacity, 1);
    }
}
