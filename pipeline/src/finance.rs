//! Payouts in the live service: the queue of `afflio-payouts` over the
//! engine behind the event stream, for `finance` keys over HTTP, and the
//! providers' webhooks.
//!
//! The book reads the engine through the consumer (a closure run between
//! two events) and records by publishing `payout` events to the stream,
//! then waiting until the consumer has applied them: a record is durable
//! (stored by the broker) before the queue goes on, and the engine is the
//! only writer of payout state, as for every other event. One payout
//! operation runs at a time; it runs to its end even when the HTTP caller
//! gives up (its answer is then in `GET /v1/payouts`).

#![allow(clippy::result_large_err)] // handlers' errors are the answers themselves

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use afflio_engine::rules::KeyRole;
use afflio_engine::{Engine, PayoutItem, PayoutStatus};
use afflio_ingest::http::{error, Extra, Principal, PublishError, Publisher, SharedRules};
use afflio_ingest::metrics::Metrics;
use afflio_ingest::nats;
use afflio_payouts::{Book, BookError, HttpSettings, Queue, QueueError, WebhookError};
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

/// The queue built for one rules version.
type CachedQueue = (u64, Arc<Queue>);

/// A question for the consumer: run on the engine with the last stream
/// position applied.
pub(crate) type EngineQuery = Box<dyn FnOnce(&Engine, u64) + Send>;

/// How long a record may take to be applied before the caller is told the
/// ledger is unavailable (the record itself is kept by the broker).
const APPLY_WAIT: Duration = Duration::from_secs(30);

/// The live engine as the queue's book.
pub(crate) struct LiveBook {
    queries: mpsc::Sender<EngineQuery>,
    publisher: Arc<dyn Publisher>,
    js: async_nats::jetstream::Context,
}

/// Runs `f` on the engine, between two events.
pub(crate) async fn ask<R: Send + 'static>(
    queries: &mpsc::Sender<EngineQuery>,
    f: impl FnOnce(&Engine, u64) -> R + Send + 'static,
) -> Result<R, BookError> {
    let (tx, rx) = oneshot::channel();
    let q: EngineQuery = Box::new(move |e, seq| {
        let _ = tx.send(f(e, seq));
    });
    queries.send_timeout(q, APPLY_WAIT).await.map_err(|_| {
        BookError::Unavailable("the engine is not running (starting, or waiting for the broker)".into())
    })?;
    tokio::time::timeout(APPLY_WAIT, rx)
        .await
        .map_err(|_| BookError::Unavailable("the engine did not answer in time".into()))?
        .map_err(|_| BookError::Unavailable("the engine stopped".into()))
}

/// Waits until the engine has applied everything the stream holds now (the
/// queue's own records, and anyone else's; after a restart, the replay of
/// the stream since the checkpoint).
pub(crate) async fn caught_up(
    queries: &mpsc::Sender<EngineQuery>,
    js: &async_nats::jetstream::Context,
) -> Result<(), BookError> {
    let unavailable = |e: String| BookError::Unavailable(format!("stream {}: {e}", nats::STREAM));
    let mut stream = js.get_stream(nats::STREAM).await.map_err(|e| unavailable(e.to_string()))?;
    let last = stream.info().await.map_err(|e| unavailable(e.to_string()))?.state.last_sequence;
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    loop {
        if ask(queries, |_, seq| seq).await? >= last {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BookError::Unavailable(format!(
                "the engine has not applied the stream up to {last} yet: what was recorded is kept and will be applied"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Book for LiveBook {
    async fn read<R: Send + 'static>(&mut self, f: impl FnOnce(&Engine) -> R + Send + 'static) -> Result<R, BookError> {
        caught_up(&self.queries, &self.js).await?;
        ask(&self.queries, move |e, _| f(e)).await
    }

    async fn record(&mut self, events: Vec<String>) -> Result<(), BookError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut msgs = Vec::with_capacity(events.len());
        for text in events {
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| BookError::Internal(format!("a payout record is not JSON: {e}")))?;
            let program = v["program_id"].as_str().unwrap_or_default().to_string();
            let id = v["event_id"].as_str().unwrap_or_default().to_string();
            // The id alone: a record published again (a retry) is a duplicate.
            msgs.push((nats::subject(&program, "payout"), format!("{program}:{id}"), Bytes::from(text)));
        }
        for r in self.publisher.publish(msgs).await {
            match r {
                Ok(_) => {}
                Err(PublishError::TooLarge { bytes, max }) => {
                    return Err(BookError::Internal(format!("a payout record of {bytes} bytes is over {max}")))
                }
                Err(e) => return Err(BookError::Unavailable(format!("the broker did not store a payout record: {e}"))),
            }
        }
        caught_up(&self.queries, &self.js).await
    }

    async fn event_time(&mut self, _program_id: String) -> Result<DateTime<Utc>, BookError> {
        Ok(Utc::now())
    }
}

/// The finance component's state.
#[derive(Clone)]
pub(crate) struct Finance {
    rules: SharedRules,
    queries: mpsc::Sender<EngineQuery>,
    js: async_nats::jetstream::Context,
    metrics: Arc<Metrics>,
    book: Arc<tokio::sync::Mutex<LiveBook>>,
    /// The queue for the rules in force (rebuilt when they change, so a
    /// provider's token is kept between calls).
    queue: Arc<Mutex<Option<CachedQueue>>>,
    http: HttpSettings,
}

impl Finance {
    pub(crate) fn new(
        rules: SharedRules,
        metrics: Arc<Metrics>,
        queries: mpsc::Sender<EngineQuery>,
        publisher: Arc<dyn Publisher>,
        js: async_nats::jetstream::Context,
        http: HttpSettings,
    ) -> Finance {
        Finance {
            rules,
            metrics,
            queries: queries.clone(),
            js: js.clone(),
            book: Arc::new(tokio::sync::Mutex::new(LiveBook { queries, publisher, js })),
            queue: Arc::new(Mutex::new(None)),
            http,
        }
    }

    fn queue(&self) -> Result<Arc<Queue>, String> {
        let rules = self.rules.read().map(|r| r.clone()).map_err(|_| "rules lock poisoned".to_string())?;
        let mut held = self.queue.lock().map_err(|_| "queue lock poisoned".to_string())?;
        if let Some((v, q)) = held.as_ref() {
            if *v == rules.version() {
                return Ok(q.clone());
            }
        }
        let q = Arc::new(Queue::from_env(rules.clone(), self.http.clone())?);
        *held = Some((rules.version(), q.clone()));
        Ok(q)
    }

    /// The routes: the payouts API behind finance keys, and the webhooks.
    pub(crate) fn routes(self) -> Extra {
        let keyed = Router::new()
            .route("/v1/payouts", get(list))
            .route("/v1/payouts/plan", post(plan))
            .route("/v1/payouts/send", post(send))
            .route("/v1/payouts/sync", post(sync))
            .route("/v1/payouts/resolve", post(resolve))
            .with_state(self.clone());
        let open = Router::new().route("/webhooks/{provider}", post(webhook)).with_state(self);
        Extra { keyed, open }
    }
}

fn finance_only(who: &Principal) -> Result<(), Response> {
    if who.role != KeyRole::Finance {
        return Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            Some("Authorization"),
            format!("the payouts API takes a finance key; this is a {} key", who.role.as_str()),
        ));
    }
    Ok(())
}

fn queue_error(e: QueueError) -> Response {
    match e {
        QueueError::Config(d) => error(StatusCode::INTERNAL_SERVER_ERROR, "configuration", None, d),
        QueueError::Refused(d) => error(StatusCode::UNPROCESSABLE_ENTITY, "refused", None, d),
        QueueError::Book(BookError::Unavailable(d)) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", None, d);
            r.headers_mut().insert("retry-after", "1".parse().expect("static"));
            r
        }
        QueueError::Book(BookError::Internal(d)) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", None, d),
    }
}

/// Runs one payout operation on its own task (it finishes even if the
/// caller leaves), one at a time.
async fn run<T: serde::Serialize + Send + 'static>(
    f: Finance,
    op: impl for<'a> FnOnce(Arc<Queue>, &'a mut LiveBook) -> futures::future::BoxFuture<'a, Result<T, QueueError>>
        + Send
        + 'static,
) -> Response {
    let queue = match f.queue() {
        Ok(q) => q,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "configuration", None, e),
    };
    let task = tokio::spawn(async move {
        let mut book = f.book.lock().await;
        op(queue, &mut book).await
    });
    match task.await {
        Ok(Ok(v)) => (StatusCode::OK, Json(v)).into_response(),
        Ok(Err(e)) => queue_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", None, format!("payout task: {e}")),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PlanBody {
    at: Option<DateTime<Utc>>,
}

async fn plan(State(f): State<Finance>, Extension(who): Extension<Principal>, body: Bytes) -> Response {
    if let Err(r) = finance_only(&who) {
        return r;
    }
    let b: PlanBody = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let program = who.program_id;
    run(f, move |q, book| Box::pin(async move { q.plan(book, &program, b.at).await })).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SendBody {
    batch_id: Option<String>,
}

async fn send(State(f): State<Finance>, Extension(who): Extension<Principal>, body: Bytes) -> Response {
    if let Err(r) = finance_only(&who) {
        return r;
    }
    let b: SendBody = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let program = who.program_id;
    run(f, move |q, book| Box::pin(async move { q.send(book, &program, b.batch_id.as_deref(), Utc::now()).await }))
        .await
}

async fn sync(State(f): State<Finance>, Extension(who): Extension<Principal>) -> Response {
    if let Err(r) = finance_only(&who) {
        return r;
    }
    let program = who.program_id;
    run(f, move |q, book| Box::pin(async move { q.sync(book, &program, Utc::now()).await })).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    batch_id: String,
    partner_id: String,
    status: String,
    by: String,
    note: String,
}

async fn resolve(State(f): State<Finance>, Extension(who): Extension<Principal>, body: Bytes) -> Response {
    if let Err(r) = finance_only(&who) {
        return r;
    }
    let b: ResolveBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, "malformed", None, format!("the body is not the expected JSON: {e}"))
        }
    };
    let status = match b.status.as_str() {
        "paid" => PayoutStatus::Paid,
        "failed" => PayoutStatus::Failed,
        other => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_payout",
                Some("status"),
                format!("status {other:?}: an item is resolved as paid or failed"),
            )
        }
    };
    let program = who.program_id;
    run(f, move |q, book| {
        Box::pin(
            async move { q.resolve_by_hand(book, &program, &b.batch_id, &b.partner_id, status, &b.by, &b.note).await },
        )
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    batch_id: Option<String>,
    status: Option<String>,
}

fn item_json(i: &PayoutItem) -> serde_json::Value {
    let s = &i.state;
    json!({
        "batch_id": i.batch_id,
        "partner_id": i.partner_id,
        "amount": s.amount.to_string(),
        "tds": s.tds.to_string(),
        "status": s.status.as_str(),
        "provider": s.provider,
        "provider_ref": s.provider_ref,
        "idempotency_key": s.idempotency_key,
        "provider_batch": s.provider_batch,
        "destination": s.destination.as_deref().map(afflio_sinks::mask_destination),
        "attempts": s.attempts,
        "first_attempt": s.first_attempt,
        "detail": s.detail,
        "updated": s.updated,
    })
}

async fn list(
    State(f): State<Finance>,
    Extension(who): Extension<Principal>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = finance_only(&who) {
        return r;
    }
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "malformed", None, "query: batch_id and status only".into());
    };
    let program = who.program_id;
    // Read between two events, without waiting for a payout operation.
    let items = match caught_up(&f.queries, &f.js).await {
        Ok(()) => ask(&f.queries, move |e, _| e.payout_items(&program)).await,
        Err(e) => Err(e),
    };
    match items {
        Ok(items) => {
            let items: Vec<serde_json::Value> = items
                .iter()
                .filter(|i| q.batch_id.as_deref().is_none_or(|b| i.batch_id == b))
                .filter(|i| q.status.as_deref().is_none_or(|s| i.state.status.as_str() == s))
                .map(item_json)
                .collect();
            (StatusCode::OK, Json(json!({ "items": items }))).into_response()
        }
        Err(e) => queue_error(e.into()),
    }
}

fn parse<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        error(StatusCode::BAD_REQUEST, "malformed", None, format!("the body is not the expected JSON: {e}"))
    })
}

async fn webhook(State(f): State<Finance>, Path(provider): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let m = f.metrics.clone();
    let queue = match f.queue() {
        Ok(q) => q,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "configuration", None, e),
    };
    let book = f.book.clone();
    let task = tokio::spawn(async move {
        let mut b = book.lock().await;
        queue.webhook(&mut *b, &provider, headers, body.to_vec()).await
    });
    let refused = |status, reason: &str, d: String| {
        m.payout_webhooks_refused.fetch_add(1, Ordering::Relaxed);
        error(status, reason, None, d)
    };
    match task.await {
        Ok(Ok(r)) => {
            m.payout_webhooks.fetch_add(1, Ordering::Relaxed);
            for n in &r.notices {
                m.payout_notices.fetch_add(1, Ordering::Relaxed);
                eprintln!("afflio: payout provider notice: {n}");
            }
            (StatusCode::OK, Json(json!({ "status": "ok", "report": r }))).into_response()
        }
        Ok(Err(WebhookError::BadSignature(d))) => refused(StatusCode::UNAUTHORIZED, "bad_signature", d),
        Ok(Err(e @ WebhookError::NotConfigured(..))) => refused(StatusCode::NOT_FOUND, "not_configured", e.to_string()),
        Ok(Err(WebhookError::Malformed(d))) => refused(StatusCode::BAD_REQUEST, "malformed", d),
        Ok(Err(WebhookError::Unavailable(d))) => {
            // The provider retries: nothing is lost.
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", None, d);
            r.headers_mut().insert("retry-after", "5".parse().expect("static"));
            r
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", None, format!("webhook task: {e}")),
    }
}
