//! `run -t`: the container's terminal. libcontainer opens the pty inside the
//! container (from its own devpts) and sends the master over a unix socket,
//! as runc's `--console-socket` and `recvtty` do; cstore is the listener. The
//! session copies stdin to the master and the master to stdout, keeps the
//! pty's window size equal to ours (at start and on SIGWINCH), and puts a
//! terminal stdin into raw mode for as long as it runs: every way out of it
//! (normal end, error, panic) goes through `Drop`, and SIGINT/SIGTERM/SIGHUP
//! are forwarded to the container rather than ending cstore.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::sys::termios::{self, SetArg, Termios};

/// How long the container's init may take to hand over the pty master once
/// the container is created (it sends it before reporting ready).
const HANDOVER_MS: u16 = 10_000;

/// The console socket: a listener in the container's directory.
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    pub fn bind(path: &Path) -> io::Result<ConsoleSocket> {
        // A socket left by a killed run would make bind fail.
        let _ = std::fs::remove_file(path);
        let listener = bind_long(path)?;
        Ok(ConsoleSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pty master sent by the container's init.
    pub fn recv_master(&self) -> io::Result<OwnedFd> {
        let timed_out = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the container sent no terminal over the console socket",
            )
        };
        if !wait_readable(self.listener.as_fd(), HANDOVER_MS)? {
            return Err(timed_out());
        }
        let (conn, _) = self.listener.accept()?;
        if !wait_readable(conn.as_fd(), HANDOVER_MS)? {
            return Err(timed_out());
        }
        let mut name = [0u8; 256];
        let mut iov = [IoSliceMut::new(&mut name)];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut master = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: SCM_RIGHTS gave us this new descriptor.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    master.get_or_insert(fd);
                }
            }
        }
        master.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "console socket message carried no file descriptor",
            )
        })
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// sun_path holds 107 bytes; a longer path is bound through its directory's
/// /proc/self/fd entry, which resolves to the same place.
fn bind_long(path: &Path) -> io::Result<UnixListener> {
    if path.as_os_str().len() < 100 {
        return UnixListener::bind(path);
    }
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) => (d, n),
        _ => return UnixListener::bind(path),
    };
    let d = std::fs::File::open(dir)?;
    UnixListener::bind(Path::new(&format!("/proc/self/fd/{}", d.as_raw_fd())).join(name))
}

fn wait_readable(fd: BorrowedFd, ms: u16) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => return Ok(n > 0),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Write end of the SIGWINCH self-pipe (-1: none). The pipe lives as long as
/// the process, so the handler never writes to a closed or reused descriptor.
static WINCH_FD: AtomicI32 = AtomicI32::new(-1);
static WINCH: OnceLock<io::Result<(OwnedFd, OwnedFd)>> = OnceLock::new();

extern "C" fn on_winch(_: libc::c_int) {
    let fd = WINCH_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; a full pipe already wakes the loop.
        unsafe { libc::write(fd, [0u8].as_ptr().cast(), 1) };
    }
}

/// The read end of the SIGWINCH pipe, installing the handler on first use.
fn winch_pipe() -> io::Result<BorrowedFd<'static>> {
    let p = WINCH.get_or_init(|| {
        let (r, w) = pipe()?;
        WINCH_FD.store(w.as_raw_fd(), Ordering::SeqCst);
        // SAFETY: the handler only calls write(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_winch as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(libc::SIGWINCH, &sa, std::ptr::null_mut());
        }
        Ok((r, w))
    });
    match p {
        Ok((r, _)) => Ok(r.as_fd()),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(
        nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK,
    )?)
}

fn stdin() -> BorrowedFd<'static> {
    // SAFETY: fd 0 stays open for the life of the process.
    unsafe { BorrowedFd::borrow_raw(0) }
}

fn stdout() -> BorrowedFd<'static> {
    // SAFETY: fd 1 stays open for the life of the process.
    unsafe { BorrowedFd::borrow_raw(1) }
}

fn is_tty(fd: BorrowedFd) -> bool {
    nix::unistd::isatty(fd.as_raw_fd()).unwrap_or(false)
}

/// Copy our window size (stdout's, else stdin's) to the pty.
fn sync_winsize(master: BorrowedFd) {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    for fd in [stdout(), stdin()] {
        // SAFETY: TIOCGWINSZ fills a winsize.
        if is_tty(fd) && unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } == 0 {
            // SAFETY: TIOCSWINSZ reads a winsize.
            unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
            return;
        }
    }
}

/// stdin in raw mode until dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> io::Result<RawMode> {
        let saved = termios::tcgetattr(stdin())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        // TCSANOW, not TCSAFLUSH: input typed before the container started is kept.
        termios::tcsetattr(stdin(), SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(stdin(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// A running terminal session: the copy loop on its own thread.
pub struct Session {
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<io::Result<()>>>,
    _raw: Option<RawMode>,
}

/// Start copying between our stdio and `master`; with `interactive`, stdin is
/// read (and put in raw mode if it is a terminal), else only output flows.
pub fn attach(master: OwnedFd, interactive: bool) -> io::Result<Session> {
    nix::fcntl::fcntl(
        master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    let winch = winch_pipe()?;
    let (stop_r, stop_w) = pipe()?;
    sync_winsize(master.as_fd());
    let raw = if interactive && is_tty(stdin()) {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let thread = std::thread::Builder::new()
        .name("tty".into())
        .spawn(move || copy_loop(&master, interactive, winch, &stop_r))?;
    Ok(Session {
        stop: Some(stop_w),
        thread: Some(thread),
        _raw: raw,
    })
}

impl Session {
    /// The container has exited: copy what output remains, then stop.
    pub fn finish(mut self) -> io::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = nix::unistd::write(&stop, &[0]);
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("terminal copy thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
        // `_raw` restores the terminal after the thread is gone.
    }
}

fn write_all(fd: BorrowedFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::NONE);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Read what `fd` has (non-blocking): Ok(None) when nothing is ready,
/// Ok(Some(0)) at end (EOF, or EIO once the pty's other side is closed).
fn read_some(fd: BorrowedFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match nix::unistd::read(fd.as_raw_fd(), buf) {
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(Errno::EIO) => return Ok(Some(0)),
            Err(e) => return Err(e.into()),
        }
    }
}

fn copy_loop(
    master: &OwnedFd,
    interactive: bool,
    winch: BorrowedFd,
    stop: &OwnedFd,
) -> io::Result<()> {
    let mut buf = vec![0u8; 32 << 10];
    // Input read but not yet taken by the pty (the container is not reading).
    let mut pending: Vec<u8> = Vec::new();
    let mut stdin_open = interactive;
    let stdin_is_tty = is_tty(stdin());
    // Once stdout fails (a closed pipe), output is still read and dropped so
    // the container never blocks on a full pty; the error is reported at the end.
    let mut out_err: Option<io::Error> = None;
    let mut out = |bytes: &[u8]| {
        if out_err.is_none() {
            out_err = write_all(stdout(), bytes).err();
        }
    };
    let done = |out_err: Option<io::Error>| out_err.map_or(Ok(()), Err);
    loop {
        let want_in = stdin_open && pending.is_empty();
        let mut master_ev = PollFlags::POLLIN;
        if !pending.is_empty() {
            master_ev |= PollFlags::POLLOUT;
        }
        let mut fds = vec![
            PollFd::new(master.as_fd(), master_ev),
            PollFd::new(winch, PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        if want_in {
            fds.push(PollFd::new(stdin(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let ready = |i: usize| fds[i].revents().unwrap_or(PollFlags::empty());
        let (m, w, s) = (ready(0), ready(1), ready(2));
        let input = if want_in {
            ready(3)
        } else {
            PollFlags::empty()
        };
        drop(fds);

        if s.contains(PollFlags::POLLIN) {
            while let Some(n) = read_some(master.as_fd(), &mut buf)? {
                if n == 0 {
                    break;
                }
                out(&buf[..n]);
            }
            return done(out_err);
        }
        if w.contains(PollFlags::POLLIN) {
            while read_some(winch, &mut buf)?.is_some_and(|n| n > 0) {}
            sync_winsize(master.as_fd());
        }
        if m.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match read_some(master.as_fd(), &mut buf)? {
                // Every holder of the pty's slave side is gone.
                Some(0) => return done(out_err),
                Some(n) => out(&buf[..n]),
                None => {}
            }
        }
        if m.contains(PollFlags::POLLOUT) && !pending.is_empty() {
            match nix::unistd::write(master.as_fd(), &pending) {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if input.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match nix::unistd::read(0, &mut buf) {
                Ok(0) => {
                    stdin_open = false;
                    // Piped input has ended: the terminal's end-of-file
                    // character tells a reading program in the container.
                    if !stdin_is_tty {
                        pending.push(4);
                    }
                }
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
