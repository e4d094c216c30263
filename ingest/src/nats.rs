//! NATS JetStream: the durable log between ingest and the engine.
//!
//! Credentials come from the environment, never the command line or a file
//! the service writes. Each connection is for one role: the ingest's
//! (publishes events) and the engine's (consumes them); each may use its
//! own broker user, so that the broker itself enforces that only the ingest
//! publishes to `afflio.events.>` and only the engine consumes:
//!
//! | variable (ROLE = INGEST or ENGINE) | meaning |
//! |---|---|
//! | `AFFLIO_NATS_<ROLE>_USER`, `..._PASSWORD` | user and password |
//! | `AFFLIO_NATS_<ROLE>_TOKEN` | a token |
//! | `AFFLIO_NATS_<ROLE>_CREDS` | a `.creds` file (JWT and nkey seed) |
//! | `AFFLIO_NATS_<ROLE>_NKEY` | an nkey seed |
//! | `AFFLIO_NATS_TLS_CA`, `AFFLIO_NATS_TLS_CERT`, `AFFLIO_NATS_TLS_KEY` | TLS: root CA, client certificate and key |
//! | `AFFLIO_NATS_TLS` = `1` | require TLS |
//!
//! Without `AFFLIO_NATS_ENGINE_*`, the engine uses the ingest's credentials.
//!
//! Direct publishers (a retailer's own NATS client, with the ingest user's
//! permissions) publish one event per message: subject
//! `afflio.events.<program_id>.<type>`, payload the event's JSON, and
//! `Nats-Msg-Id` either absent or [`message_id`]-shaped: `<program_id>:<event_id>:<digest of the
//! content>`. An id that does not change with the content would let the
//! broker drop a conflicting reuse of an event id before the engine records it.

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

/// Why the broker could not be used (an external problem, or the
/// configuration's).
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect { url: String, source: async_nats::ConnectError },
    #[error("NATS credentials: {0}")]
    Credentials(String),
    #[error("stream {STREAM}: {0}")]
    Stream(String),
}

/// The subject of an event: program ids are made safe as subject tokens.
pub fn subject(program_id: &str, event_type: &str) -> String {
    let token: String =
        program_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("afflio.events.{token}.{event_type}")
}

/// The `Nats-Msg-Id` of one event: its program, its id and its content's
/// fingerprint, so that the broker drops an exact repeat and lets a
/// conflicting reuse of the id through to the engine.
pub fn message_id(program_id: &str, event_id: &str, fingerprint: u128) -> String {
    format!("{program_id}:{event_id}:{fingerprint:032x}")
}

/// Which connection: the ingest's or the engine's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Ingest,
    Engine,
}

impl Role {
    fn prefix(self) -> &'static str {
        match self {
            Role::Ingest => "AFFLIO_NATS_INGEST_",
            Role::Engine => "AFFLIO_NATS_ENGINE_",
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Connection options for `role` from the environment (see the module docs).
pub async fn options(role: Role) -> Result<async_nats::ConnectOptions, NatsError> {
    let own = |k: &str| var(&format!("{}{k}", role.prefix()));
    let ingest = |k: &str| var(&format!("{}{k}", Role::Ingest.prefix()));
    // The engine falls back to the ingest's credentials when it has none of its own.
    let has_own = ["USER", "TOKEN", "CREDS", "NKEY"].iter().any(|k| own(k).is_some());
    let get = |k: &str| if has_own || role == Role::Ingest { own(k) } else { ingest(k) };
    let mut o = async_nats::ConnectOptions::new();
    if let Some(user) = get("USER") {
        let password = get("PASSWORD").ok_or_else(|| {
            NatsError::Credentials(format!("{}USER is set but {}PASSWORD is not", role.prefix(), role.prefix()))
        })?;
        o = async_nats::ConnectOptions::with_user_and_password(user, password);
    } else if let Some(token) = get("TOKEN") {
        o = async_nats::ConnectOptions::with_token(token);
    } else if let Some(path) = get("CREDS") {
        o = async_nats::ConnectOptions::with_credentials_file(&path)
            .await
            .map_err(|e| NatsError::Credentials(format!("cannot read the credentials file {path}: {e}")))?;
    } else if let Some(seed) = get("NKEY") {
        o = async_nats::ConnectOptions::with_nkey(seed);
    }
    if let Some(ca) = var("AFFLIO_NATS_TLS_CA") {
        o = o.add_root_certificates(ca.into());
    }
    if let (Some(cert), Some(key)) = (var("AFFLIO_NATS_TLS_CERT"), var("AFFLIO_NATS_TLS_KEY")) {
        o = o.add_client_certificate(cert.into(), key.into());
    }
    if var("AFFLIO_NATS_TLS").is_some_and(|v| v == "1" || v == "true") {
        o = o.require_tls(true);
    }
    let name = match role {
        Role::Ingest => "afflio-ingest",
        Role::Engine => "afflio-engine",
    };
    Ok(o.name(name).retry_on_initial_connect().connection_timeout(Duration::from_secs(5)))
}

/// Connects as `role`. Returns at once: the client keeps connecting (and
/// reconnecting) in the background.
pub async fn connect(url: &str, role: Role) -> Result<async_nats::Client, NatsError> {
    options(role).await?.connect(url).await.map_err(|source| NatsError::Connect { url: url.to_string(), source })
}

/// How the stream keeps events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    /// Window in which the broker drops a repeated message id.
    pub duplicate_window: Duration,
    /// Messages older than this are deleted (at least the engine's dedupe retention).
    pub max_age: Duration,
    /// The stream's size bound, bytes (oldest deleted first).
    pub max_bytes: i64,
}

/// Makes sure the stream exists with file storage and `limits` (updating
/// them if they changed).
pub async fn ensure_stream(js: &jetstream::Context, limits: &StreamLimits) -> Result<(), NatsError> {
    let config = stream::Config {
        name: STREAM.to_string(),
        subjects: vec![SUBJECTS.to_string()],
        storage: stream::StorageType::File,
        duplicate_window: limits.duplicate_window,
        max_age: limits.max_age,
        max_bytes: limits.max_bytes,
        ..Default::default()
    };
    let mut s = js.get_or_create_stream(config.clone()).await.map_err(|e| NatsError::Stream(e.to_string()))?;
    let info = s.info().await.map_err(|e| NatsError::Stream(e.to_string()))?;
    let c = &info.config;
    if c.max_age != config.max_age || c.max_bytes != config.max_bytes || c.duplicate_window != config.duplicate_window {
        js.update_stream(config).await.map_err(|e| NatsError::Stream(e.to_string()))?;
    }
    Ok(())
}

/// Publishes to JetStream and waits for the broker's acknowledgement.
#[derive(Clone)]
pub struct JetStreamPublisher {
    js: jetstream::Context,
    client: async_nats::Client,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl JetStreamPublisher {
    /// `ready` says when the stream exists (set by whoever ensures it).
    pub fn new(client: async_nats::Client, ready: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        JetStreamPublisher { js: jetstream::new(client.clone()), client, ready }
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

impl Publisher for JetStreamPublisher {
    fn publish(&self, msgs: Vec<Message>) -> BoxFuture<'static, Vec<Result<PublishOutcome, PublishError>>> {
        let js = self.js.clone();
        let up = self.connected() && self.ready.load(std::sync::atomic::Ordering::Relaxed);
        let max = self.client.server_info().max_payload;
        Box::pin(async move {
            // Nothing is handed to a client that is not connected: it would
            // buffer the message and send it after the answer said 503.
            if !up {
                return msgs
                    .iter()
                    .map(|_| Err(PublishError::Unavailable("not connected to the broker".into())))
                    .collect();
            }
            // Sent one after the other (the stream keeps this order), then all
            // acknowledgements awaited together.
            let mut acks = Vec::with_capacity(msgs.len());
            for (subject, msg_id, payload) in msgs {
                let size = payload.len() + msg_id.len() + subject.len() + 64;
                if max > 0 && size > max {
                    acks.push(Err(PublishError::TooLarge { bytes: size, max }));
                    continue;
                }
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", msg_id.as_str());
                acks.push(
                    js.publish_with_headers(subject, headers, payload)
                        .await
                        .map_err(|e| PublishError::Unavailable(e.to_string())),
                );
            }
            join_all(acks.into_iter().map(|ack| async move {
                let ack = ack?;
                let ack = tokio::time::timeout(Duration::from_secs(5), ack.into_future())
                    .await
                    .map_err(|_| PublishError::Unknown("no acknowledgement from the broker within 5s".into()))?
                    .map_err(|e| PublishError::Unknown(e.to_string()))?;
                Ok(if ack.duplicate { PublishOutcome::Duplicate } else { PublishOutcome::Stored })
            }))
            .await
        })
    }

    fn ready(&self) -> Result<(), String> {
        if !self.connected() {
            return Err(format!("not connected to the broker ({:?})", self.client.connection_state()));
        }
        if !self.ready.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(format!("stream {STREAM} not ready yet"));
        }
        Ok(())
    }
}
