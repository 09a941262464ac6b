//! Stopping a container and removing what its run left outside the store:
//! libcontainer's state directory and the cgroup directories.

use std::path::Path;
use std::time::{Duration, Instant};

use libcontainer::container::Container;

use crate::record::Proc;
use crate::Error;

/// SIGKILL the container's init (its pid namespace, and every process in
/// it, dies with it) and wait up to `timeout` for it to be gone.
pub fn kill(id: &str, init: &Proc, timeout: Duration) -> Result<(), Error> {
    if init.is_alive() {
        // SAFETY: kill(2) on a pid whose start time was just checked.
        unsafe { libc::kill(init.pid as i32, libc::SIGKILL) };
    }
    if wait_gone(init, timeout) {
        Ok(())
    } else {
        Err(Error::Runtime {
            id: id.to_string(),
            message: format!("init (pid {}) still alive after SIGKILL", init.pid),
        })
    }
}

/// Wait up to `timeout` for `p` to end; whether it did.
pub fn wait_gone(p: &Proc, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while p.is_alive() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Remove container `id`'s libcontainer state under `state_root` if left
/// (through libcontainer's delete, which kills what is left in the cgroup
/// and removes the cgroup), then its cgroup directories `cgroup` and their
/// shared parent where empty.
pub fn remove(id: &str, state_root: &Path, cgroup: &str) -> Result<(), Error> {
    let rt = |message: String| Error::Runtime {
        id: id.to_string(),
        message,
    };
    let state = state_root.join(id);
    if state.exists() {
        match Container::load(state.clone()) {
            Ok(mut c) => c
                .delete(true)
                .map_err(|e| rt(format!("delete {}: {e}", state.display())))?,
            // A state dir without a readable state (killed while creating):
            // nothing to ask libcontainer about.
            Err(_) => std::fs::remove_dir_all(&state)
                .map_err(|e| rt(format!("remove {}: {e}", state.display())))?,
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| rt(format!("read /proc/self/mountinfo: {e}")))?;
    crate::cgroup::remove_leftovers(&crate::cgroup::mount_points(&mountinfo), cgroup)
        .map_err(|e| rt(e.to_string()))
}
