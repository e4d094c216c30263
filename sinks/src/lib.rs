//! Afflio sinks: the Arrow schemas of the output tables (SPEC §10), an
//! atomic Parquet store (a reader never sees a partial file), and a
//! DataFusion session over it.

mod batches;
mod sql;
mod store;

pub use batches::{schema, Table};
pub use sql::{query, sql_context, OutputFormat, SqlError};
pub use store::{ParquetStore, StoreError, StreamStore};

#[cfg(test)]
mod tests;

/// Re-exported so that callers use the same Arrow as the sinks.
pub use datafusion::arrow;
