//! cstore's exit status, by the kind of the error it failed with (the
//! table is in README.md). A container's own status passes through `run`
//! unchanged; these are cstore's failures.

use cstore_os::{Classify, ErrorKind};

/// The kind of the outermost error in the chain that knows one (each
/// crate's error delegates to what it wraps); Unknown if none does.
pub fn kind_of(e: &anyhow::Error) -> ErrorKind {
    fn kind<T: Classify + std::error::Error + 'static>(
        e: &(dyn std::error::Error + 'static),
    ) -> Option<ErrorKind> {
        e.downcast_ref::<T>().map(Classify::kind)
    }
    e.chain()
        .find_map(|c| {
            kind::<cstore_lazy::Error>(c)
                .or_else(|| kind::<cstore_store::Error>(c))
                .or_else(|| kind::<cstore_registry::Error>(c))
                .or_else(|| kind::<cstore_unpack::Error>(c))
                .or_else(|| kind::<cstore_snapshotter::Error>(c))
                .or_else(|| kind::<cstore_runtime::Error>(c))
                .or_else(|| kind::<cstore_blockio::Error>(c))
                .or_else(|| kind::<cstore_bench::Error>(c))
                .or_else(|| kind::<cstore_os::Error>(c))
                .or_else(|| kind::<cstore_os::IoError>(c))
        })
        .unwrap_or(ErrorKind::Unknown)
}

/// The exit status for a kind. 1 is any failure without one; 2 is clap's
/// for a command line it cannot parse; 64-78 are the kinds (above what
/// shells and docker reserve, below 125); a cancel by a signal is 130,
/// the shell's 128 + SIGINT.
pub fn code(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::Unknown => 1,
        ErrorKind::InvalidArgument => 64,
        ErrorKind::NotFound => 65,
        ErrorKind::AlreadyExists => 66,
        ErrorKind::FailedPrecondition | ErrorKind::Conflict | ErrorKind::NotModified => 67,
        ErrorKind::Unavailable => 68,
        ErrorKind::PermissionDenied => 69,
        ErrorKind::Unauthenticated => 70,
        ErrorKind::ResourceExhausted => 71,
        ErrorKind::Aborted => 72,
        ErrorKind::DeadlineExceeded => 73,
        ErrorKind::NotImplemented => 74,
        ErrorKind::OutOfRange => 75,
        ErrorKind::DataLoss => 76,
        ErrorKind::Internal => 77,
        ErrorKind::Canceled => 130,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_code_and_wrapped_errors_keep_theirs() {
        let mut seen = std::collections::HashMap::new();
        for k in ErrorKind::ALL {
            let c = code(k);
            let shared = matches!(
                k,
                ErrorKind::FailedPrecondition | ErrorKind::Conflict | ErrorKind::NotModified
            );
            if let Some(other) = seen.insert(c, k) {
                assert!(shared, "{k:?} and {other:?} share exit code {c}");
            }
            assert!(c == 1 || c == 130 || (64..=78).contains(&c), "{k:?}: {c}");
        }
        // Through anyhow's context and the crates' wrapping.
        let e = anyhow::Error::from(cstore_snapshotter::Error::Store(
            cstore_store::Error::ImageNotFound("x".into()),
        ))
        .context("unpacking x");
        assert_eq!(kind_of(&e), ErrorKind::NotFound);
        assert_eq!(code(kind_of(&e)), 65);
        let e = anyhow::anyhow!("no kind");
        assert_eq!(kind_of(&e), ErrorKind::Unknown);
        assert_eq!(code(kind_of(&e)), 1);
    }
}
