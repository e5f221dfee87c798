//! AVX-512 helpers shared by the kernels: the mask of a partial vector, bf16 rounding on sixteen
//! lanes, and the 16 × 16 transpose of 32-bit lanes. Each is inlined, for callers compiled with
//! AVX-512.

use std::arch::x86_64::*;

/// The mask of the first `len` of sixteen lanes (all of them from 16 on).
#[inline]
pub(crate) fn mask16(len: usize) -> __mmask16 {
    if len >= 16 {
        !0
    } else {
        ((1u32 << len) - 1) as __mmask16
    }
}

/// `v` rounded to bf16 and widened back, as `half::bf16::from_f32(v).to_f32()` per lane: the
/// integer operations of [`super::round_bf16_branch_free`] on sixteen f32 lanes (nearest even by
/// adding `0x7FFF` plus the kept part's lowest bit, a NaN made quiet instead, then the low half
/// cleared), the bits of `matmul::avx2::to_bf16`.
///
/// # Safety
/// AVX-512F.
#[inline(always)]
pub(crate) unsafe fn round_bf16_x16(v: __m512) -> __m512 {
    let b = _mm512_castps_si512(v);
    let lowest_kept = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lowest_kept));
    let magnitude = _mm512_and_si512(b, _mm512_set1_epi32(0x7FFF_FFFF));
    let nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7F80_0000));
    let quiet = _mm512_or_si512(b, _mm512_set1_epi32(0x0040_0000));
    let r = _mm512_mask_blend_epi32(nan, rounded, quiet);
    _mm512_castsi512_ps(_mm512_and_si512(
        r,
        _mm512_set1_epi32(0xFFFF_0000_u32 as i32),
    ))
}

/// Transposes 16 × 16 32-bit lanes: lane `j` of row `i` goes to lane `i` of row `j`.
///
/// # Safety
/// AVX-512F.
#[inline(always)]
pub(crate) unsafe fn transpose16(r: &mut [__m512i; 16]) {
    // Pairs of rows interleaved, then pairs of pairs: `u[4i + q]`'s 128-bit lane `L` holds
    // column `4L + q` of rows `4i..4i + 4`.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        let b = 4 * i;
        u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    // Then the 128-bit lanes: column `4L + q` is lane `L` of `u[q]`, `u[4 + q]`, `u[8 + q]`,
    // `u[12 + q]`.
    for q in 0..4 {
        let s1 = _mm512_shuffle_i32x4::<0x88>(u[q], u[4 + q]);
        let s2 = _mm512_shuffle_i32x4::<0xDD>(u[q], u[4 + q]);
        let s3 = _mm512_shuffle_i32x4::<0x88>(u[8 + q], u[12 + q]);
        let s4 = _mm512_shuffle_i32x4::<0xDD>(u[8 + q], u[12 + q]);
        r[q] = _mm512_shuffle_i32x4::<0x88>(s1, s3);
        r[8 + q] = _mm512_shuffle_i32x4::<0xDD>(s1, s3);
        r[4 + q] = _mm512_shuffle_i32x4::<0x88>(s2, s4);
        r[12 + q] = _mm512_shuffle_i32x4::<0xDD>(s2, s4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sixteen-lane rounding ([`round_bf16_x16`]) is `round_bf16_branch_free` bit for bit:
    /// halfway cases both ways, the largest finite values (rounding to infinity), infinities, NaNs with and
    /// without the quiet bit, signed zeros, subnormals, and a sweep of ordinary values.
    #[test]
    fn vector_rounding_is_the_scalar_rounding() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("vector_rounding_is_the_scalar_rounding: skipped, no AVX-512 here");
            return;
        }
        let mut bits: Vec<u32> = vec![
            0x0000_0000,
            0x8000_0000,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_7FFF,
            0x3F81_7FFF,
            0x7F7F_FFFF,
            0xFF7F_FFFF,
            0x7F80_0000,
            0xFF80_0000,
            0x7F80_0001,
            0xFF80_0001,
            0x7FC0_0000,
            0x7FBF_FFFF,
            0xFFFF_FFFF,
            0x0000_0001,
            0x8000_8000,
            0x007F_FFFF,
        ];
        bits.extend((0..1u32 << 20).map(|i| i.wrapping_mul(0x9E37_79B9)));
        bits.resize(bits.len().next_multiple_of(16), 0);
        for chunk in bits.chunks_exact(16) {
            let v: Vec<f32> = chunk.iter().map(|&b| f32::from_bits(b)).collect();
            let mut got = [0u32; 16];
            // SAFETY: AVX-512F checked above.
            unsafe {
                let r = round_bf16_x16(_mm512_loadu_ps(v.as_ptr()));
                _mm512_storeu_ps(got.as_mut_ptr().cast(), r);
            }
            for (&x, &g) in v.iter().zip(&got) {
                let want = super::super::round_bf16_branch_free(x).to_bits();
                assert_eq!(g, want, "{:#010x}", x.to_bits());
            }
        }
    }

    /// Lane `j` of row `i` goes to lane `i` of row `j`.
    #[test]
    fn transpose16_swaps_rows_and_lanes() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("transpose16_swaps_rows_and_lanes: skipped, no AVX-512 here");
            return;
        }
        let m: Vec<u32> = (0..256).collect();
        let mut got = [0u32; 256];
        // SAFETY: AVX-512F checked above.
        unsafe {
            let mut r = [_mm512_setzero_si512(); 16];
            for (i, r) in r.iter_mut().enumerate() {
                *r = _mm512_loadu_si512(m[16 * i..].as_ptr().cast());
            }
            transpose16(&mut r);
            for (i, r) in r.iter().enumerate() {
                _mm512_storeu_si512(got[16 * i..].as_mut_ptr().cast(), *r);
            }
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[16 * j + i], m[16 * i + j], "row {i} lane {j}");
            }
        }
    }
}
