//! Files written so readers see the old or the new content, never a mix;
//! directories synced so a rename survives a crash; lock files.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{IoError, IoResultExt};
use crate::layout::PRIVATE_FILE_MODE;

/// fsync a directory, so the renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), IoError> {
    File::open(dir).and_then(|d| d.sync_all()).op("fsync", dir)
}

/// Write a file so readers see the old or the new content, never a mix: a
/// temporary file beside it (0600: only root reads the store's files, see
/// `layout`), fsynced, renamed over it, the directory fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    replace(path, bytes, true)
}

/// As `write_atomic` for readers (the old or the new content, never a mix),
/// but nothing is synced: after a crash the file may be the old one, or,
/// if there was none, missing or empty. For what lasts no longer than the
/// process writing it (an `--rm` container's record), whose readers must
/// take a missing or empty file anyway.
pub fn write_atomic_volatile(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    replace(path, bytes, false)
}

fn replace(path: &Path, bytes: &[u8], durable: bool) -> Result<(), IoError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(IoError::new("write", path, e));
    }
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

/// An exclusive flock on a lock file, held for the life of the value.
/// Holders may unlink the file as they finish (`remove_and_release`), so a
/// lock is only taken on the file the path still names.
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl FileLock {
    /// Blocks until the lock is ours. The file may be removed by a holder as
    /// it finishes; a lock on a removed file guards nothing, so check that the
    /// path still names the file we locked, and retry if not.
    pub fn take(path: &Path) -> Result<FileLock, IoError> {
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                // Others could flock a readable one (meta.db.lock is in ROOT).
                .mode(PRIVATE_FILE_MODE)
                .open(path)
                .op("create lock file", path)?;
            flock(&file, libc::LOCK_EX).op("flock", path)?;
            if same_file(&file, path) {
                return Ok(FileLock {
                    file,
                    path: path.to_path_buf(),
                });
            }
        }
    }

    /// Non-blocking: None if someone holds it (or there is no lock file).
    pub fn try_take(path: &Path) -> Result<Option<FileLock>, IoError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(IoError::new("open", path, e)),
        };
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) if same_file(&file, path) => Ok(Some(FileLock {
                file,
                path: path.to_path_buf(),
            })),
            Ok(()) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(IoError::new("flock", path, e)),
        }
    }

    pub fn release(self) {}

    /// Unlink while still holding, so a waiter that then gets this lock sees
    /// a removed file and takes a fresh one.
    pub fn remove_and_release(self) {
        let _ = fs::remove_file(&self.path);
        drop(self.file);
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a valid, owned fd.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_writes_replace_whole_files_readable_by_root_only() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("index.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary file is left beside it.
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1);
        let e = write_atomic(&t.path().join("missing/x"), b"").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotFound);
    }

    #[test]
    fn a_removed_lock_file_admits_the_next_taker_alone() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x.lock");
        let held = FileLock::take(&p).unwrap();
        assert!(FileLock::try_take(&p).unwrap().is_none(), "held");
        held.remove_and_release();
        assert!(!p.exists());
        assert!(
            FileLock::try_take(&p).unwrap().is_none(),
            "no file, no lock"
        );
        let again = FileLock::take(&p).unwrap();
        assert!(FileLock::try_take(&p).unwrap().is_none());
        again.release();
        assert!(FileLock::try_take(&p).unwrap().is_some());
    }
}
