//! The entry table is the tree extraction leaves: the project's own
//! extractor (`cstore_unpack`) unpacks the same tar, and every path,
//! attribute, hardlink group and file content must match the index (and
//! both must refuse the same archives).

mod common;

use common::tarw::{TarW, H};
use common::{assert_same_tree, build, extract};
use cstore_index::{Compression, Index, Policy};

#[derive(Debug, PartialEq)]
enum Outcome {
    SameTree,
    BothRefuse,
    /// Extraction takes it, the index format cannot hold it (a hardlink to
    /// a symlink or device): such a layer is pulled whole.
    NotIndexable,
}

/// Extract and index `tar`; both refuse it or both give the same tree.
fn check(tar: &[u8], what: &dyn Fn() -> String) -> Outcome {
    let tmp = tempfile::tempdir().unwrap();
    let real = extract(tmp.path(), tar);
    let ours = build(tar, Compression::None, Policy::default());
    match (real, ours) {
        (Ok(x), Ok(b)) => {
            let idx = Index::parse(b.index).unwrap();
            assert_same_tree(&idx, &b.tar, &x);
            Outcome::SameTree
        }
        (Err(_), Err(_)) => Outcome::BothRefuse,
        (Ok(_), Err(cstore_index::Error::Unsupported(r))) if r.contains("hardlink") => {
            Outcome::NotIndexable
        }
        (Ok(_), Err(e)) => panic!(
            "{}: extraction accepts it, the index builder refuses: {e}",
            what()
        ),
        (Err(e), Ok(_)) => panic!(
            "{}: extraction refuses it ({e}), the index builder accepts it",
            what()
        ),
    }
}

fn describe(entries: &[H]) -> String {
    entries
        .iter()
        .map(|h| {
            format!(
                "{} {:?} -> {:?} dev {:?} mode {:o}",
                h.kind as char,
                String::from_utf8_lossy(&h.name),
                String::from_utf8_lossy(&h.link),
                h.dev,
                h.mode
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn tar(entries: &[H]) -> Vec<u8> {
    let mut w = TarW::default();
    for e in entries {
        w.add(e);
    }
    w.finish()
}

fn with<F: FnOnce(&mut H)>(mut h: H, f: F) -> H {
    f(&mut h);
    h
}

#[test]
fn crafted_layers_match_extraction() {
    let x = |k: &str, v: &[u8]| (k.to_string(), v.to_vec());
    let cases: Vec<(&str, Vec<H>)> =
        vec![
        (
            "every kind, owners, modes, xattrs, nanosecond times",
            vec![
                with(H::dir("./"), |h| {
                    h.mode = 0o750;
                    h.uid = 7;
                    h.xattrs = vec![x("user.root", b"r")];
                }),
                with(H::dir("etc"), |h| h.mtime = (1_600_000_000, 123_456_789)),
                with(H::file("etc/passwd", b"root:x:0:0\n"), |h| {
                    h.uid = 1000;
                    h.gid = 5_000_000_000; // wraps to u32 as extraction's chown does
                    h.mode = 0o4755;
                    h.xattrs = vec![
                        x("user.a", b"1"),
                        // A valid v2 capability set (the kernel checks): cap_net_bind_service.
                        x(
                            "security.capability",
                            &[1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                        ),
                        x("trusted.overlay.redirect", b"/evil"),
                        x("user.overlay.opaque", b"y"),
                        x("user.a", b"2"),
                    ];
                }),
                with(H::symlink("etc/link", "../etc/passwd"), |h| {
                    h.xattrs = vec![x("user.dropped", b"on a symlink"), x("trusted.kept", b"k")];
                    h.uid = 3;
                }),
                with(H::new("dev/null", b'3'), |h| h.dev = (1, 3)),
                with(H::new("dev/loop9", b'4'), |h| {
                    h.dev = (7, 9);
                    h.mode = 0o660;
                }),
                with(H::new("run/fifo", b'6'), |h| h.mode = 0o1644),
                H::hardlink("etc/passwd.hard", "etc/passwd"),
                H::file(
                    &format!("long/{}/{}", "d".repeat(200), "f".repeat(250)),
                    b"deep",
                ),
                with(H::symlink("long/target", &"t/".repeat(1500)), |_| {}),
            ],
        ),
        (
            "later duplicates win; a directory listed twice keeps its first time and its children",
            vec![
                H::file("a", b"first"),
                H::file("a", b"second"),
                with(H::dir("d"), |h| h.mtime = (100, 0)),
                H::file("d/f", b"x"),
                with(H::dir("d"), |h| {
                    h.mtime = (200, 0);
                    h.mode = 0o700;
                    h.xattrs = vec![x("user.second", b"2")];
                }),
                H::dir("e"),
                H::file("e", b"file replaces dir"),
                H::file("g", b"dir replaces file"),
                H::dir("g"),
            ],
        ),
        (
            "whiteouts: of lower layers, of this layer's own entries, opaque dirs, aufs names",
            vec![
                H::file("a/.wh.gone", b""),
                H::file("a/.wh..wh..opq", b""),
                H::file(".wh..wh.plnk", b""),
                H::dir("mine"),
                H::file("mine/f", b"stays"),
                H::file(".wh.mine", b""),
                H::file("own", b"stays too"),
                H::file(".wh.own", b""),
                H::file("w/.wh.x", b""),
                H::file("w/x", b"takes the whiteout's place"),
                H::file("v/.wh.y", b""),
                H::dir("v/y"),
                H::file("u/.wh.z", b""),
                H::file("u/z/deep", b"under a whiteout: the dir becomes opaque"),
                H::file("file", b""),
                H::file("file/.wh.under", b""),
            ],
        ),
        (
            "implicit parents, and the root not listed",
            vec![
                H::file("x/y/z/f", b"f"),
                H::dir("x/y"),
                H::file("q/.wh..wh..opq", b""),
            ],
        ),
        (
            "a hardlink keeps the inode its target was replaced by",
            vec![
                H::file("t", b"old"),
                H::hardlink("l", "t"),
                H::file("t", b"new"),
                H::hardlink("l2", "l"),
            ],
        ),
        (
            "a whiteout of an implicit directory removes what the layer put under it",
            vec![
                H::file("p/q/f", b"f"),
                H::file(".wh.p", b""),
                H::file("p2/f", b""),
            ],
        ),
        (
            "the directory-time pass leaves a whited-out directory gone",
            vec![H::dir("a/b"), H::file(".wh.a", b"")],
        ),
        (
            "the directory-time pass skips a directory whose parent became a file",
            vec![H::dir("a/b"), H::file("a", b"")],
        ),
        (
            "implicit parents replaced, removed, listed, made again",
            vec![
                H::file("p/q/r/f", b"f"),
                H::file("p/q", b"a file takes q and r's place"),
                H::file("s/t/f", b""),
                H::file(".wh.s", b""),
                H::file("u/v/f", b""),
                H::dir("u"),
                H::file("w/x/f", b""),
                H::symlink("w", "elsewhere"),
                H::file("m/n/f", b""),
                H::dir("m/n"),
                H::file("m/n/o/f", b""),
                H::file("k/l/f", b""),
                H::dir("k"),
                H::file("k", b""),
                H::file("k2/l/f", b""),
                H::file(".wh.k2", b""),
                H::file("k2/m/f", b"k2 made again over the whiteout: opaque, not implicit"),
            ],
        ),
        (
            "a new directory in a setgid directory extraction does not know as one",
            vec![
                with(H::dir("s"), |h| {
                    h.mode = 0o2775;
                    h.gid = 5;
                }),
                H::file("s/i/f", b"i is implicit, setgid, group 5"),
                // The entry's owner is the process's and the mode needs no
                // chmod: the kernel's group and setgid bit stay.
                with(H::dir("s/i/keeps"), |h| h.mode = 0o755),
                // These need a chown or chmod anyway: exactly the entry.
                with(H::dir("s/i/chowned"), |h| {
                    h.mode = 0o755;
                    h.uid = 9;
                }),
                with(H::dir("s/i/sticky"), |h| h.mode = 0o1755),
                with(H::dir("s/i/umasked"), |h| h.mode = 0o777),
                // In a directory it knows is setgid: always the entry.
                with(H::dir("s/known"), |h| h.mode = 0o755),
            ],
        ),
        (
            "the directory-time pass dates what replaced a directory",
            vec![
                with(H::dir("k"), |h| h.mtime = (12345, 0)),
                H::file("k", b"file"),
            ],
        ),
    ];
    for (what, entries) in &cases {
        assert_eq!(
            check(&tar(entries), &|| what.to_string()),
            Outcome::SameTree,
            "{what}"
        );
    }

    let refused: Vec<(&str, Vec<H>)> = vec![
        ("absolute path", vec![H::file("/etc/passwd", b"")]),
        ("dot-dot", vec![H::file("a/../../b", b"")]),
        (
            "hardlink to a file of another layer",
            vec![H::hardlink("l", "etc/shadow")],
        ),
        (
            "hardlink to a directory",
            vec![H::dir("d"), H::hardlink("l", "d")],
        ),
        (
            "through a symlink",
            vec![H::symlink("s", "/etc"), H::file("s/passwd", b"")],
        ),
        ("under a file", vec![H::file("f", b""), H::file("f/g", b"")]),
        ("name too long", vec![H::file(&"n".repeat(256), b"")]),
        (
            "a parent path of PATH_MAX bytes",
            vec![H::file(&format!("{}dd/f", "d/".repeat(2047)), b"")],
        ),
        ("root entry not a directory", vec![H::file("./", b"")]),
        ("whiteout of nothing", vec![H::file(".wh.", b"")]),
    ];
    for (what, entries) in &refused {
        assert_eq!(
            check(&tar(entries), &|| what.to_string()),
            Outcome::BothRefuse,
            "{what}"
        );
    }
    // 2048 directories deep, a parent path of 4095 bytes: both take it (too
    // deep for the tree walk of the comparison, which goes by path).
    let deep = tar(&[H::file(&format!("{}d/f", "d/".repeat(2047)), b"deep")]);
    let tmp = tempfile::tempdir().unwrap();
    let x = extract(tmp.path(), &deep).unwrap();
    assert_eq!(x.implicit.len(), 2049, "the root and 2048 made directories");
    let b = build(&deep, Compression::None, Policy::default()).unwrap();
    assert_eq!(Index::parse(b.index).unwrap().entry_count(), 2050);
    // Extraction links anything but a directory; the index holds hardlinks
    // to regular files only, and says why.
    let t = tar(&[H::symlink("s", "x"), H::hardlink("l", "s")]);
    assert_eq!(
        check(&t, &|| "hardlink to a symlink".into()),
        Outcome::NotIndexable
    );
}

/// Random archives over a few names: duplicates, whiteouts, opaque marks,
/// links of all kinds, dirs replaced by files and back. Extraction and the
/// index builder agree on every one.
#[test]
fn random_layers_match_extraction() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1d3);
    let comps = [
        "a",
        "b",
        "c",
        ".wh.a",
        ".wh.b",
        ".wh..wh..opq",
        ".wh..wh.x",
        ".",
    ];
    let (mut ok, mut refused, mut unindexable) = (0, 0, 0);
    for round in 0..300 {
        let mut entries = Vec::new();
        for _ in 0..rng.gen_range(1..14) {
            let depth = rng.gen_range(1..=3);
            let mut path: Vec<&str> = (0..depth).map(|_| comps[rng.gen_range(0..3)]).collect();
            if rng.gen_ratio(1, 3) {
                *path.last_mut().unwrap() = comps[rng.gen_range(3..comps.len())];
            }
            let mut name = path.join("/");
            if rng.gen_ratio(1, 8) {
                name = format!("./{name}");
            }
            let kind = [b'0', b'0', b'5', b'5', b'2', b'1', b'6', b'3'][rng.gen_range(0..8)];
            let mut h = H::new(&name, kind);
            h.mtime = (
                rng.gen_range(1..2_000_000_000),
                rng.gen_range(0..2) * rng.gen_range(0..1_000_000_000),
            );
            h.mode = rng.gen_range(0..0o7777);
            h.uid = rng.gen_range(0..3);
            h.gid = rng.gen_range(0..3);
            match kind {
                b'0' => h.data = vec![b'x'; rng.gen_range(0..700)],
                b'2' => h.link = ["a", "../b", "/etc", "a/b/c"][rng.gen_range(0..4)].into(),
                b'1' => {
                    let t: Vec<&str> = (0..rng.gen_range(1..=2))
                        .map(|_| comps[rng.gen_range(0..3)])
                        .collect();
                    h.link = t.join("/").into_bytes();
                }
                b'3' => h.dev = (rng.gen_range(0..3), rng.gen_range(0..3)),
                _ => {}
            }
            if rng.gen_ratio(1, 5) {
                h.xattrs.push((
                    ["user.k", "trusted.k", "trusted.overlay.opaque"][rng.gen_range(0..3)].into(),
                    vec![b'v'; rng.gen_range(0..4)],
                ));
            }
            entries.push(h);
        }
        if rng.gen_ratio(1, 6) {
            entries.insert(0, H::dir("./"));
        }
        let t = tar(&entries);
        let what = || format!("round {round}:\n{}", describe(&entries));
        let outcome = std::panic::catch_unwind(|| check(&t, &what)).unwrap_or_else(|p| {
            eprintln!("{}", what());
            std::panic::resume_unwind(p)
        });
        match outcome {
            Outcome::SameTree => ok += 1,
            Outcome::BothRefuse => refused += 1,
            Outcome::NotIndexable => unindexable += 1,
        }
    }
    // Both outcomes were exercised.
    assert!(
        ok > 50 && refused > 10,
        "{ok} accepted, {refused} refused, {unindexable} not indexable"
    );
}

/// Deep paths from a hostile layer (or TOC) cost the builder memory in
/// proportion to the input: each of these entries makes 2047 directories;
/// keyed by joined path strings, as extraction keeps them, the bookkeeping
/// alone would be about 8 MB per entry. Extraction caps that bookkeeping
/// (64 MiB a layer: 7 such entries fit, the 8th does not), and so does the
/// builder, by the same count.
#[test]
fn deep_paths_stay_linear() {
    let mut tb = cstore_index::TreeBuilder::new(common::tree_options());
    let deep = "d/".repeat(2046);
    for i in 0..8 {
        let p = format!("{i:03}/{deep}f");
        let mut e = cstore_index::TarEntry::new(p.as_bytes(), cstore_index::TarKind::File);
        e.mode = 0o644;
        let r = tb.add(&e);
        if i < 7 {
            r.unwrap();
        } else {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("implicit parent directories"), "{e}");
        }
    }
}

/// The cap on made directories' paths refuses the same layers in both: one
/// entry's parents fit a small cap, the next one's do not.
#[test]
fn made_directory_cap_matches_extraction() {
    assert_eq!(
        cstore_index::tree::MAX_MADE_DIR_BYTES,
        cstore_unpack::extract::MAX_MADE_DIR_BYTES
    );
    let layer = |n: usize| {
        let entries: Vec<H> = (0..n)
            .map(|i| H::file(&format!("top{i}/{}f", "dd/".repeat(20)), b"x"))
            .collect();
        tar(&entries)
    };
    // One entry: 21 directories, 2 * sum(len + 1) = 2 * sum_{k=0..20}(5 + 3k) = 1470.
    for (n, cap, ok) in [
        (1, 1470, true),
        (1, 1469, false),
        (3, 4410, true),
        (3, 4409, false),
    ] {
        let t = layer(n);
        let tmp = tempfile::tempdir().unwrap();
        let real = common::extract_with(tmp.path(), &t, cap);
        let mut opts = common::tree_options();
        opts.max_made_dir_bytes = cap;
        let ours = common::build_with(&t, Compression::None, Policy::default(), opts);
        assert_eq!(real.is_ok(), ok, "{n} entries, cap {cap}: extraction");
        assert_eq!(ours.is_ok(), ok, "{n} entries, cap {cap}: index builder");
        if let (Ok(x), Ok(b)) = (real, ours) {
            assert_same_tree(&Index::parse(b.index).unwrap(), &b.tar, &x);
        }
    }
}
