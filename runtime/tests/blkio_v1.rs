//! v1 blkio throttling on this machine's real blkio hierarchy, in a cgroup of
//! the test's own (removed afterwards), on a loop device of the test's own.
//! Without a v1 blkio hierarchy it is skipped visibly (a failure under CI=true).

use std::process::Command;

use cstore_runtime::{Cgroup, Hierarchy, IoLimits};

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn v1_throttle_files_hold_the_limits_for_the_device() {
    let h = match Hierarchy::detect() {
        Ok(h @ Hierarchy::V1Blkio(_)) => h,
        other => {
            cstore_os::testing::skip_or_fail(
                "v1_throttle_files_hold_the_limits_for_the_device",
                &format!("the io controller is not on a v1 blkio hierarchy here ({other:?})"),
            );
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = Loop(String::from_utf8(out.stdout).unwrap().trim().to_string());
    let majmin = Command::new("lsblk")
        .args(["-dno", "MAJ:MIN", &dev.0])
        .output()
        .unwrap();
    let majmin = String::from_utf8(majmin.stdout).unwrap().trim().to_string();
    let (maj, min) = majmin.split_once(':').unwrap();
    let (maj, min): (u32, u32) = (maj.parse().unwrap(), min.parse().unwrap());

    let cg = Cgroup::create(h, &format!("cstore-test-{}", std::process::id())).unwrap();
    let limits = IoLimits {
        read_bps: Some(1 << 20),
        write_bps: Some(2 << 20),
        read_iops: Some(150),
        write_iops: None,
    };
    let res = cg.set_io_limits(maj, min, &limits);
    let read = |f: &str| std::fs::read_to_string(cg.dir.join(f)).unwrap();
    let files = (
        read("blkio.throttle.read_bps_device"),
        read("blkio.throttle.write_bps_device"),
        read("blkio.throttle.read_iops_device"),
        read("blkio.throttle.write_iops_device"),
    );
    let dir_path = cg.dir.clone();
    cg.remove().unwrap();
    res.unwrap();
    assert_eq!(files.0.trim(), format!("{maj}:{min} 1048576"));
    assert_eq!(files.1.trim(), format!("{maj}:{min} 2097152"));
    assert_eq!(files.2.trim(), format!("{maj}:{min} 150"));
    assert_eq!(files.3.trim(), "", "no write iops limit set");
    assert!(!dir_path.exists());
}
