//! Webhooks out: the engine's effects (commissions created, reversed and
//! approved, orders attributed, leads, fraud flags, payouts, partners) sent
//! to the brands' and partners' endpoints, signed per the Standard Webhooks
//! specification, at least once, in order per endpoint and subject.
//!
//! A sink like the store: the committer publishes each epoch's messages to
//! a JetStream stream (the outbox) before committing the epoch; one durable
//! consumer per endpoint delivers them, with retries for up to three days;
//! every attempt is a row of the `deliveries` table.

pub(crate) mod bench;
pub(crate) mod deliver;
pub(crate) mod endpoints;
pub(crate) mod outbox;
pub(crate) mod replay;

use std::path::Path;
use std::sync::Arc;

use afflio_engine::rules::Rules;
use async_nats::jetstream;
use tokio::sync::watch;

pub use bench::{delivery_throughput, webhook_messages, DeliveryResult};
pub use deliver::DeliverySettings;
pub use replay::{replay, ReplayOptions, ReplaySummary};

use crate::error::PipelineError;

/// What runs the webhooks of a service.
pub(crate) struct Webhooks {
    pub(crate) outbox: outbox::Outbox,
    pub(crate) endpoints: Arc<endpoints::Endpoints>,
}

/// Opens the outbox and the endpoints and starts delivering.
pub(crate) async fn start(
    js: &jetstream::Context,
    rules: &Rules,
    data: &Path,
    settings: DeliverySettings,
    stop: watch::Receiver<bool>,
) -> Result<Webhooks, PipelineError> {
    outbox::ensure_stream(js).await?;
    let next = next_position(js).await?;
    let endpoints = Arc::new(endpoints::Endpoints::open(js, rules.webhooks(), next).await?);
    deliver::spawn(js, endpoints.clone(), data, settings, stop).await?;
    Ok(Webhooks { outbox: outbox::Outbox { js: js.clone(), endpoints: endpoints.clone() }, endpoints })
}

/// The outbox stream's next position (where a new endpoint starts).
pub(crate) async fn next_position(js: &jetstream::Context) -> Result<u64, PipelineError> {
    let mut s = js.get_stream(outbox::STREAM).await.map_err(|e| PipelineError::Broker(e.to_string()))?;
    Ok(s.info().await.map_err(|e| PipelineError::Broker(e.to_string()))?.state.last_sequence + 1)
}
