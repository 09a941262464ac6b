//! The ring's own contract, on both backends.

use std::os::fd::AsRawFd;

use cstore_blockio::{Backend, Done, Mode, Op, Ring};

/// `submit(n)` counts completions already collected but not yet reaped: a
/// second wait must not sit in the kernel for completions it already has.
#[test]
fn waiting_counts_completions_not_yet_reaped() {
    for (mode, backend) in [(Mode::Auto, Backend::IoUring), (Mode::Sync, Backend::Sync)] {
        let f = tempfile::tempfile_in("/var/tmp").unwrap();
        let mut ring = Ring::new(4, false, mode);
        assert_eq!(ring.backend(), backend);
        for i in 0..2 {
            let op = Op::Fsync {
                fd: f.as_raw_fd(),
                datasync: false,
            };
            ring.push(op, i, false).unwrap();
        }
        ring.submit(2).unwrap();
        // Nothing is outstanding in the kernel now: this returns at once.
        ring.submit(1).unwrap();
        let mut done: Vec<Done> = Vec::new();
        ring.reap(&mut done);
        assert_eq!(done.len(), 2, "{backend:?}");
        assert!(done.iter().all(|d| d.result.is_ok()), "{backend:?}");
        assert_eq!(ring.in_flight(), 0, "{backend:?}");
    }
}
