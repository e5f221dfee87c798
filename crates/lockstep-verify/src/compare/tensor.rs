//! One tensor's comparison: its status, the tolerance applied and the statistics behind it.

use std::fmt;

use lockstep_trace::{TapName, TraceTensor};
use serde::Serialize;

use crate::nonfinite::NonFiniteCounts;
use crate::stats::{diff_stats_fused, logit_stats_fused, DiffStats, LogitStats, StoredValues};
use crate::tolerance::{bf16_half_ulp, finite_noise, Tolerance};

/// The verdict on one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Within tolerance.
    Pass,
    /// Beyond tolerance.
    Fail,
    /// NaN or infinity on either side (test, reference, or the oracle when the tier's rule uses
    /// it): never equal, never within tolerance. [`TensorComparison::nonfinite`] says which side.
    NonFinite,
    /// The two sides' shapes differ.
    ShapeMismatch,
    /// The tensor is in one trace only.
    Missing,
    /// The token ids differ (reference vs test, or reference vs oracle).
    TokenMismatch,
    /// The tier's rule needs the oracle's copy of this tensor and there is none.
    Unjudged,
}

impl Status {
    /// True for every status that means the test does not compute what the reference does.
    /// [`Status::Unjudged`] is not a failure, but it is not a pass either.
    pub fn is_failure(self) -> bool {
        !matches!(self, Status::Pass | Status::Unjudged)
    }

    /// Upper-case label for reports: `PASS`, `FAIL`, `NON-FINITE`, ...
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::NonFinite => "NON-FINITE",
            Status::ShapeMismatch => "SHAPE MISMATCH",
            Status::Missing => "MISSING",
            Status::TokenMismatch => "TOKEN MISMATCH",
            Status::Unjudged => "UNJUDGED",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Which distance a tolerance judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Against {
    /// `max|ours − ref|`.
    Reference,
    /// `max|ours − oracle|`.
    Oracle,
}

/// The tolerance actually applied to one tensor: the rule resolved into numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppliedTolerance {
    /// The rule.
    pub rule: Tolerance,
    /// Which distance was judged.
    pub against: Against,
    /// The judged distance (max abs).
    pub measured: f64,
    /// The threshold it must not exceed.
    pub threshold: f64,
    /// The rule with its numbers filled in, e.g. `max(3 × 4.1e-06, 7.6e-06)`.
    pub explanation: String,
    /// On bf16 logits: the least top-1 agreement with the oracle that passes.
    pub min_top1_agreement: Option<f64>,
}

impl AppliedTolerance {
    /// `measured / threshold` (∞ when the threshold is 0 and the distance is not).
    pub fn ratio(&self) -> f64 {
        if self.measured == 0.0 {
            0.0
        } else if self.threshold > 0.0 {
            self.measured / self.threshold
        } else {
            f64::INFINITY
        }
    }
}

/// The comparison of one tensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorComparison {
    /// Canonical name, e.g. `layers.3.k`.
    pub name: String,
    /// The verdict.
    pub status: Status,
    /// The reference's shape (`None` when absent there).
    pub ref_shape: Option<Vec<usize>>,
    /// The test's shape (`None` when absent there).
    pub test_shape: Option<Vec<usize>>,
    /// Ours against the reference (expected = reference, actual = ours).
    pub stats: Option<DiffStats>,
    /// The reference against the oracle (expected = oracle): the reference's own noise.
    pub ref_vs_oracle: Option<DiffStats>,
    /// Ours against the oracle (expected = oracle).
    pub test_vs_oracle: Option<DiffStats>,
    /// On `logits`: ours against the reference (KL(ref ‖ ours), top-k agreement).
    pub logits: Option<LogitStats>,
    /// On `logits`: the reference against the oracle (KL(oracle ‖ ref)).
    pub ref_vs_oracle_logits: Option<LogitStats>,
    /// On `logits`: ours against the oracle (KL(oracle ‖ ours)).
    pub test_vs_oracle_logits: Option<LogitStats>,
    /// The tolerance applied (`None` when nothing could be judged).
    pub tolerance: Option<AppliedTolerance>,
    /// Non-finite values (NaN/±∞) on each side, when there are any (`None`: all finite). Any
    /// makes the status [`Status::NonFinite`].
    pub nonfinite: Option<NonFiniteCounts>,
    /// Anything else worth saying about this tensor.
    pub note: Option<String>,
}

impl TensorComparison {
    pub(super) fn add_note(&mut self, note: impl Into<String>) {
        let note = note.into();
        self.note = Some(match self.note.take() {
            Some(prev) => format!("{prev}; {note}"),
            None => note,
        });
    }

    pub(super) fn bare(name: &str, status: Status) -> Self {
        Self {
            name: name.to_string(),
            status,
            ref_shape: None,
            test_shape: None,
            stats: None,
            ref_vs_oracle: None,
            test_vs_oracle: None,
            logits: None,
            ref_vs_oracle_logits: None,
            test_vs_oracle_logits: None,
            tolerance: None,
            nonfinite: None,
            note: None,
        }
    }

    /// The shape (the reference's, else the test's).
    pub fn shape(&self) -> Option<&[usize]> {
        self.ref_shape.as_deref().or(self.test_shape.as_deref())
    }

    /// The layer index for `layers.{i}.*` tensors.
    pub fn layer(&self) -> Option<usize> {
        match TapName::parse(&self.name) {
            Some(TapName::Layer(i, _)) => Some(i),
            _ => None,
        }
    }

    /// The judged distance over its threshold (`None` when not judged).
    pub fn tolerance_ratio(&self) -> Option<f64> {
        self.tolerance.as_ref().map(AppliedTolerance::ratio)
    }

    /// The statistics of the judged distance: ours vs oracle in the bf16 tier, else ours vs ref.
    pub fn judged_stats(&self) -> Option<&DiffStats> {
        match self.tolerance.as_ref().map(|t| t.against) {
            Some(Against::Oracle) => self.test_vs_oracle.as_ref(),
            _ => self.stats.as_ref(),
        }
    }
}

/// Compares one tensor of the test against the reference, judged by `tol`.
///
/// Never panics: a shape mismatch gives [`Status::ShapeMismatch`]; a NaN or infinity in the test,
/// the reference, or the oracle when the rule uses it gives [`Status::NonFinite`] (never equal,
/// and never a reason to widen the tolerance). An `oracle` of the wrong shape is ignored
/// (with a note). On `logits` (last dimension = vocabulary) the per-position softmax KL and
/// top-1/top-5 agreement are computed too, and against the oracle when given.
pub fn compare_tensors(
    name: &str,
    reference: &TraceTensor,
    test: &TraceTensor,
    oracle: Option<&TraceTensor>,
    tol: &Tolerance,
) -> TensorComparison {
    let mut c = TensorComparison::bare(name, Status::Pass);
    c.ref_shape = Some(reference.shape.clone());
    c.test_shape = Some(test.shape.clone());
    if reference.shape != test.shape || reference.data.len() != test.data.len() {
        c.status = Status::ShapeMismatch;
        c.note = Some(format!(
            "reference shape {:?}, test shape {:?}",
            reference.shape, test.shape
        ));
        return c;
    }
    let shape = &reference.shape;
    let r = StoredValues::of(&reference.data);
    let t = StoredValues::of(&test.data);
    let oracle = match oracle {
        Some(o) if o.shape == *shape && o.data.len() == r.len() => Some(StoredValues::of(&o.data)),
        Some(o) => {
            c.note = Some(format!(
                "oracle shape {:?} differs from {:?}: oracle ignored",
                o.shape, shape
            ));
            None
        }
        None => None,
    };
    // One pass over the values for every difference statistic, beside the logits' statistics
    // (their own pass, parallel over positions).
    let vocab = match TapName::parse(name) {
        Some(TapName::Logits) => shape.last().copied(),
        _ => None,
    };
    let ((stats, vs_oracle), logits) = rayon::join(
        || diff_stats_fused(r, t, oracle, shape),
        || vocab.map(|v| logit_stats_fused(r, t, oracle, v)),
    );
    if let Some((ro, to)) = vs_oracle {
        c.ref_vs_oracle = Some(ro);
        c.test_vs_oracle = Some(to);
    }
    if let Some([rt, ro, to]) = logits {
        c.logits = rt;
        c.ref_vs_oracle_logits = ro;
        c.test_vs_oracle_logits = to;
    }
    // The oracle counts when the rule uses it (every rule but a fixed bound); its non-finite
    // values are the expected side's of the reference-vs-oracle statistics.
    let oracle_used = !matches!(tol, Tolerance::Fixed { .. });
    let counts = NonFiniteCounts {
        test: stats.actual_nonfinite,
        reference: stats.expected_nonfinite,
        oracle: match (&c.ref_vs_oracle, oracle_used) {
            (Some(o), true) => o.expected_nonfinite,
            _ => 0,
        },
    };
    c.stats = Some(stats);
    c.tolerance = apply(tol, &c);
    if counts.any() {
        c.nonfinite = Some(counts);
        c.status = Status::NonFinite;
        c.add_note(format!("non-finite values: {}", counts.describe()));
        return c;
    }
    let Some((within, min_top1)) = c
        .tolerance
        .as_ref()
        .map(|a| (a.measured <= a.threshold, a.min_top1_agreement))
    else {
        c.status = Status::Unjudged;
        c.add_note("the tier's rule needs the oracle's copy of this tensor");
        return c;
    };
    let top1_ok = match (min_top1, c.test_vs_oracle_logits.as_ref()) {
        (Some(min), Some(l)) => l.top1_agreement >= min - 1e-12,
        _ => true,
    };
    c.status = if within && top1_ok {
        Status::Pass
    } else {
        if within && !top1_ok {
            c.add_note(format!(
                "top-1 agreement with the oracle {:.4} is below the reference's minus slack ({:.4})",
                c.test_vs_oracle_logits
                    .as_ref()
                    .map_or(f64::NAN, |l| l.top1_agreement),
                min_top1.unwrap_or(f64::NAN)
            ));
        }
        Status::Fail
    };
    c
}

/// Resolves `tol` into numbers for the tensor compared in `c`; `None` when it cannot be judged.
fn apply(tol: &Tolerance, c: &TensorComparison) -> Option<AppliedTolerance> {
    let stats = c.stats.as_ref()?;
    let mag = stats.expected_magnitude;
    // The reference's own noise widens a tolerance only when it is a finite number: a NaN or
    // infinity in the reference or the oracle measures nothing (the tensor fails as non-finite).
    let noise = c.ref_vs_oracle.as_ref().map(|s| finite_noise(s.max_abs));
    let (against, measured, threshold, explanation, min_top1) = match *tol {
        Tolerance::Fixed { bound } => {
            let th = bound.resolve(mag);
            (
                Against::Reference,
                stats.max_abs,
                th,
                bound.describe(),
                None,
            )
        }
        Tolerance::NoiseMultiple {
            k,
            floor,
            without_oracle,
        } => match noise.flatten() {
            Some(n) => {
                let fl = floor.resolve(mag);
                let th = (k * n).max(fl);
                // The reference's own error is in |ours − ref| too: when that is over the bound
                // but ours is no farther from the exact result than the bound (docs/numerics.md,
                // "f32"), ours is as accurate as the rule asks, and the judged distance is the one
                // from the oracle.
                match c.test_vs_oracle.as_ref().map(|t| t.max_abs) {
                    Some(to) if stats.max_abs > th && to <= th => (
                        Against::Oracle,
                        to,
                        th,
                        format!(
                            "|ours−oracle| ≤ max({k} × |ref−oracle| {}, {}) (|ours−ref| {} is over it)",
                            sci(n),
                            sci(fl),
                            sci(stats.max_abs)
                        ),
                        None,
                    ),
                    _ => (
                        Against::Reference,
                        stats.max_abs,
                        th,
                        format!("max({k} × |ref−oracle| {}, {})", sci(n), sci(fl)),
                        None,
                    ),
                }
            }
            None => (
                Against::Reference,
                stats.max_abs,
                without_oracle.resolve(mag),
                format!("{} (no oracle)", without_oracle.describe()),
                None,
            ),
        },
        Tolerance::OracleRelative { k, top1_slack } => {
            // No oracle copy: unjudged. A non-finite noise counts as none (the floor only).
            let n = noise?.unwrap_or(0.0);
            let tvo = c.test_vs_oracle.as_ref()?;
            let floor = bf16_half_ulp(tvo.expected_magnitude);
            let min_top1 = match (top1_slack, c.ref_vs_oracle_logits.as_ref()) {
                (Some(s), Some(l)) => {
                    Some((l.top1_agreement - s.max(1.0 / l.positions.max(1) as f64)).max(0.0))
                }
                _ => None,
            };
            (
                Against::Oracle,
                tvo.max_abs,
                (k * n).max(floor),
                format!(
                    "|ours−oracle| ≤ max({k} × |ref−oracle| {}, half-ulp {})",
                    sci(n),
                    sci(floor)
                ),
                min_top1,
            )
        }
    };
    Some(AppliedTolerance {
        rule: *tol,
        against,
        measured,
        threshold,
        explanation,
        min_top1_agreement: min_top1,
    })
}

/// Short scientific notation used in explanations and reports: `1.23e-9`, `0`, `inf`, `NaN`.
pub fn sci(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{x:.2e}")
    }
}
