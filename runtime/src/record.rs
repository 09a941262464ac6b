//! A container's record: what `cstore ps` shows and `cstore rm` checks,
//! kept as `container.json` in the container's directory and rewritten
//! atomically (temp file, rename) at each step of its life: created, started
//! (the init's pid), finished (exit code and time).
//!
//! A pid alone does not say a container runs: pids are reused. Every pid is
//! recorded with its process start time (as pull leases are), and a process
//! counts as alive only while both match and it is not a zombie.

use std::path::{Path, PathBuf};

pub use cstore_os::Proc;
use cstore_os::{now_unix, write_atomic, write_atomic_volatile};
use serde::{Deserialize, Serialize};

use crate::Error;

/// The record's file name in the container's directory.
pub const RECORD_FILE: &str = "container.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The container's name, which is also its id.
    pub id: String,
    pub image: String,
    pub command: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    /// The `cstore run` process that launched the container and waits for it.
    pub supervisor: Proc,
    /// The container's init, in the host's pid namespace, once started.
    pub init: Option<Proc>,
    pub started: Option<u64>,
    /// Exit status (128 + signal when killed), once finished.
    pub exit_code: Option<i32>,
    pub finished: Option<u64>,
    /// Why the container could not be run, if it could not.
    pub error: Option<String>,
    /// Started with --rm: removed by its supervisor when it exits.
    pub auto_remove: bool,
}

/// Where a container is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Its supervisor is setting it up; no init yet.
    Created,
    Running,
    /// `code` is None when it failed to start, or when its supervisor was
    /// killed and nobody saw the exit.
    Exited {
        code: Option<i32>,
        finished: Option<u64>,
    },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Created => "created",
            State::Running => "running",
            State::Exited { .. } => "exited",
        }
    }
}

impl Record {
    /// A new record for a container this process launches.
    pub fn new(id: &str, image: &str, command: &[String]) -> Record {
        Record {
            id: id.to_string(),
            image: image.to_string(),
            command: command.to_vec(),
            created: now_unix(),
            supervisor: Proc::current(),
            init: None,
            started: None,
            exit_code: None,
            finished: None,
            error: None,
            auto_remove: false,
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(RECORD_FILE)
    }

    /// The record in `dir`; None if there is none.
    pub fn load(dir: &Path) -> Result<Option<Record>, Error> {
        let path = Self::path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(record_err(&path, e)),
        };
        // What a crash can leave of an `--rm` container's record (not
        // synced, see `save`): as good as none.
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| record_err(&path, e))
    }

    /// Replace the record in `dir` (readers see the old or the new one).
    /// An `--rm` container's record is not synced: it lasts no longer than
    /// its run, and after a crash `ps` and `rm` take a missing or empty one
    /// as a container that died before writing it (docs/architecture.md,
    /// "Syncs of a run").
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        let path = Self::path(dir);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| record_err(&path, e))?;
        let write = if self.auto_remove {
            write_atomic_volatile
        } else {
            write_atomic
        };
        write(&path, &bytes).map_err(|e| record_err(&path, e))
    }

    /// The init is running as `pid`.
    pub fn set_started(&mut self, pid: u32) {
        self.init = Proc::of(pid);
        self.started = Some(now_unix());
    }

    /// The run is over: its exit status, or why it could not run.
    pub fn set_finished(&mut self, result: &Result<i32, Error>) {
        match result {
            Ok(code) => self.exit_code = Some(*code),
            Err(e) => self.error = Some(e.to_string()),
        }
        self.finished = Some(now_unix());
    }

    pub fn state(&self) -> State {
        let exited = State::Exited {
            code: self.exit_code,
            finished: self.finished,
        };
        if self.finished.is_some() {
            return exited;
        }
        match self.init {
            Some(init) if init.is_alive() => State::Running,
            // The init is gone and its supervisor is still recording that.
            Some(_) if self.supervisor.is_alive() => State::Running,
            None if self.supervisor.is_alive() => State::Created,
            // Supervisor and init both gone without a word (killed, or a reboot).
            _ => exited,
        }
    }
}

fn record_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Record {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_follows_the_record_and_the_processes() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Record::new("c1", "img", &["true".into()]);
        assert_eq!(r.state(), State::Created, "supervisor (this process) alive");
        r.set_started(std::process::id());
        assert_eq!(r.state(), State::Running);
        r.save(dir.path()).unwrap();
        let back = Record::load(dir.path()).unwrap().unwrap();
        assert_eq!(back.init, r.init);
        r.set_finished(&Ok(7));
        assert!(matches!(r.state(), State::Exited { code: Some(7), .. }));
        // Supervisor and init gone, nothing recorded: exited, code unknown.
        let gone = Proc { pid: 0, start: 0 };
        let orphan = Record {
            supervisor: gone,
            init: Some(gone),
            ..Record::new("c2", "img", &[])
        };
        assert!(matches!(
            orphan.state(),
            State::Exited {
                code: None,
                finished: None
            }
        ));
        assert!(Record::load(&dir.path().join("none")).unwrap().is_none());
    }
}
