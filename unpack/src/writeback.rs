//! Write-back in the background while layers are extracted.
//!
//! Extraction fills the page cache at CPU speed and the durable unpack then
//! waits for one `syncfs` that writes it all: on a disk the two phases add
//! up (seconds of CPU with the disk idle, then seconds of disk with the CPU
//! idle). A [`Writeback`] runs `syncfs` on the layers' filesystem from a
//! thread of its own each time [`WritebackHandle::wrote`] has been told of
//! `every` more bytes, so the disk writes what is extracted while the next
//! bytes are; the caller's final `syncfs` then has only the rest to write.
//!
//! Why `syncfs` and not `sync_file_range(WRITE)` per file: started file by
//! file, small files reach a disk one at a time, each a seek
//! (docs/benchmarks.md); a whole filesystem's dirty data at once reaches the
//! block layer's scheduler as one large batch it can sort. Syncs do not
//! queue up: one that runs while `every` more bytes arrive is followed by
//! one more, which takes all of them.
//!
//! This never makes anything durable on its own account: the caller's final
//! `syncfs` still comes before any commit. An error of a background `syncfs`
//! is kept and returned by [`Writeback::finish`], so a write-back failure
//! the final `syncfs` might not see (its fd opened after it) still fails the
//! unpack.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use cstore_os::sys;

/// When a background write-back is due: after `every` bytes told since the
/// last one started. Kept apart from the thread so the decision is counted
/// by a test, not timed.
#[derive(Debug)]
pub struct Trigger {
    every: u64,
    since: AtomicU64,
}

impl Trigger {
    pub fn new(every: u64) -> Trigger {
        Trigger {
            every: every.max(1),
            since: AtomicU64::new(0),
        }
    }

    /// Count `bytes` more; true when this call made a write-back due (it
    /// crossed the threshold), so only one call per crossing wakes the thread.
    pub fn add(&self, bytes: u64) -> bool {
        let before = self.since.fetch_add(bytes, Ordering::Relaxed);
        before < self.every && before + bytes >= self.every
    }

    /// Whether a write-back is due.
    pub fn due(&self) -> bool {
        self.since.load(Ordering::Relaxed) >= self.every
    }

    /// A write-back starts: what was counted is its to write.
    pub fn take(&self) -> u64 {
        self.since.swap(0, Ordering::Relaxed)
    }
}

/// Files written and not yet handed to the write-back, kept open until
/// `every` bytes of them are there: then all of them are started at once
/// (`sync_file_range(WRITE)`, in the order they were written), so the
/// block layer gets one batch of adjacent writes to sort and merge, not a
/// small file at a time. Nothing is waited for: durability is the caller's
/// final `syncfs`.
#[derive(Debug)]
pub struct FileBatch {
    every: u64,
    bytes: u64,
    files: Vec<File>,
    /// Batches started (for tests and logs).
    pub started: u64,
}

/// Open files held at most (fds), whatever their bytes.
const BATCH_FILES: usize = 512;

impl FileBatch {
    pub fn new(every: u64) -> FileBatch {
        FileBatch {
            every: every.max(1),
            bytes: 0,
            files: Vec::new(),
            started: 0,
        }
    }

    /// `f` was written with `size` bytes; true when this started a batch.
    pub fn push(&mut self, f: File, size: u64) -> bool {
        self.files.push(f);
        self.bytes += dirty_bytes(size);
        if self.bytes >= self.every || self.files.len() >= BATCH_FILES {
            self.start();
            return true;
        }
        false
    }

    /// Start what is held and close it.
    pub fn start(&mut self) {
        if self.files.is_empty() {
            return;
        }
        for f in self.files.drain(..) {
            // Only a head start: an error here is the final syncfs's to report.
            let _ = sys::start_writeback(f.as_fd());
        }
        self.bytes = 0;
        self.started += 1;
    }
}

/// What an extracted entry adds to the dirty data: its bytes in whole
/// filesystem blocks (a small file dirties at least one).
pub fn dirty_bytes(size: u64) -> u64 {
    size.next_multiple_of(4096).max(4096)
}

#[derive(Debug, Default)]
struct State {
    stop: bool,
    /// Background syncs started.
    syncs: u64,
    error: Option<io::Error>,
}

#[derive(Debug)]
struct Shared {
    trigger: Trigger,
    state: Mutex<State>,
    wake: Condvar,
}

/// Where extraction reports what it wrote (cloned into `UnpackOptions`).
#[derive(Clone, Debug)]
pub struct WritebackHandle(Arc<Shared>);

impl WritebackHandle {
    /// `bytes` more are dirty in the page cache.
    pub fn wrote(&self, bytes: u64) {
        if self.0.trigger.add(bytes) {
            // Under the lock: the thread checks `due` under it before it
            // waits, so the wake-up cannot fall between the two.
            let _g = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
            self.0.wake.notify_one();
        }
    }
}

/// The background thread; stopped (and joined) by `finish` or on drop.
pub struct Writeback {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Writeback {
    /// Start the thread that syncs the filesystem holding `dir` every
    /// `every` bytes reported through [`Writeback::handle`].
    pub fn start(dir: &Path, every: u64) -> io::Result<Writeback> {
        let fs = File::open(dir)?;
        let shared = Arc::new(Shared {
            trigger: Trigger::new(every),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("unpack-writeback".into())
            .spawn(move || run(&s, &fs))?;
        Ok(Writeback {
            shared,
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> WritebackHandle {
        WritebackHandle(self.shared.clone())
    }

    /// Stop the thread after the sync it may be running; the number of
    /// background syncs it started, or the first one's error.
    pub fn finish(mut self) -> io::Result<u64> {
        self.stop();
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(st.syncs),
        }
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .stop = true;
            self.shared.wake.notify_one();
            let _ = t.join();
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(s: &Shared, fs: &File) {
    loop {
        {
            let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
            while !st.stop && !s.trigger.due() {
                st = s.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            // Stopping: the caller's own syncfs writes the rest.
            if st.stop || st.error.is_some() {
                return;
            }
            st.syncs += 1;
        }
        s.trigger.take();
        if let Err(e) = sys::syncfs(fs.as_fd()) {
            let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
            st.error = Some(e);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_fires_once_per_crossing_and_counts_on_from_the_take() {
        let t = Trigger::new(10);
        // 3 + 3 + 3 = 9: not yet; the fourth crosses 10.
        let fired: Vec<bool> = (0..4).map(|_| t.add(3)).collect();
        assert_eq!(fired, [false, false, false, true]);
        assert!(t.due());
        // Further bytes before the thread takes them do not wake it again.
        assert!(!t.add(5));
        assert_eq!(t.take(), 17);
        assert!(!t.due());
        // One write of the whole threshold crosses it at once.
        assert!(t.add(10));
        assert_eq!(t.take(), 10);
        assert!(!t.add(0));
    }

    #[test]
    fn file_batches_start_at_the_threshold_or_the_fd_cap() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let file = |i: usize| {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, b"x").unwrap();
            File::open(p).unwrap()
        };
        // 16 KiB: four one-block files make a batch.
        let mut b = FileBatch::new(16 << 10);
        let fired: Vec<bool> = (0..8).map(|i| b.push(file(i), 1)).collect();
        assert_eq!(
            fired,
            [false, false, false, true, false, false, false, true]
        );
        assert_eq!(b.started, 2);
        assert!(b.files.is_empty());
        // One big file starts at once.
        assert!(b.push(file(8), 16 << 10));
        // Past the fd cap with few bytes: started anyway.
        let mut b = FileBatch::new(1 << 40);
        let n = (0..BATCH_FILES).filter(|&i| b.push(file(i), 0)).count();
        assert_eq!((n, b.started, b.files.len()), (1, 1, 0));
        b.push(file(0), 0);
        b.start();
        assert_eq!((b.started, b.files.len()), (2, 0));
        b.start();
        assert_eq!(b.started, 2, "nothing held: no batch");
    }

    #[test]
    fn small_files_count_a_block_each() {
        assert_eq!(dirty_bytes(0), 4096);
        assert_eq!(dirty_bytes(1), 4096);
        assert_eq!(dirty_bytes(4096), 4096);
        assert_eq!(dirty_bytes(4097), 8192);
    }

    #[test]
    fn syncs_run_only_past_the_threshold() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        // Below the threshold: no background sync at all.
        let wb = Writeback::start(dir.path(), 1 << 20).unwrap();
        let h = wb.handle();
        for _ in 0..255 {
            h.wrote(dirty_bytes(1));
        }
        assert_eq!(wb.finish().unwrap(), 0);

        // Past it: one sync (a stop sent before the thread woke would
        // win, so wait for the sync to start), then nothing more is due.
        let wb = Writeback::start(dir.path(), 1 << 20).unwrap();
        let h = wb.handle();
        for _ in 0..256 {
            h.wrote(dirty_bytes(1));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while wb.shared.state.lock().unwrap().syncs == 0 {
            assert!(std::time::Instant::now() < deadline, "no background sync");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(wb.finish().unwrap(), 1);
    }
}
