//! [`LayerFs`]: one layer, read-only, served from its index before its data is local
//! (docs/lazy.md, "Cache and completion").
//!
//! Metadata (lookup, getattr, readdir, readlink, xattrs) is answered from the index in
//! memory: the tree extraction would leave, with overlay whiteouts as char 0:0 and
//! opaque directories carrying `trusted.overlay.opaque=y`, so the mount stacks under
//! overlayfs like an unpacked layer. A node id is the entry number + 1 (FUSE's root is
//! 1, the index's is entry 0): stable across daemon restarts, and a hardlink is its
//! target's node.
//!
//! Data: a read finds the spans holding the bytes it needs and waits for them
//! ([`cache`]): a missing span is fetched through the [`SpanSource`] once however many
//! readers wait (adjacent missing spans in one request), checked against its sha256,
//! inflated from its checkpoint, and its bytes written into the files of the layer's
//! own tree (the directory that becomes the snapshot). The reader is then answered
//! from the tree file (the page cache has the bytes); a miss also queues, behind
//! on-demand reads, the spans after it in the same directory (look-ahead), and an
//! open the head of its file; the span is set in a bitmap
//! once blob copy and tree files are fdatasynced, and the bitmap synced too. A
//! file whose spans are all local is opened in passthrough, its tree file the backing
//! file. [`LayerFs::complete`] fetches the rest, verifies the whole layer and makes the
//! tree exactly what extraction makes ([`complete`]).

pub mod cache;
mod complete;
pub mod source;
mod tree;

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use cstore_index::{Index, Kind};

use crate::abi::{Attr, Statfs};
use crate::error::Result;
use crate::fs::{DirSink, Errno, Open, ReadOnlyFs};

pub use cache::{
    local_of, read_trace, Activity, CacheStats, LayerOptions, Local, MountingGuard, Priority,
};
pub use complete::build_index;
pub use source::{FileSource, SpanSource};

use cache::Layer;

/// The xattr overlayfs reads to know a lower directory is opaque.
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// A lazy layer served read-only.
pub struct LayerFs {
    layer: Arc<Layer>,
}

impl std::fmt::Debug for LayerFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerFs")
            .field("layer", &self.layer.name)
            .finish()
    }
}

impl LayerFs {
    /// Serves the layer described by `index` (validated here), its data from
    /// `source`. `cache_dir` holds the sparse blob copy, the span bitmap and the
    /// access trace (made if missing; what is there is resumed from); `tree` is the
    /// layer's own directory, filled in place. The fetcher threads start at once.
    pub fn open(
        index: Vec<u8>,
        source: Arc<dyn SpanSource>,
        cache_dir: &Path,
        tree: &Path,
        opts: LayerOptions,
    ) -> Result<LayerFs> {
        let layer = Layer::open(index, source, cache_dir, tree, opts)?;
        Ok(LayerFs { layer })
    }

    /// The index being served.
    pub fn index(&self) -> &Index<Vec<u8>> {
        &self.layer.idx
    }

    /// What the cache has done so far (fetches from the source, spans local).
    pub fn stats(&self) -> CacheStats {
        self.layer.stats()
    }

    /// Queues spans (from a recorded trace, [`cache::read_trace`]) for fetching
    /// ahead of background completion and behind on-demand reads; returns at once.
    pub fn prefetch(&self, spans: &[u32]) {
        self.layer
            .queue(spans.iter().map(|&s| s as usize).collect(), Priority::Trace);
    }

    /// Fetches every missing span (behind reads and prefetch), then verifies the
    /// layer (blob digest, diff_id, the entry table rebuilt from the tar equal to the
    /// index) and makes the tree what extraction makes. Any mismatch discards the
    /// tree and the cache and is returned as [`crate::Error::Completion`].
    pub fn complete(&self) -> Result<()> {
        complete::complete(&self.layer)
    }

    /// Gives this layer's implicit directories (made for a missing parent, never
    /// listed) the owner, mode and xattrs of the nearest lower layer's directory, as
    /// the snapshotter fixes up an unpacked layer (docs/architecture.md): `lowers`
    /// are the indexes of the layers below, nearest first, looked up as overlayfs
    /// merges them. A whiteout, file or symlink on the way, a missing name below an
    /// opaque directory, or an opaque directory of this layer above the implicit one
    /// leaves the defaults. Served from then on, and applied to the tree at completion.
    pub fn inherit_implicit<B: AsRef<[u8]>>(&self, lowers: &[&Index<B>]) {
        let idx = &self.layer.idx;
        let mut out = std::collections::HashMap::new();
        'entries: for i in 0..idx.entry_count() {
            let e = idx.entry(i);
            if e.kind != Kind::Dir || !e.is_implicit() {
                continue;
            }
            // The path, root first; an opaque directory of this layer above stops it.
            let mut comps = Vec::new();
            let mut p = i;
            while p != 0 {
                comps.push(idx.name(p));
                p = idx.parent(p);
                if idx.entry(p).is_opaque() {
                    continue 'entries;
                }
            }
            comps.reverse();
            'lowers: for low in lowers {
                let mut cur = 0u32;
                for c in &comps {
                    match low.lookup(cur, c) {
                        Some(n) if low.entry(n).kind == Kind::Dir => cur = n,
                        Some(_) => continue 'entries,
                        None if low.entry(cur).is_opaque() => continue 'entries,
                        None => continue 'lowers,
                    }
                }
                let d = low.entry(cur);
                let xattrs = low
                    .xattrs(cur)
                    .filter(|(k, _)| cstore_index::xattr_allowed(k))
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect();
                out.insert(
                    i,
                    cache::Inherited {
                        uid: d.uid,
                        gid: d.gid,
                        perm: d.mode & 0o7777,
                        xattrs,
                    },
                );
                continue 'entries;
            }
        }
        *self
            .layer
            .inherited
            .write()
            .unwrap_or_else(|p| p.into_inner()) = out;
    }

    fn inherited(&self, i: u32) -> Option<cache::Inherited> {
        self.layer
            .inherited
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&i)
            .cloned()
    }

    /// Whether the layer was completed (now or by an earlier daemon).
    pub fn is_complete(&self) -> bool {
        self.layer.is_complete()
    }

    /// Stops the fetcher threads (readers waiting get EIO). Also on drop.
    pub fn shutdown(&self) {
        self.layer.shutdown();
    }

    fn entry_of(&self, nodeid: u64) -> std::result::Result<u32, Errno> {
        nodeid
            .checked_sub(1)
            .and_then(|i| u32::try_from(i).ok())
            .filter(|&i| i < self.layer.idx.entry_count())
            .ok_or(Errno::ENOENT)
    }

    /// A hardlink is its target: one inode.
    fn resolve(&self, i: u32) -> u32 {
        self.layer.idx.entry(i).hardlink_target().unwrap_or(i)
    }

    fn attr(&self, i: u32) -> Attr {
        let idx = &self.layer.idx;
        let t = self.resolve(i);
        let e = idx.entry(t);
        let size = match e.kind {
            Kind::File | Kind::Symlink => e.size,
            Kind::Dir => 4096,
            _ => 0,
        };
        let rdev = match e.rdev() {
            Some((maj, min)) => libc::makedev(maj, min),
            None => 0,
        };
        let mut a = Attr {
            ino: u64::from(t) + 1,
            size,
            blocks: size.div_ceil(512),
            atime: e.mtime.0,
            atime_nsec: e.mtime.1,
            mtime: e.mtime.0,
            mtime_nsec: e.mtime.1,
            ctime: e.mtime.0,
            ctime_nsec: e.mtime.1,
            mode: e.mode,
            nlink: idx.nlink(t),
            uid: e.uid,
            gid: e.gid,
            rdev,
            blksize: 4096,
        };
        if let Some(h) = self.inherited(t) {
            a.uid = h.uid;
            a.gid = h.gid;
            a.mode = (e.mode & libc::S_IFMT) | h.perm;
        }
        a
    }
}

impl Drop for LayerFs {
    fn drop(&mut self) {
        self.layer.shutdown();
    }
}

impl ReadOnlyFs for LayerFs {
    fn lookup(&self, parent: u64, name: &[u8]) -> std::result::Result<Attr, Errno> {
        let p = self.entry_of(parent)?;
        if self.layer.idx.entry(p).kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let c = self.layer.idx.lookup(p, name).ok_or(Errno::ENOENT)?;
        Ok(self.attr(c))
    }

    fn getattr(&self, nodeid: u64) -> std::result::Result<Attr, Errno> {
        Ok(self.attr(self.entry_of(nodeid)?))
    }

    fn readlink(&self, nodeid: u64) -> std::result::Result<Vec<u8>, Errno> {
        let i = self.entry_of(nodeid)?;
        self.layer
            .idx
            .link_target(i)
            .map(|t| t.to_vec())
            .ok_or(Errno::EINVAL)
    }

    fn open(&self, nodeid: u64) -> std::result::Result<Open, Errno> {
        let i = self.resolve(self.entry_of(nodeid)?);
        match self.layer.idx.entry(i).kind {
            Kind::File => {}
            Kind::Dir => return Err(Errno::EISDIR),
            _ => return Err(Errno::EINVAL),
        }
        Ok(if self.layer.file_complete(i) {
            // Traced all the same: its reads will not reach the daemon.
            self.layer.open_ahead(i);
            Open::Passthrough
        } else {
            self.layer.open_ahead(i);
            Open::KeepCache
        })
    }

    fn backing_file(&self, nodeid: u64) -> std::result::Result<OwnedFd, Errno> {
        let i = self.resolve(self.entry_of(nodeid)?);
        if !self.layer.file_complete(i) {
            return Err(Errno::EIO);
        }
        self.layer.open_tree_file_ro(i).map_err(|e| {
            tracing::warn!("{}: backing file of entry {i}: {e}", self.layer.name);
            Errno::EIO
        })
    }

    fn read(
        &self,
        nodeid: u64,
        offset: u64,
        size: u32,
        out: &mut Vec<u8>,
    ) -> std::result::Result<(), Errno> {
        let i = self.resolve(self.entry_of(nodeid)?);
        let e = self.layer.idx.entry(i);
        if e.kind != Kind::File {
            return Err(Errno::EINVAL);
        }
        out.clear();
        let end = offset.saturating_add(u64::from(size)).min(e.size);
        if offset >= end {
            return Ok(());
        }
        self.layer.ensure_file_range(i, offset..end).map_err(|e| {
            tracing::warn!("{}: read of entry {i}: {e}", self.layer.name);
            Errno::EIO
        })?;
        self.layer.read_file(i, offset..end, out).map_err(|e| {
            tracing::warn!("{}: reading entry {i}: {e}", self.layer.name);
            Errno::EIO
        })
    }

    fn readdir(
        &self,
        dir: u64,
        offset: u64,
        out: &mut DirSink<'_>,
    ) -> std::result::Result<(), Errno> {
        let d = self.entry_of(dir)?;
        let idx = &self.layer.idx;
        if idx.entry(d).kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let children = idx.children(d);
        let total = children.len() as u64 + 2;
        for k in offset..total {
            let added = match k {
                0 => out.add(b".", &self.attr(d)),
                1 => out.add(b"..", &self.attr(idx.parent(d))),
                _ => {
                    let c = children[(k - 2) as usize];
                    out.add(idx.name(c), &self.attr(c))
                }
            };
            if !added {
                break;
            }
        }
        Ok(())
    }

    fn getxattr(&self, nodeid: u64, name: &[u8]) -> std::result::Result<Vec<u8>, Errno> {
        let i = self.resolve(self.entry_of(nodeid)?);
        let idx = &self.layer.idx;
        if name == OPAQUE_XATTR && idx.entry(i).is_opaque() {
            return Ok(b"y".to_vec());
        }
        if let Some(h) = self.inherited(i) {
            return h
                .xattrs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .ok_or(Errno::ENODATA);
        }
        idx.xattrs(i)
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_vec())
            .ok_or(Errno::ENODATA)
    }

    /// An entry's own xattrs, an opaque directory's marker, or xattrs an implicit
    /// directory inherited: the same things `getxattr` answers from.
    fn has_xattrs(&self) -> bool {
        let idx = &self.layer.idx;
        let inherited = self
            .layer
            .inherited
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|h| !h.xattrs.is_empty());
        inherited
            || (0..idx.entry_count())
                .any(|i| idx.entry(i).is_opaque() || idx.xattrs(i).next().is_some())
    }

    fn listxattr(&self, nodeid: u64) -> std::result::Result<Vec<u8>, Errno> {
        let i = self.resolve(self.entry_of(nodeid)?);
        let idx = &self.layer.idx;
        let mut out = Vec::new();
        match self.inherited(i) {
            Some(h) => {
                for (k, _) in &h.xattrs {
                    out.extend_from_slice(k);
                    out.push(0);
                }
            }
            None => {
                for (k, _) in idx.xattrs(i) {
                    out.extend_from_slice(k);
                    out.push(0);
                }
            }
        }
        if idx.entry(i).is_opaque() {
            out.extend_from_slice(OPAQUE_XATTR);
            out.push(0);
        }
        Ok(out)
    }

    fn statfs(&self) -> Statfs {
        Statfs {
            files: u64::from(self.layer.idx.entry_count()),
            bsize: 4096,
            frsize: 4096,
            namelen: 255,
            ..Statfs::default()
        }
    }
}

/// The layer tree's root, opened from a path of the caller's own (not a symlink).
fn open_root(tree: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(tree)?;
    Ok(f.into())
}
