//! Registry hosts in containerd's hosts.toml format and docker credential
//! helpers, against real peers: a second CNCF distribution as a pull-through
//! cache (`proxy.remoteurl`) in front of the upstream (its access log proves
//! the pull went through it; stopped, pulls fall back), a mirror served
//! under a path prefix (`override_path`), a registry over TLS with a CA and
//! client certificates made by openssl here, and a helper script.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{run_fixture, FaultProxy, Registry};
use serde_json::Value;

fn hosts_dir(registry: &str, toml: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join(registry)).unwrap();
    std::fs::write(d.path().join(registry).join("hosts.toml"), toml).unwrap();
    d
}

fn log_of(r: &Registry) -> String {
    std::fs::read_to_string(r.state.path().join("registry.log")).unwrap()
}

/// Requests cstore itself made (its user agent) in a registry's access log.
fn cstore_requests(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("\"cstore/")).collect()
}

fn pull(cs: &crate::harness::Cstore, hosts: &Path, image: &str) -> (i32, String, String) {
    cs.outcome(&[
        "--log-format",
        "json",
        "pull",
        "--hosts-dir",
        hosts.to_str().unwrap(),
        image,
    ])
}

/// The config and layers of the one image pulled: every blob but its manifest.
fn blobs_of(cs: &crate::harness::Cstore) -> Vec<String> {
    let imgs = cs.images();
    assert_eq!(imgs.len(), 1);
    let manifest = imgs[0]["manifest"].as_str().unwrap().to_string();
    cs.pulled_blob_names()
        .into_iter()
        .map(|h| format!("sha256:{h}"))
        .filter(|d| *d != manifest)
        .collect()
}

#[test]
fn pulls_go_through_a_pull_through_cache_and_fall_back_when_it_stops() {
    let up = Registry::start(&[]);
    up.push(None);
    let mirror = Registry::start(&["--proxy", &format!("http://{}", up.addr)]);
    let hosts = hosts_dir(
        &up.addr,
        &format!(
            "server = \"http://{u}\"\n\n[host.\"http://{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            u = up.addr,
            m = mirror.addr
        ),
    );
    let image = up.image("busybox:latest");

    let cs = crate::harness::Cstore::new();
    let (code, _, err) = pull(&cs, hosts.path(), &image);
    assert_eq!(code, 0, "{err}");
    cs.assert_blobs_verified();
    // The mirror served the tag and every blob; cstore never asked upstream.
    let mlog = log_of(&mirror);
    let mine = cstore_requests(&mlog);
    assert!(
        mine.iter()
            .any(|l| l.contains("GET /v2/busybox/manifests/latest")),
        "{mlog}"
    );
    let blobs = blobs_of(&cs);
    assert!(blobs.len() >= 2, "{blobs:?}");
    for b in blobs {
        assert!(
            mine.iter()
                .any(|l| l.contains(&format!("/v2/busybox/blobs/{b}"))),
            "blob {b} not fetched through the mirror:\n{mlog}"
        );
    }
    assert!(cstore_requests(&log_of(&up)).is_empty(), "{}", log_of(&up));

    // Mirror gone: the pull falls back to the upstream, saying so.
    mirror.stop();
    let cs = crate::harness::Cstore::new();
    let (code, _, err) = pull(&cs, hosts.path(), &image);
    assert_eq!(code, 0, "{err}");
    cs.assert_blobs_verified();
    let warned: Vec<Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &Value| e["message"] == "mirror failed; trying the next host")
        .collect();
    // Once: a mirror whose connection failed is not asked again.
    assert_eq!(warned.len(), 1, "{err}");
    assert_eq!(warned[0]["mirror"], mirror.addr.as_str());
    assert!(!cstore_requests(&log_of(&up)).is_empty());
}

#[test]
fn a_pull_only_mirror_serves_blobs_and_the_upstream_resolves_tags() {
    let up = Registry::start(&[]);
    up.push(None);
    let mirror = Registry::start(&["--proxy", &format!("http://{}", up.addr)]);
    let hosts = hosts_dir(
        &up.addr,
        &format!(
            "server = \"http://{u}\"\n[host.\"http://{m}\"]\n  capabilities = [\"pull\"]\n",
            u = up.addr,
            m = mirror.addr
        ),
    );
    let cs = crate::harness::Cstore::new();
    let (code, _, err) = pull(&cs, hosts.path(), &up.image("busybox:latest"));
    assert_eq!(code, 0, "{err}");
    let mlog = log_of(&mirror);
    let ulog = log_of(&up);
    assert!(!mlog.contains("manifests/latest"), "{mlog}");
    assert!(
        cstore_requests(&ulog)
            .iter()
            .any(|l| l.contains("GET /v2/busybox/manifests/latest")),
        "{ulog}"
    );
    assert!(
        cstore_requests(&mlog)
            .iter()
            .any(|l| l.contains("/v2/busybox/blobs/sha256:")),
        "{mlog}"
    );
    assert!(
        !cstore_requests(&ulog).iter().any(|l| l.contains("/blobs/")),
        "{ulog}"
    );
}

/// A mirror under a path (as Harbor's proxy projects are): with
/// `override_path` the URL's path is the API root; without it cstore adds
/// /v2 as containerd does, the mirror answers 404 and the pull falls back.
#[test]
fn override_path_reaches_a_mirror_under_a_path_prefix() {
    let up = Registry::start(&[]);
    up.push(None);
    let proxy = FaultProxy::start_with("127.0.0.1", &up.addr, &["--path-prefix", "cache"]);
    let image = up.image("busybox:latest");
    for override_path in [true, false] {
        proxy.clear();
        let hosts = hosts_dir(
            &up.addr,
            &format!(
                "server = \"http://{u}\"\n[host.\"http://{p}/v2/cache\"]\n  override_path = {override_path}\n",
                u = up.addr,
                p = proxy.addr
            ),
        );
        let cs = crate::harness::Cstore::new();
        let (code, _, err) = pull(&cs, hosts.path(), &image);
        assert_eq!(code, 0, "{err}");
        let paths: Vec<String> = proxy
            .log()
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_string())
            .collect();
        if override_path {
            assert!(
                paths.contains(&"/v2/cache/busybox/manifests/latest".to_string()),
                "{paths:?}"
            );
            // Config and layers through the proxy (which forwards with
            // cstore's user agent, so the upstream's log cannot tell).
            let blobs = paths
                .iter()
                .filter(|p| p.starts_with("/v2/cache/busybox/blobs/sha256:"))
                .count();
            assert_eq!(blobs, blobs_of(&cs).len(), "{paths:?}");
            assert!(!err.contains("mirror failed"), "{err}");
        } else {
            assert!(
                paths.contains(&"/v2/cache/v2/busybox/manifests/latest".to_string()),
                "{paths:?}"
            );
            assert!(err.contains("mirror failed"), "{err}");
        }
    }
}

/// openssl: a CA, a server certificate for 127.0.0.1 and a client one.
fn make_certs(dir: &Path) {
    let script = r#"
set -e
cd "$1"
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=cstore-test-ca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=cstore-client 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 -extfile client.ext 2>/dev/null
"#;
    let st = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("bash")
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "openssl");
}

#[test]
fn tls_registry_with_a_ca_and_client_certificates_from_hosts_toml() {
    let certs = tempfile::tempdir().unwrap();
    let c = |n: &str| certs.path().join(n);
    make_certs(certs.path());
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let reg = Registry::start(&[
        "--tls",
        &s(c("server.pem")),
        &s(c("server.key")),
        "--client-ca",
        &s(c("ca.pem")),
    ]);
    // Push with skopeo, which reads docker's certs.d layout.
    let skopeo_dir = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("ca.pem", "ca.crt"),
        ("client.pem", "client.cert"),
        ("client.key", "client.key"),
    ] {
        std::fs::copy(c(from), skopeo_dir.path().join(to)).unwrap();
    }
    let oci = run_fixture("images.sh", &["--print-dir"])
        .trim()
        .to_string();
    let out = Command::new("skopeo")
        .args(["copy", "-q", "--dest-cert-dir"])
        .arg(skopeo_dir.path())
        .arg(format!("oci:{oci}:busybox"))
        .arg(format!("docker://{}/busybox:latest", reg.addr))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = reg.image("busybox:latest");

    let with = |toml: &str| {
        let d = hosts_dir(&reg.addr, toml);
        for n in ["ca.pem", "client.pem", "client.key"] {
            std::fs::copy(c(n), d.path().join(&reg.addr).join(n)).unwrap();
        }
        d
    };
    let server = format!("server = \"https://{}\"\n", reg.addr);
    // CA (relative to hosts.toml) and a client pair: pulls.
    let ok = with(&format!(
        "{server}ca = \"ca.pem\"\nclient = [[\"client.pem\", \"client.key\"]]\n"
    ));
    let cs = crate::harness::Cstore::new();
    let (code, _, err) = pull(&cs, ok.path(), &image);
    assert_eq!(code, 0, "{err}");
    cs.assert_blobs_verified();
    // skip_verify instead of the CA: pulls too (and says the risk).
    // One PEM holding cert and key, named by an absolute path.
    let both = std::fs::read_to_string(c("client.pem")).unwrap()
        + &std::fs::read_to_string(c("client.key")).unwrap();
    std::fs::write(c("both.pem"), both).unwrap();
    let skip = with(&format!(
        "{server}skip_verify = true\nclient = \"{}\"\n",
        s(c("both.pem"))
    ));
    let cs = crate::harness::Cstore::new();
    let (code, _, err) = pull(&cs, skip.path(), &image);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("skip_verify"), "{err}");
    // docker's certs.d layout (no hosts.toml): ca.crt, client.cert + .key.
    let legacy = tempfile::tempdir().unwrap();
    std::fs::create_dir(legacy.path().join(&reg.addr)).unwrap();
    for f in ["ca.crt", "client.cert", "client.key"] {
        std::fs::copy(
            skopeo_dir.path().join(f),
            legacy.path().join(&reg.addr).join(f),
        )
        .unwrap();
    }
    let cs = crate::harness::Cstore::new();
    let (code, _, err) = pull(&cs, legacy.path(), &image);
    assert_eq!(code, 0, "{err}");

    // Without the client certificate the server refuses the handshake;
    // without the CA cstore refuses the server. Both name the registry.
    let no_client = with(&format!("{server}ca = \"ca.pem\"\n"));
    let no_ca = with(&format!(
        "{server}client = [[\"client.pem\", \"client.key\"]]\n"
    ));
    for d in [&no_client, &no_ca] {
        let cs = crate::harness::Cstore::new();
        let (code, _, err) = pull(&cs, d.path(), &image);
        assert_ne!(code, 0);
        assert!(err.contains(&reg.addr), "{err}");
        assert!(cs.images().is_empty());
    }
    // A CA file that is not one: an error naming the file, and the exit
    // status of a failed precondition (the node's config, not the registry).
    let bad = with(&format!("{server}ca = \"client.key\"\n"));
    let cs = crate::harness::Cstore::new();
    let (code, _, err) = pull(&cs, bad.path(), &image);
    assert_eq!(code, 67, "{err}");
    assert!(err.contains("client.key"), "{err}");
}

/// `credHelpers` and `credsStore` run docker-credential-NAME get, as docker does.
#[test]
fn credential_helpers_from_docker_config() {
    let reg = Registry::start(&["--htpasswd", "helper-user:helper-pass"]);
    reg.push(Some("helper-user:helper-pass"));
    let bin = tempfile::tempdir().unwrap();
    let calls = bin.path().join("calls");
    let helper = |name: &str, user: &str, pass: &str| {
        let p = bin.path().join(format!("docker-credential-{name}"));
        let script = format!(
            "#!/bin/sh\nread server\necho \"$1 $server\" >> {calls}\nif [ \"$server\" = \"{reg}\" ]; then\n  printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{pass}\"}}' \"$server\"\nelse\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
            calls = calls.display(),
            reg = reg.addr
        );
        std::fs::write(&p, script).unwrap();
        Command::new("chmod").arg("755").arg(&p).status().unwrap();
    };
    helper("good", "helper-user", "helper-pass");
    helper("wrong", "helper-user", "nope");
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    let image = reg.image("busybox:latest");
    let run = |config: &str| {
        let mut cs = crate::harness::Cstore::new();
        let dc = cs.path().join("docker-config");
        std::fs::create_dir_all(&dc).unwrap();
        std::fs::write(dc.join("config.json"), config).unwrap();
        cs.env
            .push(("DOCKER_CONFIG".into(), dc.display().to_string()));
        cs.env.push(("PATH".into(), path.clone()));
        let r = cs.outcome(&["pull", "--no-unpack", &image]);
        (cs, r)
    };
    let _ = std::fs::remove_file(&calls);
    // credHelpers for this registry wins over credsStore.
    let (cs, (code, _, err)) = run(&format!(
        r#"{{"credsStore":"wrong","credHelpers":{{"{}":"good"}}}}"#,
        reg.addr
    ));
    assert_eq!(code, 0, "{err}");
    cs.assert_blobs_verified();
    let log = std::fs::read_to_string(&calls).unwrap();
    assert!(
        log.lines().all(|l| l == format!("get {}", reg.addr)),
        "{log}"
    );
    // Answers are cached per process: not once per scope or request.
    assert_eq!(log.lines().count(), 1, "{log}");
    // credsStore alone; auths entries are then not used for secrets.
    let (_, (code, _, err)) = run(&format!(
        r#"{{"credsStore":"good","auths":{{"{}":{{"auth":"bm9ib2R5Om5vdGhpbmc="}}}}}}"#,
        reg.addr
    ));
    assert_eq!(code, 0, "{err}");
    // A helper with the wrong secret: refused, naming the registry.
    let (_, (code, _, err)) = run(r#"{"credsStore":"wrong"}"#);
    assert_ne!(code, 0);
    assert!(
        err.contains(&reg.addr) && err.contains("credentials were refused"),
        "{err}"
    );
    // A helper that is not installed: the pull fails and the log names it.
    let (_, (code, _, err)) = run(r#"{"credsStore":"missing"}"#);
    assert_ne!(code, 0);
    assert!(err.contains("docker-credential-missing"), "{err}");
    // A helper with nothing for the registry: no credentials.
    let (_, (code, _, err)) =
        run(r#"{"credHelpers":{"other.example":"good"},"credsStore":"good"}"#);
    assert_eq!(code, 0, "{err}");
}
