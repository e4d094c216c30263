//! Engine behaviours not reachable through a replay file: runtime rules
//! changes, bounded state, program isolation.

use std::sync::Arc;

use afflio_rules::Rules;
use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;

use crate::{Arrival, Body, Capture, Click, Engine, Event, Outcome, Reason};

const RULES: &str = r#"
[engine]
max_clicks_per_visitor = 2
[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
[programs.attribution]
window = "1d"
[[programs]]
id = "other"
currency = "USD"
rate = "10%"
[[partners]]
id = "alice"
program_id = "acme"
[[partners]]
id = "olga"
program_id = "other"
[[links]]
id = "a1"
partner_id = "alice"
[[links]]
id = "o1"
partner_id = "olga"
[[codes]]
code = "ALICE"
partner_id = "alice"
"#;

struct Origin;
impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("test")
    }
}

fn at(mins: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-10T00:00:00Z").unwrap().with_timezone(&Utc) + Duration::minutes(mins)
}

fn click(id: &str, mins: i64, link: &str, visitor: &str, program: &str) -> Event<'static> {
    Event {
        event_id: id.to_string().into(),
        ts: at(mins),
        program_id: program.to_string().into(),
        body: Body::Click(Click {
            link_id: link.to_string().into(),
            visitor_id: visitor.to_string().into(),
            ..Click::default()
        }),
    }
}

fn capture(id: &str, mins: i64, order: &str, amount: &str, visitor: Option<&str>, codes: &[&str]) -> Event<'static> {
    Event {
        event_id: id.to_string().into(),
        ts: at(mins),
        program_id: "acme".into(),
        body: Body::Capture(Capture {
            order_id: order.to_string().into(),
            amount: amount.parse().unwrap(),
            currency: "USD".into(),
            visitor_id: visitor.map(|v| v.to_string().into()),
            codes: codes.iter().map(|c| c.to_string().into()).collect(),
            customer: None,
            ip: None,
            items: None,
            extra: Default::default(),
        }),
    }
}

fn engine() -> Engine {
    Engine::new(Arc::new(Rules::parse("t.toml", RULES).unwrap()))
}

fn apply(e: &mut Engine, ev: &Event<'_>) -> Outcome {
    e.apply(ev, "{}", Arrival { ts: at(0), origin: &Origin, clock: None })
}

#[test]
fn a_rules_change_applies_to_later_events_only() {
    let mut e = engine();
    assert_eq!(apply(&mut e, &capture("c1", 0, "o1", "100", None, &["alice"])), Outcome::Applied);
    let v2 = e.rules().with_update("[[partners]]\nid = 'alice'\nprogram_id = 'acme'\nrate = '20%'\n").unwrap();
    e.set_rules(Arc::new(v2));
    assert_eq!(apply(&mut e, &capture("c2", 1, "o1", "100", None, &[])), Outcome::Applied);
    assert_eq!(apply(&mut e, &capture("c3", 2, "o2", "100", None, &["ALICE"])), Outcome::Applied);
    let ledger = e.take_output().ledger;
    let got: Vec<(String, Decimal, u64)> =
        ledger.iter().map(|l| (l.entry_id.clone(), l.amount, l.rules_version)).collect();
    assert_eq!(
        got,
        [
            ("c1:0".to_string(), Decimal::new(1000, 2), 1),
            ("c2:0".to_string(), Decimal::new(2000, 2), 2),
            ("c3:0".to_string(), Decimal::new(2000, 2), 2)
        ]
    );
    // The first accrual is not recomputed.
    assert_eq!(e.order("acme", "o1").unwrap().lines[0].accrued, Decimal::new(3000, 2));
}

#[test]
fn partners_and_links_join_at_runtime() {
    let mut e = engine();
    assert_eq!(apply(&mut e, &click("k1", 0, "new-link", "v", "acme")), Outcome::Rejected(Reason::UnknownLink));
    let v2 = e
        .rules()
        .with_update(
            "[[partners]]\nid = 'nina'\nprogram_id = 'acme'\n[[links]]\nid = 'new-link'\npartner_id = 'nina'\n",
        )
        .unwrap();
    e.set_rules(Arc::new(v2));
    assert_eq!(apply(&mut e, &click("k2", 0, "new-link", "v", "acme")), Outcome::Applied);
    assert_eq!(apply(&mut e, &capture("c1", 5, "o1", "10", Some("v"), &[])), Outcome::Applied);
    assert_eq!(&*e.order("acme", "o1").unwrap().credit.as_ref().unwrap().partner_id, "nina");
}

#[test]
fn a_link_of_another_program_is_unknown_and_clicks_stay_in_their_program() {
    let mut e = engine();
    assert_eq!(apply(&mut e, &click("k1", 0, "o1", "v", "acme")), Outcome::Rejected(Reason::UnknownLink));
    let rej = e.take_output().rejections;
    // The answer says nothing of the program the link belongs to.
    assert!(!rej[0].detail.contains("other"), "{}", rej[0].detail);
    assert_eq!(rej[0].detail, r#"link_id "o1" names no link of program "acme""#);
    assert_eq!(apply(&mut e, &click("k2", 0, "o1", "v", "other")), Outcome::Applied);
    assert_eq!(apply(&mut e, &capture("c1", 5, "ord", "10", Some("v"), &[])), Outcome::Applied);
    assert!(e.order("acme", "ord").unwrap().credit.is_none(), "a click in program other never credits an acme order");
}

#[test]
fn clicks_per_visitor_are_bounded_keeping_the_newest() {
    let mut e = engine();
    for (i, m) in [0, 1, 2].iter().enumerate() {
        assert_eq!(apply(&mut e, &click(&format!("k{i}"), *m, "a1", "v", "acme")), Outcome::Applied);
    }
    assert_eq!(e.memory().clicks, 2);
    assert_eq!(e.stats().clicks_dropped, 1);
}

#[test]
fn clicks_are_evicted_by_the_watermark_not_the_clock() {
    let mut e = engine();
    apply(&mut e, &click("k1", 0, "a1", "old", "acme"));
    apply(&mut e, &click("k2", 0, "a1", "also-old", "acme"));
    assert_eq!(e.memory().visitors, 2);
    // Window 1d (longest of all programs is the default 30d of `other`):
    // two months of event time later both are gone.
    apply(&mut e, &click("k3", 60 * 24 * 62, "a1", "new", "acme"));
    assert_eq!(e.memory().visitors, 1);
    assert_eq!(e.memory().dedupe_ids, 1, "dedupe ids older than the 30d retention are forgotten");
}

#[test]
fn duplicates_and_conflicts_are_told_apart() {
    let mut e = engine();
    let c = capture("c1", 0, "o1", "10", None, &[]);
    assert_eq!(apply(&mut e, &c), Outcome::Applied);
    assert_eq!(apply(&mut e, &c), Outcome::Duplicate);
    assert_eq!(apply(&mut e, &capture("c1", 0, "o1", "11", None, &[])), Outcome::Rejected(Reason::IdempotencyConflict));
    let s = e.stats();
    assert_eq!((s.events, s.applied(), s.duplicates, s.rejections()), (3, 1, 1, 1));
}

#[test]
fn a_restored_checkpoint_continues_exactly_where_it_stopped() {
    let events: Vec<Event<'static>> = vec![
        click("k1", 0, "a1", "v", "acme"),
        capture("c1", 5, "o1", "100", Some("v"), &[]),
        capture("c2", 6, "o2", "50", None, &["alice"]),
        click("k2", 7, "a1", "w", "acme"),
        capture("c3", 8, "o3", "70", Some("w"), &[]),
        capture("c1", 5, "o1", "100", Some("v"), &[]),
    ];
    let mut straight = engine();
    let mut all = Vec::new();
    for ev in &events {
        apply(&mut straight, ev);
    }
    all.extend(straight.take_output().ledger);
    for cut in 0..events.len() {
        let mut first = engine();
        for ev in &events[..cut] {
            apply(&mut first, ev);
        }
        let mut ledger = first.take_output().ledger;
        assert!(first.checkpoint().is_ok());
        let bytes = first.checkpoint().unwrap();
        let mut second = Engine::restore(first.rules().clone(), &bytes).unwrap();
        for ev in &events[cut..] {
            apply(&mut second, ev);
        }
        ledger.extend(second.take_output().ledger);
        assert_eq!(format!("{ledger:?}"), format!("{all:?}"), "cut at {cut}");
        assert_eq!(second.stats(), straight.stats(), "cut at {cut}");
    }
    let mut busy = engine();
    apply(&mut busy, &click("k9", 0, "a1", "v", "acme"));
    assert!(matches!(busy.checkpoint(), Err(crate::CheckpointError::PendingOutput(1))));
    assert!(matches!(Engine::restore(busy.rules().clone(), b"garbage"), Err(crate::CheckpointError::Format)));
}

#[test]
fn orders_are_closed_after_their_retention_and_written_out() {
    let text = RULES
        .replace("max_clicks_per_visitor = 2", "order_retention = \"1d\"")
        .replace("rate = \"10%\"", "rate = \"10%\"\nhold = \"12h\"");
    let rules = Rules::parse("t.toml", &text).unwrap();
    let mut e = Engine::new(Arc::new(rules));
    assert_eq!(apply(&mut e, &capture("c1", 0, "o1", "100", None, &["alice"])), Outcome::Applied);
    assert_eq!(apply(&mut e, &capture("c2", 60 * 20, "o2", "100", None, &["alice"])), Outcome::Applied);
    // Three days later o1 (idle since day 0) and o2 are closed.
    assert_eq!(apply(&mut e, &click("k1", 60 * 24 * 3, "a1", "v", "acme")), Outcome::Applied);
    let out = e.take_output();
    let closed: Vec<&str> = out.closed.iter().map(|c| &*c.order.order_id).collect();
    assert_eq!(closed, ["o1", "o2"]);
    assert_eq!(e.memory().orders, 0);
    assert_eq!(e.stats().orders_closed, 2);
    let refund = Event {
        event_id: "r1".into(),
        ts: at(60 * 24 * 3),
        program_id: "acme".into(),
        body: Body::Refund(crate::Refund {
            order_id: "o1".into(),
            amount: "1".parse().unwrap(),
            currency: "USD".into(),
            items: None,
            chargeback: false,
        }),
    };
    assert_eq!(apply(&mut e, &refund), Outcome::Rejected(Reason::UnknownOrder));
    // A new order with an old id is a new order.
    assert_eq!(apply(&mut e, &capture("c3", 60 * 24 * 3, "o1", "10", None, &[])), Outcome::Applied);
    assert_eq!(e.order("acme", "o1").unwrap().captured, Decimal::new(10, 0));
}

fn fraud_engine(fraud: &str) -> Engine {
    let text = RULES.replacen("[programs.attribution]", &format!("{fraud}\n[programs.attribution]"), 1);
    Engine::new(Arc::new(Rules::parse("t.toml", &text).unwrap()))
}

fn with_customer(mut ev: Event<'static>, id: &str, ip: &str) -> Event<'static> {
    if let Body::Capture(c) = &mut ev.body {
        c.customer = Some(crate::Customer { id: Some(id.to_string().into()), email_sha256: None });
        c.ip = Some(ip.to_string().into());
    }
    ev
}

#[test]
fn velocity_flags_the_order_over_the_limit_in_the_window() {
    let mut e = fraud_engine("[programs.fraud.velocity]\naction = 'hold'\nmax_orders = 2\nwindow = '10m'");
    // Three orders by one customer in 10 minutes: the third is over the limit of 2.
    for (i, m) in [0, 4, 9].iter().enumerate() {
        let ev = with_customer(
            capture(&format!("c{i}"), *m, &format!("o{i}"), "10", None, &["alice"]),
            "cust-1",
            &format!("10.0.0.{i}"),
        );
        assert_eq!(apply(&mut e, &ev), Outcome::Applied);
    }
    // A fourth at minute 13: the window (3, 13] holds o1 (4), o2 (9), o3 (13) -> 3 again
    // (o0 at 0 has left it).
    let ev = with_customer(capture("c3", 13, "o3", "10", None, &["alice"]), "cust-1", "10.0.0.9");
    assert_eq!(apply(&mut e, &ev), Outcome::Applied);
    // A fifth after a quiet spell: under the limit (and at minute 24, [14, 24] would hold 1).
    let ev = with_customer(capture("c4", 40, "o4", "10", None, &["alice"]), "cust-1", "10.0.0.9");
    assert_eq!(apply(&mut e, &ev), Outcome::Applied);
    let flags = e.take_output().flags;
    let got: Vec<(&str, &str)> = flags.iter().map(|f| (f.order_id.as_str(), f.rule.as_str())).collect();
    // o2 is the third order: o0 and o1 belong to the same burst and are flagged with it.
    assert_eq!(got, [("o0", "velocity"), ("o1", "velocity"), ("o2", "velocity"), ("o3", "velocity")]);
    let retro: Vec<bool> = flags.iter().map(|f| f.retroactive).collect();
    assert_eq!(retro, [true, true, false, false]);
    assert!(flags[0].detail.contains("3 orders from customer id cust-1 within 10m (limit 2)"), "{}", flags[0].detail);
    assert_eq!((flags[0].value, flags[0].threshold, flags[0].event_id.as_str()), (3.0, 2.0, "c2"));
    let as_of = at(60 * 24 * 365);
    assert_eq!(e.line_statuses(e.order("acme", "o2").unwrap(), as_of)[0], crate::LineStatus::Pending, "held");
}

#[test]
fn fast_conversion_and_flag_only_actions() {
    let mut e = fraud_engine(
        "[programs.fraud.fast_conversion]\naction = 'flag'\nmin_seconds = 60\n[programs.fraud.self_referral]\naction = 'off'",
    );
    apply(&mut e, &click("k1", 0, "a1", "v1", "acme"));
    apply(&mut e, &click("k2", 0, "a1", "v2", "acme"));
    // Zero seconds after the click (at minute 0) vs five minutes after.
    assert_eq!(apply(&mut e, &capture("c1", 0, "o1", "10", Some("v1"), &[])), Outcome::Applied);
    assert_eq!(apply(&mut e, &capture("c2", 5, "o2", "10", Some("v2"), &[])), Outcome::Applied);
    let flags = e.take_output().flags;
    assert_eq!(flags.len(), 1);
    assert_eq!((flags[0].order_id.as_str(), flags[0].rule.as_str()), ("o1", "fast_conversion"));
    let o1 = e.order("acme", "o1").unwrap();
    assert!(!o1.held, "action = flag records without holding");
    assert_eq!(e.line_statuses(o1, at(60 * 24 * 365))[0], crate::LineStatus::Pending, "manual program: pending anyway");
}

#[test]
fn coupon_leak_flags_a_burst_of_redemptions_without_clicks_against_the_codes_usual_share() {
    let mut e = fraud_engine(
        "[programs.fraud.coupon_leak]\naction = 'hold'\nmin_orders = 4\nmax_share = 0.5\nthreshold = 2.0\n\
         [programs.fraud.conversion_spike]\naction = 'off'\nwarmup_buckets = 2",
    );
    let bob = "[[partners]]\nid = 'bob'\nprogram_id = 'acme'\n[[codes]]\ncode = 'BOB'\npartner_id = 'bob'\n";
    let rules = e.rules().with_update(bob).unwrap();
    e.set_rules(Arc::new(rules));
    let mut n = 0;
    let mut order = |e: &mut Engine, mins: i64, code: &str, clicked: bool| {
        n += 1;
        let visitor = format!("v{n}");
        if clicked {
            apply(e, &click(&format!("k{n}"), mins, "a1", &visitor, "acme"));
        }
        apply(e, &capture(&format!("c{n}"), mins, &format!("o{n}"), "10", Some(&visitor), &[code]));
    };
    // Four hours: bob 4 orders, alice's code twice (once after a click on her
    // link, once typed): alice's code usually has half its redemptions with
    // no click, a sixth of the program's orders.
    for h in 0..4 {
        for k in 0..4 {
            order(&mut e, h * 60 + k, "BOB", false);
        }
        order(&mut e, h * 60 + 10, "ALICE", true);
        order(&mut e, h * 60 + 20, "ALICE", false);
    }
    assert!(e.take_output().flags.is_empty(), "half without a click is this code's usual");
    // Hour 4: bob's 4, then alice's code 6 times with no click.
    for k in 0..4 {
        order(&mut e, 240 + k, "BOB", false);
    }
    for k in 0..6 {
        order(&mut e, 250 + k, "ALICE", false);
    }
    // The k-th adds ln 3 against 2 x (4 + k) / 6 expected: the evidence
    // first reaches 2.0 at k = 5 (2.49); the run's earlier four are flagged with it.
    let flags = e.take_output().flags;
    let got: Vec<(&str, bool)> = flags.iter().map(|f| (f.order_id.as_str(), f.retroactive)).collect();
    assert_eq!(got, [("o29", true), ("o30", true), ("o31", true), ("o32", true), ("o33", false), ("o34", false)]);
    assert!(flags.iter().all(|f| f.rule.as_str() == "coupon_leak"));
    let f = &flags[4];
    assert!(f.detail.contains("100% of its last 4 redemptions had no click from alice's links"), "{}", f.detail);
    assert!(f.detail.contains("5 redemptions with no click in the 1h bucket"), "{}", f.detail);
    assert_eq!(f.threshold, 2.0);
    assert!((f.value - (5.0 * 3f64.ln() - 2.0 * 9.0 / 6.0)).abs() < 1e-9, "{}", f.value);
    assert!((f.baseline.unwrap() - 1.0 / 6.0).abs() < 1e-9, "{:?}", f.baseline);
    assert!(e.order("acme", "o29").unwrap().held);
    // Hour 5, back to the usual pattern: the window has ended.
    for k in 0..4 {
        order(&mut e, 300 + k, "BOB", false);
    }
    order(&mut e, 310, "ALICE", true);
    order(&mut e, 320, "ALICE", false);
    assert!(e.take_output().flags.is_empty(), "no flag once the burst is over");
}

#[test]
fn refund_rate_flags_a_partner_far_above_the_programs_refunds_and_its_window_once() {
    let refund = |id: &str, mins: i64, order: &str, amount: &str| Event {
        event_id: id.to_string().into(),
        ts: at(mins),
        program_id: "acme".into(),
        body: Body::Refund(crate::Refund {
            order_id: order.to_string().into(),
            amount: amount.parse().unwrap(),
            currency: "USD".into(),
            items: None,
            chargeback: false,
        }),
    };
    // By money: 70 of 200 refunded (35% > 30%) after 2 orders: the next order is flagged.
    let mut e = fraud_engine("[programs.fraud.refund_rate]\naction = 'flag'\nmin_orders = 2\nmax_share = 0.3");
    apply(&mut e, &capture("c1", 0, "o1", "100", None, &["alice"]));
    apply(&mut e, &capture("c2", 1, "o2", "100", None, &["alice"]));
    assert_eq!(apply(&mut e, &refund("r1", 30, "o1", "70")), Outcome::Applied);
    apply(&mut e, &capture("c3", 40, "o3", "100", None, &["alice"]));
    let flags = e.take_output().flags;
    let got: Vec<(&str, bool)> = flags.iter().map(|f| (f.order_id.as_str(), f.retroactive)).collect();
    assert_eq!(got, [("o2", true), ("o1", true), ("o3", false)], "the window's orders, newest first, then o3");
    assert!(flags[2].detail.contains("1 refunds on its 2 orders"), "{}", flags[2].detail);
    assert_eq!((flags[2].value, flags[2].threshold), (0.35, 0.3));
    assert!(!e.order("acme", "o3").unwrap().held, "action = flag");
    // By count: bob's 100 orders with 4 refunds; alice's 30 with small partial refunds.
    let mut e = fraud_engine("[programs.fraud.refund_rate]\naction = 'hold'\nmin_orders = 20\nthreshold = 4.0");
    let bob = "[[partners]]\nid = 'bob'\nprogram_id = 'acme'\n[[codes]]\ncode = 'BOB'\npartner_id = 'bob'\n";
    let rules = e.rules().with_update(bob).unwrap();
    e.set_rules(Arc::new(rules));
    for i in 0..100 {
        apply(&mut e, &capture(&format!("b{i}"), i, &format!("ob{i}"), "100", None, &["BOB"]));
    }
    for i in 0..4 {
        apply(&mut e, &refund(&format!("rb{i}"), 200, &format!("ob{i}"), "100"));
    }
    for i in 0..30 {
        apply(&mut e, &capture(&format!("a{i}"), 300 + i, &format!("oa{i}"), "100", None, &["alice"]));
    }
    let refunds = |e: &mut Engine, from: usize, to: usize| {
        for i in from..to {
            apply(e, &refund(&format!("ra{i}"), 400, &format!("oa{i}"), "5"));
        }
    };
    // 11 of alice's 30 refunded: 36.7% per order against the program's 15/130;
    // limit max(3 x 11.5%, 11.5% + 4 sqrt(30 x 11.5% + 1) / 30 = 39.7%): not yet.
    refunds(&mut e, 0, 11);
    apply(&mut e, &capture("a30", 500, "oa30", "100", None, &["alice"]));
    assert!(e.take_output().flags.is_empty());
    // 16 of 31 (51.6%), the program 20/131: over; the money share (2.6%) is not.
    refunds(&mut e, 11, 16);
    apply(&mut e, &capture("a31", 501, "oa31", "100", None, &["alice"]));
    let flags = e.take_output().flags;
    assert_eq!(flags.len(), 32, "o31 and alice's 31 earlier orders of the window");
    assert!(flags.iter().all(|f| &*f.partner_id == "alice" && f.rule.as_str() == "refund_rate"));
    let f = flags.last().unwrap();
    assert_eq!(f.order_id, "oa31");
    assert!((f.value - 16.0 / 31.0).abs() < 1e-9 && (f.baseline.unwrap() - 20.0 / 131.0).abs() < 1e-9, "{f:?}");
    // The next order is flagged on its own: the window was flagged once.
    apply(&mut e, &capture("a32", 502, "oa32", "100", None, &["alice"]));
    assert_eq!(e.take_output().flags.len(), 1);
    assert!(e.order("acme", "oa0").unwrap().held);
}

fn review(id: &str, mins: i64, order: Option<&str>, decision: crate::Decision, reason: Option<&str>) -> Event<'static> {
    Event {
        event_id: id.to_string().into(),
        ts: at(mins),
        program_id: "acme".into(),
        body: Body::Review(crate::ReviewEvent {
            order_id: order.map(|o| o.to_string().into()),
            partner_id: None,
            tier: None,
            decision,
            reason: reason.map(|r| r.to_string().into()),
            reviewer: "ana".into(),
        }),
    }
}

#[test]
fn a_hold_blocks_approval_until_a_review() {
    use crate::{Decision, LineStatus};
    let mut e = fraud_engine("[programs.fraud.velocity]\naction = 'hold'\nmax_orders = 1\nwindow = '1h'");
    let day = 60 * 24;
    // o0 and o1 by one customer: both held. o2 by another: not.
    apply(&mut e, &with_customer(capture("c0", 0, "o0", "100", None, &["alice"]), "cust-1", "10.0.0.1"));
    apply(&mut e, &with_customer(capture("c1", 1, "o1", "100", None, &["alice"]), "cust-1", "10.0.0.2"));
    apply(&mut e, &with_customer(capture("c2", 2, "o2", "100", None, &["alice"]), "cust-2", "10.0.0.3"));
    let status = |e: &Engine, o: &str, mins: i64| e.line_statuses(e.order("acme", o).unwrap(), at(mins))[0];
    assert_eq!(status(&e, "o0", 365 * day), LineStatus::Pending);
    e.take_output();
    // Approving before the 30-day hold has passed is refused, and nothing changes.
    let early = apply(&mut e, &review("r1", 2 * day, Some("o2"), Decision::Approve, None));
    assert_eq!(early, Outcome::Rejected(Reason::InvalidReview));
    assert!(e.take_output().rejections[0].detail.contains("not eligible until"));
    // Bulk approval at day 31 approves the eligible unheld line only.
    assert_eq!(apply(&mut e, &review("r2", 31 * day, None, Decision::Approve, None)), Outcome::Applied);
    let rows = e.take_output().decisions;
    let got: Vec<(&str, LineStatus, LineStatus, bool)> =
        rows.iter().map(|r| (r.order_id.as_str(), r.previous_status, r.status, r.bulk)).collect();
    assert_eq!(got, [("o2", LineStatus::Pending, LineStatus::Approved, true)]);
    assert_eq!(status(&e, "o0", 31 * day), LineStatus::Pending, "held lines wait for a review");
    // A reviewer clears o0: it follows its lifecycle again and the next bulk approval takes it.
    assert_eq!(apply(&mut e, &review("r3", 31 * day, Some("o0"), Decision::Clear, Some("family"))), Outcome::Applied);
    assert_eq!(status(&e, "o0", 31 * day), LineStatus::Pending, "manual program: cleared is not approved");
    assert_eq!(apply(&mut e, &review("r4", 32 * day, None, Decision::Approve, None)), Outcome::Applied);
    assert_eq!(status(&e, "o0", 32 * day), LineStatus::Approved);
    // o1 is rejected with a reason; it can no longer be approved, and clearing it again is refused.
    assert_eq!(apply(&mut e, &review("r5", 32 * day, Some("o1"), Decision::Reject, Some("bot"))), Outcome::Applied);
    assert_eq!(status(&e, "o1", 400 * day), LineStatus::Rejected);
    let again = apply(&mut e, &review("r6", 33 * day, Some("o1"), Decision::Approve, None));
    assert_eq!(again, Outcome::Rejected(Reason::InvalidReview));
    // Clearing a line that was never held is refused.
    apply(&mut e, &with_customer(capture("c3", 33 * day, "o3", "100", None, &["alice"]), "cust-3", "10.0.0.4"));
    let not_held = apply(&mut e, &review("r7", 33 * day, Some("o3"), Decision::Clear, None));
    assert_eq!(not_held, Outcome::Rejected(Reason::InvalidReview));
    // A redelivered review is a duplicate, not a second decision.
    assert_eq!(apply(&mut e, &review("r5", 32 * day, Some("o1"), Decision::Reject, Some("bot"))), Outcome::Duplicate);
    let out = e.take_output();
    let decided: Vec<(&str, &str)> = out.decisions.iter().map(|r| (r.event_id.as_str(), r.order_id.as_str())).collect();
    assert_eq!(decided, [("r3", "o0"), ("r4", "o0"), ("r5", "o1")]);
    assert_eq!(out.decisions[2].reason.as_deref(), Some("bot"));
    // Unknown orders are named.
    assert_eq!(
        apply(&mut e, &review("r8", 33 * day, Some("nope"), Decision::Reject, Some("x"))),
        Outcome::Rejected(Reason::UnknownOrder)
    );
}

#[test]
fn a_held_line_approved_once_eligible_is_released_by_that_review() {
    use crate::{Decision, LineStatus};
    let mut e = fraud_engine("[programs.fraud.velocity]\naction = 'hold'\nmax_orders = 1\nwindow = '1h'");
    apply(&mut e, &with_customer(capture("c0", 0, "o0", "100", None, &["alice"]), "cust-1", "10.0.0.1"));
    apply(&mut e, &with_customer(capture("c1", 1, "o1", "100", None, &["alice"]), "cust-1", "10.0.0.1"));
    let day = 60 * 24;
    assert_eq!(apply(&mut e, &review("r1", 31 * day, Some("o0"), Decision::Approve, None)), Outcome::Applied);
    let o0 = e.order("acme", "o0").unwrap();
    assert_eq!(e.line_statuses(o0, at(31 * day))[0], LineStatus::Approved);
    assert_eq!(e.line_statuses(e.order("acme", "o1").unwrap(), at(31 * day))[0], LineStatus::Pending);
}

#[test]
fn conversion_spike_holds_a_run_far_above_the_partners_share_and_the_window_ends() {
    let mut e = fraud_engine(
        "[programs.fraud.conversion_spike]\naction = 'hold'\nbucket = '1h'\nmin_orders = 3\nthreshold = 2.0\nwarmup_buckets = 2",
    );
    let bob = "[[partners]]\nid = 'bob'\nprogram_id = 'acme'\n[[codes]]\ncode = 'BOB'\npartner_id = 'bob'\n";
    let rules = e.rules().with_update(bob).unwrap();
    e.set_rules(Arc::new(rules));
    let mut n = 0;
    let mut order = |e: &mut Engine, mins: i64, code: &str| {
        n += 1;
        apply(e, &capture(&format!("c{n}"), mins, &format!("o{n}"), "10", None, &[code]))
    };
    // Five hours of bob at 8 orders and alice at 2: alice's share is 0.2.
    for h in 0..5 {
        for k in 0..8 {
            order(&mut e, h * 60 + k * 5, "BOB");
        }
        order(&mut e, h * 60 + 50, "ALICE");
        order(&mut e, h * 60 + 55, "ALICE");
    }
    assert!(e.take_output().flags.is_empty());
    // Hour 5: bob 8, alice 10. Alice's k-th adds ln 3 against 2 x 0.2 x (8 + k):
    // the evidence 1.0986 k - 3.2 - 0.4 k first reaches 2.0 at k = 8 (2.39).
    for k in 0..8 {
        order(&mut e, 300 + k, "BOB");
    }
    for k in 0..10 {
        order(&mut e, 320 + k, "ALICE");
    }
    let flags = e.take_output().flags;
    assert_eq!(flags.len(), 10, "all ten of alice's orders in the run");
    assert!(flags.iter().all(|f| f.rule.as_str() == "conversion_spike" && &*f.partner_id == "alice"));
    assert_eq!(flags.iter().filter(|f| f.retroactive).count(), 7);
    assert_eq!(flags[0].event_id, flags[7].event_id, "raised by the 8th order");
    let f = &flags[7];
    assert!(
        f.detail.contains("partner alice has 8 of the program's 16 orders in the 1h bucket, 3.2 expected"),
        "{}",
        f.detail
    );
    assert!(f.detail.contains("holding every order of the run"), "no signal tells these orders apart: {}", f.detail);
    assert!(f.detail.ends_with("this order: like the partner's usual orders"), "{}", f.detail);
    assert!((f.value - (8.0 * 3f64.ln() - 3.2 - 3.2)).abs() < 1e-9, "{}", f.value);
    assert!((f.baseline.unwrap() - 0.2).abs() < 1e-12 && f.threshold == 2.0, "{f:?}");
    assert!(e.order("acme", "o59").unwrap().held, "alice's first order of hour 5");
    assert!(!e.order("acme", "o58").unwrap().held, "bob's");
    // Hour 6 is ordinary again: the window has ended.
    for k in 0..8 {
        order(&mut e, 360 + k * 5, "BOB");
    }
    order(&mut e, 410, "ALICE");
    order(&mut e, 415, "ALICE");
    assert!(e.take_output().flags.is_empty(), "no hold once the run is over");
}

/// Clicks at the same instant: both models credit the one applied later
/// (the session keeps application order; no sequence number is stored).
#[test]
fn clicks_at_the_same_instant_go_to_the_later_applied_under_both_models() {
    for model in ["last_click", "first_click"] {
        let rules = format!(
            "[[programs]]\nid = \"acme\"\ncurrency = \"USD\"\nrate = \"10%\"\n[programs.attribution]\nwindow = \"1d\"\nmodel = \"{model}\"\n\
             [[partners]]\nid = \"alice\"\nprogram_id = \"acme\"\n[[partners]]\nid = \"bob\"\nprogram_id = \"acme\"\n\
             [[links]]\nid = \"a1\"\npartner_id = \"alice\"\n[[links]]\nid = \"b1\"\npartner_id = \"bob\"\n"
        );
        let mut e = Engine::new(Arc::new(Rules::parse("t.toml", &rules).unwrap()));
        // Two clicks at the same minute: alice's, then bob's.
        assert_eq!(apply(&mut e, &click("c1", 10, "a1", "v", "acme")), Outcome::Applied);
        assert_eq!(apply(&mut e, &click("c2", 10, "b1", "v", "acme")), Outcome::Applied);
        assert_eq!(apply(&mut e, &capture("k1", 20, "o1", "10.00", Some("v"), &[])), Outcome::Applied);
        let credited = e.order("acme", "o1").and_then(|o| o.credit.as_ref()).map(|c| c.partner_id.to_string());
        assert_eq!(credited.as_deref(), Some("bob"), "{model}: a tie goes to the later applied");
        // The earliest instant wins under first_click when it is alone.
        let mut e = Engine::new(Arc::new(Rules::parse("t.toml", &rules).unwrap()));
        apply(&mut e, &click("d0", 0, "a1", "w", "acme"));
        apply(&mut e, &click("d1", 5, "b1", "w", "acme"));
        apply(&mut e, &capture("k2", 20, "o2", "10.00", Some("w"), &[]));
        let credited = e.order("acme", "o2").and_then(|o| o.credit.as_ref()).map(|c| c.partner_id.to_string());
        let expect = if model == "last_click" { "bob" } else { "alice" };
        assert_eq!(credited.as_deref(), Some(expect), "{model}");
    }
}

#[test]
fn a_far_future_event_is_refused_not_remembered_and_moves_no_clock() {
    let mut e = engine();
    let arrival_clock = at(0);
    let with_clock = |e: &mut Engine, ev: &Event<'_>| {
        e.apply(ev, "{}", Arrival { ts: arrival_clock, origin: &Origin, clock: Some(arrival_clock) })
    };
    // An attacker's click dated 9999 on another program.
    let mut attack = click("k-attack", 0, "o1", "v", "other");
    attack.ts = DateTime::parse_from_rfc3339("9999-12-31T00:00:00Z").unwrap().with_timezone(&Utc);
    assert_eq!(with_clock(&mut e, &attack), Outcome::Rejected(Reason::FutureEvent));
    assert_eq!(e.take_output().rejections[0].field.as_deref(), Some("ts"));
    assert_eq!(e.watermark("other"), None, "the program's clock did not move");
    // Within the skew (5 minutes by default) is fine.
    assert_eq!(with_clock(&mut e, &click("k1", 4, "a1", "v", "acme")), Outcome::Applied);
    assert_eq!(with_clock(&mut e, &click("k2", 6, "a1", "v", "acme")), Outcome::Rejected(Reason::FutureEvent));
    // Not remembered: sent again once the clock has caught up, it applies.
    let later = at(10);
    let again =
        e.apply(&click("k2", 6, "a1", "v", "acme"), "{}", Arrival { ts: later, origin: &Origin, clock: Some(later) });
    assert_eq!(again, Outcome::Applied);
}

#[test]
fn one_programs_clock_never_makes_anothers_events_late() {
    let text = RULES.replace("max_clicks_per_visitor = 2", "dedupe_retention = \"1d\"");
    let mut e = Engine::new(Arc::new(Rules::parse("t.toml", &text).unwrap()));
    // Program "other" runs a year ahead (its own clock).
    assert_eq!(apply(&mut e, &click("o-1", 60 * 24 * 365, "o1", "v", "other")), Outcome::Applied);
    // Acme's events are judged against acme's clock only.
    assert_eq!(apply(&mut e, &click("a-1", 0, "a1", "v", "acme")), Outcome::Applied);
    assert_eq!(apply(&mut e, &capture("c1", 5, "o1", "10", Some("v"), &[])), Outcome::Applied);
    // And an id used by one program is free in another.
    assert_eq!(apply(&mut e, &click("o-1", 6, "a1", "w", "acme")), Outcome::Applied);
}

#[test]
fn captures_that_would_overflow_the_store_are_refused_before_anything_changes() {
    let mut e = engine();
    let big = "99999999999999.9999";
    assert_eq!(apply(&mut e, &capture("c1", 0, "o1", big, None, &["alice"])), Outcome::Applied);
    let before = e.order("acme", "o1").unwrap().clone();
    for i in 2..12 {
        let o = apply(&mut e, &capture(&format!("c{i}"), 1, "o1", big, None, &[]));
        assert_eq!(o, Outcome::Rejected(Reason::InvalidAmount), "capture {i}");
    }
    assert_eq!(e.order("acme", "o1").unwrap(), &before, "the order is as it was");
    let rej = e.take_output().rejections;
    assert!(rej[0].detail.contains("captured total"), "{}", rej[0].detail);
}

fn registry(id: &str, mins: i64, r: crate::registry::RegistryEvent) -> Event<'static> {
    Event {
        event_id: id.to_string().into(),
        ts: at(mins),
        program_id: "acme".into(),
        body: Body::Registry(Box::new(r)),
    }
}

#[test]
fn the_registry_survives_images_and_deltas_at_every_cut_and_credits_only_from_its_event_on() {
    use crate::registry::{Apply, Decide, NewCode, Publish, RegistryEvent as R, UpdatePartner, Verdict};
    let apply_ev = |id: &str, app: &str, partner: &str| {
        let a = Apply {
            application_id: app.into(),
            partner_id: partner.into(),
            display_name: partner.into(),
            email: format!("{partner}@example.com"),
            ..Apply::default()
        };
        registry(id, 1, R::PartnerApplied(a))
    };
    let decide = |app: &str, v: Verdict| {
        R::ApplicationDecided(Decide {
            application_id: app.into(),
            decision: v,
            reason: Some("fits".into()),
            decided_by: "ana".into(),
        })
    };
    let events: Vec<Event<'static>> = vec![
        registry("p1", 0, R::ProgramPublished(Publish { name: "Acme".into(), listed: true, ..Publish::default() })),
        click("k0", 1, "acme-maya", "v0", "acme"),
        apply_ev("r1", "a1", "maya"),
        apply_ev("r2", "a2", "noor"),
        registry("d1", 2, decide("a1", Verdict::Approve)),
        registry("d2", 3, decide("a2", Verdict::Reject)),
        click("k1", 4, "acme-maya", "v1", "acme"),
        capture("c1", 5, "o1", "100", Some("v1"), &[]),
        capture("c0", 5, "o0", "100", Some("v0"), &[]),
        registry(
            "n1",
            6,
            R::CodeCreated(NewCode {
                code: "mayafall".into(),
                partner_id: "maya".into(),
                starts_at: None,
                expires_at: None,
                max_uses: Some(1),
            }),
        ),
        capture("c2", 7, "o2", "40", None, &["MAYAFALL"]),
        capture("c3", 8, "o3", "40", None, &["MAYAFALL"]),
        registry(
            "u1",
            9,
            R::PartnerUpdated(UpdatePartner {
                partner_id: "maya".into(),
                active: Some(false),
                ..UpdatePartner::default()
            }),
        ),
        click("k2", 10, "acme-maya", "v2", "acme"),
    ];
    let mut straight = engine();
    for ev in &events {
        apply(&mut straight, ev);
    }
    let out = straight.take_output();
    let credited: Vec<(&str, &str)> = out.ledger.iter().map(|l| (&*l.order_id, &*l.partner_id)).collect();
    assert_eq!(
        credited,
        [("o1", "maya"), ("o2", "maya")],
        "o0's click came before the link; o3 found the code used up"
    );
    let rejected: Vec<(&str, Reason)> =
        out.rejections.iter().map(|r| (r.event_id.as_deref().unwrap(), r.reason)).collect();
    assert_eq!(rejected, [("k0", Reason::UnknownLink), ("k2", Reason::UnknownLink)]);
    let view = straight.partner_view("maya").unwrap();
    assert_eq!(view.links.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(), ["acme-maya"]);
    assert_eq!(
        view.codes.iter().map(|(c, n)| (c.normalized.as_str(), *n)).collect::<Vec<_>>(),
        [("MAYA", 0), ("MAYAFALL", 1)]
    );
    assert_eq!(straight.registry_sizes(), [2, 1, 1, 2]);
    let state = straight.state_fingerprint();
    restores_at_every_cut(engine, &events, state, |restored, cut| {
        assert_eq!(restored.partner_view("maya"), view.clone().into(), "cut at {cut}");
    });
}

/// An image after each cut of `events`, then a delta of the rest, restores
/// the state of applying them all (`state`); `check` looks further at each
/// restored engine.
fn restores_at_every_cut(make: impl Fn() -> Engine, events: &[Event<'_>], state: u128, check: impl Fn(&Engine, usize)) {
    for cut in 0..=events.len() {
        let mut first = make();
        for ev in &events[..cut] {
            apply(&mut first, ev);
        }
        first.take_output();
        let image = first.checkpoint().unwrap();
        first.checkpoint_delta().unwrap();
        for ev in &events[cut..] {
            apply(&mut first, ev);
        }
        first.take_output();
        let delta = first.checkpoint_delta().unwrap();
        let restored = Engine::restore_chain(first.rules().clone(), &image, [&delta[..]]).unwrap();
        assert_eq!(restored.state_fingerprint(), state, "cut at {cut}");
        check(&restored, cut);
    }
}

#[test]
fn pending_applications_are_bounded_per_program_and_the_bound_survives_a_restore() {
    use crate::registry::{Apply, Decide, Publish, RegistryEvent as R, Verdict, MAX_PENDING};
    let mut e = engine();
    apply(
        &mut e,
        &registry("p", 0, R::ProgramPublished(Publish { name: "Acme".into(), listed: true, ..Publish::default() })),
    );
    let app = |i: u64| {
        registry(
            &format!("a{i}"),
            1,
            R::PartnerApplied(Apply {
                application_id: format!("a{i}"),
                partner_id: format!("p{i}"),
                display_name: "P".into(),
                email: "p@example.com".into(),
                ..Apply::default()
            }),
        )
    };
    for i in 0..MAX_PENDING {
        assert_eq!(apply(&mut e, &app(i)), Outcome::Applied);
    }
    drop(e.take_output());
    assert!(matches!(apply(&mut e, &app(MAX_PENDING)), Outcome::Rejected(Reason::InvalidRegistry)));
    // A restored engine knows the count; a decision makes room for one more.
    drop(e.take_output());
    let mut e = Engine::restore(e.rules().clone(), &e.checkpoint().unwrap()).unwrap();
    assert!(matches!(apply(&mut e, &app(MAX_PENDING + 1)), Outcome::Rejected(Reason::InvalidRegistry)));
    let decide = R::ApplicationDecided(Decide {
        application_id: "a0".into(),
        decision: Verdict::Reject,
        reason: Some("no".into()),
        decided_by: "ana".into(),
    });
    assert_eq!(apply(&mut e, &registry("d0", 2, decide)), Outcome::Applied);
    assert_eq!(apply(&mut e, &app(MAX_PENDING + 2)), Outcome::Applied);
}

const SAAS: &str = r#"
[engine]
order_retention = "2d"
[[programs]]
id = "saas"
currency = "USD"
rate = "20%"
hold = "1d"
[programs.subscriptions]
max_duration = "60d"
renewal_rate = "10%"
[programs.leads]
reward = "3.00"
hold = "1d"
[[programs.leads.stages]]
name = "won"
reward = "10.00"
[[partners]]
id = "alice"
program_id = "saas"
[[codes]]
code = "ALICE"
partner_id = "alice"
"#;

fn saas_event(id: &str, mins: i64, body: Body<'static>) -> Event<'static> {
    Event { event_id: id.to_string().into(), ts: at(mins), program_id: "saas".into(), body }
}

fn saas_stream() -> Vec<Event<'static>> {
    use crate::event::{Cancel, Lead, LeadStage, Payment, SaleExtra};
    let day = 24 * 60;
    let payment = |sub: &str, id: &str| {
        Body::Payment(Payment {
            subscription_id: sub.to_string().into(),
            payment_id: id.to_string().into(),
            kind: afflio_rules::PaymentKind::Renewal,
            amount: "10.00".parse().unwrap(),
            currency: "USD".into(),
            items: None,
            extra: SaleExtra::default(),
        })
    };
    let start = |order: &str, sub: &str| {
        Body::Capture(Capture {
            order_id: order.to_string().into(),
            amount: "50.00".parse().unwrap(),
            currency: "USD".into(),
            visitor_id: None,
            codes: vec!["ALICE".into()],
            customer: None,
            ip: None,
            items: None,
            extra: SaleExtra { subscription_id: Some(sub.to_string().into()), ..SaleExtra::default() },
        })
    };
    vec![
        saas_event("s1", 0, start("o1", "S1")),
        saas_event("s2", 10, start("o2", "S2")),
        saas_event(
            "l1",
            20,
            Body::Lead(Lead {
                lead_id: "L1".into(),
                kind: "lead".into(),
                codes: vec!["ALICE".into()],
                ..Lead::default()
            }),
        ),
        saas_event("p1", day, payment("S1", "p1")),
        saas_event("g1", day + 5, Body::LeadStage(LeadStage { lead_id: "L1".into(), stage: "won".into() })),
        saas_event("x2", day + 10, Body::Cancel(Cancel { subscription_id: "S2".into() })),
        saas_event("p2", 2 * day, payment("S2", "p2")),
        // Far later: S2 (cancelled) is forgotten by the sweep; S1 still runs.
        saas_event("p3", 5 * day, payment("S1", "p3")),
        saas_event("p4", 5 * day + 1, payment("S2", "p4")),
    ]
}

#[test]
fn subscriptions_and_leads_survive_images_and_deltas_at_every_cut_and_ended_ones_are_forgotten() {
    let rules = Arc::new(Rules::parse("saas.toml", SAAS).unwrap());
    let events = saas_stream();
    let mut straight = Engine::new(rules.clone());
    let outcomes: Vec<Outcome> = events.iter().map(|ev| apply(&mut straight, ev)).collect();
    let out = straight.take_output();
    // p2 after S2's cancellation earns nothing; p4 names a subscription
    // forgotten (cancelled, idle past order_retention): refused, kept.
    assert_eq!(outcomes[..8], [Outcome::Applied; 8]);
    assert_eq!(outcomes[8], Outcome::Rejected(Reason::UnknownSubscription));
    assert_eq!(straight.subscriptions_tracked(), 1, "S1 runs on, S2 is forgotten");
    let earned: Vec<(&str, String)> = out.ledger.iter().map(|l| (l.entry_id.as_str(), l.amount.to_string())).collect();
    assert_eq!(
        earned,
        [
            ("s1:0", "10.00".to_string()),
            ("s2:0", "10.00".into()),
            ("l1:0", "3.00".into()),
            ("p1:0", "1.00".into()),
            ("g1:0", "10.00".into()),
            ("p3:0", "1.00".into()),
        ]
    );
    let state = straight.state_fingerprint();
    restores_at_every_cut(|| Engine::new(rules.clone()), &events, state, |_, _| {});
}

/// The detectors' baselines, evidence, runs and open alarms are in the
/// checkpoint: restoring at any point (mid-alarm included) raises exactly the
/// flags an uninterrupted engine raises, and the state is the same.
#[test]
fn fraud_state_survives_a_restore_at_every_cut_mid_alarm_included() {
    let make = || {
        let e = fraud_engine(
            "[programs.fraud.conversion_spike]\naction = 'hold'\nmin_orders = 3\nthreshold = 2.0\nwarmup_buckets = 2\n\
             [programs.fraud.coupon_leak]\naction = 'hold'\nmin_orders = 4\nthreshold = 2.0\n\
             [programs.fraud.refund_rate]\naction = 'flag'\nmin_orders = 2\nmax_share = 0.05",
        );
        let bob = "[[partners]]\nid = 'bob'\nprogram_id = 'acme'\n[[codes]]\ncode = 'BOB'\npartner_id = 'bob'\n";
        let rules = e.rules().with_update(bob).unwrap();
        let mut e = e;
        e.set_rules(Arc::new(rules));
        e
    };
    let mut events = Vec::new();
    let mut n = 0;
    let mut order = |mins: i64, code: &str| {
        n += 1;
        capture(&format!("c{n}"), mins, &format!("o{n}"), "10", None, &[code])
    };
    for h in 0..4 {
        for k in 0..8 {
            events.push(order(h * 60 + k * 5, "BOB"));
        }
        events.push(order(h * 60 + 50, "ALICE"));
        events.push(order(h * 60 + 55, "ALICE"));
    }
    for k in 0..8 {
        events.push(order(240 + k, "BOB"));
    }
    for k in 0..10 {
        events.push(order(260 + k, "ALICE"));
    }
    // Alice's first two orders are refunded (2 of her 18 orders' money, over 5%).
    for (i, o) in ["o9", "o10"].into_iter().enumerate() {
        events.push(Event {
            event_id: format!("r{i}").into(),
            ts: at(280),
            program_id: "acme".into(),
            body: Body::Refund(crate::Refund {
                order_id: o.into(),
                amount: "10".parse().unwrap(),
                currency: "USD".into(),
                items: None,
                chargeback: false,
            }),
        });
    }
    for k in 0..3 {
        events.push(order(290 + k, "BOB"));
        events.push(order(295 + k, "ALICE"));
    }
    let flags_of = |out: crate::Output| -> Vec<String> {
        out.flags.iter().map(|f| format!("{} {} {} {}", f.order_id, f.rule.as_str(), f.retroactive, f.detail)).collect()
    };
    let mut straight = make();
    for ev in &events {
        apply(&mut straight, ev);
    }
    let all = flags_of(straight.take_output());
    assert!(all.iter().any(|f| f.contains("conversion_spike")), "the stream raises an alarm: {all:?}");
    assert!(all.iter().any(|f| f.contains("refund_rate")), "{all:?}");
    for cut in 0..=events.len() {
        let mut first = make();
        for ev in &events[..cut] {
            apply(&mut first, ev);
        }
        let mut got = flags_of(first.take_output());
        let mut second = Engine::restore(first.rules().clone(), &first.checkpoint().unwrap()).unwrap();
        for ev in &events[cut..] {
            apply(&mut second, ev);
        }
        got.extend(flags_of(second.take_output()));
        assert_eq!(got, all, "cut at {cut}");
        assert_eq!(second.state_fingerprint(), straight.state_fingerprint(), "cut at {cut}");
    }
    let state = straight.state_fingerprint();
    restores_at_every_cut(make, &events, state, |_, _| {});
}
