//! What the state tables (orders, lines, balances) must be told since they
//! were last written: the orders whose content changed, those whose status
//! changed as time passed their eligibility, and the balances of the
//! partners concerned. Its cost follows the changes, not the open orders.

use chrono::{DateTime, Utc};

use super::Engine;
use crate::output::Balance;
use crate::state::{LineStatus, Order};

/// The state tables' rows changed since the last [`Engine::take_state_changes`].
/// Orders closed meanwhile are in the output's `closed` rows instead.
#[derive(Clone, Debug, Default)]
pub struct StateChanges {
    pub as_of: DateTime<Utc>,
    /// Open orders, with each line's status as of `as_of`.
    pub orders: Vec<(Order, Vec<LineStatus>)>,
    /// The balances of every partner with a changed line or payout.
    pub balances: Vec<Balance>,
}

impl StateChanges {
    pub fn is_empty(&self) -> bool {
        self.orders.is_empty() && self.balances.is_empty()
    }
}

impl Engine {
    /// The state tables' rows that changed since the last call, as of `as_of`
    /// (the wall clock in the live service). The first call after a restore
    /// reports only what changed since the checkpoint.
    pub fn take_state_changes(&mut self, as_of: DateTime<Utc>) -> StateChanges {
        let mut seqs = self.orders.take_store_changes();
        let now = as_of.timestamp_micros();
        if let Some(prev) = self.meta.store_as_of {
            // Lines whose eligibility was crossed (either way) changed status.
            for s in self.orders.eligible_between(prev.min(now), prev.max(now)) {
                seqs.insert(s);
                self.note_lines_changed(s);
            }
        }
        self.meta.store_as_of = Some(now);
        let orders: Vec<(Order, Vec<LineStatus>)> = seqs
            .into_iter()
            .filter_map(|s| self.orders.get(s))
            .map(|o| (o.clone(), self.line_statuses(o, as_of)))
            .collect();
        let partners = std::mem::take(&mut self.balance_changes);
        let mut balances = Vec::with_capacity(partners.len());
        for (prog, partner) in partners {
            let Some(program) = self.rules.program(self.names.name(prog)).cloned() else { continue };
            let partner_id = self.names.name(partner).clone();
            balances.push(self.partner_balance(prog, &program, &partner_id, as_of));
        }
        balances.sort_by(|a, b| (&a.program_id, &a.partner_id).cmp(&(&b.program_id, &b.partner_id)));
        StateChanges { as_of, orders, balances }
    }
}

impl Engine {
    /// Records that the state tables were written whole as of `as_of` (a
    /// replay's end): later changes are counted from here.
    pub fn mark_state_written(&mut self, as_of: DateTime<Utc>) {
        self.orders.take_store_changes();
        self.balance_changes.clear();
        self.meta.store_as_of = Some(as_of.timestamp_micros());
    }
}
