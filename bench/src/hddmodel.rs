//! A disk with seeks: a FUSE filesystem of our own serving one file, the
//! disk image, whose every READ and WRITE is answered after the time a
//! 7200 rpm disk would take (docs/hddmodel.md). The emulated HDD class is a
//! loop device (direct I/O) over that file, so what reaches the "disk" is
//! what the block layer sends after merging, and the order of requests
//! costs what it costs on a disk: a request that starts where the previous
//! one ended pays only its transfer; any other pays a seek and a wait for
//! the sector to come round.
//!
//! One head: requests are served one at a time in the order they arrive
//! (FIFO, no NCQ reordering). The kernel sends one at a time anyway: the
//! connection does not negotiate async direct I/O, so the loop device's
//! worker waits for each request before it sends the next.
//!
//! The data lives in a file on tmpfs (the suite's backing directory);
//! FALLOCATE (the loop device's discards: fstrim, mkfs) is passed on to it
//! at no modelled cost, so removed data gives its memory back.
//!
//! The protocol subset is small and write-capable, which fuse-fs's
//! read-only loop is not; the wire structs are written here by hand (FUSE
//! 7.31 layout, what this needs).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The disk the model stands for, and how long a request takes on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Bytes of the disk (the image file's size; the seek distance is a
    /// fraction of it).
    pub capacity: u64,
    /// Any seek's fixed part (head settle, track to track), microseconds.
    pub settle_us: u64,
    /// A full-stroke seek on top of the settle, microseconds; a seek over
    /// a fraction f of the disk costs settle + full_stroke × sqrt(f).
    pub full_stroke_us: u64,
    pub rpm: u64,
    /// Media transfer rate, bytes per second.
    pub transfer_bps: u64,
}

impl Params {
    /// A 7200 rpm desktop disk, calibrated so that fio on the class (4 KiB
    /// random reads over a 1 GiB file of a 16 GiB disk) gets ~150 IOPS and
    /// 1 MiB sequential requests ~150 MB/s (docs/hddmodel.md).
    pub fn hdd(capacity: u64) -> Params {
        Params {
            capacity,
            settle_us: 800,
            full_stroke_us: 12_000,
            rpm: 7200,
            transfer_bps: 150_000_000,
        }
    }

    /// One revolution, microseconds.
    pub fn revolution_us(&self) -> u64 {
        60_000_000 / self.rpm.max(1)
    }

    /// The service time of a request of `len` bytes at `offset`, the head
    /// having ended the previous request at `head`.
    pub fn service(&self, head: u64, offset: u64, len: u64) -> Service {
        let transfer_us = len.saturating_mul(1_000_000) / self.transfer_bps.max(1);
        if offset == head {
            return Service {
                seek_us: 0,
                rotation_us: 0,
                transfer_us,
            };
        }
        let dist = offset.abs_diff(head) as f64 / self.capacity.max(1) as f64;
        let seek_us = self.settle_us + (self.full_stroke_us as f64 * dist.min(1.0).sqrt()) as u64;
        // Where the sector is when the head arrives: deterministic, spread
        // evenly over one revolution by a hash of the offset (the same
        // request costs the same every run).
        let rotation_us = mix(offset) % self.revolution_us().max(1);
        Service {
            seek_us,
            rotation_us,
            transfer_us,
        }
    }
}

/// What one request costs, microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    pub seek_us: u64,
    pub rotation_us: u64,
    pub transfer_us: u64,
}

impl Service {
    pub fn total(&self) -> Duration {
        Duration::from_micros(self.seek_us + self.rotation_us + self.transfer_us)
    }
}

/// splitmix64's finalizer.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the model served, for a run's log.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    /// Requests that did not start where the previous one ended.
    pub seeks: u64,
    /// Modelled time the head was busy, microseconds.
    pub busy_us: u64,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
    seeks: AtomicU64,
    busy_us: AtomicU64,
}

/// The file the loop device is attached to.
pub const DISK_NAME: &str = "disk";

/// A running model: `mountpoint/disk` is the disk. Stopped on drop.
pub struct HddModel {
    mountpoint: PathBuf,
    mounted: bool,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    pub params: Params,
}

/// What a disk streams ahead of the host on sequential I/O.
const TRACK_BUFFER: u64 = 1 << 20;
const FSTYPE: &str = "fuse.cstore-hdd";
/// The largest READ/WRITE the kernel sends (and the loop device's largest
/// request: 1 MiB).
const MAX_IO: usize = 1 << 20;

impl HddModel {
    /// Mount the model on `mountpoint` (an empty directory), its data in
    /// `backing` (created, sized to `params.capacity`, sparse).
    pub fn start(mountpoint: &Path, backing: &Path, params: Params) -> Result<HddModel> {
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(backing)
            .map_err(|e| Error::io("create", backing, e))?;
        data.set_len(params.capacity)
            .map_err(|e| Error::io("size", backing, e))?;
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| Error::io("open", "/dev/fuse", e))?;
        let opts = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
            dev.as_raw_fd()
        );
        let c = |s: &[u8]| {
            CString::new(s)
                .map_err(|_| Error::Invalid(format!("{} has a NUL", mountpoint.display())))
        };
        let (target, fstype, data_opts) = (
            c(mountpoint.as_os_str().as_bytes())?,
            c(FSTYPE.as_bytes())?,
            c(opts.as_bytes())?,
        );
        // SAFETY: NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                data_opts.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(Error::io(
                "mount the HDD model on",
                mountpoint,
                std::io::Error::last_os_error(),
            ));
        }
        let shared = Arc::new(Shared::default());
        let server = Server {
            dev: OwnedFd::from(dev),
            data,
            params: params.clone(),
            shared: shared.clone(),
            head: 0,
            free_at: Instant::now(),
            trace: std::env::var_os("CSTORE_HDD_MODEL_TRACE").is_some(),
            rbuf: vec![0; MAX_IO],
            read_reply: None,
            received: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("hdd-model".into())
            .spawn(move || server.run())
            .map_err(|e| Error::io("spawn the HDD model's thread for", mountpoint, e))?;
        Ok(HddModel {
            mountpoint: mountpoint.to_path_buf(),
            mounted: true,
            shared,
            thread: Some(thread),
            params,
        })
    }

    /// The disk image, for `losetup`.
    pub fn disk(&self) -> PathBuf {
        self.mountpoint.join(DISK_NAME)
    }

    pub fn counters(&self) -> Counters {
        let s = &self.shared;
        Counters {
            reads: s.reads.load(Ordering::Relaxed),
            read_bytes: s.read_bytes.load(Ordering::Relaxed),
            writes: s.writes.load(Ordering::Relaxed),
            write_bytes: s.write_bytes.load(Ordering::Relaxed),
            seeks: s.seeks.load(Ordering::Relaxed),
            busy_us: s.busy_us.load(Ordering::Relaxed),
        }
    }

    /// Unmount (the loop device must be detached first) and end the
    /// server; its closing /dev/fuse aborts the connection, so nothing
    /// waits on the model after this even if the unmount failed.
    pub fn stop(&mut self) -> Result<()> {
        let mut res = Ok(());
        if self.mounted {
            self.mounted = false;
            res = crate::sys::umount(&self.mountpoint);
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        res
    }
}

impl Drop for HddModel {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("cstore bench: stopping the HDD model: {e}");
        }
    }
}

struct Server {
    dev: OwnedFd,
    data: File,
    params: Params,
    shared: Arc<Shared>,
    /// Where the last request ended.
    head: u64,
    /// When the head is done with what it was given.
    free_at: Instant,
    /// Every request on stderr (CSTORE_HDD_MODEL_TRACE=1).
    trace: bool,
    /// READ's data, and how much of it is the reply.
    rbuf: Vec<u8>,
    read_reply: Option<usize>,
    /// When the request being handled was read from /dev/fuse.
    received: Instant,
}

// Opcodes and wire sizes (include/uapi/linux/fuse.h).
const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const FSYNC: u32 = 20;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const RELEASEDIR: u32 = 29;
const INTERRUPT: u32 = 36;
const DESTROY: u32 = 38;
const BATCH_FORGET: u32 = 42;
const FALLOCATE: u32 = 43;
const IN_HEADER: usize = 40;
const FOPEN_DIRECT_IO: u32 = 1;
const INIT_BIG_WRITES: u32 = 1 << 5;
const INIT_MAX_PAGES: u32 = 1 << 22;
const DISK_ID: u64 = 2;

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

impl Server {
    fn run(mut self) {
        // The model's time is its sleeps: woken late by a busy machine's
        // scheduler it would be a slower disk. Real-time priority (it
        // sleeps nearly always, so it takes little) where allowed.
        let prio = libc::sched_param { sched_priority: 1 };
        // SAFETY: this thread, a valid sched_param.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &prio) };
        let mut buf = vec![0u8; MAX_IO + 4096];
        let mut out = Vec::with_capacity(MAX_IO + 16);
        loop {
            if self.shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let mut pfd = libc::pollfd {
                fd: self.dev.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
                continue;
            }
            // SAFETY: reading into a buffer of buf.len() bytes.
            let n = unsafe { libc::read(self.dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
                    // ENODEV: unmounted, the connection is gone.
                    _ => return,
                }
            }
            self.received = Instant::now();
            let req = &buf[..n as usize];
            let (Some(opcode), Some(unique), Some(nodeid)) =
                (u32_at(req, 4), u64_at(req, 8), u64_at(req, 16))
            else {
                continue;
            };
            let body = req.get(IN_HEADER..).unwrap_or(&[]);
            out.clear();
            let err = self.handle(opcode, nodeid, body, &mut out);
            match (opcode, err) {
                (FORGET | BATCH_FORGET | INTERRUPT, _) => continue,
                (_, Some(e)) => {
                    out.clear();
                    self.reply(unique, -e, &[])
                }
                (_, None) if self.read_reply.is_some() => {
                    let len = self.read_reply.take().unwrap_or(0);
                    self.reply(unique, 0, &self.rbuf[..len]);
                }
                (_, None) => {
                    let o = std::mem::take(&mut out);
                    self.reply(unique, 0, &o);
                    out = o;
                }
            }
            if opcode == DESTROY {
                return;
            }
        }
    }

    fn reply(&self, unique: u64, error: i32, body: &[u8]) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&((16 + body.len()) as u32).to_le_bytes());
        h[4..8].copy_from_slice(&error.to_le_bytes());
        h[8..16].copy_from_slice(&unique.to_le_bytes());
        let iov = [
            libc::iovec {
                iov_base: h.as_ptr() as *mut _,
                iov_len: 16,
            },
            libc::iovec {
                iov_base: body.as_ptr() as *mut _,
                iov_len: body.len(),
            },
        ];
        // SAFETY: two iovecs over live buffers. A failed reply (the request
        // was interrupted, the connection aborted) needs nothing from us.
        unsafe { libc::writev(self.dev.as_raw_fd(), iov.as_ptr(), 2) };
    }

    /// The reply's body into `out`, or an errno.
    fn handle(&mut self, opcode: u32, nodeid: u64, body: &[u8], out: &mut Vec<u8>) -> Option<i32> {
        match opcode {
            INIT => {
                let major = u32_at(body, 0)?;
                if major != 7 {
                    return Some(libc::EPROTO);
                }
                let kflags = u32_at(body, 12).unwrap_or(0);
                let flags = kflags & (INIT_BIG_WRITES | INIT_MAX_PAGES);
                out.extend_from_slice(&7u32.to_le_bytes());
                out.extend_from_slice(&31u32.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes()); // max_readahead
                out.extend_from_slice(&flags.to_le_bytes());
                out.extend_from_slice(&1u16.to_le_bytes()); // max_background
                out.extend_from_slice(&1u16.to_le_bytes()); // congestion_threshold
                out.extend_from_slice(&(MAX_IO as u32).to_le_bytes()); // max_write
                out.extend_from_slice(&1u32.to_le_bytes()); // time_gran
                out.extend_from_slice(&((MAX_IO / 4096) as u16).to_le_bytes()); // max_pages
                out.extend_from_slice(&[0u8; 2 + 4 + 4 + 24]);
                None
            }
            LOOKUP => {
                let name = body.split(|&b| b == 0).next().unwrap_or(&[]);
                if nodeid != 1 || name != DISK_NAME.as_bytes() {
                    return Some(libc::ENOENT);
                }
                out.extend_from_slice(&DISK_ID.to_le_bytes());
                out.extend_from_slice(&0u64.to_le_bytes()); // generation
                out.extend_from_slice(&3600u64.to_le_bytes()); // entry_valid
                out.extend_from_slice(&3600u64.to_le_bytes()); // attr_valid
                out.extend_from_slice(&[0u8; 8]);
                self.attr(DISK_ID, out);
                None
            }
            GETATTR | SETATTR => {
                if opcode == SETATTR {
                    // Only what losetup or an open(O_TRUNC) could ask: the
                    // disk's size is fixed, the rest is not kept.
                    let valid = u32_at(body, 0)?;
                    const FATTR_SIZE: u32 = 1 << 3;
                    if valid & FATTR_SIZE != 0 && u64_at(body, 16)? != self.params.capacity {
                        return Some(libc::EPERM);
                    }
                }
                if nodeid != 1 && nodeid != DISK_ID {
                    return Some(libc::ENOENT);
                }
                out.extend_from_slice(&3600u64.to_le_bytes());
                out.extend_from_slice(&[0u8; 8]);
                self.attr(nodeid, out);
                None
            }
            OPEN | OPENDIR => {
                out.extend_from_slice(&0u64.to_le_bytes());
                let flags = if opcode == OPEN { FOPEN_DIRECT_IO } else { 0 };
                out.extend_from_slice(&flags.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                None
            }
            RELEASE | RELEASEDIR | FLUSH | FSYNC | DESTROY => None,
            FORGET | BATCH_FORGET | INTERRUPT => None,
            STATFS => {
                let blocks = self.params.capacity / 4096;
                for v in [blocks, 0, 0, 2, 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                for v in [4096u32, 255, 4096, 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&[0u8; 24]);
                None
            }
            READ => {
                let (off, size) = (u64_at(body, 8)?, u32_at(body, 16)? as usize);
                let len = size
                    .min(MAX_IO)
                    .min(self.params.capacity.saturating_sub(off) as usize);
                // From a buffer zeroed once: 1 MiB zeroed per request would
                // be time the model does not count.
                if let Err(e) = self.data.read_exact_at(&mut self.rbuf[..len], off) {
                    return Some(e.raw_os_error().unwrap_or(libc::EIO));
                }
                self.serve(off, len as u64, false);
                self.read_reply = Some(len);
                None
            }
            WRITE => {
                let (off, size) = (u64_at(body, 8)?, u32_at(body, 16)? as usize);
                let data = body.get(40..40 + size)?;
                if off.saturating_add(size as u64) > self.params.capacity {
                    return Some(libc::ENOSPC);
                }
                if let Err(e) = self.data.write_all_at(data, off) {
                    return Some(e.raw_os_error().unwrap_or(libc::EIO));
                }
                self.serve(off, size as u64, true);
                out.extend_from_slice(&(size as u32).to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                None
            }
            FALLOCATE => {
                let (off, len, mode) = (u64_at(body, 8)?, u64_at(body, 16)?, u32_at(body, 24)?);
                // Discards and zeroing are the emulation's memory, not the
                // disk's time: not modelled.
                // SAFETY: fallocate on an fd we own.
                let r = unsafe {
                    libc::fallocate(self.data.as_raw_fd(), mode as i32, off as i64, len as i64)
                };
                if r != 0 {
                    return Some(
                        std::io::Error::last_os_error()
                            .raw_os_error()
                            .unwrap_or(libc::EIO),
                    );
                }
                None
            }
            _ => Some(libc::ENOSYS),
        }
    }

    fn attr(&self, nodeid: u64, out: &mut Vec<u8>) {
        let (size, mode, nlink) = if nodeid == DISK_ID {
            (self.params.capacity, libc::S_IFREG | 0o600, 1u32)
        } else {
            (0, libc::S_IFDIR | 0o700, 2)
        };
        out.extend_from_slice(&nodeid.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&size.div_ceil(512).to_le_bytes());
        out.extend_from_slice(&[0u8; 24 + 12]); // times
        out.extend_from_slice(&mode.to_le_bytes());
        out.extend_from_slice(&nlink.to_le_bytes());
        out.extend_from_slice(&[0u8; 12]); // uid, gid, rdev
        out.extend_from_slice(&4096u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }

    /// Hold the request until the modelled disk is done with it. Sleeps:
    /// the head's timeline runs on from where the previous request ended
    /// (or from now if it was idle), so the time spent in the kernel and
    /// here between requests is absorbed when requests queue.
    fn serve(&mut self, off: u64, len: u64, write: bool) {
        let s = self.params.service(self.head, off, len);
        let sh = &self.shared;
        if s.seek_us > 0 {
            sh.seeks.fetch_add(1, Ordering::Relaxed);
        }
        if write {
            sh.writes.fetch_add(1, Ordering::Relaxed);
            sh.write_bytes.fetch_add(len, Ordering::Relaxed);
        } else {
            sh.reads.fetch_add(1, Ordering::Relaxed);
            sh.read_bytes.fetch_add(len, Ordering::Relaxed);
        }
        let t = s.total();
        if self.trace {
            eprintln!(
                "{} {off} {len} seek {} rot {} xfer {}",
                if write { 'W' } else { 'R' },
                s.seek_us,
                s.rotation_us,
                s.transfer_us
            );
        }
        sh.busy_us
            .fetch_add(t.as_micros() as u64, Ordering::Relaxed);
        self.head = off + len;
        // From when the request arrived: copying its data is part of its
        // service, not extra. A request that goes on where the last one
        // ended was being streamed while the host turned around (a disk's
        // track buffer and write cache), up to TRACK_BUFFER's worth: the
        // kernel sends one request at a time, so without this every
        // sequential request would also pay the round trip through the
        // loop device's worker and this thread's wakeup.
        let start = self.free_at.max(self.received);
        let done = if s.seek_us == 0 && s.rotation_us == 0 {
            let idle = self.received.saturating_duration_since(self.free_at);
            let buffered = self.params.service(0, 0, TRACK_BUFFER).total();
            (start + t)
                .checked_sub(idle.min(buffered).min(t))
                .unwrap_or(start)
        } else {
            start + t
        };
        self.free_at = done;
        if let Some(d) = done.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_sequential_request_costs_its_transfer_only() {
        let p = Params::hdd(16 * GIB);
        let s = p.service(10 * GIB, 10 * GIB, 1 << 20);
        assert_eq!((s.seek_us, s.rotation_us), (0, 0));
        // 1 MiB at 150 MB/s.
        assert_eq!(s.transfer_us, 6990);
    }

    #[test]
    fn a_random_request_pays_a_seek_and_a_rotation() {
        let p = Params::hdd(16 * GIB);
        let near = p.service(0, 4096 * 2, 4096);
        let far = p.service(0, 16 * GIB - 4096, 4096);
        // 8 KiB away: the settle, and the stroke's sqrt of a tiny fraction.
        assert!((p.settle_us..p.settle_us + 10).contains(&near.seek_us));
        assert_eq!(far.seek_us, p.settle_us + p.full_stroke_us - 1);
        assert!(near.rotation_us < p.revolution_us());
        // The same request costs the same every time.
        assert_eq!(p.service(0, 16 * GIB - 4096, 4096), far);
        // Backwards costs as forwards.
        assert_eq!(
            p.service(8 * GIB, 4 * GIB, 4096).seek_us,
            p.service(0, 4 * GIB, 4096).seek_us
        );
    }

    #[test]
    fn random_4k_over_a_gib_averages_near_150_iops() {
        // fio's 4 KiB random reads over a 1 GiB file on a 16 GiB disk: the
        // calibration (docs/hddmodel.md), counted over the model's own
        // service times, not timed.
        let p = Params::hdd(16 * GIB);
        let mut head = 0;
        let mut total = 0u64;
        let n = 20_000u64;
        let base = 3 * GIB;
        for i in 0..n {
            let off = base + (mix(i ^ 0x5eed) % (GIB / 4096)) * 4096;
            let s = p.service(head, off, 4096);
            total += s.seek_us + s.rotation_us + s.transfer_us;
            head = off + 4096;
        }
        let iops = n as f64 * 1e6 / total as f64;
        assert!((140.0..170.0).contains(&iops), "{iops:.1} IOPS");
        // Average rotational wait is half a revolution (4.17 ms at 7200 rpm).
        assert_eq!(p.revolution_us(), 8333);
    }
}
