//! The marketplace in the live service, over HTTP: every endpoint and role,
//! partner tokens confined to their own partner, refusals that name the
//! field, registry links that redirect and count clicks, CSRF on forms,
//! escaping on pages, and a kill -9 after which the registry is all there.

mod common;

use std::time::Duration;

use common::*;

const BRAND: &str = "acme-brand-key-0123456789";
const INGEST: &str = "acme-ingest-key-0123456789";
const REVIEW: &str = "acme-review-key-0123456789";
const OTHER_BRAND: &str = "other-brand-key-0123456789";

fn rules(dir: &std::path::Path) -> std::path::PathBuf {
    let t = format!(
        r#"
[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
hold = "30d"
[programs.marketplace]
listed = true
name = "Acme Outdoor"
description = "Tents"
terms = "No brand bidding"
category = "outdoor"
link_pattern = "acme-{{partner}}"
code_pattern = "{{PARTNER}}10"
destination = "https://acme.example/landing"
[[programs]]
id = "other"
currency = "USD"
rate = "5%"
[programs.marketplace]
listed = true
name = "Other Co"
[[programs]]
id = "hidden"
currency = "USD"
rate = "5%"
[[api_keys]]
program_id = "acme"
key = "{BRAND}"
role = "brand"
[[api_keys]]
program_id = "acme"
key = "{INGEST}"
role = "ingest"
[[api_keys]]
program_id = "acme"
key = "{REVIEW}"
role = "review"
[[api_keys]]
program_id = "other"
key = "{OTHER_BRAND}"
role = "brand"
"#
    );
    let p = dir.join("rules.toml");
    std::fs::write(&p, t).unwrap();
    p
}

/// One check per boundary: (method, path, credential, body) -> status and, when given, a reason.
/// (method, path, credential, body, status, reason)
type Case<'a> = (&'a str, &'a str, Option<&'a str>, &'a str, u16, Option<&'a str>);

fn check(port: u16, cases: &[Case<'_>]) {
    for (method, path, key, body, status, reason) in cases {
        let (s, v) = call(port, method, path, *key, body);
        assert_eq!(s, *status, "{method} {path} {body}: {v}");
        if let Some(r) = reason {
            assert_eq!(v["reason"], *r, "{method} {path}: {v}");
        }
    }
}

#[test]
fn the_marketplace_api_every_role_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("AFFLIO_PORTAL_SECRET", "a test portal secret of at least 32 bytes");
    let nats = Nats::start(&dir.path().join("nats"));
    let rules = rules(dir.path());
    let (data, state) = (dir.path().join("data"), dir.path().join("state"));
    let mut svc = Service::start(&rules, &nats.url(), &data, &state);
    let port = svc.port;

    // Listings: listed programs only, with the program's own terms.
    let (s, v) = call(port, "GET", "/v1/marketplace/programs", None, "");
    assert_eq!(s, 200);
    let ids: Vec<&str> = v["programs"].as_array().unwrap().iter().map(|p| p["program_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["acme", "other"]);
    assert_eq!(v["programs"][0]["rate"], "10%");
    assert_eq!(v["programs"][0]["hold"], "30d");

    let maya = r#"{"partner_id":"maya","display_name":"Maya","email":"maya@example.com","channels":["https://yt.example/maya"],"payout":{"provider":"paypal","email":"maya@example.com"}}"#;
    let (s, applied) = call(port, "POST", "/v1/marketplace/programs/acme/applications", None, maya);
    assert_eq!(s, 201, "{applied}");
    assert_eq!(applied["status"], "pending");
    let token = applied["token"].as_str().unwrap().to_string();
    let app = applied["application_id"].as_str().unwrap().to_string();
    let (_, noor) = call(
        port,
        "POST",
        "/v1/marketplace/programs/acme/applications",
        None,
        r#"{"partner_id":"noor","display_name":"Noor","email":"noor@example.com"}"#,
    );
    let noor_token = noor["token"].as_str().unwrap().to_string();

    let decision = format!("/v1/applications/{app}/decision");
    check(
        port,
        &[
            // Applying: refusals name the field.
            ("GET", "/v1/marketplace/programs/hidden", None, "", 404, Some("unknown_program")),
            ("POST", "/v1/marketplace/programs/hidden/applications", None, maya, 422, Some("invalid_registry")),
            ("POST", "/v1/marketplace/programs/acme/applications", None, maya, 409, Some("duplicate_id")),
            (
                "POST",
                "/v1/marketplace/programs/acme/applications",
                None,
                r#"{"partner_id":"x1","display_name":"X","email":"not-an-address"}"#,
                422,
                Some("invalid_registry"),
            ),
            (
                "POST",
                "/v1/marketplace/programs/acme/applications",
                None,
                r#"{"partner_id":"x2","display_name":"X","email":"x@example.com","colour":"red"}"#,
                400,
                Some("malformed"),
            ),
            // Reading and deciding applications: brand keys of the program only.
            ("GET", "/v1/applications", None, "", 401, Some("unauthorized")),
            ("GET", "/v1/applications", Some(INGEST), "", 403, Some("forbidden")),
            ("GET", "/v1/applications?status=bogus", Some(BRAND), "", 400, Some("malformed")),
            ("POST", &decision, Some(REVIEW), r#"{"decision":"approve"}"#, 403, Some("forbidden")),
            ("POST", &decision, Some(OTHER_BRAND), r#"{"decision":"approve"}"#, 404, Some("unknown_application")),
            ("POST", &decision, Some(BRAND), r#"{"decision":"reject"}"#, 422, Some("invalid_registry")),
            ("POST", &decision, Some(BRAND), r#"{"decision":"approve"}"#, 200, None),
            ("POST", &decision, Some(BRAND), r#"{"decision":"approve"}"#, 409, Some("already_decided")),
            (
                "POST",
                "/v1/applications/nope/decision",
                Some(BRAND),
                r#"{"decision":"approve"}"#,
                404,
                Some("unknown_application"),
            ),
        ],
    );
    let (_, pending) = call(port, "GET", "/v1/applications?status=pending", Some(BRAND), "");
    assert_eq!(pending["applications"].as_array().unwrap().len(), 1, "noor waits: {pending}");
    let (_, others) = call(port, "GET", "/v1/applications", Some(OTHER_BRAND), "");
    assert_eq!(others["applications"].as_array().unwrap().len(), 0, "another program sees none: {others}");

    // The partner's own data: its token, or a key of its program.
    let (s, me) = call(port, "GET", "/v1/partners/maya", Some(&token), "");
    assert_eq!(s, 200, "{me}");
    assert_eq!(me["links"][0]["link_id"], "acme-maya");
    assert_eq!(me["codes"][0]["code"], "MAYA10");
    check(
        port,
        &[
            ("GET", "/v1/partners/maya", None, "", 401, Some("unauthorized")),
            ("GET", "/v1/partners/maya", Some(&noor_token), "", 403, Some("forbidden")),
            ("GET", "/v1/partners/maya/orders", Some(&noor_token), "", 403, Some("forbidden")),
            ("GET", "/v1/partners/maya", Some("pt_6d617961_0_0000"), "", 401, Some("unauthorized")),
            ("GET", "/v1/partners/maya", Some(BRAND), "", 200, None),
            ("GET", "/v1/partners/maya", Some(OTHER_BRAND), "", 404, Some("unknown_partner")),
            ("GET", "/v1/partners/maya/bogus", Some(&token), "", 404, None),
            ("GET", "/v1/partners/noor", Some(&noor_token), "", 200, None),
        ],
    );
    for part in ["clicks", "orders", "commissions", "balance", "payouts"] {
        let (s, v) = call(port, "GET", &format!("/v1/partners/maya/{part}"), Some(&token), "");
        assert_eq!(s, 200, "{part}: {v}");
    }

    // A partner registers its own webhook endpoint with its token: never fraud flags, never for another.
    let hook = r#"{"url":"https://maya.example/hooks","events":["commission.created","payout.paid"]}"#;
    check(
        port,
        &[
            ("POST", "/v1/partners/maya/webhooks", Some(&noor_token), hook, 403, Some("forbidden")),
            ("POST", "/v1/partners/maya/webhooks", None, hook, 401, Some("unauthorized")),
            (
                "POST",
                "/v1/partners/maya/webhooks",
                Some(&token),
                r#"{"url":"https://maya.example/hooks","events":["flag.raised"]}"#,
                422,
                Some("invalid_endpoint"),
            ),
            (
                "POST",
                "/v1/partners/maya/webhooks",
                Some(&token),
                r#"{"url":"https://maya.example/hooks","events":["commission.created"],"partner_id":"noor"}"#,
                403,
                Some("forbidden"),
            ),
        ],
    );
    let (s, v) = call(port, "POST", "/v1/partners/maya/webhooks", Some(&token), hook);
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["partner_id"], "maya");
    assert!(v["secret"].as_str().unwrap().starts_with("whsec_"));
    let (s, v) = call(port, "GET", "/v1/partners/maya/webhooks", Some(&token), "");
    assert_eq!((s, v["endpoints"].as_array().unwrap().len()), (200, 1), "{v}");
    let (_, v) = call(port, "GET", "/v1/partners/noor/webhooks", Some(&noor_token), "");
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 0, "noor sees none of maya's");
    let (_, v) = call(port, "GET", "/v1/webhooks/endpoints", Some(BRAND), "");
    assert_eq!(v["endpoints"][0]["partner_id"], "maya", "the brand sees its partners' endpoints: {v}");

    // The brand adds a link and a code; conflicts and strangers are refused.
    check(
        port,
        &[
            ("POST", "/v1/links", Some(BRAND), r#"{"link_id":"maya-tiktok","partner_id":"maya"}"#, 200, None),
            (
                "POST",
                "/v1/links",
                Some(BRAND),
                r#"{"link_id":"maya-tiktok","partner_id":"maya"}"#,
                409,
                Some("duplicate_id"),
            ),
            (
                "POST",
                "/v1/links",
                Some(BRAND),
                r#"{"link_id":"g-1","partner_id":"ghost"}"#,
                404,
                Some("unknown_partner"),
            ),
            ("POST", "/v1/links", Some(INGEST), r#"{"link_id":"g-2","partner_id":"maya"}"#, 403, Some("forbidden")),
            ("POST", "/v1/codes", Some(BRAND), r#"{"code":"mayafall","partner_id":"maya","max_uses":3}"#, 200, None),
            ("POST", "/v1/codes", Some(BRAND), r#"{"code":"MAYA10","partner_id":"maya"}"#, 409, Some("duplicate_id")),
            ("PUT", "/v1/listing", Some(BRAND), r#"{"name":"Acme Outdoor 2"}"#, 200, None),
            ("PUT", "/v1/listing", Some(BRAND), r#"{"name":""}"#, 422, Some("invalid_registry")),
        ],
    );
    // A registry link redirects, and its clicks are accepted at the edge.
    let (s, head, _) =
        http_full(port, "GET", "/r/maya-tiktok", &[("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0")], "");
    assert_eq!(s, 302, "{head}");
    assert!(head.contains("location: https://acme.example/landing"), "{head}");
    // Checkout events after the registry's (whose time is the server's): now.
    let now = chrono::Utc::now().to_rfc3339();
    let click = format!(
        r#"{{"type":"click","event_id":"k1","ts":"{now}","program_id":"acme","link_id":"acme-maya","visitor_id":"v1"}}"#
    );
    assert_eq!(http(port, "POST", "/v1/events", Some(INGEST), &click).0, 202);
    let ghost = format!(
        r#"{{"type":"click","event_id":"k2","ts":"{now}","program_id":"acme","link_id":"nobody","visitor_id":"v1"}}"#
    );
    assert_eq!(http(port, "POST", "/v1/events", Some(INGEST), &ghost).0, 422);
    let capture = format!(
        r#"{{"type":"capture","event_id":"c1","ts":"{now}","program_id":"acme","order_id":"o1","amount":"50.00","currency":"USD","codes":["mayafall"]}}"#
    );
    assert_eq!(http(port, "POST", "/v1/events", Some(INGEST), &capture).0, 202);
    wait_for("maya's order in the store", Duration::from_secs(30), || {
        call(port, "GET", "/v1/partners/maya/orders", Some(&token), "").1["orders"]
            .as_array()
            .is_some_and(|o| o.len() == 1)
    });
    let (_, c) = call(port, "GET", "/v1/partners/maya/commissions", Some(&token), "");
    assert_eq!(c["by_status"][0]["net"], "5.0000", "{c}");

    // The OpenAPI document covers the whole API.
    let (s, doc) = call(port, "GET", "/openapi.json", None, "");
    assert_eq!(s, 200);
    for p in [
        "/v1/events",
        "/v1/marketplace/programs",
        "/v1/applications/{application}/decision",
        "/v1/payouts",
        "/v1/partners/{partner}/{part}",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} missing from /openapi.json");
    }

    // Killed and restarted: the registry, the link directory and tokens are all there.
    svc.kill9();
    svc.restart();
    let port = svc.port;
    let (s, me) = call(port, "GET", "/v1/partners/maya", Some(&token), "");
    assert_eq!(s, 200, "{me}");
    assert_eq!(me["links"].as_array().unwrap().len(), 2);
    let (s, head, _) = http_full(port, "GET", "/r/acme-maya", &[], "");
    assert_eq!(s, 302, "{head}");
    // A rotated token stops working; the new one (from the brand) works.
    check(
        port,
        &[("POST", "/v1/partner-updates", Some(BRAND), r#"{"partner_id":"maya","rotate_token":true}"#, 200, None)],
    );
    check(port, &[("GET", "/v1/partners/maya", Some(&token), "", 401, Some("unauthorized"))]);
    let (s, fresh) = call(port, "POST", "/v1/partner-tokens", Some(BRAND), r#"{"partner_id":"maya"}"#);
    assert_eq!(s, 200, "{fresh}");
    let fresh = fresh["token"].as_str().unwrap().to_string();
    assert_ne!(fresh, token);
    check(
        port,
        &[
            ("GET", "/v1/partners/maya", Some(&fresh), "", 200, None),
            ("POST", "/v1/partner-tokens", Some(OTHER_BRAND), r#"{"partner_id":"maya"}"#, 404, Some("unknown_partner")),
            ("POST", "/v1/partner-tokens", Some(INGEST), r#"{"partner_id":"maya"}"#, 403, Some("forbidden")),
        ],
    );
    // Suspended: the link stops crediting.
    check(port, &[("POST", "/v1/partner-updates", Some(BRAND), r#"{"partner_id":"maya","active":false}"#, 200, None)]);
    let now = chrono::Utc::now().to_rfc3339();
    let click = format!(
        r#"{{"type":"click","event_id":"k3","ts":"{now}","program_id":"acme","link_id":"acme-maya","visitor_id":"v3"}}"#
    );
    assert_eq!(
        http(port, "POST", "/v1/events", Some(INGEST), &click).0,
        202,
        "accepted at the edge (the engine refuses it)"
    );
    wait_for("the suspended link's click refused", Duration::from_secs(30), || {
        sql(&data, "SELECT count(*) AS n FROM rejections WHERE event_id = 'k3' AND reason = 'unknown_link'")
            .contains('1')
    });

    // A replay of the stream (registry events included) gives what the live service gave.
    let events = dir.path().join("stream.jsonl");
    std::fs::write(&events, stream_events(&nats.url()).join("\n")).unwrap();
    let (ledger_replayed, orders_replayed) = replay_ledger(dir.path(), &rules, &events);
    assert!(ledger_replayed.lines().count() >= 2, "{ledger_replayed}");
    assert_eq!(ledger(&data), ledger_replayed, "ledgers differ");
    assert_eq!(orders(&data), orders_replayed, "orders differ");
    let refusals = "SELECT event_id, reason, field FROM rejections ORDER BY event_id";
    assert_eq!(sql(&data, refusals), sql(&dir.path().join("replay"), refusals), "refusals differ");
}

#[test]
fn pages_escape_what_creators_type_and_forms_need_their_csrf_token() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(&dir.path().join("nats"));
    let rules = rules(dir.path());
    let svc = Service::start(&rules, &nats.url(), &dir.path().join("data"), &dir.path().join("state"));
    let port = svc.port;
    let (s, _, page) = http_full(port, "GET", "/marketplace", &[], "");
    assert_eq!(s, 200);
    assert!(page.contains("Acme Outdoor") && !page.contains("hidden"), "{page}");

    // Applying by form: without the double-submit cookie the form is refused.
    let (s, head, _) = http_full(port, "GET", "/marketplace/acme", &[], "");
    assert_eq!(s, 200);
    let csrf = set_cookie(&head, "afflio_csrf").expect("a CSRF cookie");
    let evil =
        "partner_id=eve&display_name=%3Cscript%3Ealert(1)%3C%2Fscript%3E&email=eve%40example.com&audience=&channels=";
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (s, _, _) = http_full(port, "POST", "/marketplace/acme/apply", &form, evil);
    assert_eq!(s, 403, "no CSRF cookie");
    let cookie = format!("afflio_csrf={csrf}");
    let with = [("Content-Type", "application/x-www-form-urlencoded"), ("Cookie", cookie.as_str())];
    let (s, head, _) = http_full(port, "POST", "/marketplace/acme/apply", &with, &format!("{evil}&csrf={csrf}"));
    assert_eq!(s, 303, "{head}");
    assert!(head.contains("location: /partner"), "{head}");
    let partner = set_cookie(&head, "afflio_partner").unwrap();
    assert!(head.to_ascii_lowercase().contains("httponly; samesite=strict"), "{head}");

    // The console: sign-in by key, then forms carry the session's token.
    let (s, _, _) = http_full(port, "POST", "/console/login", &with, &format!("key={BRAND}"));
    assert_eq!(s, 403, "no csrf field");
    let (s, head, _) =
        http_full(port, "POST", "/console/login", &with, &format!("key=wrong-key-000000000&csrf={csrf}"));
    assert_eq!(s, 401, "{head}");
    let (s, head, _) = http_full(port, "POST", "/console/login", &with, &format!("key={BRAND}&csrf={csrf}"));
    assert_eq!(s, 303, "{head}");
    let session = set_cookie(&head, "afflio_console").unwrap();
    assert!(!session.contains(BRAND), "the key is never in the cookie");
    let console_cookie = format!("afflio_console={session}");
    let (s, _, page) = http_full(port, "GET", "/console", &[("Cookie", console_cookie.as_str())], "");
    assert_eq!(s, 200);
    assert!(page.contains("&lt;script&gt;alert(1)&lt;"), "escaped in the console");
    assert!(!page.contains("<script>"), "never raw");
    let token = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let app = page.split("/console/applications/").nth(1).unwrap().split('/').next().unwrap().to_string();
    let h = [("Content-Type", "application/x-www-form-urlencoded"), ("Cookie", console_cookie.as_str())];
    let path = format!("/console/applications/{app}/decide");
    let (s, _, _) = http_full(port, "POST", &path, &h, "decision=approve&csrf=forged");
    assert_eq!(s, 403, "a forged CSRF token");
    let (s, head, _) = http_full(port, "POST", &path, &h, &format!("decision=approve&csrf={token}"));
    assert_eq!(s, 303, "{head}");

    // The partner's page shows the escaped name, its link and code.
    let pc = format!("afflio_partner={partner}");
    let (s, _, page) = http_full(port, "GET", "/partner", &[("Cookie", pc.as_str())], "");
    assert_eq!(s, 200);
    assert!(page.contains("&lt;script&gt;") && !page.contains("<script>"));
    assert!(page.contains("acme-eve") && page.contains("EVE10") && page.contains(">approved<"), "{page}");

    // The approvals queue: eve's own purchase through her code is held (self-referral: her
    // application's e-mail); a review key sees the rule and rejects it with a reason.
    use sha2::Digest as _;
    let own = hex::encode(sha2::Sha256::digest(b"eve@example.com"));
    let now = chrono::Utc::now().to_rfc3339();
    let capture = format!(
        r#"{{"type":"capture","event_id":"c-eve","ts":"{now}","program_id":"acme","order_id":"o-eve","amount":"80.00","currency":"USD","codes":["EVE10"],"customer":{{"email_sha256":"{own}"}}}}"#
    );
    assert_eq!(http(port, "POST", "/v1/events", Some(INGEST), &capture).0, 202);
    let (s, head, _) = http_full(port, "POST", "/console/login", &with, &format!("key={REVIEW}&csrf={csrf}"));
    assert_eq!(s, 303, "{head}");
    let review_cookie = format!("afflio_console={}", set_cookie(&head, "afflio_console").unwrap());
    let mut page = String::new();
    wait_for("the held line in the approvals queue", Duration::from_secs(30), || {
        page = http_full(port, "GET", "/console", &[("Cookie", review_cookie.as_str())], "").2;
        page.contains("o-eve")
    });
    assert!(page.contains("self_referral") && page.contains("Approvals queue"), "{page}");
    let token = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let h = [("Content-Type", "application/x-www-form-urlencoded"), ("Cookie", review_cookie.as_str())];
    let (s, _, _) =
        http_full(port, "POST", "/console/review", &h, &format!("decision=reject&order_id=o-eve&csrf={token}"));
    assert_eq!(s, 400, "a rejection needs a reason (malformed, named)");
    let (s, head, _) = http_full(
        port,
        "POST",
        "/console/review",
        &h,
        &format!("decision=reject&order_id=o-eve&reason=own+purchase&csrf={token}"),
    );
    assert_eq!(s, 303, "{head}");
    let data = dir.path().join("data");
    wait_for("the rejected line", Duration::from_secs(30), || {
        sql(&data, "SELECT status FROM lines WHERE order_id = 'o-eve'").contains("rejected")
    });
    let decided = sql(&data, "SELECT decision, reason, reviewer FROM decisions WHERE order_id = 'o-eve'");
    assert!(decided.contains("reject,own purchase,console:"), "{decided}");

    // Anyone may apply, but not in a flood: one address gets a burst, then 429 with Retry-After.
    let mut limited = None;
    for i in 0..40 {
        let body = format!(r#"{{"partner_id":"flood{i}","display_name":"F","email":"f{i}@example.com"}}"#);
        let (s, head, _) = http_full(port, "POST", "/v1/marketplace/programs/acme/applications", &[], &body);
        if s == 429 {
            limited = Some((i, head));
            break;
        }
        assert_eq!(s, 201);
    }
    let (i, head) = limited.expect("the per-address limit on applying");
    assert!(i >= 10, "a burst is allowed first ({i})");
    assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
}
