//! Idempotency: which event ids were seen (applied or refused after
//! decoding), with their content fingerprint, kept for the configured
//! retention of event time.

use std::collections::VecDeque;

use std::sync::Arc;

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Dedupe {
    seen: HashMap<Arc<str>, Seen>,
    /// Arrival order, for eviction; event times are nearly sorted in it.
    /// Shares each id's allocation with `seen`.
    order: VecDeque<(i64, Arc<str>)>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Seen {
    fingerprint: u128,
}

/// What the store knows about an event id.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Check {
    New,
    Duplicate,
    Conflict,
}

impl Dedupe {
    pub(crate) fn check(&self, event_id: &str, fingerprint: u128) -> Check {
        match self.seen.get(event_id) {
            None => Check::New,
            Some(s) if s.fingerprint == fingerprint => Check::Duplicate,
            Some(_) => Check::Conflict,
        }
    }

    pub(crate) fn insert(&mut self, event_id: &str, fingerprint: u128, ts_micros: i64) {
        let key: Arc<str> = event_id.into();
        self.order.push_back((ts_micros, key.clone()));
        self.seen.insert(key, Seen { fingerprint });
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

    #[test]
    fn remembers_until_retention_then_forgets() {
        let mut d = Dedupe::default();
        d.insert("a", 1, 100);
        d.insert("b", 2, 200);
        assert_eq!(d.check("a", 1), Check::Duplicate);
        assert_eq!(d.check("a", 9), Check::Conflict);
        assert_eq!(d.check("c", 1), Check::New);
        d.evict_before(150);
        assert_eq!(d.check("a", 1), Check::New);
        assert_eq!(d.check("b", 2), Check::Duplicate);
        assert_eq!(d.len(), 1);
    }
}
