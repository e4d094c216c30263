//! `afflio bench` end to end with small sizes: the commands BENCHMARKS.md
//! documents run from the binary and print what they measured. (The sizes
//! here check the machinery, not the speed: figures live in BENCHMARKS.md.)

use std::process::{Command, Output};

fn afflio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_afflio")).args(args).output().expect("run afflio")
}

fn field(out: &str, key: &str) -> f64 {
    out.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {out}"))
}

#[test]
fn bench_replay_measures_a_generated_run_in_a_child() {
    let o = afflio(&["bench", "replay", "--events", "20000", "--seed", "3"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = out.lines().find(|l| l.starts_with("replay ")).expect("result line");
    assert_eq!(field(line, "events"), 20000.0);
    assert!(field(line, "events_per_sec") > 0.0);
    assert!(field(line, "peak_rss_mb") > 1.0, "peak RSS read from /proc: {line}");
    assert!(field(line, "ledger_entries") > 100.0, "{line}");
    assert!(field(line, "apply_ns_p50") > 0.0, "{line}");
}

#[test]
fn bench_sessions_tracks_every_session_and_reports_bytes_per_session() {
    let o = afflio(&["bench", "sessions", "--sessions", "50000"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = out.lines().find(|l| l.starts_with("sessions ")).expect("result line");
    assert_eq!(field(line, "tracked"), 50000.0);
    let o = afflio(&["bench", "sessions", "--sessions", "10"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--sessions must be at least 1000, not 10"));
}

/// The side by side needs a PostgreSQL: the machine's (AFFLIO_PG_URL or
/// 127.0.0.1:5432), else the command starts one itself.
#[test]
fn bench_baseline_agrees_with_postgres_and_prints_the_ratios() {
    let o = afflio(&["bench", "baseline", "--events", "5000", "--seed", "5"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("ledgers agree: every entry id and amount is equal"), "{out}");
    assert!(out.contains("throughput ratio (afflio / postgres):"), "{out}");
}

#[test]
fn bench_live_runs_broker_service_and_load_and_reports_latency() {
    let o = afflio(&["bench", "live", "--rates", "2000", "--seconds", "2", "--batch", "100", "--clients", "2"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    let row = out.lines().find(|l| l.trim_start().starts_with("2000 ")).unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], "4000", "events sent: {row}");
    assert!(cols[2].parse::<f64>().unwrap() > 0.0, "{row}");
    assert_eq!(cols[3], "0", "nothing refused: {row}");
    assert!(out.contains("maximum sustainable offered rate"), "{out}");
}
