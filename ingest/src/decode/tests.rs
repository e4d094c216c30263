use super::*;

/// Decodes `text` and compares with `expect`: `Ok(debug fragment)` or
/// `Err((reason, field))`.
fn check(text: &str, expect: Result<&str, (Reason, &str)>) {
    match (decode_event(text), expect) {
        (Ok(e), Ok(frag)) => assert!(format!("{e:?}").contains(frag), "{e:?} lacks {frag}"),
        (Err(e), Err((reason, field))) => {
            assert_eq!((e.reason, e.field.as_deref()), (reason, Some(field)), "{text}: {e}");
            assert!(e.detail.contains(field.split('[').next().unwrap()), "detail names the field: {}", e.detail);
        }
        (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
    }
}

const CAP: &str = r#""type":"capture","event_id":"e1","ts":"2026-11-01T10:00:00+05:30","program_id":"acme","order_id":"o1","currency":"USD""#;

#[test]
fn registry_events_are_strictly_typed_and_name_the_field_at_fault() {
    let ev = |ty: &str, data: &str| {
        format!(r#"{{"type":"{ty}","event_id":"r1","ts":"2026-11-01T10:00:00Z","program_id":"acme","data":{data}}}"#)
    };
    check(
        &ev("partner_applied", r#"{"application_id":"a","partner_id":"p","display_name":"P","email":"p@x.io"}"#),
        Ok("PartnerApplied"),
    );
    check(&ev("application_decided", r#"{"application_id":"a","decision":"approve","decided_by":"b"}"#), Ok("Approve"));
    check(&ev("code_created", r#"{"code":"X","partner_id":"p","max_uses":3}"#), Ok("max_uses: Some(3)"));
    check(&ev("program_published", r#"{"name":"N"}"#), Ok("listed: true"));
    check(&ev("partner_updated", r#"{"partner_id":"p","active":false}"#), Ok("active: Some(false)"));
    check(&ev("link_created", r#"{"link_id":"l","partner_id":"p","destination":"https://x.io"}"#), Ok("LinkCreated"));
    check(&ev("link_created", r#"{"link_id":"l"}"#), Err((Reason::Malformed, "data")));
    check(&ev("link_created", r#"{"link_id":"l","partner_id":"p","x":1}"#), Err((Reason::Malformed, "data.x")));
    check(
        &ev("application_decided", r#"{"application_id":"a","decision":"maybe","decided_by":"b"}"#),
        Err((Reason::Malformed, "data.decision")),
    );
    check(
        &ev("code_created", r#"{"code":"X","partner_id":"p","max_uses":-1}"#),
        Err((Reason::Malformed, "data.max_uses")),
    );
    check(
        &ev(
            "partner_applied",
            r#"{"application_id":"a","partner_id":"p","display_name":"P","email":"p@x.io","payout":{"provider":"venmo"}}"#,
        ),
        Err((Reason::Malformed, "data.payout.provider")),
    );
    check(
        r#"{"type":"code_created","event_id":"r","ts":"2026-11-01T10:00:00Z","program_id":"acme"}"#,
        Err((Reason::Malformed, "data")),
    );
}

#[test]
fn decodes_every_type() {
    check(
        r#"{"type":"click","event_id":"c1","ts":"2026-11-01T10:00:00Z","program_id":"acme","link_id":"l","visitor_id":"v","sub_id":"s","extra":1}"#,
        Ok(r#"sub_id: Some("s")"#),
    );
    check(
        &format!(
            r#"{{{CAP},"amount":"120.00","codes":["a"],"customer":{{"id":"c"}},"items":[{{"category":"x","amount":"120.00"}}]}}"#
        ),
        Ok("amount: 120.00"),
    );
    check(
        r#"{"type":"refund","event_id":"r","ts":"2026-11-01T10:00:00Z","program_id":"p","order_id":"o","amount":"1","currency":"USD"}"#,
        Ok("chargeback: false"),
    );
    check(
        r#"{"type":"chargeback","event_id":"r","ts":"2026-11-01T10:00:00Z","program_id":"p","order_id":"o","amount":"1","currency":"USD"}"#,
        Ok("chargeback: true"),
    );
}

#[test]
fn money_is_exact() {
    check(&format!(r#"{{{CAP},"amount":120.10}}"#), Ok("amount: 120.10"));
    check(&format!(r#"{{{CAP},"amount":1.5e2}}"#), Ok("amount: 150"));
    check(&format!(r#"{{{CAP},"amount":"1_000"}}"#), Err((Reason::InvalidAmount, "amount")));
    check(&format!(r#"{{{CAP},"amount":"abc"}}"#), Err((Reason::InvalidAmount, "amount")));
    check(&format!(r#"{{{CAP},"amount":"1e3"}}"#), Err((Reason::InvalidAmount, "amount")));
    check(&format!(r#"{{{CAP},"amount":1e400}}"#), Err((Reason::InvalidAmount, "amount")));
    check(&format!(r#"{{{CAP},"amount":0.1000000000000000000000000000001}}"#), Err((Reason::InvalidAmount, "amount")));
    check(&format!(r#"{{{CAP},"amount":true}}"#), Err((Reason::Malformed, "amount")));
    check(
        &format!(r#"{{{CAP},"amount":"1","items":[{{"amount":"x"}}]}}"#),
        Err((Reason::InvalidAmount, "items[0].amount")),
    );
    check(&format!(r#"{{{CAP},"amount":"1","items":[{{"sku":"x"}}]}}"#), Err((Reason::Malformed, "items[0].amount")));
}

#[test]
fn malformed_names_the_field() {
    let e = decode_event("not json").unwrap_err();
    assert_eq!((e.reason, e.field), (Reason::Malformed, None));
    check(r#"{"event_id":"e","ts":"2026-11-01T10:00:00Z","program_id":"p"}"#, Err((Reason::Malformed, "type")));
    check(
        r#"{"type":"view","event_id":"e","ts":"2026-11-01T10:00:00Z","program_id":"p"}"#,
        Err((Reason::Malformed, "type")),
    );
    check(&format!(r#"{{{CAP}}}"#), Err((Reason::Malformed, "amount")));
    check(
        r#"{"type":"refund","event_id":"e","ts":"2026-11-01T10:00:00Z","program_id":"p","amount":"1","order_id":7}"#,
        Err((Reason::Malformed, "order_id")),
    );
    check(
        r#"{"type":"capture","event_id":"","ts":"2026-11-01T10:00:00Z","program_id":"p"}"#,
        Err((Reason::Malformed, "event_id")),
    );
    check(
        r#"{"type":"capture","event_id":"e","ts":"2026-11-01 10:00","program_id":"p"}"#,
        Err((Reason::Malformed, "ts")),
    );
    check(
        r#"{"type":"capture","event_id":"e","ts":"2026-11-01T10:00:00","program_id":"p"}"#,
        Err((Reason::Malformed, "ts")),
    );
    check(
        r#"{"type":"click","event_id":"e","ts":"2026-11-01T10:00:00Z","program_id":"p","link_id":"l"}"#,
        Err((Reason::Malformed, "visitor_id")),
    );
    check(
        r#"{"type":"click","event_id":"e","ts":"2026-11-01T10:00:00Z","program_id":"p","link_id":"l","visitor_id":"  "}"#,
        Err((Reason::Malformed, "visitor_id")),
    );
    check(&format!(r#"{{{CAP},"amount":"1","codes":"A"}}"#), Err((Reason::Malformed, "codes")));
    check(&format!(r#"{{{CAP},"amount":"1","customer":{{"id":5}}}}"#), Err((Reason::Malformed, "customer.id")));
}

#[test]
fn the_event_id_is_kept_when_it_can_be_read() {
    let e = decode_event(
        r#"{"type":"refund","event_id":"e1","ts":"2026-11-01T10:00:00Z","program_id":"p","amount":"1","order_id":7}"#,
    )
    .unwrap_err();
    assert_eq!(e.event_id.as_deref(), Some("e1"));
    let e = decode_event(&format!(r#"{{{CAP},"amount":"x"}}"#)).unwrap_err();
    assert_eq!(e.event_id.as_deref(), Some("e1"));
}

#[test]
fn strings_borrow_from_the_input() {
    let text = format!(r#"{{{CAP},"amount":"1"}}"#);
    let e = decode_event(&text).unwrap();
    assert!(matches!(e.event_id, Cow::Borrowed(_)));
    let text = r#"{"type":"click","event_id":"e\u0031","ts":"2026-11-01T10:00:00Z","program_id":"p","link_id":"l","visitor_id":"v"}"#;
    assert_eq!(decode_event(text).unwrap().event_id, "e1");
}

#[test]
fn ids_with_control_characters_are_refused_with_the_field_named() {
    check(
        r#"{"type":"click","event_id":"c1\r\nX-Evil: 1","ts":"2026-11-01T10:00:00Z","program_id":"acme","link_id":"l","visitor_id":"v"}"#,
        Err((Reason::Malformed, "event_id")),
    );
    check(
        r#"{"type":"click","event_id":"c1","ts":"2026-11-01T10:00:00Z","program_id":"acme","link_id":"l\u001b[31m","visitor_id":"v"}"#,
        Err((Reason::Malformed, "link_id")),
    );
    check(&format!(r#"{{{CAP},"amount":"1","codes":["A\nB"]}}"#), Err((Reason::Malformed, "codes")));
    check(&format!(r#"{{{CAP},"amount":"1","customer":{{"id":"c\u0000"}}}}"#), Err((Reason::Malformed, "customer.id")));
    let e = decode_event(r#"{"type":"click","event_id":"c\n","ts":"2026-11-01T10:00:00Z","program_id":"acme","link_id":"l","visitor_id":"v"}"#)
        .unwrap_err();
    assert!(e.detail.contains("U+000A at byte 1"), "{}", e.detail);
    // Free text may hold them (it is escaped wherever it is shown).
    check(
        r#"{"type":"click","event_id":"c1","ts":"2026-11-01T10:00:00Z","program_id":"acme","link_id":"l","visitor_id":"v","user_agent":"a\tb"}"#,
        Ok(r#"user_agent: Some("a\tb")"#),
    );
}

#[test]
fn leads_subscriptions_and_sale_parts_decode_and_name_the_field_at_fault() {
    let ev = |rest: &str| format!(r#"{{"event_id":"e1","ts":"2026-11-01T10:00:00Z","program_id":"acme",{rest}}}"#);
    check(&ev(r#""type":"lead","lead_id":"L1","codes":["A"]"#), Ok(r#"kind: "lead""#));
    check(&ev(r#""type":"lead","lead_id":"L1","kind":"signup""#), Ok(r#"kind: "signup""#));
    check(&ev(r#""type":"lead""#), Err((Reason::Malformed, "lead_id")));
    check(&ev(r#""type":"lead_stage","lead_id":"L1","stage":"won""#), Ok(r#"stage: "won""#));
    check(&ev(r#""type":"lead_stage","lead_id":"L1""#), Err((Reason::Malformed, "stage")));
    let pay =
        r#""type":"subscription_payment","subscription_id":"S","payment_id":"p","amount":"9.99","currency":"USD""#;
    check(&ev(pay), Ok("kind: Renewal"));
    check(&ev(&format!(r#"{pay},"kind":"upgrade","plan":"pro""#)), Ok("kind: Upgrade"));
    check(&ev(&format!(r#"{pay},"kind":"first""#)), Err((Reason::Malformed, "kind")));
    check(&ev(&format!(r#"{pay},"kind":"sideways""#)), Err((Reason::Malformed, "kind")));
    check(
        &ev(r#""type":"subscription_payment","payment_id":"p","amount":"1","currency":"USD""#),
        Err((Reason::Malformed, "subscription_id")),
    );
    check(&ev(r#""type":"subscription_cancel","subscription_id":"S""#), Ok("Cancel"));
    check(
        &format!(
            r#"{{{CAP},"amount":"10","tax":"1.5","shipping":"2","discount":"0.5","new_customer":true,"subscription_id":"S1","plan":"pro"}}"#
        ),
        Ok(
            r#"tax: Some(1.5), shipping: Some(2), discount: Some(0.5), new_customer: Some(true), subscription_id: Some("S1"), plan: Some("pro")"#,
        ),
    );
    check(&format!(r#"{{{CAP},"amount":"10","tax":"ten"}}"#), Err((Reason::InvalidAmount, "tax")));
    check(&format!(r#"{{{CAP},"amount":"10","shipping":true}}"#), Err((Reason::Malformed, "shipping")));
    check(&format!(r#"{{{CAP},"amount":"10","new_customer":"yes"}}"#), Err((Reason::Malformed, "new_customer")));
}
