//! The store's one error type. Each variant is a kind a caller can act on
//! (retry, re-authenticate, pick another platform, free disk space, ...), and
//! each message names the thing it is about: image, blob digest, registry, path.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    #[error("invalid digest {digest:?}: {reason}")]
    InvalidDigest { digest: String, reason: String },

    #[error("invalid platform {platform:?}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")]
    InvalidPlatform { platform: String },

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

    #[error("{what}: unsupported media type {media_type:?}")]
    UnsupportedMediaType { what: String, media_type: String },

    #[error("{what}: Docker schema 1 manifests are not supported; push the image again with a current client")]
    Schema1 { what: String },

    #[error("{what} is larger than the {limit} byte limit for manifests and indexes")]
    ManifestTooLarge { what: String, limit: u64 },

    #[error("{what} is {size} bytes, larger than the {limit} byte limit for image configs")]
    ConfigTooLarge { what: String, size: u64, limit: u64 },

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

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("image {image}: layer {layer}{}: {reason}", entry.as_ref().map(|e| format!(", entry {e:?}")).unwrap_or_default())]
    Unpack {
        image: String,
        layer: String,
        entry: Option<String>,
        reason: String,
    },

    #[error("image {image}: layer {layer}: uncompressed content hashes to {actual}, but the config's diff_id is {expected}")]
    DiffIdMismatch {
        image: String,
        layer: String,
        expected: String,
        actual: String,
    },

    #[error("metadata database {path}: {message}")]
    Db { path: PathBuf, message: String },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Worth trying again as it is (network hiccups, registry overload).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Http { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// Map a write error: ENOSPC becomes `NoSpace`, so callers can say "free disk".
pub(crate) fn write_err(what: &str, path: &std::path::Path, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        Error::NoSpace {
            what: what.to_string(),
            path: path.to_path_buf(),
        }
    } else {
        Error::io("write", path, e)
    }
}
