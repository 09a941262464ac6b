//! The layer's own tree (`snapshots/<id>/fs`), filled in place: every call goes
//! through directory fds, names are single components from a validated index, and
//! every open is openat2 beneath the tree (RESOLVE_BENEATH | NO_SYMLINKS |
//! NO_MAGICLINKS | NO_XDEV) with O_NOFOLLOW, as extraction does. The tree is the
//! daemon's own until completion, but it is where untrusted names land, so nothing
//! here takes a path by string. `/proc/self/fd` only for xattrs of what cannot be
//! opened (symlinks, devices, whiteouts) and, before Linux 6.6 (no fchmodat2), for
//! the mode of devices and whiteouts.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(crate) fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// openat2 of one component (or `.`, or a relative path of validated components)
/// beneath `dir`, never through a symlink.
pub(crate) fn open_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: open_how is plain data.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    if flags & libc::O_CREAT != 0 {
        how.mode = mode as u64;
    }
    how.resolve = libc::RESOLVE_BENEATH
        | libc::RESOLVE_NO_SYMLINKS
        | libc::RESOLVE_NO_MAGICLINKS
        | libc::RESOLVE_NO_XDEV;
    loop {
        // SAFETY: c and how outlive the call; the size is the struct's.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r >= 0 {
            // SAFETY: a new fd we own.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
        }
        let e = io::Error::last_os_error();
        // openat2 asks for a retry when a rename raced with the lookup.
        if e.raw_os_error() != Some(libc::EAGAIN) && e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// The directory `name` in `dir`, made (0700: its final mode comes at completion)
/// if missing.
pub(crate) fn mkdir_open(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: valid fd and NUL-terminated name.
    match cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o700) }) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e),
    }
    open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, written by the kernel on success.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd; AT_EMPTY_PATH works on any fd.
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// lstat of `name` in `dir`; None if there is nothing by that name.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<libc::stat>> {
    let c = cstr(name)?;
    // SAFETY: plain data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, name and buffer.
    match cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    }) {
        Ok(_) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn symlink_at(dir: BorrowedFd<'_>, name: &[u8], target: &[u8]) -> io::Result<()> {
    let (c, t) = (cstr(name)?, cstr(target)?);
    // SAFETY: valid fd and NUL-terminated strings.
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) }).map(drop)
}

pub(crate) fn mknod_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32, dev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), c.as_ptr(), mode, dev) }).map(drop)
}

/// A hard link `dir/name` to `tdir/tname` (never following a symlink: no
/// AT_SYMLINK_FOLLOW).
pub(crate) fn link_at(
    tdir: BorrowedFd<'_>,
    tname: &[u8],
    dir: BorrowedFd<'_>,
    name: &[u8],
) -> io::Result<()> {
    let (t, c) = (cstr(tname)?, cstr(name)?);
    // SAFETY: valid fds and NUL-terminated names.
    cvt(unsafe { libc::linkat(tdir.as_raw_fd(), t.as_ptr(), dir.as_raw_fd(), c.as_ptr(), 0) })
        .map(drop)
}

/// chown of `name` in `dir`, never through a symlink (a symlink itself is changed).
pub(crate) fn lchown_at(dir: BorrowedFd<'_>, name: &[u8], uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            c.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod of `name` in `dir` (a device, fifo or whiteout this daemon just made),
/// refusing a symlink (fchmodat2 with AT_SYMLINK_NOFOLLOW, Linux 6.6+).
pub(crate) fn chmod_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid fd and NUL-terminated name.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            mode,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSYS) {
            return chmod_at_by_path_fd(dir, &c, mode);
        }
        return Err(e);
    }
    Ok(())
}

/// chmod_at before Linux 6.6 (no fchmodat2; found on Debian 12's 6.1 in the
/// systemd VM, where completion failed with ENOSYS): an O_PATH|O_NOFOLLOW fd,
/// refused if it is a symlink, changed through /proc/self/fd (fchmod takes
/// no O_PATH fd), as glibc's fchmodat does.
fn chmod_at_by_path_fd(dir: BorrowedFd<'_>, name: &CString, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated name; result checked.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a new fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if fstat(fd.as_fd())?.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    let p = cstr(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_bytes())?;
    // SAFETY: NUL-terminated path.
    cvt(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub(crate) fn utimes_at(dir: BorrowedFd<'_>, name: &[u8], t: (i64, u32)) -> io::Result<()> {
    let c = cstr(name)?;
    let ts = [
        libc::timespec {
            tv_sec: t.0,
            tv_nsec: t.1 as i64,
        },
        libc::timespec {
            tv_sec: t.0,
            tv_nsec: t.1 as i64,
        },
    ];
    // SAFETY: valid fd, name and two timespecs.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub(crate) fn futimes(fd: BorrowedFd<'_>, t: (i64, u32)) -> io::Result<()> {
    let ts = [
        libc::timespec {
            tv_sec: t.0,
            tv_nsec: t.1 as i64,
        },
        libc::timespec {
            tv_sec: t.0,
            tv_nsec: t.1 as i64,
        },
    ];
    // SAFETY: valid fd and two timespecs.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) }).map(drop)
}

pub(crate) fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

pub(crate) fn fsetxattr(fd: BorrowedFd<'_>, name: &[u8], value: &[u8]) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid fd, name and value buffer.
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            c.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// An xattr of `name` in `dir` that cannot be opened (a symlink, device, fifo or
/// whiteout): lsetxattr through the directory's /proc/self/fd entry, which
/// resolves the directory fd itself and does not follow `name`.
pub(crate) fn lsetxattr_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    key: &[u8],
    value: &[u8],
) -> io::Result<()> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    let (p, k) = (cstr(&p)?, cstr(key)?);
    // SAFETY: NUL-terminated path and name; value buffer.
    cvt(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            k.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

pub(crate) fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) }).map(drop)
}

pub(crate) fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

/// Everything in the directory `dir` (not the directory itself), removed through
/// fds without following symlinks.
pub(crate) fn clear_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    let d = open_at(dir, b".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    for (name, _) in crate::util::list_dir(d)? {
        let st = lstat_at(dir, &name)?;
        let is_dir = st.is_some_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFDIR);
        if is_dir {
            let sub = open_at(dir, &name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            clear_dir(std::os::fd::AsFd::as_fd(&sub))?;
        }
        let c = cstr(&name)?;
        let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: valid fd and NUL-terminated name.
        match cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
