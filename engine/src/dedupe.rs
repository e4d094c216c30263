//! Idempotency: which event ids were seen (applied or refused after
//! decoding), with their content fingerprint, kept for the configured
//! retention of event time.

//!
//! Ids are kept as their 128-bit hash ([`id_key`]): no allocation per event
//! and 48 bytes per remembered id, whatever the id's length.

use std::collections::VecDeque;

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::sessions::{IdKey, PreHashed};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Dedupe {
    seen: HashMap<IdKey, Seen, PreHashed>,
    /// Arrival order, for eviction; event times are nearly sorted in it.
    order: VecDeque<(i64, IdKey)>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Seen {
    fingerprint: [u64; 2],
}

fn words(fp: u128) -> [u64; 2] {
    [fp as u64, (fp >> 64) as u64]
}

/// What the store knows about an event id.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Check {
    New,
    Duplicate,
    Conflict,
}

impl Dedupe {
    pub(crate) fn check(&self, key: IdKey, fingerprint: u128) -> Check {
        match self.seen.get(&key) {
            None => Check::New,
            Some(s) if s.fingerprint == words(fingerprint) => Check::Duplicate,
            Some(_) => Check::Conflict,
        }
    }

    pub(crate) fn insert(&mut self, key: IdKey, fingerprint: u128, ts_micros: i64) {
        self.order.push_back((ts_micros, key));
        self.seen.insert(key, Seen { fingerprint: words(fingerprint) });
    }

    /// Forgets ids of events older than `cutoff` (event time). Entries whose
    /// time is after an older one's in arrival order wait for it: retention
    /// is a minimum, never cut short.
    pub(crate) fn evict_before(&mut self, cutoff_micros: i64) {
        while let Some((ts, _)) = self.order.front() {
            if *ts >= cutoff_micros {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.seen.remove(&id);
            }
        }
        debug_assert_eq!(self.seen.len(), self.order.len(), "dedupe index and queue diverged");
    }

    pub(crate) fn len(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::id_key;

    #[test]
    fn remembers_until_retention_then_forgets() {
        let mut d = Dedupe::default();
        d.insert(id_key("a"), 1, 100);
        d.insert(id_key("b"), 2, 200);
        assert_eq!(d.check(id_key("a"), 1), Check::Duplicate);
        assert_eq!(d.check(id_key("a"), 9), Check::Conflict);
        assert_eq!(d.check(id_key("c"), 1), Check::New);
        d.evict_before(150);
        assert_eq!(d.check(id_key("a"), 1), Check::New);
        assert_eq!(d.check(id_key("b"), 2), Check::Duplicate);
        assert_eq!(d.len(), 1);
    }
}
