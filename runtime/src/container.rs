//! Launching a container with youki's libcontainer: an OCI runtime spec
//! built from the image config and the caller's flags (runc's defaults:
//! fresh /proc, minimal /dev, masked and read-only /proc and /sys paths,
//! default capabilities, pivot_root), started as our child so its exit
//! status and stdio pass straight through.

use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use nix::sys::wait::{waitpid, WaitStatus};
use oci_spec::runtime::{
    LinuxBlockIoBuilder, LinuxNamespaceType, LinuxThrottleDeviceBuilder, RootBuilder, Spec,
    UserBuilder,
};

use crate::cgroup::IoLimits;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("container spec: {0}")]
    Spec(String),
    #[error("container {id}: {message}")]
    Runtime { id: String, message: String },
}

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
}

fn spec_err(e: impl std::fmt::Display) -> RunError {
    RunError::Spec(e.to_string())
}

/// The OCI runtime spec for `r`.
pub fn build_spec(r: &RunSpec) -> Result<Spec, RunError> {
    let mut spec = Spec::default();
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| spec_err("default spec has no process"))?;
    process
        .set_args(Some(r.args.clone()))
        .set_env(Some(r.env.clone()))
        .set_cwd(r.cwd.clone().into())
        .set_terminal(Some(false))
        .set_no_new_privileges(Some(true))
        .set_user(
            UserBuilder::default()
                .uid(r.uid)
                .gid(r.gid)
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
    if r.net_host {
        if let Some(ns) = linux.namespaces().clone() {
            linux.set_namespaces(Some(
                ns.into_iter()
                    .filter(|n| n.typ() != LinuxNamespaceType::Network)
                    .collect(),
            ));
        }
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
        let list = |v: Option<u64>| -> Result<Option<Vec<_>>, RunError> {
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

/// Create, start, wait for and delete the container; its exit status
/// (128 + signal when killed).
pub fn run(r: &RunSpec) -> Result<i32, RunError> {
    run_then(r, || {})
}

/// `run`, calling `started` once the container's process runs its command
/// (or once it failed to): from then on this process clones no more.
pub fn run_then(r: &RunSpec, started: impl FnOnce()) -> Result<i32, RunError> {
    let rt = |message: String| RunError::Runtime {
        id: r.id.clone(),
        message,
    };
    std::fs::create_dir_all(&r.bundle)
        .map_err(|e| rt(format!("bundle {}: {e}", r.bundle.display())))?;
    std::fs::create_dir_all(&r.state_root)
        .map_err(|e| rt(format!("state {}: {e}", r.state_root.display())))?;
    build_spec(r)?
        .save(r.bundle.join("config.json"))
        .map_err(spec_err)?;
    let mut c = ContainerBuilder::new(r.id.clone(), SyscallType::default())
        .with_executor(DefaultExecutor {})
        .with_root_path(&r.state_root)
        .map_err(|e| rt(e.to_string()))?
        .validate_id()
        .map_err(|e| rt(e.to_string()))?
        .as_init(&r.bundle)
        .with_systemd(false)
        .with_detach(false)
        .build()
        .map_err(|e| rt(format!("create: {e}")))?;
    let start = c.start();
    started();
    let code = match (start, c.pid()) {
        (Ok(()), Some(pid)) => {
            crate::signals::forward_to(pid.as_raw());
            let code = loop {
                match waitpid(nix::unistd::Pid::from_raw(pid.as_raw()), None) {
                    Ok(WaitStatus::Exited(_, code)) => break Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => break Ok(128 + sig as i32),
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => break Err(rt(format!("wait: {e}"))),
                }
            };
            crate::signals::forward_to(0);
            code
        }
        (Ok(()), None) => Err(rt("started without a pid".into())),
        (Err(e), _) => Err(rt(format!("start: {e}"))),
    };
    let _ = c.refresh_status();
    let deleted = c.delete(true).map_err(|e| rt(format!("delete: {e}")));
    let code = code?;
    deleted?;
    Ok(code)
}
