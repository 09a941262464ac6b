//! The test daemon of cstore-fuse-fs's tests: a separate process they can SIGKILL.
//!
//!   cstore-fuse-testd keeper SOCK
//!   cstore-fuse-testd list SOCK      (the names a keeper holds, one per line)
//!   cstore-fuse-testd serve --src DIR --mnt DIR --state DIR [--keeper SOCK --name NAME]
//!       [--mode keep|passthrough|direct] [--ttl SECS] [--threads N] [--delay-ms N]
//!       [--stats FILE]
//!
//! `serve` resumes the connection the keeper holds under NAME if there is one, else
//! mounts; it prints `ready` when serving. SIGTERM stops it cleanly (exit 75, the fd left
//! in the keeper); an unmount ends it (exit 0).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
