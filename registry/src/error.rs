//! The registry client's one error type. Each message names the registry,
//! and the scope, manifest or blob it is about; each variant is a kind a
//! caller can act on (retry, re-authenticate, give credentials, ...).

use cstore_os::{Classify, ErrorKind};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    #[error("invalid digest {digest:?}: {reason}")]
    InvalidDigest { digest: String, reason: String },

    #[error("{registry}: authentication required for {scope}: {message}")]
    Unauthorized {
        registry: String,
        scope: String,
        message: String,
    },

    #[error("{registry}: access to {scope} denied: {message}")]
    Denied {
        registry: String,
        scope: String,
        message: String,
    },

    #[error("{registry}: {what} not found: {message}")]
    NotFound {
        registry: String,
        what: String,
        message: String,
    },

    #[error("{registry}: {what}: HTTP {status}: {message}")]
    Http {
        registry: String,
        what: String,
        status: u16,
        message: String,
    },

    #[error("{registry}: {what}: {message}")]
    Transport {
        registry: String,
        what: String,
        message: String,
    },

    #[error("{what} is larger than the {limit} byte limit for manifests and indexes")]
    ManifestTooLarge { what: String, limit: u64 },

    /// A registry or token server answer (not a manifest, config or blob)
    /// over its cap.
    #[error("{what} is larger than the {limit} byte limit for {kind}")]
    ResponseTooLarge {
        what: String,
        limit: u64,
        kind: &'static str,
    },

    /// The registry sent a request on to another host (blob storage), which
    /// wants credentials: none of the registry's are ever sent there.
    #[error("{registry}: {what}: redirected to {target}, which asks for authentication ({challenge}); credentials and tokens for {registry} go only to {registry} and the token realm it names")]
    RedirectAuth {
        registry: String,
        what: String,
        target: String,
        challenge: String,
    },

    /// A redirect that cannot be followed (no usable Location, a scheme
    /// other than http(s), too many hops).
    #[error("{registry}: {what}: {message}")]
    Redirect {
        registry: String,
        what: String,
        message: String,
    },

    /// What was read does not hash to the digest it was asked by.
    #[error("blob {digest} failed verification: its content hashes to {actual}")]
    DigestMismatch { digest: String, actual: String },

    /// A blob body longer than its descriptor says.
    #[error("blob {digest} is {actual} bytes, but its descriptor says {expected}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },

    #[error("malformed {what}: {reason}")]
    Malformed { what: String, reason: String },

    /// A ranged read asked for what cannot be given (too much at once).
    #[error("{what}: {reason}")]
    InvalidRange { what: String, reason: String },

    /// A ranged read reaches past the end of the blob.
    #[error("{what}: out of range: {reason}")]
    OutOfRange { what: String, reason: String },
}

impl Error {
    /// Worth trying again as it is (network hiccups, registry overload).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Http { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidReference { .. } | Error::InvalidDigest { .. } => {
                ErrorKind::InvalidArgument
            }
            Error::Unauthorized { .. } | Error::RedirectAuth { .. } => ErrorKind::Unauthenticated,
            Error::Denied { .. } => ErrorKind::PermissionDenied,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Http { status, .. } => http_kind(*status),
            Error::Transport { .. } | Error::Redirect { .. } => ErrorKind::Unavailable,
            Error::ManifestTooLarge { .. } | Error::ResponseTooLarge { .. } => {
                ErrorKind::ResourceExhausted
            }
            // As containerd's content writer: an unexpected digest or size
            // at commit is a failed precondition.
            Error::DigestMismatch { .. } | Error::SizeMismatch { .. } => {
                ErrorKind::FailedPrecondition
            }
            Error::Malformed { .. } | Error::InvalidRange { .. } => ErrorKind::InvalidArgument,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
        }
    }
}

/// The kind of an HTTP status a registry answered with (after retries).
fn http_kind(status: u16) -> ErrorKind {
    match status {
        400 => ErrorKind::InvalidArgument,
        401 => ErrorKind::Unauthenticated,
        403 => ErrorKind::PermissionDenied,
        404 => ErrorKind::NotFound,
        409 => ErrorKind::Conflict,
        412 => ErrorKind::FailedPrecondition,
        416 => ErrorKind::OutOfRange,
        429 => ErrorKind::Unavailable,
        501 => ErrorKind::NotImplemented,
        500..=599 => ErrorKind::Unavailable,
        _ => ErrorKind::Unknown,
    }
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        Error::kind(self)
    }
}
