use super::*;

const GOOD: &str = r#"
[engine]
dedupe_retention = "7d"

[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
overrides = ["2%", "1%"]
hold = "30d"
[programs.attribution]
window = "7d"
model = "first_click"
code_priority = false
[programs.category_rates]
electronics = "4%"

[[partners]]
id = "agency1"
program_id = "acme"

[[partners]]
id = "alice"
program_id = "acme"
parent = "agency1"
rate = "15%"
category_rates = { shoes = "20%" }
email_sha256 = ["5E884898DA28047151D0E56F8DC6292773603D0D6AABBDD62A11EF721D1542D8"]
customer_ids = ["c_77"]
payout = { provider = "paypal", email = "alice@example.com" }

[[links]]
id = "alice-summer"
partner_id = "alice"
destination = "https://shop.example.com/summer"

[[codes]]
code = " alice10 "
partner_id = "alice"
starts_at = "2026-11-01T00:00:00Z"
expires_at = "2026-12-31T23:59:59+05:30"
max_uses = 500
"#;

#[test]
fn a_good_file_compiles_with_every_field() {
    let r = Rules::parse("rules.toml", GOOD).unwrap();
    assert_eq!(r.version(), 1);
    assert_eq!(r.engine().dedupe_retention, TimeDelta::days(7));
    let p = r.program("acme").unwrap();
    assert_eq!(p.currency.code(), "USD");
    assert_eq!(p.rate.to_string(), "10%");
    assert_eq!(p.overrides.len(), 2);
    assert_eq!(p.model, AttributionModel::FirstClick);
    assert!(!p.code_priority);
    assert_eq!(p.window, TimeDelta::days(7));
    let code = p.codes.get("ALICE10").unwrap();
    assert_eq!(code.partner_id, "alice");
    assert_eq!(code.max_uses, Some(500));
    assert_eq!(code.expires_at.unwrap().to_rfc3339(), "2026-12-31T18:29:59+00:00");
    let alice = r.partner("alice").unwrap();
    assert!(alice.email_sha256.contains("5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"));
    assert_eq!(r.link("alice-summer").unwrap().program_id, "acme");
    let chain: Vec<_> = r.ancestors("alice", 5).map(|p| p.id.as_str()).collect();
    assert_eq!(chain, ["agency1"]);
}

#[test]
fn defaults_follow_the_spec() {
    let r = Rules::parse("r.toml", "[[programs]]\nid='p'\ncurrency='EUR'\nrate='5%'\n").unwrap();
    let p = r.program("p").unwrap();
    assert_eq!(p.hold, TimeDelta::days(30));
    assert_eq!(p.window, TimeDelta::days(30));
    assert_eq!(p.model, AttributionModel::LastClick);
    assert!(p.code_priority);
    assert!(!p.auto_approve);
    assert_eq!(r.engine().dedupe_retention, TimeDelta::days(30));
}

/// Checks that `text` is refused with exactly the problems `expect` lists,
/// as `(line, field, fragment of the message)`.
fn check(text: &str, expect: &[(usize, &str, &str)]) {
    let err = Rules::parse("bad.toml", text).expect_err("must be refused");
    let got = err.problems();
    assert_eq!(got.len(), expect.len(), "problems: {err}");
    for ((line, field, frag), p) in expect.iter().zip(got) {
        assert_eq!((p.line, p.field.as_str()), (*line, *field), "{err}");
        assert!(p.message.contains(frag), "{:?} lacks {frag:?}", p.message);
    }
    let text = err.to_string();
    assert!(text.contains("bad.toml:"), "{text}");
}

#[test]
fn every_problem_is_reported_at_once_with_line_and_field() {
    check(
        r#"[[programs]]
id = "acme"
currency = "usd"
rate = "10"
overrides = ["2%", "x%"]
hold = "30 days"
[programs.attribution]
model = "linear"

[[partners]]
id = "alice"
program_id = "nope"
parent = "ghost"
email_sha256 = ["abc"]

[[links]]
id = "l1"
partner_id = "bob"

[[codes]]
code = "A"
partner_id = "alice"
starts_at = "yesterday"
max_uses = 0
"#,
        &[
            (3, "programs[0].currency", "\"usd\""),
            (4, "programs[0].rate", "\"10\""),
            (5, "programs[0].overrides[1]", "\"x%\""),
            (6, "programs[0].hold", "\"30 days\""),
            (8, "programs[0].attribution.model", "\"linear\""),
            (12, "partners[0].program_id", "\"nope\""),
            (13, "partners[0].parent", "\"ghost\""),
            (14, "partners[0].email_sha256[0]", "\"abc\""),
            (18, "links[0].partner_id", "\"bob\""),
            (23, "codes[0].starts_at", "\"yesterday\""),
            (24, "codes[0].max_uses", "0"),
        ],
    );
}

#[test]
fn duplicates_and_cycles_are_refused() {
    check(
        r#"[[programs]]
id = "p"
currency = "USD"
rate = "1%"
[[partners]]
id = "a"
program_id = "p"
parent = "b"
[[partners]]
id = "b"
program_id = "p"
parent = "a"
[[codes]]
code = "save"
partner_id = "a"
[[codes]]
code = " SAVE "
partner_id = "b"
[[links]]
id = "x"
partner_id = "a"
[[links]]
id = "x"
partner_id = "b"
"#,
        &[
            (8, "partners[0].parent", "cycle"),
            (12, "partners[1].parent", "cycle"),
            (17, "codes[1].code", "duplicate code"),
            (23, "links[1].id", "duplicate link id"),
        ],
    );
}

#[test]
fn shape_errors_name_the_line_and_field() {
    check("[[programs]]\nid = \"p\"\ncurrency = \"USD\"\nrat = \"1%\"\n", &[(4, "rat", "unknown field")]);
    check("[[programs]]\nid = \"p\"\ncurrency = \"USD\"\nrate = 10\n", &[(4, "rate", "invalid type")]);
    check("[[programs]\n", &[(1, "[[programs]", "")]);
}

#[test]
fn payouts_are_validated_per_provider() {
    let base = "[[programs]]\nid='p'\ncurrency='INR'\nrate='1%'\n[[partners]]\nid='a'\nprogram_id='p'\n";
    check(&format!("{base}payout = {{ provider = 'razorpayx' }}\n"), &[(8, "partners[0].payout", "vpa")]);
    check(
        &format!("{base}payout = {{ provider = 'razorpayx', account_number = '1', ifsc = 'bad' }}\n"),
        &[(8, "partners[0].payout.ifsc", "\"bad\"")],
    );
    check(&format!("{base}payout = {{ provider = 'wire' }}\n"), &[(8, "partners[0].payout.provider", "\"wire\"")]);
    Rules::parse("ok", &format!("{base}payout = {{ provider = 'razorpayx', vpa = 'a@upi' }}\n")).unwrap();
    Rules::parse(
        "ok",
        &format!("{base}payout = {{ provider = 'razorpayx', account_number = '123', ifsc = 'HDFC0001234' }}\n"),
    )
    .unwrap();
}

#[test]
fn updates_add_and_replace_without_touching_the_rest() {
    let r = Rules::parse("rules.toml", GOOD).unwrap();
    let r2 = r
        .with_update(
            "[[partners]]\nid='bob'\nprogram_id='acme'\nparent='alice'\n[[links]]\nid='bob-1'\npartner_id='bob'\n[[codes]]\ncode='BOB5'\npartner_id='bob'\n",
        )
        .unwrap();
    assert_eq!(r2.version(), 2);
    assert_eq!(r2.link("bob-1").unwrap().partner_id, "bob");
    assert!(r2.program("acme").unwrap().codes.contains_key("BOB5"));
    assert!(r2.program("acme").unwrap().codes.contains_key("ALICE10"));
    let chain: Vec<_> = r2.ancestors("bob", 5).map(|p| p.id.as_str()).collect();
    assert_eq!(chain, ["alice", "agency1"]);
    // Replace alice's rate.
    let r3 = r2.with_update("[[partners]]\nid='alice'\nprogram_id='acme'\nrate='12%'\n").unwrap();
    assert_eq!(r3.partner("alice").unwrap().rate.unwrap().to_string(), "12%");
    assert_eq!(r3.version(), 3);
    // An invalid update changes nothing and says why.
    let err = r3.with_update("[[links]]\nid='z'\npartner_id='nobody'\n").unwrap_err();
    assert!(err.to_string().contains("unknown partner \"nobody\""), "{err}");
    assert!(r3.link("z").is_none());
}

#[test]
fn api_keys_come_from_the_file_or_the_environment_and_are_never_printed() {
    let base = "[[programs]]\nid='p'\ncurrency='USD'\nrate='1%'\n";
    let r = Rules::parse("k", &format!("{base}[[api_keys]]\nprogram_id='p'\nkey='0123456789abcdef'\n")).unwrap();
    assert_eq!(r.api_keys()[0].key.expose(), "0123456789abcdef");
    assert!(!format!("{:?}", r.api_keys()).contains("0123456789abcdef"));
    check(
        &format!("{base}[[api_keys]]\nprogram_id='q'\nkey='short'\n"),
        &[(5, "api_keys[0].key", "16 characters"), (6, "api_keys[0].program_id", "\"q\"")],
    );
    let err = Rules::parse("k", &format!("{base}[[api_keys]]\nprogram_id='p'\nkey='short-secret'\n")).unwrap_err();
    assert!(!err.to_string().contains("short-secret"), "{err}");
    check(
        &format!("{base}[[api_keys]]\nprogram_id='p'\nkey_env='AFFLIO_TEST_UNSET_VAR'\n"),
        &[(7, "api_keys[0].key_env", "not set")],
    );
}

#[test]
fn order_retention_must_outlast_every_hold() {
    let text = "[engine]\norder_retention = \"10d\"\n[[programs]]\nid='p'\ncurrency='USD'\nrate='1%'\nhold='30d'\n";
    check(text, &[(2, "engine.order_retention", "hold")]);
    check("[engine]\norder_retention = \"12h\"\n", &[(2, "engine.order_retention", "1d minimum")]);
    let ok = Rules::parse("ok", &text.replace("hold='30d'", "hold='9d'")).unwrap();
    assert_eq!(ok.engine().order_retention, TimeDelta::days(10));
}

#[test]
fn fraud_rules_are_configured_per_program() {
    let base = "[[programs]]\nid='p'\ncurrency='USD'\nrate='1%'\n";
    let r = Rules::parse("f", base).unwrap();
    let f = &r.program("p").unwrap().fraud;
    assert_eq!(
        (f.self_referral, f.coupon_stacking, f.velocity),
        (FraudAction::Hold, FraudAction::Hold, FraudAction::Off)
    );
    let text = format!(
        "{base}[programs.fraud.velocity]\naction = 'hold'\nmax_orders = 3\nwindow = '10m'\n\
         [programs.fraud.coupon_stacking]\naction = 'flag'\n[programs.fraud.fast_conversion]\naction = 'flag'\nmin_seconds = 2\n\
         [programs.fraud.conversion_spike]\naction = 'hold'\nbucket = '15m'\nmin_orders = 8\nthreshold = 3.5\nwarmup_buckets = 96\n"
    );
    let r = Rules::parse("f", &text).unwrap();
    let f = &r.program("p").unwrap().fraud;
    assert_eq!(f.velocity, FraudAction::Hold);
    assert_eq!(f.velocity_max_orders, 3);
    assert_eq!(f.velocity_window, TimeDelta::minutes(10));
    assert_eq!(f.coupon_stacking, FraudAction::Flag);
    assert_eq!((f.fast_conversion, f.fast_conversion_min), (FraudAction::Flag, TimeDelta::seconds(2)));
    assert_eq!(
        (f.conversion_spike, f.conversion_spike_bucket, f.conversion_spike_min_orders),
        (FraudAction::Hold, TimeDelta::minutes(15), 8)
    );
    assert_eq!((f.conversion_spike_threshold, f.conversion_spike_warmup), (3.5, 96));
    check(
        &format!(
            "{base}[programs.fraud.conversion_spike]\nbucket = '10s'\nthreshold = -1.0\nwarmup_buckets = 0\nratio = 1.0\nbaseline_buckets = 1\n"
        ),
        &[
            (6, "programs[0].fraud.conversion_spike.bucket", "between 1m and 1d"),
            (7, "programs[0].fraud.conversion_spike.threshold", "positive"),
            (8, "programs[0].fraud.conversion_spike.warmup_buckets", "between 1 and 10000"),
            (9, "programs[0].fraud.conversion_spike.ratio", "(1, 100]"),
            (10, "programs[0].fraud.conversion_spike.baseline_buckets", "between 2 and 10000"),
        ],
    );
    let text = format!(
        "{base}[programs.fraud.conversion_spike]\nratio = 4.0\nbaseline_buckets = 336\n\
         [programs.fraud.coupon_leak]\nthreshold = 6.0\nratio = 2.5\n[programs.fraud.refund_rate]\nthreshold = 3.0\nratio = 2.0\n"
    );
    let f = Rules::parse("f", &text).unwrap().program("p").unwrap().fraud.clone();
    assert_eq!((f.conversion_spike_ratio, f.conversion_spike_memory, f.conversion_spike_threshold), (4.0, 336, 10.0));
    assert_eq!((f.coupon_leak_threshold, f.coupon_leak_ratio), (6.0, 2.5));
    assert_eq!((f.refund_rate_threshold, f.refund_rate_ratio), (3.0, 2.0));
    check(
        &format!("{base}[programs.fraud.refund_rate]\nthreshold = 0.0\nratio = 101.0\n"),
        &[
            (6, "programs[0].fraud.refund_rate.threshold", "positive"),
            (7, "programs[0].fraud.refund_rate.ratio", "(1, 100]"),
        ],
    );
    // A misspelt rule is refused, not silently ignored.
    let err = Rules::parse("f", &format!("{base}[programs.fraud.velocty]\naction = 'hold'\n")).unwrap_err();
    assert!(err.to_string().contains("velocty"), "{err}");
    check(
        &format!("{base}[programs.fraud.velocity]\naction = 'block'\nmax_orders = 0\n"),
        &[
            (6, "programs[0].fraud.velocity.action", "\"block\""),
            (7, "programs[0].fraud.velocity.max_orders", "at least 1"),
        ],
    );
}

#[test]
fn share_based_fraud_rules_validate_their_thresholds() {
    let base = "[[programs]]\nid='p'\ncurrency='USD'\nrate='1%'\n";
    let r = Rules::parse(
        "f",
        &format!("{base}[programs.fraud.coupon_leak]\naction='hold'\nmin_orders=50\nmax_share=0.9\n"),
    )
    .unwrap();
    let f = &r.program("p").unwrap().fraud;
    assert_eq!((f.coupon_leak, f.coupon_leak_min_orders, f.coupon_leak_max_share), (FraudAction::Hold, 50, 0.9));
    assert_eq!((f.refund_rate, f.refund_rate_min_orders), (FraudAction::Off, 20));
    check(
        &format!("{base}[programs.fraud.refund_rate]\nmax_share=1.5\nmin_orders=-1\n"),
        &[
            (6, "programs[0].fraud.refund_rate.max_share", "[0, 1)"),
            (7, "programs[0].fraud.refund_rate.min_orders", "at least 1"),
        ],
    );
}

#[test]
fn roles_are_one_per_key_and_a_key_is_never_given_twice() {
    let base = "[[programs]]\nid = 'p'\ncurrency = 'USD'\nrate = '1%'\n";
    let ok = format!(
        "{base}[[api_keys]]\nprogram_id = 'p'\nkey = 'ingest-key-0123456789'\n\
         [[api_keys]]\nprogram_id = 'p'\nkey = 'review-key-0123456789'\nrole = 'review'\n\
         [[api_keys]]\nprogram_id = 'p'\nkey = 'finance-key-0123456789'\nrole = 'finance'\n"
    );
    let r = Rules::parse("k.toml", &ok).unwrap();
    let roles: Vec<KeyRole> = r.api_keys().iter().map(|k| k.role).collect();
    assert_eq!(roles, [KeyRole::Ingest, KeyRole::Review, KeyRole::Finance]);
    let twice = format!(
        "{base}[[api_keys]]\nprogram_id = 'p'\nkey = 'same-key-0123456789'\n\
         [[api_keys]]\nprogram_id = 'p'\nkey = 'same-key-0123456789'\nrole = 'review'\n"
    );
    let e = Rules::parse("k.toml", &twice).unwrap_err().to_string();
    assert!(e.contains("api_keys[1].key") && e.contains("the same key as api_keys[0]"), "{e}");
    assert!(!e.contains("same-key-0123456789"), "the key is never quoted: {e}");
    let bad_role = format!("{base}[[api_keys]]\nprogram_id = 'p'\nkey = 'x-key-0123456789ab'\nrole = 'admin'\n");
    let e = Rules::parse("k.toml", &bad_role).unwrap_err().to_string();
    assert!(e.contains("api_keys[0].role") && e.contains("\"admin\""), "{e}");
}

#[test]
fn the_future_skew_is_configured() {
    let r = Rules::parse("k.toml", "[engine]\nmax_future_skew = '2m'\n").unwrap();
    assert_eq!(r.engine().max_future_skew, chrono::TimeDelta::minutes(2));
    assert_eq!(Rules::parse("k.toml", "").unwrap().engine().max_future_skew, chrono::TimeDelta::minutes(5));
}

#[test]
fn leads_subscriptions_rewards_basis_and_webhooks_report_every_problem() {
    check(
        r#"[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
[programs.leads]
reward = "-5"
[[programs.leads.stages]]
name = "won"
[[programs.leads.stages]]
name = "won"
[[programs.leads.stages]]
name = "dq"
reward = "1.00"
disqualify = true
[programs.subscriptions]
max_duration = "13 months"
[[programs.rewards]]
rate = "5%"
flat = "1.00"
customer = "new"
[[programs.rewards]]
rate = "5%"
[programs.basis]
exclude = ["vat"]

[[webhooks]]
id = "w1"
program_id = "acme"
url = "ftp://x"
events = ["order.paid"]
secret_env = "AFFLIO_TEST_UNSET_WHSEC"
"#,
        &[
            (6, "programs[0].leads.reward", "\"-5\""),
            (10, "programs[0].leads.stages[1].name", "duplicate stage \"won\""),
            (11, "programs[0].leads.stages[2].reward", "cannot pay 1.00"),
            (16, "programs[0].subscriptions.max_duration", "\"13 months\""),
            (17, "programs[0].rewards[0].rate", "exactly one of `rate` and `flat`"),
            (21, "programs[0].rewards[1].customer", "needs a condition"),
            (24, "programs[0].basis.exclude[0]", "\"vat\""),
            (26, "webhooks[0].url", "\"ftp://x\""),
            (26, "webhooks[0].events[0]", "\"order.paid\""),
            (31, "webhooks[0].secret_env", "is not set"),
        ],
    );
}

#[test]
fn subscription_terms_are_calendar_months_fixed_durations_or_lifetime() {
    use chrono::TimeZone;
    let rules = |d: &str| {
        Rules::parse(
            "t.toml",
            &format!("[[programs]]\nid = \"s\"\ncurrency = \"USD\"\nrate = \"10%\"\n[programs.subscriptions]\nmax_duration = \"{d}\"\n"),
        )
        .unwrap()
    };
    let start = Utc.with_ymd_and_hms(2026, 1, 31, 12, 0, 0).unwrap();
    let end = |d: &str| rules(d).program("s").unwrap().subscriptions.as_ref().unwrap().max_duration.end(start);
    // One calendar month after January 31 is the last day of February.
    assert_eq!(end("1mo"), Some(Utc.with_ymd_and_hms(2026, 2, 28, 12, 0, 0).unwrap()));
    assert_eq!(end("12mo"), Some(Utc.with_ymd_and_hms(2027, 1, 31, 12, 0, 0).unwrap()));
    assert_eq!(end("30d"), Some(Utc.with_ymd_and_hms(2026, 3, 2, 12, 0, 0).unwrap()));
    assert_eq!(end("lifetime"), None);
}
