//! The engine's checkpoints at growing state sizes: for N tracked sessions
//! (one click each, 100 ms apart, in a 30-day window), the image (the whole
//! state), then the delta after a fixed change of 50,000 events (new
//! visitors' clicks and returning visitors' second clicks), and the
//! recovery a restart performs: reading the image and the delta from disk
//! and rebuilding the engine. Each size runs in a child process (a clean
//! heap). A delta's cost should follow the change, not N.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Engine};
use afflio_ingest::decode_event;
use afflio_pipeline::state::{FileBackend, StateBackend};
use anyhow::Context;

use super::{field, run_child, sessions_rules, NoOrigin};

/// One size's figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckpointResult {
    pub sessions: u64,
    pub image_bytes: u64,
    pub image_ms: f64,
    pub change_events: u64,
    pub delta_bytes: u64,
    pub delta_ms: f64,
    /// Restoring image + delta from disk, as a restart does.
    pub recovery_ms: f64,
    pub rss_mb: f64,
}

fn clicks(
    engine: &mut Engine,
    line: &mut String,
    from: u64,
    n: u64,
    start_ms: i64,
    returning: bool,
) -> anyhow::Result<()> {
    let arrival = Arrival { ts: chrono::Utc::now(), origin: &NoOrigin, clock: None };
    for i in from..from + n {
        line.clear();
        let ts = chrono::DateTime::from_timestamp_millis(start_ms + i as i64 * 100).context("time")?;
        // A returning visitor clicks again (an existing session changes).
        let visitor = if returning && i % 2 == 0 { i / 7 } else { i };
        let _ = write!(
            line,
            r#"{{"type":"click","event_id":"c{i}","ts":"{}","program_id":"shop","link_id":"l1","visitor_id":"visitor-{visitor:012}"}}"#,
            ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
        let event = decode_event(line).map_err(|e| anyhow::anyhow!("internal error: bench click: {e}"))?;
        engine.apply(&event, line, arrival);
        if engine.pending_output().len() >= 16_384 {
            drop(engine.take_output());
        }
    }
    drop(engine.take_output());
    Ok(())
}

/// Measures one size in this process.
pub fn measure(sessions: u64) -> anyhow::Result<CheckpointResult> {
    anyhow::ensure!(sessions >= 1000, "--sessions must be at least 1000, not {sessions}");
    let rules = Arc::new(Rules::parse("bench-checkpoint.toml", &sessions_rules(sessions * 2))?);
    let mut engine = Engine::new(rules.clone());
    let start = chrono::DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")?.timestamp_millis();
    let mut line = String::with_capacity(256);
    clicks(&mut engine, &mut line, 0, sessions, start, false)?;
    let dir = super::scratch("checkpoint")?;
    let mut backend = FileBackend::open(dir.path())?;
    backend.restore(rules.clone())?;
    // The image: what a fold writes (all of the state).
    let t = Instant::now();
    let image = engine.checkpoint()?;
    let image_ms = t.elapsed().as_secs_f64() * 1e3;
    // Everything so far in the chain (as the first delta), then the change.
    let first = engine.checkpoint_delta()?;
    backend.save(1, &first)?;
    drop(first);
    let change = 50_000;
    clicks(&mut engine, &mut line, sessions, change, start, true)?;
    let t = Instant::now();
    let delta = engine.checkpoint_delta()?;
    let delta_ms = t.elapsed().as_secs_f64() * 1e3;
    backend.save(2, &delta)?;
    let fingerprint = engine.state_fingerprint();
    let rss_mb = super::memory().0 as f64 / 1048576.0;
    drop(engine);
    // A restart: read the chain from disk and rebuild the engine.
    let t = Instant::now();
    let restored = FileBackend::open(dir.path())?.restore(rules)?;
    let recovery_ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(
        restored.engine.state_fingerprint() == fingerprint,
        "internal error: the restored engine differs from the one checkpointed"
    );
    Ok(CheckpointResult {
        sessions,
        image_bytes: image.len() as u64,
        image_ms,
        change_events: change,
        delta_bytes: delta.len() as u64,
        delta_ms,
        recovery_ms,
        rss_mb,
    })
}

pub fn line(r: &CheckpointResult) -> String {
    format!(
        "checkpoint sessions={} image_bytes={} image_ms={:.1} change_events={} delta_bytes={} delta_ms={:.2} recovery_ms={:.0} rss_mb={:.0}",
        r.sessions, r.image_bytes, r.image_ms, r.change_events, r.delta_bytes, r.delta_ms, r.recovery_ms, r.rss_mb
    )
}

/// One size in a child process.
pub fn in_child(sessions: u64) -> anyhow::Result<CheckpointResult> {
    let l = run_child(&["bench", "checkpoint", "--sessions", &sessions.to_string(), "--here"], "checkpoint ")?;
    let get = |k: &str| field(&l, k);
    Ok(CheckpointResult {
        sessions: get("sessions")? as u64,
        image_bytes: get("image_bytes")? as u64,
        image_ms: get("image_ms")?,
        change_events: get("change_events")? as u64,
        delta_bytes: get("delta_bytes")? as u64,
        delta_ms: get("delta_ms")?,
        recovery_ms: get("recovery_ms")?,
        rss_mb: get("rss_mb")?,
    })
}

/// The table for several sizes.
pub fn report(results: &[CheckpointResult]) -> String {
    let mut r = String::new();
    let _ =
        writeln!(r, "== checkpoint: N one-click sessions, then a change of 50,000 clicks (half by returning visitors)");
    let _ = writeln!(
        r,
        "  {:>10} {:>12} {:>10} {:>12} {:>10} {:>13} {:>8}",
        "sessions", "image MB", "image ms", "delta KB", "delta ms", "recovery ms", "RSS MB"
    );
    for x in results {
        let _ = writeln!(
            r,
            "  {:>10} {:>12.1} {:>10.0} {:>12.0} {:>10.1} {:>13.0} {:>8.0}",
            x.sessions,
            x.image_bytes as f64 / 1048576.0,
            x.image_ms,
            x.delta_bytes as f64 / 1024.0,
            x.delta_ms,
            x.recovery_ms,
            x.rss_mb
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_is_measured_restored_and_smaller_than_the_image() {
        let r = measure(100_000).unwrap();
        assert!(r.delta_bytes < r.image_bytes, "{r:?}");
        assert!(r.recovery_ms > 0.0);
        let back = line(&r);
        assert!(back.starts_with("checkpoint sessions=100000 "), "{back}");
    }
}
