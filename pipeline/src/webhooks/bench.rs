//! Measurements of the webhooks path (`afflio bench webhooks`): what
//! building messages adds per event, and how fast one endpoint is delivered
//! to through the real outbox, consumer, lanes and signing.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use afflio_engine::Output;
use chrono::Utc;
use tokio::sync::watch;

use super::deliver::{self, DeliverySettings};
use super::endpoints::{new_secret, Endpoint, Endpoints, SigningSecret};
use super::outbox::{self, OutMsg, Outbox};
use crate::error::PipelineError;

/// The messages an epoch's output makes (every program as if it had endpoints).
pub fn webhook_messages(out: &Output) -> usize {
    outbox::messages(out, |_| true).len()
}

/// What a delivery run measured.
#[derive(Clone, Copy, Debug)]
pub struct DeliveryResult {
    pub messages: usize,
    pub lanes: usize,
    pub publish_per_sec: f64,
    pub delivered_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Publishes `n` messages for one endpoint (a local receiver answering 200
/// at once) and measures until every one was delivered.
pub async fn delivery_throughput(
    nats: &str,
    n: usize,
    lanes: usize,
    data: &Path,
) -> Result<DeliveryResult, PipelineError> {
    let client = afflio_ingest::nats::connect(nats, afflio_ingest::nats::Role::Engine).await?;
    let js = async_nats::jetstream::new(client);
    outbox::ensure_stream(&js).await?;
    // The receiver.
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| PipelineError::Internal(format!("bench receiver: {e}")))?;
    let port = listener.local_addr().map_err(|e| PipelineError::Internal(e.to_string()))?.port();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    // One endpoint of a program of its own.
    let program = format!("bench-{:08x}", rand::random::<u32>());
    let next = super::next_position(&js).await?;
    let endpoints = Arc::new(Endpoints::open(&js, &[], next).await?);
    let ep = Endpoint {
        id: format!("{program}-ep"),
        program_id: program.clone(),
        partner_id: None,
        url: format!("http://127.0.0.1:{port}/hook"),
        events: vec!["commission.created".into()],
        secrets: vec![SigningSecret { secret: new_secret(), expires_at: None }],
        disabled: None,
        created_at: Utc::now(),
        source: "api".into(),
        start_seq: next,
    };
    endpoints.put(ep.clone()).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let settings = DeliverySettings { lanes, ..DeliverySettings::default() };
    let (dispatcher, writer) = deliver::spawn(&js, endpoints.clone(), data, settings, stop_rx).await?;
    let body = |i: usize| {
        serde_json::to_vec(&serde_json::json!({
            "type": "commission.created", "timestamp": Utc::now().to_rfc3339(),
            "data": {"order_id": format!("o{i}"), "partner_id": "p", "amount": "12.50", "currency": "USD"}
        }))
        .unwrap_or_default()
    };
    let msgs: Vec<OutMsg> = (0..n)
        .map(|i| OutMsg {
            id: format!("msg_{program}_{i}"),
            kind: "commission.created",
            program_id: program.clone(),
            partner_id: Some("p".into()),
            subject: format!("o{i}"),
            body: body(i),
        })
        .collect();
    let ob = Outbox { js: js.clone(), endpoints: endpoints.clone() };
    let started = Instant::now();
    for chunk in msgs.chunks(1_000) {
        ob.publish_msgs(chunk).await;
    }
    let published = started.elapsed();
    let mut samples = Vec::new();
    let mut last = 0;
    while (count.load(Ordering::Relaxed) as usize) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = count.load(Ordering::Relaxed) as usize;
        if now > last {
            samples.push((now, started.elapsed()));
            last = now;
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(PipelineError::Internal(format!("bench: {now} of {n} delivered after 600 s")));
        }
    }
    let delivered = started.elapsed();
    // Latency from the start of publishing to delivery, by rank (an upper bound per message).
    let at = |q: f64| {
        let rank = ((n as f64) * q).ceil() as usize;
        samples.iter().find(|(k, _)| *k >= rank).map_or(delivered, |(_, t)| *t).as_secs_f64() * 1e3
    };
    let _ = stop_tx.send(true);
    let _ = dispatcher.await;
    endpoints.remove(&ep.id).await?;
    // The workers are done: the log's channel closes and its last rows are written.
    let _ = tokio::time::timeout(Duration::from_secs(30), writer).await;
    server.abort();
    Ok(DeliveryResult {
        messages: n,
        lanes,
        publish_per_sec: n as f64 / published.as_secs_f64(),
        delivered_per_sec: n as f64 / delivered.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    })
}
