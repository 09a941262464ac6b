//! `cstore run`: a container from an image's snapshots, launched with the
//! runtime crate (youki's libcontainer), with disk I/O limits on the block
//! device under the store.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use cstore_os::db::Hold;
use cstore_registry::parse_digest;
use cstore_runtime::cgroup::parse_rate;
use cstore_runtime::containers::{BoxError, SnapshotInfo, Snapshots};
use cstore_runtime::userns::Userns;
use cstore_runtime::{
    Containers, Hierarchy, ImageConfig, IoLimits, Overrides, Process, RunRequest,
};
use cstore_snapshotter::{image, Kind, Mount, Snapshotter};
use cstore_store::meta::ImageRecord;
use cstore_store::Store;

use crate::containers::SnapshotTree;
use crate::snap;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Remove the container's snapshot when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Start before the image is local: pull it lazily if needed; its lazy
    /// layers are served by the store's lazy daemon (docs/lazy.md).
    #[arg(long)]
    pub lazy: bool,
    /// How to reach the registry with --lazy (the same settings as
    /// `pull --lazy`; the lazy daemon is handed them too).
    #[command(flatten)]
    pub(crate) registry: crate::RegistryArgs,
    #[arg(long)]
    pub name: Option<String>,
    /// Environment KEY=VALUE (repeatable).
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// Run this instead of the image's entrypoint ("" for none; the image's
    /// cmd is then not used either).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// USER[:GROUP], each a name (from the image's /etc/passwd and
    /// /etc/group) or a number.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    #[arg(long)]
    pub hostname: Option<String>,
    /// none (a new, empty network namespace) or host.
    #[arg(long, default_value = "none")]
    pub net: String,
    /// Mount the root filesystem read-only.
    #[arg(long)]
    pub read_only: bool,
    /// RATE (on the store's device) or MAJ:MIN:RATE, e.g. 1mb.
    #[arg(long)]
    pub device_read_bps: Option<String>,
    #[arg(long)]
    pub device_write_bps: Option<String>,
    #[arg(long)]
    pub device_read_iops: Option<String>,
    #[arg(long)]
    pub device_write_iops: Option<String>,
    /// Memory limit in bytes (k, m, g suffixes).
    #[arg(long)]
    pub memory: Option<String>,
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Allocate a pseudo-terminal for the process.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Keep stdin attached (without it the process reads /dev/null).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// A user namespace: --userns (or =auto: root's /etc/subuid and
    /// /etc/subgid ranges, else 100000:65536), =BASE:COUNT, or =host (none).
    #[arg(long, value_name = "MODE", require_equals = true, num_args = 0..=1, default_missing_value = "auto")]
    pub userns: Option<String>,
    pub reference: String,
    /// Command and arguments (default: the image's entrypoint and cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// MAJ:MIN of the disk under `path` (a partition's disk: throttles apply to disks).
fn store_device(path: &Path) -> Result<(u32, u32)> {
    let info = cstore_blockio::probe::probe_opts(path, false)?;
    let mut name = info.chain.first().cloned().with_context(|| {
        format!(
            "{} is not on a block device ({}): give --device-*-bps MAJ:MIN:RATE",
            path.display(),
            info.fs_type.as_deref().unwrap_or("virtual filesystem")
        )
    })?;
    if Path::new(&format!("/sys/class/block/{name}/partition")).exists() {
        name = info.chain.get(1).cloned().unwrap_or(name);
    }
    let dev = std::fs::read_to_string(format!("/sys/class/block/{name}/dev"))?;
    parse_majmin(dev.trim()).with_context(|| format!("device number of {name}"))
}

fn parse_majmin(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// "RATE" (on the store's device) or "MAJ:MIN:RATE".
fn device_rate(flag: &str, v: &str, store_root: &Path) -> Result<((u32, u32), u64)> {
    let parts: Vec<&str> = v.split(':').collect();
    let (dev, rate) = match parts.as_slice() {
        [rate] => (store_device(store_root)?, *rate),
        [maj, min, rate] => {
            let dev = parse_majmin(&format!("{maj}:{min}"))
                .with_context(|| format!("{flag} {v:?}: bad MAJ:MIN"))?;
            if !Path::new(&format!("/sys/dev/block/{maj}:{min}")).exists() {
                bail!("{flag} {v:?}: {maj}:{min} is not a block device");
            }
            (dev, *rate)
        }
        _ => bail!("{flag} {v:?}: expected RATE or MAJ:MIN:RATE"),
    };
    Ok((
        dev,
        parse_rate(rate).with_context(|| format!("{flag} {v:?}"))?,
    ))
}

/// Open the store and run (`run` opens the snapshot tree once it is done
/// with the store's database).
pub fn open_and_run(root: &Path, a: RunArgs) -> Result<i32> {
    let store = crate::open_store(root)?;
    run(&store, a)
}

/// The snapshot tree for one run. The early hold on its database (taken at
/// its open) goes once the container's snapshot is prepared, and the
/// database closes in the background then (`close_soon`): the other
/// `cstore run`s started with this one wait for it.
struct RunTree<'a> {
    tree: SnapshotTree<'a>,
    early: Mutex<Option<Hold<'a>>>,
}

impl Snapshots for RunTree<'_> {
    fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Option<Vec<Mount>>, BoxError> {
        let out = self.tree.prepare(key, parent, labels);
        drop(self.early.lock().unwrap_or_else(|p| p.into_inner()).take());
        self.tree.0.close_soon();
        out
    }

    fn remove(&self, key: &str) -> Result<bool, BoxError> {
        self.tree.remove(key)
    }

    fn exists(&self, key: &str) -> Result<bool, BoxError> {
        self.tree.exists(key)
    }

    fn list(&self) -> Result<Vec<SnapshotInfo>, BoxError> {
        self.tree.list()
    }
}

/// resolve → prepare → launch → teardown: the flags and the image here, the
/// container's life (prepare, launch, teardown) in cstore-runtime.
///
/// Each database is held (`DbFile::hold`) from its first use through its
/// last before the launch, one after the other: the store's through the
/// image's record, then the snapshot tree's (opened only then) through the
/// container's prepare. On a slow disk the reads in between had outlasted
/// the linger, and each close and reopen cost three syncs more; and the
/// image's config is read holding neither, so the runs started with this
/// one use them meanwhile. Let go, each closes in the background at once
/// (`close_soon`). One at a time, so no deadlock between runs (when a run
/// held the store's database while it waited for the snapshot tree's, runs
/// started at once each held one and waited two minutes for the other).
/// Never held across an unpack (it opens the snapshot tree itself, and
/// other processes would wait all along) nor across a wait for a lazy
/// daemon.
pub fn run(store: &Store, a: RunArgs) -> Result<i32> {
    let mut meta_hold = (!a.lazy).then(|| store.meta().hold());
    let flags = Flags::parse(&a, store.root())?;
    if a.lazy {
        // Lazy layers need their daemon before the image is mounted.
        crate::lazy::ensure_served(store, store.root(), &a.reference, &a.registry)?;
        meta_hold = Some(store.meta().hold());
    }
    let img = store.image(&a.reference)?;
    // Its last use before the launch.
    drop(meta_hold);
    store.meta().close_soon();
    let found = image_process(store, &a, img)?;
    let sn = snap::open(store)?;
    let early = sn.hold();
    // The run's two write transactions (the prepare, the removal) are each
    // followed by a close: see DbFile::commits_before_close.
    sn.commits_before_close(true);
    let early = ensure_unpacked(store, &sn, &a, &found.top, early)?;
    let req = RunRequest {
        id: found.id,
        image: found.name,
        parent: found.top,
        process: found.process,
        auto_remove: a.rm,
        net_host: flags.net_host,
        readonly: a.read_only,
        io: flags.io,
        memory: flags.memory,
        pids: a.pids_limit,
        tty: a.tty,
        interactive: a.interactive,
        userns: flags.userns,
        start_timeout: flags.start_timeout,
    };
    // Both databases are closed for the launch, side by side (a close
    // writes durably), so the `cstore run`s started with this one can open
    // them while ours starts; the scoped thread has ended before the clone.
    let sn_ref = &sn;
    let hold = move || {
        std::thread::scope(|s| {
            let sn_hold = s.spawn(|| sn_ref.hold_closed());
            let meta_hold = store.meta().hold_closed();
            let sn_hold = sn_hold
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (meta_hold, sn_hold)
        })
    };
    let tree = RunTree {
        tree: SnapshotTree(&sn, store),
        early: Mutex::new(early),
    };
    Ok(Containers::new(store.root()).run(&tree, req, hold)?)
}

/// What the flags say that needs no image.
struct Flags {
    net_host: bool,
    userns: Option<Userns>,
    start_timeout: std::time::Duration,
    /// All on one device.
    io: Option<(u32, u32, IoLimits)>,
    memory: Option<i64>,
}

impl Flags {
    fn parse(a: &RunArgs, store_root: &Path) -> Result<Flags> {
        if a.net != "none" && a.net != "host" {
            bail!("--net {:?}: none or host", a.net);
        }
        let userns = a
            .userns
            .as_deref()
            .map(Userns::parse)
            .transpose()?
            .flatten();
        if userns.is_some() && a.net == "host" {
            bail!("--userns needs a network namespace of its own: not with --net host (as docker)");
        }
        let mut io: Option<((u32, u32), IoLimits)> = None;
        for (flag, v) in [
            ("--device-read-bps", &a.device_read_bps),
            ("--device-write-bps", &a.device_write_bps),
            ("--device-read-iops", &a.device_read_iops),
            ("--device-write-iops", &a.device_write_iops),
        ] {
            let Some(v) = v else { continue };
            let (dev, rate) = device_rate(flag, v, store_root)?;
            let entry = io.get_or_insert((dev, IoLimits::default()));
            if entry.0 != dev {
                bail!(
                    "I/O limits on two devices ({}:{} and {}:{}) are not supported",
                    entry.0 .0,
                    entry.0 .1,
                    dev.0,
                    dev.1
                );
            }
            match flag {
                "--device-read-bps" => entry.1.read_bps = Some(rate),
                "--device-write-bps" => entry.1.write_bps = Some(rate),
                "--device-read-iops" => entry.1.read_iops = Some(rate),
                _ => entry.1.write_iops = Some(rate),
            }
        }
        if let Some(((major, minor), _)) = &io {
            // libcontainer writes the limits, finding the hierarchy itself;
            // one without the io controller at all is refused here, by name.
            let hierarchy = Hierarchy::detect().context("I/O limits (--device-*)")?;
            tracing::info!(
                device = %format!("{major}:{minor}"),
                ?hierarchy,
                "I/O limits through the cgroup io controller"
            );
        }
        let memory = a
            .memory
            .as_deref()
            .map(parse_rate)
            .transpose()
            .context("--memory")?
            .map(|m| m as i64);
        Ok(Flags {
            net_host: a.net == "host",
            userns,
            start_timeout: start_timeout()?,
            io: io.map(|((maj, min), l)| (maj, min, l)),
            memory,
        })
    }
}

/// The image resolved for a run: its process (docker's merge of its config
/// and the flags), the container's name, and its top layer's chain id.
struct Resolved {
    name: String,
    id: String,
    process: Process,
    top: String,
}

/// What the image's config and the flags make of the run (no database).
fn image_process(store: &Store, a: &RunArgs, img: ImageRecord) -> Result<Resolved> {
    // Read once, under the store's limit on configs: the snapshotter takes
    // the layers from it, the runtime the process.
    let bytes = store.read_config(&parse_digest(&img.config.digest)?)?;
    let config = ImageConfig::parse(&bytes, &img.name)?;
    let overrides = Overrides {
        entrypoint: a.entrypoint.clone(),
        command: a.command.clone(),
        env: a.env.clone(),
        workdir: a.workdir.clone(),
        user: a.user.clone(),
        hostname: a.hostname.clone(),
    };
    let process = Process::merge(&img.name, &config, &overrides)?;
    let id = cstore_runtime::containers::name_or_random(a.name.as_deref())?;
    let layers = image::layers_from_config(&img, &bytes)?;
    let top = layers
        .last()
        .context("image has no layers")?
        .chain_id
        .clone();
    Ok(Resolved {
        name: img.name,
        id,
        process,
        top,
    })
}

/// The top layer's committed snapshot, unpacked first if there is none;
/// the early hold, unless the unpack took it (it opens the snapshot tree
/// itself and commits for minutes).
fn ensure_unpacked<'a>(
    store: &Store,
    sn: &Snapshotter,
    a: &RunArgs,
    top: &str,
    early: Hold<'a>,
) -> Result<Option<Hold<'a>>> {
    if sn.stat(top).is_ok_and(|i| i.kind == Kind::Committed) {
        return Ok(Some(early));
    }
    drop(early);
    sn.close_soon();
    snap::unpack(store, &a.reference, false)?;
    Ok(None)
}

/// `$CSTORE_START_TIMEOUT` (seconds), else the runtime's default.
fn start_timeout() -> Result<std::time::Duration> {
    match std::env::var("CSTORE_START_TIMEOUT") {
        Err(_) => Ok(cstore_runtime::START_TIMEOUT),
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86400.0)
            .map(std::time::Duration::from_secs_f64)
            .with_context(|| {
                format!("CSTORE_START_TIMEOUT={v:?}: expected seconds (more than 0, at most 86400)")
            }),
    }
}
