//! Checkpoints as files: `MANIFEST` names an image and the deltas after it.
//!
//! A save writes one new delta file (synced), then a new manifest (written
//! hidden, synced, renamed over the old one, directory synced): the
//! manifest is the commit point, so a crash leaves either the old chain or
//! the new one. A fold (compaction) writes a new image from the files on a
//! background thread; the manifest is switched to it when it is done, and
//! the files it replaces are deleted only after that.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use afflio_engine::rules::Rules;
use afflio_engine::Engine;
use serde::{Deserialize, Serialize};

use super::{Compacted, Restored, Saved, StateBackend, StateError};

const MANIFEST: &str = "MANIFEST";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct FileRef {
    name: String,
    bytes: u64,
    /// The stream position the engine had applied up to when written.
    position: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    /// The position of the newest file of the chain.
    position: u64,
    image: FileRef,
    deltas: Vec<FileRef>,
    /// The next file number.
    next: u64,
}

impl Manifest {
    fn delta_bytes(&self) -> u64 {
        self.deltas.iter().map(|d| d.bytes).sum()
    }
}

/// A finished fold: the new image and how many deltas (from the front) it holds.
struct Fold {
    image: FileRef,
    folded: usize,
    took: Duration,
}

/// When deltas are folded into a new image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FoldPolicy {
    /// Fold when the deltas add up to this share of the image...
    pub ratio: f64,
    /// ...and at least this many bytes,
    pub min_bytes: u64,
    /// or when there are this many deltas.
    pub max_deltas: usize,
}

impl Default for FoldPolicy {
    fn default() -> Self {
        FoldPolicy { ratio: 1.0, min_bytes: 16 << 20, max_deltas: 2_000 }
    }
}

/// The engine's checkpoints in a directory.
pub struct FileBackend {
    dir: PathBuf,
    manifest: Manifest,
    policy: FoldPolicy,
    folding: Option<(usize, JoinHandle<Result<Fold, StateError>>)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl FileBackend {
    pub fn open(dir: &Path) -> Result<FileBackend, StateError> {
        Self::with_policy(dir, FoldPolicy::default())
    }

    pub fn with_policy(dir: &Path, policy: FoldPolicy) -> Result<FileBackend, StateError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(MANIFEST);
        let manifest = match fs::read(&path) {
            Ok(bytes) => {
                let m: Manifest = serde_json::from_slice(&bytes)
                    .map_err(|e| StateError::Corrupt { path: path.clone(), detail: format!("not a manifest: {e}") })?;
                if m.format != FORMAT {
                    return Err(StateError::Corrupt {
                        path,
                        detail: format!("manifest format {} (this version reads {FORMAT})", m.format),
                    });
                }
                m
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
            Err(e) => return Err(io(&path)(e)),
        };
        Ok(FileBackend { dir: dir.to_path_buf(), manifest, policy, folding: None })
    }

    fn file_name(&mut self, kind: &str) -> String {
        let n = self.manifest.next;
        self.manifest.next += 1;
        format!("{kind}-{n:012}.ckpt")
    }

    fn write_manifest(&self) -> Result<(), StateError> {
        let path = self.dir.join(MANIFEST);
        let tmp = self.dir.join(".MANIFEST.tmp");
        let bytes = serde_json::to_vec_pretty(&self.manifest).expect("a manifest serializes");
        write_synced(&tmp, &bytes)?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.dir)
    }

    /// Removes files the manifest does not name (left by a crash).
    fn remove_strays(&self) -> Result<(), StateError> {
        let mut keep: Vec<&str> = self.manifest.deltas.iter().map(|d| d.name.as_str()).collect();
        keep.push(&self.manifest.image.name);
        keep.push(MANIFEST);
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let p = entry.map_err(io(&self.dir))?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let ours = name.ends_with(".ckpt") || name.ends_with(".tmp");
            if ours && !keep.contains(&name.as_str()) {
                fs::remove_file(&p).map_err(io(&p))?;
            }
        }
        Ok(())
    }

    fn read(&self, f: &FileRef) -> Result<Vec<u8>, StateError> {
        let path = self.dir.join(&f.name);
        let bytes = fs::read(&path).map_err(io(&path))?;
        if bytes.len() as u64 != f.bytes {
            return Err(StateError::Corrupt {
                path,
                detail: format!("{} bytes, the manifest says {}", bytes.len(), f.bytes),
            });
        }
        Ok(bytes)
    }

    fn fold_due(&self) -> bool {
        let m = &self.manifest;
        let deltas = m.delta_bytes();
        let big = deltas >= self.policy.min_bytes && deltas as f64 >= m.image.bytes as f64 * self.policy.ratio;
        !m.deltas.is_empty() && (big || m.deltas.len() >= self.policy.max_deltas)
    }

    /// The manifest's chain, for tests and metrics: (image bytes, delta bytes, deltas).
    pub fn chain(&self) -> (u64, u64, usize) {
        (self.manifest.image.bytes, self.manifest.delta_bytes(), self.manifest.deltas.len())
    }
}

impl StateBackend for FileBackend {
    fn restore(&mut self, rules: Arc<Rules>) -> Result<Restored, StateError> {
        let started = Instant::now();
        if self.manifest.image.name.is_empty() {
            // No checkpoint yet: the chain starts with the image of a new engine.
            let engine = Engine::new(rules);
            let bytes = engine.checkpoint()?;
            let name = self.file_name("image");
            write_synced(&self.dir.join(&name), &bytes)?;
            self.manifest = Manifest {
                format: FORMAT,
                position: 0,
                image: FileRef { name, bytes: bytes.len() as u64, position: 0 },
                deltas: Vec::new(),
                next: self.manifest.next,
            };
            self.write_manifest()?;
            self.remove_strays()?;
            return Ok(Restored {
                engine,
                position: 0,
                took: started.elapsed(),
                image_bytes: bytes.len() as u64,
                delta_bytes: 0,
                deltas: 0,
            });
        }
        self.remove_strays()?;
        let image = self.read(&self.manifest.image)?;
        let deltas: Vec<Vec<u8>> = self.manifest.deltas.iter().map(|d| self.read(d)).collect::<Result<_, _>>()?;
        let engine = Engine::restore_chain(rules, &image, deltas.iter().map(Vec::as_slice)).map_err(|e| {
            StateError::Corrupt { path: self.dir.join(MANIFEST), detail: format!("the chain does not restore: {e}") }
        })?;
        Ok(Restored {
            engine,
            position: self.manifest.position,
            took: started.elapsed(),
            image_bytes: self.manifest.image.bytes,
            delta_bytes: self.manifest.delta_bytes(),
            deltas: self.manifest.deltas.len(),
        })
    }

    fn save(&mut self, position: u64, delta: &[u8]) -> Result<Saved, StateError> {
        let started = Instant::now();
        let name = self.file_name("delta");
        write_synced(&self.dir.join(&name), delta)?;
        self.manifest.deltas.push(FileRef { name, bytes: delta.len() as u64, position });
        self.manifest.position = position;
        fail_point("state-before-manifest");
        self.write_manifest()?;
        Ok(Saved {
            bytes: delta.len() as u64,
            took: started.elapsed(),
            image_bytes: self.manifest.image.bytes,
            delta_bytes: self.manifest.delta_bytes(),
            deltas: self.manifest.deltas.len(),
        })
    }

    fn maintain(&mut self, rules: &Arc<Rules>) -> Result<Option<Compacted>, StateError> {
        if self.folding.is_some() {
            return self.pick_up_fold();
        }
        if self.fold_due() {
            self.start_fold(rules)?;
        }
        Ok(None)
    }

    fn finish(&mut self) -> Result<(), StateError> {
        if let Some((_, handle)) = &self.folding {
            while !handle.is_finished() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.pick_up_fold().map(|_| ())
    }
}

impl FileBackend {
    /// Switches the manifest to a finished fold's image.
    fn pick_up_fold(&mut self) -> Result<Option<Compacted>, StateError> {
        if !self.folding.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            return Ok(None);
        }
        let (_, handle) = self.folding.take().expect("checked above");
        let fold = handle
            .join()
            .map_err(|_| StateError::Corrupt { path: self.dir.clone(), detail: "the fold panicked".into() })??;
        let old_image = std::mem::replace(&mut self.manifest.image, fold.image);
        let folded: Vec<FileRef> = self.manifest.deltas.drain(..fold.folded).collect();
        self.write_manifest()?;
        for f in folded.iter().chain(std::iter::once(&old_image)) {
            let p = self.dir.join(&f.name);
            fs::remove_file(&p).map_err(io(&p))?;
        }
        Ok(Some(Compacted { deltas_folded: fold.folded, image_bytes: self.manifest.image.bytes, took: fold.took }))
    }

    /// Folds the current deltas into a new image on a thread.
    fn start_fold(&mut self, rules: &Arc<Rules>) -> Result<(), StateError> {
        let image = self.manifest.image.clone();
        let deltas = self.manifest.deltas.clone();
        let position = deltas.last().map_or(image.position, |d| d.position);
        let name = self.file_name("image");
        // The number is taken now: the manifest that names the image comes later.
        self.write_manifest()?;
        let dir = self.dir.clone();
        let rules = rules.clone();
        let n = deltas.len();
        let handle = std::thread::Builder::new()
            .name("afflio-state-fold".into())
            .spawn(move || -> Result<Fold, StateError> {
                let started = Instant::now();
                let reader = FileBackend {
                    dir: dir.clone(),
                    manifest: Manifest::default(),
                    policy: FoldPolicy::default(),
                    folding: None,
                };
                let img = reader.read(&image)?;
                let ds: Vec<Vec<u8>> = deltas.iter().map(|d| reader.read(d)).collect::<Result<_, _>>()?;
                let engine = Engine::restore_chain(rules, &img, ds.iter().map(Vec::as_slice))?;
                drop(ds);
                let bytes = engine.checkpoint()?;
                drop(engine);
                write_synced(&dir.join(&name), &bytes)?;
                Ok(Fold {
                    image: FileRef { name, bytes: bytes.len() as u64, position },
                    folded: n,
                    took: started.elapsed(),
                })
            })
            .map_err(io(&self.dir))?;
        self.folding = Some((n, handle));
        Ok(())
    }
}

/// A fault point for the crash tests (see `afflio_sinks`): the process dies
/// here as under `kill -9` when `FAILPOINTS=<name>=return` is set.
fn fail_point(name: &str) {
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("afflio: fault point {name}: aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests;
