//! The HTTP ingest: checkout events in, tracking-link redirects out.

use std::sync::{Arc, RwLock};

use afflio_engine::rules::{KeyRole, Rules};
use afflio_engine::{check_event, fingerprint, Reason};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{SecondsFormat, Utc};
use futures::future::BoxFuture;
use serde_json::{json, value::RawValue, Value};
use subtle::ConstantTimeEq;

use crate::decode::decode_event;
use crate::metrics::Metrics;

/// The broker did not store the event (a retry with the same id is safe).
#[derive(Debug, Clone)]
pub struct PublishError(pub String);

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
    /// Whether the broker is connected (for `/readyz`).
    fn ready(&self) -> bool;
}

/// Rules shared by ingest and the engine, swapped as a whole on reload.
pub type SharedRules = Arc<RwLock<Arc<Rules>>>;

/// At most this many events in one request.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;

/// The ingest's state.
#[derive(Clone)]
pub struct Ingest {
    pub rules: SharedRules,
    pub publisher: Arc<dyn Publisher>,
    pub metrics: Arc<Metrics>,
}

/// The HTTP routes: `POST /v1/events`, `GET /r/{link_id}`, `/healthz`,
/// `/readyz`, `/metrics`. Bodies over `max_body` bytes get 413.
pub fn router(state: Ingest, max_body: usize) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/webhooks/razorpayx", post(razorpayx_webhook))
        .route("/r/{link_id}", get(redirect))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

fn rules(st: &Ingest) -> Arc<Rules> {
    st.rules.read().map(|r| r.clone()).unwrap_or_else(|p| p.into_inner().clone())
}

fn error(status: StatusCode, reason: &str, field: Option<&str>, detail: String) -> Response {
    (status, axum::Json(json!({ "status": "rejected", "reason": reason, "field": field, "detail": detail })))
        .into_response()
}

/// The program the bearer key may send for; keys compared in constant time.
#[allow(clippy::result_large_err)] // the error is the answer itself, built once per request
fn authorize(rules: &Rules, headers: &HeaderMap) -> Result<(String, KeyRole), Response> {
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
    let mut found = None;
    for k in rules.api_keys() {
        if bool::from(k.key.expose().as_bytes().ct_eq(token.as_bytes())) {
            found = Some((k.program_id.clone(), k.role));
        }
    }
    found.ok_or_else(|| unauthorized("unknown API key"))
}

/// One event's answer.
struct Answer {
    status: StatusCode,
    body: Value,
}

fn status_of(reason: Reason) -> StatusCode {
    match reason {
        Reason::Malformed => StatusCode::BAD_REQUEST,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

/// Splits a body into event texts: NDJSON, a JSON array, or one object.
#[allow(clippy::result_large_err)] // the error is the answer itself
fn split_body<'a>(headers: &HeaderMap, body: &'a str) -> Result<Vec<&'a str>, Response> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let events: Vec<&str> = if ct.contains("ndjson") || ct.contains("jsonl") {
        body.lines().filter(|l| !l.trim().is_empty()).collect()
    } else if body.trim_start().starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(body).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                Reason::Malformed.as_str(),
                None,
                format!("the body is not a JSON array of events: {e}"),
            )
        })?;
        items.into_iter().map(RawValue::get).collect()
    } else {
        vec![body]
    };
    if events.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, Reason::Malformed.as_str(), None, "the body holds no event".into()));
    }
    if events.len() > MAX_EVENTS_PER_REQUEST {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            Reason::Malformed.as_str(),
            None,
            format!("{} events in one request; at most {MAX_EVENTS_PER_REQUEST}", events.len()),
        ));
    }
    Ok(events)
}

async fn post_events(State(st): State<Ingest>, headers: HeaderMap, body: Bytes) -> Response {
    let rules = rules(&st);
    let (program, role) = match authorize(&rules, &headers) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Ok(body) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, Reason::Malformed.as_str(), None, "the body is not UTF-8".into());
    };
    let texts = match split_body(&headers, body) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let idem = headers.get("idempotency-key").map(|v| v.to_str().unwrap_or("\u{0}"));
    st.metrics.events_received.fetch_add(texts.len() as u64, std::sync::atomic::Ordering::Relaxed);

    let mut answers: Vec<Option<Answer>> = Vec::with_capacity(texts.len());
    let mut pending = Vec::new();
    let mut msgs = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let reject = |reason: Reason, field: Option<&str>, detail: String, event_id: Option<&str>| {
            st.metrics.rejected(reason);
            Some(Answer {
                status: status_of(reason),
                body: json!({ "event_id": event_id, "status": "rejected", "reason": reason.as_str(), "field": field, "detail": detail }),
            })
        };
        let ev = match decode_event(text) {
            Ok(ev) => ev,
            Err(e) => {
                answers.push(reject(e.reason, e.field.as_deref(), e.detail, e.event_id.as_deref()));
                continue;
            }
        };
        if let Some(key) = idem {
            if texts.len() == 1 && key != ev.event_id {
                answers.push(reject(
                    Reason::Malformed,
                    Some("Idempotency-Key"),
                    format!("the Idempotency-Key header {key:?} is not the event_id {:?}", ev.event_id),
                    Some(&ev.event_id),
                ));
                continue;
            }
        }
        if let Err(inv) = check_event(&rules, &ev) {
            answers.push(reject(inv.reason, Some(inv.field), inv.detail, Some(&ev.event_id)));
            continue;
        }
        if *ev.program_id != *program {
            answers.push(Some(Answer {
                status: StatusCode::FORBIDDEN,
                body: json!({ "event_id": &*ev.event_id, "status": "rejected", "reason": "forbidden", "field": "program_id",
                    "detail": format!("this API key may not send events for program {:?}", ev.program_id) }),
            }));
            continue;
        }
        // Reviews and payout items are operator events: a review key only.
        let is_review = matches!(ev.event_type(), afflio_engine::EventType::Review | afflio_engine::EventType::Payout);
        if is_review != (role == KeyRole::Review) {
            let detail = if is_review {
                "review events need a key with role = \"review\""
            } else {
                "a review key may send review events only"
            };
            answers.push(Some(Answer {
                status: StatusCode::FORBIDDEN,
                body: json!({ "event_id": &*ev.event_id, "status": "rejected", "reason": "forbidden", "field": "type", "detail": detail }),
            }));
            continue;
        }
        let subject = crate::nats::subject(&ev.program_id, ev.event_type().as_str());
        // The content is part of the message id: the broker drops exact
        // duplicates, and a conflicting reuse of the id reaches the engine,
        // which records it as idempotency_conflict.
        let msg_id = format!("{}:{:032x}", ev.event_id, fingerprint(&ev));
        pending.push((i, ev.event_id.to_string()));
        msgs.push((subject, msg_id, *text));
        answers.push(None);
    }
    // One event: one message, which the broker deduplicates by id and
    // content. Several: envelopes of many events each (the broker's cost is
    // per message); a retried identical request is one duplicate envelope,
    // and events repeated across requests are duplicates to the engine.
    let (msgs, spans) = pack(msgs, &program);
    let results = if msgs.is_empty() { Vec::new() } else { st.publisher.publish(msgs).await };
    let results: Vec<_> = spans.iter().zip(results).flat_map(|(&n, r)| std::iter::repeat_n(r, n)).collect();
    let mut unavailable = false;
    for ((i, id), r) in pending.into_iter().zip(results) {
        let m = &st.metrics;
        answers[i] = Some(match r {
            Ok(PublishOutcome::Stored) => {
                m.events_accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Answer { status: StatusCode::ACCEPTED, body: json!({ "event_id": id, "status": "accepted" }) }
            }
            Ok(PublishOutcome::Duplicate) => {
                m.events_duplicate.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Answer { status: StatusCode::ACCEPTED, body: json!({ "event_id": id, "status": "duplicate" }) }
            }
            Err(PublishError(detail)) => {
                m.publish_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                unavailable = true;
                Answer {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    body: json!({ "event_id": id, "status": "unavailable", "detail": format!("the event was not stored; retry with the same event_id: {detail}") }),
                }
            }
        });
    }
    let answers: Vec<Answer> = answers.into_iter().flatten().collect();
    let status = if unavailable {
        StatusCode::SERVICE_UNAVAILABLE
    } else if answers.len() == 1 {
        answers[0].status
    } else if answers.iter().any(|a| a.status == StatusCode::ACCEPTED) {
        StatusCode::ACCEPTED
    } else {
        answers.iter().map(|a| a.status).max_by_key(|s| s.as_u16()).unwrap_or(StatusCode::BAD_REQUEST)
    };
    let body = if texts.len() == 1 && answers.len() == 1 {
        answers.into_iter().next().map(|a| a.body).unwrap_or(Value::Null)
    } else {
        let count = |s: &str| answers.iter().filter(|a| a.body["status"] == s).count();
        json!({
            "accepted": count("accepted"),
            "duplicates": count("duplicate"),
            "rejected": count("rejected"),
            "unavailable": count("unavailable"),
            "results": answers.into_iter().map(|a| a.body).collect::<Vec<_>>(),
        })
    };
    let mut resp = (status, axum::Json(body)).into_response();
    if unavailable {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// The messages for accepted events `(subject, msg id, text)`, and how many
/// events each message carries.
fn pack(events: Vec<(String, String, &str)>, program: &str) -> (Vec<Message>, Vec<usize>) {
    if events.len() == 1 {
        let (subject, id, text) = events.into_iter().next().unwrap_or_default();
        return (vec![(subject, id, Bytes::copy_from_slice(text.as_bytes()))], vec![1]);
    }
    let subject = crate::nats::subject(program, "batch");
    let (mut msgs, mut spans) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < events.len() {
        let (mut end, mut bytes) = (start, 0);
        while end < events.len()
            && (end == start || bytes + events[end].2.len() + 16 <= crate::envelope::MAX_ENVELOPE_BYTES)
        {
            bytes += events[end].2.len() + 16;
            end += 1;
        }
        let chunk = &events[start..end];
        // Identified by its events' ids and contents: a retried request is a duplicate.
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for (_, id, _) in chunk {
            h.update(id.as_bytes());
            h.update(b"\n");
        }
        let id = format!("env:{:032x}", h.digest128());
        msgs.push((subject.clone(), id, crate::envelope::encode(chunk.iter().map(|(_, _, t)| *t))));
        spans.push(chunk.len());
        start = end;
    }
    (msgs, spans)
}

const VISITOR_COOKIE: &str = "afflio_vid";

fn visitor_from_cookie(headers: &HeaderMap) -> Option<String> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    cookies.split(';').find_map(|c| {
        let v = c.trim().strip_prefix(VISITOR_COOKIE)?.strip_prefix('=')?;
        let ok = !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        ok.then(|| v.to_string())
    })
}

async fn redirect(
    State(st): State<Ingest>,
    Path(link_id): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let rules = rules(&st);
    let Some(link) = rules.link(&link_id) else {
        return (StatusCode::NOT_FOUND, "unknown link\n").into_response();
    };
    let Some(destination) = link.destination.clone() else {
        return (StatusCode::NOT_FOUND, "this link has no destination\n").into_response();
    };
    let (visitor, new_visitor) = match visitor_from_cookie(&headers) {
        Some(v) => (v, false),
        None => (format!("{:032x}", rand::random::<u128>()), true),
    };
    let pass: Vec<&(String, String)> = params.iter().filter(|(k, _)| k == "sub_id" || k.starts_with("utm_")).collect();
    let mut location = destination.clone();
    if !pass.is_empty() {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &pass {
            q.append_pair(k, v);
        }
        location.push(if location.contains('?') { '&' } else { '?' });
        location.push_str(&q.finish());
    }
    let header_str = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).map(str::to_string);
    let ip = header_str("x-forwarded-for").and_then(|v| v.split(',').next().map(|s| s.trim().to_string()));
    let sub_id = params.iter().find(|(k, _)| k == "sub_id").map(|(_, v)| v.clone());
    let event = json!({
        "type": "click",
        "event_id": format!("clk-{:032x}", rand::random::<u128>()),
        "ts": Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
        "program_id": link.program_id,
        "link_id": link.id,
        "visitor_id": visitor,
        "ip": ip,
        "user_agent": header_str("user-agent"),
        "landing_url": destination,
        "sub_id": sub_id,
    });
    let text = event.to_string();
    if let Ok(ev) = decode_event(&text) {
        let subject = crate::nats::subject(&link.program_id, "click");
        let msg_id = format!("{}:{:032x}", ev.event_id, fingerprint(&ev));
        let fut = st.publisher.publish(vec![(subject, msg_id, Bytes::from(text.clone()))]);
        let metrics = st.metrics.clone();
        // The shopper is never kept waiting for the broker.
        tokio::spawn(async move {
            if fut.await.iter().any(Result::is_err) {
                metrics.clicks_lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    st.metrics.redirects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut resp = (StatusCode::FOUND, [(header::LOCATION, location)]).into_response();
    if new_visitor {
        let cookie = format!("{VISITOR_COOKIE}={visitor}; Max-Age=31536000; Path=/; HttpOnly; SameSite=Lax");
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

/// RazorpayX payout webhooks: verified against the secret named by
/// `payouts.razorpayx.webhook_secret_env`, then published as `payout`
/// events (a redelivery is a duplicate). 401 on a bad signature.
async fn razorpayx_webhook(State(st): State<Ingest>, headers: HeaderMap, body: Bytes) -> Response {
    let rules = rules(&st);
    let secret = rules
        .payouts()
        .razorpayx
        .as_ref()
        .and_then(|r| r.webhook_secret_env.as_deref())
        .and_then(|var| std::env::var(var).ok());
    let Some(secret) = secret else {
        return error(
            StatusCode::NOT_FOUND,
            "not_configured",
            None,
            "no payouts.razorpayx.webhook_secret_env (or it is not set)".into(),
        );
    };
    let signature = headers.get("x-razorpay-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !crate::webhooks::verify_razorpayx_signature(&body, signature, &secret) {
        return error(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            Some("X-Razorpay-Signature"),
            "the signature does not verify".into(),
        );
    }
    let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let text = match crate::webhooks::razorpayx_payout_event(&body, &ts) {
        Ok(Some(t)) => t,
        Ok(None) => return (StatusCode::OK, axum::Json(json!({ "status": "ignored" }))).into_response(),
        Err(detail) => return error(StatusCode::BAD_REQUEST, Reason::Malformed.as_str(), None, detail),
    };
    let ev = match decode_event(&text) {
        Ok(ev) => ev,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.reason.as_str(), e.field.as_deref(), e.detail),
    };
    let subject = crate::nats::subject(&ev.program_id, ev.event_type().as_str());
    // The id alone (not the content: the receipt time differs on a redelivery).
    let msg = vec![(subject, ev.event_id.to_string(), Bytes::copy_from_slice(text.as_bytes()))];
    match st.publisher.publish(msg).await.into_iter().next() {
        Some(Ok(PublishOutcome::Stored)) => {
            (StatusCode::OK, axum::Json(json!({ "status": "accepted" }))).into_response()
        }
        Some(Ok(PublishOutcome::Duplicate)) => {
            (StatusCode::OK, axum::Json(json!({ "status": "duplicate" }))).into_response()
        }
        _ => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", None, "retry later".into());
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

async fn readyz(State(st): State<Ingest>) -> Response {
    if st.publisher.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], "broker unavailable\n").into_response()
    }
}

async fn metrics(State(st): State<Ingest>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render()).into_response()
}
