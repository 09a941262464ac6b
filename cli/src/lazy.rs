//! `cstore index ...`: the layer indexes behind lazy pull (docs/lazy.md).

use anyhow::{Context, Result};
use cstore_registry::parse_digest;
use cstore_store::Store;

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
