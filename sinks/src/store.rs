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
    run_id: String,
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
        Ok(ParquetStore { dir: dir.to_path_buf(), run_id: run_id.to_string(), files })
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

    /// Appends the streamed rows, and the orders closed by retention.
    pub fn append(&mut self, out: &Output) -> Result<(), StoreError> {
        for t in Table::ALL {
            self.write(t, batches::rows(t, out))?;
        }
        Ok(())
    }

    /// Closes every file and moves each into place, replacing what an
    /// earlier run wrote to the same table; the state tables get the
    /// engine's open orders and their lines as of `as_of` in a snapshot file
    /// (`snap-*.parquet`) next to the closed ones, which [`amend`] replaces.
    /// Returns rows written per table.
    ///
    /// [`amend`]: ParquetStore::amend
    pub fn finish(mut self, engine: &Engine, as_of: DateTime<Utc>) -> Result<BTreeMap<&'static str, u64>, StoreError> {
        let mut counts = BTreeMap::new();
        let mut snaps = BTreeMap::new();
        for t in Table::ALL {
            if let Some(b) = batches::state(t, engine, as_of) {
                let b = b.map_err(|source| StoreError::Arrow { table: t.name(), source })?;
                // Hidden until the table's old files are gone.
                let snap = self.dir.join(t.name()).join(format!(".snap-{}.parquet", self.run_id));
                write_file_atomic(&snap, t, &b)?;
                *counts.entry(t.name()).or_insert(0) += b.num_rows() as u64;
                snaps.insert(t, snap);
            }
        }
        for (t, f) in std::mem::take(&mut self.files) {
            f.writer.close().map_err(|source| StoreError::Parquet { table: t.name(), source })?;
            let tdir = self.dir.join(t.name());
            // Earlier runs' files go first, so that a reader sees either the
            // old table or the new one, never both added up.
            for entry in fs::read_dir(&tdir).map_err(io(&tdir))? {
                let p = entry.map_err(io(&tdir))?.path();
                let is_part = p.extension().is_some_and(|e| e == "parquet");
                if is_part && p != f.path && Some(&p) != snaps.get(&t) {
                    fs::remove_file(&p).map_err(io(&p))?;
                }
            }
            fs::rename(&f.tmp, &f.path).map_err(io(&f.path))?;
            if let Some(hidden) = snaps.get(&t) {
                let visible = tdir.join(format!("snap-{}.parquet", self.run_id));
                fs::rename(hidden, &visible).map_err(io(&visible))?;
            }
            *counts.entry(t.name()).or_insert(0) += f.rows;
        }
        Ok(counts)
    }

    /// Adds to a finished store what happened since (reviews on a replayed
    /// store): `out`'s rows as new `part-{tag}` files, and the state tables'
    /// snapshot replaced by the engine's state as of `as_of`.
    pub fn amend(dir: &Path, tag: &str, out: &Output, engine: &Engine, as_of: DateTime<Utc>) -> Result<(), StoreError> {
        for t in Table::ALL {
            let tdir = dir.join(t.name());
            fs::create_dir_all(&tdir).map_err(io(&tdir))?;
            let b = batches::rows(t, out).map_err(|source| StoreError::Arrow { table: t.name(), source })?;
            if b.num_rows() > 0 {
                write_file_atomic(&tdir.join(format!("part-{tag}.parquet")), t, &b)?;
            }
        }
        replace_snapshot(dir, engine, as_of, &format!("snap-{tag}.parquet"))
    }
}

/// Writes the state tables as `name` and removes the older snapshots.
fn replace_snapshot(dir: &Path, engine: &Engine, as_of: DateTime<Utc>, name: &str) -> Result<(), StoreError> {
    for t in Table::ALL {
        let Some(b) = batches::state(t, engine, as_of) else { continue };
        let b = b.map_err(|source| StoreError::Arrow { table: t.name(), source })?;
        let tdir = dir.join(t.name());
        let path = tdir.join(name);
        write_file_atomic(&path, t, &b)?;
        for entry in fs::read_dir(&tdir).map_err(io(&tdir))? {
            let p = entry.map_err(io(&tdir))?.path();
            let snap = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("snap-"));
            if snap && p != path {
                fs::remove_file(&p).map_err(io(&p))?;
            }
        }
    }
    Ok(())
}

/// Writes `batch` to `path` atomically: a hidden temporary file in the same
/// directory, synced, then renamed into place.
fn write_file_atomic(path: &Path, t: Table, batch: &RecordBatch) -> Result<(), StoreError> {
    let dir = path.parent().expect("table files live in a table directory");
    let name = path.file_name().expect("a file name").to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let file = File::create(&tmp).map_err(io(&tmp))?;
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut w = ArrowWriter::try_new(file, schema(t), Some(props))
        .map_err(|source| StoreError::Parquet { table: t.name(), source })?;
    w.write(batch).map_err(|source| StoreError::Parquet { table: t.name(), source })?;
    let file = w.into_inner().map_err(|source| StoreError::Parquet { table: t.name(), source })?;
    file.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Parsed name of a streamed file: `part-{first:020}-{last:020}.parquet`
/// (events first..=last of the stream) or `snap-{last:020}.parquet`.
fn stream_file_last_seq(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".parquet")?;
    if let Some(rest) = stem.strip_prefix("part-") {
        return rest.split_once('-')?.1.parse().ok();
    }
    stem.strip_prefix("snap-")?.parse().ok()
}

/// The store as the live service writes it: append tables grow by one file
/// per flush, named by the stream positions they hold; state tables are
/// replaced by a snapshot per flush. A flush is committed when the engine
/// checkpoint that follows it is; [`StreamStore::recover`] removes what a
/// crash left uncommitted, so that replaying the stream from the checkpoint
/// writes each row exactly once.
#[derive(Clone, Debug)]
pub struct StreamStore {
    dir: PathBuf,
}

/// Files at least this large are left alone by compaction.
const COMPACTED_BYTES: u64 = 64 * 1024 * 1024;

const APPEND_TABLES: [Table; 6] =
    [Table::Ledger, Table::Clicks, Table::Flags, Table::Rejections, Table::Decisions, Table::Payouts];

impl StreamStore {
    pub fn open(dir: &Path) -> Result<StreamStore, StoreError> {
        for t in Table::ALL {
            let tdir = dir.join(t.name());
            fs::create_dir_all(&tdir).map_err(io(&tdir))?;
        }
        Ok(StreamStore { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes files holding stream positions after `committed` (and
    /// temporary files): what was written after the last checkpoint; and
    /// finishes a compaction a crash interrupted. Returns how many files
    /// were removed.
    pub fn recover(&self, committed: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for t in APPEND_TABLES {
            removed += self.finish_compactions(t)?;
        }
        for t in Table::ALL {
            let tdir = self.dir.join(t.name());
            for entry in fs::read_dir(&tdir).map_err(io(&tdir))? {
                let p = entry.map_err(io(&tdir))?.path();
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let stale = name.starts_with('.') || stream_file_last_seq(&name).is_some_and(|last| last > committed);
                if stale {
                    fs::remove_file(&p).map_err(io(&p))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Writes the rows of stream positions `first..=last`, one file per table
    /// that has rows.
    pub fn append(&self, first: u64, last: u64, out: &Output) -> Result<(), StoreError> {
        let name = format!("part-{first:020}-{last:020}.parquet");
        // One thread per table with rows: the encodings and, above all, the
        // fsyncs overlap (a flush's latency is the slowest table's, not the sum).
        std::thread::scope(|scope| {
            let writers: Vec<_> = Table::ALL
                .into_iter()
                .map(|t| {
                    let path = self.dir.join(t.name()).join(&name);
                    scope.spawn(move || -> Result<(), StoreError> {
                        let b =
                            batches::rows(t, out).map_err(|source| StoreError::Arrow { table: t.name(), source })?;
                        if b.num_rows() > 0 {
                            write_file_atomic(&path, t, &b)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            writers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })
    }

    /// The committed part files of a table, oldest first, with their ranges.
    fn parts(&self, t: Table) -> Result<Vec<(u64, u64, PathBuf)>, StoreError> {
        let tdir = self.dir.join(t.name());
        let mut parts = Vec::new();
        for entry in fs::read_dir(&tdir).map_err(io(&tdir))? {
            let p = entry.map_err(io(&tdir))?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let range = name
                .strip_prefix("part-")
                .and_then(|r| r.strip_suffix(".parquet"))
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
            if let Some((first, last)) = range {
                parts.push((first, last, p));
            }
        }
        parts.sort();
        Ok(parts)
    }

    /// Merges the small files of each append table into one when a table
    /// has more than `max_files`. The merged file is written hidden, the
    /// small ones removed, then it is renamed into place; a crash in between
    /// is finished by [`StreamStore::recover`], so no row is ever counted
    /// twice (a reader may briefly miss the merged rows). Returns files merged.
    /// Only files a checkpoint holds (up to `committed`) are merged: a
    /// recovery may remove the later ones.
    pub fn compact(&self, committed: u64, max_files: usize) -> Result<usize, StoreError> {
        use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let mut merged = 0;
        for t in APPEND_TABLES {
            // The newest run of small files: merged files grow no further than
            // COMPACTED_BYTES, and a merge never spans a file it does not read.
            let all: Vec<_> = self.parts(t)?.into_iter().filter(|(_, last, _)| *last <= committed).collect();
            let small = all
                .iter()
                .rev()
                .take_while(|(_, _, p)| fs::metadata(p).map(|m| m.len() < COMPACTED_BYTES).unwrap_or(false))
                .count();
            let parts = &all[all.len() - small..];
            if parts.len() <= max_files.max(2) {
                continue;
            }
            let (first, last) = (parts[0].0, parts[parts.len() - 1].1);
            let mut batches = Vec::new();
            for (_, _, p) in parts {
                let file = File::open(p).map_err(io(p))?;
                let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                    .and_then(|b| b.build())
                    .map_err(|source| StoreError::Parquet { table: t.name(), source })?;
                for b in reader {
                    batches.push(b.map_err(|source| StoreError::Arrow { table: t.name(), source })?);
                }
            }
            let batch = datafusion::arrow::compute::concat_batches(&schema(t), &batches)
                .map_err(|source| StoreError::Arrow { table: t.name(), source })?;
            let tdir = self.dir.join(t.name());
            let done = tdir.join(format!(".part-{first:020}-{last:020}.parquet.compacted"));
            write_file_atomic(&done, t, &batch)?;
            merged += parts.len();
            self.finish_compactions(t)?;
        }
        Ok(merged)
    }

    /// Puts complete merged files in place of the files they replace.
    fn finish_compactions(&self, t: Table) -> Result<usize, StoreError> {
        let tdir = self.dir.join(t.name());
        let mut removed = 0;
        for entry in fs::read_dir(&tdir).map_err(io(&tdir))? {
            let p = entry.map_err(io(&tdir))?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let Some(visible) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".compacted")) else { continue };
            let Some(last) = stream_file_last_seq(visible) else { continue };
            let first: u64 =
                visible.trim_start_matches("part-").split('-').next().and_then(|f| f.parse().ok()).unwrap_or(0);
            for (a, b, old) in self.parts(t)? {
                if a >= first && b <= last {
                    fs::remove_file(&old).map_err(io(&old))?;
                    removed += 1;
                }
            }
            let target = tdir.join(visible);
            fs::rename(&p, &target).map_err(io(&target))?;
        }
        Ok(removed)
    }

    /// Replaces the state tables (orders, lines as of `as_of`) with the
    /// engine's state at stream position `last`.
    pub fn snapshot(&self, engine: &Engine, as_of: DateTime<Utc>, last: u64) -> Result<(), StoreError> {
        replace_snapshot(&self.dir, engine, as_of, &format!("snap-{last:020}.parquet"))
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
