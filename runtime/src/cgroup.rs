//! Cgroup I/O limits, v1 and v2 behind one interface (as youki's libcgroups
//! does it). Which one applies is read from /proc/self/mountinfo: a cgroup v1
//! mount carrying the `blkio` controller, or the cgroup2 mount whose root
//! `cgroup.controllers` lists `io`. Never guessed.

use std::fs;
use std::path::{Path, PathBuf};

use cstore_os::{mountinfo, IoError};

pub use crate::Error;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| IoError::new(op, path, source).into()
}

/// Where the io controller lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// The v1 `blkio` hierarchy mounted at this path.
    V1Blkio(PathBuf),
    /// The unified hierarchy mounted at this path, with `io` available.
    V2(PathBuf),
}

impl Hierarchy {
    /// Find the hierarchy with the io controller from a mountinfo text (and,
    /// for v2, the controllers file under its mount point).
    pub fn from_mountinfo(mountinfo: &str) -> Result<Hierarchy, Error> {
        let mut v2 = None;
        for m in mountinfo::parse(mountinfo) {
            match m.fs_type.as_str() {
                "cgroup" if m.has_super_option("blkio") => {
                    return Ok(Hierarchy::V1Blkio(m.mount_point))
                }
                "cgroup2" => v2 = Some(m.mount_point),
                _ => {}
            }
        }
        match v2 {
            Some(root)
                if fs::read_to_string(root.join("cgroup.controllers"))
                    .is_ok_and(|c| c.split_whitespace().any(|x| x == "io")) =>
            {
                Ok(Hierarchy::V2(root))
            }
            _ => Err(Error::NoIoController),
        }
    }

    /// The hierarchy of this machine.
    pub fn detect() -> Result<Hierarchy, Error> {
        let text = fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_err("read", Path::new("/proc/self/mountinfo")))?;
        Self::from_mountinfo(&text)
    }

    pub fn root(&self) -> &Path {
        match self {
            Hierarchy::V1Blkio(p) | Hierarchy::V2(p) => p,
        }
    }
}

/// Limits for one block device; None leaves that limit off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IoLimits {
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
}

impl IoLimits {
    pub fn is_empty(&self) -> bool {
        *self == IoLimits::default()
    }
}

/// Parse a rate: a number with an optional k/m/g (×1024) suffix and an
/// optional "b"/"ib", as docker's --device-read-bps takes it ("1mb").
pub fn parse_rate(s: &str) -> Result<u64, Error> {
    let bad = |reason: &str| Error::InvalidRate {
        value: s.to_string(),
        reason: reason.into(),
    };
    let t = s.trim().to_ascii_lowercase();
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return Err(bad("expected a number, e.g. 1mb or 150"));
    }
    let unit = t[digits.len()..]
        .trim_end_matches("ib")
        .trim_end_matches('b');
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(bad("unknown unit (use k, m or g)")),
    };
    let n: u64 = digits.parse().map_err(|_| bad("too large"))?;
    let v = n.checked_mul(mult).ok_or_else(|| bad("too large"))?;
    if v == 0 {
        return Err(bad("a limit must be positive"));
    }
    Ok(v)
}

/// A cgroup of one hierarchy, by its directory.
#[derive(Debug)]
pub struct Cgroup {
    pub hierarchy: Hierarchy,
    pub dir: PathBuf,
}

impl Cgroup {
    /// Create `name` (a relative path) under the hierarchy's root.
    pub fn create(hierarchy: Hierarchy, name: &str) -> Result<Cgroup, Error> {
        let dir = hierarchy.root().join(name.trim_start_matches('/'));
        fs::create_dir_all(&dir).map_err(io_err("create cgroup", &dir))?;
        Ok(Cgroup { hierarchy, dir })
    }

    /// Write the limits for device `major:minor`.
    pub fn set_io_limits(&self, major: u32, minor: u32, l: &IoLimits) -> Result<(), Error> {
        let dev = format!("{major}:{minor}");
        match &self.hierarchy {
            Hierarchy::V2(_) => {
                let v = |x: Option<u64>| x.map_or("max".to_string(), |n| n.to_string());
                let line = format!(
                    "{dev} rbps={} wbps={} riops={} wiops={}",
                    v(l.read_bps),
                    v(l.write_bps),
                    v(l.read_iops),
                    v(l.write_iops)
                );
                let p = self.dir.join("io.max");
                fs::write(&p, line).map_err(io_err("write", &p))
            }
            Hierarchy::V1Blkio(_) => {
                // v1 has a file per limit; 0 removes a device's limit.
                for (file, value) in [
                    ("blkio.throttle.read_bps_device", l.read_bps),
                    ("blkio.throttle.write_bps_device", l.write_bps),
                    ("blkio.throttle.read_iops_device", l.read_iops),
                    ("blkio.throttle.write_iops_device", l.write_iops),
                ] {
                    let p = self.dir.join(file);
                    fs::write(&p, format!("{dev} {}", value.unwrap_or(0)))
                        .map_err(io_err("write", &p))?;
                }
                Ok(())
            }
        }
    }

    pub fn add_pid(&self, pid: u32) -> Result<(), Error> {
        let p = self.dir.join("cgroup.procs");
        fs::write(&p, pid.to_string()).map_err(io_err("write", &p))
    }

    /// Remove the (empty) cgroup.
    pub fn remove(self) -> Result<(), Error> {
        fs::remove_dir(&self.dir).map_err(io_err("remove cgroup", &self.dir))
    }
}

/// Mount points of every cgroup hierarchy (v1 and v2) in a mountinfo text.
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo::parse(mountinfo)
        .into_iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .collect()
}

/// Remove a container's cgroup `path` (e.g. "/cstore/ID") under each of
/// `roots` where it is left, then its parent where that is empty: runtimes
/// remove the leaf only, and the parent is shared by every container, so a
/// parent another container is using (ENOTEMPTY, EBUSY) stays.
pub fn remove_leftovers(roots: &[PathBuf], path: &str) -> Result<(), Error> {
    let rel = Path::new(path.trim_start_matches('/'));
    for root in roots {
        let leaf = root.join(rel);
        remove_leaf(&leaf)?;
        if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            let dir = root.join(parent);
            match fs::remove_dir(&dir) {
                Err(e)
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::ENOTEMPTY | libc::EBUSY | libc::ENOENT)
                    ) =>
                {
                    return Err(io_err("remove cgroup", &dir)(e))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// rmdir a cgroup; a v1 cgroup stays busy for a moment after its last task
/// is reaped, so EBUSY is retried for up to a second.
fn remove_leaf(dir: &Path) -> Result<(), Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => return Err(io_err("remove cgroup", dir)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

    #[test]
    fn v1_blkio_wins_where_it_is_mounted() {
        assert_eq!(
            Hierarchy::from_mountinfo(HYBRID).unwrap(),
            Hierarchy::V1Blkio("/sys/fs/cgroup/blkio".into())
        );
    }

    #[test]
    fn v2_needs_io_in_its_controllers() {
        let root = tempfile::tempdir().unwrap();
        let mi = format!(
            "29 1 0:26 / {} rw - cgroup2 cgroup2 rw",
            root.path().display()
        );
        fs::write(root.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        assert!(matches!(
            Hierarchy::from_mountinfo(&mi),
            Err(Error::NoIoController)
        ));
        fs::write(root.path().join("cgroup.controllers"), "cpu io memory pids").unwrap();
        assert_eq!(
            Hierarchy::from_mountinfo(&mi).unwrap(),
            Hierarchy::V2(root.path().into())
        );
    }

    /// The nvme-vm guest: cgroup2 alone (no tmpfs of v1 hierarchies under it).
    #[test]
    fn pure_v2_is_chosen_and_its_one_root_pruned() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().display();
        let mi = format!(
            "22 1 0:20 / / rw,relatime - tmpfs tmpfs rw,mode=755
24 22 0:21 / /sys rw,relatime - sysfs sysfs rw
25 24 0:26 / {r} rw,relatime - cgroup2 cgroup2 rw
26 22 259:1 / /store rw,relatime - ext4 /dev/nvme0n1p1 rw"
        );
        fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc",
        )
        .unwrap();
        assert_eq!(
            Hierarchy::from_mountinfo(&mi).unwrap(),
            Hierarchy::V2(root.path().into())
        );
        let roots = mount_points(&mi);
        assert_eq!(roots, [root.path().to_path_buf()]);
        fs::create_dir_all(root.path().join("cstore/c1")).unwrap();
        remove_leftovers(&roots, "/cstore/c1").unwrap();
        assert!(!root.path().join("cstore").exists());
    }

    /// v2 io.max on a fake cgroupfs tree (no v2 io controller on this machine).
    #[test]
    fn v2_io_max_line() {
        let root = tempfile::tempdir().unwrap();
        let cg = Cgroup::create(Hierarchy::V2(root.path().into()), "cstore/c1").unwrap();
        cg.set_io_limits(
            7,
            3,
            &IoLimits {
                read_bps: Some(1 << 20),
                write_iops: Some(150),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(cg.dir.join("io.max")).unwrap(),
            "7:3 rbps=1048576 wbps=max riops=max wiops=150"
        );
    }

    #[test]
    fn leftovers_go_and_a_shared_parent_goes_only_when_empty() {
        let mi = HYBRID.replace("/sys/fs/cgroup", "/fake");
        let roots = mount_points(&mi);
        assert_eq!(
            roots,
            [
                "/fake/memory",
                "/fake/blkio",
                "/fake/systemd",
                "/fake/unified"
            ]
            .map(PathBuf::from)
        );
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        fs::create_dir_all(a.join("cstore/c1")).unwrap();
        fs::create_dir_all(b.join("cstore/c1")).unwrap();
        fs::create_dir_all(b.join("cstore/c2")).unwrap();
        remove_leftovers(&[a.clone(), b.clone(), t.path().join("none")], "/cstore/c1").unwrap();
        assert!(!a.join("cstore").exists(), "empty parent removed");
        assert!(!b.join("cstore/c1").exists());
        assert!(
            b.join("cstore/c2").exists(),
            "another container's cgroup stays"
        );
    }

    #[test]
    fn rates_parse_like_docker() {
        assert_eq!(parse_rate("1mb").unwrap(), 1 << 20);
        assert_eq!(parse_rate("150").unwrap(), 150);
        assert_eq!(parse_rate("10k").unwrap(), 10240);
        assert_eq!(parse_rate("2GiB").unwrap(), 2 << 30);
        for bad in ["", "mb", "0", "1x", "-5"] {
            let e = parse_rate(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
