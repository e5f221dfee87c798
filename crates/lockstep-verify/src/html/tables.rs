//! The HTML report's tables: the per-layer table under each chart and each input's folded
//! details (verdict, first divergence, per-tensor comparison).

use std::fmt::Write as _;

use super::chart::LayerRow;
use super::{esc, ratio_cell};
use crate::compare::{sci, Against};
use crate::report::NamedComparison;
use crate::tolerance::TierRule;

/// The per-layer table of one tier; row ids `row-{tier}-{layer}` (the chart links to them).
pub(super) fn layer_table(out: &mut String, tier: &str, rows: &[LayerRow]) {
    out.push_str(
        "<table class=\"layers\"><tr><th>Layer</th><th>Local: worst op</th><th>Local error / allowance</th>\
         <th>Accumulated: worst tensor</th><th>Accumulated error / tolerance</th><th>Max |test − ref|</th>\
         <th>Reference's noise floor (ref vs oracle)</th><th>Max |test − oracle|</th><th>Status</th></tr>\n",
    );
    for r in rows {
        let abs = r.abs.as_ref();
        let failed = r.local_failed || abs.is_some_and(|a| !a.passed);
        let _ = writeln!(
            out,
            "<tr id=\"row-{}-{}\"{}><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(tier),
            r.layer,
            if failed { " class=\"fail\"" } else { "" },
            r.layer,
            code(r.local_worst.as_deref()),
            ratio_cell(r.local_ratio),
            code(r.e2e_worst.as_deref()),
            ratio_cell(r.e2e_ratio),
            abs.map_or("—".into(), |a| sci(a.ours_vs_ref)),
            abs.and_then(|a| a.ref_vs_oracle).map_or("—".into(), sci),
            abs.and_then(|a| a.ours_vs_oracle).map_or("—".into(), sci),
            if failed { "FAIL" } else { "PASS" }
        );
    }
    out.push_str("</table>\n");
}

fn code(s: Option<&str>) -> String {
    s.map_or("—".into(), |s| format!("<code>{}</code>", esc(s)))
}

/// One input's details, folded: verdict, tokens, first divergence, worst case, every tensor.
pub(super) fn comparison_details(out: &mut String, c: &NamedComparison) {
    let cmp = &c.comparison;
    let status = if cmp.passed { "PASS" } else { "FAIL" };
    let _ = writeln!(
        out,
        "<details class=\"input\"><summary><span class=\"badge {status}\">{status}</span> input <code>{}</code> — {}</summary>",
        esc(&c.label),
        esc(&cmp.verdict().to_string())
    );
    let _ = writeln!(
        out,
        "<p>Tier {}; {} tensor records; reference {}; test {}; oracle {}.<br>Rule: {}</p>",
        esc(cmp.tier.as_str()),
        cmp.tensors.len(),
        esc(cmp.reference_producer.as_deref().unwrap_or("—")),
        esc(cmp.test_producer.as_deref().unwrap_or("—")),
        if cmp.has_oracle {
            esc(cmp.oracle_producer.as_deref().unwrap_or("—"))
        } else {
            "none".into()
        },
        esc(cmp.tier.rule_description())
    );
    if let Some(ids) = &cmp.token_ids {
        let shown: Vec<String> = ids.iter().take(32).map(i64::to_string).collect();
        let more = if ids.len() > 32 {
            format!(", … ({} more)", ids.len() - 32)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "<p>Tokens ({}): <code>[{}{more}]</code></p>",
            ids.len(),
            shown.join(", ")
        );
    }
    for w in &cmp.warnings {
        let _ = writeln!(out, "<p class=\"note\">Note: {}</p>", esc(w));
    }
    for l in cmp.first_nonfinite.lines() {
        let _ = writeln!(out, "<p>First non-finite value (NaN/inf): {}</p>", esc(&l));
    }
    if let Some(f) = cmp.first_failure() {
        let cause = cmp.headline_cause(f);
        let _ = writeln!(
            out,
            "<p><b>First divergence:</b> <code>{}</code> ({}). Likely cause: {}. {}</p>",
            esc(&f.name),
            f.status.label(),
            esc(&cause),
            esc(&crate::report::element_line(f).unwrap_or_default())
        );
    }
    out.push_str(
        "<table class=\"tensors\"><tr><th>Tensor</th><th>Shape</th><th>Max abs</th><th>Mean abs</th><th>Cosine</th>\
         <th>Ref vs oracle</th><th>Test vs oracle</th><th>Tolerance</th><th>Ratio</th><th>Status</th></tr>\n",
    );
    for t in &cmp.tensors {
        let s = t.stats.as_ref();
        let failed = t.status.is_failure();
        let tol = match &t.tolerance {
            Some(x) if x.against == Against::Oracle => format!("{} (oracle)", sci(x.threshold)),
            Some(x) => sci(x.threshold),
            None => "—".into(),
        };
        let _ = writeln!(
            out,
            "<tr{}><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            if failed { " class=\"fail\"" } else { "" },
            esc(&t.name),
            t.shape().map_or("—".into(), |s| esc(&format!("{s:?}"))),
            s.map_or("—".into(), |s| sci(s.max_abs)),
            s.map_or("—".into(), |s| sci(s.mean_abs)),
            s.map_or("—".into(), |s| format!("{:.9}", s.cosine)),
            t.ref_vs_oracle.as_ref().map_or("—".into(), |s| sci(s.max_abs)),
            t.test_vs_oracle.as_ref().map_or("—".into(), |s| sci(s.max_abs)),
            tol,
            ratio_cell(t.tolerance_ratio()),
            t.status.label()
        );
    }
    out.push_str("</table>\n</details>\n");
}
