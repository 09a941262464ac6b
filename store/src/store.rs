//! The store on disk:
//!
//! ```text
//! ROOT/oci-layout              OCI image layout marker
//! ROOT/index.json              one entry per image ref (ref.name annotation)
//! ROOT/blobs/sha256/<hex>      verified blobs, never partial
//! ROOT/ingest/<hex>.partial    downloads in flight or resumable
//! ROOT/meta.db                 redb: refs, blob records, leases (truth)
//! ```
//!
//! index.json is derived from meta.db and rewritten atomically after every
//! change of refs, so skopeo and umoci can read what cstore pulled.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_spec::image::Digest;

use crate::error::{write_err, Error, Result};
use cstore_os::layout;
use cstore_os::tree::tree_usage;
use cstore_os::{sync_dir, write_atomic, FileLock, IoError};

use crate::ingest::BlobDirs;
use crate::meta::{BlobRecord, ImageRecord, LayerIndexRecord, Lease, Meta, View};
use cstore_registry::{parse_digest, Reference};

pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    dirs: BlobDirs,
    meta: Meta,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    pub removed_blobs: usize,
    pub removed_bytes: u64,
    pub removed_partials: usize,
    pub expired_leases: usize,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DiskUsage {
    pub images: usize,
    pub blobs: usize,
    pub blob_bytes: u64,
    /// Bytes of blobs no image or live pull refers to: what `gc` frees.
    pub reclaimable_bytes: u64,
    /// Bytes held by unpacked layers (snapshots).
    pub unpacked_bytes: u64,
    /// Bytes in partial downloads.
    pub ingest_bytes: u64,
}

impl Store {
    /// Open (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Store> {
        // Closed to other users (and an older, open store closed): see layout.
        layout::secure_root(root)?;
        let dirs = BlobDirs::new(root.join("blobs/sha256"), root.join("ingest"));
        for d in [&dirs.blobs, &dirs.ingest] {
            layout::create_dir_all(d, layout::PRIVATE_DIR_MODE)
                .map_err(|e| write_err("store directories", d, e))?;
        }
        let layout = root.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let meta = Meta::open(&root.join("meta.db"))?;
        let store = Store {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                dirs,
                meta,
            }),
        };
        if !root.join("index.json").exists() {
            store
                .inner
                .meta
                .update_then(|t| t.images(), |images| store.write_index_json(&images))?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn blob_dirs(&self) -> &BlobDirs {
        &self.inner.dirs
    }

    pub fn meta(&self) -> &Meta {
        &self.inner.meta
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.dirs.blob_path(digest)
    }

    /// Read a manifest or index whole, refusing anything over `limit`.
    pub fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
        self.read_small(digest, limit, |_| Error::ManifestTooLarge {
            what: format!("blob {digest}"),
            limit,
        })
    }

    /// Read an image config whole, refusing one over `MAX_CONFIG_BYTES`
    /// (every reader of configs comes here: one limit, one wording).
    pub fn read_config(&self, digest: &Digest) -> Result<Vec<u8>> {
        let limit = crate::image_config::MAX_CONFIG_BYTES;
        self.read_small(digest, limit, |size| Error::ConfigTooLarge {
            what: format!("config {digest}"),
            size,
            limit,
        })
    }

    fn read_small(
        &self,
        digest: &Digest,
        limit: u64,
        too_large: impl FnOnce(u64) -> Error,
    ) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::BlobNotFound(digest.to_string()))
            }
            Err(e) => return Err(IoError::new("stat", &path, e).into()),
        };
        if meta.len() > limit {
            return Err(too_large(meta.len()));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        self.inner
            .dirs
            .open_reader(&path)
            .and_then(|r| r.take(limit).read_to_end(&mut bytes))
            .map_err(|e| IoError::new("read", &path, e))?;
        Ok(bytes)
    }

    /// How blob files are streamed (the store device's policy).
    pub fn stream_config(&self) -> &cstore_blockio::StreamConfig {
        self.inner.dirs.stream_config()
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let mut images = self.inner.meta.read(|t| t.images())?;
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    /// Find an image by reference (normalized as pull does).
    pub fn image(&self, reference: &str) -> Result<ImageRecord> {
        let name = reference.parse::<Reference>()?.to_string();
        self.inner
            .meta
            .read(|t| t.image(&name))?
            .ok_or(Error::ImageNotFound(name))
    }

    /// Is every blob of `image` on disk?
    pub fn is_complete(&self, image: &ImageRecord) -> bool {
        let d = &self.inner.dirs;
        std::iter::once(&image.target)
            .chain([&image.manifest, &image.config])
            .chain(image.layers.iter())
            .all(|b| parse_digest(&b.digest).is_ok_and(|dg| d.is_present(&dg, b.size)))
    }

    /// Remove an image ref, then collect what only it held.
    pub fn remove_image(&self, reference: &str) -> Result<GcReport> {
        let name = reference.parse::<Reference>()?.to_string();
        let removed = self.inner.meta.update_then(
            |t| {
                let removed = t.remove_image(&name)?;
                Ok((removed, t.images()?))
            },
            |(removed, images)| {
                if removed {
                    self.write_index_json(&images)?;
                }
                Ok(removed)
            },
        )?;
        if !removed {
            return Err(Error::ImageNotFound(name));
        }
        self.gc()
    }

    /// Record a pulled image and its blobs, drop the pull's lease, and
    /// rewrite index.json, all in one transaction.
    pub(crate) fn commit_image(
        &self,
        image: &ImageRecord,
        blobs: &[(String, crate::meta::BlobRecord)],
        lease: &str,
    ) -> Result<()> {
        self.inner.meta.update_then(
            |t| {
                for (d, rec) in blobs {
                    t.put_blob(d, rec)?;
                }
                t.put_image(image)?;
                t.remove_lease(lease)?;
                t.images()
            },
            |images| self.write_index_json(&images),
        )
    }

    /// The stored index of the layer blob `layer` (a digest), if any.
    pub fn layer_index(&self, layer: &str) -> Result<Option<LayerIndexRecord>> {
        self.inner.meta.read(|t| t.layer_index(layer))
    }

    /// Store a layer's index and windows blobs (each written atomically and
    /// verified like any blob) and record them as the index of the layer blob
    /// `layer`, replacing an older one. `gc` keeps them while the layer is
    /// kept. A lease protects the new blobs from a `gc` until they are recorded.
    pub fn put_layer_index(
        &self,
        layer: &str,
        index: &[u8],
        windows: Option<&[u8]>,
        remote_windows: Option<&str>,
        origin: &str,
    ) -> Result<LayerIndexRecord> {
        use sha2::{Digest as _, Sha256};
        let digest_of = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
        let rec = LayerIndexRecord {
            index: digest_of(index),
            index_size: index.len() as u64,
            windows: windows.map(digest_of),
            windows_size: windows.map_or(0, |w| w.len() as u64),
            remote_windows: remote_windows.map(String::from),
            origin: origin.to_string(),
        };
        let lease_id = format!(
            "index-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let mut lease = Lease::for_this_process();
        lease.blobs = std::iter::once(rec.index.clone())
            .chain(rec.windows.clone())
            .collect();
        let meta = &self.inner.meta;
        meta.update(|t| t.put_lease(&lease_id, &lease))?;
        let result = (|| {
            let put = |d: &str, b: &[u8]| -> Result<()> {
                self.inner.dirs.put_bytes(&parse_digest(d)?, b)
            };
            put(&rec.index, index)?;
            if let (Some(d), Some(w)) = (&rec.windows, windows) {
                put(d, w)?;
            }
            meta.update(|t| {
                t.put_blob(
                    &rec.index,
                    &BlobRecord {
                        size: rec.index_size,
                        media_type: cstore_index::MEDIA_TYPE.into(),
                        children: rec.windows.iter().cloned().collect(),
                    },
                )?;
                if let Some(w) = &rec.windows {
                    t.put_blob(
                        w,
                        &BlobRecord {
                            size: rec.windows_size,
                            media_type: cstore_index::WINDOWS_MEDIA_TYPE.into(),
                            children: Vec::new(),
                        },
                    )?;
                }
                t.put_layer_index(layer, &rec)?;
                t.remove_lease(&lease_id)?;
                Ok(())
            })
        })();
        if result.is_err() {
            let _ = meta.update(|t| t.remove_lease(&lease_id));
        }
        result.map(|()| rec)
    }

    /// Record an image whose layers are not here (a lazy pull, `index build`):
    /// its platform manifest (also its target) and config are stored, verified,
    /// and the image record names its layers as the manifest does. `gc` keeps
    /// the layers' indexes (and blobs, once present) through it; a later plain
    /// `pull` finds it incomplete and fetches the layers.
    pub fn record_image_metadata(
        &self,
        name: &str,
        manifest: (&[u8], &str),
        config: (&[u8], &str),
        layers: &[crate::meta::DescriptorRecord],
        platform: crate::Platform,
    ) -> Result<ImageRecord> {
        use crate::meta::DescriptorRecord;
        use sha2::{Digest as _, Sha256};
        let desc = |b: &[u8], mt: &str| DescriptorRecord {
            media_type: mt.to_string(),
            digest: format!("sha256:{}", hex::encode(Sha256::digest(b))),
            size: b.len() as u64,
        };
        let m = desc(manifest.0, manifest.1);
        let c = desc(config.0, config.1);
        let image = ImageRecord {
            name: name.to_string(),
            target: m.clone(),
            manifest: m.clone(),
            config: c.clone(),
            layers: layers.to_vec(),
            platform,
            updated: cstore_os::now_unix(),
        };
        let lease_id = format!("meta-{}-{:016x}", std::process::id(), rand::random::<u64>());
        let mut lease = Lease::for_this_process();
        lease.blobs = vec![m.digest.clone(), c.digest.clone()];
        let meta = &self.inner.meta;
        meta.update(|t| t.put_lease(&lease_id, &lease))?;
        let result = (|| {
            self.inner
                .dirs
                .put_bytes(&parse_digest(&m.digest)?, manifest.0)?;
            self.inner
                .dirs
                .put_bytes(&parse_digest(&c.digest)?, config.0)?;
            let mut children = vec![c.digest.clone()];
            children.extend(layers.iter().map(|l| l.digest.clone()));
            let blobs = vec![
                (
                    m.digest.clone(),
                    BlobRecord {
                        size: m.size,
                        media_type: m.media_type.clone(),
                        children,
                    },
                ),
                (
                    c.digest.clone(),
                    BlobRecord {
                        size: c.size,
                        media_type: c.media_type.clone(),
                        children: Vec::new(),
                    },
                ),
            ];
            self.commit_image(&image, &blobs, &lease_id)
        })();
        if result.is_err() {
            let _ = meta.update(|t| t.remove_lease(&lease_id));
        }
        result.map(|()| image)
    }

    /// Mark and sweep from image refs and live leases, under the database's
    /// write transaction.
    pub fn gc(&self) -> Result<GcReport> {
        let dirs = &self.inner.dirs;
        self.inner.meta.update_then(
            |t| {
                let mut report = GcReport::default();
                for (id, lease) in t.leases()? {
                    if !lease.is_live() {
                        t.remove_lease(&id)?;
                        report.expired_leases += 1;
                    }
                }
                let marked = mark(t)?;
                // An index goes with its layer.
                for (layer, _) in t.layer_indexes()? {
                    if !marked.contains(&layer) {
                        t.remove_layer_index(&layer)?;
                    }
                }
                let mut doomed = Vec::new();
                for (digest, rec) in t.blobs()? {
                    if !marked.contains(&digest) {
                        t.remove_blob(&digest)?;
                        doomed.push((digest, rec.size));
                    }
                }
                Ok((report, marked, doomed))
            },
            // Files go after the commit but before any other process can
            // open the database, so no pull can see a blob as present that
            // is about to vanish.
            |(mut report, marked, doomed)| {
                // Blob files: those swept from the DB, and files no record names
                // (a pull killed between rename and record) unless a live pull holds them.
                let mut files: HashMap<String, u64> = HashMap::new();
                for entry in fs::read_dir(&dirs.blobs)
                    .map_err(|e| IoError::new("read dir", &dirs.blobs, e))?
                {
                    let entry = entry.map_err(|e| IoError::new("read dir", &dirs.blobs, e))?;
                    let name = entry.file_name().to_string_lossy().to_string();
                    files.insert(
                        format!("sha256:{name}"),
                        entry.metadata().map(|m| m.len()).unwrap_or(0),
                    );
                }
                let doomed: HashSet<String> = doomed.into_iter().map(|(d, _)| d).collect();
                for (digest, size) in files {
                    if marked.contains(&digest) && !doomed.contains(&digest) {
                        continue;
                    }
                    let path = dirs.blobs.join(digest.trim_start_matches("sha256:"));
                    match fs::remove_file(&path) {
                        Ok(()) => {
                            report.removed_blobs += 1;
                            report.removed_bytes += size;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(IoError::new("remove", &path, e).into()),
                    }
                }
                report.removed_partials = self.sweep_ingest()?;
                sync_dir(&dirs.blobs)?;
                Ok(report)
            },
        )
    }

    /// Remove partial downloads nobody is writing (their lock is free).
    fn sweep_ingest(&self) -> Result<usize> {
        let ingest = &self.inner.dirs.ingest;
        let mut removed = 0;
        for entry in fs::read_dir(ingest).map_err(|e| IoError::new("read dir", ingest, e))? {
            let path = entry
                .map_err(|e| IoError::new("read dir", ingest, e))?
                .path();
            if path.extension().is_some_and(|x| x == "partial") {
                let lock_path = path.with_extension("lock");
                // No lock file: its writer finished or never began; else take it.
                let lock = if lock_path.exists() {
                    FileLock::try_take(&lock_path)?
                } else {
                    None
                };
                if lock.is_some() || !lock_path.exists() {
                    if fs::remove_file(&path).is_ok() {
                        removed += 1;
                    }
                    if let Some(l) = lock {
                        l.remove_and_release();
                    }
                }
            } else if path.extension().is_some_and(|x| x == "lock")
                && !path.with_extension("partial").exists()
            {
                if let Some(l) = FileLock::try_take(&path)? {
                    l.remove_and_release();
                }
            }
        }
        Ok(removed)
    }

    pub fn df(&self) -> Result<DiskUsage> {
        let (images, blobs, marked) = self
            .inner
            .meta
            .read(|t| Ok((t.images()?.len(), t.blobs()?, mark(t)?)))?;
        let mut du = DiskUsage {
            images,
            blobs: blobs.len(),
            ..Default::default()
        };
        for (digest, rec) in &blobs {
            du.blob_bytes += rec.size;
            if !marked.contains(digest) {
                du.reclaimable_bytes += rec.size;
            }
        }
        du.unpacked_bytes = tree_usage(&self.inner.root.join("snapshots")).file_bytes;
        du.ingest_bytes = tree_usage(&self.inner.dirs.ingest).file_bytes;
        Ok(du)
    }

    pub(crate) fn write_index_json(&self, images: &[ImageRecord]) -> Result<()> {
        let mut images: Vec<&ImageRecord> = images.iter().collect();
        images.sort_by(|a, b| a.name.cmp(&b.name));
        let manifests: Vec<serde_json::Value> = images
            .iter()
            .map(|i| {
                let mut platform = serde_json::json!({"architecture": i.platform.architecture, "os": i.platform.os});
                if let Some(v) = &i.platform.variant {
                    platform["variant"] = v.clone().into();
                }
                // The platform's manifest, not the index: that is what the
                // store holds whole, so `skopeo copy oci:ROOT:REF` works.
                serde_json::json!({
                    "mediaType": i.manifest.media_type,
                    "digest": i.manifest.digest,
                    "size": i.manifest.size,
                    "annotations": { REF_NAME_ANNOTATION: i.name },
                    "platform": platform,
                })
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": cstore_registry::media::OCI_INDEX,
            "manifests": manifests,
        });
        let bytes = serde_json::to_vec_pretty(&index).expect("json");
        Ok(write_atomic(&self.inner.root.join("index.json"), &bytes)?)
    }
}

/// Everything reachable from image refs and live leases.
fn mark(t: &impl View) -> Result<HashSet<String>> {
    let mut stack: Vec<String> = Vec::new();
    for i in t.images()? {
        stack.extend([i.target.digest, i.manifest.digest, i.config.digest]);
        stack.extend(i.layers.into_iter().map(|l| l.digest));
    }
    for (_, lease) in t.leases()? {
        if lease.is_live() {
            stack.extend(lease.blobs);
        }
    }
    let mut marked = HashSet::new();
    while let Some(d) = stack.pop() {
        if marked.insert(d.clone()) {
            if let Some(rec) = t.blob(&d)? {
                stack.extend(rec.children);
            }
            // A layer's index (and through its record's children, its windows).
            if let Some(ix) = t.layer_index(&d)? {
                stack.push(ix.index);
            }
        }
    }
    Ok(marked)
}
