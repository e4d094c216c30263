//! Compilation of the raw file into validated rules.

use std::collections::BTreeMap;

use hashbrown::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

use crate::error::{ConfigError, Problem};
use crate::raw::{RawCode, RawConfig, RawLink, RawMarketplace, RawPartner, RawPayout, RawProgram, S};
use crate::units::{parse_duration, Currency, Rate};
use serde::{Deserialize, Serialize};

/// How clicks compete for an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttributionModel {
    /// The latest qualifying click wins (default).
    LastClick,
    /// The earliest qualifying click wins.
    FirstClick,
}

/// Engine-wide limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSettings {
    /// How long an applied event id is remembered for duplicate detection.
    pub dedupe_retention: TimeDelta,
    /// How far behind the newest event time an event may arrive (watermark lag).
    pub out_of_order: TimeDelta,
    /// At most this many clicks are kept per visitor (oldest dropped first).
    pub max_clicks_per_visitor: usize,
    /// At most this many visitors are tracked at once (oldest evicted first).
    pub max_tracked_visitors: usize,
    /// Orders are closed (written out and forgotten) this long after their
    /// last capture, refund or chargeback.
    pub order_retention: TimeDelta,
    /// An event whose `ts` is more than this ahead of the arrival clock is
    /// refused (`future_event`).
    pub max_future_skew: TimeDelta,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            dedupe_retention: TimeDelta::days(30),
            out_of_order: TimeDelta::hours(1),
            max_clicks_per_visitor: 64,
            max_tracked_visitors: 5_000_000,
            order_retention: TimeDelta::days(400),
            max_future_skew: TimeDelta::minutes(5),
        }
    }
}

/// A brand's affiliate program.
#[derive(Clone, Debug)]
pub struct Program {
    pub id: String,
    pub currency: Currency,
    pub rate: Rate,
    /// Override rates for the credited partner's parent (tier 1), grandparent (tier 2), ...
    pub overrides: Vec<Rate>,
    /// Return window: a line becomes eligible this long after the order's last capture.
    pub hold: TimeDelta,
    pub auto_approve: bool,
    pub window: TimeDelta,
    pub model: AttributionModel,
    pub code_priority: bool,
    pub category_rates: HashMap<String, Rate>,
    /// Promo codes of this program, by normalised code.
    pub codes: HashMap<String, Code>,
    /// Fraud detectors of this program.
    pub fraud: FraudSettings,
    /// The smallest amount paid out to a partner at once (0: any positive balance).
    pub min_payout: rust_decimal::Decimal,
    /// Its marketplace listing and how approved creators are set up.
    pub marketplace: Marketplace,
    /// `[programs.leads]`: `None`, the program takes no leads.
    pub leads: Option<Leads>,
    /// `[programs.subscriptions]`: `None`, the program takes no subscription payments.
    pub subscriptions: Option<Subscriptions>,
    /// Reward rules, first match wins.
    pub rewards: Vec<Reward>,
    /// What the commission basis leaves out of the captured amount.
    pub basis: Basis,
}

/// `[programs.leads]`: what leads and their stages earn.
#[derive(Clone, Debug, PartialEq)]
pub struct Leads {
    /// The flat reward of an accepted lead.
    pub reward: rust_decimal::Decimal,
    /// Rewards per lead kind, instead of `reward`.
    pub kinds: HashMap<String, rust_decimal::Decimal>,
    pub hold: TimeDelta,
    pub stages: Vec<Stage>,
}

impl Leads {
    /// The reward of a lead of `kind` (the kind's, else the program's).
    pub fn reward_of(&self, kind: &str) -> rust_decimal::Decimal {
        self.kinds.get(kind).copied().unwrap_or(self.reward)
    }

    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// A stage a lead can reach (each once).
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    pub name: String,
    pub reward: rust_decimal::Decimal,
    /// Reverses what the lead earned and ends it.
    pub disqualify: bool,
}

/// How long a subscription's payments earn after its first payment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxDuration {
    Lifetime,
    /// Calendar months.
    Months(u32),
    Fixed(TimeDelta),
}

impl MaxDuration {
    /// The first instant at which payments no longer earn (`None`: never).
    pub fn end(self, start: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            MaxDuration::Lifetime => None,
            MaxDuration::Months(n) => start.checked_add_months(chrono::Months::new(n)),
            MaxDuration::Fixed(d) => Some(start + d),
        }
    }
}

/// `[programs.subscriptions]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Subscriptions {
    pub max_duration: MaxDuration,
    pub renewal_rate: Option<Rate>,
}

/// The kind of a payment, for reward conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PaymentKind {
    /// The subscription's first payment (the capture that started it).
    First,
    Renewal,
    Upgrade,
    Downgrade,
}

impl PaymentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentKind::First => "first",
            PaymentKind::Renewal => "renewal",
            PaymentKind::Upgrade => "upgrade",
            PaymentKind::Downgrade => "downgrade",
        }
    }

    pub fn parse(s: &str) -> Option<PaymentKind> {
        Some(match s {
            "first" => PaymentKind::First,
            "renewal" => PaymentKind::Renewal,
            "upgrade" => PaymentKind::Upgrade,
            "downgrade" => PaymentKind::Downgrade,
            _ => return None,
        })
    }
}

/// A reward rule: every condition set must hold; then the rule's rate (of
/// the matching items, or of the whole basis) or its flat amount (once per
/// order) is the tier-0 commission.
#[derive(Clone, Debug, PartialEq)]
pub struct Reward {
    pub name: String,
    /// `Some(true)`: new customers only; `Some(false)`: returning only.
    pub new_customer: Option<bool>,
    pub payment: Option<PaymentKind>,
    pub plan: Option<String>,
    pub category: Option<String>,
    pub product: Option<String>,
    pub pay: RewardPay,
}

impl Reward {
    /// Whether the rule looks at items (category or product).
    pub fn per_item(&self) -> bool {
        self.category.is_some() || self.product.is_some()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RewardPay {
    Rate(Rate),
    Flat(rust_decimal::Decimal),
}

/// `[programs.basis]`: parts of the captured amount left out of the basis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Basis {
    pub exclude_tax: bool,
    pub exclude_shipping: bool,
    pub exclude_discount: bool,
}

/// An endpoint configured in the rules file (`[[webhooks]]`).
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub id: String,
    pub program_id: String,
    pub partner_id: Option<String>,
    pub url: String,
    pub events: Vec<String>,
    pub secret: Secret,
}

/// The event types a webhook endpoint can ask for.
pub const WEBHOOK_EVENT_TYPES: [&str; 12] = [
    "order.attributed",
    "commission.created",
    "commission.reversed",
    "commission.approved",
    "lead.created",
    "lead.stage_changed",
    "flag.raised",
    "payout.sent",
    "payout.paid",
    "payout.failed",
    "partner.applied",
    "partner.approved",
];

/// The types a partner's endpoint may not receive (fraud flags are for the brand).
pub const WEBHOOK_BRAND_ONLY: [&str; 2] = ["flag.raised", "partner.applied"];

/// What a marketplace listing shows (beyond the program's own settings:
/// currency, rates, window and hold come from the program).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub name: String,
    pub description: String,
    pub terms: String,
    pub category: String,
}

/// `[programs.marketplace]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marketplace {
    /// The listing the program starts with (seed data); `None`: not listed
    /// until a `program_published` event.
    pub listing: Option<Listing>,
    /// Applications are approved as they arrive.
    pub auto_approve: bool,
    /// Placeholders `{program}`, `{partner}` (as is) and `{PARTNER}` (upper
    /// case, letters and digits only).
    pub link_pattern: String,
    pub code_pattern: String,
    pub destination: Option<String>,
    pub code_max_uses: Option<u64>,
    pub code_valid_for: Option<TimeDelta>,
}

impl Default for Marketplace {
    fn default() -> Self {
        Marketplace {
            listing: None,
            auto_approve: false,
            link_pattern: "{program}-{partner}".into(),
            code_pattern: "{PARTNER}".into(),
            destination: None,
            code_max_uses: None,
            code_valid_for: None,
        }
    }
}

impl Marketplace {
    /// The pattern with its placeholders filled in.
    pub fn expand(pattern: &str, program: &str, partner: &str) -> String {
        let upper: String = partner.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_uppercase();
        pattern.replace("{program}", program).replace("{partner}", partner).replace("{PARTNER}", &upper)
    }
}

/// RazorpayX (India: bank and UPI transfers in INR).
#[derive(Clone, Debug, PartialEq)]
pub struct RazorpayxSettings {
    pub base_url: String,
    pub key_id_env: String,
    pub key_secret_env: String,
    pub webhook_secret_env: Option<String>,
    pub account_number: String,
    /// TDS withheld from each payout.
    pub tds: Rate,
    /// "IMPS", "NEFT" or "RTGS" for bank accounts.
    pub bank_mode: String,
}

/// PayPal Payouts (international partners).
#[derive(Clone, Debug, PartialEq)]
pub struct PaypalSettings {
    pub base_url: String,
    pub client_id_env: String,
    pub client_secret_env: String,
    /// The webhook subscription's id, for verify-webhook-signature.
    pub webhook_id: Option<String>,
}

/// The payout providers configured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PayoutSettings {
    pub razorpayx: Option<RazorpayxSettings>,
    pub paypal: Option<PaypalSettings>,
}

/// What a fraud rule does when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FraudAction {
    Off,
    /// Record a flag; the lines follow their normal lifecycle.
    Flag,
    /// Record a flag and hold every line of the order until a review.
    Hold,
}

impl FraudAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FraudAction::Off => "off",
            FraudAction::Flag => "flag",
            FraudAction::Hold => "hold",
        }
    }
}

/// A program's fraud detectors.
#[derive(Clone, Debug, PartialEq)]
pub struct FraudSettings {
    pub self_referral: FraudAction,
    pub coupon_stacking: FraudAction,
    /// More than `velocity_max_orders` orders from one customer id, e-mail
    /// hash or IP within `velocity_window`.
    pub velocity: FraudAction,
    pub velocity_max_orders: u32,
    pub velocity_window: TimeDelta,
    /// A capture less than `fast_conversion_min` after its winning click.
    pub fast_conversion: FraudAction,
    pub fast_conversion_min: TimeDelta,
    /// A code whose last `coupon_leak_min_orders` redemptions are more than
    /// `coupon_leak_max_share` without a click from its partner's links and
    /// whose redemptions with no click run above their learned share of the
    /// program's orders (evidence `coupon_leak_threshold` for a rise of
    /// `coupon_leak_ratio`, in conversion_spike's buckets).
    pub coupon_leak: FraudAction,
    pub coupon_leak_min_orders: u32,
    pub coupon_leak_max_share: f64,
    pub coupon_leak_threshold: f64,
    pub coupon_leak_ratio: f64,
    /// A partner with at least `refund_rate_min_orders` orders in the window
    /// whose refunds per order exceed `refund_rate_ratio` times the program's
    /// and stand `refund_rate_threshold` standard deviations above them, or
    /// whose refunded share of captured money exceeds `refund_rate_max_share`.
    pub refund_rate: FraudAction,
    pub refund_rate_min_orders: u32,
    pub refund_rate_max_share: f64,
    pub refund_rate_ratio: f64,
    pub refund_rate_threshold: f64,
    /// The sliding window refunds and captures are compared over.
    pub refund_rate_window: TimeDelta,
    /// A partner's attributed orders running above its learned share of the
    /// program's orders: a Poisson CUSUM per `conversion_spike_bucket` for a
    /// rise of `conversion_spike_ratio`, flagging at evidence
    /// `conversion_spike_threshold` with at least `conversion_spike_min_orders`
    /// orders in the run, once the baseline (remembering
    /// `conversion_spike_memory` buckets) has seen `conversion_spike_warmup`.
    pub conversion_spike: FraudAction,
    pub conversion_spike_bucket: TimeDelta,
    pub conversion_spike_min_orders: u32,
    pub conversion_spike_threshold: f64,
    pub conversion_spike_ratio: f64,
    pub conversion_spike_warmup: u32,
    pub conversion_spike_memory: u32,
}

impl Default for FraudSettings {
    fn default() -> Self {
        // The two deterministic rules hold by default (docs/CONTRACT.md §7); the
        // statistical ones are enabled per program once tuned.
        FraudSettings {
            self_referral: FraudAction::Hold,
            coupon_stacking: FraudAction::Hold,
            velocity: FraudAction::Off,
            velocity_max_orders: 5,
            velocity_window: TimeDelta::hours(1),
            fast_conversion: FraudAction::Off,
            fast_conversion_min: TimeDelta::seconds(12),
            coupon_leak: FraudAction::Off,
            coupon_leak_min_orders: 20,
            coupon_leak_max_share: 0.8,
            coupon_leak_threshold: 8.0,
            coupon_leak_ratio: 3.0,
            refund_rate: FraudAction::Off,
            refund_rate_min_orders: 20,
            refund_rate_max_share: 0.5,
            refund_rate_ratio: 3.0,
            refund_rate_threshold: 6.0,
            refund_rate_window: TimeDelta::days(7),
            conversion_spike: FraudAction::Off,
            conversion_spike_bucket: TimeDelta::hours(1),
            conversion_spike_min_orders: 5,
            conversion_spike_threshold: 10.0,
            conversion_spike_ratio: 3.0,
            conversion_spike_warmup: 24,
            conversion_spike_memory: 168,
        }
    }
}

fn compile_fraud(cx: &mut Ctx<'_>, i: usize, raw: Option<&S<crate::raw::RawFraud>>) -> FraudSettings {
    let mut s = FraudSettings::default();
    let Some(raw) = raw else { return s };
    let raw = raw.get_ref();
    let action = |cx: &mut Ctx<'_>, rule: &Option<S<crate::raw::RawRule>>, name: &str, default: FraudAction| {
        let Some(a) = rule.as_ref().and_then(|r| r.get_ref().action.as_ref()) else { return default };
        match a.get_ref().as_str() {
            "off" => FraudAction::Off,
            "flag" => FraudAction::Flag,
            "hold" => FraudAction::Hold,
            other => {
                cx.err(
                    a.span(),
                    format!("programs[{i}].fraud.{name}.action"),
                    format!("{other:?} is not \"off\", \"flag\" or \"hold\""),
                );
                default
            }
        }
    };
    s.self_referral = action(cx, &raw.self_referral, "self_referral", s.self_referral);
    s.coupon_stacking = action(cx, &raw.coupon_stacking, "coupon_stacking", s.coupon_stacking);
    s.velocity = action(cx, &raw.velocity, "velocity", s.velocity);
    s.fast_conversion = action(cx, &raw.fast_conversion, "fast_conversion", s.fast_conversion);
    s.coupon_leak = action(cx, &raw.coupon_leak, "coupon_leak", s.coupon_leak);
    s.refund_rate = action(cx, &raw.refund_rate, "refund_rate", s.refund_rate);
    s.conversion_spike = action(cx, &raw.conversion_spike, "conversion_spike", s.conversion_spike);
    let share_rule =
        |cx: &mut Ctx<'_>, rule: &Option<S<crate::raw::RawRule>>, name: &str, orders: &mut u32, share: &mut f64| {
            let Some(r) = rule.as_ref().map(|r| r.get_ref()) else { return };
            if let Some(m) = &r.min_orders {
                match u32::try_from(*m.get_ref()) {
                    Ok(n) if n >= 1 => *orders = n,
                    _ => cx.err(
                        m.span(),
                        format!("programs[{i}].fraud.{name}.min_orders"),
                        format!("{} must be at least 1", m.get_ref()),
                    ),
                }
            }
            if let Some(v) = &r.max_share {
                if (0.0..1.0).contains(v.get_ref()) {
                    *share = *v.get_ref();
                } else {
                    cx.err(
                        v.span(),
                        format!("programs[{i}].fraud.{name}.max_share"),
                        format!("{} must lie in [0, 1)", v.get_ref()),
                    );
                }
            }
        };
    share_rule(cx, &raw.coupon_leak, "coupon_leak", &mut s.coupon_leak_min_orders, &mut s.coupon_leak_max_share);
    share_rule(cx, &raw.refund_rate, "refund_rate", &mut s.refund_rate_min_orders, &mut s.refund_rate_max_share);
    let evidence = |cx: &mut Ctx<'_>, rule: &Option<S<crate::raw::RawRule>>, name: &str, t: &mut f64, r: &mut f64| {
        let Some(raw) = rule.as_ref().map(|r| r.get_ref()) else { return };
        if let Some(v) = &raw.threshold {
            if v.get_ref().is_finite() && *v.get_ref() > 0.0 {
                *t = *v.get_ref();
            } else {
                cx.err(
                    v.span(),
                    format!("programs[{i}].fraud.{name}.threshold"),
                    format!("{} must be a positive number", v.get_ref()),
                );
            }
        }
        if let Some(v) = &raw.ratio {
            if v.get_ref().is_finite() && *v.get_ref() > 1.0 && *v.get_ref() <= 100.0 {
                *r = *v.get_ref();
            } else {
                cx.err(
                    v.span(),
                    format!("programs[{i}].fraud.{name}.ratio"),
                    format!("{} must lie in (1, 100]", v.get_ref()),
                );
            }
        }
    };
    evidence(cx, &raw.coupon_leak, "coupon_leak", &mut s.coupon_leak_threshold, &mut s.coupon_leak_ratio);
    evidence(cx, &raw.refund_rate, "refund_rate", &mut s.refund_rate_threshold, &mut s.refund_rate_ratio);
    evidence(
        cx,
        &raw.conversion_spike,
        "conversion_spike",
        &mut s.conversion_spike_threshold,
        &mut s.conversion_spike_ratio,
    );
    if let Some(r) = raw.refund_rate.as_ref().map(|v| v.get_ref()) {
        let field = format!("programs[{i}].fraud.refund_rate.window");
        s.refund_rate_window = cx.duration(r.window.as_ref(), s.refund_rate_window, &field);
        if s.refund_rate_window < TimeDelta::days(1) || s.refund_rate_window > TimeDelta::days(90) {
            let span = r.window.as_ref().map(|w| w.span()).unwrap_or(0..0);
            cx.err(span, field, "must lie between 1d and 90d".to_string());
        }
    }
    if let Some(v) = raw.velocity.as_ref().map(|v| v.get_ref()) {
        if let Some(m) = &v.max_orders {
            match u32::try_from(*m.get_ref()) {
                Ok(n) if n >= 1 => s.velocity_max_orders = n,
                _ => cx.err(
                    m.span(),
                    format!("programs[{i}].fraud.velocity.max_orders"),
                    format!("{} must be at least 1", m.get_ref()),
                ),
            }
        }
        s.velocity_window =
            cx.duration(v.window.as_ref(), s.velocity_window, &format!("programs[{i}].fraud.velocity.window"));
    }
    if let Some(c) = raw.conversion_spike.as_ref().map(|v| v.get_ref()) {
        let field = |name: &str| format!("programs[{i}].fraud.conversion_spike.{name}");
        s.conversion_spike_bucket = cx.duration(c.bucket.as_ref(), s.conversion_spike_bucket, &field("bucket"));
        if s.conversion_spike_bucket < TimeDelta::minutes(1) || s.conversion_spike_bucket > TimeDelta::days(1) {
            let span = c.bucket.as_ref().map(|b| b.span()).unwrap_or(0..0);
            cx.err(span, field("bucket"), "must lie between 1m and 1d".to_string());
        }
        if let Some(m) = &c.min_orders {
            match u32::try_from(*m.get_ref()) {
                Ok(n) if n >= 1 => s.conversion_spike_min_orders = n,
                _ => cx.err(m.span(), field("min_orders"), format!("{} must be at least 1", m.get_ref())),
            }
        }
        if let Some(w) = &c.warmup_buckets {
            match u32::try_from(*w.get_ref()) {
                Ok(n) if (1..=10_000).contains(&n) => s.conversion_spike_warmup = n,
                _ => cx.err(w.span(), field("warmup_buckets"), format!("{} must lie between 1 and 10000", w.get_ref())),
            }
        }
        if let Some(m) = &c.baseline_buckets {
            match u32::try_from(*m.get_ref()) {
                Ok(n) if (2..=10_000).contains(&n) => s.conversion_spike_memory = n,
                _ => {
                    cx.err(m.span(), field("baseline_buckets"), format!("{} must lie between 2 and 10000", m.get_ref()))
                }
            }
        }
    }
    if let Some(f) = raw.fast_conversion.as_ref().map(|v| v.get_ref()) {
        if let Some(m) = &f.min_seconds {
            if (1..=86_400).contains(m.get_ref()) {
                s.fast_conversion_min = TimeDelta::seconds(*m.get_ref());
            } else {
                cx.err(
                    m.span(),
                    format!("programs[{i}].fraud.fast_conversion.min_seconds"),
                    format!("{} must lie between 1 and 86400", m.get_ref()),
                );
            }
        }
    }
    s
}

/// Where a partner's money goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayoutProvider {
    Paypal,
    Razorpayx,
}

/// A partner's payout destination. Never logged in full.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payout {
    pub provider: PayoutProvider,
    pub email: Option<String>,
    pub vpa: Option<String>,
    pub account_number: Option<String>,
    pub ifsc: Option<String>,
    pub name: Option<String>,
}

/// A creator, affiliate or agency in one program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Partner {
    pub id: String,
    pub program_id: String,
    pub parent: Option<String>,
    pub rate: Option<Rate>,
    pub category_rates: HashMap<String, Rate>,
    /// Lower-case hex SHA-256 of the partner's own e-mail addresses.
    pub email_sha256: HashSet<String>,
    pub customer_ids: HashSet<String>,
    pub payout: Option<Payout>,
    /// The partner's flat reward per accepted lead (beats the program's).
    #[serde(default)]
    pub lead_reward: Option<rust_decimal::Decimal>,
}

/// A tracking link (`/r/{id}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub id: String,
    pub partner_id: String,
    pub program_id: String,
    pub destination: Option<String>,
}

/// A partner's promo code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Code {
    /// As configured.
    pub code: String,
    /// Trimmed and upper-cased: the matching key.
    pub normalized: String,
    pub partner_id: String,
    pub starts_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub max_uses: Option<u64>,
}

/// A secret (an API key): never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// What a key may send. Every key has exactly one role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRole {
    /// Checkout events: clicks, captures, refunds, chargebacks.
    Ingest,
    /// Reviewer decisions (`review` events) only.
    Review,
    /// Payout state changes (`payout` events) and the payouts API only.
    Finance,
    /// The program's registry: listing, applications, links and codes
    /// (registry events, the marketplace API and the brand console).
    Brand,
}

impl KeyRole {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRole::Ingest => "ingest",
            KeyRole::Review => "review",
            KeyRole::Finance => "finance",
            KeyRole::Brand => "brand",
        }
    }
}

/// An API key and the program it may send events for.
#[derive(Clone, Debug)]
pub struct ApiKey {
    pub program_id: String,
    pub key: Secret,
    pub role: KeyRole,
}

/// Validated, immutable rules. Cheap to share (`Arc`), replaced as a whole.
#[derive(Clone, Debug)]
pub struct Rules {
    version: u64,
    engine: EngineSettings,
    programs: HashMap<String, Arc<Program>>,
    partners: HashMap<String, Partner>,
    links: HashMap<String, Link>,
    api_keys: Vec<ApiKey>,
    payouts: PayoutSettings,
    webhooks: Vec<WebhookConfig>,
    file: String,
    raw: RawConfig,
}

impl Rules {
    /// Reads and compiles a rules file.
    pub fn load(path: &std::path::Path) -> Result<Rules, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Rules::parse(&path.display().to_string(), &text)
    }

    /// Compiles rules from TOML text; `file` names the source in messages.
    pub fn parse(file: &str, text: &str) -> Result<Rules, ConfigError> {
        let raw = parse_raw(file, text)?;
        compile(file, text, raw, 1)
    }

    /// Builds the next version of these rules with `snippet` (TOML in the same
    /// format, e.g. one `[[partners]]` and its `[[links]]`) merged in: entries
    /// with an existing id (program id, partner id, link id, program + code)
    /// replace it, others are added. Nothing is changed when the result is
    /// invalid. Commissions already accrued are never recomputed.
    pub fn with_update(&self, snippet: &str) -> Result<Rules, ConfigError> {
        let file = "update";
        let add = parse_raw(file, snippet)?;
        let mut merged = self.raw.clone();
        if add.engine.is_some() {
            merged.engine = add.engine;
        }
        if add.payouts.is_some() {
            merged.payouts = add.payouts;
        }
        merge(&mut merged.programs, add.programs, |p| p.get_ref().id.get_ref().clone());
        merge(&mut merged.partners, add.partners, |p| p.get_ref().id.get_ref().clone());
        merge(&mut merged.links, add.links, |l| l.get_ref().id.get_ref().clone());
        merged.api_keys.extend(add.api_keys);
        merge(&mut merged.webhooks, add.webhooks, |w| w.get_ref().id.get_ref().clone());
        merge(&mut merged.codes, add.codes, |c| {
            let c = c.get_ref();
            format!("{}\u{0}{}", c.partner_id.get_ref(), crate::normalize_code(c.code.get_ref()))
        });
        // Positions in the merged config come from two texts; report problems
        // without line numbers rather than with wrong ones.
        compile(file, "", merged, self.version + 1)
    }

    /// The same rules with another version number (a reloaded file continues
    /// the numbering of the rules it replaces).
    pub fn with_version(mut self, version: u64) -> Rules {
        self.version = version;
        self
    }

    /// Increases with every change; ledger entries record the version they were computed with.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn engine(&self) -> &EngineSettings {
        &self.engine
    }

    /// The payout providers (credentials are named, not held).
    pub fn payouts(&self) -> &PayoutSettings {
        &self.payouts
    }

    pub fn program(&self, id: &str) -> Option<&Arc<Program>> {
        self.programs.get(id)
    }

    pub fn programs(&self) -> impl Iterator<Item = &Arc<Program>> {
        self.programs.values()
    }

    pub fn partner(&self, id: &str) -> Option<&Partner> {
        self.partners.get(id)
    }

    pub fn partners(&self) -> impl Iterator<Item = &Partner> {
        self.partners.values()
    }

    pub fn link(&self, id: &str) -> Option<&Link> {
        self.links.get(id)
    }

    pub fn links(&self) -> impl Iterator<Item = &Link> {
        self.links.values()
    }

    /// The partner's parent, grandparent, ... (at most `limit` of them).
    pub fn ancestors<'a>(&'a self, partner_id: &str, limit: usize) -> impl Iterator<Item = &'a Partner> + 'a {
        let mut next = self.partners.get(partner_id).and_then(|p| p.parent.as_deref());
        let mut left = limit;
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            let p = self.partners.get(next?)?;
            next = p.parent.as_deref();
            Some(p)
        })
    }

    /// The longest attribution window of any program (clicks older than the
    /// watermark minus this can never win again).
    pub fn max_window(&self) -> TimeDelta {
        self.programs.values().map(|p| p.window).max().unwrap_or_else(TimeDelta::zero)
    }

    /// Ingest API keys (secrets: compare in constant time, never log).
    pub fn api_keys(&self) -> &[ApiKey] {
        &self.api_keys
    }

    /// Webhook endpoints configured in the file (`[[webhooks]]`).
    pub fn webhooks(&self) -> &[WebhookConfig] {
        &self.webhooks
    }

    /// The file the rules were read from.
    pub fn file(&self) -> &str {
        &self.file
    }
}

fn merge<T>(into: &mut Vec<S<T>>, add: Vec<S<T>>, key: impl Fn(&S<T>) -> String) {
    for item in add {
        let k = key(&item);
        match into.iter_mut().find(|e| key(e) == k) {
            Some(slot) => *slot = item,
            None => into.push(item),
        }
    }
}

fn parse_raw(file: &str, text: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str::<RawConfig>(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
        ConfigError::Invalid {
            file: file.to_string(),
            problems: vec![Problem {
                line,
                column,
                field: field_of_toml_error(text, e.span()),
                message: e.message().trim().to_string(),
            }],
        }
    })
}

/// The key at the start of the offending line, if any (best effort).
fn field_of_toml_error(text: &str, span: Option<Range<usize>>) -> String {
    let Some(span) = span else { return "(file)".into() };
    let start = text[..span.start.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    match line.split_once('=') {
        Some((k, _)) => k.trim().to_string(),
        None => line.trim().to_string(),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    if text.is_empty() {
        return (0, 0);
    }
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |i| before.len() - i - 1) + 1;
    (line, column)
}

struct Ctx<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Ctx<'_> {
    fn err(&mut self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.problems.push(Problem { line, column, field: field.into(), message: message.into() });
    }

    fn rate(&mut self, v: &S<String>, field: impl Into<String>) -> Option<Rate> {
        v.get_ref().parse::<Rate>().map_err(|m| self.err(v.span(), field, m)).ok()
    }

    /// A non-negative decimal amount (a reward), at most 4 decimal places.
    fn amount(&mut self, v: &S<String>, field: impl Into<String>) -> rust_decimal::Decimal {
        match rust_decimal::Decimal::from_str_exact(v.get_ref().trim()) {
            Ok(d) if !d.is_sign_negative() && d.scale() <= 4 && d < rust_decimal::Decimal::from(1_000_000_000i64) => d,
            _ => {
                self.err(
                    v.span(),
                    field,
                    format!("{:?} is not a non-negative decimal amount (at most 4 decimals, under 1e9)", v.get_ref()),
                );
                rust_decimal::Decimal::ZERO
            }
        }
    }

    fn duration(&mut self, v: Option<&S<String>>, default: TimeDelta, field: &str) -> TimeDelta {
        match v {
            None => default,
            Some(v) => parse_duration(v.get_ref()).unwrap_or_else(|m| {
                self.err(v.span(), field, m);
                default
            }),
        }
    }

    fn id(&mut self, v: &S<String>, field: String) -> String {
        let s = v.get_ref();
        if s.trim().is_empty() || s.len() > 128 || s.trim() != s {
            self.err(v.span(), field, format!("id {s:?} must be 1 to 128 bytes without surrounding spaces"));
        }
        s.clone()
    }

    fn category_rates(&mut self, m: &BTreeMap<String, S<String>>, field: &str) -> HashMap<String, Rate> {
        m.iter().filter_map(|(cat, r)| Some((cat.clone(), self.rate(r, format!("{field}.{cat}"))?))).collect()
    }

    fn time(&mut self, v: Option<&S<String>>, field: String) -> Option<DateTime<Utc>> {
        let v = v?;
        match DateTime::parse_from_rfc3339(v.get_ref()) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(e) => {
                self.err(v.span(), field, format!("{:?} is not an RFC 3339 time with offset: {e}", v.get_ref()));
                None
            }
        }
    }
}

fn compile(file: &str, text: &str, raw: RawConfig, version: u64) -> Result<Rules, ConfigError> {
    let mut cx = Ctx { text, problems: Vec::new() };
    let engine = compile_engine(&mut cx, &raw);

    let mut programs: HashMap<String, Program> = HashMap::new();
    for (i, p) in raw.programs.iter().enumerate() {
        if let Some(prog) = compile_program(&mut cx, i, p) {
            if programs.contains_key(&prog.id) {
                cx.err(
                    p.get_ref().id.span(),
                    format!("programs[{i}].id"),
                    format!("duplicate program id {:?}", prog.id),
                );
            } else {
                programs.insert(prog.id.clone(), prog);
            }
        }
    }

    let mut partners: HashMap<String, Partner> = HashMap::new();
    for (i, p) in raw.partners.iter().enumerate() {
        let f = |name: &str| format!("partners[{i}].{name}");
        let rp: &RawPartner = p.get_ref();
        let id = cx.id(&rp.id, f("id"));
        let program_id = rp.program_id.get_ref().clone();
        if !programs.contains_key(&program_id) {
            cx.err(rp.program_id.span(), f("program_id"), format!("unknown program {program_id:?}"));
        }
        let rate = rp.rate.as_ref().and_then(|r| cx.rate(r, f("rate")));
        let category_rates = cx.category_rates(&rp.category_rates, &f("category_rates"));
        let mut email_sha256 = HashSet::new();
        for (j, e) in rp.email_sha256.iter().enumerate() {
            let v = e.get_ref().trim().to_ascii_lowercase();
            if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                cx.err(
                    e.span(),
                    format!("partners[{i}].email_sha256[{j}]"),
                    format!("{:?} is not a hex SHA-256 (64 hex digits)", e.get_ref()),
                );
            }
            email_sha256.insert(v);
        }
        let customer_ids = rp.customer_ids.iter().map(|c| c.get_ref().clone()).collect();
        let lead_reward = rp.lead_reward.as_ref().map(|m| cx.amount(m, f("lead_reward")));
        let payout = rp.payout.as_ref().and_then(|po| compile_payout(&mut cx, po, &f("payout")));
        if partners.contains_key(&id) {
            cx.err(rp.id.span(), f("id"), format!("duplicate partner id {id:?}"));
            continue;
        }
        let parent = rp.parent.as_ref().map(|s| s.get_ref().clone());
        partners.insert(
            id.clone(),
            Partner { id, program_id, parent, rate, category_rates, email_sha256, customer_ids, payout, lead_reward },
        );
    }
    // Parents: known, in the same program, no cycles.
    for (i, p) in raw.partners.iter().enumerate() {
        let rp = p.get_ref();
        let Some(parent) = &rp.parent else { continue };
        let field = format!("partners[{i}].parent");
        match partners.get(parent.get_ref()) {
            None => cx.err(parent.span(), field, format!("unknown partner {:?}", parent.get_ref())),
            Some(pp) if pp.program_id != *rp.program_id.get_ref() => cx.err(
                parent.span(),
                field,
                format!("parent {:?} belongs to program {:?}, not {:?}", pp.id, pp.program_id, rp.program_id.get_ref()),
            ),
            Some(_) => {
                let mut seen: HashSet<&str> = [rp.id.get_ref().as_str()].into_iter().collect();
                let mut cur = Some(parent.get_ref().as_str());
                while let Some(c) = cur {
                    if !seen.insert(c) {
                        cx.err(
                            parent.span(),
                            field.clone(),
                            format!("parent chain of {:?} has a cycle through {c:?}", rp.id.get_ref()),
                        );
                        break;
                    }
                    cur = partners.get(c).and_then(|x| x.parent.as_deref());
                }
            }
        }
    }

    let mut links: HashMap<String, Link> = HashMap::new();
    for (i, l) in raw.links.iter().enumerate() {
        let rl: &RawLink = l.get_ref();
        let id = cx.id(&rl.id, format!("links[{i}].id"));
        if id.contains('/') || id.contains('?') || id.contains('#') {
            cx.err(rl.id.span(), format!("links[{i}].id"), format!("link id {id:?} must not contain '/', '?' or '#'"));
        }
        let Some(partner) = partners.get(rl.partner_id.get_ref()) else {
            cx.err(
                rl.partner_id.span(),
                format!("links[{i}].partner_id"),
                format!("unknown partner {:?}", rl.partner_id.get_ref()),
            );
            continue;
        };
        if let Some(d) = &rl.destination {
            let s = d.get_ref();
            if !(s.starts_with("https://") || s.starts_with("http://")) {
                cx.err(d.span(), format!("links[{i}].destination"), format!("{s:?} must be an http(s) URL"));
            }
        }
        if links.contains_key(&id) {
            cx.err(rl.id.span(), format!("links[{i}].id"), format!("duplicate link id {id:?}"));
            continue;
        }
        links.insert(
            id.clone(),
            Link {
                id,
                partner_id: partner.id.clone(),
                program_id: partner.program_id.clone(),
                destination: rl.destination.as_ref().map(|d| d.get_ref().clone()),
            },
        );
    }

    for (i, c) in raw.codes.iter().enumerate() {
        let rc: &RawCode = c.get_ref();
        let f = |name: &str| format!("codes[{i}].{name}");
        let normalized = crate::normalize_code(rc.code.get_ref());
        if normalized.is_empty() || normalized.len() > 64 {
            cx.err(rc.code.span(), f("code"), format!("code {:?} must be 1 to 64 characters", rc.code.get_ref()));
        }
        let starts_at = cx.time(rc.starts_at.as_ref(), f("starts_at"));
        let expires_at = cx.time(rc.expires_at.as_ref(), f("expires_at"));
        if let (Some(s), Some(e), Some(span)) = (starts_at, expires_at, rc.expires_at.as_ref().map(|e| e.span())) {
            if e <= s {
                cx.err(span, f("expires_at"), format!("expires_at {e} is not after starts_at {s}"));
            }
        }
        let max_uses = match &rc.max_uses {
            None => None,
            Some(m) if *m.get_ref() >= 1 => Some(*m.get_ref() as u64),
            Some(m) => {
                cx.err(m.span(), f("max_uses"), format!("max_uses {} must be at least 1", m.get_ref()));
                None
            }
        };
        let Some(partner) = partners.get(rc.partner_id.get_ref()) else {
            cx.err(rc.partner_id.span(), f("partner_id"), format!("unknown partner {:?}", rc.partner_id.get_ref()));
            continue;
        };
        let Some(program) = programs.get_mut(&partner.program_id) else { continue };
        if program.codes.contains_key(&normalized) {
            cx.err(
                rc.code.span(),
                f("code"),
                format!(
                    "duplicate code {:?} in program {:?} (codes match case-insensitively)",
                    rc.code.get_ref(),
                    program.id
                ),
            );
            continue;
        }
        program.codes.insert(
            normalized.clone(),
            Code {
                code: rc.code.get_ref().trim().to_string(),
                normalized,
                partner_id: partner.id.clone(),
                starts_at,
                expires_at,
                max_uses,
            },
        );
    }

    if let Some(e) = raw.engine.as_ref().and_then(|e| e.get_ref().order_retention.as_ref()) {
        for p in programs.values() {
            if engine.order_retention <= p.hold {
                cx.err(
                    e.span(),
                    "engine.order_retention",
                    format!(
                        "{:?} is not longer than program {:?}'s hold; its lines would close before they are eligible",
                        e.get_ref(),
                        p.id
                    ),
                );
            }
        }
    }

    let mut api_keys = Vec::new();
    for (i, k) in raw.api_keys.iter().enumerate() {
        let rk = k.get_ref();
        let f = |name: &str| format!("api_keys[{i}].{name}");
        if !programs.contains_key(rk.program_id.get_ref()) {
            cx.err(rk.program_id.span(), f("program_id"), format!("unknown program {:?}", rk.program_id.get_ref()));
        }
        let key = match (&rk.key, &rk.key_env) {
            (Some(key), None) => Some(key.get_ref().clone()),
            (None, Some(var)) => match std::env::var(var.get_ref()) {
                Ok(v) => Some(v),
                Err(_) => {
                    cx.err(var.span(), f("key_env"), format!("environment variable {:?} is not set", var.get_ref()));
                    None
                }
            },
            _ => {
                cx.err(k.span(), f("key"), "set exactly one of `key` and `key_env`");
                None
            }
        };
        if let Some(key) = key {
            if key.len() < 16 {
                // Never quote the key itself.
                cx.err(
                    k.span(),
                    f("key"),
                    format!("an API key needs at least 16 characters, this one has {}", key.len()),
                );
            }
            let role = match rk.role.as_ref().map(|r| r.get_ref().as_str()) {
                None | Some("ingest") => KeyRole::Ingest,
                Some("review") => KeyRole::Review,
                Some("finance") => KeyRole::Finance,
                Some("brand") => KeyRole::Brand,
                Some(other) => {
                    let span = rk.role.as_ref().map(|r| r.span()).unwrap_or(0..0);
                    cx.err(
                        span,
                        f("role"),
                        format!("{other:?} is not \"ingest\", \"review\", \"finance\" or \"brand\""),
                    );
                    KeyRole::Ingest
                }
            };
            // One key, one program and one role: a key given twice would be
            // ambiguous (never quote the key itself).
            if let Some(j) = api_keys.iter().position(|k: &ApiKey| k.key.expose() == key) {
                cx.err(k.span(), f("key"), format!("the same key as api_keys[{j}]: every key must be different"));
            }
            api_keys.push(ApiKey { program_id: rk.program_id.get_ref().clone(), key: Secret(key), role });
        }
    }

    let payouts = compile_payouts(&mut cx, &raw);
    let webhooks = compile_webhooks(&mut cx, &raw, &programs, &partners);
    if !cx.problems.is_empty() {
        cx.problems.sort_by_key(|p| (p.line, p.column));
        return Err(ConfigError::Invalid { file: file.to_string(), problems: cx.problems });
    }
    Ok(Rules {
        version,
        engine,
        programs: programs.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        partners,
        links,
        api_keys,
        payouts,
        webhooks,
        file: file.to_string(),
        raw,
    })
}

/// Checks an endpoint's URL and event types (shared with the HTTP API):
/// every problem, as (field, message).
pub fn webhook_problems(url: &str, events: &[String], partner_endpoint: bool) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if !(url.starts_with("https://") || url.starts_with("http://"))
        || url.len() > 2048
        || url.contains(char::is_whitespace)
    {
        out.push(("url".into(), format!("{url:?} is not an http(s) URL of at most 2048 bytes")));
    }
    if events.is_empty() {
        out.push(("events".into(), "name at least one event type".into()));
    }
    for (j, e) in events.iter().enumerate() {
        if !WEBHOOK_EVENT_TYPES.contains(&e.as_str()) {
            out.push((format!("events[{j}]"), format!("{e:?} is not one of {}", WEBHOOK_EVENT_TYPES.join(", "))));
        } else if partner_endpoint && WEBHOOK_BRAND_ONLY.contains(&e.as_str()) {
            out.push((format!("events[{j}]"), format!("{e:?} is for the brand's endpoints only")));
        }
    }
    out
}

fn compile_webhooks(
    cx: &mut Ctx<'_>,
    raw: &RawConfig,
    programs: &HashMap<String, Program>,
    partners: &HashMap<String, Partner>,
) -> Vec<WebhookConfig> {
    let mut out: Vec<WebhookConfig> = Vec::new();
    for (i, w) in raw.webhooks.iter().enumerate() {
        let span = w.span();
        let w = w.get_ref();
        let f = |name: &str| format!("webhooks[{i}].{name}");
        let id = cx.id(&w.id, f("id"));
        if out.iter().any(|o| o.id == id) {
            cx.err(w.id.span(), f("id"), format!("duplicate webhook id {id:?}"));
        }
        if !programs.contains_key(w.program_id.get_ref()) {
            cx.err(w.program_id.span(), f("program_id"), format!("unknown program {:?}", w.program_id.get_ref()));
        }
        if let Some(p) = &w.partner_id {
            match partners.get(p.get_ref()) {
                Some(pp) if pp.program_id == *w.program_id.get_ref() => {}
                _ => cx.err(
                    p.span(),
                    f("partner_id"),
                    format!("{:?} is no partner of program {:?}", p.get_ref(), w.program_id.get_ref()),
                ),
            }
        }
        let events: Vec<String> = w.events.iter().map(|e| e.get_ref().clone()).collect();
        for (field, message) in webhook_problems(w.url.get_ref(), &events, w.partner_id.is_some()) {
            cx.err(span.clone(), f(&field), message);
        }
        let secret = match std::env::var(w.secret_env.get_ref()) {
            Ok(v) if v.starts_with("whsec_") && v.len() >= 6 + 24 => Some(v),
            Ok(_) => {
                // Never quote the secret itself.
                cx.err(
                    w.secret_env.span(),
                    f("secret_env"),
                    format!(
                        "{:?} does not hold a `whsec_` secret (whsec_ and at least 24 base64 characters)",
                        w.secret_env.get_ref()
                    ),
                );
                None
            }
            Err(_) => {
                cx.err(
                    w.secret_env.span(),
                    f("secret_env"),
                    format!("environment variable {:?} is not set", w.secret_env.get_ref()),
                );
                None
            }
        };
        out.push(WebhookConfig {
            id,
            program_id: w.program_id.get_ref().clone(),
            partner_id: w.partner_id.as_ref().map(|p| p.get_ref().clone()),
            url: w.url.get_ref().clone(),
            events,
            secret: Secret(secret.unwrap_or_default()),
        });
    }
    out
}

fn compile_engine(cx: &mut Ctx<'_>, raw: &RawConfig) -> EngineSettings {
    let d = EngineSettings::default();
    let Some(e) = &raw.engine else { return d };
    let e = e.get_ref();
    let mut limit = |v: &Option<S<i64>>, default: usize, field: &str, max: i64| match v {
        None => default,
        Some(v) if (1..=max).contains(v.get_ref()) => *v.get_ref() as usize,
        Some(v) => {
            cx.err(v.span(), field, format!("{} must lie between 1 and {max}", v.get_ref()));
            default
        }
    };
    let max_clicks_per_visitor =
        limit(&e.max_clicks_per_visitor, d.max_clicks_per_visitor, "engine.max_clicks_per_visitor", 10_000);
    let max_tracked_visitors =
        limit(&e.max_tracked_visitors, d.max_tracked_visitors, "engine.max_tracked_visitors", 1_000_000_000);
    EngineSettings {
        dedupe_retention: cx.duration(e.dedupe_retention.as_ref(), d.dedupe_retention, "engine.dedupe_retention"),
        out_of_order: cx.duration(e.out_of_order.as_ref(), d.out_of_order, "engine.out_of_order"),
        max_clicks_per_visitor,
        max_tracked_visitors,
        max_future_skew: cx.duration(e.max_future_skew.as_ref(), d.max_future_skew, "engine.max_future_skew"),
        order_retention: {
            let r = cx.duration(e.order_retention.as_ref(), d.order_retention, "engine.order_retention");
            if r < TimeDelta::days(1) {
                if let Some(v) = &e.order_retention {
                    cx.err(
                        v.span(),
                        "engine.order_retention",
                        format!("{:?} is shorter than the 1d minimum", v.get_ref()),
                    );
                }
            }
            r
        },
    }
}

fn compile_program(cx: &mut Ctx<'_>, i: usize, p: &S<RawProgram>) -> Option<Program> {
    let rp = p.get_ref();
    let f = |name: &str| format!("programs[{i}].{name}");
    let id = cx.id(&rp.id, f("id"));
    let currency = Currency::from_code(rp.currency.get_ref());
    if currency.is_none() {
        cx.err(
            rp.currency.span(),
            f("currency"),
            format!("{:?} is not an ISO 4217 currency code (upper case, e.g. \"USD\")", rp.currency.get_ref()),
        );
    }
    let rate = cx.rate(&rp.rate, f("rate"));
    let overrides: Vec<Option<Rate>> =
        rp.overrides.iter().enumerate().map(|(j, r)| cx.rate(r, format!("programs[{i}].overrides[{j}]"))).collect();
    if overrides.len() > 8 {
        cx.err(p.span(), f("overrides"), format!("{} override tiers; at most 8 are supported", overrides.len()));
    }
    let hold = cx.duration(rp.hold.as_ref(), TimeDelta::days(30), &f("hold"));
    let category_rates = cx.category_rates(&rp.category_rates, &f("category_rates"));
    let attr = rp.attribution.as_ref().map(|a| a.get_ref().clone()).unwrap_or_default();
    let window = cx.duration(attr.window.as_ref(), TimeDelta::days(30), &f("attribution.window"));
    let model = match attr.model.as_ref() {
        None => AttributionModel::LastClick,
        Some(m) => match m.get_ref().as_str() {
            "last_click" => AttributionModel::LastClick,
            "first_click" => AttributionModel::FirstClick,
            other => {
                cx.err(m.span(), f("attribution.model"), format!("{other:?} is not \"last_click\" or \"first_click\""));
                AttributionModel::LastClick
            }
        },
    };
    Some(Program {
        id,
        currency: currency?,
        rate: rate?,
        overrides: overrides.into_iter().collect::<Option<Vec<_>>>()?,
        hold,
        auto_approve: rp.auto_approve,
        window,
        model,
        code_priority: attr.code_priority.unwrap_or(true),
        category_rates,
        codes: HashMap::new(),
        fraud: compile_fraud(cx, i, rp.fraud.as_ref()),
        min_payout: match &rp.min_payout {
            None => rust_decimal::Decimal::ZERO,
            Some(m) => match rust_decimal::Decimal::from_str_exact(m.get_ref().trim()) {
                Ok(d) if d >= rust_decimal::Decimal::ZERO => d,
                _ => {
                    cx.err(
                        m.span(),
                        format!("programs[{i}].min_payout"),
                        format!("{:?} is not a non-negative decimal amount", m.get_ref()),
                    );
                    rust_decimal::Decimal::ZERO
                }
            },
        },
        marketplace: compile_marketplace(cx, i, rp.marketplace.as_ref()),
        leads: rp.leads.as_ref().map(|l| compile_leads(cx, i, l, hold)),
        subscriptions: rp.subscriptions.as_ref().map(|s| compile_subscriptions(cx, i, s)),
        rewards: rp.rewards.iter().enumerate().map(|(j, r)| compile_reward(cx, i, j, r)).collect(),
        basis: compile_basis(cx, i, rp.basis.as_ref()),
    })
}

fn compile_leads(cx: &mut Ctx<'_>, i: usize, l: &S<crate::raw::RawLeads>, program_hold: TimeDelta) -> Leads {
    let l = l.get_ref();
    let f = |name: &str| format!("programs[{i}].leads.{name}");
    let reward = cx.amount(&l.reward, f("reward"));
    let kinds = l.kinds.iter().map(|(k, v)| (k.clone(), cx.amount(v, f(&format!("kinds.{k}"))))).collect();
    let hold = cx.duration(l.hold.as_ref(), program_hold, &f("hold"));
    let mut stages: Vec<Stage> = Vec::new();
    for (j, st) in l.stages.iter().enumerate() {
        let sf = |name: &str| format!("programs[{i}].leads.stages[{j}].{name}");
        let r = st.get_ref();
        let name = r.name.get_ref().trim().to_string();
        if name.is_empty() || name.len() > 64 {
            cx.err(r.name.span(), sf("name"), format!("stage name {:?} must be 1 to 64 bytes", r.name.get_ref()));
        } else if stages.iter().any(|s| s.name == name) {
            cx.err(r.name.span(), sf("name"), format!("duplicate stage {name:?}"));
        }
        let reward = r.reward.as_ref().map_or(rust_decimal::Decimal::ZERO, |v| cx.amount(v, sf("reward")));
        if r.disqualify && !reward.is_zero() {
            cx.err(st.span(), sf("reward"), format!("a disqualifying stage reverses rewards; it cannot pay {reward}"));
        }
        stages.push(Stage { name, reward, disqualify: r.disqualify });
    }
    if stages.len() > 32 {
        cx.err(0..0, f("stages"), format!("{} stages; at most 32", stages.len()));
    }
    Leads { reward, kinds, hold, stages }
}

fn compile_subscriptions(cx: &mut Ctx<'_>, i: usize, s: &S<crate::raw::RawSubscriptions>) -> Subscriptions {
    let s = s.get_ref();
    let f = |name: &str| format!("programs[{i}].subscriptions.{name}");
    let raw = s.max_duration.get_ref().trim();
    let max_duration = if raw == "lifetime" {
        MaxDuration::Lifetime
    } else if let Some(n) = raw.strip_suffix("mo") {
        match n.parse::<u32>() {
            Ok(n) if (1..=120).contains(&n) => MaxDuration::Months(n),
            _ => {
                cx.err(
                    s.max_duration.span(),
                    f("max_duration"),
                    format!("{raw:?}: months must be 1 to 120, e.g. \"12mo\""),
                );
                MaxDuration::Lifetime
            }
        }
    } else {
        match parse_duration(raw) {
            Ok(d) => MaxDuration::Fixed(d),
            Err(m) => {
                cx.err(s.max_duration.span(), f("max_duration"), format!("{m}; or months (\"12mo\"), or \"lifetime\""));
                MaxDuration::Lifetime
            }
        }
    };
    let renewal_rate = s.renewal_rate.as_ref().and_then(|r| cx.rate(r, f("renewal_rate")));
    Subscriptions { max_duration, renewal_rate }
}

fn compile_reward(cx: &mut Ctx<'_>, i: usize, j: usize, r: &S<crate::raw::RawReward>) -> Reward {
    let span = r.span();
    let r = r.get_ref();
    let f = |name: &str| format!("programs[{i}].rewards[{j}].{name}");
    let text = |v: &Option<S<String>>| v.as_ref().map(|s| s.get_ref().trim().to_string());
    let new_customer = r.customer.as_ref().and_then(|c| match c.get_ref().as_str() {
        "new" => Some(true),
        "returning" => Some(false),
        other => {
            cx.err(c.span(), f("customer"), format!("{other:?} is not \"new\" or \"returning\""));
            None
        }
    });
    let payment = r.payment.as_ref().and_then(|p| {
        PaymentKind::parse(p.get_ref()).or_else(|| {
            cx.err(
                p.span(),
                f("payment"),
                format!("{:?} is not \"first\", \"renewal\", \"upgrade\" or \"downgrade\"", p.get_ref()),
            );
            None
        })
    });
    let pay = match (&r.rate, &r.flat) {
        (Some(rate), None) => cx.rate(rate, f("rate")).map(RewardPay::Rate),
        (None, Some(flat)) => Some(RewardPay::Flat(cx.amount(flat, f("flat")))),
        _ => {
            cx.err(span.clone(), f("rate"), "set exactly one of `rate` and `flat`");
            None
        }
    };
    let rw = Reward {
        name: text(&r.name).unwrap_or_else(|| format!("rewards[{j}]")),
        new_customer,
        payment,
        plan: text(&r.plan),
        category: text(&r.category),
        product: text(&r.product),
        pay: pay.unwrap_or(RewardPay::Flat(rust_decimal::Decimal::ZERO)),
    };
    if rw.new_customer.is_none() && rw.payment.is_none() && rw.plan.is_none() && !rw.per_item() {
        cx.err(span, f("customer"), "a reward rule needs a condition: customer, payment, plan, category or product");
    }
    rw
}

fn compile_basis(cx: &mut Ctx<'_>, i: usize, b: Option<&S<crate::raw::RawBasis>>) -> Basis {
    let mut out = Basis::default();
    let Some(b) = b else { return out };
    for (j, x) in b.get_ref().exclude.iter().enumerate() {
        match x.get_ref().as_str() {
            "tax" => out.exclude_tax = true,
            "shipping" => out.exclude_shipping = true,
            "discount" => out.exclude_discount = true,
            other => cx.err(
                x.span(),
                format!("programs[{i}].basis.exclude[{j}]"),
                format!("{other:?} is not \"tax\", \"shipping\" or \"discount\""),
            ),
        }
    }
    out
}

fn compile_marketplace(cx: &mut Ctx<'_>, i: usize, m: Option<&S<RawMarketplace>>) -> Marketplace {
    let mut out = Marketplace::default();
    let Some(m) = m else { return out };
    let span = m.span();
    let m = m.get_ref();
    let f = |name: &str| format!("programs[{i}].marketplace.{name}");
    let text = |v: &Option<S<String>>| v.as_ref().map(|s| s.get_ref().trim().to_string()).unwrap_or_default();
    if m.listed {
        let name = text(&m.name);
        if name.is_empty() {
            cx.err(span.clone(), f("name"), "a listed program needs a `name`");
        }
        out.listing = Some(Listing {
            name,
            description: text(&m.description),
            terms: text(&m.terms),
            category: text(&m.category),
        });
    }
    out.auto_approve = m.auto_approve;
    for (v, field, slot, needs) in [
        (&m.link_pattern, "link_pattern", &mut out.link_pattern, "{partner}"),
        (&m.code_pattern, "code_pattern", &mut out.code_pattern, "{PARTNER}"),
    ] {
        let Some(v) = v else { continue };
        let p = v.get_ref();
        let rest = p.replace("{program}", "").replace("{partner}", "").replace("{PARTNER}", "");
        if !(p.contains("{partner}") || p.contains("{PARTNER}")) || rest.contains(['{', '}']) || p.len() > 64 {
            cx.err(
                v.span(),
                f(field),
                format!("{p:?} must hold {needs} (or {{partner}}/{{PARTNER}}), only the placeholders {{program}}, {{partner}}, {{PARTNER}}, and at most 64 bytes"),
            );
        } else if !rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            cx.err(
                v.span(),
                f(field),
                format!("{p:?}: outside its placeholders a pattern takes letters, digits, '-' and '_' only"),
            );
        }
        *slot = p.clone();
    }
    if let Some(d) = &m.destination {
        let t = d.get_ref();
        if !(t.starts_with("https://") || t.starts_with("http://")) {
            cx.err(d.span(), f("destination"), format!("{t:?} is not an http(s) URL"));
        }
        out.destination = Some(t.clone());
    }
    if let Some(n) = &m.code_max_uses {
        if *n.get_ref() < 1 {
            cx.err(n.span(), f("code_max_uses"), format!("{} must be at least 1", n.get_ref()));
        }
        out.code_max_uses = u64::try_from(*n.get_ref()).ok();
    }
    if let Some(v) = &m.code_valid_for {
        out.code_valid_for = Some(cx.duration(Some(v), TimeDelta::days(365), &f("code_valid_for")));
    }
    out
}

fn compile_payouts(cx: &mut Ctx<'_>, raw: &RawConfig) -> PayoutSettings {
    let mut s = PayoutSettings::default();
    let Some(p) = &raw.payouts else { return s };
    let p = p.get_ref();
    let url = |cx: &mut Ctx<'_>, v: &Option<S<String>>, default: &str, field: &str| match v {
        None => default.to_string(),
        Some(u) => {
            let t = u.get_ref().trim_end_matches('/').to_string();
            if !(t.starts_with("https://") || t.starts_with("http://")) {
                cx.err(u.span(), field.to_string(), format!("{:?} is not an http(s) URL", u.get_ref()));
            }
            t
        }
    };
    if let Some(r) = &p.razorpayx {
        let r = r.get_ref();
        let base_url = url(cx, &r.base_url, "https://api.razorpay.com", "payouts.razorpayx.base_url");
        let tds = match &r.tds {
            None => "0%".parse::<Rate>().expect("a valid rate"),
            Some(t) => cx.rate(t, "payouts.razorpayx.tds").unwrap_or_else(|| "0%".parse::<Rate>().expect("valid")),
        };
        let bank_mode = r.bank_mode.as_ref().map_or("IMPS".to_string(), |m| m.get_ref().clone());
        if !["IMPS", "NEFT", "RTGS"].contains(&bank_mode.as_str()) {
            let span = r.bank_mode.as_ref().map(|m| m.span()).unwrap_or(0..0);
            cx.err(span, "payouts.razorpayx.bank_mode", format!("{bank_mode:?} is not IMPS, NEFT or RTGS"));
        }
        s.razorpayx = Some(RazorpayxSettings {
            base_url,
            key_id_env: r.key_id_env.get_ref().clone(),
            key_secret_env: r.key_secret_env.get_ref().clone(),
            webhook_secret_env: r.webhook_secret_env.as_ref().map(|w| w.get_ref().clone()),
            account_number: r.account_number.get_ref().clone(),
            tds,
            bank_mode,
        });
    }
    if let Some(pp) = &p.paypal {
        let pp = pp.get_ref();
        s.paypal = Some(PaypalSettings {
            base_url: url(cx, &pp.base_url, "https://api-m.paypal.com", "payouts.paypal.base_url"),
            client_id_env: pp.client_id_env.get_ref().clone(),
            client_secret_env: pp.client_secret_env.get_ref().clone(),
            webhook_id: pp.webhook_id.as_ref().map(|w| w.get_ref().clone()),
        });
    }
    s
}

/// Checks a payout destination given outside the file (a registry event):
/// the same rules as `[partners.payout]`. The first problem, naming its
/// field (`payout`, `payout.email`, `payout.ifsc`).
pub fn check_payout(p: &Payout) -> Result<(), (String, String)> {
    payout_problems(p).into_iter().next().map_or(Ok(()), Err)
}

/// Every problem of a payout destination, with its field (relative to `payout`).
fn payout_problems(p: &Payout) -> Vec<(String, String)> {
    let mut out = Vec::new();
    match p.provider {
        PayoutProvider::Paypal => {
            if p.email.as_deref().is_none_or(|e| !e.contains('@')) {
                out.push(("payout.email".into(), "a paypal payout needs an e-mail address".into()));
            }
        }
        PayoutProvider::Razorpayx => {
            let bank = p.account_number.is_some() && p.ifsc.is_some();
            if !bank && p.vpa.is_none() {
                out.push((
                    "payout".into(),
                    "a razorpayx payout needs a UPI `vpa` or a bank `account_number` with `ifsc`".into(),
                ));
            }
            if let Some(s) = p.ifsc.as_deref().filter(|s| !is_ifsc(s)) {
                out.push(("payout.ifsc".into(), format!("{s:?} is not an IFSC code (4 letters, 0, 6 characters)")));
            }
        }
    }
    out
}

fn is_ifsc(s: &str) -> bool {
    s.len() == 11 && s.is_char_boundary(4) && s[..4].bytes().all(|b| b.is_ascii_uppercase()) && s.as_bytes()[4] == b'0'
}

fn compile_payout(cx: &mut Ctx<'_>, po: &S<RawPayout>, field: &str) -> Option<Payout> {
    let r = po.get_ref();
    let get = |v: &Option<S<String>>| v.as_ref().map(|s| s.get_ref().clone());
    let provider = match r.provider.get_ref().as_str() {
        "paypal" => PayoutProvider::Paypal,
        "razorpayx" => PayoutProvider::Razorpayx,
        other => {
            cx.err(
                r.provider.span(),
                format!("{field}.provider"),
                format!("{other:?} is not \"paypal\" or \"razorpayx\""),
            );
            return None;
        }
    };
    let payout = Payout {
        provider,
        email: get(&r.email),
        vpa: get(&r.vpa),
        account_number: get(&r.account_number),
        ifsc: get(&r.ifsc),
        name: get(&r.name),
    };
    for (f, message) in payout_problems(&payout) {
        let suffix = f.strip_prefix("payout").unwrap_or_default();
        let span = match (&r.ifsc, suffix) {
            (Some(ifsc), ".ifsc") => ifsc.span(),
            _ => po.span(),
        };
        cx.err(span, format!("{field}{suffix}"), message);
    }
    Some(payout)
}

#[cfg(test)]
mod tests;
