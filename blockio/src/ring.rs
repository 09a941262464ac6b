//! One submission/completion ring, owned by one thread: io_uring when the
//! kernel allows it, else a synchronous stand-in that runs the same ops with
//! plain syscalls (same API, same results), used when io_uring is refused
//! (ENOSYS, EPERM, `kernel.io_uring_disabled`) or forced by
//! `CSTORE_BLOCKIO=sync`.

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
    /// iovecs for Readv/Writev, pointing into the op's buffers.
    _iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `_iov` point into buffers owned by `op` in the
// same struct; they move together and are only used by the kernel.
unsafe impl Send for InFlight {}

/// Which backend to ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// io_uring unless refused or `CSTORE_BLOCKIO=sync`.
    Auto,
    /// Plain syscalls (the fallback), e.g. to test both paths.
    Sync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    IoUring,
    Sync,
}

enum Kind {
    Uring(Box<IoUring>),
    Sync { queued: VecDeque<(usize, bool)> },
}

pub struct Ring {
    kind: Kind,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    ready: VecDeque<Done>,
    in_flight: usize,
}

static FALLBACK_LOGGED: Once = Once::new();

/// Whether io_uring is to be tried at all.
fn uring_allowed() -> bool {
    if std::env::var("CSTORE_BLOCKIO").is_ok_and(|v| v == "sync") {
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
                    }
                }
            }
        } else {
            FALLBACK_LOGGED.call_once(|| {
                tracing::warn!("io_uring disabled (kernel.io_uring_disabled=2 or CSTORE_BLOCKIO=sync); using plain syscalls instead");
            });
            Kind::Sync {
                queued: VecDeque::new(),
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
            _iov: Vec::new(),
        };
        match &mut self.kind {
            Kind::Sync { queued } => {
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
            Kind::Sync { queued } => {
                let mut cancel = false;
                while let Some((slot, link)) = queued.pop_front() {
                    let mut inflight = self.slots[slot].take().expect("queued slot");
                    self.free.push(slot);
                    let result = if cancel {
                        Err(io::Error::from_raw_os_error(libc::ECANCELED))
                    } else {
                        run_sync(&mut inflight)
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

    /// Move finished operations into `out`.
    pub fn reap(&mut self, out: &mut Vec<Done>) {
        self.in_flight -= self.ready.len();
        out.extend(self.ready.drain(..));
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
fn run_sync(f: &mut InFlight) -> io::Result<u32> {
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
        }
    }
}
