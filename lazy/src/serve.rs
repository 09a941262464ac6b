//! The lazy layers' daemon: one process per store (`cstore lazy-serve`,
//! started on demand by `mount --lazy` / `run --lazy`, flock on
//! `ROOT/lazy/daemon.lock`) serves every lazy layer of the store. Each is a
//! `LayerFs` over a `RegistrySource`, FUSE-mounted at
//! `ROOT/lazy/<layer-hex>/mnt` (its cache beside it), filling the snapshot's
//! own directory in place. Whoever mounts an image puts that FUSE mount in
//! the overlay in place of the snapshot directory ([`use_lazy_mounts`]), so
//! lazy layers stack under overlayfs as unpacked ones do. Background
//! completion turns each into an ordinary committed snapshot (the
//! `cstore.io/lazy` label goes, its verified blob joins the store). The
//! daemon picks up new lazy layers as they are pulled, and exits once every
//! layer it serves is complete and no mount uses its FUSE mounts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cstore_fuse_fs::layer::{Activity, LayerFs, LayerOptions};
use cstore_fuse_fs::{PassthroughMode, Session, SessionOptions, StateDir};
use cstore_registry::{parse_digest, Reference, RegistryClient};
use cstore_snapshotter::image::{LABEL_LAYER_DIGEST, LABEL_LAZY, LABEL_LAZY_SOURCE};
use cstore_snapshotter::{mount, Snapshotter};
use cstore_store::Store;

use crate::error::{Error, Result};
use crate::source::{RegistrySource, Windows};

/// How long a completed, unused layer stays mounted before the daemon lets
/// go (a mount that read the lazy label just before completion still finds it).
const LINGER: Duration = Duration::from_secs(5);

/// Background completion of a newly served layer waits this long (and then for
/// reads to go quiet in every layer): a container is about to start on it, and
/// its first misses should not queue behind megabytes of background requests.
const BACKGROUND_DELAY: Duration = Duration::from_secs(2);

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

fn is_fuse_mount(p: &Path) -> bool {
    cstore_os::mountinfo::read().is_ok_and(|m| {
        cstore_os::mountinfo::find(&m, p).is_some_and(|e| e.fs_type.starts_with("fuse"))
    })
}

/// Replace each lazy layer's snapshot directory in `mounts` by its FUSE
/// mount. A lazy layer nobody serves is an error naming it (its directory
/// is not complete: mounting it would show a partial tree).
pub fn use_lazy_mounts(
    store: &Store,
    sn: &Snapshotter,
    chains: &[String],
    mounts: &mut [cstore_os::mount::Mount],
) -> Result<usize> {
    let mut n = 0;
    for chain in chains {
        let info = sn.stat(chain)?;
        if !info.labels.contains_key(LABEL_LAZY) {
            continue;
        }
        let layer = info
            .labels
            .get(LABEL_LAYER_DIGEST)
            .cloned()
            .unwrap_or_default();
        let mnt = layer_dir(store, &layer).join("mnt");
        if !is_fuse_mount(&mnt) {
            return Err(Error::Invalid {
                what: format!("lazy layer {layer}"),
                reason: "it is not complete and no daemon serves it (mount it with --lazy)".into(),
            });
        }
        let fs_dir = sn.fs_dir(chain)?.display().to_string();
        let mnt = mnt.display().to_string();
        for m in mounts.iter_mut() {
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
        n += 1;
    }
    Ok(n)
}

/// How much of lazy layer `layer` is local (from its cache directory; nothing
/// if no daemon ever served it). None: the store has no index for it.
pub fn local_of(store: &Store, layer: &str) -> Result<Option<cstore_fuse_fs::layer::Local>> {
    let Some(rec) = store.layer_index(layer)? else {
        return Ok(None);
    };
    let index = store.read_blob(&parse_digest(&rec.index)?, 256 << 20)?;
    let idx = cstore_index::Index::parse(index)?;
    let cache = layer_dir(store, layer).join("cache");
    let local = cstore_fuse_fs::layer::local_of(&idx, &cache).map_err(|e| io("read", &cache, e))?;
    Ok(Some(local))
}

/// The lazy snapshots of the store: (chain, layer digest, source reference).
fn lazy_snapshots(sn: &Snapshotter) -> Result<Vec<(String, String, String)>> {
    Ok(sn
        .list()?
        .into_iter()
        .filter(|i| i.labels.contains_key(LABEL_LAZY))
        .filter_map(|i| {
            Some((
                i.name.clone(),
                i.labels.get(LABEL_LAYER_DIGEST)?.clone(),
                i.labels.get(LABEL_LAZY_SOURCE)?.clone(),
            ))
        })
        .collect())
}

/// Every lazy layer's FUSE mount is up (the daemon serves them all).
pub fn all_served(store: &Store, sn: &Snapshotter) -> Result<bool> {
    Ok(lazy_snapshots(sn)?
        .iter()
        .all(|(_, layer, _)| is_fuse_mount(&layer_dir(store, layer).join("mnt"))))
}

struct Served {
    fs: Arc<LayerFs>,
    mnt: PathBuf,
    session: Session<LayerFs>,
    /// Completion ended, verified or not (a layer that failed stays lazy:
    /// its readers got EIO; the next daemon tries again).
    done: Arc<std::sync::atomic::AtomicBool>,
    done_since: Option<Instant>,
}

/// The indexes of the layers below `chain`, nearest first (for implicit
/// directories), as far as the store has them.
fn lower_indexes(
    store: &Store,
    sn: &Snapshotter,
    chain: &str,
) -> Result<Vec<cstore_index::Index<Vec<u8>>>> {
    let mut out = Vec::new();
    let mut cur = sn.stat(chain)?.parent;
    while let Some(p) = cur {
        let info = sn.stat(&p)?;
        if let Some(layer) = info.labels.get(LABEL_LAYER_DIGEST) {
            if let Some(rec) = store.layer_index(layer)? {
                let b = store.read_blob(&parse_digest(&rec.index)?, 256 << 20)?;
                out.push(cstore_index::Index::parse(b)?);
            }
        }
        cur = info.parent;
    }
    Ok(out)
}

fn serve_layer(
    rt: &tokio::runtime::Handle,
    client: &Arc<RegistryClient>,
    store: &Store,
    sn: &Snapshotter,
    (chain, layer, source): (&str, &str, &str),
    activity: &Arc<Activity>,
) -> Result<Served> {
    let rec = store.layer_index(layer)?.ok_or_else(|| Error::Invalid {
        what: format!("lazy layer {layer}"),
        reason: "its index is gone from the store".into(),
    })?;
    let index = store.read_blob(&parse_digest(&rec.index)?, 256 << 20)?;
    let windows = if let Some(w) = &rec.windows {
        let p = store.blob_path(&parse_digest(w)?);
        Windows::Local(std::fs::File::open(&p).map_err(|e| io("open", &p, e))?)
    } else if let Some(w) = &rec.remote_windows {
        Windows::Registry(parse_digest(w)?)
    } else {
        Windows::None
    };
    let dir = layer_dir(store, layer);
    let (cache, mnt, state) = (dir.join("cache"), dir.join("mnt"), dir.join("state"));
    for d in [&cache, &mnt, &state] {
        std::fs::create_dir_all(d).map_err(|e| io("create", d, e))?;
    }
    if mount::is_mountpoint(&mnt) {
        // A dead daemon's mount: nobody serves it any more.
        let _ = cstore_fuse_fs::dev::unmount(&mnt, true);
    }
    let r: Reference = source.parse()?;
    let src = Arc::new(RegistrySource::new(
        client.clone(),
        rt.clone(),
        r,
        parse_digest(layer)?,
        windows,
    ));
    {
        let src = src.clone();
        std::thread::spawn(move || src.warm_up());
    }
    let fs = Arc::new(LayerFs::open(
        index,
        src,
        &cache,
        &sn.fs_dir(chain)?,
        LayerOptions {
            background_delay: BACKGROUND_DELAY,
            activity: activity.clone(),
            ..LayerOptions::default()
        },
    )?);
    let lowers = lower_indexes(store, sn, chain)?;
    fs.inherit_implicit(&lowers.iter().collect::<Vec<_>>());
    let session = Session::start(
        fs.clone(),
        &mnt,
        &StateDir::new(&state)?,
        SessionOptions {
            passthrough: PassthroughMode::IfAvailable,
            ..SessionOptions::default()
        },
    )?;
    // Background completion (on-demand reads go first in the fetchers).
    let (fs2, store2, chain2, layer2, root) = (
        fs.clone(),
        store.clone(),
        chain.to_string(),
        layer.to_string(),
        store.root().to_path_buf(),
    );
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done2 = done.clone();
    std::thread::spawn(move || {
        match fs2.complete() {
            Ok(()) => {
                let r = Snapshotter::open(&root)
                    .map_err(Error::from)
                    .and_then(|sn| finish(&store2, &sn, &layer2, &chain2));
                if let Err(e) = r {
                    tracing::warn!("layer {layer2}: completed, but {e}");
                }
            }
            Err(e) => tracing::error!("layer {layer2}: {e}"),
        }
        done2.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    Ok(Served {
        fs,
        mnt,
        session,
        done,
        done_since: None,
    })
}

/// Is any mount (an overlay's lowerdir, a bind) using `mnt`?
fn in_use(mnt: &Path) -> bool {
    let m = mnt.display().to_string();
    cstore_os::mountinfo::read().is_ok_and(|all| {
        all.iter().any(|e| {
            e.mount_point != mnt
                && (e.super_options.split(',').any(|o| {
                    o.strip_prefix("lowerdir=")
                        .is_some_and(|l| l.split(':').any(|d| d == m))
                }) || e.source == m)
        })
    })
}

/// Serve every lazy layer of the store until none needs serving. `ready` is
/// called once the lazy layers present at the start are mounted.
pub fn serve_store(
    rt: &tokio::runtime::Handle,
    client: Arc<RegistryClient>,
    store: &Store,
    sn: &Snapshotter,
    ready: impl FnOnce(),
) -> Result<()> {
    let lock_path = store.root().join("lazy/daemon.lock");
    std::fs::create_dir_all(store.root().join("lazy")).map_err(|e| io("create", &lock_path, e))?;
    // try_take wants the file to exist.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&lock_path)
        .map_err(|e| io("create", &lock_path, e))?;
    let lock =
        cstore_os::FileLock::try_take(&lock_path).map_err(cstore_snapshotter::Error::from)?;
    let Some(_lock) = lock else {
        // Another daemon serves the store.
        ready();
        return Ok(());
    };
    let mut served: HashMap<String, Served> = HashMap::new();
    // Layers this daemon served and let go: not served again by it.
    let mut finished = std::collections::HashSet::new();
    let mut ready = Some(ready);
    // One for all the layers served: background work yields to reads in any.
    let activity = Arc::new(Activity::default());
    loop {
        for (chain, layer, source) in lazy_snapshots(sn)? {
            if served.contains_key(&layer) || finished.contains(&layer) {
                continue;
            }
            match serve_layer(rt, &client, store, sn, (&chain, &layer, &source), &activity) {
                Ok(s) => {
                    served.insert(layer, s);
                }
                Err(e) => {
                    tracing::error!("serving lazy layer {layer}: {e}");
                    finished.insert(layer);
                }
            }
        }
        if let Some(r) = ready.take() {
            r();
        }
        let now = Instant::now();
        let mut done = Vec::new();
        for (layer, s) in served.iter_mut() {
            if !s.done.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            let since = *s.done_since.get_or_insert(now);
            if now.duration_since(since) > LINGER && !in_use(&s.mnt) {
                done.push(layer.clone());
            }
        }
        for layer in done {
            if let Some(s) = served.remove(&layer) {
                s.fs.shutdown();
                let _ = cstore_fuse_fs::dev::unmount(&s.mnt, true);
                let _ = s.session.wait();
            }
            finished.insert(layer);
        }
        let waiting = lazy_snapshots(sn)?
            .iter()
            .any(|(_, l, _)| !finished.contains(l));
        if served.is_empty() && !waiting {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A completed layer: its snapshot is an ordinary one from now on, and its
/// verified blob copy joins the store's blobs.
fn finish(store: &Store, sn: &Snapshotter, layer: &str, chain: &str) -> Result<()> {
    let blob = layer_dir(store, layer).join("cache/blob");
    let bytes = std::fs::read(&blob).map_err(|e| io("read", &blob, e))?;
    store.blob_dirs().put_bytes(&parse_digest(layer)?, &bytes)?;
    sn.update(
        chain,
        BTreeMap::new(),
        &[
            format!("labels.{LABEL_LAZY}"),
            format!("labels.{LABEL_LAZY_SOURCE}"),
        ],
    )?;
    tracing::info!("layer {layer}: complete, now an ordinary snapshot");
    Ok(())
}

/// `gc`: lazy state of layers that are neither lazy snapshots any more nor
/// mounted goes (a completed layer's cache duplicates its blob).
pub fn gc(store: &Store, sn: &Snapshotter) -> Result<usize> {
    let dir = store.root().join("lazy");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    let lazy: Vec<String> = lazy_snapshots(sn)?
        .into_iter()
        .map(|(_, l, _)| l.trim_start_matches("sha256:").to_string())
        .collect();
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let p = e.path();
        if !p.is_dir() || lazy.contains(&name) || mount::is_mountpoint(&p.join("mnt")) {
            continue;
        }
        if std::fs::remove_dir_all(&p).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}
