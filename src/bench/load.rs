//! A streaming load: the demo's `acme` traffic generated as it is sent, in
//! wall-clock event time, so a run of any length needs no file and no
//! memory beyond its in-flight orders. Every visitor is new (sessions grow
//! for the whole run, as a retailer's 30-day window fills); a visit is one
//! to three clicks on creators' links, 7% of visits end in an order (one or
//! two captures, sometimes through the creator's code), 1% of orders are
//! code-only, and 10% of orders are refunded (some charged back) seconds to
//! minutes later.

use std::collections::VecDeque;
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The API key the generated rules hold for `acme`.
pub const KEY: &str = "bench-live-key-0123456789";

struct Target {
    links: Vec<String>,
    code: Option<String>,
}

/// Generates events one at a time.
pub struct LoadGen {
    rng: SmallRng,
    targets: Vec<Target>,
    cumulative: Vec<f64>,
    next: u64,
    /// Events decided but not yet sent (the rest of a visit).
    queue: VecDeque<String>,
    /// Orders to refund later: (due, order id, amount).
    refunds: VecDeque<(DateTime<Utc>, String, u32)>,
}

impl LoadGen {
    /// The generator and the rules (TOML, with an API key for `acme`).
    pub fn new(seed: u64) -> (LoadGen, String) {
        let (mut rules, creators) = crate::demo::rules_and_creators(seed, crate::demo::CREATORS_PER_PROGRAM);
        let _ = write!(rules, "\n[[api_keys]]\nprogram_id = \"acme\"\nkey = \"{KEY}\"\n");
        let mut targets = Vec::new();
        let mut cumulative = Vec::new();
        let mut acc = 0.0;
        for c in creators.into_iter().filter(|c| c.program == 0) {
            acc += c.weight;
            cumulative.push(acc);
            targets.push(Target { links: c.links, code: c.code });
        }
        let g = LoadGen {
            rng: SmallRng::seed_from_u64(seed ^ 0x5eed),
            targets,
            cumulative,
            next: 0,
            queue: VecDeque::new(),
            refunds: VecDeque::new(),
        };
        (g, rules)
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}-{:010}", self.next)
    }

    fn pick(&mut self) -> usize {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let x = self.rng.random::<f64>() * total;
        self.cumulative.partition_point(|c| *c < x).min(self.targets.len() - 1)
    }

    /// The next event, stamped `now`.
    pub fn next_event(&mut self, now: DateTime<Utc>) -> String {
        if let Some(e) = self.queue.pop_front() {
            return e;
        }
        let ts = now.to_rfc3339_opts(SecondsFormat::Micros, true);
        if self.refunds.front().is_some_and(|(due, _, _)| *due <= now) {
            let (_, order, amount) = self.refunds.pop_front().expect("checked above");
            let eid = self.id("ref");
            let ty = if self.rng.random_bool(0.1) { "chargeback" } else { "refund" };
            return format!(
                r#"{{"type":"{ty}","event_id":"{eid}","ts":"{ts}","program_id":"acme","order_id":"{order}","amount":"{amount}.00","currency":"USD"}}"#
            );
        }
        let t = self.pick();
        let visitor = self.id("v");
        let clicks = self.rng.random_range(1..=3);
        for _ in 0..clicks {
            let t = if self.rng.random_bool(0.15) { self.pick() } else { t };
            let link = self.targets[t].links[self.rng.random_range(0..self.targets[t].links.len())].clone();
            let eid = self.id("clk");
            let ip = (self.rng.random_range(1..255), self.rng.random_range(0..255), self.rng.random_range(1..255));
            self.queue.push_back(format!(
                r#"{{"type":"click","event_id":"{eid}","ts":"{ts}","program_id":"acme","link_id":"{link}","visitor_id":"{visitor}","ip":"10.{}.{}.{}","user_agent":"Mozilla/5.0"}}"#,
                ip.0, ip.1, ip.2
            ));
        }
        let code_only = self.rng.random_bool(0.01);
        if self.rng.random_bool(0.07) || code_only {
            let order = self.id("o");
            let amount: u32 = self.rng.random_range(15..=400);
            let code = if code_only || self.rng.random_bool(0.15) { self.targets[t].code.clone() } else { None };
            let codes = code.map(|c| format!(r#","codes":["{c}"]"#)).unwrap_or_default();
            let visitor = if code_only { String::new() } else { format!(r#","visitor_id":"{visitor}""#) };
            let customer = self.rng.random_range(0..200_000);
            let parts: Vec<u32> =
                if self.rng.random_bool(0.1) { vec![amount * 6 / 10, amount - amount * 6 / 10] } else { vec![amount] };
            for p in &parts {
                let eid = self.id("cap");
                let cents = self.rng.random_range(0..100);
                self.queue.push_back(format!(
                    r#"{{"type":"capture","event_id":"{eid}","ts":"{ts}","program_id":"acme","order_id":"{order}","amount":"{p}.{cents:02}","currency":"USD"{visitor}{codes},"customer":{{"id":"cust-{customer}"}}}}"#
                ));
            }
            if self.rng.random_bool(0.1) {
                let due = now + chrono::Duration::seconds(self.rng.random_range(5..120));
                let amount = if self.rng.random_bool(0.5) { parts[0] } else { (parts[0] / 3).max(1) };
                // Kept in time order (dues are close enough for a bounded insert).
                let at = self.refunds.partition_point(|(d, _, _)| *d <= due);
                self.refunds.insert(at, (due, order, amount));
            }
        }
        self.queue.pop_front().expect("a visit has a click")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_is_every_kind_of_event_unique_ids_valid_for_its_rules() {
        let (mut g, rules) = LoadGen::new(3);
        let rules = afflio_engine::rules::Rules::parse("gen.toml", &rules).unwrap();
        let t0: DateTime<Utc> = "2026-11-29T00:00:00Z".parse().unwrap();
        let mut engine = afflio_engine::Engine::new(std::sync::Arc::new(rules));
        let mut ids = std::collections::HashSet::new();
        for i in 0..40_000 {
            let now = t0 + chrono::Duration::milliseconds(i * 5);
            let text = g.next_event(now);
            let ev = afflio_ingest::decode_event(&text).unwrap();
            assert!(ids.insert(ev.event_id.to_string()), "unique ids");
            let o = engine.apply(&ev, &text, afflio_engine::Arrival { ts: now, origin: &"gen", clock: None });
            assert!(matches!(o, afflio_engine::Outcome::Applied), "{text}: {o:?}");
        }
        let s = engine.stats();
        assert!(s.applied_clicks > 20_000 && s.applied_captures > 1_000 && s.applied_refunds > 50, "{s:?}");
        assert!(s.orders_by_code > 0 && s.orders_by_link > 0, "{s:?}");
    }
}
