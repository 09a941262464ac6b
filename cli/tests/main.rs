//! cstore's integration tests: one test binary (one build, one link, one
//! registry with the test images for the whole run), each area a module.
//! Every test runs the real `cstore` binary against real peers (CNCF
//! distribution, skopeo, umoci, containerd, runc) started by `harness`.
//!
//! A module's tests are selected by its path: `cargo test -p cstore --test
//! main -- run::` (several filters select the union: `-- pull:: faults::`).

mod harness;

mod auth;
mod bench_suite;
mod check;
mod confinement;
mod containerd;
mod cri;
mod device;
mod faults;
mod install;
mod killpoints;
mod lazy;
mod lazy_restart;
mod logs;
mod mirrors;
mod mount;
mod pull;
mod run;
mod run_config;
mod run_hostile;
mod run_io;
mod run_rm;
mod run_userns;
mod systemd_vm;
mod unpack;
