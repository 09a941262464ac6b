//! Test harness: real registries (fixtures/registry.sh), real images
//! (fixtures/images.sh + push.sh), the fault proxy, and a cstore binary
//! pointed at a temp root. Everything started here is stopped on drop, or at
//! process exit for the shared registry.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

pub mod loopfs;
pub mod tree;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("fixtures").join(name)
}

/// Run a fixtures/ script, asserting success; its stdout.
pub fn run_fixture(name: &str, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(fixture(name))
        .args(args)
        .output()
        .expect("run fixture");
    assert!(
        out.status.success(),
        "fixtures/{name} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A throwaway CNCF distribution registry on 127.0.0.1.
pub struct Registry {
    pub addr: String,
    pub state: tempfile::TempDir,
}

impl Registry {
    /// `extra`: e.g. `["--htpasswd", "user:pass"]`.
    pub fn start(extra: &[&str]) -> Registry {
        let state = tempfile::Builder::new()
            .prefix("cstore-registry-")
            .tempdir()
            .unwrap();
        let mut args = vec!["start", state.path().to_str().unwrap()];
        args.extend_from_slice(extra);
        let addr = run_fixture("registry.sh", &args).trim().to_string();
        Registry { addr, state }
    }

    /// Push the test images (busybox:{latest,docker,zstd,uncompressed}, multi:latest).
    pub fn push(&self, creds: Option<&str>) {
        let mut args = vec![self.addr.as_str()];
        if let Some(c) = creds {
            args.extend(["--creds", c]);
        }
        run_fixture("push.sh", &args);
    }

    pub fn image(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    pub fn stop(&self) {
        let _ = Command::new("bash")
            .arg(fixture("registry.sh"))
            .args(["stop", self.state.path().to_str().unwrap()])
            .output();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

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
    /// memory of the cstore process in KiB (its rusage from wait4, which
    /// the kernel keeps for a child until it is reaped).
    // Reaped by wait4 below, which std's Child cannot see.
    #[allow(clippy::zombie_processes)]
    pub fn outcome_with_peak_rss(&self, args: &[&str]) -> (i32, String, String, u64) {
        let mut child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cstore");
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let mut stderr = String::new();
        let _ = err.read_to_string(&mut stderr);
        let stdout = reader.join().unwrap();
        let mut status = 0;
        // SAFETY: rusage is plain data; the pid is our own unreaped child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let pid = child.id() as libc::pid_t;
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        };
        (code, stdout, stderr, usage.ru_maxrss as u64)
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

/// fixtures/faultproxy.py in front of an upstream registry.
pub struct FaultProxy {
    pub addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl FaultProxy {
    pub fn start(upstream: &str) -> FaultProxy {
        FaultProxy::start_on("127.0.0.1", upstream)
    }

    /// Listening on `host` (127.0.0.2 is another host to a client than
    /// 127.0.0.1, and all of 127/8 is loopback on Linux).
    pub fn start_on(host: &str, upstream: &str) -> FaultProxy {
        let dir = tempfile::tempdir().unwrap();
        let portfile = dir.path().join("port");
        let child = Command::new("python3")
            .arg(fixture("faultproxy.py"))
            .args([
                "--upstream",
                upstream,
                "--host",
                host,
                "--port",
                "0",
                "--portfile",
            ])
            .arg(&portfile)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&portfile) {
                if !p.trim().is_empty() {
                    break p.trim().to_string();
                }
            }
            assert!(Instant::now() < deadline, "fault proxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        FaultProxy {
            addr: format!("{host}:{port}"),
            child,
            _dir: dir,
        }
    }

    /// Replace the fault rules (see fixtures/faultproxy.py).
    pub fn set(&self, rules: Value) {
        http(&self.addr, "POST", "/__fault", Some(&rules.to_string()));
    }

    pub fn clear(&self) {
        http(&self.addr, "DELETE", "/__fault", None);
        http(&self.addr, "DELETE", "/__log", None);
    }

    pub fn log(&self) -> Vec<Value> {
        let v: Value = serde_json::from_str(&http(&self.addr, "GET", "/__log", None)).unwrap();
        match v {
            Value::Array(a) => a,
            Value::Object(mut o) => o
                .remove("log")
                .and_then(|l| l.as_array().cloned())
                .unwrap_or_default(),
            _ => vec![],
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Minimal HTTP/1.1 client for the fixtures' control endpoints.
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    assert!(
        head.starts_with("HTTP/1.1 2") || head.starts_with("HTTP/1.0 2"),
        "{method} {path}: {head}"
    );
    body.to_string()
}
