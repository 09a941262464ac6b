//! `cstore pull --lazy`: the image's manifest and config, and for each layer
//! an index (local → the registry's index artifact → an eStargz TOC); a
//! layer with none is pulled whole and unpacked, and the caller is told so
//! for that layer, never silently. Lazy layers become committed snapshots
//! labelled `cstore.io/lazy`, their trees filled in place by the daemon.

use std::io::Write as _;

use cstore_registry::{parse_digest, RegistryClient};
use cstore_snapshotter::image::{self, Layer};
use cstore_snapshotter::Snapshotter;
use cstore_store::ingest::Acquired;
use cstore_store::Store;
use serde_json::Value;

use crate::artifact::{self, Resolved};
use crate::error::Result;

/// The annotation eStargz converters put on a layer: its TOC's digest.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";

/// What happened to one layer of a lazy pull.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Already a committed snapshot (lazy or not).
    Present { layer: String },
    /// Served lazily, with the index from `origin` (local, referrers, estargz).
    Lazy { layer: String, origin: String },
    /// Pulled whole, because it has no index: `reason` says why.
    Whole { layer: String, reason: String },
}

/// The manifest's layer annotations, by position.
pub fn annotations(img: &Resolved) -> Vec<Value> {
    serde_json::from_slice::<Value>(&img.manifest)
        .ok()
        .and_then(|v| v["layers"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .map(|l| l["annotations"].clone())
        .collect()
}

/// An eStargz layer's index from its footer and TOC, verified against the
/// TOC digest the manifest pins.
fn estargz_index(
    rt: &tokio::runtime::Handle,
    client: &RegistryClient,
    img: &Resolved,
    l: &cstore_store::meta::DescriptorRecord,
    diff_id: &str,
    toc_digest: &str,
) -> Result<Vec<u8>> {
    use cstore_index::estargz;
    let r = &img.reference;
    let d = parse_digest(&l.digest)?;
    let n = estargz::FOOTER_FETCH.min(l.size);
    let tail = rt.block_on(client.blob_range(r, &d, l.size - n, n))?;
    let footer = estargz::parse_footer(&tail, l.size)?;
    let range = footer.toc_range(l.size);
    let bytes = rt.block_on(client.blob_range(r, &d, range.start, range.end - range.start))?;
    let toc = estargz::read_toc(&footer, &bytes, Some(toc_digest))?;
    let imp = estargz::import(
        &footer,
        &toc,
        cstore_index::parse_digest(&l.digest)?,
        cstore_index::parse_digest(diff_id)?,
        l.size,
        cstore_unpack::tree_options(cstore_unpack::MAX_MADE_DIR_BYTES),
    )?;
    Ok(imp.index)
}

/// Fetch a layer blob whole into the store (verified, atomic).
fn fetch_whole(
    rt: &tokio::runtime::Handle,
    client: &RegistryClient,
    store: &Store,
    img: &Resolved,
    l: &cstore_store::meta::DescriptorRecord,
) -> Result<()> {
    let d = parse_digest(&l.digest)?;
    let mut w = match store.blob_dirs().acquire(&d, l.size)? {
        Acquired::Present => return Ok(()),
        Acquired::Writer(w) => w,
    };
    w.reset()?;
    let mut reader = client.blob(&img.reference, &d, 0, l.size);
    while let Some(chunk) = rt.block_on(reader.chunk())? {
        w.write(&chunk)?;
    }
    w.commit()?;
    Ok(())
}

/// Pull `img` lazily into `store` and `sn`: see the module doc.
pub fn pull_lazy(
    rt: &tokio::runtime::Handle,
    client: &RegistryClient,
    store: &Store,
    sn: &Snapshotter,
    img: &Resolved,
    on_event: &dyn Fn(&Event),
) -> Result<Vec<Event>> {
    let name = img.reference.to_string();
    let held = store
        .image(&name)
        .is_ok_and(|i| i.manifest.digest == img.manifest_digest.to_string());
    if !held {
        artifact::record(store, img)?;
    }
    let record = store.image(&name)?;
    let layers = image::layers_of(store, &record)?;
    let ann = annotations(img);
    // The registry's artifact is looked up once, and only if needed.
    let mut remote: Option<std::collections::HashMap<String, artifact::Found>> = None;
    let mut events = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let digest = &l.descriptor.digest;
        let ev = if sn.stat(&l.chain_id).is_ok() {
            Event::Present {
                layer: digest.clone(),
            }
        } else {
            match find_index(rt, client, store, img, l, ann.get(i), &mut remote)? {
                Ok(origin) => {
                    image::commit_lazy(sn, &layers, i, &name)?;
                    Event::Lazy {
                        layer: digest.clone(),
                        origin,
                    }
                }
                Err(reason) => {
                    fetch_whole(rt, client, store, img, &l.descriptor)?;
                    image::unpack_single(sn, store, &record, &layers, i, &|_| {})?;
                    Event::Whole {
                        layer: digest.clone(),
                        reason,
                    }
                }
            }
        };
        on_event(&ev);
        events.push(ev);
    }
    let _ = std::io::stdout().flush();
    Ok(events)
}

/// Where layer `l`'s index comes from (stored in the store on the way), or
/// why it has none. `remote` caches the registry's artifact of `img`.
pub fn find_index(
    rt: &tokio::runtime::Handle,
    client: &RegistryClient,
    store: &Store,
    img: &Resolved,
    l: &Layer,
    annotations: Option<&Value>,
    remote: &mut Option<std::collections::HashMap<String, artifact::Found>>,
) -> Result<std::result::Result<String, String>> {
    let digest = &l.descriptor.digest;
    if let Some(rec) = store.layer_index(digest)? {
        return Ok(Ok(format!("local ({})", rec.origin)));
    }
    if remote.is_none() {
        *remote = Some(match artifact::find(rt, client, img) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("{}: index artifact refused: {e}", img.reference);
                Default::default()
            }
        });
    }
    if let Some(f) = remote.as_ref().and_then(|m| m.get(digest)) {
        // Fetched only now, for a layer that needs it (one already local
        // costs no index bytes), and kept in the store: the daemon reads it
        // there, never from the registry again.
        match f.fetch(rt, client, img, &l.descriptor) {
            Ok((index, spans)) => {
                let w = f.windows.as_ref().map(|w| w.to_string());
                store.put_layer_index(digest, &index, None, w.as_deref(), "referrers")?;
                let trace = f.trace(rt, client, img, digest, spans);
                if !trace.is_empty() {
                    crate::serve::put_pulled_trace(store, digest, &trace)?;
                }
                return Ok(Ok(format!("the registry (artifact {})", f.artifact)));
            }
            Err(e) => return Ok(Err(format!("its index in the registry was refused: {e}"))),
        }
    }
    if let Some(toc) = annotations.and_then(|a| a[TOC_DIGEST_ANNOTATION].as_str()) {
        return match estargz_index(rt, client, img, &l.descriptor, &l.diff_id, toc) {
            Ok(index) => {
                store.put_layer_index(digest, &index, None, None, "estargz")?;
                Ok(Ok("its eStargz TOC".into()))
            }
            Err(e) => Ok(Err(format!("its eStargz TOC was refused: {e}"))),
        };
    }
    let compression = cstore_unpack::layer_compression(&l.descriptor.media_type);
    Ok(Err(match compression {
        Some(cstore_unpack::Compression::Zstd) => {
            "no index in the store or the registry, and no eStargz TOC (a zstd layer made by most tools is one frame: it cannot be served lazily)".into()
        }
        _ => "no index in the store or the registry, and no eStargz TOC (cstore index push makes one)".into(),
    }))
}
