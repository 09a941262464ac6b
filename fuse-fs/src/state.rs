//! What a resumed session needs, on disk in a directory the caller gives (one per
//! mount): the mountpoint, connection id and negotiated INIT settings (`session.json`,
//! versioned, replaced atomically: written at mount and again after INIT), and the passthrough backing-id
//! table (`backing.log`, appended before each OPEN reply that uses a new id).
//!
//! Nothing here is fsynced: the state only has to survive the daemon's death, which the
//! page cache does; a reboot ends the FUSE connection and the state with it.

use cstore_os::IoError;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::dev::ConnId;
use crate::error::{Error, Result};

/// The version of `session.json` this code writes and reads.
pub const STATE_VERSION: u32 = 1;

const SESSION_FILE: &str = "session.json";
const BACKING_FILE: &str = "backing.log";

/// A session as recorded on disk: where it is mounted, which connection, and what
/// INIT settled (None until INIT was answered).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub version: u32,
    pub mountpoint: PathBuf,
    pub conn: Option<ConnId>,
    /// The daemon version that wrote this, for logs.
    pub daemon: String,
    /// None if no INIT was ever answered on this connection (a daemon died between
    /// mount and INIT): a resume must then handshake.
    pub init: Option<Negotiated>,
}

/// What INIT settled: everything a daemon resuming the connection without INIT must
/// know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    /// The kernel's protocol version as offered in INIT.
    pub kernel_major: u32,
    pub kernel_minor: u32,
    /// The minor we answered (the protocol in use).
    pub minor: u32,
    /// Flags the kernel offered (`flags | flags2 << 32`).
    pub kernel_flags: u64,
    /// Flags in force (offered and asked for).
    pub flags: u64,
    pub max_readahead: u32,
    pub max_write: u32,
    pub max_pages: u16,
    pub max_stack_depth: u32,
    /// Passthrough was granted.
    pub passthrough: bool,
    /// The kernel understands `FUSE_NOTIFY_RESEND`.
    pub has_resend: bool,
}

/// A session's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// What [`StateDir::load`] found.
#[derive(Debug, Default)]
pub struct Saved {
    /// None if this directory has no session (never mounted, or reset).
    pub settings: Option<Settings>,
    /// nodeid → backing id, as the previous daemons registered them.
    pub backing: HashMap<u64, u32>,
}

impl StateDir {
    /// Uses `dir`, creating it (0700) if needed.
    pub fn new(dir: impl Into<PathBuf>) -> Result<StateDir> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| IoError::new("mkdir", &dir, e))?;
        Ok(StateDir { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::State {
            dir: self.dir.clone(),
            reason: reason.into(),
        }
    }

    /// Starts a new connection's state: no settings yet, an empty backing table.
    pub fn reset(&self) -> Result<()> {
        for f in [SESSION_FILE, BACKING_FILE] {
            let p = self.dir.join(f);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(IoError::new("remove", p, e).into()),
            }
        }
        Ok(())
    }

    /// Writes the settings atomically (temporary file + rename).
    pub fn save_settings(&self, s: &Settings) -> Result<()> {
        let p = self.dir.join(SESSION_FILE);
        let tmp = self.dir.join(format!("{SESSION_FILE}.tmp"));
        let body = serde_json::to_vec_pretty(s).map_err(|e| self.err(e.to_string()))?;
        std::fs::write(&tmp, body).map_err(|e| IoError::new("write", &tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| IoError::new("rename", &p, e).into())
    }

    /// Reads the settings and the backing table. A settings file of another version is
    /// an error (the protocol state it describes may mean something else), not None.
    pub fn load(&self) -> Result<Saved> {
        let p = self.dir.join(SESSION_FILE);
        let settings = match std::fs::read(&p) {
            Ok(b) => {
                let v: serde_json::Value = serde_json::from_slice(&b)
                    .map_err(|e| self.err(format!("{SESSION_FILE}: {e}")))?;
                let version = v.get("version").and_then(|v| v.as_u64());
                if version != Some(STATE_VERSION as u64) {
                    return Err(self.err(format!(
                        "{SESSION_FILE} has version {version:?}, this daemon reads {STATE_VERSION}"
                    )));
                }
                Some(
                    serde_json::from_value(v)
                        .map_err(|e| self.err(format!("{SESSION_FILE}: {e}")))?,
                )
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(IoError::new("read", p, e).into()),
        };
        let backing = self.load_backing()?;
        Ok(Saved { settings, backing })
    }

    fn load_backing(&self) -> Result<HashMap<u64, u32>> {
        let p = self.dir.join(BACKING_FILE);
        let text = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashMap::new()),
            Err(e) => return Err(IoError::new("read", p, e).into()),
        };
        parse_backing(&text)
            .map_err(|line| self.err(format!("{BACKING_FILE} line {line} is malformed")))
    }

    /// Opens the backing table for appending.
    pub fn backing_log(&self) -> Result<BackingLog> {
        let p = self.dir.join(BACKING_FILE);
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| IoError::new("open", &p, e))?;
        Ok(BackingLog {
            path: p,
            file: Mutex::new(f),
        })
    }
}

/// `nodeid id` lines; a last line without its newline was cut by a crash mid-append
/// (its OPEN was never answered) and is ignored. Later lines win. Returns the number of
/// the first malformed line.
pub fn parse_backing(text: &[u8]) -> std::result::Result<HashMap<u64, u32>, usize> {
    let mut map = HashMap::new();
    let complete = match text.iter().rposition(|&b| b == b'\n') {
        Some(i) => &text[..=i],
        None => &[][..],
    };
    for (i, line) in complete.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(line).map_err(|_| i + 1)?;
        let (a, b) = s.split_once(' ').ok_or(i + 1)?;
        map.insert(a.parse().map_err(|_| i + 1)?, b.parse().map_err(|_| i + 1)?);
    }
    Ok(map)
}

/// The append side of the backing-id table.
#[derive(Debug)]
pub struct BackingLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl BackingLog {
    /// Appends one mapping with a single write(2) (O_APPEND), so it is in the page cache,
    /// whole, before the OPEN reply that hands the id to the kernel.
    pub fn append(&self, nodeid: u64, id: u32) -> Result<()> {
        let line = format!("{nodeid} {id}\n");
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(line.as_bytes())
            .map_err(|e| IoError::new("append", &self.path, e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> Settings {
        Settings {
            version: STATE_VERSION,
            mountpoint: dir.join("mnt"),
            conn: Some(ConnId {
                major: 0,
                minor: 41,
            }),
            daemon: "test".into(),
            init: Some(Negotiated {
                kernel_major: 7,
                kernel_minor: 45,
                minor: 40,
                kernel_flags: 0x5fd73fffffb,
                flags: 0x2042c46021,
                max_readahead: 131072,
                max_write: 4096,
                max_pages: 256,
                max_stack_depth: 1,
                passthrough: true,
                has_resend: true,
            }),
        }
    }

    #[test]
    fn settings_and_backing_table_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let sd = StateDir::new(t.path().join("s")).unwrap();
        assert!(sd.load().unwrap().settings.is_none());
        let s = settings(t.path());
        sd.save_settings(&s).unwrap();
        let log = sd.backing_log().unwrap();
        log.append(5, 1).unwrap();
        log.append(9, 2).unwrap();
        log.append(5, 3).unwrap();
        let saved = sd.load().unwrap();
        assert_eq!(saved.settings, Some(s));
        assert_eq!(saved.backing, HashMap::from([(5, 3), (9, 2)]));
        sd.reset().unwrap();
        let saved = sd.load().unwrap();
        assert!(saved.settings.is_none() && saved.backing.is_empty());
    }

    #[test]
    fn another_version_is_refused_by_name() {
        let t = tempfile::tempdir().unwrap();
        let sd = StateDir::new(t.path()).unwrap();
        let mut v = serde_json::to_value(settings(t.path())).unwrap();
        v["version"] = 2.into();
        std::fs::write(t.path().join(SESSION_FILE), v.to_string()).unwrap();
        let e = sd.load().unwrap_err().to_string();
        assert!(e.contains("version Some(2)"), "{e}");
        std::fs::write(t.path().join(SESSION_FILE), b"{").unwrap();
        assert!(sd.load().is_err());
    }

    #[test]
    fn a_cut_last_line_is_ignored_and_garbage_refused() {
        assert_eq!(
            parse_backing(b"1 2\n3 4\n5 ").unwrap(),
            HashMap::from([(1, 2), (3, 4)])
        );
        assert_eq!(parse_backing(b"").unwrap(), HashMap::new());
        assert_eq!(parse_backing(b"1 2\nx y\n"), Err(2));
        assert_eq!(parse_backing(b"1 99999999999\n"), Err(1));
    }
}
