//! A real containerd (Debian's 1.6, with runc) using `cstore snapshotter
//! serve` as its proxy snapshotter, end to end: pull, run, listings, garbage
//! collection, layer sharing with `cstore pull`, and SIGKILLs mid-traffic.
//!
//! Everything lives in temp dirs. containerd gets its own config (root,
//! state, sockets under the temp dir, CRI off, `[proxy_plugins.cstore]`) and
//! runs in a private mount namespace with a tmpfs on /run: containerd 1.6
//! hard-codes its shim sockets and runc state under /run/containerd, and
//! this keeps them (and every mount containerd and its shims make) off the
//! host. `ctr` runs in that namespace too (`nsenter`), so its FIFOs do.
//! Drop kills the containers, shims, containerd and the snapshotter.
//!
//! Needs root, containerd, ctr, runc, nsenter/unshare, and Go with Debian's
//! containerd sources (fixtures/deps.sh installs them) for `cripull`: the
//! CRI-style pull in cli/tests/containerd/cripull.go, because `ctr image
//! pull` in containerd 1.6 never takes the unpacker path that shares layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::harness::containerd::{
    key_of, numbered_dirs, tail, try_dir_of, wait_until, Containerd, Snapshotter,
};
use crate::harness::tree::snapshots as cstore_snapshots;
use crate::harness::{fixture, repo_root, shared_registry_addr, Cstore};
use cstore_snapshotter::service::proto::containerd::services::snapshots::v1 as api;
use serde_json::Value;

use api::snapshots_client::SnapshotsClient;

const REF_LABEL: &str = "containerd.io/snapshot.ref";
/// gRPC status code AlreadyExists.
const ALREADY_EXISTS: i32 = 6;

// ---------------------------------------------------------------- fixtures

/// The shared test registry (busybox images), with debian:bookworm pushed
/// too when a test asks for it.
fn registry(debian: bool) -> String {
    let addr = shared_registry_addr();
    if debian {
        static DEBIAN: OnceLock<()> = OnceLock::new();
        DEBIAN.get_or_init(|| {
            let out = Command::new("bash")
                .arg(fixture("push.sh"))
                .args([addr.as_str(), "--debian"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "push.sh --debian: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        });
    }
    addr
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Containerd {
    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount=/proc/{}/ns/mnt", self.pid()))
            .args(["--", "ctr", "--address"])
            .arg(&self.sock)
            .args(["--connect-timeout", "10s", "--timeout", "300s"])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("run ctr")
    }

    /// Run ctr, assert success, return stdout.
    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed:\nstdout: {}\nstderr: {}\ncontainerd log tail: {}",
            stdout_of(&out),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        stdout_of(&out)
    }

    /// `ctr run` that must print something: ctr (1.6) now and then loses a
    /// short-lived container's output on a loaded machine (the container ran
    /// and exited 0, stdout is empty), so an empty stdout is retried twice;
    /// a failed run is not.
    fn ctr_run(&self, args: &[&str]) -> String {
        for _ in 0..2 {
            let out = self.ctr_ok(args);
            if !out.trim().is_empty() {
                return out;
            }
            eprintln!("ctr {args:?} exited 0 with no output; running it again");
        }
        self.ctr_ok(args)
    }

    /// Like `ctr_ok`, but retried while containerd's connection to a
    /// restarted snapshotter comes back (gRPC reconnects with backoff).
    fn ctr_retry(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.ctr(args);
            if out.status.success() {
                return stdout_of(&out);
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                Instant::now() < deadline,
                "ctr {args:?} kept failing: {err}\ncontainerd log tail: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The CRI-style pull (containerd's unpacker, with snapshot.ref labels).
    fn cripull(&self, namespace: &str, reference: &str) -> String {
        let out = Command::new(go_client())
            .arg("--address")
            .arg(&self.sock)
            .args([
                "--namespace",
                namespace,
                "--snapshotter",
                "cstore",
                reference,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cripull {reference} failed: {}\ncontainerd log tail: {}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        stdout_of(&out)
    }

    fn log_tail(&self) -> String {
        tail(&self.log(), 20)
    }

    /// `ctr snapshots ls` as (name, parent, kind) rows.
    fn snapshots(&self, namespace: &str) -> BTreeSet<(String, String, String)> {
        let out = self.ctr_ok(&[
            "-n",
            namespace,
            "snapshots",
            "--snapshotter",
            "cstore",
            "ls",
        ]);
        out.lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    [name, kind] => (name.to_string(), String::new(), kind.to_lowercase()),
                    [name, parent, kind] => {
                        (name.to_string(), parent.to_string(), kind.to_lowercase())
                    }
                    _ => panic!("unexpected ctr snapshots ls line {l:?}"),
                }
            })
            .collect()
    }
}

/// The CRI-style pull client, built once (cached across runs).
fn go_client() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = repo_root().join("cli/tests/containerd/cripull.go");
        let cache = std::env::var_os("CSTORE_GO_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/cstore-containerd-test"));
        let pkg = cache.join("src/cripull");
        std::fs::create_dir_all(&pkg).unwrap();
        let bin = cache.join("cripull");
        let code = std::fs::read(&src).unwrap();
        let cached = std::fs::read(pkg.join("main.go")).ok();
        if bin.exists() && cached.as_deref() == Some(code.as_slice()) {
            return bin;
        }
        std::fs::write(pkg.join("main.go"), &code).unwrap();
        let tmp = cache.join(format!("cripull.{}", std::process::id()));
        let mut cmd = Command::new("go");
        cmd.args(["build", "-o"])
            .arg(&tmp)
            .arg(".")
            .current_dir(&pkg)
            .env("GOPATH", format!("{}:/usr/share/gocode", cache.display()))
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "");
        if std::env::var_os("HOME").is_none() && std::env::var_os("XDG_CACHE_HOME").is_none() {
            cmd.env("GOCACHE", cache.join("go-build"));
        }
        let out = cmd
            .output()
            .expect("go (fixtures/deps.sh installs golang-go)");
        assert!(
            out.status.success(),
            "building cripull.go (needs golang-github-containerd-containerd-dev): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, &bin).unwrap();
        bin
    })
    .clone()
}

/// A store root served by `cstore snapshotter serve`, and a containerd using it.
struct Env {
    // Drop order: containerd, then the snapshotter, then the dirs.
    ctrd: Containerd,
    sn: Snapshotter,
    cs: Cstore,
    _dir: tempfile::TempDir,
}

impl Env {
    fn start() -> Env {
        Self::start_with(Cstore::new(), &["--log-level", "info"], &[])
    }

    /// With `global` options before and `extra` after `snapshotter serve`,
    /// on an existing store.
    fn start_with(cs: Cstore, global: &[&str], extra: &[&str]) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("cstore-containerd-")
            .tempdir()
            .unwrap();
        let sock = dir.path().join("cstore-snapshotter.sock");
        let log = dir.path().join("snapshotter.log");
        let sn = Snapshotter::start_with(&cs, &sock, &log, global, extra);
        let ctrd = Containerd::start(&dir.path().join("containerd"), &sock);
        Env {
            ctrd,
            sn,
            cs,
            _dir: dir,
        }
    }
}

// ------------------------------------------------------ store-side oracles

/// ROOT/snapshots/<id> of a snapshot, through the library (the listing
/// does not show ids).
fn dir_of(cs: &Cstore, key: &str) -> PathBuf {
    try_dir_of(cs, key).unwrap_or_else(|| panic!("no snapshot {key}"))
}

/// Every listed snapshot has its directory (active ones an fs and a work
/// dir) and a listed parent. Returns the listing.
fn assert_no_half_snapshots(cs: &Cstore) -> Vec<Value> {
    let list = cstore_snapshots(cs);
    let keys: BTreeSet<String> = list.iter().map(key_of).collect();
    for s in &list {
        let key = key_of(s);
        let Some(dir) = try_dir_of(cs, &key) else {
            // Removed since the listing (by containerd's GC): it must be gone.
            assert!(
                !cstore_snapshots(cs).iter().any(|v| key_of(v) == key),
                "{key} is listed but has no record"
            );
            continue;
        };
        assert!(
            dir.join("fs").is_dir(),
            "{key}: {} has no fs",
            dir.display()
        );
        if s["kind"] == "active" {
            assert!(
                dir.join("work").is_dir(),
                "active {key}: {} has no work dir",
                dir.display()
            );
        }
        if let Some(p) = s["parent"].as_str() {
            assert!(keys.contains(p), "{key}: parent {p} is not listed");
        }
    }
    list
}

/// Strip containerd's `NAMESPACE/N/` from a backend name, if it has one in `ns`.
fn containerd_name(ns: &str, backend: &str) -> Option<String> {
    let rest = backend.strip_prefix(ns)?.strip_prefix('/')?;
    let (id, name) = rest.split_once('/')?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then(|| name.to_string())
}

/// `ctr snapshots ls/info/usage` agree with `cstore snapshots --json` about
/// containerd's snapshots in namespace `ns`: names (containerd's backend
/// names are `NS/N/NAME`), kinds, parents, sizes and inode counts.
fn assert_listings_agree(env: &Env, ns: &str) -> usize {
    let ctr_rows = env.ctrd.snapshots(ns);
    let cstore = cstore_snapshots(&env.cs);
    let by_name: BTreeMap<String, &Value> = cstore
        .iter()
        .filter_map(|v| containerd_name(ns, &key_of(v)).map(|n| (n, v)))
        .collect();
    let cstore_rows: BTreeSet<(String, String, String)> = by_name
        .iter()
        .map(|(name, v)| {
            let parent = v["parent"]
                .as_str()
                .map(|p| {
                    containerd_name(ns, p).unwrap_or_else(|| format!("(not containerd's) {p}"))
                })
                .unwrap_or_default();
            (
                name.clone(),
                parent,
                v["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        ctr_rows, cstore_rows,
        "ctr snapshots ls vs cstore snapshots --json"
    );
    for (name, parent, kind) in &ctr_rows {
        let info: Value = serde_json::from_str(&env.ctrd.ctr_ok(&[
            "-n",
            ns,
            "snapshots",
            "--snapshotter",
            "cstore",
            "info",
            name,
        ]))
        .unwrap();
        assert_eq!(info["Name"], name.as_str());
        assert_eq!(info["Kind"].as_str().unwrap().to_lowercase(), *kind);
        assert_eq!(info["Parent"].as_str().unwrap_or(""), parent);
    }
    let usage = env.ctrd.ctr_ok(&[
        "-n",
        ns,
        "snapshots",
        "--snapshotter",
        "cstore",
        "usage",
        "--b",
    ]);
    let mut seen = 0;
    for l in usage.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let [name, size, inodes] = f.as_slice() else {
            continue;
        };
        let v = by_name
            .get(*name)
            .unwrap_or_else(|| panic!("usage of unknown {name}"));
        assert_eq!(
            size.parse::<u64>().unwrap(),
            v["size"].as_u64().unwrap(),
            "size of {name}"
        );
        assert_eq!(
            inodes.parse::<u64>().unwrap(),
            v["inodes"].as_u64().unwrap(),
            "inodes of {name}"
        );
        seen += 1;
    }
    assert_eq!(
        seen,
        ctr_rows.len(),
        "ctr snapshots usage lists every snapshot"
    );
    ctr_rows.len()
}

fn chain_id_of_pull(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("image chain ID: "))
        .unwrap_or_else(|| panic!("no chain ID in {out}"))
        .trim()
        .to_string()
}

// ------------------------------------------------------------------ tests

/// (a) ctr pulls into cstore, the snapshotter restarts, ctr runs the image.
/// (b) ctr's listings agree with cstore's.
#[test]
fn ctr_pull_then_run_across_a_snapshotter_restart() {
    let addr = registry(false);
    let mut env = Env::start();
    let image = format!("{addr}/busybox:latest");
    let out = env.ctrd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "cstore",
        "--print-chainid",
        &image,
    ]);
    let top = chain_id_of_pull(&out);

    env.sn.terminate();
    env.sn.restart(&env.cs);

    let out = env.ctrd.ctr_retry(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "c1",
        "/bin/echo",
        "hello-from-cstore",
    ]);
    assert_eq!(out.trim(), "hello-from-cstore");

    // An active and a view snapshot besides the image's committed layers.
    env.ctrd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "cstore",
        "prepare",
        "work-1",
        &top,
    ]);
    env.ctrd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "cstore",
        "view",
        "look-1",
        &top,
    ]);
    // ctr run --rm removed the container's snapshot; containerd's GC takes
    // it out of the backend shortly after.
    wait_until(
        "the container snapshot's removal",
        Duration::from_secs(30),
        || cstore_snapshots(&env.cs).len() == 5,
    );
    let n = assert_listings_agree(&env, "default");
    assert_eq!(n, 5, "3 layers, one active, one view");
    let kinds: BTreeSet<String> = env
        .ctrd
        .snapshots("default")
        .into_iter()
        .map(|r| r.2)
        .collect();
    assert_eq!(
        kinds,
        ["active", "committed", "view"].map(String::from).into(),
        "every kind compared"
    );
    assert_no_half_snapshots(&env.cs);
}

/// (c) Removing the images makes containerd's GC remove its snapshots
/// through the plugin: no orphaned directories, and the layers `cstore
/// pull` unpacked for itself stay as they were.
#[test]
fn containerd_gc_removes_its_snapshots_and_leaves_cstores_own() {
    let addr = registry(false);
    let env = Env::start();
    let image = format!("{addr}/busybox:latest");
    env.cs.ok(&["pull", &image]);
    let own = cstore_snapshots(&env.cs);
    assert_eq!(own.len(), 3, "cstore unpacked busybox's three layers");
    let own_dirs: BTreeMap<String, PathBuf> = own
        .iter()
        .map(|v| (key_of(v), dir_of(&env.cs, &key_of(v))))
        .collect();

    // containerd's own unpack (ctr), shared layers (the CRI path) in a
    // second namespace, and a container.
    env.ctrd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "cstore",
        &image,
    ]);
    env.ctrd.cripull("k8s.io", &image);
    let out = env.ctrd.ctr_run(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "c1",
        "/bin/echo",
        "gc-test",
    ]);
    assert_eq!(out.trim(), "gc-test");
    assert_eq!(env.ctrd.snapshots("default").len(), 3);
    assert_eq!(env.ctrd.snapshots("k8s.io").len(), 3);

    for ns in ["default", "k8s.io"] {
        env.ctrd
            .ctr_ok(&["-n", ns, "image", "rm", "--sync", &image]);
    }
    // Drop the content too; its GC runs the snapshot GC once more.
    env.ctrd.ctr_ok(&["content", "prune", "references"]);
    wait_until(
        "containerd's snapshots to go",
        Duration::from_secs(60),
        || {
            cstore_snapshots(&env.cs)
                .iter()
                .all(|v| !key_of(v).contains('/'))
        },
    );
    assert!(env.ctrd.snapshots("default").is_empty());
    assert!(env.ctrd.snapshots("k8s.io").is_empty());

    let after = assert_no_half_snapshots(&env.cs);
    assert_eq!(after, own, "cstore's own layer snapshots are untouched");
    let after_dirs: BTreeMap<String, PathBuf> = after
        .iter()
        .map(|v| (key_of(v), dir_of(&env.cs, &key_of(v))))
        .collect();
    assert_eq!(after_dirs, own_dirs);
    assert_eq!(
        numbered_dirs(&env.cs),
        own_dirs.values().cloned().collect::<BTreeSet<_>>(),
        "no orphaned snapshot directories"
    );
    let bottom = own.iter().find(|v| v["parent"].is_null()).unwrap();
    assert!(
        own_dirs[&key_of(bottom)].join("fs/bin/busybox").is_file(),
        "the shared layer's files are still there"
    );
}

/// (d) Layers `cstore pull` unpacked are handed to containerd's unpacker
/// (the CRI path) instead of being unpacked again; the image runs.
#[test]
fn containerd_unpacker_shares_layers_cstore_pulled() {
    let addr = registry(false);
    let env = Env::start();
    let image = format!("{addr}/busybox:latest");
    env.cs.ok(&["pull", &image]);
    let before = numbered_dirs(&env.cs);
    assert_eq!(before.len(), 3);

    env.ctrd.cripull("default", &image);
    assert_eq!(
        numbered_dirs(&env.cs),
        before,
        "containerd unpacked nothing: no new snapshot directories"
    );
    let ctr_rows = env.ctrd.snapshots("default");
    let own: BTreeSet<String> = cstore_snapshots(&env.cs)
        .iter()
        .map(key_of)
        .filter(|k| !k.contains('/'))
        .collect();
    let names: BTreeSet<String> = ctr_rows.iter().map(|r| r.0.clone()).collect();
    assert_eq!(names, own, "containerd has every layer, by chain ID");
    assert!(ctr_rows.iter().all(|r| r.2 == "committed"));
    // containerd's names are aliases of cstore's layers: the same directories.
    for v in cstore_snapshots(&env.cs) {
        if let Some(name) = containerd_name("default", &key_of(&v)) {
            assert_eq!(dir_of(&env.cs, &key_of(&v)), dir_of(&env.cs, &name));
        }
    }
    assert_listings_agree(&env, "default");

    let out = env.ctrd.ctr_run(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "shared",
        "/bin/sh",
        "-c",
        "cat /data/layer3.txt >/dev/null && echo shared-layers-run",
    ]);
    assert_eq!(out.trim(), "shared-layers-run");
}

/// The other way round: `cstore rmi` + `cstore gc` drop cstore's own names
/// for layers containerd still uses; the directories stay until containerd
/// removes its names too.
#[test]
fn cstore_gc_keeps_shared_layers_containerd_still_uses() {
    let addr = registry(false);
    let env = Env::start();
    let image = format!("{addr}/busybox:latest");
    env.cs.ok(&["pull", &image]);
    let dirs = numbered_dirs(&env.cs);
    env.ctrd.cripull("default", &image);

    env.cs.ok(&["rmi", &image]);
    let gc: Value = serde_json::from_str(&env.cs.ok(&["gc", "--json"])).unwrap();
    assert_eq!(gc["removed_layer_snapshots"], 3, "{gc}");
    let left = cstore_snapshots(&env.cs);
    assert!(
        left.iter().all(|v| key_of(v).starts_with("default/")),
        "only containerd's names are left: {left:?}"
    );
    assert_eq!(left.len(), 3);
    assert_eq!(numbered_dirs(&env.cs), dirs, "the shared directories stay");
    let out = env.ctrd.ctr_run(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "after-gc",
        "/bin/echo",
        "still-runs",
    ]);
    assert_eq!(out.trim(), "still-runs");

    env.ctrd.ctr_ok(&["image", "rm", "--sync", &image]);
    wait_until("containerd's GC", Duration::from_secs(60), || {
        cstore_snapshots(&env.cs).is_empty()
    });
    assert!(
        numbered_dirs(&env.cs).is_empty(),
        "the last name took the directories: {:?}",
        numbered_dirs(&env.cs)
    );
}

/// List through the gRPC client (a macro: the client's type names tonic,
/// which this crate does not depend on directly).
macro_rules! list {
    ($c:expr, $filters:expr) => {{
        let mut stream = $c
            .list(api::ListSnapshotsRequest {
                snapshotter: "cstore".into(),
                filters: $filters,
            })
            .await
            .unwrap()
            .into_inner();
        let mut out: Vec<api::Info> = Vec::new();
        while let Some(m) = stream.message().await.unwrap() {
            out.extend(m.info);
        }
        out
    }};
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn prepare_req(key: &str, parent: &str, labels: &[(&str, &str)]) -> api::PrepareSnapshotRequest {
    api::PrepareSnapshotRequest {
        snapshotter: "cstore".into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// (d) without containerd: Prepare as containerd 1.6's unpacker sends it
/// through the metadata layer (key `NS/N/extract-… CHAIN`, parent the
/// backend name of the layer below, label snapshot.ref = CHAIN) answers
/// AlreadyExists, and the walk containerd then does finds the shared layer.
#[test]
fn grpc_prepare_with_snapshot_ref_shares_a_layer_cstore_unpacked() {
    let addr = registry(false);
    let dir = tempfile::tempdir().unwrap();
    let cs = Cstore::new();
    cs.ok(&["pull", &format!("{addr}/busybox:latest")]);
    let own = cstore_snapshots(&cs);
    // Bottom-up chain IDs.
    let mut chains: Vec<String> = Vec::new();
    let mut parent: Option<String> = None;
    while let Some(v) = own
        .iter()
        .find(|v| v["parent"].as_str().map(String::from) == parent)
    {
        chains.push(key_of(v));
        parent = Some(key_of(v));
    }
    assert_eq!(chains.len(), 3);
    let dirs_before = numbered_dirs(&cs);
    let sock = dir.path().join("sn.sock");
    let _sn = Snapshotter::start(&cs, &sock, &dir.path().join("sn.log"));

    runtime().block_on(async {
        let mut c = SnapshotsClient::connect(format!("unix://{}", sock.display()))
            .await
            .unwrap();
        let mut parent = String::new();
        for (i, chain) in chains.iter().enumerate() {
            let id = 10 + 2 * i;
            let key = format!("default/{id}/extract-{i}-test {chain}");
            let err = c
                .prepare(prepare_req(&key, &parent, &[(REF_LABEL, chain)]))
                .await
                .expect_err("a layer cstore has is not prepared again");
            assert_eq!(i32::from(err.code()), ALREADY_EXISTS, "{err:?}");
            // What containerd's metadata layer does next.
            let filter = format!("labels.\"{REF_LABEL}\"=={chain},parent=={parent:?}");
            let found = list!(c, vec![filter]);
            assert_eq!(found.len(), 1, "{found:?}");
            let name = found[0].name.clone();
            assert_eq!(name, format!("default/{id}/{chain}"));
            assert_eq!(found[0].labels[REF_LABEL], *chain);
            let st = c
                .stat(api::StatSnapshotRequest {
                    snapshotter: "cstore".into(),
                    key: name.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .info
                .unwrap();
            assert_eq!(st.kind, api::Kind::Committed as i32);
            assert_eq!(st.parent, parent);
            assert_eq!(
                dir_of(&cs, &name),
                dir_of(&cs, chain),
                "an alias, not a copy"
            );
            parent = name;
        }

        // A target that is already a backend name: Stat of the target.
        let target = format!("k8s.io/3/{}", chains[0]);
        let err = c
            .prepare(prepare_req(
                &format!("k8s.io/4/extract-x {}", chains[0]),
                "",
                &[(REF_LABEL, &target)],
            ))
            .await
            .unwrap_err();
        assert_eq!(i32::from(err.code()), ALREADY_EXISTS);
        let st = c
            .stat(api::StatSnapshotRequest {
                snapshotter: "cstore".into(),
                key: target.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(st.kind, api::Kind::Committed as i32);

        // A layer cstore does not have is prepared as usual.
        let unknown = format!("sha256:{}", "0".repeat(64));
        let r = c
            .prepare(prepare_req(
                &format!("default/20/extract-y {unknown}"),
                "",
                &[(REF_LABEL, &unknown)],
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.mounts.len(), 1);

        // cstore's own layers are not listed to containerd (its GC would
        // remove them), but Stat still answers for them.
        let names: BTreeSet<String> = list!(c, vec![]).into_iter().map(|i| i.name).collect();
        assert!(chains.iter().all(|ch| !names.contains(ch)), "{names:?}");
        assert_eq!(
            names.len(),
            5,
            "three aliases, the k8s.io one, the new active"
        );
        c.stat(api::StatSnapshotRequest {
            snapshotter: "cstore".into(),
            key: chains[0].clone(),
        })
        .await
        .unwrap();

        // Removing every alias (top first, as containerd's GC does) leaves
        // cstore's layers and their directories.
        let mut aliases: Vec<String> = names.into_iter().collect();
        aliases.sort_by_key(|n| {
            std::cmp::Reverse(chains.iter().position(|ch| n.ends_with(ch.as_str())))
        });
        for n in aliases {
            c.remove(api::RemoveSnapshotRequest {
                snapshotter: "cstore".into(),
                key: n.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("remove {n}: {e:?}"));
        }
        c.cleanup(api::CleanupRequest {
            snapshotter: "cstore".into(),
        })
        .await
        .unwrap();
    });
    assert_eq!(cstore_snapshots(&cs), own, "cstore's layers are untouched");
    assert_eq!(
        numbered_dirs(&cs),
        dirs_before,
        "no directory added or lost"
    );
}

/// (e) SIGKILL while containerd unpacks debian through the plugin: no half
/// snapshot afterwards, and the pull succeeds when retried.
#[test]
fn sigkill_mid_unpack_leaves_no_half_snapshot_and_the_pull_retries() {
    let addr = registry(true);
    let mut env = Env::start();
    let image = format!("{addr}/debian:bookworm");
    let pull_args = [
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "cstore",
        &image,
    ];
    let mut pull = env
        .ctrd
        .ctr_cmd(&pull_args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // containerd has prepared the layer's snapshot and is writing into it.
    let root = env.cs.path().join("snapshots");
    wait_until(
        "containerd to unpack into a snapshot",
        Duration::from_secs(300),
        || {
            numbered_dirs(&env.cs)
                .iter()
                .any(|d| std::fs::read_dir(d.join("fs")).is_ok_and(|mut r| r.next().is_some()))
                || pull.try_wait().unwrap().is_some()
        },
    );
    env.sn.kill9();
    let out = pull.wait_with_output().unwrap();
    eprintln!(
        "first pull (snapshotter killed mid-unpack): {}, {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );

    // With the snapshotter down, and again once it is back.
    assert_no_half_snapshots(&env.cs);
    env.sn.restart(&env.cs);
    assert_no_half_snapshots(&env.cs);

    env.ctrd.ctr_retry(&pull_args);
    let out = env.ctrd.ctr_run(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "deb",
        "/bin/sh",
        "-c",
        "test -x /usr/bin/apt-get && echo debian-ok",
    ]);
    assert_eq!(out.trim(), "debian-ok");
    assert_no_half_snapshots(&env.cs);

    // GC takes everything back, including what the killed pull left.
    env.ctrd.ctr_ok(&["image", "rm", "--sync", &image]);
    env.ctrd.ctr_ok(&["content", "prune", "references"]);
    wait_until("containerd's GC", Duration::from_secs(60), || {
        cstore_snapshots(&env.cs).is_empty() && numbered_dirs(&env.cs).is_empty()
    });
    let staging: Vec<_> = std::fs::read_dir(root.join("staging")).unwrap().collect();
    assert!(staging.is_empty(), "staging left: {staging:?}");
}

/// (e) SIGKILL in the middle of a stream of Prepare/Commit/Remove calls.
#[test]
fn sigkill_during_prepare_commit_traffic_leaves_no_half_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let cs = Cstore::new();
    let sock = dir.path().join("sn.sock");
    let mut sn = Snapshotter::start(&cs, &sock, &dir.path().join("sn.log"));
    let done = Arc::new(AtomicUsize::new(0));
    let rt = runtime();
    let uri = format!("unix://{}", sock.display());
    let traffic = {
        let (done, uri) = (done.clone(), uri.clone());
        rt.spawn(async move {
            let mut c = SnapshotsClient::connect(uri).await.unwrap();
            let mut parent = String::new();
            for i in 0.. {
                let key = format!("default/{}/extract-{i}", 3 * i);
                if c.prepare(prepare_req(&key, &parent, &[])).await.is_err() {
                    return;
                }
                done.fetch_add(1, Ordering::SeqCst);
                let name = format!("default/{}/layer-{i}", 3 * i + 1);
                let commit = api::CommitSnapshotRequest {
                    snapshotter: "cstore".into(),
                    name: name.clone(),
                    key,
                    labels: Default::default(),
                };
                if c.commit(commit).await.is_err() {
                    return;
                }
                done.fetch_add(1, Ordering::SeqCst);
                let scratch = format!("default/{}/scratch-{i}", 3 * i + 2);
                if c.prepare(prepare_req(&scratch, &name, &[])).await.is_err() {
                    return;
                }
                let rm = api::RemoveSnapshotRequest {
                    snapshotter: "cstore".into(),
                    key: scratch,
                };
                if c.remove(rm).await.is_err() {
                    return;
                }
                done.fetch_add(2, Ordering::SeqCst);
                parent = name;
            }
        })
    };
    wait_until("Prepare/Commit traffic", Duration::from_secs(120), || {
        done.load(Ordering::SeqCst) >= 40
    });
    sn.kill9();
    rt.block_on(traffic).unwrap();
    let before = done.load(Ordering::SeqCst);
    assert!(before >= 40);

    let list = assert_no_half_snapshots(&cs);
    sn.restart(&cs);
    assert_no_half_snapshots(&cs);
    rt.block_on(async {
        let mut c = SnapshotsClient::connect(uri).await.unwrap();
        // containerd's Cleanup removes what the kill orphaned.
        c.cleanup(api::CleanupRequest {
            snapshotter: "cstore".into(),
        })
        .await
        .unwrap();
        // The chain goes on from its last committed layer.
        let top = list
            .iter()
            .filter(|v| v["kind"] == "committed")
            .max_by_key(|v| v["created"].as_u64())
            .map(key_of)
            .expect("some layers were committed before the kill");
        c.prepare(prepare_req("after-restart", &top, &[]))
            .await
            .unwrap();
        c.commit(api::CommitSnapshotRequest {
            snapshotter: "cstore".into(),
            name: "after-restart-layer".into(),
            key: "after-restart".into(),
            labels: Default::default(),
        })
        .await
        .unwrap();
    });
    let list = assert_no_half_snapshots(&cs);
    let listed: BTreeSet<PathBuf> = list.iter().map(|v| dir_of(&cs, &key_of(v))).collect();
    assert_eq!(
        numbered_dirs(&cs),
        listed,
        "no orphaned directories after Cleanup"
    );
}

/// Issue 12, finding 8: a NUL in a key, name or parent is InvalidArgument
/// through the real socket. Before, Prepare of "q\0r" on "p" was indexed
/// as a child of an unrelated snapshot "p\0q", which Remove then refused
/// ("it has children").
#[test]
fn grpc_refuses_nul_in_keys_names_and_parents() {
    const INVALID_ARGUMENT: i32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let cs = Cstore::new();
    let sock = dir.path().join("sn.sock");
    let _sn = Snapshotter::start(&cs, &sock, &dir.path().join("sn.log"));
    runtime().block_on(async {
        let mut c = SnapshotsClient::connect(format!("unix://{}", sock.display()))
            .await
            .unwrap();
        let commit = |name: &str, key: &str| api::CommitSnapshotRequest {
            snapshotter: "cstore".into(),
            name: name.into(),
            key: key.into(),
            labels: Default::default(),
        };
        c.prepare(prepare_req("p-active", "", &[])).await.unwrap();
        c.commit(commit("p", "p-active")).await.unwrap();
        c.prepare(prepare_req("c-active", "p", &[])).await.unwrap();
        // A layer as cstore's unpack names it (its chain ID).
        let chain = format!("sha256:{}", "a".repeat(64));
        c.prepare(prepare_req("l-active", "", &[])).await.unwrap();
        c.commit(commit(&chain, "l-active")).await.unwrap();
        let refused = [
            c.prepare(prepare_req("q\0r", "p", &[])).await.unwrap_err(),
            c.prepare(prepare_req("k", "p\0q", &[])).await.unwrap_err(),
            c.view(api::ViewSnapshotRequest {
                snapshotter: "cstore".into(),
                key: "v\0w".into(),
                parent: "p".into(),
                labels: Default::default(),
            })
            .await
            .unwrap_err(),
            c.commit(commit("c\0x", "c-active")).await.unwrap_err(),
            // The layer-sharing path of Prepare names its alias after the
            // key: "ns\0/1/<chain>" is refused as an alias, then as a key.
            c.prepare(prepare_req(
                &format!("ns\0/1/extract-0 {chain}"),
                "",
                &[(REF_LABEL, &chain)],
            ))
            .await
            .unwrap_err(),
        ];
        for e in refused {
            assert_eq!(i32::from(e.code()), INVALID_ARGUMENT, "{e:?}");
            assert!(e.message().contains("contains a NUL byte"), "{e:?}");
        }
        let names: BTreeSet<String> = list!(c, vec![]).into_iter().map(|i| i.name).collect();
        assert_eq!(
            names,
            BTreeSet::from(["p".into(), "c-active".into(), chain.clone()])
        );
        for key in ["c-active", "p", &chain] {
            c.remove(api::RemoveSnapshotRequest {
                snapshotter: "cstore".into(),
                key: key.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("remove {key}: {e:?}"));
        }
        assert!(list!(c, vec![]).is_empty());
    });
}

// ------------------------------------------------------------------ metrics

/// A Prometheus text exposition as `name{labels}` → value (no HELP/TYPE).
fn scrape(addr: &str) -> BTreeMap<String, f64> {
    crate::harness::http(addr, "GET", "/metrics", None)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (
                k.to_string(),
                v.parse::<f64>().unwrap_or_else(|_| panic!("{l:?}")),
            )
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `--metrics-address`: scraped while containerd pulls and runs through the
/// plugin, the call counters and histograms of the methods containerd used
/// move, the store's size matches `cstore df`, process metrics are there;
/// and `--log-format json` logs every call with method, key, outcome and
/// duration.
#[test]
fn metrics_and_json_logs_of_a_containerd_run() {
    let addr = registry(false);
    // A store holding an image already: its size is what the gauges report.
    let cs = Cstore::new();
    cs.ok(&[
        "pull",
        "--no-unpack",
        &format!("{addr}/busybox:uncompressed"),
    ]);
    let df: Value = serde_json::from_str(&cs.ok(&["df", "--json"])).unwrap();
    let maddr = format!("127.0.0.1:{}", free_port());
    let env = Env::start_with(
        cs,
        &["--log-level", "debug", "--log-format", "json"],
        &["--metrics-address", &maddr],
    );
    let before = scrape(&maddr);
    let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    assert_eq!(
        get(&before, "cstore_store_blob_bytes"),
        df["blob_bytes"].as_f64().unwrap()
    );
    assert_eq!(get(&before, "cstore_store_images"), 1.0);
    assert!(get(&before, "cstore_store_filesystem_avail_bytes") > 0.0);
    assert!(
        get(&before, "process_resident_memory_bytes") > 0.0,
        "{before:?}"
    );
    assert!(get(&before, "process_open_fds") > 0.0);

    let image = format!("{addr}/busybox:latest");
    env.ctrd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "cstore",
        &image,
    ]);
    let out = env.ctrd.ctr_run(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "m1",
        "/bin/echo",
        "metered",
    ]);
    assert_eq!(out.trim(), "metered");
    let after = scrape(&maddr);
    let calls = |m: &BTreeMap<String, f64>, method: &str, outcome: &str| {
        get(
            m,
            &format!("cstore_snapshot_calls_total{{method=\"{method}\",outcome=\"{outcome}\"}}"),
        )
    };
    for method in ["prepare", "commit", "mounts"] {
        assert!(
            calls(&after, method, "ok") > calls(&before, method, "ok"),
            "{method}: {before:?} -> {after:?}"
        );
    }
    // containerd's unpacker asks Stat for layers it may have: NotFound.
    assert!(calls(&after, "stat", "not_found") + calls(&after, "stat", "ok") > 0.0);
    let count = |m: &BTreeMap<String, f64>, method: &str| {
        get(
            m,
            &format!("cstore_snapshot_call_duration_seconds_count{{method=\"{method}\"}}"),
        )
    };
    let ok_and_not = |m: &BTreeMap<String, f64>, method: &str| {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with(&format!("cstore_snapshot_calls_total{{method=\"{method}\""))
            })
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    assert_eq!(count(&after, "prepare"), ok_and_not(&after, "prepare"));
    assert!(
        get(
            &after,
            "cstore_snapshot_call_duration_seconds_sum{method=\"commit\"}"
        ) > 0.0
    );
    assert_eq!(
        get(
            &after,
            "cstore_snapshot_call_duration_seconds_bucket{method=\"commit\",le=\"+Inf\"}"
        ),
        count(&after, "commit")
    );
    // Whole seconds in the prometheus crate: present, maybe still 0.
    assert!(after.contains_key("process_cpu_seconds_total"), "{after:?}");
    assert!(get(&after, "process_start_time_seconds") > 0.0);

    // The daemon's log: one JSON object per line; calls with their fields.
    let log = std::fs::read_to_string(&env.sn.log).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let prepares: Vec<&Value> = lines
        .iter()
        .filter(|e| e["message"] == "snapshot call" && e["method"] == "prepare")
        .collect();
    assert!(!prepares.is_empty(), "{log}");
    for e in &prepares {
        assert!(e["key"].as_str().is_some_and(|k| !k.is_empty()), "{e}");
        assert!(e["duration_ms"].as_f64().is_some(), "{e}");
        assert!(e["outcome"].is_string(), "{e}");
    }
    // ctr run's container snapshot is prepared under the container's name.
    assert!(
        prepares
            .iter()
            .any(|e| e["key"].as_str().unwrap().ends_with("/m1")
                || e["key"].as_str().unwrap().contains("m1")),
        "{log}"
    );
}

/// Lazy layers through `ctr` (#15): `ctr-remote image rpull` (containerd's
/// unpacker with the layer labels, as CRI pulls; plain `ctr image pull`
/// downloads every blob first) gets AlreadyExists for the layer, which
/// containerd never downloads, and `ctr run` starts a container on it while
/// it is still lazy: the snapshotter hands containerd overlays whose lower
/// dir is the layer's FUSE mount, starting the store's lazy daemon. Through a
/// slow, counting proxy only a fraction of the layer is read (Range GETs
/// only) before the container's output. The layer is lazy because `cstore
/// pull --lazy` pulled the image first (`pre_pulled`), or, with `snapshotter
/// serve --lazy`, from the labels ctr-remote puts on the Prepare.
fn ctr_runs_lazily(pre_pulled: bool) {
    let LazyCtr {
        env,
        proxy,
        image,
        layer,
        size,
        _reg,
    } = lazy_ctr_setup(pre_pulled, 1_000_000);
    let blob = env
        .ctrd
        .dir
        .join("root/io.containerd.content.v1.content/blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    assert!(!blob.exists(), "containerd downloaded the lazy layer");
    let log = std::fs::read_to_string(&env.sn.log).unwrap();
    let said = if pre_pulled {
        "layer unpacked by cstore; shared with containerd"
    } else {
        "layer served lazily, index from the registry"
    };
    assert_eq!(log.matches(said).count(), 1, "{log}");

    let out = env.ctrd.ctr_run(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "lazy-1",
        // Programs exec'd by a shell whose libc was mapped before completion.
        "/bin/sh",
        "-c",
        "cat /etc/debian_version && ls /usr/bin >/dev/null && head -n1 /etc/debian_version",
    ]);
    assert!(out.trim().starts_with("12."), "{out}");
    let fetched = proxy.ranged_bytes(&layer);
    assert!(
        fetched > 0 && fetched < size / 2,
        "fetched {fetched} of {size} bytes of {layer} to run the container"
    );
    eprintln!("ctr run printed having fetched {fetched} of {size} bytes of {layer}");
    let lazy = cstore_snapshots(&env.cs)
        .iter()
        .filter(|v| v["labels"]["cstore.io/lazy"].is_string())
        .count();
    assert_eq!(lazy, 1, "the layer is not complete yet");
    assert!(!blob.exists());
    drop(env);
}

/// debian:bookworm with its index pushed from another store, behind a
/// counting proxy that slows its layer to `bps`; containerd with cstore's
/// snapshotter in its mount namespace (where the shims must see the lazy
/// daemon's FUSE mounts), and the image rpulled: lazy because `cstore pull
/// --lazy` pulled it first (`pre_pulled`), or, with `snapshotter serve
/// --lazy`, from the labels ctr-remote puts on the Prepare.
struct LazyCtr {
    // Drop order: containerd and the snapshotter, then the registry.
    env: Env,
    proxy: crate::harness::FaultProxy,
    image: String,
    layer: String,
    size: u64,
    _reg: crate::harness::Registry,
}

fn lazy_ctr_setup(pre_pulled: bool, bps: u64) -> LazyCtr {
    let reg = crate::harness::Registry::start(&[]);
    crate::harness::run_fixture("push.sh", &[&reg.addr, "--debian"]);
    let direct = reg.image("debian:bookworm");
    let indexer = Cstore::new();
    indexer.ok(&["index", "build", &direct]);
    indexer.ok(&["index", "push", &direct]);
    let proxy = crate::harness::FaultProxy::start(&reg.addr);
    let image = format!("{}/debian:bookworm", proxy.addr);

    let cs = Cstore::new();
    if pre_pulled {
        let out = cs.ok(&["pull", "--lazy", &image]);
        assert!(out.contains("1 of 1 layers lazy"), "{out}");
    }
    let rows: Vec<Value> =
        serde_json::from_str(&indexer.ok(&["index", "ls", "--json", &direct])).unwrap();
    let layer = rows[0]["layer"].as_str().unwrap().to_string();
    let size = rows[0]["size"].as_u64().unwrap();
    proxy.set(serde_json::json!([{"match": layer.as_str(), "action": "slow", "bps": bps}]));

    let dir = tempfile::Builder::new()
        .prefix("cstore-containerd-lazy-")
        .tempdir()
        .unwrap();
    let sock = dir.path().join("cstore-snapshotter.sock");
    let ctrd = Containerd::start(&dir.path().join("containerd"), &sock);
    let sn = Snapshotter::start_in_namespace_of(
        ctrd.pid(),
        &cs,
        &sock,
        &dir.path().join("snapshotter.log"),
        &["--log-level", "info"],
        if pre_pulled { &[] } else { &["--lazy"] },
    );
    let env = Env {
        ctrd,
        sn,
        cs,
        _dir: dir,
    };
    let rpull = || {
        Command::new("ctr-remote")
            .arg("--address")
            .arg(&env.ctrd.sock)
            .args(["image", "rpull", "--plain-http", "--snapshotter", "cstore"])
            .arg(&image)
            .stdin(Stdio::null())
            .output()
            .expect("ctr-remote (stargz-snapshotter's ctr)")
    };
    // containerd may have dialled the plugin before it listened: retried
    // while its connection backs off.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = rpull();
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            err.contains("snapshotter.sock") && Instant::now() < deadline,
            "ctr-remote image rpull: {err}\n{}",
            env.ctrd.log_tail()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    LazyCtr {
        env,
        proxy,
        image,
        layer,
        size,
        _reg: reg,
    }
}

#[test]
fn ctr_runs_an_image_cstore_pulled_lazily_before_its_layers_are_complete() {
    ctr_runs_lazily(true);
}

#[test]
fn ctr_remote_rpull_makes_layers_lazy_from_their_labels() {
    ctr_runs_lazily(false);
}

/// #15's kill -9 test through containerd: a container (`ctr run`) on a
/// layer `snapshotter serve --lazy` made lazy from ctr-remote's labels reads
/// every file of it in a loop (a shell: `find | cat`, so exec'd programs
/// too) while the lazy daemon the snapshotter started is killed (-9) five
/// times, the layer fetched at 2 MB/s so that requests are in flight. The
/// store's keeper restarts the daemon each time (outliving it), the
/// container sees no read error, and its loop goes on to the end.
#[test]
fn ctr_container_reads_on_while_the_snapshotters_lazy_daemon_is_killed() {
    use crate::lazy_restart::{alive, daemon_log, read_pid, wait_restarted};
    let LazyCtr {
        env,
        proxy,
        image,
        layer: _,
        size: _,
        _reg,
    } = lazy_ctr_setup(false, 2_000_000);
    let t0 = Instant::now();
    let script = "n=0; while :; do s=0; [ -e /stop ] && s=1; \
        find / -xdev -type f ! -path /stop -exec cat {} + 2>&1 >/dev/null; \
        n=$((n+1)); echo \"pass $n\"; [ $s = 1 ] && break; done";
    let cmd = env.ctrd.ctr_cmd(&[
        "run",
        "--rm",
        "--snapshotter",
        "cstore",
        &image,
        "lazy-kill",
        "/bin/sh",
        "-c",
        script,
    ]);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut cmd = cmd;
    std::thread::spawn(move || {
        let _ = tx.send(cmd.output());
    });
    // The container's init, by containerd's task state.
    let tasks = env.ctrd.dir.join("state/io.containerd.runtime.v2.task");
    let mut task = None;
    wait_until("the container's task", Duration::from_secs(60), || {
        task = std::fs::read_dir(&tasks)
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|ns| std::fs::read_to_string(ns.path().join("lazy-kill/init.pid")).ok())
            .and_then(|p| p.trim().parse::<u32>().ok());
        task.is_some()
    });
    let task = task.unwrap();
    let cs = &env.cs;
    let keeper = read_pid(cs, "keeper.pid").expect("the snapshotter started a keeper");
    let mut pid = read_pid(cs, "daemon.pid").expect("a daemon runs");
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(1500));
        let lazy = cstore_snapshots(cs)
            .iter()
            .filter(|v| v["labels"]["cstore.io/lazy"].is_string())
            .count();
        assert_eq!(lazy, 1, "kill {i}: the layer is still lazy");
        // SAFETY: the store's daemon, by its pid file.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        pid = wait_restarted(cs, pid);
        assert!(alive(keeper), "the keeper outlives its daemon");
    }
    // Full speed for the rest; the loop ends after the pass that sees /stop.
    proxy.set(serde_json::json!([]));
    let killed = t0.elapsed();
    std::fs::write(format!("/proc/{task}/root/stop"), b"").unwrap();
    let out = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the container's loop ended")
        .expect("ctr run");
    let text = stdout_of(&out);
    let errors: Vec<&str> = text.lines().filter(|l| !l.starts_with("pass ")).collect();
    assert!(
        out.status.success() && errors.is_empty(),
        "the container saw errors: {:?}\nstderr: {}\nlazy log:\n{}",
        &errors[..errors.len().min(10)],
        String::from_utf8_lossy(&out.stderr),
        daemon_log(cs)
    );
    let passes = text.lines().filter(|l| l.starts_with("pass ")).count();
    assert!(passes >= 2, "{text}");
    eprintln!(
        "{passes} passes over every file, 5 kill -9 of the lazy daemon, 0 errors; \
         kills done {killed:?} after ctr run, the loop ended after {:?}",
        t0.elapsed()
    );
    drop(env);
}
