//! `cstore index ...`: the layer indexes behind lazy pull (docs/lazy.md).

use std::sync::Arc;

use anyhow::{Context, Result};
use cstore_fuse_fs::FdStore;
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
    span_kib: Option<u32>,
    json: bool,
) -> Result<()> {
    let rt = runtime()?;
    let img = artifact::resolve(rt.handle(), &client, r, platform)?;
    let mut policy = cstore_index::Policy::default();
    if let Some(k) = span_kib {
        anyhow::ensure!(
            (16..=8192).contains(&k),
            "--span-kib {k}: spans of 16 to 8192 KiB"
        );
        policy.span_target = k << 10;
    }
    let out = artifact::build(rt.handle(), &client, store, &img, policy, &|o| {
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
            "pushed the indexes of {} layers of {r}{} as {} (subject {}, found through {})",
            p.layers,
            if p.traces > 0 {
                format!(" and {} access traces", p.traces)
            } else {
                String::new()
            },
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
            let bytes = f.and_then(|f| f.fetch(rt.handle(), &client, &img, l).ok().map(|(b, _)| b));
            let parsed = bytes
                .as_deref()
                .and_then(|b| cstore_index::Index::parse(b).ok());
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

/// `cstore pull --lazy REF`.
pub fn pull(store: &Store, r: &Reference, args: &crate::RegistryArgs, json: bool) -> Result<()> {
    let rt = runtime()?;
    let client = args.client()?;
    let img = artifact::resolve(rt.handle(), &client, r, &args.platform()?)?;
    let sn = crate::snap::open(store)?;
    sn.cleanup()?;
    let events = cstore_lazy::pull::pull_lazy(rt.handle(), &client, store, &sn, &img, &|e| {
        if json {
            println!("{}", serde_json::to_string(e).unwrap_or_default());
            return;
        }
        use cstore_lazy::pull::Event;
        match e {
            Event::Present { layer } => println!("{}: already a snapshot", short(layer)),
            Event::Lazy { layer, origin } => {
                println!("{}: lazy, index from {origin}", short(layer))
            }
            Event::Whole { layer, reason } => {
                println!("{}: pulled whole: {reason}", short(layer))
            }
        }
    })?;
    let lazy = events
        .iter()
        .filter(|e| matches!(e, cstore_lazy::pull::Event::Lazy { .. }))
        .count();
    if !json {
        println!(
            "pulled {r} lazily ({}): {lazy} of {} layers lazy",
            img.manifest_digest,
            events.len()
        );
    }
    Ok(())
}

/// Is the store's keeper answering?
fn keeper_alive(store: &Store) -> bool {
    cstore_fuse_fs::KeeperClient::new(cstore_lazy::serve::keeper_socket(store))
        .list()
        .is_ok()
}

/// Starts the store's keeper and supervisor (`cstore lazy-keeper`, which
/// runs `cstore lazy-serve`), detached, its log in ROOT/lazy/daemon.log.
/// A store whose lazy daemon is a systemd service gets none: systemd
/// restarts that daemon and keeps its fds.
fn start_keeper(root: &std::path::Path, args: &crate::RegistryArgs) -> Result<()> {
    use std::os::unix::process::CommandExt;
    if let Some(unit) = systemd_unit(root) {
        tracing::debug!("the store's lazy daemon is systemd's {unit}: no keeper started");
        return Ok(());
    }
    let logdir = root.join("lazy");
    std::fs::create_dir_all(&logdir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logdir.join("daemon.log"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--root").arg(root).arg("lazy-keeper");
    registry_args(&mut cmd, args);
    not_systemds(&mut cmd);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the keeper outlives this command
    // and must not share its process group (a ^C here must not end it).
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the lazy keeper")?;
    // It runs until the store's lazy layers are done; whoever started it may live
    // longer (the snapshotter): reaped by a thread, no zombie left.
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// A keeper or daemon started from a systemd service (the snapshotter's)
/// is not that service's main process: its FDSTORE messages would be
/// refused (`NotifyAccess=`), and fds passed to the service are not its.
fn not_systemds(cmd: &mut std::process::Command) {
    for k in [
        "NOTIFY_SOCKET",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
    ] {
        cmd.env_remove(k);
    }
}

/// A unit started while a keeper serves the store (mounts made before the
/// unit was installed or enabled) takes the keeper's connections over, so
/// the mounts stay up and systemd keeps them from now on: the marker is
/// written (the caller did), so the keeper's next daemon declines and the
/// keeper runs no other; its daemon is stopped (SIGTERM: it answers the
/// requests it holds and leaves its connections with the keeper); then every
/// fd the keeper holds moves to systemd's fd store, to be resumed below like
/// the ones systemd passed at start, and the keeper, left with none, exits.
fn take_over_from_keeper(store: &Store, sd: &cstore_fuse_fs::SystemdFdStore) -> Result<()> {
    let sock = cstore_lazy::serve::keeper_socket(store);
    let keeper = cstore_fuse_fs::KeeperClient::new(&sock);
    if keeper.list().is_err() {
        return Ok(()); // no keeper
    }
    stop_keepers_daemon(store)?;
    let names = keeper.list().with_context(|| {
        format!(
            "asking the store's keeper ({}) what it holds",
            sock.display()
        )
    })?;
    for name in &names {
        let Some(fd) = keeper.get(name)? else {
            continue; // its connection ended meanwhile
        };
        sd.adopt(name, fd)?;
        keeper.del(name)?;
    }
    tracing::info!(
        "took over {} lazy connections from the store's keeper ({})",
        names.len(),
        sock.display()
    );
    Ok(())
}

/// Stops the daemon a keeper runs for the store, if one does, and waits
/// until it has let go of the store (its lock).
fn stop_keepers_daemon(store: &Store) -> Result<()> {
    let lock = cstore_lazy::serve::daemon_lock_file(store);
    let pid = std::fs::read_to_string(cstore_lazy::serve::daemon_pid_file(store))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .filter(|&p| p > 0 && p != std::process::id() as i32);
    // Only a `lazy-serve` of ours: the pid file may be stale and the pid reused.
    let ours = pid.filter(|p| {
        std::fs::read(format!("/proc/{p}/cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"lazy-serve"))
    });
    if let Some(p) = ours {
        // SAFETY: kill(2) with a pid and a signal number.
        unsafe { libc::kill(p, libc::SIGTERM) };
    }
    for _ in 0..300 {
        if !lock.exists() {
            return Ok(());
        }
        match cstore_os::FileLock::try_take(&lock) {
            Ok(Some(_)) | Err(_) => return Ok(()),
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
    anyhow::bail!(
        "the keeper's lazy daemon (pid {}) still holds {} after 30 s",
        pid.map_or("?".to_string(), |p| p.to_string()),
        lock.display()
    )
}

/// The systemd unit that runs the store's lazy daemon, if one does
/// (`cstore_lazy::serve::systemd_unit_file`).
fn systemd_unit(root: &std::path::Path) -> Option<String> {
    let s = std::fs::read_to_string(root.join("lazy/systemd-unit")).ok()?;
    Some(s.trim().to_string()).filter(|u| !u.is_empty())
}

/// The registry settings the keeper hands to each daemon it runs.
fn registry_args(cmd: &mut std::process::Command, args: &crate::RegistryArgs) {
    if args.plain_http {
        cmd.arg("--plain-http");
    }
    if let Some(h) = &args.hosts_dir {
        cmd.arg("--hosts-dir").arg(h);
    }
    if let Some(p) = &args.platform {
        cmd.arg("--platform").arg(p);
    }
    if let Some(c) = &args.creds {
        cmd.env("CSTORE_CREDS", c);
    }
}

/// Make sure `reference` is pulled (lazily if needed) and that the store's
/// lazy daemon serves its lazy layers: its keeper (which starts and
/// restarts the daemon) started detached if none runs, waited for otherwise.
pub fn ensure_served(
    store: &Store,
    root: &std::path::Path,
    reference: &str,
    args: &crate::RegistryArgs,
) -> Result<()> {
    let r: Reference = reference.parse()?;
    let sn = crate::snap::open(store)?;
    let needs_pull = match store.image(&r.to_string()) {
        Ok(img) => cstore_snapshotter::image::layers_of(store, &img)?
            .iter()
            .any(|l| sn.stat(&l.chain_id).is_err()),
        Err(_) => true,
    };
    if needs_pull {
        pull(store, &r, args, false)?;
    }
    let logdir = root.join("lazy");
    let since = std::time::Instant::now();
    let mut started: Option<std::time::Instant> = None;
    let mut said = false;
    // Polled often (the container waits on it) in the mount table only; the
    // lazy layers are read from the snapshot table again now and then (one
    // completing meanwhile is not lazy any more). Polling that table every
    // round held the store's database open (it lingers 20 ms after each use)
    // and so held up the daemon's start, which needs it.
    let mut mnts = cstore_lazy::serve::lazy_mount_points(store, &sn)?;
    let mut listed = std::time::Instant::now();
    // A running daemon picks new layers up within a moment; a keeper that
    // was just leaving (its layers done) is started again.
    loop {
        if cstore_lazy::serve::all_mounted(&mnts) {
            break;
        }
        if listed.elapsed() > std::time::Duration::from_millis(500) {
            mnts = cstore_lazy::serve::lazy_mount_points(store, &sn)?;
            listed = std::time::Instant::now();
            continue;
        }
        // 20 s for a daemon to appear; while a keeper (or systemd's unit)
        // runs one, up to 2 minutes: on a slow store (a disk seeking for
        // each of the daemon's syncs, a loaded machine) it is on its way.
        let keeper = keeper_alive(store);
        let alive = keeper || systemd_unit(root).is_some();
        let patience = std::time::Duration::from_secs(if alive { 120 } else { 20 });
        if !said && since.elapsed() > std::time::Duration::from_secs(5) {
            eprintln!("waiting for the lazy daemon to serve the lazy layers of {r}");
            said = true;
        }
        if since.elapsed() > patience {
            if let Some(unit) = systemd_unit(root) {
                anyhow::bail!(
                    "the lazy daemon does not serve the lazy layers of {r}: it is systemd's {unit} \
                     (systemctl status {unit}; journalctl -u {unit})"
                );
            }
            let text = std::fs::read_to_string(logdir.join("daemon.log")).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            anyhow::bail!(
                "the lazy daemon does not serve the lazy layers of {r}: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if !keeper && started.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(2)) {
            start_keeper(root, args)?;
            started = Some(std::time::Instant::now());
        }
        // A container waits on this: a round is one read of the mount table.
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

fn daemon_log_tail(root: &std::path::Path) -> String {
    if let Some(unit) = systemd_unit(root) {
        return format!("it is systemd's {unit} (journalctl -u {unit})");
    }
    let text = std::fs::read_to_string(root.join("lazy/daemon.log")).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Lazy layers for `cstore snapshotter serve` (docs/containerd.md): mounts
/// over lazy layers use their FUSE mounts, with the store's daemon started
/// when needed; with `--lazy`, containerd's Prepare of a layer whose image
/// it names makes it lazy when an index is found.
pub struct SnapshotterLazy {
    store: Store,
    root: std::path::PathBuf,
    args: crate::RegistryArgs,
    resolver: Option<cstore_lazy::remote::Resolver>,
    /// The resolver's runtime (its own: the gRPC runtime's threads must not
    /// block on it).
    _rt: Option<tokio::runtime::Runtime>,
    /// One daemon start at a time.
    starting: std::sync::Mutex<()>,
}

impl SnapshotterLazy {
    pub fn new(
        store: &Store,
        root: &std::path::Path,
        args: crate::RegistryArgs,
        lazy: bool,
    ) -> Result<SnapshotterLazy> {
        let (resolver, rt) = if lazy {
            let rt = runtime()?;
            let r = cstore_lazy::remote::Resolver::new(
                rt.handle().clone(),
                Arc::new(args.client()?),
                store.clone(),
                args.platform()?,
            );
            (Some(r), Some(rt))
        } else {
            (None, None)
        };
        Ok(SnapshotterLazy {
            store: store.clone(),
            root: root.to_path_buf(),
            args,
            resolver,
            _rt: rt,
            starting: std::sync::Mutex::new(()),
        })
    }

    /// The store's keeper (and so its daemon) running: one start at a time.
    fn ensure_keeper(&self) -> Result<()> {
        let _one = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        if !keeper_alive(&self.store) {
            start_keeper(&self.root, &self.args)?;
        }
        Ok(())
    }

    /// Start the keeper (and so the daemon) unless `dirs` are all served; wait until
    /// they are.
    fn serve(&self, dirs: &[cstore_lazy::remote::LazyDir]) -> Result<()> {
        if dirs.iter().all(|d| d.served()) {
            return Ok(());
        }
        let _one = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        if dirs.iter().all(|d| d.served()) {
            return Ok(());
        }
        if !keeper_alive(&self.store) {
            start_keeper(&self.root, &self.args)?;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !dirs.iter().all(|d| d.served()) {
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "the lazy daemon does not serve the layers: {}",
                    daemon_log_tail(&self.root)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(())
    }
}

impl cstore_snapshotter::service::Remote for SnapshotterLazy {
    fn prepare_lazy(
        &self,
        sn: &cstore_snapshotter::Snapshotter,
        chain: &str,
        parent: Option<&str>,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        let Some(resolver) = &self.resolver else {
            return false;
        };
        use cstore_lazy::remote::Resolution;
        match resolver.prepare(sn, chain, parent, labels) {
            Ok(Resolution::Lazy {
                layer,
                image,
                origin,
            }) => {
                tracing::info!(%layer, %image, %chain, "layer served lazily, index from {origin}");
                // Start serving (and completing) at once, not at the first mount.
                if let Err(e) = self.ensure_keeper() {
                    tracing::warn!(%layer, "starting the lazy daemon: {e:#}");
                }
                true
            }
            Ok(Resolution::Whole { layer, reason }) => {
                tracing::info!(%layer, %chain, "layer not lazy, containerd fetches and unpacks it: {reason}");
                false
            }
            Err(e) => {
                tracing::warn!(%chain, "layer not lazy, containerd fetches and unpacks it: {e}");
                false
            }
        }
    }

    fn lazy_mounts(
        &self,
        sn: &cstore_snapshotter::Snapshotter,
        mounts: &mut [cstore_snapshotter::Mount],
    ) -> std::result::Result<(), cstore_snapshotter::Error> {
        let refuse = |what: String| cstore_snapshotter::Error::FailedPrecondition(what);
        let dirs = cstore_lazy::remote::lazy_dirs_in(&self.store, sn, mounts)
            .map_err(|e| refuse(format!("finding the lazy layers of a mount: {e}")))?;
        if dirs.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.serve(&dirs) {
            let layers: Vec<&str> = dirs.iter().map(|d| d.layer.as_str()).collect();
            return Err(refuse(format!(
                "lazy layers {layers:?} are not complete and cannot be served: {e:#}"
            )));
        }
        for d in &dirs {
            d.substitute(mounts);
        }
        Ok(())
    }
}

/// The daemon itself (`cstore lazy-serve`). SIGTERM stops it leaving its
/// connections to the next daemon: exit status 75 (`EXIT_STOPPED`).
/// `cstore lazy-keeper`: holds the store's lazy FUSE fds and runs (and
/// restarts) `cstore lazy-serve` (docs/lazy.md, "Restarts").
pub fn keeper(store: &Store, root: &std::path::Path, args: &crate::RegistryArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    cstore_lazy::serve::supervise_store(
        store,
        |sock| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("--root").arg(root).arg("lazy-serve");
            registry_args(&mut cmd, args);
            not_systemds(&mut cmd);
            cmd.env(KEEPER_ENV, sock)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
        },
        cstore_lazy::serve::RESTART_POLICY,
    )
    .context("supervising the store's lazy daemon")?;
    Ok(())
}

/// Set by the keeper for the daemon it runs: its socket.
const KEEPER_ENV: &str = "CSTORE_LAZY_KEEPER";

/// Where the daemon keeps its FUSE fds: its keeper's when a keeper runs it
/// (CSTORE_LAZY_KEEPER), systemd's fd store when it is a service's main
/// process (NOTIFY_SOCKET, the keeper's children have it removed), else the
/// store's keeper if one answers, else nowhere (a daemon started by hand: its
/// mounts end with it).
enum FdStoreOf {
    Keeper(Arc<cstore_fuse_fs::KeeperClient>),
    Systemd(Arc<cstore_fuse_fs::SystemdFdStore>),
    Nowhere,
}

fn fd_store(store: &Store) -> Result<FdStoreOf> {
    let sock = match std::env::var_os(KEEPER_ENV) {
        Some(s) => Some(std::path::PathBuf::from(s)),
        None => {
            if let Some(s) = cstore_fuse_fs::SystemdFdStore::from_env()? {
                return Ok(FdStoreOf::Systemd(Arc::new(s)));
            }
            None
        }
    };
    let k = cstore_fuse_fs::KeeperClient::new(
        sock.unwrap_or_else(|| cstore_lazy::serve::keeper_socket(store)),
    );
    if k.list().is_ok() {
        return Ok(FdStoreOf::Keeper(Arc::new(k)));
    }
    tracing::warn!("no fd keeper: the lazy mounts will not survive this daemon");
    Ok(FdStoreOf::Nowhere)
}

/// The systemd unit this process runs in, from its cgroup (`0::/system.slice/x.service`).
fn own_unit() -> Option<String> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cg.lines()
        .filter_map(|l| l.rsplit(':').next())
        .flat_map(|p| p.rsplit('/'))
        .find(|c| c.ends_with(".service"))
        .map(str::to_string)
}

pub fn serve(store: &Store, args: &crate::RegistryArgs) -> Result<()> {
    let marker = cstore_lazy::serve::systemd_unit_file(store);
    let fds = fd_store(store)?;
    let systemd = match &fds {
        FdStoreOf::Systemd(s) => Some(s.clone()),
        _ => None,
    };
    if let Some(sd) = &systemd {
        // From now on only systemd restarts this store's daemon.
        let unit = own_unit().unwrap_or_else(|| "unknown.service".into());
        if let Some(d) = marker.parent() {
            std::fs::create_dir_all(d)?;
        }
        cstore_os::write_atomic(&marker, format!("{unit}\n").as_bytes())
            .with_context(|| format!("writing {}", marker.display()))?;
        tracing::info!(
            "systemd's {unit}: FUSE fds in its fd store, {} passed back",
            sd.list().map(|l| l.len()).unwrap_or(0)
        );
        take_over_from_keeper(store, sd)?;
    } else if let Some(unit) = systemd_unit(store.root()) {
        // A keeper's daemon, or one started by hand: the fds of the store's
        // connections are in systemd's store, out of its reach (a keeper's
        // are being taken over by the unit: the keeper waits for that).
        tracing::warn!(
            "the store's lazy daemon is systemd's {unit} ({} says so): not serving",
            marker.display()
        );
        std::process::exit(cstore_fuse_fs::EXIT_DECLINED);
    }
    let rt = runtime()?;
    let client = Arc::new(args.client()?);
    let sn = crate::snap::open(store)?;
    let opts = cstore_lazy::serve::ServeOptions {
        fd_store: match fds {
            FdStoreOf::Keeper(k) => Some(k as Arc<dyn cstore_fuse_fs::FdStore>),
            FdStoreOf::Systemd(s) => Some(s as Arc<dyn cstore_fuse_fs::FdStore>),
            FdStoreOf::Nowhere => None,
        },
        resident: systemd.is_some(),
        ..Default::default()
    };
    {
        let _in = rt.enter();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = opts.stop.clone();
        rt.spawn(async move {
            term.recv().await;
            tracing::info!("SIGTERM: stopping, the FUSE connections left to the next daemon");
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    let ended = cstore_lazy::serve::serve_store(rt.handle(), client, store, &sn, &opts, || {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
        if let Some(sd) = &systemd {
            if let Err(e) = sd.notify_ready("serving the store's lazy layers") {
                tracing::warn!("{e}");
            }
        }
        // The command that started us is gone from here on.
        if let Ok(null) = std::fs::File::open("/dev/null") {
            use std::os::fd::AsRawFd;
            // SAFETY: replacing fd 1 with /dev/null.
            unsafe { libc::dup2(null.as_raw_fd(), 1) };
        }
    })
    .context("serving the store's lazy layers")?;
    match ended {
        cstore_lazy::serve::Ended::Stopped => std::process::exit(cstore_fuse_fs::EXIT_STOPPED),
        // Its mounts are gone; fetches in flight for the deleted store must
        // not hold the exit up (dropping the runtime would wait for them).
        cstore_lazy::serve::Ended::Gone => std::process::exit(0),
        cstore_lazy::serve::Ended::Done => {}
    }
    Ok(())
}

/// How much of an image is local, layer by layer: a lazy layer by the spans
/// its cache holds, any other by whether the store has it (unpacked or as a
/// blob; `index build` records an image whose layers are nowhere local).
pub struct ImageLocal {
    /// Compressed bytes of the image's layers that are local.
    pub bytes: u64,
    /// Compressed bytes of all its layers.
    pub total_bytes: u64,
    pub lazy_layers: usize,
}

pub fn image_local(
    store: &Store,
    sn: &cstore_snapshotter::Snapshotter,
    img: &cstore_store::meta::ImageRecord,
) -> Result<ImageLocal> {
    use cstore_snapshotter::image::{layers_of, LABEL_LAZY};
    let mut out = ImageLocal {
        bytes: 0,
        total_bytes: 0,
        lazy_layers: 0,
    };
    for l in layers_of(store, img)? {
        let size = l.descriptor.size;
        out.total_bytes += size;
        let lazy = sn
            .stat(&l.chain_id)
            .ok()
            .map(|i| i.labels.contains_key(LABEL_LAZY));
        out.bytes += match lazy {
            Some(true) => {
                out.lazy_layers += 1;
                cstore_lazy::serve::local_of(store, &l.descriptor.digest)?
                    .map_or(0, |loc| loc.bytes)
            }
            Some(false) => size,
            None if store
                .blob_path(&parse_digest(&l.descriptor.digest)?)
                .exists() =>
            {
                size
            }
            None => 0,
        };
    }
    Ok(out)
}

/// "37%" of `total` (100% of nothing).
pub fn percent(part: u64, total: u64) -> String {
    if total == 0 {
        return "100%".into();
    }
    // Floor: 100% only once everything is local.
    format!("{}%", part.saturating_mul(100) / total)
}
