//! `afflio webhooks replay`: sends an endpoint's messages again by hand,
//! from the outbox (kept seven days), once each, logged in `deliveries` as
//! `replayed` or `replay_failed`.

use std::path::PathBuf;
use std::time::Duration;

use afflio_sinks::{DeliveryLog, DeliveryRow};
use async_nats::jetstream::{self, consumer::pull};
use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::deliver::{client, post};
use super::endpoints::Endpoints;
use super::outbox::{filter_of, STREAM};
use crate::error::PipelineError;

/// Which messages to send again, and where the log is.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    pub nats: String,
    pub data: PathBuf,
    pub endpoint: String,
    /// Messages published at or after this time (default: all kept).
    pub since: Option<DateTime<Utc>>,
    /// ... and before this one.
    pub until: Option<DateTime<Utc>>,
    /// Only this message (`webhook-id`).
    pub message_id: Option<String>,
    /// Only this event type (default: the endpoint's types).
    pub event_type: Option<String>,
    pub timeout: Duration,
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub matched: u64,
    pub delivered: u64,
    pub failed: u64,
}

pub async fn replay(opts: ReplayOptions) -> Result<ReplaySummary, PipelineError> {
    let client_nats = afflio_ingest::nats::connect(&opts.nats, afflio_ingest::nats::Role::Engine).await?;
    let js = jetstream::new(client_nats);
    let endpoints = Endpoints::open(&js, &[], 0).await?;
    let ep = endpoints.get(&opts.endpoint).ok_or_else(|| {
        PipelineError::Config(format!(
            "no webhook endpoint {:?} (afflio serve lists them at /v1/webhooks/endpoints)",
            opts.endpoint
        ))
    })?;
    if let Some(t) = &opts.event_type {
        if !afflio_engine::rules::WEBHOOK_EVENT_TYPES.contains(&t.as_str()) {
            return Err(PipelineError::Config(format!("--type {t:?} is not a webhook event type")));
        }
    }
    let mut stream = js.get_stream(STREAM).await.map_err(|e| PipelineError::Broker(format!("{STREAM}: {e}")))?;
    let last = stream.info().await.map_err(|e| PipelineError::Broker(e.to_string()))?.state.last_sequence;
    let mut summary = ReplaySummary::default();
    if last == 0 {
        return Ok(summary);
    }
    let deliver_policy = match opts.since {
        Some(t) => jetstream::consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp(t.timestamp())
                .map_err(|e| PipelineError::Config(format!("--since: {e}")))?,
        },
        None => jetstream::consumer::DeliverPolicy::All,
    };
    let filter_subject = filter_of(&ep.program_id, ep.partner_id.as_deref());
    let name = format!("wh-replay-{:016x}", rand::random::<u64>());
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            filter_subject,
            deliver_policy,
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(300),
            ..Default::default()
        })
        .await
        .map_err(|e| PipelineError::Broker(format!("replay consumer: {e}")))?;
    let mut messages = consumer.messages().await.map_err(|e| PipelineError::Broker(e.to_string()))?;
    let http = client();
    let mut rows = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
        let Ok(Some(Ok(m))) = next else { break };
        let Ok(info) = m.info() else { break };
        let seq = info.stream_sequence;
        let published = DateTime::from_timestamp(info.published.unix_timestamp(), 0).unwrap_or_else(Utc::now);
        let h = |name: &str| {
            m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_string()).unwrap_or_default()
        };
        let (kind, id, subject) = (h("Afflio-Type"), h("Nats-Msg-Id"), h("Afflio-Subject"));
        let wanted = opts.event_type.as_ref().map_or_else(|| ep.wants(&kind), |t| *t == kind)
            && opts.message_id.as_ref().is_none_or(|mid| *mid == id)
            && opts.until.is_none_or(|u| published < u);
        if wanted {
            summary.matched += 1;
            let at = Utc::now();
            let a = post(&http, &ep, &id, &m.payload, opts.timeout).await;
            let ok = a.code.is_some_and(|c| (200..300).contains(&c));
            if ok {
                summary.delivered += 1;
            } else {
                summary.failed += 1;
            }
            rows.push(DeliveryRow {
                endpoint_id: ep.id.clone(),
                program_id: ep.program_id.clone(),
                partner_id: ep.partner_id.clone(),
                message_id: id,
                event_type: kind,
                subject,
                attempt: 1,
                ts: at,
                status: if ok { "replayed" } else { "replay_failed" }.into(),
                response_code: a.code.map(i32::from),
                latency_ms: a.latency.as_millis() as i64,
                error: a.error,
                next_attempt_at: None,
            });
        }
        if seq >= last {
            break;
        }
    }
    let _ = stream.delete_consumer(&name).await;
    let mut log = DeliveryLog::open(&opts.data).await?;
    log.append(&rows).await?;
    Ok(summary)
}
