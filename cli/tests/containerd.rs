//! A real containerd (Debian's 1.6, with runc) using `cstore snapshotter
//! serve` as its proxy snapshotter, end to end: pull, run, listings, garbage
//! collection, layer sharing with `cstore pull`, and SIGKILLs mid-traffic.
//!
//! Everything lives in temp dirs. containerd gets its own config (root,
//! state, sockets under the temp dir, CRI off, `[proxy_plugins.cstore]`) and
//! runs in a private mount namespace with a tmpfs on /run: containerd 1.6
//! hard-codes its shim sockets and runc state under /run/containerd, and
//! this keeps them (and every mount containerd and its shims make) off the
//! host. `ctr` runs in that namespace too (`nsenter`), so its FIFOs do.
//! Drop kills the containers, shims, containerd and the snapshotter.
//!
//! Needs root, containerd, ctr, runc, nsenter/unshare, and Go with Debian's
//! containerd sources (fixtures/deps.sh installs them) for `cripull`: the
//! CRI-style pull in cli/tests/containerd/cripull.go, because `ctr image
//! pull` in containerd 1.6 never takes the unpacker path that shares layers.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::tree::snapshots as cstore_snapshots;
use common::{fixture, repo_root, shared_registry_addr, Cstore};
use cstore_snapshotter::service::proto::containerd::services::snapshots::v1 as api;
use serde_json::Value;

use api::snapshots_client::SnapshotsClient;

const REF_LABEL: &str = "containerd.io/snapshot.ref";
/// gRPC status code AlreadyExists.
const ALREADY_EXISTS: i32 = 6;

// ---------------------------------------------------------------- fixtures

/// The shared test registry (busybox images), with debian:bookworm pushed
/// too when a test asks for it.
fn registry(debian: bool) -> String {
    let addr = shared_registry_addr();
    if debian {
        static DEBIAN: OnceLock<()> = OnceLock::new();
        DEBIAN.get_or_init(|| {
            let out = Command::new("bash")
                .arg(fixture("push.sh"))
                .args([addr.as_str(), "--debian"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "push.sh --debian: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        });
    }
    addr
}

fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cstore snapshotter serve` on a Cstore's root.
struct Snapshotter {
    child: Option<Child>,
    sock: PathBuf,
    log: PathBuf,
}

impl Snapshotter {
    fn start(cs: &Cstore, sock: &Path, log: &Path) -> Snapshotter {
        let mut s = Snapshotter {
            child: None,
            sock: sock.to_path_buf(),
            log: log.to_path_buf(),
        };
        s.restart(cs);
        s
    }

    fn restart(&mut self, cs: &Cstore) {
        assert!(self.child.is_none(), "the snapshotter is still running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = cs
            .cmd(&["--log-level", "info", "snapshotter", "serve", "--address"])
            .arg(&self.sock)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let sock = self.sock.clone();
        let log = self.log.clone();
        wait_until("the snapshotter's socket", Duration::from_secs(30), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "cstore snapshotter serve exited ({st}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            UnixStream::connect(&sock).is_ok()
        });
        self.child = Some(child);
    }

    /// SIGTERM, as a service manager stops it; it exits cleanly.
    fn terminate(&mut self) {
        let mut child = self.child.take().expect("running");
        send_signal(child.id(), libc::SIGTERM);
        let st = child.wait().unwrap();
        assert!(st.success(), "snapshotter exit on SIGTERM: {st}");
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A private containerd with `[proxy_plugins.cstore]` pointing at `plugin`.
struct Containerd {
    child: Option<Child>,
    dir: PathBuf,
    sock: PathBuf,
    /// containerd's mount namespace (`mnt:[N]`), to find its shims.
    mnt_ns: String,
}

impl Containerd {
    fn start(dir: &Path, plugin: &Path) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let sock = dir.join("containerd.sock");
        // The keys of docs/containerd.md, with everything under `dir`.
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{s}"

[ttrpc]
  address = "{s}.ttrpc"

[debug]
  level = "info"

# Collect after every deletion, so a removed snapshot reaches the backend
# promptly (by default GC waits for 100 mutations).
[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1
  schedule_delay = "0ms"

[proxy_plugins]
  [proxy_plugins.cstore]
    type = "snapshot"
    address = "{p}"
"#,
            d = dir.display(),
            s = sock.display(),
            p = plugin.display()
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        // unshare execs sh, which execs containerd: the child's pid is containerd's.
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount -t tmpfs -o mode=0755 tmpfs /run && exec containerd --config \"$1\"")
            .arg("sh")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run unshare/containerd");
        let mut c = Containerd {
            child: Some(child),
            dir: dir.to_path_buf(),
            sock,
            mnt_ns: String::new(),
        };
        let logf = dir.join("containerd.log");
        let child = c.child.as_mut().unwrap();
        let sock = c.sock.clone();
        wait_until("containerd's socket", Duration::from_secs(60), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "containerd exited ({st}): {}",
                    std::fs::read_to_string(&logf).unwrap_or_default()
                );
            }
            UnixStream::connect(&sock).is_ok()
        });
        c.mnt_ns = std::fs::read_link(format!("/proc/{}/ns/mnt", c.pid()))
            .unwrap()
            .to_string_lossy()
            .into_owned();
        c
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount=/proc/{}/ns/mnt", self.pid()))
            .args(["--", "ctr", "--address"])
            .arg(&self.sock)
            .args(["--connect-timeout", "10s", "--timeout", "300s"])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("run ctr")
    }

    /// Run ctr, assert success, return stdout.
    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed:\nstdout: {}\nstderr: {}\ncontainerd log tail: {}",
            stdout_of(&out),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        stdout_of(&out)
    }

    /// `ctr run` that must print something: ctr (1.6) now and then loses a
    /// short-lived container's output on a loaded machine (the container ran
    /// and exited 0, stdout is empty), so an empty stdout is retried twice;
    /// a failed run is not.
    fn ctr_run(&self, args: &[&str]) -> String {
        for _ in 0..2 {
            let out = self.ctr_ok(args);
            if !out.trim().is_empty() {
                return out;
            }
            eprintln!("ctr {args:?} exited 0 with no output; running it again");
        }
        self.ctr_ok(args)
    }

    /// Like `ctr_ok`, but retried while containerd's connection to a
    /// restarted snapshotter comes back (gRPC reconnects with backoff).
    fn ctr_retry(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.ctr(args);
            if out.status.success() {
                return stdout_of(&out);
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                Instant::now() < deadline,
                "ctr {args:?} kept failing: {err}\ncontainerd log tail: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The CRI-style pull (containerd's unpacker, with snapshot.ref labels).
    fn cripull(&self, namespace: &str, reference: &str) -> String {
        let out = Command::new(go_client())
            .arg("--address")
            .arg(&self.sock)
            .args([
                "--namespace",
                namespace,
                "--snapshotter",
                "cstore",
                reference,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cripull {reference} failed: {}\ncontainerd log tail: {}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        stdout_of(&out)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `ctr snapshots ls` as (name, parent, kind) rows.
    fn snapshots(&self, namespace: &str) -> BTreeSet<(String, String, String)> {
        let out = self.ctr_ok(&[
            "-n",
            namespace,
            "snapshots",
            "--snapshotter",
            "cstore",
            "ls",
        ]);
        out.lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    [name, kind] => (name.to_string(), String::new(), kind.to_lowercase()),
                    [name, parent, kind] => {
                        (name.to_string(), parent.to_string(), kind.to_lowercase())
                    }
                    _ => panic!("unexpected ctr snapshots ls line {l:?}"),
                }
            })
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers first (their init pids), then everything else in
        // containerd's mount namespace (shims), then containerd. When the
        // last process of the namespace is gone, so are all its mounts.
        let tasks = self.dir.join("state/io.containerd.runtime.v2.task");
        for ns in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
            for task in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                if let Ok(pid) = std::fs::read_to_string(task.path().join("init.pid")) {
                    if let Ok(pid) = pid.trim().parse::<u32>() {
                        send_signal(pid, libc::SIGKILL);
                    }
                }
            }
        }
        let containerd = self.pid();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid != containerd
                && std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                    .is_ok_and(|l| l.to_string_lossy() == self.mnt_ns)
            {
                send_signal(pid, libc::SIGKILL);
            }
        }
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        unmount_under(&self.dir);
    }
}

/// Lazily unmount anything still mounted under `dir` in this namespace
/// (nothing should be: containerd mounts in its own).
fn unmount_under(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| mp.starts_with(&prefix))
        .map(String::from)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The CRI-style pull client, built once (cached across runs).
fn go_client() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = repo_root().join("cli/tests/containerd/cripull.go");
        let cache = std::env::var_os("CSTORE_GO_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/cstore-containerd-test"));
        let pkg = cache.join("src/cripull");
        std::fs::create_dir_all(&pkg).unwrap();
        let bin = cache.join("cripull");
        let code = std::fs::read(&src).unwrap();
        let cached = std::fs::read(pkg.join("main.go")).ok();
        if bin.exists() && cached.as_deref() == Some(code.as_slice()) {
            return bin;
        }
        std::fs::write(pkg.join("main.go"), &code).unwrap();
        let tmp = cache.join(format!("cripull.{}", std::process::id()));
        let mut cmd = Command::new("go");
        cmd.args(["build", "-o"])
            .arg(&tmp)
            .arg(".")
            .current_dir(&pkg)
            .env("GOPATH", format!("{}:/usr/share/gocode", cache.display()))
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "");
        if std::env::var_os("HOME").is_none() && std::env::var_os("XDG_CACHE_HOME").is_none() {
            cmd.env("GOCACHE", cache.join("go-build"));
        }
        let out = cmd
            .output()
            .expect("go (fixtures/deps.sh installs golang-go)");
        assert!(
            out.status.success(),
            "building cripull.go (needs golang-github-containerd-containerd-dev): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, &bin).unwrap();
        bin
    })
    .clone()
}

/// A store root served by `cstore snapshotter serve`, and a containerd using it.
struct Env {
    // Drop order: containerd, then the snapshotter, then the dirs.
    ctrd: Containerd,
    sn: Snapshotter,
    cs: Cstore,
    _dir: tempfile::TempDir,
}

impl Env {
    fn start() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("cstore-containerd-")
            .tempdir()
            .unwrap();
        let cs = Cstore::new();
        let sock = dir.path().join("cstore-snapshotter.sock");
        let sn = Snapshotter::start(&cs, &sock, &dir.path().join("snapshotter.log"));
        let ctrd = Containerd::start(&dir.path().join("containerd"), &sock);
        Env {
            ctrd,
            sn,
            cs,
            _dir: dir,
        }
    }
}

// ------------------------------------------------------ store-side oracles

fn key_of(v: &Value) -> String {
    v["key"].as_str().unwrap().to_string()
}

/// ROOT/snapshots/<id> of a snapshot, through the library (the listing
/// does not show ids).
fn dir_of(cs: &Cstore, key: &str) -> PathBuf {
    try_dir_of(cs, key).unwrap_or_else(|| panic!("no snapshot {key}"))
}

/// None if the snapshot is gone (containerd's GC may remove one any time).
fn try_dir_of(cs: &Cstore, key: &str) -> Option<PathBuf> {
    let sn = cstore_snapshotter::Snapshotter::open(cs.path()).unwrap();
    match sn.fs_dir(key) {
        Ok(fs) => Some(fs.parent().unwrap().to_path_buf()),
        Err(cstore_snapshotter::Error::NotFound(_)) => None,
        Err(e) => panic!("{key}: {e}"),
    }
}

/// The numbered snapshot directories on disk.
fn numbered_dirs(cs: &Cstore) -> BTreeSet<PathBuf> {
    std::fs::read_dir(cs.path().join("snapshots"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u64>().is_ok())
        .map(|e| e.path())
        .collect()
}

/// Every listed snapshot has its directory (active ones an fs and a work
/// dir) and a listed parent. Returns the listing.
fn assert_no_half_snapshots(cs: &Cstore) -> Vec<Value> {
    let list = cstore_snapshots(cs);
    let keys: BTreeSet<String> = list.iter().map(key_of).collect();
    for s in &list {
        let key = key_of(s);
        let Some(dir) = try_dir_of(cs, &key) else {
            // Removed since the listing (by containerd's GC): it must be gone.
            assert!(
                !cstore_snapshots(cs).iter().any(|v| key_of(v) == key),
                "{key} is listed but has no record"
            );
            continue;
        };
        assert!(
            dir.join("fs").is_dir(),
            "{key}: {} has no fs",
            dir.display()
        );
        if s["kind"] == "active" {
            assert!(
                dir.join("work").is_dir(),
                "active {key}: {} has no work dir",
                dir.display()
            );
        }
        if let Some(p) = s["parent"].as_str() {
            assert!(keys.contains(p), "{key}: parent {p} is not listed");
        }
    }
    list
}

/// Strip containerd's `NAMESPACE/N/` from a backend name, if it has one in `ns`.
fn containerd_name(ns: &str, backend: &str) -> Option<String> {
    let rest = backend.strip_prefix(ns)?.strip_prefix('/')?;
    let (id, name) = rest.split_once('/')?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then(|| name.to_string())
}

/// `ctr snapshots ls/info/usage` agree with `cstore snapshots --json` about
/// containerd's snapshots in namespace `ns`: names (containerd's backend
/// names are `NS/N/NAME`), kinds, parents, sizes and inode counts.
fn assert_listings_agree(env: &Env, ns: &str) -> usize {
    let ctr_rows = env.ctrd.snapshots(ns);
    let cstore = cstore_snapshots(&env.cs);
    let by_name: BTreeMap<String, &Value> = cstore
        .iter()
        .filter_map(|v| containerd_name(ns, &key_of(v)).map(|n| (n, v)))
        .collect();
    let cstore_rows: BTreeSet<(String, String, String)> = by_name
        .iter()
        .map(|(name, v)| {
            let parent = v["parent"]
                .as_str()
                .map(|p| {
                    containerd_name(ns, p).unwrap_or_else(|| format!("(not containerd's) {p}"))
                })
                .unwrap_or_default();
            (
                name.clone(),
                parent,
                v["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        ctr_rows, cstore_rows,
        "ctr snapshots ls vs cstore snapshots --json"
    );
    for (name, parent, kind) in &ctr_rows {
        let info: Value = serde_json::from_str(&env.ctrd.ctr_ok(&[
            "-n",
            ns,
            "snapshots",
            "--snapshotter",
            "cstore",
            "info",
            name,
        ]))
        .unwrap();
        assert_eq!(info["Name"], name.as_str());
        assert_eq!(info["Kind"].as_str().unwrap().to_lowercase(), *kind);
        assert_eq!(info["Parent"].as_str().unwrap_or(""), parent);
    }
    let usage = env.ctrd.ctr_ok(&[
        "-n",
        ns,
        "snapshots",
        "--snapshotter",
        "cstore",
        "usage",
        "--b",
    ]);
    let mut seen = 0;
    for l in usage.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let [name, size, inodes] = f.as_slice() else {
            continue;
        };
        let v = by_name
            .get(*name)
            .unwrap_or_else(|| panic!("usage of unknown {name}"));
        assert_eq!(
            size.parse::<u64>().unwrap(),
            v["size"].as_u64().unwrap(),
            "size of {name}"
        );
        assert_eq!(
            inodes.parse::<u64>().unwrap(),
            v["inodes"].as_u64().unwrap(),
            "inodes of {name}"
        );
        seen += 1;
    }
    assert_eq!(
        seen,
        ctr_rows.len(),
        "ctr snapshots usage lists every snapshot"
    );
    ctr_rows.len()
}

fn chain_id_of_pull(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("image chain ID: "))
        .unwrap_or_else(|| panic!("no chain ID in {out}"))
        .trim()
        .to_string()
}

// ------------------------------------------------------------------ tests

/// (a) ctr pulls into cstore, the snapshotter restarts, ctr runs the image.
/// (b) ctr's listings agree with cstore's.
#[test]
fn ctr_pull_then_run_across_a_snapshotter_restart() {
    let addr = registry(false);
    let mut env = Env::start();
    let image = format!("{addr}/busybox:latest");
    let out = env.ctrd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "cstore",
        "--print-chainid",
        &image,
    ]);
    let top = chain_id_of_pull(&out);

    env.sn.terminate();
    env.sn.restart(&env.cs);

    let out = env.ctrd.ctr_retry(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "c1",
        "/bin/echo",
        "hello-from-cstore",
    ]);
    assert_eq!(out.trim(), "hello-from-cstore");

    // An active and a view snapshot besides the image's committed layers.
    env.ctrd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "cstore",
        "prepare",
        "work-1",
        &top,
    ]);
    env.ctrd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "cstore",
        "view",
        "look-1",
        &top,
    ]);
    // ctr run --rm removed the container's snapshot; containerd's GC takes
    // it out of the backend shortly after.
    wait_until(
        "the container snapshot's removal",
        Duration::from_secs(30),
        || cstore_snapshots(&env.cs).len() == 5,
    );
    let n = assert_listings_agree(&env, "default");
    assert_eq!(n, 5, "3 layers, one active, one view");
    let kinds: BTreeSet<String> = env
        .ctrd
        .snapshots("default")
        .into_iter()
        .map(|r| r.2)
        .collect();
    assert_eq!(
        kinds,
        ["active", "committed", "view"].map(String::from).into(),
        "every kind compared"
    );
    assert_no_half_snapshots(&env.cs);
}

/// (c) Removing the images makes containerd's GC remove its snapshots
/// through the plugin: no orphaned directories, and the layers `cstore
/// pull` unpacked for itself stay as they were.
#[test]
fn containerd_gc_removes_its_snapshots_and_leaves_cstores_own() {
    let addr = registry(false);
    let env = Env::start();
    let image = format!("{addr}/busybox:latest");
    env.cs.ok(&["pull", &image]);
    let own = cstore_snapshots(&env.cs);
    assert_eq!(own.len(), 3, "cstore unpacked busybox's three layers");
    let own_dirs: BTreeMap<String, PathBuf> = own
        .iter()
        .map(|v| (key_of(v), dir_of(&env.cs, &key_of(v))))
        .collect();

    // containerd's own unpack (ctr), shared layers (the CRI path) in a
    // second namespace, and a container.
    env.ctrd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "cstore",
        &image,
    ]);
    env.ctrd.cripull("k8s.io", &image);
    let out = env.ctrd.ctr_run(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "c1",
        "/bin/echo",
        "gc-test",
    ]);
    assert_eq!(out.trim(), "gc-test");
    assert_eq!(env.ctrd.snapshots("default").len(), 3);
    assert_eq!(env.ctrd.snapshots("k8s.io").len(), 3);

    for ns in ["default", "k8s.io"] {
        env.ctrd
            .ctr_ok(&["-n", ns, "image", "rm", "--sync", &image]);
    }
    // Drop the content too; its GC runs the snapshot GC once more.
    env.ctrd.ctr_ok(&["content", "prune", "references"]);
    wait_until(
        "containerd's snapshots to go",
        Duration::from_secs(60),
        || {
            cstore_snapshots(&env.cs)
                .iter()
                .all(|v| !key_of(v).contains('/'))
        },
    );
    assert!(env.ctrd.snapshots("default").is_empty());
    assert!(env.ctrd.snapshots("k8s.io").is_empty());

    let after = assert_no_half_snapshots(&env.cs);
    assert_eq!(after, own, "cstore's own layer snapshots are untouched");
    let after_dirs: BTreeMap<String, PathBuf> = after
        .iter()
        .map(|v| (key_of(v), dir_of(&env.cs, &key_of(v))))
        .collect();
    assert_eq!(after_dirs, own_dirs);
    assert_eq!(
        numbered_dirs(&env.cs),
        own_dirs.values().cloned().collect::<BTreeSet<_>>(),
        "no orphaned snapshot directories"
    );
    let bottom = own.iter().find(|v| v["parent"].is_null()).unwrap();
    assert!(
        own_dirs[&key_of(bottom)].join("fs/bin/busybox").is_file(),
        "the shared layer's files are still there"
    );
}

/// (d) Layers `cstore pull` unpacked are handed to containerd's unpacker
/// (the CRI path) instead of being unpacked again; the image runs.
#[test]
fn containerd_unpacker_shares_layers_cstore_pulled() {
    let addr = registry(false);
    let env = Env::start();
    let image = format!("{addr}/busybox:latest");
    env.cs.ok(&["pull", &image]);
    let before = numbered_dirs(&env.cs);
    assert_eq!(before.len(), 3);

    env.ctrd.cripull("default", &image);
    assert_eq!(
        numbered_dirs(&env.cs),
        before,
        "containerd unpacked nothing: no new snapshot directories"
    );
    let ctr_rows = env.ctrd.snapshots("default");
    let own: BTreeSet<String> = cstore_snapshots(&env.cs)
        .iter()
        .map(key_of)
        .filter(|k| !k.contains('/'))
        .collect();
    let names: BTreeSet<String> = ctr_rows.iter().map(|r| r.0.clone()).collect();
    assert_eq!(names, own, "containerd has every layer, by chain ID");
    assert!(ctr_rows.iter().all(|r| r.2 == "committed"));
    // containerd's names are aliases of cstore's layers: the same directories.
    for v in cstore_snapshots(&env.cs) {
        if let Some(name) = containerd_name("default", &key_of(&v)) {
            assert_eq!(dir_of(&env.cs, &key_of(&v)), dir_of(&env.cs, &name));
        }
    }
    assert_listings_agree(&env, "default");

    let out = env.ctrd.ctr_run(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "shared",
        "/bin/sh",
        "-c",
        "cat /data/layer3.txt >/dev/null && echo shared-layers-run",
    ]);
    assert_eq!(out.trim(), "shared-layers-run");
}

/// The other way round: `cstore rmi` + `cstore gc` drop cstore's own names
/// for layers containerd still uses; the directories stay until containerd
/// removes its names too.
#[test]
fn cstore_gc_keeps_shared_layers_containerd_still_uses() {
    let addr = registry(false);
    let env = Env::start();
    let image = format!("{addr}/busybox:latest");
    env.cs.ok(&["pull", &image]);
    let dirs = numbered_dirs(&env.cs);
    env.ctrd.cripull("default", &image);

    env.cs.ok(&["rmi", &image]);
    let gc: Value = serde_json::from_str(&env.cs.ok(&["gc", "--json"])).unwrap();
    assert_eq!(gc["removed_layer_snapshots"], 3, "{gc}");
    let left = cstore_snapshots(&env.cs);
    assert!(
        left.iter().all(|v| key_of(v).starts_with("default/")),
        "only containerd's names are left: {left:?}"
    );
    assert_eq!(left.len(), 3);
    assert_eq!(numbered_dirs(&env.cs), dirs, "the shared directories stay");
    let out = env.ctrd.ctr_run(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "after-gc",
        "/bin/echo",
        "still-runs",
    ]);
    assert_eq!(out.trim(), "still-runs");

    env.ctrd.ctr_ok(&["image", "rm", "--sync", &image]);
    wait_until("containerd's GC", Duration::from_secs(60), || {
        cstore_snapshots(&env.cs).is_empty()
    });
    assert!(
        numbered_dirs(&env.cs).is_empty(),
        "the last name took the directories: {:?}",
        numbered_dirs(&env.cs)
    );
}

/// List through the gRPC client (a macro: the client's type names tonic,
/// which this crate does not depend on directly).
macro_rules! list {
    ($c:expr, $filters:expr) => {{
        let mut stream = $c
            .list(api::ListSnapshotsRequest {
                snapshotter: "cstore".into(),
                filters: $filters,
            })
            .await
            .unwrap()
            .into_inner();
        let mut out: Vec<api::Info> = Vec::new();
        while let Some(m) = stream.message().await.unwrap() {
            out.extend(m.info);
        }
        out
    }};
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn prepare_req(key: &str, parent: &str, labels: &[(&str, &str)]) -> api::PrepareSnapshotRequest {
    api::PrepareSnapshotRequest {
        snapshotter: "cstore".into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// (d) without containerd: Prepare as containerd 1.6's unpacker sends it
/// through the metadata layer (key `NS/N/extract-… CHAIN`, parent the
/// backend name of the layer below, label snapshot.ref = CHAIN) answers
/// AlreadyExists, and the walk containerd then does finds the shared layer.
#[test]
fn grpc_prepare_with_snapshot_ref_shares_a_layer_cstore_unpacked() {
    let addr = registry(false);
    let dir = tempfile::tempdir().unwrap();
    let cs = Cstore::new();
    cs.ok(&["pull", &format!("{addr}/busybox:latest")]);
    let own = cstore_snapshots(&cs);
    // Bottom-up chain IDs.
    let mut chains: Vec<String> = Vec::new();
    let mut parent: Option<String> = None;
    while let Some(v) = own
        .iter()
        .find(|v| v["parent"].as_str().map(String::from) == parent)
    {
        chains.push(key_of(v));
        parent = Some(key_of(v));
    }
    assert_eq!(chains.len(), 3);
    let dirs_before = numbered_dirs(&cs);
    let sock = dir.path().join("sn.sock");
    let _sn = Snapshotter::start(&cs, &sock, &dir.path().join("sn.log"));

    runtime().block_on(async {
        let mut c = SnapshotsClient::connect(format!("unix://{}", sock.display()))
            .await
            .unwrap();
        let mut parent = String::new();
        for (i, chain) in chains.iter().enumerate() {
            let id = 10 + 2 * i;
            let key = format!("default/{id}/extract-{i}-test {chain}");
            let err = c
                .prepare(prepare_req(&key, &parent, &[(REF_LABEL, chain)]))
                .await
                .expect_err("a layer cstore has is not prepared again");
            assert_eq!(i32::from(err.code()), ALREADY_EXISTS, "{err:?}");
            // What containerd's metadata layer does next.
            let filter = format!("labels.\"{REF_LABEL}\"=={chain},parent=={parent:?}");
            let found = list!(c, vec![filter]);
            assert_eq!(found.len(), 1, "{found:?}");
            let name = found[0].name.clone();
            assert_eq!(name, format!("default/{id}/{chain}"));
            assert_eq!(found[0].labels[REF_LABEL], *chain);
            let st = c
                .stat(api::StatSnapshotRequest {
                    snapshotter: "cstore".into(),
                    key: name.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .info
                .unwrap();
            assert_eq!(st.kind, api::Kind::Committed as i32);
            assert_eq!(st.parent, parent);
            assert_eq!(
                dir_of(&cs, &name),
                dir_of(&cs, chain),
                "an alias, not a copy"
            );
            parent = name;
        }

        // A target that is already a backend name: Stat of the target.
        let target = format!("k8s.io/3/{}", chains[0]);
        let err = c
            .prepare(prepare_req(
                &format!("k8s.io/4/extract-x {}", chains[0]),
                "",
                &[(REF_LABEL, &target)],
            ))
            .await
            .unwrap_err();
        assert_eq!(i32::from(err.code()), ALREADY_EXISTS);
        let st = c
            .stat(api::StatSnapshotRequest {
                snapshotter: "cstore".into(),
                key: target.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(st.kind, api::Kind::Committed as i32);

        // A layer cstore does not have is prepared as usual.
        let unknown = format!("sha256:{}", "0".repeat(64));
        let r = c
            .prepare(prepare_req(
                &format!("default/20/extract-y {unknown}"),
                "",
                &[(REF_LABEL, &unknown)],
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.mounts.len(), 1);

        // cstore's own layers are not listed to containerd (its GC would
        // remove them), but Stat still answers for them.
        let names: BTreeSet<String> = list!(c, vec![]).into_iter().map(|i| i.name).collect();
        assert!(chains.iter().all(|ch| !names.contains(ch)), "{names:?}");
        assert_eq!(
            names.len(),
            5,
            "three aliases, the k8s.io one, the new active"
        );
        c.stat(api::StatSnapshotRequest {
            snapshotter: "cstore".into(),
            key: chains[0].clone(),
        })
        .await
        .unwrap();

        // Removing every alias (top first, as containerd's GC does) leaves
        // cstore's layers and their directories.
        let mut aliases: Vec<String> = names.into_iter().collect();
        aliases.sort_by_key(|n| {
            std::cmp::Reverse(chains.iter().position(|ch| n.ends_with(ch.as_str())))
        });
        for n in aliases {
            c.remove(api::RemoveSnapshotRequest {
                snapshotter: "cstore".into(),
                key: n.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("remove {n}: {e:?}"));
        }
        c.cleanup(api::CleanupRequest {
            snapshotter: "cstore".into(),
        })
        .await
        .unwrap();
    });
    assert_eq!(cstore_snapshots(&cs), own, "cstore's layers are untouched");
    assert_eq!(
        numbered_dirs(&cs),
        dirs_before,
        "no directory added or lost"
    );
}

/// (e) SIGKILL while containerd unpacks debian through the plugin: no half
/// snapshot afterwards, and the pull succeeds when retried.
#[test]
fn sigkill_mid_unpack_leaves_no_half_snapshot_and_the_pull_retries() {
    let addr = registry(true);
    let mut env = Env::start();
    let image = format!("{addr}/debian:bookworm");
    let pull_args = [
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "cstore",
        &image,
    ];
    let mut pull = env
        .ctrd
        .ctr_cmd(&pull_args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // containerd has prepared the layer's snapshot and is writing into it.
    let root = env.cs.path().join("snapshots");
    wait_until(
        "containerd to unpack into a snapshot",
        Duration::from_secs(300),
        || {
            numbered_dirs(&env.cs)
                .iter()
                .any(|d| std::fs::read_dir(d.join("fs")).is_ok_and(|mut r| r.next().is_some()))
                || pull.try_wait().unwrap().is_some()
        },
    );
    env.sn.kill9();
    let out = pull.wait_with_output().unwrap();
    eprintln!(
        "first pull (snapshotter killed mid-unpack): {}, {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );

    // With the snapshotter down, and again once it is back.
    assert_no_half_snapshots(&env.cs);
    env.sn.restart(&env.cs);
    assert_no_half_snapshots(&env.cs);

    env.ctrd.ctr_retry(&pull_args);
    let out = env.ctrd.ctr_run(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "deb",
        "/bin/sh",
        "-c",
        "test -x /usr/bin/apt-get && echo debian-ok",
    ]);
    assert_eq!(out.trim(), "debian-ok");
    assert_no_half_snapshots(&env.cs);

    // GC takes everything back, including what the killed pull left.
    env.ctrd.ctr_ok(&["image", "rm", "--sync", &image]);
    env.ctrd.ctr_ok(&["content", "prune", "references"]);
    wait_until("containerd's GC", Duration::from_secs(60), || {
        cstore_snapshots(&env.cs).is_empty() && numbered_dirs(&env.cs).is_empty()
    });
    let staging: Vec<_> = std::fs::read_dir(root.join("staging")).unwrap().collect();
    assert!(staging.is_empty(), "staging left: {staging:?}");
}

/// (e) SIGKILL in the middle of a stream of Prepare/Commit/Remove calls.
#[test]
fn sigkill_during_prepare_commit_traffic_leaves_no_half_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let cs = Cstore::new();
    let sock = dir.path().join("sn.sock");
    let mut sn = Snapshotter::start(&cs, &sock, &dir.path().join("sn.log"));
    let done = Arc::new(AtomicUsize::new(0));
    let rt = runtime();
    let uri = format!("unix://{}", sock.display());
    let traffic = {
        let (done, uri) = (done.clone(), uri.clone());
        rt.spawn(async move {
            let mut c = SnapshotsClient::connect(uri).await.unwrap();
            let mut parent = String::new();
            for i in 0.. {
                let key = format!("default/{}/extract-{i}", 3 * i);
                if c.prepare(prepare_req(&key, &parent, &[])).await.is_err() {
                    return;
                }
                done.fetch_add(1, Ordering::SeqCst);
                let name = format!("default/{}/layer-{i}", 3 * i + 1);
                let commit = api::CommitSnapshotRequest {
                    snapshotter: "cstore".into(),
                    name: name.clone(),
                    key,
                    labels: Default::default(),
                };
                if c.commit(commit).await.is_err() {
                    return;
                }
                done.fetch_add(1, Ordering::SeqCst);
                let scratch = format!("default/{}/scratch-{i}", 3 * i + 2);
                if c.prepare(prepare_req(&scratch, &name, &[])).await.is_err() {
                    return;
                }
                let rm = api::RemoveSnapshotRequest {
                    snapshotter: "cstore".into(),
                    key: scratch,
                };
                if c.remove(rm).await.is_err() {
                    return;
                }
                done.fetch_add(2, Ordering::SeqCst);
                parent = name;
            }
        })
    };
    wait_until("Prepare/Commit traffic", Duration::from_secs(120), || {
        done.load(Ordering::SeqCst) >= 40
    });
    sn.kill9();
    rt.block_on(traffic).unwrap();
    let before = done.load(Ordering::SeqCst);
    assert!(before >= 40);

    let list = assert_no_half_snapshots(&cs);
    sn.restart(&cs);
    assert_no_half_snapshots(&cs);
    rt.block_on(async {
        let mut c = SnapshotsClient::connect(uri).await.unwrap();
        // containerd's Cleanup removes what the kill orphaned.
        c.cleanup(api::CleanupRequest {
            snapshotter: "cstore".into(),
        })
        .await
        .unwrap();
        // The chain goes on from its last committed layer.
        let top = list
            .iter()
            .filter(|v| v["kind"] == "committed")
            .max_by_key(|v| v["created"].as_u64())
            .map(key_of)
            .expect("some layers were committed before the kill");
        c.prepare(prepare_req("after-restart", &top, &[]))
            .await
            .unwrap();
        c.commit(api::CommitSnapshotRequest {
            snapshotter: "cstore".into(),
            name: "after-restart-layer".into(),
            key: "after-restart".into(),
            labels: Default::default(),
        })
        .await
        .unwrap();
    });
    let list = assert_no_half_snapshots(&cs);
    let listed: BTreeSet<PathBuf> = list.iter().map(|v| dir_of(&cs, &key_of(v))).collect();
    assert_eq!(
        numbered_dirs(&cs),
        listed,
        "no orphaned directories after Cleanup"
    );
}

/// Issue 12, finding 8: a NUL in a key, name or parent is InvalidArgument
/// through the real socket. Before, Prepare of "q\0r" on "p" was indexed
/// as a child of an unrelated snapshot "p\0q", which Remove then refused
/// ("it has children").
#[test]
fn grpc_refuses_nul_in_keys_names_and_parents() {
    const INVALID_ARGUMENT: i32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let cs = Cstore::new();
    let sock = dir.path().join("sn.sock");
    let _sn = Snapshotter::start(&cs, &sock, &dir.path().join("sn.log"));
    runtime().block_on(async {
        let mut c = SnapshotsClient::connect(format!("unix://{}", sock.display()))
            .await
            .unwrap();
        let commit = |name: &str, key: &str| api::CommitSnapshotRequest {
            snapshotter: "cstore".into(),
            name: name.into(),
            key: key.into(),
            labels: Default::default(),
        };
        c.prepare(prepare_req("p-active", "", &[])).await.unwrap();
        c.commit(commit("p", "p-active")).await.unwrap();
        c.prepare(prepare_req("c-active", "p", &[])).await.unwrap();
        // A layer as cstore's unpack names it (its chain ID).
        let chain = format!("sha256:{}", "a".repeat(64));
        c.prepare(prepare_req("l-active", "", &[])).await.unwrap();
        c.commit(commit(&chain, "l-active")).await.unwrap();
        let refused = [
            c.prepare(prepare_req("q\0r", "p", &[])).await.unwrap_err(),
            c.prepare(prepare_req("k", "p\0q", &[])).await.unwrap_err(),
            c.view(api::ViewSnapshotRequest {
                snapshotter: "cstore".into(),
                key: "v\0w".into(),
                parent: "p".into(),
                labels: Default::default(),
            })
            .await
            .unwrap_err(),
            c.commit(commit("c\0x", "c-active")).await.unwrap_err(),
            // The layer-sharing path of Prepare names its alias after the
            // key: "ns\0/1/<chain>" is refused as an alias, then as a key.
            c.prepare(prepare_req(
                &format!("ns\0/1/extract-0 {chain}"),
                "",
                &[(REF_LABEL, &chain)],
            ))
            .await
            .unwrap_err(),
        ];
        for e in refused {
            assert_eq!(i32::from(e.code()), INVALID_ARGUMENT, "{e:?}");
            assert!(e.message().contains("contains a NUL byte"), "{e:?}");
        }
        let names: BTreeSet<String> = list!(c, vec![]).into_iter().map(|i| i.name).collect();
        assert_eq!(
            names,
            BTreeSet::from(["p".into(), "c-active".into(), chain.clone()])
        );
        for key in ["c-active", "p", &chain] {
            c.remove(api::RemoveSnapshotRequest {
                snapshotter: "cstore".into(),
                key: key.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("remove {key}: {e:?}"));
        }
        assert!(list!(c, vec![]).is_empty());
    });
}
