//! Entry points for the fuzz harness (`cstore-fuzz`): each takes arbitrary
//! bytes, must never panic, and allocates in proportion to its input (or
//! within the caps of the format).

use crate::format::Index;

/// Parse `data` as an index and, if it is accepted, touch everything a
/// reader can reach: every entry, name, link, xattr and sparse map, every
/// directory's children and lookups, every span and chunk, span searches.
pub fn index_parse(data: &[u8]) {
    let Ok(idx) = Index::parse(data) else {
        return;
    };
    walk(&idx);
}

pub(crate) fn walk<B: AsRef<[u8]>>(idx: &Index<B>) {
    let n = idx.entry_count();
    for i in 0..n {
        let e = idx.entry(i);
        let _ = (idx.name(i), idx.parent(i), idx.nlink(i), idx.path(i));
        let _ = (e.data_offset(), e.hardlink_target(), e.rdev());
        let _ = idx.link_target(i);
        if let Some(m) = idx.sparse_map(i) {
            m.for_each(drop);
        }
        idx.xattrs(i).for_each(drop);
        for &c in idx.children(i) {
            assert_eq!(idx.lookup(i, idx.name(c)), Some(c));
        }
    }
    let h = *idx.header();
    for i in 0..idx.span_count() {
        let s = idx.span(i);
        let _ = (s.window(), idx.chunks_in_span(i));
        let r = idx.spans_for(s.uncompressed.start, s.uncompressed.end);
        assert!(r.end <= idx.span_count());
    }
    for j in 0..idx.chunk_count() {
        let c = idx.chunk(j);
        let _ = idx.chunk_range(&c);
    }
    let _ = idx.spans_for(0, h.uncompressed_size);
    let _ = idx.span_at(h.uncompressed_size / 2);
}

/// Treat `data` as an eStargz TOC (JSON) of a 1 MiB blob and import it; an
/// accepted import is walked like `index_parse`.
pub fn estargz_toc(data: &[u8]) {
    use crate::estargz::{import, Footer, Toc};
    let footer = Footer::Gzip {
        toc_offset: 1 << 20,
        footer_len: 51,
    };
    let toc = Toc {
        json: data.to_vec(),
        sha256: crate::sha256(data),
        tar_entry: None,
    };
    if let Ok(imp) = import(
        &footer,
        &toc,
        [0; 32],
        [0; 32],
        (1 << 20) + 4096,
        Default::default(),
    ) {
        let idx = Index::parse(&imp.index[..]).expect("an import is a valid index");
        walk(&idx);
    }
}

/// Treat `data` as the end of an eStargz blob: find a footer in its last
/// bytes, and read a TOC from the range it names.
pub fn estargz_blob(data: &[u8]) {
    use crate::estargz::{parse_footer, read_toc, FOOTER_FETCH};
    let n = data.len() as u64;
    let tail = &data[(n.saturating_sub(FOOTER_FETCH)) as usize..];
    if let Ok(f) = parse_footer(tail, n) {
        let r = f.toc_range(n);
        if let Some(b) = data.get(r.start as usize..r.end as usize) {
            let _ = read_toc(&f, b, None);
        }
    }
}

/// Treat `data` as a SOCI zTOC and import it; an accepted import is walked
/// like `index_parse`.
pub fn soci_ztoc(data: &[u8]) {
    if let Ok(imp) = crate::soci::import(data, [0; 32], [0; 32], Default::default()) {
        let idx = Index::parse(&imp.index[..]).expect("an import is a valid index");
        walk(&idx);
    }
}
