//! `cstore pull` + `cstore mount` against a peer: for every test image, the
//! tree cstore's (read-only) mount shows must equal what `umoci unpack`
//! makes of the same image, as `fixtures/treesnap.py` describes both trees.
//! Images: the busybox variants of fixtures/images.sh, the crafted layered
//! images of fixtures/layered-images.sh, and Debian bookworm.

use std::process::Command;

use crate::harness::tree::{
    is_mountpoint, oci_dir, registry_with_layered, root_attrs, run, snapshots, staging_leftovers,
    tree_diff, treesnap, umoci_root_attrs, umoci_tree, MountDir,
};
use crate::harness::{fixture, Cstore};
use serde_json::Value;

const LAYERED: &[&str] = &[
    "layered-delete",
    "layered-opaque",
    "layered-replace",
    "layered-hardlink",
    "layered-implicit",
    "layered-baddiff",
];

/// The shared registry, with the layered images pushed too (once).
fn registry() -> String {
    registry_with_layered(LAYERED)
}

/// Pull `reference` (which unpacks it), mount it read-only, and compare the
/// tree with umoci's unpack of fixtures tag `oracle`. Returns the tree.
fn assert_matches_umoci(reference: &str, oracle: &str) -> String {
    let cs = Cstore::new();
    cs.ok(&["pull", reference]);
    let mnt = MountDir::new();
    cs.ok(&["mount", reference, mnt.path().to_str().unwrap()]);
    assert!(is_mountpoint(mnt.path()));
    let got = format!("{}root {}", treesnap(mnt.path()), root_attrs(mnt.path()));
    let want = format!("{}root {}", umoci_tree(oracle), umoci_root_attrs(oracle));
    assert!(
        got == want,
        "{reference}: cstore's mount differs from umoci unpack of {oracle}:\n{}",
        tree_diff(&want, &got, "umoci: ", "cstore:")
    );
    cs.ok(&["umount", mnt.path().to_str().unwrap()]);
    assert!(!is_mountpoint(mnt.path()));
    assert!(
        snapshots(&cs)
            .iter()
            .all(|s| s["kind"] == "committed" && s["mountpoint"].is_null()),
        "the mount's snapshot went with umount"
    );
    assert!(staging_leftovers(&cs).is_empty());
    got
}

/// The entry for `path` in a treesnap description.
fn entry(tree: &str, path: &str) -> Option<Value> {
    tree.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["path"] == path)
}

// The busybox layers are the same in every variant (only compression and
// manifest format differ), so umoci's unpack of the fixtures' OCI busybox is
// the oracle for all four; umoci 0.4.7 itself reads neither zstd nor Docker
// manifests.

#[test]
fn busybox_oci_gzip_matches_umoci() {
    let tree = assert_matches_umoci(&format!("{}/busybox:latest", registry()), "busybox");
    // The fixture's specials made it through (and so into the comparison).
    assert_eq!(entry(&tree, "data/suid").unwrap()["mode"], "0o4755");
    assert_eq!(entry(&tree, "tmp").unwrap()["mode"], "0o1777");
    assert!(entry(&tree, "data/xattr.txt").unwrap()["xattrs"]["user.cstore"].is_string());
    assert!(entry(&tree, "data/remove-me.txt").is_none());
    assert_eq!(
        entry(&tree, "data/hello.txt").unwrap()["links"],
        serde_json::json!(["data/hardlink.txt", "data/hello.txt"])
    );
}

#[test]
fn busybox_zstd_matches_umoci() {
    assert_matches_umoci(&format!("{}/busybox:zstd", registry()), "busybox");
}

#[test]
fn busybox_uncompressed_matches_umoci() {
    assert_matches_umoci(&format!("{}/busybox:uncompressed", registry()), "busybox");
}

#[test]
fn busybox_docker_schema2_matches_umoci() {
    assert_matches_umoci(&format!("{}/busybox:docker", registry()), "busybox");
}

#[test]
fn deletes_across_layers_match_umoci() {
    let tree = assert_matches_umoci(
        &format!("{}/layered-delete:latest", registry()),
        "layered-delete",
    );
    let has = |p: &str| entry(&tree, p).is_some();
    assert!(has("keep.txt") && has("nested/x/z.txt"));
    assert!(!has("gone.txt") && !has("gonedir") && !has("gonedir/sub/b"));
    assert!(!has("nested/x/y.txt"));
    // Whited out and re-created in one layer: only the new contents.
    assert!(has("redo/new.txt") && !has("redo/old1") && !has("redo/sub"));
    assert!(has("redo2/new.txt") && !has("redo2/old"));
    // No whiteout device shows through.
    assert!(!tree.contains("\"char\""));
}

#[test]
fn opaque_directories_match_umoci() {
    let tree = assert_matches_umoci(
        &format!("{}/layered-opaque:latest", registry()),
        "layered-opaque",
    );
    let has = |p: &str| entry(&tree, p).is_some();
    assert!(has("o/new.txt") && !has("o/x") && !has("o/sub"));
    assert!(has("q/new.txt") && !has("q/a"));
    assert!(has("p/inner/fresh.txt") && !has("p/a") && !has("p/b"));
    // q had no dir entry in the opaque layer: it keeps its lower owner/mode.
    let q = entry(&tree, "q").unwrap();
    assert_eq!(
        (q["uid"].as_u64(), q["mode"].as_str()),
        (Some(9), Some("0o711"))
    );
}

#[test]
fn type_changes_across_layers_match_umoci() {
    let tree = assert_matches_umoci(
        &format!("{}/layered-replace:latest", registry()),
        "layered-replace",
    );
    assert_eq!(entry(&tree, "f2d").unwrap()["type"], "file");
    assert!(entry(&tree, "f2d/inner.txt").is_none());
    assert_eq!(entry(&tree, "d2f").unwrap()["type"], "dir");
    assert!(entry(&tree, "d2f/new.txt").is_some());
    assert!(entry(&tree, "d2f/child.txt").is_none() && entry(&tree, "d2f/sub").is_none());
    assert_eq!(entry(&tree, "l2f").unwrap()["target"], "t.txt");
}

#[test]
fn hardlinks_across_directories_match_umoci() {
    let tree = assert_matches_umoci(
        &format!("{}/layered-hardlink:latest", registry()),
        "layered-hardlink",
    );
    assert_eq!(
        entry(&tree, "a/orig").unwrap()["links"],
        serde_json::json!(["a/orig", "b/c/link", "top-link"])
    );
    assert_eq!(
        entry(&tree, "r/deep/target").unwrap()["links"],
        serde_json::json!(["r/alias", "r/deep/target", "top-alias"])
    );
    assert_eq!(entry(&tree, "s/suid-link").unwrap()["mode"], "0o4755");
    // One member of group two was deleted: x/one stands alone.
    assert!(entry(&tree, "x/one").unwrap()["links"].is_null());
}

#[test]
fn implicit_parents_inherit_from_lower_layers_like_umoci() {
    let tree = assert_matches_umoci(
        &format!("{}/layered-implicit:latest", registry()),
        "layered-implicit",
    );
    let srv = entry(&tree, "srv").unwrap();
    assert_eq!(
        (
            srv["uid"].as_u64(),
            srv["gid"].as_u64(),
            srv["mode"].as_str()
        ),
        (Some(1234), Some(2345), Some("0o711"))
    );
    assert!(srv["xattrs"]["user.cstore"].is_string());
    let app = entry(&tree, "srv/app").unwrap();
    assert_eq!(
        (app["uid"].as_u64(), app["mode"].as_str()),
        (Some(1000), Some("0o2750"))
    );
    assert!(entry(&tree, "fresh/deep/file.txt").is_some());
    assert!(entry(&tree, "gone/again.txt").is_some() && entry(&tree, "gone/inner").is_none());
    // The root's attributes come from layer 1's `./`, the only one listed.
    let root = tree.lines().last().unwrap();
    assert!(
        root.starts_with("root 0o40750 5 6 {'user.cstore'"),
        "{root}"
    );
}

/// Debian bookworm (debootstrap minbase, one ~100 MB layer): slow.
#[test]
fn debian_matches_umoci() {
    let addr = registry();
    run(Command::new("bash")
        .arg(fixture("push.sh"))
        .args([&addr, "--debian"]));
    let tree = assert_matches_umoci(&format!("{addr}/debian:bookworm"), "debian");
    assert!(tree.lines().count() > 5000);
    assert!(entry(&tree, "usr/bin/bash").is_some());
}

#[test]
fn a_wrong_diff_id_fails_the_pull_and_leaves_no_snapshot() {
    let oci = oci_dir();
    let manifest_of = |tag: &str| -> Value {
        let index: Value =
            serde_json::from_slice(&std::fs::read(oci.join("index.json")).unwrap()).unwrap();
        let d = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string();
        serde_json::from_slice(&std::fs::read(oci.join("blobs/sha256").join(&d[7..])).unwrap())
            .unwrap()
    };
    let blob = |d: &str| -> Value {
        serde_json::from_slice(&std::fs::read(oci.join("blobs/sha256").join(&d[7..])).unwrap())
            .unwrap()
    };
    let addr = registry();
    let bad = manifest_of("layered-baddiff");
    let good = manifest_of("busybox");
    let layer = bad["layers"][1]["digest"].as_str().unwrap().to_string();
    assert_eq!(layer, good["layers"][1]["digest"]);
    let wrong = blob(bad["config"]["digest"].as_str().unwrap())["rootfs"]["diff_ids"][1]
        .as_str()
        .unwrap()
        .to_string();
    let right = blob(good["config"]["digest"].as_str().unwrap())["rootfs"]["diff_ids"][1]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(wrong, right);

    let cs = Cstore::new();
    let reference = format!("{addr}/layered-baddiff:latest");
    let err = cs.fail(&["pull", &reference]);
    for want in [&reference, &layer, &wrong, &right] {
        assert!(err.contains(want.as_str()), "{want} not in: {err}");
    }
    let snaps = snapshots(&cs);
    assert!(
        !snaps
            .iter()
            .any(|s| s["labels"]["cstore.io/layer.digest"] == layer.as_str()),
        "a snapshot of the bad layer: {snaps:?}"
    );
    // Nor any above it: committed layers form a chain from the bottom.
    assert!(
        !snaps
            .iter()
            .any(|s| s["labels"]["cstore.io/layer.digest"] == bad["layers"][2]["digest"]),
        "{snaps:?}"
    );
    assert!(
        staging_leftovers(&cs).is_empty(),
        "{:?}",
        staging_leftovers(&cs)
    );
    // Mounting it tries the unpack again, fails the same way, mounts nothing.
    let mnt = MountDir::new();
    let err = cs.fail(&["mount", &reference, mnt.path().to_str().unwrap()]);
    assert!(err.contains(&layer) && err.contains(&wrong), "{err}");
    assert!(!is_mountpoint(mnt.path()));
    assert!(snapshots(&cs).iter().all(|s| s["mountpoint"].is_null()));
    assert!(staging_leftovers(&cs).is_empty());
}
