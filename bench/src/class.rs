//! Storage classes: the device under a path as it is, and emulated ones
//! built on the spot, each a fresh ext4 on a loop device over a file on a
//! tmpfs of the suite's own (memory-fast, so the emulation is the limit).
//! HDD: the loop device (direct I/O, queue rotational) is over the file of
//! the suite's HDD model (`hddmodel`: every request served after a 7200 rpm
//! disk's seek, rotation and transfer time, ~150 random IOPS, ~150 MB/s),
//! not throttled: a throttle charges requests, not their order, and only
//! those submitted from its cgroup. SATA SSD (~90k IOPS, ~550 MB/s): a v1
//! blkio limit on the loop device in a cgroup of the suite's, which every
//! process of a workload runs in. NVMe-like: unthrottled.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hddmodel::{HddModel, Params};
use crate::proc::Cmd;
use crate::sys;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassKind {
    /// The device under a given path, as it is.
    Host,
    Hdd,
    Sata,
    Nvme,
}

impl ClassKind {
    pub const ALL: [ClassKind; 4] = [
        ClassKind::Host,
        ClassKind::Hdd,
        ClassKind::Sata,
        ClassKind::Nvme,
    ];
    pub const EMULATED: [ClassKind; 3] = [ClassKind::Hdd, ClassKind::Sata, ClassKind::Nvme];

    pub fn name(self) -> &'static str {
        match self {
            ClassKind::Host => "host",
            ClassKind::Hdd => "hdd",
            ClassKind::Sata => "sata",
            ClassKind::Nvme => "nvme",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            ClassKind::Host => "host disk",
            ClassKind::Hdd => "HDD (emulated)",
            ClassKind::Sata => "SATA SSD (emulated)",
            ClassKind::Nvme => "NVMe-like (emulated)",
        }
    }

    /// The class's throttle, per direction. The HDD has none: its limits
    /// are its model's (`model`).
    pub fn throttle(self) -> Option<Throttle> {
        match self {
            ClassKind::Sata => Some(Throttle {
                read_iops: 90_000,
                write_iops: 90_000,
                read_bps: 550_000_000,
                write_bps: 550_000_000,
            }),
            ClassKind::Host | ClassKind::Hdd | ClassKind::Nvme => None,
        }
    }

    /// The disk model under the class's loop device, for a disk of
    /// `capacity` bytes.
    pub fn model(self, capacity: u64) -> Option<Params> {
        (self == ClassKind::Hdd).then(|| Params::hdd(capacity))
    }
}

impl std::str::FromStr for ClassKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<ClassKind, String> {
        ClassKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown class {s:?}: host, hdd, sata or nvme"))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Throttle {
    pub read_iops: u64,
    pub write_iops: u64,
    /// Bytes per second.
    pub read_bps: u64,
    pub write_bps: u64,
}

/// What cstore's probe and policy make of the class's filesystem
/// (`cstore device info --json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// nvme, ssd, rotational or memory.
    pub kind: String,
    /// Devices from the filesystem's to the one doing the I/O.
    pub chain: Vec<String>,
    pub rotational: Option<bool>,
    pub policy: PolicyView,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyView {
    pub rings: u64,
    pub queue_depth: u64,
    pub io_size: u64,
    pub direct: bool,
    /// Blob streams at once (layers unpacked in parallel).
    pub streams: u64,
    pub reason: String,
}

/// A class as the report describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassInfo {
    pub kind: ClassKind,
    pub title: String,
    pub emulated: bool,
    /// The directory the workloads used.
    pub path: PathBuf,
    /// The block device (e.g. "loop3 (7:3)" or "vda (254:0)").
    pub device: String,
    /// How the device is made, in a sentence.
    pub device_detail: String,
    pub throttle: Option<Throttle>,
    /// The disk model serving the loop device's file (the HDD class).
    #[serde(default)]
    pub model: Option<Params>,
    /// e.g. "ext4 (journal)".
    pub filesystem: String,
    pub probe: Probe,
}

/// A class set up and ready; torn down on drop (also on error or Ctrl-C).
pub struct Class {
    pub info: ClassInfo,
    /// Where workloads keep their data.
    pub dir: PathBuf,
    /// The blkio cgroup every workload process runs in (throttled classes).
    pub cgroup: Option<PathBuf>,
    mountpoint: Option<PathBuf>,
    loopdev: Option<PathBuf>,
    backing: Option<PathBuf>,
    /// The HDD model serving the loop device's file, and its mount point.
    model: Option<HddModel>,
    model_dir: Option<PathBuf>,
    /// A directory made for the host class, removed at the end.
    made_dir: Option<PathBuf>,
}

/// How big an emulated class's filesystem is (sparse: only what is written
/// takes memory).
pub struct Sizes {
    pub fs_bytes: u64,
}

impl Class {
    /// The host class: a directory under `path` on whatever device it is.
    pub fn host(path: &Path, run_id: &str, cstore: &Path) -> Result<Class> {
        let dir = path.join(format!("{run_id}-host"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("mkdir", &dir, e))?;
        let mut c = Class {
            info: placeholder(ClassKind::Host, &dir),
            dir: dir.clone(),
            cgroup: None,
            mountpoint: None,
            loopdev: None,
            backing: None,
            model: None,
            model_dir: None,
            made_dir: Some(dir.clone()),
        };
        let probe = probe(cstore, &dir)?;
        c.info.device = probe.1.clone();
        c.info.device_detail = format!(
            "the device under {} as it is (not throttled, the filesystem as found)",
            path.display()
        );
        c.info.filesystem = probe.2.clone();
        c.info.probe = probe.0;
        Ok(c)
    }

    /// An emulated class: file on `tmpfs_dir` → loop device → fresh ext4
    /// mounted under `work` → throttled in a blkio cgroup.
    pub fn emulated(
        kind: ClassKind,
        tmpfs_dir: &Path,
        work: &Path,
        run_id: &str,
        cstore: &Path,
        sizes: &Sizes,
    ) -> Result<Class> {
        let mnt = work.join(kind.name());
        let mut c = Class {
            info: placeholder(kind, &mnt),
            dir: mnt.clone(),
            cgroup: None,
            mountpoint: None,
            loopdev: None,
            backing: None,
            model: None,
            model_dir: None,
            made_dir: Some(mnt.clone()),
        };
        let class_err = |detail: String| Error::Class {
            class: kind.name().into(),
            detail,
        };
        // From here on every step is undone by Drop, also when a later one fails.
        let img = tmpfs_dir.join(format!("{}.img", kind.name()));
        let attach = match kind.model(sizes.fs_bytes) {
            Some(params) => {
                let mdir = work.join(format!("{}-model", kind.name()));
                std::fs::create_dir_all(&mdir).map_err(|e| Error::io("mkdir", &mdir, e))?;
                c.model_dir = Some(mdir.clone());
                c.backing = Some(img.clone());
                let m = HddModel::start(&mdir, &img, params)?;
                let disk = m.disk();
                c.model = Some(m);
                // Direct I/O: no page cache between the loop device and
                // the model, which sees the requests the block layer sent.
                (disk, "--direct-io=on")
            }
            None => {
                let f = std::fs::File::create(&img).map_err(|e| Error::io("create", &img, e))?;
                c.backing = Some(img.clone());
                f.set_len(sizes.fs_bytes)
                    .map_err(|e| Error::io("size", &img, e))?;
                (img.clone(), "--direct-io=off")
            }
        };
        let dev = Cmd::new("losetup", "making the class's loop device")
            .args(["--find", "--show", attach.1])
            .arg(&attach.0)
            .output()?;
        let dev = PathBuf::from(dev.trim());
        c.loopdev = Some(dev.clone());
        let name = dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| class_err(format!("losetup printed {}", dev.display())))?;
        // Loop devices take the flag from their backing file's device, and
        // a file on tmpfs has none: set what the class claims. The probe
        // reads it from this queue (a loop over tmpfs is the device itself).
        let rot = Path::new("/sys/block").join(&name).join("queue/rotational");
        let want = if kind == ClassKind::Hdd { "1" } else { "0" };
        std::fs::write(&rot, want).map_err(|e| Error::io("write", &rot, e))?;
        if c.model.is_some() {
            // What a disk's queue gets (udev's and the kernel's choice for a
            // rotational single-queue device); a loop device starts with
            // none. It sorts and merges what waits for the model.
            let sched = Path::new("/sys/block").join(&name).join("queue/scheduler");
            std::fs::write(&sched, "mq-deadline").map_err(|e| Error::io("write", &sched, e))?;
        }
        // No lazy init: a background thread zeroing inode tables would
        // write during the measurements.
        Cmd::new("mkfs.ext4", "making the class's filesystem")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&dev)
            .output()?;
        std::fs::create_dir_all(&mnt).map_err(|e| Error::io("mkdir", &mnt, e))?;
        Cmd::new("mount", "mounting the class's filesystem")
            .arg(&dev)
            .arg(&mnt)
            .output()?;
        c.mountpoint = Some(mnt.clone());
        let (maj, min) = sys::majmin(&dev)?;
        if let Some(t) = kind.throttle() {
            let root = sys::blkio_root().ok_or_else(|| {
                class_err("no v1 blkio hierarchy to throttle in (the emulated HDD and SATA classes need one)".into())
            })?;
            let cg = root.join(format!("{run_id}-{}", kind.name()));
            std::fs::create_dir(&cg).map_err(|e| Error::io("mkdir", &cg, e))?;
            c.cgroup = Some(cg.clone());
            for (file, v) in [
                ("blkio.throttle.read_iops_device", t.read_iops),
                ("blkio.throttle.write_iops_device", t.write_iops),
                ("blkio.throttle.read_bps_device", t.read_bps),
                ("blkio.throttle.write_bps_device", t.write_bps),
            ] {
                std::fs::write(cg.join(file), format!("{maj}:{min} {v}"))
                    .map_err(|e| Error::io("write", cg.join(file), e))?;
            }
        }
        let (probe, _, fs) = probe(cstore, &mnt)?;
        c.info.device = format!("{name} ({maj}:{min})");
        c.info.device_detail = match (kind.throttle(), &c.model) {
            (_, Some(m)) => {
                let p = &m.params;
                format!(
                    "loop device (direct I/O) over a file served by the suite's HDD model, queue rotational={want} with mq-deadline, not throttled: {} rpm, a seek {:.1} ms + {:.0} ms × sqrt(distance / disk), rotational wait by offset (mean {:.2} ms), {} MB/s, one request at a time in arrival order, none for a request that starts where the last ended",
                    p.rpm,
                    p.settle_us as f64 / 1e3,
                    p.full_stroke_us as f64 / 1e3,
                    p.revolution_us() as f64 / 2e3,
                    p.transfer_bps / 1_000_000
                )
            }
            (Some(t), None) => format!(
                "loop device over a file on tmpfs, queue rotational={want}, throttled to {} read / {} write IOPS and {} / {} MB/s (v1 blkio cgroup of the workload's processes)",
                t.read_iops,
                t.write_iops,
                t.read_bps / 1_000_000,
                t.write_bps / 1_000_000
            ),
            (None, None) => format!("loop device over a file on tmpfs, queue rotational={want}, not throttled"),
        };
        c.info.filesystem = fs;
        c.info.probe = probe;
        c.info.model = c.model.as_ref().map(|m| m.params.clone());
        Ok(c)
    }

    /// Undo everything, in order; what could not be undone, as messages.
    pub fn teardown(&mut self) -> Vec<String> {
        let mut errs = Vec::new();
        if let Some(cg) = self.cgroup.take() {
            if let Err(e) = sys::remove_cgroup(&cg) {
                errs.push(e.to_string());
            }
        }
        if let Some(m) = self.mountpoint.take() {
            for p in sys::mounts_under(&m) {
                if let Err(e) = sys::umount(&p) {
                    errs.push(e.to_string());
                }
            }
        }
        if let Some(dev) = self.loopdev.take() {
            if let Err(e) = detach(&dev) {
                errs.push(e.to_string());
            }
        }
        // After the loop device lets go of its file; stopping the server
        // aborts the connection, so nothing is left waiting on it.
        if let Some(mut m) = self.model.take() {
            if let Err(e) = m.stop() {
                errs.push(e.to_string());
            }
        }
        if let Some(d) = self.model_dir.take() {
            if let Err(e) = std::fs::remove_dir(&d) {
                errs.push(Error::io("remove", &d, e).to_string());
            }
        }
        if let Some(f) = self.backing.take() {
            if let Err(e) = std::fs::remove_file(&f) {
                errs.push(Error::io("remove", &f, e).to_string());
            }
        }
        if let Some(d) = self.made_dir.take() {
            for p in sys::mounts_under(&d) {
                if let Err(e) = sys::umount(&p) {
                    errs.push(e.to_string());
                }
            }
            if let Err(e) = std::fs::remove_dir_all(&d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    errs.push(Error::io("remove", &d, e).to_string());
                }
            }
        }
        errs
    }
}

impl Drop for Class {
    fn drop(&mut self) {
        for e in self.teardown() {
            eprintln!(
                "cstore bench suite: cleanup of class {}: {e}",
                self.info.kind.name()
            );
        }
    }
}

/// LOOP_CLR_FD (as `losetup -d`; no process to spawn during cleanup).
fn detach(dev: &Path) -> Result<()> {
    let f = std::fs::File::open(dev).map_err(|e| Error::io("open", dev, e))?;
    use std::os::fd::AsRawFd;
    const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
    // SAFETY: LOOP_CLR_FD takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD, 0) } != 0 {
        return Err(Error::io("detach", dev, std::io::Error::last_os_error()));
    }
    Ok(())
}

fn placeholder(kind: ClassKind, path: &Path) -> ClassInfo {
    ClassInfo {
        kind,
        title: kind.title().into(),
        emulated: kind != ClassKind::Host,
        path: path.to_path_buf(),
        device: String::new(),
        device_detail: String::new(),
        throttle: kind.throttle(),
        model: None,
        filesystem: String::new(),
        probe: Probe {
            kind: String::new(),
            chain: Vec::new(),
            rotational: None,
            policy: PolicyView {
                rings: 0,
                queue_depth: 0,
                io_size: 0,
                direct: false,
                streams: 0,
                reason: String::new(),
            },
        },
    }
}

/// `cstore device info --json DIR`: the probe, the device ("vda (254:0)"),
/// the filesystem ("ext4 (journal)").
pub fn probe(cstore: &Path, dir: &Path) -> Result<(Probe, String, String)> {
    probe_with(cstore, dir, None)
}

/// The same with `CSTORE_POLICY=kind`.
pub fn probe_with(
    cstore: &Path,
    dir: &Path,
    policy: Option<&str>,
) -> Result<(Probe, String, String)> {
    let mut cmd = Cmd::new(cstore, "probing the class's device")
        .args(["device", "info", "--json"])
        .arg(dir);
    if let Some(p) = policy {
        cmd = cmd.env("CSTORE_POLICY", p);
    }
    let out = cmd.output()?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| Error::Output {
        what: "cstore device info --json".into(),
        detail: e.to_string(),
    })?;
    let d = &v["device"];
    let p = &v["policy"];
    let chain: Vec<String> = d["chain"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let device = match d["device"].as_str() {
        Some(name) => format!("{name} ({})", d["dev"].as_str().unwrap_or("?")),
        None => format!(
            "none ({})",
            d["fs_type"].as_str().unwrap_or("no block device")
        ),
    };
    let fs = match d["filesystem"]["kind"].as_str() {
        Some(k) => match d["filesystem"]["journal"].as_bool() {
            Some(true) => format!("{k} (journal)"),
            Some(false) => format!("{k} (no journal)"),
            None => k.to_string(),
        },
        None => "unknown".into(),
    };
    let probe = Probe {
        kind: d["kind"].as_str().unwrap_or("unknown").into(),
        chain,
        rotational: d["queue"]["rotational"].as_bool(),
        policy: PolicyView {
            rings: p["rings"].as_u64().unwrap_or(0),
            queue_depth: p["queue_depth"].as_u64().unwrap_or(0),
            io_size: p["io_size"].as_u64().unwrap_or(0),
            direct: p["direct"].as_bool().unwrap_or(false),
            streams: p["streams"].as_u64().unwrap_or(0),
            reason: p["reason"].as_str().unwrap_or("").into(),
        },
    };
    Ok((probe, device, fs))
}
