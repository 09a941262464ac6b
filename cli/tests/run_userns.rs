//! `cstore run --userns` as root: the container in its own user namespace,
//! the image's layers id-mapped so their owners show through, what it
//! writes stored under the mapped host ids, nothing left mounted.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::harness::containers::busybox;
use crate::harness::Cstore;

/// Every `snapshots/*/fs/REL` in the store.
fn snapshot_files(cs: &Cstore, rel: &str) -> Vec<PathBuf> {
    std::fs::read_dir(cs.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path().join("fs").join(rel))
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
}

const INSIDE: &str = "cat /proc/self/uid_map /proc/self/gid_map; id -u; \
    stat -c '%u:%g' /bin/busybox; touch /etc/x && stat -c 'new %u:%g' /etc/x";

fn fields(s: &str) -> Vec<String> {
    s.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn mapped_root_sees_image_owners_and_writes_as_the_mapped_host_user() {
    let (cs, image) = busybox();
    let (code, out, err) = cs.outcome(&[
        "run",
        "--name",
        "kept",
        "--userns=200000:65536",
        &image,
        "sh",
        "-c",
        INSIDE,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        fields(&out),
        ["0 200000 65536", "0 200000 65536", "0", "0:0", "new 0:0"],
        "{err}"
    );
    cs.assert_nothing_mounted();
    // Kept (no --rm): the upper dir holds the new file under the host ids.
    let new: Vec<_> = snapshot_files(&cs, "etc/x");
    assert_eq!(new.len(), 1, "{new:?}");
    let m = new[0].metadata().unwrap();
    assert_eq!((m.uid(), m.gid()), (200000, 200000));
    // The image's layers are untouched: still root's on disk.
    let busybox = snapshot_files(&cs, "bin/busybox");
    assert!(!busybox.is_empty());
    for p in &busybox {
        let m = p.symlink_metadata().unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{}", p.display());
    }
}

#[test]
fn bare_flag_uses_roots_subordinate_ids_or_100000() {
    let (cs, image) = busybox();
    let root_range = |file: &str| {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.trim().split(':').collect();
                (f.len() == 3 && (f[0] == "root" || f[0] == "0"))
                    .then(|| format!("0 {} {}", f[1], f[2]))
            })
            .unwrap_or_else(|| "0 100000 65536".into())
    };
    let (code, out, err) = cs.run_rm(&["--userns", &image, "sh", "-c", INSIDE]);
    assert_eq!(code, 0, "{err}");
    let got = fields(&out);
    assert_eq!(got[0], root_range("/etc/subuid"), "{out}");
    assert_eq!(got[1], root_range("/etc/subgid"), "{out}");
    assert_eq!(got[2..], ["0", "0:0", "new 0:0"], "{out}");
    // --userns=host: the host's namespace, as without the flag.
    let (code, out, err) = cs.run_rm(&["--userns=host", &image, "cat", "/proc/self/uid_map"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(fields(&out), ["0 0 4294967295"]);
    cs.assert_nothing_mounted();
    assert!(!cs.ok(&["snapshots", "--json"]).contains("cstore-run:"));
}

#[test]
fn bad_userns_values_are_refused_clearly() {
    let (cs, image) = busybox();
    for (v, why) in [
        ("--userns=sometimes", "--userns \"sometimes\": unknown mode"),
        (
            "--userns=0:65536",
            "base 0 would make the container's root the host's root",
        ),
        ("--userns=100000:x", "COUNT is not a number"),
    ] {
        let (code, _, err) = cs.run_rm(&[v, &image, "true"]);
        assert_ne!(code, 0);
        assert!(err.contains(why), "{v}: {err}");
    }
    let (code, _, err) = cs.run_rm(&["--userns", "--net", "host", &image, "true"]);
    assert_ne!(code, 0);
    assert!(err.contains("not with --net host"), "{err}");
    cs.assert_nothing_mounted();
    assert!(!cs.ok(&["snapshots", "--json"]).contains("cstore-run:"));
    assert!(
        !Path::new(&cs.path().join("containers")).exists()
            || std::fs::read_dir(cs.path().join("containers"))
                .unwrap()
                .next()
                .is_none()
    );
}
