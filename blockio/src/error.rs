use std::path::PathBuf;

use cstore_os::{Classify, ErrorKind};

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

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io(e) => e.kind(),
            Error::NotBlock { .. } => ErrorKind::InvalidArgument,
            Error::Identify { source, .. } => ErrorKind::of_io(source),
        }
    }
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        Error::kind(self)
    }
}
