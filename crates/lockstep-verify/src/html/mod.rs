//! The HTML report: one self-contained file (inline CSS, SVG and a few lines of script; nothing
//! fetched from the network) built from the same data as the Markdown and JSON reports: the
//! summary, the first divergence and its likely cause, per tier a per-layer chart of the local
//! (op-level) and accumulated (end-to-end) error against their allowances (which come from the
//! reference's own noise), the phases, and per input the details, folded away.
//!
//! Every string from the data is escaped ([`esc`]); the script is fixed text. When it has run it
//! sets `data-lockstep-report="ok"` on the `<html>` element, and on every chart
//! `data-layers-drawn`, the number of `data-layer` groups it holds (headless-browser tests read
//! both from the rendered DOM).

mod chart;
mod tables;

use std::fmt::Write as _;

use crate::compare::{likely_cause, Status};
use crate::judge::VerifyOutcome;
use crate::local::{layer_tap, NamedLocal, OpStatus};
use crate::report::{merged_layers, overall_verdict, NamedComparison, Phase, PhaseStatus};
use crate::tolerance::Tier;
use chart::{layer_chart, ratio_text, LayerRow};

/// What the HTML report shows.
#[derive(Debug, Clone, Copy)]
pub struct HtmlReport<'a> {
    /// The report's title.
    pub title: &'a str,
    /// What was verified (model, traces), plain text.
    pub model: &'a str,
    /// The phases, in order.
    pub phases: &'a [Phase],
    /// The full end-to-end comparisons per tier (the charts).
    pub full: &'a [(Tier, Vec<NamedComparison>)],
    /// The op-level judgements per tier, where they ran.
    pub local: &'a [(Tier, Vec<NamedLocal>)],
}

/// The HTML report of a phased `lockstep verify` run.
pub fn verify_html(title: &str, model: &str, outcome: &VerifyOutcome) -> String {
    render(&HtmlReport {
        title,
        model,
        phases: &outcome.phases,
        full: &outcome.full,
        local: &outcome.local,
    })
}

/// The HTML report of one `lockstep compare` (a single phase holding the comparisons).
pub fn compare_html(title: &str, inputs: &[NamedComparison]) -> String {
    let phases = [Phase::from_comparisons("comparison", inputs.to_vec())];
    let full: Vec<(Tier, Vec<NamedComparison>)> = match inputs.first() {
        Some(c) => vec![(c.comparison.tier, inputs.to_vec())],
        None => vec![],
    };
    render(&HtmlReport {
        title,
        model: "",
        phases: &phases,
        full: &full,
        local: &[],
    })
}

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1100px;padding:16px 24px;color:#222;line-height:1.4}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.model{color:#555;white-space:pre-wrap;font-size:.9em}
.badge{display:inline-block;padding:1px 8px;border-radius:4px;font-weight:bold;font-size:.85em;color:#fff}
.PASS{background:#2e7d32}.FAIL{background:#c62828}.SKIP{background:#757575}
.overall{font-size:1.2em;margin:.6em 0}
.diverge-box{border-left:6px solid #c62828;background:#fdecea;padding:8px 14px;margin:12px 0}
.ok-box{border-left:6px solid #2e7d32;background:#edf7ed;padding:8px 14px;margin:12px 0}
table{border-collapse:collapse;font-size:.85em;margin:6px 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.fail td{background:#fdecea}tr.hl td{outline:2px solid #ff7f0e}
code{font-size:.9em;background:#f4f4f4;padding:0 3px;border-radius:3px}
details{margin:6px 0}summary{cursor:pointer}
pre{background:#f8f8f8;padding:8px;overflow-x:auto;font-size:.8em}
.chart{overflow-x:auto}.layer-chart g.layer:hover rect.bg{fill:#f0f0f0}
.note{color:#555;font-size:.85em}
";

const SCRIPT: &str = "
(function(){
  var charts=document.querySelectorAll('svg.layer-chart');
  charts.forEach(function(svg){
    var groups=svg.querySelectorAll('g[data-layer]');
    svg.setAttribute('data-layers-drawn',String(groups.length));
    groups.forEach(function(g){
      g.addEventListener('click',function(){
        var id='row-'+svg.getAttribute('data-tier')+'-'+g.getAttribute('data-layer');
        document.querySelectorAll('tr.hl').forEach(function(r){r.classList.remove('hl');});
        var row=document.getElementById(id);
        if(row){row.classList.add('hl');var d=row.closest('details');if(d){d.open=true;}row.scrollIntoView({block:'center'});}
      });
    });
  });
  document.documentElement.setAttribute('data-lockstep-report','ok');
})();
";

/// Renders the report.
pub fn render(r: &HtmlReport) -> String {
    let mut out = String::new();
    let overall = crate::judge::overall_status(r.phases);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        esc(r.title),
        esc(r.title)
    );
    if !r.model.trim().is_empty() {
        // The description is written for Markdown: drop its code backticks.
        let model = r.model.trim().replace('`', "");
        let _ = writeln!(out, "<p class=\"model\">{}</p>", esc(&model));
    }
    let badge = if overall.starts_with("PASS") {
        "PASS"
    } else {
        "FAIL"
    };
    let failed: Vec<&Phase> = r
        .phases
        .iter()
        .filter(|p| p.status == PhaseStatus::Fail)
        .collect();
    let _ = writeln!(
        out,
        "<p class=\"overall\"><span class=\"badge {badge}\" id=\"overall\">{}</span> {}</p>",
        esc(&overall),
        esc(&if failed.is_empty() {
            format!("{} phase(s) run, none failed.", r.phases.len())
        } else {
            format!(
                "{} of {} phase(s) failed: {}.",
                failed.len(),
                r.phases.len(),
                failed
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    );
    let first = first_divergence(r);
    divergence_box(&mut out, r, first.as_ref());

    out.push_str("<h2>Phases</h2>\n<table id=\"phases\"><tr><th>#</th><th>Phase</th><th>Status</th><th>Summary</th></tr>\n");
    for (i, p) in r.phases.iter().enumerate() {
        let _ = writeln!(
            out,
            "<tr{}><td class=\"num\">{}</td><td>{}</td><td><span class=\"badge {s}\">{s}</span></td><td>{}</td></tr>",
            if p.status == PhaseStatus::Fail { " class=\"fail\"" } else { "" },
            i + 1,
            esc(&p.name),
            esc(&p.summary),
            s = p.status.label()
        );
    }
    out.push_str("</table>\n");

    out.push_str("<h2>Per-layer error against the reference's own noise</h2>\n");
    out.push_str(
        "<p class=\"note\">Each bar is an error divided by its allowance, which comes from the reference's own noise \
         (its distance from the pure-f64 oracle in f32/bf16; 1e-9 relative in f64). Local: the worst op of the layer \
         recomputed on the test's own inputs (where a difference is <em>made</em>). Accumulated: the worst tensor of \
         the layer end to end (made plus inherited). Above the dashed line is beyond what the reference itself does. \
         Maximum over inputs; hover a layer for the numbers, click it for its table row.</p>\n",
    );
    let diverge_layer = first
        .as_ref()
        .and_then(|d| layer_tap(&d.tensor).map(|(l, _)| l));
    for (tier, inputs) in r.full {
        let locals = r
            .local
            .iter()
            .find(|(t, _)| t == tier)
            .map(|(_, v)| v.as_slice());
        let rows = layer_rows(inputs, locals.unwrap_or(&[]));
        let _ = writeln!(
            out,
            "<h3>Tier {}{}</h3>\n<div class=\"chart\">{}</div>",
            esc(tier.as_str()),
            if locals.is_none() {
                " <span class=\"note\">(op-level check not run in this tier: accumulated only)</span>"
            } else {
                ""
            },
            layer_chart(tier.as_str(), &rows, diverge_layer)
        );
        let _ = writeln!(
            out,
            "<details><summary>Per-layer table, tier {}</summary>",
            esc(tier.as_str())
        );
        tables::layer_table(&mut out, tier.as_str(), &rows);
        let _ = writeln!(
            out,
            "<details><summary>Absolute errors (max |difference| per layer)</summary>{}</details>",
            crate::report::svg_per_layer(
                &format!("max |difference| per layer, tier {}", tier.as_str()),
                inputs
            )
        );
        out.push_str("</details>\n");
    }

    out.push_str("<h2>Details</h2>\n");
    for (i, p) in r.phases.iter().enumerate() {
        let _ = writeln!(
            out,
            "<details class=\"phase\"><summary><span class=\"badge {s}\">{s}</span> {}. {} — {}</summary>",
            i + 1,
            esc(&p.name),
            esc(&p.summary),
            s = p.status.label()
        );
        if let Some(d) = &p.details {
            let _ = writeln!(out, "<pre>{}</pre>", esc(d.trim()));
        }
        for c in &p.comparisons {
            tables::comparison_details(&mut out, c);
        }
        out.push_str("</details>\n");
    }
    let _ = write!(out, "<script>{SCRIPT}</script>\n</body>\n</html>\n");
    out
}

/// The first divergence of the whole run: where a difference is first *made* (op-level), else
/// where it is first *seen* end to end.
struct Divergence {
    tensor: String,
    /// "made" (op-level) or "seen end to end".
    kind: &'static str,
    /// Input label and tier.
    context: String,
    /// What exceeded, in words.
    detail: String,
    cause: String,
}

fn first_divergence(r: &HtmlReport) -> Option<Divergence> {
    let rank = |n: &str| lockstep_trace::forward_rank(n);
    let local = r
        .local
        .iter()
        .flat_map(|(t, v)| v.iter().map(move |i| (t, i)))
        .filter_map(|(t, i)| i.local.first_failure().map(|o| (t, i, o)))
        .min_by_key(|(_, _, o)| rank(&o.name));
    if let Some((tier, item, op)) = local {
        return Some(Divergence {
            tensor: op.name.clone(),
            kind: "made (op-level: the op on its own inputs)",
            context: format!("input {}, tier {}", item.label, tier.as_str()),
            detail: format!("{}: {}", op.status.label(), op.reasons.join("; ")),
            cause: likely_cause(&op.name).to_string(),
        });
    }
    let e2e = r
        .phases
        .iter()
        .flat_map(|p| p.comparisons.iter().map(move |c| (p, c)))
        .filter_map(|(p, c)| c.comparison.first_failure().map(|f| (p, c, f)))
        .min_by_key(|(_, _, f)| rank(&f.name));
    e2e.map(|(p, c, f)| Divergence {
        tensor: f.name.clone(),
        kind: "seen end to end",
        context: format!("phase {}, input {}", p.name, c.label),
        detail: format!(
            "{}{}",
            f.status.label(),
            crate::report::element_line(f).map_or(String::new(), |l| format!(": {l}"))
        ),
        cause: if f.status == Status::NonFinite {
            c.comparison.cause_of(f)
        } else {
            likely_cause(&f.name).to_string()
        },
    })
}

fn divergence_box(out: &mut String, r: &HtmlReport, d: Option<&Divergence>) {
    match d {
        Some(d) => {
            let _ = writeln!(
                out,
                "<div class=\"diverge-box\" id=\"first-divergence\"><b>First divergence:</b> <code>{}</code> — {} ({}).<br>{}<br><b>Likely cause:</b> {}.</div>",
                esc(&d.tensor),
                esc(d.kind),
                esc(&d.context),
                esc(&d.detail),
                esc(&d.cause)
            );
        }
        None => {
            let inputs: Vec<NamedComparison> =
                r.full.iter().flat_map(|(_, v)| v.iter().cloned()).collect();
            let _ = writeln!(
                out,
                "<div class=\"ok-box\" id=\"first-divergence\"><b>No divergence</b>: every judged tensor and op is within the reference's own noise. Verdict: {}.</div>",
                esc(&overall_verdict(&inputs))
            );
        }
    }
}

/// The chart's rows for one tier: end-to-end comparisons and op-level judgements merged per
/// layer (maximum over inputs).
fn layer_rows(inputs: &[NamedComparison], locals: &[NamedLocal]) -> Vec<LayerRow> {
    let mut rows: Vec<LayerRow> = merged_layers(inputs)
        .into_iter()
        .map(|a| LayerRow {
            layer: a.layer,
            e2e_ratio: None,
            e2e_worst: None,
            local_ratio: None,
            local_worst: None,
            local_failed: false,
            abs: Some(a),
        })
        .collect();
    fn row(rows: &mut Vec<LayerRow>, layer: usize) -> &mut LayerRow {
        if let Some(i) = rows.iter().position(|r| r.layer == layer) {
            return &mut rows[i];
        }
        rows.push(LayerRow {
            layer,
            e2e_ratio: None,
            e2e_worst: None,
            local_ratio: None,
            local_worst: None,
            local_failed: false,
            abs: None,
        });
        rows.last_mut().expect("just pushed")
    }
    let bigger = |old: Option<f64>, new: f64| old.is_none_or(|o| new > o || new.is_nan());
    for c in inputs {
        for t in &c.comparison.tensors {
            let (Some(l), Some(ratio)) = (t.layer(), t.tolerance_ratio()) else {
                continue;
            };
            let r = row(&mut rows, l);
            if bigger(r.e2e_ratio, ratio) {
                r.e2e_ratio = Some(ratio);
                r.e2e_worst = Some(t.name.clone());
            }
        }
    }
    for i in locals {
        for o in &i.local.ops {
            let Some((l, _)) = layer_tap(&o.name) else {
                continue;
            };
            if o.status == OpStatus::Unjudged {
                continue;
            }
            let r = row(&mut rows, l);
            r.local_failed |= o.status.is_failure();
            let ratio = if o.status.is_failure()
                && o.ratio.partial_cmp(&1.0) != Some(std::cmp::Ordering::Greater)
            {
                f64::INFINITY
            } else {
                o.ratio
            };
            if bigger(r.local_ratio, ratio) {
                r.local_ratio = Some(ratio);
                r.local_worst = Some(o.name.clone());
            }
        }
    }
    rows.sort_by_key(|r| r.layer);
    rows
}

/// Formats a ratio for tables (shared with [`tables`]).
fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("—".into(), ratio_text)
}

#[cfg(test)]
mod tests;
