//! cstore's OCI distribution client: image references (normalized as docker
//! does), auth (challenges, bearer tokens, credentials, docker's config),
//! the media types it negotiates, manifests read under a size cap, and blobs:
//! a whole blob as a stream that resumes with Range by itself after a dropped
//! connection ([`RegistryClient::blob`]), or a byte range of one
//! ([`RegistryClient::blob_range`]); and the little writing `cstore index
//! push` needs (blobs, manifests, the referrers API). It knows nothing of
//! the store or of layer indexes.

pub mod auth;
mod blob;
mod client;
pub mod error;
pub mod helpers;
pub mod hosts;
pub mod media;
mod push;
pub mod reference;

pub use blob::{content_range, content_range_start, BlobReader, MAX_RANGE_BYTES};
pub use client::{
    ClientOptions, FetchedManifest, RegistryClient, MAX_ERROR_BODY_BYTES, MAX_MANIFEST_BYTES,
    MAX_TOKEN_BYTES,
};
pub use error::{Error, Result};
pub use reference::{parse_digest, Reference};
