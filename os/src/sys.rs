//! Thin wrappers over the *at syscalls cstore uses on trees it does not
//! control (layers, upper dirs, rootfs), on raw fds. Every path argument here
//! is a single name relative to a directory fd, except the openat2 family
//! (`openat2`, `resolve_beneath`, `resolve_in_root`), which resolves a
//! relative path and refuses to leave the directory or follow any symlink:
//! the one confined open of every crate.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// RESOLVE_* flags of openat2(2).
pub const RESOLVE_NO_XDEV: u64 = libc::RESOLVE_NO_XDEV;
pub const RESOLVE_NO_MAGICLINKS: u64 = libc::RESOLVE_NO_MAGICLINKS;
pub const RESOLVE_NO_SYMLINKS: u64 = libc::RESOLVE_NO_SYMLINKS;
pub const RESOLVE_BENEATH: u64 = libc::RESOLVE_BENEATH;
pub const RESOLVE_IN_ROOT: u64 = libc::RESOLVE_IN_ROOT;

/// What [`resolve_beneath`] resolves with: inside the directory, no symlink
/// followed, no magic link, no other filesystem.
pub const RESOLVE_CONFINED: u64 =
    RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;

/// openat2(dirfd, path, {flags | O_CLOEXEC, mode, resolve}): the one
/// confined open every crate uses (`dirfd` may be AT_FDCWD). A lookup that a
/// concurrent rename raced (EAGAIN) is tried again.
pub fn openat2(
    dirfd: RawFd,
    path: &CStr,
    flags: libc::c_int,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; zeroed is its documented initial state.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = mode as u64;
    how.resolve = resolve;
    loop {
        // SAFETY: NUL-terminated path, open_how of the right size.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r >= 0 {
            // SAFETY: the kernel returned a new fd that we now own.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) && e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// openat2(dir, path, flags, RESOLVE_BENEATH | NO_SYMLINKS | NO_MAGICLINKS |
/// NO_XDEV): the kernel guarantees the result lies under `dir` and that no
/// symlink was followed on the way, whatever the tree holds.
pub fn resolve_beneath(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    openat2(dir.as_raw_fd(), path, flags, 0, RESOLVE_CONFINED)
}

/// openat2(dir, path, flags, RESOLVE_IN_ROOT | NO_MAGICLINKS): `path`
/// resolved as if `dir` were `/`, so symlinks (absolute, or climbing with
/// `..`) stay inside it, as a container will see its rootfs.
pub fn resolve_in_root(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    openat2(
        dir.as_raw_fd(),
        path,
        flags,
        0,
        RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    )
}

pub fn open_dir(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = cstring(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: plain open of a NUL-terminated path.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Create a regular file that must not exist yet (O_EXCL, no symlink follow),
/// with permission bits `mode` (less the umask).
pub fn create_file(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<std::fs::File> {
    // SAFETY: valid dir fd and NUL-terminated name.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode,
        )
    })?;
    // SAFETY: new fd we own.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: u32,
    major: u32,
    minor: u32,
) -> io::Result<()> {
    let dev = libc::makedev(major, minor);
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated strings and a valid fd.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub fn linkat(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
) -> io::Result<()> {
    // SAFETY: valid fds and NUL-terminated names; flags 0 never follow symlinks.
    cvt(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            0,
        )
    })
    .map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn lstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: st is written by the kernel on success.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: initialized on success.
    Ok(unsafe { st.assume_init() })
}

pub fn lchownat(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod of `name` under `dir`, never through a symlink: fchmodat2 with
/// AT_SYMLINK_NOFOLLOW (Linux 6.6+) fails on one. Callers pass a name they
/// just created as a file, directory or device; on an older kernel the
/// plain fchmodat stands, which follows only what is no longer that.
pub fn chmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            mode,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(e);
    }
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) }).map(drop)
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: st is written by the kernel on success.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: initialized on success.
    Ok(unsafe { st.assume_init() })
}

/// The value of xattr `name` of the file open as `fd`; None if it has none.
/// At most 64 KiB (the kernel's own limit for a value).
pub fn fgetxattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: valid fd, NUL-terminated name, buffer pointer/len pair.
        let n = unsafe {
            libc::fgetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Ok(None),
            Some(libc::ERANGE) if buf.len() < XATTR_MAX => buf.resize(XATTR_MAX, 0),
            _ => return Err(e),
        }
    }
}

/// The kernel's limits for an xattr value and for a file's list of names.
const XATTR_MAX: usize = 64 << 10;

/// The names of the xattrs of the file open as `fd` (none where the
/// filesystem has no xattrs).
pub fn flistxattr(fd: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let mut buf = vec![0u8; 1024];
    let n = loop {
        // SAFETY: valid fd, buffer pointer/len pair.
        let n = unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Some(libc::ERANGE) if buf.len() < XATTR_MAX => buf.resize(XATTR_MAX, 0),
            _ => return Err(e),
        }
    };
    Ok(buf[..n]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| CString::new(s).expect("split at NUL"))
        .collect())
}

/// The names in the directory open as `dir` (not `.` and `..`), each with
/// its d_type (DT_UNKNOWN where the filesystem does not say), read from the
/// fd's offset (callers pass a directory they just opened) with getdents64
/// on the fd itself: no DIR stream, so no dup of the fd.
pub fn read_names(dir: BorrowedFd<'_>) -> io::Result<Vec<(CString, u8)>> {
    // struct linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8,
    // d_name (NUL-terminated, padded to the record's length).
    const NAME_AT: usize = 19;
    let mut buf = vec![0u8; 32 << 10];
    let mut names = Vec::new();
    loop {
        // SAFETY: valid fd and a buffer of the given length.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(names);
        }
        let mut at = 0usize;
        while at + NAME_AT <= n as usize {
            let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
            if reclen < NAME_AT || at + reclen > n as usize {
                return Err(io::Error::other("getdents64: malformed record"));
            }
            let d_type = buf[at + 18];
            let name = CStr::from_bytes_until_nul(&buf[at + NAME_AT..at + reclen])
                .map_err(|_| io::Error::other("getdents64: name without NUL"))?;
            if name.to_bytes() != b"." && name.to_bytes() != b".." {
                names.push((name.to_owned(), d_type));
            }
            at += reclen;
        }
    }
}

pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

fn timespecs(mtime: (i64, u32)) -> [libc::timespec; 2] {
    let ts = libc::timespec {
        tv_sec: mtime.0 as libc::time_t,
        tv_nsec: mtime.1 as libc::c_long,
    };
    [ts, ts]
}

pub fn lutimesat(dir: BorrowedFd<'_>, name: &CStr, mtime: (i64, u32)) -> io::Result<()> {
    let t = timespecs(mtime);
    // SAFETY: valid fd, name and a 2-element timespec array.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn futimens(fd: BorrowedFd<'_>, mtime: (i64, u32)) -> io::Result<()> {
    let t = timespecs(mtime);
    // SAFETY: valid fd and a 2-element timespec array.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), t.as_ptr()) }).map(drop)
}

pub fn fsetxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: valid fd, NUL-terminated name, value pointer/len pair.
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// setxattr on a name under `dir` without following it if it is a symlink:
/// through /proc/self/fd/DIR/NAME, which resolves DIR by fd (no path walk
/// from the root) and lsetxattr stops at NAME.
pub fn lsetxattrat(dir: BorrowedFd<'_>, name: &CStr, attr: &CStr, value: &[u8]) -> io::Result<()> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.to_bytes());
    let p = cstring(&p)?;
    // SAFETY: NUL-terminated strings, value pointer/len pair.
    cvt(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            attr.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(drop)
}

/// Remove `name` under `dir` and, if it is a directory, everything in it,
/// walking by fd so no path outside `dir` is ever touched.
pub fn remove_all_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let st = match lstatat(dir, name) {
        Ok(st) => st,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return unlinkat(dir, name, false);
    }
    let sub = resolve_beneath(dir, name, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let names = read_names(sub.as_fd())?;
    for (n, _) in names {
        remove_all_at(sub.as_fd(), &n)?;
    }
    unlinkat(dir, name, true)
}
