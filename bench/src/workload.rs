//! The workloads, run on one class: fio's limits first, then pull + unpack,
//! density, raw I/O and (on some classes) the HDD policy against the NVMe
//! policy. cstore and its peer alternate within every round, and the page
//! cache is dropped before every measured run.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use crate::class::{self, Class, ClassKind};
use crate::containerd::Containerd;
use crate::error::{Error, Result};
use crate::proc::{self, Cmd};
use crate::report::{ClassReport, Limit, Measurement, NamedPolicy, Skipped, Stat};
use crate::sys;

/// How much to run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub rounds: usize,
    pub density: Vec<u32>,
    /// Seconds per fio / bench io run.
    pub io_runtime: f64,
    /// Bytes of the file the I/O runs use.
    pub io_size: u64,
    /// Classes where the HDD policy is run against the NVMe policy.
    pub policy_classes: Vec<ClassKind>,
}

pub struct Ctx<'a> {
    pub cstore: &'a Path,
    pub image: &'a str,
    /// ctr needs --plain-http (a registry on loopback, or asked for).
    pub ctr_plain_http: bool,
    /// cstore too (asked for; cstore falls back by itself on loopback).
    pub cstore_plain_http: bool,
    pub run_id: &'a str,
    pub plan: &'a Plan,
    pub density_cmd: &'a [String],
    /// Why the lazy-start workload cannot run (its index could not be
    /// published), or None.
    pub lazy_unavailable: Option<&'a str>,
    pub progress: &'a dyn Fn(&str),
}

impl Ctx<'_> {
    fn say(&self, class: &Class, msg: &str) {
        (self.progress)(&format!("{}: {msg}", class.info.kind.name()));
    }

    fn cstore(&self, class: &Class, root: &Path, what: &str) -> Cmd {
        Cmd::new(self.cstore, what)
            .arg("--root")
            .arg(root)
            .cgroup(class.cgroup.as_deref())
    }
}

fn measurement(
    workload: &str,
    tool: &str,
    metric: &str,
    n: Option<u32>,
    unit: &str,
    lower_is_better: bool,
    samples: &[f64],
) -> Measurement {
    Measurement {
        workload: workload.into(),
        tool: tool.into(),
        metric: metric.into(),
        n,
        unit: unit.into(),
        lower_is_better,
        stat: Stat::of(samples),
        redone: 0,
    }
}

/// Cold cache for the class: drop the page cache, then read the tools'
/// own executables back in. They live on the root disk, not on the class,
/// so their cold start would measure the root disk; a running containerd's
/// pages stay resident anyway (mapped pages are not dropped).
fn cold(ctx: &Ctx) -> Result<()> {
    sys::drop_caches()?;
    let mut files = vec![ctx.cstore.to_path_buf()];
    for tool in [
        "ctr",
        "nsenter",
        "runc",
        "containerd-shim-runc-v2",
        "containerd",
    ] {
        if let Some(p) = proc::which(tool) {
            files.push(p);
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        if let Ok(mut f) = std::fs::File::open(&f) {
            while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
        }
    }
    Ok(())
}

/// Remove what a round left on the class and give its space back: an
/// emulated class's backing file is on tmpfs, where deleted blocks keep
/// their memory until the filesystem discards them (fstrim, not measured).
fn fresh(class: &Class, p: &Path) -> Result<()> {
    remove_tree(p)?;
    if class.info.emulated {
        Cmd::new("fstrim", "discarding freed blocks of the class")
            .arg(&class.dir)
            .output()?;
    }
    Ok(())
}

fn remove_tree(p: &Path) -> Result<()> {
    for m in sys::mounts_under(p) {
        sys::umount(&m)?;
    }
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", p, e)),
    }
}

/// Everything on one class.
pub fn run_class(ctx: &Ctx, class: &Class) -> Result<ClassReport> {
    let mut report = ClassReport {
        class: class.info.clone(),
        limits: Vec::new(),
        results: Vec::new(),
        skipped: Vec::new(),
        policies: Vec::new(),
    };
    report.limits = limits(ctx, class)?;

    let (pull, ctrd, cs_root) = pull(ctx, class)?;
    report.results.extend(pull);
    report.results.extend(density(ctx, class, &cs_root, &ctrd)?);
    drop(ctrd);
    remove_tree(&class.dir.join("ctrd"))?;
    fresh(class, &cs_root)?;

    match ctx.lazy_unavailable {
        None => report.results.extend(lazy_start(ctx, class)?),
        Some(why) => report.skipped.push(Skipped {
            workload: "lazy-start".into(),
            why: why.into(),
        }),
    }

    report.results.extend(io(ctx, class)?);

    if ctx.plan.policy_classes.contains(&class.info.kind) {
        let (m, policies) = policy(ctx, class)?;
        report.results.extend(m);
        report.policies = policies;
    } else {
        report.skipped.push(Skipped {
            workload: "policy".into(),
            why: "the HDD policy is compared with the NVMe policy on the HDD class only".into(),
        });
    }
    Ok(report)
}

// ---------------------------------------------------------------- fio

struct IoFigure {
    iops: f64,
    bytes_per_s: f64,
}

fn io_file(class: &Class) -> PathBuf {
    class.dir.join("io.dat")
}

/// fio with `jobs` jobs (each its own ring) of `qd` I/Os in flight.
fn fio(ctx: &Ctx, class: &Class, rw: &str, bs: &str, qd: u32, jobs: u64) -> Result<IoFigure> {
    let out = Cmd::new("fio", "fio on the class")
        .arg("--name=bench")
        .arg(format!("--filename={}", io_file(class).display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--size={}", ctx.plan.io_size))
        .arg(format!("--runtime={}", ctx.plan.io_runtime))
        .args([
            "--ioengine=io_uring",
            "--direct=1",
            "--time_based",
            "--group_reporting",
            "--output-format=json",
        ])
        .arg(format!("--numjobs={jobs}"))
        .cgroup(class.cgroup.as_deref())
        .output()?;
    // fio may print notes before its JSON.
    let json = out.find('{').map_or("", |i| &out[i..]);
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| Error::Output {
        what: "fio --output-format=json".into(),
        detail: e.to_string(),
    })?;
    let j = &v["jobs"][0];
    let f = |k: &str| j["read"][k].as_f64().unwrap_or(0.0) + j["write"][k].as_f64().unwrap_or(0.0);
    Ok(IoFigure {
        iops: f("iops"),
        bytes_per_s: f("bw_bytes"),
    })
}

fn bench_io(ctx: &Ctx, class: &Class, rw: &str, bs: &str, qd: u32, rings: u64) -> Result<IoFigure> {
    let out = Cmd::new(ctx.cstore, "cstore bench io on the class")
        .args(["bench", "io", "--rw", rw, "--bs", bs])
        .arg("--qd")
        .arg(qd.to_string())
        .arg("--rings")
        .arg(rings.to_string())
        .arg("--size")
        .arg(ctx.plan.io_size.to_string())
        .arg("--runtime")
        .arg(ctx.plan.io_runtime.to_string())
        .args(["--direct", "--json"])
        .arg(io_file(class))
        .cgroup(class.cgroup.as_deref())
        .output()?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| Error::Output {
        what: "cstore bench io --json".into(),
        detail: e.to_string(),
    })?;
    Ok(IoFigure {
        iops: v["iops"].as_f64().unwrap_or(0.0),
        bytes_per_s: v["mb_per_s"].as_f64().unwrap_or(0.0) * 1e6,
    })
}

/// The class as fio sees it, before anything else runs.
fn limits(ctx: &Ctx, class: &Class) -> Result<Vec<Limit>> {
    let mut out = Vec::new();
    for (name, rw, bs, qd) in [
        ("4k randread qd32", "randread", "4k", 32),
        ("1m read qd8", "read", "1m", 8),
        ("1m write qd8", "write", "1m", 8),
    ] {
        let f = fio(ctx, class, rw, bs, qd, 1)?;
        ctx.say(
            class,
            &format!(
                "fio limit {name}: {:.0} IOPS, {:.1} MB/s",
                f.iops,
                f.bytes_per_s / 1e6
            ),
        );
        out.push(Limit {
            name: name.into(),
            iops: f.iops,
            mb_per_s: f.bytes_per_s / 1e6,
        });
    }
    Ok(out)
}

/// Both tools with as many rings (fio: jobs) as cstore's policy gives the
/// class: one on a rotational device, one per core on memory or NVMe.
fn io(ctx: &Ctx, class: &Class) -> Result<Vec<Measurement>> {
    let mut out = Vec::new();
    let rings = class.info.probe.policy.rings.max(1);
    for (workload, rw, bs, qd, metric, unit) in [
        ("io-4k-randread", "randread", "4k", 32, "iops", "IOPS"),
        ("io-1m-read", "read", "1m", 8, "mb/s", "MB/s"),
    ] {
        let (mut f, mut c) = (Vec::new(), Vec::new());
        for r in 0..ctx.plan.rounds {
            let pick = |x: IoFigure| {
                if metric == "iops" {
                    x.iops
                } else {
                    x.bytes_per_s / 1e6
                }
            };
            let a = pick(fio(ctx, class, rw, bs, qd, rings)?);
            let b = pick(bench_io(ctx, class, rw, bs, qd, rings)?);
            ctx.say(
                class,
                &format!(
                    "{workload} round {}/{}: fio {a:.1} {unit}, cstore {b:.1} {unit}",
                    r + 1,
                    ctx.plan.rounds
                ),
            );
            f.push(a);
            c.push(b);
        }
        out.push(measurement(workload, "fio", metric, None, unit, false, &f));
        out.push(measurement(
            workload, "cstore", metric, None, unit, false, &c,
        ));
    }
    let _ = std::fs::remove_file(io_file(class));
    if class.info.emulated {
        Cmd::new("fstrim", "discarding freed blocks of the class")
            .arg(&class.dir)
            .output()?;
    }
    Ok(out)
}

// ---------------------------------------------------------------- pull

/// Pull + unpack by both tools, each into a fresh root, cold cache. Leaves
/// the last round's cstore store and containerd (with the image) for density.
fn pull(ctx: &Ctx, class: &Class) -> Result<(Vec<Measurement>, Containerd, PathBuf)> {
    let cs_root = class.dir.join("cstore");
    let ctr_dir = class.dir.join("ctrd");
    let (mut cs, mut ct) = (Vec::new(), Vec::new());
    // The same pulls to the point where each tool's layers are on the disk:
    // cstore syncs before it commits, containerd 1.6 leaves its unpacked
    // files to the kernel's write-back (2.0 has `sync_fs` for that), so a
    // syncfs of each tool's root after it returns is the like-for-like end.
    let (mut cs_d, mut ct_d) = (Vec::new(), Vec::new());
    let mut ctrd: Option<Containerd> = None;
    for r in 0..ctx.plan.rounds {
        fresh(class, &cs_root)?;
        cold(ctx)?;
        let mut cmd = ctx.cstore(class, &cs_root, "cstore pull").arg("pull");
        if ctx.cstore_plain_http {
            cmd = cmd.arg("--plain-http");
        }
        let (_, t) = cmd.arg(ctx.image).timed()?;
        let ts = sys::syncfs_timed(&cs_root)?;
        cs.push(t.as_secs_f64());
        cs_d.push((t + ts).as_secs_f64());

        drop(ctrd.take());
        fresh(class, &ctr_dir)?;
        let c = Containerd::start(&ctr_dir, ctx.run_id, class.cgroup.as_deref())?;
        cold(ctx)?;
        let mut cmd = c.ctr("ctr image pull").args(["image", "pull"]);
        if ctx.ctr_plain_http {
            cmd = cmd.arg("--plain-http");
        }
        let (_, u) = cmd.arg(ctx.image).timed()?;
        let us = sys::syncfs_timed(&ctr_dir)?;
        ct.push(u.as_secs_f64());
        ct_d.push((u + us).as_secs_f64());
        ctrd = Some(c);
        ctx.say(
            class,
            &format!(
                "pull + unpack round {}/{}: cstore {:.2} s, ctr {:.2} s; on disk (+ syncfs): cstore {:.2} s, ctr {:.2} s",
                r + 1,
                ctx.plan.rounds,
                t.as_secs_f64(),
                u.as_secs_f64(),
                (t + ts).as_secs_f64(),
                (u + us).as_secs_f64()
            ),
        );
    }
    let ctrd = ctrd.ok_or_else(|| Error::Invalid("at least one round is needed".into()))?;
    Ok((
        vec![
            measurement("pull", "cstore", "seconds", None, "s", true, &cs),
            measurement("pull", "ctr", "seconds", None, "s", true, &ct),
            measurement("pull-durable", "cstore", "seconds", None, "s", true, &cs_d),
            measurement("pull-durable", "ctr", "seconds", None, "s", true, &ct_d),
        ],
        ctrd,
        cs_root,
    ))
}

// ---------------------------------------------------------------- density

/// When the last of `cmds`, started at once, wrote its first byte and
/// exited (seconds from the start), and how many exited without writing
/// anything (ctr run sometimes loses a short-lived container's output).
struct Started {
    first: f64,
    exit: f64,
    lost: usize,
}

fn start_all(cmds: &[Cmd]) -> Result<Started> {
    start_all_since(Instant::now(), cmds)
}

/// As [`start_all`], the times counted from `t0` (before a pull, say).
fn start_all_since(t0: Instant, cmds: &[Cmd]) -> Result<Started> {
    let mut running = Vec::with_capacity(cmds.len());
    for c in cmds {
        let err = tempfile()?;
        let r = c.spawn(
            Stdio::piped(),
            Stdio::from(err.try_clone().map_err(|e| Error::io("dup", "stderr", e))?),
        )?;
        running.push((r, err));
    }
    let results: Vec<Result<(Option<f64>, f64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = running
            .into_iter()
            .map(|(mut r, mut err)| {
                s.spawn(move || -> Result<(Option<f64>, f64)> {
                    let mut out = r.child.stdout.take().expect("piped stdout");
                    let mut buf = [0u8; 4096];
                    let mut first = None;
                    let mut got = Vec::new();
                    loop {
                        match out.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                                got.extend_from_slice(&buf[..n]);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(Error::io("read", "a container's stdout", e)),
                        }
                    }
                    let st = r.wait()?;
                    let exit = t0.elapsed().as_secs_f64();
                    let mut stderr = || {
                        use std::io::Seek;
                        let mut s = String::new();
                        let _ = err.seek(std::io::SeekFrom::Start(0));
                        let _ = err.read_to_string(&mut s);
                        proc::tail(&s, 20)
                    };
                    if !st.success() {
                        return Err(Error::Command {
                            what: "a density container".into(),
                            cmd: r.cmd.display(),
                            status: proc::describe(st),
                            stderr: stderr(),
                        });
                    }
                    Ok((first, exit))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("a density thread panicked".into())))
            })
            .collect()
    });
    let mut out = Started {
        first: 0.0,
        exit: 0.0,
        lost: 0,
    };
    // An interruption wins over the errors it caused.
    proc::check()?;
    for r in results {
        let (f, e) = r?;
        match f {
            Some(f) => out.first = out.first.max(f),
            None => out.lost += 1,
        }
        out.exit = out.exit.max(e);
    }
    Ok(out)
}

fn tempfile() -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open("/tmp")
        .map_err(|e| Error::io("create a temp file in", "/tmp", e))
}

fn density(
    ctx: &Ctx,
    class: &Class,
    cs_root: &Path,
    ctrd: &Containerd,
) -> Result<Vec<Measurement>> {
    let mut out = Vec::new();
    for &n in &ctx.plan.density {
        let mut s: [(Vec<f64>, Vec<f64>); 2] = Default::default();
        let mut redone = [0u32; 2];
        for r in 0..ctx.plan.rounds {
            // Which tool goes first alternates by round: what the first start
            // of a round leaves behind (write-back still going on the class,
            // the registry's and the image's pages) falls on each in turn. With
            // cstore always first, ctr measured faster in the suite than in the
            // same runs alternated by hand (docs/benchmarks.md, HDD density).
            let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
            for t in order {
                let tool = ["cstore", "ctr"][t];
                let cmds: Vec<Cmd> = (0..n)
                    .map(|i| {
                        let id = format!("{}-{n}-{r}-{i}", ctx.run_id);
                        match tool {
                            "cstore" => ctx
                                .cstore(class, cs_root, "cstore run")
                                .args(["run", "--rm", "--name", &id, ctx.image])
                                .args(ctx.density_cmd),
                            _ => ctrd
                                .ctr("ctr run")
                                .args(["run", "--rm", ctx.image, &id])
                                .args(ctx.density_cmd),
                        }
                    })
                    .collect();
                // A round where the tool lost a container's output has no
                // "all first outputs": measured again, up to 3 times.
                let mut tries = 0;
                let Started { first, exit, .. } = loop {
                    cold(ctx)?;
                    let st = start_all(&cmds)?;
                    if st.lost == 0 {
                        break st;
                    }
                    tries += 1;
                    if tries == 3 {
                        return Err(Error::Output {
                            what: format!("density N={n} with {tool}"),
                            detail: format!(
                                "{} of {n} containers exited 0 without output, {tries} times in a row",
                                st.lost
                            ),
                        });
                    }
                    redone[t] += 1;
                    ctx.say(
                        class,
                        &format!(
                            "density N={n} round {}: {tool} lost the output of {} of {n} containers (exit 0, nothing on stdout): measuring the round again",
                            r + 1,
                            st.lost
                        ),
                    );
                };
                ctx.say(
                    class,
                    &format!(
                        "density N={n} round {}/{}: {tool} all first outputs {first:.3} s, all exited {exit:.3} s",
                        r + 1,
                        ctx.plan.rounds
                    ),
                );
                s[t].0.push(first);
                s[t].1.push(exit);
            }
        }
        for (t, tool) in ["cstore", "ctr"].into_iter().enumerate() {
            for (metric, samples) in [("first-output", &s[t].0), ("all-exited", &s[t].1)] {
                let mut m = measurement("density", tool, metric, Some(n), "s", true, samples);
                m.redone = redone[t];
                out.push(m);
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- lazy start

/// Publish the image's lazy index (`cstore index build` + `index push`,
/// from a scratch store under `dir`, removed after), so that `run --lazy`
/// finds it in the registry as any other store would. Not measured. Err is
/// why the lazy-start workload cannot run.
pub fn publish_index(ctx: &Ctx, dir: &Path) -> Result<std::result::Result<(), String>> {
    let root = dir.join("lazy-index");
    let mut out = Ok(());
    for what in ["build", "push"] {
        let mut cmd = Cmd::new(ctx.cstore, format!("cstore index {what}"))
            .arg("--root")
            .arg(&root)
            .args(["index", what]);
        if ctx.cstore_plain_http {
            cmd = cmd.arg("--plain-http");
        }
        let cmd = cmd.arg(ctx.image);
        match cmd.output() {
            Ok(_) => {}
            Err(Error::Command { stderr, .. }) => {
                out = Err(format!(
                    "cstore index {what} {} failed: {}",
                    ctx.image,
                    stderr.trim()
                ));
                break;
            }
            Err(e) => {
                remove_tree(&root)?;
                return Err(e);
            }
        }
    }
    remove_tree(&root)?;
    Ok(out)
}

/// A store's lazy keeper and daemon (`cstore --root ROOT lazy-keeper`, which
/// restarts `lazy-serve`; started by `run --lazy` in a session of its own, so the suite's process groups do
/// not reach it) is killed when this is dropped: after the measurement, or
/// when the suite fails or is stopped midway. Completing the layers in the
/// background is not what the workload measures, and the store goes next.
struct LazyDaemons<'a> {
    root: &'a Path,
}

impl LazyDaemons<'_> {
    fn pids(&self) -> Vec<u32> {
        let root = self.root.to_string_lossy();
        let me = std::process::id();
        proc::all_pids()
            .into_iter()
            .filter(|&p| p != me)
            .filter(|&p| {
                let c = proc::cmdline(p);
                c.contains(&*root) && (c.contains("lazy-serve") || c.contains("lazy-keeper"))
            })
            .collect()
    }
}

impl Drop for LazyDaemons<'_> {
    fn drop(&mut self) {
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for p in pids {
                proc::kill(p, libc::SIGKILL);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!(
            "cstore bench suite: cleanup: the lazy daemon of {} did not die",
            self.root.display()
        );
    }
}

/// Lazy start: a fresh store, cold cache, the time from the command to the
/// container's first output and to its exit, `cstore run --lazy` (the index
/// published beforehand) against the full path, `cstore pull` + `cstore
/// run`, alternating within each round.
fn lazy_start(ctx: &Ctx, class: &Class) -> Result<Vec<Measurement>> {
    let root = class.dir.join("lazy");
    let mut s: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    for r in 0..ctx.plan.rounds {
        for (t, tool) in LAZY_TOOLS.into_iter().enumerate() {
            fresh(class, &root)?;
            let daemons = LazyDaemons { root: &root };
            let name = format!("{}-lazy-{r}-{t}", ctx.run_id);
            let run = ctx
                .cstore(class, &root, "cstore run")
                .args(["run", "--rm", "--name", &name]);
            let run = match (t, ctx.cstore_plain_http) {
                (0, true) => run.args(["--lazy", "--plain-http"]),
                (0, false) => run.arg("--lazy"),
                _ => run,
            };
            let run = run.arg(ctx.image).args(ctx.density_cmd);
            cold(ctx)?;
            let t0 = Instant::now();
            if t == 1 {
                let mut pull = ctx.cstore(class, &root, "cstore pull").arg("pull");
                if ctx.cstore_plain_http {
                    pull = pull.arg("--plain-http");
                }
                pull.arg(ctx.image).output()?;
            }
            let st = start_all_since(t0, std::slice::from_ref(&run))?;
            drop(daemons);
            // run --lazy starts the store's daemon only for layers it pulled
            // lazily: without one, the image came whole and the figure
            // would be a full pull's under the lazy name.
            if t == 0 && !root.join("lazy/daemon.log").exists() {
                return Err(Error::Output {
                    what: format!("lazy start of {}", ctx.image),
                    detail: "cstore run --lazy started no lazy daemon: no layer was pulled lazily (was the index not found in the registry?)".into(),
                });
            }
            if st.lost > 0 {
                return Err(Error::Output {
                    what: format!("lazy start with {tool}"),
                    detail: "the container exited 0 without output".into(),
                });
            }
            ctx.say(
                class,
                &format!(
                    "lazy start round {}/{}: {tool} first output {:.3} s, exited {:.3} s",
                    r + 1,
                    ctx.plan.rounds,
                    st.first,
                    st.exit
                ),
            );
            s[t].0.push(st.first);
            s[t].1.push(st.exit);
        }
    }
    fresh(class, &root)?;
    let mut out = Vec::new();
    for (t, tool) in LAZY_TOOLS.into_iter().enumerate() {
        out.push(measurement(
            "lazy-start",
            tool,
            "first-output",
            None,
            "s",
            true,
            &s[t].0,
        ));
        out.push(measurement(
            "lazy-start",
            tool,
            "exited",
            None,
            "s",
            true,
            &s[t].1,
        ));
    }
    Ok(out)
}

/// The lazy-start workload's two sides: ours, then its peer (the full path).
pub const LAZY_TOOLS: [&str; 2] = ["run --lazy", "pull + run"];

// ---------------------------------------------------------------- policy

const POLICIES: [&str; 2] = ["rotational", "nvme"];

/// cstore with the rotational (HDD) policy against cstore with the NVMe
/// policy (`CSTORE_POLICY`), same class: pull + unpack into a fresh root,
/// and unpack alone from blobs on the class (cold cache).
fn policy(ctx: &Ctx, class: &Class) -> Result<(Vec<Measurement>, Vec<NamedPolicy>)> {
    let mut views = Vec::new();
    for p in POLICIES {
        let (probe, _, _) = class::probe_with(ctx.cstore, &class.dir, Some(p))?;
        views.push(NamedPolicy {
            name: p.into(),
            policy: probe.policy,
        });
    }
    let root = class.dir.join("policy");
    let blobs = class.dir.join("policy-blobs");
    let mut pull_s: [Vec<f64>; 2] = Default::default();
    let mut unpack_s: [Vec<f64>; 2] = Default::default();
    let mut cmd = ctx
        .cstore(class, &blobs, "cstore pull --no-unpack")
        .args(["pull", "--no-unpack"]);
    if ctx.cstore_plain_http {
        cmd = cmd.arg("--plain-http");
    }
    cmd.arg(ctx.image).output()?;
    for r in 0..ctx.plan.rounds {
        for (i, p) in POLICIES.into_iter().enumerate() {
            fresh(class, &root)?;
            cold(ctx)?;
            let mut cmd = ctx
                .cstore(class, &root, "cstore pull (policy)")
                .env("CSTORE_POLICY", p)
                .arg("pull");
            if ctx.cstore_plain_http {
                cmd = cmd.arg("--plain-http");
            }
            let (_, t) = cmd.arg(ctx.image).timed()?;
            pull_s[i].push(t.as_secs_f64());

            fresh(class, &root)?;
            // The copy is not measured: outside the class's cgroup.
            Cmd::new("cp", "copying the policy run's blobs")
                .arg("-a")
                .arg(&blobs)
                .arg(&root)
                .output()?;
            cold(ctx)?;
            let (_, u) = ctx
                .cstore(class, &root, "cstore unpack (policy)")
                .env("CSTORE_POLICY", p)
                .args(["unpack", ctx.image])
                .timed()?;
            unpack_s[i].push(u.as_secs_f64());
            ctx.say(
                class,
                &format!(
                    "policy round {}/{}: {p} policy: pull + unpack {:.2} s, unpack {:.2} s",
                    r + 1,
                    ctx.plan.rounds,
                    t.as_secs_f64(),
                    u.as_secs_f64()
                ),
            );
        }
    }
    remove_tree(&root)?;
    fresh(class, &blobs)?;
    let mut out = Vec::new();
    for (i, p) in POLICIES.into_iter().enumerate() {
        out.push(measurement(
            "policy-pull",
            p,
            "seconds",
            None,
            "s",
            true,
            &pull_s[i],
        ));
        out.push(measurement(
            "policy-unpack",
            p,
            "seconds",
            None,
            "s",
            true,
            &unpack_s[i],
        ));
    }
    Ok((out, views))
}
