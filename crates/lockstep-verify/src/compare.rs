//! Tensor-by-tensor comparison of two traces (reference and test), optionally with the pure-f64
//! oracle, each tensor judged by the [`TolerancePolicy`] of its precision tier.

use std::borrow::Cow;
use std::fmt;

use lockstep_trace::{LayerTap, TapName, TensorData, Trace, TraceTensor};
use serde::Serialize;

use crate::nonfinite::{
    first_nonfinite, nonfinite_cause, nonfinite_source, FirstNonFinite, NonFiniteCounts,
};
use crate::stats::{diff_stats, logit_stats, DiffStats, LogitStats};
use crate::tolerance::{bf16_half_ulp, finite_noise, Tier, Tolerance, TolerancePolicy};

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
    fn add_note(&mut self, note: impl Into<String>) {
        let note = note.into();
        self.note = Some(match self.note.take() {
            Some(prev) => format!("{prev}; {note}"),
            None => note,
        });
    }

    fn bare(name: &str, status: Status) -> Self {
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
    let r = values_f64(&reference.data);
    let t = values_f64(&test.data);
    let stats = diff_stats(&r, &t, shape);
    let oracle = match oracle {
        Some(o) if o.shape == *shape && o.data.len() == r.len() => Some(values_f64(&o.data)),
        Some(o) => {
            c.note = Some(format!(
                "oracle shape {:?} differs from {:?}: oracle ignored",
                o.shape, shape
            ));
            None
        }
        None => None,
    };
    if let Some(o) = &oracle {
        c.ref_vs_oracle = Some(diff_stats(o, &r, shape));
        c.test_vs_oracle = Some(diff_stats(o, &t, shape));
    }
    if TapName::parse(name) == Some(TapName::Logits) {
        if let Some(&vocab) = shape.last() {
            c.logits = logit_stats(&r, &t, vocab);
            if let Some(o) = &oracle {
                c.ref_vs_oracle_logits = logit_stats(o, &r, vocab);
                c.test_vs_oracle_logits = logit_stats(o, &t, vocab);
            }
        }
    }
    // The oracle counts when the rule uses it (every rule but a fixed bound).
    let oracle_used = !matches!(tol, Tolerance::Fixed { .. });
    let counts = NonFiniteCounts {
        test: stats.actual_nonfinite,
        reference: stats.expected_nonfinite,
        oracle: match (&oracle, oracle_used) {
            (Some(o), true) => o.iter().filter(|v| !v.is_finite()).count(),
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

/// The values as f64, borrowed when they already are (logits of a large model in three traces
/// would otherwise be copied needlessly).
fn values_f64(d: &TensorData) -> Cow<'_, [f64]> {
    match d {
        TensorData::F64(v) => Cow::Borrowed(v),
        other => Cow::Owned(other.to_f64()),
    }
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
                (Some(s), Some(l)) => Some((l.top1_agreement - s).max(0.0)),
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

/// The overall verdict on a trace comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Verdict {
    /// Everything within tolerance, and either the f64 tier (exact math, ≤ 1e-9) or bit-identical.
    Match,
    /// Everything within tolerance in the f32 or bf16 tier: the differences are rounding.
    DriftWithinNoise,
    /// A tensor is out of tolerance: the first one in forward order, and its likely cause.
    Bug {
        /// The first failing tensor.
        tensor: String,
        /// What probably causes it.
        cause: String,
    },
    /// Nothing failed, but not everything could be judged.
    Inconclusive {
        /// Why.
        reason: String,
    },
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Match => f.write_str("match"),
            Verdict::DriftWithinNoise => f.write_str("rounding drift within noise"),
            Verdict::Bug { tensor, cause } => {
                write!(f, "bug: first divergence at {tensor}: {cause}")
            }
            Verdict::Inconclusive { reason } => write!(f, "inconclusive: {reason}"),
        }
    }
}

/// Per-layer summary of a comparison: the largest differences over the layer's tensors.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerError {
    /// Layer index.
    pub layer: usize,
    /// Largest max|ours − ref| over the layer's tensors.
    pub ours_vs_ref: f64,
    /// The tensor it occurs in (`None` when every tensor of the layer is identical).
    pub worst_tensor: Option<String>,
    /// The reference's own noise floor: largest max|ref − oracle| (when an oracle was given).
    pub ref_vs_oracle: Option<f64>,
    /// Largest max|ours − oracle| (when an oracle was given).
    pub ours_vs_oracle: Option<f64>,
    /// True when every tensor of the layer passed.
    pub passed: bool,
}

/// The comparison of two whole traces.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceComparison {
    /// The tier it was judged in.
    pub tier: Tier,
    /// Whether an oracle trace took part.
    pub has_oracle: bool,
    /// True when every tensor (token ids included) was judged and passed.
    pub passed: bool,
    /// The first failing tensor in forward order (`tokens` when the ids differ).
    pub first_divergence: Option<String>,
    /// Where each trace first holds a non-finite value (NaN/±∞), in forward order.
    pub first_nonfinite: FirstNonFinite,
    /// The reference's token ids (flattened), when known.
    pub token_ids: Option<Vec<i64>>,
    /// The reference's `tokens` shape ([B, T]), when present.
    pub token_shape: Option<Vec<usize>>,
    /// Every tensor in either trace, forward order, `tokens` first.
    pub tensors: Vec<TensorComparison>,
    /// Notes: how the tier was chosen, fingerprint differences, ...
    pub warnings: Vec<String>,
    /// The reference's `producer` metadata.
    pub reference_producer: Option<String>,
    /// The test's `producer` metadata.
    pub test_producer: Option<String>,
    /// The oracle's `producer` metadata.
    pub oracle_producer: Option<String>,
}

impl TraceComparison {
    /// Looks a tensor's comparison up by name.
    pub fn get(&self, name: &str) -> Option<&TensorComparison> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The first failing tensor in forward order.
    pub fn first_failure(&self) -> Option<&TensorComparison> {
        self.tensors.iter().find(|t| t.status.is_failure())
    }

    /// Number of tokens (T, the last dimension of `tokens`), when known.
    pub fn num_tokens(&self) -> Option<usize> {
        self.token_shape
            .as_ref()
            .and_then(|s| s.last().copied())
            .or(self.token_ids.as_ref().map(Vec::len))
    }

    /// The judged tensor furthest from its tolerance (largest measured/threshold ratio).
    pub fn worst(&self) -> Option<&TensorComparison> {
        self.tensors
            .iter()
            .filter(|t| t.tolerance.is_some())
            .max_by(|a, b| {
                let (x, y) = (
                    a.tolerance_ratio().unwrap_or(0.0),
                    b.tolerance_ratio().unwrap_or(0.0),
                );
                x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal)
            })
    }

    /// The verdict: match, rounding drift within noise, bug (with the first divergence and its
    /// likely cause), or inconclusive.
    pub fn verdict(&self) -> Verdict {
        if let Some(t) = self.first_failure() {
            return Verdict::Bug {
                tensor: t.name.clone(),
                cause: self.cause_of(t),
            };
        }
        let unjudged = self
            .tensors
            .iter()
            .filter(|t| t.status == Status::Unjudged)
            .count();
        if unjudged > 0 {
            return Verdict::Inconclusive {
                reason: format!("{unjudged} tensor(s) could not be judged (no oracle copy)"),
            };
        }
        if !self.passed {
            return Verdict::Inconclusive {
                reason: "no tensors were compared".into(),
            };
        }
        let identical = self
            .tensors
            .iter()
            .all(|t| t.stats.as_ref().is_none_or(|s| s.max_abs == 0.0));
        if self.tier == Tier::F64 || identical {
            Verdict::Match
        } else {
            Verdict::DriftWithinNoise
        }
    }

    /// The likely cause of failing tensor `t` ([`failure_cause`]); for a non-finite tensor whose
    /// NaN/inf first appear at an earlier tensor of the trace (a comparison restricted to some
    /// tensors, e.g. the logits), it names that tensor instead.
    pub fn cause_of(&self, t: &TensorComparison) -> String {
        if t.status == Status::NonFinite {
            let upstream = [&self.first_nonfinite.reference, &self.first_nonfinite.test]
                .into_iter()
                .flatten()
                .min_by_key(|s| lockstep_trace::forward_rank(&s.tensor));
            if let Some(s) = upstream.filter(|s| s.tensor != t.name) {
                let sides = t.nonfinite.map_or("the test".into(), |n| n.sides());
                return format!(
                    "non-finite values (NaN/inf) in {sides}, carried from `{}` where they first appear ({})",
                    s.tensor,
                    nonfinite_source(&s.tensor)
                );
            }
        }
        failure_cause(t)
    }

    /// The per-layer error table, by ascending layer index.
    pub fn per_layer(&self) -> Vec<LayerError> {
        let mut rows: Vec<LayerError> = Vec::new();
        for t in &self.tensors {
            let (Some(layer), Some(s)) = (t.layer(), t.stats.as_ref()) else {
                continue;
            };
            let row = match rows.iter_mut().find(|r| r.layer == layer) {
                Some(r) => r,
                None => {
                    rows.push(LayerError {
                        layer,
                        ours_vs_ref: 0.0,
                        worst_tensor: None,
                        ref_vs_oracle: None,
                        ours_vs_oracle: None,
                        passed: true,
                    });
                    rows.last_mut().expect("just pushed")
                }
            };
            if s.max_abs > row.ours_vs_ref || (s.max_abs.is_nan() && !row.ours_vs_ref.is_nan()) {
                row.ours_vs_ref = s.max_abs;
                row.worst_tensor = Some(t.name.clone());
            }
            if let Some(o) = &t.ref_vs_oracle {
                row.ref_vs_oracle = Some(row.ref_vs_oracle.map_or(o.max_abs, |v| v.max(o.max_abs)));
            }
            if let Some(o) = &t.test_vs_oracle {
                row.ours_vs_oracle =
                    Some(row.ours_vs_oracle.map_or(o.max_abs, |v| v.max(o.max_abs)));
            }
        }
        for t in &self.tensors {
            if let Some(layer) = t.layer() {
                if let Some(r) = rows.iter_mut().find(|r| r.layer == layer) {
                    r.passed &= t.status == Status::Pass;
                }
            }
        }
        rows.sort_by_key(|r| r.layer);
        rows
    }
}

/// The cause shown for a failing tensor: its status-specific reason and the likely cause
/// (for a non-finite tensor, where NaN/inf come from, never the tap's numeric suspects).
pub fn failure_cause(t: &TensorComparison) -> String {
    let cause = likely_cause(&t.name);
    match t.status {
        Status::Missing => format!(
            "tensor absent from the {} trace",
            if t.ref_shape.is_none() {
                "reference"
            } else {
                "test"
            }
        ),
        Status::ShapeMismatch => format!(
            "shape {:?} vs reference {:?} ({cause})",
            t.test_shape.as_deref().unwrap_or(&[]),
            t.ref_shape.as_deref().unwrap_or(&[])
        ),
        Status::NonFinite => {
            let sides = t.nonfinite.map_or("the test".into(), |n| n.sides());
            format!("{} (in {sides})", nonfinite_cause(&t.name))
        }
        _ => cause.to_string(),
    }
}

/// The usual suspects when the tensor `name` is the first to diverge, by tensor kind.
pub fn likely_cause(name: &str) -> &'static str {
    match TapName::parse(name) {
        Some(TapName::Tokens) => "tokenizer, chat template or prompt ids",
        Some(TapName::Embed) => "wrong embedding table / token ids",
        Some(TapName::FinalNorm) => "RMSNorm eps or weight, statistics dtype",
        Some(TapName::Logits) => "lm_head (tied vs untied embeddings), final norm",
        Some(TapName::Layer(_, tap)) => match tap {
            LayerTap::InputNorm | LayerTap::PostNorm => "RMSNorm eps or weight, statistics dtype",
            LayerTap::Q | LayerTap::K | LayerTap::V => {
                "missing or wrong q/k/v bias, projection weight transposed or swapped"
            }
            LayerTap::QNorm | LayerTap::KNorm => {
                "per-head q/k RMSNorm skipped, applied after RoPE, wrong weight or eps"
            }
            LayerTap::QRope | LayerTap::KRope => {
                "RoPE: theta, rotate_half vs interleaved layout, position ids, cos/sin dtype"
            }
            LayerTap::AttnProbs => {
                "causal mask, scaling (head_dim^-0.5), GQA head mapping, softmax dtype"
            }
            LayerTap::AttnOut => "GQA kv-head mapping, head order when merging",
            LayerTap::OProj => "o_proj weight",
            LayerTap::ResidAttn | LayerTap::Out => "residual connection",
            LayerTap::MlpAct => "activation (SiLU), gate/up swapped",
            LayerTap::MlpOut => "down_proj",
            LayerTap::RouterLogits => "MoE router (mlp.gate) weight",
            LayerTap::RouterTopkIds => {
                "router softmax dtype or order (softmax before the top-k), top-k tie-breaking"
            }
            LayerTap::RouterTopkWeights => {
                "top-k normalisation (norm_topk_prob), softmax before vs after the top-k, router dtype"
            }
        },
        None => "not a canonical tensor: check what the producer tapped",
    }
}

/// Compares two whole traces, tensor by tensor in forward order, each judged by `policy`.
///
/// Every tensor present in either trace gets a record. `tokens` is not compared numerically:
/// the ids must be identical (reference vs test, and reference vs oracle when given), else the
/// record is [`Status::TokenMismatch`], which comes first in forward order. When neither trace
/// holds `tokens`, the `token_ids` metadata is compared instead (the integers in it). A
/// differing `model_fingerprint` is a warning (the weights may still be the same values).
pub fn compare_traces(
    reference: &Trace,
    test: &Trace,
    oracle: Option<&Trace>,
    policy: &TolerancePolicy,
) -> TraceComparison {
    let mut warnings = policy.notes.clone();
    let mut names: Vec<String> = reference
        .names()
        .into_iter()
        .chain(test.names())
        .map(str::to_string)
        .collect();
    lockstep_trace::sort_forward(&mut names);
    names.dedup();

    let mut tensors = Vec::with_capacity(names.len());
    let token_ids = reference
        .get("tokens")
        .map(|t| t.data.to_f64().iter().map(|&v| v as i64).collect())
        .or_else(|| reference.metadata.get("token_ids").map(|s| parse_ids(s)));
    let token_shape = reference.get("tokens").map(|t| t.shape.clone());
    if let Some(t) = check_tokens(reference, test, oracle) {
        tensors.push(t);
    }
    for name in names.iter().filter(|n| n.as_str() != "tokens") {
        let c = match (reference.get(name), test.get(name)) {
            (Some(r), Some(t)) => {
                let tol = policy.tolerance_for(name);
                let mut c = compare_tensors(name, r, t, oracle.and_then(|o| o.get(name)), &tol);
                if crate::router::is_topk_ids(name) {
                    crate::router::judge_topk_ids(&mut c, name, reference, test, &tensors, tol);
                }
                c
            }
            (r, t) => {
                let mut c = TensorComparison::bare(name, Status::Missing);
                c.ref_shape = r.map(|x| x.shape.clone());
                c.test_shape = t.map(|x| x.shape.clone());
                c.note = Some(format!(
                    "present only in the {} trace",
                    if r.is_some() { "reference" } else { "test" }
                ));
                c
            }
        };
        tensors.push(c);
    }

    for (side, other) in [("test", Some(test)), ("oracle", oracle)] {
        let (Some(a), Some(b)) = (
            reference.metadata.get("model_fingerprint"),
            other.and_then(|o| o.metadata.get("model_fingerprint")),
        ) else {
            continue;
        };
        if a != b {
            warnings.push(format!(
                "model_fingerprint differs between the reference and the {side} trace"
            ));
        }
    }
    let numeric = tensors.iter().filter(|t| t.name != "tokens").count();
    if numeric == 0 {
        warnings.push("no tensors to compare".into());
    }
    let first_divergence = tensors
        .iter()
        .find(|t| t.status.is_failure())
        .map(|t| t.name.clone());
    let passed = numeric > 0 && tensors.iter().all(|t| t.status == Status::Pass);
    let producer = |t: &Trace| t.metadata.get("producer").cloned();
    TraceComparison {
        tier: policy.tier,
        has_oracle: oracle.is_some(),
        passed,
        first_divergence,
        first_nonfinite: FirstNonFinite {
            reference: first_nonfinite(reference),
            test: first_nonfinite(test),
            oracle: oracle.and_then(first_nonfinite),
        },
        token_ids,
        token_shape,
        tensors,
        warnings,
        reference_producer: producer(reference),
        test_producer: producer(test),
        oracle_producer: oracle.and_then(producer),
    }
}

/// The integers in a `token_ids` metadata string such as `[9707, 11, 1879]`.
fn parse_ids(s: &str) -> Vec<i64> {
    s.split(|c: char| !(c.is_ascii_digit() || c == '-'))
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// The ids of a trace: its `tokens` tensor, else its `token_ids` metadata.
fn ids_of(t: &Trace) -> Option<(Vec<usize>, Vec<i64>)> {
    match t.get("tokens") {
        Some(x) => Some((
            x.shape.clone(),
            match &x.data {
                TensorData::I64(v) => v.clone(),
                d => d.to_f64().iter().map(|&v| v as i64).collect(),
            },
        )),
        None => t.metadata.get("token_ids").map(|s| {
            let v = parse_ids(s);
            (vec![v.len()], v)
        }),
    }
}

/// The `tokens` record: `None` when neither side knows its ids.
fn check_tokens(
    reference: &Trace,
    test: &Trace,
    oracle: Option<&Trace>,
) -> Option<TensorComparison> {
    let r = ids_of(reference);
    let t = ids_of(test);
    if r.is_none() && t.is_none() {
        return None;
    }
    let mut c = TensorComparison::bare("tokens", Status::Pass);
    c.ref_shape = r.as_ref().map(|x| x.0.clone());
    c.test_shape = t.as_ref().map(|x| x.0.clone());
    let (Some((_, r)), Some((_, t))) = (&r, &t) else {
        c.status = Status::Missing;
        c.note = Some(format!(
            "token ids present only in the {} trace",
            if r.is_some() { "reference" } else { "test" }
        ));
        return Some(c);
    };
    let describe = |a: &[i64], b: &[i64], other: &str| {
        let at = a
            .iter()
            .zip(b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        format!(
            "{other} token ids differ from the reference at position {at} (reference {} ids, {other} {} ids; reference {:?}, {other} {:?} there)",
            a.len(),
            b.len(),
            a.get(at),
            b.get(at)
        )
    };
    if r != t {
        c.status = Status::TokenMismatch;
        c.note = Some(describe(r, t, "test"));
    } else if let Some((_, o)) = oracle.and_then(ids_of) {
        if *r != o {
            c.status = Status::TokenMismatch;
            c.note = Some(describe(r, &o, "oracle"));
        }
    }
    Some(c)
}
