//! Unpack against peers: GNU tar writes the archives (gnu and posix formats,
//! sparse files, xattrs, long names), and fixtures/treesnap.py compares the
//! unpacked tree with the tree tar read from. Crafted hostile archives
//! (fixtures/evil-tars.py) must all be refused without touching anything
//! outside the layer directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use cstore_unpack::{diff_id_of, unpack_layer, Compression, Error, LayerRef, UnpackOptions};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn sh(cmd: &str) {
    let st = Command::new("bash").arg("-ec").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

fn snap(dir: &Path, extra: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(repo().join("fixtures/treesnap.py"))
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A tree with every kind of entry and attribute a layer can carry.
fn make_source(src: &Path) {
    sh(&format!(
        r#"cd {src}
        mkdir -p a/b/c deep/$(printf 'x%.0s' $(seq 120))/$(printf 'y%.0s' $(seq 120)) sticky
        echo hello > a/file.txt
        printf 'long name content' > deep/$(printf 'x%.0s' $(seq 120))/$(printf 'y%.0s' $(seq 120))/$(printf 'z%.0s' $(seq 150)).txt
        head -c 100000 /dev/urandom > a/b/random.bin
        ln a/file.txt a/b/c/hardlink.txt
        ln -s ../file.txt a/b/rel-link
        ln -s /etc/passwd a/abs-link
        cp /bin/busybox a/suid && chmod 4755 a/suid
        chmod 1777 sticky
        chmod 2750 a/b
        mkfifo a/fifo
        mknod a/null c 1 3
        mknod a/blk b 7 200
        chown 1234:5678 a/file.txt
        chown -h 42:43 a/b/rel-link
        setfattr -n user.cstore -v 'hello xattr' a/file.txt
        setfattr -n security.capability -v 0sAQAAAgAgAAAAAAAAAAAAAAAAAAA= a/suid
        truncate -s 50M a/sparse.img && printf 'middle' | dd of=a/sparse.img bs=1 seek=20000000 conv=notrunc status=none
        touch -h -d '2001-02-03 04:05:06' a/abs-link a/file.txt
        touch -d '1999-12-31 23:59:59' a/b/c"#,
        src = src.display()
    ));
}

fn unpack(
    blob: &Path,
    compression: Compression,
    dest: &Path,
) -> cstore_unpack::Result<cstore_unpack::LayerStats> {
    let diff_id = diff_id_of(blob, compression).unwrap();
    std::fs::create_dir_all(dest).unwrap();
    let layer = LayerRef {
        image: "test/image:latest",
        digest: "sha256:feed",
        compression,
        diff_id: &diff_id,
    };
    unpack_layer(blob, &layer, dest, &UnpackOptions::default())
}

#[test]
fn gnu_tar_archives_unpack_exactly() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_source(&src);
    let want = snap(&src, &[]);
    for (i, (format, comp, flag)) in [
        ("gnu", Compression::Gzip, "--gzip"),
        ("posix", Compression::Zstd, "--zstd"),
        ("posix", Compression::None, ""),
        ("gnu", Compression::None, ""),
    ]
    .into_iter()
    .enumerate()
    {
        let blob = t.path().join(format!("layer-{i}"));
        sh(&format!(
            "tar --format={format} --xattrs --xattrs-include='*' --sparse --numeric-owner -C {} -c {flag} -f {} .",
            src.display(),
            blob.display()
        ));
        let dest = t.path().join(format!("dest-{i}"));
        let stats = unpack(&blob, comp, &dest).unwrap_or_else(|e| panic!("{format} {comp:?}: {e}"));
        assert_eq!(snap(&dest, &[]), want, "{format} {comp:?}: tree differs");
        assert!(
            stats.extract.hardlinks >= 1
                && stats.extract.devices >= 3
                && stats.extract.symlinks >= 2
        );
        // Holes stay holes: 50 MiB apparent, a few blocks allocated.
        let used = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dest.join("a/sparse.img"))
                .unwrap()
                .blocks()
                * 512
        };
        assert!(
            used < 1 << 20,
            "{format} {comp:?}: sparse file takes {used} bytes"
        );
    }
}

/// The offset the tar reader gives each entry is where GNU tar put its
/// data: reading there gives the file's bytes (a sparse file's regions back
/// to back), in both formats, past long names, PAX records and sparse maps.
#[test]
fn the_tar_reader_says_where_each_entrys_data_is() {
    use cstore_unpack::tar::{Kind, TarReader};
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_source(&src);
    for format in ["gnu", "posix"] {
        let blob = t.path().join(format!("layer-{format}"));
        sh(&format!(
            "tar --format={format} --xattrs --xattrs-include='*' --sparse --numeric-owner -C {} -cf {} .",
            src.display(),
            blob.display()
        ));
        let raw = std::fs::read(&blob).unwrap();
        let mut tar = TarReader::new(&raw[..]);
        let (mut files, mut sparse) = (0, 0);
        while let Some(e) = tar.next_entry().unwrap() {
            if e.kind != Kind::File {
                continue;
            }
            let rel = String::from_utf8(e.path.clone()).unwrap();
            let content = std::fs::read(src.join(rel.trim_start_matches("./"))).unwrap();
            let at = e.data_offset as usize;
            match &e.sparse {
                None => {
                    assert_eq!(content.len() as u64, e.size, "{format} {rel}");
                    assert!(raw[at..at + content.len()] == content[..], "{format} {rel}");
                    files += 1;
                }
                Some(regions) => {
                    let mut stored = at;
                    for &(off, len) in regions {
                        let (off, len) = (off as usize, len as usize);
                        assert!(
                            raw[stored..stored + len] == content[off..off + len],
                            "{format} {rel}: region at {off}"
                        );
                        stored += len;
                    }
                    sparse += 1;
                }
            }
        }
        assert!(
            files >= 3 && sparse == 1,
            "{format}: {files} files, {sparse} sparse"
        );
    }
}

/// Whether this process's extractions batch small files (CSTORE_IO=uring).
fn batching() -> bool {
    use cstore_blockio::ring::{io_env, IoEnv};
    io_env() == IoEnv::Uring
}

// The policy's choice (batches where the store's filesystem measured faster
// with them) reaches the extractor, for compressed layers only; CSTORE_IO
// overrides it both ways. Same tree every way.
#[test]
fn the_policy_batches_small_files_of_compressed_layers() {
    use cstore_blockio::ring::{io_env, IoEnv};
    use cstore_blockio::StreamConfig;
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sh(&format!(
        "mkdir -p {s}/a {s}/b && for i in $(seq 300); do echo $i > {s}/a/f$i; echo $i$i > {s}/b/g$i; done",
        s = src.display()
    ));
    let tar = t.path().join("layer.tar");
    sh(&format!(
        "tar --format=posix --sort=name --numeric-owner -C {s} -cf {b} . && gzip -k {b}",
        s = src.display(),
        b = tar.display()
    ));
    let gz = t.path().join("layer.tar.gz");
    let want = snap(&src, &[]);
    let mut n = 0;
    for (blob, compression) in [(&gz, Compression::Gzip), (&tar, Compression::None)] {
        for policy in [true, false] {
            let diff_id = diff_id_of(blob, compression).unwrap();
            let layer = LayerRef {
                image: "test/image:latest",
                digest: "sha256:feed",
                compression,
                diff_id: &diff_id,
            };
            let opts = UnpackOptions {
                io: Some(StreamConfig {
                    batch_small_files: policy,
                    ..StreamConfig::default()
                }),
                ..UnpackOptions::default()
            };
            n += 1;
            let dest = t.path().join(format!("d{n}"));
            std::fs::create_dir(&dest).unwrap();
            let stats = unpack_layer(blob, &layer, &dest, &opts).unwrap();
            assert_eq!(snap(&dest, &[]), want, "{compression:?} policy {policy}");
            let batched = match io_env() {
                IoEnv::Uring => true,
                IoEnv::Sync => false,
                IoEnv::Default => policy && compression != Compression::None,
            };
            if batched {
                assert_eq!(stats.extract.batched_files, 600, "{compression:?} {policy}");
            } else {
                assert_eq!(stats.extract.batched_files, 0, "{compression:?} {policy}");
            }
        }
    }
}

// Thousands of small files (batched through io_uring with CSTORE_IO=uring;
// fixtures/test.sh runs this file both ways), among them entries that depend
// on files still queued: hardlinks right after their target, a whiteout of a
// file of the same layer, a file then a path through it, big files, and
// owners and modes that need chown/chmod. The tree must equal GNU tar's.
#[test]
fn many_small_files_unpack_exactly_in_batches() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let gen = r#"
import os, random
rng = random.Random(7)
for d in range(12):
    os.makedirs(f"d{d:02}")
    for f in range(300):
        p = f"d{d:02}/f{f:04}"
        size = rng.choice([0, 1, rng.randint(2, 9000), 70000]) if f % 50 else 200000
        with open(p, "wb") as fh:
            fh.write(rng.randbytes(size))
        if f % 7 == 0:
            os.chown(p, 1000 + f % 3, 2000 + f % 5)
        os.chmod(p, rng.choice([0o644, 0o600, 0o666, 0o755, 0o4755, 0o2711, 0o000]))
        os.utime(p, (1e9 + f, 1e9 + f))
"#;
    let st = Command::new("python3")
        .args(["-c", gen])
        .current_dir(&src)
        .status()
        .unwrap();
    assert!(st.success());
    sh(&format!(
        r#"cd {src}
        mkdir -m 2775 sg && chown 0:4242 sg && echo in-setgid > sg/file
        for d in d00 d05 d11; do
          ln $d/f0001 $d/f0001.link
          ln $d/f0002 $d/f0002a
          ln $d/f0003 sg/cross-$d
        done
        echo mine > d03/wh-target"#,
        src = src.display()
    ));
    // A whiteout of a file of this same layer, after it (tar sorts ".wh."
    // first, so it is appended): the file stays, nothing is hidden.
    let extra = t.path().join("extra");
    sh(&format!(
        "mkdir -p {e}/d03 && touch {e}/d03/.wh.wh-target",
        e = extra.display()
    ));
    let want = snap(&src, &[]);
    let blob = t.path().join("layer");
    sh(&format!(
        "tar --format=posix --sort=name --numeric-owner -C {s} -cf {b} . && tar --format=posix --numeric-owner -C {e} -rf {b} ./d03/.wh.wh-target",
        s = src.display(),
        e = extra.display(),
        b = blob.display()
    ));
    let dest = t.path().join("dest");
    let stats = unpack(&blob, Compression::None, &dest).unwrap();
    assert_eq!(snap(&dest, &[]), want, "tree differs from GNU tar's");
    assert_eq!(stats.extract.hardlinks, 9);
    assert_eq!(stats.extract.whiteouts, 1);
    if batching() {
        assert!(
            stats.extract.batched_files > 2000,
            "{} files batched",
            stats.extract.batched_files
        );
    } else {
        assert_eq!(stats.extract.batched_files, 0);
    }

    // A file, then a path through it: refused with the same error either
    // way, naming the entry (the file is still queued when the path comes).
    let bad = t.path().join("bad");
    sh(&format!(
        "mkdir -p {b}/one {b}/alt && echo a > {b}/one/x && echo b > {b}/alt/y && tar --format=posix -C {b} -cf {b}.tar one/x && tar --format=posix --transform='s,^y$,one/x/y,' -C {b}/alt -rf {b}.tar y",
        b = bad.display()
    ));
    let err = unpack(
        &t.path().join("bad.tar"),
        Compression::None,
        &t.path().join("bad-dest"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("test/image:latest")
            && err.contains("sha256:feed")
            && err.contains("one/x/y")
            && err.contains("a parent is not a directory"),
        "{err}"
    );
}

#[test]
fn whiteouts_become_overlay_whiteouts() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sh(&format!(
        "mkdir -p {s}/dir/opq && cd {s} && touch dir/.wh.gone dir/opq/.wh..wh..opq dir/keep dir/.wh..wh.plnk && touch .wh.keep-me-too keep-me-too",
        s = src.display()
    ));
    let blob = t.path().join("w.tar");
    sh(&format!(
        "tar -C {} -cf {} .",
        src.display(),
        blob.display()
    ));
    let dest = t.path().join("dest");
    let stats = unpack(&blob, Compression::None, &dest).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::symlink_metadata(dest.join("dir/gone")).unwrap();
    assert!(
        m.file_type().is_char_device() && m.rdev() == 0,
        "a whiteout is a 0:0 char device"
    );
    assert!(!dest.join("dir/.wh.gone").exists());
    assert!(
        !dest.join("dir/.wh..wh.plnk").exists(),
        "aufs metadata is dropped"
    );
    let v = Command::new("getfattr")
        .args(["--only-values", "-n", "trusted.overlay.opaque"])
        .arg(dest.join("dir/opq"))
        .output()
        .unwrap();
    assert_eq!(v.stdout, b"y");
    // The layer's own file of that name stays: a whiteout hides lower layers only.
    assert!(std::fs::symlink_metadata(dest.join("keep-me-too"))
        .unwrap()
        .is_file());
    assert!(stats.extract.whiteouts >= 1 && stats.extract.opaque_dirs == 1);
}

#[test]
fn hostile_archives_are_refused_and_touch_nothing_outside() {
    let t = tempfile::tempdir().unwrap();
    let evil = t.path().join("evil");
    sh(&format!(
        "python3 {} {}",
        repo().join("fixtures/evil-tars.py").display(),
        evil.display()
    ));
    let outside = [
        "/tmp/cstore-evil-absolute.txt",
        "/tmp/cstore-evil-through-symlink.txt",
        "/tmp/cstore-evil-relative.txt",
    ];
    for o in outside {
        let _ = std::fs::remove_file(o);
    }
    let expect = [
        ("dotdot", "../escaped.txt", "escapes the layer"),
        ("absolute", "/tmp/cstore-evil-absolute.txt", "absolute path"),
        (
            "symlink_then_write",
            "link/cstore-evil-through-symlink.txt",
            "symlink",
        ),
        (
            "symlink_relative_escape",
            "up/cstore-evil-relative.txt",
            "symlink",
        ),
        ("hardlink_outside", "passwd", "escapes the layer"),
        ("hardlink_absolute", "shadow", "absolute path"),
        ("hardlink_not_yet", "early", "not in this layer"),
        ("hardlink_through_symlink", "pw", "not in this layer"),
        ("whiteout_escape", "../.wh.victim", "escapes the layer"),
        ("opaque_escape", "../../.wh..wh..opq", "escapes the layer"),
        ("huge_pax", "", "PAX header of"),
    ];
    for (case, entry, why) in expect {
        let layer_dir = t.path().join("layers").join(case);
        let e = unpack(
            &evil.join(format!("{case}.tar")),
            Compression::None,
            &layer_dir.join("fs"),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Layer { .. }), "{case}: {msg}");
        assert!(
            msg.contains("test/image:latest") && msg.contains("sha256:feed"),
            "{case}: names image and layer: {msg}"
        );
        assert!(
            msg.contains(entry),
            "{case}: names the entry {entry:?}: {msg}"
        );
        assert!(msg.contains(why), "{case}: says why ({why}): {msg}");
        // Nothing beside the layer's own directory was created.
        let siblings: Vec<_> = std::fs::read_dir(&layer_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(siblings, vec![std::ffi::OsString::from("fs")], "{case}");
    }
    for o in outside {
        assert!(!Path::new(o).exists(), "{o} was created outside the layer");
    }
    assert!(!t.path().join("layers/escaped.txt").exists());
    assert!(!t.path().join("victim").exists());

    // Overlay's xattrs are dropped, the rest kept.
    let dest = t.path().join("xattr");
    unpack(&evil.join("overlay_xattr.tar"), Compression::None, &dest).unwrap();
    let names = Command::new("getfattr")
        .args(["-d", "-m", "-"])
        .arg(dest.join("d"))
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&names.stdout);
    assert!(
        names.contains("user.ok") && !names.contains("trusted.overlay"),
        "{names}"
    );
}

#[test]
fn bombs_and_wrong_diff_ids_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    sh(&format!("head -c 64M /dev/zero > {}/zeros", src.display()));
    let blob = t.path().join("bomb.tar.zst");
    sh(&format!(
        "tar -C {} -cf - . | zstd -q -19 -o {}",
        src.display(),
        blob.display()
    ));
    let diff_id = diff_id_of(&blob, Compression::Zstd).unwrap();
    let layer = LayerRef {
        image: "bomb:1",
        digest: "sha256:b0b",
        compression: Compression::Zstd,
        diff_id: &diff_id,
    };
    let dest = t.path().join("d1");
    std::fs::create_dir(&dest).unwrap();
    let opts = UnpackOptions {
        max_ratio: 100,
        min_limit: 1 << 20,
        ..Default::default()
    };
    let e = unpack_layer(&blob, &layer, &dest, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("decompression bomb") && e.contains("sha256:b0b"),
        "{e}"
    );

    let wrong = format!("sha256:{}", "0".repeat(64));
    let layer = LayerRef {
        diff_id: &wrong,
        ..layer
    };
    let dest = t.path().join("d2");
    std::fs::create_dir(&dest).unwrap();
    let e = unpack_layer(&blob, &layer, &dest, &UnpackOptions::default()).unwrap_err();
    assert!(matches!(e, Error::DiffIdMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains(&diff_id) && e.to_string().contains(&wrong),
        "{e}"
    );
}

// Implicit parents (made because an entry's parent was missing) are what the
// snapshotter later gives a lower layer's owner and mode. One that a later
// entry replaces (here by a symlink to /tmp) or lists itself is no longer
// implicit: a fix-up of `x/secret` by path would follow `x` out of the layer.
// (And dating directories at the end neither fails on nor re-creates ones
// whose parent a later entry replaced.)
#[test]
fn implicit_parents_replaced_or_listed_later_are_not_implicit() {
    use std::os::unix::fs::MetadataExt;
    let t = tempfile::tempdir().unwrap();
    let evil = t.path().join("evil");
    sh(&format!(
        "python3 {} {}",
        repo().join("fixtures/evil-tars.py").display(),
        evil.display()
    ));
    let dest = t.path().join("fs");
    let stats = unpack(
        &evil.join("implicit_replaced.tar"),
        Compression::None,
        &dest,
    )
    .unwrap();
    let implicit: Vec<String> = stats
        .implicit_dirs
        .iter()
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .collect();
    // The root (no `./` entry) and y/z stay implicit; x, x/secret and y don't.
    assert_eq!(implicit, ["", "y/z"]);
    assert_eq!(
        std::fs::read_link(dest.join("x")).unwrap(),
        Path::new("/tmp")
    );
    let y = std::fs::symlink_metadata(dest.join("y")).unwrap();
    assert_eq!((y.uid(), y.gid(), y.mode() & 0o7777), (5, 5, 0o700));
    assert!(dest.join("y/z/f").is_file());
    // Listed directories whose parent became a file are simply gone.
    assert_eq!(std::fs::read(dest.join("d")).unwrap(), b"now a file");
}

// Every directory made for a missing parent is remembered by its whole path,
// so entries with new deep paths cost the square of their depth: capped per
// layer (a clear error, nothing else touched), far above real layers.
#[test]
fn deep_new_paths_entry_after_entry_are_capped() {
    let t = tempfile::tempdir().unwrap();
    let blob = t.path().join("deep.tar");
    // 8 files, each under its own chain of 300 one-letter directories.
    sh(&format!(
        r#"python3 - <<'PY'
import io, tarfile
with tarfile.open("{}", "w", format=tarfile.PAX_FORMAT) as tf:
    for k in range(8):
        info = tarfile.TarInfo("d%d/" % k + "a/" * 300 + "f")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
PY"#,
        blob.display()
    ));
    let diff_id = diff_id_of(&blob, Compression::None).unwrap();
    let layer = LayerRef {
        image: "deep:1",
        digest: "sha256:dee9",
        compression: Compression::None,
        diff_id: &diff_id,
    };
    let capped = UnpackOptions {
        max_made_dir_bytes: 1 << 20,
        ..Default::default()
    };
    let dest = t.path().join("capped");
    std::fs::create_dir(&dest).unwrap();
    let e = unpack_layer(&blob, &layer, &dest, &capped)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("implicit parent directories") && e.contains("sha256:dee9"),
        "{e}"
    );
    // The default cap takes the same layer.
    let dest = t.path().join("default");
    std::fs::create_dir(&dest).unwrap();
    let stats = unpack_layer(&blob, &layer, &dest, &UnpackOptions::default()).unwrap();
    assert_eq!(stats.extract.files, 8, "{stats:?}");
}
