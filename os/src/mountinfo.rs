//! /proc/self/mountinfo, parsed once for every crate (the runtime's cgroup
//! detection, blockio's filesystem probe, mount points, the FUSE connection
//! of a mount). Each line (proc(5)):
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! id parent MAJ:MIN root mount-point options [optional fields...] - type source super-options
//! ```
//!
//! Paths and the source are escaped by the kernel: space, tab, newline and
//! backslash as `\ooo` (octal); they are unescaped here, so a mount point
//! with a space in its name compares equal to its path.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u32,
    pub parent: u32,
    /// st_dev of files on the mount (for FUSE, the connection's number).
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is the mount's root.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (rw, nosuid, ...).
    pub options: String,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options (for cgroup v1, the controllers).
    pub super_options: String,
}

impl MountInfo {
    /// Is `name` one of the superblock's options (`blkio` of a v1 cgroup)?
    pub fn has_super_option(&self, name: &str) -> bool {
        self.super_options.split(',').any(|o| o == name)
    }

    /// Parse one line; None for a line that is not a mountinfo entry.
    pub fn parse_line(line: &str) -> Option<MountInfo> {
        let f: Vec<&str> = line.split(' ').collect();
        let sep = f.iter().skip(6).position(|x| *x == "-")? + 6;
        let (major, minor) = f.get(2)?.split_once(':')?;
        Some(MountInfo {
            id: f.first()?.parse().ok()?,
            parent: f.get(1)?.parse().ok()?,
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
            root: path(f.get(3)?),
            mount_point: path(f.get(4)?),
            options: f.get(5)?.to_string(),
            fs_type: f.get(sep + 1)?.to_string(),
            source: String::from_utf8_lossy(&unescape(f.get(sep + 2)?)).into_owned(),
            super_options: f.get(sep + 3).unwrap_or(&"").to_string(),
        })
    }
}

fn path(s: &str) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(s)))
}

/// Every mount in a mountinfo text, in its order (a later one at the same
/// point is on top); lines that are not entries are skipped.
pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(MountInfo::parse_line).collect()
}

/// This process's mounts.
pub fn read() -> io::Result<Vec<MountInfo>> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse(&t))
}

/// The topmost mount at `path` (compared as given: pass a resolved path).
pub fn find<'a>(mounts: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// The mount that holds `path` (resolved): the one with the longest mount
/// point above it, the topmost among equals.
pub fn containing<'a>(mounts: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    let mut best: Option<&MountInfo> = None;
    for m in mounts {
        if path.starts_with(&m.mount_point)
            && best
                .is_none_or(|b| m.mount_point.as_os_str().len() >= b.mount_point.as_os_str().len())
        {
            best = Some(m);
        }
    }
    best
}

/// The kernel's escaping undone: `\ooo` (three octal digits) is that byte.
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
35 30 0:31 / /sys/fs/cgroup/blkio rw,nosuid shared:15 - cgroup cgroup rw,blkio
36 30 0:32 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
98 25 0:55 / /var/tmp/a\\040b rw,nosuid,nodev,relatime - fuse.cstore cstore\\011x rw,user_id=0
99 25 8:1 /sub /var/tmp/end\\134 rw - ext4 /dev/sda1 rw
not a mountinfo line
";

    #[test]
    fn fields_are_read_and_unescaped() {
        let m = parse(TEXT);
        assert_eq!(m.len(), 6, "the junk line is skipped");
        assert_eq!(m[2].fs_type, "cgroup");
        assert!(m[2].has_super_option("blkio"));
        assert!(!m[3].has_super_option("blkio"));
        let fuse = &m[4];
        assert_eq!(fuse.mount_point, Path::new("/var/tmp/a b"));
        assert_eq!((fuse.major, fuse.minor), (0, 55));
        assert_eq!((fuse.id, fuse.parent), (98, 25));
        assert_eq!(fuse.source, "cstore\tx");
        assert_eq!(fuse.super_options, "rw,user_id=0");
        // An escape at the very end of a field is unescaped too.
        assert_eq!(m[5].mount_point, Path::new("/var/tmp/end\\"));
        assert_eq!(m[5].root, Path::new("/sub"));
        assert_eq!(unescape("a\\0"), b"a\\0", "not three octal digits");
        assert_eq!(unescape("\\101\\12x"), b"A\\12x");
    }

    #[test]
    fn lookups_by_path() {
        let m = parse(TEXT);
        assert_eq!(find(&m, Path::new("/sys/fs/cgroup")).unwrap().id, 30);
        assert!(find(&m, Path::new("/sys/fs")).is_none());
        let c = containing(&m, Path::new("/sys/fs/cgroup/blkio/x")).unwrap();
        assert_eq!(c.id, 35);
        assert_eq!(containing(&m, Path::new("/sys/kernel")).unwrap().id, 22);
        assert!(containing(&m, Path::new("/home")).is_none());
        // This process's own table parses, with / in it.
        let mine = read().unwrap();
        assert!(containing(&mine, Path::new("/")).is_some());
    }
}
