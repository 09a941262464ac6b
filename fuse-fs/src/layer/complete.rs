//! Completion: every span local → the sparse blob's sha256 must be the layer digest;
//! one streaming inflate of it checks the diff_id and rebuilds the entry table from
//! the verified tar, which must equal the index that was served; then the entries no
//! file data made (directories, links, devices, fifos, whiteouts, empty files) are
//! made and owners, modes, xattrs and mtimes set as extraction sets them. Any
//! mismatch discards the tree and the cache and reports the layer.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};

use cstore_index::compare::{compare, CompareOptions};
use cstore_index::{Index, IndexingReader, Kind, Policy, Source, TarEntry, TarKind, TreeBuilder};
use cstore_unpack::tar::{Kind as TK, TarReader};
use sha2::{Digest, Sha256};

use super::cache::{Layer, COMPLETE};
use super::tree;
use crate::error::{Error, Result};

/// Why a layer failed verification (the tree is discarded).
fn mismatch(l: &Layer, reason: impl Into<String>) -> Error {
    Error::Completion {
        layer: l.name.clone(),
        reason: reason.into(),
    }
}

pub(crate) fn complete(l: &Layer) -> Result<()> {
    if l.is_complete() {
        return Ok(());
    }
    l.fetch_all()?;
    if let Err(e) = verify(l) {
        discard(l);
        return Err(e);
    }
    finish_tree(l).map_err(|e| Error::Layer {
        layer: l.name.clone(),
        reason: format!("making the tree: {e}"),
    })?;
    tree::syncfs(l.tree.as_fd()).map_err(|e| Error::io("syncfs", &l.dir, e))?;
    let marker = l.dir.join(COMPLETE);
    std::fs::write(&marker, b"").map_err(|e| Error::io("write", &marker, e))?;
    l.set_complete(true);
    Ok(())
}

/// The tree and the cache go: nothing unverified stays.
fn discard(l: &Layer) {
    if let Err(e) = tree::clear_dir(l.tree.as_fd()) {
        tracing::warn!("{}: discarding the tree: {e}", l.name);
    }
    if let Err(e) = l.reset() {
        tracing::warn!("{}: discarding the cache: {e}", l.name);
    }
}

/// Counts what the tar reader consumed: an entry's data offset.
struct Counting<R> {
    inner: R,
    n: std::rc::Rc<std::cell::Cell<u64>>,
    h: Sha256,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n.set(self.n.get() + n as u64);
        self.h.update(&buf[..n]);
        Ok(n)
    }
}

fn tar_kind(k: TK) -> TarKind {
    match k {
        TK::File => TarKind::File,
        TK::Dir => TarKind::Dir,
        TK::Symlink => TarKind::Symlink,
        TK::Hardlink => TarKind::Hardlink,
        TK::Char => TarKind::Char,
        TK::Block => TarKind::Block,
        TK::Fifo => TarKind::Fifo,
    }
}

/// One pass over a compressed layer: checkpoints (and windows into `windows`), the
/// entry table as extraction leaves the tree, and the tar's sha256 (the diff_id).
fn scan<R: Read, W: io::Write>(
    blob: R,
    compression: cstore_index::Compression,
    policy: Policy,
    tree_opts: cstore_index::TreeOptions,
    windows: W,
) -> std::result::Result<
    (
        cstore_index::Checkpoints,
        W,
        Vec<cstore_index::EntryRec>,
        [u8; 32],
    ),
    String,
> {
    let ir = IndexingReader::new(blob, compression, policy, windows);
    let count = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let mut tr = TarReader::new(Counting {
        inner: ir,
        n: count.clone(),
        h: Sha256::new(),
    });
    let mut tb = TreeBuilder::new(tree_opts);
    loop {
        let e = match tr.next_entry() {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) => return Err(format!("the layer's tar: {e}")),
        };
        let mut t = TarEntry::new(&e.path, tar_kind(e.kind));
        t.mode = e.mode;
        t.uid = e.uid;
        t.gid = e.gid;
        t.mtime = e.mtime;
        t.size = e.size;
        t.data_offset = count.get();
        t.link = &e.link;
        t.dev = (e.dev_major, e.dev_minor);
        t.xattrs = &e.xattrs;
        t.sparse = e.sparse.as_deref();
        tb.add(&t).map_err(|e| format!("the layer's tar: {e}"))?;
    }
    let mut rest = tr.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| format!("inflating: {e}"))?;
    let Counting { inner, h, .. } = rest;
    let diff_id: [u8; 32] = h.finalize().into();
    let (cp, w) = inner.finish().map_err(|e| format!("inflating: {e}"))?;
    let entries = tb.finish().map_err(|e| format!("the layer's tar: {e}"))?;
    Ok((cp, w, entries, diff_id))
}

/// The index of a local layer blob and its windows blob, built as the unpack pass
/// builds it (for serving a local blob lazily: tests, `cstore-fuse-testd`).
pub fn build_index(
    blob: &std::path::Path,
    compression: cstore_index::Compression,
    policy: Policy,
    tree_opts: cstore_index::TreeOptions,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let f = File::open(blob).map_err(|e| Error::io("open", blob, e))?;
    let digest = {
        let mut h = Sha256::new();
        io::copy(&mut &f, &mut h).map_err(|e| Error::io("read", blob, e))?;
        let d: [u8; 32] = h.finalize().into();
        d
    };
    let f = File::open(blob).map_err(|e| Error::io("open", blob, e))?;
    let bad = |reason: String| Error::Layer {
        layer: format!("sha256:{}", hex::encode(digest)),
        reason,
    };
    let (cp, windows, entries, diff_id) = scan(
        BufReader::with_capacity(1 << 20, f),
        compression,
        policy,
        tree_opts,
        Vec::new(),
    )
    .map_err(bad)?;
    let index = cp
        .into_builder(entries, digest, diff_id)
        .encode()
        .map_err(|e| bad(format!("encoding the index: {e}")))?;
    Ok((index, windows))
}

fn verify(l: &Layer) -> Result<()> {
    let h = *l.idx.header();
    let blob =
        File::open(l.dir.join("blob")).map_err(|e| Error::io("open", l.dir.join("blob"), e))?;
    let len = blob.metadata().map(|m| m.len()).unwrap_or(0);
    if len != h.compressed_size {
        return Err(mismatch(
            l,
            format!(
                "the blob copy is {len} bytes, the layer {}",
                h.compressed_size
            ),
        ));
    }
    // The blob's own digest first: nothing is inflated from a blob that is not
    // the layer.
    let blob_digest = blob_sha256(l)?;
    if blob_digest != h.layer_digest {
        return Err(mismatch(
            l,
            format!(
                "the blob's digest is sha256:{}, the layer's sha256:{}",
                hex::encode(blob_digest),
                hex::encode(h.layer_digest)
            ),
        ));
    }
    let policy = Policy {
        span_target: h.span_target,
        ..Policy::default()
    };
    let (cp, _, entries, diff_id) = scan(
        BufReader::with_capacity(1 << 20, blob),
        h.compression,
        policy,
        l.opts.tree,
        io::sink(),
    )
    .map_err(|e| mismatch(l, e))?;
    if diff_id != h.diff_id {
        return Err(mismatch(
            l,
            format!(
                "the tar's digest is sha256:{}, the layer's diff_id sha256:{}",
                hex::encode(diff_id),
                hex::encode(h.diff_id)
            ),
        ));
    }
    let rebuilt = cp
        .into_builder(entries, blob_digest, diff_id)
        .encode()
        .map_err(|e| mismatch(l, format!("rebuilding the entry table: {e}")))?;
    let rebuilt = Index::parse(rebuilt).map_err(|e| mismatch(l, e.to_string()))?;
    let opts = if h.source == Source::Built {
        CompareOptions::default()
    } else {
        // Imports address payloads and keep whole seconds.
        CompareOptions {
            data_offsets: false,
            mtime_nanos: false,
        }
    };
    compare(&l.idx, &rebuilt, opts)
        .map_err(|m| mismatch(l, format!("the index does not describe the layer: {m}")))?;
    Ok(())
}

fn blob_sha256(l: &Layer) -> Result<[u8; 32]> {
    let p = l.dir.join("blob");
    let mut f = File::open(&p).map_err(|e| Error::io("open", &p, e))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(|e| Error::io("read", &p, e))?;
    Ok(h.finalize().into())
}

/// Opens entry `i` in `dir` for changing its attributes through the fd (a
/// directory or regular file).
fn open_entry(dir: &OwnedFd, name: &[u8], kind: Kind) -> io::Result<OwnedFd> {
    let flags = match kind {
        Kind::Dir => libc::O_RDONLY | libc::O_DIRECTORY,
        _ => libc::O_RDONLY,
    };
    tree::open_at(dir.as_fd(), name, flags, 0)
}

/// Makes what is missing, then sets every entry's attributes (in index order:
/// parents first; times last, once nothing is created any more).
fn finish_tree(l: &Layer) -> io::Result<()> {
    let idx = &l.idx;
    let n = idx.entry_count();
    // Parent directory fds, by entry (the index lists a directory's entries
    // together, breadth-first).
    let mut cached: Option<(u32, OwnedFd)> = None;
    let mut parent_of = |i: u32| -> io::Result<OwnedFd> {
        let p = idx.parent(i);
        if let Some((k, fd)) = &cached {
            if *k == p {
                return fd.try_clone();
            }
        }
        let fd = l.parent_dir(i, true)?;
        cached = Some((p, fd.try_clone()?));
        Ok(fd)
    };
    for i in 1..n {
        let e = idx.entry(i);
        let name = idx.name(i);
        let dir = parent_of(i)?;
        let exists = tree::lstat_at(dir.as_fd(), name)?.is_some();
        match e.kind {
            Kind::Dir => {
                drop(tree::mkdir_open(dir.as_fd(), name)?);
            }
            Kind::File => {
                if !exists {
                    drop(l.tree_file(i)?);
                }
            }
            Kind::Hardlink => {
                if !exists {
                    let t = e.hardlink_target().expect("a hardlink");
                    drop(l.tree_file(t)?);
                    let tdir = l.parent_dir(t, false)?;
                    tree::link_at(tdir.as_fd(), idx.name(t), dir.as_fd(), name)?;
                }
            }
            Kind::Symlink => {
                if !exists {
                    tree::symlink_at(dir.as_fd(), name, idx.link_target(i).unwrap_or(b""))?;
                }
            }
            Kind::Char | Kind::Block | Kind::Fifo | Kind::Whiteout => {
                if !exists {
                    let dev = e.rdev().map_or(0, |(a, b)| libc::makedev(a, b));
                    let ty = e.mode & libc::S_IFMT;
                    tree::mknod_at(dir.as_fd(), name, ty, dev)?;
                }
            }
        }
    }
    // Owners, modes, xattrs: chown before chmod (a chown drops set-id bits), both
    // before xattrs (a chown drops security.capability).
    for i in 0..n {
        let e = idx.entry(i);
        if e.kind == Kind::Hardlink {
            continue;
        }
        let inherited = l
            .inherited
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&i)
            .cloned();
        let h = inherited.unwrap_or_else(|| super::cache::Inherited {
            uid: e.uid,
            gid: e.gid,
            perm: e.mode & 0o7777,
            xattrs: idx
                .xattrs(i)
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
        });
        let (uid, gid, perm, xattrs) = (h.uid, h.gid, h.perm, h.xattrs);
        if i == 0 || matches!(e.kind, Kind::Dir | Kind::File) {
            let fd = if i == 0 {
                tree::open_at(l.tree.as_fd(), b".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?
            } else {
                open_entry(&parent_of(i)?, idx.name(i), e.kind)?
            };
            tree::fchown(fd.as_fd(), uid, gid)?;
            tree::fchmod(fd.as_fd(), perm)?;
            for (k, v) in &xattrs {
                tree::fsetxattr(fd.as_fd(), k, v)?;
            }
            if e.is_opaque() {
                tree::fsetxattr(fd.as_fd(), super::OPAQUE_XATTR, b"y")?;
            }
        } else {
            let dir = parent_of(i)?;
            let name = idx.name(i);
            tree::lchown_at(dir.as_fd(), name, uid, gid)?;
            if e.kind != Kind::Symlink {
                tree::chmod_at(dir.as_fd(), name, perm)?;
            }
            for (k, v) in &xattrs {
                tree::lsetxattr_at(dir.as_fd(), name, k, v)?;
            }
        }
    }
    // Times: directories and whiteouts extraction made itself have none in the
    // index and keep the time they were made.
    for i in 0..n {
        let e = idx.entry(i);
        if e.kind == Kind::Hardlink
            || (e.mtime == (0, 0) && matches!(e.kind, Kind::Dir | Kind::Whiteout))
        {
            continue;
        }
        match e.kind {
            Kind::Dir | Kind::File => {
                let fd = if i == 0 {
                    tree::open_at(l.tree.as_fd(), b".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?
                } else {
                    open_entry(&parent_of(i)?, idx.name(i), e.kind)?
                };
                tree::futimes(fd.as_fd(), e.mtime)?;
            }
            _ => tree::utimes_at(parent_of(i)?.as_fd(), idx.name(i), e.mtime)?,
        }
    }
    Ok(())
}
