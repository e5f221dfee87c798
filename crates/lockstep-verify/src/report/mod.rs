//! Rendering comparisons: Markdown reports ([`markdown`]), JSON ([`json`]) and a hand-written
//! SVG plot of the per-layer error (`svg`); the self-contained HTML report is [`crate::html`].
//! Every function returns a `String`; writing files is the caller's job.

use serde::Serialize;

use crate::compare::{TraceComparison, Verdict};

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

/// The wall-clock time of one step of a verification (a progress step: loading the model, a
/// phase, the reference's run), for the report's "where the time went" table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepTime {
    /// The step, as the progress line named it.
    pub step: String,
    /// Seconds from the start of this step to the start of the next (or the end).
    pub seconds: f64,
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

mod json;
mod markdown;
mod svg;

pub use json::{
    comparison_report, json, json_value, phased_json, verify_report, ComparisonReport,
    InputSummary, OpLevel, PhaseRecord, TensorRecord, VerifyReport, Versioned, SCHEMA_VERSION,
};
pub(crate) use markdown::element_line;
pub use markdown::{markdown, phased_markdown, timings_markdown};
pub(crate) use svg::merged_layers;
pub use svg::svg_per_layer;
