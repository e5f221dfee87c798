//! The JSON reports: one comparison ([`json`], [`json_value`]) or the phased `lockstep verify`
//! report ([`phased_json`], [`VerifyReport`]), each written from a [`Serialize`] struct whose
//! fields are the keys, in order. docs/report-schema.md documents them; a file says which
//! layout it has in its top-level `schema_version` ([`SCHEMA_VERSION`]).

use serde::Serialize;
use serde_json::Value;

use super::{overall_verdict, NamedComparison, Phase, PhaseStatus, StepTime};
use crate::compare::{failure_cause, likely_cause, LayerError, Status, TensorComparison};
use crate::nonfinite::{FirstNonFinite, NonFiniteSite};

/// The layout of the JSON reports: bump it when a key is renamed, removed or changes meaning
/// (adding a key keeps it), and say what changed in docs/report-schema.md.
pub const SCHEMA_VERSION: u32 = 1;

/// A report as written to a file: `schema_version` first, then the report's own keys.
#[derive(Debug, Clone, Serialize)]
pub struct Versioned<T> {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The report.
    #[serde(flatten)]
    pub report: T,
}

impl<T: Serialize> Versioned<T> {
    /// `report` stamped with the current [`SCHEMA_VERSION`].
    pub fn new(report: T) -> Self {
        Versioned {
            schema_version: SCHEMA_VERSION,
            report,
        }
    }

    /// Pretty-printed JSON (non-finite numbers as null).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into())
    }
}

/// The comparison of one or more inputs (`lockstep compare --json`, and each phase's
/// `comparisons` in the verify report).
#[derive(Debug, Clone, Serialize)]
pub struct ComparisonReport<'a> {
    /// Every input passed (false when there is none).
    pub passed: bool,
    /// `f64`, `f32` or `bf16`; `mixed` when the inputs were judged in different tiers; null
    /// when there is no input.
    pub tier: Option<&'static str>,
    /// The first failing input's first failing tensor.
    pub first_divergence: Option<String>,
    /// The first input's non-finite sites that holds any (per side).
    pub first_nonfinite: Option<&'a FirstNonFinite>,
    /// One line saying how it went.
    pub verdict: String,
    /// One summary per input.
    pub inputs: Vec<InputSummary<'a>>,
    /// Every per-tensor record of every input.
    pub tensors: Vec<TensorRecord<'a>>,
}

/// One input's summary in a [`ComparisonReport`].
#[derive(Debug, Clone, Serialize)]
pub struct InputSummary<'a> {
    /// The input's label.
    pub label: &'a str,
    /// Every tensor of it passed.
    pub passed: bool,
    /// The tier it was judged in.
    pub tier: &'static str,
    /// Its first failing tensor in forward order.
    pub first_divergence: &'a Option<String>,
    /// Where the reference first holds a NaN/inf.
    pub first_nonfinite_reference: &'a Option<NonFiniteSite>,
    /// Where the test first holds a NaN/inf.
    pub first_nonfinite_test: &'a Option<NonFiniteSite>,
    /// Where the oracle first holds a NaN/inf.
    pub first_nonfinite_oracle: &'a Option<NonFiniteSite>,
    /// One line saying how it went.
    pub verdict: String,
    /// Its number of tokens (null when the traces do not say).
    pub tokens: Option<usize>,
    /// Its token ids (when the traces record them).
    pub token_ids: &'a Option<Vec<i64>>,
    /// Whether an oracle trace took part.
    pub has_oracle: bool,
    /// The reference's `producer` metadata.
    pub reference_producer: &'a Option<String>,
    /// The test's `producer` metadata.
    pub test_producer: &'a Option<String>,
    /// The oracle's `producer` metadata.
    pub oracle_producer: &'a Option<String>,
    /// Anything worth saying about the comparison as a whole.
    pub warnings: &'a [String],
    /// The per-layer table.
    pub per_layer: Vec<LayerError>,
}

/// One tensor's record: the [`TensorComparison`] fields, then the input and likely cause.
#[derive(Debug, Clone, Serialize)]
pub struct TensorRecord<'a> {
    /// The comparison.
    #[serde(flatten)]
    pub tensor: &'a TensorComparison,
    /// The label of the input it belongs to.
    pub input: &'a str,
    /// What a failure here most likely means.
    pub likely_cause: String,
}

/// The comparison report of `inputs`.
pub fn comparison_report(inputs: &[NamedComparison]) -> ComparisonReport<'_> {
    let tier = inputs.first().map(|f| {
        if inputs
            .iter()
            .all(|c| c.comparison.tier == f.comparison.tier)
        {
            f.comparison.tier.as_str()
        } else {
            "mixed"
        }
    });
    let summaries = inputs
        .iter()
        .map(|c| {
            let cmp = &c.comparison;
            InputSummary {
                label: &c.label,
                passed: cmp.passed,
                tier: cmp.tier.as_str(),
                first_divergence: &cmp.first_divergence,
                first_nonfinite_reference: &cmp.first_nonfinite.reference,
                first_nonfinite_test: &cmp.first_nonfinite.test,
                first_nonfinite_oracle: &cmp.first_nonfinite.oracle,
                verdict: cmp.verdict().to_string(),
                tokens: cmp.num_tokens(),
                token_ids: &cmp.token_ids,
                has_oracle: cmp.has_oracle,
                reference_producer: &cmp.reference_producer,
                test_producer: &cmp.test_producer,
                oracle_producer: &cmp.oracle_producer,
                warnings: &cmp.warnings,
                per_layer: cmp.per_layer(),
            }
        })
        .collect();
    let tensors = inputs
        .iter()
        .flat_map(|c| {
            c.comparison.tensors.iter().map(move |t| TensorRecord {
                tensor: t,
                input: &c.label,
                likely_cause: if t.status == Status::NonFinite {
                    failure_cause(t)
                } else {
                    likely_cause(&t.name).to_string()
                },
            })
        })
        .collect();
    ComparisonReport {
        passed: !inputs.is_empty() && inputs.iter().all(|c| c.comparison.passed),
        tier,
        first_divergence: inputs
            .iter()
            .find_map(|c| c.comparison.first_divergence.clone()),
        first_nonfinite: inputs
            .iter()
            .map(|c| &c.comparison.first_nonfinite)
            .find(|f| f.any()),
        verdict: overall_verdict(inputs),
        inputs: summaries,
        tensors,
    }
}

/// The comparison report as a value (no `schema_version`: see [`json`]). Non-finite numbers
/// are null.
pub fn json_value(inputs: &[NamedComparison]) -> Value {
    serde_json::to_value(comparison_report(inputs)).unwrap_or(Value::Null)
}

/// The comparison report as a file: [`comparison_report`] with `schema_version`, pretty-printed.
pub fn json(inputs: &[NamedComparison]) -> String {
    Versioned::new(comparison_report(inputs)).to_json()
}

/// The phased `lockstep verify` report.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport<'a> {
    /// The report's title.
    pub title: &'a str,
    /// One line describing the model.
    pub model: &'a str,
    /// No phase failed (false when there is none).
    pub passed: bool,
    /// `PASS`, `FAIL` or `PASS with N phase(s) skipped`.
    pub status: String,
    /// The earliest failing tensor in forward order over every phase; with [`OpLevel`], where a
    /// difference is first made when an op-level check found one.
    pub first_divergence: Option<String>,
    /// Every phase, in order.
    pub phases: Vec<PhaseRecord<'a>>,
    /// The op-level judgements, when they ran.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub op_level: Option<OpLevel>,
    /// Wall-clock seconds per step of the run, in order (absent when not timed).
    #[serde(skip_serializing_if = "<[StepTime]>::is_empty")]
    pub timings: &'a [StepTime],
}

/// One phase of a [`VerifyReport`].
#[derive(Debug, Clone, Serialize)]
pub struct PhaseRecord<'a> {
    /// The phase's name.
    pub name: &'a str,
    /// `pass`, `fail` or `skip`.
    pub status: PhaseStatus,
    /// One line saying what was checked and how it went.
    pub summary: &'a str,
    /// Markdown details.
    pub details: &'a Option<String>,
    /// Its comparisons (null when it has none).
    pub comparisons: Option<ComparisonReport<'a>>,
}

/// The op-level part of a [`VerifyReport`].
#[derive(Debug, Clone, Serialize)]
pub struct OpLevel {
    /// The end-to-end first divergence (what `first_divergence` says without op-level checks).
    pub first_divergence_end_to_end: Option<String>,
    /// The op-level judgements per tier (see `local::local_json`).
    pub op_level: Value,
}

/// The phased report of `phases` (no op-level part).
pub fn verify_report<'a>(title: &'a str, model: &'a str, phases: &'a [Phase]) -> VerifyReport<'a> {
    // The earliest failing tensor in forward order over every phase (phases restricted to the
    // logits would otherwise hide an earlier divergence found layer by layer).
    let first_divergence = phases
        .iter()
        .flat_map(|p| &p.comparisons)
        .filter_map(|c| c.comparison.first_divergence.clone())
        .min_by_key(|n| lockstep_trace::forward_rank(n));
    VerifyReport {
        title,
        model,
        passed: !phases.is_empty() && phases.iter().all(|p| p.status != PhaseStatus::Fail),
        status: crate::judge::overall_status(phases),
        first_divergence,
        phases: phases
            .iter()
            .map(|p| PhaseRecord {
                name: &p.name,
                status: p.status,
                summary: &p.summary,
                details: &p.details,
                comparisons: (!p.comparisons.is_empty()).then(|| comparison_report(&p.comparisons)),
            })
            .collect(),
        op_level: None,
        timings: &[],
    }
}

/// The whole verify report as pretty JSON with `schema_version` ([`verify_report`]).
pub fn phased_json(title: &str, model: &str, phases: &[Phase]) -> String {
    Versioned::new(verify_report(title, model, phases)).to_json()
}
