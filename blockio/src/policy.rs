//! How to drive a device, derived from its probe: rings, queue depth, I/O
//! size, O_DIRECT, and whether to sort I/O by offset.

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
    /// Issue batched I/O in offset order (seek-bound devices).
    pub sort_by_offset: bool,
    /// Poll for completions (IOPOLL): only with device poll queues.
    pub iopoll: bool,
    /// Why: one line a person can read.
    pub reason: String,
}

impl Policy {
    /// Policy for `info` on a machine with `cores` CPUs.
    pub fn for_device(info: &DeviceInfo, cores: usize) -> Policy {
        let cores = cores.max(1);
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
                    sort_by_offset: false,
                    iopoll: q.is_some_and(|q| q.io_poll),
                    reason: format!(
                        "NVMe: parallel queues ({hwq} hardware queues, {cores} cores) → {rings} rings, deep queues, I/O up to MDTS"
                    ),
                }
            }
            DeviceKind::Rotational => Policy {
                rings: 1,
                queue_depth: 4,
                io_size: max_io.clamp(256 << 10, 4 << 20),
                direct: false,
                sort_by_offset: true,
                iopoll: false,
                reason:
                    "rotational: one ring, shallow queue, large sequential I/O sorted by offset"
                        .into(),
            },
            DeviceKind::Ssd => Policy {
                rings: cores
                    .min(q.map_or(1, |q| q.hw_queues.max(1)) as usize)
                    .max(1),
                queue_depth: 32.min(q.map_or(32, |q| q.nr_requests.max(1))),
                io_size: max_io.clamp(128 << 10, 1 << 20),
                direct: false,
                sort_by_offset: false,
                iopoll: false,
                reason:
                    "non-rotational: a ring per hardware queue (up to one per core), moderate depth"
                        .into(),
            },
            DeviceKind::Memory => Policy {
                rings: cores,
                queue_depth: 64,
                io_size: 1 << 20,
                direct: false,
                sort_by_offset: false,
                iopoll: false,
                reason: "no block device (memory-backed): a ring per core, buffered I/O".into(),
            },
        }
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
        }
    }

    #[test]
    fn nvme_gets_rings_per_queue_and_rotational_one_sorted_ring() {
        let p = Policy::for_device(&info(DeviceKind::Nvme, 8, false), 2);
        assert_eq!(
            (p.rings, p.queue_depth, p.direct, p.sort_by_offset),
            (2, 128, true, false)
        );
        let p = Policy::for_device(&info(DeviceKind::Nvme, 1, false), 16);
        assert_eq!(p.rings, 1, "no more rings than hardware queues");
        let p = Policy::for_device(&info(DeviceKind::Rotational, 1, true), 16);
        assert_eq!((p.rings, p.queue_depth, p.sort_by_offset), (1, 4, true));
        assert!(p.io_size >= 256 << 10);
    }
}
