//! A process told apart from a later one that reuses its pid: pids are
//! recorded with their start time (field 22 of /proc/PID/stat), as pull
//! leases, staging directories and container records do, and a process
//! counts as the recorded one only while both match.

use serde::{Deserialize, Serialize};

/// A process, told apart from a later one reusing its pid by its start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: u32,
    /// Clock ticks since boot (field 22 of /proc/PID/stat).
    pub start: u64,
}

impl Proc {
    pub fn of(pid: u32) -> Option<Proc> {
        process_start_time(pid).map(|start| Proc { pid, start })
    }

    pub fn current() -> Proc {
        let pid = std::process::id();
        Proc {
            pid,
            start: process_start_time(pid).unwrap_or(0),
        }
    }

    /// The recorded process still exists (a zombie included): its pid has
    /// not been reused.
    pub fn exists(&self) -> bool {
        process_start_time(self.pid) == Some(self.start)
    }

    /// Still the process that was recorded, and not a zombie (an exited
    /// process whose parent has not reaped it yet, which can take a while
    /// when the parent is the system's init).
    pub fn is_alive(&self) -> bool {
        matches!(process_state(self.pid), Some((state, start))
            if start == self.start && state != 'Z' && state != 'X')
    }
}

/// Field 22 of /proc/PID/stat: start time in clock ticks since boot.
pub fn process_start_time(pid: u32) -> Option<u64> {
    process_state(pid).map(|(_, start)| start)
}

/// Fields 3 and 22 of /proc/PID/stat: the state ('R', 'S', 'Z' for a
/// zombie, ...) and the start time.
pub fn process_state(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parens; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.nth(18)?.parse().ok()?))
}

/// Seconds since the epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_pid_or_a_zombie_is_not_alive() {
        let me = Proc::current();
        assert!(me.is_alive() && me.exists());
        let reused = Proc {
            start: me.start + 1,
            ..me
        };
        assert!(!reused.is_alive() && !reused.exists());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let p = Proc::of(child.id()).unwrap();
        // Not reaped yet: a zombie until wait().
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_state(p.pid).is_some_and(|(s, _)| s != 'Z') {
            assert!(std::time::Instant::now() < deadline, "child never exited");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!p.is_alive(), "a zombie is not alive");
        assert!(p.exists(), "but its pid is still its own");
        child.wait().unwrap();
        assert!(!p.is_alive() && !p.exists());
    }
}
