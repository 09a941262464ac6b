//! A FUSE session: mount + INIT ([`Session::start`]) or taking over a live connection
//! without INIT ([`Session::resume`]), worker threads serving one /dev/fuse fd, and a
//! clean end on unmount or on a stop request.
//!
//! Why all workers share one fd: a `FUSE_DEV_IOC_CLONE` fd is a device of its own, and
//! closing it (the daemon dying) fails the requests in flight on it with ECONNABORTED
//! unless every clone is also kept; one fd kept by the keeper turns a crash into a stall.
//! Except on kernels without `FUSE_NOTIFY_RESEND` (before 6.9) when an fd store keeps
//! the connection: there the requests a dead daemon read on the kept fd would never be
//! answered (their readers wait, unkillable, for ever), so the workers read a clone
//! instead, and a crash costs each such request an ECONNABORTED error: bounded damage.

use cstore_os::IoError;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::abi::{self, init, op, Attr, InitOut, Op, Ttl, Writer};
use crate::dev::{self, ConnId, FuseDev, MountOptions, ReadResult};
use crate::error::{Error, Result};
use crate::fs::{DirSink, Errno, Open, ReadOnlyFs};
use crate::keeper::FdStore;
use crate::state::{BackingLog, Negotiated, Settings, StateDir, STATE_VERSION};

/// Passthrough policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassthroughMode {
    /// Never ask for it: every open is served by the daemon.
    Off,
    /// Ask for it; without it, `Open::Passthrough` files are served from the page cache.
    IfAvailable,
    /// Ask for it and fail the start if the kernel does not grant it.
    Required,
}

/// How a session serves.
#[derive(Clone)]
pub struct SessionOptions {
    /// Worker threads, all reading the one /dev/fuse fd.
    pub threads: usize,
    pub passthrough: PassthroughMode,
    /// How long the kernel may cache a name → node mapping. Layers are immutable, so
    /// long: fewer requests, and fewer of them stall while a daemon restarts.
    pub entry_ttl: Duration,
    /// How long the kernel may cache attributes (`fstat` of an open file needs no
    /// daemon within it).
    pub attr_ttl: Duration,
    /// How long a failed lookup is cached (0: not at all).
    pub negative_ttl: Duration,
    /// Largest request in pages (the kernel caps it at `fs.fuse.max_pages_limit`).
    pub max_pages: u16,
    /// Sets the connection's bdi readahead after mount (sizes the kernel's READs).
    pub read_ahead_kb: Option<u32>,
    pub mount: MountOptions,
    /// After INIT, open, statx and close one regular file, so FLUSH and STATX are
    /// answered ENOSYS once: the kernel then never sends them again on this connection.
    /// Without it the first `close()` (FLUSH) and the first statx asking for more than
    /// the basic stats (STATX; std's `metadata()` does, for btime) would wait for a
    /// daemon even on a file open in passthrough, with attributes cached.
    pub warmup: bool,
    /// Where the /dev/fuse fd is kept between daemons, and under which name. A fresh
    /// mount is put there before INIT; an unmount removes it.
    pub fd_store: Option<(Arc<dyn FdStore>, String)>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            threads: 2,
            passthrough: PassthroughMode::IfAvailable,
            entry_ttl: Duration::from_secs(86400),
            attr_ttl: Duration::from_secs(86400),
            negative_ttl: Duration::from_secs(86400),
            max_pages: 256,
            read_ahead_kb: None,
            mount: MountOptions::default(),
            warmup: true,
            fd_store: None,
        }
    }
}

impl std::fmt::Debug for SessionOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionOptions")
            .field("threads", &self.threads)
            .field("passthrough", &self.passthrough)
            .field("entry_ttl", &self.entry_ttl)
            .field("attr_ttl", &self.attr_ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("max_pages", &self.max_pages)
            .field("read_ahead_kb", &self.read_ahead_kb)
            .field("mount", &self.mount)
            .field("warmup", &self.warmup)
            .field("fd_store", &self.fd_store.as_ref().map(|(_, n)| n))
            .finish()
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The filesystem was unmounted (or the connection aborted): the connection is gone.
    Unmounted,
    /// A stop was requested: in-flight replies were written, the fd is left to the fd
    /// store (or the caller) for the next daemon.
    Stopped,
}

/// Request counters, per opcode.
#[derive(Debug)]
pub struct Stats {
    ops: [AtomicU64; 64],
    resent: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            ops: std::array::from_fn(|_| AtomicU64::new(0)),
            resent: AtomicU64::new(0),
        }
    }
}

impl Stats {
    /// Requests of this opcode received (see [`abi::op`]).
    pub fn count(&self, opcode: u32) -> u64 {
        self.ops
            .get(opcode as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
    /// Requests that arrived resent (`FUSE_NOTIFY_RESEND`) and were answered.
    pub fn resent(&self) -> u64 {
        self.resent.load(Ordering::Relaxed)
    }
    /// `OPCODE count` lines of every opcode seen, then `resent N`.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (i, c) in self.ops.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            if n > 0 {
                s += &format!("{} {n}\n", op_label(i as u32));
            }
        }
        s += &format!("resent {}\n", self.resent());
        s
    }
}

fn op_label(opcode: u32) -> String {
    match abi::opname(opcode) {
        "OTHER" => format!("OP{opcode}"),
        n => n.to_string(),
    }
}

/// Ends a session from another thread, or from a signal handler through
/// [`Stopper::raw_fd`] (writing 8 bytes to an eventfd is async-signal-safe).
#[derive(Debug, Clone)]
pub struct Stopper(Arc<OwnedFd>);

impl Stopper {
    fn new() -> Result<Stopper> {
        // SAFETY: eventfd takes no pointers; result checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(IoError::new("eventfd", "", io::Error::last_os_error()).into());
        }
        // SAFETY: fd is new and ours.
        Ok(Stopper(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Asks every worker to finish the request it is answering and return.
    pub fn stop(&self) {
        signal_eventfd(self.0.as_raw_fd());
    }

    /// The eventfd: write a u64 1 to it to stop.
    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Writes 1 to an eventfd (async-signal-safe).
pub fn signal_eventfd(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64; failure (counter full) still leaves it
    // readable, which is all that matters.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

struct Inner<F: ReadOnlyFs> {
    fs: Arc<F>,
    /// The fd the workers read.
    dev: FuseDev,
    /// The connection's own fd (the one the fd store has a copy of) when the workers
    /// read a clone of it (a kernel without resend).
    kept: Option<FuseDev>,
    neg: Negotiated,
    entry_ttl: Ttl,
    attr_ttl: Ttl,
    negative_ttl: Ttl,
    passthrough: bool,
    /// The fs has no xattrs at all: GETXATTR is answered ENOSYS ([`ReadOnlyFs::has_xattrs`]).
    no_xattrs: bool,
    /// OPENDIR is answered ENOSYS: the kernel then opens directories itself, with
    /// `FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR` (what this daemon answers for an immutable
    /// tree anyway), and sends neither OPENDIR nor RELEASEDIR again: two round trips
    /// less per directory walked. Only with long TTLs (an immutable tree) and a kernel
    /// that says it takes ENOSYS there (`FUSE_NO_OPENDIR_SUPPORT`).
    no_opendir: bool,
    backing: Mutex<HashMap<u64, u32>>,
    backing_log: BackingLog,
    /// Handles the kernel holds in caching io mode, per node. The kernel fails an open
    /// with EIO when one inode would mix caching and passthrough handles (fs/fuse/
    /// iomode.c): a file opened while incomplete (page cache: a shell's mapped libc)
    /// keeps its later opens in caching mode until the last such handle is released.
    cached_opens: Mutex<HashMap<u64, u32>>,
    /// Resumed from a previous daemon, which may have left caching handles open that
    /// this one never saw: nodes without a backing id stay in caching mode.
    inherited_opens: bool,
    stats: Arc<Stats>,
    stop: Stopper,
    /// Set by the worker that saw the connection end (or DESTROY).
    gone: std::sync::atomic::AtomicBool,
}

/// A serving FUSE session.
pub struct Session<F: ReadOnlyFs> {
    inner: Arc<Inner<F>>,
    workers: Vec<JoinHandle<Result<Exit>>>,
    settings: Settings,
    fd_store: Option<(Arc<dyn FdStore>, String)>,
}

/// Marks a file handle opened in caching io mode (node ids stay far below it).
const CACHED_FH: u64 = 1 << 63;

/// Requests are small for a read-only fs (no WRITE): names, xattr names, BATCH_FORGET.
/// The kernel wants at least 8 KiB and room for max_write (4 KiB) plus headers.
const REQUEST_BUF: usize = 64 * 1024;
/// epoll tags of a worker's two fds.
const EV_DEV: u64 = 1;
const EV_STOP: u64 = 2;

/// Bound on the warm-up's search for a regular file.
const WARMUP_MAX_DIRS: usize = 64;

impl<F: ReadOnlyFs> Session<F> {
    /// Mounts `fs` at `mountpoint`, puts the fd in the fd store, answers INIT, records
    /// the session in `state` and starts serving. A new connection: what `state` held
    /// is discarded (a daemon that finds its fd in the fd store resumes instead).
    pub fn start(
        fs: Arc<F>,
        mountpoint: &Path,
        state: &StateDir,
        opts: SessionOptions,
    ) -> Result<Self> {
        // Resolved before the mount: resolving through it would need the daemon.
        let mountpoint = std::fs::canonicalize(mountpoint)
            .map_err(|e| IoError::new("resolve", mountpoint, e))?;
        state.reset()?;
        let dev = dev::mount(&mountpoint, &opts.mount)?;
        // From here on a failure must not leave a mount nobody serves.
        let conn = dev.conn();
        let undo = |dev: Option<FuseDev>, e: Error| -> Error {
            if let Some((store, name)) = &opts.fd_store {
                let _ = store.del(name);
            }
            if let Some(c) = conn {
                if let Ok(ctl) = dev::Fusectl::open() {
                    let _ = ctl.abort(c);
                }
            }
            drop(dev);
            let _ = dev::unmount(&mountpoint, true);
            e
        };
        let mut settings = Settings {
            version: STATE_VERSION,
            mountpoint: mountpoint.clone(),
            conn: dev.conn(),
            daemon: daemon_version(),
            init: None,
        };
        if let Some((store, name)) = &opts.fd_store {
            if let Err(e) = store.put(name, dev.as_fd()) {
                return Err(undo(Some(dev), e));
            }
        }
        if let Err(e) = state.save_settings(&settings) {
            return Err(undo(Some(dev), e));
        }
        let neg = match handshake(&dev, &mountpoint, &opts) {
            Ok(n) => n,
            Err(e) => return Err(undo(Some(dev), e)),
        };
        settings.init = Some(neg);
        if let Err(e) = state.save_settings(&settings) {
            return Err(undo(Some(dev), e));
        }
        if let (Some(kb), Some(c)) = (opts.read_ahead_kb, dev.conn()) {
            if let Err(e) = c.set_read_ahead_kb(kb) {
                tracing::warn!("{e}");
            }
        }
        let session = match Self::serve(fs, dev, settings, state, HashMap::new(), false, &opts) {
            Ok(s) => s,
            Err(e) => return Err(undo(None, e)),
        };
        if opts.warmup {
            if let Err(e) = warmup(&mountpoint) {
                tracing::warn!("FUSE warm-up on {}: {e}", mountpoint.display());
            }
        }
        Ok(session)
    }

    /// Takes over a live connection whose fd (`fd`, from the fd store) a previous daemon left:
    /// no INIT (it was answered before; the settings come from `state`), then
    /// `FUSE_NOTIFY_RESEND` so requests the previous daemon had read but not answered
    /// come back. If the previous daemon died before INIT, the handshake happens here.
    pub fn resume(fs: Arc<F>, fd: OwnedFd, state: &StateDir, opts: SessionOptions) -> Result<Self> {
        let saved = state.load()?;
        let Some(mut settings) = saved.settings else {
            return Err(Error::State {
                dir: state.path().to_path_buf(),
                reason: "no session recorded: nothing to resume".into(),
            });
        };
        let dev = FuseDev::from_fd(fd, settings.conn);
        let fresh = settings.init.is_none();
        let neg = match settings.init {
            Some(neg) => {
                if neg.has_resend {
                    dev.notify_resend()?;
                } else {
                    tracing::warn!(
                        "FUSE connection {}: kernel without FUSE_NOTIFY_RESEND; requests the previous daemon read were failed (ECONNABORTED) when it died",
                        settings.mountpoint.display()
                    );
                }
                neg
            }
            None => {
                // The INIT may have been read by the dead daemon: have it sent again.
                let _ = dev.notify_resend();
                let neg = handshake(&dev, &settings.mountpoint, &opts)?;
                settings.init = Some(neg);
                state.save_settings(&settings)?;
                neg
            }
        };
        if opts.passthrough == PassthroughMode::Required && !neg.passthrough {
            return Err(Error::NoPassthrough(settings.mountpoint.clone()));
        }
        let mountpoint = settings.mountpoint.clone();
        let session = Self::serve(fs, dev, settings, state, saved.backing, !fresh, &opts)?;
        // INIT was answered here: the kernel has not learned about FLUSH and STATX yet.
        if fresh && opts.warmup {
            if let Err(e) = warmup(&mountpoint) {
                tracing::warn!("FUSE warm-up on {}: {e}", mountpoint.display());
            }
        }
        Ok(session)
    }

    fn serve(
        fs: Arc<F>,
        dev: FuseDev,
        settings: Settings,
        state: &StateDir,
        backing: HashMap<u64, u32>,
        inherited_opens: bool,
        opts: &SessionOptions,
    ) -> Result<Self> {
        let Some(neg) = settings.init else {
            return Err(Error::Handshake {
                mountpoint: settings.mountpoint.clone(),
                reason: "no negotiated settings".into(),
            });
        };
        let backing_log = state.backing_log()?;
        let stop = Stopper::new()?;
        let (dev, kept) = if !neg.has_resend && opts.fd_store.is_some() {
            let clone = dev.clone_dev()?;
            tracing::info!(
                "FUSE connection {}: kernel without FUSE_NOTIFY_RESEND: serving a clone of the kept fd (a crash fails the requests in flight with ECONNABORTED)",
                settings.mountpoint.display()
            );
            (clone, Some(dev))
        } else {
            (dev, None)
        };
        dev.set_nonblocking()?;
        let inner = Arc::new(Inner {
            no_xattrs: !fs.has_xattrs(),
            fs,
            dev,
            kept,
            neg,
            entry_ttl: opts.entry_ttl.into(),
            attr_ttl: opts.attr_ttl.into(),
            negative_ttl: opts.negative_ttl.into(),
            passthrough: neg.passthrough && opts.passthrough != PassthroughMode::Off,
            no_opendir: !opts.entry_ttl.is_zero()
                && neg.kernel_flags & init::NO_OPENDIR_SUPPORT != 0,
            backing: Mutex::new(backing),
            backing_log,
            cached_opens: Mutex::default(),
            inherited_opens,
            stats: Arc::new(Stats::default()),
            stop,
            gone: Default::default(),
        });
        let mut session = Session {
            inner,
            workers: Vec::new(),
            settings,
            fd_store: opts.fd_store.clone(),
        };
        for i in 0..opts.threads.max(1) {
            let inner = session.inner.clone();
            let h = std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || inner.work())
                .map_err(|e| IoError::new("spawn FUSE worker", "", e))?;
            // On an error above, dropping the session stops and joins those started.
            session.workers.push(h);
        }
        Ok(session)
    }

    /// The session as recorded (mountpoint, connection, INIT settings).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn conn(&self) -> Option<ConnId> {
        self.settings.conn
    }

    pub fn mountpoint(&self) -> &Path {
        &self.settings.mountpoint
    }

    /// Whether opens can be answered with passthrough.
    pub fn passthrough(&self) -> bool {
        self.inner.passthrough
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.inner.stats.clone()
    }

    pub fn stopper(&self) -> Stopper {
        self.inner.stop.clone()
    }

    /// The backing ids registered so far (node id → id).
    pub fn backing_ids(&self) -> HashMap<u64, u32> {
        lock(&self.inner.backing).clone()
    }

    /// File handles open in caching io mode (opened while their file was incomplete),
    /// as far as the daemon has seen their RELEASE.
    pub fn caching_handles(&self) -> u64 {
        lock(&self.inner.cached_opens)
            .values()
            .map(|&n| u64::from(n))
            .sum()
    }

    fn join(&mut self) -> Result<Exit> {
        let mut result = Ok(Exit::Stopped);
        for w in self.workers.drain(..) {
            let r = w.join().unwrap_or_else(|_| {
                Err(Error::Device {
                    op: "serve",
                    conn: "worker".into(),
                    source: io::Error::other("FUSE worker panicked"),
                })
            });
            match (&result, r) {
                (Ok(Exit::Stopped), r @ (Ok(Exit::Unmounted) | Err(_))) => result = r,
                (Ok(Exit::Unmounted), Err(e)) => result = Err(e),
                _ => {}
            }
        }
        if self.inner.gone.load(Ordering::SeqCst)
            && result.as_ref().is_ok_and(|e| *e == Exit::Stopped)
        {
            result = Ok(Exit::Unmounted);
        }
        if matches!(result, Ok(Exit::Unmounted)) {
            if let Some((store, name)) = &self.fd_store {
                if let Err(e) = store.del(name) {
                    tracing::warn!("{e}");
                }
            }
        }
        result
    }

    /// Serves until the filesystem is unmounted or a [`Stopper`] stops it.
    pub fn wait(mut self) -> Result<Exit> {
        self.join()
    }

    /// Stops serving: each worker finishes the request it is answering; requests not
    /// yet read stay queued in the kernel for the next daemon. Returns the fd (the
    /// fd store keeps its own copy).
    pub fn stop(mut self) -> Result<(Exit, OwnedFd)> {
        self.inner.stop.stop();
        let exit = self.join()?;
        // A duplicate of the same open file: the connection lives while any copy does.
        let fd = self
            .inner
            .kept
            .as_ref()
            .unwrap_or(&self.inner.dev)
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| self.inner.err("dup", e))?;
        Ok((exit, fd))
    }
}

impl<F: ReadOnlyFs> Drop for Session<F> {
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            self.inner.stop.stop();
            let _ = self.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn daemon_version() -> String {
    format!("cstore-fuse-fs {}", env!("CARGO_PKG_VERSION"))
}

/// Reads INIT and answers it; returns what was settled.
fn handshake(dev: &FuseDev, mountpoint: &Path, opts: &SessionOptions) -> Result<Negotiated> {
    let herr = |reason: String| Error::Handshake {
        mountpoint: mountpoint.to_path_buf(),
        reason,
    };
    let mut buf = vec![0u8; REQUEST_BUF];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let n = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(herr("no INIT request within 10 s".into()));
        }
        let mut p = libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32) };
        match dev.read_request(&mut buf)? {
            ReadResult::Request(n) => break n,
            ReadResult::Again => continue,
            ReadResult::Gone => return Err(Error::Disconnected(mountpoint.display().to_string())),
        }
    };
    let req = abi::parse_request(&buf[..n]).map_err(|e| herr(e.to_string()))?;
    let Op::Init(i) = req.op else {
        let _ = dev.write_reply(req.header.unique, -libc::EIO, &[]);
        return Err(herr(format!(
            "expected INIT, got {}",
            abi::opname(req.header.opcode)
        )));
    };
    if i.major != abi::KERNEL_VERSION {
        let _ = dev.write_reply(req.header.unique, -libc::EPROTO, &[]);
        return Err(herr(format!(
            "kernel speaks FUSE {}.{}, we speak 7",
            i.major, i.minor
        )));
    }
    let mut want = init::ASYNC_READ
        | init::PARALLEL_DIROPS
        | init::DO_READDIRPLUS
        | init::MAX_PAGES
        | init::CACHE_SYMLINKS
        | init::EXPLICIT_INVAL_DATA
        | init::INIT_EXT;
    if opts.passthrough != PassthroughMode::Off {
        want |= init::PASSTHROUGH;
    }
    let flags = want & i.flags;
    let passthrough = flags & init::PASSTHROUGH != 0;
    if opts.passthrough == PassthroughMode::Required && !passthrough {
        let _ = dev.write_reply(req.header.unique, -libc::EPROTO, &[]);
        return Err(Error::NoPassthrough(mountpoint.to_path_buf()));
    }
    let out = InitOut {
        minor: abi::OUR_MINOR.min(i.minor),
        max_readahead: i.max_readahead,
        flags,
        max_background: 64,
        congestion_threshold: 48,
        max_write: 4096,
        time_gran: 1,
        max_pages: opts.max_pages.clamp(1, 256),
        // The FUSE mount is one stacking level; overlayfs on it is the second and last.
        max_stack_depth: if passthrough { 1 } else { 0 },
    };
    let mut w = Writer::with_capacity(abi::INIT_OUT_SIZE);
    abi::encode_init_out(&mut w, &out);
    dev.write_reply(req.header.unique, 0, &w.0)?;
    let neg = Negotiated {
        kernel_major: i.major,
        kernel_minor: i.minor,
        minor: out.minor,
        kernel_flags: i.flags,
        flags,
        max_readahead: out.max_readahead,
        max_write: out.max_write,
        max_pages: out.max_pages,
        max_stack_depth: out.max_stack_depth,
        passthrough,
        has_resend: i.flags & init::HAS_RESEND != 0,
    };
    tracing::debug!("FUSE INIT on {}: {neg:?}", mountpoint.display());
    Ok(neg)
}

/// Opens, statx's and closes one regular file of the mount (the first found, breadth
/// first, in at most [`WARMUP_MAX_DIRS`] directories), so the kernel learns that FLUSH
/// and STATX are not implemented. Walks with fds, never following a symlink.
fn warmup(mountpoint: &Path) -> io::Result<()> {
    use crate::util::{list_dir, open_beneath};
    let root = open_beneath(None, mountpoint, libc::O_DIRECTORY)?;
    let mut queue: std::collections::VecDeque<PathBuf> = [PathBuf::new()].into();
    let mut seen = 0;
    while let Some(rel) = queue.pop_front() {
        seen += 1;
        if seen > WARMUP_MAX_DIRS {
            break;
        }
        let dir = if rel.as_os_str().is_empty() {
            root.try_clone()?
        } else {
            open_beneath(Some(&root), &rel, libc::O_DIRECTORY)?
        };
        for (name, dtype) in list_dir(dir)? {
            let p = rel.join(std::ffi::OsStr::from_bytes(&name));
            match dtype {
                libc::DT_REG => {
                    let f = open_beneath(Some(&root), &p, 0)?;
                    // SAFETY: statx is plain data; an empty path with AT_EMPTY_PATH
                    // names the fd.
                    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
                    let r = unsafe {
                        libc::statx(
                            f.as_raw_fd(),
                            c"".as_ptr(),
                            libc::AT_EMPTY_PATH,
                            libc::STATX_BASIC_STATS | libc::STATX_BTIME,
                            &mut stx,
                        )
                    };
                    if r != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    drop(f); // FLUSH
                    return Ok(());
                }
                libc::DT_DIR => queue.push_back(p),
                _ => {}
            }
        }
    }
    tracing::debug!(
        "no regular file for the FUSE flush warm-up in {}",
        mountpoint.display()
    );
    Ok(())
}

impl<F: ReadOnlyFs> Inner<F> {
    fn work(&self) -> Result<Exit> {
        let mut buf = vec![0u8; REQUEST_BUF];
        let mut w = Writer::with_capacity(64 * 1024);
        let mut data = Vec::new();
        let ep = self.worker_epoll()?;
        loop {
            // SAFETY: epoll_event is plain data.
            let mut ev: [libc::epoll_event; 2] = unsafe { std::mem::zeroed() };
            // SAFETY: a live epoll fd and room for 2 events.
            let r = unsafe { libc::epoll_wait(ep.as_raw_fd(), ev.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(self.err("epoll_wait", e));
            }
            let ready = &ev[..r as usize];
            if ready.iter().any(|e| e.u64 == EV_STOP) {
                return Ok(Exit::Stopped);
            }
            if ready.is_empty() {
                continue;
            }
            match self.dev.read_request(&mut buf)? {
                ReadResult::Again => continue,
                ReadResult::Gone => return Ok(self.ended()),
                ReadResult::Request(n) => match self.handle(&buf[..n], &mut w, &mut data) {
                    Ok(true) => {}
                    Ok(false) => return Ok(self.ended()),
                    Err(Error::Disconnected(_)) => return Ok(self.ended()),
                    Err(e) => {
                        self.stop.stop();
                        return Err(e);
                    }
                },
            }
        }
    }

    /// This worker's wait set: the /dev/fuse fd with `EPOLLEXCLUSIVE`, so a request
    /// wakes one idle worker rather than all of them (a poll() on the shared fd woke every
    /// worker per request: 3.6 context switches per request with 4 workers, measured,
    /// each a wait for a CPU on a loaded node), and the stop eventfd, which wakes all.
    /// The connection's end (abort, unmount) wakes exclusive waiters too.
    fn worker_epoll(&self) -> Result<OwnedFd> {
        // SAFETY: no pointers; result checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(self.err("epoll_create1", io::Error::last_os_error()));
        }
        // SAFETY: a new fd we own.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        for (fd, events, tag) in [
            (
                self.dev.as_raw_fd(),
                libc::EPOLLIN | libc::EPOLLEXCLUSIVE,
                EV_DEV,
            ),
            (self.stop.raw_fd(), libc::EPOLLIN, EV_STOP),
        ] {
            let mut ev = libc::epoll_event {
                events: events as u32,
                u64: tag,
            };
            // SAFETY: live fds and event.
            if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
                return Err(self.err("epoll_ctl", io::Error::last_os_error()));
            }
        }
        Ok(ep)
    }

    /// The connection is gone: the other workers see POLLERR too, but say so anyway.
    fn ended(&self) -> Exit {
        self.gone.store(true, Ordering::SeqCst);
        self.stop.stop();
        Exit::Unmounted
    }

    fn err(&self, op: &'static str, e: io::Error) -> Error {
        Error::Device {
            op,
            conn: self
                .dev
                .conn()
                .map_or_else(|| "?".into(), |c| c.to_string()),
            source: e,
        }
    }

    /// Writes a reply. One the kernel refuses (a bug of ours, e.g. a malformed body) is
    /// logged and replaced by EIO, so the caller is not left waiting and the session
    /// goes on; only a gone connection ends it.
    fn reply(&self, unique: u64, r: std::result::Result<&[u8], Errno>) -> Result<()> {
        let res = match r {
            Ok(body) => self.dev.write_reply(unique, 0, body),
            Err(Errno(e)) => self.dev.write_reply(unique, -e, &[]),
        };
        match res {
            Err(Error::Device { source, .. }) => {
                tracing::error!("FUSE: reply to {unique:#x} refused: {source}; answering EIO");
                match self.dev.write_reply(unique, -libc::EIO, &[]) {
                    Err(e @ Error::Disconnected(_)) => Err(e),
                    _ => Ok(()),
                }
            }
            r => r,
        }
    }

    /// Answers one request; false when the session must end (DESTROY).
    fn handle(&self, buf: &[u8], w: &mut Writer, data: &mut Vec<u8>) -> Result<bool> {
        let req = match abi::parse_request(buf) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("FUSE: malformed request: {e}");
                if let Ok(h) = abi::parse_header(buf) {
                    self.dev.write_reply(h.unique, -libc::EIO, &[])?;
                }
                return Ok(true);
            }
        };
        let h = req.header;
        if let Some(c) = self.stats.ops.get(h.opcode as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if h.is_resent() {
            self.stats.resent.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                "answering resent {} unique={:#x}",
                abi::opname(h.opcode),
                h.unique
            );
        }
        let fs = &*self.fs;
        let node = h.nodeid;
        w.0.clear();
        match req.op {
            Op::Lookup { name } => match fs.lookup(node, name) {
                Ok(a) => {
                    abi::encode_entry(w, a.ino, &a, self.entry_ttl, self.attr_ttl);
                    self.reply(h.unique, Ok(&w.0))?;
                }
                Err(Errno::ENOENT) if self.negative_ttl != Ttl::default() => {
                    abi::encode_entry(w, 0, &Attr::default(), self.negative_ttl, Ttl::default());
                    self.reply(h.unique, Ok(&w.0))?;
                }
                Err(e) => self.reply(h.unique, Err(e))?,
            },
            Op::Forget { nlookup } => fs.forget(node, nlookup),
            Op::BatchForget { pairs, .. } => {
                for (n, c) in abi::forget_pairs(pairs) {
                    fs.forget(n, c);
                }
            }
            Op::Getattr { .. } => match fs.getattr(node) {
                Ok(a) => {
                    abi::encode_attr_out(w, &a, self.attr_ttl);
                    self.reply(h.unique, Ok(&w.0))?;
                }
                Err(e) => self.reply(h.unique, Err(e))?,
            },
            Op::Readlink => {
                let r = fs.readlink(node);
                self.reply(h.unique, r.as_deref().map_err(|e| *e))?;
            }
            Op::Open { flags } => {
                if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
                    return self.reply(h.unique, Err(Errno::EROFS)).map(|_| true);
                }
                // Held until the reply is written: the kernel must see the io modes
                // of one node's opens in the order they were decided.
                let mut cached = lock(&self.cached_opens);
                match fs.open(node) {
                    Ok(mode) => {
                        let (fl, id) = self.open_flags(node, mode, &mut cached);
                        let fh = if fl & abi::fopen::PASSTHROUGH == 0 && mode != Open::Direct {
                            *cached.entry(node).or_default() += 1;
                            node | CACHED_FH
                        } else {
                            node
                        };
                        abi::encode_open_out(w, fh, fl, id);
                        self.reply(h.unique, Ok(&w.0))?;
                    }
                    Err(e) => self.reply(h.unique, Err(e))?,
                }
            }
            Op::Read(r) => {
                let max = self.neg.max_pages as u32 * 4096;
                data.clear();
                match fs.read(node, r.offset, r.size.min(max.max(4096)), data) {
                    Ok(()) => {
                        data.truncate(r.size as usize);
                        self.reply(h.unique, Ok(data))?;
                    }
                    Err(e) => self.reply(h.unique, Err(e))?,
                }
            }
            Op::Release { fh } => {
                if fh & CACHED_FH != 0 {
                    let mut cached = lock(&self.cached_opens);
                    if let Some(n) = cached.get_mut(&node) {
                        *n -= 1;
                        if *n == 0 {
                            cached.remove(&node);
                        }
                    }
                }
                fs.release(node);
                self.reply(h.unique, Ok(&[]))?;
            }
            Op::Opendir { .. } if self.no_opendir => self.reply(h.unique, Err(Errno::ENOSYS))?,
            Op::Opendir { .. } => match fs.opendir(node) {
                Ok(()) => {
                    // An immutable directory: its listing may stay in the page cache.
                    let fl = if self.entry_ttl != Ttl::default() {
                        abi::fopen::CACHE_DIR | abi::fopen::KEEP_CACHE
                    } else {
                        0
                    };
                    abi::encode_open_out(w, node, fl, 0);
                    self.reply(h.unique, Ok(&w.0))?;
                }
                Err(e) => self.reply(h.unique, Err(e))?,
            },
            Op::Readdir(r) | Op::ReaddirPlus(r) => {
                let plus =
                    matches!(req.op, Op::ReaddirPlus(_)).then_some((self.entry_ttl, self.attr_ttl));
                let mut sink = DirSink::new(w, r.size as usize, plus, r.offset);
                match fs.readdir(node, r.offset, &mut sink) {
                    Ok(()) => self.reply(h.unique, Ok(&w.0))?,
                    Err(e) => self.reply(h.unique, Err(e))?,
                }
            }
            Op::Releasedir { .. } => self.reply(h.unique, Ok(&[]))?,
            Op::Getxattr { .. } if self.no_xattrs => self.reply(h.unique, Err(Errno::ENOSYS))?,
            Op::Getxattr { size, name } => {
                let r = fs.getxattr(node, name);
                self.reply_sized(h.unique, size, r, w)?;
            }
            Op::Listxattr { size } => {
                let r = fs.listxattr(node);
                self.reply_sized(h.unique, size, r, w)?;
            }
            Op::Statfs => {
                abi::encode_statfs(w, &fs.statfs());
                self.reply(h.unique, Ok(&w.0))?;
            }
            // ENOSYS once and the kernel never asks again (fc->no_flush, no_access, ...).
            Op::Flush { .. } | Op::Access => self.reply(h.unique, Err(Errno::ENOSYS))?,
            // Every request is answered promptly and is idempotent: nothing to cancel.
            Op::Interrupt { .. } => {}
            Op::Destroy => {
                self.reply(h.unique, Ok(&[]))?;
                return Ok(false);
            }
            Op::Init(_) => {
                tracing::warn!("FUSE: INIT on a connection that was initialized");
                self.reply(h.unique, Err(Errno(libc::EPROTO)))?;
            }
            Op::Other { opcode, .. } if opcode == op::NOTIFY_REPLY => {}
            Op::Other { opcode, .. } => {
                let e = if abi::is_write_op(opcode) {
                    Errno::EROFS
                } else {
                    Errno::ENOSYS
                };
                self.reply(h.unique, Err(e))?;
            }
        }
        Ok(true)
    }

    /// GETXATTR/LISTXATTR: size 0 asks for the length; a too small buffer is ERANGE.
    fn reply_sized(
        &self,
        unique: u64,
        size: u32,
        r: std::result::Result<Vec<u8>, Errno>,
        w: &mut Writer,
    ) -> Result<()> {
        match r {
            Err(e) => self.reply(unique, Err(e)),
            Ok(v) if size == 0 => {
                abi::encode_getxattr_out(w, v.len() as u32);
                self.reply(unique, Ok(&w.0))
            }
            Ok(v) if v.len() > size as usize => self.reply(unique, Err(Errno::ERANGE)),
            Ok(v) => self.reply(unique, Ok(&v)),
        }
    }

    /// The OPEN reply's flags and backing id for `mode`.
    fn open_flags(&self, node: u64, mode: Open, cached: &mut HashMap<u64, u32>) -> (u32, u32) {
        match mode {
            Open::Direct => (abi::fopen::DIRECT_IO, 0),
            Open::KeepCache => (abi::fopen::KEEP_CACHE, 0),
            Open::Passthrough if !self.passthrough => (abi::fopen::KEEP_CACHE, 0),
            Open::Passthrough
                if cached.contains_key(&node)
                    || (self.inherited_opens && !lock(&self.backing).contains_key(&node)) =>
            {
                (abi::fopen::KEEP_CACHE, 0)
            }
            Open::Passthrough => match self.backing_id(node) {
                Ok(id) => (abi::fopen::PASSTHROUGH, id),
                Err(e) => {
                    // Served by the daemon instead: slower, but the open works.
                    tracing::warn!(
                        "FUSE passthrough for node {node}: {e}; serving it from the page cache"
                    );
                    (abi::fopen::KEEP_CACHE, 0)
                }
            },
        }
    }

    /// The node's backing id: the one registered before (by this daemon or one before
    /// it: the kernel refuses a second backing file for an inode that is still open in
    /// passthrough), or a new one, recorded on disk before the reply hands it out.
    fn backing_id(&self, node: u64) -> std::result::Result<u32, String> {
        let mut tbl = lock(&self.backing);
        if let Some(&id) = tbl.get(&node) {
            return Ok(id);
        }
        let file = self
            .fs
            .backing_file(node)
            .map_err(|e| format!("backing file: {e}"))?;
        let id = self
            .dev
            .backing_open(file.as_fd())
            .map_err(|e| format!("FUSE_DEV_IOC_BACKING_OPEN: {e}"))?;
        if let Err(e) = self.backing_log.append(node, id) {
            // An id a restarted daemon would not know must not reach the kernel's inode.
            let _ = self.dev.backing_close(id);
            return Err(e.to_string());
        }
        tbl.insert(node, id);
        Ok(id)
    }
}
