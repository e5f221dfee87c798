//! The JSON reports: one comparison ([`json`], [`json_value`]) or the phased `lockstep verify`
//! report ([`phased_json`]).

use serde_json::{json, Value};

use super::{overall_verdict, NamedComparison, Phase, PhaseStatus};
use crate::compare::{failure_cause, likely_cause, Status};

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
/// `status` (the overall status line: `PASS`, `FAIL` or `PASS with N phase(s) skipped`),
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
        "status": crate::judge::overall_status(phases),
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
