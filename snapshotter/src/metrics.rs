//! What the snapshotter reports: a log event per call of the snapshots API
//! (method, snapshot key, outcome, duration), and Prometheus metrics served
//! over HTTP by `cstore snapshotter serve --metrics-address ADDR`: calls by
//! method and outcome with latency histograms, layer unpack and commit
//! durations, the store's size (refreshed in the background), pulls (from
//! `cstore_store::metrics`) and the process's own (CPU, memory, fds).
//!
//! The text format and the registry are the `prometheus` crate's; the
//! default registry holds them all.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    exponential_buckets, register_histogram, register_histogram_vec, register_int_counter_vec,
    Encoder, Gauge, Histogram, HistogramVec, IntCounterVec, Opts, TextEncoder,
};
use tonic::Status;

use crate::error::Error;

static CALLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "cstore_snapshot_calls_total",
        "Calls of containerd's snapshots API, by method and outcome (ok, or the gRPC code in snake case).",
        &["method", "outcome"]
    )
    .expect("a valid metric, registered once")
});

static CALL_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "cstore_snapshot_call_duration_seconds",
        "Time to answer a call of the snapshots API, by method.",
        &["method"],
        exponential_buckets(0.0001, 2.0, 18).expect("valid buckets")
    )
    .expect("a valid metric, registered once")
});

static UNPACK_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "cstore_layer_unpack_duration_seconds",
        "Time to unpack one layer into a staging directory, by outcome (ok, error).",
        &["outcome"],
        exponential_buckets(0.01, 2.0, 16).expect("valid buckets")
    )
    .expect("a valid metric, registered once")
});

static COMMIT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "cstore_layer_commit_duration_seconds",
        "Time to commit an unpacked layer as a snapshot (sync, rename, record).",
        exponential_buckets(0.0005, 2.0, 16).expect("valid buckets")
    )
    .expect("a valid metric, registered once")
});

pub(crate) fn layer_unpacked(started: Instant, ok: bool) {
    UNPACK_SECONDS
        .with_label_values(&[if ok { "ok" } else { "error" }])
        .observe(started.elapsed().as_secs_f64());
}

pub(crate) fn layer_committed(started: Instant) {
    COMMIT_SECONDS.observe(started.elapsed().as_secs_f64());
}

/// The outcome label of a call: `ok`, or the gRPC code containerd sees
/// (`not_found`, `already_exists`, ...), snake case.
pub fn outcome(err: Option<&Status>) -> String {
    match err {
        None => "ok".into(),
        Some(s) => {
            let mut out = String::new();
            for (i, c) in format!("{:?}", s.code()).chars().enumerate() {
                if c.is_ascii_uppercase() {
                    if i > 0 {
                        out.push('_');
                    }
                    out.push(c.to_ascii_lowercase());
                } else {
                    out.push(c);
                }
            }
            out
        }
    }
}

/// Records one call of the snapshots API.
pub fn snapshot_call(method: &'static str, key: &str, started: Instant, err: Option<&Status>) {
    let secs = started.elapsed().as_secs_f64();
    let outcome = outcome(err);
    CALLS.with_label_values(&[method, &outcome]).inc();
    CALL_SECONDS.with_label_values(&[method]).observe(secs);
    let duration_ms = (secs * 1e6).round() / 1e3;
    match err {
        // NotFound and AlreadyExists are how containerd asks questions.
        Some(e) if !matches!(e.code(), tonic::Code::NotFound | tonic::Code::AlreadyExists) => {
            tracing::warn!(
                method,
                key,
                outcome,
                duration_ms,
                error = e.message(),
                "snapshot call failed"
            )
        }
        _ => tracing::debug!(method, key, outcome, duration_ms, "snapshot call"),
    }
}

/// A gauge and the figure of `cstore df` it shows.
type UsageGauge = (Gauge, fn(&cstore_store::DiskUsage) -> f64);

/// The store's size, as `cstore df` counts it, recomputed every `every` on a
/// thread of its own (walking the unpacked trees can take long on a big
/// store: a scrape only reads the last figures), and the free space of its
/// filesystem, read at each scrape.
struct StoreSize {
    root: PathBuf,
    gauges: Vec<UsageGauge>,
    fs_size: Gauge,
    fs_avail: Gauge,
    last: Arc<Mutex<Option<cstore_store::DiskUsage>>>,
}

impl StoreSize {
    fn new(root: PathBuf, every: Duration) -> StoreSize {
        let g =
            |name: &str, help: &str| Gauge::with_opts(Opts::new(name, help)).expect("valid gauge");
        let gauges: Vec<UsageGauge> = vec![
            (g("cstore_store_blobs", "Blobs in the store."), |d| {
                d.blobs as f64
            }),
            (
                g("cstore_store_blob_bytes", "Bytes of blobs in the store."),
                |d| d.blob_bytes as f64,
            ),
            (
                g(
                    "cstore_store_unpacked_bytes",
                    "Bytes of files in unpacked layers and containers' upper dirs.",
                ),
                |d| d.unpacked_bytes as f64,
            ),
            (
                g("cstore_store_ingest_bytes", "Bytes of partial downloads."),
                |d| d.ingest_bytes as f64,
            ),
            (
                g(
                    "cstore_store_reclaimable_bytes",
                    "Bytes of blobs no image refers to (what gc would free).",
                ),
                |d| d.reclaimable_bytes as f64,
            ),
            (g("cstore_store_images", "Images in the store."), |d| {
                d.images as f64
            }),
        ];
        let last = Arc::new(Mutex::new(None));
        let (r, l) = (root.clone(), last.clone());
        std::thread::Builder::new()
            .name("store-size".into())
            .spawn(move || loop {
                match cstore_store::Store::open(&r).and_then(|s| s.df()) {
                    Ok(du) => *l.lock().unwrap_or_else(|p| p.into_inner()) = Some(du),
                    Err(e) => tracing::warn!(root = %r.display(), error = %e, "measuring the store for metrics"),
                }
                std::thread::sleep(every);
            })
            .expect("spawn a thread");
        StoreSize {
            root,
            gauges,
            fs_size: g(
                "cstore_store_filesystem_size_bytes",
                "Size of the filesystem holding the store.",
            ),
            fs_avail: g(
                "cstore_store_filesystem_avail_bytes",
                "Bytes free for the store on its filesystem.",
            ),
            last,
        }
    }
}

impl Collector for StoreSize {
    fn desc(&self) -> Vec<&Desc> {
        let mut d: Vec<&Desc> = self.gauges.iter().flat_map(|(g, _)| g.desc()).collect();
        d.extend(self.fs_size.desc());
        d.extend(self.fs_avail.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        if let Some(du) = self.last.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            for (g, f) in &self.gauges {
                g.set(f(du));
                out.extend(g.collect());
            }
        }
        if let Ok(st) = nix_statvfs(&self.root) {
            self.fs_size.set(st.0 as f64);
            self.fs_avail.set(st.1 as f64);
            out.extend(self.fs_size.collect());
            out.extend(self.fs_avail.collect());
        }
        out
    }
}

/// (size, available to unprivileged users) of the filesystem at `p`, in bytes.
fn nix_statvfs(p: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: NUL-terminated path and a statvfs buffer to fill.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: filled by a successful statvfs.
    let st = unsafe { st.assume_init() };
    // The widths of these fields differ between architectures.
    #[allow(clippy::unnecessary_cast)]
    let f = st.f_frsize as u64;
    #[allow(clippy::unnecessary_cast)]
    Ok((st.f_blocks as u64 * f, st.f_bavail as u64 * f))
}

/// Registers every metric with the default registry: the ones above, the
/// store's pull metrics and the store's size for `root`. The process's own
/// (`process_*`) the default registry has already (the crate's `process`
/// feature).
pub fn register(root: PathBuf) -> Result<(), Error> {
    LazyLock::force(&CALLS);
    LazyLock::force(&CALL_SECONDS);
    LazyLock::force(&UNPACK_SECONDS);
    LazyLock::force(&COMMIT_SECONDS);
    cstore_store::metrics::init();
    let reg = prometheus::default_registry();
    let io = |e: prometheus::Error| {
        Error::Io(cstore_os::IoError::new(
            "registering the store's metrics for",
            &root,
            std::io::Error::other(e),
        ))
    };
    reg.register(Box::new(StoreSize::new(
        root.clone(),
        Duration::from_secs(60),
    )))
    .map_err(io)?;
    Ok(())
}

/// The default registry in Prometheus' text format.
pub fn render() -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&prometheus::gather(), &mut buf);
    buf
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(address = %addr, "serving metrics on /metrics");
    }
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a metrics connection");
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let resp =
                        if req.uri().path() == "/metrics" && req.method() == hyper::Method::GET {
                            let body = tokio::task::spawn_blocking(render)
                                .await
                                .unwrap_or_default();
                            hyper::Response::builder()
                                .header("content-type", TextEncoder::new().format_type())
                                .body(Full::new(Bytes::from(body)))
                        } else {
                            hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"not found: GET /metrics\n")))
                        };
                    Ok::<_, Infallible>(resp.expect("a valid response"))
                },
            );
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_snake_case_codes() {
        assert_eq!(outcome(None), "ok");
        assert_eq!(outcome(Some(&Status::not_found("x"))), "not_found");
        assert_eq!(
            outcome(Some(&Status::already_exists("x"))),
            "already_exists"
        );
        assert_eq!(
            outcome(Some(&Status::failed_precondition("x"))),
            "failed_precondition"
        );
        assert_eq!(outcome(Some(&Status::unknown("x"))), "unknown");
    }
}
