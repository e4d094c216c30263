//! Model-based property test of balances and payouts: random captures,
//! refunds, approvals, payout plans (some over the balance), payments,
//! failures and reversals, against a model of what was paid and what is in
//! flight. Invariants after every step: a payout over the available balance
//! is refused; what was paid and what is in flight match the model; the
//! approved net equals available + in flight + paid (so the balance is
//! netted, never paid twice); lines marked paid are covered by money paid.
//! proptest prints the failing case and its seed.

use std::collections::BTreeMap;
use std::sync::Arc;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Engine, LineStatus, Outcome, Reason};
use afflio_ingest::decode_event;
use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use serde_json::json as j;

const RULES: &str = r#"
[[programs]]
id = "p"
currency = "USD"
rate = "10%"
hold = "1d"
[[partners]]
id = "a"
program_id = "p"
[[partners]]
id = "b"
program_id = "p"
[[codes]]
code = "A"
partner_id = "a"
[[codes]]
code = "B"
partner_id = "b"
"#;

#[derive(Clone, Debug)]
enum Op {
    Capture { partner: bool, cents: i64 },
    Refund { order: u8, percent: u8 },
    Wait { hours: u16 },
    ApproveAll,
    Plan { partner: bool, over: bool },
    Settle { item: u8, outcome: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), 100i64..50_000).prop_map(|(partner, cents)| Op::Capture { partner, cents }),
        2 => (0u8..16, 1u8..=100).prop_map(|(order, percent)| Op::Refund { order, percent }),
        2 => (1u16..60).prop_map(|hours| Op::Wait { hours }),
        2 => Just(Op::ApproveAll),
        3 => (any::<bool>(), any::<bool>()).prop_map(|(partner, over)| Op::Plan { partner, over }),
        3 => (0u8..16, 0u8..5).prop_map(|(item, outcome)| Op::Settle { item, outcome }),
    ]
}

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z").unwrap().with_timezone(&Utc)
}

struct Item {
    partner: &'static str,
    batch: String,
    amount: Decimal,
    status: &'static str,
}

#[derive(Default)]
struct Model {
    paid: BTreeMap<&'static str, Decimal>,
    in_flight: BTreeMap<&'static str, Decimal>,
}

fn apply(e: &mut Engine, n: &mut usize, mut json: serde_json::Value) -> Outcome {
    *n += 1;
    if json.get("event_id").is_none() {
        json["event_id"] = serde_json::json!(format!("e{n}"));
    }
    let text = json.to_string();
    let ev = decode_event(&text).unwrap();
    e.apply(&ev, &text, Arrival { ts: t0(), origin: &"model", clock: None })
}

fn approved_net(e: &Engine, partner: &str, at: DateTime<Utc>) -> Decimal {
    e.orders()
        .flat_map(|o| o.lines.iter().map(move |l| (o, l)))
        .filter(|(o, l)| {
            &*l.partner_id == partner && matches!(e.line_status(o, l, at), LineStatus::Approved | LineStatus::Paid)
        })
        .map(|(_, l)| l.net)
        .sum()
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut e = Engine::new(Arc::new(Rules::parse("model.toml", RULES).unwrap()));
    let mut model = Model::default();
    let mut items: Vec<Item> = Vec::new();
    let mut now = t0();
    let mut n = 0usize;
    let mut orders: Vec<(String, i64)> = Vec::new();
    for op in ops {
        match *op {
            Op::Capture { partner, cents } => {
                let id = format!("o{}", orders.len());
                let out = apply(
                    &mut e,
                    &mut n,
                    serde_json::json!({"type": "capture", "ts": now.to_rfc3339(),
                    "program_id": "p", "order_id": id, "amount": Decimal::new(cents, 2).to_string(), "currency": "USD",
                    "codes": [if partner { "A" } else { "B" }]}),
                );
                prop_assert_eq!(out, Outcome::Applied);
                orders.push((id, cents));
            }
            Op::Refund { order, percent } => {
                let Some((id, left)) = orders.get_mut(usize::from(order)) else { continue };
                let cents = (*left * i64::from(percent) / 100).max(1).min(*left);
                if *left == 0 {
                    continue;
                }
                let out = apply(
                    &mut e,
                    &mut n,
                    serde_json::json!({"type": "refund", "ts": now.to_rfc3339(),
                    "program_id": "p", "order_id": id, "amount": Decimal::new(cents, 2).to_string(), "currency": "USD"}),
                );
                prop_assert_eq!(out, Outcome::Applied);
                *left -= cents;
            }
            Op::Wait { hours } => now += Duration::hours(i64::from(hours)),
            Op::ApproveAll => {
                let out = apply(
                    &mut e,
                    &mut n,
                    serde_json::json!({"type": "review", "ts": now.to_rfc3339(),
                    "program_id": "p", "decision": "approve", "reviewer": "model"}),
                );
                prop_assert_eq!(out, Outcome::Applied);
            }
            Op::Plan { partner, over } => {
                let p = if partner { "a" } else { "b" };
                let available = e
                    .balances("p", now)
                    .into_iter()
                    .find(|b| &*b.partner_id == p)
                    .map_or(Decimal::ZERO, |b| b.available);
                if available <= Decimal::ZERO && !over {
                    continue;
                }
                let amount = if over { available.max(Decimal::ZERO) + Decimal::new(1, 2) } else { available };
                let batch = format!("batch{}", items.len());
                let out = apply(
                    &mut e,
                    &mut n,
                    serde_json::json!({"type": "payout", "ts": now.to_rfc3339(),
                    "program_id": "p", "batch_id": batch, "partner_id": p, "currency": "USD", "amount": amount.to_string(), "status": "planned",
                    "idempotency_key": format!("k-{batch}-{p}"), "destination": "{\"kind\":\"paypal\",\"email\":\"x@y\"}"}),
                );
                if over {
                    prop_assert_eq!(
                        out,
                        Outcome::Rejected(Reason::InvalidPayout),
                        "over-plan of {} with {} available",
                        amount,
                        available
                    );
                } else {
                    prop_assert_eq!(out, Outcome::Applied);
                    *model.in_flight.entry(p).or_default() += amount;
                    items.push(Item { partner: p, batch, amount, status: "planned" });
                }
            }
            Op::Settle { item, outcome } => {
                let Some(it) = items.get_mut(usize::from(item)) else { continue };
                let to = match (it.status, outcome) {
                    ("planned" | "unknown", 0) => "sent",
                    ("planned" | "unknown", 3) => "unknown",
                    ("planned" | "sent" | "unknown", 1) => "paid",
                    ("planned" | "sent" | "unknown", 2) => "failed",
                    ("sent" | "unknown", 4) => "reversed",
                    ("paid", _) => "reversed",
                    ("failed", 4) => "reversed",
                    _ => continue,
                };
                let mut ev = serde_json::json!({"type": "payout", "ts": now.to_rfc3339(),
                    "program_id": "p", "batch_id": it.batch, "partner_id": it.partner, "currency": "USD", "amount": it.amount.to_string(), "status": to});
                if to == "unknown" {
                    ev["attempted_at"] = serde_json::json!(now.to_rfc3339());
                }
                let from = it.status;
                let out = apply(&mut e, &mut n, ev);
                prop_assert_eq!(out, Outcome::Applied, "{} -> {}", it.status, to);
                match to {
                    "paid" => {
                        *model.in_flight.entry(it.partner).or_default() -= it.amount;
                        *model.paid.entry(it.partner).or_default() += it.amount;
                    }
                    "failed" => *model.in_flight.entry(it.partner).or_default() -= it.amount,
                    // Reversed after it was paid: the money came back; while
                    // sent or unknown: it never left; after a failure: already back.
                    "reversed" if from == "paid" => *model.paid.entry(it.partner).or_default() -= it.amount,
                    "reversed" if from != "failed" => *model.in_flight.entry(it.partner).or_default() -= it.amount,
                    _ => {}
                }
                it.status = to;
            }
        }
        for p in ["a", "b"] {
            let b = e.balances("p", now).into_iter().find(|b| &*b.partner_id == p);
            let (available, in_flight, paid) =
                b.map_or((Decimal::ZERO, Decimal::ZERO, Decimal::ZERO), |b| (b.available, b.in_flight, b.paid));
            prop_assert_eq!(paid, model.paid.get(p).copied().unwrap_or_default(), "paid of {}", p);
            prop_assert_eq!(in_flight, model.in_flight.get(p).copied().unwrap_or_default(), "in flight of {}", p);
            prop_assert!(paid >= Decimal::ZERO && in_flight >= Decimal::ZERO);
            // Nothing is paid twice: the balance nets what was paid and is in flight.
            prop_assert_eq!(available + in_flight + paid, approved_net(&e, p, now), "balance identity for {}", p);
            // Lines marked paid are covered by money actually paid.
            let marked: Decimal =
                e.orders().flat_map(|o| o.lines.iter()).filter(|l| &*l.partner_id == p && l.paid).map(|l| l.net).sum();
            prop_assert!(marked <= paid, "{} marked paid but {} paid to {}", marked, paid, p);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn payouts_never_exceed_the_approved_balance(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops)?;
    }
}

#[test]
fn a_refund_after_payout_is_a_clawback_netted_from_the_next_payout() {
    // Capture 100 (commission 10), approve, pay 10; refund half: net 5, so -5 is owed.
    let ops = [
        Op::Capture { partner: true, cents: 10_000 },
        Op::Wait { hours: 25 },
        Op::ApproveAll,
        Op::Plan { partner: true, over: false },
        Op::Settle { item: 0, outcome: 1 },
        Op::Refund { order: 0, percent: 50 },
    ];
    run(&ops).unwrap();
    let mut e = Engine::new(Arc::new(Rules::parse("model.toml", RULES).unwrap()));
    let mut n = 0;
    let ts = |h: i64| (t0() + Duration::hours(h)).to_rfc3339();
    apply(
        &mut e,
        &mut n,
        j!({"type":"capture","event_id":"c1","ts":ts(0),"program_id":"p","order_id":"o1","amount":"100.00","currency":"USD","codes":["A"]}),
    );
    apply(
        &mut e,
        &mut n,
        j!({"type":"review","event_id":"r1","ts":ts(25),"program_id":"p","decision":"approve","reviewer":"m"}),
    );
    apply(
        &mut e,
        &mut n,
        j!({"type":"payout","event_id":"p1","ts":ts(25),"program_id":"p","batch_id":"b1","partner_id":"a","currency":"USD","amount":"10.00","status":"planned","idempotency_key":"k","destination":"d"}),
    );
    apply(
        &mut e,
        &mut n,
        j!({"type":"payout","event_id":"p2","ts":ts(26),"program_id":"p","batch_id":"b1","partner_id":"a","currency":"USD","amount":"10.00","status":"paid"}),
    );
    apply(
        &mut e,
        &mut n,
        j!({"type":"refund","event_id":"f1","ts":ts(27),"program_id":"p","order_id":"o1","amount":"50.00","currency":"USD"}),
    );
    let b = e.balances("p", t0() + Duration::hours(27)).into_iter().find(|b| &*b.partner_id == "a").unwrap();
    assert_eq!((b.available, b.paid), (Decimal::new(-500, 2), Decimal::new(1000, 2)), "5.00 owed back");
    // A new order of 200 (commission 20) approved: the next payout may take 15, not 20.
    apply(
        &mut e,
        &mut n,
        j!({"type":"capture","event_id":"c2","ts":ts(28),"program_id":"p","order_id":"o2","amount":"200.00","currency":"USD","codes":["A"]}),
    );
    apply(
        &mut e,
        &mut n,
        j!({"type":"review","event_id":"r2","ts":ts(60),"program_id":"p","decision":"approve","reviewer":"m"}),
    );
    let over = apply(
        &mut e,
        &mut n,
        j!({"type":"payout","event_id":"p3","ts":ts(60),"program_id":"p","batch_id":"b2","partner_id":"a","currency":"USD","amount":"20.00","status":"planned","idempotency_key":"k","destination":"d"}),
    );
    assert_eq!(over, Outcome::Rejected(Reason::InvalidPayout));
    let ok = apply(
        &mut e,
        &mut n,
        j!({"type":"payout","event_id":"p4","ts":ts(60),"program_id":"p","batch_id":"b2","partner_id":"a","currency":"USD","amount":"15.00","status":"planned","idempotency_key":"k","destination":"d"}),
    );
    assert_eq!(ok, Outcome::Applied);
}
