//! Afflio engine: a pure, deterministic state machine. Events go in
//! ([`Engine::apply`]); ledger entries, applied clicks, fraud flags and
//! rejections come out ([`Engine::take_output`]), and order and line state can
//! be read at any time.
//!
//! Invariants: the engine does no I/O and reads no clock (event time drives
//! windows and lifecycle); every map and window is bounded by the rules'
//! `[engine]` limits; a line's net is never below zero and is exactly zero
//! after a full refund; the ledger's sum equals the lines' sum.

mod dedupe;
mod engine;
mod event;
mod fraud;
mod money;
mod output;
pub mod registry;
mod sessions;
mod state;

pub use afflio_rules as rules;
pub use engine::{
    check_event, email_sha256, CheckpointError, Engine, Invalid, ItemState, ListingView, MemoryReport, PartnerView,
    PayoutItem, StateChanges,
};
pub use event::{
    fingerprint, Body, Cancel, Capture, Click, Customer, Decision, Event, EventType, Item, Lead, LeadStage, Payment,
    PayoutEvent, PayoutStatus, Refund, ReviewEvent, SaleExtra,
};
pub use money::round_money;
pub use output::{
    Arrival, AttributionKind, Balance, ClickColumns, DecisionRow, EntryKind, Flag, FraudRule, LedgerEntry, Notice,
    Outcome, Output, PayoutRow, Reason, Rejection, Stats, StrColumn,
};
pub use state::{ClosedOrder, CodeIssue, Credit, Line, LineStatus, Order, OrderExtra, OrderKind, Review};

#[cfg(test)]
mod tests;
