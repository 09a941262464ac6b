//! `cstore device selfcheck`: the engine end to end on a real file or
//! device. A pattern that encodes each word's offset is written through the
//! engine (the policy's rings, depth and I/O size; O_DIRECT when the policy
//! says so; ops submitted in batches, one open file per ring so every ring
//! works), fsynced through the rings, read back and verified word by word.

use cstore_os::IoError;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::buf::{AlignedBuf, Buf};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::ring::{Backend, Mode, Op};

/// Bytes of buffers in flight at once, over all rings: bounded so the check
/// runs in a small VM too.
const IN_FLIGHT_BYTES: usize = 16 << 20;
const ALIGN: usize = 4096;

#[derive(Clone, Debug)]
pub struct SelfCheck {
    pub path: PathBuf,
    /// Where on the file or device the region starts (aligned to 4 KiB).
    pub offset: u64,
    pub size: u64,
    pub policy: Policy,
    pub mode: Mode,
}

#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub ios: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mb_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SelfCheckReport {
    pub path: PathBuf,
    pub backend: Backend,
    pub rings: usize,
    /// Rings that carried I/O (each file descriptor is routed to one).
    pub rings_used: usize,
    pub queue_depth: u32,
    pub batch: usize,
    pub io_size: u32,
    pub direct: bool,
    pub offset: u64,
    pub bytes: u64,
    /// The pattern's seed (see `word`).
    pub seed: u64,
    pub write: Phase,
    pub fsync_seconds: f64,
    pub read: Phase,
    /// Blocks whose bytes read back differ from what was written.
    pub bad_blocks: u64,
    /// First differing byte, if any.
    pub first_bad_offset: Option<u64>,
    pub verified: bool,
}

/// The pattern's 8-byte word at byte `offset` (of the device): distinct for
/// every offset and every run seed, so misplaced or stale blocks show.
fn word(seed: u64, offset: u64) -> u64 {
    let mut z = seed ^ offset.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill(buf: &mut [u8], seed: u64, at: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&word(seed, at + 8 * i as u64).to_le_bytes());
    }
}

/// First byte of `buf` (at device offset `at`) that is not the pattern.
fn first_mismatch(buf: &[u8], seed: u64, at: u64) -> Option<u64> {
    buf.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let o = at + 8 * i as u64;
        (w != word(seed, o).to_le_bytes()).then_some(o)
    })
}

fn open(path: &Path, direct: bool) -> std::io::Result<(File, bool)> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false);
    if direct {
        match o.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    o.open(path).map(|f| (f, false))
}

fn new_buf(len: usize, direct: bool) -> Buf {
    if direct {
        Buf::Aligned(AlignedBuf::new(len, ALIGN))
    } else {
        Buf::Heap(vec![0; len])
    }
}

pub fn run(c: &SelfCheck) -> Result<SelfCheckReport> {
    let p = &c.policy;
    let io_size = (p.io_size as usize).max(ALIGN) / ALIGN * ALIGN;
    let offset = c.offset / ALIGN as u64 * ALIGN as u64;
    let blocks = c.size.div_ceil(io_size as u64).max(1);
    let bytes = blocks * io_size as u64;
    let rings = p.rings.max(1);
    let depth = p.queue_depth.max(1);
    let batch = (depth as usize).min((IN_FLIGHT_BYTES / io_size / rings).max(1));

    // One open file per ring: the engine routes by descriptor (fd % rings).
    // Descriptors are not consecutive when other threads open files at the
    // same time, so open until every ring has one (bounded). Extra opens
    // stay open until the end of the search, or the next open would get the
    // same descriptor back.
    let mut slots: Vec<Option<File>> = (0..rings).map(|_| None).collect();
    let mut extra = Vec::new();
    let mut direct = p.direct;
    let mut filled = 0;
    for _ in 0..rings * 16 {
        if filled == rings {
            break;
        }
        let (f, d) = open(&c.path, p.direct).map_err(|e| IoError::new("open", &c.path, e))?;
        let slot = &mut slots[f.as_raw_fd() as usize % rings];
        if slot.is_none() {
            direct &= d;
            *slot = Some(f);
            filled += 1;
        } else {
            extra.push(f);
        }
    }
    drop(extra);
    let files: Vec<File> = slots.into_iter().flatten().collect();
    let meta = files[0]
        .metadata()
        .map_err(|e| IoError::new("stat", &c.path, e))?;
    if meta.file_type().is_block_device() {
        let mut dev_size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64.
        unsafe { libc::ioctl(files[0].as_raw_fd(), 0x8008_1272, &mut dev_size) };
        if offset + bytes > dev_size {
            return Err(Error::NotBlock {
                path: c.path.clone(),
                reason: format!(
                    "the check needs {bytes} bytes from offset {offset}, the device has {dev_size}"
                ),
            });
        }
    }
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    let rings_used = {
        let mut r: Vec<usize> = fds.iter().map(|fd| *fd as usize % rings).collect();
        r.sort_unstable();
        r.dedup();
        r.len()
    };
    let engine = Engine::with(rings, depth, p.iopoll && direct, false, c.mode);
    let seed = {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        t.as_nanos() as u64 ^ u64::from(std::process::id())
    };
    let io_err = |what: &'static str, e: std::io::Error| IoError::new(what, &c.path, e);

    // Blocks go round-robin over the files (so over the rings); each round
    // submits `batch` ops per ring at once and waits for all of them.
    let per_round = batch * fds.len();
    let mut spare: Vec<Buf> = Vec::new();
    let run_phase =
        |write: bool, spare: &mut Vec<Buf>, bad: &mut (u64, Option<u64>)| -> Result<Phase> {
            let started = Instant::now();
            let mut ios = 0u64;
            let mut first = 0u64;
            while first < blocks {
                let last = (first + per_round as u64).min(blocks);
                let mut by_fd: Vec<Vec<Op>> = fds.iter().map(|_| Vec::new()).collect();
                for b in first..last {
                    let at = offset + b * io_size as u64;
                    let fd_i = (b % fds.len() as u64) as usize;
                    let fd = fds[fd_i];
                    let mut buf = spare.pop().unwrap_or_else(|| new_buf(io_size, direct));
                    let op = if write {
                        fill(buf.as_mut_slice(), seed, at);
                        Op::Write {
                            fd,
                            buf,
                            offset: at,
                        }
                    } else {
                        Op::Read {
                            fd,
                            buf,
                            offset: at,
                        }
                    };
                    by_fd[fd_i].push(op);
                }
                let pending: Vec<_> = by_fd
                    .into_iter()
                    .zip(&fds)
                    .filter(|(ops, _)| !ops.is_empty())
                    .map(|(ops, fd)| engine.submit(*fd, ops, false, None))
                    .collect();
                for completion in pending {
                    for d in completion.wait() {
                        let n = d
                            .result
                            .map_err(|e| io_err(if write { "write" } else { "read" }, e))?;
                        let (buf, at) = match d.op {
                            Op::Write { buf, offset, .. } | Op::Read { buf, offset, .. } => {
                                (buf, offset)
                            }
                            _ => unreachable!("only reads and writes are submitted"),
                        };
                        if n as usize != io_size {
                            return Err(io_err(
                                "I/O",
                                std::io::Error::other(format!(
                                    "short {}: {n} of {io_size} bytes at {at}",
                                    if write { "write" } else { "read" }
                                )),
                            )
                            .into());
                        }
                        if !write {
                            if let Some(o) = first_mismatch(buf.as_slice(), seed, at) {
                                bad.0 += 1;
                                bad.1 = Some(bad.1.map_or(o, |b: u64| b.min(o)));
                            }
                        }
                        ios += 1;
                        spare.push(buf);
                    }
                }
                first = last;
            }
            let seconds = started.elapsed().as_secs_f64().max(1e-9);
            Ok(Phase {
                ios,
                seconds,
                iops: ios as f64 / seconds,
                mb_per_s: (ios * io_size as u64) as f64 / seconds / 1e6,
            })
        };

    let mut bad = (0u64, None);
    let write = run_phase(true, &mut spare, &mut bad)?;
    let t = Instant::now();
    for fd in &fds {
        engine
            .run(
                *fd,
                Op::Fsync {
                    fd: *fd,
                    datasync: false,
                },
            )
            .result
            .map_err(|e| io_err("fsync", e))?;
    }
    let fsync_seconds = t.elapsed().as_secs_f64();
    if !direct {
        // Read what the device holds, not what the page cache kept.
        for f in &files {
            // SAFETY: fadvise on an open descriptor.
            unsafe {
                libc::posix_fadvise(
                    f.as_raw_fd(),
                    offset as i64,
                    bytes as i64,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
        }
    }
    // Fresh buffers, so a read that moved nothing cannot pass on stale bytes.
    spare.clear();
    let read = run_phase(false, &mut spare, &mut bad)?;
    let backend = engine.backend();
    drop(engine);
    drop(files);
    Ok(SelfCheckReport {
        path: c.path.clone(),
        backend,
        rings,
        rings_used,
        queue_depth: depth,
        batch,
        io_size: io_size as u32,
        direct,
        offset,
        bytes,
        seed,
        write,
        fsync_seconds,
        read,
        bad_blocks: bad.0,
        first_bad_offset: bad.1,
        verified: bad.0 == 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rings: usize) -> Policy {
        Policy {
            rings,
            queue_depth: 8,
            io_size: 64 << 10,
            direct: true,
            reuse_cached: false,
            stream_io_size: 0,
            stream_depth: 0,
            streams: 1,
            iopoll: false,
            batch_small_files: false,
            reason: "test".into(),
        }
    }

    #[test]
    fn pattern_round_trips_on_both_backends_and_spreads_over_rings() {
        for mode in [Mode::Auto, Mode::Sync] {
            let dir = tempfile::tempdir_in("/var/tmp").unwrap();
            let path = dir.path().join("check");
            let r = run(&SelfCheck {
                path: path.clone(),
                offset: 1 << 20,
                size: 3 << 20,
                policy: policy(2),
                mode,
            })
            .unwrap();
            assert!(r.verified, "{r:?}");
            assert_eq!(r.write.ios, 48);
            assert_eq!(r.read.ios, 48);
            assert_eq!(r.rings_used, 2, "{r:?}");
            assert!(r.direct, "/var/tmp takes O_DIRECT");
            let expected = if mode == Mode::Sync {
                Backend::Sync
            } else {
                Backend::IoUring
            };
            assert_eq!(r.backend, expected);
            // What is on the file is the pattern at the right offsets.
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes.len(), 4 << 20);
            assert!(bytes[..1 << 20].iter().all(|b| *b == 0));
            assert_eq!(first_mismatch(&bytes[1 << 20..], r.seed, 1 << 20), None);
        }
    }

    #[test]
    fn a_wrong_block_is_found() {
        let mut b = vec![0u8; 4096];
        fill(&mut b, 7, 8192);
        assert_eq!(first_mismatch(&b, 7, 8192), None);
        b[100] ^= 1;
        assert_eq!(first_mismatch(&b, 7, 8192), Some(8192 + 96));
        assert!(
            first_mismatch(&b, 8, 8192).is_some(),
            "another seed differs"
        );
    }
}
