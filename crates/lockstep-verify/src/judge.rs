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
/// recomputed).
pub fn restrict(c: &NamedComparison, keep: &dyn Fn(&str) -> bool) -> NamedComparison {
    let mut cmp = c.comparison.clone();
    cmp.tensors.retain(|t| keep(&t.name));
    cmp.first_divergence = cmp
        .tensors
        .iter()
        .find(|t| t.status.is_failure())
        .map(|t| t.name.clone());
    cmp.passed = cmp.tensors.iter().all(|t| !t.status.is_failure())
        && !cmp.tensors.iter().any(|t| t.status == Status::Unjudged);
    NamedComparison::new(c.label.clone(), cmp)
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
}

impl VerifyOutcome {
    /// The outcome of these phases: passed when none failed.
    pub fn new(phases: Vec<Phase>, full: Vec<(Tier, Vec<NamedComparison>)>) -> Self {
        let passed = phases.iter().all(|p| p.status != PhaseStatus::Fail);
        VerifyOutcome {
            phases,
            full,
            passed,
        }
    }
}
