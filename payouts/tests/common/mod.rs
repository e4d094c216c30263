//! A world for the queue's tests: rules with an INR program paid by
//! RazorpayX and a USD program paid by PayPal, both fakes on one port, and
//! an engine in memory as the book (the offline store and the live stream
//! are books too; the queue cannot tell them apart).

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Engine, Outcome, PayoutItem, PayoutStatus};
use afflio_payouts::paypal::fake as ppf;
use afflio_payouts::razorpayx::fake as rzf;
use afflio_payouts::sandbox::Sandbox;
use afflio_payouts::{Book, BookError, HttpSettings, Queue};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

pub fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// The engine in memory; every record is applied at once.
pub struct MemoryBook {
    pub engine: Engine,
    pub now: DateTime<Utc>,
    pub rejected: Vec<String>,
}

impl Book for MemoryBook {
    async fn read<R: Send + 'static>(&mut self, f: impl FnOnce(&Engine) -> R + Send + 'static) -> Result<R, BookError> {
        Ok(f(&self.engine))
    }

    async fn record(&mut self, events: Vec<String>) -> Result<(), BookError> {
        for text in events {
            let ev = afflio_ingest::decode_event(&text).map_err(|e| BookError::Internal(format!("{e}: {text}")))?;
            if let Outcome::Rejected(r) =
                self.engine.apply(&ev, &text, Arrival { ts: self.now, origin: &"test", clock: None })
            {
                let detail =
                    self.engine.pending_output().rejections.last().map(|r| r.detail.clone()).unwrap_or_default();
                self.rejected.push(format!("{}: {detail}", r.as_str()));
            }
        }
        drop(self.engine.take_output());
        Ok(())
    }

    async fn event_time(&mut self, _program_id: String) -> Result<DateTime<Utc>, BookError> {
        Ok(self.now)
    }
}

pub fn rules_text(base: &str, paypal_partners: usize, rzp_partners: &[(&str, &str)]) -> String {
    let mut t = format!(
        r#"
[payouts.razorpayx]
base_url = "{base}"
key_id_env = "AFFLIO_T_RZP_KEY"
key_secret_env = "AFFLIO_T_RZP_SECRET"
webhook_secret_env = "AFFLIO_T_RZP_WEBHOOK"
account_number = "{acct}"
tds = "10%"
bank_mode = "IMPS"
[payouts.paypal]
base_url = "{base}"
client_id_env = "AFFLIO_T_PP_ID"
client_secret_env = "AFFLIO_T_PP_SECRET"
webhook_id = "{whid}"

[[programs]]
id = "bharat"
currency = "INR"
rate = "10%"
hold = "1d"
min_payout = "100"
[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
hold = "1d"
"#,
        acct = rzf::ACCOUNT,
        whid = ppf::WEBHOOK_ID
    );
    for (id, dest) in rzp_partners {
        let dest = if dest.contains('@') {
            format!(r#"vpa = "{dest}""#)
        } else {
            format!(r#"account_number = "{dest}", ifsc = "HDFC0001234", name = "Partner {id}""#)
        };
        t.push_str(&format!(
            "[[partners]]\nid = \"{id}\"\nprogram_id = \"bharat\"\npayout = {{ provider = \"razorpayx\", {dest} }}\n[[codes]]\ncode = \"{}\"\npartner_id = \"{id}\"\n",
            id.to_uppercase()
        ));
    }
    for n in 0..paypal_partners {
        t.push_str(&format!(
            "[[partners]]\nid = \"pp{n}\"\nprogram_id = \"acme\"\npayout = {{ provider = \"paypal\", email = \"pp{n}@example.com\" }}\n[[codes]]\ncode = \"PP{n}\"\npartner_id = \"pp{n}\"\n"
        ));
    }
    t
}

/// A running world: fakes, rules, queue and book.
pub struct World {
    pub rt: tokio::runtime::Runtime,
    pub sandbox: Sandbox,
    pub base: String,
    pub rules: Arc<Rules>,
    pub book: MemoryBook,
    pub queue: Queue,
    pub wall: DateTime<Utc>,
    pub text: String,
}

pub fn env() {
    for (k, v) in [
        ("AFFLIO_T_RZP_KEY", rzf::KEY_ID),
        ("AFFLIO_T_RZP_SECRET", rzf::KEY_SECRET),
        ("AFFLIO_T_RZP_WEBHOOK", rzf::WEBHOOK_SECRET),
        ("AFFLIO_T_PP_ID", ppf::CLIENT_ID),
        ("AFFLIO_T_PP_SECRET", ppf::CLIENT_SECRET),
    ] {
        // Every test sets the same values.
        std::env::set_var(k, v);
    }
}

pub fn http() -> HttpSettings {
    HttpSettings { timeout: Duration::from_millis(700), rate_limit_attempts: 3, max_backoff: Duration::from_millis(20) }
}

impl World {
    /// Fakes up, rules for `paypal_partners` PayPal partners and the given
    /// RazorpayX partners (id, UPI address or account number), each with
    /// one captured order of `order` (so commission 10%) approved.
    pub fn new(paypal_partners: usize, rzp_partners: &[(&str, &str)], order: &str) -> World {
        env();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let sandbox = Sandbox::default();
        let addr = rt.block_on(sandbox.start("127.0.0.1:0".parse().unwrap())).unwrap();
        let base = format!("http://{addr}");
        let text = rules_text(&base, paypal_partners, rzp_partners);
        let rules = Arc::new(Rules::parse("world.toml", &text).unwrap());
        let engine = Engine::new(rules.clone());
        let mut book = MemoryBook { engine, now: at("2026-11-01T00:00:00Z"), rejected: Vec::new() };
        let mut events = Vec::new();
        let mut n = 0;
        for (id, _) in rzp_partners {
            n += 1;
            events.push(capture(n, "bharat", "INR", order, &id.to_uppercase()));
        }
        for p in 0..paypal_partners {
            n += 1;
            events.push(capture(n, "acme", "USD", order, &format!("PP{p}")));
        }
        rt.block_on(book.record(events)).unwrap();
        book.now = at("2026-11-03T00:00:00Z");
        let approve = |p: &str| {
            format!(
                r#"{{"type":"review","event_id":"approve-{p}","ts":"2026-11-03T00:00:00Z","program_id":"{p}","decision":"approve","reviewer":"fin"}}"#
            )
        };
        rt.block_on(book.record(vec![approve("bharat"), approve("acme")])).unwrap();
        assert!(book.rejected.is_empty(), "{:?}", book.rejected);
        let queue = Queue::from_env(rules.clone(), http()).unwrap();
        World { rt, sandbox, base, rules, book, queue, wall: at("2026-11-03T00:00:00Z"), text }
    }

    pub fn rzp(&self) -> std::sync::MutexGuard<'_, rzf::State> {
        self.sandbox.razorpayx.lock().unwrap()
    }

    pub fn pp(&self) -> std::sync::MutexGuard<'_, ppf::State> {
        self.sandbox.paypal.lock().unwrap()
    }

    /// Moves the wall clock and both providers' clocks.
    pub fn advance(&mut self, d: chrono::Duration) {
        self.wall += d;
        self.book.now += d;
        self.rzp().advance(d);
        self.pp().advance(d);
    }

    pub fn plan(&mut self, program: &str) -> afflio_payouts::Plan {
        self.rt.block_on(self.queue.plan(&mut self.book, program, None)).unwrap()
    }

    pub fn send(&mut self, program: &str, batch: Option<&str>) -> afflio_payouts::Report {
        self.rt.block_on(self.queue.send(&mut self.book, program, batch, self.wall)).unwrap()
    }

    pub fn sync(&mut self, program: &str) -> afflio_payouts::Report {
        self.rt.block_on(self.queue.sync(&mut self.book, program, self.wall)).unwrap()
    }

    pub fn items(&self, program: &str) -> Vec<PayoutItem> {
        self.book.engine.payout_items(program)
    }

    pub fn statuses(&self, program: &str) -> Vec<(String, PayoutStatus)> {
        self.items(program).into_iter().map(|i| (i.partner_id, i.state.status)).collect()
    }

    /// Replaces the rules (a partner's account changed).
    pub fn set_rules(&mut self, text: &str) {
        let rules = Arc::new(Rules::parse("world.toml", text).unwrap());
        self.book.engine.set_rules(rules.clone());
        self.queue = Queue::from_env(rules.clone(), http()).unwrap();
        self.rules = rules;
    }

    /// Delivers RazorpayX's queued webhooks (in the given order of indexes).
    pub fn deliver_rzp(&mut self, order: &[usize]) -> afflio_payouts::Report {
        let hooks = std::mem::take(&mut self.rzp().webhooks);
        let mut total = afflio_payouts::Report::default();
        for i in order {
            let (body, sig) = &hooks[*i];
            let mut h = http::HeaderMap::new();
            h.insert("x-razorpay-signature", sig.parse().unwrap());
            let r = self.rt.block_on(self.queue.webhook(&mut self.book, "razorpayx", h, body.clone())).unwrap();
            merge(&mut total, r);
        }
        total
    }

    pub fn deliver_pp(&mut self, order: &[usize]) -> afflio_payouts::Report {
        let hooks = std::mem::take(&mut self.pp().webhooks);
        let mut total = afflio_payouts::Report::default();
        for i in order {
            let (body, headers) = &hooks[*i];
            let mut h = http::HeaderMap::new();
            for (k, v) in headers {
                h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
            }
            let r = self.rt.block_on(self.queue.webhook(&mut self.book, "paypal", h, body.clone())).unwrap();
            merge(&mut total, r);
        }
        total
    }

    /// The money identities of every partner of `program`: what was
    /// approved equals what is available, in flight and paid; nothing is
    /// negative that should not be.
    pub fn assert_balances(&self, program: &str) {
        for b in self.book.engine.balances(program, self.book.now) {
            assert!(b.in_flight >= Decimal::ZERO && b.paid >= Decimal::ZERO, "{b:?}");
            let items = self.items(program);
            let in_flight: Decimal = items
                .iter()
                .filter(|i| *i.partner_id == *b.partner_id)
                .filter(|i| {
                    matches!(i.state.status, PayoutStatus::Planned | PayoutStatus::Sent | PayoutStatus::Unknown)
                })
                .map(|i| i.state.amount)
                .sum();
            let paid: Decimal = items
                .iter()
                .filter(|i| *i.partner_id == *b.partner_id && i.state.status == PayoutStatus::Paid)
                .map(|i| i.state.amount)
                .sum();
            assert_eq!(b.in_flight, in_flight, "in flight of {}", b.partner_id);
            assert_eq!(b.paid, paid, "paid of {}", b.partner_id);
        }
    }
}

fn merge(total: &mut afflio_payouts::Report, r: afflio_payouts::Report) {
    total.sent += r.sent;
    total.paid += r.paid;
    total.failed += r.failed;
    total.reversed += r.reversed;
    total.unknown.extend(r.unknown);
    total.notices.extend(r.notices);
    total.ignored.extend(r.ignored);
}

pub fn capture(n: usize, program: &str, currency: &str, amount: &str, code: &str) -> String {
    format!(
        r#"{{"type":"capture","event_id":"c{n}","ts":"2026-11-01T10:00:{:02}Z","program_id":"{program}","order_id":"o{n}","amount":"{amount}","currency":"{currency}","codes":["{code}"]}}"#,
        n % 60
    )
}
