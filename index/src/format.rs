//! The binary layer index: layout, validation and zero-copy accessors.
//!
//! ```text
//! index blob   = header (128) | entries (n × 64) | spans (m × 96) | chunks (k × 48) | heap
//! windows blob = one deflate window per gzip checkpoint that needs one, back to back
//!                (raw, or one zstd frame each), fetched by range with its span
//! ```
//!
//! Little-endian, no padding inside records. Entries are the tree as extraction
//! leaves it (see `tree`): a parent entry and one name component each, never a
//! path, so nothing in an index can name a place outside the layer root; the
//! entry number is the inode number. Spans cover the compressed blob from byte 0
//! to its end; span `i` is compressed `[cin_i - (bits_i > 0), cin_{i+1})` (the
//! last ends at the blob's end) and uncompressed `[out_i, out_{i+1})`.
//!
//! `Index::parse` validates everything in one linear pass (plus one sort for
//! the name lookup) before anything else reads the bytes: every offset, length,
//! order and reference is checked, so the accessors cannot go out of bounds and
//! a hostile index is refused with a reason.

use std::ops::Range;

use crate::error::{invalid, Result};

pub const MAGIC: [u8; 8] = *b"CSTIDX\0\x01";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 128;
pub const ENTRY_LEN: usize = 64;
pub const SPAN_LEN: usize = 96;
pub const CHUNK_LEN: usize = 48;

/// An index larger than this is refused (heap offsets are u32).
pub const MAX_INDEX_LEN: usize = 1 << 30;
/// Uncompressed bytes one span may expand to: the work and memory of one read
/// miss, and the decompression-bomb cap of `access`.
pub const MAX_SPAN_OUT: u64 = 64 << 20;
/// Compressed bytes of one span that holds data.
pub const MAX_SPAN_IN: u64 = 64 << 20;
/// A deflate window (what `inflateSetDictionary` takes).
pub const WINDOW_SIZE: usize = 32 << 10;
/// A stored window: raw (≤ 32 KiB) or zstd-compressed (with slack).
pub const MAX_WINDOW_LEN: u32 = 40 << 10;
pub const MAX_NAME: usize = 255;
/// symlink(2) refuses targets of PATH_MAX (4096) bytes and more.
pub const MAX_LINK: usize = 4095;
pub const MAX_XATTR_BLOCK: u32 = 1 << 20;
pub const MAX_XATTR_NAME: usize = 255;
pub const MAX_XATTR_VALUE: usize = 65536;
pub const MAX_SPARSE_REGIONS: usize = 1 << 16;

/// Header flags.
pub mod flags {
    /// Data is verified by the chunk table (sha256 of uncompressed chunks, as
    /// eStargz records them), not by span digests.
    pub const CHUNK_DIGESTS: u16 = 1;
    /// Each window in the windows blob is one zstd frame.
    pub const WINDOWS_ZSTD: u16 = 2;
    /// Uncompressed offsets address the payloads of the compressed frames or
    /// members (an eStargz import), not the tar stream: `uncompressed_size`
    /// is not the tar's length and data offsets are not tar offsets.
    pub const PAYLOAD_OFFSETS: u16 = 4;
    pub const ALL: u16 = CHUNK_DIGESTS | WINDOWS_ZSTD | PAYLOAD_OFFSETS;
}

/// Span flags.
pub mod span_flags {
    /// `cin` is the first byte of a gzip member header: inflate in gzip mode
    /// from there (no bits, no window).
    pub const MEMBER_START: u8 = 1;
    /// The span's sha256 is not recorded: it holds no data, or the index
    /// verifies data by chunks.
    pub const NO_DIGEST: u8 = 2;
    pub const ALL: u8 = MEMBER_START | NO_DIGEST;
}

/// Entry flags.
pub mod entry_flags {
    /// A directory that hides the lower layers' (`trusted.overlay.opaque=y`).
    pub const OPAQUE: u8 = 1;
    /// A directory the layer did not list but extraction made for an entry
    /// under it: its owner, mode and xattrs are the nearest lower layer's
    /// directory's (the snapshotter copies them), else these.
    pub const IMPLICIT: u8 = 2;
    /// A regular file whose stored data are the regions of its sparse map.
    pub const SPARSE: u8 = 4;
    pub const ALL: u8 = OPAQUE | IMPLICIT | SPARSE;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    Gzip = 1,
    Zstd = 2,
    None = 3,
}

impl Compression {
    pub(crate) fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Gzip),
            2 => Some(Self::Zstd),
            3 => Some(Self::None),
            _ => None,
        }
    }
}

/// Where an index came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Built by `IndexingReader` + `TreeBuilder` from the layer itself.
    Built = 1,
    /// Imported from an eStargz (or stargz zstd:chunked) TOC.
    Estargz = 2,
    /// Imported from a SOCI zTOC.
    Soci = 3,
}

impl Source {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Built),
            2 => Some(Self::Estargz),
            3 => Some(Self::Soci),
            _ => None,
        }
    }
}

/// What an entry is. A hardlink shares its target's inode: all its
/// attributes are the target's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Dir = 1,
    File = 2,
    Symlink = 3,
    Hardlink = 4,
    Char = 5,
    Block = 6,
    Fifo = 7,
    /// An overlay whiteout: a character device 0:0, as extraction makes
    /// for `.wh.NAME`.
    Whiteout = 8,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Dir,
            2 => Self::File,
            3 => Self::Symlink,
            4 => Self::Hardlink,
            5 => Self::Char,
            6 => Self::Block,
            7 => Self::Fifo,
            8 => Self::Whiteout,
            _ => return None,
        })
    }

    /// The file type bits `st_mode` must carry (0 for a hardlink, which has
    /// no attributes of its own).
    pub fn type_bits(self) -> u32 {
        match self {
            Kind::Dir => libc_s::IFDIR,
            Kind::File => libc_s::IFREG,
            Kind::Symlink => libc_s::IFLNK,
            Kind::Hardlink => 0,
            Kind::Char | Kind::Whiteout => libc_s::IFCHR,
            Kind::Block => libc_s::IFBLK,
            Kind::Fifo => libc_s::IFIFO,
        }
    }
}

/// st_mode file types (the values are Linux's, fixed by the ABI).
pub mod libc_s {
    pub const IFMT: u32 = 0o170000;
    pub const IFDIR: u32 = 0o040000;
    pub const IFREG: u32 = 0o100000;
    pub const IFLNK: u32 = 0o120000;
    pub const IFCHR: u32 = 0o020000;
    pub const IFBLK: u32 = 0o060000;
    pub const IFIFO: u32 = 0o010000;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub compression: Compression,
    pub flags: u16,
    /// sha256 of the compressed blob.
    pub layer_digest: [u8; 32],
    /// sha256 of the uncompressed tar stream (the config's diff_id).
    pub diff_id: [u8; 32],
    pub compressed_size: u64,
    /// Length of the uncompressed stream (of the payload space with
    /// `PAYLOAD_OFFSETS`).
    pub uncompressed_size: u64,
    pub entry_count: u32,
    pub span_count: u32,
    pub chunk_count: u32,
    pub heap_len: u32,
    pub windows_size: u64,
    /// The compressed span size the builder aimed at.
    pub span_target: u32,
    pub source: Source,
}

impl Header {
    pub fn layer_digest_str(&self) -> String {
        format!("sha256:{}", hex::encode(self.layer_digest))
    }
    pub fn diff_id_str(&self) -> String {
        format!("sha256:{}", hex::encode(self.diff_id))
    }
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// One entry, decoded (a copy: 56 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub parent: u32,
    pub kind: Kind,
    pub flags: u8,
    /// st_mode: file type and permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    /// st_size: a file's logical size (holes included), a symlink's target
    /// length, 0 otherwise.
    pub size: u64,
    data: u64,
}

impl Entry {
    pub fn is_opaque(&self) -> bool {
        self.flags & entry_flags::OPAQUE != 0
    }
    pub fn is_implicit(&self) -> bool {
        self.flags & entry_flags::IMPLICIT != 0
    }
    pub fn is_sparse(&self) -> bool {
        self.flags & entry_flags::SPARSE != 0
    }
    /// A regular file's data: its offset in the uncompressed stream (for a
    /// sparse file, its regions are stored there back to back).
    pub fn data_offset(&self) -> Option<u64> {
        (self.kind == Kind::File).then_some(self.data)
    }
    /// A hardlink's target entry (an earlier regular file).
    pub fn hardlink_target(&self) -> Option<u32> {
        (self.kind == Kind::Hardlink).then_some(self.data as u32)
    }
    /// A device's (major, minor).
    pub fn rdev(&self) -> Option<(u32, u32)> {
        matches!(self.kind, Kind::Char | Kind::Block)
            .then_some(((self.data >> 32) as u32, self.data as u32))
    }
}

/// One span, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// Compressed offset of the first whole byte after the checkpoint.
    pub cin: u64,
    /// Uncompressed offset of the span's first byte.
    pub out: u64,
    pub sha256: [u8; 32],
    /// Bits of the checkpoint's first deflate block in the top of byte
    /// `cin - 1` (0..=7).
    pub bits: u8,
    pub flags: u8,
    pub window_off: u64,
    pub window_len: u32,
    /// sha256 of the raw (uncompressed) window.
    pub window_sha256: [u8; 32],
    /// Compressed bytes to fetch: `[cin - (bits > 0), next.cin)`.
    pub compressed: Range<u64>,
    /// Uncompressed bytes it yields: `[out, next.out)` (maybe empty).
    pub uncompressed: Range<u64>,
}

impl Span {
    pub fn member_start(&self) -> bool {
        self.flags & span_flags::MEMBER_START != 0
    }
    pub fn has_digest(&self) -> bool {
        self.flags & span_flags::NO_DIGEST == 0
    }
    /// Where its window is in the windows blob, if it needs one.
    pub fn window(&self) -> Option<Range<u64>> {
        (self.window_len > 0).then(|| self.window_off..self.window_off + self.window_len as u64)
    }
}

/// A chunk of a file's data with the sha256 of its uncompressed bytes
/// (eStargz's chunkDigest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub entry: u32,
    /// Offset in the file's data.
    pub offset: u64,
    pub size: u32,
    pub sha256: [u8; 32],
}

pub(crate) fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
pub(crate) fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
pub(crate) fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn h32(b: &[u8], o: usize) -> [u8; 32] {
    b[o..o + 32].try_into().unwrap()
}

/// A validated index over any byte buffer (a Vec, a slice, an mmap).
pub struct Index<B: AsRef<[u8]> = Vec<u8>> {
    buf: B,
    hdr: Header,
    entries_at: usize,
    spans_at: usize,
    chunks_at: usize,
    heap_at: usize,
    /// Children of every directory, sorted by name: `children[first[d]..first[d + 1]]`.
    children: Vec<u32>,
    first: Vec<u32>,
    /// Link counts (st_nlink) per entry.
    nlink: Vec<u32>,
}

impl<B: AsRef<[u8]>> std::fmt::Debug for Index<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("header", &self.hdr).finish()
    }
}

impl<B: AsRef<[u8]>> Index<B> {
    /// Validate `buf` as an index. Nothing is copied; the lookup tables cost
    /// 12 bytes per entry.
    pub fn parse(buf: B) -> Result<Self> {
        let hdr = parse_header(buf.as_ref())?;
        let n = hdr.entry_count as usize;
        let m = hdr.span_count as usize;
        let k = hdr.chunk_count as usize;
        let entries_at = HEADER_LEN;
        let spans_at = entries_at + n * ENTRY_LEN;
        let chunks_at = spans_at + m * SPAN_LEN;
        let heap_at = chunks_at + k * CHUNK_LEN;
        let mut idx = Index {
            buf,
            hdr,
            entries_at,
            spans_at,
            chunks_at,
            heap_at,
            children: Vec::new(),
            first: Vec::new(),
            nlink: Vec::new(),
        };
        idx.validate_spans()?;
        idx.validate_entries()?;
        idx.validate_chunks()?;
        idx.build_lookup()?;
        Ok(idx)
    }

    pub fn header(&self) -> &Header {
        &self.hdr
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_ref()
    }

    pub fn into_inner(self) -> B {
        self.buf
    }

    pub fn entry_count(&self) -> u32 {
        self.hdr.entry_count
    }

    pub fn span_count(&self) -> usize {
        self.hdr.span_count as usize
    }

    pub fn chunk_count(&self) -> usize {
        self.hdr.chunk_count as usize
    }

    fn heap(&self) -> &[u8] {
        &self.buf.as_ref()[self.heap_at..]
    }

    fn erec(&self, i: u32) -> &[u8] {
        let o = self.entries_at + i as usize * ENTRY_LEN;
        &self.buf.as_ref()[o..o + ENTRY_LEN]
    }

    /// Entry `i` (panics if `i >= entry_count()`, like slice indexing).
    pub fn entry(&self, i: u32) -> Entry {
        assert!(i < self.hdr.entry_count, "entry {i} out of range");
        decode_entry(self.erec(i))
    }

    pub fn get(&self, i: u32) -> Option<Entry> {
        (i < self.hdr.entry_count).then(|| self.entry(i))
    }

    /// Entry `i`'s name (one path component; empty for the root).
    pub fn name(&self, i: u32) -> &[u8] {
        let r = self.erec(i);
        let (off, len) = (u32_at(r, 4) as usize, u16_at(r, 8) as usize);
        if len == 0 {
            // The root's (validated to be empty; its offset is not used).
            return &[];
        }
        &self.heap()[off..off + len]
    }

    pub fn parent(&self, i: u32) -> u32 {
        u32_at(self.erec(i), 0)
    }

    /// The path of entry `i` from the root, for messages (`a/b/c`).
    pub fn path(&self, mut i: u32) -> Vec<u8> {
        let mut comps = Vec::new();
        while i != 0 {
            comps.push(self.name(i));
            i = self.parent(i);
        }
        comps.reverse();
        comps.join(&b'/')
    }

    fn aux(&self, i: u32) -> &[u8] {
        let r = self.erec(i);
        let (off, len) = (u32_at(r, 52) as usize, u32_at(r, 56) as usize);
        &self.heap()[off..off + len]
    }

    /// A symlink's target (returned by readlink, never resolved).
    pub fn link_target(&self, i: u32) -> Option<&[u8]> {
        (self.entry(i).kind == Kind::Symlink).then(|| self.aux(i))
    }

    /// A sparse file's data regions (offset in the file, length), in order;
    /// the stored data is these regions back to back from `data_offset`.
    pub fn sparse_map(&self, i: u32) -> Option<impl Iterator<Item = (u64, u64)> + '_> {
        self.entry(i).is_sparse().then(|| {
            self.aux(i)
                .chunks_exact(16)
                .map(|c| (u64_at(c, 0), u64_at(c, 8)))
        })
    }

    /// Where bytes `range` of file entry `i` (a hardlink: its target's) are
    /// in the uncompressed stream: (offset in the file, stream range) for
    /// each stored piece overlapping `range`, in order. What no piece covers
    /// in a sparse file is a hole (zeros); past the end there is nothing.
    pub fn file_data(&self, i: u32, range: Range<u64>) -> Vec<(u64, Range<u64>)> {
        let mut e = self.entry(i);
        let mut i = i;
        if let Some(t) = e.hardlink_target() {
            i = t;
            e = self.entry(t);
        }
        let Some(data) = e.data_offset() else {
            return Vec::new();
        };
        let (a, b) = (range.start, range.end.min(e.size));
        if a >= b {
            return Vec::new();
        }
        let mut out = Vec::new();
        match self.sparse_map(i) {
            None => out.push((a, data + a..data + b)),
            Some(map) => {
                let mut stored = data;
                for (off, len) in map {
                    let (s, t) = (off.max(a), (off + len).min(b));
                    if s < t {
                        out.push((s, stored + (s - off)..stored + (t - off)));
                    }
                    stored += len;
                }
            }
        }
        out
    }

    /// Entry `i`'s extended attributes (name, value), sorted by name. A
    /// hardlink has its target's.
    pub fn xattrs(&self, i: u32) -> Xattrs<'_> {
        let xoff = u32_at(self.erec(i), 60);
        if xoff == u32::MAX {
            return Xattrs { rest: &[] };
        }
        let h = self.heap();
        let len = u32_at(h, xoff as usize) as usize;
        Xattrs {
            rest: &h[xoff as usize + 4..xoff as usize + 4 + len],
        }
    }

    /// st_nlink: 2 + subdirectories for a directory, 1 + hardlinks for a
    /// file, 1 otherwise.
    pub fn nlink(&self, i: u32) -> u32 {
        self.nlink[i as usize]
    }

    /// The children of directory `dir`, sorted by name (empty for others).
    pub fn children(&self, dir: u32) -> &[u32] {
        let d = dir as usize;
        &self.children[self.first[d] as usize..self.first[d + 1] as usize]
    }

    /// The entry called `name` in directory `dir`.
    pub fn lookup(&self, dir: u32, name: &[u8]) -> Option<u32> {
        let c = self.children(dir);
        c.binary_search_by(|&e| self.name(e).cmp(name))
            .ok()
            .map(|p| c[p])
    }

    /// The entry at a relative path (`a/b/c`), without following symlinks.
    pub fn lookup_path(&self, path: &[u8]) -> Option<u32> {
        let mut cur = 0u32;
        for c in path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            cur = self.lookup(cur, c)?;
        }
        Some(cur)
    }

    /// Span `i` (panics if out of range).
    pub fn span(&self, i: usize) -> Span {
        assert!(i < self.span_count(), "span {i} out of range");
        let r = &self.buf.as_ref()[self.spans_at + i * SPAN_LEN..][..SPAN_LEN];
        let (next_in, next_out) = if i + 1 < self.span_count() {
            let n = &self.buf.as_ref()[self.spans_at + (i + 1) * SPAN_LEN..][..SPAN_LEN];
            (u64_at(n, 0), u64_at(n, 8))
        } else {
            (self.hdr.compressed_size, self.hdr.uncompressed_size)
        };
        let (cin, out, bits) = (u64_at(r, 0), u64_at(r, 8), r[48]);
        Span {
            cin,
            out,
            sha256: h32(r, 16),
            bits,
            flags: r[49],
            window_len: u32_at(r, 52),
            window_off: u64_at(r, 56),
            window_sha256: h32(r, 64),
            compressed: cin - u64::from(bits > 0)..next_in,
            uncompressed: out..next_out,
        }
    }

    fn span_out(&self, i: usize) -> u64 {
        u64_at(&self.buf.as_ref()[self.spans_at + i * SPAN_LEN..], 8)
    }

    /// The spans whose uncompressed bytes intersect `[start, end)`, in order.
    /// The range may include empty spans, which a read needs nothing from.
    pub fn spans_for(&self, start: u64, end: u64) -> Range<usize> {
        let m = self.span_count();
        if start >= end || start >= self.hdr.uncompressed_size {
            return 0..0;
        }
        // The last span starting at or before `start` (of several starting
        // there, the last: the others are empty).
        let first = partition(m, |i| self.span_out(i) <= start) - 1;
        let last = partition(m, |i| self.span_out(i) < end);
        first..last
    }

    /// The span holding uncompressed offset `off`.
    pub fn span_at(&self, off: u64) -> Option<usize> {
        let r = self.spans_for(off, off + 1);
        (!r.is_empty()).then_some(r.start)
    }

    pub fn chunk(&self, i: usize) -> Chunk {
        assert!(i < self.chunk_count(), "chunk {i} out of range");
        decode_chunk(&self.buf.as_ref()[self.chunks_at + i * CHUNK_LEN..][..CHUNK_LEN])
    }

    /// Where chunk `i` is in the uncompressed (payload) space.
    pub fn chunk_range(&self, c: &Chunk) -> Range<u64> {
        let start = self.entry(c.entry).data + c.offset;
        start..start + c.size as u64
    }

    /// The chunks that lie in span `i` (with `CHUNK_DIGESTS`), in order.
    pub fn chunks_in_span(&self, i: usize) -> Range<usize> {
        let s = self.span(i);
        let k = self.chunk_count();
        let pos = |j: usize| {
            let c = self.chunk(j);
            self.entry(c.entry).data + c.offset
        };
        let a = partition(k, |j| pos(j) < s.uncompressed.start);
        let b = partition(k, |j| pos(j) < s.uncompressed.end);
        a..b
    }

    fn validate_spans(&self) -> Result<()> {
        let h = &self.hdr;
        let m = self.span_count();
        let gzip = h.compression == Compression::Gzip;
        let chunked = h.has(flags::CHUNK_DIGESTS);
        let max_window = if h.has(flags::WINDOWS_ZSTD) {
            MAX_WINDOW_LEN
        } else {
            WINDOW_SIZE as u32
        };
        let mut wend = 0u64;
        for i in 0..m {
            let r = &self.buf.as_ref()[self.spans_at + i * SPAN_LEN..][..SPAN_LEN];
            let (cin, out, bits, fl) = (u64_at(r, 0), u64_at(r, 8), r[48], r[49]);
            let (wlen, woff) = (u32_at(r, 52), u64_at(r, 56));
            let bad = |why: &str| invalid(format!("span {i}: {why}"));
            if u16_at(r, 50) != 0 || fl & !span_flags::ALL != 0 {
                return Err(bad("unknown flags"));
            }
            if i == 0 && (cin != 0 || out != 0) {
                return Err(bad("the first span does not start at byte 0"));
            }
            if cin >= h.compressed_size || out > h.uncompressed_size {
                return Err(bad("starts past the end of the layer"));
            }
            if bits > 7 {
                return Err(bad("bit offset above 7"));
            }
            if bits > 0 && (!gzip || cin == 0 || fl & span_flags::MEMBER_START != 0) {
                return Err(bad("a bit offset where there can be none"));
            }
            if fl & span_flags::MEMBER_START != 0 && !gzip {
                return Err(bad("gzip member start in a non-gzip layer"));
            }
            if h.compression == Compression::None && cin != out {
                return Err(bad(
                    "compressed and uncompressed offsets differ in an uncompressed layer",
                ));
            }
            let (next_in, next_out) = if i + 1 < m {
                let n = &self.buf.as_ref()[self.spans_at + (i + 1) * SPAN_LEN..][..SPAN_LEN];
                (u64_at(n, 0), u64_at(n, 8))
            } else {
                (h.compressed_size, h.uncompressed_size)
            };
            if next_in <= cin || next_out < out {
                return Err(invalid(format!(
                    "spans {i} and {}: overlapping or out of order",
                    i + 1
                )));
            }
            let out_len = next_out - out;
            if out_len > MAX_SPAN_OUT {
                return Err(bad(&format!(
                    "expands to {out_len} bytes, over the {MAX_SPAN_OUT} byte cap"
                )));
            }
            let in_len = next_in - (cin - u64::from(bits > 0));
            if out_len > 0 && in_len > MAX_SPAN_IN {
                return Err(bad(&format!(
                    "{in_len} compressed bytes, over the {MAX_SPAN_IN} byte cap"
                )));
            }
            let digest = h32(r, 16);
            if fl & span_flags::NO_DIGEST != 0 {
                if out_len > 0 && !chunked {
                    return Err(bad("data without a digest"));
                }
                if digest != [0; 32] {
                    return Err(bad("a digest where the flags say there is none"));
                }
            }
            if wlen > 0 {
                if !gzip || fl & span_flags::MEMBER_START != 0 {
                    return Err(bad("a window where there can be none"));
                }
                if wlen > max_window {
                    return Err(bad("window too large"));
                }
            } else if h32(r, 64) != [0; 32] {
                return Err(bad("a window digest without a window"));
            }
            if woff != wend {
                return Err(bad("window not where the previous one ended"));
            }
            wend += wlen as u64;
        }
        if wend != h.windows_size {
            return Err(invalid(format!(
                "windows add up to {wend} bytes, the header says {}",
                h.windows_size
            )));
        }
        Ok(())
    }

    fn validate_entries(&mut self) -> Result<()> {
        let n = self.hdr.entry_count as usize;
        let usize_ = self.hdr.uncompressed_size;
        let heap_len = self.hdr.heap_len as u64;
        let buf = self.buf.as_ref();
        let heap = &buf[self.heap_at..];
        let in_heap =
            |off: u32, len: u64| (off as u64).checked_add(len).is_some_and(|e| e <= heap_len);
        let mut nlink = vec![1u32; n];
        for i in 0..n {
            let r = &buf[self.entries_at + i * ENTRY_LEN..][..ENTRY_LEN];
            let bad = |why: String| invalid(format!("entry {i}: {why}"));
            let (parent, name_off, name_len) =
                (u32_at(r, 0) as usize, u32_at(r, 4), u16_at(r, 8) as usize);
            let kind =
                Kind::from_u8(r[10]).ok_or_else(|| bad(format!("unknown kind {}", r[10])))?;
            let fl = r[11];
            let (mode, size, data) = (u32_at(r, 12), u64_at(r, 36), u64_at(r, 44));
            let (aux_off, aux_len, xoff) = (u32_at(r, 52), u32_at(r, 56), u32_at(r, 60));
            if u32_at(r, 32) >= 1_000_000_000 {
                return Err(bad("mtime nanoseconds out of range".into()));
            }
            if fl & !entry_flags::ALL != 0 {
                return Err(bad("unknown flags".into()));
            }
            if fl & (entry_flags::OPAQUE | entry_flags::IMPLICIT) != 0 && kind != Kind::Dir {
                return Err(bad("directory flags on a non-directory".into()));
            }
            if fl & entry_flags::SPARSE != 0 && kind != Kind::File {
                return Err(bad("sparse flag on a non-file".into()));
            }
            if mode & libc_s::IFMT != kind.type_bits() || mode & !(libc_s::IFMT | 0o7777) != 0 {
                return Err(bad(format!("mode {mode:o} does not fit a {kind:?}")));
            }
            if i == 0 {
                if kind != Kind::Dir || parent != 0 || name_len != 0 {
                    return Err(invalid("entry 0 is not the root directory"));
                }
            } else {
                // Parents come first and are directories: the tree has no
                // cycles and every entry is under the root.
                if parent >= i || buf[self.entries_at + parent * ENTRY_LEN + 10] != Kind::Dir as u8
                {
                    return Err(bad(format!("parent {parent} is not an earlier directory")));
                }
                if name_len == 0 || name_len > MAX_NAME || !in_heap(name_off, name_len as u64) {
                    return Err(bad("name length or place out of bounds".into()));
                }
                let name = &heap[name_off as usize..name_off as usize + name_len];
                if name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
                    return Err(bad(format!(
                        "name {:?} is not one path component",
                        String::from_utf8_lossy(name)
                    )));
                }
                if kind == Kind::Dir {
                    nlink[parent] += 1;
                }
            }
            if kind == Kind::Dir {
                nlink[i] += 1;
            }
            if !in_heap(aux_off, aux_len as u64) {
                return Err(bad("link target or sparse map outside the heap".into()));
            }
            let aux = &heap[aux_off as usize..aux_off as usize + aux_len as usize];
            match kind {
                Kind::File => {
                    let stored = if fl & entry_flags::SPARSE != 0 {
                        check_sparse(aux, size).map_err(|w| bad(w.into()))?
                    } else {
                        if aux_len != 0 {
                            return Err(bad("a sparse map on a file not flagged sparse".into()));
                        }
                        size
                    };
                    if data.checked_add(stored).is_none_or(|e| e > usize_) {
                        return Err(bad("data past the end of the layer".into()));
                    }
                }
                Kind::Symlink => {
                    if aux_len == 0 || aux_len as usize > MAX_LINK || aux.contains(&0) {
                        return Err(bad("symlink target empty, too long or with a NUL".into()));
                    }
                    if size != aux_len as u64 || data != 0 {
                        return Err(bad("symlink size is not its target's length".into()));
                    }
                }
                Kind::Hardlink => {
                    let t = data as usize;
                    if data >= i as u64
                        || buf[self.entries_at + t * ENTRY_LEN + 10] != Kind::File as u8
                    {
                        return Err(bad(format!(
                            "hardlink to {data}, not an earlier regular file"
                        )));
                    }
                    if size != 0 || aux_len != 0 || xoff != u32::MAX || fl != 0 {
                        return Err(bad("a hardlink with attributes of its own".into()));
                    }
                    nlink[t] += 1;
                }
                Kind::Dir | Kind::Fifo | Kind::Whiteout => {
                    if data != 0 || size != 0 || aux_len != 0 {
                        return Err(bad(format!("data, size or target on a {kind:?}")));
                    }
                }
                Kind::Char | Kind::Block => {
                    if size != 0 || aux_len != 0 {
                        return Err(bad(format!("size or target on a {kind:?}")));
                    }
                }
            }
            if xoff != u32::MAX {
                if !in_heap(xoff, 4) {
                    return Err(bad("xattrs outside the heap".into()));
                }
                let xl = u32_at(heap, xoff as usize);
                if xl > MAX_XATTR_BLOCK || !in_heap(xoff + 4, xl as u64) {
                    return Err(bad("xattrs too large or outside the heap".into()));
                }
                check_xattrs(&heap[xoff as usize + 4..(xoff + 4 + xl) as usize])
                    .map_err(|w| bad(w.into()))?;
            }
        }
        self.nlink = nlink;
        Ok(())
    }

    fn validate_chunks(&self) -> Result<()> {
        let k = self.chunk_count();
        let chunked = self.hdr.has(flags::CHUNK_DIGESTS);
        if !chunked {
            return if k == 0 {
                Ok(())
            } else {
                Err(invalid("a chunk table without the chunk-digest flag"))
            };
        }
        let n = self.hdr.entry_count as usize;
        // Chunks are in stream order, a file's in file order, and together
        // they cover every byte of every file's data.
        let mut covered = vec![0u64; n];
        let mut prev_end = 0u64;
        for j in 0..k {
            let c = self.chunk(j);
            let bad = |why: &str| invalid(format!("chunk {j}: {why}"));
            if c.entry as usize >= n {
                return Err(bad("entry out of range"));
            }
            let e = self.entry(c.entry);
            if e.kind != Kind::File || e.is_sparse() {
                return Err(bad("not of a plain regular file"));
            }
            if c.size == 0 || c.offset != covered[c.entry as usize] {
                return Err(bad("not where the file's previous chunk ended"));
            }
            let end = c.offset + c.size as u64;
            if end > e.size {
                return Err(bad("past the end of its file"));
            }
            covered[c.entry as usize] = end;
            let start = e.data + c.offset;
            if start < prev_end {
                return Err(bad("chunks overlap or are out of order"));
            }
            prev_end = start + c.size as u64;
            let s = self
                .span_at(start)
                .ok_or_else(|| bad("outside every span"))?;
            if prev_end > self.span(s).uncompressed.end {
                return Err(bad("crosses a span boundary"));
            }
        }
        for (i, &cov) in covered.iter().enumerate() {
            let e = self.entry(i as u32);
            if e.kind == Kind::File && cov != e.size {
                return Err(invalid(format!("entry {i}: data not covered by chunks")));
            }
        }
        Ok(())
    }

    /// Children sorted by (parent, name), so a directory's are one slice;
    /// two entries with the same name in one directory are refused.
    fn build_lookup(&mut self) -> Result<()> {
        let n = self.hdr.entry_count as usize;
        let mut first = vec![0u32; n + 1];
        for i in 1..n {
            first[self.parent(i as u32) as usize + 1] += 1;
        }
        for d in 0..n {
            first[d + 1] += first[d];
        }
        let mut fill = first.clone();
        let mut children = vec![0u32; n.saturating_sub(1)];
        for i in 1..n {
            let p = self.parent(i as u32) as usize;
            children[fill[p] as usize] = i as u32;
            fill[p] += 1;
        }
        for d in 0..n {
            let s = &mut children[first[d] as usize..first[d + 1] as usize];
            if s.len() > 1 {
                let this = &*self;
                s.sort_unstable_by(|&a, &b| this.name(a).cmp(this.name(b)));
                if let Some(w) = s.windows(2).find(|w| this.name(w[0]) == this.name(w[1])) {
                    return Err(invalid(format!(
                        "entries {} and {} have the same name in directory {d}",
                        w[0], w[1]
                    )));
                }
            }
        }
        self.children = children;
        self.first = first;
        Ok(())
    }
}

/// Index of the first `i` in `0..n` for which `pred(i)` is false
/// (`pred` is true for a prefix).
fn partition(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

fn parse_header(b: &[u8]) -> Result<Header> {
    if b.len() > MAX_INDEX_LEN {
        return Err(invalid(format!(
            "{} bytes, over the {MAX_INDEX_LEN} byte cap",
            b.len()
        )));
    }
    if b.len() < HEADER_LEN || b[..8] != MAGIC {
        return Err(invalid("not a cstore layer index (bad magic)"));
    }
    if u16_at(b, 8) != VERSION || u16_at(b, 10) as usize != HEADER_LEN {
        return Err(invalid(format!("unsupported version {}", u16_at(b, 8))));
    }
    let compression = Compression::from_u8(b[12])
        .ok_or_else(|| invalid(format!("unknown compression {}", b[12])))?;
    if b[13] != 1 {
        return Err(invalid(format!("unknown hash {}", b[13])));
    }
    let fl = u16_at(b, 14);
    if fl & !flags::ALL != 0 {
        return Err(invalid(format!("unknown flags {fl:#x}")));
    }
    let source =
        Source::from_u8(b[124]).ok_or_else(|| invalid(format!("unknown source {}", b[124])))?;
    if b[125..128] != [0; 3] {
        return Err(invalid("reserved header bytes set"));
    }
    let h = Header {
        compression,
        flags: fl,
        layer_digest: h32(b, 16),
        diff_id: h32(b, 48),
        compressed_size: u64_at(b, 80),
        uncompressed_size: u64_at(b, 88),
        entry_count: u32_at(b, 96),
        span_count: u32_at(b, 100),
        chunk_count: u32_at(b, 104),
        heap_len: u32_at(b, 108),
        windows_size: u64_at(b, 112),
        span_target: u32_at(b, 120),
        source,
    };
    let need = HEADER_LEN as u64
        + h.entry_count as u64 * ENTRY_LEN as u64
        + h.span_count as u64 * SPAN_LEN as u64
        + h.chunk_count as u64 * CHUNK_LEN as u64
        + h.heap_len as u64;
    if need != b.len() as u64 {
        return Err(invalid(format!(
            "{} bytes, the header says {need}",
            b.len()
        )));
    }
    if h.entry_count == 0 {
        return Err(invalid("no root entry"));
    }
    if h.span_count == 0 || h.compressed_size == 0 {
        return Err(invalid("no spans"));
    }
    if compression != Compression::Gzip && (h.windows_size != 0 || fl & flags::WINDOWS_ZSTD != 0) {
        return Err(invalid("windows in a layer that is not gzip"));
    }
    if compression == Compression::None && h.compressed_size != h.uncompressed_size {
        return Err(invalid("uncompressed layer with two sizes"));
    }
    if fl & flags::PAYLOAD_OFFSETS != 0 && fl & flags::CHUNK_DIGESTS == 0 {
        return Err(invalid("payload offsets without chunk digests"));
    }
    Ok(h)
}

fn decode_entry(r: &[u8]) -> Entry {
    Entry {
        parent: u32_at(r, 0),
        // Validated at parse.
        kind: Kind::from_u8(r[10]).expect("validated kind"),
        flags: r[11],
        mode: u32_at(r, 12),
        uid: u32_at(r, 16),
        gid: u32_at(r, 20),
        mtime: (u64_at(r, 24) as i64, u32_at(r, 32)),
        size: u64_at(r, 36),
        data: u64_at(r, 44),
    }
}

fn decode_chunk(r: &[u8]) -> Chunk {
    Chunk {
        entry: u32_at(r, 0),
        size: u32_at(r, 4),
        offset: u64_at(r, 8),
        sha256: h32(r, 16),
    }
}

/// A sparse map: (offset, length) pairs, in order, inside the file; returns
/// the stored length (the sum of the lengths).
fn check_sparse(map: &[u8], size: u64) -> std::result::Result<u64, &'static str> {
    if !map.len().is_multiple_of(16) || map.len() / 16 > MAX_SPARSE_REGIONS {
        return Err("sparse map malformed or too large");
    }
    let (mut end, mut total) = (0u64, 0u64);
    for c in map.chunks_exact(16) {
        let (off, len) = (u64_at(c, 0), u64_at(c, 8));
        if off < end || off.checked_add(len).is_none_or(|e| e > size) {
            return Err("sparse regions out of order or past the file's end");
        }
        end = off + len;
        total += len;
    }
    Ok(total)
}

/// An xattr block: (u16 name length, u32 value length, name, value)*, names
/// strictly increasing, none of overlay's own.
fn check_xattrs(mut x: &[u8]) -> std::result::Result<(), &'static str> {
    let mut prev: &[u8] = &[];
    while !x.is_empty() {
        if x.len() < 6 {
            return Err("xattr block truncated");
        }
        let (kl, vl) = (u16_at(x, 0) as usize, u32_at(x, 2) as usize);
        if kl == 0 || kl > MAX_XATTR_NAME || vl > MAX_XATTR_VALUE || 6 + kl + vl > x.len() {
            return Err("xattr name or value out of bounds");
        }
        let k = &x[6..6 + kl];
        if k.contains(&0) {
            return Err("NUL in an xattr name");
        }
        if !crate::xattr_allowed(k) {
            return Err("overlay xattr in an index");
        }
        if k <= prev {
            return Err("xattr names not sorted or repeated");
        }
        prev = k;
        x = &x[6 + kl + vl..];
    }
    Ok(())
}

/// An entry's extended attributes.
#[derive(Clone)]
pub struct Xattrs<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Xattrs<'a> {
    type Item = (&'a [u8], &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let x = self.rest;
        let (kl, vl) = (u16_at(x, 0) as usize, u32_at(x, 2) as usize);
        self.rest = &x[6 + kl + vl..];
        Some((&x[6..6 + kl], &x[6 + kl..6 + kl + vl]))
    }
}
