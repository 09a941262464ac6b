//! The suite's results: one JSON document (these types), rendered as a
//! self-contained HTML page with SVG plots and as markdown tables.

use serde::{Deserialize, Serialize};

use crate::class::{ClassInfo, PolicyView};
use crate::sys::Machine;

mod html;
mod markdown;
mod plots;

pub use html::html;
pub use markdown::markdown;

/// Bumped when the JSON changes incompatibly.
pub const SCHEMA: u32 = 2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    /// This run's id (names its cgroups, containers, containerd namespace).
    pub run_id: String,
    pub quick: bool,
    /// Unix seconds at the start.
    pub started_unix: u64,
    pub seconds: f64,
    pub machine: Machine,
    pub cstore_version: String,
    /// containerd, runc and fio as they report themselves.
    pub peers: Vec<String>,
    pub image: String,
    /// The command each density container runs.
    pub density_cmd: Vec<String>,
    pub rounds: usize,
    pub classes: Vec<ClassReport>,
    /// What the figures do and do not show (read before quoting them).
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassReport {
    pub class: ClassInfo,
    /// fio's measurement of the class before the workloads ran.
    pub limits: Vec<Limit>,
    pub results: Vec<Measurement>,
    /// Workloads not run on this class, and why.
    pub skipped: Vec<Skipped>,
    /// The policies compared on this class (policy workloads), as cstore
    /// derives them there.
    #[serde(default)]
    pub policies: Vec<NamedPolicy>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedPolicy {
    /// The CSTORE_POLICY value.
    pub name: String,
    pub policy: PolicyView,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limit {
    /// e.g. "4k randread qd32".
    pub name: String,
    pub iops: f64,
    pub mb_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub workload: String,
    pub why: String,
}

/// One workload's figure for one tool: a statistic over rounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// pull, density, lazy-start, io-4k-randread, io-1m-read, policy-pull,
    /// policy-unpack.
    pub workload: String,
    /// cstore, ctr, fio, a policy ("rotational", "nvme"), or for lazy-start
    /// "run --lazy" and "pull + run" (both cstore).
    pub tool: String,
    /// What was measured: "seconds", "first-output", "all-exited", "exited",
    /// "iops", "mb/s".
    pub metric: String,
    /// Containers started at once (density).
    pub n: Option<u32>,
    pub unit: String,
    /// Whether less is better (times) or more (throughput).
    pub lower_is_better: bool,
    pub stat: Stat,
    /// Rounds measured again because the tool lost a container's output
    /// (exit 0, nothing on stdout: seen with ctr run).
    #[serde(default)]
    pub redone: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Stat {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let median = match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        };
        Stat {
            median,
            min: s.first().copied().unwrap_or(f64::NAN),
            max: s.last().copied().unwrap_or(f64::NAN),
            samples: samples.to_vec(),
        }
    }
}

/// The tool each workload compares cstore with.
pub fn peer_of(workload: &str) -> &'static str {
    match workload {
        "pull" | "pull-durable" | "density" => "ctr",
        "lazy-start" => crate::workload::LAZY_TOOLS[1],
        w if w.starts_with("io-") => "fio",
        w if w.starts_with("policy-") => "nvme",
        _ => "",
    }
}

/// The "ours" side of a workload's comparison.
pub fn ours_of(workload: &str) -> &'static str {
    if workload.starts_with("policy-") {
        "rotational"
    } else if workload == "lazy-start" {
        crate::workload::LAZY_TOOLS[0]
    } else {
        "cstore"
    }
}

/// cstore's median against its peer's, as "how many times better": >1
/// means cstore is ahead (faster, or more throughput).
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub workload: String,
    pub metric: String,
    pub n: Option<u32>,
    pub unit: String,
    pub ours: Stat,
    pub ours_name: String,
    pub peer: Stat,
    pub peer_name: String,
    pub advantage: f64,
}

impl ClassReport {
    pub fn find(
        &self,
        workload: &str,
        tool: &str,
        metric: &str,
        n: Option<u32>,
    ) -> Option<&Measurement> {
        self.results
            .iter()
            .find(|m| m.workload == workload && m.tool == tool && m.metric == metric && m.n == n)
    }

    /// Every workload/metric/N with both sides measured, in order.
    pub fn comparisons(&self) -> Vec<Comparison> {
        let mut out = Vec::new();
        for m in &self.results {
            if m.tool != ours_of(&m.workload) {
                continue;
            }
            let Some(p) = self.find(&m.workload, peer_of(&m.workload), &m.metric, m.n) else {
                continue;
            };
            let advantage = if m.lower_is_better {
                p.stat.median / m.stat.median
            } else {
                m.stat.median / p.stat.median
            };
            out.push(Comparison {
                workload: m.workload.clone(),
                metric: m.metric.clone(),
                n: m.n,
                unit: m.unit.clone(),
                ours: m.stat.clone(),
                ours_name: m.tool.clone(),
                peer: p.stat.clone(),
                peer_name: p.tool.clone(),
                advantage,
            });
        }
        out
    }
}

/// The goals, checked against a report.
#[derive(Clone, Debug, PartialEq)]
pub struct Goal {
    pub goal: String,
    /// None: not measured in this run.
    pub met: Option<bool>,
    pub detail: String,
}

pub fn goals(r: &Report) -> Vec<Goal> {
    let mut out = Vec::new();
    // 1. cstore ahead of its peer everywhere. Pull + unpack counts until
    // both tools' layers are on the disk ("pull-durable"): cstore's pull
    // returns with them there, ctr's before (docs/benchmarks.md says why);
    // the figure until the command returns is reported beside it.
    let (mut total, mut behind, mut returned) = (0, Vec::new(), Vec::new());
    for c in &r.classes {
        for cmp in c.comparisons().iter().filter(|c| c.workload == "pull") {
            returned.push(format!("{} {:.2}×", c.class.kind.name(), cmp.advantage));
        }
        for cmp in c.comparisons().iter().filter(|c| {
            !c.workload.starts_with("policy-") && c.workload != "lazy-start" && c.workload != "pull"
        }) {
            total += 1;
            if cmp.advantage < 1.0 {
                behind.push(format!(
                    "{} {} {}{}: {:.2}×",
                    c.class.kind.name(),
                    cmp.workload,
                    cmp.metric,
                    cmp.n.map_or(String::new(), |n| format!(" N={n}")),
                    cmp.advantage
                ));
            }
        }
    }
    out.push(Goal {
        goal: "cstore ahead of its peer on every workload and class".into(),
        met: (total > 0).then_some(behind.is_empty()),
        detail: {
            let mut d = if behind.is_empty() {
                format!("ahead in {total} of {total}")
            } else {
                format!(
                    "ahead in {} of {total}; behind: {}",
                    total - behind.len(),
                    behind.join(", ")
                )
            };
            if !returned.is_empty() {
                d.push_str(&format!(
                    " (pull + unpack counted with the layers on disk; until the command returns: {})",
                    returned.join(", ")
                ));
            }
            d
        },
    });
    // 2. NVMe-like: 64 at once within 4× the time of one.
    let nvme = r
        .classes
        .iter()
        .find(|c| c.class.kind == crate::ClassKind::Nvme);
    let ratio = |metric: &str| {
        let c = nvme?;
        let one = c.find("density", "cstore", metric, Some(1))?;
        let many = c.find("density", "cstore", metric, Some(64))?;
        Some(many.stat.median / one.stat.median)
    };
    out.push(match (ratio("all-exited"), ratio("first-output")) {
        (Some(exit), Some(first)) => Goal {
            goal: "NVMe-like class: 64 containers at once in ≤ 4× the time of one (cstore)".into(),
            met: Some(exit <= 4.0),
            detail: format!("all exited: {exit:.1}×, all first outputs: {first:.1}×"),
        },
        _ => Goal {
            goal: "NVMe-like class: 64 containers at once in ≤ 4× the time of one (cstore)".into(),
            met: None,
            detail: "not measured (needs the nvme class and density N = 1 and 64)".into(),
        },
    });
    // 3. HDD policy measurably better than the NVMe policy on the HDD class.
    let hdd = r
        .classes
        .iter()
        .find(|c| c.class.kind == crate::ClassKind::Hdd);
    let policy: Vec<String> = hdd
        .map(|c| {
            c.comparisons()
                .into_iter()
                .filter(|cmp| cmp.workload.starts_with("policy-"))
                .map(|cmp| {
                    format!(
                        "{}: {:.2}×{}",
                        cmp.workload,
                        cmp.advantage,
                        if cmp.ours.max < cmp.peer.min {
                            " (ranges apart)"
                        } else {
                            " (ranges overlap)"
                        }
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let measurably = hdd.is_some_and(|c| {
        let v: Vec<Comparison> = c
            .comparisons()
            .into_iter()
            .filter(|cmp| cmp.workload.starts_with("policy-"))
            .collect();
        !v.is_empty() && v.iter().all(|cmp| cmp.ours.max < cmp.peer.min)
    });
    out.push(Goal {
        goal: "HDD class: the HDD policy measurably better than the NVMe policy".into(),
        met: (!policy.is_empty()).then_some(measurably),
        detail: if policy.is_empty() {
            "not measured (needs the hdd class in --policy-classes)".into()
        } else {
            policy.join(", ")
        },
    });
    out
}

/// Human title of a workload.
pub fn workload_title(w: &str) -> &'static str {
    match w {
        "pull" => "pull + unpack, until the command returns (vs ctr image pull)",
        "pull-durable" => "pull + unpack, until the layers are on the disk: the command, then syncfs of its root (vs ctr image pull + syncfs)",
        "density" => "density: N containers at once, cold cache (vs ctr run)",
        "lazy-start" => "lazy start: one container from a fresh store, cold cache, its index published beforehand: cstore run --lazy vs cstore pull + cstore run",
        "io-4k-randread" => "4K random read, QD32 per ring, as many rings (fio: jobs) as cstore's policy gives the class, O_DIRECT (cstore bench io vs fio)",
        "io-1m-read" => "1M sequential read, QD8 per ring, the policy's rings, O_DIRECT (cstore bench io vs fio)",
        "policy-pull" => "pull + unpack: rotational (HDD) policy vs NVMe policy",
        "policy-unpack" => {
            "unpack of local blobs, cold cache: rotational (HDD) policy vs NVMe policy"
        }
        _ => "workload",
    }
}

/// One line naming where a figure came from.
pub fn provenance(r: &Report, c: &ClassInfo) -> String {
    format!(
        "{} · {} · {} CPUs · kernel {} · {}: {} · {}",
        r.machine.hostname,
        r.machine.cpu_model,
        r.machine.cpus,
        r.machine.kernel,
        c.title,
        c.device,
        c.filesystem
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_median_min_max() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[4.0, 1.0]).median, 2.5);
        assert!(Stat::of(&[]).median.is_nan());
    }
}
