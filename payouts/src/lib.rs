//! Afflio payouts: the approvals queue and the providers that move the
//! money.
//!
//! Providers are components: one directory per provider ([`razorpayx`],
//! [`paypal`]) behind one small trait ([`Provider`]: create, look up,
//! verify a webhook), each with a strict fake beside it, written from the
//! provider's API reference. The [`Queue`] plans batches from approved
//! balances, fixes each item's identity with its provider when it is
//! planned, records every attempt before it is made, and resolves an
//! unknown outcome by asking, never by sending blindly again. It reads and
//! records through a [`Book`]: the replayed store offline, the engine behind
//! the event stream in the live service.

pub mod paypal;
mod provider;
mod queue;
pub mod razorpayx;
mod request;
pub mod sandbox;

pub use provider::{secret, HttpSettings, Provider};
pub use queue::{Book, BookError, Plan, PlannedItem, Queue, QueueError, Report};
pub use request::{
    group_id, item_key, provider_name, Answer, Destination, Planned, Request, Target, Update, Webhook, WebhookError,
};
