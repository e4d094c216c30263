//! Clicks per visitor, kept for the longest attribution window behind the
//! event-time watermark, with a bound on clicks per visitor and on visitors.
//!
//! Compact by design (a retailer tracks tens of millions of visitors): a
//! visitor is keyed by the 128-bit hash of its id (no string kept), a click
//! is 16 bytes (time and an interned link/partner/program triple) and a
//! visitor's first click is stored inline in the map, so a one-click session
//! costs one 40-byte map slot and no allocation of its own.

use std::hash::{BuildHasher, Hasher};

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

/// A click as the engine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Click {
    pub(crate) ts: i64,
    pub(crate) link: u32,
    pub(crate) partner: u32,
    pub(crate) program: u32,
}

/// One remembered click: 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ClickRec {
    ts: i64,
    /// Index into [`Sessions::targets`].
    target: u32,
}

/// A visitor's clicks in application order (ties in `ts` are broken by it).
/// Most visitors click once: that click is inline (24 bytes in all).
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Visitor {
    One(ClickRec),
    // Boxed on purpose: a bare Vec would make every slot 8 bytes larger.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<ClickRec>>),
}

impl Visitor {
    fn as_slice(&self) -> &[ClickRec] {
        match self {
            Visitor::One(c) => std::slice::from_ref(c),
            Visitor::Many(v) => v,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn iter(&self) -> std::slice::Iter<'_, ClickRec> {
        self.as_slice().iter()
    }

    fn push(&mut self, c: ClickRec) {
        match self {
            Visitor::One(first) => *self = Visitor::Many(Box::new(vec![*first, c])),
            Visitor::Many(v) => v.push(c),
        }
    }

    fn remove(&mut self, i: usize) {
        if let Visitor::Many(v) = self {
            v.remove(i);
            if let [only] = v.as_slice() {
                *self = Visitor::One(*only);
            }
        }
    }

    /// Keeps the clicks at or after `cutoff`; false when none is left.
    fn retain_from(&mut self, cutoff: i64) -> bool {
        match self {
            Visitor::One(c) => c.ts >= cutoff,
            Visitor::Many(v) => {
                v.retain(|c| c.ts >= cutoff);
                match v.as_slice() {
                    [] => false,
                    [only] => {
                        *self = Visitor::One(*only);
                        true
                    }
                    _ => true,
                }
            }
        }
    }
}

/// Keys that are already uniform hashes: the map uses their bits directly.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PreHashed;

pub(crate) struct PreHasher(u64);

impl BuildHasher for PreHashed {
    type Hasher = PreHasher;
    fn build_hasher(&self) -> PreHasher {
        PreHasher(0)
    }
}

impl Hasher for PreHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only `IdKey`s are used; any other input is folded in, correctly if slowly.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The 128-bit hash of an id, as a map key: collisions are out of reach
/// (probability about 2^-64 with 2^32 ids). Two words, so a slot needs no
/// 16-byte alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IdKey(u64, u64);

impl std::hash::Hash for IdKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0 ^ self.1);
    }
}

pub(crate) fn id_key(id: &str) -> IdKey {
    let h = xxhash_rust::xxh3::xxh3_128(id.as_bytes());
    IdKey(h as u64, (h >> 64) as u64)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Sessions {
    visitors: HashMap<IdKey, Visitor, PreHashed>,
    /// Interned (link, partner, program) of clicks; bounded by the links
    /// configured over the engine's life.
    targets: Vec<[u32; 3]>,
    target_index: HashMap<[u32; 3], u32>,
    max_per_visitor: usize,
    max_visitors: usize,
    pub(crate) clicks_dropped: u64,
    pub(crate) evicted_capacity: u64,
}

fn last_ts(v: &Visitor) -> i64 {
    v.iter().map(|c| c.ts).max().unwrap_or(i64::MIN)
}

impl Sessions {
    pub(crate) fn new(max_per_visitor: usize, max_visitors: usize) -> Sessions {
        Sessions {
            visitors: HashMap::default(),
            targets: Vec::new(),
            target_index: HashMap::new(),
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

    /// The interned target of a link; the engine caches it per link.
    pub(crate) fn target(&mut self, link: u32, partner: u32, program: u32) -> u32 {
        let t = [link, partner, program];
        if let Some(&i) = self.target_index.get(&t) {
            return i;
        }
        let i = self.targets.len() as u32;
        self.targets.push(t);
        self.target_index.insert(t, i);
        i
    }

    /// Records a click; returns it resolved.
    pub(crate) fn record(&mut self, visitor: &str, ts: i64, target: u32) -> Click {
        debug_assert!((target as usize) < self.targets.len(), "click target not interned");
        let key = id_key(visitor);
        if self.visitors.len() >= self.max_visitors && !self.visitors.contains_key(&key) {
            self.evict_for_capacity();
        }
        let click = ClickRec { ts, target };
        let v = match self.visitors.entry(key) {
            hashbrown::hash_map::Entry::Occupied(o) => {
                let v = o.into_mut();
                v.push(click);
                v
            }
            hashbrown::hash_map::Entry::Vacant(slot) => slot.insert(Visitor::One(click)),
        };
        if v.len() > self.max_per_visitor {
            // Drop the oldest click (ties: the earlier applied), keeping the order.
            let oldest = v.iter().enumerate().min_by_key(|(_, c)| c.ts).map(|(i, _)| i);
            if let Some(i) = oldest {
                v.remove(i);
                self.clicks_dropped += 1;
            }
        }
        debug_assert!(v.len() <= self.max_per_visitor);
        let [link, partner, program] = self.targets[target as usize];
        Click { ts, link, partner, program }
    }

    /// The clicks of a visitor, in application order.
    pub(crate) fn clicks(&self, visitor: &str) -> impl DoubleEndedIterator<Item = Click> + '_ {
        let v = self.visitors.get(&id_key(visitor)).map_or(&[][..], Visitor::as_slice);
        v.iter().map(|c| {
            let [link, partner, program] = self.targets[c.target as usize];
            Click { ts: c.ts, link, partner, program }
        })
    }

    /// Forgets clicks older than `cutoff` (event time); they can no longer
    /// fall in any attribution window.
    pub(crate) fn evict_before(&mut self, cutoff: i64) {
        self.visitors.retain(|_, v| v.retain_from(cutoff));
    }

    /// Evicts the tenth of visitors whose last click is oldest.
    fn evict_for_capacity(&mut self) {
        let mut last: Vec<i64> = self.visitors.values().map(last_ts).collect();
        let k = last.len().div_ceil(10).max(1) - 1;
        let (_, cut, _) = last.select_nth_unstable(k);
        let cut = *cut;
        let before = self.visitors.len();
        self.visitors.retain(|_, v| last_ts(v) > cut);
        self.evicted_capacity += (before - self.visitors.len()) as u64;
        debug_assert!(self.visitors.len() < self.max_visitors || self.max_visitors == 1);
    }

    pub(crate) fn visitors(&self) -> usize {
        self.visitors.len()
    }

    pub(crate) fn tracked_clicks(&self) -> usize {
        self.visitors.values().map(|v| v.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(per_visitor: usize, visitors: usize) -> (Sessions, u32) {
        let mut s = Sessions::new(per_visitor, visitors);
        let t = s.target(1, 2, 3);
        (s, t)
    }

    fn times(s: &Sessions, v: &str) -> Vec<i64> {
        s.clicks(v).map(|c| c.ts).collect()
    }

    #[test]
    fn per_visitor_bound_drops_the_oldest_and_keeps_application_order() {
        let (mut s, t) = sessions(2, 10);
        s.record("v", 10, t);
        s.record("v", 5, t);
        s.record("v", 20, t);
        assert_eq!(times(&s, "v"), [10, 20]);
        assert_eq!(s.clicks_dropped, 1);
        let c = s.clicks("v").next().unwrap();
        assert_eq!((c.link, c.partner, c.program), (1, 2, 3));
    }

    #[test]
    fn watermark_eviction_forgets_old_clicks_and_visitors() {
        let (mut s, t) = sessions(10, 10);
        s.record("old", 10, t);
        s.record("mixed", 10, t);
        s.record("mixed", 100, t);
        s.evict_before(50);
        assert_eq!(s.visitors(), 1);
        assert_eq!(times(&s, "mixed"), [100]);
        assert!(times(&s, "old").is_empty());
    }

    #[test]
    fn visitor_bound_evicts_the_stalest() {
        let (mut s, t) = sessions(10, 3);
        for (i, v) in ["a", "b", "c"].iter().enumerate() {
            s.record(v, i as i64, t);
        }
        s.record("d", 99, t);
        assert!(s.visitors() <= 3);
        assert!(times(&s, "a").is_empty(), "the stalest visitor goes first");
        assert_eq!(times(&s, "d"), [99]);
        assert_eq!(s.evicted_capacity, 1);
    }

    #[test]
    fn targets_are_interned_once() {
        let mut s = Sessions::new(1, 1);
        assert_eq!(s.target(1, 2, 3), 0);
        assert_eq!(s.target(4, 2, 3), 1);
        assert_eq!(s.target(1, 2, 3), 0);
    }

    #[test]
    fn a_one_click_session_is_one_map_slot() {
        assert_eq!(std::mem::size_of::<ClickRec>(), 16);
        assert_eq!(std::mem::size_of::<(IdKey, Visitor)>(), 40, "key 16 + inline click 16 + tag 8");
    }
}
