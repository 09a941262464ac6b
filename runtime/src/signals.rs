//! SIGINT, SIGTERM, SIGHUP and SIGQUIT reach the container's init while it
//! runs (docker's sig-proxy): cstore outlives them, so it can restore the
//! terminal and report the exit status.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

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
