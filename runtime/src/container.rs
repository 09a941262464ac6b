//! Launching a container with youki's libcontainer: an OCI runtime spec
//! built from the image config and the caller's flags (runc's defaults:
//! fresh /proc, minimal /dev, masked and read-only /proc and /sys paths,
//! default capabilities, pivot_root), started as our child so its exit
//! status and stdio pass straight through.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use oci_spec::runtime::{
    Capabilities, Capability, LinuxBlockIoBuilder, LinuxCapabilities, LinuxCapabilitiesBuilder,
    LinuxIdMappingBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxThrottleDeviceBuilder,
    RootBuilder, Spec, UserBuilder,
};

use crate::cgroup::IoLimits;
use crate::start::{Children, Cut, Exec, ExecReport, Watchdog};
use crate::Error;

/// What to run, and how.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub id: String,
    /// The mounted root filesystem.
    pub rootfs: PathBuf,
    /// Where config.json is written (the rootfs need not be inside it).
    pub bundle: PathBuf,
    /// libcontainer's state directory.
    pub state_root: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups. libcontainer calls setgroups only for a
    /// non-empty list (else the process keeps ours): give at least `gid`.
    pub additional_gids: Vec<u32>,
    pub hostname: String,
    /// Share the host's network namespace (else a new, empty one).
    pub net_host: bool,
    pub readonly: bool,
    /// Cgroup path, e.g. "/cstore/ID" (one per hierarchy on v1).
    pub cgroup: String,
    /// I/O limits on one device, MAJ:MIN.
    pub io: Option<(u32, u32, IoLimits)>,
    pub memory: Option<i64>,
    pub pids: Option<i64>,
    /// `-t`: a pty for the process, its master relayed to our stdio.
    pub tty: bool,
    /// `-i`: our stdin reaches the process (else it reads /dev/null).
    pub interactive: bool,
    /// `--userns`: a user namespace with this mapping (the rootfs must
    /// already show the image's files under it: id-mapped layers).
    pub userns: Option<crate::userns::Userns>,
    /// How long the init may take to be ready and then to exec the command
    /// before it is killed and the start fails.
    pub start_timeout: Duration,
}

/// The default [`RunSpec::start_timeout`]: a start takes tens of
/// milliseconds; minutes on a machine too loaded to be usable.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

fn spec_err(e: impl std::fmt::Display) -> Error {
    Error::Spec(e.to_string())
}

/// The capabilities containerd (and so `ctr run`, CRI and podman) gives a
/// container by default: what package managers and init scripts need as
/// root (chown, setuid, mknod, raw sockets...), nothing that reaches the
/// host (no SYS_ADMIN, NET_ADMIN, SYS_MODULE, ...). `runc spec`'s three are
/// too few for a root that installs software. Not inheritable, no ambient
/// (containerd dropped those in 1.6.18, CVE-2022-24769).
pub const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

fn default_capabilities() -> Result<LinuxCapabilities, Error> {
    let set: Capabilities = DEFAULT_CAPABILITIES.into_iter().collect();
    LinuxCapabilitiesBuilder::default()
        .bounding(set.clone())
        .effective(set.clone())
        .permitted(set)
        .inheritable(Capabilities::new())
        .ambient(Capabilities::new())
        .build()
        .map_err(spec_err)
}

/// The OCI runtime spec for `r`.
pub fn build_spec(r: &RunSpec) -> Result<Spec, Error> {
    let mut spec = Spec::default();
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| spec_err("default spec has no process"))?;
    process
        .set_args(Some(r.args.clone()))
        .set_env(Some(r.env.clone()))
        .set_cwd(r.cwd.clone().into())
        .set_terminal(Some(r.tty))
        .set_no_new_privileges(Some(true))
        .set_capabilities(Some(default_capabilities()?))
        .set_user(
            UserBuilder::default()
                .uid(r.uid)
                .gid(r.gid)
                .additional_gids(r.additional_gids.clone())
                .build()
                .map_err(spec_err)?,
        );
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path(&r.rootfs)
            .readonly(r.readonly)
            .build()
            .map_err(spec_err)?,
    ));
    spec.set_hostname(Some(r.hostname.clone()));
    let mut linux = spec
        .linux()
        .clone()
        .ok_or_else(|| spec_err("default spec has no linux section"))?;
    linux.set_cgroups_path(Some(r.cgroup.clone().into()));
    // runc mounts the cgroup hierarchies read-only. libcontainer bind-mounts
    // each v1 hierarchy read-write whatever the spec says, which would let
    // the container lift its own limits; readonly paths remount each one.
    let mut readonly = linux.readonly_paths().clone().unwrap_or_default();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    readonly.extend(cgroup_readonly_paths(&mountinfo));
    linux.set_readonly_paths(Some(readonly));
    if r.net_host {
        if let Some(ns) = linux.namespaces().clone() {
            linux.set_namespaces(Some(
                ns.into_iter()
                    .filter(|n| n.typ() != LinuxNamespaceType::Network)
                    .collect(),
            ));
        }
    }
    if let Some(u) = &r.userns {
        if r.net_host {
            // sysfs can be mounted only by the owner of the network namespace.
            return Err(spec_err(
                "--userns needs a network namespace of its own: not with --net host (as docker)",
            ));
        }
        let map = |x: &crate::userns::IdRange| {
            LinuxIdMappingBuilder::default()
                .container_id(0u32)
                .host_id(x.host)
                .size(x.count)
                .build()
                .map_err(spec_err)
        };
        linux.set_uid_mappings(Some(vec![map(&u.uid)?]));
        linux.set_gid_mappings(Some(vec![map(&u.gid)?]));
        let mut ns = linux.namespaces().clone().unwrap_or_default();
        ns.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .build()
                .map_err(spec_err)?,
        );
        linux.set_namespaces(Some(ns));
    }
    let mut res = linux.resources().clone().unwrap_or_default();
    if let Some((major, minor, l)) = &r.io {
        let dev = |rate: u64| {
            LinuxThrottleDeviceBuilder::default()
                .major(*major as i64)
                .minor(*minor as i64)
                .rate(rate)
                .build()
                .map_err(spec_err)
        };
        let list = |v: Option<u64>| -> Result<Option<Vec<_>>, Error> {
            v.map(|x| dev(x).map(|d| vec![d])).transpose()
        };
        let mut b = LinuxBlockIoBuilder::default();
        if let Some(v) = list(l.read_bps)? {
            b = b.throttle_read_bps_device(v);
        }
        if let Some(v) = list(l.write_bps)? {
            b = b.throttle_write_bps_device(v);
        }
        if let Some(v) = list(l.read_iops)? {
            b = b.throttle_read_iops_device(v);
        }
        if let Some(v) = list(l.write_iops)? {
            b = b.throttle_write_iops_device(v);
        }
        res.set_block_io(Some(b.build().map_err(spec_err)?));
    }
    if let Some(m) = r.memory {
        let mem = oci_spec::runtime::LinuxMemoryBuilder::default()
            .limit(m)
            .build()
            .map_err(spec_err)?;
        res.set_memory(Some(mem));
    }
    if let Some(p) = r.pids {
        let pids = oci_spec::runtime::LinuxPidsBuilder::default()
            .limit(p)
            .build()
            .map_err(spec_err)?;
        res.set_pids(Some(pids));
    }
    linux.set_resources(Some(res));
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// /sys/fs/cgroup and every hierarchy mounted under it (from a mountinfo
/// text), as the container sees them (at the host's paths).
fn cgroup_readonly_paths(mountinfo: &str) -> Vec<String> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    std::iter::once(root.to_path_buf())
        .chain(
            crate::cgroup::mount_points(mountinfo)
                .into_iter()
                .filter(|p| p.parent() == Some(root)),
        )
        .map(|p| p.display().to_string())
        .collect()
}

impl RunSpec {
    /// Refuse what would make libcontainer's init fail obscurely, panic or
    /// hang (`validate`), before anything is created. Callers that know
    /// where an entry came from (image config or flag) check it first and
    /// say so; this is the backstop.
    pub fn validate(&self) -> Result<(), Error> {
        crate::validate::args(&self.args).map_err(Error::Input)?;
        for e in &self.env {
            crate::validate::env_entry(e).map_err(Error::Input)?;
        }
        crate::validate::cwd(&self.cwd).map_err(Error::Input)?;
        crate::validate::hostname(&self.hostname).map_err(Error::Input)?;
        for (what, id) in std::iter::once(("uid", self.uid))
            .chain(std::iter::once(("gid", self.gid)))
            .chain(self.additional_gids.iter().map(|&g| ("gid", g)))
        {
            // (uid_t)-1 is "unchanged" to setresuid: the process stays root.
            if id > i32::MAX as u32 {
                return Err(Error::Input(format!(
                    "{what} {id} is out of range (0-{})",
                    i32::MAX
                )));
            }
        }
        Ok(())
    }
}

/// Create, start, wait for and delete the container; its exit status
/// (128 + signal when killed).
pub fn run(r: &RunSpec) -> Result<i32, Error> {
    run_with(r, |_| {})
}

fn cut_error(id: &str, cut: Cut, stage: &'static str, after: Duration) -> Error {
    match cut {
        Cut::Timeout => Error::StartTimeout {
            id: id.to_string(),
            stage,
            after,
        },
        Cut::Signal(sig) => Error::Interrupted {
            id: id.to_string(),
            signal: nix::sys::signal::Signal::try_from(sig)
                .map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string()),
        },
    }
}

/// SIGKILL the init (still before its command, or never to run it) and
/// reap it; how it ended.
fn end_init(pid: nix::unistd::Pid) -> Option<WaitStatus> {
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Ok(WaitStatus::StillAlive) => return None,
            Ok(s) => return Some(s),
            Err(Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
}

/// As [`run`], telling `on_start` the init's pid once it runs its command:
/// from then on this process clones no more (callers release locks other
/// threads hold).
///
/// The start is bounded by `r.start_timeout` (see `start`): an init that
/// does not report ready, or does not exec its command, in that time is
/// killed, and so is everything the create made, as when SIGINT, SIGTERM,
/// SIGHUP or SIGQUIT reaches this process before the command runs.
pub fn run_with(r: &RunSpec, on_start: impl FnOnce(u32)) -> Result<i32, Error> {
    let rt = |message: String| Error::Runtime {
        id: r.id.clone(),
        message,
    };
    r.validate()?;
    std::fs::create_dir_all(&r.bundle)
        .map_err(|e| rt(format!("bundle {}: {e}", r.bundle.display())))?;
    // libcontainer's state (ROOT/run-state) is root's alone (see
    // cstore_os::layout).
    cstore_os::layout::create_dir_all(&r.state_root, cstore_os::layout::PRIVATE_DIR_MODE)
        .map_err(|e| rt(format!("state {}: {e}", r.state_root.display())))?;
    build_spec(r)?
        .save(r.bundle.join("config.json"))
        .map_err(spec_err)?;
    let console = r
        .tty
        .then(|| crate::tty::ConsoleSocket::bind(&r.bundle.join("console.sock")))
        .transpose()
        .map_err(|e| rt(format!("console socket: {e}")))?;
    let mut report = ExecReport::new().map_err(|e| rt(format!("exec report pipe: {e}")))?;
    let mut builder = ContainerBuilder::new(r.id.clone(), SyscallType::default())
        .with_executor(crate::signals::Exec {
            report: report.write_fd(),
        })
        .with_root_path(&r.state_root)
        .map_err(|e| rt(e.to_string()))?
        .validate_id()
        .map_err(|e| rt(e.to_string()))?
        .with_console_socket(console.as_ref().map(|c| c.path()));
    if !r.tty && !r.interactive {
        // As docker: without -i the process reads /dev/null, not our stdin.
        let null = std::fs::File::open("/dev/null").map_err(|e| rt(format!("/dev/null: {e}")))?;
        builder = builder.with_stdin(null);
    }
    // One budget for the whole start: create, then the exec.
    let deadline = Instant::now() + r.start_timeout;
    let children = Arc::new(Children::now());
    let abort = crate::signals::abort_on().map_err(|e| rt(format!("abort pipe: {e}")))?;
    let dog = Watchdog::arm(r.start_timeout, abort.clone(), children.clone());
    let dog = match dog {
        Ok(d) => d,
        Err(e) => {
            crate::signals::abort_off();
            return Err(rt(format!("start watchdog: {e}")));
        }
    };
    let built = builder
        .as_init(&r.bundle)
        .with_systemd(false)
        // libcontainer takes a console socket only from a "detached" caller;
        // detach gates nothing else: init is still our child, waited below.
        .with_detach(r.tty)
        .build();
    let cut = dog.finish();
    // Only the init holds a write end now (the intermediate has exited).
    report.close_ours();
    let mut c = match (built, cut) {
        (Ok(c), None) => c,
        (Err(e), None) => {
            crate::signals::abort_off();
            children.kill_and_reap_new();
            return Err(rt(format!("create: {e}")));
        }
        (built, Some(cut)) => {
            crate::signals::abort_off();
            if let Ok(mut c) = built {
                // Cut just as it finished: what it made goes too.
                let _ = c.delete(true);
            }
            children.kill_and_reap_new();
            return Err(cut_error(&r.id, cut, "report ready", r.start_timeout));
        }
    };
    let Some(pid) = c.pid() else {
        crate::signals::abort_off();
        let _ = c.delete(true);
        children.kill_and_reap_new();
        return Err(rt("created without a pid".into()));
    };
    let pid = nix::unistd::Pid::from_raw(pid.as_raw());
    // Everything below that fails before the command runs ends the init.
    let abandon = |c: &mut libcontainer::container::Container, e: Error| {
        crate::signals::forward_to(0);
        crate::signals::abort_off();
        end_init(pid);
        let _ = c.delete(true);
        Err(e)
    };
    // The pty master was sent during create; without it the container is useless.
    let session = match console
        .as_ref()
        .map(|s| {
            s.recv_master()
                .and_then(|m| crate::tty::attach(m, r.interactive))
        })
        .transpose()
    {
        Ok(s) => s,
        Err(e) => return abandon(&mut c, rt(format!("terminal: {e}"))),
    };
    // Forwarding from before the start: once the process runs (and can say
    // so), a signal to us is never left to its default action. (Before its
    // exec, the init still has our handler, which writes the signal to the
    // abort pipe: the wait below sees it.)
    crate::signals::forward_to(pid.as_raw());
    let exec = match c.start() {
        Ok(()) => report.wait(deadline, abort.as_fd()),
        Err(e) => return abandon(&mut c, rt(format!("start: {e}"))),
    };
    match exec {
        Exec::Ran => crate::signals::abort_off(),
        Exec::Failed(reason) => {
            return abandon(
                &mut c,
                Error::NotStarted {
                    id: r.id.clone(),
                    reason,
                },
            )
        }
        Exec::DiedBefore => {
            crate::signals::forward_to(0);
            crate::signals::abort_off();
            let how = match end_init(pid) {
                Some(WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
                Some(WaitStatus::Signaled(_, sig, _)) => format!("was killed by {sig}"),
                _ => "ended".to_string(),
            };
            let _ = c.delete(true);
            return Err(Error::NotStarted {
                id: r.id.clone(),
                reason: format!("its init {how} before running the command"),
            });
        }
        Exec::Cut(cut) => {
            let e = cut_error(&r.id, cut, "run its command", r.start_timeout);
            return abandon(&mut c, e);
        }
    }
    on_start(pid.as_raw() as u32);
    // Exited but not reaped (WNOWAIT): its pid cannot be anyone else's
    // while a signal may still be forwarded to it.
    let status = loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(Errno::EINTR) => continue,
            r => break r,
        }
    };
    crate::signals::forward_to(0);
    while let Err(Errno::EINTR) = waitpid(pid, None) {}
    let code = match status {
        Ok(WaitStatus::Exited(_, code)) => Ok(code),
        Ok(WaitStatus::Signaled(_, sig, _)) => Ok(128 + sig as i32),
        Ok(s) => Err(rt(format!("wait: unexpected {s:?}"))),
        Err(e) => Err(rt(format!("wait: {e}"))),
    };
    // Output still in the pty after the exit reaches stdout.
    let code = match session.map(crate::tty::Session::finish) {
        Some(Err(e)) => code.and(Err(rt(format!("terminal: {e}")))),
        _ => code,
    };
    let _ = c.refresh_status();
    let deleted = c.delete(true).map_err(|e| rt(format!("delete: {e}")));
    let code = code?;
    deleted?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nvme-vm guest's mounts: cgroup2 alone at /sys/fs/cgroup.
    const PURE_V2: &str = "22 1 0:20 / / rw,relatime - tmpfs tmpfs rw,mode=755
23 22 0:5 / /proc rw,relatime - proc proc rw
24 22 0:21 / /sys rw,relatime - sysfs sysfs rw
25 24 0:26 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw
26 22 259:1 / /store rw,relatime - ext4 /dev/nvme0n1p1 rw";

    #[test]
    fn cgroup_paths_are_read_only_on_pure_v2_and_hybrid() {
        assert_eq!(cgroup_readonly_paths(PURE_V2), ["/sys/fs/cgroup"]);
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw
38 31 0:35 / /sys/fs/cgroup/blkio rw - cgroup cgroup rw,blkio
41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
50 23 0:40 / /elsewhere/cg rw - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup_readonly_paths(hybrid),
            [
                "/sys/fs/cgroup",
                "/sys/fs/cgroup/blkio",
                "/sys/fs/cgroup/unified"
            ]
        );
    }

    #[test]
    fn io_limits_become_the_specs_block_io_throttles() {
        let r = RunSpec {
            id: "c1".into(),
            rootfs: "/r".into(),
            bundle: "/b".into(),
            state_root: "/s".into(),
            args: vec!["true".into()],
            env: vec![],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            hostname: "c1".into(),
            net_host: false,
            readonly: false,
            cgroup: "/cstore/c1".into(),
            io: Some((
                259,
                0,
                IoLimits {
                    read_bps: Some(1 << 20),
                    write_iops: Some(100),
                    ..Default::default()
                },
            )),
            memory: None,
            pids: None,
            tty: false,
            interactive: false,
            userns: None,
            start_timeout: START_TIMEOUT,
        };
        let spec = build_spec(&r).unwrap();
        let bio = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.block_io().as_ref())
            .expect("blockIO in the spec");
        let one = |v: &Option<Vec<oci_spec::runtime::LinuxThrottleDevice>>| {
            v.as_ref().map(|v| {
                v.iter()
                    .map(|d| (d.major(), d.minor(), d.rate()))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            one(bio.throttle_read_bps_device()),
            Some(vec![(259, 0, 1 << 20)])
        );
        assert_eq!(
            one(bio.throttle_write_iops_device()),
            Some(vec![(259, 0, 100)])
        );
        assert_eq!(one(bio.throttle_write_bps_device()), None);
        assert_eq!(one(bio.throttle_read_iops_device()), None);
    }
}
