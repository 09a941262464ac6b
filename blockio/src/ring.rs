//! One submission/completion ring, owned by one thread: io_uring when the
//! kernel allows it, else a synchronous stand-in that runs the same ops with
//! plain syscalls (same API, same results), used when io_uring is refused
//! (ENOSYS, EPERM, `kernel.io_uring_disabled`) or forced by
//! `CSTORE_IO=sync`.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::sync::Once;

use io_uring::{opcode, squeue, types, IoUring};

use crate::buf::Buf;

/// An operation. Buffers and paths are owned, so they live until the
/// completion hands them back. File descriptors must stay open until then.
#[derive(Debug)]
pub enum Op {
    Read {
        fd: RawFd,
        buf: Buf,
        offset: u64,
    },
    Write {
        fd: RawFd,
        buf: Buf,
        offset: u64,
    },
    Readv {
        fd: RawFd,
        bufs: Vec<Buf>,
        offset: u64,
    },
    Writev {
        fd: RawFd,
        bufs: Vec<Buf>,
        offset: u64,
    },
    /// Read into a buffer registered with `Ring::register_buffers` (its
    /// index `buf_index`), from registered file `file` if given, else `fd`.
    /// The plain-syscall stand-in does a pread on `fd`.
    ReadFixed {
        fd: RawFd,
        file: Option<u32>,
        buf: Buf,
        buf_index: u16,
        offset: u64,
    },
    /// As ReadFixed, writing.
    WriteFixed {
        fd: RawFd,
        file: Option<u32>,
        buf: Buf,
        buf_index: u16,
        offset: u64,
    },
    Fsync {
        fd: RawFd,
        datasync: bool,
    },
    Fallocate {
        fd: RawFd,
        mode: i32,
        offset: u64,
        len: u64,
    },
    OpenAt {
        dirfd: RawFd,
        path: CString,
        flags: i32,
        mode: u32,
    },
    Close {
        fd: RawFd,
    },
    Statx {
        dirfd: RawFd,
        path: CString,
        flags: i32,
        mask: u32,
    },
    MkdirAt {
        dirfd: RawFd,
        path: CString,
        mode: u32,
    },
    SymlinkAt {
        target: CString,
        dirfd: RawFd,
        path: CString,
    },
    LinkAt {
        olddirfd: RawFd,
        oldpath: CString,
        newdirfd: RawFd,
        newpath: CString,
        flags: i32,
    },
    RenameAt {
        olddirfd: RawFd,
        oldpath: CString,
        newdirfd: RawFd,
        newpath: CString,
        flags: u32,
    },
    UnlinkAt {
        dirfd: RawFd,
        path: CString,
        flags: i32,
    },
    /// openat2 with an open_how: `resolve` takes the RESOLVE_* flags. With
    /// `slot`, the file goes into that slot of the ring's fixed-file table
    /// (see `register_file_slots`) instead of the fd table, and the result is 0.
    OpenAt2 {
        dirfd: RawFd,
        path: CString,
        flags: i32,
        mode: u32,
        resolve: u64,
        slot: Option<u32>,
    },
    /// A write to the file in a fixed-file slot (an OpenAt2 `slot`).
    WriteSlot {
        slot: u32,
        buf: Buf,
        offset: u64,
    },
    /// Close the file in a fixed-file slot (the slot becomes free).
    CloseSlot {
        slot: u32,
    },
}

/// A finished operation: its result (bytes moved, or a new fd for OpenAt),
/// the op back (with its buffers), and statx data for Statx.
#[derive(Debug)]
pub struct Done {
    pub user_data: u64,
    pub result: io::Result<u32>,
    pub op: Op,
    pub statx: Option<Box<libc::statx>>,
}

struct InFlight {
    user_data: u64,
    op: Op,
    statx: Option<Box<libc::statx>>,
    /// open_how for OpenAt2, which the kernel reads at submission.
    how: Option<Box<types::OpenHow>>,
    /// iovecs for Readv/Writev, pointing into the op's buffers.
    _iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `_iov` point into buffers owned by `op` in the
// same struct; they move together and are only used by the kernel.
unsafe impl Send for InFlight {}

/// Which backend to ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// io_uring unless refused or `CSTORE_IO=sync`.
    Auto,
    /// Plain syscalls (the fallback), e.g. to test both paths.
    Sync,
}

impl Mode {
    /// What `CSTORE_IO` asks of a ring: `sync` is the stand-in, chosen
    /// quietly (no fallback warning: nothing was refused).
    pub fn from_env() -> Mode {
        match io_env() {
            IoEnv::Sync => Mode::Sync,
            IoEnv::Default | IoEnv::Uring => Mode::Auto,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    IoUring,
    Sync,
}

enum Kind {
    Uring(Box<IoUring>),
    Sync {
        queued: VecDeque<(usize, bool)>,
        /// The fixed-file table, emulated with plain fds (-1: empty).
        fixed: Vec<RawFd>,
    },
}

pub struct Ring {
    kind: Kind,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    ready: VecDeque<Done>,
    in_flight: usize,
}

static FALLBACK_LOGGED: Once = Once::new();

/// What `CSTORE_IO` asks for, read once per process: `sync` forces plain
/// syscalls, `uring` the io_uring paths (an error where io_uring is refused),
/// unset (or anything else) lets each user choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEnv {
    Default,
    Sync,
    Uring,
}

pub fn io_env() -> IoEnv {
    static ENV: std::sync::OnceLock<IoEnv> = std::sync::OnceLock::new();
    *ENV.get_or_init(|| match std::env::var("CSTORE_IO").as_deref() {
        Ok("sync") => IoEnv::Sync,
        Ok("uring") => IoEnv::Uring,
        _ => IoEnv::Default,
    })
}

/// Whether io_uring is to be tried at all.
fn uring_allowed() -> bool {
    if io_env() == IoEnv::Sync {
        return false;
    }
    // 2: disabled for all; 1: only for a group (we may or may not be in it: try).
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").map_or(true, |v| v.trim() != "2")
}

impl Ring {
    /// A ring with `depth` entries; io_uring if possible. Bound to the
    /// thread that creates it (single issuer, deferred task running).
    pub fn new(depth: u32, iopoll: bool, mode: Mode) -> Ring {
        Self::create(depth, iopoll, mode, true)
    }

    /// A ring that may move between threads while idle (no single-issuer
    /// binding; completions are posted without the submitter's help), for a
    /// stream owned by an object that changes threads between calls, as a
    /// blob writer does across tokio's blocking pool.
    pub fn portable(depth: u32, mode: Mode) -> Ring {
        Self::create(depth, false, mode, false)
    }

    fn create(depth: u32, iopoll: bool, mode: Mode, thread_bound: bool) -> Ring {
        let depth = depth.clamp(1, 4096);
        let kind = if mode == Mode::Sync {
            Kind::Sync {
                queued: VecDeque::new(),
                fixed: Vec::new(),
            }
        } else if uring_allowed() {
            // One thread owns a ring and reaps its completions itself (as
            // fio does): no interrupts to run completion work elsewhere.
            let build = |tuned: bool| {
                let mut b = IoUring::builder();
                if iopoll {
                    b.setup_iopoll();
                }
                if tuned {
                    b.setup_single_issuer()
                        .setup_coop_taskrun()
                        .setup_defer_taskrun();
                }
                b.build(depth)
            };
            let built = if thread_bound {
                build(true).or_else(|_| build(false))
            } else {
                build(false)
            };
            match built {
                Ok(r) => Kind::Uring(Box::new(r)),
                Err(e) => {
                    FALLBACK_LOGGED.call_once(|| {
                        tracing::warn!(error = %e, "io_uring refused by the kernel; using a thread pool doing plain syscalls instead");
                    });
                    Kind::Sync {
                        queued: VecDeque::new(),
                        fixed: Vec::new(),
                    }
                }
            }
        } else {
            FALLBACK_LOGGED.call_once(|| {
                tracing::warn!("io_uring disabled (kernel.io_uring_disabled=2 or CSTORE_IO=sync); using plain syscalls instead");
            });
            Kind::Sync {
                queued: VecDeque::new(),
                fixed: Vec::new(),
            }
        };
        Ring {
            kind,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as usize).rev().collect(),
            ready: VecDeque::new(),
            in_flight: 0,
        }
    }

    /// Register buffers for ReadFixed/WriteFixed (index = position): the
    /// kernel pins them once instead of per I/O. No-op on the stand-in.
    ///
    /// # Safety
    /// The buffers' memory must stay allocated (the `Buf`s alive, wherever
    /// they move) until the ring is dropped.
    pub unsafe fn register_buffers(&mut self, bufs: &mut [Buf]) -> io::Result<()> {
        match &mut self.kind {
            Kind::Uring(ring) => {
                let iovs: Vec<libc::iovec> = bufs.iter_mut().map(iov).collect();
                // SAFETY: the caller keeps the memory alive (see above).
                unsafe { ring.submitter().register_buffers(&iovs) }
            }
            Kind::Sync { .. } => Ok(()),
        }
    }

    /// Register files for ops that name them by index (the kernel skips the
    /// per-I/O file lookup and reference). No-op on the stand-in.
    pub fn register_files(&mut self, fds: &[RawFd]) -> io::Result<()> {
        match &mut self.kind {
            Kind::Uring(ring) => ring.submitter().register_files(fds),
            Kind::Sync { .. } => Ok(()),
        }
    }

    pub fn backend(&self) -> Backend {
        match self.kind {
            Kind::Uring(_) => Backend::IoUring,
            Kind::Sync { .. } => Backend::Sync,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Queue `op`. With `link`, the next op pushed runs only after this one
    /// succeeds (IOSQE_IO_LINK). Gives the op back if the ring is full.
    pub fn push(&mut self, op: Op, user_data: u64, link: bool) -> Result<(), Op> {
        let Some(slot) = self.free.pop() else {
            return Err(op);
        };
        let mut inflight = InFlight {
            user_data,
            op,
            statx: None,
            how: None,
            _iov: Vec::new(),
        };
        match &mut self.kind {
            Kind::Sync { queued, .. } => {
                queued.push_back((slot, link));
            }
            Kind::Uring(ring) => {
                let mut sqe = build_sqe(&mut inflight).user_data(slot as u64);
                if link {
                    sqe = sqe.flags(squeue::Flags::IO_LINK);
                }
                // SAFETY: every pointer in the SQE points into `inflight`,
                // which stays in its slot (heap buffers don't move) until the
                // completion is reaped.
                let pushed = unsafe { ring.submission().push(&sqe) };
                if pushed.is_err() {
                    // The SQ is full although a slot was free: flush it.
                    let _ = ring.submit();
                    // SAFETY: as above.
                    if unsafe { ring.submission().push(&sqe) }.is_err() {
                        self.free.push(slot);
                        return Err(inflight.op);
                    }
                }
            }
        }
        self.slots[slot] = Some(inflight);
        self.in_flight += 1;
        Ok(())
    }

    /// Submit what is queued and wait until at least `wait` completions
    /// are ready (0: don't wait).
    pub fn submit(&mut self, wait: usize) -> io::Result<()> {
        match &mut self.kind {
            Kind::Uring(ring) => {
                // `wait` counts completions already collected but not yet
                // reaped: waiting in the kernel for those would never end.
                let outstanding = self.in_flight - self.ready.len();
                let want = wait.saturating_sub(self.ready.len()).min(outstanding);
                loop {
                    match ring.submit_and_wait(want) {
                        Ok(_) => break,
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                            // CQ overflow pressure: reap, then go on.
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
                let mut cq = ring.completion();
                cq.sync();
                for cqe in &mut cq {
                    let slot = cqe.user_data() as usize;
                    let inflight = self.slots[slot].take().expect("completion for a live slot");
                    self.free.push(slot);
                    let res = cqe.result();
                    let result = if res < 0 {
                        Err(io::Error::from_raw_os_error(-res))
                    } else {
                        Ok(res as u32)
                    };
                    self.ready.push_back(Done {
                        user_data: inflight.user_data,
                        result,
                        op: inflight.op,
                        statx: inflight.statx,
                    });
                }
            }
            Kind::Sync { queued, fixed } => {
                let mut cancel = false;
                while let Some((slot, link)) = queued.pop_front() {
                    let mut inflight = self.slots[slot].take().expect("queued slot");
                    self.free.push(slot);
                    let result = if cancel {
                        Err(io::Error::from_raw_os_error(libc::ECANCELED))
                    } else {
                        run_sync(&mut inflight, fixed)
                    };
                    // A failed op of a chain cancels the rest of the chain.
                    cancel = link && result.is_err();
                    self.ready.push_back(Done {
                        user_data: inflight.user_data,
                        result,
                        op: inflight.op,
                        statx: inflight.statx,
                    });
                }
            }
        }
        Ok(())
    }

    /// A table of `n` empty fixed-file slots for OpenAt2/WriteSlot/
    /// CloseSlot (replacing any earlier table). Files left in it are closed
    /// when the ring is dropped.
    pub fn register_file_slots(&mut self, n: u32) -> io::Result<()> {
        match &mut self.kind {
            Kind::Uring(ring) => ring.submitter().register_files_sparse(n),
            Kind::Sync { fixed, .. } => {
                close_fixed(fixed);
                *fixed = vec![-1; n as usize];
                Ok(())
            }
        }
    }

    /// Cap the kernel's io-wq worker threads for this ring (bounded work:
    /// regular files; unbounded: sockets and the like). 0 leaves a limit as
    /// it is. No-op without io_uring.
    pub fn max_workers(&mut self, bounded: u32, unbounded: u32) -> io::Result<()> {
        match &mut self.kind {
            Kind::Uring(ring) => ring
                .submitter()
                .register_iowq_max_workers(&mut [bounded, unbounded]),
            Kind::Sync { .. } => Ok(()),
        }
    }

    /// Move finished operations into `out`.
    pub fn reap(&mut self, out: &mut Vec<Done>) {
        self.in_flight -= self.ready.len();
        out.extend(self.ready.drain(..));
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // io_uring closes its own fixed files; the stand-in closes its fds.
        if let Kind::Sync { fixed, .. } = &mut self.kind {
            close_fixed(fixed);
        }
    }
}

fn close_fixed(fixed: &mut [RawFd]) {
    for fd in fixed.iter_mut().filter(|fd| **fd >= 0) {
        // SAFETY: the fd was opened by this ring's stand-in and is owned by it.
        unsafe { libc::close(*fd) };
        *fd = -1;
    }
}

fn iov(b: &mut Buf) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: b.len(),
    }
}

fn build_sqe(f: &mut InFlight) -> squeue::Entry {
    match &mut f.op {
        Op::Read { fd, buf, offset } => {
            opcode::Read::new(types::Fd(*fd), buf.as_mut_ptr(), buf.len() as u32)
                .offset(*offset)
                .build()
        }
        Op::Write { fd, buf, offset } => {
            opcode::Write::new(types::Fd(*fd), buf.as_mut_ptr(), buf.len() as u32)
                .offset(*offset)
                .build()
        }
        Op::Readv { fd, bufs, offset } => {
            f._iov = bufs.iter_mut().map(iov).collect();
            opcode::Readv::new(types::Fd(*fd), f._iov.as_ptr(), f._iov.len() as u32)
                .offset(*offset)
                .build()
        }
        Op::Writev { fd, bufs, offset } => {
            f._iov = bufs.iter_mut().map(iov).collect();
            opcode::Writev::new(types::Fd(*fd), f._iov.as_ptr(), f._iov.len() as u32)
                .offset(*offset)
                .build()
        }
        Op::ReadFixed {
            fd,
            file,
            buf,
            buf_index,
            offset,
        } => {
            let (ptr, len) = (buf.as_mut_ptr(), buf.len() as u32);
            match file {
                Some(i) => opcode::ReadFixed::new(types::Fixed(*i), ptr, len, *buf_index)
                    .offset(*offset)
                    .build(),
                None => opcode::ReadFixed::new(types::Fd(*fd), ptr, len, *buf_index)
                    .offset(*offset)
                    .build(),
            }
        }
        Op::WriteFixed {
            fd,
            file,
            buf,
            buf_index,
            offset,
        } => {
            let (ptr, len) = (buf.as_mut_ptr().cast_const(), buf.len() as u32);
            match file {
                Some(i) => opcode::WriteFixed::new(types::Fixed(*i), ptr, len, *buf_index)
                    .offset(*offset)
                    .build(),
                None => opcode::WriteFixed::new(types::Fd(*fd), ptr, len, *buf_index)
                    .offset(*offset)
                    .build(),
            }
        }
        Op::Fsync { fd, datasync } => {
            let flags = if *datasync {
                types::FsyncFlags::DATASYNC
            } else {
                types::FsyncFlags::empty()
            };
            opcode::Fsync::new(types::Fd(*fd)).flags(flags).build()
        }
        Op::Fallocate {
            fd,
            mode,
            offset,
            len,
        } => opcode::Fallocate::new(types::Fd(*fd), *len)
            .offset(*offset)
            .mode(*mode)
            .build(),
        Op::OpenAt {
            dirfd,
            path,
            flags,
            mode,
        } => opcode::OpenAt::new(types::Fd(*dirfd), path.as_ptr())
            .flags(*flags | libc::O_CLOEXEC)
            .mode(*mode)
            .build(),
        Op::Close { fd } => opcode::Close::new(types::Fd(*fd)).build(),
        Op::Statx {
            dirfd,
            path,
            flags,
            mask,
        } => {
            // SAFETY: statx is plain data; zeroed is a valid value.
            let mut sx: Box<libc::statx> = Box::new(unsafe { std::mem::zeroed() });
            let ptr = (&mut *sx as *mut libc::statx).cast::<types::statx>();
            f.statx = Some(sx);
            opcode::Statx::new(types::Fd(*dirfd), path.as_ptr(), ptr)
                .flags(*flags)
                .mask(*mask)
                .build()
        }
        Op::MkdirAt { dirfd, path, mode } => opcode::MkDirAt::new(types::Fd(*dirfd), path.as_ptr())
            .mode(*mode)
            .build(),
        Op::SymlinkAt {
            target,
            dirfd,
            path,
        } => opcode::SymlinkAt::new(types::Fd(*dirfd), target.as_ptr(), path.as_ptr()).build(),
        Op::LinkAt {
            olddirfd,
            oldpath,
            newdirfd,
            newpath,
            flags,
        } => opcode::LinkAt::new(
            types::Fd(*olddirfd),
            oldpath.as_ptr(),
            types::Fd(*newdirfd),
            newpath.as_ptr(),
        )
        .flags(*flags)
        .build(),
        Op::RenameAt {
            olddirfd,
            oldpath,
            newdirfd,
            newpath,
            flags,
        } => opcode::RenameAt::new(
            types::Fd(*olddirfd),
            oldpath.as_ptr(),
            types::Fd(*newdirfd),
            newpath.as_ptr(),
        )
        .flags(*flags)
        .build(),
        Op::UnlinkAt { dirfd, path, flags } => {
            opcode::UnlinkAt::new(types::Fd(*dirfd), path.as_ptr())
                .flags(*flags)
                .build()
        }
        Op::OpenAt2 {
            dirfd,
            path,
            flags,
            mode,
            resolve,
            slot,
        } => {
            // The kernel reads open_how when the SQE is submitted, later
            // than this push: it lives in the in-flight slot until then.
            // A fixed slot is no fd: the kernel refuses O_CLOEXEC for it.
            let cloexec = if slot.is_some() { 0 } else { libc::O_CLOEXEC };
            let how = types::OpenHow::new()
                .flags((*flags | cloexec) as u64)
                .mode(*mode as u64)
                .resolve(*resolve);
            f.how = Some(Box::new(how));
            let how_ptr: *const types::OpenHow = &**f.how.as_ref().unwrap();
            let mut op = opcode::OpenAt2::new(types::Fd(*dirfd), path.as_ptr(), how_ptr);
            if let Some(s) = slot {
                op = op.file_index(Some(
                    types::DestinationSlot::try_from_slot_target(*s).expect("slot in range"),
                ));
            }
            op.build()
        }
        Op::WriteSlot { slot, buf, offset } => {
            opcode::Write::new(types::Fixed(*slot), buf.as_mut_ptr(), buf.len() as u32)
                .offset(*offset)
                .build()
        }
        Op::CloseSlot { slot } => opcode::Close::new(types::Fixed(*slot)).build(),
    }
}

fn cvt(r: isize) -> io::Result<u32> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u32)
    }
}

/// The same operation as one plain syscall.
fn run_sync(f: &mut InFlight, fixed: &mut [RawFd]) -> io::Result<u32> {
    // SAFETY (whole function): each call gets valid fds, NUL-terminated
    // paths and buffers owned by the op, exactly as the io_uring path does.
    unsafe {
        match &mut f.op {
            Op::Read { fd, buf, offset } => cvt(libc::pread(
                *fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                *offset as i64,
            )),
            Op::Write { fd, buf, offset } => cvt(libc::pwrite(
                *fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                *offset as i64,
            )),
            Op::Readv { fd, bufs, offset } => {
                let v: Vec<libc::iovec> = bufs.iter_mut().map(iov).collect();
                cvt(libc::preadv(
                    *fd,
                    v.as_ptr(),
                    v.len() as i32,
                    *offset as i64,
                ))
            }
            Op::Writev { fd, bufs, offset } => {
                let v: Vec<libc::iovec> = bufs.iter_mut().map(iov).collect();
                cvt(libc::pwritev(
                    *fd,
                    v.as_ptr(),
                    v.len() as i32,
                    *offset as i64,
                ))
            }
            Op::ReadFixed {
                fd, buf, offset, ..
            } => cvt(libc::pread(
                *fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                *offset as i64,
            )),
            Op::WriteFixed {
                fd, buf, offset, ..
            } => cvt(libc::pwrite(
                *fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                *offset as i64,
            )),
            Op::Fsync { fd, datasync } => cvt(if *datasync {
                libc::fdatasync(*fd)
            } else {
                libc::fsync(*fd)
            } as isize),
            Op::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => cvt(libc::fallocate(*fd, *mode, *offset as i64, *len as i64) as isize),
            Op::OpenAt {
                dirfd,
                path,
                flags,
                mode,
            } => cvt(libc::openat(*dirfd, path.as_ptr(), *flags | libc::O_CLOEXEC, *mode) as isize),
            Op::Close { fd } => cvt(libc::close(*fd) as isize),
            Op::Statx {
                dirfd,
                path,
                flags,
                mask,
            } => {
                let mut sx: Box<libc::statx> = Box::new(std::mem::zeroed());
                let r = cvt(libc::statx(*dirfd, path.as_ptr(), *flags, *mask, &mut *sx) as isize);
                f.statx = Some(sx);
                r
            }
            Op::MkdirAt { dirfd, path, mode } => {
                cvt(libc::mkdirat(*dirfd, path.as_ptr(), *mode) as isize)
            }
            Op::SymlinkAt {
                target,
                dirfd,
                path,
            } => cvt(libc::symlinkat(target.as_ptr(), *dirfd, path.as_ptr()) as isize),
            Op::LinkAt {
                olddirfd,
                oldpath,
                newdirfd,
                newpath,
                flags,
            } => cvt(libc::linkat(
                *olddirfd,
                oldpath.as_ptr(),
                *newdirfd,
                newpath.as_ptr(),
                *flags,
            ) as isize),
            Op::RenameAt {
                olddirfd,
                oldpath,
                newdirfd,
                newpath,
                flags,
            } => cvt(libc::syscall(
                libc::SYS_renameat2,
                *olddirfd,
                oldpath.as_ptr(),
                *newdirfd,
                newpath.as_ptr(),
                *flags,
            ) as isize),
            Op::UnlinkAt { dirfd, path, flags } => {
                cvt(libc::unlinkat(*dirfd, path.as_ptr(), *flags) as isize)
            }
            Op::OpenAt2 {
                dirfd,
                path,
                flags,
                mode,
                resolve,
                slot,
            } => {
                let target = match slot {
                    Some(s) => Some(fixed.get_mut(*s as usize).ok_or_else(ebadf)?),
                    None => None,
                };
                let fd = cstore_os::sys::openat2(*dirfd, path, *flags, *mode, *resolve)
                    .map(std::os::fd::IntoRawFd::into_raw_fd)?;
                match target {
                    Some(t) => {
                        // As io_uring does: installing replaces what was there.
                        if *t >= 0 {
                            libc::close(*t);
                        }
                        *t = fd;
                        Ok(0)
                    }
                    None => Ok(fd as u32),
                }
            }
            Op::WriteSlot { slot, buf, offset } => {
                let fd = fixed_fd(fixed, *slot)?;
                cvt(libc::pwrite(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    *offset as i64,
                ))
            }
            Op::CloseSlot { slot } => {
                let fd = fixed_fd(fixed, *slot)?;
                fixed[*slot as usize] = -1;
                cvt(libc::close(fd) as isize)
            }
        }
    }
}

fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

fn fixed_fd(fixed: &[RawFd], slot: u32) -> io::Result<RawFd> {
    match fixed.get(slot as usize) {
        Some(&fd) if fd >= 0 => Ok(fd),
        _ => Err(ebadf()),
    }
}
