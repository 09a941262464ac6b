//! Windows for `index push`: trimmed and zstd-compressed.
//!
//! A span rarely needs its whole 32 KiB window (the spike measured 65–69% on
//! text) and never one on a run of stored blocks (incompressible data). For
//! each span, the shortest suffix of its window (in 1 KiB steps) with which
//! it still inflates to the same bytes is kept; zlib refuses a distance
//! beyond the dictionary it was given, and the output is compared anyway.
//! The kept suffix is one zstd frame; its sha256 (of the raw suffix)
//! replaces the window's in the span record.

use std::ops::Range;

use crate::access::SpanReader;
use crate::error::{Error, Result};
use crate::format::{flags, Compression, Index, HEADER_LEN, SPAN_LEN};

const STEP: usize = 1024;

/// A rewritten index and windows blob.
#[derive(Debug, Clone)]
pub struct Compacted {
    pub index: Vec<u8>,
    pub windows: Vec<u8>,
    /// Windows blob bytes before and after.
    pub before: u64,
    pub after: u64,
    /// Spans whose window was dropped (they need none).
    pub dropped: usize,
}

/// Trim and compress every window. `compressed(i, range)` returns span `i`'s
/// compressed bytes (from the local blob or the registry); each is verified
/// against the index before use.
pub fn compact_windows<B: AsRef<[u8]>>(
    index: &Index<B>,
    windows: &[u8],
    mut compressed: impl FnMut(usize, Range<u64>) -> Result<Vec<u8>>,
    level: i32,
) -> Result<Compacted> {
    let h = index.header();
    let mut bytes = index.as_bytes().to_vec();
    let mut out = Vec::new();
    let mut dropped = 0;
    let mut reader = SpanReader::new();
    if h.compression == Compression::Gzip {
        for i in 0..index.span_count() {
            let s = index.span(i);
            let rec =
                HEADER_LEN + index.entry_count() as usize * crate::format::ENTRY_LEN + i * SPAN_LEN;
            let mut keep: Vec<u8> = Vec::new();
            if let Some(wr) = s.window() {
                let stored = windows
                    .get(wr.start as usize..wr.end as usize)
                    .ok_or_else(|| Error::Span {
                        span: i,
                        reason: "window past the end of the windows blob".into(),
                    })?;
                let c = compressed(i, s.compressed.clone())?;
                let full = reader.read_span(index, i, &c, stored)?;
                let raw = reader.window(index, i, stored)?;
                let mut buf = vec![0u8; full.len()];
                let mut works = |len: usize, reader: &mut SpanReader| {
                    reader
                        .gunzip(
                            &c,
                            s.bits,
                            s.member_start(),
                            &raw[raw.len() - len..],
                            &mut buf,
                            true,
                        )
                        .is_ok()
                        && buf == full
                };
                let len = if works(0, &mut reader) {
                    0
                } else {
                    // The shortest suffix, in steps, that still works: more
                    // history never hurts, so a binary search finds it.
                    let steps = raw.len().div_ceil(STEP);
                    let (mut lo, mut hi) = (0usize, steps);
                    while hi - lo > 1 {
                        let mid = (lo + hi) / 2;
                        if works((mid * STEP).min(raw.len()), &mut reader) {
                            hi = mid;
                        } else {
                            lo = mid;
                        }
                    }
                    (hi * STEP).min(raw.len())
                };
                if len == 0 {
                    dropped += 1;
                } else {
                    keep = raw[raw.len() - len..].to_vec();
                }
            }
            let r = &mut bytes[rec..rec + SPAN_LEN];
            r[56..64].copy_from_slice(&(out.len() as u64).to_le_bytes());
            if keep.is_empty() {
                r[52..56].copy_from_slice(&0u32.to_le_bytes());
                r[64..96].copy_from_slice(&[0; 32]);
            } else {
                let z = zstd::bulk::compress(&keep, level)?;
                r[52..56].copy_from_slice(&(z.len() as u32).to_le_bytes());
                r[64..96].copy_from_slice(&crate::sha256(&keep));
                out.extend_from_slice(&z);
            }
        }
    }
    let fl = h.flags
        | if h.compression == Compression::Gzip {
            flags::WINDOWS_ZSTD
        } else {
            0
        };
    bytes[14..16].copy_from_slice(&fl.to_le_bytes());
    bytes[112..120].copy_from_slice(&(out.len() as u64).to_le_bytes());
    Index::parse(&bytes[..])?;
    Ok(Compacted {
        index: bytes,
        before: h.windows_size,
        after: out.len() as u64,
        windows: out,
        dropped,
    })
}
