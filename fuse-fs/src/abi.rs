//! The FUSE wire protocol subset a read-only filesystem needs, as laid out by
//! `include/uapi/linux/fuse.h` at protocol 7.40 (the first minor with passthrough and
//! `FUSE_NOTIFY_RESEND`; newer kernels accept it and keep its layout).
//!
//! Requests are parsed from the bytes `read(2)` on /dev/fuse returned, with every length
//! checked: the kernel is a trusted peer, but a parse bug must be an error, never a panic
//! or an out-of-bounds read. [`parse_request`] is the entry point (and the fuzz target).
//! Replies are built little-endian into byte vectors by the `encode_*` functions.

use std::fmt;

/// The protocol major version we speak.
pub const KERNEL_VERSION: u32 = 7;
/// The minor we claim: 7.40 has passthrough and resend; the kernel adapts to it.
pub const OUR_MINOR: u32 = 40;
/// The root directory's node id.
pub const ROOT_ID: u64 = 1;

/// Opcodes (`enum fuse_opcode`).
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const BMAP: u32 = 37;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const POLL: u32 = 40;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SETUPMAPPING: u32 = 48;
    pub const REMOVEMAPPING: u32 = 49;
    pub const SYNCFS: u32 = 50;
    pub const TMPFILE: u32 = 51;
    pub const STATX: u32 = 52;
}

/// A name for logs.
pub fn opname(opcode: u32) -> &'static str {
    match opcode {
        op::LOOKUP => "LOOKUP",
        op::FORGET => "FORGET",
        op::GETATTR => "GETATTR",
        op::READLINK => "READLINK",
        op::OPEN => "OPEN",
        op::READ => "READ",
        op::STATFS => "STATFS",
        op::RELEASE => "RELEASE",
        op::GETXATTR => "GETXATTR",
        op::LISTXATTR => "LISTXATTR",
        op::FLUSH => "FLUSH",
        op::INIT => "INIT",
        op::OPENDIR => "OPENDIR",
        op::READDIR => "READDIR",
        op::RELEASEDIR => "RELEASEDIR",
        op::ACCESS => "ACCESS",
        op::INTERRUPT => "INTERRUPT",
        op::DESTROY => "DESTROY",
        op::BATCH_FORGET => "BATCH_FORGET",
        op::READDIRPLUS => "READDIRPLUS",
        op::STATX => "STATX",
        _ => "OTHER",
    }
}

/// Whether an opcode modifies the filesystem (answered EROFS rather than ENOSYS).
pub fn is_write_op(opcode: u32) -> bool {
    matches!(
        opcode,
        op::SETATTR
            | op::SYMLINK
            | op::MKNOD
            | op::MKDIR
            | op::UNLINK
            | op::RMDIR
            | op::RENAME
            | op::LINK
            | op::WRITE
            | op::SETXATTR
            | op::REMOVEXATTR
            | op::CREATE
            | op::FALLOCATE
            | op::RENAME2
            | op::COPY_FILE_RANGE
            | op::TMPFILE
    )
}

/// INIT flags: `flags | flags2 << 32` as one u64.
pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const WRITEBACK_CACHE: u64 = 1 << 16;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const CACHE_SYMLINKS: u64 = 1 << 23;
    pub const NO_OPENDIR_SUPPORT: u64 = 1 << 24;
    pub const EXPLICIT_INVAL_DATA: u64 = 1 << 25;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const PASSTHROUGH: u64 = 1 << 37;
    pub const HAS_RESEND: u64 = 1 << 39;
    pub const REQUEST_TIMEOUT: u64 = 1 << 42;
}

/// `open_flags` of an OPEN/OPENDIR reply.
pub mod fopen {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const CACHE_DIR: u32 = 1 << 3;
    pub const PASSTHROUGH: u32 = 1 << 7;
}

/// Notification codes, written as `out_header.error` with `unique == 0`.
pub mod notify {
    pub const INVAL_INODE: i32 = 2;
    pub const INVAL_ENTRY: i32 = 3;
    pub const RESEND: i32 = 7;
}

/// `unique` of a request the kernel requeued after `FUSE_NOTIFY_RESEND`; the reply
/// must echo the unique as received, bit included.
pub const UNIQUE_RESEND: u64 = 1 << 63;

/// /dev/fuse ioctls: `_IOR(229, 0, u32)`, `_IOW(229, 1, struct fuse_backing_map)`,
/// `_IOW(229, 2, u32)`.
pub const DEV_IOC_CLONE: u64 = ioc(IOC_READ, 229, 0, 4);
pub const DEV_IOC_BACKING_OPEN: u64 = ioc(IOC_WRITE, 229, 1, BACKING_MAP_SIZE as u64);
pub const DEV_IOC_BACKING_CLOSE: u64 = ioc(IOC_WRITE, 229, 2, 4);

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
/// The kernel's `_IOC(dir, type, nr, size)` on x86_64/aarch64.
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}

// Struct sizes (checked against the installed fuse.h by tests/abi_header.rs).
pub const IN_HEADER_SIZE: usize = 40;
pub const OUT_HEADER_SIZE: usize = 16;
pub const ATTR_SIZE: usize = 88;
pub const ENTRY_OUT_SIZE: usize = 40 + ATTR_SIZE;
pub const ATTR_OUT_SIZE: usize = 16 + ATTR_SIZE;
pub const OPEN_OUT_SIZE: usize = 16;
pub const INIT_IN_SIZE: usize = 64;
pub const INIT_OUT_SIZE: usize = 64;
pub const READ_IN_SIZE: usize = 40;
pub const RELEASE_IN_SIZE: usize = 24;
pub const GETATTR_IN_SIZE: usize = 16;
pub const OPEN_IN_SIZE: usize = 8;
pub const GETXATTR_IN_SIZE: usize = 8;
pub const GETXATTR_OUT_SIZE: usize = 8;
pub const FORGET_IN_SIZE: usize = 8;
pub const BATCH_FORGET_IN_SIZE: usize = 8;
pub const FORGET_ONE_SIZE: usize = 16;
pub const INTERRUPT_IN_SIZE: usize = 8;
pub const FLUSH_IN_SIZE: usize = 24;
pub const STATFS_OUT_SIZE: usize = 80;
pub const DIRENT_SIZE: usize = 24;
pub const DIRENTPLUS_SIZE: usize = ENTRY_OUT_SIZE + DIRENT_SIZE;
pub const BACKING_MAP_SIZE: usize = 16;
/// The oldest INIT request layout (7.6–7.35, before `flags2`).
pub const INIT_IN_MIN_SIZE: usize = 16;

/// `struct fuse_in_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    /// Whether the kernel resent this request (`FUSE_NOTIFY_RESEND`).
    pub fn is_resent(&self) -> bool {
        self.unique & UNIQUE_RESEND != 0
    }
}

/// A parsed request: the header and the opcode's arguments, borrowing the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub header: InHeader,
    pub op: Op<'a>,
}

/// The arguments of the opcodes a read-only filesystem handles; the rest are `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    Init(InitIn),
    Lookup {
        name: &'a [u8],
    },
    Forget {
        nlookup: u64,
    },
    /// `(nodeid, nlookup)` pairs, still encoded: iterate with [`forget_pairs`].
    BatchForget {
        count: u32,
        pairs: &'a [u8],
    },
    Getattr {
        flags: u32,
        fh: u64,
    },
    Readlink,
    Open {
        flags: u32,
    },
    Read(ReadIn),
    Release {
        fh: u64,
    },
    Opendir {
        flags: u32,
    },
    Readdir(ReadIn),
    ReaddirPlus(ReadIn),
    Releasedir {
        fh: u64,
    },
    Getxattr {
        size: u32,
        name: &'a [u8],
    },
    Listxattr {
        size: u32,
    },
    Statfs,
    Flush {
        fh: u64,
    },
    Access,
    Interrupt {
        unique: u64,
    },
    Destroy,
    /// Any other opcode, with its raw argument bytes.
    Other {
        opcode: u32,
        arg: &'a [u8],
    },
}

/// `struct fuse_init_in` (the fields we use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// `flags | flags2 << 32` (flags2 only if the kernel set `FUSE_INIT_EXT`).
    pub flags: u64,
}

/// `struct fuse_read_in` (READ, READDIR, READDIRPLUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
}

/// Why a request could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Fewer bytes than the header.
    ShortHeader(usize),
    /// The header's `len` disagrees with the bytes read.
    LengthMismatch { header: u32, read: usize },
    /// The opcode's fixed-size argument does not fit.
    ShortArgument {
        opcode: u32,
        need: usize,
        have: usize,
    },
    /// A name argument without its terminating NUL, or empty.
    BadName { opcode: u32 },
    /// BATCH_FORGET's count exceeds the bytes that follow.
    BadForgetCount { count: u32, have: usize },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::ShortHeader(n) => {
                write!(f, "request of {n} bytes is shorter than its header")
            }
            ParseError::LengthMismatch { header, read } => {
                write!(f, "request header says {header} bytes, {read} were read")
            }
            ParseError::ShortArgument { opcode, need, have } => write!(
                f,
                "{} request needs {need} argument bytes, has {have}",
                opname(*opcode)
            ),
            ParseError::BadName { opcode } => {
                write!(f, "{} request has no NUL-terminated name", opname(*opcode))
            }
            ParseError::BadForgetCount { count, have } => {
                write!(f, "BATCH_FORGET of {count} entries in {have} bytes")
            }
        }
    }
}

impl std::error::Error for ParseError {}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(o..o.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(o..o.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(o..o.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Parses the header alone.
pub fn parse_header(buf: &[u8]) -> Result<InHeader, ParseError> {
    let short = ParseError::ShortHeader(buf.len());
    let get32 = |o| u32_at(buf, o).ok_or(short.clone());
    let get64 = |o| u64_at(buf, o).ok_or(short.clone());
    if buf.len() < IN_HEADER_SIZE {
        return Err(short);
    }
    Ok(InHeader {
        len: get32(0)?,
        opcode: get32(4)?,
        unique: get64(8)?,
        nodeid: get64(16)?,
        uid: get32(24)?,
        gid: get32(28)?,
        pid: get32(32)?,
    })
}

/// Parses one request as read from /dev/fuse (one `read(2)` returns exactly one).
/// Never panics, whatever the bytes.
pub fn parse_request(buf: &[u8]) -> Result<Request<'_>, ParseError> {
    let header = parse_header(buf)?;
    if header.len as usize != buf.len() {
        return Err(ParseError::LengthMismatch {
            header: header.len,
            read: buf.len(),
        });
    }
    let arg = &buf[IN_HEADER_SIZE..];
    let opcode = header.opcode;
    let need = |n: usize| {
        if arg.len() < n {
            Err(ParseError::ShortArgument {
                opcode,
                need: n,
                have: arg.len(),
            })
        } else {
            Ok(())
        }
    };
    // `need` has checked the length, so these reads cannot fail; map to the same error
    // anyway rather than unwrap.
    let r32 = |o: usize| {
        u32_at(arg, o).ok_or(ParseError::ShortArgument {
            opcode,
            need: o + 4,
            have: arg.len(),
        })
    };
    let r64 = |o: usize| {
        u64_at(arg, o).ok_or(ParseError::ShortArgument {
            opcode,
            need: o + 8,
            have: arg.len(),
        })
    };
    let read_in = || -> Result<ReadIn, ParseError> {
        need(READ_IN_SIZE)?;
        Ok(ReadIn {
            fh: r64(0)?,
            offset: r64(8)?,
            size: r32(16)?,
        })
    };
    let op = match opcode {
        op::INIT => {
            need(INIT_IN_MIN_SIZE)?;
            let flags1 = r32(12)? as u64;
            // flags2 exists from 7.36 on; it only counts if the kernel says so.
            let flags2 = if flags1 & init::INIT_EXT != 0 {
                u32_at(arg, 16).unwrap_or(0) as u64
            } else {
                0
            };
            Op::Init(InitIn {
                major: r32(0)?,
                minor: r32(4)?,
                max_readahead: r32(8)?,
                flags: flags1 | flags2 << 32,
            })
        }
        op::LOOKUP => Op::Lookup {
            name: cstr(arg, opcode)?,
        },
        op::FORGET => {
            need(FORGET_IN_SIZE)?;
            Op::Forget { nlookup: r64(0)? }
        }
        op::BATCH_FORGET => {
            need(BATCH_FORGET_IN_SIZE)?;
            let count = r32(0)?;
            let pairs = &arg[BATCH_FORGET_IN_SIZE..];
            if (count as usize)
                .checked_mul(FORGET_ONE_SIZE)
                .is_none_or(|n| n > pairs.len())
            {
                return Err(ParseError::BadForgetCount {
                    count,
                    have: pairs.len(),
                });
            }
            Op::BatchForget {
                count,
                pairs: &pairs[..count as usize * FORGET_ONE_SIZE],
            }
        }
        op::GETATTR => {
            need(GETATTR_IN_SIZE)?;
            Op::Getattr {
                flags: r32(0)?,
                fh: r64(8)?,
            }
        }
        op::READLINK => Op::Readlink,
        op::OPEN => {
            need(OPEN_IN_SIZE)?;
            Op::Open { flags: r32(0)? }
        }
        op::OPENDIR => {
            need(OPEN_IN_SIZE)?;
            Op::Opendir { flags: r32(0)? }
        }
        op::READ => Op::Read(read_in()?),
        op::READDIR => Op::Readdir(read_in()?),
        op::READDIRPLUS => Op::ReaddirPlus(read_in()?),
        op::RELEASE => {
            need(RELEASE_IN_SIZE)?;
            Op::Release { fh: r64(0)? }
        }
        op::RELEASEDIR => {
            need(RELEASE_IN_SIZE)?;
            Op::Releasedir { fh: r64(0)? }
        }
        op::GETXATTR => {
            need(GETXATTR_IN_SIZE)?;
            Op::Getxattr {
                size: r32(0)?,
                name: cstr(&arg[GETXATTR_IN_SIZE..], opcode)?,
            }
        }
        op::LISTXATTR => {
            need(GETXATTR_IN_SIZE)?;
            Op::Listxattr { size: r32(0)? }
        }
        op::STATFS => Op::Statfs,
        op::FLUSH => {
            need(FLUSH_IN_SIZE)?;
            Op::Flush { fh: r64(0)? }
        }
        op::ACCESS => Op::Access,
        op::INTERRUPT => {
            need(INTERRUPT_IN_SIZE)?;
            Op::Interrupt { unique: r64(0)? }
        }
        op::DESTROY => Op::Destroy,
        _ => Op::Other { opcode, arg },
    };
    Ok(Request { header, op })
}

/// The bytes of a NUL-terminated, non-empty name at the start of `b`.
fn cstr(b: &[u8], opcode: u32) -> Result<&[u8], ParseError> {
    match b.iter().position(|&c| c == 0) {
        Some(i) if i > 0 => Ok(&b[..i]),
        _ => Err(ParseError::BadName { opcode }),
    }
}

/// The `(nodeid, nlookup)` pairs of a BATCH_FORGET.
pub fn forget_pairs(pairs: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    pairs
        .chunks_exact(FORGET_ONE_SIZE)
        .map(|c| (u64_at(c, 0).unwrap_or(0), u64_at(c, 8).unwrap_or(0)))
}

/// Little-endian writer for replies.
#[derive(Debug, Default, Clone)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn with_capacity(n: usize) -> Self {
        Writer(Vec::with_capacity(n))
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    /// Pads to the next multiple of 8 (dirents are 8-aligned).
    pub fn pad8(&mut self) -> &mut Self {
        let n = self.0.len().next_multiple_of(8);
        self.0.resize(n, 0);
        self
    }
}

/// The attributes of a node (`struct fuse_attr`), as the fs reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: i64,
    pub atime_nsec: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub ctime: i64,
    pub ctime_nsec: u32,
    /// File type and permission bits (`S_IFMT | 07777`).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Device number as userspace sees it (`makedev(major, minor)`); 0 for an overlay
    /// whiteout.
    pub rdev: u64,
    pub blksize: u32,
}

impl Attr {
    /// The `d_type` of a dirent for this mode.
    pub fn dirent_type(&self) -> u32 {
        (self.mode & libc::S_IFMT) >> 12
    }
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
}

/// The kernel's `new_encode_dev()` of a userspace `dev_t`: what `fuse_attr.rdev` holds.
pub fn encode_dev(dev: u64) -> u32 {
    let (ma, mi) = (libc::major(dev), libc::minor(dev));
    (mi & 0xff) | (ma << 8) | ((mi & !0xff) << 12)
}

/// `struct fuse_attr`.
pub fn encode_attr(w: &mut Writer, a: &Attr) {
    w.u64(a.ino)
        .u64(a.size)
        .u64(a.blocks)
        .u64(a.atime as u64)
        .u64(a.mtime as u64)
        .u64(a.ctime as u64)
        .u32(a.atime_nsec)
        .u32(a.mtime_nsec)
        .u32(a.ctime_nsec)
        .u32(a.mode)
        .u32(a.nlink)
        .u32(a.uid)
        .u32(a.gid)
        .u32(encode_dev(a.rdev))
        .u32(if a.blksize == 0 { 4096 } else { a.blksize })
        .u32(0);
}

/// A validity period: whole seconds plus nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ttl {
    pub secs: u64,
    pub nsecs: u32,
}

impl From<std::time::Duration> for Ttl {
    fn from(d: std::time::Duration) -> Self {
        Ttl {
            secs: d.as_secs(),
            nsecs: d.subsec_nanos(),
        }
    }
}

/// `struct fuse_entry_out`. `nodeid == 0` with a TTL is a cached negative entry.
pub fn encode_entry(w: &mut Writer, nodeid: u64, attr: &Attr, entry_ttl: Ttl, attr_ttl: Ttl) {
    w.u64(nodeid)
        .u64(0) // generation: node ids are never reused within a mount
        .u64(entry_ttl.secs)
        .u64(attr_ttl.secs)
        .u32(entry_ttl.nsecs)
        .u32(attr_ttl.nsecs);
    encode_attr(w, attr);
}

/// `struct fuse_attr_out`.
pub fn encode_attr_out(w: &mut Writer, attr: &Attr, ttl: Ttl) {
    w.u64(ttl.secs).u32(ttl.nsecs).u32(0);
    encode_attr(w, attr);
}

/// `struct fuse_open_out`.
pub fn encode_open_out(w: &mut Writer, fh: u64, open_flags: u32, backing_id: u32) {
    w.u64(fh).u32(open_flags).u32(backing_id);
}

/// `struct fuse_getxattr_out` (the size answer to a size-0 probe).
pub fn encode_getxattr_out(w: &mut Writer, size: u32) {
    w.u32(size).u32(0);
}

/// Filesystem statistics (`struct fuse_kstatfs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// `struct fuse_statfs_out`.
pub fn encode_statfs(w: &mut Writer, s: &Statfs) {
    w.u64(s.blocks)
        .u64(s.bfree)
        .u64(s.bavail)
        .u64(s.files)
        .u64(s.ffree)
        .u32(s.bsize)
        .u32(s.namelen)
        .u32(s.frsize)
        .u32(0)
        .zeros(24);
}

/// `struct fuse_dirent` + name + padding, or `struct fuse_direntplus` when `plus`.
/// `off` is the cookie of the *next* entry. The kernel skips the entry part of `.` and
/// `..`, so they carry node id 0 there.
pub fn encode_dirent(w: &mut Writer, plus: Option<(Ttl, Ttl)>, name: &[u8], attr: &Attr, off: u64) {
    if let Some((entry_ttl, attr_ttl)) = plus {
        if name == b"." || name == b".." {
            encode_entry(w, 0, &Attr::default(), Ttl::default(), Ttl::default());
        } else {
            encode_entry(w, attr.ino, attr, entry_ttl, attr_ttl);
        }
    }
    w.u64(attr.ino)
        .u64(off)
        .u32(name.len() as u32)
        .u32(attr.dirent_type())
        .bytes(name)
        .pad8();
}

/// The size [`encode_dirent`] will write.
pub fn dirent_len(plus: bool, name_len: usize) -> usize {
    let base = if plus { DIRENTPLUS_SIZE } else { DIRENT_SIZE };
    (base + name_len).next_multiple_of(8)
}

/// The answer to INIT (`struct fuse_init_out`, 7.40 layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOut {
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub max_stack_depth: u32,
}

pub fn encode_init_out(w: &mut Writer, o: &InitOut) {
    w.u32(KERNEL_VERSION)
        .u32(o.minor)
        .u32(o.max_readahead)
        .u32(o.flags as u32)
        .u16(o.max_background)
        .u16(o.congestion_threshold)
        .u32(o.max_write)
        .u32(o.time_gran)
        .u16(o.max_pages)
        .u16(0) // map_alignment
        .u32((o.flags >> 32) as u32)
        .u32(o.max_stack_depth)
        // 7.43's request_timeout lives here; 0 = none, and it must stay none: a timeout
        // shorter than a daemon restart would abort the connection.
        .zeros(24);
}

/// `struct fuse_out_header`.
pub fn encode_out_header(len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER_SIZE] {
    let mut h = [0u8; OUT_HEADER_SIZE];
    h[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// `struct fuse_backing_map { int32_t fd; uint32_t flags; uint64_t padding; }`.
pub fn encode_backing_map(fd: i32) -> [u8; BACKING_MAP_SIZE] {
    let mut m = [0u8; BACKING_MAP_SIZE];
    m[0..4].copy_from_slice(&fd.to_le_bytes());
    m
}

/// Reads `u16` at `o`, for tests and tools decoding replies.
pub fn read_u16(b: &[u8], o: usize) -> Option<u16> {
    u16_at(b, o)
}
/// Reads `u32` at `o`.
pub fn read_u32(b: &[u8], o: usize) -> Option<u32> {
    u32_at(b, o)
}
/// Reads `u64` at `o`.
pub fn read_u64(b: &[u8], o: usize) -> Option<u64> {
    u64_at(b, o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(opcode: u32, unique: u64, nodeid: u64, arg: &[u8]) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32((IN_HEADER_SIZE + arg.len()) as u32)
            .u32(opcode)
            .u64(unique)
            .u64(nodeid)
            .u32(0)
            .u32(0)
            .u32(42)
            .u32(0)
            .bytes(arg);
        w.0
    }

    fn samples() -> Vec<Vec<u8>> {
        let mut init = Writer::default();
        init.u32(7)
            .u32(45)
            .u32(131072)
            .u32((init::INIT_EXT | init::ASYNC_READ) as u32)
            .u32((init::PASSTHROUGH >> 32) as u32)
            .zeros(44);
        let mut read = Writer::default();
        read.u64(5).u64(4096).u32(8192).u32(0).u64(0).u32(0).u32(0);
        let mut bf = Writer::default();
        bf.u32(2).u32(0).u64(7).u64(1).u64(8).u64(2);
        let mut gx = Writer::default();
        gx.u32(0).u32(0).bytes(b"trusted.overlay.opaque\0");
        vec![
            request(op::INIT, 1, 0, &init.0),
            request(op::LOOKUP, 2, 1, b"name\0"),
            request(op::READ, 3, 5, &read.0),
            request(op::READDIRPLUS, 4, 1, &read.0),
            request(op::BATCH_FORGET, 5, 0, &bf.0),
            request(op::GETXATTR, 6, 3, &gx.0),
            request(op::GETATTR, 7, 3, &[0u8; 16]),
            request(op::FORGET, 8, 3, &1u64.to_le_bytes()),
            request(op::RELEASE, 9, 3, &[0u8; 24]),
            request(op::FLUSH, 10, 3, &[0u8; 24]),
            request(op::OPEN, 11, 3, &[0u8; 8]),
            request(op::LISTXATTR, 12, 3, &[0u8; 8]),
            request(op::INTERRUPT, 13, 0, &3u64.to_le_bytes()),
            request(op::WRITE, 14, 3, &[1u8; 100]),
        ]
    }

    #[test]
    fn parses_the_requests_a_read_only_fs_gets() {
        let s = samples();
        let r = parse_request(&s[0]).unwrap();
        assert_eq!(
            r.op,
            Op::Init(InitIn {
                major: 7,
                minor: 45,
                max_readahead: 131072,
                flags: init::INIT_EXT | init::ASYNC_READ | init::PASSTHROUGH
            })
        );
        assert_eq!(r.header.pid, 42);
        assert_eq!(
            parse_request(&s[1]).unwrap().op,
            Op::Lookup { name: b"name" }
        );
        assert_eq!(
            parse_request(&s[2]).unwrap().op,
            Op::Read(ReadIn {
                fh: 5,
                offset: 4096,
                size: 8192
            })
        );
        match parse_request(&s[4]).unwrap().op {
            Op::BatchForget { count, pairs } => {
                assert_eq!(count, 2);
                assert_eq!(
                    forget_pairs(pairs).collect::<Vec<_>>(),
                    vec![(7, 1), (8, 2)]
                );
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(
            parse_request(&s[5]).unwrap().op,
            Op::Getxattr {
                size: 0,
                name: b"trusted.overlay.opaque"
            }
        );
        assert_eq!(
            parse_request(&s[12]).unwrap().op,
            Op::Interrupt { unique: 3 }
        );
        assert!(matches!(
            parse_request(&s[13]).unwrap().op,
            Op::Other {
                opcode: op::WRITE,
                ..
            }
        ));
    }

    #[test]
    fn init_without_init_ext_ignores_flags2() {
        let mut init = Writer::default();
        init.u32(7).u32(45).u32(0).u32(0).u32(u32::MAX).zeros(44);
        let b = request(op::INIT, 1, 0, &init.0);
        match parse_request(&b).unwrap().op {
            Op::Init(i) => assert_eq!(i.flags, 0),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn malformed_requests_are_errors() {
        assert_eq!(parse_request(&[0u8; 10]), Err(ParseError::ShortHeader(10)));
        let mut b = request(op::LOOKUP, 1, 1, b"abc\0");
        b[0] = 99;
        assert!(matches!(
            parse_request(&b),
            Err(ParseError::LengthMismatch { header: 99, .. })
        ));
        let b = request(op::LOOKUP, 1, 1, b"abc");
        assert_eq!(
            parse_request(&b),
            Err(ParseError::BadName { opcode: op::LOOKUP })
        );
        let b = request(op::LOOKUP, 1, 1, b"\0");
        assert!(parse_request(&b).is_err());
        let b = request(op::READ, 1, 1, &[0u8; 39]);
        assert!(matches!(
            parse_request(&b),
            Err(ParseError::ShortArgument {
                need: 40,
                have: 39,
                ..
            })
        ));
        let mut bf = Writer::default();
        bf.u32(u32::MAX).u32(0).u64(1).u64(1);
        let b = request(op::BATCH_FORGET, 1, 0, &bf.0);
        assert!(matches!(
            parse_request(&b),
            Err(ParseError::BadForgetCount { .. })
        ));
    }

    /// Every prefix and many random corruptions of every sample: errors, never panics,
    /// and a parsed name or slice always lies within the buffer.
    #[test]
    fn parse_never_panics_on_truncated_or_corrupted_input() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut parsed = 0;
        for s in samples() {
            for n in 0..=s.len() {
                let mut b = s[..n].to_vec();
                if b.len() >= 4 {
                    b[0..4].copy_from_slice(&(n as u32).to_le_bytes());
                }
                parsed += parse_request(&b).is_ok() as usize;
            }
            for _ in 0..2000 {
                let mut b = s.clone();
                for _ in 0..(rnd() % 6 + 1) {
                    let i = (rnd() as usize) % b.len();
                    b[i] = rnd() as u8;
                }
                if rnd() % 2 == 0 {
                    let l = b.len() as u32;
                    b[0..4].copy_from_slice(&l.to_le_bytes());
                }
                if let Ok(r) = parse_request(&b) {
                    parsed += 1;
                    if let Op::Lookup { name } | Op::Getxattr { name, .. } = r.op {
                        assert!(!name.is_empty() && !name.contains(&0));
                    }
                }
            }
        }
        assert!(
            parsed > 100,
            "the corpus must also exercise successful parses"
        );
    }

    #[test]
    fn encoders_write_the_struct_sizes() {
        let a = Attr::default();
        let mut w = Writer::default();
        encode_attr(&mut w, &a);
        assert_eq!(w.0.len(), ATTR_SIZE);
        let mut w = Writer::default();
        encode_entry(&mut w, 1, &a, Ttl::default(), Ttl::default());
        assert_eq!(w.0.len(), ENTRY_OUT_SIZE);
        let mut w = Writer::default();
        encode_attr_out(&mut w, &a, Ttl::default());
        assert_eq!(w.0.len(), ATTR_OUT_SIZE);
        let mut w = Writer::default();
        encode_open_out(&mut w, 1, 0, 0);
        assert_eq!(w.0.len(), OPEN_OUT_SIZE);
        let mut w = Writer::default();
        encode_statfs(&mut w, &Statfs::default());
        assert_eq!(w.0.len(), STATFS_OUT_SIZE);
        let mut w = Writer::default();
        encode_init_out(
            &mut w,
            &InitOut {
                minor: 40,
                max_readahead: 0,
                flags: 0,
                max_background: 0,
                congestion_threshold: 0,
                max_write: 0,
                time_gran: 1,
                max_pages: 256,
                max_stack_depth: 1,
            },
        );
        assert_eq!(w.0.len(), INIT_OUT_SIZE);
        for (plus, name) in [(false, &b"a"[..]), (true, b"abcdefgh"), (true, b".")] {
            let mut w = Writer::default();
            encode_dirent(
                &mut w,
                plus.then_some((Ttl::default(), Ttl::default())),
                name,
                &a,
                3,
            );
            assert_eq!(w.0.len(), dirent_len(plus, name.len()));
            assert_eq!(w.0.len() % 8, 0);
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernels() {
        // Values from the uapi header's _IOR/_IOW expansions on x86_64.
        assert_eq!(DEV_IOC_CLONE, 0x8004_e500);
        assert_eq!(DEV_IOC_BACKING_OPEN, 0x4010_e501);
        assert_eq!(DEV_IOC_BACKING_CLOSE, 0x4004_e502);
    }

    #[test]
    fn newer_than_debians_header_matches_the_uapi_text() {
        // Debian's <linux/fuse.h> is 7.38; these came later (uapi fuse.h, 7.39/7.40).
        assert_eq!(op::STATX, 52);
        assert_eq!(init::HAS_RESEND, 1 << 39);
        assert_eq!(notify::RESEND, 7);
        assert_eq!(UNIQUE_RESEND, 1 << 63);
    }

    #[test]
    fn rdev_encoding_is_new_encode_dev() {
        assert_eq!(encode_dev(0), 0);
        assert_eq!(encode_dev(libc::makedev(1, 5)), 0x105);
        assert_eq!(
            encode_dev(libc::makedev(259, 0x12345)),
            0x45 | (259 << 8) | (0x123 << 20)
        );
    }
}
