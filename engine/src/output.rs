//! What the engine produces: ledger entries, applied clicks, fraud flags,
//! rejections, and per-event outcomes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use afflio_rules::Currency;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Why an event could not be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// Not JSON, wrong types, a missing or empty required field.
    Malformed,
    UnknownProgram,
    UnknownLink,
    CurrencyMismatch,
    InvalidAmount,
    ItemsMismatch,
    /// A refund or chargeback for an order with no capture.
    UnknownOrder,
    RefundExceedsCapture,
    /// The same `event_id` was applied before with different content.
    IdempotencyConflict,
    /// Older than the duplicate-detection retention behind the newest event
    /// time: it can no longer be told apart from a redelivery.
    LateEvent,
    /// A review that cannot apply: no such line, not eligible yet, already
    /// rejected, nothing held to clear.
    InvalidReview,
    /// A payout item that cannot apply: more than the available balance,
    /// unknown item, a transition its status does not allow.
    InvalidPayout,
    /// `ts` more than `max_future_skew` ahead of the arrival clock.
    FutureEvent,
    /// A registry event naming an application the program does not have.
    UnknownApplication,
    /// An application decided before is decided again.
    AlreadyDecided,
    /// A registry event naming a partner the program does not have.
    UnknownPartner,
    /// An id (partner, application, link) or code that is taken.
    DuplicateId,
    /// A registry event that cannot apply: a program not listed, a bad
    /// value (payout destination, identity hash), a limit reached.
    InvalidRegistry,
    /// A lead stage naming a lead the program does not have (open).
    UnknownLead,
    /// A subscription payment or cancellation naming a subscription the
    /// program does not have.
    UnknownSubscription,
    /// A stage the program does not define, one the lead reached before, or
    /// any stage after a disqualifying one.
    InvalidStage,
    /// A lead or subscription event for a program without `[programs.leads]`
    /// or `[programs.subscriptions]`.
    NotConfigured,
    /// A bounded table of the engine is full (subscriptions): the event is
    /// kept and can be sent again once there is room.
    LimitReached,
}

impl Reason {
    pub const ALL: [Reason; 23] = [
        Reason::Malformed,
        Reason::UnknownProgram,
        Reason::UnknownLink,
        Reason::CurrencyMismatch,
        Reason::InvalidAmount,
        Reason::ItemsMismatch,
        Reason::UnknownOrder,
        Reason::RefundExceedsCapture,
        Reason::IdempotencyConflict,
        Reason::LateEvent,
        Reason::InvalidReview,
        Reason::InvalidPayout,
        Reason::FutureEvent,
        Reason::UnknownApplication,
        Reason::AlreadyDecided,
        Reason::UnknownPartner,
        Reason::DuplicateId,
        Reason::InvalidRegistry,
        Reason::UnknownLead,
        Reason::UnknownSubscription,
        Reason::InvalidStage,
        Reason::NotConfigured,
        Reason::LimitReached,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::UnknownProgram => "unknown_program",
            Reason::UnknownLink => "unknown_link",
            Reason::CurrencyMismatch => "currency_mismatch",
            Reason::InvalidAmount => "invalid_amount",
            Reason::ItemsMismatch => "items_mismatch",
            Reason::UnknownOrder => "unknown_order",
            Reason::RefundExceedsCapture => "refund_exceeds_capture",
            Reason::IdempotencyConflict => "idempotency_conflict",
            Reason::LateEvent => "late_event",
            Reason::InvalidReview => "invalid_review",
            Reason::InvalidPayout => "invalid_payout",
            Reason::FutureEvent => "future_event",
            Reason::UnknownApplication => "unknown_application",
            Reason::AlreadyDecided => "already_decided",
            Reason::UnknownPartner => "unknown_partner",
            Reason::DuplicateId => "duplicate_id",
            Reason::InvalidRegistry => "invalid_registry",
            Reason::UnknownLead => "unknown_lead",
            Reason::UnknownSubscription => "unknown_subscription",
            Reason::InvalidStage => "invalid_stage",
            Reason::NotConfigured => "not_configured",
            Reason::LimitReached => "limit_reached",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event that was not applied, kept with its raw text.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub event_id: Option<String>,
    /// When it arrived (wall clock of the ingest, or the replay's start).
    pub arrival: DateTime<Utc>,
    /// Event time, when it could be read.
    pub event_ts: Option<DateTime<Utc>>,
    pub reason: Reason,
    /// The offending field, when one is at fault.
    pub field: Option<String>,
    pub detail: String,
    pub raw: String,
    /// Where it came from (`file:line`, `http`, `nats:seq`).
    pub origin: String,
}

/// How the event arrived: for rejection rows, and the clock its `ts` is
/// checked against.
#[derive(Clone, Copy)]
pub struct Arrival<'a> {
    /// When it arrived (kept in rejection rows).
    pub ts: DateTime<Utc>,
    pub origin: &'a dyn fmt::Display,
    /// The clock an event may not be ahead of by more than
    /// `max_future_skew` (`future_event`): the broker's storage time in the
    /// live service, `--as-of` in a replay; `None`: not checked.
    pub clock: Option<DateTime<Utc>>,
}

/// What happened to one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Same id, same content as an applied event: nothing changed.
    Duplicate,
    Rejected(Reason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    Accrual,
    Reversal,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Accrual => "accrual",
            EntryKind::Reversal => "reversal",
        }
    }
}

/// How an order was credited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttributionKind {
    Link,
    Code,
}

impl AttributionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AttributionKind::Link => "link",
            AttributionKind::Code => "code",
        }
    }
}

/// One row of the append-only commission ledger.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerEntry {
    /// `{event_id}:{tier}`: a re-applied event can never write a second row.
    pub entry_id: String,
    pub event_id: String,
    pub ts: DateTime<Utc>,
    pub program_id: Arc<str>,
    pub order_id: String,
    pub partner_id: Arc<str>,
    pub tier: u8,
    pub kind: EntryKind,
    /// The amount the commission is computed on; negative for reversals.
    pub basis: Decimal,
    /// The commission, rounded to the currency's minor units; negative for reversals.
    pub amount: Decimal,
    pub currency: Currency,
    pub attribution: AttributionKind,
    pub source: Arc<str>,
    pub eligible_at: DateTime<Utc>,
    /// The rate applied (accruals) as a fraction, e.g. 0.125.
    pub rate: Option<Decimal>,
    pub rules_version: u64,
    /// What earned it, beyond the program's rates: a reward rule's name,
    /// `renewal_rate`, `lead:<kind>`, `stage:<name>`, `disqualified`.
    pub reward: Option<Arc<str>>,
}

/// A fraud rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FraudRule {
    /// The customer is an identity of the credited partner.
    SelfReferral,
    /// Valid codes of two or more partners on one order.
    CouponStacking,
    /// Many orders from one customer id, e-mail hash or IP in a short window.
    Velocity,
    /// A capture within seconds of its winning click (scripted checkouts).
    FastConversion,
    /// A code mostly redeemed without a click from its partner (leaked to coupon sites).
    CouponLeak,
    /// A partner whose refunded share of captured revenue is abnormal.
    RefundRate,
    /// A partner's attributed orders in a time bucket far above its baseline.
    ConversionSpike,
}

impl FraudRule {
    pub fn as_str(self) -> &'static str {
        match self {
            FraudRule::SelfReferral => "self_referral",
            FraudRule::CouponStacking => "coupon_stacking",
            FraudRule::Velocity => "velocity",
            FraudRule::FastConversion => "fast_conversion",
            FraudRule::CouponLeak => "coupon_leak",
            FraudRule::RefundRate => "refund_rate",
            FraudRule::ConversionSpike => "conversion_spike",
        }
    }
}

impl fmt::Display for FraudRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fraud signal on an order.
#[derive(Clone, Debug, PartialEq)]
pub struct Flag {
    pub program_id: Arc<str>,
    pub order_id: String,
    pub partner_id: Arc<str>,
    pub rule: FraudRule,
    /// `flag` or `hold`.
    pub action: afflio_rules::FraudAction,
    /// How far past its threshold the rule fired (1.0 = at the threshold for
    /// rules with a threshold; 1.0 for the deterministic rules).
    pub score: f64,
    /// The measured quantity (orders, share, evidence, seconds).
    pub value: f64,
    /// What is usual for the partner or code, for the rules that learn it
    /// (its share of the program's orders; the program's refunds per order).
    pub baseline: Option<f64>,
    /// The threshold `value` was compared with.
    pub threshold: f64,
    pub detail: String,
    /// Event time of the event that raised the flag.
    pub ts: DateTime<Utc>,
    /// The event that raised the flag.
    pub event_id: String,
    /// Raised on an earlier order of an attack recognised later.
    pub retroactive: bool,
}

/// A reviewer's decision on one line: an append-only record.
#[derive(Clone, Debug, PartialEq)]
pub struct DecisionRow {
    /// The review event.
    pub event_id: String,
    pub ts: DateTime<Utc>,
    pub program_id: Arc<str>,
    pub order_id: String,
    pub partner_id: Arc<str>,
    pub tier: u8,
    pub decision: crate::event::Decision,
    pub reason: Option<String>,
    pub reviewer: String,
    /// The line's status before and after the decision.
    pub previous_status: crate::state::LineStatus,
    pub status: crate::state::LineStatus,
    /// The net commission of the line when decided.
    pub net_amount: Decimal,
    /// Part of a bulk approval (a review without an order).
    pub bulk: bool,
}

/// A payout item's state change: an append-only record.
#[derive(Clone, Debug, PartialEq)]
pub struct PayoutRow {
    pub event_id: String,
    pub ts: DateTime<Utc>,
    pub program_id: Arc<str>,
    pub batch_id: String,
    pub partner_id: String,
    pub currency: String,
    pub amount: Decimal,
    pub tds: Decimal,
    pub status: crate::event::PayoutStatus,
    pub provider: Option<String>,
    pub provider_ref: Option<String>,
    pub detail: Option<String>,
    pub idempotency_key: Option<String>,
    pub provider_batch: Option<String>,
    /// Where the money goes, as planned (the payouts crate's recorded
    /// destination; the tables show it masked).
    pub destination: Option<String>,
    /// On an attempt's record: when the request was sent (wall clock).
    pub attempted_at: Option<DateTime<Utc>>,
}

/// A partner's balance in one program (its currency) as of a time.
#[derive(Clone, Debug, PartialEq)]
pub struct Balance {
    pub program_id: Arc<str>,
    pub partner_id: Arc<str>,
    pub currency: afflio_rules::Currency,
    /// Net of lines not yet approved (or held).
    pub pending: Decimal,
    /// Approved and not yet paid or planned: what the next batch may pay.
    /// Negative when refunds after payment exceed it (a clawback to net).
    pub available: Decimal,
    /// In planned or sent batches.
    pub in_flight: Decimal,
    pub paid: Decimal,
}

/// A column of optional strings laid out as Arrow lays them out (one byte
/// buffer, offsets, validity): a row costs no allocation, and the sink makes
/// an Arrow array of it with three copies per batch.
#[derive(Clone, Debug, PartialEq)]
pub struct StrColumn {
    bytes: String,
    /// `len + 1` offsets into `bytes`, starting at 0.
    offsets: Vec<i32>,
    valid: Vec<bool>,
}

impl Default for StrColumn {
    fn default() -> Self {
        StrColumn { bytes: String::new(), offsets: vec![0], valid: Vec::new() }
    }
}

impl StrColumn {
    pub fn push(&mut self, v: Option<&str>) {
        if let Some(v) = v {
            self.bytes.push_str(v);
        }
        // Bounded by the flush size and the 2 KiB limit on strings: a column
        // of a batch never nears 2 GiB.
        let end = i32::try_from(self.bytes.len()).expect("string column over 2 GiB: flush sooner");
        self.offsets.push(end);
        self.valid.push(v.is_some());
    }

    pub fn len(&self) -> usize {
        self.valid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.valid.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        self.valid[i].then(|| &self.bytes[a..b])
    }

    /// The bytes, the `len + 1` offsets and the validity of each row.
    pub fn parts(&self) -> (&str, &[i32], &[bool]) {
        (&self.bytes, &self.offsets, &self.valid)
    }
}

/// Applied clicks, column by column (the bulk of the traffic: no
/// allocation per click).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClickColumns {
    pub event_id: StrColumn,
    /// Event time, microseconds since the epoch.
    pub ts: Vec<i64>,
    pub program_id: StrColumn,
    pub link_id: StrColumn,
    pub partner_id: StrColumn,
    pub visitor_id: StrColumn,
    pub ip: StrColumn,
    pub user_agent: StrColumn,
    pub landing_url: StrColumn,
    pub sub_id: StrColumn,
}

impl ClickColumns {
    pub(crate) fn push(
        &mut self,
        e: &crate::event::Event<'_>,
        program_id: &str,
        link_id: &str,
        partner_id: &str,
        c: &crate::event::Click<'_>,
    ) {
        self.event_id.push(Some(&e.event_id));
        self.ts.push(e.ts.timestamp_micros());
        self.program_id.push(Some(program_id));
        self.link_id.push(Some(link_id));
        self.partner_id.push(Some(partner_id));
        self.visitor_id.push(Some(&c.visitor_id));
        self.ip.push(c.ip.as_deref());
        self.user_agent.push(c.user_agent.as_deref());
        self.landing_url.push(c.landing_url.as_deref());
        self.sub_id.push(c.sub_id.as_deref());
    }

    pub fn len(&self) -> usize {
        self.ts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }
}

/// Rows produced since the last [`crate::Engine::take_output`].
#[derive(Clone, Debug, Default)]
pub struct Output {
    pub ledger: Vec<LedgerEntry>,
    pub clicks: ClickColumns,
    pub flags: Vec<Flag>,
    pub rejections: Vec<Rejection>,
    /// Reviewer decisions, one row per line decided.
    pub decisions: Vec<DecisionRow>,
    /// Payout item state changes.
    pub payouts: Vec<PayoutRow>,
    /// Orders closed by retention, with their final line status.
    pub closed: Vec<crate::state::ClosedOrder>,
    /// What happened that no table row says by itself (an order attributed,
    /// a lead created or moved, a partner applied or approved): for
    /// webhooks. Only kept when [`crate::Engine::set_notices`] is on.
    pub notices: Vec<Notice>,
}

/// Something that happened, for webhooks.
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    /// `order.attributed`, `lead.created`, `lead.stage_changed`,
    /// `partner.applied` or `partner.approved`.
    pub kind: &'static str,
    pub event_id: String,
    pub ts: DateTime<Utc>,
    pub program_id: Arc<str>,
    /// Whom it concerns (the credited partner; the applicant).
    pub partner_id: Option<Arc<str>>,
    /// The order, lead or application id.
    pub subject: String,
    /// Named details (attribution kind and source, lead kind, stage, e-mail-less applicant name).
    pub detail: Vec<(&'static str, String)>,
}

impl Output {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.ledger.len()
            + self.clicks.len()
            + self.flags.len()
            + self.rejections.len()
            + self.decisions.len()
            + self.payouts.len()
            + self.closed.len()
            + self.notices.len()
    }
}

/// Counters since the engine started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub events: u64,
    pub applied_clicks: u64,
    pub applied_captures: u64,
    pub applied_refunds: u64,
    pub applied_chargebacks: u64,
    /// Review events applied, and the line decisions they made.
    #[serde(default)]
    pub applied_reviews: u64,
    #[serde(default)]
    pub lines_decided: u64,
    /// Payout item state changes applied.
    #[serde(default)]
    pub applied_payouts: u64,
    /// Registry events applied.
    #[serde(default)]
    pub applied_registry: u64,
    /// Leads, lead stages, subscription payments and cancellations applied,
    /// and subscriptions started.
    #[serde(default)]
    pub applied_leads: u64,
    #[serde(default)]
    pub applied_stages: u64,
    #[serde(default)]
    pub applied_payments: u64,
    #[serde(default)]
    pub applied_cancels: u64,
    #[serde(default)]
    pub subscriptions_started: u64,
    pub duplicates: u64,
    pub rejected: BTreeMap<Reason, u64>,
    pub orders_by_link: u64,
    pub orders_by_code: u64,
    pub orders_unattributed: u64,
    pub ledger_entries: u64,
    pub flags: u64,
    /// Clicks dropped because a visitor had more than the per-visitor limit.
    pub clicks_dropped: u64,
    /// Visitors evicted because the tracked-visitor limit was reached.
    pub visitors_evicted_capacity: u64,
    /// Orders closed by `order_retention`.
    pub orders_closed: u64,
    /// Velocity keys not tracked because their program tracked the maximum.
    #[serde(default)]
    pub velocity_keys_dropped: u64,
}

impl Stats {
    pub fn applied(&self) -> u64 {
        self.applied_clicks
            + self.applied_captures
            + self.applied_refunds
            + self.applied_chargebacks
            + self.applied_reviews
            + self.applied_payouts
            + self.applied_registry
            + self.applied_leads
            + self.applied_stages
            + self.applied_payments
            + self.applied_cancels
    }

    pub fn rejections(&self) -> u64 {
        self.rejected.values().sum()
    }
}
