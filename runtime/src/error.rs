//! The runtime crate's one error type: what a caller of `run`, the cgroup
//! writer, the id mapping or the container records can act on.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Cgroups.
    #[error("no cgroup hierarchy here has the io controller (no v1 blkio mount, no io in cgroup2's controllers)")]
    NoIoController,
    #[error("invalid rate {value:?}: {reason}")]
    InvalidRate { value: String, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    // The container.
    #[error("container spec: {0}")]
    Spec(String),
    #[error("container {id}: {message}")]
    Runtime { id: String, message: String },
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
