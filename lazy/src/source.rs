//! [`RegistrySource`]: a lazy layer's bytes from its registry.
//!
//! The fetcher threads of a `LayerFs` are plain threads; each call here is one
//! ranged GET (`RegistryClient::blob_range`: the client's auth, token cache per
//! scope, retries with backoff, and its cap of `MAX_RANGE_BYTES` per request)
//! run to completion on the runtime handed in. Nothing returned is trusted:
//! `LayerFs` checks every span against the index before use.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cstore_fuse_fs::layer::SpanSource;
use cstore_registry::{Reference, RegistryClient};
use oci_spec::image::Digest;

/// Where an index's windows blob is.
#[derive(Debug)]
pub enum Windows {
    /// The spans need none (zstd, uncompressed, or stored blocks only).
    None,
    /// In the store (an index built here).
    Local(File),
    /// In the registry, beside the index artifact (an index found there).
    Registry(Digest),
}

/// Blob bytes by range from the layer's registry.
pub struct RegistrySource {
    client: Arc<RegistryClient>,
    rt: tokio::runtime::Handle,
    reference: Reference,
    layer: Digest,
    windows: Windows,
    /// Compressed bytes fetched from the registry (blob and windows).
    fetched: AtomicU64,
}

impl std::fmt::Debug for RegistrySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySource")
            .field("reference", &self.reference.to_string())
            .field("layer", &self.layer.to_string())
            .finish()
    }
}

impl RegistrySource {
    pub fn new(
        client: Arc<RegistryClient>,
        rt: tokio::runtime::Handle,
        reference: Reference,
        layer: Digest,
        windows: Windows,
    ) -> RegistrySource {
        RegistrySource {
            client,
            rt,
            reference,
            layer,
            windows,
            fetched: AtomicU64::new(0),
        }
    }

    /// Bytes fetched from the registry so far.
    pub fn bytes_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Fetches one byte of the blob ahead of the first read: it settles what the
    /// first request to a registry settles (TLS or plain HTTP for a loopback
    /// registry, the token for the blob's scope) while the container is still
    /// starting, so the first miss does not pay for it. Warm-ups run one at a
    /// time: concurrent first requests to a loopback registry race its switch
    /// to plain HTTP, and the losers pay a retry's backoff.
    pub fn warm_up(&self) {
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = self.ranged(&self.layer, 0..1) {
            tracing::debug!("layer {}: warm-up request: {e}", self.layer);
        }
    }

    fn ranged(&self, digest: &Digest, range: Range<u64>) -> io::Result<Vec<u8>> {
        let len = range
            .end
            .checked_sub(range.start)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "inverted range"))?;
        let bytes = self
            .rt
            .block_on(
                self.client
                    .blob_range(&self.reference, digest, range.start, len),
            )
            .map_err(|e| io::Error::other(format!("{}: {e}", self.reference)))?;
        self.fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes.to_vec())
    }
}

impl SpanSource for RegistrySource {
    fn fetch(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        self.ranged(&self.layer, range)
    }

    fn fetch_windows(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        match &self.windows {
            Windows::None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("layer {}: its index has no windows blob", self.layer),
            )),
            Windows::Local(f) => {
                let len = range.end.saturating_sub(range.start) as usize;
                let mut v = vec![0u8; len];
                f.read_exact_at(&mut v, range.start)?;
                Ok(v)
            }
            Windows::Registry(d) => self.ranged(d, range),
        }
    }
}
