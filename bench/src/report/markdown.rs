//! The figures as markdown tables, for pasting.

use super::html::fmt;
use super::{goals, provenance, Report};

pub fn markdown(r: &Report) -> String {
    let mut m = String::new();
    m.push_str(&format!(
        "## cstore bench suite{}\n\n{} · {} · {} CPUs · kernel {} · cgroup io: {} · image `{}` · {} round(s)\n\n",
        if r.quick { " (--quick)" } else { "" },
        r.machine.hostname,
        r.machine.cpu_model,
        r.machine.cpus,
        r.machine.kernel,
        r.machine.io_cgroup,
        r.image,
        r.rounds
    ));
    m.push_str("| goal | met | figures |\n|---|---|---|\n");
    for g in goals(r) {
        let met = match g.met {
            Some(true) => "yes",
            Some(false) => "no",
            None => "not measured",
        };
        m.push_str(&format!("| {} | {met} | {} |\n", g.goal, g.detail));
    }
    m.push('\n');
    m.push_str("| class | device | filesystem | probe | fio 4K randread QD32 | fio 1M read | fio 1M write |\n|---|---|---|---|---|---|---|\n");
    for c in &r.classes {
        let l = |n: &str| {
            c.limits
                .iter()
                .find(|l| l.name == n)
                .map_or("–".to_string(), |l| {
                    format!("{} IOPS, {} MB/s", fmt(l.iops), fmt(l.mb_per_s))
                })
        };
        m.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            c.class.title,
            c.class.device,
            c.class.filesystem,
            c.class.probe.kind,
            l("4k randread qd32"),
            l("1m read qd8"),
            l("1m write qd8")
        ));
    }
    for c in &r.classes {
        m.push_str(&format!(
            "\n### {}\n\n{}\n\n",
            c.class.title,
            provenance(r, &c.class)
        ));
        m.push_str("| workload | metric | N | ours: median (min–max) | peer: median (min–max) | ahead |\n|---|---|---|---|---|---|\n");
        for cmp in c.comparisons() {
            m.push_str(&format!(
                "| {} | {} | {} | {} {} {} ({}–{}) | {} {} {} ({}–{}) | **{:.2}×** |\n",
                cmp.workload,
                cmp.metric,
                cmp.n.map_or(String::new(), |n| n.to_string()),
                cmp.ours_name,
                fmt(cmp.ours.median),
                cmp.unit,
                fmt(cmp.ours.min),
                fmt(cmp.ours.max),
                cmp.peer_name,
                fmt(cmp.peer.median),
                cmp.unit,
                fmt(cmp.peer.min),
                fmt(cmp.peer.max),
                cmp.advantage
            ));
        }
        for x in c
            .results
            .iter()
            .filter(|x| x.redone > 0 && x.metric == "first-output")
        {
            m.push_str(&format!(
                "\n{} N={}: {} round(s) measured again (a container's output was lost)\n",
                x.tool,
                x.n.unwrap_or(0),
                x.redone
            ));
        }
        for s in &c.skipped {
            m.push_str(&format!("\nNot measured: {}: {}\n", s.workload, s.why));
        }
    }
    m.push('\n');
    for n in &r.notes {
        m.push_str(&format!("- {n}\n"));
    }
    m
}
