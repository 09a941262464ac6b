//! `cstore device info PATH`: the block device under a path and the I/O
//! policy cstore derives from it.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cstore_blockio::selfcheck::{self, SelfCheck};
use cstore_blockio::{probe, Mode, Policy};

use crate::bench::parse_size;

use crate::progress::human_bytes;

pub fn info(path: &Path, json: bool) -> Result<()> {
    let info =
        probe(path).with_context(|| format!("probing the device under {}", path.display()))?;
    let policy = Policy::for_device_here(&info);
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
    if let Some(fs) = &info.filesystem {
        let journal = match fs.journal {
            Some(true) => " (journal)",
            Some(false) => " (no journal)",
            None => "",
        };
        println!("filesystem:  {}{journal}", fs.kind);
    }
    if let Some(fs) = info.fs_type.as_ref().filter(|_| info.queue.is_some()) {
        println!("backed by:   a file on {fs}");
    } else if info.filesystem.is_none() {
        if let Some(fs) = &info.fs_type {
            println!("filesystem:  {fs}");
        }
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
        "policy:      {} rings x depth {}, {} I/O, direct {}, {} blob stream(s) at once ({} x {} in flight{}), iopoll {}",
        policy.rings,
        policy.queue_depth,
        human_bytes(policy.io_size as u64),
        policy.direct,
        policy.streams,
        human_bytes(policy.stream_io_size as u64),
        policy.stream_depth,
        if policy.reuse_cached {
            ", cached blobs read through the cache"
        } else {
            ""
        },
        policy.iopoll
    );
    println!("             ({})", policy.reason);
    Ok(())
}

#[derive(clap::Args)]
pub struct SelfcheckArgs {
    /// A block device, or a file (created and removed if it does not exist).
    path: PathBuf,
    /// Bytes to write and verify.
    #[arg(long, default_value = "64m")]
    size: String,
    /// Where the region starts.
    #[arg(long, default_value = "0")]
    offset: String,
    /// Allow overwriting a block device or an existing file.
    #[arg(long)]
    destroy_data: bool,
    /// Use the plain-syscall fallback instead of io_uring.
    #[arg(long)]
    sync: bool,
    #[arg(long)]
    json: bool,
}

pub fn selfcheck(a: &SelfcheckArgs) -> Result<()> {
    let existed = match std::fs::metadata(&a.path) {
        Ok(m) => {
            let what = if m.file_type().is_block_device() {
                "is a block device"
            } else if m.is_file() {
                "exists"
            } else {
                bail!("{}: not a block device or a regular file", a.path.display());
            };
            if !a.destroy_data {
                bail!(
                    "{} {what}: the self-check overwrites its data; pass --destroy-data if that is intended",
                    a.path.display()
                );
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("stat {}", a.path.display())),
    };
    // The policy of the device under the path (its directory if it is new).
    let probe_at = if existed {
        a.path.clone()
    } else {
        a.path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    let info = probe(&probe_at)
        .with_context(|| format!("probing the device under {}", probe_at.display()))?;
    let policy = Policy::for_device_here(&info);
    let check = SelfCheck {
        path: a.path.clone(),
        offset: if a.offset == "0" {
            0
        } else {
            parse_size(&a.offset)?
        },
        size: parse_size(&a.size)?,
        policy,
        mode: if a.sync { Mode::Sync } else { Mode::Auto },
    };
    let result = selfcheck::run(&check);
    if !existed {
        let _ = std::fs::remove_file(&a.path);
    }
    let r = result.with_context(|| format!("self-check of {}", a.path.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} {}: {} written and read back, backend {:?}, {} rings ({} used) x depth {} (batches of {}), {} I/O, direct {}",
            if r.verified { "PASS" } else { "FAIL" },
            r.path.display(),
            human_bytes(r.bytes),
            r.backend,
            r.rings,
            r.rings_used,
            r.queue_depth,
            r.batch,
            human_bytes(r.io_size as u64),
            r.direct
        );
        println!(
            "  write {:.0} IOPS {:.1} MB/s, fsync {:.3} s, read {:.0} IOPS {:.1} MB/s",
            r.write.iops, r.write.mb_per_s, r.fsync_seconds, r.read.iops, r.read.mb_per_s
        );
        if !r.verified {
            println!(
                "  {} blocks differ, first at byte {}",
                r.bad_blocks,
                r.first_bad_offset.unwrap_or(0)
            );
        }
    }
    if !r.verified {
        bail!(
            "self-check of {}: {} blocks read back differ from what was written",
            a.path.display(),
            r.bad_blocks
        );
    }
    Ok(())
}
