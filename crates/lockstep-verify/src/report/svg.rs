//! A hand-written SVG line plot of the per-layer error (no plotting crate).

use std::fmt::Write as _;

use super::NamedComparison;
use crate::compare::{sci, LayerError};

/// One plotted line.
struct Series {
    /// Legend name.
    name: &'static str,
    /// Stroke and marker colour.
    color: &'static str,
    /// Extra stroke attributes (a dash pattern), with a leading space, or empty.
    dash: &'static str,
    /// (layer, value) points.
    points: Vec<(usize, f64)>,
}

/// Per-layer maxima over several inputs (each series the max over inputs at that layer).
pub(crate) fn merged_layers(inputs: &[NamedComparison]) -> Vec<LayerError> {
    let mut rows: Vec<LayerError> = Vec::new();
    let max_opt = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    };
    for c in inputs {
        for r in c.comparison.per_layer() {
            match rows.iter_mut().find(|x| x.layer == r.layer) {
                Some(x) => {
                    if r.ours_vs_ref > x.ours_vs_ref {
                        x.ours_vs_ref = r.ours_vs_ref;
                        x.worst_tensor = r.worst_tensor.clone();
                    }
                    x.ref_vs_oracle = max_opt(x.ref_vs_oracle, r.ref_vs_oracle);
                    x.ours_vs_oracle = max_opt(x.ours_vs_oracle, r.ours_vs_oracle);
                    x.passed &= r.passed;
                }
                None => rows.push(r),
            }
        }
    }
    rows.sort_by_key(|r| r.layer);
    rows
}

/// A self-contained SVG line plot of the per-layer error: x = layer index, y = max abs
/// difference on a log10 scale (decade ticks). One polyline for ours vs the reference, one for
/// the reference's own noise floor (reference vs oracle) and one for ours vs the oracle when an
/// oracle was given; with several inputs each point is the maximum over inputs. Exact zeros are
/// drawn on a separate "0" row under the log scale and infinities/NaN on an "inf" row above it.
/// Written by hand: no plotting crate.
pub fn svg_per_layer(title: &str, inputs: &[NamedComparison]) -> String {
    const X0: f64 = 90.0;
    const X1: f64 = 650.0;
    const Y0: f64 = 60.0;
    const Y1: f64 = 390.0;
    const BAND: f64 = 28.0;
    const H: f64 = 460.0;
    let rows = merged_layers(inputs);
    let series: Vec<Series> = <[Series; 3]>::into_iter([
        Series {
            name: "ours vs reference",
            color: "#d62728",
            dash: "",
            points: rows.iter().map(|r| (r.layer, r.ours_vs_ref)).collect(),
        },
        Series {
            name: "reference vs oracle (noise floor)",
            color: "#1f77b4",
            dash: " stroke-dasharray=\"6 4\"",
            points: rows
                .iter()
                .filter_map(|r| r.ref_vs_oracle.map(|v| (r.layer, v)))
                .collect(),
        },
        Series {
            name: "ours vs oracle",
            color: "#2ca02c",
            dash: " stroke-dasharray=\"2 3\"",
            points: rows
                .iter()
                .filter_map(|r| r.ours_vs_oracle.map(|v| (r.layer, v)))
                .collect(),
        },
    ])
    .filter(|s| !s.points.is_empty())
    .collect();
    let legend_w = 60.0
        + 7.0
            * series
                .iter()
                .map(|s| s.name.chars().count())
                .max()
                .unwrap_or(10) as f64;
    let w = (X1 + 20.0 + legend_w + 20.0).ceil();

    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{H}\" viewBox=\"0 0 {w} {H}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        out,
        "<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{H}\" fill=\"white\"/>"
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"30\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">{}</text>",
        (X0 + X1) / 2.0,
        xml(title)
    );
    if rows.is_empty() {
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no per-layer data</text>",
            (X0 + X1) / 2.0,
            H / 2.0
        );
        out.push_str("</svg>\n");
        return out;
    }

    // y range in whole decades over the finite positive values; separate rows for 0 and inf.
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .collect();
    let logs: Vec<f64> = all
        .iter()
        .filter(|v| v.is_finite() && **v > 0.0)
        .map(|v| v.log10())
        .collect();
    let has_zero = all.contains(&0.0);
    let has_bad = all.iter().any(|v| !v.is_finite());
    let (lo, mut hi) = match (
        logs.iter().copied().reduce(f64::min),
        logs.iter().copied().reduce(f64::max),
    ) {
        (Some(a), Some(b)) => (a.floor().max(-40.0), b.ceil().min(40.0)),
        _ => (-17.0, -16.0),
    };
    if hi <= lo {
        hi = lo + 1.0;
    }
    let log_top = if has_bad { Y0 + BAND } else { Y0 };
    let log_bottom = if has_zero { Y1 - BAND } else { Y1 };
    let py = |v: f64| {
        if v == 0.0 {
            Y1
        } else if !v.is_finite() {
            Y0
        } else {
            let e = v.log10().clamp(lo, hi);
            log_bottom - (e - lo) / (hi - lo) * (log_bottom - log_top)
        }
    };
    let (l_min, l_max) = (
        rows.first().map_or(0, |r| r.layer) as f64,
        rows.last().map_or(0, |r| r.layer) as f64,
    );
    let px = |l: usize| {
        if l_max > l_min {
            X0 + (l as f64 - l_min) / (l_max - l_min) * (X1 - X0)
        } else {
            (X0 + X1) / 2.0
        }
    };

    // Grid and y ticks: decades (at most ~12 labels), plus the 0 and inf rows.
    let decades = (hi - lo) as usize;
    let ystep = decades.div_ceil(12).max(1);
    let mut yticks: Vec<(f64, String)> = (0..=decades)
        .step_by(ystep)
        .map(|d| {
            let e = lo + d as f64;
            (py(10f64.powf(e)), format!("1e{}", e as i64))
        })
        .collect();
    if has_zero {
        yticks.push((Y1, "0".into()));
    }
    if has_bad {
        yticks.push((Y0, "inf/NaN".into()));
    }
    out.push_str("<g stroke=\"#dddddd\" stroke-width=\"1\">\n");
    for (y, label) in &yticks {
        let dash = if label.starts_with("1e") {
            ""
        } else {
            " stroke-dasharray=\"3 3\""
        };
        let _ = writeln!(
            out,
            "<line x1=\"{X0}\" y1=\"{y:.1}\" x2=\"{X1}\" y2=\"{y:.1}\"{dash}/>"
        );
    }
    out.push_str("</g>\n<g text-anchor=\"end\">\n");
    for (y, label) in &yticks {
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{:.1}\">{label}</text>",
            X0 - 8.0,
            y + 4.0
        );
    }
    out.push_str("</g>\n");

    // x ticks (at most ~16 labels).
    let n_layers = (l_max - l_min) as usize + 1;
    let xstep = n_layers.div_ceil(16).max(1);
    out.push_str("<g text-anchor=\"middle\">\n");
    for l in (l_min as usize..=l_max as usize).step_by(xstep) {
        let x = px(l);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{Y1}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"black\"/>",
            Y1 + 5.0
        );
        let _ = writeln!(out, "<text x=\"{x:.1}\" y=\"{}\">{l}</text>", Y1 + 20.0);
    }
    out.push_str("</g>\n");

    // Axes and labels.
    let _ = writeln!(
        out,
        "<polyline points=\"{X0},{Y0} {X0},{Y1} {X1},{Y1}\" fill=\"none\" stroke=\"black\" stroke-width=\"1\"/>"
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">layer</text>",
        (X0 + X1) / 2.0,
        Y1 + 45.0
    );
    let _ = writeln!(
        out,
        "<text x=\"25\" y=\"{yc}\" text-anchor=\"middle\" transform=\"rotate(-90 25 {yc})\">max |difference| over the layer's tensors (log scale)</text>",
        yc = (Y0 + Y1) / 2.0
    );

    // Series.
    for Series {
        name,
        color,
        dash,
        points: pts,
    } in &series
    {
        let points: Vec<String> = pts
            .iter()
            .map(|&(l, v)| format!("{:.1},{:.1}", px(l), py(v)))
            .collect();
        let _ = writeln!(
            out,
            "<polyline class=\"series\" data-series=\"{}\" points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>",
            xml(name),
            points.join(" ")
        );
        let _ = writeln!(out, "<g fill=\"{color}\">");
        for &(l, v) in pts {
            let _ = writeln!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\"><title>layer {l}: {}</title></circle>",
                px(l),
                py(v),
                xml(&sci(v))
            );
        }
        out.push_str("</g>\n");
    }

    // Legend.
    let lx = X1 + 20.0;
    let _ = writeln!(
        out,
        "<rect x=\"{lx}\" y=\"{Y0}\" width=\"{legend_w}\" height=\"{}\" fill=\"white\" stroke=\"#999999\"/>",
        10.0 + 20.0 * series.len() as f64
    );
    for (
        i,
        Series {
            name, color, dash, ..
        },
    ) in series.iter().enumerate()
    {
        let y = Y0 + 15.0 + 20.0 * i as f64;
        let _ = writeln!(
            out,
            "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>",
            lx + 10.0,
            lx + 40.0
        );
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\">{}</text>",
            lx + 48.0,
            y + 4.0,
            xml(name)
        );
    }
    if inputs.len() > 1 {
        let _ = writeln!(
            out,
            "<text x=\"{lx}\" y=\"{}\" font-size=\"11\" fill=\"#555555\">max over {} inputs</text>",
            Y0 + 30.0 + 20.0 * series.len() as f64,
            inputs.len()
        );
    }
    out.push_str("</svg>\n");
    out
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
