//! #15's systemd path under a real systemd (252, Debian's) as PID 1:
//! fixtures/systemd-vm.sh boots a qemu guest on the host's root and runs
//! the shipped docs/cstore-lazy.service there. A `cstore mount --lazy` made
//! before the unit runs (a keeper serves it) and a reader looping over every
//! file of it; the unit starts and takes the keeper's connections over; then
//! the service is killed with SIGKILL and restarted with `systemctl restart`
//! (3 times each). Passes only if the reader saw no error, the tree equals
//! umoci's, the takeover and every restart resumed the connections from
//! systemd's fd store, and no keeper is left.
//! Fails under CI=true when qemu, a kernel or systemd is missing
//! (fixtures/deps.sh --nvme-vm).

use std::process::Command;
use std::time::Instant;

use cstore_os::testing::{on_path, vm_section as section};

#[test]
fn lazy_daemon_survives_kills_and_restarts_under_systemd() {
    const NAME: &str = "lazy_daemon_survives_kills_and_restarts_under_systemd";
    let kernel = std::fs::read_dir("/boot").ok().is_some_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
    });
    for (ok, why) in [
        (
            on_path("qemu-system-x86_64"),
            "qemu-system-x86_64 is not installed (fixtures/deps.sh --nvme-vm)",
        ),
        (
            kernel,
            "no /boot/vmlinuz-* (fixtures/deps.sh --nvme-vm installs linux-image-amd64)",
        ),
        (
            std::path::Path::new("/lib/systemd/systemd").exists(),
            "systemd is not installed (apt-get install systemd)",
        ),
    ] {
        if !ok {
            cstore_os::testing::skip_or_fail(NAME, why);
            return;
        }
    }
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(cstore_testkit::fixture("systemd-vm.sh"))
        .arg("--cstore")
        .arg(env!("CARGO_BIN_EXE_cstore"))
        .output()
        .expect("running fixtures/systemd-vm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "systemd-vm.sh took {:.1}s\n{stdout}\n{stderr}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "systemd-vm.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let checks = section(&stdout, "checks");
    for name in [
        "mount --lazy",
        "keeper before the unit",
        "unit started",
        "takeover",
        "systemd-unit marker",
        "restarts",
        "reader",
        "resumed",
        "no keeper",
        "tree",
    ] {
        let line = checks
            .iter()
            .find(|l| l.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no check {name:?} in {checks:?}"));
        assert!(line.contains(": PASS"), "{line}\n{stdout}");
    }
    let events = section(&stdout, "events");
    // The takeover, then 3 kills and 3 restarts.
    assert_eq!(events.len(), 7, "{events:?}");
    assert!(events[0].starts_with("takeover "), "{events:?}");
    // systemd, not a keeper, ran the daemon: PID 1 was systemd.
    let sd = section(&stdout, "systemd");
    assert!(sd.contains(&"PID 1: systemd"), "{sd:?}");
}
