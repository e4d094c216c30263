//! Model-based property tests of the ledger: random captures, refunds and
//! chargebacks against a simple integer-cents model, plus redelivery
//! invariance. proptest prints the failing case and its seed.

use std::sync::Arc;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Body, Capture, Engine, EntryKind, Event, Outcome, Reason, Refund};
use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;

const RULES: &str = r#"
[[programs]]
id = "p"
currency = "USD"
rate = "10%"
overrides = ["2.5%", "1%"]
[[partners]]
id = "top"
program_id = "p"
[[partners]]
id = "mid"
program_id = "p"
parent = "top"
[[partners]]
id = "alice"
program_id = "p"
parent = "mid"
rate = "12.5%"
[[codes]]
code = "A"
partner_id = "alice"
"#;

/// Tier rates in basis points of a percent: 12.5%, 2.5%, 1%.
const RATES_PER_100K: [i128; 3] = [12_500, 2_500, 1_000];

#[derive(Clone, Debug)]
enum Op {
    Capture { order: u8, cents: i64 },
    Refund { order: u8, cents: i64, chargeback: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4, 1i64..50_000).prop_map(|(order, cents)| Op::Capture { order, cents }),
        2 => (0u8..4, 1i64..30_000, any::<bool>()).prop_map(|(order, cents, chargeback)| Op::Refund { order, cents, chargeback }),
    ]
}

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z").unwrap().with_timezone(&Utc)
}

fn cents(c: i64) -> Decimal {
    Decimal::new(c, 2)
}

fn event(i: usize, op: &Op) -> Event<'static> {
    let ts = t0() + Duration::minutes(i as i64);
    let body = match op {
        Op::Capture { order, cents: c } => Body::Capture(Capture {
            order_id: format!("o{order}").into(),
            amount: cents(*c),
            currency: "USD".into(),
            visitor_id: None,
            codes: vec!["a".into()],
            customer: None,
            ip: None,
            items: None,
            extra: Default::default(),
        }),
        Op::Refund { order, cents: c, chargeback } => Body::Refund(Refund {
            order_id: format!("o{order}").into(),
            amount: cents(*c),
            currency: "USD".into(),
            items: None,
            chargeback: *chargeback,
        }),
    };
    Event { event_id: format!("e{i}").into(), ts, program_id: "p".into(), body }
}

/// Rounds `num / den` (den > 0) half to even.
fn div_round_half_even(num: i128, den: i128) -> i128 {
    let (q, r) = (num.div_euclid(den), num.rem_euclid(den));
    match (2 * r).cmp(&den) {
        std::cmp::Ordering::Less => q,
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal => q + (q & 1),
    }
}

/// The model: per order, integer cents.
#[derive(Default, Clone, Debug)]
struct ModelOrder {
    captured: i128,
    refunded: i128,
    accrued: [i128; 3],
    net: [i128; 3],
}

struct Model {
    orders: [Option<ModelOrder>; 4],
}

impl Model {
    fn apply(&mut self, op: &Op) -> Outcome {
        match op {
            Op::Capture { order, cents } => {
                let o = self.orders[*order as usize].get_or_insert_with(ModelOrder::default);
                o.captured += i128::from(*cents);
                for (t, rate) in RATES_PER_100K.iter().enumerate() {
                    let a = div_round_half_even(i128::from(*cents) * rate, 100_000);
                    o.accrued[t] += a;
                    o.net[t] += a;
                }
                Outcome::Applied
            }
            Op::Refund { order, cents, .. } => {
                let Some(o) = self.orders[*order as usize].as_mut() else {
                    return Outcome::Rejected(Reason::UnknownOrder);
                };
                let r = i128::from(*cents);
                if r > o.captured - o.refunded {
                    return Outcome::Rejected(Reason::RefundExceedsCapture);
                }
                o.refunded += r;
                let full = o.refunded == o.captured;
                for t in 0..3 {
                    let rev =
                        if full { o.net[t] } else { div_round_half_even(r * o.accrued[t], o.captured).min(o.net[t]) };
                    o.net[t] -= rev;
                }
                Outcome::Applied
            }
        }
    }
}

struct Origin;
impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("proptest")
    }
}

fn engine() -> Engine {
    Engine::new(Arc::new(Rules::parse("model.toml", RULES).unwrap()))
}

fn arrival() -> Arrival<'static> {
    Arrival { ts: t0(), origin: &Origin, clock: None }
}

fn to_cents(d: Decimal) -> i128 {
    let mut x = d;
    x.rescale(2);
    assert_eq!(x, d, "{d} has sub-cent digits");
    x.mantissa()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ledger_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut e = engine();
        let mut model = Model { orders: Default::default() };
        let mut ledger = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let ev = event(i, op);
            let got = e.apply(&ev, "{}", arrival());
            let want = model.apply(op);
            prop_assert_eq!(got, want, "op {} {:?}", i, op);
            ledger.extend(e.take_output().ledger);
            // Invariants after every event.
            for o in e.orders() {
                for l in &o.lines {
                    prop_assert!(l.net >= Decimal::ZERO, "net below zero: {:?}", l);
                    if o.fully_refunded() {
                        prop_assert_eq!(l.net, Decimal::ZERO, "fully refunded order keeps commission: {:?}", o);
                    }
                }
            }
        }
        for (k, m) in model.orders.iter().enumerate() {
            let Some(m) = m else { continue };
            let o = e.order("p", &format!("o{k}")).expect("order exists");
            prop_assert_eq!(to_cents(o.captured), m.captured);
            prop_assert_eq!(to_cents(o.refunded), m.refunded);
            prop_assert_eq!(o.lines.len(), 3);
            for l in &o.lines {
                let t = usize::from(l.tier);
                prop_assert_eq!(to_cents(l.accrued), m.accrued[t], "accrued tier {}", t);
                prop_assert_eq!(to_cents(l.net), m.net[t], "net tier {}", t);
                // Ledger sum == line net; accruals sum == accrued.
                let rows = ledger.iter().filter(|r| *r.order_id == *o.order_id && r.tier == l.tier);
                let (sum, acc) = rows.fold((Decimal::ZERO, Decimal::ZERO), |(s, a), r| {
                    (s + r.amount, if r.kind == EntryKind::Accrual { a + r.amount } else { a })
                });
                prop_assert_eq!(sum, l.net);
                prop_assert_eq!(acc, l.accrued);
            }
        }
    }

    #[test]
    fn redeliveries_change_nothing(
        ops in prop::collection::vec(op(), 1..40),
        dups in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..30),
    ) {
        let events: Vec<Event<'static>> = ops.iter().enumerate().map(|(i, op)| event(i, op)).collect();
        // The same stream with earlier events delivered again at random later points.
        let mut stream: Vec<&Event<'static>> = events.iter().collect();
        for (at, which) in &dups {
            let pos = at.index(stream.len() + 1);
            if pos == 0 { continue; }
            let src = stream[which.index(pos)];
            stream.insert(pos, src);
        }
        let run = |s: &[&Event<'static>]| {
            let mut e = engine();
            for ev in s {
                e.apply(ev, "{}", arrival());
            }
            let out = e.take_output();
            (out.ledger, out.rejections.len(), e.stats().applied())
        };
        let (a, a_rej, a_applied) = run(&events.iter().collect::<Vec<_>>());
        let (b, b_rej, b_applied) = run(&stream);
        prop_assert_eq!(format!("{:?}", a), format!("{:?}", b));
        prop_assert_eq!(a_applied, b_applied);
        // A redelivered rejected event is a duplicate: no second rejection row, never applied later.
        prop_assert_eq!(a_rej, b_rej);
    }
}
