//! Reading spans: nothing is used unverified (span bytes, windows), and the
//! windows trimmed and compressed for `index push` still inflate every span
//! to the same bytes.

mod common;

use std::io::Write;

use common::tarw::{TarW, H};
use common::{
    assert_random_reads, assert_spans, build, fixtures, inflate_all, layers, unavailable,
};
use cstore_index::format::flags;
use cstore_index::windows::compact_windows;
use cstore_index::{Compression, Error, Index, Policy, SpanReader};
use rand::{Rng, SeedableRng};

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A layer of text and of random bytes (stored blocks: spans that need no
/// window).
fn mixed_layer() -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let words = ["alpha ", "beta ", "gamma ", "delta\n", "epsilon ", "zeta "];
    let text: Vec<u8> = (0..60_000)
        .flat_map(|_| words[rng.gen_range(0..words.len())].bytes())
        .collect();
    let random: Vec<u8> = (0..400_000).map(|_| rng.gen()).collect();
    let mut w = TarW::default();
    w.add(&H::file("text", &text));
    w.add(&H::file("random", &random));
    gz(&w.finish())
}

#[test]
fn compacted_windows_read_the_same() {
    let mut blobs = vec![("mixed".to_string(), mixed_layer())];
    let oci = fixtures(&[]);
    match layers(&oci, "busybox") {
        Some(ls) => blobs.push(("busybox".into(), std::fs::read(&ls[0].path).unwrap())),
        None => {
            unavailable("fixture image busybox");
        }
    }
    for (what, blob) in blobs {
        let b = build(
            &blob,
            Compression::Gzip,
            Policy {
                span_target: 16 << 10,
                ..Default::default()
            },
        )
        .unwrap();
        let idx = Index::parse(b.index.clone()).unwrap();
        let full = inflate_all(&blob, Compression::Gzip);
        let with_window = (0..idx.span_count())
            .filter(|&i| idx.span(i).window_len > 0)
            .count();
        let c = compact_windows(
            &idx,
            &b.windows,
            |_, r| Ok(blob[r.start as usize..r.end as usize].to_vec()),
            3,
        )
        .unwrap();
        let small = Index::parse(c.index).unwrap();
        assert!(small.header().has(flags::WINDOWS_ZSTD));
        assert!(
            c.after < c.before / 2,
            "{what}: windows {} -> {} bytes",
            c.before,
            c.after
        );
        if what == "mixed" {
            // Spans of stored blocks need no window at all.
            assert!(c.dropped > 5, "{what}: {} windows dropped", c.dropped);
        }
        assert!(c.dropped < with_window, "{what}: every window dropped");
        assert_spans(&small, &blob, &c.windows, &full);
        assert_random_reads(&small, &blob, &c.windows, &full, 30, 1);
        // Only the windows changed.
        assert_eq!(small.entry_count(), idx.entry_count());
        assert_eq!(
            &small.as_bytes()[128..128 + 64 * idx.entry_count() as usize],
            &idx.as_bytes()[128..128 + 64 * idx.entry_count() as usize]
        );
    }
}

#[test]
fn tampered_spans_and_windows_are_refused() {
    let blob = mixed_layer();
    let b = build(
        &blob,
        Compression::Gzip,
        Policy {
            span_target: 16 << 10,
            ..Default::default()
        },
    )
    .unwrap();
    let idx = Index::parse(b.index).unwrap();
    let i = (1..idx.span_count())
        .find(|&i| idx.span(i).window_len > 0)
        .unwrap();
    let s = idx.span(i);
    let c = &blob[s.compressed.start as usize..s.compressed.end as usize];
    let w = &b.windows[s.window().unwrap().start as usize..s.window().unwrap().end as usize];
    let mut r = SpanReader::new();
    assert!(r.read_span(&idx, i, c, w).is_ok());

    let mut bad = c.to_vec();
    bad[c.len() / 2] ^= 1;
    assert!(matches!(
        r.read_span(&idx, i, &bad, w),
        Err(Error::Digest {
            what: "compressed span",
            ..
        })
    ));
    assert!(matches!(
        r.read_span(&idx, i, &c[1..], w),
        Err(Error::Span { .. })
    ));
    // A window with one byte changed would inflate to wrong bytes that no
    // span digest covers: it is checked against its own digest.
    let mut badw = w.to_vec();
    badw[0] ^= 1;
    assert!(matches!(
        r.read_span(&idx, i, c, &badw),
        Err(Error::Digest { what: "window", .. })
    ));
    assert!(matches!(
        r.read_span(&idx, i, c, &w[1..]),
        Err(Error::Span { .. })
    ));
}
