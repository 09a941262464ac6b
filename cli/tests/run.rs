//! `cstore run` as root: a real container (youki's libcontainer) from the
//! busybox test image's snapshots, with the store's disk throttled through
//! the v1 blkio hierarchy this machine has.

mod common;

use common::{shared_registry_addr, Cstore};

fn setup() -> (Cstore, String) {
    let cs = Cstore::new();
    let image = format!("{}/busybox:latest", shared_registry_addr());
    cs.ok(&["pull", &image]);
    (cs, image)
}

fn run(cs: &Cstore, args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["run", "--rm"];
    a.extend_from_slice(args);
    let out = cs.run(&a);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn no_run_snapshots_left(cs: &Cstore) {
    let snaps = cs.ok(&["snapshots", "--json"]);
    assert!(!snaps.contains("cstore-run:"), "{snaps}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&cs.path().display().to_string()),
        "something is still mounted under the store"
    );
}

#[test]
fn output_exit_status_pid_1_hostname_and_isolation() {
    let (cs, image) = setup();
    let (code, out, err) = run(
        &cs,
        &["--hostname", "box1", "-e", "GREETING=hello", "-w", "/tmp", &image, "sh", "-c",
          "echo $GREETING; echo pid=$$; hostname; pwd; grep -c ' /work' /proc/self/mountinfo; exit 7"],
    );
    assert_eq!(code, 7, "exit status passes through: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["hello", "pid=1", "box1", "/tmp", "0"], "{err}");
    no_run_snapshots_left(&cs);
}

#[test]
fn read_only_root_refuses_writes() {
    let (cs, image) = setup();
    let (code, _, err) = run(&cs, &["--read-only", &image, "sh", "-c", "touch /new-file"]);
    assert_ne!(code, 0, "a write to a read-only root must fail");
    assert!(err.contains("Read-only file system"), "{err}");
    let (code, _, err) = run(
        &cs,
        &[&image, "sh", "-c", "touch /new-file && ls /new-file"],
    );
    assert_eq!(code, 0, "{err}");
    no_run_snapshots_left(&cs);
}

#[test]
fn device_read_bps_lands_in_the_v1_blkio_throttle_file() {
    let (cs, image) = setup();
    let (code, out, err) = run(
        &cs,
        &[
            "--device-read-bps",
            "1mb",
            &image,
            "cat",
            "/sys/fs/cgroup/blkio/blkio.throttle.read_bps_device",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let dev = std::fs::metadata(cs.path())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (libc::major(m.dev()), libc::minor(m.dev()))
        })
        .unwrap();
    // The store's filesystem device (tests run on a whole disk here) at 1 MiB/s.
    assert!(out.contains(" 1048576"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with(&format!("{}:", dev.0))),
        "throttle on the store's disk {dev:?}: {out}"
    );
    no_run_snapshots_left(&cs);
}

#[test]
fn bad_input_is_refused_clearly_and_leaves_nothing() {
    let (cs, image) = setup();
    let (code, _, err) = run(&cs, &["127.0.0.1:1/none:here", "true"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("127.0.0.1:1/none:here is not in the store"),
        "{err}"
    );
    let (code, _, err) = run(&cs, &["--device-read-bps", "fast", &image, "true"]);
    assert_ne!(code, 0);
    assert!(err.contains("invalid rate \"fast\""), "{err}");
    let (code, _, err) = run(&cs, &["--device-read-bps", "1:3:1mb", &image, "true"]);
    assert_ne!(code, 0);
    assert!(err.contains("1:3 is not a block device"), "{err}");
    let (code, _, err) = run(&cs, &[&image, "/no/such/command"]);
    assert_ne!(code, 0, "a missing command fails: {err}");
    no_run_snapshots_left(&cs);
}
