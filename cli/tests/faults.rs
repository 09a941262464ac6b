//! `cstore pull` through fixtures/faultproxy.py in front of a real registry:
//! corrupt, truncated, dropped, refused, redirected and oversized answers, a
//! full disk, SIGKILL mid-pull and two pulls racing. Every case checks that
//! the error names what failed and that the store stays consistent: every
//! file under blobs/ hashes to its name, and a later clean pull works and
//! skopeo reads the image back.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::harness::{shared_registry_addr, Cstore, FaultProxy};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The blobs of busybox:latest in the shared registry.
struct Busybox {
    manifest: String,
    config: String,
    /// (digest, size), in manifest order.
    layers: Vec<(String, u64)>,
}

impl Busybox {
    /// The ~1 MiB busybox-static layer.
    fn big(&self) -> &str {
        &self.layers.iter().max_by_key(|(_, s)| *s).unwrap().0
    }

    fn all(&self) -> Vec<String> {
        let mut v = vec![self.manifest.clone(), self.config.clone()];
        v.extend(self.layers.iter().map(|(d, _)| d.clone()));
        v
    }
}

fn busybox() -> &'static Busybox {
    static B: OnceLock<Busybox> = OnceLock::new();
    B.get_or_init(|| {
        let addr = shared_registry_addr();
        let out = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{addr}/busybox:latest"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo inspect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m: Value = serde_json::from_slice(&out.stdout).unwrap();
        let layers: Vec<(String, u64)> = m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["digest"].as_str().unwrap().to_string(),
                    l["size"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(layers.len(), 3);
        assert!(layers.iter().any(|(_, s)| *s > 1_000_000));
        Busybox {
            manifest: format!("sha256:{}", hex::encode(Sha256::digest(&out.stdout))),
            config: m["config"]["digest"].as_str().unwrap().to_string(),
            layers,
        }
    })
}

fn hex_of(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

/// A fault proxy in front of the shared registry, a fresh store whose
/// retries back off for only 20 ms, and the image reference via the proxy.
fn setup() -> (FaultProxy, Cstore, String) {
    let proxy = FaultProxy::start(&shared_registry_addr());
    let mut cs = Cstore::new();
    cs.env.push(("CSTORE_RETRY_BACKOFF_MS".into(), "20".into()));
    let image = format!("{}/busybox:latest", proxy.addr);
    (proxy, cs, image)
}

/// Proxy log entries for GETs of one blob (direct or redirected).
fn blob_gets(proxy: &FaultProxy, digest: &str) -> Vec<Value> {
    proxy
        .log()
        .into_iter()
        .filter(|e| e["method"] == "GET")
        .filter(|e| {
            let p = e["path"].as_str().unwrap_or("");
            p.split('?')
                .next()
                .unwrap()
                .ends_with(&format!("/blobs/{digest}"))
        })
        .collect()
}

fn has_blob(cs: &Cstore, digest: &str) -> bool {
    cs.path().join("blobs/sha256").join(hex_of(digest)).exists()
}

fn partial_path(cs: &Cstore, digest: &str) -> PathBuf {
    cs.path()
        .join("ingest")
        .join(format!("{}.partial", hex_of(digest)))
}

fn listed(cs: &Cstore, image: &str) -> bool {
    cs.images().iter().any(|i| i["name"] == image)
}

/// Without faults the same store pulls the image whole, and skopeo reads it.
fn assert_recovers(cs: &Cstore, proxy: &FaultProxy, image: &str) {
    proxy.clear();
    cs.ok(&["pull", image]);
    cs.assert_blobs_verified();
    assert!(
        cs.partials().is_empty(),
        "partials left: {:?}",
        cs.partials()
    );
    for d in busybox().all() {
        assert!(has_blob(cs, &d), "{d} missing after a clean pull");
    }
    assert!(listed(cs, image), "{image} not listed");
    cs.assert_skopeo_copies(image);
}

#[test]
fn a_corrupted_layer_is_refused_and_never_stored() {
    let (proxy, cs, image) = setup();
    let big = busybox().big();
    proxy.set(json!({"match": big, "action": "corrupt", "at": 1000}));
    let err = cs.fail(&["pull", &image]);
    assert!(err.contains(big) && err.contains("verification"), "{err}");
    assert!(
        !has_blob(&cs, big),
        "the corrupted blob landed under blobs/"
    );
    // Its bytes can never become the blob, so they are not kept to resume
    // from. (Downloads the failure cancelled may keep theirs: they resume.)
    assert!(
        !partial_path(&cs, big).exists(),
        "the corrupted download was kept: {:?}",
        cs.partials()
    );
    cs.assert_blobs_verified();
    assert!(!listed(&cs, &image));
    assert_recovers(&cs, &proxy, &image);
}

#[test]
fn a_truncated_layer_resumes_with_a_range_request() {
    let (proxy, cs, image) = setup();
    let big = busybox().big();
    proxy.set(json!({"match": big, "action": "truncate", "after": 300000, "times": 1}));
    cs.ok(&["pull", &image]);
    let gets = blob_gets(&proxy, big);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0]["fault"], "truncate");
    assert_eq!(gets[1]["range"], "bytes=300000-", "{gets:?}");
    assert_eq!(gets[1]["status"], 206);
    cs.assert_blobs_verified();
    assert!(cs.partials().is_empty());
    cs.assert_skopeo_copies(&image);
}

#[test]
fn a_dropped_connection_is_retried() {
    let (proxy, cs, image) = setup();
    let big = busybox().big();
    proxy.set(json!({"match": big, "action": "close", "times": 1}));
    cs.ok(&["pull", &image]);
    let gets = blob_gets(&proxy, big);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0]["fault"], "close");
    assert_eq!(gets[1]["status"], 200);
    cs.assert_blobs_verified();
    cs.assert_skopeo_copies(&image);
}

/// A pull the proxy's rule makes fail before any blob is fetched: the
/// error says each phrase ("{proxy}" and "{image}" stand for the proxy's
/// address and the image's reference).
type Refusal = (Value, &'static [&'static str]);

/// Each refusal in turn on one store: the pull fails saying what it must,
/// nothing is stored; the proxy saw `requests` requests in all, if given;
/// then, without faults, the same store pulls the image whole.
fn refused_before_any_blob(refusals: Vec<Refusal>, requests: Option<usize>) {
    let (proxy, cs, image) = setup();
    for (rule, says) in refusals {
        proxy.set(rule.clone());
        let err = cs.fail(&["pull", &image]);
        for phrase in says {
            let phrase = phrase
                .replace("{proxy}", &proxy.addr)
                .replace("{image}", &image);
            assert!(err.contains(&phrase), "{rule}: {phrase:?} in {err}");
        }
        assert!(cs.blob_names().is_empty(), "{rule}: {:?}", cs.blob_names());
    }
    if let Some(n) = requests {
        assert_eq!(proxy.log().len(), n, "{:?}", proxy.log());
    }
    assert_recovers(&cs, &proxy, &image);
}

/// One test per row: `name { rule => phrases, ... } [requests: n];`.
macro_rules! refusals {
    ($($(#[doc = $doc:literal])* $name:ident { $($rule:expr => $says:expr),+ $(,)? } $(requests: $n:expr)?;)+) => {$(
        $(#[doc = $doc])*
        #[test]
        fn $name() {
            let requests: Option<usize> = None $(.or(Some($n)))?;
            refused_before_any_blob(vec![$(($rule, &$says[..])),+], requests);
        }
    )+};
}

fn manifest_status(status: u16) -> Value {
    json!({"match": "/manifests/", "action": "status", "status": status})
}

fn manifest_body(content_type: &str, body: &str) -> Value {
    json!({"match": "/manifests/", "action": "body", "content_type": content_type, "body": body})
}

fn schema1() -> String {
    json!({
        "schemaVersion": 1, "name": "busybox", "tag": "latest", "architecture": "amd64",
        "fsLayers": [{"blobSum": busybox().big()}],
        "history": [{"v1Compatibility": "{}"}],
        "signatures": []
    })
    .to_string()
}

const ARTIFACT: &str = "application/vnd.example.artifact.v1+json";

refusals! {
    a_missing_manifest_is_named {
        manifest_status(404) => ["manifest {proxy}/busybox@latest not found"],
    };
    a_forbidden_repository_is_denied_by_scope {
        manifest_status(403) => ["{proxy}", "repository:busybox:pull", "denied"],
    };
    a_401_without_a_challenge_asks_for_authentication {
        manifest_status(401) => ["{proxy}", "authentication required", "repository:busybox:pull"],
    };
    /// Retries must not multiply (they once did: 5 x 5 requests).
    a_manifest_failing_with_500_is_asked_for_once_per_attempt {
        manifest_status(500) => ["manifest {proxy}/busybox@latest", "HTTP 500"],
    } requests: 5;
    an_oversized_manifest_is_refused_with_or_without_a_length {
        json!({"match": "/manifests/", "action": "bigmanifest", "size": 5 << 20, "no_length": false})
            => ["manifest {proxy}/busybox@latest", "larger than the 4194304 byte limit"],
        json!({"match": "/manifests/", "action": "bigmanifest", "size": 5 << 20, "no_length": true})
            => ["manifest {proxy}/busybox@latest", "larger than the 4194304 byte limit"],
    };
    /// Schema 1; an HTML page (a captive portal, a misconfigured proxy) is
    /// no manifest; a document of a media type cstore does not pull (an
    /// artifact).
    schema1_and_unknown_manifests_are_refused {
        manifest_body("application/vnd.docker.distribution.manifest.v1+prettyjws", &schema1())
            => ["{image}", "schema 1 manifests are not supported"],
        manifest_body("text/html", "<html><body>Please log in</body></html>")
            => ["manifest {proxy}/busybox@latest", "not a manifest or index"],
        manifest_body(ARTIFACT, &json!({"schemaVersion": 2, "mediaType": ARTIFACT}).to_string())
            => ["{image}", "unsupported media type \"application/vnd.example.artifact.v1+json\""],
    };
}

#[test]
fn too_many_requests_is_waited_out() {
    let (proxy, cs, image) = setup();
    proxy.set(
        json!({"match": "/manifests/", "action": "status", "status": 429,
                     "headers": {"Retry-After": "0"}, "times": 2}),
    );
    cs.ok(&["pull", &image]);
    let statuses: Vec<Value> = proxy
        .log()
        .iter()
        .filter(|e| e["path"].as_str().unwrap().contains("/manifests/"))
        .map(|e| e["status"].clone())
        .collect();
    assert_eq!(statuses, vec![json!(429), json!(429), json!(200)]);
    cs.assert_blobs_verified();
    cs.assert_skopeo_copies(&image);
}

#[test]
fn a_blob_failing_with_500_gives_up_after_the_attempts() {
    let (proxy, cs, image) = setup();
    let big = busybox().big();
    proxy.set(json!({"match": big, "action": "status", "status": 500}));
    let err = cs.fail(&["pull", &image]);
    assert!(
        err.contains(&proxy.addr) && err.contains(big) && err.contains("HTTP 500"),
        "{err}"
    );
    // The client's default: 5 attempts per request.
    assert_eq!(blob_gets(&proxy, big).len(), 5);
    assert!(!has_blob(&cs, big));
    cs.assert_blobs_verified();
    assert_recovers(&cs, &proxy, &image);
}

#[test]
fn redirected_blobs_are_followed() {
    let (proxy, cs, image) = setup();
    proxy.set(json!({"match": "/blobs/", "action": "redirect"}));
    cs.ok(&["pull", &image]);
    let b = busybox();
    for d in std::iter::once(&b.config).chain(b.layers.iter().map(|(d, _)| d)) {
        let gets = blob_gets(&proxy, d);
        assert!(
            gets.iter().any(|e| e["status"] == 307)
                && gets.iter().any(|e| {
                    e["status"] == 200 && e["path"].as_str().unwrap().starts_with("/__redirected/")
                }),
            "{d}: {gets:?}"
        );
    }
    cs.assert_blobs_verified();
    assert!(cs.partials().is_empty());
    cs.assert_skopeo_copies(&image);
}

/// A tmpfs mounted over a directory, lazily unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Shrink (or grow) it to `size` bytes.
    fn resize(&self, size: u64) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success(), "remount tmpfs to {size} bytes");
    }

    fn used(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=used"])
            .arg(&self.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_cleanly_and_gives_the_space_back() {
    // The Debian image's one 51 MB layer, on a store with 8 MiB to spare:
    // far more room than the metadata database's own ups and downs need
    // (redb grows and shrinks its file by pages), far less than the layer.
    let reg = crate::harness::Registry::start(&[]);
    crate::harness::run_fixture("push.sh", &[&reg.addr, "--debian"]);
    let proxy = FaultProxy::start(&reg.addr);
    let mut cs = Cstore::new();
    cs.env.push(("CSTORE_RETRY_BACKOFF_MS".into(), "20".into()));
    let image = format!("{}/debian:bookworm", proxy.addr);
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/debian:bookworm", reg.addr))
        .output()
        .unwrap();
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap().to_string();
    let config = m["config"]["digest"].as_str().unwrap().to_string();

    let tmpfs = Tmpfs::mount(cs.path(), "128m");
    cs.ok(&["images"]);
    tmpfs.resize(tmpfs.used() + (8 << 20));
    // Keep the config in flight when the layer runs out of space: the
    // failure cancels it, and its partial must not stay either.
    proxy.set(json!({"match": config, "action": "slow", "bps": 100}));
    let err = cs.fail(&["pull", &image]);
    assert!(
        err.to_lowercase().contains("no space left") && err.contains(&layer),
        "{err}"
    );
    assert!(
        cs.partials().is_empty(),
        "partials hold the full disk: {:?}",
        cs.partials()
    );
    assert!(!has_blob(&cs, &layer));
    cs.assert_blobs_verified();
    // The proxy logs a request when it is done with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while blob_gets(&proxy, &config).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the config was never requested"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The store still works, and holds no trace of the image.
    assert!(!listed(&cs, &image));
}

#[test]
fn sigkill_at_any_point_leaves_a_consistent_store_that_resumes() {
    let (proxy, cs, image) = setup();
    let big = busybox().big();
    // 200 kB/s: the 1 MiB layer takes 5 s, longer than all the runs below.
    proxy.set(json!({"match": big, "action": "slow", "bps": 200000}));
    for delay in [50, 300, 800, 1500] {
        let mut child = cs
            .cmd(&["pull", &image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        cs.assert_blobs_verified();
        assert!(!has_blob(&cs, big), "killed after {delay} ms");
        assert!(!listed(&cs, &image), "killed after {delay} ms");
    }
    // What the killed pulls had received is on disk, not lost in a buffer.
    let held = std::fs::metadata(partial_path(&cs, big))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(held > 0, "the killed pulls left nothing to resume from");

    proxy.clear();
    cs.ok(&["pull", &image]);
    // (The killed pulls' requests are logged as the proxy notices.)
    let gets: Vec<Value> = blob_gets(&proxy, big)
        .into_iter()
        .filter(|e| e["fault"].is_null())
        .collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(gets[0]["range"], format!("bytes={held}-"));
    assert_eq!(gets[0]["status"], 206);
    assert!(listed(&cs, &image));
    cs.assert_blobs_verified();
    assert!(cs.partials().is_empty());

    let gc: Value = serde_json::from_str(&cs.ok(&["gc", "--json"])).unwrap();
    assert!(
        gc["expired_leases"].as_u64().unwrap() >= 1,
        "the dead pulls' leases: {gc}"
    );
    assert_eq!(gc["removed_blobs"], 0, "{gc}");
    cs.assert_skopeo_copies(&image);
}

#[test]
fn sigkill_while_a_new_store_is_created_leaves_it_usable() {
    let proxy = FaultProxy::start(&shared_registry_addr());
    let image = format!("{}/busybox:latest", proxy.addr);
    // The first tens of ms of a pull into a fresh root create the store:
    // directories, oci-layout, meta.db (redb's initialization alone takes
    // tens of ms). A kill in there once left a meta.db that never opened.
    for delay in [5, 15, 25, 40] {
        let cs = Cstore::new();
        let mut child = cs
            .cmd(&["pull", &image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap();
        child.wait().unwrap();
        let out = cs.run(&["images", "--json"]);
        assert!(
            out.status.success(),
            "killed after {delay} ms, the store no longer opens: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cs.assert_blobs_verified();
    }
}

#[test]
fn two_concurrent_pulls_fetch_each_blob_once() {
    let (proxy, cs, image) = setup();
    let big = busybox().big();
    proxy.set(json!({"match": big, "action": "slow", "bps": 2_000_000}));
    let children: Vec<_> = (0..2)
        .map(|_| {
            cs.cmd(&["pull", &image])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut want: Vec<String> = busybox()
        .all()
        .iter()
        .map(|d| hex_of(d).to_string())
        .collect();
    want.sort();
    assert_eq!(cs.pulled_blob_names(), want);
    cs.assert_blobs_verified();
    assert!(cs.partials().is_empty());
    let full: Vec<Value> = blob_gets(&proxy, big)
        .into_iter()
        .filter(|e| e["range"].is_null())
        .collect();
    assert_eq!(
        full.len(),
        1,
        "the big layer was fetched whole more than once: {full:?}"
    );
    assert_eq!(cs.images().len(), 1);
    cs.assert_skopeo_copies(&image);
}

/// Run a pull that must fail with exit code `want` (its error's kind, see
/// README); its stderr and the peak memory it used (KiB).
fn fail_measured(cs: &Cstore, image: &str, want: i32) -> (String, u64) {
    let (code, _, err, rss) = cs.outcome_with_peak_rss(&["pull", "--no-unpack", image]);
    // An error reported, of its kind; not a panic (101) nor killed (-1).
    assert_eq!(code, want, "{err}");
    (err, rss)
}

#[test]
fn endless_bodies_are_cut_off_at_their_caps() {
    // Each body is 256 MiB ("endless" to a client that reads it whole); a
    // capped reader stops after KiBs or a MiB, and the process stays small.
    const ENDLESS: u64 = 256 << 20;
    const MAX_RSS_KIB: u64 = 96 << 10;
    let (proxy, cs, image) = setup();
    let endless = |status: u16, prefix: &str| {
        json!({"action": "endless", "status": status, "bytes": ENDLESS, "prefix": prefix,
               "content_type": "application/json"})
    };
    let with_match = |mut rule: Value, m: &str| {
        rule["match"] = json!(m);
        rule
    };
    let sent = |proxy: &FaultProxy, path: &str| -> u64 {
        proxy
            .log()
            .iter()
            .filter(|e| e["path"].as_str().unwrap().contains(path))
            .filter_map(|e| e["sent"].as_u64())
            .max()
            .unwrap_or(0)
    };

    // A 404 whose error body never ends.
    proxy.set(with_match(
        endless(404, r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":""#),
        "/manifests/",
    ));
    let (err, rss) = fail_measured(&cs, &image, 65);
    assert!(
        err.contains(&format!("manifest {}/busybox@latest not found", proxy.addr)),
        "{err}"
    );
    assert!(rss < MAX_RSS_KIB, "peak RSS {rss} KiB reading a 404's body");
    assert!(
        sent(&proxy, "/manifests/") < ENDLESS,
        "the whole body was read"
    );

    // Token responses that never end, granted (200) or refused (401).
    let realm = format!("http://{}/token", proxy.addr);
    let challenge = format!(r#"Bearer realm="{realm}",service="t""#);
    for status in [200, 401] {
        proxy.clear();
        proxy.set(json!([
            {"match": "/manifests/", "action": "status", "status": 401,
             "headers": {"WWW-Authenticate": challenge}},
            with_match(endless(status, r#"{"token":""#), "/token"),
        ]));
        // Over the cap: resource exhausted; refused: unauthenticated.
        let want = if status == 200 { 71 } else { 70 };
        let (err, rss) = fail_measured(&cs, &image, want);
        assert!(err.contains(&realm), "{status}: {err}");
        if status == 200 {
            assert!(err.contains("1048576 byte limit"), "{err}");
        }
        assert!(
            rss < MAX_RSS_KIB,
            "peak RSS {rss} KiB reading a {status} token body"
        );
        assert!(sent(&proxy, "/token") < ENDLESS, "the whole body was read");
    }

    // A blob longer than its descriptor, chunked, never ending: cut at the
    // descriptor's size.
    proxy.clear();
    let big = busybox().big();
    proxy.set(with_match(endless(200, ""), big));
    let (err, rss) = fail_measured(&cs, &image, 67);
    assert!(
        err.contains(big) && err.contains("descriptor says"),
        "{err}"
    );
    assert!(
        rss < MAX_RSS_KIB,
        "peak RSS {rss} KiB reading an endless blob"
    );
    assert!(!has_blob(&cs, big));
    assert!(cs.images().is_empty());
    cs.assert_blobs_verified();
    assert_recovers(&cs, &proxy, &image);
}
