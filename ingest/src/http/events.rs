//! `POST /v1/events`: events in, checked, stored
//! by the broker before they are answered 202.

use std::sync::atomic::Ordering;

use afflio_engine::rules::KeyRole;
use afflio_engine::{check_event, fingerprint, EventType, Reason};
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use serde_json::{json, value::RawValue, Value};

use super::{error, rules, AppState, Message, Principal, PublishError, PublishOutcome, MAX_EVENTS_PER_REQUEST};
use crate::decode::decode_event;

/// Event ids the service derives itself start with this: a client may not
/// use them (so no one can take the id of a webhook's event before it comes).
pub const RESERVED_ID_PREFIX: &str = "afflio:";

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

/// What a role may send.
fn allowed(role: KeyRole, ty: EventType) -> Result<(), &'static str> {
    match (role, ty) {
        (
            KeyRole::Ingest,
            EventType::Click
            | EventType::Capture
            | EventType::Refund
            | EventType::Chargeback
            | EventType::Lead
            | EventType::LeadStage
            | EventType::SubscriptionPayment
            | EventType::SubscriptionCancel,
        ) => Ok(()),
        (KeyRole::Review, EventType::Review) => Ok(()),
        (KeyRole::Finance, EventType::Payout) => Ok(()),
        (KeyRole::Brand, t) if t.is_registry() => Ok(()),
        (KeyRole::Ingest, _) => Err(
            "an ingest key sends checkout events only (click, capture, refund, chargeback, lead, lead_stage, subscription_payment, subscription_cancel)",
        ),
        (KeyRole::Review, _) => Err("a review key sends review events only"),
        (KeyRole::Finance, _) => Err("a finance key sends payout events only"),
        (KeyRole::Brand, _) => Err("a brand key sends registry events only"),
    }
}

/// The event text with its `ts` set to the server's time (reviews and payout
/// state changes take effect when the service receives them, not when the
/// client says).
fn stamped(text: &str, now: &str) -> Option<String> {
    let mut v: serde_json::Map<String, Value> = serde_json::from_str(text).ok()?;
    v.insert("ts".into(), Value::String(now.to_string()));
    serde_json::to_string(&v).ok()
}

pub(super) async fn post_events(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let rules = rules(&st.ingest);
    let Ok(body) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, Reason::Malformed.as_str(), None, "the body is not UTF-8".into());
    };
    let texts = match split_body(&headers, body) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let idem = headers.get("idempotency-key").map(|v| v.to_str().unwrap_or("\u{0}"));
    let m = &st.ingest.metrics;
    m.events_received.fetch_add(texts.len() as u64, Ordering::Relaxed);
    let now = Utc::now();
    let now_text = now.to_rfc3339_opts(SecondsFormat::Micros, true);
    let skew = rules.engine().max_future_skew;

    let mut answers: Vec<Option<Answer>> = Vec::with_capacity(texts.len());
    let mut pending = Vec::new();
    let mut msgs: Vec<(String, String, std::borrow::Cow<'_, str>)> = Vec::new();
    for text in texts.iter() {
        let reject = |reason: &str, status: StatusCode, field: Option<&str>, detail: String, event_id: Option<&str>| {
            if let Some(r) = Reason::ALL.iter().find(|r| r.as_str() == reason) {
                m.rejected(*r);
            }
            Some(Answer {
                status,
                body: json!({ "event_id": event_id, "status": "rejected", "reason": reason, "field": field, "detail": detail }),
            })
        };
        let ev = match decode_event(text) {
            Ok(ev) => ev,
            Err(e) => {
                let (r, f) = (e.reason.as_str(), e.field.as_deref());
                answers.push(reject(r, status_of(e.reason), f, e.detail, e.event_id.as_deref()));
                continue;
            }
        };
        let id = Some(&*ev.event_id);
        // Who may send this, before anything about the event is looked at:
        // an answer never tells about another program.
        if *ev.program_id != *who.program_id {
            let detail = format!("this API key may not send events for program {:?}", ev.program_id);
            answers.push(reject("forbidden", StatusCode::FORBIDDEN, Some("program_id"), detail, id));
            continue;
        }
        if let Err(detail) = allowed(who.role, ev.event_type()) {
            answers.push(reject("forbidden", StatusCode::FORBIDDEN, Some("type"), detail.to_string(), id));
            continue;
        }
        if ev.event_id.starts_with(RESERVED_ID_PREFIX) {
            let detail = format!("event ids starting with {RESERVED_ID_PREFIX:?} are the service's own");
            answers.push(reject(Reason::Malformed.as_str(), StatusCode::BAD_REQUEST, Some("event_id"), detail, id));
            continue;
        }
        if let Some(key) = idem {
            if texts.len() == 1 && key != ev.event_id {
                let detail = format!("the Idempotency-Key header {key:?} is not the event_id {:?}", ev.event_id);
                let r = Reason::Malformed.as_str();
                answers.push(reject(r, StatusCode::BAD_REQUEST, Some("Idempotency-Key"), detail, id));
                continue;
            }
        }
        let operator =
            matches!(ev.event_type(), EventType::Review | EventType::Payout) || ev.event_type().is_registry();
        if !operator && ev.ts > now + skew {
            let detail = format!(
                "ts {} is more than max_future_skew ({}) ahead of the server's clock {now_text}",
                ev.ts.to_rfc3339(),
                afflio_engine::rules::format_duration(skew)
            );
            answers.push(reject(
                Reason::FutureEvent.as_str(),
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("ts"),
                detail,
                id,
            ));
            continue;
        }
        if let Err(inv) = check_event(&rules, &ev) {
            // A link the registry created is not in the rules file.
            let registered = match &ev.body {
                afflio_engine::Body::Click(c) if inv.reason == Reason::UnknownLink => {
                    st.ingest.links.get(&c.link_id).is_some_and(|l| *l.program_id == *ev.program_id)
                }
                _ => false,
            };
            if registered {
                let subject = crate::nats::subject(&ev.program_id, ev.event_type().as_str());
                let msg_id = crate::nats::message_id(&ev.program_id, &ev.event_id, fingerprint(&ev));
                pending.push((answers.len(), ev.event_id.to_string()));
                msgs.push((subject, msg_id, (*text).into()));
                answers.push(None);
                continue;
            }
            answers.push(reject(inv.reason.as_str(), status_of(inv.reason), Some(&inv.field), inv.detail, id));
            continue;
        }
        let subject = crate::nats::subject(&ev.program_id, ev.event_type().as_str());
        // The content is part of the message id: the broker drops exact
        // duplicates, and a conflicting reuse of the id reaches the engine,
        // which records it as idempotency_conflict.
        let msg_id = crate::nats::message_id(&ev.program_id, &ev.event_id, fingerprint(&ev));
        let text: std::borrow::Cow<'_, str> = if operator {
            match stamped(text, &now_text) {
                Some(t) => t.into(),
                None => (*text).into(),
            }
        } else {
            (*text).into()
        };
        pending.push((answers.len(), ev.event_id.to_string()));
        msgs.push((subject, msg_id, text));
        answers.push(None);
    }
    // One event: one message, which the broker deduplicates by id and
    // content. Several: envelopes of many events each (the broker's cost is
    // per message); a retried identical request is one duplicate envelope,
    // and events repeated across requests are duplicates to the engine.
    let (msgs, spans) = pack(&msgs, &who.program_id);
    let results = if msgs.is_empty() { Vec::new() } else { st.ingest.publisher.publish(msgs).await };
    let results: Vec<_> = spans.iter().zip(results).flat_map(|(&n, r)| std::iter::repeat_n(r, n)).collect();
    let mut retry = false;
    for ((i, id), r) in pending.into_iter().zip(results) {
        answers[i] = Some(match r {
            Ok(PublishOutcome::Stored) => {
                m.events_accepted.fetch_add(1, Ordering::Relaxed);
                Answer { status: StatusCode::ACCEPTED, body: json!({ "event_id": id, "status": "accepted" }) }
            }
            Ok(PublishOutcome::Duplicate) => {
                m.events_duplicate.fetch_add(1, Ordering::Relaxed);
                Answer { status: StatusCode::ACCEPTED, body: json!({ "event_id": id, "status": "duplicate" }) }
            }
            Err(e @ PublishError::TooLarge { .. }) => Answer {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                body: json!({ "event_id": id, "status": "rejected", "reason": "too_large", "field": null,
                    "detail": format!("the event is {e}: it can never be stored as is") }),
            },
            Err(PublishError::Unavailable(detail)) => {
                m.publish_failures.fetch_add(1, Ordering::Relaxed);
                retry = true;
                Answer {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    body: json!({ "event_id": id, "status": "unavailable",
                        "detail": format!("not stored: {detail}; retry with the same event_id") }),
                }
            }
            Err(PublishError::Unknown(detail)) => {
                m.publish_failures.fetch_add(1, Ordering::Relaxed);
                retry = true;
                Answer {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    body: json!({ "event_id": id, "status": "unknown",
                        "detail": format!("{detail}: the event may or may not be stored; retrying with the same event_id is safe (a duplicate is recognised)") }),
                }
            }
        });
    }
    let answers: Vec<Answer> = answers.into_iter().flatten().collect();
    let status = if retry {
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
            "unavailable": count("unavailable") + count("unknown"),
            "results": answers.into_iter().map(|a| a.body).collect::<Vec<_>>(),
        })
    };
    let mut resp = (status, axum::Json(body)).into_response();
    if retry {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// The messages for accepted events `(subject, msg id, text)`, and how many
/// events each message carries.
fn pack(events: &[(String, String, std::borrow::Cow<'_, str>)], program: &str) -> (Vec<Message>, Vec<usize>) {
    if events.len() == 1 {
        let (subject, id, text) = &events[0];
        return (vec![(subject.clone(), id.clone(), Bytes::copy_from_slice(text.as_bytes()))], vec![1]);
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
        let id = format!("{program}:env:{:032x}", h.digest128());
        msgs.push((subject.clone(), id, crate::envelope::encode(chunk.iter().map(|(_, _, t)| &**t))));
        spans.push(chunk.len());
        start = end;
    }
    (msgs, spans)
}
