//! Prometheus metrics of pulls, in the process's default registry (what
//! `cstore snapshotter serve --metrics-address` exposes). Counted in the
//! process that pulls.

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, register_histogram_vec, register_int_counter_vec, HistogramVec,
    IntCounterVec,
};

use crate::pull::PullReport;

static PULLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "cstore_pulls_total",
        "Image pulls by registry and outcome (ok, up_to_date, error).",
        &["registry", "outcome"]
    )
    .expect("a valid metric, registered once")
});

static FETCHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "cstore_pull_fetched_bytes_total",
        "Blob bytes fetched from each registry by successful pulls.",
        &["registry"]
    )
    .expect("a valid metric, registered once")
});

static SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "cstore_pull_duration_seconds",
        "Time of successful pulls (resolve, fetch, record), by registry.",
        &["registry"],
        exponential_buckets(0.05, 2.0, 14).expect("valid buckets")
    )
    .expect("a valid metric, registered once")
});

/// Registers the metrics, so a scrape lists them before the first pull.
pub fn init() {
    LazyLock::force(&PULLS);
    LazyLock::force(&FETCHED);
    LazyLock::force(&SECONDS);
}

pub(crate) fn pulled(registry: &str, r: &crate::Result<PullReport>) {
    match r {
        Ok(rep) => {
            let outcome = if rep.up_to_date { "up_to_date" } else { "ok" };
            PULLS.with_label_values(&[registry, outcome]).inc();
            FETCHED
                .with_label_values(&[registry])
                .inc_by(rep.fetched_bytes);
            SECONDS.with_label_values(&[registry]).observe(rep.seconds);
        }
        Err(_) => PULLS.with_label_values(&[registry, "error"]).inc(),
    }
}
