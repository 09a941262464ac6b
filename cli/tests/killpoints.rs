//! Crash consistency at scale: `cstore pull` (fetch, verify, rename into
//! blobs/, record, unpack, commit) of layered-bulk (4 layers of 2000 small
//! files and 4 MiB each), slowed through fixtures/faultproxy.py, is killed
//! with SIGKILL at spread-out points: four in five stratified over the
//! length of an unkilled run, every fifth as soon as the pull's output shows
//! a phase marker for the n-th time (verified, renamed into blobs/, recording and recorded the
//! image, committing and committed a snapshot), since those windows are too
//! brief for random times to hit often. After each kill: `cstore gc` must succeed, every blob under
//! blobs/ must hash to its name (else "corrupt"), and every committed
//! snapshot must be a whole layer in a chain from the bottom (else "half";
//! the oracle is `umoci unpack`); then a re-pull without faults must succeed
//! and leave the image whole (else "failed"). Each kill gets a store of its
//! own. Where each kill landed is read from the killed pull's own output
//! (its `--json` events and the debug phase markers of CSTORE_LOG).
//!
//! `KILL_POINTS=N` sets the number of kills (default 5, for CI; the long
//! run is `KILL_POINTS=100 cargo test -p cstore --test killpoints --
//! --nocapture`). `KILL_SEED` fixes the random offsets. The figures are
//! printed and written to `CARGO_TARGET_TMPDIR/killpoints.json`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::tree::{registry_with_layered, snapshots, staging_leftovers, treesnap, umoci_tree};
use common::{Cstore, FaultProxy};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const TAG: &str = "layered-bulk";
/// Blob bodies at this rate (per request): the 4 MiB layers take ~1.5 s.
const BPS: u64 = 3_000_000;

/// The layer digests of `TAG` and the chain ID of each, from the fixtures'
/// OCI layout (the image as built, not as cstore read it).
fn layers_and_chains() -> (Vec<String>, Vec<String>) {
    let oci = common::tree::oci_dir();
    let read = |d: &str| -> Value {
        let p = oci
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(oci.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == TAG)
        .expect("layered-bulk in the fixtures")["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = read(&m);
    let config = read(manifest["config"]["digest"].as_str().unwrap());
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let mut chains: Vec<String> = Vec::new();
    for d in config["rootfs"]["diff_ids"].as_array().unwrap() {
        let d = d.as_str().unwrap();
        chains.push(match chains.last() {
            None => d.to_string(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}")))
            ),
        });
    }
    (layers, chains)
}

/// umoci's unpack of the image, cut into the layers: layer i adds only
/// /bulk{i}, so its tree is that subtree.
fn layer_oracles(n: usize) -> Vec<String> {
    let want = umoci_tree(TAG);
    (1..=n)
        .map(|i| {
            let top = format!("bulk{i}");
            let prefix = format!("bulk{i}/");
            want.lines()
                .filter(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    let p = v["path"].as_str().unwrap();
                    p == top || p.starts_with(&prefix)
                })
                .map(|l| format!("{l}\n"))
                .collect()
        })
        .collect()
}

/// Blobs under blobs/ that do not hash to their name.
fn corrupt_blobs(cs: &Cstore) -> Vec<String> {
    let dir = cs.path().join("blobs/sha256");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return vec![];
    };
    rd.filter_map(|e| {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        let bytes = std::fs::read(e.path()).unwrap();
        (hex::encode(Sha256::digest(&bytes)) != name).then_some(name)
    })
    .collect()
}

/// What is wrong with the snapshots: committed ones not a chain from the
/// bottom, or without their directory; directories in place (a committed
/// snapshot's, or one whose commit the kill cut short) that are not a whole
/// layer. Also how many layers are committed, and how many directories
/// there are. Directories in `whole_before` (by name, inode and ctime) were
/// found whole already and are not walked again.
fn half_snapshots(
    cs: &Cstore,
    layers: &[String],
    chains: &[String],
    oracles: &[String],
    whole_before: &mut HashMap<(String, u64, i64, i64), usize>,
) -> (Vec<String>, usize, usize) {
    let mut bad = Vec::new();
    let mut committed = Vec::new();
    for s in snapshots(cs) {
        let Some(d) = s["labels"]["cstore.io/layer.digest"].as_str() else {
            continue;
        };
        let Some(i) = layers.iter().position(|l| l == d) else {
            bad.push(format!("a snapshot of an unknown layer: {s}"));
            continue;
        };
        let parent = if i == 0 {
            Value::Null
        } else {
            Value::from(chains[i - 1].as_str())
        };
        if s["kind"] != "committed" || s["key"] != chains[i].as_str() || s["parent"] != parent {
            bad.push(format!("layer {i}: {s}"));
            continue;
        }
        committed.push(i);
    }
    committed.sort();
    if committed != (0..committed.len()).collect::<Vec<_>>() {
        bad.push(format!(
            "committed layers {committed:?} are not a chain from the bottom"
        ));
    }
    let mut whole = vec![false; layers.len()];
    let mut dirs = 0;
    let root = cs.path().join("snapshots");
    for e in std::fs::read_dir(&root).into_iter().flatten() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if name.parse::<u64>().is_err() {
            continue;
        }
        dirs += 1;
        let fs = e.path().join("fs");
        let id = std::fs::symlink_metadata(&fs)
            .map(|m| (name.clone(), m.ino(), m.ctime(), m.ctime_nsec()))
            .unwrap_or_default();
        if let Some(&i) = whole_before.get(&id) {
            whole[i] = true;
            continue;
        }
        let top: Vec<String> = std::fs::read_dir(&fs)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let i = match top.as_slice() {
            [one] => one
                .strip_prefix("bulk")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| (1..=layers.len()).contains(n)),
            _ => None,
        };
        let Some(i) = i else {
            bad.push(format!("snapshots/{name}/fs holds {top:?}"));
            continue;
        };
        let got = treesnap(&fs);
        if got != oracles[i - 1] {
            bad.push(format!(
                "snapshots/{name} (layer {}): not the whole layer:\n{}",
                i - 1,
                common::tree::tree_diff(&oracles[i - 1], &got, "umoci:", "cstore:")
            ));
        } else {
            whole[i - 1] = true;
            whole_before.insert(id, i - 1);
        }
    }
    for &i in &committed {
        if !whole[i] {
            bad.push(format!("committed layer {i} has no whole directory"));
        }
    }
    (bad, committed.len(), dirs)
}

/// Where the killed pull was, from its output (stdout and stderr in one
/// file, in order): the last phase it had entered and not left.
fn phase(log: &str, layers: usize) -> &'static str {
    let (mut resolved, mut started, mut done) = (false, 0, 0);
    let (mut verified, mut renamed) = (0, 0);
    let (mut recording, mut recorded, mut pulled) = (false, false, false);
    let (mut unpacking, mut committing, mut commits, mut finished) = (0, 0, 0, false);
    for l in log.lines() {
        if l.starts_with("{\"event\":\"resolved\"") {
            resolved = true;
        } else if l.starts_with("{\"event\":\"started\"") {
            started += 1;
        } else if l.starts_with("{\"event\":\"done\"") {
            done += 1;
        } else if l.starts_with("{\"event\":\"pulled\"") {
            pulled = true;
        } else if l.starts_with("{\"Unpacking\"") {
            unpacking += 1;
        } else if l.starts_with("{\"event\":\"unpacked\"") {
            finished = true;
        } else if l.contains("renamed into blobs/") {
            renamed += 1;
        } else if l.contains("verified") {
            verified += 1;
        } else if l.contains("recording the image") {
            recording = true;
        } else if l.contains("recorded the image") {
            recorded = true;
        } else if l.contains("committing the snapshot") {
            committing += 1;
        } else if l.contains("committed the snapshot") {
            commits += 1;
        }
    }
    if finished {
        "after the end"
    } else if committing > commits || commits > 0 {
        "commit"
    } else if unpacking > 0 || pulled || recorded {
        if unpacking == layers {
            "unpack (last layers)"
        } else {
            "unpack"
        }
    } else if recording {
        "record"
    } else if verified > renamed {
        "verify + rename"
    } else if started > done {
        "fetch"
    } else if started > 0 {
        "record"
    } else if resolved {
        "plan"
    } else {
        "start"
    }
}

#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// This long after the start.
    At(Duration),
    /// As soon as the output shows this phase marker for the n-th time.
    Marker(&'static str, usize),
}

#[derive(Default)]
struct Tally {
    points: usize,
    corrupt: usize,
    half: usize,
    failed: usize,
    by_phase: BTreeMap<&'static str, usize>,
    problems: Vec<String>,
}

fn pull_logged(cs: &Cstore, image: &str, log: &Path) -> std::process::Child {
    let f = std::fs::File::create(log).unwrap();
    cs.cmd(&["pull", "--json", image])
        .env(
            "CSTORE_LOG",
            "warn,cstore_store=debug,cstore_snapshotter=debug",
        )
        .env("NO_COLOR", "1")
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .spawn()
        .unwrap()
}

/// A tmpfs for the stores, unmounted (lazily) however the test ends. A
/// SIGKILL leaves the page cache as it was, so a tmpfs shows the same states
/// as a disk; and each layer's syncfs there does not wait for the rest of
/// the machine's writeback.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount() -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("cstore-killpoints-")
            .tempdir()
            .unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2g", "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir)
    }

    fn new_store(&self) -> Cstore {
        Cstore {
            root: tempfile::Builder::new()
                .prefix("root-")
                .tempdir_in(self.0.path())
                .unwrap(),
            env: vec![("CSTORE_RETRY_BACKOFF_MS".into(), "20".into())],
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn sigkill_at_spread_points_of_pull_and_unpack() {
    let points: usize = std::env::var("KILL_POINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand_seed);
    let addr = registry_with_layered(&[TAG]);
    let proxy = FaultProxy::start(&addr);
    let image = format!("{}/{TAG}:latest", proxy.addr);
    let (layers, chains) = layers_and_chains();
    assert_eq!(layers.len(), 4);
    let oracles = layer_oracles(layers.len());
    let slow = json!({"match": "/blobs/", "action": "slow", "bps": BPS});
    let tmpfs = Tmpfs::mount();

    // An unkilled run through the slowed proxy: how long a pull takes. The
    // machine's load changes that, so it is measured again every tenth kill
    // (and whenever a pull finished before its kill).
    let unkilled = || {
        proxy.set(slow.clone());
        let cs = tmpfs.new_store();
        let log = cs.path().with_extension("log");
        let started = Instant::now();
        let mut child = pull_logged(&cs, &image, &log);
        // When each phase began, as the output shows it (polled).
        let mut timeline: Vec<(&'static str, f64)> = Vec::new();
        let st = loop {
            let done = child.try_wait().unwrap();
            let ph = phase(&std::fs::read_to_string(&log).unwrap_or_default(), 4);
            if timeline.last().is_none_or(|(p, _)| *p != ph) {
                timeline.push((ph, started.elapsed().as_secs_f64()));
            }
            if let Some(st) = done {
                break st;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let length = started.elapsed();
        eprintln!("unkilled pull: {length:?}, phases from (s): {timeline:?}");
        let text = std::fs::read_to_string(&log).unwrap();
        let _ = std::fs::remove_file(&log);
        assert!(st.success(), "an unkilled pull failed:\n{text}");
        let (bad, n, _) = half_snapshots(&cs, &layers, &chains, &oracles, &mut HashMap::new());
        assert!(bad.is_empty() && n == layers.len(), "{bad:?}");
        (length, timeline)
    };
    let (mut length, timeline) = unkilled();
    let mut lengths = vec![length.as_secs_f64()];

    // Every fifth kill waits for a phase marker instead of a time, so the
    // brief windows (verify and rename, recording, committing) get kills
    // too; the others are stratified over the run's length.
    // (marker, how many times a pull shows it: blobs are the manifest, the
    // config and 4 layers; snapshots 4)
    let markers = [
        ("verified", 6),
        ("renamed into blobs/", 6),
        ("recording the image", 1),
        ("recorded the image", 1),
        ("committing the snapshot", 4),
        ("committed the snapshot", 4),
    ];
    let timed = points - points / 5;
    let mut rng = seed;
    let mut t = Tally::default();
    for i in 0..points {
        if i > 0 && i % 10 == 0 {
            length = unkilled().0;
            lengths.push(length.as_secs_f64());
        }
        let trigger = if i % 5 == 4 {
            // The n-th time it shows (blobs: manifest, config, layers...).
            let j = i / 5;
            let (m, times) = markers[j % markers.len()];
            Trigger::Marker(m, 1 + (j / markers.len()) % times)
        } else {
            // Point k of the timed ones lands in the k-th slice of the run,
            // at random within it (a little past the end too: the exit).
            let k = i - i / 5;
            let u = (xorshift(&mut rng) % 1_000_000) as f64 / 1_000_000.0;
            Trigger::At(length.mul_f64((k as f64 + u) / timed as f64 * 1.05))
        };
        proxy.set(slow.clone());
        let cs = tmpfs.new_store();
        let log = cs.path().with_extension("log");
        let started = Instant::now();
        let mut child = pull_logged(&cs, &image, &log);
        match trigger {
            Trigger::At(at) => {
                while started.elapsed() < at && child.try_wait().unwrap().is_none() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Trigger::Marker(m, n) => {
                while started.elapsed() < length * 3
                    && child.try_wait().unwrap().is_none()
                    && std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .matches(m)
                        .count()
                        < n
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let _ = child.kill(); // SIGKILL
        let at = started.elapsed();
        let st = child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        let ph = if st.code() == Some(0) {
            // Done before its kill: the runs are quicker now.
            if matches!(trigger, Trigger::At(_)) {
                length = at;
                lengths.push(length.as_secs_f64());
            }
            "after the end"
        } else {
            phase(&text, layers.len())
        };
        *t.by_phase.entry(ph).or_default() += 1;
        t.points += 1;
        let when = format!("kill {i} ({trigger:?}) at {at:?} ({ph})");

        let t0 = Instant::now();
        let (code, out, err) = cs.outcome(&["gc", "--json"]);
        let t_gc = t0.elapsed();
        if code != 0 {
            t.failed += 1;
            t.problems.push(format!("{when}: gc failed: {out}{err}"));
        }
        let corrupt = corrupt_blobs(&cs);
        t.corrupt += corrupt.len();
        if !corrupt.is_empty() {
            t.problems
                .push(format!("{when}: corrupt blobs {corrupt:?}"));
        }
        let mut whole = HashMap::new();
        let (half, _, _) = half_snapshots(&cs, &layers, &chains, &oracles, &mut whole);
        t.half += half.len();
        t.problems
            .extend(half.iter().map(|h| format!("{when}: {h}")));

        let t_check = t0.elapsed();
        // The re-pull, without faults, must finish the job.
        proxy.clear();
        let (code, out, err) = cs.outcome(&["pull", &image]);
        let t_repull = t0.elapsed();
        let (half, committed, dirs) = half_snapshots(&cs, &layers, &chains, &oracles, &mut whole);
        let corrupt = corrupt_blobs(&cs);
        let listed = cs.images().iter().any(|im| im["name"] == image.as_str());
        let leftovers = staging_leftovers(&cs);
        eprintln!(
            "{when}: gc {:.1}s, checks {:.1}s, re-pull {:.1}s, all {:.1}s",
            t_gc.as_secs_f64(),
            (t_check - t_gc).as_secs_f64(),
            (t_repull - t_check).as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
        if code != 0
            || !half.is_empty()
            || committed != layers.len()
            || dirs != layers.len()
            || !corrupt.is_empty()
            || !listed
            || !cs.partials().is_empty()
            || !leftovers.is_empty()
        {
            t.failed += 1;
            t.problems.push(format!(
                "{when}: the re-pull: exit {code}, {committed} layers committed in {dirs} dirs, \
                 half {half:?}, corrupt {corrupt:?}, listed {listed}, partials {:?}, staging {leftovers:?}\n{out}{err}",
                cs.partials()
            ));
        }
    }

    let summary = json!({
        "image": TAG,
        "points": t.points,
        "seed": seed,
        "unkilled_pull_seconds": lengths,
        "unkilled_pull_phases_from": timeline,
        "bytes_per_second": BPS,
        "by_phase": t.by_phase,
        "corrupt_blobs": t.corrupt,
        "half_snapshots": t.half,
        "failed_repulls": t.failed,
    });
    eprintln!("kill points: {summary:#}");
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("killpoints.json"),
        format!("{summary:#}\n"),
    );
    assert!(
        t.problems.is_empty(),
        "{} problems (seed {seed}):\n{}",
        t.problems.len(),
        t.problems.join("\n")
    );
    // The kills spread over the pipeline, not all in one phase.
    let phases = t.by_phase.keys().filter(|p| **p != "after the end").count();
    assert!(
        phases >= if points >= 10 { 4 } else { 2.min(points) },
        "kills landed in too few phases: {:?}",
        t.by_phase
    );
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

#[test]
fn phases_are_read_from_the_pull_output() {
    let log = "{\"event\":\"resolved\"}\n{\"event\":\"started\",\"digest\":\"a\"}\n";
    assert_eq!(phase(log, 4), "fetch");
    let log = format!("{log}DEBUG verified blob=a\n");
    assert_eq!(phase(&log, 4), "verify + rename");
    let log = format!("{log}DEBUG renamed into blobs/ blob=a\n{{\"event\":\"done\"}}\n");
    assert_eq!(phase(&log, 4), "record");
    let log = format!("{log}DEBUG recording the image\n");
    assert_eq!(phase(&log, 4), "record");
    let log = format!("{log}DEBUG recorded the image\n{{\"Unpacking\":{{}}}}\n");
    assert_eq!(phase(&log, 4), "unpack");
    let log = format!("{log}DEBUG committing the snapshot\n");
    assert_eq!(phase(&log, 4), "commit");
    assert_eq!(phase("", 4), "start");
}
