//! `cstore pull` from registries that want credentials: htpasswd (basic)
//! and bearer tokens from fixtures/tokenserver.py.

mod common;

use std::process::Command;

use common::{fixture, http, Cstore, Registry};
use serde_json::Value;

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
