//! fd-based file access inside a tree we do not trust: openat2 confined beneath a
//! directory fd, never following a symlink (cstore_os's confined opens).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use cstore_os::sys;

/// openat2(RESOLVE_BENEATH | NO_SYMLINKS | NO_MAGICLINKS | NO_XDEV) read-only from
/// `dir` (or, without one, the path itself from the cwd, not following a final symlink).
pub(crate) fn open_beneath(dir: Option<&OwnedFd>, path: &Path, flags: i32) -> io::Result<OwnedFd> {
    let c = sys::cstring(path.as_os_str().as_bytes())?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | flags;
    match dir {
        Some(d) => sys::resolve_beneath(d.as_fd(), &c, flags),
        None => sys::openat2(libc::AT_FDCWD, &c, flags, 0, 0),
    }
}

/// Names and d_types of a directory fd's entries, without `.` and `..`.
pub(crate) fn list_dir(dir: OwnedFd) -> io::Result<Vec<(Vec<u8>, u8)>> {
    Ok(sys::read_names(dir.as_fd())?
        .into_iter()
        .map(|(n, t)| (n.into_bytes(), t))
        .collect())
}
