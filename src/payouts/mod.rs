//! The payouts queue on a replayed store (`afflio payouts ...`): the
//! queue of `afflio-payouts` over a [`StoreBook`], the engine state kept
//! next to the tables. Every record the queue makes is applied and written
//! to the store (tables, then state) before the queue goes on: an attempt is
//! durable before its request leaves.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Engine, Outcome};
use afflio_ingest::decode_event;
use afflio_payouts::{Book, BookError, HttpSettings, Queue};
use anyhow::Context;
use chrono::{DateTime, Utc};

pub use afflio_payouts::{sandbox, Plan, PlannedItem, QueueError, Report, WebhookError};

use crate::review::StoreNow;

/// A replayed store as the queue's book, held exclusively while it is open
/// (two payout commands on one store would each write their own state).
pub struct StoreBook {
    data: PathBuf,
    engine: Engine,
    store_now: StoreNow,
    _lock: File,
    /// Records refused by the engine (a bug or a race), with their reasons.
    pub refused: Vec<String>,
}

impl StoreBook {
    pub fn open(data: &Path, rules: Rules) -> anyhow::Result<StoreBook> {
        let dir = data.join(".state");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("payouts.lock");
        let lock = File::create(&path).with_context(|| format!("cannot open {}", path.display()))?;
        lock.try_lock().map_err(|_| {
            anyhow::anyhow!("another payouts command is working on {} (it holds {})", data.display(), path.display())
        })?;
        let (engine, store_now) = crate::review::load_state(data, rules)?;
        Ok(StoreBook { data: data.to_path_buf(), engine, store_now, _lock: lock, refused: Vec::new() })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn now(&self) -> DateTime<Utc> {
        let rules = self.engine.rules().clone();
        rules.programs().map(|p| self.store_now.of(&self.engine, &p.id)).max().unwrap_or(DateTime::UNIX_EPOCH)
    }
}

impl Book for StoreBook {
    async fn read<R: Send + 'static>(&mut self, f: impl FnOnce(&Engine) -> R + Send + 'static) -> Result<R, BookError> {
        Ok(f(&self.engine))
    }

    async fn record(&mut self, events: Vec<String>) -> Result<(), BookError> {
        if events.is_empty() {
            return Ok(());
        }
        for text in &events {
            let ev =
                decode_event(text).map_err(|e| BookError::Internal(format!("a payout record does not decode: {e}")))?;
            let arrival = Arrival { ts: Utc::now(), origin: &"afflio payouts", clock: None };
            if let Outcome::Rejected(r) = self.engine.apply(&ev, text, arrival) {
                let detail =
                    self.engine.pending_output().rejections.last().map(|r| r.detail.clone()).unwrap_or_default();
                eprintln!("warning: payout record refused ({}): {detail}", r.as_str());
                self.refused.push(format!("{}: {detail}", r.as_str()));
            }
        }
        let now = self.now();
        crate::review::amend_async(&self.data, &mut self.engine, now, self.store_now, "payouts")
            .await
            .map_err(|e| BookError::Unavailable(format!("{e:#}")))
    }

    async fn event_time(&mut self, program_id: String) -> Result<DateTime<Utc>, BookError> {
        Ok(self.store_now.of(&self.engine, &program_id))
    }
}

/// HTTP settings for the providers: `AFFLIO_PAYOUT_TIMEOUT_SECS` bounds a request.
pub fn http_settings() -> HttpSettings {
    let mut s = HttpSettings::default();
    if let Some(secs) = std::env::var("AFFLIO_PAYOUT_TIMEOUT_SECS").ok().and_then(|v| v.parse::<f64>().ok()) {
        s.timeout = std::time::Duration::from_secs_f64(secs.max(0.05));
    }
    s
}

/// The queue over the providers the rules configure (credentials from the
/// environment).
pub fn queue(rules: &Rules) -> anyhow::Result<Queue> {
    Queue::from_env(Arc::new(rules.clone()), http_settings()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Plans a batch for `program_id` as of `at` (default: the store's "now").
pub async fn plan(rules: Rules, data: &Path, program_id: &str, at: Option<DateTime<Utc>>) -> anyhow::Result<Plan> {
    // Planning needs no credentials: only the rules.
    let q = Queue::new(Arc::new(rules.clone()), Vec::new());
    let mut book = StoreBook::open(data, rules)?;
    Ok(q.plan(&mut book, program_id, at).await?)
}

/// Sends planned items (of `batch`, or every batch) and resolves unknown ones.
pub async fn send(rules: Rules, data: &Path, program_id: &str, batch: Option<&str>) -> anyhow::Result<Report> {
    let q = queue(&rules)?;
    let mut book = StoreBook::open(data, rules)?;
    Ok(q.send(&mut book, program_id, batch, Utc::now()).await?)
}

/// Asks the providers where items stand.
pub async fn sync(rules: Rules, data: &Path, program_id: &str) -> anyhow::Result<Report> {
    let q = queue(&rules)?;
    let mut book = StoreBook::open(data, rules)?;
    Ok(q.sync(&mut book, program_id, Utc::now()).await?)
}

/// Settles an unknown (or sent) item on a person's word.
#[allow(clippy::too_many_arguments)]
pub async fn resolve(
    rules: Rules,
    data: &Path,
    program_id: &str,
    batch_id: &str,
    partner_id: &str,
    status: afflio_engine::PayoutStatus,
    by: &str,
    note: &str,
) -> anyhow::Result<Report> {
    let q = Queue::new(Arc::new(rules.clone()), Vec::new());
    let mut book = StoreBook::open(data, rules)?;
    Ok(q.resolve_by_hand(&mut book, program_id, batch_id, partner_id, status, by, note).await?)
}

/// Verifies a provider's webhook (its headers and raw body) and applies it.
pub async fn webhook(
    rules: Rules,
    data: &Path,
    provider: &str,
    headers: http::HeaderMap,
    body: Vec<u8>,
) -> Result<Report, WebhookError> {
    let q = queue(&rules).map_err(|e| WebhookError::NotConfigured("payouts", format!("{e:#}")))?;
    let mut book = StoreBook::open(data, rules).map_err(|e| WebhookError::Unavailable(format!("{e:#}")))?;
    q.webhook(&mut book, provider, headers, body).await
}
