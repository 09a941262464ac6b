//! The runtime crate's one error type: what a caller of `run`, the cgroup
//! writer, the id mapping or the container records can act on.

use std::io;

use cstore_os::{Classify, ErrorKind};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Cgroups.
    #[error("no cgroup hierarchy here has the io controller (no v1 blkio mount, no io in cgroup2's controllers)")]
    NoIoController,
    #[error("invalid rate {value:?}: {reason}")]
    InvalidRate { value: String, reason: String },
    #[error(transparent)]
    Io(#[from] cstore_os::IoError),
    // The container.
    #[error("container spec: {0}")]
    Spec(String),
    #[error("container {id}: {message}")]
    Runtime { id: String, message: String },
    /// A command, environment entry, working directory, hostname or id
    /// that no container can be started with.
    #[error("{0}")]
    Input(String),
    /// The init did not `stage` in time; what the start made is gone.
    #[error("container {id}: its init did not {stage} within {}s; it was killed, with everything the start made", after.as_secs_f64())]
    StartTimeout {
        id: String,
        stage: &'static str,
        after: std::time::Duration,
    },
    /// A signal to cstore stopped the start; what it made is gone.
    #[error("container {id}: start interrupted by {signal}")]
    Interrupted { id: String, signal: String },
    /// The init could not run the command (exec failed, or it ended first).
    #[error("container {id}: could not run its command: {reason}")]
    NotStarted { id: String, reason: String },
    #[error("container record {path}: {message}")]
    Record { path: PathBuf, message: String },
    #[error("user {user:?}: {reason}")]
    User { user: String, reason: String },
    // User namespaces.
    #[error("--userns {value:?}: {reason} (expected auto, host or BASE:COUNT, e.g. 100000:65536)")]
    InvalidUserns { value: String, reason: String },
    #[error("{path}: {message}")]
    SubIds { path: String, message: String },
    #[error("user namespace for id-mapped mounts: {0}")]
    UsernsCreate(#[source] io::Error),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            // The host lacks what was asked of it.
            Error::NoIoController | Error::SubIds { .. } => ErrorKind::FailedPrecondition,
            Error::InvalidRate { .. }
            | Error::Spec(_)
            | Error::Input(_)
            | Error::User { .. }
            | Error::InvalidUserns { .. } => ErrorKind::InvalidArgument,
            Error::Io(e) => e.kind(),
            Error::Runtime { .. } => ErrorKind::Unknown,
            Error::StartTimeout { .. } => ErrorKind::DeadlineExceeded,
            Error::Interrupted { .. } => ErrorKind::Canceled,
            Error::NotStarted { .. } => ErrorKind::FailedPrecondition,
            // A record we cannot read back is a record lost.
            Error::Record { .. } => ErrorKind::DataLoss,
            Error::UsernsCreate(e) => ErrorKind::of_io(e),
        }
    }
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        Error::kind(self)
    }
}
