//! The judgement every pipeline shares: one trace against the reference (and the f64 oracle) in
//! one precision tier, a comparison restricted to some tensors, and the outcome of a phased run.
//!
//! The pipelines that *produce* traces (lockstep's engine, another port's files, the Python
//! reference) live in the CLI's harness; this crate only judges what they produce.

use crate::compare::{compare_traces, Status, TraceComparison};
use crate::report::{NamedComparison, Phase, PhaseStatus};
use crate::tolerance::{PolicyError, Tier, TolerancePolicy};
use lockstep_trace::Trace;

/// Judges `test` against `reference` in `tier`: the tolerance policy of that tier (with the
/// pure-f64 `oracle` measuring the reference's own error, required below f64), then the tensor by
/// tensor comparison.
pub fn judge(
    reference: &Trace,
    test: &Trace,
    oracle: Option<&Trace>,
    tier: Tier,
) -> Result<TraceComparison, PolicyError> {
    let policy = TolerancePolicy::for_traces_with_tier(reference, test, oracle, Some(tier))?;
    Ok(compare_traces(reference, test, oracle, &policy))
}

/// The same comparison restricted to the tensors `keep` accepts (verdict and first divergence
/// recomputed). One that keeps no tensor besides `tokens` compared nothing, and does not pass.
pub fn restrict(c: &NamedComparison, keep: &dyn Fn(&str) -> bool) -> NamedComparison {
    let mut cmp = c.comparison.clone();
    cmp.tensors.retain(|t| keep(&t.name));
    let judged = cmp.tensors.iter().any(|t| t.name != "tokens");
    if !judged {
        cmp.warnings.push("no tensors to compare".into());
    }
    cmp.first_divergence = cmp
        .tensors
        .iter()
        .find(|t| t.status.is_failure())
        .map(|t| t.name.clone());
    cmp.passed = judged
        && cmp.tensors.iter().all(|t| !t.status.is_failure())
        && !cmp.tensors.iter().any(|t| t.status == Status::Unjudged);
    NamedComparison::new(c.label.clone(), cmp)
}

/// The overall status of phases: `FAIL` when one failed, `PASS with N phase(s) skipped` when some
/// did not run, else `PASS` (`FAIL` as well when there are no phases).
pub fn overall_status(phases: &[Phase]) -> String {
    let skipped = phases
        .iter()
        .filter(|p| p.status == PhaseStatus::Skip)
        .count();
    if phases.is_empty() || phases.iter().any(|p| p.status == PhaseStatus::Fail) {
        "FAIL".into()
    } else if skipped == 0 {
        "PASS".into()
    } else {
        format!(
            "PASS with {skipped} phase{} skipped",
            if skipped == 1 { "" } else { "s" }
        )
    }
}

/// The outcome of a phased verification: the phases in order, and the full per-input
/// comparisons of each tier (for plots and JSON).
#[derive(Debug)]
pub struct VerifyOutcome {
    /// Phases in order.
    pub phases: Vec<Phase>,
    /// Full comparisons per tier.
    pub full: Vec<(Tier, Vec<NamedComparison>)>,
    /// True when no phase failed.
    pub passed: bool,
    /// Op-level judgements per tier (each op on the test's own inputs), where they ran.
    pub local: Vec<(Tier, Vec<crate::local::NamedLocal>)>,
    /// Wall-clock time per step of the run, in order (empty when not timed).
    pub timings: Vec<crate::report::StepTime>,
}

impl VerifyOutcome {
    /// The outcome of these phases: passed when none failed.
    pub fn new(phases: Vec<Phase>, full: Vec<(Tier, Vec<NamedComparison>)>) -> Self {
        let passed = phases.iter().all(|p| p.status != PhaseStatus::Fail);
        VerifyOutcome {
            phases,
            full,
            passed,
            local: vec![],
            timings: vec![],
        }
    }

    /// The same outcome with its op-level judgements.
    pub fn with_local(mut self, local: Vec<(Tier, Vec<crate::local::NamedLocal>)>) -> Self {
        self.local = local;
        self
    }

    /// The same outcome with the time each step took.
    pub fn with_timings(mut self, timings: Vec<crate::report::StepTime>) -> Self {
        self.timings = timings;
        self
    }

    /// Where a difference is first *made*: the earliest (forward order) first failing op of the
    /// op-level judgements, else the earliest end-to-end first divergence.
    pub fn first_divergence(&self) -> Option<String> {
        let earliest = |names: Vec<String>| {
            names
                .into_iter()
                .min_by_key(|n| lockstep_trace::forward_rank(n))
        };
        let made: Vec<String> = self
            .local
            .iter()
            .flat_map(|(_, v)| v.iter())
            .filter_map(|l| l.local.first_divergence.clone())
            .collect();
        if !made.is_empty() {
            return earliest(made);
        }
        earliest(
            self.full
                .iter()
                .flat_map(|(_, v)| v.iter())
                .filter_map(|c| c.comparison.first_divergence.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report;
    use lockstep_trace::TensorData;

    fn trace(logits: &[f64]) -> Trace {
        let mut t = Trace::new();
        t.insert("tokens", vec![1, 2], TensorData::I64(vec![5, 7]))
            .unwrap();
        t.insert("logits", vec![1, 2, 2], TensorData::F64(logits.to_vec()))
            .unwrap();
        t.metadata.insert("dtype".into(), "f64".into());
        t
    }

    fn comparison() -> NamedComparison {
        let r = trace(&[1.0, 2.0, 3.0, 4.0]);
        let cmp = judge(&r, &r.clone(), None, Tier::F64).unwrap();
        assert!(cmp.passed);
        NamedComparison::new("input", cmp)
    }

    #[test]
    fn a_restriction_that_keeps_nothing_does_not_pass() {
        let c = comparison();
        let logits = restrict(&c, &|n| n == "tokens" || n == "logits");
        assert!(logits.comparison.passed);
        // e.g. "attention weights" of a trace without attention probabilities.
        let nothing = restrict(&c, &|n| n == "tokens" || n.ends_with(".attn_probs"));
        assert!(!nothing.comparison.passed);
        assert!(nothing
            .comparison
            .warnings
            .iter()
            .any(|w| w == "no tensors to compare"));
        let phase = Phase::from_comparisons("attention weights [f64]", vec![nothing]);
        assert_eq!(phase.status, PhaseStatus::Fail);
        assert_eq!(
            Phase::from_comparisons("empty", vec![]).status,
            PhaseStatus::Fail
        );
    }

    #[test]
    fn skipped_phases_show_as_skip_and_in_the_overall_line() {
        let phases = vec![
            Phase::pass("tokenization", "ok"),
            Phase::skip("weights", "no fingerprint"),
            Phase::from_comparisons("layer-by-layer [f64]", vec![comparison()]),
            Phase::skip("KV-cache decode [f64]", "no multi-token input"),
        ];
        assert_eq!(overall_status(&phases), "PASS with 2 phases skipped");
        assert_eq!(overall_status(&phases[..2]), "PASS with 1 phase skipped");
        assert_eq!(overall_status(&phases[..1]), "PASS");
        assert_eq!(overall_status(&[]), "FAIL");
        let mut failed = phases.clone();
        failed.push(Phase::fail("greedy generation [f32]", "differs"));
        assert_eq!(overall_status(&failed), "FAIL");
        let md = report::phased_markdown("t", "m", &phases);
        assert!(
            md.contains("**Overall: PASS with 2 phases skipped**"),
            "{md}"
        );
        assert!(md.contains("| 2 | weights | **SKIP** |"), "{md}");
        let outcome = VerifyOutcome::new(phases, vec![]);
        assert!(outcome.passed);
    }
}
