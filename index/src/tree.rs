//! The entry table as extraction leaves the tree.
//!
//! `TreeBuilder` replays the tar entries of a layer the way
//! `store::unpack::extract` applies them, over an in-memory filesystem: the
//! same path cleaning, the same parent lookups (no symlink is ever followed;
//! a missing parent is made 0755 and recorded as implicit; a parent that is
//! this layer's own whiteout becomes an opaque directory), the same rules for
//! names taken again (a directory stays if the new entry is one, anything
//! else is replaced; hardlinks keep the old inode), the same whiteouts
//! (`.wh.NAME` hides the lower layers' NAME unless this layer made NAME,
//! `.wh..wh..opq` makes its directory opaque, other `.wh..wh.` names are
//! dropped), the same attributes (overlay xattrs dropped, `user.` xattrs
//! dropped on symlinks, directory times set last, in reverse order) and the
//! same errors. The result is the final tree, walked breadth-first in name
//! order: parents before children, a hardlink after the file it shares.
//!
//! Mirroring includes extract's quirks, because the lazy tree must equal the
//! unpacked one: a directory listed twice keeps its first mtime; the
//! directory-time pass, run at the end, dates whatever took a listed
//! directory's name (and skips one whose parent is gone); a new directory in
//! a setgid directory extraction does not know as setgid keeps the group and
//! bit the kernel gives it unless its entry needs a chown or chmod anyway.
//! The implicit set is extraction's exactly: a directory made for a missing
//! parent stops being implicit when an entry lists it, and goes with it when
//! a later entry replaces or removes it or a directory above it. The paths
//! of directories made for missing parents are capped per layer as
//! extraction caps them ([`TreeOptions::max_made_dir_bytes`]). The tests run
//! both on the same tars and compare the trees and the implicit sets.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::encode::EntryRec;
use crate::error::{Error, Result};
use crate::format::Kind;
use crate::xattr_allowed;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_NAME: &[u8] = b".wh..wh..opq";
const NAME_MAX: usize = 255;
const SYMLINK_MAX: usize = 4095;
const PATH_MAX: usize = 4096;

/// A tar entry's type, as the tar reader reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TarKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

/// One tar entry, as the tar reader reports it, with the uncompressed
/// offset of its data.
#[derive(Clone, Copy, Debug)]
pub struct TarEntry<'a> {
    /// As in the archive (cleaned here as extraction cleans it).
    pub path: &'a [u8],
    pub kind: TarKind,
    /// Permission bits with setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: (i64, u32),
    /// A file's logical size.
    pub size: u64,
    /// Offset of the file's stored data in the uncompressed stream.
    pub data_offset: u64,
    /// Symlink target, or hardlink target path.
    pub link: &'a [u8],
    pub dev: (u32, u32),
    pub xattrs: &'a [(String, Vec<u8>)],
    /// A sparse file's data regions (offset, length).
    pub sparse: Option<&'a [(u64, u64)]>,
}

impl<'a> TarEntry<'a> {
    pub fn new(path: &'a [u8], kind: TarKind) -> Self {
        TarEntry {
            path,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            size: 0,
            data_offset: 0,
            link: &[],
            dev: (0, 0),
            xattrs: &[],
            sparse: None,
        }
    }
}

/// What extraction depends on besides the archive.
#[derive(Clone, Copy, Debug)]
pub struct TreeOptions {
    /// The extracting process's umask: the mode of directories it makes
    /// itself (0755 & !umask).
    pub umask: u32,
    /// The extracting process's euid/egid: the owner of what it makes itself
    /// (implicit directories, whiteouts).
    pub owner: (u32, u32),
    /// Extraction's per-layer cap on the bytes of bookkeeping for directories
    /// made for missing parents (`UnpackOptions::max_made_dir_bytes`): a
    /// layer over it is refused by both.
    pub max_made_dir_bytes: usize,
}

/// The default of `max_made_dir_bytes`, extraction's default
/// (`cstore_unpack::extract::MAX_MADE_DIR_BYTES`; a test pins them equal).
pub const MAX_MADE_DIR_BYTES: usize = 64 << 20;

impl Default for TreeOptions {
    fn default() -> Self {
        TreeOptions {
            umask: 0o022,
            owner: (0, 0),
            max_made_dir_bytes: MAX_MADE_DIR_BYTES,
        }
    }
}

type NodeId = usize;

/// A path, interned (parent path + one component): extraction keys its
/// bookkeeping by path, and interning keeps that linear in the input where
/// joined strings would cost depth² bytes per deep entry.
type PathId = u32;
const ROOT_PATH: PathId = 0;

#[derive(Default)]
struct Paths {
    /// (parent, component) of each path; the root has none.
    of: Vec<(PathId, Box<[u8]>)>,
    /// Length of each path joined with '/'.
    len: Vec<usize>,
    /// Each path's children by component (looked up without allocating).
    children: Vec<HashMap<Box<[u8]>, PathId>>,
}

impl Paths {
    fn new() -> Self {
        Paths {
            of: vec![(ROOT_PATH, Box::default())],
            len: vec![0],
            children: vec![HashMap::new()],
        }
    }

    fn child(&mut self, parent: PathId, name: &[u8]) -> PathId {
        if let Some(&id) = self.children[parent as usize].get(name) {
            return id;
        }
        let id = self.of.len() as PathId;
        self.of.push((parent, name.into()));
        let l = self.len[parent as usize];
        self.len.push(if parent == ROOT_PATH {
            name.len()
        } else {
            l + 1 + name.len()
        });
        self.children.push(HashMap::new());
        self.children[parent as usize].insert(name.into(), id);
        id
    }

    fn id(&mut self, comps: &[&[u8]]) -> PathId {
        comps.iter().fold(ROOT_PATH, |p, c| self.child(p, c))
    }

    fn comps(&self, mut id: PathId) -> Vec<&[u8]> {
        let mut out = Vec::new();
        while id != ROOT_PATH {
            let (p, name) = &self.of[id as usize];
            out.push(&name[..]);
            id = *p;
        }
        out.reverse();
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Errno {
    NoEnt,
    NotDir,
    Loop,
    Exist,
    Perm,
    NameTooLong,
}

impl Errno {
    fn text(self) -> &'static str {
        match self {
            Errno::NoEnt => "No such file or directory",
            Errno::NotDir => "a parent is not a directory",
            Errno::Loop => "the path goes through a symlink",
            Errno::Exist => "File exists",
            Errno::Perm => "Operation not permitted",
            Errno::NameTooLong => "File name too long",
        }
    }
}

#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    size: u64,
    data: u64,
    link: Vec<u8>,
    sparse: Option<Vec<(u64, u64)>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    opaque: bool,
    /// Made for a missing parent and not listed since (a node leaves the
    /// tree with everything below it when a later entry replaces it).
    implicit: bool,
    children: BTreeMap<Vec<u8>, NodeId>,
}

impl Node {
    fn new(kind: Kind, perm: u32, owner: (u32, u32)) -> Self {
        Node {
            kind,
            perm,
            uid: owner.0,
            gid: owner.1,
            mtime: (0, 0),
            size: 0,
            data: 0,
            link: Vec::new(),
            sparse: None,
            xattrs: BTreeMap::new(),
            opaque: false,
            implicit: false,
            children: BTreeMap::new(),
        }
    }
}

/// Builds the entry table from a layer's tar entries, in archive order.
pub struct TreeBuilder {
    opts: TreeOptions,
    nodes: Vec<Node>,
    paths: Paths,
    /// The last parent resolved, by path (extract keeps its fd).
    cached: Option<(PathId, NodeId)>,
    dir_times: Vec<(PathId, (i64, u32))>,
    root_listed: bool,
    created: HashSet<PathId>,
    whiteouts: HashSet<PathId>,
    made_dirs: HashSet<PathId>,
    entries: u64,
    /// Bytes extraction counts against `max_made_dir_bytes`.
    made_dir_bytes: usize,
    /// Directories extraction knows are setgid (listed so; never forgotten
    /// when replaced): a new file there is chowned even when the entry's
    /// owner is the extracting process's.
    setgid_dirs: HashSet<PathId>,
}

const ROOT: NodeId = 0;

fn entry_err(path: &[u8], reason: impl Into<String>) -> Error {
    Error::Entry {
        entry: String::from_utf8_lossy(path).into_owned(),
        reason: reason.into(),
    }
}

fn os_err(path: &[u8], op: &str, e: Errno) -> Error {
    entry_err(path, format!("{op}: {}", e.text()))
}

/// Split a tar path into clean components; refuse absolute paths and `..`
/// (as extraction does).
pub(crate) fn clean(path: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
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

fn no_nul(path: &[u8], s: &[u8]) -> Result<()> {
    if s.contains(&0) {
        Err(entry_err(path, "nul byte found in provided data"))
    } else {
        Ok(())
    }
}

impl TreeBuilder {
    pub fn new(opts: TreeOptions) -> Self {
        // The layer directory (made by the snapshotter like an implicit one).
        let root = Node::new(Kind::Dir, 0o755 & !opts.umask, opts.owner);
        TreeBuilder {
            opts,
            nodes: vec![root],
            paths: Paths::new(),
            cached: None,
            dir_times: Vec::new(),
            root_listed: false,
            created: HashSet::new(),
            whiteouts: HashSet::new(),
            made_dirs: HashSet::new(),
            entries: 0,
            made_dir_bytes: 0,
            setgid_dirs: HashSet::new(),
        }
    }

    /// Entries applied so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    fn alloc(&mut self, n: Node) -> NodeId {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    /// A node extraction makes itself (not from an entry) in `parent`: an
    /// implicit directory (0755 & !umask) or a whiteout (mode 0), owned by
    /// the extracting process, or, in a setgid directory, with its group
    /// (and directories setgid too), as the kernel makes them.
    fn own_node(&self, parent: NodeId, kind: Kind) -> Node {
        let mut n = if kind == Kind::Dir {
            Node::new(Kind::Dir, 0o755 & !self.opts.umask, self.opts.owner)
        } else {
            Node::new(kind, 0, self.opts.owner)
        };
        let p = &self.nodes[parent];
        if p.perm & 0o2000 != 0 {
            n.gid = p.gid;
            if kind == Kind::Dir {
                n.perm |= 0o2000;
            }
        }
        n
    }

    fn child(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.nodes[dir].children.get(name).copied()
    }

    /// openat2(dir, name, O_PATH | O_DIRECTORY, RESOLVE_BENEATH | NO_SYMLINKS)
    /// for one component.
    fn step(&self, dir: NodeId, name: &[u8]) -> std::result::Result<NodeId, Errno> {
        if name.len() > NAME_MAX {
            return Err(Errno::NameTooLong);
        }
        let c = self.child(dir, name).ok_or(Errno::NoEnt)?;
        match self.nodes[c].kind {
            Kind::Dir => Ok(c),
            Kind::Symlink => Err(Errno::Loop),
            _ => Err(Errno::NotDir),
        }
    }

    /// openat2 of the whole relative path: a path of PATH_MAX (4096) bytes
    /// or more is refused before any component is looked at (which also
    /// bounds how deep a layer can make directories).
    fn resolve(&self, comps: &[&[u8]]) -> std::result::Result<NodeId, Errno> {
        let joined = comps
            .iter()
            .map(|c| c.len() + 1)
            .sum::<usize>()
            .saturating_sub(1);
        if joined >= PATH_MAX {
            return Err(Errno::NameTooLong);
        }
        let mut cur = ROOT;
        for c in comps {
            cur = self.step(cur, c)?;
        }
        Ok(cur)
    }

    fn exists(&self, key: PathId) -> bool {
        self.created.contains(&key)
            || self.whiteouts.contains(&key)
            || self.made_dirs.contains(&key)
    }

    /// Open (creating missing directories) the parent of an entry.
    fn parent(&mut self, comps: &[&[u8]], entry: &[u8]) -> Result<NodeId> {
        if comps.is_empty() {
            return Ok(ROOT);
        }
        let key = self.paths.id(comps);
        if let Some((k, id)) = self.cached {
            if k == key {
                return Ok(id);
            }
        }
        if comps.iter().any(|c| c.contains(&0)) {
            return Err(entry_err(entry, "nul byte found in provided data"));
        }
        let id = match self.resolve(comps) {
            Ok(id) => id,
            Err(Errno::NoEnt) => self.make_parents(comps, entry)?,
            Err(Errno::NotDir) if !self.whiteouts.is_empty() => self.make_parents(comps, entry)?,
            Err(e) => return Err(os_err(entry, "opening its parent directory", e)),
        };
        self.cached = Some((key, id));
        Ok(id)
    }

    fn make_parents(&mut self, comps: &[&[u8]], entry: &[u8]) -> Result<NodeId> {
        let mut cur = ROOT;
        let mut pid = ROOT_PATH;
        for c in comps {
            no_nul(entry, c)?;
            pid = self.paths.child(pid, c);
            cur = match self.step(cur, c) {
                Ok(d) => d,
                Err(Errno::NoEnt) => {
                    // Extraction keeps the made directory's path twice (made
                    // and implicit sets), each component with a separator.
                    self.made_dir_bytes += 2 * (self.paths.len[pid as usize] + 1);
                    if self.made_dir_bytes > self.opts.max_made_dir_bytes {
                        return Err(entry_err(
                            entry,
                            format!(
                                "the layer's implicit parent directories need more than {} bytes of paths (new deep paths entry after entry)",
                                self.opts.max_made_dir_bytes
                            ),
                        ));
                    }
                    let mut n = self.own_node(cur, Kind::Dir);
                    n.implicit = true;
                    let d = self.alloc(n);
                    self.nodes[cur].children.insert(c.to_vec(), d);
                    self.made_dirs.insert(pid);
                    d
                }
                // This layer's whiteout with entries below it: the directory
                // is this layer's own and hides the lower one (opaque).
                Err(Errno::NotDir) if self.whiteouts.remove(&pid) => {
                    let mut n = self.own_node(cur, Kind::Dir);
                    n.opaque = true;
                    let d = self.alloc(n);
                    self.nodes[cur].children.insert(c.to_vec(), d);
                    self.made_dirs.insert(pid);
                    d
                }
                Err(Errno::NameTooLong) => {
                    return Err(os_err(entry, "creating a parent", Errno::NameTooLong))
                }
                Err(e) => return Err(os_err(entry, "opening its parent directory", e)),
            };
        }
        Ok(cur)
    }

    /// Is a directory on the way to an entry's parent something else in
    /// this layer (a file, symlink or whiteout)?
    fn parent_is_not_a_dir(&self, dirs: &[&[u8]]) -> bool {
        if dirs.is_empty() || dirs.iter().any(|c| c.contains(&0)) {
            return false;
        }
        matches!(self.resolve(dirs), Err(Errno::NotDir | Errno::Loop))
    }

    fn remove(&mut self, dir: NodeId, name: &[u8]) {
        if let Some(id) = self.nodes[dir].children.remove(name) {
            if self.nodes[id].kind == Kind::Dir {
                // The cached parent may be what was just removed.
                self.cached = None;
            }
        }
    }

    /// Make room for a new entry at parent/name: an existing directory stays
    /// if the new entry is one too; anything else is removed first.
    fn clear_slot(
        &mut self,
        dirs: &[&[u8]],
        name: &[u8],
        new_is_dir: bool,
        entry: &[u8],
    ) -> Result<bool> {
        let parent = self.parent(dirs, entry)?;
        if name.len() > NAME_MAX {
            return Err(os_err(entry, "looking up the entry", Errno::NameTooLong));
        }
        match self.child(parent, name) {
            None => Ok(false),
            Some(c) => {
                if self.nodes[c].kind == Kind::Dir && new_is_dir {
                    return Ok(true);
                }
                self.remove(parent, name);
                Ok(false)
            }
        }
    }

    /// Create `name` in `dir` (fails if taken, like O_EXCL / mkdirat).
    fn create(
        &mut self,
        dir: NodeId,
        name: &[u8],
        node: Node,
        op: &str,
        entry: &[u8],
    ) -> Result<NodeId> {
        if name.len() > NAME_MAX {
            return Err(os_err(entry, op, Errno::NameTooLong));
        }
        if self.child(dir, name).is_some() {
            return Err(os_err(entry, op, Errno::Exist));
        }
        let id = self.alloc(node);
        self.nodes[dir].children.insert(name.to_vec(), id);
        Ok(id)
    }

    /// Apply one tar entry.
    pub fn add(&mut self, e: &TarEntry<'_>) -> Result<()> {
        self.entries += 1;
        let path = e.path;
        let comps = clean(path).map_err(|r| entry_err(path, r))?;
        let (uid, gid) = (e.uid as u32, e.gid as u32);
        let Some((&last, dirs)) = comps.split_last() else {
            // The layer root itself ("./"): its attributes become the root's.
            if e.kind != TarKind::Dir {
                return Err(entry_err(path, "the root entry is not a directory"));
            }
            let xattrs = self.allowed_xattrs(e, false)?;
            let root = &mut self.nodes[ROOT];
            root.uid = uid;
            root.gid = gid;
            root.perm = e.mode & 0o7777;
            root.xattrs.extend(xattrs);
            self.dir_times.push((ROOT_PATH, e.mtime));
            if e.mode & 0o2000 != 0 {
                self.setgid_dirs.insert(ROOT_PATH);
            }
            self.root_listed = true;
            return Ok(());
        };

        if let Some(hidden) = last.strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(last, hidden, dirs, path);
        }

        let key = self.paths.id(&comps);
        no_nul(path, last)?;
        let is_dir = e.kind == TarKind::Dir;
        // Taking the place of this layer's own whiteout: a directory here
        // must still hide the lower layers' one.
        let over_whiteout = self.whiteouts.remove(&key);
        let fresh = !over_whiteout && !self.exists(key);
        let kept_dir = !fresh && self.clear_slot(dirs, last, is_dir, path)?;
        let xattrs = self.allowed_xattrs(e, e.kind == TarKind::Symlink)?;
        let perm = e.mode & 0o7777;

        match e.kind {
            TarKind::File => {
                let parent = self.parent(dirs, path)?;
                // Created with the process's owner (in a setgid directory,
                // the directory's group) and chowned only if that is not
                // the entry's or the parent is known setgid; a directory
                // that became setgid as an implicit child of a setgid one
                // is not known, so its group stays (as extraction leaves it).
                let chown = (!self.setgid_dirs.is_empty()
                    && self.setgid_dirs.contains(&self.paths.id(dirs)))
                    || (uid, gid) != self.opts.owner;
                let p = &self.nodes[parent];
                let gid = if !chown && p.perm & 0o2000 != 0 {
                    p.gid
                } else {
                    gid
                };
                let mut n = Node::new(Kind::File, perm, (uid, gid));
                n.size = e.size;
                n.data = e.data_offset;
                n.sparse = e.sparse.map(|s| s.to_vec());
                n.xattrs.extend(xattrs);
                n.mtime = e.mtime;
                self.create(parent, last, n, "create", path)?;
            }
            TarKind::Dir => {
                // Made with the entry's permission bits, then chowned and
                // chmodded only where that does not already give what the
                // entry says (extraction's rule): in a setgid directory it
                // does not know as one, a directory keeps the group and the
                // setgid bit the kernel gave it.
                let setgid_parent =
                    !self.setgid_dirs.is_empty() && self.setgid_dirs.contains(&self.paths.id(dirs));
                let create_mode = e.mode & 0o777;
                let chown = kept_dir || setgid_parent || (uid, gid) != self.opts.owner;
                let chmod = kept_dir || setgid_parent || perm != create_mode & !self.opts.umask;
                let parent = self.parent(dirs, path)?;
                let id = if kept_dir {
                    self.child(parent, last).expect("kept directory")
                } else {
                    let mut n =
                        Node::new(Kind::Dir, create_mode & !self.opts.umask, self.opts.owner);
                    let p = &self.nodes[parent];
                    if p.perm & 0o2000 != 0 {
                        n.gid = p.gid;
                        n.perm |= 0o2000;
                    }
                    self.create(parent, last, n, "mkdir", path)?
                };
                let n = &mut self.nodes[id];
                if chown {
                    n.uid = uid;
                    n.gid = gid;
                }
                if chmod {
                    n.perm = perm;
                }
                n.xattrs.extend(xattrs);
                if over_whiteout {
                    n.opaque = true;
                }
                // Listed: its own entry's attributes, not a lower layer's.
                n.implicit = false;
                if perm & 0o2000 != 0 {
                    self.setgid_dirs.insert(key);
                } else {
                    self.setgid_dirs.remove(&key);
                }
                self.dir_times.push((key, e.mtime));
            }
            TarKind::Symlink => {
                no_nul(path, e.link)?;
                let parent = self.parent(dirs, path)?;
                if e.link.is_empty() {
                    return Err(os_err(path, "symlink", Errno::NoEnt));
                }
                if e.link.len() > SYMLINK_MAX {
                    return Err(os_err(path, "symlink", Errno::NameTooLong));
                }
                let mut n = Node::new(Kind::Symlink, 0o777, (uid, gid));
                n.link = e.link.to_vec();
                n.size = e.link.len() as u64;
                n.xattrs.extend(xattrs);
                n.mtime = e.mtime;
                self.create(parent, last, n, "symlink", path)?;
            }
            TarKind::Hardlink => {
                let tcomps =
                    clean(e.link).map_err(|r| entry_err(path, format!("hardlink target: {r}")))?;
                let Some((&tlast, tdirs)) = tcomps.split_last() else {
                    return Err(entry_err(path, "hardlink to the layer root"));
                };
                let tkey = self.paths.id(&tcomps);
                if !self.created.contains(&tkey) {
                    return Err(entry_err(
                        path,
                        format!(
                            "hardlink target {:?} is not in this layer (or not yet extracted)",
                            String::from_utf8_lossy(e.link)
                        ),
                    ));
                }
                if tdirs.iter().any(|c| c.contains(&0)) {
                    return Err(entry_err(path, "nul byte found in provided data"));
                }
                let tparent = self
                    .resolve(tdirs)
                    .map_err(|x| os_err(path, "opening the hardlink target's directory", x))?;
                no_nul(path, tlast)?;
                let parent = self.parent(dirs, path)?;
                let target = match self.child(tparent, tlast) {
                    None => return Err(os_err(path, "link", Errno::NoEnt)),
                    Some(t) if self.nodes[t].kind == Kind::Dir => {
                        return Err(os_err(path, "link", Errno::Perm))
                    }
                    Some(t) => t,
                };
                if last.len() > NAME_MAX {
                    return Err(os_err(path, "link", Errno::NameTooLong));
                }
                if self.child(parent, last).is_some() {
                    return Err(os_err(path, "link", Errno::Exist));
                }
                self.nodes[parent].children.insert(last.to_vec(), target);
            }
            TarKind::Char | TarKind::Block | TarKind::Fifo => {
                let kind = match e.kind {
                    TarKind::Char => Kind::Char,
                    TarKind::Block => Kind::Block,
                    _ => Kind::Fifo,
                };
                let parent = self.parent(dirs, path)?;
                // The kernel takes user.* xattrs on files and directories
                // only; extraction fails on a device or fifo that has one.
                if xattrs.iter().any(|(k, _)| k.starts_with(b"user.")) {
                    return Err(os_err(path, "setxattr", Errno::Perm));
                }
                let mut n = Node::new(kind, perm, (uid, gid));
                if kind != Kind::Fifo {
                    n.data = (u64::from(e.dev.0) << 32) | u64::from(e.dev.1);
                }
                n.xattrs.extend(xattrs);
                n.mtime = e.mtime;
                self.create(parent, last, n, "mknod", path)?;
            }
        }
        self.created.insert(key);
        Ok(())
    }

    /// The xattrs extraction sets: never overlay's own; on symlinks, never
    /// `user.` ones (the kernel refuses them there).
    fn allowed_xattrs(&self, e: &TarEntry<'_>, symlink: bool) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for (k, v) in e.xattrs {
            if !xattr_allowed(k.as_bytes()) {
                continue;
            }
            if k.as_bytes().contains(&0) {
                return Err(entry_err(e.path, "NUL in xattr name"));
            }
            if symlink && k.starts_with("user.") {
                continue;
            }
            out.push((k.as_bytes().to_vec(), v.clone()));
        }
        Ok(out)
    }

    fn whiteout(&mut self, last: &[u8], hidden: &[u8], dirs: &[&[u8]], path: &[u8]) -> Result<()> {
        if last == OPAQUE_NAME {
            let dir = self.parent(dirs, path)?;
            self.nodes[dir].opaque = true;
            return Ok(());
        }
        // Other `.wh..wh.` names are aufs metadata.
        if hidden.starts_with(WHITEOUT_PREFIX) {
            return Ok(());
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(entry_err(path, "whiteout of an invalid name"));
        }
        let mut target: Vec<&[u8]> = dirs.to_vec();
        target.push(hidden);
        let key = self.paths.id(&target);
        no_nul(path, hidden)?;
        // A whiteout only hides lower layers: what this layer itself has
        // under that name stays, but a directory of this layer must not
        // merge with the lower one any more (opaque).
        if self.created.contains(&key) {
            let parent = self.parent(dirs, path)?;
            if hidden.len() > NAME_MAX {
                return Err(os_err(path, "looking up the entry", Errno::NameTooLong));
            }
            let c = self
                .child(parent, hidden)
                .ok_or_else(|| os_err(path, "looking up the entry", Errno::NoEnt))?;
            if self.nodes[c].kind == Kind::Dir {
                self.nodes[c].opaque = true;
            }
            return Ok(());
        }
        // Under a file, symlink or whiteout of this layer nothing of the
        // lower layers shows anyway.
        if self.parent_is_not_a_dir(dirs) {
            return Ok(());
        }
        self.clear_slot(dirs, hidden, false, path)?;
        let parent = self.parent(dirs, path)?;
        let n = self.own_node(parent, Kind::Whiteout);
        self.create(parent, hidden, n, "creating the whiteout", path)?;
        self.whiteouts.insert(key);
        Ok(())
    }

    /// Set directory times (last listed first, so a directory listed twice
    /// keeps its first time), then walk the final tree into entries.
    pub fn finish(mut self) -> Result<Vec<EntryRec>> {
        self.cached = None;
        // The parents of listed directories, each resolved once per path
        // (extraction keeps the last one open; nothing changes in this pass).
        let mut at: HashMap<PathId, std::result::Result<NodeId, Errno>> =
            HashMap::from([(ROOT_PATH, Ok(ROOT))]);
        for (key, mtime) in std::mem::take(&mut self.dir_times).into_iter().rev() {
            if key == ROOT_PATH {
                self.nodes[ROOT].mtime = mtime;
                continue;
            }
            let (pkey, ref last) = self.paths.of[key as usize];
            let last = last.clone();
            let parent = match self.resolve_memo(pkey, &mut at) {
                Ok(p) => p,
                // Removed or replaced by a later entry, with what was in it:
                // looked up, never made again.
                Err(Errno::NoEnt | Errno::NotDir | Errno::Loop) => continue,
                Err(e) => {
                    let name = self.paths.comps(key).join(&b'/');
                    return Err(os_err(&name, "set mtime", e));
                }
            };
            // Replaced or removed by a later entry: nothing to date, or
            // whatever took the name gets the directory's time (as lutimes
            // on the name does).
            if let Some(c) = self.child(parent, &last) {
                self.nodes[c].mtime = mtime;
            }
        }
        self.emit()
    }

    /// openat2 of path `p` as a directory (no symlink followed), memoized
    /// by path: each path is resolved from its parent's answer, once.
    fn resolve_memo(
        &self,
        p: PathId,
        at: &mut HashMap<PathId, std::result::Result<NodeId, Errno>>,
    ) -> std::result::Result<NodeId, Errno> {
        if self.paths.len[p as usize] >= PATH_MAX {
            return Err(Errno::NameTooLong);
        }
        // The unresolved ancestors, nearest first.
        let mut chain = Vec::new();
        let mut q = p;
        while !at.contains_key(&q) {
            chain.push(q);
            q = self.paths.of[q as usize].0;
        }
        let mut cur = at[&q];
        for &c in chain.iter().rev() {
            cur = cur.and_then(|d| self.step(d, &self.paths.of[c as usize].1));
            at.insert(c, cur);
        }
        cur
    }

    fn emit(&self) -> Result<Vec<EntryRec>> {
        // The layer root is implicit unless the archive lists it (`./`).
        let mut out = vec![self.rec(ROOT, 0, b"", !self.root_listed)];
        let mut first_seen: HashMap<NodeId, u32> = HashMap::new();
        let mut queue = VecDeque::from([(ROOT, 0u32)]);
        while let Some((dir, idx)) = queue.pop_front() {
            for (name, &c) in &self.nodes[dir].children {
                let me = u32::try_from(out.len())
                    .map_err(|_| Error::Unsupported("more than 4G entries".into()))?;
                let n = &self.nodes[c];
                if n.kind != Kind::Dir {
                    if let Some(&t) = first_seen.get(&c) {
                        if n.kind != Kind::File {
                            return Err(Error::Unsupported(format!(
                                "{:?} is a hardlink to a {:?}; the index holds hardlinks to regular files only",
                                String::from_utf8_lossy(&path_of(&out, idx, name)),
                                n.kind
                            )));
                        }
                        let mut h = EntryRec::new(idx, name, Kind::Hardlink);
                        h.data = t as u64;
                        out.push(h);
                        continue;
                    }
                    first_seen.insert(c, me);
                }
                out.push(self.rec(c, idx, name, n.implicit));
                if n.kind == Kind::Dir {
                    queue.push_back((c, me));
                }
            }
        }
        Ok(out)
    }

    fn rec(&self, id: NodeId, parent: u32, name: &[u8], implicit: bool) -> EntryRec {
        let n = &self.nodes[id];
        let mut r = EntryRec::new(parent, name, n.kind);
        r.perm = n.perm;
        r.uid = n.uid;
        r.gid = n.gid;
        r.mtime = n.mtime;
        r.size = n.size;
        r.data = n.data;
        r.link = n.link.clone();
        r.sparse = n.sparse.clone();
        r.xattrs = n
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        r.opaque = n.opaque && n.kind == Kind::Dir;
        r.implicit = implicit && n.kind == Kind::Dir;
        r
    }
}

/// The path of a new entry `name` under entry `parent` of `out`.
fn path_of(out: &[EntryRec], parent: u32, name: &[u8]) -> Vec<u8> {
    let mut comps = vec![name.to_vec()];
    let mut p = parent;
    while p != 0 {
        comps.push(out[p as usize].name.clone());
        p = out[p as usize].parent;
    }
    comps.reverse();
    comps.join(&b'/')
}
