//! The engine: a deterministic state machine from events to effects.

use std::borrow::Cow;
use std::sync::Arc;

use afflio_rules::{normalize_code, AttributionModel, FraudAction, Program, Rules};
use chrono::{DateTime, TimeDelta, Utc};
use hashbrown::HashMap;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::dedupe::{Check, Dedupe};
use crate::event::{fingerprint, Body, Capture, Click, Decision, Event, Item, Refund, ReviewEvent};
use crate::fraud::{Hit, KeyKind, LeakWindow, RefundWindow, Spike, SpikeParams, Velocity};
use crate::money::{check_amount, round_money};
use crate::output::{
    Arrival, AttributionKind, DecisionRow, EntryKind, Flag, FraudRule, LedgerEntry, Outcome, Output, Reason, Rejection,
    Stats,
};
use crate::sessions::{id_key, Sessions};
use crate::state::{ClosedOrder, CodeIssue, Credit, Line, LineStatus, Order, Review};

mod payouts;
pub use payouts::{ItemState, PayoutItem};

/// A flag about to be recorded on one or more orders.
struct FlagSpec {
    rule: FraudRule,
    action: FraudAction,
    value: f64,
    threshold: f64,
    score: f64,
    detail: String,
}

/// Why an event is refused, found before anything was changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: Reason,
    /// The field at fault.
    pub field: &'static str,
    pub detail: String,
}

type Reject = Invalid;

fn reject(reason: Reason, field: &'static str, detail: String) -> Reject {
    Invalid { reason, field, detail }
}

/// The checks that need the rules but no state: known program, known link
/// of that program, currency, amounts, items. Ingest runs them to answer a
/// client at once; the engine runs them again when it applies the event.
/// Returns the event's program.
pub fn check_event<'r>(rules: &'r Rules, e: &Event<'_>) -> Result<&'r Program, Invalid> {
    let program = check_program(rules, e)?;
    match &e.body {
        Body::Click(c) => {
            check_link(rules, program, &c.link_id)?;
        }
        Body::Capture(c) => check_money(program, &c.currency, c.amount, &c.items)?,
        Body::Refund(r) => check_money(program, &r.currency, r.amount, &r.items)?,
        Body::Review(_) | Body::Payout(_) => {}
    }
    Ok(program)
}

fn check_program<'r>(rules: &'r Rules, e: &Event<'_>) -> Result<&'r Program, Invalid> {
    rules.program(&e.program_id).map(|p| &**p).ok_or_else(|| {
        reject(
            Reason::UnknownProgram,
            "program_id",
            format!("program_id {:?} names no configured program", e.program_id),
        )
    })
}

fn check_link<'r>(rules: &'r Rules, program: &Program, link_id: &str) -> Result<&'r afflio_rules::Link, Invalid> {
    let Some(link) = rules.link(link_id) else {
        return Err(reject(Reason::UnknownLink, "link_id", format!("link_id {link_id:?} names no configured link")));
    };
    if link.program_id != program.id {
        return Err(reject(
            Reason::UnknownLink,
            "link_id",
            format!("link_id {link_id:?} belongs to program {:?}, not {:?}", link.program_id, program.id),
        ));
    }
    Ok(link)
}

/// Interned names (programs, partners, links): small, bounded by the rules.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Names {
    index: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

impl Names {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(i) = self.index.get(s) {
            return *i;
        }
        let a: Arc<str> = s.into();
        let i = self.names.len() as u32;
        self.names.push(a.clone());
        self.index.insert(a, i);
        i
    }

    fn get(&self, s: &str) -> Option<u32> {
        self.index.get(s).copied()
    }

    fn name(&self, i: u32) -> &Arc<str> {
        &self.names[i as usize]
    }
}

/// Turns events into ledger entries, order and line state, flags and
/// rejections. Does no I/O and reads no clock: the same events in the same
/// order always give the same effects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Engine {
    #[serde(skip, default = "no_rules")]
    rules: Arc<Rules>,
    dedupe: Dedupe,
    sessions: Sessions,
    names: Names,
    /// Link id -> interned click target, under the current rules (cleared
    /// when they change).
    #[serde(skip)]
    link_targets: HashMap<Box<str>, (u32, Box<str>)>,
    orders: Vec<Order>,
    /// (program, order id) -> index in `orders`.
    order_index: HashMap<u32, HashMap<Box<str>, u32>>,
    /// (program, normalised code) -> orders credited through it.
    code_uses: HashMap<u32, HashMap<Box<str>, u64>>,
    /// (program, customer id / e-mail hash / IP) -> recent order times, for velocity.
    #[serde(default)]
    velocity: HashMap<u32, Velocity>,
    /// (program, normalised code) -> (redemptions, redemptions with no click
    /// from the code's partner), for coupon_leak. Bounded by the codes.
    #[serde(default)]
    leak: HashMap<u32, HashMap<Box<str>, LeakWindow>>,
    /// program -> orders per bucket and each partner's baseline, for
    /// conversion_spike. Bounded by the partners and [`crate::fraud::SPIKE_BUCKETS`].
    spike: HashMap<u32, Spike>,
    /// program -> partner -> paid, in flight, closed approved net, payout
    /// items. Bounded by the partners and the batches.
    balances: HashMap<u32, HashMap<Box<str>, payouts::PartnerBalance>>,
    /// (program, partner) -> (orders, captured, refunded) of the orders it
    /// was credited with, for refund_rate. Bounded by the partners.
    #[serde(default)]
    refunds_by_partner: HashMap<u32, HashMap<Box<str>, RefundWindow>>,
    seq: u64,
    watermark: Option<i64>,
    next_sweep: i64,
    next_session_sweep: i64,
    stats: Stats,
    #[serde(skip)]
    out: Output,
}

fn no_rules() -> Arc<Rules> {
    Arc::new(Rules::parse("(none)", "").expect("empty rules are valid"))
}

/// Why a checkpoint could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A bug in the caller: output must be taken (and made durable) first.
    #[error("internal error: checkpoint with {0} output rows not taken")]
    PendingOutput(usize),
    /// The bytes are not a checkpoint of this version (external: a corrupt or foreign file).
    #[error("not an Afflio engine checkpoint (or a different version)")]
    Format,
    #[error("checkpoint encoding: {0}")]
    Encoding(#[from] postcard::Error),
}

const CHECKPOINT_MAGIC: &[u8] = b"AFFLIO-ENGINE-CKPT-2\n";

const MICROS_PER_SEC: i64 = 1_000_000;

fn micros(d: TimeDelta) -> i64 {
    d.num_microseconds().unwrap_or(i64::MAX / 4)
}

impl Engine {
    pub fn new(rules: Arc<Rules>) -> Engine {
        let e = rules.engine();
        let sessions = Sessions::new(e.max_clicks_per_visitor, e.max_tracked_visitors);
        Engine {
            rules,
            dedupe: Dedupe::default(),
            sessions,
            names: Names::default(),
            link_targets: HashMap::new(),
            orders: Vec::new(),
            order_index: HashMap::new(),
            code_uses: HashMap::new(),
            velocity: HashMap::new(),
            leak: HashMap::new(),
            spike: HashMap::new(),
            balances: HashMap::new(),
            refunds_by_partner: HashMap::new(),
            seq: 0,
            watermark: None,
            next_sweep: i64::MIN,
            next_session_sweep: i64::MIN,
            stats: Stats::default(),
            out: Output::default(),
        }
    }

    /// The whole state as bytes, for a durable checkpoint. The rules are not
    /// included (they come from the config); output must have been taken.
    pub fn checkpoint(&self) -> Result<Vec<u8>, CheckpointError> {
        if !self.out.is_empty() {
            return Err(CheckpointError::PendingOutput(self.out.len()));
        }
        let mut bytes = CHECKPOINT_MAGIC.to_vec();
        bytes.extend(postcard::to_stdvec(self)?);
        Ok(bytes)
    }

    /// An engine in the state of `checkpoint`, with `rules`.
    pub fn restore(rules: Arc<Rules>, checkpoint: &[u8]) -> Result<Engine, CheckpointError> {
        let body = checkpoint.strip_prefix(CHECKPOINT_MAGIC).ok_or(CheckpointError::Format)?;
        let mut e: Engine = postcard::from_bytes(body)?;
        e.set_rules(rules);
        Ok(e)
    }

    /// Events applied so far (the position of the engine in its stream).
    pub fn applied_seq(&self) -> u64 {
        self.seq
    }

    /// Swaps the rules. Commissions already accrued stay as they are; later
    /// events are computed with the new rules (and record their version).
    pub fn set_rules(&mut self, rules: Arc<Rules>) {
        let e = rules.engine();
        self.sessions.set_limits(e.max_clicks_per_visitor, e.max_tracked_visitors);
        self.link_targets.clear();
        self.rules = rules;
    }

    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// The newest applied event time.
    pub fn watermark(&self) -> Option<DateTime<Utc>> {
        self.watermark.and_then(DateTime::from_timestamp_micros)
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.clicks_dropped = self.sessions.clicks_dropped;
        s.visitors_evicted_capacity = self.sessions.evicted_capacity;
        s
    }

    /// Events read so far (applied, duplicate or refused); kept in checkpoints.
    pub fn events_read(&self) -> u64 {
        self.stats.events
    }

    /// Sizes of the bounded state, for metrics.
    pub fn memory(&self) -> MemoryReport {
        MemoryReport {
            visitors: self.sessions.visitors(),
            clicks: self.sessions.tracked_clicks(),
            dedupe_ids: self.dedupe.len(),
            orders: self.orders.len(),
        }
    }

    /// Takes the rows produced since the last call.
    pub fn take_output(&mut self) -> Output {
        std::mem::take(&mut self.out)
    }

    /// Rows produced and not yet taken.
    pub fn pending_output(&self) -> &Output {
        &self.out
    }

    /// Orders in the order of their first capture.
    pub fn orders(&self) -> &[Order] {
        &self.orders
    }

    pub fn order(&self, program_id: &str, order_id: &str) -> Option<&Order> {
        let p = self.names.get(program_id)?;
        let i = *self.order_index.get(&p)?.get(order_id)?;
        Some(&self.orders[i as usize])
    }

    /// The status of an order's lines as of `as_of` (event time in replays).
    pub fn line_status(&self, order: &Order, line: &Line, as_of: DateTime<Utc>) -> LineStatus {
        match line.review {
            Some(Review::Rejected) => return LineStatus::Rejected,
            _ if line.paid => return LineStatus::Paid,
            Some(Review::Approved) => return LineStatus::Approved,
            Some(Review::Cleared) => {}
            None if order.held => return LineStatus::Pending,
            None => {}
        }
        let auto = self.rules.program(&order.program_id).is_some_and(|p| p.auto_approve);
        if auto && as_of >= order.eligible_at {
            LineStatus::Approved
        } else {
            LineStatus::Pending
        }
    }

    /// The status of each of an order's lines as of `as_of`, in line order.
    pub fn line_statuses(&self, order: &Order, as_of: DateTime<Utc>) -> Vec<LineStatus> {
        order.lines.iter().map(|l| self.line_status(order, l, as_of)).collect()
    }

    /// Records an event that could not be decoded (`malformed`, or an amount
    /// that is not a decimal) so that it is kept with its reason.
    pub fn reject_undecodable(
        &mut self,
        raw: &str,
        event_id: Option<&str>,
        reason: Reason,
        field: Option<&str>,
        detail: String,
        arrival: Arrival<'_>,
    ) -> Outcome {
        self.stats.events += 1;
        self.push_rejection(Rejection {
            event_id: event_id.map(str::to_string),
            arrival: arrival.ts,
            event_ts: None,
            reason,
            field: field.map(str::to_string),
            detail,
            raw: raw.to_string(),
            origin: arrival.origin.to_string(),
        })
    }

    fn push_rejection(&mut self, r: Rejection) -> Outcome {
        let reason = r.reason;
        *self.stats.rejected.entry(reason).or_default() += 1;
        self.out.rejections.push(r);
        Outcome::Rejected(reason)
    }

    /// Applies one event. `raw` is its text as received, kept if it is rejected.
    pub fn apply(&mut self, e: &Event<'_>, raw: &str, arrival: Arrival<'_>) -> Outcome {
        self.stats.events += 1;
        match self.validate_and_apply(e) {
            Ok(Outcome::Duplicate) => {
                self.stats.duplicates += 1;
                Outcome::Duplicate
            }
            Ok(o) => o,
            Err(r) => self.push_rejection(Rejection {
                event_id: Some(e.event_id.to_string()),
                arrival: arrival.ts,
                event_ts: Some(e.ts),
                reason: r.reason,
                field: Some(r.field.to_string()),
                detail: r.detail,
                raw: raw.to_string(),
                origin: arrival.origin.to_string(),
            }),
        }
    }

    fn validate_and_apply(&mut self, e: &Event<'_>) -> Result<Outcome, Reject> {
        let fp = fingerprint(e);
        let key = id_key(&e.event_id);
        match self.dedupe.check(key, fp) {
            Check::Duplicate => return Ok(Outcome::Duplicate),
            Check::Conflict => {
                return Err(reject(
                    Reason::IdempotencyConflict,
                    "event_id",
                    format!("event_id {:?} was applied before with different content", e.event_id),
                ))
            }
            Check::New => {}
        }
        let ts = e.ts.timestamp_micros();
        let retention = self.rules.engine().dedupe_retention;
        if let Some(wm) = self.watermark {
            if ts < wm.saturating_sub(micros(retention)) {
                return Err(reject(
                    Reason::LateEvent,
                    "ts",
                    format!(
                        "ts {} is more than dedupe_retention ({}) behind the newest event time {}",
                        e.ts.to_rfc3339(),
                        afflio_rules::format_duration(retention),
                        self.watermark().map(|w| w.to_rfc3339()).unwrap_or_default()
                    ),
                ));
            }
        }
        let rules = Arc::clone(&self.rules);
        let result = self.apply_checked(e, &rules);
        // Applied or refused, the id is remembered: a redelivery of either is a
        // duplicate, so replaying a stream with redeliveries inserted gives the
        // same ledger whatever arrived in between.
        self.dedupe.insert(key, fp, ts);
        result?;
        self.seq += 1;
        self.advance(ts);
        Ok(Outcome::Applied)
    }

    fn apply_checked(&mut self, e: &Event<'_>, rules: &Rules) -> Result<(), Reject> {
        // Clicks, the bulk of the traffic, check their link in `apply_click`
        // (once per link under these rules); the other types here.
        let program = match &e.body {
            Body::Click(_) => check_program(rules, e)?,
            _ => check_event(rules, e)?,
        };
        match &e.body {
            Body::Click(c) => self.apply_click(e, c, rules, program),
            Body::Capture(c) => self.apply_capture(e, c, rules, program),
            Body::Refund(r) => self.apply_refund(e, r, rules, program),
            Body::Review(r) => self.apply_review(e, r, program),
            Body::Payout(p) => self.apply_payout(e, p, program),
        }
    }

    fn advance(&mut self, ts: i64) {
        let wm = self.watermark.map_or(ts, |w| w.max(ts));
        self.watermark = Some(wm);
        let cfg = self.rules.engine();
        self.dedupe.evict_before(wm.saturating_sub(micros(cfg.dedupe_retention)));
        let horizon = micros(self.rules.max_window()).saturating_add(micros(cfg.out_of_order));
        if wm >= self.next_sweep {
            self.close_orders_before(wm.saturating_sub(micros(cfg.order_retention)));
            // Velocity keys with no order in their program's window.
            let rules = Arc::clone(&self.rules);
            self.velocity.retain(|prog, keys| {
                let window = rules.program(self.names.name(*prog)).map_or(0, |p| micros(p.fraud.velocity_window));
                keys.sweep(wm.saturating_sub(window));
                keys.len() > 0
            });
            self.next_sweep = wm.saturating_add((horizon / 16).max(60 * MICROS_PER_SEC));
        }
        if wm >= self.next_session_sweep {
            // Every sweep visits every tracked visitor: sweeping each quarter
            // of the horizon costs ~5 visits per visitor's life and keeps at
            // most 25% beyond the horizon (a sixteenth cost ~17 visits).
            self.sessions.evict_before(wm.saturating_sub(horizon));
            self.next_session_sweep = wm.saturating_add((horizon / 4).max(60 * MICROS_PER_SEC));
        }
    }

    /// Closes orders with no activity since `cutoff`: their final state is
    /// output and they are forgotten (bounded memory).
    fn close_orders_before(&mut self, cutoff: i64) {
        let as_of = DateTime::from_timestamp_micros(cutoff).unwrap_or(DateTime::UNIX_EPOCH);
        let mut i = 0;
        while i < self.orders.len() {
            if self.orders[i].last_activity.timestamp_micros() >= cutoff {
                i += 1;
                continue;
            }
            let order = self.orders.swap_remove(i);
            if let Some(p) = self.names.get(&order.program_id) {
                if let Some(m) = self.order_index.get_mut(&p) {
                    m.remove(&order.order_id);
                }
            }
            // The order moved into slot i (if any) keeps its index right.
            if let Some(moved) = self.orders.get(i) {
                if let Some(p) = self.names.get(&moved.program_id) {
                    if let Some(slot) = self.order_index.get_mut(&p).and_then(|m| m.get_mut(&moved.order_id)) {
                        *slot = i as u32;
                    }
                }
            }
            let statuses = self.line_statuses(&order, as_of);
            self.close_into_balances(&order, &statuses);
            self.stats.orders_closed += 1;
            self.out.closed.push(ClosedOrder { order, statuses, as_of });
        }
    }

    fn apply_click(&mut self, e: &Event<'_>, c: &Click<'_>, rules: &Rules, program: &Program) -> Result<(), Reject> {
        // Links already clicked under these rules resolve with one lookup.
        let cached = self.link_targets.get(c.link_id.as_ref()).filter(|(_, p)| **p == *program.id);
        let target = match cached {
            Some(&(t, _)) => t,
            None => {
                let link = check_link(rules, program, &c.link_id)?;
                let (l, p, g) =
                    (self.names.intern(&link.id), self.names.intern(&link.partner_id), self.names.intern(&program.id));
                let t = self.sessions.target(l, p, g);
                self.link_targets.insert(link.id.as_str().into(), (t, program.id.as_str().into()));
                t
            }
        };
        let rec = self.sessions.record(&c.visitor_id, e.ts.timestamp_micros(), target);
        self.stats.applied_clicks += 1;
        let n = |i: u32| &**self.names.name(i);
        self.out.clicks.push(e, n(rec.program), n(rec.link), n(rec.partner), c);
        Ok(())
    }

    fn apply_capture(
        &mut self,
        e: &Event<'_>,
        c: &Capture<'_>,
        rules: &Rules,
        program: &Program,
    ) -> Result<(), Reject> {
        // Validated: from here on nothing can fail.
        let prog = self.names.intern(&program.id);
        let existing = self.order_index.get(&prog).and_then(|m| m.get(c.order_id.as_ref())).copied();
        let idx = match existing {
            Some(i) => i as usize,
            None => self.open_order(e, c, rules, program, prog),
        };
        let order = &mut self.orders[idx];
        order.captured += c.amount;
        order.captures += 1;
        order.last_activity = order.last_activity.max(e.ts);
        if e.ts > order.last_capture_ts {
            order.last_capture_ts = e.ts;
        }
        order.eligible_at = order.last_capture_ts + program.hold;
        self.stats.applied_captures += 1;
        if let Some(cr) = &order.credit {
            if let Some(w) = self.refunds_by_partner.get_mut(&prog).and_then(|m| m.get_mut(cr.partner_id.as_ref())) {
                w.captured(e.ts.timestamp_micros(), c.amount, program.fraud.refund_rate_window.num_days());
            }
        }
        self.accrue(idx, e, c, rules, program);
        Ok(())
    }

    /// The first capture of an order: decides attribution, once.
    fn open_order(&mut self, e: &Event<'_>, c: &Capture<'_>, rules: &Rules, program: &Program, prog: u32) -> usize {
        let ts = e.ts;
        // 1. Promo codes, in typed order.
        let mut codes: Vec<Box<str>> = Vec::with_capacity(c.codes.len());
        let mut issues = Vec::new();
        let mut valid: Vec<&afflio_rules::Code> = Vec::new();
        for typed in &c.codes {
            let norm = normalize_code(typed);
            if norm.is_empty() || codes.iter().any(|k| **k == *norm) {
                continue;
            }
            codes.push(norm.clone().into());
            let issue = match program.codes.get(&norm) {
                None => Some(CodeIssue::Unknown),
                Some(code) if code.starts_at.is_some_and(|s| ts < s) => Some(CodeIssue::NotStarted),
                Some(code) if code.expires_at.is_some_and(|x| ts >= x) => Some(CodeIssue::Expired),
                Some(code) if code.max_uses.is_some_and(|m| self.code_uses(prog, &norm) >= m) => {
                    Some(CodeIssue::Exhausted)
                }
                Some(code) => {
                    valid.push(code);
                    None
                }
            };
            if let Some(issue) = issue {
                issues.push((norm.into_boxed_str(), issue));
            }
        }
        let by_code = valid.first().map(|code| Credit {
            kind: AttributionKind::Code,
            source: code.code.as_str().into(),
            partner_id: code.partner_id.as_str().into(),
        });
        // 2. Link clicks of this visitor in the window.
        let won = c.visitor_id.as_deref().and_then(|v| self.winning_click(v, prog, ts, program));
        let click_ts = won.as_ref().map(|(_, t)| *t);
        let by_click = won.map(|(credit, _)| credit);
        // 3. Priority.
        let credit = if program.code_priority { by_code.or(by_click) } else { by_click.or(by_code) };
        match credit.as_ref().map(|c| c.kind) {
            Some(AttributionKind::Code) => {
                self.stats.orders_by_code += 1;
                let norm = normalize_code(&credit.as_ref().map(|c| c.source.to_string()).unwrap_or_default());
                *self.code_uses.entry(prog).or_default().entry(norm.into_boxed_str()).or_default() += 1;
            }
            Some(AttributionKind::Link) => self.stats.orders_by_link += 1,
            None => self.stats.orders_unattributed += 1,
        }
        // Lines: the credited partner (tier 0) and its ancestors for each override tier.
        let mut lines = Vec::new();
        if let Some(cr) = &credit {
            lines.push(Line {
                partner_id: cr.partner_id.clone(),
                tier: 0,
                accrued: Decimal::ZERO,
                net: Decimal::ZERO,
                review: None,
                paid: false,
            });
            for (i, anc) in rules.ancestors(&cr.partner_id, program.overrides.len()).enumerate() {
                lines.push(Line {
                    partner_id: anc.id.as_str().into(),
                    tier: (i + 1) as u8,
                    accrued: Decimal::ZERO,
                    net: Decimal::ZERO,
                    review: None,
                    paid: false,
                });
            }
        }
        let program_id = self.names.name(prog).clone();
        let order = Order {
            program_id: program_id.clone(),
            order_id: c.order_id.as_ref().into(),
            currency: program.currency,
            first_capture_ts: ts,
            last_capture_ts: ts,
            eligible_at: ts + program.hold,
            credit,
            captured: Decimal::ZERO,
            refunded: Decimal::ZERO,
            chargeback_amount: Decimal::ZERO,
            chargeback: false,
            codes,
            code_issues: issues,
            flags: Vec::new(),
            lines,
            captures: 0,
            refunds: 0,
            last_activity: ts,
            held: false,
        };
        // Fraud rules, decided with the attribution.
        let mut hits: Vec<(FraudRule, Hit)> = Vec::new();
        if let Some(cr) = order.credit.clone() {
            self.detect(&mut hits, e, c, &cr, &valid, click_ts, rules, program, prog);
        }
        let idx = self.orders.len();
        self.orders.push(order);
        self.order_index.entry(prog).or_default().insert(c.order_id.as_ref().into(), idx as u32);
        for (rule, hit) in hits {
            let action = rule_action(&program.fraud, rule);
            if action == FraudAction::Off {
                continue;
            }
            let Hit { value, threshold, score, detail, retro } = hit;
            let flag = FlagSpec { rule, action, value, threshold, score, detail };
            for id in retro.iter().filter(|id| ***id != *c.order_id) {
                if let Some(i) = self.order_index.get(&prog).and_then(|m| m.get(&**id)).copied() {
                    self.flag_order(i as usize, &flag, e, true);
                }
            }
            self.flag_order(idx, &flag, e, false);
        }
        idx
    }

    /// Records `flag` on the order at `idx` unless the rule already flagged it.
    fn flag_order(&mut self, idx: usize, flag: &FlagSpec, e: &Event<'_>, retroactive: bool) {
        let order = &mut self.orders[idx];
        let Some(cr) = &order.credit else { return };
        if order.flags.contains(&flag.rule) {
            return;
        }
        if flag.action == FraudAction::Hold {
            order.held = true;
            for l in &mut order.lines {
                // New evidence reopens a review that had cleared or approved
                // the line; a paid or rejected line stays what it is.
                if matches!(l.review, Some(Review::Cleared | Review::Approved)) {
                    l.review = None;
                }
            }
        }
        order.flags.push(flag.rule);
        self.stats.flags += 1;
        self.out.flags.push(Flag {
            program_id: order.program_id.clone(),
            order_id: order.order_id.to_string(),
            partner_id: cr.partner_id.clone(),
            rule: flag.rule,
            action: flag.action,
            score: flag.score,
            value: flag.value,
            threshold: flag.threshold,
            detail: flag.detail.clone(),
            ts: e.ts,
            event_id: e.event_id.to_string(),
            retroactive,
        });
    }

    /// Runs every enabled detector on a new order credited to `cr`.
    #[allow(clippy::too_many_arguments)]
    fn detect(
        &mut self,
        hits: &mut Vec<(FraudRule, Hit)>,
        e: &Event<'_>,
        c: &Capture<'_>,
        cr: &Credit,
        valid: &[&afflio_rules::Code],
        click_ts: Option<i64>,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) {
        let fraud = &program.fraud;
        let ts = e.ts.timestamp_micros();
        // One allocation of the order id, shared by every detector's state.
        let oid: Arc<str> = Arc::from(&*c.order_id);
        let one = |detail: String| Hit { value: 1.0, threshold: 1.0, score: 1.0, detail, retro: Vec::new() };
        if fraud.self_referral != FraudAction::Off {
            if let Some(detail) = self_referral(rules, &cr.partner_id, c) {
                hits.push((FraudRule::SelfReferral, one(detail)));
            }
        }
        if fraud.coupon_stacking != FraudAction::Off {
            let mut partners: Vec<&str> = valid.iter().map(|v| v.partner_id.as_str()).collect();
            partners.sort_unstable();
            partners.dedup();
            if partners.len() >= 2 {
                let codes: Vec<&str> = valid.iter().map(|v| v.code.as_str()).collect();
                let detail = format!(
                    "valid codes of {} partners on one order: {} (partners {})",
                    partners.len(),
                    codes.join(", "),
                    partners.join(", ")
                );
                hits.push((FraudRule::CouponStacking, one(detail)));
            }
        }
        if fraud.velocity != FraudAction::Off {
            let window = micros(fraud.velocity_window);
            let max = fraud.velocity_max_orders as usize;
            let cu = c.customer.as_ref();
            let keys = [
                cu.and_then(|cu| cu.id.as_deref()).map(|v| (KeyKind::CustomerId, Cow::Borrowed(v))),
                cu.and_then(|cu| cu.email_sha256.as_deref()).map(|v| {
                    let v = v.trim();
                    let v = if v.bytes().any(|b| b.is_ascii_uppercase()) {
                        Cow::Owned(v.to_ascii_lowercase())
                    } else {
                        Cow::Borrowed(v)
                    };
                    (KeyKind::EmailSha256, v)
                }),
                c.ip.as_deref().map(|v| (KeyKind::Ip, Cow::Borrowed(v))),
            ];
            let v = self.velocity.entry(prog).or_default();
            let mut worst: Option<(KeyKind, Cow<'_, str>, Vec<Arc<str>>)> = None;
            for (kind, value) in keys.into_iter().flatten() {
                if let Some(orders) = v.record(kind, &value, ts, &oid, window, max) {
                    match &mut worst {
                        Some(w) => {
                            for o in orders {
                                if !w.2.contains(&o) {
                                    w.2.push(o);
                                }
                            }
                        }
                        None => worst = Some((kind, value, orders)),
                    }
                }
            }
            if let Some((kind, value, retro)) = worst {
                let n = retro.len();
                let detail = format!(
                    "{n} orders from {} {value} within {} (limit {max})",
                    kind.label(),
                    afflio_rules::format_duration(fraud.velocity_window),
                );
                let (value, threshold) = (n as f64, max as f64);
                hits.push((FraudRule::Velocity, Hit { value, threshold, score: value / threshold, detail, retro }));
            }
        }
        if fraud.coupon_leak != FraudAction::Off && cr.kind == AttributionKind::Code {
            let partner = self.names.get(&cr.partner_id);
            let from = ts.saturating_sub(micros(program.window));
            let clicked = c.visitor_id.as_deref().is_some_and(|v| {
                self.sessions
                    .clicks(v)
                    .any(|k| k.program == prog && Some(k.partner) == partner && k.ts >= from && k.ts <= ts)
            });
            let min = fraud.coupon_leak_min_orders as usize;
            // Keyed by the code as configured (the credit's source).
            // One lookup; the key is allocated only for a code seen the first time.
            let w = self.leak.entry(prog).or_default().entry_ref(&*cr.source).or_default();
            if let Some((share, retro)) = w.record(clicked, &oid, min, fraud.coupon_leak_max_share) {
                let detail = format!(
                    "code {}: {:.0}% of its last {min} redemptions had no click from {}'s links (limit {:.0}%)",
                    cr.source,
                    share * 100.0,
                    cr.partner_id,
                    fraud.coupon_leak_max_share * 100.0
                );
                let threshold = fraud.coupon_leak_max_share;
                hits.push((FraudRule::CouponLeak, Hit { value: share, threshold, score: share, detail, retro }));
            }
        }
        if fraud.conversion_spike != FraudAction::Off {
            // Partners are configured: interning them is bounded.
            let partner = self.names.intern(&cr.partner_id);
            {
                let params = SpikeParams {
                    bucket: micros(fraud.conversion_spike_bucket),
                    min_orders: fraud.conversion_spike_min_orders,
                    threshold: fraud.conversion_spike_threshold,
                    warmup: fraud.conversion_spike_warmup,
                };
                let s = self.spike.entry(prog).or_default();
                if let Some(h) = s.record(partner, ts, &oid, &params) {
                    let start = DateTime::from_timestamp_micros(h.bucket_start).unwrap_or(DateTime::UNIX_EPOCH);
                    let detail = format!(
                        "partner {} has {} of the program's {} orders in the {} bucket from {}, {:.1} expected \
                         from its baseline: {:.1} standard deviations above (limit {})",
                        cr.partner_id,
                        h.count,
                        h.program_count,
                        afflio_rules::format_duration(fraud.conversion_spike_bucket),
                        start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        h.expected,
                        h.z,
                        fraud.conversion_spike_threshold
                    );
                    let threshold = fraud.conversion_spike_threshold;
                    let hit = Hit { value: h.z, threshold, score: h.z / threshold, detail, retro: h.retro };
                    hits.push((FraudRule::ConversionSpike, hit));
                }
            }
        }
        if fraud.refund_rate != FraudAction::Off {
            let r = self.refunds_by_partner.entry(prog).or_default().entry_ref(&*cr.partner_id).or_default();
            // Judged on the partner's window before this order.
            let (n, share) = r.share();
            r.order(ts, fraud.refund_rate_window.num_days());
            if n >= fraud.refund_rate_min_orders && share > fraud.refund_rate_max_share {
                let detail = format!(
                    "partner {} has {:.0}% of captured revenue refunded over {n} orders in the last {} (limit {:.0}%)",
                    cr.partner_id,
                    share * 100.0,
                    afflio_rules::format_duration(fraud.refund_rate_window),
                    fraud.refund_rate_max_share * 100.0
                );
                let threshold = fraud.refund_rate_max_share;
                hits.push((
                    FraudRule::RefundRate,
                    Hit { value: share, threshold, score: share, detail, retro: vec![] },
                ));
            }
        }
        if fraud.fast_conversion != FraudAction::Off {
            if let (Some(t), AttributionKind::Link) = (click_ts, cr.kind) {
                let gap = ts - t;
                let min = micros(fraud.fast_conversion_min);
                if gap < min {
                    let detail = format!(
                        "captured {:.1}s after the winning click on {} (minimum {}s)",
                        gap as f64 / 1e6,
                        cr.source,
                        fraud.fast_conversion_min.num_seconds()
                    );
                    let (value, threshold) = (gap as f64 / 1e6, min as f64 / 1e6);
                    let score = 1.0 - gap as f64 / min as f64;
                    hits.push((FraudRule::FastConversion, Hit { value, threshold, score, detail, retro: vec![] }));
                }
            }
        }
    }

    /// A reviewer's decision. On one order it is all or nothing: every
    /// selected line must accept it, or the review is refused and nothing
    /// changes. Without an order (bulk approval) it approves the program's
    /// lines that are eligible, unheld and pending at the review's time.
    fn apply_review(&mut self, e: &Event<'_>, r: &ReviewEvent<'_>, program: &Program) -> Result<(), Reject> {
        let invalid = |field: &'static str, detail: String| reject(Reason::InvalidReview, field, detail);
        let ts = e.ts;
        let targets: Vec<usize> = match &r.order_id {
            Some(id) => {
                let idx = self
                    .names
                    .get(&program.id)
                    .and_then(|p| self.order_index.get(&p))
                    .and_then(|m| m.get(id.as_ref()))
                    .copied()
                    .ok_or_else(|| {
                        reject(
                            Reason::UnknownOrder,
                            "order_id",
                            format!("order_id {id:?} is not an open order of program {:?}", program.id),
                        )
                    })?;
                vec![idx as usize]
            }
            None if r.decision == Decision::Approve => {
                (0..self.orders.len()).filter(|&i| *self.orders[i].program_id == *program.id).collect()
            }
            None => {
                return Err(invalid(
                    "order_id",
                    format!("a {} review names an order; only approve may go without one (bulk)", r.decision.as_str()),
                ))
            }
        };
        let bulk = r.order_id.is_none();
        let mut changes: Vec<(usize, usize, LineStatus, Review)> = Vec::new();
        let mut matched = 0;
        for idx in targets {
            let order = &self.orders[idx];
            for (li, line) in order.lines.iter().enumerate() {
                if r.partner_id.as_deref().is_some_and(|p| p != &*line.partner_id)
                    || r.tier.is_some_and(|t| t != line.tier)
                {
                    continue;
                }
                matched += 1;
                let status = self.line_status(order, line, ts);
                let awaiting_review = order.held && line.review.is_none();
                let what = || format!("line ({}, {}, tier {})", order.order_id, line.partner_id, line.tier);
                let new = match r.decision {
                    Decision::Approve if bulk => {
                        if status != LineStatus::Pending || awaiting_review || ts < order.eligible_at {
                            continue;
                        }
                        Review::Approved
                    }
                    Decision::Approve => {
                        if status == LineStatus::Rejected {
                            return Err(invalid("decision", format!("{} was rejected and cannot be approved", what())));
                        }
                        if ts < order.eligible_at {
                            return Err(invalid(
                                "ts",
                                format!(
                                    "{} is not eligible until {} (the return window); clear it instead to release a hold",
                                    what(),
                                    order.eligible_at.to_rfc3339()
                                ),
                            ));
                        }
                        if line.review == Some(Review::Approved) {
                            continue;
                        }
                        Review::Approved
                    }
                    Decision::Reject => {
                        if line.review == Some(Review::Rejected) {
                            continue;
                        }
                        if line.paid {
                            return Err(invalid(
                                "decision",
                                format!("{} is paid: a refund reverses it, a review cannot", what()),
                            ));
                        }
                        Review::Rejected
                    }
                    Decision::Clear => {
                        if !awaiting_review {
                            if line.review.is_some() {
                                continue;
                            }
                            return Err(invalid("decision", format!("{} is not held for review", what())));
                        }
                        Review::Cleared
                    }
                };
                changes.push((idx, li, status, new));
            }
        }
        if matched == 0 && !bulk {
            let field = if r.tier.is_some() { "tier" } else { "partner_id" };
            return Err(invalid(
                field,
                format!(
                    "order {:?} has no line for partner {:?} tier {:?}",
                    r.order_id.as_deref().unwrap_or_default(),
                    r.partner_id.as_deref().unwrap_or("*"),
                    r.tier
                ),
            ));
        }
        self.stats.applied_reviews += 1;
        for (idx, li, previous, new) in changes {
            self.orders[idx].lines[li].review = Some(new);
            let order = &self.orders[idx];
            let line = &order.lines[li];
            let status = self.line_status(order, line, ts);
            self.stats.lines_decided += 1;
            self.out.decisions.push(DecisionRow {
                event_id: e.event_id.to_string(),
                ts,
                program_id: order.program_id.clone(),
                order_id: order.order_id.to_string(),
                partner_id: line.partner_id.clone(),
                tier: line.tier,
                decision: r.decision,
                reason: r.reason.as_deref().map(str::to_string),
                reviewer: r.reviewer.to_string(),
                previous_status: previous,
                status,
                net_amount: line.net,
                bulk,
            });
        }
        Ok(())
    }

    fn code_uses(&self, prog: u32, norm: &str) -> u64 {
        self.code_uses.get(&prog).and_then(|m| m.get(norm)).copied().unwrap_or(0)
    }

    /// The winning click's credit and time.
    fn winning_click(&self, visitor: &str, prog: u32, ts: DateTime<Utc>, program: &Program) -> Option<(Credit, i64)> {
        let t = ts.timestamp_micros();
        let from = t.saturating_sub(micros(program.window));
        // Clicks come in application order: ties in time go to the later applied.
        let candidates = self.sessions.clicks(visitor).filter(|c| c.program == prog && c.ts >= from && c.ts <= t);
        let best = match program.model {
            AttributionModel::LastClick => candidates.max_by_key(|c| c.ts),
            AttributionModel::FirstClick => candidates.rev().min_by_key(|c| c.ts),
        }?;
        let credit = Credit {
            kind: AttributionKind::Link,
            source: self.names.name(best.link).clone(),
            partner_id: self.names.name(best.partner).clone(),
        };
        Some((credit, best.ts))
    }

    fn accrue(&mut self, idx: usize, e: &Event<'_>, c: &Capture<'_>, rules: &Rules, program: &Program) {
        let order = &mut self.orders[idx];
        let Some(credit) = order.credit.clone() else { return };
        for i in 0..order.lines.len() {
            let line = &mut order.lines[i];
            let (exact, rate) = if line.tier == 0 {
                tier0_commission(rules, program, &line.partner_id, c.amount, &c.items)
            } else {
                let r = program.overrides.get(usize::from(line.tier) - 1).map_or(Decimal::ZERO, |r| r.fraction());
                (c.amount * r, Some(r))
            };
            let amount = round_money(exact, order.currency);
            line.accrued += amount;
            line.net += amount;
            let row =
                Posting { kind: EntryKind::Accrual, basis: c.amount, amount, rate, rules_version: rules.version() };
            self.out.ledger.push(row.entry(e, order, &order.lines[i], &credit));
            self.stats.ledger_entries += 1;
        }
    }

    fn apply_refund(&mut self, e: &Event<'_>, r: &Refund<'_>, rules: &Rules, program: &Program) -> Result<(), Reject> {
        let prog = self.names.get(&program.id);
        let idx =
            prog.and_then(|p| self.order_index.get(&p)).and_then(|m| m.get(r.order_id.as_ref())).copied().ok_or_else(
                || {
                    reject(
                        Reason::UnknownOrder,
                        "order_id",
                        format!("order_id {:?} has no capture in program {:?}", r.order_id, program.id),
                    )
                },
            )? as usize;
        let order = &mut self.orders[idx];
        let open = order.captured - order.refunded;
        if r.amount > open {
            return Err(reject(
                Reason::RefundExceedsCapture,
                "amount",
                format!(
                    "amount {} exceeds what is captured and not yet refunded ({open} of {})",
                    r.amount, order.captured
                ),
            ));
        }
        // Validated: apply.
        order.refunded += r.amount;
        order.refunds += 1;
        order.last_activity = order.last_activity.max(e.ts);
        if r.chargeback {
            order.chargeback = true;
            order.chargeback_amount += r.amount;
            self.stats.applied_chargebacks += 1;
        } else {
            self.stats.applied_refunds += 1;
        }
        let full = order.fully_refunded();
        let Some(credit) = order.credit.clone() else { return Ok(()) };
        if let Some(w) =
            prog.and_then(|p| self.refunds_by_partner.get_mut(&p)).and_then(|m| m.get_mut(credit.partner_id.as_ref()))
        {
            w.refunded(e.ts.timestamp_micros(), r.amount, program.fraud.refund_rate_window.num_days());
        }
        for i in 0..order.lines.len() {
            let line = &mut order.lines[i];
            let share = if full {
                line.net
            } else {
                round_money(r.amount * line.accrued / order.captured, order.currency).min(line.net)
            };
            let amount = -share;
            line.net += amount;
            debug_assert!(!line.net.is_sign_negative() || line.net.is_zero(), "line net below zero");
            debug_assert!(!full || line.net.is_zero(), "fully refunded line not zero");
            let row = Posting {
                kind: EntryKind::Reversal,
                basis: -r.amount,
                amount,
                rate: None,
                rules_version: rules.version(),
            };
            self.out.ledger.push(row.entry(e, order, &order.lines[i], &credit));
            self.stats.ledger_entries += 1;
        }
        Ok(())
    }
}

fn check_money(
    program: &Program,
    currency: &str,
    amount: Decimal,
    items: &Option<Vec<Item<'_>>>,
) -> Result<(), Reject> {
    if currency != program.currency.code() {
        return Err(reject(
            Reason::CurrencyMismatch,
            "currency",
            format!("currency {currency:?} is not the program's currency {:?}", program.currency.code()),
        ));
    }
    check_amount(amount, false).map_err(|m| reject(Reason::InvalidAmount, "amount", format!("amount {m}")))?;
    if let Some(items) = items {
        let mut sum = Decimal::ZERO;
        for (i, it) in items.iter().enumerate() {
            check_amount(it.amount, true)
                .map_err(|m| reject(Reason::InvalidAmount, "items.amount", format!("items[{i}].amount {m}")))?;
            sum += it.amount;
        }
        if sum != amount {
            return Err(reject(
                Reason::ItemsMismatch,
                "items",
                format!("item amounts sum to {sum}, not to amount {amount}"),
            ));
        }
    }
    Ok(())
}

/// The amounts of one ledger row; the rest comes from the event, order and line.
struct Posting {
    kind: EntryKind,
    basis: Decimal,
    amount: Decimal,
    rate: Option<Decimal>,
    rules_version: u64,
}

impl Posting {
    fn entry(self, e: &Event<'_>, order: &Order, line: &Line, credit: &Credit) -> LedgerEntry {
        LedgerEntry {
            entry_id: format!("{}:{}", e.event_id, line.tier),
            event_id: e.event_id.to_string(),
            ts: e.ts,
            program_id: order.program_id.clone(),
            order_id: order.order_id.to_string(),
            partner_id: line.partner_id.clone(),
            tier: line.tier,
            kind: self.kind,
            basis: self.basis,
            amount: self.amount,
            currency: order.currency,
            attribution: credit.kind,
            source: credit.source.clone(),
            eligible_at: order.eligible_at,
            rate: self.rate,
            rules_version: self.rules_version,
        }
    }
}

/// Tier-0 commission before rounding, and the rate when one rate applies to
/// the whole amount. First match wins: partner's category rate, partner's
/// rate, program's category rate, program's rate.
fn tier0_commission(
    rules: &Rules,
    program: &Program,
    partner_id: &str,
    amount: Decimal,
    items: &Option<Vec<Item<'_>>>,
) -> (Decimal, Option<Decimal>) {
    let partner = rules.partner(partner_id).filter(|p| p.program_id == program.id);
    let rate_for = |category: Option<&str>| -> Decimal {
        let cat = category.and_then(|c| {
            partner.and_then(|p| p.category_rates.get(c)).or_else(|| {
                // Partner's own rate beats the program's category rate.
                if partner.and_then(|p| p.rate).is_some() {
                    None
                } else {
                    program.category_rates.get(c)
                }
            })
        });
        cat.copied().or_else(|| partner.and_then(|p| p.rate)).unwrap_or(program.rate).fraction()
    };
    match items {
        Some(items) if !items.is_empty() => {
            let mut total = Decimal::ZERO;
            let mut uniform: Option<Option<Decimal>> = None;
            for it in items {
                let r = rate_for(it.category.as_deref());
                total += it.amount * r;
                uniform = match uniform {
                    None => Some(Some(r)),
                    Some(Some(u)) if u == r => Some(Some(u)),
                    Some(_) => Some(None),
                };
            }
            (total, uniform.flatten())
        }
        _ => {
            let r = rate_for(None);
            (amount * r, Some(r))
        }
    }
}

/// The configured action of `rule`.
fn rule_action(f: &afflio_rules::FraudSettings, rule: FraudRule) -> FraudAction {
    match rule {
        FraudRule::SelfReferral => f.self_referral,
        FraudRule::CouponStacking => f.coupon_stacking,
        FraudRule::Velocity => f.velocity,
        FraudRule::FastConversion => f.fast_conversion,
        FraudRule::CouponLeak => f.coupon_leak,
        FraudRule::RefundRate => f.refund_rate,
        FraudRule::ConversionSpike => f.conversion_spike,
    }
}

fn self_referral(rules: &Rules, partner_id: &str, c: &Capture<'_>) -> Option<String> {
    let partner = rules.partner(partner_id)?;
    let cu = c.customer.as_ref()?;
    if let Some(h) = cu.email_sha256.as_deref() {
        if partner.email_sha256.contains(&h.trim().to_ascii_lowercase()) {
            return Some(format!(
                "customer email_sha256 {}… is an identity of partner {partner_id:?}",
                &h.trim()[..h.trim().len().min(12)]
            ));
        }
    }
    if let Some(id) = cu.id.as_deref() {
        if partner.customer_ids.contains(id) {
            return Some(format!("customer id {id:?} is an identity of partner {partner_id:?}"));
        }
    }
    None
}

/// Sizes of the engine's bounded state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    pub visitors: usize,
    pub clicks: usize,
    pub dedupe_ids: usize,
    pub orders: usize,
}
