//! `cstore check`: every finding compared with what this machine really has,
//! read independently of cstore's code: /proc, /sys, the kernel's config,
//! util-linux's `mount`, raw syscalls from python, coreutils' `stat -f`.

use std::path::Path;
use std::process::Command;

use crate::harness::Cstore;
use serde_json::Value;

fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

fn check_json(cs: &Cstore) -> Value {
    let (code, out, err) = cs.outcome(&["check", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    let missing = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["status"] == "missing");
    assert_eq!(
        code,
        i32::from(missing),
        "exit code vs missing findings: {err}"
    );
    v
}

fn finding<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no {name} finding in {v:#}"))
}

/// The kernel's build config (/proc/config.gz or /boot/config-RELEASE), if readable.
fn kernel_config() -> Option<String> {
    let (ok, text) = sh("zcat /proc/config.gz 2>/dev/null || cat /boot/config-$(uname -r)");
    (ok && !text.is_empty()).then_some(text)
}

/// An overlay mounted by util-linux's mount(8) with `extra` options: works?
fn mount_overlay(dir: &Path, extra: &str) -> bool {
    let d = tempfile::tempdir_in(dir).unwrap();
    for n in ["l", "u", "w", "m"] {
        std::fs::create_dir(d.path().join(n)).unwrap();
    }
    let p = |n: &str| d.path().join(n).display().to_string();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}{extra}",
        p("l"),
        p("u"),
        p("w")
    );
    let ok = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts, &p("m")])
        .status()
        .unwrap()
        .success();
    if ok {
        assert!(Command::new("umount")
            .arg(p("m"))
            .status()
            .unwrap()
            .success());
    }
    ok
}

/// A raw syscall from python (ctypes): its return value or -errno.
fn syscall_py(code: &str) -> i64 {
    let script = format!(
        "import ctypes,os\nlibc=ctypes.CDLL(None,use_errno=True)\nlibc.syscall.restype=ctypes.c_long\n{code}\nprint(r if r>=0 else -ctypes.get_errno())"
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut it = release
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

#[test]
fn check_reports_what_this_machine_has() {
    let cs = Cstore::new();
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let v = check_json(&cs);

    // kernel: uname(1).
    let release = sh("uname -r").1;
    assert_eq!(finding(&v, "kernel")["facts"]["release"], release.as_str());

    // overlayfs: /proc/filesystems and mount(8) on the same filesystem.
    let o = &finding(&v, "overlayfs")["facts"];
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap();
    let has = |fs: &str| {
        filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(fs))
    };
    assert_eq!(o["registered"], has("overlay"), "{o}");
    assert_eq!(o["mount"], mount_overlay(cs.path(), ""), "{o}");
    assert_eq!(o["volatile"], mount_overlay(cs.path(), ",volatile"), "{o}");
    // Layers by fd from detached id-mapped mounts: overlayfs since 6.15.
    if kernel_at_least(&release, 6, 15) {
        assert_eq!(o["idmapped_lowerdirs"], true, "{o}");
    }

    // fuse: /dev/fuse, and passthrough as the kernel was built.
    let f = &finding(&v, "fuse")["facts"];
    assert_eq!(f["dev_fuse"], Path::new("/dev/fuse").exists(), "{f}");
    if Path::new("/dev/fuse").exists() {
        assert_eq!(f["mount"], true, "{f}");
        if let Some(config) = kernel_config() {
            let pt = config.lines().any(|l| l == "CONFIG_FUSE_PASSTHROUGH=y");
            assert_eq!(f["passthrough"], pt, "{f}");
        }
        // FUSE_NOTIFY_RESEND: protocol 7.41 (Linux 6.10).
        assert_eq!(
            f["resend"],
            f["kernel_minor"].as_u64().unwrap() >= 41,
            "{f}"
        );
        assert_eq!(
            f["enable_uring_parameter"].as_str(),
            std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
                .ok()
                .as_deref()
                .map(str::trim)
        );
    }

    // io_uring: the sysctl, and io_uring_setup(2) from python.
    let u = &finding(&v, "io_uring")["facts"];
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .map(|s| s.trim().parse::<u64>().unwrap());
    assert_eq!(u["io_uring_disabled"].as_u64(), disabled, "{u}");
    let setup = syscall_py("p=ctypes.create_string_buffer(120)\nr=libc.syscall(425,8,p)\nos.close(r) if r>=0 else None");
    let forced_sync = std::env::var("CSTORE_IO").as_deref() == Ok("sync");
    assert_eq!(u["cstore_io_sync"], forced_sync, "{u}");
    assert_eq!(
        u["backend"] == "iouring",
        setup >= 0 && !forced_sync,
        "{u}, io_uring_setup {setup}"
    );

    // openat2(2) from python: "." beneath "/".
    let o2 = &finding(&v, "openat2")["facts"];
    let r = syscall_py(
        "h=(ctypes.c_uint64*3)(0o10000000|0o200000,0,0x08|0x04)\nd=os.open('/',os.O_RDONLY)\nr=libc.syscall(437,d,b'.',h,24)",
    );
    assert_eq!(o2["available"], r >= 0, "{o2}, openat2 {r}");

    // cgroup: the mount table.
    let c = &finding(&v, "cgroup")["facts"];
    let mut v1_blkio = None;
    let mut v2 = None;
    let mut v1_any = false;
    for line in mounts_before.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-").unwrap();
        match f[sep + 1] {
            "cgroup" => {
                v1_any = true;
                if f[sep + 3].split(',').any(|o| o == "blkio") {
                    v1_blkio = Some(f[4].to_string());
                }
            }
            "cgroup2" => v2 = Some(f[4].to_string()),
            _ => {}
        }
    }
    let mode = match (v1_any, v2.is_some()) {
        (true, true) => "hybrid",
        (true, false) => "v1",
        (false, true) => "v2",
        (false, false) => "none",
    };
    assert_eq!(c["mode"], mode, "{c}");
    let io = &c["io_controller"];
    if let Some(p) = v1_blkio {
        assert_eq!(io["version"], 1, "{c}");
        assert_eq!(io["path"], p.as_str(), "{c}");
    } else if let Some(p) = v2.filter(|p| {
        std::fs::read_to_string(Path::new(p).join("cgroup.controllers"))
            .is_ok_and(|t| t.split_whitespace().any(|x| x == "io"))
    }) {
        assert_eq!(io["version"], 2, "{c}");
        assert_eq!(io["path"], p.as_str(), "{c}");
    } else {
        assert!(io.is_null(), "{c}");
    }

    // store: stat -f and sysfs for the root's device.
    let s = &finding(&v, "store")["facts"];
    assert_eq!(s["exists"], true);
    let fstype = sh(&format!("stat -f -c %T {}", cs.path().display())).1;
    let want_fs = match fstype.as_str() {
        "ext2/ext3" => "ext4",
        other => other,
    };
    assert_eq!(s["filesystem"], want_fs, "{s}");
    if want_fs == "tmpfs" {
        assert_eq!(s["class"], "memory", "{s}");
    } else {
        let source = sh(&format!(
            "findmnt -n -o SOURCE --target {}",
            cs.path().display()
        ))
        .1;
        let dev = source.trim_start_matches("/dev/");
        // A partition's queue is its disk's.
        let disk = sh(&format!("lsblk -no PKNAME /dev/{dev}")).1;
        let disk = if disk.is_empty() {
            dev.to_string()
        } else {
            disk
        };
        if Path::new("/sys/block").join(&disk).exists() {
            let rot =
                std::fs::read_to_string(format!("/sys/block/{disk}/queue/rotational")).unwrap();
            let class = if disk.starts_with("nvme") {
                "nvme"
            } else if rot.trim() == "1" {
                "rotational"
            } else {
                "ssd"
            };
            assert_eq!(s["class"], class, "{s}");
            assert_eq!(s["device"], disk.as_str(), "{s}");
        }
    }
    assert!(s["policy"]["rings"].as_u64().unwrap() >= 1, "{s}");

    // The probes left nothing behind: no mount, no scratch directory.
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts_after.contains(".cstore-check-"), "{mounts_after}");
    let left: Vec<_> = std::fs::read_dir(cs.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left in the root: {left:?}");
}

/// A store on tmpfs is the memory class; one that does not exist yet is
/// probed through its nearest existing ancestor and left uncreated.
#[test]
fn check_probes_a_missing_root_through_its_parent() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let mut cs = Cstore::new();
    let root = shm.path().join("not/yet");
    let out = Command::new(env!("CARGO_BIN_EXE_cstore"))
        .arg("--root")
        .arg(&root)
        .args(["check", "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &finding(&v, "store")["facts"];
    assert_eq!(s["exists"], false, "{s}");
    assert_eq!(s["probed"], shm.path().to_str().unwrap(), "{s}");
    assert_eq!(s["filesystem"], "tmpfs", "{s}");
    assert_eq!(s["class"], "memory", "{s}");
    assert!(!shm.path().join("not").exists());
    assert_eq!(std::fs::read_dir(shm.path()).unwrap().count(), 0);
    // The text form: one line per finding and one why.
    cs.env.push(("CSTORE_LOG".into(), "error".into()));
    let text = String::from_utf8(cs.run(&["check"]).stdout).unwrap();
    for name in [
        "kernel",
        "overlayfs",
        "fuse",
        "io_uring",
        "openat2",
        "cgroup",
        "store",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from:\n{text}"
        );
    }
    assert_eq!(text.matches("why: ").count(), 7, "{text}");
}
