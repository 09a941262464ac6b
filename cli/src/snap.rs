//! `unpack`, `mount`, `umount`, `snapshots`: images as root filesystems.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cstore_runtime::containers::{LABEL_CONTAINER, LABEL_IMAGE, LABEL_MOUNTPOINT};
use cstore_snapshotter::image::{self, Event, LABEL_LAYER_DIGEST, LABEL_LAZY};
use cstore_snapshotter::{mount, Kind, Snapshotter};
use cstore_store::Store;
use cstore_unpack::UnpackOptions;

use crate::progress::human_bytes;

const MOUNT_KEY_PREFIX: &str = "cstore-mount:";

pub fn jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Layers unpacked at once into `store`: one per core, or as many blob
/// streams as its device's policy takes (one on a rotational disk).
pub fn unpack_jobs(store: &Store) -> usize {
    let cores = jobs();
    store
        .stream_config()
        .max_streams
        .map_or(cores, |s| s.min(cores))
}

pub fn open(store: &Store) -> Result<Snapshotter> {
    Snapshotter::open(store.root()).context("opening the snapshot tree")
}

/// Unpack `reference` (already pulled) into layer snapshots.
pub fn unpack(store: &Store, reference: &str, json: bool) -> Result<image::UnpackReport> {
    let sn = open(store)?;
    // Leftovers of a killed unpack: staging dirs of dead processes.
    sn.cleanup()?;
    let img = store.image(reference)?;
    let quiet = json;
    let started = std::sync::Mutex::new(std::collections::HashMap::new());
    let report = image::unpack_image(
        &sn,
        store,
        &img,
        &UnpackOptions::default(),
        unpack_jobs(store),
        &|e| {
            crate::logging::unpack_event(&img.name, &e, &started);
            if quiet {
                println!("{}", serde_json::to_string(&e).unwrap_or_default());
                return;
            }
            match e {
                Event::Present { layer, .. } => println!("{}: already unpacked", short(&layer)),
                Event::Unpacking { layer } => println!("{}: unpacking", short(&layer)),
                Event::Unpacked { layer, stats } => println!(
                    "{}: unpacked {} entries, {} of files",
                    short(&layer),
                    stats.extract.entries,
                    human_bytes(stats.extract.file_bytes)
                ),
                Event::Indexed {
                    layer,
                    spans,
                    index_bytes,
                    windows_bytes,
                } => println!(
                    "{}: indexed ({spans} spans; index {}, windows {})",
                    short(&layer),
                    human_bytes(index_bytes),
                    human_bytes(windows_bytes)
                ),
                Event::NotIndexed { layer, reason } => {
                    println!("{}: no lazy index: {reason}", short(&layer))
                }
            }
        },
    )?;
    tracing::info!(
        image = report.image,
        chain_id = report.chain_id,
        layers = report.layers,
        unpacked = report.unpacked,
        duration_ms = (report.seconds * 1e6).round() / 1e3,
        "unpacked the image"
    );
    if json {
        println!(
            "{}",
            serde_json::json!({"event": "unpacked", "result": report})
        );
    } else {
        println!(
            "unpacked {}: {} of {} layers in {:.2}s (top chain {})",
            report.image, report.unpacked, report.layers, report.seconds, report.chain_id
        );
    }
    Ok(report)
}

fn short(d: &str) -> String {
    d.trim_start_matches("sha256:").chars().take(12).collect()
}

fn canonical_dir(dir: &Path) -> Result<PathBuf> {
    let c = dir
        .canonicalize()
        .with_context(|| format!("mount point {}", dir.display()))?;
    if !c.is_dir() {
        bail!("mount point {} is not a directory", c.display());
    }
    Ok(c)
}

pub fn mount_image(store: &Store, reference: &str, dir: &Path, rw: bool) -> Result<()> {
    let target = canonical_dir(dir)?;
    if mount::is_mountpoint(&target) {
        bail!("{} is already a mount point", target.display());
    }
    let sn = open(store)?;
    let img = store.image(reference)?;
    let layers = image::layers_of(store, &img)?;
    let top = layers.last().context("image has no layers")?;
    if !sn
        .stat(&top.chain_id)
        .is_ok_and(|i| i.kind == Kind::Committed)
    {
        unpack(store, reference, false)?;
    }
    let key = format!("{MOUNT_KEY_PREFIX}{}", target.display());
    let labels = BTreeMap::from([
        (LABEL_MOUNTPOINT.to_string(), target.display().to_string()),
        (LABEL_IMAGE.to_string(), img.name.clone()),
    ]);
    let mut mounts = if rw {
        sn.prepare(&key, Some(&top.chain_id), labels)
    } else {
        sn.view(&key, Some(&top.chain_id), labels)
    }
    .map_err(|e| match e {
        cstore_snapshotter::Error::AlreadyExists(_) => {
            anyhow::anyhow!(
                "a cstore snapshot for {} exists but is not mounted: run `cstore umount {}` first",
                target.display(),
                target.display()
            )
        }
        e => e.into(),
    })?;
    // Lazy layers are their daemon's FUSE mounts (refused if none serves them).
    let chains: Vec<String> = layers.iter().map(|l| l.chain_id.clone()).collect();
    if let Err(e) = cstore_lazy::serve::use_lazy_mounts(store, &sn, &chains, &mut mounts) {
        let _ = sn.remove(&key);
        return Err(e.into());
    }
    // The tree is the image's and DIR is on the host, where other users may
    // reach it: its setuid files and device nodes stay inert there (a
    // container's own root, mounted by `run`, keeps them).
    for m in &mut mounts {
        m.options
            .extend(["nosuid".to_string(), "nodev".to_string()]);
    }
    if let Err(e) = mount::mount_all(&mounts, &target) {
        let _ = sn.remove(&key);
        return Err(e.into());
    }
    println!(
        "mounted {} at {} ({})",
        img.name,
        target.display(),
        if rw { "read-write" } else { "read-only" }
    );
    Ok(())
}

pub fn umount(store: &Store, dir: &Path, keep: bool) -> Result<()> {
    let target = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let sn = open(store)?;
    let key = format!("{MOUNT_KEY_PREFIX}{}", target.display());
    let known = sn.stat(&key).is_ok();
    let mounted = mount::is_mountpoint(&target);
    if !known && !mounted {
        bail!("nothing is mounted at {} by cstore", target.display());
    }
    if mounted {
        if !known {
            bail!(
                "{} is a mount point, but not one cstore made",
                target.display()
            );
        }
        mount::unmount(&target)?;
    }
    if !keep {
        sn.remove(&key)?;
        println!("unmounted {} and removed its snapshot", target.display());
    } else {
        println!("unmounted {} (snapshot {key:?} kept)", target.display());
    }
    Ok(())
}

pub fn list(store: &Store, json: bool) -> Result<()> {
    let sn = open(store)?;
    let mut infos = sn.list()?;
    infos.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
    let rows: Vec<serde_json::Value> = infos
        .iter()
        .map(|i| {
            let usage = sn.usage(&i.name).unwrap_or_default();
            let container = i.labels.get(LABEL_CONTAINER);
            let mount = i.labels.get(LABEL_MOUNTPOINT).map(|mp| {
                match (mount::is_mountpoint(Path::new(mp)), container) {
                    (true, _) => "mounted",
                    // A kept container's rootfs is mounted only while it runs.
                    (false, Some(_)) => "not mounted (container not running)",
                    (false, None) => "stale (not mounted)",
                }
            });
            // A lazy layer: how much of it is local so far.
            let local = match (i.labels.get(LABEL_LAZY), i.labels.get(LABEL_LAYER_DIGEST)) {
                (Some(_), Some(layer)) => match cstore_lazy::serve::local_of(store, layer) {
                    Ok(l) => l.map(|l| {
                        serde_json::json!({
                            "bytes": l.bytes, "total_bytes": l.total_bytes,
                            "spans": l.spans, "total_spans": l.total_spans,
                        })
                    }),
                    Err(e) => {
                        // One layer that cannot tell does not hide the others.
                        eprintln!("lazy layer {layer}: cannot tell how much is local: {e}");
                        None
                    }
                },
                _ => None,
            };
            serde_json::json!({
                "key": i.name, "kind": i.kind, "parent": i.parent, "labels": i.labels,
                "size": usage.size, "inodes": usage.inodes, "created": i.created,
                "mountpoint": i.labels.get(LABEL_MOUNTPOINT), "mount_state": mount,
                "container": container, "lazy_local": local,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:<20} {:>10}  {:<26}  MOUNT",
        "KEY", "KIND", "PARENT", "SIZE", "LAZY: LOCAL"
    );
    for r in rows {
        let key = r["key"].as_str().unwrap_or("");
        let shown = if key.starts_with("sha256:") {
            short(key)
        } else {
            key.to_string()
        };
        let parent = r["parent"].as_str().map(short).unwrap_or_default();
        let mount = match (r["mountpoint"].as_str(), r["mount_state"].as_str()) {
            (Some(mp), Some(st)) => format!("{mp} [{st}]"),
            _ => String::new(),
        };
        let local = match (
            r["lazy_local"]["bytes"].as_u64(),
            r["lazy_local"]["total_bytes"].as_u64(),
        ) {
            (Some(b), Some(t)) => format!(
                "{} ({} of {})",
                crate::lazy::percent(b, t),
                human_bytes(b),
                human_bytes(t)
            ),
            _ => String::new(),
        };
        println!(
            "{:<24} {:<10} {:<20} {:>10}  {:<26}  {}",
            shown,
            r["kind"].as_str().unwrap_or(""),
            parent,
            human_bytes(r["size"].as_u64().unwrap_or(0)),
            local,
            mount
        );
    }
    Ok(())
}

/// Layer snapshots no image uses, and leftovers of killed unpacks.
pub fn gc(store: &Store) -> Result<(usize, usize)> {
    let sn = open(store)?;
    let layers = image::gc_layers(&sn, store)?;
    let dirs = sn.cleanup()?;
    Ok((layers, dirs))
}
