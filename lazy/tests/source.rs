//! `RegistrySource` against the real registry (CNCF distribution on
//! 127.0.0.1): every span of a layer fetched by range verifies against an
//! index built from the same blob, and the spans make the layer's diff_id.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use cstore_fuse_fs::layer::{build_index, SpanSource};
use cstore_lazy::source::{RegistrySource, Windows};
use cstore_registry::{ClientOptions, Reference, RegistryClient};
use sha2::{Digest, Sha256};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

struct Registry {
    addr: String,
    state: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let state = tempfile::tempdir().unwrap();
        let out = Command::new("bash")
            .arg(repo().join("fixtures/registry.sh"))
            .args(["start", state.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let addr = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let out = Command::new("bash")
            .arg(repo().join("fixtures/push.sh"))
            .arg(&addr)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        Registry { addr, state }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("fixtures/registry.sh"))
            .args(["stop", self.state.path().to_str().unwrap()])
            .output();
    }
}

/// busybox's largest gzip layer in the fixtures' OCI layout (what push.sh
/// pushed byte for byte): (digest, blob path).
fn busybox_layer() -> (String, PathBuf) {
    let oci = Path::new("/var/tmp/cstore-fixtures/oci");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(oci.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "busybox")
        .expect("the busybox fixture");
    let blob = |d: &str| oci.join("blobs/sha256").join(&d[7..]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(m["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    let l = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap())
        .unwrap();
    let d = l["digest"].as_str().unwrap().to_string();
    let p = blob(&d);
    (d, p)
}

#[test]
fn spans_fetched_by_range_verify_and_make_the_diff_id() {
    let reg = Registry::start();
    let (digest, path) = busybox_layer();
    let (index, windows) = build_index(
        &path,
        cstore_index::Compression::Gzip,
        cstore_index::Policy {
            // Small spans: many ranged requests from one small layer.
            span_target: 16 << 10,
            ..Default::default()
        },
        cstore_index::TreeOptions::default(),
    )
    .unwrap();
    let idx = cstore_index::Index::parse(index.as_slice()).unwrap();
    assert!(idx.span_count() > 10, "{} spans", idx.span_count());
    let tmp = tempfile::tempdir().unwrap();
    let wpath = tmp.path().join("windows");
    std::fs::write(&wpath, &windows).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = Arc::new(
        RegistryClient::new(ClientOptions {
            docker_config: false,
            ..Default::default()
        })
        .unwrap(),
    );
    let reference: Reference = format!("{}/busybox:latest", reg.addr).parse().unwrap();
    let src = RegistrySource::new(
        client.clone(),
        rt.handle().clone(),
        reference.clone(),
        cstore_registry::parse_digest(&digest).unwrap(),
        Windows::Local(std::fs::File::open(&wpath).unwrap()),
    );
    let mut reader = cstore_index::SpanReader::new();
    let mut sha = Sha256::new();
    let mut want_bytes = 0;
    for i in 0..idx.span_count() {
        let s = idx.span(i);
        want_bytes += s.compressed.end - s.compressed.start;
        let c = src.fetch(s.compressed.clone()).unwrap();
        let w = match s.window() {
            Some(r) => src.fetch_windows(r).unwrap(),
            None => Vec::new(),
        };
        sha.update(reader.read_span(&idx, i, &c, &w).unwrap());
    }
    assert_eq!(
        format!("sha256:{}", hex::encode(sha.finalize())),
        idx.header().diff_id_str()
    );
    // Windows came from the local file: the registry saw only span bytes.
    assert_eq!(src.bytes_fetched(), want_bytes);

    // A range past the blob's end is an error naming the image, not a short read.
    let size = std::fs::metadata(&path).unwrap().len();
    let e = src.fetch(size - 10..size + 10).unwrap_err().to_string();
    assert!(e.contains("busybox"), "{e}");
    // A blob the registry does not have: an error, no bytes.
    let missing = RegistrySource::new(
        client,
        rt.handle().clone(),
        reference,
        cstore_registry::parse_digest(&format!("sha256:{}", "0".repeat(64))).unwrap(),
        Windows::None,
    );
    assert!(missing.fetch(0..10).is_err());
    assert!(missing.fetch_windows(0..10).is_err());
}
