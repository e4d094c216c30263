//! Incremental checkpoints against the engine itself: for random streams
//! that exercise every part of the state (sessions and their eviction by
//! time and by capacity, event ids and their retention, orders opened,
//! refunded, reviewed, paid and closed, code uses, every fraud detector,
//! balances), an image followed by its deltas restores exactly the state of
//! the engine that wrote them, also after compaction (the chain folded into
//! a new image), and the restored engine goes on exactly as the original.

use std::sync::Arc;

use afflio_rules::Rules;
use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;

use crate::{Arrival, Body, Capture, Click, Customer, Decision, Engine, Event, PayoutEvent, PayoutStatus, Refund};

const RULES: &str = r#"
[engine]
max_clicks_per_visitor = 2
max_tracked_visitors = 5
dedupe_retention = "1d"
order_retention = "2d"
out_of_order = "1h"
[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
overrides = ["2%", "1%"]
hold = "1h"
auto_approve = true
[programs.attribution]
window = "1d"
[programs.fraud.velocity]
action = "hold"
max_orders = 2
window = "1h"
[programs.fraud.coupon_leak]
action = "flag"
min_orders = 3
max_share = 0.5
[programs.fraud.conversion_spike]
action = "hold"
bucket = "1h"
min_orders = 2
warmup_buckets = 2
threshold = 1.0
[programs.fraud.refund_rate]
action = "flag"
min_orders = 2
max_share = 0.2
[programs.fraud.fast_conversion]
action = "flag"
min_seconds = 120
[[programs]]
id = "bharat"
currency = "INR"
rate = "8%"
hold = "2h"
[programs.attribution]
window = "12h"
model = "first_click"
code_priority = false
[[partners]]
id = "net"
program_id = "acme"
[[partners]]
id = "agency"
program_id = "acme"
parent = "net"
[[partners]]
id = "a0"
program_id = "acme"
parent = "agency"
customer_ids = ["c0"]
[[partners]]
id = "a1"
program_id = "acme"
[[partners]]
id = "b0"
program_id = "bharat"
[[partners]]
id = "b1"
program_id = "bharat"
[[links]]
id = "acme-l0"
partner_id = "a0"
[[links]]
id = "acme-l1"
partner_id = "a1"
[[links]]
id = "bharat-l0"
partner_id = "b0"
[[links]]
id = "bharat-l1"
partner_id = "b1"
[[codes]]
code = "A0"
partner_id = "a0"
max_uses = 4
[[codes]]
code = "A1"
partner_id = "a1"
[[codes]]
code = "B0"
partner_id = "b0"
"#;

const PROGRAMS: [(&str, &str); 2] = [("acme", "USD"), ("bharat", "INR")];

#[derive(Clone, Debug)]
enum Op {
    Click { p: usize, link: usize, visitor: u8, dt: i64 },
    Capture { p: usize, order: u8, visitor: Option<u8>, code: Option<usize>, amount: u32, customer: u8, dt: i64 },
    Refund { p: usize, order: u8, amount: u32, chargeback: bool, dt: i64 },
    Review { p: usize, order: Option<u8>, decision: u8, dt: i64 },
    Payout { p: usize, partner: usize, status: u8, amount: u32, dt: i64 },
    Redeliver(usize),
    Jump { hours: i64 },
    StateChanges,
    Cut,
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..2usize, 0..2usize, 0..10u8, 0..90i64).prop_map(|(p, link, visitor, dt)| Op::Click { p, link, visitor, dt }),
        4 => (0..2usize, 0..14u8, proptest::option::of(0..10u8), proptest::option::of(0..2usize), 1..900u32, 0..4u8, 0..60i64)
            .prop_map(|(p, order, visitor, code, amount, customer, dt)| Op::Capture { p, order, visitor, code, amount, customer, dt }),
        2 => (0..2usize, 0..14u8, 1..600u32, any::<bool>(), 0..600i64)
            .prop_map(|(p, order, amount, chargeback, dt)| Op::Refund { p, order, amount, chargeback, dt }),
        1 => (0..2usize, proptest::option::of(0..14u8), 0..3u8, 0..60i64)
            .prop_map(|(p, order, decision, dt)| Op::Review { p, order, decision, dt }),
        1 => (0..2usize, 0..2usize, 0..6u8, 1..300u32, 0..60i64)
            .prop_map(|(p, partner, status, amount, dt)| Op::Payout { p, partner, status, amount, dt }),
        1 => (0..400usize).prop_map(Op::Redeliver),
        1 => (1..40i64).prop_map(|hours| Op::Jump { hours }),
        1 => Just(Op::StateChanges),
        2 => Just(Op::Cut),
        1 => Just(Op::Compact),
    ]
}

struct Origin;
impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("test")
    }
}

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z").unwrap().with_timezone(&Utc)
}

/// Turns ops into events, keeping a clock per program (sometimes late).
struct Gen {
    clock: [DateTime<Utc>; 2],
    n: u64,
    made: Vec<Event<'static>>,
}

impl Gen {
    fn tick(&mut self, p: usize, dt: i64) -> DateTime<Utc> {
        // One event in eight arrives up to an hour late.
        if dt % 8 == 7 {
            return self.clock[p] - Duration::minutes(dt);
        }
        self.clock[p] += Duration::minutes(dt);
        self.clock[p]
    }

    fn event(&mut self, op: &Op) -> Option<Event<'static>> {
        self.n += 1;
        let id = format!("e{}", self.n);
        let s = |v: String| -> std::borrow::Cow<'static, str> { v.into() };
        let ev = match *op {
            Op::Click { p, link, visitor, dt } => Event {
                event_id: s(id),
                ts: self.tick(p, dt),
                program_id: PROGRAMS[p].0.into(),
                body: Body::Click(Click {
                    link_id: s(format!("{}-l{link}", PROGRAMS[p].0)),
                    visitor_id: s(format!("v{visitor}")),
                    ..Click::default()
                }),
            },
            Op::Capture { p, order, visitor, code, amount, customer, dt } => Event {
                event_id: s(id),
                ts: self.tick(p, dt),
                program_id: PROGRAMS[p].0.into(),
                body: Body::Capture(Capture {
                    order_id: s(format!("o{order}")),
                    amount: rust_decimal::Decimal::new(i64::from(amount) * 7, 1),
                    currency: PROGRAMS[p].1.into(),
                    visitor_id: visitor.map(|v| s(format!("v{v}"))),
                    codes: code.map(|c| vec![s([["a0", "A1"], ["b0", "ZZ"]][p][c].to_string())]).unwrap_or_default(),
                    customer: Some(Customer { id: Some(s(format!("c{customer}"))), email_sha256: None }),
                    ip: Some(s(format!("10.0.0.{customer}"))),
                    items: None,
                    extra: Default::default(),
                }),
            },
            Op::Refund { p, order, amount, chargeback, dt } => Event {
                event_id: s(id),
                ts: self.tick(p, dt),
                program_id: PROGRAMS[p].0.into(),
                body: Body::Refund(Refund {
                    order_id: s(format!("o{order}")),
                    amount: rust_decimal::Decimal::new(i64::from(amount), 1),
                    currency: PROGRAMS[p].1.into(),
                    items: None,
                    chargeback,
                }),
            },
            Op::Review { p, order, decision, dt } => Event {
                event_id: s(id),
                ts: self.tick(p, dt),
                program_id: PROGRAMS[p].0.into(),
                body: Body::Review(crate::ReviewEvent {
                    order_id: order.map(|o| s(format!("o{o}"))),
                    partner_id: None,
                    tier: None,
                    decision: [Decision::Approve, Decision::Reject, Decision::Clear][decision as usize],
                    reason: Some("checked".into()),
                    reviewer: "ana".into(),
                }),
            },
            Op::Payout { p, partner, status, amount, dt } => Event {
                event_id: s(id),
                ts: self.tick(p, dt),
                program_id: PROGRAMS[p].0.into(),
                body: Body::Payout(PayoutEvent {
                    batch_id: s(format!("b{}", self.n % 3)),
                    partner_id: s(format!("{}{partner}", &PROGRAMS[p].0[..1])),
                    currency: PROGRAMS[p].1.into(),
                    amount: rust_decimal::Decimal::new(i64::from(amount), 1),
                    tds: rust_decimal::Decimal::ZERO,
                    status: [
                        PayoutStatus::Planned,
                        PayoutStatus::Sent,
                        PayoutStatus::Unknown,
                        PayoutStatus::Paid,
                        PayoutStatus::Failed,
                        PayoutStatus::Reversed,
                    ][status as usize % 6],
                    provider: None,
                    provider_ref: None,
                    detail: None,
                    idempotency_key: Some(s(format!("k{partner}"))),
                    provider_batch: None,
                    destination: Some("d".into()),
                    attempted_at: (status == 2).then(|| self.clock[p]),
                }),
            },
            Op::Redeliver(i) => return self.made.get(i % self.made.len().max(1)).cloned(),
            Op::Jump { hours } => {
                for c in &mut self.clock {
                    *c += Duration::hours(hours);
                }
                return None;
            }
            _ => return None,
        };
        self.made.push(ev.clone());
        Some(ev)
    }
}

fn apply(e: &mut Engine, ev: &Event<'_>) {
    e.apply(ev, "{}", Arrival { ts: t0(), origin: &Origin, clock: None });
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let rules = Arc::new(Rules::parse("t.toml", RULES).unwrap());
    let mut live = Engine::new(rules.clone());
    let mut image = live.checkpoint().unwrap();
    let mut deltas: Vec<Vec<u8>> = Vec::new();
    // A restored twin, fed the same events since its restore.
    let mut twin: Option<Engine> = None;
    let mut gen = Gen { clock: [t0(), t0()], n: 0, made: Vec::new() };
    let mut cuts = 0;
    for op in ops.iter().chain(std::iter::once(&Op::Cut)) {
        match op {
            Op::Cut => {
                // As the pipeline does at an epoch: rows, state-table changes, checkpoint delta.
                let out = format!("{:?}", live.take_output());
                let changes = live.take_state_changes(gen.clock[0]);
                if let Some(t) = twin.as_mut() {
                    prop_assert_eq!(format!("{:?}", t.take_output()), out, "the restored engine went on differently");
                    let theirs = t.take_state_changes(gen.clock[0]);
                    prop_assert_eq!(format!("{:?}", theirs.orders), format!("{:?}", changes.orders));
                    prop_assert_eq!(format!("{:?}", theirs.balances), format!("{:?}", changes.balances));
                    prop_assert_eq!(t.canonical(), live.canonical());
                }
                deltas.push(live.checkpoint_delta().unwrap());
                let restored = Engine::restore_chain(rules.clone(), &image, deltas.iter().map(Vec::as_slice)).unwrap();
                prop_assert_eq!(restored.canonical(), live.canonical(), "image + {} deltas", deltas.len());
                twin = Some(restored);
                cuts += 1;
            }
            Op::Compact => {
                let folded = Engine::restore_chain(rules.clone(), &image, deltas.iter().map(Vec::as_slice)).unwrap();
                image = folded.checkpoint().unwrap();
                deltas.clear();
                // The new image holds what the deltas held, not what changed since.
                let _ = live.take_output();
                let _ = live.take_state_changes(gen.clock[0]);
                if let Some(t) = twin.as_mut() {
                    let _ = t.take_output();
                    let _ = t.take_state_changes(gen.clock[0]);
                }
                let pending = live.checkpoint_delta().unwrap();
                deltas.push(pending);
            }
            Op::StateChanges => {
                let at = gen.clock[0];
                let a = live.take_state_changes(at);
                if let Some(t) = twin.as_mut() {
                    let b = t.take_state_changes(at);
                    prop_assert_eq!(format!("{:?}", a.orders), format!("{:?}", b.orders));
                    prop_assert_eq!(format!("{:?}", a.balances), format!("{:?}", b.balances));
                }
            }
            other => {
                if let Some(ev) = gen.event(other) {
                    apply(&mut live, &ev);
                    if let Some(t) = twin.as_mut() {
                        apply(t, &ev);
                    }
                }
            }
        }
    }
    prop_assert!(cuts >= 1);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn an_image_and_its_deltas_restore_the_engine_exactly(ops in proptest::collection::vec(op(), 1..300)) {
        run(&ops)?;
    }
}

#[test]
fn a_long_stream_exercises_every_part_and_still_restores_exactly() {
    // A fixed, long stream (deterministic: no shrinking needed to read it).
    let mut ops = Vec::new();
    for i in 0..3000u32 {
        let p = (i % 7 == 0) as usize;
        ops.push(match i % 23 {
            0..=9 => Op::Click { p, link: (i % 2) as usize, visitor: (i % 10) as u8, dt: i64::from(i % 13) },
            10..=15 => Op::Capture {
                p,
                order: ((i / 60) % 250) as u8,
                visitor: Some((i % 9) as u8),
                code: (i % 3 == 0).then_some((i % 2) as usize),
                amount: 10 + i % 700,
                customer: (i % 4) as u8,
                dt: i64::from(i % 11),
            },
            16..=18 => {
                Op::Refund { p, order: ((i / 60) % 250) as u8, amount: 5 + i % 300, chargeback: i % 5 == 0, dt: 3 }
            }
            19 => Op::Review { p, order: Some(((i / 60) % 250) as u8), decision: (i % 3) as u8, dt: 1 },
            20 => Op::Payout { p, partner: (i % 2) as usize, status: (i % 6) as u8, amount: 20, dt: 1 },
            21 => {
                if i % 5 == 0 {
                    Op::Jump { hours: 30 }
                } else {
                    Op::Redeliver(i as usize)
                }
            }
            _ => match i % 4 {
                0 => Op::Cut,
                1 => Op::StateChanges,
                2 => Op::Compact,
                _ => Op::Cut,
            },
        });
    }
    run(&ops).unwrap();
    // And the stream did reach every part of the state.
    let rules = Arc::new(Rules::parse("t.toml", RULES).unwrap());
    let mut e = Engine::new(rules);
    let mut gen = Gen { clock: [t0(), t0()], n: 0, made: Vec::new() };
    for op in &ops {
        if let Some(ev) = gen.event(op) {
            apply(&mut e, &ev);
        }
    }
    let s = e.stats();
    assert!(s.applied_clicks > 0 && s.applied_captures > 0 && s.applied_refunds > 0, "{s:?}");
    assert!(s.orders_closed > 0 && s.visitors_evicted_capacity > 0 && s.clicks_dropped > 0, "{s:?}");
    assert!(s.flags > 0 && s.applied_reviews > 0 && s.duplicates > 0, "{s:?}");
    assert!(s.rejected.contains_key(&crate::Reason::LateEvent) || s.events > 0);
}

#[test]
fn deltas_out_of_sequence_are_refused() {
    let rules = Arc::new(Rules::parse("t.toml", RULES).unwrap());
    let mut e = Engine::new(rules.clone());
    let image = e.checkpoint().unwrap();
    let mut gen = Gen { clock: [t0(), t0()], n: 0, made: Vec::new() };
    let ev = gen.event(&Op::Click { p: 0, link: 0, visitor: 1, dt: 1 }).unwrap();
    apply(&mut e, &ev);
    let _ = e.take_output();
    let d1 = e.checkpoint_delta().unwrap();
    assert!(Engine::restore_chain(rules.clone(), &d1, []).is_err(), "a delta is no image");
    assert!(Engine::restore_chain(rules.clone(), &image, [image.as_slice()]).is_err(), "an image is no delta");
    assert!(Engine::restore_chain(rules.clone(), &image, [&d1[..10]]).is_err(), "a truncated delta");
    assert!(Engine::restore_chain(rules, &image, [d1.as_slice()]).is_ok());
}

#[test]
fn a_delta_is_the_size_of_the_change_not_of_the_state() {
    let rules = Arc::new(
        Rules::parse("t.toml", &RULES.replace("max_tracked_visitors = 5", "max_tracked_visitors = 100000")).unwrap(),
    );
    let mut e = Engine::new(rules);
    let mut gen = Gen { clock: [t0(), t0()], n: 0, made: Vec::new() };
    for i in 0..20_000u32 {
        let ev = gen.event(&Op::Click { p: 0, link: 0, visitor: 0, dt: 0 }).unwrap();
        // Distinct visitors: rename the visitor of each click.
        let ev = match ev.body {
            Body::Click(mut c) => {
                c.visitor_id = format!("visitor-{i}").into();
                Event { body: Body::Click(c), ..ev }
            }
            _ => unreachable!(),
        };
        apply(&mut e, &ev);
    }
    let _ = e.take_output();
    let first = e.checkpoint_delta().unwrap().len();
    let ev = gen.event(&Op::Click { p: 0, link: 1, visitor: 3, dt: 1 }).unwrap();
    apply(&mut e, &ev);
    let _ = e.take_output();
    let small = e.checkpoint_delta().unwrap().len();
    let image = e.checkpoint().unwrap().len();
    assert!(first > 20_000 * 24, "the first delta holds every session: {first} bytes");
    assert!(small < 2_000, "one click later the delta is small: {small} bytes (image {image})");
}
