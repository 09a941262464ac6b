use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// blockio's error type: what was being probed or done, and why it failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] cstore_os::IoError),
    #[error("{path}: {reason}")]
    NotBlock { path: PathBuf, reason: String },
    #[error("NVMe identify on {path} failed: {source}")]
    Identify {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
