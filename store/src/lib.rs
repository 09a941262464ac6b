//! cstore's content-addressed image store: an OCI image layout on disk, a
//! redb metadata database as the source of truth, and a registry client that
//! pulls into it.

pub mod confined;
pub mod error;
pub mod image_config;
pub mod ingest;
pub mod layout;
pub mod media;
pub mod meta;
pub mod platform;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod store;
pub mod unpack;

pub use error::{Error, Result};
pub use platform::Platform;
pub use pull::{pull, Event, Observer, PullOptions, PullReport};
pub use reference::Reference;
pub use store::{tree_usage, write_atomic, DiskUsage, GcReport, Store, TreeUsage};
