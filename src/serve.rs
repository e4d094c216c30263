//! `afflio serve`: HTTP ingest -> NATS JetStream -> engine -> streaming
//! Parquet sinks, in one process.
//!
//! Exactly-once effect: the engine applies stream messages in stream order
//! and, at each flush, (1) writes the rows of the messages applied since the
//! last flush as new, synced Parquet files named by their stream positions,
//! (2) when a checkpoint is due, replaces the state snapshot (open orders,
//! lines, balances) and writes a checkpoint of the engine state with the
//! flushed position (atomically), and (3) acknowledges the flushed
//! messages, whose rows are now durable.
//! Resuming never depends on acknowledgements: the stream keeps messages
//! (limits retention) and a restart recreates the consumer at the
//! checkpoint's position. After a crash the engine restarts from the checkpoint, removes
//! files written after it, and skips redelivered messages it already
//! applied: every row is written once.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Engine, Outcome, Reason};
use afflio_ingest::http::{router, Ingest, SharedRules};
use afflio_ingest::metrics::Metrics;
use afflio_ingest::nats::{self, JetStreamPublisher, STREAM};
use afflio_ingest::{decode_event, envelope};
use afflio_sinks::StreamStore;
use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use chrono::Utc;
use futures::StreamExt;
use tokio::sync::watch;

/// What `serve` needs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub config: PathBuf,
    pub nats: String,
    pub http: SocketAddr,
    pub data: PathBuf,
    pub state: PathBuf,
    /// Flush when this many events were applied since the last flush...
    pub flush_events: usize,
    /// ...or when this much time passed.
    pub flush_interval: Duration,
    /// Checkpoint (and acknowledge) at most this often.
    pub checkpoint_interval: Duration,
    pub max_body: usize,
}

const CONSUMER: &str = "afflio-engine";
const CHECKPOINT: &str = "engine.ckpt";
/// A table with more small files than this is compacted after a flush.
const COMPACT_AFTER_FILES: usize = 32;

/// Runs until SIGTERM or SIGINT: then drains HTTP, flushes, checkpoints.
pub async fn run(opts: ServeOptions, rules: Rules) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.state)
        .with_context(|| format!("cannot create state directory {}", opts.state.display()))?;
    let metrics = Arc::new(Metrics::default());
    metrics.rules_version.store(rules.version(), Ordering::Relaxed);
    let shared: SharedRules = Arc::new(RwLock::new(Arc::new(rules)));
    let (client, js) = nats::connect(&opts.nats, Duration::from_secs(120)).await?;
    let publisher = Arc::new(JetStreamPublisher::new(client.clone(), js.clone()));

    let (stop_tx, stop_rx) = watch::channel(false);
    let consumer = tokio::spawn(consume(js.clone(), shared.clone(), metrics.clone(), opts.clone(), stop_rx.clone()));
    let reloader = tokio::spawn(reload_rules(opts.config.clone(), shared.clone(), metrics.clone(), stop_rx));

    let app = router(Ingest { rules: shared, publisher, metrics }, opts.max_body);
    let listener =
        tokio::net::TcpListener::bind(opts.http).await.with_context(|| format!("cannot listen on {}", opts.http))?;
    eprintln!(
        "afflio: listening on http://{} (NATS {}, data {})",
        listener.local_addr()?,
        opts.nats,
        opts.data.display()
    );
    let mut consumer_done = consumer;
    let result = tokio::select! {
        r = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()) => r.context("HTTP server"),
        r = &mut consumer_done => {
            // The engine stopped on its own: an error worth exiting for.
            return r.context("engine task")?.context("engine");
        }
    };
    let _ = stop_tx.send(true);
    consumer_done.await.context("engine task")??;
    reloader.abort();
    client.flush().await.ok();
    eprintln!("afflio: stopped cleanly");
    result
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("afflio: shutting down: draining requests, flushing, checkpointing");
}

/// Reloads the rules on SIGHUP or when the file changes; an invalid file
/// keeps the rules in force and says why.
async fn reload_rules(path: PathBuf, shared: SharedRules, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(_) => return,
    };
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = modified(&path);
    // What the rules in force were read from: an unchanged file is not reloaded.
    let mut loaded: Option<Vec<u8>> = std::fs::read(&path).ok();
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                let now = modified(&path);
                if now == seen { continue; }
            }
            _ = stop.changed() => return,
        }
        seen = modified(&path);
        let text = std::fs::read(&path).ok();
        if text.is_some() && text == loaded {
            continue;
        }
        let current = shared.read().map(|r| r.version()).unwrap_or(0);
        match Rules::load(&path) {
            Ok(new) => {
                // Versions only go up, so ledger rows tell which rules made them.
                let new = new.with_version(current + 1);
                loaded = text;
                metrics.rules_version.store(new.version(), Ordering::Relaxed);
                if let Ok(mut w) = shared.write() {
                    *w = Arc::new(new);
                }
                eprintln!("afflio: rules reloaded from {} (version {})", path.display(), current + 1);
            }
            Err(e) => {
                metrics.rules_reload_failures.fetch_add(1, Ordering::Relaxed);
                eprintln!("afflio: rules reload refused, keeping version {current}: {e}");
            }
        }
    }
}

fn read_checkpoint(path: &Path, rules: Arc<Rules>) -> anyhow::Result<(Engine, u64)> {
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() >= 8 => {
            let (seq, body) = bytes.split_at(8);
            let seq = u64::from_le_bytes(seq.try_into().expect("8 bytes"));
            let engine = Engine::restore(rules, body).with_context(|| format!("cannot restore {}", path.display()))?;
            Ok((engine, seq))
        }
        Ok(_) => anyhow::bail!("checkpoint {} is truncated", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Engine::new(rules), 0)),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_checkpoint(path: &Path, seq: u64, state: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(&seq.to_le_bytes())?;
    f.write_all(state)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Messages applied since the last flush, and where flushes and
/// checkpoints stand.
struct Pending {
    first: Option<u64>,
    last: u64,
    published_us: Vec<i64>,
    /// The newest message received, acknowledged (with all before it) at the next checkpoint.
    ack: Option<jetstream::Message>,
    /// Stream position up to which rows are in Parquet files.
    flushed: u64,
    /// Stream position the last checkpoint holds.
    committed: u64,
    last_checkpoint: Instant,
    /// The checkpoint being written and the compaction after it, off the
    /// consumer's path (at most one); its position once durable.
    writing: Option<std::thread::JoinHandle<anyhow::Result<u64>>>,
}

/// A stream position, and the index of the event in an envelope.
struct MsgOrigin(u64, Option<usize>);

impl std::fmt::Display for MsgOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            None => write!(f, "nats:{}", self.0),
            Some(i) => write!(f, "nats:{}#{i}", self.0),
        }
    }
}

/// Decodes and applies one event's text, counting the outcome.
fn apply_text(engine: &mut Engine, metrics: &Metrics, text: &str, arrival: Arrival<'_>) {
    let outcome = match decode_event(text) {
        Ok(ev) => engine.apply(&ev, text, arrival),
        Err(e) => {
            engine.reject_undecodable(text, e.event_id.as_deref(), e.reason, e.field.as_deref(), e.detail, arrival)
        }
    };
    match outcome {
        Outcome::Applied => metrics.engine_applied.fetch_add(1, Ordering::Relaxed),
        Outcome::Duplicate => metrics.engine_duplicates.fetch_add(1, Ordering::Relaxed),
        Outcome::Rejected(_) => metrics.engine_rejected.fetch_add(1, Ordering::Relaxed),
    };
}

async fn consume(
    js: jetstream::Context,
    shared: SharedRules,
    metrics: Arc<Metrics>,
    opts: ServeOptions,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let rules = shared.read().map(|r| r.clone()).map_err(|_| anyhow::anyhow!("rules lock poisoned"))?;
    let ckpt = opts.state.join(CHECKPOINT);
    let (mut engine, committed) = read_checkpoint(&ckpt, rules)?;
    let store = StreamStore::open(&opts.data)?;
    let removed = store.recover(committed)?;
    store.snapshot(&engine, Utc::now(), committed)?;
    eprintln!("afflio: engine at stream position {committed} ({removed} uncommitted files removed)");
    metrics.engine_seq.store(committed, Ordering::Relaxed);
    metrics.engine_events.store(engine.events_read(), Ordering::Relaxed);

    let stream = js.get_stream(STREAM).await.map_err(|e| anyhow::anyhow!("stream {STREAM}: {e}"))?;
    // The checkpoint, not the consumer's delivery state, says where to resume:
    // messages delivered but not acknowledged before a crash would otherwise
    // come back only after the ack wait, out of order. Recreate the durable
    // consumer at the first position the checkpoint does not hold.
    let _ = stream.delete_consumer(CONSUMER).await;
    let deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: committed + 1 };
    let consumer: pull::Stream = loop {
        let c = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.to_string()),
                    ack_policy: AckPolicy::All,
                    ack_wait: Duration::from_secs(60),
                    max_ack_pending: 1_000_000,
                    deliver_policy,
                    ..Default::default()
                },
            )
            .await;
        match c {
            Ok(c) => {
                let c: jetstream::consumer::PullConsumer = c;
                // Short expiry and heartbeat: a pull request the server let
                // lapse is replaced within seconds, not after 30.
                let pulled = c
                    .stream()
                    .max_messages_per_batch(1000)
                    .expires(Duration::from_secs(5))
                    .heartbeat(Duration::from_secs(2))
                    .messages()
                    .await;
                match pulled {
                    Ok(m) => break m,
                    Err(e) => eprintln!("afflio: cannot pull messages, retrying: {e}"),
                }
            }
            Err(e) => eprintln!("afflio: cannot create consumer {CONSUMER}, retrying: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let mut messages = consumer;
    let mut pending = Pending {
        first: None,
        last: committed,
        published_us: Vec::new(),
        ack: None,
        flushed: committed,
        committed,
        last_checkpoint: Instant::now(),
        writing: None,
    };
    let every = opts.checkpoint_interval;
    let mut tick = tokio::time::interval(opts.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
                        _ = tick.tick() => {
                flush(&mut engine, &mut pending, &store, &ckpt, &metrics, every, false).await?;
            }
            msg = messages.next() => {
                let Some(msg) = msg else { anyhow::bail!("the message stream ended") };
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("afflio: pulling messages: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let info = msg.info().map_err(|e| anyhow::anyhow!("message info: {e}"))?;
                let seq = info.stream_sequence;
                let published_us = (info.published.unix_timestamp_nanos() / 1_000) as i64;
                metrics.stream_last_seq.fetch_max(seq + info.pending, Ordering::Relaxed);
                if seq <= pending.last {
                    // Applied before a restart or a redelivery: only acknowledge.
                    pending.ack = Some(msg);
                    continue;
                }
                // Pick up reloaded rules between events.
                if let Ok(r) = shared.read() {
                    if !Arc::ptr_eq(&r, engine.rules()) {
                        engine.set_rules(r.clone());
                    }
                }
                let now = Utc::now();
                if envelope::is_envelope(&msg.payload) {
                    match envelope::decode(&msg.payload) {
                        Ok(texts) => {
                            for (i, text) in texts.into_iter().enumerate() {
                                let origin = MsgOrigin(seq, Some(i));
                                apply_text(&mut engine, &metrics, text, Arrival { ts: now, origin: &origin });
                                pending.published_us.push(published_us);
                            }
                        }
                        Err(detail) => {
                            // Kept whole as a rejection: nothing is dropped silently.
                            let text = String::from_utf8_lossy(&msg.payload);
                            let origin = MsgOrigin(seq, None);
                            let arrival = Arrival { ts: now, origin: &origin };
                            engine.reject_undecodable(&text, None, Reason::Malformed, None, format!("broken envelope: {detail}"), arrival);
                            metrics.engine_rejected.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else {
                    let text = String::from_utf8_lossy(&msg.payload);
                    let origin = MsgOrigin(seq, None);
                    apply_text(&mut engine, &metrics, &text, Arrival { ts: now, origin: &origin });
                    pending.published_us.push(published_us);
                }
                pending.first.get_or_insert(seq);
                pending.last = seq;
                pending.ack = Some(msg);
                metrics.engine_seq.store(seq, Ordering::Relaxed);
                metrics.engine_events.store(engine.events_read(), Ordering::Relaxed);
                                if pending.published_us.len() >= opts.flush_events {
                    flush(&mut engine, &mut pending, &store, &ckpt, &metrics, every, false).await?;
                }
            }
        }
    }
    flush(&mut engine, &mut pending, &store, &ckpt, &metrics, every, true).await?;
    Ok(())
}

/// Writes the rows applied since the last flush as Parquet files; when a
/// checkpoint is due (or `force`), checkpoints the engine at the flushed
/// position and acknowledges up to it. Rows flushed after the last
/// checkpoint are removed on recovery and written again, identically, from
/// the stream: flushes can be frequent (latency) while checkpoints, whose
/// cost grows with the engine's state, are not.
async fn flush(
    engine: &mut Engine,
    pending: &mut Pending,
    store: &StreamStore,
    ckpt: &Path,
    metrics: &Metrics,
    checkpoint_every: Duration,
    force: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    if let Some(first) = pending.first.take() {
        let out = engine.take_output();
        store.append(first, pending.last, &out)?;
        pending.flushed = pending.last;
        let done_us = Utc::now().timestamp_micros();
        for p in pending.published_us.drain(..) {
            metrics.record_capture_to_ledger_us((done_us - p).max(1) as u64);
        }
        metrics.record_flush_us(started.elapsed().as_micros() as u64);
        let mem = engine.memory();
        metrics.tracked_visitors.store(mem.visitors as u64, Ordering::Relaxed);
        metrics.tracked_orders.store(mem.orders as u64, Ordering::Relaxed);
    }
    let due = force || pending.last_checkpoint.elapsed() >= checkpoint_every;
    if due || pending.writing.as_ref().is_some_and(|w| w.is_finished()) {
        if let Some(w) = pending.writing.take() {
            pending.committed =
                w.join().map_err(|_| anyhow::anyhow!("internal error: checkpoint writer panicked"))??;
        }
    }
    if due {
        // The engine has applied exactly up to `flushed` (output taken above).
        if pending.flushed > pending.committed {
            // The state tables (open orders, lines, balances) are rewritten
            // here, not at every flush: their cost grows with the open
            // orders, the append-only tables' with the new rows only. The
            // state is encoded here (consistent with `flushed`); writing it,
            // and compacting the committed small files, happen on a thread:
            // `committed` moves only once the checkpoint is durable, and
            // recovery removes whatever is newer.
            let t0 = Instant::now();
            store.snapshot(engine, Utc::now(), pending.flushed)?;
            let t1 = Instant::now();
            let state = engine.checkpoint()?;
            let t2 = Instant::now();
            let (path, store, pos) = (ckpt.to_path_buf(), store.clone(), pending.flushed);
            let log = std::env::var_os("AFFLIO_LOG_CHECKPOINTS").is_some();
            pending.writing = Some(std::thread::spawn(move || {
                let t3 = Instant::now();
                write_checkpoint(&path, pos, &state)?;
                let t4 = Instant::now();
                // Committed files only: keep the number of small files bounded.
                store.compact(pos, COMPACT_AFTER_FILES)?;
                if log {
                    eprintln!(
                        "afflio: checkpoint at {pos}: snapshot {:?}, state encoded {:?} ({} bytes); written {:?}, compaction {:?} (off the consumer)",
                        t1 - t0,
                        t2 - t1,
                        state.len(),
                        t4 - t3,
                        t4.elapsed()
                    );
                }
                Ok(pos)
            }));
            if force {
                if let Some(w) = pending.writing.take() {
                    pending.committed =
                        w.join().map_err(|_| anyhow::anyhow!("internal error: checkpoint writer panicked"))??;
                }
            }
        }
        pending.last_checkpoint = Instant::now();
    }
    // Acknowledge what is durable: every message up to here has its rows in
    // synced Parquet files (AckAll: everything up to it). Resuming never
    // depends on acknowledgements: a restart recreates the consumer at the
    // checkpoint's position, and the stream keeps acknowledged messages.
    if let Some(msg) = pending.ack.take() {
        if let Err(e) = msg.ack().await {
            // Not fatal: unacknowledged messages come back and are skipped.
            eprintln!("afflio: ack failed (will be redelivered and skipped): {e}");
        }
    }
    Ok(())
}
