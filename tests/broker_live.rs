//! The service and its broker under hostile or careless conditions:
//! - it starts while the broker is down (not ready, with the reason; events
//!   answered 503, nothing stored) and becomes ready when it comes;
//! - SIGTERM while the broker is down exits within a bounded time;
//! - with the broker's authorization, only the ingest user publishes events
//!   (the engine's user cannot inject one), and a direct publisher following
//!   the documented `Nats-Msg-Id` rule gets a conflicting reuse of an event id
//!   recorded by the engine, as over HTTP.

mod common;

use std::time::{Duration, Instant};

use common::*;

const CAPTURE: &str = r#"{"type":"capture","event_id":"cap-1","ts":"2026-11-10T12:00:00Z","program_id":"acme","order_id":"o1","amount":"100.00","currency":"USD","codes":["A"]}"#;

fn rules(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("rules.toml");
    std::fs::write(
        &p,
        "[[programs]]\nid = \"acme\"\ncurrency = \"USD\"\nrate = \"10%\"\n[[partners]]\nid = \"alice\"\nprogram_id = \"acme\"\n\
         [[codes]]\ncode = \"A\"\npartner_id = \"alice\"\n[[api_keys]]\nprogram_id = \"acme\"\nkey = \"acme-test-key-0123456789\"\n",
    )
    .unwrap();
    p
}

const KEY: &str = "acme-test-key-0123456789";

#[test]
fn the_service_starts_while_the_broker_is_down_and_stores_nothing_until_it_is_up() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = rules(tmp.path());
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let (data, state) = (tmp.path().join("data"), tmp.path().join("state"));
    let mut svc = Service::start(&rules, &url, &data, &state);
    let (status, body) = http(svc.port, "GET", "/readyz", None, "");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not ready") && body.contains("broker"), "a true reason: {body}");
    let (status, body) = http(svc.port, "POST", "/v1/events", Some(KEY), CAPTURE);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"unavailable\"") && body.contains("not stored"), "{body}");
    // The broker comes: the service becomes ready and takes events.
    let nats = Nats::start_at(&tmp.path().join("js"), port);
    wait_for("ready", Duration::from_secs(60), || http(svc.port, "GET", "/readyz", None, "").0 == 200);
    assert_eq!(post(svc.port, KEY, CAPTURE), 1);
    wait_for("the engine", Duration::from_secs(30), || svc.metric("afflio_engine_events_total") >= 1);
    assert_eq!(svc.term(), Some(0));
    assert_eq!(sql(&data, "SELECT entry_id FROM ledger"), "entry_id\ncap-1:0\n", "stored once");
    drop(nats);
}

#[test]
fn sigterm_while_the_broker_is_down_exits_in_bounded_time() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = rules(tmp.path());
    let mut nats = Nats::start(&tmp.path().join("js"));
    let (data, state) = (tmp.path().join("data"), tmp.path().join("state"));
    let mut svc = Service::start(&rules, &nats.url(), &data, &state);
    assert_eq!(post(svc.port, KEY, CAPTURE), 1);
    wait_for("the engine", Duration::from_secs(30), || svc.metric("afflio_engine_events_total") >= 1);
    nats.kill();
    let (status, _) = http(svc.port, "POST", "/v1/events", Some(KEY), &CAPTURE.replace("cap-1", "cap-2"));
    assert_eq!(status, 503);
    let t = Instant::now();
    assert_eq!(svc.term(), Some(0), "it stops cleanly");
    assert!(t.elapsed() < Duration::from_secs(20), "SIGTERM took {:?} with the broker down", t.elapsed());
    assert_eq!(sql(&data, "SELECT entry_id FROM ledger"), "entry_id\ncap-1:0\n");
}

#[test]
fn only_the_ingest_user_publishes_and_direct_publishers_get_conflicts_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = rules(tmp.path());
    let nats = Nats::start(&tmp.path().join("js"));
    let (data, state) = (tmp.path().join("data"), tmp.path().join("state"));
    let mut svc = Service::start(&rules, &nats.url(), &data, &state);
    wait_for("ready", Duration::from_secs(60), || http(svc.port, "GET", "/readyz", None, "").0 == 200);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = nats.url();
    let subject = "afflio.events.acme.capture";
    // The documented rule: Nats-Msg-Id = <program>:<event_id>:<digest of the payload>.
    let msg_id = |payload: &str| {
        use sha2::Digest;
        format!("acme:cap-1:{}", hex::encode(sha2::Sha256::digest(payload.as_bytes())))
    };
    let conflicting = CAPTURE.replace("100.00", "250.00");
    rt.block_on(async {
        // The engine's user cannot inject an event: the broker refuses it.
        let engine = async_nats::ConnectOptions::with_user_and_password(ENGINE_USER.0.into(), ENGINE_USER.1.into())
            .connect(&url)
            .await
            .unwrap();
        let js = async_nats::jetstream::new(engine);
        let injected = CAPTURE.replace("cap-1", "inj-1").replace("\"o1\"", "\"o-injected\"");
        let refused = match js.publish(subject, injected.into()).await {
            Err(_) => true,
            Ok(ack) => {
                tokio::time::timeout(Duration::from_secs(3), async { ack.await }).await.map_or(true, |r| r.is_err())
            }
        };
        assert!(refused, "the engine's user may not publish events");
        // A retailer's own client with the ingest user, following the rule.
        let ingest = async_nats::ConnectOptions::with_user_and_password(INGEST_USER.0.into(), INGEST_USER.1.into())
            .connect(&url)
            .await
            .unwrap();
        let js = async_nats::jetstream::new(ingest);
        for payload in [CAPTURE, CAPTURE, conflicting.as_str()] {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id(payload).as_str());
            js.publish_with_headers(subject, headers, payload.to_string().into()).await.unwrap().await.unwrap();
        }
    });
    wait_for("the engine", Duration::from_secs(30), || svc.metric("afflio_engine_events_total") >= 2);
    assert_eq!(svc.term(), Some(0));
    assert_eq!(sql(&data, "SELECT entry_id, amount FROM ledger"), "entry_id,amount\ncap-1:0,10.0000\n");
    assert_eq!(sql(&data, "SELECT event_id, reason FROM rejections"), "event_id,reason\ncap-1,idempotency_conflict\n");
    assert_eq!(sql(&data, "SELECT count(*) AS n FROM orders WHERE order_id = 'o-injected'"), "n\n0\n");
}
