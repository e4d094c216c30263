//! The rules file as written: every field keeps its position in the file so
//! that validation can name the line of each problem.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use toml::Spanned;

pub(crate) type S<T> = Spanned<T>;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) engine: Option<S<RawEngine>>,
    #[serde(default)]
    pub(crate) payouts: Option<S<RawPayouts>>,
    #[serde(default)]
    pub(crate) programs: Vec<S<RawProgram>>,
    #[serde(default)]
    pub(crate) partners: Vec<S<RawPartner>>,
    #[serde(default)]
    pub(crate) links: Vec<S<RawLink>>,
    #[serde(default)]
    pub(crate) codes: Vec<S<RawCode>>,
    #[serde(default)]
    pub(crate) api_keys: Vec<S<RawApiKey>>,
    #[serde(default)]
    pub(crate) webhooks: Vec<S<RawWebhook>>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApiKey {
    pub(crate) program_id: S<String>,
    /// The key itself (prefer `key_env` so that the file holds no secret).
    pub(crate) key: Option<S<String>>,
    /// The environment variable that holds the key.
    pub(crate) key_env: Option<S<String>>,
    /// `ingest` (checkout events, the default), `review` (review events
    /// only) or `finance` (payout events and the payouts API only).
    pub(crate) role: Option<S<String>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEngine {
    pub(crate) dedupe_retention: Option<S<String>>,
    /// How far behind the newest event time an event may arrive and still
    /// find the clicks it needs (watermark lag).
    pub(crate) out_of_order: Option<S<String>>,
    pub(crate) max_clicks_per_visitor: Option<S<i64>>,
    pub(crate) max_tracked_visitors: Option<S<i64>>,
    /// How long after its last capture, refund or chargeback an order is
    /// kept in memory; later refunds of it are `unknown_order`.
    pub(crate) order_retention: Option<S<String>>,
    /// How far ahead of the arrival clock an event's `ts` may be.
    pub(crate) max_future_skew: Option<S<String>>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProgram {
    pub(crate) id: S<String>,
    pub(crate) currency: S<String>,
    pub(crate) rate: S<String>,
    #[serde(default)]
    pub(crate) overrides: Vec<S<String>>,
    pub(crate) hold: Option<S<String>>,
    #[serde(default)]
    pub(crate) auto_approve: bool,
    pub(crate) attribution: Option<S<RawAttribution>>,
    #[serde(default)]
    pub(crate) category_rates: BTreeMap<String, S<String>>,
    /// Fraud detector settings.
    pub(crate) fraud: Option<S<RawFraud>>,
    /// The smallest payout to a partner (a decimal in the program's currency).
    pub(crate) min_payout: Option<S<String>>,
    /// The program's marketplace listing and how approved creators are set up.
    pub(crate) marketplace: Option<S<RawMarketplace>>,
    /// Leads and signups: flat rewards, deal stages.
    pub(crate) leads: Option<S<RawLeads>>,
    /// Subscriptions: how long renewals earn, at what rate.
    pub(crate) subscriptions: Option<S<RawSubscriptions>>,
    /// Reward rules, first match wins (before the category rates and the program rate).
    #[serde(default)]
    pub(crate) rewards: Vec<S<RawReward>>,
    /// What the commission basis leaves out of the captured amount.
    pub(crate) basis: Option<S<RawBasis>>,
}

/// `[programs.leads]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLeads {
    /// The flat reward of an accepted lead (a decimal in the program's currency).
    pub(crate) reward: S<String>,
    /// Rewards per lead kind (`lead`, `signup`, ...), instead of `reward`.
    #[serde(default)]
    pub(crate) kinds: BTreeMap<String, S<String>>,
    /// How long a lead's reward is held before it is eligible (default: the program's hold).
    pub(crate) hold: Option<S<String>>,
    /// The stages a lead can reach, each once.
    #[serde(default)]
    pub(crate) stages: Vec<S<RawStage>>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStage {
    pub(crate) name: S<String>,
    pub(crate) reward: Option<S<String>>,
    /// Reaching this stage reverses everything the lead earned and ends it.
    #[serde(default)]
    pub(crate) disqualify: bool,
}

/// `[programs.subscriptions]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSubscriptions {
    /// How long after the first payment later payments earn: `"12mo"`,
    /// `"365d"` or `"lifetime"`.
    pub(crate) max_duration: S<String>,
    /// The rate of renewals (default: the rate the first payment earned by).
    pub(crate) renewal_rate: Option<S<String>>,
}

/// `[[programs.rewards]]`: conditions (all must hold) and a rate or a flat amount.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawReward {
    pub(crate) name: Option<S<String>>,
    /// `new` or `returning` (the event's `new_customer`).
    pub(crate) customer: Option<S<String>>,
    /// `first`, `renewal`, `upgrade` or `downgrade` (subscription payments).
    pub(crate) payment: Option<S<String>>,
    pub(crate) plan: Option<S<String>>,
    pub(crate) category: Option<S<String>>,
    pub(crate) product: Option<S<String>>,
    pub(crate) rate: Option<S<String>>,
    pub(crate) flat: Option<S<String>>,
}

/// `[programs.basis]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBasis {
    /// Any of `tax`, `shipping`, `discount`.
    #[serde(default)]
    pub(crate) exclude: Vec<S<String>>,
}

/// `[[webhooks]]`: an endpoint configured in the file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWebhook {
    pub(crate) id: S<String>,
    pub(crate) program_id: S<String>,
    /// Only this partner's events (a partner's endpoint); none: the brand's.
    pub(crate) partner_id: Option<S<String>>,
    pub(crate) url: S<String>,
    pub(crate) events: Vec<S<String>>,
    /// The environment variable holding the `whsec_` signing secret.
    pub(crate) secret_env: S<String>,
}

/// `[programs.marketplace]`: the listing seed and the setup of approved creators.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMarketplace {
    /// Listed in the marketplace from the start (a `program_published` event can list it later).
    #[serde(default)]
    pub(crate) listed: bool,
    pub(crate) name: Option<S<String>>,
    pub(crate) description: Option<S<String>>,
    pub(crate) terms: Option<S<String>>,
    pub(crate) category: Option<S<String>>,
    /// Applications are approved as they arrive.
    #[serde(default)]
    pub(crate) auto_approve: bool,
    /// The approved partner's link id, e.g. "{program}-{partner}".
    pub(crate) link_pattern: Option<S<String>>,
    /// The approved partner's promo code, e.g. "{PARTNER}10".
    pub(crate) code_pattern: Option<S<String>>,
    /// Where the approved partner's link sends shoppers.
    pub(crate) destination: Option<S<String>>,
    /// Uses of an approved partner's code before it is exhausted.
    pub(crate) code_max_uses: Option<S<i64>>,
    /// How long an approved partner's code is valid from the approval.
    pub(crate) code_valid_for: Option<S<String>>,
}

/// Payout providers: where they are and which environment variables hold
/// their credentials (secrets are never in the file).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPayouts {
    pub(crate) razorpayx: Option<S<RawRazorpayx>>,
    pub(crate) paypal: Option<S<RawPaypal>>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRazorpayx {
    pub(crate) base_url: Option<S<String>>,
    pub(crate) key_id_env: S<String>,
    pub(crate) key_secret_env: S<String>,
    pub(crate) webhook_secret_env: Option<S<String>>,
    /// The business's RazorpayX account number payouts are debited from.
    pub(crate) account_number: S<String>,
    /// TDS withheld before payout, e.g. "10%".
    pub(crate) tds: Option<S<String>>,
    /// IMPS, NEFT, RTGS (bank accounts); UPI accounts always use UPI.
    pub(crate) bank_mode: Option<S<String>>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPaypal {
    pub(crate) base_url: Option<S<String>>,
    pub(crate) client_id_env: S<String>,
    pub(crate) client_secret_env: S<String>,
    /// The id PayPal gave the webhook subscription (webhooks are verified
    /// against it through PayPal's verify-webhook-signature call).
    pub(crate) webhook_id: Option<S<String>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFraud {
    pub(crate) self_referral: Option<S<RawRule>>,
    pub(crate) coupon_stacking: Option<S<RawRule>>,
    pub(crate) velocity: Option<S<RawRule>>,
    pub(crate) fast_conversion: Option<S<RawRule>>,
    pub(crate) coupon_leak: Option<S<RawRule>>,
    pub(crate) refund_rate: Option<S<RawRule>>,
    pub(crate) conversion_spike: Option<S<RawRule>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub(crate) action: Option<S<String>>,
    /// velocity: more than this many orders per key within `window` is flagged.
    pub(crate) max_orders: Option<S<i64>>,
    pub(crate) window: Option<S<String>>,
    /// fast_conversion: a capture less than this long after its winning click.
    pub(crate) min_seconds: Option<S<i64>>,
    /// coupon_leak: redemptions of a code before it is judged; refund_rate:
    /// orders of a partner before it is judged.
    pub(crate) min_orders: Option<S<i64>>,
    /// coupon_leak: share of redemptions with no click from the code's
    /// partner; refund_rate: refunded share of captured revenue. 0..1.
    pub(crate) max_share: Option<S<f64>>,
    /// conversion_spike: the time bucket orders are counted in.
    pub(crate) bucket: Option<S<String>>,
    /// conversion_spike: buckets of baseline a partner needs before it is judged.
    pub(crate) warmup_buckets: Option<S<i64>>,
    /// conversion_spike, coupon_leak: the evidence (log-likelihood ratio)
    /// that flags; refund_rate: standard deviations above the program's rate.
    pub(crate) threshold: Option<S<f64>>,
    /// conversion_spike, coupon_leak, refund_rate: the rise over the baseline
    /// the test is tuned to (e.g. 3 = three times the usual rate).
    pub(crate) ratio: Option<S<f64>>,
    /// conversion_spike: buckets the baseline remembers (decayed).
    pub(crate) baseline_buckets: Option<S<i64>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAttribution {
    pub(crate) window: Option<S<String>>,
    pub(crate) model: Option<S<String>>,
    pub(crate) code_priority: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPartner {
    pub(crate) id: S<String>,
    pub(crate) program_id: S<String>,
    pub(crate) parent: Option<S<String>>,
    pub(crate) rate: Option<S<String>>,
    #[serde(default)]
    pub(crate) category_rates: BTreeMap<String, S<String>>,
    #[serde(default)]
    pub(crate) email_sha256: Vec<S<String>>,
    #[serde(default)]
    pub(crate) customer_ids: Vec<S<String>>,
    pub(crate) payout: Option<S<RawPayout>>,
    /// This partner's flat reward per accepted lead (beats the program's).
    pub(crate) lead_reward: Option<S<String>>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPayout {
    pub(crate) provider: S<String>,
    pub(crate) email: Option<S<String>>,
    pub(crate) vpa: Option<S<String>>,
    pub(crate) account_number: Option<S<String>>,
    pub(crate) ifsc: Option<S<String>>,
    pub(crate) name: Option<S<String>>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLink {
    pub(crate) id: S<String>,
    pub(crate) partner_id: S<String>,
    pub(crate) destination: Option<S<String>>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCode {
    pub(crate) code: S<String>,
    pub(crate) partner_id: S<String>,
    pub(crate) starts_at: Option<S<String>>,
    pub(crate) expires_at: Option<S<String>>,
    pub(crate) max_uses: Option<S<i64>>,
}
