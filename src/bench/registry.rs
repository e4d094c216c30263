//! `afflio bench registry`: the marketplace registry at 10k, 100k and 1M
//! partners. Each size, in its own process: apply N applications and N
//! approvals (each approval creates a partner, a link and a code) through
//! JSON decoding and the engine, with a checkpoint delta every 5,000
//! partners; the RSS the registry added per partner (with the remembered
//! event ids of its 2N events);
//! then 1,000 more updates at that size (updates/s when the registry is
//! full), the checkpoint delta they make, and the image. For comparison, one
//! partner added the old way: rebuilding the rules from a file that holds
//! the N partners (`Rules::with_update`), up to 100k.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Engine, Outcome};
use afflio_ingest::decode_event;

use super::{field, memory, run_child, NoOrigin};

const RULES: &str = r#"
[[programs]]
id = "shop"
currency = "USD"
rate = "10%"
[programs.marketplace]
listed = true
name = "Shop"
link_pattern = "shop-{partner}"
code_pattern = "{PARTNER}"
"#;

/// One size's figures.
#[derive(Debug, Clone, Default)]
pub struct RegistryResult {
    pub partners: u64,
    /// Applications + approvals per second while the registry grows to N.
    pub build_updates_per_sec: f64,
    /// RSS added per partner (application, partner, link, code, names).
    pub bytes_per_partner: f64,
    /// Further approvals per second at N (each: partner, link, code).
    pub updates_per_sec_at_size: f64,
    /// The checkpoint delta of those 1,000 approvals, bytes.
    pub delta_bytes: u64,
    pub image_bytes: u64,
    /// One partner added by rebuilding the rules from a file of N partners, ms (0: not measured).
    pub rules_rebuild_ms: f64,
}

fn event(line: &mut String, i: u64, ts_ms: i64, approve: bool) {
    line.clear();
    let ts = chrono::DateTime::from_timestamp_millis(ts_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    if approve {
        let _ = write!(
            line,
            r#"{{"type":"application_decided","event_id":"d{i}","ts":"{ts}","program_id":"shop","data":{{"application_id":"a{i}","decision":"approve","decided_by":"bench"}}}}"#
        );
    } else {
        let _ = write!(
            line,
            r#"{{"type":"partner_applied","event_id":"a{i}","ts":"{ts}","program_id":"shop","data":{{"application_id":"a{i}","partner_id":"creator{i}","display_name":"Creator {i}","email":"creator{i}@example.com","channels":["https://video.example/creator{i}"]}}}}"#
        );
    }
}

/// Applies applications and approvals of partners `from..to`, taking a
/// checkpoint delta every 5,000 partners as the live service does every epoch
/// (so the change sets stay an epoch's, and the deltas' cost is counted).
fn grow(engine: &mut Engine, from: u64, to: u64) -> anyhow::Result<()> {
    let arrival = Arrival { ts: chrono::Utc::now(), origin: &NoOrigin, clock: None };
    let start = 1_793_491_200_000i64; // 2026-11-01
    let mut line = String::with_capacity(512);
    for i in from..to {
        for approve in [false, true] {
            event(&mut line, i, start + i as i64, approve);
            let ev = decode_event(&line).map_err(|e| anyhow::anyhow!("internal error: bench event: {e}"))?;
            let o = engine.apply(&ev, &line, arrival);
            anyhow::ensure!(o == Outcome::Applied, "internal error: bench registry event refused: {line}: {o:?}");
        }
        if (i + 1) % 5_000 == 0 && i + 1 < to {
            drop(engine.take_output());
            engine.checkpoint_delta()?;
        }
    }
    Ok(())
}

pub fn measure(n: u64) -> anyhow::Result<RegistryResult> {
    anyhow::ensure!(n >= 1000, "--partners must be at least 1000, not {n}");
    let rules = Arc::new(Rules::parse("bench-registry.toml", RULES)?);
    let mut engine = Engine::new(rules);
    let rss0 = memory().0;
    let t = Instant::now();
    grow(&mut engine, 0, n)?;
    let build = t.elapsed().as_secs_f64();
    drop(engine.take_output());
    engine.checkpoint_delta()?; // the change marks of the build
    let rss1 = memory().0;
    let [apps, partners, links, codes] = engine.registry_sizes();
    anyhow::ensure!(
        [apps, partners, links, codes] == [n as usize; 4],
        "internal error: registry sizes {apps} {partners} {links} {codes} for {n}"
    );
    let t = Instant::now();
    grow(&mut engine, n, n + 1000)?;
    let at_size = 2000.0 / t.elapsed().as_secs_f64();
    drop(engine.take_output());
    let delta = engine.checkpoint_delta()?.len() as u64;
    let image = engine.checkpoint()?.len() as u64;
    let rules_rebuild_ms = if n <= 100_000 { rebuild_ms(n)? } else { 0.0 };
    Ok(RegistryResult {
        partners: n,
        build_updates_per_sec: (2 * n) as f64 / build,
        bytes_per_partner: rss1.saturating_sub(rss0) as f64 / n as f64,
        updates_per_sec_at_size: at_size,
        delta_bytes: delta,
        image_bytes: image,
        rules_rebuild_ms,
    })
}

/// One partner (and its link and code) added to rules that hold N of them, by rebuilding.
fn rebuild_ms(n: u64) -> anyhow::Result<f64> {
    let mut t = String::from(RULES);
    for i in 0..n {
        let _ = write!(
            t,
            "[[partners]]\nid = \"creator{i}\"\nprogram_id = \"shop\"\n[[links]]\nid = \"shop-creator{i}\"\npartner_id = \"creator{i}\"\n[[codes]]\ncode = \"CREATOR{i}\"\npartner_id = \"creator{i}\"\n"
        );
    }
    let rules = Rules::parse("bench-rebuild.toml", &t)?;
    let one = "[[partners]]\nid = \"newcomer\"\nprogram_id = \"shop\"\n[[links]]\nid = \"shop-newcomer\"\npartner_id = \"newcomer\"\n[[codes]]\ncode = \"NEWCOMER\"\npartner_id = \"newcomer\"\n";
    let start = Instant::now();
    let next = rules.with_update(one)?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(next.partner("newcomer").is_some(), "internal error: the rebuilt rules lack the partner");
    Ok(ms)
}

pub fn line(r: &RegistryResult) -> String {
    format!(
        "registry partners={} build_updates_per_sec={:.0} bytes_per_partner={:.1} updates_per_sec_at_size={:.0} delta_bytes={} image_bytes={} rules_rebuild_ms={:.1}",
        r.partners, r.build_updates_per_sec, r.bytes_per_partner, r.updates_per_sec_at_size, r.delta_bytes, r.image_bytes, r.rules_rebuild_ms
    )
}

pub fn in_child(n: u64) -> anyhow::Result<RegistryResult> {
    let l = run_child(&["bench", "registry", "--partners", &n.to_string(), "--here"], "registry ")?;
    let get = |k: &str| field(&l, k);
    Ok(RegistryResult {
        partners: get("partners")? as u64,
        build_updates_per_sec: get("build_updates_per_sec")?,
        bytes_per_partner: get("bytes_per_partner")?,
        updates_per_sec_at_size: get("updates_per_sec_at_size")?,
        delta_bytes: get("delta_bytes")? as u64,
        image_bytes: get("image_bytes")? as u64,
        rules_rebuild_ms: get("rules_rebuild_ms")?,
    })
}

pub fn report(rs: &[RegistryResult]) -> String {
    let mut s = String::from(
        "== registry: applications + approvals (partner, link, code each) through decode and the engine\n",
    );
    let _ = writeln!(
        s,
        "  {:>9} {:>14} {:>12} {:>16} {:>14} {:>12} {:>18}",
        "partners", "build upd/s", "B/partner", "upd/s at size", "delta (1k)", "image MB", "rules rebuild ms"
    );
    for r in rs {
        let rebuild = if r.rules_rebuild_ms > 0.0 { format!("{:.1}", r.rules_rebuild_ms) } else { "-".into() };
        let _ = writeln!(
            s,
            "  {:>9} {:>14.0} {:>12.0} {:>16.0} {:>14} {:>12.1} {:>18}",
            r.partners,
            r.build_updates_per_sec,
            r.bytes_per_partner,
            r.updates_per_sec_at_size,
            r.delta_bytes,
            r.image_bytes as f64 / 1e6,
            rebuild
        );
    }
    s
}
