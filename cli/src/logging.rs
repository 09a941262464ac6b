//! Logs on stderr: `--log-format text` (default) or `json` (one object per
//! line, the event's fields at the top level: what a log shipper indexes).
//! Under systemd (stderr is the stream JOURNAL_STREAM names) text lines carry
//! no colours and no timestamps (journald stamps every line) and start with
//! the syslog priority `<N>`, which journald turns into the entry's priority
//! (`journalctl -p warning` works).
//!
//! Fields, where the code logs them: `image`, `layer` (a layer's digest),
//! `blob`, `key` (a snapshot key), `method`, `duration_ms`, `bytes`, `error`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cstore_store::pull::{BlobKind, Event, Observer};
use tracing::{Event as TracingEvent, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(level: &str, format: LogFormat) {
    // libcontainer warns about every cgroup controller a host lacks; only its
    // errors are ours to show unless asked for.
    let level = if level.contains("libcontainer") {
        level.to_string()
    } else {
        format!("{level},libcontainer=error,libcgroups=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let journal = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
        LogFormat::Text if journal => builder
            .with_ansi(false)
            .without_time()
            .event_format(Priority(format::Format::default().without_time()))
            .init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Whether stderr is the journal: JOURNAL_STREAM (`DEV:INODE`, set by
/// systemd for a service's stdout/stderr) names stderr's own device and
/// inode. A process that inherited the variable but writes elsewhere (a
/// service's script redirecting to a file) gets the ordinary format, as
/// systemd asks programs to check.
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    cstore_os::sys::fstat(std::io::stderr().as_fd())
        .is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// Prefixes a text line with its syslog priority for journald.
struct Priority<F>(F);

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &TracingEvent<'_>,
    ) -> std::fmt::Result {
        let p = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{p}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Logs a pull's blobs (fetched, with bytes and duration; already held) and
/// passes every event on to the display.
pub struct PullLog {
    image: String,
    inner: Arc<dyn Observer>,
    blobs: Mutex<HashMap<String, Blob>>,
}

struct Blob {
    kind: BlobKind,
    size: u64,
    started: Option<(Instant, u64)>,
}

impl PullLog {
    pub fn new(image: String, inner: Arc<dyn Observer>) -> Arc<PullLog> {
        Arc::new(PullLog {
            image,
            inner,
            blobs: Mutex::new(HashMap::new()),
        })
    }
}

impl Observer for PullLog {
    fn event(&self, event: &Event) {
        let image = self.image.as_str();
        let mut blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            Event::Resolved { digest, .. } => tracing::info!(image, digest, "resolved"),
            Event::Blob {
                digest, kind, size, ..
            } => {
                blobs.insert(
                    digest.clone(),
                    Blob {
                        kind: *kind,
                        size: *size,
                        started: None,
                    },
                );
            }
            Event::Cached { digest } => tracing::debug!(image, blob = digest, "already held"),
            Event::Started { digest, offset } => {
                if let Some(b) = blobs.get_mut(digest) {
                    b.started = Some((Instant::now(), *offset));
                }
            }
            Event::Retrying {
                digest,
                attempt,
                error,
            } => tracing::info!(image, blob = digest, attempt, error, "retrying"),
            Event::Done { digest } => {
                if let Some(b) = blobs.get(digest) {
                    let (duration_ms, bytes) = b.started.map_or((0.0, 0), |(t, off)| {
                        (ms_since(t), b.size.saturating_sub(off))
                    });
                    match b.kind {
                        BlobKind::Layer => {
                            tracing::info!(image, layer = digest, bytes, duration_ms, "fetched")
                        }
                        BlobKind::Config => {
                            tracing::info!(image, blob = digest, bytes, duration_ms, "fetched")
                        }
                    }
                }
            }
            Event::Waiting { .. } | Event::Progress { .. } => {}
        }
        drop(blobs);
        self.inner.event(event);
    }
}

/// Milliseconds since `t`, to the microsecond.
pub fn ms_since(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// Logs an unpack's layers: already present, or unpacked with entries,
/// bytes and duration (`started` keeps when each layer began).
pub fn unpack_event(
    image: &str,
    e: &cstore_snapshotter::image::Event,
    started: &Mutex<HashMap<String, Instant>>,
) {
    use cstore_snapshotter::image::Event as U;
    let mut started = started.lock().unwrap_or_else(|p| p.into_inner());
    match e {
        U::Present { layer, chain_id } => {
            tracing::debug!(image, layer, chain_id, "already unpacked")
        }
        U::Unpacking { layer } => {
            started.insert(layer.clone(), Instant::now());
        }
        U::Unpacked { layer, stats } => {
            let duration_ms = started.remove(layer).map(ms_since);
            tracing::info!(
                image,
                layer,
                entries = stats.extract.entries,
                bytes = stats.tar_bytes,
                duration_ms,
                "unpacked"
            )
        }
        U::Indexed {
            layer,
            spans,
            index_bytes,
            windows_bytes,
        } => tracing::debug!(image, layer, spans, index_bytes, windows_bytes, "indexed"),
        // Said per layer: such a layer can only ever be pulled whole.
        U::NotIndexed { layer, reason } => {
            tracing::info!(image, layer, reason = %reason, "not indexed")
        }
    }
}
