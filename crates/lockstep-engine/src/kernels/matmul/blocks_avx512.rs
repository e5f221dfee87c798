//! Fused AVX-512 decode for ggml block weights: [`super::blocks_avx2`]'s decode (fewer than
//! [`PN`] tokens) with two weight rows in each 16-lane register, lanes 0-7 row `a`'s and lanes
//! 8-15 row `b`'s 8-lane accumulator, so each decode and FMA instruction does two rows' work.
//!
//! Bit for bit `blocks_avx2` (and so the buffer path and `linear` on the dequantized F32
//! tensor): each half of a register sees exactly the values, FMAs and order of that kernel's
//! accumulator for its row (lane `l` sums elements `≡ l (mod 8)` of a [`KC`] chunk in order),
//! and is reduced and added per chunk with `avx2::reduce` as it is. The only changes are in how
//! the weight values are formed, each with the same result:
//! - a block pair's small integers are unpacked once to 64 bytes in the pair layout (for each
//!   8-value group: row `a`'s 8 bytes, then row `b`'s), widened per group with one instruction;
//! - `d·q + m` (Q4_1/Q5_1) and `(d·sc)·q − dmin·m` (Q4_K/Q5_K) are one FMA where the decoders
//!   do a multiply and an add: `d·q` and `(d·sc)·q` are exact in f32 (an f16's 11 significant
//!   bits times an integer below 2⁶ times one below 2⁵), so the FMA's one rounding is the
//!   add's;
//! - Q6_K's and Q5_0's `float(q) − off` become `float(q − off)`, exact either way.
//!
//! A tile is 4 rows (two pairs); the rows left over take `blocks_avx2`.

use super::avx2::{self, KC, PN};
use super::avx512;
use super::blocks_avx2::{self, f16};
use crate::weights::StoredDtype;
use std::arch::x86_64::*;
use std::ops::Range;

/// Whether this CPU runs [`sums`].
pub(super) fn available() -> bool {
    blocks_avx2::available()
        && avx512::available()
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vbmi")
        && is_x86_feature_detected!("bmi2")
}

/// A block type decoded 16 values (8 of each of two rows) at a time.
trait Paired {
    /// Elements per block.
    const PER: usize;
    /// Bytes per block.
    const BYTES: usize;
    /// What a block pair's groups share, decoded once per block pair.
    type Prep: Copy;
    /// The shared values of the blocks at `a` and `b`.
    ///
    /// # Safety
    /// [`available`]; `a` and `b` each valid for a block.
    unsafe fn prep(a: *const u8, b: *const u8) -> Self::Prep;
    /// Values `8·g..8·g + 8` (`g < PER / 8`) of the block at `a` in lanes 0-7 and of the block
    /// at `b` in lanes 8-15: the bits `quant`'s decoders give.
    ///
    /// # Safety
    /// As [`Paired::prep`], `p` from it for the same blocks.
    unsafe fn sixteen(a: *const u8, b: *const u8, p: &Self::Prep, g: usize) -> __m512;
}

/// The f16s at `a` and `b` widened exactly (F16C, as `quant`'s decoders do): `a`'s in lanes
/// 0-7, `b`'s in lanes 8-15.
#[inline(always)]
unsafe fn f16_halves(a: *const u8, b: *const u8) -> __m512 {
    let bits = u16::from_le_bytes([*a, *a.add(1)]) as u32
        | (u16::from_le_bytes([*b, *b.add(1)]) as u32) << 16;
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
    let idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v))
}

/// Two rows' 32 bytes each (`a` and `b`, element order) in the pair layout: for each group of
/// 8, row `a`'s 8 bytes then row `b`'s.
#[inline(always)]
unsafe fn pair_layout(a: __m256i, b: __m256i) -> __m512i {
    let ab = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
    _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7), ab)
}

/// The 16 bytes of nibbles of a 32-value block at `a` and at `b` (byte `j`: element `j` low,
/// `j + 16` high) as the 32 + 32 nibbles in the pair layout.
#[inline(always)]
unsafe fn nibbles_pair(a: *const u8, b: *const u8) -> __m512i {
    // Quadwords a0-7 a8-15 b0-7 b8-15, arranged twice: low nibbles, then high ones.
    let v = _mm256_loadu2_m128i(b.cast(), a.cast());
    let idx = _mm512_setr_epi64(0, 2, 1, 3, 0, 2, 1, 3);
    let z = _mm512_permutexvar_epi64(idx, _mm512_castsi256_si512(v));
    let z = _mm512_mask_srli_epi16::<4>(z, 0xFFFF_0000, z);
    _mm512_and_si512(z, _mm512_set1_epi8(0x0F))
}

/// The fifth bits of a 32-value block pair (the u32s at `a` and `b`, bit `i` for element `i`)
/// as a byte mask in the pair layout.
#[inline(always)]
unsafe fn bits_pair(a: *const u8, b: *const u8) -> __mmask64 {
    let (qa, qb) = (
        u32::from_le_bytes([*a, *a.add(1), *a.add(2), *a.add(3)]),
        u32::from_le_bytes([*b, *b.add(1), *b.add(2), *b.add(3)]),
    );
    _pdep_u64(qa as u64, 0x00FF_00FF_00FF_00FF) | _pdep_u64(qb as u64, 0xFF00_FF00_FF00_FF00)
}

/// 64 bytes in the pair layout, stored for [`signed16`] / [`unsigned16`].
#[derive(Clone, Copy)]
#[repr(align(64))]
struct Bytes64([u8; 64]);

impl Bytes64 {
    #[inline(always)]
    unsafe fn new(v: __m512i) -> Bytes64 {
        let mut b = Bytes64([0; 64]);
        _mm512_store_si512(b.0.as_mut_ptr().cast(), v);
        b
    }
}

/// Group `g`'s 16 signed bytes at `p` (pair layout) as f32 lanes.
#[inline(always)]
unsafe fn signed16(p: *const u8, g: usize) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(p.add(16 * g).cast())))
}

/// Group `g`'s 16 unsigned bytes at `p` (pair layout) as f32 lanes.
#[inline(always)]
unsafe fn unsigned16(p: *const u8, g: usize) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(p.add(16 * g).cast())))
}

/// Q8_0: f16 d, 32 × i8; `q * d`.
struct Q8_0;
impl Paired for Q8_0 {
    const PER: usize = 32;
    const BYTES: usize = 34;
    type Prep = __m512;
    #[inline(always)]
    unsafe fn prep(a: *const u8, b: *const u8) -> __m512 {
        f16_halves(a, b)
    }
    #[inline(always)]
    unsafe fn sixteen(a: *const u8, b: *const u8, d: &__m512, g: usize) -> __m512 {
        let lo = _mm_loadl_epi64(a.add(2 + 8 * g).cast());
        let q = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(lo), b.add(2 + 8 * g).cast()));
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), *d)
    }
}

/// Q4_0 / Q5_0: `d * q'`, the small integers `q'` (offset applied) in the pair layout.
type Offset = (__m512, Bytes64);

/// `d * q'` for group `g`, as `quant`'s `d * (float(q) - off)` (exact subtraction).
#[inline(always)]
unsafe fn offset16(&(d, ref q): &Offset, g: usize) -> __m512 {
    _mm512_mul_ps(d, signed16(q.0.as_ptr(), g))
}

/// Q4_0: f16 d, 16 bytes of nibbles; `d * (q - 8)`.
struct Q4_0;
impl Paired for Q4_0 {
    const PER: usize = 32;
    const BYTES: usize = 18;
    type Prep = Offset;
    #[inline(always)]
    unsafe fn prep(a: *const u8, b: *const u8) -> Offset {
        let q = _mm512_sub_epi8(nibbles_pair(a.add(2), b.add(2)), _mm512_set1_epi8(8));
        (f16_halves(a, b), Bytes64::new(q))
    }
    #[inline(always)]
    unsafe fn sixteen(_: *const u8, _: *const u8, p: &Offset, g: usize) -> __m512 {
        offset16(p, g)
    }
}

/// Q5_0: f16 d, u32 fifth bits, 16 bytes of nibbles; `d * (q - 16)`.
struct Q5_0;
impl Paired for Q5_0 {
    const PER: usize = 32;
    const BYTES: usize = 22;
    type Prep = Offset;
    #[inline(always)]
    unsafe fn prep(a: *const u8, b: *const u8) -> Offset {
        // `nibble + 16·bit - 16`: the nibble less 16 where the bit is clear.
        let nib = nibbles_pair(a.add(6), b.add(6));
        let clear = !bits_pair(a.add(2), b.add(2));
        let q = _mm512_mask_sub_epi8(nib, clear, nib, _mm512_set1_epi8(16));
        (f16_halves(a, b), Bytes64::new(q))
    }
    #[inline(always)]
    unsafe fn sixteen(_: *const u8, _: *const u8, p: &Offset, g: usize) -> __m512 {
        offset16(p, g)
    }
}

/// Q4_1 / Q5_1: d, m and the unsigned integers `q` in the pair layout; `d * q + m`.
type Affine = (__m512, __m512, Bytes64);

/// `fma(d, q, m)` for group `g`: `d * q` is exact, so the bits of `quant`'s `d * q + m`.
#[inline(always)]
unsafe fn affine16(&(d, m, ref q): &Affine, g: usize) -> __m512 {
    _mm512_fmadd_ps(d, unsigned16(q.0.as_ptr(), g), m)
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles; `d * q + m`.
struct Q4_1;
impl Paired for Q4_1 {
    const PER: usize = 32;
    const BYTES: usize = 20;
    type Prep = Affine;
    #[inline(always)]
    unsafe fn prep(a: *const u8, b: *const u8) -> Affine {
        let q = nibbles_pair(a.add(4), b.add(4));
        (
            f16_halves(a, b),
            f16_halves(a.add(2), b.add(2)),
            Bytes64::new(q),
        )
    }
    #[inline(always)]
    unsafe fn sixteen(_: *const u8, _: *const u8, p: &Affine, g: usize) -> __m512 {
        affine16(p, g)
    }
}

/// Q5_1: f16 d, f16 m, u32 fifth bits, 16 bytes of nibbles; `d * q + m`.
struct Q5_1;
impl Paired for Q5_1 {
    const PER: usize = 32;
    const BYTES: usize = 24;
    type Prep = Affine;
    #[inline(always)]
    unsafe fn prep(a: *const u8, b: *const u8) -> Affine {
        let nib = nibbles_pair(a.add(8), b.add(8));
        let set = bits_pair(a.add(4), b.add(4));
        let q = _mm512_mask_add_epi8(nib, set, nib, _mm512_set1_epi8(16));
        (
            f16_halves(a, b),
            f16_halves(a.add(2), b.add(2)),
            Bytes64::new(q),
        )
    }
    #[inline(always)]
    unsafe fn sixteen(_: *const u8, _: *const u8, p: &Affine, g: usize) -> __m512 {
        affine16(p, g)
    }
}

/// A Q4_K/Q5_K block pair: per sub-block `j`, `d·sc[j]` and `−dmin·m[j]` of each row (in
/// lanes 0-7 and 8-15), and the 256 + 256 integers in the pair layout (64 bytes per sub-block).
#[derive(Clone, Copy)]
struct KPrep {
    ds: [__m512; 8],
    neg_dm: [__m512; 8],
    q: [Bytes64; 8],
}

/// The factors and 4-bit values of a Q4_K/Q5_K block pair, its nibbles `qs` bytes into each
/// block.
#[inline(always)]
unsafe fn k_prep(a: *const u8, b: *const u8, qs: usize) -> KPrep {
    let (ds, dm) = k_factors_pair(a, b);
    let neg_dm = _mm512_sub_ps(_mm512_setzero_ps(), dm);
    let mut p = KPrep {
        ds: [_mm512_setzero_ps(); 8],
        neg_dm: [_mm512_setzero_ps(); 8],
        q: [Bytes64([0; 64]); 8],
    };
    for j in 0..8 {
        let idx = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(j), _mm512_set1_epi32(8 + j));
        p.ds[j as usize] = _mm512_permutexvar_ps(idx, ds);
        p.neg_dm[j as usize] = _mm512_permutexvar_ps(idx, neg_dm);
    }
    // Sub-blocks 2c and 2c + 1: the low and high nibbles of bytes 32c..32c + 32.
    let f = _mm512_set1_epi8(0x0F);
    for c in 0..4 {
        let z = pair_layout(
            _mm256_loadu_si256(a.add(qs + 32 * c).cast()),
            _mm256_loadu_si256(b.add(qs + 32 * c).cast()),
        );
        p.q[2 * c] = Bytes64::new(_mm512_and_si512(z, f));
        p.q[2 * c + 1] = Bytes64::new(_mm512_and_si512(_mm512_srli_epi16::<4>(z), f));
    }
    p
}

/// A Q4_K/Q5_K block pair's sub-block factors `d * sc[j]` (first) and `dmin * m[j]` of the
/// block at `a` in lanes `j` and of the block at `b` in lanes `8 + j`: the products
/// `blocks_avx2::k_factors` forms, the 6-bit scales and mins unpacked as `quant::k_scale_min`
/// does, 16 at once.
#[inline(always)]
unsafe fn k_factors_pair(a: *const u8, b: *const u8) -> (__m512, __m512) {
    // Scale bytes s[0..12] of a at bytes 0.., of b at 16.. (16 read, 12 used).
    let v = _mm512_castsi256_si512(_mm256_loadu2_m128i(b.add(4).cast(), a.add(4).cast()));
    // Lane j gathers [lo, hi] bytes of its scale and of its min: j < 4: s[j], -, s[j + 4], -;
    // j >= 4: s[j + 4], s[j - 4], s[j + 4], s[j].
    let lane = |j: i32| -> i32 {
        let [b0, b1, c0, c1] = if j < 4 {
            [j, j, j + 4, j + 4]
        } else {
            [j + 4, j - 4, j + 4, j]
        };
        b0 | b1 << 8 | c0 << 16 | c1 << 24
    };
    let idx_a = _mm256_setr_epi32(
        lane(0),
        lane(1),
        lane(2),
        lane(3),
        lane(4),
        lane(5),
        lane(6),
        lane(7),
    );
    let idx_b = _mm256_add_epi8(idx_a, _mm256_set1_epi8(16));
    let idx = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(idx_a), idx_b);
    let l = _mm512_permutexvar_epi8(idx, v);
    // Per lane: j < 4 (lanes 0-3, 8-11): sc = lo & 63, m = (l >> 16) & 63; j >= 4:
    // sc = (lo & 15) | (hi >> 6) << 4, m = (c0 >> 4) | (c1 >> 6) << 4.
    let low4 = 0xF0F0u16;
    let (m63, m15, m30) = (
        _mm512_set1_epi32(63),
        _mm512_set1_epi32(15),
        _mm512_set1_epi32(0x30),
    );
    let keep = _mm512_mask_blend_epi32(low4, m63, m15);
    let high = _mm512_maskz_mov_epi32(low4, m30);
    let shift = _mm512_mask_blend_epi32(low4, _mm512_set1_epi32(16), _mm512_set1_epi32(20));
    let sc = _mm512_or_si512(
        _mm512_and_si512(l, keep),
        _mm512_and_si512(_mm512_srli_epi32::<10>(l), high),
    );
    let m = _mm512_or_si512(
        _mm512_and_si512(_mm512_srlv_epi32(l, shift), keep),
        _mm512_and_si512(_mm512_srli_epi32::<26>(l), high),
    );
    // Lanes 0-7 a's d (dmin), 8-15 b's.
    let d = f16_halves(a, b);
    let dmin = f16_halves(a.add(2), b.add(2));
    (
        _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc)),
        _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m)),
    )
}

/// `fma(d·sc, q, −dmin·m)` for group `g` (sub-block `g / 4`): `(d·sc)·q` is exact, so the bits
/// of `quant`'s `(d * sc) * q - dmin * m`.
#[inline(always)]
unsafe fn k16(p: &KPrep, g: usize) -> __m512 {
    let j = g / 4;
    let q = unsigned16(p.q[j].0.as_ptr(), g % 4);
    _mm512_fmadd_ps(p.ds[j], q, p.neg_dm[j])
}

/// Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.
struct Q4K;
impl Paired for Q4K {
    const PER: usize = 256;
    const BYTES: usize = 144;
    type Prep = KPrep;
    #[inline(always)]
    unsafe fn prep(a: *const u8, b: *const u8) -> KPrep {
        k_prep(a, b, 16)
    }
    #[inline(always)]
    unsafe fn sixteen(_: *const u8, _: *const u8, p: &KPrep, g: usize) -> __m512 {
        k16(p, g)
    }
}

/// Q5_K: as Q4_K with 32 bytes of fifth bits (bit `j` of byte `i`: value `i` of sub-block `j`).
struct Q5K;
impl Paired for Q5K {
    const PER: usize = 256;
    const BYTES: usize = 176;
    type Prep = KPrep;
    #[inline(always)]
    unsafe fn prep(a: *const u8, b: *const u8) -> KPrep {
        let mut p = k_prep(a, b, 48);
        let qh = pair_layout(
            _mm256_loadu_si256(a.add(16).cast()),
            _mm256_loadu_si256(b.add(16).cast()),
        );
        let sixteen = _mm512_set1_epi8(16);
        for j in 0..8 {
            let set = _mm512_test_epi8_mask(qh, _mm512_set1_epi8(1 << j));
            let q = _mm512_load_si512(p.q[j].0.as_ptr().cast());
            p.q[j] = Bytes64::new(_mm512_mask_add_epi8(q, set, q, sixteen));
        }
        p
    }
    #[inline(always)]
    unsafe fn sixteen(_: *const u8, _: *const u8, p: &KPrep, g: usize) -> __m512 {
        k16(p, g)
    }
}

/// A Q6_K block pair: `d·sc[i]` of each row for its 16 scales (in lanes 0-7 and 8-15) and the
/// 256 + 256 values `q − 32` in the pair layout (64 bytes per 32 elements).
#[derive(Clone, Copy)]
struct Q6Prep {
    de: [__m512; 16],
    q: [Bytes64; 8],
}

/// Q6_K: 128 bytes of low nibbles, 64 of high pairs, 16 × i8 scales, f16 d;
/// `(d * sc[e / 16]) * (q - 32)`.
struct Q6K;
impl Paired for Q6K {
    const PER: usize = 256;
    const BYTES: usize = 210;
    type Prep = Q6Prep;
    #[inline(always)]
    unsafe fn prep(a: *const u8, b: *const u8) -> Q6Prep {
        let mut p = Q6Prep {
            de: [_mm512_setzero_ps(); 16],
            q: [Bytes64([0; 64]); 8],
        };
        // d * sc[i] of a's 16 scales and of b's, then lanes i (8 copies) and 16 + i.
        let de = |x: *const u8| {
            let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(x.add(192).cast()));
            _mm512_mul_ps(_mm512_set1_ps(f16(x.add(208))), _mm512_cvtepi32_ps(sc))
        };
        let (da, db) = (de(a), de(b));
        for i in 0..16 {
            let idx =
                _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(i), _mm512_set1_epi32(16 + i));
            p.de[i as usize] = _mm512_permutex2var_ps(da, idx, db);
        }
        let load = |o: usize| {
            pair_layout(
                _mm256_loadu_si256(a.add(o).cast()),
                _mm256_loadu_si256(b.add(o).cast()),
            )
        };
        let (f, three, off) = (
            _mm512_set1_epi8(0x0F),
            _mm512_set1_epi8(0x30),
            _mm512_set1_epi8(32),
        );
        // Elements 128h + 32s + i: low nibble s / 2 of ql byte 64h + 32(s % 2) + i, high bits
        // 2s..2s + 2 of qh byte 32h + i.
        for h in 0..2 {
            let ql = [load(64 * h), load(64 * h + 32)];
            let qh = load(128 + 32 * h);
            for s in 0..4 {
                let lo = match s / 2 {
                    0 => ql[s % 2],
                    _ => _mm512_srli_epi16::<4>(ql[s % 2]),
                };
                // Bits 2s..2s + 2 moved to bits 4..6.
                let hi = match s {
                    0 => _mm512_slli_epi16::<4>(qh),
                    1 => _mm512_slli_epi16::<2>(qh),
                    2 => qh,
                    _ => _mm512_srli_epi16::<2>(qh),
                };
                let q = _mm512_or_si512(_mm512_and_si512(lo, f), _mm512_and_si512(hi, three));
                p.q[4 * h + s] = Bytes64::new(_mm512_sub_epi8(q, off));
            }
        }
        p
    }
    #[inline(always)]
    unsafe fn sixteen(_: *const u8, _: *const u8, p: &Q6Prep, g: usize) -> __m512 {
        _mm512_mul_ps(p.de[g / 2], signed16(p.q[g / 4].0.as_ptr(), g % 4))
    }
}

/// Accumulators for rows `2p` (lanes 0-7) and `2p + 1` (lanes 8-15), `p < P`, and tokens
/// `t < N`, over `len` elements: `x` valid for `N` rows of `len` f32 `xrow` apart, `w` for
/// `2P` rows of `len / B::PER` blocks `wrow` bytes apart; lanes and order of `avx2`'s decode
/// tile.
///
/// # Safety
/// [`available`]; `len` a multiple of `B::PER`.
#[inline(always)]
unsafe fn tile<B: Paired, const BF: bool, const P: usize, const N: usize>(
    x: *const f32,
    xrow: usize,
    len: usize,
    w: *const u8,
    wrow: usize,
) -> [[__m512; N]; P] {
    let mut acc = [[_mm512_setzero_ps(); N]; P];
    for blk in 0..len / B::PER {
        // Plain loops, not `array::from_fn`: its closures are not inlined into the caller's
        // target features, and every intrinsic in them becomes a call.
        let mut bp = [(w, w); P];
        for (p, e) in bp.iter_mut().enumerate() {
            let a = w.add(2 * p * wrow + blk * B::BYTES);
            *e = (a, a.add(wrow));
            // The next tile's rows follow these: start fetching them. Past the end it reads
            // nothing.
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(2 * P * wrow).cast());
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add((2 * P + 1) * wrow).cast());
        }
        let mut prep = [B::prep(bp[0].0, bp[0].1); P];
        for p in 1..P {
            prep[p] = B::prep(bp[p].0, bp[p].1);
        }
        let xb = x.add(blk * B::PER);
        for g in 0..B::PER / 8 {
            let mut wv = [_mm512_setzero_ps(); P];
            for p in 0..P {
                let v = B::sixteen(bp[p].0, bp[p].1, &prep[p], g);
                wv[p] = if BF {
                    crate::kernels::simd512::round_bf16_x16(v)
                } else {
                    v
                };
            }
            for t in 0..N {
                let xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(xb.add(t * xrow + 8 * g)));
                for (a, &wv) in acc.iter_mut().zip(&wv) {
                    a[t] = _mm512_fmadd_ps(wv, xv, a[t]);
                }
            }
        }
    }
    acc
}

/// Raw sums `out[t·m + j] = Σ_i x[t·k + i]·w[j][i]` for every row `j` in `rows` and token
/// `t < n`, `w` whole blocks of the block dtype `dtype`, the decoded weights rounded to bf16
/// when `bf16`: bit for bit what [`blocks_avx2::sums`] gives.
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
    // Tiles of 4 rows here, the rest (fewer than 4) on the AVX2 kernel.
    let split = rows.start + rows.len() / 4 * 4;
    macro_rules! run {
        ($b:ty) => {
            if bf16 {
                sums_fma::<$b, true>(x, n, k, w, m, rows.start..split, out)
            } else {
                sums_fma::<$b, false>(x, n, k, w, m, rows.start..split, out)
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
    if split < rows.end {
        blocks_avx2::sums(dtype, bf16, x, n, k, w, m, split..rows.end, out);
    }
}

/// [`sums`] for block type `B` on rows `rows` (a multiple of 4 of them).
///
/// # Safety
/// As [`sums`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,bmi2,avx2,fma,f16c")]
unsafe fn sums_fma<B: Paired, const BF: bool>(
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
            && rows.len().is_multiple_of(4)
            && w.len() >= rows.end * wrow
    );
    for j in rows.step_by(4) {
        for c0 in (0..k).step_by(KC) {
            let len = KC.min(k - c0);
            let xp = x.as_ptr().add(c0);
            let wp = w.as_ptr().add(j * wrow + c0 / B::PER * B::BYTES);
            let mut add = |r: usize, t: usize, v: f32| {
                let o = out.add(t * m + j + r);
                *o = if c0 == 0 { v } else { *o + v };
            };
            match n {
                1 => each(tile::<B, BF, 2, 1>(xp, k, len, wp, wrow), &mut add),
                2 => each(tile::<B, BF, 2, 2>(xp, k, len, wp, wrow), &mut add),
                _ => each(tile::<B, BF, 2, 3>(xp, k, len, wp, wrow), &mut add),
            }
        }
    }
}

/// Calls `f(row, token, value)` for every row and token of a tile's accumulators, each half
/// reduced as `avx2::reduce` reduces the AVX2 kernel's accumulator.
#[inline(always)]
unsafe fn each<const P: usize, const N: usize>(
    acc: [[__m512; N]; P],
    f: &mut impl FnMut(usize, usize, f32),
) {
    for (p, a) in acc.iter().enumerate() {
        for (t, &v) in a.iter().enumerate() {
            f(2 * p, t, avx2::reduce(_mm512_castps512_ps256(v)));
            f(2 * p + 1, t, avx2::reduce(_mm512_extractf32x8_ps::<1>(v)));
        }
    }
}
