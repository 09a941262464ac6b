//! /dev/fuse and the kernel around it: mount(2) of `fuse.cstore`, unmount, reading
//! requests and writing replies and notifications, passthrough backing ids, the
//! connection id and what sysfs offers for it (fusectl abort/waiting, bdi readahead).

use cstore_os::mountinfo::{self, MountInfo};
use cstore_os::{sys, IoError};
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::abi;
use crate::error::{Error, Result};

/// The filesystem type as mountinfo shows it.
pub const FSTYPE: &str = "fuse.cstore";

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// An open /dev/fuse file: one FUSE connection (after mount).
#[derive(Debug)]
pub struct FuseDev {
    fd: OwnedFd,
    conn: Option<ConnId>,
}

/// What [`FuseDev::read_request`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadResult {
    /// A request of this many bytes is in the buffer.
    Request(usize),
    /// Nothing pending (the fd is non-blocking) or interrupted: poll again.
    Again,
    /// The connection is gone (unmounted or aborted).
    Gone,
}

impl FuseDev {
    /// Opens /dev/fuse for a new connection.
    pub fn open() -> Result<FuseDev> {
        // SAFETY: a constant NUL-terminated path; the result is checked.
        let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(Error::NoFuse(io::Error::last_os_error()));
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        Ok(FuseDev {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            conn: None,
        })
    }

    /// Wraps a /dev/fuse fd handed over by a fd store (a resumed connection).
    pub fn from_fd(fd: OwnedFd, conn: Option<ConnId>) -> FuseDev {
        FuseDev { fd, conn }
    }

    /// The connection, once known.
    pub fn conn(&self) -> Option<ConnId> {
        self.conn
    }

    pub fn set_conn(&mut self, conn: ConnId) {
        self.conn = Some(conn);
    }

    /// Gives the fd up (for a fd store, or the next daemon).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    fn conn_name(&self) -> String {
        self.conn
            .map(|c| c.to_string())
            .unwrap_or_else(|| format!("fd {}", self.fd.as_raw_fd()))
    }

    fn dev_err(&self, op: &'static str, source: io::Error) -> Error {
        Error::Device {
            op,
            conn: self.conn_name(),
            source,
        }
    }

    /// Makes reads non-blocking, so workers can poll the fd beside a stop event. The flag
    /// lives on the open file description, shared with the keeper's copy, which never
    /// reads.
    pub fn set_nonblocking(&self) -> Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: fcntl on an fd we own; results checked.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(self.dev_err("set O_NONBLOCK", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Reads one request into `buf` (the kernel hands over exactly one per read).
    pub fn read_request(&self, buf: &mut [u8]) -> Result<ReadResult> {
        // SAFETY: buf is valid for buf.len() bytes of writes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(ReadResult::Request(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // ENOENT: the request was interrupted between poll and read.
            Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => Ok(ReadResult::Again),
            Some(libc::ENODEV) => Ok(ReadResult::Gone),
            _ => Err(self.dev_err("read request", e)),
        }
    }

    /// Writes one reply: header + body in a single writev (the kernel wants it whole).
    /// A reply to a request that no longer waits (interrupted, aborted) is not an error.
    pub fn write_reply(&self, unique: u64, error: i32, body: &[u8]) -> Result<()> {
        let h = abi::encode_out_header(abi::OUT_HEADER_SIZE + body.len(), error, unique);
        let iov = [
            libc::iovec {
                iov_base: h.as_ptr() as *mut _,
                iov_len: h.len(),
            },
            libc::iovec {
                iov_base: body.as_ptr() as *mut _,
                iov_len: body.len(),
            },
        ];
        // SAFETY: both iovecs point at live buffers of the given lengths, only read.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(()),
            Some(libc::ENODEV) => Err(Error::Disconnected(self.conn_name())),
            _ => Err(self.dev_err("write reply", e)),
        }
    }

    /// `FUSE_DEV_IOC_CLONE`: a new /dev/fuse file on the same connection. Requests
    /// read from it that are unanswered when it closes fail with ECONNABORTED, whatever
    /// other copies of the connection's fds live on.
    pub fn clone_dev(&self) -> Result<FuseDev> {
        let new = FuseDev::open()?;
        let old = self.fd.as_raw_fd() as u32;
        // SAFETY: the ioctl reads one u32 (the fd to clone) from a live local.
        let r = unsafe {
            libc::ioctl(
                new.fd.as_raw_fd(),
                abi::DEV_IOC_CLONE as _,
                &old as *const u32,
            )
        };
        if r < 0 {
            return Err(self.dev_err("FUSE_DEV_IOC_CLONE", io::Error::last_os_error()));
        }
        Ok(FuseDev {
            fd: new.fd,
            conn: self.conn,
        })
    }

    /// `FUSE_NOTIFY_RESEND`: the kernel requeues every request a previous daemon read
    /// and did not answer, with [`abi::UNIQUE_RESEND`] set in `unique`.
    pub fn notify_resend(&self) -> Result<()> {
        let h = abi::encode_out_header(abi::OUT_HEADER_SIZE, abi::notify::RESEND, 0);
        // SAFETY: h is a live 16-byte buffer.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), h.as_ptr().cast(), h.len()) };
        if n < 0 {
            return Err(self.dev_err("FUSE_NOTIFY_RESEND", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// `FUSE_DEV_IOC_BACKING_OPEN`: registers `file` as a passthrough backing file and
    /// returns its id. Needs CAP_SYS_ADMIN in the initial user namespace, and `file` on a
    /// filesystem that is not itself stacked (ELOOP on overlayfs at depth 1).
    pub fn backing_open(&self, file: BorrowedFd<'_>) -> io::Result<u32> {
        let map = abi::encode_backing_map(file.as_raw_fd());
        // SAFETY: the ioctl reads a 16-byte struct fuse_backing_map from map.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                abi::DEV_IOC_BACKING_OPEN as _,
                map.as_ptr(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as u32)
    }

    /// `FUSE_DEV_IOC_BACKING_CLOSE`.
    pub fn backing_close(&self, id: u32) -> io::Result<()> {
        // SAFETY: the ioctl reads one u32.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                abi::DEV_IOC_BACKING_CLOSE as _,
                &id as *const u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsFd for FuseDev {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for FuseDev {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Mount options beyond the fixed ones (`rootmode=40000,user_id=0,group_id=0,
/// default_permissions`; `MS_RDONLY | MS_NOSUID | MS_NODEV`).
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// The mount's source as mountinfo shows it.
    pub source: String,
    /// `allow_other`: direct access by other users (overlay reaches the lower with its
    /// mounter's credentials and does not need it).
    pub allow_other: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            source: "cstore".into(),
            allow_other: true,
        }
    }
}

/// Mounts a new FUSE connection at `mountpoint`; returns its /dev/fuse and connection
/// id. The kernel sends INIT next; nothing on the mount works until it is answered.
pub fn mount(mountpoint: &Path, opts: &MountOptions) -> Result<FuseDev> {
    // Resolved now: afterwards, resolving a path through the mount needs the daemon, and
    // mountinfo names the mount by its resolved path.
    let resolved =
        std::fs::canonicalize(mountpoint).map_err(|e| IoError::new("resolve", mountpoint, e))?;
    let mountpoint = resolved.as_path();
    let mut dev = FuseDev::open()?;
    // default_permissions: the kernel checks modes and owners; the daemon checks nothing.
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions{}",
        dev.as_raw_fd(),
        if opts.allow_other { ",allow_other" } else { "" }
    );
    let cstr = |s: &[u8]| {
        CString::new(s).map_err(|_| {
            IoError::new(
                "mount",
                mountpoint,
                io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in mount argument"),
            )
        })
    };
    let target = cstr(mountpoint.as_os_str().as_bytes())?;
    let source = cstr(opts.source.as_bytes())?;
    let fstype = cstr(FSTYPE.as_bytes())?;
    let data = cstr(data.as_bytes())?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(IoError::new(
            "mount fuse.cstore on",
            mountpoint,
            io::Error::last_os_error(),
        )
        .into());
    }
    match conn_of_mount(mountpoint) {
        Ok(c) => dev.set_conn(c),
        Err(e) => {
            let _ = unmount(mountpoint, true);
            return Err(e);
        }
    }
    Ok(dev)
}

/// Unmounts `mountpoint`. With `lazy`, cstore_os's unmount: a busy mount is detached
/// (MNT_DETACH) and the connection ends when its last user goes. Without, a busy mount
/// is an error (EBUSY) the caller can wait out.
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<()> {
    if lazy {
        return Ok(cstore_os::mount::unmount(mountpoint)?);
    }
    let target = sys::cstring(mountpoint.as_os_str().as_bytes())
        .map_err(|e| IoError::new("umount", mountpoint, e))?;
    // SAFETY: target is a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
        return Err(IoError::new("umount", mountpoint, io::Error::last_os_error()).into());
    }
    Ok(())
}

/// A FUSE connection: the anonymous device number of its superblock. It names the
/// connection's fusectl directory and its bdi.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ConnId {
    pub major: u32,
    pub minor: u32,
}

impl ConnId {
    /// The kernel's `dev_t` (`MKDEV`), the name of the fusectl directory.
    pub fn kernel_dev(&self) -> u64 {
        ((self.major as u64) << 20) | self.minor as u64
    }

    /// `/sys/class/bdi/MAJ:MIN`.
    pub fn bdi_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/class/bdi/{}:{}", self.major, self.minor))
    }

    /// Sets the bdi's readahead, which sizes the kernel's READ requests (capped by
    /// max_pages): 128 KiB gives 256 KiB READs, 1024 KiB gives 1 MiB READs.
    pub fn set_read_ahead_kb(&self, kb: u32) -> Result<()> {
        let p = self.bdi_dir().join("read_ahead_kb");
        std::fs::write(&p, format!("{kb}\n")).map_err(|e| IoError::new("write", p, e).into())
    }

    pub fn read_ahead_kb(&self) -> Result<u32> {
        read_number(self.bdi_dir().join("read_ahead_kb"))
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// The connection of the topmost `fuse.cstore` mount at `mountpoint` (a resolved path:
/// resolving it through the mount would need the daemon), from /proc/self/mountinfo
/// (stat(2) of the mount would need the daemon too).
pub fn conn_of_mount(mountpoint: &Path) -> Result<ConnId> {
    let mounts = mountinfo::read().map_err(|e| IoError::new("read", MOUNTINFO, e))?;
    let want =
        std::path::absolute(mountpoint).map_err(|e| IoError::new("resolve", mountpoint, e))?;
    conn_in_mountinfo(&mounts, &want).ok_or_else(|| Error::NotMounted(mountpoint.to_path_buf()))
}

/// The last (topmost) `fuse.cstore` mount at `mountpoint` among `mounts`.
pub fn conn_in_mountinfo(mounts: &[MountInfo], mountpoint: &Path) -> Option<ConnId> {
    mounts
        .iter()
        .rev()
        .find(|m| m.fs_type == FSTYPE && m.mount_point == mountpoint)
        .map(|m| ConnId {
            major: m.major,
            minor: m.minor,
        })
}

/// The FUSE control filesystem (`fusectl`): per connection `abort` and `waiting`.
/// Uses /sys/fs/fuse/connections when mounted there; otherwise mounts a private
/// instance (it is one superblock however often mounted) in a temporary directory,
/// unmounted when this is dropped.
#[derive(Debug)]
pub struct Fusectl {
    root: PathBuf,
    private: bool,
}

/// fusectl and sysfs (here and `ConnId::bdi_dir`) are the kernel's: nobody but root
/// makes or replaces anything in them, and the names below them are numbers from
/// mountinfo, so they are read and written by path.
const FUSECTL_SYS: &str = "/sys/fs/fuse/connections";

impl Fusectl {
    pub fn open() -> Result<Fusectl> {
        let mounts = mountinfo::read().map_err(|e| IoError::new("read", MOUNTINFO, e))?;
        if mountinfo::find(&mounts, Path::new(FUSECTL_SYS)).is_some_and(|m| m.fs_type == "fusectl")
        {
            return Ok(Fusectl {
                root: FUSECTL_SYS.into(),
                private: false,
            });
        }
        // Ours alone: create_dir fails on any name already there (a planted symlink
        // too), and in the sticky temp dir nobody else can rename or replace it, so the
        // mount and the writes under it land on this directory.
        let dir = std::env::temp_dir().join(format!(
            "cstore-fusectl-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir(&dir).map_err(|e| IoError::new("mkdir", &dir, e))?;
        let target = sys::cstring(dir.as_os_str().as_bytes())
            .map_err(|e| IoError::new("mount fusectl on", &dir, e))?;
        // SAFETY: NUL-terminated strings; the data argument may be null.
        let r = unsafe {
            libc::mount(
                c"fusectl".as_ptr(),
                target.as_ptr(),
                c"fusectl".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            return Err(IoError::new("mount fusectl on", dir, e).into());
        }
        Ok(Fusectl {
            root: dir,
            private: true,
        })
    }

    pub fn conn_dir(&self, conn: ConnId) -> PathBuf {
        self.root.join(conn.kernel_dev().to_string())
    }

    /// Aborts the connection: every waiting and future request fails with ENOTCONN, and
    /// the daemon's reads ENODEV. Bounded damage when no daemon can serve it.
    pub fn abort(&self, conn: ConnId) -> Result<()> {
        let p = self.conn_dir(conn).join("abort");
        std::fs::write(&p, b"1").map_err(|e| IoError::new("write", p, e).into())
    }

    /// How many requests wait for the daemon (pending + being processed).
    pub fn waiting(&self, conn: ConnId) -> Result<u64> {
        read_number(self.conn_dir(conn).join("waiting"))
    }
}

/// A number in a sysfs or fusectl file (`128\n`).
fn read_number<T: std::str::FromStr>(p: PathBuf) -> Result<T> {
    let s = std::fs::read_to_string(&p).map_err(|e| IoError::new("read", &p, e))?;
    let s = s.trim();
    s.parse().map_err(|_| {
        IoError::new(
            "parse",
            p,
            io::Error::new(io::ErrorKind::InvalidData, s.to_string()),
        )
        .into()
    })
}

impl Drop for Fusectl {
    fn drop(&mut self) {
        if self.private {
            let _ = unmount(&self.root, true);
            let _ = std::fs::remove_dir(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_topmost_cstore_mount_in_mountinfo() {
        let mi = "\
36 35 98:0 / /mnt/x rw,noatime master:1 - ext3 /dev/root rw,errors=continue
100 36 0:41 / /var/tmp/a\\040b rw,nosuid,nodev - fuse.cstore cstore rw,user_id=0
101 36 0:52 / /var/tmp/a\\040b ro,nosuid,nodev - fuse.cstore cstore ro,user_id=0
102 36 0:53 / /var/tmp/other ro - fuse.other x ro
103 36 0:54 / /var/tmp/opt ro shared:5 master:2 - fuse.cstore cstore ro
";
        let mi = &mountinfo::parse(mi);
        assert_eq!(
            conn_in_mountinfo(mi, Path::new("/var/tmp/a b")),
            Some(ConnId {
                major: 0,
                minor: 52
            })
        );
        assert_eq!(
            conn_in_mountinfo(mi, Path::new("/var/tmp/opt")),
            Some(ConnId {
                major: 0,
                minor: 54
            })
        );
        assert_eq!(conn_in_mountinfo(mi, Path::new("/var/tmp/other")), None);
        assert_eq!(conn_in_mountinfo(mi, Path::new("/mnt/x")), None);
    }

    #[test]
    fn conn_names_its_sysfs_dirs() {
        let c = ConnId {
            major: 0,
            minor: 41,
        };
        assert_eq!(c.kernel_dev(), 41);
        assert_eq!(c.bdi_dir(), Path::new("/sys/class/bdi/0:41"));
        assert_eq!(c.to_string(), "0:41");
    }
}
