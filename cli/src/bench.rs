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

#[derive(clap::Args)]
pub struct SuiteArgs {
    /// The image to pull and run, in a registry (e.g. 127.0.0.1:5000/bench:latest).
    #[arg(long)]
    image: String,
    /// Classes to run, comma-separated: host (the device under --path as it
    /// is), hdd, sata, nvme (emulated on loop devices).
    #[arg(long, value_delimiter = ',', default_value = "host,hdd,sata,nvme")]
    classes: Vec<String>,
    /// Where the host class runs (a directory is made under it).
    #[arg(long, default_value = "/var/tmp")]
    path: PathBuf,
    /// Where the run's own directory (mount points, sockets) is made.
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// Where report.html, report.json and report.md are written.
    #[arg(long, default_value = "cstore-bench-report")]
    out: PathBuf,
    /// A small run: 1 round, N = 1 and 4, short I/O runs.
    #[arg(long)]
    quick: bool,
    /// Rounds per workload (default 3; 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Containers started at once, comma-separated (default 1,4,16,64; 1,4 with --quick).
    #[arg(long, value_delimiter = ',')]
    density: Option<Vec<u32>>,
    /// What each density container runs, split on spaces.
    #[arg(long, default_value = "echo ok")]
    density_cmd: String,
    /// Classes where the rotational (HDD) policy runs against the NVMe policy.
    #[arg(long, value_delimiter = ',', default_value = "hdd")]
    policy_classes: Vec<String>,
    /// Plain HTTP to the registry for both tools (loopback registries get it anyway).
    #[arg(long)]
    plain_http: bool,
}

fn classes(names: &[String]) -> Result<Vec<cstore_bench::ClassKind>> {
    let mut v = Vec::new();
    for n in names.iter().filter(|n| !n.is_empty()) {
        let k: cstore_bench::ClassKind = n.parse().map_err(anyhow::Error::msg)?;
        if !v.contains(&k) {
            v.push(k);
        }
    }
    Ok(v)
}

/// `cstore bench suite`: progress on stderr, one line per step.
pub fn suite(a: SuiteArgs) -> Result<()> {
    let opts = cstore_bench::Options {
        cstore: std::env::current_exe()?,
        image: a.image,
        plain_http: a.plain_http,
        classes: classes(&a.classes)?,
        host_path: a.path,
        work_parent: a.work_dir,
        out: a.out,
        quick: a.quick,
        rounds: a.rounds,
        density: a.density,
        density_cmd: a.density_cmd.split_whitespace().map(String::from).collect(),
        policy_classes: classes(&a.policy_classes)?,
    };
    let t0 = std::time::Instant::now();
    let progress = |msg: &str| {
        let s = t0.elapsed().as_secs();
        eprintln!("[{:>2}:{:02}] {msg}", s / 60, s % 60);
    };
    let report = cstore_bench::run(&opts, &progress)?;
    print!("{}", cstore_bench::report::markdown(&report));
    Ok(())
}

#[derive(clap::Args)]
pub struct HddModelArgs {
    /// The disk's data: a file made (sparse) at this path, on tmpfs for a
    /// model whose only cost is the modelled one.
    #[arg(long)]
    backing: PathBuf,
    /// The disk's size.
    #[arg(long, default_value = "16g")]
    size: String,
    /// Keep what was served so far (JSON: requests, seeks, modelled busy
    /// time) in this file, rewritten every 100 ms while it changes.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// An empty directory; the disk is MOUNTPOINT/disk.
    mountpoint: PathBuf,
}

/// `cstore bench hdd-model`: serve until a signal, then print what was
/// served as JSON on stdout (the loop device must be detached first).
pub fn hdd_model(a: HddModelArgs) -> Result<()> {
    use cstore_bench::hddmodel::{HddModel, Params};
    cstore_bench::proc::install_signal_handling();
    let mut m = HddModel::start(&a.mountpoint, &a.backing, Params::hdd(parse_size(&a.size)?))?;
    eprintln!("cstore bench hdd-model: serving {}", m.disk().display());
    let mut last = None;
    while !cstore_bench::proc::cancelled() {
        std::thread::sleep(Duration::from_millis(100));
        let c = m.counters();
        if let Some(p) = a.stats.as_ref().filter(|_| last.as_ref() != Some(&c)) {
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_string(&c)?)?;
            std::fs::rename(&tmp, p)?;
            last = Some(c);
        }
    }
    let c = m.counters();
    m.stop()?;
    println!("{}", serde_json::to_string(&c)?);
    let _ = std::fs::remove_file(&a.backing);
    Ok(())
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
