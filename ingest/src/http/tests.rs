//! The HTTP ingest against a fake broker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use afflio_engine::rules::Rules;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::http::{router, HttpConfig, Ingest, Message, PublishError, PublishOutcome, Publisher};
use crate::metrics::Metrics;

const RULES: &str = r#"
[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
[[programs]]
id = "other"
currency = "USD"
rate = "10%"
[[partners]]
id = "alice"
program_id = "acme"
[[links]]
id = "alice-summer"
partner_id = "alice"
destination = "https://shop.example.com/summer?x=1"
[[api_keys]]
program_id = "acme"
key = "acme-key-0123456789"
[[api_keys]]
program_id = "other"
key = "other-key-0123456789"
[[api_keys]]
program_id = "acme"
key = "acme-reviewer-0123456789"
role = "review"
[[api_keys]]
program_id = "acme"
key = "acme-finance-0123456789"
role = "finance"
[[api_keys]]
program_id = "acme"
key = "acme-brand-0123456789"
role = "brand"
[[links]]
id = "other-link"
partner_id = "olga"
[[partners]]
id = "olga"
program_id = "other"
[payouts.razorpayx]
key_id_env = "AFFLIO_HTTP_TEST_UNUSED"
key_secret_env = "AFFLIO_HTTP_TEST_UNUSED"
webhook_secret_env = "AFFLIO_HTTP_TEST_WEBHOOK_SECRET"
account_number = "2323230000000001"
"#;

/// Stores message ids; `down` makes it fail like a broker that is gone,
/// `lost` like one that took a message and never confirmed it.
#[derive(Default)]
struct FakeBroker {
    stored: Mutex<Vec<(String, String, String)>>,
    down: AtomicBool,
    lost: AtomicBool,
    /// The broker's limit per message (0: none).
    max_payload: std::sync::atomic::AtomicUsize,
}

impl Publisher for Arc<FakeBroker> {
    fn publish(&self, msgs: Vec<Message>) -> BoxFuture<'static, Vec<Result<PublishOutcome, PublishError>>> {
        let me = self.clone();
        Box::pin(async move {
            msgs.into_iter()
                .map(|(subject, msg_id, payload)| {
                    if me.down.load(Ordering::SeqCst) {
                        return Err(PublishError::Unavailable("not connected".into()));
                    }
                    let max = me.max_payload.load(Ordering::SeqCst);
                    if max > 0 && payload.len() > max {
                        return Err(PublishError::TooLarge { bytes: payload.len(), max });
                    }
                    if me.lost.load(Ordering::SeqCst) {
                        return Err(PublishError::Unknown("no acknowledgement within 5s".into()));
                    }
                    let mut s = me.stored.lock().unwrap();
                    if s.iter().any(|(_, id, _)| *id == msg_id) {
                        return Ok(PublishOutcome::Duplicate);
                    }
                    s.push((subject, msg_id, String::from_utf8(payload.to_vec()).unwrap()));
                    Ok(PublishOutcome::Stored)
                })
                .collect()
        })
    }

    fn ready(&self) -> Result<(), String> {
        if self.down.load(Ordering::SeqCst) {
            Err("not connected to the broker".into())
        } else {
            Ok(())
        }
    }
}

fn app(broker: &Arc<FakeBroker>) -> axum::Router {
    app_with(broker, HttpConfig { max_body: 64 * 1024, ..HttpConfig::default() })
}

fn app_with(broker: &Arc<FakeBroker>, config: HttpConfig) -> axum::Router {
    let rules = Arc::new(RwLock::new(Arc::new(Rules::parse("t.toml", RULES).unwrap())));
    router(
        Ingest {
            rules,
            publisher: Arc::new(broker.clone()),
            metrics: Arc::new(Metrics::default()),
            links: Default::default(),
        },
        config,
    )
}

const CAPTURE: &str = r#"{"type":"capture","event_id":"cap-1","ts":"2026-11-10T12:00:00Z","program_id":"acme","order_id":"o1","amount":"10.00","currency":"USD"}"#;

async fn send(app: &axum::Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
}

fn post(key: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post("/v1/events").header(header::CONTENT_TYPE, "application/json");
    if let Some(k) = key {
        b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    b.body(Body::from(body.to_string())).unwrap()
}

/// Sends `body` with `key` and checks the status and the fields of the JSON answer.
async fn check(
    app: &axum::Router,
    key: Option<&str>,
    body: &str,
    status: StatusCode,
    expect: &[(&str, &str)],
) -> Value {
    let (got, _, text) = send(app, post(key, body)).await;
    assert_eq!(got, status, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    for (k, want) in expect {
        let pointer = if k.starts_with('/') { k.to_string() } else { format!("/{k}") };
        assert_eq!(v.pointer(&pointer).and_then(Value::as_str).unwrap_or("<missing>"), *want, "{k} in {text}");
    }
    v
}

#[tokio::test]
async fn events_are_authenticated_validated_and_stored_once() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    check(&app, None, CAPTURE, StatusCode::UNAUTHORIZED, &[("reason", "unauthorized"), ("field", "Authorization")])
        .await;
    check(&app, Some("wrong-key-0123456789"), CAPTURE, StatusCode::UNAUTHORIZED, &[("reason", "unauthorized")]).await;
    check(
        &app,
        Some("other-key-0123456789"),
        CAPTURE,
        StatusCode::FORBIDDEN,
        &[("reason", "forbidden"), ("field", "program_id")],
    )
    .await;
    check(
        &app,
        Some("acme-key-0123456789"),
        CAPTURE,
        StatusCode::ACCEPTED,
        &[("status", "accepted"), ("event_id", "cap-1")],
    )
    .await;
    // A retry is safe: the broker has it.
    check(&app, Some("acme-key-0123456789"), CAPTURE, StatusCode::ACCEPTED, &[("status", "duplicate")]).await;
    // Same id, other content: the broker stores it, the engine will call it a conflict.
    let conflict = CAPTURE.replace("10.00", "11.00");
    check(&app, Some("acme-key-0123456789"), &conflict, StatusCode::ACCEPTED, &[("status", "accepted")]).await;
    let stored = broker.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].0, "afflio.events.acme.capture");
    assert!(stored[0].1.starts_with("acme:cap-1:"), "{}", stored[0].1);
    assert_eq!(stored[0].2, CAPTURE, "the raw text is what travels");
}

#[tokio::test]
async fn bad_events_get_4xx_naming_reason_and_field() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    let key = Some("acme-key-0123456789");
    check(&app, key, "{not json", StatusCode::BAD_REQUEST, &[("reason", "malformed")]).await;
    check(
        &app,
        key,
        &CAPTURE.replace("\"10.00\"", "\"ten\""),
        StatusCode::UNPROCESSABLE_ENTITY,
        &[("reason", "invalid_amount"), ("field", "amount")],
    )
    .await;
    check(
        &app,
        key,
        &CAPTURE.replace("USD", "EUR"),
        StatusCode::UNPROCESSABLE_ENTITY,
        &[("reason", "currency_mismatch"), ("field", "currency")],
    )
    .await;
    // Another program than the key's: forbidden before anything else is checked.
    check(
        &app,
        key,
        &CAPTURE.replace("\"acme\"", "\"nope\""),
        StatusCode::FORBIDDEN,
        &[("reason", "forbidden"), ("field", "program_id")],
    )
    .await;
    check(
        &app,
        key,
        &CAPTURE.replace(",\"order_id\":\"o1\"", ""),
        StatusCode::BAD_REQUEST,
        &[("reason", "malformed"), ("field", "order_id")],
    )
    .await;
    let (status, _, text) = send(
        &app,
        Request::post("/v1/events")
            .header(header::AUTHORIZATION, "Bearer acme-key-0123456789")
            .header("Idempotency-Key", "other")
            .body(Body::from(CAPTURE))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("Idempotency-Key"), "{text}");
    let big = format!("[{}]", vec![CAPTURE; 1000].join(","));
    let (status, _, _) = send(&app, post(key, &big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(broker.stored.lock().unwrap().is_empty(), "nothing invalid reaches the broker");
}

#[tokio::test]
async fn batches_answer_per_event() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    let second = CAPTURE.replace("cap-1", "cap-2").replace("USD", "EUR");
    let v = check(
        &app,
        Some("acme-key-0123456789"),
        &format!("[{CAPTURE},{second}]"),
        StatusCode::ACCEPTED,
        &[("/results/0/status", "accepted"), ("/results/1/reason", "currency_mismatch")],
    )
    .await;
    assert_eq!(v["accepted"], 1);
    assert_eq!(v["rejected"], 1);
    let ndjson = format!("{}\n{}\n", CAPTURE.replace("cap-1", "cap-3"), CAPTURE.replace("cap-1", "cap-4"));
    let req = Request::post("/v1/events")
        .header(header::AUTHORIZATION, "Bearer acme-key-0123456789")
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from(ndjson))
        .unwrap();
    let (status, _, text) = send(&app, req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    // One accepted event: its own message; several: one envelope.
    let stored = broker.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 2);
    assert!(stored[1].0.ends_with(".batch") && stored[1].1.starts_with("acme:env:"), "{:?}", stored[1]);
    let texts = crate::envelope::decode(stored[1].2.as_bytes()).unwrap();
    assert_eq!(texts.len(), 2);
    assert!(texts[0].contains("cap-3") && texts[1].contains("cap-4"));
}

#[tokio::test]
async fn a_broker_outage_is_503_with_retry_after_never_202() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    broker.down.store(true, Ordering::SeqCst);
    let (status, headers, text) = send(&app, post(Some("acme-key-0123456789"), CAPTURE)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert_eq!(headers.get(header::RETRY_AFTER).unwrap(), "1");
    let (status, _, _) = send(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    broker.down.store(false, Ordering::SeqCst);
    check(&app, Some("acme-key-0123456789"), CAPTURE, StatusCode::ACCEPTED, &[("status", "accepted")]).await;
    let (_, _, metrics) = send(&app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert!(metrics.contains("afflio_publish_failures_total 1"), "{metrics}");
    assert!(metrics.contains("afflio_events_accepted_total 1"), "{metrics}");
}

#[tokio::test]
async fn tracking_links_redirect_set_a_visitor_and_publish_the_click() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    let (status, headers, _) =
        send(&app, Request::get("/r/alice-summer?sub_id=story&utm_source=ig&other=no").body(Body::empty()).unwrap())
            .await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(
        headers.get(header::LOCATION).unwrap(),
        "https://shop.example.com/summer?x=1&sub_id=story&utm_source=ig"
    );
    let cookie = headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().to_string();
    assert!(cookie.starts_with("afflio_vid=") && cookie.contains("HttpOnly"), "{cookie}");
    let vid = cookie.trim_start_matches("afflio_vid=").split(';').next().unwrap().to_string();
    // A returning visitor keeps the id and gets no new cookie.
    let req = Request::get("/r/alice-summer")
        .header(header::COOKIE, format!("a=b; afflio_vid={vid}"))
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = send(&app, req).await;
    assert_eq!(status, StatusCode::FOUND, "a repeat is redirected");
    assert!(headers.get(header::SET_COOKIE).is_none());
    let (status, _, _) = send(&app, Request::get("/r/nope").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The click is published in the background; the same visitor on the
    // same link again within 30s counts once.
    for _ in 0..100 {
        if !broker.stored.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let stored = broker.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 1);
    let (_, _, metrics) = send(&app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert!(metrics.contains("afflio_redirect_repeats_total 1"), "{metrics}");
    for (subject, _, payload) in &stored {
        assert_eq!(subject, "afflio.events.acme.click");
        let ev = crate::decode_event(payload).unwrap();
        assert!(
            matches!(&ev.body, afflio_engine::Body::Click(c) if c.visitor_id == vid && c.link_id == "alice-summer")
        );
    }
}

#[tokio::test]
async fn reviews_need_a_review_key_and_review_keys_send_nothing_else() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    let review = r#"{"type":"review","event_id":"rv-1","ts":"2026-12-20T00:00:00Z","program_id":"acme","order_id":"o1","decision":"reject","reason":"own account","reviewer":"ana"}"#;
    let ingest = Some("acme-key-0123456789");
    let reviewer = Some("acme-reviewer-0123456789");
    check(&app, ingest, review, StatusCode::FORBIDDEN, &[("reason", "forbidden"), ("field", "type")]).await;
    check(&app, reviewer, CAPTURE, StatusCode::FORBIDDEN, &[("reason", "forbidden"), ("field", "type")]).await;
    let no_reason = review.replace(r#""reason":"own account","#, "");
    check(&app, reviewer, &no_reason, StatusCode::BAD_REQUEST, &[("reason", "malformed"), ("field", "reason")]).await;
    check(&app, reviewer, review, StatusCode::ACCEPTED, &[("status", "accepted")]).await;
    let stored = broker.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, "afflio.events.acme.review");
}

#[tokio::test]
async fn registry_events_need_a_brand_key_and_are_stamped_with_the_servers_time() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    let link = r#"{"type":"link_created","event_id":"l-1","ts":"2020-01-01T00:00:00Z","program_id":"acme","data":{"link_id":"alice-2","partner_id":"alice"}}"#;
    let brand = Some("acme-brand-0123456789");
    check(
        &app,
        Some("acme-key-0123456789"),
        link,
        StatusCode::FORBIDDEN,
        &[("reason", "forbidden"), ("field", "type")],
    )
    .await;
    check(&app, brand, CAPTURE, StatusCode::FORBIDDEN, &[("reason", "forbidden"), ("field", "type")]).await;
    let unknown_field = link.replace(r#""partner_id":"alice""#, r#""partner_id":"alice","colour":"red""#);
    check(&app, brand, &unknown_field, StatusCode::BAD_REQUEST, &[("reason", "malformed"), ("field", "data.colour")])
        .await;
    let no_data = r#"{"type":"link_created","event_id":"l-2","ts":"2020-01-01T00:00:00Z","program_id":"acme"}"#;
    check(&app, brand, no_data, StatusCode::BAD_REQUEST, &[("reason", "malformed"), ("field", "data")]).await;
    check(&app, brand, link, StatusCode::ACCEPTED, &[("status", "accepted")]).await;
    let stored = broker.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, "afflio.events.acme.link_created");
    let ev = crate::decode_event(&stored[0].2).unwrap();
    assert!(ev.ts.timestamp() > 1_700_000_000, "the server's time, not the client's 2020: {}", ev.ts);
}

// ---- Attacks, written as the attacker would send them ----

const ACME: Option<&str> = Some("acme-key-0123456789");

#[tokio::test]
async fn attack_far_future_ts_is_refused_at_the_door() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    let far = CAPTURE.replace("2026-11-10T12:00:00Z", "9999-12-31T00:00:00Z");
    check(&app, ACME, &far, StatusCode::UNPROCESSABLE_ENTITY, &[("reason", "future_event"), ("field", "ts")]).await;
    // Within the skew (5 minutes) it passes.
    let soon = (chrono::Utc::now() + chrono::Duration::minutes(4)).to_rfc3339();
    let near = CAPTURE.replace("2026-11-10T12:00:00Z", &soon);
    check(&app, ACME, &near, StatusCode::ACCEPTED, &[("status", "accepted")]).await;
    assert_eq!(broker.stored.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn attack_reserved_ids_cannot_be_taken_by_a_client() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    let squat = CAPTURE.replace("\"cap-1\"", "\"afflio:payout:b1:alice:paid\"");
    check(&app, ACME, &squat, StatusCode::BAD_REQUEST, &[("reason", "malformed"), ("field", "event_id")]).await;
    assert!(broker.stored.lock().unwrap().is_empty());
}

/// A body that never ends: a handler that waited for it would hang.
fn endless_body() -> Body {
    let (tx, rx) = futures::channel::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
    // The sender is leaked on purpose: the stream never ends.
    std::mem::forget(tx);
    Body::from_stream(rx)
}

#[tokio::test]
async fn attack_unauthenticated_bodies_are_never_read() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    let req = Request::post("/v1/events").body(endless_body()).unwrap();
    let answered = tokio::time::timeout(std::time::Duration::from_secs(2), send(&app, req)).await;
    let (status, _, _) = answered.expect("answered without waiting for the body");
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn attack_a_stalled_body_times_out() {
    let broker = Arc::new(FakeBroker::default());
    let config = HttpConfig { request_timeout: std::time::Duration::from_millis(200), ..HttpConfig::default() };
    let app = app_with(&broker, config);
    let req = Request::post("/v1/events")
        .header(header::AUTHORIZATION, "Bearer acme-key-0123456789")
        .body(endless_body())
        .unwrap();
    let (status, headers, text) =
        tokio::time::timeout(std::time::Duration::from_secs(5), send(&app, req)).await.expect("answered");
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{text}");
    assert!(headers.get(header::RETRY_AFTER).is_some());
}

#[tokio::test]
async fn attack_a_flood_from_one_key_or_one_address_is_429_with_retry_after() {
    let broker = Arc::new(FakeBroker::default());
    let config = HttpConfig { key_rate: (1, 3), ip_rate: (1, 5), ..HttpConfig::default() };
    let app = app_with(&broker, config);
    let mut statuses = Vec::new();
    for i in 0..4 {
        let body = CAPTURE.replace("cap-1", &format!("cap-{i}")).replace("\"o1\"", &format!("\"o{i}\""));
        let (status, headers, text) = send(&app, post(ACME, &body)).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert!(headers.get(header::RETRY_AFTER).is_some(), "{text}");
            assert!(text.contains("rate_limited"), "{text}");
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses,
        [StatusCode::ACCEPTED, StatusCode::ACCEPTED, StatusCode::ACCEPTED, StatusCode::TOO_MANY_REQUESTS]
    );
    // Another key still gets in; the address limit (burst 5) is reached next.
    let other = CAPTURE.replace("acme", "other").replace("cap-1", "o-cap");
    let (status, _, _) = send(&app, post(Some("other-key-0123456789"), &other)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _, _) = send(&app, Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "the same address, the sixth request");
}

#[tokio::test]
async fn attack_crlf_in_an_event_id_is_400_naming_the_field() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    let evil = CAPTURE.replace("\"cap-1\"", "\"cap-1\\r\\nX-Evil: 1\"");
    check(&app, ACME, &evil, StatusCode::BAD_REQUEST, &[("reason", "malformed"), ("field", "event_id")]).await;
    let batch = format!("[{CAPTURE},{}]", evil.replace("cap-1", "cap-2"));
    let v = check(&app, ACME, &batch, StatusCode::ACCEPTED, &[("/results/1/field", "event_id")]).await;
    assert_eq!(v["accepted"], 1);
}

#[tokio::test]
async fn attack_an_event_over_the_brokers_limit_is_413_not_503() {
    let broker = Arc::new(FakeBroker::default());
    broker.max_payload.store(100, Ordering::SeqCst);
    let app = app(&broker);
    let (status, headers, text) = send(&app, post(ACME, CAPTURE)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert!(headers.get(header::RETRY_AFTER).is_none(), "not to be retried as is");
    assert!(text.contains("too_large"), "{text}");
}

#[tokio::test]
async fn attack_answers_never_tell_about_another_program() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    // Another program's event with a wrong currency: forbidden, its currency unsaid.
    let theirs = CAPTURE.replace("\"acme\"", "\"other\"").replace("USD", "JPY");
    let (status, _, text) = send(&app, post(ACME, &theirs)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(!text.contains("USD") && !text.contains("currency"), "{text}");
    // Another program's link: unknown, its program unsaid.
    let click = r#"{"type":"click","event_id":"k1","ts":"2026-11-10T12:00:00Z","program_id":"acme","link_id":"other-link","visitor_id":"v"}"#;
    let (status, _, text) = send(&app, post(ACME, click)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(text.contains("unknown_link") && !text.contains("\"other\"") && !text.contains("olga"), "{text}");
}

#[tokio::test]
async fn attack_a_review_keys_time_is_the_servers_and_roles_are_apart() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    let review = r#"{"type":"review","event_id":"rv-9","ts":"2099-01-01T00:00:00Z","program_id":"acme","order_id":"o1","decision":"approve","reviewer":"ana"}"#;
    check(&app, Some("acme-reviewer-0123456789"), review, StatusCode::ACCEPTED, &[("status", "accepted")]).await;
    let stored = broker.stored.lock().unwrap().clone();
    let ev = crate::decode_event(&stored[0].2).unwrap();
    assert!((chrono::Utc::now() - ev.ts).num_seconds().abs() < 60, "stamped with the server's time: {}", ev.ts);
    // A review key cannot record payouts; a finance key can, and nothing else.
    let payout = r#"{"type":"payout","event_id":"p1","ts":"2026-11-10T12:00:00Z","program_id":"acme","batch_id":"b1","partner_id":"alice","currency":"USD","amount":"10","status":"planned"}"#;
    check(&app, Some("acme-reviewer-0123456789"), payout, StatusCode::FORBIDDEN, &[("field", "type")]).await;
    check(&app, Some("acme-finance-0123456789"), review, StatusCode::FORBIDDEN, &[("field", "type")]).await;
    check(&app, Some("acme-finance-0123456789"), CAPTURE, StatusCode::FORBIDDEN, &[("field", "type")]).await;
    check(&app, Some("acme-finance-0123456789"), payout, StatusCode::ACCEPTED, &[("status", "accepted")]).await;
}

#[tokio::test]
async fn attack_a_503_says_whether_anything_was_stored() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    broker.down.store(true, Ordering::SeqCst);
    check(&app, ACME, CAPTURE, StatusCode::SERVICE_UNAVAILABLE, &[("status", "unavailable")]).await;
    broker.down.store(false, Ordering::SeqCst);
    broker.lost.store(true, Ordering::SeqCst);
    let v = check(&app, ACME, CAPTURE, StatusCode::SERVICE_UNAVAILABLE, &[("status", "unknown")]).await;
    assert!(v["detail"].as_str().unwrap().contains("safe"), "{v}");
}

fn redirect_req(ua: &str, cookie: Option<&str>) -> Request<Body> {
    let mut b = Request::get("/r/alice-summer").header(header::USER_AGENT, ua);
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, format!("afflio_vid={c}"));
    }
    b.body(Body::empty()).unwrap()
}

async fn clicks_stored(broker: &Arc<FakeBroker>) -> Vec<String> {
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    broker.stored.lock().unwrap().iter().map(|(_, _, p)| p.clone()).collect()
}

#[tokio::test]
async fn attack_the_redirect_counts_only_shoppers_clicks() {
    let broker = Arc::new(FakeBroker::default());
    let config = HttpConfig {
        trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
        redirect: crate::http::RedirectConfig {
            cookie_secure: true,
            cookie_domain: Some("shop.example.com".into()),
            bot_patterns: vec!["^curl/".into()],
            ..Default::default()
        },
        ..HttpConfig::default()
    };
    let app = app_with(&broker, config);
    let browser = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36";
    // HEAD is redirected, never counted.
    let head = Request::head("/r/alice-summer").header(header::USER_AGENT, browser).body(Body::empty()).unwrap();
    assert_eq!(send(&app, head).await.0, StatusCode::FOUND);
    // Known bots and link-preview fetchers, and a configured pattern: redirected, not counted.
    for ua in [
        "Googlebot/2.1 (+http://www.google.com/bot.html)",
        "facebookexternalhit/1.1",
        "Slackbot-LinkExpanding 1.0",
        "curl/8.0",
    ] {
        assert_eq!(send(&app, redirect_req(ua, None)).await.0, StatusCode::FOUND, "{ua}");
    }
    assert!(clicks_stored(&broker).await.is_empty(), "no click recorded for HEAD and bots");
    // A shopper: counted once, and again-within-the-interval not.
    let (_, headers, _) = send(&app, redirect_req(browser, Some("shopper1"))).await;
    assert!(headers.get(header::SET_COOKIE).is_none());
    send(&app, redirect_req(browser, Some("shopper1"))).await;
    assert_eq!(clicks_stored(&broker).await.len(), 1);
    // A new visitor's cookie carries Secure and the Domain.
    let (_, headers, _) = send(&app, redirect_req(browser, None)).await;
    let cookie = headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().to_string();
    assert!(cookie.contains("; Secure") && cookie.contains("; Domain=shop.example.com"), "{cookie}");
}

#[tokio::test]
async fn attack_forwarded_for_is_believed_only_from_trusted_proxies() {
    let broker = Arc::new(FakeBroker::default());
    let config = HttpConfig { trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()], ..HttpConfig::default() };
    let app = app_with(&broker, config);
    let from = |peer: &str, visitor: &str| {
        let mut req = Request::get("/r/alice-summer")
            .header(header::USER_AGENT, "Mozilla/5.0 Firefox/120.0")
            .header(header::COOKIE, format!("afflio_vid={visitor}"))
            .header("X-Forwarded-For", "203.0.113.9")
            .body(Body::empty())
            .unwrap();
        let addr: std::net::SocketAddr = peer.parse().unwrap();
        req.extensions_mut().insert(axum::extract::ConnectInfo(addr));
        req
    };
    send(&app, from("198.51.100.7:5000", "v-direct")).await;
    send(&app, from("10.1.2.3:5000", "v-proxied")).await;
    let clicks = clicks_stored(&broker).await;
    let ip_of = |v: &str| {
        let c = clicks.iter().find(|c| c.contains(v)).unwrap();
        serde_json::from_str::<Value>(c).unwrap()["ip"].as_str().unwrap().to_string()
    };
    assert_eq!(ip_of("v-direct"), "198.51.100.7", "a forged header from anyone is ignored");
    assert_eq!(ip_of("v-proxied"), "203.0.113.9", "a trusted proxy's header is used");
}

#[tokio::test]
async fn attack_over_long_parameters_are_cut_and_the_click_kept() {
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    let long = "x".repeat(5000);
    let req = Request::get(format!("/r/alice-summer?sub_id={long}")).body(Body::empty()).unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::FOUND);
    let clicks = clicks_stored(&broker).await;
    assert_eq!(clicks.len(), 1, "the click is recorded");
    let ev = crate::decode_event(&clicks[0]).unwrap();
    match ev.body {
        afflio_engine::Body::Click(c) => {
            assert_eq!(c.sub_id.as_deref().map(str::len), Some(crate::LIMITS.string_bytes))
        }
        other => panic!("{other:?}"),
    }
    let (_, _, metrics) = send(&app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert!(metrics.contains("afflio_redirect_params_truncated_total 1"), "{metrics}");
}

#[tokio::test]
async fn a_panicking_handler_is_answered_500_and_counted() {
    let metrics = Arc::new(Metrics::default());
    let app = axum::Router::new()
        .route("/boom", axum::routing::get(|| async { panic!("boom") as &'static str }))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(super::limits::panic_answer(&metrics)));
    let (status, _, text) = send(&app, Request::get("/boom").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
    assert_eq!(metrics.http_panics.load(Ordering::Relaxed), 1);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// Requests as a careless or hostile client sends them: valid events
    /// mutated (bytes flipped, cut, repeated), odd content types, odd paths.
    fn request() -> impl Strategy<Value = (String, String, Vec<u8>, Option<String>)> {
        let base = prop_oneof![
            Just(CAPTURE.to_string()),
            Just(format!("[{CAPTURE},{CAPTURE}]")),
            Just(r#"{"type":"click","event_id":"k","ts":"2026-11-10T12:00:00Z","program_id":"acme","link_id":"alice-summer","visitor_id":"v"}"#.to_string()),
            Just(r#"{"type":"review","event_id":"r","ts":"2026-11-10T12:00:00Z","program_id":"acme","decision":"approve","reviewer":"x"}"#.to_string()),
        ];
        let body = (base, proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6), any::<u16>(), 0..3usize)
            .prop_map(|(text, flips, cut, times)| {
                let mut b = text.repeat(times.max(1)).into_bytes();
                for (at, byte) in flips {
                    if !b.is_empty() {
                        let i = at % b.len();
                        b[i] = byte;
                    }
                }
                let keep = b.len().saturating_sub(usize::from(cut % 8));
                b.truncate(keep);
                b
            });
        let path = prop_oneof![
            Just("/v1/events".to_string()),
            Just("/r/alice-summer".to_string()),
            Just("/r/%00".to_string())
        ];
        let ct = prop_oneof![
            Just("application/json".to_string()),
            Just("application/x-ndjson".to_string()),
            Just("text/plain".to_string())
        ];
        let key = prop_oneof![
            Just(None),
            Just(Some("acme-key-0123456789".to_string())),
            Just(Some("acme-reviewer-0123456789".to_string())),
            Just(Some("\u{7f}bad".to_string()))
        ];
        (path, ct, body, key)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        #[test]
        fn no_request_panics_and_every_answer_has_a_known_status(req in request()) {
            let (path, ct, body, key) = req;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let broker = Arc::new(FakeBroker::default());
            let app = app(&broker);
            let mut b = Request::post(path.as_str()).header(header::CONTENT_TYPE, ct);
            if path.starts_with("/r/") {
                b = Request::get(path.as_str());
            }
            if let Some(k) = &key {
                if let Ok(v) = axum::http::HeaderValue::from_bytes(format!("Bearer {k}").as_bytes()) {
                    b = b.header(header::AUTHORIZATION, v);
                }
            }
            let (status, _, text) = rt.block_on(send(&app, b.body(Body::from(body)).unwrap()));
            prop_assert!(
                status.is_success() || status.is_redirection() || status.is_client_error() || status == StatusCode::SERVICE_UNAVAILABLE,
                "{status}: {text}"
            );
            if status.is_client_error() && path == "/v1/events" {
                prop_assert!(text.contains("\"reason\""), "a 4xx names its reason: {text}");
            }
        }

        #[test]
        fn the_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = crate::decode_event(&text);
            let mut framed = b"AFE1\n".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = crate::envelope::decode(&framed);
        }
    }
}
