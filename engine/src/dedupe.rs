//! Idempotency: which event ids were seen (applied or refused after
//! decoding), with their content fingerprint, kept for the configured
//! retention of each program's event time.
//!
//! Ids are kept as the 128-bit hash of (program, event id) ([`scoped_key`]):
//! no allocation per event and a fixed size per remembered id, whatever the
//! id's length; two programs never share an id.
//!
//! Each program's ids form an append-only log in arrival order, trimmed from
//! the front as the program's watermark passes them. That makes checkpoints
//! incremental: a delta is the ids appended since the last one and how many
//! were trimmed in all.
//!
//! [`scoped_key`]: crate::sessions::scoped_key

use std::collections::{BTreeMap, VecDeque};

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::sessions::{IdKey, PreHashed};

#[derive(Debug, Default, Clone)]
struct Log {
    /// (event time, key) in arrival order; event times are nearly sorted.
    entries: VecDeque<(i64, IdKey)>,
    /// Entries trimmed from the front since the log began.
    popped: u64,
    /// Entries appended since the last delta.
    fresh: usize,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Dedupe {
    seen: HashMap<IdKey, [u64; 2], PreHashed>,
    logs: BTreeMap<u32, Log>,
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

/// One program's log in a checkpoint: the ids appended (still alive) and the
/// total trimmed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct LogDelta {
    program: u32,
    popped: u64,
    appended: Vec<(i64, IdKey, [u64; 2])>,
}

impl Dedupe {
    pub(crate) fn check(&self, key: IdKey, fingerprint: u128) -> Check {
        match self.seen.get(&key) {
            None => Check::New,
            Some(s) if *s == words(fingerprint) => Check::Duplicate,
            Some(_) => Check::Conflict,
        }
    }

    pub(crate) fn insert(&mut self, program: u32, key: IdKey, fingerprint: u128, ts_micros: i64) {
        let log = self.logs.entry(program).or_default();
        log.entries.push_back((ts_micros, key));
        log.fresh += 1;
        self.seen.insert(key, words(fingerprint));
    }

    /// Forgets a program's ids of events older than `cutoff` (event time).
    /// Entries whose time is after an older one's in arrival order wait for
    /// it: retention is a minimum, never cut short.
    pub(crate) fn evict_before(&mut self, program: u32, cutoff_micros: i64) {
        let Some(log) = self.logs.get_mut(&program) else { return };
        while let Some((ts, _)) = log.entries.front() {
            if *ts >= cutoff_micros {
                break;
            }
            if let Some((_, id)) = log.entries.pop_front() {
                self.seen.remove(&id);
                log.popped += 1;
            }
        }
        log.fresh = log.fresh.min(log.entries.len());
    }

    pub(crate) fn len(&self) -> usize {
        debug_assert_eq!(
            self.seen.len(),
            self.logs.values().map(|l| l.entries.len()).sum::<usize>(),
            "dedupe index and logs diverged"
        );
        self.seen.len()
    }

    /// Ids appended since the last delta (per program), then forgets them.
    pub(crate) fn take_delta(&mut self) -> Vec<LogDelta> {
        let mut out = Vec::new();
        for (&program, log) in &mut self.logs {
            let from = log.entries.len() - log.fresh.min(log.entries.len());
            let appended: Vec<_> = log
                .entries
                .range(from..)
                .map(|&(ts, k)| (ts, k, self.seen.get(&k).copied().unwrap_or_default()))
                .collect();
            out.push(LogDelta { program, popped: log.popped, appended });
            log.fresh = 0;
        }
        out
    }

    /// Every log, as a delta from nothing.
    pub(crate) fn full(&self) -> Vec<LogDelta> {
        self.logs
            .iter()
            .map(|(&program, log)| LogDelta {
                program,
                popped: log.popped,
                appended: log
                    .entries
                    .iter()
                    .map(|&(ts, k)| (ts, k, self.seen.get(&k).copied().unwrap_or_default()))
                    .collect(),
            })
            .collect()
    }

    /// Applies a delta read back: trims what was trimmed since, then appends.
    pub(crate) fn apply(&mut self, deltas: Vec<LogDelta>) -> Result<(), String> {
        for d in deltas {
            let log = self.logs.entry(d.program).or_default();
            if d.popped < log.popped {
                return Err(format!(
                    "dedupe log of program {} goes back from {} to {}",
                    d.program, log.popped, d.popped
                ));
            }
            let trim = ((d.popped - log.popped) as usize).min(log.entries.len());
            for (_, id) in log.entries.drain(..trim) {
                self.seen.remove(&id);
            }
            log.popped = d.popped;
            for (ts, k, fp) in d.appended {
                log.entries.push_back((ts, k));
                self.seen.insert(k, fp);
            }
            log.fresh = 0;
        }
        Ok(())
    }

    /// Forgets the change marks (after a restore or a full image).
    pub(crate) fn clear_changes(&mut self) {
        for log in self.logs.values_mut() {
            log.fresh = 0;
        }
    }

    /// A canonical view for equality checks: per program, popped count and
    /// entries with fingerprints.
    pub(crate) fn canonical(&self) -> Vec<LogDelta> {
        self.full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::scoped_key;

    fn key(s: &str) -> IdKey {
        scoped_key("p", s)
    }

    #[test]
    fn remembers_until_retention_then_forgets() {
        let mut d = Dedupe::default();
        d.insert(0, key("a"), 1, 100);
        d.insert(0, key("b"), 2, 200);
        assert_eq!(d.check(key("a"), 1), Check::Duplicate);
        assert_eq!(d.check(key("a"), 9), Check::Conflict);
        assert_eq!(d.check(key("c"), 1), Check::New);
        d.evict_before(0, 150);
        assert_eq!(d.check(key("a"), 1), Check::New);
        assert_eq!(d.check(key("b"), 2), Check::Duplicate);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn a_program_evicts_only_its_own_ids() {
        let mut d = Dedupe::default();
        d.insert(0, key("a"), 1, 100);
        d.insert(1, key("b"), 2, 100);
        d.evict_before(1, 150);
        assert_eq!(d.check(key("a"), 1), Check::Duplicate);
        assert_eq!(d.check(key("b"), 2), Check::New);
    }

    #[test]
    fn deltas_rebuild_the_logs_whatever_was_trimmed_in_between() {
        let mut live = Dedupe::default();
        let mut copy = Dedupe::default();
        let mut t = 0;
        for round in 0..6u32 {
            for i in 0..(3 + round) {
                t += 10;
                live.insert(round % 2, key(&format!("{round}-{i}")), u128::from(i) << 70 | 7, t);
            }
            // Trim past some fresh entries too (more than the old ones).
            live.evict_before(round % 2, t - 25);
            copy.apply(live.take_delta()).unwrap();
            assert_eq!(copy.canonical(), live.canonical(), "round {round}");
            assert_eq!(copy.seen, live.seen);
        }
        let mut fresh = Dedupe::default();
        fresh.apply(live.full()).unwrap();
        assert_eq!(fresh.canonical(), live.canonical());
    }
}
