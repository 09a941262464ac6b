//! From any path to the block device under it, and what that device is:
//! st_dev → /sys/dev/block/MAJ:MIN → the whole disk (through partitions),
//! and through loop devices to the device of their backing file.

use cstore_os::IoError;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::Result;
use crate::nvme::{self, IdentifyController, IdentifyNamespace};

#[derive(Clone, Debug, Serialize)]
pub struct Queue {
    pub rotational: bool,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    /// 0 when the device does not report one.
    pub optimal_io_size: u32,
    pub max_sectors_kb: u32,
    pub max_hw_sectors_kb: u32,
    pub nr_requests: u32,
    /// Hardware dispatch queues (blk-mq `mq/` entries).
    pub hw_queues: u32,
    /// The active I/O scheduler ("none", "mq-deadline", ...).
    pub scheduler: String,
    /// The device completes by polling (NVMe poll queues): IOPOLL can be used.
    pub io_poll: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Nvme {
    pub controller: IdentifyController,
    pub namespace: IdentifyNamespace,
    /// MDTS in bytes, assuming the common 4 KiB minimum page size.
    pub max_transfer_bytes: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    /// The path asked about.
    pub path: PathBuf,
    /// `MAJ:MIN` of the filesystem holding the path.
    pub dev: String,
    /// The chain from the path's device to the device that does the I/O,
    /// e.g. ["loop3", "vda"] or ["nvme0n1p2", "nvme0n1"].
    pub chain: Vec<String>,
    /// The device whose queue is described (the last of `chain`).
    pub device: Option<String>,
    /// Block devices carry this; virtual filesystems (tmpfs, overlay) don't.
    pub queue: Option<Queue>,
    pub kind: DeviceKind,
    pub nvme: Option<Nvme>,
    /// Why NVMe identify data is missing, when the device is NVMe.
    pub nvme_error: Option<String>,
    /// For paths on a filesystem without a block device.
    pub fs_type: Option<String>,
    /// The filesystem holding the path (not for a block device node).
    pub filesystem: Option<Filesystem>,
}

/// What the filesystem is, as far as the policy cares.
#[derive(Clone, Debug, Serialize)]
pub struct Filesystem {
    /// The type in /proc/self/mountinfo (ext4, xfs, tmpfs...).
    pub kind: String,
    /// ext2/3/4: whether it has a journal (a jbd2 journal in /proc/fs/jbd2
    /// for its device). Without one, ext4 scans for recently deleted inodes
    /// on every inode allocation.
    pub journal: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Nvme,
    /// Non-rotational, not NVMe (SATA/virtio SSD, loop on memory...).
    Ssd,
    Rotational,
    /// No block device: tmpfs and friends; memory-speed.
    Memory,
}

impl DeviceKind {
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Nvme => "nvme",
            DeviceKind::Ssd => "ssd",
            DeviceKind::Rotational => "rotational",
            DeviceKind::Memory => "memory",
        }
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<DeviceKind, String> {
        match s {
            "nvme" => Ok(DeviceKind::Nvme),
            "ssd" => Ok(DeviceKind::Ssd),
            "rotational" | "hdd" => Ok(DeviceKind::Rotational),
            "memory" => Ok(DeviceKind::Memory),
            _ => Err(format!(
                "unknown device kind {s:?} (CSTORE_POLICY): nvme, ssd, rotational (hdd) or memory"
            )),
        }
    }
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn read_u32(p: &Path) -> u32 {
    read_trim(p)
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(0, |v| v.min(u32::MAX as u64) as u32)
}

/// The filesystem type holding `path`, from /proc/self/mountinfo (the
/// longest mount point that is a prefix of the path).
fn fs_type_of(path: &Path) -> Option<String> {
    let mounts = cstore_os::mountinfo::read().ok()?;
    let path = path.canonicalize().ok()?;
    cstore_os::mountinfo::containing(&mounts, &path).map(|m| m.fs_type.clone())
}

/// jbd2 lists each journal it runs as /proc/fs/jbd2/<device>-<journal inode>.
fn has_jbd2_journal(dev: &str) -> bool {
    let prefix = format!("{dev}-");
    fs::read_dir("/proc/fs/jbd2").is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    })
}

/// The sysfs directory of a block device by number, and whether it is a partition.
fn sysfs_of(major: u32, minor: u32) -> Option<PathBuf> {
    fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()
}

fn name_of(sys: &Path) -> String {
    sys.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn probe(path: &Path) -> Result<DeviceInfo> {
    probe_opts(path, true)
}

/// `identify`: also read NVMe identify pages (needs root and a real device).
pub fn probe_opts(path: &Path, identify: bool) -> Result<DeviceInfo> {
    let meta = fs::metadata(path).map_err(|e| IoError::new("stat", path, e))?;
    // A block device node describes itself; anything else, its filesystem's device.
    let is_block_node = {
        use std::os::unix::fs::FileTypeExt;
        meta.file_type().is_block_device()
    };
    let dev = if is_block_node {
        meta.rdev()
    } else {
        meta.dev()
    };
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let mut info = DeviceInfo {
        path: path.to_path_buf(),
        dev: format!("{major}:{minor}"),
        chain: Vec::new(),
        device: None,
        queue: None,
        kind: DeviceKind::Memory,
        nvme: None,
        nvme_error: None,
        fs_type: None,
        filesystem: None,
    };
    let sys = sysfs_of(major, minor);
    if !is_block_node {
        info.filesystem = fs_type_of(path).map(|kind| Filesystem {
            journal: kind.starts_with("ext").then(|| {
                sys.as_deref()
                    .is_some_and(|s| has_jbd2_journal(&name_of(s)))
            }),
            kind,
        });
    }
    let Some(mut sys) = sys else {
        info.fs_type = match &info.filesystem {
            Some(f) => Some(f.kind.clone()),
            None => fs_type_of(path),
        };
        return Ok(info);
    };
    // Follow partitions to their disk and loop devices to their backing file.
    for _ in 0..8 {
        info.chain.push(name_of(&sys));
        if sys.join("partition").exists() {
            if let Some(parent) = sys.parent() {
                sys = parent.to_path_buf();
                continue;
            }
        }
        let backing = read_trim(&sys.join("loop/backing_file"));
        if let Some(file) = backing {
            match fs::metadata(&file) {
                Ok(m) => match sysfs_of(libc::major(m.dev()), libc::minor(m.dev())) {
                    Some(next) => {
                        sys = next;
                        continue;
                    }
                    None => {
                        // Backed by a file on tmpfs: the loop device is memory-speed.
                        info.fs_type = fs_type_of(Path::new(&file));
                        break;
                    }
                },
                Err(_) => break,
            }
        }
        break;
    }
    let name = name_of(&sys);
    if info.chain.last() != Some(&name) {
        info.chain.push(name.clone());
    }
    let q = sys.join("queue");
    let queue = Queue {
        rotational: read_u32(&q.join("rotational")) == 1,
        logical_block_size: read_u32(&q.join("logical_block_size")),
        physical_block_size: read_u32(&q.join("physical_block_size")),
        optimal_io_size: read_u32(&q.join("optimal_io_size")),
        max_sectors_kb: read_u32(&q.join("max_sectors_kb")),
        max_hw_sectors_kb: read_u32(&q.join("max_hw_sectors_kb")),
        nr_requests: read_u32(&q.join("nr_requests")),
        hw_queues: fs::read_dir(sys.join("mq"))
            .map(|d| d.count() as u32)
            .unwrap_or(0),
        scheduler: read_trim(&q.join("scheduler"))
            .and_then(|s| {
                s.split_whitespace()
                    .find(|w| w.starts_with('['))
                    .map(|w| w.trim_matches(['[', ']']).to_string())
            })
            .unwrap_or_else(|| "none".into()),
        io_poll: read_u32(&q.join("io_poll")) == 1,
    };
    let is_nvme = name.starts_with("nvme");
    info.kind = if is_nvme {
        DeviceKind::Nvme
    } else if queue.rotational {
        DeviceKind::Rotational
    } else if info.fs_type.as_deref() == Some("tmpfs") {
        DeviceKind::Memory
    } else {
        DeviceKind::Ssd
    };
    if is_nvme && identify {
        match nvme::identify_namespace_device(&Path::new("/dev").join(&name)) {
            Ok((controller, namespace)) => {
                let max_transfer_bytes = (controller.mdts != 0).then(|| 4096u64 << controller.mdts);
                info.nvme = Some(Nvme {
                    controller,
                    namespace,
                    max_transfer_bytes,
                });
            }
            Err(e) => info.nvme_error = Some(e.to_string()),
        }
    }
    info.device = Some(name);
    info.queue = Some(queue);
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_on_the_root_disk_has_a_block_device_or_says_why_not() {
        let info = probe(Path::new("/")).unwrap();
        match &info.queue {
            Some(q) => {
                assert!(q.logical_block_size >= 512, "{info:?}");
                assert!(!info.chain.is_empty());
            }
            None => assert!(info.fs_type.is_some(), "{info:?}"),
        }
    }

    #[test]
    fn tmpfs_has_no_block_device() {
        let info = probe(Path::new("/dev/shm")).unwrap();
        assert!(info.queue.is_none());
        assert_eq!(info.kind, DeviceKind::Memory);
        assert_eq!(info.fs_type.as_deref(), Some("tmpfs"));
    }
}
