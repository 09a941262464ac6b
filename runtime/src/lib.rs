//! Pieces of `cstore run`. So far: disk I/O limits for a container's cgroup
//! on the block device under the store, written as cgroup v2 `io.max` or v1
//! `blkio.throttle.*`, whichever hierarchy holds the io controller here.

pub mod cgroup;

pub use cgroup::{Cgroup, Error, Hierarchy, IoLimits};
