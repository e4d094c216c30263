//! JSON -> [`Event`].

use std::borrow::Cow;

use afflio_engine::rules::PaymentKind;
use afflio_engine::{
    Body, Cancel, Capture, Click, Customer, Decision, Event, EventType, Item, Lead, LeadStage, Payment, PayoutEvent,
    PayoutStatus, Reason, Refund, ReviewEvent, SaleExtra,
};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;

use afflio_engine::registry::RegistryEvent;

/// Size limits on decoded events.
pub struct Limits {
    pub event_id_bytes: usize,
    pub string_bytes: usize,
    pub codes: usize,
    pub items: usize,
}

pub const LIMITS: Limits = Limits { event_id_bytes: 128, string_bytes: 2048, codes: 32, items: 1000 };

/// Why a text is not an event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct DecodeError {
    /// `malformed` or `invalid_amount`.
    pub reason: Reason,
    /// The field at fault, as a path (`items[2].amount`), when one is.
    pub field: Option<String>,
    pub detail: String,
    /// The event id, when it could be read.
    pub event_id: Option<String>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "opt_cow")]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    event_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    ts: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    program_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    link_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    visitor_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    ip: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    user_agent: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    landing_url: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    sub_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    order_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    amount: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    currency: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cows")]
    codes: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    customer: Option<WireCustomer<'a>>,
    #[serde(borrow, default)]
    items: Option<Vec<WireItem<'a>>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    partner_id: Option<Cow<'a, str>>,
    #[serde(default)]
    tier: Option<u8>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    decision: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    reason: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    reviewer: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    batch_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tds: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    status: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    provider: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    provider_ref: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    detail: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    idempotency_key: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    provider_batch: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    destination: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    attempted_at: Option<Cow<'a, str>>,
    /// A registry event's content.
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tax: Option<&'a RawValue>,
    #[serde(borrow, default)]
    shipping: Option<&'a RawValue>,
    #[serde(borrow, default)]
    discount: Option<&'a RawValue>,
    #[serde(default)]
    new_customer: Option<bool>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    subscription_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    plan: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    lead_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    stage: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    payment_id: Option<Cow<'a, str>>,
}

/// The optional parts of a sale, read strictly.
fn sale_extra<'a>(
    tax: Option<&RawValue>,
    shipping: Option<&RawValue>,
    discount: Option<&RawValue>,
    new_customer: Option<bool>,
    subscription_id: Option<Cow<'a, str>>,
    plan: Option<Cow<'a, str>>,
) -> Result<SaleExtra<'a>, DecodeError> {
    let part = |v: Option<&RawValue>, f: &str| v.map(|v| parse_money(v.get(), f)).transpose();
    Ok(SaleExtra {
        tax: part(tax, "tax")?,
        shipping: part(shipping, "shipping")?,
        discount: part(discount, "discount")?,
        new_customer,
        subscription_id: optional_id(subscription_id, "subscription_id")?.filter(|s| !s.is_empty()),
        plan: optional_id(plan, "plan")?.filter(|s| !s.is_empty()),
    })
}

fn customer<'a>(c: Option<WireCustomer<'a>>) -> Result<Option<Customer<'a>>, DecodeError> {
    match c {
        None => Ok(None),
        Some(c) => Ok(Some(Customer {
            id: optional_id(c.id, "customer.id")?,
            email_sha256: optional_id(c.email_sha256, "customer.email_sha256")?,
        })),
    }
}

fn codes(v: Option<Vec<Cow<'_, str>>>) -> Result<Vec<Cow<'_, str>>, DecodeError> {
    let codes = v.unwrap_or_default();
    if codes.len() > LIMITS.codes {
        return Err(malformed("codes", format!("{} codes, over the limit of {}", codes.len(), LIMITS.codes)));
    }
    codes.into_iter().map(|c| no_controls(bounded(c, "codes")?, "codes")).collect()
}

#[derive(Deserialize)]
struct WireCustomer<'a> {
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    email_sha256: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct WireItem<'a> {
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    sku: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    category: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    amount: Option<&'a RawValue>,
}

/// A string that borrows from the input unless it has escapes.
#[derive(Deserialize)]
struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

fn opt_cow<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    Ok(Option::<Str<'de>>::deserialize(d)?.map(|s| s.0))
}

fn opt_cows<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<Cow<'de, str>>>, D::Error> {
    Ok(Option::<Vec<Str<'de>>>::deserialize(d)?.map(|v| v.into_iter().map(|s| s.0).collect()))
}

/// Decodes one event from its JSON text.
pub fn decode_event(text: &str) -> Result<Event<'_>, DecodeError> {
    // Fast path: plain serde. Only a text that fails is decoded again with
    // the path tracking that names the field at fault (same outcome, and the
    // bookkeeping costs nothing on good input).
    let mut de = serde_json::Deserializer::from_str(text);
    let wire = match Wire::deserialize(&mut de).and_then(|w| de.end().map(|()| w)) {
        Ok(w) => w,
        Err(_) => return Err(decode_error(text)),
    };
    let event_id_for_errors = wire.event_id.as_deref().map(str::to_string);
    convert(wire).map_err(|mut e| {
        e.event_id = event_id_for_errors;
        e
    })
}

/// The error of a text that plain serde refused, with the path of the field.
#[cold]
fn decode_error(text: &str) -> DecodeError {
    match decode_tracked(text) {
        Err(e) => e,
        // Not reached: both decoders accept the same texts.
        Ok(_) => DecodeError {
            reason: Reason::Malformed,
            field: None,
            detail: "not a valid event".into(),
            event_id: sniff_event_id(text),
        },
    }
}

fn decode_tracked(text: &str) -> Result<Event<'_>, DecodeError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let wire: Wire<'_> = match serde_path_to_error::deserialize(&mut de) {
        Ok(w) => w,
        Err(e) => {
            let path = e.path().to_string();
            let field = (path != ".").then_some(path);
            let detail = match &field {
                Some(f) => format!("field `{f}`: {}", e.inner()),
                None => format!("not a JSON object: {}", e.inner()),
            };
            return Err(DecodeError { reason: Reason::Malformed, field, detail, event_id: sniff_event_id(text) });
        }
    };
    if let Err(e) = de.end() {
        return Err(DecodeError {
            reason: Reason::Malformed,
            field: None,
            detail: format!("text after the JSON object: {e}"),
            event_id: wire.event_id.as_deref().map(str::to_string),
        });
    }
    let event_id_for_errors = wire.event_id.as_deref().map(str::to_string);
    convert(wire).map_err(|mut e| {
        e.event_id = event_id_for_errors;
        e
    })
}

/// Best-effort event id of a text that did not decode.
fn sniff_event_id(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let id = v.get("event_id")?.as_str()?;
    (!id.is_empty() && id.len() <= LIMITS.event_id_bytes).then(|| id.to_string())
}

fn malformed(field: &str, detail: impl Into<String>) -> DecodeError {
    DecodeError { reason: Reason::Malformed, field: Some(field.to_string()), detail: detail.into(), event_id: None }
}

fn required<'a>(v: Option<Cow<'a, str>>, field: &str, ty: EventType) -> Result<Cow<'a, str>, DecodeError> {
    match v {
        None => Err(malformed(field, format!("missing field `{field}` (required for {ty} events)"))),
        Some(s) if s.trim().is_empty() => Err(malformed(field, format!("field `{field}` is empty"))),
        Some(s) => no_controls(bounded(s, field)?, field),
    }
}

/// Ids and codes carry no control character (a CR or LF could not travel in
/// a header, an escape sequence would reach a terminal).
fn no_controls<'a>(s: Cow<'a, str>, field: &str) -> Result<Cow<'a, str>, DecodeError> {
    match s.char_indices().find(|(_, c)| c.is_control()) {
        None => Ok(s),
        Some((at, c)) => Err(malformed(
            field,
            format!("field `{field}` contains the control character U+{:04X} at byte {at}", c as u32),
        )),
    }
}

fn optional_id<'a>(v: Option<Cow<'a, str>>, field: &str) -> Result<Option<Cow<'a, str>>, DecodeError> {
    v.map(|s| no_controls(bounded(s, field)?, field)).transpose()
}

fn bounded<'a>(s: Cow<'a, str>, field: &str) -> Result<Cow<'a, str>, DecodeError> {
    if s.len() > LIMITS.string_bytes {
        return Err(malformed(
            field,
            format!("field `{field}` is {} bytes, over the {}-byte limit", s.len(), LIMITS.string_bytes),
        ));
    }
    Ok(s)
}

fn optional<'a>(v: Option<Cow<'a, str>>, field: &str) -> Result<Option<Cow<'a, str>>, DecodeError> {
    v.map(|s| bounded(s, field)).transpose()
}

/// Parses a money value: a decimal string (`"120.00"`), or a JSON number
/// whose text is an exact decimal. Never rounds.
pub fn parse_money(raw: &str, field: &str) -> Result<Decimal, DecodeError> {
    let invalid = |what: &str| DecodeError {
        reason: Reason::InvalidAmount,
        field: Some(field.to_string()),
        detail: format!("field `{field}`: {raw} {what}"),
        event_id: None,
    };
    let raw = raw.trim();
    if let Some(inner) = raw.strip_prefix('"') {
        let s: String = serde_json::from_str(raw).map_err(|_| invalid("is not a JSON string"))?;
        let _ = inner;
        if !is_plain_decimal(&s) {
            return Err(invalid("is not a decimal number such as \"120.00\""));
        }
        return Decimal::from_str_exact(&s).map_err(|_| invalid("does not fit an exact decimal"));
    }
    let first = raw.as_bytes().first().copied().unwrap_or(b' ');
    if first == b'-' || first.is_ascii_digit() {
        let d = if raw.contains(['e', 'E']) { Decimal::from_scientific(raw) } else { Decimal::from_str_exact(raw) };
        return d.map_err(|_| invalid("is not exactly representable as a decimal"));
    }
    Err(DecodeError {
        reason: Reason::Malformed,
        field: Some(field.to_string()),
        detail: format!("field `{field}`: {raw} is not a decimal string or number"),
        event_id: None,
    })
}

fn is_plain_decimal(s: &str) -> bool {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

fn money(v: Option<&RawValue>, field: &str, ty: EventType) -> Result<Decimal, DecodeError> {
    let v = v.ok_or_else(|| malformed(field, format!("missing field `{field}` (required for {ty} events)")))?;
    parse_money(v.get(), field)
}

fn items(v: Option<Vec<WireItem<'_>>>) -> Result<Option<Vec<Item<'_>>>, DecodeError> {
    let Some(v) = v else { return Ok(None) };
    if v.len() > LIMITS.items {
        return Err(malformed("items", format!("{} items, over the limit of {}", v.len(), LIMITS.items)));
    }
    v.into_iter()
        .enumerate()
        .map(|(i, it)| {
            let f = format!("items[{i}].amount");
            let amount = match it.amount {
                None => return Err(malformed(&f, format!("missing field `{f}`"))),
                Some(a) => parse_money(a.get(), &f)?,
            };
            Ok(Item {
                sku: optional_id(it.sku, "items.sku")?,
                category: optional_id(it.category, "items.category")?,
                amount,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A registry event's `data`, strictly typed (unknown fields refused), the
/// field at fault named as `data.<path>`.
fn registry_data(ty: EventType, text: &str) -> Result<RegistryEvent, DecodeError> {
    fn typed<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, DecodeError> {
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "data".to_string() } else { format!("data.{path}") };
            malformed(&field, format!("{field}: {}", e.inner()))
        })
    }
    Ok(match ty {
        EventType::ProgramPublished => RegistryEvent::ProgramPublished(typed(text)?),
        EventType::PartnerApplied => RegistryEvent::PartnerApplied(typed(text)?),
        EventType::ApplicationDecided => RegistryEvent::ApplicationDecided(typed(text)?),
        EventType::LinkCreated => RegistryEvent::LinkCreated(typed(text)?),
        EventType::CodeCreated => RegistryEvent::CodeCreated(typed(text)?),
        EventType::PartnerUpdated => RegistryEvent::PartnerUpdated(typed(text)?),
        _ => return Err(malformed("type", format!("{ty} is not a registry event"))),
    })
}

fn convert(w: Wire<'_>) -> Result<Event<'_>, DecodeError> {
    let ty_text = w.ty.ok_or_else(|| malformed("type", "missing field `type`"))?;
    let ty = EventType::parse(&ty_text)
        .ok_or_else(|| malformed("type", format!("type {ty_text:?} is not one of {}", EventType::NAMES)))?;
    let event_id = w.event_id.ok_or_else(|| malformed("event_id", "missing field `event_id`"))?;
    if event_id.is_empty() || event_id.len() > LIMITS.event_id_bytes {
        return Err(malformed("event_id", format!("event_id must be 1 to 128 bytes, got {} bytes", event_id.len())));
    }
    let event_id = no_controls(event_id, "event_id")?;
    let ts_text = w.ts.ok_or_else(|| malformed("ts", "missing field `ts`"))?;
    let ts: DateTime<Utc> = DateTime::parse_from_rfc3339(&ts_text)
        .map_err(|e| malformed("ts", format!("ts {ts_text:?} is not an RFC 3339 time with offset: {e}")))?
        .with_timezone(&Utc);
    let program_id = required(w.program_id, "program_id", ty)?;
    if ty.is_registry() {
        let data = w.data.ok_or_else(|| malformed("data", format!("a {ty} event needs a `data` object")))?;
        let body = registry_data(ty, data.get())?;
        return Ok(Event { event_id, ts, program_id, body: Body::Registry(Box::new(body)) });
    }
    let body = match ty {
        EventType::Click => Body::Click(Click {
            link_id: required(w.link_id, "link_id", ty)?,
            visitor_id: required(w.visitor_id, "visitor_id", ty)?,
            ip: optional_id(w.ip, "ip")?,
            user_agent: optional(w.user_agent, "user_agent")?,
            landing_url: optional(w.landing_url, "landing_url")?,
            sub_id: optional(w.sub_id, "sub_id")?,
        }),
        EventType::Capture => Body::Capture(Capture {
            order_id: required(w.order_id, "order_id", ty)?,
            amount: money(w.amount, "amount", ty)?,
            currency: required(w.currency, "currency", ty)?,
            visitor_id: optional_id(w.visitor_id, "visitor_id")?.filter(|v| !v.is_empty()),
            codes: codes(w.codes)?,
            customer: customer(w.customer)?,
            ip: optional_id(w.ip, "ip")?,
            items: items(w.items)?,
            extra: sale_extra(w.tax, w.shipping, w.discount, w.new_customer, w.subscription_id, w.plan)?,
        }),
        EventType::Lead => Body::Lead(Lead {
            lead_id: required(w.lead_id, "lead_id", ty)?,
            kind: match optional_id(w.kind, "kind")? {
                None => Cow::Borrowed("lead"),
                Some(k) if !k.is_empty() && k.len() <= 64 => k,
                Some(k) => return Err(malformed("kind", format!("kind {k:?} must be 1 to 64 bytes"))),
            },
            visitor_id: optional_id(w.visitor_id, "visitor_id")?.filter(|v| !v.is_empty()),
            codes: codes(w.codes)?,
            customer: customer(w.customer)?,
            ip: optional_id(w.ip, "ip")?,
        }),
        EventType::LeadStage => Body::LeadStage(LeadStage {
            lead_id: required(w.lead_id, "lead_id", ty)?,
            stage: required(w.stage, "stage", ty)?,
        }),
        EventType::SubscriptionPayment => {
            let kind = match w.kind.as_deref() {
                None => PaymentKind::Renewal,
                Some(k) => match PaymentKind::parse(k) {
                    Some(PaymentKind::First) | None => {
                        return Err(malformed(
                            "kind",
                            format!(
                                "kind {k:?} is not renewal, upgrade or downgrade (the first payment is the capture)"
                            ),
                        ))
                    }
                    Some(k) => k,
                },
            };
            Body::Payment(Payment {
                subscription_id: required(w.subscription_id, "subscription_id", ty)?,
                payment_id: required(w.payment_id, "payment_id", ty)?,
                kind,
                amount: money(w.amount, "amount", ty)?,
                currency: required(w.currency, "currency", ty)?,
                items: items(w.items)?,
                extra: sale_extra(w.tax, w.shipping, w.discount, w.new_customer, None, w.plan)?,
            })
        }
        EventType::SubscriptionCancel => {
            Body::Cancel(Cancel { subscription_id: required(w.subscription_id, "subscription_id", ty)? })
        }
        EventType::Refund | EventType::Chargeback => Body::Refund(Refund {
            order_id: required(w.order_id, "order_id", ty)?,
            amount: money(w.amount, "amount", ty)?,
            currency: required(w.currency, "currency", ty)?,
            items: items(w.items)?,
            chargeback: ty == EventType::Chargeback,
        }),
        EventType::Payout => {
            let text = required(w.status, "status", ty)?;
            let status = PayoutStatus::parse(&text).ok_or_else(|| {
                malformed(
                    "status",
                    format!("status {text:?} is not one of planned, sent, unknown, paid, failed, reversed"),
                )
            })?;
            Body::Payout(PayoutEvent {
                batch_id: required(w.batch_id, "batch_id", ty)?,
                partner_id: required(w.partner_id, "partner_id", ty)?,
                currency: required(w.currency, "currency", ty)?,
                amount: money(w.amount, "amount", ty)?,
                tds: match w.tds {
                    None => Decimal::ZERO,
                    Some(t) => parse_money(t.get(), "tds")?,
                },
                status,
                provider: optional_id(w.provider, "provider")?,
                provider_ref: optional_id(w.provider_ref, "provider_ref")?,
                detail: optional(w.detail, "detail")?,
                idempotency_key: optional_id(w.idempotency_key, "idempotency_key")?,
                provider_batch: optional_id(w.provider_batch, "provider_batch")?,
                destination: optional_id(w.destination, "destination")?,
                attempted_at: w
                    .attempted_at
                    .map(|t| {
                        DateTime::parse_from_rfc3339(&t).map(|t| t.with_timezone(&Utc)).map_err(|e| {
                            malformed("attempted_at", format!("attempted_at {t:?} is not an RFC 3339 time: {e}"))
                        })
                    })
                    .transpose()?,
            })
        }
        EventType::Review => {
            let text = required(w.decision, "decision", ty)?;
            let decision = Decision::parse(&text).ok_or_else(|| {
                malformed("decision", format!("decision {text:?} is not one of approve, reject, clear"))
            })?;
            let reason = optional(w.reason, "reason")?.filter(|r| !r.trim().is_empty());
            if decision == Decision::Reject && reason.is_none() {
                return Err(malformed("reason", "a reject decision needs a `reason`"));
            }
            Body::Review(ReviewEvent {
                order_id: optional_id(w.order_id, "order_id")?.filter(|o| !o.is_empty()),
                partner_id: optional_id(w.partner_id, "partner_id")?.filter(|p| !p.is_empty()),
                tier: w.tier,
                decision,
                reason,
                reviewer: required(w.reviewer, "reviewer", ty)?,
            })
        }
        // Returned above.
        _ => return Err(malformed("type", format!("{ty} is a registry event"))),
    };
    Ok(Event { event_id, ts, program_id, body })
}

#[cfg(test)]
mod tests;
