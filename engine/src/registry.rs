//! The partner registry: marketplace listings, creators' applications, and
//! the partners, links and codes that approval (or a brand) creates.
//!
//! Registry changes are events on the same stream as the money (types
//! `program_published`, `partner_applied`, `application_decided`,
//! `link_created`, `code_created`, `partner_updated`), applied by the engine
//! in stream order: a replay gives the same registry, every change is
//! audited, and a link or code exists from its event on (never before: a
//! click or an order earlier in the stream is not credited retroactively).
//! The rules file keeps program-level settings and can seed partners, links
//! and codes; what it defines is looked up first and cannot be replaced by an
//! event (ids are unique across both).
//!
//! Every part is a [`Tracked`] map keyed by interned names, so an update
//! costs one map insert and a checkpoint delta holds only the changed
//! entries, however many partners there are.

use afflio_rules::{Code, Link, Listing, Partner, Payout};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::state::tracked::Tracked;

/// At most this many links or codes per partner (beyond: refused).
pub const MAX_PER_PARTNER: usize = 100;
/// At most this many channels on an application.
pub const MAX_CHANNELS: usize = 10;
/// Free text fields (description, terms, audience, reason) are at most this long.
pub const MAX_TEXT: usize = 4096;
/// At most this many applications wait for a decision in one program (a
/// flood of applications cannot grow the registry without bound).
pub const MAX_PENDING: u64 = 100_000;
/// At most this many applications (of any status) per program: the
/// registry's bound (each approved one is a partner, a link and a code).
pub const MAX_APPLICATIONS: u64 = 5_000_000;

/// A registry event's content (owned: registry events are rare).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RegistryEvent {
    /// A program's listing in the marketplace (listed, or taken down).
    ProgramPublished(Publish),
    /// A creator applies to a program.
    PartnerApplied(Apply),
    /// The brand approves or rejects an application.
    ApplicationDecided(Decide),
    /// A further tracking link for a partner.
    LinkCreated(NewLink),
    /// A further promo code for a partner.
    CodeCreated(NewCode),
    /// A registry partner's profile, payout destination, identities or status.
    PartnerUpdated(UpdatePartner),
}

impl RegistryEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            RegistryEvent::ProgramPublished(_) => "program_published",
            RegistryEvent::PartnerApplied(_) => "partner_applied",
            RegistryEvent::ApplicationDecided(_) => "application_decided",
            RegistryEvent::LinkCreated(_) => "link_created",
            RegistryEvent::CodeCreated(_) => "code_created",
            RegistryEvent::PartnerUpdated(_) => "partner_updated",
        }
    }

    /// The canonical bytes of the content (postcard of the typed value: the
    /// field order is the struct's, so equal content gives equal bytes).
    pub(crate) fn canonical(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub terms: String,
    #[serde(default)]
    pub category: String,
    /// `false` takes the program out of the marketplace (applications are refused).
    #[serde(default = "yes")]
    pub listed: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Apply {
    pub application_id: String,
    /// The partner id the creator asks for (unique across the service).
    pub partner_id: String,
    pub display_name: String,
    /// The creator's contact address (also an identity for self-referral).
    pub email: String,
    #[serde(default)]
    pub audience: String,
    /// Links to the creator's channels.
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(default)]
    pub payout: Option<Payout>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approve,
    Reject,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decide {
    pub application_id: String,
    pub decision: Verdict,
    #[serde(default)]
    pub reason: Option<String>,
    pub decided_by: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLink {
    pub link_id: String,
    pub partner_id: String,
    #[serde(default)]
    pub destination: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCode {
    pub code: String,
    pub partner_id: String,
    #[serde(default)]
    pub starts_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub max_uses: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdatePartner {
    pub partner_id: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub payout: Option<Payout>,
    /// Replaces the partner's own e-mail hashes (self-referral identities).
    #[serde(default)]
    pub email_sha256: Option<Vec<String>>,
    #[serde(default)]
    pub customer_ids: Option<Vec<String>>,
    /// `false` suspends the partner: its links and codes stop crediting.
    #[serde(default)]
    pub active: Option<bool>,
    /// Invalidates the partner's access token (a new one is derived).
    #[serde(default)]
    pub rotate_token: bool,
}

/// Where an application stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppStatus {
    Pending,
    Approved,
    Rejected,
}

impl AppStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AppStatus::Pending => "pending",
            AppStatus::Approved => "approved",
            AppStatus::Rejected => "rejected",
        }
    }
}

/// An application as the registry keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Application {
    pub program_id: String,
    pub apply: Apply,
    pub applied_at: DateTime<Utc>,
    pub status: AppStatus,
    pub reason: Option<String>,
    pub decided_by: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
}

/// A partner created by the registry (approval).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegPartner {
    pub partner: Partner,
    pub display_name: String,
    pub email: String,
    pub active: bool,
    /// Increased by `rotate_token`: older access tokens stop working.
    pub token_epoch: u32,
    pub joined_at: DateTime<Utc>,
    pub application_id: String,
    /// Its links and codes (normalised), in creation order.
    pub links: Vec<String>,
    pub codes: Vec<String>,
}

/// A program's listing as the registry keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListingState {
    pub listing: Listing,
    pub listed: bool,
    pub published_at: DateTime<Utc>,
}

/// The registry's state.
#[derive(Clone, Debug, Default)]
pub(crate) struct Registry {
    /// Program -> its listing (when an event published one).
    pub(crate) listings: Tracked<u32, ListingState>,
    /// (program, application id) -> application. Boxed: a map's slack
    /// (up to half its slots) then costs a pointer, not a record.
    pub(crate) applications: Tracked<(u32, u32), Box<Application>>,
    /// Partner id -> partner (boxed, as above).
    pub(crate) partners: Tracked<u32, Box<RegPartner>>,
    /// Link id -> link.
    pub(crate) links: Tracked<u32, Link>,
    /// (program, normalised code) -> code.
    pub(crate) codes: Tracked<(u32, u32), Code>,
    /// Partner ids asked for by pending or decided applications (taken).
    pub(crate) claimed: Tracked<u32, (u32, u32)>,
    /// Per program: applications in all and pending (derived: rebuilt on restore).
    pub(crate) counts: hashbrown::HashMap<u32, (u64, u64)>,
}

impl Registry {
    /// Rebuilds the derived counts from the applications.
    pub(crate) fn recount(&mut self) {
        self.counts.clear();
        for ((p, _), a) in self.applications.iter() {
            let c = self.counts.entry(*p).or_default();
            c.0 += 1;
            c.1 += u64::from(a.status == AppStatus::Pending);
        }
    }

    pub(crate) fn set_tracking(&mut self, on: bool) {
        self.listings.set_tracking(on);
        self.applications.set_tracking(on);
        self.partners.set_tracking(on);
        self.links.set_tracking(on);
        self.codes.set_tracking(on);
        self.claimed.set_tracking(on);
    }
}
