//! `cstore run`: a container from an image's snapshots, launched with the
//! runtime crate (youki's libcontainer), with disk I/O limits on the block
//! device under the store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cstore_registry::parse_digest;
use cstore_runtime::cgroup::parse_rate;
use cstore_runtime::userns::Userns;
use cstore_runtime::{Hierarchy, IoLimits, Record, RunSpec};
use cstore_snapshotter::{image, mount, Kind, Snapshotter};
use cstore_store::Store;

use crate::{containers, snap};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Remove the container's snapshot when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Start before the image is local: pull it lazily if needed; its lazy
    /// layers are served by the store's lazy daemon (docs/lazy.md).
    #[arg(long)]
    pub lazy: bool,
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

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ImageConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
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

/// Open the store and its snapshot tree, in parallel: each open reads redb's
/// allocator state and syncs the file, and `run` is latency-bound.
pub fn open_and_run(root: &Path, a: RunArgs) -> Result<i32> {
    let (store, sn) = std::thread::scope(|s| {
        let sn = s.spawn(|| Snapshotter::open(root).context("opening the snapshot tree"));
        let store = crate::open_store(root);
        (store, sn.join())
    });
    let sn = sn.unwrap_or_else(|p| std::panic::resume_unwind(p))?;
    let store = store?;
    let code = run(&store, &sn, a);
    // Closing a database writes it durably; the two close side by side.
    std::thread::scope(|s| {
        s.spawn(move || drop(store));
        drop(sn);
    });
    code
}

pub fn run(store: &Store, sn: &Snapshotter, a: RunArgs) -> Result<i32> {
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
    let start_timeout = start_timeout()?;
    if a.lazy {
        let args = crate::RegistryArgs {
            platform: None,
            plain_http: false,
            creds: None,
        };
        crate::lazy::ensure_served(store, store.root(), &a.reference, &args)?;
    }
    let img = store.image(&a.reference)?;
    let config: ImageConfig = {
        let bytes = store.read_config(&parse_digest(&img.config.digest)?)?;
        #[derive(serde::Deserialize)]
        struct Wrapper {
            config: Option<ImageConfig>,
        }
        serde_json::from_slice::<Wrapper>(&bytes)
            .with_context(|| format!("config of {}", img.name))?
            .config
            .unwrap_or_default()
    };
    // As docker: --entrypoint replaces the image's ("" removes it) and
    // drops the image's cmd with it; a command replaces the cmd.
    let mut args: Vec<String> = match &a.entrypoint {
        Some(e) if e.is_empty() => vec![],
        Some(e) => vec![e.clone()],
        None => config.entrypoint.clone().unwrap_or_default(),
    };
    if !a.command.is_empty() {
        args.extend(a.command.iter().cloned());
    } else if a.entrypoint.is_none() {
        args.extend(config.cmd.clone().unwrap_or_default());
    }
    if args.is_empty() {
        bail!(
            "{}: no command given and the image has no entrypoint or cmd",
            img.name
        );
    }
    // The image config is hostile input: every entry that reaches the
    // container's init is checked here, naming where it came from (see
    // cstore_runtime::validate), before anything is made.
    cstore_runtime::validate::args(&args).map_err(|e| {
        let from = if a.command.is_empty() && a.entrypoint.is_none() {
            "its Entrypoint and Cmd"
        } else {
            "the command given"
        };
        anyhow::anyhow!("image {}: {e} (from {from})", img.name)
    })?;

    // I/O limits: all on one device.
    let mut io: Option<((u32, u32), IoLimits)> = None;
    for (flag, v) in [
        ("--device-read-bps", &a.device_read_bps),
        ("--device-write-bps", &a.device_write_bps),
        ("--device-read-iops", &a.device_read_iops),
        ("--device-write-iops", &a.device_write_iops),
    ] {
        let Some(v) = v else { continue };
        let (dev, rate) = device_rate(flag, v, store.root())?;
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
        // libcontainer writes the limits, finding the hierarchy itself; one
        // without the io controller at all is refused here, by name.
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

    // Resolved once the rootfs is mounted: names come from its /etc/passwd.
    // An empty -u is no -u (the image's user), as docker.
    let user = a
        .user
        .clone()
        .filter(|u| !u.is_empty())
        .or(config.user.clone())
        .unwrap_or_default();
    // As docker: absolute, and made in the rootfs if missing; -w "" is no -w.
    let cwd = a
        .workdir
        .clone()
        .filter(|w| !w.is_empty())
        .or(config.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    cstore_runtime::validate::cwd(&cwd).map_err(|e| match &a.workdir {
        Some(w) if !w.is_empty() => anyhow::anyhow!("-w: {e}"),
        _ => anyhow::anyhow!("image {}: {e} (its WorkingDir)", img.name),
    })?;
    let cwd = cstore_runtime::rootfs::clean_absolute(&cwd);
    let mut env = config.env.clone().unwrap_or_else(|| {
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()]
    });
    for e in &env {
        cstore_runtime::validate::env_entry(e)
            .map_err(|e| anyhow::anyhow!("image {}: {e} (its Env)", img.name))?;
    }
    for e in &a.env {
        cstore_runtime::validate::env_entry(e).map_err(|e| anyhow::anyhow!("-e: {e}"))?;
        let key = e.split('=').next().unwrap_or("");
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    if let Some(h) = &a.hostname {
        cstore_runtime::validate::hostname(h).map_err(|e| anyhow::anyhow!("--hostname: {e}"))?;
    }

    let id = a
        .name
        .clone()
        .unwrap_or_else(|| format!("{:012x}", rand_id()));
    if !containers::valid_name(&id) {
        bail!("--name {id:?}: letters, digits, - and _ only");
    }
    let layers = image::layers_of(store, &img)?;
    let top = layers.last().context("image has no layers")?;
    if !sn
        .stat(&top.chain_id)
        .is_ok_and(|i| i.kind == Kind::Committed)
    {
        snap::unpack(store, &a.reference, false)?;
    }
    let dir: PathBuf = containers::dir(store, &id);
    let rootfs = dir.join("rootfs");
    containers::create_dir(store, &id)?;
    let key = containers::snapshot_key(&id);
    let labels = BTreeMap::from([
        ("cstore.io/container".to_string(), id.clone()),
        ("cstore.io/image".to_string(), img.name.clone()),
        (
            "cstore.io/mountpoint".to_string(),
            rootfs.display().to_string(),
        ),
    ]);
    let mut mounts = sn
        .prepare(&key, Some(&top.chain_id), labels)
        .map_err(|e| match e {
            cstore_snapshotter::Error::AlreadyExists(_) => {
                anyhow::anyhow!("a container named {id:?} exists (remove it with `cstore rm {id}`)")
            }
            e => e.into(),
        })?;
    // Lazy layers are their daemon's FUSE mounts (refused if none serves them).
    let chains: Vec<String> = layers.iter().map(|l| l.chain_id.clone()).collect();
    if let Err(e) = cstore_lazy::serve::use_lazy_mounts(store, sn, &chains, &mut mounts) {
        let _ = sn.remove(&key);
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e.into());
    }
    if a.rm {
        // The upper dir of a --rm container is thrown away at exit. Without
        // `volatile`, unmounting the overlay syncs the whole filesystem under
        // the store (overlayfs' sync_fs), which costs what every other
        // writer on it has left dirty.
        for m in mounts.iter_mut().filter(|m| m.kind == "overlay") {
            m.options.push("volatile".into());
        }
    }
    let cleanup = |remove: bool| {
        let _ = mount::unmount(&rootfs);
        if remove {
            let _ = sn.remove(&key);
            let _ = std::fs::remove_dir_all(&dir);
        }
    };
    // The name is ours now (prepare refuses a second one): record the container.
    let mut record = Record::new(&id, &img.name, &args);
    record.auto_remove = a.rm;
    let mounted = record
        .save(&dir)
        .map_err(anyhow::Error::from)
        .and_then(|()| match &userns {
            None => mount::mount_all(&mounts, &rootfs).map_err(Into::into),
            Some(u) => mount_userns(store.root(), &dir, &mounts, &rootfs, u),
        });
    if let Err(e) = mounted {
        cleanup(true);
        return Err(e);
    }
    // The container's root owns what is made for it.
    let root_ids = userns.as_ref().map_or((0, 0), |u| (u.uid.host, u.gid.host));
    let user = cstore_runtime::user::resolve(&rootfs, &user)
        .and_then(|u| match &userns {
            Some(ns) => ns.check_user(&user, &u).map(|()| u),
            None => Ok(u),
        })
        .map_err(anyhow::Error::from)
        .and_then(|u| {
            cstore_runtime::rootfs::create_dir_all(&rootfs, &cwd, root_ids)
                .map_err(|e| anyhow::anyhow!("working directory {e}"))?;
            Ok(u)
        });
    let user = match user {
        Ok(u) => u,
        Err(e) => {
            cleanup(true);
            return Err(e.context(format!("image {}", img.name)));
        }
    };
    // As docker (runc sets it in the container): HOME from passwd unless given.
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    let spec = RunSpec {
        id: id.clone(),
        rootfs: rootfs.clone(),
        bundle: dir.join("bundle"),
        state_root: containers::state_root(store),
        args,
        env,
        cwd,
        uid: user.uid,
        gid: user.gid,
        additional_gids: user.additional_gids,
        hostname: a
            .hostname
            .clone()
            .unwrap_or_else(|| id.chars().take(12).collect()),
        net_host: a.net == "host",
        readonly: a.read_only,
        cgroup: containers::cgroup_path(&id),
        io: io.map(|((maj, min), l)| (maj, min, l)),
        memory,
        pids: a.pids_limit,
        tty: a.tty,
        interactive: a.interactive,
        userns,
        start_timeout,
    };
    // Both databases stay as they are until the container runs: a reaper
    // closing one (allocating, syncing) while libcontainer clones this
    // process could leave the child a lock it never gets back. (Not called
    // when the start fails: the holds then go when run_with returns.)
    let holds = (store.meta().hold(), sn.hold());
    let result = cstore_runtime::run_with(&spec, |pid| {
        drop(holds);
        record.set_started(pid);
        if let Err(e) = record.save(&dir) {
            tracing::warn!(error = %e, "recording the container's pid");
        }
    });
    // What a failed create left, and the cgroup parent when no other container uses it.
    if let Err(e) = cstore_runtime::teardown::remove(&id, &spec.state_root, &spec.cgroup) {
        tracing::warn!(error = %e, "removing the container's runtime state");
    }
    if !a.rm {
        record.set_finished(&result);
        if let Err(e) = record.save(&dir) {
            tracing::warn!(error = %e, "recording the container's exit");
        }
    }
    cleanup(a.rm);
    // A container that did not start says which image it was.
    result.map_err(|e| match e {
        cstore_runtime::Error::Input(_)
        | cstore_runtime::Error::NotStarted { .. }
        | cstore_runtime::Error::StartTimeout { .. } => {
            anyhow::Error::from(e).context(format!("image {}", img.name))
        }
        e => e.into(),
    })
}

/// The rootfs for a container in user namespace `u`: the image's layers
/// id-mapped, the upper dir owned by the container's root (as containerd's
/// overlay snapshotter does with uid/gid mappings), and the path to it
/// searchable by that unprivileged host user.
fn mount_userns(
    root: &Path,
    dir: &Path,
    mounts: &[mount::Mount],
    rootfs: &Path,
    u: &Userns,
) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let owner = (u.uid.host, u.gid.host);
    // The container's root walks ROOT/containers/NAME/rootfs as an
    // unprivileged host user: ROOT and containers/ are searchable by all
    // (0711, as containerd's root), the container's own directory by its
    // group only: 0710, group the mapped root's gid. Other users reach no
    // rootfs, and the layers below snapshots/ (0700) reach overlayfs
    // through the mount cstore makes as root.
    for d in [root, &root.join("containers")] {
        let mut p = std::fs::metadata(d)?.permissions();
        if p.mode() & 0o001 == 0 {
            p.set_mode(p.mode() | 0o001);
            std::fs::set_permissions(d, p).with_context(|| format!("chmod o+x {}", d.display()))?;
        }
    }
    std::os::unix::fs::lchown(dir, None, Some(owner.1))
        .with_context(|| format!("chgrp {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))
        .with_context(|| format!("chmod {}", dir.display()))?;
    for d in root.ancestors().skip(1) {
        if !cstore_runtime::userns::searchable_by(d, owner)? {
            bail!(
                "--userns: the container's root (host uid {}) cannot reach its rootfs: {} is not searchable by it (chmod o+x, or use another --root)",
                owner.0,
                d.display()
            );
        }
    }
    for m in mounts {
        if let Some(upper) = m.options.iter().find_map(|o| o.strip_prefix("upperdir=")) {
            // The upper dir's root, through its own fd (never a symlink).
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(upper)
                .with_context(|| format!("opening {upper}"))?;
            std::os::unix::fs::fchown(&f, Some(owner.0), Some(owner.1))
                .with_context(|| format!("chown {upper}"))?;
        }
    }
    let ns = u.fd()?;
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = mount::mount_idmapped(m, rootfs, std::os::fd::AsFd::as_fd(&ns)) {
            for _ in 0..i {
                let _ = mount::unmount(rootfs);
            }
            return Err(e.into());
        }
    }
    Ok(())
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

fn rand_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom fills the buffer.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    u64::from_le_bytes(b) & 0xffff_ffff_ffff
}
