//! An image's layer indexes outside the unpack pass: built from the registry
//! without storing the blobs (`cstore index build`), published as an OCI
//! artifact whose subject is the image manifest (`cstore index push`), and
//! found again there (referrers API, or the referrers tag schema
//! `sha256-<hex>` for registries without it, such as CNCF distribution 2.8).

use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use cstore_registry::media::{self, ManifestKind};
use cstore_registry::{parse_digest, Reference, RegistryClient};
use cstore_store::meta::DescriptorRecord;
use cstore_store::pull::{choose_manifest, image_plan};
use cstore_store::{Platform, Store};
use cstore_unpack::{layer_compression, LayerIndex, LayerRef, UnpackOptions};
use oci_spec::image::Digest;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// Annotation on each blob of an index artifact: the layer it indexes.
pub const LAYER_ANNOTATION: &str = "io.cstore.layer.digest";
/// The OCI empty descriptor's blob (`{}`), the artifact's config.
const EMPTY_JSON: &[u8] = b"{}";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// An index blob found in a registry is read whole: at most this.
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
/// An access trace found in a registry: at most this (and 4 bytes per span).
pub const MAX_TRACE_BYTES: u64 = 4 << 20;

/// An access trace (u32 little-endian span numbers) checked against an index of
/// `spans` spans: a whole number of records, every span in range; repeats are
/// dropped (the first read is what counts).
pub fn parse_trace(bytes: &[u8], spans: usize) -> std::result::Result<Vec<u32>, String> {
    if !bytes.len().is_multiple_of(4) {
        return Err(format!(
            "{} bytes: not a whole number of spans",
            bytes.len()
        ));
    }
    let mut seen = vec![false; spans];
    let mut out = Vec::new();
    for c in bytes.chunks_exact(4) {
        let s = u32::from_le_bytes(c.try_into().expect("4 bytes"));
        let Some(seen) = seen.get_mut(s as usize) else {
            return Err(format!("span {s} of an index of {spans} spans"));
        };
        if !std::mem::replace(seen, true) {
            out.push(s);
        }
    }
    Ok(out)
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        what: what.into(),
        reason: reason.into(),
    }
}

/// An image as the registry has it: its platform manifest and layers.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub reference: Reference,
    pub manifest: Bytes,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub config: Bytes,
    pub config_digest: Digest,
    pub layers: Vec<DescriptorRecord>,
    pub diff_ids: Vec<String>,
}

/// Resolve `r` to the manifest for `platform` and fetch its config.
pub fn resolve(
    rt: &tokio::runtime::Handle,
    client: &RegistryClient,
    r: &Reference,
    platform: &Platform,
) -> Result<Resolved> {
    let top = rt.block_on(client.manifest(r, &r.manifest_reference()))?;
    let m = match media::manifest_kind(&top.media_type) {
        Some(ManifestKind::Index) => {
            let (_, d, _) = choose_manifest(&top.bytes, &top.digest, &r.to_string(), platform)?;
            rt.block_on(client.manifest(r, d.as_ref()))?
        }
        _ => top,
    };
    let plan = image_plan(&m.bytes, &m.digest, &r.to_string())?;
    let config = rt.block_on(client.blob_range(r, &plan.config_digest, 0, plan.config_size))?;
    if sha(&config) != plan.config_digest.to_string() {
        return Err(invalid(
            format!("config {} of {r}", plan.config_digest),
            "its bytes do not match its digest",
        ));
    }
    let what = format!("config {} of {r}", plan.config_digest);
    let head = cstore_store::image_config::ImageConfigHead::parse(&config, &what)?;
    head.check_layers(plan.layers.len(), &what)?;
    Ok(Resolved {
        reference: r.clone(),
        manifest: m.bytes,
        manifest_digest: m.digest,
        manifest_media_type: m.media_type,
        config,
        config_digest: plan.config_digest,
        layers: plan.layers,
        diff_ids: head.rootfs.diff_ids,
    })
}

/// Record the image in the store without its layers (manifest, config and
/// the image record): what a lazy pull keeps, and what keeps built indexes
/// from `gc`.
pub fn record(store: &Store, img: &Resolved) -> Result<()> {
    let head = cstore_store::image_config::ImageConfigHead::parse(
        &img.config,
        &format!("config {} of {}", img.config_digest, img.reference),
    )?;
    let platform = Platform {
        os: head.os,
        architecture: head.architecture,
        variant: head.variant,
    };
    let config_type = serde_json::from_slice::<Value>(&img.manifest)
        .ok()
        .and_then(|v| v["config"]["mediaType"].as_str().map(String::from))
        .unwrap_or_else(|| media::OCI_CONFIG.to_string());
    store.record_image_metadata(
        &img.reference.to_string(),
        (&img.manifest, &img.manifest_media_type),
        (&img.config, &config_type),
        &img.layers,
        platform,
    )?;
    Ok(())
}

/// The registry's blob as a `Read`, hashed as it goes by (checked at the end).
struct Streamed<'a> {
    rt: &'a tokio::runtime::Handle,
    reader: cstore_registry::BlobReader<'a>,
    chunk: Bytes,
    hasher: Sha256,
}

impl Read for Streamed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.chunk.is_empty() {
            match self.rt.block_on(self.reader.chunk()) {
                Ok(Some(c)) => {
                    self.hasher.update(&c);
                    self.chunk = c;
                }
                Ok(None) => return Ok(0),
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

/// What happened to one layer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerOutcome {
    pub layer: String,
    /// The stored index's digest, or None with the reason.
    pub index: Option<String>,
    pub reason: Option<String>,
}

/// `cstore index build`: stream each layer of the image from the registry
/// (never stored), index it in one pass with `policy` (span size), check
/// digest and diff_id, and store the index. Layers that have an index
/// already are left alone.
pub fn build(
    rt: &tokio::runtime::Handle,
    client: &RegistryClient,
    store: &Store,
    img: &Resolved,
    policy: cstore_index::Policy,
    on_layer: &dyn Fn(&LayerOutcome),
) -> Result<Vec<LayerOutcome>> {
    // Unless the image is held whole already, record it first: its layers
    // then keep their indexes from `gc`.
    let held = store
        .image(&img.reference.to_string())
        .is_ok_and(|i| i.manifest.digest == img.manifest_digest.to_string());
    if !held {
        record(store, img)?;
    }
    let mut out = Vec::new();
    for (l, diff_id) in img.layers.iter().zip(&img.diff_ids) {
        let outcome = if let Some(rec) = store.layer_index(&l.digest)? {
            LayerOutcome {
                layer: l.digest.clone(),
                index: Some(rec.index),
                reason: Some("already indexed".into()),
            }
        } else {
            build_one(rt, client, store, img, l, diff_id, policy)?
        };
        on_layer(&outcome);
        out.push(outcome);
    }
    Ok(out)
}

fn build_one(
    rt: &tokio::runtime::Handle,
    client: &RegistryClient,
    store: &Store,
    img: &Resolved,
    l: &DescriptorRecord,
    diff_id: &str,
    policy: cstore_index::Policy,
) -> Result<LayerOutcome> {
    let digest = parse_digest(&l.digest)?;
    let compression = layer_compression(&l.media_type).ok_or_else(|| {
        invalid(
            format!("layer {} of {}", l.digest, img.reference),
            format!("media type {} is not a layer", l.media_type),
        )
    })?;
    let name = img.reference.to_string();
    let mut s = Streamed {
        rt,
        reader: client.blob(&img.reference, &digest, 0, l.size),
        chunk: Bytes::new(),
        hasher: Sha256::new(),
    };
    let layer = LayerRef {
        image: &name,
        digest: &l.digest,
        compression,
        diff_id,
    };
    let built = cstore_unpack::index_layer(
        BufReader::with_capacity(1 << 20, &mut s),
        l.size,
        &layer,
        &UnpackOptions {
            index_policy: policy,
            ..UnpackOptions::default()
        },
    )?;
    // The index names this digest: the bytes it was built from must be it.
    let got = format!("sha256:{}", hex::encode(s.hasher.finalize_reset()));
    if got != l.digest {
        return Err(invalid(
            format!("layer {} of {name}", l.digest),
            format!("the registry sent a blob whose digest is {got}"),
        ));
    }
    Ok(match built {
        LayerIndex::Built { index, windows } => {
            let w = (!windows.is_empty()).then_some(windows.as_slice());
            let rec = store.put_layer_index(&l.digest, &index, w, None, "build")?;
            LayerOutcome {
                layer: l.digest.clone(),
                index: Some(rec.index),
                reason: None,
            }
        }
        LayerIndex::Unavailable(why) => LayerOutcome {
            layer: l.digest.clone(),
            index: None,
            reason: Some(why),
        },
    })
}

/// Where `cstore index push` published the artifact.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pushed {
    pub artifact: String,
    pub subject: String,
    /// "referrers" (the registry indexes subjects itself) or "tag" (the
    /// referrers tag schema `sha256-<hex>` was written).
    pub via: String,
    pub layers: usize,
    /// Of those, the layers published with an access trace (recorded by the
    /// lazy runs of this store).
    pub traces: usize,
}

/// `cstore index push`: the stored index of every layer (windows trimmed and
/// compressed first) as one artifact whose subject is the image manifest.
pub fn push(
    rt: &tokio::runtime::Handle,
    client: &Arc<RegistryClient>,
    store: &Store,
    img: &Resolved,
) -> Result<Pushed> {
    let r = &img.reference;
    let mut layers = Vec::new();
    let mut traces = 0;
    for l in &img.layers {
        let Some(rec) = store.layer_index(&l.digest)? else {
            continue;
        };
        let index = store.read_blob(&parse_digest(&rec.index)?, MAX_INDEX_BYTES)?;
        let windows = match &rec.windows {
            Some(w) => {
                std::fs::read(store.blob_path(&parse_digest(w)?)).map_err(|e| Error::Io {
                    op: "read",
                    path: w.clone(),
                    source: e,
                })?
            }
            None => Vec::new(),
        };
        let idx = cstore_index::Index::parse(index.as_slice())?;
        let local = std::fs::File::open(store.blob_path(&parse_digest(&l.digest)?)).ok();
        let source = crate::source::RegistrySource::new(
            client.clone(),
            rt.clone(),
            r.clone(),
            parse_digest(&l.digest)?,
            crate::source::Windows::None,
        );
        let compacted = cstore_index::windows::compact_windows(
            &idx,
            &windows,
            |_, range| {
                let len = (range.end - range.start) as usize;
                match &local {
                    Some(f) => {
                        let mut v = vec![0u8; len];
                        f.read_exact_at(&mut v, range.start)
                            .map_err(cstore_index::Error::Io)?;
                        Ok(v)
                    }
                    None => {
                        use cstore_fuse_fs::layer::SpanSource;
                        source.fetch(range).map_err(cstore_index::Error::Io)
                    }
                }
            },
            19,
        )?;
        // The index travels compressed: a lazy start fetches it before any
        // file, and its entry table shrinks 5-7x.
        let packed = cstore_index::packed::pack(&compacted.index)?;
        for b in [&packed, &compacted.windows] {
            if !b.is_empty() {
                rt.block_on(client.push_blob(r, &parse_digest(&sha(b))?, Bytes::from(b.clone())))?;
            }
        }
        let ann = json!({ LAYER_ANNOTATION: l.digest });
        layers.push(json!({
            "mediaType": cstore_index::PACKED_MEDIA_TYPE,
            "digest": sha(&packed),
            "size": packed.len(),
            "annotations": ann,
        }));
        if !compacted.windows.is_empty() {
            layers.push(json!({
                "mediaType": cstore_index::WINDOWS_MEDIA_TYPE,
                "digest": sha(&compacted.windows),
                "size": compacted.windows.len(),
                "annotations": ann,
            }));
        }
        // The spans this store's lazy runs read first, if any: a fresh store's
        // lazy mount prefetches them.
        let cache = crate::serve::layer_dir(store, &l.digest).join("cache");
        let recorded = cstore_fuse_fs::layer::read_trace(&cache).map_err(|e| Error::Io {
            op: "read the access trace in",
            path: cache.display().to_string(),
            source: e,
        })?;
        let bytes: Vec<u8> = recorded.iter().flat_map(|s| s.to_le_bytes()).collect();
        match parse_trace(&bytes, idx.span_count()) {
            Ok(t) if !t.is_empty() => {
                let b: Vec<u8> = t.iter().flat_map(|s| s.to_le_bytes()).collect();
                rt.block_on(client.push_blob(r, &parse_digest(&sha(&b))?, Bytes::from(b.clone())))?;
                layers.push(json!({
                    "mediaType": cstore_index::TRACE_MEDIA_TYPE,
                    "digest": sha(&b),
                    "size": b.len(),
                    "annotations": ann,
                }));
                traces += 1;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("layer {}: local access trace not pushed: {e}", l.digest),
        }
    }
    let indexed = layers
        .iter()
        .filter(|l| l["mediaType"] == cstore_index::PACKED_MEDIA_TYPE)
        .count();
    if indexed == 0 {
        return Err(invalid(
            format!("image {r}"),
            "no layer has a stored index (cstore pull or cstore index build first)",
        ));
    }
    rt.block_on(client.push_blob(
        r,
        &parse_digest(&sha(EMPTY_JSON))?,
        Bytes::from_static(EMPTY_JSON),
    ))?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "artifactType": cstore_index::ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": sha(EMPTY_JSON), "size": 2},
        "layers": layers,
        "subject": {
            "mediaType": img.manifest_media_type,
            "digest": img.manifest_digest.to_string(),
            "size": img.manifest.len(),
        },
    });
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let digest = sha(&bytes);
    let subject_header = rt.block_on(client.push_manifest(
        r,
        &digest,
        media::OCI_MANIFEST,
        Bytes::from(bytes.clone()),
    ))?;
    let desc = json!({
        "mediaType": media::OCI_MANIFEST,
        "digest": digest,
        "size": bytes.len(),
        "artifactType": cstore_index::ARTIFACT_TYPE,
    });
    let via = if subject_header.is_some() {
        "referrers"
    } else {
        push_tag_schema(rt, client, r, &img.manifest_digest, desc)?;
        "tag"
    };
    Ok(Pushed {
        artifact: digest,
        subject: img.manifest_digest.to_string(),
        via: via.into(),
        layers: indexed,
        traces,
    })
}

fn tag_of(subject: &Digest) -> String {
    subject.to_string().replace(':', "-")
}

/// The referrers tag schema: `sha256-<hex>` names an index of the referrers;
/// add ours, then read it back (CNCF distribution ignores If-Match, so a
/// concurrent writer may have replaced it: merged again, a few times).
fn push_tag_schema(
    rt: &tokio::runtime::Handle,
    client: &RegistryClient,
    r: &Reference,
    subject: &Digest,
    desc: Value,
) -> Result<()> {
    let tag = tag_of(subject);
    for _ in 0..5 {
        let mut manifests = tag_referrers(rt, client, r, subject)?;
        manifests.retain(|m| m["digest"] != desc["digest"]);
        manifests.push(desc.clone());
        let index = json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_INDEX,
            "manifests": manifests,
        });
        let bytes = serde_json::to_vec(&index).expect("json");
        rt.block_on(client.push_manifest(r, &tag, media::OCI_INDEX, Bytes::from(bytes)))?;
        if tag_referrers(rt, client, r, subject)?
            .iter()
            .any(|m| m["digest"] == desc["digest"])
        {
            return Ok(());
        }
    }
    Err(invalid(
        format!("referrers tag {tag} of {r}"),
        "another writer kept replacing it",
    ))
}

/// The descriptors in the referrers tag of `subject` (none if no such tag).
fn tag_referrers(
    rt: &tokio::runtime::Handle,
    client: &RegistryClient,
    r: &Reference,
    subject: &Digest,
) -> Result<Vec<Value>> {
    match rt.block_on(client.manifest(r, &tag_of(subject))) {
        Ok(m) => manifests_of(&m.bytes, &format!("referrers tag of {subject}")),
        Err(cstore_registry::Error::NotFound { .. }) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

fn manifests_of(bytes: &[u8], what: &str) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| invalid(what, e.to_string()))?;
    Ok(v["manifests"].as_array().cloned().unwrap_or_default())
}

/// A layer's index as the registry's artifact lists it: where its blob is,
/// not yet fetched ([`Found::fetch`]), so a layer that is already local costs
/// no index bytes.
#[derive(Debug, Clone)]
pub struct Found {
    /// The index blob, compressed ([`cstore_index::PACKED_MEDIA_TYPE`]) or
    /// not (artifacts pushed before compression: [`cstore_index::MEDIA_TYPE`]).
    pub blob: Digest,
    pub size: u64,
    pub packed: bool,
    pub windows: Option<Digest>,
    pub artifact: String,
    /// The descriptor of the layer's access trace, if the artifact has one
    /// (fetched with [`Found::trace`] once the index is known).
    pub trace: Option<Value>,
}

impl Found {
    /// Fetch the index blob, check it against its descriptor (digest, size
    /// caps before and after decompression), parse it and check it is of
    /// `layer`: the raw index bytes, as the store keeps them, and its span
    /// count (for [`Found::trace`]).
    pub fn fetch(
        &self,
        rt: &tokio::runtime::Handle,
        client: &RegistryClient,
        img: &Resolved,
        layer: &DescriptorRecord,
    ) -> Result<(Vec<u8>, usize)> {
        let r = &img.reference;
        let lwhat = format!(
            "index {} in artifact {} of {r}, layer {}",
            self.blob, self.artifact, layer.digest
        );
        if self.size > MAX_INDEX_BYTES {
            return Err(invalid(
                &lwhat,
                format!("index of {} bytes, over the cap", self.size),
            ));
        }
        let bytes = rt.block_on(client.blob_range(r, &self.blob, 0, self.size))?;
        if sha(&bytes) != self.blob.to_string() {
            return Err(invalid(&lwhat, "the index blob does not match its digest"));
        }
        let bytes = if self.packed {
            cstore_index::packed::unpack(&bytes, MAX_INDEX_BYTES)
                .map_err(|e| invalid(&lwhat, e.to_string()))?
        } else {
            bytes.to_vec()
        };
        let idx = cstore_index::Index::parse(bytes.as_slice())
            .map_err(|e| invalid(&lwhat, e.to_string()))?;
        let h = idx.header();
        if h.layer_digest_str() != layer.digest || h.compressed_size != layer.size {
            return Err(invalid(&lwhat, "the index describes another blob"));
        }
        let spans = idx.span_count();
        Ok((bytes, spans))
    }

    /// The layer's access trace, checked against its index's `spans`
    /// ([`parse_trace`]); empty if the artifact has none or it was refused
    /// (a warning names why): a trace only steers prefetch, a bad one is
    /// dropped and the index kept.
    pub fn trace(
        &self,
        rt: &tokio::runtime::Handle,
        client: &RegistryClient,
        img: &Resolved,
        layer: &str,
        spans: usize,
    ) -> Vec<u32> {
        let Some(t) = &self.trace else {
            return Vec::new();
        };
        fetch_trace(rt, client, &img.reference, t, spans).unwrap_or_else(|e| {
            tracing::warn!(
                "access trace in artifact {} of {}, layer {layer}, refused: {e}",
                self.artifact,
                img.reference
            );
            Vec::new()
        })
    }
}

/// The newest index artifact of the image, through the referrers API or the
/// tag schema; per layer digest, where its index is (nothing fetched yet).
/// Empty if there is none.
pub fn find(
    rt: &tokio::runtime::Handle,
    client: &RegistryClient,
    img: &Resolved,
) -> Result<std::collections::HashMap<String, Found>> {
    let r = &img.reference;
    let subject = &img.manifest_digest;
    let listed = match rt.block_on(client.referrers(r, subject, cstore_index::ARTIFACT_TYPE))? {
        Some(b) => manifests_of(&b, &format!("referrers of {subject}"))?,
        None => tag_referrers(rt, client, r, subject)?,
    };
    let mut out = std::collections::HashMap::new();
    let Some(desc) = listed
        .iter()
        .rev()
        .find(|m| m["artifactType"] == cstore_index::ARTIFACT_TYPE)
    else {
        return Ok(out);
    };
    let art = desc["digest"].as_str().unwrap_or_default().to_string();
    let m = rt.block_on(client.manifest(r, &art))?;
    let what = format!("index artifact {art} of {r}");
    let v: Value = serde_json::from_slice(&m.bytes).map_err(|e| invalid(&what, e.to_string()))?;
    if v["subject"]["digest"] != subject.to_string() {
        return Err(invalid(&what, "its subject is another manifest"));
    }
    let blobs = v["layers"].as_array().cloned().unwrap_or_default();
    for l in &img.layers {
        let of = |mt: &str| {
            blobs
                .iter()
                .find(|b| b["mediaType"] == mt && b["annotations"][LAYER_ANNOTATION] == l.digest)
        };
        let (ib, packed) = match (
            of(cstore_index::PACKED_MEDIA_TYPE),
            of(cstore_index::MEDIA_TYPE),
        ) {
            (Some(b), _) => (b, true),
            (None, Some(b)) => (b, false),
            (None, None) => continue,
        };
        let blob = parse_digest(ib["digest"].as_str().unwrap_or_default())?;
        let size = ib["size"].as_u64().ok_or_else(|| {
            invalid(
                format!("{what}, layer {}", l.digest),
                "the index blob's descriptor has no size",
            )
        })?;
        let windows = of(cstore_index::WINDOWS_MEDIA_TYPE)
            .map(|w| parse_digest(w["digest"].as_str().unwrap_or_default()))
            .transpose()?;
        let trace = of(cstore_index::TRACE_MEDIA_TYPE).cloned();
        out.insert(
            l.digest.clone(),
            Found {
                blob,
                size,
                packed,
                windows,
                artifact: art.clone(),
                trace,
            },
        );
    }
    Ok(out)
}

/// The access trace `desc` names, read with a size cap and checked.
fn fetch_trace(
    rt: &tokio::runtime::Handle,
    client: &RegistryClient,
    r: &Reference,
    desc: &Value,
    spans: usize,
) -> std::result::Result<Vec<u32>, String> {
    let d = parse_digest(desc["digest"].as_str().unwrap_or_default()).map_err(|e| e.to_string())?;
    let size = desc["size"].as_u64().unwrap_or(0);
    let cap = MAX_TRACE_BYTES.min(4 * spans as u64);
    if size > cap {
        return Err(format!("{size} bytes, over the cap of {cap}"));
    }
    if size == 0 {
        return Ok(Vec::new());
    }
    let bytes = rt
        .block_on(client.blob_range(r, &d, 0, size))
        .map_err(|e| e.to_string())?;
    if sha(&bytes) != d.to_string() {
        return Err(format!("blob {d} does not match its digest"));
    }
    parse_trace(&bytes, spans)
}
