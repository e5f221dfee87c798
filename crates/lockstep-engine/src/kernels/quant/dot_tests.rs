//! The AVX2 integer dot products ([`super::dot_avx2`]) against their reference
//! ([`super::dot_scalar`]): every block type, random blocks, several `k`, 1 to 5 tokens (tiles
//! of 1, 2 and 3 tokens), row ranges with tails and not starting at 0, weight scales tiny,
//! ordinary and large; and non-finite activations giving NaN outputs.
//!
//! **The bound.** Both sides compute the same exact integer sums per block (and sub-block); they
//! differ only in how the f32 products of those sums with the scales are rounded and added (the
//! reference: one sequential sum, or 8 lanes for K-quants; AVX2: FMAs into 8 lanes, then a tree).
//! Each side is within `(nb + 12)·ε·M` of the exact real sum, `nb` the blocks per row, `ε` the
//! f32 epsilon (twice the unit roundoff: a margin), and `M` a sum of absolute values bounding
//! every term and partial sum: `M = Σ_i (|w_i| + |w0_i|)·|a_i|`, `w` the dequantized weight,
//! `w0` the same block with its quants zeroed (its min or offset: `|d·q| <= |w| + |w0|`), `a`
//! the dequantized activation (`d·q`). The test allows twice that (both sides' errors).

use super::q8act::{ActFormat, Q8Acts};
use super::tests::{activations, random_blocks, zero_quants, BLOCK_TYPES};
use super::{block, decode_blocks, dot_avx2, dot_scalar};

/// `M` of the module docs for weight row `j` and token `t`.
fn magnitude(w: &[f32], w0: &[f32], a: &Q8Acts, j: usize, t: usize) -> f64 {
    let (k, per) = (a.k, a.format.block_len());
    (0..k)
        .map(|i| {
            let ai = a.d[(t * k + i) / per] as f64 * a.qs[t * k + i] as f64;
            (w[j * k + i].abs() as f64 + w0[j * k + i].abs() as f64) * ai.abs()
        })
        .sum()
}

#[test]
fn avx2_dots_match_the_reference() {
    assert!(dot_avx2::available(), "this CPU lacks AVX2/FMA/F16C");
    for (dtype, _) in BLOCK_TYPES {
        let (per, bb) = block(dtype);
        let format = ActFormat::for_weight(dtype).unwrap();
        let ks: &[usize] = if per == 32 {
            &[32, 96, 896]
        } else {
            &[256, 768, 1536]
        };
        for (ki, &k) in ks.iter().enumerate() {
            for (ci, scale) in [0.5f32, 1e-4, 60000.0].into_iter().enumerate() {
                let m = 11;
                let seed = 100 + (3 * ki + ci) as u64;
                let b = random_blocks(dtype, m * k / per, seed, scale);
                let mut w = vec![0f32; m * k];
                decode_blocks(dtype, &b, &mut w);
                let mut w0 = vec![0f32; m * k];
                decode_blocks(dtype, &zero_quants(dtype, &b), &mut w0);
                for n in 1..=5 {
                    let x = activations(n, k, seed + n as u64);
                    let a = Q8Acts::quantize(format, &x, n, k);
                    for rows in [0..m, 3..m - 1] {
                        let mut got = vec![f32::NAN; n * m];
                        // SAFETY: checked above; `[m, k]` blocks, `n·m` outputs, one caller.
                        unsafe { dot_avx2::sums(dtype, &a, &b, m, rows.clone(), got.as_mut_ptr()) };
                        let nb = (k / per) as f64;
                        for t in 0..n {
                            for j in 0..m {
                                let g = got[t * m + j];
                                if !rows.contains(&j) {
                                    assert!(g.is_nan(), "{dtype:?} wrote row {j} outside {rows:?}");
                                    continue;
                                }
                                let want = dot_scalar::dot(
                                    dtype,
                                    &b[j * k / per * bb..][..k / per * bb],
                                    &a,
                                    t,
                                );
                                let tol = 2.0
                                    * (nb + 12.0)
                                    * f32::EPSILON as f64
                                    * magnitude(&w, &w0, &a, j, t);
                                assert!(
                                    ((g - want) as f64).abs() <= tol,
                                    "{dtype:?} k={k} scale={scale} n={n} rows={rows:?} [{t}][{j}]: \
                                     {g} vs {want} (tol {tol})"
                                );
                            }
                        }
                        assert!(got.iter().any(|v| v.is_finite() && *v != 0.0));
                    }
                }
            }
        }
    }
}

/// A NaN or infinity in one token's activations makes every output of that token NaN (every row
/// reads every block), in both the reference and the AVX2 kernels; the other tokens stay finite.
#[test]
fn nonfinite_activations_give_nan_outputs() {
    assert!(dot_avx2::available(), "this CPU lacks AVX2/FMA/F16C");
    for (dtype, _) in BLOCK_TYPES {
        let (per, bb) = block(dtype);
        let format = ActFormat::for_weight(dtype).unwrap();
        let (m, k, n) = (6, 2 * per, 3);
        let b = random_blocks(dtype, m * k / per, 9, 0.5);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = activations(n, k, 4);
            x[k + per + 3] = bad; // token 1, second block
            let a = Q8Acts::quantize(format, &x, n, k);
            let mut got = vec![0f32; n * m];
            // SAFETY: checked above; `[m, k]` blocks, `n·m` outputs, one caller.
            unsafe { dot_avx2::sums(dtype, &a, &b, m, 0..m, got.as_mut_ptr()) };
            for t in 0..n {
                for j in 0..m {
                    let want = dot_scalar::dot(dtype, &b[j * 2 * bb..(j + 1) * 2 * bb], &a, t);
                    let g = got[t * m + j];
                    if t == 1 {
                        assert!(
                            g.is_nan() && want.is_nan(),
                            "{dtype:?} {bad} [{j}]: {g} {want}"
                        );
                    } else {
                        assert!(
                            g.is_finite() && want.is_finite(),
                            "{dtype:?} {bad} [{t}][{j}]"
                        );
                    }
                }
            }
        }
    }
}
