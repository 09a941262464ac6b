//! Containers: run-and-assert helpers for `cstore run`, `ps` and what a
//! container must leave behind, and the cgroup files a container sees of its
//! own limits on the hierarchy this machine has (detected, never assumed).

use std::path::Path;

use serde_json::Value;

use super::{pulled, run_fixture, shared_registry_addr, Cstore};

/// A fresh store with the busybox test image pulled; the image's name.
pub fn busybox() -> (Cstore, String) {
    pulled(&shared_registry_addr(), "busybox:latest")
}

/// The shared registry with fixtures/run-images.sh's images pushed too
/// (once per test run).
pub fn run_images_registry() -> &'static str {
    static ADDR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ADDR.get_or_init(|| {
        let addr = shared_registry_addr();
        run_fixture("run-images.sh", &["--push", &addr]);
        addr
    })
}

/// A container name no concurrent test uses: cgroup paths (/cstore/NAME)
/// are host-wide, whatever the store.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{nanos:x}-{n}", std::process::id())
}

/// Kills and reaps a background `cstore run` if a test fails midway.
pub struct Background(pub std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Cstore {
    /// `cstore ARGS` (a `run --name NAME …` that keeps running) in the
    /// background, once `ps` shows NAME running: the run and its `ps` row.
    pub fn start_running(&self, args: &[&str], name: &str) -> (Background, Value) {
        let bg = Background(
            self.cmd(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let running = self
                .ps(false)
                .into_iter()
                .find(|c| c["name"] == name && c["state"] == "running");
            if let Some(c) = running {
                return (bg, c);
            }
            assert!(std::time::Instant::now() < deadline, "{name} never ran");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// `cstore run --rm ARGS`: exit code, stdout, stderr.
    pub fn run_rm(&self, args: &[&str]) -> (i32, String, String) {
        let mut a = vec!["run", "--rm"];
        a.extend_from_slice(args);
        self.outcome(&a)
    }

    /// stdout's lines of a `cstore run --rm ARGS` that must succeed.
    pub fn run_lines(&self, args: &[&str]) -> Vec<String> {
        let (code, out, err) = self.run_rm(args);
        assert_eq!(code, 0, "run {args:?}: {err}");
        out.lines().map(str::to_string).collect()
    }

    /// stderr of a `cstore run --rm ARGS` that must fail; nothing of a
    /// container is left.
    pub fn run_fails(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run_rm(args);
        assert_ne!(code, 0, "run {args:?} should have failed: {out}");
        self.assert_no_containers();
        err
    }

    /// `cstore ps --json` (with `all`, `-a`).
    pub fn ps(&self, all: bool) -> Vec<Value> {
        let mut args = vec!["ps", "--json"];
        if all {
            args.push("-a");
        }
        serde_json::from_str::<Value>(&self.ok(&args))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// Nothing of container `name` is left: no mount under the store, no
    /// snapshot, directory, record, libcontainer state or cgroup directory,
    /// and `ps -a` does not list it.
    pub fn assert_container_gone(&self, name: &str) {
        self.assert_nothing_mounted();
        let snaps = self.ok(&["snapshots", "--json"]);
        assert!(!snaps.contains(&format!("cstore-run:{name}")), "{snaps}");
        assert!(!self.path().join("containers").join(name).exists());
        assert!(!self.path().join("run-state").join(name).exists());
        let ps = self.ps(true);
        assert!(ps.iter().all(|c| c["name"] != name), "{ps:?}");
        for leaf in Cgroups::detect().host_dirs(name) {
            assert!(!leaf.exists(), "{} is left", leaf.display());
        }
    }

    /// No container at all in the store, not even a record or an empty
    /// directory: what a refusal before anything is made leaves.
    pub fn assert_no_container_at_all(&self) {
        let ps = self.ps(true);
        assert!(ps.is_empty(), "{ps:?}");
        self.assert_no_containers();
        for d in ["containers", "run-state"] {
            assert!(
                std::fs::read_dir(self.path().join(d)).map_or(true, |mut d| d.next().is_none()),
                "{d} is not empty"
            );
        }
    }
}

/// Where a container finds its own cgroup limits: under v1 each controller
/// has its hierarchy mounted at /sys/fs/cgroup/CONTROLLER in the container;
/// under v2 (cgroup namespace) /sys/fs/cgroup is the container's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cgroups {
    V1,
    V2,
}

impl Cgroups {
    /// The hierarchy the io controller is on here (as `cstore run` finds it).
    pub fn detect() -> Cgroups {
        match cstore_runtime::Hierarchy::detect() {
            Ok(cstore_runtime::Hierarchy::V1Blkio(_)) => Cgroups::V1,
            Ok(cstore_runtime::Hierarchy::V2(_)) => Cgroups::V2,
            Err(e) => panic!("no cgroup hierarchy with the io controller: {e}"),
        }
    }

    /// The file, in the container, that holds its read-bandwidth limit.
    pub fn read_bps_file(self) -> &'static str {
        match self {
            Cgroups::V1 => "/sys/fs/cgroup/blkio/blkio.throttle.read_bps_device",
            Cgroups::V2 => "/sys/fs/cgroup/io.max",
        }
    }

    /// That file's line for a read limit of `rate` bytes/s on `dev` (MAJ:MIN).
    pub fn read_bps_line(self, dev: &str, rate: u64) -> String {
        match self {
            Cgroups::V1 => format!("{dev} {rate}"),
            Cgroups::V2 => format!("{dev} rbps={rate} wbps=max riops=max wiops=max"),
        }
    }

    /// The container's memory limit file.
    pub fn memory_max_file(self) -> &'static str {
        match self {
            Cgroups::V1 => "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            Cgroups::V2 => "/sys/fs/cgroup/memory.max",
        }
    }

    /// The container's pids limit file.
    pub fn pids_max_file(self) -> &'static str {
        match self {
            Cgroups::V1 => "/sys/fs/cgroup/pids/pids.max",
            Cgroups::V2 => "/sys/fs/cgroup/pids.max",
        }
    }

    /// Whether `value` (of the memory limit file) is "no limit": v2 says
    /// max, v1 a number near 2^63.
    pub fn is_unlimited_memory(self, value: &str) -> bool {
        match self {
            Cgroups::V1 => value.parse::<u64>().is_ok_and(|v| v > 1 << 40),
            Cgroups::V2 => value == "max",
        }
    }

    /// The host directories of container `name`'s cgroup (/cstore/NAME
    /// under each v1 hierarchy, or under the unified one).
    pub fn host_dirs(self, name: &str) -> Vec<std::path::PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        match self {
            Cgroups::V1 => std::fs::read_dir(root)
                .unwrap()
                .flatten()
                .map(|h| h.path().join("cstore").join(name))
                .collect(),
            Cgroups::V2 => vec![root.join("cstore").join(name)],
        }
    }
}
