//! What the integration tests of several crates (cli, fuse-fs, registry,
//! snapshotter, unpack) start from fixtures/: a CNCF distribution registry
//! (registry.sh), the fault proxy (faultproxy.py), a token-mode registry
//! (tokenauth.sh), the tree oracle's description of a tree (treesnap.py),
//! and the commands they run asserted. Everything started
//! here is stopped on drop. A dev-dependency only: nothing here ships.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("fixtures").join(name)
}

/// The canonical description of a tree. Directory mtimes are left out: in an
/// overlay mount a directory's mtime is its upper-most layer's copy (for
/// directories a layer only implies, the time cstore made them), while umoci
/// writes into one directory and the kernel updates it as entries land.
/// Whiteouts' mtimes too: extraction makes them (mknod) with the time they
/// were made, so two extractions of one layer differ there by the clock.
/// Overlay's own `trusted.overlay.*` xattrs (opaque marks) are not content,
/// and `user.rootlesscontainers` is umoci's rootless bookkeeping.
pub fn treesnap(dir: &Path) -> String {
    run(Command::new("python3")
        .arg(fixture("treesnap.py"))
        .arg(dir)
        .args(["--no-mtime-dirs", "--no-mtime-whiteouts"])
        .args(["--ignore-xattr", "trusted.overlay."])
        .args(["--ignore-xattr", "user.rootlesscontainers"]))
}

/// treesnap leaves the root itself out: its mode, owner and xattrs.
pub fn root_attrs(dir: &Path) -> String {
    run(Command::new("python3")
        .arg("-c")
        .arg(
            "import os, sys; st = os.lstat(sys.argv[1]); \
         xs = {k: os.getxattr(sys.argv[1], k).hex() for k in sorted(os.listxattr(sys.argv[1])) \
               if not k.startswith(('trusted.overlay.', 'user.rootlesscontainers'))}; \
         print(oct(st.st_mode), st.st_uid, st.st_gid, xs)",
        )
        .arg(dir))
}

/// Run `cmd`, asserting success; its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run a fixtures/ script, asserting success; its stdout.
pub fn run_fixture(name: &str, args: &[&str]) -> String {
    run(Command::new("bash").arg(fixture(name)).args(args))
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
        let out = Command::new("bash")
            .arg(fixture("registry.sh"))
            .arg("start")
            .arg(state.path())
            .args(extra)
            .output()
            .unwrap();
        // Built before checking, so a half-started registry is stopped on drop.
        let r = Registry {
            addr: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            state,
        };
        assert!(
            out.status.success(),
            "fixtures/registry.sh start {extra:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        r
    }

    /// Push the test images (busybox:{latest,docker,zstd,uncompressed}, multi:latest).
    pub fn push(&self, creds: Option<&str>) {
        push(&self.addr, creds);
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

/// fixtures/push.sh: the test images to the registry at `addr`.
pub fn push(addr: &str, creds: Option<&str>) {
    let mut args = vec![addr];
    if let Some(c) = creds {
        args.extend(["--creds", c]);
    }
    run_fixture("push.sh", &args);
}

/// fixtures/faultproxy.py in front of an upstream registry, killed on drop.
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
        FaultProxy::start_with(host, upstream, &[])
    }

    /// With more options of fixtures/faultproxy.py (e.g. `--path-prefix P`).
    pub fn start_with(host: &str, upstream: &str, extra: &[&str]) -> FaultProxy {
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
            .args(extra)
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

    /// The byte ranges of `digest` asked through the proxy, in log order; every
    /// request for it must be a Range GET (a whole-blob GET panics, named).
    pub fn ranges_of(&self, digest: &str) -> Vec<std::ops::Range<u64>> {
        self.log()
            .iter()
            .filter(|e| e["path"].as_str().is_some_and(|p| p.contains(digest)))
            .map(|e| {
                let r = e["range"].as_str().unwrap_or("");
                let (a, b) = r
                    .trim_start_matches("bytes=")
                    .split_once('-')
                    .unwrap_or_else(|| panic!("a whole-blob GET of {digest}: {e}"));
                a.parse::<u64>().unwrap()..b.parse::<u64>().unwrap() + 1
            })
            .collect()
    }

    /// Bytes of `digest` asked through the proxy, all by Range GETs.
    pub fn ranged_bytes(&self, digest: &str) -> u64 {
        self.ranges_of(digest).iter().map(|r| r.end - r.start).sum()
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

/// fixtures/tokenauth.sh: a token server and a registry in token mode,
/// stopped on drop.
pub struct TokenAuth {
    pub registry: String,
    pub token: String,
    dir: tempfile::TempDir,
}

impl TokenAuth {
    /// `users`: `user:pass[,user:pass...]`.
    pub fn start(users: &str) -> TokenAuth {
        let dir = tempfile::Builder::new()
            .prefix("cstore-tokenauth-")
            .tempdir()
            .unwrap();
        let out = Command::new("bash")
            .arg(fixture("tokenauth.sh"))
            .arg("start")
            .arg(dir.path())
            .args(["--users", users])
            .output()
            .unwrap();
        // Built before checking, so a half-started pair is stopped on drop.
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut addrs = text.split_whitespace().map(String::from);
        let t = TokenAuth {
            registry: addrs.next().unwrap_or_default(),
            token: addrs.next().unwrap_or_default(),
            dir,
        };
        assert!(
            out.status.success() && !t.token.is_empty(),
            "tokenauth.sh start: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    /// The token server's counters (requests, by_scope, by_user, denied).
    pub fn stats(&self) -> Value {
        serde_json::from_str(&http(&self.token, "GET", "/stats", None)).unwrap()
    }

    pub fn reset_stats(&self) {
        http(&self.token, "DELETE", "/stats", None);
    }
}

impl Drop for TokenAuth {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(fixture("tokenauth.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .output();
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
