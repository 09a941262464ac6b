//! `cstore install`: cstore_node::install from the command line.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cstore_node::install::{self, Options};

#[derive(clap::Args)]
pub struct InstallArgs {
    /// Install into DIR as if it were / (an image being built, a test's scratch root).
    #[arg(long, default_value = "/")]
    destdir: PathBuf,
    /// Remove what a previous install made (its record says what).
    #[arg(long)]
    uninstall: bool,
    /// The socket the snapshotter serves and containerd dials.
    #[arg(long, default_value = "/run/cstore/snapshotter.sock")]
    socket: PathBuf,
    /// Have the daemon serve Prometheus metrics here (e.g. 127.0.0.1:9311).
    #[arg(long)]
    metrics_address: Option<String>,
    /// Lazy layers too: the snapshotter serves remote snapshots (`--lazy`) and
    /// the lazy layers' daemon gets its own unit, cstore-lazy.service.
    #[arg(long)]
    lazy: bool,
    #[arg(long)]
    json: bool,
}

pub fn run(store_root: &Path, a: InstallArgs) -> Result<()> {
    let report = if a.uninstall {
        install::uninstall(&a.destdir)?
    } else {
        let binary = std::env::current_exe().context("finding the running binary")?;
        install::install(&Options {
            destdir: a.destdir.clone(),
            binary,
            store_root: store_root.to_path_buf(),
            socket: a.socket,
            metrics_address: a.metrics_address,
            lazy: a.lazy,
        })?
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for p in &report.written {
        println!("wrote    {}", p.display());
    }
    for p in &report.removed {
        println!("removed  {}", p.display());
    }
    for (p, why) in &report.kept {
        println!("kept     {} ({why})", p.display());
    }
    if let Some(c) = &report.containerd_config {
        println!(
            "{}: {c}",
            a.destdir.join(install::CONTAINERD_CONFIG).display()
        );
    }
    if a.destdir == Path::new("/") {
        if a.uninstall {
            let lazy = report
                .removed
                .iter()
                .any(|p| p.ends_with(install::LAZY_UNIT));
            let units = if lazy {
                "cstore-snapshotter cstore-lazy"
            } else {
                "cstore-snapshotter"
            };
            println!("then: systemctl disable --now {units}; systemctl daemon-reload; systemctl restart containerd");
        } else if a.lazy {
            println!("then: systemctl daemon-reload; systemctl enable --now cstore-lazy cstore-snapshotter; systemctl restart containerd");
            println!(
                "for lazy pulls through the CRI, containerd's [plugins.\"io.containerd.grpc.v1.cri\".containerd] needs snapshotter = \"cstore\" and disable_snapshot_annotations = false (docs/containerd.md)"
            );
        } else {
            println!("then: systemctl daemon-reload; systemctl enable --now cstore-snapshotter; systemctl restart containerd");
        }
    }
    Ok(())
}
