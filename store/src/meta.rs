//! The metadata database (redb): the source of truth for image refs, blob
//! sizes and the references between blobs, and leases that protect what an
//! in-flight pull is writing from `gc`.
//!
//! redb lets one process hold a database file open at a time, and cstore runs
//! as several processes at once (two `cstore pull`s, a `gc`, the snapshotter).
//! So every operation opens the database, runs one transaction and closes it;
//! the open waits while another process holds it. Transactions are short (no
//! network or bulk I/O inside), so the wait is too.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadOnlyTable, ReadableTable, Table, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ingest::{sync_dir, IngestLock};
use crate::platform::Platform;

const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");

/// How long to wait for another process to let go of the database.
const OPEN_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorRecord {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The normalized reference, e.g. `docker.io/library/alpine:latest`.
    pub name: String,
    /// What the registry resolved the reference to: an index or a manifest.
    pub target: DescriptorRecord,
    /// The platform's manifest (equal to `target` for single-platform images).
    pub manifest: DescriptorRecord,
    pub config: DescriptorRecord,
    pub layers: Vec<DescriptorRecord>,
    pub platform: Platform,
    /// Seconds since the epoch when the ref was last written.
    pub updated: u64,
}

impl ImageRecord {
    /// Bytes of config and layers as stored (compressed).
    pub fn size(&self) -> u64 {
        self.config.size + self.layers.iter().map(|l| l.size).sum::<u64>()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlobRecord {
    pub size: u64,
    pub media_type: String,
    /// Digests this blob refers to (an index's manifests, a manifest's config
    /// and layers): the edges `gc` marks along.
    #[serde(default)]
    pub children: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Lease {
    pub pid: u32,
    /// The holder's start time (from /proc), so a reused pid is not mistaken
    /// for a live holder.
    pub pid_start: u64,
    pub created: u64,
    pub blobs: Vec<String>,
}

impl Lease {
    pub fn for_this_process() -> Self {
        let pid = std::process::id();
        Lease {
            pid,
            pid_start: process_start_time(pid).unwrap_or(0),
            created: now_unix(),
            blobs: Vec::new(),
        }
    }

    pub fn is_live(&self) -> bool {
        process_start_time(self.pid) == Some(self.pid_start)
    }
}

/// Field 22 of /proc/PID/stat: start time in clock ticks since boot.
pub fn process_start_time(pid: u32) -> Option<u64> {
    process_state(pid).map(|(_, start)| start)
}

/// Fields 3 and 22 of /proc/PID/stat: the state ('R', 'S', 'Z' for a
/// zombie, ...) and the start time.
pub fn process_state(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parens; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.nth(18)?.parse().ok()?))
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A redb file shared by processes (see the module docs): the store's
/// metadata and the snapshotter's.
///
/// Opening and closing redb is not free (a close writes the allocator state
/// durably), so an open database lingers for `LINGER` after its last
/// transaction: a burst of transactions (an unpack committing 100 layers, a
/// containerd pull's Prepare/Commit traffic) pays for one open, and another
/// process gets its turn as soon as this one pauses.
pub struct DbFile {
    path: PathBuf,
    /// Threads of one process take turns too: redb refuses a second open
    /// from the same process as well.
    open: Arc<Mutex<Option<Lingering>>>,
    /// The thread that closes an idle database. It starts before the first
    /// open returns and is joined on drop, never in between: a process that
    /// clones itself (libcontainer's clone3, which runs no atfork handlers)
    /// while another thread is starting or ending copies std's thread
    /// bookkeeping lock held, and the child deadlocks when it exits.
    reaper: Mutex<Option<JoinHandle<()>>>,
    /// Live `Hold`s; changed under the `open` lock, so the reaper sees them.
    holds: Arc<AtomicUsize>,
}

/// Keeps a DbFile's database from being closed (see `DbFile::hold`).
pub struct Hold<'a> {
    db: &'a DbFile,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut open = self.db.open.lock().unwrap_or_else(|p| p.into_inner());
        self.db.holds.fetch_sub(1, Ordering::SeqCst);
        // The linger starts over from here.
        if let Some(l) = open.as_mut() {
            l.last_used = Instant::now();
        }
    }
}

struct Lingering {
    db: Database,
    last_used: Instant,
}

/// How long an idle database stays open.
const LINGER: Duration = Duration::from_millis(20);

impl DbFile {
    /// Open (creating whole, if missing) the database file at `path`.
    pub fn open(path: &Path) -> Result<DbFile> {
        if !path.exists() {
            create_db_whole(path)?;
        }
        Ok(DbFile {
            path: path.to_path_buf(),
            open: Arc::new(Mutex::new(None)),
            reaper: Mutex::new(None),
            holds: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn err(&self, e: impl Into<redb::Error>) -> Error {
        Error::Db {
            path: self.path.clone(),
            message: e.into().to_string(),
        }
    }

    fn open_db(&self) -> Result<Database> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            match redb::Builder::new()
                .set_cache_size(8 << 20)
                .create(&self.path)
            {
                Ok(db) => return Ok(db),
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if started.elapsed() < OPEN_TIMEOUT =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(25));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(Error::Db {
                        path: self.path.clone(),
                        message: format!(
                            "still held by another cstore process after {}s",
                            OPEN_TIMEOUT.as_secs()
                        ),
                    })
                }
                Err(e) => return Err(self.err(e)),
            }
        }
    }

    /// Run `f` in one write transaction, committed only if `f` succeeds;
    /// then `after`, once the commit is durable but before any other process
    /// can open the database (for files that must change in commit order).
    /// `E` is the caller's error type, so other crates keep their own kinds.
    pub fn transact<T, U, E: From<Error>>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, E>,
        after: impl FnOnce(T) -> Result<U, E>,
    ) -> Result<U, E> {
        self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| self.err(e))?;
            let out = f(&txn)?;
            txn.commit().map_err(|e| self.err(e))?;
            after(out)
        })
    }

    /// Create the tables named `names` with `create` unless all of them
    /// exist already. A read transaction answers that, so opening an
    /// initialized database costs no durable commit.
    pub fn ensure_tables<E: From<Error>>(
        &self,
        names: &[&str],
        create: impl FnOnce(&redb::WriteTransaction) -> Result<(), E>,
    ) -> Result<(), E> {
        let present = self.read(|txn| {
            let have: Vec<String> = txn
                .list_tables()
                .map_err(|e| self.err(e))?
                .map(|t| t.name().to_string())
                .collect();
            Ok::<_, E>(names.iter().all(|n| have.iter().any(|h| h == n)))
        })?;
        if present {
            return Ok(());
        }
        self.transact(create, Ok)
    }

    /// A read-only transaction: a snapshot of the last commit, no commit of
    /// its own.
    pub fn read<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, E>,
    ) -> Result<T, E> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| self.err(e))?;
            f(&txn)
        })
    }

    fn with_db<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.is_none() {
            // The reaper gets going while the database opens.
            let reaper_started = self.start_reaper();
            let db = self.open_db();
            if let Some(started) = reaper_started {
                let _ = started.recv();
            }
            *open = Some(Lingering {
                db: db?,
                last_used: Instant::now(),
            });
        }
        let l = open.as_mut().expect("just opened");
        let out = f(&l.db);
        l.last_used = Instant::now();
        out
    }

    /// Spawn, once, the thread that closes the database once it has been
    /// idle for LINGER; it ends when the DbFile is dropped. Returns what the
    /// thread signals once it runs (its start is complete), if just spawned.
    fn start_reaper(&self) -> Option<mpsc::Receiver<()>> {
        let mut reaper = self.reaper.lock().unwrap_or_else(|p| p.into_inner());
        if reaper.is_some() {
            return None;
        }
        let weak = Arc::downgrade(&self.open);
        let holds = self.holds.clone();
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("cstore-db-linger".into())
            .spawn(move || {
                let _ = tx.send(());
                loop {
                    std::thread::park_timeout(LINGER / 2);
                    let Some(open) = weak.upgrade() else { return };
                    let mut g = open.lock().unwrap_or_else(|p| p.into_inner());
                    if holds.load(Ordering::SeqCst) == 0
                        && g.as_ref().is_some_and(|l| l.last_used.elapsed() >= LINGER)
                    {
                        *g = None;
                    }
                }
            })
            .expect("spawn the database reaper");
        *reaper = Some(handle);
        Some(rx)
    }

    /// Keep the database as it is (open or closed) until the guard drops:
    /// while held, the reaper does not close it, so no thread of ours is
    /// inside redb, allocating and syncing. For what must not overlap that:
    /// a container launch clones this process, and the child inherits any
    /// lock another thread holds at that instant. Waits out a close under
    /// way. Hold briefly: other processes wait for the file meanwhile.
    pub fn hold(&self) -> Hold<'_> {
        let _open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        self.holds.fetch_add(1, Ordering::SeqCst);
        Hold { db: self }
    }

    /// Close now if open (tests that hand the file to another process).
    pub fn close(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Drop for DbFile {
    /// Close the database here, not in the reaper, and end the reaper before
    /// returning (see `reaper`).
    fn drop(&mut self) {
        self.close();
        let open = std::mem::replace(&mut self.open, Arc::new(Mutex::new(None)));
        drop(open);
        let reaper = self.reaper.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = reaper.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

pub struct Meta {
    db: DbFile,
}

/// The tables of one write transaction.
pub struct Tables<'t> {
    images: Table<'t, &'static str, &'static [u8]>,
    blobs: Table<'t, &'static str, &'static [u8]>,
    leases: Table<'t, &'static str, &'static [u8]>,
    path: &'t Path,
}

impl Meta {
    pub fn open(path: &Path) -> Result<Meta> {
        let meta = Meta {
            db: DbFile::open(path)?,
        };
        // Create the tables once so readers never meet a missing table.
        let db = &meta.db;
        db.ensure_tables(&[IMAGES.name(), BLOBS.name(), LEASES.name()], |txn| {
            for t in [IMAGES, BLOBS, LEASES] {
                txn.open_table(t).map_err(|e| db.err(e))?;
            }
            Ok(())
        })?;
        Ok(meta)
    }

    /// See `DbFile::hold`.
    pub fn hold(&self) -> Hold<'_> {
        self.db.hold()
    }

    /// Run `f` on a read-only snapshot of the tables.
    pub fn read<T>(&self, f: impl FnOnce(&ReadTables<'_>) -> Result<T>) -> Result<T> {
        let db = &self.db;
        db.read(|txn| {
            let tables = ReadTables {
                images: txn.open_table(IMAGES).map_err(|e| db.err(e))?,
                blobs: txn.open_table(BLOBS).map_err(|e| db.err(e))?,
                leases: txn.open_table(LEASES).map_err(|e| db.err(e))?,
                path: db.path(),
            };
            f(&tables)
        })
    }

    /// Run `f` in one write transaction; it commits only if `f` succeeds.
    pub fn update<T>(&self, f: impl FnOnce(&mut Tables<'_>) -> Result<T>) -> Result<T> {
        self.update_then(f, Ok)
    }

    /// Like `update`, then runs `after` once the commit is durable but before
    /// any other process can open the database: for files derived from it
    /// (index.json) that must be written in the same order as the commits.
    pub fn update_then<T, U>(
        &self,
        f: impl FnOnce(&mut Tables<'_>) -> Result<T>,
        after: impl FnOnce(T) -> Result<U>,
    ) -> Result<U> {
        let db = &self.db;
        db.transact(
            |txn| {
                let mut tables = Tables {
                    images: txn.open_table(IMAGES).map_err(|e| db.err(e))?,
                    blobs: txn.open_table(BLOBS).map_err(|e| db.err(e))?,
                    leases: txn.open_table(LEASES).map_err(|e| db.err(e))?,
                    path: db.path(),
                };
                f(&mut tables)
            },
            after,
        )
    }
}

/// The tables of one read transaction: a snapshot of the last commit, at
/// no cost of a commit of its own.
pub struct ReadTables<'p> {
    images: ReadOnlyTable<&'static str, &'static [u8]>,
    blobs: ReadOnlyTable<&'static str, &'static [u8]>,
    leases: ReadOnlyTable<&'static str, &'static [u8]>,
    path: &'p Path,
}

/// Reading records, the same from a read or a write transaction.
pub trait View {
    #[doc(hidden)]
    fn raw_get(&self, which: Which, key: &str) -> Result<Option<Vec<u8>>>;
    #[doc(hidden)]
    fn raw_all(&self, which: Which) -> Result<Vec<(String, Vec<u8>)>>;
    #[doc(hidden)]
    fn db_path(&self) -> &Path;

    #[doc(hidden)]
    fn decode<T: DeserializeOwned>(&self, key: &str, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| Error::Db {
            path: self.db_path().to_path_buf(),
            message: format!("record {key:?} is corrupt: {e}"),
        })
    }
    #[doc(hidden)]
    fn get<T: DeserializeOwned>(&self, which: Which, key: &str) -> Result<Option<T>> {
        self.raw_get(which, key)?
            .map(|v| self.decode(key, &v))
            .transpose()
    }
    #[doc(hidden)]
    fn all<T: DeserializeOwned>(&self, which: Which) -> Result<Vec<(String, T)>> {
        self.raw_all(which)?
            .into_iter()
            .map(|(k, v)| Ok((k.clone(), self.decode(&k, &v)?)))
            .collect()
    }

    fn image(&self, name: &str) -> Result<Option<ImageRecord>> {
        self.get(Which::Images, name)
    }
    fn images(&self) -> Result<Vec<ImageRecord>> {
        Ok(self
            .all(Which::Images)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }
    fn blob(&self, digest: &str) -> Result<Option<BlobRecord>> {
        self.get(Which::Blobs, digest)
    }
    fn blobs(&self) -> Result<Vec<(String, BlobRecord)>> {
        self.all(Which::Blobs)
    }
    fn lease(&self, id: &str) -> Result<Option<Lease>> {
        self.get(Which::Leases, id)
    }
    fn leases(&self) -> Result<Vec<(String, Lease)>> {
        self.all(Which::Leases)
    }
}

fn raw_get_in(
    path: &Path,
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Vec<u8>>> {
    let err = |e: redb::StorageError| Error::Db {
        path: path.to_path_buf(),
        message: redb::Error::from(e).to_string(),
    };
    Ok(t.get(key).map_err(err)?.map(|v| v.value().to_vec()))
}

fn raw_all_in(
    path: &Path,
    t: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<(String, Vec<u8>)>> {
    let err = |e: redb::StorageError| Error::Db {
        path: path.to_path_buf(),
        message: redb::Error::from(e).to_string(),
    };
    let mut out = Vec::new();
    for item in t.iter().map_err(err)? {
        let (k, v) = item.map_err(err)?;
        out.push((k.value().to_string(), v.value().to_vec()));
    }
    Ok(out)
}

impl View for Tables<'_> {
    fn raw_get(&self, which: Which, key: &str) -> Result<Option<Vec<u8>>> {
        raw_get_in(self.path, self.table(which), key)
    }
    fn raw_all(&self, which: Which) -> Result<Vec<(String, Vec<u8>)>> {
        raw_all_in(self.path, self.table(which))
    }
    fn db_path(&self) -> &Path {
        self.path
    }
}

impl View for ReadTables<'_> {
    fn raw_get(&self, which: Which, key: &str) -> Result<Option<Vec<u8>>> {
        raw_get_in(self.path, self.table(which), key)
    }
    fn raw_all(&self, which: Which) -> Result<Vec<(String, Vec<u8>)>> {
        raw_all_in(self.path, self.table(which))
    }
    fn db_path(&self) -> &Path {
        self.path
    }
}

impl ReadTables<'_> {
    fn table(&self, which: Which) -> &ReadOnlyTable<&'static str, &'static [u8]> {
        match which {
            Which::Images => &self.images,
            Which::Blobs => &self.blobs,
            Which::Leases => &self.leases,
        }
    }
}

impl Tables<'_> {
    fn put<T: Serialize>(&mut self, which: Which, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).expect("records serialize");
        let path = self.path;
        let table = match which {
            Which::Images => &mut self.images,
            Which::Blobs => &mut self.blobs,
            Which::Leases => &mut self.leases,
        };
        table.insert(key, bytes.as_slice()).map_err(|e| Error::Db {
            path: path.to_path_buf(),
            message: redb::Error::from(e).to_string(),
        })?;
        Ok(())
    }

    fn remove(&mut self, which: Which, key: &str) -> Result<bool> {
        let path = self.path;
        let table = match which {
            Which::Images => &mut self.images,
            Which::Blobs => &mut self.blobs,
            Which::Leases => &mut self.leases,
        };
        let old = table.remove(key).map_err(|e| Error::Db {
            path: path.to_path_buf(),
            message: redb::Error::from(e).to_string(),
        })?;
        Ok(old.is_some())
    }

    fn table(&self, which: Which) -> &Table<'_, &'static str, &'static [u8]> {
        match which {
            Which::Images => &self.images,
            Which::Blobs => &self.blobs,
            Which::Leases => &self.leases,
        }
    }

    pub fn put_image(&mut self, image: &ImageRecord) -> Result<()> {
        self.put(Which::Images, &image.name.clone(), image)
    }
    pub fn remove_image(&mut self, name: &str) -> Result<bool> {
        self.remove(Which::Images, name)
    }
    pub fn put_blob(&mut self, digest: &str, blob: &BlobRecord) -> Result<()> {
        self.put(Which::Blobs, digest, blob)
    }
    pub fn remove_blob(&mut self, digest: &str) -> Result<bool> {
        self.remove(Which::Blobs, digest)
    }
    pub fn put_lease(&mut self, id: &str, lease: &Lease) -> Result<()> {
        self.put(Which::Leases, id, lease)
    }
    pub fn remove_lease(&mut self, id: &str) -> Result<bool> {
        self.remove(Which::Leases, id)
    }
}

/// Create an empty redb database at `path` under a temporary name and rename
/// it into place once initialized. redb writes its header last, so a process
/// killed while it created meta.db in place left a file that never opened
/// again ("invalid data"), and the store with it. Creators take turns on a
/// lock file; one killed midway leaves only the temporary file, which the
/// next one starts over.
pub(crate) fn create_db_whole(path: &Path) -> Result<()> {
    let lock = IngestLock::take(&path.with_extension("db.lock"))?;
    if !path.exists() {
        let tmp = path.with_extension("db.init");
        let _ = fs::remove_file(&tmp);
        let db = redb::Builder::new().create(&tmp).map_err(|e| Error::Db {
            path: tmp.clone(),
            message: redb::Error::from(e).to_string(),
        })?;
        drop(db);
        {
            use std::os::unix::fs::PermissionsExt;
            // Only root reads the store's files (see layout).
            fs::set_permissions(
                &tmp,
                fs::Permissions::from_mode(crate::layout::PRIVATE_FILE_MODE),
            )
            .map_err(|e| Error::io("chmod", &tmp, e))?;
        }
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("fsync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e))?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    lock.remove_and_release();
    Ok(())
}

#[doc(hidden)]
#[derive(Clone, Copy)]
pub enum Which {
    Images,
    Blobs,
    Leases,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_update_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(&dir.path().join("meta.db")).unwrap();
        let rec = BlobRecord {
            size: 3,
            media_type: "x".into(),
            children: vec![],
        };
        let r: Result<()> = meta.update(|t| {
            t.put_blob("sha256:a", &rec)?;
            Err(Error::ImageNotFound("boom".into()))
        });
        assert!(r.is_err());
        assert!(meta.update(|t| t.blob("sha256:a")).unwrap().is_none());
        meta.update(|t| t.put_blob("sha256:a", &rec)).unwrap();
        assert_eq!(
            meta.update(|t| t.blob("sha256:a")).unwrap().unwrap().size,
            3
        );
    }

    #[test]
    fn leases_know_if_their_process_lives() {
        let l = Lease::for_this_process();
        assert!(l.is_live());
        let dead = Lease {
            pid: l.pid,
            pid_start: l.pid_start + 1,
            ..l.clone()
        };
        assert!(!dead.is_live(), "same pid, other start time: a reused pid");
    }

    #[test]
    fn threads_of_one_process_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let meta = std::sync::Arc::new(Meta::open(&dir.path().join("meta.db")).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let meta = meta.clone();
                std::thread::spawn(move || {
                    let rec = BlobRecord {
                        size: i,
                        media_type: "x".into(),
                        children: vec![],
                    };
                    meta.update(|t| t.put_blob(&format!("sha256:{i}"), &rec))
                        .unwrap();
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(meta.update(|t| t.blobs()).unwrap().len(), 8);
    }
}
