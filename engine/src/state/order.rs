//! Per-order state: attribution, totals, commission lines; and the store of
//! open orders, with the indexes the engine reads them by.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use afflio_rules::Currency;
use chrono::{DateTime, Utc};
use hashbrown::{HashMap, HashSet};
use rust_decimal::Decimal;

use serde::{Deserialize, Serialize};

use crate::output::{AttributionKind, FraudRule};

/// Why a typed promo code did not credit the order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CodeIssue {
    Unknown,
    NotStarted,
    Expired,
    Exhausted,
}

impl CodeIssue {
    pub fn as_str(self) -> &'static str {
        match self {
            CodeIssue::Unknown => "code_unknown",
            CodeIssue::NotStarted => "code_not_started",
            CodeIssue::Expired => "code_expired",
            CodeIssue::Exhausted => "code_exhausted",
        }
    }
}

/// Who an order is credited to, and through what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Credit {
    pub kind: AttributionKind,
    /// The link id, or the code as configured.
    pub source: Arc<str>,
    pub partner_id: Arc<str>,
}

/// One (order, partner, tier) commission line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub partner_id: Arc<str>,
    pub tier: u8,
    /// Sum of accrual entries.
    pub accrued: Decimal,
    /// Sum of all entries (accruals and reversals); never below zero.
    pub net: Decimal,
    /// The last reviewer decision on this line, if any.
    #[serde(default)]
    pub review: Option<Review>,
    /// Covered by the partner's paid payouts (oldest eligible lines first).
    #[serde(default)]
    pub paid: bool,
}

/// What a reviewer decided about a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Review {
    /// The flags were reviewed and found harmless: the line follows its
    /// normal lifecycle (auto-approval included).
    Cleared,
    /// Approved for payout (only once eligible).
    Approved,
    /// Never to be paid.
    Rejected,
}

impl Review {
    pub fn as_str(self) -> &'static str {
        match self {
            Review::Cleared => "cleared",
            Review::Approved => "approved",
            Review::Rejected => "rejected",
        }
    }
}

/// An order as the engine knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// The engine's number for the order: orders are kept (and listed) in
    /// the order of their first capture.
    pub seq: u64,
    pub program_id: Arc<str>,
    pub order_id: Box<str>,
    pub currency: Currency,
    pub first_capture_ts: DateTime<Utc>,
    pub last_capture_ts: DateTime<Utc>,
    /// Last capture + the program's hold.
    pub eligible_at: DateTime<Utc>,
    pub credit: Option<Credit>,
    pub captured: Decimal,
    /// Refunded and charged back.
    pub refunded: Decimal,
    pub chargeback_amount: Decimal,
    pub chargeback: bool,
    /// Codes typed at the first capture, normalised.
    pub codes: Vec<Box<str>>,
    /// Codes present but not valid, in typed order.
    pub code_issues: Vec<(Box<str>, CodeIssue)>,
    /// Fraud rules that flagged this order.
    pub flags: Vec<FraudRule>,
    /// A flag whose rule's action is `hold` holds every line until a review.
    #[serde(default)]
    pub held: bool,
    pub lines: Vec<Line>,
    pub captures: u32,
    pub refunds: u32,
    /// The newest capture, refund or chargeback time: the order is closed
    /// `order_retention` after it.
    pub last_activity: DateTime<Utc>,
    /// A lead or a subscription payment (`None`: a sale).
    #[serde(default)]
    pub extra: Option<Box<OrderExtra>>,
}

impl Order {
    pub fn kind(&self) -> OrderKind {
        self.extra.as_ref().map_or(OrderKind::Sale, |x| x.kind)
    }
}

/// What an order is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OrderKind {
    /// A capture's order (a subscription's first payment included).
    #[default]
    Sale,
    /// A lead or signup.
    Lead,
    /// A subscription's later payment.
    Payment,
}

impl OrderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderKind::Sale => "sale",
            OrderKind::Lead => "lead",
            OrderKind::Payment => "payment",
        }
    }
}

/// The parts of a lead, a subscription's payment or a subscription's first
/// order that plain sales do not have.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OrderExtra {
    pub kind: OrderKind,
    /// The lead's kind (`lead`, `signup`, ...) or the payment's (`first`,
    /// `renewal`, `upgrade`, `downgrade`).
    pub subtype: Option<Box<str>>,
    pub subscription_id: Option<Box<str>>,
    /// The stages a lead reached, in order.
    pub stages: Vec<Box<str>>,
    /// A disqualifying stage was reached: the lead earns nothing more.
    pub disqualified: bool,
    /// Why a subscription payment earned nothing (`cancelled`, `ended`).
    pub uncredited: Option<Box<str>>,
}

/// An order closed by retention: its final state and its lines' status.
#[derive(Clone, Debug, PartialEq)]
pub struct ClosedOrder {
    pub order: Order,
    /// Each line's status when the order was closed, in line order.
    pub statuses: Vec<LineStatus>,
    pub as_of: DateTime<Utc>,
}

impl Order {
    pub fn fully_refunded(&self) -> bool {
        self.refunded == self.captured
    }
}

/// Where a line stands in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LineStatus {
    Pending,
    Approved,
    Paid,
    Rejected,
}

impl LineStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LineStatus::Pending => "pending",
            LineStatus::Approved => "approved",
            LineStatus::Paid => "paid",
            LineStatus::Rejected => "rejected",
        }
    }
}

/// The open orders, in the order of their first capture, with the indexes
/// the engine reads them by. Changes are tracked twice: for the next
/// checkpoint delta, and for the next write of the state tables.
#[derive(Debug, Clone, Default)]
pub(crate) struct Orders {
    by_seq: BTreeMap<u64, Order>,
    pub(crate) next_seq: u64,
    /// program -> order id -> seq.
    index: HashMap<u32, HashMap<Box<str>, u64>>,
    /// (program, partner) -> seqs of its orders with a line (derived).
    by_partner: HashMap<(u32, Arc<str>), BTreeSet<u64>>,
    /// (eligible_at, seq) of every open order (derived): what becomes
    /// eligible as time passes.
    by_eligible: BTreeSet<(i64, u64)>,
    /// Changed since the last checkpoint delta (a missing order: closed).
    dirty: HashSet<u64>,
    /// Changed since the state tables were last written.
    store_dirty: BTreeSet<u64>,
    track: bool,
}

impl Orders {
    pub(crate) fn new() -> Orders {
        Orders { track: true, ..Orders::default() }
    }

    pub(crate) fn set_tracking(&mut self, on: bool) {
        self.track = on;
        if !on {
            self.dirty = HashSet::new();
            self.store_dirty = BTreeSet::new();
        }
    }

    pub(crate) fn tracking(&self) -> bool {
        self.track
    }

    fn mark(&mut self, seq: u64) {
        if self.track {
            self.dirty.insert(seq);
            self.store_dirty.insert(seq);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_seq.len()
    }

    /// Orders in the order of their first capture.
    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = &Order> + '_ {
        self.by_seq.values()
    }

    pub(crate) fn seq_of(&self, program: u32, order_id: &str) -> Option<u64> {
        self.index.get(&program)?.get(order_id).copied()
    }

    pub(crate) fn get(&self, seq: u64) -> Option<&Order> {
        self.by_seq.get(&seq)
    }

    /// The order, marked changed. Its lines' partners and its eligibility
    /// must not change through it (see [`Orders::set_eligible_at`]).
    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut Order> {
        if self.by_seq.contains_key(&seq) {
            self.mark(seq);
        }
        self.by_seq.get_mut(&seq)
    }

    pub(crate) fn set_eligible_at(&mut self, seq: u64, at: DateTime<Utc>) {
        let Some(o) = self.by_seq.get_mut(&seq) else { return };
        self.by_eligible.remove(&(o.eligible_at.timestamp_micros(), seq));
        o.eligible_at = at;
        self.by_eligible.insert((at.timestamp_micros(), seq));
        self.mark(seq);
    }

    /// Adds a new order (its `seq` is assigned here); returns the seq.
    pub(crate) fn insert(&mut self, program: u32, mut order: Order) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        order.seq = seq;
        self.index_order(program, &order);
        self.by_seq.insert(seq, order);
        self.mark(seq);
        seq
    }

    fn index_order(&mut self, program: u32, o: &Order) {
        self.index.entry(program).or_default().insert(o.order_id.clone(), o.seq);
        for l in &o.lines {
            self.by_partner.entry((program, l.partner_id.clone())).or_default().insert(o.seq);
        }
        self.by_eligible.insert((o.eligible_at.timestamp_micros(), o.seq));
    }

    /// Removes a closed order; returns it.
    pub(crate) fn remove(&mut self, program: u32, seq: u64) -> Option<Order> {
        let o = self.by_seq.remove(&seq)?;
        if let Some(m) = self.index.get_mut(&program) {
            m.remove(&o.order_id);
        }
        for l in &o.lines {
            if let Some(s) = self.by_partner.get_mut(&(program, l.partner_id.clone())) {
                s.remove(&seq);
                if s.is_empty() {
                    self.by_partner.remove(&(program, l.partner_id.clone()));
                }
            }
        }
        self.by_eligible.remove(&(o.eligible_at.timestamp_micros(), seq));
        self.mark(seq);
        Some(o)
    }

    /// Seqs of the orders with a line of `partner` in `program`, oldest first.
    pub(crate) fn of_partner(&self, program: u32, partner: &str) -> impl DoubleEndedIterator<Item = u64> + '_ {
        let key: (u32, Arc<str>) = (program, Arc::from(partner));
        self.by_partner.get(&key).into_iter().flat_map(|s| s.iter().copied())
    }

    /// Seqs of the orders whose eligibility falls in `(after, upto]`.
    pub(crate) fn eligible_between(&self, after: i64, upto: i64) -> Vec<u64> {
        if after >= upto {
            return Vec::new();
        }
        let range = (std::ops::Bound::Excluded((after, u64::MAX)), std::ops::Bound::Included((upto, u64::MAX)));
        self.by_eligible.range(range).map(|(_, s)| *s).collect()
    }

    /// Orders changed since the state tables were last written, then forgets them.
    pub(crate) fn take_store_changes(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.store_dirty)
    }

    /// Marks an order for the next write of the state tables only (its
    /// status changed with time, not its content).
    pub(crate) fn touch_for_store(&mut self, seq: u64) {
        if self.track {
            self.store_dirty.insert(seq);
        }
    }

    /// The changed orders (`None`: closed), then forgets them.
    pub(crate) fn take_delta(&mut self) -> OrdersDelta<'_> {
        let mut seqs: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
        seqs.sort_unstable();
        OrdersDelta { by_seq: &self.by_seq, seqs: Some(seqs) }
    }

    pub(crate) fn full(&self) -> OrdersDelta<'_> {
        OrdersDelta { by_seq: &self.by_seq, seqs: None }
    }

    /// Applies a delta read back; indexes are rebuilt by [`Orders::reindex`].
    pub(crate) fn apply(&mut self, next_seq: u64, entries: Vec<(u64, Option<Order>)>) {
        self.next_seq = next_seq;
        for (seq, o) in entries {
            match o {
                Some(o) => {
                    self.by_seq.insert(seq, o);
                }
                None => {
                    self.by_seq.remove(&seq);
                }
            }
        }
    }

    /// Rebuilds the indexes after a restore; `program` interns a program id.
    pub(crate) fn reindex(&mut self, mut program: impl FnMut(&str) -> u32) {
        self.index.clear();
        self.by_partner.clear();
        self.by_eligible.clear();
        let orders: Vec<(u32, u64)> = self.by_seq.values().map(|o| (program(&o.program_id), o.seq)).collect();
        for (p, seq) in orders {
            let o = self.by_seq.remove(&seq).expect("listed above");
            self.index_order(p, &o);
            self.by_seq.insert(seq, o);
        }
        self.dirty.clear();
        self.store_dirty.clear();
    }
}

/// Orders to serialize: the changed ones (with `None` for closed), or all.
pub(crate) struct OrdersDelta<'a> {
    by_seq: &'a BTreeMap<u64, Order>,
    seqs: Option<Vec<u64>>,
}

impl Serialize for OrdersDelta<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        match &self.seqs {
            None => {
                let mut seq = ser.serialize_seq(Some(self.by_seq.len()))?;
                for (k, o) in self.by_seq {
                    seq.serialize_element(&(k, Some(o)))?;
                }
                seq.end()
            }
            Some(seqs) => {
                let mut seq = ser.serialize_seq(Some(seqs.len()))?;
                for k in seqs {
                    seq.serialize_element(&(k, self.by_seq.get(k)))?;
                }
                seq.end()
            }
        }
    }
}
