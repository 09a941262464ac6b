//! Never waiting forever on a container's init.
//!
//! libcontainer's create is a handshake over socketpairs between this
//! process (main), the intermediate process it clones and the init the
//! intermediate clones as our child (CLONE_PARENT): main blocks in recv
//! until the intermediate sends the init's pid and the init sends "ready"
//! (after namespaces, rootfs, pivot_root, user, environment). A recv ends
//! only with a message or when every copy of the sending end is closed, so
//! an init that blocks instead of exiting (a panic whose unwinding, in a
//! clone of this multi-threaded process, waits on a lock or a thread that
//! does not exist there; a process stopped or traced) blocks main forever.
//! After start, the init execs the command; libcontainer has closed its
//! channel to main by then, so nothing reports an exec that fails or never
//! happens.
//!
//! Two bounds:
//! - [`Watchdog`]: a thread, parked in poll(2) before libcontainer clones
//!   anything, that SIGKILLs the processes the create made (this process's
//!   new children) once the deadline passes or a signal asks to abort
//!   (SIGINT/SIGTERM/SIGHUP/SIGQUIT to cstore, see `signals`). Their ends
//!   close, main's recv fails, the create returns its error.
//! - [`ExecReport`]: a close-on-exec pipe whose write end the init holds.
//!   Our executor writes a mark just before execve and the error if execve
//!   fails; the read end sees EOF when the init has exec'd (or died).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The byte the executor writes just before execve.
pub(crate) const EXEC_MARK: u8 = b'x';
/// More than any report the executor writes; the rest is not read.
const REPORT_MAX: usize = 4096;

/// (pid, start time in clock ticks since boot) of the processes whose
/// parent is `parent`, from /proc (this kernel may lack
/// /proc/PID/task/TID/children).
fn children_of(parent: i32) -> Vec<(i32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ... starttime(22) ...": comm may hold
            // spaces and ')'; the fields after it are numbered from 3.
            let f: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
            let ppid: i32 = f.get(1)?.parse().ok()?;
            let start: u64 = f.get(22 - 3)?.parse().ok()?;
            (ppid == parent).then_some((pid, start))
        })
        .collect()
}

/// Now, in /proc's start-time unit (clock ticks since boot).
fn boot_ticks() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) };
    let now = t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    now / (1_000_000_000 / hz)
}

/// The children a create makes: this process's children started since
/// `now` (to /proc's resolution, 10 ms: `cstore run` has no other child
/// then). Nothing is read until they are asked for, so a start that goes
/// well pays one clock read.
pub(crate) struct Children {
    me: i32,
    since: u64,
}

impl Children {
    pub(crate) fn now() -> Children {
        Children {
            me: std::process::id() as i32,
            since: boot_ticks(),
        }
    }

    /// SIGKILL every child started since `now`; their pids.
    pub(crate) fn kill_new(&self) -> Vec<i32> {
        let new: Vec<i32> = children_of(self.me)
            .into_iter()
            .filter(|&(_, start)| start >= self.since)
            .map(|(pid, _)| pid)
            .collect();
        for &p in &new {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        new
    }

    /// Kill and reap what a failed create left (libcontainer reaps neither
    /// the intermediate nor the init when it fails).
    pub(crate) fn kill_and_reap_new(&self) {
        for p in self.kill_new() {
            reap(p, Duration::from_secs(5));
        }
    }
}

/// Wait up to `timeout` for child `pid` to be reaped (it was SIGKILLed).
pub(crate) fn reap(pid: i32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(Errno::EINTR) => {}
            _ => return,
        }
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// Why a watched create ended early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// The deadline passed.
    Timeout,
    /// This signal reached cstore.
    Signal(i32),
}

/// Which of `fds` are readable (or hung up), waiting at most `timeout`
/// (EINTR: none). No allocation: the watchdog calls it while libcontainer
/// may be cloning this process.
fn readable(fds: [BorrowedFd; 2], timeout: Duration) -> [bool; 2] {
    let mut p = fds.map(|f| PollFd::new(f, PollFlags::POLLIN));
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    match poll(
        &mut p,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    ) {
        Ok(_) => p.map(|p| {
            p.revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP))
        }),
        Err(_) => [false; 2],
    }
}

/// The first signal number in the (non-blocking) abort pipe, which is
/// emptied, if any was written.
fn read_signal(fd: BorrowedFd) -> Option<i32> {
    let mut first = None;
    let mut b = [0u8; 64];
    while let Ok(n @ 1..) = nix::unistd::read(fd.as_raw_fd(), &mut b) {
        first = first.or(Some(b[0] as i32));
        if n < b.len() {
            break;
        }
    }
    first
}

/// See the module's doc. Armed before libcontainer's create, finished
/// when it returns.
pub(crate) struct Watchdog {
    done: OwnedFd,
    thread: JoinHandle<Option<Cut>>,
}

impl Watchdog {
    /// `abort`: the read end of the signals' abort pipe. Returns once the
    /// thread is parked in poll(2): from then until the deadline it holds
    /// no lock a cloned child could need (no allocation, no I/O but poll).
    pub(crate) fn arm(
        timeout: Duration,
        abort: Arc<OwnedFd>,
        children: Arc<Children>,
    ) -> std::io::Result<Watchdog> {
        let (done_r, done_w) = pipe()?;
        let parked = Arc::new(Barrier::new(2));
        let thread = {
            let parked = parked.clone();
            std::thread::Builder::new()
                .name("start-watchdog".into())
                .spawn(move || {
                    let deadline = Instant::now() + timeout;
                    let mut cut = None;
                    parked.wait();
                    loop {
                        let wait = match cut {
                            // Once cut, keep killing what appears (a child
                            // cloned at that instant) until the create ends.
                            Some(_) => Duration::from_millis(50),
                            None => deadline.saturating_duration_since(Instant::now()),
                        };
                        let r = readable([done_r.as_fd(), abort.as_fd()], wait);
                        if r[0] {
                            return cut;
                        }
                        if r[1] {
                            let sig = read_signal(abort.as_fd());
                            cut = cut.or(sig.map(Cut::Signal));
                        }
                        if cut.is_none() && Instant::now() >= deadline {
                            cut = Some(Cut::Timeout);
                        }
                        if cut.is_some() {
                            children.kill_new();
                        }
                    }
                })?
        };
        parked.wait();
        Ok(Watchdog {
            done: done_w,
            thread,
        })
    }

    /// The create has returned: stop the thread; whether it cut the create.
    pub(crate) fn finish(self) -> Option<Cut> {
        // A byte, not a close: the init inherited this end and keeps it.
        let _ = nix::unistd::write(&self.done, b"d");
        self.thread.join().unwrap_or(None)
    }
}

/// What the init did with its command (see the module's doc).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Exec {
    /// It reached execve and no error followed: the command runs.
    Ran,
    /// execve failed: the executor's report.
    Failed(String),
    /// The pipe closed with nothing in it: the init ended before exec.
    DiedBefore,
    Cut(Cut),
}

pub(crate) struct ExecReport {
    read: OwnedFd,
    write: Option<OwnedFd>,
}

impl ExecReport {
    pub(crate) fn new() -> std::io::Result<ExecReport> {
        let (read, write) = pipe()?;
        Ok(ExecReport {
            read,
            write: Some(write),
        })
    }

    /// The write end's number, for the executor (the init inherits it).
    pub(crate) fn write_fd(&self) -> RawFd {
        self.write.as_ref().map_or(-1, |w| w.as_raw_fd())
    }

    /// Close our write end: once the init is cloned, only it holds one.
    pub(crate) fn close_ours(&mut self) {
        self.write = None;
    }

    /// Wait until the init has exec'd, failed to or died, at most until
    /// `deadline`; a signal in `abort` cuts the wait.
    pub(crate) fn wait(&self, deadline: Instant, abort: BorrowedFd) -> Exec {
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Exec::Cut(Cut::Timeout);
            }
            let r = readable([self.read.as_fd(), abort], left);
            if r[1] {
                if let Some(sig) = read_signal(abort) {
                    return Exec::Cut(Cut::Signal(sig));
                }
            }
            if !r[0] {
                continue;
            }
            let mut buf = [0u8; 512];
            match nix::unistd::read(self.read.as_raw_fd(), &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if got.len() < REPORT_MAX {
                        got.extend_from_slice(&buf[..n]);
                    }
                }
                Err(Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        match got.split_first() {
            None => Exec::DiedBefore,
            Some((&EXEC_MARK, [])) => Exec::Ran,
            Some((_, msg)) => Exec::Failed(String::from_utf8_lossy(msg).into_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};
    use std::sync::Mutex;

    /// The watchdog kills this process's new children: tests that make
    /// children run one at a time.
    static CHILDREN: Mutex<()> = Mutex::new(());

    /// `sh -c script` holding the report's write end as fd 3 (as the init
    /// holds it), our end then closed.
    fn holder(report: &mut ExecReport, script: &str) -> Child {
        let fd = report.write_fd();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        // SAFETY: only dup2 between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = cmd.spawn().unwrap();
        report.close_ours();
        child
    }

    fn abort_pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
        (r, w)
    }

    #[test]
    fn the_exec_report_tells_ran_failed_died_timeout_and_signal() {
        let _one = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
        let (abort_r, abort_w) = abort_pipe();
        let soon = || Instant::now() + Duration::from_secs(20);
        for (script, want) in [
            // The mark, then the exec closed the end.
            ("printf x >&3", Exec::Ran),
            (
                "printf 'xexec \"cmd\": boom' >&3",
                Exec::Failed("exec \"cmd\": boom".into()),
            ),
            ("exit 3", Exec::DiedBefore),
        ] {
            let mut report = ExecReport::new().unwrap();
            let mut child = holder(&mut report, script);
            assert_eq!(report.wait(soon(), abort_r.as_fd()), want, "{script}");
            child.wait().unwrap();
        }
        // An init that holds the end and never execs: the deadline.
        let mut report = ExecReport::new().unwrap();
        let mut child = holder(&mut report, "printf x >&3; exec sleep 30");
        let t = Instant::now();
        let got = report.wait(t + Duration::from_millis(300), abort_r.as_fd());
        assert_eq!(got, Exec::Cut(Cut::Timeout));
        assert!(t.elapsed() < Duration::from_secs(10));
        // A signal written to the abort pipe (as the handler does) cuts it.
        nix::unistd::write(&abort_w, &[libc::SIGTERM as u8, libc::SIGTERM as u8]).unwrap();
        assert_eq!(
            report.wait(soon(), abort_r.as_fd()),
            Exec::Cut(Cut::Signal(libc::SIGTERM))
        );
        assert_eq!(read_signal(abort_r.as_fd()), None, "the pipe was emptied");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn the_watchdog_kills_only_the_children_made_after_it_was_armed() {
        let _one = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
        let (abort_r, abort_w) = abort_pipe();
        let abort_r = Arc::new(abort_r);
        let mut old = Command::new("sleep").arg("30").spawn().unwrap();
        // Start times are in clock ticks: the old child is a tick older.
        std::thread::sleep(Duration::from_millis(50));
        for (timeout, signal) in [
            (Duration::from_millis(300), None),
            (Duration::from_secs(60), Some(libc::SIGINT)),
        ] {
            let children = Arc::new(Children::now());
            let dog = Watchdog::arm(timeout, abort_r.clone(), children.clone()).unwrap();
            let t = Instant::now();
            let mut new = Command::new("sleep").arg("30").spawn().unwrap();
            if let Some(sig) = signal {
                nix::unistd::write(&abort_w, &[sig as u8]).unwrap();
            }
            // The new child dies of SIGKILL: what the create waits for.
            let status = new.wait().unwrap();
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(libc::SIGKILL));
            assert!(t.elapsed() < Duration::from_secs(20));
            let want = signal.map_or(Cut::Timeout, Cut::Signal);
            assert_eq!(dog.finish(), Some(want));
        }
        assert!(old.try_wait().unwrap().is_none(), "an older child lives on");
        // Finished in time: nothing is killed, nothing reported.
        let children = Arc::new(Children::now());
        let dog = Watchdog::arm(Duration::from_secs(60), abort_r.clone(), children).unwrap();
        let mut new = Command::new("sleep").arg("30").spawn().unwrap();
        assert_eq!(dog.finish(), None);
        assert!(new.try_wait().unwrap().is_none());
        for c in [&mut old, &mut new] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    #[test]
    fn children_are_found_through_proc() {
        let _one = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
        let before = Children::now();
        let mut c = Command::new("sleep").arg("30").spawn().unwrap();
        assert!(children_of(std::process::id() as i32)
            .iter()
            .any(|&(pid, _)| pid == c.id() as i32));
        assert_eq!(before.kill_new(), vec![c.id() as i32]);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(c.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
