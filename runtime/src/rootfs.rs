//! Touching a container's rootfs from the host as the container will see
//! it: every path resolved with openat2(RESOLVE_IN_ROOT) on the rootfs, so
//! an image's symlinks (absolute, or climbing with `..`) stay inside it.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use cstore_os::sys;

fn open_in_root(root: &File, rel: &Path, flags: libc::c_int) -> io::Result<File> {
    // openat2 refuses O_PATH with flags that only mean something to an open.
    let extra = if flags & libc::O_PATH != 0 {
        0
    } else {
        libc::O_NOCTTY
    };
    let rel = sys::cstring(rel.as_os_str().as_bytes())?;
    sys::resolve_in_root(root.as_fd(), &rel, flags | extra).map(File::from)
}

/// The regular file at `rel` in `root`, at most `max` bytes; None when there
/// is no such file. Errors are messages naming the file.
///
/// Whatever `rel` names is looked at before it is opened: found with
/// O_PATH (which opens nothing), and reopened for reading through
/// /proc/self/fd only if it is a regular file. An image's /etc/passwd can be
/// a device node or a FIFO, and opening a device from the host can act on
/// it (a watchdog starts counting on open).
pub fn read_file(root: &Path, rel: &str, max: u64) -> Result<Option<String>, String> {
    let what = |e: &dyn std::fmt::Display| format!("/{rel} in {}: {e}", root.display());
    let dir = File::open(root).map_err(|e| what(&e))?;
    let found = match open_in_root(&dir, Path::new(rel), libc::O_PATH) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(what(&e)),
    };
    if !found.metadata().map_err(|e| what(&e))?.is_file() {
        return Err(what(&"not a regular file"));
    }
    // No fd variant reopens an O_PATH fd for reading: its /proc/self/fd link
    // does, and names exactly the inode that was just checked.
    let file = File::open(format!("/proc/self/fd/{}", found.as_raw_fd())).map_err(|e| what(&e))?;
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| what(&e))?;
    if text.len() as u64 > max {
        return Err(what(&format!("larger than {max} bytes")));
    }
    Ok(Some(text))
}

/// `path` (absolute, inside the container) lexically cleaned, as docker
/// cleans a working directory: `.` dropped, `..` climbing no higher than `/`.
fn clean(path: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// `path` cleaned, absolute: what the process's cwd is set to (the kernel
/// would not take `x/..` for a missing x).
pub fn clean_absolute(path: &str) -> String {
    format!("/{}", clean(path).display())
}

/// Create directory `path` (absolute) in `root` with its missing parents,
/// mode 0755, owned by `owner` (the container's root on the host), as
/// docker does for a working directory that is not there. An existing one
/// is left as it is; a file in the way is an error.
pub fn create_dir_all(root: &Path, path: &str, owner: (u32, u32)) -> Result<(), String> {
    let what = |e: &dyn std::fmt::Display| format!("{path} in {}: {e}", root.display());
    let dir = File::open(root).map_err(|e| what(&e))?;
    let mut sofar = PathBuf::new();
    let flags = libc::O_RDONLY | libc::O_DIRECTORY;
    let mut parent = open_in_root(&dir, Path::new("."), flags).map_err(|e| what(&e))?;
    for name in clean(path).iter() {
        sofar.push(name);
        parent = match open_in_root(&dir, &sofar, flags) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let cname = sys::cstring(name.as_bytes()).map_err(|e| what(&e))?;
                match sys::mkdirat(parent.as_fd(), &cname, 0o755) {
                    Ok(()) => {}
                    // Not there to open, yet there: a symlink to nowhere.
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        return Err(what(&format!(
                            "/{} is a symlink to a missing path",
                            sofar.display()
                        )))
                    }
                    Err(e) => return Err(what(&e)),
                }
                // The directory just made, by name from its parent's fd and
                // never through a symlink: what is chowned is what was made.
                let d = sys::resolve_beneath(parent.as_fd(), &cname, flags | libc::O_NOFOLLOW)
                    .map(File::from)
                    .map_err(|e| what(&e))?;
                std::os::unix::fs::fchown(&d, Some(owner.0), Some(owner.1))
                    .map_err(|e| what(&e))?;
                d
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(what(&format!("/{} is not a directory", sofar.display())))
            }
            Err(e) => return Err(what(&e)),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

    #[test]
    fn paths_are_cleaned_as_docker_cleans_them() {
        assert_eq!(clean("/a/./b/../c/"), PathBuf::from("a/c"));
        assert_eq!(clean("/../../x"), PathBuf::from("x"));
        assert_eq!(clean("/"), PathBuf::new());
        assert_eq!(clean_absolute("/a/./b/../c/"), "/a/c");
        assert_eq!(clean_absolute("/.."), "/");
    }

    #[test]
    fn files_are_read_inside_the_root_only() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("f"), "host\n").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("lib")).unwrap();
        std::fs::write(root.path().join("lib/f"), "container\n").unwrap();
        let link = |target: &str, name: &str| {
            std::os::unix::fs::symlink(target, root.path().join(name)).unwrap()
        };
        // Absolute: the container's /lib/f; climbing: stops at the root.
        link("/lib/f", "abs");
        link(
            &format!("../../../../../../..{}/f", outside.path().display()),
            "up",
        );
        link(&outside.path().join("f").display().to_string(), "host");
        let read = |rel: &str| read_file(root.path(), rel, 1 << 20);
        assert_eq!(read("abs"), Ok(Some("container\n".into())));
        assert_eq!(read("up"), Ok(None));
        assert_eq!(read("host"), Ok(None));
        assert_eq!(read("nothing"), Ok(None));
        assert!(read("lib").unwrap_err().contains("not a regular file"));
        assert!(read_file(root.path(), "lib/f", 4)
            .unwrap_err()
            .contains("larger than 4 bytes"));
        // A FIFO is refused without being opened: a writer waiting for a
        // reader is still waiting afterwards.
        let fifo = root.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new().write(true).open(&fifo);
                tx.send(()).unwrap();
                f.map(drop)
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(read("fifo").unwrap_err().contains("not a regular file"));
        let opened = rx
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_ok();
        // Let the writer go.
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        writer.join().unwrap().unwrap();
        assert!(!opened, "read_file opened the FIFO");
    }

    #[test]
    fn directories_are_made_inside_the_root_only() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("existing")).unwrap();
        std::fs::write(root.path().join("file"), "").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        std::os::unix::fs::symlink("/existing", root.path().join("inside")).unwrap();

        create_dir_all(root.path(), "/a/./b/../c", (1234, 5678)).unwrap();
        let made = std::fs::metadata(root.path().join("a/c")).unwrap();
        assert!(made.is_dir());
        assert_eq!(
            (made.uid(), made.gid(), made.mode() & 0o7777),
            (1234, 5678, 0o755)
        );
        assert!(!root.path().join("a/b").exists());
        // An existing directory keeps its owner.
        create_dir_all(root.path(), "/existing", (1, 1)).unwrap();
        assert_eq!(
            std::fs::metadata(root.path().join("existing"))
                .unwrap()
                .uid(),
            0
        );
        // Through symlinks: inside the root, whatever they say.
        let e = create_dir_all(root.path(), "/escape/x/y", (0, 0)).unwrap_err();
        assert!(e.contains("/escape is a symlink to a missing path"), "{e}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        std::fs::create_dir_all(root.path().join(outside.path().strip_prefix("/").unwrap()))
            .unwrap();
        create_dir_all(root.path(), "/escape/x/y", (0, 0)).unwrap();
        assert!(root
            .path()
            .join(outside.path().strip_prefix("/").unwrap())
            .join("x/y")
            .is_dir());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        create_dir_all(root.path(), "/inside/z", (0, 0)).unwrap();
        assert!(root.path().join("existing/z").is_dir());
        let e = create_dir_all(root.path(), "/file/sub", (0, 0)).unwrap_err();
        assert!(e.contains("/file is not a directory"), "{e}");
    }
}
