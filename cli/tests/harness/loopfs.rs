//! Loop-mounted scratch filesystems for tests.

/// An ext4 filesystem on a loop device over an image file in a temp dir,
/// mounted; unmounted and detached on drop, also when a test panics.
pub struct LoopFs {
    pub dev: String,
    pub mnt: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    pub fn new(size_mb: u64) -> LoopFs {
        Self::with_mkfs(size_mb, &[])
    }

    /// With extra `mkfs.ext4` options (e.g. `-O ^has_journal`).
    pub fn with_mkfs(size_mb: u64, mkfs: &[&str]) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix("cstore-loop-")
            .tempdir()
            .unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(size_mb << 20)
            .unwrap();
        let sh = |cmd: &mut std::process::Command| {
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        sh(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .args(mkfs)
            .arg(&img));
        let dev = sh(std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        // From here on, drop undoes what was done.
        let fs = LoopFs {
            dev,
            mnt,
            _dir: dir,
        };
        sh(std::process::Command::new("mount")
            .arg(&fs.dev)
            .arg(&fs.mnt));
        fs
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let m = &self.mnt;
        if std::process::Command::new("mountpoint")
            .arg("-q")
            .arg(m)
            .status()
            .is_ok_and(|s| s.success())
        {
            let umount = |args: &[&str]| {
                std::process::Command::new("umount")
                    .args(args)
                    .arg(m)
                    .status()
                    .is_ok_and(|s| s.success())
            };
            // Busy (a failed test left a container mounted on it): detach
            // lazily rather than leave it mounted.
            if !umount(&[]) {
                umount(&["-l"]);
            }
        }
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}
