//! SeqWriter and SeqReader on both backends (io_uring and plain syscalls):
//! exact bytes, owned buffers, offsets, EOF and short files, O_DIRECT with an
//! unaligned tail, and errors (a full tmpfs, a read that fails).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cstore_blockio::{Backend, Mode, SeqReader, SeqWriter, StreamConfig};

fn configs() -> Vec<(StreamConfig, Backend)> {
    let small = |mode| StreamConfig {
        io_size: 64 << 10,
        depth: 3,
        direct: false,
        reuse_cached: false,
        mode,
        batch_small_files: false,
        max_streams: None,
    };
    vec![
        (small(Mode::Auto), Backend::IoUring),
        (small(Mode::Sync), Backend::Sync),
    ]
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn rw_file(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}

#[test]
fn writer_mixes_copied_and_owned_chunks_exactly() {
    for (cfg, backend) in configs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let data = pattern(3_000_017, 1);
        let mut w = SeqWriter::new(rw_file(&path), 0, &cfg);
        assert_eq!(w.backend(), backend, "io_uring is available here");
        // Chunk sizes that straddle io_size and the small-chunk threshold.
        let sizes = [1usize, 100, 4095, 4096, 16_384, 65_535, 65_536, 200_000];
        let (mut at, mut i) = (0, 0);
        while at < data.len() {
            let n = sizes[i % sizes.len()].min(data.len() - at);
            if i % 2 == 0 {
                w.write_all(&data[at..at + n]).unwrap();
            } else {
                w.write_bytes(Bytes::copy_from_slice(&data[at..at + n]))
                    .unwrap();
            }
            at += n;
            i += 1;
        }
        assert_eq!(w.position(), data.len() as u64);
        w.sync_all().unwrap();
        drop(w);
        assert!(
            fs::read(&path).unwrap() == data,
            "{backend:?}: bytes differ"
        );
    }
}

#[test]
fn writer_continues_at_an_offset_and_after_seek_to() {
    for (cfg, backend) in configs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        fs::write(&path, b"0123456789").unwrap();
        let mut w = SeqWriter::new(rw_file(&path), 10, &cfg);
        w.write_all(b"abc").unwrap();
        w.flush().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"0123456789abc", "{backend:?}");
        w.get_ref().set_len(0).unwrap();
        w.seek_to(0).unwrap();
        let big = pattern(500_000, 2);
        w.write_bytes(Bytes::from(big.clone())).unwrap();
        let f = w.into_file().unwrap();
        drop(f);
        assert!(fs::read(&path).unwrap() == big, "{backend:?}");
    }
}

/// A tmpfs of `kib` KiB mounted on a temp dir, unmounted when dropped.
struct TinyTmpfs {
    dir: tempfile::TempDir,
}

impl TinyTmpfs {
    fn mount(kib: u32) -> TinyTmpfs {
        let dir = tempfile::tempdir().unwrap();
        let c = |s: &str| CString::new(s).unwrap();
        let target = c(dir.path().to_str().unwrap());
        let opts = c(&format!("size={kib}k"));
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c("tmpfs").as_ptr(),
                target.as_ptr(),
                c("tmpfs").as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mounting a tmpfs (the tests run as root): {}",
            std::io::Error::last_os_error()
        );
        TinyTmpfs { dir }
    }
    fn path(&self) -> PathBuf {
        self.dir.path().join("f")
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.dir.path().to_str().unwrap()).unwrap();
        // SAFETY: a valid path; detach so an open file cannot keep it busy.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn writer_reports_a_full_disk_on_a_later_call_and_keeps_reporting_it() {
    for (cfg, backend) in configs() {
        let fs = TinyTmpfs::mount(256);
        let mut w = SeqWriter::new(rw_file(&fs.path()), 0, &cfg);
        let chunk = Bytes::from(pattern(100_000, 3));
        let mut failed = None;
        for _ in 0..10 {
            if let Err(e) = w.write_bytes(chunk.clone()) {
                failed = Some(e);
                break;
            }
        }
        let e = match failed {
            Some(e) => e,
            None => w.flush().unwrap_err(),
        };
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{backend:?}: {e}");
        // Sticky: nothing after a lost write may look like success.
        let again = w.sync_all().unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::ENOSPC), "{backend:?}");
        drop(w);
        // What made it is a prefix of what was written: 256 KiB of room.
        let held = fs::read(fs.path()).unwrap();
        assert!(held.len() <= 256 << 10);
        let whole: Vec<u8> = (0..10).flat_map(|_| chunk.iter().copied()).collect();
        assert!(held[..] == whole[..held.len()], "{backend:?}");
    }
}

fn read_all_in_steps(r: &mut SeqReader, step: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0; step];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn reader_returns_exact_bytes_for_any_length_and_step() {
    for (cfg, backend) in configs() {
        let dir = tempfile::tempdir().unwrap();
        for (len, step) in [
            (0usize, 10usize),
            (1, 7),
            (65_536, 65_536),
            (65_537, 4096),
            (1_000_003, 333),
            (1_000_003, 1 << 20),
        ] {
            let path = dir.path().join(format!("in{len}"));
            let data = pattern(len, len as u32);
            fs::write(&path, &data).unwrap();
            let mut r = SeqReader::open(&path, &cfg).unwrap();
            assert_eq!(r.backend(), backend);
            let got = read_all_in_steps(&mut r, step);
            assert!(got == data, "{backend:?} len {len} step {step}");
            // At the end it stays at the end.
            assert_eq!(r.read(&mut [0; 8]).unwrap(), 0);
        }
    }
}

#[test]
fn reader_lends_its_buffers_and_starts_at_an_offset() {
    for (cfg, backend) in configs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        let data = pattern(300_001, 5);
        fs::write(&path, &data).unwrap();
        let mut r = SeqReader::new(File::open(&path).unwrap(), 12_345, &cfg).unwrap();
        let mut got = Vec::new();
        loop {
            let b = r.fill_buf().unwrap();
            if b.is_empty() {
                break;
            }
            let n = b.len().min(50_000);
            got.extend_from_slice(&b[..n]);
            r.consume(n);
        }
        assert!(got[..] == data[12_345..], "{backend:?}");
    }
}

#[test]
fn reader_stops_where_a_shrunk_file_ends() {
    for (cfg, backend) in configs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        let data = pattern(1 << 20, 6);
        fs::write(&path, &data).unwrap();
        let mut r = SeqReader::open(&path, &cfg).unwrap();
        let mut first = vec![0; 1000];
        r.read_exact(&mut first).unwrap();
        // The file shrinks under the reader: what is read is a prefix and
        // the reader ends, short of the length it saw at open.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(400_000)
            .unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        let total = first.len() + rest.len();
        assert!(total < data.len(), "{backend:?}: read {total}");
        first.extend_from_slice(&rest);
        assert!(first[..] == data[..total], "{backend:?}");
    }
}

#[test]
fn reader_reports_a_read_error_and_keeps_reporting_it() {
    for (cfg, backend) in configs() {
        // read(2) on a directory fails with EISDIR, from either backend.
        let dir = tempfile::tempdir().unwrap();
        let mut r = SeqReader::new(File::open(dir.path()).unwrap(), 0, &cfg).unwrap();
        let e = r.read(&mut [0; 16]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EISDIR), "{backend:?}: {e}");
        let e = r.read(&mut [0; 16]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EISDIR), "{backend:?}: {e}");
    }
}

#[test]
fn reader_uses_o_direct_with_an_unaligned_tail() {
    for (cfg, backend) in configs() {
        let cfg = StreamConfig {
            direct: true,
            ..cfg
        };
        // /var/tmp is a disk filesystem (ext4 here), which takes O_DIRECT.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("in");
        let data = pattern(1_000_003, 7);
        fs::write(&path, &data).unwrap();
        let mut r = SeqReader::open(&path, &cfg).unwrap();
        assert!(r.is_direct(), "{backend:?}: O_DIRECT on {}", path.display());
        let got = read_all_in_steps(&mut r, 70_000);
        assert!(got == data, "{backend:?}: O_DIRECT bytes differ");
    }
}
