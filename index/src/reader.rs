//! Recording checkpoints in the unpack pass.
//!
//! [`IndexingReader`] is a `Read` of the uncompressed layer stream over the
//! compressed one: it sits where the unpack pipeline's decompressor sits
//! (flate2's `MultiGzDecoder`, zstd's `Decoder`, or nothing) and records, as
//! the bytes go by:
//! - gzip: a checkpoint at the first deflate block boundary (or gzip member
//!   start) once `span_target` compressed bytes or `max_span_out`
//!   uncompressed bytes have passed since the last one, with its bit offset
//!   and the ≤ 32 KiB window (`inflate(Z_BLOCK)`, `data_type`,
//!   `inflateGetDictionary`, as zlib's zran.c does, but without a ring of our
//!   own: zlib keeps the window). Multi-member blobs are fine; member starts
//!   need no window.
//! - zstd: frame starts (`ZSTD_decompressStream` returns 0 exactly at a
//!   frame's end); a frame cannot be entered in the middle.
//! - no compression: a span every `span_target` bytes.
//!
//! and the sha256 of each span's compressed bytes. Windows go to a `Write`
//! (the windows blob) as they are taken, raw. The layer stream is the
//! decompressor's whatever happens to the index: an index that cannot be
//! made (a single zstd frame, a block too large, a write error on the
//! windows) is reported by [`IndexingReader::finish`], never as a read
//! error, so the unpack goes on.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};
use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer};

use crate::encode::{EntryRec, IndexBuilder, SpanRec};
use crate::error::{Error, NotSeekable, Result};
use crate::format::{span_flags, Compression, Source, MAX_SPAN_IN, MAX_SPAN_OUT, WINDOW_SIZE};
use crate::zlib::{self, Inflater};

/// Where checkpoints go.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Compressed bytes per span (docs/lazy.md: 128 KiB matched stargz's
    /// bytes fetched on the bench workloads).
    pub span_target: u32,
    /// Uncompressed bytes after which a span ends at the next boundary
    /// anyway, bounding the work of one read miss (a deflate block can
    /// overshoot it; validation caps spans at 64 MiB).
    pub max_span_out: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            span_target: 128 << 10,
            max_span_out: 8 << 20,
        }
    }
}

/// What the pass recorded: the span table and sizes of an index.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    pub compression: Compression,
    pub spans: Vec<SpanRec>,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// Bytes written to the windows sink (raw windows).
    pub windows_size: u64,
    pub span_target: u32,
}

impl Checkpoints {
    /// An index of these spans and `entries` (from `TreeBuilder::finish`).
    pub fn into_builder(
        self,
        entries: Vec<EntryRec>,
        layer_digest: [u8; 32],
        diff_id: [u8; 32],
    ) -> IndexBuilder {
        IndexBuilder {
            compression: self.compression,
            source: Source::Built,
            layer_digest,
            diff_id,
            compressed_size: self.compressed_size,
            uncompressed_size: self.uncompressed_size,
            span_target: self.span_target,
            flags: 0,
            windows_size: self.windows_size,
            entries,
            spans: self.spans,
            chunks: Vec::new(),
        }
    }
}

/// The compressed input: a buffer over the inner reader that knows the blob
/// offset of every byte.
struct Input<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    /// Blob offset of `buf[0]`.
    base: u64,
    /// The last byte of the previous buffer (a checkpoint's shared byte may
    /// be there).
    last_byte: u8,
}

impl<R: Read> Input<R> {
    fn consumed(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..self.len]
    }

    /// The byte just before the next one to consume.
    fn prev_byte(&self) -> u8 {
        if self.pos > 0 {
            self.buf[self.pos - 1]
        } else {
            self.last_byte
        }
    }

    /// Read more once everything buffered is consumed; false at EOF.
    fn refill(&mut self) -> io::Result<bool> {
        debug_assert_eq!(self.pos, self.len);
        if self.len > 0 {
            self.last_byte = self.buf[self.len - 1];
        }
        self.base += self.len as u64;
        self.pos = 0;
        self.len = 0;
        let n = loop {
            match self.inner.read(&mut self.buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        self.len = n;
        Ok(n > 0)
    }
}

/// The span table being recorded.
struct Recorder<W> {
    compression: Compression,
    policy: Policy,
    spans: Vec<SpanRec>,
    hasher: Sha256,
    /// Blob offset up to which consumed bytes went into `hasher`.
    hashed: u64,
    windows: W,
    windows_size: u64,
    /// Why there will be no index (recording stops; the stream goes on).
    failed: Option<Error>,
}

impl<W: Write> Recorder<W> {
    fn active(&self) -> bool {
        self.failed.is_none()
    }

    fn fail(&mut self, e: Error) {
        if self.failed.is_none() {
            self.failed = Some(e);
        }
    }

    /// Hash the consumed bytes not hashed yet (before the buffer is reused).
    fn hash_to<R: Read>(&mut self, input: &Input<R>) {
        if !self.active() {
            return;
        }
        let upto = input.consumed();
        if upto > self.hashed {
            let from = (self.hashed - input.base) as usize;
            self.hasher.update(&input.buf[from..input.pos]);
            self.hashed = upto;
        }
    }

    fn last(&self) -> &SpanRec {
        self.spans.last().expect("span 0 is recorded at the start")
    }

    fn due(&self, cin: u64, out: u64) -> bool {
        let l = self.last();
        cin - l.cin >= self.policy.span_target as u64 || out - l.out >= self.policy.max_span_out
    }

    /// Stop recording if the span being recorded grew past what a span may
    /// hold (`cin`, `out`: where it would end). True if it did.
    fn check_size(&mut self, cin: u64, out: u64) -> bool {
        if !self.active() {
            return false;
        }
        let l = self.last();
        if out - l.out <= MAX_SPAN_OUT && cin - (l.cin - u64::from(l.bits > 0)) <= MAX_SPAN_IN {
            return false;
        }
        let offset = l.cin;
        let limit = MAX_SPAN_OUT;
        self.fail(Error::NotSeekable(match self.compression {
            Compression::Zstd => NotSeekable::ZstdFrameTooLarge { offset, limit },
            _ => NotSeekable::DeflateBlockTooLarge { offset, limit },
        }));
        true
    }

    /// End the current span at `cin` (all of which is consumed and hashed)
    /// and start one there.
    fn checkpoint<R: Read>(
        &mut self,
        input: &Input<R>,
        out: u64,
        bits: u8,
        flags: u8,
        window: &[u8],
    ) {
        let cin = input.consumed();
        self.hash_to(input);
        if self.check_size(cin, out) {
            return;
        }
        let sha = std::mem::take(&mut self.hasher).finalize();
        self.spans.last_mut().unwrap().sha256 = sha.into();
        if bits > 0 {
            // The byte holding the block's first bits ends one span and
            // starts the next.
            self.hasher.update([input.prev_byte()]);
        }
        let mut span = SpanRec {
            cin,
            out,
            bits,
            flags,
            window_off: self.windows_size,
            ..Default::default()
        };
        if !window.is_empty() {
            if let Err(e) = self.windows.write_all(window) {
                return self.fail(Error::Io(e));
            }
            span.window_len = window.len() as u32;
            span.window_sha256 = crate::sha256(window);
            self.windows_size += window.len() as u64;
        }
        self.spans.push(span);
    }
}

enum Codec {
    Gzip {
        z: Inflater,
        /// The next block boundary zlib reports is the end of a gzip
        /// header, not a block: no checkpoint there.
        header_pending: bool,
        window: Box<[u8; WINDOW_SIZE]>,
    },
    Zstd {
        d: DCtx<'static>,
        /// The next input byte starts a frame.
        at_frame_start: bool,
        frame_out: u64,
        data_frames: u64,
    },
    None,
}

/// A `Read` of the uncompressed stream that records an index's spans.
pub struct IndexingReader<R, W> {
    input: Input<R>,
    rec: Recorder<W>,
    codec: Codec,
    compression: Compression,
    total_out: u64,
    done: bool,
}

impl<R: Read, W: Write> IndexingReader<R, W> {
    /// Read the compressed layer from `inner`; raw windows are written to
    /// `windows` as they are taken (nothing for zstd or no compression).
    pub fn new(inner: R, compression: Compression, policy: Policy, windows: W) -> Self {
        let policy = Policy {
            span_target: policy.span_target.max(1),
            max_span_out: policy.max_span_out.clamp(1, MAX_SPAN_OUT),
        };
        let codec = match compression {
            Compression::Gzip => Codec::Gzip {
                z: Inflater::new(zlib::GZIP),
                header_pending: true,
                window: Box::new([0; WINDOW_SIZE]),
            },
            Compression::Zstd => Codec::Zstd {
                d: DCtx::create(),
                at_frame_start: true,
                frame_out: 0,
                data_frames: 0,
            },
            Compression::None => Codec::None,
        };
        let flags = if compression == Compression::Gzip {
            span_flags::MEMBER_START
        } else {
            0
        };
        IndexingReader {
            input: Input {
                inner,
                buf: vec![0; 128 << 10],
                pos: 0,
                len: 0,
                base: 0,
                last_byte: 0,
            },
            rec: Recorder {
                compression,
                policy,
                spans: vec![SpanRec {
                    flags,
                    ..Default::default()
                }],
                hasher: Sha256::new(),
                hashed: 0,
                windows,
                windows_size: 0,
                failed: None,
            },
            codec,
            compression,
            total_out: 0,
            done: false,
        }
    }

    /// The spans, once the stream has been read to its end; or why there is
    /// no index for this layer.
    pub fn finish(mut self) -> Result<(Checkpoints, W)> {
        if !self.done {
            return Err(Error::Stream(
                "the index was finished before the end of the layer stream".into(),
            ));
        }
        let (csize, usize_) = (self.input.consumed(), self.total_out);
        if let Codec::Zstd { data_frames, .. } = self.codec {
            if data_frames <= 1 && csize > self.rec.policy.span_target as u64 {
                self.rec
                    .fail(Error::NotSeekable(NotSeekable::SingleZstdFrame {
                        compressed: csize,
                    }));
            }
        }
        self.rec.check_size(csize, usize_);
        if let Some(e) = self.rec.failed.take() {
            return Err(e);
        }
        self.rec.hash_to(&self.input);
        let sha = std::mem::take(&mut self.rec.hasher).finalize();
        self.rec.spans.last_mut().unwrap().sha256 = sha.into();
        Ok((
            Checkpoints {
                compression: self.compression,
                spans: self.rec.spans,
                compressed_size: csize,
                uncompressed_size: usize_,
                windows_size: self.rec.windows_size,
                span_target: self.rec.policy.span_target,
            },
            self.rec.windows,
        ))
    }

    fn check_size(&mut self) {
        let (cin, out) = (self.input.consumed(), self.total_out);
        self.rec.check_size(cin, out);
    }

    fn read_gzip(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.done {
                return Ok(0);
            }
            if self.input.pos == self.input.len {
                self.rec.hash_to(&self.input);
                if !self.input.refill()? {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "gzip stream truncated",
                    ));
                }
            }
            let Codec::Gzip {
                z,
                header_pending,
                window,
            } = &mut self.codec
            else {
                unreachable!()
            };
            let step = z.inflate(self.input.avail(), out, zlib::Z_BLOCK);
            self.input.pos += step.consumed;
            self.total_out += step.produced as u64;
            match step.ret {
                zlib::Z_OK => {}
                zlib::Z_BUF_ERROR if step.consumed > 0 || step.produced > 0 => {}
                zlib::Z_STREAM_END => {
                    // A member ended (its trailer checked): another may follow.
                    if self.input.pos == self.input.len {
                        self.rec.hash_to(&self.input);
                        if !self.input.refill()? {
                            self.done = true;
                            return Ok(step.produced);
                        }
                    }
                    z.reset(zlib::GZIP);
                    *header_pending = true;
                    let (cin, out_at) = (self.input.consumed(), self.total_out);
                    if self.rec.active() && self.rec.due(cin, out_at) {
                        self.rec
                            .checkpoint(&self.input, out_at, 0, span_flags::MEMBER_START, &[]);
                    }
                    if step.produced > 0 {
                        return Ok(step.produced);
                    }
                    continue;
                }
                r => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("gzip: {}", z.message(r)),
                    ))
                }
            }
            // At the end of a gzip header or of a non-last deflate block.
            if step.data_type & 0xc0 == 0x80 {
                if *header_pending {
                    *header_pending = false;
                } else if self.rec.active() {
                    let (cin, out_at) = (self.input.consumed(), self.total_out);
                    if out_at > self.rec.last().out && self.rec.due(cin, out_at) {
                        // zlib never holds more than 7 bits at a boundary.
                        let bits = (step.data_type & 7) as u8;
                        let w = z.dictionary(window);
                        self.rec.checkpoint(&self.input, out_at, bits, 0, w);
                    }
                }
            }
            self.check_size();
            if step.produced > 0 {
                return Ok(step.produced);
            }
        }
    }

    fn read_zstd(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.done {
                return Ok(0);
            }
            let Codec::Zstd { at_frame_start, .. } = &self.codec else {
                unreachable!()
            };
            if self.input.pos == self.input.len {
                self.rec.hash_to(&self.input);
                if !self.input.refill()? {
                    if *at_frame_start {
                        self.done = true;
                        return Ok(0);
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "zstd frame truncated",
                    ));
                }
            }
            let Codec::Zstd {
                d,
                at_frame_start,
                frame_out,
                data_frames,
            } = &mut self.codec
            else {
                unreachable!()
            };
            if *at_frame_start {
                *at_frame_start = false;
                *frame_out = self.total_out;
                let (cin, out_at) = (self.input.consumed(), self.total_out);
                if cin > 0 && self.rec.active() && self.rec.due(cin, out_at) {
                    self.rec.checkpoint(&self.input, out_at, 0, 0, &[]);
                }
            }
            let avail = &self.input.buf[self.input.pos..self.input.len];
            let mut inb = InBuffer::around(avail);
            let mut outb = OutBuffer::around(&mut *out);
            let hint = d.decompress_stream(&mut outb, &mut inb).map_err(|c| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("zstd: {}", zstd::zstd_safe::get_error_name(c)),
                )
            })?;
            let (used, produced) = (inb.pos(), outb.pos());
            self.input.pos += used;
            self.total_out += produced as u64;
            if hint == 0 {
                // The frame is decoded and flushed: the next byte starts one.
                *at_frame_start = true;
                if self.total_out > *frame_out {
                    *data_frames += 1;
                }
            }
            self.check_size();
            if produced > 0 {
                return Ok(produced);
            }
            if used == 0 && hint != 0 && self.input.pos < self.input.len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "zstd: no progress",
                ));
            }
        }
    }

    fn read_plain(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let target = self.rec.policy.span_target as u64;
        let pos = self.total_out;
        if pos > 0 && pos.is_multiple_of(target) && self.rec.active() && self.rec.last().out < pos {
            // A span starts at the first byte past each target multiple (so
            // none starts at the end).
            self.rec.checkpoint(&self.input, pos, 0, 0, &[]);
        }
        let room = target - pos % target;
        let want = out.len().min(room.min(usize::MAX as u64) as usize);
        let n = loop {
            match self.input.inner.read(&mut out[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            self.done = true;
            return Ok(0);
        }
        if self.rec.active() {
            self.rec.hasher.update(&out[..n]);
        }
        // The plain path reads straight into `out`: keep the input's
        // offsets in step (nothing is buffered).
        self.input.base += n as u64;
        self.rec.hashed = self.input.base;
        self.total_out += n as u64;
        Ok(n)
    }
}

impl<R: Read, W: Write> Read for IndexingReader<R, W> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        match self.codec {
            Codec::Gzip { .. } => self.read_gzip(out),
            Codec::Zstd { .. } => self.read_zstd(out),
            Codec::None => self.read_plain(out),
        }
    }
}
