//! The snapshotter's error type. The kinds are containerd's, so the gRPC
//! service maps them one to one (NotFound, AlreadyExists, FailedPrecondition,
//! InvalidArgument), plus the failures of the layers below.

use cstore_os::{Classify, ErrorKind};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Io(#[from] cstore_os::IoError),
    /// The snapshot database, a mount, the store's layout.
    #[error(transparent)]
    Os(#[from] cstore_os::Error),
    #[error(transparent)]
    Store(#[from] cstore_store::Error),
    /// A layer that could not be unpacked into its snapshot.
    #[error(transparent)]
    Unpack(#[from] cstore_unpack::Error),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Io(e) => e.kind(),
            Error::Os(e) => e.kind(),
            Error::Store(e) => e.kind(),
            Error::Unpack(e) => e.kind(),
        }
    }
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        Error::kind(self)
    }
}
