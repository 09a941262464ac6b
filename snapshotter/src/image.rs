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
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use cstore_store::media::layer_compression;
use cstore_store::meta::{DescriptorRecord, ImageRecord};
use cstore_store::reference::parse_digest;
use cstore_store::unpack::{unpack_layer, LayerRef, LayerStats, UnpackOptions};
use cstore_store::Store;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::snapshots::{Kind, Snapshotter};

/// A layer unpacked into a staging directory, or why it could not be.
type Staged = Option<Result<(PathBuf, LayerStats)>>;

pub const LABEL_LAYER_DIGEST: &str = "cstore.io/layer.digest";
pub const LABEL_DIFF_ID: &str = "cstore.io/layer.diff-id";

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
    let config_digest = parse_digest(&image.config.digest)?;
    let bytes = store.read_blob(&config_digest, 32 << 20)?;
    let diff_ids = config_diff_ids(&bytes, &image.config.digest, &image.name)?;
    if diff_ids.len() != image.layers.len() {
        return Err(Error::Store(cstore_store::Error::Malformed {
            what: format!("image {}", image.name),
            reason: format!(
                "{} layers but {} diff_ids in the config",
                image.layers.len(),
                diff_ids.len()
            ),
        }));
    }
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
/// valid sha256 digest.
pub fn config_diff_ids(bytes: &[u8], digest: &str, image: &str) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    let config: Config = serde_json::from_slice(bytes).map_err(|e| {
        Error::Store(cstore_store::Error::Malformed {
            what: format!("config {digest} of {image}"),
            reason: e.to_string(),
        })
    })?;
    for d in &config.rootfs.diff_ids {
        parse_digest(d)?;
    }
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
                let r = unpack_one(sn, store, image, l, opts);
                if r.is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
                if let Ok((_, stats)) = &r {
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
        for (dir, _) in staged.iter().flatten().flatten() {
            let _ = std::fs::remove_dir_all(dir);
        }
    };
    if let Some(pos) = staged.iter().position(|r| matches!(r, Some(Err(_)))) {
        let mut staged = staged;
        let err = staged[pos].take().unwrap().unwrap_err();
        cleanup(&staged);
        return Err(err);
    }
    // Commit in order, each on its parent.
    for (i, r) in staged.iter().enumerate() {
        let (dir, stats) = r
            .as_ref()
            .expect("every layer ran")
            .as_ref()
            .expect("no errors");
        let idx = present + i;
        let l = &layers[idx];
        let parent = idx.checked_sub(1).map(|p| layers[p].chain_id.as_str());
        if let Err(e) =
            inherit_implicit_dirs(sn, &layers[..idx], &dir.join("fs"), &stats.implicit_dirs)
        {
            cleanup(&staged[i..]);
            return Err(e);
        }
        let labels = BTreeMap::from([
            (LABEL_LAYER_DIGEST.to_string(), l.descriptor.digest.clone()),
            (LABEL_DIFF_ID.to_string(), l.diff_id.clone()),
        ]);
        tracing::debug!(chain_id = %l.chain_id, "committing the snapshot");
        match sn.commit_dir(dir, &l.chain_id, parent, labels) {
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

fn unpack_one(
    sn: &Snapshotter,
    store: &Store,
    image: &ImageRecord,
    l: &Layer,
    opts: &UnpackOptions,
) -> Result<(PathBuf, LayerStats)> {
    let digest = parse_digest(&l.descriptor.digest)?;
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
    let with_io;
    let opts = if opts.io.is_none() {
        // Read layer blobs as the store's device wants.
        with_io = UnpackOptions {
            io: Some(store.stream_config().clone()),
            ..opts.clone()
        };
        &with_io
    } else {
        opts
    };
    match unpack_layer(&blob, &layer, &dir.join("fs"), opts) {
        Ok(stats) => Ok((dir, stats)),
        Err(e) => {
            // The half-written layer goes; nothing else was touched.
            let _ = std::fs::remove_dir_all(&dir);
            Err(e.into())
        }
    }
}

/// A directory the layer did not list but needed as a parent was created
/// 0755 root:root; in the merged view it would mask the lower layer's own
/// directory's owner, mode and xattrs. Give it those of the nearest lower
/// layer. The same for the layer root when the layer has no `./` entry.
fn inherit_implicit_dirs(
    sn: &Snapshotter,
    lower: &[Layer],
    fs: &Path,
    implicit: &[Vec<u8>],
) -> Result<()> {
    if implicit.is_empty() {
        return Ok(());
    }
    let lower_dirs: Vec<PathBuf> = lower
        .iter()
        .rev()
        .map(|l| sn.fs_dir(&l.chain_id))
        .collect::<Result<_>>()?;
    for rel in implicit {
        let rel = Path::new(std::ffi::OsStr::from_bytes(rel));
        for base in &lower_dirs {
            match lower_lookup(base, rel) {
                Lookup::Dir(m) => {
                    let p = fs.join(rel);
                    std::os::unix::fs::lchown(&p, Some(m.uid()), Some(m.gid()))
                        .map_err(|e| Error::io("chown", &p, e))?;
                    std::fs::set_permissions(
                        &p,
                        std::fs::Permissions::from_mode(m.mode() & 0o7777),
                    )
                    .map_err(|e| Error::io("chmod", &p, e))?;
                    // The upper directory's xattrs are the merged one's too.
                    copy_xattrs(&base.join(rel), &p)?;
                    break;
                }
                Lookup::Absent => continue,
                Lookup::Hidden => break,
            }
        }
    }
    Ok(())
}

/// Copy the extended attributes of `from` to `to` (directories, no symlinks
/// followed), except overlay's own: a lower directory's opaque mark must not
/// make the upper one hide what is below.
pub(crate) fn copy_xattrs(from: &Path, to: &Path) -> Result<()> {
    let cpath = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| {
            Error::io(
                "xattr",
                p,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"),
            )
        })
    };
    let (src, dst) = (cpath(from)?, cpath(to)?);
    let mut names = vec![0u8; 4096];
    let n = loop {
        // SAFETY: a valid C string and a buffer of the given length.
        let n = unsafe { libc::llistxattr(src.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(()),
            _ => return Err(Error::io("list xattrs", from, e)),
        }
    };
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
            continue;
        }
        let cname = std::ffi::CString::new(name).expect("no NUL in an xattr name");
        let mut value = vec![0u8; 4096];
        let len = loop {
            // SAFETY: valid C strings and a buffer of the given length.
            let len = unsafe {
                libc::lgetxattr(
                    src.as_ptr(),
                    cname.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            if len >= 0 {
                break len as usize;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) && value.len() < (1 << 20) {
                value.resize(value.len() * 4, 0);
                continue;
            }
            return Err(Error::io("get xattr", from, e));
        };
        // SAFETY: valid C strings and a value of the given length.
        let r =
            unsafe { libc::lsetxattr(dst.as_ptr(), cname.as_ptr(), value.as_ptr().cast(), len, 0) };
        if r < 0 {
            return Err(Error::io("set xattr", to, std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

enum Lookup {
    Dir(std::fs::Metadata),
    Absent,
    /// Not a directory there (or whited out / behind a symlink): the
    /// implicit directory's defaults stand.
    Hidden,
}

/// Look `rel` up under a lower layer without following symlinks anywhere.
fn lower_lookup(base: &Path, rel: &Path) -> Lookup {
    let mut p = base.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    if comps.is_empty() {
        // The layer root: always a directory.
        return match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => Lookup::Dir(m),
            _ => Lookup::Absent,
        };
    }
    for (i, c) in comps.iter().enumerate() {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Err(_) => return Lookup::Absent,
            Ok(m) if m.is_dir() => {
                if i + 1 == comps.len() {
                    return Lookup::Dir(m);
                }
            }
            Ok(_) => return Lookup::Hidden,
        }
    }
    Lookup::Absent
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
}
