//! LayerFs on the real kernel: fixture image layers (fixtures/images.sh,
//! layered-images.sh) served lazily from their local blobs, stacked under overlayfs
//! and compared with `umoci unpack` of the same image; concurrent read misses; a
//! tampered span; completion against a normal unpack; passthrough once complete.
//! Needs root, /dev/fuse and the fixture images (a failure under CI=true).

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use cstore_fuse_fs::abi::op;
use cstore_fuse_fs::layer::{build_index, FileSource, LayerFs, LayerOptions, SpanSource};
use cstore_fuse_fs::{FdStore, PassthroughMode, ReadOnlyFs, Session, SessionOptions, StateDir};
use cstore_index::{Compression, Index, Kind, Policy};

use cstore_testkit::{repo_root as repo, root_attrs, run, treesnap};

/// The fixture OCI layout, with the images these tests use built (once).
fn oci() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        run(Command::new("bash")
            .arg(repo().join("fixtures/images.sh"))
            .arg("--debian"));
        run(Command::new("bash")
            .arg(repo().join("fixtures/layered-images.sh"))
            .args([
                "layered-delete",
                "layered-opaque",
                "layered-replace",
                "layered-hardlink",
            ]));
        PathBuf::from(
            run(Command::new("bash")
                .arg(repo().join("fixtures/images.sh"))
                .arg("--print-dir"))
            .trim(),
        )
    })
    .clone()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn blob_path(oci: &Path, digest: &str) -> PathBuf {
    oci.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The layers of image `tag` (linux/amd64), bottom first.
fn layers(tag: &str) -> Vec<(PathBuf, Compression)> {
    let oci = oci();
    let idx = json(&oci.join("index.json"));
    let m = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag))
        .unwrap_or_else(|| panic!("no image {tag} in {}", oci.display()));
    let man = json(&blob_path(&oci, m["digest"].as_str().unwrap()));
    man["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let mt = l["mediaType"].as_str().unwrap();
            let c = if mt.ends_with("gzip") {
                Compression::Gzip
            } else if mt.ends_with("zstd") {
                Compression::Zstd
            } else {
                Compression::None
            };
            (blob_path(&oci, l["digest"].as_str().unwrap()), c)
        })
        .collect()
}

fn tree_diff(want: &str, got: &str) -> String {
    let w: BTreeSet<&str> = want.lines().collect();
    let g: BTreeSet<&str> = got.lines().collect();
    let mut out = String::new();
    for l in w.difference(&g).take(20) {
        out += &format!("- want {l}\n");
    }
    for l in g.difference(&w).take(20) {
        out += &format!("+ got  {l}\n");
    }
    out
}

/// `umoci unpack` of image `tag`: treesnap of its rootfs and the root's attributes.
fn umoci_tree(tag: &str) -> (String, String) {
    let t = tmpdir();
    let bundle = t.path().join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", oci().display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    (treesnap(&rootfs), root_attrs(&rootfs))
}

/// A source that counts its calls and the spans' bytes asked for, and can flip a
/// byte at one offset of what it returns.
struct Counted {
    inner: FileSource,
    calls: AtomicU64,
    ranges: Mutex<Vec<Range<u64>>>,
    /// The windows blob's ranges asked for.
    wranges: Mutex<Vec<Range<u64>>>,
    flip_at: Option<u64>,
    /// Each fetch takes this long (a slow link).
    delay: std::time::Duration,
}

impl SpanSource for Counted {
    fn fetch(&self, range: Range<u64>) -> std::io::Result<Vec<u8>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.ranges.lock().unwrap().push(range.clone());
        std::thread::sleep(self.delay);
        let mut v = self.inner.fetch(range.clone())?;
        if let Some(at) = self.flip_at {
            if range.contains(&at) {
                v[(at - range.start) as usize] ^= 0x40;
            }
        }
        Ok(v)
    }
    fn fetch_windows(&self, range: Range<u64>) -> std::io::Result<Vec<u8>> {
        self.wranges.lock().unwrap().push(range.clone());
        self.inner.fetch_windows(range)
    }
}

/// One layer served lazily from its local blob.
struct Lazy {
    fs: Arc<LayerFs>,
    src: Arc<Counted>,
    session: Option<Session<LayerFs>>,
    mnt: PathBuf,
    tree: PathBuf,
    blob: PathBuf,
    windows: PathBuf,
}

impl Lazy {
    fn stop(&mut self) {
        drop(self.session.take());
    }
}

/// Indexes `blob` (128 KiB spans, or `span_target`), and mounts it under `dir` with
/// passthrough if the kernel has it.
fn serve(
    dir: &Path,
    blob: &Path,
    c: Compression,
    span_target: u32,
    flip_at: Option<u64>,
    mounts: &mut Mounts,
) -> Lazy {
    serve_over(dir, blob, c, span_target, flip_at, &[], mounts)
}

/// `serve`, the layer's implicit directories taking their attributes from the
/// layers `below` (nearest first) before the mount.
fn serve_over(
    dir: &Path,
    blob: &Path,
    c: Compression,
    span_target: u32,
    flip_at: Option<u64>,
    below: &[&Index<Vec<u8>>],
    mounts: &mut Mounts,
) -> Lazy {
    let src = Source {
        span_target,
        flip_at,
        delay: std::time::Duration::ZERO,
    };
    serve_with(dir, blob, c, src, LayerOptions::default(), below, mounts)
}

/// How the tests' layer source behaves.
struct Source {
    span_target: u32,
    flip_at: Option<u64>,
    delay: std::time::Duration,
}

fn serve_with(
    dir: &Path,
    blob: &Path,
    c: Compression,
    source: Source,
    opts: LayerOptions,
    below: &[&Index<Vec<u8>>],
    mounts: &mut Mounts,
) -> Lazy {
    let Source {
        span_target,
        flip_at,
        delay,
    } = source;
    std::fs::create_dir_all(dir).unwrap();
    let policy = Policy {
        span_target,
        ..Policy::default()
    };
    let (index, windows) = build_index(blob, c, policy, opts.tree).unwrap();
    let wpath = dir.join("windows");
    std::fs::write(&wpath, &windows).unwrap();
    let src = Arc::new(Counted {
        inner: FileSource::open(blob, Some(&wpath)).unwrap(),
        calls: AtomicU64::new(0),
        ranges: Mutex::new(Vec::new()),
        wranges: Mutex::new(Vec::new()),
        flip_at,
        delay,
    });
    let (tree, mnt) = (dir.join("fs"), dir.join("mnt"));
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = Arc::new(
        LayerFs::open(
            index,
            src.clone() as Arc<dyn SpanSource>,
            &dir.join("cache"),
            &tree,
            opts,
        )
        .unwrap(),
    );
    fs.inherit_implicit(below);
    let session = Session::start(
        fs.clone(),
        &mnt,
        &StateDir::new(dir.join("state")).unwrap(),
        SessionOptions {
            passthrough: PassthroughMode::IfAvailable,
            ..SessionOptions::default()
        },
    )
    .unwrap();
    mounts.push(&mnt);
    mounts.conn(session.conn().unwrap());
    Lazy {
        fs,
        src,
        session: Some(session),
        mnt,
        tree,
        blob: blob.to_path_buf(),
        windows: wpath,
    }
}

/// Every layer of each image served lazily, overlayfs stacked over them: the merged
/// tree (every file read through FUSE) equals `umoci unpack` of the image.
#[test]
fn lazy_overlay_equals_umoci_unpack() {
    if !fuse_available("lazy_overlay_equals_umoci_unpack") {
        return;
    }
    let mut xattr_free = 0;
    for tag in [
        "busybox",
        "layered-delete",
        "layered-opaque",
        "layered-replace",
        "layered-hardlink",
        "debian",
    ] {
        let t = tmpdir();
        let mut mounts = Mounts::default();
        let mut lowers = Vec::new();
        let mut served = Vec::new();
        for (k, (blob, c)) in layers(tag).into_iter().enumerate() {
            let below: Vec<_> = served.iter().rev().map(|l: &Lazy| l.fs.index()).collect();
            let l = serve_over(
                &t.path().join(format!("l{k}")),
                &blob,
                c,
                128 << 10,
                None,
                &below,
                &mut mounts,
            );
            lowers.push(l.mnt.display().to_string());
            served.push(l);
        }
        lowers.reverse();
        let merged = t.path().join("merged");
        mount_overlay(
            &lowers.join(":"),
            &t.path().join("upper"),
            &t.path().join("work"),
            &merged,
        );
        mounts.push(&merged);
        let (want, want_root) = umoci_tree(tag);
        let got = treesnap(&merged);
        assert!(
            want == got,
            "{tag}: lazy overlay vs umoci unpack:\n{}",
            tree_diff(&want, &got)
        );
        assert_eq!(root_attrs(&merged), want_root, "{tag}: root");
        let mut fetched = 0;
        for l in &served {
            let s = l.fs.stats();
            assert_eq!(s.failures, 0, "{tag}");
            fetched += s.spans_fetched;
            // A layer without xattrs answered GETXATTR ENOSYS once and the kernel
            // asked no more (overlayfs asks at every lower file's lookup otherwise),
            // and the tree above still equals umoci's.
            if !l.fs.has_xattrs() {
                xattr_free += 1;
                let asked = l.session.as_ref().unwrap().stats().count(op::GETXATTR);
                assert!(
                    asked <= 1,
                    "{tag}: {asked} GETXATTRs on a layer without xattrs"
                );
            }
        }
        if tag == "layered-opaque" {
            assert!(
                served.iter().any(|l| l.fs.has_xattrs()),
                "{tag}: opaque dir"
            );
        }
        assert!(
            fetched > 0,
            "{tag}: the files were not read through the layers"
        );
    }
    assert!(xattr_free > 0, "no layer without xattrs was served");
}

/// The content of every file of the layer, from a full inflate of its blob.
fn expected_files(l: &Lazy) -> Vec<(PathBuf, Vec<u8>)> {
    files_from(l.fs.index(), &l.blob, &l.windows)
}

fn files_from(idx: &Index<Vec<u8>>, blob: &Path, windows: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let blob = std::fs::read(blob).unwrap();
    let windows = std::fs::read(windows).unwrap();
    let mut r = cstore_index::SpanReader::new();
    let full = r
        .read_range(idx, &blob, &windows, 0..idx.header().uncompressed_size)
        .unwrap();
    let mut out = Vec::new();
    for i in 0..idx.entry_count() {
        let e = idx.entry(i);
        if e.kind != Kind::File {
            continue;
        }
        let mut v = vec![0u8; e.size as usize];
        for (off, s) in idx.file_data(i, 0..e.size) {
            v[off as usize..(off + s.end - s.start) as usize]
                .copy_from_slice(&full[s.start as usize..s.end as usize]);
        }
        out.push((PathBuf::from(String::from_utf8(idx.path(i)).unwrap()), v));
    }
    out
}

/// Many threads reading the same and different files of a cold layer at once: every
/// byte is right, each span is fetched from the source once (however many readers
/// waited on it), and adjacent misses share requests.
#[test]
fn concurrent_read_misses_fetch_each_span_once() {
    if !fuse_available("concurrent_read_misses_fetch_each_span_once") {
        return;
    }
    let t = tmpdir();
    let mut mounts = Mounts::default();
    let (blob, c) = layers("debian").remove(0);
    let l = serve(&t.path().join("l"), &blob, c, 64 << 10, None, &mut mounts);
    let files = Arc::new(expected_files(&l));
    let mnt = l.mnt.clone();
    let threads: Vec<_> = (0..8)
        .map(|k| {
            let (files, mnt) = (files.clone(), mnt.clone());
            std::thread::spawn(move || {
                // Half the threads read in order, half in reverse; each a stride.
                let n = files.len();
                for j in 0..n {
                    let i = if k % 2 == 0 { j } else { n - 1 - j };
                    if i % 4 != k / 2 {
                        continue;
                    }
                    let (rel, want) = &files[i];
                    let mut got = Vec::new();
                    std::fs::File::open(mnt.join(rel))
                        .and_then(|mut f| f.read_to_end(&mut got))
                        .unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
                    assert!(got == *want, "{}: content differs", rel.display());
                }
            })
        })
        .collect();
    for h in threads {
        h.join().unwrap();
    }
    // Readers are answered from memory before the writer has put their spans in
    // the tree (local): wait for it before counting.
    wait_until("every fetched span is written", || {
        l.fs.stats().inflated == 0
    });
    let s = l.fs.stats();
    assert_eq!(s.failures, 0);
    assert_eq!(s.spans_fetched, s.local, "each span fetched once: {s:?}");
    assert!(s.local > 100, "a big layer in many spans: {s:?}");
    assert!(
        s.requests < s.spans_fetched,
        "adjacent misses coalesced: {s:?}"
    );
    assert_eq!(l.src.calls.load(Ordering::SeqCst), s.requests);
    // No two requests asked for the same span.
    let idx = l.fs.index();
    let mut seen = vec![false; idx.span_count()];
    for r in l.src.ranges.lock().unwrap().iter() {
        for (sp, seen) in seen.iter_mut().enumerate() {
            let c = idx.span(sp).compressed;
            if c.start >= r.start && c.end <= r.end {
                assert!(!*seen, "span {sp} fetched twice");
                *seen = true;
            }
        }
    }
}

/// The file of `l` whose data starts nearest `frac` of the layer's compressed size
/// and is at least 64 KiB: (path, content, compressed range of its spans).
fn file_at(l: &Lazy, frac: f64) -> (PathBuf, Vec<u8>, Range<u64>) {
    let idx = l.fs.index();
    let total = std::fs::metadata(&l.blob).unwrap().len();
    let want = (total as f64 * frac) as u64;
    let files = expected_files(l);
    let mut best: Option<(u64, PathBuf, Vec<u8>, Range<u64>)> = None;
    for i in 0..idx.entry_count() {
        let e = idx.entry(i);
        if e.kind != Kind::File || e.size < 64 << 10 || e.hardlink_target().is_some() {
            continue;
        }
        let data: Vec<Range<u64>> = idx
            .file_data(i, 0..e.size)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        let (Some(a), Some(b)) = (data.first(), data.last()) else {
            continue;
        };
        let spans: Vec<usize> = idx.spans_for(a.start, b.end).collect();
        let c =
            idx.span(spans[0]).compressed.start..idx.span(*spans.last().unwrap()).compressed.end;
        let d = c.start.abs_diff(want);
        if best.as_ref().is_none_or(|b| d < b.0) {
            let rel = PathBuf::from(String::from_utf8(idx.path(i)).unwrap());
            let content = files.iter().find(|f| f.0 == rel).unwrap().1.clone();
            best = Some((d, rel, content, c));
        }
    }
    let (_, rel, content, c) = best.expect("a file of 64 KiB or more");
    (rel, content, c)
}

/// While background completion works through a layer over a slow source, a read
/// of a file far ahead of it is fetched on its own: its request holds the file's
/// spans and none of the background-queued spans after them (which would make the
/// reader wait for megabytes it did not ask for).
#[test]
fn a_read_miss_does_not_carry_background_spans() {
    if !fuse_available("a_read_miss_does_not_carry_background_spans") {
        return;
    }
    let t = tmpdir();
    let mut mounts = Mounts::default();
    let (blob, c) = layers("debian").remove(0);
    let src = Source {
        span_target: 64 << 10,
        flip_at: None,
        delay: std::time::Duration::from_millis(150),
    };
    let l = serve_with(
        &t.path().join("l"),
        &blob,
        c,
        src,
        LayerOptions::default(),
        &[],
        &mut mounts,
    );
    let (rel, want, span_bytes) = file_at(&l, 0.8);
    let fs = l.fs.clone();
    let bg = std::thread::spawn(move || fs.complete());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        std::fs::read(l.mnt.join(&rel)).unwrap(),
        want,
        "{}",
        rel.display()
    );
    let ranges = l.src.ranges.lock().unwrap().clone();
    let first = ranges
        .iter()
        .find(|r| r.contains(&span_bytes.start))
        .unwrap_or_else(|| {
            panic!(
                "no request for {} ({span_bytes:?}): {ranges:?}",
                rel.display()
            )
        });
    assert!(
        first.end <= span_bytes.end,
        "the read of {} ({span_bytes:?}) was fetched as {first:?}: background spans rode along",
        rel.display()
    );
    bg.join().unwrap().unwrap();
    assert!(l.fs.is_complete());
}

/// Layer options sharing a daemon's `Activity` (returned too, for the test to
/// act on), background work starting `quiet_ms` after the last miss or mount.
fn sharing_activity(quiet_ms: u64) -> (Arc<cstore_fuse_fs::layer::Activity>, LayerOptions) {
    let activity = Arc::new(cstore_fuse_fs::layer::Activity::default());
    let opts = LayerOptions {
        background_quiet: std::time::Duration::from_millis(quiet_ms),
        activity: activity.clone(),
        ..LayerOptions::default()
    };
    (activity, opts)
}

/// Background completion yields to reads in every layer of the daemon: while a
/// layer's reads keep missing (and for `background_quiet` after), another layer
/// sharing the same `Activity` starts no background request; then it completes.
#[test]
fn background_completion_waits_for_reads_in_any_layer() {
    if !fuse_available("background_completion_waits_for_reads_in_any_layer") {
        return;
    }
    let t = tmpdir();
    let mut mounts = Mounts::default();
    let (blob, c) = layers("debian").remove(0);
    let (_, opts) = sharing_activity(1500);
    let slow = |span_target| Source {
        span_target,
        flip_at: None,
        delay: std::time::Duration::from_millis(20),
    };
    let a = serve_with(
        &t.path().join("a"),
        &blob,
        c,
        slow(64 << 10),
        opts.clone(),
        &[],
        &mut mounts,
    );
    let b = serve_with(
        &t.path().join("b"),
        &blob,
        c,
        slow(128 << 10),
        opts,
        &[],
        &mut mounts,
    );
    let (rel, want, _) = file_at(&a, 0.5);
    let (rel2, want2, _) = file_at(&a, 0.2);
    // A read in layer a, then b's completion asked for at once.
    assert_eq!(std::fs::read(a.mnt.join(&rel)).unwrap(), want);
    let fs = b.fs.clone();
    let bg = std::thread::spawn(move || fs.complete());
    // More misses in a during the quiet window.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(std::fs::read(a.mnt.join(&rel2)).unwrap(), want2);
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert_eq!(
        b.src.calls.load(Ordering::SeqCst),
        0,
        "layer b fetched in the background while layer a's reads were missing"
    );
    bg.join().unwrap().unwrap();
    assert!(b.fs.is_complete());
    assert!(b.src.calls.load(Ordering::SeqCst) > 0);
}

/// Background completion waits while the daemon is mounting layers (a container
/// starts only once all are mounted): with a mount in progress on the shared
/// `Activity`, a layer's completion fetches nothing; once it is done (and quiet
/// for `background_quiet`), the layer completes.
#[test]
fn background_completion_waits_while_layers_are_being_mounted() {
    if !fuse_available("background_completion_waits_while_layers_are_being_mounted") {
        return;
    }
    let t = tmpdir();
    let mut mounts = Mounts::default();
    let (blob, c) = layers("debian").remove(0);
    let (activity, opts) = sharing_activity(300);
    let src = Source {
        span_target: 128 << 10,
        flip_at: None,
        delay: std::time::Duration::ZERO,
    };
    let b = serve_with(&t.path().join("b"), &blob, c, src, opts, &[], &mut mounts);
    let mounting = activity.mounting();
    let fs = b.fs.clone();
    let bg = std::thread::spawn(move || fs.complete());
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert_eq!(
        b.src.calls.load(Ordering::SeqCst),
        0,
        "the layer fetched in the background while another was being mounted"
    );
    drop(mounting);
    bg.join().unwrap().unwrap();
    assert!(b.fs.is_complete());
    assert!(b.src.calls.load(Ordering::SeqCst) > 0);
}

/// A source whose bytes for one span are altered: the reader of a file in that span
/// gets EIO, nothing of it reaches the tree or the bitmap, and files elsewhere read.
#[test]
fn a_tampered_span_is_eio_and_never_written() {
    if !fuse_available("a_tampered_span_is_eio_and_never_written") {
        return;
    }
    let t = tmpdir();
    let mut mounts = Mounts::default();
    let (blob, c) = layers("debian").remove(0);
    // Find a file whose data lies in one span, and flip a byte of that span.
    let policy = Policy {
        span_target: 32 << 10,
        ..Policy::default()
    };
    let (index, _) = build_index(&blob, c, policy, LayerOptions::default().tree).unwrap();
    let idx = Index::parse(index).unwrap();
    let (victim, span) = (0..idx.entry_count())
        .filter(|&i| idx.entry(i).kind == Kind::File && idx.entry(i).size > 4096)
        .find_map(|i| {
            let d = idx.file_data(i, 0..idx.entry(i).size);
            let r = idx.spans_for(d[0].1.start, d.last().unwrap().1.end);
            (r.len() == 1 && r.start > 0).then_some((i, r.start))
        })
        .expect("a file within one span");
    let path = PathBuf::from(String::from_utf8(idx.path(victim)).unwrap());
    let sp = idx.span(span);
    let flip = (sp.compressed.start + sp.compressed.end) / 2;
    let other = (0..idx.entry_count())
        .find(|&i| {
            let e = idx.entry(i);
            e.kind == Kind::File && e.size > 0 && {
                let d = idx.file_data(i, 0..e.size);
                let r = idx.spans_for(d[0].1.start, d.last().unwrap().1.end);
                !r.contains(&span) && !r.contains(&(span - 1)) && !r.contains(&(span + 1))
            }
        })
        .expect("a file elsewhere");
    let other = PathBuf::from(String::from_utf8(idx.path(other)).unwrap());

    let l = serve(
        &t.path().join("l"),
        &blob,
        c,
        32 << 10,
        Some(flip),
        &mut mounts,
    );
    let err = std::fs::read(l.mnt.join(&path)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{}", path.display());
    // Asked again: fetched again, refused again (never cached as good).
    let err = std::fs::read(l.mnt.join(&path)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let s = l.fs.stats();
    assert!(s.failures >= 2, "{s:?}");
    // Nothing of the span in the tree: the file is absent or all zeros.
    if let Ok(b) = std::fs::read(l.tree.join(&path)) {
        assert!(b.iter().all(|&x| x == 0), "tampered bytes reached the tree");
    }
    let bitmap = std::fs::read(t.path().join("l/cache/spans")).unwrap_or_default();
    assert!(
        bitmap
            .get(span / 8)
            .is_none_or(|b| b & (1 << (span % 8)) == 0),
        "span {span} marked local"
    );
    std::fs::read(l.mnt.join(&other)).unwrap();
}

/// Completion: the tree becomes exactly what extraction makes of the layer (compared
/// with a normal unpack by the project's extractor), and files opened afterwards are
/// served in passthrough: their reads never reach the daemon.
#[test]
fn completion_makes_the_extracted_tree_and_passthrough_serves_it() {
    if !fuse_available("completion_makes_the_extracted_tree_and_passthrough_serves_it") {
        return;
    }
    for tag in [
        "busybox",
        "layered-hardlink",
        "layered-opaque",
        "layered-delete",
    ] {
        let t = tmpdir();
        let mut mounts = Mounts::default();
        for (k, (blob, c)) in layers(tag).into_iter().enumerate() {
            let dir = t.path().join(format!("l{k}"));
            let mut l = serve(&dir, &blob, c, 64 << 10, None, &mut mounts);
            // Some files read on demand first.
            let files = expected_files(&l);
            for (rel, want) in files.iter().take(3) {
                assert_eq!(&std::fs::read(l.mnt.join(rel)).unwrap(), want);
            }
            l.fs.complete().unwrap();
            assert!(l.fs.is_complete());
            // Files read before completion were opened in caching mode; until their
            // RELEASE (asynchronous to close) arrives, a hardlink of one stays cached.
            wait_no_caching_handles(l.session.as_ref().unwrap());
            let stats = l.session.as_ref().unwrap().stats();
            let passthrough = l.session.as_ref().unwrap().passthrough();
            let reads_before = stats.count(op::READ);
            for (rel, want) in files.iter().skip(3) {
                assert_eq!(&std::fs::read(l.mnt.join(rel)).unwrap(), want);
            }
            if passthrough && files.len() > 3 {
                assert_eq!(
                    stats.count(op::READ),
                    reads_before,
                    "{tag}: reads of complete files reached the daemon"
                );
            } else if !passthrough
                && passthrough_missing(
                    "completion_makes_the_extracted_tree_and_passthrough_serves_it",
                    "the kernel did not grant it",
                )
            {
                return;
            }
            l.stop();
            mounts.umount(&l.mnt);
            // The same layer unpacked by the project's extractor.
            let x = dir.join("extracted");
            std::fs::create_dir_all(&x).unwrap();
            unpack(&blob, c, &x);
            let (want, got) = (treesnap(&x), treesnap(&l.tree));
            assert!(
                want == got,
                "{tag} layer {k}: completed tree vs extraction:\n{}",
                tree_diff(&want, &got)
            );
            assert_eq!(root_attrs(&l.tree), root_attrs(&x), "{tag} layer {k}");
        }
    }
}

fn wait_no_caching_handles(s: &Session<LayerFs>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.caching_handles() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "caching handles never released"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn unpack(blob: &Path, c: Compression, dest: &Path) {
    use cstore_unpack::Compression as C;
    use cstore_unpack::{unpack_layer, LayerRef, UnpackOptions};
    let digest = format!("sha256:{}", blob.file_name().unwrap().to_str().unwrap());
    // The diff_id as the index computed it.
    let (index, _) = build_index(blob, c, Policy::default(), LayerOptions::default().tree).unwrap();
    let diff_id = Index::parse(index).unwrap().header().diff_id_str();
    let layer = LayerRef {
        image: "test",
        digest: &digest,
        compression: match c {
            Compression::Gzip => C::Gzip,
            Compression::Zstd => C::Zstd,
            Compression::None => C::None,
        },
        diff_id: &diff_id,
    };
    unpack_layer(blob, &layer, dest, &UnpackOptions::default()).unwrap();
}

fn stat_of(file: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    })
}

/// The serving daemon (`cstore-fuse-testd serve-layer`, its fd in a keeper) is
/// killed with SIGKILL three times while a reader loops over every file of a cold
/// layer whose fetches are slow: the reader sees no error and no wrong byte, and
/// each new daemon starts from the spans the bitmap on disk says are local (at least
/// what the previous one had reported), fetching none of them again. Then the layer
/// completes in the background, and the tree equals extraction's.
#[test]
fn sigkill_under_readers_resumes_from_the_bitmap() {
    if !fuse_available("sigkill_under_readers_resumes_from_the_bitmap") {
        return;
    }
    let t = tmpdir();
    let p = |s: &str| t.path().join(s);
    let (blob, c) = layers("debian").remove(0);
    let sock = p("keeper.sock");
    let mut mounts = Mounts::default();
    let keeper = Proc::spawn(testd().arg("keeper").arg(&sock));
    let t0 = std::time::Instant::now();
    while cstore_fuse_fs::KeeperClient::new(&sock).list().is_err() {
        assert!(t0.elapsed().as_secs() < 10, "keeper did not come up");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for d in ["tree", "mnt", "cache"] {
        std::fs::create_dir_all(p(d)).unwrap();
    }
    let daemon = |n: usize, extra: &[&str]| {
        let mut d = Proc::spawn(
            testd()
                .arg("serve-layer")
                .arg("--blob")
                .arg(&blob)
                .args(["--compression", "gzip", "--span-kib", "64"])
                .args(["--fetch-delay-ms", "15"])
                .arg("--cache")
                .arg(p("cache"))
                .arg("--tree")
                .arg(p("tree"))
                .arg("--mnt")
                .arg(p("mnt"))
                .arg("--state")
                .arg(p("state"))
                .arg("--keeper")
                .arg(&sock)
                .args(["--name", "lazy"])
                .arg("--stats")
                .arg(p(&format!("stats.{n}")))
                .args(extra),
        );
        d.ready();
        d
    };
    assert_eq!(c, Compression::Gzip);
    // The index as the daemon would build it, made here (a debug build takes longer
    // than a daemon may to get ready).
    let policy = Policy {
        span_target: 64 << 10,
        ..Policy::default()
    };
    let (index, windows) = build_index(&blob, c, policy, LayerOptions::default().tree).unwrap();
    std::fs::write(p("cache/windows"), windows).unwrap();
    std::fs::write(p("cache/index"), index).unwrap();
    let mut d = daemon(0, &[]);
    let conn = state_conn(&p("state"));
    mounts.push(&p("mnt"));
    mounts.conn(conn);
    let idx = Index::parse(std::fs::read(p("cache/index")).unwrap()).unwrap();
    let want: std::collections::BTreeMap<PathBuf, Vec<u8>> =
        files_from(&idx, &blob, &p("cache/windows"))
            .into_iter()
            .collect();
    let reader = Reader::start(&p("mnt"), want);
    for n in 1..=3 {
        let before = reader.reads();
        let t1 = std::time::Instant::now();
        while reader.reads() < before + 200 {
            assert!(t1.elapsed().as_secs() < 60, "reader made no progress");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Only what the bitmap on disk has survives the kill.
        let reported = stat_of(&p(&format!("stats.{}", n - 1)), "durable").unwrap_or(0);
        d.signal(libc::SIGKILL);
        d.wait_exit(std::time::Duration::from_secs(10));
        d = daemon(n, if n == 3 { &["--complete"] } else { &[] });
        let start = stat_of(&p(&format!("stats.{n}")), "start_local");
        let t2 = std::time::Instant::now();
        let start = loop {
            if let Some(s) = stat_of(&p(&format!("stats.{n}")), "start_local").or(start) {
                break s;
            }
            assert!(t2.elapsed().as_secs() < 10, "no stats from daemon {n}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(
            start >= reported && start > 0,
            "daemon {n} started with {start} spans local, the one before had {reported}"
        );
    }
    let r = reader
        .finish(std::time::Duration::from_secs(60))
        .expect("reader stuck on the mount");
    assert!(
        r.errors.is_empty(),
        "reader errors: {:?}",
        &r.errors[..r.errors.len().min(10)]
    );
    assert!(
        r.loops >= 1,
        "the reader read the whole layer at least once"
    );
    // Background completion in the last daemon.
    let t3 = std::time::Instant::now();
    while stat_of(&p("stats.3"), "complete") != Some(1) {
        assert!(t3.elapsed().as_secs() < 120, "completion did not finish");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    d.signal(libc::SIGTERM);
    d.wait_exit(std::time::Duration::from_secs(10));
    mounts.umount(&p("mnt"));
    drop(keeper);
    let x = p("extracted");
    std::fs::create_dir_all(&x).unwrap();
    unpack(&blob, c, &x);
    let (want, got) = (treesnap(&x), treesnap(&p("tree")));
    assert!(
        want == got,
        "completed tree vs extraction:\n{}",
        tree_diff(&want, &got)
    );
}

/// An index that lies about metadata (an owner changed; every span still verifies):
/// reads work, but completion rebuilds the entry table from the verified tar, finds
/// the difference, reports the layer and path, and discards the tree and the cache.
/// The spans read on demand were recorded in the access trace, in order.
#[test]
fn completion_refuses_a_lying_index_and_discards_the_tree() {
    if !fuse_available("completion_refuses_a_lying_index_and_discards_the_tree") {
        return;
    }
    let t = tmpdir();
    let (blob, c) = layers("busybox").remove(0);
    let opts = LayerOptions::default();
    let (mut index, windows) = build_index(&blob, c, Policy::default(), opts.tree).unwrap();
    let wpath = t.path().join("windows");
    std::fs::write(&wpath, windows).unwrap();
    let idx = Index::parse(index.clone()).unwrap();
    let victim = (1..idx.entry_count())
        .find(|&i| idx.entry(i).kind == Kind::File && idx.entry(i).size > 0)
        .unwrap();
    let victim_path = String::from_utf8(idx.path(victim)).unwrap();
    // The entry record's uid (at 16 in the record).
    let at =
        cstore_index::format::HEADER_LEN + victim as usize * cstore_index::format::ENTRY_LEN + 16;
    index[at..at + 4].copy_from_slice(&4242u32.to_le_bytes());
    let tree = t.path().join("fs");
    std::fs::create_dir_all(&tree).unwrap();
    let src = Arc::new(FileSource::open(&blob, Some(&wpath)).unwrap());
    let fs = LayerFs::open(index, src, &t.path().join("cache"), &tree, opts).unwrap();
    let mut out = Vec::new();
    cstore_fuse_fs::ReadOnlyFs::read(&fs, u64::from(victim) + 1, 0, 4096, &mut out).unwrap();
    assert!(!out.is_empty());
    let trace = cstore_fuse_fs::layer::read_trace(&t.path().join("cache")).unwrap();
    let first = idx.file_data(victim, 0..4096)[0].1.start;
    assert_eq!(trace.first().copied(), idx.span_at(first).map(|s| s as u32));
    match fs.complete() {
        Err(cstore_fuse_fs::Error::Completion { layer, reason }) => {
            assert_eq!(layer, idx.header().layer_digest_str());
            assert!(reason.contains(&victim_path), "{reason}");
        }
        other => panic!("completion of a lying index: {other:?}"),
    }
    assert!(!fs.is_complete());
    assert_eq!(
        std::fs::read_dir(&tree).unwrap().count(),
        0,
        "tree not discarded"
    );
    assert_eq!(fs.stats().local, 0, "cache not discarded");
}

/// A file opened while incomplete (caching io mode: a shell's mapped libc) and still
/// open when its spans are all local: later opens must not ask for passthrough, which
/// the kernel refuses with EIO for an inode with caching handles; once the last such
/// handle is released, opens go to passthrough again.
#[test]
fn a_file_open_before_completion_keeps_later_opens_working() {
    let test = "a_file_open_before_completion_keeps_later_opens_working";
    if !fuse_available(test) {
        return;
    }
    let t = tmpdir();
    let mut mounts = Mounts::default();
    let (blob, c) = layers("busybox").into_iter().next().unwrap();
    let l = serve(&t.path().join("l"), &blob, c, 64 << 10, None, &mut mounts);
    let session = l.session.as_ref().unwrap();
    if !session.passthrough() && passthrough_missing(test, "the kernel did not grant it") {
        return;
    }
    let files = expected_files(&l);
    let (rel, want) = files.iter().max_by_key(|(_, d)| d.len()).unwrap();
    let path = l.mnt.join(rel);
    let mut early = std::fs::File::open(&path).unwrap();
    l.fs.complete().unwrap();
    let before = session.backing_ids().len();
    for _ in 0..3 {
        let got = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: open after completion with an early handle open: {e}",
                rel.display()
            )
        });
        assert_eq!(&got, want, "{}", rel.display());
    }
    assert_eq!(
        session.backing_ids().len(),
        before,
        "passthrough granted while a caching handle was open"
    );
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut early, &mut buf).unwrap();
    assert_eq!(&buf, want, "{}: through the early handle", rel.display());
    drop(early);
    wait_no_caching_handles(session);
    assert_eq!(&std::fs::read(&path).unwrap(), want, "{}", rel.display());
    assert!(
        session.backing_ids().len() > before,
        "{}: no passthrough after the early handle was released",
        rel.display()
    );
}

/// Regular files whose data lies in span `s` alone (no hardlinks).
fn files_in_span(idx: &Index<Vec<u8>>, s: usize) -> Vec<PathBuf> {
    (0..idx.entry_count())
        .filter(|&i| {
            let e = idx.entry(i);
            e.kind == Kind::File && e.size > 0 && e.hardlink_target().is_none() && {
                let d: Vec<Range<u64>> = idx
                    .file_data(i, 0..e.size)
                    .into_iter()
                    .map(|(_, r)| r)
                    .collect();
                let spans: Vec<usize> = idx.spans_for(d[0].start, d[d.len() - 1].end).collect();
                spans == [s]
            }
        })
        .map(|i| PathBuf::from(String::from_utf8(idx.path(i)).unwrap()))
        .collect()
}

/// A gzip span's window is the end of the span before it: once that span was
/// read (verified), a miss on the next one takes its window from the kept
/// output and fetches none; a miss whose neighbour is not local fetches its
/// window as before. Both read the right bytes. Look-ahead is off here: it
/// fetches the span after a miss while the miss is still on the wire, before
/// there is a tail to take (it then fetches that span's window, as any span
/// whose neighbour is not local).
#[test]
fn a_miss_next_to_a_span_read_before_fetches_no_window() {
    if !fuse_available("a_miss_next_to_a_span_read_before_fetches_no_window") {
        return;
    }
    let t = tmpdir();
    let mut mounts = Mounts::default();
    let (blob, c) = layers("debian").remove(0);
    let src = Source {
        span_target: 128 << 10,
        flip_at: None,
        delay: std::time::Duration::ZERO,
    };
    let opts = LayerOptions {
        look_ahead: 0,
        ..LayerOptions::default()
    };
    let l = serve_with(&t.path().join("l"), &blob, c, src, opts, &[], &mut mounts);
    let idx = l.fs.index();
    let usable = |k: usize| {
        cstore_index::SpanReader::history_usable(idx, k)
            && idx.span(k - 1).uncompressed.end - idx.span(k - 1).uncompressed.start >= 32 << 10
    };
    // Spans k-1, k with a file each, and a span j far from both with one.
    let (k, a, b) = (2..idx.span_count())
        .filter(|&k| usable(k))
        .find_map(|k| {
            let a = files_in_span(idx, k - 1).pop()?;
            let b = files_in_span(idx, k).pop()?;
            Some((k, a, b))
        })
        .expect("two neighbouring spans with a file each");
    let (j, far) = (k + 3..idx.span_count())
        .filter(|&j| usable(j))
        .find_map(|j| Some((j, files_in_span(idx, j).pop()?)))
        .expect("a span further on with a file");
    let want = expected_files(&l);
    let content = |p: &Path| want.iter().find(|f| f.0 == p).unwrap().1.clone();
    let window_of = |s: usize| idx.span(s).window().unwrap();
    let asked = |w: Range<u64>| {
        l.src
            .wranges
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.start < w.end && w.start < r.end)
    };
    assert_eq!(
        std::fs::read(l.mnt.join(&a)).unwrap(),
        content(&a),
        "{}",
        a.display()
    );
    assert!(
        asked(window_of(k - 1)),
        "span {}'s window was fetched",
        k - 1
    );
    assert_eq!(
        std::fs::read(l.mnt.join(&b)).unwrap(),
        content(&b),
        "{}",
        b.display()
    );
    assert!(
        !asked(window_of(k)),
        "span {k}'s window was fetched though span {} was read just before: {:?}",
        k - 1,
        l.src.wranges.lock().unwrap()
    );
    assert_eq!(std::fs::read(l.mnt.join(&far)).unwrap(), content(&far));
    assert!(
        asked(window_of(j)),
        "span {j}'s window was fetched (span {} is not local)",
        j - 1
    );
}

/// The debian layer indexed (64 KiB spans) and opened with no mount: its reads go
/// straight to the `ReadOnlyFs` calls, its bytes through `src`.
fn open_direct(
    dir: &Path,
    src: impl FnOnce(FileSource) -> Arc<dyn SpanSource>,
    opts: LayerOptions,
) -> (LayerFs, PathBuf, PathBuf) {
    let (blob, c) = layers("debian").remove(0);
    std::fs::create_dir_all(dir).unwrap();
    let policy = Policy {
        span_target: 64 << 10,
        ..Policy::default()
    };
    let (index, windows) = build_index(&blob, c, policy, opts.tree).unwrap();
    let wpath = dir.join("windows");
    std::fs::write(&wpath, &windows).unwrap();
    let tree = dir.join("fs");
    std::fs::create_dir_all(&tree).unwrap();
    let fs = LayerFs::open(
        index,
        src(FileSource::open(&blob, Some(&wpath)).unwrap()),
        &dir.join("cache"),
        &tree,
        opts,
    )
    .unwrap();
    (fs, blob, wpath)
}

/// The spans holding file entry `i`'s data.
fn spans_of(idx: &Index<Vec<u8>>, i: u32) -> Range<usize> {
    let d = idx.file_data(i, 0..idx.entry(i).size);
    idx.spans_for(d[0].1.start, d.last().unwrap().1.end)
}

/// A small file (one span) of a directory whose next span holds only data of
/// that directory's files, not that file's, and so do the `more` spans after it:
/// (entry, the next span, a sibling whose data is all in that span).
fn file_with_siblings_after(idx: &Index<Vec<u8>>, more: usize) -> (u32, usize, u32) {
    let n = idx.entry_count();
    let with_data = |i: u32| {
        let e = idx.entry(i);
        e.kind == Kind::File && e.size > 0 && e.hardlink_target().is_none()
    };
    // Per span, the directories whose files have data in it.
    let mut dirs = vec![Vec::new(); idx.span_count()];
    for j in 0..n {
        if with_data(j) {
            for s in spans_of(idx, j) {
                dirs[s].push(idx.parent(j));
            }
        }
    }
    for i in (n / 3)..n {
        if !with_data(i) || spans_of(idx, i).len() != 1 {
            continue;
        }
        let next = spans_of(idx, i).end;
        let dir = idx.parent(i);
        if !(next..next + 1 + more).all(|s| s < idx.span_count() && dirs[s].contains(&dir)) {
            continue;
        }
        let sib = (0..n).find(|&j| {
            with_data(j)
                && idx.parent(j) == idx.parent(i)
                && spans_of(idx, j) == (next..next + 1)
                && idx.file_data(j, 0..1)[0].1.start >= idx.span(next).uncompressed.start
        });
        if let Some(j) = sib {
            return (i, next, j);
        }
    }
    panic!("no file with a sibling in the next span");
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// With `look_ahead_siblings`, a read miss queues the spans after it that hold
/// the files after it in its directory: the sibling's span arrives though
/// nothing read it, a read of the sibling then makes no request, and nothing
/// beyond the look-ahead budget was fetched.
#[test]
fn a_read_miss_looks_ahead_into_the_files_after_it_in_its_directory() {
    let t = tmpdir();
    let counted = Arc::new(Mutex::new(None::<Arc<Counted>>));
    let c2 = counted.clone();
    let opts = LayerOptions {
        look_ahead: 256 << 10,
        look_ahead_siblings: true,
        ..LayerOptions::default()
    };
    let (fs, _, _) = open_direct(
        t.path(),
        move |inner| {
            let c = Arc::new(Counted {
                inner,
                calls: AtomicU64::new(0),
                ranges: Mutex::new(Vec::new()),
                wranges: Mutex::new(Vec::new()),
                flip_at: None,
                delay: std::time::Duration::ZERO,
            });
            *c2.lock().unwrap() = Some(c.clone());
            c
        },
        opts,
    );
    let src = counted.lock().unwrap().clone().unwrap();
    let idx = fs.index();
    let (f, next, sib) = file_with_siblings_after(idx, 0);
    let mut out = Vec::new();
    cstore_fuse_fs::ReadOnlyFs::read(&fs, u64::from(f) + 1, 0, 4096, &mut out).unwrap();
    assert!(!out.is_empty());
    let next_c = idx.span(next).compressed;
    wait_until("the span after the miss is fetched", || {
        src.ranges
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.start <= next_c.start && next_c.end <= r.end)
    });
    wait_until("the look-ahead is written", || fs.stats().local >= 2);
    let calls = src.calls.load(Ordering::SeqCst);
    let size = idx.entry(sib).size.min(1 << 20) as u32;
    cstore_fuse_fs::ReadOnlyFs::read(&fs, u64::from(sib) + 1, 0, size, &mut out).unwrap();
    assert_eq!(out.len() as u32, size);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        src.calls.load(Ordering::SeqCst),
        calls,
        "the sibling {} was not read from the look-ahead",
        String::from_utf8_lossy(&idx.path(sib))
    );
    // Within the budget: the file's span, then at most 256 KiB (and the span
    // crossing the budget is not taken).
    let s = fs.stats();
    let first = idx.span(spans_of(idx, f).start).compressed;
    let max = (first.end - first.start) + (256 << 10);
    assert!(
        s.bytes_fetched <= max,
        "look-ahead fetched {} bytes, over the budget ({max}): {s:?}",
        s.bytes_fetched
    );
    assert_eq!(s.failures, 0);
}

/// An open of a file that is not local queues the head of the file at once
/// (before its read comes), and records it in the access trace: a file read in
/// passthrough never shows the daemon its reads.
#[test]
fn an_open_fetches_and_traces_the_head_of_its_file() {
    let t = tmpdir();
    let opts = LayerOptions {
        look_ahead: 0,
        ..LayerOptions::default()
    };
    let (fs, _, _) = open_direct(t.path(), |inner| Arc::new(inner), opts);
    let idx = fs.index();
    let (f, _, _) = file_with_siblings_after(idx, 0);
    let span = spans_of(idx, f).start;
    assert_eq!(fs.stats().local, 0);
    cstore_fuse_fs::ReadOnlyFs::open(&fs, u64::from(f) + 1).unwrap();
    wait_until("the opened file's span is local", || fs.stats().local == 1);
    assert_eq!(fs.stats().spans_fetched, 1, "{:?}", fs.stats());
    let trace = cstore_fuse_fs::layer::read_trace(&t.path().join("cache")).unwrap();
    assert_eq!(trace, vec![span as u32]);
}

/// A source whose requests, but those for the bytes of `free`, wait until
/// released; counts the requests waiting.
struct Gated {
    inner: FileSource,
    free: Mutex<Range<u64>>,
    waiting: AtomicU64,
    open: (Mutex<bool>, std::sync::Condvar),
}

impl SpanSource for Gated {
    fn fetch(&self, range: Range<u64>) -> std::io::Result<Vec<u8>> {
        let free = self.free.lock().unwrap().clone();
        if !(free.start <= range.start && range.end <= free.end) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.0.lock().unwrap();
            while !*open {
                open = self.open.1.wait(open).unwrap();
            }
            drop(open);
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.inner.fetch(range)
    }
    fn fetch_windows(&self, range: Range<u64>) -> std::io::Result<Vec<u8>> {
        self.inner.fetch_windows(range)
    }
}

/// Look-ahead never holds up an on-demand miss: with every look-ahead request
/// stuck on the wire (as many as there are fetchers to take them), a read of
/// a file elsewhere in the layer is fetched and answered.
#[test]
fn look_ahead_on_the_wire_does_not_hold_up_a_read_miss() {
    let t = tmpdir();
    let gated = Arc::new(Mutex::new(None::<Arc<Gated>>));
    let g2 = gated.clone();
    let opts = LayerOptions {
        look_ahead: 4 << 20,
        look_ahead_siblings: true,
        look_ahead_request: 64 << 10,
        ..LayerOptions::default()
    };
    let fetchers = opts.fetchers as u64;
    let (fs, blob, wpath) = open_direct(
        t.path(),
        move |inner| {
            let g = Arc::new(Gated {
                inner,
                free: Mutex::new(0..0),
                waiting: AtomicU64::new(0),
                open: (Mutex::new(false), std::sync::Condvar::new()),
            });
            *g2.lock().unwrap() = Some(g.clone());
            g
        },
        opts,
    );
    let g = gated.lock().unwrap().clone().unwrap();
    // Whatever fails, the gate opens (the fetchers stuck in it would hang the drop).
    struct Opener(Arc<Gated>);
    impl Drop for Opener {
        fn drop(&mut self) {
            *self.0.open.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.0.open.1.notify_all();
        }
    }
    let _opener = Opener(g.clone());
    let idx = fs.index();
    let (f, _, _) = file_with_siblings_after(idx, 4);
    *g.free.lock().unwrap() = idx.span(spans_of(idx, f).start).compressed;
    let mut out = Vec::new();
    cstore_fuse_fs::ReadOnlyFs::read(&fs, u64::from(f) + 1, 0, 4096, &mut out).unwrap();
    // Every fetcher but the one kept for reads is now stuck on a look-ahead request.
    wait_until("look-ahead requests are on the wire", || {
        g.waiting.load(Ordering::SeqCst) == fetchers - 1
    });
    // A file far from the look-ahead (in another directory), read now.
    let n = idx.entry_count();
    let far = (0..n)
        .rev()
        .find(|&j| {
            let e = idx.entry(j);
            e.kind == Kind::File
                && e.size > 0
                && e.hardlink_target().is_none()
                && idx.parent(j) != idx.parent(f)
                && spans_of(idx, j).len() == 1
                && spans_of(idx, j).start.abs_diff(spans_of(idx, f).end) > 100
        })
        .expect("a file far away");
    *g.free.lock().unwrap() = idx.span(spans_of(idx, far).start).compressed;
    let size = idx.entry(far).size.min(4096) as u32;
    cstore_fuse_fs::ReadOnlyFs::read(&fs, u64::from(far) + 1, 0, size, &mut out).unwrap();
    let want = files_from(idx, &blob, &wpath)
        .into_iter()
        .find(|(p, _)| p.as_os_str().as_encoded_bytes() == idx.path(far).as_slice())
        .unwrap()
        .1;
    assert_eq!(out, want[..size as usize]);
    assert_eq!(
        g.waiting.load(Ordering::SeqCst),
        fetchers - 1,
        "the look-ahead requests are still on the wire"
    );
    *g.open.0.lock().unwrap() = true;
    g.open.1.notify_all();
    wait_until("the look-ahead is written", || {
        g.waiting.load(Ordering::SeqCst) == 0
    });
    fs.shutdown();
    assert_eq!(fs.stats().failures, 0);
}

/// A complete file's backing file is opened by one openat2 of its whole path beneath
/// the layer's tree: a directory of the tree swapped for a symlink to a directory
/// outside (holding a file of the same name) is never followed: the open or the read
/// fails, or answers the tree's own bytes, never the outside file's; with the
/// directory back, the file is served in passthrough with its own bytes.
#[test]
fn a_complete_files_backing_open_stays_beneath_the_tree() {
    let test = "a_complete_files_backing_open_stays_beneath_the_tree";
    if !fuse_available(test) {
        return;
    }
    let t = tmpdir();
    let mut mounts = Mounts::default();
    let (blob, c) = layers("busybox").into_iter().next().unwrap();
    let l = serve(&t.path().join("l"), &blob, c, 64 << 10, None, &mut mounts);
    let session = l.session.as_ref().unwrap();
    if !session.passthrough() && passthrough_missing(test, "the kernel did not grant it") {
        return;
    }
    l.fs.complete().unwrap();
    let files = expected_files(&l);
    let (rel, want) = files
        .iter()
        .find(|(p, d)| p.components().count() >= 2 && !d.is_empty())
        .expect("busybox has a non-empty file below a directory");
    let parent = rel.parent().unwrap();
    let (dir, aside) = (l.tree.join(parent), l.tree.join("aside"));
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let bad = b"outside the tree".to_vec();
    std::fs::write(outside.join(rel.file_name().unwrap()), &bad).unwrap();
    std::fs::rename(&dir, &aside).unwrap();
    std::os::unix::fs::symlink(&outside, &dir).unwrap();
    let before = session.backing_ids().len();
    match std::fs::read(l.mnt.join(rel)) {
        Ok(got) => {
            assert_ne!(got, bad, "{}: read through the symlink", rel.display());
            assert_eq!(&got, want, "{}", rel.display());
        }
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{}", rel.display()),
    }
    assert_eq!(
        session.backing_ids().len(),
        before,
        "{}: a backing file was registered through the symlink",
        rel.display()
    );
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&aside, &dir).unwrap();
    wait_no_caching_handles(session);
    assert_eq!(
        &std::fs::read(l.mnt.join(rel)).unwrap(),
        want,
        "{}",
        rel.display()
    );
    assert_eq!(
        session.backing_ids().len(),
        before + 1,
        "{}: not served in passthrough once the directory is back",
        rel.display()
    );
}
