//! cstore's content-addressed image store: an OCI image layout on disk, a
//! redb metadata database as the source of truth, and the pull that fills it
//! from a registry (through cstore-registry's client).

pub mod error;
pub mod image_config;
pub mod ingest;
pub mod meta;
pub mod platform;
pub mod pull;
pub mod store;

pub use error::{Error, Result};
pub use platform::Platform;
pub use pull::{pull, Event, Observer, PullOptions, PullReport};
pub use store::{DiskUsage, GcReport, Store};
