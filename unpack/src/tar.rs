//! A streaming tar reader, written for unpacking untrusted layers: every
//! metadata record (PAX, GNU long names, sparse maps) is size-capped before
//! it is read, nothing is buffered beyond one record, and the formats images
//! use are all understood: ustar, GNU (long names, old sparse with extension
//! blocks), PAX (path, linkpath, size, ids, mtime, SCHILY.xattr, GNU sparse
//! 0.1 and 1.0).

use std::collections::HashMap;
use std::io::{self, Read};

const BLOCK: u64 = 512;
/// PAX records and GNU long names larger than this are refused: no real
/// archive needs them, and they are read into memory. The same cap holds for
/// all the records before one entry together: each record's keys and
/// xattrs are kept until the entry they describe.
pub const MAX_META_BYTES: u64 = 1 << 20;
const MAX_SPARSE_REGIONS: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed tar: {0}")]
    Malformed(String),
    #[error("{kind} of {size} bytes exceeds the {MAX_META_BYTES} byte limit")]
    TooLarge { kind: &'static str, size: u64 },
    #[error("unsupported tar feature: {0}")]
    Unsupported(String),
}

fn bad(s: impl Into<String>) -> TarError {
    TarError::Malformed(s.into())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Logical size of a regular file (its length once holes are filled).
    pub size: u64,
    pub mtime: (i64, u32),
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// For sparse files: (offset, length) of each data region, in order; the
    /// stored data is these regions back to back.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// Where the entry's stored data starts in the uncompressed stream
    /// (after its header and any PAX / GNU records and sparse map): a
    /// seekable index of the layer points readers here.
    pub data_offset: u64,
}

/// A reader that counts what it hands out.
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

pub struct TarReader<R> {
    r: Counted<R>,
    /// Stored bytes of the current entry not yet read, and its padding.
    remaining: u64,
    padding: u64,
    done: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(r: R) -> Self {
        TarReader {
            r: Counted { inner: r, n: 0 },
            remaining: 0,
            padding: 0,
            done: false,
        }
    }

    pub fn into_inner(self) -> R {
        self.r.inner
    }

    /// Bytes of the uncompressed stream read so far.
    pub fn position(&self) -> u64 {
        self.r.n
    }

    /// The current entry's stored data (for sparse files, the regions back
    /// to back).
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "tar entry data truncated",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = self.r.read(&mut buf[..n.min(8192) as usize])?;
            if k == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar truncated",
                ));
            }
            n -= k as u64;
        }
        Ok(())
    }

    /// Skip up to `n` bytes; false if the stream ended first.
    fn skip_up_to(&mut self, mut n: u64) -> io::Result<bool> {
        let mut buf = [0u8; 512];
        while n > 0 {
            let k = self.r.read(&mut buf[..n.min(512) as usize])?;
            if k == 0 {
                return Ok(false);
            }
            n -= k as u64;
        }
        Ok(true)
    }

    fn read_block(&mut self) -> Result<Option<[u8; 512]>, TarError> {
        let mut b = [0u8; 512];
        let mut got = 0;
        while got < 512 {
            let n = self.r.read(&mut b[got..])?;
            if n == 0 {
                if got == 0 {
                    return Ok(None);
                }
                return Err(bad("truncated header block"));
            }
            got += n;
        }
        Ok(Some(b))
    }

    fn read_meta(&mut self, size: u64, kind: &'static str) -> Result<Vec<u8>, TarError> {
        if size > MAX_META_BYTES {
            return Err(TarError::TooLarge { kind, size });
        }
        let mut v = vec![0u8; size as usize];
        self.r.read_exact(&mut v)?;
        self.skip(pad(size))?;
        Ok(v)
    }

    /// The next entry, with any PAX / GNU records before it applied.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, TarError> {
        if self.done {
            return Ok(None);
        }
        let (rem, padding) = (self.remaining, self.padding);
        self.skip(rem)?;
        self.remaining = 0;
        self.padding = 0;
        // The stream may end inside the last entry's padding, or right after
        // its data (umoci 0.4 `insert` writes layers without padding or the
        // end-of-archive blocks): Go's archive/tar, which containerd and
        // umoci read layers with, takes that as the end of the archive.
        // The diff_id still covers exactly the bytes there are.
        if !self.skip_up_to(padding)? {
            self.done = true;
            return Ok(None);
        }

        let mut pax: HashMap<String, Vec<u8>> = HashMap::new();
        let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut meta_bytes = 0u64;
        loop {
            let Some(h) = self.read_block()? else {
                self.done = true;
                return Ok(None);
            };
            if h.iter().all(|&b| b == 0) {
                // End of archive (the second zero block, and anything after,
                // is left for the caller to drain into the diff hash).
                self.done = true;
                return Ok(None);
            }
            verify_checksum(&h)?;
            let typeflag = h[156];
            let size = num(&h[124..136]).ok_or_else(|| bad("bad size field"))?;
            // (One record past the cap is refused by read_meta, by its kind.)
            if matches!(typeflag, b'x' | b'L' | b'K') && size <= MAX_META_BYTES {
                meta_bytes = meta_bytes.saturating_add(size);
                if meta_bytes > MAX_META_BYTES {
                    return Err(TarError::TooLarge {
                        kind: "metadata records of one entry",
                        size: meta_bytes,
                    });
                }
            }
            match typeflag {
                b'x' => {
                    let data = self.read_meta(size, "PAX header")?;
                    parse_pax(&data, &mut pax, &mut xattrs)?;
                    continue;
                }
                b'g' => {
                    // Global headers carry archive-wide defaults images don't use.
                    self.read_meta(size, "PAX global header")?;
                    continue;
                }
                b'L' => {
                    long_name = Some(trim_nul(self.read_meta(size, "GNU long name")?));
                    continue;
                }
                b'K' => {
                    long_link = Some(trim_nul(self.read_meta(size, "GNU long link name")?));
                    continue;
                }
                _ => {}
            }

            let gnu = &h[257..263] == b"ustar ";
            let ustar = &h[257..263] == b"ustar\0";
            let mut path = if let Some(p) = pax.remove("path") {
                p
            } else if let Some(p) = long_name.take() {
                p
            } else {
                let name = cstr(&h[0..100]);
                let prefix = if ustar { cstr(&h[345..500]) } else { &[][..] };
                if prefix.is_empty() {
                    name.to_vec()
                } else {
                    [prefix, b"/", name].concat()
                }
            };
            let link = pax
                .remove("linkpath")
                .or(long_link.take())
                .unwrap_or_else(|| cstr(&h[157..257]).to_vec());
            let mode = num(&h[100..108]).ok_or_else(|| bad("bad mode field"))? as u32 & 0o7777;
            let uid = pax_num(&pax, "uid")?
                .map_or_else(|| num(&h[108..116]).ok_or_else(|| bad("bad uid")), Ok)?;
            let gid = pax_num(&pax, "gid")?
                .map_or_else(|| num(&h[116..124]).ok_or_else(|| bad("bad gid")), Ok)?;
            let mtime = match pax.get("mtime") {
                Some(v) => parse_pax_time(v)?,
                None => (num(&h[136..148]).ok_or_else(|| bad("bad mtime"))? as i64, 0),
            };
            let stored = pax_num(&pax, "size")?.unwrap_or(size);
            let dev_major = pax_num(&pax, "SCHILY.devmajor")?
                .or_else(|| num(&h[329..337]))
                .unwrap_or(0) as u32;
            let dev_minor = pax_num(&pax, "SCHILY.devminor")?
                .or_else(|| num(&h[337..345]))
                .unwrap_or(0) as u32;

            let kind = match typeflag {
                b'0' | b'\0' | b'7' | b'S' => Kind::File,
                b'5' => Kind::Dir,
                b'2' => Kind::Symlink,
                b'1' => Kind::Hardlink,
                b'3' => Kind::Char,
                b'4' => Kind::Block,
                b'6' => Kind::Fifo,
                // Old tars mark directories by a trailing slash on a regular entry.
                t => return Err(TarError::Unsupported(format!("entry type {:?}", t as char))),
            };
            let kind = if kind == Kind::File && path.ends_with(b"/") && typeflag == b'\0' {
                Kind::Dir
            } else {
                kind
            };

            self.remaining = if matches!(kind, Kind::File) {
                stored
            } else {
                0
            };
            // Some writers give links and dirs a size; their data is skipped.
            let skip_data = if matches!(kind, Kind::File) {
                0
            } else {
                stored
            };
            self.padding = pad(stored)
                .checked_add(skip_data)
                .ok_or_else(|| bad(format!("entry size {stored} too large")))?;
            let mut size = stored;
            let mut sparse = None;

            let sparse_keys = pax.contains_key("GNU.sparse.major")
                || pax.contains_key("GNU.sparse.map")
                || pax.contains_key("GNU.sparse.realsize")
                || pax.contains_key("GNU.sparse.size");
            if sparse_keys && kind != Kind::File {
                // The map would be read from data a non-file does not have.
                return Err(bad(format!("sparse map on a {kind:?} entry")));
            }
            if typeflag == b'S' {
                if !gnu {
                    return Err(bad("GNU sparse entry without a GNU header"));
                }
                let mut regions = Vec::new();
                push_regions(&h[386..482], &mut regions)?;
                let mut extended = h[482] != 0;
                while extended {
                    let ext = self
                        .read_block()?
                        .ok_or_else(|| bad("truncated sparse extension"))?;
                    push_regions(&ext[0..504], &mut regions)?;
                    extended = ext[504] != 0;
                    if regions.len() > MAX_SPARSE_REGIONS {
                        return Err(TarError::TooLarge {
                            kind: "sparse map",
                            size: regions.len() as u64,
                        });
                    }
                }
                size = num(&h[483..495]).ok_or_else(|| bad("bad sparse real size"))?;
                sparse = Some(regions);
            } else if let Some(major) = pax.get("GNU.sparse.major").cloned() {
                let minor = pax
                    .get("GNU.sparse.minor")
                    .cloned()
                    .unwrap_or_else(|| b"0".to_vec());
                if let Some(n) = pax.remove("GNU.sparse.name") {
                    path = n;
                }
                size = pax_num(&pax, "GNU.sparse.realsize")?
                    .ok_or_else(|| bad("sparse file without realsize"))?;
                match (major.as_slice(), minor.as_slice()) {
                    (b"1", b"0") => {
                        // The map is at the start of the data, in decimal lines,
                        // padded to a block.
                        let (map, used) = self.read_sparse_map_1_0()?;
                        sparse = Some(map);
                        self.remaining = stored
                            .checked_sub(used)
                            .ok_or_else(|| bad("sparse map longer than data"))?;
                    }
                    _ => {
                        return Err(TarError::Unsupported(format!(
                            "GNU sparse format {}.{}",
                            s(&major),
                            s(&minor)
                        )))
                    }
                }
            } else if let Some(map) = pax.remove("GNU.sparse.map") {
                size = pax_num(&pax, "GNU.sparse.size")?
                    .ok_or_else(|| bad("sparse file without size"))?;
                if let Some(n) = pax.remove("GNU.sparse.name") {
                    path = n;
                }
                let nums: Vec<u64> = s(&map)
                    .split(',')
                    .map(|x| x.parse::<u64>().map_err(|_| bad("bad GNU.sparse.map")))
                    .collect::<Result<_, _>>()?;
                if !nums.len().is_multiple_of(2) || nums.len() / 2 > MAX_SPARSE_REGIONS {
                    return Err(bad("bad GNU.sparse.map"));
                }
                sparse = Some(nums.chunks(2).map(|c| (c[0], c[1])).collect());
            }
            if let Some(regions) = &sparse {
                let mut end = 0u64;
                let mut total = 0u64;
                for &(off, len) in regions {
                    if off < end || off.checked_add(len).is_none_or(|e| e > size) {
                        return Err(bad("sparse regions out of order or past the file's end"));
                    }
                    end = off + len;
                    total += len;
                }
                if total != self.remaining {
                    return Err(bad("sparse regions do not add up to the stored data"));
                }
            }

            return Ok(Some(Entry {
                path,
                link,
                kind,
                mode,
                uid,
                gid,
                size,
                mtime,
                dev_major,
                dev_minor,
                xattrs,
                sparse,
                data_offset: self.r.n,
            }));
        }
    }

    fn read_sparse_map_1_0(&mut self) -> Result<(Vec<(u64, u64)>, u64), TarError> {
        let mut used = 0u64;
        let mut line = Vec::new();
        let mut next_num = |this: &mut Self, used: &mut u64| -> Result<u64, TarError> {
            line.clear();
            loop {
                let mut b = [0u8; 1];
                this.r.read_exact(&mut b)?;
                *used += 1;
                if b[0] == b'\n' {
                    break;
                }
                if line.len() > 20 {
                    return Err(bad("bad sparse map number"));
                }
                line.push(b[0]);
            }
            s(&line)
                .parse::<u64>()
                .map_err(|_| bad("bad sparse map number"))
        };
        let count = next_num(self, &mut used)? as usize;
        if count > MAX_SPARSE_REGIONS {
            return Err(TarError::TooLarge {
                kind: "sparse map",
                size: count as u64,
            });
        }
        let mut map = Vec::with_capacity(count);
        for _ in 0..count {
            let off = next_num(self, &mut used)?;
            let len = next_num(self, &mut used)?;
            map.push((off, len));
        }
        let p = pad(used);
        self.skip(p)?;
        Ok((map, used + p))
    }
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pad(n: u64) -> u64 {
    (BLOCK - n % BLOCK) % BLOCK
}

fn cstr(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// A numeric header field: octal ASCII, or base-256 when the top bit is set.
fn num(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut v: u64 = (field[0] & 0x3f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let t: Vec<u8> = field
        .iter()
        .copied()
        .filter(|&b| b != 0 && b != b' ')
        .collect();
    if t.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&t).ok()?, 8).ok()
}

fn verify_checksum(h: &[u8; 512]) -> Result<(), TarError> {
    let want = num(&h[148..156]).ok_or_else(|| bad("bad checksum field"))?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as u64;
        signed += (b as i8) as i64;
    }
    if unsigned == want || signed as u64 == want {
        Ok(())
    } else {
        Err(bad("header checksum mismatch"))
    }
}

fn push_regions(raw: &[u8], out: &mut Vec<(u64, u64)>) -> Result<(), TarError> {
    for c in raw.chunks(24) {
        if c.len() < 24 || c.iter().all(|&b| b == 0) {
            break;
        }
        let off = num(&c[0..12]).ok_or_else(|| bad("bad sparse offset"))?;
        let len = num(&c[12..24]).ok_or_else(|| bad("bad sparse length"))?;
        out.push((off, len));
    }
    Ok(())
}

/// PAX records: `LEN key=value\n`, LEN counting the whole record.
fn parse_pax(
    mut data: &[u8],
    pax: &mut HashMap<String, Vec<u8>>,
    xattrs: &mut Vec<(String, Vec<u8>)>,
) -> Result<(), TarError> {
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("PAX record without length"))?;
        let len: usize = s(&data[..sp])
            .parse()
            .map_err(|_| bad("bad PAX record length"))?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad("bad PAX record"));
        }
        let rec = &data[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("PAX record without '='"))?;
        let key = String::from_utf8(rec[..eq].to_vec()).map_err(|_| bad("PAX key not UTF-8"))?;
        let value = rec[eq + 1..].to_vec();
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            xattrs.push((name.to_string(), value));
        } else {
            pax.insert(key, value);
        }
        data = &data[len..];
    }
    Ok(())
}

fn pax_num(pax: &HashMap<String, Vec<u8>>, key: &str) -> Result<Option<u64>, TarError> {
    match pax.get(key) {
        None => Ok(None),
        Some(v) => s(v)
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| bad(format!("bad PAX {key}"))),
    }
}

fn parse_pax_time(v: &[u8]) -> Result<(i64, u32), TarError> {
    let t = s(v);
    let (secs, frac) = t.split_once('.').unwrap_or((&t, ""));
    let secs: i64 = secs.parse().map_err(|_| bad("bad PAX mtime"))?;
    let digits: String = frac.chars().take(9).collect();
    let nanos = if digits.is_empty() {
        0
    } else {
        digits.parse::<u32>().map_err(|_| bad("bad PAX mtime"))?
            * 10u32.pow(9 - digits.len() as u32)
    };
    Ok((secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_fields() {
        assert_eq!(num(b"0000644\0"), Some(0o644));
        assert_eq!(num(b"     17 "), Some(0o17));
        assert_eq!(num(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(num(b"\0\0\0"), Some(0));
        assert_eq!(num(b"9"), None);
    }

    #[test]
    fn pax_records_and_times() {
        let mut pax = HashMap::new();
        let mut x = Vec::new();
        let rec = b"27 path=a/very/long/name.t\n29 SCHILY.xattr.user.k=value\n";
        parse_pax(rec, &mut pax, &mut x).unwrap();
        assert_eq!(pax["path"], b"a/very/long/name.t");
        assert_eq!(x, vec![("user.k".to_string(), b"value".to_vec())]);
        assert!(parse_pax(b"99 path=x\n", &mut pax, &mut x).is_err());
        assert_eq!(
            parse_pax_time(b"1700000000.5").unwrap(),
            (1700000000, 500_000_000)
        );
        assert_eq!(parse_pax_time(b"12").unwrap(), (12, 0));
    }

    fn header(name: &str, size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn pax_header(records: &[u8]) -> Vec<u8> {
        let mut t = header("pax", records.len() as u64);
        t[156] = b'x';
        t[148..156].copy_from_slice(b"        ");
        let sum: u32 = t.iter().map(|&b| b as u32).sum();
        t[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        t.extend_from_slice(records);
        t.resize(t.len().div_ceil(512) * 512, 0);
        t
    }

    #[test]
    fn entries_say_where_their_data_starts() {
        let mut t = header("a", 5);
        t.extend_from_slice(b"hello");
        t.resize(1024, 0);
        // A PAX record (a long name) before the second entry.
        let long = "d/".repeat(60) + "b";
        let rec = format!("{} path={long}\n", long.len() + 10);
        assert_eq!(rec.len(), long.len() + 10);
        t.extend_from_slice(&pax_header(rec.as_bytes()));
        t.extend_from_slice(&header("b", 3));
        let b_at = t.len() as u64;
        t.extend_from_slice(b"xyz");
        t.resize(t.len().div_ceil(512) * 512 + 1024, 0);
        let mut r = TarReader::new(&t[..]);
        let a = r.next_entry().unwrap().unwrap();
        assert_eq!((a.data_offset, r.position()), (512, 512));
        let b = r.next_entry().unwrap().unwrap();
        assert_eq!(b.path, long.as_bytes());
        assert_eq!(b.data_offset, b_at);
        assert_eq!(&t[b_at as usize..b_at as usize + 3], b"xyz");
        assert!(r.next_entry().unwrap().is_none());
    }

    /// Found by fuzzing (a seed of tests/fuzz.rs): PAX headers of xattrs in
    /// a row, each under the cap, piled up in memory until the entry came
    /// (80 of them: 187 MB for an 84 MB archive; a gzip layer of a few MB
    /// could make that gigabytes).
    #[test]
    fn the_records_before_one_entry_are_capped_together() {
        let mut recs = Vec::new();
        let mut i = 0;
        while recs.len() < 600 << 10 {
            let rec = format!("SCHILY.xattr.user.k{i}={}\n", "v".repeat(200));
            let len = rec.len() + 4;
            recs.extend_from_slice(format!("{len} {rec}").as_bytes());
            i += 1;
        }
        let mut t = Vec::new();
        for _ in 0..2 {
            t.extend(pax_header(&recs));
        }
        t.extend(header("a", 0));
        t.extend([0u8; 1024]);
        match TarReader::new(&t[..]).next_entry() {
            Err(TarError::TooLarge { kind, size }) => {
                assert_eq!(kind, "metadata records of one entry");
                assert!(size > MAX_META_BYTES);
            }
            other => panic!("two 600 KiB PAX headers before one entry: {other:?}"),
        }
        // One of them is fine.
        let mut t = pax_header(&recs);
        t.extend(header("a", 0));
        let e = TarReader::new(&t[..]).next_entry().unwrap().unwrap();
        assert_eq!(e.xattrs.len(), i);
    }

    fn with_type(mut h: Vec<u8>, flag: u8) -> Vec<u8> {
        h[156] = flag;
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    /// Found by fuzzing: a directory whose PAX size is 2^64-1 overflowed
    /// the padding sum (a panic in debug builds, a misread archive in
    /// release ones).
    #[test]
    fn a_huge_size_on_a_non_file_is_an_error() {
        let mut t = pax_header(b"29 size=18446744073709551615\n");
        t.extend(with_type(header("d/", 0), b'5'));
        t.extend([0u8; 1024]);
        match TarReader::new(&t[..]).next_entry() {
            Err(TarError::Malformed(m)) => assert!(m.contains("too large"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    /// Found by fuzzing: sparse PAX keys on a directory made the reader take
    /// a sparse map out of data a directory does not have.
    #[test]
    fn a_sparse_map_on_a_non_file_is_an_error() {
        for recs in [
            &b"22 GNU.sparse.map=0,0\n21 GNU.sparse.size=0\n"[..],
            &b"22 GNU.sparse.major=1\n22 GNU.sparse.minor=0\n25 GNU.sparse.realsize=9\n"[..],
        ] {
            let mut t = pax_header(recs);
            t.extend(with_type(header("d", 512), b'5'));
            t.extend(b"1\n0\n1\n");
            t.resize(t.len().div_ceil(512) * 512 + 1024, 0);
            match TarReader::new(&t[..]).next_entry() {
                Err(TarError::Malformed(m)) => assert!(m.contains("sparse map on a Dir"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_stream_may_end_in_the_last_padding_but_not_in_data() {
        let mut t = header("a", 6);
        t.extend_from_slice(b"fresh\n");
        for cut in [t.len(), t.len() + 100] {
            let mut bytes = t.clone();
            bytes.resize(cut, 0);
            let mut r = TarReader::new(&bytes[..]);
            let e = r.next_entry().unwrap().expect("the entry");
            assert_eq!(e.path, b"a");
            let mut buf = [0u8; 16];
            assert_eq!(r.read_data(&mut buf).unwrap(), 6);
            assert!(r.next_entry().unwrap().is_none(), "cut at {cut}");
        }
        // Cut inside the data: an error, whether or not the data is read.
        let cut = &t[..t.len() - 2];
        assert!(TarReader::new(cut).next_entry().unwrap().is_some());
        let mut r = TarReader::new(cut);
        r.next_entry().unwrap();
        assert!(r.next_entry().is_err());
    }
}
