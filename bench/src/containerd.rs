//! The peer: a private containerd 1.6 with runc and its overlayfs
//! snapshotter, root and state on the class's filesystem, in a mount
//! namespace of its own with a tmpfs on /run (1.6 puts its shim sockets and
//! ctr's FIFOs under /run/containerd whatever the config says: this keeps
//! them, and every mount containerd makes, off the host). `ctr` joins that
//! namespace with nsenter. Stopping kills its containers, shims and
//! containerd; the namespace and its mounts go with the last of them.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::proc::{self, Cmd, Daemon};
use crate::sys;

pub struct Containerd {
    pub dir: PathBuf,
    pub sock: PathBuf,
    /// The containerd namespace: the run id, so runc's cgroups are
    /// /NS/ID in each hierarchy, ours to sweep.
    pub ns: String,
    cgroup: Option<PathBuf>,
    daemon: Daemon,
    mnt_ns: String,
}

impl Containerd {
    /// Start one with everything under `dir` (made fresh), in `cgroup`.
    pub fn start(dir: &Path, ns: &str, cgroup: Option<&Path>) -> Result<Containerd> {
        for tool in ["containerd", "ctr", "runc", "unshare", "nsenter"] {
            if !proc::have(tool) {
                return Err(Error::MissingTool {
                    tool: tool.into(),
                    what: "the peer (a private containerd 1.6 with runc)".into(),
                });
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io("mkdir", dir, e))?;
        let sock = dir.join("c.sock");
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
  level = "warn"
"#,
            d = dir.display(),
            s = sock.display()
        );
        let cfg = dir.join("config.toml");
        std::fs::write(&cfg, config).map_err(|e| Error::io("write", &cfg, e))?;
        let logp = dir.join("containerd.log");
        let log = std::fs::File::create(&logp).map_err(|e| Error::io("create", &logp, e))?;
        // unshare execs sh, which execs containerd: the child's pid is containerd's.
        let cmd = Cmd::new("unshare", "starting containerd")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount -t tmpfs -o mode=0755 tmpfs /run && exec containerd --config \"$1\"")
            .arg("sh")
            .arg(&cfg)
            .cgroup(cgroup);
        let daemon = Daemon::spawn(&cmd, log)?;
        let mut c = Containerd {
            dir: dir.to_path_buf(),
            sock: sock.clone(),
            ns: ns.to_string(),
            cgroup: cgroup.map(Path::to_path_buf),
            daemon,
            mnt_ns: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = c.daemon.exited() {
                return Err(Error::Command {
                    what: "starting containerd".into(),
                    cmd: cmd.display(),
                    status: proc::describe(st),
                    stderr: c.log_tail(),
                });
            }
            if UnixStream::connect(&sock).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Command {
                    what: "starting containerd".into(),
                    cmd: cmd.display(),
                    status: "did not listen within 60 s".into(),
                    stderr: c.log_tail(),
                });
            }
            proc::sleep(Duration::from_millis(20))?;
        }
        let pid = c.daemon.pid().unwrap_or(0);
        c.mnt_ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(c)
    }

    /// `ctr` in containerd's mount namespace, on its socket and namespace,
    /// in the class's cgroup.
    pub fn ctr(&self, what: &str) -> Cmd {
        Cmd::new("nsenter", what)
            .arg(format!(
                "--mount=/proc/{}/ns/mnt",
                self.daemon.pid().unwrap_or(0)
            ))
            .args(["--", "ctr", "--address"])
            .arg(&self.sock)
            .args(["--namespace", &self.ns])
            .cgroup(self.cgroup.as_deref())
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        proc::tail(&log, 20)
    }

    /// Kill its containers, shims and itself; remove runc's cgroups.
    pub fn stop(&mut self) {
        let Some(pid) = self.daemon.pid() else {
            return;
        };
        let tasks = self
            .dir
            .join("state/io.containerd.runtime.v2.task")
            .join(&self.ns);
        for task in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
            if let Ok(p) = std::fs::read_to_string(task.path().join("init.pid")) {
                if let Ok(p) = p.trim().parse::<u32>() {
                    proc::kill(p, libc::SIGKILL);
                }
            }
        }
        self.kill_namespace(Some(pid));
        self.daemon.stop(Duration::from_secs(5));
        // Whatever containerd started after the first sweep.
        self.kill_namespace(None);
        for h in sys::cgroup_hierarchies() {
            let cg = h.join(&self.ns);
            if let Err(e) = sys::remove_cgroup(&cg) {
                eprintln!("cstore bench suite: cleanup: {e}");
            }
        }
    }

    /// SIGKILL every process in containerd's mount namespace but `except`,
    /// until none is left.
    fn kill_namespace(&self, except: Option<u32>) {
        if self.mnt_ns.is_empty() {
            return;
        }
        for _ in 0..50 {
            let mut left = 0;
            for p in proc::all_pids() {
                if Some(p) != except
                    && std::fs::read_link(format!("/proc/{p}/ns/mnt"))
                        .is_ok_and(|l| l.to_string_lossy() == self.mnt_ns)
                {
                    proc::kill(p, libc::SIGKILL);
                    left += 1;
                }
            }
            if left == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}
