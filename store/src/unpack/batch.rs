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

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::Rc;

use cstore_blockio::{Backend, Buf, Mode, Op, Ring};

use super::sys;

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

/// Why a queued file failed: its entry path and the reason.
pub type Failure = (Vec<u8>, String);

pub struct Batch {
    ring: Ring,
    files: Vec<Pending>,
    bytes: usize,
    /// Cleaned paths of the queued files.
    keys: HashSet<Vec<u8>>,
}

const RESOLVE: u64 = sys::RESOLVE_BENEATH
    | sys::RESOLVE_NO_SYMLINKS
    | sys::RESOLVE_NO_MAGICLINKS
    | sys::RESOLVE_NO_XDEV;
const CREATE: i32 = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;

// user_data: file index << 2 | which op of its chain.
const OPEN: u64 = 0;
const WRITE: u64 = 1;
const CLOSE: u64 = 2;

impl Batch {
    /// A batch on a new ring of this thread's, or None if io_uring is refused.
    pub fn new() -> io::Result<Option<Batch>> {
        // Three ops per file; a flush never waits for room.
        let mut ring = Ring::new((MAX_FILES * 3) as u32, false, Mode::Auto);
        if ring.backend() == Backend::Sync {
            return Ok(None);
        }
        ring.register_files(MAX_FILES as u32)?;
        Ok(Some(Batch {
            ring,
            files: Vec::with_capacity(MAX_FILES),
            bytes: 0,
            keys: HashSet::new(),
        }))
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Does the path `dirs` go through a queued file?
    pub fn has_ancestor(&self, dirs: &[&[u8]]) -> bool {
        if self.files.is_empty() {
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

    /// Queue a file; flushes first when the batch is full.
    pub fn push(&mut self, key: Vec<u8>, file: Pending) -> Result<(), Failure> {
        if self.files.len() == MAX_FILES || self.bytes + file.data.len() > MAX_BYTES {
            self.flush()?;
        }
        self.bytes += file.data.len();
        self.keys.insert(key);
        self.files.push(file);
        Ok(())
    }

    /// Create, write and close every queued file, then set what io_uring
    /// can't. Errors name the first failed file in archive order.
    pub fn flush(&mut self) -> Result<(), Failure> {
        if self.files.is_empty() {
            return Ok(());
        }
        let mut files = std::mem::take(&mut self.files);
        self.keys.clear();
        self.bytes = 0;
        let mut failed: Vec<Option<String>> = vec![None; files.len()];
        let mut lens = Vec::with_capacity(files.len());
        let mut ops = 0;
        for (i, f) in files.iter_mut().enumerate() {
            let slot = i as u32;
            let ud = (i as u64) << 2;
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
                    Op::WriteFixed {
                        slot,
                        buf,
                        offset: 0,
                    },
                    ud | WRITE,
                    true,
                );
                ops += 1;
            }
            self.push_op(Op::CloseFixed { slot }, ud | CLOSE, false);
            ops += 2;
        }
        let mut done = Vec::with_capacity(ops);
        while done.len() < ops {
            self.ring
                .submit(ops - done.len())
                .map_err(|e| (files[0].entry.clone(), format!("io_uring submit: {e}")))?;
            self.ring.reap(&mut done);
        }
        for d in done {
            let i = (d.user_data >> 2) as usize;
            let what = d.user_data & 3;
            let reason = match d.result {
                // A failure earlier in the chain cancels the rest.
                Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => None,
                Err(e) => Some(match what {
                    OPEN => super::extract::io_reason("create", &e),
                    WRITE => super::extract::io_reason("write", &e),
                    _ => super::extract::io_reason("close", &e),
                }),
                Ok(n) if what == WRITE && n as usize != lens[i] => {
                    Some(format!("write: short write ({n} of {} bytes)", lens[i]))
                }
                Ok(_) => None,
            };
            if let Some(r) = reason {
                failed[i].get_or_insert(r);
            }
        }
        if let Some(i) = failed.iter().position(Option::is_some) {
            // A file whose write failed is still in its slot: the next open
            // into the slot, or dropping the ring, closes it.
            return Err((files[i].entry.clone(), failed[i].take().unwrap()));
        }
        for f in &files {
            let dir = f.parent.as_fd();
            let fail =
                |op: &str, e: io::Error| (f.entry.clone(), super::extract::io_reason(op, &e));
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
        // The ring has room for three ops per file of a full batch.
        if self.ring.push(op, user_data, link).is_err() {
            unreachable!("batch ring sized for a full batch");
        }
    }
}
