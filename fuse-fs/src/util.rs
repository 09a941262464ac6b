//! fd-based file access inside a tree we do not trust: openat2 confined beneath a
//! directory fd, never following a symlink.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// openat2(RESOLVE_BENEATH | NO_SYMLINKS | NO_MAGICLINKS | NO_XDEV) read-only from
/// `dir` (or AT_FDCWD for the mountpoint itself).
pub(crate) fn open_beneath(dir: Option<&OwnedFd>, path: &Path, flags: i32) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | flags) as u64;
    if dir.is_some() {
        how.resolve = libc::RESOLVE_BENEATH
            | libc::RESOLVE_NO_SYMLINKS
            | libc::RESOLVE_NO_MAGICLINKS
            | libc::RESOLVE_NO_XDEV;
    }
    let dfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: c and how outlive the call; sizes match.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dfd,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Names and d_types of a directory fd's entries, without `.` and `..`.
pub(crate) fn list_dir(dir: OwnedFd) -> io::Result<Vec<(Vec<u8>, u8)>> {
    let raw = dir.as_raw_fd();
    // SAFETY: fdopendir takes ownership of the fd on success.
    let d = unsafe { libc::fdopendir(raw) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dir);
    let mut out = Vec::new();
    loop {
        // SAFETY: d is a valid DIR*; the entry is read before the next call.
        let e = unsafe { libc::readdir64(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let (name, ty) = unsafe {
            (
                CStr::from_ptr((*e).d_name.as_ptr()).to_bytes().to_vec(),
                (*e).d_type,
            )
        };
        if name != b"." && name != b".." {
            out.push((name, ty));
        }
    }
    // SAFETY: closes the DIR and its fd.
    unsafe { libc::closedir(d) };
    Ok(out)
}
