//! SQL over the store with DataFusion.

use std::path::Path;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::SessionContext;

use crate::store::{open_table_at, snapshot, At, Snapshot, StoreError, EPOCHS};

/// Why a query failed: the user's SQL, a missing store, or the engine.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The user's: no store there, or no such version.
    #[error("{0}")]
    NoData(String),
    /// The user's: a statement that would write or change the session.
    #[error("only queries are allowed (SELECT, WITH, EXPLAIN): {0}")]
    NotAQuery(String),
    #[error("{0}")]
    Query(#[from] DataFusionError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot format the result: {0}")]
    Format(#[from] ArrowError),
}

/// How query results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Csv,
    Json,
}

/// CSV has no lists: nested columns (`codes`, `code_issues`, ...) are
/// written as their display text, e.g. `[code_unknown, code_expired]`.
fn flatten_nested(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    use datafusion::arrow::array::{ArrayRef, StringBuilder};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    use std::sync::Arc;
    if !batch.schema().fields().iter().any(|f| f.data_type().is_nested()) {
        return Ok(batch.clone());
    }
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (f, col) in batch.schema().fields().iter().zip(batch.columns()) {
        if !f.data_type().is_nested() {
            fields.push(f.as_ref().clone());
            cols.push(col.clone());
            continue;
        }
        let fmt = ArrayFormatter::try_new(col.as_ref(), &FormatOptions::default())?;
        let mut b = StringBuilder::new();
        for i in 0..col.len() {
            if col.is_null(i) {
                b.append_null();
            } else {
                b.append_value(fmt.value(i).to_string());
            }
        }
        fields.push(Field::new(f.name(), DataType::Utf8, true));
        cols.push(Arc::new(b.finish()));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
}

/// A session with every table of the store at `dir` registered by name, at
/// store version `at` (every table at the version that commit left, so the
/// tables agree with each other), and the snapshot it reads.
pub async fn sql_context(dir: &Path, at: At) -> Result<(SessionContext, Snapshot), SqlError> {
    let snap = snapshot(dir, at).await.map_err(|e| match e {
        StoreError::Invalid(m) => SqlError::NoData(m),
        other => SqlError::Store(other),
    })?;
    let ctx = SessionContext::new();
    for (name, version) in &snap.tables {
        let table = open_table_at(dir, name, *version).await?;
        table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| SqlError::Store(StoreError::Delta { table: name.clone(), source: Box::new(e) }))?;
        let provider = table
            .table_provider()
            .await
            .map_err(|e| SqlError::Store(StoreError::Delta { table: name.clone(), source: Box::new(e.into()) }))?;
        ctx.register_table(name.as_str(), provider)?;
    }
    // The webhook delivery log, at its latest version, when there is one.
    if dir.join(crate::DELIVERIES).join("_delta_log").is_dir() {
        let table = open_table_at(dir, crate::DELIVERIES, -1).await?;
        table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| SqlError::Store(StoreError::Delta { table: crate::DELIVERIES.into(), source: Box::new(e) }))?;
        let provider = table.table_provider().await.map_err(|e| {
            SqlError::Store(StoreError::Delta { table: crate::DELIVERIES.into(), source: Box::new(e.into()) })
        })?;
        ctx.register_table(crate::DELIVERIES, provider)?;
    }
    if let Some(v) = snap.version {
        let table = open_table_at(dir, EPOCHS, v).await?;
        table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| SqlError::Store(StoreError::Delta { table: EPOCHS.into(), source: Box::new(e) }))?;
        let provider = table
            .table_provider()
            .await
            .map_err(|e| SqlError::Store(StoreError::Delta { table: EPOCHS.into(), source: Box::new(e.into()) }))?;
        ctx.register_table(EPOCHS, provider)?;
    }
    Ok((ctx, snap))
}

/// Only queries: no DDL, no DML (`COPY ... TO`, `INSERT`), no `SET`.
fn read_only() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}

/// Runs `sql` against the latest version of the store and renders the result.
pub async fn query(dir: &Path, sql: &str, format: OutputFormat) -> Result<String, SqlError> {
    query_at(dir, sql, format, At::Latest).await
}

/// Runs `sql` (a query; anything that would write is refused) against store
/// version `at` and renders the result.
pub async fn query_at(dir: &Path, sql: &str, format: OutputFormat, at: At) -> Result<String, SqlError> {
    let (ctx, _) = sql_context(dir, at).await?;
    let df = ctx.sql_with_options(sql, read_only()).await.map_err(|e| match e {
        DataFusionError::Plan(m) if m.contains("not supported") || m.contains("not allowed") => SqlError::NotAQuery(m),
        other => SqlError::Query(other),
    })?;
    let schema = df.schema().inner().clone();
    let batches: Vec<RecordBatch> = df.collect().await?;
    let mut buf = Vec::new();
    match format {
        OutputFormat::Table => {
            let batches = batches.iter().map(escape_controls).collect::<Result<Vec<_>, _>>()?;
            let schema = match batches.first() {
                Some(b) => b.schema(),
                None => flatten_nested(&RecordBatch::new_empty(schema))?.schema(),
            };
            let s = datafusion::arrow::util::pretty::pretty_format_batches_with_schema(schema, &batches)?;
            return Ok(format!("{s}\n"));
        }
        OutputFormat::Csv => {
            let mut w = datafusion::arrow::csv::WriterBuilder::new().with_header(true).build(&mut buf);
            if batches.is_empty() {
                w.write(&flatten_nested(&RecordBatch::new_empty(schema))?)?;
            }
            for b in &batches {
                w.write(&flatten_nested(b)?)?;
            }
        }
        OutputFormat::Json => {
            let mut w = datafusion::arrow::json::ArrayWriter::new(&mut buf);
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
            if batches.iter().all(|b| b.num_rows() == 0) {
                buf = b"[]".to_vec();
            }
            buf.push(b'\n');
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Text for a terminal: control characters (escape sequences, CR, LF) in
/// string values are shown escaped (`\u{1b}`), never sent raw. Nested
/// columns are flattened to their text first.
fn escape_controls(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    use datafusion::arrow::array::{ArrayRef, StringArray, StringBuilder};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let batch = flatten_nested(batch)?;
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (f, col) in batch.schema().fields().iter().zip(batch.columns()) {
        let text = match f.data_type() {
            DataType::Utf8View | DataType::LargeUtf8 => datafusion::arrow::compute::cast(col, &DataType::Utf8)?,
            _ => col.clone(),
        };
        match text.as_any().downcast_ref::<StringArray>() {
            Some(s) if s.iter().flatten().any(|v| v.chars().any(char::is_control)) => {
                let mut b = StringBuilder::new();
                for v in s.iter() {
                    match v {
                        None => b.append_null(),
                        Some(v) => b.append_value(escape(v)),
                    }
                }
                fields.push(Field::new(f.name(), DataType::Utf8, f.is_nullable()));
                cols.push(std::sync::Arc::new(b.finish()));
            }
            _ => {
                fields.push(f.as_ref().clone());
                cols.push(col.clone());
            }
        }
    }
    RecordBatch::try_new(std::sync::Arc::new(Schema::new(fields)), cols)
}

/// A string with its control characters written as `\u{..}`.
pub fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if c.is_control() {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}
