//! SVG charts (plotters' SVG backend: text stays text, no fonts or scripts
//! needed to view them). Every chart carries its provenance line.

use plotters::prelude::*;

use super::Stat;
use crate::error::{Error, Result};

const W: u32 = 860;
const H: u32 = 470;
/// Height of a provenance line under each chart.
const FOOT: u32 = 18;

pub const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x6f, 0xb4), // cstore / ours
    RGBColor(0xe0, 0x6c, 0x1a), // peer
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x9b, 0x3c, 0xb8),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0x55, 0x55, 0x55),
];

fn err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Output {
        what: "drawing a chart".into(),
        detail: format!("{e:?}"),
    }
}

/// One line of a line chart: points (x, stat).
pub struct Line {
    pub label: String,
    pub color: usize,
    pub dashed: bool,
    pub points: Vec<(f64, Stat)>,
}

/// A line chart over containers started at once, x on a log2 scale.
pub fn density(title: &str, foot: &[String], lines: &[Line], y_desc: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H + 10 + FOOT * foot.len() as u32))
            .into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (top, bottom) = root.split_vertically(H);
        let xs: Vec<f64> = lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.0))
            .collect();
        let xmax = xs.iter().cloned().fold(1.0, f64::max);
        let ymax = lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1.max))
            .fold(0.0, f64::max)
            * 1.15;
        let ymax = if ymax > 0.0 { ymax } else { 1.0 };
        let lx = |x: f64| x.max(1.0).log2();
        let mut chart = ChartBuilder::on(&top)
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.3f64..lx(xmax) + 0.3, 0f64..ymax)
            .map_err(err)?;
        let ticks: Vec<f64> = {
            let mut t: Vec<f64> = xs.clone();
            t.sort_by(f64::total_cmp);
            t.dedup();
            t
        };
        chart
            .configure_mesh()
            .x_desc("containers started at once (N)")
            .y_desc(y_desc)
            .x_labels(40)
            .x_label_formatter(&|v| {
                // Label only the N that were run.
                ticks
                    .iter()
                    .find(|t| (lx(**t) - *v).abs() < 0.05)
                    .map_or(String::new(), |t| format!("{t}"))
            })
            .y_label_formatter(&|v| super::html::fmt(*v))
            .disable_x_mesh()
            .draw()
            .map_err(err)?;
        for l in lines {
            let c = COLORS[l.color % COLORS.len()];
            let style = c.stroke_width(if l.dashed { 1 } else { 2 });
            let pts: Vec<(f64, f64)> = l.points.iter().map(|(x, s)| (lx(*x), s.median)).collect();
            let series = if l.dashed {
                chart
                    .draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style))
                    .map_err(err)?
            } else {
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(err)?
            };
            let dashed = l.dashed;
            series.label(&l.label).legend(move |(x, y)| {
                let s = c.stroke_width(if dashed { 1 } else { 2 });
                PathElement::new(vec![(x, y), (x + 22, y)], s)
            });
            chart
                .draw_series(l.points.iter().map(|(x, s)| {
                    ErrorBar::new_vertical(lx(*x), s.min, s.median, s.max, c.stroke_width(1), 8)
                }))
                .map_err(err)?;
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        footer(&bottom, foot)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// One group of bars (a class, or a workload): a bar per series, and
/// optionally a reference line across the group (a measured limit).
pub struct Group {
    pub label: String,
    pub bars: Vec<(String, Stat)>,
    pub line: Option<(f64, String)>,
}

/// Grouped bars with min–max whiskers; `log` for figures spanning orders
/// of magnitude (IOPS from an HDD to memory).
pub fn bars(
    title: &str,
    foot: &[String],
    groups: &[Group],
    y_desc: &str,
    log: bool,
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H + 10 + FOOT * foot.len() as u32))
            .into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (top, bottom) = root.split_vertically(H);
        let vals: Vec<f64> = groups
            .iter()
            .flat_map(|g| {
                g.bars
                    .iter()
                    .map(|b| b.1.max)
                    .chain(g.line.as_ref().map(|l| l.0))
            })
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let vmax = vals.iter().cloned().fold(0.0, f64::max);
        let vmin = vals.iter().cloned().fold(f64::INFINITY, f64::min);
        let n = groups.len().max(1) as f64;
        let series: Vec<String> = {
            let mut s: Vec<String> = Vec::new();
            for g in groups {
                for (name, _) in &g.bars {
                    if !s.contains(name) {
                        s.push(name.clone());
                    }
                }
            }
            s
        };
        let k = series.len().max(1) as f64;
        let width = 0.8 / k;
        let labels: Vec<String> = groups.iter().map(|g| g.label.clone()).collect();
        let xfmt = |v: &f64| {
            let i = v.round();
            if (v - i).abs() < 0.01 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        };
        let mut builder = ChartBuilder::on(&top);
        builder
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(72);
        // One drawing routine for both scales.
        macro_rules! draw {
            ($chart:expr, $base:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .y_desc(y_desc)
                    .x_labels(groups.len() * 8 + 1)
                    .x_label_formatter(&xfmt)
                    .y_label_formatter(&|v| super::html::fmt(*v))
                    .disable_x_mesh()
                    .draw()
                    .map_err(err)?;
                for (si, name) in series.iter().enumerate() {
                    let c = COLORS[si % COLORS.len()];
                    let mut rects = Vec::new();
                    let mut whiskers = Vec::new();
                    for (gi, g) in groups.iter().enumerate() {
                        if let Some((_, s)) = g.bars.iter().find(|b| &b.0 == name) {
                            let x0 = gi as f64 - 0.4 + si as f64 * width;
                            rects.push(Rectangle::new(
                                [(x0 + 0.01, $base), (x0 + width - 0.01, s.median)],
                                c.filled(),
                            ));
                            whiskers.push(ErrorBar::new_vertical(
                                x0 + width / 2.0,
                                s.min,
                                s.median,
                                s.max,
                                BLACK.stroke_width(1),
                                8,
                            ));
                        }
                    }
                    chart
                        .draw_series(rects)
                        .map_err(err)?
                        .label(name)
                        .legend(move |(x, y)| {
                            Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled())
                        });
                    chart.draw_series(whiskers).map_err(err)?;
                }
                let mut limit_drawn = false;
                for (gi, g) in groups.iter().enumerate() {
                    if let Some((v, label)) = &g.line {
                        let red = RGBColor(0xc0, 0x10, 0x10);
                        let s = chart
                            .draw_series(DashedLineSeries::new(
                                vec![(gi as f64 - 0.45, *v), (gi as f64 + 0.45, *v)],
                                5,
                                3,
                                red.stroke_width(2),
                            ))
                            .map_err(err)?;
                        if !limit_drawn {
                            s.label(label.clone()).legend(move |(x, y)| {
                                PathElement::new(vec![(x, y), (x + 22, y)], red.stroke_width(2))
                            });
                            limit_drawn = true;
                        }
                    }
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.3))
                    .label_font(("sans-serif", 13))
                    .draw()
                    .map_err(err)?;
            }};
        }
        if log {
            let lo = if vmin.is_finite() { vmin / 3.0 } else { 0.1 };
            let hi = (vmax * 4.0).max(lo * 10.0);
            draw!(
                builder
                    .build_cartesian_2d(-0.5f64..n - 0.5, (lo..hi).log_scale())
                    .map_err(err)?,
                lo
            );
        } else {
            let hi = if vmax > 0.0 { vmax * 1.2 } else { 1.0 };
            draw!(
                builder
                    .build_cartesian_2d(-0.5f64..n - 0.5, 0f64..hi)
                    .map_err(err)?,
                0.0
            );
        }
        footer(&bottom, foot)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn footer<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    lines: &[String],
) -> Result<()> {
    for (i, l) in lines.iter().enumerate() {
        area.draw_text(
            l,
            &("sans-serif", 12).into_font().color(&BLACK.mix(0.75)),
            (14, 4 + i as i32 * FOOT as i32),
        )
        .map_err(err)?;
    }
    Ok(())
}
