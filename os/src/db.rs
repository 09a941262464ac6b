//! A redb database file shared by processes (feature `db`).
//!
//! redb lets one process hold a database file open at a time, and cstore runs
//! as several processes at once (two `cstore pull`s, a `gc`, the snapshotter).
//! So every operation opens the database, runs one transaction and closes it
//! (after a short linger); the open waits while another process holds it.
//! Transactions are short (no network or bulk I/O inside), so the wait is too.
//! The store's metadata (meta.db) and the snapshotter's (snapshots/metadata.db)
//! are both such files.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, TableHandle};

use crate::error::{Error, ErrorKind, IoResultExt, Result};
use crate::file::{sync_dir, FileLock};

/// How long to wait for another process to let go of the database.
const OPEN_TIMEOUT: Duration = Duration::from_secs(120);

/// A redb file shared by processes (see the module docs).
///
/// Opening and closing redb is not free (a close writes the allocator state
/// durably), so an open database lingers for `LINGER` after its last
/// transaction: a burst of transactions (an unpack committing 100 layers, a
/// containerd pull's Prepare/Commit traffic) pays for one open, and another
/// process gets its turn as soon as this one pauses.
pub struct DbFile {
    path: PathBuf,
    /// What the file is, for errors ("metadata database").
    what: &'static str,
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
    /// Commits save redb's allocator state (see `commits_before_close`).
    quick_repair: AtomicBool,
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
    /// Open (creating whole, if missing) the database file at `path`;
    /// `what` names it in errors ("metadata database").
    pub fn open(path: &Path, what: &'static str) -> Result<DbFile> {
        if !path.exists() {
            create_db_whole(path, what)?;
        }
        Ok(DbFile {
            path: path.to_path_buf(),
            what,
            open: Arc::new(Mutex::new(None)),
            reaper: Mutex::new(None),
            holds: Arc::new(AtomicUsize::new(0)),
            quick_repair: AtomicBool::new(false),
        })
    }

    /// For a process whose every write transaction is soon followed by a
    /// close (`cstore run`: the prepare, then the close before the launch;
    /// the removal, then the exit): each commit also saves redb's allocator
    /// state (redb's quick repair: a two-phase commit, two syncs instead of
    /// one), so the close after it writes no commit of its own (two syncs
    /// instead of four). As durable as a plain commit, and a crash after it
    /// needs only the quick repair at the next open. A process making
    /// several commits per open (an unpack, the snapshotter plugin) pays
    /// one sync more per commit for it: leave it off there.
    pub fn commits_before_close(&self, on: bool) {
        self.quick_repair.store(on, Ordering::Relaxed);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A redb error of this file, with its kind (an io error's from its
    /// errno: a full disk is ResourceExhausted).
    pub fn err(&self, e: impl Into<redb::Error>) -> Error {
        db_error(self.what, &self.path, e.into())
    }

    /// An error about this file that redb did not raise (a corrupt record).
    pub fn corrupt(&self, message: String) -> Error {
        Error::Db {
            what: self.what,
            path: self.path.clone(),
            message,
            kind: ErrorKind::DataLoss,
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
                        what: self.what,
                        path: self.path.clone(),
                        message: format!(
                            "still held by another cstore process after {}s",
                            OPEN_TIMEOUT.as_secs()
                        ),
                        kind: ErrorKind::Unavailable,
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
            let mut txn = db.begin_write().map_err(|e| self.err(e))?;
            if self.quick_repair.load(Ordering::Relaxed) {
                txn.set_quick_repair(true);
            }
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

    /// Close the database now if it is open, and keep it closed until the
    /// guard drops (as `hold`, which keeps it as it is). For a container
    /// launch: the clone must not overlap a close in the reaper, and while
    /// this process waits for its container to start, other processes
    /// (`cstore run`s started at the same time) can have the file; holding
    /// it open through the start serialized their starts behind ours.
    pub fn hold_closed(&self) -> Hold<'_> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        *open = None;
        self.holds.fetch_add(1, Ordering::SeqCst);
        Hold { db: self }
    }

    /// Have the reaper close the database now rather than after the linger
    /// (in the background, if no hold keeps it): for a process done with it
    /// for a while, so that others waiting for the file get it sooner.
    pub fn close_soon(&self) {
        {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = open.as_mut() {
                l.last_used = Instant::now().checked_sub(LINGER).unwrap_or(l.last_used);
            }
        }
        if let Some(h) = self
            .reaper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            h.thread().unpark();
        }
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

/// Create an empty redb database at `path` under a temporary name and rename
/// it into place once initialized. redb writes its header last, so a process
/// killed while it created meta.db in place left a file that never opened
/// again ("invalid data"), and the store with it. Creators take turns on a
/// lock file; one killed midway leaves only the temporary file, which the
/// next one starts over.
fn create_db_whole(path: &Path, what: &'static str) -> Result<()> {
    let lock = FileLock::take(&path.with_extension("db.lock"))?;
    if !path.exists() {
        let tmp = path.with_extension("db.init");
        let _ = fs::remove_file(&tmp);
        let db = redb::Builder::new()
            .create(&tmp)
            .map_err(|e| db_error(what, &tmp, e.into()))?;
        drop(db);
        {
            use std::os::unix::fs::PermissionsExt;
            // Only root reads the store's files (see layout).
            fs::set_permissions(
                &tmp,
                fs::Permissions::from_mode(crate::layout::PRIVATE_FILE_MODE),
            )
            .op("chmod", &tmp)?;
        }
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .op("fsync", &tmp)?;
        fs::rename(&tmp, path).op("rename", path)?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    lock.remove_and_release();
    Ok(())
}

/// A redb error of the database file `what` at `path`, with its kind.
pub fn db_error(what: &'static str, path: &Path, e: redb::Error) -> Error {
    let kind = match &e {
        redb::Error::Io(io) => ErrorKind::of_io(io),
        redb::Error::Corrupted(_) | redb::Error::UpgradeRequired(_) => ErrorKind::DataLoss,
        redb::Error::DatabaseAlreadyOpen => ErrorKind::Unavailable,
        redb::Error::ValueTooLarge(_) => ErrorKind::ResourceExhausted,
        _ => ErrorKind::Unknown,
    };
    Error::Db {
        what,
        path: path.to_path_buf(),
        message: e.to_string(),
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableTableMetadata, TableDefinition};

    const T: TableDefinition<&str, u64> = TableDefinition::new("t");

    #[test]
    fn failed_transactions_commit_nothing_and_threads_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(DbFile::open(&dir.path().join("x.db"), "test database").unwrap());
        db.ensure_tables::<Error>(&["t"], |txn| {
            txn.open_table(T).map(drop).map_err(|e| db.err(e))
        })
        .unwrap();
        let r: Result<()> = db.transact(
            |txn| {
                txn.open_table(T).unwrap().insert("a", 1).unwrap();
                Err(db.corrupt("boom".into()))
            },
            Ok,
        );
        assert_eq!(r.unwrap_err().kind(), ErrorKind::DataLoss);
        let handles: Vec<_> = (0..8u64)
            .map(|i| {
                let db = db.clone();
                std::thread::spawn(move || {
                    db.transact::<_, _, Error>(
                        |txn| {
                            let mut t = txn.open_table(T).map_err(|e| db.err(e))?;
                            t.insert(format!("k{i}").as_str(), i)
                                .map_err(|e| db.err(e))?;
                            Ok(())
                        },
                        Ok,
                    )
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        let n = db
            .read::<_, Error>(|txn| {
                let t = txn.open_table(T).map_err(|e| db.err(e))?;
                assert!(t.get("a").unwrap().is_none(), "the failed one left nothing");
                Ok(t.len().unwrap())
            })
            .unwrap();
        assert_eq!(n, 8);
        let e = db.err(redb::Error::Io(std::io::Error::from_raw_os_error(
            libc::ENOSPC,
        )));
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        assert!(e.to_string().starts_with("test database "), "{e}");
    }

    /// A held database is free for another opener only with `hold_closed`:
    /// `hold` right after a transaction keeps it open (as `cstore run` did
    /// through a container's start, so concurrent runs waited for it), and
    /// `hold_closed` closes it first and keeps it closed until dropped.
    #[test]
    fn hold_closed_lets_another_opener_in_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let db = DbFile::open(&path, "test database").unwrap();
        let create = |db: &DbFile| {
            db.ensure_tables::<Error>(&["t"], |txn| {
                txn.open_table(T).map(drop).map_err(|e| db.err(e))
            })
        };
        let other_open = || match redb::Builder::new().create(&path) {
            Ok(d) => {
                drop(d);
                true
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => false,
            Err(e) => panic!("{e}"),
        };
        {
            let _h = db.hold();
            // Opened under the hold: the reaper cannot close it meanwhile.
            create(&db).unwrap();
            assert!(!other_open(), "hold keeps the database as it is: open");
        }
        {
            let _h = db.hold_closed();
            // Longer than the linger: the reaper leaves a held file alone.
            std::thread::sleep(LINGER * 3);
            assert!(other_open(), "hold_closed closes it");
            assert!(other_open(), "and keeps it closed while held");
        }
        // Usable again after the hold.
        create(&db).unwrap();
    }

    /// What `commits_before_close` changes is safe: a process that commits
    /// that way and dies before its close (here: `_exit` right after the
    /// commit, the database never closed) leaves a file the next opener
    /// opens (redb's quick repair, from the allocator state the commit
    /// saved) with the commit in it and room for more; and a clean close
    /// after such a commit keeps it too. The dying process is this test
    /// binary again, run for `crash_child` only.
    #[test]
    fn a_commit_before_close_survives_a_process_dying_before_the_close() {
        if let Ok(path) = std::env::var(CRASH_CHILD) {
            crash_child(Path::new(&path));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let create = |db: &DbFile| {
            db.ensure_tables::<Error>(&["t"], |txn| {
                txn.open_table(T).map(drop).map_err(|e| db.err(e))
            })
        };
        {
            let db = DbFile::open(&path, "test database").unwrap();
            create(&db).unwrap();
            db.commits_before_close(true);
            put(&db, "clean", 1);
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "db::tests::a_commit_before_close_survives_a_process_dying_before_the_close",
                "--nocapture",
            ])
            .env(CRASH_CHILD, &path)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(CRASH_CODE),
            "the child commits and dies: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let db = DbFile::open(&path, "test database").unwrap();
        db.commits_before_close(true);
        put(&db, "after", 3);
        let got = db
            .read::<_, Error>(|txn| {
                let t = txn.open_table(T).map_err(|e| db.err(e))?;
                Ok(["clean", "crashed", "after"].map(|k| t.get(k).unwrap().map(|v| v.value())))
            })
            .unwrap();
        assert_eq!(got, [Some(1), Some(2), Some(3)]);
    }

    const CRASH_CHILD: &str = "CSTORE_TEST_DB_CRASH_CHILD";
    const CRASH_CODE: i32 = 42;

    fn put(db: &DbFile, k: &str, v: u64) {
        db.transact::<_, _, Error>(
            |txn| {
                let mut t = txn.open_table(T).map_err(|e| db.err(e))?;
                t.insert(k, v).map_err(|e| db.err(e))?;
                Ok(())
            },
            Ok,
        )
        .unwrap()
    }

    /// Commit before close, then die without closing (no destructor runs).
    fn crash_child(path: &Path) -> ! {
        let db = DbFile::open(path, "test database").unwrap();
        db.commits_before_close(true);
        put(&db, "crashed", 2);
        // SAFETY: ends this process at once, as a crash would.
        unsafe { libc::_exit(CRASH_CODE) }
    }
}
