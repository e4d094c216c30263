//! Reviews on a replayed store: the engine's state is kept next to the
//! tables (`DIR/.state/`), a review is an event of type `review` applied to
//! it like any other (same validation, same idempotency), and the store is
//! amended: the decisions as new rows, the orders, lines and balances that
//! changed upserted. In the live service the same event goes through `POST
//! /v1/events` with a reviewer key.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Decision, DecisionRow, Engine, Outcome, Rejection};
use afflio_ingest::decode_event;
use afflio_sinks::{Mode, Position, Store, Write};
use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use serde_json::json;

fn state_dir(data: &Path) -> PathBuf {
    data.join(".state")
}

/// "Now" for a replayed store's lifecycle: the replay's `--as-of` when it
/// was given, else each program's newest applied event time (one program's
/// clock never decides another's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreNow {
    pub explicit: Option<DateTime<Utc>>,
}

impl StoreNow {
    pub fn of(&self, engine: &Engine, program_id: &str) -> DateTime<Utc> {
        self.explicit.or_else(|| engine.watermark(program_id)).unwrap_or(DateTime::UNIX_EPOCH)
    }

    fn text(&self) -> String {
        self.explicit.map_or_else(|| "per-program".to_string(), |t| t.to_rfc3339())
    }
}

/// Saves the engine and the store's "now" next to the tables; a replay
/// also names its run (the store's writes after it are identified by it).
pub fn save_state(data: &Path, engine: &Engine, now: StoreNow, run_id: Option<&str>) -> anyhow::Result<()> {
    let dir = state_dir(data);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bytes = engine.checkpoint().context("internal error: engine checkpoint with output pending")?;
    let mut files = vec![("engine.ckpt", bytes), ("as_of", now.text().into_bytes())];
    if let Some(r) = run_id {
        files.push(("run_id", r.as_bytes().to_vec()));
    }
    for (name, content) in files {
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, content).with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, dir.join(name)).with_context(|| format!("cannot write {}", dir.join(name).display()))?;
    }
    Ok(())
}

/// Writes what `engine` did since it was loaded (its rows, and the orders,
/// lines and balances that changed, as of `now`) to the store at `data`,
/// then saves its state. The write carries the engine's event count as its
/// position: run again after a crash between the two, it is recognised and
/// not written twice.
pub fn amend(
    data: &Path,
    engine: &mut Engine,
    now: DateTime<Utc>,
    store_now: StoreNow,
    writer: &str,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(amend_async(data, engine, now, store_now, writer))
}

/// [`amend`] from async code.
pub async fn amend_async(
    data: &Path,
    engine: &mut Engine,
    now: DateTime<Utc>,
    store_now: StoreNow,
    writer: &str,
) -> anyhow::Result<()> {
    let out = engine.take_output();
    let changes = engine.take_state_changes(now);
    let run = fs::read_to_string(state_dir(data).join("run_id")).unwrap_or_else(|_| "store".into());
    let position = Position { app: format!("afflio:cli:{}", run.trim()), seq: engine.events_read() as i64 };
    let mut store = Store::open(data).await.with_context(|| format!("cannot open the store at {}", data.display()))?;
    store
        .write(Write { output: &out, changes: Some(&changes), mode: Mode::Upsert, position: Some(&position), writer })
        .await
        .with_context(|| format!("cannot write the store at {}", data.display()))?;
    save_state(data, engine, store_now, None)
}

/// The engine and "now" of a replayed store.
pub fn load_state(data: &Path, rules: Rules) -> anyhow::Result<(Engine, StoreNow)> {
    let dir = state_dir(data);
    let ckpt = dir.join("engine.ckpt");
    let bytes = fs::read(&ckpt).with_context(|| {
        format!(
            "{} holds no engine state ({}): run `afflio replay --out {}` first",
            data.display(),
            ckpt.display(),
            data.display()
        )
    })?;
    let engine =
        Engine::restore(Arc::new(rules), &bytes).with_context(|| format!("cannot restore {}", ckpt.display()))?;
    let text = fs::read_to_string(dir.join("as_of"))
        .with_context(|| format!("cannot read {}", dir.join("as_of").display()))?;
    let explicit = match text.trim() {
        "per-program" => None,
        t => Some(
            DateTime::parse_from_rfc3339(t)
                .with_context(|| format!("{} is not a time: {text:?}", dir.join("as_of").display()))?
                .with_timezone(&Utc),
        ),
    };
    Ok((engine, StoreNow { explicit }))
}

/// `program`, or the config's only program when none is named.
pub fn program_or_only(rules: &Rules, program: Option<String>) -> anyhow::Result<String> {
    if let Some(p) = program {
        return Ok(p);
    }
    let ids: Vec<&str> = rules.programs().map(|p| p.id.as_str()).collect();
    match ids.as_slice() {
        [one] => Ok(one.to_string()),
        _ => bail!("the config has {} programs ({}): name one with --program", ids.len(), ids.join(", ")),
    }
}

/// One reviewer decision, as typed on the command line.
#[derive(Debug, Clone)]
pub struct ReviewRequest {
    pub decision: Decision,
    pub program_id: Option<String>,
    pub order_id: Option<String>,
    pub partner_id: Option<String>,
    pub tier: Option<u8>,
    pub reason: Option<String>,
    pub reviewer: String,
    /// The review's time; default: the store's "now".
    pub at: Option<DateTime<Utc>>,
    /// The review's event id; default: derived from the time and content.
    pub event_id: Option<String>,
}

/// What a review did.
#[derive(Debug)]
pub enum ReviewResult {
    Applied(Vec<DecisionRow>),
    /// The same review (same event id and content) was applied before.
    Duplicate,
    Rejected(Rejection),
}

/// Applies `req` to the store at `data` and amends the store.
pub fn review(rules: Rules, data: &Path, req: &ReviewRequest) -> anyhow::Result<ReviewResult> {
    let program_id = program_or_only(&rules, req.program_id.clone())?;
    let (mut engine, store_now) = load_state(data, rules)?;
    let program_now = store_now.of(&engine, &program_id);
    let ts = req.at.unwrap_or(program_now);
    let mut ev = json!({
        "type": "review",
        "ts": ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "program_id": program_id,
        "decision": req.decision.as_str(),
        "reviewer": req.reviewer,
    });
    for (k, v) in [("order_id", &req.order_id), ("partner_id", &req.partner_id), ("reason", &req.reason)] {
        if let Some(v) = v {
            ev[k] = json!(v);
        }
    }
    if let Some(t) = req.tier {
        ev["tier"] = json!(t);
    }
    let event_id = match &req.event_id {
        Some(id) => id.clone(),
        None => format!("review-{:016x}", xxhash_rust::xxh3::xxh3_64(ev.to_string().as_bytes())),
    };
    ev["event_id"] = json!(event_id);
    let text = ev.to_string();
    let event = decode_event(&text).map_err(|e| anyhow::anyhow!("invalid review: {e}"))?;
    let arrival = Arrival { ts: Utc::now(), origin: &"afflio review", clock: None };
    let outcome = engine.apply(&event, &text, arrival);
    let decisions = engine.pending_output().decisions.clone();
    let rejection = engine.pending_output().rejections.first().cloned();
    let now = program_now.max(ts);
    amend(data, &mut engine, now, store_now, "review")?;
    Ok(match outcome {
        Outcome::Applied => ReviewResult::Applied(decisions),
        Outcome::Duplicate => ReviewResult::Duplicate,
        Outcome::Rejected(_) => {
            ReviewResult::Rejected(rejection.context("internal error: a rejected review left no rejection")?)
        }
    })
}
