//! The crate's one error type. Variants say what a caller can do about it:
//! refuse an index, pull a layer whole, retry a fetch, fail a layer.

use std::io;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The index bytes are malformed or hostile: refuse the index (and pull
    /// the layer whole, or look for another index).
    #[error("invalid layer index: {0}")]
    InvalidIndex(String),

    /// The layer cannot be read from the middle; it has to be pulled whole.
    #[error("{0}")]
    NotSeekable(NotSeekable),

    /// The layer holds something the index format cannot describe (the
    /// layer itself may unpack fine): pull it whole.
    #[error("layer cannot be indexed: {0}")]
    Unsupported(String),

    /// A tar entry that extraction refuses; the layer would fail to unpack.
    #[error("entry {entry:?}: {reason}")]
    Entry { entry: String, reason: String },

    /// A fetched span's compressed bytes do not hash to the index's digest
    /// (or a chunk's, or a window's): the bytes are not the layer's. Refetch
    /// or fail the read; never use them.
    #[error(
        "span {span}: {what} digest mismatch: expected sha256:{expected}, got sha256:{actual}"
    )]
    Digest {
        span: usize,
        what: &'static str,
        expected: String,
        actual: String,
    },

    /// Bytes that hashed right but do not decompress as the index says
    /// (a wrong index, or a bug): fail the read.
    #[error("span {span}: {reason}")]
    Span { span: usize, reason: String },

    /// The compressed layer stream is corrupt or truncated.
    #[error("layer stream: {0}")]
    Stream(String),

    /// An eStargz blob or TOC that is malformed, or does not match its
    /// annotation.
    #[error("eStargz: {0}")]
    Estargz(String),

    /// A SOCI zTOC that is malformed.
    #[error("SOCI zTOC: {0}")]
    Soci(String),

    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Why a layer cannot be entered in the middle. The caller names the layer:
/// "layer sha256:… is a single zstd frame (40.0 MB): it cannot be read from
/// the middle; pulled whole".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotSeekable {
    /// zstd frames cannot be entered mid-way, and this layer is one frame.
    #[error("a single zstd frame ({} MB): it cannot be read from the middle", mb(*.compressed))]
    SingleZstdFrame { compressed: u64 },
    /// One zstd frame expands past what one span may (64 MiB).
    #[error(
        "a zstd frame at byte {offset} expands to more than {} MB: it cannot be read from the middle",
        mb(*.limit)
    )]
    ZstdFrameTooLarge { offset: u64, limit: u64 },
    /// One deflate block expands past what one span may.
    #[error(
        "a deflate block near byte {offset} expands to more than {} MB: it cannot be read from the middle",
        mb(*.limit)
    )]
    DeflateBlockTooLarge { offset: u64, limit: u64 },
}

fn mb(n: u64) -> String {
    format!("{:.1}", n as f64 / 1e6)
}

pub(crate) fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidIndex(reason.into())
}
