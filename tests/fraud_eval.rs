//! The fraud evaluation on small seeds, asserting the detection targets
//! (the full-size evaluation is `afflio eval`; its table is in docs/FRAUD.md).

use std::collections::BTreeSet;

use afflio::fraudlab::{evaluate, generate, GenOptions, SHAPES};

fn small(seed: u64) -> GenOptions {
    GenOptions { seed, days: 5, orders_per_day: 3_000, creators: 150, fraud: true }
}

#[test]
fn detectors_meet_their_targets_on_small_seeds() {
    for seed in [11, 12] {
        let e = evaluate(&small(seed), false).unwrap();
        let s = |rule: &str| e.scores.get(rule).unwrap_or_else(|| panic!("no score for {rule}"));
        let ctx = |rule: &str| format!("seed {seed}, {rule}: {:?}", s(rule));
        for rule in ["self_referral", "coupon_stacking"] {
            assert!(s(rule).attacked_orders > 0, "{}", ctx(rule));
            assert_eq!(s(rule).recall(), 1.0, "{}", ctx(rule));
            assert_eq!(s(rule).legit_flagged, 0, "{}", ctx(rule));
        }
        for rule in ["conversion_spike", "coupon_leak", "velocity", "refund_rate"] {
            let r = s(rule);
            assert!(r.attacks > 0 && r.missed_attacks == 0, "{}", ctx(rule));
            assert!(r.recall() >= 0.9, "recall {} {}", r.recall(), ctx(rule));
            assert!(r.precision() >= 0.9, "precision {} {}", r.precision(), ctx(rule));
        }
        // Bots that wait 6-10 s are caught like the fast ones.
        let fast = s("fast_conversion");
        assert!(fast.recall() == 1.0 && fast.legit_flagged == 0, "{}", ctx("fast_conversion"));
        let shape = |name: &str| e.shapes.get(name).unwrap_or_else(|| panic!("no score for {name}"));
        assert_eq!(shape("bots_evasive").recall(), 1.0);
        // A burst within two of its buckets (1h), a leak within one, refund abuse within three days.
        for (name, limit) in
            [("spike_burst", 2.0 * 3600.0), ("leak_coupon_site", 3600.0), ("refund_abuse", 3.0 * 86_400.0)]
        {
            let d = &shape(name).delays;
            assert!(!d.is_empty() && d.iter().all(|d| *d <= limit), "seed {seed}, {name}: delays {d:?}");
        }
    }
}

#[test]
fn normal_traffic_alone_raises_almost_no_flags() {
    let mut o = small(13);
    o.fraud = false;
    let g = generate(&o);
    assert!(g.labels.is_empty());
    let e = evaluate(&o, false).unwrap();
    let flagged: usize = e.scores.values().map(|s| s.flagged).sum();
    // Every flag here is a false alarm: fewer than 1 in 500 orders.
    assert!(flagged * 500 < e.orders, "{flagged} flags on {} clean orders: {:?}", e.orders, e.scores);
}

#[test]
fn the_traffic_has_a_sale_day_and_every_attack_shape() {
    let o = GenOptions { seed: 3, days: 10, orders_per_day: 1_000, creators: 150, fraud: true };
    let g = generate(&o);
    let shapes: BTreeSet<&str> = g.labels.iter().map(|l| l.shape).collect();
    assert_eq!(shapes, SHAPES.iter().map(|(s, _)| *s).collect::<BTreeSet<_>>());
    let (from, to) = g.sale_day.expect("ten days include the sale day");
    let captures_on = |day: &str| {
        g.events
            .iter()
            .filter(|e| e.contains("\"type\":\"capture\"") && e.contains(&format!("\"ts\":\"{day}T")))
            .count()
    };
    assert_eq!(from.format("%Y-%m-%d").to_string(), "2026-10-09");
    assert_eq!((to - from).num_hours(), 24);
    // The sale day (a Friday) against the Friday before: about three times the orders.
    let (sale, friday) = (captures_on("2026-10-09"), captures_on("2026-10-02"));
    assert!(sale as f64 > 2.5 * friday as f64, "sale day {sale}, a week before {friday}");
    assert!(generate(&GenOptions { days: 8, ..o }).sale_day.is_none());
}

#[test]
fn the_generator_is_deterministic_per_seed() {
    let a = generate(&small(5));
    let b = generate(&small(5));
    assert_eq!(a.events, b.events);
    assert_eq!(a.labels, b.labels);
    assert_ne!(a.events, generate(&small(6)).events);
}
