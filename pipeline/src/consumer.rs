//! The ordered consumer: stream messages in, engine decisions, epochs out.
//!
//! Every message is applied as it arrives (decision latency is the time
//! from the broker's storage to here). Every `epoch` interval, when the
//! committer is free, the consumer cuts an epoch: the rows produced since
//! the last cut, the state tables' changes and the engine's checkpoint delta,
//! all consistent with the same stream position. If the committer is busy
//! the epoch grows (up to `max_epoch_events`, then the consumer waits).
//!
//! After a restart, epochs are also cut exactly at every position a table
//! holds beyond the checkpoint, so that each epoch is either wholly in a
//! table or not at all; until the stream is past all of them ("catch-up")
//! epochs carry no state changes, no checkpoint and no commit record: the
//! tables are only given the append-only rows they lack.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use afflio_engine::{Arrival, Engine, Outcome, Reason};
use afflio_ingest::http::{LinkDirectory, RegisteredLink, SharedRules};
use afflio_ingest::metrics::Metrics;
use afflio_ingest::{decode_event, envelope};
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use chrono::Utc;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::committer::Epoch;
use crate::error::PipelineError;

/// The durable consumer's name.
const CONSUMER: &str = "afflio-engine";

/// How the consumer cuts epochs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cutting {
    pub(crate) interval: Duration,
    pub(crate) max_events: usize,
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

/// What the consumer holds between cuts.
pub(crate) struct Consumer {
    pub(crate) engine: Engine,
    pub(crate) metrics: Arc<Metrics>,
    /// Positions a table holds beyond the checkpoint: epochs end exactly there.
    pub(crate) cut_points: BTreeSet<u64>,
    /// Until the stream is past this position, epochs are catch-up epochs.
    pub(crate) catch_up_to: u64,
    /// The last position applied.
    pub(crate) last: u64,
    first: Option<u64>,
    published_us: Vec<i64>,
    events: u64,
    ack: Option<jetstream::Message>,
    /// The ingest tier's directory of registry links, told of new ones.
    pub(crate) links: Arc<LinkDirectory>,
}

impl Consumer {
    pub(crate) fn new(engine: Engine, metrics: Arc<Metrics>, position: u64, cut_points: BTreeSet<u64>) -> Consumer {
        let catch_up_to = cut_points.iter().max().copied().unwrap_or(position).max(position);
        Consumer {
            engine,
            metrics,
            cut_points,
            catch_up_to,
            last: position,
            first: None,
            published_us: Vec::new(),
            events: 0,
            ack: None,
            links: Arc::new(LinkDirectory::default()),
        }
    }

    /// Cuts the epoch since the last cut (`None` when nothing was applied).
    pub(crate) fn cut(&mut self) -> Result<Option<Epoch>, PipelineError> {
        let Some(first) = self.first.take() else { return Ok(None) };
        let output = self.engine.take_output();
        let normal = self.last > self.catch_up_to;
        let (changes, delta) = if normal {
            let changes = self.engine.take_state_changes(Utc::now());
            (Some(changes), Some(self.engine.checkpoint_delta()?))
        } else {
            (None, None)
        };
        let mem = self.engine.memory();
        let m = &self.metrics;
        m.tracked_visitors.store(mem.visitors as u64, Ordering::Relaxed);
        m.tracked_orders.store(mem.orders as u64, Ordering::Relaxed);
        m.tracked_dedupe_ids.store(mem.dedupe_ids as u64, Ordering::Relaxed);
        m.tracked_velocity_keys.store(mem.velocity_keys as u64, Ordering::Relaxed);
        m.state_memory_bytes.store(mem.estimated_bytes(), Ordering::Relaxed);
        Ok(Some(Epoch {
            first,
            last: self.last,
            output,
            changes,
            delta,
            published_us: std::mem::take(&mut self.published_us),
            events: std::mem::take(&mut self.events),
            ack: self.ack.take(),
        }))
    }

    /// Applies one stream message. Returns whether an epoch must end here.
    pub(crate) fn apply(&mut self, seq: u64, published_us: i64, payload: &[u8]) -> bool {
        let arrival_ts = chrono::DateTime::from_timestamp_micros(published_us).unwrap_or_else(Utc::now);
        let before = self.engine.events_read();
        if envelope::is_envelope(payload) {
            match envelope::decode(payload) {
                Ok(texts) => {
                    for (i, text) in texts.into_iter().enumerate() {
                        let origin = MsgOrigin(seq, Some(i));
                        apply_text(
                            &mut self.engine,
                            &self.metrics,
                            text,
                            Arrival { ts: arrival_ts, origin: &origin, clock: Some(arrival_ts) },
                        );
                    }
                }
                Err(detail) => {
                    // Kept whole as a rejection: nothing is dropped silently.
                    let text = String::from_utf8_lossy(payload);
                    let origin = MsgOrigin(seq, None);
                    let arrival = Arrival { ts: arrival_ts, origin: &origin, clock: Some(arrival_ts) };
                    self.engine.reject_undecodable(
                        &text,
                        None,
                        Reason::Malformed,
                        None,
                        format!("broken envelope: {detail}"),
                        arrival,
                    );
                    self.metrics.engine_rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else {
            let text = String::from_utf8_lossy(payload);
            let origin = MsgOrigin(seq, None);
            apply_text(
                &mut self.engine,
                &self.metrics,
                &text,
                Arrival { ts: arrival_ts, origin: &origin, clock: Some(arrival_ts) },
            );
        }
        let n = self.engine.events_read() - before;
        let decided = Utc::now().timestamp_micros();
        self.metrics.record_decision_us_n((decided - published_us).max(1) as u64, n.max(1));
        self.published_us.extend(std::iter::repeat_n(published_us, n as usize));
        self.events += n;
        self.first.get_or_insert(seq);
        self.last = seq;
        self.metrics.engine_seq.store(seq, Ordering::Relaxed);
        self.metrics.engine_events.store(self.engine.events_read(), Ordering::Relaxed);
        self.cut_points.remove(&seq) || seq == self.catch_up_to
    }

    pub(crate) fn pending_events(&self) -> usize {
        self.events as usize
    }
}

/// Creates the durable consumer at `start` and returns its message stream.
/// The checkpoint, not the consumer's delivery state, says where to resume:
/// the consumer is recreated there on every start.
pub(crate) async fn messages(js: &jetstream::Context, start: u64) -> Result<pull::Stream, PipelineError> {
    let stream = js
        .get_stream(afflio_ingest::nats::STREAM)
        .await
        .map_err(|e| PipelineError::Broker(format!("stream {}: {e}", afflio_ingest::nats::STREAM)))?;
    let _ = stream.delete_consumer(CONSUMER).await;
    let deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: start };
    loop {
        let c = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.to_string()),
                    ack_policy: AckPolicy::All,
                    ack_wait: Duration::from_secs(120),
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
                    Ok(m) => return Ok(m),
                    Err(e) => eprintln!("afflio: cannot pull messages, retrying: {e}"),
                }
            }
            Err(e) => eprintln!("afflio: cannot create consumer {CONSUMER}, retrying: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn registered(l: &afflio_engine::rules::Link) -> RegisteredLink {
    RegisteredLink {
        program_id: l.program_id.clone(),
        partner_id: l.partner_id.clone(),
        destination: l.destination.clone(),
    }
}

/// Applies the stream until `stop`, sending epochs to the committer.
pub(crate) async fn run(
    mut c: Consumer,
    mut messages: pull::Stream,
    shared: SharedRules,
    cutting: Cutting,
    tx: mpsc::Sender<Epoch>,
    mut queries: mpsc::Receiver<crate::finance::EngineQuery>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    // The ingest tier learns the registry's links as they are created.
    let links = c.links.clone();
    c.engine.set_link_feed(true);
    c.engine.set_notices(true);
    for l in c.engine.registry_links() {
        links.insert(&l.id, registered(&l));
    }
    let mut tick = tokio::time::interval(cutting.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            // A question about the engine (the payouts queue), between two events.
            Some(q) = queries.recv() => q(&c.engine, c.last),
            _ = tick.tick() => {
                // Cut when the committer is free; otherwise the epoch grows.
                if c.pending_events() > 0 {
                    if let Ok(permit) = tx.try_reserve() {
                        if let Some(e) = c.cut()? {
                            permit.send(e);
                        }
                    }
                }
            }
            msg = messages.next() => {
                let Some(msg) = msg else { return Err(PipelineError::Broker("the message stream ended".into())) };
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("afflio: pulling messages: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let info = msg.info().map_err(|e| PipelineError::Broker(format!("message info: {e}")))?;
                let seq = info.stream_sequence;
                let published_us = (info.published.unix_timestamp_nanos() / 1_000) as i64;
                c.metrics.stream_last_seq.fetch_max(seq + info.pending, Ordering::Relaxed);
                if seq <= c.last {
                    // Applied before (a redelivery): nothing to do.
                    continue;
                }
                // Pick up reloaded rules between events.
                if let Ok(r) = shared.read() {
                    if !Arc::ptr_eq(&r, c.engine.rules()) {
                        c.engine.set_rules(r.clone());
                    }
                }
                let must_cut = c.apply(seq, published_us, &msg.payload);
                for l in c.engine.take_new_links() {
                    if !links.insert(&l.id, registered(&l)) {
                        eprintln!("afflio: the ingest's link directory is full: link {:?} redirects after a restart", l.id);
                    }
                }
                c.ack = Some(msg);
                if must_cut || c.pending_events() >= cutting.max_events {
                    let permit = tx.reserve().await.map_err(|_| PipelineError::Internal("the committer stopped".into()))?;
                    if let Some(e) = c.cut()? {
                        permit.send(e);
                    }
                }
            }
        }
    }
    // The last epoch, whatever the committer's load.
    if let Some(e) = c.cut()? {
        tx.send(e).await.map_err(|_| PipelineError::Internal("the committer stopped".into()))?;
    }
    Ok(())
}
