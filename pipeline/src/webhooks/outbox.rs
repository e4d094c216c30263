//! The outbox: the engine's effects as webhook messages, published to a
//! JetStream stream before the epoch that made them is committed to the
//! store. Message ids are derived from the effect (an event id and what it
//! did), so a re-applied epoch publishes the same ids: the broker's
//! duplicate window drops the copies, and receivers see one `webhook-id`
//! per effect whatever is delivered twice.

use std::sync::Arc;
use std::time::Duration;

use afflio_engine::{EntryKind, Output, PayoutStatus};
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::endpoints::Endpoints;
use crate::error::PipelineError;

/// The outbox stream and its subjects: `afflio.webhooks.<program>.<partner>`
/// (ids hex-encoded; `_` for none).
pub(crate) const STREAM: &str = "AFFLIO_WEBHOOKS";
pub(crate) const SUBJECTS: &str = "afflio.webhooks.>";

/// One message to deliver.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OutMsg {
    /// `msg_` and 32 hex digits: the `webhook-id`.
    pub(crate) id: String,
    pub(crate) kind: &'static str,
    pub(crate) program_id: String,
    pub(crate) partner_id: Option<String>,
    /// What delivery keeps in order (an order, lead, application or batch).
    pub(crate) subject: String,
    /// `{"type", "timestamp", "data"}`.
    pub(crate) body: Vec<u8>,
}

pub(crate) fn hex_id(s: &str) -> String {
    hex::encode(s.as_bytes())
}

/// The broker subject of a program's (and partner's) messages.
pub(crate) fn subject_of(program: &str, partner: Option<&str>) -> String {
    format!("afflio.webhooks.{}.{}", hex_id(program), partner.map_or_else(|| "_".to_string(), hex_id))
}

/// The subjects an endpoint reads: its partner's, or every one of its program's.
pub(crate) fn filter_of(program: &str, partner: Option<&str>) -> String {
    match partner {
        Some(p) => subject_of(program, Some(p)),
        None => format!("afflio.webhooks.{}.>", hex_id(program)),
    }
}

fn msg(
    kind: &'static str,
    key: &str,
    ts: DateTime<Utc>,
    program: &str,
    partner: Option<&str>,
    subject: &str,
    data: Value,
) -> OutMsg {
    let h = xxhash_rust::xxh3::xxh3_128(format!("{kind}\u{0}{key}").as_bytes());
    let body = json!({ "type": kind, "timestamp": ts.to_rfc3339_opts(SecondsFormat::Micros, true), "data": data });
    OutMsg {
        id: format!("msg_{h:032x}"),
        kind,
        program_id: program.to_string(),
        partner_id: partner.map(str::to_string),
        subject: subject.to_string(),
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

/// The messages of an epoch's output, in the order the engine made them
/// (notices, ledger, flags, decisions, payouts), for programs with endpoints.
pub(crate) fn messages(out: &Output, wanted: impl Fn(&str) -> bool) -> Vec<OutMsg> {
    let mut v = Vec::new();
    for n in out.notices.iter().filter(|n| wanted(&n.program_id)) {
        let subject_field = match n.kind {
            "partner.applied" | "partner.approved" => "application_id",
            "lead.created" | "lead.stage_changed" => "lead_id",
            _ => "order_id",
        };
        let mut data = serde_json::Map::new();
        data.insert("program_id".into(), json!(n.program_id));
        data.insert(subject_field.into(), json!(n.subject));
        data.insert("partner_id".into(), json!(n.partner_id));
        data.insert("event_id".into(), json!(n.event_id));
        for (k, val) in &n.detail {
            data.insert((*k).into(), json!(val));
        }
        let key = format!("{}\u{0}{}", n.event_id, n.subject);
        v.push(msg(n.kind, &key, n.ts, &n.program_id, n.partner_id.as_deref(), &n.subject, Value::Object(data)));
    }
    for l in out.ledger.iter().filter(|l| wanted(&l.program_id)) {
        let kind = match l.kind {
            EntryKind::Accrual => "commission.created",
            EntryKind::Reversal => "commission.reversed",
        };
        let data = json!({
            "entry_id": l.entry_id, "event_id": l.event_id, "program_id": l.program_id, "order_id": l.order_id,
            "partner_id": l.partner_id, "tier": l.tier, "amount": l.amount.to_string(), "basis": l.basis.to_string(),
            "currency": l.currency.code(), "rate": l.rate.map(|r| r.to_string()), "reward": l.reward.as_deref(),
            "attribution": l.attribution.as_str(), "source": l.source, "eligible_at": l.eligible_at.to_rfc3339(),
        });
        v.push(msg(kind, &l.entry_id, l.ts, &l.program_id, Some(&l.partner_id), &l.order_id, data));
    }
    for f in out.flags.iter().filter(|f| wanted(&f.program_id)) {
        let data = json!({
            "program_id": f.program_id, "order_id": f.order_id, "partner_id": f.partner_id, "rule": f.rule.as_str(),
            "action": f.action.as_str(), "value": f.value, "baseline": f.baseline, "threshold": f.threshold,
            "detail": f.detail,
            "retroactive": f.retroactive, "event_id": f.event_id,
        });
        let key = format!("{}\u{0}{}\u{0}{}", f.event_id, f.order_id, f.rule.as_str());
        v.push(msg("flag.raised", &key, f.ts, &f.program_id, Some(&f.partner_id), &f.order_id, data));
    }
    for d in out.decisions.iter().filter(|d| wanted(&d.program_id)) {
        if d.status != afflio_engine::LineStatus::Approved || d.previous_status == afflio_engine::LineStatus::Approved {
            continue;
        }
        let data = json!({
            "program_id": d.program_id, "order_id": d.order_id, "partner_id": d.partner_id, "tier": d.tier,
            "net_amount": d.net_amount.to_string(), "reviewer": d.reviewer, "bulk": d.bulk, "event_id": d.event_id,
        });
        let key = format!("{}\u{0}{}\u{0}{}\u{0}{}", d.event_id, d.order_id, d.partner_id, d.tier);
        v.push(msg("commission.approved", &key, d.ts, &d.program_id, Some(&d.partner_id), &d.order_id, data));
    }
    for p in out.payouts.iter().filter(|p| wanted(&p.program_id)) {
        let kind = match p.status {
            PayoutStatus::Sent => "payout.sent",
            PayoutStatus::Paid => "payout.paid",
            PayoutStatus::Failed => "payout.failed",
            _ => continue,
        };
        // The destination stays out: a webhook is not where bank details go.
        let data = json!({
            "program_id": p.program_id, "batch_id": p.batch_id, "partner_id": p.partner_id,
            "amount": p.amount.to_string(), "tds": p.tds.to_string(), "currency": p.currency,
            "provider": p.provider, "provider_ref": p.provider_ref, "detail": p.detail, "event_id": p.event_id,
        });
        let key = format!("{}\u{0}{}\u{0}{}", p.event_id, p.batch_id, p.partner_id);
        let subject = format!("{}:{}", p.batch_id, p.partner_id);
        v.push(msg(kind, &key, p.ts, &p.program_id, Some(&p.partner_id), &subject, data));
    }
    v
}

/// Creates the outbox stream if it is missing.
pub(crate) async fn ensure_stream(js: &jetstream::Context) -> Result<(), PipelineError> {
    js.get_or_create_stream(stream::Config {
        name: STREAM.to_string(),
        subjects: vec![SUBJECTS.to_string()],
        // Longer than the 3-day retry window, with room for a disabled
        // endpoint to be fixed and re-enabled.
        max_age: Duration::from_secs(7 * 24 * 3600),
        max_bytes: 8 * 1024 * 1024 * 1024,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: Duration::from_secs(600),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| PipelineError::Broker(format!("webhook outbox stream {STREAM}: {e}")))?;
    Ok(())
}

/// Publishes an epoch's messages (programs with at least one endpoint).
#[derive(Clone)]
pub(crate) struct Outbox {
    pub(crate) js: jetstream::Context,
    pub(crate) endpoints: Arc<Endpoints>,
}

impl Outbox {
    /// Publishes every message and waits for the broker to store each;
    /// retries (the epoch waits) until it has.
    pub(crate) async fn publish(&self, out: &Output) -> usize {
        let msgs = messages(out, |p| self.endpoints.program_has_endpoints(p));
        if !msgs.is_empty() {
            self.publish_msgs(&msgs).await;
        }
        msgs.len()
    }

    /// Publishes messages (retrying until the broker has them all).
    pub(crate) async fn publish_msgs(&self, msgs: &[OutMsg]) {
        let mut attempt = 0u32;
        while let Err(e) = self.try_publish(msgs).await {
            attempt += 1;
            eprintln!("afflio: webhook outbox publish failed (attempt {attempt}), retrying: {e}");
            tokio::time::sleep(Duration::from_millis((100 * 2u64.pow(attempt.min(6))).min(5_000))).await;
        }
    }

    async fn try_publish(&self, msgs: &[OutMsg]) -> Result<(), String> {
        let mut acks = Vec::with_capacity(msgs.len());
        for m in msgs {
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", m.id.as_str());
            h.insert("Afflio-Type", m.kind);
            h.insert("Afflio-Subject", m.subject.as_str());
            let ack = self
                .js
                .publish_with_headers(subject_of(&m.program_id, m.partner_id.as_deref()), h, m.body.clone().into())
                .await
                .map_err(|e| e.to_string())?;
            acks.push(ack);
        }
        for a in acks {
            a.await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use afflio_engine::rules::Rules;
    use afflio_engine::{Arrival, Engine};

    use super::*;

    const RULES: &str = r#"
[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
overrides = ["2%"]
[[programs]]
id = "quiet"
currency = "USD"
rate = "10%"
[[partners]]
id = "agency"
program_id = "acme"
[[partners]]
id = "alice"
program_id = "acme"
parent = "agency"
[[codes]]
code = "A"
partner_id = "alice"
[programs.leads]
reward = "5.00"
[[partners]]
id = "q"
program_id = "quiet"
[[codes]]
code = "Q"
partner_id = "q"
"#;

    fn output(notices: bool) -> Output {
        let mut e = Engine::new(Arc::new(Rules::parse("t.toml", RULES).unwrap()));
        e.set_notices(notices);
        for l in [
            r#"{"type":"capture","event_id":"c1","ts":"2026-11-10T10:00:00Z","program_id":"acme","order_id":"o1","amount":"50.00","currency":"USD","codes":["A"]}"#,
            r#"{"type":"refund","event_id":"r1","ts":"2026-11-10T11:00:00Z","program_id":"acme","order_id":"o1","amount":"50.00","currency":"USD"}"#,
            r#"{"type":"capture","event_id":"c2","ts":"2026-11-10T10:00:00Z","program_id":"quiet","order_id":"o2","amount":"50.00","currency":"USD","codes":["Q"]}"#,
            r#"{"type":"lead","event_id":"l1","ts":"2026-11-10T12:00:00Z","program_id":"quiet","lead_id":"L1","codes":["Q"]}"#,
        ] {
            let ev = afflio_ingest::decode_event(l).unwrap();
            e.apply(&ev, l, Arrival { ts: ev.ts, origin: &"t", clock: None });
        }
        e.take_output()
    }

    #[test]
    fn effects_become_messages_with_ids_derived_from_them_routed_by_program_and_partner() {
        let out = output(true);
        let msgs = messages(&out, |p| p == "acme");
        let kinds: Vec<(&str, Option<&str>, &str)> =
            msgs.iter().map(|m| (m.kind, m.partner_id.as_deref(), m.subject.as_str())).collect();
        assert_eq!(
            kinds,
            [
                ("order.attributed", Some("alice"), "o1"),
                ("commission.created", Some("alice"), "o1"),
                ("commission.created", Some("agency"), "o1"),
                ("commission.reversed", Some("alice"), "o1"),
                ("commission.reversed", Some("agency"), "o1"),
            ],
            "the quiet program has no endpoint: nothing of it"
        );
        // The same effects give the same ids (a re-applied epoch is recognised).
        let again = messages(&output(true), |p| p == "acme");
        assert_eq!(msgs.iter().map(|m| &m.id).collect::<Vec<_>>(), again.iter().map(|m| &m.id).collect::<Vec<_>>());
        let ids: std::collections::BTreeSet<&String> = msgs.iter().map(|m| &m.id).collect();
        assert_eq!(ids.len(), msgs.len(), "one id per effect");
        let body: serde_json::Value = serde_json::from_slice(&msgs[1].body).unwrap();
        assert_eq!(body["type"], "commission.created");
        assert_eq!(body["data"]["amount"], "5.00");
        assert_eq!(body["data"]["entry_id"], "c1:0");
        assert_eq!(
            subject_of("acme", Some("alice")),
            format!("afflio.webhooks.{}.{}", hex_id("acme"), hex_id("alice"))
        );
        // A lead is told as lead.created, not as an order attributed.
        let quiet_msgs = messages(&out, |p| p == "quiet");
        let quiet: Vec<(&str, &str)> = quiet_msgs.iter().map(|m| (m.kind, m.subject.as_str())).collect();
        assert_eq!(
            quiet,
            [
                ("order.attributed", "o2"),
                ("lead.created", "L1"),
                ("commission.created", "o2"),
                ("commission.created", "L1"),
            ]
        );
        // Without notices (a replay), no order.attributed.
        assert!(messages(&output(false), |_| true).iter().all(|m| m.kind != "order.attributed"));
    }

    #[test]
    fn signatures_verify_with_every_secret_that_signs() {
        let (a, b) = (super::super::endpoints::new_secret(), super::super::endpoints::new_secret());
        let sig = super::super::deliver::signature([a.as_str(), b.as_str()].into_iter(), "msg_1", 1_700_000_000, b"{}");
        assert_eq!(sig.split(' ').count(), 2);
        for s in [&a, &b] {
            let wh = standardwebhooks::Webhook::new(s).unwrap();
            let want = wh.sign("msg_1", 1_700_000_000, b"{}").unwrap();
            assert!(sig.split(' ').any(|x| x == want));
        }
    }
}
