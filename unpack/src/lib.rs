//! Unpacking a layer into a directory in one streaming pass: decompress
//! (gzip, zstd or none), hash the tar stream for the config's diff_id, stop
//! a decompression bomb, and extract entries as they go by, every syscall on
//! an fd beneath the layer's root. Nothing uncompressed is ever stored
//! except the extracted tree. Knows nothing of the store or the registry:
//! [`unpack_reader`] takes any buffered reader of a compressed layer and a
//! directory fd; [`unpack_layer`] is that for a blob file and a path. The
//! tar reader ([`tar::TarReader`]) stands alone too, and says where each
//! entry's data starts in the uncompressed stream.

mod batch;
pub mod error;
pub mod extract;
pub mod tar;

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::path::Path;

use cstore_blockio::{SeqReader, StreamConfig};
use sha2::{Digest as _, Sha256};

use cstore_os::{sys, IoError};

pub use error::{Error, Result};
pub use extract::{ExtractStats, MAX_MADE_DIR_BYTES, OPAQUE_XATTR};

/// How a layer blob is compressed (from its media type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression of a layer blob, or None if this is not a layer type we
/// can unpack (foreign layers, artifacts, encrypted layers...).
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

#[derive(Clone, Debug)]
pub struct UnpackOptions {
    /// Refuse a layer whose uncompressed stream exceeds its blob size times
    /// this (gzip can't exceed ~1032:1, so only crafted zstd streams meet it).
    pub max_ratio: u64,
    /// ...but always allow at least this much.
    pub min_limit: u64,
    /// How the blob is read (readahead, O_DIRECT): the store's
    /// `stream_config()`; None reads with the defaults.
    pub io: Option<StreamConfig>,
    /// Refuse a layer whose directories made for missing parents need more
    /// than this many bytes of bookkeeping (every such directory's path is
    /// kept: a deep new path per entry grows it with the square of the depth).
    pub max_made_dir_bytes: usize,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            max_ratio: 1100,
            min_limit: 256 << 20,
            io: None,
            max_made_dir_bytes: extract::MAX_MADE_DIR_BYTES,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerStats {
    pub diff_id: String,
    /// Bytes of the uncompressed tar stream.
    pub tar_bytes: u64,
    pub extract: ExtractStats,
    /// Directories created for entries whose parent the layer did not list,
    /// and still directories the layer did not list when it ended (one a
    /// later entry replaced, removed or listed is not here), sorted; the
    /// layer root (an empty path) first when the layer has no `./` entry.
    #[serde(skip)]
    pub implicit_dirs: Vec<Vec<u8>>,
}

/// Counts and hashes what the decompressor produces, and stops a bomb.
struct DiffReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
}

impl<R: Read> Read for DiffReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::other(BombError(self.limit)));
        }
        Ok(n)
    }
}

#[derive(Debug)]
struct BombError(u64);
impl std::fmt::Display for BombError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "uncompressed stream exceeds {} bytes (decompression bomb?)",
            self.0
        )
    }
}
impl std::error::Error for BombError {}

/// What is being unpacked, for error messages.
pub struct LayerRef<'a> {
    pub image: &'a str,
    pub digest: &'a str,
    pub compression: Compression,
    pub diff_id: &'a str,
}

/// Unpack the layer blob at `blob` into the (empty, existing) directory
/// `dest`. On error the caller removes `dest`: nothing outside it is touched.
pub fn unpack_layer(
    blob: &Path,
    layer: &LayerRef<'_>,
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<LayerStats> {
    // Reads of the compressed blob run ahead of the decompressor.
    let raw = SeqReader::open(blob, opts.io.as_ref().unwrap_or(&StreamConfig::default()))
        .map_err(|e| IoError::new("open", blob, e))?;
    let blob_size = raw
        .get_ref()
        .metadata()
        .map_err(|e| IoError::new("stat", blob, e))?
        .len();
    let root = sys::open_dir(dest).map_err(|e| IoError::new("open", dest, e))?;
    unpack_reader(raw, blob_size, layer, root, opts)
}

/// Unpack the compressed layer `raw` (`compressed_size` bytes: the bomb cap
/// is a multiple of it) into the empty directory `root`. Nothing outside
/// `root` is touched; on error the caller removes what is in it.
pub fn unpack_reader<R: BufRead>(
    raw: R,
    compressed_size: u64,
    layer: &LayerRef<'_>,
    root: OwnedFd,
    opts: &UnpackOptions,
) -> Result<LayerStats> {
    let fail = |entry: Option<String>, reason: String| Error::Layer {
        image: layer.image.to_string(),
        layer: layer.digest.to_string(),
        entry,
        reason,
    };
    let limit = compressed_size
        .saturating_mul(opts.max_ratio)
        .max(opts.min_limit);
    let decoder: Box<dyn Read + '_> = match layer.compression {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(raw)
                .map_err(|e| fail(None, format!("zstd: {e}")))?,
        ),
    };
    let diff = DiffReader {
        inner: decoder,
        hasher: Sha256::new(),
        count: 0,
        limit,
    };
    let mut tar = tar::TarReader::new(BufReader::with_capacity(1 << 20, diff));
    // Batches pay off only beside the decompressor's own work (see the policy).
    let batch = opts.io.as_ref().is_some_and(|c| c.batch_small_files)
        && layer.compression != Compression::None;
    let mut x = extract::Extractor::new(root, batch).map_err(|r| fail(None, r))?;
    x.max_made_dir_bytes = opts.max_made_dir_bytes;

    let read_fail = |e: tar::TarError| match e {
        tar::TarError::Io(io) => fail(None, format!("reading the layer: {io}")),
        other => fail(None, other.to_string()),
    };
    while let Some(entry) = tar.next_entry().map_err(read_fail)? {
        x.apply(&mut tar, &entry)
            .map_err(|e| fail(Some(e.entry), e.reason))?;
    }
    x.finish().map_err(|e| fail(Some(e.entry), e.reason))?;
    // The diff_id covers the whole stream, end-of-archive blocks included.
    let mut rest = tar.into_inner();
    io::copy(&mut rest, &mut io::sink())
        .map_err(|e| fail(None, format!("reading the layer: {e}")))?;
    let diff = rest.into_inner();
    let actual = format!("sha256:{}", hex::encode(diff.hasher.finalize()));
    if actual != layer.diff_id {
        return Err(Error::DiffIdMismatch {
            image: layer.image.to_string(),
            layer: layer.digest.to_string(),
            expected: layer.diff_id.to_string(),
            actual,
        });
    }
    // Durable before anyone calls it committed.
    sys::syncfs(x.root()).map_err(|e| fail(None, format!("syncfs of the layer: {e}")))?;
    Ok(LayerStats {
        diff_id: actual,
        tar_bytes: diff.count,
        extract: x.stats.clone(),
        implicit_dirs: {
            let mut dirs = std::mem::take(&mut x.implicit_dirs);
            if !x.root_listed {
                dirs.insert(Vec::new());
            }
            // Sorted: the root (empty) first, each directory before those in it.
            dirs.into_iter().collect()
        },
    })
}

/// Hash an uncompressed layer stream without extracting (for tests and checks).
pub fn diff_id_of(blob: &Path, compression: Compression) -> Result<String> {
    let file = BufReader::new(File::open(blob).map_err(|e| IoError::new("open", blob, e))?);
    let mut r: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(file)
                .map_err(|e| IoError::new("zstd", blob, e))?,
        ),
    };
    let mut h = Sha256::new();
    io::copy(&mut r, &mut h).map_err(|e| IoError::new("read", blob, e))?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}
