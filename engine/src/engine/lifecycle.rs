//! The lifecycle of a commission line (pending, approved, paid, rejected),
//! and of an order (open until `order_retention` after its last activity,
//! then closed: written out with its lines and forgotten).

use chrono::{DateTime, Utc};

use super::Engine;
use crate::state::{ClosedOrder, Line, LineStatus, Order, Review};

impl Engine {
    /// The status of an order's line as of `as_of` (event time in replays).
    pub fn line_status(&self, order: &Order, line: &Line, as_of: DateTime<Utc>) -> LineStatus {
        match line.review {
            Some(Review::Rejected) => return LineStatus::Rejected,
            _ if line.paid => return LineStatus::Paid,
            Some(Review::Approved) => return LineStatus::Approved,
            Some(Review::Cleared) => {}
            None if order.held => return LineStatus::Pending,
            None => {}
        }
        let auto = self.rules.program(&order.program_id).is_some_and(|p| p.auto_approve);
        if auto && as_of >= order.eligible_at {
            LineStatus::Approved
        } else {
            LineStatus::Pending
        }
    }

    /// The status of each of an order's lines as of `as_of`, in line order.
    pub fn line_statuses(&self, order: &Order, as_of: DateTime<Utc>) -> Vec<LineStatus> {
        order.lines.iter().map(|l| self.line_status(order, l, as_of)).collect()
    }

    /// Closes a program's orders with no activity since `cutoff`: their final
    /// state is output and they are forgotten (bounded memory).
    pub(super) fn close_orders_before(&mut self, prog: u32, cutoff: i64) {
        let as_of = DateTime::from_timestamp_micros(cutoff).unwrap_or(DateTime::UNIX_EPOCH);
        let program = self.names.name(prog).clone();
        let idle: Vec<u64> = self
            .orders
            .iter()
            .filter(|o| *o.program_id == *program && o.last_activity.timestamp_micros() < cutoff)
            .map(|o| o.seq)
            .collect();
        for seq in idle {
            let Some(order) = self.orders.remove(prog, seq) else { continue };
            let statuses = self.line_statuses(&order, as_of);
            self.close_into_balances(prog, &order, &statuses);
            for l in &order.lines {
                let p = self.names.intern(&l.partner_id);
                self.note_balance_changed(prog, p);
            }
            self.meta.stats.orders_closed += 1;
            self.out.closed.push(ClosedOrder { order, statuses, as_of });
        }
    }

    /// An order's lines changed (amounts, review, hold): their partners'
    /// balances are to be written again.
    pub(super) fn note_lines_changed(&mut self, seq: u64) {
        let Some(o) = self.orders.get(seq) else { return };
        let Some(prog) = self.names.get(&o.program_id) else { return };
        let partners: Vec<std::sync::Arc<str>> = o.lines.iter().map(|l| l.partner_id.clone()).collect();
        for p in partners {
            let pi = self.names.intern(&p);
            self.note_balance_changed(prog, pi);
        }
    }

    pub(super) fn note_balance_changed(&mut self, prog: u32, partner: u32) {
        if self.tracking() {
            self.balance_changes.insert((prog, partner));
        }
    }

    /// An order whose status changed without its content changing (rules).
    pub(super) fn touch_order_for_store(&mut self, seq: u64) {
        self.orders.touch_for_store(seq);
        self.note_lines_changed(seq);
    }

    pub(super) fn tracking(&self) -> bool {
        self.orders.tracking()
    }
}
