//! The Markdown reports: one comparison ([`markdown`]) or the phased `lockstep verify` report
//! ([`phased_markdown`]), each summary and failures first, details after; and the time per step
//! of a verification ([`timings_markdown`]).

use std::fmt::Write as _;

use super::{overall_verdict, NamedComparison, Phase, PhaseStatus, StepTime};
use crate::compare::{sci, Against, LayerError, Status, TensorComparison, TraceComparison};
use crate::stats::LogitStats;
use crate::tolerance::TierRule;

/// Renders a Markdown report of one or more labelled trace comparisons: the verdict, a summary
/// table (input, tokens, logits shape, max abs difference, tolerance, status), then per input the
/// worst case, the first divergence, logits KL/top-1/top-5, the per-layer error table and the
/// per-tensor table in forward order.
pub fn markdown(inputs: &[NamedComparison]) -> String {
    let mut out = String::new();
    out.push_str("# Trace comparison\n\n");
    let _ = writeln!(out, "**Verdict: {}**\n", overall_verdict(inputs));
    summary_table(&mut out, inputs);
    for c in inputs {
        comparison_section(&mut out, 2, c, true);
    }
    out
}

/// Renders the whole `lockstep verify` report, shortest first: title, model description, the
/// overall result, a summary table of the phases (PASS/FAIL/SKIP), the failures (each failing
/// input's first divergence and likely cause), then each phase's section with its summary,
/// details and trace comparisons (per-tensor tables for failing inputs only).
pub fn phased_markdown(title: &str, model: &str, phases: &[Phase]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {title}\n");
    if !model.trim().is_empty() {
        let _ = writeln!(out, "{}\n", model.trim());
    }
    let failed: Vec<&str> = phases
        .iter()
        .filter(|p| p.status == PhaseStatus::Fail)
        .map(|p| p.name.as_str())
        .collect();
    let skipped = phases
        .iter()
        .filter(|p| p.status == PhaseStatus::Skip)
        .count();
    let run = phases.len() - skipped;
    let skip_note = if skipped > 0 {
        format!(" ({skipped} skipped)")
    } else {
        String::new()
    };
    if phases.is_empty() {
        out.push_str("**Overall: NO PHASES RUN**\n\n");
    } else if failed.is_empty() {
        let _ = writeln!(
            out,
            "**Overall: {}** — {run} of {run} phase(s) passed.\n",
            crate::judge::overall_status(phases)
        );
    } else {
        let _ = writeln!(
            out,
            "**Overall: FAIL** — {} of {run} phase(s) failed: {}{skip_note}.\n",
            failed.len(),
            failed.join(", ")
        );
    }
    out.push_str("| # | Phase | Status | Summary |\n|---:|---|---|---|\n");
    for (i, p) in phases.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {} | **{}** | {} |",
            i + 1,
            cell(&p.name),
            p.status.label(),
            cell(&p.summary)
        );
    }
    out.push('\n');
    failures(&mut out, phases);
    out.push_str(
        "Details of every phase follow (the per-tensor tables of failing inputs only; every \
         tensor of every input is in the JSON and HTML reports).\n\n",
    );
    for (i, p) in phases.iter().enumerate() {
        let _ = writeln!(out, "## {}. {} — {}\n", i + 1, p.name, p.status.label());
        let _ = writeln!(out, "{}\n", p.summary);
        if let Some(d) = &p.details {
            let _ = writeln!(out, "{}\n", d.trim_end());
        }
        if p.comparisons.len() > 1 {
            summary_table(&mut out, &p.comparisons);
        }
        for c in &p.comparisons {
            comparison_section(&mut out, 3, c, !c.comparison.passed);
        }
    }
    out
}

/// Markdown: the steps of a verification in the order they ran, with their times and shares of
/// the total (empty when no step was timed).
pub fn timings_markdown(steps: &[StepTime]) -> String {
    if steps.is_empty() {
        return String::new();
    }
    let total: f64 = steps.iter().map(|s| s.seconds).sum();
    let mut out = String::from("## Where the time went\n\n");
    let _ = writeln!(
        out,
        "{} steps, {total:.1} s in all (wall clock).\n",
        steps.len()
    );
    out.push_str("| # | Step | Seconds | Share |\n|---:|---|---:|---:|\n");
    for (i, s) in steps.iter().enumerate() {
        let share = if total > 0.0 {
            100.0 * s.seconds / total
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {share:.0}% |",
            i + 1,
            s.step.replace('|', "\\|"),
            s.seconds
        );
    }
    out.push('\n');
    out
}

/// The old report's table: one row per input, judged on logits.
fn summary_table(out: &mut String, inputs: &[NamedComparison]) {
    out.push_str(
        "| Input | Tokens | Shape | Max abs difference | Tolerance | Status |\n\
         |---|---:|---|---:|---:|---|\n",
    );
    for c in inputs {
        let cmp = &c.comparison;
        let logits = cmp.get("logits");
        let shape = logits
            .and_then(|l| l.shape())
            .map(fmt_shape)
            .unwrap_or_else(|| "—".into());
        let (diff, tol) = match logits {
            Some(l) => {
                let d = l.stats.as_ref().map_or("—".into(), |s| sci(s.max_abs));
                match &l.tolerance {
                    Some(t) if t.against == Against::Oracle => (
                        format!("{d} (vs oracle {})", sci(t.measured)),
                        format!("{} (vs oracle)", sci(t.threshold)),
                    ),
                    Some(t) => (d, sci(t.threshold)),
                    None => (d, "—".into()),
                }
            }
            None => ("—".into(), "—".into()),
        };
        let status = match (&cmp.first_divergence, cmp.passed) {
            (_, true) => "PASS".to_string(),
            (Some(f), false) => format!("FAIL at `{f}`"),
            (None, false) => "INCONCLUSIVE".to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {shape} | {diff} | {tol} | **{status}** |",
            cell(&c.label),
            cmp.num_tokens().map_or("—".into(), |n| n.to_string()),
        );
    }
    out.push('\n');
}

/// "## Failures": each failed phase's summary and, per failing input, where it first diverges and
/// the likely cause (nothing when no phase failed).
fn failures(out: &mut String, phases: &[Phase]) {
    let failed: Vec<(usize, &Phase)> = phases
        .iter()
        .enumerate()
        .filter(|(_, p)| p.status == PhaseStatus::Fail)
        .collect();
    if failed.is_empty() {
        return;
    }
    out.push_str("## Failures\n\n");
    for (i, p) in failed {
        let _ = writeln!(out, "- **{}. {}**: {}", i + 1, p.name, cell(&p.summary));
        for c in p.comparisons.iter().filter(|c| !c.comparison.passed) {
            let cmp = &c.comparison;
            match cmp.first_failure() {
                Some(f) => {
                    let cause = cmp.headline_cause(f);
                    let _ = writeln!(
                        out,
                        "  - input `{}`: first divergence `{}` ({}); likely cause: {cause}",
                        c.label,
                        f.name,
                        f.status.label()
                    );
                }
                None => {
                    let _ = writeln!(out, "  - input `{}`: {}", c.label, cmp.verdict());
                }
            }
        }
    }
    out.push('\n');
}

/// One input's section at heading level `level`; the per-tensor table only when `tensors`.
fn comparison_section(out: &mut String, level: usize, c: &NamedComparison, tensors: bool) {
    let h = "#".repeat(level);
    let cmp = &c.comparison;
    let _ = writeln!(
        out,
        "{h} Input `{}` — {}\n",
        c.label,
        if cmp.passed { "PASS" } else { "FAIL" }
    );
    let _ = writeln!(out, "**Verdict: {}**\n", cmp.verdict());

    let judged = cmp.tensors.iter().filter(|t| t.tolerance.is_some()).count();
    let passed = cmp
        .tensors
        .iter()
        .filter(|t| t.status == Status::Pass)
        .count();
    out.push_str("| | |\n|---|---|\n");
    let _ = writeln!(out, "| Tier | {} |", cmp.tier);
    if let Some(ids) = &cmp.token_ids {
        let _ = writeln!(out, "| Tokens | {}: `{}` |", ids.len(), fmt_ids(ids));
    }
    let producer = |p: &Option<String>| p.as_deref().map_or("—".into(), cell);
    let _ = writeln!(out, "| Reference | {} |", producer(&cmp.reference_producer));
    let _ = writeln!(out, "| Ours | {} |", producer(&cmp.test_producer));
    let _ = writeln!(
        out,
        "| Oracle (pure f64) | {} |",
        if cmp.has_oracle {
            producer(&cmp.oracle_producer)
        } else {
            "none".into()
        }
    );
    let _ = writeln!(
        out,
        "| Tensors | {} records, {judged} judged, {passed} pass |\n",
        cmp.tensors.len()
    );
    let _ = writeln!(out, "Rule: {}\n", cmp.tier.rule_description());
    for w in &cmp.warnings {
        let _ = writeln!(out, "- Note: {w}");
    }
    if !cmp.warnings.is_empty() {
        out.push('\n');
    }

    let nonfinite = cmp.first_nonfinite.lines();
    if !nonfinite.is_empty() {
        out.push_str(
            "**Non-finite values (NaN/inf) first appear** (forward order):

",
        );
        for l in &nonfinite {
            let _ = writeln!(out, "- {l}");
        }
        out.push('\n');
    }
    if let Some(f) = cmp.first_failure() {
        let cause = cmp.headline_cause(f);
        let _ = writeln!(
            out,
            "**First divergence:** `{}` ({}). Likely cause: {cause}.",
            f.name,
            f.status.label(),
        );
        if let Some(line) = element_line(f) {
            let _ = writeln!(out, "{line}");
        }
        if let Some(n) = &f.note {
            let _ = writeln!(out, "{n}.");
        }
        out.push('\n');
    }
    if let Some(w) = cmp.worst() {
        let ratio = w.tolerance_ratio().unwrap_or(0.0);
        let ratio = if ratio < 1e3 {
            format!("{ratio:.3}")
        } else {
            sci(ratio)
        };
        let _ = writeln!(
            out,
            "**Worst case** (largest distance relative to its tolerance): `{}`, {ratio}× its tolerance.",
            w.name,
        );
        let same = cmp.first_failure().is_some_and(|f| f.name == w.name);
        if same {
            out.push_str("(The first divergence, above.)\n");
        } else if let Some(line) = element_line(w) {
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
    }

    if let Some(l) = cmp.get("logits") {
        logits_table(out, level + 1, l);
    }
    per_layer_table(out, level + 1, cmp);
    if tensors {
        per_tensor_table(out, level + 1, cmp);
    }
}

/// "At [0, 3, 17] (flat 71): reference …, ours …, |diff| …; tolerance …".
pub(crate) fn element_line(t: &TensorComparison) -> Option<String> {
    let s = t.judged_stats()?;
    let against = t.tolerance.as_ref().map(|x| x.against);
    let expected = if against == Some(Against::Oracle) {
        "oracle"
    } else {
        "reference"
    };
    let tol = t
        .tolerance
        .as_ref()
        .map(|x| format!("; tolerance {} = {}", sci(x.threshold), x.explanation))
        .unwrap_or_default();
    let mut line = format!(
        "At index {:?} (flat {}): {expected} {}, ours {}, |diff| {}{tol}.",
        s.max_abs_position,
        s.max_abs_index,
        fmt_val(s.expected_at_max),
        fmt_val(s.actual_at_max),
        sci(s.max_abs)
    );
    if against == Some(Against::Oracle) {
        if let Some(r) = &t.ref_vs_oracle {
            let _ = write!(
                line,
                " The reference's own worst: {} at {:?}.",
                sci(r.max_abs),
                r.max_abs_position
            );
        }
    }
    Some(line)
}

fn logits_table(out: &mut String, level: usize, l: &TensorComparison) {
    let h = "#".repeat(level);
    let _ = writeln!(out, "{h} Logits\n");
    let rows: [(&str, Option<&LogitStats>, Option<f64>); 3] = [
        (
            "ours vs reference",
            l.logits.as_ref(),
            l.stats.as_ref().map(|s| s.max_abs),
        ),
        (
            "reference vs oracle",
            l.ref_vs_oracle_logits.as_ref(),
            l.ref_vs_oracle.as_ref().map(|s| s.max_abs),
        ),
        (
            "ours vs oracle",
            l.test_vs_oracle_logits.as_ref(),
            l.test_vs_oracle.as_ref().map(|s| s.max_abs),
        ),
    ];
    out.push_str(
        "| Comparison | Max abs | KL mean | KL max | Top-1 agreement | Top-5 overlap |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for (name, st, max_abs) in rows {
        let Some(st) = st else { continue };
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {:.4} | {:.4} |",
            max_abs.map_or("—".into(), sci),
            sci(st.kl_mean),
            sci(st.kl_max),
            st.top1_agreement,
            st.top5_agreement
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "KL(expected ‖ actual) of the softmax per position, in nats; top-5 overlap = mean |top5 ∩ top5| / 5 over positions."
    );
    if let Some(min) = l.tolerance.as_ref().and_then(|t| t.min_top1_agreement) {
        let _ = writeln!(
            out,
            "Required top-1 agreement of ours with the oracle: ≥ {min:.4} (the reference's minus 0.02, or minus one position when that is more)."
        );
    }
    out.push('\n');
}

fn per_layer_table(out: &mut String, level: usize, cmp: &TraceComparison) {
    let rows = cmp.per_layer();
    if rows.is_empty() {
        return;
    }
    let h = "#".repeat(level);
    let _ = writeln!(out, "{h} Per-layer error\n");
    let oracle = cmp.has_oracle;
    if oracle {
        out.push_str(
            "| Layer | Ours vs ref (max abs) | Worst tensor | Ref vs oracle (noise floor) | Ours vs oracle | Status |\n\
             |---:|---:|---|---:|---:|---|\n",
        );
    } else {
        out.push_str(
            "| Layer | Ours vs ref (max abs) | Worst tensor | Status |\n|---:|---:|---|---|\n",
        );
    }
    let worst = |r: &LayerError| match &r.worst_tensor {
        Some(t) => format!("`{t}`"),
        None => "— (identical)".to_string(),
    };
    for r in &rows {
        let status = if r.passed { "PASS" } else { "FAIL" };
        if oracle {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {status} |",
                r.layer,
                sci(r.ours_vs_ref),
                worst(r),
                r.ref_vs_oracle.map_or("—".into(), sci),
                r.ours_vs_oracle.map_or("—".into(), sci)
            );
        } else {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {status} |",
                r.layer,
                sci(r.ours_vs_ref),
                worst(r)
            );
        }
    }
    out.push('\n');
}

fn per_tensor_table(out: &mut String, level: usize, cmp: &TraceComparison) {
    let h = "#".repeat(level);
    let _ = writeln!(out, "{h} Per-tensor comparison (forward order)\n");
    let oracle = cmp.has_oracle;
    out.push_str("| Tensor | Shape | Max abs | Mean abs | Max rel | NMSE | Cosine |");
    if oracle {
        out.push_str(" Ref vs oracle | Ours vs oracle |");
    }
    out.push_str(" Tolerance | Status |\n|---|---|---:|---:|---:|---:|---:|");
    if oracle {
        out.push_str("---:|---:|");
    }
    out.push_str("---:|---|\n");
    let mut notes = Vec::new();
    for t in &cmp.tensors {
        let shape = t.shape().map(fmt_shape).unwrap_or_else(|| "—".into());
        let _ = write!(out, "| `{}` | {shape} |", t.name);
        match &t.stats {
            Some(s) => {
                let _ = write!(
                    out,
                    " {} | {} | {} | {} | {} |",
                    sci(s.max_abs),
                    sci(s.mean_abs),
                    sci(s.max_rel),
                    sci(s.nmse),
                    fmt_cos(s.cosine)
                );
            }
            None => out.push_str(" — | — | — | — | — |"),
        }
        if oracle {
            let _ = write!(
                out,
                " {} | {} |",
                t.ref_vs_oracle
                    .as_ref()
                    .map_or("—".into(), |s| sci(s.max_abs)),
                t.test_vs_oracle
                    .as_ref()
                    .map_or("—".into(), |s| sci(s.max_abs))
            );
        }
        let tol = match &t.tolerance {
            Some(x) if x.against == Against::Oracle => format!("{} (oracle)", sci(x.threshold)),
            Some(x) => sci(x.threshold),
            None => "—".into(),
        };
        let status = if t.status == Status::Pass {
            "PASS".to_string()
        } else {
            format!("**{}**", t.status.label())
        };
        let _ = writeln!(out, " {tol} | {status} |");
        if let Some(n) = &t.note {
            notes.push(format!("- `{}`: {n}", t.name));
        }
    }
    out.push('\n');
    if !notes.is_empty() {
        out.push_str("Notes:\n\n");
        for n in notes {
            let _ = writeln!(out, "{n}");
        }
        out.push('\n');
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn fmt_shape(s: &[usize]) -> String {
    format!("{s:?}")
}

fn fmt_ids(ids: &[i64]) -> String {
    const SHOW: usize = 24;
    let head: Vec<String> = ids.iter().take(SHOW).map(i64::to_string).collect();
    if ids.len() > SHOW {
        format!("[{}, … ({} more)]", head.join(", "), ids.len() - SHOW)
    } else {
        format!("[{}]", head.join(", "))
    }
}

fn fmt_val(x: f64) -> String {
    if x.is_finite() && x != 0.0 {
        format!("{x:.10e}")
    } else {
        sci(x)
    }
}

fn fmt_cos(c: f64) -> String {
    if c == 1.0 {
        "1".into()
    } else if c.is_finite() && c > 0.999 {
        format!("1 − {:.1e}", 1.0 - c)
    } else if c.is_finite() {
        format!("{c:.6}")
    } else {
        sci(c)
    }
}
