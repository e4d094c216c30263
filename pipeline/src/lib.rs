//! Afflio pipeline: the live service's path from the broker to the store.
//!
//! One ordered consumer applies the stream's events to the engine (its
//! decisions exist as soon as an event is applied) and cuts the stream into
//! epochs; a committer writes each epoch to the store (every table, with the
//! epoch's stream position as a Delta transaction) and then checkpoints the
//! engine incrementally (only what changed) through a [`state::StateBackend`].
//! A restart restores the last checkpoint and re-reads the stream after it;
//! rows a table already holds are recognised by its position and skipped.
//! ARCHITECTURE.md has the protocol in full.

mod committer;
mod consumer;
mod error;
mod finance;
mod market;
mod serve;
pub mod state;
pub mod webhooks;

pub use error::PipelineError;
pub use serve::{run, ServeOptions};

/// The Delta application id of the event stream's writer: each table's
/// transaction is `<APP>:<table>`.
pub fn app_id() -> String {
    format!("afflio:{}", afflio_ingest::nats::STREAM)
}
