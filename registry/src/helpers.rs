//! docker credential helpers: `credHelpers` (per registry) and `credsStore`
//! (for every registry) in docker's config.json name a program
//! `docker-credential-NAME`, run as docker runs it: `get` with the server on
//! stdin, `{"ServerURL","Username","Secret"}` on stdout. How cloud
//! registries (ECR, GCR/Artifact Registry, ACR) hand out credentials.
//!
//! As docker decides: a `credHelpers` entry for the registry wins; else
//! `credsStore`, and then `auths` is not read for secrets. The helper gets
//! only the registry it is asked about; its answer is used only for that
//! registry. Answers are cached per process (a pull authenticates per scope).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::auth::Credentials;
use crate::error::{Error, Result};

/// A helper that has not answered within this is killed.
const TIMEOUT: Duration = Duration::from_secs(30);
/// A helper's stdout is read up to this (an answer is a few hundred bytes).
const MAX_OUTPUT: u64 = 1 << 20;

/// Which helper docker's config names for `registry`, if any.
pub fn helper_for(config_text: &str, registry: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default, rename = "credsStore")]
        creds_store: Option<String>,
        #[serde(default, rename = "credHelpers")]
        cred_helpers: HashMap<String, String>,
    }
    let c: Config = serde_json::from_str(config_text).ok()?;
    let keys = server_names(registry);
    keys.iter()
        .find_map(|k| c.cred_helpers.get(k))
        .or(c.creds_store.as_ref())
        .filter(|n| !n.is_empty())
        .cloned()
}

/// The names docker asks a helper about for a registry: Docker Hub is
/// `https://index.docker.io/v1/`; others their host.
fn server_names(registry: &str) -> Vec<String> {
    if registry == crate::reference::DEFAULT_REGISTRY {
        vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
        ]
    } else {
        vec![registry.to_string(), format!("https://{registry}")]
    }
}

/// What to send a helper on stdin for `registry`.
fn server_url(registry: &str) -> String {
    server_names(registry).remove(0)
}

type Cache = Mutex<HashMap<(String, String), Option<Credentials>>>;

/// Runs `docker-credential-NAME get` for `registry`. `Ok(None)`: the helper
/// has no credentials for it ("credentials not found").
pub fn get(name: &str, registry: &str) -> Result<Option<Credentials>> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = (name.to_string(), registry.to_string());
    let cache = CACHE.get_or_init(Default::default);
    if let Some(c) = cache.lock().unwrap().get(&key) {
        return Ok(c.clone());
    }
    let c = run(name, registry)?;
    cache.lock().unwrap().insert(key, c.clone());
    Ok(c)
}

fn run(name: &str, registry: &str) -> Result<Option<Credentials>> {
    let program = format!("docker-credential-{name}");
    let fail = |reason: String| Error::CredentialHelper {
        helper: program.clone(),
        registry: registry.to_string(),
        reason,
    };
    // A name is a word, never a path (docker's rule too).
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(fail(format!("{name:?} is not a helper name")));
    }
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    let url = server_url(registry);
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its answer.
        let _ = stdin.write_all(url.as_bytes());
    }
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let r = (&mut stdout).take(MAX_OUTPUT + 1).read_to_end(&mut out);
        r.map(|_| out)
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("no answer within {} s", TIMEOUT.as_secs())));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    };
    let out = reader
        .join()
        .map_err(|_| fail("reading its output failed".into()))?
        .map_err(|e| fail(e.to_string()))?;
    if out.len() as u64 > MAX_OUTPUT {
        return Err(fail(format!("answered more than {MAX_OUTPUT} bytes")));
    }
    let text = String::from_utf8_lossy(&out);
    if !status.success() {
        // docker-credential-helpers' message for a registry it does not hold.
        if text.contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!(
            "{status}: {}",
            text.trim().chars().take(200).collect::<String>()
        )));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let a: Answer =
        serde_json::from_slice(&out).map_err(|e| fail(format!("not a credentials answer: {e}")))?;
    if a.username == "<token>" {
        return Err(fail(
            "answered an identity token (OAuth refresh token), which cstore does not exchange yet"
                .into(),
        ));
    }
    if a.username.is_empty() && a.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials {
        username: a.username,
        password: a.secret,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cred_helpers_win_over_the_store() {
        let cfg = r#"{"credsStore":"desktop","credHelpers":{"123.dkr.ecr.example":"ecr-login","docker.io":"hub"},"auths":{}}"#;
        assert_eq!(
            helper_for(cfg, "123.dkr.ecr.example").as_deref(),
            Some("ecr-login")
        );
        assert_eq!(helper_for(cfg, "docker.io").as_deref(), Some("hub"));
        assert_eq!(helper_for(cfg, "ghcr.io").as_deref(), Some("desktop"));
        assert_eq!(helper_for(r#"{"auths":{}}"#, "ghcr.io"), None);
        assert_eq!(helper_for(r#"{"credsStore":""}"#, "ghcr.io"), None);
        assert_eq!(server_url("docker.io"), "https://index.docker.io/v1/");
        assert_eq!(server_url("127.0.0.1:5000"), "127.0.0.1:5000");
    }

    #[test]
    fn a_helper_name_is_never_a_path() {
        for bad in ["../x", "/bin/sh", "a b", ""] {
            let e = get(bad, "r.example").unwrap_err().to_string();
            assert!(e.contains("not a helper name"), "{e}");
        }
    }
}
