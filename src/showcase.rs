//! The demo's programs beyond one-off sales: `cloudnote`, a SaaS brand
//! paying on subscriptions (first payments, renewals for twelve months,
//! upgrades, refunds of single payments, cancellations), and `leadgen`, a
//! B2B brand paying per lead and per deal stage through an agency.

use std::fmt::Write as _;

use chrono::{DateTime, Duration, TimeZone, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The two programs, their partners, links and codes (TOML).
pub const RULES: &str = r#"
# -- Beyond one-off sales (see docs/CONTRACT.md): a SaaS program and a B2B program.
[[programs]]
id = "cloudnote"
currency = "USD"
rate = "25%"
hold = "14d"
auto_approve = true
[programs.attribution]
window = "30d"
[programs.subscriptions]
max_duration = "12mo"
renewal_rate = "15%"
[programs.basis]
exclude = ["tax"]
[programs.marketplace]
listed = true
name = "CloudNote"
description = "Note-taking for teams. 25% of the first payment (30% on annual plans), 15% of every renewal for 12 months, 20.00 for an upgrade to Team."
terms = "Commission on the price before tax. Renewals earn while the subscription runs, up to 12 months after the first payment."
category = "software"
link_pattern = "cloudnote-{partner}"
code_pattern = "CN{PARTNER}"
destination = "https://cloudnote.example/"
[[programs.rewards]]
name = "annual plan"
plan = "annual"
payment = "first"
rate = "30%"
[[programs.rewards]]
name = "team upgrade"
payment = "upgrade"
plan = "team"
flat = "20.00"

[[programs]]
id = "leadgen"
currency = "USD"
rate = "0%"
overrides = ["10%"]
hold = "30d"
[programs.marketplace]
listed = true
name = "LeadGen CRM"
description = "A CRM for B2B sales teams. 10.00 per lead, 40.00 per demo request, 60.00 when it qualifies, 400.00 when the deal is won."
terms = "Leads disqualified by our sales team (spam, duplicates, students) are reversed, even after payout."
category = "software"
link_pattern = "leadgen-{partner}"
code_pattern = "LG{PARTNER}"
destination = "https://leadgen.example/demo"
[programs.leads]
reward = "10.00"
kinds = { demo_request = "40.00" }
hold = "14d"
[[programs.leads.stages]]
name = "qualified"
reward = "60.00"
[[programs.leads.stages]]
name = "won"
reward = "400.00"
[[programs.leads.stages]]
name = "lost"
[[programs.leads.stages]]
name = "disqualified"
disqualify = true

[[partners]]
id = "leadgen-agency"
program_id = "leadgen"
"#;

const SAAS_CREATORS: usize = 10;
const B2B_PARTNERS: usize = 6;

/// The partners, links and codes of the two programs (TOML).
pub fn partners() -> String {
    let mut t = String::new();
    for i in 0..SAAS_CREATORS {
        let _ = write!(
            t,
            "\n[[partners]]\nid = \"cloudnote-creator{i}\"\nprogram_id = \"cloudnote\"\n\
             \n[[links]]\nid = \"cloudnote-c{i}\"\npartner_id = \"cloudnote-creator{i}\"\ndestination = \"https://cloudnote.example/\"\n\
             \n[[codes]]\ncode = \"CN{i}\"\npartner_id = \"cloudnote-creator{i}\"\n"
        );
    }
    for i in 0..B2B_PARTNERS {
        let _ = write!(
            t,
            "\n[[partners]]\nid = \"leadgen-partner{i}\"\nprogram_id = \"leadgen\"\nparent = \"leadgen-agency\"\n\
             \n[[links]]\nid = \"leadgen-p{i}\"\npartner_id = \"leadgen-partner{i}\"\ndestination = \"https://leadgen.example/demo\"\n"
        );
    }
    t
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The events of the two programs, each program's in time order.
pub fn events(seed: u64) -> Vec<String> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5AA5);
    let start = Utc.with_ymd_and_hms(2026, 9, 1, 0, 0, 0).single().expect("a valid start");
    let mut saas: Vec<(DateTime<Utc>, String)> = Vec::new();
    for s in 0..160 {
        let c = rng.random_range(0..SAAS_CREATORS);
        let at = start + Duration::minutes(rng.random_range(0..60 * 24 * 60));
        let visitor = format!("cn-v{s}");
        let by_code = rng.random_bool(0.3);
        if !by_code {
            let click_at = at - Duration::minutes(rng.random_range(1..600));
            saas.push((
                click_at,
                format!(
                    r#"{{"type":"click","event_id":"cn-click{s}","ts":"{}","program_id":"cloudnote","link_id":"cloudnote-c{c}","visitor_id":"{visitor}"}}"#,
                    ts(click_at)
                ),
            ));
        }
        let annual = rng.random_bool(0.2);
        // Prices with 10% tax, which the program leaves out of the basis.
        let plan = if annual { "annual" } else { "monthly" };
        let tax = if annual { "12.00" } else { "1.20" };
        let amount = if annual { "132.00" } else { "13.20" };
        let how = if by_code { format!(r#""codes":["CN{c}"]"#) } else { format!(r#""visitor_id":"{visitor}""#) };
        saas.push((
            at,
            format!(
                r#"{{"type":"capture","event_id":"cn-start{s}","ts":"{}","program_id":"cloudnote","order_id":"cn-o{s}","amount":"{amount}","tax":"{tax}","currency":"USD",{how},"subscription_id":"cn-sub{s}","plan":"{plan}","new_customer":true}}"#,
                ts(at)
            ),
        ));
        if annual {
            continue;
        }
        // Monthly payments until a cancellation (or the end of the demo's horizon).
        let months = rng.random_range(1..16);
        let mut team = false;
        for m in 1..=months {
            let pay_at = at + Duration::days(30 * m);
            let upgrade = !team && rng.random_bool(0.08);
            team |= upgrade;
            let (kind, plan, amount, tax) = if upgrade {
                ("upgrade", "team", "33.00", "3.00")
            } else if team {
                ("renewal", "team", "33.00", "3.00")
            } else {
                ("renewal", "monthly", "13.20", "1.20")
            };
            saas.push((
                pay_at,
                format!(
                    r#"{{"type":"subscription_payment","event_id":"cn-pay{s}-{m}","ts":"{}","program_id":"cloudnote","subscription_id":"cn-sub{s}","payment_id":"cn-p{s}-{m}","kind":"{kind}","plan":"{plan}","amount":"{amount}","tax":"{tax}","currency":"USD"}}"#,
                    ts(pay_at)
                ),
            ));
            if rng.random_bool(0.05) {
                saas.push((
                    pay_at + Duration::days(2),
                    format!(
                        r#"{{"type":"refund","event_id":"cn-ref{s}-{m}","ts":"{}","program_id":"cloudnote","order_id":"cn-p{s}-{m}","amount":"{amount}","currency":"USD"}}"#,
                        ts(pay_at + Duration::days(2))
                    ),
                ));
            }
        }
        if months < 15 {
            let end = at + Duration::days(30 * months + 10);
            saas.push((
                end,
                format!(
                    r#"{{"type":"subscription_cancel","event_id":"cn-cancel{s}","ts":"{}","program_id":"cloudnote","subscription_id":"cn-sub{s}"}}"#,
                    ts(end)
                ),
            ));
        }
    }
    let mut b2b: Vec<(DateTime<Utc>, String)> = Vec::new();
    for l in 0..240 {
        let p = rng.random_range(0..B2B_PARTNERS);
        let at = start + Duration::minutes(rng.random_range(0..60 * 24 * 90));
        let visitor = format!("lg-v{l}");
        b2b.push((
            at - Duration::minutes(30),
            format!(
                r#"{{"type":"click","event_id":"lg-click{l}","ts":"{}","program_id":"leadgen","link_id":"leadgen-p{p}","visitor_id":"{visitor}"}}"#,
                ts(at - Duration::minutes(30))
            ),
        ));
        let kind = if rng.random_bool(0.4) { "demo_request" } else { "lead" };
        b2b.push((
            at,
            format!(
                r#"{{"type":"lead","event_id":"lg-lead{l}","ts":"{}","program_id":"leadgen","lead_id":"lg-L{l}","kind":"{kind}","visitor_id":"{visitor}"}}"#,
                ts(at)
            ),
        ));
        let stage = |name: &str, when: DateTime<Utc>| {
            (
                when,
                format!(
                    r#"{{"type":"lead_stage","event_id":"lg-{name}{l}","ts":"{}","program_id":"leadgen","lead_id":"lg-L{l}","stage":"{name}"}}"#,
                    ts(when)
                ),
            )
        };
        if rng.random_bool(0.05) {
            b2b.push(stage("disqualified", at + Duration::days(rng.random_range(1..20))));
            continue;
        }
        if !rng.random_bool(0.5) {
            continue;
        }
        let q = at + Duration::days(rng.random_range(2..10));
        b2b.push(stage("qualified", q));
        let roll = rng.random_range(0..10);
        if roll < 3 {
            b2b.push(stage("won", q + Duration::days(rng.random_range(10..40))));
        } else if roll < 5 {
            b2b.push(stage("lost", q + Duration::days(rng.random_range(10..40))));
        } else if roll < 6 {
            b2b.push(stage("disqualified", q + Duration::days(rng.random_range(20..45))));
        }
    }
    saas.sort_by_key(|a| a.0);
    b2b.sort_by_key(|a| a.0);
    saas.into_iter().chain(b2b).map(|(_, l)| l).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_showcase_rules_compile_and_its_events_are_in_time_order_per_program() {
        let rules =
            afflio_engine::rules::Rules::parse("showcase.toml", &format!("{}{}", super::RULES, super::partners()))
                .unwrap();
        assert!(rules.program("cloudnote").unwrap().subscriptions.is_some());
        assert!(rules.program("leadgen").unwrap().leads.is_some());
        let events = super::events(42);
        assert_eq!(events, super::events(42), "seeded");
        for p in ["cloudnote", "leadgen"] {
            let times: Vec<String> = events
                .iter()
                .filter(|l| l.contains(&format!("\"program_id\":\"{p}\"")))
                .map(|l| l.split("\"ts\":\"").nth(1).unwrap()[..20].to_string())
                .collect();
            assert!(times.windows(2).all(|w| w[0] <= w[1]), "{p}");
            assert!(times.len() > 100, "{p}: {}", times.len());
        }
    }
}
