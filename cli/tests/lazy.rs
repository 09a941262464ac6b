//! Lazy pull (#14) through the CLI, against the real registry on 127.0.0.1:
//! indexes recorded in the unpack pass and kept by `gc` while their layer is.

use std::path::{Path, PathBuf};

use crate::harness::{shared_registry_addr, Cstore};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn blob(cs: &Cstore, digest: &str) -> PathBuf {
    cs.path()
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

pub(crate) fn index_ls(cs: &Cstore, image: &str) -> Vec<Value> {
    serde_json::from_str(&cs.ok(&["index", "ls", "--json", image])).expect("index ls --json")
}

/// The config's diff_ids of a pulled image.
fn diff_ids(cs: &Cstore, image: &str) -> Vec<String> {
    let images = cs.images();
    let img = images
        .iter()
        .find(|i| i["name"] == image)
        .unwrap_or_else(|| panic!("{image} not in {images:?}"));
    let config: Value =
        serde_json::from_slice(&std::fs::read(blob(cs, img["config"].as_str().unwrap())).unwrap())
            .unwrap();
    config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

/// Reads every span of the stored index `ix` of `layer` from the local blob
/// and windows, each verified by the index crate, and returns the sha256 of
/// the whole uncompressed stream they make.
fn stream_through_index(cs: &Cstore, layer: &str, ix: &Value) -> String {
    let bytes = std::fs::read(blob(cs, ix["digest"].as_str().unwrap())).unwrap();
    let idx = cstore_index::Index::parse(bytes.as_slice()).expect("a stored index parses");
    let h = idx.header();
    assert_eq!(h.layer_digest_str(), layer, "the index is of its layer");
    let data = std::fs::read(blob(cs, layer)).unwrap();
    let windows = match ix["windows"].as_str() {
        Some(w) => std::fs::read(blob(cs, w)).unwrap(),
        None => Vec::new(),
    };
    let mut reader = cstore_index::SpanReader::new();
    let mut sha = Sha256::new();
    for i in 0..idx.span_count() {
        let s = idx.span(i);
        let c = &data[s.compressed.start as usize..s.compressed.end as usize];
        let w = s
            .window()
            .map_or(&[][..], |r| &windows[r.start as usize..r.end as usize]);
        sha.update(reader.read_span(&idx, i, c, w).expect("span verifies"));
    }
    format!("sha256:{}", hex::encode(sha.finalize()))
}

fn assert_gone(p: &Path) {
    assert!(!p.exists(), "{} should be gone", p.display());
}

/// `cstore pull` records each gzip or uncompressed layer's index in the unpack
/// pass and stores it with its windows; every span read back through it from
/// the local blob (checked against its digest) makes the layer's diff_id. A
/// single-frame zstd layer gets no index and the pull says so for that layer.
/// `gc` keeps indexes while their layer is referenced; `rmi` frees them.
#[test]
fn unpack_records_each_layers_index_and_gc_keeps_it_with_its_layer() {
    let addr = shared_registry_addr();
    // The uncompressed image has the same diff_ids (so the same snapshots):
    // in one store its layer would be "already unpacked" and not indexed.
    let plain = Cstore::new();
    let cs = Cstore::new();
    let mut kept = Vec::new();
    for (cs, tag) in [(&plain, "busybox:uncompressed"), (&cs, "busybox:latest")] {
        let image = format!("{addr}/{tag}");
        let out = cs.ok(&["pull", &image]);
        assert!(out.contains("indexed ("), "{tag}: pull says so:\n{out}");
        let diffs = diff_ids(cs, &image);
        let rows = index_ls(cs, &image);
        assert_eq!(rows.len(), diffs.len());
        for (row, diff) in rows.iter().zip(&diffs) {
            let layer = row["layer"].as_str().unwrap();
            let ix = &row["index"];
            assert!(ix.is_object(), "{tag}: layer {layer} has an index: {row}");
            assert_eq!(ix["origin"], "unpack");
            assert!(ix["spans"].as_u64().unwrap() >= 1);
            assert!(ix["entries"].as_u64().unwrap() > 3, "{tag}: {row}");
            assert_eq!(&stream_through_index(cs, layer, ix), diff, "{tag}");
            kept.push(blob(cs, ix["digest"].as_str().unwrap()));
            if let Some(w) = ix["windows"].as_str() {
                kept.push(blob(cs, w));
            }
        }
    }
    // zstd as skopeo writes it: one frame, which cannot be entered mid-way.
    let zstd = format!("{addr}/busybox:zstd");
    let z = Cstore::new();
    let out = z.ok(&["pull", &zstd]);
    assert!(
        out.contains("no lazy index: a single zstd frame"),
        "the zstd layer is named as not indexable:\n{out}"
    );
    // Its large layer has none (small ones are one frame no larger than a span).
    let rows = index_ls(&z, &zstd);
    let big = rows
        .iter()
        .max_by_key(|r| r["size"].as_u64().unwrap())
        .unwrap();
    assert!(big["index"].is_null(), "{rows:?}");
    let short = &big["layer"].as_str().unwrap()[7..19];
    assert!(out.contains(&format!("{short}: no lazy index: a single zstd frame")));

    cs.ok(&["gc"]);
    for p in kept.iter().filter(|p| p.starts_with(cs.path())) {
        assert!(p.exists(), "gc kept {} while its layer is", p.display());
    }
    cs.ok(&["rmi", &format!("{addr}/busybox:latest")]);
    plain.ok(&["gc"]);
    assert!(kept
        .iter()
        .all(|p| !p.starts_with(plain.path()) || p.exists()));
    plain.ok(&["rmi", &format!("{addr}/busybox:uncompressed")]);
    for p in &kept {
        assert_gone(p);
    }
    cs.assert_blobs_verified();
    plain.assert_blobs_verified();
}

/// `cstore index build` streams each layer from the registry through the
/// indexer without storing it; `index push` publishes the indexes as an
/// artifact whose subject is the image manifest, through the referrers tag
/// schema (CNCF distribution 2.8 has no referrers API); another store finds
/// them there (`index ls --remote`), each checked against its layer.
#[test]
fn index_build_and_push_from_one_store_are_found_from_another() {
    let reg = crate::harness::Registry::start(&[]);
    reg.push(None);
    let image = reg.image("busybox:latest");
    let a = Cstore::new();
    let out = a.ok(&["index", "build", &image]);
    assert!(out.contains("3 of 3 layers indexed"), "{out}");
    let rows = index_ls(&a, &image);
    for r in &rows {
        assert_eq!(r["index"]["origin"], "build", "{r}");
        let layer = r["layer"].as_str().unwrap();
        assert!(!blob(&a, layer).exists(), "layer {layer} was not stored");
    }
    // The image is recorded (manifest, config, layers), so gc keeps them.
    a.ok(&["gc"]);
    assert_eq!(index_ls(&a, &image), rows, "gc kept the built indexes");

    let out = a.ok(&["index", "push", &image]);
    assert!(out.contains("referrers tag schema"), "{out}");
    let tags = crate::harness::http(&reg.addr, "GET", "/v2/busybox/tags/list", None);
    assert!(tags.contains("\"sha256-"), "the referrers tag: {tags}");

    let b = Cstore::new();
    let remote: Vec<Value> =
        serde_json::from_str(&b.ok(&["index", "ls", "--remote", "--json", &image])).unwrap();
    assert_eq!(remote.len(), rows.len());
    for (r, local) in remote.iter().zip(&rows) {
        assert_eq!(r["layer"], local["layer"]);
        assert!(r["artifact"].is_string(), "{r}");
        assert_eq!(r["entries"], local["index"]["entries"], "{r}");
        assert_eq!(r["spans"], local["index"]["spans"], "{r}");
    }
    // Nothing was published for another image of the same repository.
    let z: Vec<Value> = serde_json::from_str(&b.ok(&[
        "index",
        "ls",
        "--remote",
        "--json",
        &reg.image("busybox:zstd"),
    ]))
    .unwrap();
    assert!(z.iter().all(|r| r["artifact"].is_null()), "{z:?}");
}

/// A fresh registry with the test images (and Debian), stopped on drop.
/// `name` of `reg` with its index built and pushed from another store, and a
/// fault proxy in front: (proxy, the image direct, the image through the proxy).
pub(crate) fn indexed_behind_a_proxy(
    reg: &crate::harness::Registry,
    name: &str,
) -> (crate::harness::FaultProxy, String, String) {
    let direct = reg.image(name);
    let a = Cstore::new();
    a.ok(&["index", "build", &direct]);
    a.ok(&["index", "push", &direct]);
    let proxy = crate::harness::FaultProxy::start(&reg.addr);
    let image = format!("{}/{name}", proxy.addr);
    (proxy, direct, image)
}

/// A fresh registry with the test images and Debian, stopped on drop.
pub(crate) fn registry_with_debian() -> crate::harness::Registry {
    let reg = crate::harness::Registry::start(&[]);
    crate::harness::run_fixture("push.sh", &[&reg.addr, "--debian"]);
    reg
}

/// The snapshots of `cs` still labelled lazy.
pub(crate) fn lazy_snapshots(cs: &Cstore) -> usize {
    let rows: Vec<Value> = serde_json::from_str(&cs.ok(&["snapshots", "--json"])).unwrap();
    rows.iter()
        .filter(|r| r["labels"]["cstore.io/lazy"].is_string())
        .count()
}

/// The store's lazy daemon lets go of its FUSE mounts once its layers are
/// done and unused (after a few seconds); wait for that.
fn wait_unmounted(cs: &Cstore) {
    let root = cs.path().display().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(&root)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the lazy daemon kept its mounts"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn chroot(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("chroot")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "chroot {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Index pushed from one store, `pull --lazy` + `mount --lazy` from another
/// through a slow, counting proxy: a program runs and prints the right output
/// while the layer is still lazy, having fetched a fraction of it; the tree
/// through the lazy mount equals umoci's unpack; background completion turns
/// the layers into ordinary snapshots (a plain mount then works and shows the
/// same tree, and the blobs are in the store, verified).
#[test]
fn pull_lazy_runs_before_the_layers_are_local_and_completes_into_a_normal_pull() {
    let reg = registry_with_debian();
    let (proxy, _direct, image) = indexed_behind_a_proxy(&reg, "debian:bookworm");
    let b = Cstore::new();
    let out = b.ok(&["pull", "--lazy", &image]);
    assert!(out.contains("lazy, index from the registry"), "{out}");
    let layers: Vec<Value> = index_ls(&b, &image);
    let (layer, size) = layers
        .iter()
        .map(|l| {
            (
                l["layer"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .max_by_key(|l| l.1)
        .unwrap();
    // Slow: background completion cannot finish before the program has run.
    proxy.set(serde_json::json!([{"match": layer.as_str(), "action": "slow", "bps": 1_000_000}]));
    let mnt = crate::harness::tree::MountDir::new();
    b.ok(&["mount", "--lazy", &image, mnt.s()]);
    let version = chroot(mnt.path(), &["/bin/cat", "/etc/debian_version"]);
    assert!(version.starts_with("12"), "{version}");
    let listing = chroot(mnt.path(), &["/bin/ls", "/usr/bin"]);
    assert!(listing.contains("dpkg"), "{listing}");
    let fetched = proxy.ranged_bytes(&layer);
    assert!(
        fetched > 0 && fetched < size / 2,
        "fetched {fetched} of {size} bytes to run cat and ls"
    );
    eprintln!("cat + ls on the lazy mount fetched {fetched} of {size} bytes of the layer");
    assert!(lazy_snapshots(&b) > 0, "the layer is not complete yet");

    proxy.clear();
    let got = crate::harness::tree::treesnap(mnt.path());
    let want = crate::harness::tree::umoci_tree("debian");
    assert!(
        got == want,
        "the lazy mount differs from umoci unpack:\n{}",
        crate::harness::tree::tree_diff(&want, &got, "umoci: ", "lazy:  ")
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while lazy_snapshots(&b) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "completion did not end"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    b.ok(&["umount", mnt.s()]);
    // An ordinary committed snapshot now: a plain mount, the same tree.
    b.ok(&["mount", &image, mnt.s()]);
    let plain = crate::harness::tree::treesnap(mnt.path());
    b.ok(&["umount", mnt.s()]);
    assert!(
        plain == want,
        "{}",
        crate::harness::tree::tree_diff(&want, &plain, "umoci: ", "plain: ")
    );
    assert!(
        blob(&b, &layer).exists(),
        "the completed layer's blob joined the store"
    );
    wait_unmounted(&b);
    b.ok(&["gc"]);
    assert!(blob(&b, &layer).exists());
    assert!(
        !b.path().join("lazy").join(&layer[7..]).exists(),
        "gc removed the completed layer's lazy cache"
    );
    b.assert_blobs_verified();
    b.assert_nothing_mounted();
}

/// A layer without any index (zstd as skopeo writes it, nothing pushed) is
/// pulled whole, and `pull --lazy` says so for that layer.
#[test]
fn a_layer_without_an_index_is_pulled_whole_and_said_so() {
    let addr = shared_registry_addr();
    let image = format!("{addr}/busybox:zstd");
    let cs = Cstore::new();
    let out = cs.ok(&["pull", "--lazy", &image]);
    let whole = out
        .lines()
        .filter(|l| l.contains(": pulled whole: no index"))
        .count();
    assert_eq!(whole, 3, "each layer named:\n{out}");
    assert!(out.contains("0 of 3 layers lazy"), "{out}");
    assert_eq!(lazy_snapshots(&cs), 0);
    // Ordinary snapshots: a plain mount works.
    let mnt = crate::harness::tree::MountDir::new();
    cs.ok(&["mount", &image, mnt.s()]);
    assert!(mnt.path().join("bin/busybox").exists());
    cs.ok(&["umount", mnt.s()]);
}

/// An eStargz image (ctr-remote's conversion) goes lazy from its TOC alone,
/// without any cstore index, and its lazy tree equals a plain pull's.
#[test]
fn an_estargz_image_goes_lazy_without_a_cstore_index() {
    let dir = crate::harness::run_fixture("estargz.sh", &[])
        .trim()
        .to_string();
    let addr = shared_registry_addr();
    let image = format!("{addr}/esgz:latest");
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{dir}/esgz:esgz"))
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let lazy = Cstore::new();
    let out = lazy.ok(&["pull", "--lazy", &image]);
    assert!(out.contains("lazy, index from its eStargz TOC"), "{out}");
    let mnt = crate::harness::tree::MountDir::new();
    lazy.ok(&["mount", "--lazy", &image, mnt.s()]);
    let got = crate::harness::tree::treesnap(mnt.path());
    lazy.ok(&["umount", mnt.s()]);
    let plain = Cstore::new();
    plain.ok(&["pull", &image]);
    plain.ok(&["mount", &image, mnt.s()]);
    let want = crate::harness::tree::treesnap(mnt.path());
    plain.ok(&["umount", mnt.s()]);
    assert!(
        got == want,
        "{}",
        crate::harness::tree::tree_diff(&want, &got, "pull: ", "lazy: ")
    );
}

/// An index artifact whose span digests do not match the blob: readers get
/// EIO, and nothing of the layer is committed (the snapshot stays lazy; once
/// the daemon lets it go, a plain mount is refused).
#[test]
fn an_index_lying_about_its_spans_gives_eio_and_commits_nothing() {
    let reg = crate::harness::Registry::start(&[]);
    reg.push(None);
    let image = reg.image("busybox:uncompressed");
    let a = Cstore::new();
    a.ok(&["index", "build", &image]);
    for row in index_ls(&a, &image) {
        let p = blob(&a, row["index"]["digest"].as_str().unwrap());
        let mut bytes = std::fs::read(&p).unwrap();
        let (entries, spans) = {
            let idx = cstore_index::Index::parse(bytes.as_slice()).unwrap();
            (idx.entry_count() as usize, idx.span_count())
        };
        for i in 0..spans {
            bytes[128 + entries * 64 + i * 96 + 16] ^= 0xff;
        }
        std::fs::write(&p, bytes).unwrap();
    }
    a.ok(&["index", "push", &image]);

    let b = Cstore::new();
    b.ok(&["pull", "--lazy", &image]);
    let mnt = crate::harness::tree::MountDir::new();
    b.ok(&["mount", "--lazy", &image, mnt.s()]);
    let e = std::fs::read(mnt.path().join("bin/busybox")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(lazy_snapshots(&b) > 0, "nothing unverified was committed");
    b.ok(&["umount", mnt.s()]);
    // The daemon lets the failed layer go; it stays lazy, and a plain mount
    // (no daemon serving it) is refused rather than showing a partial tree.
    wait_unmounted(&b);
    assert!(lazy_snapshots(&b) > 0);
    let err = b.fail(&["mount", &image, mnt.s()]);
    assert!(err.contains("no daemon serves it"), "{err}");
    b.assert_nothing_mounted();
}

/// `cstore run --lazy` pulls lazily, the store's daemon serves the layers, the
/// container prints its output; the daemon completes the layers and exits,
/// and `ps`, `df` and `gc` see an ordinary image afterwards.
#[test]
fn run_lazy_starts_a_container_from_lazy_layers() {
    let reg = crate::harness::Registry::start(&[]);
    reg.push(None);
    let image = reg.image("busybox:latest");
    let a = Cstore::new();
    a.ok(&["index", "build", &image]);
    a.ok(&["index", "push", &image]);
    let b = Cstore::new();
    let out = b.ok(&[
        "run",
        "--rm",
        "--lazy",
        &image,
        "echo",
        "hello from a lazy image",
    ]);
    assert!(out.contains("hello from a lazy image"), "{out}");
    assert!(out.contains("3 of 3 layers lazy"), "{out}");
    wait_unmounted(&b);
    assert_eq!(lazy_snapshots(&b), 0, "completed by the daemon");
    let ps = b.ok(&["ps", "-a", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&ps).unwrap(),
        serde_json::json!([])
    );
    let df: Value = serde_json::from_str(&b.ok(&["df", "--json"])).unwrap();
    assert_eq!(df["reclaimable_bytes"], 0, "{df}");
    b.ok(&["gc"]);
    b.assert_blobs_verified();
    b.assert_nothing_mounted();
}

/// `run --lazy` reaches the registry with the same settings as `pull --lazy`:
/// credentials from `CSTORE_CREDS` (and `--platform`) go to its lazy pull
/// and to the daemon that fetches the layers' spans, which completes them.
#[test]
fn run_lazy_uses_the_registry_settings_for_its_pull_and_daemon() {
    let reg = crate::harness::Registry::start(&["--htpasswd", "user:pass"]);
    reg.push(Some("user:pass"));
    let image = reg.image("busybox:latest");
    let mut a = Cstore::new();
    a.env.push(("CSTORE_CREDS".into(), "user:pass".into()));
    a.ok(&["index", "build", &image]);
    a.ok(&["index", "push", &image]);

    let mut b = Cstore::new();
    let err = b.fail(&["run", "--rm", "--lazy", &image, "true"]);
    assert!(err.contains("authentication required"), "{err}");
    b.env.push(("CSTORE_CREDS".into(), "user:pass".into()));
    let platform = format!(
        "linux/{}",
        std::env::consts::ARCH
            .replace("x86_64", "amd64")
            .replace("aarch64", "arm64")
    );
    let out = b.ok(&[
        "run",
        "--rm",
        "--lazy",
        "--platform",
        &platform,
        &image,
        "echo",
        "hello with credentials",
    ]);
    assert!(out.contains("hello with credentials"), "{out}");
    assert!(out.contains("3 of 3 layers lazy"), "{out}");
    // Only a daemon holding the credentials can fetch the rest of the layers.
    wait_unmounted(&b);
    assert_eq!(lazy_snapshots(&b), 0, "completed by the daemon");
    b.assert_blobs_verified();
    b.assert_nothing_mounted();
}

/// The lazy rows of `snapshots --json`: (layer digest, lazy_local).
fn lazy_local(cs: &Cstore) -> Vec<(String, Value)> {
    let rows: Vec<Value> = serde_json::from_str(&cs.ok(&["snapshots", "--json"])).unwrap();
    rows.iter()
        .filter(|r| r["labels"]["cstore.io/lazy"].is_string())
        .map(|r| {
            (
                r["labels"]["cstore.io/layer.digest"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                r["lazy_local"].clone(),
            )
        })
        .collect()
}

fn image_row(cs: &Cstore) -> Value {
    let rows: Vec<Value> = serde_json::from_str(&cs.ok(&["images", "--json"])).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows[0].clone()
}

/// `cstore images` and `cstore snapshots` say how much of each lazy layer is
/// local, from the spans the daemon has written: nothing after `pull --lazy`,
/// part of it while the daemon fills the layer in (through a slow proxy),
/// all of it once completed, when the layer is no longer lazy.
#[test]
fn images_and_snapshots_show_how_much_of_each_lazy_layer_is_local() {
    let reg = registry_with_debian();
    let (proxy, _direct, image) = indexed_behind_a_proxy(&reg, "debian:bookworm");
    let b = Cstore::new();
    b.ok(&["pull", "--lazy", &image]);
    let layers = index_ls(&b, &image);
    let total: u64 = layers.iter().map(|l| l["size"].as_u64().unwrap()).sum();
    let img = image_row(&b);
    assert_eq!(img["lazy_layers"], layers.len(), "{img}");
    assert_eq!(img["local_bytes"], 0, "{img}");
    assert_eq!(img["layer_bytes"], total, "{img}");
    let text = b.ok(&["images"]);
    assert!(
        text.contains("LOCAL") && text.contains("0% (1 lazy layer)"),
        "{text}"
    );
    let rows = lazy_local(&b);
    assert_eq!(rows.len(), layers.len(), "{rows:?}");
    let (layer, size) = layers
        .iter()
        .map(|l| (l["layer"].as_str().unwrap(), l["size"].as_u64().unwrap()))
        .max_by_key(|l| l.1)
        .unwrap();
    for (_, local) in &rows {
        assert_eq!(local["bytes"], 0, "{local}");
        assert_eq!(local["spans"], 0, "{local}");
        assert!(local["total_spans"].as_u64().unwrap() > 1, "{local}");
    }
    let text = b.ok(&["snapshots"]);
    assert!(
        text.contains("LAZY: LOCAL") && text.contains("0% (0 B of "),
        "{text}"
    );

    // Slow: the daemon fills the layer in batches of spans, seconds apart.
    proxy.set(serde_json::json!([{"match": layer, "action": "slow", "bps": 1_000_000}]));
    let mnt = crate::harness::tree::MountDir::new();
    b.ok(&["mount", "--lazy", &image, mnt.s()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let partial = loop {
        let rows = lazy_local(&b);
        let big = rows.iter().map(|r| &r.1).find(|l| l["total_bytes"] == size);
        if let Some(l) = big {
            let got = l["bytes"].as_u64().unwrap();
            if got > 0 && got < size {
                break got;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never partly local: {rows:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let img = image_row(&b);
    let now = img["local_bytes"].as_u64().unwrap();
    assert!(now >= partial && now < total, "{img} (partial {partial})");
    assert_eq!(img["lazy_layers"], 1, "{img}");

    proxy.clear();
    b.ok(&["umount", mnt.s()]);
    // Completion verifies the whole layer (a debug build, a busy machine).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while lazy_snapshots(&b) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "not completed: {:?}\ndaemon log:\n{}",
            lazy_local(&b),
            std::fs::read_to_string(b.path().join("lazy/daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    wait_unmounted(&b);
    let img = image_row(&b);
    assert_eq!(img["lazy_layers"], 0, "{img}");
    assert_eq!(img["local_bytes"], total, "{img}");
    let text = b.ok(&["images"]);
    assert!(text.contains("100%"), "{text}");
    b.assert_nothing_mounted();
}

/// FUSE mount points under `root` (live or dead).
fn fuse_mounts_under(root: &Path) -> Vec<String> {
    let root = format!("{}/", root.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" - fuse"))
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&root))
        .map(str::to_string)
        .collect()
}

fn lazy_pid(cs: &Cstore, file: &str) -> i32 {
    std::fs::read_to_string(cs.path().join("lazy").join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

fn alive(pid: i32) -> bool {
    // A zombie (its parent, the keeper, gone too) counts as dead.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// The store deleted under its running lazy daemon, as a test's temp root is
/// (recursively, stopping at the first busy mount point): the daemon and its
/// keeper notice, unmount the layers' FUSE mounts and the overlay cstore
/// stacked on them, and exit, rather than dying on the deleted database and
/// leaving dead `fuse.cstore` entries behind.
#[test]
fn a_deleted_store_takes_its_lazy_mounts_with_it() {
    let reg = crate::harness::Registry::start(&[]);
    reg.push(None);
    let (proxy, _direct, image) = indexed_behind_a_proxy(&reg, "busybox:latest");
    let b = Cstore::new();
    let out = b.ok(&["pull", "--lazy", &image]);
    assert!(out.contains("3 of 3 layers lazy"), "{out}");
    // Slow: the layers are still lazy, the daemon busy, when the store goes.
    proxy.set(serde_json::json!([{"match": "/blobs/", "action": "slow", "bps": 20_000}]));
    let mnt = crate::harness::tree::MountDir::new();
    b.ok(&["mount", "--lazy", &image, mnt.s()]);
    let root = b.path().to_path_buf();
    assert_eq!(
        fuse_mounts_under(&root).len(),
        3,
        "one FUSE mount per layer"
    );
    let (keeper, daemon) = (lazy_pid(&b, "keeper.pid"), lazy_pid(&b, "daemon.pid"));
    assert!(alive(keeper) && alive(daemon));

    // Held open: the log is deleted with the store, and says what happened.
    let mut log = std::fs::File::open(root.join("lazy/daemon.log")).unwrap();
    // What tempfile's TempDir does on drop, errors ignored.
    let _ = std::fs::remove_dir_all(&root);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = fuse_mounts_under(&root);
        let overlay = crate::harness::tree::is_mountpoint(mnt.path());
        if left.is_empty() && !overlay && !alive(keeper) && !alive(daemon) {
            break;
        }
        if std::time::Instant::now() > deadline {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut log, &mut text);
            panic!(
                "30 s after the store was deleted: FUSE mounts {left:?}, overlay mounted \
                 {overlay}, keeper alive {}, daemon alive {}; its log:\n{text}",
                alive(keeper),
                alive(daemon)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The harness's store teardown, on a test that ends while the store's lazy
/// daemon still serves (its layers incomplete, the overlay unmounted): the
/// keeper and the daemon are stopped and their FUSE mounts unmounted before
/// the root is deleted, and that is not a failure (the daemon would have let
/// go of them itself). A mount the test left otherwise fails it, after the
/// teardown unmounted it.
#[test]
fn store_teardown_stops_the_lazy_daemon_and_fails_on_leaked_mounts() {
    let reg = crate::harness::Registry::start(&[]);
    reg.push(None);
    let (proxy, _direct, image) = indexed_behind_a_proxy(&reg, "busybox:latest");
    let b = Cstore::new();
    b.ok(&["pull", "--lazy", &image]);
    proxy.set(serde_json::json!([{"match": "/blobs/", "action": "slow", "bps": 20_000}]));
    let mnt = crate::harness::tree::MountDir::new();
    b.ok(&["mount", "--lazy", &image, mnt.s()]);
    b.ok(&["umount", mnt.s()]);
    let root = b.path().to_path_buf();
    assert_eq!(fuse_mounts_under(&root).len(), 3);
    let (keeper, daemon) = (lazy_pid(&b, "keeper.pid"), lazy_pid(&b, "daemon.pid"));
    drop(b);
    assert!(
        !alive(keeper) && !alive(daemon),
        "keeper and daemon stopped"
    );
    assert_eq!(fuse_mounts_under(&root), Vec::<String>::new());
    assert!(!root.exists(), "the root was deleted");

    // A leak: a tmpfs under the root that nothing unmounted.
    let c = Cstore::new();
    let leak = c.path().join("leak");
    std::fs::create_dir(&leak).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&leak)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs: {st}");
    let root = c.path().to_path_buf();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(c)));
    let msg = r
        .expect_err("a leaked mount fails the test")
        .downcast::<String>()
        .unwrap();
    assert!(msg.contains(&*leak.to_string_lossy()), "{msg}");
    assert!(
        !crate::harness::tree::is_mountpoint(&leak),
        "and it was unmounted"
    );
    assert!(!root.exists(), "the root was deleted");
}

/// `skopeo inspect --raw` of `image` (docker://, plain HTTP).
fn raw_manifest(image: &str) -> Vec<u8> {
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo inspect {image}: {out:?}");
    out.stdout
}

/// The index artifact `cstore index push` published for `repo:tag` of the
/// registry at `addr`, found through the referrers tag schema.
fn index_artifact(addr: &str, repo: &str, tag: &str) -> Value {
    let subject = hex::encode(Sha256::digest(raw_manifest(&format!(
        "{addr}/{repo}:{tag}"
    ))));
    let referrers: Value =
        serde_json::from_slice(&raw_manifest(&format!("{addr}/{repo}:sha256-{subject}"))).unwrap();
    let art = referrers["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|m| m["artifactType"] == cstore_index::ARTIFACT_TYPE)
        .unwrap_or_else(|| panic!("no index artifact for {repo}:{tag}: {referrers}"));
    let digest = art["digest"].as_str().unwrap();
    serde_json::from_slice(&raw_manifest(&format!("{addr}/{repo}@{digest}"))).unwrap()
}

/// The blobs of `repo` GET through `proxy`, with the bytes each was asked for.
fn blob_gets(proxy: &crate::harness::FaultProxy, repo: &str) -> Vec<(String, u64)> {
    let prefix = format!("/v2/{repo}/blobs/");
    proxy
        .log()
        .iter()
        .filter(|e| e["method"] == "GET")
        .filter_map(|e| {
            let d = e["path"].as_str()?.strip_prefix(&prefix)?.to_string();
            Some((d.clone(), proxy.ranged_bytes(&d)))
        })
        .collect()
}

/// `index push` publishes each layer's index zstd-compressed
/// (`…layer-index.v1+zstd`, several times smaller than the index), and
/// `pull --lazy` fetches each index blob once, whole and compressed, and
/// only for the layers it does not have: after busybox, an image of
/// busybox's three layers and one more costs the index of the new layer
/// alone. (The artifact was read whole for every layer before: every
/// index uncompressed, and all of an image's indexes as soon as one layer
/// needed one.)
#[test]
fn pull_lazy_fetches_compressed_indexes_once_and_only_for_missing_layers() {
    let reg = crate::harness::Registry::start(&[]);
    reg.push(None);
    // busybox:plus = busybox's layers + one (a file of its own).
    let work = tempfile::tempdir().unwrap();
    let layout = format!("{}:plus", work.path().join("oci").display());
    crate::harness::tree::run(
        std::process::Command::new("skopeo")
            .args(["copy", "-q"])
            .arg(format!(
                "oci:{}:busybox",
                crate::harness::tree::oci_dir().display()
            ))
            .arg(format!("oci:{layout}")),
    );
    let file = work.path().join("plus.txt");
    std::fs::write(&file, "one more layer\n".repeat(1000)).unwrap();
    crate::harness::tree::run(
        std::process::Command::new("umoci")
            .args(["insert", "--image", &layout])
            .arg(&file)
            .arg("/plus.txt"),
    );
    crate::harness::tree::run(
        std::process::Command::new("skopeo")
            .args([
                "copy",
                "-q",
                "--dest-tls-verify=false",
                "--preserve-digests",
            ])
            .arg(format!("oci:{layout}"))
            .arg(format!("docker://{}", reg.image("busybox:plus"))),
    );
    let a = Cstore::new();
    for tag in ["busybox:latest", "busybox:plus"] {
        a.ok(&["index", "build", &reg.image(tag)]);
        a.ok(&["index", "push", &reg.image(tag)]);
    }
    // Per layer, its index blob in each artifact: all compressed.
    let mut index_blobs = std::collections::HashMap::new();
    for tag in ["latest", "plus"] {
        let art = index_artifact(&reg.addr, "busybox", tag);
        let blobs = art["layers"].as_array().unwrap();
        assert!(
            blobs
                .iter()
                .all(|b| b["mediaType"] != cstore_index::MEDIA_TYPE),
            "an uncompressed index in {art}"
        );
        for b in blobs
            .iter()
            .filter(|b| b["mediaType"] == cstore_index::PACKED_MEDIA_TYPE)
        {
            let layer = b["annotations"]["io.cstore.layer.digest"].as_str().unwrap();
            index_blobs.insert(
                layer.to_string(),
                (
                    b["digest"].as_str().unwrap().to_string(),
                    b["size"].as_u64().unwrap(),
                ),
            );
        }
    }
    assert_eq!(index_blobs.len(), 4, "{index_blobs:?}");

    let proxy = crate::harness::FaultProxy::start(&reg.addr);
    let b = Cstore::new();
    let latest = format!("{}/busybox:latest", proxy.addr);
    let out = b.ok(&["pull", "--lazy", &latest]);
    assert_eq!(
        out.matches("lazy, index from the registry").count(),
        3,
        "{out}"
    );
    let gets = blob_gets(&proxy, "busybox");
    let rows = index_ls(&b, &latest);
    for r in &rows {
        let layer = r["layer"].as_str().unwrap();
        let (packed, size) = &index_blobs[layer];
        let n = gets.iter().filter(|(d, _)| d == packed).count();
        assert_eq!(
            n, 1,
            "index {packed} of {layer} fetched {n} times: {gets:?}"
        );
        assert_eq!(proxy.ranged_bytes(packed), *size, "{layer}: fetched whole");
        // Stored as the index itself, which the compressed blob is a
        // fraction of.
        let raw = std::fs::metadata(blob(&b, r["index"]["digest"].as_str().unwrap()))
            .unwrap()
            .len();
        assert!(
            raw >= 2 * size,
            "{layer}: index of {raw} bytes published as {size}"
        );
        eprintln!("{layer}: index {raw} bytes, fetched {size}");
    }

    proxy.clear();
    let plus = format!("{}/busybox:plus", proxy.addr);
    let out = b.ok(&["pull", "--lazy", &plus]);
    assert_eq!(
        out.matches("lazy, index from the registry").count(),
        1,
        "{out}"
    );
    let gets = blob_gets(&proxy, "busybox");
    let fetched: Vec<&String> = index_blobs
        .values()
        .map(|(d, _)| d)
        .filter(|d| gets.iter().any(|(g, _)| g == *d))
        .collect();
    let new_layer = index_ls(&b, &plus)
        .last()
        .unwrap()
        .get("layer")
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        fetched,
        vec![&index_blobs[&new_layer].0],
        "only the new layer's index: {gets:?}"
    );
    b.assert_blobs_verified();
}

/// `index build --span-kib N` sets the compressed bytes per span: a layer
/// indexed with 16 KiB spans has more of them than with the default 128, each
/// no larger than N KiB plus one deflate block's worth, and the layer still
/// streams through the index to its diff_id; a size outside 16..=8192 is
/// refused, naming the option.
#[test]
fn index_build_span_kib_sets_the_span_size() {
    let addr = shared_registry_addr();
    let image = format!("{addr}/busybox:latest");
    let (small, default) = (Cstore::new(), Cstore::new());
    small.ok(&["index", "build", "--span-kib", "16", &image]);
    default.ok(&["index", "build", &image]);
    let (s, d) = (index_ls(&small, &image), index_ls(&default, &image));
    let big = |rows: &[Value]| -> Value {
        rows.iter()
            .max_by_key(|r| r["size"].as_u64().unwrap())
            .unwrap()
            .clone()
    };
    let (bs, bd) = (big(&s), big(&d));
    let (ns, nd) = (
        bs["index"]["spans"].as_u64().unwrap(),
        bd["index"]["spans"].as_u64().unwrap(),
    );
    assert!(ns > 2 * nd, "16 KiB spans: {ns}, 128 KiB spans: {nd}");
    let ix = &bs["index"];
    let bytes = std::fs::read(blob(&small, ix["digest"].as_str().unwrap())).unwrap();
    let idx = cstore_index::Index::parse(bytes.as_slice()).unwrap();
    assert_eq!(idx.header().span_target, 16 << 10);
    let err = small.fail(&["index", "build", "--span-kib", "4", &image]);
    assert!(err.contains("--span-kib 4"), "{err}");
}

/// The spans recorded in `cs`'s access trace of `layer` (u32 little-endian).
fn recorded_trace(cs: &Cstore, layer: &str) -> Vec<u32> {
    let p = cs.path().join("lazy").join(&layer[7..]).join("cache/trace");
    std::fs::read(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Access traces travel with the index: a lazy run in one store records which
/// spans it read, `index push` publishes them with the index, and a fresh
/// store's lazy mount fetches exactly those spans (counted at the proxy, in
/// the registry's log) before anything reads the mount; the same program
/// then runs there.
#[test]
fn a_pushed_access_trace_is_prefetched_by_a_fresh_stores_lazy_mount() {
    let reg = registry_with_debian();
    let proxy = crate::harness::FaultProxy::start(&reg.addr);
    let image = format!("{}/debian:bookworm", proxy.addr);
    // Store a: its own index, a lazy mount, a program run on it (recorded).
    let a = Cstore::new();
    a.ok(&["index", "build", &image]);
    let rows = index_ls(&a, &image);
    let (layer, ix) = rows
        .iter()
        .max_by_key(|r| r["size"].as_u64().unwrap())
        .map(|r| (r["layer"].as_str().unwrap().to_string(), r["index"].clone()))
        .unwrap();
    a.ok(&["pull", "--lazy", &image]);
    let mnt = crate::harness::tree::MountDir::new();
    a.ok(&["mount", "--lazy", &image, mnt.s()]);
    let version = chroot(mnt.path(), &["/bin/cat", "/etc/debian_version"]);
    assert!(version.starts_with("12"), "{version}");
    let trace = recorded_trace(&a, &layer);
    assert!(!trace.is_empty(), "the run recorded no spans");
    let out = a.ok(&["index", "push", &image]);
    assert!(out.contains("1 access traces"), "{out}");
    a.ok(&["umount", mnt.s()]);

    // Store b: the index and the trace from the registry, a mount nothing reads.
    let b = Cstore::new();
    let out = b.ok(&["pull", "--lazy", &image]);
    assert!(out.contains("lazy, index from the registry"), "{out}");
    let bytes = std::fs::read(blob(&a, ix["digest"].as_str().unwrap())).unwrap();
    let idx = cstore_index::Index::parse(bytes.as_slice()).unwrap();
    let want: std::collections::BTreeSet<u32> = trace.iter().copied().collect();
    let covered = |ranges: &[std::ops::Range<u64>], s: u32| {
        let c = idx.span(s as usize).compressed;
        ranges.iter().any(|r| r.start <= c.start && c.end <= r.end)
    };
    proxy.clear();
    let mnt_b = crate::harness::tree::MountDir::new();
    b.ok(&["mount", "--lazy", &image, mnt_b.s()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let ranges = loop {
        let r = proxy.ranges_of(&layer);
        if want.iter().all(|&s| covered(&r, s)) {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the traced spans {want:?} were not prefetched: {r:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // Every request until then was for traced spans (or the daemon's one-byte
    // warm-up): nothing read the mount, and background completion comes after.
    for r in ranges.iter().filter(|r| **r != (0..1)) {
        let spans: Vec<u32> = (0..idx.span_count() as u32)
            .filter(|&s| {
                let c = idx.span(s as usize).compressed;
                c.start < r.end && r.start < c.end
            })
            .collect();
        assert!(
            spans.iter().any(|s| want.contains(s)),
            "request {r:?} (spans {spans:?}) is not for a traced span {want:?}"
        );
    }
    let version = chroot(mnt_b.path(), &["/bin/cat", "/etc/debian_version"]);
    assert!(version.starts_with("12"), "{version}");
    b.ok(&["umount", mnt_b.s()]);
}
