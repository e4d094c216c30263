//! `afflio bench webhooks`: the engine's added cost per event when it keeps
//! notices and every effect is turned into a webhook message, and the
//! delivery throughput to one endpoint through the broker.

use std::sync::Arc;
use std::time::Instant;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Engine};
use afflio_ingest::decode_event;

use super::NoOrigin;

/// Events/s without and with notices and message building, and the messages made.
pub struct CostResult {
    pub events: u64,
    pub plain_per_sec: f64,
    pub with_webhooks_per_sec: f64,
    pub messages: usize,
}

fn run(rules: &Arc<Rules>, lines: &[&str], webhooks: bool) -> anyhow::Result<(f64, usize)> {
    let mut engine = Engine::new(rules.clone());
    engine.set_tracking(false);
    engine.set_notices(webhooks);
    let arrival = Arrival { ts: chrono::Utc::now(), origin: &NoOrigin, clock: None };
    let mut messages = 0;
    let started = Instant::now();
    for (i, line) in lines.iter().enumerate() {
        // The demo holds some bad input on purpose: it is refused and kept, as in a replay.
        match decode_event(line) {
            Ok(e) => {
                engine.apply(&e, line, arrival);
            }
            Err(e) => {
                engine.reject_undecodable(line, e.event_id.as_deref(), e.reason, e.field.as_deref(), e.detail, arrival);
            }
        }
        if i % 1_000 == 999 {
            let out = engine.take_output();
            if webhooks {
                messages += afflio_pipeline::webhooks::webhook_messages(&out);
            }
        }
    }
    let out = engine.take_output();
    if webhooks {
        messages += afflio_pipeline::webhooks::webhook_messages(&out);
    }
    Ok((lines.len() as f64 / started.elapsed().as_secs_f64(), messages))
}

/// The demo's traffic through the engine, three times each way (best of three).
pub fn cost(events: u64) -> anyhow::Result<CostResult> {
    let (mut r, mut l) = (Vec::new(), Vec::new());
    crate::demo::generate(7, events, &mut r, &mut l)?;
    let rules = Arc::new(Rules::parse("demo.toml", std::str::from_utf8(&r)?)?);
    let text = String::from_utf8(l)?;
    let lines: Vec<&str> = text.lines().collect();
    let (mut plain, mut with, mut messages) = (0f64, 0f64, 0);
    for _ in 0..3 {
        plain = plain.max(run(&rules, &lines, false)?.0);
        let (w, m) = run(&rules, &lines, true)?;
        with = with.max(w);
        messages = m;
    }
    Ok(CostResult { events: lines.len() as u64, plain_per_sec: plain, with_webhooks_per_sec: with, messages })
}
