//! Rate limits (governor, GCRA) per API key and per client address, answered
//! 429 with `Retry-After`; a bound on requests in flight (load shedding,
//! 503); a time limit per request (408); and a last-resort panic catcher.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use governor::clock::QuantaInstant;
use governor::middleware::NoOpMiddleware;
use serde_json::json;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

use super::json_body;
use crate::metrics::Metrics;

/// Rate-limit key: the API key (hashed; the key itself is never kept).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ByKey;

impl KeyExtractor for ByKey {
    type Key = u64;

    fn extract<T>(&self, req: &Request<T>) -> Result<u64, GovernorError> {
        let token = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
        Ok(xxhash_rust::xxh3::xxh3_64(token))
    }
}

/// Rate-limit key: the client's address (through trusted proxies).
#[derive(Clone, Debug)]
pub struct ByIp(Arc<Vec<ipnet::IpNet>>);

impl KeyExtractor for ByIp {
    type Key = std::net::IpAddr;

    fn extract<T>(&self, req: &Request<T>) -> Result<std::net::IpAddr, GovernorError> {
        Ok(super::client_ip(req, &self.0))
    }
}

fn too_many(metrics: Arc<Metrics>, what: &'static str) -> impl Fn(GovernorError) -> Response<Body> + Send + Sync {
    move |e| {
        let wait = match &e {
            GovernorError::TooManyRequests { wait_time, .. } => (*wait_time).max(1),
            _ => 1,
        };
        let (status, reason) = match e {
            GovernorError::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        let body = json!({ "status": "rejected", "reason": reason, "field": null,
            "detail": format!("too many requests {what}: retry after {wait}s") });
        let mut r = Response::new(json_body(body));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait));
        r
    }
}

fn period(per_second: u64) -> Duration {
    Duration::from_nanos((1_000_000_000 / per_second.max(1)).max(1))
}

pub(crate) type KeyLimit = GovernorLayer<ByKey, NoOpMiddleware<QuantaInstant>, Body>;
pub type IpLimit = GovernorLayer<ByIp, NoOpMiddleware<QuantaInstant>, Body>;

/// One request per `every`, bursts of `burst`, per client address: for
/// routes anyone may call that write (applying to a program).
pub fn per_address_every(every: Duration, burst: u32, metrics: &Arc<Metrics>, trusted: Vec<ipnet::IpNet>) -> IpLimit {
    let config = GovernorConfigBuilder::default()
        .period(every.max(Duration::from_millis(1)))
        .burst_size(burst.max(1))
        .key_extractor(ByIp(Arc::new(trusted)))
        .finish()
        .expect("a non-zero period and burst");
    GovernorLayer::new(config).error_handler(too_many(metrics.clone(), "from this address"))
}

/// `rate.0` requests per second, bursts of `rate.1`, per API key.
pub(crate) fn per_key(rate: (u64, u32), metrics: &Arc<Metrics>) -> KeyLimit {
    let config = GovernorConfigBuilder::default()
        .period(period(rate.0))
        .burst_size(rate.1.max(1))
        .key_extractor(ByKey)
        .finish()
        .expect("a non-zero period and burst");
    GovernorLayer::new(config).error_handler(too_many(metrics.clone(), "for this API key"))
}

/// `rate.0` requests per second, bursts of `rate.1`, per client address.
pub(crate) fn per_ip(rate: (u64, u32), metrics: &Arc<Metrics>, trusted: Vec<ipnet::IpNet>) -> IpLimit {
    let config = GovernorConfigBuilder::default()
        .period(period(rate.0))
        .burst_size(rate.1.max(1))
        .key_extractor(ByIp(Arc::new(trusted)))
        .finish()
        .expect("a non-zero period and burst");
    GovernorLayer::new(config).error_handler(too_many(metrics.clone(), "from this address"))
}

/// The answer to a request whose handler panicked (500), counted.
pub(crate) fn panic_answer(
    metrics: &Arc<Metrics>,
) -> impl Fn(Box<dyn std::any::Any + Send>) -> Response<Body> + Clone + Send + Sync + 'static {
    let panics = metrics.clone();
    move |_| {
        panics.http_panics.fetch_add(1, Ordering::Relaxed);
        let body = json!({ "status": "error", "reason": "internal",
            "detail": "internal error: the request failed; it was counted and can be reported" });
        let mut r = Response::new(json_body(body));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    }
}

/// The answer to a request shed beyond the bound in flight (503) or over
/// its time limit (408).
pub(crate) async fn shed_answer(metrics: Arc<Metrics>, err: tower::BoxError) -> Response<Body> {
    let (status, reason, detail) = if err.is::<tower::timeout::error::Elapsed>() {
        (StatusCode::REQUEST_TIMEOUT, "timeout", "the request took too long (a slow body?)")
    } else {
        metrics.overloaded.fetch_add(1, Ordering::Relaxed);
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded", "too many requests in flight: retry")
    };
    let body = json!({ "status": "rejected", "reason": reason, "field": null, "detail": detail });
    let mut r = Response::new(json_body(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}
