//! How to drive a device, derived from its probe: rings, queue depth, I/O
//! size, O_DIRECT, and how many blob streams at once.

use serde::{Deserialize, Serialize};

use crate::probe::{DeviceInfo, DeviceKind};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// io_uring instances, one worker thread each.
    pub rings: usize,
    /// Submission queue entries per ring: I/Os in flight per ring.
    pub queue_depth: u32,
    /// Bytes per read/write request for bulk transfers.
    pub io_size: u32,
    /// Bypass the page cache (needs aligned buffers and offsets).
    pub direct: bool,
    /// With `direct`, a blob stream reads a file that is (nearly) all in the
    /// page cache through the cache instead: a blob the pull has just
    /// written is in memory, and reading it back takes a disk seconds (and
    /// seeks between the blob and the layer being written).
    #[serde(default)]
    pub reuse_cached: bool,
    /// Sequential streams (blob reads and writes): bytes per request and
    /// requests in flight per stream. A disk gets fewer, larger requests;
    /// deep queues of memory-sized ones elsewhere. 0: the stream's default.
    #[serde(default)]
    pub stream_io_size: u32,
    #[serde(default)]
    pub stream_depth: u32,
    /// Blob streams at once: how many layers unpack reads (and writes) in
    /// parallel. 1 on a seek-bound device, so it reads one blob front to
    /// back instead of seeking between several; one per core elsewhere.
    /// (There was a `sort_by_offset` flag: no path of ours has a batch whose
    /// order is free to choose, streams being sequential already, and the
    /// block layer's scheduler orders what is queued on a rotational disk.)
    pub streams: u32,
    /// Poll for completions (IOPOLL): only with device poll queues.
    pub iopoll: bool,
    /// Unpack writes the small files of compressed layers in io_uring
    /// batches (see `small_files`).
    #[serde(default)]
    pub batch_small_files: bool,
    /// Why: one line a person can read.
    pub reason: String,
}

impl Policy {
    /// Policy for `info` on this machine (its CPU count), or for the kind
    /// `CSTORE_POLICY` names (see `forced_kind`).
    pub fn for_device_here(info: &DeviceInfo) -> Policy {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        match forced_kind() {
            Ok(Some(kind)) if kind != info.kind => {
                let mut as_kind = info.clone();
                as_kind.kind = kind;
                let mut p = Self::for_device(&as_kind, cores);
                p.reason = format!(
                    "CSTORE_POLICY={} (the probe says {}): {}",
                    kind.name(),
                    info.kind.name(),
                    p.reason
                );
                p
            }
            _ => Self::for_device(info, cores),
        }
    }

    /// Policy for `info` on a machine with `cores` CPUs.
    pub fn for_device(info: &DeviceInfo, cores: usize) -> Policy {
        let cores = cores.max(1);
        let mut p = Self::for_queue(info, cores);
        let (batch, why) = small_files(info, cores);
        p.batch_small_files = batch;
        p.reason = format!("{}; small files {why}", p.reason);
        p
    }

    fn for_queue(info: &DeviceInfo, cores: usize) -> Policy {
        let q = info.queue.as_ref();
        let max_io = q.map_or(1 << 20, |q| {
            (q.max_sectors_kb.max(4) as u64 * 1024).min(u32::MAX as u64) as u32
        });
        match info.kind {
            DeviceKind::Nvme => {
                let hwq = q.map_or(1, |q| q.hw_queues.max(1)) as usize;
                let mdts = info
                    .nvme
                    .as_ref()
                    .and_then(|n| n.max_transfer_bytes)
                    .unwrap_or(1 << 20);
                let io_size = (mdts.min(max_io as u64)).clamp(128 << 10, 1 << 20) as u32;
                let rings = cores.min(hwq);
                Policy {
                    rings,
                    queue_depth: 128,
                    io_size,
                    direct: true,
                    reuse_cached: false,
                    stream_io_size: io_size.min(SHARED_STREAM_IO),
                    stream_depth: SHARED_STREAM_DEPTH,
                    streams: cores as u32,
                    iopoll: q.is_some_and(|q| q.io_poll),
                    batch_small_files: false,
                    reason: format!(
                        "NVMe: parallel queues ({hwq} hardware queues, {cores} cores) → {rings} rings, deep queues, I/O up to MDTS"
                    ),
                }
            }
            DeviceKind::Rotational => {
                // The largest power of two the queue takes in one request,
                // 1–4 MiB (max_sectors_kb 1280 as 1 MiB requests, not a
                // 1 MiB and a 256 KiB one each time it splits).
                let io_size = prev_power_of_two(max_io.clamp(1 << 20, 4 << 20));
                Policy {
                    rings: 1,
                    queue_depth: 4,
                    io_size,
                    // Blobs read from the disk bypass the cache: requests
                    // of exactly `stream_io_size`, whatever the readahead
                    // window and memory at the time would make of them,
                    // and a blob read once does not push other files out
                    // of the cache. One just written is read from memory
                    // (`reuse_cached`).
                    direct: true,
                    reuse_cached: true,
                    stream_io_size: io_size,
                    // One request queued behind the one the disk serves.
                    stream_depth: 2,
                    streams: 1,
                    iopoll: false,
                    batch_small_files: false,
                    reason: format!(
                        "rotational: one ring, shallow queue, one blob stream at a time read in {} KiB requests (O_DIRECT unless the blob is in the page cache)",
                        io_size >> 10
                    ),
                }
            }
            DeviceKind::Ssd => Policy {
                rings: cores
                    .min(q.map_or(1, |q| q.hw_queues.max(1)) as usize)
                    .max(1),
                queue_depth: 32.min(q.map_or(32, |q| q.nr_requests.max(1))),
                io_size: max_io.clamp(128 << 10, 1 << 20),
                direct: false,
                reuse_cached: false,
                stream_io_size: max_io.clamp(128 << 10, SHARED_STREAM_IO),
                stream_depth: SHARED_STREAM_DEPTH,
                streams: cores as u32,
                iopoll: false,
                batch_small_files: false,
                reason:
                    "non-rotational: a ring per hardware queue (up to one per core), moderate depth"
                        .into(),
            },
            DeviceKind::Memory => Policy {
                rings: cores,
                queue_depth: 64,
                io_size: 1 << 20,
                direct: false,
                reuse_cached: false,
                stream_io_size: SHARED_STREAM_IO,
                stream_depth: SHARED_STREAM_DEPTH,
                streams: cores as u32,
                iopoll: false,
                batch_small_files: false,
                reason: "no block device (memory-backed): a ring per core, buffered I/O".into(),
            },
        }
    }
}

/// A stream's requests where several run at once (one per core): 512 KiB × 4
/// keeps a device busy (the kernel splits larger ones at max_sectors anyway;
/// 1 MiB requests were no faster) and memory bounded (2 MiB per stream).
const SHARED_STREAM_IO: u32 = 512 << 10;
const SHARED_STREAM_DEPTH: u32 = 4;

fn prev_power_of_two(x: u32) -> u32 {
    1 << (31 - x.max(1).leading_zeros())
}

/// `CSTORE_POLICY=nvme|ssd|rotational|memory` (`hdd` = rotational): derive
/// the policy as if the store's device were of that kind, whatever the probe
/// says. For benchmarks that compare policies on one device (`cstore bench
/// suite` runs the rotational and the NVMe policy on its HDD class). Read
/// once; an unknown value is an error (the CLI refuses to start with it), and
/// is ignored by `for_device_here`.
pub fn forced_kind() -> std::result::Result<Option<DeviceKind>, String> {
    static ENV: std::sync::OnceLock<std::result::Result<Option<DeviceKind>, String>> =
        std::sync::OnceLock::new();
    ENV.get_or_init(|| match std::env::var("CSTORE_POLICY") {
        Err(_) => Ok(None),
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => v.parse().map(Some),
    })
    .clone()
}

/// Whether unpack should batch small files through io_uring, and why.
///
/// io_uring runs every O_CREAT open (and, on ext4, every buffered write) in an
/// io-wq worker, so a batch costs more kernel CPU than one syscall at a time;
/// it wins only where that worker can overlap with the extracting thread's own
/// work (decompression) on another core. Measured with benches/smallfiles.sh
/// (100k files, gzip layer): xfs 0.87× and journaled ext4 0.93× the time of
/// one syscall at a time; ext4 without a journal 1.5× (its inode allocator's
/// scan for recently deleted inodes runs far slower from io-wq). Anything else
/// is unmeasured, so it keeps one syscall at a time.
fn small_files(info: &DeviceInfo, cores: usize) -> (bool, &'static str) {
    if cores < 2 {
        return (
            false,
            "one syscall at a time (one core: nothing to overlap)",
        );
    }
    match info
        .filesystem
        .as_ref()
        .map(|f| (f.kind.as_str(), f.journal))
    {
        Some(("xfs", _)) => (true, "in io_uring batches for compressed layers (xfs)"),
        Some(("ext4", Some(true))) => (
            true,
            "in io_uring batches for compressed layers (journaled ext4)",
        ),
        Some(("ext4", _)) => (
            false,
            "one syscall at a time (ext4 without a journal: batches measured slower)",
        ),
        _ => (
            false,
            "one syscall at a time (batches not measured faster on this filesystem)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{DeviceInfo, Queue};

    fn info(kind: DeviceKind, hw_queues: u32, rotational: bool) -> DeviceInfo {
        DeviceInfo {
            path: "/x".into(),
            dev: "1:1".into(),
            chain: vec!["d".into()],
            device: Some("d".into()),
            queue: Some(Queue {
                rotational,
                logical_block_size: 512,
                physical_block_size: 4096,
                optimal_io_size: 0,
                max_sectors_kb: 1280,
                max_hw_sectors_kb: 2048,
                nr_requests: 256,
                hw_queues,
                scheduler: "none".into(),
                io_poll: false,
            }),
            kind,
            nvme: None,
            nvme_error: None,
            fs_type: None,
            filesystem: None,
        }
    }

    #[test]
    fn nvme_gets_rings_per_queue_and_rotational_one_ring_one_stream() {
        let p = Policy::for_device(&info(DeviceKind::Nvme, 8, false), 2);
        assert_eq!(
            (p.rings, p.queue_depth, p.direct, p.streams),
            (2, 128, true, 2)
        );
        let p = Policy::for_device(&info(DeviceKind::Nvme, 1, false), 16);
        assert_eq!(p.rings, 1, "no more rings than hardware queues");
        let p = Policy::for_device(&info(DeviceKind::Rotational, 1, true), 16);
        assert_eq!((p.rings, p.queue_depth, p.streams), (1, 4, 1));
        // max_sectors_kb 1280: whole MiBs, not 1280 KiB split into 1 MiB + 256 KiB.
        assert_eq!(
            (p.io_size, p.stream_io_size, p.stream_depth),
            (1 << 20, 1 << 20, 2)
        );
        assert!(p.direct && p.reuse_cached);
        let nvme = Policy::for_device(&info(DeviceKind::Nvme, 8, false), 2);
        assert_eq!((nvme.stream_io_size, nvme.stream_depth), (512 << 10, 4));
        assert!(!nvme.reuse_cached);
    }

    #[test]
    fn device_kinds_parse_by_name() {
        for k in [
            DeviceKind::Nvme,
            DeviceKind::Ssd,
            DeviceKind::Rotational,
            DeviceKind::Memory,
        ] {
            assert_eq!(k.name().parse::<DeviceKind>(), Ok(k));
        }
        assert_eq!("hdd".parse::<DeviceKind>(), Ok(DeviceKind::Rotational));
        assert!("floppy"
            .parse::<DeviceKind>()
            .unwrap_err()
            .contains("\"floppy\""));
    }

    #[test]
    fn small_files_are_batched_only_where_batches_measured_faster() {
        use crate::probe::Filesystem;
        let on = |kind: &str, journal: Option<bool>, cores: usize| {
            let mut i = info(DeviceKind::Ssd, 1, false);
            i.filesystem = Some(Filesystem {
                kind: kind.into(),
                journal,
            });
            Policy::for_device(&i, cores).batch_small_files
        };
        assert!(on("xfs", None, 2));
        assert!(on("ext4", Some(true), 8));
        assert!(!on("ext4", Some(false), 8), "journal-less ext4");
        assert!(!on("xfs", None, 1), "one core");
        assert!(!on("btrfs", None, 8), "unmeasured");
        let p = Policy::for_device(&info(DeviceKind::Ssd, 1, false), 2);
        assert!(!p.batch_small_files && p.reason.contains("small files one syscall"));
    }
}
