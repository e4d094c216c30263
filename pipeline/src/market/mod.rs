//! The marketplace: brands list programs, creators apply, brands decide;
//! partners see their own links, codes, clicks, orders, commissions,
//! balance and payouts. JSON under `/v1/...` and server-rendered pages
//! (`/marketplace`, `/partner`, `/console`).
//!
//! Every change is an event published to the stream (registry events,
//! reviews) and applied by the engine in order; a write answers once the
//! engine has applied it, with the engine's refusal when it refused. Reads
//! of the registry ask the engine (between two events); reads of money
//! (clicks, orders, lines, balances, payouts) come from the store with
//! DataFusion, as of its last committed version.

#![allow(clippy::result_large_err)] // handlers' errors are the answers themselves

mod api;
mod auth;
mod hooks;
mod openapi;
mod pages;

use std::path::PathBuf;
use std::sync::Arc;

use afflio_engine::{fingerprint, Engine, Invalid, Reason};
use afflio_ingest::http::{error, Extra, PublishError, Publisher, SharedRules};
use afflio_ingest::{decode_event, nats};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::finance::{ask, caught_up, EngineQuery};
use auth::PortalSecret;

/// The marketplace component's state.
#[derive(Clone)]
pub(crate) struct Market {
    rules: SharedRules,
    queries: mpsc::Sender<EngineQuery>,
    publisher: Arc<dyn Publisher>,
    js: async_nats::jetstream::Context,
    data: PathBuf,
    secret: Arc<PortalSecret>,
    /// One write at a time: a write's checks and its event are not raced by another's.
    writes: Arc<tokio::sync::Mutex<()>>,
    templates: Arc<minijinja::Environment<'static>>,
    /// Cookies get `Secure` (served over HTTPS).
    cookie_secure: bool,
    /// The per-address limit on applying (anyone may apply), one budget for
    /// the JSON route and the form.
    limit: afflio_ingest::http::IpLimit,
    /// The webhook endpoints, once the broker is reachable.
    pub(crate) hooks: Arc<std::sync::OnceLock<Arc<crate::webhooks::endpoints::Endpoints>>>,
}

/// Applying, per client address: one every 10 s, bursts of 20 (a person
/// applies once; an office behind one address a few times).
const APPLY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
const APPLY_BURST: u32 = 20;

/// A refusal, as an answer.
pub(crate) struct Refusal {
    status: StatusCode,
    reason: String,
    field: Option<String>,
    detail: String,
}

impl Refusal {
    pub(super) fn new(status: StatusCode, reason: &str, field: Option<&str>, detail: impl Into<String>) -> Refusal {
        Refusal { status, reason: reason.into(), field: field.map(Into::into), detail: detail.into() }
    }

    pub(super) fn unavailable(detail: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", None, detail)
    }

    fn from_engine(inv: &Invalid) -> Refusal {
        let status = match inv.reason {
            Reason::UnknownApplication | Reason::UnknownPartner | Reason::UnknownOrder => StatusCode::NOT_FOUND,
            Reason::AlreadyDecided | Reason::DuplicateId | Reason::IdempotencyConflict => StatusCode::CONFLICT,
            Reason::Malformed => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        Refusal::new(status, inv.reason.as_str(), Some(&inv.field), inv.detail.clone())
    }

    fn answer(&self) -> Response {
        error(self.status, &self.reason, self.field.as_deref(), self.detail.clone())
    }
}

impl Market {
    pub(crate) fn new(
        rules: SharedRules,
        queries: mpsc::Sender<EngineQuery>,
        publisher: Arc<dyn Publisher>,
        js: async_nats::jetstream::Context,
        data: PathBuf,
        http: &afflio_ingest::http::HttpConfig,
        metrics: Arc<afflio_ingest::metrics::Metrics>,
    ) -> Market {
        let limit =
            afflio_ingest::http::per_address_every(APPLY_EVERY, APPLY_BURST, &metrics, http.trusted_proxies.clone());
        Market {
            rules,
            queries,
            publisher,
            js,
            data,
            secret: Arc::new(PortalSecret::from_env()),
            writes: Arc::new(tokio::sync::Mutex::new(())),
            templates: Arc::new(pages::templates()),
            cookie_secure: http.redirect.cookie_secure,
            limit,
            hooks: Arc::new(std::sync::OnceLock::new()),
        }
    }

    fn rules(&self) -> Arc<afflio_engine::rules::Rules> {
        self.rules.read().map(|r| r.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The routes: `keyed` behind an API key (the brand's registry API),
    /// `open` ones check their own credentials (partner tokens, console
    /// sessions) or none (the marketplace, applying).
    pub(crate) fn routes(self) -> Extra {
        Extra {
            keyed: api::keyed(self.clone()).merge(hooks::keyed(self.clone())),
            open: api::open(self.clone()).merge(hooks::open(self.clone())).merge(pages::routes(self)),
        }
    }

    /// Reads the engine once it has applied everything the stream holds.
    async fn read<R: Send + 'static>(&self, f: impl FnOnce(&Engine) -> R + Send + 'static) -> Result<R, Refusal> {
        caught_up(&self.queries, &self.js).await.map_err(|e| Refusal::unavailable(e.to_string()))?;
        ask(&self.queries, move |e, _| f(e)).await.map_err(|e| Refusal::unavailable(e.to_string()))
    }

    /// Publishes one event (`event` without `event_id` and `ts`: they are
    /// set here), waits until the engine applied it, and answers the
    /// engine's refusal if it refused it. Returns the event id.
    async fn submit(&self, mut event: Value, event_id: Option<String>) -> Result<String, Refusal> {
        let id = event_id.unwrap_or_else(|| {
            format!("{}web:{:032x}", afflio_ingest::http::RESERVED_ID_PREFIX, rand::random::<u128>())
        });
        event["event_id"] = Value::String(id.clone());
        event["ts"] = Value::String(Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true));
        let program = event["program_id"].as_str().unwrap_or_default().to_string();
        let text = event.to_string();
        let ev = decode_event(&text).map_err(|e| {
            let status =
                if e.reason == Reason::Malformed { StatusCode::BAD_REQUEST } else { StatusCode::UNPROCESSABLE_ENTITY };
            Refusal::new(status, e.reason.as_str(), e.field.as_deref(), e.detail)
        })?;
        let subject = nats::subject(&program, ev.event_type().as_str());
        let msg_id = nats::message_id(&program, &id, fingerprint(&ev));
        drop(ev);
        for r in self.publisher.publish(vec![(subject, msg_id, Bytes::from(text))]).await {
            match r {
                Ok(_) => {}
                Err(PublishError::TooLarge { bytes, max }) => {
                    return Err(Refusal::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "malformed",
                        None,
                        format!("{bytes} bytes, over the broker's limit of {max}"),
                    ))
                }
                Err(e) => return Err(Refusal::unavailable(format!("not recorded: {e}"))),
            }
        }
        let looked = id.clone();
        let refusal = self.read(move |e| e.registry_refusal(&looked).cloned()).await?;
        match refusal {
            Some(inv) => Err(Refusal::from_engine(&inv)),
            None => Ok(id),
        }
    }

    /// Rows of a query on the store's latest consistent version (none while
    /// the store has no commit yet).
    async fn rows(&self, sql: &str) -> Vec<Value> {
        match afflio_sinks::query(&self.data, sql, afflio_sinks::OutputFormat::Json).await {
            Ok(text) => serde_json::from_str::<Vec<Value>>(&text).unwrap_or_default(),
            Err(e) => {
                let msg = e.to_string();
                // A store without its first commit has no tables yet: nothing to show.
                if !msg.contains("no commit") && !msg.contains("not found") && !msg.contains("No such file") {
                    eprintln!("afflio: marketplace read: {msg}");
                }
                Vec::new()
            }
        }
    }

    /// A partner's money as the store has it: clicks, orders, commissions by
    /// status, balance, payouts.
    async fn partner_money(&self, program: &str, partner: &str) -> Value {
        let (pr, pa) = (lit(program), lit(partner));
        let w = format!("program_id = {pr} AND partner_id = {pa}");
        let clicks = self.rows(&format!("SELECT count(*) AS clicks FROM clicks WHERE {w}")).await;
        let recent_clicks = self
            .rows(&format!(
                "SELECT CAST(ts AS VARCHAR) AS ts, link_id, sub_id FROM clicks WHERE {w} ORDER BY ts DESC LIMIT 20"
            ))
            .await;
        let orders = self
            .rows(&format!(
                "SELECT order_id, CAST(first_capture_ts AS VARCHAR) AS first_capture_ts, attribution, source, \
                 CAST(captured AS VARCHAR) AS captured, CAST(refunded AS VARCHAR) AS refunded, currency \
                 FROM orders WHERE {w} ORDER BY first_capture_ts DESC, order_id LIMIT 50"
            ))
            .await;
        let commissions = self
            .rows(&format!(
                "SELECT status, currency, count(*) AS lines, CAST(sum(net_amount) AS VARCHAR) AS net \
                 FROM lines WHERE {w} GROUP BY status, currency ORDER BY status, currency"
            ))
            .await;
        let balance = self
            .rows(&format!(
                "SELECT currency, CAST(pending AS VARCHAR) AS pending, CAST(approved AS VARCHAR) AS approved, \
                 CAST(in_flight AS VARCHAR) AS in_flight, CAST(paid AS VARCHAR) AS paid, \
                 CAST(clawback AS VARCHAR) AS clawback FROM balances WHERE {w}"
            ))
            .await;
        let payouts = self
            .rows(&format!(
                "SELECT CAST(ts AS VARCHAR) AS ts, batch_id, status, CAST(amount AS VARCHAR) AS amount, \
                 CAST(tds AS VARCHAR) AS tds, currency, provider FROM payouts WHERE {w} ORDER BY ts DESC LIMIT 50"
            ))
            .await;
        json!({
            "clicks": clicks.first().and_then(|r| r["clicks"].as_u64()).unwrap_or(0),
            "recent_clicks": recent_clicks,
            "orders": orders,
            "commissions": commissions,
            "balance": balance,
            "payouts": payouts,
        })
    }
}

/// A SQL string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A listing as the marketplace shows it: the listing's words and the
/// program's own terms (currency, rates, window, hold).
fn listing_json(rules: &afflio_engine::rules::Rules, l: &afflio_engine::ListingView) -> Option<Value> {
    let p = rules.program(&l.program_id)?;
    let mut cats: Vec<(String, String)> = p.category_rates.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
    cats.sort();
    Some(json!({
        "program_id": p.id,
        "name": l.listing.name,
        "description": l.listing.description,
        "terms": l.listing.terms,
        "category": l.listing.category,
        "listed": l.listed,
        "currency": p.currency.code(),
        "rate": p.rate.to_string(),
        "category_rates": cats.into_iter().map(|(c, r)| json!({"category": c, "rate": r})).collect::<Vec<_>>(),
        "tier_rates": p.overrides.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        "cookie_window": afflio_engine::rules::format_duration(p.window),
        "hold": afflio_engine::rules::format_duration(p.hold),
        "auto_approve_applications": p.marketplace.auto_approve,
    }))
}

fn application_json(a: &afflio_engine::registry::Application) -> Value {
    json!({
        "program_id": a.program_id,
        "application_id": a.apply.application_id,
        "partner_id": a.apply.partner_id,
        "display_name": a.apply.display_name,
        "email": a.apply.email,
        "audience": a.apply.audience,
        "channels": a.apply.channels,
        "payout_provider": a.apply.payout.as_ref().map(|p| match p.provider {
            afflio_engine::rules::PayoutProvider::Paypal => "paypal",
            afflio_engine::rules::PayoutProvider::Razorpayx => "razorpayx",
        }),
        "applied_at": a.applied_at.to_rfc3339(),
        "status": a.status.as_str(),
        "reason": a.reason,
        "decided_by": a.decided_by,
        "decided_at": a.decided_at.map(|t| t.to_rfc3339()),
    })
}

fn partner_json(v: &afflio_engine::PartnerView, application: Option<&afflio_engine::registry::Application>) -> Value {
    json!({
        "partner_id": v.partner_id,
        "program_id": v.program_id,
        "display_name": v.display_name,
        "active": v.registry.as_ref().is_none_or(|r| r.active),
        "joined_at": v.registry.as_ref().map(|r| r.joined_at.to_rfc3339()),
        "links": v.links.iter().map(|l| json!({"link_id": l.id, "url": format!("/r/{}", l.id), "destination": l.destination})).collect::<Vec<_>>(),
        "codes": v.codes.iter().map(|(c, uses)| json!({
            "code": c.normalized,
            "starts_at": c.starts_at.map(|t| t.to_rfc3339()),
            "expires_at": c.expires_at.map(|t| t.to_rfc3339()),
            "max_uses": c.max_uses,
            "uses": uses,
        })).collect::<Vec<_>>(),
        "application": application.map(application_json),
    })
}
