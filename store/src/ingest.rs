//! Atomic, verified blob ingest.
//!
//! A blob is streamed to `ingest/<hex>.partial`, hashed as it is written, and
//! only when its size and digest check out is it fsynced and renamed into
//! `blobs/sha256/<hex>`. So a file under blobs/ is always whole and correct.
//!
//! Writers of one digest (threads or processes) serialize on an flock of
//! `ingest/<hex>.lock`: the second one waits, then finds the blob present. A
//! partial left by a killed writer is picked up by the next one: its bytes are
//! hashed again and the download resumes from its end (an HTTP Range request).

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cstore_blockio::{Mode, Policy, SeqReader, SeqWriter, StreamConfig};
use oci_spec::image::Digest;
use sha2::{Digest as _, Sha256};

use cstore_os::{sync_dir, FileLock, IoError};

use crate::error::{write_err, Error, Result};

/// Where blobs live and where they are written before they get there.
#[derive(Clone, Debug)]
pub struct BlobDirs {
    pub blobs: PathBuf,
    pub ingest: PathBuf,
    /// How blob files are streamed: from the policy of the device under
    /// `blobs`, probed once, on first use.
    io: Arc<OnceLock<StreamConfig>>,
}

impl BlobDirs {
    pub fn new(blobs: PathBuf, ingest: PathBuf) -> BlobDirs {
        BlobDirs {
            blobs,
            ingest,
            io: Arc::default(),
        }
    }

    /// The stream settings for blob files: the policy of the device holding
    /// the store (`cstore device info` shows it), probed on first use.
    pub fn stream_config(&self) -> &StreamConfig {
        self.io.get_or_init(|| {
            // CSTORE_IO=sync: plain syscalls, to compare or where io_uring misbehaves.
            let mode = Mode::from_env();
            // No NVMe identify: sysfs says enough for streaming, and it
            // needs no access to the device node.
            match cstore_blockio::probe::probe_opts(&self.blobs, false) {
                Ok(info) => StreamConfig::from_policy(&Policy::for_device_here(&info), mode),
                Err(e) => {
                    tracing::warn!(path = %self.blobs.display(), error = %e, "could not probe the store's device; default I/O settings");
                    StreamConfig {
                        mode,
                        ..StreamConfig::default()
                    }
                }
            }
        })
    }

    /// Stream a blob file (or any file of the store) with readahead.
    pub fn open_reader(&self, path: &Path) -> std::io::Result<SeqReader> {
        SeqReader::open(path, self.stream_config())
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.digest())
    }

    /// Present means whole: only verified files are ever renamed into blobs/.
    pub fn is_present(&self, digest: &Digest, size: u64) -> bool {
        fs::metadata(self.blob_path(digest)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Take the ingest lock for `digest`. Returns `Present` if the blob is
    /// (or, after waiting for another writer, has become) present.
    pub fn acquire(&self, digest: &Digest, size: u64) -> Result<Acquired> {
        if self.is_present(digest, size) {
            return Ok(Acquired::Present);
        }
        let hex = digest.digest();
        let lock = FileLock::take(&self.ingest.join(format!("{hex}.lock")))?;
        if self.is_present(digest, size) {
            lock.release();
            return Ok(Acquired::Present);
        }
        let partial = self.ingest.join(format!("{hex}.partial"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(|e| write_err(digest.as_ref(), &partial, e))?;
        let mut hasher = Sha256::new();
        let mut have = file
            .metadata()
            .map_err(|e| IoError::new("stat", &partial, e))?
            .len();
        if have > size {
            // Not a prefix of this blob: start over.
            file.set_len(0)
                .map_err(|e| IoError::new("truncate", &partial, e))?;
            have = 0;
        }
        if have > 0 {
            // Resume: the hash state is not saved, so re-read what is there.
            let clone = file
                .try_clone()
                .map_err(|e| IoError::new("open", &partial, e))?;
            let reader = SeqReader::new(clone, 0, self.stream_config())
                .map_err(|e| IoError::new("read", &partial, e))?;
            let n = std::io::copy(&mut reader.take(have), &mut hasher)
                .map_err(|e| IoError::new("read", &partial, e))?;
            have = n;
        }
        Ok(Acquired::Writer(Box::new(BlobWriter {
            digest: digest.clone(),
            size,
            written: have,
            resumed_from: have,
            hasher,
            file: SeqWriter::new(file, have, self.stream_config()),
            partial,
            blob: self.blob_path(digest),
            blobs_dir: self.blobs.clone(),
            lock: Some(lock),
        })))
    }

    /// Remove the partial download of `digest` once no writer holds it,
    /// waiting up to `wait` for one to let go: a pull's own cancelled
    /// downloads wind down in moments, another process's is left alone.
    /// Returns whether a partial was removed.
    pub fn discard_partial(&self, digest: &Digest, wait: Duration) -> Result<bool> {
        let hex = digest.digest();
        let lock_path = self.ingest.join(format!("{hex}.lock"));
        let partial = self.ingest.join(format!("{hex}.partial"));
        let deadline = Instant::now() + wait;
        loop {
            if !partial.exists() {
                return Ok(false);
            }
            if let Some(lock) = FileLock::try_take(&lock_path)? {
                let removed = fs::remove_file(&partial).is_ok();
                lock.remove_and_release();
                return Ok(removed);
            }
            if !lock_path.exists() {
                // No lock file: no writer (as in Store::gc).
                return Ok(fs::remove_file(&partial).is_ok());
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Store a blob already in memory (manifests, configs), verified.
    pub fn put_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        match self.acquire(digest, bytes.len() as u64)? {
            Acquired::Present => Ok(()),
            Acquired::Writer(mut w) => {
                w.reset()?;
                w.write(bytes)?;
                w.commit()
            }
        }
    }
}

pub enum Acquired {
    Present,
    Writer(Box<BlobWriter>),
}

pub struct BlobWriter {
    digest: Digest,
    size: u64,
    written: u64,
    resumed_from: u64,
    hasher: Sha256,
    /// Writes in flight through the writing thread's own ring.
    file: SeqWriter,
    partial: PathBuf,
    blob: PathBuf,
    blobs_dir: PathBuf,
    lock: Option<FileLock>,
}

impl BlobWriter {
    /// Bytes already held: where a download resumes.
    pub fn offset(&self) -> u64 {
        self.written
    }

    /// Bytes that were found in a partial file left by an earlier writer.
    pub fn resumed_from(&self) -> u64 {
        self.resumed_from
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Drop what is held and start from byte 0 (the server ignored Range).
    pub fn reset(&mut self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| write_err(self.digest.as_ref(), &self.partial, e))?;
        self.file
            .get_ref()
            .set_len(0)
            .map_err(|e| IoError::new("truncate", &self.partial, e))?;
        self.file
            .seek_to(0)
            .map_err(|e| IoError::new("seek", &self.partial, e))?;
        self.hasher = Sha256::new();
        self.written = 0;
        Ok(())
    }

    pub fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.check_room(buf.len())?;
        if let Err(e) = self.file.write_all(buf) {
            let err = write_err(self.digest.as_ref(), &self.partial, e);
            return Err(self.discard_if_no_space(err));
        }
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        Ok(())
    }

    /// As `write`, handing the buffer itself to the kernel (no copy).
    pub fn write_bytes(&mut self, buf: Bytes) -> Result<()> {
        self.check_room(buf.len())?;
        self.hasher.update(&buf);
        let n = buf.len() as u64;
        if let Err(e) = self.file.write_bytes(buf) {
            let err = write_err(self.digest.as_ref(), &self.partial, e);
            return Err(self.discard_if_no_space(err));
        }
        self.written += n;
        Ok(())
    }

    /// A write past the descriptor's size stops before it is written.
    fn check_room(&mut self, len: usize) -> Result<()> {
        if self.written + len as u64 > self.size {
            let err = Error::SizeMismatch {
                digest: self.digest.to_string(),
                expected: self.size,
                actual: self.written + len as u64,
            };
            return Err(self.discard_with(err));
        }
        Ok(())
    }

    /// Hand what is buffered to the file, so a process killed after this
    /// leaves those bytes in the partial for the next pull to resume from.
    pub fn flush(&mut self) -> Result<()> {
        if let Err(e) = self.file.flush() {
            let err = write_err(self.digest.as_ref(), &self.partial, e);
            return Err(self.discard_if_no_space(err));
        }
        Ok(())
    }

    /// Verify, make durable, and publish under blobs/.
    pub fn commit(mut self) -> Result<()> {
        if self.written != self.size {
            let err = Error::SizeMismatch {
                digest: self.digest.to_string(),
                expected: self.size,
                actual: self.written,
            };
            return Err(self.discard_with(err));
        }
        let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if actual != self.digest.as_ref() {
            let err = Error::DigestMismatch {
                digest: self.digest.to_string(),
                actual,
            };
            return Err(self.discard_with(err));
        }
        // Phase markers (CSTORE_LOG=cstore_store=debug): the kill-point test
        // tells from them where a SIGKILL landed.
        tracing::debug!(blob = %self.digest, "verified");
        if let Err(e) = self.file.sync_all() {
            let err = write_err(self.digest.as_ref(), &self.partial, e);
            return Err(self.discard_if_no_space(err));
        }
        fs::rename(&self.partial, &self.blob).map_err(|e| IoError::new("rename", &self.blob, e))?;
        sync_dir(&self.blobs_dir)?;
        tracing::debug!(blob = %self.digest, "renamed into blobs/");
        if let Some(lock) = self.lock.take() {
            lock.remove_and_release();
        }
        Ok(())
    }

    /// Remove the partial file (it can't become this blob) and return `err`.
    fn discard_with(&mut self, err: Error) -> Error {
        let _ = fs::remove_file(&self.partial);
        err
    }

    fn discard_if_no_space(&mut self, err: Error) -> Error {
        if matches!(err, Error::NoSpace { .. }) {
            self.discard_with(err)
        } else {
            err
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Abandoned (cancelled or failed mid-stream): keep the bytes so the
        // next pull resumes, and let the next writer in.
        let _ = self.file.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cstore_registry::parse_digest;

    fn dirs() -> (tempfile::TempDir, BlobDirs) {
        let t = tempfile::tempdir().unwrap();
        let d = BlobDirs::new(t.path().join("blobs"), t.path().join("ingest"));
        fs::create_dir_all(&d.blobs).unwrap();
        fs::create_dir_all(&d.ingest).unwrap();
        (t, d)
    }

    fn digest_of(b: &[u8]) -> Digest {
        parse_digest(&format!("sha256:{}", hex::encode(Sha256::digest(b)))).unwrap()
    }

    #[test]
    fn verified_blob_lands_and_bad_one_never_does() {
        let (_t, d) = dirs();
        let good = b"hello blob";
        let dg = digest_of(good);
        d.put_bytes(&dg, good).unwrap();
        assert_eq!(fs::read(d.blob_path(&dg)).unwrap(), good);
        assert!(d.is_present(&dg, good.len() as u64));

        let claimed = digest_of(b"something else!");
        let e = d.put_bytes(&claimed, b"tampered bytes!").unwrap_err();
        assert!(
            matches!(e, Error::DigestMismatch { ref digest, .. } if digest == claimed.as_ref()),
            "{e}"
        );
        assert!(!d.blob_path(&claimed).exists());
        assert_eq!(
            fs::read_dir(&d.ingest)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "partial"))
                .count(),
            0
        );
    }

    #[test]
    fn too_long_stream_is_refused_before_it_is_written() {
        let (_t, d) = dirs();
        let dg = digest_of(b"abc");
        let Acquired::Writer(mut w) = d.acquire(&dg, 3).unwrap() else {
            panic!()
        };
        let e = w.write(b"abcd").unwrap_err();
        assert!(
            matches!(
                e,
                Error::SizeMismatch {
                    expected: 3,
                    actual: 4,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn abandoned_partial_resumes_with_its_hash_state() {
        let (_t, d) = dirs();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let dg = digest_of(&data);
        {
            let Acquired::Writer(mut w) = d.acquire(&dg, data.len() as u64).unwrap() else {
                panic!()
            };
            w.write(&data[..1_234_567]).unwrap();
            // dropped: as if the connection died or the process was cancelled
        }
        let Acquired::Writer(mut w) = d.acquire(&dg, data.len() as u64).unwrap() else {
            panic!()
        };
        assert_eq!(w.offset(), 1_234_567);
        assert_eq!(w.resumed_from(), 1_234_567);
        w.write(&data[1_234_567..]).unwrap();
        w.commit().unwrap();
        assert!(d.is_present(&dg, data.len() as u64));
        assert!(matches!(
            d.acquire(&dg, data.len() as u64).unwrap(),
            Acquired::Present
        ));
    }

    #[test]
    fn second_writer_waits_then_finds_the_blob() {
        let (_t, d) = dirs();
        let data = vec![7u8; 100_000];
        let dg = digest_of(&data);
        let Acquired::Writer(mut w) = d.acquire(&dg, data.len() as u64).unwrap() else {
            panic!()
        };
        let (d2, dg2) = (d.clone(), dg.clone());
        let waiter = std::thread::spawn(move || {
            matches!(d2.acquire(&dg2, 100_000).unwrap(), Acquired::Present)
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !waiter.is_finished(),
            "the second writer must wait for the lock"
        );
        w.write(&data).unwrap();
        w.commit().unwrap();
        assert!(waiter.join().unwrap());
    }
}
