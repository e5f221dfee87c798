//! Rendering comparisons: Markdown reports, JSON, and a hand-written SVG plot of the per-layer
//! error. Every function returns a `String`; writing files is the caller's job.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{json, Value};

use crate::compare::{
    failure_cause, likely_cause, sci, Against, LayerError, Status, TensorComparison,
    TraceComparison, Verdict,
};
use crate::stats::LogitStats;

/// One trace comparison with the label it is reported under (an input prompt, a phase step).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedComparison {
    /// The label, e.g. the prompt's name.
    pub label: String,
    /// The comparison.
    pub comparison: TraceComparison,
}

impl NamedComparison {
    /// Labels a comparison.
    pub fn new(label: impl Into<String>, comparison: TraceComparison) -> Self {
        Self {
            label: label.into(),
            comparison,
        }
    }
}

/// Outcome of one phase of `lockstep verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseStatus {
    /// The phase passed.
    Pass,
    /// The phase failed.
    Fail,
    /// The phase was not run (say why in the summary).
    Skip,
}

impl PhaseStatus {
    /// `PASS`, `FAIL` or `SKIP`.
    pub fn label(self) -> &'static str {
        match self {
            PhaseStatus::Pass => "PASS",
            PhaseStatus::Fail => "FAIL",
            PhaseStatus::Skip => "SKIP",
        }
    }
}

/// One phase of the verify report: "tokenization", "weights", "single-token forward",
/// "multi-token forward", "layer-by-layer", "attention weights", ...
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Phase {
    /// The phase's name.
    pub name: String,
    /// Pass, fail or skipped.
    pub status: PhaseStatus,
    /// One line saying what was checked and how it went.
    pub summary: String,
    /// Optional Markdown shown under the summary (tables, lists...).
    pub details: Option<String>,
    /// Trace comparisons belonging to the phase, rendered in full.
    pub comparisons: Vec<NamedComparison>,
}

impl Phase {
    /// A phase with the given outcome and summary line.
    pub fn new(name: impl Into<String>, status: PhaseStatus, summary: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status,
            summary: summary.into(),
            details: None,
            comparisons: Vec::new(),
        }
    }

    /// A passed phase.
    pub fn pass(name: impl Into<String>, summary: impl Into<String>) -> Self {
        Self::new(name, PhaseStatus::Pass, summary)
    }

    /// A failed phase.
    pub fn fail(name: impl Into<String>, summary: impl Into<String>) -> Self {
        Self::new(name, PhaseStatus::Fail, summary)
    }

    /// A phase that was not run.
    pub fn skip(name: impl Into<String>, summary: impl Into<String>) -> Self {
        Self::new(name, PhaseStatus::Skip, summary)
    }

    /// A phase made of trace comparisons: it passes when all of them pass; the summary line
    /// gives the count and the verdict (the first failing input's, if any).
    pub fn from_comparisons(name: impl Into<String>, comparisons: Vec<NamedComparison>) -> Self {
        let passed = comparisons.iter().all(|c| c.comparison.passed) && !comparisons.is_empty();
        let n = comparisons.len();
        let ok = comparisons.iter().filter(|c| c.comparison.passed).count();
        let summary = format!(
            "{ok}/{n} input(s) pass; verdict: {}",
            overall_verdict(&comparisons)
        );
        Self {
            name: name.into(),
            status: if passed {
                PhaseStatus::Pass
            } else {
                PhaseStatus::Fail
            },
            summary,
            details: None,
            comparisons,
        }
    }

    /// Adds Markdown details.
    pub fn with_details(mut self, markdown: impl Into<String>) -> Self {
        self.details = Some(markdown.into());
        self
    }

    /// Adds a trace comparison.
    pub fn with_comparison(mut self, c: NamedComparison) -> Self {
        self.comparisons.push(c);
        self
    }
}

/// The verdict over several inputs, as one line: the first failing input's bug verdict (prefixed
/// with its label when there are several), else "inconclusive" if any is, else "match" when all
/// match, else "rounding drift within noise".
pub fn overall_verdict(inputs: &[NamedComparison]) -> String {
    if inputs.is_empty() {
        return "inconclusive: nothing was compared".into();
    }
    let verdicts: Vec<Verdict> = inputs.iter().map(|c| c.comparison.verdict()).collect();
    let pick = |f: fn(&Verdict) -> bool| {
        inputs
            .iter()
            .zip(&verdicts)
            .find(|(_, v)| f(v))
            .map(|(c, v)| {
                if inputs.len() > 1 {
                    format!("{v} (input {})", c.label)
                } else {
                    v.to_string()
                }
            })
    };
    if let Some(s) = pick(|v| matches!(v, Verdict::Bug { .. })) {
        return s;
    }
    if let Some(s) = pick(|v| matches!(v, Verdict::Inconclusive { .. })) {
        return s;
    }
    if verdicts.iter().all(|v| *v == Verdict::Match) {
        Verdict::Match.to_string()
    } else {
        Verdict::DriftWithinNoise.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Markdown

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
        comparison_section(&mut out, 2, c);
    }
    out
}

/// Renders the whole `lockstep verify` report: title, model description, the overall result, a
/// summary table of the phases (PASS/FAIL/SKIP), then each phase's section with its summary,
/// details and trace comparisons.
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
            comparison_section(&mut out, 3, c);
        }
    }
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

/// One input's full section at heading level `level`.
fn comparison_section(out: &mut String, level: usize, c: &NamedComparison) {
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
        let cause = if f.status == Status::NonFinite {
            cmp.cause_of(f)
        } else {
            likely_cause(&f.name).to_string()
        };
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
    per_tensor_table(out, level + 1, cmp);
}

/// "At [0, 3, 17] (flat 71): reference …, ours …, |diff| …; tolerance …".
fn element_line(t: &TensorComparison) -> Option<String> {
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
            "Required top-1 agreement of ours with the oracle: ≥ {min:.4} (the reference's minus 0.02)."
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

// ---------------------------------------------------------------------------------------------
// JSON

/// The JSON report as a value: top-level `passed` (bool), `tier` (`"f64"`/`"f32"`/`"bf16"`,
/// `"mixed"` when inputs differ, null when none), `first_divergence` (the first failing input's
/// first failing tensor, or null), `first_nonfinite` (the first input's that holds any: per
/// side, where NaN/inf first appear, or null), `verdict` (string), `inputs` (one summary per
/// input, with its per-layer table, warnings and `first_nonfinite_reference`/`_test`/`_oracle`)
/// and `tensors` (every per-tensor record, each tagged with its `input` label and
/// `likely_cause`). Non-finite numbers are written as null.
pub fn json_value(inputs: &[NamedComparison]) -> Value {
    let passed = !inputs.is_empty() && inputs.iter().all(|c| c.comparison.passed);
    let first_divergence = inputs
        .iter()
        .find_map(|c| c.comparison.first_divergence.clone());
    let tier = match inputs.first() {
        None => Value::Null,
        Some(f)
            if inputs
                .iter()
                .all(|c| c.comparison.tier == f.comparison.tier) =>
        {
            json!(f.comparison.tier)
        }
        Some(_) => json!("mixed"),
    };
    let summaries: Vec<Value> = inputs
        .iter()
        .map(|c| {
            let cmp = &c.comparison;
            json!({
                "label": c.label,
                "passed": cmp.passed,
                "tier": cmp.tier,
                "first_divergence": cmp.first_divergence,
                "first_nonfinite_reference": cmp.first_nonfinite.reference,
                "first_nonfinite_test": cmp.first_nonfinite.test,
                "first_nonfinite_oracle": cmp.first_nonfinite.oracle,
                "verdict": cmp.verdict().to_string(),
                "tokens": cmp.num_tokens(),
                "token_ids": cmp.token_ids,
                "has_oracle": cmp.has_oracle,
                "reference_producer": cmp.reference_producer,
                "test_producer": cmp.test_producer,
                "oracle_producer": cmp.oracle_producer,
                "warnings": cmp.warnings,
                "per_layer": cmp.per_layer(),
            })
        })
        .collect();
    let tensors: Vec<Value> = inputs
        .iter()
        .flat_map(|c| {
            c.comparison.tensors.iter().map(move |t| {
                let mut v = serde_json::to_value(t).unwrap_or(Value::Null);
                if let Value::Object(m) = &mut v {
                    m.insert("input".into(), json!(c.label));
                    let cause = if t.status == Status::NonFinite {
                        failure_cause(t)
                    } else {
                        likely_cause(&t.name).to_string()
                    };
                    m.insert("likely_cause".into(), json!(cause));
                }
                v
            })
        })
        .collect();
    json!({
        "passed": passed,
        "tier": tier,
        "first_divergence": first_divergence,
        "first_nonfinite": inputs
            .iter()
            .map(|c| &c.comparison.first_nonfinite)
            .find(|f| f.any()),
        "verdict": overall_verdict(inputs),
        "inputs": summaries,
        "tensors": tensors,
    })
}

/// [`json_value`] pretty-printed.
pub fn json(inputs: &[NamedComparison]) -> String {
    serde_json::to_string_pretty(&json_value(inputs)).unwrap_or_else(|_| "{}".into())
}

/// The whole verify report as pretty JSON: `title`, `model`, `passed` (no phase failed),
/// `first_divergence` (the earliest failing tensor in forward order, or null) and `phases`, each with
/// `name`, `status`, `summary`, `details` and its comparisons rendered as [`json_value`].
pub fn phased_json(title: &str, model: &str, phases: &[Phase]) -> String {
    let passed = !phases.is_empty() && phases.iter().all(|p| p.status != PhaseStatus::Fail);
    // The earliest failing tensor in forward order over every phase (phases restricted to the
    // logits would otherwise hide an earlier divergence found layer by layer).
    let first_divergence = phases
        .iter()
        .flat_map(|p| &p.comparisons)
        .filter_map(|c| c.comparison.first_divergence.clone())
        .min_by_key(|n| lockstep_trace::forward_rank(n));
    let v = json!({
        "title": title,
        "model": model,
        "passed": passed,
        "first_divergence": first_divergence,
        "phases": phases.iter().map(|p| json!({
            "name": p.name,
            "status": p.status,
            "summary": p.summary,
            "details": p.details,
            "comparisons": if p.comparisons.is_empty() { Value::Null } else { json_value(&p.comparisons) },
        })).collect::<Vec<_>>(),
    });
    serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into())
}

// ---------------------------------------------------------------------------------------------
// SVG

/// One plotted line: legend name, colour, extra stroke attributes, (layer, value) points.
type Series = (&'static str, &'static str, &'static str, Vec<(usize, f64)>);

/// Per-layer maxima over several inputs (each series the max over inputs at that layer).
fn merged_layers(inputs: &[NamedComparison]) -> Vec<LayerError> {
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
        (
            "ours vs reference",
            "#d62728",
            "",
            rows.iter().map(|r| (r.layer, r.ours_vs_ref)).collect(),
        ),
        (
            "reference vs oracle (noise floor)",
            "#1f77b4",
            " stroke-dasharray=\"6 4\"",
            rows.iter()
                .filter_map(|r| r.ref_vs_oracle.map(|v| (r.layer, v)))
                .collect(),
        ),
        (
            "ours vs oracle",
            "#2ca02c",
            " stroke-dasharray=\"2 3\"",
            rows.iter()
                .filter_map(|r| r.ours_vs_oracle.map(|v| (r.layer, v)))
                .collect(),
        ),
    ])
    .filter(|s| !s.3.is_empty())
    .collect();
    let legend_w = 60.0
        + 7.0
            * series
                .iter()
                .map(|s| s.0.chars().count())
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
        .flat_map(|s| s.3.iter().map(|p| p.1))
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
    for (name, color, dash, pts) in &series {
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
    for (i, (name, color, dash, _)) in series.iter().enumerate() {
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
