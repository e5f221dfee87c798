//! Fused AVX2 decode for ggml block weights: for fewer than [`PN`] tokens, each 8 weights are
//! decoded straight into a register and FMA'd into the accumulators, instead of going through
//! the f32 buffer of [`super::blocks`].
//!
//! Bit for bit the buffer path (its reference): every 8 values are decoded with exactly the
//! float32 operations of `quant`'s AVX2 decoders (so the values `quant::decode_blocks` writes),
//! rounded to bf16 as [`avx2::F32AsBf16W`] rounds them when asked, and each (row, token) gets
//! the FMAs, lanes, chunk reductions ([`KC`], [`avx2::reduce`]) and chunk additions of
//! `avx2::sums_fma::<F32W>` in the same order (its decode tile: one accumulator per row, lane
//! `l` summing elements `≡ l (mod 8)` of a chunk in order). Row blocks of whole ggml blocks and
//! `k` a multiple of 32 make every chunk whole blocks and whole vectors (no masked tail).
//!
//! Per block work is hoisted out of the 8-value loop: the f16 scales, a 32-value nibble block's
//! values unpacked once to 32 bytes (fifth bits and offset included), a K-quant block's
//! sub-block scales and mins.

use super::avx2::{self, KC, PN};
use crate::weights::StoredDtype;
use std::arch::x86_64::*;
use std::ops::Range;

/// Whether this CPU runs [`sums`] (F16C for the scales, besides the matmul kernel's AVX2/FMA).
pub(super) fn available() -> bool {
    avx2::available() && is_x86_feature_detected!("f16c")
}

/// A block type decoded 8 values at a time in registers.
trait Fused {
    /// Elements per block.
    const PER: usize;
    /// Bytes per block.
    const BYTES: usize;
    /// What one block's 8-value groups share, decoded once per block.
    type Scales: Copy;
    /// The shared values of the block at `b`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C present; `b` valid for a block.
    unsafe fn scales(b: *const u8) -> Self::Scales;
    /// Values `8·g..8·g + 8` of the block at `b` (`g < PER / 8`): the bits `quant`'s decoders
    /// give.
    ///
    /// # Safety
    /// As [`Fused::scales`], `s` from it.
    unsafe fn eight(b: *const u8, s: &Self::Scales, g: usize) -> __m256;
}

/// The f16 at `b` widened exactly (F16C, as `quant`'s decoders do).
#[inline(always)]
pub(super) unsafe fn f16(b: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*b, *b.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The 8 bytes at `p` as unsigned i32 lanes.
#[inline(always)]
unsafe fn u8x8(p: *const u8) -> __m256i {
    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()))
}

/// A 32-value block's 16 bytes of nibbles at `qs` (byte `j`: element `j` low, `j + 16` high) as
/// 32 bytes in element order.
#[inline(always)]
unsafe fn nibbles32(qs: *const u8) -> __m256i {
    let v = _mm_loadu_si128(qs.cast());
    let f = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(v, f);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), f);
    _mm256_set_m128i(hi, lo)
}

/// Byte `i` all ones where bit `i` of the u32 at `p` is set, else zero: byte `i` gets byte
/// `i / 8` of the u32 with every bit but `i % 8` set, then compares equal to all ones.
#[inline(always)]
unsafe fn bit_bytes(p: *const u8) -> __m256i {
    let bits = u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let others = _mm256_set1_epi64x(0x7FBF_DFEF_F7FB_FDFE);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
}

/// Signed bytes `8·g..8·g + 8` of `q` widened to i32 lanes.
#[inline(always)]
unsafe fn bytes8(q: __m256i, g: usize) -> __m256i {
    let half = if g < 2 {
        _mm256_castsi256_si128(q)
    } else {
        _mm256_extracti128_si256::<1>(q)
    };
    let half = if g.is_multiple_of(2) {
        half
    } else {
        _mm_unpackhi_epi64(half, half)
    };
    _mm256_cvtepi8_epi32(half)
}

/// `d * q'` for the 8 small integers `q' = q - off` of group `g` (the block's bytes `q` hold
/// them already offset): the bits of `quant`'s `d * (float(q) - off)`, whose subtraction of
/// small integers is exact.
#[inline(always)]
unsafe fn scaled8(q: __m256i, g: usize, d: __m256) -> __m256 {
    _mm256_mul_ps(d, _mm256_cvtepi32_ps(bytes8(q, g)))
}

/// `d * q + m` (two roundings) for group `g` of the block's bytes, as `quant`'s `store_affine`.
#[inline(always)]
unsafe fn affine8(q: __m256i, g: usize, d: __m256, m: __m256) -> __m256 {
    _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(bytes8(q, g))), m)
}

/// `d * (q - off)` (two exact steps, one rounding), as `quant`'s `store_scaled`.
#[inline(always)]
unsafe fn scaled(q: __m256i, off: f32, d: __m256) -> __m256 {
    _mm256_mul_ps(d, _mm256_sub_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(off)))
}

/// Q8_0: f16 d, 32 × i8; `q * d`.
struct Q8_0;
impl Fused for Q8_0 {
    const PER: usize = 32;
    const BYTES: usize = 34;
    type Scales = __m256;
    #[inline(always)]
    unsafe fn scales(b: *const u8) -> __m256 {
        _mm256_set1_ps(f16(b))
    }
    #[inline(always)]
    unsafe fn eight(b: *const u8, d: &__m256, g: usize) -> __m256 {
        let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(2 + 8 * g).cast()));
        _mm256_mul_ps(_mm256_cvtepi32_ps(q), *d)
    }
}

/// Q4_0: f16 d, 16 bytes of nibbles; `d * (q - 8)`.
struct Q4_0;
impl Fused for Q4_0 {
    const PER: usize = 32;
    const BYTES: usize = 18;
    type Scales = (__m256, __m256i);
    #[inline(always)]
    unsafe fn scales(b: *const u8) -> Self::Scales {
        let q = _mm256_sub_epi8(nibbles32(b.add(2)), _mm256_set1_epi8(8));
        (_mm256_set1_ps(f16(b)), q)
    }
    #[inline(always)]
    unsafe fn eight(_: *const u8, &(d, q): &Self::Scales, g: usize) -> __m256 {
        scaled8(q, g, d)
    }
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles; `d * q + m`.
struct Q4_1;
impl Fused for Q4_1 {
    const PER: usize = 32;
    const BYTES: usize = 20;
    type Scales = (__m256, __m256, __m256i);
    #[inline(always)]
    unsafe fn scales(b: *const u8) -> Self::Scales {
        let (d, m) = (f16(b), f16(b.add(2)));
        (_mm256_set1_ps(d), _mm256_set1_ps(m), nibbles32(b.add(4)))
    }
    #[inline(always)]
    unsafe fn eight(_: *const u8, &(d, m, q): &Self::Scales, g: usize) -> __m256 {
        affine8(q, g, d, m)
    }
}

/// Q5_0: f16 d, u32 fifth bits, 16 bytes of nibbles; `d * (q - 16)`.
struct Q5_0;
impl Fused for Q5_0 {
    const PER: usize = 32;
    const BYTES: usize = 22;
    type Scales = (__m256, __m256i);
    #[inline(always)]
    unsafe fn scales(b: *const u8) -> Self::Scales {
        // `nibble + 16·bit - 16`: the nibble with 0xF0 (-16) or'd in where the bit is clear.
        let minus = _mm256_andnot_si256(bit_bytes(b.add(2)), _mm256_set1_epi8(-16));
        let q = _mm256_or_si256(nibbles32(b.add(6)), minus);
        (_mm256_set1_ps(f16(b)), q)
    }
    #[inline(always)]
    unsafe fn eight(_: *const u8, &(d, q): &Self::Scales, g: usize) -> __m256 {
        scaled8(q, g, d)
    }
}

/// Q5_1: f16 d, f16 m, u32 fifth bits, 16 bytes of nibbles; `d * q + m`.
struct Q5_1;
impl Fused for Q5_1 {
    const PER: usize = 32;
    const BYTES: usize = 24;
    type Scales = (__m256, __m256, __m256i);
    #[inline(always)]
    unsafe fn scales(b: *const u8) -> Self::Scales {
        let (d, m) = (f16(b), f16(b.add(2)));
        let high = _mm256_and_si256(bit_bytes(b.add(4)), _mm256_set1_epi8(16));
        let q = _mm256_or_si256(nibbles32(b.add(8)), high);
        (_mm256_set1_ps(d), _mm256_set1_ps(m), q)
    }
    #[inline(always)]
    unsafe fn eight(_: *const u8, &(d, m, q): &Self::Scales, g: usize) -> __m256 {
        affine8(q, g, d, m)
    }
}

/// A Q4_K/Q5_K block's sub-block factors `d * sc[j]` and `dmin * m[j]` (the scalar products the
/// decoders form once per sub-block).
#[inline(always)]
unsafe fn k_factors(b: *const u8) -> ([f32; 8], [f32; 8]) {
    let (d, dmin) = (f16(b), f16(b.add(2)));
    let s = std::slice::from_raw_parts(b.add(4), 12);
    let (sc, mins) = crate::kernels::quant::k_scale_min(s);
    let (mut ds, mut ms) = ([0f32; 8], [0f32; 8]);
    for j in 0..8 {
        ds[j] = d * sc[j] as f32;
        ms[j] = dmin * mins[j] as f32;
    }
    (ds, ms)
}

/// Group `g` of a Q4_K/Q5_K block's 4-bit values at `qs`: sub-block `g / 4` is nibble
/// `(g / 4) % 2` of bytes `32·(g / 8)..`.
#[inline(always)]
unsafe fn k_nibble8(qs: *const u8, g: usize) -> __m256i {
    let j = g / 4;
    let v = u8x8(qs.add(32 * (j / 2) + 8 * (g % 4)));
    let v = if j.is_multiple_of(2) {
        v
    } else {
        _mm256_srli_epi32::<4>(v)
    };
    _mm256_and_si256(v, _mm256_set1_epi32(0x0F))
}

/// `(d * sc) * q - dmin * m` (two roundings), as `quant`'s K-quant decoder.
#[inline(always)]
unsafe fn k_value(q: __m256i, (d, m): &([f32; 8], [f32; 8]), j: usize) -> __m256 {
    let v = _mm256_mul_ps(_mm256_set1_ps(d[j]), _mm256_cvtepi32_ps(q));
    _mm256_sub_ps(v, _mm256_set1_ps(m[j]))
}

/// Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.
struct Q4K;
impl Fused for Q4K {
    const PER: usize = 256;
    const BYTES: usize = 144;
    type Scales = ([f32; 8], [f32; 8]);
    #[inline(always)]
    unsafe fn scales(b: *const u8) -> Self::Scales {
        k_factors(b)
    }
    #[inline(always)]
    unsafe fn eight(b: *const u8, s: &Self::Scales, g: usize) -> __m256 {
        k_value(k_nibble8(b.add(16), g), s, g / 4)
    }
}

/// Q5_K: as Q4_K with 32 bytes of fifth bits (bit `j` of byte `i`: value `i` of sub-block `j`).
struct Q5K;
impl Fused for Q5K {
    const PER: usize = 256;
    const BYTES: usize = 176;
    type Scales = ([f32; 8], [f32; 8]);
    #[inline(always)]
    unsafe fn scales(b: *const u8) -> Self::Scales {
        k_factors(b)
    }
    #[inline(always)]
    unsafe fn eight(b: *const u8, s: &Self::Scales, g: usize) -> __m256 {
        let j = g / 4;
        let h = _mm256_srl_epi32(u8x8(b.add(16 + 8 * (g % 4))), _mm_cvtsi32_si128(j as i32));
        let h = _mm256_slli_epi32::<4>(_mm256_and_si256(h, _mm256_set1_epi32(1)));
        k_value(_mm256_or_si256(k_nibble8(b.add(48), g), h), s, j)
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 of high pairs, 16 × i8 scales, f16 d;
/// `(d * sc[e / 16]) * (q - 32)`.
struct Q6K;
impl Fused for Q6K {
    const PER: usize = 256;
    const BYTES: usize = 210;
    type Scales = [f32; 16];
    #[inline(always)]
    unsafe fn scales(b: *const u8) -> [f32; 16] {
        let d = f16(b.add(208));
        let mut de = [0f32; 16];
        for (i, de) in de.iter_mut().enumerate() {
            *de = d * (*b.add(192 + i) as i8) as f32;
        }
        de
    }
    #[inline(always)]
    unsafe fn eight(b: *const u8, de: &[f32; 16], g: usize) -> __m256 {
        let (e, f, three) = (8 * g, _mm256_set1_epi32(0x0F), _mm256_set1_epi32(3));
        let (h, r) = (e / 128, e % 128);
        let lo = _mm256_srl_epi32(
            u8x8(b.add(64 * h + r % 64)),
            _mm_cvtsi32_si128(4 * (r / 64) as i32),
        );
        let hi = _mm256_srl_epi32(
            u8x8(b.add(128 + 32 * h + r % 32)),
            _mm_cvtsi32_si128(2 * (r / 32) as i32),
        );
        let q = _mm256_or_si256(
            _mm256_and_si256(lo, f),
            _mm256_slli_epi32::<4>(_mm256_and_si256(hi, three)),
        );
        scaled(q, 32.0, _mm256_set1_ps(de[e / 16]))
    }
}

/// `acc[r][t] = Σ_{i<len} x[t·xrow + i]·w_r[i]` for `r < R`, `t < N`, `w_r` the `len / B::PER`
/// blocks at `w + r·wrow`, with the lanes and order of `avx2`'s decode tile.
///
/// # Safety
/// AVX2, FMA and F16C present; `len` a multiple of `B::PER`; `x` valid for `N` rows of `len`
/// f32 `xrow` apart, `w` for `R` rows of `len / B::PER` blocks `wrow` bytes apart.
#[inline(always)]
unsafe fn tile<B: Fused, const BF: bool, const R: usize, const N: usize>(
    x: *const f32,
    xrow: usize,
    len: usize,
    w: *const u8,
    wrow: usize,
) -> [[f32; N]; R] {
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    for blk in 0..len / B::PER {
        // Plain loops, not `array::from_fn`: its closures are not inlined into the caller's
        // target features, and every intrinsic in them becomes a call.
        let mut bp = [w; R];
        for (r, p) in bp.iter_mut().enumerate() {
            *p = w.add(r * wrow + blk * B::BYTES);
            // The next tile's rows follow these: start fetching them (short rows end before
            // the hardware prefetcher gets going). Past the end it reads nothing.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(R * wrow).cast());
        }
        let mut sc = [B::scales(bp[0]); R];
        for r in 1..R {
            sc[r] = B::scales(bp[r]);
        }
        let xb = x.add(blk * B::PER);
        for g in 0..B::PER / 8 {
            let mut wv = [_mm256_setzero_ps(); R];
            for r in 0..R {
                let v = B::eight(bp[r], &sc[r], g);
                wv[r] = if BF { avx2::to_bf16(v) } else { v };
            }
            for t in 0..N {
                let xv = _mm256_loadu_ps(xb.add(t * xrow + 8 * g));
                for (a, &wv) in acc.iter_mut().zip(&wv) {
                    a[t] = _mm256_fmadd_ps(wv, xv, a[t]);
                }
            }
        }
    }
    let mut sums = [[0.0; N]; R];
    for (s, a) in sums.iter_mut().zip(&acc) {
        for (s, &a) in s.iter_mut().zip(a) {
            *s = avx2::reduce(a);
        }
    }
    sums
}

/// Raw sums `out[t·m + j] = Σ_i x[t·k + i]·w[j][i]` for every row `j` in `rows` and token
/// `t < n`, `w` whole blocks of the block dtype `dtype`, the decoded weights rounded to bf16
/// when `bf16`: bit for bit what [`super::blocks::sums`] gives on the AVX2 kernel.
///
/// # Safety
/// [`available`]; `1 <= n < PN`; `w` is `[m, k]` of whole blocks, `x` holds `n` rows of `k`;
/// `out` is valid for `n·m` f32 and nobody else touches the entries in `rows`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sums(
    dtype: StoredDtype,
    bf16: bool,
    x: &[f32],
    n: usize,
    k: usize,
    w: &[u8],
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
) {
    macro_rules! run {
        ($b:ty) => {
            if bf16 {
                sums_fma::<$b, true>(x, n, k, w, m, rows, out)
            } else {
                sums_fma::<$b, false>(x, n, k, w, m, rows, out)
            }
        };
    }
    match dtype {
        StoredDtype::Q8_0 => run!(Q8_0),
        StoredDtype::Q4_0 => run!(Q4_0),
        StoredDtype::Q4_1 => run!(Q4_1),
        StoredDtype::Q5_0 => run!(Q5_0),
        StoredDtype::Q5_1 => run!(Q5_1),
        StoredDtype::Q4_K => run!(Q4K),
        StoredDtype::Q5_K => run!(Q5K),
        StoredDtype::Q6_K => run!(Q6K),
        _ => unreachable!("fused block dtypes only"),
    }
}

/// [`sums`] for block type `B`, compiled with AVX2, FMA and F16C.
///
/// # Safety
/// As [`sums`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sums_fma<B: Fused, const BF: bool>(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[u8],
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
) {
    let wrow = k / B::PER * B::BYTES;
    assert!(
        (1..PN).contains(&n)
            && k.is_multiple_of(B::PER)
            && x.len() == n * k
            && rows.end <= m
            && w.len() >= rows.end * wrow
    );
    // Four rows a tile (one or two tokens), two for three tokens (registers), then single rows.
    let rr = if n < 3 { 4 } else { 2 };
    for (j, nr) in avx2::groups(rows, rr) {
        for c0 in (0..k).step_by(KC) {
            let len = KC.min(k - c0);
            let xp = x.as_ptr().add(c0);
            let wp = w.as_ptr().add(j * wrow + c0 / B::PER * B::BYTES);
            let mut add = |r: usize, t: usize, v: f32| {
                let o = out.add(t * m + j + r);
                *o = if c0 == 0 { v } else { *o + v };
            };
            match (nr, n) {
                (4, 1) => each(tile::<B, BF, 4, 1>(xp, k, len, wp, wrow), &mut add),
                (4, _) => each(tile::<B, BF, 4, 2>(xp, k, len, wp, wrow), &mut add),
                (2, _) => each(tile::<B, BF, 2, 3>(xp, k, len, wp, wrow), &mut add),
                (_, 1) => each(tile::<B, BF, 1, 1>(xp, k, len, wp, wrow), &mut add),
                (_, 2) => each(tile::<B, BF, 1, 2>(xp, k, len, wp, wrow), &mut add),
                _ => each(tile::<B, BF, 1, 3>(xp, k, len, wp, wrow), &mut add),
            }
        }
    }
}

/// Calls `f(row, token, value)` for every entry of a tile.
#[inline(always)]
fn each<const R: usize, const N: usize>(acc: [[f32; N]; R], f: &mut impl FnMut(usize, usize, f32)) {
    for (r, a) in acc.iter().enumerate() {
        for (t, &v) in a.iter().enumerate() {
            f(r, t, v);
        }
    }
}
