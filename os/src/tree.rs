//! Directories inside a tree the store does not control (a layer, an active
//! snapshot's upper dir), reached and changed only through file descriptors.
//!
//! A tree's contents come from an image or a container, so any name in it
//! may be a symlink to a host path, and may change into one. Nothing here
//! takes a path inside a tree by string: a tree's root is opened from the
//! store's own path with O_NOFOLLOW, everything below it with openat2
//! (RESOLVE_BENEATH | NO_SYMLINKS | NO_MAGICLINKS | NO_XDEV) from a directory
//! fd, and owner, mode and xattrs are changed through the fd that was opened
//! (fchown, fchmod, fsetxattr), which O_DIRECTORY guarantees is a directory.
//! `tree_usage` walks a tree the same way.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use std::collections::HashSet;

use crate::sys;

/// Overlay's marks on a directory: never copied from one directory to
/// another (a lower directory's opaque mark would make the upper one hide
/// what is below it), and never taken from an archive.
pub fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// A directory of a tree, open for reading (so its xattrs can be read and
/// its owner and mode changed through the fd).
#[derive(Debug)]
pub struct TreeDir {
    fd: OwnedFd,
}

impl AsFd for TreeDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl TreeDir {
    /// The root of a tree at `path`, a path of the store's own (such as
    /// ROOT/snapshots/ID/fs): it must be a directory, not a symlink to one
    /// (ENOTDIR).
    pub fn open_root(path: &Path) -> io::Result<TreeDir> {
        let c = sys::cstring(path.as_os_str().as_encoded_bytes())?;
        // SAFETY: plain open of a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd we own.
        Ok(TreeDir {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The directory at `rel` below this one (`/`-separated names; empty:
    /// this one again). ENOENT if a name on the way is missing, ENOTDIR if
    /// one is something else (a symlink at the end included), ELOOP if one
    /// before the end is a symlink, EXDEV if the way leaves the tree or its
    /// filesystem: no symlink is ever followed.
    pub fn open_dir(&self, rel: &[u8]) -> io::Result<TreeDir> {
        let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
        let c = sys::cstring(rel)?;
        let fd = sys::resolve_beneath(
            self.fd.as_fd(),
            &c,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )?;
        Ok(TreeDir { fd })
    }

    pub fn stat(&self) -> io::Result<libc::stat> {
        sys::fstat(self.fd.as_fd())
    }

    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        sys::fchown(self.fd.as_fd(), uid, gid)
    }

    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        sys::fchmod(self.fd.as_fd(), mode)
    }

    pub fn xattr(&self, name: &CStr) -> io::Result<Option<Vec<u8>>> {
        sys::fgetxattr(self.fd.as_fd(), name)
    }

    pub fn set_xattr(&self, name: &CStr, value: &[u8]) -> io::Result<()> {
        sys::fsetxattr(self.fd.as_fd(), name, value)
    }

    /// Every xattr (name, value) but overlay's own.
    pub fn xattrs(&self) -> io::Result<Vec<(CString, Vec<u8>)>> {
        let mut out = Vec::new();
        for name in sys::flistxattr(self.fd.as_fd())? {
            if is_overlay_xattr(name.to_bytes()) {
                continue;
            }
            // Gone between list and get: nothing to copy.
            if let Some(v) = sys::fgetxattr(self.fd.as_fd(), &name)? {
                out.push((name, v));
            }
        }
        Ok(out)
    }

    /// Does overlayfs treat this directory as opaque (hiding the lower
    /// layers' directory of the same path)?
    pub fn is_opaque(&self) -> io::Result<bool> {
        Ok(self
            .xattr(c"trusted.overlay.opaque")?
            .is_some_and(|v| v == b"y"))
    }

    /// Give this directory the owner, mode and xattrs (but overlay's) of
    /// `from`: what a directory that stands for `from` in an upper layer
    /// needs so the merged directory looks like `from`. Owner first: chown
    /// may clear setuid/setgid bits that the mode then sets again.
    pub fn copy_attrs_from(&self, from: &TreeDir) -> io::Result<()> {
        let st = from.stat()?;
        self.chown(st.st_uid, st.st_gid)?;
        self.chmod(st.st_mode & 0o7777)?;
        for (name, value) in from.xattrs()? {
            self.set_xattr(&name, &value)?;
        }
        Ok(())
    }
}

/// What a directory tree holds, each inode counted once (hardlinks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Apparent bytes of everything but directories.
    pub file_bytes: u64,
    /// Bytes allocated on disk, directories included (containerd's usage).
    pub allocated: u64,
    pub inodes: u64,
}

/// Walk `dir` (a missing one is empty). Its trees change under the walk (a
/// running container's upper dir) and are the images' and containers': the
/// walk goes by directory fd, opening each subdirectory with openat2
/// (RESOLVE_BENEATH | NO_SYMLINKS | NO_XDEV) from its parent's fd, so a
/// directory swapped for a symlink to `/` is skipped, not walked.
pub fn tree_usage(dir: &Path) -> TreeUsage {
    let mut u = TreeUsage::default();
    let Ok(top) = TreeDir::open_root(dir) else {
        return u;
    };
    let Ok(top) = sys::resolve_beneath(top.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY)
    else {
        return u;
    };
    // Subdirectories are opened when their turn comes, so only the
    // directories on the way down with subdirectories left stay open.
    let top = std::rc::Rc::new(top);
    let mut stack: Vec<(std::rc::Rc<std::os::fd::OwnedFd>, Option<std::ffi::CString>)> =
        vec![(top, None)];
    let mut seen = HashSet::new();
    while let Some((parent, name)) = stack.pop() {
        let d = match name {
            None => parent,
            Some(n) => {
                match sys::resolve_beneath(parent.as_fd(), &n, libc::O_RDONLY | libc::O_DIRECTORY) {
                    Ok(fd) => std::rc::Rc::new(fd),
                    Err(_) => continue,
                }
            }
        };
        let Ok(names) = sys::read_names(d.as_fd()) else {
            continue;
        };
        for (name, _) in names {
            let Ok(st) = sys::lstatat(d.as_fd(), &name) else {
                continue;
            };
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            if is_dir {
                stack.push((d.clone(), Some(name)));
            }
            if seen.insert((st.st_dev, st.st_ino)) {
                u.inodes += 1;
                u.allocated += st.st_blocks as u64 * 512;
                if !is_dir {
                    u.file_bytes += st.st_size as u64;
                }
            }
        }
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn nothing_outside_the_tree_is_reached() {
        let t = tempfile::tempdir().unwrap();
        let host = t.path().join("host");
        let tree = t.path().join("tree");
        std::fs::create_dir_all(host.join("secret")).unwrap();
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::os::unix::fs::symlink(&host, tree.join("abs")).unwrap();
        std::os::unix::fs::symlink("../host", tree.join("rel")).unwrap();
        std::os::unix::fs::symlink("a", tree.join("inside")).unwrap();
        std::fs::write(tree.join("file"), "").unwrap();
        let root = TreeDir::open_root(&tree).unwrap();
        let code = |rel: &str| root.open_dir(rel.as_bytes()).unwrap_err().raw_os_error();
        for rel in ["abs/secret", "rel/secret", "inside/b"] {
            assert_eq!(code(rel), Some(libc::ELOOP), "{rel}");
        }
        // A symlink at the end is not a directory (O_DIRECTORY|O_NOFOLLOW).
        for rel in ["abs", "inside"] {
            assert_eq!(code(rel), Some(libc::ENOTDIR), "{rel}");
        }
        assert_eq!(code("file"), Some(libc::ENOTDIR));
        assert_eq!(code("file/x"), Some(libc::ENOTDIR));
        assert_eq!(code("missing/x"), Some(libc::ENOENT));
        assert_eq!(code("../host"), Some(libc::EXDEV));
        // The root itself is never a symlink either.
        let e = TreeDir::open_root(&tree.join("abs")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));

        // Attributes go through the fd of the directory that was opened.
        let b = root.open_dir(b"a/b").unwrap();
        let from = TreeDir::open_root(&host.join("secret")).unwrap();
        from.chmod(0o2750).unwrap();
        from.chown(7, 8).unwrap();
        from.set_xattr(c"user.cstore", b"v").unwrap();
        from.set_xattr(c"trusted.overlay.opaque", b"y").unwrap();
        assert!(from.is_opaque().unwrap());
        b.copy_attrs_from(&from).unwrap();
        let m = std::fs::metadata(tree.join("a/b")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (7, 8, 0o2750));
        assert_eq!(b.xattr(c"user.cstore").unwrap().as_deref(), Some(&b"v"[..]));
        assert!(!b.is_opaque().unwrap(), "overlay's marks are not copied");
    }

    // Every name is read (more than one getdents64 buffer), a hardlinked
    // inode counts once, and a symlink to a directory outside (what a
    // container can swap in for one of its directories) is not walked.
    #[test]
    fn tree_usage_counts_the_tree_and_nothing_behind_its_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("big"), vec![1u8; 1 << 20]).unwrap();
        let tree = t.path().join("tree");
        std::fs::create_dir_all(tree.join("d/e")).unwrap();
        let long = "n".repeat(200);
        for i in 0..1000 {
            std::fs::write(tree.join("d").join(format!("{long}{i}")), b"x").unwrap();
        }
        std::fs::write(tree.join("d/e/f"), b"12345").unwrap();
        std::fs::hard_link(tree.join("d/e/f"), tree.join("link")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("d/e/away")).unwrap();
        let u = tree_usage(&tree);
        // d, d/e, 1000 files, f (link is the same inode), the symlink.
        assert_eq!(u.inodes, 2 + 1000 + 1 + 1);
        let away = outside.to_str().unwrap().len() as u64;
        assert_eq!(u.file_bytes, 1000 + 5 + away);
        assert_eq!(tree_usage(&t.path().join("missing")), TreeUsage::default());
    }
}
