use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// blockio's error type: what was being probed or done, and why it failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    NotBlock { path: PathBuf, reason: String },
    #[error("NVMe identify on {path} failed: {source}")]
    Identify {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
