//! Pull progress: bars per blob on a terminal, plain lines otherwise, JSON
//! events with `--json`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use cstore_store::pull::{BlobKind, Event, Observer};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn short(digest: &str) -> String {
    digest
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect()
}

enum Mode {
    Bars {
        multi: MultiProgress,
        bars: HashMap<String, ProgressBar>,
    },
    Lines {
        sizes: HashMap<String, (u64, BlobKind)>,
    },
    Json,
}

pub struct PullDisplay {
    mode: Mutex<Mode>,
}

impl PullDisplay {
    pub fn new(json: bool) -> Arc<Self> {
        let mode = if json {
            Mode::Json
        } else if std::io::stdout().is_terminal() {
            Mode::Bars {
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
                bars: HashMap::new(),
            }
        } else {
            Mode::Lines {
                sizes: HashMap::new(),
            }
        };
        Arc::new(PullDisplay {
            mode: Mutex::new(mode),
        })
    }

    pub fn finish(&self) {
        if let Mode::Bars { multi, bars } = &mut *self.mode.lock().unwrap() {
            for bar in bars.values() {
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
            let _ = multi.clear();
        }
    }
}

impl Observer for PullDisplay {
    fn event(&self, event: &Event) {
        let mut mode = self.mode.lock().unwrap();
        match &mut *mode {
            Mode::Json => {
                if !matches!(event, Event::Progress { .. }) {
                    println!("{}", serde_json::to_string(event).unwrap_or_default());
                }
            }
            Mode::Lines { sizes } => match event {
                Event::Resolved {
                    reference, digest, ..
                } => println!("{reference}: resolved to {digest}"),
                Event::Blob {
                    digest, kind, size, ..
                } => {
                    sizes.insert(digest.clone(), (*size, *kind));
                }
                Event::Cached { digest } => println!("{}: already held", short(digest)),
                Event::Waiting { digest } => {
                    println!("{}: waiting for another pull of it", short(digest))
                }
                Event::Started { digest, offset } => {
                    let (size, kind) = sizes.get(digest).copied().unwrap_or((0, BlobKind::Layer));
                    let kind = if kind == BlobKind::Config {
                        "config"
                    } else {
                        "layer"
                    };
                    if *offset > 0 {
                        println!(
                            "{}: resuming {kind} at {} of {}",
                            short(digest),
                            human_bytes(*offset),
                            human_bytes(size)
                        );
                    } else {
                        println!("{}: fetching {kind} ({})", short(digest), human_bytes(size));
                    }
                }
                Event::Retrying {
                    digest,
                    attempt,
                    error,
                } => {
                    println!(
                        "{}: interrupted ({error}); resuming, attempt {}",
                        short(digest),
                        attempt + 1
                    )
                }
                Event::Done { digest } => println!("{}: done", short(digest)),
                Event::Progress { .. } => {}
            },
            Mode::Bars { multi, bars } => match event {
                Event::Resolved {
                    reference, digest, ..
                } => {
                    let _ = multi.println(format!("{reference}: resolved to {digest}"));
                }
                Event::Blob {
                    digest, kind, size, ..
                } => {
                    let bar = multi.add(ProgressBar::new(*size));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix} {msg:8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                        )
                        .expect("template")
                        .progress_chars("=> "),
                    );
                    let kind = if *kind == BlobKind::Config {
                        "config"
                    } else {
                        "layer"
                    };
                    bar.set_prefix(format!("{} {kind:6}", short(digest)));
                    bar.set_message("queued");
                    bars.insert(digest.clone(), bar);
                }
                Event::Cached { digest } => {
                    if let Some(b) = bars.get(digest) {
                        b.set_position(b.length().unwrap_or(0));
                        b.finish_with_message("held");
                    }
                }
                Event::Waiting { digest } => {
                    if let Some(b) = bars.get(digest) {
                        b.set_message("waiting");
                    }
                }
                Event::Started { digest, offset } => {
                    if let Some(b) = bars.get(digest) {
                        b.set_position(*offset);
                        b.reset_eta();
                        b.set_message(if *offset > 0 { "resuming" } else { "fetching" });
                    }
                }
                Event::Progress { digest, bytes } => {
                    if let Some(b) = bars.get(digest) {
                        b.set_position(*bytes);
                    }
                }
                Event::Retrying { digest, .. } => {
                    if let Some(b) = bars.get(digest) {
                        b.set_message("retrying");
                    }
                }
                Event::Done { digest } => {
                    if let Some(b) = bars.get(digest) {
                        b.finish_with_message("done");
                    }
                }
            },
        }
    }
}
