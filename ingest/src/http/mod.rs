//! The HTTP ingest: checkout events in, tracking-link redirects out.
//!
//! Hostile clients are expected. The key is checked before a body is read;
//! every request has a time limit and there is a bound on requests in
//! flight (beyond it: 503); each key and each client address has a rate
//! limit (beyond it: 429 with `Retry-After`); nothing a client sends can
//! panic a handler (a last-resort layer answers 500 and counts it). Answers
//! say who is at fault: 4xx for the client (never retried as is), 503 for
//! the service (safe to retry with the same `event_id`).

mod events;
mod limits;
mod redirect;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use afflio_engine::rules::{KeyRole, Rules};
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use futures::future::BoxFuture;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::metrics::Metrics;

pub use events::RESERVED_ID_PREFIX;
pub use limits::{per_address_every, IpLimit};
pub use redirect::{ClickDedupe, RedirectConfig};

/// Why the broker did not store a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// Nothing was sent (the broker is not connected): not stored; retry.
    Unavailable(String),
    /// Sent, but the broker did not confirm in time: it may or may not be
    /// stored. A retry with the same `event_id` is safe: a duplicate is
    /// recognised.
    Unknown(String),
    /// Larger than the broker accepts: sending it again cannot succeed.
    TooLarge { bytes: usize, max: usize },
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::Unavailable(d) => write!(f, "not stored (the broker is unavailable): {d}"),
            PublishError::Unknown(d) => write!(f, "the broker did not confirm in time: {d}"),
            PublishError::TooLarge { bytes, max } => {
                write!(f, "{bytes} bytes, over the broker's limit of {max} bytes per message")
            }
        }
    }
}

/// What the broker did with a published event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    Stored,
    /// It already had this exact event (same id and content).
    Duplicate,
}

/// One message to publish: subject, message id, payload.
pub type Message = (String, String, Bytes);

/// Where accepted events go (JetStream in the service, a fake in tests).
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `msgs` in order (the stream keeps that order) and answers
    /// once the broker acknowledged (or failed) each.
    fn publish(&self, msgs: Vec<Message>) -> BoxFuture<'static, Vec<Result<PublishOutcome, PublishError>>>;
    /// Whether the broker is connected and the stream ready (for `/readyz`),
    /// and why not.
    fn ready(&self) -> Result<(), String>;
}

/// Rules shared by ingest and the engine, swapped as a whole on reload.
pub type SharedRules = Arc<RwLock<Arc<Rules>>>;

/// At most this many events in one request.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;

/// Limits of the HTTP ingest.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request body, bytes (413 beyond).
    pub max_body: usize,
    /// A request (its body included) must be answered within this.
    pub request_timeout: Duration,
    /// Requests handled at once; beyond, 503 with `Retry-After`.
    pub max_in_flight: usize,
    /// Requests per second (and burst) per API key, on the event and API routes.
    pub key_rate: (u64, u32),
    /// Requests per second (and burst) per client address, on every route.
    pub ip_rate: (u64, u32),
    /// Client addresses of proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub redirect: RedirectConfig,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body: 4 << 20,
            request_timeout: Duration::from_secs(30),
            max_in_flight: 512,
            key_rate: (2_000, 4_000),
            ip_rate: (500, 1_000),
            trusted_proxies: Vec::new(),
            redirect: RedirectConfig::default(),
        }
    }
}

/// The ingest's state.
#[derive(Clone)]
pub struct Ingest {
    pub rules: SharedRules,
    pub publisher: Arc<dyn Publisher>,
    pub metrics: Arc<Metrics>,
    /// Links created by registry events (the rules file's are in `rules`).
    pub links: Arc<LinkDirectory>,
}

/// Tracking links the registry created, as the ingest tier knows them:
/// filled by the engine's consumer as it applies registry events (and from
/// the engine's state at start), read by the redirect and the click check.
/// Bounded: beyond `capacity` a link is not added (its clicks still reach
/// the engine, which knows it, through `POST /v1/events`... and the redirect
/// answers 404 until a restart reloads the directory).
pub struct LinkDirectory {
    links: dashmap::DashMap<String, RegisteredLink>,
    capacity: usize,
}

/// A registry link: its program and where it sends shoppers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisteredLink {
    pub program_id: String,
    pub partner_id: String,
    pub destination: Option<String>,
}

impl Default for LinkDirectory {
    fn default() -> Self {
        LinkDirectory::new(10_000_000)
    }
}

impl LinkDirectory {
    pub fn new(capacity: usize) -> LinkDirectory {
        LinkDirectory { links: dashmap::DashMap::new(), capacity }
    }

    /// Adds (or replaces) a link; false when the directory is full.
    pub fn insert(&self, id: &str, link: RegisteredLink) -> bool {
        if self.links.len() >= self.capacity && !self.links.contains_key(id) {
            return false;
        }
        self.links.insert(id.to_string(), link);
        true
    }

    pub fn remove(&self, id: &str) {
        self.links.remove(id);
    }

    pub fn get(&self, id: &str) -> Option<RegisteredLink> {
        self.links.get(id).map(|l| l.clone())
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) ingest: Ingest,
    pub(crate) config: Arc<HttpConfig>,
    pub(crate) bots: Arc<isbot::Bots>,
    pub(crate) clicks: Arc<ClickDedupe>,
}

/// Routes another component serves on the same listener, under the same
/// limits: `keyed` ones behind the API key check (the handler finds the
/// caller's [`Principal`] in the request's extensions) and the per-key rate
/// limit; `open` ones (provider webhooks, which carry their own signatures)
/// behind the per-address limit only.
#[derive(Default)]
pub struct Extra {
    pub keyed: Router,
    pub open: Router,
}

/// The routes: `POST /v1/events`, `GET /r/{link_id}`, `/healthz`,
/// `/readyz`, `/metrics`; with the limits of `config`.
pub fn router(ingest: Ingest, config: HttpConfig) -> Router {
    router_with(ingest, config, Extra::default())
}

/// [`router`] with another component's routes.
pub fn router_with(ingest: Ingest, config: HttpConfig, more: Extra) -> Router {
    let metrics = ingest.metrics.clone();
    let mut bots = isbot::Bots::default();
    let extra: Vec<&str> = config.redirect.bot_patterns.iter().map(String::as_str).collect();
    bots.append(&extra);
    let state = AppState {
        clicks: Arc::new(ClickDedupe::new(config.redirect.dedupe_capacity)),
        ingest,
        bots: Arc::new(bots),
        config: Arc::new(config.clone()),
    };
    let keyed = Router::new()
        .route("/v1/events", post(events::post_events))
        .with_state(state.clone())
        .merge(more.keyed)
        .layer(limits::per_key(config.key_rate, &metrics))
        // The key is checked before the body is read.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authenticate));
    let open = Router::new()
        .route("/r/{link_id}", get(redirect::redirect))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state.clone())
        .merge(more.open);
    keyed
        .merge(open)
        .layer(DefaultBodyLimit::max(config.max_body))
        .layer(limits::per_ip(config.ip_rate, &metrics, state.config.trusted_proxies.clone()))
        .layer(
            // Outermost: a panic is answered; then load shedding beyond the
            // bound in flight, and a time limit per request.
            tower::ServiceBuilder::new()
                .layer(tower_http::catch_panic::CatchPanicLayer::custom(limits::panic_answer(&metrics)))
                .layer(axum::error_handling::HandleErrorLayer::new({
                    let m = metrics.clone();
                    move |err: tower::BoxError| limits::shed_answer(m.clone(), err)
                }))
                .load_shed()
                .concurrency_limit(config.max_in_flight.max(1))
                .timeout(config.request_timeout),
        )
}

pub(crate) fn rules(st: &Ingest) -> Arc<Rules> {
    st.rules.read().map(|r| r.clone()).unwrap_or_else(|p| p.into_inner().clone())
}

/// An error answer: `{"status": "rejected", "reason", "field", "detail"}`.
pub fn error(status: StatusCode, reason: &str, field: Option<&str>, detail: String) -> Response {
    (status, axum::Json(json!({ "status": "rejected", "reason": reason, "field": field, "detail": detail })))
        .into_response()
}

/// Who a request's key speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub program_id: String,
    pub role: KeyRole,
}

/// Checks the bearer key (in constant time against every key) before
/// anything else of the request is read.
async fn authenticate(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let rules = rules(&st.ingest);
    match authorize(&rules, req.headers()) {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(r) => r,
    }
}

#[allow(clippy::result_large_err)] // the error is the answer itself, built once per request
pub(crate) fn authorize(rules: &Rules, headers: &HeaderMap) -> Result<Principal, Response> {
    let unauthorized = |detail: &str| {
        let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", Some("Authorization"), detail.to_string());
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    };
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return Err(unauthorized("missing `Authorization: Bearer <key>`"));
    };
    let Some(token) = value.strip_prefix("Bearer ").map(str::trim) else {
        return Err(unauthorized("the Authorization header must be `Bearer <key>`"));
    };
    find_key(rules, token)
        .map(|k| Principal { program_id: k.program_id.clone(), role: k.role })
        .ok_or_else(|| unauthorized("unknown API key"))
}

/// The rules' API key equal to `token`, compared in constant time against
/// every key (how long it takes does not tell which key nearly matched).
pub fn find_key<'r>(rules: &'r Rules, token: &str) -> Option<&'r afflio_engine::rules::ApiKey> {
    let mut found = None;
    for k in rules.api_keys() {
        if bool::from(k.key.expose().as_bytes().ct_eq(token.as_bytes())) {
            found = Some(k);
        }
    }
    found
}

/// The client's address: the peer's, or the first `X-Forwarded-For` entry
/// when the peer is a trusted proxy.
pub(crate) fn client_ip<B>(req: &axum::http::Request<B>, trusted: &[ipnet::IpNet]) -> IpAddr {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    if trusted.iter().any(|n| n.contains(&peer)) {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse::<IpAddr>().ok());
        if let Some(ip) = forwarded {
            return ip;
        }
    }
    peer
}

async fn readyz(State(st): State<AppState>) -> Response {
    match st.ingest.publisher.ready() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], format!("not ready: {why}\n"))
            .into_response(),
    }
}

async fn metrics_text(State(st): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.ingest.metrics.render()).into_response()
}

/// An empty response body (for answers built by layers).
pub(crate) fn json_body(v: serde_json::Value) -> Body {
    Body::from(v.to_string())
}
