//! The report as one HTML page: inline CSS and SVG, no scripts, nothing
//! fetched.

use super::plots::{self, Group, Line};
use super::{goals, provenance, workload_title, ClassReport, Report};
use crate::error::Result;

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn machine_line(r: &Report) -> String {
    format!(
        "{} · {} · {} CPUs · {:.0} GiB · kernel {}",
        r.machine.hostname,
        r.machine.cpu_model,
        r.machine.cpus,
        r.machine.memory_bytes as f64 / (1u64 << 30) as f64,
        r.machine.kernel
    )
}

/// Provenance lines for a chart over several classes.
fn foot_all(r: &Report) -> Vec<String> {
    let mut v = vec![machine_line(r)];
    for c in &r.classes {
        v.push(format!(
            "{}: {} · {}",
            c.class.title, c.class.device, c.class.filesystem
        ));
    }
    v
}

fn limit(c: &ClassReport, name: &str) -> Option<(f64, f64)> {
    c.limits
        .iter()
        .find(|l| l.name == name)
        .map(|l| (l.iops, l.mb_per_s))
}

/// Bars per class for one workload: cstore and its peer.
fn per_class(r: &Report, workload: &str, metric: &str, limit_of: LimitOf) -> Vec<Group> {
    r.classes
        .iter()
        .filter_map(|c| {
            let mut bars: Vec<(String, super::Stat)> = c
                .results
                .iter()
                .filter(|m| m.workload == workload && m.metric == metric && m.n.is_none())
                .map(|m| (m.tool.clone(), m.stat.clone()))
                .collect();
            // Ours first: the same colour in every chart.
            bars.sort_by_key(|b| b.0 != super::ours_of(workload));
            (!bars.is_empty()).then(|| Group {
                label: c.class.title.clone(),
                bars,
                line: limit_of
                    .and_then(|f| f(c))
                    .map(|v| (v, "fio's limit of the class (measured first)".to_string())),
            })
        })
        .collect()
}

/// The chart carries its own provenance (machine, kernel, device,
/// filesystem), so it says where it came from when copied out alone.
/// A class's limit to draw as a line across its bars.
type LimitOf<'a> = Option<&'a dyn Fn(&ClassReport) -> Option<f64>>;

fn figure(svg: &str) -> String {
    format!("<figure>{svg}</figure>\n")
}

pub fn html(r: &Report) -> Result<String> {
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    h.push_str("<title>cstore bench suite</title>\n<style>\n");
    h.push_str(
        "body{font-family:sans-serif;margin:2em auto;max-width:1000px;color:#222;background:#fff}\
         table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}\
         th,td{border:1px solid #ccc;padding:0.25em 0.5em;text-align:left;vertical-align:top}\
         td.n{text-align:right;font-variant-numeric:tabular-nums}\
         figure{margin:1em 0 2em}figcaption{font-size:0.85em;color:#555}\
         .meta{color:#444;font-size:0.9em}.good{color:#17701b}.bad{color:#a31515}\n",
    );
    h.push_str("</style></head><body>\n<h1>cstore bench suite</h1>\n");
    h.push_str(&format!(
        "<p class=\"meta\">{}<br>cgroup io controller: {} · {} · {}<br>image <code>{}</code> · density command <code>{}</code> · {} round(s){} · run {} · {:.0} s</p>\n",
        esc(&machine_line(r)),
        esc(&r.machine.io_cgroup),
        esc(&r.cstore_version),
        esc(&r.peers.join(" · ")),
        esc(&r.image),
        esc(&r.density_cmd.join(" ")),
        r.rounds,
        if r.quick { " (--quick)" } else { "" },
        esc(&r.run_id),
        r.seconds
    ));

    h.push_str("<h2>Goals</h2>\n<table><tr><th>goal</th><th>met</th><th>figures</th></tr>\n");
    for g in goals(r) {
        let (cls, met) = match g.met {
            Some(true) => ("good", "yes"),
            Some(false) => ("bad", "no"),
            None => ("", "not measured"),
        };
        h.push_str(&format!(
            "<tr><td>{}</td><td class=\"{cls}\">{met}</td><td>{}</td></tr>\n",
            esc(&g.goal),
            esc(&g.detail)
        ));
    }
    h.push_str("</table>\n");

    h.push_str("<h2>Storage classes</h2>\n<table><tr><th>class</th><th>device</th><th>how</th><th>filesystem</th><th>cstore's probe and policy</th><th>fio 4K randread QD32</th><th>fio 1M read</th><th>fio 1M write</th></tr>\n");
    for c in &r.classes {
        let l = |n| {
            limit(c, n).map_or("–".to_string(), |(i, m)| {
                format!("{} IOPS, {} MB/s", fmt(i), fmt(m))
            })
        };
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ({})</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>\n",
            esc(&c.class.title),
            esc(&c.class.device),
            esc(&c.class.device_detail),
            esc(&c.class.filesystem),
            esc(&c.class.probe.policy.reason),
            esc(&c.class.probe.chain.join(" → ")),
            l("4k randread qd32"),
            l("1m read qd8"),
            l("1m write qd8"),
        ));
    }
    h.push_str("</table>\n");

    h.push_str("<h2>Density</h2>\n<p>N containers started at once from one image, cold cache: the time until every one has written its first output, and until every one has exited (medians over rounds, whiskers min–max).</p>\n");
    for c in &r.classes {
        let mut lines = Vec::new();
        for (ti, tool) in ["cstore", "ctr"].into_iter().enumerate() {
            for (metric, dashed, what) in [
                ("first-output", false, "all first outputs"),
                ("all-exited", true, "all exited"),
            ] {
                let points: Vec<(f64, super::Stat)> = c
                    .results
                    .iter()
                    .filter(|m| m.workload == "density" && m.tool == tool && m.metric == metric)
                    .filter_map(|m| Some((m.n? as f64, m.stat.clone())))
                    .collect();
                if !points.is_empty() {
                    lines.push(Line {
                        label: format!(
                            "{} run: {what}",
                            if tool == "ctr" { "ctr" } else { "cstore" }
                        ),
                        color: ti,
                        dashed,
                        points,
                    });
                }
            }
        }
        if lines.is_empty() {
            continue;
        }
        let title = format!("Density — {}", c.class.title);
        let foot = vec![provenance(r, &c.class)];
        let svg = plots::density(&title, &foot, &lines, "seconds")?;
        h.push_str(&figure(&svg));
    }

    let foot = foot_all(r);
    let sections: [(&str, &str, &str, &str, bool, LimitOf); 6] = [
        ("Pull + unpack", "pull", "seconds", "seconds", false, None),
        (
            "Pull + unpack, layers on disk (+ syncfs)",
            "pull-durable",
            "seconds",
            "seconds",
            false,
            None,
        ),
        (
            "Lazy start: first output",
            "lazy-start",
            "first-output",
            "seconds",
            false,
            None,
        ),
        (
            "Lazy start: exit",
            "lazy-start",
            "exited",
            "seconds",
            false,
            None,
        ),
        (
            "4K random read",
            "io-4k-randread",
            "iops",
            "IOPS (log scale)",
            true,
            Some(&|c: &ClassReport| limit(c, "4k randread qd32").map(|l| l.0)),
        ),
        (
            "1M sequential read",
            "io-1m-read",
            "mb/s",
            "MB/s (log scale)",
            true,
            Some(&|c: &ClassReport| limit(c, "1m read qd8").map(|l| l.1)),
        ),
    ];
    for (title, workload, metric, y, log, lim) in sections {
        let groups = per_class(r, workload, metric, lim);
        if groups.is_empty() {
            continue;
        }
        h.push_str(&format!(
            "<h2>{}</h2>\n<p>{}</p>\n",
            esc(title),
            esc(workload_title(workload))
        ));
        let svg = plots::bars(&format!("{title} — per class"), &foot, &groups, y, log)?;
        h.push_str(&figure(&svg));
    }

    for c in r.classes.iter().filter(|c| !c.policies.is_empty()) {
        h.push_str(&format!(
            "<h2>Policy: HDD vs NVMe on the {}</h2>\n",
            esc(&c.class.title)
        ));
        h.push_str("<table><tr><th>CSTORE_POLICY</th><th>rings</th><th>depth</th><th>I/O size</th><th>O_DIRECT</th><th>streams at once</th><th>why</th></tr>\n");
        for p in &c.policies {
            h.push_str(&format!(
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{} KiB</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                esc(&p.name),
                p.policy.rings,
                p.policy.queue_depth,
                p.policy.io_size / 1024,
                p.policy.direct,
                p.policy.streams,
                esc(&p.policy.reason)
            ));
        }
        h.push_str("</table>\n");
        let groups: Vec<Group> = ["policy-pull", "policy-unpack"]
            .into_iter()
            .filter_map(|w| {
                let bars: Vec<(String, super::Stat)> = c
                    .results
                    .iter()
                    .filter(|m| m.workload == w)
                    .map(|m| (format!("{} policy", m.tool), m.stat.clone()))
                    .collect();
                (!bars.is_empty()).then(|| Group {
                    label: if w == "policy-pull" {
                        "pull + unpack".into()
                    } else {
                        "unpack (cold cache)".into()
                    },
                    bars,
                    line: None,
                })
            })
            .collect();
        let foot = vec![provenance(r, &c.class)];
        let svg = plots::bars(
            &format!("Policy — {}", c.class.title),
            &foot,
            &groups,
            "seconds",
            false,
        )?;
        h.push_str(&figure(&svg));
    }

    h.push_str("<h2>All figures</h2>\n<p>Medians with min–max over rounds. “Ahead” is how many times better cstore (or, for the policy rows, the rotational policy) is than its peer: &gt; 1 is ahead.</p>\n");
    for c in &r.classes {
        h.push_str(&format!(
            "<h3>{}</h3>\n<p class=\"meta\">{}</p>\n",
            esc(&c.class.title),
            esc(&provenance(r, &c.class))
        ));
        h.push_str("<table><tr><th>workload</th><th>metric</th><th>N</th><th>ours</th><th>median (min–max)</th><th>peer</th><th>median (min–max)</th><th>ahead</th></tr>\n");
        for cmp in c.comparisons() {
            let cls = if cmp.advantage >= 1.0 { "good" } else { "bad" };
            h.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{} {} ({}–{})</td><td>{}</td><td class=\"n\">{} {} ({}–{})</td><td class=\"n {cls}\">{:.2}×</td></tr>\n",
                esc(&cmp.workload),
                esc(&cmp.metric),
                cmp.n.map_or(String::new(), |n| n.to_string()),
                esc(&cmp.ours_name),
                fmt(cmp.ours.median),
                esc(&cmp.unit),
                fmt(cmp.ours.min),
                fmt(cmp.ours.max),
                esc(&cmp.peer_name),
                fmt(cmp.peer.median),
                esc(&cmp.unit),
                fmt(cmp.peer.min),
                fmt(cmp.peer.max),
                cmp.advantage
            ));
        }
        h.push_str("</table>\n");
        let redone: Vec<String> = c
            .results
            .iter()
            .filter(|m| m.redone > 0 && m.metric == "first-output")
            .map(|m| {
                format!(
                    "{} N={}: {} round(s) measured again (a container's output was lost)",
                    m.tool,
                    m.n.unwrap_or(0),
                    m.redone
                )
            })
            .collect();
        if !c.skipped.is_empty() || !redone.is_empty() {
            h.push_str("<ul>\n");
            for r in &redone {
                h.push_str(&format!("<li>{}</li>\n", esc(r)));
            }
            for s in &c.skipped {
                h.push_str(&format!(
                    "<li>not measured: {}: {}</li>\n",
                    esc(&s.workload),
                    esc(&s.why)
                ));
            }
            h.push_str("</ul>\n");
        }
    }
    h.push_str("<h2>Notes</h2>\n<ul>\n");
    for n in &r.notes {
        h.push_str(&format!("<li>{}</li>\n", esc(n)));
    }
    h.push_str("</ul>\n</body></html>\n");
    Ok(h)
}
