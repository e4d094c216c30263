//! Shared inputs for Afflio's criterion benchmarks (`cargo bench -p afflio-benches`).

use afflio_engine::rules::Rules;

/// A program with a three-tier chain, links and a code.
pub const RULES: &str = r#"
[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
overrides = ["2%", "1%"]
[programs.category_rates]
electronics = "4%"
[[partners]]
id = "network"
program_id = "acme"
[[partners]]
id = "agency"
program_id = "acme"
parent = "network"
[[partners]]
id = "alice"
program_id = "acme"
parent = "agency"
rate = "15%"
[[links]]
id = "alice-summer"
partner_id = "alice"
[[codes]]
code = "ALICE10"
partner_id = "alice"
"#;

pub fn rules() -> Rules {
    Rules::parse("bench.toml", RULES).expect("bench rules are valid")
}

/// A click line for visitor `v` at second `s` of the day.
pub fn click_line(i: u64, v: u64, s: u64) -> String {
    format!(
        r#"{{"type":"click","event_id":"clk-{i}","ts":"2026-11-10T{:02}:{:02}:{:02}Z","program_id":"acme","link_id":"alice-summer","visitor_id":"v{v}","ip":"10.0.0.1","user_agent":"Mozilla/5.0"}}"#,
        s / 3600 % 24,
        s / 60 % 60,
        s % 60
    )
}

/// A capture line for order `o` by visitor `v` at second `s` of the day.
pub fn capture_line(i: u64, o: u64, v: u64, s: u64) -> String {
    format!(
        r#"{{"type":"capture","event_id":"cap-{i}","ts":"2026-11-10T{:02}:{:02}:{:02}Z","program_id":"acme","order_id":"o{o}","amount":"129.99","currency":"USD","visitor_id":"v{v}","customer":{{"id":"c{v}"}}}}"#,
        s / 3600 % 24,
        s / 60 % 60,
        s % 60
    )
}

/// The demo's mix: about nine clicks for every capture.
pub fn mixed_lines(n: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            let s = i * 86_399 / n.max(1);
            if i % 10 == 9 {
                capture_line(i, i, i - 1, s)
            } else {
                click_line(i, i, s)
            }
        })
        .collect()
}

/// A refund line for order `o` at second `s` of the day.
pub fn refund_line(i: u64, o: u64, s: u64) -> String {
    format!(
        r#"{{"type":"refund","event_id":"ref-{i}","ts":"2026-11-10T{:02}:{:02}:{:02}Z","program_id":"acme","order_id":"o{o}","amount":"40.00","currency":"USD"}}"#,
        s / 3600 % 24,
        s / 60 % 60,
        s % 60
    )
}
