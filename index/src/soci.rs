//! SOCI zTOCs (soci-snapshotter's `ztoc.fbs`, version 0.9), imported into
//! our index format.
//!
//! A zTOC is a flatbuffer: the tar's entries (name, type, offset and size in
//! the uncompressed stream, mode, owners, RFC 3339 mtime, devices, and all
//! PAX records, where the xattrs are) and a `zinfo` blob of gzip
//! checkpoints with full 32 KiB windows, plus a sha256 per compressed span
//! (span `i` = `[in_i - (bits_i > 0), in_{i+1})`, the last to the end:
//! ours). v2 images pin the zTOC by digest (manifest annotation
//! `com.amazon.soci.index-digest` → SOCI index → zTOC per layer).
//!
//! The few tables are read by hand over the bytes, every offset bounds
//! checked, rather than through generated code: the schema declares xattr
//! values `string`, Go writes raw PAX bytes there (a binary
//! `security.capability` is not UTF-8), and a verifying reader would refuse
//! the whole zTOC. Values are bytes here.

use crate::encode::{IndexBuilder, SpanRec};
use crate::error::{Error, Result};
use crate::format::{span_flags, Compression, Source, WINDOW_SIZE};
use crate::tree::{TarEntry, TarKind, TreeBuilder, TreeOptions};

/// A zTOC larger than this is refused.
pub const ZTOC_MAX: usize = 512 << 20;
/// soci appends this and a JSON list of prefetch files to some zTOCs.
const PREFETCH_SEPARATOR: &[u8] = b"---SOCI-PREFETCH---";
/// in (i64), out (i64), bits (u8), window.
const CHECKPOINT: usize = 17 + WINDOW_SIZE;

fn bad(m: impl Into<String>) -> Error {
    Error::Soci(m.into())
}

/// A flatbuffer table at `pos`, its vtable checked.
#[derive(Clone, Copy)]
struct Table<'a> {
    b: &'a [u8],
    pos: usize,
    vt: usize,
    vt_len: usize,
    len: usize,
}

fn get<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N]> {
    at.checked_add(N)
        .and_then(|e| b.get(at..e))
        .map(|s| s.try_into().unwrap())
        .ok_or_else(|| bad("flatbuffer offset out of bounds"))
}

fn u32_at(b: &[u8], at: usize) -> Result<usize> {
    Ok(u32::from_le_bytes(get(b, at)?) as usize)
}

/// Follow the uoffset stored at `at`.
fn deref(b: &[u8], at: usize) -> Result<usize> {
    let t = at
        .checked_add(u32_at(b, at)?)
        .ok_or_else(|| bad("flatbuffer offset out of bounds"))?;
    if t >= b.len() {
        return Err(bad("flatbuffer offset out of bounds"));
    }
    Ok(t)
}

/// A vector or string at `at`: its elements' start and count (each
/// `elem` bytes, all in bounds).
fn vector(b: &[u8], at: usize, elem: usize) -> Result<(usize, usize)> {
    let n = u32_at(b, at)?;
    let start = at + 4;
    n.checked_mul(elem)
        .and_then(|l| start.checked_add(l))
        .filter(|&e| e <= b.len())
        .ok_or_else(|| bad("flatbuffer vector out of bounds"))?;
    Ok((start, n))
}

impl<'a> Table<'a> {
    fn at(b: &'a [u8], pos: usize) -> Result<Self> {
        let soff = i32::from_le_bytes(get(b, pos)?) as i64;
        let vt = usize::try_from(pos as i64 - soff).map_err(|_| bad("vtable out of bounds"))?;
        let vt_len = u16::from_le_bytes(get(b, vt)?) as usize;
        let len = u16::from_le_bytes(get(b, vt + 2)?) as usize;
        if vt_len < 4 || vt + vt_len > b.len() || pos + len > b.len() {
            return Err(bad("vtable out of bounds"));
        }
        Ok(Table {
            b,
            pos,
            vt,
            vt_len,
            len,
        })
    }

    /// Where field `id` (of `size` bytes) is, if present.
    fn field(&self, id: usize, size: usize) -> Result<Option<usize>> {
        let o = 4 + 2 * id;
        if o + 2 > self.vt_len {
            return Ok(None);
        }
        let off = u16::from_le_bytes(get(self.b, self.vt + o)?) as usize;
        if off == 0 {
            return Ok(None);
        }
        if off + size > self.len {
            return Err(bad("table field out of bounds"));
        }
        Ok(Some(self.pos + off))
    }

    fn i64(&self, id: usize) -> Result<i64> {
        Ok(match self.field(id, 8)? {
            Some(p) => i64::from_le_bytes(get(self.b, p)?),
            None => 0,
        })
    }

    fn i32(&self, id: usize) -> Result<i32> {
        Ok(match self.field(id, 4)? {
            Some(p) => i32::from_le_bytes(get(self.b, p)?),
            None => 0,
        })
    }

    fn u8(&self, id: usize, default: u8) -> Result<u8> {
        Ok(match self.field(id, 1)? {
            Some(p) => get::<1>(self.b, p)?[0],
            None => default,
        })
    }

    fn target(&self, id: usize) -> Result<Option<usize>> {
        match self.field(id, 4)? {
            Some(p) => deref(self.b, p).map(Some),
            None => Ok(None),
        }
    }

    fn table(&self, id: usize) -> Result<Option<Table<'a>>> {
        match self.target(id)? {
            Some(t) => Table::at(self.b, t).map(Some),
            None => Ok(None),
        }
    }

    /// A string or `[ubyte]` field, as bytes (empty if absent).
    fn bytes(&self, id: usize) -> Result<&'a [u8]> {
        match self.target(id)? {
            Some(t) => {
                let (s, n) = vector(self.b, t, 1)?;
                Ok(&self.b[s..s + n])
            }
            None => Ok(&[]),
        }
    }

    /// A vector of tables or strings: (start, count).
    fn refs(&self, id: usize) -> Result<(usize, usize)> {
        match self.target(id)? {
            Some(t) => vector(self.b, t, 4),
            None => Ok((0, 0)),
        }
    }
}

/// The first occurrence of `needle` (as Go's bytes.Index).
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = hay[from..].iter().position(|&c| c == needle[0]) {
        let at = from + p;
        if hay[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

fn elem_table(b: &[u8], start: usize, i: usize) -> Result<Table<'_>> {
    Table::at(b, deref(b, start + 4 * i)?)
}

fn elem_bytes(b: &[u8], start: usize, i: usize) -> Result<&[u8]> {
    let (s, n) = vector(b, deref(b, start + 4 * i)?, 1)?;
    Ok(&b[s..s + n])
}

fn text(b: &[u8], what: &str) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| bad(format!("{what} is not UTF-8")))
}

/// An imported zTOC: the index, and its windows blob (raw windows).
#[derive(Clone, Debug)]
pub struct Import {
    pub index: Vec<u8>,
    pub windows: Vec<u8>,
}

/// Import a zTOC (the blob a SOCI index lists for the layer).
pub fn import(
    ztoc: &[u8],
    layer_digest: [u8; 32],
    diff_id: [u8; 32],
    tree: TreeOptions,
) -> Result<Import> {
    if ztoc.len() > ZTOC_MAX {
        return Err(bad("zTOC larger than 512 MiB"));
    }
    // As soci reads it: the flatbuffer ends where a prefetch list begins.
    let b = &ztoc[..find(ztoc, PREFETCH_SEPARATOR).unwrap_or(ztoc.len())];
    let root = Table::at(b, u32_at(b, 0)?)?;
    let version = text(root.bytes(0)?, "version")?;
    if version != "0.9" {
        return Err(bad(format!("zTOC version {version:?} (0.9 is supported)")));
    }
    let csize = u64::try_from(root.i64(2)?).map_err(|_| bad("negative compressed size"))?;
    let usize_ = u64::try_from(root.i64(3)?).map_err(|_| bad("negative uncompressed size"))?;
    let ci = root.table(5)?.ok_or_else(|| bad("no compression info"))?;
    let algo = ci.u8(0, 1)?;
    if algo != 1 {
        return Err(Error::Unsupported(format!(
            "SOCI zTOC for compression {algo} (gzip only)"
        )));
    }

    // zinfo: i32 count, i64 span size, then the checkpoints (v1 left out
    // the first, which was always right after a 10-byte gzip header).
    let zinfo = ci.bytes(3)?;
    if zinfo.len() < 12 {
        return Err(bad("zinfo too short"));
    }
    let n = usize::try_from(i32::from_le_bytes(zinfo[0..4].try_into().unwrap()))
        .map_err(|_| bad("negative checkpoint count"))?;
    let body = zinfo.len() - 12;
    let stored = if n.checked_mul(CHECKPOINT) == Some(body) {
        n
    } else if n >= 1 && (n - 1).checked_mul(CHECKPOINT) == Some(body) {
        n - 1
    } else {
        return Err(bad("zinfo size does not match its checkpoint count"));
    };
    if n == 0 {
        return Err(bad("no checkpoints"));
    }
    let (dstart, dcount) = ci.refs(2)?;
    if dcount != n || ci.i32(1)? as i64 != n as i64 - 1 {
        return Err(bad(
            "span digests or max span id do not match the checkpoints",
        ));
    }

    let mut spans = Vec::with_capacity(n + 1);
    let mut windows = Vec::new();
    let mut checkpoints: Vec<(u64, u64, u8, &[u8])> = Vec::with_capacity(n);
    if stored < n {
        checkpoints.push((10, 0, 0, &[]));
    }
    for k in 0..stored {
        let c = &zinfo[12 + k * CHECKPOINT..12 + (k + 1) * CHECKPOINT];
        let cin = i64::from_le_bytes(c[0..8].try_into().unwrap());
        let out = i64::from_le_bytes(c[8..16].try_into().unwrap());
        let (cin, out) = (
            u64::try_from(cin).map_err(|_| bad("negative checkpoint offset"))?,
            u64::try_from(out).map_err(|_| bad("negative checkpoint offset"))?,
        );
        // The window is the last 32 KiB of output, zero-filled before the
        // stream's start: only the last `out` bytes are history.
        let w = &c[17..];
        checkpoints.push((
            cin,
            out,
            c[16],
            &w[WINDOW_SIZE - (out.min(WINDOW_SIZE as u64) as usize)..],
        ));
    }
    if checkpoints[0].0 == 0 {
        return Err(bad(
            "the first checkpoint is at byte 0, not after a gzip header",
        ));
    }
    {
        // The gzip header before the first checkpoint: no data.
        spans.push(SpanRec {
            flags: span_flags::MEMBER_START | span_flags::NO_DIGEST,
            ..Default::default()
        });
    }
    for (k, &(cin, out, bits, w)) in checkpoints.iter().enumerate() {
        let d = text(elem_bytes(b, dstart, k)?, "span digest")?;
        let hexpart = d
            .strip_prefix("sha256:")
            .ok_or_else(|| bad(format!("span digest {d:?} is not sha256")))?;
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(hexpart, &mut sha256)
            .map_err(|_| bad(format!("span digest {d:?}")))?;
        let (wlen, wsha) = if w.is_empty() {
            (0, [0; 32])
        } else {
            (w.len() as u32, crate::sha256(w))
        };
        spans.push(SpanRec {
            cin,
            out,
            sha256,
            bits,
            flags: 0,
            window_off: windows.len() as u64,
            window_len: wlen,
            window_sha256: wsha,
        });
        windows.extend_from_slice(w);
    }

    // Entries, in stream order (as soci sorts them), through extraction's
    // rules.
    let toc = root.table(4)?.ok_or_else(|| bad("no TOC"))?;
    let (mstart, mcount) = toc.refs(0)?;
    let mut metas = Vec::with_capacity(mcount);
    for i in 0..mcount {
        let m = elem_table(b, mstart, i)?;
        metas.push((m.i64(2)?, m));
    }
    metas.sort_by_key(|m| m.0);
    let mut tb = TreeBuilder::new(tree);
    for (offset, m) in metas {
        let name = m.bytes(0)?;
        let shown = || String::from_utf8_lossy(name).into_owned();
        let kind = match m.bytes(1)? {
            b"reg" => TarKind::File,
            b"dir" => TarKind::Dir,
            b"symlink" => TarKind::Symlink,
            b"hardlink" => TarKind::Hardlink,
            b"char" => TarKind::Char,
            b"block" => TarKind::Block,
            b"fifo" => TarKind::Fifo,
            t => {
                return Err(bad(format!(
                    "{:?}: unknown type {:?}",
                    shown(),
                    String::from_utf8_lossy(t)
                )))
            }
        };
        let mut xattrs = Vec::new();
        let (xstart, xcount) = m.refs(13)?;
        for j in 0..xcount {
            let x = elem_table(b, xstart, j)?;
            let key = x.bytes(0)?;
            if key.starts_with(b"GNU.sparse.") {
                return Err(Error::Unsupported(format!(
                    "{:?}: a sparse file in a zTOC",
                    shown()
                )));
            }
            if let Some(k) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.push((text(k, "xattr name")?, x.bytes(1)?.to_vec()));
            }
        }
        let mut t = TarEntry::new(name, kind);
        t.mode = (m.i64(5)? & 0o7777) as u32;
        t.uid = u64::from(m.i32(6)? as u32);
        t.gid = u64::from(m.i32(7)? as u32);
        let mt = m.bytes(10)?;
        t.mtime = crate::rfc3339::parse(&text(mt, "mod_time")?)
            .ok_or_else(|| bad(format!("{:?}: bad mod_time", shown())))?;
        t.link = m.bytes(4)?;
        let dev =
            |v: i64| u32::try_from(v).map_err(|_| bad(format!("{:?}: bad device number", shown())));
        t.dev = (dev(m.i64(11)?)?, dev(m.i64(12)?)?);
        t.xattrs = &xattrs;
        if kind == TarKind::File {
            t.size = u64::try_from(m.i64(3)?)
                .map_err(|_| bad(format!("{:?}: negative size", shown())))?;
            t.data_offset = u64::try_from(offset)
                .map_err(|_| bad(format!("{:?}: negative offset", shown())))?;
        }
        tb.add(&t)?;
    }
    let entries = tb.finish()?;
    let windows_size = windows.len() as u64;
    let b = IndexBuilder {
        compression: Compression::Gzip,
        source: Source::Soci,
        layer_digest,
        diff_id,
        compressed_size: csize,
        uncompressed_size: usize_,
        span_target: 0,
        flags: 0,
        windows_size,
        entries,
        spans,
        chunks: Vec::new(),
    };
    let index = b.encode().map_err(|e| match e {
        Error::Unsupported(r) if r.starts_with("the index built") => bad(r),
        e => e,
    })?;
    Ok(Import { index, windows })
}
