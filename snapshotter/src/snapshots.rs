//! Snapshots with containerd's semantics, over directories on disk as
//! containerd's overlayfs snapshotter lays them out:
//!
//! ```text
//! ROOT/snapshots/metadata.db     redb: snapshots by key, children index, id counter
//! ROOT/snapshots/<id>/fs         the snapshot's tree (upper dir when active)
//! ROOT/snapshots/<id>/work       overlay's work dir (active snapshots)
//! ROOT/snapshots/staging/...     directories being filled, not yet snapshots
//! ```
//!
//! As in containerd, metadata and filesystem work are separate steps ordered
//! so a crash leaves at worst an orphan directory (removed by `cleanup`),
//! never a record without its directory.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use cstore_os::db::{DbFile, Hold};
use cstore_os::layout;
use cstore_os::tree::TreeDir;
use cstore_os::IoError;
use redb::{ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use cstore_os::mount::Mount;
use cstore_os::Proc;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// `parent \0 child` → (): who has children, without a scan.
const CHILDREN: TableDefinition<&str, ()> = TableDefinition::new("children");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    id: u64,
    kind: Kind,
    parent: Option<String>,
    labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    created: u64,
    updated: u64,
    /// Measured at commit (committed snapshots don't change).
    #[serde(default)]
    usage: Option<Usage>,
}

/// What containerd's Stat returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Info {
    pub name: String,
    pub kind: Kind,
    pub parent: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub created: u64,
    pub updated: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: u64,
    pub inodes: u64,
}

impl Usage {
    /// This usage with the allocation changed by `bytes`.
    pub fn grown(self, bytes: i64) -> Usage {
        Usage {
            size: self.size.saturating_add_signed(bytes),
            ..self
        }
    }
}

/// Snapshot records from a write or a read transaction.
trait Lookup {
    fn raw(&self, key: &str) -> std::result::Result<Option<Vec<u8>>, Box<redb::Error>>;
}

fn lookup_in(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> std::result::Result<Option<Vec<u8>>, Box<redb::Error>> {
    Ok(t.get(key)
        .map_err(|e| Box::new(e.into()))?
        .map(|v| v.value().to_vec()))
}

impl Lookup for redb::WriteTransaction {
    fn raw(&self, key: &str) -> std::result::Result<Option<Vec<u8>>, Box<redb::Error>> {
        lookup_in(
            &self.open_table(SNAPSHOTS).map_err(|e| Box::new(e.into()))?,
            key,
        )
    }
}

impl Lookup for redb::ReadTransaction {
    fn raw(&self, key: &str) -> std::result::Result<Option<Vec<u8>>, Box<redb::Error>> {
        lookup_in(
            &self.open_table(SNAPSHOTS).map_err(|e| Box::new(e.into()))?,
            key,
        )
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn child_key(parent: &str, child: &str) -> String {
    format!("{parent}\0{child}")
}

/// A name this API is to store or link (key, name, parent). NUL separates
/// parent and child in the children index, so a name holding one would
/// read as another snapshot's child there ("p" + "q\0r" is the entry of
/// "p\0q" with child "r").
fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "snapshot {what} must not be empty"
        )));
    }
    if name.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "snapshot {what} {name:?} contains a NUL byte"
        )));
    }
    Ok(())
}

pub struct Snapshotter {
    root: PathBuf,
    db: DbFile,
}

impl Snapshotter {
    /// Open (creating) the snapshot tree under `store_root/snapshots`.
    pub fn open(store_root: &Path) -> Result<Snapshotter> {
        // Every layer tree and upper dir is below `snapshots/`, closed to
        // other users (see cstore_os::layout), as is the store root.
        layout::secure_root(store_root)?;
        let root = store_root.join("snapshots");
        for d in [&root, &root.join("staging")] {
            layout::create_dir(d, layout::PRIVATE_DIR_MODE)
                .map_err(|e| IoError::new("create", d, e))?;
        }
        let sn = Snapshotter {
            db: DbFile::open(&root.join("metadata.db"), "snapshot database")?,
            root,
        };
        sn.db.ensure_tables(
            &[SNAPSHOTS.name(), CHILDREN.name(), COUNTERS.name()],
            |txn| {
                txn.open_table(SNAPSHOTS).map_err(|e| sn.db.err(e))?;
                txn.open_table(CHILDREN).map_err(|e| sn.db.err(e))?;
                txn.open_table(COUNTERS).map_err(|e| sn.db.err(e))?;
                Ok::<_, Error>(())
            },
        )?;
        Ok(sn)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Keep the metadata database from closing meanwhile (`DbFile::hold`).
    pub fn hold(&self) -> Hold<'_> {
        self.db.hold()
    }

    /// Every commit saves the database's allocator state, so the close that
    /// soon follows it is cheaper (`DbFile::commits_before_close`).
    pub fn commits_before_close(&self, on: bool) {
        self.db.commits_before_close(on)
    }

    /// Close the metadata database soon, in the background
    /// (`DbFile::close_soon`).
    pub fn close_soon(&self) {
        self.db.close_soon()
    }

    /// Close the metadata database and keep it closed meanwhile
    /// (`DbFile::hold_closed`).
    pub fn hold_closed(&self) -> Hold<'_> {
        self.db.hold_closed()
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join(id.to_string())
    }

    fn transact<T, U>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T>,
        after: impl FnOnce(T) -> Result<U>,
    ) -> Result<U> {
        self.db.transact(f, after)
    }

    fn dberr(&self, e: impl Into<redb::Error>) -> Error {
        Error::from(self.db.err(e))
    }

    fn get<L: Lookup>(&self, txn: &L, key: &str) -> Result<Option<Record>> {
        match txn.raw(key).map_err(|e| self.dberr(*e))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| self.db.corrupt(format!("record {key:?}: {e}")).into()),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T>) -> Result<T> {
        self.db.read(f)
    }

    fn put(&self, txn: &redb::WriteTransaction, key: &str, r: &Record) -> Result<()> {
        let mut t = txn.open_table(SNAPSHOTS).map_err(|e| self.dberr(e))?;
        t.insert(key, serde_json::to_vec(r).expect("json").as_slice())
            .map_err(|e| self.dberr(e))?;
        Ok(())
    }

    fn has_children(&self, txn: &redb::WriteTransaction, key: &str) -> Result<bool> {
        let t = txn.open_table(CHILDREN).map_err(|e| self.dberr(e))?;
        let (lo, hi) = (format!("{key}\0"), format!("{key}\u{1}"));
        let found = t
            .range(lo.as_str()..hi.as_str())
            .map_err(|e| self.dberr(e))?
            .next()
            .is_some();
        Ok(found)
    }

    fn link_child(
        &self,
        txn: &redb::WriteTransaction,
        parent: &str,
        child: &str,
        add: bool,
    ) -> Result<()> {
        let mut t = txn.open_table(CHILDREN).map_err(|e| self.dberr(e))?;
        let k = child_key(parent, child);
        if add {
            t.insert(k.as_str(), ()).map_err(|e| self.dberr(e))?;
        } else {
            t.remove(k.as_str()).map_err(|e| self.dberr(e))?;
        }
        Ok(())
    }

    fn next_id(&self, txn: &redb::WriteTransaction) -> Result<u64> {
        let mut t = txn.open_table(COUNTERS).map_err(|e| self.dberr(e))?;
        let id = t
            .get("id")
            .map_err(|e| self.dberr(e))?
            .map(|v| v.value())
            .unwrap_or(0)
            + 1;
        t.insert("id", id).map_err(|e| self.dberr(e))?;
        Ok(id)
    }

    /// Make `child` a child of `parent`, which must be committed; its record.
    fn adopt(&self, txn: &redb::WriteTransaction, parent: &str, child: &str) -> Result<Record> {
        let pr = self
            .get(txn, parent)?
            .ok_or_else(|| Error::NotFound(parent.to_string()))?;
        if pr.kind != Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "parent {parent:?} is not a committed snapshot"
            )));
        }
        self.link_child(txn, parent, child, true)?;
        Ok(pr)
    }

    /// The chain of committed ancestors' ids, nearest first.
    fn chain_ids<L: Lookup>(&self, txn: &L, mut parent: Option<String>) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        while let Some(p) = parent {
            let r = self
                .get(txn, &p)?
                .ok_or_else(|| Error::NotFound(p.clone()))?;
            ids.push(r.id);
            parent = r.parent;
        }
        Ok(ids)
    }

    fn staging_dir(&self) -> Result<PathBuf> {
        let start = Proc::current().start;
        let dir = self.root.join("staging").join(format!(
            "{}-{start}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        // Renamed to snapshots/ID as it is: closed like its parent.
        layout::create_dir_all(&dir, layout::PRIVATE_DIR_MODE)
            .map_err(|e| IoError::new("create", &dir, e))?;
        Ok(dir)
    }

    /// A fresh directory to fill before it becomes a snapshot (see
    /// `commit_dir`). Left behind by a dead process, `cleanup` removes it.
    pub fn new_staging(&self) -> Result<PathBuf> {
        let dir = self.staging_dir()?;
        // fs gets the image's root attributes (its `./` entry, the lower
        // layer's, or the parent's for an upper dir); work is overlay's.
        for (sub, mode) in [("fs", 0o755), ("work", layout::PRIVATE_DIR_MODE)] {
            fs::DirBuilder::new()
                .mode(mode)
                .create(dir.join(sub))
                .map_err(|e| IoError::new("create", dir.join(sub), e))?;
        }
        Ok(dir)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        check_name("key", key)?;
        if let Some(p) = parent {
            check_name("parent", p)?;
        }
        let staging = self.new_staging()?;
        let res = self.transact(
            |txn| {
                if self.get(txn, key)?.is_some() {
                    return Err(Error::AlreadyExists(key.to_string()));
                }
                if let Some(p) = parent {
                    let pr = self.adopt(txn, p, key)?;
                    if kind == Kind::Active {
                        // The upper dir's root is the mount's root: it must
                        // look like the image's, not like a fresh 0755 dir
                        // (containerd copies the owner; the mode and xattrs
                        // show through just the same).
                        copy_root_attrs(&self.dir(pr.id).join("fs"), &staging.join("fs"))?;
                    }
                }
                let id = self.next_id(txn)?;
                let now = now_nanos();
                let rec = Record {
                    id,
                    kind,
                    parent: parent.map(String::from),
                    labels,
                    created: now,
                    updated: now,
                    usage: None,
                };
                self.put(txn, key, &rec)?;
                // In the transaction: if the commit fails, the directory is an
                // orphan for cleanup; a record never lacks its directory.
                fs::rename(&staging, self.dir(id))
                    .map_err(|e| IoError::new("rename", self.dir(id), e))?;
                let chain = self.chain_ids(txn, rec.parent.clone())?;
                Ok(self.mounts_for(&rec, &chain))
            },
            Ok,
        );
        if res.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        res
    }

    /// containerd Prepare: an active (writable) snapshot on `parent`.
    pub fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    /// containerd View: a read-only snapshot of `parent`.
    pub fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.read(|txn| {
            let rec = self
                .get(txn, key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))?;
            if rec.kind == Kind::Committed {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is committed: mounts are for active or view snapshots"
                )));
            }
            let chain = self.chain_ids(txn, rec.parent.clone())?;
            Ok(self.mounts_for(&rec, &chain))
        })
    }

    /// Mounts as containerd's overlayfs snapshotter gives them.
    fn mounts_for(&self, rec: &Record, parents: &[u64]) -> Vec<Mount> {
        let fs_of = |id: u64| self.dir(id).join("fs").display().to_string();
        if parents.is_empty() {
            let ro = if rec.kind == Kind::View { "ro" } else { "rw" };
            return vec![Mount::bind(&fs_of(rec.id), &[ro, "rbind"])];
        }
        if rec.kind == Kind::View && parents.len() == 1 {
            return vec![Mount::bind(&fs_of(parents[0]), &["ro", "rbind"])];
        }
        let lower = parents
            .iter()
            .map(|&id| fs_of(id))
            .collect::<Vec<_>>()
            .join(":");
        let mut options = vec!["index=off".to_string()];
        if rec.kind == Kind::Active {
            options.push(format!(
                "workdir={}",
                self.dir(rec.id).join("work").display()
            ));
            options.push(format!("upperdir={}", fs_of(rec.id)));
        }
        options.push(format!("lowerdir={lower}"));
        vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options,
        }]
    }

    /// containerd Commit: the active snapshot `key` becomes committed `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        mut labels: BTreeMap<String, String>,
    ) -> Result<()> {
        drop_empty(&mut labels);
        check_name("name", name)?;
        // Measure outside the transaction: it walks the tree.
        let id = self
            .read(|txn| Ok(self.get(txn, key)?.map(|r| r.id)))?
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        let usage = dir_usage(&self.dir(id).join("fs"));
        self.transact(
            |txn| {
                let rec = self
                    .get(txn, key)?
                    .ok_or_else(|| Error::NotFound(key.to_string()))?;
                if rec.kind != Kind::Active {
                    return Err(Error::FailedPrecondition(format!(
                        "snapshot {key:?} is {}, not active: only active snapshots commit",
                        rec.kind
                    )));
                }
                if self.get(txn, name)?.is_some() {
                    return Err(Error::AlreadyExists(name.to_string()));
                }
                let mut t = txn.open_table(SNAPSHOTS).map_err(|e| self.dberr(e))?;
                t.remove(key).map_err(|e| self.dberr(e))?;
                drop(t);
                if let Some(p) = &rec.parent {
                    self.link_child(txn, p, key, false)?;
                    self.link_child(txn, p, name, true)?;
                }
                let now = now_nanos();
                let committed = Record {
                    kind: Kind::Committed,
                    labels,
                    created: now,
                    updated: now,
                    usage: Some(usage),
                    ..rec
                };
                self.put(txn, name, &committed)
            },
            Ok,
        )?;
        // Overlay leaves its work dir; a committed snapshot needs none.
        let _ = fs::remove_dir_all(self.dir(id).join("work"));
        Ok(())
    }

    /// Turn a filled staging directory (from `new_staging`) into committed
    /// snapshot `name` on `parent`. AlreadyExists if someone else won.
    pub fn commit_dir(
        &self,
        staging: &Path,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let usage = dir_usage(&staging.join("fs"));
        self.commit_dir_measured(staging, name, parent, labels, usage)
    }

    /// `commit_dir` with the tree's usage measured by the caller (`dir_usage`
    /// while the tree was still in memory: walking it now could read every
    /// directory back from the disk).
    pub fn commit_dir_measured(
        &self,
        staging: &Path,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<()> {
        check_name("name", name)?;
        if let Some(p) = parent {
            check_name("parent", p)?;
        }
        let _ = fs::remove_dir_all(staging.join("work"));
        self.transact(
            |txn| {
                if self.get(txn, name)?.is_some() {
                    return Err(Error::AlreadyExists(name.to_string()));
                }
                if let Some(p) = parent {
                    self.adopt(txn, p, name)?;
                }
                let id = self.next_id(txn)?;
                let now = now_nanos();
                let rec = Record {
                    id,
                    kind: Kind::Committed,
                    parent: parent.map(String::from),
                    labels,
                    created: now,
                    updated: now,
                    usage: Some(usage),
                };
                self.put(txn, name, &rec)?;
                fs::rename(staging, self.dir(id))
                    .map_err(|e| IoError::new("rename", self.dir(id), e).into())
            },
            Ok,
        )
    }

    /// Give the committed snapshot `existing` a second name, `name`, on
    /// `parent` (the same directory): how a layer cstore unpacked is handed
    /// to containerd under the name containerd's unpacker asks for.
    pub fn alias(
        &self,
        existing: &str,
        name: &str,
        parent: Option<&str>,
        mut labels: BTreeMap<String, String>,
    ) -> Result<()> {
        drop_empty(&mut labels);
        check_name("name", name)?;
        if let Some(p) = parent {
            check_name("parent", p)?;
        }
        self.transact(
            |txn| {
                let src = self
                    .get(txn, existing)?
                    .ok_or_else(|| Error::NotFound(existing.to_string()))?;
                if src.kind != Kind::Committed {
                    return Err(Error::FailedPrecondition(format!(
                        "snapshot {existing:?} is not committed"
                    )));
                }
                if self.get(txn, name)?.is_some() {
                    return Err(Error::AlreadyExists(name.to_string()));
                }
                if let Some(p) = parent {
                    self.adopt(txn, p, name)?;
                }
                let now = now_nanos();
                let rec = Record {
                    parent: parent.map(String::from),
                    labels,
                    created: now,
                    updated: now,
                    ..src
                };
                self.put(txn, name, &rec)
            },
            Ok,
        )
    }

    /// containerd Remove. FailedPrecondition if it has children.
    pub fn remove(&self, key: &str) -> Result<()> {
        let id = self.transact(
            |txn| {
                let rec = self
                    .get(txn, key)?
                    .ok_or_else(|| Error::NotFound(key.to_string()))?;
                if self.has_children(txn, key)? {
                    return Err(Error::FailedPrecondition(format!(
                        "cannot remove snapshot {key:?}: it has children"
                    )));
                }
                if let Some(p) = &rec.parent {
                    self.link_child(txn, p, key, false)?;
                }
                let mut t = txn.open_table(SNAPSHOTS).map_err(|e| self.dberr(e))?;
                t.remove(key).map_err(|e| self.dberr(e))?;
                // A layer shared under several names (see `alias`) keeps its
                // directory until the last name goes.
                for item in t.iter().map_err(|e| self.dberr(e))? {
                    let (_, v) = item.map_err(|e| self.dberr(e))?;
                    if serde_json::from_slice::<Record>(v.value()).is_ok_and(|r| r.id == rec.id) {
                        return Ok(None);
                    }
                }
                Ok(Some(rec.id))
            },
            // Out of sight first (one rename), then the slow part.
            |id| {
                let Some(id) = id else { return Ok(None) };
                let dir = self.dir(id);
                let gone = self.root.join("staging").join(format!("removed-{id}"));
                match fs::rename(&dir, &gone) {
                    Ok(()) => Ok(Some(gone)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(IoError::new("rename", &dir, e).into()),
                }
            },
        )?;
        if let Some(gone) = id {
            let _ = fs::remove_dir_all(gone);
        }
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        self.read(|txn| {
            self.get(txn, key)?
                .map(|r| info(key, r))
                .ok_or_else(|| Error::NotFound(key.to_string()))
        })
    }

    /// containerd Update: only labels change. `fields` empty replaces all
    /// labels; else `labels` or `labels.KEY` entries pick what to change.
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        fields: &[String],
    ) -> Result<Info> {
        self.transact(
            |txn| {
                let mut rec = self
                    .get(txn, key)?
                    .ok_or_else(|| Error::NotFound(key.to_string()))?;
                if fields.is_empty() {
                    rec.labels = labels;
                } else {
                    for f in fields {
                        if f == "labels" {
                            rec.labels = labels.clone();
                        } else if let Some(k) = f.strip_prefix("labels.") {
                            rec.labels
                                .insert(k.to_string(), labels.get(k).cloned().unwrap_or_default());
                        } else {
                            return Err(Error::InvalidArgument(format!(
                                "cannot update {f:?} of snapshot {key:?}: only labels can change"
                            )));
                        }
                    }
                }
                drop_empty(&mut rec.labels);
                rec.updated = now_nanos();
                self.put(txn, key, &rec)?;
                Ok(info(key, rec))
            },
            Ok,
        )
    }

    /// Every snapshot, as containerd's Walk sees them. The transaction ends
    /// before the caller looks at the result, so a Stat inside a walk works.
    pub fn list(&self) -> Result<Vec<Info>> {
        self.read(|txn| {
            let t = txn.open_table(SNAPSHOTS).map_err(|e| self.dberr(e))?;
            let mut out = Vec::new();
            for item in t.iter().map_err(|e| self.dberr(e))? {
                let (k, v) = item.map_err(|e| self.dberr(e))?;
                let rec: Record = serde_json::from_slice(v.value())
                    .map_err(|e| self.db.corrupt(format!("record {:?}: {e}", k.value())))?;
                out.push(info(k.value(), rec));
            }
            Ok(out)
        })
    }

    /// containerd Usage: bytes and inodes of the snapshot's own layer.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self.read(|txn| {
            self.get(txn, key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))
        })?;
        Ok(match rec.usage {
            Some(u) => u,
            None => dir_usage(&self.dir(rec.id).join("fs")),
        })
    }

    /// The directory of a snapshot's own tree (committed: a layer).
    pub fn fs_dir(&self, key: &str) -> Result<PathBuf> {
        let rec = self.read(|txn| {
            self.get(txn, key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))
        })?;
        Ok(self.dir(rec.id).join("fs"))
    }

    /// containerd Cleanup: remove directories no snapshot owns, and staging
    /// directories whose process is gone.
    pub fn cleanup(&self) -> Result<usize> {
        // Directories go while the database is held, so no create (which
        // renames its directory in inside its transaction) can interleave.
        let mut removed = self.transact(
            |txn| {
                let t = txn.open_table(SNAPSHOTS).map_err(|e| self.dberr(e))?;
                let mut ids = std::collections::HashSet::new();
                for item in t.iter().map_err(|e| self.dberr(e))? {
                    let (_, v) = item.map_err(|e| self.dberr(e))?;
                    if let Ok(r) = serde_json::from_slice::<Record>(v.value()) {
                        ids.insert(r.id);
                    }
                }
                Ok(ids)
            },
            |ids| {
                let mut removed = 0;
                for entry in fs::read_dir(&self.root)
                    .map_err(|e| IoError::new("read dir", &self.root, e))?
                    .flatten()
                {
                    let name = entry.file_name().to_string_lossy().to_string();
                    if let Ok(id) = name.parse::<u64>() {
                        if !ids.contains(&id) && fs::remove_dir_all(entry.path()).is_ok() {
                            removed += 1;
                        }
                    }
                }
                Ok(removed)
            },
        )?;
        let staging = self.root.join("staging");
        for entry in fs::read_dir(&staging)
            .map_err(|e| IoError::new("read dir", &staging, e))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            let dead = match name.split('-').collect::<Vec<_>>().as_slice() {
                [pid, start, _] => {
                    let (pid, start) = (
                        pid.parse::<u32>().unwrap_or(0),
                        start.parse::<u64>().unwrap_or(0),
                    );
                    !Proc { pid, start }.exists()
                }
                ["removed", _] => true,
                _ => false,
            };
            if dead && fs::remove_dir_all(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// containerd stores no empty label values: setting one to "" removes it.
fn drop_empty(labels: &mut BTreeMap<String, String>) {
    labels.retain(|_, v| !v.is_empty());
}

/// Give the tree root `to` (a new upper dir) the owner, mode and xattrs of
/// the tree root `from` (its parent layer's), through fds of the two
/// directories (cstore_os::tree).
fn copy_root_attrs(from: &Path, to: &Path) -> Result<()> {
    let src = TreeDir::open_root(from).map_err(|e| IoError::new("open", from, e))?;
    let dst = TreeDir::open_root(to).map_err(|e| IoError::new("open", to, e))?;
    dst.copy_attrs_from(&src)
        .map_err(|e| IoError::new("copy attributes to", to, e).into())
}

fn info(key: &str, r: Record) -> Info {
    Info {
        name: key.to_string(),
        kind: r.kind,
        parent: r.parent,
        labels: r.labels,
        created: r.created,
        updated: r.updated,
    }
}

/// Bytes (allocated) and inodes of a tree, each hardlinked inode once, as
/// containerd's fs.DiskUsage counts.
pub fn dir_usage(dir: &Path) -> Usage {
    let u = cstore_os::tree::tree_usage(dir);
    Usage {
        size: u.allocated,
        inodes: u.inodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(r: Result<impl std::fmt::Debug>, want: &str) {
        match r {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(want), "{m}"),
            other => panic!("expected InvalidArgument ({want}), got {other:?}"),
        }
    }

    #[test]
    fn nul_in_keys_names_and_parents_is_refused_and_the_children_index_holds() {
        let root = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open(root.path()).unwrap();
        let none = BTreeMap::new;
        sn.prepare("p-active", None, none()).unwrap();
        sn.commit("p", "p-active", none()).unwrap();
        // Before the check, this child of "p" was indexed as "p\0q\0r":
        // the entry of a child "r" of an unrelated snapshot "p\0q".
        invalid(sn.prepare("q\0r", Some("p"), none()), "key \"q\\0r\"");
        invalid(sn.view("q\0r", Some("p"), none()), "contains a NUL");
        invalid(sn.prepare("k", Some("p\0q"), none()), "parent \"p\\0q\"");
        sn.prepare("c-active", Some("p"), none()).unwrap();
        invalid(sn.commit("c\0x", "c-active", none()), "name \"c\\0x\"");
        invalid(sn.alias("p", "p\0alias", None, none()), "name");
        invalid(sn.alias("p", "alias", Some("p\0q"), none()), "parent");
        let staging = sn.new_staging().unwrap();
        invalid(sn.commit_dir(&staging, "d\0e", None, none()), "name");
        invalid(sn.prepare("", None, none()), "key must not be empty");
        // Nothing was recorded or linked: the only snapshots are the two
        // made, and each is removable exactly when it has no child.
        let mut names: Vec<String> = sn.list().unwrap().into_iter().map(|i| i.name).collect();
        names.sort();
        assert_eq!(names, ["c-active", "p"]);
        assert!(matches!(
            sn.remove("p"),
            Err(Error::FailedPrecondition(m)) if m.contains("has children")
        ));
        sn.remove("c-active").unwrap();
        sn.remove("p").unwrap();
        assert!(sn.list().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(staging);
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn option<'a>(m: &'a Mount, prefix: &str) -> Option<&'a str> {
        m.options.iter().find_map(|o| o.strip_prefix(prefix))
    }

    // containerd's snapshotter model (snapshots.Snapshotter): Prepare on
    // nothing is a writable bind, on a committed parent an overlay with an
    // upper dir; View of one layer a read-only bind, of more a read-only
    // overlay; only active snapshots commit; mounts are for active or view
    // snapshots; keys are unique.
    #[test]
    fn prepare_view_commit_and_their_mounts_follow_containerds_model() {
        let root = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open(root.path()).unwrap();
        let none = BTreeMap::new;

        let m = sn.prepare("base-a", None, none()).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].kind, "bind");
        assert!(m[0].options.contains(&"rw".to_string()), "{m:?}");
        assert_eq!(sn.stat("base-a").unwrap().kind, Kind::Active);
        assert!(matches!(
            sn.prepare("base-a", None, none()),
            Err(Error::AlreadyExists(k)) if k == "base-a"
        ));
        sn.commit("base", "base-a", none()).unwrap();
        assert!(matches!(sn.stat("base-a"), Err(Error::NotFound(_))));
        let base = sn.stat("base").unwrap();
        assert_eq!((base.kind, base.parent.as_deref()), (Kind::Committed, None));
        assert!(matches!(
            sn.mounts("base"),
            Err(Error::FailedPrecondition(m)) if m.contains("committed")
        ));
        assert!(matches!(
            sn.commit("again", "base", none()),
            Err(Error::FailedPrecondition(m)) if m.contains("not active")
        ));

        // One layer viewed: a read-only bind of it.
        let v = sn.view("v1", Some("base"), none()).unwrap();
        assert_eq!(v[0].kind, "bind");
        assert!(v[0].options.contains(&"ro".to_string()));
        assert_eq!(
            v[0].source,
            sn.fs_dir("base").unwrap().display().to_string()
        );
        assert!(matches!(
            sn.commit("v1c", "v1", none()),
            Err(Error::FailedPrecondition(_))
        ));

        // Active on a parent: an overlay, the child's own dir as upper, the
        // parent as lower.
        let a = sn.prepare("top-a", Some("base"), none()).unwrap();
        assert_eq!(a[0].kind, "overlay");
        assert_eq!(
            option(&a[0], "upperdir="),
            Some(sn.fs_dir("top-a").unwrap().display().to_string().as_str())
        );
        assert!(option(&a[0], "workdir=").is_some());
        assert_eq!(
            option(&a[0], "lowerdir="),
            Some(sn.fs_dir("base").unwrap().display().to_string().as_str())
        );
        assert_eq!(sn.mounts("top-a").unwrap(), a, "Mounts repeats Prepare's");
        sn.commit("top", "top-a", none()).unwrap();

        // Two layers viewed: a read-only overlay, nearest layer first.
        let v = sn.view("v2", Some("top"), none()).unwrap();
        assert_eq!(v[0].kind, "overlay");
        assert!(option(&v[0], "upperdir=").is_none());
        let lower = format!(
            "{}:{}",
            sn.fs_dir("top").unwrap().display(),
            sn.fs_dir("base").unwrap().display()
        );
        assert_eq!(option(&v[0], "lowerdir="), Some(lower.as_str()));

        // Parents must exist and be committed.
        assert!(matches!(
            sn.prepare("orphan", Some("nothing"), none()),
            Err(Error::NotFound(p)) if p == "nothing"
        ));
        sn.prepare("mid-a", Some("top"), none()).unwrap();
        assert!(matches!(
            sn.prepare("on-active", Some("mid-a"), none()),
            Err(Error::FailedPrecondition(m)) if m.contains("not a committed")
        ));
        // A refused create leaves no directory and no record.
        let ids: Vec<String> = std::fs::read_dir(sn.root())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<u64>().is_ok())
            .collect();
        assert_eq!(ids.len(), sn.list().unwrap().len(), "{ids:?}");
    }

    // containerd's Update: only labels change; "" removes a label.
    #[test]
    fn update_changes_labels_only_and_empty_values_remove_them() {
        let root = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open(root.path()).unwrap();
        sn.prepare("k", None, labels(&[("a", "1"), ("b", "2")]))
            .unwrap();
        assert_eq!(
            sn.stat("k").unwrap().labels,
            labels(&[("a", "1"), ("b", "2")])
        );
        let i = sn
            .update("k", labels(&[("a", "9"), ("c", "3")]), &["labels.a".into()])
            .unwrap();
        assert_eq!(
            i.labels,
            labels(&[("a", "9"), ("b", "2")]),
            "only a changes"
        );
        let i = sn
            .update("k", labels(&[("b", "")]), &["labels.b".into()])
            .unwrap();
        assert_eq!(i.labels, labels(&[("a", "9")]), "an empty value removes b");
        let i = sn.update("k", labels(&[("z", "26")]), &[]).unwrap();
        assert_eq!(
            i.labels,
            labels(&[("z", "26")]),
            "no fields: all labels replaced"
        );
        assert!(i.updated >= i.created);
        assert!(matches!(
            sn.update("k", BTreeMap::new(), &["parent".into()]),
            Err(Error::InvalidArgument(m)) if m.contains("only labels")
        ));
        assert!(matches!(
            sn.update("none", BTreeMap::new(), &[]),
            Err(Error::NotFound(_))
        ));
        assert_eq!(sn.stat("k").unwrap().labels, labels(&[("z", "26")]));
    }

    // A layer committed from staging, then handed out under a second name
    // (what containerd's unpacker asks for): one directory until the last
    // name is removed. The table and counters survive a reopen.
    #[test]
    fn an_alias_shares_the_directory_until_the_last_name_goes() {
        let root = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open(root.path()).unwrap();
        let staging = sn.new_staging().unwrap();
        std::fs::write(staging.join("fs/file"), b"12345").unwrap();
        sn.commit_dir(&staging, "layer", None, labels(&[("x", "1")]))
            .unwrap();
        assert!(!staging.exists(), "the staging dir became the snapshot");
        let dir = sn.fs_dir("layer").unwrap();
        assert_eq!(std::fs::read(dir.join("file")).unwrap(), b"12345");
        let usage = sn.usage("layer").unwrap();
        assert!(
            usage.inodes >= 1 && usage.size > 0,
            "the file counts: {usage:?}"
        );
        let again = sn.new_staging().unwrap();
        assert!(matches!(
            sn.commit_dir(&again, "layer", None, BTreeMap::new()),
            Err(Error::AlreadyExists(_))
        ));
        let _ = std::fs::remove_dir_all(again);

        sn.alias("layer", "containerd-name", None, BTreeMap::new())
            .unwrap();
        assert_eq!(sn.fs_dir("containerd-name").unwrap(), dir);
        assert!(matches!(
            sn.alias("nothing", "n2", None, BTreeMap::new()),
            Err(Error::NotFound(_))
        ));
        sn.prepare("act", None, BTreeMap::new()).unwrap();
        assert!(matches!(
            sn.alias("act", "n3", None, BTreeMap::new()),
            Err(Error::FailedPrecondition(_))
        ));

        drop(sn);
        let sn = Snapshotter::open(root.path()).unwrap();
        let mut names: Vec<String> = sn.list().unwrap().into_iter().map(|i| i.name).collect();
        names.sort();
        assert_eq!(names, ["act", "containerd-name", "layer"]);
        sn.remove("layer").unwrap();
        assert!(dir.exists(), "another name still holds the layer");
        sn.remove("containerd-name").unwrap();
        assert!(!dir.exists(), "the last name took the layer with it");
        assert!(matches!(sn.remove("layer"), Err(Error::NotFound(_))));
        // New ids never reuse old ones (a removed layer's directory name).
        let id_of = |d: &Path| -> u64 {
            d.parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        };
        sn.prepare("next", None, BTreeMap::new()).unwrap();
        assert!(id_of(&sn.fs_dir("next").unwrap()) > id_of(&dir));
    }

    // Cleanup removes what no snapshot owns: numbered directories without
    // a record, and staging directories of processes that are gone.
    #[test]
    fn cleanup_removes_only_what_no_snapshot_or_live_process_owns() {
        let root = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open(root.path()).unwrap();
        sn.prepare("kept", None, BTreeMap::new()).unwrap();
        let kept = sn.fs_dir("kept").unwrap();
        std::fs::create_dir_all(sn.root().join("999/fs")).unwrap();
        let dead = sn
            .root()
            .join("staging")
            .join("999999999-1-00000000000000aa");
        std::fs::create_dir_all(&dead).unwrap();
        let removed = sn.root().join("staging").join("removed-77");
        std::fs::create_dir_all(&removed).unwrap();
        let live = sn.new_staging().unwrap();
        assert_eq!(sn.cleanup().unwrap(), 3);
        assert!(kept.exists() && live.exists());
        assert!(!sn.root().join("999").exists() && !dead.exists() && !removed.exists());
        assert_eq!(sn.cleanup().unwrap(), 0);
        let _ = std::fs::remove_dir_all(live);
    }
}
