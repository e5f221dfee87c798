//! The per-layer chart of the HTML report: for each layer, the local (op-level) and the
//! accumulated (end-to-end) error as ratios to their allowance, which comes from the reference's
//! own noise; a ratio above 1 is beyond what the reference itself does. Inline SVG, one
//! `<g data-layer="i">` per layer.

use std::fmt::Write as _;

use super::esc;
use crate::compare::{sci, LayerError};

/// One layer of the chart.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LayerRow {
    /// Layer index.
    pub layer: usize,
    /// The largest end-to-end error / tolerance over the layer's tensors (max over inputs).
    pub e2e_ratio: Option<f64>,
    /// The tensor it occurs in.
    pub e2e_worst: Option<String>,
    /// The largest local error / allowance over the layer's ops (max over inputs).
    pub local_ratio: Option<f64>,
    /// The op it occurs in.
    pub local_worst: Option<String>,
    /// True when an op of the layer failed its op-level judgement.
    pub local_failed: bool,
    /// The absolute per-layer errors (max over inputs).
    pub abs: Option<LayerError>,
}

const W: f64 = 760.0;
const H: f64 = 320.0;
const X0: f64 = 70.0;
const X1: f64 = 740.0;
const Y0: f64 = 40.0;
const Y1: f64 = 250.0;
const LOCAL: &str = "#ff7f0e";
const E2E: &str = "#1f77b4";

/// The chart of one tier. `diverge` is the layer of the first divergence (highlighted).
pub(crate) fn layer_chart(tier: &str, rows: &[LayerRow], diverge: Option<usize>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg class=\"layer-chart\" data-tier=\"{t}\" data-layers=\"{n}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"11\" role=\"img\" aria-label=\"per-layer error, tier {t}\">",
        t = esc(tier),
        n = rows.len()
    );
    if rows.is_empty() {
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no per-layer data</text></svg>",
            W / 2.0,
            H / 2.0
        );
        return out;
    }
    let ratios: Vec<f64> = rows
        .iter()
        .flat_map(|r| [r.e2e_ratio, r.local_ratio])
        .flatten()
        .collect();
    let logs: Vec<f64> = ratios
        .iter()
        .filter(|v| v.is_finite() && **v > 0.0)
        .map(|v| v.log10())
        .collect();
    let lo = logs
        .iter()
        .copied()
        .reduce(f64::min)
        .map_or(-3.0, |v| v.floor().clamp(-9.0, -1.0));
    let hi = logs
        .iter()
        .copied()
        .reduce(f64::max)
        .map_or(1.0, |v| v.ceil().clamp(1.0, 12.0));
    let py = |v: f64| {
        if !v.is_finite() {
            Y0
        } else if v <= 0.0 {
            Y1
        } else {
            Y1 - (v.log10().clamp(lo, hi) - lo) / (hi - lo) * (Y1 - Y0)
        }
    };
    let n = rows.len() as f64;
    let gw = (X1 - X0) / n;
    let bw = (gw * 0.38).max(1.0);

    // Grid, decade labels and the allowance line at ratio 1.
    out.push_str("<g stroke=\"#e3e3e3\">\n");
    let decades = (hi - lo) as usize;
    let step = decades.div_ceil(8).max(1);
    for d in (0..=decades).step_by(step) {
        let y = py(10f64.powf(lo + d as f64));
        let _ = writeln!(
            out,
            "<line x1=\"{X0}\" y1=\"{y:.1}\" x2=\"{X1}\" y2=\"{y:.1}\"/>"
        );
    }
    out.push_str("</g>\n<g text-anchor=\"end\" fill=\"#444\">\n");
    for d in (0..=decades).step_by(step) {
        let e = lo + d as f64;
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{:.1}\">1e{}</text>",
            X0 - 6.0,
            py(10f64.powf(e)) + 4.0,
            e as i64
        );
    }
    out.push_str("</g>\n");
    let _ = writeln!(
        out,
        "<text x=\"16\" y=\"{yc}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {yc})\">error / allowance (log)</text>",
        yc = (Y0 + Y1) / 2.0
    );

    // One group per layer: background (highlighted at the first divergence), two bars, label.
    let label_every = rows.len().div_ceil(24).max(1);
    for (i, r) in rows.iter().enumerate() {
        let gx = X0 + gw * i as f64;
        let hit = diverge == Some(r.layer);
        let _ = writeln!(
            out,
            "<g class=\"layer{}\" data-layer=\"{}\">",
            if hit { " diverge" } else { "" },
            r.layer
        );
        let _ = writeln!(
            out,
            "<rect class=\"bg\" x=\"{gx:.1}\" y=\"{Y0}\" width=\"{gw:.1}\" height=\"{}\" fill=\"{}\"/>",
            Y1 - Y0,
            if hit { "#fde0e0" } else { "transparent" }
        );
        let title = format!(
            "layer {}: local {} ({}), accumulated {} ({}){}",
            r.layer,
            r.local_ratio.map_or("not judged".into(), ratio_text),
            r.local_worst.as_deref().unwrap_or("—"),
            r.e2e_ratio.map_or("not judged".into(), ratio_text),
            r.e2e_worst.as_deref().unwrap_or("—"),
            r.abs
                .as_ref()
                .and_then(|a| a.ref_vs_oracle)
                .map_or(String::new(), |f| format!(
                    "; reference's own noise floor {}",
                    sci(f)
                ))
        );
        let _ = writeln!(out, "<title>{}</title>", esc(&title));
        for (k, (v, color, class)) in [(r.local_ratio, LOCAL, "local"), (r.e2e_ratio, E2E, "e2e")]
            .into_iter()
            .enumerate()
        {
            let Some(v) = v else { continue };
            let x = gx + gw * 0.1 + k as f64 * bw;
            let y = py(v).min(Y1 - 1.0);
            let fill = if v.is_finite() { color } else { "#d62728" };
            let _ = writeln!(
                out,
                "<rect class=\"bar {class}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{fill}\"/>",
                Y1 - y
            );
        }
        if i % label_every == 0 || hit {
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                gx + gw / 2.0,
                Y1 + 15.0,
                r.layer
            );
        }
        if hit {
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#b00\" font-weight=\"bold\">▼ first divergence</text>",
                (gx + gw / 2.0).clamp(X0 + 50.0, X1 - 50.0),
                Y0 - 6.0
            );
        }
        out.push_str("</g>\n");
    }
    let y1 = py(1.0);
    let _ = writeln!(
        out,
        "<line class=\"allowance\" x1=\"{X0}\" y1=\"{y1:.1}\" x2=\"{X1}\" y2=\"{y1:.1}\" stroke=\"#d62728\" stroke-dasharray=\"6 4\"/>"
    );
    let _ = writeln!(
        out,
        "<polyline points=\"{X0},{Y0} {X0},{Y1} {X1},{Y1}\" fill=\"none\" stroke=\"#333\"/>"
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">layer</text>",
        (X0 + X1) / 2.0,
        Y1 + 30.0
    );
    // Legend.
    let ly = H - 8.0;
    let _ = writeln!(
        out,
        "<g font-size=\"11\"><rect x=\"{X0}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{LOCAL}\"/><text x=\"{}\" y=\"{ly}\">local (op-level, each op on its own inputs)</text>\
         <rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{E2E}\"/><text x=\"{}\" y=\"{ly}\">accumulated (end-to-end)</text>\
         <line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#d62728\" stroke-dasharray=\"6 4\"/><text x=\"{}\" y=\"{ly}\">allowance = 1 (from the reference's own noise)</text></g>",
        ly - 9.0,
        X0 + 14.0,
        X0 + 260.0,
        ly - 9.0,
        X0 + 274.0,
        X0 + 420.0,
        ly - 4.0,
        X0 + 445.0,
        ly - 4.0,
        X0 + 450.0,
    );
    out.push_str("</svg>\n");
    out
}

/// A ratio for tooltips and tables: `0.123`, `4.56e7`, `inf`.
pub(crate) fn ratio_text(r: f64) -> String {
    if r.is_finite() && r != 0.0 && (1e-3..1e3).contains(&r.abs()) {
        format!("{r:.3}")
    } else {
        sci(r)
    }
}
