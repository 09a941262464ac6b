//! SIGINT, SIGTERM, SIGHUP and SIGQUIT reach the container's init while it
//! runs (docker's sig-proxy): cstore outlives them, so it can restore the
//! terminal and report the exit status. While the container is being
//! created they abort the start instead (through a self-pipe the start's
//! watchdog polls), so cstore removes what it made rather than dying with
//! the overlay mounted. And the container's process starts with every
//! signal at its default action, as under docker.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Once, OnceLock};

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::fcntl::OFlag;
use oci_spec::runtime::Spec;

static TARGET: AtomicI32 = AtomicI32::new(0);
/// The abort pipe's write end, or -1.
static ABORT: AtomicI32 = AtomicI32::new(-1);
static INSTALL: Once = Once::new();

extern "C" fn forward(sig: libc::c_int) {
    let pid = TARGET.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
        return;
    }
    let fd = ABORT.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write is async-signal-safe; the pipe is non-blocking, so a
        // full one drops the byte rather than blocking the handler.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

fn install() {
    INSTALL.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            // SAFETY: installing a handler that only calls kill(2) or write(2).
            unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
        }
    });
}

/// Forward SIGINT/SIGTERM/SIGHUP/SIGQUIT to `pid` (0: stop forwarding).
pub fn forward_to(pid: i32) {
    TARGET.store(pid, Ordering::SeqCst);
    install();
}

/// The abort pipe's read end (made once, non-blocking both ways).
fn abort_pipe() -> std::io::Result<(Arc<OwnedFd>, RawFd)> {
    static PIPE: OnceLock<(Arc<OwnedFd>, OwnedFd)> = OnceLock::new();
    if PIPE.get().is_none() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let _ = PIPE.set((Arc::new(r), w));
    }
    let (r, w) = PIPE.get().expect("set above");
    Ok((r.clone(), w.as_raw_fd()))
}

/// From now until [`abort_off`], those signals (while none is forwarded)
/// are written to the abort pipe, whose read end this returns, emptied of
/// what an earlier start left.
pub(crate) fn abort_on() -> std::io::Result<Arc<OwnedFd>> {
    let (r, w) = abort_pipe()?;
    let mut b = [0u8; 64];
    while matches!(nix::unistd::read(r.as_raw_fd(), &mut b), Ok(n) if n > 0) {}
    ABORT.store(w, Ordering::SeqCst);
    install();
    Ok(r)
}

pub(crate) fn abort_off() {
    ABORT.store(-1, Ordering::SeqCst);
}

/// How the container's process is started: every signal reset to its
/// default action and unblocked (exec keeps what is ignored: SIGPIPE, which
/// Rust ignores in cstore, and whatever cstore inherited ignored, `nohup`
/// or `cmd &` in a script ignoring SIGINT and SIGQUIT, which would leave
/// the container's process unable to die of, or trap, those signals), then
/// execvp, with what happened written to `report` (`start::ExecReport`):
/// a mark before execve, the error after it if execve fails. libcontainer's
/// own executor logs the whole argument list on failure (megabytes, for an
/// E2BIG) and its report never reaches cstore: the init's channel to main
/// is closed before the start.
#[derive(Clone)]
pub(crate) struct Exec {
    pub(crate) report: RawFd,
}

impl Exec {
    fn say(&self, b: &[u8]) {
        // The pipe is empty and a report is small: this never blocks.
        let _ = nix::unistd::write(
            // SAFETY: the report's write end, open in the init until exec.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(self.report) },
            b,
        );
    }
}

impl Executor for Exec {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        self.say(&[crate::start::EXEC_MARK]);
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
        let args: &[String] = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_deref())
            .unwrap_or_default();
        let cargs: Result<Vec<CString>, _> =
            args.iter().map(|a| CString::new(a.as_bytes())).collect();
        let msg = match cargs {
            // Both refused before the create (`validate::args`).
            Err(_) => "an argument of the command has a NUL byte".to_string(),
            Ok(c) if c.is_empty() => "no command".to_string(),
            Ok(c) => {
                let Err(e) = nix::unistd::execvp(&c[0], &c);
                exec_error(e, args)
            }
        };
        self.say(msg.as_bytes());
        Err(ExecutorError::Other(msg))
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

/// Linux's MAX_ARG_STRLEN: no argument or environment string is longer.
const MAX_ARG_STRLEN: usize = 32 * 4096;

/// What execve's failure means, with sizes instead of contents for E2BIG.
fn exec_error(e: nix::errno::Errno, args: &[String]) -> String {
    let cmd = crate::validate::shown(&args[0]);
    if e != nix::errno::Errno::E2BIG {
        return format!("exec {cmd}: {}", e.desc());
    }
    // What the kernel counts: each string with its NUL.
    let arg_bytes: usize = args.iter().map(|a| a.len() + 1).sum();
    let longest = args.iter().map(String::len).max().unwrap_or(0);
    let (env_count, env_bytes, env_longest) =
        std::env::vars_os().fold((0, 0, 0), |(n, b, l), (k, v)| {
            let len = k.len() + 1 + v.len();
            (n + 1, b + len + 1, l.max(len))
        });
    // SAFETY: sysconf has no preconditions.
    let arg_max = unsafe { libc::sysconf(libc::_SC_ARG_MAX) };
    format!(
        "exec {cmd}: argument list too long (E2BIG): {} arguments of {arg_bytes} bytes \
         (the longest {longest}), {env_count} environment variables of {env_bytes} bytes \
         (the longest {env_longest}); the kernel takes at most {MAX_ARG_STRLEN} bytes a \
         string and {arg_max} in all",
        args.len()
    )
}
