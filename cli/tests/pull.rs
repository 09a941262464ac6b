//! `cstore pull` and the store commands against a real registry (CNCF
//! distribution) holding images built with umoci and pushed with skopeo; the
//! oracle is skopeo reading the result back out of cstore's OCI layout.

mod common;

use common::{shared_registry_addr, Cstore, Registry};
use serde_json::Value;

fn manifest_of(cs: &Cstore, name: &str) -> Value {
    let img = cs
        .images()
        .into_iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed"));
    let hex = img["manifest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    serde_json::from_slice(&std::fs::read(cs.path().join("blobs/sha256").join(hex)).unwrap())
        .unwrap()
}

fn pull_json(cs: &Cstore, args: &[&str]) -> Value {
    let mut a = vec!["pull", "--json"];
    a.extend_from_slice(args);
    let out = cs.ok(&a);
    // The pull's result, among the events (an unpack's follow it).
    let v: Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "pulled")
        .unwrap_or_else(|| panic!("no pulled event in {out}"));
    v["result"].clone()
}

#[test]
fn pulls_every_media_type_and_skopeo_reads_them_back() {
    let addr = shared_registry_addr();
    let cs = Cstore::new();
    let tags = [
        "busybox:latest",
        "busybox:docker",
        "busybox:zstd",
        "busybox:uncompressed",
        "multi:latest",
    ];
    for t in tags {
        cs.ok(&["pull", &format!("{addr}/{t}")]);
    }
    cs.assert_blobs_verified();
    assert!(cs.partials().is_empty());
    let names: Vec<String> = cs
        .images()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    let mut want: Vec<String> = tags.iter().map(|t| format!("{addr}/{t}")).collect();
    want.sort();
    assert_eq!(names, want);

    let layer_types = |name: &str| -> Vec<String> {
        manifest_of(&cs, &format!("{addr}/{name}"))["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["mediaType"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(layer_types("busybox:zstd")
        .iter()
        .all(|t| t.ends_with("tar+zstd")));
    assert!(layer_types("busybox:uncompressed")
        .iter()
        .all(|t| t == "application/vnd.oci.image.layer.v1.tar"));
    assert!(layer_types("busybox:docker")
        .iter()
        .all(|t| t == "application/vnd.docker.image.rootfs.diff.tar.gzip"));
    assert_eq!(
        manifest_of(&cs, &format!("{addr}/busybox:docker"))["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    // The multi-platform ref resolves to the index; the store keeps the index
    // blob too, and the host's manifest is the one index.json points at.
    let multi = cs
        .images()
        .into_iter()
        .find(|i| i["name"] == format!("{addr}/multi:latest"))
        .unwrap();
    assert_ne!(multi["digest"], multi["manifest"]);
    assert_eq!(multi["platform"], "linux/amd64");
    let index: Value =
        serde_json::from_slice(&std::fs::read(cs.path().join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), tags.len());

    // skopeo's OCI layout reader only takes OCI media types, so the Docker
    // schema2 image (stored byte for byte as pulled) is checked above instead.
    for t in [
        "busybox:latest",
        "busybox:zstd",
        "busybox:uncompressed",
        "multi:latest",
    ] {
        cs.assert_skopeo_copies(&format!("{addr}/{t}"));
    }
}

#[test]
fn a_second_pull_is_instant_and_says_so() {
    let addr = shared_registry_addr();
    let cs = Cstore::new();
    let r = format!("{addr}/busybox:latest");
    let first = pull_json(&cs, &[&r]);
    assert_eq!(first["up_to_date"], false);
    assert_eq!(first["layers"], 3);
    assert!(first["fetched_bytes"].as_u64().unwrap() > 1_000_000);
    let before = cs.blob_names();
    let second = pull_json(&cs, &[&r]);
    assert_eq!(second["up_to_date"], true);
    assert_eq!(second["fetched_bytes"], 0);
    assert_eq!(second["digest"], first["digest"]);
    assert_eq!(cs.blob_names(), before);
    let text = cs.ok(&["pull", &r]);
    assert!(text.contains("up to date"), "{text}");
    // Docker-style short names for the same repository share blobs.
    let again = pull_json(&cs, &[&format!("{addr}/busybox:docker")]);
    assert_eq!(
        again["cached_blobs"], 4,
        "config and 3 layers are the same blobs: {again}"
    );
}

#[test]
fn an_image_pinned_by_digest_needs_no_registry_once_held() {
    let reg = Registry::start(&[]);
    reg.push(None);
    let cs = Cstore::new();
    let by_tag = pull_json(&cs, &[&reg.image("busybox:latest")]);
    let pinned = format!(
        "{}/busybox@{}",
        reg.addr,
        by_tag["digest"].as_str().unwrap()
    );
    let first = pull_json(&cs, &[&pinned]);
    assert_eq!(first["fetched_bytes"], 0, "all blobs were held");
    assert_eq!(first["reference"], pinned);
    reg.stop();
    let offline = pull_json(&cs, &[&pinned]);
    assert_eq!(offline["up_to_date"], true);
    // By tag the registry must be asked whether the tag moved: that fails
    // cleanly, naming the registry.
    let err = cs.fail(&["pull", &reg.image("busybox:latest")]);
    assert!(err.contains(&reg.addr), "{err}");
    cs.assert_blobs_verified();
}

#[test]
fn platform_selection_from_an_index() {
    let addr = shared_registry_addr();
    let cs = Cstore::new();
    let arm = pull_json(
        &cs,
        &["--platform", "linux/arm64", &format!("{addr}/multi:latest")],
    );
    assert_eq!(arm["platform"]["architecture"], "arm64");
    let img = &cs.images()[0];
    assert_eq!(img["platform"], "linux/arm64");
    let config_hex = img["config"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let config: Value = serde_json::from_slice(
        &std::fs::read(cs.path().join("blobs/sha256").join(config_hex)).unwrap(),
    )
    .unwrap();
    assert_eq!(config["architecture"], "arm64");

    let err = cs.fail(&[
        "pull",
        "--platform",
        "linux/s390x",
        &format!("{addr}/multi:latest"),
    ]);
    assert!(
        err.contains("linux/s390x") && err.contains("linux/amd64") && err.contains("linux/arm64"),
        "{err}"
    );
    let err = cs.fail(&[
        "pull",
        "--platform",
        "linux",
        &format!("{addr}/multi:latest"),
    ]);
    assert!(err.contains("invalid platform \"linux\""), "{err}");
}

#[test]
fn rmi_removes_only_what_the_image_alone_held() {
    let addr = shared_registry_addr();
    let cs = Cstore::new();
    let (latest, zstd) = (
        format!("{addr}/busybox:latest"),
        format!("{addr}/busybox:zstd"),
    );
    cs.ok(&["pull", &latest]);
    let only_latest = cs.blob_names();
    cs.ok(&["pull", &zstd]);
    let config = cs.images()[0]["config"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();

    let out = cs.ok(&["rmi", &zstd]);
    assert!(out.contains("removed") && out.contains(&zstd), "{out}");
    assert_eq!(
        cs.blob_names(),
        only_latest,
        "exactly the zstd image's own blobs are gone"
    );
    assert!(cs.blob_names().contains(&config), "the shared config stays");
    cs.assert_skopeo_copies(&latest);

    let err = cs.fail(&["rmi", &zstd]);
    assert!(
        err.contains(&zstd) && err.contains("not in the store"),
        "{err}"
    );
    cs.ok(&["rmi", &latest]);
    assert!(cs.blob_names().is_empty());
    let index: Value =
        serde_json::from_slice(&std::fs::read(cs.path().join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 0);
}

#[test]
fn gc_removes_orphans_and_abandoned_partials_and_df_counts_them() {
    let addr = shared_registry_addr();
    let cs = Cstore::new();
    cs.ok(&["pull", &format!("{addr}/busybox:latest")]);
    let held = cs.blob_names();
    // A blob renamed into place by a pull killed before it recorded it, and a
    // partial download nobody is writing.
    let orphan = b"orphan blob";
    let orphan_hex = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(orphan))
    };
    std::fs::write(cs.path().join("blobs/sha256").join(&orphan_hex), orphan).unwrap();
    std::fs::write(
        cs.path()
            .join("ingest")
            .join(format!("{}.partial", "ab".repeat(32))),
        vec![1u8; 4096],
    )
    .unwrap();

    let df: Value = serde_json::from_str(&cs.ok(&["df", "--json"])).unwrap();
    assert_eq!(df["images"], 1);
    assert_eq!(df["ingest_bytes"], 4096);
    assert_eq!(
        df["reclaimable_bytes"], 0,
        "every recorded blob is referenced"
    );
    let sizes: u64 = held
        .iter()
        .map(|h| {
            std::fs::metadata(cs.path().join("blobs/sha256").join(h))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(df["blob_bytes"].as_u64().unwrap(), sizes);

    let gc: Value = serde_json::from_str(&cs.ok(&["gc", "--json"])).unwrap();
    assert_eq!(gc["removed_blobs"], 1);
    assert_eq!(gc["removed_bytes"], orphan.len());
    assert_eq!(gc["removed_partials"], 1);
    assert_eq!(cs.blob_names(), held);
    assert!(cs.partials().is_empty());
    cs.assert_blobs_verified();
}

#[test]
fn bad_references_are_refused_by_name() {
    let cs = Cstore::new();
    let err = cs.fail(&["pull", "Not/A:Valid:Ref"]);
    assert!(
        err.contains("invalid image reference \"Not/A:Valid:Ref\""),
        "{err}"
    );
    let err = cs.fail(&["pull", "busybox@sha256:1234"]);
    assert!(err.contains("invalid digest \"sha256:1234\""), "{err}");
    let err = cs.fail(&["rmi", "127.0.0.1:1/nothing:here"]);
    assert!(
        err.contains("127.0.0.1:1/nothing:here is not in the store"),
        "{err}"
    );
}

/// The digest of `platform`'s manifest in the index `addr/multi:latest`.
fn multi_child(addr: &str, architecture: &str) -> String {
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{addr}/multi:latest"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index: Value = serde_json::from_slice(&out.stdout).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == architecture)
        .unwrap_or_else(|| panic!("no {architecture} in {index}"))["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_single_manifest_for_another_platform_is_refused() {
    let addr = shared_registry_addr();
    // The index's arm64 child, asked for by digest: a single manifest, whose
    // config alone says what it runs on.
    let arm = format!("{addr}/multi@{}", multi_child(&addr, "arm64"));
    let cs = Cstore::new();
    let err = cs.fail(&["pull", "--no-unpack", "--platform", "linux/amd64", &arm]);
    assert!(
        err.contains(&arm) && err.contains("linux/arm64") && err.contains("linux/amd64"),
        "{err}"
    );
    assert!(cs.images().is_empty(), "recorded: {:?}", cs.images());
    cs.assert_blobs_verified();
    assert!(cs.partials().is_empty(), "{:?}", cs.partials());

    // Asked for its own platform it is pulled, and listed as what it is.
    let ok = pull_json(&cs, &["--no-unpack", "--platform", "linux/arm64", &arm]);
    assert_eq!(ok["platform"]["architecture"], "arm64");
    assert_eq!(cs.images()[0]["platform"], "linux/arm64");
    // The amd64 one, by digest for the host's platform, is pulled too.
    let amd = format!("{addr}/multi@{}", multi_child(&addr, "amd64"));
    cs.ok(&["pull", "--no-unpack", "--platform", "linux/amd64", &amd]);
    let listed: Vec<Value> = cs
        .images()
        .into_iter()
        .filter(|i| i["name"] == amd.as_str())
        .collect();
    assert_eq!(listed[0]["platform"], "linux/amd64");
}

/// `fixtures/craft-config.py ADDR busybox latest TAG FLAGS...`: busybox with
/// a changed config under a new tag.
fn craft(addr: &str, tag: &str, flags: &[&str]) -> String {
    let mut args = vec![addr, "busybox", "latest", tag];
    args.extend_from_slice(flags);
    let out = std::process::Command::new("python3")
        .arg(common::fixture("craft-config.py"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{addr}/busybox:{tag}")
}

#[test]
fn configs_that_can_never_work_are_refused_at_pull() {
    let reg = Registry::start(&[]);
    reg.push(None);
    let cs = Cstore::new();

    for (tag, flag, configs) in [
        ("extra-diff-id", "--extra-diff-id", 4),
        ("fewer-diff-ids", "--drop-diff-id", 2),
    ] {
        let image = craft(&reg.addr, tag, &[flag]);
        let err = cs.fail(&["pull", &image]);
        assert!(
            err.contains(&image)
                && err.contains("3 layers")
                && err.contains(&format!("{configs} diff_ids")),
            "{err}"
        );
        assert!(cs.images().is_empty(), "{tag} recorded: {:?}", cs.images());
    }

    // A 40 MiB config: refused from its descriptor, with its own limit's
    // words (not the manifests'), before a byte of it is fetched.
    let big = craft(&reg.addr, "big-config", &["--pad", &(40 << 20).to_string()]);
    let err = cs.fail(&["pull", &big]);
    assert!(
        err.contains(&big)
            && err.contains("config")
            && err.contains(&format!("{} byte limit for image configs", 8 << 20))
            && !err.contains("manifests"),
        "{err}"
    );
    assert!(cs.images().is_empty(), "recorded: {:?}", cs.images());
    let sizes: Vec<u64> = std::fs::read_dir(cs.path().join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    assert!(sizes.iter().all(|s| *s < 8 << 20), "{sizes:?}");
    cs.assert_blobs_verified();

    // The same store pulls the real image afterwards.
    cs.ok(&["pull", &reg.image("busybox:latest")]);
    assert_eq!(cs.images().len(), 1);
}
