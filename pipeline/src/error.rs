//! Why the pipeline stopped: who is at fault is in the variant.

/// An error that stops the live pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// External: the broker.
    #[error(transparent)]
    Nats(#[from] afflio_ingest::nats::NatsError),
    /// External: the broker, after connecting.
    #[error("broker: {0}")]
    Broker(String),
    /// External (the disk) or a bug (rows that do not fit their schema).
    #[error(transparent)]
    Store(#[from] afflio_sinks::StoreError),
    /// External: the state directory.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// A bug in the pipeline.
    #[error(transparent)]
    Checkpoint(#[from] afflio_engine::CheckpointError),
    /// External: the configuration given.
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration's.
    #[error("configuration: {0}")]
    Config(String),
    /// A bug in the pipeline.
    #[error("internal error: {0}")]
    Internal(String),
}
