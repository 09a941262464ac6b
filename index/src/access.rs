//! Random access: turn one fetched span into its uncompressed bytes.
//!
//! Nothing is used before it is verified: the span's compressed bytes
//! against its sha256 (or, for an eStargz import, each chunk's uncompressed
//! bytes against its chunkDigest), the window against its sha256. Output is
//! bounded by the span's declared uncompressed length (at most 64 MiB), so a
//! span that inflates to more is an error, not a bomb.

use std::ops::Range;

use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer};

use crate::error::{Error, Result};
use crate::format::{flags, Compression, Index, Source, WINDOW_SIZE};
use crate::zlib::{self, Inflater};

/// Where a span's window comes from.
enum History<'a> {
    /// The bytes at `span(i).window()` of the windows blob (checked).
    Stored(&'a [u8]),
    /// The end of the previous span's verified output.
    Derived(&'a [u8]),
}

/// Reusable decoders for reading spans (one per reader thread).
pub struct SpanReader {
    z: Inflater,
    d: DCtx<'static>,
}

impl Default for SpanReader {
    fn default() -> Self {
        Self::new()
    }
}

fn hex(h: &[u8]) -> String {
    hex::encode(h)
}

impl SpanReader {
    pub fn new() -> Self {
        SpanReader {
            z: Inflater::new(zlib::RAW),
            d: DCtx::create(),
        }
    }

    /// Span `i`'s window from the bytes at `span(i).window()` in the windows
    /// blob, decompressed and verified (empty if it needs none).
    pub fn window<B: AsRef<[u8]>>(
        &mut self,
        index: &Index<B>,
        i: usize,
        stored: &[u8],
    ) -> Result<Vec<u8>> {
        let s = index.span(i);
        if s.window_len == 0 {
            return Ok(Vec::new());
        }
        if stored.len() != s.window_len as usize {
            return Err(Error::Span {
                span: i,
                reason: format!(
                    "window is {} bytes, the index says {}",
                    stored.len(),
                    s.window_len
                ),
            });
        }
        let raw = if index.header().has(flags::WINDOWS_ZSTD) {
            let mut out = vec![0u8; WINDOW_SIZE];
            let n = self
                .zstd_bounded(stored, &mut out, true)
                .map_err(|reason| Error::Span {
                    span: i,
                    reason: format!("window: {reason}"),
                })?;
            out.truncate(n);
            out
        } else {
            stored.to_vec()
        };
        let got = crate::sha256(&raw);
        if got != s.window_sha256 {
            return Err(Error::Digest {
                span: i,
                what: "window",
                expected: hex(&s.window_sha256),
                actual: hex(&got),
            });
        }
        Ok(raw)
    }

    /// Verify span `i`'s compressed bytes (`span(i).compressed`) and window
    /// (the bytes at `span(i).window()`, empty if none), and inflate it.
    /// Returns exactly `span(i).uncompressed` bytes.
    pub fn read_span<B: AsRef<[u8]>>(
        &mut self,
        index: &Index<B>,
        i: usize,
        compressed: &[u8],
        window: &[u8],
    ) -> Result<Vec<u8>> {
        self.read_span_from(index, i, compressed, History::Stored(window))
    }

    /// Whether span `i`'s window can be taken from span `i - 1`'s output
    /// instead of the windows blob: the index was built here (spans end
    /// exactly where the next begins in the uncompressed stream) and the
    /// span needs a window. The caller keeps the last [`WINDOW_SIZE`] bytes
    /// of span `i - 1`'s verified output ([`Self::read_span_after`]).
    pub fn history_usable<B: AsRef<[u8]>>(index: &Index<B>, i: usize) -> bool {
        let h = index.header();
        i > 0
            && h.compression == Compression::Gzip
            && h.source == Source::Built
            && !h.has(flags::PAYLOAD_OFFSETS)
            && index.span(i).window().is_some()
            && index.span(i - 1).uncompressed.end == index.span(i).uncompressed.start
    }

    /// Like [`Self::read_span`], with the window taken from `history`: the
    /// last [`WINDOW_SIZE`] bytes of span `i - 1`'s output, verified when
    /// that span was read, so they need no digest of their own (a dictionary
    /// longer than the stored, trimmed window inflates the same bytes).
    /// Only where [`Self::history_usable`] says so.
    pub fn read_span_after<B: AsRef<[u8]>>(
        &mut self,
        index: &Index<B>,
        i: usize,
        compressed: &[u8],
        history: &[u8],
    ) -> Result<Vec<u8>> {
        if !Self::history_usable(index, i) || history.len() != WINDOW_SIZE {
            return Err(Error::Span {
                span: i,
                reason: "the previous span's output cannot serve as its window".into(),
            });
        }
        self.read_span_from(index, i, compressed, History::Derived(history))
    }

    fn read_span_from<B: AsRef<[u8]>>(
        &mut self,
        index: &Index<B>,
        i: usize,
        compressed: &[u8],
        history: History<'_>,
    ) -> Result<Vec<u8>> {
        let s = index.span(i);
        let want = (s.compressed.end - s.compressed.start) as usize;
        if compressed.len() != want {
            return Err(Error::Span {
                span: i,
                reason: format!(
                    "{} compressed bytes, the index says {want}",
                    compressed.len()
                ),
            });
        }
        if s.has_digest() {
            let got = crate::sha256(compressed);
            if got != s.sha256 {
                return Err(Error::Digest {
                    span: i,
                    what: "compressed span",
                    expected: hex(&s.sha256),
                    actual: hex(&got),
                });
            }
        }
        let out_len = (s.uncompressed.end - s.uncompressed.start) as usize;
        let mut out = vec![0u8; out_len];
        if out_len == 0 {
            return Ok(out);
        }
        let window = match history {
            History::Stored(w) => self.window(index, i, w)?,
            History::Derived(w) => w.to_vec(),
        };
        let h = index.header();
        // Spans we built end exactly where the next begins; check that too.
        // Imports may end spans at an archive size short of the stream's.
        let exact = h.source == Source::Built && !h.has(flags::PAYLOAD_OFFSETS);
        let fail = |reason: String| Error::Span { span: i, reason };
        match h.compression {
            Compression::None => out.copy_from_slice(compressed),
            Compression::Zstd => {
                let n = self
                    .zstd_bounded(compressed, &mut out, exact)
                    .map_err(fail)?;
                if n < out_len {
                    return Err(fail(format!(
                        "inflates to {n} bytes, the index says {out_len}"
                    )));
                }
            }
            Compression::Gzip => {
                let (bits, member) = (s.bits, s.member_start());
                self.gunzip(compressed, bits, member, &window, &mut out, exact)
                    .map_err(fail)?;
            }
        }
        if h.has(flags::CHUNK_DIGESTS) {
            for j in index.chunks_in_span(i) {
                let c = index.chunk(j);
                let r = index.chunk_range(&c);
                let bytes = &out[(r.start - s.uncompressed.start) as usize
                    ..(r.end - s.uncompressed.start) as usize];
                let got = crate::sha256(bytes);
                if got != c.sha256 {
                    return Err(Error::Digest {
                        span: i,
                        what: "chunk",
                        expected: hex(&c.sha256),
                        actual: hex(&got),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Decode zstd frames into `out`, at most `out.len()` bytes; returns
    /// how many. With `exact`, the input must then be used up at the end of
    /// a frame, without more output. A frame cut short is an error.
    fn zstd_bounded(
        &mut self,
        input: &[u8],
        out: &mut [u8],
        exact: bool,
    ) -> std::result::Result<usize, String> {
        let name = |c| format!("zstd: {}", zstd::zstd_safe::get_error_name(c));
        self.d
            .reset(zstd::zstd_safe::ResetDirective::SessionOnly)
            .map_err(name)?;
        let mut inb = InBuffer::around(input);
        let mut filled = 0;
        let mut scratch = [0u8; 1];
        // Whether the last call that did anything ended a frame.
        let mut at_frame_end = true;
        loop {
            if filled == out.len() && !exact {
                return Ok(filled);
            }
            let before = inb.pos();
            let target: &mut [u8] = if filled < out.len() {
                &mut out[filled..]
            } else {
                &mut scratch
            };
            let mut outb = OutBuffer::around(target);
            let hint = self
                .d
                .decompress_stream(&mut outb, &mut inb)
                .map_err(name)?;
            let produced = outb.pos();
            if filled == out.len() && produced > 0 {
                return Err(format!(
                    "inflates to more than the {} bytes the index says",
                    out.len()
                ));
            }
            filled += produced;
            if produced > 0 || inb.pos() > before {
                at_frame_end = hint == 0;
            } else {
                // Nothing more comes out of what is left.
                if !at_frame_end {
                    return Err("zstd frame cut short".into());
                }
                if inb.pos() < input.len() {
                    return Err("zstd: no progress".into());
                }
                return Ok(filled);
            }
        }
    }

    /// Inflate from a checkpoint: in gzip mode from a member start, else raw
    /// with the bit offset primed and the window as dictionary; across
    /// member ends (trailer skipped, the next header parsed and checked).
    pub(crate) fn gunzip(
        &mut self,
        compressed: &[u8],
        bits: u8,
        member_start: bool,
        window: &[u8],
        out: &mut [u8],
        exact: bool,
    ) -> std::result::Result<(), String> {
        let z = &mut self.z;
        let mut input = compressed;
        let mut raw = !member_start;
        if member_start {
            z.reset(zlib::GZIP);
        } else {
            z.reset(zlib::RAW);
            if bits > 0 {
                let ret = z.prime(bits, input[0]);
                if ret != zlib::Z_OK {
                    return Err(format!("inflatePrime: {}", z.message(ret)));
                }
                input = &input[1..];
            }
            if !window.is_empty() {
                let ret = z.set_dictionary(window);
                if ret != zlib::Z_OK {
                    return Err(format!("inflateSetDictionary: {}", z.message(ret)));
                }
            }
        }
        let mut filled = 0;
        let mut scratch = [0u8; 1];
        loop {
            let target: &mut [u8] = if filled < out.len() {
                &mut out[filled..]
            } else if exact {
                // Done: what is left must not inflate to anything.
                &mut scratch
            } else {
                return Ok(());
            };
            let step = z.inflate(input, target, zlib::Z_NO_FLUSH);
            input = &input[step.consumed..];
            if filled < out.len() {
                filled += step.produced;
            } else if step.produced > 0 {
                return Err(format!(
                    "inflates to more than the {} bytes the index says",
                    out.len()
                ));
            }
            match step.ret {
                zlib::Z_OK => {}
                zlib::Z_BUF_ERROR => {
                    if input.is_empty() {
                        break;
                    }
                    if step.consumed == 0 && step.produced == 0 {
                        return Err("inflate made no progress".into());
                    }
                }
                zlib::Z_STREAM_END => {
                    // End of a member's deflate data. In raw mode its trailer
                    // is still to skip; in gzip mode zlib checked it.
                    if raw {
                        if input.len() < 8 {
                            return Err("gzip trailer cut short".into());
                        }
                        input = &input[8..];
                    }
                    if input.is_empty() {
                        break;
                    }
                    z.reset(zlib::GZIP);
                    raw = false;
                }
                r => return Err(format!("inflate: {}", z.message(r))),
            }
            if input.is_empty() && step.produced == 0 {
                break;
            }
        }
        if filled < out.len() {
            return Err(format!(
                "inflates to {filled} bytes, the index says {}",
                out.len()
            ));
        }
        Ok(())
    }

    /// Uncompressed bytes `[start, end)` of a layer whose blob and windows
    /// blob are at hand (a local blob, tests), through the spans that hold
    /// them.
    pub fn read_range<'b, B: AsRef<[u8]>>(
        &mut self,
        index: &Index<B>,
        blob: &'b [u8],
        windows: &'b [u8],
        range: Range<u64>,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity((range.end.saturating_sub(range.start)) as usize);
        for i in index.spans_for(range.start, range.end) {
            let s = index.span(i);
            if s.uncompressed.is_empty() {
                continue;
            }
            let get = |b: &'b [u8], r: Range<u64>, what: &str| {
                blob_slice(b, r.clone()).ok_or_else(|| Error::Span {
                    span: i,
                    reason: format!("{what} range {r:?} is past the end of its blob"),
                })
            };
            let c = get(blob, s.compressed.clone(), "compressed")?;
            let w = match s.window() {
                Some(r) => get(windows, r, "window")?,
                None => &[][..],
            };
            let bytes = self.read_span(index, i, c, w)?;
            let a = range.start.max(s.uncompressed.start) - s.uncompressed.start;
            let b = range.end.min(s.uncompressed.end) - s.uncompressed.start;
            out.extend_from_slice(&bytes[a as usize..b as usize]);
        }
        Ok(out)
    }
}

fn blob_slice(b: &[u8], r: Range<u64>) -> Option<&[u8]> {
    let (s, e) = (usize::try_from(r.start).ok()?, usize::try_from(r.end).ok()?);
    b.get(s..e)
}
