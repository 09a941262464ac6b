//! The test daemon of cstore-fuse-fs's tests: a separate process they can SIGKILL.
//!
//!   cstore-fuse-testd keeper SOCK
//!   cstore-fuse-testd list SOCK      (the names a keeper holds, one per line)
//!   cstore-fuse-testd serve --src DIR --mnt DIR --state DIR [--keeper SOCK --name NAME]
//!       [--mode keep|passthrough|direct] [--ttl SECS] [--threads N] [--delay-ms N]
//!       [--stats FILE]
//!
//!   cstore-fuse-testd serve-layer --blob FILE --compression gzip|zstd|none --cache DIR
//!       --tree DIR --mnt DIR --state DIR [--index FILE --windows FILE]
//!       [--keeper SOCK --name NAME] [--span-kib N] [--fetch-delay-ms N] [--threads N]
//!       [--stats FILE] [--complete] [--prefetch-trace]
//!
//! `serve-layer` serves one layer lazily (`LayerFs`) from a local blob: its index and
//! windows from `--index`/`--windows`, or built from the blob (and kept in the cache
//! directory for the next daemon). `--complete` completes the layer in the background
//! once serving; `--prefetch-trace` queues the spans the cache's access trace recorded.
//! The stats file also has the cache's counters (`fetched`, `requests`, `local`,
//! `durable`: of those, marked in the bitmap on disk, `start_local`: spans already
//! local when this daemon started, `complete`).
//!
//! `serve` resumes the connection the keeper holds under NAME if there is one, else
//! mounts; it prints `ready` when serving. SIGTERM stops it cleanly (exit 75, the fd left
//! in the keeper); an unmount ends it (exit 0).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cstore_fuse_fs::layer::{build_index, FileSource, LayerFs, LayerOptions, SpanSource};
use cstore_index::{Compression, Policy};

use cstore_fuse_fs::{
    keeper, DirFs, Exit, FdStore, KeeperClient, Open, PassthroughMode, Session, SessionOptions,
    StateDir, EXIT_STOPPED,
};

static STOP_FD: AtomicI32 = AtomicI32::new(-1);
static KEEPER_STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    KEEPER_STOP.store(true, Ordering::SeqCst);
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        cstore_fuse_fs::session::signal_eventfd(fd);
    }
}

fn on_sigterm() {
    // SAFETY: installs a handler that only does async-signal-safe work.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_term as *const () as usize;
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: cstore-fuse-testd keeper SOCK | serve --src DIR --mnt DIR --state DIR [...]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("keeper") if args.len() == 2 => {
            on_sigterm();
            match keeper::run_keeper(&PathBuf::from(&args[1]), &KEEPER_STOP) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("keeper: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some("list") if args.len() == 2 => match KeeperClient::new(&args[1]).list() {
            Ok(names) => {
                for n in names {
                    println!("{n}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("list: {e}");
                ExitCode::from(1)
            }
        },
        Some("serve-layer") => match serve_layer(&args[1..]) {
            Ok(Exit::Unmounted) => ExitCode::SUCCESS,
            Ok(Exit::Stopped) => ExitCode::from(EXIT_STOPPED as u8),
            Err(e) => {
                eprintln!("serve-layer: {e}");
                ExitCode::from(1)
            }
        },
        Some("serve") => match serve(&args[1..]) {
            Ok(Exit::Unmounted) => ExitCode::SUCCESS,
            Ok(Exit::Stopped) => ExitCode::from(EXIT_STOPPED as u8),
            Err(e) => {
                eprintln!("serve: {e}");
                ExitCode::from(1)
            }
        },
        _ => usage(),
    }
}

fn serve(args: &[String]) -> Result<Exit, Box<dyn std::error::Error>> {
    let (mut src, mut mnt, mut state, mut keeper, mut name) = (None, None, None, None, None);
    let (mut mode, mut ttl, mut threads, mut delay, mut stats) =
        (Open::KeepCache, 86400u64, 2usize, 0u64, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--src" => src = Some(PathBuf::from(v()?)),
            "--mnt" => mnt = Some(PathBuf::from(v()?)),
            "--state" => state = Some(PathBuf::from(v()?)),
            "--keeper" => keeper = Some(PathBuf::from(v()?)),
            "--name" => name = Some(v()?.clone()),
            "--mode" => {
                mode = match v()?.as_str() {
                    "keep" => Open::KeepCache,
                    "passthrough" => Open::Passthrough,
                    "direct" => Open::Direct,
                    m => return Err(format!("--mode {m}").into()),
                }
            }
            "--ttl" => ttl = v()?.parse()?,
            "--threads" => threads = v()?.parse()?,
            "--delay-ms" => delay = v()?.parse()?,
            "--stats" => stats = Some(PathBuf::from(v()?)),
            x => return Err(format!("unknown option {x}").into()),
        }
    }
    let (Some(src), Some(mnt), Some(state)) = (src, mnt, state) else {
        return Err("--src, --mnt and --state are required".into());
    };
    let fs = Arc::new(DirFs::load(&src, mode)?.with_read_delay(Duration::from_millis(delay)));
    let state = StateDir::new(state)?;
    let store: Option<(Arc<dyn FdStore>, String)> = match (keeper, name) {
        (Some(k), Some(n)) => Some((Arc::new(KeeperClient::new(k)), n)),
        (None, None) => None,
        _ => return Err("--keeper and --name go together".into()),
    };
    let ttl = Duration::from_secs(ttl);
    let opts = SessionOptions {
        threads,
        passthrough: if mode == Open::Passthrough {
            PassthroughMode::Required
        } else {
            PassthroughMode::Off
        },
        entry_ttl: ttl,
        attr_ttl: ttl,
        negative_ttl: ttl,
        fd_store: store.clone(),
        ..SessionOptions::default()
    };
    on_sigterm();
    let kept = match &store {
        Some((s, n)) => s.get(n)?,
        None => None,
    };
    let session = match kept {
        Some(fd) => Session::resume(fs, fd, &state, opts)?,
        None => Session::start(fs, &mnt, &state, opts)?,
    };
    STOP_FD.store(session.stopper().raw_fd(), Ordering::SeqCst);
    if KEEPER_STOP.load(Ordering::SeqCst) {
        session.stopper().stop();
    }
    if let Some(p) = stats {
        let st = session.stats();
        // `p` is in the test's private temporary directory. Rewritten every 50 ms and
        // read only by the test: replaced atomically, not fsynced (so not
        // cstore_os::write_atomic).
        std::thread::spawn(move || loop {
            let tmp = p.with_extension("tmp");
            if std::fs::write(&tmp, st.render()).is_ok() {
                let _ = std::fs::rename(&tmp, &p);
            }
            std::thread::sleep(Duration::from_millis(50));
        });
    }
    println!("ready");
    Ok(session.wait()?)
}

/// A source that waits before each request (so a test can kill a daemon with
/// fetches in flight).
struct Delayed {
    inner: FileSource,
    delay: Duration,
}

impl SpanSource for Delayed {
    fn fetch(&self, range: std::ops::Range<u64>) -> std::io::Result<Vec<u8>> {
        std::thread::sleep(self.delay);
        self.inner.fetch(range)
    }
    fn fetch_windows(&self, range: std::ops::Range<u64>) -> std::io::Result<Vec<u8>> {
        self.inner.fetch_windows(range)
    }
}

fn serve_layer(args: &[String]) -> Result<Exit, Box<dyn std::error::Error>> {
    let mut p: std::collections::HashMap<&str, String> = Default::default();
    let (mut complete, mut prefetch) = (false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--complete" => complete = true,
            "--prefetch-trace" => prefetch = true,
            "--blob" | "--compression" | "--cache" | "--tree" | "--mnt" | "--state" | "--index"
            | "--windows" | "--keeper" | "--name" | "--span-kib" | "--fetch-delay-ms"
            | "--threads" | "--stats" => {
                let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
                p.insert(&a[2..], v.clone());
            }
            x => return Err(format!("unknown option {x}").into()),
        }
    }
    let need = |k: &str| {
        p.get(k)
            .map(PathBuf::from)
            .ok_or_else(|| format!("--{k} is required"))
    };
    let (blob, cache, tree, mnt, state) = (
        need("blob")?,
        need("cache")?,
        need("tree")?,
        need("mnt")?,
        need("state")?,
    );
    let compression = match p.get("compression").map(String::as_str) {
        Some("gzip") => Compression::Gzip,
        Some("zstd") => Compression::Zstd,
        Some("none") => Compression::None,
        other => return Err(format!("--compression {other:?}").into()),
    };
    let opts = LayerOptions::default();
    std::fs::create_dir_all(&cache)?;
    let (index_p, windows_p) = match (p.get("index"), p.get("windows")) {
        (Some(i), Some(w)) => (PathBuf::from(i), PathBuf::from(w)),
        (None, None) => {
            let (i, w) = (cache.join("index"), cache.join("windows"));
            if !i.exists() {
                let span_kib: u32 = p.get("span-kib").map_or(Ok(128), |v| v.parse())?;
                let policy = Policy {
                    span_target: span_kib << 10,
                    ..Policy::default()
                };
                let (index, windows) = build_index(&blob, compression, policy, opts.tree)?;
                std::fs::write(&w, windows)?;
                std::fs::write(&i, index)?;
            }
            (i, w)
        }
        _ => return Err("--index and --windows go together".into()),
    };
    let delay = Duration::from_millis(p.get("fetch-delay-ms").map_or(Ok(0), |v| v.parse())?);
    let source: Arc<dyn SpanSource> = Arc::new(Delayed {
        inner: FileSource::open(&blob, Some(&windows_p))?,
        delay,
    });
    let fs = Arc::new(LayerFs::open(
        std::fs::read(&index_p)?,
        source,
        &cache,
        &tree,
        opts,
    )?);
    let start_local = fs.stats().local;
    let state = StateDir::new(state)?;
    let store: Option<(Arc<dyn FdStore>, String)> = match (p.get("keeper"), p.get("name")) {
        (Some(k), Some(n)) => Some((Arc::new(KeeperClient::new(k)), n.clone())),
        (None, None) => None,
        _ => return Err("--keeper and --name go together".into()),
    };
    let sopts = SessionOptions {
        threads: p.get("threads").map_or(Ok(4), |v| v.parse())?,
        passthrough: PassthroughMode::IfAvailable,
        fd_store: store.clone(),
        ..SessionOptions::default()
    };
    on_sigterm();
    let kept = match &store {
        Some((s, n)) => s.get(n)?,
        None => None,
    };
    let session = match kept {
        Some(fd) => Session::resume(fs.clone(), fd, &state, sopts)?,
        None => Session::start(fs.clone(), &mnt, &state, sopts)?,
    };
    STOP_FD.store(session.stopper().raw_fd(), Ordering::SeqCst);
    if KEEPER_STOP.load(Ordering::SeqCst) {
        session.stopper().stop();
    }
    if prefetch {
        fs.prefetch(&cstore_fuse_fs::layer::read_trace(&cache)?);
    }
    if complete {
        let fs = fs.clone();
        std::thread::spawn(move || {
            if let Err(e) = fs.complete() {
                eprintln!("completion: {e}");
            }
        });
    }
    if let Some(path) = p.get("stats").map(PathBuf::from) {
        let st = session.stats();
        let fs = fs.clone();
        std::thread::spawn(move || loop {
            let c = fs.stats();
            let text = format!(
                "{}fetched {}\nrequests {}\nlocal {}\ndurable {}\nstart_local {start_local}\ncomplete {}\n",
                st.render(),
                c.spans_fetched,
                c.requests,
                c.local,
                c.durable,
                fs.is_complete() as u8
            );
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
            std::thread::sleep(Duration::from_millis(50));
        });
    }
    println!("ready");
    Ok(session.wait()?)
}
