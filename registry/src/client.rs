//! The OCI distribution client: just what pulling needs, written by hand over
//! reqwest. oci-client was the first choice, but cstore needs things it keeps
//! inside: a size cap enforced while a manifest streams in, Range requests that
//! resume into our own ingest files, retries with backoff that honour
//! Retry-After, docker's plain-HTTP fallback for loopback registries, token
//! caching per scope, and errors that name the registry and scope. The
//! protocol surface for pulling is small (GET manifest, GET blob, the token
//! dance), so owning it costs little. oci-spec supplies the document types.
//!
//! A registry is untrusted: every body read from it has a cap, and its
//! credentials (and the tokens they buy) go only to its own origin and to the
//! token realm it names. Redirects are followed here rather than by reqwest,
//! so each hop decides what it is sent: reqwest's policy keeps Authorization
//! on a redirect to the same host and port even from https to http, and
//! cannot tell a 401 of the registry from one of the host it redirected to.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use oci_spec::image::Digest;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode, Url};
use sha2::{Digest as _, Sha256};

use crate::auth::{self, Challenge, Credentials, TokenResponse};
use crate::error::{Error, Result};
use crate::hosts;
use crate::media;
use crate::reference::Reference;

/// Manifests and indexes above this are refused (containerd uses 4 MiB too).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Token responses above this are refused: a JWT with its certificate chain
/// is a few KiB; 1 MiB leaves room for any real one.
pub const MAX_TOKEN_BYTES: u64 = 1 << 20;

/// Of an error response's body only this much is read: it is only a message.
pub const MAX_ERROR_BODY_BYTES: u64 = 8 << 10;

/// A whole token exchange (redirects and body included) ends within this; a
/// realm that trickles its answer cannot hold a pull forever.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(60);

/// Reading an error body ends within this (it only decorates the error).
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Tokens are believed for at most this long whatever `expires_in` says
/// (2^64-1 once overflowed Instant); the registry still refuses an expired
/// one, which just fetches a new one.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Hops followed per request, as reqwest's default policy.
const MAX_REDIRECTS: usize = 10;

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
    /// containerd-style hosts directory (`DIR/<registry>/hosts.toml`):
    /// mirrors and TLS per registry. None: every registry as it is.
    pub hosts_dir: Option<PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: false,
            creds: None,
            docker_config: true,
            attempts: 5,
            backoff: Duration::from_millis(200),
            hosts_dir: None,
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
    /// From `realm`, the token server the registry's own challenge named.
    Bearer {
        token: String,
        expires: Instant,
        realm: String,
    },
}

#[derive(Default)]
struct State {
    /// Per loopback host: the scheme it was found to speak (absent: not
    /// known yet, HTTPS tried first).
    schemes: HashMap<String, Scheme>,
    /// Per loopback host whose scheme is not known yet: held by the one
    /// request that finds it out, so concurrent first requests wait for it
    /// instead of each failing TLS and the losers paying a retry's backoff.
    learning: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Per (registry host, scope): bearer tokens are scoped to a repository
    /// and action. Only a challenge of the registry itself fills an entry, so
    /// a token is always one from the realm that registry named (a challenge
    /// naming another realm replaces it); and it is only ever sent to the
    /// registry's own origin.
    auth: HashMap<(String, String), Auth>,
    /// Per registry: its hosts (mirrors first, the upstream last).
    endpoints: HashMap<String, Arc<Vec<hosts::Endpoint>>>,
    /// Mirrors whose connection failed: not asked again by this client.
    down: HashSet<String>,
}

/// Where a GET ended after following redirects.
struct Landed {
    resp: Response,
    url: Url,
    /// Left the origin it started at (the registry, or the token realm).
    elsewhere: bool,
}

enum SendError {
    /// The request failed (connect, TLS, reset); `at_home`: at the origin
    /// it started at, not at a host a redirect led to.
    Transport {
        at_home: bool,
        url: Url,
        error: reqwest::Error,
    },
    /// A redirect that cannot be followed.
    Redirect(String),
}

/// `host[:port]` of a URL, as errors name hosts.
fn host_port(u: &Url) -> String {
    match u.port() {
        Some(p) => format!("{}:{p}", u.host_str().unwrap_or("")),
        None => u.host_str().unwrap_or("").to_string(),
    }
}

pub struct RegistryClient {
    pub(crate) http: reqwest::Client,
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
        // Redirects are followed by hand (`send_following`): each hop
        // decides what it is sent.
        let http = hosts::client_builder()
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

    /// `path` under the repository at `ep` (the default upstream's scheme
    /// as the loopback fallback left it).
    pub(crate) fn url(&self, ep: &hosts::Endpoint, r: &Reference, path: &str) -> Result<Url> {
        let scheme = match self.scheme(r) {
            Scheme::Https => "https",
            Scheme::Http => "http",
        };
        ep.url(scheme, r.repository(), path)
    }

    /// The hosts to ask for `r`'s registry, mirrors first (built once).
    fn endpoints(&self, r: &Reference) -> Result<Arc<Vec<hosts::Endpoint>>> {
        if let Some(e) = self.state.lock().unwrap().endpoints.get(r.registry()) {
            return Ok(e.clone());
        }
        let scheme = if self.opts.plain_http {
            "http"
        } else {
            "https"
        };
        let upstream = Url::parse(&format!("{scheme}://{}/v2/", r.api_host())).map_err(|e| {
            Error::InvalidReference {
                reference: r.to_string(),
                reason: e.to_string(),
            }
        })?;
        let specs = hosts::load(self.opts.hosts_dir.as_deref(), r.registry(), upstream)?;
        let eps = specs
            .into_iter()
            .map(|s| hosts::endpoint(s, &self.http))
            .collect::<Result<Vec<_>>>()?;
        let eps = Arc::new(eps);
        self.state
            .lock()
            .unwrap()
            .endpoints
            .insert(r.registry().to_string(), eps.clone());
        Ok(eps)
    }

    /// The registry itself (the last host: mirrors come first), where pushes go.
    pub(crate) fn upstream(&self, r: &Reference) -> Result<hosts::Endpoint> {
        let eps = self.endpoints(r)?;
        Ok(eps
            .iter()
            .find(|e| e.spec.upstream)
            .unwrap_or_else(|| eps.last().expect("hosts::load returns the upstream"))
            .clone())
    }

    /// The scope a push needs (the same cache, another key).
    pub(crate) fn push_scope(r: &Reference) -> String {
        format!("repository:{}:pull,push", r.repository())
    }

    fn cached_auth(&self, ep: &hosts::Endpoint, r: &Reference) -> Option<String> {
        self.cached_auth_scope(ep, &Self::scope(r))
    }

    pub(crate) fn cached_auth_scope(&self, ep: &hosts::Endpoint, scope: &str) -> Option<String> {
        let key = (ep.host.clone(), scope.to_string());
        match self.state.lock().unwrap().auth.get(&key)? {
            Auth::Basic(h) => Some(h.clone()),
            Auth::Bearer { token, expires, .. } if *expires > Instant::now() => {
                Some(format!("Bearer {token}"))
            }
            Auth::Bearer { .. } => None,
        }
    }

    /// GET `start`, following redirects. `auth` (an Authorization value) is
    /// sent only to `start`'s origin (scheme, host and port: not after a
    /// downgrade to http, not to another port); our other headers (Accept,
    /// Range) go to every hop, as a resume from presigned blob storage needs.
    ///
    /// `http` is the client of the host asked; `home_headers` (a host's
    /// configured headers) go, like `auth`, only to the start's origin.
    async fn send_following(
        &self,
        http: &reqwest::Client,
        start: Url,
        headers: &HeaderMap,
        home_headers: &HeaderMap,
        auth: Option<&str>,
        timeout: Option<Duration>,
    ) -> std::result::Result<Landed, SendError> {
        let home = start.origin();
        let mut url = start;
        let mut hops = 0;
        loop {
            let at_home = url.origin() == home;
            let mut req = http.get(url.clone()).headers(headers.clone());
            if at_home {
                req = req.headers(home_headers.clone());
            }
            if let (Some(a), true) = (auth, at_home) {
                req = req.header(AUTHORIZATION, a);
            }
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            let resp = req.send().await.map_err(|error| SendError::Transport {
                at_home,
                url: url.clone(),
                error,
            })?;
            let status = resp.status();
            let redirect = matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308);
            let location = resp.headers().get(LOCATION).cloned();
            let Some(location) = location.filter(|_| redirect) else {
                return Ok(Landed {
                    resp,
                    elsewhere: !at_home,
                    url,
                });
            };
            let next = location
                .to_str()
                .ok()
                .and_then(|l| url.join(l).ok())
                .ok_or_else(|| {
                    SendError::Redirect(format!(
                        "{} redirected to an unusable Location {location:?}",
                        host_port(&url)
                    ))
                })?;
            if !matches!(next.scheme(), "http" | "https") {
                return Err(SendError::Redirect(format!(
                    "{} redirected to {next}: not http(s)",
                    host_port(&url)
                )));
            }
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(SendError::Redirect(format!(
                    "more than {MAX_REDIRECTS} redirects (last to {})",
                    host_port(&next)
                )));
            }
            url = next;
        }
    }

    /// Credentials for `ep`: the registry's (`--creds`, else docker's
    /// config) for the upstream; a mirror's own from docker's config only.
    fn credentials(&self, ep: &hosts::Endpoint, r: &Reference) -> Option<Credentials> {
        if !ep.spec.upstream {
            return self
                .opts
                .docker_config
                .then(|| auth::docker_config_credentials(&ep.host))
                .flatten();
        }
        self.opts.creds.clone().or_else(|| {
            if self.opts.docker_config {
                auth::docker_config_credentials(r.registry())
            } else {
                None
            }
        })
    }

    /// GET `path` under the repository from the registry's hosts in order
    /// (see `hosts`): mirrors with the capability the request needs (a
    /// manifest by tag: resolve; by digest, and blobs: pull), then the
    /// upstream. A mirror's failure moves on to the next host; one whose
    /// connection failed is not asked again. Returns a 2xx response.
    pub(crate) async fn get(
        &self,
        r: &Reference,
        path: &str,
        headers: HeaderMap,
        what: &str,
    ) -> Result<Response> {
        let eps = self.endpoints(r)?;
        let resolve = path
            .strip_prefix("manifests/")
            .is_some_and(|reference| !reference.contains(':'));
        let mut last = None;
        for ep in eps.iter() {
            let caps = ep.spec.capabilities;
            if !ep.spec.upstream
                && (!(if resolve { caps.resolve } else { caps.pull })
                    || self.state.lock().unwrap().down.contains(&ep.host))
            {
                continue;
            }
            match self.get_at(ep, r, path, headers.clone(), what).await {
                Ok(resp) => {
                    if !ep.spec.upstream {
                        tracing::debug!(mirror = %ep.host, what, "from a mirror");
                    }
                    return Ok(resp);
                }
                Err(e) if !ep.spec.upstream => {
                    tracing::warn!(registry = %r.registry(), mirror = %ep.host, what, error = %e, "mirror failed; trying the next host");
                    if matches!(e, Error::Transport { .. }) {
                        self.state.lock().unwrap().down.insert(ep.host.clone());
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        // Only when the hosts file gives the upstream no such capability.
        Err(last.unwrap_or_else(|| Error::NotFound {
            registry: r.registry().to_string(),
            what: what.into(),
            message: "no configured host may serve it".into(),
        }))
    }

    /// GET `path` from one host, with auth, retries (a mirror gets one try:
    /// the next host is the retry) and the loopback HTTP fallback.
    async fn get_at(
        &self,
        ep: &hosts::Endpoint,
        r: &Reference,
        path: &str,
        headers: HeaderMap,
        what: &str,
    ) -> Result<Response> {
        let registry = if ep.spec.upstream {
            r.registry().to_string()
        } else {
            format!("{} (mirror of {})", ep.host, r.registry())
        };
        let attempts = if ep.spec.upstream {
            self.opts.attempts
        } else {
            1
        };
        let mut attempt = 0u32;
        let mut authenticated = false;
        loop {
            attempt += 1;
            // Every attempt starts at the registry: a retry or a resume gets
            // a fresh redirect, never reuses a (presigned, expiring) target.
            let learning = self.scheme_gate(ep, r).await;
            let url = self.url(ep, r, path)?;
            let auth = self.cached_auth(ep, r);
            let sent = self
                .send_following(&ep.http, url, &headers, &ep.headers, auth.as_deref(), None)
                .await;
            if let Some(_gate) = learning {
                // Decided before the gate opens: only the registry's own
                // transport failing means it speaks HTTP; any answer, TLS.
                let speaks = match sent {
                    Err(SendError::Transport { at_home: true, .. }) => Scheme::Http,
                    _ => Scheme::Https,
                };
                self.learned(r, speaks);
            }
            let landed = match sent {
                Ok(l) => l,
                Err(SendError::Redirect(message)) => {
                    return Err(Error::Redirect {
                        registry,
                        what: what.into(),
                        message,
                    })
                }
                Err(SendError::Transport {
                    at_home,
                    url,
                    error,
                }) => {
                    // Only the registry's own TLS failing means it speaks
                    // HTTP; a redirect target's says nothing about it.
                    if at_home && !ep.spec.explicit_scheme && self.try_plain_http(r, &url) {
                        tracing::info!(registry = %registry, "TLS to a loopback registry failed; using plain HTTP as docker does");
                        attempt -= 1;
                        continue;
                    }
                    let what = if at_home {
                        what.to_string()
                    } else {
                        format!("{what} (redirected to {})", host_port(&url))
                    };
                    if attempt < attempts {
                        tracing::warn!(registry = %registry, what, attempt, error = %error_chain(&error), "request failed; retrying");
                        self.pause(attempt, None).await;
                        continue;
                    }
                    return Err(Error::Transport {
                        registry,
                        what,
                        message: error_chain(&error),
                    });
                }
            };
            let Landed {
                resp,
                url: landed_at,
                elsewhere,
            } = landed;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            let challenge = || {
                resp.headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from)
            };
            if status == StatusCode::UNAUTHORIZED && elsewhere {
                // Blob storage that wants credentials of its own: it gets
                // none of the registry's, and no token is fetched for it.
                return Err(Error::RedirectAuth {
                    registry,
                    what: what.into(),
                    target: host_port(&landed_at),
                    challenge: challenge()
                        .map(|c| c.chars().take(200).collect())
                        .unwrap_or_else(|| "no challenge".into()),
                });
            }
            if status == StatusCode::UNAUTHORIZED && !authenticated {
                authenticated = true;
                let challenge = challenge();
                self.authenticate(ep, r, challenge.as_deref()).await?;
                attempt -= 1;
                continue;
            }
            let retry_after = retry_after(&resp);
            if (status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error())
                && attempt < attempts
            {
                tracing::warn!(registry = %registry, what, %status, attempt, "registry busy or failing; retrying");
                self.pause(attempt, retry_after).await;
                continue;
            }
            let message = error_message(resp).await;
            let scope = Self::scope(r);
            let what = if elsewhere {
                format!("{what} (redirected to {})", host_port(&landed_at))
            } else {
                what.to_string()
            };
            return Err(match status {
                StatusCode::UNAUTHORIZED => Error::Unauthorized {
                    registry,
                    scope,
                    message: if self.credentials(ep, r).is_some() {
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
                    what,
                    message,
                },
                _ => Error::Http {
                    registry,
                    what,
                    status: status.as_u16(),
                    message,
                },
            });
        }
    }

    /// Docker talks plain HTTP to loopback registries when TLS fails. Returns
    /// true if this request, which failed at `failed`, should be tried again
    /// over HTTP at once: the host's first TLS failure decides it speaks HTTP
    /// (a host already known to answer TLS is not switched by a later
    /// failure), and a request sent over TLS before that was learned follows
    /// it without a retry's pause.
    pub(crate) fn try_plain_http(&self, r: &Reference, failed: &Url) -> bool {
        if self.opts.plain_http || !r.is_loopback() || failed.scheme() != "https" {
            return false;
        }
        let mut st = self.state.lock().unwrap();
        match st.schemes.get(r.api_host()) {
            Some(s) => *s == Scheme::Http,
            None => {
                st.schemes.insert(r.api_host().to_string(), Scheme::Http);
                st.learning.remove(r.api_host());
                true
            }
        }
    }

    /// Record the scheme a loopback host answered with (the first decision stands).
    fn learned(&self, r: &Reference, scheme: Scheme) {
        let mut st = self.state.lock().unwrap();
        st.schemes.entry(r.api_host().to_string()).or_insert(scheme);
        st.learning.remove(r.api_host());
    }

    /// For a request to a loopback host whose scheme is not known yet (the
    /// only hosts with the HTTP fallback): waits while another request finds
    /// it out; returns the gate if this request is the one to find out (it
    /// records the outcome, then drops the gate). None when the scheme is
    /// fixed or known: no waiting then.
    async fn scheme_gate(
        &self,
        ep: &hosts::Endpoint,
        r: &Reference,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        if self.opts.plain_http || ep.spec.explicit_scheme || !r.is_loopback() {
            return None;
        }
        loop {
            let gate = {
                let mut st = self.state.lock().unwrap();
                if st.schemes.contains_key(r.api_host()) {
                    return None;
                }
                st.learning
                    .entry(r.api_host().to_string())
                    .or_default()
                    .clone()
            };
            let guard = gate.clone().lock_owned().await;
            let st = self.state.lock().unwrap();
            if st.schemes.contains_key(r.api_host()) {
                return None;
            }
            // The holder before us gave up without an answer (its future
            // was dropped): this request finds out, through the same gate
            // unless it was replaced meanwhile.
            if st
                .learning
                .get(r.api_host())
                .is_some_and(|g| Arc::ptr_eq(g, &gate))
            {
                return Some(guard);
            }
        }
    }

    pub(crate) async fn pause(&self, attempt: u32, retry_after: Option<Duration>) {
        let exp = self.opts.backoff.saturating_mul(1 << (attempt - 1).min(6));
        let half = u64::try_from(exp.as_millis() / 2).unwrap_or(u64::MAX / 2);
        let jitter = Duration::from_millis(rand::random::<u64>() % (half + 1));
        // Retry-After comes from the registry: a day or 2^64 s waits 30 s.
        let wait = retry_after
            .unwrap_or(exp.saturating_add(jitter))
            .min(Duration::from_secs(30));
        tokio::time::sleep(wait).await;
    }

    /// Answer a 401 challenge of the registry itself: remember Basic
    /// credentials, or fetch a bearer token for this repository's pull scope
    /// from the realm the registry named.
    async fn authenticate(
        &self,
        ep: &hosts::Endpoint,
        r: &Reference,
        challenge: Option<&str>,
    ) -> Result<()> {
        self.authenticate_scope(ep, r, challenge, Self::scope(r))
            .await
    }

    /// [`Self::authenticate`] for `scope` (a push's).
    pub(crate) async fn authenticate_scope(
        &self,
        ep: &hosts::Endpoint,
        r: &Reference,
        challenge: Option<&str>,
        scope: String,
    ) -> Result<()> {
        let registry = if ep.spec.upstream {
            r.registry().to_string()
        } else {
            ep.host.clone()
        };
        let creds = self.credentials(ep, r);
        let key = (ep.host.clone(), scope.clone());
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
                let what = format!("token from {realm}");
                let registry_url = self.url(ep, r, "")?;
                let mut url =
                    token_url(&realm, &registry_url, creds.is_some()).map_err(|reason| {
                        Error::Unauthorized {
                            registry: registry.clone(),
                            scope: scope.clone(),
                            message: format!("token realm {realm:?}: {reason}"),
                        }
                    })?;
                url.query_pairs_mut().append_pair("scope", &scope);
                if let Some(s) = &service {
                    url.query_pairs_mut().append_pair("service", s);
                }
                let basic = creds.as_ref().map(|c| c.basic_header());
                let fetched = tokio::time::timeout(
                    TOKEN_TIMEOUT,
                    self.fetch_token(&ep.http, url, basic.as_deref(), &registry, &scope, &realm),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Transport {
                        registry: registry.clone(),
                        what: what.clone(),
                        message: format!("no whole answer within {} s", TOKEN_TIMEOUT.as_secs()),
                    })
                })?;
                let body: TokenResponse =
                    serde_json::from_slice(&fetched).map_err(|e| Error::Malformed {
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
                let expires = token_expiry(Instant::now(), body.expires_in.as_ref());
                let old = self.state.lock().unwrap().auth.insert(
                    key,
                    Auth::Bearer {
                        token,
                        expires,
                        realm: realm.clone(),
                    },
                );
                if let Some(Auth::Bearer { realm: before, .. }) = old {
                    if before != realm {
                        tracing::info!(registry = %registry, scope, before, realm, "the registry names another token realm now");
                    }
                }
                Ok(())
            }
            None => Err(Error::Unauthorized {
                registry,
                scope,
                message: format!(
                    "unsupported or missing WWW-Authenticate challenge: {:?}",
                    challenge.map(|c| c.chars().take(200).collect::<String>())
                ),
            }),
        }
    }

    /// GET a token from `url` (basic credentials only to the realm's own
    /// origin); the body, capped at `MAX_TOKEN_BYTES`.
    async fn fetch_token(
        &self,
        http: &reqwest::Client,
        url: Url,
        basic: Option<&str>,
        registry: &str,
        scope: &str,
        realm: &str,
    ) -> Result<Vec<u8>> {
        let what = format!("token from {realm}");
        let landed = self
            .send_following(
                http,
                url,
                &HeaderMap::new(),
                &HeaderMap::new(),
                basic,
                Some(TOKEN_TIMEOUT),
            )
            .await
            .map_err(|e| match e {
                SendError::Transport { error, .. } => Error::Transport {
                    registry: registry.into(),
                    what: what.clone(),
                    message: error_chain(&error),
                },
                SendError::Redirect(message) => Error::Redirect {
                    registry: registry.into(),
                    what: what.clone(),
                    message,
                },
            })?;
        let resp = landed.resp;
        let status = resp.status();
        if !status.is_success() {
            let message = error_message(resp).await;
            let server = if landed.elsewhere {
                format!("{realm} (redirected to {})", host_port(&landed.url))
            } else {
                realm.to_string()
            };
            return Err(match status {
                StatusCode::UNAUTHORIZED => Error::Unauthorized {
                    registry: registry.into(),
                    scope: scope.into(),
                    message: format!("token server {server} refused the credentials: {message}"),
                },
                StatusCode::FORBIDDEN => Error::Denied {
                    registry: registry.into(),
                    scope: scope.into(),
                    message,
                },
                _ => Error::Http {
                    registry: registry.into(),
                    what: format!("token from {server}"),
                    status: status.as_u16(),
                    message,
                },
            });
        }
        match read_capped(resp, MAX_TOKEN_BYTES).await {
            Ok((body, true)) => Ok(body),
            Ok((_, false)) => Err(Error::ResponseTooLarge {
                what: format!("token response from {realm}"),
                limit: MAX_TOKEN_BYTES,
                kind: "token responses",
            }),
            Err(e) => Err(Error::Transport {
                registry: registry.into(),
                what,
                message: error_chain(&e),
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
        let body = match read_capped(resp, MAX_MANIFEST_BYTES).await {
            Ok((body, true)) => body,
            Ok((_, false)) => return Err(too_large()),
            Err(e) => {
                return Err(Error::Transport {
                    registry: r.registry().into(),
                    what: what.into(),
                    message: error_chain(&e),
                })
            }
        };
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

    /// Wait before attempt `attempt + 1` (exponential backoff with jitter).
    pub async fn backoff(&self, attempt: u32) {
        self.pause(attempt, None).await
    }
}

/// Read a body up to `limit` bytes. `(bytes, true)` when that was all of it;
/// `(the first limit bytes, false)` when there was more, which is then not
/// read (the connection is dropped with the response).
pub(crate) async fn read_capped(resp: Response, limit: u64) -> reqwest::Result<(Vec<u8>, bool)> {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let room = (limit - body.len() as u64) as usize;
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

/// The URL to ask for a token: the realm the registry named, checked. A
/// realm on another host than the registry is fine (Docker Hub's is), since
/// the registry chose it; but with credentials to send, a plain-HTTP realm
/// is refused unless it is on the loopback or the registry itself is spoken
/// to over plain HTTP (the user chose cleartext then): basic credentials
/// would cross the network readable.
fn token_url(
    realm: &str,
    registry: &Url,
    with_credentials: bool,
) -> std::result::Result<Url, String> {
    let url = Url::parse(realm).map_err(|e| format!("not a URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" => {
            let loopback = url
                .host_str()
                .is_some_and(crate::reference::is_loopback_host);
            if with_credentials && !loopback && registry.scheme() != "http" {
                return Err(format!(
                    "plain HTTP to {} (not loopback) while the registry is HTTPS: credentials are not sent in clear text",
                    host_port(&url)
                ));
            }
        }
        other => return Err(format!("scheme {other:?} is not http(s)")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("has user info in it".into());
    }
    Ok(url)
}

/// When a token given at `now` is to be renewed: `expires_in` seconds
/// (default 60, as docker; at least 10, at most `MAX_TOKEN_TTL`) less 5 s,
/// so it does not expire mid-request. Any number the server sends saturates;
/// none overflows.
fn token_expiry(now: Instant, expires_in: Option<&serde_json::Value>) -> Instant {
    let secs = match expires_in {
        None => 60,
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .unwrap_or(60),
    };
    let ttl = Duration::from_secs(secs.max(10)).min(MAX_TOKEN_TTL) - Duration::from_secs(5);
    now.checked_add(ttl).unwrap_or(now)
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
pub(crate) async fn error_message(resp: Response) -> String {
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
    let (body, whole) =
        match tokio::time::timeout(ERROR_BODY_TIMEOUT, read_capped(resp, MAX_ERROR_BODY_BYTES))
            .await
        {
            Ok(Ok(read)) => read,
            Ok(Err(_)) | Err(_) => (vec![], true),
        };
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
    } else if !whole {
        format!("{text}... (an error body over {MAX_ERROR_BODY_BYTES} bytes, not read further)")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lifetimes_saturate() {
        let now = Instant::now();
        let at = |v: serde_json::Value| token_expiry(now, Some(&v)) - now;
        // 2^64-1 s once overflowed Instant (a panic): capped at a day.
        assert_eq!(
            at(serde_json::json!(18446744073709551615u64)),
            MAX_TOKEN_TTL - Duration::from_secs(5)
        );
        assert_eq!(
            at(serde_json::json!(1e300)),
            MAX_TOKEN_TTL - Duration::from_secs(5)
        );
        assert_eq!(at(serde_json::json!(300)), Duration::from_secs(295));
        // At least 10 s; nonsense means docker's default of 60.
        assert_eq!(at(serde_json::json!(0)), Duration::from_secs(5));
        assert_eq!(at(serde_json::json!(-5)), Duration::from_secs(55));
        assert_eq!(at(serde_json::json!("soon")), Duration::from_secs(55));
        assert_eq!(token_expiry(now, None) - now, Duration::from_secs(55));
    }

    #[test]
    fn token_realms_get_credentials_only_safely() {
        let https = Url::parse("https://registry.example/v2/a/").unwrap();
        let http = Url::parse("http://registry.example/v2/a/").unwrap();
        // Another host is fine (the registry named it), over TLS.
        assert!(token_url("https://auth.example/token", &https, true).is_ok());
        // Cleartext with credentials: only on the loopback, or when the
        // registry itself is spoken to in cleartext.
        let e = token_url("http://auth.example/token", &https, true).unwrap_err();
        assert!(
            e.contains("auth.example") && e.contains("clear text"),
            "{e}"
        );
        assert!(token_url("http://auth.example/token", &https, false).is_ok());
        assert!(token_url("http://auth.example/token", &http, true).is_ok());
        assert!(token_url("http://127.0.0.1:5001/token", &https, true).is_ok());
        assert!(token_url("http://[::1]:5001/token", &https, true).is_ok());
        assert!(token_url("http://127.evil.example/token", &https, true).is_err());
        for bad in [
            "file:///etc/passwd",
            "ftp://auth.example/",
            "/token",
            "https://u:p@auth.example/token",
        ] {
            assert!(token_url(bad, &https, false).is_err(), "{bad}");
        }
    }
}
