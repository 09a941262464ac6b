//! `cstore-lazy`: lazy layers, where the pieces meet (docs/lazy.md).
//!
//! The registry client knows nothing of indexes, the index crate nothing of
//! the network, fuse-fs nothing of registries, and the store and snapshotter
//! nothing of FUSE: this crate joins them.
//! - [`source::RegistrySource`]: a `SpanSource` reading a layer's compressed
//!   bytes by range from its registry (auth, token cache, retries, size caps
//!   of the client), and the windows from the store or the registry.
//! - [`artifact`]: `index build` (from the registry, blobs never stored),
//!   `index push` (an OCI artifact whose subject is the image manifest) and
//!   finding it again (referrers API, or the referrers tag schema).
//! - [`remote`]: lazy layers for containerd's snapshotter (a Prepare with
//!   `containerd.io/snapshot.ref` and CRI's labels; mounts over them).

pub mod artifact;
pub mod error;
pub mod pull;
pub mod remote;
pub mod serve;
pub mod source;

pub use error::{Error, Result};
