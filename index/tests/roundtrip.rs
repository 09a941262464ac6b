//! Indexes built in one pass over real and generated layers: every span
//! inflated from its own checkpoint and bytes equals the full inflate,
//! random reads through the index equal it too, and the entry table equals
//! the tree the project's extractor makes of the same layer.

mod common;

use std::io::Write;

use common::tarw::{TarW, H};
use common::{
    assert_random_reads, assert_same_tree, assert_spans, build, extract, fixtures, inflate_all,
    layers, unavailable, Built,
};
use cstore_index::format::span_flags;
use cstore_index::{Compression, Error, Index, NotSeekable, Policy};
use rand::{Rng, SeedableRng};

fn policy(span: u32) -> Policy {
    Policy {
        span_target: span,
        ..Policy::default()
    }
}

/// Build, then check spans, reads and (if `tree`) the extracted tree.
fn roundtrip(blob: &[u8], c: Compression, span: u32, tree: bool, what: &str) -> Built {
    let b = build(blob, c, policy(span)).unwrap_or_else(|e| panic!("{what}: {e}"));
    let idx = Index::parse(b.index.clone()).unwrap();
    let full = inflate_all(blob, c);
    assert!(
        b.tar == full,
        "{what}: the stream read through the index differs"
    );
    let h = idx.header();
    assert_eq!(h.compressed_size, blob.len() as u64, "{what}");
    assert_eq!(h.uncompressed_size, full.len() as u64, "{what}");
    assert_spans(&idx, blob, &b.windows, &full);
    assert_random_reads(&idx, blob, &b.windows, &full, 20, blob.len() as u64);
    if tree {
        let tmp = tempfile::tempdir().unwrap();
        let x = extract(tmp.path(), &full).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_same_tree(&idx, &full, &x);
    }
    b
}

/// A layer with what compresses well and what does not: text, random
/// bytes (stored blocks), long runs, many small files, links.
fn synthetic_tar(seed: u64, big: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let words = [
        "lazy", "layer", "index", "span", "window", "deflate", "zstd", "frame", "tar", "\n",
    ];
    let mut text = |n: usize| -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 16);
        while v.len() < n {
            v.extend_from_slice(words[rng.gen_range(0..words.len())].as_bytes());
            v.push(b' ');
        }
        v.truncate(n);
        v
    };
    let mut w = TarW::default();
    w.add(&H::dir("./"));
    w.add(&H::file("usr/share/doc/big.txt", &text(big)));
    for i in 0..300 {
        w.add(&H::file(
            &format!("etc/small/{i:03}.conf"),
            &text(i * 7 % 900),
        ));
    }
    let random: Vec<u8> = {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ 0xff);
        (0..big / 2).map(|_| r.gen()).collect()
    };
    w.add(&H::file("opt/random.bin", &random));
    w.add(&H::file("var/zeros", &vec![0u8; big / 2]));
    w.add(&H::hardlink(
        "usr/share/doc/big.link",
        "usr/share/doc/big.txt",
    ));
    w.add(&H::symlink("usr/bin/sh", "busybox"));
    w.add(&H::file("usr/share/doc/tail.txt", &text(big / 3)));
    w.finish()
}

fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn fixture_layers() {
    let tags = [
        "layered-delete",
        "layered-opaque",
        "layered-replace",
        "layered-hardlink",
        "layered-implicit",
    ];
    let oci = fixtures(&tags);
    let mut seen = std::collections::HashSet::new();
    let mut n = 0;
    for tag in ["busybox"].iter().chain(tags.iter()) {
        let Some(ls) = layers(&oci, tag) else {
            if unavailable(&format!("fixture image {tag}")) {
                return;
            }
            unreachable!()
        };
        for l in ls {
            if !seen.insert(l.digest.clone()) {
                continue;
            }
            let blob = std::fs::read(&l.path).unwrap();
            // Small spans too, so a small layer has many checkpoints.
            for span in [4096, 128 << 10] {
                let what = format!("{tag} {} ({span} byte spans)", l.digest);
                let b = roundtrip(&blob, l.compression, span, span == 4096, &what);
                let idx = Index::parse(b.index).unwrap();
                if blob.len() > 100_000 && span == 4096 {
                    // The busybox layer: enough checkpoints to need bits and windows.
                    let spans: Vec<_> = (0..idx.span_count()).map(|i| idx.span(i)).collect();
                    assert!(spans.len() > 20, "{what}: {} spans", spans.len());
                    assert!(
                        spans.iter().any(|s| s.bits > 0),
                        "{what}: no checkpoint mid-byte"
                    );
                    assert!(spans.iter().any(|s| s.window_len > 0), "{what}: no windows");
                }
            }
            n += 1;
        }
    }
    assert!(n >= 10, "only {n} distinct layers");
}

#[test]
fn gzip_levels_and_members() {
    let tar = synthetic_tar(1, 400_000);
    for level in [0, 1, 9] {
        roundtrip(
            &gzip(&tar, level),
            Compression::Gzip,
            32 << 10,
            level == 9,
            &format!("gzip -{level}"),
        );
    }
    // Several members, one of them empty; member starts become checkpoints
    // (no window), and a span may cross a member's end.
    let cuts = [0, 1000, 300_000, 300_000, 700_000, tar.len()];
    let mut multi = Vec::new();
    for w in cuts.windows(2) {
        multi.extend_from_slice(&gzip(&tar[w[0]..w[1]], 6));
    }
    let b = roundtrip(
        &multi,
        Compression::Gzip,
        16 << 10,
        true,
        "multi-member gzip",
    );
    let idx = Index::parse(b.index).unwrap();
    let members: Vec<_> = (1..idx.span_count())
        .map(|i| idx.span(i))
        .filter(|s| s.flags & span_flags::MEMBER_START != 0)
        .collect();
    assert!(!members.is_empty(), "no checkpoint at a member start");
    assert!(members.iter().all(|s| s.window_len == 0 && s.bits == 0));
    // Spans large enough to span members.
    roundtrip(
        &multi,
        Compression::Gzip,
        1 << 20,
        false,
        "multi-member gzip, 1 MiB spans",
    );
}

#[test]
fn uncompressed_layers() {
    let tar = synthetic_tar(2, 300_000);
    let b = roundtrip(&tar, Compression::None, 64 << 10, true, "uncompressed");
    let idx = Index::parse(b.index).unwrap();
    assert_eq!(idx.span_count(), tar.len().div_ceil(64 << 10));
    assert!(b.windows.is_empty());
}

#[test]
fn zstd_frames_are_checkpoints() {
    let tar = synthetic_tar(3, 600_000);
    // Many frames (as zstd:chunked or pzstd write), with skippable frames
    // between some of them.
    let mut multi = Vec::new();
    for (i, chunk) in tar.chunks(50_000).enumerate() {
        multi.extend_from_slice(&zstd::bulk::compress(chunk, 3).unwrap());
        if i % 3 == 0 {
            multi.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
            multi.extend_from_slice(&5u32.to_le_bytes());
            multi.extend_from_slice(b"skip!");
        }
    }
    let b = roundtrip(
        &multi,
        Compression::Zstd,
        40 << 10,
        true,
        "multi-frame zstd",
    );
    let idx = Index::parse(b.index).unwrap();
    assert!(idx.span_count() > 5, "{} spans", idx.span_count());

    // One frame: it cannot be entered in the middle, and the caller is told.
    let single = zstd::bulk::compress(&tar, 3).unwrap();
    match build(&single, Compression::Zstd, policy(40 << 10)) {
        Err(Error::NotSeekable(NotSeekable::SingleZstdFrame { compressed })) => {
            assert_eq!(compressed, single.len() as u64);
            let msg = Error::NotSeekable(NotSeekable::SingleZstdFrame { compressed }).to_string();
            assert!(
                msg.contains("single zstd frame") && msg.contains("cannot be read from the middle"),
                "{msg}"
            );
        }
        Err(e) => panic!("single frame: {e}"),
        Ok(_) => panic!("a single-frame zstd layer was indexed"),
    }
    // ...unless it is no bigger than one span anyway.
    roundtrip(
        &single,
        Compression::Zstd,
        4 << 20,
        false,
        "single small frame",
    );
}

/// A frame or block that expands past 64 MiB cannot be one span.
#[test]
fn oversized_frames_and_blocks_are_reported() {
    let zeros = vec![0u8; (64 << 20) + 4096];
    let mut t = TarW::default();
    t.add(&H::file("zeros", &zeros));
    let tar = t.finish();
    let mut z = zstd::bulk::compress(&tar[..1 << 20], 1).unwrap();
    z.extend_from_slice(&zstd::bulk::compress(&tar[1 << 20..], 1).unwrap());
    match build(&z, Compression::Zstd, policy(128 << 10)) {
        Err(Error::NotSeekable(NotSeekable::ZstdFrameTooLarge { .. })) => {}
        r => panic!("expected a frame too large, got {:?}", r.map(|_| ())),
    }

    // One fixed-Huffman deflate block of 65 MiB of zeros (zlib never writes
    // one that long; a crafted layer can): a literal, then length-258
    // copies at distance 1, then end of block.
    let copies = (65 << 20) / 258;
    let mut bw = BitWriter::default();
    bw.bits(1, 1); // last block
    bw.bits(1, 2); // fixed Huffman
    bw.code(0x30, 8); // literal 0
    for _ in 0..copies {
        bw.code(0xc5, 8); // length 258
        bw.code(0, 5); // distance 1
    }
    bw.code(0, 7); // end of block
    bw.bits(0, 7); // to a byte boundary
    let out_len = 1 + 258 * copies as u64;
    let mut crc = flate2::Crc::new();
    let zeros = vec![0u8; 1 << 20];
    let mut left = out_len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        crc.update(&zeros[..n]);
        left -= n as u64;
    }
    let mut gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    gz.extend_from_slice(&bw.out);
    gz.extend_from_slice(&crc.sum().to_le_bytes());
    gz.extend_from_slice(&(out_len as u32).to_le_bytes());
    match build(&gz, Compression::Gzip, policy(128 << 10)) {
        Err(Error::NotSeekable(NotSeekable::DeflateBlockTooLarge { .. })) => {}
        r => panic!("expected a block too large, got {:?}", r.map(|_| ())),
    }
}

/// Deflate's bit order: fields LSB first, Huffman codes MSB first.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u32,
    n: u32,
}

impl BitWriter {
    fn bits(&mut self, v: u32, len: u32) {
        for i in 0..len {
            self.acc |= ((v >> i) & 1) << self.n;
            self.n += 1;
            if self.n == 8 {
                self.out.push(self.acc as u8);
                self.acc = 0;
                self.n = 0;
            }
        }
    }
    fn code(&mut self, c: u32, len: u32) {
        for i in (0..len).rev() {
            self.bits((c >> i) & 1, 1);
        }
    }
}
