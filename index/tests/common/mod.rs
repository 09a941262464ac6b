//! Shared by the index tests: the real tar reader and extractor of
//! `cstore-unpack` as the oracle, the test image fixtures, a small tar writer.
#![allow(dead_code)]

pub mod tarw;

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

use cstore_index::format::{libc_s, Index, Kind};
use cstore_index::{
    Compression, IndexingReader, Policy, TarEntry, TarKind, TreeBuilder, TreeOptions,
};
use cstore_unpack::tar::{Kind as StoreKind, TarReader};
use sha2::{Digest, Sha256};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A facility a test needs is missing: fail under CI=true, else say so.
pub fn unavailable(what: &str) -> bool {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} is unavailable, and CI=true");
    }
    eprintln!("SKIPPED: {what} is unavailable");
    true
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The eStargz variants of fixtures/estargz.sh (ctr-remote in a private
/// containerd); None if ctr-remote is missing (and not under CI).
pub fn estargz_fixtures() -> Option<PathBuf> {
    let out = Command::new("bash")
        .arg(repo().join("fixtures/estargz.sh"))
        .output()
        .unwrap();
    if !out.status.success() {
        let why = format!(
            "fixtures/estargz.sh ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if unavailable(&why) {
            return None;
        }
    }
    Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
}

/// The OCI layout of fixtures/images.sh, with the given layered-images.sh
/// tags built too (both build once and cache).
pub fn fixtures(layered: &[&str]) -> PathBuf {
    let f = repo().join("fixtures");
    run(Command::new("bash").arg(f.join("images.sh")));
    if !layered.is_empty() {
        run(Command::new("bash")
            .arg(f.join("layered-images.sh"))
            .args(layered));
    }
    PathBuf::from(
        run(Command::new("bash")
            .arg(f.join("images.sh"))
            .arg("--print-dir"))
        .trim(),
    )
}

#[derive(Clone, Debug)]
pub struct Layer {
    pub tag: String,
    pub digest: String,
    pub path: PathBuf,
    pub compression: Compression,
    /// The eStargz TOC digest annotation, if any.
    pub toc_digest: Option<String>,
}

fn blob_path(oci: &Path, digest: &str) -> PathBuf {
    oci.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The layers of image `tag` in the OCI layout `oci` (None if no such tag).
pub fn layers(oci: &Path, tag: &str) -> Option<Vec<Layer>> {
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(oci.join("index.json")).ok()?).ok()?;
    let m = idx["manifests"]
        .as_array()?
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag))?;
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob_path(oci, m["digest"].as_str()?)).ok()?).ok()?;
    let mut out = Vec::new();
    for l in man["layers"].as_array()? {
        let mt = l["mediaType"].as_str()?;
        let compression = if mt.ends_with("gzip") {
            Compression::Gzip
        } else if mt.ends_with("zstd") {
            Compression::Zstd
        } else {
            Compression::None
        };
        let digest = l["digest"].as_str()?.to_string();
        out.push(Layer {
            tag: tag.into(),
            path: blob_path(oci, &digest),
            digest,
            compression,
            toc_digest: l["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
                .as_str()
                .map(String::from),
        });
    }
    Some(out)
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// Counts (and keeps) the bytes the tar reader takes: after `next_entry`
/// returns, the count is the entry's data offset.
pub struct Counting<R> {
    inner: R,
    n: Rc<Cell<u64>>,
    keep: Vec<u8>,
}

impl<R> Counting<R> {
    pub fn new(inner: R, n: Rc<Cell<u64>>) -> Self {
        Counting {
            inner,
            n,
            keep: Vec::new(),
        }
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.set(self.n.get() + k as u64);
        self.keep.extend_from_slice(&buf[..k]);
        Ok(k)
    }
}

/// An index built the way the unpack pass will build it.
pub struct Built {
    pub index: Vec<u8>,
    pub windows: Vec<u8>,
    /// The whole uncompressed stream.
    pub tar: Vec<u8>,
    pub entries: u64,
}

pub fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
        .unwrap()
}

pub fn tree_options() -> TreeOptions {
    // SAFETY: plain getters.
    let owner = unsafe { (libc::geteuid(), libc::getegid()) };
    TreeOptions {
        umask: umask(),
        owner,
        ..TreeOptions::default()
    }
}

pub fn tar_kind(k: StoreKind) -> TarKind {
    match k {
        StoreKind::File => TarKind::File,
        StoreKind::Dir => TarKind::Dir,
        StoreKind::Symlink => TarKind::Symlink,
        StoreKind::Hardlink => TarKind::Hardlink,
        StoreKind::Char => TarKind::Char,
        StoreKind::Block => TarKind::Block,
        StoreKind::Fifo => TarKind::Fifo,
    }
}

/// Read a layer through `IndexingReader` and the project's tar reader into
/// an index: what unpack will do, minus the writing.
pub fn build(blob: &[u8], compression: Compression, policy: Policy) -> cstore_index::Result<Built> {
    build_with(blob, compression, policy, tree_options())
}

/// `build` with the tree builder's options given.
pub fn build_with(
    blob: &[u8],
    compression: Compression,
    policy: Policy,
    opts: TreeOptions,
) -> cstore_index::Result<Built> {
    let ir = IndexingReader::new(blob, compression, policy, Vec::new());
    let count = Rc::new(Cell::new(0u64));
    let mut tr = TarReader::new(Counting {
        inner: ir,
        n: count.clone(),
        keep: Vec::new(),
    });
    let mut tree = TreeBuilder::new(opts);
    loop {
        let e = match tr.next_entry() {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) => panic!("tar reader: {e}"),
        };
        let data_offset = count.get();
        let mut t = TarEntry::new(&e.path, tar_kind(e.kind));
        t.mode = e.mode;
        t.uid = e.uid;
        t.gid = e.gid;
        t.mtime = e.mtime;
        t.size = e.size;
        t.data_offset = data_offset;
        t.link = &e.link;
        t.dev = (e.dev_major, e.dev_minor);
        t.xattrs = &e.xattrs;
        t.sparse = e.sparse.as_deref();
        tree.add(&t)?;
    }
    let entries = tree.entries();
    let mut rest = tr.into_inner();
    io::copy(&mut rest, &mut io::sink()).unwrap();
    let Counting { inner, keep, .. } = rest;
    let (cp, windows) = inner.finish()?;
    assert_eq!(cp.uncompressed_size, keep.len() as u64);
    let entries_recs = tree.finish()?;
    let index = cp
        .into_builder(entries_recs, sha256(blob), sha256(&keep))
        .encode()?;
    Ok(Built {
        index,
        windows,
        tar: keep,
        entries,
    })
}

/// A full inflate of a layer (the reference for every read).
pub fn inflate_all(blob: &[u8], compression: Compression) -> Vec<u8> {
    let mut out = Vec::new();
    match compression {
        Compression::Gzip => {
            flate2::read::MultiGzDecoder::new(blob)
                .read_to_end(&mut out)
                .unwrap();
        }
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(blob)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
        }
        Compression::None => out.extend_from_slice(blob),
    }
    out
}

/// What the project's extractor left: the tree, and the directories it
/// reports as made for missing parents (the root as an empty path).
pub struct Extracted {
    pub dir: PathBuf,
    pub implicit: Vec<Vec<u8>>,
}

/// Unpack `tar` (uncompressed) with the project's extractor into a new
/// directory under `tmp`; the extractor's error text if it refuses.
pub fn extract(tmp: &Path, tar: &[u8]) -> Result<Extracted, String> {
    extract_with(
        tmp,
        tar,
        cstore_unpack::UnpackOptions::default().max_made_dir_bytes,
    )
}

/// `extract` with extraction's cap on the paths of made directories.
pub fn extract_with(
    tmp: &Path,
    tar: &[u8],
    max_made_dir_bytes: usize,
) -> Result<Extracted, String> {
    use cstore_unpack::Compression as C;
    use cstore_unpack::{unpack_layer, LayerRef, UnpackOptions};
    let blob = tmp.join("layer.tar");
    std::fs::write(&blob, tar).unwrap();
    let dest = tmp.join("fs");
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir(&dest).unwrap();
    let diff_id = format!("sha256:{}", hex::encode(sha256(tar)));
    let layer = LayerRef {
        image: "test",
        digest: &diff_id,
        compression: C::None,
        diff_id: &diff_id,
    };
    let opts = UnpackOptions {
        max_made_dir_bytes,
        ..UnpackOptions::default()
    };
    match unpack_layer(&blob, &layer, &dest, &opts) {
        Ok(stats) => Ok(Extracted {
            dir: dest,
            implicit: stats.implicit_dirs,
        }),
        Err(e) => Err(e.to_string()),
    }
}

fn xattrs_of(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: valid path and buffer.
    let n = unsafe {
        libc::llistxattr(
            c.as_ptr(),
            names.as_mut_ptr() as *mut libc::c_char,
            names.len(),
        )
    };
    assert!(n >= 0, "llistxattr {p:?}");
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        let cn = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: valid path, name and buffer.
        let k = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cn.as_ptr(),
                v.as_mut_ptr() as *mut libc::c_void,
                v.len(),
            )
        };
        assert!(k >= 0, "lgetxattr {p:?} {name:?}");
        v.truncate(k as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

/// Every path under `root`, relative, parents first (the root as "").
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::new()];
    let mut i = 0;
    while i < out.len() {
        let rel = out[i].clone();
        let p = root.join(&rel);
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&p)
                .unwrap()
                .map(|d| d.unwrap().file_name())
                .collect();
            names.sort();
            out.extend(names.into_iter().map(|n| rel.join(n)));
        }
        i += 1;
    }
    out
}

/// The extracted tree and the index describe the same tree: every path,
/// type, mode, owner, mtime, size, device, symlink target, xattr (opaque
/// marks included), hardlink group, every file's content (read at the
/// index's data offset in the uncompressed stream `tar`), and the same
/// directories are implicit (made for a missing parent and never listed).
pub fn assert_same_tree(idx: &Index<Vec<u8>>, tar: &[u8], x: &Extracted) {
    let mut want_implicit = x.implicit.clone();
    want_implicit.sort();
    let mut got_implicit: Vec<Vec<u8>> = (0..idx.entry_count())
        .filter(|&i| idx.entry(i).is_implicit())
        .map(|i| idx.path(i))
        .collect();
    got_implicit.sort();
    let show = |v: &[Vec<u8>]| {
        v.iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        show(&got_implicit),
        show(&want_implicit),
        "implicit directories: index vs extraction"
    );
    let dir = &x.dir;
    let paths = walk(dir);
    assert_eq!(
        paths.len() as u32,
        idx.entry_count(),
        "entries: extracted tree {} vs index {}",
        paths.len(),
        idx.entry_count()
    );
    let mut inode_of_entry: HashMap<u32, u64> = HashMap::new();
    for rel in &paths {
        let p = dir.join(rel);
        let relb = rel.as_os_str().as_encoded_bytes();
        let i = idx
            .lookup_path(relb)
            .unwrap_or_else(|| panic!("{rel:?} is in the extracted tree, not in the index"));
        let mut e = idx.entry(i);
        let target = e.hardlink_target().unwrap_or(i);
        if e.kind == Kind::Hardlink {
            e = idx.entry(target);
        }
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ctx = format!("{rel:?} (entry {i}, {:?})", e.kind);
        // One inode per entry (hardlinks share their target's).
        let ino = *inode_of_entry.entry(target).or_insert(md.ino());
        assert_eq!(ino, md.ino(), "{ctx}: hardlink group");
        assert_eq!(
            md.mode(),
            e.mode,
            "{ctx}: mode {:o} vs {:o}",
            md.mode(),
            e.mode
        );
        assert_eq!((md.uid(), md.gid()), (e.uid, e.gid), "{ctx}: owner");
        // Directories and whiteouts extraction made itself carry the time
        // they were made; the index has no time for them.
        let unset = e.mtime == (0, 0) && matches!(e.kind, Kind::Dir | Kind::Whiteout);
        if !unset {
            assert_eq!(
                (md.mtime(), md.mtime_nsec() as u32),
                e.mtime,
                "{ctx}: mtime"
            );
        }
        let ft = md.file_type();
        match e.kind {
            Kind::Dir => assert!(ft.is_dir(), "{ctx}"),
            Kind::File => {
                assert!(ft.is_file(), "{ctx}");
                assert_eq!(md.size(), e.size, "{ctx}: size");
                let got = std::fs::read(&p).unwrap();
                let off = e.data_offset().unwrap() as usize;
                let want = match idx.sparse_map(target) {
                    None => tar[off..off + e.size as usize].to_vec(),
                    Some(map) => {
                        let mut v = vec![0u8; e.size as usize];
                        let mut at = off;
                        for (o, l) in map {
                            v[o as usize..(o + l) as usize]
                                .copy_from_slice(&tar[at..at + l as usize]);
                            at += l as usize;
                        }
                        v
                    }
                };
                assert!(got == want, "{ctx}: content differs");
            }
            Kind::Symlink => {
                assert!(ft.is_symlink(), "{ctx}");
                let t = std::fs::read_link(&p).unwrap();
                assert_eq!(
                    t.as_os_str().as_encoded_bytes(),
                    idx.link_target(target).unwrap(),
                    "{ctx}: target"
                );
                assert_eq!(md.size(), e.size, "{ctx}: size");
            }
            Kind::Char | Kind::Block | Kind::Whiteout => {
                assert!(ft.is_char_device() || ft.is_block_device(), "{ctx}");
                let rdev = md.rdev();
                let (maj, min) = (libc::major(rdev), libc::minor(rdev));
                assert_eq!((maj, min), e.rdev().unwrap_or((0, 0)), "{ctx}: device");
            }
            Kind::Fifo => assert!(ft.is_fifo(), "{ctx}"),
            Kind::Hardlink => unreachable!(),
        }
        assert_eq!(md.mode() & libc_s::IFMT, e.mode & libc_s::IFMT, "{ctx}");
        let mut want: Vec<(Vec<u8>, Vec<u8>)> = idx
            .xattrs(target)
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        if e.is_opaque() {
            want.push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
        }
        want.sort();
        assert_eq!(xattrs_of(&p), want, "{ctx}: xattrs");
    }
}

/// Every span inflated from its own compressed bytes (and window) equals
/// the same range of the full inflate.
pub fn assert_spans(idx: &Index<Vec<u8>>, blob: &[u8], windows: &[u8], full: &[u8]) {
    let mut r = cstore_index::SpanReader::new();
    for i in 0..idx.span_count() {
        let s = idx.span(i);
        let c = &blob[s.compressed.start as usize..s.compressed.end as usize];
        let w = s
            .window()
            .map(|w| &windows[w.start as usize..w.end as usize])
            .unwrap_or(&[]);
        let got = r
            .read_span(idx, i, c, w)
            .unwrap_or_else(|e| panic!("span {i}: {e}"));
        assert!(
            got == full[s.uncompressed.start as usize..s.uncompressed.end as usize],
            "span {i} differs from the full inflate"
        );
    }
}

/// Random ranges read through the index equal the full inflate.
pub fn assert_random_reads(
    idx: &Index<Vec<u8>>,
    blob: &[u8],
    windows: &[u8],
    full: &[u8],
    n: usize,
    seed: u64,
) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut r = cstore_index::SpanReader::new();
    let len = full.len() as u64;
    for _ in 0..n {
        let a = rng.gen_range(0..len);
        let b = (a + rng.gen_range(1..=65536u64)).min(len);
        let got = r.read_range(idx, blob, windows, a..b).unwrap();
        assert!(got == full[a as usize..b as usize], "read {a}..{b} differs");
    }
}
