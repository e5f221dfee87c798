//! `y = x · Wᵀ (+ b)`: the linear layers, with `W` kept in its stored dtype.
//!
//! [`linear`] decodes blocks of weight rows once and reuses them for every token, spread over
//! threads with rayon; [`linear_reference`] is the plain triple loop it is tested against.

use super::Float;
use crate::weights::Tensor;
use rayon::prelude::*;

/// Dot product with eight independent accumulators (vectorizes, and keeps rounding error low).
#[inline]
pub fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    assert_eq!(a.len(), b.len());
    let mut acc = [T::ZERO; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = T::ZERO;
    for (&x, &y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `out[n][m] = x[n][k] · w[m][k] + bias[m]` for a `[m, k]` weight in any stored dtype.
pub fn linear<T: Float>(x: &[T], n: usize, w: &Tensor, bias: Option<&[T]>, out: &mut [T]) {
    let (m, k) = (w.shape[0], w.shape[1]);
    assert_eq!(x.len(), n * k, "linear: input length");
    assert_eq!(out.len(), n * m, "linear: output length");
    if let Some(b) = bias {
        assert_eq!(b.len(), m);
    }
    // Enough blocks for the threads, few enough that decoding cost is amortized.
    let block = (m / (4 * rayon::current_num_threads()).max(1)).clamp(1, 64);
    let blocks: Vec<(usize, Vec<T>)> = (0..m.div_ceil(block))
        .into_par_iter()
        .map(|bi| {
            let r0 = bi * block;
            let r1 = (r0 + block).min(m);
            let mut wrows = vec![T::ZERO; (r1 - r0) * k];
            let sz = w.dtype.size();
            T::decode(w.dtype, &w.bytes()[r0 * k * sz..r1 * k * sz], &mut wrows);
            let mut res = vec![T::ZERO; n * (r1 - r0)];
            for t in 0..n {
                let xt = &x[t * k..(t + 1) * k];
                for (j, wr) in wrows.chunks_exact(k).enumerate() {
                    let mut v = dot(xt, wr);
                    if let Some(b) = bias {
                        v += b[r0 + j];
                    }
                    res[t * (r1 - r0) + j] = v.round();
                }
            }
            (r0, res)
        })
        .collect();
    for (r0, res) in blocks {
        let w = res.len() / n;
        for t in 0..n {
            out[t * m + r0..t * m + r0 + w].copy_from_slice(&res[t * w..(t + 1) * w]);
        }
    }
}

/// Plain reference: decode the whole weight, triple loop, sequential sums.
pub fn linear_reference<T: Float>(x: &[T], n: usize, w: &Tensor, bias: Option<&[T]>) -> Vec<T> {
    let (m, k) = (w.shape[0], w.shape[1]);
    let mut wd = vec![T::ZERO; m * k];
    T::decode(w.dtype, w.bytes(), &mut wd);
    let mut out = vec![T::ZERO; n * m];
    for t in 0..n {
        for j in 0..m {
            let mut s = T::ZERO;
            for i in 0..k {
                s += x[t * k + i] * wd[j * k + i];
            }
            out[t * m + j] = (s + bias.map_or(T::ZERO, |b| b[j])).round();
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::weights::Checkpoint;

    /// Writes a one-tensor checkpoint and returns the tensor (kept alive by its map).
    pub(crate) fn tensor_from(
        vals: &[f32],
        shape: Vec<usize>,
        dtype: safetensors::Dtype,
    ) -> (tempfile::TempDir, Tensor) {
        let bytes: Vec<u8> = match dtype {
            safetensors::Dtype::BF16 => vals
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let d = tempfile::tempdir().unwrap();
        let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), &bytes).unwrap();
        safetensors::serialize_to_file(
            vec![("w".to_string(), view)],
            None,
            &d.path().join("model.safetensors"),
        )
        .unwrap();
        let c = Checkpoint::open(d.path()).unwrap();
        let t = c.get("w", &shape).unwrap();
        (d, t)
    }

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn fast_linear_matches_reference() {
        for dtype in [safetensors::Dtype::F32, safetensors::Dtype::BF16] {
            let (m, k, n) = (37, 29, 5);
            let (_d, w) = tensor_from(&pseudo(m * k, 1), vec![m, k], dtype);
            let x: Vec<f64> = pseudo(n * k, 2).iter().map(|&v| v as f64).collect();
            let b: Vec<f64> = pseudo(m, 3).iter().map(|&v| v as f64).collect();
            let mut out = vec![0.0; n * m];
            linear(&x, n, &w, Some(&b), &mut out);
            let r = linear_reference(&x, n, &w, Some(&b));
            for (a, c) in out.iter().zip(&r) {
                assert!((a - c).abs() < 1e-13, "{a} vs {c}");
            }
        }
    }
}
