//! Tensor-by-tensor comparison of two traces (reference and test), optionally with the pure-f64
//! oracle, each tensor judged by the [`TolerancePolicy`] of its precision tier.

use std::borrow::Cow;
use std::fmt;

use lockstep_trace::{LayerTap, TapName, TensorData, Trace, TraceTensor};
use serde::Serialize;

use crate::tolerance::{bf16_half_ulp, finite_noise, Tier, Tolerance, TolerancePolicy};

/// The denominator floor of the relative difference: `|a − b| / max(|a|, REL_DIFF_FLOOR)`.
/// Informational only (no verdict uses it); elements near zero dominate it.
pub const REL_DIFF_FLOOR: f64 = 1e-12;

/// How many candidates the top-k agreement on logits compares.
pub const TOP_K: usize = 5;

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

/// Element-wise difference statistics of `actual` against `expected` (all values as f64).
///
/// A non-finite value (NaN or ±∞) is never equal to anything, itself included: wherever either
/// side is non-finite the difference counts as +∞, so the first such position is the one
/// [`DiffStats::max_abs_index`] names. Sums (mean, NMSE, cosine) use the positions where both
/// are finite; NMSE and cosine become ∞/NaN when any position is non-finite on either side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffStats {
    /// Number of elements.
    pub elements: usize,
    /// Largest |expected − actual|.
    pub max_abs: f64,
    /// Flat (row-major) index of the largest difference (the first, on ties).
    pub max_abs_index: usize,
    /// Multi-dimensional index of the largest difference.
    pub max_abs_position: Vec<usize>,
    /// The expected value there.
    pub expected_at_max: f64,
    /// The actual value there.
    pub actual_at_max: f64,
    /// Mean |expected − actual|.
    pub mean_abs: f64,
    /// Largest |expected − actual| / max(|expected|, [`REL_DIFF_FLOOR`]).
    pub max_rel: f64,
    /// Σ(expected − actual)² / Σ expected² (0 when both are all zeros, ∞ when only expected is).
    pub nmse: f64,
    /// Cosine similarity (1 when both are all zeros, 0 when only one is).
    pub cosine: f64,
    /// Largest finite |expected|: the tensor's magnitude.
    pub expected_magnitude: f64,
    /// Elements where actual is non-finite (whatever expected holds there).
    pub actual_nonfinite: usize,
    /// Elements where expected is non-finite (whatever actual holds there).
    pub expected_nonfinite: usize,
}

/// Computes [`DiffStats`] of `actual` against `expected`, laid out in `shape` (row-major).
/// Only the common prefix is compared if the lengths differ (callers check shapes first).
pub fn diff_stats(expected: &[f64], actual: &[f64], shape: &[usize]) -> DiffStats {
    let n = expected.len().min(actual.len());
    let (mut max_abs, mut max_i) = (0.0f64, 0usize);
    let (mut sum_abs, mut max_rel) = (0.0f64, 0.0f64);
    let (mut sdd, mut saa, mut sbb, mut sab) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let (mut mag, mut b_bad, mut a_bad) = (0.0f64, 0usize, 0usize);
    for i in 0..n {
        let (a, b) = (expected[i], actual[i]);
        let d = if a.is_finite() && b.is_finite() {
            (a - b).abs()
        } else {
            // Never "equal", not even NaN against NaN or ∞ against the same ∞.
            b_bad += !b.is_finite() as usize;
            a_bad += !a.is_finite() as usize;
            f64::INFINITY
        };
        if a.is_finite() {
            mag = mag.max(a.abs());
        }
        if d > max_abs {
            max_abs = d;
            max_i = i;
        }
        sum_abs += d;
        if d > 0.0 {
            let r = if d.is_finite() {
                d / a.abs().max(REL_DIFF_FLOOR)
            } else {
                f64::INFINITY
            };
            max_rel = max_rel.max(r);
        }
        if a.is_finite() && b.is_finite() {
            let e = a - b;
            sdd += e * e;
            saa += a * a;
            sbb += b * b;
            sab += a * b;
        }
    }
    let bad = a_bad + b_bad > 0;
    let nmse = if bad {
        f64::INFINITY
    } else if saa > 0.0 {
        sdd / saa
    } else if sdd == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    let cosine = if bad {
        f64::NAN
    } else if saa > 0.0 && sbb > 0.0 {
        (sab / (saa.sqrt() * sbb.sqrt())).clamp(-1.0, 1.0)
    } else if saa == 0.0 && sbb == 0.0 {
        1.0
    } else {
        0.0
    };
    DiffStats {
        elements: n,
        max_abs,
        max_abs_index: max_i,
        max_abs_position: unravel(max_i, shape),
        expected_at_max: expected.get(max_i).copied().unwrap_or(0.0),
        actual_at_max: actual.get(max_i).copied().unwrap_or(0.0),
        mean_abs: if n > 0 { sum_abs / n as f64 } else { 0.0 },
        max_rel,
        nmse,
        cosine,
        expected_magnitude: mag,
        actual_nonfinite: b_bad,
        expected_nonfinite: a_bad,
    }
}

/// The multi-dimensional (row-major) index of flat index `i` in `shape`.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut pos = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        if n > 0 {
            pos[d] = i % n;
            i /= n;
        }
    }
    pos
}

/// Distribution-level agreement of two sets of logits, position by position (the last dimension
/// is the vocabulary; every other dimension indexes a position).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogitStats {
    /// Number of positions (product of all but the last dimension).
    pub positions: usize,
    /// Vocabulary size (the last dimension).
    pub vocab: usize,
    /// Mean over positions of KL(expected ‖ actual) of the softmax distributions, in nats,
    /// computed in f64 from log-softmax (log-sum-exp with the maximum subtracted). A position
    /// with a non-finite logit on either side has KL +∞ and counts as a top-1/top-5 mismatch.
    pub kl_mean: f64,
    /// Largest per-position KL.
    pub kl_max: f64,
    /// Flat position of the largest KL.
    pub kl_max_position: usize,
    /// Fraction of positions whose argmax (first index on ties) is the same on both sides.
    pub top1_agreement: f64,
    /// Top-5 agreement defined as the mean overlap: Σ |top5(expected) ∩ top5(actual)| / 5 over
    /// positions, divided by the number of positions. 1.0 exactly when the top-5 sets are equal
    /// at every position; one swapped-out candidate at one of 10 positions gives 0.98.
    pub top5_agreement: f64,
    /// First position whose argmax differs, if any.
    pub first_top1_mismatch: Option<usize>,
}

/// Computes [`LogitStats`] of `actual` against `expected`; `None` when `vocab` is 0 or the
/// lengths do not split into whole positions.
pub fn logit_stats(expected: &[f64], actual: &[f64], vocab: usize) -> Option<LogitStats> {
    if vocab == 0 || expected.len() != actual.len() || !expected.len().is_multiple_of(vocab) {
        return None;
    }
    let positions = expected.len() / vocab;
    let k = TOP_K.min(vocab);
    let (mut kl_sum, mut kl_max, mut kl_at) = (0.0f64, 0.0f64, 0usize);
    let (mut top1, mut overlap, mut first_mismatch) = (0usize, 0usize, None);
    let (mut lp, mut lq) = (vec![0.0; vocab], vec![0.0; vocab]);
    for pos in 0..positions {
        let p = &expected[pos * vocab..(pos + 1) * vocab];
        let q = &actual[pos * vocab..(pos + 1) * vocab];
        if p.iter().chain(q).any(|v| !v.is_finite()) {
            // A non-finite logit on either side: no distribution to agree with, never a match.
            kl_sum = f64::INFINITY;
            if kl_max != f64::INFINITY {
                kl_max = f64::INFINITY;
                kl_at = pos;
            }
            first_mismatch.get_or_insert(pos);
            continue;
        }
        log_softmax(p, &mut lp);
        log_softmax(q, &mut lq);
        let mut kl = 0.0;
        for (&a, &b) in lp.iter().zip(&lq) {
            let pa = a.exp();
            if pa > 0.0 {
                kl += pa * (a - b);
            } else if a.is_nan() || b.is_nan() {
                kl = f64::NAN;
            }
        }
        let kl = if kl.is_nan() { f64::NAN } else { kl.max(0.0) };
        kl_sum += kl;
        if kl > kl_max || (kl.is_nan() && !kl_max.is_nan()) {
            kl_max = kl;
            kl_at = pos;
        }
        let (tp, tq) = (top_k(p, k), top_k(q, k));
        if tp[0] == tq[0] {
            top1 += 1;
        } else if first_mismatch.is_none() {
            first_mismatch = Some(pos);
        }
        overlap += tp.iter().filter(|i| tq.contains(i)).count();
    }
    let pf = positions.max(1) as f64;
    Some(LogitStats {
        positions,
        vocab,
        kl_mean: kl_sum / pf,
        kl_max,
        kl_max_position: kl_at,
        top1_agreement: if positions == 0 {
            1.0
        } else {
            top1 as f64 / pf
        },
        top5_agreement: if positions == 0 {
            1.0
        } else {
            overlap as f64 / (pf * k as f64)
        },
        first_top1_mismatch: first_mismatch,
    })
}

/// Writes log-softmax of `x` into `out`, stably (the maximum is subtracted before exp).
fn log_softmax(x: &[f64], out: &mut [f64]) {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        // All -inf (or +inf present): no meaningful distribution; propagate NaN.
        out.iter_mut().for_each(|o| *o = f64::NAN);
        return;
    }
    let s: f64 = x.iter().map(|&v| (v - m).exp()).sum();
    let lse = m + s.ln();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v - lse;
    }
}

/// Indices of the `k` largest values, largest first (lower index first on ties; NaN ranks last).
fn top_k(x: &[f64], k: usize) -> Vec<usize> {
    let key = |v: f64| if v.is_nan() { f64::NEG_INFINITY } else { v };
    let mut best: Vec<(f64, usize)> = Vec::with_capacity(k + 1);
    for (i, &v) in x.iter().enumerate() {
        let v = key(v);
        if best.len() == k && best.last().is_some_and(|&(w, _)| v <= w) {
            continue;
        }
        let at = best.iter().position(|&(w, _)| v > w).unwrap_or(best.len());
        best.insert(at, (v, i));
        best.truncate(k);
    }
    best.into_iter().map(|(_, i)| i).collect()
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
            (Some(r), Some(t)) => compare_tensors(
                name,
                r,
                t,
                oracle.and_then(|o| o.get(name)),
                &policy.tolerance_for(name),
            ),
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

// ---------------------------------------------------------------------------------------------
// Non-finite values

/// How many non-finite values (NaN or ±∞) one tensor holds on each side of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct NonFiniteCounts {
    /// In the test.
    pub test: usize,
    /// In the reference.
    pub reference: usize,
    /// In the oracle (counted only when the tier's rule uses the oracle; 0 otherwise).
    pub oracle: usize,
}

impl NonFiniteCounts {
    /// True when any side holds a non-finite value.
    pub fn any(&self) -> bool {
        self.test + self.reference + self.oracle > 0
    }

    /// The sides holding non-finite values, e.g. `the reference and the test`.
    pub fn sides(&self) -> String {
        let names: Vec<&str> = [
            (self.reference, "the reference"),
            (self.test, "the test"),
            (self.oracle, "the oracle"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(_, s)| s)
        .collect();
        match names.as_slice() {
            [] => "no side".into(),
            [one] => (*one).into(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        }
    }

    /// The counts per side, e.g. `8 in the reference, 8 in the test`.
    pub fn describe(&self) -> String {
        [
            (self.reference, "the reference"),
            (self.test, "the test"),
            (self.oracle, "the oracle"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, s)| format!("{n} in {s}"))
        .collect::<Vec<_>>()
        .join(", ")
    }
}

/// Where a trace first holds a non-finite value, in forward order: the tensor, and within it the
/// first element (row-major) that is NaN or ±∞.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NonFiniteSite {
    /// The tensor's canonical name, e.g. `layers.1.mlp_out`.
    pub tensor: String,
    /// Its layer, for `layers.{i}.*` tensors.
    pub layer: Option<usize>,
    /// The token position of the first non-finite element (its `T` index), when the tensor has
    /// one.
    pub token_position: Option<usize>,
    /// Multi-dimensional index of the first non-finite element.
    pub index: Vec<usize>,
    /// Its flat (row-major) index.
    pub flat_index: usize,
    /// The value there: `NaN`, `inf` or `-inf`.
    pub value: String,
    /// How many elements of the tensor are non-finite.
    pub count: usize,
}

impl fmt::Display for NonFiniteSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at `{}`{:?} (", self.value, self.tensor, self.index)?;
        if let Some(p) = self.token_position {
            write!(f, "token position {p}, ")?;
        }
        write!(
            f,
            "{} non-finite element{})",
            self.count,
            if self.count == 1 { "" } else { "s" }
        )
    }
}

/// `NaN`, `inf` or `-inf`.
fn nonfinite_name(v: f64) -> &'static str {
    if v.is_nan() {
        "NaN"
    } else if v > 0.0 {
        "inf"
    } else {
        "-inf"
    }
}

/// The token-position dimension of a canonical tensor: 2 for per-head tensors
/// (`[B, heads, T, ·]`), 1 for everything else (`[B, T, ·]`).
fn token_dim(name: &str) -> usize {
    match TapName::parse(name) {
        Some(TapName::Layer(
            _,
            LayerTap::Q
            | LayerTap::K
            | LayerTap::V
            | LayerTap::QNorm
            | LayerTap::KNorm
            | LayerTap::QRope
            | LayerTap::KRope
            | LayerTap::AttnProbs,
        )) => 2,
        _ => 1,
    }
}

/// Flat index and value of the first non-finite element, and how many there are (no copy).
fn scan_nonfinite(d: &TensorData) -> Option<(usize, f64, usize)> {
    fn go<X: Copy>(v: &[X], f: impl Fn(X) -> f64) -> Option<(usize, f64, usize)> {
        let first = v.iter().position(|&x| !f(x).is_finite())?;
        let count = v[first..].iter().filter(|&&x| !f(x).is_finite()).count();
        Some((first, f(v[first]), count))
    }
    match d {
        TensorData::F64(v) => go(v, |x| x),
        TensorData::F32(v) => go(v, f64::from),
        TensorData::BF16(v) => go(v, f64::from),
        TensorData::F16(v) => go(v, f64::from),
        TensorData::I64(_) => None,
    }
}

/// The first non-finite element of one tensor (`None` when all are finite, or the tensor holds
/// integers).
pub fn nonfinite_in(name: &str, tensor: &TraceTensor) -> Option<NonFiniteSite> {
    let (first, value, count) = scan_nonfinite(&tensor.data)?;
    let index = unravel(first, &tensor.shape);
    Some(NonFiniteSite {
        tensor: name.to_string(),
        layer: match TapName::parse(name) {
            Some(TapName::Layer(i, _)) => Some(i),
            _ => None,
        },
        token_position: index.get(token_dim(name)).copied(),
        index,
        flat_index: first,
        value: nonfinite_name(value).into(),
        count,
    })
}

/// Where `trace` first holds a non-finite value, scanning its tensors in forward order.
pub fn first_nonfinite(trace: &Trace) -> Option<NonFiniteSite> {
    let mut names: Vec<&str> = trace.names();
    lockstep_trace::sort_forward(&mut names);
    names
        .into_iter()
        .find_map(|n| trace.get(n).and_then(|t| nonfinite_in(n, t)))
}

/// The first non-finite value of each side of a comparison (`None` where that side is finite
/// throughout, or absent).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct FirstNonFinite {
    /// In the reference trace.
    pub reference: Option<NonFiniteSite>,
    /// In the test trace.
    pub test: Option<NonFiniteSite>,
    /// In the oracle trace.
    pub oracle: Option<NonFiniteSite>,
}

impl FirstNonFinite {
    /// True when any side holds a non-finite value.
    pub fn any(&self) -> bool {
        self.reference.is_some() || self.test.is_some() || self.oracle.is_some()
    }

    /// One line per side holding non-finite values, e.g. `reference: NaN at `layers.1.mlp_out`…`.
    pub fn lines(&self) -> Vec<String> {
        [
            ("reference", &self.reference),
            ("test", &self.test),
            ("oracle", &self.oracle),
        ]
        .into_iter()
        .filter_map(|(side, s)| s.as_ref().map(|s| format!("{side}: {s}")))
        .collect()
    }
}

/// One checkpoint tensor holding non-finite values, as plain data (the verifier does not read
/// checkpoints; the caller scans them, e.g. with the engine's `Checkpoint::nonfinite_report`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NonFiniteWeight {
    /// The checkpoint name, e.g. `model.layers.1.mlp.down_proj.weight`.
    pub name: String,
    /// NaN elements.
    pub nan: usize,
    /// +∞ or −∞ elements.
    pub inf: usize,
    /// Index of the first non-finite element, in the tensor's stored shape.
    pub first_index: Vec<usize>,
}

impl NonFiniteWeight {
    /// `` `model.layers.1.mlp.down_proj.weight`: 1 NaN, first at [5, 7] ``.
    pub fn describe(&self) -> String {
        let mut parts = vec![];
        if self.nan > 0 {
            parts.push(format!("{} NaN", self.nan));
        }
        if self.inf > 0 {
            parts.push(format!("{} infinite", self.inf));
        }
        format!(
            "`{}`: {}, first at {:?}",
            self.name,
            parts.join(" and "),
            self.first_index
        )
    }

    /// The layer a checkpoint name belongs to (`model.layers.{i}.…` or `layers.{i}.…`).
    pub fn layer(&self) -> Option<usize> {
        let rest = self
            .name
            .strip_prefix("model.layers.")
            .or_else(|| self.name.strip_prefix("layers."))?;
        rest.split('.').next()?.parse().ok()
    }
}

/// The overall sentence on non-finite values: where they come from and where they first appear,
/// e.g. `NaN in model.layers.1.mlp.down_proj.weight[5, 7] reaches layers.1.mlp_out on both
/// sides`. `None` when neither the checkpoint nor any comparison holds a non-finite value.
///
/// `weights` is the checkpoint scan (in checkpoint order); `comparisons` the trace comparisons of
/// a run (their first non-finite sites per side). The tensor named is the earliest in forward
/// order over all comparisons; "on both sides" when the reference and the test first turn
/// non-finite at the same tensor. Without a non-finite weight, the sentence says the checkpoint is
/// finite, so the run itself (overflow, a bug) produces them.
pub fn nonfinite_summary(
    weights: &[NonFiniteWeight],
    comparisons: &[&TraceComparison],
) -> Option<String> {
    let earliest = |pick: fn(&FirstNonFinite) -> &Option<NonFiniteSite>| {
        comparisons
            .iter()
            .filter_map(|c| pick(&c.first_nonfinite).as_ref())
            .min_by_key(|s| lockstep_trace::forward_rank(&s.tensor))
    };
    let r = earliest(|f| &f.reference);
    let t = earliest(|f| &f.test);
    let o = earliest(|f| &f.oracle);
    let reach = match (r, t) {
        (Some(r), Some(t)) if r.tensor == t.tensor => format!("{} on both sides", r.tensor),
        (Some(r), Some(t)) => format!("{} in the reference and {} in the test", r.tensor, t.tensor),
        (Some(r), None) => format!("{} in the reference only (the test stays finite)", r.tensor),
        (None, Some(t)) => format!("{} in the test only (the reference stays finite)", t.tensor),
        (None, None) => match o {
            Some(o) => format!("{} in the oracle only", o.tensor),
            None => String::new(),
        },
    };
    let reach = if reach.is_empty() { None } else { Some(reach) };
    match (weights.first(), reach) {
        (Some(w), Some(reach)) => {
            let more = if weights.len() > 1 {
                format!(" (and {} more non-finite weight tensor(s))", weights.len() - 1)
            } else {
                String::new()
            };
            let kind = if w.nan > 0 { "NaN" } else { "infinity" };
            Some(format!(
                "{kind} in {}{:?}{more} reaches {reach}",
                w.name, w.first_index
            ))
        }
        (Some(w), None) => Some(format!(
            "the checkpoint holds non-finite values ({}{}); no compared forward pass holds any",
            w.describe().replace('`', ""),
            if weights.len() > 1 {
                format!(" and {} more tensor(s)", weights.len() - 1)
            } else {
                String::new()
            }
        )),
        (None, Some(reach)) => Some(format!(
            "the checkpoint is finite; non-finite values first appear at {reach} (produced by the computation: overflow or a bug)"
        )),
        (None, None) => None,
    }
}

/// The likely cause when non-finite values first appear at tensor `name` (the inputs of its op
/// were finite): the weights the op reads, or an overflow in it.
pub fn nonfinite_cause(name: &str) -> String {
    format!(
        "non-finite values (NaN/inf) enter here: {}",
        nonfinite_source(name)
    )
}

/// Where NaN/inf entering at tensor `name` come from, e.g. `a NaN/inf in the down_proj weight`.
pub fn nonfinite_source(name: &str) -> &'static str {
    match TapName::parse(name) {
        Some(TapName::Tokens) => "token ids",
        Some(TapName::Embed) => "a NaN/inf in the embedding table (embed_tokens)",
        Some(TapName::FinalNorm) => {
            "a NaN/inf in the final norm weight, or an overflowing variance"
        }
        Some(TapName::Logits) => "a NaN/inf in lm_head (or the tied embedding table)",
        Some(TapName::Layer(_, tap)) => match tap {
            LayerTap::InputNorm | LayerTap::PostNorm => {
                "a NaN/inf in the RMSNorm weight, or an overflowing variance"
            }
            LayerTap::Q | LayerTap::K | LayerTap::V => {
                "a NaN/inf in the q/k/v projection weight or bias"
            }
            LayerTap::QNorm | LayerTap::KNorm => "a NaN/inf in the q_norm/k_norm weight",
            LayerTap::QRope | LayerTap::KRope => "non-finite RoPE cos/sin tables",
            LayerTap::AttnProbs => "overflowing attention scores (softmax of inf or NaN)",
            LayerTap::AttnOut => "non-finite attention probabilities or values",
            LayerTap::OProj => "a NaN/inf in the o_proj weight",
            LayerTap::ResidAttn | LayerTap::Out => "an overflowing residual add",
            LayerTap::MlpAct => {
                "a NaN/inf in the gate_proj/up_proj weights, or an overflowing activation"
            }
            LayerTap::MlpOut => "a NaN/inf in the down_proj weight",
        },
        None => "a NaN/inf in the weights this tensor is computed from",
    }
}
