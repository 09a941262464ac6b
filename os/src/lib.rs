//! What several cstore crates share, and nothing that speaks HTTP or (but
//! behind the `db` feature) links a database, so that the runtime can use it:
//!
//! - `error`: containerd's error kinds (`ErrorKind`, errdefs), the shared io
//!   error (`IoError`: operation, path, cause) and how errnos map to kinds;
//! - `sys`: thin wrappers over the *at syscalls on fds, and the one family
//!   of confined opens (openat2 with RESOLVE_*);
//! - `tree`: directories of a tree the store does not control, reached and
//!   changed only through fds; `tree_usage`;
//! - `mountinfo`: the one parser of /proc/self/mountinfo (with unescaping);
//! - `mount`: mounts as containerd describes them, and doing them;
//! - `process`: a process told apart from a later one with its pid;
//! - `file`: atomic writes, directory sync, lock files;
//! - `testing`: a test whose facility is missing skips visibly (fails under CI);
//! - `layout`: who may enter the store's root (modes of ROOT and below);
//! - `db` (feature `db`): the redb file shared by processes (`DbFile`).

#[cfg(feature = "db")]
pub mod db;
pub mod error;
pub mod file;
pub mod layout;
pub mod mount;
pub mod mountinfo;
pub mod process;
pub mod sys;
pub mod testing;
pub mod tree;

pub use error::{Classify, Error, ErrorKind, IoError, IoResultExt, Result};
pub use file::{sync_dir, write_atomic, write_atomic_volatile, FileLock};
pub use process::{now_unix, Proc};
