//! Element-wise difference statistics of two tensors ([`DiffStats`]) and the distribution-level
//! agreement of two sets of logits ([`LogitStats`]): the numbers every comparison reports.

use lockstep_trace::TensorData;
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
    let (nmse, cosine) = nmse_and_cosine(a_bad + b_bad > 0, sdd, (saa, sbb, sab));
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

/// NMSE and cosine of [`DiffStats`] from Σ(expected − actual)² and (Σ expected², Σ actual²,
/// Σ expected·actual); `bad` when either side holds a non-finite value (∞ and NaN then).
fn nmse_and_cosine(bad: bool, sdd: f64, (saa, sbb, sab): (f64, f64, f64)) -> (f64, f64) {
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
    (nmse, cosine)
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
    let (mut lp, mut lq) = (vec![0.0; vocab], vec![0.0; vocab]);
    let mut rows = Vec::with_capacity(positions);
    for pos in 0..positions {
        let p = &expected[pos * vocab..(pos + 1) * vocab];
        let q = &actual[pos * vocab..(pos + 1) * vocab];
        if p.iter().chain(q).any(|v| !v.is_finite()) {
            // A non-finite logit on either side: no distribution to agree with, never a match.
            rows.push(PositionAgreement::NonFinite);
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
        let (tp, tq) = (top_k(p, k), top_k(q, k));
        rows.push(PositionAgreement::Finite {
            kl,
            top1: tp[0] == tq[0],
            overlap: tp.iter().filter(|i| tq.contains(i)).count(),
        });
    }
    Some(combine_positions(&rows, vocab, k))
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

/// A tensor's values as stored (any trace dtype), read as f64 a chunk at a time, so statistics
/// need no f64 copy of a whole tensor. Each value widens exactly as [`TensorData::to_f64`] does.
#[derive(Debug, Clone, Copy)]
pub enum StoredValues<'a> {
    /// float64 values.
    F64(&'a [f64]),
    /// float32 values.
    F32(&'a [f32]),
    /// bfloat16 values.
    BF16(&'a [half::bf16]),
    /// float16 values.
    F16(&'a [half::f16]),
    /// int64 values.
    I64(&'a [i64]),
}

impl<'a> StoredValues<'a> {
    /// The values of `data`, borrowed.
    pub fn of(data: &'a TensorData) -> Self {
        match data {
            TensorData::F64(v) => StoredValues::F64(v),
            TensorData::F32(v) => StoredValues::F32(v),
            TensorData::BF16(v) => StoredValues::BF16(v),
            TensorData::F16(v) => StoredValues::F16(v),
            TensorData::I64(v) => StoredValues::I64(v),
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            StoredValues::F64(v) => v.len(),
            StoredValues::F32(v) => v.len(),
            StoredValues::BF16(v) => v.len(),
            StoredValues::F16(v) => v.len(),
            StoredValues::I64(v) => v.len(),
        }
    }

    /// True when there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i` as f64.
    pub fn get(&self, i: usize) -> Option<f64> {
        (i < self.len()).then(|| {
            let mut one = [0.0];
            self.widen_into(i, &mut one);
            one[0]
        })
    }

    /// Writes values `start..start + out.len()` widened to f64 into `out`.
    pub fn widen_into(&self, start: usize, out: &mut [f64]) {
        let end = start + out.len();
        match self {
            StoredValues::F64(v) => out.copy_from_slice(&v[start..end]),
            StoredValues::F32(v) => {
                for (o, &x) in out.iter_mut().zip(&v[start..end]) {
                    *o = x as f64;
                }
            }
            StoredValues::BF16(v) => {
                for (o, x) in out.iter_mut().zip(&v[start..end]) {
                    *o = x.to_f64();
                }
            }
            StoredValues::F16(v) => {
                for (o, x) in out.iter_mut().zip(&v[start..end]) {
                    *o = x.to_f64();
                }
            }
            StoredValues::I64(v) => {
                for (o, &x) in out.iter_mut().zip(&v[start..end]) {
                    *o = x as f64;
                }
            }
        }
    }

    /// Values `start..end` widened to f64.
    fn widen_range(&self, start: usize, end: usize) -> Vec<f64> {
        let mut out = vec![0.0; end - start];
        self.widen_into(start, &mut out);
        out
    }
}

/// Values widened per pass of [`diff_stats_fused`]: three chunks of f64 stay in L1.
const FUSED_CHUNK: usize = 512;

/// The running state of one (expected, actual) pair in [`diff_stats_fused`]: everything
/// [`diff_stats`] keeps except the sums of squares and products, which the pairs share.
#[derive(Debug, Clone, Copy)]
struct PairRun {
    max_abs: f64,
    max_i: usize,
    sum_abs: f64,
    max_rel: f64,
    /// [`rel_skip_factor`] of `max_rel`: a ratio whose numerator is at most this times its
    /// denominator cannot raise `max_rel`.
    rel_skip: f64,
    /// Σ (expected − actual)².
    sdd: f64,
}

impl PairRun {
    const START: PairRun = PairRun {
        max_abs: 0.0,
        max_i: 0,
        sum_abs: 0.0,
        max_rel: 0.0,
        rel_skip: -1.0,
        sdd: 0.0,
    };

    /// One element at flat index `i`: `fin` when both sides are finite, `e` = expected − actual,
    /// `den` = max(|expected|, [`REL_DIFF_FLOOR`]).
    #[inline(always)]
    fn push(&mut self, i: usize, fin: bool, e: f64, den: f64) {
        let d = if fin { e.abs() } else { f64::INFINITY };
        if d > self.max_abs {
            self.max_abs = d;
            self.max_i = i;
        }
        self.sum_abs += d;
        // The relative difference d / den can raise the maximum only when d > max_rel × den;
        // `rel_skip` × den (rounded) is below that whenever the test below passes, so the
        // division runs only for the rare candidates (it would cost more than the rest).
        let bound = self.rel_skip * den;
        let finite_d = d < f64::INFINITY;
        if !(finite_d && d <= bound && bound >= REL_SKIP_MIN) {
            let r = if finite_d { d / den } else { f64::INFINITY };
            if r > self.max_rel {
                self.max_rel = r;
                self.rel_skip = rel_skip_factor(r);
            }
        }
        self.sdd += e * e;
    }
}

/// The smallest bound the skip test of [`PairRun::push`] trusts: far above the subnormals, so
/// each rounding in it is within a relative 2⁻⁵³.
const REL_SKIP_MIN: f64 = 1e-300;

/// `m × (1 − 2⁻⁴⁰)` rounded, for a maximum relative difference `m`: if `d ≤ round(that × den)`
/// and that product is at least [`REL_SKIP_MIN`], then `d / den < m` exactly, so the rounded
/// quotient is at most `m` (rounding is monotonic). −1 (never skip) for an `m` too small for the
/// relative error bounds; +∞ when `m` is (nothing exceeds it; `d = ∞` never skips, `d ≤ ∞·den`
/// holds for every finite `d`, and an infinite `d` always divides).
fn rel_skip_factor(m: f64) -> f64 {
    if m >= REL_SKIP_MIN {
        m * (1.0 - 2f64.powi(-40))
    } else {
        -1.0
    }
}

/// Finishes one pair's [`DiffStats`] from its run, its shared sums (Σ expected², Σ actual²,
/// Σ expected·actual, meaningful only when both sides are finite everywhere, as [`diff_stats`]
/// uses them), its sides' magnitude and non-finite counts, and the values at the maximum.
#[allow(clippy::too_many_arguments)]
fn finish_pair(
    run: PairRun,
    n: usize,
    (saa, sbb, sab): (f64, f64, f64),
    mag: f64,
    (a_bad, b_bad): (usize, usize),
    expected: StoredValues<'_>,
    actual: StoredValues<'_>,
    shape: &[usize],
) -> DiffStats {
    let sdd = run.sdd;
    let (nmse, cosine) = nmse_and_cosine(a_bad + b_bad > 0, sdd, (saa, sbb, sab));
    let max_i = run.max_i;
    DiffStats {
        elements: n,
        max_abs: run.max_abs,
        max_abs_index: max_i,
        max_abs_position: unravel(max_i, shape),
        expected_at_max: expected.get(max_i).unwrap_or(0.0),
        actual_at_max: actual.get(max_i).unwrap_or(0.0),
        mean_abs: if n > 0 { run.sum_abs / n as f64 } else { 0.0 },
        max_rel: run.max_rel,
        nmse,
        cosine,
        expected_magnitude: mag,
        actual_nonfinite: b_bad,
        expected_nonfinite: a_bad,
    }
}

/// The [`DiffStats`] of a tensor's comparisons in one pass over its values: the test against
/// the reference, and with an `oracle` the reference and the test against it. Each is
/// bit for bit what [`diff_stats`] gives (`diff_stats(reference, test)`,
/// `diff_stats(oracle, reference)`, `diff_stats(oracle, test)`, all widened to f64): every sum
/// adds the same terms in the same order; only order-free maxima and counts are taken otherwise.
///
/// Only the common prefix of the sides is compared when their lengths differ (callers check
/// shapes first).
pub fn diff_stats_fused(
    reference: StoredValues<'_>,
    test: StoredValues<'_>,
    oracle: Option<StoredValues<'_>>,
    shape: &[usize],
) -> (DiffStats, Option<(DiffStats, DiffStats)>) {
    match oracle {
        None => (diff_stats_pair(reference, test, shape), None),
        Some(o) => {
            let (a, b, c) = diff_stats_triple(reference, test, o, shape);
            (a, Some((b, c)))
        }
    }
}

/// [`diff_stats`] of `actual` against `expected` as stored.
fn diff_stats_pair(
    expected: StoredValues<'_>,
    actual: StoredValues<'_>,
    shape: &[usize],
) -> DiffStats {
    let n = expected.len().min(actual.len());
    let mut run = PairRun::START;
    let (mut saa, mut sbb, mut sab, mut mag) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let (mut a_bad, mut b_bad) = (0usize, 0usize);
    let (mut ea, mut ab) = ([0.0f64; FUSED_CHUNK], [0.0f64; FUSED_CHUNK]);
    let mut start = 0;
    while start < n {
        let len = FUSED_CHUNK.min(n - start);
        let (ea, ab) = (&mut ea[..len], &mut ab[..len]);
        expected.widen_into(start, ea);
        actual.widen_into(start, ab);
        for j in 0..len {
            let (a, b) = (ea[j], ab[j]);
            let (fa, fb) = (a.is_finite(), b.is_finite());
            a_bad += !fa as usize;
            b_bad += !fb as usize;
            let abs_a = a.abs();
            if fa && abs_a > mag {
                mag = abs_a;
            }
            run.push(start + j, fa && fb, a - b, abs_a.max(REL_DIFF_FLOOR));
            // Used only when both sides are finite throughout (else NMSE/cosine are ∞/NaN).
            saa += a * a;
            sbb += b * b;
            sab += a * b;
        }
        start += len;
    }
    finish_pair(
        run,
        n,
        (saa, sbb, sab),
        mag,
        (a_bad, b_bad),
        expected,
        actual,
        shape,
    )
}

/// The running state of [`diff_stats_triple`].
#[derive(Debug, Clone, Copy)]
struct TripleRun {
    /// Test against reference, reference against oracle, test against oracle.
    rt: PairRun,
    or: PairRun,
    ot: PairRun,
    /// Σ r², Σ t², Σ o², Σ r·t, Σ o·r, Σ o·t: each pair's Σ expected², Σ actual², Σ products.
    sums: [f64; 6],
    /// Largest finite |r| and |o|.
    mag_r: f64,
    mag_o: f64,
    /// Non-finite values of r, t, o.
    bad: [usize; 3],
}

impl TripleRun {
    const START: TripleRun = TripleRun {
        rt: PairRun::START,
        or: PairRun::START,
        ot: PairRun::START,
        sums: [0.0; 6],
        mag_r: 0.0,
        mag_o: 0.0,
        bad: [0; 3],
    };

    /// Elements `start..start + r.len()`: the reference's `r`, the test's `t`, the oracle's `o`.
    fn chunk(&mut self, start: usize, rb: &[f64], tb: &[f64], ob: &[f64]) {
        let mut run = *self;
        let [srr, stt, soo, srt, sor, sot] = &mut run.sums;
        for (j, ((&r, &t), &o)) in rb.iter().zip(tb).zip(ob).enumerate() {
            let (fr, ft, fo) = (r.is_finite(), t.is_finite(), o.is_finite());
            run.bad[0] += !fr as usize;
            run.bad[1] += !ft as usize;
            run.bad[2] += !fo as usize;
            let (abs_r, abs_o) = (r.abs(), o.abs());
            if fr && abs_r > run.mag_r {
                run.mag_r = abs_r;
            }
            if fo && abs_o > run.mag_o {
                run.mag_o = abs_o;
            }
            let den_o = abs_o.max(REL_DIFF_FLOOR);
            run.rt
                .push(start + j, fr && ft, r - t, abs_r.max(REL_DIFF_FLOOR));
            run.or.push(start + j, fo && fr, o - r, den_o);
            run.ot.push(start + j, fo && ft, o - t, den_o);
            *srr += r * r;
            *stt += t * t;
            *soo += o * o;
            *srt += r * t;
            *sor += o * r;
            *sot += o * t;
        }
        *self = run;
    }
}

/// The three comparisons of [`diff_stats_fused`] with an oracle: (test vs reference, reference
/// vs oracle, test vs oracle).
fn diff_stats_triple(
    reference: StoredValues<'_>,
    test: StoredValues<'_>,
    oracle: StoredValues<'_>,
    shape: &[usize],
) -> (DiffStats, DiffStats, DiffStats) {
    let n = reference.len();
    if test.len() != n || oracle.len() != n {
        // Callers pass equal lengths; anything else is each pair's own common prefix.
        return (
            diff_stats_pair(reference, test, shape),
            diff_stats_pair(oracle, reference, shape),
            diff_stats_pair(oracle, test, shape),
        );
    }
    let mut run = TripleRun::START;
    let mut rb = [0.0f64; FUSED_CHUNK];
    let mut tb = [0.0f64; FUSED_CHUNK];
    let mut ob = [0.0f64; FUSED_CHUNK];
    let mut start = 0;
    while start < n {
        let len = FUSED_CHUNK.min(n - start);
        let (rb, tb, ob) = (&mut rb[..len], &mut tb[..len], &mut ob[..len]);
        reference.widen_into(start, rb);
        test.widen_into(start, tb);
        oracle.widen_into(start, ob);
        run.chunk(start, rb, tb, ob);
        start += len;
    }
    let TripleRun {
        rt,
        or,
        ot,
        sums: [srr, stt, soo, srt, sor, sot],
        mag_r,
        mag_o,
        bad: [r_bad, t_bad, o_bad],
    } = run;
    (
        finish_pair(
            rt,
            n,
            (srr, stt, srt),
            mag_r,
            (r_bad, t_bad),
            reference,
            test,
            shape,
        ),
        finish_pair(
            or,
            n,
            (soo, srr, sor),
            mag_o,
            (o_bad, r_bad),
            oracle,
            reference,
            shape,
        ),
        finish_pair(
            ot,
            n,
            (soo, stt, sot),
            mag_o,
            (o_bad, t_bad),
            oracle,
            test,
            shape,
        ),
    )
}

/// One side's logits at one position, as [`logit_stats`] uses them.
struct LogitRow {
    /// True when every logit is finite.
    finite: bool,
    /// Log-softmax of the row (empty when not finite: never used then).
    log_probs: Vec<f64>,
    /// Indices of the [`TOP_K`] largest logits ([`top_k`]).
    top: Vec<usize>,
}

impl LogitRow {
    fn new(values: StoredValues<'_>, pos: usize, vocab: usize, k: usize) -> LogitRow {
        let row = values.widen_range(pos * vocab, (pos + 1) * vocab);
        let finite = row.iter().all(|v| v.is_finite());
        let mut log_probs = vec![];
        if finite {
            log_probs = vec![0.0; vocab];
            log_softmax(&row, &mut log_probs);
        }
        let top = top_k(&row, k);
        LogitRow {
            finite,
            log_probs,
            top,
        }
    }
}

/// What one position adds to a pair's [`LogitStats`].
#[derive(Debug, Clone, Copy)]
enum PositionAgreement {
    /// A non-finite logit on either side.
    NonFinite,
    /// KL (before clamping at 0), whether the argmax agrees, and the top-k overlap.
    Finite { kl: f64, top1: bool, overlap: usize },
}

impl PositionAgreement {
    fn of(expected: &LogitRow, actual: &LogitRow, kl: f64) -> PositionAgreement {
        if !(expected.finite && actual.finite) {
            return PositionAgreement::NonFinite;
        }
        let (tp, tq) = (&expected.top, &actual.top);
        PositionAgreement::Finite {
            kl,
            top1: tp[0] == tq[0],
            overlap: tp.iter().filter(|i| tq.contains(i)).count(),
        }
    }
}

/// Σ p·(log p − log q) over the vocabulary, as [`logit_stats`] sums it, for one expected row
/// against up to two actual rows (sharing each exp of the expected log-probabilities).
fn kl_sums(lp: &[f64], lq: [Option<&[f64]>; 2]) -> [f64; 2] {
    let mut kl = [0.0f64; 2];
    let empty: &[f64] = &[];
    let (q0, q1) = (lq[0].unwrap_or(empty), lq[1].unwrap_or(empty));
    for (j, &a) in lp.iter().enumerate() {
        let pa = a.exp();
        for (k, q) in [q0, q1].into_iter().enumerate() {
            let Some(&b) = q.get(j) else { continue };
            if pa > 0.0 {
                kl[k] += pa * (a - b);
            } else if a.is_nan() || b.is_nan() {
                kl[k] = f64::NAN;
            }
        }
    }
    kl
}

/// Sums one pair's positions, in order, into its [`LogitStats`] exactly as [`logit_stats`] does.
fn combine_positions(rows: &[PositionAgreement], vocab: usize, k: usize) -> LogitStats {
    let positions = rows.len();
    let (mut kl_sum, mut kl_max, mut kl_at) = (0.0f64, 0.0f64, 0usize);
    let (mut top1, mut overlap, mut first_mismatch) = (0usize, 0usize, None);
    for (pos, row) in rows.iter().enumerate() {
        let PositionAgreement::Finite {
            kl,
            top1: same,
            overlap: o,
        } = *row
        else {
            kl_sum = f64::INFINITY;
            if kl_max != f64::INFINITY {
                kl_max = f64::INFINITY;
                kl_at = pos;
            }
            first_mismatch.get_or_insert(pos);
            continue;
        };
        let kl = if kl.is_nan() { f64::NAN } else { kl.max(0.0) };
        kl_sum += kl;
        if kl > kl_max || (kl.is_nan() && !kl_max.is_nan()) {
            kl_max = kl;
            kl_at = pos;
        }
        if same {
            top1 += 1;
        } else if first_mismatch.is_none() {
            first_mismatch = Some(pos);
        }
        overlap += o;
    }
    let pf = positions.max(1) as f64;
    LogitStats {
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
    }
}

/// The [`LogitStats`] of a logits tensor's comparisons: the test against the reference, and
/// with an `oracle` the reference and the test against it. Each is bit for bit what
/// [`logit_stats`] gives on the values widened to f64 (`None` where it gives `None`); each side's
/// log-softmax and top-k are computed once per position, and positions run in parallel (each
/// position's sums in their own order, the positions summed in order).
pub fn logit_stats_fused(
    reference: StoredValues<'_>,
    test: StoredValues<'_>,
    oracle: Option<StoredValues<'_>>,
    vocab: usize,
) -> [Option<LogitStats>; 3] {
    let len = reference.len();
    let fits = |v: StoredValues<'_>| v.len() == len;
    if vocab == 0 || !len.is_multiple_of(vocab) || !fits(test) || !oracle.is_none_or(fits) {
        // Some pair has no statistics: each as logit_stats gives it.
        let all = |v: StoredValues<'_>| v.widen_range(0, v.len());
        let (r, t) = (all(reference), all(test));
        let o = oracle.map(all);
        return [
            logit_stats(&r, &t, vocab),
            o.as_ref().and_then(|o| logit_stats(o, &r, vocab)),
            o.as_ref().and_then(|o| logit_stats(o, &t, vocab)),
        ];
    }
    use rayon::prelude::*;
    let positions = len / vocab;
    let k = TOP_K.min(vocab);
    let per_position: Vec<[PositionAgreement; 3]> = (0..positions)
        .into_par_iter()
        .map(|pos| {
            let r = LogitRow::new(reference, pos, vocab, k);
            let t = LogitRow::new(test, pos, vocab, k);
            let rt_kl = if r.finite && t.finite {
                kl_sums(&r.log_probs, [Some(&t.log_probs), None])[0]
            } else {
                0.0
            };
            let rt = PositionAgreement::of(&r, &t, rt_kl);
            let Some(oracle) = oracle else {
                return [
                    rt,
                    PositionAgreement::NonFinite,
                    PositionAgreement::NonFinite,
                ];
            };
            let o = LogitRow::new(oracle, pos, vocab, k);
            let (lr, lt) = (&r.log_probs[..], &t.log_probs[..]);
            let [or_kl, ot_kl] = if o.finite {
                kl_sums(
                    &o.log_probs,
                    [r.finite.then_some(lr), t.finite.then_some(lt)],
                )
            } else {
                [0.0; 2]
            };
            [
                rt,
                PositionAgreement::of(&o, &r, or_kl),
                PositionAgreement::of(&o, &t, ot_kl),
            ]
        })
        .collect();
    let pair = |i: usize| -> Vec<PositionAgreement> { per_position.iter().map(|p| p[i]).collect() };
    [
        Some(combine_positions(&pair(0), vocab, k)),
        oracle.map(|_| combine_positions(&pair(1), vocab, k)),
        oracle.map(|_| combine_positions(&pair(2), vocab, k)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debug text compares NaN fields too (`NaN != NaN`), and prints every bit that matters.
    fn same<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    /// A small deterministic generator (xorshift), so the tests need no crate.
    fn values(seed: u64, n: usize, specials: &[(usize, f64)]) -> Vec<f64> {
        let mut x = seed | 1;
        let mut v: Vec<f64> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 11) as f64 / (1u64 << 53) as f64;
                (u - 0.5) * 10f64.powi((x % 7) as i32 - 3)
            })
            .collect();
        for &(i, s) in specials {
            if i < n {
                v[i] = s;
            }
        }
        v
    }

    /// The fused statistics against the simple ones, on f64 and on f32 storage.
    fn check(r: &[f64], t: &[f64], o: &[f64], shape: &[usize]) {
        let (rs, ts, os) = (
            StoredValues::F64(r),
            StoredValues::F64(t),
            StoredValues::F64(o),
        );
        let (rt, vs) = diff_stats_fused(rs, ts, Some(os), shape);
        let (ro, to) = vs.unwrap();
        assert!(same(&rt, &diff_stats(r, t, shape)), "{rt:?}");
        assert!(same(&ro, &diff_stats(o, r, shape)), "{ro:?}");
        assert!(same(&to, &diff_stats(o, t, shape)), "{to:?}");
        let (alone, none) = diff_stats_fused(rs, ts, None, shape);
        assert!(none.is_none() && same(&alone, &rt));
        let r32: Vec<f32> = r.iter().map(|&x| x as f32).collect();
        let t32: Vec<f32> = t.iter().map(|&x| x as f32).collect();
        let (rw, tw): (Vec<f64>, Vec<f64>) = (
            r32.iter().map(|&x| x as f64).collect(),
            t32.iter().map(|&x| x as f64).collect(),
        );
        let (rt32, vs32) = diff_stats_fused(
            StoredValues::F32(&r32),
            StoredValues::F32(&t32),
            Some(os),
            shape,
        );
        assert!(same(&rt32, &diff_stats(&rw, &tw, shape)));
        let (ro32, to32) = vs32.unwrap();
        assert!(same(&ro32, &diff_stats(o, &rw, shape)));
        assert!(same(&to32, &diff_stats(o, &tw, shape)));
        if let Some(&vocab) = shape.last() {
            let [a, b, c] = logit_stats_fused(rs, ts, Some(os), vocab);
            assert!(same(&a, &logit_stats(r, t, vocab)), "{a:?}");
            assert!(same(&b, &logit_stats(o, r, vocab)), "{b:?}");
            assert!(same(&c, &logit_stats(o, t, vocab)), "{c:?}");
            let [a1, b1, c1] = logit_stats_fused(rs, ts, None, vocab);
            assert!(same(&a1, &a) && b1.is_none() && c1.is_none());
        }
    }

    #[test]
    fn fused_statistics_equal_the_simple_ones_bit_for_bit() {
        let n = 3 * FUSED_CHUNK + 17;
        let shape = [1, n / 37 + 1, 37];
        let n = shape.iter().product();
        let o = values(1, n, &[]);
        let near = |seed, scale: f64| -> Vec<f64> {
            let noise = values(seed, n, &[]);
            o.iter().zip(noise).map(|(a, e)| a + e * scale).collect()
        };
        let (r, t) = (near(2, 1e-3), near(3, 1e-5));
        check(&r, &t, &o, &shape);
        // Identical sides, all zeros, one side zero.
        check(&o, &o, &o, &shape);
        let zeros = vec![0.0; n];
        check(&zeros, &zeros, &zeros, &shape);
        check(&zeros, &r, &o, &shape);
        check(&r, &zeros, &zeros, &shape);
        // Tiny values (the relative difference's floor and the skip test's subnormal guard),
        // huge ones (overflowing differences), signed zeros.
        let tiny: Vec<f64> = r.iter().map(|x| x * 1e-310).collect();
        check(&tiny, &t, &o, &shape);
        let huge = values(4, n, &[(5, f64::MAX), (6, -f64::MAX), (700, 1e-320)]);
        let huge2 = values(5, n, &[(5, -f64::MAX), (6, f64::MAX), (9, -0.0)]);
        check(&huge, &huge2, &o, &shape);
        // Non-finite values on each side, alone and together, first and late.
        for (at, v) in [
            (0, f64::NAN),
            (40, f64::INFINITY),
            (n - 1, f64::NEG_INFINITY),
        ] {
            let bad_r = values(2, n, &[(at, v)]);
            let bad_t = values(3, n, &[(at + 1.min(n - 1 - at), v), (900, f64::NAN)]);
            let bad_o = values(1, n, &[(at, f64::INFINITY)]);
            check(&bad_r, &t, &o, &shape);
            check(&r, &bad_t, &o, &shape);
            check(&r, &t, &bad_o, &shape);
            check(&bad_r, &bad_t, &bad_o, &shape);
            check(&bad_r, &bad_r, &bad_r, &shape);
        }
        check(&[], &[], &[], &[0]);
        check(&[1.0], &[f64::NAN], &[1.0], &[1]);
    }

    #[test]
    fn fused_statistics_fall_back_on_unequal_lengths() {
        let (a, b) = (values(1, 100, &[]), values(2, 90, &[(3, f64::NAN)]));
        let (rt, vs) = diff_stats_fused(
            StoredValues::F64(&a),
            StoredValues::F64(&b),
            Some(StoredValues::F64(&a[..95])),
            &[100],
        );
        assert!(same(&rt, &diff_stats(&a, &b, &[100])));
        let (ro, to) = vs.unwrap();
        assert!(same(&ro, &diff_stats(&a[..95], &a, &[100])));
        assert!(same(&to, &diff_stats(&a[..95], &b, &[100])));
        let l = logit_stats_fused(StoredValues::F64(&a), StoredValues::F64(&b), None, 10);
        assert!(same(&l[0], &logit_stats(&a, &b, 10)) && l[0].is_none());
        let l = logit_stats_fused(StoredValues::F64(&a), StoredValues::F64(&a), None, 0);
        assert!(l[0].is_none());
    }
}
