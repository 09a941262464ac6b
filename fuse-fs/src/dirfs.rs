//! [`DirFs`]: a [`ReadOnlyFs`] presenting a directory tree as it was when loaded: the
//! reference implementation of the trait, used by the tests and the test daemon. The
//! layer filesystem over an index works the same way with the index in place of the
//! walk: node ids are entry numbers, metadata is answered from memory, and file data
//! comes from files on the store's filesystem (the passthrough backing files).
//!
//! The walk is fd-based and confined (openat2 beneath the root, no symlink followed),
//! as anything reading a tree cstore did not make must be. Node ids come from a
//! breadth-first walk in name order, so the same tree gets the same ids in every daemon
//! that loads it (a resumed daemon must agree with the kernel's cached node ids).
//! Hardlinked files share one node. Extended attributes of symlinks are not read (no
//! fd-based call reads them before Linux 6.13's getxattrat).

use cstore_os::IoError;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use crate::abi::{Attr, Statfs, ROOT_ID};
use crate::error::Result;
use crate::fs::{DirSink, Errno, Open, ReadOnlyFs};
use crate::util::{list_dir, open_beneath};

/// Largest xattr value read (the kernel's XATTR_SIZE_MAX).
const XATTR_MAX: usize = 64 * 1024;

#[derive(Debug)]
struct Node {
    attr: Attr,
    parent: u64,
    /// Path below the root, for opening the content.
    rel: PathBuf,
    /// Sorted by name.
    children: Vec<(Vec<u8>, u64)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    link: Option<Vec<u8>>,
}

/// A directory tree served read-only.
#[derive(Debug)]
pub struct DirFs {
    root: OwnedFd,
    nodes: Vec<Node>,
    open_mode: Open,
    read_delay: Duration,
    files: RwLock<HashMap<u64, std::sync::Arc<std::fs::File>>>,
}

impl DirFs {
    /// Loads the tree under `root`. Regular files are opened as `open_mode` says.
    pub fn load(root: &Path, open_mode: Open) -> Result<DirFs> {
        let rootfd = open_beneath(None, root, libc::O_DIRECTORY)
            .map_err(|e| IoError::new("open", root, e))?;
        let mut fs = DirFs {
            root: rootfd,
            nodes: Vec::new(),
            open_mode,
            read_delay: Duration::ZERO,
            files: RwLock::new(HashMap::new()),
        };
        let st = fstat(fs.root.as_fd()).map_err(|e| IoError::new("stat", root, e))?;
        fs.nodes.push(Node {
            attr: attr_of(&st, ROOT_ID),
            parent: ROOT_ID,
            rel: PathBuf::new(),
            children: Vec::new(),
            xattrs: xattrs_of(fs.root.as_fd())
                .map_err(|e| IoError::new("read xattrs of", root, e))?,
            link: None,
        });
        let mut by_inode: HashMap<(u64, u64), u64> = HashMap::new();
        let mut next = 0;
        while next < fs.nodes.len() {
            let id = next as u64 + 1;
            next += 1;
            if !fs.nodes[id as usize - 1].attr.is_dir() {
                continue;
            }
            let rel = fs.nodes[id as usize - 1].rel.clone();
            let here = root.join(&rel);
            let dir = if rel.as_os_str().is_empty() {
                fs.root
                    .try_clone()
                    .map_err(|e| IoError::new("dup", &here, e))?
            } else {
                open_beneath(Some(&fs.root), &rel, libc::O_DIRECTORY)
                    .map_err(|e| IoError::new("open", &here, e))?
            };
            let dup = dir.try_clone().map_err(|e| IoError::new("dup", &here, e))?;
            let mut names: Vec<Vec<u8>> = list_dir(dup)
                .map_err(|e| IoError::new("list", &here, e))?
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            names.sort();
            let mut children = Vec::with_capacity(names.len());
            for name in names {
                let crel = rel.join(std::ffi::OsStr::from_bytes(&name));
                let p = root.join(&crel);
                let f = openat_path(&dir, &name).map_err(|e| IoError::new("open", &p, e))?;
                let st = fstat(f.as_fd()).map_err(|e| IoError::new("stat", &p, e))?;
                let key = (st.st_dev, st.st_ino);
                let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                if !is_dir && st.st_nlink > 1 {
                    if let Some(&cid) = by_inode.get(&key) {
                        children.push((name, cid));
                        continue;
                    }
                }
                let cid = fs.nodes.len() as u64 + 1;
                let is_link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
                let link = if is_link {
                    Some(readlink_fd(&f).map_err(|e| IoError::new("readlink", &p, e))?)
                } else {
                    None
                };
                let xattrs = if is_link {
                    Vec::new()
                } else {
                    xattrs_of(f.as_fd()).map_err(|e| IoError::new("read xattrs of", &p, e))?
                };
                if !is_dir && st.st_nlink > 1 {
                    by_inode.insert(key, cid);
                }
                fs.nodes.push(Node {
                    attr: attr_of(&st, cid),
                    parent: id,
                    rel: crel,
                    children: Vec::new(),
                    xattrs,
                    link,
                });
                children.push((name, cid));
            }
            fs.nodes[id as usize - 1].children = children;
        }
        Ok(fs)
    }

    /// Sleeps this long in every READ (tests use it so a killed daemon dies mid-request).
    pub fn with_read_delay(mut self, d: Duration) -> Self {
        self.read_delay = d;
        self
    }

    /// The number of nodes (distinct inodes).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn node(&self, id: u64) -> std::result::Result<&Node, Errno> {
        id.checked_sub(1)
            .and_then(|i| self.nodes.get(i as usize))
            .ok_or(Errno::ENOENT)
    }

    fn open_content(&self, id: u64) -> std::result::Result<std::fs::File, Errno> {
        let n = self.node(id)?;
        if !n.attr.is_reg() {
            return Err(Errno::EINVAL);
        }
        let fd = open_beneath(Some(&self.root), &n.rel, 0)?;
        Ok(std::fs::File::from(fd))
    }

    fn file(&self, id: u64) -> std::result::Result<std::sync::Arc<std::fs::File>, Errno> {
        if let Some(f) = self
            .files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(f.clone());
        }
        let f = std::sync::Arc::new(self.open_content(id)?);
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, f.clone());
        Ok(f)
    }
}

impl ReadOnlyFs for DirFs {
    fn lookup(&self, parent: u64, name: &[u8]) -> std::result::Result<Attr, Errno> {
        let p = self.node(parent)?;
        if !p.attr.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        p.children
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .map(|i| self.nodes[p.children[i].1 as usize - 1].attr)
            .map_err(|_| Errno::ENOENT)
    }

    fn getattr(&self, nodeid: u64) -> std::result::Result<Attr, Errno> {
        Ok(self.node(nodeid)?.attr)
    }

    fn readlink(&self, nodeid: u64) -> std::result::Result<Vec<u8>, Errno> {
        self.node(nodeid)?.link.clone().ok_or(Errno::EINVAL)
    }

    fn open(&self, nodeid: u64) -> std::result::Result<Open, Errno> {
        let n = self.node(nodeid)?;
        if n.attr.is_dir() {
            return Err(Errno::EISDIR);
        }
        Ok(self.open_mode)
    }

    fn backing_file(&self, nodeid: u64) -> std::result::Result<OwnedFd, Errno> {
        Ok(self.open_content(nodeid)?.into())
    }

    fn read(
        &self,
        nodeid: u64,
        offset: u64,
        size: u32,
        out: &mut Vec<u8>,
    ) -> std::result::Result<(), Errno> {
        if !self.read_delay.is_zero() {
            std::thread::sleep(self.read_delay);
        }
        let f = self.file(nodeid)?;
        // pread into the buffer's spare capacity: zero-filling up to 1 MiB first, on
        // every READ, would only be overwritten.
        let size = size as usize;
        out.clear();
        out.reserve(size);
        let mut done = 0;
        while done < size {
            // SAFETY: the spare capacity holds at least `size` bytes; pread writes at most
            // `size - done` of them from offset `done`.
            let n = unsafe {
                libc::pread(
                    f.as_raw_fd(),
                    out.spare_capacity_mut()[done..].as_mut_ptr().cast(),
                    size - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e.into());
            }
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        // SAFETY: pread initialized the first `done` bytes.
        unsafe { out.set_len(done) };
        Ok(())
    }

    fn readdir(
        &self,
        dir: u64,
        offset: u64,
        out: &mut DirSink<'_>,
    ) -> std::result::Result<(), Errno> {
        let n = self.node(dir)?;
        if !n.attr.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let parent = self.node(n.parent)?;
        let total = n.children.len() as u64 + 2;
        for i in offset..total {
            let added = match i {
                0 => out.add(b".", &n.attr),
                1 => out.add(b"..", &parent.attr),
                _ => {
                    let (name, id) = &n.children[(i - 2) as usize];
                    out.add(name, &self.nodes[*id as usize - 1].attr)
                }
            };
            if !added {
                break;
            }
        }
        Ok(())
    }

    fn getxattr(&self, nodeid: u64, name: &[u8]) -> std::result::Result<Vec<u8>, Errno> {
        self.node(nodeid)?
            .xattrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .ok_or(Errno::ENODATA)
    }

    fn has_xattrs(&self) -> bool {
        self.nodes.iter().any(|n| !n.xattrs.is_empty())
    }

    fn listxattr(&self, nodeid: u64) -> std::result::Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        for (n, _) in &self.node(nodeid)?.xattrs {
            out.extend_from_slice(n);
            out.push(0);
        }
        Ok(out)
    }

    fn statfs(&self) -> Statfs {
        Statfs {
            files: self.nodes.len() as u64,
            bsize: 4096,
            frsize: 4096,
            namelen: 255,
            ..Statfs::default()
        }
    }
}

/// Opens one component of `dir` as an O_PATH fd, not following a symlink.
fn openat_path(dir: &OwnedFd, name: &[u8]) -> io::Result<OwnedFd> {
    open_beneath(
        Some(dir),
        Path::new(std::ffi::OsStr::from_bytes(name)),
        libc::O_PATH,
    )
}

fn fstat(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is live; st is writable. AT_EMPTY_PATH works on O_PATH fds.
    let r = unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn readlink_fd(fd: &OwnedFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: an empty path with an O_PATH symlink fd reads that link; buf is writable.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// The xattrs of a non-symlink, through /proc/self/fd (the f*xattr calls refuse O_PATH
/// fds, and a whiteout device cannot be opened otherwise).
fn xattrs_of(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let p = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut names = vec![0u8; XATTR_MAX];
    // SAFETY: p is NUL-terminated; names is writable for its length.
    let n = unsafe { libc::listxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::CString::new(name)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let mut v = vec![0u8; XATTR_MAX];
        // SAFETY: as above.
        let n =
            unsafe { libc::getxattr(p.as_ptr(), cname.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        v.truncate(n as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    Ok(out)
}

fn attr_of(st: &libc::stat, ino: u64) -> Attr {
    Attr {
        ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime,
        atime_nsec: st.st_atime_nsec as u32,
        mtime: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec as u32,
        ctime: st.st_ctime,
        ctime_nsec: st.st_ctime_nsec as u32,
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        blksize: 4096,
    }
}
