//! A private containerd using `cstore snapshotter serve` as its proxy
//! snapshotter, for the containerd and CRI tests: the snapshotter process,
//! containerd in a mount namespace of its own (a tmpfs on /run: containerd
//! 1.6 keeps shim sockets and runc state under /run/containerd whatever its
//! config says) with everything under a temp dir, and the store-side oracles
//! both modules read. Drop kills the containers, shims, containerd and the
//! snapshotter, and removes the pods' cgroups, however a test ends.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Cstore;

pub fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started (or found in the private
    // mount namespace of the containerd it started).
    unsafe { libc::kill(pid as i32, sig) };
}

pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `n` lines of a log file (for failure messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `cstore snapshotter serve` on a Cstore's root.
pub struct Snapshotter {
    child: Option<Child>,
    sock: PathBuf,
    pub log: PathBuf,
    /// Global options before `snapshotter serve` (the log level by default).
    global: Vec<String>,
    /// Options after `serve --address SOCK`.
    extra: Vec<String>,
    /// Run in the mount namespace of this process (containerd's): lazy
    /// layers are FUSE mounts the snapshotter's daemon makes, and
    /// containerd's shims must see them (on a node they share one
    /// namespace; here containerd has a private one).
    ns_of: Option<u32>,
}

impl Snapshotter {
    pub fn start(cs: &Cstore, sock: &Path, log: &Path) -> Snapshotter {
        Self::start_with(cs, sock, log, &["--log-level", "info"], &[])
    }

    pub fn start_with(
        cs: &Cstore,
        sock: &Path,
        log: &Path,
        global: &[&str],
        extra: &[&str],
    ) -> Snapshotter {
        Self::start_in(None, cs, sock, log, global, extra)
    }

    /// `start_with`, in the mount namespace of process `pid`.
    pub fn start_in_namespace_of(
        pid: u32,
        cs: &Cstore,
        sock: &Path,
        log: &Path,
        global: &[&str],
        extra: &[&str],
    ) -> Snapshotter {
        Self::start_in(Some(pid), cs, sock, log, global, extra)
    }

    fn start_in(
        ns_of: Option<u32>,
        cs: &Cstore,
        sock: &Path,
        log: &Path,
        global: &[&str],
        extra: &[&str],
    ) -> Snapshotter {
        let mut s = Snapshotter {
            child: None,
            sock: sock.to_path_buf(),
            log: log.to_path_buf(),
            global: global.iter().map(|s| s.to_string()).collect(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ns_of,
        };
        s.restart(cs);
        s
    }

    pub fn restart(&mut self, cs: &Cstore) {
        assert!(self.child.is_none(), "the snapshotter is still running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = cs.cmd(&[]);
        cmd.args(&self.global)
            .args(["snapshotter", "serve", "--address"])
            .arg(&self.sock)
            .args(&self.extra);
        if let Some(pid) = self.ns_of {
            // nsenter execs the same command line, environment kept.
            let mut ns = Command::new("nsenter");
            ns.arg(format!("--mount=/proc/{pid}/ns/mnt"))
                .arg("--")
                .arg(cmd.get_program())
                .args(cmd.get_args());
            for (k, v) in cmd.get_envs() {
                match v {
                    Some(v) => ns.env(k, v),
                    None => ns.env_remove(k),
                };
            }
            cmd = ns;
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        wait_until("the snapshotter's socket", Duration::from_secs(30), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "cstore snapshotter serve exited ({st}): {}",
                    tail(&self.log, 50)
                );
            }
            UnixStream::connect(&self.sock).is_ok()
        });
        self.child = Some(child);
    }

    /// SIGTERM, as a service manager stops it; it exits cleanly.
    pub fn terminate(&mut self) {
        let mut child = self.child.take().expect("running");
        send_signal(child.id(), libc::SIGTERM);
        let st = child.wait().unwrap();
        assert!(st.success(), "snapshotter exit on SIGTERM: {st}");
    }

    pub fn kill9(&mut self) {
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

/// A private containerd with `[proxy_plugins.cstore]` pointing at the
/// snapshotter's socket: CRI off (`start`) or on (`start_cri`).
pub struct Containerd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub sock: PathBuf,
    /// containerd's mount namespace (`mnt:[N]`), to find its shims.
    mnt_ns: String,
    /// With CRI: the pods' cgroup parent (cgroupfs driver: a path under
    /// each hierarchy), removed on drop.
    pub cgroup_parent: String,
}

impl Containerd {
    /// containerd without CRI: the keys of docs/containerd.md, with
    /// everything under `dir`.
    pub fn start(dir: &Path, plugin: &Path) -> Containerd {
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

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
            p = plugin.display()
        );
        Self::launch(dir, &config, String::new())
    }

    /// containerd with the CRI plugin on, cstore as its snapshotter and
    /// `sandbox_image` as the pods' sandbox image, pulling from the plain
    /// HTTP `registry`.
    pub fn start_cri(dir: &Path, plugin: &Path, registry: &str, sandbox_image: &str) -> Containerd {
        static N: AtomicUsize = AtomicUsize::new(0);
        // The registry is plain HTTP: say so in a hosts.toml, as a node
        // configures its registries (config_path), rather than relying on
        // containerd's default of HTTP for loopback addresses.
        let hosts = dir.join("certs.d").join(registry);
        std::fs::create_dir_all(&hosts).unwrap();
        std::fs::write(
            hosts.join("hosts.toml"),
            format!(
                "server = \"http://{registry}\"\n\n[host.\"http://{registry}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
        let cgroup_parent = format!(
            "/cstore-cri-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        // docs/containerd.md's node setup (proxy plugin, the CRI plugin's
        // snapshotter and disable_snapshot_annotations, sandbox_image,
        // config_path), plus what keeps a test instance off the host: every
        // path under `dir`, and AppArmor off (CRI would load its default
        // profile into the kernel when the host has AppArmor). And
        // restrict_oom_score_adj: the sandbox's oom_score_adj of -998 needs
        // CAP_SYS_RESOURCE, which root lacks on the test machines (runc's
        // init then dies with "can't get final child's PID from pipe").
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

# Collect after every deletion, so a removed image's snapshots reach the
# backend promptly (by default GC waits for 100 mutations).
[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1
  schedule_delay = "0ms"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "cstore"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"

[proxy_plugins]
  [proxy_plugins.cstore]
    type = "snapshot"
    address = "{p}"
"#,
            d = dir.display(),
            p = plugin.display(),
        );
        Self::launch(dir, &config, cgroup_parent)
    }

    /// Write `config` (its sockets at DIR/containerd.sock) and run
    /// containerd on it in a private mount namespace, until it listens.
    fn launch(dir: &Path, config: &str, cgroup_parent: String) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
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
            sock: dir.join("containerd.sock"),
            mnt_ns: String::new(),
            cgroup_parent,
        };
        let logf = c.log();
        let sock = c.sock.clone();
        let child = c.child.as_mut().unwrap();
        wait_until("containerd's socket", Duration::from_secs(60), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("containerd exited ({st}): {}", tail(&logf, 50));
            }
            UnixStream::connect(&sock).is_ok()
        });
        c.mnt_ns = std::fs::read_link(format!("/proc/{}/ns/mnt", c.pid()))
            .unwrap()
            .to_string_lossy()
            .into_owned();
        c
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("containerd is running").id()
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// Processes in containerd's mount namespace other than containerd
    /// (its shims and the containers they run).
    pub fn others_in_namespace(&self) -> Vec<u32> {
        let me = self.child.as_ref().map(|c| c.id());
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if Some(pid) != me
                && std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                    .is_ok_and(|l| l.to_string_lossy() == self.mnt_ns)
            {
                pids.push(pid);
            }
        }
        pids
    }

    /// SIGTERM; true if containerd exited within the timeout.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        send_signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// The cgroup directories of the pods' parent, in every hierarchy
    /// (cgroup v1 controllers, the v2 unified one), deepest first.
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        if self.cgroup_parent.is_empty() {
            return vec![];
        }
        let rel = self.cgroup_parent.trim_start_matches('/');
        let mut bases = vec![PathBuf::from("/sys/fs/cgroup")];
        for e in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                bases.push(e.path());
            }
        }
        let mut dirs = Vec::new();
        let mut todo: Vec<PathBuf> = bases
            .iter()
            .map(|b| b.join(rel))
            .filter(|p| p.is_dir())
            .collect();
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(e.path());
                }
            }
            dirs.push(d);
        }
        dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        dirs
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
        if self.child.is_some() {
            for pid in self.others_in_namespace() {
                send_signal(pid, libc::SIGKILL);
            }
        }
        self.stop();
        // The pods' cgroups: removable once their processes are gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        for d in self.cgroup_dirs() {
            while std::fs::remove_dir(&d).is_err() && d.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
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

// ------------------------------------------------------ store-side oracles

pub fn key_of(v: &Value) -> String {
    v["key"].as_str().unwrap().to_string()
}

/// ROOT/snapshots/<id> of a snapshot, through the library (the listing
/// does not show ids); None if there is no such snapshot (containerd's GC
/// may remove one any time).
pub fn try_dir_of(cs: &Cstore, key: &str) -> Option<PathBuf> {
    let sn = cstore_snapshotter::Snapshotter::open(cs.path()).unwrap();
    match sn.fs_dir(key) {
        Ok(fs) => Some(fs.parent().unwrap().to_path_buf()),
        Err(cstore_snapshotter::Error::NotFound(_)) => None,
        Err(e) => panic!("{key}: {e}"),
    }
}

/// The numbered snapshot directories on disk.
pub fn numbered_dirs(cs: &Cstore) -> BTreeSet<PathBuf> {
    std::fs::read_dir(cs.path().join("snapshots"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u64>().is_ok())
        .map(|e| e.path())
        .collect()
}
