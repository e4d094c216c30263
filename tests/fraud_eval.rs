//! The fraud evaluation on small seeds, asserting the detection targets
//! (the full-size evaluation is `afflio eval`; its table is in docs/FRAUD.md).

use afflio::fraudlab::{evaluate, generate, GenOptions};

fn small(seed: u64) -> GenOptions {
    GenOptions { seed, days: 3, orders_per_day: 3_000, creators: 150, fraud: true }
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
        for rule in ["conversion_spike", "coupon_leak", "velocity"] {
            let r = s(rule);
            assert!(r.attacks > 0 && r.missed_attacks == 0, "{}", ctx(rule));
            assert!(r.recall() >= 0.9, "recall {} {}", r.recall(), ctx(rule));
            assert!(r.precision() >= 0.9, "precision {} {}", r.precision(), ctx(rule));
            // Detected within one bucket (1h) of the attack's start.
            assert!(r.delays.iter().all(|d| *d <= 3600.0), "{}", ctx(rule));
        }
        assert!(
            s("fast_conversion").recall() == 1.0 && s("fast_conversion").legit_flagged == 0,
            "{}",
            ctx("fast_conversion")
        );
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
    // Every flag here is a false alarm: fewer than 1 in 200 orders.
    assert!(flagged * 200 < e.orders, "{flagged} flags on {} clean orders: {:?}", e.orders, e.scores);
}

#[test]
fn the_generator_is_deterministic_per_seed() {
    let a = generate(&small(5));
    let b = generate(&small(5));
    assert_eq!(a.events, b.events);
    assert_eq!(a.labels, b.labels);
    assert_ne!(a.events, generate(&small(6)).events);
}
