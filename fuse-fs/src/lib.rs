//! cstore's FUSE machinery for lazy layers (issues #14/#15; design in docs/lazy.md).
//!
//! Our own protocol loop rather than fuser: a restarted daemon must take over a live
//! /dev/fuse connection *without* the INIT handshake (fuser's `Session::from_fd` always
//! performs it), ask the kernel to resend what the dead daemon had read
//! (`FUSE_NOTIFY_RESEND`), echo resent uniques, and know the passthrough backing ids the
//! dead daemon registered. The read-only subset of the protocol is small.
//!
//! - [`abi`]: the wire structs (7.40 layout), bounds-checked request parsing
//!   ([`abi::parse_request`], the fuzz entry point), reply encoding.
//! - [`dev`]: /dev/fuse, mount/unmount of `fuse.cstore`, replies, notifications,
//!   passthrough backing ids, the connection id, fusectl, bdi readahead.
//! - [`session`]: [`Session::start`] (mount + INIT) and [`Session::resume`] (no INIT),
//!   worker threads on one fd dispatching to a [`ReadOnlyFs`].
//! - [`state`]: what a resumed session needs on disk.
//! - [`keeper`]: [`FdStore`] (a keeper process, or systemd's fd store) holding the fd
//!   between daemons.
//! - [`supervisor`]: restart in time, or abort the connection after repeated failures.
//! - [`dirfs`]: a [`ReadOnlyFs`] over a directory tree (tests, reference).
//! - [`layer`]: [`LayerFs`], a lazy layer served from its index (`cstore-index`), its
//!   data fetched by span through a [`SpanSource`] into the layer's own tree.

pub mod abi;
pub mod dev;
pub mod dirfs;
mod error;
pub mod fs;
pub mod keeper;
pub mod layer;
pub mod session;
pub mod state;
pub mod supervisor;
mod util;

pub use abi::{Attr, Statfs};
pub use dev::{ConnId, FuseDev, Fusectl, MountOptions};
pub use dirfs::DirFs;
pub use error::{Error, Result};
pub use fs::{DirSink, Errno, Open, ReadOnlyFs, ROOT_ID};
pub use keeper::{FdStore, Keeper, KeeperClient, SystemdFdStore};
pub use layer::{FileSource, LayerFs, LayerOptions, SpanSource};
pub use session::{Exit, PassthroughMode, Session, SessionOptions, Stats, Stopper};
pub use state::{Negotiated, Saved, Settings, StateDir};
pub use supervisor::{supervise, RestartPolicy, Supervised, EXIT_DECLINED, EXIT_STOPPED};
