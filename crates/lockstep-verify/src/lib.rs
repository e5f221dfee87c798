//! lockstep-verify: proves, tensor by tensor, that a test trace (e.g. the Rust engine's) computes
//! what a reference trace (Hugging Face transformers) computes, and says where and why when it
//! does not.
//!
//! A trace (crate `lockstep_trace`) holds every intermediate tensor of one forward pass under
//! canonical names in forward order. This crate compares two of them, optionally with a third:
//! the *oracle*, a pure-float64 run of the reference on the same weights and tokens, which measures
//! how far the reference itself is from exact math. Each tensor is judged by the tolerance of the
//! traces' precision tier ([`tolerance`]): 1e-9 in f64, a small multiple of the reference's own
//! noise in f32, and no worse than twice the reference's distance from the oracle in bf16.
//! [`judge`](fn@judge) is that judgement in one call; the crate depends on `lockstep_trace` only:
//! the pipelines that produce traces (lockstep's engine, the Python reference) live in the CLI.
//!
//! ```no_run
//! use lockstep_trace::Trace;
//! use lockstep_verify::{compare_traces, report, TolerancePolicy};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let reference = Trace::read("ref.safetensors".as_ref())?;
//! let test = Trace::read("ours.safetensors".as_ref())?;
//! let oracle = Some(Trace::read("oracle.safetensors".as_ref())?);
//! let policy = TolerancePolicy::for_traces(&reference, &test, oracle.as_ref())?;
//! let cmp = compare_traces(&reference, &test, oracle.as_ref(), &policy);
//! println!("{}", cmp.verdict());
//! let inputs = [report::NamedComparison::new("prompt", cmp)];
//! let md = report::markdown(&inputs);
//! let js = report::json(&inputs);
//! let svg = report::svg_per_layer("max |difference| per layer", &inputs);
//! # let _ = (md, js, svg);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod compare;
pub mod endpoint;
pub mod html;
pub mod judge;
pub mod local;
pub mod near_tie;
pub mod nonfinite;
pub mod port;
pub mod port_weights;
pub mod report;
pub mod router;
pub mod stats;
pub mod tolerance;

pub use compare::{
    compare_stores, compare_tensors, compare_traces, likely_cause, policy_for_stores, Against,
    AppliedTolerance, LayerError, Status, StreamCompareError, TensorComparison, TraceComparison,
    Verdict,
};
pub use judge::{judge, overall_status, restrict, VerifyOutcome};
pub use local::{
    judge_local, judge_local_stored, LocalComparison, LocalRule, LocalSide, LocalStats,
    OpJudgement, OpStatus,
};
pub use port::{PortTrace, PortTraceError};
pub use report::{NamedComparison, Phase, PhaseStatus, StepTime};
pub use stats::{DiffStats, LogitStats};
pub use tolerance::{Bound, PolicyError, Tier, Tolerance, TolerancePolicy};

#[cfg(test)]
mod endpoint_tests;
#[cfg(test)]
mod nonfinite_tests;
#[cfg(test)]
#[path = "report_tests.rs"]
mod report_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
#[path = "tier_tests.rs"]
mod tier_tests;
