//! Keeping the store fast to read and bounded on disk: OPTIMIZE (small files
//! merged into large ones), VACUUM (files no version within the retention
//! still needs are deleted). Checkpoints of each table's Delta log are made
//! by its commits every `delta.checkpointInterval` (100) versions.
//!
//! Readers are never disturbed: OPTIMIZE commits a new version with the same
//! rows in fewer files (older versions keep theirs until VACUUM), and VACUUM
//! keeps every file a version younger than the retention needs.

use std::num::NonZeroU64;
use std::time::Instant;

use deltalake::kernel::transaction::CommitProperties;

use crate::batches::Table;
use crate::store::{writer_properties, Store, StoreError, EPOCHS};

/// When and how the store is maintained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Maintenance {
    /// A table with at least this many files to merge (beyond one per
    /// partition) is optimized.
    pub min_files: usize,
    /// The size OPTIMIZE aims at for a file.
    pub target_file_bytes: u64,
    /// Files no version younger than this needs are deleted by VACUUM.
    pub vacuum_retention: chrono::Duration,
}

impl Default for Maintenance {
    fn default() -> Self {
        Maintenance { min_files: 64, target_file_bytes: 128 << 20, vacuum_retention: chrono::Duration::days(7) }
    }
}

/// What one maintenance step did to one table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    pub table: String,
    pub files_before: usize,
    pub files_removed: u64,
    pub files_added: u64,
    pub files_vacuumed: usize,
    pub millis: u64,
}

impl std::fmt::Display for MaintenanceReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<11} {:>6} files: {} merged into {}, {} deleted ({} ms)",
            self.table, self.files_before, self.files_removed, self.files_added, self.files_vacuumed, self.millis
        )
    }
}

fn err(table: &str) -> impl FnOnce(deltalake::DeltaTableError) -> StoreError + '_ {
    move |source| StoreError::Delta { table: table.to_string(), source: Box::new(source) }
}

impl Store {
    /// Records the tables' versions after maintenance, so that readers of
    /// the latest store version read the merged files.
    pub async fn record_maintenance(&mut self) -> Result<i64, StoreError> {
        let out = afflio_engine::Output::default();
        let w = crate::Write {
            output: &out,
            changes: None,
            mode: crate::Mode::Append,
            position: None,
            writer: "maintenance",
        };
        Ok(self.write(w).await?.version)
    }

    /// Active files of a table (`epochs` included by name).
    pub fn files(&self, table: &str) -> usize {
        self.file_uris(table).len()
    }

    fn file_uris(&self, table: &str) -> Vec<String> {
        let t = match Table::parse(table) {
            Some(t) => self.table(t),
            None => self.epochs_table(),
        };
        t.get_file_uris().map(|it| it.collect()).unwrap_or_default()
    }

    /// Files OPTIMIZE could merge: beyond one per partition.
    pub fn mergeable_files(&self, table: &str) -> usize {
        let uris = self.file_uris(table);
        let partitions: std::collections::BTreeSet<&str> =
            uris.iter().map(|u| u.rsplit_once('/').map_or("", |(dir, _)| dir)).collect();
        uris.len().saturating_sub(partitions.len())
    }

    /// The names of every table of the store, `epochs` last.
    pub fn table_names() -> impl Iterator<Item = &'static str> {
        Table::ALL.into_iter().map(Table::name).chain(std::iter::once(EPOCHS))
    }

    /// Merges a table's small files (when it has at least `min_files` of
    /// them, or always with `force`).
    pub async fn optimize(
        &mut self,
        table: &str,
        m: &Maintenance,
        force: bool,
    ) -> Result<MaintenanceReport, StoreError> {
        let started = Instant::now();
        let before = self.files(table);
        let mut report = MaintenanceReport { table: table.to_string(), files_before: before, ..Default::default() };
        let mergeable = self.mergeable_files(table);
        if mergeable == 0 || (!force && mergeable < m.min_files) {
            return Ok(report);
        }
        let delta = match Table::parse(table) {
            Some(t) => self.table(t).clone(),
            None => self.epochs_table().clone(),
        };
        let target = NonZeroU64::new(m.target_file_bytes.max(1 << 20)).expect("non-zero");
        let (delta, metrics) = delta
            .optimize()
            .with_target_size(target)
            .with_writer_properties(writer_properties())
            .with_commit_properties(CommitProperties::default())
            .await
            .map_err(err(table))?;
        report.files_removed = metrics.num_files_removed;
        report.files_added = metrics.num_files_added;
        match Table::parse(table) {
            Some(t) => self.set_table(t, delta),
            None => self.set_epochs_table(delta),
        }
        report.millis = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Deletes the files of a table that no version younger than the
    /// retention needs.
    pub async fn vacuum(&mut self, table: &str, m: &Maintenance) -> Result<MaintenanceReport, StoreError> {
        let started = Instant::now();
        let before = self.files(table);
        let delta = match Table::parse(table) {
            Some(t) => self.table(t).clone(),
            None => self.epochs_table().clone(),
        };
        let retention = m
            .vacuum_retention
            .to_std()
            .map_err(|_| StoreError::Invalid(format!("vacuum retention {} is negative", m.vacuum_retention)))?;
        let (delta, metrics) = delta
            .vacuum()
            .with_retention_period(chrono::Duration::from_std(retention).unwrap_or(m.vacuum_retention))
            .with_enforce_retention_duration(false)
            .await
            .map_err(err(table))?;
        match Table::parse(table) {
            Some(t) => self.set_table(t, delta),
            None => self.set_epochs_table(delta),
        }
        Ok(MaintenanceReport {
            table: table.to_string(),
            files_before: before,
            files_vacuumed: metrics.files_deleted.len(),
            millis: started.elapsed().as_millis() as u64,
            ..Default::default()
        })
    }
}
