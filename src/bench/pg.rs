//! The peer baseline: the attribution pipeline most affiliate platforms run,
//! on PostgreSQL. Every event is inserted; last-click attribution and the
//! commissions (tiered overrides, proportional reversals, half-to-even
//! rounding) are computed by SQL in stored functions; ledger rows are
//! written by them. One connection, events in order, a transaction per
//! `batch` events, one round trip per event.
//!
//! The same generated workload then goes through Afflio (the full replay
//! pipeline into Parquet) and the two ledgers are compared row by row.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use afflio_engine::Body;
use afflio_ingest::decode_event;
use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

use super::Quantiles;

/// The generated workload: link clicks, captures (some without a visitor),
/// partial and full refunds, redeliveries. Both pipelines implement all of it.
pub struct Workload {
    pub rules: String,
    pub events: Vec<String>,
}

const CREATORS: usize = 400;

/// `events` events from `seed`: sessions of 1-3 clicks on creators' links,
/// 7% of them buying within a day, 10% of orders refunded later.
pub fn workload(seed: u64, events: u64) -> Workload {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut rules = String::from(
        "# The baseline workload's rules (afflio bench baseline).\n[engine]\ndedupe_retention = \"30d\"\n\n\
         [[programs]]\nid = \"shop\"\ncurrency = \"USD\"\nrate = \"10%\"\noverrides = [\"2%\", \"1%\"]\nhold = \"30d\"\n\
         [programs.attribution]\nwindow = \"30d\"\nmodel = \"last_click\"\n\n",
    );
    for n in 0..4 {
        let _ = writeln!(rules, "[[partners]]\nid = \"net{n}\"\nprogram_id = \"shop\"\n");
    }
    for a in 0..40 {
        let _ = writeln!(rules, "[[partners]]\nid = \"agency{a}\"\nprogram_id = \"shop\"\nparent = \"net{}\"\n", a % 4);
    }
    for c in 0..CREATORS {
        let _ = writeln!(rules, "[[partners]]\nid = \"creator{c}\"\nprogram_id = \"shop\"");
        if c % 10 < 7 {
            let _ = writeln!(rules, "parent = \"agency{}\"", c % 40);
        }
        let _ = writeln!(
            rules,
            "\n[[links]]\nid = \"link{c}\"\npartner_id = \"creator{c}\"\ndestination = \"https://shop.example.com/?ref={c}\"\n"
        );
    }
    let start = Utc.with_ymd_and_hms(2026, 9, 1, 0, 0, 0).single().unwrap_or_default();
    let span = 45 * 86_400;
    let mut out: Vec<(i64, u64, String)> = Vec::with_capacity(events as usize + 16);
    let (mut id, mut order_no) = (0u64, 0u64);
    let ts = |t: i64| DateTime::from_timestamp(t, 0).unwrap_or_default().to_rfc3339();
    while (out.len() as u64) < events {
        let t0 = start.timestamp() + rng.random_range(0..span);
        let visitor = format!("v{}", rng.random::<u64>());
        let mut t = t0;
        for _ in 0..rng.random_range(1..=3) {
            let c = (rng.random::<f64>().powi(3) * CREATORS as f64) as usize;
            id += 1;
            let json = format!(
                r#"{{"type":"click","event_id":"c{id}","ts":"{}","program_id":"shop","link_id":"link{c}","visitor_id":"{visitor}"}}"#,
                ts(t)
            );
            out.push((t, id, json));
            t += rng.random_range(60..36_000);
        }
        if rng.random_bool(0.07) {
            order_no += 1;
            id += 1;
            let t = t + rng.random_range(60..86_400);
            let amount = format!("{}.{:02}", rng.random_range(5..500), rng.random_range(0..100));
            let visitor_json =
                if rng.random_bool(0.99) { format!(r#","visitor_id":"{visitor}""#) } else { String::new() };
            let json = format!(
                r#"{{"type":"capture","event_id":"k{id}","ts":"{}","program_id":"shop","order_id":"o{order_no}","amount":"{amount}","currency":"USD"{visitor_json}}}"#,
                ts(t)
            );
            out.push((t, id, json.clone()));
            if rng.random_bool(0.005) {
                out.push((t + 30, id, json));
            }
            if rng.random_bool(0.1) {
                id += 1;
                let rt = t + rng.random_range(86_400..20 * 86_400);
                let refund = if rng.random_bool(0.5) {
                    amount.clone()
                } else {
                    let cents: i64 = amount.replace('.', "").parse().unwrap_or(300);
                    format!("{}.{:02}", cents / 3 / 100, cents / 3 % 100)
                };
                let json = format!(
                    r#"{{"type":"refund","event_id":"r{id}","ts":"{}","program_id":"shop","order_id":"o{order_no}","amount":"{refund}","currency":"USD"}}"#,
                    ts(rt)
                );
                out.push((rt, id, json));
            }
        }
    }
    out.sort_by_key(|(t, id, _)| (*t, *id));
    out.truncate(events as usize);
    Workload { rules, events: out.into_iter().map(|(_, _, j)| j).collect() }
}

/// The schema and the pipeline's stored functions (search_path set first).
const SCHEMA: &str = r#"
CREATE TABLE programs (program_id text PRIMARY KEY, rate numeric NOT NULL, o1 numeric, o2 numeric, win interval NOT NULL);
CREATE TABLE partners (partner_id text PRIMARY KEY, parent text);
CREATE TABLE links (link_id text PRIMARY KEY, partner_id text NOT NULL, program_id text NOT NULL);
CREATE TABLE events (event_id text PRIMARY KEY, payload jsonb NOT NULL);
CREATE TABLE clicks (seq bigserial PRIMARY KEY, event_id text NOT NULL, ts timestamptz NOT NULL, program_id text NOT NULL,
  link_id text NOT NULL, partner_id text NOT NULL, visitor_id text NOT NULL);
CREATE INDEX clicks_visitor ON clicks (visitor_id, program_id, ts);
CREATE TABLE orders (program_id text, order_id text, ts timestamptz NOT NULL, captured numeric NOT NULL,
  refunded numeric NOT NULL, partner_id text, PRIMARY KEY (program_id, order_id));
CREATE TABLE lines (program_id text, order_id text, tier int, partner_id text NOT NULL, accrued numeric NOT NULL,
  net numeric NOT NULL, PRIMARY KEY (program_id, order_id, tier));
CREATE TABLE ledger (entry_id text PRIMARY KEY, event_id text NOT NULL, order_id text NOT NULL, partner_id text NOT NULL,
  tier int NOT NULL, kind text NOT NULL, basis numeric NOT NULL, amount numeric NOT NULL, ts timestamptz NOT NULL);
CREATE TABLE rejections (event_id text, reason text NOT NULL);

CREATE FUNCTION round_half_even(v numeric, s int) RETURNS numeric AS $$
DECLARE m numeric := v * (10::numeric ^ s); t numeric := trunc(m);
BEGIN
  IF abs(m - t) = 0.5 THEN
    IF mod(t, 2) = 0 THEN RETURN round(t / (10::numeric ^ s), s); END IF;
    RETURN round((t + sign(m)) / (10::numeric ^ s), s);
  END IF;
  RETURN round(v, s);
END $$ LANGUAGE plpgsql IMMUTABLE;

CREATE FUNCTION afflio_click(p_event text, p_payload text, p_ts text, p_program text, p_link text, p_visitor text)
RETURNS void AS $$
DECLARE v_partner text;
BEGIN
  INSERT INTO events VALUES (p_event, p_payload::jsonb) ON CONFLICT DO NOTHING;
  IF NOT FOUND THEN RETURN; END IF;
  SELECT partner_id INTO v_partner FROM links WHERE link_id = p_link AND program_id = p_program;
  IF NOT FOUND THEN INSERT INTO rejections VALUES (p_event, 'unknown_link'); RETURN; END IF;
  INSERT INTO clicks (event_id, ts, program_id, link_id, partner_id, visitor_id)
    VALUES (p_event, p_ts::timestamptz, p_program, p_link, v_partner, p_visitor);
END $$ LANGUAGE plpgsql;

CREATE FUNCTION afflio_capture(p_event text, p_payload text, p_ts text, p_program text, p_order text, p_amount text,
  p_visitor text) RETURNS void AS $$
DECLARE
  pr programs%ROWTYPE; v_ts timestamptz := p_ts::timestamptz; v_amount numeric := p_amount::numeric;
  v_partner text; v_who text; v_tier int := 0; v_rate numeric; v_commission numeric;
BEGIN
  INSERT INTO events VALUES (p_event, p_payload::jsonb) ON CONFLICT DO NOTHING;
  IF NOT FOUND THEN RETURN; END IF;
  SELECT * INTO pr FROM programs WHERE program_id = p_program;
  -- Last click of this visitor in the program's window (ties: the later applied).
  IF p_visitor IS NOT NULL THEN
    SELECT partner_id INTO v_partner FROM clicks
     WHERE visitor_id = p_visitor AND program_id = p_program AND ts >= v_ts - pr.win AND ts <= v_ts
     ORDER BY ts DESC, seq DESC LIMIT 1;
  END IF;
  INSERT INTO orders VALUES (p_program, p_order, v_ts, v_amount, 0, v_partner);
  v_who := v_partner;
  WHILE v_who IS NOT NULL AND v_tier <= 2 LOOP
    v_rate := CASE v_tier WHEN 0 THEN pr.rate WHEN 1 THEN pr.o1 ELSE pr.o2 END;
    EXIT WHEN v_rate IS NULL;
    v_commission := round_half_even(v_amount * v_rate, 2);
    INSERT INTO lines VALUES (p_program, p_order, v_tier, v_who, v_commission, v_commission);
    INSERT INTO ledger VALUES (p_event || ':' || v_tier, p_event, p_order, v_who, v_tier, 'accrual', v_amount,
      v_commission, v_ts);
    SELECT parent INTO v_who FROM partners WHERE partner_id = v_who;
    v_tier := v_tier + 1;
  END LOOP;
END $$ LANGUAGE plpgsql;

CREATE FUNCTION afflio_refund(p_event text, p_payload text, p_ts text, p_program text, p_order text, p_amount text)
RETURNS void AS $$
DECLARE o orders%ROWTYPE; l lines%ROWTYPE; v_amount numeric := p_amount::numeric; v_full boolean; v_share numeric;
BEGIN
  INSERT INTO events VALUES (p_event, p_payload::jsonb) ON CONFLICT DO NOTHING;
  IF NOT FOUND THEN RETURN; END IF;
  SELECT * INTO o FROM orders WHERE program_id = p_program AND order_id = p_order FOR UPDATE;
  IF NOT FOUND THEN INSERT INTO rejections VALUES (p_event, 'unknown_order'); RETURN; END IF;
  IF v_amount > o.captured - o.refunded THEN INSERT INTO rejections VALUES (p_event, 'refund_exceeds_capture'); RETURN; END IF;
  UPDATE orders SET refunded = refunded + v_amount WHERE program_id = p_program AND order_id = p_order;
  v_full := o.refunded + v_amount = o.captured;
  FOR l IN SELECT * FROM lines WHERE program_id = p_program AND order_id = p_order ORDER BY tier LOOP
    v_share := CASE WHEN v_full THEN l.net
                    ELSE least(round_half_even(v_amount * l.accrued / o.captured, 2), l.net) END;
    UPDATE lines SET net = net - v_share WHERE program_id = p_program AND order_id = p_order AND tier = l.tier;
    INSERT INTO ledger VALUES (p_event || ':' || l.tier, p_event, p_order, l.partner_id, l.tier, 'reversal', -v_amount,
      -v_share, p_ts::timestamptz);
  END LOOP;
END $$ LANGUAGE plpgsql;
"#;

/// A PostgreSQL this command started (stopped and removed on drop).
struct OwnServer {
    dir: tempfile::TempDir,
    pg_ctl: PathBuf,
    as_postgres: bool,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = pg_command(&self.pg_ctl, self.as_postgres)
            .args(["-D"])
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }
}

fn pg_command(bin: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// Starts a throwaway PostgreSQL on a free port (initdb + pg_ctl from the
/// machine's installation); as root, it runs as the `postgres` user.
fn start_server() -> anyhow::Result<(OwnServer, String)> {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .context("no PostgreSQL server running and none installed under /usr/lib/postgresql")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .max()
        .context("no initdb under /usr/lib/postgresql/*/bin")?;
    let as_postgres = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false);
    let dir = tempfile::Builder::new().prefix("afflio-bench-pg-").tempdir()?;
    if as_postgres {
        Command::new("chown").args(["-R", "postgres"]).arg(dir.path()).status()?;
    }
    let data = dir.path().join("data");
    let out = pg_command(&bin.join("initdb"), as_postgres)
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(&data)
        .output()
        .context("cannot run initdb")?;
    anyhow::ensure!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let opts = format!("-p {port} -c listen_addresses=127.0.0.1 -k {}", dir.path().display());
    let out = pg_command(&bin.join("pg_ctl"), as_postgres)
        .arg("-D")
        .arg(&data)
        .args(["-o", &opts, "-l"])
        .arg(dir.path().join("log"))
        .args(["-w", "start"])
        .output()
        .context("cannot run pg_ctl")?;
    anyhow::ensure!(out.status.success(), "pg_ctl start failed: {}", String::from_utf8_lossy(&out.stderr));
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    Ok((OwnServer { dir, pg_ctl: bin.join("pg_ctl"), as_postgres }, url))
}

/// What the PostgreSQL pipeline measured.
pub struct PgResult {
    pub events: u64,
    pub seconds: f64,
    /// Per event, statement round trip, microseconds.
    pub statement_us: Quantiles,
    /// Per capture, from its statement's start to its transaction's commit
    /// (the ledger rows durable and visible), microseconds.
    pub capture_to_ledger_us: Quantiles,
    /// entry_id -> amount.
    pub ledger: BTreeMap<String, Decimal>,
    pub server: String,
}

impl PgResult {
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }
}

fn hist() -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| anyhow::anyhow!("histogram: {e}"))
}

/// Runs `w` through PostgreSQL at `url` (or one it starts when none answers).
pub fn run_pg(w: &Workload, rules: &afflio_engine::rules::Rules, url: &str, batch: usize) -> anyhow::Result<PgResult> {
    let (_own, url, server) = match postgres::Client::connect(url, postgres::NoTls) {
        Ok(_) => (None, url.to_string(), format!("running server at {url}")),
        Err(e) => {
            eprintln!("no PostgreSQL at {url} ({e}); starting one");
            let (own, url) = start_server()?;
            let server = format!("started by the bench at {url}");
            (Some(own), url, server)
        }
    };
    let mut db =
        postgres::Client::connect(&url, postgres::NoTls).with_context(|| format!("cannot connect to {url}"))?;
    let version: String = db.query_one("SHOW server_version", &[])?.get(0);
    let schema = format!("afflio_bench_{}", std::process::id());
    db.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path = {schema};"
    ))?;
    db.batch_execute(SCHEMA).context("cannot create the baseline schema")?;
    // Reference data from the same rules.
    for p in rules.programs() {
        let o = |i: usize| p.overrides.get(i).map(|r| r.fraction().to_string());
        let win = format!("{} seconds", p.window.num_seconds());
        db.execute(
            "INSERT INTO programs VALUES ($1, $2::text::numeric, $3::text::numeric, $4::text::numeric, $5::text::interval)",
            &[&p.id, &p.rate.fraction().to_string(), &o(0), &o(1), &win],
        )?;
    }
    for p in rules.partners() {
        db.execute("INSERT INTO partners VALUES ($1, $2)", &[&p.id, &p.parent])?;
    }
    for l in rules.links() {
        let program = rules.partner(&l.partner_id).map(|p| p.program_id.clone()).unwrap_or_default();
        db.execute("INSERT INTO links VALUES ($1, $2, $3)", &[&l.id, &l.partner_id, &program])?;
    }
    let click = db.prepare("SELECT afflio_click($1, $2, $3, $4, $5, $6)")?;
    let capture = db.prepare("SELECT afflio_capture($1, $2, $3, $4, $5, $6, $7)")?;
    let refund = db.prepare("SELECT afflio_refund($1, $2, $3, $4, $5, $6)")?;
    let (mut statement_us, mut capture_us) = (hist()?, hist()?);
    let started = Instant::now();
    for chunk in w.events.chunks(batch.max(1)) {
        let mut tx = db.transaction()?;
        let mut captures: Vec<Instant> = Vec::new();
        for line in chunk {
            let e = decode_event(line).map_err(|e| anyhow::anyhow!("internal error: workload event: {e}"))?;
            let ts = e.ts.to_rfc3339();
            let t0 = Instant::now();
            match &e.body {
                Body::Click(c) => {
                    tx.execute(&click, &[&&*e.event_id, line, &ts, &&*e.program_id, &&*c.link_id, &&*c.visitor_id])?;
                }
                Body::Capture(c) => {
                    let amount = c.amount.to_string();
                    let visitor = c.visitor_id.as_deref();
                    tx.execute(
                        &capture,
                        &[&&*e.event_id, line, &ts, &&*e.program_id, &&*c.order_id, &amount, &visitor],
                    )?;
                    captures.push(t0);
                }
                Body::Refund(r) => {
                    let amount = r.amount.to_string();
                    tx.execute(&refund, &[&&*e.event_id, line, &ts, &&*e.program_id, &&*r.order_id, &amount])?;
                }
                _ => anyhow::bail!("internal error: the workload has clicks, captures and refunds only"),
            }
            statement_us.saturating_record(t0.elapsed().as_micros() as u64);
        }
        tx.commit()?;
        for t0 in captures {
            capture_us.saturating_record(t0.elapsed().as_micros() as u64);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut ledger = BTreeMap::new();
    for row in db.query("SELECT entry_id, amount::text FROM ledger", &[])? {
        let amount: String = row.get(1);
        ledger.insert(row.get::<_, String>(0), amount.parse::<Decimal>()?.normalize());
    }
    db.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;
    Ok(PgResult {
        events: w.events.len() as u64,
        seconds,
        statement_us: Quantiles::of(&statement_us),
        capture_to_ledger_us: Quantiles::of(&capture_us),
        ledger,
        server: format!("PostgreSQL {version}, {server}"),
    })
}

/// Afflio's ledger in a replayed store: entry_id -> amount.
pub fn afflio_ledger(store: &Path) -> anyhow::Result<BTreeMap<String, Decimal>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let csv = rt.block_on(afflio_sinks::query(
        store,
        "SELECT entry_id, CAST(amount AS VARCHAR) AS amount FROM ledger",
        afflio_sinks::OutputFormat::Csv,
    ))?;
    let mut ledger = BTreeMap::new();
    for line in csv.lines().skip(1) {
        let (id, amount) = line.split_once(',').with_context(|| format!("unexpected ledger row {line:?}"))?;
        ledger.insert(id.to_string(), amount.trim().parse::<Decimal>()?.normalize());
    }
    Ok(ledger)
}

/// Differences between two ledgers (at most `limit` described).
pub fn compare(a: &BTreeMap<String, Decimal>, b: &BTreeMap<String, Decimal>, limit: usize) -> Vec<String> {
    let mut diffs = Vec::new();
    for (id, x) in a {
        match b.get(id) {
            None => diffs.push(format!("{id}: Afflio {x}, PostgreSQL none")),
            Some(y) if x != y => diffs.push(format!("{id}: Afflio {x}, PostgreSQL {y}")),
            Some(_) => {}
        }
    }
    for (id, y) in b {
        if !a.contains_key(id) {
            diffs.push(format!("{id}: Afflio none, PostgreSQL {y}"));
        }
    }
    let n = diffs.len();
    diffs.truncate(limit);
    if n > limit {
        diffs.push(format!("... and {} more", n - limit));
    }
    diffs
}

/// The whole side-by-side: prints a report; fails when the ledgers differ.
pub fn side_by_side(seed: u64, events: u64, url: &str, batch: usize) -> anyhow::Result<String> {
    let w = workload(seed, events);
    let dir = super::scratch("baseline")?;
    std::fs::write(dir.path().join("rules.toml"), &w.rules)?;
    let mut text = String::with_capacity(w.events.iter().map(|e| e.len() + 1).sum());
    for e in &w.events {
        text.push_str(e);
        text.push('\n');
    }
    std::fs::write(dir.path().join("events.jsonl"), text)?;
    let rules = afflio_engine::rules::Rules::parse("baseline rules", &w.rules)?;
    let afflio = super::replay_in_child(dir.path())?;
    let ours = afflio_ledger(&dir.path().join("store"))?;
    let pg = run_pg(&w, &rules, url, batch)?;
    let diffs = compare(&ours, &pg.ledger, 10);
    let mut r = String::new();
    let _ = writeln!(r, "== side by side: {events} events (seed {seed}), link clicks / captures / refunds");
    let _ = writeln!(r, "PostgreSQL: {}; one connection, a transaction per {batch} events", pg.server);
    let _ = writeln!(r, "  {:<10} {:>14} {:>12} {:>14} {:>14}", "pipeline", "events/s", "seconds", "p50", "p99");
    let _ = writeln!(
        r,
        "  {:<10} {:>14.0} {:>12.3} {:>11} µs {:>11} µs   (capture to committed ledger rows)",
        "postgres",
        pg.events_per_sec(),
        pg.seconds,
        pg.capture_to_ledger_us.p50,
        pg.capture_to_ledger_us.p99
    );
    let _ = writeln!(
        r,
        "  {:<10} {:>14.0} {:>12.3} {:>11} ns {:>11} ns   (decode + apply per event; rows to Parquet in batches)",
        "afflio",
        afflio.events_per_sec(),
        afflio.seconds,
        afflio.apply_ns.p50,
        afflio.apply_ns.p99
    );
    let _ = writeln!(
        r,
        "throughput ratio (afflio / postgres): {:.1}x",
        afflio.events_per_sec() / pg.events_per_sec().max(1e-9)
    );
    let _ = writeln!(
        r,
        "latency ratio, p99 (postgres capture-to-ledger / afflio apply): {:.0}x; p50: {:.0}x",
        pg.capture_to_ledger_us.p99 as f64 * 1000.0 / afflio.apply_ns.p99.max(1) as f64,
        pg.capture_to_ledger_us.p50 as f64 * 1000.0 / afflio.apply_ns.p50.max(1) as f64
    );
    let _ =
        writeln!(r, "postgres statement round trip: p50 {} µs, p99 {} µs", pg.statement_us.p50, pg.statement_us.p99);
    let total = |l: &BTreeMap<String, Decimal>| l.values().copied().sum::<Decimal>();
    let _ = writeln!(
        r,
        "ledgers: afflio {} rows, net {}; postgres {} rows, net {}",
        ours.len(),
        total(&ours),
        pg.ledger.len(),
        total(&pg.ledger)
    );
    if diffs.is_empty() {
        let _ = writeln!(r, "ledgers agree: every entry id and amount is equal");
        Ok(r)
    } else {
        anyhow::bail!("{r}ledgers DIFFER:\n  {}", diffs.join("\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clicks, captures and refunds in a workload.
    fn workload_summary(w: &Workload) -> (usize, usize, usize) {
        let count = |t: &str| w.events.iter().filter(|e| e.contains(&format!(r#""type":"{t}""#))).count();
        (count("click"), count("capture"), count("refund"))
    }

    #[test]
    fn the_workload_is_deterministic_and_mostly_clicks() {
        let a = workload(3, 5_000);
        let b = workload(3, 5_000);
        assert_eq!(a.events, b.events);
        assert_eq!(a.events.len(), 5_000);
        let (clicks, captures, refunds) = workload_summary(&a);
        assert_eq!(clicks + captures + refunds, 5_000);
        assert!(clicks > 4_000 && captures > 100 && refunds > 5, "{clicks} {captures} {refunds}");
        afflio_engine::rules::Rules::parse("w", &a.rules).unwrap();
    }

    #[test]
    fn compare_names_missing_and_different_entries() {
        let a: BTreeMap<_, _> = [("x:0".to_string(), Decimal::ONE), ("y:0".to_string(), Decimal::TWO)].into();
        let b: BTreeMap<_, _> = [("x:0".to_string(), Decimal::ONE), ("z:0".to_string(), Decimal::TWO)].into();
        let d = compare(&a, &b, 10);
        assert_eq!(d, ["y:0: Afflio 2, PostgreSQL none", "z:0: Afflio none, PostgreSQL 2"]);
        assert!(compare(&a, &a, 10).is_empty());
    }

    /// The real thing on a small workload, when a PostgreSQL answers
    /// (AFFLIO_PG_URL or the machine's 127.0.0.1:5432).
    #[test]
    fn postgres_and_afflio_ledgers_agree_on_a_small_workload() {
        let url = std::env::var("AFFLIO_PG_URL")
            .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".to_string());
        if postgres::Client::connect(&url, postgres::NoTls).is_err() {
            eprintln!("skipped: no PostgreSQL at {url}");
            return;
        }
        let w = workload(11, 20_000);
        let rules = afflio_engine::rules::Rules::parse("w", &w.rules).unwrap();
        let pg = run_pg(&w, &rules, &url, 100).unwrap();
        // Afflio in process, same events.
        let mut engine = afflio_engine::Engine::new(std::sync::Arc::new(rules));
        struct O;
        impl std::fmt::Display for O {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("t")
            }
        }
        for line in &w.events {
            let e = decode_event(line).unwrap();
            engine.apply(&e, line, afflio_engine::Arrival { ts: Utc::now(), origin: &O, clock: None });
        }
        let ours: BTreeMap<String, Decimal> =
            engine.take_output().ledger.into_iter().map(|l| (l.entry_id, l.amount.normalize())).collect();
        assert!(ours.len() > 1000, "{} ledger rows", ours.len());
        assert!(ours.keys().any(|k| k.ends_with(":2")), "tier 2 present");
        assert!(ours.values().any(|v| v.is_sign_negative()), "reversals present");
        assert_eq!(compare(&ours, &pg.ledger, 10), Vec::<String>::new());
    }
}
