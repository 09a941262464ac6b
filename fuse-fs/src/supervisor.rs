//! Restarting a dead daemon in time, and bounding the damage when it keeps dying.
//!
//! While a kept FUSE connection has no daemon, every access to the mount waits, and a
//! process waiting on a request the dead daemon had read cannot even be killed. So the
//! daemon is restarted at once; after `max_failures` failures within `window`, the
//! connection is aborted through fusectl: readers get ENOTCONN instead of hanging.
//!
//! Exit status convention of a supervised daemon: 0 = the filesystem was unmounted
//! (done); [`EXIT_STOPPED`] = stopped on request, the fd left in the store (restart, not
//! a failure: an upgrade); anything else, a signal included, is a failure.

use std::collections::VecDeque;
use std::io;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::dev::{ConnId, Fusectl};
use crate::error::Result;

/// The exit code of a daemon that stopped on request and left its fd to the next one
/// (`EX_TEMPFAIL`).
pub const EXIT_STOPPED: i32 = 75;

/// The exit code of a daemon that declined to serve because the store's lazy
/// layers belong to a systemd unit (ROOT/lazy/systemd-unit), which takes the
/// connections a keeper holds over: its keeper runs no other daemon
/// (`EX_PROTOCOL`).
pub const EXIT_DECLINED: i32 = 76;

/// How many failures in how long are tolerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub max_failures: u32,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_failures: 5,
            window: Duration::from_secs(30),
        }
    }
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Restart,
    /// `max_failures` within `window`: abort the connection.
    Abort,
}

/// The failures within the policy's window.
#[derive(Debug, Clone)]
pub struct FailureWindow {
    policy: RestartPolicy,
    failures: VecDeque<Instant>,
}

impl FailureWindow {
    pub fn new(policy: RestartPolicy) -> Self {
        FailureWindow {
            policy,
            failures: VecDeque::new(),
        }
    }

    /// Records a failure at `at` and decides.
    pub fn record(&mut self, at: Instant) -> Decision {
        self.failures.push_back(at);
        while let Some(&first) = self.failures.front() {
            if at.saturating_duration_since(first) >= self.policy.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        if self.failures.len() as u32 >= self.policy.max_failures.max(1) {
            Decision::Abort
        } else {
            Decision::Restart
        }
    }

    pub fn failures(&self) -> usize {
        self.failures.len()
    }
}

/// How supervision ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Supervised {
    /// The daemon exited 0: unmounted.
    Finished,
    /// Too many failures: the connection was aborted. The last failure's description.
    Aborted { last: String },
}

/// Runs the daemon `spawn` starts, again each time it dies, until it exits 0 or fails
/// too often; then aborts `conn` through fusectl.
pub fn supervise(
    mut spawn: impl FnMut() -> io::Result<Child>,
    conn: ConnId,
    policy: RestartPolicy,
) -> Result<Supervised> {
    let mut window = FailureWindow::new(policy);
    loop {
        let failure = match spawn() {
            Err(e) => format!("spawn: {e}"),
            Ok(mut child) => match child.wait() {
                Err(e) => format!("wait: {e}"),
                Ok(st) if st.success() => return Ok(Supervised::Finished),
                Ok(st) if st.code() == Some(EXIT_STOPPED) => continue,
                Ok(st) => st.to_string(),
            },
        };
        tracing::warn!("FUSE daemon for connection {conn} failed: {failure}");
        if window.record(Instant::now()) == Decision::Abort {
            tracing::error!(
                "FUSE daemon for connection {conn} failed {} times within {:?}: aborting the connection",
                window.failures(),
                policy.window
            );
            Fusectl::open()?.abort(conn)?;
            return Ok(Supervised::Aborted { last: failure });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aborts_after_k_failures_within_t() {
        let p = RestartPolicy {
            max_failures: 3,
            window: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let mut w = FailureWindow::new(p);
        assert_eq!(w.record(t0), Decision::Restart);
        assert_eq!(w.record(t0 + Duration::from_secs(1)), Decision::Restart);
        assert_eq!(w.record(t0 + Duration::from_secs(2)), Decision::Abort);
    }

    #[test]
    fn failures_spread_out_keep_restarting() {
        let p = RestartPolicy {
            max_failures: 3,
            window: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let mut w = FailureWindow::new(p);
        for i in 0..10 {
            assert_eq!(
                w.record(t0 + Duration::from_secs(6 * i)),
                Decision::Restart,
                "failure {i}"
            );
        }
        assert_eq!(w.failures(), 2);
    }
}
