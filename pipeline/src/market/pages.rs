//! Server-rendered pages: the marketplace, the partner's page and the
//! brand console. Templates (minijinja) escape every value; forms carry a
//! CSRF token (derived from the console session, or a double-submit cookie
//! for anonymous forms) and cookies are `HttpOnly; SameSite=Strict`.

use afflio_engine::registry::{AppStatus, Verdict};
use afflio_engine::rules::{KeyRole, Payout, PayoutProvider};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use super::api::{apply, decide_as, partner_access, ApplyBody};
use super::auth::{cookie, ConsoleUser, PortalSecret, SESSION_SECS};
use super::{listing_json, lit, partner_json, Market, Refusal};

const PARTNER_COOKIE: &str = "afflio_partner";
const CONSOLE_COOKIE: &str = "afflio_console";
const CSRF_COOKIE: &str = "afflio_csrf";

pub(super) fn templates() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    for (name, text) in [
        ("base.html", include_str!("templates/base.html")),
        ("marketplace.html", include_str!("templates/marketplace.html")),
        ("program.html", include_str!("templates/program.html")),
        ("partner_login.html", include_str!("templates/partner_login.html")),
        ("partner.html", include_str!("templates/partner.html")),
        ("console_login.html", include_str!("templates/console_login.html")),
        ("console.html", include_str!("templates/console.html")),
        ("message.html", include_str!("templates/message.html")),
    ] {
        env.add_template(name, text).expect("the templates compile");
    }
    env
}

pub(super) fn routes(m: Market) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/marketplace") }))
        .route("/marketplace", get(marketplace))
        .route("/marketplace/{program}", get(program_page))
        .route("/marketplace/{program}/apply", post(apply_form).layer(m.limit.clone()))
        .route("/partner", get(partner_page))
        .route("/partner/login", post(partner_login))
        .route("/partner/logout", post(partner_logout))
        .route("/console", get(console))
        .route("/console/login", post(console_login))
        .route("/console/logout", post(console_logout))
        .route("/console/applications/{application}/decide", post(console_decide))
        .route("/console/review", post(console_review))
        .with_state(m)
}

/// A page, rendered; a template error is a bug, answered 500.
fn render(m: &Market, name: &str, status: StatusCode, ctx: Value) -> Response {
    match m.templates.get_template(name).and_then(|t| t.render(&ctx)) {
        Ok(html) => {
            let mut r = (status, Html(html)).into_response();
            let h = r.headers_mut();
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert("x-frame-options", HeaderValue::from_static("DENY"));
            h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'"),
            );
            h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
            r
        }
        Err(e) => {
            eprintln!("afflio: internal error: template {name}: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error: a page template failed\n").into_response()
        }
    }
}

fn message(m: &Market, status: StatusCode, heading: &str, text: &str, back: &str) -> Response {
    render(m, "message.html", status, json!({ "heading": heading, "text": text, "back": back }))
}

fn set_cookie(r: &mut Response, m: &Market, name: &str, value: &str, max_age: i64) {
    let secure = if m.cookie_secure { "; Secure" } else { "" };
    let c = format!("{name}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Strict{secure}");
    if let Ok(v) = HeaderValue::from_str(&c) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

/// The anonymous double-submit token: the cookie's, or a new one (to set).
fn anon_csrf(headers: &HeaderMap) -> (String, bool) {
    match cookie(headers, CSRF_COOKIE).filter(|c| c.len() == 32 && c.bytes().all(|b| b.is_ascii_hexdigit())) {
        Some(c) => (c, false),
        None => (format!("{:032x}", rand::random::<u128>()), true),
    }
}

fn with_anon_csrf(mut r: Response, m: &Market, token: &str, new: bool) -> Response {
    if new {
        set_cookie(&mut r, m, CSRF_COOKIE, token, 86_400);
    }
    r
}

fn form(body: &[u8]) -> std::collections::HashMap<String, String> {
    form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn anon_form_ok(headers: &HeaderMap, f: &std::collections::HashMap<String, String>) -> bool {
    match (cookie(headers, CSRF_COOKIE), f.get("csrf")) {
        (Some(c), Some(given)) => {
            use subtle::ConstantTimeEq;
            c.len() == 32 && bool::from(c.as_bytes().ct_eq(given.as_bytes()))
        }
        _ => false,
    }
}

fn base_url(m: &Market, headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let ok = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if ok {
        format!("{}://{host}", if m.cookie_secure { "https" } else { "http" })
    } else {
        String::new()
    }
}

async fn marketplace(State(m): State<Market>) -> Response {
    let rules = m.rules();
    match m.read(|e| e.listings()).await {
        Ok(listings) => {
            let programs: Vec<Value> =
                listings.iter().filter(|l| l.listed).filter_map(|l| listing_json(&rules, l)).collect();
            render(&m, "marketplace.html", StatusCode::OK, json!({ "programs": programs }))
        }
        Err(e) => message(&m, e.status, "Not available", &e.detail, "/marketplace"),
    }
}

async fn program_view(m: &Market, program: &str) -> Result<Value, Refusal> {
    let rules = m.rules();
    let listings = m.read(|e| e.listings()).await?;
    listings.iter().find(|l| l.listed && l.program_id == program).and_then(|l| listing_json(&rules, l)).ok_or_else(
        || {
            Refusal::new(
                StatusCode::NOT_FOUND,
                "unknown_program",
                Some("program"),
                format!("no listed program {program:?}"),
            )
        },
    )
}

async fn program_page(State(m): State<Market>, Path(program): Path<String>, headers: HeaderMap) -> Response {
    let (csrf, new) = anon_csrf(&headers);
    let r = match program_view(&m, &program).await {
        Ok(p) => render(&m, "program.html", StatusCode::OK, json!({ "p": p, "csrf": csrf, "form": {} })),
        Err(e) => message(&m, e.status, "No such program", &e.detail, "/marketplace"),
    };
    with_anon_csrf(r, &m, &csrf, new)
}

async fn apply_form(State(m): State<Market>, Path(program): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let f = form(&body);
    if !anon_form_ok(&headers, &f) {
        return message(
            &m,
            StatusCode::FORBIDDEN,
            "Form expired",
            "Reload the page and send the form again.",
            "/marketplace",
        );
    }
    let get = |k: &str| f.get(k).map(|v| v.trim().to_string()).unwrap_or_default();
    let account = get("payout_account");
    let payout = match get("payout_provider").as_str() {
        "paypal" => Some(Payout {
            provider: PayoutProvider::Paypal,
            email: Some(account.clone()),
            vpa: None,
            account_number: None,
            ifsc: None,
            name: None,
        }),
        "razorpayx" => Some(Payout {
            provider: PayoutProvider::Razorpayx,
            email: None,
            vpa: Some(account.clone()),
            account_number: None,
            ifsc: None,
            name: Some(get("display_name")),
        }),
        _ => None,
    };
    let b = ApplyBody {
        application_id: None,
        partner_id: get("partner_id"),
        display_name: get("display_name"),
        email: get("email"),
        audience: get("audience"),
        channels: get("channels").lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect(),
        payout,
    };
    match apply(&m, &program, b).await {
        Ok(v) => {
            let token = v["token"].as_str().unwrap_or_default().to_string();
            let mut r = see_other("/partner?new=1");
            set_cookie(&mut r, &m, PARTNER_COOKIE, &token, 30 * 86_400);
            r
        }
        Err(e) => {
            // The form again, with what was typed and why it was refused.
            let (csrf, new) = anon_csrf(&headers);
            let p = program_view(&m, &program).await.unwrap_or(Value::Null);
            let keep: Value = ["partner_id", "display_name", "email", "audience", "channels", "payout_account"]
                .iter()
                .map(|k| (k.to_string(), Value::String(get(k))))
                .collect::<serde_json::Map<_, _>>()
                .into();
            let error = format!(
                "{}{}: {}",
                e.reason,
                e.field.as_deref().map(|f| format!(" ({f})")).unwrap_or_default(),
                e.detail
            );
            let r = render(&m, "program.html", e.status, json!({ "p": p, "csrf": csrf, "form": keep, "error": error }));
            with_anon_csrf(r, &m, &csrf, new)
        }
    }
}

#[derive(serde::Deserialize)]
struct PartnerQuery {
    new: Option<String>,
}

async fn partner_page(State(m): State<Market>, headers: HeaderMap, Query(q): Query<PartnerQuery>) -> Response {
    let (csrf, new) = anon_csrf(&headers);
    let Some(token) = cookie(&headers, PARTNER_COOKIE) else {
        let r = render(&m, "partner_login.html", StatusCode::OK, json!({ "csrf": csrf }));
        return with_anon_csrf(r, &m, &csrf, new);
    };
    let partner = PortalSecret::claimed_partner(&token).map(|(p, _)| p).unwrap_or_default();
    let program = match partner_access(&m, &token, &partner).await {
        Ok(p) => p,
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
            return message(&m, e.status, "Not available", &e.detail, "/partner")
        }
        Err(_) => {
            let r = render(
                &m,
                "partner_login.html",
                StatusCode::UNAUTHORIZED,
                json!({ "csrf": csrf, "error": "That access token is not valid any more: sign in again." }),
            );
            let mut r = with_anon_csrf(r, &m, &csrf, new);
            set_cookie(&mut r, &m, PARTNER_COOKIE, "", 0);
            return r;
        }
    };
    let p = partner.clone();
    let (view, app) = match m.read(move |e| (e.partner_view(&p), e.application_of_partner(&p))).await {
        Ok(x) => x,
        Err(e) => return message(&m, e.status, "Not available", &e.detail, "/partner"),
    };
    let (me, money) = match &view {
        Some(v) => (partner_json(v, app.as_ref()), m.partner_money(&program, &partner).await),
        None => {
            (json!({ "partner_id": partner, "application": app.as_ref().map(super::application_json) }), Value::Null)
        }
    };
    let ctx = json!({
        "me": me,
        "money": money,
        "csrf": csrf,
        "base": base_url(&m, &headers),
        "token": q.new.is_some().then_some(token),
        "flash": q.new.is_some().then_some("Thank you: your application is recorded."),
    });
    with_anon_csrf(render(&m, "partner.html", StatusCode::OK, ctx), &m, &csrf, new)
}

async fn partner_login(State(m): State<Market>, headers: HeaderMap, body: Bytes) -> Response {
    let f = form(&body);
    if !anon_form_ok(&headers, &f) {
        return message(&m, StatusCode::FORBIDDEN, "Form expired", "Reload the page and sign in again.", "/partner");
    }
    let token = f.get("token").map(|t| t.trim().to_string()).unwrap_or_default();
    let partner = PortalSecret::claimed_partner(&token).map(|(p, _)| p).unwrap_or_default();
    if !token.starts_with("pt_") || partner_access(&m, &token, &partner).await.is_err() {
        let (csrf, new) = anon_csrf(&headers);
        let r = render(
            &m,
            "partner_login.html",
            StatusCode::UNAUTHORIZED,
            json!({ "csrf": csrf, "error": "That access token is not valid." }),
        );
        return with_anon_csrf(r, &m, &csrf, new);
    }
    let mut r = see_other("/partner");
    set_cookie(&mut r, &m, PARTNER_COOKIE, &token, 30 * 86_400);
    r
}

async fn partner_logout(State(m): State<Market>, headers: HeaderMap, body: Bytes) -> Response {
    if !anon_form_ok(&headers, &form(&body)) {
        return message(&m, StatusCode::FORBIDDEN, "Form expired", "Reload the page.", "/partner");
    }
    let mut r = see_other("/partner");
    set_cookie(&mut r, &m, PARTNER_COOKIE, "", 0);
    r
}

/// The console's signed-in user and the session's value.
fn console_user(m: &Market, headers: &HeaderMap) -> Option<(ConsoleUser, String)> {
    let session = cookie(headers, CONSOLE_COOKIE)?;
    let user = m.secret.verify_session(&m.rules(), &session, chrono::Utc::now().timestamp())?;
    Some((user, session))
}

#[derive(serde::Deserialize)]
struct ConsoleQuery {
    ok: Option<String>,
}

async fn console(State(m): State<Market>, headers: HeaderMap, Query(q): Query<ConsoleQuery>) -> Response {
    let Some((user, session)) = console_user(&m, &headers) else {
        let (csrf, new) = anon_csrf(&headers);
        let r = render(&m, "console_login.html", StatusCode::OK, json!({ "csrf": csrf }));
        return with_anon_csrf(r, &m, &csrf, new);
    };
    let flash = match q.ok.as_deref() {
        Some("approved") => Some("Application approved: the partner's link and code are created."),
        Some("rejected") => Some("Application rejected."),
        Some("approve") => Some("Every eligible line is approved."),
        Some("clear") => Some("The hold is cleared."),
        Some("reject") => Some("The order's commission is rejected."),
        _ => None,
    };
    console_page(&m, &user, &session, StatusCode::OK, flash, None).await
}

async fn console_page(
    m: &Market,
    user: &ConsoleUser,
    session: &str,
    status: StatusCode,
    flash: Option<&str>,
    error: Option<String>,
) -> Response {
    // Ensure the page shows what was just decided.
    if let Err(e) = m.read(|_| ()).await {
        return message(m, e.status, "Not available", &e.detail, "/console");
    }
    let prog = lit(&user.program_id);
    let summary = m
        .rows(&format!(
            "SELECT status, currency, count(*) AS lines, CAST(sum(net_amount) AS VARCHAR) AS net FROM lines \
             WHERE program_id = {prog} GROUP BY status, currency ORDER BY status, currency"
        ))
        .await;
    let mut ctx = json!({
        "program": user.program_id,
        "role": user.role.as_str(),
        "csrf": m.secret.csrf(session),
        "summary": summary,
        "flash": flash,
        "error": error,
    });
    match user.role {
        KeyRole::Brand => {
            let p = user.program_id.clone();
            let apps = m.read(move |e| e.applications(&p, None, 500)).await.unwrap_or_default();
            let (pending, decided): (Vec<_>, Vec<_>) = apps.iter().partition(|a| a.status == AppStatus::Pending);
            ctx["pending"] = pending.into_iter().map(super::application_json).collect();
            ctx["decided"] = decided.into_iter().take(50).map(super::application_json).collect();
        }
        KeyRole::Review | KeyRole::Finance => {
            ctx["held"] = m
                .rows(&format!(
                    "SELECT l.order_id, l.partner_id, l.tier, CAST(l.net_amount AS VARCHAR) AS net_amount, l.currency, \
                     f.rule, f.value, f.threshold, f.detail FROM lines l JOIN flags f \
                     ON l.program_id = f.program_id AND l.order_id = f.order_id \
                     WHERE l.held AND l.program_id = {prog} AND f.action = 'hold' ORDER BY l.order_id, l.tier, f.rule LIMIT 200"
                ))
                .await
                .into();
            let eligible = m
                .rows(&format!(
                    "SELECT count(*) AS lines, CAST(sum(net_amount) AS VARCHAR) AS net, max(currency) AS currency FROM lines \
                     WHERE program_id = {prog} AND status = 'pending' AND NOT held AND eligible_at <= now()"
                ))
                .await;
            ctx["eligible"] = eligible.into_iter().next().unwrap_or(json!({ "lines": 0 }));
            if user.role == KeyRole::Finance {
                ctx["batches"] = m
                    .rows(&format!(
                        "SELECT batch_id, count(*) AS items, CAST(sum(amount) AS VARCHAR) AS amount, max(currency) AS currency, \
                         string_agg(DISTINCT status, ',') AS statuses, CAST(max(ts) AS VARCHAR) AS last FROM \
                         (SELECT *, row_number() OVER (PARTITION BY batch_id, partner_id ORDER BY ts DESC) AS rn \
                         FROM payouts WHERE program_id = {prog}) WHERE rn = 1 GROUP BY batch_id ORDER BY last DESC LIMIT 50"
                    ))
                    .await
                    .into();
            }
        }
        KeyRole::Ingest => {}
    }
    render(m, "console.html", status, ctx)
}

async fn console_login(State(m): State<Market>, headers: HeaderMap, body: Bytes) -> Response {
    let f = form(&body);
    if !anon_form_ok(&headers, &f) {
        return message(&m, StatusCode::FORBIDDEN, "Form expired", "Reload the page and sign in again.", "/console");
    }
    let key = f.get("key").map(|k| k.trim().to_string()).unwrap_or_default();
    let rules = m.rules();
    match afflio_ingest::http::find_key(&rules, &key) {
        Some(k) if k.role != KeyRole::Ingest => {
            let expires = chrono::Utc::now().timestamp() + SESSION_SECS;
            let session = m.secret.session(&key, expires);
            let mut r = see_other("/console");
            set_cookie(&mut r, &m, CONSOLE_COOKIE, &session, SESSION_SECS);
            r
        }
        found => {
            let (csrf, new) = anon_csrf(&headers);
            let error = if found.is_some() {
                "An ingest key sends checkout events only: sign in with a brand, review or finance key."
            } else {
                "Unknown API key."
            };
            let r = render(&m, "console_login.html", StatusCode::UNAUTHORIZED, json!({ "csrf": csrf, "error": error }));
            with_anon_csrf(r, &m, &csrf, new)
        }
    }
}

async fn console_logout(State(m): State<Market>, headers: HeaderMap, body: Bytes) -> Response {
    let f = form(&body);
    let ok = console_user(&m, &headers).is_some_and(|(_, s)| f.get("csrf").is_some_and(|c| m.secret.check_csrf(&s, c)));
    if !ok {
        return message(&m, StatusCode::FORBIDDEN, "Form expired", "Reload the page.", "/console");
    }
    let mut r = see_other("/console");
    set_cookie(&mut r, &m, CONSOLE_COOKIE, "", 0);
    r
}

/// The signed-in user of a console form, its CSRF token checked.
fn console_form(
    m: &Market,
    headers: &HeaderMap,
    f: &std::collections::HashMap<String, String>,
) -> Result<(ConsoleUser, String), Response> {
    match console_user(m, headers) {
        Some((u, s)) if f.get("csrf").is_some_and(|c| m.secret.check_csrf(&s, c)) => Ok((u, s)),
        Some(_) => Err(message(m, StatusCode::FORBIDDEN, "Form expired", "Reload the page and try again.", "/console")),
        None => Err(see_other("/console")),
    }
}

async fn console_decide(
    State(m): State<Market>,
    Path(application): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f = form(&body);
    let (user, session) = match console_form(&m, &headers, &f) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if user.role != KeyRole::Brand {
        return message(
            &m,
            StatusCode::FORBIDDEN,
            "Not allowed",
            "Applications are decided with a brand key.",
            "/console",
        );
    }
    let decision = match f.get("decision").map(String::as_str) {
        Some("approve") => Verdict::Approve,
        Some("reject") => Verdict::Reject,
        _ => return message(&m, StatusCode::BAD_REQUEST, "Bad form", "decision must be approve or reject", "/console"),
    };
    let reason = f.get("reason").map(|r| r.trim().to_string()).filter(|r| !r.is_empty());
    let by = format!("console:{}", user.fingerprint);
    match decide_as(&m, &user.program_id, &application, decision, reason, by).await {
        Ok(_) => see_other(if decision == Verdict::Approve { "/console?ok=approved" } else { "/console?ok=rejected" }),
        Err(e) => {
            let error = format!("{}: {}", e.reason, e.detail);
            console_page(&m, &user, &session, e.status, None, Some(error)).await
        }
    }
}

async fn console_review(State(m): State<Market>, headers: HeaderMap, body: Bytes) -> Response {
    let f = form(&body);
    let (user, session) = match console_form(&m, &headers, &f) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let decision = f.get("decision").map(String::as_str).unwrap_or("");
    let allowed = match (user.role, decision) {
        (KeyRole::Review, "approve" | "clear" | "reject") => true,
        // Approving what is eligible releases money for payout: finance may.
        (KeyRole::Finance, "approve") => true,
        _ => false,
    };
    if !allowed {
        let text = format!("a {} key may not {decision:?} in the approvals queue", user.role.as_str());
        return message(&m, StatusCode::FORBIDDEN, "Not allowed", &text, "/console");
    }
    let order = f.get("order_id").map(|o| o.trim().to_string()).filter(|o| !o.is_empty());
    let reason = f.get("reason").map(|r| r.trim().to_string()).filter(|r| !r.is_empty());
    if decision == "approve" && order.is_some() {
        return message(
            &m,
            StatusCode::BAD_REQUEST,
            "Bad form",
            "approve here is the bulk approval (no order)",
            "/console",
        );
    }
    let event = json!({
        "type": "review",
        "program_id": user.program_id,
        "order_id": order,
        "decision": decision,
        "reason": reason,
        "reviewer": format!("console:{}", user.fingerprint),
    });
    let sent = {
        let _one = m.writes.lock().await;
        m.submit(event, None).await
    };
    match sent {
        Ok(_) => see_other(&format!("/console?ok={decision}")),
        Err(e) => {
            let error = format!("{}: {}", e.reason, e.detail);
            console_page(&m, &user, &session, e.status, None, Some(error)).await
        }
    }
}
