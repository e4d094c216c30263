//! `afflio bench`: reproducible measurements from a seed.
//!
//! - `replay`: the demo mix as JSON Lines -> engine -> Parquet, in one
//!   process (a child of the command, so its peak RSS is the replay's alone);
//! - `sessions`: memory per tracked visitor session (RSS growth / sessions);
//! - `scaling`: replay and sessions at three sizes;
//! - `baseline`: the same workload through a PostgreSQL attribution pipeline
//!   and through Afflio, ledgers compared, ratios printed ([`pg`]);
//! - `live`: a streaming load ([`load`]) against `afflio serve` over HTTP and
//!   JetStream at fixed offered rates, for minutes if asked, reported per
//!   window ([`live`]);
//! - `checkpoint`: the engine's checkpoint (delta and image) and recovery at
//!   growing state sizes ([`checkpoint`]).

pub mod checkpoint;
pub mod live;
pub mod load;
pub mod pg;
pub mod registry;
pub mod webhooks;

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Engine};
use afflio_ingest::decode_event;
use anyhow::Context;

/// Resident and peak resident memory of this process, bytes (Linux).
pub fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Writes the demo's rules and `events` events of `seed` under `dir`.
pub fn generate_input(dir: &Path, seed: u64, events: u64) -> anyhow::Result<(PathBuf, PathBuf)> {
    generate_input_with(dir, seed, events, crate::demo::CREATORS_PER_PROGRAM)
}

/// [`generate_input`] with `creators` creators per program.
pub fn generate_input_with(dir: &Path, seed: u64, events: u64, creators: usize) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let rules = dir.join("rules.toml");
    let input = dir.join("events.jsonl");
    let mut r = BufWriter::new(File::create(&rules).with_context(|| format!("cannot create {}", rules.display()))?);
    let mut e = BufWriter::new(File::create(&input).with_context(|| format!("cannot create {}", input.display()))?);
    crate::demo::generate_with(seed, events, creators, &mut r, &mut e)?;
    r.flush()?;
    e.flush()?;
    Ok((rules, input))
}

/// What one replay measured.
#[derive(Debug, Clone)]
pub struct ReplayResult {
    pub events: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub peak_rss: u64,
    pub ledger_entries: u64,
    pub visitors: usize,
    pub orders: usize,
    pub apply_ns: Quantiles,
}

impl ReplayResult {
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }
}

/// p50, p99, p99.9 and max of a histogram, in its unit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quantiles {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub count: u64,
}

impl Quantiles {
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Quantiles {
        Quantiles {
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            count: h.len(),
        }
    }
}

/// Replays `input` with `rules` into `out` in this process and measures it.
pub fn measure_replay(rules: &Path, input: &Path, out: &Path) -> anyhow::Result<ReplayResult> {
    let rules = Rules::load(rules)?;
    let file = File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    let _ = std::fs::remove_dir_all(out);
    let opts = crate::replay::Options { sample_latency_every: 64 };
    let s = crate::replay::replay_with(
        rules,
        BufReader::with_capacity(1 << 20, file),
        &input.display().to_string(),
        out,
        None,
        opts,
        |_| {},
    )?;
    let (_, peak) = memory();
    Ok(ReplayResult {
        events: s.lines_read,
        bytes: s.bytes,
        seconds: s.elapsed.as_secs_f64(),
        peak_rss: peak,
        ledger_entries: s.stats.ledger_entries,
        visitors: s.memory.visitors,
        orders: s.memory.orders,
        apply_ns: s.latency.as_ref().map(Quantiles::of).unwrap_or_default(),
    })
}

/// One line of a replay result, also what the child prints for its parent.
pub fn replay_line(r: &ReplayResult) -> String {
    format!(
        "replay events={} bytes={} seconds={:.3} events_per_sec={:.0} peak_rss_mb={:.1} ledger_entries={} visitors={} orders={} apply_ns_p50={} apply_ns_p99={} apply_ns_p999={}",
        r.events,
        r.bytes,
        r.seconds,
        r.events_per_sec(),
        r.peak_rss as f64 / 1048576.0,
        r.ledger_entries,
        r.visitors,
        r.orders,
        r.apply_ns.p50,
        r.apply_ns.p99,
        r.apply_ns.p999
    )
}

/// Runs `afflio bench replay --input DIR` as a child (a clean process for
/// the peak RSS) and reads its result line.
pub fn replay_in_child(dir: &Path) -> anyhow::Result<ReplayResult> {
    let dir = dir.to_string_lossy();
    parse_replay_line(&run_child(&["bench", "replay", "--input", &dir], "replay ")?)
}

/// Runs `afflio <args>` and returns its stdout line starting with `prefix`.
pub(crate) fn run_child(args: &[&str], prefix: &str) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find the afflio executable")?;
    let out = std::process::Command::new(exe).args(args).output().context("cannot run the bench child")?;
    if !out.status.success() {
        anyhow::bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with(prefix));
    line.map(str::to_string).with_context(|| format!("no {prefix:?} result line from {}", args.join(" ")))
}

/// The number after `key=` in a result line.
pub(crate) fn field(line: &str, key: &str) -> anyhow::Result<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in {line:?}"))
}

fn parse_replay_line(line: &str) -> anyhow::Result<ReplayResult> {
    let get = |k: &str| field(line, k);
    Ok(ReplayResult {
        events: get("events")? as u64,
        bytes: get("bytes")? as u64,
        seconds: get("seconds")?,
        peak_rss: (get("peak_rss_mb")? * 1048576.0) as u64,
        ledger_entries: get("ledger_entries")? as u64,
        visitors: get("visitors")? as usize,
        orders: get("orders")? as usize,
        apply_ns: Quantiles {
            p50: get("apply_ns_p50")? as u64,
            p99: get("apply_ns_p99")? as u64,
            p999: get("apply_ns_p999")? as u64,
            ..Quantiles::default()
        },
    })
}

/// Rules for the sessions measurement: one link, a 30-day window, ids
/// remembered for a minute (so the measure is the sessions' alone).
pub(crate) fn sessions_rules(max_visitors: u64) -> String {
    format!(
        "[engine]\ndedupe_retention = \"1m\"\nmax_tracked_visitors = {max_visitors}\n\n\
         [[programs]]\nid = \"shop\"\ncurrency = \"USD\"\nrate = \"10%\"\n[programs.attribution]\nwindow = \"30d\"\n\n\
         [[partners]]\nid = \"p1\"\nprogram_id = \"shop\"\n\n\
         [[links]]\nid = \"l1\"\npartner_id = \"p1\"\ndestination = \"https://shop.example.com/\"\n"
    )
}

/// What the sessions measurement found.
#[derive(Debug, Clone, Copy)]
pub struct SessionsResult {
    pub sessions: u64,
    pub tracked: usize,
    pub bytes_per_session: f64,
    pub clicks_per_sec: f64,
}

pub(crate) struct NoOrigin;
impl std::fmt::Display for NoOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bench")
    }
}

/// Applies one click from each of `n` visitors, 100 ms apart in event time,
/// and measures the RSS growth between the first tenth and the end.
pub fn measure_sessions(n: u64) -> anyhow::Result<SessionsResult> {
    anyhow::ensure!(n >= 1000, "--sessions must be at least 1000, not {n}");
    let rules = Arc::new(Rules::parse("bench-sessions.toml", &sessions_rules(n + 1))?);
    let mut engine = Engine::new(rules);
    // The sessions alone: no change set (the live service clears its own at
    // every epoch, so it holds at most an epoch's changes).
    engine.set_tracking(false);
    let start = chrono::DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")?.timestamp_millis();
    let arrival = Arrival { ts: chrono::Utc::now(), origin: &NoOrigin, clock: None };
    let mut line = String::with_capacity(256);
    let tenth = n / 10;
    let mut rss_tenth = 0;
    let started = Instant::now();
    for i in 0..n {
        line.clear();
        let ts = chrono::DateTime::from_timestamp_millis(start + i as i64 * 100).context("time")?;
        use std::fmt::Write as _;
        let _ = write!(
            line,
            r#"{{"type":"click","event_id":"c{i}","ts":"{}","program_id":"shop","link_id":"l1","visitor_id":"visitor-{i:012}"}}"#,
            ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
        let event = decode_event(&line).map_err(|e| anyhow::anyhow!("internal error: bench click: {e}"))?;
        engine.apply(&event, &line, arrival);
        if engine.pending_output().len() >= 16_384 {
            drop(engine.take_output());
        }
        if i + 1 == tenth {
            drop(engine.take_output());
            rss_tenth = memory().0;
        }
    }
    drop(engine.take_output());
    let elapsed = started.elapsed().as_secs_f64();
    let rss_end = memory().0;
    let tracked = engine.memory().visitors;
    anyhow::ensure!(tracked as u64 == n, "internal error: {tracked} of {n} sessions tracked");
    let grown = rss_end.saturating_sub(rss_tenth) as f64;
    Ok(SessionsResult {
        sessions: n,
        tracked,
        bytes_per_session: grown / (n - tenth) as f64,
        clicks_per_sec: n as f64 / elapsed,
    })
}

/// Sessions in a child process (a clean heap for each size).
pub fn sessions_in_child(n: u64) -> anyhow::Result<SessionsResult> {
    let line = run_child(&["bench", "sessions", "--sessions", &n.to_string()], "sessions ")?;
    let get = |k: &str| field(&line, k);
    Ok(SessionsResult {
        sessions: get("sessions")? as u64,
        tracked: get("tracked")? as usize,
        bytes_per_session: get("bytes_per_session")?,
        clicks_per_sec: get("clicks_per_sec")?,
    })
}

pub fn sessions_line(r: &SessionsResult) -> String {
    format!(
        "sessions sessions={} tracked={} bytes_per_session={:.1} clicks_per_sec={:.0}",
        r.sessions, r.tracked, r.bytes_per_session, r.clicks_per_sec
    )
}

/// A scratch directory under the system's temporary directory.
pub fn scratch(name: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("afflio-bench-{name}-"))
        .tempdir()
        .context("cannot create a scratch directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_result_line_round_trips() {
        let r = ReplayResult {
            events: 10,
            bytes: 2000,
            seconds: 0.5,
            peak_rss: 3 * 1048576,
            ledger_entries: 4,
            visitors: 5,
            orders: 6,
            apply_ns: Quantiles { p50: 7, p99: 8, p999: 9, max: 0, count: 0 },
        };
        let back = parse_replay_line(&replay_line(&r)).unwrap();
        assert_eq!((back.events, back.bytes, back.ledger_entries, back.visitors, back.orders), (10, 2000, 4, 5, 6));
        assert_eq!((back.apply_ns.p50, back.apply_ns.p99, back.apply_ns.p999), (7, 8, 9));
        assert_eq!(back.peak_rss, 3 * 1048576);
        assert!((back.events_per_sec() - 20.0).abs() < 1e-9);
    }

    #[test]
    fn sessions_are_measured_and_all_tracked() {
        let r = measure_sessions(20_000).unwrap();
        assert_eq!(r.tracked, 20_000);
        assert!(r.bytes_per_session >= 0.0 && r.clicks_per_sec > 0.0);
    }
}
