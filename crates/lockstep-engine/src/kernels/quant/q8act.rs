//! Activations quantized to 8 bits for the integer dot products of the fast `q8dot` mode, in
//! llama.cpp's three activation formats (its `vec_dot_type` table in `ggml-cpu.c`):
//!
//! - [`ActFormat::Q8_0`] for Q8_0, Q4_0 and Q5_0 weights: per 32 values an f16 `d = amax / 127`
//!   and `q = round(x / d)` (`quantize_row_q8_0_ref`).
//! - [`ActFormat::Q8_1`] for Q4_1 and Q5_1 weights: Q8_0 plus an f16 `s = d · Σq`, which the
//!   weights' min `m` multiplies (`quantize_row_q8_1_ref`).
//! - [`ActFormat::Q8_K`] for Q4_K, Q5_K and Q6_K weights: per 256 values an f32 `d`, the i8
//!   quants and their sums per 16 (`quantize_row_q8_K_ref`).
//!
//! [`Q8Acts::quantize`] is the `_ref` arithmetic of `ggml-quants.c` step for step (same f32
//! operations, same rounding: `roundf` for Q8_0/Q8_1, `nearest_int`'s ties-to-even for Q8_K), so
//! for finite inputs it gives those functions' bytes. llama.cpp's AVX2 build quantizes Q8_0/Q8_1
//! with `quantize_row_q8_0`/`_q8_1` of `arch/x86/quants.c` instead, which multiplies by
//! `127 / amax` rather than `1 / (amax / 127)` and rounds ties to even: the two can differ by one
//! in a quant whose scaled value lies within an f32 ulp of a half-integer.
//!
//! **Non-finite activations.** llama.cpp lets a NaN or infinity through `roundf`/`nearest_int`
//! into the int8 quants (undefined in C; on x86 a NaN becomes -128), so its outputs can be
//! finite. Here a block holding any NaN or ±∞ gets `d = NaN` (and `s = NaN`, quants and sums 0):
//! every dot product with that block multiplies by `d`, so every output that reads it is NaN.
//! (Finite activations above 127 × 65504 overflow Q8_0/Q8_1's f16 `d` to ∞, as in llama.cpp:
//! non-finite outputs from finite inputs, never the reverse.)

use crate::weights::StoredDtype;

/// One of llama.cpp's activation formats for integer dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum ActFormat {
    /// Blocks of 32: f16 scale `d`, 32 × i8.
    Q8_0,
    /// Blocks of 32: f16 scale `d`, f16 `s = d · Σq`, 32 × i8.
    Q8_1,
    /// Blocks of 256: f32 scale `d`, 256 × i8, 16 × i16 sums of 16 quants.
    Q8_K,
}

impl ActFormat {
    /// The activation format llama.cpp pairs with a weight of `dtype` (`None`: not a block dtype).
    pub fn for_weight(dtype: StoredDtype) -> Option<ActFormat> {
        match dtype {
            StoredDtype::Q8_0 | StoredDtype::Q4_0 | StoredDtype::Q5_0 => Some(ActFormat::Q8_0),
            StoredDtype::Q4_1 | StoredDtype::Q5_1 => Some(ActFormat::Q8_1),
            StoredDtype::Q4_K | StoredDtype::Q5_K | StoredDtype::Q6_K => Some(ActFormat::Q8_K),
            _ => None,
        }
    }

    /// Values per block: 32, or 256 for [`ActFormat::Q8_K`].
    pub fn block_len(self) -> usize {
        match self {
            ActFormat::Q8_0 | ActFormat::Q8_1 => 32,
            ActFormat::Q8_K => 256,
        }
    }
}

/// `n` rows of `k` activations quantized to one [`ActFormat`], stored as arrays per field (the
/// SIMD kernels load each field straight): block `b` of row `t` is entry `t·(k / block_len) + b`
/// of `d` (and `s`), values `t·k + block_len·b ..` of `qs`, and for Q8_K sums
/// `16·(t·(k / 256) + b) ..` of `bsums`.
#[derive(Debug, Clone)]
pub struct Q8Acts {
    /// The format.
    pub format: ActFormat,
    /// Rows (tokens).
    pub n: usize,
    /// Values per row, a multiple of the block length.
    pub k: usize,
    /// Per block: the scale as the dot products read it (Q8_0/Q8_1: the f16 widened to f32).
    pub d: Vec<f32>,
    /// Per block, Q8_1 only (else empty): `s = d · Σq` rounded to f16, widened.
    pub s: Vec<f32>,
    /// The quants, `n·k`.
    pub qs: Vec<i8>,
    /// Q8_K only (else empty): the sum of each 16 quants, `n·k / 16`.
    pub bsums: Vec<i16>,
}

impl Q8Acts {
    /// Quantizes `n` rows of `k` values `x` (`[n][k]`) to `format`, each block as llama.cpp's
    /// `quantize_row_*_ref` does (see the module docs for non-finite values).
    ///
    /// # Panics
    /// When `x.len() != n·k` or `k` is not a multiple of the block length.
    pub fn quantize(format: ActFormat, x: &[f32], n: usize, k: usize) -> Q8Acts {
        let per = format.block_len();
        assert!(
            x.len() == n * k && k.is_multiple_of(per),
            "{format:?}: {} activations are not {n} rows of {k} in blocks of {per}",
            x.len()
        );
        let nb = n * k / per;
        let mut a = Q8Acts {
            format,
            n,
            k,
            d: vec![0.0; nb],
            s: if format == ActFormat::Q8_1 {
                vec![0.0; nb]
            } else {
                vec![]
            },
            qs: vec![0; n * k],
            bsums: if format == ActFormat::Q8_K {
                vec![0; n * k / 16]
            } else {
                vec![]
            },
        };
        for (b, (xb, qb)) in x
            .chunks_exact(per)
            .zip(a.qs.chunks_exact_mut(per))
            .enumerate()
        {
            let finite = xb.iter().all(|v| v.is_finite());
            match format {
                ActFormat::Q8_0 | ActFormat::Q8_1 => {
                    let (d, sum) = if finite {
                        q8_0_block(xb, qb)
                    } else {
                        (f32::NAN, 0)
                    };
                    a.d[b] = half::f16::from_f32(d).to_f32();
                    if format == ActFormat::Q8_1 {
                        a.s[b] = half::f16::from_f32(sum as f32 * d).to_f32();
                    }
                }
                ActFormat::Q8_K => {
                    a.d[b] = if finite { q8_k_block(xb, qb) } else { f32::NAN };
                    for (s, q) in a.bsums[16 * b..16 * b + 16]
                        .iter_mut()
                        .zip(qb.chunks_exact(16))
                    {
                        *s = q.iter().map(|&q| q as i16).sum();
                    }
                }
            }
        }
        a
    }

    /// Blocks per row.
    pub fn blocks_per_row(&self) -> usize {
        self.k / self.format.block_len()
    }
}

/// One block of 32 finite values, as `quantize_row_q8_0_ref` (and `_q8_1_ref`, which rounds the
/// same way): writes the quants and returns the f32 `d = amax / 127` (before its f16 rounding)
/// and `Σq`.
fn q8_0_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    // `amax = MAX(amax, fabsf(v))`.
    let amax = x
        .iter()
        .fold(0f32, |m, v| if m > v.abs() { m } else { v.abs() });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (q, &v) in q.iter_mut().zip(x) {
        // `roundf`: ties away from zero; |v · id| <= 127 (plus an ulp), so it fits.
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// llama.cpp's `nearest_int`: round to nearest, ties to even, by adding 1.5·2^23 (valid for
/// |v| <= 2^22 - 1).
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0).to_bits() as i32;
    (bits & 0x007F_FFFF) - 0x0040_0000
}

/// One block of 256 finite values, as `quantize_row_q8_K_ref`: writes the quants and returns `d`.
fn q8_k_block(x: &[f32], q: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    1.0 / iscale
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed blocks: Q8_0 rounds half away from zero, Q8_K half to even; `s` and the
    /// 16-sums are the quants' sums.
    #[test]
    fn blocks_quantize_as_llama_cpp_ref() {
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = -2.5; // id = 1: roundf(-2.5) = -3
        x[2] = 0.5; // 1
        x[3] = 1.49;
        let a = Q8Acts::quantize(ActFormat::Q8_1, &x, 1, 32);
        assert_eq!(a.d, vec![1.0]);
        assert_eq!(&a.qs[..5], &[127, -3, 1, 1, 0]);
        assert_eq!(a.s, vec![126.0]);
        let a = Q8Acts::quantize(ActFormat::Q8_0, &x, 1, 32);
        assert!(a.s.is_empty() && a.bsums.is_empty());
        // Q8_K: the largest magnitude is negative here, iscale = -127 / -127 = 1; 2.5 -> 2.
        let mut x = vec![0f32; 256];
        x[0] = -127.0;
        x[1] = 2.5;
        x[2] = 3.5;
        x[17] = -1.0;
        let a = Q8Acts::quantize(ActFormat::Q8_K, &x, 1, 256);
        assert_eq!(a.d, vec![1.0]);
        assert_eq!(&a.qs[..3], &[-127, 2, 4]);
        assert_eq!(&a.bsums[..3], &[-121, -1, 0]);
        // The sign of d follows max: iscale = -127 / 127 = -1, d = -1, q = -x.
        let a = Q8Acts::quantize(
            ActFormat::Q8_K,
            &x.iter().map(|v| -v).collect::<Vec<_>>(),
            1,
            256,
        );
        assert_eq!(a.d, vec![-1.0]);
        assert_eq!(&a.qs[..3], &[-127, 2, 4]);
        // All zero: d = 0, quants 0.
        let a = Q8Acts::quantize(ActFormat::Q8_K, &[0.0; 512], 2, 256);
        assert!(a.d.iter().all(|&d| d == 0.0) && a.qs.iter().all(|&q| q == 0));
    }

    /// Dequantized (`d·q`) every value is within `d/2` (plus d's f16 rounding over 127 steps)
    /// of the input, and every quant within ±127.
    #[test]
    fn quantized_values_are_within_half_a_step() {
        let x = crate::kernels::matmul::tests::pseudo(3 * 512, 4);
        let x: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1 + i % 7) as f32)
            .collect();
        for format in [ActFormat::Q8_0, ActFormat::Q8_1, ActFormat::Q8_K] {
            let a = Q8Acts::quantize(format, &x, 3, 512);
            let per = format.block_len();
            for (i, (&v, &q)) in x.iter().zip(&a.qs).enumerate() {
                let d = a.d[i / per];
                let tol = d.abs() * (0.5 + 127.0 / 2048.0);
                assert!((d * q as f32 - v).abs() <= tol, "{format:?} [{i}]");
                assert!(q != -128);
            }
            if format == ActFormat::Q8_1 {
                for (b, q) in a.qs.chunks_exact(32).enumerate() {
                    let sum: i32 = q.iter().map(|&q| q as i32).sum();
                    let want = sum as f32 * a.d[b];
                    assert!((a.s[b] - want).abs() <= want.abs() / 512.0, "s[{b}]");
                }
            }
        }
    }

    /// A NaN or infinity anywhere in a block makes that block's `d` (and `s`) NaN, and only
    /// that block's.
    #[test]
    fn nonfinite_blocks_get_a_nan_scale() {
        for format in [ActFormat::Q8_0, ActFormat::Q8_1, ActFormat::Q8_K] {
            let per = format.block_len();
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x = crate::kernels::matmul::tests::pseudo(2 * per, 1);
                x[per + 5] = bad;
                let a = Q8Acts::quantize(format, &x, 1, 2 * per);
                assert!(a.d[0].is_finite() && a.d[1].is_nan(), "{format:?} {bad}");
                if format == ActFormat::Q8_1 {
                    assert!(a.s[0].is_finite() && a.s[1].is_nan());
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "blocks of 256")]
    fn partial_blocks_are_refused() {
        Q8Acts::quantize(ActFormat::Q8_K, &[0.0; 288], 1, 288);
    }
}
