//! `cstore bench io`: fio's job model on cstore's rings. Each job is a
//! thread owning one ring and keeping `qd` I/Os in flight on the target (a
//! file or a block device), for a fixed time; latencies are measured per
//! I/O, from submission to completion, as fio's clat+slat.

use cstore_os::IoError;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::buf::{AlignedBuf, Buf};
use crate::error::Result;
use crate::ring::{Backend, Done, Mode, Op, Ring};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    RandRead,
    RandWrite,
    Read,
    Write,
}

impl std::str::FromStr for Rw {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Rw, String> {
        match s {
            "randread" => Ok(Rw::RandRead),
            "randwrite" => Ok(Rw::RandWrite),
            "read" => Ok(Rw::Read),
            "write" => Ok(Rw::Write),
            _ => Err(format!(
                "unknown --rw {s:?}: randread, randwrite, read or write"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct IoBench {
    pub path: PathBuf,
    pub rw: Rw,
    pub bs: usize,
    pub qd: u32,
    pub jobs: usize,
    pub size: u64,
    pub direct: bool,
    pub runtime: Duration,
    pub mode: Mode,
    /// Registered buffers and file (READ_FIXED/WRITE_FIXED on a fixed file):
    /// no per-I/O page pinning or file lookup. io_uring only.
    pub register: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct IoBenchResult {
    pub backend: Backend,
    /// Whether registered buffers and file were used.
    pub registered: bool,
    pub ios: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mb_per_s: f64,
    pub lat_us_p50: f64,
    pub lat_us_p99: f64,
    pub lat_us_p999: f64,
}

fn open(b: &IoBench) -> Result<(File, u64)> {
    let writes = matches!(b.rw, Rw::RandWrite | Rw::Write);
    let mut o = OpenOptions::new();
    o.read(true)
        .write(writes || !b.path.exists())
        .create(!b.path.exists());
    if b.direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = o
        .open(&b.path)
        .map_err(|e| IoError::new("open", &b.path, e))?;
    let meta = f.metadata().map_err(|e| IoError::new("stat", &b.path, e))?;
    let size = if meta.file_type().is_block_device() {
        let mut sz = 0u64;
        // SAFETY: BLKGETSIZE64 writes a u64.
        unsafe { libc::ioctl(f.as_raw_fd(), 0x8008_1272, &mut sz) };
        b.size.min(sz)
    } else {
        if meta.len() < b.size {
            // Lay the file out first, as fio does, so reads read data.
            lay_out(&b.path, b.size)?;
        }
        b.size
    };
    Ok((f, size / b.bs as u64 * b.bs as u64))
}

fn lay_out(path: &PathBuf, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| IoError::new("open", path, e))?;
    let chunk = vec![0xa5u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .map_err(|e| IoError::new("write", path, e))?;
        left -= n as u64;
    }
    f.sync_all()
        .map_err(|e| IoError::new("fsync", path, e).into())
}

struct Job {
    registered: bool,
    lat_ns: Vec<u32>,
    ios: u64,
    backend: Backend,
}

fn job(b: &IoBench, fd: i32, size: u64, seed: u64) -> Result<Job> {
    let mut ring = Ring::new(b.qd, false, b.mode);
    let blocks = (size / b.bs as u64).max(1);
    let mut rng = seed | 1;
    let mut next_seq = (seed % blocks) * b.bs as u64;
    let mut next_off = |rng: &mut u64| -> u64 {
        match b.rw {
            Rw::Read | Rw::Write => {
                let o = next_seq;
                next_seq = (next_seq + b.bs as u64) % (blocks * b.bs as u64);
                o
            }
            _ => {
                // xorshift64*: cheap and good enough to spread offsets.
                *rng ^= *rng >> 12;
                *rng ^= *rng << 25;
                *rng ^= *rng >> 27;
                (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks) * b.bs as u64
            }
        }
    };
    // Buffer i belongs to tag i: it is registered as index i, and a
    // completion's tag says where its buffer goes back.
    let mut owned: Vec<Buf> = (0..b.qd)
        .map(|_| {
            if b.direct {
                Buf::Aligned(AlignedBuf::new(b.bs, 4096))
            } else {
                Buf::Heap(vec![0x5a; b.bs])
            }
        })
        .collect();
    let fixed = b.register && ring.backend() == Backend::IoUring;
    if fixed {
        // SAFETY: the buffers live in `bufs` (or in ops in flight) until
        // the ring is dropped at the end of this function.
        unsafe { ring.register_buffers(&mut owned) }
            .map_err(|e| IoError::new("io_uring register buffers", &b.path, e))?;
        ring.register_files(&[fd])
            .map_err(|e| IoError::new("io_uring register files", &b.path, e))?;
    }
    let mut bufs: Vec<Option<Buf>> = owned.into_iter().map(Some).collect();
    let make = |buf: Buf, tag: u64, offset: u64| {
        let (file, buf_index) = (Some(0), tag as u16);
        match (b.rw, fixed) {
            (Rw::RandRead | Rw::Read, false) => Op::Read { fd, buf, offset },
            (Rw::RandWrite | Rw::Write, false) => Op::Write { fd, buf, offset },
            (Rw::RandRead | Rw::Read, true) => Op::ReadFixed {
                fd,
                file,
                buf,
                buf_index,
                offset,
            },
            (Rw::RandWrite | Rw::Write, true) => Op::WriteFixed {
                fd,
                file,
                buf,
                buf_index,
                offset,
            },
        }
    };
    let give_back = |op: Op| match op {
        Op::Read { buf, .. }
        | Op::Write { buf, .. }
        | Op::ReadFixed { buf, .. }
        | Op::WriteFixed { buf, .. } => buf,
        _ => unreachable!("the bench submits reads and writes only"),
    };
    let mut started = vec![Instant::now(); b.qd as usize];
    let mut free: Vec<u64> = (0..b.qd as u64).collect();
    let mut lat_ns = Vec::with_capacity(1 << 20);
    let mut ios = 0u64;
    let mut done: Vec<Done> = Vec::new();
    let deadline = Instant::now() + b.runtime;
    loop {
        let running = Instant::now() < deadline;
        while running && !free.is_empty() {
            let tag = free.pop().unwrap();
            let buf = bufs[tag as usize].take().expect("a buffer per tag");
            started[tag as usize] = Instant::now();
            if let Err(op) = ring.push(make(buf, tag, next_off(&mut rng)), tag, false) {
                free.push(tag);
                bufs[tag as usize] = Some(give_back(op));
                break;
            }
        }
        if ring.in_flight() == 0 {
            break;
        }
        ring.submit(1)
            .map_err(|e| IoError::new("io_uring_enter", &b.path, e))?;
        ring.reap(&mut done);
        let now = Instant::now();
        for d in done.drain(..) {
            let n = d.result.map_err(|e| IoError::new("I/O", &b.path, e))?;
            if n as usize != b.bs {
                return Err(IoError::new(
                    "I/O",
                    &b.path,
                    std::io::Error::other(format!("short I/O: {n} of {} bytes", b.bs)),
                )
                .into());
            }
            lat_ns.push(
                (now - started[d.user_data as usize])
                    .as_nanos()
                    .min(u32::MAX as u128) as u32,
            );
            ios += 1;
            free.push(d.user_data);
            bufs[d.user_data as usize] = Some(give_back(d.op));
        }
    }
    let backend = ring.backend();
    // The ring (and its registration) goes before the buffers.
    drop(ring);
    drop(bufs);
    Ok(Job {
        registered: fixed,
        lat_ns,
        ios,
        backend,
    })
}

pub fn run(b: &IoBench) -> Result<IoBenchResult> {
    let (file, size) = open(b)?;
    let fd = file.as_raw_fd();
    let start = Instant::now();
    let jobs: Vec<Result<Job>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..b.jobs.max(1))
            .map(|j| {
                s.spawn(move || {
                    job(
                        b,
                        fd,
                        size,
                        0x9e37_79b9_7f4a_7c15 ^ ((j as u64 + 1) * 0x1234_5678),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench job"))
            .collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut lat: Vec<u32> = Vec::new();
    let mut ios = 0;
    let mut backend = Backend::IoUring;
    let mut registered = true;
    for j in jobs {
        let j = j?;
        registered &= j.registered;
        ios += j.ios;
        backend = j.backend;
        lat.extend(j.lat_ns);
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0
    };
    drop(file);
    Ok(IoBenchResult {
        backend,
        registered,
        ios,
        seconds,
        iops: ios as f64 / seconds,
        mb_per_s: ios as f64 * b.bs as f64 / seconds / 1e6,
        lat_us_p50: pct(0.50),
        lat_us_p99: pct(0.99),
        lat_us_p999: pct(0.999),
    })
}
