//! Afflio sinks: the Arrow schemas of the output tables, the store (one
//! Delta Lake table per output table, and an `epochs` table indexing the
//! store's commits), its maintenance, and SQL over it with DataFusion.

mod batches;
mod deliveries;
mod maintenance;
mod sql;
mod store;

pub use batches::{mask_destination, order_hour, schema, state_changes_of, Table};
pub use deliveries::{deliveries_schema, DeliveryLog, DeliveryRow, DELIVERIES};
pub use maintenance::{Maintenance, MaintenanceReport};
pub use sql::{escape, query, query_at, sql_context, OutputFormat, SqlError};
pub use store::{is_store, snapshot, At, Committed, Mode, Position, Snapshot, Store, StoreError, Write, EPOCHS};

#[cfg(test)]
mod tests;

/// Re-exported so that callers use the same Arrow as the sinks.
pub use datafusion::arrow;
