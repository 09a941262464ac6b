//! `cstore bench suite`: container workloads on each storage class, cstore
//! beside its peer in the same run, written up as one self-contained HTML
//! page with SVG plots, the same figures as JSON, and markdown tables.
//!
//! The suite drives the `cstore` binary and its peers (containerd 1.6 +
//! runc through `ctr`, fio) as processes, as a user would: it measures what
//! users see, and depends on nothing inside cstore's crates. Everything it
//! makes (a work directory, a tmpfs, loop devices, mounts, cgroups, a
//! containerd and its containers) is undone when it ends, fails or is
//! stopped with SIGINT/SIGTERM/SIGHUP; `leftovers` checks that.

use std::path::{Path, PathBuf};
use std::time::Instant;

pub mod class;
mod containerd;
pub mod error;
pub mod hddmodel;
pub mod proc;
pub mod report;
pub mod sys;
mod workload;

pub use class::ClassKind;
pub use error::{Error, Result};
pub use report::Report;
pub use workload::Plan;

use crate::class::{Class, Sizes};
use crate::proc::Cmd;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The cstore binary to measure.
    pub cstore: PathBuf,
    /// The image, in a registry both tools pull from.
    pub image: String,
    /// Speak plain HTTP to the registry (both tools; loopback registries get
    /// it anyway).
    pub plain_http: bool,
    pub classes: Vec<ClassKind>,
    /// The host class's directory is made under this path.
    pub host_path: PathBuf,
    /// The run's work directory (mount points, containerd's socket) is made
    /// under this path.
    pub work_parent: PathBuf,
    /// Where report.html, report.json and report.md go.
    pub out: PathBuf,
    pub quick: bool,
    /// Rounds per workload (default 3, quick 1).
    pub rounds: Option<usize>,
    /// Containers started at once (default 1,4,16,64; quick 1,4).
    pub density: Option<Vec<u32>>,
    /// What each density container runs.
    pub density_cmd: Vec<String>,
    /// Classes where the HDD policy is run against the NVMe policy.
    pub policy_classes: Vec<ClassKind>,
}

impl Options {
    pub fn plan(&self) -> Plan {
        Plan {
            rounds: self.rounds.unwrap_or(if self.quick { 1 } else { 3 }).max(1),
            density: self.density.clone().unwrap_or_else(|| {
                if self.quick {
                    vec![1, 4]
                } else {
                    vec![1, 4, 16, 64]
                }
            }),
            io_runtime: if self.quick { 1.0 } else { 5.0 },
            io_size: if self.quick { 128 << 20 } else { 1 << 30 },
            policy_classes: self.policy_classes.clone(),
        }
    }
}

/// The files a run writes into `Options::out`.
pub const REPORT_FILES: [&str; 3] = ["report.html", "report.json", "report.md"];

/// Whether ctr needs --plain-http for `image` (a registry on loopback, as
/// cstore and docker assume).
pub fn loopback_registry(image: &str) -> bool {
    let host = image.split('/').next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    image.contains('/') && matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

fn run_id() -> String {
    let mut b = [0u8; 3];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut b)
    });
    format!(
        "csb-{}-{:02x}{:02x}{:02x}",
        std::process::id(),
        b[0],
        b[1],
        b[2]
    )
}

/// The run's directory and tmpfs: removed on drop, with a sweep of the
/// cgroups named after the run.
struct Work {
    dir: PathBuf,
    run_id: String,
}

impl Drop for Work {
    fn drop(&mut self) {
        for m in sys::mounts_under(&self.dir) {
            if let Err(e) = sys::umount(&m) {
                eprintln!("cstore bench suite: cleanup: {e}");
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!(
                    "cstore bench suite: cleanup: remove {}: {e}",
                    self.dir.display()
                );
            }
        }
        for cg in our_cgroups(&self.run_id) {
            if let Err(e) = sys::remove_cgroup(&cg) {
                eprintln!("cstore bench suite: cleanup: {e}");
            }
        }
    }
}

/// Cgroup directories named after the run: the classes' throttle groups,
/// runc's /RUN_ID/..., and cstore's /cstore/RUN_ID-...
fn our_cgroups(run_id: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for h in sys::cgroup_hierarchies() {
        for dir in [h.clone(), h.join("cstore")] {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(run_id)
                    && e.file_type().is_ok_and(|t| t.is_dir())
                {
                    v.push(e.path());
                }
            }
        }
    }
    v
}

/// What a run left behind: mounts under `dir`, loop devices backed by files
/// under it, cgroups named after `run_id`, processes whose command line
/// names either. Empty when the cleanup did its job.
pub fn leftovers(run_id: &str, dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = sys::mounts_under(dir)
        .into_iter()
        .map(|m| format!("mount {}", m.display()))
        .collect();
    for e in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            if Path::new(b.trim()).starts_with(dir) {
                v.push(format!("loop device {name} over {}", b.trim()));
            }
        }
    }
    v.extend(
        our_cgroups(run_id)
            .into_iter()
            .map(|c| format!("cgroup {}", c.display())),
    );
    let me = std::process::id();
    let dirs = dir.to_string_lossy().into_owned();
    for p in proc::all_pids() {
        if p == me {
            continue;
        }
        let cmd = proc::cmdline(p);
        if cmd.contains(&dirs) || cmd.contains(run_id) {
            v.push(format!("process {p}: {cmd}"));
        }
    }
    v
}

fn version(cmd: &str, args: &[&str]) -> String {
    Cmd::new(cmd, "reading a version")
        .args(args)
        .output()
        .map(|s| s.lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|_| format!("{cmd}: unknown version"))
}

/// Run the suite; the report is also written to `opts.out`.
pub fn run(opts: &Options, progress: &dyn Fn(&str)) -> Result<Report> {
    proc::install_signal_handling();
    let started = Instant::now();
    let plan = opts.plan();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Invalid(
            "cstore bench suite needs root (loop devices, mounts, cgroups, dropping the page cache)".into(),
        ));
    }
    if opts.classes.is_empty() {
        return Err(Error::Invalid("no classes to run".into()));
    }
    if opts.density_cmd.is_empty() {
        return Err(Error::Invalid("the density command is empty".into()));
    }
    for (tool, what) in [
        ("fio", "the classes' limits and the I/O workloads"),
        ("losetup", "the emulated classes"),
        ("mkfs.ext4", "the emulated classes"),
        ("mount", "the emulated classes"),
        ("cp", "the policy workload"),
        ("containerd", "the peer"),
        ("ctr", "the peer"),
        ("runc", "the peer"),
        ("unshare", "the peer's mount namespace"),
        ("nsenter", "the peer's mount namespace"),
    ] {
        if !proc::have(tool) {
            return Err(Error::MissingTool {
                tool: tool.into(),
                what: what.into(),
            });
        }
    }
    if !opts.cstore.exists() {
        return Err(Error::MissingTool {
            tool: opts.cstore.display().to_string(),
            what: "the cstore being measured".into(),
        });
    }
    let run_id = run_id();
    let dir = opts.work_parent.join(format!("cstore-bench-{run_id}"));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("mkdir", &dir, e))?;
    let work = Work {
        dir: dir.clone(),
        run_id: run_id.clone(),
    };
    progress(&format!("run {run_id}, work directory {}", dir.display()));
    let sizes = Sizes {
        fs_bytes: if opts.quick { 4 << 30 } else { 16 << 30 },
    };
    let tmpfs = dir.join("backing");
    let emulated = opts.classes.iter().any(|k| *k != ClassKind::Host);
    if emulated {
        std::fs::create_dir(&tmpfs).map_err(|e| Error::io("mkdir", &tmpfs, e))?;
        // Sized as one class (they run one at a time); only what is
        // written takes memory, and fstrim gives back what is removed.
        Cmd::new("mount", "mounting the tmpfs under the emulated classes")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={},mode=0700", sizes.fs_bytes + (64 << 20)))
            .arg("tmpfs")
            .arg(&tmpfs)
            .output()?;
    }

    let mut report = Report {
        schema: report::SCHEMA,
        run_id: run_id.clone(),
        quick: opts.quick,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        seconds: 0.0,
        machine: sys::machine(),
        cstore_version: version(&opts.cstore.to_string_lossy(), &["--version"]),
        peers: vec![
            version("containerd", &["--version"]),
            version("runc", &["--version"]),
            version("fio", &["--version"]),
        ],
        image: opts.image.clone(),
        density_cmd: opts.density_cmd.clone(),
        rounds: plan.rounds,
        classes: Vec::new(),
        notes: notes(),
    };
    let mut ctx = workload::Ctx {
        cstore: &opts.cstore,
        image: &opts.image,
        ctr_plain_http: opts.plain_http || loopback_registry(&opts.image),
        cstore_plain_http: opts.plain_http,
        run_id: &run_id,
        plan: &plan,
        density_cmd: &opts.density_cmd,
        lazy_unavailable: None,
        progress,
    };
    // Once for every class: run --lazy finds the index in the registry.
    progress("publishing the image's lazy index (cstore index build + push)");
    let lazy = workload::publish_index(&ctx, &dir)?.err();
    if let Some(why) = &lazy {
        progress(&format!("lazy start will not be measured: {why}"));
    }
    ctx.lazy_unavailable = lazy.as_deref();
    for &kind in &opts.classes {
        proc::check()?;
        progress(&format!("{}: setting up {}", kind.name(), kind.title()));
        let class = match kind {
            ClassKind::Host => Class::host(&opts.host_path, &run_id, &opts.cstore)?,
            k => Class::emulated(k, &tmpfs, &dir, &run_id, &opts.cstore, &sizes)?,
        };
        progress(&format!(
            "{}: {} · {} · {} (cstore's probe: {}; policy: {})",
            kind.name(),
            class.info.device,
            class.info.device_detail,
            class.info.filesystem,
            class.info.probe.kind,
            class.info.probe.policy.reason
        ));
        let r = workload::run_class(&ctx, &class);
        if r.is_err() {
            // Failed or stopped midway: containers may still run in their
            // own cgroups (cstore's /cstore/RUN_ID-*, runc's /RUN_ID/*).
            // Killed first, so nothing keeps the class's mounts busy.
            for cg in our_cgroups(&run_id) {
                if let Err(e) = sys::remove_cgroup(&cg) {
                    eprintln!("cstore bench suite: cleanup: {e}");
                }
            }
        }
        drop(class);
        report.classes.push(r?);
    }
    drop(work);
    let left = leftovers(&run_id, &dir);
    if !left.is_empty() {
        return Err(Error::LeftBehind(left));
    }
    report.seconds = started.elapsed().as_secs_f64();
    write_report(&report, &opts.out)?;
    progress(&format!(
        "report: {}",
        REPORT_FILES
            .iter()
            .map(|f| opts.out.join(f).display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(report)
}

/// What the figures do and do not show, on every report.
fn notes() -> Vec<String> {
    vec![
        "Emulated classes are ext4 on a loop device over a file on tmpfs. SATA is throttled with cgroup v1 blkio limits on that loop device for the processes the suite starts (cstore, fio, containerd and its shims, ctr). v1 throttles reads and O_DIRECT writes only: buffered writes are written back by the kernel outside any cgroup, so they are not throttled, and a container's own process runs in its own cgroup (cstore's or runc's), so its reads are not throttled either.".into(),
        "The emulated HDD is not throttled: its loop device (direct I/O) is over a file the suite serves through FUSE after a modelled 7200 rpm disk's time per request: a seek (none when the request starts where the last one ended, else 0.8 ms + 12 ms × sqrt(distance / disk size)), a rotational wait set by the offset (0–8.3 ms), the transfer at 150 MB/s, one request at a time in arrival order (docs/hddmodel.md). Everything that reaches the device pays, whoever submitted it (the flusher's write-back too), after the block layer merged it, and the order of requests matters as on a disk.".into(),
        "Each class's limits were measured with fio (io_uring, O_DIRECT, one job) before its workloads ran. Figures are medians over rounds with min and max; the page cache was dropped before every measured run; cstore and its peer alternate within each round.".into(),
        "Cold cache: before every measured run the page cache is dropped and then only the tools' own executables (cstore, ctr, nsenter, runc, the shim, containerd) are read back: they live on the root disk, not on the class. A running containerd's pages stay resident (mapped pages are not dropped); cstore has no daemon.".into(),
        "Lazy start: the image's index is published to its registry once, before the classes run (cstore index build + push, not measured); each measured run starts from an empty store. The store's lazy daemon is stopped once the container has exited: completing the layers in the background is not measured, though it competes with the start while the container runs.".into(),
        "containerd runs in a mount namespace of its own (ctr joins it through nsenter, a few milliseconds per ctr command).".into(),
    ]
}

/// report.json, report.html and report.md into `out`, each written whole
/// under a temporary name and renamed.
pub fn write_report(r: &Report, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io("mkdir", out, e))?;
    let json = serde_json::to_string_pretty(r).map_err(|e| Error::Output {
        what: "the report".into(),
        detail: e.to_string(),
    })?;
    for (name, body) in [
        ("report.json", json),
        ("report.html", report::html(r)?),
        ("report.md", report::markdown(r)),
    ] {
        let tmp = out.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).map_err(|e| Error::io("write", &tmp, e))?;
        std::fs::rename(&tmp, out.join(name)).map_err(|e| Error::io("rename", &tmp, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognized() {
        assert!(loopback_registry("127.0.0.1:5000/bench:latest"));
        assert!(loopback_registry("localhost/x"));
        assert!(!loopback_registry("registry.example:5000/x"));
        assert!(!loopback_registry("busybox"));
    }
}
