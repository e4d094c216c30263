//! The engine's durable state: behind one small interface, [`StateBackend`],
//! so that the consumer does not care how checkpoints are kept.
//!
//! The backend here, [`FileBackend`], keeps an image of the engine and the
//! deltas written since, listed by a manifest that is replaced atomically:
//! a checkpoint writes only what changed (a delta), and when the deltas
//! outgrow the image they are folded into a new image on a background
//! thread, from the files (the consumer's memory is not touched). Restoring
//! is the image plus the deltas, in order.

mod files;

use std::sync::Arc;
use std::time::Duration;

use afflio_engine::rules::Rules;
use afflio_engine::{CheckpointError, Engine};

pub use files::FileBackend;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// External: the disk.
    #[error("engine state at {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// External: a manifest or checkpoint file damaged or from another version.
    #[error("engine state at {path}: {detail}")]
    Corrupt { path: std::path::PathBuf, detail: String },
    #[error("engine checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
}

/// The engine as the last durable checkpoint left it.
pub struct Restored {
    pub engine: Engine,
    /// The stream position the engine has applied up to (0: nothing yet).
    pub position: u64,
    /// How long reading and rebuilding took.
    pub took: Duration,
    pub image_bytes: u64,
    pub delta_bytes: u64,
    pub deltas: usize,
}

/// What a checkpoint wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    pub bytes: u64,
    pub took: Duration,
    /// The size of the chain after it: image and deltas.
    pub image_bytes: u64,
    pub delta_bytes: u64,
    pub deltas: usize,
}

/// Where the engine's checkpoints live.
pub trait StateBackend: Send {
    /// The engine at the last durable checkpoint (a new engine at position
    /// 0 when there is none).
    fn restore(&mut self, rules: Arc<Rules>) -> Result<Restored, StateError>;
    /// Makes a delta (the engine's changes up to `position`) durable.
    fn save(&mut self, position: u64, delta: &[u8]) -> Result<Saved, StateError>;
    /// Folds the deltas into a new image when they outgrow it, off the
    /// caller's thread; picks up a finished fold. Never blocks for long.
    fn maintain(&mut self, rules: &Arc<Rules>) -> Result<Option<Compacted>, StateError>;
    /// Waits for a fold under way to finish (at shutdown).
    fn finish(&mut self) -> Result<(), StateError>;
}

/// A fold of deltas into a new image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    pub deltas_folded: usize,
    pub image_bytes: u64,
    pub took: Duration,
}
