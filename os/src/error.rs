//! Error kinds as containerd's errdefs has them, the io error every crate
//! shares, and this crate's own error type.
//!
//! Every cstore crate's error has a `kind()` (and implements [`Classify`]):
//! the gRPC service turns kinds into status codes as containerd's errgrpc
//! does, the CLI into exit codes. An error that wraps another delegates its
//! kind to the inner one; an io error's kind comes from its errno.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// containerd's errdefs kinds (github.com/containerd/errdefs), plus the two
/// that Go takes from a context (Canceled, DeadlineExceeded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Unknown,
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Conflict,
    NotModified,
    Aborted,
    OutOfRange,
    NotImplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
    Canceled,
    DeadlineExceeded,
}

impl ErrorKind {
    /// Every kind, for tables and tests.
    pub const ALL: [ErrorKind; 18] = [
        ErrorKind::Unknown,
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::PermissionDenied,
        ErrorKind::ResourceExhausted,
        ErrorKind::FailedPrecondition,
        ErrorKind::Conflict,
        ErrorKind::NotModified,
        ErrorKind::Aborted,
        ErrorKind::OutOfRange,
        ErrorKind::NotImplemented,
        ErrorKind::Internal,
        ErrorKind::Unavailable,
        ErrorKind::DataLoss,
        ErrorKind::Unauthenticated,
        ErrorKind::Canceled,
        ErrorKind::DeadlineExceeded,
    ];

    /// The kind of an errno. Not found, exists, no permission, no space and
    /// the like map one to one; an object of the wrong type or in use is a
    /// failed precondition; what the network refuses is unavailable.
    pub fn from_errno(errno: i32) -> ErrorKind {
        match errno {
            libc::ENOENT | libc::ENXIO | libc::ENODEV | libc::ESRCH => ErrorKind::NotFound,
            libc::EEXIST => ErrorKind::AlreadyExists,
            libc::EPERM | libc::EACCES => ErrorKind::PermissionDenied,
            libc::ENOSPC | libc::EDQUOT | libc::ENOMEM | libc::EMFILE | libc::ENFILE => {
                ErrorKind::ResourceExhausted
            }
            libc::EINVAL | libc::ENAMETOOLONG | libc::E2BIG | libc::ELOOP | libc::EXDEV => {
                ErrorKind::InvalidArgument
            }
            libc::ENOTEMPTY | libc::EBUSY | libc::EROFS | libc::ENOTDIR | libc::EISDIR => {
                ErrorKind::FailedPrecondition
            }
            libc::EAGAIN
            | libc::ECONNREFUSED
            | libc::ECONNRESET
            | libc::ECONNABORTED
            | libc::ENETUNREACH
            | libc::EHOSTUNREACH
            | libc::EPIPE => ErrorKind::Unavailable,
            libc::ETIMEDOUT => ErrorKind::DeadlineExceeded,
            libc::ECANCELED => ErrorKind::Canceled,
            libc::EINTR => ErrorKind::Aborted,
            libc::ENOSYS | libc::EOPNOTSUPP => ErrorKind::NotImplemented,
            _ => ErrorKind::Unknown,
        }
    }

    /// The kind of an io error: its errno's, else what std's kind says.
    pub fn of_io(e: &io::Error) -> ErrorKind {
        if let Some(errno) = e.raw_os_error() {
            return ErrorKind::from_errno(errno);
        }
        match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => ErrorKind::InvalidArgument,
            io::ErrorKind::TimedOut => ErrorKind::DeadlineExceeded,
            io::ErrorKind::Interrupted => ErrorKind::Aborted,
            io::ErrorKind::OutOfMemory => ErrorKind::ResourceExhausted,
            io::ErrorKind::Unsupported => ErrorKind::NotImplemented,
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ErrorKind::Unavailable,
            _ => ErrorKind::Unknown,
        }
    }

    /// containerd's name of the kind ("not found", ...), as errdefs prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unknown => "unknown",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::ResourceExhausted => "resource exhausted",
            ErrorKind::FailedPrecondition => "failed precondition",
            ErrorKind::Conflict => "conflict",
            ErrorKind::NotModified => "not modified",
            ErrorKind::Aborted => "aborted",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::NotImplemented => "not implemented",
            ErrorKind::Internal => "internal",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DataLoss => "data loss",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Canceled => "canceled",
            ErrorKind::DeadlineExceeded => "deadline exceeded",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error that knows its kind: every cstore crate's error type, so code
/// that holds one behind `dyn` (the runtime's view of the snapshot tree) can
/// still ask.
pub trait Classify {
    fn kind(&self) -> ErrorKind;
}

/// A system call on a path failed: what was being done, on what, and why.
/// The one io error of every cstore crate (each wraps it transparently).
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}", path = path.display())]
pub struct IoError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl IoError {
    pub fn new(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> IoError {
        IoError {
            op,
            path: path.into(),
            source,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        ErrorKind::of_io(&self.source)
    }

    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl Classify for IoError {
    fn kind(&self) -> ErrorKind {
        IoError::kind(self)
    }
}

/// `result.op("open", path)?`: an io result with its operation and path.
pub trait IoResultExt<T> {
    fn op(self, op: &'static str, path: impl AsRef<Path>) -> Result<T, IoError>;
}

impl<T> IoResultExt<T> for io::Result<T> {
    fn op(self, op: &'static str, path: impl AsRef<Path>) -> Result<T, IoError> {
        self.map_err(|e| IoError::new(op, path.as_ref(), e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// This crate's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] IoError),
    /// Something asked of a helper that it cannot do (a mount type it does
    /// not know).
    #[error("{0}")]
    InvalidArgument(String),
    /// A database file (feature `db`): which one, and what went wrong.
    #[error("{what} {path}: {message}", path = path.display())]
    Db {
        what: &'static str,
        path: PathBuf,
        message: String,
        kind: ErrorKind,
    },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io(e) => e.kind(),
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Db { kind, .. } => *kind,
        }
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
    fn errnos_map_to_their_kinds() {
        for (errno, kind) in [
            (libc::ENOENT, ErrorKind::NotFound),
            (libc::EEXIST, ErrorKind::AlreadyExists),
            (libc::EACCES, ErrorKind::PermissionDenied),
            (libc::EPERM, ErrorKind::PermissionDenied),
            (libc::ENOSPC, ErrorKind::ResourceExhausted),
            (libc::EDQUOT, ErrorKind::ResourceExhausted),
            (libc::EINVAL, ErrorKind::InvalidArgument),
            (libc::ENOTEMPTY, ErrorKind::FailedPrecondition),
            (libc::EBUSY, ErrorKind::FailedPrecondition),
            (libc::ECONNREFUSED, ErrorKind::Unavailable),
            (libc::ETIMEDOUT, ErrorKind::DeadlineExceeded),
            (libc::ENOSYS, ErrorKind::NotImplemented),
            (libc::EIO, ErrorKind::Unknown),
        ] {
            let e = IoError::new("open", "/x", io::Error::from_raw_os_error(errno));
            assert_eq!(e.kind(), kind, "errno {errno}");
            assert_eq!(Error::from(e).kind(), kind, "wrapped, errno {errno}");
        }
        let plain = io::Error::new(io::ErrorKind::InvalidInput, "NUL in path");
        assert_eq!(ErrorKind::of_io(&plain), ErrorKind::InvalidArgument);
        let e = IoError::new("read", "/a b", io::Error::from_raw_os_error(libc::ENOENT));
        assert!(e.to_string().starts_with("read /a b: "), "{e}");
    }
}
