//! `ps` and `rm`: the containers `cstore run` keeps (all but `--rm` ones).
//!
//! A container is its active snapshot `cstore-run:ID` (the snapshot database
//! decides which names are taken) and its directory `ROOT/containers/ID`
//! (record, rootfs mount point, bundle). Outside the store a run leaves
//! libcontainer's state under `ROOT/run-state/ID` and cgroups `/cstore/ID`,
//! which libcontainer removes when the run ends normally and `rm` removes
//! when it did not.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cstore_os::now_unix;
use cstore_runtime::record::{Record, State};
use cstore_runtime::teardown;
use cstore_snapshotter::{mount, Snapshotter};
use cstore_store::Store;

use crate::snap;

const KEY_PREFIX: &str = "cstore-run:";
const LABEL_IMAGE: &str = "cstore.io/image";

pub fn snapshot_key(id: &str) -> String {
    format!("{KEY_PREFIX}{id}")
}

pub fn dir(store: &Store, id: &str) -> PathBuf {
    store.root().join("containers").join(id)
}

/// Make the container's directory (0700: its rootfs is mounted in it, see
/// cstore_store::layout) and its rootfs mount point.
pub fn create_dir(store: &Store, id: &str) -> Result<()> {
    use cstore_os::layout;
    let containers = store.root().join("containers");
    let dir = dir(store, id);
    layout::create_dir(&containers, layout::CONTAINERS_MODE)
        .and_then(|()| layout::create_dir(&dir, layout::PRIVATE_DIR_MODE))
        .and_then(|()| layout::create_dir(&dir.join("rootfs"), 0o755))
        .with_context(|| format!("creating {}", dir.display()))
}

/// libcontainer's state directory (one subdirectory per container).
pub fn state_root(store: &Store) -> PathBuf {
    store.root().join("run-state")
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

struct Container {
    id: String,
    /// None for a container whose run died before writing one.
    record: Option<Record>,
    image: String,
    /// Unix seconds.
    created: u64,
}

impl Container {
    fn state(&self) -> State {
        self.record.as_ref().map_or(
            State::Exited {
                code: None,
                finished: None,
            },
            Record::state,
        )
    }
}

fn load_record(store: &Store, id: &str) -> Option<Record> {
    Record::load(&dir(store, id)).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "unreadable container record");
        None
    })
}

/// Every container: those with a snapshot, and directories left without one.
fn list(store: &Store, sn: &Snapshotter) -> Result<Vec<Container>> {
    let mut found = BTreeMap::new();
    for info in sn.list()? {
        if let Some(id) = info.name.strip_prefix(KEY_PREFIX) {
            found.insert(
                id.to_string(),
                (
                    info.labels.get(LABEL_IMAGE).cloned().unwrap_or_default(),
                    info.created / 1_000_000_000,
                ),
            );
        }
    }
    if let Ok(rd) = std::fs::read_dir(store.root().join("containers")) {
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
            let record = load_record(store, &id);
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

/// docker's wording: "3 minutes", "About an hour", "2 days".
fn human_duration(secs: u64) -> String {
    let (m, h) = (secs / 60, (secs + 1800) / 3600);
    match secs {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        2..=59 => format!("{secs} seconds"),
        _ if m == 1 => "About a minute".into(),
        _ if m < 60 => format!("{m} minutes"),
        _ if h == 1 => "About an hour".into(),
        _ if h < 48 => format!("{h} hours"),
        _ if h < 24 * 14 => format!("{} days", h / 24),
        _ if h < 24 * 60 => format!("{} weeks", h / (24 * 7)),
        _ if h < 24 * 730 => format!("{} months", h / (24 * 30)),
        _ => format!("{} years", h / (24 * 365)),
    }
}

fn status(c: &Container, now: u64) -> String {
    let ago = |t: u64| human_duration(now.saturating_sub(t));
    let r = c.record.as_ref();
    match c.state() {
        State::Created => "Created".into(),
        State::Running => format!("Up {}", ago(r.and_then(|r| r.started).unwrap_or(c.created))),
        State::Exited {
            code: Some(code),
            finished,
        } => format!("Exited ({code}) {} ago", ago(finished.unwrap_or(c.created))),
        State::Exited {
            code: None,
            finished: Some(t),
        } => format!("Failed to start {} ago", ago(t)),
        State::Exited { .. } => "Exited (unknown)".into(),
    }
}

pub fn ps(store: &Store, all: bool, json: bool) -> Result<()> {
    let sn = snap::open(store)?;
    let now = now_unix();
    let shown: Vec<Container> = list(store, &sn)?
        .into_iter()
        .filter(|c| all || !matches!(c.state(), State::Exited { .. }))
        .collect();
    if json {
        let rows: Vec<_> = shown
            .iter()
            .map(|c| {
                let r = c.record.as_ref();
                let state = c.state();
                serde_json::json!({
                    "id": c.id, "name": c.id, "image": c.image,
                    "command": r.map(|r| r.command.clone()).unwrap_or_default(),
                    "created": c.created, "state": state.name(), "status": status(c, now),
                    "pid": r.and_then(|r| r.init).filter(|_| state == State::Running).map(|p| p.pid),
                    "started": r.and_then(|r| r.started),
                    "exit_code": r.and_then(|r| r.exit_code),
                    "finished": r.and_then(|r| r.finished),
                    "error": r.and_then(|r| r.error.clone()),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let w = shown.iter().map(|c| c.id.len()).max().unwrap_or(0).max(12);
    println!(
        "{:<w$}  {:<30}  {:<22}  {:<22}  STATUS",
        "NAME", "IMAGE", "COMMAND", "CREATED"
    );
    for c in &shown {
        let command = c
            .record
            .as_ref()
            .map(|r| r.command.join(" "))
            .unwrap_or_default();
        println!(
            "{:<w$}  {:<30}  {:<22}  {:<22}  {}",
            c.id,
            truncate(&c.image, 30),
            truncate(&format!("\"{command}\""), 22),
            format!("{} ago", human_duration(now.saturating_sub(c.created))),
            status(c, now)
        );
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut t: String = s.chars().take(n - 1).collect();
    t.push('…');
    t
}

pub fn rm(store: &Store, names: &[String], force: bool) -> Result<()> {
    let sn = snap::open(store)?;
    let mut errors = Vec::new();
    for name in names {
        match remove(store, &sn, name, force) {
            Ok(()) => println!("{name}"),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

fn remove(store: &Store, sn: &Snapshotter, name: &str, force: bool) -> Result<()> {
    if !valid_name(name) {
        bail!("no such container: {name}");
    }
    let key = snapshot_key(name);
    let dir = dir(store, name);
    let has_snapshot = match sn.stat(&key) {
        Ok(_) => true,
        Err(cstore_snapshotter::Error::NotFound(_)) => false,
        Err(e) => return Err(e).context(format!("container {name}")),
    };
    if !has_snapshot && !dir.exists() {
        bail!("no such container: {name}");
    }
    if let Some(r) = load_record(store, name) {
        let state = r.state();
        if matches!(state, State::Running | State::Created) {
            if !force {
                bail!(
                    "container {name} is {}: stop it first, or `cstore rm -f {name}` kills and removes it",
                    state.name()
                );
            }
            match &r.init {
                Some(init) => teardown::kill(name, init, Duration::from_secs(10))?,
                // Still being set up: stop the setup; libcontainer's delete
                // below kills whatever it had started.
                None if r.supervisor.is_alive() => {
                    // SAFETY: kill(2) on a pid whose start time was just checked.
                    unsafe { libc::kill(r.supervisor.pid as i32, libc::SIGKILL) };
                }
                None => {}
            }
        }
        // A supervisor still alive is recording the exit and unmounting.
        if !teardown::wait_gone(&r.supervisor, Duration::from_secs(30)) {
            bail!(
                "container {name}: its `cstore run` (pid {}) is still finishing",
                r.supervisor.pid
            );
        }
    }
    let rootfs = dir.join("rootfs");
    if mount::is_mountpoint(&rootfs) {
        mount::unmount(&rootfs).with_context(|| format!("container {name}"))?;
    }
    teardown::remove(name, &state_root(store), &cgroup_path(name))?;
    match sn.remove(&key) {
        Ok(()) | Err(cstore_snapshotter::Error::NotFound(_)) => {}
        Err(e) => return Err(e).context(format!("container {name}")),
    }
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::human_duration;

    #[test]
    fn durations_read_like_docker() {
        for (secs, want) in [
            (0, "Less than a second"),
            (1, "1 second"),
            (59, "59 seconds"),
            (60, "About a minute"),
            (150, "2 minutes"),
            (3599, "59 minutes"),
            (3600, "About an hour"),
            (5 * 3600, "5 hours"),
            (3 * 86400, "3 days"),
            (21 * 86400, "3 weeks"),
            (90 * 86400, "3 months"),
            (800 * 86400, "2 years"),
        ] {
            assert_eq!(human_duration(secs), want, "{secs}s");
        }
    }
}
