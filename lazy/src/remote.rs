//! Lazy layers for containerd (#15): containerd's remote-snapshot protocol
//! as `cstore snapshotter serve` speaks it. A Prepare of a layer's chain
//! with `containerd.io/snapshot.ref` and CRI's labels (the image reference,
//! its manifest digest, the layer digest) names the image and the layer; if
//! an index for the layer is found (the store, the registry's index
//! artifact, its eStargz TOC: as `pull --lazy` finds one), the layer becomes
//! cstore's own lazy committed snapshot named by its chain ID, and the
//! snapshotter hands it to containerd as it hands over layers `cstore pull`
//! unpacked. Mounts containerd asks for put each lazy layer's FUSE mount in
//! place of its directory, as `cstore mount` does.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cstore_registry::{Reference, RegistryClient};
use cstore_snapshotter::image::{self, Layer, LABEL_LAYER_DIGEST, LABEL_LAZY};
use cstore_snapshotter::Snapshotter;
use cstore_store::{Platform, Store};

use crate::artifact::{self, Found, Resolved};
use crate::error::Result;
use crate::serve::layer_dir;

/// CRI's labels on each layer's Prepare (containerd's
/// `pkg/snapshotters`; CRI sets them when `disable_snapshot_annotations`
/// is false, and `ctr-remote image rpull` sets them too).
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// stargz-snapshotter's own labels for the same (older `ctr-remote`s).
const LABEL_STARGZ_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
const LABEL_STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";

/// What became of a layer containerd asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Now cstore's lazy snapshot, its index from `origin`.
    Lazy {
        layer: String,
        image: String,
        origin: String,
    },
    /// Not lazy: containerd fetches and unpacks it; `reason` says why.
    Whole { layer: String, reason: String },
}

type Images = HashMap<String, (Resolved, Option<HashMap<String, Found>>)>;

/// Finds images and their layers' indexes for the snapshotter; remembers
/// each image it resolved (one manifest and config fetch per image, one
/// look for its index artifact).
pub struct Resolver {
    rt: tokio::runtime::Handle,
    client: Arc<RegistryClient>,
    store: Store,
    platform: Platform,
    images: Mutex<Images>,
}

impl Resolver {
    pub fn new(
        rt: tokio::runtime::Handle,
        client: Arc<RegistryClient>,
        store: Store,
        platform: Platform,
    ) -> Resolver {
        Resolver {
            rt,
            client,
            store,
            platform,
            images: Mutex::new(HashMap::new()),
        }
    }

    /// The image and layer a Prepare's labels name (the image pinned to its
    /// manifest digest when the labels give it).
    fn named(labels: &BTreeMap<String, String>) -> Option<(Reference, String)> {
        let image = labels
            .get(LABEL_CRI_IMAGE_REF)
            .or_else(|| labels.get(LABEL_STARGZ_REF))?;
        let layer = labels
            .get(LABEL_CRI_LAYER_DIGEST)
            .or_else(|| labels.get(LABEL_STARGZ_DIGEST))?;
        let mut r: Reference = image.parse().ok()?;
        if let Some(m) = labels.get(LABEL_CRI_MANIFEST_DIGEST) {
            r = format!("{}@{m}", r.name()).parse().ok()?;
        }
        Some((r, layer.clone()))
    }

    /// Make layer `chain` (on containerd's snapshot `parent`) a lazy
    /// snapshot of cstore's if the labels name its image and an index is
    /// found; see the module doc.
    pub fn prepare(
        &self,
        sn: &Snapshotter,
        chain: &str,
        parent: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Resolution> {
        let whole = |layer: &str, reason: String| Resolution::Whole {
            layer: layer.to_string(),
            reason,
        };
        let Some((r, layer)) = Self::named(labels) else {
            return Ok(whole(
                chain,
                format!("the Prepare does not name its image ({LABEL_CRI_IMAGE_REF} and {LABEL_CRI_LAYER_DIGEST}: CRI's disable_snapshot_annotations = false)"),
            ));
        };
        let key = r.to_string();
        let cached = self.images.lock().unwrap().get(&key).cloned();
        let (img, mut remote) = match cached {
            Some(c) => c,
            None => (
                artifact::resolve(&self.rt, &self.client, &r, &self.platform)?,
                None,
            ),
        };
        if let Some(d) = r.digest() {
            if &img.manifest_digest != d {
                return Ok(whole(
                    &layer,
                    format!("{r} resolved to manifest {}", img.manifest_digest),
                ));
            }
        }
        let chains = image::chain_ids(&img.diff_ids);
        let Some(i) = img.layers.iter().position(|l| l.digest == layer) else {
            return Ok(whole(&layer, format!("{r} has no layer {layer}")));
        };
        if chains[i] != chain {
            return Ok(whole(
                &layer,
                format!("layer {i} of {r} has chain ID {}, not {chain}", chains[i]),
            ));
        }
        let l = Layer {
            descriptor: img.layers[i].clone(),
            diff_id: img.diff_ids[i].clone(),
            chain_id: chain.to_string(),
        };
        let ann = crate::pull::annotations(&img);
        let found = crate::pull::find_index(
            &self.rt,
            &self.client,
            &self.store,
            &img,
            &l,
            ann.get(i),
            &mut remote,
        )?;
        self.images
            .lock()
            .unwrap()
            .insert(key.clone(), (img.clone(), remote));
        let origin = match found {
            Ok(origin) => origin,
            Err(reason) => return Ok(whole(&layer, reason)),
        };
        // The image is recorded (by digest) so `gc` keeps its layers and
        // indexes while containerd uses them.
        let held = self
            .store
            .image(&key)
            .is_ok_and(|h| h.manifest.digest == img.manifest_digest.to_string());
        if !held {
            artifact::record(&self.store, &img)?;
        }
        // The layer below: cstore's own if it has it (lazy or unpacked),
        // else the one containerd unpacked.
        let below = match i.checked_sub(1) {
            None => None,
            Some(p) if sn.stat(&chains[p]).is_ok() => Some(chains[p].as_str()),
            Some(_) => parent,
        };
        image::commit_lazy_on(sn, &l, below, &key)?;
        Ok(Resolution::Lazy {
            layer,
            image: key,
            origin,
        })
    }
}

/// A lazy layer whose directory a mount uses.
#[derive(Debug, Clone)]
pub struct LazyDir {
    pub layer: String,
    /// The snapshot directory (`snapshots/<id>/fs`), partial until complete.
    pub dir: String,
    /// The layer's FUSE mount, when the daemon serves it.
    pub mnt: PathBuf,
}

impl LazyDir {
    pub fn served(&self) -> bool {
        crate::serve::is_fuse_mount(&self.mnt)
    }

    /// Put the FUSE mount in place of the directory in `mounts`.
    pub fn substitute(&self, mounts: &mut [cstore_os::mount::Mount]) {
        let mnt = self.mnt.display().to_string();
        for m in mounts.iter_mut() {
            if m.source == self.dir {
                m.source = mnt.clone();
            }
            for o in &mut m.options {
                if let Some(rest) = o.strip_prefix("lowerdir=") {
                    let dirs: Vec<&str> = rest
                        .split(':')
                        .map(|d| if d == self.dir { mnt.as_str() } else { d })
                        .collect();
                    *o = format!("lowerdir={}", dirs.join(":"));
                }
            }
        }
    }
}

/// The lazy layers whose directories `mounts` use, by directory: whatever
/// name the mount reached them through (containerd's names share the
/// directory of cstore's lazy snapshot, and only cstore's carries the label).
pub fn lazy_dirs_in(
    store: &Store,
    sn: &Snapshotter,
    mounts: &[cstore_os::mount::Mount],
) -> Result<Vec<LazyDir>> {
    let used = |dir: &str| {
        mounts.iter().any(|m| {
            m.source == dir
                || m.options.iter().any(|o| {
                    o.strip_prefix("lowerdir=")
                        .is_some_and(|l| l.split(':').any(|d| d == dir))
                })
        })
    };
    let mut out = Vec::new();
    for info in sn.list()? {
        if !info.labels.contains_key(LABEL_LAZY) {
            continue;
        }
        let dir = sn.fs_dir(&info.name)?.display().to_string();
        if !used(&dir) {
            continue;
        }
        let layer = info
            .labels
            .get(LABEL_LAYER_DIGEST)
            .cloned()
            .unwrap_or_default();
        out.push(LazyDir {
            mnt: layer_dir(store, &layer).join("mnt"),
            layer,
            dir,
        });
    }
    Ok(out)
}
