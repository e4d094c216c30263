//! Reviews: a reviewer's approve, reject or clear of an order's lines, or a
//! bulk approval of a program's eligible lines, applied like any event.

use afflio_rules::Program;

use super::validate::{reject, Reject};
use super::Engine;
use crate::event::{Decision, Event, ReviewEvent};
use crate::output::{DecisionRow, Reason};
use crate::state::{LineStatus, Review};

impl Engine {
    /// A reviewer's decision. On one order it is all or nothing: every
    /// selected line must accept it, or the review is refused and nothing
    /// changes. Without an order (bulk approval) it approves the program's
    /// lines that are eligible, unheld and pending at the review's time.
    pub(super) fn apply_review(
        &mut self,
        e: &Event<'_>,
        r: &ReviewEvent<'_>,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        let invalid = |field: &'static str, detail: String| reject(Reason::InvalidReview, field, detail);
        let ts = e.ts;
        let targets: Vec<u64> = match &r.order_id {
            Some(id) => {
                let seq = self.orders.seq_of(prog, id).ok_or_else(|| {
                    reject(
                        Reason::UnknownOrder,
                        "order_id",
                        format!("order_id {id:?} is not an open order of program {:?}", program.id),
                    )
                })?;
                vec![seq]
            }
            None if r.decision == Decision::Approve => {
                self.orders.iter().filter(|o| *o.program_id == *program.id).map(|o| o.seq).collect()
            }
            None => {
                return Err(invalid(
                    "order_id",
                    format!("a {} review names an order; only approve may go without one (bulk)", r.decision.as_str()),
                ))
            }
        };
        let bulk = r.order_id.is_none();
        let mut changes: Vec<(u64, usize, LineStatus, Review)> = Vec::new();
        let mut matched = 0;
        for seq in targets {
            let order = self.orders.get(seq).expect("listed above");
            for (li, line) in order.lines.iter().enumerate() {
                if r.partner_id.as_deref().is_some_and(|p| p != &*line.partner_id)
                    || r.tier.is_some_and(|t| t != line.tier)
                {
                    continue;
                }
                matched += 1;
                let status = self.line_status(order, line, ts);
                let awaiting_review = order.held && line.review.is_none();
                let what = || format!("line ({}, {}, tier {})", order.order_id, line.partner_id, line.tier);
                let new = match r.decision {
                    Decision::Approve if bulk => {
                        if status != LineStatus::Pending || awaiting_review || ts < order.eligible_at {
                            continue;
                        }
                        Review::Approved
                    }
                    Decision::Approve => {
                        if status == LineStatus::Rejected {
                            return Err(invalid("decision", format!("{} was rejected and cannot be approved", what())));
                        }
                        if ts < order.eligible_at {
                            return Err(invalid(
                                "ts",
                                format!(
                                    "{} is not eligible until {} (the return window); clear it instead to release a hold",
                                    what(),
                                    order.eligible_at.to_rfc3339()
                                ),
                            ));
                        }
                        if line.review == Some(Review::Approved) {
                            continue;
                        }
                        Review::Approved
                    }
                    Decision::Reject => {
                        if line.review == Some(Review::Rejected) {
                            continue;
                        }
                        if line.paid {
                            return Err(invalid(
                                "decision",
                                format!("{} is paid: a refund reverses it, a review cannot", what()),
                            ));
                        }
                        Review::Rejected
                    }
                    Decision::Clear => {
                        if !awaiting_review {
                            if line.review.is_some() {
                                continue;
                            }
                            return Err(invalid("decision", format!("{} is not held for review", what())));
                        }
                        Review::Cleared
                    }
                };
                changes.push((seq, li, status, new));
            }
        }
        if matched == 0 && !bulk {
            let field = if r.tier.is_some() { "tier" } else { "partner_id" };
            return Err(invalid(
                field,
                format!(
                    "order {:?} has no line for partner {:?} tier {:?}",
                    r.order_id.as_deref().unwrap_or_default(),
                    r.partner_id.as_deref().unwrap_or("*"),
                    r.tier
                ),
            ));
        }
        self.meta.stats.applied_reviews += 1;
        for (seq, li, previous, new) in changes {
            self.orders.get_mut(seq).expect("listed above").lines[li].review = Some(new);
            self.note_lines_changed(seq);
            let order = self.orders.get(seq).expect("listed above");
            let line = &order.lines[li];
            let status = self.line_status(order, line, ts);
            self.meta.stats.lines_decided += 1;
            self.out.decisions.push(DecisionRow {
                event_id: e.event_id.to_string(),
                ts,
                program_id: order.program_id.clone(),
                order_id: order.order_id.to_string(),
                partner_id: line.partner_id.clone(),
                tier: line.tier,
                decision: r.decision,
                reason: r.reason.as_deref().map(str::to_string),
                reviewer: r.reviewer.to_string(),
                previous_status: previous,
                status,
                net_amount: line.net,
                bulk,
            });
        }
        Ok(())
    }
}
