//! Snapshots for cstore, in containerd's model (committed / active / view,
//! parent chains, labels), laid out as containerd's overlayfs snapshotter
//! lays them out, plus unpacking images into them and mounting them.

pub mod error;
pub mod image;
pub mod snapshots;

pub use cstore_os::mount::{self, Mount};
pub use error::{Error, Result};
pub use snapshots::{Info, Kind, Snapshotter, Usage};
pub mod filter;
pub mod service;
