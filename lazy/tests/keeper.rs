//! The store's keeper (`supervise_store`) when a systemd unit takes its
//! connections over: its daemon declines (`EXIT_DECLINED`, the unit's marker
//! written), and the keeper holds what it keeps, runs no other daemon, and
//! exits once the unit has taken every fd; with the marker removed instead, it
//! serves again. Real processes and the keeper's real socket; a pipe stands in
//! for a FUSE connection's fd (the keeper holds any fd).

use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cstore_fuse_fs::{FdStore, KeeperClient, RestartPolicy, EXIT_DECLINED};
use cstore_lazy::serve::{keeper_socket, supervise_store, systemd_unit_file};
use cstore_store::Store;

const NAME: &str = "lazy.1111111111111111111111111111111111111111111111111111111111111111";

fn policy() -> RestartPolicy {
    RestartPolicy {
        max_failures: 3,
        window: Duration::from_secs(60),
    }
}

/// A daemon that declines: the marker exists, so it exits 76 at once.
fn declining() -> std::io::Result<std::process::Child> {
    Command::new("sh")
        .arg("-c")
        .arg(format!("exit {EXIT_DECLINED}"))
        .spawn()
}

#[test]
fn a_keeper_whose_daemon_declines_holds_its_fds_until_the_unit_takes_them_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let marker = systemd_unit_file(&store);
    let spawned = Arc::new(AtomicUsize::new(0));
    let sock = keeper_socket(&store);
    // The unit: once the keeper holds the fd and its daemon has declined,
    // take the fd over (GET, then DEL), as the unit's daemon does.
    let unit = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let keeper = KeeperClient::new(&sock);
            for _ in 0..100 {
                if keeper.list().is_ok_and(|l| l == [NAME]) {
                    // Still held a while after the daemon declined.
                    std::thread::sleep(Duration::from_millis(500));
                    let fd = keeper.get(NAME).unwrap().expect("the kept fd");
                    keeper.del(NAME).unwrap();
                    return Some(fd);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            None
        })
    };
    // Both ends open: the keeper drops an fd that reports a hang-up.
    let (conn, _peer) = std::io::pipe().unwrap();
    let n = spawned.clone();
    let m = marker.clone();
    supervise_store(
        &store,
        |sock| {
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                // The daemon before the unit: it kept a connection.
                KeeperClient::new(sock).put(NAME, conn.as_fd()).unwrap();
                std::fs::write(&m, "cstore-lazy.service\n").unwrap();
            }
            declining()
        },
        policy(),
    )
    .unwrap();
    let taken = unit.join().unwrap();
    assert!(taken.is_some(), "the unit found the fd held by the keeper");
    assert_eq!(
        spawned.load(Ordering::SeqCst),
        1,
        "a keeper whose daemon declined runs no other (nor counts failures)"
    );
    assert!(!sock.exists(), "the keeper's socket is gone with it");
}

#[test]
fn a_keeper_serves_again_when_the_units_marker_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let marker = systemd_unit_file(&store);
    std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
    let spawned = Arc::new(AtomicUsize::new(0));
    let (conn, _peer) = std::io::pipe().unwrap();
    let n = spawned.clone();
    let m = marker.clone();
    supervise_store(
        &store,
        |sock| match n.fetch_add(1, Ordering::SeqCst) {
            0 => {
                KeeperClient::new(sock).put(NAME, conn.as_fd()).unwrap();
                std::fs::write(&m, "cstore-lazy.service\n").unwrap();
                let m = m.clone();
                // Removed by hand while the keeper waits: back to serving.
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(500));
                    std::fs::remove_file(m).unwrap();
                });
                declining()
            }
            _ => {
                // The next daemon serves, ends its layers and drops the fd.
                KeeperClient::new(sock).del(NAME).unwrap();
                Command::new("true").spawn()
            }
        },
        policy(),
    )
    .unwrap();
    assert_eq!(spawned.load(Ordering::SeqCst), 2);
}
