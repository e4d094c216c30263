//! What goes to a provider and what comes back: a payout item's identity
//! (fixed when it is planned), the request built from it, and the answers.

use afflio_engine::rules::PayoutProvider;
use afflio_engine::{PayoutItem, PayoutStatus};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Where a partner's money goes, fixed when the item is planned: a later
/// change of the partner's account in the rules never changes a request
/// already made (its body must stay the same for the provider's
/// idempotency to hold).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Destination {
    /// RazorpayX to a UPI address (mode UPI).
    Upi { vpa: String, name: String },
    /// RazorpayX to a bank account, by `mode` (IMPS, NEFT or RTGS).
    Bank { account_number: String, ifsc: String, name: String, mode: String },
    /// PayPal to an email address.
    Paypal { email: String },
}

impl Destination {
    /// The text recorded in the planned item (and in the event stream).
    pub fn recorded(&self) -> String {
        serde_json::to_string(self).expect("a destination always serializes")
    }

    /// Reads a recorded destination back.
    pub fn parse(recorded: &str) -> Result<Destination, String> {
        serde_json::from_str(recorded).map_err(|e| format!("recorded destination is not readable: {e}"))
    }

    /// The provider that pays to it.
    pub fn provider(&self) -> PayoutProvider {
        match self {
            Destination::Upi { .. } | Destination::Bank { .. } => PayoutProvider::Razorpayx,
            Destination::Paypal { .. } => PayoutProvider::Paypal,
        }
    }
}

/// Account numbers and addresses are personal data: never printed whole.
impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tail = |s: &str| s.chars().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect::<String>();
        match self {
            Destination::Upi { vpa, .. } => write!(f, "Upi(****{})", tail(vpa)),
            Destination::Bank { account_number, mode, .. } => write!(f, "Bank({mode} ****{})", tail(account_number)),
            Destination::Paypal { email } => write!(f, "Paypal(****{})", tail(email)),
        }
    }
}

/// The provider name an item's `provider` field holds.
pub fn provider_name(p: PayoutProvider) -> &'static str {
    match p {
        PayoutProvider::Razorpayx => "razorpayx",
        PayoutProvider::Paypal => "paypal",
    }
}

/// An item's idempotency key: 35 characters (`afl` and 32 hex digits) from
/// its program, batch and partner. Fits every provider's rules: RazorpayX
/// `X-Payout-Idempotency` (4 to 36 letters, digits, `-`, `_`, space) and
/// `reference_id` (at most 40), PayPal `sender_item_id` (at most 63).
pub fn item_key(program_id: &str, batch_id: &str, partner_id: &str) -> String {
    let text = format!("{program_id}\u{0}{batch_id}\u{0}{partner_id}");
    format!("afl{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
}

/// The id of one request group of a batch (PayPal's `sender_batch_id`):
/// chunks are numbered when the batch is planned and never change.
pub fn group_id(program_id: &str, batch_id: &str, provider: &str, chunk: usize) -> String {
    let text = format!("{program_id}\u{0}{batch_id}\u{0}{provider}");
    format!("afl{:016x}-{chunk}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

/// One item as a provider request: exactly what was recorded when it was
/// planned, nothing re-read from the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub program_id: String,
    pub batch_id: String,
    pub partner_id: String,
    pub currency: String,
    /// Gross: what leaves the balance.
    pub amount: Decimal,
    /// Withheld tax, included in `amount`, not transferred.
    pub tds: Decimal,
    /// The idempotency key (RazorpayX header and `reference_id`, PayPal `sender_item_id`).
    pub key: String,
    /// The request group (PayPal `sender_batch_id`); for RazorpayX the key.
    pub group: String,
    pub destination: Destination,
    /// The provider's id, once known (RazorpayX payout id, PayPal batch id).
    pub provider_ref: Option<String>,
}

impl Request {
    /// What is transferred: gross less withheld tax.
    pub fn transfer(&self) -> Decimal {
        self.amount - self.tds
    }

    /// The request an item stands for, from what its plan recorded (the
    /// currency is its program's).
    pub fn of(item: &PayoutItem, currency: &str) -> Result<Request, String> {
        let s = &item.state;
        let what = || format!("payout item {}/{}/{}", item.program_id, item.batch_id, item.partner_id);
        let key = s.idempotency_key.as_deref().ok_or_else(|| format!("{} has no idempotency key", what()))?;
        let destination = Destination::parse(
            s.destination.as_deref().ok_or_else(|| format!("{} has no recorded destination", what()))?,
        )
        .map_err(|e| format!("{}: {e}", what()))?;
        Ok(Request {
            program_id: item.program_id.clone(),
            batch_id: item.batch_id.clone(),
            partner_id: item.partner_id.clone(),
            currency: currency.to_string(),
            amount: s.amount,
            tds: s.tds,
            key: key.to_string(),
            group: s.provider_batch.as_deref().unwrap_or(key).to_string(),
            destination,
            provider_ref: s.provider_ref.as_deref().map(str::to_string),
        })
    }
}

/// What a plan fixes for one item: the gross taken from the balance, the
/// tax withheld from it, and where the rest goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub amount: Decimal,
    pub tds: Decimal,
    pub destination: Destination,
}

/// What a provider said about one item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The provider has the payout, and this is where it stands.
    Status { status: PayoutStatus, provider_ref: Option<String>, detail: Option<String> },
    /// Refused for good (a validation error on a first request): nothing
    /// was paid and nothing will be; the amount returns to the balance.
    Refused(String),
    /// Whether the provider took it is not known (timeout, 5xx, 429, a
    /// conflict): the item stays `unknown` and is looked up later.
    Unknown(String),
    /// The provider has no payout under this item's identity.
    NotFound,
}

/// Which items a webhook speaks of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One item, by its idempotency key.
    Key(String),
    /// Every item of a request group (a PayPal batch).
    Group(String),
}

/// One status change a webhook reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub target: Target,
    pub answer: Answer,
}

/// What a verified webhook says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Webhook {
    Updates(Vec<Update>),
    /// Nothing about an item, but worth keeping (RazorpayX `payout.downtime.*`).
    Notice(String),
    /// Not about payouts (or not ours): acknowledged, nothing applied.
    Ignored(String),
}

/// Why a webhook was not taken. Who is at fault is in the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The sender's: the signature does not verify. Nothing applied.
    #[error("the webhook signature does not verify: {0}")]
    BadSignature(String),
    /// The configuration's: no secret or webhook id for this provider.
    #[error("webhooks from {0} are not configured: {1}")]
    NotConfigured(&'static str, String),
    /// The sender's: a verified body that is not what the provider sends.
    #[error("malformed webhook: {0}")]
    Malformed(String),
    /// External: the provider could not be asked to verify it (retry).
    #[error("cannot verify the webhook now: {0}")]
    Unavailable(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fit_every_provider() {
        let k = item_key("a-very-long-program-id-for-a-large-retailer", "batch-20261103T000000Z", &"p".repeat(200));
        assert_eq!(k.len(), 35);
        assert!(k.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(k, item_key("a", "b", "c"));
        assert_eq!(item_key("a", "b", "c"), item_key("a", "b", "c"));
        // No ambiguity from concatenation.
        assert_ne!(item_key("ab", "c", "d"), item_key("a", "bc", "d"));
        let g = group_id("p", "b", "paypal", 3);
        assert!(g.ends_with("-3") && g.len() <= 40, "{g}");
    }

    #[test]
    fn destinations_round_trip_and_never_print_whole() {
        let d = Destination::Bank {
            account_number: "50100123456789".into(),
            ifsc: "HDFC0001234".into(),
            name: "Meena R".into(),
            mode: "IMPS".into(),
        };
        assert_eq!(Destination::parse(&d.recorded()).unwrap(), d);
        assert_eq!(format!("{d:?}"), "Bank(IMPS ****6789)");
        assert!(Destination::parse(r#"{"kind":"bank","extra":1}"#).is_err());
    }
}
