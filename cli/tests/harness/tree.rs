//! Trees and mounts: the umoci/treesnap oracle for the trees cstore mounts,
//! mount points undone however a test ends, and `cstore snapshots` as the
//! store describes them. Shared by the mount and unpack tests (and the
//! snapshot listing by the containerd tests).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use serde_json::Value;

pub use super::run;
use super::{fixture, shared_registry_addr, Cstore};

/// The OCI layout fixtures/images.sh builds (and umoci unpacks from).
pub fn oci_dir() -> PathBuf {
    PathBuf::from(
        run(Command::new("bash")
            .arg(fixture("images.sh"))
            .arg("--print-dir"))
        .trim(),
    )
}

/// The shared registry, with the `layered` images of
/// fixtures/layered-images.sh pushed too (each once per test run).
pub fn registry_with_layered(layered: &[&str]) -> String {
    // Each module asks for the set it needs; each image is pushed once per
    // test run, under the lock (a second asker waits for the push).
    static PUSHED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let addr = shared_registry_addr();
    let mut pushed = PUSHED.lock().unwrap_or_else(|p| p.into_inner());
    let missing: Vec<&str> = layered
        .iter()
        .copied()
        .filter(|l| !pushed.contains(*l))
        .collect();
    if !missing.is_empty() {
        run(Command::new("bash")
            .arg(fixture("layered-images.sh"))
            .args(["--push", &addr])
            .args(&missing));
        pushed.extend(missing.iter().map(|s| s.to_string()));
    }
    addr
}

pub use cstore_testkit::{root_attrs, treesnap};

/// `umoci unpack --image OCI:TAG` (once per tag): its rootfs described by
/// treesnap, and the rootfs's own attributes (root_attrs).
fn umoci_unpack(tag: &str) -> (String, String) {
    static CACHE: OnceLock<Mutex<HashMap<String, (String, String)>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(t) = cache.lock().unwrap().get(tag) {
        return t.clone();
    }
    let tmp = tempfile::Builder::new()
        .prefix("cstore-umoci-")
        .tempdir()
        .unwrap();
    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", oci_dir().display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    let unpacked = (treesnap(&rootfs), root_attrs(&rootfs));
    cache
        .lock()
        .unwrap()
        .insert(tag.to_string(), unpacked.clone());
    unpacked
}

/// treesnap of umoci's unpack of fixtures tag `tag`.
pub fn umoci_tree(tag: &str) -> String {
    umoci_unpack(tag).0
}

/// root_attrs of umoci's unpack of fixtures tag `tag`.
pub fn umoci_root_attrs(tag: &str) -> String {
    umoci_unpack(tag).1
}

/// A line-by-line diff of two treesnap outputs, for an assertion message:
/// `- {want_label} LINE` for lines only in `want`, `+ {got_label} LINE` for
/// lines only in `got` (20 of each at most).
pub fn tree_diff(want: &str, got: &str, want_label: &str, got_label: &str) -> String {
    let w: std::collections::BTreeSet<&str> = want.lines().collect();
    let g: std::collections::BTreeSet<&str> = got.lines().collect();
    let mut out = String::new();
    for l in w.difference(&g).take(20) {
        out += &format!("- {want_label} {l}\n");
    }
    for l in g.difference(&w).take(20) {
        out += &format!("+ {got_label} {l}\n");
    }
    out
}

/// The mount entry (mountinfo line) at `p`, if `p` is a mount point.
pub fn mountinfo(p: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = p.to_str().unwrap();
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(want))
        .map(String::from)
}

pub fn is_mountpoint(p: &Path) -> bool {
    mountinfo(p).is_some()
}

/// A mount point (canonical path, as mountinfo shows it) that is unmounted,
/// lazily, however the test ends.
pub struct MountDir {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl MountDir {
    pub fn new() -> MountDir {
        let dir = tempfile::Builder::new()
            .prefix("cstore-mnt-")
            .tempdir()
            .unwrap();
        let path = dir.path().canonicalize().unwrap();
        MountDir { _dir: dir, path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn s(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for MountDir {
    fn drop(&mut self) {
        while is_mountpoint(&self.path) {
            let ok = Command::new("umount")
                .arg("-l")
                .arg(&self.path)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                break;
            }
        }
    }
}

/// `cstore snapshots --json`.
pub fn snapshots(cs: &Cstore) -> Vec<Value> {
    serde_json::from_str::<Value>(&cs.ok(&["snapshots", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The entries left in ROOT/snapshots/staging.
pub fn staging_leftovers(cs: &Cstore) -> Vec<String> {
    std::fs::read_dir(cs.path().join("snapshots/staging"))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}
