//! The containers `cstore run` keeps, and their life: named, labelled,
//! recorded, prepared from an image's snapshots, launched, torn down and
//! removed.
//!
//! A container is its active snapshot `cstore-run:ID` (the snapshot database
//! decides which names are taken) and its directory `ROOT/containers/ID`
//! (record, rootfs mount point, bundle). Outside the store a run leaves
//! libcontainer's state under `ROOT/run-state/ID` and cgroups `/cstore/ID`,
//! which libcontainer removes when the run ends normally and `remove`
//! removes when it did not.
//!
//! The snapshots come through [`Snapshots`], which cstore-snapshotter's
//! tree provides (this crate links no database).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cstore_os::mount::{self, Mount};
use cstore_os::{Classify, ErrorKind};

use crate::policy::Process;
use crate::record::{Record, State};
use crate::userns::Userns;
use crate::{teardown, Error, IoLimits, RunSpec};

/// Active snapshots of containers are named `cstore-run:ID`.
pub const KEY_PREFIX: &str = "cstore-run:";
/// The label on a container's snapshot naming its image.
pub const LABEL_IMAGE: &str = "cstore.io/image";
/// The label naming the container.
pub const LABEL_CONTAINER: &str = "cstore.io/container";
/// The label naming where the container's rootfs is mounted.
pub const LABEL_MOUNTPOINT: &str = "cstore.io/mountpoint";

/// A snapshot error this crate cannot name the type of (the snapshotter's),
/// with its errdefs kind kept so a caller can still act on it.
#[derive(Debug)]
pub struct BoxError {
    pub kind: ErrorKind,
    pub message: String,
}

impl<E: Classify + std::fmt::Display> From<E> for BoxError {
    fn from(e: E) -> Self {
        BoxError {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// A snapshot as listed.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Unix seconds.
    pub created: u64,
}

/// What a container needs of the snapshot tree (containerd's snapshotter
/// model: an active snapshot on a committed parent, its mounts).
pub trait Snapshots {
    /// An active snapshot `key` on committed `parent`, and its mounts;
    /// `None` when `key` exists already.
    fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Option<Vec<Mount>>, BoxError>;
    /// Remove `key`; false when there is none.
    fn remove(&self, key: &str) -> Result<bool, BoxError>;
    fn exists(&self, key: &str) -> Result<bool, BoxError>;
    fn list(&self) -> Result<Vec<SnapshotInfo>, BoxError>;
}

/// The snapshot key of container `id`.
pub fn snapshot_key(id: &str) -> String {
    format!("{KEY_PREFIX}{id}")
}

/// The container's cgroup, under each hierarchy.
pub fn cgroup_path(id: &str) -> String {
    format!("/cstore/{id}")
}

/// Names are path components and cgroup names: nothing else is allowed.
pub fn valid_name(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The name given (checked), else a random one of 12 hex digits (docker's
/// short id).
pub fn name_or_random(name: Option<&str>) -> Result<String, Error> {
    let id = match name {
        Some(n) => n.to_string(),
        None => {
            let mut b = [0u8; 8];
            // SAFETY: getrandom fills the buffer it is given.
            unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
            format!("{:012x}", u64::from_le_bytes(b) & 0xffff_ffff_ffff)
        }
    };
    if !valid_name(&id) {
        return Err(Error::Input(format!(
            "--name {id:?}: letters, digits, - and _ only"
        )));
    }
    Ok(id)
}

/// A container as `ps` lists it.
#[derive(Clone, Debug)]
pub struct Container {
    pub id: String,
    /// None for a container whose run died before writing one.
    pub record: Option<Record>,
    pub image: String,
    /// Unix seconds.
    pub created: u64,
}

impl Container {
    pub fn state(&self) -> State {
        self.record.as_ref().map_or(
            State::Exited {
                code: None,
                finished: None,
            },
            Record::state,
        )
    }
}

/// How a container is run: its process (docker's merge, see `policy`) and
/// what `docker run`'s other flags say.
#[derive(Debug)]
pub struct RunRequest {
    pub id: String,
    /// The image's name (recorded, labelled, named in errors).
    pub image: String,
    /// The committed snapshot of the image's top layer (its chain id).
    pub parent: String,
    pub process: Process,
    /// Removed when it exits (`--rm`).
    pub auto_remove: bool,
    pub net_host: bool,
    pub readonly: bool,
    /// Limits on one device (major, minor).
    pub io: Option<(u32, u32, IoLimits)>,
    pub memory: Option<i64>,
    pub pids: Option<i64>,
    pub tty: bool,
    pub interactive: bool,
    pub userns: Option<Userns>,
    pub start_timeout: Duration,
}

/// The containers under a store's root.
#[derive(Clone, Debug)]
pub struct Containers {
    root: PathBuf,
}

impl Containers {
    /// The containers of the store at `root`.
    pub fn new(root: &Path) -> Containers {
        Containers {
            root: root.to_path_buf(),
        }
    }

    /// Container `id`'s directory.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join("containers").join(id)
    }

    /// libcontainer's state directory (one subdirectory per container).
    pub fn state_root(&self) -> PathBuf {
        self.root.join("run-state")
    }

    /// Make the container's directory (0700: its rootfs is mounted in it,
    /// see cstore_os::layout) and its rootfs mount point.
    fn create_dir(&self, id: &str) -> Result<(), Error> {
        use cstore_os::layout;
        let dir = self.dir(id);
        layout::create_dir(&self.root.join("containers"), layout::CONTAINERS_MODE)
            .and_then(|()| layout::create_dir(&dir, layout::PRIVATE_DIR_MODE))
            .and_then(|()| layout::create_dir(&dir.join("rootfs"), 0o755))
            .map_err(|e| cstore_os::IoError::new("create", &dir, e).into())
    }

    fn load_record(&self, id: &str) -> Option<Record> {
        Record::load(&self.dir(id)).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "unreadable container record");
            None
        })
    }

    /// Every container, newest first: those with a snapshot, and
    /// directories left without one.
    pub fn list(&self, snaps: &dyn Snapshots) -> Result<Vec<Container>, Error> {
        let mut found = BTreeMap::new();
        for info in snaps.list().map_err(|e| snapshot_err("(all)", e))? {
            if let Some(id) = info.name.strip_prefix(KEY_PREFIX) {
                found.insert(
                    id.to_string(),
                    (
                        info.labels.get(LABEL_IMAGE).cloned().unwrap_or_default(),
                        info.created,
                    ),
                );
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.root.join("containers")) {
            for e in rd.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if valid_name(&id) {
                    found.entry(id).or_default();
                }
            }
        }
        let mut all: Vec<Container> = found
            .into_iter()
            .map(|(id, (image, created))| {
                let record = self.load_record(&id);
                Container {
                    image: record.as_ref().map_or(image, |r| r.image.clone()),
                    created: record.as_ref().map_or(created, |r| r.created),
                    record,
                    id,
                }
            })
            .collect();
        all.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
        Ok(all)
    }

    /// Remove container `name`: refused while it runs unless `force` (then
    /// killed first); waits for its `cstore run` to finish; unmounts, removes
    /// libcontainer's state and cgroups, the snapshot and the directory.
    pub fn remove(&self, snaps: &dyn Snapshots, name: &str, force: bool) -> Result<(), Error> {
        let no_such = || Error::Input(format!("no such container: {name}"));
        if !valid_name(name) {
            return Err(no_such());
        }
        let key = snapshot_key(name);
        let dir = self.dir(name);
        let has_snapshot = snaps.exists(&key).map_err(|e| snapshot_err(name, e))?;
        if !has_snapshot && !dir.exists() {
            return Err(no_such());
        }
        if let Some(r) = self.load_record(name) {
            let state = r.state();
            if matches!(state, State::Running | State::Created) {
                if !force {
                    return Err(Error::Busy(format!(
                        "container {name} is {}: stop it first, or `cstore rm -f {name}` kills and removes it",
                        state.name()
                    )));
                }
                match &r.init {
                    Some(init) => teardown::kill(name, init, Duration::from_secs(10))?,
                    // Still being set up: stop the setup; libcontainer's
                    // delete below kills whatever it had started.
                    None if r.supervisor.is_alive() => {
                        // SAFETY: kill(2) on a pid whose start time was just checked.
                        unsafe { libc::kill(r.supervisor.pid as i32, libc::SIGKILL) };
                    }
                    None => {}
                }
            }
            // A supervisor still alive is recording the exit and unmounting.
            if !teardown::wait_gone(&r.supervisor, Duration::from_secs(30)) {
                return Err(Error::Busy(format!(
                    "container {name}: its `cstore run` (pid {}) is still finishing",
                    r.supervisor.pid
                )));
            }
        }
        let rootfs = dir.join("rootfs");
        if mount::is_mountpoint(&rootfs) {
            mount::unmount(&rootfs).map_err(|e| Error::Container {
                id: name.to_string(),
                source: e,
            })?;
        }
        teardown::remove(name, &self.state_root(), &cgroup_path(name))?;
        snaps.remove(&key).map_err(|e| snapshot_err(name, e))?;
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(cstore_os::IoError::new("remove", &dir, e).into())
            }
            _ => Ok(()),
        }
    }

    /// Run a container: prepare (snapshot, record, mounts, user), launch
    /// (until it exits), teardown (runtime state; with `auto_remove` the
    /// snapshot and directory, else the exit in the record). `hold` takes
    /// the databases' holds just before the launch; they are dropped once
    /// the init runs, not before: a reaper closing a database while
    /// libcontainer clones this process could leave the child a lock it
    /// never gets back.
    pub fn run<H>(
        &self,
        snaps: &dyn Snapshots,
        req: RunRequest,
        hold: impl FnOnce() -> H,
    ) -> Result<i32, Error> {
        let mut prepared = self.prepare(snaps, &req)?;
        let result = prepared.launch(&req, hold());
        prepared.teardown(&req, &result);
        // A container that did not start says which image it was.
        result.map_err(|e| match e {
            Error::Input(_) | Error::NotStarted { .. } | Error::StartTimeout { .. } => {
                Error::Image {
                    image: req.image.clone(),
                    source: Box::new(e),
                }
            }
            e => e,
        })
    }

    /// The snapshot, the directory, the record and the mounted rootfs; the
    /// user resolved from it and the working directory made in it. What a
    /// failure here made is removed.
    fn prepare<'a>(
        &'a self,
        snaps: &'a dyn Snapshots,
        req: &RunRequest,
    ) -> Result<Prepared<'a>, Error> {
        let id = &req.id;
        let dir = self.dir(id);
        let rootfs = dir.join("rootfs");
        self.create_dir(id)?;
        let key = snapshot_key(id);
        let labels = BTreeMap::from([
            (LABEL_CONTAINER.to_string(), id.clone()),
            (LABEL_IMAGE.to_string(), req.image.clone()),
            (LABEL_MOUNTPOINT.to_string(), rootfs.display().to_string()),
        ]);
        let mut mounts = snaps
            .prepare(&key, &req.parent, labels)
            .map_err(|e| snapshot_err(id, e))?
            .ok_or_else(|| {
                Error::AlreadyExists(format!(
                    "a container named {id:?} exists (remove it with `cstore rm {id}`)"
                ))
            })?;
        if req.auto_remove {
            // The upper dir of a --rm container is thrown away at exit.
            // Without `volatile`, unmounting the overlay syncs the whole
            // filesystem under the store (overlayfs' sync_fs), which costs
            // what every other writer on it has left dirty.
            for m in mounts.iter_mut().filter(|m| m.kind == "overlay") {
                m.options.push("volatile".into());
            }
        }
        // The name is ours now (prepare refuses a second one): record it.
        let mut record = Record::new(id, &req.image, &req.process.args);
        record.auto_remove = req.auto_remove;
        let made = Made {
            snaps,
            key,
            dir,
            rootfs,
        };
        let mounted = record.save(&made.dir).and_then(|()| match &req.userns {
            None => mount::mount_all(&mounts, &made.rootfs).map_err(Error::from),
            Some(u) => self.mount_userns(&made.dir, &mounts, &made.rootfs, u),
        });
        if let Err(e) = mounted {
            made.cleanup(true);
            return Err(e);
        }
        // The container's root owns what is made for it.
        let root_ids = req
            .userns
            .as_ref()
            .map_or((0, 0), |u| (u.uid.host, u.gid.host));
        let mut process = req.process.clone();
        let user = crate::user::resolve(&made.rootfs, &process.user)
            .and_then(|u| match &req.userns {
                Some(ns) => ns.check_user(&process.user, &u).map(|()| u),
                None => Ok(u),
            })
            .and_then(|u| {
                crate::rootfs::create_dir_all(&made.rootfs, &process.cwd, root_ids)
                    .map_err(|e| Error::Input(format!("working directory {e}")))?;
                Ok(u)
            });
        match user {
            Ok(user) => {
                process.with_home(&user.home);
                Ok(Prepared {
                    made,
                    state_root: self.state_root(),
                    record,
                    process,
                    user,
                })
            }
            Err(e) => {
                made.cleanup(true);
                Err(Error::Image {
                    image: req.image.clone(),
                    source: Box::new(e),
                })
            }
        }
    }

    /// The rootfs for a container in user namespace `u`: the image's layers
    /// id-mapped, the upper dir owned by the container's root (as
    /// containerd's overlay snapshotter does with uid/gid mappings), and the
    /// path to it searchable by that unprivileged host user.
    fn mount_userns(
        &self,
        dir: &Path,
        mounts: &[Mount],
        rootfs: &Path,
        u: &Userns,
    ) -> Result<(), Error> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let io = |op: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |e| Error::from(cstore_os::IoError::new(op, p, e))
        };
        let root = self.root.as_path();
        let owner = (u.uid.host, u.gid.host);
        // The container's root walks ROOT/containers/NAME/rootfs as an
        // unprivileged host user: ROOT and containers/ are searchable by all
        // (0711, as containerd's root), the container's own directory by its
        // group only: 0710, group the mapped root's gid. Other users reach
        // no rootfs, and the layers below snapshots/ (0700) reach overlayfs
        // through the mount cstore makes as root.
        for d in [root, &root.join("containers")] {
            let mut p = std::fs::metadata(d).map_err(io("stat", d))?.permissions();
            if p.mode() & 0o001 == 0 {
                p.set_mode(p.mode() | 0o001);
                std::fs::set_permissions(d, p).map_err(io("chmod o+x", d))?;
            }
        }
        std::os::unix::fs::lchown(dir, None, Some(owner.1)).map_err(io("chgrp", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))
            .map_err(io("chmod", dir))?;
        for d in root.ancestors().skip(1) {
            if !crate::userns::searchable_by(d, owner).map_err(io("stat", d))? {
                return Err(Error::Input(format!(
                    "--userns: the container's root (host uid {}) cannot reach its rootfs: {} is not searchable by it (chmod o+x, or use another --root)",
                    owner.0,
                    d.display()
                )));
            }
        }
        for m in mounts {
            if let Some(upper) = m.options.iter().find_map(|o| o.strip_prefix("upperdir=")) {
                // The upper dir's root, through its own fd (never a symlink).
                let upper = Path::new(upper);
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .open(upper)
                    .map_err(io("open", upper))?;
                std::os::unix::fs::fchown(&f, Some(owner.0), Some(owner.1))
                    .map_err(io("chown", upper))?;
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
}

/// What a run has made of a container: its snapshot, directory and rootfs
/// mount point.
struct Made<'a> {
    snaps: &'a dyn Snapshots,
    key: String,
    dir: PathBuf,
    rootfs: PathBuf,
}

impl Made<'_> {
    /// Unmount the rootfs; with `remove`, the snapshot and directory go too.
    fn cleanup(&self, remove: bool) {
        let unmounted = mount::unmount(&self.rootfs).is_ok() || !mount::is_mountpoint(&self.rootfs);
        // Never walk a rootfs still mounted: the removal would go through the
        // container's tree.
        if remove && unmounted {
            let _ = self.snaps.remove(&self.key);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A container made and mounted, its user resolved: not yet started.
struct Prepared<'a> {
    made: Made<'a>,
    state_root: PathBuf,
    record: Record,
    process: Process,
    user: crate::user::ExecUser,
}

impl Prepared<'_> {
    /// Run it until it exits; the record gets the init's pid.
    fn launch<H>(&mut self, req: &RunRequest, holds: H) -> Result<i32, Error> {
        let spec = RunSpec {
            id: req.id.clone(),
            rootfs: self.made.rootfs.clone(),
            bundle: self.made.dir.join("bundle"),
            state_root: self.state_root.clone(),
            args: self.process.args.clone(),
            env: self.process.env.clone(),
            cwd: self.process.cwd.clone(),
            uid: self.user.uid,
            gid: self.user.gid,
            additional_gids: self.user.additional_gids.clone(),
            hostname: self
                .process
                .hostname
                .clone()
                .unwrap_or_else(|| req.id.chars().take(12).collect()),
            net_host: req.net_host,
            readonly: req.readonly,
            cgroup: cgroup_path(&req.id),
            io: req.io,
            memory: req.memory,
            pids: req.pids,
            tty: req.tty,
            interactive: req.interactive,
            userns: req.userns,
            start_timeout: req.start_timeout,
        };
        // (Not called when the start fails: the holds then go when run_with returns.)
        let (record, dir) = (&mut self.record, &self.made.dir);
        let result = crate::run_with(&spec, |pid| {
            drop(holds);
            record.set_started(pid);
            if let Err(e) = record.save(dir) {
                tracing::warn!(error = %e, "recording the container's pid");
            }
        });
        // What a failed create left, and the cgroup parent when no other
        // container uses it.
        if let Err(e) = teardown::remove(&req.id, &spec.state_root, &spec.cgroup) {
            tracing::warn!(error = %e, "removing the container's runtime state");
        }
        result
    }

    /// After the run: the exit recorded (kept containers) and the rootfs
    /// unmounted; with `auto_remove` the snapshot and directory removed.
    fn teardown(&mut self, req: &RunRequest, result: &Result<i32, Error>) {
        if !req.auto_remove {
            self.record.set_finished(result);
            if let Err(e) = self.record.save(&self.made.dir) {
                tracing::warn!(error = %e, "recording the container's exit");
            }
        }
        self.made.cleanup(req.auto_remove);
    }
}

fn snapshot_err(id: &str, e: BoxError) -> Error {
    Error::Snapshot {
        id: id.to_string(),
        kind: e.kind,
        message: e.message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_path_components_and_random_ones_are_short_ids() {
        for ok in ["a", "web-1", "db_2", "ABC123"] {
            assert!(valid_name(ok), "{ok}");
            assert_eq!(name_or_random(Some(ok)).unwrap(), ok);
        }
        for bad in ["", ".", "..", "a/b", "a b", "ä", "x\0"] {
            assert!(!valid_name(bad), "{bad:?}");
            let e = name_or_random(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("--name"), "{e}");
        }
        let (a, b) = (name_or_random(None).unwrap(), name_or_random(None).unwrap());
        assert_ne!(a, b);
        assert!(
            a.len() == 12 && a.chars().all(|c| c.is_ascii_hexdigit()),
            "{a}"
        );
        assert_eq!(snapshot_key(&a), format!("cstore-run:{a}"));
    }
}
