//! The metadata database (redb): the source of truth for image refs, blob
//! sizes and the references between blobs, and leases that protect what an
//! in-flight pull is writing from `gc`. The file is a `cstore_os::db::DbFile`,
//! shared by processes (each transaction opens it, it lingers briefly).

use std::path::Path;

use cstore_os::db::{db_error, DbFile, Hold};
use cstore_os::{now_unix, Proc};
use redb::{ReadOnlyTable, ReadableTable, Table, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::platform::Platform;

/// What errors call meta.db.
const WHAT: &str = "metadata database";

const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const LAYER_INDEXES: TableDefinition<&str, &[u8]> = TableDefinition::new("layer_indexes");

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

/// A layer's seekable index (docs/lazy.md), kept while the layer is: `gc`
/// marks `index` and `windows` from every marked layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndexRecord {
    /// Digest of the index blob (`application/vnd.cstore.layer-index.v1`).
    pub index: String,
    pub index_size: u64,
    /// Digest of its windows blob, if its spans need windows.
    #[serde(default)]
    pub windows: Option<String>,
    #[serde(default)]
    pub windows_size: u64,
    /// The windows blob's digest in the registry, for an index found there
    /// (its windows are fetched by range with the spans that need them).
    #[serde(default)]
    pub remote_windows: Option<String>,
    /// Where it came from: "unpack", "build", "referrers", "estargz", "soci".
    pub origin: String,
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
        let me = Proc::current();
        Lease {
            pid: me.pid,
            pid_start: me.start,
            created: now_unix(),
            blobs: Vec::new(),
        }
    }

    /// Its process still exists (not a later one with the same pid).
    pub fn is_live(&self) -> bool {
        Proc {
            pid: self.pid,
            start: self.pid_start,
        }
        .exists()
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
    layer_indexes: Table<'t, &'static str, &'static [u8]>,
    path: &'t Path,
}

impl Meta {
    pub fn open(path: &Path) -> Result<Meta> {
        let meta = Meta {
            db: DbFile::open(path, WHAT)?,
        };
        // Create the tables once so readers never meet a missing table.
        let db = &meta.db;
        let names = [
            IMAGES.name(),
            BLOBS.name(),
            LEASES.name(),
            LAYER_INDEXES.name(),
        ];
        db.ensure_tables::<Error>(&names, |txn| {
            for t in [IMAGES, BLOBS, LEASES, LAYER_INDEXES] {
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

    /// See `DbFile::hold_closed`.
    pub fn hold_closed(&self) -> Hold<'_> {
        self.db.hold_closed()
    }

    /// See `DbFile::close_soon`.
    pub fn close_soon(&self) {
        self.db.close_soon()
    }

    /// Run `f` on a read-only snapshot of the tables.
    pub fn read<T>(&self, f: impl FnOnce(&ReadTables<'_>) -> Result<T>) -> Result<T> {
        let db = &self.db;
        db.read(|txn| {
            let tables = ReadTables {
                images: txn.open_table(IMAGES).map_err(|e| db.err(e))?,
                blobs: txn.open_table(BLOBS).map_err(|e| db.err(e))?,
                leases: txn.open_table(LEASES).map_err(|e| db.err(e))?,
                layer_indexes: txn.open_table(LAYER_INDEXES).map_err(|e| db.err(e))?,
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
                    layer_indexes: txn.open_table(LAYER_INDEXES).map_err(|e| db.err(e))?,
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
    layer_indexes: ReadOnlyTable<&'static str, &'static [u8]>,
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
        serde_json::from_slice(bytes).map_err(|e| {
            Error::Os(cstore_os::Error::Db {
                what: WHAT,
                path: self.db_path().to_path_buf(),
                message: format!("record {key:?} is corrupt: {e}"),
                kind: cstore_os::ErrorKind::DataLoss,
            })
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
    /// The index of the layer blob `digest`, if one is stored.
    fn layer_index(&self, digest: &str) -> Result<Option<LayerIndexRecord>> {
        self.get(Which::LayerIndexes, digest)
    }
    fn layer_indexes(&self) -> Result<Vec<(String, LayerIndexRecord)>> {
        self.all(Which::LayerIndexes)
    }
}

fn raw_get_in(
    path: &Path,
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Vec<u8>>> {
    let err = |e: redb::StorageError| Error::Os(db_error(WHAT, path, e.into()));
    Ok(t.get(key).map_err(err)?.map(|v| v.value().to_vec()))
}

fn raw_all_in(
    path: &Path,
    t: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<(String, Vec<u8>)>> {
    let err = |e: redb::StorageError| Error::Os(db_error(WHAT, path, e.into()));
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
            Which::LayerIndexes => &self.layer_indexes,
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
            Which::LayerIndexes => &mut self.layer_indexes,
        };
        table
            .insert(key, bytes.as_slice())
            .map_err(|e| Error::Os(db_error(WHAT, path, e.into())))?;
        Ok(())
    }

    fn remove(&mut self, which: Which, key: &str) -> Result<bool> {
        let path = self.path;
        let table = match which {
            Which::Images => &mut self.images,
            Which::Blobs => &mut self.blobs,
            Which::Leases => &mut self.leases,
            Which::LayerIndexes => &mut self.layer_indexes,
        };
        let old = table
            .remove(key)
            .map_err(|e| Error::Os(db_error(WHAT, path, e.into())))?;
        Ok(old.is_some())
    }

    fn table(&self, which: Which) -> &Table<'_, &'static str, &'static [u8]> {
        match which {
            Which::Images => &self.images,
            Which::Blobs => &self.blobs,
            Which::Leases => &self.leases,
            Which::LayerIndexes => &self.layer_indexes,
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
    pub fn put_layer_index(&mut self, layer: &str, rec: &LayerIndexRecord) -> Result<()> {
        self.put(Which::LayerIndexes, layer, rec)
    }
    pub fn remove_layer_index(&mut self, layer: &str) -> Result<bool> {
        self.remove(Which::LayerIndexes, layer)
    }
}

#[doc(hidden)]
#[derive(Clone, Copy)]
pub enum Which {
    Images,
    Blobs,
    Leases,
    LayerIndexes,
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
