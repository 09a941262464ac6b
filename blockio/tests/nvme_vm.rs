//! The probe and NVMe identify on a real NVMe controller model: runs
//! fixtures/nvme-vm.sh, which boots Debian's kernel under qemu with an
//! emulated NVMe controller (serial cstore0001, MDTS 7, 128 MiB namespace)
//! and runs `cstore device info /dev/nvme0n1 --json` in the guest, a raw
//! O_DIRECT write/read self-check of the namespace, and the io_uring engine's
//! own (`cstore device selfcheck`); then, on a cgroup v2-only hierarchy,
//! `cstore run` with I/O limits on the namespace from a store on an ext4
//! partition of it (the container's io.max, and a timed O_DIRECT read under
//! --device-read-bps 1mb). Skipped visibly when qemu-system-x86_64 is not
//! installed (fixtures/deps.sh --nvme-vm), and then a failure under CI=true.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

use cstore_os::testing::{on_path, vm_section as section};

#[test]
fn device_info_on_qemus_nvme_controller() {
    if !on_path("qemu-system-x86_64") {
        cstore_os::testing::skip_or_fail(
            "device_info_on_qemus_nvme_controller",
            "qemu-system-x86_64 is not installed (fixtures/deps.sh --nvme-vm)",
        );
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("device.json");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(repo.join("fixtures/nvme-vm.sh"))
        .arg("--out")
        .arg(&json_path)
        .output()
        .expect("running fixtures/nvme-vm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "nvme-vm.sh took {:.1}s\n{stderr}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "nvme-vm.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    let selfcheck = section(&stdout, "selfcheck");
    assert!(
        selfcheck.iter().any(|l| l.starts_with("guest: PASS")),
        "guest self-check: {selfcheck:?}"
    );
    assert!(
        selfcheck.iter().any(|l| l.starts_with("host: PASS")),
        "host self-check: {selfcheck:?}"
    );
    assert!(
        selfcheck
            .iter()
            .any(|l| l.starts_with("guest: PASS engine io_uring")),
        "engine self-check: {selfcheck:?}"
    );
    assert!(
        !selfcheck.iter().any(|l| l.contains("FAIL")),
        "{selfcheck:?}"
    );

    // The engine's self-check: io_uring on the NVMe namespace, O_DIRECT,
    // every ring used, every block read back as written.
    let engine = section(&stdout, "cstore device selfcheck --json").join("\n");
    let e: Value = serde_json::from_str(&engine).unwrap_or_else(|err| panic!("{err}: {engine}"));
    assert_eq!(e["path"], "/dev/nvme0n1", "{engine}");
    assert_eq!(e["backend"], "iouring", "{engine}");
    assert_eq!(e["verified"], true, "{engine}");
    assert_eq!(e["bad_blocks"], 0, "{engine}");
    assert_eq!(e["direct"], true, "{engine}");
    assert_eq!(e["bytes"], 32 << 20, "{engine}");
    assert_eq!(e["rings_used"], e["rings"], "{engine}");
    let ios = 32u64 * (1 << 20) / e["io_size"].as_u64().unwrap();
    assert_eq!(e["write"]["ios"], ios, "{engine}");
    assert_eq!(e["read"]["ios"], ios, "{engine}");
    assert!(e["read"]["iops"].as_f64().unwrap() > 0.0, "{engine}");
    let text = section(&stdout, "cstore device info").join("\n");
    assert!(text.contains("serial cstore0001"), "{text}");
    cgroup_v2_run_checks(&stdout, &text);

    let json = std::fs::read_to_string(&json_path).unwrap();
    assert_eq!(
        json.trim(),
        section(&stdout, "cstore device info --json")
            .join("\n")
            .trim()
    );
    let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let d = &v["device"];
    assert_eq!(d["kind"], "nvme", "{json}");
    assert_eq!(d["device"], "nvme0n1", "{json}");
    assert_eq!(d["chain"], serde_json::json!(["nvme0n1"]), "{json}");
    assert_eq!(d["nvme_error"], Value::Null, "{json}");

    let c = &d["nvme"]["controller"];
    assert_eq!(c["serial"], "cstore0001", "{json}");
    assert!(c["model"].as_str().unwrap_or("").contains("QEMU"), "{json}");
    assert_eq!(c["vendor_id"], 0x1b36, "QEMU's PCI vendor id: {json}");
    assert_eq!(c["mdts"], 7, "{json}");
    assert_eq!(d["nvme"]["max_transfer_bytes"], 4096 << 7, "{json}");

    let ns = &d["nvme"]["namespace"];
    let in_use = ns["lba_format_in_use"].as_u64().unwrap() as usize;
    let lba = ns["lba_formats"][in_use]["data_size"].as_u64().unwrap();
    assert_eq!(lba, 512, "qemu's default LBA format: {json}");
    assert_eq!(
        ns["size_lbas"].as_u64().unwrap() * lba,
        128 << 20,
        "the 128 MiB image: {json}"
    );
    assert_eq!(d["queue"]["logical_block_size"], lba, "{json}");
    assert!(d["queue"]["hw_queues"].as_u64().unwrap() >= 1, "{json}");

    let p = &v["policy"];
    assert!(p["rings"].as_u64().unwrap() >= 1, "{json}");
    assert_eq!(p["direct"], true, "{json}");
}

/// `cstore run` in the guest, on cgroup2 alone: the container's io.max names
/// the namespace's MAJ:MIN (from `cstore device info`) with exactly the
/// limits given, and an O_DIRECT read under 1 MiB/s takes about size/rate.
fn cgroup_v2_run_checks(stdout: &str, device_info: &str) {
    const RATE: f64 = (1u64 << 20) as f64;
    // "device:      nvme0n1 (259:0)"
    let majmin = device_info
        .lines()
        .find_map(|l| l.strip_prefix("device:"))
        .and_then(|d| d.trim().strip_prefix("nvme0n1 ("))
        .and_then(|d| d.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no MAJ:MIN of nvme0n1 in {device_info}"));
    assert_eq!(
        section(stdout, "cgroup v2 io.max"),
        [format!(
            "{majmin} rbps=1048576 wbps=max riops=max wiops=100"
        )],
        "the container's /sys/fs/cgroup/io.max"
    );

    // "== limited" / "== free" blocks: size, took T0 T1, exit.
    let throttle = section(stdout, "cgroup v2 throttle");
    let run = |name: &str| -> (u64, f64) {
        let block: Vec<&str> = throttle
            .iter()
            .skip_while(|l| **l != format!("== {name}"))
            .skip(1)
            .take_while(|l| !l.starts_with("== "))
            .copied()
            .collect();
        let field = |k: &str| {
            block
                .iter()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k:?} in the {name} run: {throttle:?}"))
        };
        assert_eq!(field("exit "), "0", "{name} run: {throttle:?}");
        let (t0, t1) = field("took ").split_once(' ').unwrap();
        let took = t1.parse::<f64>().unwrap() - t0.parse::<f64>().unwrap();
        (field("size ").parse().unwrap(), took)
    };
    let (size, limited) = run("limited");
    let (_, free) = run("free");
    let expected = size as f64 / RATE;
    eprintln!(
        "guest O_DIRECT read of {size} bytes: {limited:.2}s at 1 MiB/s (size/rate {expected:.2}s), {free:.2}s unthrottled"
    );
    assert!(
        throttle.contains(&"io.max read-only"),
        "the container must not lift its own limit: {throttle:?}"
    );
    assert!(size > 1 << 20, "busybox is over a MiB: {size}");
    assert!(
        limited >= 0.6 * expected,
        "throttled read took {limited:.2}s, expected about {expected:.2}s"
    );
    assert!(
        free * 4.0 < limited,
        "unthrottled read ({free:.2}s) is much faster than throttled ({limited:.2}s)"
    );
}
