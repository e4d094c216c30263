//! Delivery: one durable JetStream consumer per endpoint over the outbox,
//! its messages spread over lanes by subject (a subject's messages stay in
//! one lane, in order), each lane delivering one message at a time with
//! retries. A slow or failing endpoint holds only its own lanes: the engine
//! and other endpoints never wait for it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use afflio_sinks::{DeliveryLog, DeliveryRow};
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, AckKind};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use rand::Rng;
use tokio::sync::{mpsc, watch};

use super::endpoints::{Endpoint, Endpoints};
use super::outbox::{filter_of, STREAM};

/// How delivery retries and times out.
#[derive(Clone, Debug)]
pub struct DeliverySettings {
    /// Per attempt.
    pub timeout: Duration,
    /// The first retry's delay; each next one doubles, with jitter.
    pub retry_base: Duration,
    /// The longest delay between attempts.
    pub retry_max: Duration,
    /// A message is given up this long after it was published.
    pub retry_window: Duration,
    /// Lanes per endpoint (messages of different subjects in parallel).
    pub lanes: usize,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            timeout: Duration::from_secs(10),
            retry_base: Duration::from_secs(5),
            retry_max: Duration::from_secs(6 * 3600),
            retry_window: Duration::from_secs(3 * 24 * 3600),
            lanes: 8,
        }
    }
}

impl DeliverySettings {
    /// The delay before attempt `n + 1` (n >= 1): base x 2^(n-1), at most
    /// the max, with full jitter in [delay/2, delay].
    pub(crate) fn backoff(&self, n: u32) -> Duration {
        let exp = self.retry_base.saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(30)));
        let d = exp.min(self.retry_max);
        let half = d / 2;
        half + Duration::from_millis(rand::rng().random_range(0..=half.as_millis().max(1) as u64))
    }
}

/// What a worker needs.
pub(crate) struct Ctx {
    pub(crate) js: jetstream::Context,
    pub(crate) endpoints: Arc<Endpoints>,
    pub(crate) http: reqwest::Client,
    pub(crate) settings: DeliverySettings,
    pub(crate) log: mpsc::Sender<DeliveryRow>,
}

/// An HTTP client for deliveries: no redirects (a webhook URL is exact).
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("Afflio-Webhooks/1")
        .build()
        .expect("a TLS backend is compiled in")
}

fn consumer_name(id: &str) -> String {
    format!("wh-{:016x}", xxhash_rust::xxh3::xxh3_64(id.as_bytes()))
}

/// The signature header: `v1,<base64>` for every secret that signs now.
pub(crate) fn signature(secrets: impl Iterator<Item = impl AsRef<str>>, id: &str, ts: i64, body: &[u8]) -> String {
    let mut sigs = Vec::new();
    for s in secrets {
        if let Ok(wh) = standardwebhooks::Webhook::new(s.as_ref()) {
            if let Ok(sig) = wh.sign(id, ts, body) {
                sigs.push(sig);
            }
        }
    }
    sigs.join(" ")
}

/// One attempt's result.
pub(crate) struct Attempt {
    pub(crate) code: Option<u16>,
    pub(crate) error: Option<String>,
    pub(crate) latency: Duration,
}

/// POSTs a message to an endpoint, signed, once.
pub(crate) async fn post(http: &reqwest::Client, ep: &Endpoint, id: &str, body: &[u8], timeout: Duration) -> Attempt {
    let now = Utc::now();
    let ts = now.timestamp();
    let started = Instant::now();
    let r = http
        .post(&ep.url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature(ep.signing(now), id, ts, body))
        .body(body.to_vec())
        .timeout(timeout)
        .send()
        .await;
    match r {
        Ok(resp) => {
            let code = resp.status().as_u16();
            // Read (and drop) a little of the body so the connection can be reused.
            let _ = tokio::time::timeout(Duration::from_secs(1), resp.bytes()).await;
            Attempt { code: Some(code), error: None, latency: started.elapsed() }
        }
        Err(e) => {
            let what = if e.is_timeout() {
                format!("timed out after {timeout:?}")
            } else if e.is_connect() {
                "connection failed".to_string()
            } else {
                "request failed".to_string()
            };
            Attempt { code: None, error: Some(what), latency: started.elapsed() }
        }
    }
}

/// Starts and stops the endpoints' workers as endpoints come, go, are
/// disabled or enabled again.
pub(crate) async fn dispatcher(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut running: BTreeMap<String, (tokio::task::JoinHandle<()>, watch::Sender<bool>)> = BTreeMap::new();
    loop {
        let all = ctx.endpoints.all();
        let wanted: Vec<Endpoint> = all.iter().filter(|e| e.disabled.is_none()).cloned().collect();
        let mut removed = Vec::new();
        running.retain(|id, (h, tx)| {
            let keep = !h.is_finished() && wanted.iter().any(|e| e.id == *id);
            if !keep {
                let _ = tx.send(true);
                if !all.iter().any(|e| e.id == *id) {
                    removed.push(id.clone());
                }
            }
            keep
        });
        // A removed endpoint's consumer goes too (a disabled one keeps its backlog).
        for id in removed {
            if let Ok(stream) = ctx.js.get_stream(STREAM).await {
                let _ = stream.delete_consumer(&consumer_name(&id)).await;
            }
        }
        for ep in wanted {
            if running.contains_key(&ep.id) {
                continue;
            }
            let (tx, rx) = watch::channel(false);
            let h = tokio::spawn(worker(ctx.clone(), ep.id.clone(), rx));
            running.insert(ep.id.clone(), (h, tx));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => break,
        }
    }
    for (_, (h, tx)) in running {
        let _ = tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
    }
}

/// The endpoint's consumer, positioned so that per-subject order holds after
/// a restart: with messages delivered and not acknowledged, it starts again
/// after its acknowledgement floor (messages acknowledged past the floor are
/// delivered again: at least once).
async fn consumer(ctx: &Ctx, ep: &Endpoint) -> Result<jetstream::consumer::PullConsumer, String> {
    let stream = ctx.js.get_stream(STREAM).await.map_err(|e| e.to_string())?;
    let name = consumer_name(&ep.id);
    let mut start = ep.start_seq.max(1);
    if let Ok(mut c) = stream.get_consumer::<pull::Config>(&name).await {
        match c.info().await {
            // Nothing delivered and unacknowledged: it goes on where it is.
            Ok(info) if info.num_ack_pending == 0 => return Ok(c),
            Ok(info) => {
                start = start.max(info.ack_floor.stream_sequence + 1);
                let _ = stream.delete_consumer(&name).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name),
            filter_subject: filter_of(&ep.program_id, ep.partner_id.as_deref()),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: (ctx.settings.lanes * 16) as i64,
            max_deliver: -1,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())
}

async fn worker(ctx: Arc<Ctx>, id: String, mut stop: watch::Receiver<bool>) {
    let Some(ep) = ctx.endpoints.get(&id) else { return };
    let c = loop {
        match consumer(&ctx, &ep).await {
            Ok(c) => break c,
            Err(e) => {
                eprintln!("afflio: webhook endpoint {id:?}: cannot open its consumer, retrying: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    let mut messages = match c.stream().max_messages_per_batch(64).heartbeat(Duration::from_secs(5)).messages().await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("afflio: webhook endpoint {id:?}: cannot pull, the dispatcher restarts it: {e}");
            return;
        }
    };
    let mut lanes = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..ctx.settings.lanes.max(1) {
        let (tx, rx) = mpsc::channel::<jetstream::Message>(16);
        lanes.push(tx);
        handles.push(tokio::spawn(lane(ctx.clone(), id.clone(), rx, stop.clone())));
    }
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            m = messages.next() => {
                let Some(Ok(m)) = m else { break };
                let subject = header(&m, "Afflio-Subject").unwrap_or_default();
                let lane = (xxhash_rust::xxh3::xxh3_64(subject.as_bytes()) % lanes.len() as u64) as usize;
                if lanes[lane].send(m).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(lanes);
    for h in handles {
        let _ = h.await;
    }
}

fn header(m: &jetstream::Message, name: &str) -> Option<String> {
    m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_string())
}

/// Delivers a lane's messages one at a time. Stops (leaving the message
/// unacknowledged, for later) when the endpoint is disabled or removed.
async fn lane(ctx: Arc<Ctx>, id: String, mut rx: mpsc::Receiver<jetstream::Message>, stop: watch::Receiver<bool>) {
    while let Some(m) = rx.recv().await {
        if !deliver(&ctx, &id, &m, stop.clone()).await {
            return;
        }
    }
}

/// Returns whether the lane goes on.
async fn deliver(ctx: &Ctx, id: &str, m: &jetstream::Message, mut stop: watch::Receiver<bool>) -> bool {
    let kind = header(m, "Afflio-Type").unwrap_or_default();
    let msg_id = header(m, "Nats-Msg-Id").unwrap_or_default();
    let subject = header(m, "Afflio-Subject").unwrap_or_default();
    let published: DateTime<Utc> = m
        .info()
        .ok()
        .and_then(|i| DateTime::from_timestamp(i.published.unix_timestamp(), i.published.nanosecond()))
        .unwrap_or_else(Utc::now);
    let mut attempt = 0i32;
    loop {
        let Some(ep) = ctx.endpoints.get(id) else { return false };
        if ep.disabled.is_some() || *stop.borrow() {
            return false;
        }
        if !ep.wants(&kind) {
            let _ = m.ack().await;
            return true;
        }
        attempt += 1;
        let at = Utc::now();
        let a = post(&ctx.http, &ep, &msg_id, &m.payload, ctx.settings.timeout).await;
        let mut row = DeliveryRow {
            endpoint_id: ep.id.clone(),
            program_id: ep.program_id.clone(),
            partner_id: ep.partner_id.clone(),
            message_id: msg_id.clone(),
            event_type: kind.clone(),
            subject: subject.clone(),
            attempt,
            ts: at,
            status: String::new(),
            response_code: a.code.map(i32::from),
            latency_ms: a.latency.as_millis() as i64,
            error: a.error.clone(),
            next_attempt_at: None,
        };
        match a.code {
            Some(c) if (200..300).contains(&c) => {
                row.status = "delivered".into();
                let _ = ctx.log.send(row).await;
                let _ = m.ack().await;
                return true;
            }
            Some(410) => {
                row.status = "disabled".into();
                let _ = ctx.log.send(row).await;
                let reason = format!("the endpoint answered 410 Gone at {}", at.to_rfc3339());
                if let Err(e) = ctx.endpoints.disable(id, reason).await {
                    eprintln!("afflio: webhook endpoint {id:?}: cannot record that it is disabled: {e}");
                }
                eprintln!("afflio: webhook endpoint {id:?} disabled: it answered 410 Gone");
                return false;
            }
            _ => {}
        }
        let delay = ctx.settings.backoff(attempt as u32);
        let next = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        let window = chrono::Duration::from_std(ctx.settings.retry_window).unwrap_or_default();
        if next > published + window {
            row.status = "failed".into();
            let _ = ctx.log.send(row).await;
            // Given up: acknowledged so the endpoint moves on (`afflio webhooks replay` sends it again).
            let _ = m.ack().await;
            return true;
        }
        row.status = "retrying".into();
        row.next_attempt_at = Some(next);
        let _ = ctx.log.send(row).await;
        // Wait, telling the broker the message is still being worked on.
        let until = Instant::now() + delay;
        while Instant::now() < until {
            let step = (until - Instant::now()).min(Duration::from_secs(10));
            tokio::select! {
                _ = tokio::time::sleep(step) => {}
                _ = stop.changed() => return false,
            }
            let _ = m.ack_with(AckKind::Progress).await;
        }
    }
}

/// Starts delivering: the `deliveries` log writer and the dispatcher of the
/// endpoints' workers (until `stop`). Returns both tasks.
pub(crate) async fn spawn(
    js: &jetstream::Context,
    endpoints: Arc<Endpoints>,
    data: &std::path::Path,
    settings: DeliverySettings,
    stop: watch::Receiver<bool>,
) -> Result<(tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>), crate::error::PipelineError> {
    let log = DeliveryLog::open(data).await?;
    let (tx, rx) = mpsc::channel(10_000);
    let writer = tokio::spawn(log_writer(log, rx));
    let ctx = Arc::new(Ctx { js: js.clone(), endpoints, http: client(), settings, log: tx });
    let dispatcher = tokio::spawn(dispatcher(ctx, stop));
    Ok((dispatcher, writer))
}

/// Writes delivery rows to the `deliveries` table in batches.
pub(crate) async fn log_writer(mut log: DeliveryLog, mut rx: mpsc::Receiver<DeliveryRow>) {
    let mut buf: Vec<DeliveryRow> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Some(row) => {
                    buf.push(row);
                    if buf.len() < 2_000 { continue; }
                }
                None => {
                    let _ = log.append(&buf).await;
                    return;
                }
            },
            _ = tick.tick() => {}
        }
        if buf.is_empty() {
            continue;
        }
        loop {
            match log.append(&buf).await {
                Ok(()) => {
                    buf.clear();
                    break;
                }
                // Kept and written with the next batch; past 100,000 rows the
                // lanes wait (the channel is bounded) until the disk takes them.
                Err(e) => {
                    eprintln!("afflio: deliveries log write failed ({} rows kept): {e}", buf.len());
                    if buf.len() < 100_000 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
