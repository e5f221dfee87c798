//! RMSNorm, as `transformers` computes it: `weight * (x * rsqrt(mean(x²) + eps))`.
//!
//! In bf16 the normalized value is rounded to bf16 before the weight multiplies it, and the
//! product is rounded again (HF's two roundings). The statistics are computed in the compute precision (float32 in the f32 tier, which is what
//! HF does for float32 models; float64 in the exact tier, where HF's float32 step is lifted).

use super::Float;

/// Normalizes each row of `x` (`rows × weight.len()`) into `out`.
pub fn rms_norm<T: Float>(x: &[T], weight: &[T], eps: f64, out: &mut [T]) {
    let h = weight.len();
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % h, 0);
    let eps = T::from_f64(eps);
    for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let mut ss = T::ZERO;
        for &v in row {
            ss += v * v;
        }
        let mean = ss / T::from_f64(h as f64);
        let inv = T::ONE / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = (w * (v * inv).round()).round();
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

    #[test]
    fn matches_reference_and_definition() {
        let x = [3.0f64, 4.0, -1.0, 2.0];
        let w = [0.5f64, 2.0];
        let mut o = [0.0; 4];
        rms_norm(&x, &w, 1e-6, &mut o);
        assert_eq!(o.to_vec(), rms_norm_reference(&x, &w, 1e-6));
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
}
