//! Element-wise difference statistics of two tensors ([`DiffStats`]) and the distribution-level
//! agreement of two sets of logits ([`LogitStats`]): the numbers every comparison reports.

use serde::Serialize;

/// The denominator floor of the relative difference: `|a − b| / max(|a|, REL_DIFF_FLOOR)`.
/// Informational only (no verdict uses it); elements near zero dominate it.
pub const REL_DIFF_FLOOR: f64 = 1e-12;

/// How many candidates the top-k agreement on logits compares.
pub const TOP_K: usize = 5;

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
