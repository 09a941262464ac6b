//! `cstore mount` / `umount` / `snapshots` / `unpack` against a real
//! registry: read-only and read-write mounts, mounts removed behind cstore's
//! back, `kill -9` in the middle of an unpack, 130-layer images, bad input.
//! Trees are compared with `umoci unpack` via fixtures/treesnap.py. Every
//! mount is undone (`umount -l`) by a guard, whatever the test's outcome.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::tree::{
    is_mountpoint, mountinfo, oci_dir, registry_with_layered, root_attrs, run, snapshots,
    staging_leftovers, tree_diff, treesnap, umoci_root_attrs, umoci_tree, MountDir,
};
use crate::harness::{shared_registry_addr, Cstore};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The shared registry (busybox tags), plus the layered images these tests use.
fn registry() -> String {
    registry_with_layered(&["layered-many", "layered-bulk", "layered-implicit"])
}

fn assert_same_tree(want: &str, got: &str, what: &str) {
    if want == got {
        return;
    }
    panic!(
        "{what}: trees differ:\n{}",
        tree_diff(want, got, "want:", "got: ")
    );
}

fn mount_snapshot(cs: &Cstore, dir: &MountDir) -> Option<Value> {
    let key = format!("cstore-mount:{}", dir.s());
    snapshots(cs).into_iter().find(|s| s["key"] == key.as_str())
}

/// The `upperdir=` of the overlay mounted at `dir`.
fn upper_dir(dir: &MountDir) -> PathBuf {
    let line = mountinfo(dir.path()).expect("mounted");
    let opts = line.split(" - ").nth(1).unwrap();
    let upper = opts
        .split(',')
        .find_map(|o| o.strip_prefix("upperdir="))
        .unwrap_or_else(|| panic!("no upperdir in {line}"));
    PathBuf::from(upper)
}

/// A mount of an image on the host is nosuid and nodev: the image's setuid
/// files and device nodes must not work for whoever can reach DIR.
fn assert_inert(dir: &MountDir) {
    let line = mountinfo(dir.path()).expect("mounted");
    let opts: Vec<&str> = line.split(' ').nth(5).unwrap().split(',').collect();
    for want in ["nosuid", "nodev"] {
        assert!(opts.contains(&want), "{want} missing: {line}");
    }
}

fn errno(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn read_only_and_read_write_mounts() {
    let addr = shared_registry_addr();
    let reference = format!("{addr}/busybox:latest");
    let cs = Cstore::new();
    cs.ok(&["pull", &reference]);
    let mnt = MountDir::new();

    // Read-only: no write of any kind gets through.
    cs.ok(&["mount", &reference, mnt.s()]);
    assert!(is_mountpoint(mnt.path()));
    assert_inert(&mnt);
    assert_eq!(
        errno(std::fs::write(mnt.path().join("new.txt"), "x")),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno(
            std::fs::OpenOptions::new()
                .append(true)
                .open(mnt.path().join("etc/passwd"))
        ),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno(std::fs::remove_file(mnt.path().join("data/hello.txt"))),
        Some(libc::EROFS)
    );
    let snap = mount_snapshot(&cs, &mnt).expect("the mount's snapshot");
    assert_eq!(snap["kind"], "view");
    assert_eq!(snap["mount_state"], "mounted");
    cs.ok(&["umount", mnt.s()]);
    assert!(!is_mountpoint(mnt.path()));
    assert!(mount_snapshot(&cs, &mnt).is_none());

    // Read-write: writes land in the active snapshot's own upper dir.
    cs.ok(&["mount", "--rw", &reference, mnt.s()]);
    assert_inert(&mnt);
    let upper = upper_dir(&mnt);
    assert!(upper.starts_with(cs.path().join("snapshots")), "{upper:?}");
    std::fs::write(mnt.path().join("new.txt"), "written through the mount").unwrap();
    assert_eq!(
        std::fs::read_to_string(mnt.path().join("new.txt")).unwrap(),
        "written through the mount"
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("new.txt")).unwrap(),
        "written through the mount"
    );
    std::fs::remove_file(mnt.path().join("data/hello.txt")).unwrap();
    assert!(!mnt.path().join("data/hello.txt").exists());
    {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let wh = std::fs::symlink_metadata(upper.join("data/hello.txt")).unwrap();
        assert!(
            wh.file_type().is_char_device() && wh.rdev() == 0,
            "whiteout"
        );
    }
    let snap = mount_snapshot(&cs, &mnt).expect("the mount's snapshot");
    assert_eq!(snap["kind"], "active");
    assert_eq!(snap["mount_state"], "mounted");
    cs.ok(&["umount", mnt.s()]);
    assert!(!is_mountpoint(mnt.path()));
    assert!(mount_snapshot(&cs, &mnt).is_none());
    assert!(!upper.exists(), "the snapshot's dir went with it");

    // --keep: unmounted, but the active snapshot (and the write) stays.
    cs.ok(&["mount", "--rw", &reference, mnt.s()]);
    let upper = upper_dir(&mnt);
    std::fs::write(mnt.path().join("kept.txt"), "kept").unwrap();
    cs.ok(&["umount", "--keep", mnt.s()]);
    assert!(!is_mountpoint(mnt.path()));
    let snap = mount_snapshot(&cs, &mnt).expect("kept");
    assert_eq!(snap["kind"], "active");
    assert_eq!(snap["mount_state"], "stale (not mounted)");
    assert_eq!(
        std::fs::read_to_string(upper.join("kept.txt")).unwrap(),
        "kept"
    );
    // A second umount removes it.
    cs.ok(&["umount", mnt.s()]);
    assert!(mount_snapshot(&cs, &mnt).is_none());
    assert!(!upper.exists());
    // The layers themselves are untouched by all this.
    assert_eq!(snapshots(&cs).len(), 3);
    assert!(snapshots(&cs).iter().all(|s| s["kind"] == "committed"));
}

/// The root of a read-write mount is the upper dir's: it must still have the
/// image's mode, owner and xattrs (layered-implicit: from layer 1's `./`).
#[test]
fn a_read_write_mount_keeps_the_image_root_attributes() {
    let addr = registry();
    let reference = format!("{addr}/layered-implicit:latest");
    let cs = Cstore::new();
    cs.ok(&["pull", &reference]);
    let want = umoci_root_attrs("layered-implicit");
    assert!(want.starts_with("0o40750 5 6 {'user.cstore'"), "{want}");
    let mnt = MountDir::new();
    for rw in [false, true] {
        let mut args = vec!["mount"];
        if rw {
            args.push("--rw");
        }
        args.extend([reference.as_str(), mnt.s()]);
        cs.ok(&args);
        assert_eq!(root_attrs(mnt.path()), want, "rw: {rw}");
        cs.ok(&["umount", mnt.s()]);
        assert!(!is_mountpoint(mnt.path()));
    }
}

#[test]
fn a_mount_removed_behind_cstores_back_is_stale_until_umount() {
    let addr = shared_registry_addr();
    let reference = format!("{addr}/busybox:latest");
    let cs = Cstore::new();
    cs.ok(&["pull", &reference]);
    let mnt = MountDir::new();
    cs.ok(&["mount", "--rw", &reference, mnt.s()]);
    let upper = upper_dir(&mnt);
    std::fs::write(mnt.path().join("x"), "x").unwrap();
    run(Command::new("umount").arg(mnt.path()));
    assert!(!is_mountpoint(mnt.path()));

    let text = cs.ok(&["snapshots"]);
    let line = text
        .lines()
        .find(|l| l.contains(mnt.s()))
        .unwrap_or_else(|| panic!("no row for the mount point:\n{text}"));
    assert!(line.contains("stale (not mounted)"), "{line}");
    let snap = mount_snapshot(&cs, &mnt).unwrap();
    assert_eq!(snap["mount_state"], "stale (not mounted)");

    // Mounting there again is refused until it is cleaned up...
    let err = cs.fail(&["mount", &reference, mnt.s()]);
    assert!(err.contains("umount"), "{err}");
    assert!(!is_mountpoint(mnt.path()));
    // ...which `cstore umount` does.
    cs.ok(&["umount", mnt.s()]);
    assert!(mount_snapshot(&cs, &mnt).is_none());
    assert!(!upper.exists());
    cs.ok(&["mount", &reference, mnt.s()]);
    assert!(mnt.path().join("bin/busybox").exists());
    cs.ok(&["umount", mnt.s()]);
    assert!(!is_mountpoint(mnt.path()));
}

/// chain[0] = diff[0]; chain[i] = sha256(chain[i-1] + " " + diff[i]).
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(p) => format!("sha256:{}", hex::encode(Sha256::digest(format!("{p} {d}")))),
        };
        out.push(next);
    }
    out
}

fn read_blob(oci: &Path, digest: &str) -> Value {
    serde_json::from_slice(&std::fs::read(oci.join("blobs/sha256").join(&digest[7..])).unwrap())
        .unwrap()
}

/// (layer digests, chain IDs) of fixtures tag `tag`.
fn layers_of(tag: &str) -> (Vec<String>, Vec<String>) {
    let oci = oci_dir();
    let index: Value =
        serde_json::from_slice(&std::fs::read(oci.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = read_blob(&oci, &m);
    let config = read_blob(&oci, manifest["config"]["digest"].as_str().unwrap());
    let str_vec = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    (layers, chain_ids(&str_vec(&config["rootfs"]["diff_ids"])))
}

/// After a kill: committed layer snapshots form a chain from the bottom, and
/// every layer directory that made it into place holds its whole layer.
/// layered-bulk's layer i adds only /bulk{i}, so its oracle is that subtree of
/// umoci's unpack.
fn assert_consistent_after_kill(cs: &Cstore, layers: &[String], chains: &[String], when: &str) {
    let want = umoci_tree("layered-bulk");
    let mut committed: Vec<usize> = Vec::new();
    for s in snapshots(cs) {
        let Some(d) = s["labels"]["cstore.io/layer.digest"].as_str() else {
            continue;
        };
        assert_eq!(s["kind"], "committed", "{when}: {s}");
        let i = layers.iter().position(|l| l == d).expect("a layer of it");
        assert_eq!(s["key"], chains[i].as_str(), "{when}");
        let parent = if i == 0 {
            Value::Null
        } else {
            Value::from(chains[i - 1].as_str())
        };
        assert_eq!(s["parent"], parent, "{when}");
        committed.push(i);
    }
    committed.sort();
    assert_eq!(
        committed,
        (0..committed.len()).collect::<Vec<_>>(),
        "{when}: committed layers are not a chain from the bottom"
    );
    // Every directory in place (a snapshot's, or one whose commit the kill
    // cut short) is a whole layer.
    let mut complete = vec![false; layers.len()];
    for e in std::fs::read_dir(cs.path().join("snapshots")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if name.parse::<u64>().is_err() {
            continue;
        }
        let fs = e.path().join("fs");
        let top: Vec<String> = std::fs::read_dir(&fs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(top.len(), 1, "{when}: snapshots/{name}/fs holds {top:?}");
        let i: usize = top[0].strip_prefix("bulk").unwrap().parse().unwrap();
        let prefix = format!("bulk{i}/");
        let expected: String = want
            .lines()
            .filter(|l| {
                let p = serde_json::from_str::<Value>(l).unwrap()["path"]
                    .as_str()
                    .unwrap()
                    .to_string();
                p == top[0] || p.starts_with(&prefix)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert_same_tree(
            &expected,
            &treesnap(&fs),
            &format!("{when}: snapshots/{name} (layer {i})"),
        );
        complete[i - 1] = true;
    }
    for i in committed {
        assert!(complete[i], "{when}: committed layer {i} has no directory");
    }
}

#[test]
fn kill_9_during_unpack_leaves_only_whole_layers() {
    let addr = registry();
    let reference = format!("{addr}/layered-bulk:latest");
    let (layers, chains) = layers_of("layered-bulk");
    assert_eq!(layers.len(), 4);
    let cs = Cstore::new();
    cs.ok(&["pull", "--no-unpack", &reference]);
    assert!(snapshots(&cs).is_empty());

    enum Kill {
        After(u64),
        /// After the Nth "unpacked" event (N = all: right at the commits).
        AfterUnpacked(usize),
    }
    let plans = [
        Kill::After(100),
        Kill::After(300),
        Kill::After(600),
        Kill::After(1000),
        Kill::AfterUnpacked(2),
        Kill::AfterUnpacked(4),
    ];
    let mut killed = 0;
    for plan in plans {
        let mut child = cs
            .cmd(&["unpack", "--json", &reference])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let when = match plan {
            Kill::After(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                format!("killed after {ms} ms")
            }
            Kill::AfterUnpacked(n) => {
                let out = BufReader::new(child.stdout.take().unwrap());
                let mut seen = 0;
                for line in out.lines() {
                    if line.unwrap().starts_with("{\"Unpacked\"") {
                        seen += 1;
                        if seen == n {
                            break;
                        }
                    }
                }
                format!("killed after {n} layers unpacked")
            }
        };
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if status.code().is_none() {
            killed += 1;
        }
        assert_consistent_after_kill(&cs, &layers, &chains, &when);
    }
    assert!(killed >= 1, "no kill landed before the unpack finished");

    // A new run cleans up after the dead ones and completes.
    cs.ok(&["unpack", &reference]);
    assert!(
        staging_leftovers(&cs).is_empty(),
        "{:?}",
        staging_leftovers(&cs)
    );
    assert_consistent_after_kill(&cs, &layers, &chains, "after the re-run");
    let keys: Vec<Value> = snapshots(&cs).iter().map(|s| s["key"].clone()).collect();
    assert_eq!(keys.len(), 4);
    for c in &chains {
        assert!(keys.contains(&Value::from(c.as_str())));
    }
    let mnt = MountDir::new();
    cs.ok(&["mount", &reference, mnt.s()]);
    assert_same_tree(
        &umoci_tree("layered-bulk"),
        &treesnap(mnt.path()),
        "layered-bulk mount vs umoci",
    );
    cs.ok(&["umount", mnt.s()]);
    assert!(!is_mountpoint(mnt.path()));
}

#[test]
fn an_image_of_130_layers_mounts_read_only_and_read_write() {
    let addr = registry();
    let reference = format!("{addr}/layered-many:latest");
    let cs = Cstore::new();
    cs.ok(&["pull", &reference]);
    assert_eq!(snapshots(&cs).len(), 130);
    let mnt = MountDir::new();
    let read = |p: &str| std::fs::read_to_string(mnt.path().join(p)).unwrap();

    cs.ok(&["mount", &reference, mnt.s()]);
    // Through the new mount API (the options exceed a page): flags as attributes.
    assert_inert(&mnt);
    assert_eq!(read("layers/001.txt"), "layer 001\n");
    assert_eq!(read("layers/130.txt"), "layer 130\n");
    assert_eq!(
        std::fs::read_dir(mnt.path().join("layers"))
            .unwrap()
            .count(),
        130
    );
    assert_eq!(
        errno(std::fs::write(mnt.path().join("x"), "x")),
        Some(libc::EROFS)
    );
    assert_same_tree(
        &umoci_tree("layered-many"),
        &treesnap(mnt.path()),
        "130 layers",
    );
    cs.ok(&["umount", mnt.s()]);
    assert!(!is_mountpoint(mnt.path()));

    cs.ok(&["mount", "--rw", &reference, mnt.s()]);
    assert_inert(&mnt);
    assert_eq!(read("layers/001.txt"), "layer 001\n");
    assert_eq!(read("layers/130.txt"), "layer 130\n");
    std::fs::write(mnt.path().join("layers/001.txt"), "rewritten\n").unwrap();
    assert_eq!(read("layers/001.txt"), "rewritten\n");
    assert_eq!(
        std::fs::read_to_string(upper_dir(&mnt).join("layers/001.txt")).unwrap(),
        "rewritten\n"
    );
    cs.ok(&["umount", mnt.s()]);
    assert!(!is_mountpoint(mnt.path()));
    assert!(mount_snapshot(&cs, &mnt).is_none());
    assert_eq!(snapshots(&cs).len(), 130);
}

#[test]
fn bad_input_is_refused_clearly_and_mounts_nothing() {
    let addr = shared_registry_addr();
    let reference = format!("{addr}/busybox:latest");
    let cs = Cstore::new();
    cs.ok(&["pull", &reference]);
    let mnt = MountDir::new();
    let no_mounts = |cs: &Cstore| snapshots(cs).iter().all(|s| s["mountpoint"].is_null());

    // An image that is not in the store.
    let unknown = format!("{addr}/no-such-image:latest");
    let err = cs.fail(&["mount", &unknown, mnt.s()]);
    assert!(err.contains(&unknown), "{err}");
    assert!(!is_mountpoint(mnt.path()));
    assert!(no_mounts(&cs));

    // A mount point that does not exist, or is not a directory.
    let missing = mnt.path().join("does/not/exist");
    let err = cs.fail(&["mount", &reference, missing.to_str().unwrap()]);
    assert!(
        err.contains(missing.to_str().unwrap()) && err.contains("No such file"),
        "{err}"
    );
    let file = mnt.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let err = cs.fail(&["mount", &reference, file.to_str().unwrap()]);
    assert!(err.contains("not a directory"), "{err}");
    assert!(no_mounts(&cs));
    std::fs::remove_file(&file).unwrap();

    // umount of a directory cstore did not mount: a plain one...
    let err = cs.fail(&["umount", mnt.s()]);
    assert!(
        err.contains(mnt.s()) && err.contains("nothing is mounted"),
        "{err}"
    );
    // ...and someone else's mount, which stays mounted.
    run(Command::new("mount").args(["-t", "tmpfs", "cstore-test", mnt.s()]));
    let err = cs.fail(&["umount", mnt.s()]);
    assert!(err.contains("not one cstore made"), "{err}");
    assert!(mountinfo(mnt.path()).unwrap().contains("tmpfs"));
    // Nor does cstore mount over it.
    let err = cs.fail(&["mount", &reference, mnt.s()]);
    assert!(err.contains("already a mount point"), "{err}");
    assert!(mountinfo(mnt.path()).unwrap().contains("tmpfs"));
    assert!(no_mounts(&cs));
    run(Command::new("umount").arg(mnt.path()));

    // A mount where cstore already mounted: refused, the first stays.
    cs.ok(&["mount", &reference, mnt.s()]);
    let err = cs.fail(&["mount", "--rw", &reference, mnt.s()]);
    assert!(err.contains("already a mount point"), "{err}");
    assert!(mnt.path().join("bin/busybox").exists());
    assert_eq!(mount_snapshot(&cs, &mnt).unwrap()["kind"], "view");
    cs.ok(&["umount", mnt.s()]);
    assert!(!is_mountpoint(mnt.path()));
    assert!(no_mounts(&cs));
}
