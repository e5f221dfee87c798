//! `f32::exp` over a slice, sixteen at a time, bit for bit what the scalar call returns.
//!
//! On x86-64 Linux `f32::exp` is glibc's `expf`, which on a CPU with FMA runs `__expf_fma`: the
//! ARM optimized-routines algorithm (also in musl), in double precision with a 32-entry table
//! of `2^(i/32)` and a degree-3 polynomial. [`exp_in_place`] runs the same operations (the same
//! fused multiply-adds, in the same order, with the same constants) on eight doubles per
//! AVX-512 register, and hands inputs of magnitude 88 or more (overflow, underflow, infinities,
//! NaN: glibc's special cases) to the scalar call. Whether the scalar function really is that
//! algorithm is checked once per process against a spread of inputs (`vector_ok`); where it
//! is not (another libm, no FMA), every value goes through the scalar call.

/// `2^(i/32)` as f64 bits, minus `i << 47` (glibc's `__exp2f_data.tab`).
#[cfg(target_arch = "x86_64")]
const TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

/// `32 / ln 2`.
#[cfg(target_arch = "x86_64")]
const INV_LN2_N: u64 = 0x40471547652b82fe;
/// `1.5 · 2^52`: adding it rounds to an integer (nearest-even) held in the low bits.
#[cfg(target_arch = "x86_64")]
const SHIFT: u64 = 0x4338000000000000;
/// The polynomial's coefficients (scaled for the table's step), highest degree first.
#[cfg(target_arch = "x86_64")]
const POLY: [u64; 3] = [0x3ebc6af84b912394, 0x3f2ebfce50fac4f3, 0x3f962e42ff0c52d6];

/// `x[i] = x[i].exp()` for every element, with the bits of the scalar `f32::exp`.
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if vector_ok() {
        // SAFETY: `vector_ok` checked the CPU features.
        return unsafe { exp_avx512(x, None) };
    }
    for v in x {
        *v = v.exp();
    }
}

/// `x[i] = (x[i] - shift).exp()` for every element (the difference in f32, then the scalar
/// `f32::exp`'s bits): a softmax's `exp(s - max)` in one pass over the row.
pub fn exp_shifted_in_place(x: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if vector_ok() {
        // SAFETY: `vector_ok` checked the CPU features.
        return unsafe { exp_avx512(x, Some(shift)) };
    }
    for v in x {
        *v = (*v - shift).exp();
    }
}

/// Whether the CPU has AVX-512F and FMA and the vector path gives the scalar call's bits on a
/// spread of inputs (every exponent, both signs, the special cases): asked once per process.
#[cfg(target_arch = "x86_64")]
fn vector_ok() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")) {
            return false;
        }
        let sample = check_sample();
        let mut got = sample.clone();
        // SAFETY: the features were checked above.
        unsafe { exp_avx512(&mut got, None) };
        got.iter()
            .zip(&sample)
            .all(|(g, x)| g.to_bits() == x.exp().to_bits())
    })
}

/// Inputs the vector path is checked on before it is used: a bit pattern every 2^18 over all
/// of f32 (every exponent and sign), a fine grid over [-104, 89], and the special values.
#[cfg(target_arch = "x86_64")]
fn check_sample() -> Vec<f32> {
    let mut s: Vec<f32> = (0..1u64 << 14)
        .map(|i| f32::from_bits((i << 18) as u32 | (i as u32 & 0x3FFFF)))
        .collect();
    s.extend((0..19_300).map(|i| -104.0 + i as f32 * 0.01));
    s.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        88.0,
        -88.0,
        88.72283,
        -103.27893,
        -103.97208,
    ]);
    s
}

/// [`exp_in_place`] on AVX-512 (of `x - minus` when `minus` is given, the difference in f32):
/// eight lanes of f64 per step, the lanes of magnitude ≥ 88 (and NaN) redone by the scalar
/// call.
///
/// # Safety
/// The CPU has AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp_avx512(x: &mut [f32], minus: Option<f32>) {
    use std::arch::x86_64::*;
    let c = |bits: u64| _mm512_set1_pd(f64::from_bits(bits));
    let (inv_ln2_n, shift) = (c(INV_LN2_N), c(SHIFT));
    let (c0, c1, c2, one) = (c(POLY[0]), c(POLY[1]), c(POLY[2]), _mm512_set1_pd(1.0));
    let tab: [__m512i; 4] =
        std::array::from_fn(|q| _mm512_loadu_si512(TABLE[8 * q..].as_ptr().cast()));
    let by = _mm256_set1_ps(minus.unwrap_or(0.0));
    let mut chunks = x.chunks_exact_mut(8);
    for v in &mut chunks {
        let xs = _mm256_loadu_ps(v.as_ptr());
        let xs = match minus {
            Some(_) => _mm256_sub_ps(xs, by),
            None => xs,
        };
        let xd = _mm512_cvtps_pd(xs);
        // kd = round(x·32/ln2) (nearest-even, via the shift); r = x·32/ln2 − kd.
        let z = _mm512_fmadd_pd(inv_ln2_n, xd, shift);
        let ki = _mm512_castpd_si512(z);
        let kd = _mm512_sub_pd(z, shift);
        let r = _mm512_fmsub_pd(inv_ln2_n, xd, kd);
        // s = 2^(kd/32): the table's entry for kd mod 32, exponent raised by kd / 32.
        let idx = _mm512_and_si512(ki, _mm512_set1_epi64(31));
        let lo = _mm512_permutex2var_epi64(tab[0], idx, tab[1]);
        let hi = _mm512_permutex2var_epi64(tab[2], idx, tab[3]);
        let upper = _mm512_test_epi64_mask(idx, _mm512_set1_epi64(16));
        let t = _mm512_mask_blend_epi64(upper, lo, hi);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
        // y = (c0·r + c1)·r² + (c2·r + 1), then · s.
        let p = _mm512_fmadd_pd(c0, r, c1);
        let r2 = _mm512_mul_pd(r, r);
        let y = _mm512_fmadd_pd(p, r2, _mm512_fmadd_pd(r, c2, one));
        let y = _mm256_castps_si256(_mm512_cvtpd_ps(_mm512_mul_pd(y, s)));
        _mm256_storeu_si256(v.as_mut_ptr().cast(), y);
        // |x| ≥ 88 or NaN (the top 12 bits of |x| above 0x42a): glibc's special cases.
        let top = _mm256_and_si256(
            _mm256_srli_epi32::<20>(_mm256_castps_si256(xs)),
            _mm256_set1_epi32(0x7FF),
        );
        let special = _mm256_cmpgt_epi32(top, _mm256_set1_epi32(0x42A));
        let mut bits = _mm256_movemask_ps(_mm256_castsi256_ps(special)) as u32;
        let xa: [f32; 8] = std::mem::transmute(xs);
        while bits != 0 {
            let l = bits.trailing_zeros() as usize;
            v[l] = xa[l].exp();
            bits &= bits - 1;
        }
    }
    for v in chunks.into_remainder() {
        *v = match minus {
            Some(by) => (*v - by).exp(),
            None => v.exp(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shifted form is the difference in f32, then the scalar exp, bit for bit: shifts of
    /// every sign and size (zero, a softmax's maximum, an infinity, NaN) on inputs from large
    /// negative to large positive, NaN and infinities included, in slices of odd lengths.
    #[test]
    fn exp_shifted_is_the_difference_then_the_scalar_exp() {
        let mut xs: Vec<f32> = (0..u32::MAX / 4099)
            .map(|i| f32::from_bits(i * 4099))
            .collect();
        xs.extend((0..20_000).map(|i| -60.0 + i as f32 * 0.0061));
        xs.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            88.5,
            -103.9,
        ]);
        for shift in [0.0, -0.0, 3.25, -7.5, 41.0, 90.0, f32::INFINITY, f32::NAN] {
            for chunk in xs.chunks(1001) {
                let mut got = chunk.to_vec();
                exp_shifted_in_place(&mut got, shift);
                for (g, &x) in got.iter().zip(chunk) {
                    let want = (x - shift).exp();
                    assert!(
                        g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                        "exp({x:e} - {shift:e}) = {g:e}, want {want:e}"
                    );
                }
            }
        }
    }

    /// Bit for bit the scalar `f32::exp` on every 97th bit pattern of f32 (44 million values:
    /// every exponent, both signs, NaNs) and on every 16th float in [-1, -0.5] (softmax's
    /// inputs are ≤ 0), in slices whose lengths are not all multiples of eight.
    #[test]
    fn exp_in_place_is_the_scalar_exp() {
        #[cfg(target_arch = "x86_64")]
        if !vector_ok() {
            eprintln!("exp_in_place_is_the_scalar_exp: the vector path is off on this machine");
        }
        let mut xs: Vec<f32> = (0..u32::MAX / 97).map(|i| f32::from_bits(i * 97)).collect();
        xs.extend((0..(1u32 << 19)).map(|i| -f32::from_bits(0x3F80_0000 - (i << 4))));
        xs.push(-3.5);
        let mut got = xs.clone();
        for chunk in got.chunks_mut(1 << 16) {
            exp_in_place(chunk);
        }
        for (g, x) in got.iter().zip(&xs) {
            assert_eq!(g.to_bits(), x.exp().to_bits(), "exp({x:e}) = {g:e}");
        }
    }
}
