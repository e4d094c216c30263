//! Checkpoints: the engine's state as bytes, whole (an image) or as the
//! changes since the previous checkpoint (a delta).
//!
//! Both have one format: an image is a delta from an empty engine. Each
//! part of the state contributes what changed: the keyed maps their changed
//! keys (with `None` for a removed one), the append-only logs (names, click
//! targets, event ids) what they appended and how far they were trimmed, and
//! the scalars (clocks, counters, spike buckets) themselves. So a delta's
//! size follows what changed since the last one, not what is kept, and
//! restoring an image and then every delta in order gives the state again,
//! exactly.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use afflio_rules::Rules;
use serde::{Deserialize, Serialize};

use super::conversions::Subscription;
use super::payouts::PartnerBalance;
use super::{Engine, Meta};
use crate::dedupe::LogDelta;
use crate::fraud::{KeyOrders, LeakWindow, RefundWindow, SpikePartner};
use crate::registry::{Application, ListingState, RegPartner, Registry};
use crate::sessions::{IdKey, PreHashed, Visitor};
use crate::state::order::OrdersDelta;
use crate::state::tracked::Delta;
use crate::state::Order;

/// Why a checkpoint could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A bug in the caller: output must be taken (and made durable) first.
    #[error("internal error: checkpoint with {0} output rows not taken")]
    PendingOutput(usize),
    /// The bytes are not a checkpoint of this version (external: a corrupt or foreign file).
    #[error("not an Afflio engine checkpoint (or a different version)")]
    Format,
    /// Deltas applied out of order, or without their image (external: files
    /// missing or mixed up).
    #[error("checkpoint out of sequence: {0}")]
    Sequence(String),
    #[error("checkpoint encoding: {0}")]
    Encoding(#[from] postcard::Error),
}

const MAGIC: &[u8] = b"AFFLIO-ENGINE-CKPT-6\n";

type H = hashbrown::DefaultHashBuilder;

#[derive(Serialize)]
struct ImageOut<'a> {
    full: bool,
    meta: &'a Meta,
    names_from: u32,
    names: &'a [Arc<str>],
    targets_from: u32,
    targets: &'a [[u32; 3]],
    visitors: Delta<'a, IdKey, Visitor, PreHashed>,
    dedupe: Vec<LogDelta>,
    orders_next: u64,
    orders: OrdersDelta<'a>,
    code_uses: Delta<'a, (u32, u32), u64, H>,
    velocity: Delta<'a, (u32, u64), KeyOrders, H>,
    leak: Delta<'a, (u32, u32), LeakWindow, H>,
    spike_buckets: &'a BTreeMap<u32, VecDeque<(i64, u32)>>,
    spike: Delta<'a, (u32, u32), SpikePartner, H>,
    balances: Delta<'a, (u32, u32), PartnerBalance, H>,
    refunds: Delta<'a, (u32, u32), RefundWindow, H>,
    registry: RegistryOut<'a>,
    subscriptions: Delta<'a, u128, Box<Subscription>, H>,
}

#[derive(Serialize)]
struct RegistryOut<'a> {
    listings: Delta<'a, u32, ListingState, H>,
    applications: Delta<'a, (u32, u32), Box<Application>, H>,
    partners: Delta<'a, u32, Box<RegPartner>, H>,
    links: Delta<'a, u32, afflio_rules::Link, H>,
    codes: Delta<'a, (u32, u32), afflio_rules::Code, H>,
    claimed: Delta<'a, u32, (u32, u32), H>,
}

#[derive(Deserialize)]
struct RegistryIn {
    listings: Entries<u32, ListingState>,
    applications: Entries<(u32, u32), Box<Application>>,
    partners: Entries<u32, Box<RegPartner>>,
    links: Entries<u32, afflio_rules::Link>,
    codes: Entries<(u32, u32), afflio_rules::Code>,
    claimed: Entries<u32, (u32, u32)>,
}

impl Registry {
    fn full(&self) -> RegistryOut<'_> {
        RegistryOut {
            listings: self.listings.full(),
            applications: self.applications.full(),
            partners: self.partners.full(),
            links: self.links.full(),
            codes: self.codes.full(),
            claimed: self.claimed.full(),
        }
    }

    fn take_delta(&mut self) -> RegistryOut<'_> {
        RegistryOut {
            listings: self.listings.take_delta(),
            applications: self.applications.take_delta(),
            partners: self.partners.take_delta(),
            links: self.links.take_delta(),
            codes: self.codes.take_delta(),
            claimed: self.claimed.take_delta(),
        }
    }

    fn apply(&mut self, r: RegistryIn) {
        self.listings.apply(r.listings);
        self.applications.apply(r.applications);
        self.partners.apply(r.partners);
        self.links.apply(r.links);
        self.codes.apply(r.codes);
        self.claimed.apply(r.claimed);
    }

    fn clear_changes(&mut self) {
        self.listings.clear_changes();
        self.applications.clear_changes();
        self.partners.clear_changes();
        self.links.clear_changes();
        self.codes.clear_changes();
        self.claimed.clear_changes();
    }

    fn changed(&self) -> usize {
        self.listings.changed()
            + self.applications.changed()
            + self.partners.changed()
            + self.links.changed()
            + self.codes.changed()
            + self.claimed.changed()
    }

    /// Every entry in key order, sets sorted (their iteration order is a hasher's).
    fn canonical(&self) -> String {
        fn sorted<K: Ord + Copy, V>(it: impl Iterator<Item = (K, V)>) -> Vec<(K, V)> {
            let mut v: Vec<_> = it.collect();
            v.sort_by_key(|(k, _)| *k);
            v
        }
        let partner = |r: &RegPartner| {
            let p = &r.partner;
            let mut emails: Vec<_> = p.email_sha256.iter().collect();
            emails.sort();
            let mut ids: Vec<_> = p.customer_ids.iter().collect();
            ids.sort();
            let mut cats: Vec<_> = p.category_rates.iter().collect();
            cats.sort_by(|a, b| a.0.cmp(b.0));
            format!(
                "{} {} {:?} {:?} {emails:?} {ids:?} {cats:?} {:?} {} {} {} {} {} {:?} {:?}",
                p.id,
                p.program_id,
                p.parent,
                p.rate,
                p.payout,
                r.display_name,
                r.email,
                r.active,
                r.token_epoch,
                r.joined_at,
                r.links,
                r.codes
            )
        };
        format!(
            "listings {:?}\napplications {:?}\npartners {:?}\nlinks {:?}\ncodes {:?}\nclaimed {:?}\n",
            sorted(self.listings.iter().map(|(k, v)| (*k, v))),
            sorted(self.applications.iter().map(|(k, v)| (*k, v))),
            sorted(self.partners.iter().map(|(k, v)| (*k, partner(v)))),
            sorted(self.links.iter().map(|(k, v)| (*k, v))),
            sorted(self.codes.iter().map(|(k, v)| (*k, v))),
            sorted(self.claimed.iter().map(|(k, v)| (*k, v))),
        )
    }
}

type Entries<K, V> = Vec<(K, Option<V>)>;

#[derive(Deserialize)]
struct ImageIn {
    full: bool,
    meta: Meta,
    names_from: u32,
    names: Vec<Arc<str>>,
    targets_from: u32,
    targets: Vec<[u32; 3]>,
    visitors: Entries<IdKey, Visitor>,
    dedupe: Vec<LogDelta>,
    orders_next: u64,
    orders: Entries<u64, Order>,
    code_uses: Entries<(u32, u32), u64>,
    velocity: Entries<(u32, u64), KeyOrders>,
    leak: Entries<(u32, u32), LeakWindow>,
    spike_buckets: BTreeMap<u32, VecDeque<(i64, u32)>>,
    spike: Entries<(u32, u32), SpikePartner>,
    balances: Entries<(u32, u32), PartnerBalance>,
    refunds: Entries<(u32, u32), RefundWindow>,
    registry: RegistryIn,
    subscriptions: Entries<u128, Box<Subscription>>,
}

fn encode(img: &ImageOut<'_>) -> Result<Vec<u8>, CheckpointError> {
    Ok(postcard::to_extend(img, MAGIC.to_vec())?)
}

impl Engine {
    /// The whole state as bytes (an image), for a durable checkpoint. The
    /// rules are not included (they come from the config); output must have
    /// been taken. Change marks are kept: an image does not replace the deltas.
    pub fn checkpoint(&self) -> Result<Vec<u8>, CheckpointError> {
        if !self.out.is_empty() {
            return Err(CheckpointError::PendingOutput(self.out.len()));
        }
        encode(&ImageOut {
            full: true,
            meta: &self.meta,
            names_from: 0,
            names: self.names.all(),
            targets_from: 0,
            targets: &self.sessions.targets,
            visitors: self.sessions.visitors.full(),
            dedupe: self.dedupe.full(),
            orders_next: self.orders.next_seq,
            orders: self.orders.full(),
            code_uses: self.code_uses.full(),
            velocity: self.velocity.keys.full(),
            leak: self.leak.full(),
            spike_buckets: &self.spike.buckets,
            spike: self.spike.partners.full(),
            balances: self.balances.full(),
            refunds: self.refunds_by_partner.full(),
            registry: self.registry.full(),
            subscriptions: self.subscriptions.full(),
        })
    }

    /// What changed since the previous delta (or since the engine was
    /// created or restored), as bytes; the change marks are cleared. Output
    /// must have been taken: the delta and the rows are durable together.
    pub fn checkpoint_delta(&mut self) -> Result<Vec<u8>, CheckpointError> {
        if !self.out.is_empty() {
            return Err(CheckpointError::PendingOutput(self.out.len()));
        }
        let (names_from, names) = self.names.take_delta();
        let targets_from = self.targets_mark.min(self.sessions.targets.len());
        self.targets_mark = self.sessions.targets.len();
        encode(&ImageOut {
            full: false,
            meta: &self.meta,
            names_from,
            names,
            targets_from: targets_from as u32,
            targets: &self.sessions.targets[targets_from..],
            visitors: self.sessions.visitors.take_delta(),
            dedupe: self.dedupe.take_delta(),
            orders_next: self.orders.next_seq,
            orders: self.orders.take_delta(),
            code_uses: self.code_uses.take_delta(),
            velocity: self.velocity.keys.take_delta(),
            leak: self.leak.take_delta(),
            spike_buckets: &self.spike.buckets,
            spike: self.spike.partners.take_delta(),
            balances: self.balances.take_delta(),
            refunds: self.refunds_by_partner.take_delta(),
            registry: self.registry.take_delta(),
            subscriptions: self.subscriptions.take_delta(),
        })
    }

    /// Keyed entries changed since the last delta (an estimate of its size).
    pub fn pending_changes(&self) -> usize {
        self.sessions.visitors.changed()
            + self.code_uses.changed()
            + self.velocity.keys.changed()
            + self.leak.changed()
            + self.spike.partners.changed()
            + self.balances.changed()
            + self.refunds_by_partner.changed()
            + self.registry.changed()
            + self.subscriptions.changed()
    }

    /// An engine in the state of `checkpoint` (an image), with `rules`.
    pub fn restore(rules: Arc<Rules>, checkpoint: &[u8]) -> Result<Engine, CheckpointError> {
        Engine::restore_chain(rules, checkpoint, std::iter::empty::<&[u8]>())
    }

    /// An engine in the state of an image followed by its deltas, in order.
    pub fn restore_chain<'a>(
        rules: Arc<Rules>,
        image: &[u8],
        deltas: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Engine, CheckpointError> {
        let mut e = Engine::new(rules.clone());
        e.apply_image(image, true)?;
        for d in deltas {
            e.apply_image(d, false)?;
        }
        e.finish_restore();
        e.set_rules(rules);
        Ok(e)
    }

    fn apply_image(&mut self, bytes: &[u8], first: bool) -> Result<(), CheckpointError> {
        let body = bytes.strip_prefix(MAGIC).ok_or(CheckpointError::Format)?;
        let img: ImageIn = postcard::from_bytes(body)?;
        let seq = |m: String| CheckpointError::Sequence(m);
        if first && !img.full {
            return Err(seq("the first checkpoint file is a delta, not an image".into()));
        }
        if !first && img.full {
            return Err(seq("an image after the first checkpoint file".into()));
        }
        self.meta = img.meta;
        self.names.apply(img.names_from, img.names).map_err(seq)?;
        self.sessions.restore_targets(img.targets_from as usize, img.targets).map_err(seq)?;
        self.sessions.visitors.apply(img.visitors);
        self.dedupe.apply(img.dedupe).map_err(seq)?;
        self.orders.apply(img.orders_next, img.orders);
        self.code_uses.apply(img.code_uses);
        self.velocity.keys.apply(img.velocity);
        self.leak.apply(img.leak);
        self.spike.buckets = img.spike_buckets;
        self.spike.partners.apply(img.spike);
        self.balances.apply(img.balances);
        self.refunds_by_partner.apply(img.refunds);
        self.registry.apply(img.registry);
        self.subscriptions.apply(img.subscriptions);
        Ok(())
    }

    /// Rebuilds what is derived from the restored state and clears the change marks.
    fn finish_restore(&mut self) {
        let names = &mut self.names;
        self.orders.reindex(|p| names.intern(p));
        self.sessions.recount();
        self.velocity.recount();
        self.sessions.visitors.clear_changes();
        self.dedupe.clear_changes();
        self.code_uses.clear_changes();
        self.velocity.keys.clear_changes();
        self.leak.clear_changes();
        self.spike.partners.clear_changes();
        self.balances.clear_changes();
        self.refunds_by_partner.clear_changes();
        self.registry.clear_changes();
        self.registry.recount();
        self.subscriptions.clear_changes();
        self.names.take_delta();
        self.targets_mark = self.sessions.targets.len();
        self.balance_changes.clear();
    }
}

impl Engine {
    /// A fingerprint of the whole state, the same for equal states whatever
    /// their history (maps are read in key order): to check a restore
    /// against the engine that wrote it. Costs a pass over the state.
    pub fn state_fingerprint(&self) -> u128 {
        xxhash_rust::xxh3::xxh3_128(self.canonical().as_bytes())
    }

    /// Every part of the state in a canonical order, for equality checks.
    pub(crate) fn canonical(&self) -> String {
        fn sorted<K: Ord + std::fmt::Debug + Copy, V: std::fmt::Debug>(
            it: impl Iterator<Item = (K, V)>,
        ) -> Vec<(K, V)> {
            let mut v: Vec<_> = it.collect();
            v.sort_by_key(|(k, _)| *k);
            v
        }
        let mut s = String::new();
        use std::fmt::Write as _;
        let _ = writeln!(s, "meta {:?}", self.meta);
        let _ = writeln!(s, "names {:?}", self.names.all());
        let _ = writeln!(s, "targets {:?}", self.sessions.targets);
        let _ = writeln!(s, "visitors {:?}", sorted(self.sessions.visitors.iter().map(|(k, v)| (*k, v))));
        let _ = writeln!(s, "dedupe {:?}", self.dedupe.canonical());
        let _ = writeln!(s, "orders next {} {:?}", self.orders.next_seq, self.orders.iter().collect::<Vec<_>>());
        let _ = writeln!(s, "code_uses {:?}", sorted(self.code_uses.iter().map(|(k, v)| (*k, v))));
        let _ = writeln!(s, "velocity {:?}", sorted(self.velocity.keys.iter().map(|(k, v)| (*k, v))));
        let _ = writeln!(s, "leak {:?}", sorted(self.leak.iter().map(|(k, v)| (*k, v))));
        let _ = writeln!(s, "spike buckets {:?}", self.spike.buckets);
        let _ = writeln!(s, "spike {:?}", sorted(self.spike.partners.iter().map(|(k, v)| (*k, v))));
        let balances: Vec<_> = sorted(self.balances.iter().map(|(k, v)| (*k, v)))
            .into_iter()
            .map(|(k, v)| {
                let mut items: Vec<_> = v.items.iter().collect();
                items.sort_by_key(|(b, _)| (*b).clone());
                (k, v.paid, v.in_flight, v.closed_approved, items)
            })
            .collect();
        let _ = writeln!(s, "balances {balances:?}");
        let _ = writeln!(s, "refunds {:?}", sorted(self.refunds_by_partner.iter().map(|(k, v)| (*k, v))));
        let _ = writeln!(s, "subscriptions {:?}", sorted(self.subscriptions.iter().map(|(k, v)| (*k, v))));
        s.push_str(&self.registry.canonical());
        s
    }
}

#[cfg(test)]
mod tests;
