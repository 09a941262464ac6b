//! `cstore bench io`: fio-style I/O benchmark on cstore's io_uring rings.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use cstore_blockio::bench::{run, IoBench, Rw};
use cstore_blockio::Mode;

/// `4k`, `1m`, `1g`, `512`, `1MiB`, `150mb`: bytes (binary multiples).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    let unit = t[digits.len()..]
        .trim_end_matches("ib")
        .trim_end_matches('b');
    let n: u64 = match digits.parse() {
        Ok(n) => n,
        Err(_) => bail!("bad size {s:?}: expected a number with an optional k, m, g or t suffix"),
    };
    let mult = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => bail!("bad size {s:?}: unknown unit {unit:?}"),
    };
    n.checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("size {s:?} is too large"))
}

#[allow(clippy::too_many_arguments)]
pub fn io(
    path: PathBuf,
    rw: &str,
    bs: &str,
    qd: u32,
    rings: usize,
    size: &str,
    direct: bool,
    runtime: f64,
    sync: bool,
    json: bool,
) -> Result<()> {
    let rw: Rw = rw.parse().map_err(anyhow::Error::msg)?;
    let bs = parse_size(bs)? as usize;
    if bs == 0 || (direct && !bs.is_multiple_of(512)) {
        bail!("--bs {bs} must be positive (and a multiple of 512 with --direct)");
    }
    let b = IoBench {
        path,
        rw,
        bs,
        qd: qd.max(1),
        jobs: rings.max(1),
        size: parse_size(size)?,
        direct,
        runtime: Duration::from_secs_f64(runtime),
        mode: if sync { Mode::Sync } else { Mode::Auto },
    };
    let r = run(&b)?;
    if json {
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
