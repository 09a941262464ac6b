//! #15 through the CLI: the store's lazy daemon (`cstore lazy-serve`) dies or
//! is stopped under a reader, and its keeper (`cstore lazy-keeper`) restarts
//! it; the new daemon takes the kept FUSE connections back and resumes. A
//! registry that goes away mid-read fails reads of missing spans with EIO in
//! bounded time, and they succeed once it is back.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::tree::{tree_diff, treesnap, umoci_tree, MountDir};
use crate::harness::{Cstore, FaultProxy, Registry};
use crate::lazy::{index_ls, indexed_behind_a_proxy, lazy_snapshots, registry_with_debian};

/// Keeps the store's lazy log for a look after a failure; the harness's
/// store teardown stops the keeper and daemon and unmounts what they left.
struct Cleanup<'a>(&'a Cstore);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = std::fs::copy(
            self.0.path().join("lazy/daemon.log"),
            std::env::temp_dir().join("cstore-lazy-restart-last.log"),
        );
    }
}

pub(crate) fn read_pid(cs: &Cstore, file: &str) -> Option<i32> {
    std::fs::read_to_string(cs.path().join("lazy").join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The last lines of the keeper's and daemon's log, for failure messages.
pub(crate) fn daemon_log(cs: &Cstore) -> String {
    let text = std::fs::read_to_string(cs.path().join("lazy/daemon.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .iter()
        .filter(|l| !l.contains("request failed; retrying"))
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
}

pub(crate) fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Every regular file under `root` (not following symlinks).
fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                dirs.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// What a reader looping over every file saw.
#[derive(Default)]
struct Seen {
    loops: usize,
    errors: Vec<String>,
    /// (start, latency) of each file read.
    reads: Vec<(Instant, Duration)>,
}

impl Seen {
    fn percentile(&self, p: f64) -> Duration {
        let mut l: Vec<Duration> = self.reads.iter().map(|r| r.1).collect();
        l.sort();
        l.get(((l.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or_default()
    }
    /// The longest read in flight during `[a, b]` (a daemon restart).
    fn stall(&self, a: Instant, b: Instant) -> Duration {
        self.reads
            .iter()
            .filter(|(s, l)| *s <= b && *s + *l >= a)
            .map(|r| r.1)
            .max()
            .unwrap_or_default()
    }
}

/// Reads every file of `files` in a loop until `stop`, then finishes the loop.
fn reader(files: Vec<PathBuf>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        loop {
            let stopping = stop.load(Ordering::SeqCst);
            for f in &files {
                let t = Instant::now();
                let r = std::fs::read(f);
                seen.reads.push((t, t.elapsed()));
                if let Err(e) = r {
                    seen.errors.push(format!("{}: {e}", f.display()));
                }
            }
            seen.loops += 1;
            if stopping {
                return seen;
            }
        }
    })
}

/// Bytes of `digest` asked for more than once (ranges overlapping another
/// request, answered or not), and in all, from the proxy's log.
fn fetch_accounting(proxy: &FaultProxy, digest: &str) -> (u64, u64) {
    let mut ranges: Vec<(u64, u64)> = proxy
        .ranges_of(digest)
        .into_iter()
        .map(|r| (r.start, r.end))
        .collect();
    let total = ranges.iter().map(|r| r.1 - r.0).sum();
    ranges.sort();
    let (mut covered, mut end) = (0u64, 0u64);
    for (a, b) in ranges {
        let a = a.max(end);
        if b > a {
            covered += b - a;
            end = b;
        }
    }
    (total - covered, total)
}

/// Waits until the store's daemon pid is `pid`'s successor, alive.
pub(crate) fn wait_restarted(cs: &Cstore, old: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(p) = read_pid(cs, "daemon.pid") {
            if p != old && alive(p) {
                return p;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the keeper did not restart the lazy daemon; its log:\n{}",
            daemon_log(cs)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The layer of `image` with the most bytes, and its size.
fn biggest_layer(cs: &Cstore, image: &str) -> (String, u64) {
    index_ls(cs, image)
        .iter()
        .map(|l| {
            (
                l["layer"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .max_by_key(|l| l.1)
        .unwrap()
}

/// A Debian image pulled lazily into a second store through a throttling
/// proxy (its index pushed from the first), mounted with `mount --lazy`;
/// the daemon is stopped with `signal` five times while a reader loops over
/// every file. The keeper restarts it each time; the reader sees no error,
/// the tree equals umoci's, the layer completes, and what was fetched before
/// a restart is not fetched again (only spans in flight when the daemon
/// died may be).
fn restarts_under_a_reader(signal: i32, what: &str) {
    let reg = registry_with_debian();
    let (proxy, _direct, image) = indexed_behind_a_proxy(&reg, "debian:bookworm");
    let b = Cstore::new();
    let _cleanup = Cleanup(&b);
    b.ok(&["pull", "--lazy", &image]);
    let (layer, size) = biggest_layer(&b, &image);
    // Slow enough that completion outlasts the restarts.
    proxy.set(serde_json::json!([{"match": layer.as_str(), "action": "slow", "bps": 2_000_000}]));
    let mnt = MountDir::new();
    b.ok(&["mount", "--lazy", &image, mnt.s()]);
    let keeper = read_pid(&b, "keeper.pid").expect("a keeper runs");
    assert!(alive(keeper));

    let stop = Arc::new(AtomicBool::new(false));
    let files = files_under(mnt.path());
    assert!(files.len() > 1000, "{} files", files.len());
    let r = reader(files, stop.clone());
    let mut pid = read_pid(&b, "daemon.pid").expect("a daemon runs");
    let restart = |pid: &mut i32| {
        let t = Instant::now();
        // SAFETY: the store's daemon, by its pid file.
        assert_eq!(unsafe { libc::kill(*pid, signal) }, 0);
        *pid = wait_restarted(&b, *pid);
        assert!(alive(keeper), "the keeper outlives its daemon");
        (t, Instant::now())
    };
    // Phase 1: restarts while the layer is fetched (spans in flight).
    let mut fetching = Vec::new();
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            lazy_snapshots(&b),
            1,
            "restart {i}: the layer is still lazy"
        );
        fetching.push(restart(&mut pid));
    }
    // Full speed for the rest: the layer completes (it stays mounted, in use).
    // (No rules, the log kept: `clear` would drop it.)
    proxy.set(serde_json::json!([]));
    let deadline = Instant::now() + Duration::from_secs(240);
    while lazy_snapshots(&b) > 0 {
        assert!(
            Instant::now() < deadline,
            "{what}: completion did not end; log:\n{}",
            daemon_log(&b)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (again, total) = fetch_accounting(&proxy, &layer);
    // Phase 2: the registry gone, restarts of a daemon serving only local
    // data: what a reader waits for is the restart itself.
    proxy.set(serde_json::json!([{"match": "/v2/", "action": "close"}]));
    std::thread::sleep(Duration::from_millis(1000));
    let phase2 = Instant::now();
    let mut local = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1000));
        local.push(restart(&mut pid));
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::SeqCst);
    let seen = r.join().unwrap();
    let stalls = |w: &[(Instant, Instant)]| -> Vec<Duration> {
        w.iter().map(|(a, b)| seen.stall(*a, *b)).collect()
    };
    let back =
        |w: &[(Instant, Instant)]| -> Vec<Duration> { w.iter().map(|(a, b)| *b - *a).collect() };
    let late = Seen {
        reads: seen
            .reads
            .iter()
            .filter(|r| r.0 >= phase2)
            .copied()
            .collect(),
        ..Seen::default()
    };
    eprintln!(
        "{what}: {} loops, {} file reads, {} errors; read latency p50 {:?} p99 {:?} max {:?}\n\
         {what}: while fetching (2 MB/s): new daemon's pid after {:?}; longest read across each restart {:?}\n\
         {what}: all local, registry gone: {} reads, latency p50 {:?} max {:?}; new daemon's pid after {:?}; longest read across each restart {:?}",
        seen.loops,
        seen.reads.len(),
        seen.errors.len(),
        seen.percentile(0.5),
        seen.percentile(0.99),
        seen.percentile(1.0),
        back(&fetching),
        stalls(&fetching),
        late.reads.len(),
        late.percentile(0.5),
        late.percentile(1.0),
        back(&local),
        stalls(&local),
    );
    assert!(
        seen.errors.is_empty(),
        "{what}: the reader saw errors: {:?}\nlog:\n{}",
        &seen.errors[..seen.errors.len().min(10)],
        daemon_log(&b)
    );
    assert!(late.reads.len() > 100, "the reader went on reading");
    let got = treesnap(mnt.path());
    let want = umoci_tree("debian");
    assert!(
        got == want,
        "{what}: the lazy mount differs from umoci unpack:\n{}",
        tree_diff(&want, &got, "umoci: ", "lazy:  ")
    );
    eprintln!("{what}: asked for {total} bytes of the {size}-byte layer, {again} of them again");
    // A daemon that dies loses only the requests in flight: 4 fetchers, each
    // request at most 4 MiB of coalesced spans (plus the one that crosses it).
    // Spans recorded before a restart are not fetched again (phase 2 shows it
    // too: with the registry gone, nothing read failed).
    let bound = 5 * 4 * ((4 << 20) + (1 << 20));
    assert!(
        again <= bound,
        "{what}: {again} bytes fetched again (bound {bound})"
    );
    proxy.clear();
    b.ok(&["umount", mnt.s()]);
    // The daemon lets go of the completed layer, then it and its keeper exit.
    let deadline = Instant::now() + Duration::from_secs(60);
    while alive(keeper) || read_pid(&b, "daemon.pid").is_some_and(alive) {
        assert!(Instant::now() < deadline, "{what}: the keeper stayed");
        std::thread::sleep(Duration::from_millis(200));
    }
    b.assert_nothing_mounted();
    b.assert_blobs_verified();
}

#[test]
fn kill_9_five_times_under_a_reader_no_errors_and_the_layer_completes() {
    restarts_under_a_reader(libc::SIGKILL, "kill -9");
}

#[test]
fn sigterm_five_times_under_a_reader_no_errors_and_the_layer_completes() {
    restarts_under_a_reader(libc::SIGTERM, "SIGTERM");
}

/// The registry goes away (every request to it fails: connections closed
/// unanswered) while a lazy layer is mounted and nothing of it is local: a
/// read fails with EIO within bounded time (no hang), and once the registry
/// is back the same read succeeds with the right bytes.
#[test]
fn registry_gone_mid_read_gives_eio_in_bounded_time_then_reads_again() {
    let (_reg, proxy, direct, image) = indexed_busybox_behind_a_proxy();
    let b = Cstore::new();
    let _cleanup = Cleanup(&b);
    b.ok(&["pull", "--lazy", &image]);
    // Gone before the mount: background completion cannot fetch anything either.
    proxy.set(serde_json::json!([{"match": "/v2/", "action": "close"}]));
    let mnt = MountDir::new();
    b.ok(&["mount", "--lazy", &image, mnt.s()]);
    let busybox = mnt.path().join("bin/busybox");
    let len = std::fs::metadata(&busybox).unwrap().len();
    let t = Instant::now();
    let e = std::fs::read(&busybox).unwrap_err();
    let took = t.elapsed();
    eprintln!("registry gone: the read failed after {took:?}: {e}");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(took < Duration::from_secs(60), "bounded: {took:?}");
    assert!(
        proxy.log().iter().any(|e| e["fault"] == "close"),
        "the read did try the registry"
    );
    proxy.clear();
    let bytes = std::fs::read(&busybox).expect("reads once the registry is back");
    assert_eq!(bytes.len() as u64, len);
    let plain = Cstore::new();
    plain.ok(&["pull", &direct]);
    let pm = MountDir::new();
    plain.ok(&["mount", &direct, pm.s()]);
    let want = std::fs::read(pm.path().join("bin/busybox")).unwrap();
    plain.ok(&["umount", pm.s()]);
    assert!(bytes == want, "the bytes read equal a plain pull's");
    b.ok(&["umount", mnt.s()]);
}

/// The test registry with busybox, its index built and pushed from another
/// store, and a fault proxy in front: (registry, proxy, the image direct,
/// the image through the proxy).
fn indexed_busybox_behind_a_proxy() -> (Registry, FaultProxy, String, String) {
    let reg = Registry::start(&[]);
    reg.push(None);
    let (proxy, direct, image) = indexed_behind_a_proxy(&reg, "busybox:latest");
    (reg, proxy, direct, image)
}

/// A daemon that keeps dying: after the tenth death within a minute the
/// keeper aborts the kept connections and exits; a reader then gets ENOTCONN
/// at once instead of waiting for a daemon that never comes, and the mount
/// can be taken down.
#[test]
fn a_daemon_that_keeps_dying_ends_in_enotconn_not_a_hang() {
    let (_reg, proxy, _direct, image) = indexed_busybox_behind_a_proxy();
    let b = Cstore::new();
    let _cleanup = Cleanup(&b);
    b.ok(&["pull", "--lazy", &image]);
    // Nothing local ever: every read needs the daemon.
    proxy.set(serde_json::json!([{"match": "/v2/", "action": "close"}]));
    let mnt = MountDir::new();
    b.ok(&["mount", "--lazy", &image, mnt.s()]);
    let keeper = read_pid(&b, "keeper.pid").expect("a keeper runs");
    let mut pid = read_pid(&b, "daemon.pid").expect("a daemon runs");
    for i in 0..10 {
        // SAFETY: the store's daemon, by its pid file.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {i}");
        if i < 9 {
            pid = wait_restarted(&b, pid);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(keeper) {
        assert!(
            Instant::now() < deadline,
            "the keeper did not give up; log:\n{}",
            daemon_log(&b)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        daemon_log(&b).contains("aborting its FUSE connections"),
        "{}",
        daemon_log(&b)
    );
    let t = Instant::now();
    let e = std::fs::read(mnt.path().join("bin/busybox")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    b.ok(&["umount", mnt.s()]);
}
