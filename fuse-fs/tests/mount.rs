//! Sessions served in the test process on the real kernel: the tree as presented,
//! overlayfs stacked on it, passthrough, stop/resume in process, and the supervisor's
//! abort. Needs root and /dev/fuse (a failure under CI=true, else skipped).

mod common;

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use cstore_fuse_fs::abi::op;
use cstore_fuse_fs::{
    DirFs, Error, Exit, Open, PassthroughMode, RestartPolicy, Session, SessionOptions, StateDir,
    Supervised,
};

fn opts(passthrough: PassthroughMode) -> SessionOptions {
    SessionOptions {
        passthrough,
        ..SessionOptions::default()
    }
}

fn start(
    src: &Path,
    mnt: &Path,
    state: &Path,
    mode: Open,
    o: SessionOptions,
) -> Result<Session<DirFs>, Error> {
    std::fs::create_dir_all(mnt).unwrap();
    let fs = Arc::new(DirFs::load(src, mode).unwrap());
    Session::start(fs, mnt, &StateDir::new(state).unwrap(), o)
}

/// Every entry's type, mode, owner, size, link count, device number, link target,
/// xattrs and content, seen through the mount, equal the source's; hardlinks share an
/// inode; a missing name is ENOENT; a binary runs from it; FLUSH was asked once.
#[test]
fn tree_through_fuse_is_the_source_tree() {
    if !fuse_available() {
        return;
    }
    let t = tmpdir();
    let (src, mnt) = (t.path().join("src"), t.path().join("mnt"));
    make_layer(&src, 1 << 20);
    let mut mounts = Mounts::default();
    let s = start(
        &src,
        &mnt,
        &t.path().join("state"),
        Open::KeepCache,
        opts(PassthroughMode::Off),
    )
    .unwrap();
    mounts.push(&mnt);
    mounts.conn(s.conn().unwrap());

    let names = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    for dir in ["", "dir", "dir/sub", "opq", "bin"] {
        assert_eq!(
            names(&mnt.join(dir)),
            names(&src.join(dir)),
            "listing of /{dir}"
        );
    }
    for (rel, want) in files_of(&src) {
        let (a, b) = (
            std::fs::symlink_metadata(src.join(&rel)).unwrap(),
            std::fs::symlink_metadata(mnt.join(&rel)).unwrap(),
        );
        assert_eq!(
            (
                a.mode(),
                a.uid(),
                a.gid(),
                a.len(),
                a.nlink(),
                a.mtime(),
                a.mtime_nsec()
            ),
            (
                b.mode(),
                b.uid(),
                b.gid(),
                b.len(),
                b.nlink(),
                b.mtime(),
                b.mtime_nsec()
            ),
            "{}",
            rel.display()
        );
        assert_eq!(
            std::fs::read(mnt.join(&rel)).unwrap(),
            want,
            "{}",
            rel.display()
        );
    }
    let owned = std::fs::symlink_metadata(mnt.join("dir/owned")).unwrap();
    assert_eq!(
        (owned.mode() & 0o7777, owned.uid(), owned.gid()),
        (0o4750, 1234, 5678)
    );
    let gone = std::fs::symlink_metadata(mnt.join("gone")).unwrap();
    assert!(
        gone.file_type().is_char_device() && gone.rdev() == 0,
        "whiteout: {gone:?}"
    );
    assert_eq!(
        std::fs::read_link(mnt.join("link")).unwrap(),
        Path::new("dir/f1")
    );
    assert_eq!(
        std::fs::read(mnt.join("link")).unwrap(),
        std::fs::read(src.join("dir/f1")).unwrap()
    );
    let (h1, h2) = (
        std::fs::metadata(mnt.join("hard")).unwrap(),
        std::fs::metadata(mnt.join("dir/f2")).unwrap(),
    );
    assert_eq!((h1.ino(), h1.nlink()), (h2.ino(), 2));
    assert_eq!(
        getxattr(&mnt.join("opq"), "trusted.overlay.opaque").unwrap(),
        b"y"
    );
    assert_eq!(
        getxattr(&mnt.join("dir/f3"), "user.note").unwrap(),
        b"hello"
    );
    assert_eq!(
        listxattr(&mnt.join("dir/f3")),
        vec!["user.note".to_string()]
    );
    assert_eq!(
        getxattr(&mnt.join("dir/f4"), "user.none")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENODATA)
    );
    assert_eq!(
        std::fs::metadata(mnt.join("nope"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_eq!(
        std::fs::write(mnt.join("dir/f1"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    let st = std::process::Command::new(mnt.join("bin/true"))
        .status()
        .unwrap();
    assert!(st.success(), "exec through FUSE: {st}");
    // ls -la: readdirplus with . and ..
    let out = std::process::Command::new("ls")
        .arg("-la")
        .arg(&mnt)
        .output()
        .unwrap();
    let ls = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && ls.contains(" .\n") && ls.contains(" ..\n"),
        "{ls}"
    );
    let stats = s.stats();
    assert_eq!(
        stats.count(op::FLUSH),
        1,
        "FLUSH is answered ENOSYS once, at the warm-up"
    );
    assert!(stats.count(op::READDIRPLUS) > 0 && stats.count(op::READ) > 0);

    mounts.umount(&mnt);
    assert_eq!(s.wait().unwrap(), Exit::Unmounted);
}

/// overlayfs with the FUSE mount as a lower layer: the whiteout hides `gone` and the
/// opaque dir hides `opq/hidden` of the layer below, as an unpacked layer would; the
/// rest reads through; a binary runs; a write copies up.
#[test]
fn overlay_on_fuse_hides_what_whiteouts_and_opaque_dirs_hide() {
    if !fuse_available() {
        return;
    }
    let t = tmpdir();
    let p = |s: &str| t.path().join(s);
    make_layer(&p("src"), 1 << 20);
    make_lower(&p("low"));
    let mut mounts = Mounts::default();
    let s = start(
        &p("src"),
        &p("mnt"),
        &p("state"),
        Open::KeepCache,
        opts(PassthroughMode::Off),
    )
    .unwrap();
    mounts.push(&p("mnt"));
    mounts.conn(s.conn().unwrap());
    mount_overlay(
        &format!("{}:{}", p("mnt").display(), p("low").display()),
        &p("up"),
        &p("work"),
        &p("ovl"),
    );
    mounts.push(&p("ovl"));
    let ovl = p("ovl");

    assert!(
        !ovl.join("gone").exists(),
        "whiteout from FUSE must hide the lower's file"
    );
    assert!(
        !ovl.join("opq/hidden").exists(),
        "opaque dir from FUSE must hide the lower's entries"
    );
    assert_eq!(std::fs::read(ovl.join("opq/new")).unwrap(), b"inside opq\n");
    assert_eq!(std::fs::read(ovl.join("base.txt")).unwrap(), b"base\n");
    let mut names: Vec<_> = std::fs::read_dir(&ovl)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["base.txt", "big", "bin", "dir", "empty", "hard", "link", "opq"]
            .map(std::ffi::OsString::from),
    );
    for (rel, want) in files_of(&p("src")) {
        assert_eq!(
            std::fs::read(ovl.join(&rel)).unwrap(),
            want,
            "{}",
            rel.display()
        );
    }
    assert!(std::process::Command::new(ovl.join("bin/true"))
        .status()
        .unwrap()
        .success());
    // Copy-up from the FUSE lower.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(ovl.join("dir/f5"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"appended").unwrap();
    drop(f);
    let mut want = std::fs::read(p("src/dir/f5")).unwrap();
    want.extend_from_slice(b"appended");
    assert_eq!(std::fs::read(p("up/dir/f5")).unwrap(), want);

    mounts.umount(&ovl);
    mounts.umount(&p("mnt"));
    assert_eq!(s.wait().unwrap(), Exit::Unmounted);
}

/// Passthrough: reading a file twice (directly, through an overlay, and exec'ing one)
/// sends the daemon no READ at all, while the same reads on a page-cache mount do; one
/// backing id per file, reused by later opens.
#[test]
fn passthrough_reads_never_reach_the_daemon() {
    if !fuse_available() {
        return;
    }
    let t = tmpdir();
    let p = |s: &str| t.path().join(s);
    make_layer(&p("src"), 8 << 20);
    make_lower(&p("low"));
    let mut mounts = Mounts::default();
    let pt = match start(
        &p("src"),
        &p("pt"),
        &p("st-pt"),
        Open::Passthrough,
        opts(PassthroughMode::Required),
    ) {
        Ok(s) => s,
        Err(e @ Error::NoPassthrough(_)) => {
            if passthrough_missing(&e.to_string()) {
                return;
            }
            unreachable!()
        }
        Err(e) => panic!("{e}"),
    };
    mounts.push(&p("pt"));
    mounts.conn(pt.conn().unwrap());
    assert!(pt.passthrough() && pt.settings().init.unwrap().max_stack_depth == 1);
    // 1 MiB of bdi readahead: the kernel then asks 1 MiB per READ (max_pages 256).
    let cached = start(
        &p("src"),
        &p("pc"),
        &p("st-pc"),
        Open::KeepCache,
        SessionOptions {
            read_ahead_kb: Some(1024),
            ..opts(PassthroughMode::Off)
        },
    )
    .unwrap();
    assert_eq!(cached.conn().unwrap().read_ahead_kb().unwrap(), 1024);
    mounts.push(&p("pc"));
    mounts.conn(cached.conn().unwrap());

    let want = std::fs::read(p("src/big")).unwrap();
    let read_twice = |m: &Path| {
        for _ in 0..2 {
            let mut f = std::fs::File::open(m.join("big")).unwrap();
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            assert!(b == want, "content of big through {}", m.display());
        }
    };
    read_twice(&p("pt"));
    read_twice(&p("pc"));
    mount_overlay(
        &format!("{}:{}", p("pt").display(), p("low").display()),
        &p("up"),
        &p("work"),
        &p("ovl"),
    );
    mounts.push(&p("ovl"));
    read_twice(&p("ovl"));
    assert!(std::process::Command::new(p("ovl/bin/true"))
        .status()
        .unwrap()
        .success());
    assert!(std::process::Command::new(p("pt/bin/true"))
        .status()
        .unwrap()
        .success());

    assert_eq!(
        pt.stats().count(op::READ),
        0,
        "passthrough reads reached the daemon"
    );
    // 8 MiB read twice, the second time from the page cache: ~8 READs of 1 MiB (32 of
    // 256 KiB with the default readahead).
    let reads = cached.stats().count(op::READ);
    assert!(
        (1..=12).contains(&reads),
        "READs on the page-cache mount: {reads}"
    );
    let ids = pt.backing_ids();
    let big_ino = std::fs::metadata(p("pt/big")).unwrap().ino();
    assert!(ids.contains_key(&big_ino), "backing ids {ids:?}");
    assert!(pt.stats().count(op::OPEN) >= 4);
    // The table on disk has each node once: later opens reused the id.
    let log = std::fs::read_to_string(p("st-pt/backing.log")).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.starts_with(&format!("{big_ino} ")))
            .count(),
        1,
        "{log}"
    );

    mounts.umount(&p("ovl"));
    mounts.umount(&p("pc"));
    mounts.umount(&p("pt"));
    assert_eq!(pt.wait().unwrap(), Exit::Unmounted);
    assert_eq!(cached.wait().unwrap(), Exit::Unmounted);
}

/// A stopped session leaves the connection alive with its fd: `fstat()` (std's statx,
/// asking for btime) and `close()` of an open file need no daemon (the warm-up taught
/// the kernel STATX and FLUSH are ENOSYS, and attributes are cached), a request made
/// meanwhile waits, and a session resumed on the fd (no INIT) answers it.
#[test]
fn stop_and_resume_in_process_without_init() {
    if !fuse_available() {
        return;
    }
    let t = tmpdir();
    let p = |s: &str| t.path().join(s);
    make_layer(&p("src"), 1 << 16);
    let mut mounts = Mounts::default();
    let s = start(
        &p("src"),
        &p("mnt"),
        &p("state"),
        Open::KeepCache,
        opts(PassthroughMode::Off),
    )
    .unwrap();
    mounts.push(&p("mnt"));
    let conn = s.conn().unwrap();
    mounts.conn(conn);
    let _dog = Watchdog::new(conn, Duration::from_secs(30));
    let mut f = std::fs::File::open(p("mnt/dir/f7")).unwrap();
    // Plain reads, no fstat: only the warm-up may have taught the kernel about STATX.
    let mut b = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = f.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        b.extend_from_slice(&chunk[..n]);
    }
    let settings = s.settings().clone();

    let (exit, fd) = s.stop().unwrap();
    assert_eq!(exit, Exit::Stopped);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let m = f.metadata().map(|m| m.len());
        tx.send(m).unwrap();
        drop(f);
        tx.send(Ok(0)).unwrap();
    });
    let len = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("fstat blocked with no daemon: STATX was not disabled");
    assert_eq!(len.unwrap(), b.len() as u64);
    rx.recv_timeout(Duration::from_secs(5))
        .expect("close() blocked with no daemon: FLUSH was not disabled")
        .unwrap();
    // A request with no daemon: waits (it is not refused).
    let (tx, rx) = mpsc::channel();
    let target = p("mnt/dir/sub/s4");
    std::thread::spawn(move || tx.send(std::fs::read(target)).unwrap());
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a request was answered with no daemon"
    );

    let fs = Arc::new(DirFs::load(&p("src"), Open::KeepCache).unwrap());
    let r = Session::resume(
        fs,
        fd,
        &StateDir::new(p("state")).unwrap(),
        opts(PassthroughMode::Off),
    )
    .unwrap();
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the waiting read was never answered");
    assert_eq!(got.unwrap(), b"small 4\n");
    assert_eq!(
        r.settings(),
        &settings,
        "resumed with the recorded settings"
    );
    assert_eq!(r.stats().count(op::INIT), 0);
    assert_eq!(std::fs::read(p("mnt/dir/f7")).unwrap(), b);

    mounts.umount(&p("mnt"));
    assert_eq!(r.wait().unwrap(), Exit::Unmounted);
}

/// With no daemon able to serve (each attempt fails at once), the supervisor aborts the
/// connection after K failures: readers get ENOTCONN instead of hanging.
#[test]
fn supervisor_aborts_the_connection_after_repeated_failures() {
    if !fuse_available() {
        return;
    }
    let t = tmpdir();
    let p = |s: &str| t.path().join(s);
    make_layer(&p("src"), 1 << 12);
    let mut mounts = Mounts::default();
    let s = start(
        &p("src"),
        &p("mnt"),
        &p("state"),
        Open::KeepCache,
        opts(PassthroughMode::Off),
    )
    .unwrap();
    mounts.push(&p("mnt"));
    let conn = s.conn().unwrap();
    mounts.conn(conn);
    let (_, fd) = s.stop().unwrap();
    let mut spawned = 0;
    let r = cstore_fuse_fs::supervise(
        || {
            spawned += 1;
            std::process::Command::new("false").spawn()
        },
        conn,
        RestartPolicy {
            max_failures: 3,
            window: Duration::from_secs(60),
        },
    )
    .unwrap();
    assert!(matches!(r, Supervised::Aborted { .. }), "{r:?}");
    assert_eq!(spawned, 3);
    let e = std::fs::read(p("mnt/dir/f1")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    drop(fd);
    mounts.umount(&p("mnt"));
}

/// A backing file the kernel refuses (on overlayfs: passthrough's stacking limit makes
/// BACKING_OPEN fail ELOOP) is not an open error: the file is served by the daemon.
#[test]
fn passthrough_falls_back_to_the_daemon_when_backing_open_fails() {
    if !fuse_available() {
        return;
    }
    let t = tmpdir();
    let p = |s: &str| t.path().join(s);
    make_layer(&p("src"), 1 << 20);
    let mut mounts = Mounts::default();
    // The content source is an overlay mount: its files cannot back passthrough.
    mount_overlay(
        &p("src").display().to_string(),
        &p("srcup"),
        &p("srcwork"),
        &p("srcovl"),
    );
    mounts.push(&p("srcovl"));
    let s = match start(
        &p("srcovl"),
        &p("mnt"),
        &p("state"),
        Open::Passthrough,
        opts(PassthroughMode::Required),
    ) {
        Ok(s) => s,
        Err(e @ Error::NoPassthrough(_)) => {
            if passthrough_missing(&e.to_string()) {
                return;
            }
            unreachable!()
        }
        Err(e) => panic!("{e}"),
    };
    mounts.push(&p("mnt"));
    mounts.conn(s.conn().unwrap());
    assert_eq!(
        std::fs::read(p("mnt/big")).unwrap(),
        std::fs::read(p("src/big")).unwrap()
    );
    assert!(
        s.stats().count(op::READ) > 0,
        "the fallback is served by the daemon"
    );
    assert!(s.backing_ids().is_empty(), "no backing id was registered");
    mounts.umount(&p("mnt"));
    assert_eq!(s.wait().unwrap(), Exit::Unmounted);
    mounts.umount(&p("srcovl"));
}

/// A daemon that died after mount, having read INIT but not answered it: the next one
/// finds no INIT result in the state, has the kernel resend the INIT and answers it.
#[test]
fn resume_handshakes_when_the_first_daemon_died_before_init() {
    if !fuse_available() {
        return;
    }
    let t = tmpdir();
    let p = |s: &str| t.path().join(s);
    make_layer(&p("src"), 1 << 12);
    std::fs::create_dir_all(p("mnt")).unwrap();
    let mut mounts = Mounts::default();
    let dev =
        cstore_fuse_fs::dev::mount(&p("mnt"), &cstore_fuse_fs::MountOptions::default()).unwrap();
    mounts.push(&p("mnt"));
    let conn = dev.conn().unwrap();
    mounts.conn(conn);
    let _dog = Watchdog::new(conn, Duration::from_secs(30));
    let state = StateDir::new(p("state")).unwrap();
    state
        .save_settings(&cstore_fuse_fs::Settings {
            version: cstore_fuse_fs::state::STATE_VERSION,
            mountpoint: p("mnt"),
            conn: Some(conn),
            daemon: "died before INIT".into(),
            init: None,
        })
        .unwrap();
    // The first daemon reads INIT and dies before answering.
    let mut buf = vec![0u8; 64 * 1024];
    let n = match dev.read_request(&mut buf).unwrap() {
        cstore_fuse_fs::dev::ReadResult::Request(n) => n,
        r => panic!("{r:?}"),
    };
    let init = cstore_fuse_fs::abi::parse_request(&buf[..n]).unwrap();
    assert!(matches!(init.op, cstore_fuse_fs::abi::Op::Init(_)));

    let fs = Arc::new(DirFs::load(&p("src"), Open::KeepCache).unwrap());
    let s = Session::resume(fs, dev.into_fd(), &state, opts(PassthroughMode::Off)).unwrap();
    let neg = s.settings().init.expect("INIT answered on resume");
    assert!(neg.has_resend);
    assert_eq!(
        s.stats().count(op::INIT),
        0,
        "INIT is answered by the handshake, not the loop"
    );
    assert_eq!(
        s.stats().count(op::FLUSH),
        1,
        "the warm-up ran after this handshake"
    );
    assert_eq!(std::fs::read(p("mnt/dir/sub/s3")).unwrap(), b"small 3\n");
    let saved = state.load().unwrap().settings.unwrap();
    assert_eq!(
        saved.init,
        Some(neg),
        "the INIT result is recorded for the next resume"
    );
    mounts.umount(&p("mnt"));
    assert_eq!(s.wait().unwrap(), Exit::Unmounted);
}
