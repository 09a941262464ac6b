//! The suite's one error type.

use std::path::PathBuf;

use cstore_os::{Classify, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SIGINT/SIGTERM/SIGHUP arrived; everything made so far was cleaned up.
    #[error("interrupted (everything the suite made has been cleaned up)")]
    Interrupted,
    /// A program the suite runs is not installed.
    #[error(
        "{tool} not found: the suite needs it for {what} (fixtures/deps.sh --bench installs it)"
    )]
    MissingTool { tool: String, what: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A command exited unsuccessfully (or could not be started).
    #[error("{what}: `{cmd}` {status}{}", if stderr.is_empty() { String::new() } else { format!(":\n{stderr}") })]
    Command {
        what: String,
        cmd: String,
        status: String,
        stderr: String,
    },
    /// A tool's output was not what the suite reads (fio's JSON, a probe...).
    #[error("{what}: unexpected output: {detail}")]
    Output { what: String, detail: String },
    /// An option that cannot work.
    #[error("{0}")]
    Invalid(String),
    /// The cleanup could not undo everything (listed).
    #[error("left behind after cleanup: {}", .0.join("; "))]
    LeftBehind(Vec<String>),
    /// A storage class could not be built or a workload could not run.
    #[error("class {class}: {detail}")]
    Class { class: String, detail: String },
}

impl Error {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Interrupted => ErrorKind::Canceled,
            Error::MissingTool { .. } => ErrorKind::FailedPrecondition,
            Error::Io { source, .. } => ErrorKind::of_io(source),
            Error::Invalid(_) => ErrorKind::InvalidArgument,
            Error::Command { .. }
            | Error::Output { .. }
            | Error::LeftBehind(_)
            | Error::Class { .. } => ErrorKind::Unknown,
        }
    }
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        Error::kind(self)
    }
}
