//! `cstore index ...`: the layer indexes behind lazy pull (docs/lazy.md).

use std::sync::Arc;

use anyhow::{Context, Result};
use cstore_lazy::artifact;
use cstore_registry::{parse_digest, Reference, RegistryClient};
use cstore_store::{Platform, Store};

use crate::progress::human_bytes;

/// One row per layer of REF: its stored index, if any.
pub fn ls(store: &Store, reference: &str, json: bool) -> Result<()> {
    let image = store.image(reference)?;
    let mut rows = Vec::new();
    for l in &image.layers {
        let rec = store.layer_index(&l.digest)?;
        let parsed = match &rec {
            Some(r) => {
                let bytes = store
                    .read_blob(&parse_digest(&r.index)?, 256 << 20)
                    .with_context(|| format!("index {} of layer {}", r.index, l.digest))?;
                let idx = cstore_index::Index::parse(bytes.as_slice())
                    .with_context(|| format!("index {} of layer {}", r.index, l.digest))?;
                Some((idx.entry_count(), idx.span_count()))
            }
            None => None,
        };
        rows.push(serde_json::json!({
            "layer": l.digest,
            "media_type": l.media_type,
            "size": l.size,
            "index": rec.as_ref().map(|r| serde_json::json!({
                "digest": r.index,
                "size": r.index_size,
                "windows": r.windows,
                "windows_size": r.windows_size,
                "origin": r.origin,
                "entries": parsed.map(|p| p.0),
                "spans": parsed.map(|p| p.1),
            })),
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<14} {:>10}  {:<8} {:>8} {:>7} {:>10} {:>10}",
        "LAYER", "SIZE", "ORIGIN", "ENTRIES", "SPANS", "INDEX", "WINDOWS"
    );
    for r in rows {
        let short: String = r["layer"]
            .as_str()
            .unwrap_or("")
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect();
        let size = human_bytes(r["size"].as_u64().unwrap_or(0));
        match r["index"].as_object() {
            Some(ix) => println!(
                "{short:<14} {size:>10}  {:<8} {:>8} {:>7} {:>10} {:>10}",
                ix["origin"].as_str().unwrap_or(""),
                ix["entries"].to_string(),
                ix["spans"].to_string(),
                human_bytes(ix["size"].as_u64().unwrap_or(0)),
                human_bytes(ix["windows_size"].as_u64().unwrap_or(0)),
            ),
            None => println!("{short:<14} {size:>10}  none (pulled whole when lazy)"),
        }
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn short(d: &str) -> String {
    d.trim_start_matches("sha256:").chars().take(12).collect()
}

/// `cstore index build REF`.
pub fn build(
    store: &Store,
    r: &Reference,
    client: RegistryClient,
    platform: &Platform,
    json: bool,
) -> Result<()> {
    let rt = runtime()?;
    let img = artifact::resolve(rt.handle(), &client, r, platform)?;
    let out = artifact::build(rt.handle(), &client, store, &img, &|o| {
        if json {
            println!("{}", serde_json::to_string(o).unwrap_or_default());
            return;
        }
        match (&o.index, &o.reason) {
            (Some(_), Some(r)) => println!("{}: {r}", short(&o.layer)),
            (Some(d), None) => println!("{}: indexed ({})", short(&o.layer), short(d)),
            (None, r) => println!(
                "{}: no index: {}",
                short(&o.layer),
                r.as_deref().unwrap_or("")
            ),
        }
    })?;
    let n = out.iter().filter(|o| o.index.is_some()).count();
    if !json {
        println!("{r}: {n} of {} layers indexed", out.len());
    }
    Ok(())
}

/// `cstore index push REF`.
pub fn push(
    store: &Store,
    r: &Reference,
    client: RegistryClient,
    platform: &Platform,
    json: bool,
) -> Result<()> {
    let rt = runtime()?;
    let client = Arc::new(client);
    let img = artifact::resolve(rt.handle(), &client, r, platform)?;
    let p = artifact::push(rt.handle(), &client, store, &img)?;
    if json {
        println!("{}", serde_json::to_string(&p)?);
    } else {
        println!(
            "pushed the indexes of {} layers of {r} as {} (subject {}, found through {})",
            p.layers,
            p.artifact,
            p.subject,
            if p.via == "tag" {
                "the referrers tag schema"
            } else {
                "the referrers API"
            }
        );
    }
    Ok(())
}

/// `cstore index ls --remote REF`: what a lazy pull would find in the registry.
pub fn ls_remote(
    r: &Reference,
    client: RegistryClient,
    platform: &Platform,
    json: bool,
) -> Result<()> {
    let rt = runtime()?;
    let img = artifact::resolve(rt.handle(), &client, r, platform)?;
    let found = artifact::find(rt.handle(), &client, &img)?;
    let rows: Vec<_> = img
        .layers
        .iter()
        .map(|l| {
            let f = found.get(&l.digest);
            let parsed = f.and_then(|f| cstore_index::Index::parse(f.index.as_slice()).ok());
            serde_json::json!({
                "layer": l.digest,
                "size": l.size,
                "artifact": f.map(|f| f.artifact.clone()),
                "windows": f.and_then(|f| f.windows.as_ref().map(|w| w.to_string())),
                "entries": parsed.as_ref().map(|i| i.entry_count()),
                "spans": parsed.as_ref().map(|i| i.span_count()),
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    for r in rows {
        let layer = short(r["layer"].as_str().unwrap_or(""));
        match r["artifact"].as_str() {
            Some(a) => println!(
                "{layer}: index in artifact {} ({} entries, {} spans)",
                short(a),
                r["entries"],
                r["spans"]
            ),
            None => println!("{layer}: none in the registry"),
        }
    }
    Ok(())
}
