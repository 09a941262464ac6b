//! Test harness: real registries (fixtures/registry.sh), real images
//! (fixtures/images.sh + push.sh), the fault proxy and the token server
//! (from cstore-testkit, which the other crates' tests share), and a cstore
//! binary pointed at a temp root. Everything started here is stopped on
//! drop, or at process exit for the shared registry.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

use serde_json::Value;
use sha2::{Digest, Sha256};

pub mod containerd;
pub mod containers;
pub mod loopfs;
pub mod tree;

pub use cstore_testkit::{
    fixture, http, push, repo_root, run, run_fixture, FaultProxy, Registry, TokenAuth,
};

static SHARED: OnceLock<Mutex<Option<Registry>>> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(m) = SHARED.get() {
        if let Ok(mut g) = m.lock() {
            g.take();
        }
    }
}

/// One registry with the test images, shared by the tests of a test binary
/// that only read from it; stopped when the test process exits.
pub fn shared_registry_addr() -> String {
    let m = SHARED.get_or_init(|| {
        let r = Registry::start(&[]);
        r.push(None);
        // SAFETY: registering a plain extern "C" fn to run at exit.
        unsafe { libc::atexit(stop_shared) };
        Mutex::new(Some(r))
    });
    m.lock().unwrap().as_ref().unwrap().addr.clone()
}

/// A fresh store with `ADDR/repo_tag` pulled (and unpacked); the image's name.
pub fn pulled(addr: &str, repo_tag: &str) -> (Cstore, String) {
    let cs = Cstore::new();
    let image = format!("{addr}/{repo_tag}");
    cs.ok(&["pull", &image]);
    (cs, image)
}

/// A cstore store in a temp dir and a way to run the binary on it.
pub struct Cstore {
    pub root: tempfile::TempDir,
    pub env: Vec<(String, String)>,
}

impl Cstore {
    pub fn new() -> Cstore {
        Cstore {
            root: tempfile::Builder::new()
                .prefix("cstore-root-")
                .tempdir()
                .unwrap(),
            env: vec![],
        }
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// The store's lazy keeper or daemon by its pid file, if that pid is
    /// still a `cstore lazy-keeper`/`lazy-serve` of this store (a stale
    /// file's pid may have been reused by anything).
    fn lazy_process(&self, file: &str, role: &str) -> Option<libc::pid_t> {
        let pid: libc::pid_t = std::fs::read_to_string(self.path().join("lazy").join(file))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let root = self.path().as_os_str().as_encoded_bytes();
        (args.contains(&role.as_bytes()) && args.contains(&root)).then_some(pid)
    }

    /// Mount points at or under the store's root, deepest first.
    fn mounts_under_root(&self) -> Vec<(String, String)> {
        let root = self.path().display().to_string();
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut v: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let point = f.get(4)?.replace("\\040", " ");
                let fstype = f.iter().skip_while(|x| **x != "-").nth(1)?;
                (point == root || point.starts_with(&format!("{root}/")))
                    .then(|| (point, fstype.to_string()))
            })
            .collect();
        v.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        v
    }
}

/// Store teardown: before the temp root is deleted, stop the store's lazy
/// keeper and daemon and unmount whatever is still mounted under it (else the
/// daemon dies on the deleted store and its FUSE mounts stay as dead
/// entries). A daemon's own FUSE mounts while it still runs are its business
/// (it lets go of them a few seconds after its layers complete, which a test
/// need not wait for); any other mount left under the root is a leak a
/// correct run would not have, and fails the test: a warning would be
/// captured with the passing test's output and never seen.
impl Drop for Cstore {
    fn drop(&mut self) {
        let mut daemon_ran = false;
        // The keeper first, and dead, before the daemon: else it would start
        // another daemon, which could mount after the unmounts below.
        for (file, role) in [("keeper.pid", "lazy-keeper"), ("daemon.pid", "lazy-serve")] {
            if let Some(pid) = self.lazy_process(file, role) {
                daemon_ran = true;
                // SAFETY: this store's keeper or daemon, checked by its cmdline.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let t = std::time::Instant::now();
                while self.lazy_process(file, role) == Some(pid)
                    && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .is_ok_and(|s| !s.contains(") Z "))
                    && t.elapsed() < std::time::Duration::from_secs(5)
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        let lazy = self.path().join("lazy").display().to_string();
        let mut leaked = Vec::new();
        for (point, fstype) in self.mounts_under_root() {
            let own = daemon_ran && fstype.starts_with("fuse") && point.starts_with(&lazy);
            if !own {
                leaked.push(format!("{point} ({fstype})"));
            }
            // SAFETY: a NUL-terminated path; detached, so busy mounts go too.
            let c = std::ffi::CString::new(point.clone()).unwrap();
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!(
                    "cstore test teardown: umount {point}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        if !leaked.is_empty() {
            let msg = format!(
                "the test left mounts under its store {} (unmounted now): {}",
                self.path().display(),
                leaked.join(", ")
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

impl Cstore {
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cstore"));
        c.arg("--root").arg(self.root.path()).args(args);
        // Never read the developer's own docker credentials.
        c.env("DOCKER_CONFIG", self.root.path().join("no-docker-config"));
        c.env_remove("CSTORE_ROOT").env_remove("CSTORE_CREDS");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run cstore")
    }

    /// Run, assert success, return stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "cstore {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run; exit code (-1 when killed), stdout and stderr.
    pub fn outcome(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.run(args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Run; exit code (-1 when killed), stdout, stderr and the peak resident
    /// memory of the cstore process in KiB, as GNU time reports it.
    ///
    /// Not the rusage of a child of this process: Linux carries the old mm's
    /// high-water mark across exec into the new program's maxrss, so a child
    /// spawned from here reports at least this test process's own peak
    /// (about 100 MiB in a full parallel run, whatever cstore used). GNU
    /// time is small, and cstore is its child, so its figure is cstore's.
    pub fn outcome_with_peak_rss(&self, args: &[&str]) -> (i32, String, String, u64) {
        let inner = self.cmd(args);
        let report = tempfile::NamedTempFile::new().unwrap();
        let mut timed = Command::new("/usr/bin/time");
        timed
            .args(["--format", "%M", "--output"])
            .arg(report.path())
            .arg(inner.get_program())
            .args(inner.get_args())
            .stdin(Stdio::null());
        for (k, v) in inner.get_envs() {
            match v {
                Some(v) => timed.env(k, v),
                None => timed.env_remove(k),
            };
        }
        let out = timed
            .output()
            .expect("GNU time (Debian's time package; fixtures/deps.sh installs it)");
        // GNU time exits with the command's status; killed by a signal,
        // with 128 + the signal.
        let code = match out.status.code() {
            Some(c) if c < 128 => c,
            _ => -1,
        };
        let text = std::fs::read_to_string(report.path()).unwrap();
        // A failed command's status is noted on a line before the figure.
        let rss = text
            .lines()
            .rev()
            .find_map(|l| l.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no peak RSS in GNU time's report: {text:?}"));
        (
            code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            rss,
        )
    }

    /// Nothing is mounted under the store (containers' rootfs included).
    pub fn assert_nothing_mounted(&self) {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&self.path().display().to_string()),
            "something is still mounted under the store"
        );
    }

    /// No container snapshot is left, and nothing is mounted.
    pub fn assert_no_containers(&self) {
        let snaps = self.ok(&["snapshots", "--json"]);
        assert!(!snaps.contains("cstore-run:"), "{snaps}");
        self.assert_nothing_mounted();
    }

    /// Run, assert failure, return stderr.
    pub fn fail(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "cstore {args:?} should have failed:\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn images(&self) -> Vec<Value> {
        serde_json::from_str::<Value>(&self.ok(&["images", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// The blobs pulled from a registry: all but the layer indexes (and
    /// their windows) that unpack records beside them (docs/lazy.md), as
    /// `index ls` names them for each image.
    pub fn pulled_blob_names(&self) -> Vec<String> {
        let mut local = std::collections::BTreeSet::new();
        for img in self.images() {
            let name = img["name"].as_str().unwrap();
            let rows: Value =
                serde_json::from_str(&self.ok(&["index", "ls", "--json", name])).unwrap();
            for r in rows.as_array().unwrap() {
                for k in ["digest", "windows"] {
                    if let Some(d) = r["index"][k].as_str() {
                        local.insert(d.trim_start_matches("sha256:").to_string());
                    }
                }
            }
        }
        self.blob_names()
            .into_iter()
            .filter(|b| !local.contains(b))
            .collect()
    }

    pub fn blob_names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    /// The oracle for the store: every file under blobs/ hashes to its name.
    pub fn assert_blobs_verified(&self) {
        for name in self.blob_names() {
            let bytes = std::fs::read(self.path().join("blobs/sha256").join(&name)).unwrap();
            assert_eq!(
                hex::encode(Sha256::digest(&bytes)),
                name,
                "blob {name} does not hash to its name"
            );
        }
    }

    pub fn partials(&self) -> Vec<String> {
        std::fs::read_dir(self.path().join("ingest"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.ends_with(".partial"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The peer oracle: skopeo reads the image back out of our OCI layout.
    pub fn assert_skopeo_copies(&self, name: &str) {
        let dest = tempfile::tempdir().unwrap();
        let out = Command::new("skopeo")
            .args(["copy", "-q"])
            .arg(format!("oci:{}:{name}", self.path().display()))
            .arg(format!("oci:{}:copy", dest.path().display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy oci:ROOT:{name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
