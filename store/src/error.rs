//! The store's one error type. Each variant is a kind a caller can act on
//! (retry, pick another platform, free disk space, ...), and each message
//! names the thing it is about: image, blob digest, path. The registry's
//! errors (auth, transport, references) are its own, wrapped whole.

use std::path::PathBuf;

use cstore_os::{Classify, ErrorKind, IoError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid platform {platform:?}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")]
    InvalidPlatform { platform: String },

    /// The registry: a reference, auth, a manifest or blob it would not give.
    #[error(transparent)]
    Registry(#[from] cstore_registry::Error),

    #[error("image {0} is not in the store")]
    ImageNotFound(String),

    #[error("blob {0} is not in the store")]
    BlobNotFound(String),

    #[error("blob {digest} failed verification: its content hashes to {actual}")]
    DigestMismatch { digest: String, actual: String },

    #[error("blob {digest} is {actual} bytes, but its descriptor says {expected}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },

    #[error("{what}: unsupported media type {media_type:?}")]
    UnsupportedMediaType { what: String, media_type: String },

    #[error("{what}: Docker schema 1 manifests are not supported; push the image again with a current client")]
    Schema1 { what: String },

    /// A manifest or index held in the store (or named by an index) over
    /// the registry client's cap.
    #[error("{what} is larger than the {limit} byte limit for manifests and indexes")]
    ManifestTooLarge { what: String, limit: u64 },

    #[error("{what} is {size} bytes, larger than the {limit} byte limit for image configs")]
    ConfigTooLarge { what: String, size: u64, limit: u64 },

    /// The image's config says it runs elsewhere than the platform asked for.
    #[error("image {reference} is for {actual} (its config says so), not for the platform asked for, {wanted}")]
    PlatformMismatch {
        reference: String,
        wanted: String,
        actual: String,
    },

    #[error("{reference}: no manifest for platform {platform} (the index has: {available})")]
    PlatformNotFound {
        reference: String,
        platform: String,
        available: String,
    },

    #[error("malformed {what}: {reason}")]
    Malformed { what: String, reason: String },

    #[error("no space left on the device holding {path} while writing {what}")]
    NoSpace { what: String, path: PathBuf },

    #[error(transparent)]
    Io(cstore_os::IoError),

    /// The metadata database, a lock file, the store's layout.
    #[error(transparent)]
    Os(#[from] cstore_os::Error),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidPlatform { .. } | Error::Malformed { .. } => ErrorKind::InvalidArgument,
            Error::Registry(e) => e.kind(),
            Error::ImageNotFound(_) | Error::BlobNotFound(_) => ErrorKind::NotFound,
            // As containerd's content writer: content that is not what its
            // descriptor says fails its precondition.
            Error::DigestMismatch { .. } | Error::SizeMismatch { .. } => {
                ErrorKind::FailedPrecondition
            }
            Error::UnsupportedMediaType { .. } | Error::Schema1 { .. } => ErrorKind::NotImplemented,
            Error::ManifestTooLarge { .. }
            | Error::ConfigTooLarge { .. }
            | Error::NoSpace { .. } => ErrorKind::ResourceExhausted,
            // containerd: "no match for platform in manifest: not found".
            Error::PlatformMismatch { .. } | Error::PlatformNotFound { .. } => ErrorKind::NotFound,
            Error::Io(e) => e.kind(),
            Error::Os(e) => e.kind(),
        }
    }
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        Error::kind(self)
    }
}

/// Map a write error: ENOSPC becomes `NoSpace`, so callers can say "free disk".
pub(crate) fn write_err(what: &str, path: &std::path::Path, e: std::io::Error) -> Error {
    if is_no_space(&e) {
        Error::NoSpace {
            what: what.to_string(),
            path: path.to_path_buf(),
        }
    } else {
        Error::Io(IoError::new("write", path, e))
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// An io error of the store; a full disk becomes `NoSpace` (what was being
/// written: the path), so every writer says "free disk" the same way.
impl From<IoError> for Error {
    fn from(e: IoError) -> Self {
        if is_no_space(&e.source) {
            Error::NoSpace {
                what: e.path.display().to_string(),
                path: e.path,
            }
        } else {
            Error::Io(e)
        }
    }
}
