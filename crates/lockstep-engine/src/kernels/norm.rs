//! RMSNorm, as `transformers` computes it: `weight * (x * rsqrt(mean(x²) + eps))`.
//!
//! [`rms_norm_with`] also computes two porting mistakes (fault injection): the variance rounded to
//! bf16, and eps outside the square root.
//!
//! In bf16 the normalized value is rounded to bf16 before the weight multiplies it, and the
//! product is rounded again (HF's two roundings). The statistics are computed in the compute precision (float32 in the f32 tier, which is what
//! HF does for float32 models; float64 in the exact tier, where HF's float32 step is lifted).

use super::{round_bf16, Float};

/// How the normalizing factor is computed: HF's way, or one of the porting mistakes that
/// fault injection puts in (`crate::faults`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmsNormMath {
    /// `rsqrt(mean(x²) + eps)` with the statistics in the compute precision, as HF does.
    Careful,
    /// The variance in bf16, as a port that forgets to upcast computes it: each `x²` rounded to
    /// bf16 and `mean(x²)` rounded to bf16 (the sum accumulates in the compute precision, as
    /// JAX's `mean` of a bf16 array does); `+ eps`, rsqrt and the normalization then as careful.
    VarianceBf16,
    /// `x / (sqrt(mean(x²)) + eps)` instead of `x * rsqrt(mean(x²) + eps)`.
    EpsOutsideSqrt,
}

/// Σ f(v) over `row` by pairwise summation (blocks of 16 summed in order, blocks combined
/// pairwise): error O(log n) ulps, as PyTorch's cascade reductions give, where a plain running sum
/// of n positive terms drifts by up to n/2 ulps (measured on Qwen2.5-0.5B's 896-wide rows: a
/// running sum made lockstep's f32 RMSNorm 13× the reference's own row bias, caught by the
/// op-level judgement).
fn pairwise_sum<T: Float>(row: &[T], f: &impl Fn(T) -> T) -> T {
    if row.len() <= 16 {
        let mut s = T::ZERO;
        for &v in row {
            s += f(v);
        }
        return s;
    }
    let (a, b) = row.split_at(row.len() / 2);
    pairwise_sum(a, f) + pairwise_sum(b, f)
}

/// Normalizes each row of `x` (`rows × weight.len()`) into `out`.
pub fn rms_norm<T: Float>(x: &[T], weight: &[T], eps: f64, out: &mut [T]) {
    rms_norm_with(x, weight, eps, RmsNormMath::Careful, out)
}

/// [`rms_norm`] with the normalizing factor computed as `math` says. Rows are independent: a
/// long prompt's are spread over threads, `ROWS_PER_TASK` at a time.
pub fn rms_norm_with<T: Float>(x: &[T], weight: &[T], eps: f64, math: RmsNormMath, out: &mut [T]) {
    let h = weight.len();
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % h, 0);
    if h == 0 {
        return;
    }
    let rows = |x: &[T], out: &mut [T]| {
        #[cfg(target_arch = "x86_64")]
        if super::as_f32(x).is_some()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU has the features the function is compiled with.
            return unsafe { norm_rows_avx512(x, weight, eps, math, out) };
        }
        norm_rows(x, weight, eps, math, out)
    };
    if x.len() / h >= 2 * ROWS_PER_TASK {
        use rayon::prelude::*;
        x.par_chunks(h * ROWS_PER_TASK)
            .zip(out.par_chunks_mut(h * ROWS_PER_TASK))
            .for_each(|(x, o)| rows(x, o));
    } else {
        rows(x, out)
    }
}

/// Rows of [`rms_norm_with`] per task on the thread pool.
const ROWS_PER_TASK: usize = 32;

/// [`norm_rows`] compiled for AVX-512: the same element-wise operations on sixteen lanes (never
/// fused or reordered, so the same bits).
///
/// # Safety
/// The CPU has AVX-512F/BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn norm_rows_avx512<T: Float>(
    x: &[T],
    weight: &[T],
    eps: f64,
    math: RmsNormMath,
    out: &mut [T],
) {
    norm_rows(x, weight, eps, math, out)
}

/// The rows of `x` normalized into `out`, one after another (the body of [`rms_norm_with`]).
#[inline(always)]
fn norm_rows<T: Float>(x: &[T], weight: &[T], eps: f64, math: RmsNormMath, out: &mut [T]) {
    let h = weight.len();
    let eps = T::from_f64(eps);
    for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let inv = match math {
            RmsNormMath::Careful => {
                let ss = pairwise_sum(row, &|v| v * v);
                let mean = ss / T::from_f64(h as f64);
                // rsqrt rounded once (1/sqrt rounds twice: up to ~1 ulp on every element of the
                // row, the same way, which the op-level row-bias statistic sees).
                T::from_f64(1.0 / (mean + eps).to_f64().sqrt())
            }
            RmsNormMath::VarianceBf16 => {
                let ss = pairwise_sum(row, &|v| round_bf16(v * v));
                let mean = round_bf16(ss / T::from_f64(h as f64));
                T::ONE / (mean + eps).sqrt()
            }
            RmsNormMath::EpsOutsideSqrt => {
                let ss = pairwise_sum(row, &|v| v * v);
                let mean = ss / T::from_f64(h as f64);
                T::ONE / (mean.sqrt() + eps)
            }
        };
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = (w * (v * inv).to_act_dtype()).to_act_dtype();
        }
    }
}

/// Plain f64 reference used by the tests.
pub fn rms_norm_reference(x: &[f64], weight: &[f64], eps: f64) -> Vec<f64> {
    let h = weight.len();
    x.chunks(h)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / h as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            row.iter()
                .zip(weight)
                .map(move |(v, w)| w * (v * inv))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many rows at once (spread over threads, the AVX-512 build where the CPU has it) give the
    /// bits of the plain loop on each row alone, in every compute type and every way of
    /// computing the factor.
    #[test]
    fn rows_together_are_each_rows_bits() {
        fn check<T: Float>(math: RmsNormMath) {
            let (h, rows) = (96, 150);
            let mut seed = 17u64;
            let mut next = || {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                T::from_f64(((seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 6.0).to_act_dtype()
            };
            let x: Vec<T> = (0..h * rows).map(|_| next()).collect();
            let w: Vec<T> = (0..h).map(|_| next()).collect();
            let mut all = vec![T::ZERO; x.len()];
            rms_norm_with(&x, &w, 1e-6, math, &mut all);
            for (r, got) in all.chunks_exact(h).enumerate() {
                let mut one = vec![T::ZERO; h];
                norm_rows(&x[r * h..(r + 1) * h], &w, 1e-6, math, &mut one);
                let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(got) == bits(&one),
                    "{:?} {math:?} row {r}",
                    T::PRECISION
                );
            }
        }
        for math in [
            RmsNormMath::Careful,
            RmsNormMath::VarianceBf16,
            RmsNormMath::EpsOutsideSqrt,
        ] {
            check::<f64>(math);
            check::<f32>(math);
            check::<crate::kernels::Bf16>(math);
        }
    }
    use crate::kernels::Bf16;

    #[test]
    fn matches_reference_and_definition() {
        let x = [3.0f64, 4.0, -1.0, 2.0];
        let w = [0.5f64, 2.0];
        let mut o = [0.0; 4];
        rms_norm(&x, &w, 1e-6, &mut o);
        assert!(max_rel(&o, &rms_norm_reference(&x, &w, 1e-6)) < 1e-15);
        // Row 0: rms = sqrt(12.5).
        let inv = 1.0 / (12.5f64 + 1e-6).sqrt();
        assert!((o[0] - 0.5 * 3.0 * inv).abs() < 1e-15);
        assert!((o[1] - 2.0 * 4.0 * inv).abs() < 1e-15);
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let wf: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let mut of = [0f32; 4];
        rms_norm(&xf, &wf, 1e-6, &mut of);
        for (a, b) in of.iter().zip(o) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
    }

    /// Rows of pseudo-random values around `scale`, and a weight near 1.
    fn rows(n: usize, h: usize, scale: f64) -> (Vec<f64>, Vec<f64>) {
        let mut seed = 11u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let x = (0..n * h).map(|_| scale * rnd()).collect();
        let w = (0..h).map(|_| 1.0 + 0.2 * rnd()).collect();
        (x, w)
    }

    /// Largest |a - b| / |b| over the elements.
    fn max_rel(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(a, b)| ((a - b) / b).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn careful_math_is_the_plain_kernel_and_the_reference() {
        let (x, w) = rows(4, 64, 0.1);
        let mut a = vec![0.0; x.len()];
        let mut b = vec![0.0; x.len()];
        rms_norm(&x, &w, 1e-6, &mut a);
        rms_norm_with(&x, &w, 1e-6, RmsNormMath::Careful, &mut b);
        assert_eq!(a, b);
        // The kernel sums pairwise, the reference in order: equal to f64 rounding.
        assert!(max_rel(&a, &rms_norm_reference(&x, &w, 1e-6)) < 1e-14);
    }

    #[test]
    fn variance_in_bf16_is_off_by_bf16_rounding_in_every_tier() {
        let (x, w) = rows(8, 64, 0.1);
        let want = rms_norm_reference(&x, &w, 1e-6);
        // f64: each x² and the mean are off by at most bf16's unit roundoff (2^-8 relative), so
        // the mean by at most 2 × 2^-8, the output by at most 2^-8 (rsqrt halves it): bf16-sized,
        // and far above f64's own error.
        let mut o = vec![0.0; x.len()];
        rms_norm_with(&x, &w, 1e-6, RmsNormMath::VarianceBf16, &mut o);
        let rel = max_rel(&o, &want);
        assert!(rel > 1e-5 && rel <= 2f64.powi(-8) * 1.01, "f64: {rel:e}");
        // f32: same size, far above f32's own error.
        let (xf, wf): (Vec<f32>, Vec<f32>) = (
            x.iter().map(|&v| v as f32).collect(),
            w.iter().map(|&v| v as f32).collect(),
        );
        let mut of = vec![0f32; x.len()];
        rms_norm_with(&xf, &wf, 1e-6, RmsNormMath::VarianceBf16, &mut of);
        let of: Vec<f64> = of.iter().map(|&v| v as f64).collect();
        let rel = max_rel(&of, &want);
        assert!(
            rel > 1e-5 && rel <= 2f64.powi(-8) * 1.01 + 1e-6,
            "f32: {rel:e}"
        );
        // bf16: the output is rounded to bf16 anyway, so the fault moves some elements by a
        // bf16 ulp and leaves others alone.
        let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(v as f32).to_act_dtype()).collect();
        let wb: Vec<Bf16> = w.iter().map(|&v| Bf16(v as f32).to_act_dtype()).collect();
        let mut careful = vec![Bf16(0.0); x.len()];
        let mut faulty = vec![Bf16(0.0); x.len()];
        rms_norm(&xb, &wb, 1e-6, &mut careful);
        rms_norm_with(&xb, &wb, 1e-6, RmsNormMath::VarianceBf16, &mut faulty);
        let moved = careful.iter().zip(&faulty).filter(|(a, b)| a != b).count();
        assert!(moved > 0, "bf16: the fault changes some elements");
        for (a, b) in careful.iter().zip(&faulty) {
            // A 2^-8 change before two roundings to bf16: at most a few bf16 ulps.
            assert!(
                ((a.0 - b.0) / a.0).abs() <= 3.0 * 2f32.powi(-7),
                "{a:?} vs {b:?}"
            );
        }
    }

    #[test]
    fn eps_outside_the_sqrt_changes_the_factor_by_the_exact_ratio() {
        // rms ≈ 0.003: the factor changes by ≈ eps / (2 mean(x²)) - eps / rms ≈ +6%.
        let (x, w) = rows(4, 64, 0.01);
        let eps = 1e-6;
        let mut o = vec![0.0; x.len()];
        rms_norm_with(&x, &w, eps, RmsNormMath::EpsOutsideSqrt, &mut o);
        for (r, (got, want)) in o
            .chunks(64)
            .zip(rms_norm_reference(&x, &w, eps).chunks(64))
            .enumerate()
        {
            let row = &x[r * 64..(r + 1) * 64];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / 64.0;
            // Exact ratio of the two factors: sqrt(ms + eps) / (sqrt(ms) + eps).
            let ratio = (ms + eps).sqrt() / (ms.sqrt() + eps);
            assert!((ratio - 1.0).abs() > 1e-2, "a visible change: {ratio}");
            for (g, w) in got.iter().zip(want) {
                assert!((g / w - ratio).abs() < 1e-12, "{g} vs {w} × {ratio}");
            }
        }
    }
}
