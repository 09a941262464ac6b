//! `cstore run` against hostile image configs and inits that never finish
//! starting (issue 12, findings 5, 6 and the E2BIG part of 9): ids from the
//! image's passwd and group checked as numbers given are, environment,
//! command and working directory entries refused by name before anything is
//! made, a start bounded in time (and by SIGTERM) with everything it made
//! removed, an exec's E2BIG reported by size. Images from
//! fixtures/run-images.sh; the stuck inits are real ones, stopped by strace
//! (`-e inject=...:signal=SIGSTOP`) at a syscall only they make.
//!
//! Every cstore run here is bounded by the test (`Bounded`): on the code
//! before these fixes, several hung forever.

mod common;

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{pulled, run_fixture, shared_registry_addr, Cstore};

/// The shared registry with run-images.sh's images pushed (once).
fn registry() -> &'static str {
    static ADDR: OnceLock<String> = OnceLock::new();
    ADDR.get_or_init(|| {
        let addr = shared_registry_addr();
        run_fixture("run-images.sh", &["--push", &addr]);
        addr
    })
}

/// A name no concurrent test uses (cgroup paths are host-wide).
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

/// How a bounded `cstore run` ended.
struct Ended {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Run `cmd` (a `cstore run --name NAME ...`, possibly under strace) for at
/// most `limit`; a run still going then is killed, its container removed
/// with `rm -f`, and the test fails: a hang.
fn bounded(cs: &Cstore, name: &str, mut cmd: Command, limit: Duration) -> Ended {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = cs.run(&["rm", "-f", name]);
            panic!(
                "cstore run {name} still running after {limit:?}: it hangs\nstderr: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ended {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
}

/// `cstore run [--rm] --name NAME ARGS...`, bounded at 60 s.
fn run(cs: &Cstore, rm: bool, name: &str, args: &[&str]) -> Ended {
    let mut a = vec!["run", "--name", name];
    if rm {
        a.push("--rm");
    }
    a.extend_from_slice(args);
    bounded(cs, name, cs.cmd(&a), Duration::from_secs(60))
}

fn ps_all(cs: &Cstore) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&cs.ok(&["ps", "-a", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Nothing of container `name` is left: no mount under the store, no
/// snapshot, directory, record, libcontainer state or cgroup, no process of
/// it, and `ps -a` does not list it.
fn nothing_left(cs: &Cstore, name: &str) {
    cs.assert_nothing_mounted();
    let snaps = cs.ok(&["snapshots", "--json"]);
    assert!(!snaps.contains(&format!("cstore-run:{name}")), "{snaps}");
    assert!(!cs.path().join("containers").join(name).exists());
    assert!(!cs.path().join("run-state").join(name).exists());
    assert!(
        ps_all(cs).iter().all(|c| c["name"] != name),
        "{:?}",
        ps_all(cs)
    );
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let leaf = h.path().join("cstore").join(name);
        assert!(!leaf.exists(), "{} is left", leaf.display());
    }
}

/// No container at all in the store, not even a record: what a refusal
/// before anything is made leaves.
fn no_container_at_all(cs: &Cstore) {
    assert!(ps_all(cs).is_empty(), "{:?}", ps_all(cs));
    cs.assert_nothing_mounted();
    for d in ["containers", "run-state"] {
        assert!(
            std::fs::read_dir(cs.path().join(d)).map_or(true, |mut d| d.next().is_none()),
            "{d} is not empty"
        );
    }
}

/// Finding 5: a passwd entry with uid 4294967295 ((uid_t)-1: "unchanged"
/// to setresuid) ran the process as root with the default capabilities.
#[test]
fn ids_from_the_images_passwd_and_group_are_range_checked() {
    let (cs, image) = pulled(registry(), "run-baduser:latest");
    // The image's own User (app) and -u app, with and without --rm.
    for (extra, rm) in [
        (&[][..], true),
        (&[][..], false),
        (&["-u", "app"][..], true),
    ] {
        let name = unique("baduser");
        let mut args = extra.to_vec();
        args.extend([image.as_str(), "id", "-u"]);
        let e = run(&cs, rm, &name, &args);
        assert_ne!(e.code, 0, "ran as uid {:?}", e.stdout.trim());
        assert!(
            e.stderr.contains(&format!(
                "image {image}: user \"app\": uid 4294967295 of \"app\" in the image's /etc/passwd is out of range (0-2147483647)"
            )),
            "{}",
            e.stderr
        );
        assert!(e.stdout.is_empty(), "nothing ran: {}", e.stdout);
        nothing_left(&cs, &name);
    }
    for (user, want) in [
        (
            "big",
            "uid 2147483648 of \"big\" in the image's /etc/passwd is out of range",
        ),
        (
            "gbad",
            "gid 4294967295 of \"gbad\" in the image's /etc/passwd is out of range",
        ),
        // A supplementary group listing the user.
        (
            "member",
            "gid 4294967295 of \"minus\" in the image's /etc/group is out of range",
        ),
        (
            "member:minus",
            "gid 4294967295 of \"minus\" in the image's /etc/group is out of range",
        ),
        ("4294967295", "uid 4294967295 is out of range"),
    ] {
        let name = unique("baduser");
        let e = run(&cs, true, &name, &["-u", user, &image, "id"]);
        assert_ne!(e.code, 0, "-u {user} ran: {}", e.stdout);
        assert!(
            e.stderr.contains(&format!("user {user:?}: {want}")),
            "-u {user}: {}",
            e.stderr
        );
        nothing_left(&cs, &name);
    }
    // In a user namespace, an id the mapping lacks is refused by name
    // (libcontainer's init failed with a bare EINVAL).
    let name = unique("unmapped");
    let e = run(
        &cs,
        true,
        &name,
        &["--userns=100000:65536", "-u", "70000", &image, "id"],
    );
    assert_ne!(e.code, 0);
    assert!(
        e.stderr.contains(
            "user \"70000\": uid 70000 is not mapped in the container's user namespace (container ids 0-65535 are host ids 100000-165535)"
        ),
        "{}",
        e.stderr
    );
    nothing_left(&cs, &name);
    // The sane users of the same image run, as themselves.
    let name = unique("root");
    let e = run(&cs, true, &name, &["-u", "root", &image, "id", "-u"]);
    assert_eq!((e.code, e.stdout.trim()), (0, "0"), "{}", e.stderr);
    let e = run(&cs, true, &name, &["-u", "1002:1002", &image, "id", "-u"]);
    assert_eq!((e.code, e.stdout.trim()), (0, "1002"), "{}", e.stderr);
    nothing_left(&cs, &name);
}

/// Finding 6: an Env entry "=x" (image or -e) made libcontainer's init
/// panic; with stdin kept (-i) its unwinding blocked and cstore waited
/// forever. Every entry is checked before anything is made, and so are the
/// command, the working directory and the hostname.
#[test]
fn hostile_config_entries_are_refused_by_name_before_anything_is_made() {
    let addr = registry();
    let cs = Cstore::new();
    let busybox = format!("{addr}/busybox:latest");
    let mut cases: Vec<(String, Vec<String>, String)> = vec![];
    for (tag, want) in [
        (
            "run-env-eq",
            "environment entry \"=x\": empty name (its Env)",
        ),
        (
            "run-env-nul",
            "environment entry \"BAD=a\\0b\": NUL byte in the value (its Env)",
        ),
        (
            "run-args-nul",
            "argument 1 of the command (\"a\\0b\") has a NUL byte (from its Entrypoint and Cmd)",
        ),
        (
            "run-cwd-nul",
            "working directory \"/tmp/a\\0b\": has a NUL byte (its WorkingDir)",
        ),
    ] {
        let image = format!("{addr}/{tag}:latest");
        cs.ok(&["pull", &image]);
        cases.push((image.clone(), vec![], format!("image {image}: {want}")));
        // The same with stdin kept: what hung.
        cases.push((
            image.clone(),
            vec!["-i".into()],
            format!("image {image}: {want}"),
        ));
    }
    cs.ok(&["pull", &busybox]);
    let long_host = "h".repeat(65);
    for (flags, want) in [
        (
            vec!["-e", "=x"],
            "-e: environment entry \"=x\": empty name".to_string(),
        ),
        (
            vec!["-i", "-e", "=x"],
            "-e: environment entry \"=x\": empty name".into(),
        ),
        (
            vec!["-e", "NAME"],
            "-e: environment entry \"NAME\": no '='".into(),
        ),
        (
            vec!["--hostname", &long_host],
            format!(
                "--hostname: hostname \"{}\"... (65 bytes): longer than 64 bytes",
                "h".repeat(40)
            ),
        ),
    ] {
        cases.push((
            busybox.clone(),
            flags.iter().map(|s| s.to_string()).collect(),
            want,
        ));
    }
    for (image, flags, want) in cases {
        for rm in [true, false] {
            let name = unique("hostile");
            let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
            args.push(&image);
            let e = run(&cs, rm, &name, &args);
            assert_eq!(e.code, 1, "{flags:?} {image}: {}", e.stderr);
            assert!(e.stderr.contains(&want), "{flags:?} {image}:\n{}", e.stderr);
            no_container_at_all(&cs);
        }
    }
    // A command that is an empty string (from the flags).
    let name = unique("empty");
    let e = run(&cs, true, &name, &[&busybox, ""]);
    assert_eq!(e.code, 1);
    assert!(
        e.stderr.contains(&format!(
            "image {busybox}: the command is an empty string (from the command given)"
        )),
        "{}",
        e.stderr
    );
    no_container_at_all(&cs);
}

/// `cstore run` under strace, which stops (SIGSTOP) the process that makes
/// syscall `call` (the `inject` expression), with the start timeout `secs`.
fn under_strace(cs: &Cstore, inject: &[&str], secs: &str, run_args: &[&str]) -> Command {
    let status = Command::new("strace").arg("-V").output();
    assert!(
        status.is_ok_and(|o| o.status.success()),
        "strace is needed (fixtures/deps.sh installs it)"
    );
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-o", "/dev/null"]).args(inject).arg("--");
    let plain = cs.cmd(run_args);
    cmd.arg(plain.get_program()).args(plain.get_args());
    for (k, v) in plain.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.env("CSTORE_START_TIMEOUT", secs);
    cmd
}

/// Finding 6: an init that never reports ready (stopped at sethostname,
/// which only the init calls, before it signals ready) is killed after the
/// start timeout, and everything the start made is removed; without --rm
/// the container is kept, unmounted, with the reason.
#[test]
fn an_init_that_never_reports_ready_is_killed_after_the_timeout() {
    let (cs, image) = pulled(registry(), "busybox:latest");
    let stop_at_sethostname = ["-e", "inject=sethostname:signal=SIGSTOP"];
    for rm in [true, false] {
        let name = unique("stuck");
        let mut args = vec!["run", "--name", &name];
        if rm {
            args.push("--rm");
        }
        args.extend([image.as_str(), "echo", "ran"]);
        let t = Instant::now();
        let e = bounded(
            &cs,
            &name,
            under_strace(&cs, &stop_at_sethostname, "3", &args),
            Duration::from_secs(60),
        );
        let took = t.elapsed();
        assert_eq!(e.code, 73, /* deadline exceeded */ "{}", e.stderr);
        assert!(
            e.stderr.contains(&format!(
                "image {image}: container {name}: its init did not report ready within 3s; it was killed, with everything the start made"
            )),
            "{}",
            e.stderr
        );
        assert!(!e.stdout.contains("ran"));
        assert!(took >= Duration::from_secs(3), "{took:?}");
        if rm {
            nothing_left(&cs, &name);
        } else {
            let all = ps_all(&cs);
            let c = all.iter().find(|c| c["name"] == name).unwrap();
            assert_eq!(c["state"], "exited");
            assert!(
                c["error"]
                    .as_str()
                    .unwrap()
                    .contains("did not report ready"),
                "{c}"
            );
            cs.assert_nothing_mounted();
            assert!(!cs.path().join("run-state").join(&name).exists());
            cs.ok(&["rm", &name]);
            nothing_left(&cs, &name);
        }
    }
}

/// SIGTERM to cstore while the init is stuck ends the start at once, with
/// the same cleanup (before, SIGTERM killed cstore and left the overlay
/// mounted, the libcontainer state and the record).
#[test]
fn sigterm_during_a_stuck_start_removes_everything() {
    let (cs, image) = pulled(registry(), "busybox:latest");
    let name = unique("term");
    let args = ["run", "--rm", "--name", &name, &image, "echo", "ran"];
    let mut cmd = under_strace(
        &cs,
        &["-e", "inject=sethostname:signal=SIGSTOP"],
        "600",
        &args,
    );
    let dir = tempfile::tempdir().unwrap();
    let err = dir.path().join("err");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    // strace's child is cstore: signal it once its init is stopped (the
    // create is under way and stuck).
    let deadline = Instant::now() + Duration::from_secs(60);
    let cstore = loop {
        assert!(child.try_wait().unwrap().is_none(), "ended early");
        assert!(Instant::now() < deadline, "the init never stopped");
        if let Some(c) = children(child.id() as i32).first() {
            if children(*c)
                .iter()
                .any(|p| state_of(*p) == Some('t') || state_of(*p) == Some('T'))
            {
                break *c;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: kill(2) on the cstore this test started (strace's child).
    assert_eq!(unsafe { libc::kill(cstore, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = cs.run(&["rm", "-f", &name]);
            panic!("cstore did not end within 30s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert_eq!(status.code(), Some(130), /* canceled */ "{stderr}");
    assert!(
        stderr.contains(&format!("container {name}: start interrupted by SIGTERM")),
        "{stderr}"
    );
    nothing_left(&cs, &name);
}

/// (pid, ppid, state) of every process.
fn processes() -> Vec<(i32, i32, char)> {
    let mut v = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and ')'.
        let mut rest = stat[stat.rfind(')').unwrap() + 1..].split_whitespace();
        let state = rest.next().unwrap().chars().next().unwrap();
        let ppid = rest.next().unwrap().parse().unwrap();
        v.push((pid, ppid, state));
    }
    v
}

fn children(parent: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|p| p.1 == parent)
        .map(|p| p.0)
        .collect()
}

fn state_of(pid: i32) -> Option<char> {
    processes().into_iter().find(|p| p.0 == pid).map(|p| p.2)
}

/// Finding 6, after the start: an init stopped at its execve (made to fail
/// and stop by strace, for the path of run-config's entrypoint only) is
/// killed after the timeout instead of being waited on as if it ran.
#[test]
fn an_init_that_never_runs_its_command_is_killed_after_the_timeout() {
    let (cs, image) = pulled(registry(), "run-config:latest");
    let name = unique("noexec");
    let args = ["run", "--rm", "--name", &name, &image];
    let inject = [
        "-P",
        "/usr/local/bin/show",
        "-e",
        "inject=execve:error=EAGAIN:signal=SIGSTOP",
    ];
    // Longer than the others: the create, traced, must finish within it.
    let e = bounded(
        &cs,
        &name,
        under_strace(&cs, &inject, "10", &args),
        Duration::from_secs(60),
    );
    assert_eq!(e.code, 73, /* deadline exceeded */ "{}", e.stderr);
    assert!(
        e.stderr.contains(&format!(
            "image {image}: container {name}: its init did not run its command within 10s"
        )),
        "{}",
        e.stderr
    );
    assert!(e.stdout.is_empty(), "{}", e.stdout);
    nothing_left(&cs, &name);
}

/// Finding 9: an execve that fails with E2BIG said so with the whole
/// argument list (here 140 kB, in a real image megabytes); now with counts
/// and sizes, naming the image, and the container records it as failed.
#[test]
fn an_e2big_says_how_big_the_command_was_not_what_it_was() {
    let (cs, image) = pulled(registry(), "run-e2big:latest");
    for rm in [true, false] {
        let name = unique("e2big");
        let e = run(&cs, rm, &name, &[&image]);
        assert_eq!(e.code, 67, /* failed precondition */ "{}", e.stderr);
        assert!(
            e.stderr.contains(&format!(
                "image {image}: container {name}: could not run its command: exec \"echo\": argument list too long (E2BIG): 4 arguments of 140019 bytes (the longest 140000)"
            )),
            "{}",
            &e.stderr[..e.stderr.len().min(4000)]
        );
        assert!(e
            .stderr
            .contains("the kernel takes at most 131072 bytes a string"));
        assert!(
            !e.stderr.contains(&"x".repeat(100)) && e.stderr.len() < 8192,
            "the arguments are not printed ({} bytes of stderr)",
            e.stderr.len()
        );
        if rm {
            nothing_left(&cs, &name);
        } else {
            let all = ps_all(&cs);
            let c = all.iter().find(|c| c["name"] == name).unwrap();
            assert_eq!(c["state"], "exited");
            assert!(c["error"].as_str().unwrap().contains("E2BIG"), "{c}");
            cs.assert_nothing_mounted();
            cs.ok(&["rm", &name]);
            nothing_left(&cs, &name);
        }
    }
}

/// The bounds change nothing for a normal start: output, exit status, and
/// a command that is not there is still refused at create.
#[test]
fn normal_starts_are_unchanged() {
    let (cs, image) = pulled(registry(), "busybox:latest");
    let name = unique("plain");
    let e = run(&cs, true, &name, &[&image, "sh", "-c", "echo hi; exit 3"]);
    assert_eq!((e.code, e.stdout.as_str()), (3, "hi\n"), "{}", e.stderr);
    nothing_left(&cs, &name);
    let e = run(&cs, true, &name, &[&image, "/no/such/command"]);
    assert_eq!(e.code, 1);
    assert!(e.stderr.contains("/no/such/command"), "{}", e.stderr);
    nothing_left(&cs, &name);
    // A process running longer than the start timeout is not touched.
    let mut cmd = cs.cmd(&[
        "run",
        "--rm",
        "--name",
        &name,
        &image,
        "sh",
        "-c",
        "sleep 9; echo slept",
    ]);
    cmd.env("CSTORE_START_TIMEOUT", "8");
    let e = bounded(&cs, &name, cmd, Duration::from_secs(60));
    assert_eq!((e.code, e.stdout.as_str()), (0, "slept\n"), "{}", e.stderr);
    nothing_left(&cs, &name);
}

/// A working directory through one of the init's fds (runc's
/// CVE-2024-21626): before pivot_root the init holds host directories open
/// (the host's / among them), and chdir happens after it. None of these
/// starts: either the path is no directory, or libcontainer finds the cwd
/// outside the container (its verify_cwd, on which cstore relies).
#[test]
fn a_working_directory_through_the_inits_fds_never_starts() {
    let (cs, image) = pulled(registry(), "busybox:latest");
    let name = unique("fdcwd");
    for n in 3..=26 {
        let w = format!("/proc/self/fd/{n}");
        let e = run(
            &cs,
            true,
            &name,
            &["-w", &w, &image, "sh", "-c", "echo ran in $(pwd)"],
        );
        assert_ne!(e.code, 0, "-w {w} ran: {}", e.stdout);
        assert!(e.stdout.is_empty(), "-w {w}: {}", e.stdout);
        nothing_left(&cs, &name);
    }
}
