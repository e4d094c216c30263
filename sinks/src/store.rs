//! An atomic Parquet store: one directory per table; each table's file is
//! written under a hidden temporary name and renamed into place when
//! complete, so a reader never sees a partial file.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use afflio_engine::{Engine, Output};
use chrono::{DateTime, Utc};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::error::ArrowError;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::Compression;
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::properties::WriterProperties;

use crate::batches::{self, schema, Table};

/// Why the store could not be written (an external problem, or a bug when
/// rows do not fit their schema).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode table {table} as Parquet: {source}")]
    Parquet {
        table: &'static str,
        #[source]
        source: ParquetError,
    },
    #[error("internal error: rows of table {table} do not fit its schema: {source}")]
    Arrow {
        table: &'static str,
        #[source]
        source: ArrowError,
    },
}

struct TableFile {
    tmp: PathBuf,
    path: PathBuf,
    writer: ArrowWriter<File>,
    rows: u64,
}

/// Writes one Parquet file per table, streaming rows as they come.
pub struct ParquetStore {
    dir: PathBuf,
    files: BTreeMap<Table, TableFile>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

impl ParquetStore {
    /// Opens the store for a new run: `dir/<table>/` directories are
    /// created, files are written under temporary names until [`finish`].
    ///
    /// [`finish`]: ParquetStore::finish
    pub fn create(dir: &Path, run_id: &str) -> Result<ParquetStore, StoreError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(256 * 1024))
            .build();
        let mut files = BTreeMap::new();
        for t in Table::ALL {
            let tdir = dir.join(t.name());
            fs::create_dir_all(&tdir).map_err(io(&tdir))?;
            let name = format!("part-{run_id}.parquet");
            let tmp = tdir.join(format!(".{name}.tmp"));
            let file = File::create(&tmp).map_err(io(&tmp))?;
            let writer = ArrowWriter::try_new(file, schema(t), Some(props.clone()))
                .map_err(|source| StoreError::Parquet { table: t.name(), source })?;
            files.insert(t, TableFile { tmp, path: tdir.join(name), writer, rows: 0 });
        }
        Ok(ParquetStore { dir: dir.to_path_buf(), files })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write(&mut self, t: Table, b: Result<RecordBatch, ArrowError>) -> Result<(), StoreError> {
        let b = b.map_err(|source| StoreError::Arrow { table: t.name(), source })?;
        if b.num_rows() == 0 {
            return Ok(());
        }
        let f = self.files.get_mut(&t).expect("every table has a file");
        f.rows += b.num_rows() as u64;
        f.writer.write(&b).map_err(|source| StoreError::Parquet { table: t.name(), source })
    }

    /// Appends the streamed rows (ledger, clicks, flags, rejections).
    pub fn append(&mut self, out: &Output) -> Result<(), StoreError> {
        self.write(Table::Ledger, batches::ledger(&out.ledger))?;
        self.write(Table::Clicks, batches::clicks(&out.clicks))?;
        self.write(Table::Flags, batches::flags(&out.flags))?;
        self.write(Table::Rejections, batches::rejections(&out.rejections))
    }

    /// Writes the state tables (orders, lines as of `as_of`), closes every
    /// file, and moves each into place, replacing what an earlier run wrote
    /// to the same table. Returns rows written per table.
    pub fn finish(mut self, engine: &Engine, as_of: DateTime<Utc>) -> Result<BTreeMap<&'static str, u64>, StoreError> {
        self.write(Table::Orders, batches::orders(engine.orders()))?;
        self.write(Table::Lines, batches::lines(engine, as_of))?;
        let mut counts = BTreeMap::new();
        for (t, f) in std::mem::take(&mut self.files) {
            f.writer.close().map_err(|source| StoreError::Parquet { table: t.name(), source })?;
            let tdir = self.dir.join(t.name());
            // Earlier runs' files go first, so that a reader sees either the
            // old table or the new one, never both added up.
            for entry in fs::read_dir(&tdir).map_err(io(&tdir))? {
                let p = entry.map_err(io(&tdir))?.path();
                let is_part = p.extension().is_some_and(|e| e == "parquet");
                if is_part && p != f.path {
                    fs::remove_file(&p).map_err(io(&p))?;
                }
            }
            fs::rename(&f.tmp, &f.path).map_err(io(&f.path))?;
            counts.insert(t.name(), f.rows);
        }
        Ok(counts)
    }
}

impl Drop for ParquetStore {
    fn drop(&mut self) {
        // An unfinished run leaves no files behind.
        for f in self.files.values() {
            let _ = fs::remove_file(&f.tmp);
        }
    }
}
