//! Sequential streams over a ring owned by the stream itself: the thread
//! that writes (or reads) submits its own I/O and reaps its own completions,
//! with no handoff to another thread per chunk.
//!
//! - [`SeqWriter`] keeps up to `depth` writes of about `io_size` in flight at
//!   increasing offsets while the caller goes on (hashing, receiving), and
//!   takes owned buffers ([`bytes::Bytes`]) without copying them.
//! - [`SeqReader`] keeps `depth` reads of `io_size` in flight ahead of the
//!   consumer (readahead), so the disk works while the caller decompresses or
//!   hashes; with O_DIRECT into aligned buffers when the policy says so.
//!
//! Both run on io_uring, or on the plain-syscall stand-in (`Mode::Sync`, or
//! when io_uring is refused, logged once by the ring), with the same results.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use bytes::Bytes;

use crate::buf::{AlignedBuf, Buf};
use crate::policy::Policy;
use crate::ring::{Backend, Done, Mode, Op, Ring};

/// Alignment of O_DIRECT buffers, offsets and lengths: the largest logical
/// block size in use, so it suits 512-byte and 4 KiB devices alike.
const DIRECT_ALIGN: usize = 4096;
/// Most iovecs in one writev (the kernel's UIO_MAXIOV is 1024).
const MAX_IOVECS: usize = 256;
/// O_DIRECT read buffers this large are in huge pages where the kernel
/// allows (`AlignedBuf::huge`): the requests reach the device whole instead
/// of split at the queue's segment limit. Smaller ones are not worth 2 MiB of
/// memory each.
const HUGE_BUF_FROM: usize = 1 << 20;
/// Owned chunks smaller than this are copied into the current buffer rather
/// than given an iovec of their own.
const SMALL_CHUNK: usize = 4096;

/// How one sequential stream is driven, from the device's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamConfig {
    /// Bytes per read or write request.
    pub io_size: usize,
    /// Requests in flight per stream. Memory held is about depth × io_size.
    pub depth: usize,
    /// Read with O_DIRECT (writes stay buffered: the store's blobs are read
    /// back soon, by unpack or by other tools).
    pub direct: bool,
    /// With `direct`: read a file through the page cache when (nearly) all
    /// of it is there already (the policy's `reuse_cached`).
    pub reuse_cached: bool,
    pub mode: Mode,
    /// Unpack writes the small files of compressed layers in io_uring
    /// batches (the policy's choice for the store's filesystem).
    pub batch_small_files: bool,
    /// Blob streams at once (layers unpacked in parallel), the policy's
    /// `streams`; None: one per core.
    pub max_streams: Option<usize>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            io_size: 512 << 10,
            depth: 4,
            direct: false,
            reuse_cached: false,
            mode: Mode::Auto,
            batch_small_files: false,
            max_streams: None,
        }
    }
}

impl StreamConfig {
    /// The policy's stream request size and depth (see `Policy`), and its
    /// O_DIRECT choice. Capped at 8 MiB in flight per stream, so memory stays
    /// bounded with several blobs streaming at once.
    pub fn from_policy(p: &Policy, mode: Mode) -> StreamConfig {
        let io_size = match p.stream_io_size {
            0 => 512 << 10,
            n => (n as usize).clamp(64 << 10, 4 << 20),
        };
        let depth = match p.stream_depth {
            0 => 4,
            n => (n as usize).clamp(1, ((8 << 20) / io_size).max(1)),
        };
        StreamConfig {
            io_size,
            depth,
            direct: p.direct,
            reuse_cached: p.direct && p.reuse_cached,
            mode,
            batch_small_files: p.batch_small_files && mode != Mode::Sync,
            max_streams: Some((p.streams as usize).max(1)),
        }
    }
}

/// Recreate an error to report it again (io::Error is not Clone).
fn again(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Sequential writes through the stream's own ring. Errors of writes in
/// flight surface on a later call (`write`, `flush`, `sync_all`,
/// `into_file`); after one, every call fails with it.
pub struct SeqWriter {
    ring: Ring,
    file: File,
    fd: RawFd,
    cfg: StreamConfig,
    /// Offset of the next request.
    offset: u64,
    /// Bytes gathered for the next request.
    pending: Vec<Buf>,
    pending_len: usize,
    error: Option<io::Error>,
    done: Vec<Done>,
}

impl SeqWriter {
    /// Write `file` from `offset` on.
    pub fn new(file: File, offset: u64, cfg: &StreamConfig) -> SeqWriter {
        let depth = cfg.depth.max(1);
        SeqWriter {
            // One spare entry for the fsync behind a full window.
            ring: Ring::portable(depth as u32 + 1, cfg.mode),
            fd: file.as_raw_fd(),
            file,
            cfg: StreamConfig {
                depth,
                io_size: cfg.io_size.max(DIRECT_ALIGN),
                ..cfg.clone()
            },
            offset,
            pending: Vec::new(),
            pending_len: 0,
            error: None,
            done: Vec::new(),
        }
    }

    pub fn backend(&self) -> Backend {
        self.ring.backend()
    }

    /// Where the next byte goes: the start offset plus every byte taken.
    pub fn position(&self) -> u64 {
        self.offset + self.pending_len as u64
    }

    pub fn get_ref(&self) -> &File {
        &self.file
    }

    /// Take an owned buffer without copying it (small ones are gathered).
    pub fn write_bytes(&mut self, b: Bytes) -> io::Result<()> {
        self.check()?;
        if b.len() < SMALL_CHUNK {
            return self.write_all(&b);
        }
        self.pending_len += b.len();
        self.pending.push(Buf::Shared(b));
        if self.pending_len >= self.cfg.io_size || self.pending.len() >= MAX_IOVECS {
            self.send()?;
        }
        Ok(())
    }

    /// Write out everything and continue at `offset` (e.g. 0 after the file
    /// was truncated).
    pub fn seek_to(&mut self, offset: u64) -> io::Result<()> {
        self.flush()?;
        self.offset = offset;
        Ok(())
    }

    /// Everything written and durable (fsync, or fdatasync with `datasync`),
    /// the sync going through the ring like the writes.
    pub fn sync(&mut self, datasync: bool) -> io::Result<()> {
        self.flush()?;
        let op = Op::Fsync {
            fd: self.fd,
            datasync,
        };
        self.push(op)?;
        self.wait_all()?;
        self.check()
    }

    pub fn sync_all(&mut self) -> io::Result<()> {
        self.sync(false)
    }

    /// Everything written; the file back.
    pub fn into_file(mut self) -> io::Result<File> {
        self.flush()?;
        // Nothing is in flight; Drop has nothing left to do.
        let file = self.file.try_clone()?;
        Ok(file)
    }

    fn check(&self) -> io::Result<()> {
        match &self.error {
            Some(e) => Err(again(e)),
            None => Ok(()),
        }
    }

    /// Start a request for what is pending.
    fn send(&mut self) -> io::Result<()> {
        if self.pending_len == 0 {
            return Ok(());
        }
        let mut bufs = std::mem::take(&mut self.pending);
        let offset = self.offset;
        self.offset += self.pending_len as u64;
        self.pending_len = 0;
        let op = if bufs.len() == 1 {
            Op::Write {
                fd: self.fd,
                buf: bufs.pop().unwrap(),
                offset,
            }
        } else {
            Op::Writev {
                fd: self.fd,
                bufs,
                offset,
            }
        };
        self.push(op)
    }

    /// Queue `op`, first waiting for room in the window, and start it.
    fn push(&mut self, mut op: Op) -> io::Result<()> {
        let window = if matches!(op, Op::Fsync { .. }) {
            self.ring.capacity()
        } else {
            self.cfg.depth
        };
        loop {
            while self.ring.in_flight() >= window {
                self.reap_one()?;
            }
            match self.ring.push(op, 0, false) {
                Ok(()) => break,
                Err(back) => {
                    op = back;
                    self.reap_one()?;
                }
            }
        }
        self.ring.submit(0)?;
        self.collect()
    }

    /// Wait for a completion and handle what finished.
    fn reap_one(&mut self) -> io::Result<()> {
        wait_one(&mut self.ring, &mut self.done)?;
        self.handle_done();
        Ok(())
    }

    /// Handle what has finished, without waiting.
    fn collect(&mut self) -> io::Result<()> {
        self.ring.reap(&mut self.done);
        self.handle_done();
        Ok(())
    }

    fn handle_done(&mut self) {
        // The Vec goes back afterwards, so its allocation is reused.
        let mut done = std::mem::take(&mut self.done);
        for d in done.drain(..) {
            self.finished(d);
        }
        self.done = done;
    }

    fn finished(&mut self, d: Done) {
        let (fd, bufs, offset) = match d.op {
            Op::Write { fd, buf, offset } => (fd, vec![buf], offset),
            Op::Writev { fd, bufs, offset } => (fd, bufs, offset),
            _ => {
                if let Err(e) = d.result {
                    self.error.get_or_insert(e);
                }
                return;
            }
        };
        let total: usize = bufs.iter().map(Buf::len).sum();
        match d.result {
            Err(e) => {
                self.error.get_or_insert(e);
            }
            Ok(0) if total > 0 => {
                self.error.get_or_insert(io::ErrorKind::WriteZero.into());
            }
            Ok(n) if (n as usize) < total => {
                // Short write (e.g. the disk filled up mid-request): the rest
                // goes again, and if the disk is full that one says so.
                let rest = skip(bufs, n as usize);
                let op = Op::Writev {
                    fd,
                    bufs: rest,
                    offset: offset + n as u64,
                };
                // A slot was just freed by this completion.
                if let Err(op) = self.ring.push(op, 0, false) {
                    drop(op);
                    self.error
                        .get_or_insert(io::Error::other("blockio: no ring slot for a short write"));
                } else if let Err(e) = self.ring.submit(0) {
                    self.error.get_or_insert(e);
                }
            }
            Ok(_) => {}
        }
    }

    fn wait_all(&mut self) -> io::Result<()> {
        while self.ring.in_flight() > 0 {
            self.reap_one()?;
        }
        Ok(())
    }
}

/// Move finished ops into `done`, waiting for one if none has finished
/// (reaping first: what a submit already collected needs no trip to the kernel).
fn wait_one(ring: &mut Ring, done: &mut Vec<Done>) -> io::Result<()> {
    ring.reap(done);
    if done.is_empty() && ring.in_flight() > 0 {
        ring.submit(1)?;
        ring.reap(done);
    }
    Ok(())
}

/// The buffers after the first `n` bytes.
fn skip(bufs: Vec<Buf>, mut n: usize) -> Vec<Buf> {
    let mut rest = Vec::with_capacity(bufs.len());
    for b in bufs {
        if n >= b.len() {
            n -= b.len();
            continue;
        }
        rest.push(match b {
            _ if n == 0 => b,
            Buf::Heap(mut v) => {
                v.drain(..n);
                Buf::Heap(v)
            }
            Buf::Shared(s) => Buf::Shared(s.slice(n..)),
            b @ Buf::Aligned(_) => Buf::Heap(b.as_slice()[n..].to_vec()),
        });
        n = 0;
    }
    rest
}

impl Write for SeqWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.check()?;
        let room = self.cfg.io_size - self.pending_len.min(self.cfg.io_size);
        let take = data.len().min(room.max(1));
        match self.pending.last_mut() {
            Some(Buf::Heap(v)) if v.capacity() - v.len() >= take => {
                v.extend_from_slice(&data[..take])
            }
            _ => {
                // Room for what follows, but a small write between owned
                // chunks gets no whole request's worth.
                let mut v = Vec::with_capacity(take.max(room.min(64 << 10)));
                v.extend_from_slice(&data[..take]);
                self.pending.push(Buf::Heap(v));
            }
        }
        self.pending_len += take;
        if self.pending_len >= self.cfg.io_size || self.pending.len() >= MAX_IOVECS {
            self.send()?;
        }
        Ok(take)
    }

    /// Every byte taken is written (not yet durable): a process killed after
    /// this leaves them all in the file, with no hole before the last.
    fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        self.send()?;
        self.wait_all()?;
        self.check()
    }
}

impl Drop for SeqWriter {
    fn drop(&mut self) {
        // As BufWriter: what was taken is written, errors are dropped. The
        // ring must not go away with the kernel still using the buffers.
        if self.error.is_none() {
            let _ = self.send();
        }
        let _ = self.wait_all();
    }
}

/// Whether all but at most 1/16 of the file at `path` is in the page cache
/// (cachestat(2), Linux 6.5). False where that cannot be told: the caller then
/// reads from the device, as it would without asking.
fn mostly_cached(path: &Path) -> bool {
    // The kernel's layouts (uapi/linux/mman.h); only the kernel reads some fields.
    #[allow(dead_code)]
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[allow(dead_code)]
    #[repr(C)]
    #[derive(Default)]
    struct Cachestat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // The same number on every architecture (the unified syscall table).
    const SYS_CACHESTAT: libc::c_long = 451;
    let Ok(f) = File::open(path) else {
        return false;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return false;
    };
    // SAFETY: sysconf has no memory effects.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    };
    let range = Range { off: 0, len: 0 };
    let mut cs = Cachestat::default();
    // SAFETY: both structs are the kernel's layout, live for the call.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const Range,
            &mut cs as *mut Cachestat,
            0u32,
        )
    };
    let pages = len.div_ceil(page);
    r == 0 && pages > 0 && cs.nr_cache >= pages - pages / 16
}

/// One read in flight (or done, waiting for the consumer).
struct Chunk {
    offset: u64,
    /// Bytes wanted (less than the buffer at the end of the file).
    want: usize,
    result: Option<io::Result<u32>>,
    buf: Option<Buf>,
}

/// Sequential reads with readahead through the stream's own ring. Also a
/// `BufRead` that lends the completed buffers themselves (no copy).
pub struct SeqReader {
    ring: Ring,
    file: File,
    fd: RawFd,
    cfg: StreamConfig,
    direct: bool,
    /// End of the file when opened (u64::MAX: unknown, read until 0).
    end: u64,
    /// Offset of the next read to issue.
    next: u64,
    chunks: VecDeque<Chunk>,
    /// The buffer being consumed: (buffer, position, length).
    cur: Option<(Buf, usize, usize)>,
    spare: Vec<Buf>,
    eof: bool,
    error: Option<io::Error>,
    done: Vec<Done>,
}

impl SeqReader {
    /// Open `path` for reading, with O_DIRECT if `cfg.direct` and the
    /// filesystem allows it (some refuse it with EINVAL: then buffered),
    /// unless `cfg.reuse_cached` and the page cache holds the file.
    pub fn open(path: &Path, cfg: &StreamConfig) -> io::Result<SeqReader> {
        if cfg.direct && !(cfg.reuse_cached && mostly_cached(path)) {
            match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
            {
                Ok(f) => return Self::with_file(f, 0, true, cfg),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        Self::with_file(File::open(path)?, 0, false, cfg)
    }

    /// Read an open (buffered) file from `offset` on.
    pub fn new(file: File, offset: u64, cfg: &StreamConfig) -> io::Result<SeqReader> {
        Self::with_file(file, offset, false, cfg)
    }

    fn with_file(
        mut file: File,
        offset: u64,
        direct: bool,
        cfg: &StreamConfig,
    ) -> io::Result<SeqReader> {
        let meta = file.metadata()?;
        let end = if meta.is_file() {
            meta.len()
        } else if meta.file_type().is_block_device() {
            file.seek(SeekFrom::End(0))?
        } else {
            u64::MAX
        };
        let depth = cfg.depth.max(1);
        // No buffer larger than the file needs (a config blob is not worth
        // a megabyte, let alone a huge page).
        let whole = (end - offset.min(end))
            .checked_next_multiple_of(DIRECT_ALIGN as u64)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(usize::MAX);
        let mut io_size = cfg.io_size.min(whole).max(DIRECT_ALIGN);
        if direct {
            io_size = io_size.next_multiple_of(DIRECT_ALIGN);
        }
        Ok(SeqReader {
            ring: Ring::portable(depth as u32, cfg.mode),
            fd: file.as_raw_fd(),
            file,
            cfg: StreamConfig {
                depth,
                io_size,
                ..cfg.clone()
            },
            direct,
            end,
            next: offset,
            chunks: VecDeque::new(),
            cur: None,
            spare: Vec::new(),
            eof: false,
            error: None,
            done: Vec::new(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.ring.backend()
    }

    /// Whether the reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn get_ref(&self) -> &File {
        &self.file
    }

    fn new_buf(&mut self) -> Buf {
        if let Some(b) = self.spare.pop() {
            return b;
        }
        if self.direct && self.cfg.io_size >= HUGE_BUF_FROM {
            Buf::Aligned(AlignedBuf::huge(self.cfg.io_size))
        } else if self.direct {
            Buf::Aligned(AlignedBuf::new(self.cfg.io_size, DIRECT_ALIGN))
        } else {
            Buf::Heap(vec![0; self.cfg.io_size])
        }
    }

    /// Issue reads until `depth` are outstanding or the end is reached.
    fn fill(&mut self) {
        while !self.eof && self.error.is_none() && self.chunks.len() < self.cfg.depth {
            if self.next >= self.end {
                break;
            }
            let want = (self.end - self.next).min(self.cfg.io_size as u64) as usize;
            let buf = self.new_buf();
            let offset = self.next;
            self.issue(offset, want, buf);
            self.next += want as u64;
        }
        if let Err(e) = self.ring.submit(0) {
            self.error.get_or_insert(e);
        }
    }

    fn issue(&mut self, offset: u64, want: usize, buf: Buf) {
        let op = Op::Read {
            fd: self.fd,
            buf,
            offset,
        };
        match self.ring.push(op, offset, false) {
            Ok(()) => self.chunks.push_back(Chunk {
                offset,
                want,
                result: None,
                buf: None,
            }),
            Err(_) => {
                self.error
                    .get_or_insert(io::Error::other("blockio: read ring full"));
            }
        }
    }

    /// Wait until the oldest read is done; take its buffer as the current one.
    fn advance(&mut self) -> io::Result<()> {
        loop {
            if let Some(e) = &self.error {
                return Err(again(e));
            }
            if self.eof {
                return Ok(());
            }
            self.fill();
            let Some(head) = self.chunks.front() else {
                self.eof = true;
                return Ok(());
            };
            if head.result.is_none() {
                wait_one(&mut self.ring, &mut self.done)?;
                for d in self.done.drain(..) {
                    let c = self
                        .chunks
                        .iter_mut()
                        .find(|c| c.offset == d.user_data && c.result.is_none())
                        .expect("a completion for an issued read");
                    c.result = Some(d.result);
                    c.buf = Some(match d.op {
                        Op::Read { buf, .. } => buf,
                        _ => unreachable!("only reads are issued"),
                    });
                }
                continue;
            }
            let c = self.chunks.pop_front().unwrap();
            let buf = c.buf.expect("buffer of a finished read");
            match c.result.unwrap() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    self.reissue_front(c.offset, c.want, buf);
                }
                Err(e) => {
                    self.error = Some(again(&e));
                    return Err(e);
                }
                Ok(0) => {
                    // The file ended early (shrunk, or of unknown size).
                    self.spare.push(buf);
                    self.end_here();
                    return Ok(());
                }
                Ok(n) => {
                    // The buffer may be longer than wanted (the last block,
                    // an O_DIRECT length): bytes past `want` belong to the
                    // next read, whatever the file has become since.
                    let n = (n as usize).min(c.want);
                    if n < c.want {
                        // A short read before the end: the rest again, first.
                        let at = c.offset + n as u64;
                        if self.direct && !at.is_multiple_of(DIRECT_ALIGN as u64) {
                            // O_DIRECT stops short only at the end of the file.
                            self.end_here();
                        } else {
                            let b = self.new_buf();
                            self.reissue_front(at, c.want - n, b);
                        }
                    }
                    self.cur = Some((buf, 0, n));
                    return Ok(());
                }
            }
        }
    }

    /// Issue a read of `want` bytes at `offset` ahead of every other.
    fn reissue_front(&mut self, offset: u64, want: usize, buf: Buf) {
        let before = self.chunks.len();
        self.issue(offset, want, buf);
        if self.chunks.len() > before {
            let c = self.chunks.pop_back().unwrap();
            self.chunks.push_front(c);
        }
    }

    /// No more reads: drop those in flight once they finish.
    fn end_here(&mut self) {
        self.eof = true;
        self.drain();
        self.chunks.clear();
    }

    fn drain(&mut self) {
        while self.ring.in_flight() > 0 {
            if wait_one(&mut self.ring, &mut self.done).is_err() {
                break;
            }
            self.done.clear();
        }
    }
}

impl BufRead for SeqReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.cur.as_ref().is_none_or(|(_, pos, len)| pos >= len) {
            if let Some((buf, _, _)) = self.cur.take() {
                self.spare.push(buf);
            }
            self.advance()?;
        }
        Ok(match &self.cur {
            Some((buf, pos, len)) => &buf.as_slice()[*pos..*len],
            None => &[],
        })
    }

    fn consume(&mut self, amt: usize) {
        if let Some((_, pos, len)) = &mut self.cur {
            *pos = (*pos + amt).min(*len);
        }
    }
}

impl Read for SeqReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let src = self.fill_buf()?;
        let n = src.len().min(out.len());
        out[..n].copy_from_slice(&src[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl Drop for SeqReader {
    fn drop(&mut self) {
        // The kernel may still be filling buffers the ring holds.
        self.drain();
    }
}
