//! Child processes the suite can always stop: each runs in a process group
//! of its own (a terminal's Ctrl-C reaches only the suite, which then stops
//! its children in order and cleans up), optionally inside a blkio cgroup,
//! and is registered while it runs so a signal to the suite kills it.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

static CANCEL: AtomicBool = AtomicBool::new(false);
/// Write end of the self-pipe the signal handler writes to.
static PIPE_W: AtomicI32 = AtomicI32::new(-1);
/// Process groups of running children (a group's id is its leader's pid,
/// which cannot be reused until we reap it: see `Running::wait`).
static GROUPS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

extern "C" fn on_signal(_sig: libc::c_int) {
    CANCEL.store(true, Ordering::SeqCst);
    let fd = PIPE_W.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; one byte from a static.
        unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
    }
}

/// SIGINT, SIGTERM and SIGHUP stop the suite: the first kills the running
/// children's groups (SIGTERM, SIGKILL 3 s later) so whatever waits for
/// them returns and the caller unwinds through its cleanup; a second one
/// SIGKILLs them at once. Installed once per process.
pub fn install_signal_handling() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut fds = [0; 2];
        // SAFETY: a two-int array for pipe2.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        PIPE_W.store(fds[1], Ordering::SeqCst);
        // SAFETY: the read end is ours alone from here on.
        let mut r = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        std::thread::Builder::new()
            .name("bench-signals".into())
            .spawn(move || {
                let mut b = [0u8; 1];
                let mut first: Option<Instant> = None;
                loop {
                    let got = r.read(&mut b).unwrap_or(0) == 1;
                    if !got && first.is_none() {
                        return;
                    }
                    match first {
                        None => {
                            first = Some(Instant::now());
                            kill_groups(libc::SIGTERM);
                            // Then a SIGKILL for whatever ignored it.
                            std::thread::spawn(|| {
                                std::thread::sleep(Duration::from_secs(3));
                                kill_groups(libc::SIGKILL);
                            });
                        }
                        Some(_) => kill_groups(libc::SIGKILL),
                    }
                }
            })
            .expect("signal thread");
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a plain handler that only touches atomics and write(2).
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

fn kill_groups(sig: libc::c_int) {
    let groups = GROUPS.lock().unwrap_or_else(|e| e.into_inner());
    for &g in groups.iter() {
        // SAFETY: kill(2) on a process group we created and have not reaped.
        unsafe { libc::kill(-g, sig) };
    }
}

/// Whether a stop was asked for.
pub fn cancelled() -> bool {
    CANCEL.load(Ordering::SeqCst)
}

/// Err(Interrupted) once a stop was asked for: called between steps.
pub fn check() -> Result<()> {
    if cancelled() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// Sleep, returning early (with Err) when a stop is asked for.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    check()
}

/// A command to run: a program, its arguments, environment, and whether it
/// runs inside a blkio cgroup (the class's throttle).
#[derive(Clone, Debug)]
pub struct Cmd {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cgroup: Option<PathBuf>,
    /// Why it runs (for errors).
    pub what: String,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>, what: impl Into<String>) -> Cmd {
        Cmd {
            program: PathBuf::from(program.as_ref()),
            args: Vec::new(),
            env: Vec::new(),
            cgroup: None,
            what: what.into(),
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.args.push(a.as_ref().to_string_lossy().into_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Cmd {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Cmd {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn cgroup(mut self, cg: Option<&Path>) -> Cmd {
        self.cgroup = cg.map(Path::to_path_buf);
        self
    }

    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// Start it in a process group of its own (inside its cgroup), stdin
    /// from /dev/null, stdout/stderr as given. Registered until reaped.
    pub fn spawn(&self, stdout: Stdio, stderr: Stdio) -> Result<Running> {
        check()?;
        let mut c = Command::new(&self.program);
        c.args(&self.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        // Opened here, written in the child: "0" moves the writer itself.
        let procs = match &self.cgroup {
            Some(cg) => Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(cg.join("cgroup.procs"))
                    .map_err(|e| Error::io("open", cg.join("cgroup.procs"), e))?,
            ),
            None => None,
        };
        if let Some(f) = &procs {
            let fd = f.as_raw_fd();
            // SAFETY: only write(2) between fork and exec.
            unsafe {
                c.pre_exec(move || {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // Register under the lock, so a signal between spawn and insert
        // still finds the group.
        let mut groups = GROUPS.lock().unwrap_or_else(|e| e.into_inner());
        let child = c.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingTool {
                tool: self.program.display().to_string(),
                what: self.what.clone(),
            },
            _ => Error::Command {
                what: self.what.clone(),
                cmd: self.display(),
                status: format!("could not start: {e}"),
                stderr: String::new(),
            },
        })?;
        groups.insert(child.id() as i32);
        drop(groups);
        if cancelled() {
            kill_group(child.id() as i32, libc::SIGKILL);
        }
        Ok(Running {
            child,
            cmd: self.clone(),
            reaped: false,
        })
    }

    /// Run to completion; its stdout. Fails (with its stderr) unless it
    /// exits 0, or with Interrupted if a stop was asked for meanwhile.
    pub fn output(&self) -> Result<String> {
        let (out, _) = self.timed()?;
        Ok(out)
    }

    /// Run to completion: stdout and the wall time from spawn to exit.
    pub fn timed(&self) -> Result<(String, Duration)> {
        let mut err = tempfile_in_tmp()?;
        let mut out = tempfile_in_tmp()?;
        let t0 = Instant::now();
        let mut r = self.spawn(
            Stdio::from(out.try_clone().map_err(|e| Error::io("dup", "stdout", e))?),
            Stdio::from(err.try_clone().map_err(|e| Error::io("dup", "stderr", e))?),
        )?;
        let st = r.wait()?;
        let took = t0.elapsed();
        let read = |f: &mut File| {
            use std::io::Seek;
            let mut s = String::new();
            let _ = f.seek(std::io::SeekFrom::Start(0));
            let _ = f.read_to_string(&mut s);
            s
        };
        if !st.success() {
            let e = read(&mut err);
            return Err(Error::Command {
                what: self.what.clone(),
                cmd: self.display(),
                status: describe(st),
                stderr: tail(&e, 30),
            });
        }
        Ok((read(&mut out), took))
    }
}

/// An anonymous temp file (O_TMPFILE) for a child's output.
fn tempfile_in_tmp() -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_tmpfile()
        .open("/tmp")
        .map_err(|e| Error::io("create a temp file in", "/tmp", e))
}

trait TmpFile {
    fn custom_flags_tmpfile(&mut self) -> &mut Self;
}

impl TmpFile for std::fs::OpenOptions {
    fn custom_flags_tmpfile(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_TMPFILE)
    }
}

pub fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited {c}"),
        (_, Some(s)) => format!("was killed by signal {s}"),
        _ => "failed".into(),
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn kill_group(g: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on a group we made.
    unsafe { libc::kill(-g, sig) };
}

/// A started child, registered for signals until reaped.
pub struct Running {
    pub child: Child,
    pub cmd: Cmd,
    reaped: bool,
}

impl Drop for Running {
    /// Never left behind: one dropped unwaited (an error elsewhere) is
    /// killed with its group and reaped.
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
        }
    }
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for its exit. Err(Interrupted) if a stop was asked for
    /// meanwhile (the signal thread killed it).
    pub fn wait(&mut self) -> Result<ExitStatus> {
        let pid = self.child.id() as libc::id_t;
        // Wait without reaping, so the pid (and the group id) stays ours
        // until it is out of GROUPS.
        loop {
            // SAFETY: a zeroed siginfo for waitid to fill.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on our own child.
            let r =
                unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        GROUPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(pid as i32));
        self.reaped = true;
        // Anything left in its group (a forked helper) goes with it.
        kill_group(pid as i32, libc::SIGKILL);
        let st = self.child.wait().map_err(|e| Error::Command {
            what: self.cmd.what.clone(),
            cmd: self.cmd.display(),
            status: format!("could not be waited for: {e}"),
            stderr: String::new(),
        })?;
        check()?;
        Ok(st)
    }

    /// SIGKILL its group and reap it.
    pub fn kill(&mut self) {
        if !self.reaped {
            kill_group(self.child.id() as i32, libc::SIGKILL);
            let _ = self.wait();
        }
    }
}

/// A long-lived child (containerd): not killed by the signal thread, but
/// stopped in order by its owner's Drop (`stop`).
pub struct Daemon {
    pub child: Option<Child>,
}

impl Daemon {
    pub fn spawn(cmd: &Cmd, log: File) -> Result<Daemon> {
        check()?;
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                log.try_clone().map_err(|e| Error::io("dup", "log", e))?,
            ))
            .stderr(Stdio::from(log))
            .process_group(0);
        for (k, v) in &cmd.env {
            c.env(k, v);
        }
        let procs = match &cmd.cgroup {
            Some(cg) => Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(cg.join("cgroup.procs"))
                    .map_err(|e| Error::io("open", cg.join("cgroup.procs"), e))?,
            ),
            None => None,
        };
        if let Some(f) = &procs {
            let fd = f.as_raw_fd();
            // SAFETY: only write(2) between fork and exec.
            unsafe {
                c.pre_exec(move || {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = c.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingTool {
                tool: cmd.program.display().to_string(),
                what: cmd.what.clone(),
            },
            _ => Error::Command {
                what: cmd.what.clone(),
                cmd: cmd.display(),
                status: format!("could not start: {e}"),
                stderr: String::new(),
            },
        })?;
        Ok(Daemon { child: Some(child) })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it has exited (and then reaped it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, up to `grace`, then SIGKILL; reaped.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our unreaped child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Whether `program` can be found on PATH (or is a path that exists).
pub fn have(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).exists();
    }
    which(program).is_some()
}

/// `program`'s executable on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|f| {
            std::fs::metadata(f).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
}

/// Pids of every process on the machine (from /proc).
pub fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// A process's command line, NULs as spaces.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

pub fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2); a gone pid is ESRCH.
    unsafe { libc::kill(pid as i32, sig) };
}
