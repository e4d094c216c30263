//! What an event must satisfy before it changes anything: the checks that
//! need the rules but no state.

use afflio_rules::{Program, Rules};
use rust_decimal::Decimal;

use crate::event::{Body, Event, Item};
use crate::money::check_amount;
use crate::output::Reason;

/// Why an event is refused, found before anything was changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: Reason,
    /// The field at fault.
    pub field: std::borrow::Cow<'static, str>,
    pub detail: String,
}

pub(crate) type Reject = Invalid;

pub(crate) fn reject(reason: Reason, field: impl Into<std::borrow::Cow<'static, str>>, detail: String) -> Reject {
    Invalid { reason, field: field.into(), detail }
}

/// The checks that need the rules but no state: known program, known link
/// of that program, currency, amounts, items. Ingest runs them to answer a
/// client at once; the engine runs them again when it applies the event.
/// The program is checked first, so an answer never tells anything about
/// another program. Returns the event's program.
pub fn check_event<'r>(rules: &'r Rules, e: &Event<'_>) -> Result<&'r Program, Invalid> {
    let program = check_program(rules, e)?;
    if let Body::Click(c) = &e.body {
        check_link(rules, program, &c.link_id)?;
    } else {
        check_body(rules, program, e)?;
    }
    Ok(program)
}

pub(crate) fn check_program<'r>(rules: &'r Rules, e: &Event<'_>) -> Result<&'r Program, Invalid> {
    rules.program(&e.program_id).map(|p| &**p).ok_or_else(|| {
        reject(
            Reason::UnknownProgram,
            "program_id",
            format!("program_id {:?} names no configured program", e.program_id),
        )
    })
}

/// The link of a click, if it belongs to `program`. A link of another
/// program is answered as unknown, without saying whose it is.
pub(crate) fn check_link<'r>(
    rules: &'r Rules,
    program: &Program,
    link_id: &str,
) -> Result<&'r afflio_rules::Link, Invalid> {
    match rules.link(link_id) {
        Some(link) if link.program_id == program.id => Ok(link),
        _ => Err(reject(
            Reason::UnknownLink,
            "link_id",
            format!("link_id {link_id:?} names no link of program {:?}", program.id),
        )),
    }
}

pub(crate) fn unknown_link(program: &Program, link_id: &str) -> Invalid {
    reject(Reason::UnknownLink, "link_id", format!("link_id {link_id:?} names no link of program {:?}", program.id))
}

/// The type checks of everything but clicks.
pub(crate) fn check_body(_rules: &Rules, program: &Program, e: &Event<'_>) -> Result<(), Invalid> {
    match &e.body {
        Body::Click(_) => Ok(()),
        Body::Capture(c) => {
            check_money(program, &c.currency, c.amount, &c.items)?;
            check_parts(c.amount, &c.extra)?;
            if c.extra.subscription_id.is_some() {
                subscriptions(program)?;
            }
            Ok(())
        }
        Body::Refund(r) => check_money(program, &r.currency, r.amount, &r.items),
        Body::Lead(_) => leads(program).map(|_| ()),
        Body::LeadStage(s) => {
            let leads = leads(program)?;
            if leads.stage(&s.stage).is_none() {
                let names: Vec<&str> = leads.stages.iter().map(|s| s.name.as_str()).collect();
                return Err(reject(
                    Reason::InvalidStage,
                    "stage",
                    format!("stage {:?} is not a stage of program {:?} ({})", s.stage, program.id, names.join(", ")),
                ));
            }
            Ok(())
        }
        Body::Payment(p) => {
            subscriptions(program)?;
            check_money(program, &p.currency, p.amount, &p.items)?;
            check_parts(p.amount, &p.extra)
        }
        Body::Cancel(_) => subscriptions(program).map(|_| ()),
        Body::Review(_) | Body::Payout(_) | Body::Registry(_) => Ok(()),
    }
}

fn leads(program: &Program) -> Result<&afflio_rules::Leads, Invalid> {
    program.leads.as_ref().ok_or_else(|| {
        reject(
            Reason::NotConfigured,
            "type",
            format!("program {:?} takes no leads (it has no [programs.leads])", program.id),
        )
    })
}

fn subscriptions(program: &Program) -> Result<&afflio_rules::Subscriptions, Invalid> {
    program.subscriptions.as_ref().ok_or_else(|| {
        reject(
            Reason::NotConfigured,
            "subscription_id",
            format!("program {:?} takes no subscriptions (it has no [programs.subscriptions])", program.id),
        )
    })
}

/// Tax, shipping and discount are parts of the amount: each a valid amount,
/// together no more than it.
fn check_parts(amount: Decimal, x: &crate::event::SaleExtra<'_>) -> Result<(), Reject> {
    let mut sum = Decimal::ZERO;
    for (field, v) in [("tax", x.tax), ("shipping", x.shipping), ("discount", x.discount)] {
        let Some(v) = v else { continue };
        check_amount(v, true).map_err(|m| reject(Reason::InvalidAmount, field, format!("{field} {m}")))?;
        sum += v;
    }
    if sum > amount {
        return Err(reject(
            Reason::InvalidAmount,
            "amount",
            format!("tax, shipping and discount ({sum}) are parts of amount {amount} and exceed it"),
        ));
    }
    Ok(())
}

fn check_money(
    program: &Program,
    currency: &str,
    amount: Decimal,
    items: &Option<Vec<Item<'_>>>,
) -> Result<(), Reject> {
    if currency != program.currency.code() {
        return Err(reject(
            Reason::CurrencyMismatch,
            "currency",
            format!("currency {currency:?} is not the program's currency {:?}", program.currency.code()),
        ));
    }
    check_amount(amount, false).map_err(|m| reject(Reason::InvalidAmount, "amount", format!("amount {m}")))?;
    if let Some(items) = items {
        let mut sum = Decimal::ZERO;
        for (i, it) in items.iter().enumerate() {
            check_amount(it.amount, true)
                .map_err(|m| reject(Reason::InvalidAmount, "items.amount", format!("items[{i}].amount {m}")))?;
            sum += it.amount;
        }
        if sum != amount {
            return Err(reject(
                Reason::ItemsMismatch,
                "items",
                format!("item amounts sum to {sum}, not to amount {amount}"),
            ));
        }
    }
    Ok(())
}
