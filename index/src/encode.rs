//! Writing an index: owned records in, validated bytes out.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::format::{
    entry_flags, flags, span_flags, Compression, Index, Kind, Source, HEADER_LEN, MAGIC, VERSION,
};

/// One entry of the tree, owned (what `TreeBuilder` and the importers make).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryRec {
    /// An earlier directory entry (0, the root, for top-level entries).
    pub parent: u32,
    /// One path component (empty for the root).
    pub name: Vec<u8>,
    pub kind: Kind,
    pub opaque: bool,
    pub implicit: bool,
    /// Permission bits with setuid/setgid/sticky (the type bits come from
    /// `kind`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    /// A file's logical size (a symlink's is its target's length).
    pub size: u64,
    /// File: uncompressed data offset; hardlink: target entry; device:
    /// major << 32 | minor.
    pub data: u64,
    /// Symlink target.
    pub link: Vec<u8>,
    /// Sparse file: data regions (offset, length).
    pub sparse: Option<Vec<(u64, u64)>>,
    /// Sorted by name, no duplicates.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl EntryRec {
    pub fn new(parent: u32, name: &[u8], kind: Kind) -> Self {
        EntryRec {
            parent,
            name: name.to_vec(),
            kind,
            opaque: false,
            implicit: false,
            perm: 0,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            size: 0,
            data: 0,
            link: Vec::new(),
            sparse: None,
            xattrs: Vec::new(),
        }
    }
}

/// One span, owned. See `format::Span` for the fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpanRec {
    pub cin: u64,
    pub out: u64,
    pub sha256: [u8; 32],
    pub bits: u8,
    pub flags: u8,
    pub window_off: u64,
    pub window_len: u32,
    pub window_sha256: [u8; 32],
}

impl SpanRec {
    pub fn member_start(&self) -> bool {
        self.flags & span_flags::MEMBER_START != 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRec {
    pub entry: u32,
    pub offset: u64,
    pub size: u32,
    pub sha256: [u8; 32],
}

/// Everything an index holds; `encode` lays it out and validates it.
#[derive(Clone, Debug)]
pub struct IndexBuilder {
    pub compression: Compression,
    pub source: Source,
    pub layer_digest: [u8; 32],
    pub diff_id: [u8; 32],
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub span_target: u32,
    /// Header flags (`format::flags`).
    pub flags: u16,
    pub windows_size: u64,
    pub entries: Vec<EntryRec>,
    pub spans: Vec<SpanRec>,
    pub chunks: Vec<ChunkRec>,
}

fn put16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes())
}
fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes())
}
fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes())
}

/// Parse `sha256:<hex>` (or bare hex) into bytes.
pub fn parse_digest(d: &str) -> Result<[u8; 32]> {
    let hexpart = d.strip_prefix("sha256:").unwrap_or(d);
    let mut out = [0u8; 32];
    hex::decode_to_slice(hexpart, &mut out)
        .map_err(|_| Error::InvalidIndex(format!("not a sha256 digest: {d:?}")))?;
    Ok(out)
}

struct Heap {
    bytes: Vec<u8>,
    seen: HashMap<Vec<u8>, u32>,
}

impl Heap {
    /// Store `s` once (names, targets and xattr blocks repeat a lot).
    fn intern(&mut self, s: &[u8]) -> Result<u32> {
        if s.is_empty() {
            return Ok(0);
        }
        if let Some(&o) = self.seen.get(s) {
            return Ok(o);
        }
        let o = u32::try_from(self.bytes.len())
            .map_err(|_| Error::Unsupported("index heap over 4 GiB".into()))?;
        self.bytes.extend_from_slice(s);
        self.seen.insert(s.to_vec(), o);
        Ok(o)
    }
}

impl IndexBuilder {
    /// The index bytes, validated by `Index::parse` (a builder bug or input
    /// the format cannot hold is an error here, never a bad index on disk).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let b = self.encode_unvalidated()?;
        Index::parse(&b[..]).map_err(|e| match e {
            Error::InvalidIndex(r) => {
                Error::Unsupported(format!("the index built is not valid: {r}"))
            }
            e => e,
        })?;
        Ok(b)
    }

    /// The bytes, without the validation (for tests and fuzz seeds: the
    /// result may be an invalid index).
    pub fn encode_unvalidated(&self) -> Result<Vec<u8>> {
        let mut heap = Heap {
            bytes: Vec::new(),
            seen: HashMap::new(),
        };
        let mut ents = Vec::with_capacity(self.entries.len() * 64);
        for e in &self.entries {
            let name_off = heap.intern(&e.name)?;
            let aux: Vec<u8> = match (&e.sparse, e.kind) {
                (Some(map), Kind::File) => map
                    .iter()
                    .flat_map(|&(o, l)| o.to_le_bytes().into_iter().chain(l.to_le_bytes()))
                    .collect(),
                _ => e.link.clone(),
            };
            let aux_off = heap.intern(&aux)?;
            let xoff = if e.xattrs.is_empty() {
                u32::MAX
            } else {
                let mut blk = vec![0u8; 4];
                for (k, v) in &e.xattrs {
                    put16(&mut blk, k.len() as u16);
                    put32(&mut blk, v.len() as u32);
                    blk.extend_from_slice(k);
                    blk.extend_from_slice(v);
                }
                let l = (blk.len() - 4) as u32;
                blk[0..4].copy_from_slice(&l.to_le_bytes());
                heap.intern(&blk)?
            };
            let mut fl = 0u8;
            if e.opaque {
                fl |= entry_flags::OPAQUE;
            }
            if e.implicit {
                fl |= entry_flags::IMPLICIT;
            }
            if e.sparse.is_some() {
                fl |= entry_flags::SPARSE;
            }
            let mode = if e.kind == Kind::Hardlink {
                0
            } else {
                e.kind.type_bits() | (e.perm & 0o7777)
            };
            put32(&mut ents, e.parent);
            put32(&mut ents, name_off);
            put16(&mut ents, e.name.len().min(u16::MAX as usize) as u16);
            ents.push(e.kind as u8);
            ents.push(fl);
            put32(&mut ents, mode);
            put32(&mut ents, e.uid);
            put32(&mut ents, e.gid);
            put64(&mut ents, e.mtime.0 as u64);
            put32(&mut ents, e.mtime.1);
            put64(&mut ents, e.size);
            put64(&mut ents, e.data);
            put32(&mut ents, aux_off);
            put32(&mut ents, aux.len().min(u32::MAX as usize) as u32);
            put32(&mut ents, xoff);
        }
        let mut spans = Vec::with_capacity(self.spans.len() * 96);
        for s in &self.spans {
            put64(&mut spans, s.cin);
            put64(&mut spans, s.out);
            spans.extend_from_slice(&s.sha256);
            spans.push(s.bits);
            spans.push(s.flags);
            put16(&mut spans, 0);
            put32(&mut spans, s.window_len);
            put64(&mut spans, s.window_off);
            spans.extend_from_slice(&s.window_sha256);
        }
        let mut chunks = Vec::with_capacity(self.chunks.len() * 48);
        for c in &self.chunks {
            put32(&mut chunks, c.entry);
            put32(&mut chunks, c.size);
            put64(&mut chunks, c.offset);
            chunks.extend_from_slice(&c.sha256);
        }
        let heap_len = u32::try_from(heap.bytes.len())
            .map_err(|_| Error::Unsupported("index heap over 4 GiB".into()))?;
        let count = |n: usize, what: &str| {
            u32::try_from(n).map_err(|_| Error::Unsupported(format!("too many {what}")))
        };
        let mut b = Vec::with_capacity(
            HEADER_LEN + ents.len() + spans.len() + chunks.len() + heap.bytes.len(),
        );
        b.extend_from_slice(&MAGIC);
        put16(&mut b, VERSION);
        put16(&mut b, HEADER_LEN as u16);
        b.push(self.compression as u8);
        b.push(1); // sha256
        put16(&mut b, self.flags & flags::ALL);
        b.extend_from_slice(&self.layer_digest);
        b.extend_from_slice(&self.diff_id);
        put64(&mut b, self.compressed_size);
        put64(&mut b, self.uncompressed_size);
        put32(&mut b, count(self.entries.len(), "entries")?);
        put32(&mut b, count(self.spans.len(), "spans")?);
        put32(&mut b, count(self.chunks.len(), "chunks")?);
        put32(&mut b, heap_len);
        put64(&mut b, self.windows_size);
        put32(&mut b, self.span_target);
        b.push(self.source as u8);
        b.resize(HEADER_LEN, 0);
        b.extend_from_slice(&ents);
        b.extend_from_slice(&spans);
        b.extend_from_slice(&chunks);
        b.extend_from_slice(&heap.bytes);
        Ok(b)
    }
}
