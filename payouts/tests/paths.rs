//! One test per way a partner could be paid twice (or never), against the
//! strict fakes: each proves the partner is paid exactly once and the
//! balance identities hold.

mod common;

use std::time::Duration;

use afflio_engine::PayoutStatus::{self, *};
use afflio_payouts::paypal::fake::Fault as PpFault;
use afflio_payouts::razorpayx::fake::Fault as RzFault;
use common::World;
use rust_decimal::Decimal;

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// Lets the provider finish (statuses and webhooks), then reconciles.
fn finish(w: &mut World, program: &str) {
    w.rzp().settle();
    w.pp().settle();
    w.sync(program);
    w.assert_balances(program);
}

fn all(w: &World, program: &str, s: PayoutStatus) -> bool {
    w.statuses(program).iter().all(|(_, x)| *x == s)
}

#[test]
fn razorpayx_accepts_the_fixed_identity_and_pays_once() {
    let mut w = World::new(0, &[("ravi", "ravi@upi"), ("meena", "50100123456789")], "10000.00");
    let plan = w.plan("bharat");
    assert_eq!(plan.items.len(), 2, "{plan:?}");
    let r = w.send("bharat", None);
    assert_eq!((r.sent, r.failed, r.unknown.len()), (2, 0, 0), "{r:?}");
    // Keys the strict fake accepted, and the gross less 10% TDS in paise.
    for p in &w.rzp().payouts {
        assert!(p.key.starts_with("afl") && p.key.len() == 35, "{}", p.key);
        assert_eq!(p.amount_paise, 90_000, "1000.00 gross, 100.00 TDS");
    }
    finish(&mut w, "bharat");
    assert!(all(&w, "bharat", Paid), "{:?}", w.statuses("bharat"));
    assert_eq!(w.rzp().paid_to("ravi@upi"), 90_000);
    assert_eq!(w.rzp().paid_to("50100123456789"), 90_000);
    // Nothing more to send, and a second send asks nobody.
    let before = w.rzp().create_requests;
    assert_eq!(w.send("bharat", None).requests, 0);
    assert_eq!(w.rzp().create_requests, before);
}

#[test]
fn razorpayx_timeout_after_accept_then_retry_pays_once() {
    let mut w = World::new(0, &[("ravi", "ravi@upi")], "10000.00");
    w.plan("bharat");
    w.rzp().faults.push_back(RzFault::SlowAfter(Duration::from_millis(1500)));
    let r = w.send("bharat", None);
    assert_eq!(r.unknown.len(), 1, "a lost answer is unknown, not failed: {r:?}");
    assert_eq!(w.statuses("bharat"), vec![("ravi".into(), Unknown)]);
    w.assert_balances("bharat");
    // Run send again: the payout is found by its reference id, not made again.
    let r = w.send("bharat", None);
    assert_eq!(r.sent, 1, "{r:?}");
    finish(&mut w, "bharat");
    assert_eq!(w.rzp().made_to("ravi@upi").len(), 1);
    assert_eq!(w.rzp().paid_to("ravi@upi"), 90_000);
    assert!(all(&w, "bharat", Paid));
}

#[test]
fn razorpayx_5xx_before_and_after_accept() {
    let mut w = World::new(0, &[("ravi", "ravi@upi"), ("meena", "meena@upi")], "10000.00");
    w.plan("bharat");
    // meena's request is first (by partner): refused before anything is made;
    // ravi's is made but answered 500.
    w.rzp().faults.extend([RzFault::FailBefore, RzFault::FailAfter]);
    let r = w.send("bharat", None);
    assert_eq!(r.unknown.len(), 2, "{r:?}");
    assert_eq!(w.rzp().payouts.len(), 1);
    // The next send finds ravi's and sends meena's again with the same key.
    let r = w.send("bharat", None);
    assert_eq!((r.sent, r.requests), (2, 1), "{r:?}");
    finish(&mut w, "bharat");
    let rz = w.rzp();
    assert_eq!((rz.made_to("ravi@upi").len(), rz.made_to("meena@upi").len()), (1, 1));
    drop(rz);
    assert!(all(&w, "bharat", Paid));
}

#[test]
fn destination_edited_between_attempts_keeps_the_recorded_request() {
    let mut w = World::new(0, &[("ravi", "ravi@upi"), ("zoya", "zoya@upi")], "10000.00");
    w.plan("bharat");
    w.rzp().faults.extend([RzFault::FailAfter, RzFault::FailBefore]);
    w.send("bharat", None);
    // Both partners change their UPI address before the retry.
    let text = w.text.replace("ravi@upi", "ravi@newbank").replace("zoya@upi", "zoya@newbank");
    w.set_rules(&text);
    let r = w.send("bharat", None);
    assert_eq!(r.sent, 2, "{r:?}");
    finish(&mut w, "bharat");
    let rz = w.rzp();
    // The money went where it was planned to, once; never to the new address.
    assert_eq!((rz.made_to("ravi@upi").len(), rz.made_to("zoya@upi").len()), (1, 1));
    assert!(rz.made_to("ravi@newbank").is_empty() && rz.made_to("zoya@newbank").is_empty());
    drop(rz);
    // The next batch goes to the new address.
    assert!(all(&w, "bharat", Paid));
}

#[test]
fn retry_after_razorpayx_forgot_the_key_looks_up_instead_of_paying_again() {
    let mut w = World::new(0, &[("ravi", "ravi@upi"), ("zoya", "zoya@upi")], "10000.00");
    w.plan("bharat");
    // ravi: made, answer lost. zoya: never made.
    w.rzp().faults.extend([RzFault::FailAfter, RzFault::FailBefore]);
    w.send("bharat", None);
    // Eight days later RazorpayX no longer knows either key: a re-send
    // would make a second payout for ravi.
    w.advance(chrono::Duration::days(8));
    let r = w.send("bharat", None);
    assert_eq!(r.requests, 0, "nothing is sent after the key window: {r:?}");
    assert_eq!(r.failed, 1, "zoya's was never made: it fails, the money returns: {r:?}");
    assert_eq!(w.rzp().made_to("ravi@upi").len(), 1);
    assert!(w.rzp().made_to("zoya@upi").is_empty());
    w.assert_balances("bharat");
    // The next plan pays zoya under a new key; ravi is not in it.
    w.advance(chrono::Duration::seconds(1));
    let plan = w.plan("bharat");
    assert_eq!(plan.items.iter().map(|i| i.partner_id.as_str()).collect::<Vec<_>>(), ["zoya"]);
    w.send("bharat", None);
    finish(&mut w, "bharat");
    let rz = w.rzp();
    assert_eq!((rz.made_to("ravi@upi").len(), rz.made_to("zoya@upi").len()), (1, 1));
    assert_eq!(rz.paid_to("zoya@upi"), 90_000);
    drop(rz);
}

#[test]
fn razorpayx_refuses_a_reused_key_with_another_body_and_the_item_stays_unknown() {
    // The fake is strict: the same key with a different body is a 400. The
    // queue never does it, so it is provoked here by hand.
    let mut w = World::new(0, &[("ravi", "ravi@upi")], "10000.00");
    w.plan("bharat");
    w.send("bharat", None);
    let client = reqwest::blocking::Client::new();
    let key = w.rzp().payouts[0].key.clone();
    let fund = w.rzp().payouts[0].entity["fund_account_id"].clone();
    let body = serde_json::json!({"account_number": afflio_payouts::razorpayx::fake::ACCOUNT, "fund_account_id": fund,
        "amount": 100, "currency": "INR", "mode": "UPI", "purpose": "payout"});
    let resp = client
        .post(format!("{}/v1/payouts", w.base))
        .basic_auth(afflio_payouts::razorpayx::fake::KEY_ID, Some(afflio_payouts::razorpayx::fake::KEY_SECRET))
        .header("X-Payout-Idempotency", key)
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 400);
    let bad_key = client
        .post(format!("{}/v1/payouts", w.base))
        .basic_auth(afflio_payouts::razorpayx::fake::KEY_ID, Some(afflio_payouts::razorpayx::fake::KEY_SECRET))
        .header("X-Payout-Idempotency", "prog-2026:partner/with:colons-and-more-than-36-chars")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(bad_key.status(), 400);
    assert_eq!(w.rzp().payouts.len(), 1);
}

#[test]
fn paypal_timeout_after_accept_then_retry_pays_once() {
    let mut w = World::new(2, &[], "100.00");
    w.plan("acme");
    w.pp().faults.push_back(PpFault::SlowAfter(Duration::from_millis(1500)));
    let r = w.send("acme", None);
    assert_eq!(r.unknown.len(), 2, "{r:?}");
    let r = w.send("acme", None);
    assert_eq!(r.sent, 2, "the repeated request id answers with the original batch: {r:?}");
    finish(&mut w, "acme");
    assert_eq!(w.pp().batches.len(), 1);
    let pp = w.pp();
    assert_eq!((pp.items_to("pp0@example.com").len(), pp.items_to("pp1@example.com").len()), (1, 1));
    drop(pp);
    assert!(all(&w, "acme", Paid));
}

#[test]
fn paypal_duplicate_batch_id_is_followed_not_taken_as_a_refusal() {
    let mut w = World::new(2, &[], "100.00");
    w.pp().honor_request_ids = false;
    w.plan("acme");
    w.pp().faults.push_back(PpFault::FailAfter);
    let r = w.send("acme", None);
    assert_eq!(r.unknown.len(), 2, "{r:?}");
    // The retry gets PayPal's 400 "already exists" with a link to the batch.
    let r = w.send("acme", None);
    assert_eq!((r.sent, r.failed), (2, 0), "{r:?}");
    w.pp().settle();
    let r = w.sync("acme");
    assert_eq!(r.paid, 2, "{r:?}");
    w.assert_balances("acme");
    assert_eq!(w.pp().batches.len(), 1, "one batch, never a second");
    // Nothing returned to the balance, so the next plan pays nothing again.
    w.advance(chrono::Duration::seconds(1));
    assert!(w.plan("acme").items.is_empty());
}

#[test]
fn paypal_after_its_30_days_an_unknown_item_waits_for_a_person() {
    let mut w = World::new(1, &[], "100.00");
    w.plan("acme");
    w.pp().faults.push_back(PpFault::SlowAfter(Duration::from_millis(1500)));
    w.send("acme", None);
    w.advance(chrono::Duration::days(31));
    let before = w.pp().create_requests;
    let r = w.send("acme", None);
    assert_eq!(r.requests, 0, "{r:?}");
    assert_eq!(w.pp().create_requests, before, "never sent again after the window");
    assert_eq!(r.needs_person.len(), 1, "{r:?}");
    assert_eq!(w.statuses("acme"), vec![("pp0".into(), Unknown)]);
    w.assert_balances("acme");
    // Finance looks in PayPal's dashboard and settles it.
    let batch = w.items("acme")[0].batch_id.clone();
    let r = w
        .rt
        .block_on(w.queue.resolve_by_hand(&mut w.book, "acme", &batch, "pp0", Paid, "fin", "PB00000000001 SUCCESS"))
        .unwrap();
    assert_eq!(r.paid, 1);
    assert!(all(&w, "acme", Paid));
    w.assert_balances("acme");
    assert_eq!(w.pp().items_to("pp0@example.com").len(), 1);
}

#[test]
fn mixed_batches_are_sent_each_under_its_own_batch_id() {
    let mut w = World::new(2, &[], "100.00");
    let first = w.plan("acme");
    // More earnings for pp0, approved and planned a day later; nothing sent yet.
    w.book.now = common::at("2026-11-05T00:00:00Z");
    let rt = &w.rt;
    rt.block_on(afflio_payouts::Book::record(
        &mut w.book,
        vec![
            common::capture(50, "acme", "USD", "300.00", "PP0").replace("2026-11-01T10:00:50Z", "2026-11-03T10:00:00Z"),
            r#"{"type":"review","event_id":"approve2","ts":"2026-11-05T00:00:00Z","program_id":"acme","decision":"approve","reviewer":"fin"}"#.to_string(),
        ],
    ))
    .unwrap();
    let second = w.plan("acme");
    assert_ne!(first.batch_id, second.batch_id);
    assert_eq!(second.items.len(), 1);
    assert_ne!(first.items[0].group, second.items[0].group);
    let r = w.send("acme", None);
    assert_eq!((r.requests, r.sent), (2, 3), "{r:?}");
    finish(&mut w, "acme");
    let pp = w.pp();
    assert_eq!(pp.batches.len(), 2);
    let made =
        |g: &str| pp.batches.iter().filter(|b| b.sender_batch_id == g).map(|b| b.items.len()).collect::<Vec<_>>();
    assert_eq!(made(&first.items[0].group), [2]);
    assert_eq!(made(&second.items[0].group), [1]);
    let mut to_pp0: Vec<&str> = pp.items_to("pp0@example.com").iter().map(|i| i.value.as_str()).collect();
    to_pp0.sort();
    assert_eq!(to_pp0, ["10.00", "30.00"]);
    drop(pp);
    assert!(all(&w, "acme", Paid));
}

#[test]
fn chunks_are_fixed_at_plan_and_a_retry_resends_the_same_chunk() {
    let mut w = World::new(5, &[], "100.00");
    w.queue = afflio_payouts::Queue::from_env(w.rules.clone(), common::http()).unwrap().with_paypal_group(2);
    let plan = w.plan("acme");
    let groups: std::collections::BTreeSet<&str> = plan.items.iter().map(|i| i.group.as_str()).collect();
    assert_eq!(groups.len(), 3, "{plan:?}");
    // The first chunk is made but its answer lost; the others go through.
    w.pp().honor_request_ids = false;
    w.pp().faults.push_back(PpFault::FailAfter);
    let r = w.send("acme", None);
    assert_eq!((r.sent, r.unknown.len()), (3, 2), "{r:?}");
    let r = w.send("acme", None);
    assert_eq!(r.sent, 2, "{r:?}");
    finish(&mut w, "acme");
    let pp = w.pp();
    assert_eq!(pp.batches.len(), 3);
    for b in &pp.batches {
        let mut planned: Vec<String> = plan
            .items
            .iter()
            .filter(|i| i.group == b.sender_batch_id)
            .map(|i| format!("{}@example.com", i.partner_id))
            .collect();
        let mut made: Vec<String> = b.items.iter().map(|i| i.receiver.clone()).collect();
        planned.sort();
        made.sort();
        assert_eq!(planned, made, "batch {} holds exactly its planned chunk", b.sender_batch_id);
    }
    for n in 0..5 {
        assert_eq!(pp.items_to(&format!("pp{n}@example.com")).len(), 1);
    }
    drop(pp);
    assert!(all(&w, "acme", Paid));
}

#[test]
fn paypal_status_is_read_on_every_page() {
    let mut w = World::new(1_201, &[], "100.00");
    w.plan("acme");
    let r = w.send("acme", None);
    assert_eq!(r.sent, 1_201);
    w.pp().settle();
    let pages = w.pp().status_pages_read;
    let r = w.sync("acme");
    assert_eq!(r.paid, 1_201, "items past the first 1,000 are read too");
    assert_eq!(w.pp().status_pages_read - pages, 2);
    w.assert_balances("acme");
}

#[test]
fn paypal_denied_batches_fail_their_items_and_return_the_money() {
    let mut w = World::new(2, &[], "100.00");
    w.pp().deny = true;
    w.plan("acme");
    let r = w.send("acme", None);
    assert_eq!(r.failed, 2, "{r:?}");
    w.assert_balances("acme");
    // And through the batch webhook.
    let mut w = World::new(2, &[], "100.00");
    w.plan("acme");
    w.send("acme", None);
    let group = w.items("acme")[0].state.provider_batch.clone().unwrap();
    w.pp().deny_batch(&group);
    let r = w.deliver_pp(&[0]);
    assert_eq!(r.failed, 2, "{r:?}");
    w.assert_balances("acme");
    let b = &w.book.engine.balances("acme", w.book.now)[0];
    assert_eq!(b.available, dec("10.00"), "the money is back in the balance");
}

#[test]
fn paypal_unclaimed_is_returned_after_30_days() {
    let mut w = World::new(1, &[], "100.00");
    w.pp().unclaimed.insert("pp0@example.com".into());
    w.plan("acme");
    w.send("acme", None);
    w.pp().step();
    w.sync("acme");
    assert_eq!(w.statuses("acme"), vec![("pp0".into(), Sent)], "unclaimed is still on its way");
    w.advance(chrono::Duration::days(30));
    w.pp().step();
    let r = w.sync("acme");
    assert_eq!(r.failed, 1, "{r:?}");
    w.assert_balances("acme");
}

#[test]
fn paypal_token_is_cached_and_fetched_again_when_refused() {
    let mut w = World::new(2, &[], "100.00");
    w.plan("acme");
    w.send("acme", None);
    w.sync("acme");
    w.sync("acme");
    assert_eq!(w.pp().token_requests, 1, "one token for every call");
    w.pp().faults.push_back(PpFault::ExpireTokens);
    // A new batch, so a create goes out with the expired token.
    w.book.now = common::at("2026-11-05T00:00:00Z");
    w.rt.block_on(afflio_payouts::Book::record(
        &mut w.book,
        vec![
            common::capture(60, "acme", "USD", "300.00", "PP1").replace("2026-11-01T10:00:00Z", "2026-11-03T10:00:00Z"),
            r#"{"type":"review","event_id":"approve2","ts":"2026-11-05T00:00:00Z","program_id":"acme","decision":"approve","reviewer":"fin"}"#.to_string(),
        ],
    ))
    .unwrap();
    w.plan("acme");
    let r = w.send("acme", None);
    assert_eq!(r.sent, 1, "401 then a fresh token: {r:?}");
    assert_eq!(w.pp().token_requests, 2);
}

#[test]
fn rate_limits_back_off_and_credentials_refused_leave_it_unknown() {
    let mut w = World::new(1, &[("ravi", "ravi@upi")], "10000.00");
    w.plan("bharat");
    w.plan("acme");
    w.rzp().faults.push_back(RzFault::RateLimited);
    w.pp().faults.push_back(PpFault::RateLimited);
    assert_eq!(w.send("bharat", None).sent, 1);
    assert_eq!(w.send("acme", None).sent, 1);
    let mut w = World::new(0, &[("ravi", "ravi@upi")], "10000.00");
    w.plan("bharat");
    w.rzp().faults.extend([RzFault::Unauthorized]);
    let r = w.send("bharat", None);
    assert_eq!((r.failed, r.unknown.len()), (0, 1), "a refused key is no refusal of the payout: {r:?}");
    assert_eq!(w.send("bharat", None).sent, 1);
    finish(&mut w, "bharat");
    assert_eq!(w.rzp().made_to("ravi@upi").len(), 1);
}

#[test]
fn a_first_request_refused_for_good_returns_the_money() {
    // An account number RazorpayX does not accept: the fund account is refused.
    let mut w = World::new(0, &[("meena", "50100123456789")], "10000.00");
    let text = w.text.replace("50100123456789", "5010-0123");
    w.set_rules(&text);
    w.plan("bharat");
    let r = w.send("bharat", None);
    assert_eq!(r.failed, 1, "{r:?}");
    assert!(w.items("bharat")[0].state.detail.as_deref().unwrap().contains("account number"));
    w.assert_balances("bharat");
    assert!(w.rzp().payouts.is_empty());
}

#[test]
fn razorpayx_reversals_from_processing_and_from_processed() {
    let mut w = World::new(0, &[("ravi", "ravi@upi"), ("zoya", "zoya@upi")], "10000.00");
    w.rzp().paths.insert("ravi@upi".into(), vec!["reversed".into()]);
    w.rzp().paths.insert("zoya@upi".into(), vec!["processed".into(), "reversed".into()]);
    w.plan("bharat");
    w.send("bharat", None);
    w.rzp().step();
    let n = w.rzp().webhooks.len();
    let r = w.deliver_rzp(&(0..n).collect::<Vec<_>>());
    assert_eq!((r.reversed, r.paid), (1, 1), "ravi reversed while processing, zoya processed: {r:?}");
    w.rzp().step();
    let n = w.rzp().webhooks.len();
    let r = w.deliver_rzp(&(0..n).collect::<Vec<_>>());
    assert_eq!(r.reversed, 1, "zoya reversed days later: {r:?}");
    w.assert_balances("bharat");
    for b in w.book.engine.balances("bharat", w.book.now) {
        assert_eq!((b.available, b.paid), (dec("1000.00"), Decimal::ZERO), "{b:?}");
    }
}

#[test]
fn webhooks_foreign_repeated_and_out_of_order_change_nothing_twice() {
    let mut w = World::new(0, &[("ravi", "ravi@upi")], "10000.00");
    w.rzp().low_balance = true; // queued -> processing -> processed
    w.plan("bharat");
    w.send("bharat", None);
    w.rzp().settle();
    w.rzp().foreign_payout("processed");
    w.rzp().downtime("IMPS", true);
    // processing, processed, foreign, downtime: delivered processed first,
    // twice, then the older processing, the foreign one and the notice.
    let r = w.deliver_rzp(&[1, 1, 0, 2, 3]);
    assert_eq!(r.paid, 1, "{r:?}");
    assert_eq!(r.notices.len(), 1, "{r:?}");
    assert!(r.ignored.len() >= 3, "{r:?}");
    assert_eq!(w.statuses("bharat"), vec![("ravi".into(), Paid)]);
    w.assert_balances("bharat");
    // A forged one is refused.
    let mut h = http::HeaderMap::new();
    h.insert("x-razorpay-signature", "00".parse().unwrap());
    let forged =
        w.rt.block_on(w.queue.webhook(&mut w.book, "razorpayx", h, b"{\"event\":\"payout.reversed\"}".to_vec()));
    assert!(matches!(forged, Err(afflio_payouts::WebhookError::BadSignature(_))), "{forged:?}");
    // PayPal: a forged transmission is not verified by PayPal.
    let mut w = World::new(1, &[], "100.00");
    w.plan("acme");
    w.send("acme", None);
    w.pp().step();
    let (body, headers) = w.pp().webhooks[0].clone();
    let mut h = http::HeaderMap::new();
    for (k, v) in &headers {
        h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let tampered = String::from_utf8(body.clone()).unwrap().replace("SUCCESS", "REVERSED");
    let r = w.rt.block_on(w.queue.webhook(&mut w.book, "paypal", h, tampered.into_bytes()));
    assert!(matches!(r, Err(afflio_payouts::WebhookError::BadSignature(_))), "{r:?}");
    let r = w.deliver_pp(&[0, 0]);
    assert_eq!(r.paid, 1, "{r:?}");
    w.assert_balances("acme");
}

#[test]
fn plan_checks_what_each_provider_can_pay() {
    use afflio_engine::rules::{Currency, Payout, PayoutProvider};
    let pp = Payout {
        provider: PayoutProvider::Paypal,
        email: Some("a@example.com".into()),
        vpa: None,
        account_number: None,
        ifsc: None,
        name: None,
    };
    let cur = |c: &str| Currency::from_code(c).unwrap();
    let plan = |c: &str, a: &str| afflio_payouts::paypal::plan(cur(c), dec(a), "a", &pp);
    assert!(plan("INR", "100").unwrap_err().contains("domestic"));
    assert_eq!(plan("JPY", "1234").unwrap().amount, dec("1234"));
    assert_eq!(plan("USD", "12.34").unwrap().amount, dec("12.34"));
    let w = World::new(0, &[("ravi", "ravi@upi")], "100.00");
    let s = w.rules.payouts().razorpayx.clone().unwrap();
    let rz = Payout {
        provider: PayoutProvider::Razorpayx,
        email: None,
        vpa: Some("r@upi".into()),
        account_number: None,
        ifsc: None,
        name: None,
    };
    let plan = |a: &str| afflio_payouts::razorpayx::plan(&s, cur("INR"), dec(a), "r", &rz);
    assert!(plan("200000").unwrap_err().contains("UPI's limit"), "UPI carries at most 1,00,000");
    assert!(plan("1.00").unwrap_err().contains("minimum"), "0.90 after TDS is under ₹1");
    assert_eq!(plan("1000").unwrap().tds, dec("100.00"));
}

#[test]
fn a_marketplace_partner_is_paid_to_the_destination_of_its_application() {
    let mut w = World::new(0, &[], "100.00");
    let ev = |id: &str, ty: &str, data: &str| {
        format!(
            r#"{{"type":"{ty}","event_id":"{id}","ts":"2026-11-03T00:00:00Z","program_id":"bharat","data":{data}}}"#
        )
    };
    let events = vec![
        ev("pub", "program_published", r#"{"name":"Bharat"}"#),
        ev(
            "app",
            "partner_applied",
            r#"{"application_id":"a1","partner_id":"asha","display_name":"Asha","email":"asha@example.com","payout":{"provider":"razorpayx","vpa":"asha@upi"}}"#,
        ),
        ev("ok", "application_decided", r#"{"application_id":"a1","decision":"approve","decided_by":"brand"}"#),
        r#"{"type":"capture","event_id":"c-asha","ts":"2026-11-03T00:01:00Z","program_id":"bharat","order_id":"oa","amount":"20000.00","currency":"INR","codes":["ASHA"]}"#.to_string(),
        r#"{"type":"review","event_id":"approve-asha","ts":"2026-11-05T00:00:00Z","program_id":"bharat","decision":"approve","reviewer":"fin"}"#.to_string(),
    ];
    w.book.now = common::at("2026-11-05T00:00:00Z");
    w.rt.block_on(afflio_payouts::Book::record(&mut w.book, events)).unwrap();
    assert!(w.book.rejected.is_empty(), "{:?}", w.book.rejected);
    let plan = w.plan("bharat");
    assert_eq!(plan.items.len(), 1, "{plan:?}");
    let r = w.send("bharat", None);
    assert_eq!(r.sent, 1, "{r:?}");
    let sent = w.rzp().payouts.iter().map(|p| p.to.clone()).collect::<Vec<_>>();
    assert_eq!(sent, ["asha@upi"], "paid to the UPI address the creator applied with");
    finish(&mut w, "bharat");
    assert!(all(&w, "bharat", Paid));
}
