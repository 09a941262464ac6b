//! Mounts as containerd describes them (type, source, options), and doing
//! them. Overlay options longer than a page (many layers) go through the new
//! mount API, one `lowerdir+` per layer, so there is no length limit.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, IoError, Result};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mount {
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

impl Mount {
    pub fn bind(source: &str, options: &[&str]) -> Mount {
        Mount {
            kind: "bind".into(),
            source: source.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn is_readonly(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
            || (self.kind == "overlay" && !self.options.iter().any(|o| o.starts_with("upperdir=")))
    }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in mount argument"))
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// Options that are flags of the mount rather than of the filesystem
/// (mount(8) and containerd's mount.All take them out of the data string the
/// same way): overlayfs refuses them as its own options.
const MOUNT_FLAGS: [(&str, libc::c_ulong, libc::c_uint); 3] = [
    ("nosuid", libc::MS_NOSUID, MOUNT_ATTR_NOSUID),
    ("nodev", libc::MS_NODEV, MOUNT_ATTR_NODEV),
    ("noexec", libc::MS_NOEXEC, MOUNT_ATTR_NOEXEC),
];

/// The `MOUNT_FLAGS` among `options` as mount(2) flags and as fsmount(2)
/// attributes.
fn mount_flags(options: &[String]) -> (libc::c_ulong, libc::c_uint) {
    MOUNT_FLAGS
        .iter()
        .filter(|(name, _, _)| options.iter().any(|o| o == name))
        .fold((0, 0), |(ms, attr), (_, f, a)| (ms | f, attr | a))
}

fn is_mount_flag(option: &str) -> bool {
    MOUNT_FLAGS.iter().any(|(name, _, _)| *name == option)
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Mount `m` at `target`.
pub fn mount(m: &Mount, target: &Path) -> Result<()> {
    let fail = |e: io::Error| IoError::new("mount", target, e);
    match m.kind.as_str() {
        "bind" => {
            let src = cpath(Path::new(&m.source)).map_err(fail)?;
            let dst = cpath(target).map_err(fail)?;
            let rec = if m.options.iter().any(|o| o == "rbind") {
                libc::MS_REC
            } else {
                0
            };
            // SAFETY: valid C strings; a bind mount takes no fs type or data.
            check(unsafe {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | rec,
                    std::ptr::null(),
                )
            } as _)
            .map_err(fail)?;
            let (extra, _) = mount_flags(&m.options);
            let ro = if m.is_readonly() { libc::MS_RDONLY } else { 0 };
            if ro | extra != 0 {
                // A bind mount takes its flags (ro, nosuid, ...) by a remount.
                let flags = libc::MS_BIND | libc::MS_REMOUNT | ro | extra | rec;
                // SAFETY: as above.
                if let Err(e) = check(unsafe {
                    libc::mount(
                        std::ptr::null(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    )
                } as _)
                {
                    let _ = unmount(target);
                    return Err(fail(e).into());
                }
            }
            Ok(())
        }
        "overlay" => {
            let (flags, _) = mount_flags(&m.options);
            let data = m
                .options
                .iter()
                .filter(|o| !is_mount_flag(o))
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(",");
            if data.len() < page_size() {
                let dst = cpath(target).map_err(fail)?;
                let d = cstr(&data).map_err(fail)?;
                // SAFETY: valid C strings.
                check(unsafe {
                    libc::mount(
                        c"overlay".as_ptr(),
                        dst.as_ptr(),
                        c"overlay".as_ptr(),
                        flags,
                        d.as_ptr().cast(),
                    )
                } as _)
                .map(drop)
                .map_err(|e| fail(e).into())
            } else {
                mount_overlay_fsconfig(&m.options, target, None).map_err(|e| fail(e).into())
            }
        }
        other => Err(Error::InvalidArgument(format!(
            "unsupported mount type {other:?}"
        ))),
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize
}

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_SET_FD: libc::c_uint = 5;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 2;
const MOUNT_ATTR_NODEV: libc::c_uint = 4;
const MOUNT_ATTR_NOEXEC: libc::c_uint = 8;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// struct mount_attr of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn fsconfig(
    fd: &OwnedFd,
    cmd: libc::c_uint,
    key: Option<&str>,
    value: Option<&str>,
) -> io::Result<()> {
    let k = key.map(cstr).transpose()?;
    let v = value.map(cstr).transpose()?;
    // SAFETY: fsconfig with a valid fs context fd and optional C strings.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fd.as_raw_fd(),
            cmd,
            k.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            v.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            0,
        )
    })
    .map(drop)
}

/// A detached copy of the directory tree at `path` (open_tree with
/// OPEN_TREE_CLONE) whose owners are mapped through the user namespace
/// `userns`: on-disk id N appears as the id N maps to. It is in no mount
/// table, and is gone once the last fd (or a mount made from it) is.
fn idmapped_tree(path: &Path, userns: BorrowedFd) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    // SAFETY: open_tree with a C string; returns a new fd.
    let tree =
        check(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, p.as_ptr(), flags) })?;
    // SAFETY: new fd we own.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: mount_setattr on our detached tree with a valid mount_attr.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(tree)
}

/// Mount `m` at `target` for a container in a user namespace, as containerd's
/// overlay snapshotter does with uid/gid mappings: every lower layer is an
/// id-mapped detached tree (`userns` holds the mapping), so files owned by
/// root in the image appear owned by the container's root; the upper dir is
/// not mapped (the caller chowns it to the mapped root), so what the
/// container writes is stored under its host ids. The mapped layers exist
/// only as file descriptors until overlayfs holds its own clones of them,
/// so nothing is left mounted on any exit path (containerd attaches them
/// to temporary directories instead). Needs an overlayfs that takes layers
/// by fd from detached mounts (Linux 6.13-6.15 added it; checked on 6.18).
pub fn mount_idmapped(m: &Mount, target: &Path, userns: BorrowedFd) -> Result<()> {
    let fail = |e: io::Error| IoError::new("mount (id-mapped)", target, e);
    match m.kind.as_str() {
        "overlay" => {
            mount_overlay_fsconfig(&m.options, target, Some(userns)).map_err(|e| fail(e).into())
        }
        other => Err(Error::InvalidArgument(format!(
            "id-mapped {other:?} mounts are not supported (overlay only)"
        ))),
    }
}

fn move_mount(mnt: &OwnedFd, target: &Path) -> io::Result<()> {
    let dst = cpath(target)?;
    // SAFETY: move the detached mount onto the target path.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

fn fsconfig_fd(fs: &OwnedFd, key: &str, fd: &OwnedFd) -> io::Result<()> {
    let k = cstr(key)?;
    // SAFETY: fsconfig with a valid fs context fd, a C string and an fd.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_FD,
            k.as_ptr(),
            std::ptr::null::<libc::c_char>(),
            fd.as_raw_fd(),
        )
    })
    .map(drop)
}

/// overlay through fsopen/fsconfig/fsmount: each lower layer is its own
/// `lowerdir+` parameter (Linux 6.8+), so 128+ layers mount. With `idmap`,
/// each lower layer is an id-mapped detached tree passed by fd.
fn mount_overlay_fsconfig(
    options: &[String],
    target: &Path,
    idmap: Option<BorrowedFd>,
) -> io::Result<()> {
    // SAFETY: fsopen with a C string; returns a new fd.
    let fs =
        check(unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: new fd we own.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as i32) };
    let mut readonly = true;
    // Held until the superblock exists: closing one dissolves its tree.
    let mut trees = Vec::new();
    let (_, flag_attrs) = mount_flags(options);
    for o in options.iter().filter(|o| !is_mount_flag(o)) {
        match o.split_once('=') {
            Some(("lowerdir", v)) => {
                for l in v.split(':') {
                    match idmap {
                        None => fsconfig(&fs, FSCONFIG_SET_STRING, Some("lowerdir+"), Some(l))?,
                        Some(userns) => {
                            let tree = idmapped_tree(Path::new(l), userns)?;
                            fsconfig_fd(&fs, "lowerdir+", &tree)?;
                            trees.push(tree);
                        }
                    }
                }
            }
            Some((k, v)) => {
                if k == "upperdir" {
                    readonly = false;
                }
                fsconfig(&fs, FSCONFIG_SET_STRING, Some(k), Some(v))?;
            }
            None if o == "ro" => readonly = true,
            None => fsconfig(&fs, FSCONFIG_SET_FLAG, Some(o), None)?,
        }
    }
    fsconfig(&fs, FSCONFIG_CMD_CREATE, None, None)?;
    drop(trees);
    let attrs = flag_attrs | if readonly { MOUNT_ATTR_RDONLY } else { 0 };
    // SAFETY: fsmount on a created context; returns a new mount fd.
    let mnt =
        check(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) })?;
    // SAFETY: new fd we own.
    let mnt = unsafe { OwnedFd::from_raw_fd(mnt as i32) };
    move_mount(&mnt, target)
}

/// Mount a list of mounts stacked at `target` (containerd's mount.All).
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = mount(m, target) {
            for _ in 0..i {
                let _ = unmount(target);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Unmount `target`; if busy, detach it (it goes once the last user leaves).
pub fn unmount(target: &Path) -> Result<()> {
    let dst = cpath(target).map_err(|e| IoError::new("umount", target, e))?;
    // SAFETY: valid C string.
    match check(unsafe { libc::umount2(dst.as_ptr(), 0) } as _) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            tracing::warn!(target = %target.display(), "mount busy; detaching it lazily");
            // SAFETY: valid C string.
            check(unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) } as _)
                .map(drop)
                .map_err(|e| IoError::new("umount", target, e).into())
        }
        Err(e) => Err(IoError::new("umount", target, e).into()),
    }
}

/// Is `path` a mount point (per /proc/self/mountinfo)?
pub fn is_mountpoint(path: &Path) -> bool {
    crate::mountinfo::read().is_ok_and(|m| crate::mountinfo::find(&m, path).is_some())
}
