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

use crate::http::{router, Ingest, Message, PublishError, PublishOutcome, Publisher};
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
[payouts.razorpayx]
key_id_env = "AFFLIO_HTTP_TEST_UNUSED"
key_secret_env = "AFFLIO_HTTP_TEST_UNUSED"
webhook_secret_env = "AFFLIO_HTTP_TEST_WEBHOOK_SECRET"
account_number = "2323230000000001"
"#;

/// Stores message ids; `down` makes it fail like a broker that is gone.
#[derive(Default)]
struct FakeBroker {
    stored: Mutex<Vec<(String, String, String)>>,
    down: AtomicBool,
}

impl Publisher for Arc<FakeBroker> {
    fn publish(&self, msgs: Vec<Message>) -> BoxFuture<'static, Vec<Result<PublishOutcome, PublishError>>> {
        let me = self.clone();
        Box::pin(async move {
            msgs.into_iter()
                .map(|(subject, msg_id, payload)| {
                    if me.down.load(Ordering::SeqCst) {
                        return Err(PublishError("connection refused".into()));
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

    fn ready(&self) -> bool {
        !self.down.load(Ordering::SeqCst)
    }
}

fn app(broker: &Arc<FakeBroker>) -> axum::Router {
    let rules = Arc::new(RwLock::new(Arc::new(Rules::parse("t.toml", RULES).unwrap())));
    router(Ingest { rules, publisher: Arc::new(broker.clone()), metrics: Arc::new(Metrics::default()) }, 64 * 1024)
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
    assert!(stored[0].1.starts_with("cap-1:"));
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
    check(
        &app,
        key,
        &CAPTURE.replace("\"acme\"", "\"nope\""),
        StatusCode::UNPROCESSABLE_ENTITY,
        &[("reason", "unknown_program"), ("field", "program_id")],
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
    assert!(stored[1].0.ends_with(".batch") && stored[1].1.starts_with("env:"), "{:?}", stored[1]);
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
    let (_, headers, _) = send(&app, req).await;
    assert!(headers.get(header::SET_COOKIE).is_none());
    let (status, _, _) = send(&app, Request::get("/r/nope").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The clicks are published in the background.
    for _ in 0..100 {
        if broker.stored.lock().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let stored = broker.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 2);
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
async fn razorpayx_webhooks_are_verified_and_published_once() {
    std::env::set_var("AFFLIO_HTTP_TEST_WEBHOOK_SECRET", "whsec_http");
    let broker = Arc::new(FakeBroker::default());
    let app = app(&broker);
    let body = r#"{"event":"payout.processed","created_at":1796000000,"payload":{"payout":{"entity":{"id":"pout_9","status":"processed","notes":{"program_id":"acme","batch_id":"acme-b1","partner_id":"alice","gross":"150.00","tds":"15.00"}}}}}"#;
    let sign = |b: &str| {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"whsec_http").unwrap();
        mac.update(b.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    };
    let hook = |sig: String| {
        Request::post("/webhooks/razorpayx").header("X-Razorpay-Signature", sig).body(Body::from(body)).unwrap()
    };
    let (status, _, text) = send(&app, hook(sign("forged"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    assert!(broker.stored.lock().unwrap().is_empty(), "nothing published on a bad signature");
    let (status, _, text) = send(&app, hook(sign(body))).await;
    assert_eq!((status, text.contains("accepted")), (StatusCode::OK, true), "{text}");
    let (status, _, text) = send(&app, hook(sign(body))).await;
    assert_eq!((status, text.contains("duplicate")), (StatusCode::OK, true), "{text}");
    let stored = broker.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, "afflio.events.acme.payout");
    let ev = stored[0].2.clone();
    let decoded = crate::decode_event(&ev).unwrap();
    match decoded.body {
        afflio_engine::Body::Payout(p) => {
            assert_eq!(
                (p.status.as_str(), p.amount.to_string(), p.tds.to_string()),
                ("paid", "150.00".into(), "15.00".into())
            );
            assert_eq!(p.provider_ref.as_deref(), Some("pout_9"));
        }
        other => panic!("not a payout: {other:?}"),
    }
}
