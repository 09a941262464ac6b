//! `cstore bench suite --quick` on the emulated classes (HDD, SATA SSD,
//! NVMe-like loop devices) against a real registry, containerd 1.6 + runc
//! and fio: every workload produced its figures, the JSON deserializes into
//! the suite's own types and holds together, the HDD class is what it claims
//! (fio lands near its disk model's limits), nothing is left behind (loop devices,
//! mounts, cgroups, processes), the HTML report renders its plots in a real
//! headless chromium, and a SIGINT in the middle of a run cleans up too.
//! Lazy start (`run --lazy` against `pull` + `run`) has its figures on
//! every class, measured from lazily pulled layers.
//!
//! Needs root, fio, containerd, ctr, runc and chromium (fixtures/deps.sh).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cstore_bench::report::{Report, SCHEMA};
use cstore_bench::ClassKind;

use crate::harness::Registry;

/// One quick run, shared by the tests that read its results.
struct QuickRun {
    dir: PathBuf,
    run_id: String,
    report: Report,
}

/// The shared run's registry and directory: statics are never dropped, so
/// they go at process exit (as the harness's shared registry does).
static KEEP: Mutex<Option<(Registry, tempfile::TempDir)>> = Mutex::new(None);

extern "C" fn drop_kept() {
    if let Ok(mut k) = KEEP.lock() {
        k.take();
    }
}

fn quick_run() -> &'static QuickRun {
    static RUN: OnceLock<QuickRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let registry = Registry::start(&[]);
        registry.push(None);
        let image = registry.image("busybox:latest");
        let dir = tempfile::Builder::new()
            .prefix("cstore-bench-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let t0 = Instant::now();
        let out = suite_cmd(dir.path(), &image, &["--classes", "hdd,sata,nvme"])
            .output()
            .expect("run cstore bench suite");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "cstore bench suite --quick failed:\n{stderr}"
        );
        eprintln!("quick suite took {:.0} s", t0.elapsed().as_secs_f64());
        let run_id = run_id_of(&stderr).unwrap_or_else(|| panic!("no run id in:\n{stderr}"));
        let json = std::fs::read_to_string(dir.path().join("out/report.json")).unwrap();
        let report: Report = serde_json::from_str(&json).expect("report.json deserializes");
        // stdout is the markdown report.
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("| workload | metric | N |"), "{stdout}");
        let run = QuickRun {
            dir: dir.path().to_path_buf(),
            run_id,
            report,
        };
        *KEEP.lock().unwrap() = Some((registry, dir));
        // SAFETY: registering a plain extern "C" fn to run at exit.
        unsafe { libc::atexit(drop_kept) };
        run
    })
}

fn suite_cmd(dir: &Path, image: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cstore"));
    c.args(["bench", "suite", "--quick", "--image", image])
        .arg("--work-dir")
        .arg(dir)
        .arg("--path")
        .arg(dir)
        .arg("--out")
        .arg(dir.join("out"))
        .args(extra)
        .env("DOCKER_CONFIG", dir.join("no-docker-config"))
        .env_remove("CSTORE_POLICY")
        .stdin(Stdio::null());
    c
}

/// The run id from the first progress line ("[ 0:00] run csb-..., work ...").
fn run_id_of(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|l| {
        let rest = l.split("] run ").nth(1)?;
        Some(rest.split(',').next()?.trim().to_string())
    })
}

/// What a run left on the machine, found independently of the suite's own
/// sweep: mounts under `dir`, loop devices over files under it, cgroups
/// named after the run (its throttle groups, runc's /RUN_ID, cstore's
/// /cstore/RUN_ID-*), processes naming either.
fn left_behind(run_id: &str, dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let d = dir.to_string_lossy().into_owned();
    for l in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
    {
        let f: Vec<&str> = l.split(' ').collect();
        if f[4].starts_with(&d) || f.iter().skip(5).any(|x| x.starts_with(&d)) {
            v.push(format!("mount: {l}"));
        }
    }
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            if b.trim().starts_with(&d) {
                v.push(format!("loop device {:?} over {}", e.file_name(), b.trim()));
            }
        }
    }
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        for sub in [h.path(), h.path().join("cstore")] {
            for e in std::fs::read_dir(&sub).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().contains(run_id) {
                    v.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
    }
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        if cmd.contains(&d) || cmd.contains(run_id) {
            v.push(format!("process {pid}: {cmd}"));
        }
    }
    v
}

#[test]
fn quick_suite_produces_every_workloads_figures_as_valid_json() {
    let run = quick_run();
    let r = &run.report;
    assert_eq!(r.schema, SCHEMA);
    assert!(r.quick);
    assert_eq!(r.run_id, run.run_id);
    assert_eq!(
        r.machine.kernel,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
    );
    assert!(r.machine.cpus >= 1 && !r.machine.cpu_model.is_empty());
    let kinds: Vec<ClassKind> = r.classes.iter().map(|c| c.class.kind).collect();
    assert_eq!(kinds, [ClassKind::Hdd, ClassKind::Sata, ClassKind::Nvme]);
    for c in &r.classes {
        let name = c.class.kind.name();
        assert!(c.class.emulated, "{name}");
        assert!(
            c.class.device.starts_with("loop"),
            "{name}: {:?}",
            c.class.device
        );
        assert!(
            c.class.filesystem.starts_with("ext4"),
            "{name}: {:?}",
            c.class.filesystem
        );
        assert!(!c.class.probe.policy.reason.is_empty(), "{name}");
        assert_eq!(c.limits.len(), 3, "{name}: {:?}", c.limits);
        for l in &c.limits {
            assert!(
                l.iops > 0.0 && l.mb_per_s > 0.0 && l.iops.is_finite(),
                "{name}: {l:?}"
            );
        }
        let mut expected: Vec<(&str, &str, &str, Option<u32>)> = vec![
            ("pull", "cstore", "seconds", None),
            ("pull", "ctr", "seconds", None),
            ("pull-durable", "cstore", "seconds", None),
            ("pull-durable", "ctr", "seconds", None),
            ("io-4k-randread", "cstore", "iops", None),
            ("io-4k-randread", "fio", "iops", None),
            ("io-1m-read", "cstore", "mb/s", None),
            ("io-1m-read", "fio", "mb/s", None),
        ];
        for tool in ["run --lazy", "pull + run"] {
            for metric in ["first-output", "exited"] {
                expected.push(("lazy-start", tool, metric, None));
            }
        }
        for n in [1, 4] {
            for tool in ["cstore", "ctr"] {
                for metric in ["first-output", "all-exited"] {
                    expected.push(("density", tool, metric, Some(n)));
                }
            }
        }
        if c.class.kind == ClassKind::Hdd {
            for p in ["rotational", "nvme"] {
                expected.push(("policy-pull", p, "seconds", None));
                expected.push(("policy-unpack", p, "seconds", None));
            }
            assert_eq!(c.policies.len(), 2);
            let nvme = c.policies.iter().find(|p| p.name == "nvme").unwrap();
            assert!(nvme.policy.direct && nvme.policy.reason.starts_with("CSTORE_POLICY=nvme"));
        } else {
            assert!(c.results.iter().all(|m| !m.workload.starts_with("policy")));
        }
        assert_eq!(c.results.len(), expected.len(), "{name}: {:#?}", c.results);
        for (w, tool, metric, n) in expected {
            let m = c
                .find(w, tool, metric, n)
                .unwrap_or_else(|| panic!("{name}: no {w} {tool} {metric} {n:?}"));
            let s = &m.stat;
            assert_eq!(s.samples.len(), r.rounds, "{name} {w} {tool}");
            assert!(
                s.min > 0.0 && s.min <= s.median && s.median <= s.max && s.max.is_finite(),
                "{name} {w} {tool} {metric}: {s:?}"
            );
        }
        for tool in ["cstore", "ctr"] {
            for n in [1, 4] {
                let first = c.find("density", tool, "first-output", Some(n)).unwrap();
                let exit = c.find("density", tool, "all-exited", Some(n)).unwrap();
                assert!(first.stat.median <= exit.stat.median, "{name} {tool} N={n}");
            }
        }
        for tool in ["cstore", "ctr"] {
            let returned = c.find("pull", tool, "seconds", None).unwrap();
            let on_disk = c.find("pull-durable", tool, "seconds", None).unwrap();
            for (a, b) in returned.stat.samples.iter().zip(&on_disk.stat.samples) {
                assert!(a <= b, "{name} {tool}: on disk {b} before it returned {a}");
            }
        }
        for tool in ["run --lazy", "pull + run"] {
            let first = c.find("lazy-start", tool, "first-output", None).unwrap();
            let exit = c.find("lazy-start", tool, "exited", None).unwrap();
            assert!(first.stat.median <= exit.stat.median, "{name} {tool}");
        }
        let lazy: Vec<_> = c
            .comparisons()
            .into_iter()
            .filter(|cmp| cmp.workload == "lazy-start")
            .collect();
        assert_eq!(lazy.len(), 2, "{name}: {lazy:?}");
        for cmp in &lazy {
            assert_eq!(
                (cmp.ours_name.as_str(), cmp.peer_name.as_str()),
                ("run --lazy", "pull + run")
            );
            assert!(
                cmp.advantage.is_finite() && cmp.advantage > 0.0,
                "{name}: {cmp:?}"
            );
        }
        assert!(c.comparisons().len() >= 9, "{name}");
        assert!(
            c.skipped.iter().all(|s| s.workload != "lazy-start"),
            "{name}: {:?}",
            c.skipped
        );
    }
    let md = std::fs::read_to_string(run.dir.as_path().join("out/report.md")).unwrap();
    for want in [
        "| pull | seconds |",
        "| density | first-output | 4 |",
        "| lazy-start | first-output |  | run --lazy ",
        "| lazy-start | exited |  | run --lazy ",
        "HDD (emulated)",
    ] {
        assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
    }
}

/// The HDD class is its disk model, not throttled: 4K random reads land
/// near the model's ~150 IOPS (a seek and a rotational wait each; with fio
/// and with cstore bench io, whose queue depth 32 buys nothing from a disk
/// that serves one request at a time in arrival order), and 1M sequential
/// reads near its 150 MB/s transfer (the loop device's 512 KiB requests
/// follow each other: no seek), not the ~75 MB/s a per-request charge of
/// ~6.7 ms would give. The SATA class stays under its throttle.
#[test]
fn hdd_class_lands_near_its_model_limits() {
    let r = &quick_run().report;
    let hdd = r
        .classes
        .iter()
        .find(|c| c.class.kind == ClassKind::Hdd)
        .unwrap();
    assert_eq!(
        hdd.class.probe.kind, "rotational",
        "the probe sees a rotational device"
    );
    assert_eq!(hdd.class.probe.rotational, Some(true));
    assert!(hdd.class.throttle.is_none(), "{:?}", hdd.class.throttle);
    let m = hdd
        .class
        .model
        .as_ref()
        .expect("the HDD class names its model");
    assert_eq!((m.rpm, m.transfer_bps), (7200, 150_000_000));
    assert!(
        hdd.class.device_detail.contains("HDD model"),
        "{}",
        hdd.class.device_detail
    );
    let limit = |c: &cstore_bench::report::ClassReport, n: &str| {
        c.limits.iter().find(|l| l.name == n).unwrap().clone()
    };
    let l = limit(hdd, "4k randread qd32");
    assert!((110.0..=190.0).contains(&l.iops), "HDD 4K randread: {l:?}");
    for tool in ["fio", "cstore"] {
        let m = hdd.find("io-4k-randread", tool, "iops", None).unwrap();
        assert!(
            (110.0..=190.0).contains(&m.stat.median),
            "HDD {tool}: {:?}",
            m.stat
        );
    }
    let l = limit(hdd, "1m read qd8");
    assert!(
        l.mb_per_s > 100.0 && l.mb_per_s <= 165.0,
        "HDD 1M read: {l:?}"
    );
    let l = limit(hdd, "1m write qd8");
    assert!(
        l.mb_per_s > 100.0 && l.mb_per_s <= 165.0,
        "HDD 1M write: {l:?}"
    );
    let sata = r
        .classes
        .iter()
        .find(|c| c.class.kind == ClassKind::Sata)
        .unwrap();
    let l = limit(sata, "1m read qd8");
    assert!(
        l.mb_per_s > 100.0 && l.mb_per_s <= 605.0,
        "SATA 1M read: {l:?}"
    );
    let l = limit(sata, "4k randread qd32");
    assert!(l.iops <= 99_000.0, "SATA 4K randread: {l:?}");
}

#[test]
fn quick_suite_leaves_nothing_behind() {
    let run = quick_run();
    let left = left_behind(&run.run_id, run.dir.as_path());
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
    let inside: Vec<String> = std::fs::read_dir(run.dir.as_path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(inside, ["out"], "only the report stays");
}

fn chromium(args: &[&str], dir: &Path) -> std::process::Output {
    let profile = dir.join("chromium-profile");
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("chromium (Debian's package; fixtures/deps.sh installs it)")
}

/// report.html in a real headless chromium: the DOM has the report's titles
/// and its SVG charts, and the screenshot is not blank.
#[test]
fn html_report_renders_its_plots_in_chromium() {
    let run = quick_run();
    // A copy: chromium's command line must not name the run's directory,
    // which the leftovers test (running beside this one) looks for.
    let scratch = tempfile::tempdir().unwrap();
    let html = scratch.path().join("report.html");
    std::fs::copy(run.dir.as_path().join("out/report.html"), &html).unwrap();
    let url = format!("file://{}", html.display());

    let dom = chromium(&["--dump-dom", &url], scratch.path());
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout);
    for title in [
        "<h1>cstore bench suite</h1>",
        "Storage classes",
        "Density — HDD (emulated)",
        "Density — SATA SSD (emulated)",
        "Density — NVMe-like (emulated)",
        "Pull + unpack — per class",
        "Lazy start: first output — per class",
        "Lazy start: exit — per class",
        "4K random read — per class",
        "1M sequential read — per class",
        "Policy — HDD (emulated)",
    ] {
        assert!(dom.contains(title), "the rendered page lacks {title:?}");
    }
    assert!(dom.matches("<svg").count() >= 9, "charts in the page");
    assert!(!dom.contains("<script"), "no scripts");
    // Every chart names the machine's kernel and each class's device.
    assert!(dom.matches(&run.report.machine.kernel).count() >= 9);

    let png = scratch.path().join("shot.png");
    let shot = chromium(
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1100,2400",
            "--hide-scrollbars",
            &url,
        ],
        scratch.path(),
    );
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let (w, h, pixels) = decode_png(&png);
    assert_eq!((w, h), (1100, 2400));
    // Not blank: plenty of non-white pixels, and many colours (the charts'
    // blue and orange bars and lines, not just text).
    let non_white = pixels
        .iter()
        .filter(|p| p[0] < 240 || p[1] < 240 || p[2] < 240)
        .count();
    assert!(
        non_white > pixels.len() / 50,
        "{non_white} of {} pixels not white",
        pixels.len()
    );
    let blue = pixels
        .iter()
        .filter(|p| is_near(p, [0x1f, 0x6f, 0xb4]))
        .count();
    let orange = pixels
        .iter()
        .filter(|p| is_near(p, [0xe0, 0x6c, 0x1a]))
        .count();
    assert!(
        blue > 200 && orange > 200,
        "chart colours on screen: blue {blue}, orange {orange}"
    );
}

fn is_near(p: &[u8; 3], c: [u8; 3]) -> bool {
    p.iter()
        .zip(c)
        .all(|(a, b)| (*a as i32 - b as i32).abs() < 24)
}

/// RGB pixels of a PNG (chromium writes 8-bit RGBA or RGB).
fn decode_png(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let step = match info.color_type {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        t => panic!("unexpected PNG colour type {t:?}"),
    };
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let px = buf[..info.buffer_size()]
        .chunks(step)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, px)
}

/// SIGINT while containers are starting: the suite stops its children,
/// tears everything down and exits 130, writing no report.
#[test]
fn sigint_in_the_middle_cleans_up_everything() {
    let registry = Registry::start(&[]);
    registry.push(None);
    let image = registry.image("busybox:latest");
    let dir = tempfile::Builder::new()
        .prefix("cstore-bench-sigint-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut child = suite_cmd(dir.path(), &image, &["--classes", "hdd"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let mut run_id = None;
    // Midway: cstore's containers have run, ctr's are about to.
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the suite ended before density:\n{seen}"))
            .unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if run_id.is_none() {
            run_id = run_id_of(&line);
        }
        if line.contains("density N=1 round 1/1: cstore") {
            break;
        }
    }
    let run_id = run_id.unwrap();
    let before = left_behind(&run_id, dir.path());
    // The HDD class has no cgroup of its own (its limits are its disk
    // model's): its model's FUSE mount is what it has instead.
    for what in ["loop device", "mount:", "process"] {
        assert!(
            before.iter().any(|l| l.starts_with(what)),
            "nothing of kind {what:?} existed to clean up: {before:#?}"
        );
    }
    assert!(
        before
            .iter()
            .any(|l| l.starts_with("mount:") && l.contains("hdd-model")),
        "no HDD model mount to clean up: {before:#?}"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let rest =
        std::thread::spawn(move || lines.map_while(|l| l.ok()).collect::<Vec<_>>().join("\n"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the suite did not stop within 120 s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let rest = rest.join().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("interrupted"), "{rest}");
    let left = left_behind(&run_id, dir.path());
    assert!(
        left.is_empty(),
        "left behind after SIGINT:\n{}",
        left.join("\n")
    );
    assert!(
        !dir.path().join("out/report.json").exists(),
        "no report from an interrupted run"
    );
}
