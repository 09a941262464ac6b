//! `cstore pull` from registries that want credentials: htpasswd (basic)
//! and bearer tokens from fixtures/tokenserver.py.

mod common;

use std::process::Command;

use common::{fixture, http, shared_registry_addr, Cstore, FaultProxy, Registry};
use serde_json::{json, Value};

const REPO_SCOPE: &str = "repository:busybox:pull";

/// Every blob of the image is in the store, verified, and skopeo reads it.
fn assert_pulled(cs: &Cstore, image: &str) {
    assert!(
        cs.images().iter().any(|i| i["name"] == image),
        "{image} not listed"
    );
    cs.assert_blobs_verified();
    assert!(cs.partials().is_empty());
    cs.assert_skopeo_copies(image);
}

#[test]
fn basic_auth_from_creds_or_docker_config() {
    let reg = Registry::start(&["--htpasswd", "user:pass"]);
    reg.push(Some("user:pass"));
    let image = reg.image("busybox:latest");
    let cs = Cstore::new();

    let err = cs.fail(&["pull", &image]);
    assert!(
        err.contains(&reg.addr)
            && err.contains(REPO_SCOPE)
            && err.contains("authentication required"),
        "{err}"
    );
    let err = cs.fail(&["pull", "--creds", "user:wrong", &image]);
    assert!(
        err.contains(&reg.addr)
            && err.contains(REPO_SCOPE)
            && err.contains("credentials were refused"),
        "{err}"
    );
    assert!(cs.blob_names().is_empty());

    cs.ok(&["pull", "--creds", "user:pass", &image]);
    assert_pulled(&cs, &image);

    // docker login's config.json, in a fresh store.
    let docker = tempfile::tempdir().unwrap();
    let auth = "dXNlcjpwYXNz"; // base64("user:pass")
    let config = serde_json::json!({"auths": {reg.addr.as_str(): {"auth": auth}}});
    std::fs::write(docker.path().join("config.json"), config.to_string()).unwrap();
    let mut cs2 = Cstore::new();
    cs2.env.push((
        "DOCKER_CONFIG".into(),
        docker.path().to_str().unwrap().into(),
    ));
    cs2.ok(&["pull", &image]);
    assert_pulled(&cs2, &image);
}

/// fixtures/tokenauth.sh: a token server and a registry in token mode,
/// stopped on drop.
struct TokenAuth {
    registry: String,
    token: String,
    dir: tempfile::TempDir,
}

impl TokenAuth {
    fn start(users: &str) -> TokenAuth {
        let dir = tempfile::Builder::new()
            .prefix("cstore-tokenauth-")
            .tempdir()
            .unwrap();
        let out = Command::new("bash")
            .arg(fixture("tokenauth.sh"))
            .arg("start")
            .arg(dir.path())
            .args(["--users", users])
            .output()
            .unwrap();
        // Built before checking, so a half-started pair is stopped on drop.
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut addrs = text.split_whitespace().map(String::from);
        let t = TokenAuth {
            registry: addrs.next().unwrap_or_default(),
            token: addrs.next().unwrap_or_default(),
            dir,
        };
        assert!(
            out.status.success() && !t.token.is_empty(),
            "tokenauth.sh start: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    fn stats(&self) -> Value {
        serde_json::from_str(&http(&self.token, "GET", "/stats", None)).unwrap()
    }

    fn reset_stats(&self) {
        http(&self.token, "DELETE", "/stats", None);
    }
}

impl Drop for TokenAuth {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(fixture("tokenauth.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

#[test]
fn bearer_tokens_are_fetched_once_per_scope_and_refusals_are_named() {
    let ta = TokenAuth::start("user:pass");
    let out = Command::new("bash")
        .arg(fixture("push.sh"))
        .args([&ta.registry, "--creds", "user:pass"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "push.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = format!("{}/busybox:latest", ta.registry);

    ta.reset_stats();
    let cs = Cstore::new();
    cs.ok(&["pull", "--creds", "user:pass", &image]);
    assert_pulled(&cs, &image);
    // One token serves the manifest and every blob request.
    let stats = ta.stats();
    assert_eq!(stats["by_scope"][REPO_SCOPE], 1, "{stats}");
    assert_eq!(stats["requests"], 1, "{stats}");
    assert_eq!(stats["by_user"]["user"], 1, "{stats}");

    let cs = Cstore::new();
    let err = cs.fail(&["pull", "--creds", "user:wrong", &image]);
    assert!(
        err.contains(&ta.registry)
            && err.contains(&format!("token server http://{}/token", ta.token))
            && err.contains("refused")
            && err.contains(REPO_SCOPE),
        "{err}"
    );
    assert!(cs.blob_names().is_empty());

    // Started without --anonymous-pull: no anonymous tokens for pulling.
    let err = cs.fail(&["pull", &image]);
    assert!(
        err.contains(&ta.registry)
            && err.contains("authentication required")
            && err.contains(REPO_SCOPE),
        "{err}"
    );
    assert!(cs.blob_names().is_empty());
    assert_eq!(ta.stats()["denied"], 1, "the wrong password was denied");
}

/// The biggest layer of busybox:latest at `addr`.
fn big_layer(addr: &str, creds: &str) -> String {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", "--creds", creds])
        .arg(format!("docker://{addr}/busybox:latest"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap())
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn credentials_go_only_to_the_registry_never_to_where_it_redirects() {
    // A: a registry with basic auth (through a proxy that redirects blob
    // GETs); B: another host (127.0.0.2) serving the same blobs without auth,
    // as blob storage behind presigned URLs does.
    let reg = Registry::start(&["--htpasswd", "alice:s3cret"]);
    reg.push(Some("alice:s3cret"));
    let b = FaultProxy::start_on("127.0.0.2", &shared_registry_addr());
    let a = FaultProxy::start(&reg.addr);
    a.set(json!({"match": "/blobs/", "action": "redirect", "to": format!("http://{}", b.addr)}));
    let image = format!("{}/busybox:latest", a.addr);
    let big = big_layer(&reg.addr, "alice:s3cret");

    // B cuts the big layer off once: the resume asks A again (a fresh
    // redirect) and sends its Range on to B, still without A's credentials.
    b.set(json!({"match": big, "action": "truncate", "after": 300000, "times": 1}));
    let cs = Cstore::new();
    cs.ok(&["pull", "--creds", "alice:s3cret", &image]);
    assert_pulled(&cs, &image);
    let b_log = b.log();
    assert!(
        b_log.iter().all(|e| e["authorization"].is_null()),
        "B received credentials: {b_log:?}"
    );
    assert!(
        b_log
            .iter()
            .any(|e| e["path"].as_str().unwrap().contains(&big)
                && e["range"] == "bytes=300000-"
                && e["status"] == 206),
        "{b_log:?}"
    );
    let a_log = a.log();
    assert!(
        a_log
            .iter()
            .filter(|e| e["status"] == 307)
            .all(|e| e["authorization"]
                .as_str()
                .unwrap_or("")
                .starts_with("Basic ")),
        "{a_log:?}"
    );

    // B now answers with a bearer challenge of its own: it gets nothing of
    // A's (no basic credentials to its realm, no token request at all), and
    // the error names both hosts.
    b.clear();
    let challenge = format!(r#"Bearer realm="http://{}/token",service="b""#, b.addr);
    b.set(json!([
        {"match": "/token", "action": "body", "content_type": "application/json",
         "body": r#"{"token":"b-token","expires_in":300}"#},
        {"match": "/blobs/", "action": "status", "status": 401,
         "headers": {"WWW-Authenticate": challenge}},
    ]));
    let cs = Cstore::new();
    let err = cs.fail(&["pull", "--creds", "alice:s3cret", &image]);
    let b_log = b.log();
    assert!(
        b_log.iter().all(|e| e["authorization"].is_null()),
        "B received credentials: {b_log:?}"
    );
    assert!(
        !b_log
            .iter()
            .any(|e| e["path"].as_str().unwrap().starts_with("/token")),
        "a token was asked of B: {b_log:?}"
    );
    assert!(
        err.contains(&a.addr) && err.contains(&b.addr) && err.contains("redirected"),
        "{err}"
    );
    assert!(!err.contains("credentials were refused"), "{err}");
    assert!(cs.images().is_empty());
    cs.assert_blobs_verified();
}

#[test]
fn a_token_that_never_expires_is_used_not_a_panic() {
    // The registry asks for a token once; the realm (the proxy) hands out one
    // with expires_in = u64::MAX, which once overflowed Instant and panicked.
    let proxy = FaultProxy::start(&shared_registry_addr());
    let challenge = format!(r#"Bearer realm="http://{}/token",service="t""#, proxy.addr);
    proxy.set(json!([
        {"match": "/manifests/", "action": "status", "status": 401,
         "headers": {"WWW-Authenticate": challenge}, "times": 1},
        {"match": "/token", "action": "body", "content_type": "application/json",
         "body": r#"{"token":"t0k","expires_in":18446744073709551615}"#},
    ]));
    let image = format!("{}/busybox:latest", proxy.addr);
    let cs = Cstore::new();
    cs.ok(&["pull", &image]);
    assert_pulled(&cs, &image);
    let log = proxy.log();
    let tokens = log
        .iter()
        .filter(|e| e["path"].as_str().unwrap().starts_with("/token"))
        .count();
    assert_eq!(tokens, 1, "{log:?}");
    // Every request after the challenge carried the token.
    let after: Vec<&Value> = log
        .iter()
        .filter(|e| e["path"].as_str().unwrap().starts_with("/v2/") && e["status"] != 401)
        .collect();
    assert!(after.len() >= 5, "{log:?}");
    assert!(
        after.iter().all(|e| e["authorization"] == "Bearer t0k"),
        "{log:?}"
    );
}
