//! `ps` and `rm`: the containers `cstore run` keeps (all but `--rm` ones),
//! listed and removed by cstore-runtime's `Containers`; here they are
//! printed. The snapshot tree reaches the runtime through `SnapshotTree`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use cstore_os::now_unix;
use cstore_runtime::containers::{BoxError, SnapshotInfo, Snapshots};
use cstore_runtime::record::State;
use cstore_runtime::{Container, Containers};
use cstore_snapshotter::{Mount, Snapshotter};
use cstore_store::Store;

use crate::snap;

/// The snapshot tree as the runtime's containers use it (the store for
/// lazy layers, whose FUSE mounts stand in for their directories).
pub struct SnapshotTree<'a>(pub &'a Snapshotter, pub &'a Store);

impl Snapshots for SnapshotTree<'_> {
    fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Option<Vec<Mount>>, BoxError> {
        match self.0.prepare(key, Some(parent), labels) {
            Ok(mut m) => {
                // Lazy layers are their daemon's FUSE mounts (refused if
                // none serves them): the chain from `parent` down.
                let mut chains = Vec::new();
                let mut next = Some(parent.to_string());
                while let Some(c) = next {
                    next = self.0.stat(&c)?.parent;
                    chains.push(c);
                }
                if let Err(e) = cstore_lazy::serve::use_lazy_mounts(self.1, self.0, &chains, &mut m)
                {
                    let _ = self.0.remove(key);
                    return Err(e.into());
                }
                Ok(Some(m))
            }
            Err(cstore_snapshotter::Error::AlreadyExists(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn remove(&self, key: &str) -> Result<bool, BoxError> {
        match self.0.remove(key) {
            Ok(()) => Ok(true),
            Err(cstore_snapshotter::Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn exists(&self, key: &str) -> Result<bool, BoxError> {
        match self.0.stat(key) {
            Ok(_) => Ok(true),
            Err(cstore_snapshotter::Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn list(&self) -> Result<Vec<SnapshotInfo>, BoxError> {
        Ok(self
            .0
            .list()?
            .into_iter()
            .map(|i| SnapshotInfo {
                name: i.name,
                labels: i.labels,
                created: i.created / 1_000_000_000,
            })
            .collect())
    }
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
    let shown: Vec<Container> = Containers::new(store.root())
        .list(&SnapshotTree(&sn, store))?
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
    let containers = Containers::new(store.root());
    let mut errors = Vec::new();
    for name in names {
        match containers.remove(&SnapshotTree(&sn, store), name, force) {
            Ok(()) => println!("{name}"),
            Err(e) => errors.push(format!("{:#}", anyhow::Error::from(e))),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
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
