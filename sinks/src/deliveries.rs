//! The webhook delivery log: the Delta table `deliveries` beside the store's
//! tables, one row per delivery attempt, appended by the webhook workers (and
//! by `afflio webhooks replay`). It is not part of the store's commit
//! records (`epochs`): deliveries happen after the money is durable, on
//! their own clock; a reader sees the log's latest version.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;

use crate::store::{delta, open_or_create, writer_properties, StoreError};

/// The table's name (a directory under the store's root).
pub const DELIVERIES: &str = "deliveries";

/// One delivery attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryRow {
    pub endpoint_id: String,
    pub program_id: String,
    /// The partner of a partner's endpoint.
    pub partner_id: Option<String>,
    /// The `webhook-id`: the same for every attempt of one message.
    pub message_id: String,
    pub event_type: String,
    /// What delivery is ordered by (an order, lead, partner or batch id).
    pub subject: String,
    /// 1 for the first attempt.
    pub attempt: i32,
    pub ts: DateTime<Utc>,
    /// `delivered`, `retrying` (a later attempt follows), `failed` (given
    /// up after the retry window), `disabled` (410: the endpoint was
    /// disabled), `replayed` (delivered by hand), `replay_failed`.
    pub status: String,
    /// The HTTP status, when a response came.
    pub response_code: Option<i32>,
    pub latency_ms: i64,
    /// What went wrong (a timeout, a refused connection), when nothing came.
    pub error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// The Arrow schema of `deliveries`.
pub fn deliveries_schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("endpoint_id", DataType::Utf8, false),
        Field::new("program_id", DataType::Utf8, false),
        Field::new("partner_id", DataType::Utf8, true),
        Field::new("message_id", DataType::Utf8, false),
        Field::new("event_type", DataType::Utf8, false),
        Field::new("subject", DataType::Utf8, false),
        Field::new("attempt", DataType::Int32, false),
        Field::new("ts", ts(), false),
        Field::new("status", DataType::Utf8, false),
        Field::new("response_code", DataType::Int32, true),
        Field::new("latency_ms", DataType::Int64, false),
        Field::new("error", DataType::Utf8, true),
        Field::new("next_attempt_at", ts(), true),
    ]))
}

fn batch(rows: &[DeliveryRow]) -> Result<RecordBatch, datafusion::arrow::error::ArrowError> {
    let s =
        |f: &dyn Fn(&DeliveryRow) -> &str| -> ArrayRef { Arc::new(StringArray::from_iter_values(rows.iter().map(f))) };
    let o =
        |f: &dyn Fn(&DeliveryRow) -> Option<&str>| -> ArrayRef { Arc::new(StringArray::from_iter(rows.iter().map(f))) };
    let t = |f: &dyn Fn(&DeliveryRow) -> Option<DateTime<Utc>>| -> ArrayRef {
        Arc::new(
            TimestampMicrosecondArray::from_iter(rows.iter().map(|r| f(r).map(|t| t.timestamp_micros())))
                .with_timezone("UTC"),
        )
    };
    RecordBatch::try_new(
        deliveries_schema(),
        vec![
            s(&|r| &r.endpoint_id),
            s(&|r| &r.program_id),
            o(&|r| r.partner_id.as_deref()),
            s(&|r| &r.message_id),
            s(&|r| &r.event_type),
            s(&|r| &r.subject),
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.attempt))),
            t(&|r| Some(r.ts)),
            s(&|r| &r.status),
            Arc::new(Int32Array::from_iter(rows.iter().map(|r| r.response_code))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.latency_ms))),
            o(&|r| r.error.as_deref()),
            t(&|r| r.next_attempt_at),
        ],
    )
}

/// The open log.
pub struct DeliveryLog {
    dir: PathBuf,
    table: DeltaTable,
}

impl DeliveryLog {
    /// Opens (creating) the log under the store's root.
    pub async fn open(root: &Path) -> Result<DeliveryLog, StoreError> {
        let dir = root.join(DELIVERIES);
        let table = open_or_create(&dir, DELIVERIES, deliveries_schema(), &[]).await?;
        Ok(DeliveryLog { dir, table })
    }

    /// Appends rows in one commit.
    pub async fn append(&mut self, rows: &[DeliveryRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let b = batch(rows).map_err(|e| StoreError::Invalid(format!("internal error: deliveries rows: {e}")))?;
        let table = self.table.clone();
        match table.write(vec![b]).with_save_mode(SaveMode::Append).with_writer_properties(writer_properties()).await {
            Ok(t) => {
                self.table = t;
                Ok(())
            }
            Err(e) => {
                // Another writer (a replay by hand) may have committed: reload.
                if let Ok(t) = open_or_create(&self.dir, DELIVERIES, deliveries_schema(), &[]).await {
                    self.table = t;
                }
                Err(delta(DELIVERIES)(e))
            }
        }
    }
}
