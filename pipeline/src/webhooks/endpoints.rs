//! Webhook endpoints: those of the rules file (`[[webhooks]]`) and those
//! registered over HTTP, kept in a JetStream stream with one message per
//! endpoint subject (the last one wins, an empty one removes it: a
//! key-value store that NATS 2.9 serves), so that a restart keeps them,
//! their secrets and whether they are disabled (a 410).

use std::collections::BTreeMap;
use std::sync::RwLock;

use async_nats::jetstream::{self, stream};
use base64::Engine as _;
use chrono::{DateTime, Duration, Utc};
use futures::StreamExt;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::error::PipelineError;

const STREAM: &str = "AFFLIO_WEBHOOK_ENDPOINTS";
const SUBJECTS: &str = "afflio.webhook-endpoints.>";

/// At most this many endpoints per program (each has its own consumer).
pub(crate) const MAX_PER_PROGRAM: usize = 1_000;

/// How long a rotated-out secret still signs (receivers switch over).
pub(crate) fn rotation_overlap() -> Duration {
    Duration::hours(24)
}

/// A signing secret; `expires_at` is set when it was rotated out.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SigningSecret {
    pub(crate) secret: String,
    pub(crate) expires_at: Option<DateTime<Utc>>,
}

/// Why and when an endpoint was disabled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Disabled {
    pub(crate) at: DateTime<Utc>,
    pub(crate) reason: String,
}

/// An endpoint, as kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Endpoint {
    pub(crate) id: String,
    pub(crate) program_id: String,
    /// A partner's endpoint: only that partner's messages.
    pub(crate) partner_id: Option<String>,
    pub(crate) url: String,
    pub(crate) events: Vec<String>,
    pub(crate) secrets: Vec<SigningSecret>,
    pub(crate) disabled: Option<Disabled>,
    pub(crate) created_at: DateTime<Utc>,
    /// `config` (the rules file) or `api`.
    pub(crate) source: String,
    /// The outbox stream position it starts from (its first message).
    pub(crate) start_seq: u64,
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        write!(f, "SigningSecret(whsec_***, expires_at: {:?})", self.expires_at)
    }
}

impl Endpoint {
    /// The secrets that sign now (the current one first).
    pub(crate) fn signing(&self, now: DateTime<Utc>) -> impl Iterator<Item = &str> {
        self.secrets.iter().filter(move |s| s.expires_at.is_none_or(|x| now < x)).map(|s| s.secret.as_str())
    }

    /// The endpoint as the API shows it: never a secret.
    pub(crate) fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "program_id": self.program_id, "partner_id": self.partner_id, "url": self.url,
            "events": self.events, "enabled": self.disabled.is_none(),
            "disabled": self.disabled.as_ref().map(|d| serde_json::json!({"at": d.at.to_rfc3339(), "reason": d.reason})),
            "created_at": self.created_at.to_rfc3339(), "source": self.source,
            "signing_secrets": self.signing(Utc::now()).count(),
        })
    }

    pub(crate) fn wants(&self, kind: &str) -> bool {
        self.events.iter().any(|e| e == kind)
    }
}

/// A new `whsec_` secret: 32 random bytes, base64.
pub(crate) fn new_secret() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(b))
}

/// Every endpoint, in memory and in the bucket.
pub(crate) struct Endpoints {
    js: jetstream::Context,
    map: RwLock<BTreeMap<String, Endpoint>>,
}

fn subject_of(id: &str) -> String {
    format!("afflio.webhook-endpoints.{}", hex::encode(id.as_bytes()))
}

impl Endpoints {
    /// Opens the bucket, loads the endpoints, and merges the rules file's
    /// (their URL, events and secret come from the file; whether they are
    /// disabled from the bucket).
    pub(crate) async fn open(
        js: &jetstream::Context,
        configured: &[afflio_engine::rules::WebhookConfig],
        outbox_next: u64,
    ) -> Result<Endpoints, PipelineError> {
        let broker = |e: String| PipelineError::Broker(format!("webhook endpoints stream {STREAM}: {e}"));
        let st = js
            .get_or_create_stream(stream::Config {
                name: STREAM.to_string(),
                subjects: vec![SUBJECTS.to_string()],
                max_messages_per_subject: 1,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| broker(e.to_string()))?;
        let mut map = BTreeMap::new();
        let mut subjects = Vec::new();
        let mut info = st.info_with_subjects(SUBJECTS).await.map_err(|e| broker(e.to_string()))?;
        while let Some(x) = info.next().await {
            let (subject, _) = x.map_err(|e| broker(e.to_string()))?;
            subjects.push(subject);
        }
        for subject in subjects {
            let m = st.get_last_raw_message_by_subject(&subject).await.map_err(|e| broker(e.to_string()))?;
            if m.payload.is_empty() {
                continue; // removed
            }
            match serde_json::from_slice::<Endpoint>(&m.payload) {
                Ok(ep) => {
                    map.insert(ep.id.clone(), ep);
                }
                Err(e) => eprintln!("afflio: webhook endpoint record {subject} is unreadable, skipped: {e}"),
            }
        }
        let eps = Endpoints { js: js.clone(), map: RwLock::new(map) };
        for c in configured {
            let existing = eps.get(&c.id);
            // A secret changed in the file: the old one keeps signing for the overlap.
            let now = Utc::now();
            let current = c.secret.expose().to_string();
            let previous =
                existing.iter().flat_map(|e| e.secrets.iter()).filter(|s| s.secret != current).filter_map(|s| {
                    let expires_at = s.expires_at.unwrap_or(now + rotation_overlap());
                    (expires_at > now).then(|| SigningSecret { secret: s.secret.clone(), expires_at: Some(expires_at) })
                });
            let secrets: Vec<SigningSecret> =
                std::iter::once(SigningSecret { secret: current.clone(), expires_at: None }).chain(previous).collect();
            let ep = Endpoint {
                id: c.id.clone(),
                program_id: c.program_id.clone(),
                partner_id: c.partner_id.clone(),
                url: c.url.clone(),
                events: c.events.clone(),
                secrets,
                disabled: existing.as_ref().and_then(|e| e.disabled.clone()),
                created_at: existing.as_ref().map_or_else(Utc::now, |e| e.created_at),
                source: "config".into(),
                start_seq: existing.as_ref().map_or(outbox_next, |e| e.start_seq),
            };
            if existing.as_ref() != Some(&ep) {
                eps.put(ep).await?;
            }
        }
        Ok(eps)
    }

    pub(crate) fn get(&self, id: &str) -> Option<Endpoint> {
        self.map.read().ok()?.get(id).cloned()
    }

    pub(crate) fn all(&self) -> Vec<Endpoint> {
        self.map.read().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    pub(crate) fn of_program(&self, program: &str) -> Vec<Endpoint> {
        self.all().into_iter().filter(|e| e.program_id == program).collect()
    }

    /// Whether a program has any endpoint (its messages go to the outbox).
    pub(crate) fn program_has_endpoints(&self, program: &str) -> bool {
        self.map.read().map(|m| m.values().any(|e| e.program_id == program)).unwrap_or(false)
    }

    /// Stores an endpoint (new or changed), durably first.
    pub(crate) async fn put(&self, ep: Endpoint) -> Result<(), PipelineError> {
        let bytes = serde_json::to_vec(&ep).map_err(|e| PipelineError::Internal(format!("endpoint record: {e}")))?;
        self.record(&ep.id, bytes).await?;
        if let Ok(mut m) = self.map.write() {
            m.insert(ep.id.clone(), ep);
        }
        Ok(())
    }

    pub(crate) async fn remove(&self, id: &str) -> Result<(), PipelineError> {
        self.record(id, Vec::new()).await?;
        if let Ok(mut m) = self.map.write() {
            m.remove(id);
        }
        Ok(())
    }

    /// Writes an endpoint's record (empty: removed) and waits for the broker to keep it.
    async fn record(&self, id: &str, bytes: Vec<u8>) -> Result<(), PipelineError> {
        let err = |e: String| PipelineError::Broker(format!("store webhook endpoint {id:?}: {e}"));
        self.js
            .publish(subject_of(id), bytes.into())
            .await
            .map_err(|e| err(e.to_string()))?
            .await
            .map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    /// Disables an endpoint (a 410 answer, or by hand).
    pub(crate) async fn disable(&self, id: &str, reason: String) -> Result<(), PipelineError> {
        let Some(mut ep) = self.get(id) else { return Ok(()) };
        if ep.disabled.is_none() {
            ep.disabled = Some(Disabled { at: Utc::now(), reason });
            self.put(ep).await?;
        }
        Ok(())
    }
}
