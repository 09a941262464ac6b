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
fn start_keeper(root: &std::path::Path, args: &crate::RegistryArgs) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let logdir = root.join("lazy");
    std::fs::create_dir_all(&logdir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logdir.join("daemon.log"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--root").arg(root).arg("lazy-keeper");
    if args.plain_http {
        cmd.arg("--plain-http");
    }
    if let Some(c) = &args.creds {
        cmd.env("CSTORE_CREDS", c);
    }
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
    // Not waited for: it runs until the store's lazy layers are done.
    let _child = cmd.spawn().context("starting the lazy keeper")?;
    Ok(())
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
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut started: Option<std::time::Instant> = None;
    // A running daemon picks new layers up within a moment; a keeper that
    // was just leaving (its layers done) is started again.
    while !cstore_lazy::serve::all_served(store, &sn)? {
        if std::time::Instant::now() > deadline {
            let text = std::fs::read_to_string(logdir.join("daemon.log")).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            anyhow::bail!(
                "the lazy daemon does not serve the lazy layers of {r}: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if !keeper_alive(store)
            && started.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(2))
        {
            start_keeper(root, args)?;
            started = Some(std::time::Instant::now());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// `cstore lazy-keeper`: holds the store's lazy FUSE fds and runs (and
/// restarts) `cstore lazy-serve` (docs/lazy.md, "Restarts").
pub fn keeper(store: &Store, root: &std::path::Path, args: &crate::RegistryArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    let plain = args.plain_http;
    cstore_lazy::serve::supervise_store(
        store,
        |sock| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("--root").arg(root).arg("lazy-serve");
            if plain {
                cmd.arg("--plain-http");
            }
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

/// Where the daemon keeps its FUSE fds: systemd's fd store under systemd
/// (NOTIFY_SOCKET), else the store's keeper if one answers, else nowhere (a
/// daemon started by hand: its mounts end with it).
fn fd_store(store: &Store) -> Result<Option<Arc<dyn cstore_fuse_fs::FdStore>>> {
    if let Some(s) = cstore_fuse_fs::SystemdFdStore::from_env()? {
        return Ok(Some(Arc::new(s)));
    }
    let sock = std::env::var_os(KEEPER_ENV)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| cstore_lazy::serve::keeper_socket(store));
    let k = cstore_fuse_fs::KeeperClient::new(sock);
    if k.list().is_ok() {
        return Ok(Some(Arc::new(k)));
    }
    tracing::warn!("no fd keeper: the lazy mounts will not survive this daemon");
    Ok(None)
}

/// The daemon itself (`cstore lazy-serve`). SIGTERM stops it leaving its
/// connections to the next daemon: exit status 75 (`EXIT_STOPPED`).
pub fn serve(store: &Store, args: &crate::RegistryArgs) -> Result<()> {
    let rt = runtime()?;
    let client = Arc::new(args.client()?);
    let sn = crate::snap::open(store)?;
    let opts = cstore_lazy::serve::ServeOptions {
        fd_store: fd_store(store)?,
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
