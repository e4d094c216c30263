//! The fraud lab: a labelled traffic generator (`afflio gen`) and the
//! evaluation of the detectors against it (`afflio eval`).
//!
//! Normal traffic: one program, creators with a Zipf-like size spread, daily
//! seasonality (a trough at night, a peak in the afternoon, noise per hour),
//! orders through link clicks or codes (most code users clicked the creator's
//! link first; some typed the code they saw in a video), browsing clicks
//! that never convert, repeat customers now and then, ordinary refunds.
//!
//! Injected attacks, each with the orders it consists of in the labels:
//! `self_referral`, `coupon_stacking`, `conversion_spike` (a creator's
//! link suddenly converting many times its usual rate for an hour),
//! `coupon_leak` (a code posted on a coupon site: redemptions with no click),
//! `velocity` (one customer, e-mail and IP ordering again and again),
//! `fast_conversion` (scripted checkouts seconds after the click) and
//! `refund_rate` (a creator whose sales are mostly returned).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Engine, Flag};
use afflio_ingest::decode_event;
use chrono::{DateTime, Duration, TimeZone, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The attack kinds, named as the rules that should catch them.
pub const ATTACKS: [&str; 7] = [
    "self_referral",
    "coupon_stacking",
    "conversion_spike",
    "coupon_leak",
    "velocity",
    "fast_conversion",
    "refund_rate",
];

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenOptions {
    pub seed: u64,
    pub days: u32,
    /// Average orders per day of normal traffic.
    pub orders_per_day: u32,
    pub creators: usize,
    /// Inject attacks (and label them).
    pub fraud: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions { seed: 1, days: 7, orders_per_day: 8_000, creators: 200, fraud: true }
    }
}

/// One attacked order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub order_id: String,
    pub attack: &'static str,
    /// The attack instance (several orders belong to one).
    pub attack_id: String,
    pub ts: DateTime<Utc>,
}

/// Generated traffic: the rules, the events in time order, the labels.
pub struct Generated {
    pub rules: String,
    pub events: Vec<String>,
    pub labels: Vec<Label>,
}

const PROGRAM: &str = "shop";

struct Creator {
    id: String,
    links: Vec<String>,
    code: String,
}

struct Gen {
    rng: SmallRng,
    creators: Vec<Creator>,
    cumulative: Vec<f64>,
    events: Vec<(i64, u64, String)>,
    labels: Vec<Label>,
    n: u64,
}

fn ts_text(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// How one order is made.
struct OrderSpec<'a> {
    ts: DateTime<Utc>,
    creator: usize,
    /// Click the creator's link this long before the capture (None: no click).
    click_before: Option<Duration>,
    codes: Vec<&'a str>,
    customer: Option<(String, String)>,
    ip: String,
}

impl Gen {
    fn next(&mut self) -> u64 {
        self.n += 1;
        self.n
    }

    fn push(&mut self, ts: DateTime<Utc>, json: String) {
        let seq = self.next();
        self.events.push((ts.timestamp_micros(), seq, json));
    }

    fn pick_creator(&mut self) -> usize {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let x = self.rng.random::<f64>() * total;
        self.cumulative.partition_point(|c| *c < x).min(self.creators.len() - 1)
    }

    fn ip(&mut self) -> String {
        format!(
            "{}.{}.{}.{}",
            self.rng.random_range(11..223),
            self.rng.random_range(0..256),
            self.rng.random_range(0..256),
            self.rng.random_range(1..255)
        )
    }

    fn customer(&mut self) -> (String, String) {
        // A large pool: a customer orders again now and then, rarely within hours.
        let c = self.rng.random_range(0..2_000_000u64);
        (format!("cust-{c}"), format!("{:064x}", u128::from(c).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)))
    }

    fn click(&mut self, ts: DateTime<Utc>, link: &str, visitor: &str) {
        let id = self.next();
        let ip = self.ip();
        let json = format!(
            r#"{{"type":"click","event_id":"k{id}","ts":"{}","program_id":"{PROGRAM}","link_id":"{link}","visitor_id":"{visitor}","ip":"{ip}"}}"#,
            ts_text(ts)
        );
        self.push(ts, json);
    }

    /// Emits the order's click (if any) and capture; returns its id and
    /// amount in cents.
    fn order(&mut self, o: &OrderSpec<'_>) -> (String, u64) {
        let n = self.next();
        let order_id = format!("o{n}");
        let visitor = format!("v{n}");
        if let Some(before) = o.click_before {
            let links = &self.creators[o.creator].links;
            let link = links[self.rng.random_range(0..links.len())].clone();
            self.click(o.ts - before, &link, &visitor);
        }
        let cents: u64 = self.rng.random_range(1_500..40_000);
        let codes = o.codes.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(",");
        let customer = match &o.customer {
            Some((id, email)) => format!(r#","customer":{{"id":"{id}","email_sha256":"{email}"}}"#),
            None => String::new(),
        };
        let json = format!(
            r#"{{"type":"capture","event_id":"c{n}","ts":"{}","program_id":"{PROGRAM}","order_id":"{order_id}","amount":"{}.{:02}","currency":"USD","visitor_id":"{visitor}","codes":[{codes}]{customer},"ip":"{}"}}"#,
            ts_text(o.ts),
            cents / 100,
            cents % 100,
            o.ip
        );
        self.push(o.ts, json);
        (order_id, cents)
    }

    fn refund(&mut self, ts: DateTime<Utc>, order_id: &str, cents: u64) {
        let n = self.next();
        let json = format!(
            r#"{{"type":"refund","event_id":"r{n}","ts":"{}","program_id":"{PROGRAM}","order_id":"{order_id}","amount":"{}.{:02}","currency":"USD"}}"#,
            ts_text(ts),
            cents / 100,
            cents % 100
        );
        self.push(ts, json);
    }

    /// An ordinary order at `ts`.
    fn normal(&mut self, ts: DateTime<Utc>) {
        let c = self.pick_creator();
        let code = self.creators[c].code.clone();
        let by_code = self.rng.random_bool(0.3);
        // Followers usually click before typing the code; a quarter saw it in a video.
        let clicked = !by_code || self.rng.random_bool(0.75);
        let click_before = clicked.then(|| Duration::seconds(self.rng.random_range(60..2 * 24 * 3600)));
        let customer = self.rng.random_bool(0.8).then(|| self.customer());
        let ip = self.ip();
        let codes = if by_code { vec![code.as_str()] } else { vec![] };
        let (order_id, cents) = self.order(&OrderSpec { ts, creator: c, click_before, codes, customer, ip });
        // Ordinary returns: 6% of orders, within two weeks, in full or in part.
        if self.rng.random_bool(0.06) {
            let later = ts + Duration::minutes(self.rng.random_range(60..14 * 24 * 60));
            let part = if self.rng.random_bool(0.5) { cents } else { cents / 2 };
            self.refund(later, &order_id, part);
        }
        // Browsing that does not convert: two clicks on any creator's links.
        for _ in 0..2 {
            let other = self.pick_creator();
            let links = &self.creators[other].links;
            let link = links[self.rng.random_range(0..links.len())].clone();
            let back = Duration::seconds(self.rng.random_range(0..3 * 24 * 3600));
            let v = format!("b{}", self.next());
            self.click(ts - back, &link, &v);
        }
    }

    fn label(&mut self, order_id: String, attack: &'static str, attack_id: &str, ts: DateTime<Utc>) {
        self.labels.push(Label { order_id, attack, attack_id: attack_id.to_string(), ts });
    }
}

/// Seasonality: orders per hour relative to the daily mean (trough 04:00, peak 16:00).
fn season(hour_of_day: u32) -> f64 {
    let x = (f64::from(hour_of_day) - 4.0) / 24.0 * std::f64::consts::TAU;
    0.25 + 1.5 * (1.0 - x.cos()) / 2.0
}

fn rules_text(creators: &[Creator]) -> String {
    let mut t = String::from(
        "# Generated by `afflio gen`: one program, every fraud rule on and holding.\n\
         [[programs]]\nid = \"shop\"\ncurrency = \"USD\"\nrate = \"10%\"\nhold = \"30d\"\n\
         [programs.attribution]\nwindow = \"7d\"\n\
         [programs.fraud.self_referral]\naction = \"hold\"\n\
         [programs.fraud.coupon_stacking]\naction = \"hold\"\n\
         [programs.fraud.conversion_spike]\naction = \"hold\"\nbucket = \"1h\"\nmin_orders = 10\nthreshold = 4.0\nwarmup_buckets = 24\n\
         [programs.fraud.coupon_leak]\naction = \"hold\"\nmin_orders = 20\nmax_share = 0.8\n\
         [programs.fraud.velocity]\naction = \"hold\"\nmax_orders = 5\nwindow = \"1h\"\n\
         [programs.fraud.fast_conversion]\naction = \"hold\"\nmin_seconds = 5\n\
         [programs.fraud.refund_rate]\naction = \"hold\"\nmin_orders = 20\nmax_share = 0.3\nwindow = \"3d\"\n\n",
    );
    for c in creators {
        let _ =
            writeln!(t, "[[partners]]\nid = \"{}\"\nprogram_id = \"shop\"\ncustomer_ids = [\"self-{}\"]\n", c.id, c.id);
        for l in &c.links {
            let _ = writeln!(t, "[[links]]\nid = \"{l}\"\npartner_id = \"{}\"\n", c.id);
        }
        let _ = writeln!(t, "[[codes]]\ncode = \"{}\"\npartner_id = \"{}\"\n", c.code, c.id);
    }
    t
}

/// The same rules with every fraud rule off (the throughput baseline).
pub fn without_fraud(rules: &str) -> String {
    rules.replace("action = \"hold\"", "action = \"off\"")
}

/// Generates traffic (and attacks, when `o.fraud`) from `o.seed`.
pub fn generate(o: &GenOptions) -> Generated {
    let mut rng = SmallRng::seed_from_u64(o.seed);
    let creators: Vec<Creator> = (0..o.creators.max(10))
        .map(|i| {
            let id = format!("cr{i:04}");
            let links = (0..1 + i % 2).map(|l| format!("{id}-l{l}")).collect();
            let code = format!("CR{i:04}X");
            Creator { id, links, code }
        })
        .collect();
    let mut cumulative = Vec::with_capacity(creators.len());
    let mut sum = 0.0;
    for i in 0..creators.len() {
        sum += 1.0 / ((i + 1) as f64).powf(0.8);
        cumulative.push(sum);
    }
    let start = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).single().expect("a valid time");
    let rules = rules_text(&creators);
    let mut g = Gen {
        rng: SmallRng::seed_from_u64(rng.random()),
        creators,
        cumulative,
        events: Vec::new(),
        labels: Vec::new(),
        n: 0,
    };
    let hours = o.days.max(2) * 24;
    for h in 0..hours {
        let mean = f64::from(o.orders_per_day) / 24.0 * season(h % 24);
        let noise = 1.0 + (g.rng.random::<f64>() - 0.5) * 0.2;
        let n = (mean * noise).round() as u64;
        for _ in 0..n {
            let ts = start + Duration::hours(i64::from(h)) + Duration::milliseconds(g.rng.random_range(0..3_600_000));
            g.normal(ts);
        }
    }
    if o.fraud {
        inject(&mut g, start, hours);
    }
    let mut events = std::mem::take(&mut g.events);
    events.sort_by_key(|(ts, seq, _)| (*ts, *seq));
    Generated { rules, events: events.into_iter().map(|(_, _, e)| e).collect(), labels: g.labels }
}

fn inject(g: &mut Gen, start: DateTime<Utc>, hours: u32) {
    // Attacks start after a day and a half (the baselines' warm-up) and end
    // six hours before the traffic does.
    let window = |g: &mut Gen| {
        let h = g.rng.random_range(36..hours.saturating_sub(6).max(37));
        start + Duration::hours(i64::from(h)) + Duration::minutes(g.rng.random_range(0..60))
    };
    let n_creators = g.creators.len();
    // self_referral: creators buying through their own links as themselves.
    for k in 0..15 {
        let ts = window(g);
        let c = g.rng.random_range(0..n_creators);
        let me = format!("self-{}", g.creators[c].id);
        let ip = g.ip();
        let (id, _) = g.order(&OrderSpec {
            ts,
            creator: c,
            click_before: Some(Duration::minutes(10)),
            codes: vec![],
            customer: Some((me, format!("{:064x}", k + 1))),
            ip,
        });
        g.label(id, "self_referral", &format!("self-{k}"), ts);
    }
    // coupon_stacking: two creators' codes on one order.
    for k in 0..15 {
        let ts = window(g);
        let a = g.rng.random_range(0..n_creators);
        let b = (a + 1 + g.rng.random_range(0..n_creators - 1)) % n_creators;
        let (ca, cb) = (g.creators[a].code.clone(), g.creators[b].code.clone());
        let customer = Some(g.customer());
        let ip = g.ip();
        let (id, _) = g.order(&OrderSpec { ts, creator: a, click_before: None, codes: vec![&ca, &cb], customer, ip });
        g.label(id, "coupon_stacking", &format!("stack-{k}"), ts);
    }
    // conversion_spike: a mid-sized creator's link converts ~60 extra orders in an hour.
    for k in 0..4 {
        let t0 = window(g);
        let c = g.rng.random_range(5..60.min(n_creators));
        let n = g.rng.random_range(50..80);
        let mut first = None;
        let mut offsets: Vec<i64> = (0..n).map(|_| g.rng.random_range(0..3_600_000)).collect();
        offsets.sort_unstable();
        for off in offsets {
            let ts = t0 + Duration::milliseconds(off);
            let before = Duration::seconds(g.rng.random_range(30..600));
            let customer = Some(g.customer());
            let ip = g.ip();
            let (id, _) =
                g.order(&OrderSpec { ts, creator: c, click_before: Some(before), codes: vec![], customer, ip });
            let start = *first.get_or_insert(ts);
            g.label(id, "conversion_spike", &format!("spike-{k}"), start);
        }
    }
    // coupon_leak: a code on a coupon site: ~30 redemptions an hour for 3 hours, no clicks.
    for k in 0..3 {
        let t0 = window(g);
        let c = g.rng.random_range(0..40.min(n_creators));
        let code = g.creators[c].code.clone();
        let n = g.rng.random_range(80..100);
        let mut offsets: Vec<i64> = (0..n).map(|_| g.rng.random_range(0..3 * 3_600_000)).collect();
        offsets.sort_unstable();
        let mut first = None;
        for off in offsets {
            let ts = t0 + Duration::milliseconds(off);
            let customer = Some(g.customer());
            let ip = g.ip();
            let (id, _) = g.order(&OrderSpec { ts, creator: c, click_before: None, codes: vec![&code], customer, ip });
            let start = *first.get_or_insert(ts);
            g.label(id, "coupon_leak", &format!("leak-{k}"), start);
        }
    }
    // velocity: one customer, e-mail and IP ordering 8-12 times in 40 minutes.
    for k in 0..8u64 {
        let t0 = window(g);
        let customer = Some((format!("mule-{k}"), format!("{:064x}", 0xdead_0000_u64 + k)));
        let ip = g.ip();
        let n = g.rng.random_range(8..=12);
        for i in 0..n {
            let ts = t0 + Duration::minutes(i64::from(i) * 40 / i64::from(n));
            let c = g.pick_creator();
            let code = g.creators[c].code.clone();
            let (id, _) = g.order(&OrderSpec {
                ts,
                creator: c,
                click_before: None,
                codes: vec![&code],
                customer: customer.clone(),
                ip: ip.clone(),
            });
            g.label(id, "velocity", &format!("velocity-{k}"), t0);
        }
    }
    // fast_conversion: scripted checkouts 1-3 s after the click.
    for k in 0..20 {
        let ts = window(g);
        let c = g.pick_creator();
        let customer = Some(g.customer());
        let ip = g.ip();
        let before = Duration::milliseconds(g.rng.random_range(1_000..3_000));
        let (id, _) = g.order(&OrderSpec { ts, creator: c, click_before: Some(before), codes: vec![], customer, ip });
        g.label(id, "fast_conversion", &format!("fast-{k}"), ts);
    }
    // refund_rate: a creator whose own sales (24 a day, through its link) are
    // nine times in ten returned in full within three days.
    {
        let c = g.rng.random_range(60..100.min(n_creators).max(61)).min(n_creators - 1);
        let t0 = start + Duration::hours(36);
        let end = start + Duration::hours(i64::from(hours) - 6);
        let mut ts = t0;
        while ts < end {
            let customer = Some(g.customer());
            let ip = g.ip();
            let spec =
                OrderSpec { ts, creator: c, click_before: Some(Duration::minutes(20)), codes: vec![], customer, ip };
            let (id, cents) = g.order(&spec);
            if g.rng.random_bool(0.9) {
                let later = ts + Duration::hours(g.rng.random_range(6..72));
                g.refund(later, &id, cents);
            }
            g.label(id, "refund_rate", "refunds-0", t0);
            ts += Duration::minutes(60);
        }
    }
}

/// Per rule: what the detectors found against the labels.
#[derive(Clone, Debug, Default)]
pub struct RuleScore {
    pub attacks: usize,
    pub attacked_orders: usize,
    pub flagged: usize,
    /// Flagged orders that belong to an attack of this rule's kind.
    pub caught: usize,
    /// Flagged orders that belong to no attack at all.
    pub legit_flagged: usize,
    /// Flagged orders that belong to another kind of attack.
    pub other_attack_flagged: usize,
    /// Per attack instance, seconds from its start to its first flag by this rule.
    pub delays: Vec<f64>,
    /// Attack instances never flagged by this rule.
    pub missed_attacks: usize,
}

impl RuleScore {
    /// Flagged orders that are attacks (of any kind) / flagged orders.
    pub fn precision(&self) -> f64 {
        if self.flagged == 0 {
            1.0
        } else {
            (self.flagged - self.legit_flagged) as f64 / self.flagged as f64
        }
    }

    /// Attacked orders of this kind flagged by this rule / attacked orders of this kind.
    pub fn recall(&self) -> f64 {
        if self.attacked_orders == 0 {
            1.0
        } else {
            self.caught as f64 / self.attacked_orders as f64
        }
    }
}

/// One seed's evaluation.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub seed: u64,
    pub events: usize,
    pub orders: usize,
    pub scores: BTreeMap<&'static str, RuleScore>,
    /// Decode + apply, events per second, with every rule on and with none.
    pub events_per_sec_on: f64,
    pub events_per_sec_off: f64,
}

/// Decodes and applies `events` with `rules`; returns the flags and the rate.
fn run_engine(rules: &str, events: &[String]) -> anyhow::Result<(Vec<Flag>, usize, f64)> {
    let rules = Rules::parse("generated rules", rules)?;
    let mut engine = Engine::new(Arc::new(rules));
    let mut flags = Vec::new();
    let now = Utc::now();
    let started = Instant::now();
    for (i, text) in events.iter().enumerate() {
        let ev = decode_event(text).map_err(|e| anyhow::anyhow!("generated event {i} does not decode: {e}"))?;
        engine.apply(&ev, text, Arrival { ts: now, origin: &"generated", clock: None });
        if engine.pending_output().len() >= 65_536 {
            flags.extend(engine.take_output().flags);
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    flags.extend(engine.take_output().flags);
    let s = engine.stats();
    if s.rejections() > 0 {
        anyhow::bail!("internal error: {} generated events were rejected: {:?}", s.rejections(), s.rejected);
    }
    let orders = (s.orders_by_link + s.orders_by_code + s.orders_unattributed) as usize;
    Ok((flags, orders, events.len() as f64 / secs))
}

/// Scores the flags against the labels.
pub fn score(flags: &[Flag], labels: &[Label]) -> BTreeMap<&'static str, RuleScore> {
    let by_order: HashMap<&str, &Label> = labels.iter().map(|l| (l.order_id.as_str(), l)).collect();
    let mut scores: BTreeMap<&'static str, RuleScore> = ATTACKS.iter().map(|a| (*a, RuleScore::default())).collect();
    let mut instances: HashMap<&str, HashSet<&str>> = HashMap::new();
    for l in labels {
        let s = scores.get_mut(l.attack).expect("every label is a known attack");
        s.attacked_orders += 1;
        instances.entry(l.attack).or_default().insert(&l.attack_id);
    }
    for (a, ids) in &instances {
        if let Some(s) = scores.get_mut(a) {
            s.attacks = ids.len();
        }
    }
    let mut first_flag: HashMap<(&str, &str), DateTime<Utc>> = HashMap::new();
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    for f in flags {
        let rule = f.rule.as_str();
        let Some(s) = scores.get_mut(rule) else { continue };
        if !seen.insert((rule, f.order_id.as_str())) {
            continue;
        }
        s.flagged += 1;
        match by_order.get(f.order_id.as_str()) {
            None => s.legit_flagged += 1,
            Some(l) if l.attack == rule => {
                s.caught += 1;
                let e = first_flag.entry((rule, l.attack_id.as_str())).or_insert(f.ts);
                *e = (*e).min(f.ts);
            }
            Some(_) => s.other_attack_flagged += 1,
        }
    }
    let starts: HashMap<&str, DateTime<Utc>> = labels.iter().map(|l| (l.attack_id.as_str(), l.ts)).collect();
    for (a, ids) in &instances {
        let s = scores.get_mut(a).expect("known attack");
        for id in ids {
            match first_flag.get(&(*a, *id)) {
                Some(t) => s.delays.push((*t - starts[id]).num_milliseconds() as f64 / 1000.0),
                None => s.missed_attacks += 1,
            }
        }
        s.delays.sort_by(f64::total_cmp);
    }
    scores
}

/// Generates traffic for `o.seed`, runs the engine with every rule on and
/// scores the flags; with `throughput`, also measures the engine with every
/// rule on and off (best of three runs each, alternating).
pub fn evaluate(o: &GenOptions, throughput: bool) -> anyhow::Result<Evaluation> {
    let g = generate(o);
    let (flags, orders, mut on) = run_engine(&g.rules, &g.events)?;
    let mut off = 0.0;
    if throughput {
        let off_rules = without_fraud(&g.rules);
        for _ in 0..3 {
            let (off_flags, _, r) = run_engine(&off_rules, &g.events)?;
            anyhow::ensure!(off_flags.is_empty(), "internal error: flags with every rule off");
            off = f64::max(off, r);
            on = f64::max(on, run_engine(&g.rules, &g.events)?.2);
        }
    }
    Ok(Evaluation {
        seed: o.seed,
        events: g.events.len(),
        orders,
        scores: score(&flags, &g.labels),
        events_per_sec_on: on,
        events_per_sec_off: off,
    })
}

fn median(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v[v.len() / 2])
}

fn fmt_secs(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.1}m", s / 60.0),
        Some(s) => format!("{:.1}h", s / 3600.0),
    }
}

/// The evaluation table over several seeds: per rule the totals, the
/// worst precision and recall of any seed, and detection delays.
pub fn report(evals: &[Evaluation]) -> String {
    let mut t = String::new();
    let seeds: Vec<String> = evals.iter().map(|e| e.seed.to_string()).collect();
    let _ = writeln!(
        t,
        "seeds {} | events {} | orders {}",
        seeds.join(","),
        evals.iter().map(|e| e.events).sum::<usize>(),
        evals.iter().map(|e| e.orders).sum::<usize>()
    );
    let _ = writeln!(
        t,
        "| rule | attacks | attacked orders | flagged | on legit orders | precision (min/seed) | recall (min/seed) | missed attacks | delay p50 | delay max |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for rule in ATTACKS {
        let per: Vec<&RuleScore> = evals.iter().filter_map(|e| e.scores.get(rule)).collect();
        let sum = |f: fn(&RuleScore) -> usize| per.iter().map(|s| f(s)).sum::<usize>();
        let all = RuleScore {
            attacks: sum(|s| s.attacks),
            attacked_orders: sum(|s| s.attacked_orders),
            flagged: sum(|s| s.flagged),
            caught: sum(|s| s.caught),
            legit_flagged: sum(|s| s.legit_flagged),
            other_attack_flagged: sum(|s| s.other_attack_flagged),
            delays: {
                let mut d: Vec<f64> = per.iter().flat_map(|s| s.delays.iter().copied()).collect();
                d.sort_by(f64::total_cmp);
                d
            },
            missed_attacks: sum(|s| s.missed_attacks),
        };
        let min_p = per.iter().map(|s| s.precision()).fold(f64::INFINITY, f64::min);
        let min_r = per.iter().map(|s| s.recall()).fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            t,
            "| {rule} | {} | {} | {} | {} | {:.3} ({:.3}) | {:.3} ({:.3}) | {} | {} | {} |",
            all.attacks,
            all.attacked_orders,
            all.flagged,
            all.legit_flagged,
            all.precision(),
            min_p,
            all.recall(),
            min_r,
            all.missed_attacks,
            fmt_secs(median(&all.delays)),
            fmt_secs(all.delays.last().copied())
        );
    }
    let on: f64 = evals.iter().map(|e| e.events_per_sec_on).sum::<f64>() / evals.len().max(1) as f64;
    let off: f64 = evals.iter().map(|e| e.events_per_sec_off).sum::<f64>() / evals.len().max(1) as f64;
    let _ = writeln!(
        t,
        "\nengine throughput (decode + apply, one core, mean over seeds): every rule on {:.0} events/s, every rule off {:.0} events/s: cost {:.1}%",
        on,
        off,
        (1.0 - on / off) * 100.0
    );
    t
}

/// Writes the labels as CSV.
pub fn labels_csv(labels: &[Label]) -> String {
    let mut t = String::from("order_id,attack,attack_id,attack_start\n");
    for l in labels {
        let _ = writeln!(t, "{},{},{},{}", l.order_id, l.attack, l.attack_id, ts_text(l.ts));
    }
    t
}
