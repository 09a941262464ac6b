//! SIGINT, SIGTERM, SIGHUP and SIGQUIT reach the container's init while it
//! runs (docker's sig-proxy): cstore outlives them, so it can restore the
//! terminal and report the exit status. And the container's process starts
//! with every signal at its default action, as under docker.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::Spec;

static TARGET: AtomicI32 = AtomicI32::new(0);
static INSTALL: Once = Once::new();

extern "C" fn forward(sig: libc::c_int) {
    let pid = TARGET.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Forward SIGINT/SIGTERM/SIGHUP/SIGQUIT to `pid` (0: stop forwarding).
pub fn forward_to(pid: i32) {
    TARGET.store(pid, Ordering::SeqCst);
    INSTALL.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            // SAFETY: installing a handler that only calls kill(2).
            unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
        }
    });
}

/// libcontainer's executor, after resetting every signal to its default
/// action and unblocking all. exec keeps what is ignored: SIGPIPE (Rust
/// ignores it in cstore), and whatever cstore inherited ignored (`nohup`,
/// `cmd &` in a script ignores SIGINT and SIGQUIT), which would leave the
/// container's process unable to die of, or trap, those signals.
#[derive(Clone)]
pub(crate) struct DefaultSignals;

impl Executor for DefaultSignals {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            // The raw syscall: glibc refuses its own 32 and 33, which may
            // be ignored too. An all-zero kernel sigaction is SIG_DFL, no
            // flags, empty mask, whatever the architecture's field order.
            let dfl = [0u64; 4];
            // SAFETY: rt_sigaction reads a kernel sigaction (at most 32
            // bytes, with the 8-byte sigset given) from `dfl`.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    dfl.as_ptr(),
                    std::ptr::null_mut::<u8>(),
                    8usize,
                )
            };
        }
        let empty = nix::sys::signal::SigSet::empty();
        let _ = nix::sys::signal::sigprocmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&empty),
            None,
        );
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}
