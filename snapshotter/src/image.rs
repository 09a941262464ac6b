//! Images into snapshots: each layer unpacked once into its own committed
//! snapshot, named by its chain ID (as containerd names them), shared by
//! every image that has the same layers below it.
//!
//! With overlayfs each layer is its own directory, so layers unpack in
//! parallel into staging directories, then are committed in order (a
//! committed snapshot's parent must be committed first). A crash leaves only
//! staging directories, which `Snapshotter::cleanup` removes.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use cstore_os::tree::TreeDir;
use cstore_os::IoError;
use cstore_registry::parse_digest;
use cstore_store::image_config::ImageConfigHead;
use cstore_store::meta::{DescriptorRecord, ImageRecord};
use cstore_store::Store;
use cstore_unpack::{
    layer_compression, unpack_layer, LayerIndex, LayerRef, LayerStats, UnpackOptions,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::snapshots::{dir_usage, Kind, Snapshotter, Usage};

/// A layer unpacked into a staging directory, or why it could not be.
type Staged = Option<Result<(PathBuf, LayerStats, Usage)>>;

pub const LABEL_LAYER_DIGEST: &str = "cstore.io/layer.digest";
pub const LABEL_DIFF_ID: &str = "cstore.io/layer.diff-id";
/// On a committed layer snapshot whose tree a lazy layer daemon is still
/// filling in place (docs/lazy.md): it is mounted only through its FUSE
/// mount until completion removes the label.
pub const LABEL_LAZY: &str = "cstore.io/lazy";
/// On a lazy snapshot: the image reference its bytes are fetched through.
pub const LABEL_LAZY_SOURCE: &str = "cstore.io/lazy.source";

/// chain[0] = diff[0]; chain[i] = sha256(chain[i-1] + " " + diff[i]).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}")))
            ),
        };
        out.push(next);
    }
    out
}

#[derive(Clone, Debug)]
pub struct Layer {
    pub descriptor: DescriptorRecord,
    pub diff_id: String,
    pub chain_id: String,
}

/// The image's layers with their diff_ids (from the config) and chain IDs.
pub fn layers_of(store: &Store, image: &ImageRecord) -> Result<Vec<Layer>> {
    let config_digest = parse_digest(&image.config.digest).map_err(cstore_store::Error::from)?;
    layers_from_config(image, &store.read_config(&config_digest)?)
}

/// `layers_of` with the image's config already read (`Store::read_config`).
pub fn layers_from_config(image: &ImageRecord, bytes: &[u8]) -> Result<Vec<Layer>> {
    // The pull checked this already; a store written before it did may hold
    // an image whose config does not describe its layers.
    let what = format!("config {} of {}", image.config.digest, image.name);
    let config = ImageConfigHead::parse(bytes, &what)?;
    config.check_layers(image.layers.len(), &what)?;
    let diff_ids = config.rootfs.diff_ids;
    let chains = chain_ids(&diff_ids);
    Ok(image
        .layers
        .iter()
        .zip(diff_ids)
        .zip(chains)
        .map(|((descriptor, diff_id), chain_id)| Layer {
            descriptor: descriptor.clone(),
            diff_id,
            chain_id,
        })
        .collect())
}

/// The `rootfs.diff_ids` of an image config (`digest` of `image`), each a
/// valid sha256 digest: what unpack reads of a config (the fuzz target's entry).
pub fn config_diff_ids(bytes: &[u8], digest: &str, image: &str) -> Result<Vec<String>> {
    let what = format!("config {digest} of {image}");
    let config = ImageConfigHead::parse(bytes, &what)?;
    config.check_layers(config.rootfs.diff_ids.len(), &what)?;
    Ok(config.rootfs.diff_ids)
}

#[derive(Clone, Debug, Serialize)]
pub enum Event {
    /// A layer is already a committed snapshot.
    Present {
        layer: String,
        chain_id: String,
    },
    Unpacking {
        layer: String,
    },
    Unpacked {
        layer: String,
        stats: LayerStats,
    },
    /// The layer's seekable index was recorded in the unpack pass and stored.
    Indexed {
        layer: String,
        spans: u32,
        index_bytes: u64,
        windows_bytes: u64,
    },
    /// No index for this layer (it can still be unpacked, not served lazily).
    NotIndexed {
        layer: String,
        reason: String,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct UnpackReport {
    pub image: String,
    /// The top layer's chain ID: the parent for a container's snapshot.
    pub chain_id: String,
    pub layers: usize,
    pub unpacked: usize,
    pub seconds: f64,
}

/// Unpack every layer of `image` that is not a committed snapshot yet.
pub fn unpack_image(
    sn: &Snapshotter,
    store: &Store,
    image: &ImageRecord,
    opts: &UnpackOptions,
    jobs: usize,
    on_event: &(dyn Fn(Event) + Sync),
) -> Result<UnpackReport> {
    let started = Instant::now();
    let layers = layers_of(store, image)?;
    let Some(top) = layers.last() else {
        return Err(Error::InvalidArgument(format!(
            "image {} has no layers",
            image.name
        )));
    };
    // Snapshots of a chain are committed bottom-up, so the highest present
    // one means all below it are there too.
    let present = layers
        .iter()
        .rposition(|l| {
            sn.stat(&l.chain_id)
                .is_ok_and(|i| i.kind == Kind::Committed)
        })
        .map_or(0, |i| i + 1);
    for l in &layers[..present] {
        on_event(Event::Present {
            layer: l.descriptor.digest.clone(),
            chain_id: l.chain_id.clone(),
        });
    }
    let todo = &layers[present..];
    // One syncfs for all layers, before the first commit (below), instead
    // of one per layer: each writes back the filesystem's metadata, and on
    // a disk those small writes are most of a layer's cost.
    let opts = &UnpackOptions {
        defer_sync: true,
        ..opts.clone()
    };
    let staged: Vec<Mutex<Staged>> = todo.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, todo.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= todo.len() || failed.load(Ordering::SeqCst) {
                    break;
                }
                let l = &todo[i];
                on_event(Event::Unpacking {
                    layer: l.descriptor.digest.clone(),
                });
                let t = std::time::Instant::now();
                let r = unpack_one(sn, store, image, l, opts, on_event);
                crate::metrics::layer_unpacked(t, r.is_ok());
                if r.is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
                if let Ok((_, stats, _)) = &r {
                    on_event(Event::Unpacked {
                        layer: l.descriptor.digest.clone(),
                        stats: stats.clone(),
                    });
                }
                *staged[i].lock().unwrap() = Some(r);
            });
        }
    });
    let staged: Vec<Staged> = staged
        .into_iter()
        .map(|m| m.into_inner().unwrap())
        .collect();
    let cleanup = |staged: &[Staged]| {
        for (dir, _, _) in staged.iter().flatten().flatten() {
            let _ = std::fs::remove_dir_all(dir);
        }
    };
    if let Some(pos) = staged.iter().position(|r| matches!(r, Some(Err(_)))) {
        let mut staged = staged;
        let err = staged[pos].take().unwrap().unwrap_err();
        cleanup(&staged);
        return Err(err);
    }
    if let Some(Some(Ok((dir, _, _)))) = staged.first() {
        // Every staged layer durable before any is committed.
        let synced = std::fs::File::open(dir)
            .and_then(|f| cstore_os::sys::syncfs(std::os::fd::AsFd::as_fd(&f)))
            .map_err(|e| IoError::new("syncfs", dir, e));
        if let Err(e) = synced {
            cleanup(&staged);
            return Err(e.into());
        }
    }
    // Commit in order, each on its parent.
    for (i, r) in staged.iter().enumerate() {
        let (dir, stats, usage) = r
            .as_ref()
            .expect("every layer ran")
            .as_ref()
            .expect("no errors");
        let idx = present + i;
        let l = &layers[idx];
        let parent = idx.checked_sub(1).map(|p| layers[p].chain_id.as_str());
        let grown = match inherit_implicit_dirs(
            sn,
            image,
            l,
            &layers[..idx],
            &dir.join("fs"),
            &stats.implicit_dirs,
        ) {
            Ok(g) => g,
            Err(e) => {
                cleanup(&staged[i..]);
                return Err(e);
            }
        };
        let labels = BTreeMap::from([
            (LABEL_LAYER_DIGEST.to_string(), l.descriptor.digest.clone()),
            (LABEL_DIFF_ID.to_string(), l.diff_id.clone()),
        ]);
        tracing::debug!(chain_id = %l.chain_id, "committing the snapshot");
        let t = std::time::Instant::now();
        let committed =
            sn.commit_dir_measured(dir, &l.chain_id, parent, labels, usage.grown(grown));
        crate::metrics::layer_committed(t);
        match committed {
            Ok(()) => tracing::debug!(chain_id = %l.chain_id, "committed the snapshot"),
            // Another unpack of the same layer won the race: use theirs.
            Err(Error::AlreadyExists(_)) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Err(e) => {
                cleanup(&staged[i..]);
                return Err(e);
            }
        }
    }
    Ok(UnpackReport {
        image: image.name.clone(),
        chain_id: top.chain_id.clone(),
        layers: layers.len(),
        unpacked: todo.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Whether unpack records each layer's index (`CSTORE_LAYER_INDEX=0` turns it
/// off, for measuring what it costs).
fn index_in_unpack() -> bool {
    std::env::var("CSTORE_LAYER_INDEX").map_or(true, |v| v != "0")
}

fn unpack_one(
    sn: &Snapshotter,
    store: &Store,
    image: &ImageRecord,
    l: &Layer,
    opts: &UnpackOptions,
    on_event: &(dyn Fn(Event) + Sync),
) -> Result<(PathBuf, LayerStats, Usage)> {
    let digest = parse_digest(&l.descriptor.digest).map_err(cstore_store::Error::from)?;
    let compression = layer_compression(&l.descriptor.media_type).ok_or_else(|| {
        Error::Store(cstore_store::Error::UnsupportedMediaType {
            what: format!("layer {} of {}", l.descriptor.digest, image.name),
            media_type: l.descriptor.media_type.clone(),
        })
    })?;
    let blob = store.blob_path(&digest);
    let dir = sn.new_staging()?;
    let layer = LayerRef {
        image: &image.name,
        digest: &l.descriptor.digest,
        compression,
        diff_id: &l.diff_id,
    };
    // Read layer blobs as the store's device wants; record the index in the
    // same pass unless the layer has one already.
    let build_index = opts.build_index
        || (index_in_unpack() && store.layer_index(&l.descriptor.digest)?.is_none());
    let opts = UnpackOptions {
        io: opts
            .io
            .clone()
            .or_else(|| Some(store.stream_config().clone())),
        build_index,
        ..opts.clone()
    };
    match unpack_layer(&blob, &layer, &dir.join("fs"), &opts) {
        Ok(mut stats) => {
            if let Some(ix) = stats.index.take() {
                store_index(store, &l.descriptor.digest, ix, on_event);
            }
            // Measured now, while the layer's directories and inodes are in
            // memory (dirty: not written back yet). Once the syncfs has
            // written them they can be evicted, and a walk at commit time
            // read every directory block back, one 4 KiB request each:
            // thousands on a disk, minutes at its IOPS (docs/benchmarks.md).
            let usage = dir_usage(&dir.join("fs"));
            Ok((dir, stats, usage))
        }
        Err(e) => {
            // The half-written layer goes; nothing else was touched.
            let _ = std::fs::remove_dir_all(&dir);
            Err(e.into())
        }
    }
}

/// Unpack layer `idx` of `layers` (its blob in the store, the layers below
/// committed) into its committed snapshot, as [`unpack_image`] does for each
/// layer: for a lazy pull, whose other layers are served lazily.
pub fn unpack_single(
    sn: &Snapshotter,
    store: &Store,
    image: &ImageRecord,
    layers: &[Layer],
    idx: usize,
    on_event: &(dyn Fn(Event) + Sync),
) -> Result<()> {
    let l = &layers[idx];
    on_event(Event::Unpacking {
        layer: l.descriptor.digest.clone(),
    });
    let (dir, stats, usage) = unpack_one(sn, store, image, l, &UnpackOptions::default(), on_event)?;
    let grown = match inherit_implicit_dirs(
        sn,
        image,
        l,
        &layers[..idx],
        &dir.join("fs"),
        &stats.implicit_dirs,
    ) {
        Ok(g) => g,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let parent = idx.checked_sub(1).map(|p| layers[p].chain_id.as_str());
    let labels = BTreeMap::from([
        (LABEL_LAYER_DIGEST.to_string(), l.descriptor.digest.clone()),
        (LABEL_DIFF_ID.to_string(), l.diff_id.clone()),
    ]);
    on_event(Event::Unpacked {
        layer: l.descriptor.digest.clone(),
        stats,
    });
    match sn.commit_dir_measured(&dir, &l.chain_id, parent, labels, usage.grown(grown)) {
        Ok(()) => Ok(()),
        Err(Error::AlreadyExists(_)) => {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

/// Commit an empty snapshot for lazy layer `idx` of `layers` (labelled
/// [`LABEL_LAZY`]): its tree is filled in place by the layer's daemon.
pub fn commit_lazy(sn: &Snapshotter, layers: &[Layer], idx: usize, source: &str) -> Result<()> {
    let parent = idx.checked_sub(1).map(|p| layers[p].chain_id.as_str());
    commit_lazy_on(sn, &layers[idx], parent, source)
}

/// [`commit_lazy`] on the snapshot `parent`, whatever its name: for a layer
/// containerd asks for, whose parent may be a layer containerd unpacked.
pub fn commit_lazy_on(
    sn: &Snapshotter,
    l: &Layer,
    parent: Option<&str>,
    source: &str,
) -> Result<()> {
    let dir = sn.new_staging()?;
    let labels = BTreeMap::from([
        (LABEL_LAYER_DIGEST.to_string(), l.descriptor.digest.clone()),
        (LABEL_DIFF_ID.to_string(), l.diff_id.clone()),
        (LABEL_LAZY.to_string(), "1".to_string()),
        (LABEL_LAZY_SOURCE.to_string(), source.to_string()),
    ]);
    match sn.commit_dir(&dir, &l.chain_id, parent, labels) {
        Ok(()) => Ok(()),
        Err(Error::AlreadyExists(_)) => {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

/// Keep the index the unpack pass recorded. Failing to store it fails
/// nothing: the layer is unpacked, it just cannot be served lazily from here.
fn store_index(store: &Store, layer: &str, ix: LayerIndex, on_event: &(dyn Fn(Event) + Sync)) {
    let not = |reason: String| Event::NotIndexed {
        layer: layer.to_string(),
        reason,
    };
    match ix {
        LayerIndex::Unavailable(reason) => on_event(not(reason)),
        LayerIndex::Built { index, windows } => {
            let spans = cstore_index::Index::parse(index.as_slice())
                .map(|i| i.span_count() as u32)
                .unwrap_or(0);
            let w = (!windows.is_empty()).then_some(windows.as_slice());
            match store.put_layer_index(layer, &index, w, None, "unpack") {
                Ok(rec) => on_event(Event::Indexed {
                    layer: layer.to_string(),
                    spans,
                    index_bytes: rec.index_size,
                    windows_bytes: rec.windows_size,
                }),
                Err(e) => on_event(not(format!("storing the index: {e}"))),
            }
        }
    }
}

/// A directory the layer did not list but needed as a parent was created
/// 0755 root:root; in the merged view it would mask the lower layer's own
/// directory's owner, mode and xattrs. Give it those of the nearest lower
/// layer. The same for the layer root when the layer has no `./` entry.
///
/// Both trees are the image's: any name in them may be a symlink to a host
/// path. So nothing is done by path: each directory, lower and upper, is
/// opened from its tree root's fd with openat2 (no symlink followed, nothing
/// outside the tree reached) and changed through its own fd
/// (cstore_os::tree). `implicit` holds only directories that are
/// still the layer's implicit ones (the extractor drops those a later entry
/// replaced, removed or listed); one that is not a directory of the tree
/// any more fails the unpack rather than being looked for elsewhere.
///
/// Returns the bytes the changed directories' allocation grew by (an xattr
/// may need a block of its own), for the layer's usage measured before.
fn inherit_implicit_dirs(
    sn: &Snapshotter,
    image: &ImageRecord,
    layer: &Layer,
    lower: &[Layer],
    fs: &Path,
    implicit: &[Vec<u8>],
) -> Result<i64> {
    let mut grown = 0i64;
    if implicit.is_empty() || lower.is_empty() {
        return Ok(grown);
    }
    let open_root = |p: &Path| TreeDir::open_root(p).map_err(|e| IoError::new("open", p, e));
    let lower_trees: Vec<(PathBuf, TreeDir)> = lower
        .iter()
        .rev()
        .map(|l| {
            let p = sn.fs_dir(&l.chain_id)?;
            let t = open_root(&p)?;
            Ok((p, t))
        })
        .collect::<Result<_>>()?;
    let tree = open_root(fs)?;
    let fail = |rel: &[u8], reason: String, e: &std::io::Error| {
        Error::Unpack(cstore_unpack::Error::Layer {
            image: image.name.clone(),
            layer: layer.descriptor.digest.clone(),
            entry: Some(String::from_utf8_lossy(rel).into_owned()),
            reason,
            errno: e.raw_os_error(),
        })
    };
    for rel in implicit {
        let Some(dir) = implicit_dir(&tree, rel)
            .map_err(|e| fail(rel, format!("implicit parent directory: {e}"), &e))?
        else {
            continue;
        };
        for (base, lower_tree) in &lower_trees {
            match lower_lookup(lower_tree, rel)
                .map_err(|e| IoError::new("look up", base.join(path_of(rel)), e))?
            {
                Lookup::Dir(from) => {
                    let blocks = |d: &TreeDir| d.stat().map_or(0, |s| s.st_blocks);
                    let before = blocks(&dir);
                    dir.copy_attrs_from(&from).map_err(|e| {
                        fail(
                            rel,
                            format!("giving it the lower layer's attributes: {e}"),
                            &e,
                        )
                    })?;
                    grown += (blocks(&dir) - before) * 512;
                    break;
                }
                Lookup::Absent => continue,
                Lookup::Hidden => break,
            }
        }
    }
    Ok(grown)
}

fn path_of(rel: &[u8]) -> &Path {
    Path::new(std::ffi::OsStr::from_bytes(rel))
}

/// The implicit directory `rel` of the new layer's tree, or None when a
/// directory above it in this layer is opaque (then no lower layer shows
/// through there, and the defaults stand).
fn implicit_dir(tree: &TreeDir, rel: &[u8]) -> std::io::Result<Option<TreeDir>> {
    if rel.is_empty() {
        return tree.open_dir(b"").map(Some);
    }
    let comps: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
    let mut cur = tree.open_dir(b"")?;
    for (i, c) in comps.iter().enumerate() {
        let next = cur.open_dir(c)?;
        if i + 1 < comps.len() && next.is_opaque()? {
            return Ok(None);
        }
        cur = next;
    }
    Ok(Some(cur))
}

enum Lookup {
    Dir(TreeDir),
    /// Not in this layer: look in the next one down.
    Absent,
    /// Not a directory there (a file, a whiteout, a symlink on the way), or
    /// below a directory this layer makes opaque: the implicit directory's
    /// defaults stand.
    Hidden,
}

/// Look `rel` up in a lower layer's tree as overlayfs would, one name at a
/// time from the tree's root fd: no symlink is followed (a layer's own
/// symlinks must not send the lookup to host files).
fn lower_lookup(tree: &TreeDir, rel: &[u8]) -> std::io::Result<Lookup> {
    if rel.is_empty() {
        // The layer root: always a directory.
        return tree.open_dir(b"").map(Lookup::Dir);
    }
    let comps: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
    let (last, dirs) = comps.split_last().expect("a non-empty path");
    let missing = |e: std::io::Error, opaque: bool| match e.raw_os_error() {
        // Under a directory this layer makes opaque, what it lacks is not
        // looked for further down.
        Some(libc::ENOENT) if opaque => Ok(Lookup::Hidden),
        Some(libc::ENOENT) => Ok(Lookup::Absent),
        Some(libc::ENOTDIR) | Some(libc::ELOOP) => Ok(Lookup::Hidden),
        _ => Err(e),
    };
    let mut cur = tree.open_dir(b"")?;
    let mut opaque = false;
    for c in dirs {
        match cur.open_dir(c) {
            Ok(d) => {
                opaque = opaque || d.is_opaque()?;
                cur = d;
            }
            Err(e) => return missing(e, opaque),
        }
    }
    match cur.open_dir(last) {
        Ok(d) => Ok(Lookup::Dir(d)),
        Err(e) => missing(e, opaque),
    }
}

/// Remove layer snapshots (ones this crate unpacked) that no image in the
/// store uses any more, leaves first. Snapshots others made (containerd's,
/// mounts) are left alone. Returns how many went.
pub fn gc_layers(sn: &Snapshotter, store: &Store) -> Result<usize> {
    let mut used = std::collections::HashSet::new();
    for img in store.images()? {
        match layers_of(store, &img) {
            Ok(layers) => used.extend(layers.into_iter().map(|l| l.chain_id)),
            // An image whose config is unreadable keeps nothing alive; say so.
            Err(e) => {
                tracing::warn!(image = %img.name, error = %e, "cannot read the image's layers")
            }
        }
    }
    let mut removed = 0;
    loop {
        let mut progress = false;
        for info in sn.list()? {
            if info.kind == Kind::Committed
                && info.labels.contains_key(LABEL_LAYER_DIGEST)
                && !used.contains(&info.name)
            {
                match sn.remove(&info.name) {
                    Ok(()) => {
                        removed += 1;
                        progress = true;
                    }
                    Err(Error::FailedPrecondition(_)) => {} // children first
                    Err(e) => return Err(e),
                }
            }
        }
        if !progress {
            return Ok(removed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let chains = chain_ids(&[d('a'), d('b')]);
        assert_eq!(chains[0], d('a'));
        let want = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{} {}", d('a'), d('b'))))
        );
        assert_eq!(chains[1], want);
    }

    // A lower layer's own symlinks never send the lookup of a parent's
    // attributes to host files; whiteouts and opaque directories hide what
    // is below them, as overlayfs shows the merged tree.
    #[test]
    fn lower_lookups_stay_in_the_layer_and_follow_overlay() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let host = t.path().join("host");
        std::fs::create_dir_all(host.join("sub")).unwrap();
        std::os::unix::fs::chown(host.join("sub"), Some(4321), Some(4321)).unwrap();
        let lower = t.path().join("lower");
        for d in ["a/b", "o/inner", "plain/inner"] {
            std::fs::create_dir_all(lower.join(d)).unwrap();
        }
        std::os::unix::fs::symlink(&host, lower.join("h")).unwrap();
        std::os::unix::fs::symlink("a", lower.join("rel")).unwrap();
        std::fs::write(lower.join("f"), "").unwrap();
        let o = TreeDir::open_root(&lower.join("o")).unwrap();
        o.set_xattr(c"trusted.overlay.opaque", b"y").unwrap();
        let tree = TreeDir::open_root(&lower).unwrap();
        let kind = |rel: &str| match lower_lookup(&tree, rel.as_bytes()).unwrap() {
            Lookup::Dir(d) => format!("dir {}", d.stat().unwrap().st_uid),
            Lookup::Absent => "absent".into(),
            Lookup::Hidden => "hidden".into(),
        };
        assert_eq!(kind(""), "dir 0");
        assert_eq!(kind("a/b"), "dir 0");
        assert_eq!(kind("h/sub"), "hidden");
        assert_eq!(kind("h"), "hidden");
        assert_eq!(kind("rel/b"), "hidden");
        assert_eq!(kind("f/x"), "hidden");
        assert_eq!(kind("missing/x"), "absent");
        assert_eq!(kind("plain/missing"), "absent");
        // Below an opaque directory, what it lacks is hidden, not absent.
        assert_eq!(kind("o/missing"), "hidden");
        assert_eq!(kind("o/inner"), "dir 0");
        assert_eq!(kind("o"), "dir 0");

        // The new layer's side: an opaque directory above hides the lower
        // layers (None); a symlink on the way is an error, never followed.
        let upper = t.path().join("upper");
        std::fs::create_dir_all(upper.join("o/p")).unwrap();
        std::fs::create_dir_all(upper.join("q/r")).unwrap();
        std::os::unix::fs::symlink(&host, upper.join("x")).unwrap();
        TreeDir::open_root(&upper.join("o"))
            .unwrap()
            .set_xattr(c"trusted.overlay.opaque", b"y")
            .unwrap();
        let up = TreeDir::open_root(&upper).unwrap();
        assert!(implicit_dir(&up, b"o/p").unwrap().is_none());
        assert!(implicit_dir(&up, b"o").unwrap().is_some());
        assert!(implicit_dir(&up, b"q/r").unwrap().is_some());
        let e = implicit_dir(&up, b"x/sub").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR), "{e}");
        assert_eq!(std::fs::metadata(host.join("sub")).unwrap().uid(), 4321);
    }
}
