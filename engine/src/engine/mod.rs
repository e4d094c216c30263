//! The engine: a deterministic state machine from events to effects.
//!
//! One file per concern: `validate` (what an event must satisfy before it
//! changes anything), `attribution` (who an order is credited to),
//! `commission` (accruals and reversals), `detect` (fraud rules on a new
//! order), `lifecycle` (line status, closing orders, balances), `review`,
//! `payouts`, `changes` (what the state tables must be told) and
//! `checkpoint` (full and incremental images of the state).

use std::sync::Arc;

use afflio_rules::Rules;
use chrono::{DateTime, TimeDelta, Utc};
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::dedupe::{Check, Dedupe};
use crate::event::{fingerprint, Body, Event};
use crate::fraud::{LeakWindow, RefundWindow, Spike, Velocity};
use crate::output::{Arrival, Outcome, Output, Reason, Rejection, Stats};
use crate::sessions::{scoped_key, Sessions};
use crate::state::tracked::Tracked;
use crate::state::{Names, Order};

mod attribution;
mod changes;
mod checkpoint;
mod commission;
mod conversions;
mod detect;
mod lifecycle;
mod payouts;
mod registry;
mod review;
mod validate;

pub use changes::StateChanges;
pub use checkpoint::CheckpointError;
pub use payouts::{ItemState, PayoutItem};
pub use registry::{email_sha256, ListingView, PartnerView};
pub use validate::{check_event, Invalid};

use validate::{reject, Reject};

/// One program's clock: its newest applied event time and when its next
/// sweep (closing orders, forgetting velocity keys) is due.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Clock {
    pub(crate) watermark: i64,
    pub(crate) next_sweep: i64,
    pub(crate) next_session_sweep: i64,
}

/// The engine's scalars and small state, written whole in every checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// Events applied so far.
    pub(crate) seq: u64,
    pub(crate) stats: Stats,
    /// Per program: its clock. One program's events never move another's.
    pub(crate) clocks: std::collections::BTreeMap<u32, Clock>,
    /// The time the state tables were last written as of.
    pub(crate) store_as_of: Option<i64>,
}

/// Turns events into ledger entries, order and line state, flags and
/// rejections. Does no I/O and reads no clock: the same events in the same
/// order always give the same effects.
#[derive(Debug, Clone)]
pub struct Engine {
    rules: Arc<Rules>,
    names: Names,
    sessions: Sessions,
    dedupe: Dedupe,
    orders: crate::state::order::Orders,
    /// (program, code) -> orders credited through it.
    code_uses: Tracked<(u32, u32), u64>,
    /// (program, customer id / e-mail hash / IP) -> recent order times, for velocity.
    velocity: Velocity,
    /// (program, code) -> its last redemptions, for coupon_leak. Bounded by the codes.
    leak: Tracked<(u32, u32), LeakWindow>,
    /// Per program: orders per bucket and each partner's baseline, for
    /// conversion_spike. Bounded by the partners and [`crate::fraud::SPIKE_BUCKETS`].
    spike: Spike,
    /// (program, partner) -> paid, in flight, closed approved net, payout
    /// items. Bounded by the partners and the batches.
    balances: Tracked<(u32, u32), payouts::PartnerBalance>,
    /// (program, partner) -> orders, captured and refunded money per day, for refund_rate.
    refunds_by_partner: Tracked<(u32, u32), RefundWindow>,
    meta: Meta,
    /// (program, partner) whose balance changed since the state tables were written.
    balance_changes: std::collections::BTreeSet<(u32, u32)>,
    /// Link id -> (interned click target, program), under the current rules
    /// (cleared when they change).
    link_targets: HashMap<Box<str>, (u32, u32)>,
    /// Click targets up to here are in a checkpoint.
    targets_mark: usize,
    /// Listings, applications, and the partners, links and codes of the marketplace.
    registry: crate::registry::Registry,
    /// Subscriptions by (program, id) hash: who earns on their payments.
    /// Bounded by [`conversions::MAX_SUBSCRIPTIONS`].
    subscriptions: Tracked<u128, Box<conversions::Subscription>>,
    /// Links created since the ingest tier last asked (kept only when
    /// [`Engine::set_link_feed`] is on: a replay has no one to ask).
    new_links: Vec<afflio_rules::Link>,
    link_feed: bool,
    /// Whether notices (for webhooks) are kept in the output.
    notices: bool,
    /// The last registry and review events refused (event id, the refusal),
    /// so that the API or page that sent one can say why. Not checkpointed;
    /// at most 256.
    registry_refusals: std::collections::VecDeque<(Box<str>, Invalid)>,
    out: Output,
}

const MICROS_PER_SEC: i64 = 1_000_000;

pub(crate) fn micros(d: TimeDelta) -> i64 {
    d.num_microseconds().unwrap_or(i64::MAX / 4)
}

impl Engine {
    pub fn new(rules: Arc<Rules>) -> Engine {
        let e = rules.engine();
        let sessions = Sessions::new(e.max_clicks_per_visitor, e.max_tracked_visitors);
        Engine {
            rules,
            names: Names::default(),
            sessions,
            dedupe: Dedupe::default(),
            orders: crate::state::order::Orders::new(),
            code_uses: Tracked::default(),
            velocity: Velocity::default(),
            leak: Tracked::default(),
            spike: Spike::default(),
            balances: Tracked::default(),
            refunds_by_partner: Tracked::default(),
            meta: Meta::default(),
            balance_changes: Default::default(),
            link_targets: HashMap::new(),
            targets_mark: 0,
            registry: Default::default(),
            subscriptions: Tracked::default(),
            new_links: Vec::new(),
            link_feed: false,
            notices: false,
            registry_refusals: Default::default(),
            out: Output::default(),
        }
    }

    /// Keeps notices (order attributed, lead created or moved, partner
    /// applied or approved) in the output, for webhooks. Off by default: a
    /// replay has no one to tell.
    pub fn set_notices(&mut self, on: bool) {
        self.notices = on;
    }

    /// Pushes a notice when notices are on.
    pub(super) fn notice(
        &mut self,
        kind: &'static str,
        e: &Event<'_>,
        partner: Option<Arc<str>>,
        subject: &str,
        detail: Vec<(&'static str, String)>,
    ) {
        if self.notices {
            // The program's interned name: an Arc clone, no allocation.
            let program_id = match self.names.get(&e.program_id) {
                Some(i) => self.names.name(i).clone(),
                None => e.program_id.as_ref().into(),
            };
            self.out.notices.push(crate::output::Notice {
                kind,
                event_id: e.event_id.to_string(),
                ts: e.ts,
                program_id,
                partner_id: partner,
                subject: subject.to_string(),
                detail,
            });
        }
    }

    /// Events applied so far (the position of the engine in its stream).
    pub fn applied_seq(&self) -> u64 {
        self.meta.seq
    }

    /// Swaps the rules. Commissions already accrued stay as they are; later
    /// events are computed with the new rules (and record their version).
    pub fn set_rules(&mut self, rules: Arc<Rules>) {
        let e = rules.engine();
        self.sessions.set_limits(e.max_clicks_per_visitor, e.max_tracked_visitors);
        self.link_targets.clear();
        // A program whose auto-approval changed has every line's status changed.
        let changed: Vec<u32> = self
            .rules
            .programs()
            .filter(|p| rules.program(&p.id).is_some_and(|n| n.auto_approve != p.auto_approve))
            .filter_map(|p| self.names.get(&p.id))
            .collect();
        self.rules = rules;
        if !changed.is_empty() {
            let seqs: Vec<u64> = self
                .orders
                .iter()
                .filter(|o| self.names.get(&o.program_id).is_some_and(|p| changed.contains(&p)))
                .map(|o| o.seq)
                .collect();
            for s in seqs {
                self.touch_order_for_store(s);
            }
        }
    }

    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// The newest applied event time of a program.
    pub fn watermark(&self, program_id: &str) -> Option<DateTime<Utc>> {
        let p = self.names.get(program_id)?;
        self.meta.clocks.get(&p).and_then(|c| DateTime::from_timestamp_micros(c.watermark))
    }

    /// The newest applied event time of any program.
    pub fn newest_applied(&self) -> Option<DateTime<Utc>> {
        self.meta.clocks.values().map(|c| c.watermark).max().and_then(DateTime::from_timestamp_micros)
    }

    pub fn stats(&self) -> Stats {
        self.meta.stats.clone()
    }

    /// Events read so far (applied, duplicate or refused); kept in checkpoints.
    pub fn events_read(&self) -> u64 {
        self.meta.stats.events
    }

    /// Sizes of the bounded state, for metrics.
    pub fn memory(&self) -> MemoryReport {
        MemoryReport {
            visitors: self.sessions.visitors(),
            clicks: self.sessions.tracked_clicks(),
            dedupe_ids: self.dedupe.len(),
            orders: self.orders.len(),
            velocity_keys: self.velocity.len(),
            names: self.names.len(),
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

    /// Open orders in the order of their first capture.
    pub fn orders(&self) -> impl DoubleEndedIterator<Item = &Order> + '_ {
        self.orders.iter()
    }

    pub fn order(&self, program_id: &str, order_id: &str) -> Option<&Order> {
        let p = self.names.get(program_id)?;
        self.orders.get(self.orders.seq_of(p, order_id)?)
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
        self.meta.stats.events += 1;
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
        *self.meta.stats.rejected.entry(reason).or_default() += 1;
        self.out.rejections.push(r);
        Outcome::Rejected(reason)
    }

    /// Applies one event. `raw` is its text as received, kept if it is rejected.
    pub fn apply(&mut self, e: &Event<'_>, raw: &str, arrival: Arrival<'_>) -> Outcome {
        self.meta.stats.events += 1;
        match self.validate_and_apply(e, arrival.clock) {
            Ok(Outcome::Duplicate) => {
                self.meta.stats.duplicates += 1;
                Outcome::Duplicate
            }
            Ok(o) => o,
            Err(r) => {
                if e.event_type().is_registry() || matches!(e.body, Body::Review(_)) {
                    if self.registry_refusals.len() >= 256 {
                        self.registry_refusals.pop_front();
                    }
                    self.registry_refusals.push_back((e.event_id.as_ref().into(), r.clone()));
                }
                self.push_rejection(Rejection {
                    event_id: Some(e.event_id.to_string()),
                    arrival: arrival.ts,
                    event_ts: Some(e.ts),
                    reason: r.reason,
                    field: Some(r.field.to_string()),
                    detail: r.detail,
                    raw: raw.to_string(),
                    origin: arrival.origin.to_string(),
                })
            }
        }
    }

    /// Why a recent registry or review event was refused (the last 256 are remembered).
    pub fn registry_refusal(&self, event_id: &str) -> Option<&Invalid> {
        self.registry_refusals.iter().rev().find(|(id, _)| &**id == event_id).map(|(_, r)| r)
    }

    fn validate_and_apply(&mut self, e: &Event<'_>, clock: Option<DateTime<Utc>>) -> Result<Outcome, Reject> {
        let rules = Arc::clone(&self.rules);
        // The program first: nothing about another program (its links, its
        // ids) is ever looked at for an event of an unknown one.
        let program = validate::check_program(&rules, e)?;
        // An event from the future would move its program's clock: refused,
        // and not remembered (sent again in time, it applies).
        if let Some(clock) = clock {
            let skew = rules.engine().max_future_skew;
            if e.ts > clock + skew {
                return Err(reject(
                    Reason::FutureEvent,
                    "ts",
                    format!(
                        "ts {} is more than max_future_skew ({}) ahead of the arrival clock {}",
                        e.ts.to_rfc3339(),
                        afflio_rules::format_duration(skew),
                        clock.to_rfc3339()
                    ),
                ));
            }
        }
        let prog = self.names.intern(&program.id);
        let fp = fingerprint(e);
        // Idempotency is per program: one program cannot take another's ids.
        let key = scoped_key(&program.id, &e.event_id);
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
        let retention = rules.engine().dedupe_retention;
        if let Some(clock) = self.meta.clocks.get(&prog) {
            if ts < clock.watermark.saturating_sub(micros(retention)) {
                return Err(reject(
                    Reason::LateEvent,
                    "ts",
                    format!(
                        "ts {} is more than dedupe_retention ({}) behind program {:?}'s newest event time {}",
                        e.ts.to_rfc3339(),
                        afflio_rules::format_duration(retention),
                        program.id,
                        DateTime::from_timestamp_micros(clock.watermark).map(|w| w.to_rfc3339()).unwrap_or_default()
                    ),
                ));
            }
        }
        let result = self.apply_checked(e, &rules, program, prog);
        // Applied or refused, the id is remembered: a redelivery of either is a
        // duplicate, so replaying a stream with redeliveries inserted gives the
        // same ledger whatever arrived in between.
        self.dedupe.insert(prog, key, fp, ts);
        result?;
        self.meta.seq += 1;
        self.advance(prog, ts);
        Ok(Outcome::Applied)
    }

    fn apply_checked(
        &mut self,
        e: &Event<'_>,
        rules: &Rules,
        program: &afflio_rules::Program,
        prog: u32,
    ) -> Result<(), Reject> {
        // Clicks, the bulk of the traffic, check their link in `apply_click`
        // (once per link under these rules); the other types here.
        if !matches!(e.body, Body::Click(_)) {
            validate::check_body(rules, program, e)?;
        }
        match &e.body {
            Body::Click(c) => self.apply_click(e, c, rules, program, prog),
            Body::Capture(c) => self.apply_capture(e, c, rules, program, prog),
            Body::Refund(r) => self.apply_refund(e, r, rules, program, prog),
            Body::Review(r) => self.apply_review(e, r, program, prog),
            Body::Payout(p) => self.apply_payout(e, p, program, prog),
            Body::Lead(l) => self.apply_lead(e, l, rules, program, prog),
            Body::LeadStage(s) => self.apply_lead_stage(e, s, rules, program, prog),
            Body::Payment(p) => self.apply_payment(e, p, rules, program, prog),
            Body::Cancel(c) => self.apply_cancel(e, c, program, prog),
            Body::Registry(r) => self.apply_registry(e, r, rules, program, prog),
        }
    }

    /// Moves a program's clock to `ts` and runs what is due: forgetting old
    /// event ids, closing idle orders, sweeping velocity keys and sessions.
    fn advance(&mut self, prog: u32, ts: i64) {
        let rules = Arc::clone(&self.rules);
        let cfg = rules.engine();
        let Some(program) = rules.program(self.names.name(prog)) else { return };
        let horizon = micros(program.window).saturating_add(micros(cfg.out_of_order));
        let clock = self.meta.clocks.entry(prog).or_insert(Clock {
            watermark: ts,
            next_sweep: i64::MIN,
            next_session_sweep: ts.saturating_add((horizon / 4).max(60 * MICROS_PER_SEC)),
        });
        let wm = clock.watermark.max(ts);
        clock.watermark = wm;
        let sweep_due = wm >= clock.next_sweep;
        let sessions_due = wm >= clock.next_session_sweep;
        if sweep_due {
            clock.next_sweep = wm.saturating_add((horizon / 16).max(60 * MICROS_PER_SEC));
        }
        self.dedupe.evict_before(prog, wm.saturating_sub(micros(cfg.dedupe_retention)));
        if sweep_due {
            let cutoff = wm.saturating_sub(micros(cfg.order_retention));
            self.close_orders_before(prog, cutoff);
            if let Some(at) = DateTime::from_timestamp_micros(cutoff) {
                self.forget_subscriptions_before(prog, program, at);
            }
            let window = micros(program.fraud.velocity_window);
            self.velocity.sweep(|p| (p == prog).then(|| wm.saturating_sub(window)));
        }
        if sessions_due {
            // Every sweep visits every tracked session: sweeping each quarter
            // of a program's horizon costs ~5 visits per session's life and
            // keeps at most 25% beyond the horizon. One pass serves every
            // program, each at its own cutoff.
            let mut cutoffs: HashMap<u32, i64> = HashMap::new();
            for (&p, c) in self.meta.clocks.iter_mut() {
                let Some(pr) = rules.program(self.names.name(p)) else { continue };
                let h = micros(pr.window).saturating_add(micros(cfg.out_of_order));
                cutoffs.insert(p, c.watermark.saturating_sub(h));
                c.next_session_sweep = c.watermark.saturating_add((h / 4).max(60 * MICROS_PER_SEC));
            }
            self.sessions.evict_before(|p| cutoffs.get(&p).copied());
        }
    }

    /// Turns change tracking (what incremental checkpoints and state-table
    /// writes need) on or off. A replay that writes a full image at its end
    /// keeps no change sets.
    pub fn set_tracking(&mut self, on: bool) {
        self.sessions.visitors.set_tracking(on);
        self.orders.set_tracking(on);
        self.code_uses.set_tracking(on);
        self.velocity.keys.set_tracking(on);
        self.leak.set_tracking(on);
        self.spike.partners.set_tracking(on);
        self.balances.set_tracking(on);
        self.refunds_by_partner.set_tracking(on);
        self.registry.set_tracking(on);
        self.subscriptions.set_tracking(on);
        if !on {
            self.balance_changes.clear();
        }
    }
}

/// Sizes of the engine's bounded state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    pub visitors: usize,
    pub clicks: usize,
    pub dedupe_ids: usize,
    pub orders: usize,
    pub velocity_keys: usize,
    pub names: usize,
}

impl MemoryReport {
    /// An estimate of the state's memory, bytes: the sizes of its entries
    /// (40 per one-click session, 16 per further click, 56 per remembered id,
    /// ~700 per open order with its lines, 64 per velocity key, 48 per name).
    pub fn estimated_bytes(&self) -> u64 {
        let extra_clicks = self.clicks.saturating_sub(self.visitors) as u64;
        self.visitors as u64 * 40
            + extra_clicks * 16
            + self.dedupe_ids as u64 * 56
            + self.orders as u64 * 700
            + self.velocity_keys as u64 * 64
            + self.names as u64 * 48
    }
}
