//! containerd's `containerd.services.snapshots.v1.Snapshots` gRPC service over
//! a `Snapshotter`: the proxy-plugin protocol. A thin adapter: the semantics
//! live in `snapshots.rs`; here are the wire types, error codes, filters and
//! the remote-snapshot shortcut for layers cstore already unpacked.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use cstore_os::{ErrorKind, IoError};

use crate::error::Error;
use crate::filter::Filters;
use crate::snapshots::{Info, Kind, Snapshotter};

#[allow(clippy::all, missing_docs)]
pub mod proto {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
}

use proto::containerd::services::snapshots::v1 as api;
use proto::containerd::types::Mount as ApiMount;

/// The label containerd's unpacker (and CRI) puts on Prepare to ask a
/// remote snapshotter for a layer it may already have.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";

/// Lazy layers for containerd (docs/containerd.md, "Lazy pulls"). The
/// snapshotter knows neither registries nor FUSE: whoever serves it (the
/// CLI) provides this.
pub trait Remote: Send + Sync + 'static {
    /// containerd's Prepare asks for the layer `chain` (the target of
    /// `containerd.io/snapshot.ref`) on the backend snapshot `parent`, with
    /// the Prepare's `labels`. If the layer can be served lazily, make it
    /// cstore's own committed snapshot `chain` and return true; false (and
    /// say why in the log) lets containerd fetch and unpack it.
    fn prepare_lazy(
        &self,
        sn: &Snapshotter,
        chain: &str,
        parent: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> bool;

    /// Put each lazy layer's FUSE mount in place of its directory in
    /// `mounts` (what `cstore mount` does), starting what serves them if
    /// needed. An error if a lazy layer in `mounts` cannot be served: its
    /// directory is not complete and must never be mounted as if it were.
    fn lazy_mounts(
        &self,
        sn: &Snapshotter,
        mounts: &mut [crate::mount::Mount],
    ) -> Result<(), Error>;
}

pub struct Service {
    sn: Arc<Snapshotter>,
    remote: Option<Arc<dyn Remote>>,
}

impl Service {
    pub fn new(sn: Arc<Snapshotter>) -> Self {
        Service { sn, remote: None }
    }

    /// With lazy layers (see [`Remote`]).
    pub fn with_remote(sn: Arc<Snapshotter>, remote: Arc<dyn Remote>) -> Self {
        Service {
            sn,
            remote: Some(remote),
        }
    }

    /// Mounts as handed to containerd: lazy layers through their FUSE mounts.
    fn lazy_mounts(
        &self,
    ) -> impl Fn(&Snapshotter, Vec<crate::mount::Mount>) -> Result<Vec<crate::mount::Mount>, Error>
           + Send
           + 'static {
        let remote = self.remote.clone();
        move |sn, mut m| {
            if let Some(r) = &remote {
                r.lazy_mounts(sn, &mut m)?;
            }
            Ok(m)
        }
    }

    pub fn server(self) -> api::snapshots_server::SnapshotsServer<Service> {
        api::snapshots_server::SnapshotsServer::new(self)
    }

    /// Run blocking snapshotter work off the async runtime.
    async fn run_quiet<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshotter) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let sn = self.sn.clone();
        tokio::task::spawn_blocking(move || f(&sn))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)
    }

    /// `run_quiet` as the API call `method` on snapshot `key`: timed, logged
    /// and counted (see `metrics`).
    async fn run<T: Send + 'static>(
        &self,
        method: &'static str,
        key: &str,
        f: impl FnOnce(&Snapshotter) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let started = std::time::Instant::now();
        let r = self.run_quiet(f).await;
        crate::metrics::snapshot_call(method, key, started, r.as_ref().err());
        r
    }
}

/// An error as the gRPC status containerd's errgrpc turns back into the
/// same errdefs kind: by the error's kind, whatever crate it came from.
pub fn status(e: Error) -> Status {
    Status::new(code(e.kind()), e.to_string())
}

/// containerd's errgrpc.ToGRPC: each kind's gRPC code (a conflict and "not
/// modified" are failed preconditions there).
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::Unknown => Code::Unknown,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::FailedPrecondition | ErrorKind::Conflict | ErrorKind::NotModified => {
            Code::FailedPrecondition
        }
        ErrorKind::Aborted => Code::Aborted,
        ErrorKind::OutOfRange => Code::OutOfRange,
        ErrorKind::NotImplemented => Code::Unimplemented,
        ErrorKind::Internal => Code::Internal,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::Canceled => Code::Cancelled,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
    }
}

fn parent_of(p: String) -> Option<String> {
    (!p.is_empty()).then_some(p)
}

fn labels(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn timestamp(nanos: u64) -> prost_types::Timestamp {
    let d = Duration::from_nanos(nanos);
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn to_api_info(i: Info) -> api::Info {
    api::Info {
        name: i.name,
        parent: i.parent.unwrap_or_default(),
        kind: match i.kind {
            Kind::View => api::Kind::View,
            Kind::Active => api::Kind::Active,
            Kind::Committed => api::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

fn to_api_mounts(m: Vec<crate::mount::Mount>) -> Vec<ApiMount> {
    m.into_iter()
        .map(|m| ApiMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

/// containerd's backend names are `NAMESPACE/ID/NAME`; a layer's NAME is its
/// chain ID. Find the chain ID a snapshot.ref label asks for.
fn chain_id_of(target: &str) -> Option<&str> {
    target
        .rsplit('/')
        .next()
        .filter(|n| n.starts_with("sha256:") && n.len() == 71)
}

/// The name to give containerd its own handle on the layer `chain` that
/// cstore unpacked. A target that is already a backend name is used as is.
/// containerd 1.6 sends the bare chain ID (the name cstore's own layer
/// has), then finds the shared snapshot by walking for the label and the
/// parent; it gets `NAMESPACE/ID/CHAIN`, with the namespace and ID of the
/// Prepare key (`NAMESPACE/ID/extract-… CHAIN`): unique, and like the names
/// containerd gives the snapshots it commits itself.
fn share_name(target: &str, chain: &str, key: &str) -> String {
    if target != chain {
        return target.to_string();
    }
    let mut parts = key.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(ns), Some(id), Some(_))
            if !ns.is_empty() && !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("{ns}/{id}/{chain}")
        }
        _ => key.to_string(),
    }
}

/// Snapshots cstore made for itself (layers `cstore pull` unpacked, `cstore
/// mount`s) carry `cstore.io/` labels. They are not listed to proxy clients:
/// containerd's garbage collector removes every backend snapshot it walks
/// and does not know, which would delete cstore's own layers. containerd
/// reaches a shared layer through its alias (see `prepare`), which is listed.
fn is_cstores_own(i: &Info) -> bool {
    i.labels.keys().any(|k| k.starts_with(CSTORE_LABEL_PREFIX))
}

const CSTORE_LABEL_PREFIX: &str = "cstore.io/";

#[tonic::async_trait]
impl api::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let labels = labels(r.labels);
        // The remote-snapshot path (as stargz and nydus do it): if containerd
        // asks for a layer cstore already unpacked, commit it under the name
        // containerd wants and answer AlreadyExists, so it neither downloads
        // nor unpacks the layer.
        if let Some(target) = labels.get(LABEL_SNAPSHOT_REF).cloned() {
            if let Some(chain) = chain_id_of(&target).map(String::from) {
                let name = share_name(&target, &chain, &r.key);
                let (parent, lbls) = (parent_of(r.parent.clone()), labels.clone());
                let remote = self.remote.clone();
                let shared = self
                    .run_quiet(move |sn| {
                        let how = match sn.stat(&chain) {
                            Ok(i) if i.kind == Kind::Committed => "unpacked by cstore",
                            // A layer cstore does not have: made lazy if it can be.
                            Err(Error::NotFound(_))
                                if chain != name
                                    && remote.as_ref().is_some_and(|r| {
                                        r.prepare_lazy(sn, &chain, parent.as_deref(), &lbls)
                                    }) =>
                            {
                                "served lazily by cstore"
                            }
                            _ => return Ok(None),
                        };
                        if chain == name {
                            return Ok(None);
                        }
                        match sn.alias(&chain, &name, parent.as_deref(), lbls) {
                            Ok(()) | Err(Error::AlreadyExists(_)) => Ok(Some(how)),
                            Err(e) => {
                                tracing::warn!(name, error = %e, "could not share a layer cstore has; containerd will unpack it");
                                Ok(None)
                            }
                        }
                    })
                    .await?;
                if let Some(how) = shared {
                    tracing::info!(
                        key = r.key,
                        target = labels[LABEL_SNAPSHOT_REF],
                        "layer {how}; shared with containerd"
                    );
                    return Err(Status::already_exists(format!(
                        "target snapshot {:?}: already exists",
                        labels[LABEL_SNAPSHOT_REF]
                    )));
                }
            }
        }
        let (key, parent) = (r.key, parent_of(r.parent));
        let lazy = self.lazy_mounts();
        let mounts = self
            .run("prepare", &key.clone(), move |sn| {
                let m = sn.prepare(&key, parent.as_deref(), labels)?;
                lazy(sn, m).inspect_err(|_| {
                    // Nothing half-made: the snapshot goes with the refusal.
                    let _ = sn.remove(&key);
                })
            })
            .await?;
        Ok(Response::new(api::PrepareSnapshotResponse {
            mounts: to_api_mounts(mounts),
        }))
    }

    async fn view(
        &self,
        req: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let (key, parent, labels) = (r.key, parent_of(r.parent), labels(r.labels));
        let lazy = self.lazy_mounts();
        let mounts = self
            .run("view", &key.clone(), move |sn| {
                let m = sn.view(&key, parent.as_deref(), labels)?;
                lazy(sn, m).inspect_err(|_| {
                    let _ = sn.remove(&key);
                })
            })
            .await?;
        Ok(Response::new(api::ViewSnapshotResponse {
            mounts: to_api_mounts(mounts),
        }))
    }

    async fn mounts(
        &self,
        req: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let key = req.into_inner().key;
        let lazy = self.lazy_mounts();
        let mounts = self
            .run("mounts", &key.clone(), move |sn| lazy(sn, sn.mounts(&key)?))
            .await?;
        Ok(Response::new(api::MountsResponse {
            mounts: to_api_mounts(mounts),
        }))
    }

    async fn commit(
        &self,
        req: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let (name, key, labels) = (r.name, r.key, labels(r.labels));
        self.run("commit", &key.clone(), move |sn| {
            sn.commit(&name, &key, labels)
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = req.into_inner().key;
        self.run("remove", &key.clone(), move |sn| sn.remove(&key))
            .await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let key = req.into_inner().key;
        let info = self
            .run("stat", &key.clone(), move |sn| sn.stat(&key))
            .await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(to_api_info(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let fields = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let (name, labels) = (info.name, labels(info.labels));
        let updated = self
            .run("update", &name.clone(), move |sn| {
                sn.update(&name, labels, &fields)
            })
            .await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(to_api_info(updated)),
        }))
    }

    type ListStream =
        Pin<Box<dyn Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

    async fn list(
        &self,
        req: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters = Filters::parse(&req.into_inner().filters).map_err(status)?;
        // The listing is read whole and the database released before the
        // first message goes out, so a client may Stat inside its walk.
        let infos = self.run("list", "", |sn| sn.list()).await?;
        let matching: Vec<api::Info> = infos
            .into_iter()
            .filter(|i| !is_cstores_own(i) && filters.matches(i))
            .map(to_api_info)
            .collect();
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = matching
            .chunks(100)
            .map(|c| Ok(api::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let key = req.into_inner().key;
        let u = self
            .run("usage", &key.clone(), move |sn| sn.usage(&key))
            .await?;
        Ok(Response::new(api::UsageResponse {
            size: u.size as i64,
            inodes: u.inodes as i64,
        }))
    }

    async fn cleanup(&self, _req: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        self.run("cleanup", "", |sn| sn.cleanup().map(drop)).await?;
        Ok(Response::new(()))
    }
}

/// Serve on a unix socket until `shutdown` resolves; removes the socket after.
pub async fn serve(
    sn: Arc<Snapshotter>,
    address: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    serve_service(Service::new(sn), address, shutdown).await
}

/// [`serve`] with lazy layers.
pub async fn serve_remote(
    sn: Arc<Snapshotter>,
    remote: Arc<dyn Remote>,
    address: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    serve_service(Service::with_remote(sn, remote), address, shutdown).await
}

async fn serve_service(
    service: Service,
    address: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).map_err(|e| IoError::new("create", dir, e))?;
    }
    match std::fs::remove_file(address) {
        Ok(()) => tracing::info!(socket = %address.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(IoError::new("remove", address, e).into()),
    }
    let listener =
        tokio::net::UnixListener::bind(address).map_err(|e| IoError::new("listen", address, e))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tracing::info!(socket = %address.display(), root = %service.sn.root().display(), "serving containerd snapshots API");
    let res = tonic::transport::Server::builder()
        .add_service(service.server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(address);
    res.map_err(|e| IoError::new("serve", address, std::io::Error::other(e)).into())
}
