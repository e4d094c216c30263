//! Model-based test of the payouts queue against the strict fakes: random
//! earnings, approvals, plans, sends and syncs, with random provider
//! behaviour (accept, refuse, lose the answer, time out, 5xx, 429, 401,
//! expired tokens, asynchronous statuses, reversals, unclaimed payments,
//! webhooks repeated and out of order, days passing beyond the providers'
//! idempotency windows). After every step: the balance identities hold,
//! no item is ever made twice at a provider, and no partner received more
//! than it earned. At the end, once the providers settle and everything is
//! synced: what the engine says is paid is exactly what arrived.
//! proptest prints the failing case and its seed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use afflio_engine::PayoutStatus;
use afflio_payouts::paypal::fake::Fault as PpFault;
use afflio_payouts::razorpayx::fake::Fault as RzFault;
use afflio_payouts::Book;
use common::World;
use proptest::prelude::*;
use rust_decimal::Decimal;

const RZP: [(&str, &str); 2] = [("ravi", "ravi@upi"), ("meena", "50100123456789")];
const PAYPAL: usize = 2;

#[derive(Clone, Debug)]
enum Op {
    Earn { partner: usize, amount: u32 },
    Approve { india: bool },
    Plan { india: bool },
    Send { india: bool },
    Sync { india: bool },
    RzFault(u8),
    PpFault(u8),
    Step,
    Deliver { order: Vec<usize> },
    Advance { hours: u32 },
    RequestIds(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..4usize, 1_000u32..50_000).prop_map(|(partner, amount)| Op::Earn { partner, amount }),
        2 => any::<bool>().prop_map(|india| Op::Approve { india }),
        3 => any::<bool>().prop_map(|india| Op::Plan { india }),
        3 => any::<bool>().prop_map(|india| Op::Send { india }),
        1 => any::<bool>().prop_map(|india| Op::Sync { india }),
        3 => (0..6u8).prop_map(Op::RzFault),
        3 => (0..6u8).prop_map(Op::PpFault),
        2 => Just(Op::Step),
        2 => proptest::collection::vec(0..12usize, 0..8).prop_map(|order| Op::Deliver { order }),
        4 => prop_oneof![1u32..30, 150u32..260, 720u32..800].prop_map(|hours| Op::Advance { hours }),
        1 => any::<bool>().prop_map(Op::RequestIds),
    ]
}

/// Provider behaviour per destination: what a payout does after it is made.
fn paths() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (proptest::collection::vec(0..4u8, 2), proptest::collection::vec(0..5u8, PAYPAL))
}

struct Run {
    w: World,
    earned: BTreeMap<String, Decimal>,
    n: usize,
}

impl Run {
    fn program(india: bool) -> &'static str {
        if india {
            "bharat"
        } else {
            "acme"
        }
    }

    fn partner(i: usize) -> (String, &'static str, &'static str) {
        if i < 2 {
            (RZP[i].0.to_string(), "bharat", "INR")
        } else {
            (format!("pp{}", i - 2), "acme", "USD")
        }
    }

    fn apply(&mut self, op: &Op) {
        let w = &mut self.w;
        match op {
            Op::Earn { partner, amount } => {
                let (id, program, currency) = Self::partner(*partner);
                self.n += 1;
                let ts = w.book.now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                let amount = Decimal::new(i64::from(*amount), 2);
                let ev = format!(
                    r#"{{"type":"capture","event_id":"m{}","ts":"{ts}","program_id":"{program}","order_id":"m{}","amount":"{amount}","currency":"{currency}","codes":["{}"]}}"#,
                    self.n,
                    self.n,
                    id.to_uppercase()
                );
                w.rt.block_on(w.book.record(vec![ev])).unwrap();
                *self.earned.entry(id).or_default() += (amount / Decimal::from(10)).round_dp(2);
            }
            Op::Approve { india } => {
                self.n += 1;
                let ts = w.book.now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                let ev = format!(
                    r#"{{"type":"review","event_id":"a{}","ts":"{ts}","program_id":"{}","decision":"approve","reviewer":"fin"}}"#,
                    self.n,
                    Self::program(*india)
                );
                w.rt.block_on(w.book.record(vec![ev])).unwrap();
            }
            Op::Plan { india } => {
                w.plan(Self::program(*india));
            }
            Op::Send { india } => {
                w.send(Self::program(*india), None);
            }
            Op::Sync { india } => {
                w.sync(Self::program(*india));
            }
            Op::RzFault(k) => {
                let f = [
                    RzFault::FailBefore,
                    RzFault::FailAfter,
                    RzFault::SlowAfter(Duration::from_millis(300)),
                    RzFault::RateLimited,
                    RzFault::Unauthorized,
                    RzFault::RateLimited,
                ][*k as usize];
                w.rzp().faults.push_back(f);
            }
            Op::PpFault(k) => {
                let f = [
                    PpFault::FailBefore,
                    PpFault::FailAfter,
                    PpFault::SlowAfter(Duration::from_millis(300)),
                    PpFault::RateLimited,
                    PpFault::ExpireTokens,
                    PpFault::FailAfter,
                ][*k as usize];
                w.pp().faults.push_back(f);
            }
            Op::Step => {
                w.rzp().step();
                w.pp().step();
            }
            Op::Deliver { order } => {
                let rn = w.rzp().webhooks.len();
                if rn > 0 {
                    let idx: Vec<usize> = order.iter().map(|i| i % rn).collect();
                    let mut all = idx.clone();
                    all.extend(0..rn);
                    w.deliver_rzp(&all);
                }
                let pn = w.pp().webhooks.len();
                if pn > 0 {
                    let mut all: Vec<usize> = order.iter().map(|i| i % pn).collect();
                    all.extend((0..pn).rev());
                    w.deliver_pp(&all);
                }
            }
            Op::Advance { hours } => w.advance(chrono::Duration::hours(i64::from(*hours))),
            Op::RequestIds(on) => w.pp().honor_request_ids = *on,
        }
    }

    /// Gross that arrived per partner, by item key (the provider's side).
    fn arrived(&self) -> BTreeMap<String, Decimal> {
        let mut by_key: BTreeMap<String, Decimal> = BTreeMap::new();
        let items: Vec<_> = ["bharat", "acme"].iter().flat_map(|p| self.w.items(p)).collect();
        let gross = |key: &str| {
            items
                .iter()
                .find(|i| i.state.idempotency_key.as_deref() == Some(key))
                .map(|i| (i.partner_id.clone(), i.state.amount))
        };
        let rz = self.w.rzp();
        let mut keys = BTreeMap::new();
        for p in &rz.payouts {
            *keys.entry(p.key.clone()).or_insert(0) += 1;
            if p.status == "processed" {
                let (partner, g) = gross(&p.key).expect("a payout the engine planned");
                *by_key.entry(partner).or_default() += g;
            }
        }
        drop(rz);
        let pp = self.w.pp();
        for it in pp.batches.iter().flat_map(|b| &b.items) {
            *keys.entry(it.sender_item_id.clone()).or_insert(0) += 1;
            if it.status == "SUCCESS" {
                let (partner, g) = gross(&it.sender_item_id).expect("an item the engine planned");
                *by_key.entry(partner).or_default() += g;
            }
        }
        for (k, n) in keys {
            assert!(n <= 1, "item {k} was made {n} times at the provider");
        }
        by_key
    }

    fn check(&self) {
        self.w.assert_balances("bharat");
        self.w.assert_balances("acme");
        for (partner, got) in self.arrived() {
            let earned = self.earned.get(&partner).copied().unwrap_or_default();
            assert!(got <= earned, "{partner} received {got}, more than the {earned} earned");
        }
    }

    /// The providers settle, every webhook arrives, every item is synced.
    fn finish(&mut self) {
        self.w.rzp().faults.clear();
        self.w.pp().faults.clear();
        for _ in 0..3 {
            self.w.rzp().settle();
            self.w.pp().settle();
            let rn = self.w.rzp().webhooks.len();
            self.w.deliver_rzp(&(0..rn).collect::<Vec<_>>());
            let pn = self.w.pp().webhooks.len();
            self.w.deliver_pp(&(0..pn).collect::<Vec<_>>());
            for p in ["bharat", "acme"] {
                self.w.send(p, None);
                self.w.sync(p);
            }
        }
        self.check();
        let arrived = self.arrived();
        for program in ["bharat", "acme"] {
            let items = self.w.items(program);
            for b in self.w.book.engine.balances(program, self.w.book.now) {
                let unknown: Decimal = items
                    .iter()
                    .filter(|i| *i.partner_id == *b.partner_id && i.state.status == PayoutStatus::Unknown)
                    .map(|i| i.state.amount)
                    .sum();
                let got = arrived.get(&*b.partner_id).copied().unwrap_or_default();
                // An item only a person can settle may have arrived; every
                // other payment is known exactly.
                assert!(
                    b.paid <= got && got <= b.paid + unknown,
                    "{}: engine says paid {} (unknown {unknown}), the provider delivered {got}",
                    b.partner_id,
                    b.paid
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    })]

    #[test]
    fn payouts_never_pay_twice_or_more_than_earned(
        (rz_paths, pp_paths) in paths(),
        ops in proptest::collection::vec(op(), 8..32),
    ) {
        let mut w = World::new(PAYPAL, &RZP, "10000.00");
        // Short time limits: a slow answer is a lost one (and a legitimate
        // answer that is late on a busy machine must be just as harmless).
        let http = afflio_payouts::HttpSettings { timeout: Duration::from_millis(150), ..common::http() };
        w.queue = afflio_payouts::Queue::from_env(w.rules.clone(), http).unwrap().with_paypal_group(1);
        for (i, p) in rz_paths.iter().enumerate() {
            let path: &[&str] = [&["processed"][..], &["reversed"], &["processed", "reversed"], &["rejected"]][*p as usize];
            w.rzp().paths.insert(RZP[i].1.to_string(), path.iter().map(|s| s.to_string()).collect());
        }
        for (i, p) in pp_paths.iter().enumerate() {
            let receiver = format!("pp{i}@example.com");
            match p {
                0 => {}
                1 => { w.pp().unclaimed.insert(receiver); }
                2 => { w.pp().paths.insert(receiver, vec!["FAILED".into()]); }
                3 => { w.pp().paths.insert(receiver, vec!["SUCCESS".into(), "REVERSED".into()]); }
                _ => { w.pp().paths.insert(receiver, vec!["ONHOLD".into(), "SUCCESS".into()]); }
            }
        }
        let earned: BTreeMap<String, Decimal> = RZP.iter().map(|(p, _)| (p.to_string(), Decimal::new(100_000, 2)))
            .chain((0..PAYPAL).map(|i| (format!("pp{i}"), Decimal::new(100_000, 2))))
            .collect();
        let mut run = Run { w, earned, n: 0 };
        for op in &ops {
            run.apply(op);
            run.check();
        }
        run.finish();
    }
}
