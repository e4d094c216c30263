//! Clicks per (program, visitor), kept for the program's attribution window
//! behind its event-time watermark, with a bound on clicks per visitor and
//! on visitors per program.
//!
//! Compact by design (a retailer tracks tens of millions of visitors): a
//! session is keyed by the 128-bit hash of its program and visitor id (no
//! string kept), a click is 16 bytes (time and an interned
//! link/partner/program triple) and a visitor's first click is stored inline
//! in the map, so a one-click session costs one 40-byte map slot and no
//! allocation of its own. Programs never share a session: one program's
//! traffic can neither read nor evict another's visitors.

use std::hash::{BuildHasher, Hasher};

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::state::tracked::Tracked;

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
pub(crate) struct ClickRec {
    ts: i64,
    /// Index into [`Sessions::targets`].
    target: u32,
}

/// A visitor's clicks in application order (ties in `ts` are broken by it).
/// Most visitors click once: that click is inline (24 bytes in all).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Visitor {
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

    /// Keeps the clicks at or after `cutoff`: (any left, any removed).
    fn retain_from(&mut self, cutoff: i64) -> (bool, bool) {
        match self {
            Visitor::One(c) => (c.ts >= cutoff, false),
            Visitor::Many(v) => {
                let before = v.len();
                v.retain(|c| c.ts >= cutoff);
                let changed = v.len() != before;
                match v.as_slice() {
                    [] => (false, changed),
                    [only] => {
                        *self = Visitor::One(*only);
                        (true, changed)
                    }
                    _ => (true, changed),
                }
            }
        }
    }

    fn last_ts(&self) -> i64 {
        self.iter().map(|c| c.ts).max().unwrap_or(i64::MIN)
    }

    fn first_target(&self) -> u32 {
        self.as_slice().first().map_or(0, |c| c.target)
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct IdKey(u64, u64);

impl std::hash::Hash for IdKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0 ^ self.1);
    }
}

/// The key of an id within a scope (a program, a namespace): the scope and
/// the id are length-prefixed, so no two (scope, id) pairs share a key.
pub(crate) fn scoped_key(scope: &str, id: &str) -> IdKey {
    let mut buf = [0u8; 512];
    let need = 8 + scope.len() + id.len();
    let h = if need <= buf.len() {
        buf[..4].copy_from_slice(&(scope.len() as u32).to_le_bytes());
        buf[4..4 + scope.len()].copy_from_slice(scope.as_bytes());
        let at = 4 + scope.len();
        buf[at..at + 4].copy_from_slice(&(id.len() as u32).to_le_bytes());
        buf[at + 4..at + 4 + id.len()].copy_from_slice(id.as_bytes());
        xxhash_rust::xxh3::xxh3_128(&buf[..need])
    } else {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&(scope.len() as u32).to_le_bytes());
        h.update(scope.as_bytes());
        h.update(&(id.len() as u32).to_le_bytes());
        h.update(id.as_bytes());
        h.digest128()
    };
    IdKey(h as u64, (h >> 64) as u64)
}

/// Sessions: visitors of every program, each under its (program, visitor) key.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sessions {
    pub(crate) visitors: Tracked<IdKey, Visitor, PreHashed>,
    /// Interned (link, partner, program) of clicks; bounded by the links
    /// configured over the engine's life. Append-only.
    pub(crate) targets: Vec<[u32; 3]>,
    target_index: HashMap<[u32; 3], u32>,
    /// Visitors per program (derived).
    per_program: HashMap<u32, usize>,
    max_per_visitor: usize,
    max_visitors: usize,
}

impl Sessions {
    pub(crate) fn new(max_per_visitor: usize, max_visitors: usize) -> Sessions {
        Sessions { max_per_visitor: max_per_visitor.max(1), max_visitors: max_visitors.max(1), ..Sessions::default() }
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

    /// Appends targets read back from a checkpoint.
    pub(crate) fn restore_targets(&mut self, from: usize, targets: Vec<[u32; 3]>) -> Result<(), String> {
        if from != self.targets.len() {
            return Err(format!("click targets resume at {from}, have {}", self.targets.len()));
        }
        for t in targets {
            self.target_index.insert(t, self.targets.len() as u32);
            self.targets.push(t);
        }
        Ok(())
    }

    fn program_of(&self, v: &Visitor) -> u32 {
        self.targets.get(v.first_target() as usize).map_or(u32::MAX, |t| t[2])
    }

    /// Recounts visitors per program (after a restore).
    pub(crate) fn recount(&mut self) {
        let mut per: HashMap<u32, usize> = HashMap::new();
        for v in self.visitors.values() {
            *per.entry(self.program_of(v)).or_default() += 1;
        }
        self.per_program = per;
    }

    /// Records a click of `visitor` (its session key) on `target`; returns it
    /// resolved, and counts (clicks dropped, visitors evicted).
    pub(crate) fn record(&mut self, key: IdKey, ts: i64, target: u32) -> (Click, u64, u64) {
        debug_assert!((target as usize) < self.targets.len(), "click target not interned");
        let [link, partner, program] = self.targets[target as usize];
        let mut evicted = 0;
        let mut dropped = 0;
        if !self.visitors.contains_key(&key) {
            if self.per_program.get(&program).copied().unwrap_or(0) >= self.max_visitors {
                evicted = self.evict_for_capacity(program);
            }
            *self.per_program.entry(program).or_default() += 1;
        }
        let click = ClickRec { ts, target };
        let max = self.max_per_visitor;
        let v = self.visitors.upsert(key, || Visitor::One(click), |v| v.push(click));
        if v.len() > max {
            // Drop the oldest click (ties: the earlier applied), keeping the order.
            let oldest = v.iter().enumerate().min_by_key(|(_, c)| c.ts).map(|(i, _)| i);
            if let Some(i) = oldest {
                v.remove(i);
                dropped = 1;
            }
        }
        debug_assert!(v.len() <= max);
        (Click { ts, link, partner, program }, dropped, evicted)
    }

    /// The clicks of a session, in application order.
    pub(crate) fn clicks(&self, key: IdKey) -> impl DoubleEndedIterator<Item = Click> + '_ {
        let v = self.visitors.get(&key).map_or(&[][..], Visitor::as_slice);
        v.iter().map(|c| {
            let [link, partner, program] = self.targets[c.target as usize];
            Click { ts: c.ts, link, partner, program }
        })
    }

    /// Forgets clicks older than their program's cutoff (event time); they
    /// can no longer fall in any attribution window. Programs without a
    /// cutoff keep theirs.
    pub(crate) fn evict_before(&mut self, cutoff: impl Fn(u32) -> Option<i64>) {
        let targets = &self.targets;
        let per = &mut self.per_program;
        self.visitors.retain(|_, v| {
            let program = targets.get(v.first_target() as usize).map_or(u32::MAX, |t| t[2]);
            let Some(c) = cutoff(program) else { return (true, false) };
            let (kept, changed) = v.retain_from(c);
            if !kept {
                if let Some(n) = per.get_mut(&program) {
                    *n = n.saturating_sub(1);
                }
            }
            (kept, changed)
        });
    }

    /// Evicts the tenth of a program's visitors whose last click is oldest;
    /// returns how many.
    fn evict_for_capacity(&mut self, program: u32) -> u64 {
        let targets = &self.targets;
        let of = |v: &Visitor| targets.get(v.first_target() as usize).map_or(u32::MAX, |t| t[2]);
        let mut last: Vec<i64> = self.visitors.values().filter(|v| of(v) == program).map(Visitor::last_ts).collect();
        if last.is_empty() {
            return 0;
        }
        let k = last.len().div_ceil(10).max(1) - 1;
        let (_, cut, _) = last.select_nth_unstable(k);
        let cut = *cut;
        let mut evicted = 0;
        self.visitors.retain(|_, v| {
            let kept = of(v) != program || v.last_ts() > cut;
            if !kept {
                evicted += 1;
            }
            (kept, false)
        });
        if let Some(n) = self.per_program.get_mut(&program) {
            *n = n.saturating_sub(evicted as usize);
        }
        debug_assert!(
            self.per_program.get(&program).copied().unwrap_or(0) < self.max_visitors || self.max_visitors == 1
        );
        evicted
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

    fn k(v: &str) -> IdKey {
        scoped_key("p", v)
    }

    fn times(s: &Sessions, v: &str) -> Vec<i64> {
        s.clicks(k(v)).map(|c| c.ts).collect()
    }

    #[test]
    fn per_visitor_bound_drops_the_oldest_and_keeps_application_order() {
        let (mut s, t) = sessions(2, 10);
        s.record(k("v"), 10, t);
        s.record(k("v"), 5, t);
        let (_, dropped, _) = s.record(k("v"), 20, t);
        assert_eq!(times(&s, "v"), [10, 20]);
        assert_eq!(dropped, 1);
        let c = s.clicks(k("v")).next().unwrap();
        assert_eq!((c.link, c.partner, c.program), (1, 2, 3));
    }

    #[test]
    fn watermark_eviction_forgets_old_clicks_and_visitors_of_that_program_only() {
        let (mut s, t) = sessions(10, 10);
        let other = s.target(4, 5, 6);
        s.record(k("old"), 10, t);
        s.record(k("mixed"), 10, t);
        s.record(k("mixed"), 100, t);
        s.record(k("elsewhere"), 10, other);
        s.evict_before(|p| (p == 3).then_some(50));
        assert_eq!(s.visitors(), 2);
        assert_eq!(times(&s, "mixed"), [100]);
        assert!(times(&s, "old").is_empty());
        assert_eq!(times(&s, "elsewhere"), [10], "program 6 has no cutoff yet");
    }

    #[test]
    fn visitor_bound_evicts_the_stalest_of_the_same_program() {
        let (mut s, t) = sessions(10, 3);
        let other = s.target(4, 5, 6);
        s.record(k("x"), -5, other);
        for (i, v) in ["a", "b", "c"].iter().enumerate() {
            s.record(k(v), i as i64, t);
        }
        let (_, _, evicted) = s.record(k("d"), 99, t);
        assert!(times(&s, "a").is_empty(), "the stalest visitor of the program goes first");
        assert_eq!(times(&s, "d"), [99]);
        assert_eq!(times(&s, "x"), [-5], "another program's visitor is never evicted");
        assert_eq!(evicted, 1);
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

    #[test]
    fn scoped_keys_separate_scopes() {
        assert_ne!(scoped_key("a", "bc"), scoped_key("ab", "c"));
        assert_ne!(scoped_key("a", "x"), scoped_key("b", "x"));
        assert_eq!(scoped_key("a", "x"), scoped_key("a", "x"));
        let long = "y".repeat(600);
        assert_eq!(scoped_key("a", &long), scoped_key("a", &long));
        assert_ne!(scoped_key("a", &long), scoped_key("b", &long));
    }
}
