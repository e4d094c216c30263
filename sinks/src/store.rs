//! The store: one Delta Lake table per output table under `DATA/<table>`,
//! and an `epochs` table that records, for every commit of the store, the
//! version of each table it left (so a reader can take all tables at one
//! consistent point, now or in the past).
//!
//! - Append-only tables (ledger, clicks, flags, rejections, decisions,
//!   payouts) are appended to.
//! - State tables (orders, lines, balances) are upserted: MERGE of the rows
//!   that changed, by key (`orders` and `lines` are partitioned by the hour
//!   of the order's first capture, so a MERGE reads and rewrites only the
//!   hours it touches).
//! - A write may carry a stream position: each table's commit then records
//!   it as a Delta application transaction (`txn`, app id per stream and
//!   table), and a write whose position a table already holds is skipped
//!   for that table. That is the exactly-once protocol of the live service:
//!   after a crash the same rows are written again and recognised, without
//!   deleting any file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use afflio_engine::{Output, StateChanges};
use chrono::{DateTime, Utc};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::error::ArrowError;
use datafusion::prelude::SessionContext;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{StructType, Transaction};
use deltalake::parquet::basic::Compression;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableError};
use futures::future::try_join_all;

use crate::batches::{self, schema, Table};

/// Why the store could not be written or read: an external problem (the
/// disk, a store another program damaged), or a bug when rows do not fit
/// their schema.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Delta table {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("internal error: rows of table {table} do not fit its schema: {source}")]
    Arrow {
        table: &'static str,
        #[source]
        source: ArrowError,
    },
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn delta(table: impl Into<String>) -> impl FnOnce(DeltaTableError) -> StoreError {
    let table = table.into();
    move |source| StoreError::Delta { table, source: Box::new(source) }
}

/// The table that indexes the store's commits.
pub const EPOCHS: &str = "epochs";

/// How a write treats the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every table's content is replaced by the rows written (a replay's
    /// first write; a table without rows is emptied).
    Replace,
    /// Every table's rows are appended, state tables too (rows known to be new).
    Append,
    /// Append-only tables are appended to; state tables are upserted by key.
    Upsert,
}

/// A stream position written with the rows, for exactly-once writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// The stream's application id (`afflio:<stream>`); each table's
    /// transaction is `<app>:<table>`.
    pub app: String,
    /// The position of the last message whose rows are in this write.
    pub seq: i64,
}

/// One write of the store.
#[derive(Clone, Copy)]
pub struct Write<'a> {
    pub output: &'a Output,
    pub changes: Option<&'a StateChanges>,
    pub mode: Mode,
    pub position: Option<&'a Position>,
    /// Who wrote (`serve`, `replay`, `review`, `payouts`), kept in `epochs`.
    pub writer: &'a str,
}

/// What a write did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// The store version (the `epochs` table's version) this write made.
    pub version: i64,
    /// Rows written per table.
    pub rows: BTreeMap<&'static str, usize>,
    /// Tables that already held this position (their rows were not written again).
    pub skipped: Vec<&'static str>,
}

/// An open store: every table's latest state.
pub struct Store {
    root: PathBuf,
    tables: BTreeMap<Table, DeltaTable>,
    epochs: DeltaTable,
    ctx: SessionContext,
}

fn url_of(dir: &Path) -> Result<url::Url, StoreError> {
    let abs = std::path::absolute(dir).map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
    url::Url::from_directory_path(&abs)
        .map_err(|()| StoreError::Invalid(format!("{} cannot be used as a table location", abs.display())))
}

pub(crate) fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(256 * 1024))
        .set_dictionary_enabled(false)
        .build()
}

/// Opens the Delta table at `dir`, creating it with `schema` (and
/// `partitions`) when there is none.
pub(crate) async fn open_or_create(
    dir: &Path,
    name: &str,
    schema: datafusion::arrow::datatypes::SchemaRef,
    partitions: &[&str],
) -> Result<DeltaTable, StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
    let table = DeltaTable::try_from_url(url_of(dir)?).await.map_err(delta(name))?;
    if table.version().is_some() {
        // A table of an earlier format is refused, naming what differs.
        let want: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let have: Vec<String> = match table.snapshot() {
            Ok(s) => s.schema().fields().map(|f| f.name().clone()).collect(),
            Err(_) => want.clone(),
        };
        if have != want {
            let missing: Vec<&String> = want.iter().filter(|w| !have.contains(w)).collect();
            let extra: Vec<&String> = have.iter().filter(|h| !want.contains(h)).collect();
            return Err(StoreError::Invalid(format!(
                "table {name} at {} was written by another Afflio version (columns missing: {missing:?}, unexpected: {extra:?}): write to a fresh --store",
                dir.display()
            )));
        }
        return Ok(table);
    }
    let kernel: StructType = schema.as_ref().try_into_kernel().map_err(|e| delta(name)(e.into()))?;
    table
        .create()
        .with_table_name(name)
        .with_columns(kernel.fields().cloned())
        .with_partition_columns(partitions.iter().map(|p| p.to_string()))
        .with_save_mode(SaveMode::Ignore)
        .await
        .map_err(delta(name))
}

/// Whether `dir` holds an Afflio store (a Delta `ledger` table).
pub fn is_store(dir: &Path) -> bool {
    dir.join("ledger").join("_delta_log").is_dir()
}

fn txn_app(app: &str, table: &str) -> String {
    format!("{app}:{table}")
}

impl Store {
    /// Opens the store at `root`, creating the directory and any missing table.
    pub async fn open(root: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(root).map_err(|source| StoreError::Io { path: root.to_path_buf(), source })?;
        let opened = try_join_all(Table::ALL.into_iter().map(|t| async move {
            open_or_create(&root.join(t.name()), t.name(), schema(t), t.partitions()).await.map(|d| (t, d))
        }))
        .await?;
        let tables: BTreeMap<Table, DeltaTable> = opened.into_iter().collect();
        let epochs = open_or_create(&root.join(EPOCHS), EPOCHS, batches::epochs_schema(), &[]).await?;
        Ok(Store { root: root.to_path_buf(), tables, epochs, ctx: SessionContext::new() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The stream position each table (and `epochs`) holds for `app`.
    pub async fn positions(&self, app: &str) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut out = BTreeMap::new();
        for (t, table) in &self.tables {
            if let Some(v) = txn_version(table, &txn_app(app, t.name())).await? {
                out.insert(t.name().to_string(), v);
            }
        }
        if let Some(v) = txn_version(&self.epochs, &txn_app(app, EPOCHS)).await? {
            out.insert(EPOCHS.to_string(), v);
        }
        Ok(out)
    }

    /// The current version of every table, by name.
    pub fn versions(&self) -> BTreeMap<&'static str, i64> {
        self.tables.iter().map(|(t, d)| (t.name(), d.version().map_or(-1, |v| v as i64))).collect()
    }

    /// Writes `w` (every table concurrently), then records the tables'
    /// versions in `epochs`. With a position, a table that already holds it
    /// is left as it is.
    pub async fn write(&mut self, w: Write<'_>) -> Result<Committed, StoreError> {
        let mut committed = self.write_rows_only(Write { ..w }).await?;
        fault("store-before-epoch", EPOCHS);
        committed.version = self.commit_epoch(&w).await?;
        Ok(committed)
    }

    /// Writes `w`'s rows like [`Store::write`] but records no commit in
    /// `epochs`: readers keep reading the last recorded version (a
    /// recovering writer catching up with what the tables already hold).
    pub async fn write_rows_only(&mut self, w: Write<'_>) -> Result<Committed, StoreError> {
        let rows = batches::write_rows(w.output, w.changes)
            .map_err(|(t, source)| StoreError::Arrow { table: t.name(), source })?;
        let mut committed = Committed::default();
        let mut jobs = Vec::new();
        for (t, batch) in rows {
            let n = batch.num_rows();
            if n == 0 && w.mode != Mode::Replace {
                continue;
            }
            if let Some(p) = &w.position {
                let held = txn_version(&self.tables[&t], &txn_app(&p.app, t.name())).await?;
                if held.is_some_and(|v| v >= p.seq) {
                    committed.skipped.push(t.name());
                    continue;
                }
            }
            committed.rows.insert(t.name(), n);
            let table = self.tables[&t].clone();
            let ctx = self.ctx.clone();
            let position = w.position.cloned();
            let mode = w.mode;
            jobs.push(async move {
                fault("store-before-table", t.name());
                let started = std::time::Instant::now();
                // Counted only when logging: it is not free on a table of many files.
                let files = log_commits().then(|| table.snapshot().map_or(0, |s| s.log_data().num_files()));
                let table = write_table(table, t, batch, mode, position.as_ref(), &ctx).await?;
                if let Some(files) = files {
                    eprintln!(
                        "afflio: store {}: {n} rows ({mode:?}) into {files} files in {} ms",
                        t.name(),
                        started.elapsed().as_millis()
                    );
                }
                fault("store-after-table", t.name());
                Ok::<_, StoreError>((t, table))
            });
        }
        for (t, table) in try_join_all(jobs).await? {
            self.tables.insert(t, table);
        }
        committed.version = self.epochs.version().map_or(-1, |v| v as i64);
        Ok(committed)
    }

    /// Appends the store's commit record: position, writer and every table's version.
    async fn commit_epoch(&mut self, w: &Write<'_>) -> Result<i64, StoreError> {
        if let Some(p) = &w.position {
            let held = txn_version(&self.epochs, &txn_app(&p.app, EPOCHS)).await?;
            if held.is_some_and(|v| v >= p.seq) {
                return Ok(self.epochs.version().map_or(-1, |v| v as i64));
            }
        }
        let versions = self.versions();
        let now = Utc::now();
        let batch = batches::epoch_row(w.position.as_ref().map(|p| p.seq), w.writer, now, &versions)
            .map_err(|source| StoreError::Arrow { table: EPOCHS, source })?;
        let meta = serde_json::json!({
            "position": w.position.as_ref().map(|p| p.seq),
            "writer": w.writer,
            "committed_at": now.to_rfc3339(),
            "versions": versions,
        });
        let mut props = CommitProperties::default().with_metadata([("afflio".to_string(), meta)]);
        if let Some(p) = &w.position {
            props = props.with_application_transaction(Transaction::new(txn_app(&p.app, EPOCHS), p.seq));
        }
        let table = self.epochs.clone();
        self.epochs = table
            .write(vec![batch])
            .with_save_mode(SaveMode::Append)
            .with_writer_properties(writer_properties())
            .with_commit_properties(props)
            .await
            .map_err(delta(EPOCHS))?;
        Ok(self.epochs.version().map_or(-1, |v| v as i64))
    }

    pub(crate) fn table(&self, t: Table) -> &DeltaTable {
        &self.tables[&t]
    }

    pub(crate) fn set_table(&mut self, t: Table, table: DeltaTable) {
        self.tables.insert(t, table);
    }

    pub(crate) fn epochs_table(&self) -> &DeltaTable {
        &self.epochs
    }

    pub(crate) fn set_epochs_table(&mut self, table: DeltaTable) {
        self.epochs = table;
    }

    /// Reloads every table from disk (after another process wrote it).
    pub async fn refresh(&mut self) -> Result<(), StoreError> {
        for (t, table) in &mut self.tables {
            table.update_state().await.map_err(delta(t.name()))?;
        }
        self.epochs.update_state().await.map_err(delta(EPOCHS))
    }
}

/// A fault point for the crash tests: with `FAILPOINTS=<name>=return(<table>)`
/// in the environment (or `return` for any table) the process dies here as
/// under `kill -9`. Inert otherwise.
fn fault(name: &str, table: &str) {
    if let Some(arg) = fail::eval(name, |arg| arg) {
        if arg.as_deref().is_none_or(|a| a == table) {
            eprintln!("afflio: fault point {name} ({table}): aborting");
            std::process::abort();
        }
    }
}

/// `AFFLIO_LOG_COMMITS=1`: each table's write time on stderr (for profiling).
fn log_commits() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("AFFLIO_LOG_COMMITS").is_some_and(|v| v == "1"))
}

async fn txn_version(table: &DeltaTable, app: &str) -> Result<Option<i64>, StoreError> {
    let Ok(snapshot) = table.snapshot() else { return Ok(None) };
    snapshot.transaction_version(table.log_store().as_ref(), app).await.map_err(delta(app))
}

/// One table's write: append, replace or upsert, with the position's transaction.
async fn write_table(
    table: DeltaTable,
    t: Table,
    batch: RecordBatch,
    mode: Mode,
    position: Option<&Position>,
    ctx: &SessionContext,
) -> Result<DeltaTable, StoreError> {
    let mut props = CommitProperties::default();
    if let Some(p) = position {
        props = props.with_application_transaction(Transaction::new(txn_app(&p.app, t.name()), p.seq));
    }
    let upsert = mode == Mode::Upsert && !t.key().is_empty();
    if !upsert {
        let save = if mode == Mode::Replace { SaveMode::Overwrite } else { SaveMode::Append };
        return table
            .write(vec![batch])
            .with_save_mode(save)
            .with_writer_properties(writer_properties())
            .with_commit_properties(props)
            .await
            .map_err(delta(t.name()));
    }
    // MERGE by key; a concurrent maintenance commit (OPTIMIZE) that removed a
    // file the MERGE read is a conflict: the MERGE is planned again on the
    // table as it now is (nothing of it was committed).
    let mut table = table;
    let mut attempt = 0;
    loop {
        let source = ctx.read_batch(batch.clone()).map_err(|e| delta(t.name())(e.into()))?;
        let on: Vec<String> = t.key().iter().map(|k| format!("t.{k} = s.{k}")).collect();
        let cols: Vec<String> = schema(t).fields().iter().map(|f| f.name().clone()).collect();
        let keys = t.key();
        let merge = table
            .clone()
            .merge(source, on.join(" AND "))
            .with_source_alias("s")
            .with_target_alias("t")
            .with_writer_properties(writer_properties())
            .with_commit_properties(props.clone())
            .when_matched_update(|u| {
                cols.iter()
                    .filter(|c| !keys.contains(&c.as_str()))
                    .fold(u, |u, c| u.update(c.as_str(), format!("s.{c}")))
            })
            .and_then(|m| {
                m.when_not_matched_insert(|i| cols.iter().fold(i, |i, c| i.set(c.as_str(), format!("s.{c}"))))
            })
            .map_err(delta(t.name()))?;
        match merge.await {
            Ok((t2, _metrics)) => return Ok(t2),
            Err(e) if attempt < 5 && is_conflict(&e) => {
                attempt += 1;
                table.update_state().await.map_err(delta(t.name()))?;
            }
            Err(e) => return Err(delta(t.name())(e)),
        }
    }
}

fn is_conflict(e: &DeltaTableError) -> bool {
    matches!(e, DeltaTableError::Transaction { .. }) || e.to_string().to_lowercase().contains("conflict")
}

/// The versions of every table at the store version a reader asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The store version (`epochs` table version); `None` for a store
    /// without commit records.
    pub version: Option<i64>,
    pub committed_at: Option<DateTime<Utc>>,
    pub position: Option<i64>,
    pub tables: BTreeMap<String, i64>,
}

/// Which store version to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    Latest,
    /// A store version (the `epochs` table's version).
    Version(i64),
    /// The latest store version committed at or before this time.
    Time(DateTime<Utc>),
}

/// The table versions of store version `at`.
pub async fn snapshot(root: &Path, at: At) -> Result<Snapshot, StoreError> {
    let dir = root.join(EPOCHS);
    if !dir.join("_delta_log").is_dir() {
        return Err(StoreError::Invalid(format!(
            "no Afflio store at {}: expected Delta tables such as {}/ledger (run `afflio replay` first)",
            root.display(),
            root.display()
        )));
    }
    let mut table = DeltaTable::try_from_url(url_of(&dir)?).await.map_err(delta(EPOCHS))?;
    match at {
        At::Latest => {}
        At::Version(v) => {
            let latest = table.version().map_or(-1, |v| v as i64);
            if v < 1 || v > latest {
                return Err(StoreError::Invalid(format!(
                    "store version {v} does not exist: versions run from 1 to {latest}"
                )));
            }
            table.load_version(v as u64).await.map_err(delta(EPOCHS))?;
        }
        At::Time(t) => {
            table.load_with_datetime(t).await.map_err(|e| {
                StoreError::Invalid(format!("no store version was committed at or before {}: {e}", t.to_rfc3339()))
            })?;
        }
    }
    // A version made by maintenance of `epochs` itself (OPTIMIZE) has no
    // record: the store is as the version before it left it.
    let mut version = table.version().map(|v| v as i64);
    let mut meta = None;
    while let Some(v) = version.filter(|v| *v >= 1) {
        meta = commit_record(&dir, v)?;
        if meta.is_some() {
            break;
        }
        version = Some(v - 1);
    }
    let Some(meta) = meta else {
        return Err(StoreError::Invalid(format!(
            "store version {} holds no commit record (an empty store: nothing was written yet)",
            version.unwrap_or(0)
        )));
    };
    let tables = meta["versions"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_i64()?))).collect())
        .unwrap_or_default();
    Ok(Snapshot {
        version,
        committed_at: meta["committed_at"]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.to_utc()),
        position: meta["position"].as_i64(),
        tables,
    })
}

/// The Afflio commit record of version `v` of the `epochs` table at `dir`:
/// the `afflio` entry of that commit's `commitInfo`.
fn commit_record(dir: &Path, v: i64) -> Result<Option<serde_json::Value>, StoreError> {
    let path = dir.join("_delta_log").join(format!("{v:020}.json"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::Invalid(format!(
                "store version {v} is older than the log kept ({} was cleaned up)",
                path.display()
            )))
        }
        Err(source) => return Err(StoreError::Io { path, source }),
    };
    for line in text.lines() {
        let Ok(action) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if let Some(meta) = action.get("commitInfo").and_then(|c| c.get("afflio")) {
            return Ok(Some(meta.clone()));
        }
    }
    Ok(None)
}

/// Opens `table` of the store at `root` at `version`.
pub(crate) async fn open_table_at(root: &Path, table: &str, version: i64) -> Result<DeltaTable, StoreError> {
    let dir = root.join(table);
    let mut t = DeltaTable::try_from_url(url_of(&dir)?).await.map_err(delta(table))?;
    if version >= 0 && t.version() != Some(version as u64) {
        t.load_version(version as u64).await.map_err(delta(table))?;
    }
    Ok(t)
}
