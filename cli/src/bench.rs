//! `cstore bench io`: fio-style I/O benchmark on cstore's io_uring rings.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use cstore_blockio::bench::{run, IoBench, Rw};
use cstore_blockio::Mode;

/// `4k`, `1m`, `1g`, `512`, `1MiB`, `150mb`: bytes (binary multiples); the
/// same syntax as `cstore run`'s rates.
pub fn parse_size(s: &str) -> Result<u64> {
    Ok(cstore_runtime::cgroup::parse_rate(s)?)
}

#[derive(clap::Args)]
pub struct IoArgs {
    /// randread, randwrite, read or write.
    #[arg(long, default_value = "randread")]
    rw: String,
    #[arg(long, default_value = "4k")]
    bs: String,
    /// I/Os in flight per ring.
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Rings (one thread each), like fio's numjobs.
    #[arg(long, default_value_t = 1)]
    rings: usize,
    /// Region of the file or device to use.
    #[arg(long, default_value = "1g")]
    size: String,
    /// O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Use the plain-syscall fallback instead of io_uring.
    #[arg(long)]
    sync: bool,
    /// Plain reads/writes on the file descriptor instead of registered
    /// (fixed) buffers and file.
    #[arg(long)]
    no_register: bool,
    #[arg(long)]
    json: bool,
    path: PathBuf,
}

pub fn io(a: IoArgs) -> Result<()> {
    let rw: Rw = a.rw.parse().map_err(anyhow::Error::msg)?;
    let bs = parse_size(&a.bs)? as usize;
    if bs == 0 || (a.direct && !bs.is_multiple_of(512)) {
        bail!("--bs {bs} must be positive (and a multiple of 512 with --direct)");
    }
    let b = IoBench {
        path: a.path,
        rw,
        bs,
        qd: a.qd.max(1),
        jobs: a.rings.max(1),
        size: parse_size(&a.size)?,
        direct: a.direct,
        runtime: Duration::from_secs_f64(a.runtime),
        mode: if a.sync { Mode::Sync } else { Mode::Auto },
        register: !a.no_register,
    };
    let r = run(&b)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{:?} bs={} qd={} rings={} direct={} backend={:?}: {:.0} IOPS, {:.1} MB/s, latency p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs ({} I/Os in {:.1}s)",
            b.rw, b.bs, b.qd, b.jobs, b.direct, r.backend, r.iops, r.mb_per_s, r.lat_us_p50, r.lat_us_p99, r.lat_us_p999, r.ios, r.seconds
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("150mb").unwrap(), 150 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("x").is_err() && parse_size("1q").is_err());
    }
}
