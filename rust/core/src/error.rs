//! The one error type of the core. Every variant names the file or tensor it is about, so a
//! message read in a log without its traceback still says where to look.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused an operation on a file (open, stat, map, read).
    #[error("{path}: cannot {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },

    /// A safetensors header is corrupt or does not match the file (truncated download,
    /// overlapping or out-of-range offsets, unknown dtype, ...).
    #[error("{path}: invalid safetensors header: {reason}")]
    Header { path: PathBuf, reason: String },

    /// The checkpoint as a whole is inconsistent: a shard named by the index is missing, a
    /// tensor appears twice, `config.json` is not JSON, no shard at all.
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// A tensor name that is not in the checkpoint.
    #[error("{path}: no tensor named `{name}`")]
    TensorNotFound { path: PathBuf, name: String },

    /// The routed-expert tensors under a prefix do not form a layout this library reads.
    #[error("{path}: experts at `{prefix}`: {reason}")]
    Layout {
        path: PathBuf,
        prefix: String,
        reason: String,
    },

    /// A load request that cannot be satisfied (wrong destination size, rank, expert id, ...).
    #[error("{path}: experts at `{prefix}`: {reason}")]
    Request {
        path: PathBuf,
        prefix: String,
        reason: String,
    },

    /// A shard was truncated, replaced or rewritten after it was opened.
    #[error("{path}: the file changed after it was opened ({what}); open the checkpoint again")]
    FileChanged { path: PathBuf, what: String },
}

impl Error {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        action: &'static str,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }
}
