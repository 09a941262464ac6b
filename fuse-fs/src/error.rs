use std::path::PathBuf;

use cstore_os::{Classify, ErrorKind};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// fuse-fs's error type: what was being done, on what, and why it failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on a path failed (mount, open, the state directory, fusectl).
    #[error(transparent)]
    Io(#[from] cstore_os::IoError),
    /// /dev/fuse is missing or cannot be opened: no FUSE on this machine (or no
    /// permission to use it).
    #[error("/dev/fuse: {0} (is the fuse module loaded and are we root?)")]
    NoFuse(#[source] std::io::Error),
    /// The /dev/fuse connection failed (read, write or ioctl).
    #[error("FUSE connection {conn}: {op}: {source}")]
    Device {
        op: &'static str,
        conn: String,
        #[source]
        source: std::io::Error,
    },
    /// The connection is gone: the filesystem was unmounted or aborted.
    #[error("FUSE connection {0}: unmounted or aborted")]
    Disconnected(String),
    /// The INIT handshake could not be completed.
    #[error("FUSE INIT on {mountpoint}: {reason}")]
    Handshake { mountpoint: PathBuf, reason: String },
    /// Passthrough was required but the kernel did not grant it.
    #[error("FUSE passthrough on {0}: the kernel did not offer it (needs Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)")]
    NoPassthrough(PathBuf),
    /// Saved session state cannot be used (missing, unreadable, other version).
    #[error("FUSE session state in {dir}: {reason}")]
    State { dir: PathBuf, reason: String },
    /// No FUSE mount was found where one was expected.
    #[error("no FUSE mount of ours at {0}")]
    NotMounted(PathBuf),
    /// A fd store (keeper or systemd) refused or failed a request.
    #[error("fd store {store}: {reason}")]
    FdStore { store: String, reason: String },
    /// A cstore_os helper failed other than in a system call (its io errors are `Io`).
    #[error(transparent)]
    Os(cstore_os::Error),
    /// A lazy layer's index was refused (malformed, or past a limit).
    #[error("layer {layer}: index: {source}")]
    Index {
        layer: String,
        #[source]
        source: cstore_index::Error,
    },
    /// A span of a lazy layer could not be made local: the source failed (try again
    /// later) or what it returned did not match the index's digest (nothing of it
    /// was used). Readers of it got EIO.
    #[error("layer {layer}: span {span}: {reason}")]
    Span {
        layer: String,
        span: usize,
        reason: String,
    },
    /// A lazy layer's completion failed verification (blob digest, diff_id, or the
    /// entry table rebuilt from the tar differs from the index): its tree and cache
    /// were discarded.
    #[error("layer {layer}: verification failed, the layer was discarded: {reason}")]
    Completion { layer: String, reason: String },
    /// A lazy layer cannot go on (shutting down, or its tree cannot be made).
    #[error("layer {layer}: {reason}")]
    Layer { layer: String, reason: String },
    /// A name for the fd store that it cannot hold.
    #[error("fd store name {0:?}: must be 1-200 bytes of [A-Za-z0-9._:@+-]")]
    BadName(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io(cstore_os::IoError::new(op, path, source))
    }

    pub(crate) fn store(store: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::FdStore {
            store: store.to_string(),
            reason: reason.into(),
        }
    }
}

impl From<cstore_os::Error> for Error {
    fn from(e: cstore_os::Error) -> Self {
        match e {
            cstore_os::Error::Io(e) => Error::Io(e),
            e => Error::Os(e),
        }
    }
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io(e) => e.kind(),
            Error::Os(e) => e.kind(),
            Error::NoFuse(_) | Error::Handshake { .. } | Error::State { .. } => {
                ErrorKind::FailedPrecondition
            }
            Error::Device { source, .. } => ErrorKind::of_io(source),
            Error::Disconnected(_) | Error::FdStore { .. } => ErrorKind::Unavailable,
            Error::NoPassthrough(_) => ErrorKind::NotImplemented,
            Error::NotMounted(_) => ErrorKind::NotFound,
            Error::BadName(_) => ErrorKind::InvalidArgument,
            // A hostile or malformed index: the image's fault.
            Error::Index { .. } => ErrorKind::InvalidArgument,
            // The source failed or sent bytes that are not the layer's: try again.
            Error::Span { .. } => ErrorKind::Unavailable,
            Error::Completion { .. } => ErrorKind::DataLoss,
            Error::Layer { .. } => ErrorKind::FailedPrecondition,
        }
    }
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        Error::kind(self)
    }
}
