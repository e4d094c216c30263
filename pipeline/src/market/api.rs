//! The marketplace's JSON API.

use afflio_engine::registry::{AppStatus, Apply, NewCode, NewLink, Publish, UpdatePartner, Verdict};
use afflio_engine::rules::KeyRole;
use afflio_ingest::http::Principal;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::PortalSecret;
use super::{application_json, listing_json, partner_json, Market, Refusal};

pub(super) fn open(m: Market) -> Router {
    Router::new()
        .route("/v1/marketplace/programs", get(list_programs))
        .route("/v1/marketplace/programs/{program}", get(get_program))
        .route("/v1/marketplace/programs/{program}/applications", post(apply_json).layer(m.limit.clone()))
        .route("/v1/partners/{partner}", get(partner_profile))
        .route("/v1/partners/{partner}/{part}", get(partner_part))
        .route("/openapi.json", get(openapi))
        .with_state(m)
}

pub(super) fn keyed(m: Market) -> Router {
    Router::new()
        .route("/v1/applications", get(list_applications))
        .route("/v1/applications/{application}/decision", post(decide))
        .route("/v1/listing", put(publish))
        .route("/v1/links", post(create_link))
        .route("/v1/codes", post(create_code))
        .route("/v1/partner-updates", post(update_partner))
        .route("/v1/partner-tokens", post(partner_token))
        .with_state(m)
}

/// A JSON body, strictly typed; a wrong or unknown field is named.
pub(super) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { None } else { Some(path.as_str()) };
        Refusal::new(StatusCode::BAD_REQUEST, "malformed", field, format!("the body: {}", e.inner()))
    })
}

pub(super) fn answer(r: Result<Response, Refusal>) -> Response {
    r.unwrap_or_else(|e| e.answer())
}

fn brand_only(who: &Principal) -> Result<(), Refusal> {
    if who.role != KeyRole::Brand {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            Some("Authorization"),
            format!("the registry API takes a brand key; this is a {} key", who.role.as_str()),
        ));
    }
    Ok(())
}

async fn list_programs(State(m): State<Market>) -> Response {
    answer(
        async {
            let rules = m.rules();
            let listings = m.read(|e| e.listings()).await?;
            let items: Vec<Value> =
                listings.iter().filter(|l| l.listed).filter_map(|l| listing_json(&rules, l)).collect();
            Ok(Json(json!({ "programs": items })).into_response())
        }
        .await,
    )
}

async fn get_program(State(m): State<Market>, Path(program): Path<String>) -> Response {
    answer(
        async {
            let rules = m.rules();
            let listings = m.read(|e| e.listings()).await?;
            let found =
                listings.iter().find(|l| l.listed && l.program_id == program).and_then(|l| listing_json(&rules, l));
            match found {
                Some(v) => Ok(Json(v).into_response()),
                None => Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    "unknown_program",
                    Some("program"),
                    format!("no listed program {program:?}"),
                )),
            }
        }
        .await,
    )
}

/// What a creator sends to apply.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApplyBody {
    #[serde(default)]
    pub(super) application_id: Option<String>,
    pub(super) partner_id: String,
    pub(super) display_name: String,
    pub(super) email: String,
    #[serde(default)]
    pub(super) audience: String,
    #[serde(default)]
    pub(super) channels: Vec<String>,
    #[serde(default)]
    pub(super) payout: Option<afflio_engine::rules::Payout>,
}

/// Records an application; answers its id, status and the applicant's token.
pub(super) async fn apply(m: &Market, program: &str, b: ApplyBody) -> Result<Value, Refusal> {
    let application_id = b.application_id.unwrap_or_else(|| format!("app-{:016x}", rand::random::<u64>()));
    let a = Apply {
        application_id: application_id.clone(),
        partner_id: b.partner_id.clone(),
        display_name: b.display_name,
        email: b.email,
        audience: b.audience,
        channels: b.channels,
        payout: b.payout,
    };
    let _one = m.writes.lock().await;
    if m.rules().program(program).is_none() {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "unknown_program",
            Some("program"),
            format!("no program {program:?}"),
        ));
    }
    let data = serde_json::to_value(&a).map_err(|e| Refusal::unavailable(format!("internal: {e}")))?;
    m.submit(json!({"type": "partner_applied", "program_id": program, "data": data}), None).await?;
    let (pid, app) = (b.partner_id.clone(), application_id.clone());
    let prog = program.to_string();
    let (status, epoch) = m
        .read(move |e| (e.application(&prog, &app).map(|a| a.status), e.partner_token_epoch(&pid).map(|(_, ep)| ep)))
        .await?;
    Ok(json!({
        "application_id": application_id,
        "partner_id": b.partner_id,
        "status": status.map(AppStatus::as_str),
        "token": m.secret.partner_token(program, &b.partner_id, epoch.unwrap_or(0)),
        "partner_page": "/partner",
    }))
}

async fn apply_json(State(m): State<Market>, Path(program): Path<String>, body: Bytes) -> Response {
    answer(
        async {
            let b: ApplyBody = parse(&body)?;
            let v = apply(&m, &program, b).await?;
            Ok((StatusCode::CREATED, Json(v)).into_response())
        }
        .await,
    )
}

/// Checks a partner's reader: the partner's own token, or an API key of the
/// partner's program. Returns the partner's program.
pub(super) async fn partner_access(m: &Market, credential: &str, partner: &str) -> Result<String, Refusal> {
    let unauthorized = |d: &str| Refusal::new(StatusCode::UNAUTHORIZED, "unauthorized", Some("Authorization"), d);
    let p = partner.to_string();
    let owner = m.read(move |e| e.partner_token_epoch(&p)).await?;
    if credential.starts_with("pt_") {
        let Some((claimed, _)) = PortalSecret::claimed_partner(credential) else {
            return Err(unauthorized("not a partner token"));
        };
        if claimed != partner {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                Some("partner"),
                "a partner token reads its own partner's data only",
            ));
        }
        match owner {
            Some((program, epoch)) if m.secret.verify_partner(credential, &program, partner, epoch) => Ok(program),
            _ => Err(unauthorized("this partner token is not valid (revoked, or from another secret)")),
        }
    } else {
        let rules = m.rules();
        let Some(key) = afflio_ingest::http::find_key(&rules, credential) else {
            return Err(unauthorized("unknown API key or token"));
        };
        match owner {
            Some((program, _)) if program == key.program_id => Ok(program),
            _ => Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "unknown_partner",
                Some("partner"),
                format!("no partner {partner:?} in program {:?}", key.program_id),
            )),
        }
    }
}

pub(super) fn bearer(headers: &HeaderMap) -> Result<String, Refusal> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                Some("Authorization"),
                "missing `Authorization: Bearer <partner token or API key>`",
            )
        })
}

async fn partner_profile(State(m): State<Market>, Path(partner): Path<String>, headers: HeaderMap) -> Response {
    answer(
        async {
            partner_access(&m, &bearer(&headers)?, &partner).await?;
            let p = partner.clone();
            let (view, app) = m.read(move |e| (e.partner_view(&p), e.application_of_partner(&p))).await?;
            let v = match &view {
                Some(v) => partner_json(v, app.as_ref()),
                // Applied, not approved yet: the application alone.
                None => json!({ "partner_id": partner, "application": app.as_ref().map(application_json) }),
            };
            Ok(Json(v).into_response())
        }
        .await,
    )
}

async fn partner_part(
    State(m): State<Market>,
    Path((partner, part)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    answer(
        async {
            let program = partner_access(&m, &bearer(&headers)?, &partner).await?;
            let money = m.partner_money(&program, &partner).await;
            let v = match part.as_str() {
                "clicks" => json!({ "clicks": money["clicks"], "recent": money["recent_clicks"] }),
                "orders" => json!({ "orders": money["orders"] }),
                "commissions" => json!({ "by_status": money["commissions"] }),
                "balance" => json!({ "balance": money["balance"] }),
                "payouts" => json!({ "payouts": money["payouts"] }),
                other => {
                    return Err(Refusal::new(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        Some("part"),
                        format!("{other:?} is not one of clicks, orders, commissions, balance, payouts"),
                    ))
                }
            };
            Ok(Json(v).into_response())
        }
        .await,
    )
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
}

async fn list_applications(
    State(m): State<Market>,
    Extension(who): Extension<Principal>,
    Query(q): Query<ListQuery>,
) -> Response {
    answer(
        async {
            brand_only(&who)?;
            let status = match q.status.as_deref() {
                None | Some("") | Some("all") => None,
                Some("pending") => Some(AppStatus::Pending),
                Some("approved") => Some(AppStatus::Approved),
                Some("rejected") => Some(AppStatus::Rejected),
                Some(other) => {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "malformed",
                        Some("status"),
                        format!("status {other:?} is not one of pending, approved, rejected, all"),
                    ))
                }
            };
            let limit = q.limit.unwrap_or(100).clamp(1, 1000);
            let program = who.program_id.clone();
            let apps = m.read(move |e| e.applications(&program, status, limit)).await?;
            Ok(Json(json!({ "applications": apps.iter().map(application_json).collect::<Vec<_>>() })).into_response())
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    decision: Verdict,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    decided_by: Option<String>,
}

/// Decides an application as `by`; answers the application after it.
pub(super) async fn decide_as(
    m: &Market,
    program: &str,
    application: &str,
    decision: Verdict,
    reason: Option<String>,
    by: String,
) -> Result<Value, Refusal> {
    let _one = m.writes.lock().await;
    let data = json!({ "application_id": application, "decision": decision, "reason": reason, "decided_by": by });
    m.submit(json!({"type": "application_decided", "program_id": program, "data": data}), None).await?;
    let (p, a) = (program.to_string(), application.to_string());
    let app = m.read(move |e| e.application(&p, &a)).await?;
    Ok(app.as_ref().map(application_json).unwrap_or(Value::Null))
}

async fn decide(
    State(m): State<Market>,
    Extension(who): Extension<Principal>,
    Path(application): Path<String>,
    body: Bytes,
) -> Response {
    answer(
        async {
            brand_only(&who)?;
            let b: DecisionBody = parse(&body)?;
            let by = b.decided_by.unwrap_or_else(|| "api".into());
            let v = decide_as(&m, &who.program_id, &application, b.decision, b.reason, by).await?;
            Ok(Json(v).into_response())
        }
        .await,
    )
}

/// Sends one registry event of the caller's program.
async fn registry_write(
    m: &Market,
    who: &Principal,
    ty: &str,
    data: Value,
    idem: Option<String>,
) -> Result<Response, Refusal> {
    brand_only(who)?;
    let _one = m.writes.lock().await;
    let id = m.submit(json!({"type": ty, "program_id": who.program_id, "data": data}), idem).await?;
    Ok((StatusCode::OK, Json(json!({ "status": "applied", "event_id": id }))).into_response())
}

fn idempotency(headers: &HeaderMap) -> Result<Option<String>, Refusal> {
    match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(k)) if !k.is_empty() && k.len() <= 128 && !k.starts_with(afflio_ingest::http::RESERVED_ID_PREFIX) => {
            Ok(Some(k.to_string()))
        }
        Some(_) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            Some("Idempotency-Key"),
            "the Idempotency-Key must be 1 to 128 visible characters, not starting with \"afflio:\"",
        )),
    }
}

/// A registry write whose body is the event's `data`, typed as `T` (the
/// engine's own type: the body is checked as the event will be).
async fn typed_write<T: serde::de::DeserializeOwned + serde::Serialize>(
    m: Market,
    who: Principal,
    headers: HeaderMap,
    body: Bytes,
    ty: &'static str,
) -> Response {
    answer(
        async {
            let b: T = parse(&body)?;
            registry_write(&m, &who, ty, json!(b), idempotency(&headers)?).await
        }
        .await,
    )
}

async fn publish(State(m): State<Market>, Extension(w): Extension<Principal>, h: HeaderMap, b: Bytes) -> Response {
    typed_write::<Publish>(m, w, h, b, "program_published").await
}

async fn create_link(State(m): State<Market>, Extension(w): Extension<Principal>, h: HeaderMap, b: Bytes) -> Response {
    typed_write::<NewLink>(m, w, h, b, "link_created").await
}

async fn create_code(State(m): State<Market>, Extension(w): Extension<Principal>, h: HeaderMap, b: Bytes) -> Response {
    typed_write::<NewCode>(m, w, h, b, "code_created").await
}

async fn update_partner(
    State(m): State<Market>,
    Extension(w): Extension<Principal>,
    h: HeaderMap,
    b: Bytes,
) -> Response {
    typed_write::<UpdatePartner>(m, w, h, b, "partner_updated").await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    partner_id: String,
}

/// A partner's current access token, for the brand to hand over (a partner
/// of the rules file, or one whose token was rotated).
async fn partner_token(State(m): State<Market>, Extension(who): Extension<Principal>, body: Bytes) -> Response {
    answer(
        async {
            brand_only(&who)?;
            let b: TokenBody = parse(&body)?;
            let p = b.partner_id.clone();
            let owner = m.read(move |e| e.partner_token_epoch(&p)).await?;
            match owner {
                Some((program, epoch)) if program == who.program_id => {
                    let token = m.secret.partner_token(&program, &b.partner_id, epoch);
                    Ok(Json(json!({ "partner_id": b.partner_id, "token": token })).into_response())
                }
                _ => Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    "unknown_partner",
                    Some("partner_id"),
                    format!("no partner {:?} in program {:?}", b.partner_id, who.program_id),
                )),
            }
        }
        .await,
    )
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], super::openapi::document()).into_response()
}
