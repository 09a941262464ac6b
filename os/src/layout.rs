//! Who may enter the store: root only (the rules the store, the snapshot
//! tree and the runtime's container directories all follow). The store holds layer trees with
//! setuid-root binaries and world-writable directories, containers' upper
//! dirs (whatever a container made setuid), private images and the records of
//! containers; any local user who can reach them can run those binaries as
//! root, plant files in a layer the next container reads, or read what only
//! root should (containerd closed the same hole, CVE-2021-41103, with a 0700
//! snapshots directory).
//!
//! ```text
//! ROOT/              0711  searchable, not listable: a --userns container's
//!                          root walks ROOT/containers/NAME/rootfs
//! ROOT/*  (files)    0600  meta.db, index.json, oci-layout
//! ROOT/blobs/        0700  (and blobs/sha256)
//! ROOT/ingest/       0700
//! ROOT/snapshots/    0700  every layer tree and upper dir is below it;
//!                          each snapshots/ID is 0700 too
//! ROOT/containers/   0711  each containers/NAME is 0700, or 0710 with the
//!                          group of a --userns container's mapped root
//! ROOT/run-state/    0700
//! ```
//!
//! A store made before this was open (0755 directories, 0644 files): opening
//! it closes it. The top-level entries are checked on every open (a stat
//! each); the container directories once, when ROOT itself was found open.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::error::{IoError, IoResultExt};

pub const ROOT_MODE: u32 = 0o711;
/// `containers/`: searchable for a --userns container's root, as ROOT.
pub const CONTAINERS_MODE: u32 = 0o711;
pub const PRIVATE_DIR_MODE: u32 = 0o700;
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Top-level directories no other user needs to enter at all.
const PRIVATE_DIRS: &[&str] = &["blobs", "blobs/sha256", "ingest", "snapshots", "run-state"];
/// Top-level files.
const FILES: &[&str] = &["meta.db", "index.json", "oci-layout"];

/// Create `path` (its parent must exist) with `mode`; Ok if it exists.
pub fn create_dir(path: &Path, mode: u32) -> io::Result<()> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

/// Create `path` and its missing parents with `mode` (those above an
/// existing ancestor only).
pub fn create_dir_all(path: &Path, mode: u32) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
}

/// Take the bits in `strip` off `path` if it has any (a directory or file
/// the store made: a symlink in its place is left alone, unless `follow`,
/// for ROOT, which the admin may give as a symlink). Whether it changed.
fn strip_bits(path: &Path, strip: u32, follow: bool) -> Result<bool, IoError> {
    let m = match if follow {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    } {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(IoError::new("stat", path, e)),
    };
    if m.file_type().is_symlink() || m.mode() & strip == 0 {
        return Ok(false);
    }
    match fs::set_permissions(path, fs::Permissions::from_mode(m.mode() & 0o7777 & !strip)) {
        Ok(()) => Ok(true),
        // A store on a read-only filesystem is read as it is.
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            tracing::warn!(path = %path.display(), "read-only: cannot close it to other users");
            Ok(false)
        }
        Err(e) => Err(IoError::new("chmod", path, e)),
    }
}

/// Create ROOT if missing (0711; its parents as the umask makes them), and
/// close what an older cstore left open in it (see the module doc).
pub fn secure_root(root: &Path) -> Result<(), IoError> {
    if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).op("create", parent)?;
    }
    create_dir(root, ROOT_MODE).op("create", root)?;
    let m = fs::metadata(root).op("stat", root)?;
    // Read or write for others: a store from before it was closed (or
    // loosened since), whose container directories are open too.
    let was_open = m.mode() & 0o066 != 0;
    for d in PRIVATE_DIRS {
        strip_bits(&root.join(d), 0o077, false)?;
    }
    strip_bits(&root.join("containers"), 0o066, false)?;
    for f in FILES {
        strip_bits(&root.join(f), 0o077, false)?;
    }
    if was_open {
        let containers = root.join("containers");
        match fs::read_dir(&containers) {
            Ok(rd) => {
                for e in rd.flatten() {
                    strip_bits(&e.path(), 0o077, false)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(IoError::new("read dir", &containers, e)),
        }
        let snapshots = root.join("snapshots");
        match fs::read_dir(&snapshots) {
            Ok(rd) => {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        strip_bits(&e.path(), 0o077, false)?;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(IoError::new("read dir", &snapshots, e)),
        }
    }
    // Last: ROOT closed says everything below was closed.
    strip_bits(root, 0o066, true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_new_root_is_closed_and_an_old_one_closed_once() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("a/b/root");
        secure_root(&root).unwrap();
        assert_eq!(mode(&root), ROOT_MODE);

        for d in [
            "blobs/sha256",
            "ingest",
            "snapshots/7/fs",
            "containers/c1",
            "run-state",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("index.json"), "{}").unwrap();
        for p in [
            "",
            "blobs",
            "blobs/sha256",
            "ingest",
            "snapshots",
            "snapshots/7",
            "snapshots/7/fs",
            "containers",
            "containers/c1",
            "run-state",
        ] {
            fs::set_permissions(root.join(p), fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::set_permissions(root.join("index.json"), fs::Permissions::from_mode(0o644)).unwrap();
        // A link is neither followed nor changed.
        let elsewhere = t.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("containers/link")).unwrap();
        secure_root(&root).unwrap();
        for (p, m) in [
            ("", 0o711),
            ("blobs", 0o700),
            ("blobs/sha256", 0o700),
            ("ingest", 0o700),
            ("snapshots", 0o700),
            ("snapshots/7", 0o700),
            // A tree's root is the image's: below a closed directory.
            ("snapshots/7/fs", 0o755),
            ("containers", 0o711),
            ("containers/c1", 0o700),
            ("run-state", 0o700),
            ("index.json", 0o600),
        ] {
            assert_eq!(mode(&root.join(p)), m, "{p:?}");
        }
        assert_eq!(mode(&elsewhere), 0o755);

        // Closed: container directories are left as they are (a --userns
        // one is 0710), the top level is checked again.
        fs::set_permissions(
            root.join("containers/c1"),
            fs::Permissions::from_mode(0o710),
        )
        .unwrap();
        fs::set_permissions(root.join("ingest"), fs::Permissions::from_mode(0o750)).unwrap();
        secure_root(&root).unwrap();
        assert_eq!(mode(&root.join("containers/c1")), 0o710);
        assert_eq!(mode(&root.join("ingest")), 0o700);

        // --root given as a symlink: the directory it names is closed.
        let real = t.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&real, t.path().join("via-link")).unwrap();
        secure_root(&t.path().join("via-link")).unwrap();
        assert_eq!(mode(&real), 0o711);
    }
}
