//! Afflio rules: the operator's TOML configuration (programs, partners, links,
//! promo codes, engine limits), parsed into a raw form that remembers where
//! every value stands in the file, then compiled into validated [`Rules`].
//!
//! Validation reports every problem at once, each naming the file, the line
//! and the field (see [`ConfigError`]). Compiled rules are immutable; a change
//! (a creator joining through the marketplace, an operator's edit) builds a
//! new [`Rules`] with a higher [`Rules::version`].

mod compile;
mod error;
mod raw;
mod units;

pub use compile::{
    check_payout, webhook_problems, ApiKey, AttributionModel, Basis, Code, EngineSettings, FraudAction, FraudSettings,
    KeyRole, Leads, Link, Listing, Marketplace, MaxDuration, Partner, PaymentKind, Payout, PayoutProvider,
    PayoutSettings, PaypalSettings, Program, RazorpayxSettings, Reward, RewardPay, Rules, Secret, Stage, Subscriptions,
    WebhookConfig, WEBHOOK_BRAND_ONLY, WEBHOOK_EVENT_TYPES,
};
pub use error::{ConfigError, Problem};
pub use units::{format_duration, parse_duration, Currency, Rate};

/// Normalises a promo code the way matching does: trimmed, upper-cased.
pub fn normalize_code(code: &str) -> String {
    code.trim().to_uppercase()
}
