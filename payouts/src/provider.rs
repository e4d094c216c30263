//! The one trait every payout provider implements, and the HTTP plumbing
//! they share (time limits, 429 backoff, who is at fault for an answer).

use std::time::Duration;

use futures::future::BoxFuture;
use http::HeaderMap;
use serde_json::Value;

use crate::request::{Answer, Request, Webhook, WebhookError};

/// A payout provider: one directory per provider, its strict fake beside
/// it. A third provider is a new implementation of this and nothing else.
pub trait Provider: Send + Sync {
    /// `razorpayx`, `paypal`: the `provider` of the items it pays.
    fn name(&self) -> &'static str;

    /// How long the provider remembers an idempotency key or batch id,
    /// less a safety margin. A request may be repeated only within it.
    fn key_window(&self) -> chrono::Duration;

    /// Whether [`Answer::NotFound`] from [`Provider::lookup`] proves that no
    /// payout was made (RazorpayX can be searched by `reference_id`; PayPal
    /// cannot be searched by `sender_batch_id`).
    fn lookup_is_definite(&self) -> bool;

    /// Sends one request group (one item for RazorpayX; one
    /// `sender_batch_id` for PayPal), exactly as recorded. `first` says no
    /// request was ever made for it: only then is a validation error a
    /// definite refusal. One answer per request, in order.
    fn create<'a>(&'a self, group: &'a [Request], first: bool) -> BoxFuture<'a, Vec<Answer>>;

    /// Asks where the group's items stand (by provider id, or by key). One
    /// answer per request, in order.
    fn lookup<'a>(&'a self, group: &'a [Request]) -> BoxFuture<'a, Vec<Answer>>;

    /// Verifies a webhook (headers and raw body) and says what it reports.
    fn webhook<'a>(&'a self, headers: &'a HeaderMap, body: &'a [u8]) -> BoxFuture<'a, Result<Webhook, WebhookError>>;
}

/// How the adapters talk HTTP.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// A request not answered within this has an unknown outcome.
    pub timeout: Duration,
    /// Attempts of a request answered 429 (then its outcome is unknown).
    pub rate_limit_attempts: u32,
    /// The longest wait between them (a longer `Retry-After` is cut to it).
    pub max_backoff: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings { timeout: Duration::from_secs(20), rate_limit_attempts: 4, max_backoff: Duration::from_secs(8) }
    }
}

impl HttpSettings {
    pub(crate) fn client(&self) -> Result<reqwest::Client, String> {
        reqwest::Client::builder()
            .timeout(self.timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }

    /// The wait before attempt `n` (1-based) after a 429.
    pub(crate) fn backoff(&self, n: u32, retry_after: Option<&str>) -> Duration {
        let asked = retry_after.and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
        let exp = Duration::from_millis(250u64.saturating_mul(1 << n.min(10)));
        asked.unwrap_or(exp).min(self.max_backoff)
    }
}

/// An HTTP answer, read whole.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Value,
}

/// Who is at fault for a failed call, and what it means for the money.
pub(crate) enum Failure {
    /// Nothing is known (no answer, 5xx, still rate limited, credentials
    /// refused): the request may or may not have been taken.
    Unknown(String),
    /// Credentials refused (401/403): nothing was done.
    Auth(String),
    /// A 4xx the provider says is the request's fault.
    Client(Reply),
}

impl Failure {
    /// The failure as an unknown outcome, whatever it was.
    pub(crate) fn unknown(self, what: &str) -> String {
        match self {
            Failure::Unknown(d) | Failure::Auth(d) => d,
            Failure::Client(r) => format!("{what}: HTTP {}: {}", r.status, r.body),
        }
    }
}

/// Sends a request built by `build` (again after a 429, up to the limit)
/// and reads the answer. 2xx is `Ok`; the rest is classified.
pub(crate) async fn call(
    settings: &HttpSettings,
    what: &str,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<Reply, Failure> {
    let mut n = 0;
    loop {
        n += 1;
        let resp = build().send().await.map_err(|e| Failure::Unknown(format!("{what}: no answer: {e}")))?;
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = resp.text().await.map_err(|e| Failure::Unknown(format!("{what}: answer cut short: {e}")))?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match status {
            200..=299 => return Ok(Reply { status, body }),
            429 if n < settings.rate_limit_attempts => {
                tokio::time::sleep(settings.backoff(n, retry_after.as_deref())).await;
            }
            429 => return Err(Failure::Unknown(format!("{what}: rate limited (HTTP 429) {n} times"))),
            401 | 403 => {
                return Err(Failure::Auth(format!(
                    "{what}: credentials refused (HTTP {status}): check the key in the environment"
                )))
            }
            400..=499 => return Err(Failure::Client(Reply { status, body })),
            _ => return Err(Failure::Unknown(format!("{what}: HTTP {status}"))),
        }
    }
}

/// Reads a secret from the environment; its value is never printed.
pub fn secret(var: &str, field: &str) -> Result<String, String> {
    std::env::var(var).map_err(|_| format!("{field}: environment variable {var} is not set"))
}
