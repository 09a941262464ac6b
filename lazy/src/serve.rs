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
//!
//! Restarts (#15): each FUSE connection's /dev/fuse fd is put in an fd store
//! under [`fd_name`] (the store's keeper, [`supervise_store`], or systemd's fd
//! store), so a daemon killed with SIGKILL leaves its mounts stalled, not
//! dead: the next daemon takes each fd back and resumes the session without
//! INIT, and the layer's cache carries on from its on-disk span bitmap.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cstore_fuse_fs::layer::{Activity, LayerFs, LayerOptions};
use cstore_fuse_fs::supervisor::{Decision, FailureWindow, RestartPolicy};
use cstore_fuse_fs::{
    FdStore, Fusectl, KeeperClient, PassthroughMode, Session, SessionOptions, StateDir,
    EXIT_DECLINED, EXIT_STOPPED,
};
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

/// A layer's access trace as found with its index in the registry (u32 little
/// endian, checked), beside its cache.
const PULLED_TRACE: &str = "trace.pulled";

/// Keeps `trace` (found with layer `layer`'s index) for its lazy mounts.
pub fn put_pulled_trace(store: &Store, layer: &str, trace: &[u32]) -> Result<()> {
    let dir = layer_dir(store, layer);
    std::fs::create_dir_all(&dir).map_err(|e| io("create", &dir, e))?;
    let bytes: Vec<u8> = trace.iter().flat_map(|s| s.to_le_bytes()).collect();
    write_atomic(&dir.join(PULLED_TRACE), &bytes)
}

/// What a new mount of the layer prefetches first: the spans this store's runs
/// read (the cache's own trace), then those of the trace pulled with its index;
/// each span once, every one in range (the pulled file is checked again: it is
/// on disk, and the index may have changed since).
fn prefetch_list(dir: &Path, spans: usize) -> Vec<u32> {
    let mut bytes = Vec::new();
    for (p, what) in [
        (dir.join("cache").join("trace"), "recorded"),
        (dir.join(PULLED_TRACE), "pulled"),
    ] {
        match std::fs::read(&p) {
            // A trace cut short by a crash ends mid-record: whole records only.
            Ok(b) => bytes.extend_from_slice(&b[..b.len() / 4 * 4]),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("{what} access trace {}: {e}", p.display()),
        }
    }
    match crate::artifact::parse_trace(&bytes, spans) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("access traces in {}: {e}; no prefetch", dir.display());
            Vec::new()
        }
    }
}

/// Where a layer's lazy state lives in the store.
pub fn layer_dir(store: &Store, layer: &str) -> PathBuf {
    store
        .root()
        .join("lazy")
        .join(layer.trim_start_matches("sha256:"))
}

/// The name a layer's /dev/fuse fd is kept under in the fd store.
pub fn fd_name(layer: &str) -> String {
    format!("lazy.{}", layer.trim_start_matches("sha256:"))
}

/// The layer (`sha256:<hex>`) an fd store name is of, if it is one of ours.
fn layer_of_fd_name(name: &str) -> Option<String> {
    let hex = name.strip_prefix("lazy.")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("sha256:{hex}"))
}

/// The store's keeper socket ([`supervise_store`] binds it).
pub fn keeper_socket(store: &Store) -> PathBuf {
    store.root().join("lazy/keeper.sock")
}

/// Names the systemd unit that runs the store's lazy daemon (written by the
/// daemon when it runs as a service's main process). While it exists no
/// keeper is started for the store and a daemon not run by systemd declines
/// to serve it: two supervisors would each resume or remount the other's
/// connections. Removed by hand to go back to on-demand daemons.
pub fn systemd_unit_file(store: &Store) -> PathBuf {
    store.root().join("lazy/systemd-unit")
}

/// The lock the daemon serving the store holds (flock) while it serves it.
pub fn daemon_lock_file(store: &Store) -> PathBuf {
    store.root().join("lazy/daemon.lock")
}

/// The pid of the daemon serving the store now (written once it holds the lock).
pub fn daemon_pid_file(store: &Store) -> PathBuf {
    store.root().join("lazy/daemon.pid")
}

fn io(op: &'static str, path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        op,
        path: path.display().to_string(),
        source: e,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    cstore_os::write_atomic(path, bytes).map_err(|e| cstore_fuse_fs::Error::from(e).into())
}

pub(crate) fn is_fuse_mount(p: &Path) -> bool {
    all_mounted(&[p])
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

/// Where the store's lazy layers are FUSE-mounted when served.
pub fn lazy_mount_points(store: &Store, sn: &Snapshotter) -> Result<Vec<PathBuf>> {
    Ok(lazy_snapshots(sn)?
        .iter()
        .map(|(_, layer, _)| layer_dir(store, layer).join("mnt"))
        .collect())
}

/// Whether each of `mnts` is a FUSE mount now (one read of the mount table,
/// no database: a caller waiting for the daemon can ask often without holding
/// the store's databases open, which the daemon's start needs).
pub fn all_mounted<P: AsRef<Path>>(mnts: &[P]) -> bool {
    if mnts.is_empty() {
        return true;
    }
    cstore_os::mountinfo::read().is_ok_and(|m| {
        mnts.iter().all(|p| {
            cstore_os::mountinfo::find(&m, p.as_ref())
                .is_some_and(|e| e.fs_type.starts_with("fuse"))
        })
    })
}

struct Served {
    fs: Arc<LayerFs>,
    mnt: PathBuf,
    session: Session<LayerFs>,
    /// Completion ended, verified or not (a layer that failed stays lazy:
    /// its readers got EIO; the next daemon tries again).
    done: Arc<AtomicBool>,
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

/// What the daemon needs besides the store: where FUSE fds are kept between
/// daemons, and the flag a SIGTERM sets.
#[derive(Clone, Default)]
pub struct ServeOptions {
    pub fd_store: Option<Arc<dyn FdStore>>,
    /// Set: stop serving, leaving every connection to the next daemon.
    pub stop: Arc<AtomicBool>,
    /// Keep running with nothing to serve, waiting for new lazy layers (a
    /// systemd service: exiting would only be restarted by `Restart=always`).
    pub resident: bool,
}

/// How [`serve_store`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Nothing left to serve (or another daemon serves the store).
    Done,
    /// Stopped on request; the connections wait in the fd store.
    Stopped,
    /// The store was deleted under the daemon: its mounts are gone with it.
    Gone,
}

/// The store a daemon or keeper was started on, by the identity of its root
/// and of its lock file. Once either is deleted or replaced (a test harness,
/// an operator removed the store) there is nothing left to serve, and the
/// mounts must not outlive it as dead `fuse.cstore` entries.
pub struct StoreWatch {
    ids: Vec<(PathBuf, (u64, u64))>,
}

impl StoreWatch {
    /// Watches the root, `lock` and the files every store has (whichever
    /// exist now). Several: a recursive delete stops at its first error (a
    /// busy mount point), so any one of them may be the only one it reached.
    fn new(root: &Path, lock: &Path) -> StoreWatch {
        use std::os::unix::fs::MetadataExt;
        let paths = [
            root.to_path_buf(),
            lock.to_path_buf(),
            // Never replaced while the store lives (index.json is, by rename).
            root.join("oci-layout"),
            root.join("meta.db"),
            root.join("snapshots/metadata.db"),
        ];
        let ids = paths
            .into_iter()
            .filter_map(|p| {
                let m = std::fs::metadata(&p).ok()?;
                Some((p, (m.dev(), m.ino())))
            })
            .collect();
        StoreWatch { ids }
    }

    pub fn gone(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.ids.iter().any(|(p, id)| match std::fs::metadata(p) {
            Ok(m) => (m.dev(), m.ino()) != *id,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        })
    }
}

/// Detach every overlay stacked on the FUSE mount `mnt` (cstore made them:
/// `mount --lazy`, `run --lazy`), then `mnt` itself. Only for a store that is
/// gone or a connection that cannot be served again: readers through them
/// get errors either way, and an entry left behind is a dead mount nobody
/// will remove.
fn unmount_with_overlays(mnt: &Path, overlays: bool) {
    if overlays {
        let m = mnt.display().to_string();
        let over: Vec<PathBuf> = cstore_os::mountinfo::read()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| {
                e.fs_type == "overlay"
                    && e.super_options.split(',').any(|o| {
                        o.strip_prefix("lowerdir=")
                            .is_some_and(|l| l.split(':').any(|d| d == m))
                    })
            })
            .map(|e| e.mount_point)
            .collect();
        for o in over {
            detach(&o);
        }
    }
    detach(mnt);
}

fn detach(p: &Path) {
    // Detached when busy: a reader or an overlay above must not keep the entry.
    match cstore_os::mount::unmount(p) {
        Ok(()) => tracing::info!("unmounted {}", p.display()),
        Err(e) => tracing::debug!("unmount {}: {e}", p.display()),
    }
}

/// Unmount every lazy layer's FUSE mount of the store at `root` (and with
/// `overlays`, the overlays over them): each `ROOT/lazy/<hex>/mnt` in the
/// mount table, whoever served it.
pub fn unmount_lazy_mounts(root: &Path, overlays: bool) -> usize {
    let lazy = root.join("lazy");
    let mnts: Vec<PathBuf> = cstore_os::mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.fs_type.starts_with("fuse") && e.mount_point.starts_with(&lazy))
        .map(|e| e.mount_point)
        .collect();
    for m in &mnts {
        unmount_with_overlays(m, overlays);
    }
    mnts.len()
}

#[allow(clippy::too_many_arguments)]
fn serve_layer(
    rt: &tokio::runtime::Handle,
    client: &Arc<RegistryClient>,
    store: &Store,
    sn: &Snapshotter,
    chain: &str,
    layer: &str,
    source: &str,
    opts: &ServeOptions,
    lazy: bool,
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
    // A layer that completed while an earlier daemon served it has lost its
    // source label; the mount still needs one (it never fetches: all local).
    write_atomic(&dir.join("source"), source.as_bytes())?;
    let name = fd_name(layer);
    // An fd store that does not answer is an error, not "nothing kept": a
    // fresh mount would end the connection its readers wait on.
    let kept = match &opts.fd_store {
        Some(s) => s.get(&name)?,
        None => None,
    };
    if kept.is_none() && mount::is_mountpoint(&mnt) {
        // A dead daemon's mount whose fd nobody kept: nobody can serve it any more.
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
    if lazy && !fs.is_complete() {
        let trace = prefetch_list(&dir, fs.index().span_count());
        if !trace.is_empty() {
            tracing::info!(
                "layer {layer}: prefetching {} spans of its access traces",
                trace.len()
            );
            fs.prefetch(&trace);
        }
    }
    let state = StateDir::new(&state)?;
    let sopts = SessionOptions {
        passthrough: PassthroughMode::IfAvailable,
        threads: 4,
        fd_store: opts.fd_store.clone().map(|s| (s, name.clone())),
        ..SessionOptions::default()
    };
    let session = match kept {
        Some(fd) => match Session::resume(fs.clone(), fd, &state, sopts.clone()) {
            Ok(s) => {
                tracing::info!("layer {layer}: resumed its FUSE connection");
                s
            }
            Err(e) => {
                // The connection cannot be taken over: end it (its readers get
                // ENOTCONN, not a hang) and mount afresh.
                tracing::error!("layer {layer}: resuming its FUSE connection: {e}");
                if let Ok(Some(conn)) = state.load().map(|s| s.settings.and_then(|s| s.conn)) {
                    let _ = Fusectl::open().and_then(|c| c.abort(conn));
                }
                if let Some(s) = &opts.fd_store {
                    let _ = s.del(&name);
                }
                let _ = cstore_fuse_fs::dev::unmount(&mnt, true);
                Session::start(fs.clone(), &mnt, &state, sopts)?
            }
        },
        None => {
            let s = Session::start(fs.clone(), &mnt, &state, sopts)?;
            tracing::info!("layer {layer}: mounted at {}", mnt.display());
            s
        }
    };
    let done = Arc::new(AtomicBool::new(false));
    if !lazy {
        // Completed and committed under an earlier daemon: only served until unused.
        done.store(true, Ordering::SeqCst);
        return Ok(Served {
            fs,
            mnt,
            session,
            done,
            done_since: None,
        });
    }
    // Background completion (on-demand reads go first in the fetchers).
    let (fs2, store2, chain2, layer2, root) = (
        fs.clone(),
        store.clone(),
        chain.to_string(),
        layer.to_string(),
        store.root().to_path_buf(),
    );
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
            // This filesystem could not make the tree (an xattr it refuses,
            // no space): the layer's reads still work from its spans, so it
            // stays served, lazy, and a later daemon tries again. Let go
            // once unused, it would be unmounted under a `mount --lazy`
            // waiting for it (found in the systemd VM: 234 s of retries).
            Err(
                e @ (cstore_fuse_fs::Error::Layer { .. }
                | cstore_fuse_fs::Error::Io(_)
                | cstore_fuse_fs::Error::Os(_)),
            ) => {
                tracing::error!(
                    "layer {layer2}: {e}; it stays lazy (served from its spans) until a later daemon completes it"
                );
                return;
            }
            // The source or the data failed (registry gone, spans or blob
            // not what the index says): served while in use, then let go.
            Err(e) => tracing::error!("layer {layer2}: {e}"),
        }
        done2.store(true, Ordering::SeqCst);
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

/// The layers whose FUSE fds the fd store holds (a daemon before this one
/// served them), by layer digest.
fn kept_layers(opts: &ServeOptions) -> Vec<String> {
    let Some(s) = &opts.fd_store else {
        return Vec::new();
    };
    match s.list() {
        Ok(names) => names.iter().filter_map(|n| layer_of_fd_name(n)).collect(),
        Err(e) => {
            tracing::warn!("fd store: {e}");
            Vec::new()
        }
    }
}

/// A kept connection of a layer that is no longer lazy (it completed just
/// before the last daemon died): its chain and source, to serve it until unused.
fn completed_layer(store: &Store, sn: &Snapshotter, layer: &str) -> Option<(String, String)> {
    let chain = sn
        .list()
        .ok()?
        .into_iter()
        .find(|i| i.labels.get(LABEL_LAYER_DIGEST).map(String::as_str) == Some(layer))?
        .name;
    let source = std::fs::read_to_string(layer_dir(store, layer).join("source")).ok()?;
    Some((chain, source))
}

/// Sleeps `d`, waking early when a stop is requested.
fn nap(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Serve every lazy layer of the store until none needs serving, or until
/// `opts.stop` is set (each session then stops after the request it is
/// answering; the connections stay in the fd store for the next daemon).
/// `ready` is called once the lazy layers present at the start are mounted.
pub fn serve_store(
    rt: &tokio::runtime::Handle,
    client: Arc<RegistryClient>,
    store: &Store,
    sn: &Snapshotter,
    opts: &ServeOptions,
    ready: impl FnOnce(),
) -> Result<Ended> {
    let lock_path = daemon_lock_file(store);
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
        return Ok(Ended::Done);
    };
    write_atomic(
        &daemon_pid_file(store),
        std::process::id().to_string().as_bytes(),
    )?;
    let watch = StoreWatch::new(store.root(), &lock_path);
    let mut served: HashMap<String, Served> = HashMap::new();
    let r = serve_loop(rt, &client, store, sn, opts, ready, &watch, &mut served);
    let gone = matches!(r, Ok(Ended::Gone)) || watch.gone();
    // A store that is gone, or a daemon that fails with nobody keeping its
    // connections: its mounts would stay as dead entries. Otherwise a
    // failing daemon leaves them stalled for the next one to resume.
    if gone || (r.is_err() && opts.fd_store.is_none()) {
        for (layer, s) in served.iter() {
            // Aborted first: the unmount alone does not end a connection the
            // fd store holds a copy of.
            if let Some(conn) = s.session.conn() {
                if let Err(e) = Fusectl::open().and_then(|c| c.abort(conn)) {
                    tracing::warn!("layer {layer}: aborting connection {conn}: {e}");
                }
            }
            unmount_with_overlays(&s.mnt, gone);
            if let Some(fds) = &opts.fd_store {
                let _ = fds.del(&fd_name(layer));
            }
        }
        // Shut down and joined aside, after the unmounts: a fetcher or a
        // worker may be waiting on the network (for a store that is gone),
        // and the process exits next, its threads with it.
        let sessions: Vec<Served> = served.drain().map(|(_, s)| s).collect();
        let joined = std::thread::spawn(move || {
            for s in sessions {
                s.fs.shutdown();
                drop(s);
            }
        });
        if !gone {
            let _ = joined.join();
        }
        if gone {
            tracing::warn!(
                "the store at {} is gone: unmounted its lazy layers",
                store.root().display()
            );
            return Ok(Ended::Gone);
        }
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn serve_loop(
    rt: &tokio::runtime::Handle,
    client: &Arc<RegistryClient>,
    store: &Store,
    sn: &Snapshotter,
    opts: &ServeOptions,
    ready: impl FnOnce(),
    watch: &StoreWatch,
    served: &mut HashMap<String, Served>,
) -> Result<Ended> {
    // Layers this daemon served and let go: not served again by it.
    let mut finished = std::collections::HashSet::new();
    let mut ready = Some(ready);
    // One for all the layers served: background work yields to reads in any.
    let activity = Arc::new(Activity::default());
    // Kept connections first: their readers are waiting.
    let mut first = true;
    let mut kept: Vec<String> = Vec::new();
    loop {
        if watch.gone() {
            return Ok(Ended::Gone);
        }
        let mut todo: Vec<(String, String, String, bool)> = lazy_snapshots(sn)?
            .into_iter()
            .map(|(c, l, s)| (c, l, s, true))
            .collect();
        if first {
            kept = kept_layers(opts);
            for layer in kept.clone() {
                if todo.iter().any(|t| t.1 == layer) {
                    continue;
                }
                match completed_layer(store, sn, &layer) {
                    Some((chain, source)) => todo.push((chain, layer, source, false)),
                    None => {
                        tracing::warn!("kept FUSE connection of layer {layer}: no such snapshot");
                    }
                }
            }
            todo.sort_by_key(|t| !kept.contains(&t.1));
            first = false;
        } else {
            kept.clear();
        }
        let todo: Vec<_> = todo
            .into_iter()
            .filter(|t| !served.contains_key(&t.1) && !finished.contains(&t.1))
            .collect();
        // Background completion of the layers served waits while these are
        // being mounted (see `Activity::mounting`).
        let _mounting = (!todo.is_empty()).then(|| activity.mounting());
        // Side by side: a container starting on the image waits for all of
        // them, and each is mostly waiting (its index read from the store, the
        // mount and INIT, the fd store's answer).
        let results: Vec<(String, Result<Served>)> = if opts.stop.load(Ordering::SeqCst) {
            Vec::new()
        } else {
            std::thread::scope(|sc| {
                let handles: Vec<_> = todo
                    .iter()
                    .map(|(chain, layer, source, lazy)| {
                        let activity = &activity;
                        sc.spawn(move || {
                            serve_layer(
                                rt, client, store, sn, chain, layer, source, opts, *lazy, activity,
                            )
                        })
                    })
                    .collect();
                todo.iter()
                    .zip(handles)
                    .map(|(t, h)| {
                        let r = h.join().unwrap_or_else(|_| {
                            Err(Error::Invalid {
                                what: format!("lazy layer {}", t.1),
                                reason: "serving it panicked".into(),
                            })
                        });
                        (t.1.clone(), r)
                    })
                    .collect()
            })
        };
        let mut failed_kept = None;
        for (layer, r) in results {
            match r {
                Ok(s) => {
                    served.insert(layer, s);
                }
                Err(e) if kept.contains(&layer) => {
                    // Its readers wait on this connection: fail, so that the
                    // keeper restarts the daemon (and in the end aborts it).
                    tracing::error!("resuming lazy layer {layer}: {e}");
                    failed_kept.get_or_insert(e);
                }
                Err(e) => {
                    tracing::error!("serving lazy layer {layer}: {e}");
                    finished.insert(layer);
                }
            }
        }
        if let Some(e) = failed_kept {
            return Err(e);
        }
        if let Some(r) = ready.take() {
            r();
        }
        if opts.stop.load(Ordering::SeqCst) {
            for (layer, s) in served.drain() {
                match s.session.stop() {
                    Ok((exit, _fd)) => tracing::info!("layer {layer}: {exit:?}"),
                    Err(e) => tracing::warn!("layer {layer}: stopping: {e}"),
                }
            }
            return Ok(Ended::Stopped);
        }
        let now = Instant::now();
        let mut done = Vec::new();
        // A resident daemon (systemd's) keeps serving a layer whose completion
        // failed: nobody would start another daemon to serve it again, and
        // `mount --lazy` would wait for it in vain (found in the systemd VM).
        let still_lazy: std::collections::HashSet<String> = if opts.resident {
            lazy_snapshots(sn)?.into_iter().map(|(_, l, _)| l).collect()
        } else {
            Default::default()
        };
        for (layer, s) in served.iter_mut() {
            if !s.done.load(Ordering::SeqCst) || still_lazy.contains(layer) {
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
        if served.is_empty() && !waiting && !opts.resident {
            let _ = std::fs::remove_file(daemon_pid_file(store));
            return Ok(Ended::Done);
        }
        nap(Duration::from_millis(200), &opts.stop);
    }
}

/// How many daemon deaths the keeper tolerates: 10 within a minute. Each
/// costs readers a stall of well under a second, while a daemon that cannot
/// serve (it dies on resume, on a request) must not keep them waiting for
/// long: after that, aborting the connections gives them ENOTCONN.
pub const RESTART_POLICY: RestartPolicy = RestartPolicy {
    max_failures: 10,
    window: Duration::from_secs(60),
};

/// The store's keeper and supervisor (`cstore lazy-keeper`, started on
/// demand by `mount --lazy` / `run --lazy`): holds every lazy FUSE
/// connection's fd (a [`cstore_fuse_fs::Keeper`] on [`keeper_socket`]) and
/// runs the daemon `spawn` starts, again at once whenever it dies, so a
/// reader sees a stall, not an error. A daemon that stopped on request
/// ([`EXIT_STOPPED`]) is restarted without counting a failure; after
/// `policy.max_failures` failures within `policy.window`, every kept
/// connection is aborted (readers get ENOTCONN rather than hang behind a
/// daemon that cannot serve) and the keeper exits. It also exits when the
/// daemon ends with nothing left to serve and no fd kept, and once a systemd
/// unit has taken its connections over (its daemon declined, [`EXIT_DECLINED`]:
/// the keeper holds the fds until the unit's daemon has taken them all).
pub fn supervise_store(
    store: &Store,
    mut spawn: impl FnMut(&Path) -> std::io::Result<std::process::Child>,
    policy: RestartPolicy,
) -> Result<()> {
    let lazy = store.root().join("lazy");
    std::fs::create_dir_all(&lazy).map_err(|e| io("create", &lazy, e))?;
    let lock_path = lazy.join("keeper.lock");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&lock_path)
        .map_err(|e| io("create", &lock_path, e))?;
    let Some(_lock) =
        cstore_os::FileLock::try_take(&lock_path).map_err(cstore_snapshotter::Error::from)?
    else {
        return Ok(()); // another keeper supervises the store
    };
    let sock = keeper_socket(store);
    let keeper = Arc::new(cstore_fuse_fs::Keeper::bind(&sock)?);
    let pid_file = lazy.join("keeper.pid");
    write_atomic(&pid_file, std::process::id().to_string().as_bytes())?;
    let stop = Arc::new(AtomicBool::new(false));
    let (k2, s2) = (keeper.clone(), stop.clone());
    let server = std::thread::spawn(move || k2.serve(&s2));
    let client = KeeperClient::new(&sock);
    let watch = StoreWatch::new(store.root(), &lock_path);
    let mut window = FailureWindow::new(policy);
    let result = loop {
        let ended = spawn(&sock).and_then(|mut child| child.wait());
        if watch.gone() {
            // Whatever the daemon did, nobody can serve these mounts again.
            let n = unmount_lazy_mounts(store.root(), true);
            tracing::warn!(
                "the store at {} is gone: {n} lazy mounts unmounted, the keeper exits",
                store.root().display()
            );
            break Ok(());
        }
        let failure = match ended {
            Err(e) => format!("spawn or wait: {e}"),
            Ok(st) if st.success() => match client.list() {
                Ok(kept) if kept.is_empty() => break Ok(()),
                Ok(kept) => format!("exited with {} connections kept", kept.len()),
                Err(e) => format!("exited, and the keeper does not answer: {e}"),
            },
            Ok(st) if st.code() == Some(EXIT_STOPPED) => continue,
            Ok(st) if st.code() == Some(EXIT_DECLINED) => {
                if handed_over(store, &client, &watch) {
                    break Ok(());
                }
                continue; // the marker is gone: serve again
            }
            Ok(st) => st.to_string(),
        };
        tracing::warn!("lazy daemon failed: {failure}; restarting it");
        if window.record(Instant::now()) == Decision::Abort {
            tracing::error!(
                "lazy daemon failed {} times within {:?}: aborting its FUSE connections",
                window.failures(),
                policy.window
            );
            for layer in client
                .list()
                .unwrap_or_default()
                .iter()
                .filter_map(|n| layer_of_fd_name(n))
            {
                let conn = StateDir::new(layer_dir(store, &layer).join("state"))
                    .and_then(|st| st.load())
                    .map(|st| st.settings.and_then(|s| s.conn));
                match conn {
                    Ok(Some(conn)) => {
                        if let Err(e) = Fusectl::open().and_then(|c| c.abort(conn)) {
                            tracing::error!("layer {layer}: aborting connection {conn}: {e}");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!("layer {layer}: its connection: {e}"),
                }
                // No daemon will serve it again: the entry would stay as a
                // dead mount. Overlays over it stay (readers there get
                // ENOTCONN; `cstore umount` removes them).
                let _ = client.del(&fd_name(&layer));
                unmount_with_overlays(&layer_dir(store, &layer).join("mnt"), false);
            }
            break Err(Error::Invalid {
                what: "the lazy daemon".into(),
                reason: format!("failed {} times in a row: {failure}", window.failures()),
            });
        }
    };
    let _ = std::fs::remove_file(&pid_file);
    stop.store(true, Ordering::SeqCst);
    let _ = server.join();
    result
}

/// Waits while the store's systemd unit takes the kept connections over:
/// true once none is left here (or the store is gone), false if the unit's
/// marker went away first (removed by hand: the keeper serves again). No
/// deadline: until the unit's daemon takes them, the fds held here are what
/// keeps the mounts alive, and readers wait rather than fail.
fn handed_over(store: &Store, client: &KeeperClient, watch: &StoreWatch) -> bool {
    let marker = systemd_unit_file(store);
    let mut tick = 0u64;
    loop {
        match client.list() {
            Ok(kept) if kept.is_empty() => {
                tracing::info!(
                    "the store's systemd unit took every lazy connection over: the keeper exits"
                );
                return true;
            }
            // Said at once, then once a minute.
            Ok(kept) if tick.is_multiple_of(600) => tracing::info!(
                "{} lazy connections held for the store's systemd unit ({}) to take over",
                kept.len(),
                marker.display()
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("the keeper's own socket: {e}"),
        }
        if watch.gone() {
            return true;
        }
        if !marker.exists() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
        tick += 1;
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
