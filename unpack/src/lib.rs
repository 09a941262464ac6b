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
    /// Record the layer's seekable index (docs/lazy.md) in the same pass:
    /// checkpoints, span digests, windows and the entry table, returned in
    /// [`LayerStats::index`]. An index that cannot be made never fails the
    /// unpack.
    pub build_index: bool,
    /// Where the index's checkpoints go (span size): `cstore index build
    /// --span-kib`.
    pub index_policy: cstore_index::Policy,
    /// Leave out the `syncfs` that makes the layer durable before it
    /// returns: for a caller that unpacks several layers on one filesystem
    /// and syncs it once before committing any (each syncfs writes back the
    /// filesystem's metadata, shared blocks again every time).
    pub defer_sync: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            max_ratio: 1100,
            min_limit: 256 << 20,
            io: None,
            max_made_dir_bytes: extract::MAX_MADE_DIR_BYTES,
            build_index: false,
            index_policy: cstore_index::Policy::default(),
            defer_sync: false,
        }
    }
}

/// The index recorded in the unpack pass, or why there is none.
#[derive(Debug, Clone)]
pub enum LayerIndex {
    /// The encoded index (validated) and its windows blob (raw windows).
    Built { index: Vec<u8>, windows: Vec<u8> },
    /// This layer cannot be entered in the middle, or its tree is one the
    /// index cannot describe: the reason, for a per-layer message.
    Unavailable(String),
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
    /// With [`UnpackOptions::build_index`].
    #[serde(skip)]
    pub index: Option<LayerIndex>,
}

/// The decompressor under the tar stream: an enum, not a box, so the
/// indexing reader can be finished once the stream is read.
enum Decoder<R: BufRead> {
    Plain(R),
    Gzip(flate2::bufread::MultiGzDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
    Indexing(cstore_index::IndexingReader<R, Vec<u8>>),
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
            Decoder::Indexing(r) => r.read(buf),
        }
    }
}

/// The tar reader's entry as the index's tree builder takes it.
pub fn index_entry(e: &tar::Entry) -> cstore_index::TarEntry<'_> {
    use cstore_index::TarKind as K;
    let kind = match e.kind {
        tar::Kind::File => K::File,
        tar::Kind::Dir => K::Dir,
        tar::Kind::Symlink => K::Symlink,
        tar::Kind::Hardlink => K::Hardlink,
        tar::Kind::Char => K::Char,
        tar::Kind::Block => K::Block,
        tar::Kind::Fifo => K::Fifo,
    };
    let mut t = cstore_index::TarEntry::new(&e.path, kind);
    t.mode = e.mode;
    t.uid = e.uid;
    t.gid = e.gid;
    t.mtime = e.mtime;
    t.size = e.size;
    t.data_offset = e.data_offset;
    t.link = &e.link;
    t.dev = (e.dev_major, e.dev_minor);
    t.xattrs = &e.xattrs;
    t.sparse = e.sparse.as_deref();
    t
}

/// The extracting process's owner and umask: what the index's tree builder
/// must assume to describe the tree extraction leaves.
pub fn tree_options(max_made_dir_bytes: usize) -> cstore_index::TreeOptions {
    // SAFETY: plain getters; the umask is set back at once.
    let (owner, umask) = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        ((libc::geteuid(), libc::getegid()), m)
    };
    cstore_index::TreeOptions {
        umask,
        owner,
        max_made_dir_bytes,
    }
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
    let fail_errno = |entry: Option<String>, reason: String, errno: Option<i32>| Error::Layer {
        image: layer.image.to_string(),
        layer: layer.digest.to_string(),
        entry,
        reason,
        errno,
    };
    let fail = |entry: Option<String>, reason: String| fail_errno(entry, reason, None);
    let limit = compressed_size
        .saturating_mul(opts.max_ratio)
        .max(opts.min_limit);
    let decoder = match (layer.compression, opts.build_index) {
        (c, true) => Decoder::Indexing(cstore_index::IndexingReader::new(
            raw,
            match c {
                Compression::None => cstore_index::Compression::None,
                Compression::Gzip => cstore_index::Compression::Gzip,
                Compression::Zstd => cstore_index::Compression::Zstd,
            },
            opts.index_policy,
            Vec::new(),
        )),
        (Compression::None, false) => Decoder::Plain(raw),
        (Compression::Gzip, false) => Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(raw)),
        (Compression::Zstd, false) => Decoder::Zstd(
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
        tar::TarError::Io(io) => {
            fail_errno(None, format!("reading the layer: {io}"), io.raw_os_error())
        }
        other => fail(None, other.to_string()),
    };
    // The index's entry table: a tree it cannot describe ends it, not the unpack.
    let mut tree = opts
        .build_index
        .then(|| cstore_index::TreeBuilder::new(tree_options(opts.max_made_dir_bytes)));
    let mut tree_failed: Option<String> = None;
    while let Some(entry) = tar.next_entry().map_err(read_fail)? {
        if let Some(tb) = &mut tree {
            if let Err(e) = tb.add(&index_entry(&entry)) {
                tree_failed = Some(format!(
                    "entry {}: {e}",
                    String::from_utf8_lossy(&entry.path)
                ));
                tree = None;
            }
        }
        x.apply(&mut tar, &entry)
            .map_err(|e| fail_errno(Some(e.entry), e.reason, e.errno))?;
    }
    x.finish()
        .map_err(|e| fail_errno(Some(e.entry), e.reason, e.errno))?;
    // The diff_id covers the whole stream, end-of-archive blocks included.
    let mut rest = tar.into_inner();
    io::copy(&mut rest, &mut io::sink())
        .map_err(|e| fail_errno(None, format!("reading the layer: {e}"), e.raw_os_error()))?;
    let diff = rest.into_inner();
    let diff_sha: [u8; 32] = diff.hasher.finalize().into();
    let actual = format!("sha256:{}", hex::encode(diff_sha));
    if actual != layer.diff_id {
        return Err(Error::DiffIdMismatch {
            image: layer.image.to_string(),
            layer: layer.digest.to_string(),
            expected: layer.diff_id.to_string(),
            actual,
        });
    }
    let index = match diff.inner {
        Decoder::Indexing(ir) => Some(finish_index(ir, tree, tree_failed, layer.digest, diff_sha)),
        _ => None,
    };
    // Durable before anyone calls it committed (or the caller syncs).
    if !opts.defer_sync {
        sys::syncfs(x.root())
            .map_err(|e| fail_errno(None, format!("syncfs of the layer: {e}"), e.raw_os_error()))?;
    }
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
        index,
    })
}

/// The index of a compressed layer read from `raw`, without extracting it
/// (`cstore index build`: a blob streamed from the registry, never stored):
/// the unpack pass minus the tree, with the same bomb cap, and the diff_id
/// checked against `layer.diff_id`. What cannot be indexed is
/// `LayerIndex::Unavailable`; an unreadable or wrong layer is an error.
pub fn index_layer<R: BufRead>(
    raw: R,
    compressed_size: u64,
    layer: &LayerRef<'_>,
    opts: &UnpackOptions,
) -> Result<LayerIndex> {
    let fail = |entry: Option<String>, reason: String| Error::Layer {
        image: layer.image.to_string(),
        layer: layer.digest.to_string(),
        entry,
        reason,
        errno: None,
    };
    let limit = compressed_size
        .saturating_mul(opts.max_ratio)
        .max(opts.min_limit);
    let ir = cstore_index::IndexingReader::new(
        raw,
        match layer.compression {
            Compression::None => cstore_index::Compression::None,
            Compression::Gzip => cstore_index::Compression::Gzip,
            Compression::Zstd => cstore_index::Compression::Zstd,
        },
        opts.index_policy,
        Vec::new(),
    );
    let diff = DiffReader {
        inner: ir,
        hasher: Sha256::new(),
        count: 0,
        limit,
    };
    let mut tar = tar::TarReader::new(BufReader::with_capacity(1 << 20, diff));
    let mut tree = Some(cstore_index::TreeBuilder::new(tree_options(
        opts.max_made_dir_bytes,
    )));
    let mut tree_failed = None;
    // next_entry skips each entry's data: it goes by read by the hashes only.
    loop {
        let entry = match tar.next_entry() {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(tar::TarError::Io(io)) => {
                return Err(fail(None, format!("reading the layer: {io}")))
            }
            Err(other) => return Err(fail(None, other.to_string())),
        };
        if let Some(tb) = &mut tree {
            if let Err(e) = tb.add(&index_entry(&entry)) {
                tree_failed = Some(format!(
                    "entry {}: {e}",
                    String::from_utf8_lossy(&entry.path)
                ));
                tree = None;
            }
        }
    }
    let mut rest = tar.into_inner();
    io::copy(&mut rest, &mut io::sink())
        .map_err(|e| fail(None, format!("reading the layer: {e}")))?;
    let diff = rest.into_inner();
    let diff_sha: [u8; 32] = diff.hasher.finalize().into();
    let actual = format!("sha256:{}", hex::encode(diff_sha));
    if actual != layer.diff_id {
        return Err(Error::DiffIdMismatch {
            image: layer.image.to_string(),
            layer: layer.digest.to_string(),
            expected: layer.diff_id.to_string(),
            actual,
        });
    }
    Ok(finish_index(
        diff.inner,
        tree,
        tree_failed,
        layer.digest,
        diff_sha,
    ))
}

/// The index of a layer whose stream was read to its end (and whose
/// diff_id matched), or why there is none.
fn finish_index<R: BufRead>(
    ir: cstore_index::IndexingReader<R, Vec<u8>>,
    tree: Option<cstore_index::TreeBuilder>,
    tree_failed: Option<String>,
    layer_digest: &str,
    diff_id: [u8; 32],
) -> LayerIndex {
    let build = || -> std::result::Result<LayerIndex, String> {
        let (cp, windows) = ir.finish().map_err(|e| e.to_string())?;
        let entries = match (tree, tree_failed) {
            (_, Some(why)) => return Err(why),
            (Some(tb), None) => tb.finish().map_err(|e| e.to_string())?,
            (None, None) => return Err("no entry table".into()),
        };
        let digest = cstore_index::parse_digest(layer_digest).map_err(|e| e.to_string())?;
        let index = cp
            .into_builder(entries, digest, diff_id)
            .encode()
            .map_err(|e| format!("encoding the index: {e}"))?;
        Ok(LayerIndex::Built { index, windows })
    };
    build().unwrap_or_else(LayerIndex::Unavailable)
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
