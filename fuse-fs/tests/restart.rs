//! The daemon as a separate process (the crate's test daemon), its /dev/fuse fd held by
//! a keeper process: kill -9 and clean stops under a reader that loops over every file
//! through an overlay, passthrough opens across a restart, and the end after unmount.
//! Needs root and /dev/fuse (a failure under CI=true, else skipped).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use cstore_fuse_fs::{ConnId, FdStore, KeeperClient, EXIT_STOPPED};

/// Fields drop in this order: mounts first (nothing may walk into a mount whose daemon
/// is gone), then the keeper, then the directory.
struct Rig {
    mounts: Mounts,
    keeper: Proc,
    dir: tempfile::TempDir,
    name: String,
}

impl Rig {
    fn new(big: usize) -> Rig {
        let dir = tmpdir();
        make_layer(&dir.path().join("src"), big);
        make_lower(&dir.path().join("low"));
        std::fs::create_dir_all(dir.path().join("mnt")).unwrap();
        let sock = dir.path().join("keeper.sock");
        let keeper = Proc::spawn(testd().arg("keeper").arg(&sock));
        let t = Instant::now();
        while KeeperClient::new(&sock).list().is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "keeper did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Rig {
            dir,
            keeper,
            mounts: Mounts::default(),
            name: "L1".into(),
        }
    }

    fn p(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }

    fn keeper(&self) -> KeeperClient {
        KeeperClient::new(self.p("keeper.sock"))
    }

    /// Spawns a daemon (it resumes if the keeper holds the fd), writing its stats to
    /// `stats.N` if given `stats`.
    fn spawn_daemon(&self, stats: Option<usize>, args: &[&str]) -> Proc {
        let mut cmd = testd();
        cmd.arg("serve")
            .arg("--src")
            .arg(self.p("src"))
            .arg("--mnt")
            .arg(self.p("mnt"))
            .arg("--state")
            .arg(self.p("state"))
            .arg("--keeper")
            .arg(self.p("keeper.sock"))
            .arg("--name")
            .arg(&self.name);
        if let Some(n) = stats {
            cmd.arg("--stats").arg(self.p(&format!("stats.{n}")));
        }
        Proc::spawn(cmd.args(args))
    }

    /// Starts daemon `n` (its stats in `stats.n`) and waits until it serves.
    fn daemon(&self, n: usize, args: &[&str]) -> Proc {
        let mut d = self.spawn_daemon(Some(n), args);
        d.ready();
        d
    }

    fn conn(&self) -> ConnId {
        state_conn(&self.p("state"))
    }

    /// Registers the daemon's mount and its connection for cleanup; the connection.
    fn track_mount(&mut self) -> ConnId {
        // The mount first: it is unmounted even if reading the state fails.
        self.mounts.push(&self.p("mnt"));
        let conn = self.conn();
        self.mounts.conn(conn);
        conn
    }

    fn overlay(&mut self) -> PathBuf {
        mount_overlay(
            &format!("{}:{}", self.p("mnt").display(), self.p("low").display()),
            &self.p("up"),
            &self.p("work"),
            &self.p("ovl"),
        );
        let o = self.p("ovl");
        self.mounts.push(&o);
        o
    }

    /// Requests the daemons answered after a resend, summed over their stats files.
    fn resent(&self) -> u64 {
        (0..100)
            .filter_map(|n| std::fs::read_to_string(self.p(&format!("stats.{n}"))).ok())
            .filter_map(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("resent ")
                        .and_then(|v| v.parse::<u64>().ok())
                })
            })
            .sum()
    }
}

/// What the reader must see through the overlay: the layer's files over the lower's,
/// minus what the whiteout and the opaque dir hide.
fn expected(rig: &Rig) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut want = files_of(&rig.p("low"));
    want.remove(Path::new("gone"));
    want.remove(Path::new("opq/hidden"));
    want.extend(files_of(&rig.p("src")));
    want
}

/// Prints what the reader saw; the stall of a restart is the longest read in flight
/// between the end of the old daemon and the new one serving.
fn report(what: &str, r: &ReaderReport, windows: &[(Instant, Instant)]) {
    let mut s: Vec<Duration> = windows.iter().map(|(a, b)| r.stall(*a, *b)).collect();
    s.sort();
    eprintln!(
        "{what}: {} loops, {} file reads, {} errors; read latency p50 {:?} max {:?}; \
         stall per restart {:?}, p50 {:?} max {:?}",
        r.loops,
        r.reads,
        r.errors.len(),
        r.percentile(0.5),
        r.max(),
        s,
        s.get(s.len() / 2).copied().unwrap_or_default(),
        s.last().copied().unwrap_or_default()
    );
}

/// Runs `restarts` restarts of the daemon under the reader, each ending the running
/// daemon with `end` (which returns once it is gone). Returns the reader's report and
/// each restart's window: from just before the end to the new daemon serving.
fn restarts_under_reader(
    rig: &mut Rig,
    restarts: usize,
    args: &[&str],
    mut end: impl FnMut(&mut Proc),
) -> (ReaderReport, Vec<(Instant, Instant)>) {
    let mut d = rig.daemon(0, args);
    let conn = rig.track_mount();
    let dog = Watchdog::new(conn, Duration::from_secs(40));
    let ovl = rig.overlay();
    let want = expected(rig);
    let reader = Reader::start(&ovl, want);
    let wait_reads = |r: &Reader, n: u64| {
        let t = Instant::now();
        while r.reads() < n {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "reader made no progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_reads(&reader, 5);
    let mut downs = Vec::new();
    for i in 1..=restarts {
        std::thread::sleep(Duration::from_millis(300 + 97 * i as u64 % 300));
        let before = reader.reads();
        let t = Instant::now();
        end(&mut d);
        d = rig.daemon(i, args);
        downs.push((t, Instant::now()));
        // Progress after the restart: the reader is not stuck.
        wait_reads(&reader, before + 3);
    }
    std::thread::sleep(Duration::from_millis(300));
    let r = reader
        .finish(Duration::from_secs(20))
        .expect("reader stuck on the mount");
    assert!(!dog.fired(), "the watchdog had to abort the connection");
    drop(d);
    (r, downs)
}

/// Direct I/O, no caching, 20 ms per READ: every read reaches the daemon, and a kill
/// lands while one is being answered.
const SLOW_DIRECT: [&str; 8] = [
    "--mode",
    "direct",
    "--ttl",
    "0",
    "--delay-ms",
    "20",
    "--threads",
    "2",
];

#[test]
fn sigkill_and_resume_five_times_loses_no_read() {
    if !fuse_available("sigkill_and_resume_five_times_loses_no_read") {
        return;
    }
    let mut rig = Rig::new(1 << 16);
    let (r, downs) = restarts_under_reader(&mut rig, 5, &SLOW_DIRECT, |d| {
        d.signal(libc::SIGKILL);
        d.wait_exit(Duration::from_secs(5));
    });
    report("kill -9 x5", &r, &downs);
    assert!(r.errors.is_empty(), "reader errors: {:?}", r.errors);
    assert!(r.loops >= 1 && r.reads > 50, "reader did too little: {r:?}");
    assert!(
        rig.resent() >= 1,
        "no request was resent: the kills never hit a request in flight"
    );
}

#[test]
fn clean_stop_and_resume_loses_no_read() {
    if !fuse_available("clean_stop_and_resume_loses_no_read") {
        return;
    }
    let mut rig = Rig::new(1 << 16);
    let (r, downs) = restarts_under_reader(&mut rig, 3, &SLOW_DIRECT, |d| {
        d.signal(libc::SIGTERM);
        let st = d.wait_exit(Duration::from_secs(5));
        assert_eq!(
            st.code(),
            Some(EXIT_STOPPED),
            "a stopped daemon exits {EXIT_STOPPED}"
        );
    });
    report("SIGTERM x3", &r, &downs);
    assert!(r.errors.is_empty(), "reader errors: {:?}", r.errors);
    assert!(r.reads > 30, "reader did too little: {r:?}");
}

/// After unmount the daemon exits 0 by itself and the keeper drops the fd (its
/// connection reports POLLERR).
#[test]
fn unmount_ends_the_daemon_and_the_keeper_drops_the_fd() {
    if !fuse_available("unmount_ends_the_daemon_and_the_keeper_drops_the_fd") {
        return;
    }
    let mut rig = Rig::new(1 << 12);
    let mut d = rig.daemon(0, &[]);
    rig.track_mount();
    assert_eq!(rig.keeper().list().unwrap(), vec![rig.name.clone()]);
    assert_eq!(
        std::fs::read(rig.p("mnt/dir/sub/s1")).unwrap(),
        b"small 1\n"
    );
    // The keeper holds its copy: kill the daemon, resume, still served.
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(5));
    let mut d = rig.daemon(1, &[]);
    assert_eq!(
        std::fs::read(rig.p("mnt/dir/sub/s2")).unwrap(),
        b"small 2\n"
    );

    let mnt = rig.p("mnt");
    rig.mounts.umount(&mnt);
    let st = d.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "daemon after unmount: {st}");
    let wait_empty = |rig: &Rig| {
        let t = Instant::now();
        loop {
            let held = rig.keeper().list().unwrap();
            if held.is_empty() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "keeper still holds {held:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_empty(&rig);

    // Unmounted while no daemon runs (nobody sends DEL): the keeper sees the connection
    // end (POLLERR) and drops the fd by itself.
    let mut d = rig.daemon(2, &[]);
    rig.track_mount();
    assert_eq!(rig.keeper().list().unwrap(), vec![rig.name.clone()]);
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(5));
    rig.mounts.umount(&mnt);
    wait_empty(&rig);
    assert!(
        rig.keeper.child.try_wait().unwrap().is_none(),
        "the keeper must outlive it all"
    );
}

/// A file held open in passthrough across a kill -9 keeps reading with no daemon, and
/// opening it again after the resume works: the new daemon reuses the backing id from
/// the table on disk (a second backing file for an inode still open in passthrough is
/// refused by the kernel with EIO).
#[test]
fn passthrough_open_across_a_restart_reuses_the_backing_id() {
    if !fuse_available("passthrough_open_across_a_restart_reuses_the_backing_id") {
        return;
    }
    let mut rig = Rig::new(4 << 20);
    let args = ["--mode", "passthrough"];
    let mut d = rig.spawn_daemon(None, &args);
    if let Err(l) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.ready())) {
        let st = d.wait_exit(Duration::from_secs(5));
        if passthrough_missing(
            "passthrough_open_across_a_restart_reuses_the_backing_id",
            &format!("test daemon {st}"),
        ) {
            return;
        }
        std::panic::resume_unwind(l);
    }
    let conn = rig.track_mount();
    let _dog = Watchdog::new(conn, Duration::from_secs(30));
    let want = std::fs::read(rig.p("src/big")).unwrap();
    let mut held = std::fs::File::open(rig.p("mnt/big")).unwrap();
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(5));
    // No daemon: the held passthrough file reads anyway.
    let mut got = Vec::new();
    held.read_to_end(&mut got).unwrap();
    assert!(got == want, "read with no daemon differs");
    let _d = rig.daemon(1, &args);
    let again = std::fs::read(rig.p("mnt/big")).unwrap();
    assert!(again == want, "reopen after resume differs");
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(rig.p("mnt/big")).unwrap());
    let log = std::fs::read_to_string(rig.p("state/backing.log")).unwrap();
    let ids: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with(&format!("{ino} ")))
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "big got one backing id, kept across the restart: {log}"
    );
    drop(held);
}
