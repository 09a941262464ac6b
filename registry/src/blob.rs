//! Blobs: a whole blob as a stream of chunks that resumes with Range by
//! itself when a connection drops (as containerd's fetcher does), and byte
//! ranges of a blob for readers that need only part of one (the lazy
//! filesystem). Both go through the client's `get`: the same auth, token
//! cache, redirects and retries as everything else.

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use oci_spec::image::Digest;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE, RANGE};
use reqwest::StatusCode;

use crate::client::{error_chain, RegistryClient};
use crate::error::{Error, Result};
use crate::reference::Reference;

/// A ranged read is held in memory whole: one larger than this is refused
/// (the lazy filesystem reads chunks of a few MiB).
pub const MAX_RANGE_BYTES: u64 = 64 << 20;

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Called before each resume: the attempt that failed (1, 2, ...) and why.
type OnRetry<'a> = Box<dyn FnMut(u32, &str) + Send + 'a>;

/// Bytes `[offset, end)` of a blob, in order, fetched again from where they
/// broke off whenever a body ends early: bounded by the client's `attempts`,
/// with its backoff in between. A `206` must carry a `Content-Range` that
/// starts where it was asked to; a `200` to a Range request (a server that
/// ignores Range) has the bytes before `offset` read and dropped, as
/// containerd does.
pub struct BlobReader<'a> {
    client: &'a RegistryClient,
    reference: Reference,
    digest: Digest,
    /// The next byte to hand out.
    offset: u64,
    /// One past the last byte wanted.
    end: u64,
    /// A range of the blob (Range always sent, bytes past `end` cut off)
    /// rather than the whole of it (Range only to resume; bytes past the
    /// size its descriptor gave are an error).
    ranged: bool,
    body: Option<Body>,
    /// Bytes of the current answer before `offset`, still to be dropped.
    skip: u64,
    failures: u32,
    on_retry: Option<OnRetry<'a>>,
}

impl RegistryClient {
    /// The blob `digest` of `size` bytes (as its descriptor says), from
    /// byte `offset` on (a partial download held already).
    pub fn blob<'a>(
        &'a self,
        r: &Reference,
        digest: &Digest,
        offset: u64,
        size: u64,
    ) -> BlobReader<'a> {
        BlobReader::new(self, r, digest, offset, size, false)
    }

    /// `len` bytes of the blob `digest` from byte `offset`: exactly those,
    /// or an error (one past the blob's end is `OutOfRange`). At most
    /// `MAX_RANGE_BYTES` at a time.
    pub async fn blob_range(
        &self,
        r: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        if len > MAX_RANGE_BYTES {
            return Err(Error::InvalidRange {
                what: format!("blob {digest}"),
                reason: format!(
                    "{len} bytes asked for at once; ranged reads are at most {MAX_RANGE_BYTES}"
                ),
            });
        }
        let end = offset.checked_add(len).ok_or_else(|| Error::InvalidRange {
            what: format!("blob {digest}"),
            reason: format!("{len} bytes from {offset} overflows"),
        })?;
        let mut out = BytesMut::with_capacity(len as usize);
        let mut reader = BlobReader::new(self, r, digest, offset, end, true);
        while let Some(b) = reader.chunk().await? {
            out.extend_from_slice(&b);
        }
        Ok(out.freeze())
    }
}

impl<'a> BlobReader<'a> {
    fn new(
        client: &'a RegistryClient,
        r: &Reference,
        digest: &Digest,
        offset: u64,
        end: u64,
        ranged: bool,
    ) -> BlobReader<'a> {
        BlobReader {
            client,
            reference: r.clone(),
            digest: digest.clone(),
            offset,
            end,
            ranged,
            body: None,
            skip: 0,
            failures: 0,
            on_retry: None,
        }
    }

    /// Call `f(attempt, why)` before each resume (for progress displays).
    pub fn on_retry(mut self, f: impl FnMut(u32, &str) + Send + 'a) -> Self {
        self.on_retry = Some(Box::new(f));
        self
    }

    /// The next byte it will hand out.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn what(&self) -> String {
        format!("blob {}", self.digest)
    }

    /// The next chunk, or None once every byte wanted has been handed out.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.offset >= self.end {
                self.body = None;
                return Ok(None);
            }
            if self.body.is_none() {
                self.body = Some(self.open().await?);
            }
            let body = self.body.as_mut().expect("opened above");
            match body.next().await {
                Some(Ok(mut b)) => {
                    if self.skip > 0 {
                        let n = self.skip.min(b.len() as u64);
                        self.skip -= n;
                        b = b.slice(n as usize..);
                    }
                    if b.is_empty() {
                        continue;
                    }
                    let room = self.end - self.offset;
                    if b.len() as u64 > room {
                        if !self.ranged {
                            return Err(Error::SizeMismatch {
                                digest: self.digest.to_string(),
                                expected: self.end,
                                actual: self.offset + b.len() as u64,
                            });
                        }
                        b.truncate(room as usize);
                    }
                    self.offset += b.len() as u64;
                    return Ok(Some(b));
                }
                Some(Err(e)) => {
                    self.body = None;
                    self.interrupted(error_chain(&e)).await?;
                }
                None => {
                    self.body = None;
                    if self.offset < self.end {
                        let why = format!("body ended after {} of {} bytes", self.offset, self.end);
                        self.interrupted(why).await?;
                    }
                }
            }
        }
    }

    /// A body broke off: count it, give up after the client's attempts,
    /// else wait and let the next `chunk` resume.
    async fn interrupted(&mut self, why: String) -> Result<()> {
        self.failures += 1;
        if self.failures >= self.client.options().attempts {
            return Err(Error::Transport {
                registry: self.reference.registry().into(),
                what: self.what(),
                message: format!("{why} (gave up after {} attempts)", self.failures),
            });
        }
        if let Some(f) = &mut self.on_retry {
            f(self.failures, &why);
        }
        tracing::warn!(blob = %self.digest, offset = self.offset, error = %why, "download interrupted; resuming");
        self.client.backoff(self.failures).await;
        Ok(())
    }

    /// Ask for the bytes from `offset` on, and check what the answer holds.
    async fn open(&mut self) -> Result<Body> {
        let mut headers = HeaderMap::new();
        let range = if self.ranged {
            Some(format!("bytes={}-{}", self.offset, self.end - 1))
        } else {
            (self.offset > 0).then(|| format!("bytes={}-", self.offset))
        };
        if let Some(range) = range {
            headers.insert(RANGE, HeaderValue::from_str(&range).expect("ascii"));
        }
        let what = self.what();
        let resp = self
            .client
            .get(
                &self.reference,
                &format!("blobs/{}", self.digest),
                headers,
                &what,
            )
            .await?;
        if resp.status() == StatusCode::PARTIAL_CONTENT {
            let value = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok());
            let range = value.and_then(content_range);
            let start = range.map(|(first, ..)| first);
            if start != Some(self.offset) {
                return Err(Error::Malformed {
                    what: format!("{what} from {}", self.reference.registry()),
                    reason: format!(
                        "asked for bytes from {}, got Content-Range starting at {start:?}",
                        self.offset
                    ),
                });
            }
            // A range reaching past the blob's end is answered with what
            // there is: asking again would get no more.
            if let Some((_, _, Some(size))) = range {
                if self.end > size {
                    return Err(Error::OutOfRange {
                        what,
                        reason: format!(
                            "bytes {}..{} asked for, the blob is {size} bytes",
                            self.offset, self.end
                        ),
                    });
                }
            }
            self.skip = 0;
        } else {
            // 200: the whole blob, whatever was asked.
            if let Some(size) = resp.content_length() {
                if self.ranged && self.end > size {
                    return Err(Error::OutOfRange {
                        what,
                        reason: format!(
                            "bytes {}..{} asked for, the blob is {size} bytes",
                            self.offset, self.end
                        ),
                    });
                }
            }
            self.skip = self.offset;
        }
        Ok(Box::pin(resp.bytes_stream()))
    }
}

/// `Content-Range: bytes FIRST-LAST/SIZE` (SIZE may be `*`): FIRST, LAST
/// and SIZE if known.
pub fn content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.strip_prefix("bytes ")?;
    let (span, size) = rest.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let (first, last) = (first.parse::<u64>().ok()?, last.parse::<u64>().ok()?);
    if last < first {
        return None;
    }
    let size = match size {
        "*" => None,
        s => Some(s.parse::<u64>().ok().filter(|&n| n > last)?),
    };
    Some((first, last, size))
}

/// The first byte of a `Content-Range: bytes FIRST-LAST/SIZE` answer.
pub fn content_range_start(value: &str) -> Option<u64> {
    content_range(value).map(|(first, ..)| first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse_only_whole() {
        assert_eq!(content_range("bytes 0-9/10"), Some((0, 9, Some(10))));
        assert_eq!(content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(content_range_start("bytes 100-199/1000"), Some(100));
        for bad in [
            "bytes 9-0/10",
            "bytes 0-9/9",
            "bytes 0-9",
            "bytes -9/10",
            "items 0-9/10",
            "bytes 0-9/x",
            "",
        ] {
            assert_eq!(content_range(bad), None, "{bad:?}");
        }
    }
}
