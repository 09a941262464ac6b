//! The rotational policy's blob reads, counted at the device: on an ext4 of a
//! loop device of the test's own (queue marked rotational), a cold blob
//! reaches the device in requests of the policy's stream size (or of the most
//! the queue takes in one), nothing read ahead past it, and a blob the page
//! cache holds costs the device no read at all. Counted in
//! /sys/block/loopN/stat (requests the device completed), not timed. Needs
//! root (losetup, mount); without it the test is skipped visibly (a failure
//! under CI=true).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use cstore_blockio::{probe, DeviceKind, Mode, Policy, SeqReader, StreamConfig};

/// Loop device with a mounted ext4, undone on drop (also when a test panics).
struct LoopFs {
    dev: String,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl LoopFs {
    fn new(size_mb: u64) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix("cstore-hddreads-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let img = dir.path().join("fs.img");
        File::create(&img).unwrap().set_len(size_mb << 20).unwrap();
        let dev = sh(Command::new("losetup")
            .args(["--find", "--show", "--direct-io=off"])
            .arg(&img));
        let mnt = dir.path().join("mnt");
        // From here on, drop undoes what was done.
        let fs = LoopFs {
            dev,
            mnt,
            _dir: dir,
        };
        fs::write(fs.sys("queue/rotational"), "1").unwrap();
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&fs.dev));
        fs::create_dir(&fs.mnt).unwrap();
        fs.mount();
        fs
    }

    fn sys(&self, what: &str) -> PathBuf {
        let name = Path::new(&self.dev).file_name().unwrap();
        Path::new("/sys/block").join(name).join(what)
    }

    fn mount(&self) {
        sh(Command::new("mount").arg(&self.dev).arg(&self.mnt));
    }

    /// Cold cache for this filesystem only: unmounting evicts its inodes and
    /// pages, and the last close of the device drops its buffer cache.
    fn remount(&self) {
        sh(Command::new("umount").arg(&self.mnt));
        self.mount();
    }

    /// Reads the device completed, and the bytes they read.
    fn reads(&self) -> (u64, u64) {
        let stat = fs::read_to_string(self.sys("stat")).unwrap();
        let f: Vec<u64> = stat
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        (f[0], f[2] * 512)
    }

    fn queue(&self, what: &str) -> u64 {
        fs::read_to_string(self.sys(&format!("queue/{what}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn read_all(path: &Path, cfg: &StreamConfig) -> (Vec<u8>, bool) {
    let mut r = SeqReader::open(path, cfg).unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    (out, r.is_direct())
}

#[test]
fn rotational_policy_reads_cold_blobs_in_its_request_size_and_cached_ones_from_memory() {
    const TEST: &str =
        "rotational_policy_reads_cold_blobs_in_its_request_size_and_cached_ones_from_memory";
    // SAFETY: a plain getter.
    if unsafe { libc::geteuid() } != 0 {
        cstore_os::testing::skip_or_fail(TEST, "needs root for losetup and mount");
        return;
    }
    let lfs = LoopFs::new(256);
    // The policy for this device as a rotational disk, whatever the probe
    // makes of a loop device over a file.
    let mut info = probe(&lfs.mnt).unwrap();
    info.kind = DeviceKind::Rotational;
    let policy = Policy::for_device(&info, 2);
    for mode in [Mode::Auto, Mode::Sync] {
        let cfg = StreamConfig::from_policy(&policy, mode);
        assert_eq!(cfg.io_size, policy.stream_io_size as usize);
        assert!(cfg.io_size >= 1 << 20, "MiB-sized requests: {cfg:?}");

        let blob = lfs.mnt.join(format!("blob-{mode:?}"));
        let size: u64 = 48 << 20;
        let data = pattern(size as usize);
        let mut f = File::create(&blob).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        drop(f);

        // Just written: the page cache has it, the device is not asked.
        let before = lfs.reads();
        let (got, direct) = read_all(&blob, &cfg);
        let after = lfs.reads();
        assert!(got == data, "{mode:?}: the cached blob's bytes differ");
        assert!(!direct, "{mode:?}: a cached blob is read through the cache");
        // Not the blob from the device: a stream request is at least 1 MiB.
        // A few blocks may be read meanwhile (metadata, or a page the kernel
        // dropped: CI once saw 3 reads here on a busy machine).
        let (reads, bytes) = (after.0 - before.0, after.1 - before.1);
        assert!(
            bytes < 1 << 20,
            "{mode:?}: {reads} device reads, {bytes} bytes, for a cached blob"
        );

        // Cold: every byte from the device, in requests of the stream's size
        // or of the most the queue takes in one (the kernel splits at
        // max_sectors_kb, and at max_segments pages of a buffer that is not
        // physically contiguous), and nothing read ahead past them. Opening
        // the file reads a few metadata blocks (the inode table's readahead).
        lfs.remount();
        let before = lfs.reads();
        let (got, direct) = read_all(&blob, &cfg);
        let after = lfs.reads();
        assert!(got == data, "{mode:?}: the cold blob's bytes differ");
        assert!(direct, "{mode:?}: a cold blob is read with O_DIRECT");
        let (reads, bytes) = (after.0 - before.0, after.1 - before.1);
        println!("{mode:?}: cold {size}-byte blob: {reads} device reads, {bytes} bytes");
        let max_request = lfs.queue("max_sectors_kb") << 10;
        let split = (cfg.io_size as u64)
            .min(max_request)
            .min(lfs.queue("max_segments") * 4096);
        // Fewer only where the block layer merged two of ours (never past
        // max_sectors_kb) or pages of a buffer were physically adjacent.
        let fewest = size.div_ceil(max_request);
        let most = size.div_ceil(split) + 16;
        assert!(
            bytes >= size && bytes <= size + (1 << 20),
            "{mode:?}: {bytes} bytes read from the device for a {size}-byte blob"
        );
        assert!(
            (fewest..=most).contains(&reads),
            "{mode:?}: {reads} device reads for {size} bytes, want {fewest}..={most} (stream requests of {}, split at {split})",
            cfg.io_size
        );
    }
}
