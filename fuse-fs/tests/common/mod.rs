//! Shared by the kernel tests: the source tree, mounts that clean up after themselves,
//! child processes that die with the test, and a reader that loops over every file.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use cstore_fuse_fs::{ConnId, Fusectl, StateDir};
use cstore_os::mount::Mount;
use cstore_os::sys;
use cstore_os::testing::skip_or_fail;

/// Whether the kernel tests can run here: root and /dev/fuse. Under CI=true a machine
/// without them fails `test` instead of skipping it.
pub fn fuse_available(test: &str) -> bool {
    // SAFETY: no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    let dev = Path::new("/dev/fuse").exists();
    if root && dev {
        return true;
    }
    skip_or_fail(test, if !root { "not root" } else { "no /dev/fuse" });
    false
}

/// Under CI=true, missing passthrough fails `test`; elsewhere it is skipped.
pub fn passthrough_missing(test: &str, why: &str) -> bool {
    skip_or_fail(test, &format!("FUSE passthrough unavailable: {why}"));
    true
}

/// A temporary directory on the root filesystem (ext4 here: passthrough backing files
/// must not be on a stacked filesystem).
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("cstore-fuse-test.")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

/// The parent directory of `p` (opened) and `p`'s name, for the *at calls.
fn parent_and_name(p: &Path) -> (OwnedFd, CString) {
    let dir = sys::open_dir(p.parent().unwrap()).unwrap();
    let name = CString::new(p.file_name().unwrap().as_bytes()).unwrap();
    (dir, name)
}

pub fn setxattr(p: &Path, name: &str, value: &[u8]) {
    let (dir, file) = parent_and_name(p);
    let n = CString::new(name).unwrap();
    sys::lsetxattrat(dir.as_fd(), &file, &n, value)
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
}

pub fn getxattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: as above, buf writable.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

pub fn listxattr(p: &Path) -> Vec<String> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: as above.
    let r = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        r >= 0,
        "listxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    buf.truncate(r as usize);
    let mut v: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    v.sort();
    v
}

pub fn mknod_whiteout(p: &Path) {
    let (dir, name) = parent_and_name(p);
    sys::mknodat(dir.as_fd(), &name, libc::S_IFCHR | 0o644, 0, 0)
        .unwrap_or_else(|e| panic!("mknod {}: {e}", p.display()));
}

/// The layer the FUSE mount serves: files of assorted sizes, a hardlink, a symlink, an
/// executable, a whiteout (char 0:0) hiding `gone` of the lower below, an opaque dir
/// hiding `opq/hidden`, an xattr, odd modes and owners, a big file.
pub fn make_layer(src: &Path, big: usize) {
    std::fs::create_dir_all(src.join("dir/sub")).unwrap();
    std::fs::create_dir_all(src.join("opq")).unwrap();
    std::fs::create_dir_all(src.join("bin")).unwrap();
    for i in 1..=24u64 {
        std::fs::write(
            src.join(format!("dir/f{i}")),
            random_bytes(i as usize * 5000, i),
        )
        .unwrap();
    }
    for i in 1..=6 {
        std::fs::write(src.join(format!("dir/sub/s{i}")), format!("small {i}\n")).unwrap();
    }
    std::fs::write(src.join("big"), random_bytes(big, 99)).unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("dir/f1", src.join("link")).unwrap();
    std::fs::hard_link(src.join("dir/f2"), src.join("hard")).unwrap();
    mknod_whiteout(&src.join("gone"));
    std::fs::write(src.join("opq/new"), b"inside opq\n").unwrap();
    setxattr(&src.join("opq"), "trusted.overlay.opaque", b"y");
    setxattr(&src.join("dir/f3"), "user.note", b"hello");
    std::fs::copy("/usr/bin/true", src.join("bin/true")).unwrap();
    let owned = src.join("dir/owned");
    std::fs::write(&owned, b"owned\n").unwrap();
    std::os::unix::fs::chown(&owned, Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(&owned, std::os::unix::fs::PermissionsExt::from_mode(0o4750)).unwrap();
}

/// The lower layer below it in the overlay tests.
pub fn make_lower(low: &Path) {
    std::fs::create_dir_all(low.join("opq")).unwrap();
    std::fs::write(low.join("base.txt"), b"base\n").unwrap();
    std::fs::write(low.join("gone"), b"must be hidden by the whiteout\n").unwrap();
    std::fs::write(
        low.join("opq/hidden"),
        b"must be hidden by the opaque dir\n",
    )
    .unwrap();
}

/// Every regular file under `root` (relative paths), with its content.
pub fn files_of(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let mut es: Vec<_> = std::fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        es.sort_by_key(|e| e.file_name());
        for e in es {
            let r = rel.join(e.file_name());
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(root, &r, out);
            } else if ft.is_file() {
                out.insert(r.clone(), std::fs::read(root.join(&r)).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

/// Mounts that are unmounted (lazily if busy) when dropped, last first, even on panic;
/// a FUSE connection registered with `conn` is aborted first if it is still there, so
/// nothing waits on a daemon that is gone.
#[derive(Default)]
pub struct Mounts {
    points: Vec<PathBuf>,
    conns: Vec<ConnId>,
}

impl Mounts {
    pub fn push(&mut self, p: &Path) {
        self.points.push(p.to_path_buf());
    }
    pub fn conn(&mut self, c: ConnId) {
        self.conns.push(c);
    }
    /// Unmounts `p` now (it must be the last pushed). EBUSY is retried for a while: a
    /// child another test of this process is spawning holds copies of all our fds
    /// (close-on-exec ones too) until it execs.
    pub fn umount(&mut self, p: &Path) {
        assert_eq!(self.points.last().map(|x| x.as_path()), Some(p));
        let t = Instant::now();
        loop {
            match cstore_fuse_fs::dev::unmount(p, false) {
                Ok(()) => break,
                Err(cstore_fuse_fs::Error::Io(e))
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && t.elapsed() < Duration::from_secs(5) =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        }
        self.points.pop();
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.conns.is_empty() {
            if let Ok(ctl) = Fusectl::open() {
                for c in &self.conns {
                    let _ = ctl.abort(*c);
                }
            }
        }
        for p in self.points.iter().rev() {
            let _ = cstore_fuse_fs::dev::unmount(p, true);
        }
    }
}

pub fn mount_overlay(lower: &str, upper: &Path, work: &Path, at: &Path) {
    std::fs::create_dir_all(upper).unwrap();
    std::fs::create_dir_all(work).unwrap();
    std::fs::create_dir_all(at).unwrap();
    let m = Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options: vec![
            format!("lowerdir={lower}"),
            format!("upperdir={}", upper.display()),
            format!("workdir={}", work.display()),
        ],
    };
    cstore_os::mount::mount(&m, at).unwrap_or_else(|e| panic!("mount overlay {m:?}: {e}"));
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn test daemon");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines: rx }
    }

    /// Waits for the `ready` line.
    pub fn ready(&mut self) {
        match self.lines.recv_timeout(Duration::from_secs(15)) {
            Ok(l) if l == "ready" => {}
            r => panic!(
                "daemon did not get ready: {r:?} (status {:?})",
                self.child.try_wait()
            ),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signals our own child, not yet reaped.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for exit with a deadline.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t.elapsed() < within,
                "process {} still running after {within:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The FUSE connection a daemon recorded in its state directory `state`.
pub fn state_conn(state: &Path) -> ConnId {
    StateDir::new(state)
        .unwrap()
        .load()
        .unwrap()
        .settings
        .unwrap()
        .conn
        .unwrap()
}

pub fn testd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cstore-fuse-testd"))
}

/// What a reader saw.
#[derive(Debug, Default)]
pub struct ReaderReport {
    pub loops: u64,
    pub reads: u64,
    pub errors: Vec<String>,
    /// Start and latency of each file read (open + read whole) and directory listing.
    pub samples: Vec<(Instant, Duration)>,
}

impl ReaderReport {
    pub fn percentile(&self, p: f64) -> Duration {
        let mut l: Vec<Duration> = self.samples.iter().map(|s| s.1).collect();
        l.sort();
        l.get(((l.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or_default()
    }
    pub fn max(&self) -> Duration {
        self.samples.iter().map(|s| s.1).max().unwrap_or_default()
    }
    /// The longest operation in flight at any time within `[from, to]`: the stall the
    /// reader saw around a daemon restart.
    pub fn stall(&self, from: Instant, to: Instant) -> Duration {
        self.samples
            .iter()
            .filter(|(s, l)| *s <= to && *s + *l >= from)
            .map(|s| s.1)
            .max()
            .unwrap_or_default()
    }
}

/// A thread reading every file of `dir` in a loop and comparing with `want`, until
/// stopped.
pub struct Reader {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<ReaderReport>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    pub fn start(dir: &Path, want: BTreeMap<PathBuf, Vec<u8>>) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(ReaderReport::default()));
        let (s, r, dir) = (stop.clone(), report.clone(), dir.to_path_buf());
        let dirs: Vec<PathBuf> = {
            let mut d: Vec<PathBuf> = want
                .keys()
                .filter_map(|p| p.parent().map(Path::to_path_buf))
                .collect();
            d.sort();
            d.dedup();
            d
        };
        let handle = std::thread::spawn(move || {
            let mut buf = Vec::new();
            while !s.load(Ordering::SeqCst) {
                for d in &dirs {
                    let t = Instant::now();
                    let res = std::fs::read_dir(dir.join(d))
                        .and_then(|rd| rd.collect::<Result<Vec<_>, _>>());
                    let el = t.elapsed();
                    let mut rep = r.lock().unwrap();
                    rep.samples.push((t, el));
                    if let Err(e) = res {
                        rep.errors.push(format!("readdir {}: {e}", d.display()));
                    }
                }
                for (f, content) in &want {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    let t = Instant::now();
                    buf.clear();
                    let res =
                        std::fs::File::open(dir.join(f)).and_then(|mut h| h.read_to_end(&mut buf));
                    let el = t.elapsed();
                    let mut rep = r.lock().unwrap();
                    rep.reads += 1;
                    rep.samples.push((t, el));
                    match res {
                        Err(e) => rep.errors.push(format!("{}: {e}", f.display())),
                        Ok(_) if &buf != content => {
                            rep.errors.push(format!("{}: content differs", f.display()))
                        }
                        Ok(_) => {}
                    }
                }
                r.lock().unwrap().loops += 1;
            }
        });
        Reader {
            stop,
            report,
            handle: Some(handle),
        }
    }

    pub fn reads(&self) -> u64 {
        self.report.lock().unwrap().reads
    }

    /// Stops the reader and returns what it saw; None if it did not finish within
    /// `within` (stuck on the mount).
    pub fn finish(mut self, within: Duration) -> Option<ReaderReport> {
        self.stop.store(true, Ordering::SeqCst);
        let t = Instant::now();
        let h = self.handle.take().unwrap();
        while !h.is_finished() {
            if t.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        h.join().unwrap();
        Some(std::mem::take(&mut *self.report.lock().unwrap()))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Aborts `conn` through fusectl if the test has not finished within `after`: a stuck
/// test fails with ENOTCONN errors instead of hanging forever in D state.
pub struct Watchdog {
    done: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    pub fn new(conn: ConnId, after: Duration) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let (d, f) = (done.clone(), fired.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            while t.elapsed() < after {
                if d.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            f.store(true, Ordering::SeqCst);
            eprintln!("watchdog: aborting FUSE connection {conn} after {after:?}");
            if let Ok(ctl) = Fusectl::open() {
                let _ = ctl.abort(conn);
            }
        });
        Watchdog { done, fired }
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}
