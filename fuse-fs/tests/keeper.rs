//! The keeper process's protocol against a real server on a unix socket: fds go in and
//! come back as the same open file, names are listed and deleted, the socket is 0600
//! and peers that are not uid 0 are refused even when they can connect.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cstore_fuse_fs::keeper::{recv_msg, send_msg};
use cstore_fuse_fs::{Error, FdStore, Keeper, KeeperClient};

struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(path: &Path) -> Server {
        let k = Keeper::bind(path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || k.serve(&s).unwrap());
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn root() -> bool {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("keeper tests need root (CI=true makes this a failure)");
    }
    eprintln!("skipped: not root");
    false
}

#[test]
fn keeper_holds_fds_by_name() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    let _server = Server::start(&sock);
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        Keeper::bind(&sock).is_err(),
        "a second keeper on a live socket must be refused"
    );
    let k = KeeperClient::new(&sock);
    assert!(k.list().unwrap().is_empty());
    let (r, mut w) = std::io::pipe().unwrap();
    k.put("L1", r.as_fd()).unwrap();
    k.put("L2", r.as_fd()).unwrap();
    drop(r);
    assert_eq!(k.list().unwrap(), vec!["L1", "L2"]);
    // What comes back is the same open file: the pipe still has a reader.
    let got = k.get("L1").unwrap().expect("L1 held");
    w.write_all(b"through the keeper").unwrap();
    let mut s = [0u8; 18];
    std::fs::File::from(got).read_exact(&mut s).unwrap();
    assert_eq!(&s, b"through the keeper");
    k.del("L1").unwrap();
    assert!(k.get("L1").unwrap().is_none());
    assert_eq!(k.list().unwrap(), vec!["L2"]);
    assert!(matches!(
        k.put("a b", std::io::stdin().as_fd()),
        Err(Error::BadName(_))
    ));

    // Raw protocol errors are answered, not fatal to the keeper.
    let c = connect(&sock);
    send_msg(c.as_fd(), b"PUT nofd", None).unwrap();
    assert_eq!(
        recv_msg(c.as_fd()).unwrap().unwrap().0,
        b"ERR PUT needs exactly one fd"
    );
    send_msg(c.as_fd(), b"EXEC x", None).unwrap();
    assert!(recv_msg(c.as_fd())
        .unwrap()
        .unwrap()
        .0
        .starts_with(b"ERR unknown request"));
    assert_eq!(k.list().unwrap(), vec!["L2"]);
    // The other end of what it holds goes away (for /dev/fuse: the connection ends):
    // the keeper drops it by itself.
    drop(w);
    let t = std::time::Instant::now();
    while !k.list().unwrap().is_empty() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "L2 still held"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn connect(p: &Path) -> std::os::unix::net::UnixStream {
    // std has no SOCK_SEQPACKET client: connect with libc and wrap the fd.
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain socket calls on a fresh fd; the address is built in bounds.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        assert!(s >= 0);
        let mut a: libc::sockaddr_un = std::mem::zeroed();
        a.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (i, b) in p.as_os_str().as_bytes().iter().enumerate() {
            a.sun_path[i] = *b as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + p.as_os_str().len() + 1;
        assert_eq!(
            libc::connect(s, (&a as *const libc::sockaddr_un).cast(), len as u32),
            0
        );
        std::os::unix::net::UnixStream::from_raw_fd(s)
    }
}

/// uid 65534 cannot connect to the 0600 socket; made connectable, it is refused by
/// SO_PEERCRED and sees nothing.
#[test]
fn keeper_refuses_peers_that_are_not_root() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("k.sock");
    let _server = Server::start(&sock);
    let (r, _w) = std::io::pipe().unwrap();
    KeeperClient::new(&sock).put("secret", r.as_fd()).unwrap();
    let list_as_nobody = || {
        Command::new(env!("CARGO_BIN_EXE_cstore-fuse-testd"))
            .arg("list")
            .arg(&sock)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let out = list_as_nobody();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = list_as_nobody();
    assert!(!out.status.success(), "a non-root peer got: {:?}", out);
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Root still is served.
    assert_eq!(KeeperClient::new(&sock).list().unwrap(), vec!["secret"]);
}
