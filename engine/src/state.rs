//! Per-order state: attribution, totals, commission lines.

use std::sync::Arc;

use afflio_rules::Currency;
use chrono::{DateTime, Utc};
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
