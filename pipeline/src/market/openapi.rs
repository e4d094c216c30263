//! The HTTP API described as OpenAPI 3.1 (`/openapi.json`), built with
//! utoipa's builders from one table of the service's routes: a route added
//! to the service without a line here is caught by the test that compares
//! this table with what the service answers.

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, ObjectBuilder, OpenApiBuilder, PathsBuilder, Required,
    ResponseBuilder, Type,
};

/// Who may call a route.
#[derive(Clone, Copy)]
enum Auth {
    None,
    /// `Authorization: Bearer <API key>` of the role named in the summary.
    Key,
    /// A partner's access token, or an API key of the partner's program.
    PartnerOrKey,
    /// A signature of the provider in the headers.
    Signed,
}

/// (method, path, who, summary, request body (content type, description), responses)
type Route = (
    HttpMethod,
    &'static str,
    Auth,
    &'static str,
    Option<(&'static str, &'static str)>,
    &'static [(u16, &'static str)],
);

const JSON: &str = "application/json";

const ROUTES: &[Route] = &[
    (HttpMethod::Post, "/v1/events", Auth::Key, "Send events (ingest: click, capture, refund, chargeback, lead, lead_stage, subscription_payment, subscription_cancel; review: review; finance: payout; brand: registry events)",
     Some(("application/x-ndjson", "One event, a JSON array of events, or NDJSON. Each event: type, event_id, ts, program_id and the type's fields; registry events carry `data`.")),
     &[(202, "every event accepted"), (207, "some events refused: one answer per event"), (400, "malformed"), (401, "no or unknown key"), (413, "too large"), (422, "refused (reason, field, detail)"), (429, "rate limited"), (503, "the broker is unavailable: retry with the same event_id")]),
    (HttpMethod::Get, "/r/{link_id}", Auth::None, "Tracking redirect: records a click and sends the shopper on", None, &[(302, "to the link's destination"), (404, "unknown link")]),
    (HttpMethod::Get, "/healthz", Auth::None, "Liveness", None, &[(200, "ok")]),
    (HttpMethod::Get, "/readyz", Auth::None, "Readiness (the broker and its stream)", None, &[(200, "ready"), (503, "not ready, with the reason")]),
    (HttpMethod::Get, "/metrics", Auth::None, "Prometheus metrics", None, &[(200, "text exposition format")]),
    (HttpMethod::Get, "/openapi.json", Auth::None, "This document", None, &[(200, "OpenAPI 3.1")]),
    (HttpMethod::Get, "/v1/payouts", Auth::Key, "Payout items and their status (finance key)", None, &[(200, "items"), (403, "not a finance key")]),
    (HttpMethod::Post, "/v1/payouts/plan", Auth::Key, "Plan a batch from approved balances (finance key)", Some((JSON, "{}")), &[(200, "the planned items"), (403, "not a finance key")]),
    (HttpMethod::Post, "/v1/payouts/send", Auth::Key, "Send planned items to the providers (finance key; safe to repeat)", Some((JSON, "{\"batch_id\"?}")), &[(200, "what was sent"), (403, "not a finance key")]),
    (HttpMethod::Post, "/v1/payouts/sync", Auth::Key, "Ask the providers what happened (finance key)", Some((JSON, "{}")), &[(200, "status changes"), (403, "not a finance key")]),
    (HttpMethod::Post, "/v1/payouts/resolve", Auth::Key, "Resolve an unknown payout by hand (finance key)", Some((JSON, "{batch_id, partner_id, status: paid|failed, by, note}")), &[(200, "resolved"), (403, "not a finance key"), (409, "not resolvable")]),
    (HttpMethod::Post, "/webhooks/{provider}", Auth::Signed, "Provider webhooks (razorpayx: X-Razorpay-Signature; paypal: verified with PayPal)", Some((JSON, "the provider's event")), &[(200, "applied or ignored"), (401, "bad signature")]),
    (HttpMethod::Get, "/v1/marketplace/programs", Auth::None, "Listed programs with their public terms", None, &[(200, "{programs: [...]}")]),
    (HttpMethod::Get, "/v1/marketplace/programs/{program}", Auth::None, "One listed program", None, &[(200, "the listing"), (404, "not listed")]),
    (HttpMethod::Post, "/v1/marketplace/programs/{program}/applications", Auth::None, "Apply to a program as a creator",
     Some((JSON, "{partner_id, display_name, email, audience?, channels?: [url], payout?: {provider: paypal|razorpayx, email?, vpa?, account_number?, ifsc?, name?}, application_id?}")),
     &[(201, "{application_id, partner_id, status, token}: the token reads the applicant's own data"), (400, "malformed (field named)"), (409, "partner_id or application_id taken"), (422, "invalid_registry (field named)")]),
    (HttpMethod::Get, "/v1/applications", Auth::Key, "Applications to the key's program, newest first (brand key; ?status=pending|approved|rejected|all, ?limit=)", None, &[(200, "{applications: [...]}"), (403, "not a brand key")]),
    (HttpMethod::Post, "/v1/applications/{application}/decision", Auth::Key, "Approve or reject an application (brand key); approval creates the partner, its link and code",
     Some((JSON, "{decision: approve|reject, reason? (required to reject), decided_by?}")), &[(200, "the application after the decision"), (404, "unknown_application"), (409, "already_decided"), (422, "invalid_registry")]),
    (HttpMethod::Put, "/v1/listing", Auth::Key, "Publish or take down the program's listing (brand key)", Some((JSON, "{name, description?, terms?, category?, listed?: bool}")), &[(200, "applied"), (422, "invalid_registry")]),
    (HttpMethod::Post, "/v1/links", Auth::Key, "Create a tracking link for a partner (brand key)", Some((JSON, "{link_id, partner_id, destination?}")), &[(200, "applied"), (404, "unknown_partner"), (409, "duplicate_id")]),
    (HttpMethod::Post, "/v1/codes", Auth::Key, "Create a promo code for a partner (brand key)", Some((JSON, "{code, partner_id, starts_at?, expires_at?, max_uses?}")), &[(200, "applied"), (404, "unknown_partner"), (409, "duplicate_id")]),
    (HttpMethod::Post, "/v1/partner-updates", Auth::Key, "Change a marketplace partner (brand key): name, payout, identities, active, rotate_token",
     Some((JSON, "{partner_id, display_name?, payout?, email_sha256?: [hex], customer_ids?: [id], active?: bool, rotate_token?: bool}")), &[(200, "applied"), (404, "unknown_partner")]),
    (HttpMethod::Post, "/v1/partner-tokens", Auth::Key, "A partner's current access token, to hand over (brand key)", Some((JSON, "{partner_id}")), &[(200, "{partner_id, token}"), (404, "unknown_partner")]),
    (HttpMethod::Get, "/v1/partners/{partner}", Auth::PartnerOrKey, "A partner's profile, application, links and codes", None, &[(200, "the partner"), (401, "no or bad credential"), (403, "another partner's token"), (404, "no such partner in the key's program")]),
    (HttpMethod::Get, "/v1/partners/{partner}/{part}", Auth::PartnerOrKey, "A partner's clicks, orders, commissions (by status), balance or payouts, from the store", None, &[(200, "rows"), (401, "no or bad credential"), (403, "another partner's token"), (404, "unknown part or partner")]),
    (HttpMethod::Get, "/v1/webhooks/endpoints", Auth::Key, "The program's webhook endpoints, without secrets (brand key)", None, &[(200, "{endpoints: [...]}"), (403, "not a brand key")]),
    (HttpMethod::Post, "/v1/webhooks/endpoints", Auth::Key, "Register a webhook endpoint (brand key; partner_id for a partner's); the answer shows its whsec_ secret once",
     Some((JSON, "{url, events: [order.attributed|commission.created|commission.reversed|commission.approved|lead.created|lead.stage_changed|flag.raised|payout.sent|payout.paid|payout.failed|partner.applied|partner.approved], partner_id?}")),
     &[(201, "the endpoint and its secret"), (422, "invalid_endpoint (every problem named)"), (403, "not a brand key")]),
    (HttpMethod::Get, "/v1/webhooks/endpoints/{id}", Auth::Key, "One endpoint (brand key)", None, &[(200, "the endpoint"), (404, "not in this program")]),
    (HttpMethod::Patch, "/v1/webhooks/endpoints/{id}", Auth::Key, "Change an endpoint's url or events, enable or disable it (brand key)", Some((JSON, "{url?, events?, enabled?: bool}")), &[(200, "the endpoint"), (409, "configured in the rules file"), (422, "invalid_endpoint")]),
    (HttpMethod::Delete, "/v1/webhooks/endpoints/{id}", Auth::Key, "Remove an endpoint (brand key)", None, &[(204, "removed"), (409, "configured in the rules file")]),
    (HttpMethod::Post, "/v1/webhooks/endpoints/{id}/rotate", Auth::Key, "A new signing secret (shown once); the previous one keeps signing for 24 hours", None, &[(200, "the endpoint, its new secret and when the previous one expires"), (409, "configured in the rules file")]),
    (HttpMethod::Get, "/v1/partners/{partner}/webhooks", Auth::PartnerOrKey, "A partner's own webhook endpoints", None, &[(200, "{endpoints: [...]}"), (403, "another partner's token")]),
    (HttpMethod::Post, "/v1/partners/{partner}/webhooks", Auth::PartnerOrKey, "Register the partner's own endpoint (no flag.raised, no partner.applied); the secret is shown once",
     Some((JSON, "{url, events}")), &[(201, "the endpoint and its secret"), (403, "another partner"), (422, "invalid_endpoint")]),
];

pub(super) fn document() -> String {
    let mut paths = PathsBuilder::new();
    for (method, path, auth, summary, body, responses) in ROUTES {
        let mut op = OperationBuilder::new().summary(Some(*summary));
        for name in path.split('{').skip(1).filter_map(|s| s.split('}').next()) {
            op = op.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
            );
        }
        if let Some((ct, desc)) = body {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .description(Some(*desc))
                    .content(*ct, ContentBuilder::new().schema(Some(ObjectBuilder::new())).build())
                    .required(Some(Required::True))
                    .build(),
            ));
        }
        for (code, desc) in *responses {
            op = op.response(code.to_string(), ResponseBuilder::new().description(*desc).build());
        }
        let security = match auth {
            Auth::None | Auth::Signed => None,
            Auth::Key => Some(vec![SecurityRequirement::new("api_key", Vec::<String>::new())]),
            Auth::PartnerOrKey => Some(vec![
                SecurityRequirement::new("partner_token", Vec::<String>::new()),
                SecurityRequirement::new("api_key", Vec::<String>::new()),
            ]),
        };
        if let Some(s) = security {
            op = op.securities(Some(s));
        }
        paths = paths.path(*path, PathItem::new(method.clone(), op.build()));
    }
    let bearer =
        |d: &str| SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some(d)).build());
    let doc = OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Afflio")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some("Affiliate attribution: events in, exact commissions, marketplace, payouts. Errors are {status: rejected, reason, field, detail}."))
                .build(),
        )
        .paths(paths.build())
        .components(Some(
            ComponentsBuilder::new()
                .security_scheme("api_key", bearer("An API key of the rules file; its role (ingest, review, finance, brand) says what it may do"))
                .security_scheme("partner_token", bearer("A partner's access token (pt_...), given when applying"))
                .build(),
        ))
        .build();
    doc.to_json().unwrap_or_else(|e| format!("{{\"error\":\"internal: {e}\"}}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_lists_every_route_once_with_its_methods() {
        let v: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        assert_eq!(v["openapi"].as_str().map(|s| s.starts_with("3.")), Some(true));
        let paths = v["paths"].as_object().unwrap();
        let distinct: std::collections::BTreeSet<&str> = super::ROUTES.iter().map(|r| r.1).collect();
        assert_eq!(paths.len(), distinct.len());
        assert!(paths["/v1/applications/{application}/decision"]["post"]["parameters"][0]["name"] == "application");
    }
}
