//! eStargz (and legacy stargz, and stargz's zstd:chunked) TOCs, imported
//! into our index format.
//!
//! An eStargz blob is an ordinary multi-member gzip tar whose file payloads
//! each start a gzip member (zstd:chunked: a zstd frame), followed by a TOC
//! (`stargz.index.json`, listing every entry with the compressed offset of
//! the member holding its payload and the sha256 of each uncompressed chunk)
//! and a footer pointing at it. The TOC is pinned by the layer annotation
//! `containerd.io/snapshot/stargz/toc.digest` (sha256 of the JSON).
//!
//! The TOC gives no offsets in the uncompressed tar stream, so an import
//! addresses *payloads*: span `i` is member `i` and yields its output up to
//! the end of the last payload in it; a file's data offset is where its
//! first chunk lands in that space (`flags::PAYLOAD_OFFSETS`). Spans carry
//! no compressed digests; every chunk is verified by its chunkDigest after
//! inflating (`flags::CHUNK_DIGESTS`). Members holding only tar headers,
//! and the TOC of a zstd:chunked blob, are spans of no data: fetched only to
//! complete the blob.
//!
//! Entries go through the same `TreeBuilder` as a tar (names cleaned and
//! confined, whiteouts, later duplicates win), omitted fields default as Go
//! omits them (0), and the gzip flavour's `stargz.index.json` itself is an
//! entry, because extraction of the layer makes it.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use base64::Engine as _;
use serde::Deserialize;

use crate::encode::{ChunkRec, IndexBuilder, SpanRec};
use crate::error::{Error, Result};
use crate::format::{flags, span_flags, Compression, Kind, Source, MAX_SPAN_OUT};
use crate::tree::{TarEntry, TarKind, TreeBuilder, TreeOptions};
use crate::zlib::{self, Inflater};

/// Bytes to read from the end of a blob to find any footer.
pub const FOOTER_FETCH: u64 = 51;
const GZIP_FOOTER: u64 = 51;
const LEGACY_FOOTER: u64 = 47;
const ZSTD_FOOTER: u64 = 48;
/// A TOC larger than this (JSON, and its compressed form) is refused (and
/// its span, with the tar header before it, stays under the span cap).
pub const TOC_MAX: u64 = MAX_SPAN_OUT - (1 << 20);
const TOC_NAME: &[u8] = b"stargz.index.json";

fn bad(m: impl Into<String>) -> Error {
    Error::Estargz(m.into())
}

/// Where a blob's TOC is, from its footer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Footer {
    /// eStargz (51-byte footer) or legacy stargz (47): the TOC is the gzip
    /// member from `toc_offset` up to the footer.
    Gzip { toc_offset: u64, footer_len: u64 },
    /// zstd:chunked as stargz-snapshotter writes it: the TOC is a zstd frame
    /// of `toc_compressed` bytes at `toc_offset`, inside a skippable frame.
    Zstd {
        toc_offset: u64,
        toc_compressed: u64,
        toc_raw: u64,
    },
}

impl Footer {
    pub fn compression(&self) -> Compression {
        match self {
            Footer::Gzip { .. } => Compression::Gzip,
            Footer::Zstd { .. } => Compression::Zstd,
        }
    }

    /// The bytes to fetch for `read_toc`.
    pub fn toc_range(&self, blob_size: u64) -> Range<u64> {
        match *self {
            Footer::Gzip {
                toc_offset,
                footer_len,
            } => toc_offset..blob_size - footer_len,
            Footer::Zstd {
                toc_offset,
                toc_compressed,
                ..
            } => toc_offset..toc_offset + toc_compressed,
        }
    }

    /// Where the TOC and footer begin: nothing after holds file data.
    fn toc_start(&self) -> u64 {
        match *self {
            Footer::Gzip { toc_offset, .. } => toc_offset,
            // The skippable frame's 8-byte header.
            Footer::Zstd { toc_offset, .. } => toc_offset - 8,
        }
    }
}

fn hex16(b: &[u8]) -> Result<u64> {
    let s = std::str::from_utf8(b).map_err(|_| bad("footer offset is not hex"))?;
    u64::from_str_radix(s, 16).map_err(|_| bad("footer offset is not hex"))
}

/// Find the footer in `tail`, the last `FOOTER_FETCH` bytes of a blob of
/// `blob_size` bytes (fewer if the blob is smaller).
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<Footer> {
    let n = tail.len() as u64;
    if n > blob_size {
        return Err(bad("more footer bytes than the blob has"));
    }
    let gzip_at = |len: u64| (n >= len).then(|| &tail[(n - len) as usize..]);
    let check = |toc_offset: u64, footer_len: u64| {
        if toc_offset >= blob_size - footer_len {
            return Err(bad(format!("TOC offset {toc_offset} is past the footer")));
        }
        if blob_size - footer_len - toc_offset > TOC_MAX {
            return Err(bad("TOC larger than 64 MiB"));
        }
        Ok(Footer::Gzip {
            toc_offset,
            footer_len,
        })
    };
    // An empty gzip member whose extra field says where the TOC is:
    // 10-byte header (FEXTRA), XLEN, then the subfield.
    if let Some(f) = gzip_at(GZIP_FOOTER) {
        if f[..3] == [0x1f, 0x8b, 8] && f[3] & 4 != 0 && f[10..12] == [26, 0] && &f[12..14] == b"SG"
        {
            if f[14..16] != [22, 0] || &f[32..38] != b"STARGZ" {
                return Err(bad("unsupported eStargz footer (an external TOC?)"));
            }
            return check(hex16(&f[16..32])?, GZIP_FOOTER);
        }
    }
    if let Some(f) = gzip_at(LEGACY_FOOTER) {
        if f[..3] == [0x1f, 0x8b, 8]
            && f[3] & 4 != 0
            && f[10..12] == [22, 0]
            && &f[28..34] == b"STARGZ"
        {
            return check(hex16(&f[12..28])?, LEGACY_FOOTER);
        }
    }
    // A skippable frame (magic, size 40): TOC offset, compressed and raw
    // sizes, kind, "GnUlInUx".
    if n >= ZSTD_FOOTER {
        let f = &tail[(n - ZSTD_FOOTER) as usize..];
        if f[..8] == [0x50, 0x2a, 0x4d, 0x18, 40, 0, 0, 0] && &f[40..48] == b"GnUlInUx" {
            let g = |i: usize| u64::from_le_bytes(f[i..i + 8].try_into().unwrap());
            let (toc_offset, toc_compressed, toc_raw, kind) = (g(8), g(16), g(24), g(32));
            if kind != 1 {
                return Err(bad(format!(
                    "zstd:chunked manifest of kind {kind}, not stargz's"
                )));
            }
            if toc_offset < 8
                || toc_compressed > TOC_MAX
                || toc_raw > TOC_MAX
                || toc_offset
                    .checked_add(toc_compressed)
                    .is_none_or(|e| e > blob_size - ZSTD_FOOTER)
            {
                return Err(bad("zstd:chunked TOC out of bounds or larger than 64 MiB"));
            }
            return Ok(Footer::Zstd {
                toc_offset,
                toc_compressed,
                toc_raw,
            });
        }
    }
    Err(bad("no eStargz, stargz or zstd:chunked footer"))
}

/// A TOC read from a blob.
#[derive(Clone, Debug)]
pub struct Toc {
    /// The JSON, as its digest covers it.
    pub json: Vec<u8>,
    pub sha256: [u8; 32],
    /// gzip flavour: the TOC is also a tar entry of the layer.
    pub tar_entry: Option<TocEntry>,
}

/// `stargz.index.json` as a tar entry (extraction makes it).
#[derive(Clone, Debug)]
pub struct TocEntry {
    /// Where the JSON starts in the TOC member's output (after its header).
    pub data_offset: u64,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
}

fn octal(f: &[u8]) -> Result<u64> {
    let t: Vec<u8> = f.iter().copied().filter(|&b| b != 0 && b != b' ').collect();
    if t.is_empty() {
        return Ok(0);
    }
    std::str::from_utf8(&t)
        .ok()
        .and_then(|s| u64::from_str_radix(s, 8).ok())
        .ok_or_else(|| bad("TOC tar header: bad number"))
}

/// The TOC member's tar header: one ustar entry named stargz.index.json.
fn toc_header(h: &[u8]) -> Result<(TocEntry, u64)> {
    if h.len() < 512 {
        return Err(bad("TOC member shorter than a tar header"));
    }
    let h = &h[..512];
    let want = octal(&h[148..156])?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u64
            }
        })
        .sum();
    if sum != want {
        return Err(bad("TOC tar header: checksum mismatch"));
    }
    let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
    if &h[..name_end] != TOC_NAME || !matches!(h[156], b'0' | 0) {
        return Err(bad(
            "the TOC member does not hold stargz.index.json as its first entry",
        ));
    }
    let size = octal(&h[124..136])?;
    Ok((
        TocEntry {
            data_offset: 512,
            mode: (octal(&h[100..108])? & 0o7777) as u32,
            uid: octal(&h[108..116])?,
            gid: octal(&h[116..124])?,
            mtime: octal(&h[136..148])? as i64,
        },
        size,
    ))
}

/// Read the TOC from the bytes at `footer.toc_range()`, checking it against
/// the layer's `containerd.io/snapshot/stargz/toc.digest` when given.
pub fn read_toc(footer: &Footer, bytes: &[u8], expected_digest: Option<&str>) -> Result<Toc> {
    let (json, tar_entry) = match *footer {
        Footer::Gzip { .. } => {
            // One gzip member: a tar holding the JSON, then padding and the
            // end-of-archive blocks. Inflate at most what a 64 MiB TOC needs.
            let cap = (TOC_MAX + (64 << 10)) as usize;
            let mut out = vec![0u8; 1 << 16];
            let mut filled = 0;
            let mut z = Inflater::new(zlib::GZIP);
            let mut input = bytes;
            loop {
                if filled == out.len() {
                    if out.len() >= cap {
                        return Err(bad("TOC larger than 64 MiB"));
                    }
                    out.resize((out.len() * 2).min(cap), 0);
                }
                let step = z.inflate(input, &mut out[filled..], zlib::Z_NO_FLUSH);
                input = &input[step.consumed..];
                filled += step.produced;
                match step.ret {
                    zlib::Z_STREAM_END => break,
                    zlib::Z_OK => {}
                    zlib::Z_BUF_ERROR if step.produced > 0 || step.consumed > 0 => {}
                    zlib::Z_BUF_ERROR => return Err(bad("TOC member cut short")),
                    r => return Err(bad(format!("TOC member: {}", z.message(r)))),
                }
            }
            out.truncate(filled);
            let (entry, size) = toc_header(&out)?;
            if size > TOC_MAX || 512 + size > out.len() as u64 {
                return Err(bad("TOC entry larger than its member"));
            }
            (out[512..512 + size as usize].to_vec(), Some(entry))
        }
        Footer::Zstd {
            toc_raw,
            toc_compressed,
            ..
        } => {
            if bytes.len() as u64 != toc_compressed {
                return Err(bad("zstd:chunked TOC of the wrong size"));
            }
            let json = zstd::bulk::decompress(bytes, toc_raw as usize)
                .map_err(|e| bad(format!("zstd:chunked TOC: {e}")))?;
            if json.len() as u64 != toc_raw {
                return Err(bad("zstd:chunked TOC size differs from its footer"));
            }
            (json, None)
        }
    };
    let sha256 = crate::sha256(&json);
    if let Some(want) = expected_digest {
        let want_b = crate::encode::parse_digest(want)
            .map_err(|_| bad(format!("bad TOC digest annotation {want:?}")))?;
        if want_b != sha256 {
            return Err(bad(format!(
                "TOC digest sha256:{} does not match the layer's annotation {want}",
                hex::encode(sha256)
            )));
        }
    }
    Ok(Toc {
        json,
        sha256,
        tar_entry,
    })
}

#[derive(Deserialize)]
struct JToc {
    version: i64,
    entries: Vec<JEntry>,
}

/// A TOC entry; Go omits zero values, so everything defaults.
#[derive(Deserialize, Default)]
#[serde(default)]
struct JEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    size: i64,
    modtime: String,
    #[serde(rename = "linkName")]
    link_name: String,
    mode: i64,
    uid: i64,
    gid: i64,
    offset: i64,
    #[serde(rename = "innerOffset")]
    inner_offset: i64,
    #[serde(rename = "devMajor")]
    dev_major: i64,
    #[serde(rename = "devMinor")]
    dev_minor: i64,
    xattrs: BTreeMap<String, String>,
    #[serde(rename = "chunkOffset")]
    chunk_offset: i64,
    #[serde(rename = "chunkSize")]
    chunk_size: i64,
    #[serde(rename = "chunkDigest")]
    chunk_digest: String,
}

struct JChunk {
    member: u64,
    inner: u64,
    offset: u64,
    size: u64,
    sha256: [u8; 32],
}

/// An imported index.
#[derive(Clone, Debug)]
pub struct Import {
    pub index: Vec<u8>,
    /// The compressed bytes holding the files the converter put before
    /// `.prefetch.landmark` (to fetch first), if it marked any.
    pub prefetch: Option<Range<u64>>,
}

fn nonneg(v: i64, what: &str, name: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| bad(format!("{name:?}: negative {what}")))
}

/// Import a TOC read by `read_toc` from the blob whose footer is `footer`.
pub fn import(
    footer: &Footer,
    toc: &Toc,
    layer_digest: [u8; 32],
    diff_id: [u8; 32],
    blob_size: u64,
    tree: TreeOptions,
) -> Result<Import> {
    let j: JToc = serde_json::from_slice(&toc.json).map_err(|e| bad(format!("TOC JSON: {e}")))?;
    if j.version != 1 {
        return Err(bad(format!("TOC version {}", j.version)));
    }
    let toc_start = footer.toc_start();
    if toc_start >= blob_size {
        return Err(bad("TOC past the end of the blob"));
    }
    // Payload chunks per regular file (by TOC entry), in file order.
    let mut chunks: HashMap<usize, Vec<JChunk>> = HashMap::new();
    let mut cur: Option<(usize, u64)> = None;
    for (i, e) in j.entries.iter().enumerate() {
        let name = e.name.as_str();
        let (file, size) = match e.kind.as_str() {
            "chunk" => cur.ok_or_else(|| bad(format!("{name:?}: a chunk without its file")))?,
            "reg" => {
                let size = nonneg(e.size, "size", name)?;
                cur = Some((i, size));
                if size == 0 {
                    continue;
                }
                (i, size)
            }
            _ => {
                cur = None;
                continue;
            }
        };
        let offset = nonneg(e.chunk_offset, "chunk offset", name)?;
        let len = match nonneg(e.chunk_size, "chunk size", name)? {
            0 => size
                .checked_sub(offset)
                .ok_or_else(|| bad(format!("{name:?}: chunk past the end")))?,
            n => n,
        };
        let member = nonneg(e.offset, "offset", name)?;
        if member >= toc_start {
            return Err(bad(format!(
                "{name:?}: payload offset {member} is not before the TOC"
            )));
        }
        let sha256 = crate::encode::parse_digest(&e.chunk_digest)
            .map_err(|_| bad(format!("{name:?}: missing or bad chunkDigest")))?;
        let list = chunks.entry(file).or_default();
        let expect = list.last().map_or(0, |c| c.offset + c.size);
        if offset != expect || len == 0 || offset + len > size || len > MAX_SPAN_OUT {
            return Err(bad(format!(
                "{name:?}: chunks do not cover the file in order"
            )));
        }
        list.push(JChunk {
            member,
            inner: nonneg(e.inner_offset, "inner offset", name)?,
            offset,
            size: len,
            sha256,
        });
    }
    // Members with payloads, and how much of each one's output they use.
    let mut members: BTreeMap<u64, u64> = BTreeMap::new();
    for list in chunks.values() {
        for c in list {
            let end = c
                .inner
                .checked_add(c.size)
                .ok_or_else(|| bad("inner offset out of range"))?;
            let m = members.entry(c.member).or_default();
            *m = (*m).max(end);
        }
    }
    let gzip = footer.compression() == Compression::Gzip;
    let member_flag = if gzip { span_flags::MEMBER_START } else { 0 };
    let span = |cin: u64, out: u64| SpanRec {
        cin,
        out,
        flags: span_flags::NO_DIGEST | member_flag,
        ..Default::default()
    };
    let mut spans = Vec::new();
    let mut out_of: HashMap<u64, u64> = HashMap::new();
    let mut cursor = 0u64;
    if toc_start > 0 && members.first_key_value().is_none_or(|(&m, _)| m > 0) {
        // Members of tar headers only, before the first payload.
        spans.push(span(0, 0));
    }
    for (&m, &len) in &members {
        spans.push(span(m, cursor));
        out_of.insert(m, cursor);
        cursor += len;
    }
    // The TOC: for gzip, a tar entry whose data lands in this space too.
    let toc_data = match (&toc.tar_entry, footer) {
        (Some(t), Footer::Gzip { toc_offset, .. }) => {
            spans.push(span(*toc_offset, cursor));
            let at = cursor + t.data_offset;
            cursor = at + toc.json.len() as u64;
            Some(at)
        }
        _ => {
            spans.push(span(toc_start, cursor));
            None
        }
    };
    let uncompressed_size = cursor;

    // The tree, through extraction's rules.
    let mut tb = TreeBuilder::new(tree);
    let mut data_chunks: HashMap<u64, &[JChunk]> = HashMap::new();
    let mut prefetch = None;
    for (i, e) in j.entries.iter().enumerate() {
        let name = e.name.as_str();
        let kind = match e.kind.as_str() {
            "chunk" => continue,
            "reg" => TarKind::File,
            "dir" => TarKind::Dir,
            "symlink" => TarKind::Symlink,
            "hardlink" => TarKind::Hardlink,
            "char" => TarKind::Char,
            "block" => TarKind::Block,
            "fifo" => TarKind::Fifo,
            k => return Err(bad(format!("{name:?}: unknown type {k:?}"))),
        };
        let mut t = TarEntry::new(name.as_bytes(), kind);
        t.mode = (nonneg(e.mode, "mode", name)? & 0o7777) as u32;
        t.uid = nonneg(e.uid, "uid", name)?;
        t.gid = nonneg(e.gid, "gid", name)?;
        t.mtime = if e.modtime.is_empty() {
            (0, 0)
        } else {
            crate::rfc3339::parse(&e.modtime)
                .ok_or_else(|| bad(format!("{name:?}: bad modtime {:?}", e.modtime)))?
        };
        t.link = e.link_name.as_bytes();
        t.dev = (
            u32::try_from(e.dev_major).map_err(|_| bad(format!("{name:?}: bad devMajor")))?,
            u32::try_from(e.dev_minor).map_err(|_| bad(format!("{name:?}: bad devMinor")))?,
        );
        let xattrs: Vec<(String, Vec<u8>)> = e
            .xattrs
            .iter()
            .map(|(k, v)| {
                base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map(|v| (k.clone(), v))
                    .map_err(|_| bad(format!("{name:?}: xattr {k:?} is not base64")))
            })
            .collect::<Result<_>>()?;
        t.xattrs = &xattrs;
        if kind == TarKind::File {
            t.size = nonneg(e.size, "size", name)?;
            if let Some(list) = chunks.get(&i) {
                let first = &list[0];
                let data = out_of[&first.member] + first.inner;
                for c in list {
                    if out_of[&c.member] + c.inner != data + c.offset {
                        return Err(bad(format!("{name:?}: chunks are not back to back")));
                    }
                }
                if data_chunks.insert(data, list).is_some() {
                    return Err(bad(format!("{name:?}: shares its data with another file")));
                }
                t.data_offset = data;
            }
            if name.trim_start_matches("./") == ".prefetch.landmark" {
                prefetch = Some(0..list_member(&chunks, i).unwrap_or(0));
            }
        }
        tb.add(&t)?;
    }
    let mut toc_chunk = None;
    if let (Some(t), Some(at)) = (&toc.tar_entry, toc_data) {
        let mut e = TarEntry::new(TOC_NAME, TarKind::File);
        e.mode = t.mode;
        e.uid = t.uid;
        e.gid = t.gid;
        e.mtime = (t.mtime, 0);
        e.size = toc.json.len() as u64;
        e.data_offset = at;
        tb.add(&e)?;
        toc_chunk = Some((at, toc.json.len() as u64, toc.sha256));
    }
    let entries = tb.finish()?;
    let mut chunk_recs = Vec::new();
    for (idx, e) in entries.iter().enumerate() {
        if e.kind != Kind::File || e.size == 0 {
            continue;
        }
        let entry = idx as u32;
        if let Some(list) = data_chunks.get(&e.data) {
            for c in list.iter() {
                chunk_recs.push((
                    e.data + c.offset,
                    ChunkRec {
                        entry,
                        offset: c.offset,
                        size: c.size as u32,
                        sha256: c.sha256,
                    },
                ));
            }
        } else if let Some((at, len, sha)) = toc_chunk.filter(|t| t.0 == e.data) {
            chunk_recs.push((
                at,
                ChunkRec {
                    entry,
                    offset: 0,
                    size: u32::try_from(len).map_err(|_| bad("TOC too large"))?,
                    sha256: sha,
                },
            ));
        }
    }
    chunk_recs.sort_by_key(|c| c.0);
    let b = IndexBuilder {
        compression: footer.compression(),
        source: Source::Estargz,
        layer_digest,
        diff_id,
        compressed_size: blob_size,
        uncompressed_size,
        span_target: 0,
        flags: flags::CHUNK_DIGESTS | flags::PAYLOAD_OFFSETS,
        windows_size: 0,
        entries,
        spans,
        chunks: chunk_recs.into_iter().map(|c| c.1).collect(),
    };
    let index = b.encode().map_err(|e| match e {
        Error::Unsupported(r) => bad(r),
        e => e,
    })?;
    Ok(Import { index, prefetch })
}

fn list_member(chunks: &HashMap<usize, Vec<JChunk>>, i: usize) -> Option<u64> {
    chunks.get(&i).and_then(|l| l.first()).map(|c| c.member)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Footers as stargz-snapshotter's Go writes them (gzip.go: an empty
    /// member with the offset in its extra field; the legacy one without the
    /// 'SG' subfield header).
    #[test]
    fn footers() {
        let gzip_member = |extra: &[u8]| {
            let mut f = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff];
            f.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            f.extend_from_slice(extra);
            f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
            f
        };
        let mut sg = b"SG".to_vec();
        sg.extend_from_slice(&22u16.to_le_bytes());
        sg.extend_from_slice(format!("{:016x}STARGZ", 1234).as_bytes());
        let f = gzip_member(&sg);
        assert_eq!(f.len(), 51);
        let mut blob = vec![0u8; 5000];
        blob.extend_from_slice(&f);
        let footer = parse_footer(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
        assert_eq!(
            footer,
            Footer::Gzip {
                toc_offset: 1234,
                footer_len: 51
            }
        );
        assert_eq!(footer.toc_range(blob.len() as u64), 1234..5000);

        let legacy = gzip_member(format!("{:016x}STARGZ", 999).as_bytes());
        assert_eq!(legacy.len(), 47);
        let mut blob = vec![0u8; 5000];
        blob.extend_from_slice(&legacy);
        let footer = parse_footer(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
        assert_eq!(
            footer,
            Footer::Gzip {
                toc_offset: 999,
                footer_len: 47
            }
        );

        // zstd:chunked: a skippable frame of 40 bytes.
        let mut z = vec![0x50, 0x2a, 0x4d, 0x18, 40, 0, 0, 0];
        for v in [300u64, 50, 120, 1] {
            z.extend_from_slice(&v.to_le_bytes());
        }
        z.extend_from_slice(b"GnUlInUx");
        let mut blob = vec![0u8; 400];
        blob.extend_from_slice(&z);
        let footer = parse_footer(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
        assert_eq!(
            footer,
            Footer::Zstd {
                toc_offset: 300,
                toc_compressed: 50,
                toc_raw: 120
            }
        );
        assert_eq!(footer.toc_range(blob.len() as u64), 300..350);

        // An external TOC (a TOC image of its own) is not supported.
        let mut ext = b"SG".to_vec();
        ext.extend_from_slice(&22u16.to_le_bytes());
        ext.extend_from_slice(b"STARGZEXTERNALTOC\0\0\0\0\0");
        let f = gzip_member(&ext);
        let mut blob = vec![0u8; 100];
        blob.extend_from_slice(&f);
        assert!(parse_footer(&blob[blob.len() - 51..], blob.len() as u64).is_err());
    }
}
