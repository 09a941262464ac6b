//! `cstore device info PATH`: the block device under a path and the I/O
//! policy cstore derives from it.

use std::path::Path;

use anyhow::{Context, Result};
use cstore_blockio::{probe, Policy};

use crate::progress::human_bytes;

pub fn info(path: &Path, json: bool) -> Result<()> {
    let info =
        probe(path).with_context(|| format!("probing the device under {}", path.display()))?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let policy = Policy::for_device(&info, cores);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"device": info, "policy": policy}))?
        );
        return Ok(());
    }
    println!("path:        {}", info.path.display());
    println!(
        "device:      {} ({})",
        info.device.as_deref().unwrap_or("none"),
        info.dev
    );
    if info.chain.len() > 1 {
        println!("chain:       {}", info.chain.join(" -> "));
    }
    println!("kind:        {:?}", info.kind);
    if let Some(fs) = &info.fs_type {
        println!("filesystem:  {fs}");
    }
    if let Some(q) = &info.queue {
        println!("rotational:  {}", q.rotational);
        println!(
            "block size:  logical {} B, physical {} B, optimal I/O {}",
            q.logical_block_size,
            q.physical_block_size,
            if q.optimal_io_size == 0 {
                "unreported".to_string()
            } else {
                human_bytes(q.optimal_io_size as u64)
            }
        );
        println!(
            "max I/O:     {} (hardware {})",
            human_bytes(q.max_sectors_kb as u64 * 1024),
            human_bytes(q.max_hw_sectors_kb as u64 * 1024)
        );
        println!(
            "queues:      {} hardware, {} requests each, scheduler {}, poll {}",
            q.hw_queues, q.nr_requests, q.scheduler, q.io_poll
        );
    }
    if let Some(n) = &info.nvme {
        let c = &n.controller;
        println!(
            "nvme model:  {} (serial {}, firmware {}, NVMe {})",
            c.model, c.serial, c.firmware, c.version
        );
        println!(
            "nvme:        MDTS {} ({}), {} namespaces, volatile write cache {}",
            c.mdts,
            n.max_transfer_bytes.map_or("no limit".into(), human_bytes),
            c.namespaces,
            c.volatile_write_cache
        );
        let ns = &n.namespace;
        println!(
            "namespace:   {} LBAs of {} B (format {} of {})",
            ns.size_lbas,
            ns.lba_size(),
            ns.lba_format_in_use,
            ns.lba_formats.len()
        );
        if let Some(ows) = ns.optimal_write_size {
            println!("optimal write: {}", human_bytes(ows));
        }
    }
    if let Some(e) = &info.nvme_error {
        println!("nvme:        identify failed: {e}");
    }
    println!(
        "policy:      {} rings x depth {}, {} I/O, direct {}, sort by offset {}, iopoll {}",
        policy.rings,
        policy.queue_depth,
        human_bytes(policy.io_size as u64),
        policy.direct,
        policy.sort_by_offset,
        policy.iopoll
    );
    println!("             ({})", policy.reason);
    Ok(())
}
