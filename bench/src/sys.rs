//! The machine, the page cache, mounts and cgroups.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cstore_os::mountinfo::{self, MountInfo};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::proc;

/// Where the figures came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub hostname: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    /// The cgroup hierarchy holding the io controller ("v1 blkio" or "v2").
    pub io_cgroup: String,
}

fn read(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn machine() -> Machine {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let memory_bytes = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024);
    Machine {
        hostname: read("/proc/sys/kernel/hostname"),
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes,
        kernel: read("/proc/sys/kernel/osrelease"),
        io_cgroup: if blkio_root().is_some() {
            "v1 blkio".into()
        } else {
            "none usable (no v1 blkio hierarchy)".into()
        },
    }
}

/// The v1 blkio hierarchy's mount point, if there is one.
pub fn blkio_root() -> Option<PathBuf> {
    mountinfo::read()
        .ok()?
        .into_iter()
        .find(|m| m.fs_type == "cgroup" && m.has_super_option("blkio"))
        .map(|m| m.mount_point)
}

/// Every cgroup hierarchy's mount point, v1 and v2 (runc makes its
/// container's cgroup in each, the hybrid layout's v2 "unified" one too):
/// for sweeping our cgroups out of all.
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| matches!(m.fs_type.as_str(), "cgroup" | "cgroup2"))
        .map(|m| m.mount_point)
        .collect()
}

/// Write back dirty data and drop the page cache, dentries and inodes, so a
/// round starts cold.
pub fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| Error::io("write", "/proc/sys/vm/drop_caches", e))
}

/// How long `syncfs` of the filesystem holding `dir` takes: what a tool
/// left in the page cache reaching the disk.
pub fn syncfs_timed(dir: &Path) -> Result<Duration> {
    use std::os::fd::AsFd;
    let d = std::fs::File::open(dir).map_err(|e| Error::io("open", dir, e))?;
    let t0 = std::time::Instant::now();
    cstore_os::sys::syncfs(d.as_fd()).map_err(|e| Error::io("syncfs", dir, e))?;
    Ok(t0.elapsed())
}

/// Mount points at or under `dir` in this mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    points_under(&mountinfo::read().unwrap_or_default(), dir)
}

fn points_under(mounts: &[MountInfo], dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mounts
        .iter()
        .map(|m| m.mount_point.clone())
        .filter(|mp| mp.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    v.dedup();
    v
}

/// Unmount `p`; if busy, retry a few times, then detach it lazily.
pub fn umount(p: &Path) -> Result<()> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid(format!("mount point {} has a NUL", p.display())))?;
    for _ in 0..10 {
        // SAFETY: a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOENT) => return Ok(()), // not mounted
            Some(libc::EBUSY) => std::thread::sleep(Duration::from_millis(100)),
            _ => return Err(Error::io("umount", p, e)),
        }
    }
    // SAFETY: as above.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(Error::io("umount -l", p, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Remove a cgroup directory and those under it: kill what is left in
/// each first.
pub fn remove_cgroup(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // Children first (runc's /NS/ID under our /NS).
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path())?;
            }
        }
    }
    for attempt in 0..50 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            proc::kill(pid, libc::SIGKILL);
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if attempt == 49 => return Err(Error::io("rmdir", dir, e)),
            // EBUSY while killed tasks exit.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok(())
}

/// `MAJ:MIN` of a block device node.
pub fn majmin(dev: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dev).map_err(|e| Error::io("stat", dev, e))?;
    Ok((libc::major(m.rdev()), libc::minor(m.rdev())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        let info = mountinfo::parse(concat!(
            "40 1 0:50 / /w/a\\040b rw - tmpfs tmpfs rw\n",
            "41 1 0:51 / /w/plain rw - tmpfs tmpfs rw\n",
            "42 1 0:52 / /w/x\\134y rw - tmpfs tmpfs rw\n",
        ));
        let under = points_under(&info, Path::new("/w"));
        assert!(under.contains(&PathBuf::from("/w/a b")), "{under:?}");
        assert!(under.contains(&PathBuf::from("/w/plain")), "{under:?}");
        assert!(under.contains(&PathBuf::from(r"/w/x\y")), "{under:?}");
    }

    #[test]
    fn the_machine_is_described() {
        let m = machine();
        assert!(
            m.cpus >= 1 && m.memory_bytes > 0 && !m.kernel.is_empty(),
            "{m:?}"
        );
    }
}
