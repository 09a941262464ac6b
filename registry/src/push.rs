//! Writing to a registry, as much as `cstore index push` needs: blobs
//! (monolithic upload after a HEAD), manifests, and reading the referrers API.
//!
//! The same auth as pulls, with the repository's `pull,push` scope (its own
//! entry in the token cache); Authorization goes only to the registry's origin
//! (an upload location on another host gets none); 429/5xx and failed sends
//! are retried with the client's backoff; every body read has a cap.

use bytes::Bytes;
use oci_spec::image::Digest;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION};
use reqwest::{Method, Response, StatusCode, Url};

use crate::client::{error_message, read_capped, RegistryClient, MAX_MANIFEST_BYTES};
use crate::error::{Error, Result};
use crate::reference::Reference;

impl RegistryClient {
    async fn send_push(
        &self,
        r: &Reference,
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: Option<Bytes>,
        what: &str,
    ) -> Result<Response> {
        let registry = r.registry().to_string();
        let scope = Self::push_scope(r);
        // Pushes go to the registry itself, never to a mirror.
        let ep = self.upstream(r)?;
        let home = self.url(&ep, r, "")?.origin();
        let at_home = url.origin() == home;
        let mut attempt = 0u32;
        let mut authenticated = false;
        loop {
            attempt += 1;
            let mut req = ep
                .http
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if at_home {
                if let Some(a) = self.cached_auth_scope(&ep, &scope) {
                    req = req.header(AUTHORIZATION, a);
                }
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                Err(e) if attempt < self.options().attempts => {
                    tracing::warn!(registry = %registry, what, attempt, error = %e, "request failed; retrying");
                    self.pause(attempt, None).await;
                    continue;
                }
                Err(e) => {
                    return Err(Error::Transport {
                        registry,
                        what: what.into(),
                        message: e.to_string(),
                    })
                }
            };
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED && at_home && !authenticated {
                authenticated = true;
                let challenge = resp
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from);
                self.authenticate_scope(&ep, r, challenge.as_deref(), scope.clone())
                    .await?;
                attempt -= 1;
                continue;
            }
            if (status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error())
                && attempt < self.options().attempts
            {
                self.pause(attempt, None).await;
                continue;
            }
            let message = error_message(resp).await;
            return Err(match status {
                StatusCode::UNAUTHORIZED => Error::Unauthorized {
                    registry,
                    scope,
                    message,
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

    /// Upload `bytes` as the blob `digest` of `r`'s repository, unless the
    /// registry has it already. The registry verifies the digest.
    pub async fn push_blob(&self, r: &Reference, digest: &Digest, bytes: Bytes) -> Result<()> {
        let what = format!("blob {digest} of {}", r.name());
        let head = self.url(&self.upstream(r)?, r, &format!("blobs/{digest}"))?;
        match self
            .send_push(r, Method::HEAD, head, HeaderMap::new(), None, &what)
            .await
        {
            Ok(_) => return Ok(()),
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let start = self.url(&self.upstream(r)?, r, "blobs/uploads/")?;
        let resp = self
            .send_push(
                r,
                Method::POST,
                start.clone(),
                HeaderMap::new(),
                None,
                &what,
            )
            .await?;
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| start.join(l).ok())
            .ok_or_else(|| Error::Malformed {
                what: format!("upload of {what}"),
                reason: "no usable Location".into(),
            })?;
        let mut put = location;
        put.query_pairs_mut().append_pair("digest", digest.as_ref());
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        self.send_push(r, Method::PUT, put, headers, Some(bytes), &what)
            .await?;
        Ok(())
    }

    /// PUT a manifest or index under `reference` (a tag or its digest).
    /// Returns the `OCI-Subject` header, which a registry with the referrers
    /// API sends for a manifest with a subject (without it, the client keeps
    /// the referrers tag schema itself).
    pub async fn push_manifest(
        &self,
        r: &Reference,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Option<String>> {
        let what = format!("manifest {}@{reference}", r.name());
        let url = self.url(&self.upstream(r)?, r, &format!("manifests/{reference}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(media_type).map_err(|e| Error::Malformed {
                what: what.clone(),
                reason: format!("media type {media_type:?}: {e}"),
            })?,
        );
        let resp = self
            .send_push(r, Method::PUT, url, headers, Some(bytes), &what)
            .await?;
        Ok(resp
            .headers()
            .get("OCI-Subject")
            .and_then(|v| v.to_str().ok())
            .map(String::from))
    }

    /// The referrers API's index of the manifests whose subject is `subject`
    /// (filtered by `artifact_type` where the registry can), capped like a
    /// manifest; None if the registry has no referrers API (404: CNCF
    /// distribution 2.8), for the caller to try the referrers tag schema.
    pub async fn referrers(
        &self,
        r: &Reference,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Vec<u8>>> {
        let what = format!("referrers of {}@{subject}", r.name());
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        let path = format!("referrers/{subject}?artifactType={artifact_type}");
        let resp = match self.get(r, &path, headers, &what).await {
            Ok(resp) => resp,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        match read_capped(resp, MAX_MANIFEST_BYTES).await {
            Ok((body, true)) => Ok(Some(body)),
            Ok((_, false)) => Err(Error::ManifestTooLarge {
                what,
                limit: MAX_MANIFEST_BYTES,
            }),
            Err(e) => Err(Error::Transport {
                registry: r.registry().to_string(),
                what,
                message: e.to_string(),
            }),
        }
    }
}
