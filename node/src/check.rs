//! `cstore check`: what this kernel and host give cstore, each finding with a
//! one-line why. Features are probed by using them the way cstore does (an
//! overlay mounted in a temporary directory, a FUSE connection's INIT, an
//! io_uring set up), not inferred from version numbers: distributions
//! backport and disable things. The first thing to run on a new node, and
//! what bug reports quote.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};

/// How a finding bears on cstore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Present and working.
    Ok,
    /// Missing or partial; cstore works without it, with what `detail` says it loses.
    Degraded,
    /// Missing; cstore cannot do its job here.
    Missing,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Degraded => "degraded",
            Status::Missing => "missing",
        }
    }
}

/// One finding.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Short stable name: `kernel`, `overlayfs`, `fuse`, `io_uring`, `openat2`,
    /// `cgroup`, `store`.
    pub name: &'static str,
    pub status: Status,
    /// What was found, one line.
    pub detail: String,
    /// Why cstore cares, one line.
    pub why: &'static str,
    /// The facts behind `detail`, for machines (field names stable).
    pub facts: Value,
}

/// Everything `cstore check` found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether anything cstore needs is missing.
    pub fn ok(&self) -> bool {
        self.findings.iter().all(|f| f.status != Status::Missing)
    }

    pub fn get(&self, name: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.name == name)
    }
}

/// Runs every check for a store at `root` (which need not exist yet: its
/// nearest existing ancestor stands for it). Needs root for the mount probes;
/// without it they report what failed.
pub fn run(root: &Path) -> Report {
    let probe_dir = nearest_existing(root);
    let findings = vec![
        kernel(),
        overlayfs(&probe_dir),
        fuse(&probe_dir),
        io_uring(),
        openat2(),
        cgroup(),
        store(root, &probe_dir),
    ];
    Report { findings }
}

fn nearest_existing(p: &Path) -> PathBuf {
    let mut p = p.to_path_buf();
    while !p.is_dir() {
        if !p.pop() {
            return PathBuf::from("/");
        }
    }
    p
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether /proc/filesystems lists `fs`.
fn registered(fs: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .is_ok_and(|t| t.lines().any(|l| l.split_whitespace().last() == Some(fs)))
}

/// A scratch directory for mount probes, on the store's filesystem (overlay's
/// upper dir must be on a filesystem that supports it), removed on drop.
fn scratch(on: &Path) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(".cstore-check-")
        .tempdir_in(on)
        .or_else(|_| tempfile::Builder::new().prefix("cstore-check-").tempdir())
}

fn kernel() -> Finding {
    let release = read_trim("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = read_trim("/proc/sys/kernel/version").unwrap_or_default();
    Finding {
        name: "kernel",
        status: Status::Ok,
        detail: format!("Linux {release}"),
        why: "features below are probed, not inferred from this; it is what bug reports need",
        facts: json!({"release": release, "version": version}),
    }
}

/// An overlay of `lower` at `merged`, then unmounted. `Err` is the kernel's answer.
fn try_overlay(dir: &Path, extra: &[&str], idmapped: bool) -> Result<(), String> {
    use cstore_os::mount::{self, Mount};
    let sub = tempfile::Builder::new()
        .prefix("p")
        .tempdir_in(dir)
        .map_err(|e| e.to_string())?;
    let p = |n: &str| {
        let d = sub.path().join(n);
        std::fs::create_dir(&d).map(|_| d)
    };
    let (l1, l2, up, work, merged) =
        (|| Ok::<_, std::io::Error>((p("l1")?, p("l2")?, p("u")?, p("w")?, p("m")?)))()
            .map_err(|e| e.to_string())?;
    let mut options = vec![format!("lowerdir={}:{}", l1.display(), l2.display())];
    if !idmapped {
        options.push(format!("upperdir={}", up.display()));
        options.push(format!("workdir={}", work.display()));
    }
    options.extend(extra.iter().map(|s| s.to_string()));
    let m = Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    };
    let mounted = if idmapped {
        // The mapping `cstore run --userns` uses by default.
        let userns = cstore_runtime::userns::Userns::parse("100000:65536")
            .map_err(|e| e.to_string())?
            .ok_or("no user namespace")?;
        let fd = userns.fd().map_err(|e| e.to_string())?;
        mount::mount_idmapped(&m, &merged, std::os::fd::AsFd::as_fd(&fd))
    } else {
        mount::mount(&m, &merged)
    };
    mounted.map_err(|e| e.to_string())?;
    mount::unmount(&merged).map_err(|e| format!("unmounting the probe: {e}"))
}

fn overlayfs(dir: &Path) -> Finding {
    let was_registered = registered("overlay");
    let scratch = match scratch(dir) {
        Ok(s) => s,
        Err(e) => {
            return Finding {
                name: "overlayfs",
                status: Status::Missing,
                detail: format!("cannot make a scratch directory to probe: {e}"),
                why: OVERLAY_WHY,
                facts: json!({"registered": was_registered, "mount": false, "volatile": false,
                    "idmapped_lowerdirs": false, "error": e.to_string()}),
            }
        }
    };
    let plain = try_overlay(scratch.path(), &["index=off"], false);
    let volatile = plain
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|_| try_overlay(scratch.path(), &["index=off", "volatile"], false));
    let idmapped = plain
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|_| try_overlay(scratch.path(), &["index=off"], true));
    let err = |r: &Result<(), String>| r.as_ref().err().cloned();
    let (status, detail) = match (&plain, &volatile, &idmapped) {
        (Err(e), _, _) => (Status::Missing, format!("an overlay mount failed: {e}")),
        (Ok(()), Ok(()), Ok(())) => (
            Status::Ok,
            "mounts, with volatile and id-mapped lower dirs".to_string(),
        ),
        (Ok(()), v, i) => {
            let mut lost = Vec::new();
            if let Err(e) = v {
                lost.push(format!("no volatile ({e}): --rm containers sync on exit"));
            }
            if let Err(e) = i {
                lost.push(format!(
                    "no id-mapped lower dirs ({e}): cstore run --userns fails"
                ));
            }
            (Status::Degraded, format!("mounts; {}", lost.join("; ")))
        }
    };
    Finding {
        name: "overlayfs",
        status,
        detail,
        why: OVERLAY_WHY,
        facts: json!({
            "registered": was_registered || registered("overlay"),
            "mount": plain.is_ok(), "mount_error": err(&plain),
            "volatile": volatile.is_ok(), "volatile_error": err(&volatile),
            "idmapped_lowerdirs": idmapped.is_ok(), "idmapped_error": err(&idmapped),
            "probed_in": dir,
        }),
    }
}

const OVERLAY_WHY: &str = "images are mounted as overlays of their layers (containerd's and cstore run's); \
volatile spares --rm containers a sync at exit; id-mapped lower dirs give --userns containers files owned by their root";

const FUSE_WHY: &str =
    "lazy layers are served over FUSE; passthrough lets reads of fetched files skip the daemon, \
resend lets a restarted daemon take over a live mount";

fn fuse(dir: &Path) -> Finding {
    let dev = Path::new("/dev/fuse");
    let dev_exists = dev.exists();
    let was_registered = registered("fuse");
    let uring_param = read_trim("/sys/module/fuse/parameters/enable_uring");
    let base = |status: Status, detail: String, extra: Value| {
        let mut facts = json!({
            "dev_fuse": dev_exists,
            "registered": was_registered || registered("fuse"),
            "enable_uring_parameter": uring_param,
        });
        if let (Value::Object(f), Value::Object(x)) = (&mut facts, extra) {
            f.extend(x);
        }
        Finding {
            name: "fuse",
            status,
            detail,
            why: FUSE_WHY,
            facts,
        }
    };
    if !dev_exists {
        return base(
            Status::Degraded,
            "no /dev/fuse (modprobe fuse): no lazy layers".into(),
            json!({"mount": false, "passthrough": false, "resend": false}),
        );
    }
    match probe_fuse(dir) {
        Ok(n) => {
            let detail = format!(
                "protocol 7.{} (kernel offers 7.{}), passthrough {}, resend {}",
                n.minor,
                n.kernel_minor,
                if n.passthrough { "yes" } else { "no" },
                if n.has_resend { "yes" } else { "no" }
            );
            let status = if n.passthrough && n.has_resend {
                Status::Ok
            } else {
                Status::Degraded
            };
            base(
                status,
                detail,
                json!({"mount": true, "kernel_minor": n.kernel_minor, "minor": n.minor,
                    "passthrough": n.passthrough, "resend": n.has_resend}),
            )
        }
        Err(e) => base(
            Status::Degraded,
            format!("a FUSE mount failed: {e}: no lazy layers"),
            json!({"mount": false, "passthrough": false, "resend": false, "error": e}),
        ),
    }
}

/// Mounts an empty read-only tree over FUSE with the options lazy layers use
/// (passthrough asked for), reads what INIT settled, and unmounts.
fn probe_fuse(dir: &Path) -> Result<cstore_fuse_fs::Negotiated, String> {
    use cstore_fuse_fs::{DirFs, Open, Session, SessionOptions, StateDir};
    let scratch = scratch(dir).map_err(|e| e.to_string())?;
    let p = |n: &str| {
        let d = scratch.path().join(n);
        std::fs::create_dir(&d)
            .map(|_| d)
            .map_err(|e| e.to_string())
    };
    let (src, mnt, state) = (p("src")?, p("mnt")?, p("state")?);
    let fs = Arc::new(DirFs::load(&src, Open::Passthrough).map_err(|e| e.to_string())?);
    let state = StateDir::new(state).map_err(|e| e.to_string())?;
    let opts = SessionOptions {
        threads: 1,
        warmup: false,
        ..Default::default()
    };
    let session = Session::start(fs, &mnt, &state, opts).map_err(|e| e.to_string())?;
    let negotiated = session.settings().init;
    let unmounted = cstore_fuse_fs::dev::unmount(&mnt, true);
    let _ = session.wait();
    unmounted.map_err(|e| format!("unmounting the probe: {e}"))?;
    negotiated.ok_or_else(|| "INIT was not answered".to_string())
}

fn io_uring() -> Finding {
    use cstore_blockio::ring::{io_env, Backend, IoEnv, Mode, Ring};
    let disabled = read_trim("/proc/sys/kernel/io_uring_disabled");
    let forced_sync = io_env() == IoEnv::Sync;
    // A real ring, set up as the store's streams set theirs up.
    let backend = Ring::portable(8, Mode::Auto).backend();
    let uring = backend == Backend::IoUring;
    let detail = match (uring, forced_sync, disabled.as_deref()) {
        (true, _, _) => "a ring was set up".to_string(),
        (false, true, _) => "not tried: CSTORE_IO=sync".to_string(),
        (false, false, Some("2")) => {
            "disabled by kernel.io_uring_disabled=2: plain syscalls".to_string()
        }
        (false, false, Some(v)) => {
            format!("the kernel refused a ring (kernel.io_uring_disabled={v}): plain syscalls")
        }
        (false, false, None) => {
            "the kernel refused a ring (no io_uring_disabled sysctl): plain syscalls".to_string()
        }
    };
    Finding {
        name: "io_uring",
        status: if uring { Status::Ok } else { Status::Degraded },
        detail,
        why: "blob writes and reads (and small-file unpack batches) go through io_uring rings; \
without it the same paths use plain syscalls",
        facts: json!({
            "io_uring_disabled": disabled.and_then(|v| v.parse::<u32>().ok()),
            "backend": backend,
            "cstore_io_sync": forced_sync,
        }),
    }
}

fn openat2() -> Finding {
    use cstore_os::sys::{self, RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS};
    // What unpack does: resolve a path beneath a directory fd, no symlinks.
    let result = (|| {
        let root = sys::open_dir(Path::new("/"))?;
        sys::openat2(
            root.as_raw_fd(),
            c".",
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
        )
        .map(drop)
    })();
    Finding {
        name: "openat2",
        status: if result.is_ok() {
            Status::Ok
        } else {
            Status::Missing
        },
        detail: match &result {
            Ok(()) => "RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS works".to_string(),
            Err(e) => format!("openat2 failed: {e} (Linux 5.6+ needed)"),
        },
        why: "every path inside a layer or rootfs is resolved by the kernel beneath its root, \
following no symlink: hostile layers cannot reach the host",
        facts: json!({"available": result.is_ok(), "error": result.err().map(|e| e.to_string())}),
    }
}

fn cgroup() -> Finding {
    let (mut v1, mut v2) = (Vec::new(), None::<PathBuf>);
    for m in cstore_os::mountinfo::read().unwrap_or_default() {
        match m.fs_type.as_str() {
            "cgroup" => {
                let ctrls: Vec<&str> = m
                    .super_options
                    .split(',')
                    .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                    .collect();
                v1.push(json!({"mount": m.mount_point, "controllers": ctrls}));
            }
            "cgroup2" => v2 = Some(m.mount_point),
            _ => {}
        }
    }
    let mode = match (v1.is_empty(), &v2) {
        (true, Some(_)) => "v2",
        (false, Some(_)) => "hybrid",
        (false, None) => "v1",
        (true, None) => "none",
    };
    let io = cstore_runtime::Hierarchy::detect();
    let (status, io_desc, io_fact) = match &io {
        Ok(cstore_runtime::Hierarchy::V1Blkio(p)) => (
            Status::Ok,
            format!("io controller: v1 blkio at {}", p.display()),
            json!({"version": 1, "path": p}),
        ),
        Ok(cstore_runtime::Hierarchy::V2(p)) => (
            Status::Ok,
            format!("io controller: v2 io at {}", p.display()),
            json!({"version": 2, "path": p}),
        ),
        Err(e) => (
            Status::Degraded,
            format!("no io controller ({e}): cstore run's --device-* limits are refused"),
            Value::Null,
        ),
    };
    Finding {
        name: "cgroup",
        status,
        detail: format!("{mode}; {io_desc}"),
        why: "cstore run puts containers in cgroups and throttles their disk I/O through the io (v2) or blkio (v1) controller",
        facts: json!({"mode": mode, "v1": v1, "v2": v2, "io_controller": io_fact}),
    }
}

fn store(root: &Path, probe_dir: &Path) -> Finding {
    use cstore_blockio::{probe, Policy};
    let why = "the store's device and filesystem decide the I/O policy: rings, depth, I/O size, O_DIRECT, small-file batches";
    match probe(probe_dir) {
        Ok(info) => {
            let policy = Policy::for_device_here(&info);
            let fs = info
                .filesystem
                .as_ref()
                .map(|f| f.kind.clone())
                .or_else(|| info.fs_type.clone());
            let journal = info.filesystem.as_ref().and_then(|f| f.journal);
            let detail = format!(
                "{} on {} ({}): {} rings x depth {}, direct {}",
                fs.as_deref().unwrap_or("unknown filesystem"),
                info.device.as_deref().unwrap_or("no block device"),
                info.kind.name(),
                policy.rings,
                policy.queue_depth,
                policy.direct
            );
            Finding {
                name: "store",
                status: Status::Ok,
                detail,
                why,
                facts: json!({
                    "root": root, "exists": root.is_dir(), "probed": probe_dir,
                    "filesystem": fs, "journal": journal,
                    "device": info.device, "dev": info.dev, "class": info.kind.name(),
                    "rotational": info.queue.as_ref().map(|q| q.rotational),
                    "policy": policy,
                }),
            }
        }
        Err(e) => Finding {
            name: "store",
            status: Status::Degraded,
            detail: format!(
                "cannot probe {}: {e}; default I/O settings",
                probe_dir.display()
            ),
            why,
            facts: json!({"root": root, "exists": root.is_dir(), "probed": probe_dir, "error": e.to_string()}),
        },
    }
}
