//! eStargz imports against real blobs: ctr-remote (stargz-snapshotter 0.12)
//! converts the busybox fixture (fixtures/estargz.sh) to eStargz, eStargz
//! with chunked files, and zstd:chunked. Each TOC is found from the footer,
//! checked against the layer's toc.digest annotation, imported, and the
//! import must describe the same tree as an index built from the blob's own
//! tar (the extraction semantics), with every file's content read through
//! the import's spans and verified by its chunk digests.

mod common;

use common::{build, estargz_fixtures, layers, Layer};
use cstore_index::compare::{compare, CompareOptions};
use cstore_index::estargz::{self, Footer, Toc};
use cstore_index::{Error, Index, Kind, Policy, SpanReader};

fn footer_of(blob: &[u8]) -> Footer {
    let n = blob.len();
    let tail = &blob[n.saturating_sub(estargz::FOOTER_FETCH as usize)..];
    estargz::parse_footer(tail, n as u64).unwrap()
}

fn import(l: &Layer, blob: &[u8]) -> (Footer, Toc, estargz::Import) {
    let footer = footer_of(blob);
    let r = footer.toc_range(blob.len() as u64);
    let toc = estargz::read_toc(
        &footer,
        &blob[r.start as usize..r.end as usize],
        l.toc_digest.as_deref(),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", l.digest));
    let imp = estargz::import(
        &footer,
        &toc,
        common::sha256(blob),
        [0; 32],
        blob.len() as u64,
        common::tree_options(),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", l.digest));
    (footer, toc, imp)
}

#[test]
fn imports_equal_the_layers_own_tree() {
    let Some(dir) = estargz_fixtures() else {
        return;
    };
    let mut checked = 0;
    let mut chunked_files = 0;
    for variant in ["esgz", "esgz-chunk", "zchunk"] {
        let ls = layers(&dir.join(variant), variant).expect("fixture layout");
        for l in ls {
            let blob = std::fs::read(&l.path).unwrap();
            assert!(
                l.toc_digest.is_some(),
                "{variant}: no TOC digest annotation"
            );
            let (footer, toc, imp) = import(&l, &blob);
            assert_eq!(footer.compression(), l.compression, "{variant}");
            let idx = Index::parse(imp.index).unwrap();
            assert!(
                imp.prefetch.is_none(),
                "{variant}: no prefetch was recorded"
            );
            // Our own index of the blob, from its tar: the reference tree.
            let b = build(&blob, l.compression, Policy::default()).unwrap();
            let own = Index::parse(b.index).unwrap();
            compare(
                &idx,
                &own,
                CompareOptions {
                    data_offsets: false,
                    mtime_nanos: false,
                },
            )
            .unwrap_or_else(|m| panic!("{variant} {}: {m}", l.digest));
            // The gzip flavour's TOC is a file of the layer too.
            let toc_entry = idx.lookup_path(b"stargz.index.json");
            assert_eq!(
                toc_entry.is_some(),
                l.compression == cstore_index::Compression::Gzip
            );
            // Every file's bytes, read through the import's spans (each
            // chunk verified), equal the tar's.
            let mut r = SpanReader::new();
            for i in 0..idx.entry_count() {
                let e = idx.entry(i);
                if e.kind != Kind::File || e.size == 0 {
                    continue;
                }
                let path = idx.path(i);
                let o = own.entry(own.lookup_path(&path).unwrap());
                let data = e.data_offset().unwrap();
                let got = r.read_range(&idx, &blob, &[], data..data + e.size).unwrap();
                let off = o.data_offset().unwrap() as usize;
                assert!(
                    got == b.tar[off..off + e.size as usize],
                    "{variant}: {:?}",
                    String::from_utf8_lossy(&path)
                );
                if idx.spans_for(data, data + e.size).len() > 1 {
                    chunked_files += 1;
                }
            }
            if let Some(t) = toc_entry {
                let e = idx.entry(t);
                let got = r
                    .read_range(
                        &idx,
                        &blob,
                        &[],
                        e.data_offset().unwrap()..e.data_offset().unwrap() + e.size,
                    )
                    .unwrap();
                assert_eq!(got, toc.json);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 9);
    assert!(chunked_files > 0, "no file spread over several chunks");
}

#[test]
fn bad_tocs_and_bytes_are_refused() {
    let Some(dir) = estargz_fixtures() else {
        return;
    };
    let l = layers(&dir.join("esgz"), "esgz").unwrap().remove(0);
    let blob = std::fs::read(&l.path).unwrap();
    let footer = footer_of(&blob);
    let r = footer.toc_range(blob.len() as u64);
    let toc_bytes = &blob[r.start as usize..r.end as usize];

    // Not the TOC the manifest pins.
    let wrong = format!("sha256:{}", "0".repeat(64));
    match estargz::read_toc(&footer, toc_bytes, Some(&wrong)) {
        Err(Error::Estargz(m)) => assert!(m.contains("does not match"), "{m}"),
        r => panic!("{:?}", r.map(|_| ())),
    }
    // No footer, a footer pointing past itself, a truncated TOC member.
    assert!(estargz::parse_footer(&[0u8; 51], 1000).is_err());
    let mut tail = blob[blob.len() - 51..].to_vec();
    tail[16..32].copy_from_slice(format!("{:016x}", blob.len()).as_bytes());
    assert!(estargz::parse_footer(&tail, blob.len() as u64).is_err());
    assert!(estargz::read_toc(&footer, &toc_bytes[..toc_bytes.len() / 2], None).is_err());

    let toc = estargz::read_toc(&footer, toc_bytes, None).unwrap();
    let import_json = |json: String| {
        let t = Toc {
            json: json.into_bytes(),
            ..toc.clone()
        };
        estargz::import(
            &footer,
            &t,
            [0; 32],
            [0; 32],
            blob.len() as u64,
            common::tree_options(),
        )
    };
    let json = String::from_utf8(toc.json.clone()).unwrap();
    // Names escaping the root, offsets past the TOC, digests that are not.
    let escaped = json.replacen("\"name\": \"bin/\"", "\"name\": \"../../bin/\"", 1);
    assert_ne!(escaped, json);
    assert!(matches!(import_json(escaped), Err(Error::Entry { .. })));
    let past = json.replacen("\"offset\": ", "\"offset\": 99999999", 1);
    assert!(import_json(past).is_err());
    let undigested = json.replacen("\"chunkDigest\": \"sha256:", "\"chunkDigest\": \"md5:", 1);
    assert!(import_json(undigested).is_err());
    assert!(import_json("{\"version\":2,\"entries\":[]}".into()).is_err());

    // A damaged payload is refused when read: by inflate or by its chunk digest.
    let imp = estargz::import(
        &footer,
        &toc,
        [0; 32],
        [0; 32],
        blob.len() as u64,
        common::tree_options(),
    )
    .unwrap();
    let idx = Index::parse(imp.index).unwrap();
    let busybox = idx.lookup_path(b"bin/busybox").unwrap();
    let e = idx.entry(busybox);
    let s = idx.span(idx.span_at(e.data_offset().unwrap()).unwrap());
    let mut bad = blob.clone();
    bad[(s.compressed.start + s.compressed.end) as usize / 2] ^= 0x40;
    let d = e.data_offset().unwrap();
    assert!(SpanReader::new()
        .read_range(&idx, &bad, &[], d..d + e.size)
        .is_err());
}

/// Mutated TOCs and blob tails: refused or imported, never a panic; every
/// import is a valid index.
#[test]
fn mutated_tocs_never_panic() {
    use rand::{Rng, SeedableRng};
    let Some(dir) = estargz_fixtures() else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for variant in ["esgz", "esgz-chunk"] {
        for l in layers(&dir.join(variant), variant).unwrap() {
            let blob = std::fs::read(&l.path).unwrap();
            let footer = footer_of(&blob);
            let r = footer.toc_range(blob.len() as u64);
            let toc =
                estargz::read_toc(&footer, &blob[r.start as usize..r.end as usize], None).unwrap();
            for _ in 0..150 {
                let mut j = toc.json.clone();
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..j.len());
                    j[i] = b"0123456789\"{}[],:./-ab"[rng.gen_range(0..22)];
                }
                cstore_index::fuzz::estargz_toc(&j);
                let mut t = blob[blob.len().saturating_sub(200)..].to_vec();
                let i = rng.gen_range(0..t.len());
                t[i] = rng.gen();
                cstore_index::fuzz::estargz_blob(&t);
            }
        }
    }
}
