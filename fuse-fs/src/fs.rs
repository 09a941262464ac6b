//! The interface a read-only filesystem implements to be served by a
//! [`Session`](crate::Session).
//!
//! Node ids are the inode numbers the fs reports (`Attr::ino`), stable for the life of
//! the mount and across daemon restarts (a resumed daemon gets requests for node ids
//! the previous one handed out), and never reused; the root is [`ROOT_ID`]. File
//! handles are the node ids too (stateless, so a READ on a file opened before a restart
//! is served after it), and directory offsets are child indexes.

use std::fmt;
use std::os::fd::OwnedFd;

use crate::abi::{self, Attr, Statfs, Ttl, Writer};

pub use crate::abi::ROOT_ID;

/// An errno for the reply (positive, e.g. `Errno::ENOENT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const E2BIG: Errno = Errno(libc::E2BIG);
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

/// How an open file is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Reads go through the daemon once, then the kernel's page cache keeps the data
    /// across opens (`FOPEN_KEEP_CACHE`): for files not complete yet.
    KeepCache,
    /// Reads go to a backing file in the kernel and never reach the daemon
    /// (`FOPEN_PASSTHROUGH`): for complete files. The session asks
    /// [`ReadOnlyFs::backing_file`] for the file the first time a node is opened so, keeps
    /// its backing id until unmount, and falls back to `KeepCache` if the kernel refuses.
    Passthrough,
    /// Every read goes to the daemon (`FOPEN_DIRECT_IO`), bypassing the page cache.
    Direct,
}

/// A read-only filesystem. Every method may be called from several worker threads at
/// once. Errors are errnos for the kernel; `ENOENT` from `lookup` becomes a cached
/// negative entry when the session has a negative TTL.
pub trait ReadOnlyFs: Send + Sync + 'static {
    /// The child `name` of directory `parent` (`name` is one component, never `.`/`..`
    /// from the kernel's dcache-resolved lookups).
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, Errno>;

    /// The kernel dropped `nlookup` references to `nodeid`. Node ids are stateless
    /// here, so the default ignores it.
    fn forget(&self, _nodeid: u64, _nlookup: u64) {}

    fn getattr(&self, nodeid: u64) -> Result<Attr, Errno>;

    fn readlink(&self, nodeid: u64) -> Result<Vec<u8>, Errno>;

    /// How to serve an open of a regular file (read-only: the mount is `ro`).
    fn open(&self, nodeid: u64) -> Result<Open, Errno>;

    /// A file with the node's complete contents on a non-stacked filesystem, for
    /// passthrough. Called at most once per node while its backing id lives.
    fn backing_file(&self, _nodeid: u64) -> Result<OwnedFd, Errno> {
        Err(Errno::ENOSYS)
    }

    /// Fills `out` (cleared) with up to `size` bytes at `offset`; fewer at end of file.
    fn read(&self, nodeid: u64, offset: u64, size: u32, out: &mut Vec<u8>) -> Result<(), Errno>;

    /// The last open of a file handle was closed.
    fn release(&self, _nodeid: u64) {}

    /// Whether `nodeid` may be opened as a directory.
    fn opendir(&self, nodeid: u64) -> Result<(), Errno> {
        if self.getattr(nodeid)?.is_dir() {
            Ok(())
        } else {
            Err(Errno::ENOTDIR)
        }
    }

    /// Adds the entries of `dir` from index `offset` on to `out` until it says it is
    /// full. The listing should begin with `.` and `..` and keep one order for the life
    /// of the mount: offsets are indexes into it.
    fn readdir(&self, dir: u64, offset: u64, out: &mut DirSink<'_>) -> Result<(), Errno>;

    /// The value of extended attribute `name`, `ENODATA` if it has none.
    fn getxattr(&self, _nodeid: u64, _name: &[u8]) -> Result<Vec<u8>, Errno> {
        Err(Errno::ENODATA)
    }

    /// Whether any node has an extended attribute (overlay's opaque marker included).
    /// Asked once per session: without any, GETXATTR is answered ENOSYS once and the
    /// kernel never asks again (every `getxattr` on the mount is then EOPNOTSUPP, which
    /// overlayfs and the usual tools take as "none"); overlayfs otherwise asks for
    /// `trusted.overlay.metacopy` at the lookup of every lower file, one round trip each.
    /// The answer must not change for the life of the connection (daemons included).
    fn has_xattrs(&self) -> bool {
        true
    }

    /// The node's extended attribute names, each NUL-terminated.
    fn listxattr(&self, _nodeid: u64) -> Result<Vec<u8>, Errno> {
        Ok(Vec::new())
    }

    fn statfs(&self) -> Statfs {
        Statfs {
            bsize: 4096,
            frsize: 4096,
            namelen: 255,
            ..Statfs::default()
        }
    }
}

/// Collects directory entries into a READDIR(PLUS) reply of at most the kernel's size.
#[derive(Debug)]
pub struct DirSink<'a> {
    w: &'a mut Writer,
    max: usize,
    plus: Option<(Ttl, Ttl)>,
    next_index: u64,
}

impl<'a> DirSink<'a> {
    /// A sink writing into `w` (cleared), starting at index `offset`.
    pub fn new(w: &'a mut Writer, max: usize, plus: Option<(Ttl, Ttl)>, offset: u64) -> Self {
        w.0.clear();
        DirSink {
            w,
            max,
            plus,
            next_index: offset,
        }
    }

    /// Adds the entry at the next index. Returns false (and adds nothing) when the
    /// reply is full; the kernel asks again from that index.
    pub fn add(&mut self, name: &[u8], attr: &Attr) -> bool {
        if self.w.0.len() + abi::dirent_len(self.plus.is_some(), name.len()) > self.max {
            return false;
        }
        self.next_index += 1;
        abi::encode_dirent(self.w, self.plus, name, attr, self.next_index);
        true
    }

    /// Whether anything was added.
    pub fn is_empty(&self) -> bool {
        self.w.0.is_empty()
    }
}
