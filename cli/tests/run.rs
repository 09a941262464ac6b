//! `cstore run` as root: a real container (youki's libcontainer) from the
//! busybox test image's snapshots, with the store's disk throttled through
//! the cgroup hierarchy this machine has (v1 blkio or v2 io.max, detected;
//! measured on a store on a loop device); runc's defaults checked from
//! inside; kept containers through `ps` and `rm`.

use crate::harness::containers::{busybox, unique, Cgroups};
use crate::harness::loopfs::LoopFs;
use crate::harness::{shared_registry_addr, Cstore};

#[test]
fn output_exit_status_pid_1_hostname_and_isolation() {
    let (cs, image) = busybox();
    let (code, out, err) = cs.run_rm(&[
        "--hostname",
        "box1",
        "-e",
        "GREETING=hello",
        "-w",
        "/tmp",
        &image,
        "sh",
        "-c",
        "echo $GREETING; echo pid=$$; hostname; pwd; grep -c ' /work' /proc/self/mountinfo; exit 7",
    ]);
    assert_eq!(code, 7, "exit status passes through: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["hello", "pid=1", "box1", "/tmp", "0"], "{err}");
    cs.assert_no_containers();
}

#[test]
fn read_only_root_refuses_writes() {
    let (cs, image) = busybox();
    let (code, _, err) = cs.run_rm(&["--read-only", &image, "sh", "-c", "touch /new-file"]);
    assert_ne!(code, 0, "a write to a read-only root must fail");
    assert!(err.contains("Read-only file system"), "{err}");
    let (code, _, err) = cs.run_rm(&[&image, "sh", "-c", "touch /new-file && ls /new-file"]);
    assert_eq!(code, 0, "{err}");
    cs.assert_no_containers();
}

#[test]
fn device_read_bps_lands_in_the_containers_throttle_file() {
    let (cs, image) = busybox();
    let cg = Cgroups::detect();
    let (code, out, err) = cs.run_rm(&[
        "--device-read-bps",
        "1mb",
        &image,
        "cat",
        cg.read_bps_file(),
    ]);
    assert_eq!(code, 0, "{err}");
    let dev = std::fs::metadata(cs.path())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (libc::major(m.dev()), libc::minor(m.dev()))
        })
        .unwrap();
    // The store's filesystem device (tests run on a whole disk here) at 1 MiB/s.
    let want = cg.read_bps_line("", 1 << 20);
    assert!(out.contains(&want), "{cg:?}: {want:?} in {out}");
    assert!(
        out.lines().any(|l| l.starts_with(&format!("{}:", dev.0))),
        "throttle on the store's disk {dev:?}: {out}"
    );
    cs.assert_no_containers();
}

#[test]
fn bad_input_is_refused_clearly_and_leaves_nothing() {
    let (cs, image) = busybox();
    let err = cs.run_fails(&["127.0.0.1:1/none:here", "true"]);
    assert!(
        err.contains("127.0.0.1:1/none:here is not in the store"),
        "{err}"
    );
    let err = cs.run_fails(&["--device-read-bps", "fast", &image, "true"]);
    assert!(err.contains("invalid rate \"fast\""), "{err}");
    let err = cs.run_fails(&["--device-read-bps", "1:3:1mb", &image, "true"]);
    assert!(err.contains("1:3 is not a block device"), "{err}");
    // A missing command fails.
    cs.run_fails(&[&image, "/no/such/command"]);
}

fn find<'a>(rows: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    rows.iter().find(|r| r["name"] == name)
}

#[test]
fn a_kept_container_is_listed_survives_gc_and_rm_removes_it() {
    let (cs, image) = busybox();
    let name = unique("kept");
    let out = cs.run(&["run", "--name", &name, &image, "sh", "-c", "exit 7"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(
        find(&cs.ps(false), &name).is_none(),
        "ps lists running ones only"
    );
    let all = cs.ps(true);
    let c = find(&all, &name).unwrap_or_else(|| panic!("ps -a lacks {name}: {all:?}"));
    assert_eq!(c["state"], "exited");
    assert_eq!(c["exit_code"], 7);
    assert_eq!(c["image"], image);
    assert_eq!(c["command"], serde_json::json!(["sh", "-c", "exit 7"]));
    assert!(
        c["status"].as_str().unwrap().starts_with("Exited (7) "),
        "{c}"
    );
    assert!(c["pid"].is_null());
    let table = cs.ok(&["ps", "-a"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&name) && l.contains("Exited (7)")),
        "{table}"
    );

    // Kept: its snapshot and directory, not mounted; gc leaves them (and its layers).
    let dir = cs.path().join("containers").join(&name);
    assert!(dir.join("container.json").is_file());
    cs.ok(&["gc"]);
    let snaps = cs.ok(&["snapshots", "--json"]);
    assert!(snaps.contains(&format!("cstore-run:{name}")), "{snaps}");
    assert!(snaps.contains("container not running"), "{snaps}");
    let out = cs.run(&["run", "--rm", "--name", &name, &image, "true"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("a container named \"{name}\" exists")),
        "{err}"
    );
    let (code, _, err) = cs.run_rm(&[&image, "true"]);
    assert_eq!(code, 0, "the image still runs after gc: {err}");

    assert_eq!(cs.ok(&["rm", &name]).trim(), name);
    cs.assert_container_gone(&name);
    assert!(find(&cs.ps(true), &name).is_none());
    let err = cs.fail(&["rm", &name]);
    assert!(err.contains(&format!("no such container: {name}")), "{err}");
    let err = cs.fail(&["rm", "no-such-box"]);
    assert!(err.contains("no such container: no-such-box"), "{err}");
}

#[test]
fn a_running_container_is_listed_and_rm_needs_force() {
    let (cs, image) = busybox();
    let name = unique("sleeper");
    let (mut bg, c) = cs.start_running(&["run", "--name", &name, &image, "sleep", "30"], &name);
    assert!(c["status"].as_str().unwrap().starts_with("Up "), "{c}");
    // The pid is the container's init on the host, in the container's cgroup.
    let pid = c["pid"].as_u64().unwrap();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroups.contains(&format!("/cstore/{name}")), "{cgroups}");
    assert!(std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .starts_with("sleep\0"));

    let err = cs.fail(&["rm", &name]);
    assert!(
        err.contains(&format!("container {name} is running")) && err.contains("rm -f"),
        "{err}"
    );
    assert!(
        find(&cs.ps(false), &name).is_some(),
        "a refused rm leaves it running"
    );

    assert_eq!(cs.ok(&["rm", "-f", &name]).trim(), name);
    let status = bg.0.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGKILL),
        "run reports the kill"
    );
    cs.assert_container_gone(&name);
}

/// containerd's default capability set (what `ctr run` gives), by number
/// (include/uapi/linux/capability.h).
const DEFAULT_CAPS: [(&str, u32); 14] = [
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_RAW", 13),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_MKNOD", 27),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_SETFCAP", 31),
];

#[test]
fn secure_defaults_are_applied() {
    let (cs, image) = busybox();
    // runc's masked paths: files become /dev/null, directories an empty read-only tmpfs.
    let masked = [
        "/proc/acpi",
        "/proc/asound",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/sys/firmware",
        "/proc/scsi",
    ];
    let script = format!(
        r#"for p in {}; do [ -e $p ] && echo "masked $p $([ -d $p ] && echo dir || ([ -c $p ] && echo chr) || echo other) $(stat -c %t:%T $p) $(ls -A $p 2>/dev/null | wc -l) $(cat $p 2>/dev/null | wc -c)"; done
echo x > /proc/sys/kernel/domainname && echo proc-sys-writable
echo "8:0 0" > {bps} && echo cgroup-writable
touch $(dirname {bps})/x && echo cgroup-writable
grep -E '^(NoNewPrivs|CapEff|CapBnd|CapPrm|CapInh|CapAmb):' /proc/self/status
echo dev $(ls -A /dev)
true"#,
        masked.join(" "),
        bps = Cgroups::detect().read_bps_file()
    );
    let (code, out, err) = cs.run_rm(&[&image, "sh", "-c", &script]);
    assert_eq!(code, 0, "{err}");

    let mut checked = 0;
    for p in masked {
        if !std::path::Path::new(p).exists() {
            continue; // this kernel has no such file
        }
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("masked {p} ")))
            .unwrap_or_else(|| panic!("{p} exists on the host but not in the container: {out}"));
        let f: Vec<&str> = line.split(' ').collect();
        if std::path::Path::new(p).is_dir() {
            assert_eq!((f[2], f[4]), ("dir", "0"), "{p} is an empty dir: {line}");
        } else {
            // /dev/null is character device 1:3.
            assert_eq!((f[2], f[3]), ("chr", "1:3"), "{p} is /dev/null: {line}");
            assert_eq!(f[5], "0", "{p} reads empty: {line}");
        }
        checked += 1;
    }
    assert!(checked >= 2, "at least /proc/keys and /sys/firmware: {out}");
    assert!(!out.contains("proc-sys-writable"), "{out}");
    assert!(
        err.contains("/proc/sys/kernel/domainname: Read-only file system"),
        "{err}"
    );
    assert!(
        !out.contains("cgroup-writable"),
        "a container cannot lift its limits: {out}"
    );

    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap_or_else(|| panic!("no {k} in {out}"))
            .trim()
            .to_string()
    };
    assert_eq!(field("NoNewPrivs"), "1");
    let mask: u64 = DEFAULT_CAPS.iter().map(|(_, bit)| 1u64 << bit).sum();
    for k in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            u64::from_str_radix(&field(k), 16).unwrap(),
            mask,
            "{k} is containerd's default set {DEFAULT_CAPS:?}"
        );
    }
    for k in ["CapInh", "CapAmb"] {
        assert_eq!(u64::from_str_radix(&field(k), 16).unwrap(), 0, "{k}");
    }

    // runc's /dev: the default devices, the stdio and fd links, and the
    // pts, shm and mqueue mounts; nothing of the host's.
    let mut dev: Vec<&str> = out
        .lines()
        .find_map(|l| l.strip_prefix("dev "))
        .unwrap()
        .split(' ')
        .collect();
    dev.sort();
    let mut want = vec![
        "null", "zero", "full", "random", "urandom", "tty", // devices
        "fd", "stdin", "stdout", "stderr", "ptmx", // links
        "pts", "shm", "mqueue", // mounts
    ];
    want.sort();
    assert_eq!(dev, want);
    cs.assert_no_containers();
}

/// Seconds a direct read of /bin/busybox takes inside a container (timed by
/// the container with /proc/uptime, so container setup is not counted), the
/// file's size, and the container's read throttle file.
fn timed_direct_read(cs: &Cstore, image: &str, limit: Option<&str>) -> (f64, u64, String) {
    let script = format!("cat {}; echo; \
                  stat -c 'size %s' /bin/busybox; \
                  read t0 _ < /proc/uptime; \
                  busybox dd if=/bin/busybox of=/dev/null bs=64k iflag=direct 2>/dev/null || exit 9; \
                  read t1 _ < /proc/uptime; echo \"took $t0 $t1\"",
        Cgroups::detect().read_bps_file()
    );
    let mut args = vec![];
    if let Some(l) = limit {
        args.extend(["--device-read-bps", l]);
    }
    args.extend([image, "sh", "-c", &script]);
    let (code, out, err) = cs.run_rm(&args);
    assert_eq!(code, 0, "{out}\n{err}");
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k:?} in {out}"))
            .to_string()
    };
    let (t0, t1) = field("took ")
        .split_once(' ')
        .map(|(a, b)| (a.parse::<f64>().unwrap(), b.parse::<f64>().unwrap()))
        .unwrap();
    let size = field("size ").parse().unwrap();
    (
        t1 - t0,
        size,
        out.lines()
            .take_while(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

#[test]
fn device_read_bps_throttles_direct_reads_on_the_stores_loop_device() {
    let fs = LoopFs::new(256);
    // Declared after the loop fs, so dropped (removed) before it is unmounted.
    let cs = Cstore {
        root: tempfile::Builder::new()
            .prefix("cstore-root-")
            .tempdir_in(&fs.mnt)
            .unwrap(),
        env: vec![],
    };
    let image = format!("{}/busybox:latest", shared_registry_addr());
    cs.ok(&["pull", &image]);
    let dev = {
        use std::os::unix::fs::MetadataExt;
        let d = std::fs::metadata(cs.path()).unwrap().dev();
        format!("{}:{}", libc::major(d), libc::minor(d))
    };
    let loop_dev = std::fs::read_to_string(format!(
        "/sys/class/block/{}/dev",
        fs.dev.trim_start_matches("/dev/")
    ))
    .unwrap();
    assert_eq!(dev, loop_dev.trim(), "the store is on the loop device");

    const RATE: u64 = 1 << 20;
    let (free, size, free_throttle) = timed_direct_read(&cs, &image, None);
    let (limited, _, throttle) = timed_direct_read(&cs, &image, Some("1mb"));
    let expected = size as f64 / RATE as f64;
    eprintln!(
        "direct read of {size} bytes: {free:.2}s unlimited, {limited:.2}s at 1 MiB/s (size/rate {expected:.2}s)"
    );
    assert_eq!(
        throttle,
        Cgroups::detect().read_bps_line(&dev, RATE),
        "the read throttle on the loop device"
    );
    assert_eq!(free_throttle, "", "no throttle without the flag");
    assert!(size > 1 << 20, "busybox is over a MiB: {size}");
    assert!(
        limited >= 0.6 * expected,
        "throttled read took {limited:.2}s, expected about {expected:.2}s"
    );
    assert!(
        free * 4.0 < limited,
        "unthrottled read ({free:.2}s) is much faster than throttled ({limited:.2}s)"
    );
    cs.assert_no_containers();
}

#[test]
fn bad_input_without_rm_leaves_nothing_mounted() {
    let (cs, image) = busybox();
    // Refused before anything is made: no container at all.
    for (args, want) in [
        (
            vec!["run", "--device-read-bps", "fast", &image, "true"],
            "invalid rate \"fast\"",
        ),
        (
            vec!["run", "--name", "../escape", &image, "true"],
            "--name \"../escape\": letters, digits, - and _ only",
        ),
        (
            vec!["run", "127.0.0.1:1/none:here", "true"],
            "127.0.0.1:1/none:here is not in the store",
        ),
    ] {
        let err = cs.fail(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(cs.ps(true).is_empty());
    assert!(
        std::fs::read_dir(cs.path().join("containers")).map_or(true, |mut d| d.next().is_none())
    );

    // A command that is not there: the container is kept, failed, unmounted.
    let name = unique("nocmd");
    let err = cs.fail(&["run", "--name", &name, &image, "/no/such/command"]);
    assert!(err.contains("/no/such/command"), "{err}");
    let all = cs.ps(true);
    let c = find(&all, &name).unwrap_or_else(|| panic!("{all:?}"));
    assert_eq!(c["state"], "exited");
    assert!(c["exit_code"].is_null());
    assert!(
        c["error"].as_str().unwrap().contains("/no/such/command"),
        "{c}"
    );
    cs.assert_nothing_mounted();
    cs.ok(&["rm", &name]);
    cs.assert_container_gone(&name);
}

/// A `cstore run --rm --name NAME` in the background with its stdout
/// piped; if a test fails midway, `rm -f` kills its container and the
/// run is reaped.
struct Supervised<'a> {
    cs: &'a Cstore,
    name: String,
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl<'a> Supervised<'a> {
    fn start(cs: &'a Cstore, args: &[&str]) -> Supervised<'a> {
        Self::start_with(cs, args, |_| {})
    }

    fn start_with(
        cs: &'a Cstore,
        args: &[&str],
        adjust: impl FnOnce(&mut std::process::Command),
    ) -> Supervised<'a> {
        let name = unique("sig");
        let mut a = vec!["run", "--rm", "--name", &name];
        a.extend_from_slice(args);
        let mut cmd = cs.cmd(&a);
        adjust(&mut cmd);
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Supervised {
            cs,
            name,
            child,
            lines,
        }
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no line from {} in 30s: {e}", self.name))
    }

    /// The exit status and stderr, within 30 seconds.
    fn wait(&mut self) -> (i32, String) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} still runs after 30s",
                self.name
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut err = String::new();
        use std::io::Read;
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code().unwrap_or(-1), err)
    }
}

impl Drop for Supervised<'_> {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.cs.run(&["rm", "-f", &self.name]);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// SIGTERM and SIGINT sent to `cstore run` reach the container's process
/// (docker's sig-proxy): its trap runs, and its exit status is run's.
#[test]
fn sigterm_and_sigint_are_forwarded_to_the_container() {
    let (cs, image) = busybox();
    for (sig, name) in [(libc::SIGTERM, "TERM"), (libc::SIGINT, "INT")] {
        let script = format!(
            "trap 'echo got-{name}; exit 5' {name}; echo ready; while :; do sleep 0.1; done"
        );
        let mut run = Supervised::start(&cs, &[&image, "sh", "-c", &script]);
        assert_eq!(run.line(), "ready");
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(run.child.id() as i32, sig) }, 0);
        assert_eq!(run.line(), format!("got-{name}"));
        let (code, err) = run.wait();
        assert_eq!(code, 5, "SIG{name}: the trap's exit status: {err}");
        cs.assert_container_gone(&run.name);
    }
}

#[test]
fn memory_and_pids_limits_are_the_containers_and_bite() {
    let (cs, image) = busybox();
    // The container's own memory and pids limits are in its cgroup files
    // (v1: at the hierarchies' mount points inside it; v2: its cgroup). Busybox dd allocates and fills a
    // buffer of bs: 100 MiB cannot fit in 64 MiB (this machine has no
    // swap), so it is OOM-killed. Then a fork loop past 20 tasks.
    let cg = Cgroups::detect();
    let script = &format!(
        "cat {} {}; \
        busybox dd if=/dev/zero of=/dev/null bs=100M count=1 2>/dev/null; echo dd=$?; \
        busybox dd if=/dev/zero of=/dev/null bs=16M count=1 2>/dev/null; echo small-dd=$?; \
        for i in $(busybox seq 40); do sleep 2 & done; echo all-forked; wait",
        cg.memory_max_file(),
        cg.pids_max_file()
    );
    let (code, out, err) = cs.run_rm(&[
        "--memory",
        "64m",
        "--pids-limit",
        "20",
        &image,
        "sh",
        "-c",
        script,
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["67108864", "20", "dd=137", "small-dd=0"],
        "limits in the cgroup files, 100 MiB killed and 16 MiB not: {err}"
    );
    assert_ne!(code, 0, "the fork loop fails: {err}");
    assert!(err.contains("can't fork"), "{err}");
    // Without the flags: no limit, and the same commands succeed.
    let (code, out, err) = cs.run_rm(&[&image, "sh", "-c", script]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[1..],
        ["max", "dd=0", "small-dd=0", "all-forked"],
        "{err}"
    );
    assert!(cg.is_unlimited_memory(lines[0]), "{cg:?}: {out}");
    cs.assert_no_containers();
}

fn interfaces(proc_net_dev: &str) -> Vec<String> {
    let mut v: Vec<String> = proc_net_dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn net_none_has_only_loopback_and_net_host_sees_the_hosts_interfaces() {
    let (cs, image) = busybox();
    let host = interfaces(&std::fs::read_to_string("/proc/net/dev").unwrap());
    assert!(host.len() > 1, "the host has more than lo: {host:?}");
    for (net, want) in [("none", vec!["lo".to_string()]), ("host", host)] {
        let (code, out, err) = cs.run_rm(&["--net", net, &image, "cat", "/proc/net/dev"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(interfaces(&out), want, "--net {net}");
    }
    let (code, out, err) = cs.run_rm(&[&image, "cat", "/proc/net/dev"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(interfaces(&out), ["lo"], "none is the default");
    let (code, _, err) = cs.run_rm(&["--net", "bridge", &image, "true"]);
    assert_ne!(code, 0);
    assert!(err.contains("--net \"bridge\": none or host"), "{err}");
    cs.assert_no_containers();
}

/// Nothing is ignored in the container, as under docker: not SIGPIPE (which
/// Rust ignores in cstore), nor what cstore was started with ignored (as a
/// script's `cstore run ... &` or nohup start it).
#[test]
fn the_process_starts_with_every_signal_at_its_default_action() {
    use std::os::unix::process::CommandExt;
    let (cs, image) = busybox();
    let mut cmd = cs.cmd(&[
        "run",
        "--rm",
        &image,
        "sh",
        "-c",
        "grep SigIgn /proc/self/status; busybox yes | head -n 1",
    ]);
    // SAFETY: only signal(2) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            for s in [libc::SIGINT, libc::SIGQUIT, libc::SIGHUP, libc::SIGPIPE] {
                libc::signal(s, libc::SIG_IGN);
            }
            Ok(())
        })
    };
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["SigIgn:\t0000000000000000", "y"], "{stderr}");
    // `yes` died of SIGPIPE rather than failing to write.
    assert!(!stderr.contains("write error"), "{stderr}");

    // And a trap on SIGINT works under such a cstore: the signal is forwarded.
    let script = "trap 'echo got-INT; exit 6' INT; echo ready; while :; do sleep 0.1; done";
    let mut run = Supervised::start_with(&cs, &[&image, "sh", "-c", script], |c| {
        // SAFETY: as above.
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                Ok(())
            })
        };
    });
    assert_eq!(run.line(), "ready");
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(
        unsafe { libc::kill(run.child.id() as i32, libc::SIGINT) },
        0
    );
    assert_eq!(run.line(), "got-INT");
    let (code, err) = run.wait();
    assert_eq!(code, 6, "{err}");
    cs.assert_container_gone(&run.name);
}
