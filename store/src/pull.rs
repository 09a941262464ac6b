//! Pull: resolve a reference to the platform's manifest, then fetch config and
//! layers in parallel, each streamed through a verifying writer into the
//! store, and record the image in one transaction at the end.
//!
//! What is in flight is protected from `gc` by a lease recorded before any
//! blob is written; a pull killed at any point leaves only partial files in
//! ingest/ (resumed next time) and a lease whose process is gone (expired by
//! the next `gc`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cstore_registry::media::{self, ManifestKind};
use cstore_registry::{
    parse_digest, FetchedManifest, Reference, RegistryClient, MAX_MANIFEST_BYTES,
};
use futures_util::{stream, StreamExt, TryStreamExt};
use oci_spec::image::{Descriptor, Digest, ImageIndex, ImageManifest};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::image_config::{ImageConfigHead, MAX_CONFIG_BYTES};
use crate::ingest::{Acquired, BlobWriter};
use crate::meta::{BlobRecord, DescriptorRecord, ImageRecord, Lease, View};
use crate::platform::Platform;
use crate::store::Store;
use cstore_unpack::layer_compression;

#[derive(Clone, Debug)]
pub struct PullOptions {
    pub platform: Platform,
    /// Blobs fetched at once.
    pub max_concurrent: usize,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: Platform::host(),
            max_concurrent: 6,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobKind {
    Config,
    Layer,
}

/// What a pull is doing, for progress displays.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Resolved {
        reference: String,
        digest: String,
        media_type: String,
    },
    /// Every blob the image needs, before any is fetched.
    Blob {
        digest: String,
        kind: BlobKind,
        size: u64,
        media_type: String,
    },
    /// Already in the store.
    Cached {
        digest: String,
    },
    /// Another process is fetching it; waiting for that.
    Waiting {
        digest: String,
    },
    /// Fetching starts; `offset` > 0 resumes a partial download.
    Started {
        digest: String,
        offset: u64,
    },
    /// Bytes of the blob now held.
    Progress {
        digest: String,
        bytes: u64,
    },
    Retrying {
        digest: String,
        attempt: u32,
        error: String,
    },
    Done {
        digest: String,
    },
}

pub trait Observer: Send + Sync {
    fn event(&self, event: &Event);
}

impl Observer for () {
    fn event(&self, _: &Event) {}
}

#[derive(Clone, Debug, Serialize)]
pub struct PullReport {
    pub reference: String,
    pub digest: String,
    pub manifest: String,
    pub platform: Platform,
    pub layers: usize,
    /// Bytes of config and layers (compressed) that make up the image.
    pub size: u64,
    pub fetched_blobs: usize,
    pub fetched_bytes: u64,
    pub cached_blobs: usize,
    /// The image was already held whole: nothing was written.
    pub up_to_date: bool,
    pub seconds: f64,
}

/// Pull `reference` into `store` (counted in `crate::metrics`).
pub async fn pull(
    store: &Store,
    client: &RegistryClient,
    reference: &Reference,
    opts: &PullOptions,
    observer: Arc<dyn Observer>,
) -> Result<PullReport> {
    let r = pull_unmetered(store, client, reference, opts, observer).await;
    crate::metrics::pulled(reference.registry(), &r);
    r
}

async fn pull_unmetered(
    store: &Store,
    client: &RegistryClient,
    reference: &Reference,
    opts: &PullOptions,
    observer: Arc<dyn Observer>,
) -> Result<PullReport> {
    let started = Instant::now();
    let name = reference.to_string();

    // Pinned by digest and held whole: no need to ask the registry anything.
    if reference.digest().is_some() {
        if let Ok(img) = store.image(&name) {
            if store.is_complete(&img) && serves(&img, &opts.platform) {
                return Ok(up_to_date(&img, started));
            }
        }
    }

    let lease_id = format!("pull-{}-{:016x}", std::process::id(), rand::random::<u64>());
    store
        .meta()
        .update(|t| t.put_lease(&lease_id, &Lease::for_this_process()))?;
    let result = pull_leased(store, client, reference, opts, observer, &lease_id, started).await;
    if result.as_ref().map_or(true, |r| r.up_to_date) {
        // Success commits drop the lease in the same transaction.
        let _ = store.meta().update(|t| t.remove_lease(&lease_id));
    }
    result
}

/// Does a held image answer a pull for `want`? One from an index holds the
/// entry chosen for the platform asked then; a single manifest is recorded
/// with its config's platform, which must run on `want`.
fn serves(img: &ImageRecord, want: &Platform) -> bool {
    match media::manifest_kind(&img.target.media_type) {
        Some(ManifestKind::Index) => img.platform == *want,
        _ => want.matches(&img.platform),
    }
}

fn up_to_date(img: &ImageRecord, started: Instant) -> PullReport {
    PullReport {
        reference: img.name.clone(),
        digest: img.target.digest.clone(),
        manifest: img.manifest.digest.clone(),
        platform: img.platform.clone(),
        layers: img.layers.len(),
        size: img.size(),
        fetched_blobs: 0,
        fetched_bytes: 0,
        cached_blobs: img.layers.len() + 1,
        up_to_date: true,
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn descriptor(media_type: &str, digest: &Digest, size: u64) -> DescriptorRecord {
    DescriptorRecord {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size,
    }
}

async fn pull_leased(
    store: &Store,
    client: &RegistryClient,
    reference: &Reference,
    opts: &PullOptions,
    observer: Arc<dyn Observer>,
    lease_id: &str,
    started: Instant,
) -> Result<PullReport> {
    let name = reference.to_string();
    let top = client
        .manifest(reference, &reference.manifest_reference())
        .await?;
    observer.event(&Event::Resolved {
        reference: name.clone(),
        digest: top.digest.to_string(),
        media_type: top.media_type.clone(),
    });
    let what = format!("{name} ({})", top.digest);
    // From an index, the entry's platform; a single manifest's is known
    // only from its config (None until that is read).
    let (manifest, index_platform) = match media::manifest_kind(&top.media_type) {
        Some(ManifestKind::Manifest) => (top.clone(), None),
        Some(ManifestKind::Index) => {
            let (m, p) = select_platform(store, client, reference, &top, &opts.platform).await?;
            (m, Some(p))
        }
        Some(ManifestKind::Schema1) => return Err(Error::Schema1 { what }),
        None => {
            return Err(Error::UnsupportedMediaType {
                what,
                media_type: top.media_type.clone(),
            })
        }
    };

    // Same target as the ref we hold, and all of it present: nothing to do.
    if let Ok(held) = store.image(&name) {
        let same_platform = match &index_platform {
            Some(p) => held.platform == *p,
            None => opts.platform.matches(&held.platform),
        };
        if held.target.digest == top.digest.as_ref() && same_platform && store.is_complete(&held) {
            return Ok(up_to_date(&held, started));
        }
    }

    let ImagePlan {
        config_digest,
        config_size,
        config_type,
        layers,
        blobs,
    } = image_plan(&manifest.bytes, &manifest.digest, &name)?;
    let config_what = format!("config {config_digest} of {name}");

    // Lease everything before writing any of it.
    let mut leased: Vec<String> = vec![top.digest.to_string(), manifest.digest.to_string()];
    leased.extend(blobs.iter().map(|(d, ..)| d.to_string()));
    store.meta().update(|t| {
        let mut lease = t.lease(lease_id)?.unwrap_or_else(Lease::for_this_process);
        lease.blobs = leased.clone();
        t.put_lease(lease_id, &lease)
    })?;

    for (d, size, mt, kind) in &blobs {
        observer.event(&Event::Blob {
            digest: d.to_string(),
            kind: *kind,
            size: *size,
            media_type: mt.clone(),
        });
    }
    put_bytes(store, &top).await?;
    if manifest.digest != top.digest {
        put_bytes(store, &manifest).await?;
    }

    // The config is checked as soon as it is in (it is fetched first, with
    // the layers): an image that can never work is refused then, and the
    // layer downloads still running are dropped with the stream.
    let config_platform: OnceLock<Platform> = OnceLock::new();
    let refused = AtomicBool::new(false);
    let check_config = || -> Result<()> {
        let result = (|| {
            let bytes = store.read_config(&config_digest).map_err(|e| match e {
                Error::ConfigTooLarge { size, limit, .. } => Error::ConfigTooLarge {
                    what: config_what.clone(),
                    size,
                    limit,
                },
                e => e,
            })?;
            let head = ImageConfigHead::parse(&bytes, &config_what)?;
            head.check_layers(layers.len(), &config_what)?;
            let actual = head.platform();
            // An index chose by platform already; a single manifest has only
            // its config to say what it runs on (containerd checks the same).
            if index_platform.is_none() && !opts.platform.matches(&actual) {
                return Err(Error::PlatformMismatch {
                    reference: name.clone(),
                    wanted: opts.platform.to_string(),
                    actual: if actual.os.is_empty() || actual.architecture.is_empty() {
                        format!("an unnamed platform ({actual:?})")
                    } else {
                        actual.to_string()
                    },
                });
            }
            let _ = config_platform.set(actual);
            Ok(())
        })();
        if result.is_err() {
            refused.store(true, Ordering::Relaxed);
        }
        result
    };
    let blocking = BlockingWork::default();
    let outcomes: Vec<Option<u64>> = match stream::iter(blobs.iter().cloned())
        .map(|(d, size, _, kind)| {
            let fetched = fetch_blob(
                store,
                client,
                reference,
                d,
                size,
                observer.clone(),
                &blocking,
            );
            let check_config = &check_config;
            async move {
                let n = fetched.await?;
                if kind == BlobKind::Config {
                    check_config()?;
                }
                Ok(n)
            }
        })
        .buffer_unordered(opts.max_concurrent.max(1))
        .try_collect()
        .await
    {
        Ok(o) => o,
        Err(e) => {
            // A refused image's layers will not be pulled as it is: their
            // partials are litter, like those that a full disk cannot use.
            if matches!(e, Error::NoSpace { .. }) || refused.load(Ordering::Relaxed) {
                // Dropping the downloads does not stop their blocking halves:
                // an ingest lock being taken now would create its partial
                // after the discard looked.
                blocking.settled(Duration::from_secs(5)).await;
                let digests = blobs.iter().map(|(d, ..)| d.clone()).collect();
                discard_partials(store, digests).await;
            }
            return Err(e);
        }
    };

    let mut records: Vec<(String, BlobRecord)> = blobs
        .iter()
        .map(|(d, size, mt, _)| {
            (
                d.to_string(),
                BlobRecord {
                    size: *size,
                    media_type: mt.clone(),
                    children: vec![],
                },
            )
        })
        .collect();
    let mut manifest_children = vec![config_digest.to_string()];
    manifest_children.extend(layers.iter().map(|l| l.digest.clone()));
    records.push((
        manifest.digest.to_string(),
        BlobRecord {
            size: manifest.bytes.len() as u64,
            media_type: manifest.media_type.clone(),
            children: manifest_children,
        },
    ));
    if manifest.digest != top.digest {
        records.push((
            top.digest.to_string(),
            BlobRecord {
                size: top.bytes.len() as u64,
                media_type: top.media_type.clone(),
                children: vec![manifest.digest.to_string()],
            },
        ));
    }
    // Recorded as what it is: the index entry, or the config's own word.
    let platform = match index_platform {
        Some(p) => p,
        None => config_platform
            .into_inner()
            .expect("the config was checked with the blobs"),
    };
    let image = ImageRecord {
        name: name.clone(),
        target: descriptor(&top.media_type, &top.digest, top.bytes.len() as u64),
        manifest: descriptor(
            &manifest.media_type,
            &manifest.digest,
            manifest.bytes.len() as u64,
        ),
        config: descriptor(&config_type, &config_digest, config_size),
        layers,
        platform: platform.clone(),
        updated: cstore_os::now_unix(),
    };
    tracing::debug!(image = %name, "recording the image");
    store.commit_image(&image, &records, lease_id)?;
    tracing::debug!(image = %name, "recorded the image");

    let fetched: Vec<u64> = outcomes.iter().flatten().copied().collect();
    Ok(PullReport {
        reference: name,
        digest: top.digest.to_string(),
        manifest: manifest.digest.to_string(),
        platform,
        layers: image.layers.len(),
        size: image.size(),
        fetched_blobs: fetched.len(),
        fetched_bytes: fetched.iter().sum(),
        cached_blobs: outcomes.len() - fetched.len(),
        up_to_date: false,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What a platform manifest asks for: its config and layers, checked.
#[derive(Clone, Debug)]
pub struct ImagePlan {
    pub config_digest: Digest,
    pub config_size: u64,
    pub config_type: String,
    /// In manifest order, repeats included.
    pub layers: Vec<DescriptorRecord>,
    /// The config, then each distinct layer: what the pull fetches.
    pub blobs: Vec<(Digest, u64, String, BlobKind)>,
}

/// Parse and check a platform manifest (`digest` of `name`): an image
/// config, layer media types cstore can unpack, sha256 digests only.
pub fn image_plan(bytes: &[u8], digest: &Digest, name: &str) -> Result<ImagePlan> {
    let parsed: ImageManifest = serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
        what: format!("manifest {digest} of {name}"),
        reason: e.to_string(),
    })?;
    let config = parsed.config();
    let config_type = config.media_type().to_string();
    if !media::is_config(&config_type) {
        return Err(Error::UnsupportedMediaType {
            what: format!(
                "config {} of {name} (not a container image?)",
                config.digest()
            ),
            media_type: config_type,
        });
    }
    let config_digest = parse_digest(config.digest().as_ref())?;
    if config.size() > MAX_CONFIG_BYTES {
        return Err(Error::ConfigTooLarge {
            what: format!("config {config_digest} of {name}"),
            size: config.size(),
            limit: MAX_CONFIG_BYTES,
        });
    }
    let mut blobs: Vec<(Digest, u64, String, BlobKind)> = vec![(
        config_digest.clone(),
        config.size(),
        config_type.clone(),
        BlobKind::Config,
    )];
    let mut layers = Vec::new();
    // A 4 MiB manifest can list ~27000 layers: looking each up in `blobs`
    // took minutes.
    let mut seen = std::collections::HashSet::from([config_digest.to_string()]);
    for layer in parsed.layers() {
        let mt = layer.media_type().to_string();
        let d = parse_digest(layer.digest().as_ref())?;
        if layer_compression(&mt).is_none() {
            return Err(Error::UnsupportedMediaType {
                what: format!("layer {d} of {name}"),
                media_type: mt,
            });
        }
        layers.push(descriptor(&mt, &d, layer.size()));
        if seen.insert(d.to_string()) {
            blobs.push((d, layer.size(), mt, BlobKind::Layer));
        }
    }
    Ok(ImagePlan {
        config_digest,
        config_size: config.size(),
        config_type,
        layers,
        blobs,
    })
}

/// The entry of an index (`digest` of `reference`) for `want`, checked: a
/// platform manifest, a sha256 digest, within the manifest size limit.
pub fn choose_manifest(
    bytes: &[u8],
    digest: &Digest,
    reference: &str,
    want: &Platform,
) -> Result<(Descriptor, Digest, Platform)> {
    let parsed: ImageIndex = serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
        what: format!("index {digest} of {reference}"),
        reason: e.to_string(),
    })?;
    let mut available = Vec::new();
    let mut chosen = None;
    for m in parsed.manifests() {
        let Some(p) = m.platform().as_ref().map(Platform::from_oci) else {
            continue;
        };
        available.push(p.to_string());
        if chosen.is_none()
            && want.matches(&p)
            && media::manifest_kind(m.media_type().as_ref()) == Some(ManifestKind::Manifest)
        {
            chosen = Some((m.clone(), p));
        }
    }
    let Some((desc, platform)) = chosen else {
        return Err(Error::PlatformNotFound {
            reference: reference.to_string(),
            platform: want.to_string(),
            available: if available.is_empty() {
                "no platforms".into()
            } else {
                available.join(", ")
            },
        });
    };
    let digest = parse_digest(desc.digest().as_ref())?;
    if desc.size() > MAX_MANIFEST_BYTES {
        return Err(Error::ManifestTooLarge {
            what: format!("manifest {digest} of {reference}"),
            limit: MAX_MANIFEST_BYTES,
        });
    }
    Ok((desc, digest, platform))
}

/// Choose the manifest for `want` from an index, and fetch it (or read it
/// from the store if held).
async fn select_platform(
    store: &Store,
    client: &RegistryClient,
    reference: &Reference,
    index: &FetchedManifest,
    want: &Platform,
) -> Result<(FetchedManifest, Platform)> {
    let (desc, digest, platform) =
        choose_manifest(&index.bytes, &index.digest, &reference.to_string(), want)?;
    if store.blob_dirs().is_present(&digest, desc.size()) {
        let bytes = store.read_blob(&digest, MAX_MANIFEST_BYTES)?;
        return Ok((
            FetchedManifest {
                bytes: Bytes::from(bytes),
                media_type: desc.media_type().to_string(),
                digest,
            },
            platform,
        ));
    }
    let mut m = client.manifest(reference, digest.as_ref()).await?;
    if m.bytes.len() as u64 != desc.size() {
        return Err(Error::SizeMismatch {
            digest: digest.to_string(),
            expected: desc.size(),
            actual: m.bytes.len() as u64,
        });
    }
    if media::manifest_kind(&m.media_type) != Some(ManifestKind::Manifest) {
        m.media_type = desc.media_type().to_string();
    }
    Ok((m, platform))
}

async fn put_bytes(store: &Store, m: &FetchedManifest) -> Result<()> {
    let dirs = store.blob_dirs().clone();
    let (digest, bytes) = (m.digest.clone(), m.bytes.clone());
    tokio::task::spawn_blocking(move || dirs.put_bytes(&digest, &bytes))
        .await
        .expect("ingest task panicked")
}

/// The disk is full: the partial downloads of this pull (those of blobs its
/// failure cancelled too) hold space a resume cannot use until some is
/// freed, so give it back rather than keep them for resuming.
async fn discard_partials(store: &Store, digests: Vec<Digest>) {
    let dirs = store.blob_dirs().clone();
    let _ = tokio::task::spawn_blocking(move || {
        for d in digests {
            if let Err(e) = dirs.discard_partial(&d, Duration::from_secs(5)) {
                tracing::warn!(blob = %d, error = %e, "could not remove a partial download");
            }
        }
    })
    .await;
}

/// Counts the blocking ingest work of a pull's downloads, which goes on for
/// a moment after their futures are dropped.
#[derive(Default)]
struct BlockingWork(Arc<()>);

impl BlockingWork {
    /// Held by a blocking closure for as long as it runs.
    fn token(&self) -> Arc<()> {
        self.0.clone()
    }

    /// Waits (bounded) until no blocking work holds a token.
    async fn settled(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while Arc::strong_count(&self.0) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Fetch one blob into the store unless it is there. Returns the bytes
/// downloaded, or None if it was already present.
async fn fetch_blob(
    store: &Store,
    client: &RegistryClient,
    reference: &Reference,
    digest: Digest,
    size: u64,
    observer: Arc<dyn Observer>,
    blocking: &BlockingWork,
) -> Result<Option<u64>> {
    let id = digest.to_string();
    let dirs = store.blob_dirs().clone();
    if dirs.is_present(&digest, size) {
        observer.event(&Event::Cached { digest: id });
        return Ok(None);
    }
    let acquired = {
        let (dirs, digest) = (dirs.clone(), digest.clone());
        let waiting = tokio::time::sleep(Duration::from_millis(200));
        let token = blocking.token();
        let task = tokio::task::spawn_blocking(move || {
            // Let go once the partial exists: from then on a discard waits
            // for the ingest lock instead.
            let _token = token;
            dirs.acquire(&digest, size)
        });
        tokio::pin!(task, waiting);
        let mut said = false;
        loop {
            tokio::select! {
                r = &mut task => break r.expect("ingest task panicked")?,
                _ = &mut waiting, if !said => {
                    said = true;
                    observer.event(&Event::Waiting { digest: id.clone() });
                }
            }
        }
    };
    let writer = match acquired {
        Acquired::Present => {
            observer.event(&Event::Cached { digest: id });
            return Ok(None);
        }
        Acquired::Writer(w) => *w,
    };
    let resumed = writer.resumed_from();
    match download(client, reference, writer, size, observer.clone()).await {
        Ok(n) => Ok(Some(n)),
        // A partial left by someone else may hold bytes that are not this
        // blob's; one fresh download settles it.
        Err(Error::DigestMismatch { .. }) if resumed > 0 => {
            tracing::warn!(blob = %id, "resumed download failed verification; fetching it whole");
            let Acquired::Writer(mut w) = tokio::task::spawn_blocking({
                let (dirs, digest) = (dirs.clone(), digest.clone());
                move || dirs.acquire(&digest, size)
            })
            .await
            .expect("ingest task panicked")?
            else {
                return Ok(None);
            };
            w.reset()?;
            download(client, reference, *w, size, observer)
                .await
                .map(Some)
        }
        Err(e) => Err(e),
    }
}

/// Stream the blob into `writer` (the registry's reader resumes with Range
/// after a dropped connection by itself). Hashing and writing run on a
/// blocking thread fed by a bounded channel, so the network and the disk
/// overlap.
async fn download(
    client: &RegistryClient,
    reference: &Reference,
    writer: BlobWriter,
    size: u64,
    observer: Arc<dyn Observer>,
) -> Result<u64> {
    let digest = writer.digest().clone();
    let id = digest.to_string();
    let start_offset = writer.offset();
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    let sink = tokio::task::spawn_blocking(move || -> Result<BlobWriter> {
        let mut w = writer;
        while let Some(chunk) = rx.blocking_recv() {
            w.write_bytes(chunk)?;
            // Caught up with the network: write out the buffer (up to 1 MiB),
            // else a pull killed now loses it and cannot resume from it. When
            // the disk is the bottleneck the channel stays full and writes
            // stay large.
            if rx.is_empty() {
                w.flush()?;
            }
        }
        Ok(w)
    });
    // If the sink fails (disk full, too many bytes), sends fail: get its error.
    let sink_error = |sink: tokio::task::JoinHandle<Result<BlobWriter>>| async move {
        match sink.await.expect("ingest task panicked") {
            Err(e) => e,
            Ok(_) => Error::Malformed {
                what: "ingest".into(),
                reason: "writer stopped early".into(),
            },
        }
    };

    observer.event(&Event::Started {
        digest: id.clone(),
        offset: start_offset,
    });
    let mut blob = client
        .blob(reference, &digest, start_offset, size)
        .on_retry({
            let (observer, id) = (observer.clone(), id.clone());
            move |attempt, why| {
                observer.event(&Event::Retrying {
                    digest: id.clone(),
                    attempt,
                    error: why.to_string(),
                })
            }
        });
    loop {
        let chunk = match blob.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                // The writer's own error (a full disk) says more than the
                // body's length once it has failed.
                drop(tx);
                return Err(match sink.await.expect("ingest task panicked") {
                    Err(w) => w,
                    Ok(_) => e.into(),
                });
            }
        };
        if tx.send(chunk).await.is_err() {
            return Err(sink_error(sink).await);
        }
        observer.event(&Event::Progress {
            digest: id.clone(),
            bytes: blob.offset(),
        });
    }
    drop(tx);
    let writer = sink.await.expect("ingest task panicked")?;
    tokio::task::spawn_blocking(move || writer.commit())
        .await
        .expect("ingest task panicked")?;
    observer.event(&Event::Done { digest: id });
    Ok(size - start_offset)
}
