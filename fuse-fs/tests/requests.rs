//! What reaches the daemon, and how many of its workers each request wakes: directory
//! opens on an immutable tree, GETXATTR on a tree without xattrs, one worker per
//! request (and a slow request holds up no other). Each round trip to the daemon is a
//! wait for a CPU on a loaded node; these are what a walk over many small complete
//! files pays per file. Needs root and /dev/fuse (a failure under CI=true, else
//! skipped).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use cstore_fuse_fs::abi::{init, op};
use cstore_fuse_fs::{DirFs, Open, PassthroughMode, Session, SessionOptions, StateDir};
use cstore_os::testing::skip_or_fail;

fn serve(src: &Path, mnt: &Path, state: &Path, mounts: &mut Mounts) -> Session<DirFs> {
    std::fs::create_dir_all(mnt).unwrap();
    let fs = Arc::new(DirFs::load(src, Open::KeepCache).unwrap());
    let s = Session::start(
        fs,
        mnt,
        &StateDir::new(state).unwrap(),
        SessionOptions {
            passthrough: PassthroughMode::Off,
            ..SessionOptions::default()
        },
    )
    .unwrap();
    mounts.push(mnt);
    mounts.conn(s.conn().unwrap());
    s
}

/// A tree of directories and small files and nothing else: no xattrs anywhere.
fn plain_tree(src: &Path) {
    for d in 0..8 {
        let dir = src.join(format!("d{d}/sub"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..16 {
            std::fs::write(
                dir.join(format!("f{f}")),
                format!("file {d}/{f}\n").repeat(f + 1),
            )
            .unwrap();
        }
    }
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::copy("/usr/bin/true", src.join("bin/true")).unwrap();
}

/// On an immutable tree (long TTLs) the kernel opens directories itself: OPENDIR is
/// answered ENOSYS once (by the warm-up) and never sent again, nor RELEASEDIR, while
/// listings stay right and a second walk is served from the kernel's directory cache.
#[test]
fn directories_open_without_the_daemon_on_an_immutable_tree() {
    let test = "directories_open_without_the_daemon_on_an_immutable_tree";
    if !fuse_available(test) {
        return;
    }
    let t = tmpdir();
    let p = |s: &str| t.path().join(s);
    make_layer(&p("src"), 1 << 20);
    let mut mounts = Mounts::default();
    let s = serve(&p("src"), &p("mnt"), &p("state"), &mut mounts);
    if s.settings().init.unwrap().kernel_flags & init::NO_OPENDIR_SUPPORT == 0 {
        skip_or_fail(test, "the kernel does not take ENOSYS for OPENDIR");
        return;
    }
    let want = files_of(&p("src"));
    assert!(files_of(&p("mnt")) == want, "first walk");
    let listed = s.stats().count(op::READDIRPLUS);
    assert!(files_of(&p("mnt")) == want, "second walk");
    let st = s.stats();
    assert_eq!(st.count(op::OPENDIR), 1, "OPENDIR after the warm-up's");
    assert_eq!(st.count(op::RELEASEDIR), 0);
    assert!(listed > 0);
    assert_eq!(
        st.count(op::READDIRPLUS),
        listed,
        "the second walk listed directories through the daemon"
    );
    mounts.umount(&p("mnt"));
    s.wait().unwrap();
}

/// A tree without any xattr answers GETXATTR ENOSYS once: overlayfs stacked on it
/// (which asks for `trusted.overlay.metacopy` at every lower file's lookup, and for
/// the opaque marker at every directory's) and exec (`security.capability`) then send
/// no more, and a file's xattr reads as absent. A tree with xattrs still answers each.
#[test]
fn a_tree_without_xattrs_answers_getxattr_once() {
    if !fuse_available("a_tree_without_xattrs_answers_getxattr_once") {
        return;
    }
    let t = tmpdir();
    let p = |s: &str| t.path().join(s);
    plain_tree(&p("src"));
    make_lower(&p("low"));
    let mut mounts = Mounts::default();
    let s = serve(&p("src"), &p("mnt"), &p("state"), &mut mounts);
    mount_overlay(
        &format!("{}:{}", p("mnt").display(), p("low").display()),
        &p("up"),
        &p("work"),
        &p("ovl"),
    );
    mounts.push(&p("ovl"));
    let mut want = files_of(&p("src"));
    want.extend(files_of(&p("low")));
    assert!(files_of(&p("ovl")) == want, "the overlay's files");
    assert!(std::process::Command::new(p("ovl/bin/true"))
        .status()
        .unwrap()
        .success());
    let e = getxattr(&p("ovl/d1/sub/f1"), "user.note").unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)),
        "{e}"
    );
    assert!(listxattr(&p("mnt/d1/sub/f1")).is_empty());
    assert_eq!(
        s.stats().count(op::GETXATTR),
        1,
        "GETXATTRs for {} files through the overlay",
        want.len()
    );
    mounts.umount(&p("ovl"));
    mounts.umount(&p("mnt"));
    s.wait().unwrap();

    // With xattrs: every getxattr is answered, with the value.
    make_layer(&p("src2"), 1 << 16);
    let s = serve(&p("src2"), &p("mnt2"), &p("state2"), &mut mounts);
    for _ in 0..5 {
        assert_eq!(getxattr(&p("mnt2/dir/f3"), "user.note").unwrap(), b"hello");
    }
    assert!(s.stats().count(op::GETXATTR) >= 5);
    mounts.umount(&p("mnt2"));
    s.wait().unwrap();
}

/// Voluntary context switches of the daemon's FUSE workers (`fuse-N` threads).
fn worker_switches(pid: i32) -> u64 {
    let mut n = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if !comm.starts_with("fuse-") {
            continue;
        }
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        n += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    n
}

/// With 4 workers, a request wakes one of them, not all four (a poll() on the shared
/// fd woke every worker for every request); and a request a worker is stuck on (a slow
/// READ) holds up no other: an idle worker takes the next one.
#[test]
fn a_request_wakes_one_worker_and_a_slow_one_holds_up_no_other() {
    if !fuse_available("a_request_wakes_one_worker_and_a_slow_one_holds_up_no_other") {
        return;
    }
    let t = tmpdir();
    let p = |s: &str| t.path().join(s);
    make_layer(&p("src"), 1 << 16);
    std::fs::create_dir_all(p("mnt")).unwrap();
    let mut mounts = Mounts::default();
    let mut d = Proc::spawn(
        testd()
            .arg("serve")
            .arg("--src")
            .arg(p("src"))
            .arg("--mnt")
            .arg(p("mnt"))
            .arg("--state")
            .arg(p("state"))
            .args(["--mode", "keep", "--threads", "4", "--delay-ms", "1500"]),
    );
    d.ready();
    mounts.push(&p("mnt"));
    let conn = state_conn(&p("state"));
    mounts.conn(conn);

    // GETXATTR is never cached by the kernel: each call is one request.
    const N: u64 = 2000;
    let f3 = p("mnt/dir/f3");
    assert_eq!(getxattr(&f3, "user.note").unwrap(), b"hello");
    let before = worker_switches(d.pid());
    for _ in 0..N {
        getxattr(&f3, "user.note").unwrap();
    }
    let per_request = (worker_switches(d.pid()) - before) as f64 / N as f64;
    assert!(
        per_request < 2.0,
        "{per_request:.2} worker wake-ups per request (4 workers)"
    );

    // A READ the daemon holds for 1.5 s; meanwhile other requests are answered.
    let f5 = p("mnt/dir/f5");
    let reader = std::thread::spawn(move || {
        let t = Instant::now();
        std::fs::read(&f5).unwrap();
        t.elapsed()
    });
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    for _ in 0..20 {
        assert_eq!(getxattr(&f3, "user.note").unwrap(), b"hello");
    }
    let others = t0.elapsed();
    assert!(!reader.is_finished(), "the slow READ was not slow");
    assert!(
        others < Duration::from_millis(700),
        "20 GETXATTRs took {others:?} beside a slow READ"
    );
    assert!(reader.join().unwrap() >= Duration::from_millis(1400));

    mounts.umount(&p("mnt"));
    assert!(d.wait_exit(Duration::from_secs(10)).success());
}
