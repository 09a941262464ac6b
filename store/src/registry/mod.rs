//! An OCI distribution client: just what pulling needs, written by hand over
//! reqwest. oci-client was the first choice, but cstore needs things it keeps
//! inside: a size cap enforced while a manifest streams in, Range requests that
//! resume into our own ingest files, retries with backoff that honour
//! Retry-After, docker's plain-HTTP fallback for loopback registries, token
//! caching per scope, and errors that name the registry and scope. The
//! protocol surface for pulling is small (GET manifest, GET blob, the token
//! dance), so owning it costs little. oci-spec supplies the document types.

pub mod auth;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use oci_spec::image::Digest;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, RANGE, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::media;
use crate::reference::Reference;
use auth::{Challenge, Credentials, TokenResponse};

/// Manifests and indexes above this are refused (containerd uses 4 MiB too).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Speak plain HTTP to every registry.
    pub plain_http: bool,
    /// Credentials for the registry of the image being pulled.
    pub creds: Option<Credentials>,
    /// Also look in docker's config.json.
    pub docker_config: bool,
    /// Attempts per request for transient failures (429, 5xx, resets).
    pub attempts: u32,
    /// First backoff; doubles each attempt, with jitter.
    pub backoff: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: false,
            creds: None,
            docker_config: true,
            attempts: 5,
            backoff: Duration::from_millis(200),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    Https,
    Http,
}

#[derive(Clone)]
enum Auth {
    Basic(String),
    Bearer { token: String, expires: Instant },
}

#[derive(Default)]
struct State {
    schemes: HashMap<String, Scheme>,
    /// Per (host, scope): bearer tokens are scoped to a repository and action.
    auth: HashMap<(String, String), Auth>,
}

pub struct RegistryClient {
    http: reqwest::Client,
    opts: ClientOptions,
    state: Mutex<State>,
}

/// A manifest or index as fetched, verified against its digest.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

impl RegistryClient {
    pub fn new(opts: ClientOptions) -> Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("cstore/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            // No overall timeout (layers are large); a stalled read still ends.
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::limited(10))
            .build()
            .map_err(|e| Error::Transport {
                registry: "-".into(),
                what: "HTTP client".into(),
                message: e.to_string(),
            })?;
        Ok(RegistryClient {
            http,
            opts,
            state: Mutex::new(State::default()),
        })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    fn scope(r: &Reference) -> String {
        format!("repository:{}:pull", r.repository())
    }

    fn scheme(&self, r: &Reference) -> Scheme {
        if self.opts.plain_http {
            return Scheme::Http;
        }
        *self
            .state
            .lock()
            .unwrap()
            .schemes
            .get(r.api_host())
            .unwrap_or(&Scheme::Https)
    }

    fn url(&self, r: &Reference, path: &str) -> String {
        let scheme = match self.scheme(r) {
            Scheme::Https => "https",
            Scheme::Http => "http",
        };
        format!("{scheme}://{}/v2/{}/{path}", r.api_host(), r.repository())
    }

    fn cached_auth(&self, r: &Reference) -> Option<String> {
        let key = (r.api_host().to_string(), Self::scope(r));
        match self.state.lock().unwrap().auth.get(&key)? {
            Auth::Basic(h) => Some(h.clone()),
            Auth::Bearer { token, expires } if *expires > Instant::now() => {
                Some(format!("Bearer {token}"))
            }
            Auth::Bearer { .. } => None,
        }
    }

    fn credentials(&self, r: &Reference) -> Option<Credentials> {
        self.opts.creds.clone().or_else(|| {
            if self.opts.docker_config {
                auth::docker_config_credentials(r.registry())
            } else {
                None
            }
        })
    }

    /// GET `path` under the repository, with auth, retries and the loopback
    /// HTTP fallback. Returns a response with a 2xx status.
    async fn get(
        &self,
        r: &Reference,
        path: &str,
        headers: HeaderMap,
        what: &str,
    ) -> Result<Response> {
        let registry = r.registry().to_string();
        let mut attempt = 0u32;
        let mut authenticated = false;
        loop {
            attempt += 1;
            let url = self.url(r, path);
            let mut req = self.http.get(&url).headers(headers.clone());
            if let Some(a) = self.cached_auth(r) {
                req = req.header(AUTHORIZATION, a);
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                Err(e) => {
                    if self.try_plain_http(r) {
                        tracing::info!(registry = %registry, "TLS to a loopback registry failed; using plain HTTP as docker does");
                        attempt -= 1;
                        continue;
                    }
                    if attempt < self.opts.attempts {
                        tracing::warn!(registry = %registry, what, attempt, error = %error_chain(&e), "request failed; retrying");
                        self.pause(attempt, None).await;
                        continue;
                    }
                    return Err(Error::Transport {
                        registry,
                        what: what.into(),
                        message: error_chain(&e),
                    });
                }
            };
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED && !authenticated {
                authenticated = true;
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from);
                self.authenticate(r, challenge.as_deref()).await?;
                attempt -= 1;
                continue;
            }
            let retry_after = retry_after(&resp);
            if (status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error())
                && attempt < self.opts.attempts
            {
                tracing::warn!(registry = %registry, what, %status, attempt, "registry busy or failing; retrying");
                self.pause(attempt, retry_after).await;
                continue;
            }
            let message = error_message(resp).await;
            let scope = Self::scope(r);
            return Err(match status {
                StatusCode::UNAUTHORIZED => Error::Unauthorized {
                    registry,
                    scope,
                    message: if self.credentials(r).is_some() {
                        format!("credentials were refused: {message}")
                    } else {
                        format!("no credentials given (use --creds or docker login): {message}")
                    },
                },
                StatusCode::FORBIDDEN => Error::Denied {
                    registry,
                    scope,
                    message,
                },
                StatusCode::NOT_FOUND => Error::NotFound {
                    registry,
                    what: what.into(),
                    message,
                },
                _ => Error::Http {
                    registry,
                    what: what.into(),
                    status: status.as_u16(),
                    message,
                },
            });
        }
    }

    /// Docker talks plain HTTP to loopback registries when TLS fails. Returns
    /// true if this request should be tried again over HTTP.
    fn try_plain_http(&self, r: &Reference) -> bool {
        if self.opts.plain_http || !r.is_loopback() {
            return false;
        }
        let mut st = self.state.lock().unwrap();
        match st.schemes.get(r.api_host()) {
            Some(_) => false,
            None => {
                st.schemes.insert(r.api_host().to_string(), Scheme::Http);
                true
            }
        }
    }

    async fn pause(&self, attempt: u32, retry_after: Option<Duration>) {
        let exp = self.opts.backoff.saturating_mul(1 << (attempt - 1).min(6));
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (exp.as_millis() as u64 / 2 + 1));
        let wait = retry_after
            .unwrap_or(exp + jitter)
            .min(Duration::from_secs(30));
        tokio::time::sleep(wait).await;
    }

    /// Answer a 401 challenge: remember Basic credentials, or fetch a bearer
    /// token for this repository's pull scope.
    async fn authenticate(&self, r: &Reference, challenge: Option<&str>) -> Result<()> {
        let registry = r.registry().to_string();
        let scope = Self::scope(r);
        let creds = self.credentials(r);
        let key = (r.api_host().to_string(), scope.clone());
        match challenge.and_then(auth::parse_challenge) {
            Some(Challenge::Basic) => {
                let Some(c) = creds else {
                    return Err(Error::Unauthorized {
                        registry,
                        scope,
                        message: "the registry asks for basic auth and no credentials were given (use --creds or docker login)".into(),
                    });
                };
                self.state
                    .lock()
                    .unwrap()
                    .auth
                    .insert(key, Auth::Basic(c.basic_header()));
                Ok(())
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope: _,
            }) => {
                let mut req = self.http.get(&realm).query(&[("scope", scope.as_str())]);
                if let Some(s) = &service {
                    req = req.query(&[("service", s.as_str())]);
                }
                if let Some(c) = &creds {
                    req = req.basic_auth(&c.username, Some(&c.password));
                }
                let resp = req.send().await.map_err(|e| Error::Transport {
                    registry: registry.clone(),
                    what: format!("token from {realm}"),
                    message: error_chain(&e),
                })?;
                let status = resp.status();
                if !status.is_success() {
                    let message = error_message(resp).await;
                    return Err(match status {
                        StatusCode::UNAUTHORIZED => Error::Unauthorized {
                            registry,
                            scope,
                            message: format!(
                                "token server {realm} refused the credentials: {message}"
                            ),
                        },
                        StatusCode::FORBIDDEN => Error::Denied {
                            registry,
                            scope,
                            message,
                        },
                        _ => Error::Http {
                            registry,
                            what: format!("token from {realm}"),
                            status: status.as_u16(),
                            message,
                        },
                    });
                }
                let raw = resp.bytes().await.map_err(|e| Error::Transport {
                    registry: registry.clone(),
                    what: format!("token from {realm}"),
                    message: error_chain(&e),
                })?;
                let body: TokenResponse =
                    serde_json::from_slice(&raw).map_err(|e| Error::Malformed {
                        what: format!("token response from {realm}"),
                        reason: e.to_string(),
                    })?;
                let token = body
                    .token
                    .or(body.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| Error::Malformed {
                        what: format!("token response from {realm}"),
                        reason: "no token".into(),
                    })?;
                // Renew a little early so a token does not expire mid-request.
                let ttl = Duration::from_secs(body.expires_in.unwrap_or(60).max(10));
                let expires = Instant::now() + ttl - Duration::from_secs(5);
                self.state
                    .lock()
                    .unwrap()
                    .auth
                    .insert(key, Auth::Bearer { token, expires });
                Ok(())
            }
            None => Err(Error::Unauthorized {
                registry,
                scope,
                message: format!(
                    "unsupported or missing WWW-Authenticate challenge: {challenge:?}"
                ),
            }),
        }
    }

    /// Fetch a manifest or index by tag or digest. The body is capped at
    /// `MAX_MANIFEST_BYTES` while it streams and checked against the digest
    /// asked for, or against Docker-Content-Digest when asked by tag.
    pub async fn manifest(&self, r: &Reference, reference: &str) -> Result<FetchedManifest> {
        let what = format!("manifest {}@{reference}", r.name());
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(media::MANIFEST_ACCEPT));
        let mut attempt = 0;
        loop {
            attempt += 1;
            // `get` has already retried statuses and failed sends as often as
            // allowed; only a body that breaks off is retried here.
            let resp = self
                .get(r, &format!("manifests/{reference}"), headers.clone(), &what)
                .await?;
            match self.read_manifest(r, reference, resp, &what).await {
                Err(e) if e.is_transient() && attempt < self.opts.attempts => {
                    tracing::warn!(what, error = %e, "manifest fetch failed; retrying");
                    self.pause(attempt, None).await;
                }
                other => return other,
            }
        }
    }

    async fn read_manifest(
        &self,
        r: &Reference,
        reference: &str,
        resp: Response,
        what: &str,
    ) -> Result<FetchedManifest> {
        let too_large = || Error::ManifestTooLarge {
            what: what.to_string(),
            limit: MAX_MANIFEST_BYTES,
        };
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST_BYTES)
        {
            return Err(too_large());
        }
        let header_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string());
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_string());
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Error::Transport {
                registry: r.registry().into(),
                what: what.into(),
                message: error_chain(&e),
            })?;
            if body.len() as u64 + chunk.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        let expected = if reference.contains(':') {
            Some(reference.to_string())
        } else {
            header_digest.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(expected) = expected {
            if expected != actual {
                return Err(Error::DigestMismatch {
                    digest: format!("{expected} ({what})"),
                    actual,
                });
            }
        }
        let media_type = match header_type {
            Some(t) if media::manifest_kind(&t).is_some() => t,
            _ => media::sniff_manifest_media_type(&body).ok_or_else(|| Error::Malformed {
                what: what.into(),
                reason: "not a manifest or index (no recognizable media type)".into(),
            })?,
        };
        let digest = crate::reference::parse_digest(&actual)?;
        Ok(FetchedManifest {
            bytes: Bytes::from(body),
            media_type,
            digest,
        })
    }

    /// Start fetching a blob from byte `offset` (a Range request when > 0).
    /// The caller checks the status: 206 resumes, 200 means the server sent
    /// the whole blob.
    pub async fn blob(&self, r: &Reference, digest: &Digest, offset: u64) -> Result<Response> {
        let mut headers = HeaderMap::new();
        if offset > 0 {
            headers.insert(
                RANGE,
                HeaderValue::from_str(&format!("bytes={offset}-")).expect("ascii"),
            );
        }
        self.get(
            r,
            &format!("blobs/{digest}"),
            headers,
            &format!("blob {digest}"),
        )
        .await
    }

    pub async fn backoff(&self, attempt: u32) {
        self.pause(attempt, None).await
    }
}

fn retry_after(resp: &Response) -> Option<Duration> {
    let v = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The registry's own error text (`{"errors":[{"code","message"}]}`), or the
/// start of the body.
async fn error_message(resp: Response) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        code: Option<String>,
        message: Option<String>,
    }
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    if let Ok(e) = serde_json::from_slice::<Errors>(&body) {
        let parts: Vec<String> = e
            .errors
            .iter()
            .map(|i| match (&i.code, &i.message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.clone(),
                (None, Some(m)) => m.clone(),
                (None, None) => "unknown error".into(),
            })
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(200)])
        .trim()
        .to_string();
    if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    }
}

/// reqwest's Display hides the cause ("error sending request"); show it all.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
