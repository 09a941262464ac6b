//! The lazy layers' daemon for `cstore mount --lazy`: each lazy layer of the
//! image is a `LayerFs` over a `RegistrySource`, FUSE-mounted at
//! `ROOT/lazy/<layer-hex>/mnt` (its cache beside it), and stacked under
//! overlayfs in place of the layer's snapshot directory, which it fills in
//! place. Background completion turns each into an ordinary committed
//! snapshot (the `cstore.io/lazy` label goes; its verified blob joins the
//! store). The daemon serves until the image's mount is unmounted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cstore_fuse_fs::layer::{LayerFs, LayerOptions};
use cstore_fuse_fs::{PassthroughMode, Session, SessionOptions, StateDir};
use cstore_registry::{parse_digest, Reference, RegistryClient};
use cstore_snapshotter::image::{self, LABEL_LAZY};
use cstore_snapshotter::{mount, Snapshotter};
use cstore_store::Store;

use crate::error::{Error, Result};
use crate::source::{RegistrySource, Windows};

/// Where a layer's lazy state lives in the store.
pub fn layer_dir(store: &Store, layer: &str) -> PathBuf {
    store
        .root()
        .join("lazy")
        .join(layer.trim_start_matches("sha256:"))
}

fn io(op: &'static str, path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        op,
        path: path.display().to_string(),
        source: e,
    }
}

struct Served {
    layer: String,
    chain: String,
    fs: Arc<LayerFs>,
    mnt: PathBuf,
    session: Session<LayerFs>,
}

/// Where to mount, and the mount's snapshot key and labels (as `cstore
/// mount` makes them).
pub struct MountSpec {
    pub target: PathBuf,
    pub key: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Serve the lazy layers of `reference`, mount the image read-only at
/// `mk.target` (snapshot `mk.key`), call `ready`, complete the layers in the
/// background, and return once `target` is unmounted.
pub fn serve_mount(
    rt: &tokio::runtime::Handle,
    client: Arc<RegistryClient>,
    store: &Store,
    sn: &Snapshotter,
    reference: &str,
    mk: MountSpec,
    ready: impl FnOnce(&str),
) -> Result<()> {
    let target = mk.target.as_path();
    let record = store.image(reference)?;
    let r: Reference = record.name.parse()?;
    let layers = image::layers_of(store, &record)?;
    let mut served: Vec<Served> = Vec::new();
    let mut lower_indexes: Vec<cstore_index::Index<Vec<u8>>> = Vec::new();
    let result = (|| -> Result<()> {
        for l in &layers {
            let digest = &l.descriptor.digest;
            let rec = store.layer_index(digest)?;
            let info = sn.stat(&l.chain_id)?;
            let bytes = match &rec {
                Some(rec) => Some(store.read_blob(&parse_digest(&rec.index)?, 256 << 20)?),
                None => None,
            };
            if info.labels.contains_key(LABEL_LAZY) {
                let (rec, idx) = match (&rec, bytes.clone()) {
                    (Some(rec), Some(idx)) => (rec, idx),
                    _ => {
                        return Err(Error::Invalid {
                            what: format!("lazy layer {digest} of {reference}"),
                            reason: "its index is gone from the store".into(),
                        })
                    }
                };
                let windows = if let Some(w) = &rec.windows {
                    let p = store.blob_path(&parse_digest(w)?);
                    Windows::Local(std::fs::File::open(&p).map_err(|e| io("open", &p, e))?)
                } else if let Some(w) = &rec.remote_windows {
                    Windows::Registry(parse_digest(w)?)
                } else {
                    Windows::None
                };
                let dir = layer_dir(store, digest);
                let (cache, mnt, state) = (dir.join("cache"), dir.join("mnt"), dir.join("state"));
                for d in [&cache, &mnt, &state] {
                    std::fs::create_dir_all(d).map_err(|e| io("create", d, e))?;
                }
                if mount::is_mountpoint(&mnt) {
                    // A dead daemon's mount: nobody serves it.
                    let _ = cstore_fuse_fs::dev::unmount(&mnt, true);
                }
                let source = Arc::new(RegistrySource::new(
                    client.clone(),
                    rt.clone(),
                    r.clone(),
                    parse_digest(digest)?,
                    windows,
                ));
                let fs = Arc::new(LayerFs::open(
                    idx,
                    source,
                    &cache,
                    &sn.fs_dir(&l.chain_id)?,
                    LayerOptions::default(),
                )?);
                let lowers: Vec<&cstore_index::Index<Vec<u8>>> =
                    lower_indexes.iter().rev().collect();
                fs.inherit_implicit(&lowers);
                let session = Session::start(
                    fs.clone(),
                    &mnt,
                    &StateDir::new(&state)?,
                    SessionOptions {
                        passthrough: PassthroughMode::IfAvailable,
                        ..SessionOptions::default()
                    },
                )?;
                served.push(Served {
                    layer: digest.clone(),
                    chain: l.chain_id.clone(),
                    fs,
                    mnt,
                    session,
                });
            }
            if let Some(b) = bytes {
                lower_indexes.push(cstore_index::Index::parse(b)?);
            }
        }
        let top = layers.last().ok_or_else(|| Error::Invalid {
            what: format!("image {reference}"),
            reason: "no layers".into(),
        })?;
        let mut mounts = sn.view(&mk.key, Some(&top.chain_id), mk.labels)?;
        // Each lazy layer's directory is replaced by its FUSE mount.
        for m in &mut mounts {
            for s in &served {
                let fs_dir = sn.fs_dir(&s.chain)?.display().to_string();
                let mnt = s.mnt.display().to_string();
                if m.source == fs_dir {
                    m.source = mnt.clone();
                }
                for o in &mut m.options {
                    if let Some(rest) = o.strip_prefix("lowerdir=") {
                        let dirs: Vec<&str> = rest
                            .split(':')
                            .map(|d| if d == fs_dir { mnt.as_str() } else { d })
                            .collect();
                        *o = format!("lowerdir={}", dirs.join(":"));
                    }
                }
            }
        }
        if let Err(e) = mount::mount_all(&mounts, target) {
            let _ = sn.remove(&mk.key);
            return Err(Error::Snapshotter(e.into()));
        }
        Ok(())
    })();
    if let Err(e) = result {
        for s in served {
            let _ = cstore_fuse_fs::dev::unmount(&s.mnt, true);
            let _ = s.session.wait();
        }
        return Err(e);
    }
    ready(&format!(
        "mounted {} at {} ({} of {} layers lazy)",
        record.name,
        target.display(),
        served.len(),
        layers.len()
    ));
    // Background completion, one layer at a time (on-demand reads go first).
    let completing: Vec<(String, String, Arc<LayerFs>, PathBuf)> = served
        .iter()
        .map(|s| {
            (
                s.layer.clone(),
                s.chain.clone(),
                s.fs.clone(),
                layer_dir(store, &s.layer),
            )
        })
        .collect();
    let (store2, root) = (store.clone(), store.root().to_path_buf());
    std::thread::spawn(move || {
        let Ok(sn) = Snapshotter::open(&root) else {
            return;
        };
        for (layer, chain, fs, dir) in completing {
            match fs.complete() {
                Ok(()) => {
                    if let Err(e) = finish(&store2, &sn, &layer, &chain, &dir) {
                        tracing::warn!("layer {layer}: completed, but {e}");
                    }
                }
                Err(e) => tracing::error!("layer {layer}: {e}"),
            }
        }
    });
    while mount::is_mountpoint(target) {
        std::thread::sleep(Duration::from_millis(200));
    }
    for s in served {
        s.fs.shutdown();
        let _ = cstore_fuse_fs::dev::unmount(&s.mnt, true);
        let _ = s.session.wait();
    }
    Ok(())
}

/// A completed layer: its snapshot is an ordinary one from now on, and its
/// verified blob copy joins the store's blobs.
fn finish(store: &Store, sn: &Snapshotter, layer: &str, chain: &str, dir: &Path) -> Result<()> {
    let blob = dir.join("cache/blob");
    let bytes = std::fs::read(&blob).map_err(|e| io("read", &blob, e))?;
    store.blob_dirs().put_bytes(&parse_digest(layer)?, &bytes)?;
    sn.update(
        chain,
        std::collections::BTreeMap::new(),
        &[format!("labels.{LABEL_LAZY}")],
    )?;
    tracing::info!("layer {layer}: complete, now an ordinary snapshot");
    Ok(())
}
