//! One block of each ggml type to f32 with AVX2, 8 values at a time: the integer fields are
//! unpacked to i32 lanes, converted exactly, and scaled with the same float32 operations, in the
//! same order, as [`super::scalar`] (no FMA), so the same bits.

use std::arch::x86_64::*;

/// Whether this CPU runs these decoders.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
}

/// The f16 at `b` widened (exactly, F16C's conversion, which `half` also uses where present).
#[inline(always)]
unsafe fn f16(b: &[u8]) -> f32 {
    let bits = u16::from_le_bytes([b[0], b[1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Decodes whole blocks of `dtype` (checked by the caller) from `bytes` into `out`, the block
/// function inlined into one loop.
///
/// # Safety
/// [`available`]; `bytes` is whole blocks and `out` holds their values.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn decode(dtype: crate::weights::StoredDtype, bytes: &[u8], out: &mut [f32]) {
    use crate::weights::StoredDtype as D;
    macro_rules! run {
        ($f:ident, $per:expr, $bb:expr) => {
            for (b, o) in bytes.chunks_exact($bb).zip(out.chunks_exact_mut($per)) {
                $f(b, o)
            }
        };
    }
    match dtype {
        D::Q8_0 => run!(q8_0, 32, 34),
        D::Q4_0 => run!(q4_0, 32, 18),
        D::Q4_1 => run!(q4_1, 32, 20),
        D::Q5_0 => run!(q5_0, 32, 22),
        D::Q5_1 => run!(q5_1, 32, 24),
        D::Q4_K => run!(q4_k, 256, 144),
        D::Q5_K => run!(q5_k, 256, 176),
        D::Q6_K => run!(q6_k, 256, 210),
        _ => unreachable!("block dtypes only"),
    }
}

/// The 8 bytes at `p` as unsigned i32 lanes.
#[inline(always)]
unsafe fn u8x8(p: *const u8) -> __m256i {
    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()))
}

/// Lane `l` = bit `l` of `bits` (low 8 bits) times `value`.
#[inline(always)]
unsafe fn bits8(bits: u32, value: i32) -> __m256i {
    let sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits as i32), sel), sel);
    _mm256_and_si256(on, _mm256_set1_epi32(value))
}

/// Stores `d * (q - off)` (two exact steps, one rounding) for 8 integer lanes.
#[inline(always)]
unsafe fn store_scaled(o: *mut f32, q: __m256i, off: f32, d: f32) {
    let qf = _mm256_sub_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(off));
    _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_set1_ps(d), qf));
}

/// Stores `d * q + m` (two roundings) for 8 integer lanes.
#[inline(always)]
unsafe fn store_affine(o: *mut f32, q: __m256i, d: f32, m: f32) {
    let v = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(q));
    _mm256_storeu_ps(o, _mm256_add_ps(v, _mm256_set1_ps(m)));
}

/// The 32 nibbles of a 32-value block (byte `j`: element `j` low, `j + 16` high) in 4 × 8 lanes.
#[inline(always)]
unsafe fn nibbles(qs: *const u8) -> [__m256i; 4] {
    let f = _mm256_set1_epi32(0x0F);
    let a = u8x8(qs);
    let b = u8x8(qs.add(8));
    [
        _mm256_and_si256(a, f),
        _mm256_and_si256(b, f),
        _mm256_srli_epi32::<4>(a),
        _mm256_srli_epi32::<4>(b),
    ]
}

/// Q8_0: `q * d`.
#[inline(always)]
unsafe fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = _mm256_set1_ps(f16(&b[0..2]));
    let (p, o) = (b[2..34].as_ptr(), o[..32].as_mut_ptr());
    for g in 0..4 {
        let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * g).cast()));
        _mm256_storeu_ps(o.add(8 * g), _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
    }
}

/// Q4_0: `d * (q - 8)`.
#[inline(always)]
unsafe fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16(&b[0..2]);
    let o = o[..32].as_mut_ptr();
    for (g, q) in nibbles(b[2..18].as_ptr()).into_iter().enumerate() {
        store_scaled(o.add(8 * g), q, 8.0, d);
    }
}

/// Q4_1: `d * q + m`.
#[inline(always)]
unsafe fn q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
    let o = o[..32].as_mut_ptr();
    for (g, q) in nibbles(b[4..20].as_ptr()).into_iter().enumerate() {
        store_affine(o.add(8 * g), q, d, m);
    }
}

/// The 5-bit values of a Q5 block in 4 × 8 lanes: nibbles plus bit `i` of `qh` as element `i`'s
/// fifth bit.
#[inline(always)]
unsafe fn five_bit(qh: &[u8], qs: *const u8) -> [__m256i; 4] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = nibbles(qs);
    for (g, q) in q.iter_mut().enumerate() {
        *q = _mm256_or_si256(*q, bits8(qh >> (8 * g), 16));
    }
    q
}

/// Q5_0: `d * (q - 16)`.
#[inline(always)]
unsafe fn q5_0(b: &[u8], o: &mut [f32]) {
    let d = f16(&b[0..2]);
    let o = o[..32].as_mut_ptr();
    for (g, q) in five_bit(&b[2..6], b[6..22].as_ptr())
        .into_iter()
        .enumerate()
    {
        store_scaled(o.add(8 * g), q, 16.0, d);
    }
}

/// Q5_1: `d * q + m`.
#[inline(always)]
unsafe fn q5_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
    let o = o[..32].as_mut_ptr();
    for (g, q) in five_bit(&b[4..8], b[8..24].as_ptr())
        .into_iter()
        .enumerate()
    {
        store_affine(o.add(8 * g), q, d, m);
    }
}

/// Q4_K / Q5_K: `(d * sc) * q - dmin * m` per sub-block of 32.
#[inline(always)]
unsafe fn q45_k(b: &[u8], qh: Option<&[u8]>, qs: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
    let (sc, mins) = super::scalar::k_scale_min(&b[4..16]);
    let f = _mm256_set1_epi32(0x0F);
    let o = o[..256].as_mut_ptr();
    for j in 0..8 {
        let dj = _mm256_set1_ps(d * sc[j] as f32);
        let mj = _mm256_set1_ps(dmin * mins[j] as f32);
        let shift = _mm_cvtsi32_si128(4 * (j as i32 % 2));
        let bytes = qs.as_ptr().add(32 * (j / 2));
        for g in 0..4 {
            let mut q = _mm256_and_si256(_mm256_srl_epi32(u8x8(bytes.add(8 * g)), shift), f);
            if let Some(qh) = qh {
                let h = _mm256_srl_epi32(u8x8(qh.as_ptr().add(8 * g)), _mm_cvtsi32_si128(j as i32));
                let h = _mm256_slli_epi32::<4>(_mm256_and_si256(h, _mm256_set1_epi32(1)));
                q = _mm256_or_si256(q, h);
            }
            let v = _mm256_mul_ps(dj, _mm256_cvtepi32_ps(q));
            _mm256_storeu_ps(o.add(32 * j + 8 * g), _mm256_sub_ps(v, mj));
        }
    }
}

/// Q4_K.
#[inline(always)]
unsafe fn q4_k(b: &[u8], o: &mut [f32]) {
    q45_k(b, None, &b[16..144], o);
}

/// Q5_K.
#[inline(always)]
unsafe fn q5_k(b: &[u8], o: &mut [f32]) {
    q45_k(b, Some(&b[16..48]), &b[48..176], o);
}

/// Q6_K: `(d * sc[e / 16]) * (q - 32)`, 8 consecutive elements sharing their shifts and scale.
#[inline(always)]
unsafe fn q6_k(b: &[u8], o: &mut [f32]) {
    let (ql, qh, scales) = (b[0..128].as_ptr(), b[128..192].as_ptr(), &b[192..208]);
    let d = f16(&b[208..210]);
    let (f, three) = (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(3));
    let o = o[..256].as_mut_ptr();
    for h in 0..2 {
        for r in (0..128).step_by(8) {
            let lo = _mm256_srl_epi32(
                u8x8(ql.add(64 * h + r % 64)),
                _mm_cvtsi32_si128(4 * (r / 64) as i32),
            );
            let hi = _mm256_srl_epi32(
                u8x8(qh.add(32 * h + r % 32)),
                _mm_cvtsi32_si128(2 * (r / 32) as i32),
            );
            let q = _mm256_or_si256(
                _mm256_and_si256(lo, f),
                _mm256_slli_epi32::<4>(_mm256_and_si256(hi, three)),
            );
            let e = 128 * h + r;
            let de = d * (scales[e / 16] as i8) as f32;
            store_scaled(o.add(e), q, 32.0, de);
        }
    }
}
