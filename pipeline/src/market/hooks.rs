//! The webhook endpoints API: a brand key manages its program's endpoints
//! (its own, and partners' on their behalf); a partner's token manages that
//! partner's. Secrets are shown once, when made (creation, rotation).

use afflio_engine::rules::{webhook_problems, KeyRole, WEBHOOK_BRAND_ONLY};
use afflio_ingest::http::Principal;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use super::api::{answer, bearer, parse, partner_access};
use super::{Market, Refusal};
use crate::webhooks::endpoints::{new_secret, rotation_overlap, Endpoint, Endpoints, SigningSecret, MAX_PER_PROGRAM};

pub(super) fn keyed(m: Market) -> Router {
    Router::new()
        .route("/v1/webhooks/endpoints", get(list).post(create))
        .route("/v1/webhooks/endpoints/{id}", get(show).patch(change).delete(remove))
        .route("/v1/webhooks/endpoints/{id}/rotate", post(rotate))
        .with_state(m)
}

pub(super) fn open(m: Market) -> Router {
    Router::new().route("/v1/partners/{partner}/webhooks", get(partner_list).post(partner_create)).with_state(m)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEndpoint {
    url: String,
    events: Vec<String>,
    /// A brand may register a partner's endpoint.
    #[serde(default)]
    partner_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    url: Option<String>,
    events: Option<Vec<String>>,
    /// `true` enables a disabled endpoint (its messages since are delivered); `false` disables it.
    enabled: Option<bool>,
}

fn endpoints(m: &Market) -> Result<std::sync::Arc<Endpoints>, Refusal> {
    m.hooks
        .get()
        .cloned()
        .ok_or_else(|| Refusal::unavailable("the webhook endpoints are not loaded yet (the broker is not reachable)"))
}

fn brand(who: &Principal) -> Result<(), Refusal> {
    if who.role != KeyRole::Brand {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            Some("Authorization"),
            format!("webhook endpoints take a brand key; this is a {} key", who.role.as_str()),
        ));
    }
    Ok(())
}

fn check(url: &str, events: &[String], partner: bool) -> Result<(), Refusal> {
    let problems = webhook_problems(url, events, partner);
    if let Some((field, _)) = problems.first() {
        let all: Vec<String> = problems.iter().map(|(f, m)| format!("{f}: {m}")).collect();
        return Err(Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_endpoint", Some(field), all.join("; ")));
    }
    Ok(())
}

fn not_found(id: &str) -> Refusal {
    Refusal::new(StatusCode::NOT_FOUND, "not_found", Some("id"), format!("no webhook endpoint {id:?} in this program"))
}

async fn make(m: &Market, program: &str, partner: Option<String>, body: &[u8]) -> Result<Response, Refusal> {
    let n: NewEndpoint = parse(body)?;
    let partner = partner.or(n.partner_id);
    check(&n.url, &n.events, partner.is_some())?;
    let eps = endpoints(m)?;
    if eps.of_program(program).len() >= MAX_PER_PROGRAM {
        return Err(Refusal::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "limit_reached",
            None,
            format!("program {program:?} has {MAX_PER_PROGRAM} endpoints, the limit"),
        ));
    }
    let next = crate::webhooks::next_position(&m.js).await.map_err(|e| Refusal::unavailable(e.to_string()))?;
    let secret = new_secret();
    let id = format!("ep_{:016x}", rand::random::<u64>());
    let ep = Endpoint {
        id: id.clone(),
        program_id: program.to_string(),
        partner_id: partner,
        url: n.url,
        events: n.events,
        secrets: vec![SigningSecret { secret: secret.clone(), expires_at: None }],
        disabled: None,
        created_at: Utc::now(),
        source: "api".into(),
        start_seq: next,
    };
    eps.put(ep.clone()).await.map_err(|e| Refusal::unavailable(e.to_string()))?;
    let mut v = ep.view();
    v["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn list(State(m): State<Market>, Extension(who): Extension<Principal>) -> Response {
    answer(
        async {
            brand(&who)?;
            let items: Vec<_> = endpoints(&m)?.of_program(&who.program_id).iter().map(Endpoint::view).collect();
            Ok(Json(json!({ "endpoints": items })).into_response())
        }
        .await,
    )
}

async fn create(State(m): State<Market>, Extension(who): Extension<Principal>, body: Bytes) -> Response {
    answer(
        async {
            brand(&who)?;
            make(&m, &who.program_id, None, &body).await
        }
        .await,
    )
}

fn owned(eps: &Endpoints, program: &str, id: &str) -> Result<Endpoint, Refusal> {
    eps.get(id).filter(|e| e.program_id == program).ok_or_else(|| not_found(id))
}

async fn show(State(m): State<Market>, Extension(who): Extension<Principal>, Path(id): Path<String>) -> Response {
    answer(
        async {
            brand(&who)?;
            Ok(Json(owned(&*endpoints(&m)?, &who.program_id, &id)?.view()).into_response())
        }
        .await,
    )
}

async fn change(
    State(m): State<Market>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    answer(
        async {
            brand(&who)?;
            let eps = endpoints(&m)?;
            let mut ep = owned(&eps, &who.program_id, &id)?;
            let c: Change = parse(&body)?;
            if ep.source == "config" && (c.url.is_some() || c.events.is_some()) {
                return Err(Refusal::new(
                    StatusCode::CONFLICT,
                    "configured",
                    Some("id"),
                    format!("endpoint {id:?} comes from the rules file: change it there"),
                ));
            }
            if let Some(u) = c.url {
                ep.url = u;
            }
            if let Some(e) = c.events {
                ep.events = e;
            }
            check(&ep.url, &ep.events, ep.partner_id.is_some())?;
            match c.enabled {
                Some(true) => ep.disabled = None,
                Some(false) if ep.disabled.is_none() => {
                    ep.disabled = Some(crate::webhooks::endpoints::Disabled {
                        at: Utc::now(),
                        reason: "disabled by the brand".into(),
                    })
                }
                _ => {}
            }
            eps.put(ep.clone()).await.map_err(|e| Refusal::unavailable(e.to_string()))?;
            Ok(Json(ep.view()).into_response())
        }
        .await,
    )
}

async fn remove(State(m): State<Market>, Extension(who): Extension<Principal>, Path(id): Path<String>) -> Response {
    answer(
        async {
            brand(&who)?;
            let eps = endpoints(&m)?;
            let ep = owned(&eps, &who.program_id, &id)?;
            if ep.source == "config" {
                return Err(Refusal::new(
                    StatusCode::CONFLICT,
                    "configured",
                    Some("id"),
                    format!("endpoint {id:?} comes from the rules file: remove it there"),
                ));
            }
            eps.remove(&id).await.map_err(|e| Refusal::unavailable(e.to_string()))?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

async fn rotate(State(m): State<Market>, Extension(who): Extension<Principal>, Path(id): Path<String>) -> Response {
    answer(
        async {
            brand(&who)?;
            let eps = endpoints(&m)?;
            let mut ep = owned(&eps, &who.program_id, &id)?;
            if ep.source == "config" {
                return Err(Refusal::new(
                    StatusCode::CONFLICT,
                    "configured",
                    Some("id"),
                    format!("endpoint {id:?} takes its secret from the rules file's secret_env: rotate it there"),
                ));
            }
            let now = Utc::now();
            let until = now + rotation_overlap();
            ep.secrets.retain(|s| s.expires_at.is_none_or(|x| x > now));
            for s in &mut ep.secrets {
                s.expires_at.get_or_insert(until);
            }
            let secret = new_secret();
            ep.secrets.insert(0, SigningSecret { secret: secret.clone(), expires_at: None });
            eps.put(ep.clone()).await.map_err(|e| Refusal::unavailable(e.to_string()))?;
            let mut v = ep.view();
            v["secret"] = json!(secret);
            v["previous_secret_expires_at"] = json!(until.to_rfc3339());
            Ok(Json(v).into_response())
        }
        .await,
    )
}

async fn partner_list(State(m): State<Market>, Path(partner): Path<String>, headers: HeaderMap) -> Response {
    answer(
        async {
            let program = partner_access(&m, &bearer(&headers)?, &partner).await?;
            let items: Vec<_> = endpoints(&m)?
                .of_program(&program)
                .iter()
                .filter(|e| e.partner_id.as_deref() == Some(partner.as_str()))
                .map(Endpoint::view)
                .collect();
            Ok(Json(json!({ "endpoints": items })).into_response())
        }
        .await,
    )
}

async fn partner_create(
    State(m): State<Market>,
    Path(partner): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(
        async {
            let program = partner_access(&m, &bearer(&headers)?, &partner).await?;
            let n: NewEndpoint = parse(&body)?;
            if n.partner_id.as_deref().is_some_and(|p| p != partner) {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    Some("partner_id"),
                    "a partner registers its own endpoints only",
                ));
            }
            if let Some(t) = n.events.iter().find(|e| WEBHOOK_BRAND_ONLY.contains(&e.as_str())) {
                return Err(Refusal::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_endpoint",
                    Some("events"),
                    format!("{t:?} is for the brand's endpoints only"),
                ));
            }
            make(&m, &program, Some(partner), &body).await
        }
        .await,
    )
}
