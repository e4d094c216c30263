//! Data-driven scenarios: `tests/scenarios/<name>/{rules.toml, events.jsonl,
//! expected.txt}` through one `check` helper.
//!
//! `expected.txt` holds sections; each is replayed from scratch:
//!
//! ```text
//! @as_of 2026-12-01T00:00:00Z          (optional: the replay's --as-of)
//! @stats applied=4 duplicates=1        (optional: summary counters)
//! > SELECT ... (one line of SQL)
//! csv,header
//! expected,rows
//! ```
//!
//! A new section starts at each `@as_of`. Lines starting with `#` are
//! comments. Set `AFFLIO_BLESS=1` to print what the scenario produced
//! instead of comparing (to write a new scenario; check it by hand).

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use afflio::replay::replay;
use afflio_engine::rules::Rules;
use afflio_sinks::OutputFormat;
use chrono::{DateTime, Utc};

#[derive(Default, Debug)]
struct Section {
    as_of: Option<DateTime<Utc>>,
    stats: Vec<(String, u64)>,
    queries: Vec<(String, Vec<String>)>,
}

fn parse_expected(text: &str) -> Vec<Section> {
    let mut sections = vec![Section::default()];
    for line in text.lines() {
        let cur = sections.last_mut().unwrap();
        if let Some(ts) = line.strip_prefix("@as_of ") {
            let as_of = Some(DateTime::parse_from_rfc3339(ts.trim()).unwrap().with_timezone(&Utc));
            if cur.as_of.is_none() && cur.queries.is_empty() && cur.stats.is_empty() {
                cur.as_of = as_of;
            } else {
                sections.push(Section { as_of, ..Section::default() });
            }
        } else if let Some(s) = line.strip_prefix("@stats ") {
            for kv in s.split_whitespace() {
                let (k, v) = kv.split_once('=').expect("@stats key=value");
                cur.stats.push((k.to_string(), v.parse().expect("@stats value is a number")));
            }
        } else if let Some(q) = line.strip_prefix("> ") {
            cur.queries.push((q.to_string(), Vec::new()));
        } else if line.starts_with('#') || (line.trim().is_empty() && cur.queries.is_empty()) {
        } else if let Some((_, rows)) = cur.queries.last_mut() {
            if !line.trim().is_empty() {
                rows.push(line.trim_end().to_string());
            }
        } else {
            panic!("line outside a query: {line:?}");
        }
    }
    sections
}

fn stat(s: &afflio::replay::Summary, key: &str) -> u64 {
    let st = &s.stats;
    match key {
        "events" => st.events,
        "applied" => st.applied(),
        "duplicates" => st.duplicates,
        "rejected" => st.rejections(),
        "by_link" => st.orders_by_link,
        "by_code" => st.orders_by_code,
        "unattributed" => st.orders_unattributed,
        "ledger" => st.ledger_entries,
        "flags" => st.flags,
        other => panic!("unknown @stats key {other}"),
    }
}

/// Replays one scenario and returns its failures (empty when it passes).
fn check(dir: &Path) -> Vec<String> {
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let rules = Rules::load(&dir.join("rules.toml")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected = fs::read_to_string(dir.join("expected.txt")).unwrap_or_else(|e| panic!("{name}: expected.txt: {e}"));
    let bless = std::env::var_os("AFFLIO_BLESS").is_some();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut failures = Vec::new();
    for section in parse_expected(&expected) {
        let out = tempfile::tempdir().unwrap();
        let events = BufReader::new(File::open(dir.join("events.jsonl")).unwrap());
        let summary = replay(rules.clone(), events, "events.jsonl", out.path(), section.as_of, |_| {}).unwrap();
        if bless {
            println!("== {name} @as_of {:?}\n{summary}", section.as_of);
        }
        for (key, want) in &section.stats {
            let got = stat(&summary, key);
            if got != *want {
                failures.push(format!("{name}: @stats {key}: got {got}, want {want}"));
            }
        }
        for (sql, want) in &section.queries {
            let got = rt
                .block_on(afflio_sinks::query(out.path(), sql, OutputFormat::Csv))
                .unwrap_or_else(|e| panic!("{name}: {sql}: {e}"));
            let got: Vec<&str> = got.lines().map(str::trim_end).collect();
            if bless {
                println!("> {sql}\n{}\n", got.join("\n"));
            } else if got != *want {
                failures.push(format!(
                    "{name}: > {sql}\n  got:\n    {}\n  want:\n    {}",
                    got.join("\n    "),
                    want.join("\n    ")
                ));
            }
        }
    }
    failures
}

fn scenario_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut dirs: Vec<PathBuf> =
        fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    dirs
}

#[test]
fn scenarios() {
    let only = std::env::var("AFFLIO_SCENARIO").ok();
    let dirs: Vec<_> = scenario_dirs()
        .into_iter()
        .filter(|d| only.as_deref().is_none_or(|o| d.file_name().unwrap().to_string_lossy().contains(o)))
        .collect();
    assert!(only.is_some() || dirs.len() >= 20, "expected the full scenario set, found {}", dirs.len());
    let failures: Vec<String> = dirs.iter().flat_map(|d| check(d)).collect();
    assert!(failures.is_empty(), "{} scenario failure(s):\n{}", failures.len(), failures.join("\n\n"));
}
