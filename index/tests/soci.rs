//! SOCI zTOC imports. There is no soci binary here (no Debian package), so
//! the zTOCs are laid out as soci's own Go code writes them
//! (ztoc/ztoc_marshaler.go: every field written, strings for PAX values;
//! ztoc/compression/gzip_zinfo.c: the zinfo blob, v2 and v1), through the
//! flatbuffers crate's builder, independent of the hand-written reader:
//! checkpoints every 256 KiB of output at deflate block boundaries, 32 KiB
//! windows zero-filled before the stream's start, a sha256 per span.

mod common;

use common::{build, fixtures, inflate_all, layers, unavailable, Counting};
use cstore_index::compare::{compare, CompareOptions};
use cstore_index::format::WINDOW_SIZE;
use cstore_index::{soci, Compression, Error, Index, Policy};
use cstore_unpack::tar::{Kind as K, TarReader};
use flatbuffers::{FlatBufferBuilder, WIPOffset};

/// What soci's TocBuilder records per tar entry.
struct Meta {
    name: Vec<u8>,
    kind: &'static str,
    offset: i64,
    size: i64,
    link: Vec<u8>,
    mode: i64,
    uid: u32,
    gid: u32,
    mtime: String,
    dev: (i64, i64),
    pax: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Go's time.MarshalText (RFC 3339 with nanoseconds, trailing zeros cut).
fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil_from_days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if nanos > 0 {
        let f = format!("{nanos:09}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// The tar's entries as soci's TocBuilder sees them.
fn metas(tar: &[u8]) -> Vec<Meta> {
    let count = std::rc::Rc::new(std::cell::Cell::new(0));
    let mut tr = TarReader::new(Counting::new(tar, count.clone()));
    let mut out = Vec::new();
    while let Some(e) = tr.next_entry().unwrap() {
        let kind = match e.kind {
            K::File => "reg",
            K::Dir => "dir",
            K::Symlink => "symlink",
            K::Hardlink => "hardlink",
            K::Char => "char",
            K::Block => "block",
            K::Fifo => "fifo",
        };
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = e
            .xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}").into_bytes(), v.clone()))
            .collect();
        // Go keeps every PAX record; only SCHILY.xattr.* are xattrs.
        pax.push((
            b"mtime".to_vec(),
            format!("{}.{}", e.mtime.0, e.mtime.1).into_bytes(),
        ));
        pax.sort();
        out.push(Meta {
            name: e.path.clone(),
            kind,
            offset: count.get() as i64,
            size: if e.kind == K::File { e.size as i64 } else { 0 },
            link: e.link.clone(),
            mode: e.mode as i64,
            uid: e.uid as u32,
            gid: e.gid as u32,
            mtime: rfc3339(e.mtime.0, e.mtime.1),
            dev: (e.dev_major as i64, e.dev_minor as i64),
            pax,
        });
    }
    out
}

/// A zTOC for gzip layer `blob` as soci's marshaler writes it. `v1` leaves
/// out the first checkpoint, as zinfo v1 did.
fn ztoc(blob: &[u8], metas: &[Meta], v1: bool) -> Vec<u8> {
    ztoc_with(blob, metas, v1, &|_| {})
}

fn ztoc_with(blob: &[u8], metas: &[Meta], v1: bool, zinfo_edit: &dyn Fn(&mut Vec<u8>)) -> Vec<u8> {
    // Checkpoints every 256 KiB of output (soci's rule, smaller span), at
    // block boundaries; the first right after the gzip header.
    let b = build(
        blob,
        Compression::Gzip,
        Policy {
            span_target: u32::MAX,
            max_span_out: 256 << 10,
        },
    )
    .unwrap();
    let idx = Index::parse(b.index).unwrap();
    assert_eq!(blob[3], 0, "a plain 10-byte gzip header");
    let mut cps: Vec<(i64, i64, u8, Vec<u8>)> = vec![(10, 0, 0, vec![0; WINDOW_SIZE])];
    for i in 1..idx.span_count() {
        let s = idx.span(i);
        let w = s
            .window()
            .map(|r| &b.windows[r.start as usize..r.end as usize])
            .unwrap_or(&[]);
        let mut full = vec![0u8; WINDOW_SIZE];
        full[WINDOW_SIZE - w.len()..].copy_from_slice(w);
        cps.push((s.cin as i64, s.out as i64, s.bits, full));
    }
    let digests: Vec<String> = (0..cps.len())
        .map(|k| {
            let start = (cps[k].0 - i64::from(cps[k].2 > 0)) as usize;
            let end = cps.get(k + 1).map_or(blob.len(), |c| c.0 as usize);
            format!("sha256:{}", hex::encode(common::sha256(&blob[start..end])))
        })
        .collect();
    let mut zinfo = Vec::new();
    zinfo.extend_from_slice(&(cps.len() as i32).to_le_bytes());
    zinfo.extend_from_slice(&(256i64 << 10).to_le_bytes());
    for (k, (cin, out, bits, w)) in cps.iter().enumerate() {
        if v1 && k == 0 {
            continue;
        }
        zinfo.extend_from_slice(&cin.to_le_bytes());
        zinfo.extend_from_slice(&out.to_le_bytes());
        zinfo.push(*bits);
        zinfo.extend_from_slice(w);
    }
    zinfo_edit(&mut zinfo);

    let mut fb = FlatBufferBuilder::new();
    let version = fb.create_string("0.9");
    let tool = fb.create_string("cstore test (soci marshaler layout)");
    let mut ms = Vec::new();
    for m in metas {
        let name = fb.create_byte_string(&m.name);
        let t = fb.create_string(m.kind);
        let link = fb.create_byte_string(&m.link);
        let uname = fb.create_string("");
        let gname = fb.create_string("");
        let mtime = fb.create_string(&m.mtime);
        let xs: Vec<_> = m
            .pax
            .iter()
            .map(|(k, v)| {
                let k = fb.create_byte_string(k);
                let v = fb.create_byte_string(v);
                let s = fb.start_table();
                fb.push_slot_always::<WIPOffset<_>>(4, k);
                fb.push_slot_always::<WIPOffset<_>>(6, v);
                fb.end_table(s)
            })
            .collect();
        let xs = fb.create_vector(&xs);
        let s = fb.start_table();
        fb.push_slot_always::<WIPOffset<_>>(4, name);
        fb.push_slot_always::<WIPOffset<_>>(6, t);
        fb.push_slot::<i64>(8, m.offset, 0);
        fb.push_slot::<i64>(10, m.size, 0);
        fb.push_slot_always::<WIPOffset<_>>(12, link);
        fb.push_slot::<i64>(14, m.mode, 0);
        fb.push_slot::<u32>(16, m.uid, 0);
        fb.push_slot::<u32>(18, m.gid, 0);
        fb.push_slot_always::<WIPOffset<_>>(20, uname);
        fb.push_slot_always::<WIPOffset<_>>(22, gname);
        fb.push_slot_always::<WIPOffset<_>>(24, mtime);
        fb.push_slot::<i64>(26, m.dev.0, 0);
        fb.push_slot::<i64>(28, m.dev.1, 0);
        fb.push_slot_always::<WIPOffset<_>>(30, xs);
        ms.push(fb.end_table(s));
    }
    let ms = fb.create_vector(&ms);
    let s = fb.start_table();
    fb.push_slot_always::<WIPOffset<_>>(4, ms);
    let toc = fb.end_table(s);
    let cp = fb.create_vector(&zinfo[..]);
    let ds: Vec<_> = digests.iter().map(|d| fb.create_string(d)).collect();
    let ds = fb.create_vector(&ds);
    let s = fb.start_table();
    fb.push_slot::<i32>(6, cps.len() as i32 - 1, 0);
    fb.push_slot_always::<WIPOffset<_>>(8, ds);
    fb.push_slot_always::<WIPOffset<_>>(10, cp);
    fb.push_slot::<i8>(4, 1, 0); // Gzip, written as soci does when set
    let ci = fb.end_table(s);
    let s = fb.start_table();
    fb.push_slot_always::<WIPOffset<_>>(4, version);
    fb.push_slot_always::<WIPOffset<_>>(6, tool);
    fb.push_slot_always::<WIPOffset<_>>(12, toc);
    fb.push_slot::<i64>(8, blob.len() as i64, 0);
    fb.push_slot::<i64>(10, inflate_all(blob, Compression::Gzip).len() as i64, 0);
    fb.push_slot_always::<WIPOffset<_>>(14, ci);
    let root = fb.end_table(s);
    fb.finish_minimal(root);
    fb.finished_data().to_vec()
}

/// Test layers: the busybox fixture's first layer and a generated one with
/// a binary xattr value (what trips a verifying flatbuffer reader).
fn layers_under_test() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let oci = fixtures(&[]);
    match layers(&oci, "busybox") {
        Some(ls) => out.push(("busybox".to_string(), std::fs::read(&ls[0].path).unwrap())),
        None => {
            unavailable("fixture image busybox");
        }
    }
    let mut w = common::tarw::TarW::default();
    w.add(&common::tarw::H::dir("./"));
    let cap = vec![
        1u8, 0, 0, 2, 0, 4, 0, 0, 0xff, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let mut f = common::tarw::H::file("bin/ping", &vec![7u8; 300_000]);
    f.xattrs = vec![
        ("security.capability".into(), cap),
        ("user.note".into(), b"hi".to_vec()),
    ];
    f.mtime = (1_600_000_000, 250_000_000);
    w.add(&f);
    // Text that deflate cannot squeeze into a few huge blocks.
    let mut x = 12345u32;
    let text: Vec<u8> = (0..900_000)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            b"etaoin shrdlu\n"[(x >> 16) as usize % 14]
        })
        .collect();
    w.add(&common::tarw::H::file("usr/share/text", &text));
    w.add(&common::tarw::H::hardlink("bin/ping6", "bin/ping"));
    w.add(&common::tarw::H::symlink("bin/p", "ping"));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    std::io::Write::write_all(&mut gz, &w.finish()).unwrap();
    out.push(("generated".to_string(), gz.finish().unwrap()));
    out
}

#[test]
fn imports_equal_the_layers_own_tree() {
    for (what, blob) in layers_under_test() {
        let full = inflate_all(&blob, Compression::Gzip);
        let own = Index::parse(
            build(&blob, Compression::Gzip, Policy::default())
                .unwrap()
                .index,
        )
        .unwrap();
        // zinfo v1 (no first checkpoint) on one layer is enough.
        let variants: &[bool] = if what == "generated" {
            &[false, true]
        } else {
            &[false]
        };
        for &v1 in variants {
            let z = ztoc(&blob, &metas(&full), v1);
            let imp = soci::import(&z, common::sha256(&blob), [0; 32], common::tree_options())
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let idx = Index::parse(imp.index.clone()).unwrap();
            assert!(idx.span_count() > 2, "{what}: {} spans", idx.span_count());
            compare(&idx, &own, CompareOptions::default())
                .unwrap_or_else(|m| panic!("{what}: {m}"));
            // Every span verifies against soci's digest and inflates from
            // its own checkpoint and window to the full inflate's bytes.
            common::assert_spans(&idx, &blob, &imp.windows, &full);
            // A prefetch list appended by soci is not part of the zTOC.
            let mut with_prefetch = z.clone();
            with_prefetch.extend_from_slice(b"---SOCI-PREFETCH---[{\"path\":\"/bin/sh\"}]");
            let again = soci::import(
                &with_prefetch,
                common::sha256(&blob),
                [0; 32],
                common::tree_options(),
            )
            .unwrap();
            assert_eq!(again.index, imp.index);
        }
    }
}

#[test]
fn hostile_ztocs_are_refused() {
    let (_, blob) = layers_under_test().pop().unwrap();
    let full = inflate_all(&blob, Compression::Gzip);
    let good = metas(&full);
    let imp = |metas: &[Meta], edit: &dyn Fn(&mut Vec<u8>)| {
        let mut z = ztoc(&blob, metas, false);
        edit(&mut z);
        soci::import(&z, [0; 32], [0; 32], common::tree_options())
    };
    let find = |z: &[u8], s: &[u8]| z.windows(s.len()).position(|w| w == s).unwrap();

    let r = imp(&good, &|z| {
        let p = find(z, b"0.9");
        z[p..p + 3].copy_from_slice(b"1.0");
    });
    assert!(matches!(r, Err(Error::Soci(m)) if m.contains("version")));
    let r = imp(&good, &|z| {
        let p = find(z, b"sha256:");
        z[p..p + 7].copy_from_slice(b"sha512:");
    });
    assert!(matches!(r, Err(Error::Soci(m)) if m.contains("not sha256")));
    // A checkpoint count that does not match the zinfo's size; checkpoints
    // going backwards.
    let r = soci::import(
        &ztoc_with(&blob, &good, false, &|z| z[0] += 2),
        [0; 32],
        [0; 32],
        common::tree_options(),
    );
    assert!(matches!(r, Err(Error::Soci(m)) if m.contains("checkpoint count")));
    let per = 17 + WINDOW_SIZE;
    let r = soci::import(
        &ztoc_with(&blob, &good, false, &|z| {
            z[12 + 2 * per..12 + 2 * per + 8].copy_from_slice(&11i64.to_le_bytes())
        }),
        [0; 32],
        [0; 32],
        common::tree_options(),
    );
    assert!(
        matches!(&r, Err(Error::Soci(m)) if m.contains("out of order")),
        "{:?}",
        r.map(|_| ())
    );
    // Names escaping the root, through extraction's rules.
    let mut evil = metas(&full);
    evil[1].name = b"../../etc/passwd".to_vec();
    assert!(matches!(imp(&evil, &|_| {}), Err(Error::Entry { .. })));
    // Data past the end of the layer: the index is refused.
    let mut past = metas(&full);
    let text = past
        .iter()
        .position(|m| m.name == b"usr/share/text")
        .unwrap();
    past[text].offset = 1 << 40;
    assert!(matches!(imp(&past, &|_| {}), Err(Error::Soci(m)) if m.contains("data past the end")));
    // Sparse files are not described by zTOCs: not importable.
    let mut sparse = metas(&full);
    sparse[1]
        .pax
        .push((b"GNU.sparse.major".to_vec(), b"1".to_vec()));
    assert!(matches!(imp(&sparse, &|_| {}), Err(Error::Unsupported(_))));
    // Not a flatbuffer at all.
    assert!(soci::import(&[0xff; 64], [0; 32], [0; 32], common::tree_options()).is_err());
    assert!(soci::import(&[], [0; 32], [0; 32], common::tree_options()).is_err());
}

#[test]
fn mutated_ztocs_never_panic() {
    use rand::{Rng, SeedableRng};
    let (_, blob) = layers_under_test().pop().unwrap();
    let full = inflate_all(&blob, Compression::Gzip);
    let z = ztoc(&blob, &metas(&full), false);
    // The metadata and headers, not the 32 KiB windows, are where a
    // mutation can matter: aim most of them there.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..600 {
        let mut m = z.clone();
        for _ in 0..rng.gen_range(1..4) {
            let i = if rng.gen_ratio(3, 4) {
                rng.gen_range(z.len().saturating_sub(4096)..z.len())
            } else {
                rng.gen_range(0..z.len())
            };
            m[i] = rng.gen();
        }
        if rng.gen_ratio(1, 10) {
            m.truncate(rng.gen_range(0..m.len()));
        }
        match soci::import(&m, [0; 32], [0; 32], common::tree_options()) {
            Ok(imp) => {
                // What the fuzz entry point does with an import.
                cstore_index::fuzz::index_parse(&imp.index);
                ok += 1
            }
            Err(_) => refused += 1,
        }
    }
    assert!(ok > 50 && refused > 50, "{ok} imported, {refused} refused");
}
