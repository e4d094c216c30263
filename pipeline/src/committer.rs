//! The committer: makes each epoch durable, in this order:
//!
//! 0. the webhook outbox: the epoch's messages (ids derived from the
//!    effects, so a re-published epoch is recognised by the broker);
//! 1. the store: every table's rows of the epoch, each table's commit
//!    carrying the epoch's last stream position (tables that already hold
//!    it are skipped), then the commit record in `epochs` (readers switch
//!    to the new version of every table at once);
//! 2. the engine's checkpoint delta, at that position;
//! 3. the broker's acknowledgement of the epoch's messages.
//!
//! A crash anywhere leaves a checkpoint at or before the store's positions:
//! the stream after the checkpoint is applied again and every row the store
//! holds is recognised. A commit that fails (the disk, a conflict) is
//! retried; meanwhile the consumer's next epoch waits (backpressure).
//! Between epochs the committer also folds checkpoint deltas and maintains
//! the store (OPTIMIZE, VACUUM), off the consumer's path.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use afflio_engine::{Output, StateChanges};
use afflio_ingest::http::SharedRules;
use afflio_ingest::metrics::Metrics;
use afflio_sinks::{Maintenance, Mode, Position, Store, Write};
use async_nats::jetstream;
use chrono::Utc;
use tokio::sync::mpsc;

use crate::error::PipelineError;
use crate::state::StateBackend;

/// The rows, state changes and checkpoint delta of stream positions
/// `first..=last`.
pub(crate) struct Epoch {
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) output: Output,
    /// `None` in catch-up: the state tables and the checkpoint wait.
    pub(crate) changes: Option<StateChanges>,
    pub(crate) delta: Option<Vec<u8>>,
    /// Broker storage time of each event, microseconds (for freshness).
    pub(crate) published_us: Vec<i64>,
    pub(crate) events: u64,
    /// The last message, acknowledged (with all before it) once durable.
    pub(crate) ack: Option<jetstream::Message>,
}

/// When the committer maintains the store.
#[derive(Clone, Debug)]
pub(crate) struct Upkeep {
    pub(crate) every: Duration,
    pub(crate) vacuum_every: Duration,
    pub(crate) maintenance: Maintenance,
}

pub(crate) struct Committer {
    pub(crate) store: Store,
    pub(crate) state: Box<dyn StateBackend>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) rules: SharedRules,
    pub(crate) app: String,
    /// The webhook outbox: an epoch's messages are published before it is committed.
    pub(crate) outbox: Option<crate::webhooks::outbox::Outbox>,
    pub(crate) upkeep: Upkeep,
}

impl Committer {
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Epoch>) -> Result<(), PipelineError> {
        let mut last_upkeep = Instant::now();
        let mut last_vacuum = Instant::now();
        let mut next_table = 0usize;
        while let Some(epoch) = rx.recv().await {
            self.commit(epoch).await?;
            let rules =
                self.rules.read().map(|r| r.clone()).map_err(|_| PipelineError::Internal("rules lock".into()))?;
            if let Some(c) = tokio::task::block_in_place(|| self.state.maintain(&rules))? {
                self.metrics.state_folds.fetch_add(1, Ordering::Relaxed);
                self.metrics.state_image_bytes.store(c.image_bytes, Ordering::Relaxed);
                eprintln!(
                    "afflio: checkpoint: {} deltas folded into a {} byte image in {:?} (off the consumer)",
                    c.deltas_folded, c.image_bytes, c.took
                );
            }
            if last_upkeep.elapsed() >= self.upkeep.every {
                let vacuum = last_vacuum.elapsed() >= self.upkeep.vacuum_every;
                self.upkeep_step(&mut next_table, vacuum).await;
                if vacuum {
                    last_vacuum = Instant::now();
                }
                last_upkeep = Instant::now();
            }
        }
        tokio::task::block_in_place(|| self.state.finish())?;
        Ok(())
    }

    /// Commits one epoch: store, checkpoint, acknowledgement.
    async fn commit(&mut self, epoch: Epoch) -> Result<(), PipelineError> {
        let started = Instant::now();
        let normal = epoch.delta.is_some();
        // Webhooks first: an epoch in the store has its messages in the
        // outbox, so a catch-up epoch (already in the store) publishes none.
        if normal {
            if let Some(outbox) = &self.outbox {
                let n = outbox.publish(&epoch.output).await;
                self.metrics.webhook_messages.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        let position = Position { app: self.app.clone(), seq: epoch.last as i64 };
        let mut attempt = 0u32;
        loop {
            let w = Write {
                output: &epoch.output,
                changes: epoch.changes.as_ref(),
                mode: Mode::Upsert,
                position: Some(&position),
                writer: "serve",
            };
            let result = if normal { self.store.write(w).await } else { self.store.write_rows_only(w).await };
            match result {
                Ok(_) => break,
                Err(e) => {
                    // The disk or a conflicting writer: nothing of this epoch
                    // is lost (tables that took it are skipped on the retry).
                    attempt += 1;
                    self.metrics.store_commit_failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "afflio: store commit of stream positions {}..={} failed (attempt {attempt}), retrying: {e}",
                        epoch.first, epoch.last
                    );
                    tokio::time::sleep(Duration::from_millis((100 * 2u64.pow(attempt.min(6))).min(5_000))).await;
                    if let Err(e) = self.store.refresh().await {
                        eprintln!("afflio: cannot reload the store: {e}");
                    }
                }
            }
        }
        self.metrics.record_commit_us(started.elapsed().as_micros() as u64);
        self.metrics.store_commits.fetch_add(1, Ordering::Relaxed);
        self.metrics.epoch_events.store(epoch.events, Ordering::Relaxed);
        let Some(delta) = epoch.delta else {
            // Catch-up: no checkpoint until the stream is past every table.
            return Ok(());
        };
        let now = Utc::now().timestamp_micros();
        for p in &epoch.published_us {
            self.metrics.record_freshness_us((now - p).max(1) as u64);
        }
        let saved = tokio::task::block_in_place(|| self.state.save(epoch.last, &delta))?;
        let m = &self.metrics;
        m.checkpoint_bytes.store(saved.bytes, Ordering::Relaxed);
        m.checkpoint_ms.store(saved.took.as_millis() as u64, Ordering::Relaxed);
        m.state_image_bytes.store(saved.image_bytes, Ordering::Relaxed);
        m.state_delta_bytes.store(saved.delta_bytes, Ordering::Relaxed);
        m.state_deltas.store(saved.deltas as u64, Ordering::Relaxed);
        m.committed_seq.store(epoch.last, Ordering::Relaxed);
        if let Some(msg) = epoch.ack {
            // Not needed to resume (the checkpoint says where), only for the broker.
            if let Err(e) = msg.ack().await {
                eprintln!("afflio: ack failed (harmless: a restart resumes from the checkpoint): {e}");
            }
        }
        Ok(())
    }

    /// One maintenance step, one table at a time so that an epoch waits for
    /// at most one: OPTIMIZE of the next table with many small files, or,
    /// when VACUUM is due, VACUUM of the next table; after an OPTIMIZE a
    /// commit record, so that readers of the latest version read the
    /// merged files.
    async fn upkeep_step(&mut self, next: &mut usize, vacuum: bool) {
        let names: Vec<&str> = Store::table_names().collect();
        let m = self.upkeep.maintenance.clone();
        if vacuum {
            for name in &names {
                match self.store.vacuum(name, &m).await {
                    Ok(r) if r.files_vacuumed > 0 => {
                        self.metrics.maintenance_runs.fetch_add(1, Ordering::Relaxed);
                        eprintln!("afflio: vacuum {r}");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.metrics.maintenance_failures.fetch_add(1, Ordering::Relaxed);
                        eprintln!("afflio: vacuum {name} failed (will try again): {e}");
                    }
                }
            }
            return;
        }
        for _ in 0..names.len() {
            let name = names[*next % names.len()];
            *next += 1;
            if self.store.mergeable_files(name) < m.min_files {
                continue;
            }
            match self.store.optimize(name, &m, false).await {
                Ok(r) => {
                    self.metrics.maintenance_runs.fetch_add(1, Ordering::Relaxed);
                    eprintln!("afflio: optimize {r}");
                    if let Err(e) = self.store.record_maintenance().await {
                        eprintln!("afflio: cannot record the maintenance: {e}");
                    }
                }
                Err(e) => {
                    self.metrics.maintenance_failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("afflio: optimize {name} failed (will try again): {e}");
                }
            }
            return;
        }
    }
}
