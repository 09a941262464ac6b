//! Applying tar entries to a layer directory, safely.
//!
//! Every path is cleaned first (absolute paths and `..` are refused), and the
//! parent directory is opened with openat2(RESOLVE_BENEATH | NO_SYMLINKS)
//! from the layer root's fd, so no entry can reach outside the layer, and no
//! symlink the archive created is ever followed. Files are created with
//! O_EXCL|O_NOFOLLOW, hardlink targets must already exist in this layer, and
//! overlay's own xattrs are never taken from an archive.
//!
//! With `CSTORE_IO=uring`, small regular files go through `batch` (io_uring);
//! see there for how the batches keep the same tree and errors.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::rc::Rc;

use cstore_blockio::ring::{io_env, IoEnv};

use super::batch::{self, Batch, Meta, Pending};
use super::tar::{Entry, Kind, TarReader};
use cstore_os::sys;

pub use cstore_os::tree::OPAQUE_XATTR;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_NAME: &[u8] = b".wh..wh..opq";

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ExtractStats {
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub devices: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub file_bytes: u64,
    /// Files written in io_uring batches (the rest: one syscall at a time).
    pub batched_files: u64,
}

/// Why an entry could not be applied (the caller adds image and layer).
pub struct EntryError {
    pub entry: String,
    pub reason: String,
    /// The errno of the system call that failed, if one did (a full disk
    /// is not a bad layer).
    pub errno: Option<i32>,
}

pub struct Extractor {
    root: Rc<OwnedFd>,
    /// The last parent directory opened, by its cleaned path (shared with
    /// the files queued in it).
    cached: Option<(Vec<u8>, Rc<OwnedFd>)>,
    /// Directories whose mtime is set at the end (their children change it).
    dir_times: Vec<(Vec<u8>, (i64, u32))>,
    /// Directories created because an entry's parent was missing, as long
    /// as they are that: a later entry that replaces or removes one (or one
    /// above it), or lists it, takes it out. Sorted, so a directory and
    /// everything below it are one range.
    pub implicit_dirs: BTreeSet<Vec<u8>>,
    /// Whether the archive had an entry for the layer root (`./`).
    pub root_listed: bool,
    pub stats: ExtractStats,
    buf: Vec<u8>,
    /// Paths created by this archive (files, links...), to tell a whiteout
    /// of a lower layer's file from one of this layer's own.
    created: HashMap<Vec<u8>, ()>,
    /// Whiteouts this archive created: an entry that later takes the same
    /// name must still hide what the lower layers have there.
    whiteouts: HashSet<Vec<u8>>,
    /// Directories made for entries (missing parents, replaced whiteouts):
    /// with `created` and `whiteouts`, everything in the layer directory, so
    /// a name in none of them needs no lookup before it is created.
    made_dirs: HashSet<Vec<u8>>,
    /// Bytes of paths in `made_dirs` and `implicit_dirs`, and their cap:
    /// each holds every made directory's whole path, so an archive of
    /// entries with new deep paths (2048 one-letter components each) would
    /// cost megabytes per 4 KiB header without it.
    made_dir_bytes: usize,
    pub max_made_dir_bytes: usize,
    /// Directories with the setgid bit: files in them get its group.
    setgid_dirs: HashSet<Vec<u8>>,
    /// Who new files belong to and the umask applied to their mode: chown
    /// and chmod are skipped when these give what the entry says.
    owner: (u32, u32),
    umask: u32,
    /// Small files queued for io_uring; None: one syscall at a time.
    batch: Option<Batch>,
}

/// The process umask, without changing it (umask(2) would, for every thread).
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        // Unknown: assume it strips everything, so chmod always runs.
        .unwrap_or(0o777)
}

/// The default cap of `Extractor::max_made_dir_bytes`: real layers use
/// kilobytes (CPython's tree: about 100 KiB).
pub const MAX_MADE_DIR_BYTES: usize = 64 << 20;

pub(super) fn err(entry: &[u8], reason: impl Into<String>) -> EntryError {
    EntryError {
        entry: String::from_utf8_lossy(entry).into_owned(),
        reason: reason.into(),
        errno: None,
    }
}

/// A system call for `entry` failed doing `op`.
pub(super) fn io_err(entry: &[u8], op: &str, e: &io::Error) -> EntryError {
    EntryError {
        errno: e.raw_os_error(),
        ..err(entry, io_reason(op, e))
    }
}

pub(super) fn io_reason(op: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ELOOP) => format!("{op}: the path goes through a symlink"),
        Some(libc::EXDEV) => format!("{op}: the path escapes the layer"),
        Some(libc::ENOTDIR) => format!("{op}: a parent is not a directory"),
        _ => format!("{op}: {e}"),
    }
}

/// Split a tar path into clean components; refuse absolute paths and `..`.
fn clean(path: &[u8]) -> Result<Vec<&[u8]>, String> {
    if path.starts_with(b"/") {
        return Err("absolute path".into());
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path escapes the layer with '..'".into()),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn xattr_allowed(name: &str) -> bool {
    // Overlay's own attributes (redirects, metacopy, opaque) would let a
    // layer rewire the merged tree; never take them from an archive.
    !cstore_os::tree::is_overlay_xattr(name.as_bytes())
}

impl Extractor {
    /// An extractor into the directory `root`. Files are written one
    /// syscall at a time, or with `batch` small ones in io_uring batches
    /// (falling back to one at a time if the kernel refuses io_uring);
    /// `CSTORE_IO=uring` forces batches (an error without io_uring) and
    /// `CSTORE_IO=sync` rules them out. Where batches pay off: see
    /// `cstore_blockio::Policy` and docs/architecture.md.
    pub fn new(root: OwnedFd, batch: bool) -> Result<Self, String> {
        let batch = match io_env() {
            IoEnv::Uring => Some(
                Batch::new()
                    .map_err(|e| format!("setting up io_uring: {e}"))?
                    .ok_or("CSTORE_IO=uring, but the kernel refuses io_uring")?,
            ),
            IoEnv::Default if batch => Batch::new().ok().flatten(),
            IoEnv::Sync | IoEnv::Default => None,
        };
        // SAFETY: geteuid/getegid cannot fail.
        let owner = unsafe { (libc::geteuid(), libc::getegid()) };
        Ok(Extractor {
            root: Rc::new(root),
            cached: None,
            dir_times: Vec::new(),
            implicit_dirs: BTreeSet::new(),
            root_listed: false,
            stats: ExtractStats::default(),
            buf: vec![0u8; 1 << 20],
            created: HashMap::new(),
            whiteouts: HashSet::new(),
            made_dirs: HashSet::new(),
            made_dir_bytes: 0,
            max_made_dir_bytes: MAX_MADE_DIR_BYTES,
            setgid_dirs: HashSet::new(),
            owner,
            umask: current_umask(),
            batch,
        })
    }

    /// Write the queued files.
    fn flush(&mut self) -> Result<(), EntryError> {
        match &mut self.batch {
            Some(b) => b.flush(),
            None => Ok(()),
        }
    }

    /// The parent of an entry, to keep open while a file in it is queued.
    fn parent_rc(&mut self, comps: &[&[u8]], entry: &[u8]) -> Result<Rc<OwnedFd>, EntryError> {
        if comps.is_empty() {
            return Ok(self.root.clone());
        }
        self.parent(comps, entry)?;
        Ok(self.cached.as_ref().expect("parent cached").1.clone())
    }

    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Open (creating missing directories) the parent of an entry.
    fn parent(&mut self, comps: &[&[u8]], entry: &[u8]) -> Result<BorrowedFd<'_>, EntryError> {
        if comps.is_empty() {
            return Ok(self.root.as_fd());
        }
        let key = comps.join(&b'/');
        if self.cached.as_ref().is_some_and(|(k, _)| *k == key) {
            return Ok(self.cached.as_ref().unwrap().1.as_fd());
        }
        let ckey = sys::cstring(&key).map_err(|e| err(entry, e.to_string()))?;
        let fd = match sys::resolve_beneath(
            self.root.as_fd(),
            &ckey,
            libc::O_PATH | libc::O_DIRECTORY,
        ) {
            Ok(fd) => fd,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || (e.raw_os_error() == Some(libc::ENOTDIR) && !self.whiteouts.is_empty()) =>
            {
                self.make_parents(comps, entry)?
            }
            Err(e) => return Err(io_err(entry, "opening its parent directory", &e)),
        };
        self.cached = Some((key, Rc::new(fd)));
        Ok(self.cached.as_ref().unwrap().1.as_fd())
    }

    fn make_parents(&mut self, comps: &[&[u8]], entry: &[u8]) -> Result<OwnedFd, EntryError> {
        let mut fd =
            sys::resolve_beneath(self.root.as_fd(), c".", libc::O_PATH | libc::O_DIRECTORY)
                .map_err(|e| io_err(entry, "opening the layer root", &e))?;
        for (i, c) in comps.iter().enumerate() {
            let name = sys::cstring(c).map_err(|e| err(entry, e.to_string()))?;
            let next = match sys::resolve_beneath(
                fd.as_fd(),
                &name,
                libc::O_PATH | libc::O_DIRECTORY,
            ) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.made_dir_bytes +=
                        2 * comps[..=i].iter().map(|c| c.len() + 1).sum::<usize>();
                    if self.made_dir_bytes > self.max_made_dir_bytes {
                        return Err(err(
                                entry,
                                format!(
                                    "the layer's implicit parent directories need more than {} bytes of paths (new deep paths entry after entry)",
                                    self.max_made_dir_bytes
                                ),
                            ));
                    }
                    sys::mkdirat(fd.as_fd(), &name, 0o755)
                        .map_err(|e| io_err(entry, "creating a parent", &e))?;
                    self.implicit_dirs.insert(comps[..=i].join(&b'/'));
                    self.made_dirs.insert(comps[..=i].join(&b'/'));
                    sys::resolve_beneath(fd.as_fd(), &name, libc::O_PATH | libc::O_DIRECTORY)
                        .map_err(|e| io_err(entry, "opening a parent", &e))?
                }
                // A whiteout of this layer, then entries below it with no
                // directory entry: the directory is this layer's own, and
                // still hides the lower one (opaque). Not inherited: the
                // lower directory was deleted.
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOTDIR)
                        && self.whiteouts.remove(&comps[..=i].join(&b'/')) =>
                {
                    sys::unlinkat(fd.as_fd(), &name, false)
                        .map_err(|e| io_err(entry, "replacing a whiteout", &e))?;
                    sys::mkdirat(fd.as_fd(), &name, 0o755)
                        .map_err(|e| io_err(entry, "creating a parent", &e))?;
                    self.made_dirs.insert(comps[..=i].join(&b'/'));
                    let dir =
                        sys::resolve_beneath(fd.as_fd(), &name, libc::O_RDONLY | libc::O_DIRECTORY)
                            .map_err(|e| io_err(entry, "opening a parent", &e))?;
                    mark_opaque(dir.as_fd()).map_err(|e| io_err(entry, "marking opaque", &e))?;
                    sys::resolve_beneath(fd.as_fd(), &name, libc::O_PATH | libc::O_DIRECTORY)
                        .map_err(|e| io_err(entry, "opening a parent", &e))?
                }
                Err(e) => return Err(io_err(entry, "opening its parent directory", &e)),
            };
            fd = next;
        }
        Ok(fd)
    }

    /// Is a directory on the way to an entry's parent something else in this
    /// layer (a file, symlink or whiteout)?
    fn parent_is_not_a_dir(&self, dirs: &[&[u8]]) -> bool {
        if dirs.is_empty() {
            return false;
        }
        let Ok(key) = sys::cstring(&dirs.join(&b'/')) else {
            return false;
        };
        matches!(
            sys::resolve_beneath(self.root.as_fd(), &key, libc::O_PATH | libc::O_DIRECTORY),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP))
        )
    }

    /// Make room for a new entry at parent/name: an existing directory stays
    /// if the new entry is one too; anything else is removed first.
    fn clear_slot(
        &mut self,
        comps: &[&[u8]],
        name: &CString,
        new_is_dir: bool,
        entry: &[u8],
    ) -> Result<bool, EntryError> {
        let parent = self.parent(comps, entry)?;
        match sys::lstatat(parent, name) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(entry, "looking up the entry", &e)),
            Ok(st) => {
                let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                if is_dir && new_is_dir {
                    return Ok(true);
                }
                let r = if is_dir {
                    sys::remove_all_at(parent, name)
                } else {
                    sys::unlinkat(parent, name, false)
                };
                r.map_err(|e| io_err(entry, "replacing an earlier entry", &e))?;
                if is_dir {
                    // Cached fds may point into what was just removed.
                    self.cached = None;
                    let mut key = comps.join(&b'/');
                    if !key.is_empty() {
                        key.push(b'/');
                    }
                    key.extend_from_slice(name.to_bytes());
                    self.not_implicit(&key);
                }
                Ok(false)
            }
        }
    }

    /// `key` (a cleaned path) and everything below it are no longer
    /// directories this layer made for lack of an entry: removed, replaced,
    /// or listed by an entry of their own.
    fn not_implicit(&mut self, key: &[u8]) {
        if self.implicit_dirs.is_empty() {
            return;
        }
        self.implicit_dirs.remove(key);
        // Below `key`: from "key/" up to "key0" ('0' follows '/').
        let mut lo = key.to_vec();
        lo.push(b'/');
        let mut hi = key.to_vec();
        hi.push(b'/' + 1);
        let below: Vec<Vec<u8>> = self.implicit_dirs.range(lo..hi).cloned().collect();
        for k in below {
            self.implicit_dirs.remove(&k);
        }
    }

    /// Apply one entry, reading its data from `tar`.
    pub fn apply<R: Read>(&mut self, tar: &mut TarReader<R>, e: &Entry) -> Result<(), EntryError> {
        self.stats.entries += 1;
        let path = e.path.as_slice();
        let comps = clean(path).map_err(|r| err(path, r))?;
        let key = comps.join(&b'/');
        // Flush the queued files before an entry that could see one of them:
        // anything but a new file or directory in a path free of them.
        if self.batch.as_ref().is_some_and(|b| !b.is_empty()) {
            let independent = comps.split_last().is_some_and(|(last, dirs)| {
                matches!(e.kind, Kind::File | Kind::Dir)
                    && !last.starts_with(WHITEOUT_PREFIX)
                    && !self.exists(&key)
                    && !self.batch.as_ref().unwrap().has_ancestor(dirs)
            });
            if !independent {
                self.flush()?;
            }
        }
        let Some((last, dirs)) = comps.split_last() else {
            // The layer root itself ("./"): its attributes become the root's.
            if e.kind != Kind::Dir {
                return Err(err(path, "the root entry is not a directory"));
            }
            let root = self.root.as_fd();
            sys::fchown(root, e.uid as u32, e.gid as u32).map_err(|x| io_err(path, "chown", &x))?;
            sys::fchmod(root, e.mode).map_err(|x| io_err(path, "chmod", &x))?;
            for (k, v) in e.xattrs.iter().filter(|(k, _)| xattr_allowed(k)) {
                let k = CString::new(k.as_bytes()).map_err(|_| err(path, "NUL in xattr name"))?;
                sys::fsetxattr(root, &k, v).map_err(|x| io_err(path, "setxattr", &x))?;
            }
            self.dir_times.push((Vec::new(), e.mtime));
            if e.mode & libc::S_ISGID != 0 {
                self.setgid_dirs.insert(Vec::new());
            }
            self.root_listed = true;
            return Ok(());
        };

        // Whiteouts: `.wh.NAME` hides NAME of lower layers; `.wh..wh..opq`
        // makes the directory opaque. Other `.wh..wh.` names are aufs metadata.
        if let Some(hidden) = last.strip_prefix(WHITEOUT_PREFIX) {
            if *last == OPAQUE_NAME {
                let dir_fd = {
                    let parent = self.parent(dirs, path)?;
                    sys::resolve_beneath(parent, c".", libc::O_RDONLY | libc::O_DIRECTORY)
                        .map_err(|x| io_err(path, "opening the opaque directory", &x))?
                };
                mark_opaque(dir_fd.as_fd()).map_err(|x| io_err(path, "marking opaque", &x))?;
                self.stats.opaque_dirs += 1;
                return Ok(());
            }
            if hidden.starts_with(WHITEOUT_PREFIX) {
                return Ok(());
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(err(path, "whiteout of an invalid name"));
            }
            let mut target: Vec<&[u8]> = dirs.to_vec();
            target.push(hidden);
            let key = target.join(&b'/');
            let name = sys::cstring(hidden).map_err(|x| err(path, x.to_string()))?;
            // A whiteout only hides lower layers: what this layer itself has
            // under that name stays, but a directory of this layer must not
            // merge with the lower one any more (opaque).
            if self.created.contains_key(&key) {
                let parent = self.parent(dirs, path)?;
                let st = sys::lstatat(parent, &name)
                    .map_err(|x| io_err(path, "looking up the entry", &x))?;
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    let dir =
                        sys::resolve_beneath(parent, &name, libc::O_RDONLY | libc::O_DIRECTORY)
                            .map_err(|x| io_err(path, "opening the directory", &x))?;
                    mark_opaque(dir.as_fd()).map_err(|x| io_err(path, "marking opaque", &x))?;
                }
                self.stats.whiteouts += 1;
                return Ok(());
            }
            // Under a file, symlink or whiteout of this layer, nothing of the
            // lower layers shows anyway (umoci writes such whiteouts when a
            // directory becomes a file).
            if self.parent_is_not_a_dir(dirs) {
                self.stats.whiteouts += 1;
                return Ok(());
            }
            self.clear_slot(dirs, &name, false, path)?;
            let parent = self.parent(dirs, path)?;
            sys::mknodat(parent, &name, libc::S_IFCHR, 0, 0)
                .map_err(|x| io_err(path, "creating the whiteout", &x))?;
            self.whiteouts.insert(key);
            self.stats.whiteouts += 1;
            return Ok(());
        }

        let name = sys::cstring(last).map_err(|x| err(path, x.to_string()))?;
        let is_dir = e.kind == Kind::Dir;
        // Taking the place of this layer's own whiteout: a directory here
        // must still hide the lower layers' one.
        let over_whiteout = self.whiteouts.remove(&key);
        // Only a name this layer already made can be taken: no lookup else.
        let fresh = !over_whiteout && !self.exists(&key);
        let kept_dir = !fresh && self.clear_slot(dirs, &name, is_dir, path)?;
        let (uid, gid) = (e.uid as u32, e.gid as u32);
        let xattrs: Vec<(CString, &[u8])> = e
            .xattrs
            .iter()
            .filter(|(k, _)| xattr_allowed(k))
            .map(|(k, v)| {
                Ok((
                    CString::new(k.as_bytes()).map_err(|_| err(path, "NUL in xattr name"))?,
                    v.as_slice(),
                ))
            })
            .collect::<Result<_, EntryError>>()?;

        match e.kind {
            Kind::File => {
                // Created with the entry's permission bits; chown only if the
                // file would not be the entry's owner's (setgid parent
                // included), chmod only for what create and the umask miss.
                let setgid_parent =
                    !self.setgid_dirs.is_empty() && self.setgid_dirs.contains(&dirs.join(&b'/'));
                let chown = (setgid_parent || (uid, gid) != self.owner).then_some((uid, gid));
                let create_mode = e.mode & 0o777;
                let chmod = (e.mode & 0o7777 != create_mode & !self.umask).then_some(e.mode);
                if self.batch.is_some()
                    && fresh
                    && xattrs.is_empty()
                    && e.sparse.is_none()
                    && e.size <= batch::MAX_FILE
                {
                    let data = read_small(tar, e.size).map_err(|x| io_err(path, "write", &x))?;
                    let parent = self.parent_rc(dirs, path)?;
                    let file = Pending {
                        entry: path.to_vec(),
                        key: key.clone(),
                        parent,
                        name,
                        data,
                        meta: Meta {
                            create_mode,
                            chown,
                            chmod,
                            mtime: e.mtime,
                        },
                    };
                    let b = self.batch.as_mut().unwrap();
                    b.push(file)?;
                    self.stats.files += 1;
                    self.stats.batched_files += 1;
                    self.stats.file_bytes += e.size;
                    self.created.insert(key, ());
                    return Ok(());
                }
                let parent = self.parent(dirs, path)?;
                let mut f = sys::create_file(parent, &name, create_mode)
                    .map_err(|x| io_err(path, "create", &x))?;
                self.write_data(tar, e, &mut f)
                    .map_err(|x| io_err(path, "write", &x))?;
                let fd = f.as_fd();
                if let Some((uid, gid)) = chown {
                    sys::fchown(fd, uid, gid).map_err(|x| io_err(path, "chown", &x))?;
                }
                // After chown, which clears setuid/setgid and file capabilities.
                if let Some(mode) = chmod {
                    sys::fchmod(fd, mode).map_err(|x| io_err(path, "chmod", &x))?;
                }
                for (k, v) in &xattrs {
                    sys::fsetxattr(fd, k, v).map_err(|x| io_err(path, "setxattr", &x))?;
                }
                sys::futimens(fd, e.mtime).map_err(|x| io_err(path, "set mtime", &x))?;
                self.stats.files += 1;
                self.stats.file_bytes += e.size;
            }
            Kind::Dir => {
                // As a file: made with the entry's permission bits, then
                // chown and chmod only where that does not give what the
                // entry says (a directory the layer had already, a setgid
                // parent, whose group and bit a new directory takes, another
                // owner, bits the umask strips, setuid/setgid/sticky).
                let setgid_parent =
                    !self.setgid_dirs.is_empty() && self.setgid_dirs.contains(&dirs.join(&b'/'));
                let create_mode = e.mode & 0o777;
                let chown = kept_dir || setgid_parent || (uid, gid) != self.owner;
                let chmod =
                    kept_dir || setgid_parent || e.mode & 0o7777 != create_mode & !self.umask;
                let parent = self.parent(dirs, path)?;
                if !kept_dir {
                    sys::mkdirat(parent, &name, create_mode)
                        .map_err(|x| io_err(path, "mkdir", &x))?;
                }
                if chown || chmod || !xattrs.is_empty() || over_whiteout {
                    // Through the directory's own fd: nothing that takes
                    // the name can be followed anywhere else.
                    let parent = self.parent(dirs, path)?;
                    let dir =
                        sys::resolve_beneath(parent, &name, libc::O_RDONLY | libc::O_DIRECTORY)
                            .map_err(|x| io_err(path, "opening the directory", &x))?;
                    let fd = dir.as_fd();
                    if chown {
                        sys::fchown(fd, uid, gid).map_err(|x| io_err(path, "chown", &x))?;
                    }
                    if chmod {
                        sys::fchmod(fd, e.mode).map_err(|x| io_err(path, "chmod", &x))?;
                    }
                    for (k, v) in &xattrs {
                        sys::fsetxattr(fd, k, v).map_err(|x| io_err(path, "setxattr", &x))?;
                    }
                    if over_whiteout {
                        mark_opaque(fd).map_err(|x| io_err(path, "marking opaque", &x))?;
                    }
                }
                // Listed: its own entry's attributes, not a lower layer's.
                self.implicit_dirs.remove(&key);
                if e.mode & libc::S_ISGID != 0 {
                    self.setgid_dirs.insert(key.clone());
                } else {
                    self.setgid_dirs.remove(&key);
                }
                self.dir_times.push((key.clone(), e.mtime));
                self.stats.dirs += 1;
            }
            Kind::Symlink => {
                let target = sys::cstring(&e.link).map_err(|x| err(path, x.to_string()))?;
                let parent = self.parent(dirs, path)?;
                sys::symlinkat(&target, parent, &name).map_err(|x| io_err(path, "symlink", &x))?;
                sys::lchownat(parent, &name, uid, gid).map_err(|x| io_err(path, "chown", &x))?;
                for (k, v) in &xattrs {
                    // user.* xattrs are not allowed on symlinks; skip those.
                    match sys::lsetxattrat(parent, &name, k, v) {
                        Err(x)
                            if x.raw_os_error() == Some(libc::EPERM)
                                && k.to_bytes().starts_with(b"user.") => {}
                        r => r.map_err(|x| io_err(path, "setxattr", &x))?,
                    }
                }
                sys::lutimesat(parent, &name, e.mtime)
                    .map_err(|x| io_err(path, "set mtime", &x))?;
                self.stats.symlinks += 1;
            }
            Kind::Hardlink => {
                let tcomps =
                    clean(&e.link).map_err(|r| err(path, format!("hardlink target: {r}")))?;
                let Some((tlast, tdirs)) = tcomps.split_last() else {
                    return Err(err(path, "hardlink to the layer root"));
                };
                let tkey = tcomps.join(&b'/');
                if !self.created.contains_key(&tkey) {
                    return Err(err(
                        path,
                        format!(
                            "hardlink target {:?} is not in this layer (or not yet extracted)",
                            String::from_utf8_lossy(&e.link)
                        ),
                    ));
                }
                let tdir =
                    sys::cstring(&tdirs.join(&b'/')).map_err(|x| err(path, x.to_string()))?;
                let tdir_path: &std::ffi::CStr = if tdirs.is_empty() { c"." } else { &tdir };
                let tparent = sys::resolve_beneath(
                    self.root.as_fd(),
                    tdir_path,
                    libc::O_PATH | libc::O_DIRECTORY,
                )
                .map_err(|x| io_err(path, "opening the hardlink target's directory", &x))?;
                let tname = sys::cstring(tlast).map_err(|x| err(path, x.to_string()))?;
                let parent = self.parent(dirs, path)?;
                sys::linkat(tparent.as_fd(), &tname, parent, &name)
                    .map_err(|x| io_err(path, "link", &x))?;
                self.stats.hardlinks += 1;
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                let fmt = match e.kind {
                    Kind::Char => libc::S_IFCHR,
                    Kind::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let parent = self.parent(dirs, path)?;
                sys::mknodat(
                    parent,
                    &name,
                    fmt | (e.mode & 0o777),
                    e.dev_major,
                    e.dev_minor,
                )
                .map_err(|x| io_err(path, "mknod", &x))?;
                sys::lchownat(parent, &name, uid, gid).map_err(|x| io_err(path, "chown", &x))?;
                sys::chmodat(parent, &name, e.mode).map_err(|x| io_err(path, "chmod", &x))?;
                for (k, v) in &xattrs {
                    sys::lsetxattrat(parent, &name, k, v)
                        .map_err(|x| io_err(path, "setxattr", &x))?;
                }
                sys::lutimesat(parent, &name, e.mtime)
                    .map_err(|x| io_err(path, "set mtime", &x))?;
                self.stats.devices += 1;
            }
        }
        self.created.insert(key, ());
        Ok(())
    }

    fn write_data<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        e: &Entry,
        f: &mut std::fs::File,
    ) -> io::Result<()> {
        match &e.sparse {
            None => {
                let mut w = 0u64;
                loop {
                    let n = tar.read_data(&mut self.buf)?;
                    if n == 0 {
                        break;
                    }
                    f.write_all(&self.buf[..n])?;
                    w += n as u64;
                }
                debug_assert_eq!(w, e.size);
            }
            Some(regions) => {
                // Holes stay holes: write each region at its offset.
                for &(mut off, len) in regions {
                    let mut left = len;
                    while left > 0 {
                        let want = left.min(self.buf.len() as u64) as usize;
                        let n = tar.read_data(&mut self.buf[..want])?;
                        if n == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "sparse data truncated",
                            ));
                        }
                        f.write_all_at(&self.buf[..n], off)?;
                        off += n as u64;
                        left -= n as u64;
                    }
                }
                sys::ftruncate(f.as_fd(), e.size)?;
            }
        }
        Ok(())
    }

    /// Is there something at `key` (a cleaned path) that this layer made?
    fn exists(&self, key: &[u8]) -> bool {
        self.created.contains_key(key)
            || self.whiteouts.contains(key)
            || self.made_dirs.contains(key)
    }

    /// Write the queued files, then set directory mtimes, now that nothing
    /// more is written into them.
    pub fn finish(&mut self) -> Result<(), EntryError> {
        self.flush()?;
        self.cached = None;
        // The last parent opened, by its key (entries of a directory are
        // mostly together).
        let mut last_parent: Option<(Vec<u8>, OwnedFd)> = None;
        for (key, mtime) in std::mem::take(&mut self.dir_times).into_iter().rev() {
            if key.is_empty() {
                sys::futimens(self.root.as_fd(), mtime)
                    .map_err(|x| io_err(b".", "set mtime", &x))?;
                continue;
            }
            let comps = clean(&key).map_err(|r| err(&key, r))?;
            let (last, dirs) = comps.split_last().expect("non-empty");
            let name = sys::cstring(last).map_err(|x| err(&key, x.to_string()))?;
            let pkey = dirs.join(&b'/');
            if last_parent.as_ref().is_none_or(|(k, _)| *k != pkey) {
                let c = sys::cstring(if pkey.is_empty() { b"." } else { &pkey })
                    .map_err(|x| err(&key, x.to_string()))?;
                // Looked up, never made again: a parent a later entry
                // removed or replaced took the directory with it.
                match sys::resolve_beneath(self.root.as_fd(), &c, libc::O_PATH | libc::O_DIRECTORY)
                {
                    Ok(fd) => last_parent = Some((pkey, fd)),
                    Err(x) if gone(&x) => continue,
                    Err(x) => return Err(io_err(&key, "set mtime", &x)),
                }
            }
            let parent = last_parent.as_ref().expect("opened").1.as_fd();
            match sys::lutimesat(parent, &name, mtime) {
                // Replaced or removed by a later entry: nothing to date.
                Err(x) if x.kind() == io::ErrorKind::NotFound => {}
                r => r.map_err(|x| io_err(&key, "set mtime", &x))?,
            }
        }
        Ok(())
    }
}

/// Make the directory `dir` opaque to overlayfs.
fn mark_opaque(dir: BorrowedFd<'_>) -> io::Result<()> {
    sys::fsetxattr(dir, OPAQUE_XATTR, b"y")
}

/// Is a path no longer there as a directory (missing, or something else or
/// a symlink on the way)?
fn gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
    )
}

/// The data of a small file, whole.
fn read_small<R: Read>(tar: &mut TarReader<R>, size: u64) -> io::Result<Vec<u8>> {
    let mut data = vec![0u8; size as usize];
    let mut n = 0;
    while n < data.len() {
        match tar.read_data(&mut data[n..])? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            r => n += r,
        }
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_refuses_escapes() {
        assert_eq!(clean(b"./a//b/./c").unwrap(), vec![&b"a"[..], b"b", b"c"]);
        assert!(clean(b"./").unwrap().is_empty());
        assert!(clean(b"/etc/passwd").is_err());
        assert!(clean(b"a/../../b").is_err());
        assert!(clean(b"..").is_err());
        assert!(!xattr_allowed("trusted.overlay.redirect"));
        assert!(xattr_allowed("security.capability"));
    }
}
