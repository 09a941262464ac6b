//! Hostile images and other local users against the store (issue #12,
//! findings 1 and 2), with real peers: crafted layers
//! (fixtures/evil-tars.py) on top of the busybox test image, pushed to the
//! shared CNCF distribution registry and pulled by cstore; umoci's unpack of
//! the same image as the oracle for what the layers make; real containers;
//! and an unprivileged user (uid 65534) trying what a local attacker would.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tree::{oci_dir, root_attrs, run, tree_diff, treesnap, MountDir};
use common::{fixture, pulled, shared_registry_addr, Cstore};

/// A name no concurrent test uses (cgroups /cstore/NAME are host-wide).
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

/// busybox plus the two layers of `evil-tars.py --escape-layers TARGET`,
/// in an OCI layout of its own (for umoci) and pushed to the registry.
struct EscapeImage {
    reference: String,
    work: tempfile::TempDir,
}

impl EscapeImage {
    fn build(target: &Path) -> EscapeImage {
        let work = tempfile::Builder::new()
            .prefix("cstore-escape-")
            .tempdir()
            .unwrap();
        let tars = work.path().join("tars");
        run(Command::new("python3")
            .arg(fixture("evil-tars.py"))
            .arg("--escape-layers")
            .arg(target)
            .arg("/usr/bin/id")
            .arg(&tars));
        let layout = format!("{}:escape", work.path().join("oci").display());
        run(Command::new("skopeo")
            .args(["copy", "-q"])
            .arg(format!("oci:{}:busybox", oci_dir().display()))
            .arg(format!("oci:{layout}")));
        for tar in ["escape-lower.tar", "escape-upper.tar"] {
            run(Command::new("umoci")
                .args(["raw", "add-layer", "--image", &layout])
                .arg(tars.join(tar)));
        }
        let reference = format!("{}/{}:latest", shared_registry_addr(), unique("escape"));
        run(Command::new("skopeo")
            .args([
                "copy",
                "-q",
                "--dest-tls-verify=false",
                "--preserve-digests",
            ])
            .arg(format!("oci:{layout}"))
            .arg(format!("docker://{reference}")));
        EscapeImage { reference, work }
    }

    /// umoci's unpack of the image: (treesnap of the rootfs, its root's attributes).
    fn umoci_unpack(&self) -> (String, String) {
        let bundle = self.work.path().join("bundle");
        run(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:escape", self.work.path().join("oci").display()))
            .arg(&bundle));
        let rootfs = bundle.join("rootfs");
        (treesnap(&rootfs), root_attrs(&rootfs))
    }
}

/// Owner, mode and xattrs of `dir` and of everything in it.
fn describe(dir: &Path) -> String {
    format!("{}root {}", treesnap(dir), root_attrs(dir))
}

/// `snapshots/*/fs/REL` in the store, by snapshot directory.
fn in_snapshots(cs: &Cstore, rel: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cs.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path().join("fs").join(rel))
        .filter(|p| p.symlink_metadata().is_ok())
        .collect();
    v.sort();
    v
}

/// Run `sh -c script` as uid/gid `id` with no supplementary groups (std's
/// Command drops root's groups when it sets a uid): success and the output.
fn as_user(id: u32, script: &str) -> (bool, String) {
    let out = Command::new("sh")
        .args(["-c", script])
        .uid(id)
        .gid(id)
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const NOBODY: u32 = 65534;

/// As uid 65534, `script` must fail with EACCES.
fn nobody_is_refused(script: &str) {
    let (ok, out) = as_user(NOBODY, script);
    assert!(
        !ok && out.contains("Permission denied"),
        "as uid 65534, `{script}` must fail with EACCES; got (success {ok}): {out}"
    );
}

fn mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// A `cstore run` in the background that `cstore rm -f` ends however the
/// test ends.
struct Running<'a> {
    cs: &'a Cstore,
    name: String,
    child: std::process::Child,
}

impl<'a> Running<'a> {
    /// Start `args` (run options and image) with `sh -c script` and wait
    /// for `ready` to appear in the container's upper dir.
    fn start(cs: &'a Cstore, name: &str, args: &[&str], script: &str) -> Running<'a> {
        let mut a = vec!["run", "--name", name];
        a.extend_from_slice(args);
        a.extend(["sh", "-c", script]);
        let child = cs
            .cmd(&a)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut r = Running {
            cs,
            name: name.to_string(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while in_snapshots(cs, "ready").is_empty() {
            if let Some(st) = r.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                r.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("container {name} ended early ({st}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "container {name} never got ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = self.cs.run(&["rm", "-f", &self.name]);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// Finding 1: the upper layer makes `x` and `x/secret` implicit parents, then
// replaces `x` with a symlink to a host directory; the lower layer has
// `x/secret` 4777 1234:1234 with an xattr. Giving implicit parents the lower
// layer's attributes by path chowned, chmodded and set xattrs on the host's
// TARGET/secret (and chmodded TARGET itself), and the pull exited 0.
#[test]
fn a_pull_never_touches_the_host_through_a_replaced_implicit_parent() {
    let host = tempfile::Builder::new()
        .prefix("cstore-host-")
        .tempdir()
        .unwrap();
    let target = host.path().canonicalize().unwrap();
    std::fs::create_dir(target.join("secret")).unwrap();
    std::fs::write(target.join("secret/data"), "host data\n").unwrap();
    for (p, m) in [("", 0o700), ("secret", 0o700), ("secret/data", 0o600)] {
        std::fs::set_permissions(
            target.join(p),
            std::os::unix::fs::PermissionsExt::from_mode(m),
        )
        .unwrap();
    }
    let before = describe(&target);

    let image = EscapeImage::build(&target);
    let cs = Cstore::new();
    cs.ok(&["pull", &image.reference]);
    let after = describe(&target);
    assert!(
        before == after,
        "the pull changed the host directory {}:\n{}",
        target.display(),
        tree_diff(&before, &after, "before:", "after: ")
    );

    // The layers mean what umoci makes of them: x is the symlink (nothing
    // below it), y has its own entry's owner and mode, and the root has the
    // lower layer's `./`.
    let mnt = MountDir::new();
    cs.ok(&["mount", &image.reference, mnt.s()]);
    let got = describe(mnt.path());
    cs.ok(&["umount", mnt.s()]);
    let (want_tree, want_root) = image.umoci_unpack();
    let want = format!("{want_tree}root {want_root}");
    assert!(
        got == want,
        "cstore's mount differs from umoci's unpack:\n{}",
        tree_diff(&want, &got, "umoci: ", "cstore:")
    );
    let entry = |path: &str| {
        got.lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|e| e["path"] == path)
    };
    let x = entry("x").unwrap();
    assert_eq!(x["type"], "symlink");
    assert_eq!(x["target"], target.display().to_string());
    assert!(got.lines().all(|l| !l.contains("\"x/")), "{got}");
    let y = entry("y").unwrap();
    assert_eq!(
        (y["uid"].as_u64(), y["gid"].as_u64(), y["mode"].as_str()),
        (Some(5), Some(5), Some("0o700"))
    );
    assert!(entry("y/z/f").is_some());
    assert_eq!(describe(&target), before, "the host directory is untouched");
}

// Finding 2: as uid 65534, nothing in the store can be listed, read,
// executed or written: not the store's files, not a setuid-root binary from a
// layer, not a layer's 1777 /tmp, not what a container made setuid in its
// own rootfs (upper dir or mounted rootfs, with and without a user
// namespace). A layer's `./` entry gives the tree's root its owner and mode,
// never the snapshot directory above it. The mapped root of a --userns
// container reaches its own rootfs and no layer tree.
#[test]
fn other_users_cannot_reach_anything_in_the_store() {
    // (The symlink's target only matters to the test above.)
    let host = tempfile::tempdir().unwrap();
    std::fs::create_dir(host.path().join("secret")).unwrap();
    let image = EscapeImage::build(host.path());
    let cs = Cstore::new();
    cs.ok(&["pull", &image.reference]);
    let root = cs.path().display().to_string();

    nobody_is_refused(&format!("ls {root}"));
    for f in ["index.json", "meta.db", "oci-layout"] {
        nobody_is_refused(&format!("cat {root}/{f}"));
    }
    for d in ["snapshots", "blobs", "blobs/sha256", "ingest"] {
        nobody_is_refused(&format!("ls {root}/{d}"));
    }
    let suid = in_snapshots(&cs, "bin/id-suid");
    assert_eq!(suid.len(), 1, "{suid:?}");
    assert_eq!(mode(&suid[0]), (0, 0, 0o4755));
    nobody_is_refused(&format!("{} -u", suid[0].display()));
    let tmp = in_snapshots(&cs, "tmp");
    assert_eq!(tmp.len(), 1, "{tmp:?}");
    assert_eq!(mode(&tmp[0]).2, 0o1777);
    nobody_is_refused(&format!("echo planted > {}/planted", tmp[0].display()));
    assert!(!tmp[0].join("planted").exists());

    // The lower layer's `./` is 0777 1234:1234: its tree's root says so,
    // the snapshot directory above it stays the store's.
    let layer = suid[0].parent().unwrap().parent().unwrap();
    assert_eq!(mode(layer), (1234, 1234, 0o777));
    let snapshot_dir = layer.parent().unwrap();
    assert_eq!(mode(snapshot_dir), (0, 0, 0o700));
    assert_eq!(mode(&cs.path().join("snapshots")), (0, 0, 0o700));

    // A container makes a setuid-root copy of a host binary in its rootfs.
    let name = unique("suid");
    let c = Running::start(
        &cs,
        &name,
        &[&image.reference],
        "cp /bin/id-suid /mine && chmod 4755 /mine && touch /ready && sleep 60",
    );
    let mine = in_snapshots(&cs, "mine");
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mode(&mine[0]), (0, 0, 0o4755));
    nobody_is_refused(&format!("{} -u", mine[0].display()));
    let rootfs = cs.path().join("containers").join(&name).join("rootfs");
    assert!(rootfs.join("mine").exists());
    nobody_is_refused(&format!("{}/mine -u", rootfs.display()));
    nobody_is_refused(&format!("ls {root}/containers"));
    drop(c);

    // A user namespace's mapped root (host 300000) must reach its rootfs
    // (the container dir is 0710, group: the mapped root's gid), others not.
    let name = unique("userns");
    let c = Running::start(
        &cs,
        &name,
        &["--userns=300000:65536", &image.reference],
        "cp /bin/id-suid /mine && chmod 4755 /mine && touch /ready && sleep 60",
    );
    let dir = cs.path().join("containers").join(&name);
    assert_eq!(mode(&dir), (0, 300000, 0o710));
    let rootfs = dir.join("rootfs");
    nobody_is_refused(&format!("{}/mine -u", rootfs.display()));
    nobody_is_refused(&format!("ls {}", rootfs.display()));
    let (ok, out) = as_user(300000, &format!("ls {}", rootfs.display()));
    assert!(ok && out.contains("mine"), "the mapped root: {out}");
    let (ok, out) = as_user(300000, &format!("ls {root}/snapshots"));
    assert!(
        !ok && out.contains("Permission denied"),
        "the mapped root must not reach the layers: {out}"
    );
    drop(c);
    cs.assert_nothing_mounted();
}

// Stores made before the store was closed have 0755 directories and 0644
// files: opening one closes it, once (a second open changes nothing).
#[test]
fn an_old_open_store_is_closed_when_opened() {
    let (cs, image) = pulled(&shared_registry_addr(), "busybox:latest");
    let name = unique("kept");
    cs.ok(&["run", "--name", &name, &image, "true"]);
    let p = |rel: &str| cs.path().join(rel);
    let container = format!("containers/{name}");
    let dirs = [
        "",
        "blobs",
        "blobs/sha256",
        "ingest",
        "snapshots",
        "snapshots/staging",
        "containers",
        container.as_str(),
        "run-state",
    ];
    let files = [
        "index.json",
        "meta.db",
        "oci-layout",
        "snapshots/metadata.db",
    ];
    // As an older cstore left it.
    let chmod = |rel: &str, m: u32| {
        std::fs::set_permissions(p(rel), std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap()
    };
    for d in dirs {
        chmod(d, 0o755);
    }
    for f in files {
        chmod(f, 0o644);
    }
    let (ok, out) = as_user(NOBODY, &format!("ls {}/snapshots", cs.path().display()));
    assert!(ok, "the aged store is open: {out}");

    cs.ok(&["images"]);
    let want = [
        ("", 0o711),
        ("blobs", 0o700),
        ("blobs/sha256", 0o700),
        ("ingest", 0o700),
        ("snapshots", 0o700),
        ("snapshots/staging", 0o700),
        ("containers", 0o711),
        (container.as_str(), 0o700),
        ("run-state", 0o700),
        ("index.json", 0o600),
        ("meta.db", 0o600),
        ("oci-layout", 0o600),
    ];
    for (rel, m) in want {
        assert_eq!(mode(&p(rel)).2, m, "{rel:?}");
    }
    nobody_is_refused(&format!("ls {}/snapshots", cs.path().display()));
    nobody_is_refused(&format!("cat {}/index.json", cs.path().display()));

    // Closed already: the next opens change nothing (no chmod: ctimes kept;
    // meta.db itself is written by every open).
    let ctimes = || -> Vec<(i64, i64)> {
        want.iter()
            .filter(|(rel, _)| *rel != "meta.db")
            .map(|(rel, _)| {
                let m = std::fs::symlink_metadata(p(rel)).unwrap();
                (m.ctime(), m.ctime_nsec())
            })
            .collect()
    };
    let before = ctimes();
    cs.ok(&["images"]);
    cs.ok(&["snapshots"]);
    assert_eq!(ctimes(), before);
    cs.ok(&["rm", &name]);
}
