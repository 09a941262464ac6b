//! Extraction of a fuzzed layer into a throwaway directory, with the check
//! that confinement held: beside the layer directory sits a sentinel tree
//! (`outside/`), and at `gen::VICTIM` another; after every extraction both
//! must be exactly as before (same names, inodes, types, modes, owners, link
//! counts, sizes, mtimes and ctimes: a write, chmod, chown, setxattr, link
//! or unlink through an escape changes one of them), and nothing may have
//! appeared beside the sandbox.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cstore_unpack::Compression;
use cstore_unpack::{unpack_layer, LayerRef, UnpackOptions};
use sha2::{Digest as _, Sha256};

use crate::gen::VICTIM;

/// Where sandboxes go: `CSTORE_FUZZ_DIR`, else /dev/shm (tmpfs: extraction
/// syncs its filesystem, which must not be the machine's disk), else TMPDIR.
fn base() -> PathBuf {
    if let Some(d) = std::env::var_os("CSTORE_FUZZ_DIR") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

#[derive(Debug, PartialEq, Eq, Clone)]
struct Stat {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stat(p: &Path) -> Option<Stat> {
    let m = std::fs::symlink_metadata(p).ok()?;
    Some(Stat {
        ino: m.ino(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        nlink: m.nlink(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// Every path under `dir` (not following symlinks), skipping `skip`.
fn snapshot(dir: &Path, skip: &[&Path]) -> BTreeMap<PathBuf, Stat> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if skip.contains(&p.as_path()) {
                continue;
            }
            if let Some(s) = stat(&p) {
                if s.mode & libc::S_IFMT == libc::S_IFDIR {
                    stack.push(p.clone());
                }
                out.insert(p, s);
            }
        }
    }
    out
}

/// Make the sentinel tree at `dir` if it is not there.
fn sentinels(dir: &Path) {
    let _ = std::fs::create_dir_all(dir.join("dir"));
    for (name, body) in [
        ("secret", "secret\n"),
        ("passwd", "root:x:0:0::/:/bin/sh\n"),
    ] {
        let p = dir.join(name);
        if !p.exists() {
            let _ = std::fs::write(&p, body);
        }
    }
    let f = dir.join("dir/a");
    if !f.exists() {
        let _ = std::fs::write(&f, "a\n");
    }
    let l = dir.join("link");
    if std::fs::symlink_metadata(&l).is_err() {
        let _ = std::os::unix::fs::symlink("secret", &l);
    }
}

struct Sandbox {
    root: PathBuf,
    layer: PathBuf,
    blob: PathBuf,
    before: BTreeMap<PathBuf, Stat>,
    victim: BTreeMap<PathBuf, Stat>,
    root_stat: (u32, u32, u32),
    /// Names beside the sandbox that a `../..` escape would create.
    beside: Vec<PathBuf>,
}

static ALL: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

extern "C" fn remove_all() {
    if let Ok(v) = ALL.lock() {
        for p in v.iter() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

impl Sandbox {
    fn new() -> Sandbox {
        let root = base().join(format!(
            "cstore-fuzz-{}-{:016x}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(root.join("outside")).expect("make the sandbox");
        sentinels(&root.join("outside"));
        let mut all = ALL.lock().unwrap();
        sentinels(Path::new(VICTIM));
        if all.is_empty() {
            // SAFETY: registering a plain extern "C" fn to run at exit.
            unsafe { libc::atexit(remove_all) };
        }
        all.push(root.clone());
        let layer = root.join("layer");
        let blob = root.join("blob.tar");
        let before = snapshot(&root, &[&layer, &blob]);
        let victim = snapshot(Path::new(VICTIM), &[]);
        let m = std::fs::metadata(&root).unwrap();
        let beside = [
            "a", "b", "dir", "outside", "secret", "link", "etc", "passwd", "x.txt", "sub",
        ]
        .iter()
        .map(|n| root.parent().unwrap().join(n))
        .filter(|p| std::fs::symlink_metadata(p).is_err())
        .collect();
        Sandbox {
            root,
            layer,
            blob,
            before,
            victim,
            root_stat: (m.mode(), m.uid(), m.gid()),
            beside,
        }
    }

    fn check(&self, what: &str) {
        let after = snapshot(&self.root, &[&self.layer, &self.blob]);
        assert!(
            after == self.before,
            "confinement broken by {what}: the tree beside the layer changed\nbefore: {:#?}\nafter: {:#?}",
            self.before,
            after
        );
        let victim = snapshot(Path::new(VICTIM), &[]);
        assert!(
            victim == self.victim,
            "confinement broken by {what}: {VICTIM} changed"
        );
        let m = std::fs::metadata(&self.root).unwrap();
        assert_eq!(
            (m.mode(), m.uid(), m.gid()),
            self.root_stat,
            "confinement broken by {what}: the sandbox directory's owner or mode changed"
        );
        for p in &self.beside {
            assert!(
                std::fs::symlink_metadata(p).is_err(),
                "confinement broken by {what}: {} appeared beside the sandbox",
                p.display()
            );
        }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .elapsed()
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

thread_local! {
    static SANDBOX: RefCell<Option<Sandbox>> = const { RefCell::new(None) };
}

/// Unpack `tar` (uncompressed) with `unpack_layer` into a fresh layer
/// directory; panic if anything outside it changed. The outcome (tree or
/// error) is not judged here: only that it stayed inside.
pub fn extract_checked(tar: &[u8]) {
    in_sandbox(tar, |blob, dest| {
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(tar)));
        let layer = LayerRef {
            image: "fuzz/image",
            digest: "sha256:fuzz",
            compression: Compression::None,
            diff_id: &diff_id,
        };
        let _ = unpack_layer(blob, &layer, dest, &UnpackOptions::default());
    });
}

/// The same, for `tar` gzipped and its small files written in io_uring
/// batches (where the kernel allows io_uring; one at a time otherwise).
pub fn extract_checked_batched(tar: &[u8]) {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).expect("gzip in memory");
    let blob = gz.finish().expect("gzip in memory");
    in_sandbox(&blob, |blob, dest| {
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(tar)));
        let layer = LayerRef {
            image: "fuzz/image",
            digest: "sha256:fuzz",
            compression: Compression::Gzip,
            diff_id: &diff_id,
        };
        let opts = UnpackOptions {
            io: Some(cstore_blockio::StreamConfig {
                batch_small_files: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let _ = unpack_layer(blob, &layer, dest, &opts);
    });
}

/// Run `f(blob, layer_dir)` with `tar` written to `blob` and an empty
/// `layer_dir`, then check that nothing outside `layer_dir` changed.
pub fn in_sandbox(tar: &[u8], f: impl FnOnce(&Path, &Path)) {
    SANDBOX.with(|s| {
        let mut s = s.borrow_mut();
        let sb = s.get_or_insert_with(Sandbox::new);
        std::fs::write(&sb.blob, tar).expect("write the blob");
        std::fs::create_dir(&sb.layer).expect("make the layer dir");
        f(&sb.blob, &sb.layer);
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sb.check("an extracted layer")
        }));
        std::fs::remove_dir_all(&sb.layer).expect("remove the layer dir");
        if let Err(p) = checked {
            // The sandbox is spoilt for the next input: start another.
            *s = None;
            std::panic::resume_unwind(p);
        }
    });
}
