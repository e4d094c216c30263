//! NATS JetStream: the durable log between ingest and the engine.

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use futures::future::{join_all, BoxFuture};

use crate::http::{Message, PublishError, PublishOutcome, Publisher};

/// The stream holding every event.
pub const STREAM: &str = "AFFLIO_EVENTS";
/// Subjects: `afflio.events.<program_id>.<type>`.
pub const SUBJECTS: &str = "afflio.events.>";

/// Why the broker could not be used (an external problem).
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect { url: String, source: async_nats::ConnectError },
    #[error("NATS at {url} has no JetStream (start nats-server with -js): {detail}")]
    NoJetStream { url: String, detail: String },
    #[error("cannot create or check stream {STREAM}: {0}")]
    Stream(String),
}

/// The subject of an event: program ids are made safe as subject tokens.
pub fn subject(program_id: &str, event_type: &str) -> String {
    let token: String =
        program_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("afflio.events.{token}.{event_type}")
}

/// Connects and makes sure the stream exists with file storage and a
/// duplicate window.
pub async fn connect(
    url: &str,
    duplicate_window: Duration,
) -> Result<(async_nats::Client, jetstream::Context), NatsError> {
    let client = async_nats::ConnectOptions::new()
        .name("afflio")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|source| NatsError::Connect { url: url.to_string(), source })?;
    let js = jetstream::new(client.clone());
    js.get_or_create_stream(stream::Config {
        name: STREAM.to_string(),
        subjects: vec![SUBJECTS.to_string()],
        storage: stream::StorageType::File,
        duplicate_window,
        ..Default::default()
    })
    .await
    .map_err(|e| {
        let detail = e.to_string();
        let lower = detail.to_lowercase();
        if lower.contains("no responders") || lower.contains("jetstream not enabled") || lower.contains("timed out") {
            NatsError::NoJetStream { url: url.to_string(), detail }
        } else {
            NatsError::Stream(detail)
        }
    })?;
    Ok((client, js))
}

/// Publishes to JetStream and waits for the broker's acknowledgement.
#[derive(Clone)]
pub struct JetStreamPublisher {
    js: jetstream::Context,
    client: async_nats::Client,
}

impl JetStreamPublisher {
    pub fn new(client: async_nats::Client, js: jetstream::Context) -> Self {
        JetStreamPublisher { js, client }
    }
}

impl Publisher for JetStreamPublisher {
    fn publish(&self, msgs: Vec<Message>) -> BoxFuture<'static, Vec<Result<PublishOutcome, PublishError>>> {
        let js = self.js.clone();
        Box::pin(async move {
            // Sent one after the other (the stream keeps this order), then all
            // acknowledgements awaited together.
            let mut acks = Vec::with_capacity(msgs.len());
            for (subject, msg_id, payload) in msgs {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", msg_id.as_str());
                acks.push(
                    js.publish_with_headers(subject, headers, payload).await.map_err(|e| PublishError(e.to_string())),
                );
            }
            join_all(acks.into_iter().map(|ack| async move {
                let ack = ack?;
                let ack = tokio::time::timeout(Duration::from_secs(5), ack.into_future())
                    .await
                    .map_err(|_| PublishError("no acknowledgement from the broker within 5s".into()))?
                    .map_err(|e| PublishError(e.to_string()))?;
                Ok(if ack.duplicate { PublishOutcome::Duplicate } else { PublishOutcome::Stored })
            }))
            .await
        })
    }

    fn ready(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}
