//! The fuzz targets (`cstore_fuzz::TARGETS`) driven on the stable
//! toolchain for a bounded time: first every committed seed in
//! `fuzz/corpus/<target>/` and the seeds made here, then mutations of them
//! (`cstore_fuzz::mutate`) until the target's share of the time is spent.
//! An input fails the run when it panics, takes longer than `SLOW`, or makes
//! one thread allocate more than `ALLOC_CAP` at once (a counting global
//! allocator below); a watchdog aborts the process on a real hang. The
//! failing input is written to `CARGO_TARGET_TMPDIR/fuzz-failures/`, and
//! `CSTORE_FUZZ_REPLAY=FILE cargo test -p cstore-fuzz --test fuzz -- NAME`
//! runs it again.
//!
//! `CSTORE_FUZZ_SECONDS` (default 40) is the whole run's time, shared out by
//! `WEIGHTS`; two targets run at a time. `CSTORE_FUZZ_SEED` fixes the
//! mutation seed (printed at the start of each target).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cstore_fuzz::mutate::{mutate, Rng};
use cstore_fuzz::{target, Target};

/// Peak bytes one input may hold allocated at once, beyond what its thread
/// held before (the tar reader's records are capped at 1 MiB; unpack holds
/// a few buffers of 1 MiB).
const ALLOC_CAP: usize = 64 << 20;
/// One input that takes longer than this fails the run (a debug build on a
/// loaded machine: the biggest seed, a 4 MiB manifest, takes up to ~4 s)...
const SLOW: Duration = Duration::from_secs(10);
/// ...and one still running after this aborts it.
const HANG: Duration = Duration::from_secs(30);

struct Counting;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn add(n: usize) {
    let _ = CURRENT.try_with(|c| {
        let v = c.get().wrapping_add(n);
        c.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() && v < usize::MAX / 2 {
                p.set(v)
            }
        });
    });
}

fn sub(n: usize) {
    let _ = CURRENT.try_with(|c| c.set(c.get().wrapping_sub(n)));
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        add(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        add(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        sub(l.size());
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        add(new);
        sub(l.size());
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Each target's share of the time.
const WEIGHTS: &[(&str, u64)] = &[
    ("tar", 6),
    ("layer", 10),
    ("layer_raw", 8),
    ("manifest", 5),
    ("config", 3),
    ("reference", 3),
    ("www_authenticate", 3),
    ("content_range", 2),
    ("index_parse", 3),
    ("estargz_toc", 3),
    ("estargz_blob", 2),
    ("soci_ztoc", 3),
];

fn budget(name: &str) -> Duration {
    let total: f64 = std::env::var("CSTORE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40.0);
    let sum: u64 = WEIGHTS.iter().map(|w| w.1).sum();
    let w = WEIGHTS.iter().find(|w| w.0 == name).map_or(1, |w| w.1);
    // Two targets run at a time (cargo test's threads on two cores).
    Duration::from_secs_f64(total * 2.0 * w as f64 / sum as f64)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn committed_seeds(name: &str) -> Vec<Vec<u8>> {
    let dir = repo().join("fuzz/corpus").join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn header(name: &[u8], flag: u8, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = flag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    cstore_fuzz::set_checksum(&mut h);
    h
}

fn pad(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(512) {
        v.push(0);
    }
}

fn pax(key: &str, value: &[u8]) -> Vec<u8> {
    let base = key.len() + value.len() + 3;
    let mut len = base + base.to_string().len();
    if len.to_string().len() != base.to_string().len() {
        len = base + len.to_string().len();
    }
    [format!("{len} {key}=").as_bytes(), value, b"\n"].concat()
}

/// Seeds too big to commit, made at test time: metadata records at their
/// caps, many of them in a row, a long sparse map, a deep tree.
fn big_tar_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    // A PAX record just under the 1 MiB cap, then a file.
    let mut t = Vec::new();
    let rec = pax("comment", &vec![b'c'; (1 << 20) - 32]);
    t.extend(header(b"pax", b'x', rec.len() as u64));
    t.extend(&rec);
    pad(&mut t);
    t.extend(header(b"file", b'0', 5));
    t.extend(b"hello");
    pad(&mut t);
    t.extend([0u8; 1024]);
    seeds.push(t);
    // PAX headers of xattrs in a row before one entry: they piled up in
    // memory (80 of them took 187 MB) before their total was capped.
    let mut t = Vec::new();
    let mut rec = Vec::new();
    let mut i = 0;
    while rec.len() < (1 << 20) - 300 {
        rec.extend(pax(&format!("SCHILY.xattr.user.k{i}"), &[b'v'; 200]));
        i += 1;
    }
    for _ in 0..3 {
        t.extend(header(b"pax", b'x', rec.len() as u64));
        t.extend(&rec);
        pad(&mut t);
    }
    t.extend(header(b"file", b'0', 0));
    t.extend([0u8; 1024]);
    seeds.push(t);
    // A PAX 0.1 sparse map of 60000 regions.
    let mut t = Vec::new();
    let map: Vec<String> = (0..60000u64)
        .flat_map(|i| [(i * 4).to_string(), "1".to_string()])
        .collect();
    let mut rec = pax("GNU.sparse.map", map.join(",").as_bytes());
    rec.extend(pax("GNU.sparse.size", b"240000"));
    t.extend(header(b"pax", b'x', rec.len() as u64));
    t.extend(&rec);
    pad(&mut t);
    t.extend(header(b"sparse", b'0', 60000));
    t.extend(vec![b's'; 60000]);
    pad(&mut t);
    t.extend([0u8; 1024]);
    seeds.push(t);
    // 3000 nested directories and a file at the bottom.
    let mut t = Vec::new();
    let mut path = Vec::new();
    for _ in 0..400 {
        path.extend(b"d/");
        let rec = pax("path", &path);
        t.extend(header(b"pax", b'x', rec.len() as u64));
        t.extend(&rec);
        pad(&mut t);
        t.extend(header(b"d", b'5', 0));
    }
    t.extend([0u8; 1024]);
    seeds.push(t);
    seeds
}

/// The crafted hostile tars of the unpack tests (fixtures/evil-tars.py).
fn evil_tars() -> Vec<Vec<u8>> {
    let dir = tempfile_dir();
    let st = std::process::Command::new("python3")
        .arg(repo().join("fixtures/evil-tars.py"))
        .arg(&dir)
        .status();
    let mut out = Vec::new();
    match st {
        Ok(s) if s.success() => {
            for e in std::fs::read_dir(&dir).unwrap() {
                out.push(std::fs::read(e.unwrap().path()).unwrap());
            }
        }
        other => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "fixtures/evil-tars.py did not run: {other:?}"
            );
            eprintln!("fixtures/evil-tars.py did not run ({other:?}); seeds without it");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn tempfile_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "evil-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A manifest at the 4 MiB limit: ~27000 distinct layers. Each was looked
/// up in the list of blobs so far (8-21 s in a debug build, 358 s under
/// ASan); a guard against that coming back, though only a slow machine
/// pushes the old code past `SLOW`.
fn big_manifest_seed() -> Vec<u8> {
    use sha2::Digest as _;
    let layers: Vec<String> = (0..27000)
        .map(|i: u32| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{}","size":1}}"#,
                hex::encode(sha2::Sha256::digest(i.to_le_bytes()))
            )
        })
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":1}},"layers":[{}]}}"#,
        "a".repeat(64),
        layers.join(",")
    )
    .into_bytes()
}

fn seeds(t: &Target) -> Vec<Vec<u8>> {
    let mut s = committed_seeds(t.name);
    assert!(!s.is_empty(), "no committed seeds for {}", t.name);
    if t.tar {
        s.extend(big_tar_seeds());
        s.extend(evil_tars());
    }
    if t.name == "manifest" {
        s.push(big_manifest_seed());
    }
    s
}

fn save_failure(name: &str, input: &[u8]) -> PathBuf {
    use sha2::Digest as _;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!(
        "{name}-{}",
        &hex::encode(sha2::Sha256::digest(input))[..16]
    ));
    std::fs::write(&p, input).unwrap();
    p
}

/// The input being run on each thread (for the watchdog): start time and a
/// copy of the input.
static RUNNING: Mutex<Vec<(String, Instant, Vec<u8>)>> = Mutex::new(Vec::new());
static WATCHDOG: AtomicU64 = AtomicU64::new(0);

fn watchdog() {
    if WATCHDOG.swap(1, Ordering::SeqCst) == 1 {
        return;
    }
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(200));
        let r = RUNNING.lock().unwrap();
        for (name, started, input) in r.iter() {
            if started.elapsed() > HANG {
                let p = save_failure(name, input);
                eprintln!(
                    "fuzz target {name} hangs (> {HANG:?}) on {}: aborting",
                    p.display()
                );
                std::process::abort();
            }
        }
    });
}

/// Run one input; Err(why) if it panicked, was slow or allocated too much.
fn run_one(t: &Target, input: &[u8]) -> Result<(), String> {
    let me = format!("{:?}", std::thread::current().id());
    RUNNING
        .lock()
        .unwrap()
        .push((format!("{}@{me}", t.name), Instant::now(), input.to_vec()));
    let base = CURRENT.with(|c| c.get());
    PEAK.with(|p| p.set(base));
    let started = Instant::now();
    let r = std::panic::catch_unwind(|| (t.run)(input));
    let took = started.elapsed();
    let peak = PEAK.with(|p| p.get()).saturating_sub(base);
    RUNNING
        .lock()
        .unwrap()
        .retain(|(n, ..)| !n.ends_with(&format!("@{me}")));
    if let Err(p) = r {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        return Err(format!("panicked: {msg}"));
    }
    if took > SLOW {
        return Err(format!("took {took:?} (limit {SLOW:?})"));
    }
    if peak > ALLOC_CAP {
        return Err(format!(
            "allocated {peak} bytes at once (limit {ALLOC_CAP})"
        ));
    }
    Ok(())
}

fn fail(t: &Target, input: &[u8], why: &str) -> ! {
    let p = save_failure(t.name, input);
    panic!(
        "fuzz target {}: {why}\ninput: {} ({} bytes)\nreplay: CSTORE_FUZZ_REPLAY={} cargo test -p cstore-fuzz --test fuzz -- {}",
        t.name,
        p.display(),
        input.len(),
        p.display(),
        t.name
    );
}

fn drive(name: &str) {
    let t = target(name).expect("a target");
    watchdog();
    if let Ok(f) = std::env::var("CSTORE_FUZZ_REPLAY") {
        if Path::new(&f)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{name}-")))
            || std::env::var("CSTORE_FUZZ_REPLAY_ANY").is_ok()
        {
            let input = std::fs::read(&f).unwrap();
            if let Err(why) = run_one(t, &input) {
                fail(t, &input, &why);
            }
            return;
        }
    }
    let seed = std::env::var("CSTORE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let corpus = seeds(t);
    let started = Instant::now();
    for input in &corpus {
        if let Err(why) = run_one(t, input) {
            fail(t, input, &why);
        }
    }
    let max = if t.tar { 2 << 20 } else { 64 << 10 };
    let mut rng = Rng::new(seed);
    let budget = budget(name);
    let mut runs = corpus.len() as u64;
    // Big seeds are mutated less often: they cost the most per run.
    let small: Vec<&Vec<u8>> = corpus.iter().filter(|s| s.len() <= 256 << 10).collect();
    // At least some mutations, even when the seeds took the whole budget.
    while started.elapsed() < budget || runs < corpus.len() as u64 + 50 {
        let pick = if rng.chance(16) || small.is_empty() {
            &corpus[rng.below(corpus.len())]
        } else {
            small[rng.below(small.len())]
        };
        let other = small
            .get(rng.below(small.len()))
            .map_or(&[][..], |v| &v[..]);
        let mut input = pick.clone();
        mutate(&mut input, other, t.tar, max, &mut rng);
        if let Err(why) = run_one(t, &input) {
            fail(t, &input, &format!("{why} (seed {seed})"));
        }
        runs += 1;
    }
    eprintln!(
        "fuzz {name}: {runs} inputs in {:.1} s (seed {seed}, {} seeds)",
        started.elapsed().as_secs_f64(),
        corpus.len()
    );
    assert!(runs > corpus.len() as u64, "no mutated input ran");
}

#[test]
fn tar() {
    drive("tar");
}

#[test]
fn layer() {
    drive("layer");
}

#[test]
fn layer_raw() {
    drive("layer_raw");
}

#[test]
fn manifest() {
    drive("manifest");
}

#[test]
fn config() {
    drive("config");
}

#[test]
fn reference() {
    drive("reference");
}

#[test]
fn www_authenticate() {
    drive("www_authenticate");
}

#[test]
fn content_range() {
    drive("content_range");
}

#[test]
fn index_parse() {
    drive("index_parse");
}

#[test]
fn estargz_toc() {
    drive("estargz_toc");
}

#[test]
fn estargz_blob() {
    drive("estargz_blob");
}

#[test]
fn soci_ztoc() {
    drive("soci_ztoc");
}

/// The harness itself: a broken confinement, a panic, a slow input and an
/// allocation past the cap are each caught (so a green run means something).
#[test]
fn the_harness_catches_what_it_should() {
    let boom = Target {
        name: "boom",
        run: |_| panic!("boom"),
        tar: false,
    };
    assert!(run_one(&boom, b"x").unwrap_err().contains("boom"));
    let hog = Target {
        name: "hog",
        run: |_| {
            let v = vec![1u8; 80 << 20];
            std::hint::black_box(&v);
        },
        tar: false,
    };
    assert!(run_one(&hog, b"x").unwrap_err().contains("allocated"));
    let ok = Target {
        name: "ok",
        run: |_| {},
        tar: false,
    };
    assert!(run_one(&ok, b"x").is_ok());
    let escape = Target {
        name: "escape",
        run: |_| {
            cstore_fuzz::sandbox::in_sandbox(b"", |_, layer| {
                let secret = layer.join("../outside/secret");
                std::fs::write(secret, "changed").unwrap();
            })
        },
        tar: false,
    };
    assert!(run_one(&escape, b"x")
        .unwrap_err()
        .contains("confinement broken"));
    let chmod = Target {
        name: "chmod",
        run: |_| {
            cstore_fuzz::sandbox::in_sandbox(b"", |_, layer| {
                use std::os::unix::fs::PermissionsExt;
                let dir = layer.join("../outside/dir");
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            })
        },
        tar: false,
    };
    assert!(run_one(&chmod, b"x")
        .unwrap_err()
        .contains("confinement broken"));
}
