//! Keeping /dev/fuse fds alive between daemons. A FUSE connection ends when its last fd
//! closes; a process that holds a copy turns a daemon crash into a stall, and the next
//! daemon takes the fd back and resumes.
//!
//! [`FdStore`] has two implementations:
//! - [`KeeperClient`], speaking to a small keeper process ([`Keeper::serve`]): a unix
//!   SOCK_SEQPACKET socket (0600, peers must be uid 0 by SO_PEERCRED), one datagram per
//!   message, fds passed with SCM_RIGHTS. `PUT name` + fd → `OK`; `GET name` → `OK` +
//!   fd or `NONE`; `DEL name` → `OK`; `LIST` → `OK` + one name per line. Anything
//!   else → `ERR reason`. The keeper drops a held fd when poll reports POLLERR on it (the
//!   connection was unmounted or aborted). It must not die with the service: run it in
//!   its own process group and cgroup (or `KillMode=process`).
//! - [`SystemdFdStore`]: systemd's fd store (`sd_notify` `FDSTORE=1` + `FDNAME=`, given
//!   back in `LISTEN_FDS`/`LISTEN_FDNAMES` when the service starts again; needs
//!   `FileDescriptorStoreMax=` and a `NotifyAccess=` that lets the sender in;
//!   `FileDescriptorStorePreserve=yes` (systemd 254+) keeps them across a stop too).

use cstore_os::IoError;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Holds named fds across the death of the processes that put them there.
pub trait FdStore: Send + Sync {
    /// Keeps a copy of `fd` under `name` (replacing one held under it).
    fn put(&self, name: &str, fd: BorrowedFd<'_>) -> Result<()>;
    /// A copy of the fd held under `name`.
    fn get(&self, name: &str) -> Result<Option<OwnedFd>>;
    /// Closes the store's copy.
    fn del(&self, name: &str) -> Result<()>;
    /// The names held.
    fn list(&self) -> Result<Vec<String>>;
}

/// A name the stores can hold: 1–200 bytes of `[A-Za-z0-9._:@+-]` (no separators of
/// either protocol: space, newline, `=`, `:` is systemd-safe in FDNAME).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

/// Largest keeper message (a LIST of many names fits).
const MAX_MSG: usize = 64 * 1024;
/// Most clients a keeper serves at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 64;

fn socket(ty: i32) -> io::Result<OwnedFd> {
    // SAFETY: no pointers; result checked.
    let s = unsafe { libc::socket(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

/// A sockaddr_un for `path`; abstract if it starts with `@` (systemd's convention).
fn sockaddr(path: &[u8]) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if path.is_empty() || path.len() >= a.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "unix socket path empty or too long",
        ));
    }
    let abstract_ = path[0] == b'@';
    for (i, &c) in path.iter().enumerate() {
        a.sun_path[i] = if i == 0 && abstract_ {
            0
        } else {
            c as libc::c_char
        };
    }
    let base = std::mem::size_of::<libc::sa_family_t>();
    let len = if abstract_ {
        base + path.len()
    } else {
        base + path.len() + 1
    };
    Ok((a, len as libc::socklen_t))
}

fn connect(path: &Path, ty: i32) -> io::Result<OwnedFd> {
    let s = socket(ty)?;
    let (a, l) = sockaddr(path.as_os_str().as_bytes())?;
    loop {
        // SAFETY: a is a valid sockaddr_un of length l.
        if unsafe { libc::connect(s.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), l) } == 0
        {
            return Ok(s);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // A signal: the connect goes on; asking again says how it went.
            Some(libc::EINTR) => continue,
            Some(libc::EISCONN) => return Ok(s),
            _ => return Err(e),
        }
    }
}

/// Sends one datagram, with `fd` attached (SCM_RIGHTS) if given.
pub fn send_msg(sock: BorrowedFd<'_>, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut _,
        iov_len: msg.len(),
    };
    let mut cbuf = [0u64; 4]; // aligned room for one cmsg with one fd
                              // SAFETY: msghdr is plain data; all-zero is valid.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = &mut iov;
    m.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_* compute within cbuf, which is big enough for one int.
        unsafe {
            m.msg_control = cbuf.as_mut_ptr().cast();
            m.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&m);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: m points at live iov and control buffers.
        if unsafe { libc::sendmsg(sock.as_raw_fd(), &m, libc::MSG_NOSIGNAL) } >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        // A signal before anything was sent (a datagram goes whole or not at all).
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Receives one datagram (`Ok(None)` at end of stream) and the fds that came with it.
pub fn recv_msg(sock: BorrowedFd<'_>) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: plain data.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = &mut iov;
    m.msg_iovlen = 1;
    m.msg_control = cbuf.as_mut_ptr().cast();
    m.msg_controllen = std::mem::size_of_val(&cbuf);
    let n = loop {
        // SAFETY: m points at live buffers of the given sizes.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut m, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let e = io::Error::last_os_error();
        // A signal before a datagram arrived: nothing was taken off the socket.
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walks the control messages the kernel wrote within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&m);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    let fd = std::ptr::read_unaligned((data as *const i32).add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&m, c);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    if m.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message truncated",
        ));
    }
    buf.truncate(n as usize);
    Ok(Some((buf, fds)))
}

/// How long a keeper client waits for the keeper to take or answer a request.
const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn set_timeouts(sock: BorrowedFd<'_>, t: std::time::Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: tv is a live timeval of the size given.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A client of a keeper process.
#[derive(Debug, Clone)]
pub struct KeeperClient {
    socket: PathBuf,
}

impl KeeperClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        KeeperClient {
            socket: socket.into(),
        }
    }

    fn call(&self, msg: &str, fd: Option<BorrowedFd<'_>>) -> Result<(String, Option<OwnedFd>)> {
        let e = |e: io::Error| Error::store(self.socket.display(), e.to_string());
        let s = connect(&self.socket, libc::SOCK_SEQPACKET).map_err(e)?;
        // A hung keeper must not hang the daemon (or the start of a mount) with it.
        set_timeouts(s.as_fd(), CLIENT_TIMEOUT).map_err(e)?;
        if let Err(err) = send_msg(s.as_fd(), msg.as_bytes(), fd) {
            // A keeper that refused us (peer check) said why before closing.
            if let Ok(Some((r, _))) = recv_msg(s.as_fd()) {
                let r = String::from_utf8_lossy(&r);
                if let Some(r) = r.strip_prefix("ERR ") {
                    return Err(Error::store(self.socket.display(), format!("{msg}: {r}")));
                }
            }
            return Err(e(err));
        }
        let Some((reply, mut fds)) = recv_msg(s.as_fd()).map_err(e)? else {
            return Err(Error::store(
                self.socket.display(),
                format!("no reply to {msg}"),
            ));
        };
        let reply = String::from_utf8_lossy(&reply).into_owned();
        if let Some(r) = reply.strip_prefix("ERR ") {
            return Err(Error::store(self.socket.display(), format!("{msg}: {r}")));
        }
        Ok((reply, fds.pop()))
    }
}

impl FdStore for KeeperClient {
    fn put(&self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        check_name(name)?;
        self.call(&format!("PUT {name}"), Some(fd)).map(|_| ())
    }

    fn get(&self, name: &str) -> Result<Option<OwnedFd>> {
        check_name(name)?;
        let (reply, fd) = self.call(&format!("GET {name}"), None)?;
        match (reply.as_str(), fd) {
            ("OK", Some(fd)) => Ok(Some(fd)),
            ("NONE", None) => Ok(None),
            (r, _) => Err(Error::store(
                self.socket.display(),
                format!("GET {name}: unexpected reply {r:?}"),
            )),
        }
    }

    fn del(&self, name: &str) -> Result<()> {
        check_name(name)?;
        self.call(&format!("DEL {name}"), None).map(|_| ())
    }

    fn list(&self) -> Result<Vec<String>> {
        let (reply, _) = self.call("LIST", None)?;
        let body = reply.strip_prefix("OK").ok_or_else(|| {
            Error::store(
                self.socket.display(),
                format!("LIST: unexpected reply {reply:?}"),
            )
        })?;
        Ok(body
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }
}

/// A request to the keeper, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum KeeperRequest<'a> {
    Put(&'a str),
    Get(&'a str),
    Del(&'a str),
    List,
}

/// Parses one keeper request datagram.
pub fn parse_keeper_request(msg: &[u8]) -> std::result::Result<KeeperRequest<'_>, String> {
    let s = std::str::from_utf8(msg).map_err(|_| "request is not UTF-8".to_string())?;
    let (cmd, name) = s.split_once(' ').unwrap_or((s, ""));
    let named = |n: &str| check_name(n).map_err(|e| e.to_string());
    match cmd {
        "PUT" => named(name).map(|_| KeeperRequest::Put(name)),
        "GET" => named(name).map(|_| KeeperRequest::Get(name)),
        "DEL" => named(name).map(|_| KeeperRequest::Del(name)),
        "LIST" if name.is_empty() => Ok(KeeperRequest::List),
        _ => Err(format!(
            "unknown request {:?}",
            s.chars().take(40).collect::<String>()
        )),
    }
}

/// The keeper process's server.
#[derive(Debug)]
pub struct Keeper {
    path: PathBuf,
    listener: OwnedFd,
    held: Mutex<BTreeMap<String, OwnedFd>>,
}

impl Keeper {
    /// Binds the socket at `path` (0600). A stale socket file is replaced; a live one
    /// (another keeper answers on it) is an error. The removal, bind and chmod go by
    /// path, so `path` must be in a directory only root can write (cstore's run
    /// directory; the tests' private temporary one).
    pub fn bind(path: impl Into<PathBuf>) -> Result<Keeper> {
        let path = path.into();
        let ioe = |op, e| IoError::new(op, &path, e);
        if connect(&path, libc::SOCK_SEQPACKET).is_ok() {
            return Err(Error::store(
                path.display(),
                "another keeper is listening on it",
            ));
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ioe("remove stale socket", e).into()),
        }
        let l = socket(libc::SOCK_SEQPACKET).map_err(|e| ioe("socket", e))?;
        let (a, len) = sockaddr(path.as_os_str().as_bytes()).map_err(|e| ioe("bind", e))?;
        // SAFETY: valid sockaddr_un of length len.
        if unsafe { libc::bind(l.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), len) } != 0 {
            return Err(ioe("bind", io::Error::last_os_error()).into());
        }
        // The peer check below is the real gate; 0600 keeps others from even connecting.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| ioe("chmod 0600", e))?;
        // SAFETY: no pointers.
        if unsafe { libc::listen(l.as_raw_fd(), 64) } != 0 {
            return Err(ioe("listen", io::Error::last_os_error()).into());
        }
        set_nonblocking(l.as_raw_fd()).map_err(|e| ioe("listen", e))?;
        Ok(Keeper {
            path,
            listener: l,
            held: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `stop` is set (checked at least every 200 ms).
    pub fn serve(&self, stop: &AtomicBool) -> Result<()> {
        // (connection, peer uid): non-root peers stay connected only to be told no.
        let mut clients: Vec<(OwnedFd, u32)> = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let held: Vec<(String, RawFd)> = self
                .held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(n, f)| (n.clone(), f.as_raw_fd()))
                .collect();
            let mut p = Vec::with_capacity(1 + clients.len() + held.len());
            p.push(pollfd(self.listener.as_raw_fd(), libc::POLLIN));
            p.extend(
                clients
                    .iter()
                    .map(|(c, _)| pollfd(c.as_raw_fd(), libc::POLLIN)),
            );
            // events 0: only POLLERR/POLLHUP come back: on /dev/fuse, POLLERR means the
            // connection ended (unmounted or aborted). Either drops the fd, as systemd's
            // fd store does (and an fd stuck in POLLHUP would make poll spin).
            p.extend(held.iter().map(|(_, f)| pollfd(*f, 0)));
            // SAFETY: p is a live array of pollfds.
            let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, 200) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(IoError::new("poll", &self.path, e).into());
            }
            let nc = clients.len();
            for (i, (name, fd)) in held.iter().enumerate() {
                if p[1 + nc + i].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
                    if h.get(name).map(|f| f.as_raw_fd()) == Some(*fd) {
                        tracing::info!("keeper: {name}: connection gone, dropping its fd");
                        h.remove(name);
                    }
                }
            }
            let mut done = Vec::new();
            for (i, (c, uid)) in clients.iter().enumerate() {
                let re = p[1 + i].revents;
                if re & libc::POLLIN != 0 {
                    if !self.answer(c.as_fd(), *uid) {
                        done.push(i);
                    }
                } else if re != 0 {
                    done.push(i);
                }
            }
            for i in done.into_iter().rev() {
                clients.swap_remove(i);
            }
            if p[0].revents & libc::POLLIN != 0 {
                while clients.len() < MAX_CLIENTS {
                    match self.accept() {
                        Ok(Some(c)) => clients.push(c),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("keeper: accept: {e}");
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Accepts one client, with its peer's uid (SO_PEERCRED).
    fn accept(&self) -> io::Result<Option<(OwnedFd, u32)>> {
        loop {
            // SAFETY: no address wanted; result checked.
            let c = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if c < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::ECONNABORTED | libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            // SAFETY: new fd.
            let c = unsafe { OwnedFd::from_raw_fd(c) };
            match peer_uid(c.as_fd()) {
                Ok(uid) => return Ok(Some((c, uid))),
                Err(e) => tracing::warn!("keeper: SO_PEERCRED: {e}"),
            }
        }
    }

    /// Answers the request waiting on a client; false when it is done. A peer that is not
    /// uid 0 gets an error for every request (its fds are closed unused). It is not
    /// simply hung up on: closing a socket with its request unread would make the
    /// peer's read fail ECONNRESET before it sees why.
    fn answer(&self, c: BorrowedFd<'_>, uid: u32) -> bool {
        let (msg, mut fds) = match recv_msg(c) {
            Ok(Some(m)) => m,
            Ok(None) => return false,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return true,
            Err(_) => return false,
        };
        let reply = |m: &[u8], fd: Option<BorrowedFd<'_>>| {
            let _ = send_msg(c, m, fd);
        };
        if uid != 0 {
            tracing::warn!("keeper: refusing a request of uid {uid}");
            reply(b"ERR permission denied: the keeper serves uid 0 only", None);
            return true;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match parse_keeper_request(&msg) {
            Ok(KeeperRequest::Put(name)) => match (fds.pop(), fds.is_empty()) {
                (Some(fd), true) => {
                    tracing::info!("keeper: PUT {name}");
                    held.insert(name.to_string(), fd);
                    reply(b"OK", None);
                }
                _ => reply(b"ERR PUT needs exactly one fd", None),
            },
            Ok(KeeperRequest::Get(name)) => match held.get(name) {
                Some(fd) => reply(b"OK", Some(fd.as_fd())),
                None => reply(b"NONE", None),
            },
            Ok(KeeperRequest::Del(name)) => {
                held.remove(name);
                reply(b"OK", None);
            }
            Ok(KeeperRequest::List) => {
                let mut s = String::from("OK");
                for n in held.keys() {
                    s.push('\n');
                    s.push_str(n);
                }
                reply(s.as_bytes(), None);
            }
            Err(e) => reply(format!("ERR {e}").as_bytes(), None),
        }
        true
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs a keeper on `socket` until `stop` is set: the library side of the CLI's
/// hidden `fuse-keeper` subcommand.
pub fn run_keeper(socket: &Path, stop: &AtomicBool) -> Result<()> {
    Keeper::bind(socket)?.serve(stop)
}

fn pollfd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a live fd.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The uid of a unix socket's peer (SO_PEERCRED).
pub fn peer_uid(sock: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred/len are valid for writes of len bytes.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// systemd's fd store. Fds come back to the next instance of the service as
/// `LISTEN_FDS` (from fd 3 on) with their names in `LISTEN_FDNAMES`; they are taken from
/// the environment once, by [`SystemdFdStore::from_env`].
///
/// systemd accepts `FDSTORE=1` only from a process `NotifyAccess=` allows (the main
/// pid for `Type=notify`), so the process that uses this must be the service's main
/// process, not a child of it. Run under systemd 252 in a VM by
/// fixtures/systemd-vm.sh (docs/lazy.md, "Restarts under systemd").
#[derive(Debug)]
pub struct SystemdFdStore {
    notify_socket: PathBuf,
    /// Fds systemd passed at start, by name, until taken.
    passed: Mutex<BTreeMap<String, OwnedFd>>,
}

impl SystemdFdStore {
    /// Reads `NOTIFY_SOCKET`, `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, takes
    /// ownership of the passed fds (marking them close-on-exec) and removes the
    /// variables, as `sd_listen_fds(1)` does. None without `NOTIFY_SOCKET` (not under
    /// systemd).
    pub fn from_env() -> Result<Option<SystemdFdStore>> {
        let Some(sock) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let var = |k| std::env::var(k).ok();
        let fds = parse_listen_fds(
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        )
        .map_err(|e| Error::store("systemd", e))?;
        let mut passed = BTreeMap::new();
        for (fd, name) in fds {
            // SAFETY: systemd passed these fds to this process (LISTEN_PID matched) and
            // nothing else owns them.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: fcntl on a live fd.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            passed.insert(name, fd);
        }
        for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // Called at startup, before the session's threads (edition 2024 marks this
            // unsafe for that reason).
            std::env::remove_var(k);
        }
        Ok(Some(SystemdFdStore {
            notify_socket: sock.into(),
            passed: Mutex::new(passed),
        }))
    }

    /// A store notifying `socket` with nothing passed (for tests).
    pub fn with_socket(socket: impl Into<PathBuf>) -> SystemdFdStore {
        SystemdFdStore {
            notify_socket: socket.into(),
            passed: Mutex::new(BTreeMap::new()),
        }
    }

    fn notify(&self, msg: &str, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let e = |e: io::Error| {
            Error::store(
                format!("systemd ({})", self.notify_socket.display()),
                e.to_string(),
            )
        };
        let s = connect(&self.notify_socket, libc::SOCK_DGRAM).map_err(e)?;
        send_msg(s.as_fd(), msg.as_bytes(), fd).map_err(e)
    }

    /// Puts `fd` in systemd's store under `name` and treats it as passed at
    /// start (what [`FdStore::list`] and [`FdStore::get`] answer): how a
    /// connection another holder kept (a keeper's, before the service ran)
    /// becomes the service's.
    pub fn adopt(&self, name: &str, fd: OwnedFd) -> Result<()> {
        self.put(name, fd.as_fd())?;
        self.passed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), fd);
        Ok(())
    }

    /// `READY=1` (with a status line): the service is up, for `Type=notify`.
    pub fn notify_ready(&self, status: &str) -> Result<()> {
        self.notify(&ready_message(status), None)
    }
}

/// `READY=1` and a one-line `STATUS=` (newlines would start another assignment).
pub fn ready_message(status: &str) -> String {
    format!("READY=1\nSTATUS={}\n", status.replace('\n', " "))
}

/// `FDSTORE=1` + `FDNAME=`. No `FDPOLL=0`: systemd's own POLLHUP/POLLERR watch drops
/// an fd whose FUSE connection ended, as our keeper does.
pub fn fdstore_message(name: &str) -> String {
    format!("FDSTORE=1\nFDNAME={name}\n")
}

/// Removes the named fds from systemd's store.
pub fn fdstore_remove_message(name: &str) -> String {
    format!("FDSTOREREMOVE=1\nFDNAME={name}\n")
}

/// `(fd, name)` of the fds systemd passed, from the values of `LISTEN_PID`,
/// `LISTEN_FDS` and `LISTEN_FDNAMES`: none unless LISTEN_PID is `pid`; names default to
/// `unknown` as in sd_listen_fds_with_names(3).
pub fn parse_listen_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
    pid: u32,
) -> std::result::Result<Vec<(RawFd, String)>, String> {
    const SD_LISTEN_FDS_START: RawFd = 3;
    let (Some(p), Some(n)) = (listen_pid, listen_fds) else {
        return Ok(Vec::new());
    };
    if p.trim()
        .parse::<u32>()
        .map_err(|_| format!("LISTEN_PID={p:?}"))?
        != pid
    {
        return Ok(Vec::new());
    }
    let n: RawFd = n
        .trim()
        .parse()
        .ok()
        .filter(|&n| (0..=4096).contains(&n))
        .ok_or_else(|| format!("LISTEN_FDS={n:?}"))?;
    let names: Vec<&str> = names.map(|s| s.split(':').collect()).unwrap_or_default();
    if !names.is_empty() && names.len() != n as usize {
        return Err(format!(
            "LISTEN_FDNAMES has {} names for {n} fds",
            names.len()
        ));
    }
    Ok((0..n)
        .map(|i| {
            let name = names.get(i as usize).copied().unwrap_or("unknown");
            (SD_LISTEN_FDS_START + i, name.to_string())
        })
        .collect())
}

impl FdStore for SystemdFdStore {
    fn put(&self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        check_name(name)?;
        // systemd keeps several fds under one name; remove the old one first.
        self.notify(&fdstore_remove_message(name), None)?;
        self.notify(&fdstore_message(name), Some(fd))
    }

    fn get(&self, name: &str) -> Result<Option<OwnedFd>> {
        check_name(name)?;
        let passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
        match passed.get(name) {
            Some(fd) => fd
                .try_clone()
                .map(Some)
                .map_err(|e| Error::store("systemd", format!("dup {name}: {e}"))),
            None => Ok(None),
        }
    }

    fn del(&self, name: &str) -> Result<()> {
        check_name(name)?;
        self.passed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.notify(&fdstore_remove_message(name), None)
    }

    /// The names passed at start and not deleted since (systemd cannot be asked).
    fn list(&self) -> Result<Vec<String>> {
        Ok(self
            .passed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["L1", "layer.sha256:abc", "a-b_c+d@e"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "a b", "a\nb", "a=b", "x/y", &"x".repeat(201)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keeper_requests_parse() {
        assert_eq!(
            parse_keeper_request(b"PUT L1"),
            Ok(KeeperRequest::Put("L1"))
        );
        assert_eq!(
            parse_keeper_request(b"GET L1"),
            Ok(KeeperRequest::Get("L1"))
        );
        assert_eq!(
            parse_keeper_request(b"DEL L1"),
            Ok(KeeperRequest::Del("L1"))
        );
        assert_eq!(parse_keeper_request(b"LIST"), Ok(KeeperRequest::List));
        assert!(parse_keeper_request(b"GET").is_err());
        assert!(parse_keeper_request(b"GET a b").is_err());
        assert!(parse_keeper_request(b"LIST x").is_err());
        assert!(parse_keeper_request(b"\xff").is_err());
        assert!(parse_keeper_request(b"EXEC rm").is_err());
    }

    #[test]
    fn systemd_messages_and_listen_fds() {
        assert_eq!(fdstore_message("L1"), "FDSTORE=1\nFDNAME=L1\n");
        assert_eq!(fdstore_remove_message("L1"), "FDSTOREREMOVE=1\nFDNAME=L1\n");
        assert_eq!(ready_message("a\nb"), "READY=1\nSTATUS=a b\n");
        assert_eq!(
            parse_listen_fds(Some("77"), Some("2"), Some("a:b"), 77).unwrap(),
            vec![(3, "a".to_string()), (4, "b".to_string())]
        );
        assert_eq!(
            parse_listen_fds(Some("77"), Some("1"), None, 77).unwrap(),
            vec![(3, "unknown".to_string())]
        );
        // Meant for another process (inherited environment): not ours.
        assert!(parse_listen_fds(Some("76"), Some("2"), Some("a:b"), 77)
            .unwrap()
            .is_empty());
        assert!(parse_listen_fds(None, None, None, 77).unwrap().is_empty());
        assert!(parse_listen_fds(Some("77"), Some("2"), Some("a"), 77).is_err());
        assert!(parse_listen_fds(Some("77"), Some("-1"), None, 77).is_err());
        assert!(parse_listen_fds(Some("x"), Some("1"), None, 77).is_err());
    }

    /// `put` sends what systemd expects, with the fd attached, to NOTIFY_SOCKET (here a
    /// datagram socket of the test's own standing in for systemd).
    #[test]
    fn systemd_put_sends_fdstore_with_the_fd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        // SAFETY: no pointers.
        let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(s >= 0);
        // SAFETY: new fd.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let (a, l) = sockaddr(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid address.
        assert_eq!(
            unsafe { libc::bind(s.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), l) },
            0
        );
        let store = SystemdFdStore::with_socket(&path);
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        store.put("L1", f.as_fd()).unwrap();
        let (m1, f1) = recv_msg(s.as_fd()).unwrap().unwrap();
        assert_eq!(m1, b"FDSTOREREMOVE=1\nFDNAME=L1\n");
        assert!(f1.is_empty());
        let (m2, f2) = recv_msg(s.as_fd()).unwrap().unwrap();
        assert_eq!(m2, b"FDSTORE=1\nFDNAME=L1\n");
        assert_eq!(f2.len(), 1);
        let st = |fd: RawFd| {
            // SAFETY: stat buffer is plain data.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fd is live.
            assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
            (st.st_dev, st.st_ino)
        };
        assert_eq!(st(f2[0].as_raw_fd()), st(f.as_raw_fd()));
        store.del("L1").unwrap();
        let (m3, _) = recv_msg(s.as_fd()).unwrap().unwrap();
        assert_eq!(m3, b"FDSTOREREMOVE=1\nFDNAME=L1\n");
    }
}
