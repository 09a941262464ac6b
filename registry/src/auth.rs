//! Registry authentication: WWW-Authenticate challenges, bearer tokens, and
//! credentials from `--creds` or docker's config.json.

use std::collections::HashMap;
use std::path::PathBuf;

use base64::Engine as _;

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ***)", self.username)
    }
}

impl Credentials {
    /// `USER:PASS`, as `--creds` takes it (the password may contain ':').
    pub fn parse(s: &str) -> Option<Credentials> {
        let (u, p) = s.split_once(':')?;
        (!u.is_empty()).then(|| Credentials {
            username: u.to_string(),
            password: p.to_string(),
        })
    }

    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Look up `registry` in docker's config.json (`$DOCKER_CONFIG/config.json`,
/// else `~/.docker/config.json`): `auths.<host>.auth` (base64 `user:pass`) or
/// `username`/`password`. Credential helpers are not run.
pub fn docker_config_credentials(registry: &str) -> Option<Credentials> {
    let path = docker_config_path()?;
    let text = std::fs::read_to_string(&path).ok()?;
    credentials_from_config(&text, registry)
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

pub(crate) fn credentials_from_config(text: &str, registry: &str) -> Option<Credentials> {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let config: Config = serde_json::from_str(text).ok()?;
    let keys: Vec<String> = if registry == crate::reference::DEFAULT_REGISTRY {
        [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "docker.io",
            "registry-1.docker.io",
        ]
        .map(String::from)
        .to_vec()
    } else {
        vec![
            registry.to_string(),
            format!("https://{registry}"),
            format!("http://{registry}"),
        ]
    };
    // Keys are written in many forms: with scheme, with a path, with a slash.
    let host_of = |k: &str| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        k.split('/').next().unwrap_or(k).to_string()
    };
    let entry = keys.iter().find_map(|k| config.auths.get(k)).or_else(|| {
        config
            .auths
            .iter()
            .find(|(k, _)| keys.contains(&host_of(k)))
            .map(|(_, v)| v)
    })?;
    if let Some(auth) = &entry.auth {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        return Credentials::parse(&String::from_utf8(raw).ok()?);
    }
    Some(Credentials {
        username: entry.username.clone()?,
        password: entry.password.clone()?,
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parse a WWW-Authenticate header value (RFC 7235: a scheme, then
/// comma-separated `key=value` or `key="quoted, value"` pairs).
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header
        .split_once(char::is_whitespace)
        .unwrap_or((header, ""));
    let params = parse_params(rest);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        }),
        _ => None,
    }
}

fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                .collect::<String>()
                .trim()
                .to_string();
        }
        out.insert(key.trim().to_ascii_lowercase(), value);
    }
    out
}

/// A token endpoint's answer (docker's token spec, and OAuth2's field name).
#[derive(serde::Deserialize)]
pub(crate) struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    /// Any JSON: a number too big, negative or fractional must not fail the
    /// pull (nor overflow anything); see `token_expiry`.
    pub expires_in: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_with_quoted_commas() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="basic-realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(
            parse_challenge("Bearer service=x"),
            None,
            "a bearer challenge needs a realm"
        );
    }

    #[test]
    fn docker_config_auth_forms() {
        let cfg = r#"{"auths":{
            "127.0.0.1:5000":{"auth":"dXNlcjpwYTpzcw=="},
            "https://index.docker.io/v1/":{"username":"hub","password":"pw"},
            "https://ghcr.io/v2/":{"auth":"Z2g6dG9r"}}}"#;
        let c = credentials_from_config(cfg, "127.0.0.1:5000").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "pa:ss")
        );
        assert_eq!(
            credentials_from_config(cfg, "docker.io").unwrap().username,
            "hub"
        );
        assert_eq!(
            credentials_from_config(cfg, "ghcr.io").unwrap().password,
            "tok"
        );
        assert!(credentials_from_config(cfg, "quay.io").is_none());
        assert_eq!(Credentials::parse("a:b:c").unwrap().password, "b:c");
        assert!(Credentials::parse("nopass").is_none());
    }
}
