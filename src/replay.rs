//! Replay: a JSON Lines file through the same engine as the live service,
//! into the Parquet store.

use std::collections::BTreeMap;
use std::fmt;
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Engine, LineStatus, Output, Stats};
use afflio_ingest::{decode_event, JsonLines};
use afflio_sinks::{state_changes_of, Mode, Store, Write};
use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

/// Rows buffered in the engine before they are appended to the store.
const FLUSH_ROWS: usize = 64 * 1024;

/// Where a line came from, formatted only for rejections.
struct LineOrigin<'a> {
    file: &'a str,
    line: u64,
}

impl fmt::Display for LineOrigin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// Commission by status and flags by rule, over open and closed orders.
#[derive(Default)]
struct Tally {
    commission: BTreeMap<(String, LineStatus), Decimal>,
    flags_by_rule: BTreeMap<&'static str, u64>,
}

impl Tally {
    fn order(&mut self, o: &afflio_engine::Order, statuses: &[LineStatus]) {
        for (l, &status) in o.lines.iter().zip(statuses) {
            *self.commission.entry((o.currency.code().to_string(), status)).or_insert(Decimal::ZERO) += l.net;
        }
        for r in &o.flags {
            *self.flags_by_rule.entry(r.as_str()).or_insert(0) += 1;
        }
    }

    fn closed(&mut self, closed: &[afflio_engine::ClosedOrder]) {
        for c in closed {
            self.order(&c.order, &c.statuses);
        }
    }
}

/// What a replay did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub stats: Stats,
    pub as_of: Option<DateTime<Utc>>,
    /// "Now" was each program's newest event time (no --as-of).
    pub per_program_now: bool,
    /// Net commission per (currency, status).
    pub commission: BTreeMap<(String, LineStatus), Decimal>,
    pub flags_by_rule: BTreeMap<&'static str, u64>,
    pub lines_read: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// The engine's state at the end.
    pub memory: afflio_engine::MemoryReport,
    /// Decode + apply time of a sample of events, nanoseconds.
    pub latency: Option<hdrhistogram::Histogram<u64>>,
}

/// How a replay runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Time decode + apply of one event in this many (0: none).
    pub sample_latency_every: u32,
}

impl Summary {
    pub fn events_per_sec(&self) -> f64 {
        self.lines_read as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        writeln!(f, "events read        {:>12}", s.events)?;
        writeln!(
            f,
            "applied            {:>12}  (clicks {}, captures {}, refunds {}, chargebacks {})",
            s.applied(),
            s.applied_clicks,
            s.applied_captures,
            s.applied_refunds,
            s.applied_chargebacks
        )?;
        if s.applied_leads + s.applied_payments + s.applied_cancels > 0 {
            writeln!(
                f,
                "                                  (leads {}, lead stages {}, subscription payments {}, cancellations {})",
                s.applied_leads, s.applied_stages, s.applied_payments, s.applied_cancels
            )?;
        }
        writeln!(f, "duplicates         {:>12}", s.duplicates)?;
        writeln!(f, "rejected           {:>12}", s.rejections())?;
        for (reason, n) in &s.rejected {
            writeln!(f, "  {:<24}{:>8}", reason.as_str(), n)?;
        }
        let orders = s.orders_by_link + s.orders_by_code + s.orders_unattributed;
        writeln!(
            f,
            "orders             {:>12}  (by link {}, by code {}, unattributed {})",
            orders, s.orders_by_link, s.orders_by_code, s.orders_unattributed
        )?;
        writeln!(f, "ledger entries     {:>12}", s.ledger_entries)?;
        writeln!(f, "fraud flags        {:>12}", s.flags)?;
        for (rule, n) in &self.flags_by_rule {
            writeln!(f, "  {:<24}{:>8}", rule, n)?;
        }
        match (self.as_of, self.per_program_now) {
            (Some(_), true) => writeln!(f, "commission by status as of each program's newest event time:")?,
            (Some(t), false) => writeln!(f, "commission by status as of {}:", t.to_rfc3339())?,
            (None, _) => writeln!(f, "commission by status: no events applied")?,
        }
        for ((cur, status), amount) in &self.commission {
            writeln!(f, "  {:<10}{:<4}{:>16}", status.as_str(), cur, amount.to_string())?;
        }
        writeln!(
            f,
            "throughput         {:>12.0} events/s  ({} lines, {:.1} MB in {:.2?})",
            self.events_per_sec(),
            self.lines_read,
            self.bytes as f64 / 1e6,
            self.elapsed
        )
    }
}

/// Replays `input` (JSON Lines) through a new engine with `rules` and writes
/// the store at `out`. `as_of` defaults to the newest event time read.
/// `progress` is called every few thousand lines with the bytes read.
pub fn replay(
    rules: Rules,
    input: impl BufRead,
    input_name: &str,
    out: &Path,
    as_of: Option<DateTime<Utc>>,
    progress: impl FnMut(u64),
) -> anyhow::Result<Summary> {
    replay_with(rules, input, input_name, out, as_of, Options::default(), progress)
}

/// [`replay`] with options.
pub fn replay_with(
    rules: Rules,
    input: impl BufRead,
    input_name: &str,
    out: &Path,
    as_of: Option<DateTime<Utc>>,
    opts: Options,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<Summary> {
    let mut latency = (opts.sample_latency_every > 0)
        .then(|| hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3))
        .transpose()
        .map_err(|e| anyhow::anyhow!("internal error: histogram bounds: {e}"))?;
    let every = u64::from(opts.sample_latency_every.max(1));
    let started = Instant::now();
    let data_dir = out.to_path_buf();
    let arrival_ts = Utc::now();
    let run_id = format!("{}", arrival_ts.format("%Y%m%dT%H%M%S%6fZ"));
    let mut engine = Engine::new(Arc::new(rules));
    // A replay writes the whole state at its end: no change sets to keep.
    engine.set_tracking(false);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let store = rt.block_on(Store::open(out)).with_context(|| format!("cannot open the store at {}", out.display()))?;
    let mut lines = JsonLines::new(input);
    let mut tally = Tally::default();
    let (mut lines_read, mut bytes) = (0u64, 0u64);
    // The sink (Arrow + Parquet + Delta) runs on its own thread, behind a
    // queue of at most two flushes: the engine goes on while a batch is
    // written. The first write replaces what the store held; readers keep
    // the previous version until the replay's last write records its own.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Output>(2);
    let handle = rt.handle().clone();
    let (read, store) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> anyhow::Result<(Store, bool)> {
            let mut store = store;
            let mut replaced = false;
            for out in rx {
                let mode = if replaced { Mode::Append } else { Mode::Replace };
                let w = Write { output: &out, changes: None, mode, position: None, writer: "replay" };
                handle.block_on(store.write_rows_only(w))?;
                replaced = true;
            }
            Ok((store, replaced))
        });
        let read = (|| -> anyhow::Result<()> {
            while let Some(line) = lines.next_line().with_context(|| format!("cannot read {input_name}"))? {
                lines_read += 1;
                bytes += line.text.len() as u64 + 1;
                let timed = latency.is_some() && lines_read % every == 0;
                let t0 = timed.then(Instant::now);
                let origin = LineOrigin { file: input_name, line: line.number };
                // With --as-of, events after it (beyond the skew) are refused as future_event.
                let arrival = Arrival { ts: arrival_ts, origin: &origin, clock: as_of };
                if let Some(problem) = line.problem {
                    engine.reject_undecodable(
                        line.text,
                        None,
                        afflio_engine::Reason::Malformed,
                        None,
                        problem,
                        arrival,
                    );
                } else {
                    match decode_event(line.text) {
                        Ok(event) => {
                            engine.apply(&event, line.text, arrival);
                        }
                        Err(e) => {
                            engine.reject_undecodable(
                                line.text,
                                e.event_id.as_deref(),
                                e.reason,
                                e.field.as_deref(),
                                e.detail,
                                arrival,
                            );
                        }
                    }
                }
                if let (Some(t0), Some(h)) = (t0, latency.as_mut()) {
                    h.saturating_record(t0.elapsed().as_nanos() as u64);
                }
                if engine.pending_output().len() >= FLUSH_ROWS {
                    let out = engine.take_output();
                    tally.closed(&out.closed);
                    if tx.send(out).is_err() {
                        // The writer stopped on an error: it is reported below.
                        return Ok(());
                    }
                }
                if lines_read % 8192 == 0 {
                    progress(bytes);
                }
            }
            let out = engine.take_output();
            tally.closed(&out.closed);
            let _ = tx.send(out);
            Ok(())
        })();
        drop(tx);
        let store = writer.join().map_err(|_| anyhow::anyhow!("internal error: the Parquet writer thread panicked"));
        (read, store)
    });
    let (mut store, replaced) = store??;
    read?;
    progress(bytes);
    // "Now": --as-of, else each program's newest applied event time.
    let store_now = crate::review::StoreNow { explicit: as_of };
    // The open orders and every balance of each program as of its "now",
    // and the commit record with the last.
    let mut ids: Vec<String> = engine.rules().programs().map(|p| p.id.clone()).collect();
    ids.sort();
    let last = Output::default();
    let mut replaced = replaced;
    for (i, p) in ids.iter().enumerate() {
        let at = store_now.of(&engine, p);
        let state = state_changes_of(&engine, Some(p), at);
        let mode = if replaced { Mode::Append } else { Mode::Replace };
        let w = Write { output: &last, changes: Some(&state), mode, position: None, writer: "replay" };
        if i + 1 == ids.len() {
            rt.block_on(store.write(w))?;
        } else {
            rt.block_on(store.write_rows_only(w))?;
        }
        replaced = true;
        for o in engine.orders().filter(|o| *o.program_id == **p) {
            tally.order(o, &engine.line_statuses(o, at));
        }
    }
    if ids.is_empty() {
        let mode = if replaced { Mode::Append } else { Mode::Replace };
        rt.block_on(store.write(Write { output: &last, changes: None, mode, position: None, writer: "replay" }))?;
    }
    let at = as_of.or_else(|| engine.newest_applied()).unwrap_or(DateTime::UNIX_EPOCH);
    engine.mark_state_written(at);
    let elapsed = started.elapsed();
    crate::review::save_state(&data_dir, &engine, store_now, Some(&run_id))?;
    Ok(Summary {
        stats: engine.stats(),
        as_of: as_of.or_else(|| engine.newest_applied()),
        per_program_now: as_of.is_none(),
        commission: tally.commission,
        flags_by_rule: tally.flags_by_rule,
        lines_read,
        bytes,
        elapsed,
        memory: engine.memory(),
        latency,
    })
}
