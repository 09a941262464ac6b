//! `cstore run`'s runtime: docker's rules for a container's process
//! (`policy`: the image config merged with the caller's overrides), the
//! containers a store keeps and their life (`containers`: names, labels,
//! records, prepare → launch → teardown, removal), containers launched with
//! youki's libcontainer from an OCI runtime spec cstore builds, and disk I/O
//! limits on the store's device (cgroup v2 `io.max` or v1
//! `blkio.throttle.*`, whichever hierarchy holds the io controller here).
//!
//! It links no HTTP, TLS or database crate: the image (its config bytes and
//! top snapshot) is resolved by the caller, and the snapshot tree is reached
//! through `containers::Snapshots`.

pub mod cgroup;
pub mod container;
pub mod containers;
mod error;
pub mod policy;
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
pub use containers::{Container, Containers, RunRequest, Snapshots};
pub use error::Error;
pub use policy::{ImageConfig, Overrides, Process};
pub use record::{Record, State};
