//! The `cstore` command: a thin layer over the library crates.

mod bench;
mod check;
mod containers;
mod device;
mod exit;
mod install;
mod lazy;
mod logging;
mod progress;
mod run;
mod snap;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cstore_registry::auth::Credentials;
use cstore_registry::{ClientOptions, Reference, RegistryClient};
use cstore_store::{Platform, PullOptions, Store};

#[derive(Parser)]
#[command(
    name = "cstore",
    version,
    about = "An NVMe-aware container image store and snapshotter"
)]
struct Cli {
    /// Root directory of the store.
    #[arg(
        long,
        global = true,
        env = "CSTORE_ROOT",
        default_value = "/var/lib/cstore"
    )]
    root: PathBuf,
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, global = true, env = "CSTORE_LOG", default_value = "warn")]
    log_level: String,
    /// Log lines as text (no colours or timestamps under systemd) or JSON
    /// objects, one per line.
    #[arg(
        long,
        global = true,
        env = "CSTORE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Pull an image from a registry into the store.
    Pull {
        /// Image reference: NAME[:TAG][@DIGEST]; docker.io short names expand.
        reference: String,
        /// Platform to pull from a multi-platform image (default: this host's).
        #[arg(long)]
        platform: Option<String>,
        /// Talk plain HTTP to the registry.
        #[arg(long)]
        plain_http: bool,
        /// Registry credentials USER:PASS (else ~/.docker/config.json).
        #[arg(long, env = "CSTORE_CREDS", hide_env_values = true)]
        creds: Option<String>,
        /// Blobs fetched in parallel.
        #[arg(long, default_value_t = 6)]
        jobs: usize,
        /// Mirrors and TLS per registry, in containerd's format
        /// (DIR/<registry>/hosts.toml). Default: /etc/cstore/certs.d, else
        /// /etc/containerd/certs.d, whichever exists.
        #[arg(long, env = "CSTORE_HOSTS_DIR")]
        hosts_dir: Option<PathBuf>,
        /// Machine-readable output: one JSON event per line, then the result.
        #[arg(long)]
        json: bool,
        /// Only fetch; do not unpack the layers into snapshots.
        #[arg(long)]
        no_unpack: bool,
        /// Fetch the manifest, config and each layer's index only: layers are
        /// served on demand (`mount --lazy`); a layer without an index is
        /// pulled whole, and said so.
        #[arg(long, conflicts_with = "no_unpack")]
        lazy: bool,
    },
    /// Unpack a pulled image's layers into snapshots (each layer once).
    Unpack {
        reference: String,
        #[arg(long)]
        json: bool,
    },
    /// Mount an image's root filesystem at DIR (read-only unless --rw).
    Mount {
        /// An active snapshot with its own upper and work dirs: writes land there.
        #[arg(long, conflicts_with = "lazy")]
        rw: bool,
        /// Serve lazy layers from the registry (pulling with --lazy first if
        /// needed), through a daemon that stays until DIR is unmounted.
        #[arg(long)]
        lazy: bool,
        #[command(flatten)]
        registry: RegistryArgs,
        reference: String,
        dir: PathBuf,
    },
    /// The lazy layers' daemon behind `mount --lazy` (not for direct use).
    #[command(hide = true)]
    LazyServe {
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Holds the lazy FUSE connections and restarts `lazy-serve` (not for
    /// direct use).
    #[command(hide = true)]
    LazyKeeper {
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Unmount DIR and remove its snapshot (unless --keep).
    Umount {
        #[arg(long)]
        keep: bool,
        dir: PathBuf,
    },
    /// List snapshots: kind, parent, size, labels, mount state.
    Snapshots {
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a new container from an image's snapshots.
    Run(run::RunArgs),
    /// List running containers (with --all, also exited ones).
    Ps {
        #[arg(short, long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove containers: their snapshot, directory and runtime leftovers.
    Rm {
        /// Kill a running container first.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// The block device under a path, and how cstore drives it.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// The containerd proxy snapshotter plugin.
    Snapshotter {
        #[command(subcommand)]
        command: SnapshotterCommand,
    },
    /// List images in the store.
    Images {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image ref, and the blobs only it held.
    Rmi { reference: String },
    /// Remove blobs no image refers to, and abandoned downloads.
    Gc {
        #[arg(long)]
        json: bool,
    },
    /// Show disk usage of the store.
    Df {
        #[arg(long)]
        json: bool,
    },
    /// What this kernel and host give cstore (overlayfs, FUSE, io_uring,
    /// openat2, cgroups, the store's device), each with why it matters.
    /// Exits 1 if something cstore needs is missing.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Put cstore on this node in one step: the binary, the snapshotter's
    /// systemd unit and containerd's proxy-plugin config (a drop-in the
    /// user's config.toml imports); --uninstall takes them off again.
    Install(install::InstallArgs),
    /// The seekable layer indexes behind lazy pull.
    Index {
        #[command(subcommand)]
        command: IndexCommand,
    },
}

/// How to reach a registry (for `index build|push` and lazy pulls).
#[derive(clap::Args, Clone)]
pub(crate) struct RegistryArgs {
    /// Platform to use from a multi-platform image (default: this host's).
    #[arg(long)]
    platform: Option<String>,
    /// Talk plain HTTP to the registry.
    #[arg(long)]
    plain_http: bool,
    /// Registry credentials USER:PASS (else ~/.docker/config.json).
    #[arg(long, env = "CSTORE_CREDS", hide_env_values = true)]
    creds: Option<String>,
    /// Mirrors and TLS per registry (containerd's hosts.toml layout).
    #[arg(long, env = "CSTORE_HOSTS_DIR")]
    hosts_dir: Option<PathBuf>,
}

impl RegistryArgs {
    pub(crate) fn client(&self) -> Result<RegistryClient> {
        let creds = match &self.creds {
            Some(c) => Some(Credentials::parse(c).context("--creds takes USER:PASS")?),
            None => None,
        };
        let mut opts = ClientOptions {
            plain_http: self.plain_http,
            creds,
            hosts_dir: self
                .hosts_dir
                .clone()
                .or_else(cstore_registry::hosts::default_dir),
            ..Default::default()
        };
        if let Some(ms) = retry_backoff_ms()? {
            opts.backoff = std::time::Duration::from_millis(ms);
        }
        Ok(RegistryClient::new(opts)?)
    }

    pub(crate) fn platform(&self) -> Result<Platform> {
        Ok(match &self.platform {
            Some(p) => p.parse::<Platform>()?,
            None => Platform::host(),
        })
    }
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Build the index of each layer of REF from the registry: each blob is
    /// streamed through the indexer, never stored; the indexes are.
    Build {
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Compressed KiB per span (default 128): smaller spans fetch less
        /// per read miss, at one more window and span record each.
        #[arg(long, value_name = "KIB")]
        span_kib: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Publish the stored indexes of REF's layers as an OCI artifact whose
    /// subject is the image manifest (referrers API, or the referrers tag
    /// schema where the registry has none).
    Push {
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
        #[arg(long)]
        json: bool,
    },
    /// The stored index of each layer of REF (made when its layers were
    /// unpacked, built, or found in the registry).
    Ls {
        reference: String,
        /// The indexes published in the registry for REF (referrers API or
        /// tag schema), each checked, instead of the stored ones.
        #[arg(long)]
        remote: bool,
        #[command(flatten)]
        registry: RegistryArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// fio-style I/O on cstore's io_uring rings: IOPS, MB/s, latency percentiles.
    Io(bench::IoArgs),
    /// Container workloads on each storage class (the device under a path,
    /// and emulated HDD, SATA SSD and NVMe-like classes), cstore beside
    /// containerd and fio, written up as HTML with plots, JSON and markdown.
    Suite(bench::SuiteArgs),
    /// Serve a modelled 7200 rpm disk (seek, rotation, transfer per request)
    /// as MOUNTPOINT/disk until SIGINT/SIGTERM, for a loop device with
    /// --direct-io=on (the suite's HDD class; benches/hddpolicy.sh).
    #[command(hide = true)]
    HddModel(bench::HddModelArgs),
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Probe PATH's device (sysfs; NVMe identify by ioctl) and show the I/O policy.
    Info {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write a verifiable pattern through the io_uring engine (the policy's
    /// rings, depth, I/O size, O_DIRECT), fsync, read it back and verify.
    /// Overwrites the region: a block device or existing file needs
    /// --destroy-data; a new file is created and removed.
    Selfcheck(device::SelfcheckArgs),
}

#[derive(Subcommand)]
enum SnapshotterCommand {
    /// Serve containerd's snapshots gRPC API on a unix socket (a proxy plugin).
    Serve {
        /// Unix socket to listen on.
        #[arg(long, default_value = "/run/cstore/snapshotter.sock")]
        address: PathBuf,
        /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9311).
        #[arg(long)]
        metrics_address: Option<std::net::SocketAddr>,
        /// Serve layers lazily when containerd's Prepare names their image
        /// (CRI's snapshot labels) and an index is found: the store's, the
        /// registry's index artifact, an eStargz TOC (docs/containerd.md).
        #[arg(long)]
        lazy: bool,
        /// How the lazy layers' registries are reached (hosts.toml, as for
        /// `pull`).
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

fn main() {
    let cli = Cli::parse();
    logging::init(&cli.log_level, cli.log_format);
    if let Err(e) = run(cli) {
        eprintln!("cstore: {e:#}");
        std::process::exit(exit::code(exit::kind_of(&e)));
    }
}

/// A listing piped into `head` or `grep -q` ends quietly when the reader goes,
/// as ls does, instead of panicking in `println!` on EPIPE. Only for commands
/// that read the store and print: daemons and pulls keep SIGPIPE ignored.
fn listing_output() {
    // SAFETY: restoring the default disposition of one signal, before any
    // thread is started by this process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn open_store(root: &std::path::Path) -> Result<Store> {
    Store::open(root).with_context(|| format!("opening the store at {}", root.display()))
}

fn run(cli: Cli) -> Result<()> {
    // Refused up front: the store would only log it and ignore it.
    cstore_blockio::policy::forced_kind().map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Pull {
            reference,
            platform,
            plain_http,
            creds,
            jobs,
            hosts_dir,
            json,
            no_unpack,
            lazy,
        } => {
            if lazy {
                let store = open_store(&cli.root)?;
                let args = RegistryArgs {
                    platform,
                    plain_http,
                    creds,
                    hosts_dir,
                };
                lazy::pull(&store, &reference.parse()?, &args, json)?;
                return Ok(());
            }
            let reference: Reference = reference.parse()?;
            let platform = match platform {
                Some(p) => p.parse::<Platform>()?,
                None => Platform::host(),
            };
            let creds = match creds {
                Some(c) => Some(Credentials::parse(&c).context("--creds takes USER:PASS")?),
                None => None,
            };
            let store = open_store(&cli.root)?;
            let mut client_opts = ClientOptions {
                plain_http,
                creds,
                hosts_dir: hosts_dir.or_else(cstore_registry::hosts::default_dir),
                ..Default::default()
            };
            if let Some(ms) = retry_backoff_ms()? {
                client_opts.backoff = std::time::Duration::from_millis(ms);
            }
            let client = RegistryClient::new(client_opts)?;
            let opts = PullOptions {
                platform,
                max_concurrent: jobs,
            };
            let display = progress::PullDisplay::new(json);
            let observer = logging::PullLog::new(reference.to_string(), display.clone());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(cstore_store::pull(
                &store, &client, &reference, &opts, observer,
            ));
            display.finish();
            let report = report.inspect_err(|e| {
                tracing::error!(image = %reference, error = %e, "pull failed");
            })?;
            tracing::info!(
                image = report.reference,
                digest = report.digest,
                bytes = report.fetched_bytes,
                duration_ms = (report.seconds * 1e6).round() / 1e3,
                up_to_date = report.up_to_date,
                "pulled"
            );
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "pulled", "result": report})
                );
            } else if report.up_to_date {
                println!(
                    "{} is up to date ({}), nothing fetched",
                    report.reference, report.digest
                );
            } else {
                println!(
                    "pulled {} ({}): {} layers, {} fetched, {} blobs already held, in {:.2}s",
                    report.reference,
                    report.digest,
                    report.layers,
                    progress::human_bytes(report.fetched_bytes),
                    report.cached_blobs,
                    report.seconds
                );
            }
            if !no_unpack {
                snap::unpack(&store, &report.reference, json)?;
            }
        }
        Command::Unpack { reference, json } => {
            let store = open_store(&cli.root)?;
            snap::unpack(&store, &reference, json)?;
        }
        Command::Mount {
            rw,
            lazy,
            registry,
            reference,
            dir,
        } => {
            let store = open_store(&cli.root)?;
            if lazy {
                lazy::ensure_served(&store, &cli.root, &reference, &registry)?;
                snap::mount_image(&store, &reference, &dir, false)?;
            } else {
                snap::mount_image(&store, &reference, &dir, rw)?;
            }
        }
        Command::LazyServe { registry } => {
            let store = open_store(&cli.root)?;
            lazy::serve(&store, &registry)?;
        }
        Command::LazyKeeper { registry } => {
            let store = open_store(&cli.root)?;
            lazy::keeper(&store, &cli.root, &registry)?;
        }
        Command::Umount { keep, dir } => {
            let store = open_store(&cli.root)?;
            snap::umount(&store, &dir, keep)?;
        }
        Command::Snapshotter {
            command:
                SnapshotterCommand::Serve {
                    address,
                    metrics_address,
                    lazy,
                    registry,
                },
        } => {
            let store = open_store(&cli.root)?;
            let sn = std::sync::Arc::new(snap::open(&store)?);
            // Lazy layers' mounts always go through their FUSE mounts (a
            // layer `pull --lazy` made may be handed to containerd); --lazy
            // also makes layers lazy from containerd's Prepare.
            let remote = std::sync::Arc::new(lazy::SnapshotterLazy::new(
                &store, &cli.root, registry, lazy,
            )?);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let (stop_metrics, metrics) = match metrics_address {
                Some(addr) => {
                    cstore_snapshotter::metrics::register(cli.root.clone())?;
                    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                    let server = rt.block_on(async {
                        // Bound before serving snapshots: a busy port is an error at start.
                        let listener = tokio::net::TcpListener::bind(addr)
                            .await
                            .with_context(|| format!("--metrics-address {addr}"))?;
                        anyhow::Ok(tokio::spawn(cstore_snapshotter::metrics::serve_metrics(
                            listener,
                            async {
                                let _ = rx.await;
                            },
                        )))
                    })?;
                    (Some(tx), Some(server))
                }
                None => (None, None),
            };
            let served = rt.block_on(async move {
                let shutdown = async {
                    use tokio::signal::unix::{signal, SignalKind};
                    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
                    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                    }
                };
                cstore_snapshotter::service::serve_remote(sn, remote, &address, shutdown).await
            });
            if let (Some(tx), Some(server)) = (stop_metrics, metrics) {
                let _ = tx.send(());
                rt.block_on(server)??;
            }
            served?;
        }
        Command::Device {
            command: DeviceCommand::Info { path, json },
        } => device::info(&path, json)?,
        Command::Device {
            command: DeviceCommand::Selfcheck(args),
        } => device::selfcheck(&args)?,
        Command::Bench {
            command: BenchCommand::Io(args),
        } => bench::io(args)?,
        Command::Bench {
            command: BenchCommand::Suite(args),
        } => bench::suite(args)?,
        Command::Bench {
            command: BenchCommand::HddModel(args),
        } => bench::hdd_model(args)?,
        Command::Run(args) => {
            let code = run::open_and_run(&cli.root, args)?;
            std::process::exit(code);
        }
        Command::Ps { all, json } => {
            listing_output();
            let store = open_store(&cli.root)?;
            containers::ps(&store, all, json)?;
        }
        Command::Rm { force, names } => {
            let store = open_store(&cli.root)?;
            containers::rm(&store, &names, force)?;
        }
        Command::Snapshots { json } => {
            listing_output();
            let store = open_store(&cli.root)?;
            snap::list(&store, json)?;
        }
        Command::Images { json } => {
            listing_output();
            let store = open_store(&cli.root)?;
            let images = store.images()?;
            let sn = snap::open(&store)?;
            // How much of each is local (lazy layers fill in as they are read).
            // One image that cannot tell does not hide the others.
            let locals: Vec<Option<lazy::ImageLocal>> = images
                .iter()
                .map(|i| {
                    lazy::image_local(&store, &sn, i)
                        .map_err(|e| eprintln!("{}: cannot tell how much is local: {e:#}", i.name))
                        .ok()
                })
                .collect();
            if json {
                let rows: Vec<_> = images
                    .iter()
                    .zip(&locals)
                    .map(|(i, l)| {
                        serde_json::json!({
                            "name": i.name, "digest": i.target.digest, "manifest": i.manifest.digest,
                            "config": i.config.digest, "platform": i.platform.to_string(),
                            "layers": i.layers.len(), "size": i.size(), "updated": i.updated,
                            "lazy_layers": l.as_ref().map(|l| l.lazy_layers),
                            "local_bytes": l.as_ref().map(|l| l.bytes),
                            "layer_bytes": l.as_ref().map(|l| l.total_bytes),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<50} {:<19} {:<14} {:>10}  LOCAL",
                    "REFERENCE", "DIGEST", "PLATFORM", "SIZE"
                );
                for (i, l) in images.iter().zip(&locals) {
                    let local = match l {
                        None => "?".to_string(),
                        Some(l) if l.lazy_layers == 0 => lazy::percent(l.bytes, l.total_bytes),
                        Some(l) => format!(
                            "{} ({} lazy layer{})",
                            lazy::percent(l.bytes, l.total_bytes),
                            l.lazy_layers,
                            if l.lazy_layers == 1 { "" } else { "s" }
                        ),
                    };
                    println!(
                        "{:<50} {:<19} {:<14} {:>10}  {local}",
                        i.name,
                        short(&i.target.digest),
                        i.platform.to_string(),
                        progress::human_bytes(i.size())
                    );
                }
            }
        }
        Command::Rmi { reference } => {
            let store = open_store(&cli.root)?;
            let name = reference.parse::<Reference>()?.to_string();
            let gc = store.remove_image(&reference)?;
            println!(
                "removed {name}; freed {} blobs ({})",
                gc.removed_blobs,
                progress::human_bytes(gc.removed_bytes)
            );
        }
        Command::Gc { json } => {
            let store = open_store(&cli.root)?;
            let r = store.gc()?;
            let (layers, dirs) = snap::gc(&store)?;
            let lazy_dirs = cstore_lazy::serve::gc(&store, &snap::open(&store)?)?;
            if json {
                let mut v = serde_json::to_value(&r)?;
                v["removed_layer_snapshots"] = layers.into();
                v["removed_orphan_dirs"] = dirs.into();
                v["removed_lazy_caches"] = lazy_dirs.into();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "removed {} blobs ({}), {} abandoned downloads, {} expired leases, {layers} unused layer snapshots, {dirs} orphaned directories, {lazy_dirs} lazy caches",
                    r.removed_blobs,
                    progress::human_bytes(r.removed_bytes),
                    r.removed_partials,
                    r.expired_leases
                );
            }
        }
        Command::Install(args) => install::run(&cli.root, args)?,
        Command::Check { json } => {
            if !check::check(&cli.root, json)? {
                std::process::exit(1);
            }
        }
        Command::Index {
            command:
                IndexCommand::Ls {
                    reference,
                    remote,
                    registry,
                    json,
                },
        } => {
            if remote {
                lazy::ls_remote(
                    &reference.parse()?,
                    registry.client()?,
                    &registry.platform()?,
                    json,
                )?;
            } else {
                let store = open_store(&cli.root)?;
                lazy::ls(&store, &reference, json)?;
            }
        }
        Command::Index {
            command:
                IndexCommand::Build {
                    reference,
                    registry,
                    span_kib,
                    json,
                },
        } => {
            let store = open_store(&cli.root)?;
            lazy::build(
                &store,
                &reference.parse()?,
                registry.client()?,
                &registry.platform()?,
                span_kib,
                json,
            )?;
        }
        Command::Index {
            command:
                IndexCommand::Push {
                    reference,
                    registry,
                    json,
                },
        } => {
            let store = open_store(&cli.root)?;
            lazy::push(
                &store,
                &reference.parse()?,
                registry.client()?,
                &registry.platform()?,
                json,
            )?;
        }
        Command::Df { json } => {
            listing_output();
            let store = open_store(&cli.root)?;
            let du = store.df()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&du)?);
            } else {
                println!("{:<22} {:>12}", "TYPE", "SIZE");
                println!(
                    "{:<22} {:>12}",
                    format!("blobs ({})", du.blobs),
                    progress::human_bytes(du.blob_bytes)
                );
                println!(
                    "{:<22} {:>12}",
                    "unpacked layers",
                    progress::human_bytes(du.unpacked_bytes)
                );
                println!(
                    "{:<22} {:>12}",
                    "partial downloads",
                    progress::human_bytes(du.ingest_bytes)
                );
                println!(
                    "{:<22} {:>12}",
                    "reclaimable",
                    progress::human_bytes(du.reclaimable_bytes + du.ingest_bytes)
                );
                println!("{} images", du.images);
            }
        }
    }
    Ok(())
}

/// `CSTORE_RETRY_BACKOFF_MS`: hidden knob (not in --help) for the first
/// pause before retrying a failed registry request (default 200 ms, doubling
/// each attempt). Tests set it low so retry paths run fast.
fn retry_backoff_ms() -> Result<Option<u64>> {
    match std::env::var("CSTORE_RETRY_BACKOFF_MS") {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("CSTORE_RETRY_BACKOFF_MS={v:?}: expected milliseconds")),
        Err(_) => Ok(None),
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.trim_start_matches("sha256:");
    &hex[..hex.len().min(12)]
}
