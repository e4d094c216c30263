//! End to end through the `afflio` binary: replay, then SQL over the Delta
//! tables it wrote; bad config and unreadable input; rules check; the demo;
//! store maintenance and time travel by hand.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn afflio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_afflio")).args(args).output().expect("run afflio")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios").join(name)
}

fn replay(dir: &Path, out: &Path) -> Output {
    afflio(&[
        "replay",
        "--config",
        dir.join("rules.toml").to_str().unwrap(),
        "--events",
        dir.join("events.jsonl").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

fn sql(out: &Path, query: &str, format: &str) -> String {
    let o = afflio(&["sql", "--data", out.to_str().unwrap(), query, "--format", format]);
    assert!(o.status.success(), "sql failed: {}", text(&o.stderr));
    text(&o.stdout)
}

#[test]
fn replay_writes_delta_tables_that_sql_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    let o = replay(&scenario("rejections"), &out);
    assert!(o.status.success(), "replay exits 0 even with rejections: {}", text(&o.stderr));
    let summary = text(&o.stdout);
    for want in ["events read", "duplicates", "malformed", "unknown_order", "commission by status", "orders"] {
        assert!(summary.contains(want), "summary lacks {want}:\n{summary}");
    }
    for t in
        ["ledger", "orders", "lines", "flags", "rejections", "clicks", "decisions", "payouts", "balances", "epochs"]
    {
        let log = out.join(t).join("_delta_log");
        assert!(log.join("00000000000000000000.json").is_file(), "{t} is a Delta table");
    }
    // Orders and lines are partitioned by the hour of the first capture.
    let parts: Vec<String> = std::fs::read_dir(out.join("orders"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("order_hour="))
        .collect();
    assert!(!parts.is_empty(), "orders are partitioned by order_hour");
    let csv = sql(&out, "SELECT reason, count(*) AS n FROM rejections GROUP BY reason ORDER BY reason", "csv");
    assert!(csv.starts_with("reason,n\n"), "{csv}");
    assert!(csv.contains("invalid_amount,5\n"), "{csv}");
    let json = sql(&out, "SELECT entry_id, amount FROM ledger", "json");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["entry_id"], "r13:0", "{json}");
    let table = sql(&out, "SELECT entry_id FROM ledger", "table");
    assert!(table.contains("| entry_id |") && table.contains("| r13:0    |"), "{table}");
}

#[test]
fn output_tables_have_the_contract_types() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    assert!(replay(&scenario("attribution_last_click"), &out).status.success());
    let csv = sql(
        &out,
        "SELECT arrow_typeof(amount) AS a, arrow_typeof(basis) AS b, arrow_typeof(ts) AS t, arrow_typeof(tier) AS i FROM ledger LIMIT 1",
        "csv",
    );
    assert_eq!(csv, "a,b,t,i\n\"Decimal128(18, 4)\",\"Decimal128(18, 4)\",\"Timestamp(µs, \"\"UTC\"\")\",Int32\n");
    let csv = sql(&out, "SELECT arrow_typeof(code_issues) AS c, arrow_typeof(chargeback) AS b, arrow_typeof(captured) AS m FROM orders LIMIT 1", "csv");
    assert!(csv.contains("List(") && csv.contains(",Boolean,\"Decimal128(18, 4)\""), "{csv}");
}

#[test]
fn a_second_replay_replaces_the_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    assert!(replay(&scenario("attribution_last_click"), &out).status.success());
    assert!(replay(&scenario("attribution_last_click"), &out).status.success());
    assert_eq!(sql(&out, "SELECT count(*) AS n FROM ledger", "csv"), "n\n7\n");
    let hidden: Vec<_> = std::fs::read_dir(out.join("ledger"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "temporary files left: {hidden:?}");
}

#[test]
fn a_bad_config_is_refused_with_every_problem_and_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "[[programs]]\nid = \"p\"\ncurrency = \"XYZ\"\nrate = \"ten\"\n").unwrap();
    let out = tmp.path().join("store");
    let o =
        afflio(&["replay", "--config", cfg.to_str().unwrap(), "--events", "/dev/null", "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(err.contains("bad.toml:3:") && err.contains("programs[0].currency") && err.contains("\"XYZ\""), "{err}");
    assert!(err.contains("bad.toml:4:") && err.contains("programs[0].rate"), "{err}");
    assert!(!out.exists(), "nothing may be written for a bad config");
    let o = afflio(&["rules", "check", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("2 problems"), "{}", text(&o.stderr));
    let o = afflio(&["rules", "check", scenario("attribution_last_click").join("rules.toml").to_str().unwrap()]);
    assert!(o.status.success());
    assert!(text(&o.stdout).contains("ok (1 programs, 5 partners, 3 links, 2 codes)"), "{}", text(&o.stdout));
}

#[test]
fn an_unreadable_input_fails_clearly_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    let cfg = scenario("attribution_last_click").join("rules.toml");
    let o = afflio(&[
        "replay",
        "--config",
        cfg.to_str().unwrap(),
        "--events",
        "/no/such/file.jsonl",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("cannot open events file /no/such/file.jsonl"), "{}", text(&o.stderr));
    assert!(!out.exists());
    let o = afflio(&["sql", "--data", out.to_str().unwrap(), "SELECT 1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("no Afflio store"), "{}", text(&o.stderr));
    let o =
        afflio(&["replay", "--config", cfg.to_str().unwrap(), "--events", "x", "--out", "y", "--as-of", "yesterday"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("RFC 3339"), "{}", text(&o.stderr));
}

#[test]
fn sql_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    assert!(replay(&scenario("attribution_last_click"), &out).status.success());
    let o = afflio(&["sql", "--data", out.to_str().unwrap(), "SELECT nope FROM ledger"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("nope"), "{}", text(&o.stderr));
}

#[test]
fn the_demo_runs_the_whole_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = afflio(&["demo", "--events", "30000", "--seed", "7", "--out", out.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let s = text(&o.stdout);
    for want in [
        "Afflio demo: 30000 events",
        "Top partners by net commission",
        "Commission by status",
        "Rejections by reason",
        "by link",
    ] {
        assert!(s.contains(want), "demo output lacks {want}:\n{s}");
    }
    // The generated input replays to the same ledger.
    let again = tmp.path().join("again");
    let o = afflio(&[
        "replay",
        "--config",
        out.join("input/rules.toml").to_str().unwrap(),
        "--events",
        out.join("input/events.jsonl").to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let q = "SELECT entry_id, amount FROM ledger ORDER BY entry_id";
    assert_eq!(sql(&out.join("store"), q, "csv"), sql(&again, q, "csv"));
    let n = sql(&again, "SELECT count(*) AS n FROM ledger", "csv");
    assert!(n != "n\n0\n", "the demo produces commissions");
    // Its SaaS and B2B programs earn on renewals, upgrades, leads and stages, and reverse disqualified leads.
    let kinds = sql(
        &again,
        "SELECT DISTINCT reward FROM ledger WHERE program_id IN ('cloudnote', 'leadgen') AND reward IS NOT NULL ORDER BY reward",
        "csv",
    );
    for want in [
        "annual plan",
        "disqualified",
        "lead:demo_request",
        "lead:lead",
        "renewal_rate",
        "stage:qualified",
        "stage:won",
        "team upgrade",
    ] {
        assert!(kinds.contains(want), "{want} in {kinds}");
    }
    // Its programs are listed, and its creators' applications are valid registry events.
    let rules = afflio_engine::rules::Rules::load(&out.join("input/rules.toml")).unwrap();
    assert!(rules.programs().all(|p| p.marketplace.listing.is_some()));
    let apps = std::fs::read_to_string(out.join("input/marketplace.ndjson")).unwrap();
    assert_eq!(apps.lines().count(), 5);
    let mut e = afflio_engine::Engine::new(std::sync::Arc::new(rules));
    for l in apps.lines() {
        let ev = afflio_ingest::decode_event(l).unwrap();
        let arrival = afflio_engine::Arrival { ts: ev.ts, origin: &"demo", clock: None };
        assert_eq!(e.apply(&ev, l, arrival), afflio_engine::Outcome::Applied, "{l}");
    }
    assert_eq!(e.applications("acme", None, 10).len(), 5);
    assert!(s.contains("marketplace.ndjson") && s.contains("demo-acme-brand-key-0001"), "{s}");
}

#[test]
fn reviewers_release_reject_and_approve_held_lines_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    let dir = scenario("fraud_self_referral");
    assert!(replay(&dir, &out).status.success());
    let config = dir.join("rules.toml");
    let review = |args: &[&str]| {
        let mut all = vec!["review", args[0], "--config", config.to_str().unwrap(), "--data", out.to_str().unwrap()];
        all.extend(&args[1..]);
        afflio(&all)
    };
    let queue = text(&afflio(&["review", "queue", "--data", out.to_str().unwrap(), "--format", "csv"]).stdout);
    assert_eq!(queue.lines().filter(|l| l.contains("self_referral")).count(), 6, "o1 and o2, 3 tiers each:\n{queue}");
    // Approving inside the return window is refused with the reason, and recorded as a rejection.
    let o = review(&["approve", "--order", "o1", "--by", "ana"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("invalid_review") && text(&o.stderr).contains("not eligible until"));
    // Reject needs a reason.
    let o = review(&["reject", "--order", "o2", "--by", "ana"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("reason"), "{}", text(&o.stderr));
    assert!(review(&["reject", "--order", "o2", "--partner", "alice", "--by", "ana", "--reason", "own account"])
        .status
        .success());
    assert!(review(&["clear", "--order", "o1", "--by", "ana", "--reason", "sister"]).status.success());
    // The same command again decides nothing twice.
    let o = review(&["clear", "--order", "o1", "--by", "ana", "--reason", "sister"]);
    assert!(text(&o.stdout).contains("already applied"), "{}", text(&o.stdout));
    // After the return window the auto-approving program approves o1.
    let o = review(&["approve", "--by", "fin", "--at", "2026-12-31T00:00:00Z"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines = sql(&out, "SELECT order_id, partner_id, tier, status, review FROM lines WHERE order_id IN ('o1', 'o2') ORDER BY order_id, tier", "csv");
    assert_eq!(
        lines,
        "order_id,partner_id,tier,status,review\no1,alice,0,approved,cleared\no1,agency,1,approved,cleared\n\
         o1,network,2,approved,cleared\no2,alice,0,rejected,rejected\no2,agency,1,pending,\no2,network,2,pending,\n"
    );
    let decisions = sql(
        &out,
        "SELECT order_id, tier, decision, reason, reviewer, status FROM decisions ORDER BY ts, order_id, tier",
        "csv",
    );
    assert_eq!(
        decisions,
        "order_id,tier,decision,reason,reviewer,status\no1,0,clear,sister,ana,pending\n\
         o1,1,clear,sister,ana,pending\no1,2,clear,sister,ana,pending\no2,0,reject,own account,ana,rejected\n"
    );
    let rejected = sql(&out, "SELECT reason FROM rejections", "csv");
    assert_eq!(rejected, "reason\ninvalid_review\n");
}
