//! The unpack crate's one error type. Each message names the image, the
//! layer and, where there is one, the entry.

use cstore_os::{Classify, ErrorKind, IoError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layer cannot be unpacked as it is: a malformed or hostile
    /// archive, a bomb, or a failure writing an entry.
    #[error("image {image}: layer {layer}{}: {reason}", entry.as_ref().map(|e| format!(", entry {e:?}")).unwrap_or_default())]
    Layer {
        image: String,
        layer: String,
        entry: Option<String>,
        reason: String,
        /// The errno of the system call that failed, if one did.
        errno: Option<i32>,
    },

    #[error("image {image}: layer {layer}: uncompressed content hashes to {actual}, but the config's diff_id is {expected}")]
    DiffIdMismatch {
        image: String,
        layer: String,
        expected: String,
        actual: String,
    },

    #[error(transparent)]
    Io(#[from] IoError),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Layer { errno, .. } => layer_kind(*errno),
            // The layer is not what its image says it is.
            Error::DiffIdMismatch { .. } => ErrorKind::FailedPrecondition,
            Error::Io(e) => e.kind(),
        }
    }
}

/// A layer that cannot be unpacked is bad input, unless the system refused
/// (a full disk, no permission): what a hostile or malformed layer causes
/// (a path through a symlink or out of the layer, a file where a directory
/// should be) is the layer's fault whatever the errno.
fn layer_kind(errno: Option<i32>) -> ErrorKind {
    match errno {
        None
        | Some(
            libc::ELOOP
            | libc::EXDEV
            | libc::ENOTDIR
            | libc::EISDIR
            | libc::EEXIST
            | libc::ENOENT
            | libc::ENOTEMPTY
            | libc::EINVAL
            | libc::ENAMETOOLONG,
        ) => ErrorKind::InvalidArgument,
        Some(n) => ErrorKind::from_errno(n),
    }
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        Error::kind(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_layers_are_invalid_full_disks_exhausted() {
        let layer = |errno| Error::Layer {
            image: "i".into(),
            layer: "l".into(),
            entry: None,
            reason: "r".into(),
            errno,
        };
        assert_eq!(layer(None).kind(), ErrorKind::InvalidArgument);
        assert_eq!(layer(Some(libc::ELOOP)).kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            layer(Some(libc::ENOTDIR)).kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            layer(Some(libc::ENOSPC)).kind(),
            ErrorKind::ResourceExhausted
        );
        assert_eq!(
            layer(Some(libc::EDQUOT)).kind(),
            ErrorKind::ResourceExhausted
        );
        assert_eq!(
            layer(Some(libc::EACCES)).kind(),
            ErrorKind::PermissionDenied
        );
        // The message is the same with or without an errno.
        assert_eq!(layer(Some(libc::ENOSPC)).to_string(), "image i: layer l: r");
    }
}
