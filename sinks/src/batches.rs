//! Engine rows -> Arrow record batches.

use std::sync::Arc;

use std::collections::BTreeMap;

use afflio_engine::{
    Balance, ClickColumns, ClosedOrder, DecisionRow, Engine, Flag, LedgerEntry, LineStatus, Order, Output, PayoutRow,
    Rejection, StateChanges, StrColumn,
};
use chrono::{DateTime, Utc};
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Decimal128Array, Float64Array, Int32Array, Int64Array, ListBuilder, RecordBatch,
    StringArray, StringBuilder, TimestampMicrosecondArray,
};
use datafusion::arrow::buffer::{Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;
use rust_decimal::Decimal;

/// The tables of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Ledger,
    Orders,
    Flags,
    Rejections,
    Clicks,
    Lines,
    Decisions,
    Payouts,
    Balances,
}

impl Table {
    pub const ALL: [Table; 9] = [
        Table::Ledger,
        Table::Orders,
        Table::Flags,
        Table::Rejections,
        Table::Clicks,
        Table::Lines,
        Table::Decisions,
        Table::Payouts,
        Table::Balances,
    ];

    /// The columns that identify a row of a state table (empty for
    /// append-only tables): the key its rows are upserted by.
    pub fn key(self) -> &'static [&'static str] {
        match self {
            Table::Orders => &["order_hour", "program_id", "order_id", "first_capture_ts"],
            Table::Lines => &["order_hour", "program_id", "order_id", "first_capture_ts", "partner_id", "tier"],
            Table::Balances => &["program_id", "partner_id"],
            _ => &[],
        }
    }

    /// Partition columns: the hour of the order's first capture for orders
    /// and lines (a MERGE touches only the hours of the orders it changes).
    pub fn partitions(self) -> &'static [&'static str] {
        match self {
            Table::Orders | Table::Lines => &["order_hour"],
            _ => &[],
        }
    }

    /// Whether rows are only ever appended.
    pub fn append_only(self) -> bool {
        self.key().is_empty()
    }

    pub fn parse(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Table::Ledger => "ledger",
            Table::Orders => "orders",
            Table::Flags => "flags",
            Table::Rejections => "rejections",
            Table::Clicks => "clicks",
            Table::Lines => "lines",
            Table::Decisions => "decisions",
            Table::Payouts => "payouts",
            Table::Balances => "balances",
        }
    }
}

/// Money: `Decimal128(18, 4)`.
const MONEY: DataType = DataType::Decimal128(18, 4);
/// Rates as fractions (0.125 for 12.5%).
const RATE: DataType = DataType::Decimal128(18, 8);

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn list_of_strings() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

fn f(name: &str, dt: DataType, nullable: bool) -> Field {
    Field::new(name, dt, nullable)
}

/// The Arrow schema of a table.
pub fn schema(t: Table) -> SchemaRef {
    use DataType::{Boolean, Float64, Int32, Int64, Utf8};
    let fields = match t {
        Table::Ledger => vec![
            f("entry_id", Utf8, false),
            f("event_id", Utf8, false),
            f("ts", ts_type(), false),
            f("program_id", Utf8, false),
            f("order_id", Utf8, false),
            f("partner_id", Utf8, false),
            f("tier", Int32, false),
            f("kind", Utf8, false),
            f("basis", MONEY, false),
            f("amount", MONEY, false),
            f("currency", Utf8, false),
            f("attribution", Utf8, false),
            f("source", Utf8, false),
            f("eligible_at", ts_type(), false),
            f("rate", RATE, true),
            f("rules_version", Int64, false),
            f("reward", Utf8, true),
        ],
        Table::Orders => vec![
            f("program_id", Utf8, false),
            f("order_id", Utf8, false),
            f("first_capture_ts", ts_type(), false),
            f("last_capture_ts", ts_type(), false),
            f("eligible_at", ts_type(), false),
            f("partner_id", Utf8, true),
            f("attribution", Utf8, true),
            f("source", Utf8, true),
            f("captured", MONEY, false),
            f("refunded", MONEY, false),
            f("chargeback", Boolean, false),
            f("chargeback_amount", MONEY, false),
            f("currency", Utf8, false),
            f("codes", list_of_strings(), false),
            f("code_issues", list_of_strings(), false),
            f("code_issue_codes", list_of_strings(), false),
            f("flags", list_of_strings(), false),
            f("captures", Int32, false),
            f("refunds", Int32, false),
            f("kind", Utf8, false),
            f("subtype", Utf8, true),
            f("subscription_id", Utf8, true),
            f("stage", Utf8, true),
            f("uncredited", Utf8, true),
            f("order_hour", Utf8, false),
        ],
        Table::Flags => vec![
            f("program_id", Utf8, false),
            f("order_id", Utf8, false),
            f("partner_id", Utf8, false),
            f("rule", Utf8, false),
            f("score", Float64, false),
            f("detail", Utf8, false),
            f("ts", ts_type(), false),
            f("event_id", Utf8, false),
            f("action", Utf8, false),
            f("value", Float64, false),
            f("threshold", Float64, false),
            f("retroactive", Boolean, false),
            f("baseline", Float64, true),
        ],
        Table::Rejections => vec![
            f("event_id", Utf8, true),
            f("ts", ts_type(), false),
            f("reason", Utf8, false),
            f("field", Utf8, true),
            f("detail", Utf8, false),
            f("raw", Utf8, false),
            f("event_ts", ts_type(), true),
            f("origin", Utf8, false),
        ],
        Table::Clicks => vec![
            f("event_id", Utf8, false),
            f("ts", ts_type(), false),
            f("program_id", Utf8, false),
            f("link_id", Utf8, false),
            f("partner_id", Utf8, false),
            f("visitor_id", Utf8, false),
            f("ip", Utf8, true),
            f("user_agent", Utf8, true),
            f("landing_url", Utf8, true),
            f("sub_id", Utf8, true),
        ],
        Table::Lines => vec![
            f("program_id", Utf8, false),
            f("order_id", Utf8, false),
            f("partner_id", Utf8, false),
            f("tier", Int32, false),
            f("net_amount", MONEY, false),
            f("accrued", MONEY, false),
            f("reversed", MONEY, false),
            f("currency", Utf8, false),
            f("status", Utf8, false),
            f("eligible_at", ts_type(), false),
            f("held", Boolean, false),
            f("review", Utf8, true),
            f("as_of", ts_type(), false),
            f("first_capture_ts", ts_type(), false),
            f("order_hour", Utf8, false),
        ],
        Table::Decisions => vec![
            f("event_id", Utf8, false),
            f("ts", ts_type(), false),
            f("program_id", Utf8, false),
            f("order_id", Utf8, false),
            f("partner_id", Utf8, false),
            f("tier", Int32, false),
            f("decision", Utf8, false),
            f("reason", Utf8, true),
            f("reviewer", Utf8, false),
            f("previous_status", Utf8, false),
            f("status", Utf8, false),
            f("net_amount", MONEY, false),
            f("bulk", Boolean, false),
        ],
        Table::Payouts => vec![
            f("event_id", Utf8, false),
            f("ts", ts_type(), false),
            f("program_id", Utf8, false),
            f("batch_id", Utf8, false),
            f("partner_id", Utf8, false),
            f("currency", Utf8, false),
            f("amount", MONEY, false),
            f("tds", MONEY, false),
            f("transfer_amount", MONEY, false),
            f("status", Utf8, false),
            f("provider", Utf8, true),
            f("provider_ref", Utf8, true),
            f("detail", Utf8, true),
            f("idempotency_key", Utf8, true),
            f("provider_batch", Utf8, true),
            f("destination", Utf8, true),
            f("attempted_at", ts_type(), true),
        ],
        Table::Balances => vec![
            f("program_id", Utf8, false),
            f("partner_id", Utf8, false),
            f("currency", Utf8, false),
            f("pending", MONEY, false),
            f("approved", MONEY, false),
            f("in_flight", MONEY, false),
            f("paid", MONEY, false),
            f("clawback", MONEY, false),
            f("as_of", ts_type(), false),
        ],
    };
    Arc::new(Schema::new(fields))
}

fn strings<'a>(it: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(it))
}

fn opt_strings<'a>(it: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(StringArray::from_iter(it))
}

fn times(it: impl Iterator<Item = DateTime<Utc>>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from_iter_values(it.map(|t| t.timestamp_micros())).with_timezone("UTC"))
}

fn opt_times(it: impl Iterator<Item = Option<DateTime<Utc>>>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from_iter(it.map(|t| t.map(|t| t.timestamp_micros()))).with_timezone("UTC"))
}

/// A decimal as an i128 at `scale`, or an error when it does not fit (the
/// engine keeps amounts within the store's scale and range; this checks it
/// in every build).
fn scaled(d: Decimal, scale: u32) -> Result<i128, ArrowError> {
    let mut x = d;
    x.rescale(scale);
    if x != d {
        return Err(ArrowError::InvalidArgumentError(format!("{d} has more than {scale} decimal places")));
    }
    Ok(x.mantissa())
}

fn decimals(it: impl Iterator<Item = Option<Decimal>>, scale: u32) -> Result<ArrayRef, ArrowError> {
    let values: Vec<Option<i128>> = it.map(|d| d.map(|d| scaled(d, scale)).transpose()).collect::<Result<_, _>>()?;
    let a = Decimal128Array::from_iter(values).with_precision_and_scale(18, scale as i8)?;
    a.validate_decimal_precision(18)?;
    Ok(Arc::new(a))
}

fn money(it: impl Iterator<Item = Decimal>) -> Result<ArrayRef, ArrowError> {
    decimals(it.map(Some), 4)
}

fn lists<'a, I: Iterator<Item = &'a str>>(rows: impl Iterator<Item = I>) -> ArrayRef {
    let mut b = ListBuilder::new(StringBuilder::new());
    for row in rows {
        for s in row {
            b.values().append_value(s);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

fn batch(t: Table, cols: Vec<ArrayRef>) -> Result<RecordBatch, ArrowError> {
    RecordBatch::try_new(schema(t), cols)
}

pub(crate) fn ledger(rows: &[LedgerEntry]) -> Result<RecordBatch, ArrowError> {
    batch(
        Table::Ledger,
        vec![
            strings(rows.iter().map(|r| r.entry_id.as_str())),
            strings(rows.iter().map(|r| r.event_id.as_str())),
            times(rows.iter().map(|r| r.ts)),
            strings(rows.iter().map(|r| &*r.program_id)),
            strings(rows.iter().map(|r| r.order_id.as_str())),
            strings(rows.iter().map(|r| &*r.partner_id)),
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| i32::from(r.tier)))),
            strings(rows.iter().map(|r| r.kind.as_str())),
            money(rows.iter().map(|r| r.basis))?,
            money(rows.iter().map(|r| r.amount))?,
            strings(rows.iter().map(|r| r.currency.code())),
            strings(rows.iter().map(|r| r.attribution.as_str())),
            strings(rows.iter().map(|r| &*r.source)),
            times(rows.iter().map(|r| r.eligible_at)),
            decimals(rows.iter().map(|r| r.rate), 8)?,
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.rules_version as i64))),
            opt_strings(rows.iter().map(|r| r.reward.as_deref())),
        ],
    )
}

/// A column the engine laid out as Arrow does: three copies, no per-row work.
fn column(c: &StrColumn, nullable: bool) -> Result<ArrayRef, ArrowError> {
    let (bytes, offsets, valid) = c.parts();
    let nulls = (nullable && valid.iter().any(|v| !v)).then(|| NullBuffer::from(valid));
    let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets.to_vec()));
    Ok(Arc::new(StringArray::try_new(offsets, Buffer::from(bytes.as_bytes()), nulls)?))
}

pub(crate) fn clicks(c: &ClickColumns) -> Result<RecordBatch, ArrowError> {
    batch(
        Table::Clicks,
        vec![
            column(&c.event_id, false)?,
            Arc::new(TimestampMicrosecondArray::from(c.ts.clone()).with_timezone("UTC")),
            column(&c.program_id, false)?,
            column(&c.link_id, false)?,
            column(&c.partner_id, false)?,
            column(&c.visitor_id, false)?,
            column(&c.ip, true)?,
            column(&c.user_agent, true)?,
            column(&c.landing_url, true)?,
            column(&c.sub_id, true)?,
        ],
    )
}

pub(crate) fn flags(rows: &[Flag]) -> Result<RecordBatch, ArrowError> {
    batch(
        Table::Flags,
        vec![
            strings(rows.iter().map(|r| &*r.program_id)),
            strings(rows.iter().map(|r| r.order_id.as_str())),
            strings(rows.iter().map(|r| &*r.partner_id)),
            strings(rows.iter().map(|r| r.rule.as_str())),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.score))),
            strings(rows.iter().map(|r| r.detail.as_str())),
            times(rows.iter().map(|r| r.ts)),
            strings(rows.iter().map(|r| r.event_id.as_str())),
            strings(rows.iter().map(|r| r.action.as_str())),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.value))),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.threshold))),
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.retroactive)))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.baseline))),
        ],
    )
}

pub(crate) fn decisions(rows: &[DecisionRow]) -> Result<RecordBatch, ArrowError> {
    batch(
        Table::Decisions,
        vec![
            strings(rows.iter().map(|r| r.event_id.as_str())),
            times(rows.iter().map(|r| r.ts)),
            strings(rows.iter().map(|r| &*r.program_id)),
            strings(rows.iter().map(|r| r.order_id.as_str())),
            strings(rows.iter().map(|r| &*r.partner_id)),
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| i32::from(r.tier)))),
            strings(rows.iter().map(|r| r.decision.as_str())),
            opt_strings(rows.iter().map(|r| r.reason.as_deref())),
            strings(rows.iter().map(|r| r.reviewer.as_str())),
            strings(rows.iter().map(|r| r.previous_status.as_str())),
            strings(rows.iter().map(|r| r.status.as_str())),
            money(rows.iter().map(|r| r.net_amount))?,
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.bulk)))),
        ],
    )
}

pub(crate) fn payouts(rows: &[PayoutRow]) -> Result<RecordBatch, ArrowError> {
    let masked: Vec<Option<String>> = rows.iter().map(|r| r.destination.as_deref().map(mask_destination)).collect();
    batch(
        Table::Payouts,
        vec![
            strings(rows.iter().map(|r| r.event_id.as_str())),
            times(rows.iter().map(|r| r.ts)),
            strings(rows.iter().map(|r| &*r.program_id)),
            strings(rows.iter().map(|r| r.batch_id.as_str())),
            strings(rows.iter().map(|r| r.partner_id.as_str())),
            strings(rows.iter().map(|r| r.currency.as_str())),
            money(rows.iter().map(|r| r.amount))?,
            money(rows.iter().map(|r| r.tds))?,
            money(rows.iter().map(|r| r.amount - r.tds))?,
            strings(rows.iter().map(|r| r.status.as_str())),
            opt_strings(rows.iter().map(|r| r.provider.as_deref())),
            opt_strings(rows.iter().map(|r| r.provider_ref.as_deref())),
            opt_strings(rows.iter().map(|r| r.detail.as_deref())),
            opt_strings(rows.iter().map(|r| r.idempotency_key.as_deref())),
            opt_strings(rows.iter().map(|r| r.provider_batch.as_deref())),
            opt_strings(masked.iter().map(|d| d.as_deref())),
            opt_times(rows.iter().map(|r| r.attempted_at)),
        ],
    )
}

/// A payout destination as the tables show it: the kind, the mode and
/// enough to recognise the account (its last four characters, the email's
/// domain), never the whole account number or address.
pub fn mask_destination(recorded: &str) -> String {
    fn tail(s: &str) -> String {
        let chars: Vec<char> = s.chars().collect();
        let keep = chars.len().min(4).min(chars.len() / 2);
        format!("****{}", chars[chars.len() - keep..].iter().collect::<String>())
    }
    fn address(s: &str) -> String {
        match s.rsplit_once('@') {
            Some((user, domain)) => format!("{}***@{domain}", user.chars().next().unwrap_or('*')),
            None => tail(s),
        }
    }
    let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(recorded) else {
        return tail(recorded);
    };
    let get = |k: &str| m.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    match get("kind") {
        "bank" => format!("bank {} {} {}", get("mode"), get("ifsc"), tail(get("account_number"))),
        "upi" => format!("upi {}", address(get("vpa"))),
        "paypal" => format!("paypal {}", address(get("email"))),
        other => format!("{other} ****"),
    }
}

pub(crate) fn balances(rows: &[Balance], as_of: DateTime<Utc>) -> Result<RecordBatch, ArrowError> {
    batch(
        Table::Balances,
        vec![
            strings(rows.iter().map(|r| &*r.program_id)),
            strings(rows.iter().map(|r| &*r.partner_id)),
            strings(rows.iter().map(|r| r.currency.code())),
            money(rows.iter().map(|r| r.pending))?,
            money(rows.iter().map(|r| r.available.max(Decimal::ZERO)))?,
            money(rows.iter().map(|r| r.in_flight))?,
            money(rows.iter().map(|r| r.paid))?,
            money(rows.iter().map(|r| r.available.min(Decimal::ZERO)))?,
            times(rows.iter().map(|_| as_of)),
        ],
    )
}

/// The rows of one write for every table: the append-only tables' rows of
/// `out`; for the state tables the orders closed by retention (their final
/// rows) and, with `changes`, the open orders and balances that changed.
pub(crate) fn write_rows(
    out: &Output,
    changes: Option<&StateChanges>,
) -> Result<Vec<(Table, RecordBatch)>, (Table, ArrowError)> {
    Table::ALL
        .into_iter()
        .map(|t| {
            let b = match t {
                Table::Ledger => ledger(&out.ledger),
                Table::Clicks => clicks(&out.clicks),
                Table::Flags => flags(&out.flags),
                Table::Rejections => rejections(&out.rejections),
                Table::Decisions => decisions(&out.decisions),
                Table::Payouts => payouts(&out.payouts),
                Table::Orders => {
                    let mut rows: Vec<&Order> = out.closed.iter().map(|c| &c.order).collect();
                    if let Some(c) = changes {
                        rows.extend(c.orders.iter().map(|(o, _)| o));
                    }
                    orders(&rows)
                }
                Table::Lines => {
                    let mut rows = closed_lines(&out.closed);
                    if let Some(c) = changes {
                        rows.extend(c.orders.iter().map(|(o, s)| (o, s.clone(), c.as_of)));
                    }
                    lines(&rows)
                }
                Table::Balances => match changes {
                    Some(c) => balances(&c.balances, c.as_of),
                    None => balances(&[], DateTime::UNIX_EPOCH),
                },
            };
            b.map(|b| (t, b)).map_err(|e| (t, e))
        })
        .collect()
}

/// The state tables' rows of the engine's open orders and balances as of
/// `as_of` (a replay's final write): of one program, or of every one.
pub fn state_changes_of(engine: &Engine, program: Option<&str>, as_of: DateTime<Utc>) -> StateChanges {
    let of = |p: &str| program.is_none_or(|want| want == p);
    let orders =
        engine.orders().filter(|o| of(&o.program_id)).map(|o| (o.clone(), engine.line_statuses(o, as_of))).collect();
    let mut ids: Vec<&str> = engine.rules().programs().map(|p| p.id.as_str()).filter(|p| of(p)).collect();
    ids.sort_unstable();
    let balances = ids.into_iter().flat_map(|p| engine.balances(p, as_of)).collect();
    StateChanges { as_of, orders, balances }
}

/// The `epochs` table: one row per commit of the store.
pub(crate) fn epochs_schema() -> SchemaRef {
    let mut fields = vec![
        f("committed_at", ts_type(), false),
        f("position", DataType::Int64, true),
        f("writer", DataType::Utf8, false),
    ];
    for t in Table::ALL {
        fields.push(f(&format!("{}_version", t.name()), DataType::Int64, false));
    }
    Arc::new(Schema::new(fields))
}

pub(crate) fn epoch_row(
    position: Option<i64>,
    writer: &str,
    at: DateTime<Utc>,
    versions: &BTreeMap<&'static str, i64>,
) -> Result<RecordBatch, ArrowError> {
    let mut cols: Vec<ArrayRef> =
        vec![times(std::iter::once(at)), Arc::new(Int64Array::from(vec![position])), strings(std::iter::once(writer))];
    for t in Table::ALL {
        cols.push(Arc::new(Int64Array::from(vec![versions.get(t.name()).copied().unwrap_or(-1)])));
    }
    RecordBatch::try_new(epochs_schema(), cols)
}

pub(crate) fn rejections(rows: &[Rejection]) -> Result<RecordBatch, ArrowError> {
    batch(
        Table::Rejections,
        vec![
            opt_strings(rows.iter().map(|r| r.event_id.as_deref())),
            times(rows.iter().map(|r| r.arrival)),
            strings(rows.iter().map(|r| r.reason.as_str())),
            opt_strings(rows.iter().map(|r| r.field.as_deref())),
            strings(rows.iter().map(|r| r.detail.as_str())),
            strings(rows.iter().map(|r| r.raw.as_str())),
            opt_times(rows.iter().map(|r| r.event_ts)),
            strings(rows.iter().map(|r| r.origin.as_str())),
        ],
    )
}

pub(crate) fn orders(rows: &[&Order]) -> Result<RecordBatch, ArrowError> {
    fn credit(o: &Order) -> Option<&afflio_engine::Credit> {
        o.credit.as_ref()
    }
    batch(
        Table::Orders,
        vec![
            strings(rows.iter().map(|r| &*r.program_id)),
            strings(rows.iter().map(|r| &*r.order_id)),
            times(rows.iter().map(|r| r.first_capture_ts)),
            times(rows.iter().map(|r| r.last_capture_ts)),
            times(rows.iter().map(|r| r.eligible_at)),
            opt_strings(rows.iter().map(|r| credit(r).map(|c| &*c.partner_id))),
            opt_strings(rows.iter().map(|r| credit(r).map(|c| c.kind.as_str()))),
            opt_strings(rows.iter().map(|r| credit(r).map(|c| &*c.source))),
            money(rows.iter().map(|r| r.captured))?,
            money(rows.iter().map(|r| r.refunded))?,
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.chargeback)))),
            money(rows.iter().map(|r| r.chargeback_amount))?,
            strings(rows.iter().map(|r| r.currency.code())),
            lists(rows.iter().map(|r| r.codes.iter().map(|c| &**c))),
            lists(rows.iter().map(|r| r.code_issues.iter().map(|(_, i)| i.as_str()))),
            lists(rows.iter().map(|r| r.code_issues.iter().map(|(c, _)| &**c))),
            lists(rows.iter().map(|r| r.flags.iter().map(|f| f.as_str()))),
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.captures as i32))),
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.refunds as i32))),
            strings(rows.iter().map(|r| r.kind().as_str())),
            opt_strings(rows.iter().map(|r| r.extra.as_deref().and_then(|x| x.subtype.as_deref()))),
            opt_strings(rows.iter().map(|r| r.extra.as_deref().and_then(|x| x.subscription_id.as_deref()))),
            opt_strings(rows.iter().map(|r| r.extra.as_deref().and_then(|x| x.stages.last().map(|s| &**s)))),
            opt_strings(rows.iter().map(|r| r.extra.as_deref().and_then(|x| x.uncredited.as_deref()))),
            strings_owned(rows.iter().map(|r| order_hour(r.first_capture_ts))),
        ],
    )
}

/// The partition of an order: the UTC hour of its first capture, `2026-11-10T13`.
pub fn order_hour(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H").to_string()
}

fn strings_owned(it: impl Iterator<Item = String>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(it))
}

/// Closed orders with the status their lines had when they were closed.
fn closed_lines(closed: &[ClosedOrder]) -> Vec<(&Order, Vec<LineStatus>, DateTime<Utc>)> {
    closed.iter().map(|c| (&c.order, c.statuses.clone(), c.as_of)).collect()
}

pub(crate) fn lines(orders: &[(&Order, Vec<LineStatus>, DateTime<Utc>)]) -> Result<RecordBatch, ArrowError> {
    let rows: Vec<_> = orders
        .iter()
        .flat_map(|(o, statuses, as_of)| o.lines.iter().zip(statuses).map(move |(l, s)| (*o, l, *s, *as_of)))
        .collect();
    batch(
        Table::Lines,
        vec![
            strings(rows.iter().map(|(o, _, _, _)| &*o.program_id)),
            strings(rows.iter().map(|(o, _, _, _)| &*o.order_id)),
            strings(rows.iter().map(|(_, l, _, _)| &*l.partner_id)),
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|(_, l, _, _)| i32::from(l.tier)))),
            money(rows.iter().map(|(_, l, _, _)| l.net))?,
            money(rows.iter().map(|(_, l, _, _)| l.accrued))?,
            money(rows.iter().map(|(_, l, _, _)| l.net - l.accrued))?,
            strings(rows.iter().map(|(o, _, _, _)| o.currency.code())),
            strings(rows.iter().map(|(_, _, s, _)| s.as_str())),
            times(rows.iter().map(|(o, _, _, _)| o.eligible_at)),
            Arc::new(BooleanArray::from_iter(rows.iter().map(|(o, l, _, _)| Some(o.held && l.review.is_none())))),
            opt_strings(rows.iter().map(|(_, l, _, _)| l.review.map(|r| r.as_str()))),
            times(rows.iter().map(|(_, _, _, a)| *a)),
            times(rows.iter().map(|(o, _, _, _)| o.first_capture_ts)),
            strings_owned(rows.iter().map(|(o, _, _, _)| order_hour(o.first_capture_ts))),
        ],
    )
}

#[cfg(test)]
mod mask_tests {
    use super::mask_destination;

    #[test]
    fn destinations_are_masked() {
        let check = |recorded: &str, expect: &str| assert_eq!(mask_destination(recorded), expect, "{recorded}");
        check(
            r#"{"kind":"bank","account_number":"50100123456789","ifsc":"HDFC0001234","name":"Meena R","mode":"IMPS"}"#,
            "bank IMPS HDFC0001234 ****6789",
        );
        check(r#"{"kind":"upi","vpa":"ravi@upi","name":"ravi"}"#, "upi r***@upi");
        check(r#"{"kind":"paypal","email":"alice@example.com"}"#, "paypal a***@example.com");
        check("12345678", "****5678");
        check("ab", "****b");
    }
}

#[cfg(test)]
mod flag_tests {
    use super::*;
    use afflio_engine::FraudRule;
    use datafusion::arrow::array::Array;

    #[test]
    fn a_flag_row_carries_its_value_baseline_and_threshold() {
        let flag = |rule, baseline| Flag {
            program_id: "p".into(),
            order_id: "o1".into(),
            partner_id: "alice".into(),
            rule,
            action: afflio_engine::rules::FraudAction::Hold,
            score: 1.2,
            value: 12.0,
            baseline,
            threshold: 10.0,
            detail: "d".into(),
            ts: DateTime::UNIX_EPOCH,
            event_id: "c1".into(),
            retroactive: false,
        };
        let rows = [flag(FraudRule::ConversionSpike, Some(0.02)), flag(FraudRule::SelfReferral, None)];
        let b = flags(&rows).unwrap();
        let col = |name: &str| {
            let i = b.schema().index_of(name).unwrap();
            b.column(i).as_any().downcast_ref::<Float64Array>().unwrap().clone()
        };
        let baseline = col("baseline");
        assert_eq!((baseline.value(0), baseline.is_null(1)), (0.02, true));
        assert_eq!((col("value").value(0), col("threshold").value(0)), (12.0, 10.0));
    }
}
