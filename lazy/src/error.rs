//! The crate's one error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Registry(#[from] cstore_registry::Error),
    #[error(transparent)]
    Store(#[from] cstore_store::Error),
    #[error(transparent)]
    Index(#[from] cstore_index::Error),
    #[error(transparent)]
    Snapshotter(#[from] cstore_snapshotter::Error),
    #[error(transparent)]
    Unpack(#[from] cstore_unpack::Error),
    #[error(transparent)]
    Fuse(#[from] cstore_fuse_fs::Error),
    /// Something the registry holds about an image or layer is not what it
    /// must be (an index artifact, a TOC); names the thing.
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl cstore_os::Classify for Error {
    fn kind(&self) -> cstore_os::ErrorKind {
        use cstore_os::ErrorKind;
        match self {
            Error::Registry(e) => e.kind(),
            Error::Store(e) => e.kind(),
            Error::Snapshotter(e) => e.kind(),
            Error::Unpack(e) => e.kind(),
            Error::Fuse(e) => e.kind(),
            Error::Index(_) | Error::Invalid { .. } => ErrorKind::InvalidArgument,
            Error::Io { source, .. } => ErrorKind::of_io(source),
        }
    }
}
