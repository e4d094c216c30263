//! Events as the engine takes them: already decoded, typed, not yet validated
//! against the rules.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::registry::RegistryEvent;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Click,
    Capture,
    Refund,
    Chargeback,
    /// A reviewer's decision on commission lines (not from a checkout).
    Review,
    /// A payout item's state change (from the payouts queue or a provider).
    Payout,
    /// A lead or signup (attributed like an order, paid a flat reward).
    Lead,
    /// A lead reached a stage (qualified, won, lost, disqualified, ...).
    LeadStage,
    /// A later payment of a subscription (renewal, upgrade, downgrade).
    SubscriptionPayment,
    /// A subscription was cancelled: its later payments earn nothing.
    SubscriptionCancel,
    /// Registry changes (the marketplace): see [`crate::registry`].
    ProgramPublished,
    PartnerApplied,
    ApplicationDecided,
    LinkCreated,
    CodeCreated,
    PartnerUpdated,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Click => "click",
            EventType::Capture => "capture",
            EventType::Refund => "refund",
            EventType::Chargeback => "chargeback",
            EventType::Review => "review",
            EventType::Payout => "payout",
            EventType::Lead => "lead",
            EventType::LeadStage => "lead_stage",
            EventType::SubscriptionPayment => "subscription_payment",
            EventType::SubscriptionCancel => "subscription_cancel",
            EventType::ProgramPublished => "program_published",
            EventType::PartnerApplied => "partner_applied",
            EventType::ApplicationDecided => "application_decided",
            EventType::LinkCreated => "link_created",
            EventType::CodeCreated => "code_created",
            EventType::PartnerUpdated => "partner_updated",
        }
    }

    /// Whether this is a registry event (carried in a `data` object).
    pub fn is_registry(self) -> bool {
        matches!(
            self,
            EventType::ProgramPublished
                | EventType::PartnerApplied
                | EventType::ApplicationDecided
                | EventType::LinkCreated
                | EventType::CodeCreated
                | EventType::PartnerUpdated
        )
    }

    /// Every type's name, for messages.
    pub const NAMES: &'static str = "click, capture, refund, chargeback, review, payout, lead, lead_stage, subscription_payment, subscription_cancel, program_published, partner_applied, application_decided, link_created, code_created, partner_updated";

    pub fn parse(s: &str) -> Option<EventType> {
        Some(match s {
            "click" => EventType::Click,
            "capture" => EventType::Capture,
            "refund" => EventType::Refund,
            "chargeback" => EventType::Chargeback,
            "review" => EventType::Review,
            "payout" => EventType::Payout,
            "lead" => EventType::Lead,
            "lead_stage" => EventType::LeadStage,
            "subscription_payment" => EventType::SubscriptionPayment,
            "subscription_cancel" => EventType::SubscriptionCancel,
            "program_published" => EventType::ProgramPublished,
            "partner_applied" => EventType::PartnerApplied,
            "application_decided" => EventType::ApplicationDecided,
            "link_created" => EventType::LinkCreated,
            "code_created" => EventType::CodeCreated,
            "partner_updated" => EventType::PartnerUpdated,
            _ => return None,
        })
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One checkout event. Strings borrow from the input where they can.
#[derive(Clone, Debug, PartialEq)]
pub struct Event<'a> {
    /// Idempotency key, 1..=128 bytes.
    pub event_id: Cow<'a, str>,
    /// Event time: when it happened, not when it arrived.
    pub ts: DateTime<Utc>,
    pub program_id: Cow<'a, str>,
    pub body: Body<'a>,
}

impl Event<'_> {
    pub fn event_type(&self) -> EventType {
        match &self.body {
            Body::Click(_) => EventType::Click,
            Body::Capture(_) => EventType::Capture,
            Body::Refund(r) if r.chargeback => EventType::Chargeback,
            Body::Refund(_) => EventType::Refund,
            Body::Review(_) => EventType::Review,
            Body::Payout(_) => EventType::Payout,
            Body::Lead(_) => EventType::Lead,
            Body::LeadStage(_) => EventType::LeadStage,
            Body::Payment(_) => EventType::SubscriptionPayment,
            Body::Cancel(_) => EventType::SubscriptionCancel,
            Body::Registry(r) => match **r {
                RegistryEvent::ProgramPublished(_) => EventType::ProgramPublished,
                RegistryEvent::PartnerApplied(_) => EventType::PartnerApplied,
                RegistryEvent::ApplicationDecided(_) => EventType::ApplicationDecided,
                RegistryEvent::LinkCreated(_) => EventType::LinkCreated,
                RegistryEvent::CodeCreated(_) => EventType::CodeCreated,
                RegistryEvent::PartnerUpdated(_) => EventType::PartnerUpdated,
            },
        }
    }
}

/// The type-specific part of an event.
#[derive(Clone, Debug, PartialEq)]
pub enum Body<'a> {
    Click(Click<'a>),
    Capture(Capture<'a>),
    /// A refund, or a chargeback when `chargeback` is set.
    Refund(Refund<'a>),
    Review(ReviewEvent<'a>),
    Payout(PayoutEvent<'a>),
    Lead(Lead<'a>),
    LeadStage(LeadStage<'a>),
    /// A subscription's later payment.
    Payment(Payment<'a>),
    /// A subscription's cancellation.
    Cancel(Cancel<'a>),
    /// A registry change (its content in the event's `data` object).
    Registry(Box<RegistryEvent>),
}

/// Where a payout item stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PayoutStatus {
    /// In a planned batch: the amount is reserved from the approved balance.
    Planned,
    /// Accepted by the provider.
    Sent,
    /// Sent, but whether the provider took it is not known (a timeout, a
    /// 5xx, "already exists"): the amount stays reserved until the provider
    /// is asked; it is never sent again blindly.
    Unknown,
    /// The money arrived: the balance is paid.
    Paid,
    /// Never paid: the amount returns to the approved balance.
    Failed,
    /// Paid, then returned by the provider: the amount returns to the approved balance.
    Reversed,
}

impl PayoutStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PayoutStatus::Planned => "planned",
            PayoutStatus::Sent => "sent",
            PayoutStatus::Unknown => "unknown",
            PayoutStatus::Paid => "paid",
            PayoutStatus::Failed => "failed",
            PayoutStatus::Reversed => "reversed",
        }
    }

    pub fn parse(s: &str) -> Option<PayoutStatus> {
        Some(match s {
            "planned" => PayoutStatus::Planned,
            "sent" => PayoutStatus::Sent,
            "unknown" => PayoutStatus::Unknown,
            "paid" => PayoutStatus::Paid,
            "failed" => PayoutStatus::Failed,
            "reversed" => PayoutStatus::Reversed,
            _ => return None,
        })
    }
}

/// A payout item's state change: one partner's share of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct PayoutEvent<'a> {
    pub batch_id: Cow<'a, str>,
    pub partner_id: Cow<'a, str>,
    pub currency: Cow<'a, str>,
    /// Gross: what leaves the partner's balance.
    pub amount: Decimal,
    /// Withheld tax (TDS) included in `amount`, not transferred.
    pub tds: Decimal,
    pub status: PayoutStatus,
    pub provider: Option<Cow<'a, str>>,
    pub provider_ref: Option<Cow<'a, str>>,
    pub detail: Option<Cow<'a, str>>,
    /// Fixed when planned and never recomputed: the provider's idempotency
    /// key (RazorpayX `X-Payout-Idempotency`, PayPal `sender_item_id`), the
    /// provider batch the item is sent in (PayPal `sender_batch_id`), and the
    /// destination the money goes to.
    pub idempotency_key: Option<Cow<'a, str>>,
    pub provider_batch: Option<Cow<'a, str>>,
    pub destination: Option<Cow<'a, str>>,
    /// Set on the record written just before a request goes to the provider
    /// (an attempt): the wall-clock time it was sent, which the provider's
    /// idempotency window is counted from. Not part of the content.
    pub attempted_at: Option<DateTime<Utc>>,
}

/// What a reviewer decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Approve for payout: the line must be eligible; approving a held line
    /// is the review that releases it.
    Approve,
    /// Never pay the line.
    Reject,
    /// The flags were reviewed and are harmless: the held line returns to
    /// its normal lifecycle (it still waits for its eligibility).
    Clear,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Reject => "reject",
            Decision::Clear => "clear",
        }
    }

    pub fn parse(s: &str) -> Option<Decision> {
        Some(match s {
            "approve" => Decision::Approve,
            "reject" => Decision::Reject,
            "clear" => Decision::Clear,
            _ => return None,
        })
    }
}

/// A review: the lines of one order (optionally one partner's, one tier),
/// or, for `approve` without an order, every eligible unheld pending line
/// of the program as of the review's time (bulk approval).
#[derive(Clone, Debug, PartialEq)]
pub struct ReviewEvent<'a> {
    pub order_id: Option<Cow<'a, str>>,
    pub partner_id: Option<Cow<'a, str>>,
    pub tier: Option<u8>,
    pub decision: Decision,
    pub reason: Option<Cow<'a, str>>,
    /// Who decided (kept in the decisions table).
    pub reviewer: Cow<'a, str>,
}

/// A shopper followed a tracking link.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Click<'a> {
    pub link_id: Cow<'a, str>,
    pub visitor_id: Cow<'a, str>,
    pub ip: Option<Cow<'a, str>>,
    pub user_agent: Option<Cow<'a, str>>,
    pub landing_url: Option<Cow<'a, str>>,
    pub sub_id: Option<Cow<'a, str>>,
}

/// Money was captured for an order.
#[derive(Clone, Debug, PartialEq)]
pub struct Capture<'a> {
    pub order_id: Cow<'a, str>,
    pub amount: Decimal,
    pub currency: Cow<'a, str>,
    pub visitor_id: Option<Cow<'a, str>>,
    /// Promo codes typed at checkout, in the order typed.
    pub codes: Vec<Cow<'a, str>>,
    pub customer: Option<Customer<'a>>,
    pub ip: Option<Cow<'a, str>>,
    pub items: Option<Vec<Item<'a>>>,
    /// What else the checkout said: parts of the amount, the customer's
    /// status, the subscription the order starts.
    pub extra: SaleExtra<'a>,
}

/// The optional parts of a sale (a capture or a subscription payment).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SaleExtra<'a> {
    /// Tax, shipping and brand-funded discounts (gift cards, store credit,
    /// points) included in `amount`: left out of the commission basis when
    /// the program's `[programs.basis]` says so.
    pub tax: Option<Decimal>,
    pub shipping: Option<Decimal>,
    pub discount: Option<Decimal>,
    /// The checkout's word on whether the customer is new (first purchase).
    pub new_customer: Option<bool>,
    /// A capture with a subscription id starts that subscription.
    pub subscription_id: Option<Cow<'a, str>>,
    pub plan: Option<Cow<'a, str>>,
}

/// A lead or signup, attributed like an order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lead<'a> {
    pub lead_id: Cow<'a, str>,
    /// `lead` unless said (`signup`, `demo_request`, ...): rewards may differ per kind.
    pub kind: Cow<'a, str>,
    pub visitor_id: Option<Cow<'a, str>>,
    pub codes: Vec<Cow<'a, str>>,
    pub customer: Option<Customer<'a>>,
    pub ip: Option<Cow<'a, str>>,
}

/// A lead reached a stage.
#[derive(Clone, Debug, PartialEq)]
pub struct LeadStage<'a> {
    pub lead_id: Cow<'a, str>,
    pub stage: Cow<'a, str>,
}

/// A subscription's later payment.
#[derive(Clone, Debug, PartialEq)]
pub struct Payment<'a> {
    pub subscription_id: Cow<'a, str>,
    /// The payment's own id: refunds name it as their `order_id`.
    pub payment_id: Cow<'a, str>,
    /// `renewal`, `upgrade` or `downgrade`.
    pub kind: afflio_rules::PaymentKind,
    pub amount: Decimal,
    pub currency: Cow<'a, str>,
    pub items: Option<Vec<Item<'a>>>,
    pub extra: SaleExtra<'a>,
}

/// A subscription was cancelled.
#[derive(Clone, Debug, PartialEq)]
pub struct Cancel<'a> {
    pub subscription_id: Cow<'a, str>,
}

/// Who bought.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Customer<'a> {
    pub id: Option<Cow<'a, str>>,
    pub email_sha256: Option<Cow<'a, str>>,
}

/// One line of an order.
#[derive(Clone, Debug, PartialEq)]
pub struct Item<'a> {
    pub sku: Option<Cow<'a, str>>,
    pub category: Option<Cow<'a, str>>,
    pub amount: Decimal,
}

/// Money went back to the shopper.
#[derive(Clone, Debug, PartialEq)]
pub struct Refund<'a> {
    pub order_id: Cow<'a, str>,
    pub amount: Decimal,
    pub currency: Cow<'a, str>,
    pub items: Option<Vec<Item<'a>>>,
    /// A chargeback (forced by the card network) rather than a refund.
    pub chargeback: bool,
}

/// The content fingerprint of an event: equal for events that are the same
/// as parsed (field order, whitespace, unknown fields, number formatting
/// `"10.0"` vs `"10.00"` and time-zone spelling of the same instant do not
/// matter), different otherwise. Stable across processes and versions, since
/// it is kept in checkpoints.
///
/// The time of a review, a payout state change or a registry change is the
/// server's (the service stamps it on arrival): it is not part of their
/// content, so a client's retry of the same decision is a duplicate.
pub fn fingerprint(e: &Event<'_>) -> u128 {
    let mut h = Fp::new();
    h.str(1, &e.event_id);
    h.str(2, e.event_type().as_str());
    h.str(3, &e.program_id);
    if !matches!(e.body, Body::Review(_) | Body::Payout(_) | Body::Registry(_)) {
        h.int(4, e.ts.timestamp());
        h.int(5, i64::from(e.ts.timestamp_subsec_nanos()));
    }
    match &e.body {
        Body::Click(c) => {
            h.str(10, &c.link_id);
            h.str(11, &c.visitor_id);
            h.opt(12, &c.ip);
            h.opt(13, &c.user_agent);
            h.opt(14, &c.landing_url);
            h.opt(15, &c.sub_id);
        }
        Body::Capture(c) => {
            h.str(20, &c.order_id);
            h.money(21, c.amount);
            h.str(22, &c.currency);
            h.opt(23, &c.visitor_id);
            h.int(24, c.codes.len() as i64);
            for code in &c.codes {
                h.str(25, code);
            }
            if let Some(cu) = &c.customer {
                h.int(26, 1);
                h.opt(27, &cu.id);
                h.opt(28, &cu.email_sha256);
            }
            h.opt(29, &c.ip);
            h.items(&c.items);
            h.extra(&c.extra);
        }
        Body::Lead(l) => {
            h.str(90, &l.lead_id);
            h.str(91, &l.kind);
            h.opt(92, &l.visitor_id);
            h.int(93, l.codes.len() as i64);
            for code in &l.codes {
                h.str(94, code);
            }
            if let Some(cu) = &l.customer {
                h.int(95, 1);
                h.opt(96, &cu.id);
                h.opt(97, &cu.email_sha256);
            }
            h.opt(98, &l.ip);
        }
        Body::LeadStage(l) => {
            h.str(100, &l.lead_id);
            h.str(101, &l.stage);
        }
        Body::Payment(p) => {
            h.str(110, &p.subscription_id);
            h.str(111, &p.payment_id);
            h.str(112, p.kind.as_str());
            h.money(113, p.amount);
            h.str(114, &p.currency);
            h.items(&p.items);
            h.extra(&p.extra);
        }
        Body::Cancel(c) => {
            h.str(120, &c.subscription_id);
        }
        Body::Refund(r) => {
            h.str(40, &r.order_id);
            h.money(41, r.amount);
            h.str(42, &r.currency);
            h.items(&r.items);
        }
        Body::Payout(p) => {
            h.str(60, &p.batch_id);
            h.str(61, &p.partner_id);
            h.str(62, &p.currency);
            h.money(63, p.amount);
            h.money(64, p.tds);
            h.str(65, p.status.as_str());
            h.opt(66, &p.provider);
            h.opt(67, &p.provider_ref);
            h.opt(68, &p.detail);
            h.opt(69, &p.idempotency_key);
            h.opt(70, &p.provider_batch);
            h.opt(71, &p.destination);
        }
        Body::Registry(r) => {
            h.bytes(80, &r.canonical());
        }
        Body::Review(r) => {
            h.opt(50, &r.order_id);
            h.opt(51, &r.partner_id);
            h.int(52, r.tier.map_or(-1, i64::from));
            h.str(53, r.decision.as_str());
            h.opt(54, &r.reason);
            h.str(55, &r.reviewer);
        }
    }
    h.digest()
}

/// Feeds tagged, length-prefixed fields into the hash in a fixed order.
/// The fingerprint's input is gathered in a stack buffer and hashed in one
/// call (the same value as feeding it piecemeal, far cheaper for the small
/// events that are the bulk of the traffic); a long event spills into the
/// streaming state.
struct Fp {
    buf: [u8; 512],
    len: usize,
    spill: Option<Box<xxhash_rust::xxh3::Xxh3>>,
}

impl Fp {
    fn new() -> Fp {
        Fp { buf: [0; 512], len: 0, spill: None }
    }

    fn update(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.buf.len() {
            let state = self.spill.get_or_insert_with(|| Box::new(xxhash_rust::xxh3::Xxh3::new()));
            state.update(&self.buf[..self.len]);
            self.len = 0;
            if bytes.len() > self.buf.len() {
                state.update(bytes);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn digest(mut self) -> u128 {
        match self.spill.take() {
            None => xxhash_rust::xxh3::xxh3_128(&self.buf[..self.len]),
            Some(mut state) => {
                state.update(&self.buf[..self.len]);
                state.digest128()
            }
        }
    }

    fn str(&mut self, tag: u8, v: &str) {
        self.update(&[tag]);
        self.update(&(v.len() as u64).to_le_bytes());
        self.update(v.as_bytes());
    }

    fn bytes(&mut self, tag: u8, v: &[u8]) {
        self.update(&[tag]);
        self.update(&(v.len() as u64).to_le_bytes());
        self.update(v);
    }

    fn int(&mut self, tag: u8, v: i64) {
        self.update(&[tag]);
        self.update(&v.to_le_bytes());
    }

    fn opt(&mut self, tag: u8, v: &Option<Cow<'_, str>>) {
        if let Some(v) = v {
            self.str(tag, v);
        }
    }

    fn money(&mut self, tag: u8, d: Decimal) {
        let n = d.normalize();
        self.update(&[tag]);
        self.update(&n.mantissa().to_le_bytes());
        self.update(&n.scale().to_le_bytes());
    }

    fn extra(&mut self, x: &SaleExtra<'_>) {
        if *x == SaleExtra::default() {
            // Fingerprints of plain sales stay what they were.
            return;
        }
        for (tag, v) in [(130, x.tax), (131, x.shipping), (132, x.discount)] {
            if let Some(v) = v {
                self.money(tag, v);
            }
        }
        if let Some(n) = x.new_customer {
            self.int(133, i64::from(n));
        }
        self.opt(134, &x.subscription_id);
        self.opt(135, &x.plan);
    }

    fn items(&mut self, items: &Option<Vec<Item<'_>>>) {
        let Some(items) = items else { return };
        self.int(30, items.len() as i64);
        for it in items {
            self.int(31, i64::from(it.sku.is_some()));
            self.opt(32, &it.sku);
            self.int(33, i64::from(it.category.is_some()));
            self.opt(34, &it.category);
            self.money(35, it.amount);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(amount: &str, ts: &str) -> Event<'static> {
        Event {
            event_id: "e1".into(),
            ts: DateTime::parse_from_rfc3339(ts).unwrap().with_timezone(&Utc),
            program_id: "acme".into(),
            body: Body::Capture(Capture {
                order_id: "o1".into(),
                amount: amount.parse().unwrap(),
                currency: "USD".into(),
                visitor_id: None,
                codes: vec!["A".into()],
                customer: None,
                ip: None,
                items: None,
                extra: SaleExtra::default(),
            }),
        }
    }

    #[test]
    fn buffered_fingerprint_equals_the_streaming_hash_of_the_same_bytes() {
        // Fingerprints are kept in checkpoints: the buffer must not change them.
        for sizes in [&[3usize, 40, 9][..], &[500, 20, 1], &[700], &[10, 600, 300, 2000, 5]] {
            let mut fp = Fp::new();
            let mut reference = xxhash_rust::xxh3::Xxh3::new();
            for (i, &n) in sizes.iter().enumerate() {
                let bytes: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
                fp.update(&bytes);
                reference.update(&bytes);
            }
            assert_eq!(fp.digest(), reference.digest128(), "pieces {sizes:?}");
        }
    }

    #[test]
    fn fingerprint_ignores_spelling_but_not_content() {
        let a = fingerprint(&capture("10.00", "2026-11-01T10:00:00Z"));
        assert_eq!(a, fingerprint(&capture("10.0", "2026-11-01T11:00:00+01:00")));
        assert_ne!(a, fingerprint(&capture("10.01", "2026-11-01T10:00:00Z")));
        assert_ne!(a, fingerprint(&capture("10.00", "2026-11-01T10:00:01Z")));
        let mut e = capture("10.00", "2026-11-01T10:00:00Z");
        if let Body::Capture(c) = &mut e.body {
            c.codes.push("B".into());
        }
        assert_ne!(a, fingerprint(&e));
        let mut e = capture("10.00", "2026-11-01T10:00:00Z");
        if let Body::Capture(c) = &mut e.body {
            c.visitor_id = Some("v".into());
        }
        assert_ne!(a, fingerprint(&e));
    }
}
