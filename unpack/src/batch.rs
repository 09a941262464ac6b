//! Small regular files written in batches through io_uring.
//!
//! Extraction queues a small file (its data copied out of the tar stream)
//! instead of writing it; a flush submits every queued file at once. Each
//! file is one linked chain, openat2 into a slot of the ring's fixed-file
//! table → write from that slot → close the slot, so a whole batch is one
//! io_uring_enter and no fd of ours ever holds the files. The open is the same
//! as the one-at-a-time path's: O_CREAT|O_EXCL|O_NOFOLLOW of a single name
//! under an openat2(RESOLVE_BENEATH|NO_SYMLINKS)-confined parent, with the
//! same RESOLVE flags on top. What io_uring has no op for (chown, chmod, the
//! mtime) is then done by name, with plain syscalls, and only where needed.
//!
//! The extractor flushes before any entry that could see a queued file (its
//! own name, a path through it, a hardlink, a whiteout...), so the tree and
//! the errors are those of the one-at-a-time path.

use std::collections::{HashSet, VecDeque};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::Rc;

use cstore_blockio::{Backend, Buf, Done, Mode, Op, Ring};

use super::extract::io_reason;
use cstore_os::sys;

/// Files larger than this are written directly from the tar stream.
pub const MAX_FILE: u64 = 64 << 10;
/// Files per batch (the fixed-file table's size).
const MAX_FILES: usize = 256;
/// Data bytes per batch.
const MAX_BYTES: usize = 4 << 20;

/// A file waiting for the next flush.
pub struct Pending {
    /// The entry's path in the archive, for errors.
    pub entry: Vec<u8>,
    /// Its cleaned path.
    pub key: Vec<u8>,
    pub parent: Rc<OwnedFd>,
    pub name: CString,
    pub data: Vec<u8>,
    pub meta: Meta,
}

/// What a new file needs besides its data.
pub struct Meta {
    /// Permission bits given to open (the umask may strip some).
    pub create_mode: u32,
    /// Owner to set, if the file would not get it by default.
    pub chown: Option<(u32, u32)>,
    /// Mode to set, if create_mode and the umask don't give it.
    pub chmod: Option<u32>,
    pub mtime: (i64, u32),
}

/// Why a queued file failed: its entry path, the reason and the errno.
pub type Failure = (Vec<u8>, String, Option<i32>);

/// A batch the kernel is working on.
struct Submitted {
    gen: u64,
    files: Vec<Pending>,
    lens: Vec<usize>,
    failed: Vec<Option<(String, Option<i32>)>>,
    /// Completions still to come.
    left: usize,
}

/// Files are queued into one batch while the kernel works on up to
/// `IN_FLIGHT` earlier ones, so reading and decompressing the archive
/// overlaps with creating the files (io-wq runs the O_CREAT opens, which
/// cannot complete inline, and the rest of each chain).
pub struct Batch {
    ring: Ring,
    files: Vec<Pending>,
    bytes: usize,
    /// Cleaned paths of the queued and in-flight files.
    keys: HashSet<Vec<u8>>,
    in_flight: VecDeque<Submitted>,
    gen: u64,
    done: Vec<Done>,
}

const IN_FLIGHT: usize = 2;

const RESOLVE: u64 = sys::RESOLVE_BENEATH
    | sys::RESOLVE_NO_SYMLINKS
    | sys::RESOLVE_NO_MAGICLINKS
    | sys::RESOLVE_NO_XDEV;
const CREATE: i32 = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;

// user_data: batch generation << 32 | file index << 2 | which op of its chain.
const OPEN: u64 = 0;
const WRITE: u64 = 1;
const CLOSE: u64 = 2;

impl Batch {
    /// A batch on a new ring of this thread's, or None if io_uring is refused.
    pub fn new() -> io::Result<Option<Batch>> {
        // Three ops per file of every batch in flight: pushes never wait.
        let slots = MAX_FILES * IN_FLIGHT;
        let mut ring = Ring::new((slots * 3) as u32, false, Mode::Auto);
        if ring.backend() == Backend::Sync {
            return Ok(None);
        }
        ring.register_file_slots(slots as u32)?;
        // One io-wq worker: more only contend for the parent directory's
        // lock (measured: 2 workers cost more CPU and time than 1).
        ring.max_workers(1, 0)?;
        Ok(Some(Batch {
            ring,
            files: Vec::with_capacity(MAX_FILES),
            bytes: 0,
            keys: HashSet::new(),
            in_flight: VecDeque::new(),
            gen: 0,
            done: Vec::new(),
        }))
    }

    /// Nothing queued or in flight?
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.in_flight.is_empty()
    }

    /// Does the path `dirs` go through a queued or in-flight file?
    pub fn has_ancestor(&self, dirs: &[&[u8]]) -> bool {
        if self.keys.is_empty() {
            return false;
        }
        let mut p = Vec::new();
        for c in dirs {
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(c);
            if self.keys.contains(&p) {
                return true;
            }
        }
        false
    }

    /// Queue a file; a full batch goes to the kernel.
    pub fn push(&mut self, file: Pending) -> Result<(), Failure> {
        if self.files.len() == MAX_FILES || self.bytes + file.data.len() > MAX_BYTES {
            self.submit()?;
        }
        self.bytes += file.data.len();
        self.keys.insert(file.key.clone());
        self.files.push(file);
        Ok(())
    }

    /// Write every queued and in-flight file, and set what io_uring can't.
    /// Errors name the first failed file in archive order.
    pub fn flush(&mut self) -> Result<(), Failure> {
        self.submit()?;
        while !self.in_flight.is_empty() {
            self.finish_oldest()?;
        }
        Ok(())
    }

    /// Hand the queued files to the kernel, one chain each: openat2 into a
    /// fixed slot, write from the slot, close the slot.
    fn submit(&mut self) -> Result<(), Failure> {
        if self.files.is_empty() {
            return Ok(());
        }
        // The slots of the batch IN_FLIGHT generations back are reused.
        while self.in_flight.len() >= IN_FLIGHT {
            self.finish_oldest()?;
        }
        let gen = self.gen;
        self.gen += 1;
        let base = (gen as usize % IN_FLIGHT) * MAX_FILES;
        let mut files = std::mem::take(&mut self.files);
        self.bytes = 0;
        let mut lens = Vec::with_capacity(files.len());
        let mut ops = 0;
        for (i, f) in files.iter_mut().enumerate() {
            let slot = (base + i) as u32;
            let ud = gen << 32 | (i as u64) << 2;
            let open = Op::OpenAt2 {
                dirfd: f.parent.as_raw_fd(),
                path: f.name.clone(),
                flags: CREATE,
                mode: f.meta.create_mode,
                resolve: RESOLVE,
                slot: Some(slot),
            };
            self.push_op(open, ud | OPEN, true);
            lens.push(f.data.len());
            if !f.data.is_empty() {
                let buf = Buf::Heap(std::mem::take(&mut f.data));
                self.push_op(
                    Op::WriteSlot {
                        slot,
                        buf,
                        offset: 0,
                    },
                    ud | WRITE,
                    true,
                );
                ops += 1;
            }
            self.push_op(Op::CloseSlot { slot }, ud | CLOSE, false);
            ops += 2;
        }
        let failed = vec![None; files.len()];
        self.in_flight.push_back(Submitted {
            gen,
            files,
            lens,
            failed,
            left: ops,
        });
        self.ring.submit(0).map_err(|e| {
            (
                self.in_flight[0].files[0].entry.clone(),
                format!("io_uring submit: {e}"),
                e.raw_os_error(),
            )
        })
    }

    /// Wait for the oldest batch in flight, check it, then chown, chmod and
    /// date its files (no io_uring op for those) by name.
    fn finish_oldest(&mut self) -> Result<(), Failure> {
        let gen = self.in_flight[0].gen;
        while self.in_flight[0].left > 0 {
            // One wakeup for the whole batch, not one per completion.
            let left = self.in_flight[0].left;
            self.ring.submit(left).map_err(|e| {
                (
                    self.in_flight[0].files[0].entry.clone(),
                    format!("io_uring submit: {e}"),
                    e.raw_os_error(),
                )
            })?;
            self.ring.reap(&mut self.done);
            for d in self.done.drain(..) {
                let b = self
                    .in_flight
                    .iter_mut()
                    .find(|b| b.gen == d.user_data >> 32)
                    .expect("completion of a batch in flight");
                b.left -= 1;
                let i = (d.user_data as u32 >> 2) as usize;
                let what = d.user_data & 3;
                let reason = match d.result {
                    // A failure earlier in the chain cancels the rest.
                    Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => None,
                    Err(e) => Some((
                        match what {
                            OPEN => io_reason("create", &e),
                            WRITE => io_reason("write", &e),
                            _ => io_reason("close", &e),
                        },
                        e.raw_os_error(),
                    )),
                    Ok(n) if what == WRITE && n as usize != b.lens[i] => Some((
                        format!("write: short write ({n} of {} bytes)", b.lens[i]),
                        None,
                    )),
                    Ok(_) => None,
                };
                if let Some(r) = reason {
                    b.failed[i].get_or_insert(r);
                }
            }
        }
        let mut b = self.in_flight.pop_front().expect("a batch in flight");
        debug_assert_eq!(b.gen, gen);
        for f in &b.files {
            self.keys.remove(&f.key);
        }
        if let Some(i) = b.failed.iter().position(Option::is_some) {
            // A file whose write failed is still in its slot: the next open
            // into the slot, or dropping the ring, closes it.
            let (reason, errno) = b.failed[i].take().unwrap();
            return Err((b.files[i].entry.clone(), reason, errno));
        }
        for f in &b.files {
            let dir = f.parent.as_fd();
            let fail =
                |op: &str, e: io::Error| (f.entry.clone(), io_reason(op, &e), e.raw_os_error());
            if let Some((uid, gid)) = f.meta.chown {
                sys::lchownat(dir, &f.name, uid, gid).map_err(|e| fail("chown", e))?;
            }
            if let Some(mode) = f.meta.chmod {
                sys::chmodat(dir, &f.name, mode).map_err(|e| fail("chmod", e))?;
            }
            sys::lutimesat(dir, &f.name, f.meta.mtime).map_err(|e| fail("set mtime", e))?;
        }
        Ok(())
    }

    fn push_op(&mut self, op: Op, user_data: u64, link: bool) {
        // The ring has room for three ops per file of every batch in flight.
        if self.ring.push(op, user_data, link).is_err() {
            unreachable!("batch ring sized for the batches in flight");
        }
    }
}

impl Drop for Batch {
    /// After an error, wait out what the kernel still does with the
    /// ring's buffers and slots; dropping the ring then closes any file
    /// left in a slot.
    fn drop(&mut self) {
        while self.ring.in_flight() > 0 {
            let n = self.ring.in_flight();
            if self.ring.submit(n).is_err() {
                break;
            }
            self.ring.reap(&mut self.done);
            self.done.clear();
        }
    }
}
