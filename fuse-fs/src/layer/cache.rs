//! A lazy layer's span cache and fetcher.
//!
//! On disk, in the layer's cache directory:
//! - `blob`: a sparse copy of the compressed blob; each fetched span's bytes at their
//!   offsets (completion hashes it whole);
//! - `spans`: one bit per span, set only after the span's bytes are in `blob` and in
//!   the tree files and both were fdatasynced; the bitmap is fdatasynced too, so a
//!   restarted daemon trusts what it says and fetches nothing it has;
//! - `trace`: the spans read on demand, in first-read order (u32 little-endian), for
//!   prefetch on later mounts of the same layer;
//! - `complete`: present once completion verified and finished the tree.
//!
//! In memory each span is missing, queued (with a priority), in flight, inflated,
//! local or failed. Readers queue what they need and wait on a condition variable;
//! fetcher threads take the most urgent queued span and the queued spans right after
//! it as urgent (coalesced into one source request, up to `max_request` bytes), so
//! each span is fetched once however many readers wait. A span a reader waits for
//! is inflated once verified (its compressed bytes written to the blob copy): its
//! output is held in memory and its readers are answered from there while the
//! writer thread puts it in the tree files (creating a tree file is the slow part
//! of a miss: journal handles, the parent directory's lock). A span is local once written (background
//! completion's spans are written by their fetcher directly); it is set in the
//! bitmap once synced, and a failed sync makes it missing again. Background completion yields to reads (see
//! [`Activity`]). A span that fails (source error, digest mismatch, write error)
//! fails its waiters with EIO and is fetched again by the next reader that needs it;
//! nothing of a span that fails verification is written.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cstore_index::format::WINDOW_SIZE as WINDOW;
use cstore_index::{Index, Kind, SpanReader, TreeOptions};

use super::source::SpanSource;
use super::tree;
use crate::error::{Error, Result};

const BLOB: &str = "blob";
const BITMAP: &str = "spans";
const TRACE: &str = "trace";
pub(crate) const COMPLETE: &str = "complete";

/// Uncompressed bytes at the head of a file whose spans an open queues.
const OPEN_AHEAD: u64 = 128 << 10;

/// Inflated span output a layer holds for its readers before the writer has put
/// it in the tree; past this fetchers write what they fetch themselves.
const MAX_INFLATED: usize = 64 << 20;

/// Tree files kept open at once (reads and span writes); past this the table is
/// emptied (open files stay valid in their users' hands).
const MAX_OPEN_FILES: usize = 1024;

/// Who wants a span: on-demand misses first, then spans from a recorded trace, then
/// look-ahead (the rest of a missed file and the files after it in its directory,
/// and the head of a file being opened), then background completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    OnDemand = 0,
    Trace = 1,
    LookAhead = 2,
    Background = 3,
}

/// Read misses and background requests of the layers one daemon serves: a
/// container starting on lazy layers is waiting on its misses, and background
/// completion (every span of every layer, in order) would otherwise take the link
/// and the CPU from them, in every layer at once.
#[derive(Debug, Default)]
pub struct Activity {
    /// Read misses being waited for now.
    misses: AtomicUsize,
    /// When the last miss ended.
    last_miss: Mutex<Option<Instant>>,
    /// Background requests in flight.
    background: AtomicUsize,
    /// Layers being mounted now ([`Activity::mounting`]).
    mounting: AtomicUsize,
}

impl Activity {
    fn miss_begin(&self) {
        self.misses.fetch_add(1, Ordering::SeqCst);
    }

    fn miss_end(&self) {
        *lock(&self.last_miss) = Some(Instant::now());
        self.misses.fetch_sub(1, Ordering::SeqCst);
    }

    /// The daemon is mounting layers: background work waits until it is done
    /// (and quiet after), as it waits for misses. A container cannot start
    /// before every layer of its image is mounted, and a mount's own writes
    /// and syncs wait behind background write-back on a disk (on the
    /// seek-modelled HDD the last layer of the bench image was mounted two
    /// minutes late, behind the first layer's completion).
    pub fn mounting(&self) -> MountingGuard<'_> {
        self.mounting.fetch_add(1, Ordering::SeqCst);
        MountingGuard(self)
    }

    /// How long background work must still wait for reads to go quiet (zero: go).
    fn quiet_for(&self, quiet: Duration) -> Duration {
        if self.misses.load(Ordering::SeqCst) > 0 || self.mounting.load(Ordering::SeqCst) > 0 {
            return quiet;
        }
        match *lock(&self.last_miss) {
            Some(t) => quiet.saturating_sub(t.elapsed()),
            None => Duration::ZERO,
        }
    }

    /// Takes a background slot if fewer than `max` are in flight.
    fn background_begin(&self, max: usize) -> bool {
        self.background
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max.max(1)).then_some(n + 1)
            })
            .is_ok()
    }

    fn background_end(&self) {
        self.background.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a lazy layer is served.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// Fetcher threads (source requests in flight at once). With two or more, the
    /// first takes only on-demand misses, so a miss never queues behind prefetch,
    /// look-ahead or background work.
    pub fetchers: usize,
    /// Largest coalesced request for reads and prefetch, in compressed bytes (a
    /// single span may exceed it).
    pub max_request: u64,
    /// Compressed bytes a read miss queues ahead of itself ([`Priority::LookAhead`]):
    /// the rest of the file (a shared library faulted in page by page, a file
    /// read from start to end), as far as this from the miss (0: none).
    pub look_ahead: u64,
    /// Look-ahead also takes the spans after the file that hold files of its
    /// directory (tar order is directory order). Off by default: on the
    /// bench's python start it fetched 7–9 MB more than the rest-of-file
    /// look-ahead for no shorter start (docs/lazy.md).
    pub look_ahead_siblings: bool,
    /// Largest coalesced look-ahead request: a reader that needs a span of one
    /// waits for the whole request to arrive.
    pub look_ahead_request: u64,
    /// Largest coalesced background-completion request: small, so that a miss
    /// arriving while it is on the wire waits little for the link.
    pub background_request: u64,
    /// Background completion starts a request only once no read has missed for
    /// this long, in any layer sharing `activity`...
    pub background_quiet: Duration,
    /// ...and not before this long after the layer was opened (a container
    /// starting on it has not read yet: the daemon sets it).
    pub background_delay: Duration,
    /// Background requests in flight at once, over the layers sharing `activity`.
    pub background_inflight: usize,
    /// Shared by the layers one daemon serves (see [`Activity`]).
    pub activity: Arc<Activity>,
    /// Extraction's settings, for the tree completion rebuilds and compares.
    pub tree: TreeOptions,
}

impl Default for LayerOptions {
    fn default() -> Self {
        // The extracting process's owner and umask, as extraction uses them.
        // SAFETY: plain getters; umask is set back at once.
        let (owner, umask) = unsafe {
            let m = libc::umask(0o022);
            libc::umask(m);
            ((libc::geteuid(), libc::getegid()), m)
        };
        LayerOptions {
            fetchers: 4,
            max_request: 4 << 20,
            look_ahead: 1 << 20,
            look_ahead_siblings: false,
            look_ahead_request: 512 << 10,
            background_request: 1 << 20,
            background_quiet: Duration::from_millis(500),
            background_delay: Duration::ZERO,
            background_inflight: 2,
            activity: Arc::new(Activity::default()),
            tree: TreeOptions {
                umask,
                owner,
                ..TreeOptions::default()
            },
        }
    }
}

/// Counters of a layer's cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Requests made to the source for blob bytes (each a coalesced run of spans).
    pub requests: u64,
    /// Spans fetched (a span fetched twice counts twice).
    pub spans_fetched: u64,
    /// Compressed bytes fetched.
    pub bytes_fetched: u64,
    /// Spans that failed (source error, digest mismatch, write error).
    pub failures: u64,
    /// Spans local now, of `spans`.
    pub local: u64,
    /// Of those, the spans marked in the bitmap on disk (readers are answered
    /// before the mark: a daemon killed in between fetches them again).
    pub durable: u64,
    /// Spans verified and answering their readers from memory, not local yet
    /// (the writer thread puts them in the tree).
    pub inflated: u64,
    pub spans: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SpanState {
    Missing,
    Queued(Priority),
    InFlight,
    /// Verified and in the blob copy; its output is in [`State::inflated`]
    /// for readers, not yet written to the tree.
    Inflated,
    Local,
    Failed(Arc<str>),
}

impl SpanState {
    /// Whether a reader can be answered: a reader takes an inflated span's
    /// bytes from memory ([`Layer::read_file`]).
    fn readable(&self) -> bool {
        matches!(self, SpanState::Local | SpanState::Inflated)
    }
}

struct State {
    spans: Vec<SpanState>,
    queue: BTreeSet<(Priority, usize)>,
    bitmap: Vec<u8>,
    /// Spans already in the trace.
    traced: Vec<bool>,
    local: u64,
    /// Spans whose bit is written to the bitmap file.
    durable: u64,
    /// The output of [`SpanState::Inflated`] spans, and its size in bytes.
    inflated: HashMap<usize, Arc<Vec<u8>>>,
    inflated_bytes: usize,
    stopping: bool,
}

impl State {
    /// Span `s` inflated: its output held for its readers.
    fn hold_inflated(&mut self, s: usize, out: Arc<Vec<u8>>) {
        self.spans[s] = SpanState::Inflated;
        self.inflated_bytes += out.len();
        if let Some(old) = self.inflated.insert(s, out) {
            self.inflated_bytes -= old.len();
        }
    }

    /// Span `s`'s output no longer held (written, failed or reset).
    fn drop_inflated(&mut self, s: usize) {
        if let Some(old) = self.inflated.remove(&s) {
            self.inflated_bytes -= old.len();
        }
    }
}

/// What an implicit directory takes from the nearest lower layer that has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Inherited {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits with set-id and sticky.
    pub perm: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A piece of a file's stored data: where it is in the uncompressed stream and in
/// the file.
#[derive(Debug, Clone, Copy)]
struct Piece {
    stream: u64,
    len: u64,
    entry: u32,
    file_off: u64,
}

pub(crate) struct Layer {
    pub(crate) idx: Index<Vec<u8>>,
    /// The layer digest, for messages.
    pub(crate) name: String,
    source: Arc<dyn SpanSource>,
    pub(crate) dir: PathBuf,
    pub(crate) blob: File,
    bitmap_file: Mutex<File>,
    trace_file: Mutex<File>,
    pub(crate) tree: OwnedFd,
    pub(crate) opts: LayerOptions,
    /// Every file's stored data, sorted by stream offset.
    pieces: Vec<Piece>,
    /// Per entry, the spans its data lies in (empty for entries without data).
    file_spans: Vec<Range<u32>>,
    st: Mutex<State>,
    cv: Condvar,
    files: Mutex<HashMap<u32, Arc<File>>>,
    /// Attributes implicit directories take from the lower layers.
    pub(crate) inherited: std::sync::RwLock<HashMap<u32, Inherited>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Inflated spans to write, for the writer thread.
    writes: Mutex<Writes>,
    writes_cv: Condvar,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Spans written and not durable yet, for the persister thread.
    pending: Mutex<Pending>,
    pending_cv: Condvar,
    persister: Mutex<Option<JoinHandle<()>>>,
    complete: AtomicBool,
    requests: AtomicU64,
    spans_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    failures: AtomicU64,
    /// When the layer was opened (background work waits `background_delay` after).
    opened: Instant,
    /// The last 32 KiB of recently inflated spans' output, by span: the next
    /// span's window, so a miss right after its neighbour fetches no window.
    tails: Mutex<Tails>,
}

/// A span verified and inflated (its compressed bytes in the blob copy), its
/// output not in the tree yet.
struct Inflated {
    span: usize,
    out: Arc<Vec<u8>>,
}

/// What the writer thread has to write.
#[derive(Default)]
struct Writes {
    queue: std::collections::VecDeque<Inflated>,
    /// Shutting down: the writer ends once the queue is empty.
    stop: bool,
}

/// What a fetch did with one span.
enum Fetched {
    /// Written to the blob copy and the tree.
    Written,
    /// Verified and inflated, for the writer.
    Inflated(Inflated),
    Failed(String),
}

/// What the fetchers wrote and the persister has not synced yet.
#[derive(Default)]
struct Pending {
    spans: Vec<usize>,
    /// The tree files those spans touched, each once.
    files: Vec<Arc<File>>,
    /// Shutting down: the persister ends once nothing is pending.
    stop: bool,
}

/// A bounded set of span output tails ([`Layer::tails`]), oldest out first.
#[derive(Default)]
struct Tails {
    by_span: HashMap<usize, Arc<Vec<u8>>>,
    order: std::collections::VecDeque<usize>,
}

impl Tails {
    /// At most this many (32 KiB each) per layer.
    const MAX: usize = 64;

    fn put(&mut self, span: usize, tail: Arc<Vec<u8>>) {
        if self.by_span.insert(span, tail).is_none() {
            self.order.push_back(span);
            while self.order.len() > Self::MAX {
                if let Some(old) = self.order.pop_front() {
                    self.by_span.remove(&old);
                }
            }
        }
    }
}

/// Layers being mounted, counted in the daemon's [`Activity`] until dropped.
pub struct MountingGuard<'a>(&'a Activity);

impl Drop for MountingGuard<'_> {
    fn drop(&mut self) {
        // The quiet period starts when the last mount is done.
        *lock(&self.0.last_miss) = Some(Instant::now());
        self.0.mounting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where a request's time went (for the daemon's debug log: the per-miss
/// breakdown in docs/lazy.md comes from it).
#[derive(Debug, Default, Clone, Copy)]
struct Timings {
    /// The source requests (spans and windows side by side), to the last byte.
    net: Duration,
    /// Checking and inflating the spans.
    inflate: Duration,
    /// Writing the blob copy and the tree files (creating them on first touch).
    write: Duration,
    /// Of `write`: opening (on first touch creating) the tree files.
    open: Duration,
}

/// A read miss being waited for, counted in the daemon's [`Activity`].
struct MissGuard<'a>(&'a Activity);

impl<'a> MissGuard<'a> {
    fn new(a: &'a Activity) -> Self {
        a.miss_begin();
        MissGuard(a)
    }
}

/// Logs (debug) how long a reader waited for its spans: against the fetcher's
/// line for the same spans, the time they waited for a fetcher.
struct LogWait<'a> {
    layer: &'a str,
    spans: &'a [usize],
    prio: Priority,
    since: Instant,
}

impl Drop for LogWait<'_> {
    fn drop(&mut self) {
        if self.prio == Priority::OnDemand {
            tracing::debug!(
                "{}: read of spans {:?} waited {:?}",
                self.layer,
                self.spans,
                self.since.elapsed()
            );
        }
    }
}

impl Drop for MissGuard<'_> {
    fn drop(&mut self) {
        self.0.miss_end();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io<'a>(op: &'static str, p: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |e| Error::io(op, p, e)
}

fn open_rw(p: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
}

impl Layer {
    pub(crate) fn open(
        index: Vec<u8>,
        source: Arc<dyn SpanSource>,
        cache_dir: &Path,
        tree_dir: &Path,
        opts: LayerOptions,
    ) -> Result<Arc<Layer>> {
        let idx = Index::parse(index).map_err(|e| Error::Index {
            layer: "(unparsed)".into(),
            source: e,
        })?;
        let name = idx.header().layer_digest_str();
        std::fs::create_dir_all(cache_dir).map_err(|e| Error::io("create", cache_dir, e))?;
        let blob_p = cache_dir.join(BLOB);
        let blob = open_rw(&blob_p).map_err(io("open", &blob_p))?;
        let bitmap_p = cache_dir.join(BITMAP);
        let bitmap_file = open_rw(&bitmap_p).map_err(io("open", &bitmap_p))?;
        let trace_p = cache_dir.join(TRACE);
        let trace_file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&trace_p)
            .map_err(io("open", &trace_p))?;
        let tree = super::open_root(tree_dir).map_err(io("open", tree_dir))?;

        let n = idx.span_count();
        let mut bitmap = vec![0u8; n.div_ceil(8)];
        let got = bitmap_file
            .read_at(&mut bitmap, 0)
            .map_err(io("read", &bitmap_p))?;
        if got < bitmap.len() {
            // A new cache (or one cut short: what is missing was never set).
            bitmap[got..].fill(0);
        }
        let complete = cache_dir.join(COMPLETE).exists();
        let mut spans = Vec::with_capacity(n);
        let mut local = 0;
        for i in 0..n {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                spans.push(SpanState::Local);
                local += 1;
            } else {
                spans.push(SpanState::Missing);
            }
        }
        let (pieces, file_spans) = pieces_of(&idx);
        let layer = Arc::new(Layer {
            name,
            source,
            dir: cache_dir.to_path_buf(),
            blob,
            bitmap_file: Mutex::new(bitmap_file),
            trace_file: Mutex::new(trace_file),
            tree,
            pieces,
            file_spans,
            st: Mutex::new(State {
                spans,
                queue: BTreeSet::new(),
                bitmap,
                traced: vec![false; n],
                local,
                durable: local,
                inflated: HashMap::new(),
                inflated_bytes: 0,
                stopping: false,
            }),
            cv: Condvar::new(),
            files: Mutex::new(HashMap::new()),
            inherited: Default::default(),
            workers: Mutex::new(Vec::new()),
            writes: Mutex::new(Writes::default()),
            writes_cv: Condvar::new(),
            writer: Mutex::new(None),
            pending: Mutex::new(Pending::default()),
            pending_cv: Condvar::new(),
            persister: Mutex::new(None),
            complete: AtomicBool::new(complete),
            requests: AtomicU64::new(0),
            spans_fetched: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            opened: Instant::now(),
            tails: Mutex::new(Tails::default()),
            idx,
            opts,
        });
        let mut workers = lock(&layer.workers);
        for k in 0..layer.opts.fetchers.max(1) {
            let l = layer.clone();
            let h = std::thread::Builder::new()
                .name(format!("lazy-fetch-{k}"))
                .spawn(move || l.fetcher(k))
                .map_err(|e| Error::io("spawn a fetcher", cache_dir, e))?;
            workers.push(h);
        }
        drop(workers);
        let l = layer.clone();
        let h = std::thread::Builder::new()
            .name("lazy-write".into())
            .spawn(move || l.writer())
            .map_err(|e| Error::io("spawn the writer", cache_dir, e))?;
        *lock(&layer.writer) = Some(h);
        let l = layer.clone();
        let h = std::thread::Builder::new()
            .name("lazy-persist".into())
            .spawn(move || l.persister())
            .map_err(|e| Error::io("spawn the persister", cache_dir, e))?;
        *lock(&layer.persister) = Some(h);
        Ok(layer)
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let st = lock(&self.st);
        CacheStats {
            requests: self.requests.load(Ordering::Relaxed),
            spans_fetched: self.spans_fetched.load(Ordering::Relaxed),
            bytes_fetched: self.bytes_fetched.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            local: st.local,
            durable: st.durable,
            inflated: st.inflated.len() as u64,
            spans: st.spans.len() as u64,
        }
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.complete.load(Ordering::SeqCst)
    }

    pub(crate) fn set_complete(&self, v: bool) {
        self.complete.store(v, Ordering::SeqCst);
    }

    pub(crate) fn shutdown(&self) {
        lock(&self.st).stopping = true;
        self.cv.notify_all();
        let me = std::thread::current().id();
        let handles: Vec<_> = lock(&self.workers).drain(..).collect();
        for h in handles {
            // A fetcher holding the last reference drops the layer itself.
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
        // After the fetchers: what they inflated last is written...
        lock(&self.writes).stop = true;
        self.writes_cv.notify_all();
        if let Some(h) = lock(&self.writer).take() {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
        // ...and what was written is made durable too.
        lock(&self.pending).stop = true;
        self.pending_cv.notify_all();
        if let Some(h) = lock(&self.persister).take() {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }

    /// Whether every span of file entry `i`'s data is local.
    pub(crate) fn file_complete(&self, i: u32) -> bool {
        if self.is_complete() {
            return true;
        }
        let r = self.file_spans[i as usize].clone();
        if r.is_empty() {
            return true;
        }
        let st = lock(&self.st);
        (r.start..r.end).all(|s| st.spans[s as usize] == SpanState::Local)
    }

    /// Waits until the spans holding bytes `range` of file entry `i` are local.
    pub(crate) fn ensure_file_range(&self, i: u32, range: Range<u64>) -> Result<()> {
        if self.is_complete() {
            return Ok(());
        }
        let mut need = Vec::new();
        for (_, stream) in self.idx.file_data(i, range) {
            for s in self.idx.spans_for(stream.start, stream.end) {
                if !self.idx.span(s).uncompressed.is_empty() && need.last() != Some(&s) {
                    need.push(s);
                }
            }
        }
        self.trace(&need);
        let last = need.last().copied();
        self.wait_for_then(&need, Priority::OnDemand, || match last {
            Some(last) => self.look_ahead(i, last),
            None => Vec::new(),
        })
    }

    /// Bytes `range` of file entry `i` into `out` (holes are zeros), once
    /// [`Self::ensure_file_range`] returned: spans still inflated come from
    /// memory, the rest from the tree file (a span neither is, failed since:
    /// EIO, and the next read fetches it again).
    pub(crate) fn read_file(&self, i: u32, range: Range<u64>, out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        out.resize((range.end - range.start) as usize, 0);
        let pieces = if self.is_complete() {
            Vec::new()
        } else {
            self.idx.file_data(i, range.clone())
        };
        // Under the lock, each span's bytes: from memory, or written.
        let mut mem: Vec<(usize, Arc<Vec<u8>>)> = Vec::new();
        {
            let st = lock(&self.st);
            for (_, stream) in &pieces {
                for s in self.idx.spans_for(stream.start, stream.end) {
                    match (&st.spans[s], st.inflated.get(&s)) {
                        (SpanState::Inflated, Some(out)) => mem.push((s, out.clone())),
                        (SpanState::Local, _) => {}
                        _ if self.idx.span(s).uncompressed.is_empty() => {}
                        (other, _) => {
                            return Err(io::Error::other(format!(
                                "span {s} is not local ({other:?})"
                            )))
                        }
                    }
                }
            }
        }
        if mem.is_empty() {
            // All of it in the tree: one read (holes read as zeros there).
            return self.tree_file(i)?.read_exact_at(out, range.start);
        }
        let mut tree: Option<Arc<File>> = None;
        for (foff, stream) in pieces {
            let mut pos = stream.start;
            while pos < stream.end {
                let s = self.idx.span_at(pos).ok_or_else(|| {
                    io::Error::other(format!("no span holds stream offset {pos}"))
                })?;
                let u = self.idx.span(s).uncompressed;
                let end = stream.end.min(u.end);
                let at = foff + (pos - stream.start);
                let dst = &mut out[(at - range.start) as usize..][..(end - pos) as usize];
                match mem.iter().find(|m| m.0 == s) {
                    Some((_, bytes)) => dst.copy_from_slice(
                        &bytes[(pos - u.start) as usize..(end - u.start) as usize],
                    ),
                    None => {
                        let f = match &tree {
                            Some(f) => f,
                            None => tree.insert(self.tree_file(i)?),
                        };
                        f.read_exact_at(dst, at)?;
                    }
                }
                pos = end;
            }
        }
        Ok(())
    }

    /// A file being opened: the spans of its head are recorded in the trace (a
    /// file opened in passthrough is read without the daemon seeing it) and,
    /// if not local, queued at once ([`Priority::LookAhead`]): the read that
    /// follows finds them on the way.
    pub(crate) fn open_ahead(&self, i: u32) {
        if self.is_complete() {
            return;
        }
        let size = self.idx.entry(i).size;
        let mut head = Vec::new();
        for (_, stream) in self.idx.file_data(i, 0..size.min(OPEN_AHEAD)) {
            for s in self.idx.spans_for(stream.start, stream.end) {
                if !self.idx.span(s).uncompressed.is_empty() && head.last() != Some(&s) {
                    head.push(s);
                }
            }
        }
        self.trace(&head);
        self.queue_missing(&head, Priority::LookAhead);
    }

    /// After a miss of file entry `i` ending in span `last`: the spans after it
    /// that hold data of `i` (and, with `look_ahead_siblings`, of the files after
    /// it in its directory), up to `look_ahead` compressed bytes.
    fn look_ahead(&self, i: u32, last: usize) -> Vec<usize> {
        let budget = self.opts.look_ahead;
        let mut ahead = Vec::new();
        if budget == 0 {
            return ahead;
        }
        let dir = self.idx.parent(i);
        let mut bytes = 0u64;
        for s in last + 1..self.idx.span_count() {
            let sp = self.idx.span(s);
            bytes += sp.compressed.end.saturating_sub(sp.compressed.start);
            if bytes > budget {
                break;
            }
            // Does the span hold data of `i` or of a sibling?
            let u = sp.uncompressed;
            let mut k = self.pieces.partition_point(|p| p.stream + p.len <= u.start);
            let mut near = false;
            while k < self.pieces.len() && self.pieces[k].stream < u.end {
                let e = self.pieces[k].entry;
                if e == i || (self.opts.look_ahead_siblings && self.idx.parent(e) == dir) {
                    near = true;
                    break;
                }
                k += 1;
            }
            if !near {
                break;
            }
            ahead.push(s);
        }
        ahead
    }

    /// Whether a guess (look-ahead, an open's head) may queue span state `s`:
    /// missing, or queued less urgently (background completion queues every
    /// span of the layer at mount: a guess must raise those, or it never
    /// fetches anything before the layer is quiet). Not a failed span: that
    /// one is retried by its readers, not by guesses.
    fn guessable(s: &SpanState, prio: Priority) -> bool {
        match s {
            SpanState::Missing => true,
            SpanState::Queued(p) => prio < *p,
            _ => false,
        }
    }

    /// Queues those of `spans` that [`Self::guessable`] allows at `prio`.
    fn queue_missing(&self, spans: &[usize], prio: Priority) {
        let mut st = lock(&self.st);
        let mut any = false;
        for &s in spans {
            if Self::guessable(&st.spans[s], prio) {
                Self::enqueue(&mut st, s, prio);
                any = true;
            }
        }
        drop(st);
        if any {
            self.cv.notify_all();
        }
    }

    /// Appends spans read on demand for the first time to the trace.
    fn trace(&self, spans: &[usize]) {
        let mut new = Vec::new();
        {
            let mut st = lock(&self.st);
            for &s in spans {
                if !st.traced[s] {
                    st.traced[s] = true;
                    new.extend_from_slice(&(s as u32).to_le_bytes());
                }
            }
        }
        if !new.is_empty() {
            // Advisory: a trace cut short by a crash only prefetches less.
            if let Err(e) = lock(&self.trace_file).write_all(&new) {
                tracing::warn!("{}: access trace: {e}", self.name);
            }
        }
    }

    /// Queues `spans` at `prio` (raising a queued span's priority) without waiting.
    pub(crate) fn queue(&self, spans: Vec<usize>, prio: Priority) {
        let mut st = lock(&self.st);
        for s in spans {
            if s < st.spans.len() {
                Self::enqueue(&mut st, s, prio);
            }
        }
        drop(st);
        self.cv.notify_all();
    }

    fn enqueue(st: &mut State, s: usize, prio: Priority) {
        match st.spans[s].clone() {
            SpanState::Missing | SpanState::Failed(_) => {
                st.spans[s] = SpanState::Queued(prio);
                st.queue.insert((prio, s));
            }
            SpanState::Queued(p) if prio < p => {
                st.queue.remove(&(p, s));
                st.spans[s] = SpanState::Queued(prio);
                st.queue.insert((prio, s));
            }
            _ => {}
        }
    }

    /// Queues what of `spans` is not local and waits for all of it; the first
    /// failure among them is the error.
    pub(crate) fn wait_for(&self, spans: &[usize], prio: Priority) -> Result<()> {
        self.wait_for_then(spans, prio, Vec::new)
    }

    /// [`Self::wait_for`]; if anything had to be queued, the missing spans
    /// `ahead` names are queued after it ([`Priority::LookAhead`]), under the
    /// same lock: a miss goes in before what it looks ahead to.
    fn wait_for_then(
        &self,
        spans: &[usize],
        prio: Priority,
        ahead: impl FnOnce() -> Vec<usize>,
    ) -> Result<()> {
        // Background completion waits for spans written; readers, for spans
        // they can read (from memory if not written yet).
        let ready = |s: &SpanState| {
            if prio == Priority::Background {
                *s == SpanState::Local
            } else {
                s.readable()
            }
        };
        let mut st = lock(&self.st);
        let mut queued = false;
        for &s in spans {
            if !ready(&st.spans[s]) {
                Self::enqueue(&mut st, s, prio);
                queued = true;
            }
        }
        if !queued {
            return Ok(());
        }
        for s in ahead() {
            if Self::guessable(&st.spans[s], Priority::LookAhead) {
                Self::enqueue(&mut st, s, Priority::LookAhead);
            }
        }
        self.cv.notify_all();
        let _miss = (prio == Priority::OnDemand).then(|| MissGuard::new(&self.opts.activity));
        let _log = LogWait {
            layer: &self.name,
            spans,
            prio,
            since: Instant::now(),
        };
        loop {
            if st.stopping {
                return Err(Error::Layer {
                    layer: self.name.clone(),
                    reason: "the layer is shutting down".into(),
                });
            }
            let mut done = true;
            for &s in spans {
                match &st.spans[s] {
                    s if ready(s) => {}
                    SpanState::Failed(why) => {
                        return Err(Error::Span {
                            layer: self.name.clone(),
                            span: s,
                            reason: why.to_string(),
                        })
                    }
                    _ => done = false,
                }
            }
            if done {
                return Ok(());
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Every span not local, queued for background completion; waits for all.
    pub(crate) fn fetch_all(&self) -> Result<()> {
        let all: Vec<usize> = (0..self.idx.span_count()).collect();
        self.wait_for(&all, Priority::Background)
    }

    fn fetcher(self: Arc<Self>, k: usize) {
        // With two fetchers or more, the first is kept for on-demand misses.
        let reads_only = k == 0 && self.opts.fetchers > 1;
        let activity = self.opts.activity.clone();
        let mut reader = SpanReader::new();
        loop {
            let (batch, prio) = {
                let mut st = lock(&self.st);
                loop {
                    if st.stopping {
                        return;
                    }
                    let Some(&(prio, _)) = st.queue.first() else {
                        st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                        continue;
                    };
                    if prio == Priority::OnDemand {
                        break;
                    }
                    if reads_only {
                        st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                    if prio != Priority::Background {
                        break;
                    }
                    // Background work waits for reads to go quiet in every layer
                    // (misses elsewhere do not wake this layer's condvar: poll).
                    let wait = activity.quiet_for(self.opts.background_quiet).max(
                        self.opts
                            .background_delay
                            .saturating_sub(self.opened.elapsed()),
                    );
                    if wait.is_zero() && activity.background_begin(self.opts.background_inflight) {
                        break;
                    }
                    let wait = if wait.is_zero() {
                        Duration::from_millis(50)
                    } else {
                        wait.min(Duration::from_millis(100))
                    };
                    st = self
                        .cv
                        .wait_timeout(st, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                let (prio, first) = st.queue.pop_first().expect("not empty");
                let max = match prio {
                    Priority::Background => self.opts.background_request,
                    Priority::LookAhead => self.opts.look_ahead_request,
                    _ => self.opts.max_request,
                };
                st.spans[first] = SpanState::InFlight;
                let mut batch = vec![first];
                let start = self.idx.span(first).compressed.start;
                let mut j = first + 1;
                // Only spans at least as urgent join: a miss must not carry the
                // background spans after it.
                while j < st.spans.len() {
                    let SpanState::Queued(p) = st.spans[j] else {
                        break;
                    };
                    if p > prio || self.idx.span(j).compressed.end - start > max {
                        break;
                    }
                    st.queue.remove(&(p, j));
                    st.spans[j] = SpanState::InFlight;
                    batch.push(j);
                    j += 1;
                }
                (batch, prio)
            };
            let background = prio == Priority::Background;
            let t0 = Instant::now();
            let mut written = Vec::new();
            let mut timings = Timings::default();
            // Each span's readers go on as soon as it is verified and inflated
            // (from memory until the writer has put it in the tree), or, for
            // background completion, which no reader waits on, once written.
            // Syncing first cost a reader three fdatasyncs per miss (tens of ms
            // each on a busy disk), writing first the creation of the tree
            // files the span touches (docs/lazy.md), and waiting for the whole
            // run the inflate of the rest.
            let touched = self.fetch_batch(
                &batch,
                &mut reader,
                !background,
                &mut |s, r| {
                    let mut st = lock(&self.st);
                    let write = match r {
                        Fetched::Written => {
                            st.spans[s] = SpanState::Local;
                            st.local += 1;
                            written.push(s);
                            None
                        }
                        Fetched::Inflated(w) => {
                            st.hold_inflated(s, w.out.clone());
                            Some(w)
                        }
                        Fetched::Failed(e) => {
                            self.failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("{}: span {s}: {e}", self.name);
                            st.spans[s] = SpanState::Failed(e.into());
                            None
                        }
                    };
                    drop(st);
                    self.cv.notify_all();
                    if let Some(w) = write {
                        lock(&self.writes).queue.push_back(w);
                        self.writes_cv.notify_one();
                    }
                },
                &mut timings,
            );
            if background {
                activity.background_end();
            }
            // Made durable by the persister, not here: a fetcher syncing is
            // a fetcher the next miss cannot have.
            self.to_persist(written, touched);
            tracing::debug!(
                "{}: spans {}..={} ({}): fetched and written in {:?} (source {:?}, inflate {:?}, write {:?} of which opening files {:?})",
                self.name,
                batch[0],
                batch[batch.len() - 1],
                match prio {
                    Priority::OnDemand => "read",
                    Priority::Trace => "trace",
                    Priority::LookAhead => "look-ahead",
                    Priority::Background => "background",
                },
                t0.elapsed(),
                timings.net,
                timings.inflate,
                timings.write,
                timings.open,
            );
        }
    }

    /// The writer: puts inflated spans in the tree files, makes them local
    /// (their readers stop reading them from memory) and hands them to the
    /// persister.
    fn writer(self: Arc<Self>) {
        loop {
            let batch: Vec<Inflated> = {
                let mut w = lock(&self.writes);
                while w.queue.is_empty() {
                    if w.stop {
                        return;
                    }
                    w = self.writes_cv.wait(w).unwrap_or_else(|e| e.into_inner());
                }
                w.queue.drain(..).collect()
            };
            let t0 = Instant::now();
            let mut open_time = Duration::ZERO;
            let mut touched = Vec::new();
            let mut written = Vec::new();
            for w in &batch {
                let at = self.idx.span(w.span).uncompressed.start;
                let r = self.write_tree(at, &w.out, &mut touched, &mut open_time);
                let mut st = lock(&self.st);
                // A span reset meanwhile (a failed completion) stays missing.
                if st.spans[w.span] == SpanState::Inflated {
                    match r {
                        Ok(()) => {
                            st.spans[w.span] = SpanState::Local;
                            st.local += 1;
                            written.push(w.span);
                        }
                        Err(e) => {
                            // Its readers had verified bytes; the next one fetches it again.
                            self.failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("{}: span {}: {e}", self.name, w.span);
                            st.spans[w.span] = SpanState::Failed(e.into());
                        }
                    }
                }
                if st.spans[w.span] != SpanState::Inflated {
                    st.drop_inflated(w.span);
                }
                drop(st);
                self.cv.notify_all();
            }
            tracing::debug!(
                "{}: {} inflated spans written in {:?} (of which opening files {:?})",
                self.name,
                batch.len(),
                t0.elapsed(),
                open_time
            );
            self.to_persist(written, touched);
        }
    }

    /// Hands spans just written (and the tree files they touched) to the
    /// persister.
    fn to_persist(&self, written: Vec<usize>, touched: Vec<Arc<File>>) {
        if written.is_empty() {
            return;
        }
        let mut p = lock(&self.pending);
        p.spans.extend(written);
        for f in touched {
            if !p.files.iter().any(|t| Arc::ptr_eq(t, &f)) {
                p.files.push(f);
            }
        }
        drop(p);
        self.pending_cv.notify_all();
    }

    /// The persister: makes the spans the fetchers wrote durable (blob copy and
    /// tree files fdatasynced), then sets them in the bitmap (synced too), so
    /// a restarted daemon can trust what it says. Whatever the fetchers wrote
    /// while it synced is taken together next time: one sync of the blob and
    /// of each file for all of it. On a clean stop it makes durable what was
    /// handed over before it ends.
    fn persister(self: Arc<Self>) {
        loop {
            let (spans, files) = {
                let mut p = lock(&self.pending);
                while p.spans.is_empty() {
                    if p.stop {
                        return;
                    }
                    p = self.pending_cv.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                (std::mem::take(&mut p.spans), std::mem::take(&mut p.files))
            };
            let t0 = Instant::now();
            let r = self.persist(&spans, &files);
            if let Err(e) = &r {
                // Not durable: the next reader fetches them again.
                tracing::warn!("{}: spans {spans:?}: {e}", self.name);
                let mut st = lock(&self.st);
                for &s in &spans {
                    if st.spans[s] == SpanState::Local {
                        st.spans[s] = SpanState::Failed(e.clone().into());
                        st.local -= 1;
                        self.failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            tracing::debug!(
                "{}: {} spans, {} tree files made durable in {:?}",
                self.name,
                spans.len(),
                files.len(),
                t0.elapsed()
            );
        }
    }

    /// The bytes of `written` spans durable (blob copy and tree files), then the
    /// spans set in the bitmap.
    fn persist(&self, written: &[usize], touched: &[Arc<File>]) -> Result<(), String> {
        tree::fdatasync(self.blob.as_fd())
            .and_then(|_| touched.iter().try_for_each(|f| tree::fdatasync(f.as_fd())))
            .map_err(|e| format!("fdatasync: {e}"))
            .and_then(|_| self.mark(written))
    }

    /// Fetches, verifies and inflates a run of adjacent spans and writes
    /// their compressed bytes to the blob copy, telling `done` each span's
    /// result as it is known: its output inflated for the writer if
    /// `to_memory` (and the layer holds less than [`MAX_INFLATED`]), else
    /// written to the tree here; returns the tree files written. A span is written only
    /// once verified ([`Self::persist`] makes it durable and marks it in the
    /// bitmap).
    fn fetch_batch(
        &self,
        batch: &[usize],
        reader: &mut SpanReader,
        to_memory: bool,
        done: &mut dyn FnMut(usize, Fetched),
        timings: &mut Timings,
    ) -> Vec<Arc<File>> {
        let mut fail_all = |why: String| {
            for &s in batch {
                done(s, Fetched::Failed(why.clone()));
            }
            Vec::new()
        };
        let first = self.idx.span(batch[0]);
        let last = self.idx.span(*batch.last().expect("a span"));
        let range = first.compressed.start..last.compressed.end;
        self.requests.fetch_add(1, Ordering::Relaxed);
        // Windows from output already verified instead of the windows blob:
        // the first span's from its neighbour's kept tail, each later span's
        // from the span before it in this run (it is inflated first).
        let first_tail = if SpanReader::history_usable(&self.idx, batch[0]) {
            lock(&self.tails).by_span.get(&(batch[0] - 1)).cloned()
        } else {
            None
        };
        let has_first = first_tail.is_some();
        let derived = |k: usize, s: usize| -> bool {
            if k == 0 {
                has_first
            } else {
                let p = self.idx.span(s - 1);
                SpanReader::history_usable(&self.idx, s)
                    && p.uncompressed.end - p.uncompressed.start >= WINDOW as u64
            }
        };
        // The other windows of the run, in one request (they lie in span order).
        let wins: Vec<(usize, Range<u64>)> = batch
            .iter()
            .enumerate()
            .filter(|&(k, &s)| !derived(k, s))
            .filter_map(|(_, &s)| self.idx.span(s).window().map(|w| (s, w)))
            .collect();
        let wrange = match (
            wins.iter().map(|w| w.1.start).min(),
            wins.iter().map(|w| w.1.end).max(),
        ) {
            (Some(a), Some(b)) => a..b,
            _ => 0..0,
        };
        // Both requests at once: from a registry each is a round trip, and a
        // reader waits for both.
        let t_net = Instant::now();
        let (bytes, wbytes) = std::thread::scope(|sc| {
            let w = (!wrange.is_empty())
                .then(|| sc.spawn(|| self.source.fetch_windows(wrange.clone())));
            let b = self.source.fetch(range.clone());
            let w = match w {
                Some(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("the windows fetch panicked"))),
                None => Ok(Vec::new()),
            };
            (b, w)
        });
        timings.net = t_net.elapsed();
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => return fail_all(format!("fetching bytes {range:?}: {e}")),
        };
        if bytes.len() as u64 != range.end - range.start {
            return fail_all(format!(
                "the source returned {} bytes for {range:?}",
                bytes.len()
            ));
        }
        self.bytes_fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let wbytes = match wbytes {
            Ok(b) if b.len() as u64 == wrange.end - wrange.start => b,
            Ok(b) => {
                return fail_all(format!(
                    "the source returned {} window bytes for {wrange:?}",
                    b.len()
                ))
            }
            Err(e) => return fail_all(format!("fetching windows {wrange:?}: {e}")),
        };
        let mut touched: Vec<Arc<File>> = Vec::new();
        let mut prev_tail = first_tail;
        for (k, &s) in batch.iter().enumerate() {
            let sp = self.idx.span(s);
            let c = &bytes[(sp.compressed.start - range.start) as usize
                ..(sp.compressed.end - range.start) as usize];
            self.spans_fetched.fetch_add(1, Ordering::Relaxed);
            let t_inflate = Instant::now();
            let inflated = if derived(k, s) {
                match prev_tail.as_deref() {
                    Some(h) => reader.read_span_after(&self.idx, s, c, h),
                    None => Err(cstore_index::Error::Span {
                        span: s,
                        reason: "the span before it in the request failed".into(),
                    }),
                }
            } else {
                let w = match sp.window() {
                    Some(r) => {
                        &wbytes[(r.start - wrange.start) as usize..(r.end - wrange.start) as usize]
                    }
                    None => &[][..],
                };
                reader.read_span(&self.idx, s, c, w)
            };
            prev_tail = match &inflated {
                Ok(out) if out.len() >= WINDOW => {
                    let t = Arc::new(out[out.len() - WINDOW..].to_vec());
                    lock(&self.tails).put(s, t.clone());
                    Some(t)
                }
                _ => None,
            };
            let t_write = Instant::now();
            timings.inflate += t_write - t_inflate;
            let out = match inflated {
                Ok(out) => out,
                Err(e) => {
                    done(s, Fetched::Failed(e.to_string()));
                    continue;
                }
            };
            let blob = self
                .blob
                .write_all_at(c, sp.compressed.start)
                .map_err(|e| format!("writing the blob copy: {e}"));
            if blob.is_ok() && to_memory && lock(&self.st).inflated_bytes < MAX_INFLATED {
                timings.write += t_write.elapsed();
                let out = Arc::new(out);
                done(s, Fetched::Inflated(Inflated { span: s, out }));
                continue;
            }
            let r = blob.and_then(|()| {
                self.write_tree(sp.uncompressed.start, &out, &mut touched, &mut timings.open)
            });
            timings.write += t_write.elapsed();
            done(s, r.map_or_else(Fetched::Failed, |()| Fetched::Written));
        }
        touched
    }

    /// Sets `spans` in the bitmap and syncs it.
    fn mark(&self, spans: &[usize]) -> Result<(), String> {
        let f = lock(&self.bitmap_file);
        let mut st = lock(&self.st);
        let mut bytes: Vec<usize> = spans.iter().map(|s| s / 8).collect();
        bytes.dedup();
        let mut new = 0;
        for &s in spans {
            // A span discarded since it was written (a failed completion reset
            // the layer) is not marked.
            if st.spans[s] != SpanState::Local {
                continue;
            }
            let bit = 1 << (s % 8);
            if st.bitmap[s / 8] & bit == 0 {
                st.bitmap[s / 8] |= bit;
                new += 1;
            }
        }
        let vals: Vec<(usize, u8)> = bytes.iter().map(|&b| (b, st.bitmap[b])).collect();
        drop(st);
        for (b, v) in vals {
            f.write_all_at(&[v], b as u64)
                .map_err(|e| format!("writing the span bitmap: {e}"))?;
        }
        // Marks are serialized by the file's lock: the bits set above are written.
        lock(&self.st).durable += new;
        tree::fdatasync(f.as_fd()).map_err(|e| format!("fdatasync of the span bitmap: {e}"))
    }

    /// Writes the uncompressed bytes `out` (from stream offset `at`) into the files
    /// they belong to.
    fn write_tree(
        &self,
        at: u64,
        out: &[u8],
        touched: &mut Vec<Arc<File>>,
        open_time: &mut Duration,
    ) -> Result<(), String> {
        let end = at + out.len() as u64;
        // The first piece that ends after `at`.
        let mut k = self.pieces.partition_point(|p| p.stream + p.len <= at);
        while k < self.pieces.len() && self.pieces[k].stream < end {
            let p = self.pieces[k];
            let a = p.stream.max(at);
            let b = (p.stream + p.len).min(end);
            let t = Instant::now();
            let f = self
                .tree_file(p.entry)
                .map_err(|e| format!("tree file of entry {}: {e}", p.entry))?;
            *open_time += t.elapsed();
            f.write_all_at(
                &out[(a - at) as usize..(b - at) as usize],
                p.file_off + (a - p.stream),
            )
            .map_err(|e| format!("writing entry {}: {e}", p.entry))?;
            if !touched.iter().any(|t| Arc::ptr_eq(t, &f)) {
                touched.push(f);
            }
            k += 1;
        }
        Ok(())
    }

    /// The directory holding entry `i` in the tree, made (0700) as needed.
    pub(crate) fn parent_dir(&self, i: u32, make: bool) -> io::Result<OwnedFd> {
        let mut chain = Vec::new();
        let mut p = self.idx.parent(i);
        while p != 0 {
            chain.push(p);
            p = self.idx.parent(p);
        }
        let mut cur = tree::open_at(
            self.tree.as_fd(),
            b".",
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        for &d in chain.iter().rev() {
            let name = self.idx.name(d);
            cur = if make {
                tree::mkdir_open(cur.as_fd(), name)?
            } else {
                tree::open_at(cur.as_fd(), name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?
            };
        }
        Ok(cur)
    }

    /// File entry `i` in the tree, open read-write: made (0600, sparse, at its
    /// final size) on first use. Owner, mode and xattrs come at completion: a write
    /// drops set-id bits and security.capability.
    pub(crate) fn tree_file(&self, i: u32) -> io::Result<Arc<File>> {
        let mut files = lock(&self.files);
        if let Some(f) = files.get(&i) {
            return Ok(f.clone());
        }
        let dir = self.parent_dir(i, true)?;
        let fd = tree::open_at(
            dir.as_fd(),
            self.idx.name(i),
            libc::O_RDWR | libc::O_CREAT,
            0o600,
        )?;
        let st = tree::fstat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::other("not a regular file in the tree"));
        }
        let f = File::from(fd);
        let size = self.idx.entry(i).size;
        if st.st_size as u64 != size {
            f.set_len(size)?;
        }
        if files.len() >= MAX_OPEN_FILES {
            files.clear();
        }
        let f = Arc::new(f);
        files.insert(i, f.clone());
        Ok(f)
    }

    /// A read-only fd of file entry `i` in the tree (the passthrough backing file).
    ///
    /// One openat2 of the entry's whole path beneath the tree (the resolve flags
    /// confine every component, and the index's names are single components): every
    /// file's first open in a completed layer pays this in the OPEN round trip, and
    /// walking the parent chain twice (`tree_file`, then `parent_dir`) made that ~50
    /// syscalls more per file (docs/lazy.md, "Reading a completed layer"). The walk
    /// remains for a file not in the tree yet (no span ever touched it: empty or all
    /// holes) and for a path too long for one call.
    pub(crate) fn open_tree_file_ro(&self, i: u32) -> io::Result<OwnedFd> {
        match tree::open_at(self.tree.as_fd(), &self.idx.path(i), libc::O_RDONLY, 0) {
            Ok(fd) => {
                let st = tree::fstat(fd.as_fd())?;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(io::Error::other("not a regular file in the tree"));
                }
                return Ok(fd);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENAMETOOLONG)) => {}
            Err(e) => return Err(e),
        }
        drop(self.tree_file(i)?);
        let dir = self.parent_dir(i, false)?;
        tree::open_at(dir.as_fd(), self.idx.name(i), libc::O_RDONLY, 0)
    }

    /// Forgets every local span and open file (completion failed and the tree and
    /// cache were discarded).
    pub(crate) fn reset(&self) -> io::Result<()> {
        lock(&self.files).clear();
        {
            // Spans of the discarded tree are not to be marked (the persister
            // also marks only spans still local, for what it took already).
            let mut p = lock(&self.pending);
            p.spans.clear();
            p.files.clear();
        }
        lock(&self.writes).queue.clear();
        let f = lock(&self.bitmap_file);
        let mut st = lock(&self.st);
        for s in st.spans.iter_mut() {
            if matches!(s, SpanState::Local | SpanState::Inflated) {
                *s = SpanState::Missing;
            }
        }
        st.inflated.clear();
        st.inflated_bytes = 0;
        st.bitmap.fill(0);
        st.local = 0;
        st.durable = 0;
        drop(st);
        f.set_len(0)?;
        tree::fdatasync(f.as_fd())?;
        self.blob.set_len(0)?;
        Ok(())
    }
}

/// Every file's stored data as pieces sorted by stream offset, and each entry's
/// span range.
fn pieces_of(idx: &Index<Vec<u8>>) -> (Vec<Piece>, Vec<Range<u32>>) {
    let n = idx.entry_count();
    let mut pieces = Vec::new();
    let mut spans = vec![0..0; n as usize];
    for i in 0..n {
        let e = idx.entry(i);
        if e.kind != Kind::File {
            continue;
        }
        let data = idx.file_data(i, 0..e.size);
        let (Some(first), Some(last)) = (data.first(), data.last()) else {
            continue;
        };
        let r = idx.spans_for(first.1.start, last.1.end);
        spans[i as usize] = r.start as u32..r.end as u32;
        for (off, stream) in data {
            pieces.push(Piece {
                stream: stream.start,
                len: stream.end - stream.start,
                entry: i,
                file_off: off,
            });
        }
    }
    pieces.sort_by_key(|p| p.stream);
    (pieces, spans)
}

/// The spans a layer's earlier mounts read on demand, in first-read order, from its
/// cache directory (empty if none was recorded).
pub fn read_trace(cache_dir: &Path) -> io::Result<Vec<u32>> {
    match std::fs::read(cache_dir.join(TRACE)) {
        Ok(b) => Ok(b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// How much of a lazy layer is local: its spans whose bit is set in the cache
/// directory's bitmap, and their compressed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    pub spans: usize,
    pub total_spans: usize,
    /// Compressed bytes of the local spans (at most `total_bytes`).
    pub bytes: u64,
    /// The compressed blob's size.
    pub total_bytes: u64,
}

/// [`Local`] of the layer `idx` describes, read from its cache directory as a
/// daemon left it or is filling it, for whoever reports progress without serving
/// the layer. A bit is set only after its span is fdatasynced, so the figure is
/// never ahead of the disk; no bitmap yet is nothing local; a completed layer is
/// all local.
pub fn local_of<B: AsRef<[u8]>>(idx: &Index<B>, cache_dir: &Path) -> io::Result<Local> {
    let n = idx.span_count();
    let total_bytes = idx.header().compressed_size;
    if cache_dir.join(COMPLETE).exists() {
        return Ok(Local {
            spans: n,
            total_spans: n,
            bytes: total_bytes,
            total_bytes,
        });
    }
    let mut bitmap = Vec::new();
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(cache_dir.join(BITMAP))
    {
        Ok(f) => {
            use std::io::Read;
            f.take(n.div_ceil(8) as u64).read_to_end(&mut bitmap)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let (mut spans, mut bytes) = (0, 0u64);
    for i in 0..n {
        if bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0) {
            spans += 1;
            let c = idx.span(i).compressed;
            bytes += c.end.saturating_sub(c.start);
        }
    }
    Ok(Local {
        spans,
        total_spans: n,
        // Spans that start mid-byte share that byte with the one before.
        bytes: bytes.min(total_bytes),
        total_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::source::FileSource;
    use cstore_index::{Compression, Policy};

    /// A gzip layer of `n` files of 256 KiB of incompressible bytes each
    /// (`tar` and `gzip` of the host), its index (64 KiB spans) and windows.
    fn layer_of_files(dir: &Path, n: usize) -> (PathBuf, Vec<u8>, PathBuf) {
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for k in 0..n {
            let data: Vec<u8> = (0..256 << 10)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            std::fs::write(src.join(format!("f{k:02}")), data).unwrap();
        }
        let blob = dir.join("blob.tar.gz");
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"tar --sort=name -C "$1" -cf - . | gzip -1 > "$2""#)
            .arg("sh")
            .arg(&src)
            .arg(&blob)
            .status()
            .unwrap();
        assert!(st.success(), "tar | gzip: {st}");
        let policy = Policy {
            span_target: 64 << 10,
            ..Policy::default()
        };
        let (index, windows) = crate::layer::complete::build_index(
            &blob,
            Compression::Gzip,
            policy,
            LayerOptions::default().tree,
        )
        .unwrap();
        let wpath = dir.join("windows");
        std::fs::write(&wpath, windows).unwrap();
        (blob, index, wpath)
    }

    /// [`layer_of_files`] opened from a [`FileSource`], its tree in `dir/fs`
    /// and its cache in `dir/cache`.
    fn open_layer_of_files(dir: &Path, n: usize, opts: LayerOptions) -> Arc<Layer> {
        let (blob, index, wpath) = layer_of_files(dir, n);
        let tree = dir.join("fs");
        std::fs::create_dir_all(&tree).unwrap();
        Layer::open(
            index,
            Arc::new(FileSource::open(&blob, Some(&wpath)).unwrap()),
            &dir.join("cache"),
            &tree,
            opts,
        )
        .unwrap()
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("gave up waiting for {what}");
        false
    }

    /// Making spans durable (the fdatasyncs and the bitmap) is off the
    /// fetchers' path: with the one fetcher there is and the bitmap held (a
    /// sync that does not end), a second read miss is still fetched and
    /// answered; neither span is marked durable until the bitmap is free, then
    /// both are.
    #[test]
    fn a_read_miss_is_fetched_while_earlier_spans_are_being_made_durable() {
        let t = tempfile::tempdir().unwrap();
        let layer = open_layer_of_files(
            t.path(),
            6,
            LayerOptions {
                fetchers: 1,
                look_ahead: 0,
                ..LayerOptions::default()
            },
        );
        let files: Vec<u32> = (0..layer.idx.entry_count())
            .filter(|&i| !layer.file_spans[i as usize].is_empty())
            .collect();
        assert_eq!(files.len(), 6);
        let (first, last) = (files[0], files[5]);
        let r = |i: u32| layer.file_spans[i as usize].clone();
        assert!(r(first).end < r(last).start, "{:?} {:?}", r(first), r(last));

        let held = lock(&layer.bitmap_file);
        layer.ensure_file_range(first, 0..1).unwrap();
        let l2 = layer.clone();
        let second = std::thread::spawn(move || l2.ensure_file_range(last, 0..1));
        let answered = wait_until("the second miss", || second.is_finished());
        // A reader is answered from memory before the writer has put its span
        // in the tree (local): wait for that, which needs no bitmap.
        wait_until("both spans written", || layer.stats().local == 2);
        let during = layer.stats();
        drop(held);
        second.join().unwrap().unwrap();
        assert!(
            answered,
            "the second read miss waited for the first one's spans to be made durable: {during:?}"
        );
        assert_eq!((during.requests, during.local, during.durable), (2, 2, 0));
        assert!(
            wait_until("both spans durable", || layer.stats().durable == 2),
            "{:?}",
            layer.stats()
        );
        let bitmap = std::fs::read(t.path().join("cache").join(BITMAP)).unwrap();
        let set: Vec<usize> = (0..layer.idx.span_count())
            .filter(|&s| bitmap.get(s / 8).is_some_and(|b| b & (1 << (s % 8)) != 0))
            .collect();
        assert_eq!(set, vec![r(first).start as usize, r(last).start as usize]);
        layer.shutdown();
    }

    /// Background completion queues every span of a layer at mount (the
    /// daemon's `complete()` waits on all of them); guesses must still get
    /// theirs fetched before the layer goes quiet: a read miss's look-ahead
    /// (the rest of its file, not the file after it: siblings are off by
    /// default) and an open's head of its file.
    #[test]
    fn guesses_raise_spans_background_completion_has_queued() {
        let t = tempfile::tempdir().unwrap();
        let layer = open_layer_of_files(
            t.path(),
            6,
            LayerOptions {
                look_ahead: 1 << 20,
                // Background work never starts in this test.
                background_delay: Duration::from_secs(3600),
                ..LayerOptions::default()
            },
        );
        layer.queue((0..layer.idx.span_count()).collect(), Priority::Background);
        let files: Vec<u32> = (0..layer.idx.entry_count())
            .filter(|&i| !layer.file_spans[i as usize].is_empty())
            .collect();
        assert_eq!(files.len(), 6);
        let spans = |i: u32| layer.file_spans[i as usize].clone();
        let readable = |s: u32| lock(&layer.st).spans[s as usize].readable();
        assert!(spans(files[0]).len() >= 4 && spans(files[1]).len() >= 4);

        layer.ensure_file_range(files[0], 0..1).unwrap();
        assert!(
            wait_until("the look-ahead to the end of the file", || readable(
                spans(files[0]).end - 1
            )),
            "{:?}",
            layer.stats()
        );
        std::thread::sleep(Duration::from_millis(200));
        // A span of the next file's alone (its first may hold the end of this one).
        assert!(
            !readable(spans(files[1]).start + 1),
            "looked ahead into the next file: {:?}",
            layer.stats()
        );
        layer.open_ahead(files[5]);
        assert!(
            wait_until("the head of the opened file", || readable(
                spans(files[5]).start
            )),
            "{:?}",
            layer.stats()
        );
        layer.shutdown();
    }

    /// A read miss is answered from the span's inflated output, not after its
    /// tree file is written: with the tree's file table held (no tree file
    /// can be made or opened), a miss still returns the file's bytes. The file
    /// is not complete (no passthrough) until the writer has put them in the
    /// tree, which it does once the table is free.
    #[test]
    fn a_read_miss_is_answered_before_the_tree_file_is_written() {
        let t = tempfile::tempdir().unwrap();
        let layer = open_layer_of_files(
            t.path(),
            3,
            LayerOptions {
                fetchers: 1,
                look_ahead: 0,
                ..LayerOptions::default()
            },
        );
        let f = (0..layer.idx.entry_count())
            .find(|&i| layer.idx.name(i) == b"f01")
            .unwrap();
        let want = std::fs::read(t.path().join("src/f01")).unwrap();
        let size = want.len() as u64;
        // From the middle of the file to its end, across span boundaries.
        let range = 100_000..size;

        let held = lock(&layer.files);
        let l2 = layer.clone();
        let r2 = range.clone();
        let reader = std::thread::spawn(move || {
            l2.ensure_file_range(f, r2.clone()).unwrap();
            let mut out = Vec::new();
            l2.read_file(f, r2, &mut out).map(|()| out)
        });
        let answered = wait_until("the read", || reader.is_finished());
        let (complete, stats) = (layer.file_complete(f), layer.stats());
        drop(held);
        assert!(answered, "the read waited for its tree file: {stats:?}");
        let got = reader.join().unwrap().unwrap();
        assert!(got == want[range.start as usize..range.end as usize]);
        assert!(!complete, "complete before its bytes were in the tree");
        assert_eq!(stats.local, 0, "{stats:?}");

        // The file's head, then the whole of it from the tree.
        layer.ensure_file_range(f, 0..range.start).unwrap();
        assert!(wait_until("the spans written", || layer.file_complete(f)));
        let mut out = Vec::new();
        layer.read_file(f, 0..size, &mut out).unwrap();
        assert!(out == want, "the file read back differs");
        assert!(std::fs::read(t.path().join("fs/f01")).unwrap() == want);
        assert!(wait_until("the spans durable", || {
            let s = layer.stats();
            s.durable == s.local && s.local > 0
        }));
        assert_eq!(lock(&layer.st).inflated_bytes, 0);
        layer.shutdown();
    }
}
