//! [`super::linear_q8dot`]: `y = x · Wᵀ (+ b)` for a block-quantized `W` in the fast `q8dot`
//! mode, llama.cpp's CPU arithmetic: each activation row is quantized once to the weight's
//! 8-bit activation format ([`quant::q8act`]), then each output is the integer dot of a stored
//! weight row with it ([`quant::dot_scalar`], on AVX2 `quant::dot_avx2`), the rows split over
//! rayon tasks as [`super::linear`] splits them; the bias is added in f32.

use super::{task_rows, Dst, TASKS_PER_THREAD};
use crate::kernels::quant::{self, q8act::ActFormat, q8act::Q8Acts};
use crate::weights::Tensor;

/// The body of [`super::linear_q8dot`]; `simd` false forces the portable path (the tests).
pub(super) fn linear(
    simd: bool,
    x: &[f32],
    n: usize,
    w: &Tensor,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let Some(format) = ActFormat::for_weight(w.dtype) else {
        panic!(
            "linear_q8dot: the weight is {:?}, not a block-quantized (GGUF) dtype",
            w.dtype
        );
    };
    let (m, k) = (w.shape[0], w.shape[1]);
    assert_eq!(x.len(), n * k, "linear_q8dot: input length");
    assert_eq!(out.len(), n * m, "linear_q8dot: output length");
    if let Some(b) = bias {
        assert_eq!(b.len(), m, "linear_q8dot: bias length");
    }
    let row = w
        .dtype
        .row_bytes(k)
        .unwrap_or_else(|e| panic!("linear_q8dot: {e}"));
    assert_eq!(w.bytes().len(), m * row, "linear_q8dot: weight bytes");
    if n == 0 || m == 0 {
        return;
    }
    let acts = Q8Acts::quantize(format, x, n, k);
    #[cfg(target_arch = "x86_64")]
    let simd = simd && quant::dot_avx2::available();
    let rows_per_task = task_rows(m, row, TASKS_PER_THREAD);
    let dst = Dst {
        ptr: out.as_mut_ptr(),
        row_len: m,
    };
    let bytes = w.bytes();
    crate::team::for_each(m.div_ceil(rows_per_task), |task| {
        let rows = task * rows_per_task..((task + 1) * rows_per_task).min(m);
        // SAFETY: tasks own disjoint row ranges, so each output entry is written by one task.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            let done = simd && {
                quant::dot_avx2::sums(w.dtype, &acts, bytes, m, rows.clone(), dst.ptr);
                true
            };
            #[cfg(not(target_arch = "x86_64"))]
            let done = false;
            for t in 0..n {
                let o = dst.row(t, rows.clone());
                if !done {
                    for (o, j) in o.iter_mut().zip(rows.clone()) {
                        let wr = &bytes[j * row..(j + 1) * row];
                        *o = quant::dot_scalar::dot(w.dtype, wr, &acts, t);
                    }
                }
                if let Some(b) = bias {
                    for (o, &b) in o.iter_mut().zip(&b[rows.clone()]) {
                        *o += b;
                    }
                }
            }
        }
    });
    let _ = simd;
}

#[cfg(test)]
mod tests {
    use super::super::tests::pseudo;
    use super::super::Kernel;
    use super::super::{linear_with, PassKind};
    use super::*;
    use crate::kernels::quant::decode_blocks;
    use crate::kernels::quant::tests::{activations, random_blocks, zero_quants, BLOCK_TYPES};
    use crate::weights::StoredDtype;

    /// A `[m, k]` tensor of random blocks of `dtype`, with its dequantized values and those of
    /// its blocks with the quants zeroed (the mins and offsets).
    fn weight(dtype: StoredDtype, m: usize, k: usize, seed: u64) -> (Tensor, Vec<f32>, Vec<f32>) {
        let b = random_blocks(dtype, m * k / dtype.block_len(), seed, 0.05);
        let mut w = vec![0f32; m * k];
        decode_blocks(dtype, &b, &mut w);
        let mut w0 = vec![0f32; m * k];
        decode_blocks(dtype, &zero_quants(dtype, &b), &mut w0);
        (Tensor::from_bytes(dtype, vec![m, k], b), w, w0)
    }

    /// The entry point against the reference dot per (row, token), and the SIMD path against
    /// the portable one, for token counts of decode and prefill (7, 64) and with bias; shapes
    /// of several tasks and row tails.
    #[test]
    fn linear_q8dot_is_the_reference_dot_plus_bias() {
        for (dtype, _) in BLOCK_TYPES {
            let per = dtype.block_len();
            let (m, k) = (if per == 32 { 301 } else { 67 }, 4 * per);
            let (w, wd, w0) = weight(dtype, m, k, 21);
            let bias = pseudo(m, 5);
            for n in [1, 2, 3, 7, 64] {
                let x = activations(n, k, 30 + n as u64);
                let acts = Q8Acts::quantize(ActFormat::for_weight(dtype).unwrap(), &x, n, k);
                let mut port = vec![f32::NAN; n * m];
                linear(false, &x, n, &w, Some(&bias), &mut port);
                let mut fast = vec![f32::NAN; n * m];
                linear(true, &x, n, &w, Some(&bias), &mut fast);
                let mut nob = vec![f32::NAN; n * m];
                crate::kernels::matmul::linear_q8dot(&x, n, &w, None, &mut nob);
                let row = w.bytes().len() / m;
                for t in 0..n {
                    for j in 0..m {
                        let d =
                            quant::dot_scalar::dot(dtype, &w.bytes()[j * row..][..row], &acts, t);
                        let i = t * m + j;
                        assert_eq!(
                            port[i].to_bits(),
                            (d + bias[j]).to_bits(),
                            "{dtype:?} n={n}"
                        );
                        // SIMD: f32 reordering only (the bound of `quant::dot_tests`).
                        let mag: f64 = (0..k)
                            .map(|e| {
                                let a = acts.d[(t * k + e) / acts.format.block_len()] as f64
                                    * acts.qs[t * k + e] as f64;
                                (wd[j * k + e].abs() + w0[j * k + e].abs()) as f64 * a.abs()
                            })
                            .sum();
                        let tol = 2.0 * ((k / per) as f64 + 12.0) * f32::EPSILON as f64 * mag;
                        assert!(
                            ((fast[i] - d - bias[j]) as f64).abs()
                                <= tol + (d.abs() + bias[j].abs()) as f64 * 2.4e-7,
                            "{dtype:?} n={n} [{t}][{j}]: {} vs {}",
                            fast[i],
                            d + bias[j]
                        );
                        assert!(
                            ((nob[i] - d) as f64).abs() <= tol,
                            "{dtype:?} n={n} no bias"
                        );
                    }
                }
            }
        }
    }

    /// The q8dot result is close to the exact f32 `linear` on the same weights. q8dot computes
    /// `Σ w_i·a_i` (`a = d·q`, the dequantized activations) plus, for Q8_1, `m·(s - Σ a)` per
    /// block, so it is within `Σ_i |w_i|·0.57·d_b(i)` of exact (`|x - d·q| <= d/2`, plus `d`'s
    /// f16 rounding over up to 127 steps: `2^-11·127 < 0.07` of a step), plus Q8_1's f16 `s`
    /// (`|m|·(Σ|x| + 0.6·d)·2^-10` per block) and f32 summation error on both sides
    /// (`(k/8 + nb + 24)·ε·Σ(|w| + |w0|)·|x|`). The activations have a positive mean, so a
    /// dropped block, min or scale exceeds the bound (checked by hand: dropping Q4_K's or Q4_1's
    /// min term fails it).
    #[test]
    fn q8dot_is_close_to_exact_linear() {
        for (dtype, _) in BLOCK_TYPES {
            let per = dtype.block_len();
            let format = ActFormat::for_weight(dtype).unwrap();
            let (m, k, n) = (40, 8 * per, 3);
            let (w, wd, w0) = weight(dtype, m, k, 8);
            let x: Vec<f32> = activations(n, k, 12).iter().map(|v| v + 0.3).collect();
            let acts = Q8Acts::quantize(format, &x, n, k);
            let mut exact = vec![0f32; n * m];
            linear_with(
                Kernel::Portable,
                PassKind::Prefill,
                &x,
                n,
                &w,
                None,
                &mut exact,
            );
            let mut fast = vec![0f32; n * m];
            crate::kernels::matmul::linear_q8dot(&x, n, &w, None, &mut fast);
            let sum_err = (k / 8 + k / per + 24) as f64 * f32::EPSILON as f64;
            let mut worst = 0f64;
            for t in 0..n {
                for j in 0..m {
                    let mut tol = 0f64;
                    for e in 0..k {
                        let (wv, w0v, xv) =
                            (wd[j * k + e].abs(), w0[j * k + e].abs(), x[t * k + e].abs());
                        let db = acts.d[(t * k + e) / per].abs();
                        tol += (wv * 0.57 * db) as f64 + sum_err * ((wv + w0v) * xv) as f64;
                        if format == ActFormat::Q8_1 {
                            tol += (w0v * (xv + 0.6 * db) / 1024.0) as f64;
                        }
                    }
                    let err = (fast[t * m + j] - exact[t * m + j]) as f64;
                    assert!(
                        err.abs() <= tol,
                        "{dtype:?} [{t}][{j}]: q8dot {} vs exact {} (tol {tol})",
                        fast[t * m + j],
                        exact[t * m + j]
                    );
                    worst = worst.max(err.abs() / tol);
                }
            }
            // The bound is not vacuous: the error uses a fair part of it somewhere.
            assert!(worst > 0.01, "{dtype:?}: worst error {worst} of the bound");
            eprintln!("{dtype:?}: worst error {worst:.3} of the bound");
        }
    }

    #[test]
    #[should_panic(expected = "not a block-quantized")]
    fn float_weights_are_refused() {
        let (_d, w) =
            super::super::tests::tensor_from(&[0.0; 64], vec![2, 32], safetensors::Dtype::F32);
        crate::kernels::matmul::linear_q8dot(&[0.0; 32], 1, &w, None, &mut [0.0; 2]);
    }
}

/// One-thread (or `Q8DOT_THREADS`) decode throughput (`n = 1`, or `Q8DOT_N` tokens) of the q8dot kernels against
/// the exact kernels (for decode, the fused block kernels), in GB/s of stored weight bytes, on 0.5B-shaped matrices (896 → 4864, 4864 → 896)
/// cycled through a working set larger than the L3 cache. Not in CI: run with
/// `cargo test --release -p lockstep-engine --lib -- --ignored bench_q8dot --nocapture`.
#[cfg(test)]
mod bench {
    use super::super::{linear_with, Kernel, PassKind};
    use crate::kernels::quant::tests::{random_blocks, BLOCK_TYPES};
    use crate::weights::Tensor;
    use std::time::Instant;

    #[test]
    #[ignore]
    fn bench_q8dot_decode() {
        let threads = std::env::var("Q8DOT_THREADS").map_or(1, |v| v.parse().unwrap());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let only = std::env::var("Q8DOT_TYPES").unwrap_or_default();
        for (dtype, _) in BLOCK_TYPES {
            if !only.is_empty() && !only.split(',').any(|t| t == format!("{dtype:?}")) {
                continue;
            }
            let per = dtype.block_len();
            // ~160 MB of weights (or ~4 MB, in cache, with `Q8DOT_CACHED`): 2 shapes x
            // `copies`; K-quant rows need k a multiple of 256 (the 0.5B model's are 4864 long).
            let shapes = if per == 32 {
                [(4864, 896), (896, 4864)]
            } else {
                [(896, 4864), (1536, 4864)]
            };
            let one: usize = shapes.iter().map(|&(m, k)| m * k).sum();
            let bytes_per = dtype.bytes_for(one).unwrap();
            let set = if std::env::var("Q8DOT_CACHED").is_ok() {
                4usize << 20
            } else {
                160 << 20
            };
            let copies = set.div_ceil(bytes_per);
            let ws: Vec<Tensor> = (0..copies)
                .flat_map(|c| {
                    shapes.map(|(m, k)| {
                        let b = random_blocks(dtype, m * k / per, 1 + c as u64, 0.05);
                        Tensor::from_bytes(dtype, vec![m, k], b)
                    })
                })
                .collect();
            let total: usize = ws.iter().map(|w| w.bytes().len()).sum();
            let n: usize = std::env::var("Q8DOT_N").map_or(1, |v| v.parse().unwrap());
            let x: Vec<f32> = super::super::tests::pseudo(n * 4864, 3);
            let mut out = vec![0f32; n * 4864];
            let mut time = |q8: bool| {
                let mut best = f64::INFINITY;
                for _ in 0..if total < 64 << 20 { 100 } else { 3 } {
                    let t = Instant::now();
                    for w in &ws {
                        let (m, k) = (w.shape[0], w.shape[1]);
                        pool.install(|| {
                            if q8 {
                                crate::kernels::matmul::linear_q8dot(
                                    &x[..n * k],
                                    n,
                                    w,
                                    None,
                                    &mut out[..n * m],
                                )
                            } else {
                                let (x, o) = (&x[..n * k], &mut out[..n * m]);
                                linear_with(Kernel::Avx2, PassKind::Prefill, x, n, w, None, o)
                            }
                        });
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                total as f64 / best / 1e9
            };
            let (exact, fast) = (time(false), time(true));
            eprintln!(
                "{dtype:?} n={n} threads={threads}: {} MB, exact {exact:.1} GB/s, q8dot {fast:.1} GB/s ({:.2}x)",
                total >> 20,
                fast / exact
            );
        }
    }
}
