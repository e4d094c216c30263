//! SQL over the store with DataFusion.

use std::path::Path;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::batches::Table;

/// Why a query failed: the user's SQL, a missing store, or the engine.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("no Afflio data at {0}: expected table directories such as {0}/ledger (run `afflio replay` first)")]
    NoData(String),
    #[error("{0}")]
    Query(#[from] DataFusionError),
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

/// A session with every table of the store at `dir` registered by name.
pub async fn sql_context(dir: &Path) -> Result<SessionContext, SqlError> {
    let ctx = SessionContext::new();
    let mut found = 0;
    for t in Table::ALL {
        let tdir = dir.join(t.name());
        if !tdir.is_dir() {
            continue;
        }
        found += 1;
        let path = format!("{}/", tdir.display());
        let schema = crate::schema(t);
        let opts = ParquetReadOptions::default().schema(&schema);
        ctx.register_parquet(t.name(), &path, opts).await?;
    }
    if found == 0 {
        return Err(SqlError::NoData(dir.display().to_string()));
    }
    Ok(ctx)
}

/// Runs `sql` against the store and renders the result.
pub async fn query(dir: &Path, sql: &str, format: OutputFormat) -> Result<String, SqlError> {
    let ctx = sql_context(dir).await?;
    let df = ctx.sql(sql).await?;
    let schema = df.schema().inner().clone();
    let batches: Vec<RecordBatch> = df.collect().await?;
    let mut buf = Vec::new();
    match format {
        OutputFormat::Table => {
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
