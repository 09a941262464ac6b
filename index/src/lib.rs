//! `cstore-index`: the seekable layer index behind lazy pull (docs/lazy.md).
//!
//! Bytes in, bytes out: no network, no store, no FUSE.
//! - [`format`]: the binary index and its validating, zero-copy reader
//!   ([`Index::parse`]); [`encode`] writes one.
//! - [`reader::IndexingReader`] wraps a compressed layer stream in the unpack
//!   pass and records checkpoints (gzip: deflate block boundaries with bit
//!   offset and window, zran-style; zstd: frame starts; none: fixed spans),
//!   a sha256 per compressed span, and the windows; [`tree::TreeBuilder`]
//!   turns the tar entries into the tree extraction leaves.
//! - [`access`]: verify a fetched span and inflate it from its checkpoint.
//! - [`windows`]: trim and compress windows for `index push`.
//! - [`packed`]: the zstd-compressed index blob `index push` publishes.
//! - [`estargz`], [`soci`]: imports of eStargz TOCs and SOCI v2 zTOCs.
//! - [`compare`]: two entry tables describe the same tree (completion).
//! - [`fuzz`]: entry points for the fuzz harness.

pub mod access;
pub mod compare;
pub mod encode;
pub mod error;
pub mod estargz;
pub mod format;
pub mod fuzz;
pub mod packed;
pub mod reader;
mod rfc3339;
pub mod soci;
pub mod tree;
pub mod windows;
mod zlib;

pub use access::SpanReader;
pub use encode::{parse_digest, ChunkRec, EntryRec, IndexBuilder, SpanRec};
pub use error::{Error, NotSeekable, Result};
pub use format::{Compression, Entry, Header, Index, Kind, Source, Span};
pub use reader::{Checkpoints, IndexingReader, Policy};
pub use tree::{TarEntry, TarKind, TreeBuilder, TreeOptions};

/// Media type of an index blob in a store or registry.
pub const MEDIA_TYPE: &str = "application/vnd.cstore.layer-index.v1";
/// Media type of an index blob as `cstore index push` publishes it: the same
/// bytes, zstd-compressed ([`packed`]). Readers also take [`MEDIA_TYPE`]
/// (artifacts pushed before it existed).
pub const PACKED_MEDIA_TYPE: &str = "application/vnd.cstore.layer-index.v1+zstd";
/// Media type of an index's windows blob.
pub const WINDOWS_MEDIA_TYPE: &str = "application/vnd.cstore.layer-index.windows.v1";
/// Media type of a layer's access trace in an index artifact: the spans a lazy
/// run read, in first-read order, u32 little-endian (optional, one per layer).
pub const TRACE_MEDIA_TYPE: &str = "application/vnd.cstore.layer-trace.v1";
/// `artifactType` of the OCI artifact `cstore index push` publishes (its
/// subject is the image manifest).
pub const ARTIFACT_TYPE: &str = "application/vnd.cstore.layer-index.v1";

/// Overlay's own attributes (redirects, metacopy, opaque) would let a layer
/// rewire the merged tree: never taken from an archive, never in an index.
pub fn xattr_allowed(name: &[u8]) -> bool {
    !(name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay."))
}

pub(crate) fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}
