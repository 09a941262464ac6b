//! Hostile indexes are refused, each with the reason that applies; random
//! mutations of valid ones never make the reader panic.

mod common;

use cstore_index::encode::{ChunkRec, EntryRec, IndexBuilder, SpanRec};
use cstore_index::format::{flags, span_flags, Compression, Index, Kind, Source, HEADER_LEN};
use cstore_index::{Error, SpanReader};

fn entry(parent: u32, name: &str, kind: Kind) -> EntryRec {
    let mut e = EntryRec::new(parent, name.as_bytes(), kind);
    e.perm = if kind == Kind::Dir { 0o755 } else { 0o644 };
    e.mtime = (1_700_000_000, 5);
    e
}

/// A small valid gzip index with every kind of entry.
fn base() -> IndexBuilder {
    let mut entries = vec![entry(0, "", Kind::Dir), entry(0, "etc", Kind::Dir)];
    let mut passwd = entry(1, "passwd", Kind::File);
    passwd.size = 200;
    passwd.data = 100;
    passwd.xattrs = vec![
        (b"security.capability".to_vec(), vec![1, 2]),
        (b"user.a".to_vec(), b"x".to_vec()),
    ];
    entries.push(passwd); // 2
    let mut link = entry(1, "link", Kind::Symlink);
    link.link = b"passwd".to_vec();
    link.size = 6;
    entries.push(link); // 3
    let mut hard = EntryRec::new(1, b"hard", Kind::Hardlink);
    hard.data = 2;
    entries.push(hard); // 4
    let mut null = entry(0, "null", Kind::Char);
    null.data = (1 << 32) | 3;
    entries.push(null); // 5
    let mut sparse = entry(0, "sparse", Kind::File);
    sparse.size = 10_000;
    sparse.data = 1000;
    sparse.sparse = Some(vec![(0, 10), (5000, 20)]);
    entries.push(sparse); // 6
    entries.push(EntryRec {
        perm: 0,
        ..entry(0, "gone", Kind::Whiteout)
    }); // 7
    let mut op = entry(0, "op", Kind::Dir);
    op.opaque = true;
    entries.push(op); // 8
    let spans = vec![
        SpanRec {
            cin: 0,
            out: 0,
            sha256: [1; 32],
            flags: span_flags::MEMBER_START,
            ..Default::default()
        },
        SpanRec {
            cin: 400,
            out: 2000,
            sha256: [2; 32],
            bits: 3,
            window_off: 0,
            window_len: 100,
            window_sha256: [3; 32],
            ..Default::default()
        },
        SpanRec {
            cin: 700,
            out: 4000,
            sha256: [4; 32],
            window_off: 100,
            window_len: 50,
            window_sha256: [5; 32],
            ..Default::default()
        },
    ];
    IndexBuilder {
        compression: Compression::Gzip,
        source: Source::Built,
        layer_digest: [9; 32],
        diff_id: [8; 32],
        compressed_size: 1000,
        uncompressed_size: 5000,
        span_target: 128 << 10,
        flags: 0,
        windows_size: 150,
        entries,
        spans,
        chunks: Vec::new(),
    }
}

fn refused(b: &IndexBuilder, why: &str) {
    let bytes = b.encode_unvalidated().unwrap();
    match Index::parse(&bytes[..]) {
        Err(Error::InvalidIndex(r)) => assert!(r.contains(why), "expected {why:?}, got {r:?}"),
        Err(e) => panic!("expected {why:?}, got {e}"),
        Ok(_) => panic!("accepted; expected {why:?}"),
    }
    // The encoder refuses to write it too.
    assert!(b.encode().is_err());
}

fn raw_refused(bytes: &[u8], why: &str) {
    match Index::parse(bytes) {
        Err(Error::InvalidIndex(r)) => assert!(r.contains(why), "expected {why:?}, got {r:?}"),
        Err(e) => panic!("expected {why:?}, got {e}"),
        Ok(_) => panic!("accepted; expected {why:?}"),
    }
}

#[test]
fn a_valid_index_reads_back() {
    let b = base();
    let bytes = b.encode().unwrap();
    let idx = Index::parse(bytes).unwrap();
    assert_eq!(idx.entry_count(), 9);
    assert_eq!(idx.lookup_path(b"etc/passwd"), Some(2));
    assert_eq!(idx.lookup_path(b"./etc//passwd"), Some(2));
    assert_eq!(idx.lookup_path(b"etc/nope"), None);
    let names: Vec<&[u8]> = idx.children(1).iter().map(|&c| idx.name(c)).collect();
    assert_eq!(names, [&b"hard"[..], b"link", b"passwd"]);
    assert_eq!(idx.nlink(2), 2);
    assert_eq!(idx.nlink(0), 4); // ".", "..", etc, op
    assert_eq!(idx.entry(4).hardlink_target(), Some(2));
    assert_eq!(idx.entry(5).rdev(), Some((1, 3)));
    assert_eq!(idx.link_target(3), Some(&b"passwd"[..]));
    assert_eq!(
        idx.sparse_map(6).unwrap().collect::<Vec<_>>(),
        [(0, 10), (5000, 20)]
    );
    assert!(idx.entry(8).is_opaque());
    let x: Vec<_> = idx.xattrs(2).collect();
    assert_eq!(
        x,
        [
            (&b"security.capability"[..], &[1u8, 2][..]),
            (b"user.a", b"x")
        ]
    );
    assert_eq!(idx.span(1).compressed, 399..700);
    assert_eq!(idx.span(2).compressed, 700..1000);
    assert_eq!(idx.span(2).uncompressed, 4000..5000);
    assert_eq!(idx.spans_for(1999, 2001), 0..2);
    assert_eq!(idx.spans_for(4000, 4001), 2..3);
    assert_eq!(idx.spans_for(5000, 6000), 0..0);
    assert_eq!(idx.span_at(2000), Some(1));
    assert_eq!(idx.path(2), b"etc/passwd");
    // File ranges to stream ranges (holes are not stored).
    assert_eq!(idx.file_data(2, 10..20), [(10, 110..120)]);
    assert_eq!(idx.file_data(4, 190..300), [(190, 290..300)]);
    assert_eq!(
        idx.file_data(6, 5..5010),
        [(5, 1005..1010), (5000, 1010..1020)]
    );
    assert_eq!(idx.file_data(6, 20..4000), []);
    assert_eq!(idx.file_data(1, 0..10), []);
}

#[test]
fn each_rule_refuses_its_hostile_index() {
    let ok = base();
    type Edit = Box<dyn Fn(&mut IndexBuilder)>;
    let cases: Vec<(&str, Edit)> = vec![
        // spans
        ("does not start at byte 0", Box::new(|b| b.spans[0].cin = 5)),
        ("starts past the end", Box::new(|b| b.spans[2].cin = 1000)),
        ("starts past the end", Box::new(|b| b.spans[2].out = 6000)),
        (
            "overlapping or out of order",
            Box::new(|b| b.spans[2].cin = 400),
        ),
        (
            "overlapping or out of order",
            Box::new(|b| b.spans[1].out = 4500),
        ),
        (
            "expands to",
            Box::new(|b| b.uncompressed_size = 4000 + (64 << 20) + 1),
        ),
        ("bit offset above 7", Box::new(|b| b.spans[1].bits = 8)),
        (
            "a bit offset where there can be none",
            Box::new(|b| b.spans[0].bits = 1),
        ),
        (
            "window not where",
            Box::new(|b| b.spans[2].window_off = 120),
        ),
        (
            "window too large",
            Box::new(|b| b.spans[1].window_len = 40_000),
        ),
        ("windows add up to", Box::new(|b| b.windows_size = 151)),
        (
            "a window digest without a window",
            Box::new(|b| b.spans[0].window_sha256 = [1; 32]),
        ),
        (
            "data without a digest",
            Box::new(|b| b.spans[1].flags |= span_flags::NO_DIGEST),
        ),
        ("unknown flags", Box::new(|b| b.spans[1].flags = 0x80)),
        (
            "windows in a layer that is not gzip",
            Box::new(|b| b.compression = Compression::Zstd),
        ),
        // entries
        (
            "not one path component",
            Box::new(|b| b.entries[2].name = b"..".to_vec()),
        ),
        (
            "not one path component",
            Box::new(|b| b.entries[2].name = b".".to_vec()),
        ),
        (
            "not one path component",
            Box::new(|b| b.entries[2].name = b"a/b".to_vec()),
        ),
        (
            "not one path component",
            Box::new(|b| b.entries[2].name = b"a\0b".to_vec()),
        ),
        (
            "name length",
            Box::new(|b| b.entries[2].name = vec![b'n'; 256]),
        ),
        ("name length", Box::new(|b| b.entries[2].name = Vec::new())),
        (
            "not an earlier directory",
            Box::new(|b| b.entries[1].parent = 2),
        ),
        (
            "not an earlier directory",
            Box::new(|b| b.entries[3].parent = 2),
        ),
        (
            "not the root directory",
            Box::new(|b| b.entries[0].kind = Kind::File),
        ),
        (
            "not the root directory",
            Box::new(|b| b.entries[0].name = b"x".to_vec()),
        ),
        (
            "not an earlier regular file",
            Box::new(|b| b.entries[4].data = 1),
        ),
        (
            "not an earlier regular file",
            Box::new(|b| b.entries[4].data = 6),
        ),
        (
            "not an earlier regular file",
            Box::new(|b| b.entries[4].data = 3),
        ),
        ("attributes of its own", Box::new(|b| b.entries[4].size = 1)),
        ("data past the end", Box::new(|b| b.entries[2].size = 4901)),
        (
            "data past the end",
            Box::new(|b| b.entries[2].data = u64::MAX - 10),
        ),
        (
            "symlink target",
            Box::new(|b| b.entries[3].link = Vec::new()),
        ),
        (
            "symlink target",
            Box::new(|b| b.entries[3].link = b"a\0b".to_vec()),
        ),
        (
            "symlink target",
            Box::new(|b| b.entries[3].link = vec![b'l'; 4096]),
        ),
        ("symlink size", Box::new(|b| b.entries[3].size = 7)),
        (
            "sparse regions",
            Box::new(|b| b.entries[6].sparse = Some(vec![(5000, 20), (0, 10)])),
        ),
        (
            "sparse regions",
            Box::new(|b| b.entries[6].sparse = Some(vec![(9990, 20)])),
        ),
        (
            "directory flags on a non-directory",
            Box::new(|b| b.entries[2].opaque = true),
        ),
        (
            "overlay xattr",
            Box::new(|b| {
                b.entries[2].xattrs = vec![(b"trusted.overlay.redirect".to_vec(), b"/".to_vec())]
            }),
        ),
        (
            "overlay xattr",
            Box::new(|b| {
                b.entries[2].xattrs = vec![(b"user.overlay.origin".to_vec(), b"/".to_vec())]
            }),
        ),
        (
            "not sorted or repeated",
            Box::new(|b| b.entries[2].xattrs.reverse()),
        ),
        ("data, size or target", Box::new(|b| b.entries[7].size = 3)),
        (
            "same name",
            Box::new(|b| b.entries[8].name = b"gone".to_vec()),
        ),
        (
            "mtime nanoseconds",
            Box::new(|b| b.entries[2].mtime.1 = 1_000_000_000),
        ),
        // chunks
        (
            "chunk table without",
            Box::new(|b| {
                b.chunks = vec![ChunkRec {
                    entry: 2,
                    offset: 0,
                    size: 200,
                    sha256: [0; 32],
                }]
            }),
        ),
    ];
    for (why, edit) in &cases {
        let mut b = ok.clone();
        edit(&mut b);
        refused(&b, why);
    }

    // Raw header damage.
    let good = ok.encode().unwrap();
    let mut b = good.clone();
    b[0] ^= 1;
    raw_refused(&b, "bad magic");
    let mut b = good.clone();
    b[8] = 2;
    raw_refused(&b, "unsupported version");
    raw_refused(&good[..good.len() - 1], "the header says");
    let mut b = good.clone();
    b.push(0);
    raw_refused(&b, "the header says");
    let mut b = good.clone();
    b[12] = 9;
    raw_refused(&b, "unknown compression");
    let mut b = good.clone();
    b[14] = 0x80;
    raw_refused(&b, "unknown flags");
    let mut b = good.clone();
    b[126] = 1;
    raw_refused(&b, "reserved");
    // A name pointing past the heap.
    let mut b = good.clone();
    let rec = HEADER_LEN + 2 * 64;
    b[rec + 4..rec + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    raw_refused(&b, "out of bounds");
    // An xattr block claiming more than the heap holds.
    let mut b = good.clone();
    let xoff = u32::from_le_bytes(b[rec + 60..rec + 64].try_into().unwrap()) as usize;
    let heap_at = good.len() - u32::from_le_bytes(good[108..112].try_into().unwrap()) as usize;
    b[heap_at + xoff..heap_at + xoff + 4].copy_from_slice(&(1u32 << 19).to_le_bytes());
    raw_refused(&b, "xattrs too large or outside the heap");
    // An index claiming more than a GiB.
    let mut b = good.clone();
    b[96..100].copy_from_slice(&(u32::MAX).to_le_bytes());
    raw_refused(&b, "the header says");
}

/// With chunk digests (eStargz imports): chunks must cover each file's data
/// in order, each inside one span.
#[test]
fn chunk_tables_are_checked() {
    let mut ok = base();
    ok.flags = flags::CHUNK_DIGESTS | flags::PAYLOAD_OFFSETS;
    ok.entries[6].sparse = None;
    ok.entries[6].size = 1000;
    ok.entries[6].data = 2000;
    for s in &mut ok.spans {
        s.flags |= span_flags::NO_DIGEST;
        s.sha256 = [0; 32];
    }
    ok.chunks = vec![
        ChunkRec {
            entry: 2,
            offset: 0,
            size: 150,
            sha256: [1; 32],
        },
        ChunkRec {
            entry: 2,
            offset: 150,
            size: 50,
            sha256: [1; 32],
        },
        ChunkRec {
            entry: 6,
            offset: 0,
            size: 1000,
            sha256: [1; 32],
        },
    ];
    let idx = Index::parse(ok.encode().unwrap()).unwrap();
    assert_eq!(idx.chunks_in_span(0), 0..2);
    assert_eq!(idx.chunks_in_span(1), 2..3);
    assert_eq!(idx.chunks_in_span(2), 3..3);
    type Edit = Box<dyn Fn(&mut IndexBuilder)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "previous chunk ended",
            Box::new(|b| b.chunks[1].offset = 151),
        ),
        ("data not covered", Box::new(|b| b.chunks[1].size = 49)),
        (
            "past the end of its file",
            Box::new(|b| b.chunks[1].size = 51),
        ),
        (
            "crosses a span boundary",
            Box::new(|b| b.entries[6].data = 1500),
        ),
        (
            "not of a plain regular file",
            Box::new(|b| b.chunks[0].entry = 1),
        ),
        ("entry out of range", Box::new(|b| b.chunks[2].entry = 99)),
        ("out of order", Box::new(|b| b.chunks.rotate_right(1))),
        (
            "payload offsets without chunk digests",
            Box::new(|b| b.flags = flags::PAYLOAD_OFFSETS),
        ),
    ];
    for (why, edit) in &cases {
        let mut b = ok.clone();
        edit(&mut b);
        refused(&b, why);
    }
}

/// Thousands of corrupted copies of real indexes (flipped bytes, cut or
/// grown) are refused or read without a panic; every accepted one is walked
/// whole, and its spans read (their digests then refuse the bytes).
#[test]
fn random_mutations_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut seeds = vec![base().encode().unwrap()];
    let tar = {
        let mut w = common::tarw::TarW::default();
        for i in 0..40 {
            w.add(&common::tarw::H::file(
                &format!("d{}/f{i}", i % 4),
                &vec![b'a' + (i % 26) as u8; i * 50],
            ));
        }
        w.add(&common::tarw::H::symlink("d0/l", "f1"));
        w.add(&common::tarw::H::hardlink("d1/h", "d0/f0"));
        w.finish()
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let blob = gz.finish().unwrap();
    let built = common::build(
        &blob,
        Compression::Gzip,
        cstore_index::Policy {
            span_target: 512,
            ..Default::default()
        },
    )
    .unwrap();
    seeds.push(built.index.clone());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut accepted, mut refused) = (0, 0);
    let mut reader = SpanReader::new();
    for round in 0..3000 {
        let mut b = seeds[round % seeds.len()].clone();
        match rng.gen_range(0..10) {
            0 => b.truncate(rng.gen_range(0..b.len())),
            1 => b.extend((0..rng.gen_range(1..64)).map(|_| rng.gen::<u8>())),
            _ => {
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..b.len());
                    b[i] = match rng.gen_range(0..3) {
                        0 => rng.gen(),
                        1 => b[i] ^ (1 << rng.gen_range(0..8)),
                        _ => [0, 0xff, 1, 0x7f][rng.gen_range(0..4)],
                    };
                }
            }
        }
        cstore_index::fuzz::index_parse(&b);
        match Index::parse(b) {
            Ok(idx) => {
                accepted += 1;
                if idx.header().compressed_size == blob.len() as u64 {
                    for i in 0..idx.span_count() {
                        let s = idx.span(i);
                        let c = &blob[s.compressed.start as usize..s.compressed.end as usize];
                        let w = s
                            .window()
                            .and_then(|r| built.windows.get(r.start as usize..r.end as usize))
                            .unwrap_or(&[]);
                        let _ = reader.read_span(&idx, i, c, w);
                    }
                }
            }
            Err(Error::InvalidIndex(_)) => refused += 1,
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
    assert!(
        refused > 1000 && accepted > 100,
        "{refused} refused, {accepted} accepted"
    );
}
