//! The engine's durable state, and what makes its checkpoints incremental:
//! maps that track their changed keys ([`tracked::Tracked`]), append-only
//! logs (names, click targets, event ids), and the store of open orders.

pub(crate) mod order;
pub(crate) mod tracked;

use std::sync::Arc;

use hashbrown::HashMap;

pub use order::{ClosedOrder, CodeIssue, Credit, Line, LineStatus, Order, OrderExtra, OrderKind, Review};

/// Interned names (programs, partners, links, codes): small, bounded by the
/// rules, append-only (a checkpoint delta holds the names added since the
/// last one).
#[derive(Debug, Default, Clone)]
pub(crate) struct Names {
    index: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
    /// Names up to here are in a checkpoint.
    mark: usize,
}

impl Names {
    pub(crate) fn intern(&mut self, s: &str) -> u32 {
        if let Some(i) = self.index.get(s) {
            return *i;
        }
        let a: Arc<str> = s.into();
        let i = self.names.len() as u32;
        self.names.push(a.clone());
        self.index.insert(a, i);
        i
    }

    pub(crate) fn get(&self, s: &str) -> Option<u32> {
        self.index.get(s).copied()
    }

    pub(crate) fn name(&self, i: u32) -> &Arc<str> {
        &self.names[i as usize]
    }

    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }

    /// The names added since the last delta: (first index, names).
    pub(crate) fn take_delta(&mut self) -> (u32, &[Arc<str>]) {
        let from = self.mark;
        self.mark = self.names.len();
        (from as u32, &self.names[from..])
    }

    pub(crate) fn all(&self) -> &[Arc<str>] {
        &self.names
    }

    /// Appends names read back from a checkpoint.
    pub(crate) fn apply(&mut self, from: u32, names: Vec<Arc<str>>) -> Result<(), String> {
        if from as usize != self.names.len() {
            return Err(format!("names resume at {from}, have {}", self.names.len()));
        }
        for n in names {
            self.index.insert(n.clone(), self.names.len() as u32);
            self.names.push(n);
        }
        self.mark = self.names.len();
        Ok(())
    }
}
