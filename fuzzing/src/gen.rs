//! Structured layers: `arbitrary` turns fuzz bytes into a list of tar
//! entries (every format the reader knows: ustar, GNU long names and old
//! sparse maps, PAX records and GNU sparse 0.1/1.0), which are written out
//! with valid checksums. Byte mutations alone almost never get a header's
//! checksum right; this reaches the extractor with hostile but well-formed
//! archives: `..`, absolute paths, paths through symlinks, hardlinks out of
//! the layer, whiteouts, overlay xattrs, lying sizes and sparse maps.

use arbitrary::Arbitrary;

/// An absolute path outside every sandbox that generated entries aim at
/// (the harness keeps a sentinel tree there and checks it never changes).
pub const VICTIM: &str = "/tmp/cstore-fuzz-victim";

/// Names of the sandbox's own tree (`../outside/secret`...) and usual ones.
const NAMES: &[&str] = &[
    "a", "b", "dir", "outside", "secret", "link", "etc", "passwd", "x.txt", "sub", "a b", "é",
];

const XATTRS: &[&str] = &[
    "user.a",
    "user.overlay.redirect",
    "trusted.overlay.opaque",
    "trusted.overlay.redirect",
    "trusted.x",
    "security.capability",
    "system.posix_acl_access",
    "user.",
    "",
    "user.a\0b",
];

const MAX_ENTRIES: usize = 48;
const MAX_COMPS: usize = 6;
const MAX_DATA: usize = 2048;

#[derive(Arbitrary, Debug)]
enum Comp {
    Name(u8),
    Dot,
    DotDot,
    Empty,
    Whiteout(u8),
    Opaque,
    AufsMeta,
    /// A component of 90.. bytes: past ustar's 100 and NAME_MAX's 255.
    Long(u8),
    Nul,
}

#[derive(Arbitrary, Debug)]
enum Root {
    Relative,
    DotSlash,
    Absolute,
    Victim,
}

#[derive(Arbitrary, Debug)]
struct GPath {
    root: Root,
    comps: Vec<Comp>,
    trailing_slash: bool,
}

impl GPath {
    fn render(&self) -> Vec<u8> {
        let mut parts: Vec<Vec<u8>> = Vec::new();
        for c in self.comps.iter().take(MAX_COMPS) {
            parts.push(match c {
                Comp::Name(i) => NAMES[*i as usize % NAMES.len()].as_bytes().to_vec(),
                Comp::Dot => b".".to_vec(),
                Comp::DotDot => b"..".to_vec(),
                Comp::Empty => Vec::new(),
                Comp::Whiteout(i) => {
                    [b".wh.", NAMES[*i as usize % NAMES.len()].as_bytes()].concat()
                }
                Comp::Opaque => b".wh..wh..opq".to_vec(),
                Comp::AufsMeta => b".wh..wh.plnk".to_vec(),
                Comp::Long(n) => vec![b'L'; 90 + *n as usize],
                Comp::Nul => b"n\0ul".to_vec(),
            });
        }
        let mut p = match self.root {
            Root::Relative => Vec::new(),
            Root::DotSlash => b"./".to_vec(),
            Root::Absolute => b"/".to_vec(),
            Root::Victim => format!("{VICTIM}/").into_bytes(),
        };
        p.extend(parts.join(&b'/'));
        if self.trailing_slash {
            p.push(b'/');
        }
        p
    }
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum GKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    /// Typeflag NUL: a file, or a directory if the name ends in '/'.
    OldFile,
    Contiguous,
    Other(u8),
}

impl GKind {
    fn flag(self) -> u8 {
        match self {
            GKind::File => b'0',
            GKind::Dir => b'5',
            GKind::Symlink => b'2',
            GKind::Hardlink => b'1',
            GKind::Char => b'3',
            GKind::Block => b'4',
            GKind::Fifo => b'6',
            GKind::OldFile => 0,
            GKind::Contiguous => b'7',
            GKind::Other(b) => b,
        }
    }
    fn has_data(self) -> bool {
        matches!(self, GKind::File | GKind::OldFile | GKind::Contiguous)
    }
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Format {
    Ustar,
    Gnu,
    Pax,
    V7,
}

#[derive(Arbitrary, Debug)]
enum Owner {
    Root,
    User,
    /// 2^32-1: out of range for a uid_t's valid ids.
    Max32,
    /// Past 32 bits.
    Huge,
}

#[derive(Arbitrary, Debug)]
enum Mtime {
    Header(u32),
    Pax { secs: i64, nanos: u32, digits: u8 },
    Junk(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum SparseFmt {
    OldGnu,
    Pax01,
    Pax10,
}

#[derive(Arbitrary, Debug)]
struct Sparse {
    fmt: SparseFmt,
    /// (gap before, length) of each data region.
    regions: Vec<(u16, u8)>,
    tail: u16,
    /// Declare a different real size than the regions give.
    lie: Option<u64>,
}

#[derive(Arbitrary, Debug)]
enum PaxKey {
    Path,
    Linkpath,
    Size,
    Uid,
    Gid,
    Mtime,
    DevMajor,
    DevMinor,
    SparseMajor,
    SparseMinor,
    SparseName,
    SparseRealsize,
    SparseMap,
    SparseSize,
    Xattr(u8),
    Comment,
    Raw(String),
}

impl PaxKey {
    fn name(&self) -> String {
        match self {
            PaxKey::Path => "path".into(),
            PaxKey::Linkpath => "linkpath".into(),
            PaxKey::Size => "size".into(),
            PaxKey::Uid => "uid".into(),
            PaxKey::Gid => "gid".into(),
            PaxKey::Mtime => "mtime".into(),
            PaxKey::DevMajor => "SCHILY.devmajor".into(),
            PaxKey::DevMinor => "SCHILY.devminor".into(),
            PaxKey::SparseMajor => "GNU.sparse.major".into(),
            PaxKey::SparseMinor => "GNU.sparse.minor".into(),
            PaxKey::SparseName => "GNU.sparse.name".into(),
            PaxKey::SparseRealsize => "GNU.sparse.realsize".into(),
            PaxKey::SparseMap => "GNU.sparse.map".into(),
            PaxKey::SparseSize => "GNU.sparse.size".into(),
            PaxKey::Xattr(i) => format!("SCHILY.xattr.{}", XATTRS[*i as usize % XATTRS.len()]),
            PaxKey::Comment => "comment".into(),
            PaxKey::Raw(s) => s.chars().take(64).collect(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum PaxValue {
    Bytes(Vec<u8>),
    Num(u64),
    Neg(i64),
    List(Vec<u16>),
}

impl PaxValue {
    fn render(&self) -> Vec<u8> {
        match self {
            PaxValue::Bytes(b) => b.iter().copied().take(256).collect(),
            PaxValue::Num(n) => n.to_string().into_bytes(),
            PaxValue::Neg(n) => n.to_string().into_bytes(),
            PaxValue::List(v) => v
                .iter()
                .take(16)
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",")
                .into_bytes(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct GEntry {
    path: GPath,
    kind: GKind,
    link: GPath,
    format: Format,
    mode: u16,
    owner: Owner,
    data: Vec<u8>,
    mtime: Mtime,
    dev: (u16, u16),
    xattrs: Vec<(u8, Vec<u8>)>,
    sparse: Option<Sparse>,
    /// Extra PAX records, which may contradict the header.
    extra: Vec<(PaxKey, PaxValue)>,
    /// A size field that is not the data's length.
    size_lie: Option<u64>,
    /// A PAX global header first.
    global: bool,
}

#[derive(Arbitrary, Debug)]
enum End {
    TwoZeroBlocks,
    OneZeroBlock,
    Nothing,
    Garbage(Vec<u8>),
    /// Cut the archive this many bytes short.
    Cut(u16),
}

/// A layer: entries, then how the archive ends.
#[derive(Arbitrary, Debug)]
pub struct Layer {
    entries: Vec<GEntry>,
    end: End,
}

impl Layer {
    /// The archive's bytes.
    pub fn to_tar(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for e in self.entries.iter().take(MAX_ENTRIES) {
            write_entry(&mut out, e);
        }
        match &self.end {
            End::TwoZeroBlocks => out.extend([0u8; 1024]),
            End::OneZeroBlock => out.extend([0u8; 512]),
            End::Nothing => {}
            End::Garbage(g) => out.extend(g.iter().take(1024)),
            End::Cut(n) => out.truncate(out.len().saturating_sub(*n as usize)),
        }
        out
    }
}

/// A numeric field: octal, or base-256 (GNU) when it does not fit.
fn put_num(field: &mut [u8], v: u64, base256: bool) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    if s.len() <= digits {
        field[..digits].copy_from_slice(s.as_bytes());
        field[digits] = 0;
    } else if base256 {
        field.fill(0);
        field[0] = 0x80;
        let be = v.to_be_bytes();
        let n = be.len().min(field.len() - 1);
        let start = field.len() - n;
        field[start..].copy_from_slice(&be[be.len() - n..]);
    } else {
        // Keep the low digits: a wrong value, as a careless writer makes.
        field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
        field[digits] = 0;
    }
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let base = key.len() + value.len() + 3;
    let mut len = base + base.to_string().len();
    if len.to_string().len() != base.to_string().len() {
        len = base + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

struct Header {
    name: Vec<u8>,
    link: Vec<u8>,
    flag: u8,
    mode: u64,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    dev: (u64, u64),
    format: Format,
}

fn header_block(h: &Header) -> [u8; 512] {
    let mut b = [0u8; 512];
    let gnu = h.format == Format::Gnu;
    let (prefix, name): (&[u8], &[u8]) = if h.format == Format::Ustar && h.name.len() > 100 {
        // Split at a '/' so that both halves fit, as ustar writers do.
        match (0..h.name.len())
            .rev()
            .find(|&i| h.name[i] == b'/' && i <= 155 && h.name.len() - i - 1 <= 100)
        {
            Some(i) => (&h.name[..i], &h.name[i + 1..]),
            None => (&[], &h.name[..100]),
        }
    } else {
        (&[], &h.name[..h.name.len().min(100)])
    };
    b[..name.len()].copy_from_slice(name);
    put_num(&mut b[100..108], h.mode, gnu);
    put_num(&mut b[108..116], h.uid, gnu);
    put_num(&mut b[116..124], h.gid, gnu);
    put_num(&mut b[124..136], h.size, gnu);
    put_num(&mut b[136..148], h.mtime, gnu);
    b[156] = h.flag;
    let link = &h.link[..h.link.len().min(100)];
    b[157..157 + link.len()].copy_from_slice(link);
    match h.format {
        Format::Ustar | Format::Pax => {
            b[257..263].copy_from_slice(b"ustar\0");
            b[263..265].copy_from_slice(b"00");
        }
        Format::Gnu => b[257..265].copy_from_slice(b"ustar  \0"),
        Format::V7 => {}
    }
    if h.format != Format::V7 {
        put_num(&mut b[329..337], h.dev.0, gnu);
        put_num(&mut b[337..345], h.dev.1, gnu);
        if h.format == Format::Ustar {
            b[345..345 + prefix.len()].copy_from_slice(prefix);
        }
    }
    crate::set_checksum(&mut b);
    b
}

fn pad(out: &mut Vec<u8>) {
    let n = out.len() % 512;
    if n != 0 {
        out.resize(out.len() + 512 - n, 0);
    }
}

/// A metadata record ('x', 'g', 'L', 'K') and its data.
fn meta(out: &mut Vec<u8>, flag: u8, data: &[u8], format: Format) {
    let h = Header {
        name: b"././@meta".to_vec(),
        link: Vec::new(),
        flag,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size: data.len() as u64,
        mtime: 0,
        dev: (0, 0),
        format: if format == Format::Gnu {
            Format::Gnu
        } else {
            Format::Ustar
        },
    };
    out.extend(header_block(&h));
    out.extend_from_slice(data);
    pad(out);
}

fn write_entry(out: &mut Vec<u8>, e: &GEntry) {
    let mut path = e.path.render();
    let mut link = e.link.render();
    let data: Vec<u8> = e.data.iter().copied().take(MAX_DATA).collect();
    let mut pax: Vec<u8> = Vec::new();
    let pax_ok = e.format == Format::Pax;

    if e.global {
        meta(out, b'g', &pax_record("comment", b"global"), Format::Pax);
    }
    if path.len() > 100 {
        match e.format {
            Format::Gnu => {
                let mut n = path.clone();
                n.push(0);
                meta(out, b'L', &n, Format::Gnu);
            }
            Format::Pax => pax.extend(pax_record("path", &path)),
            _ => {}
        }
    }
    if link.len() > 100 {
        match e.format {
            Format::Gnu => {
                let mut n = link.clone();
                n.push(0);
                meta(out, b'K', &n, Format::Gnu);
            }
            Format::Pax => pax.extend(pax_record("linkpath", &link)),
            _ => {}
        }
    }
    let (uid, gid) = match e.owner {
        Owner::Root => (0, 0),
        Owner::User => (1234, 5678),
        Owner::Max32 => (u32::MAX as u64, u32::MAX as u64),
        Owner::Huge => (1 << 40, (1 << 40) + 1),
    };
    if pax_ok && uid > 0o7777777 {
        pax.extend(pax_record("uid", uid.to_string().as_bytes()));
        pax.extend(pax_record("gid", gid.to_string().as_bytes()));
    }
    let mtime = match &e.mtime {
        Mtime::Header(t) => *t as u64,
        Mtime::Pax {
            secs,
            nanos,
            digits,
        } => {
            let frac = format!("{:09}", nanos % 1_000_000_000);
            let d = (*digits as usize % 12).min(9);
            let v = if d == 0 {
                secs.to_string()
            } else {
                format!("{secs}.{}", &frac[..d])
            };
            pax.extend(pax_record("mtime", v.as_bytes()));
            0
        }
        Mtime::Junk(j) => {
            pax.extend(pax_record(
                "mtime",
                &j.iter().copied().take(32).collect::<Vec<_>>(),
            ));
            0
        }
    };
    for (i, v) in e.xattrs.iter().take(8) {
        let key = format!("SCHILY.xattr.{}", XATTRS[*i as usize % XATTRS.len()]);
        let v: Vec<u8> = v.iter().copied().take(128).collect();
        pax.extend(pax_record(&key, &v));
    }

    // Sparse files: the stored data is the regions back to back.
    let mut stored = data.clone();
    let mut flag = e.kind.flag();
    let mut old_sparse: Option<(Vec<(u64, u64)>, u64)> = None;
    if let (Some(sp), true) = (&e.sparse, e.kind.has_data()) {
        let mut regions = Vec::new();
        let mut end = 0u64;
        for (gap, len) in sp.regions.iter().take(40) {
            let off = end + *gap as u64;
            regions.push((off, *len as u64));
            end = off + *len as u64;
        }
        let real = sp.lie.unwrap_or(end + sp.tail as u64);
        let total: u64 = regions.iter().map(|r| r.1).sum();
        stored = (0..total)
            .map(|i| {
                data.get(i as usize % data.len().max(1))
                    .copied()
                    .unwrap_or(b'z')
            })
            .collect();
        match sp.fmt {
            SparseFmt::OldGnu => {
                flag = b'S';
                old_sparse = Some((regions, real));
            }
            SparseFmt::Pax01 => {
                let map: Vec<String> = regions
                    .iter()
                    .flat_map(|(o, l)| [o.to_string(), l.to_string()])
                    .collect();
                pax.extend(pax_record("GNU.sparse.map", map.join(",").as_bytes()));
                pax.extend(pax_record("GNU.sparse.size", real.to_string().as_bytes()));
                pax.extend(pax_record("GNU.sparse.name", &path));
            }
            SparseFmt::Pax10 => {
                pax.extend(pax_record("GNU.sparse.major", b"1"));
                pax.extend(pax_record("GNU.sparse.minor", b"0"));
                pax.extend(pax_record("GNU.sparse.name", &path));
                pax.extend(pax_record(
                    "GNU.sparse.realsize",
                    real.to_string().as_bytes(),
                ));
                let mut m = format!("{}\n", regions.len());
                for (o, l) in &regions {
                    m.push_str(&format!("{o}\n{l}\n"));
                }
                let mut body = m.into_bytes();
                pad(&mut body);
                body.extend(stored);
                stored = body;
                // GNU tar names the entry apart from the real name.
                path = b"GNUSparseFile.0/f".to_vec();
            }
        }
    }
    if !e.kind.has_data() && e.size_lie.is_none() {
        stored.clear();
    }
    for (k, v) in e.extra.iter().take(8) {
        pax.extend(pax_record(&k.name(), &v.render()));
    }
    if !pax.is_empty() {
        meta(out, b'x', &pax, Format::Pax);
    }
    if e.format != Format::Gnu && e.format != Format::Pax {
        // ustar and v7 have no way to say more: the names are cut.
        path.truncate(if e.format == Format::Ustar { 256 } else { 100 });
        link.truncate(100);
    }
    let h = Header {
        name: path,
        link,
        flag,
        mode: e.mode as u64,
        uid,
        gid,
        size: e.size_lie.unwrap_or(stored.len() as u64),
        mtime,
        dev: (e.dev.0 as u64, e.dev.1 as u64),
        format: if old_sparse.is_some() {
            Format::Gnu
        } else {
            e.format
        },
    };
    let mut block = header_block(&h);
    if let Some((regions, real)) = old_sparse {
        let mut it = regions.iter();
        for (i, (o, l)) in it.by_ref().take(4).enumerate() {
            put_num(&mut block[386 + i * 24..398 + i * 24], *o, true);
            put_num(&mut block[398 + i * 24..410 + i * 24], *l, true);
        }
        let rest: Vec<&(u64, u64)> = it.collect();
        block[482] = (!rest.is_empty()) as u8;
        put_num(&mut block[483..495], real, true);
        crate::set_checksum(&mut block);
        out.extend(block);
        let chunks: Vec<&[&(u64, u64)]> = rest.chunks(21).collect();
        for (ci, chunk) in chunks.iter().enumerate() {
            let mut ext = [0u8; 512];
            for (i, (o, l)) in chunk.iter().enumerate() {
                put_num(&mut ext[i * 24..i * 24 + 12], *o, true);
                put_num(&mut ext[i * 24 + 12..i * 24 + 24], *l, true);
            }
            ext[504] = (ci + 1 < chunks.len()) as u8;
            out.extend(ext);
        }
    } else {
        out.extend(block);
    }
    out.extend(stored);
    pad(out);
}
