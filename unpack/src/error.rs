//! The unpack crate's one error type. Each message names the image, the
//! layer and, where there is one, the entry.

use cstore_os::IoError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layer cannot be unpacked as it is: a malformed or hostile
    /// archive, a bomb, or a failure writing an entry.
    #[error("image {image}: layer {layer}{}: {reason}", entry.as_ref().map(|e| format!(", entry {e:?}")).unwrap_or_default())]
    Layer {
        image: String,
        layer: String,
        entry: Option<String>,
        reason: String,
    },

    #[error("image {image}: layer {layer}: uncompressed content hashes to {actual}, but the config's diff_id is {expected}")]
    DiffIdMismatch {
        image: String,
        layer: String,
        expected: String,
        actual: String,
    },

    #[error(transparent)]
    Io(#[from] IoError),
}
