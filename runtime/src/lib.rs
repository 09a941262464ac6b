//! `cstore run`'s runtime: containers launched with youki's libcontainer
//! from an OCI runtime spec cstore builds, and disk I/O limits on the store's
//! device (cgroup v2 `io.max` or v1 `blkio.throttle.*`, whichever hierarchy
//! holds the io controller here).

pub mod cgroup;
pub mod container;
mod error;
pub mod record;
pub mod rootfs;
mod signals;
mod start;
pub mod teardown;
pub mod tty;
pub mod user;
pub mod userns;
pub mod validate;

pub use cgroup::{Cgroup, Hierarchy, IoLimits};
pub use container::{build_spec, run, run_with, RunSpec, START_TIMEOUT};
pub use error::Error;
pub use record::{Record, State};
