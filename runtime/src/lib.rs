//! `cstore run`'s runtime: containers launched with youki's libcontainer
//! from an OCI runtime spec cstore builds, and disk I/O limits on the store's
//! device (cgroup v2 `io.max` or v1 `blkio.throttle.*`, whichever hierarchy
//! holds the io controller here).

pub mod cgroup;
pub mod container;
mod signals;

pub use cgroup::{Cgroup, Error, Hierarchy, IoLimits};
pub use container::{build_spec, run, run_then, RunError, RunSpec};
