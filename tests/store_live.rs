//! The live service's store under faults and readers:
//! - the service dies (as under kill -9) at fault points inside an epoch's
//!   commit: before a MERGE, right after a table's commit, before the commit
//!   record, between a checkpoint delta and its manifest; each time it is
//!   restarted and the clients resend. Every table then equals `afflio
//!   replay`'s, and no row is in any table twice;
//! - a reader querying in a loop while the service writes, compacts
//!   (OPTIMIZE) and vacuums always sees consistent versions: no duplicate,
//!   and the ledger's sum per line equals the line's net.
//!
//! Fault points are chosen from a seed, printed (AFFLIO_TEST_SEED replays it).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use afflio_sinks::{query_at, At, OutputFormat};
use common::*;

fn in_process(data: &std::path::Path, q: &str, at: At) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(query_at(data, q, OutputFormat::Csv, at)).unwrap_or_else(|e| panic!("{q} at {at:?}: {e}"))
}

/// Lines whose net differs from their ledger entries' sum, and ledger
/// entries that are there twice: both must be 0 in every version.
const CONSISTENCY: &str = "SELECT \
    (SELECT count(*) FROM lines l LEFT JOIN (SELECT program_id, order_id, partner_id, tier, sum(amount) AS s \
       FROM ledger GROUP BY program_id, order_id, partner_id, tier) g \
       ON l.program_id = g.program_id AND l.order_id = g.order_id AND l.partner_id = g.partner_id AND l.tier = g.tier \
       WHERE l.net_amount <> coalesce(g.s, 0)) AS off, \
    (SELECT count(*) - count(DISTINCT entry_id) FROM ledger) AS twice, \
    (SELECT count(*) - count(DISTINCT event_id) FROM clicks) AS clicks_twice, \
    (SELECT count(*) FROM ledger) AS entries";

/// Posts until the service took the batch, restarting it (unarmed) when a
/// fault point killed it; counts the faults that fired.
fn post_through_faults(svc: &mut Service, key: &str, body: &str, fired: &mut u32) -> u64 {
    for _ in 0..600 {
        if svc.exited() {
            *fired += 1;
            svc.child = None;
            svc.restart();
        }
        let (status, resp) = http(svc.port, "POST", "/v1/events", Some(key), body);
        if status == 503 || status == 0 {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        assert!(matches!(status, 202 | 400 | 422), "{status}: {resp}");
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
        return v["accepted"].as_u64().unwrap_or_else(|| u64::from(v["status"] == "accepted"));
    }
    panic!("the service never took the batch");
}

fn check_version(data: &std::path::Path, at: At) -> u64 {
    let csv = in_process(data, CONSISTENCY, at);
    let row: Vec<u64> = csv.lines().nth(1).unwrap().split(',').map(|v| v.parse().unwrap()).collect();
    assert_eq!(&row[..3], &[0, 0, 0], "inconsistent store at {at:?}: off, twice, clicks twice = {row:?}");
    row[3]
}

#[test]
fn faults_inside_commits_lose_nothing_and_write_nothing_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let (rules, events, lines) = workload(tmp.path(), 21, 6_000);
    let expected = replay_ledger(tmp.path(), &rules, &events);
    let nats = Nats::start(&tmp.path().join("js"));
    let (data, state) = (tmp.path().join("data"), tmp.path().join("state"));
    let mut svc = Service::start(&rules, &nats.url(), &data, &state);
    let seed: u64 = std::env::var("AFFLIO_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261129);
    eprintln!("fault test seed: {seed} (AFFLIO_TEST_SEED={seed} to reproduce)");
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut pick = |n: u64| rand::Rng::random_range(&mut rng, 0..n);
    // Each fault fires after a seeded number of passes through its point.
    let faults: Vec<String> = vec![
        format!("store-before-table={}*off->return(orders)", 9 * pick(3)),
        format!("store-after-table={}*off->return(lines)", 9 * pick(3)),
        format!("store-after-table={}*off->return(ledger)", 9 * pick(3)),
        format!("store-before-epoch={}*off->return", pick(3)),
        format!("state-before-manifest={}*off->return", pick(3)),
    ];
    let reqs = batches(&lines);
    // Short segments; a fault stays armed until it has fired (how many
    // commits a segment makes depends on the machine's speed), then the next.
    let per_fault = (reqs.len() / (2 * faults.len() + 1)).max(1);
    let mut stored = 0;
    let mut fired = 0;
    let mut next_fault = 0;
    let mut fired_when_armed = 0;
    for (i, (key, body)) in reqs.iter().enumerate() {
        let current_fired = next_fault == 0 || fired > fired_when_armed;
        if i > 0 && i % per_fault == 0 && next_fault < faults.len() && current_fired {
            // The next fault: restart with it armed.
            svc.kill9();
            svc.env = vec![("FAILPOINTS".into(), faults[next_fault].clone())];
            svc.restart();
            next_fault += 1;
            fired_when_armed = fired;
        }
        stored += post_through_faults(&mut svc, key, body, &mut fired);
        if svc.exited() {
            // It died at the fault point: the client resends its last batch.
            post_through_faults(&mut svc, key, body, &mut fired);
        }
    }
    // Faults armed late fire on the traffic still to commit.
    wait_for("the engine to apply every stored event", Duration::from_secs(90), || {
        if svc.exited() {
            fired += 1;
            svc.child = None;
            svc.restart();
        }
        svc.metric("afflio_engine_events_total") >= stored
    });
    assert_eq!(svc.term(), Some(0), "SIGTERM stops cleanly (seed {seed})");
    assert!(fired >= 3, "most fault points fired: {fired} of {} (seed {seed})", faults.len());
    assert_same((ledger(&data), orders(&data)), &expected);
    // Store versions are consistent and hold no row twice: 40 of them, spread
    // evenly, and the last (the ledger is append-only: a row twice in any
    // version would be twice in the last).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let latest = rt.block_on(afflio_sinks::snapshot(&data, At::Latest)).unwrap().version.unwrap();
    let mut versions: Vec<i64> = (1..=40).map(|k| (latest * k / 40).max(1)).collect();
    versions.dedup();
    let mut entries = 0;
    for v in versions {
        let n = check_version(&data, At::Version(v));
        assert!(n >= entries, "store version {v} has fewer ledger rows than the one before (seed {seed})");
        entries = n;
    }
    // Every other table equals the replay's too (rejections differ by design:
    // the HTTP ingest refuses what it can check at once, replay records it).
    let replay_out = tmp.path().join("replay");
    for q in [
        "SELECT event_id, link_id, partner_id FROM clicks ORDER BY event_id",
        "SELECT order_id, rule FROM flags ORDER BY order_id, rule",
        "SELECT program_id, order_id, partner_id, tier, net_amount FROM lines ORDER BY program_id, order_id, partner_id, tier",
    ] {
        assert_eq!(sql(&data, q), sql(&replay_out, q), "{q} (seed {seed})");
    }
}

#[test]
fn readers_see_consistent_versions_while_the_service_writes_compacts_and_vacuums() {
    let tmp = tempfile::tempdir().unwrap();
    let (rules, _events, lines) = workload(tmp.path(), 22, 8_000);
    let nats = Nats::start(&tmp.path().join("js"));
    let (data, state) = (tmp.path().join("data"), tmp.path().join("state"));
    let mut svc = Service::start(&rules, &nats.url(), &data, &state);
    // Frequent maintenance: a table with 4 files is merged, vacuum every 2s,
    // files kept 5s after they leave the latest version.
    svc.kill9();
    svc.args.extend(
        ["--maintenance-secs", "1", "--optimize-min-files", "4", "--vacuum-secs", "4", "--vacuum-retention", "5s"]
            .map(String::from),
    );
    svc.restart();
    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (done, reads, data) = (done.clone(), reads.clone(), data.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if afflio_sinks::is_store(&data) && data.join("epochs/_delta_log/00000000000000000001.json").exists() {
                    check_version(&data, At::Latest);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut stored = 0;
    for (key, body) in batches(&lines) {
        stored += post(svc.port, key, &body);
    }
    wait_for("the engine to apply every stored event", Duration::from_secs(180), || {
        svc.metric("afflio_engine_events_total") >= stored
    });
    // Let maintenance run on the last files while the reader reads.
    wait_for("maintenance", Duration::from_secs(30), || svc.metric("afflio_maintenance_runs_total") >= 3);
    std::thread::sleep(Duration::from_secs(3));
    done.store(true, Ordering::Relaxed);
    reader.join().expect("the reader saw only consistent versions");
    assert!(reads.load(Ordering::Relaxed) >= 10, "the reader read {} times", reads.load(Ordering::Relaxed));
    assert_eq!(svc.term(), Some(0));
    check_version(&data, At::Latest);
}
