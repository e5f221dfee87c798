//! The integer dot products of [`super::dot_scalar`] on AVX2, modeled on llama.cpp's AVX2
//! `ggml_vec_dot_*_q8_*` (`ggml-cpu/arch/x86/quants.c`): 32 weight quants unpacked to bytes,
//! multiplied with 32 activation quants by `maddubs` (u8 × i8, pairs summed to i16), `madd` to
//! i32 lanes, then each block's 8 lanes converted to f32 and FMA'd with the block's scale product
//! `dx·dy` into 8 f32 lanes, reduced at the end as llama.cpp's `hsum_float_8`. Q8_0's signed
//! weights go through llama.cpp's sign trick `|x| × sign(y, x)`; Q4_0/Q5_0's `q - 8`/`q - 16`
//! are taken unsigned, and the lanes of `8·y`/`16·y` (once per activation block, for every row)
//! subtracted after the `madd` (the same i32 lanes as the sign trick gives). K-quants weight the
//! i16 pair sums by their sub-block scales with `madd` and sum a block's 256 products in i32
//! lanes before the one FMA; Q4_K/Q5_K's mins meet the activations' 16-sums, Q6_K's offset 32
//! is removed as `32·Σ scale·bsum`.
//!
//! Unlike llama.cpp's one row by one token, a call computes tiles of 4 weight rows (then single
//! rows) by up to 3 tokens, unpacking each weight block once for all the tile's tokens, so each
//! weight byte is read from memory once per call when the call has at most 3 tokens (more
//! tokens re-read a tile's rows from L1). Each block also prefetches the next tile's block.
//!
//! The integer sums are exact and the same as the reference's (no i16 saturation: at most
//! 2 · 128 · 127 per `maddubs` pair); only the f32 products and additions are grouped
//! differently, so results differ from [`super::dot_scalar`] by f32 reordering error (the bound
//! is derived in `dot_tests`).

use super::q8act::Q8Acts;
use crate::weights::StoredDtype;
use std::arch::x86_64::*;
use std::ops::Range;

/// Whether this CPU runs [`sums`]: AVX2, FMA and F16C.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The f16 at `b` widened exactly (F16C).
#[inline(always)]
unsafe fn f16(b: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*b, *b.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The two f16 at `b` and `b + 2` widened exactly (one 4-byte load: the block's `d` and the
/// next field, which is `m` for Q4_1/Q5_1 and ignored otherwise).
#[inline(always)]
unsafe fn f16x2(b: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(b.cast::<i32>().read_unaligned()));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// llama.cpp's `hsum_float_8`: high half + low half, then pairs, then the last two.
#[inline(always)]
unsafe fn hsum(x: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
}

/// 16 bytes of nibbles at `p` (byte `j`: value `j` low, `j + 16` high) as 32 bytes in value
/// order (`bytes_from_nibbles_32`).
#[inline(always)]
unsafe fn nibbles32(p: *const u8) -> __m256i {
    let v = _mm_loadu_si128(p.cast());
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(v), v);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Byte `i` all ones where bit `i` of the u32 at `p` is set (`bytes_from_bits_32`).
#[inline(always)]
unsafe fn bits32(p: *const u8) -> __m256i {
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

/// A 32-value weight type: its block unpacked to 32 quant bytes, its scale and min.
trait Small {
    /// Bytes per block.
    const BYTES: usize;
    /// Whether the quants are signed i8 (multiplied with the sign trick).
    const SIGNED: bool;
    /// The offset subtracted from the unsigned quants (`q - OFF`), 0 for none. Rather than
    /// llama.cpp's `q - OFF` then the sign trick, `maddubs` takes the unsigned `q` and the
    /// lanes of `OFF·y`, computed once per activation block for every row, are subtracted
    /// after the `madd`: the same i32 lanes, fewer instructions per weight block.
    const OFF: i8;
    /// Whether the block has a min `m` (times the activations' `s`).
    const MIN: bool;
    /// `(quants, d, m)` of the block at `b`.
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32);
}

/// Q8_0: f16 d, 32 × i8.
struct Q8_0;
impl Small for Q8_0 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    const OFF: i8 = 0;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        (_mm256_loadu_si256(b.add(2).cast()), f16x2(b).0, 0.0)
    }
}

/// Q4_0: f16 d, nibbles; `q - 8`.
struct Q4_0;
impl Small for Q4_0 {
    const BYTES: usize = 18;
    const SIGNED: bool = false;
    const OFF: i8 = 8;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        (nibbles32(b.add(2)), f16x2(b).0, 0.0)
    }
}

/// Q4_1: f16 d, f16 m, nibbles.
struct Q4_1;
impl Small for Q4_1 {
    const BYTES: usize = 20;
    const SIGNED: bool = false;
    const OFF: i8 = 0;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        let (d, m) = f16x2(b);
        (nibbles32(b.add(4)), d, m)
    }
}

/// Q5_0: f16 d, u32 fifth bits, nibbles; `q - 16`.
struct Q5_0;
impl Small for Q5_0 {
    const BYTES: usize = 22;
    const SIGNED: bool = false;
    const OFF: i8 = 16;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        let high = _mm256_and_si256(bits32(b.add(2)), _mm256_set1_epi8(16));
        (_mm256_or_si256(nibbles32(b.add(6)), high), f16x2(b).0, 0.0)
    }
}

/// Q5_1: f16 d, f16 m, u32 fifth bits, nibbles.
struct Q5_1;
impl Small for Q5_1 {
    const BYTES: usize = 24;
    const SIGNED: bool = false;
    const OFF: i8 = 0;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        let high = _mm256_and_si256(bits32(b.add(4)), _mm256_set1_epi8(16));
        (
            _mm256_or_si256(nibbles32(b.add(8)), high),
            f16x2(b).0,
            f16x2(b).1,
        )
    }
}

/// Computes a tile: `[[f32; N]; R]` dot products of `R` weight rows (at `w`, `wrow` bytes
/// apart) with `N` activation rows from `t0`.
trait Kern {
    /// Weight bytes per block.
    const BYTES: usize;
    /// Values per block.
    const PER: usize;
    /// The tile.
    ///
    /// # Safety
    /// AVX2, FMA, F16C; `w` valid for `R` rows of `a.k / PER` blocks; `t0 + N <= a.n`.
    unsafe fn tile<const R: usize, const N: usize>(
        a: &Q8Acts,
        t0: usize,
        w: *const u8,
        wrow: usize,
    ) -> [[f32; N]; R];
}

/// Every [`Small`] type's tile: per block, the activations' quants and scales loaded once, each
/// row's block unpacked once, then one `maddubs`/`madd`/FMA per (row, token).
struct SmallKern<B>(std::marker::PhantomData<B>);
impl<B: Small> Kern for SmallKern<B> {
    const BYTES: usize = B::BYTES;
    const PER: usize = 32;
    #[inline(always)]
    unsafe fn tile<const R: usize, const N: usize>(
        a: &Q8Acts,
        t0: usize,
        w: *const u8,
        wrow: usize,
    ) -> [[f32; N]; R] {
        let (k, nb) = (a.k, a.k / 32);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        let mut summs = [[0f32; N]; R];
        for ib in 0..nb {
            let mut qy = [_mm256_setzero_si256(); N];
            let mut off = [_mm256_setzero_si256(); N];
            let (mut dy, mut sy) = ([0f32; N], [0f32; N]);
            for t in 0..N {
                qy[t] = _mm256_loadu_si256(a.qs.as_ptr().add((t0 + t) * k + 32 * ib).cast());
                if B::OFF != 0 {
                    let o = _mm256_maddubs_epi16(_mm256_set1_epi8(B::OFF), qy[t]);
                    off[t] = _mm256_madd_epi16(o, ones);
                }
                dy[t] = *a.d.get_unchecked((t0 + t) * nb + ib);
                if B::MIN {
                    sy[t] = *a.s.get_unchecked((t0 + t) * nb + ib);
                }
            }
            for r in 0..R {
                let bp = w.add(r * wrow + ib * B::BYTES);
                // The next tile's rows follow these: start fetching them.
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(R * wrow).cast());
                let (qx, dx, mx) = B::unpack(bp);
                let ax = if B::SIGNED {
                    _mm256_sign_epi8(qx, qx)
                } else {
                    qx
                };
                for t in 0..N {
                    let y = if B::SIGNED {
                        _mm256_sign_epi8(qy[t], qx)
                    } else {
                        qy[t]
                    };
                    let mut p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, y), ones);
                    if B::OFF != 0 {
                        p = _mm256_sub_epi32(p, off[t]);
                    }
                    let d = _mm256_set1_ps(dx * dy[t]);
                    acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[r][t]);
                    if B::MIN {
                        summs[r][t] += mx * sy[t];
                    }
                }
            }
        }
        let mut out = [[0f32; N]; R];
        for r in 0..R {
            for t in 0..N {
                out[r][t] = hsum(acc[r][t]) + summs[r][t];
            }
        }
        out
    }
}

/// A Q4_K/Q5_K block's 6-bit scales (low 128 bits) and mins (high) as 16 × u16, with llama.cpp's
/// `utmp` shuffle of the 12 bytes at `s` (plain u32 operations), then `_mm256_cvtepu8_epi16`.
#[inline(always)]
unsafe fn k_mins_and_scales(s: *const u8) -> __m256i {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let u0 = s.cast::<u32>().read_unaligned();
    let u1 = s.add(4).cast::<u32>().read_unaligned();
    let u2 = s.add(8).cast::<u32>().read_unaligned();
    let u3 = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let mins01 = u1 & KMASK1;
    let sc47 = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let sc03 = u0 & KMASK1;
    _mm256_cvtepu8_epi16(_mm_set_epi32(
        u3 as i32,
        mins01 as i32,
        sc47 as i32,
        sc03 as i32,
    ))
}

/// Bit `s` of each byte of `hbits`, times 16 (a Q5_K sub-block's fifth bits).
#[inline(always)]
unsafe fn fifth_bits(hbits: __m256i, s: i32) -> __m256i {
    let v = _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(s));
    _mm256_slli_epi16::<4>(_mm256_and_si256(v, _mm256_set1_epi8(1)))
}

/// `get_scale_shuffle_k4(i)`: every u16 lane gets scale `i`.
#[inline(always)]
unsafe fn k4_shuffle(i: usize) -> __m256i {
    let lo = (2 * i) as i8;
    let pair = i16::from_le_bytes([lo as u8, (lo + 1) as u8]);
    _mm256_set1_epi16(pair)
}

/// Q4_K and Q5_K (`FIVE`) × Q8_K, as llama.cpp's AVX2 `ggml_vec_dot_q4_K_q8_K`: per block and
/// 64 values, the two sub-blocks' nibbles (plus fifth bits) `maddubs` the activations, `madd`
/// weights the pair sums by the sub-block scale; the block's i32 lanes get one FMA with
/// `dx·dy`; the mins' `madd` with the pairwise-added 16-sums go to a 4-lane accumulator with
/// `-dy·dmin`.
struct K45<const FIVE: bool>;
impl<const FIVE: bool> Kern for K45<FIVE> {
    const BYTES: usize = if FIVE { 176 } else { 144 };
    const PER: usize = 256;
    #[inline(always)]
    unsafe fn tile<const R: usize, const N: usize>(
        a: &Q8Acts,
        t0: usize,
        w: *const u8,
        wrow: usize,
    ) -> [[f32; N]; R] {
        let (k, nb) = (a.k, a.k / 256);
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        let mut acc_m = [[_mm_setzero_ps(); N]; R];
        let qoff = if FIVE { 48 } else { 16 };
        for ib in 0..nb {
            let mut q8s = [_mm_setzero_si128(); N];
            let mut dy = [0f32; N];
            for t in 0..N {
                let bs = _mm256_loadu_si256(a.bsums.as_ptr().add(16 * ((t0 + t) * nb + ib)).cast());
                q8s[t] = _mm_hadd_epi16(
                    _mm256_castsi256_si128(bs),
                    _mm256_extracti128_si256::<1>(bs),
                );
                dy[t] = *a.d.get_unchecked((t0 + t) * nb + ib);
            }
            for r in 0..R {
                let bp = w.add(r * wrow + ib * Self::BYTES);
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(R * wrow).cast());
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(R * wrow + 64).cast());
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(R * wrow + 128).cast());
                let (xd, xmin) = f16x2(bp);
                let ms = k_mins_and_scales(bp.add(4));
                let mins = _mm256_extracti128_si256::<1>(ms);
                let sc128 = _mm256_castsi256_si128(ms);
                let scales = _mm256_set_m128i(sc128, sc128);
                let hbits = if FIVE {
                    _mm256_loadu_si256(bp.add(16).cast())
                } else {
                    _mm256_setzero_si256()
                };
                let mut sumi = [_mm256_setzero_si256(); N];
                let q4 = bp.add(qoff);
                let a0 = a.qs.as_ptr().add(256 * ib);
                for j in 0..4 {
                    let sl = _mm256_shuffle_epi8(scales, k4_shuffle(2 * j));
                    let sh = _mm256_shuffle_epi8(scales, k4_shuffle(2 * j + 1));
                    let bits = _mm256_loadu_si256(q4.add(32 * j).cast());
                    let mut ql = _mm256_and_si256(bits, m4);
                    let mut qh = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
                    if FIVE {
                        ql = _mm256_add_epi8(ql, fifth_bits(hbits, 2 * j as i32));
                        qh = _mm256_add_epi8(qh, fifth_bits(hbits, 2 * j as i32 + 1));
                    }
                    for (t, sumi) in sumi.iter_mut().enumerate() {
                        let y = a0.add((t0 + t) * k + 64 * j);
                        let yl = _mm256_loadu_si256(y.cast());
                        let yh = _mm256_loadu_si256(y.add(32).cast());
                        let pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(ql, yl));
                        let ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(qh, yh));
                        *sumi = _mm256_add_epi32(*sumi, _mm256_add_epi32(pl, ph));
                    }
                }
                for t in 0..N {
                    let d = dy[t] * xd;
                    let dmin = -dy[t] * xmin;
                    let prod = _mm_madd_epi16(mins, q8s[t]);
                    acc_m[r][t] =
                        _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[r][t]);
                    acc[r][t] =
                        _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[t]), acc[r][t]);
                }
            }
        }
        let mut out = [[0f32; N]; R];
        for r in 0..R {
            for t in 0..N {
                let m = acc_m[r][t];
                let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_add_ss(m, _mm_movehdup_ps(m));
                out[r][t] = hsum(acc[r][t]) + _mm_cvtss_f32(m);
            }
        }
        out
    }
}

/// `get_scale_shuffle(i)`: bytes 0..8 get scale `2i`, bytes 8..16 scale `2i + 1`.
#[inline(always)]
unsafe fn q6_shuffle(i: usize) -> __m128i {
    let (a, b) = ((2 * i) as i64, (2 * i + 1) as i64);
    _mm_set_epi64x(b * 0x0101_0101_0101_0101, a * 0x0101_0101_0101_0101)
}

/// Q6_K × Q8_K, as llama.cpp's AVX2 `ggml_vec_dot_q6_K_q8_K`: the 6-bit values taken unsigned
/// (0..63) through `maddubs`, each 16's pair sums weighted by its signed scale with `madd`, and
/// the offset 32 removed at once as `32·Σ scale·bsum`.
struct K6;
impl Kern for K6 {
    const BYTES: usize = 210;
    const PER: usize = 256;
    #[inline(always)]
    unsafe fn tile<const R: usize, const N: usize>(
        a: &Q8Acts,
        t0: usize,
        w: *const u8,
        wrow: usize,
    ) -> [[f32; N]; R] {
        let (k, nb) = (a.k, a.k / 256);
        let m3 = _mm256_set1_epi8(3);
        let m15 = _mm256_set1_epi8(15);
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        for ib in 0..nb {
            let mut bsums = [_mm256_setzero_si256(); N];
            let mut dy = [0f32; N];
            for t in 0..N {
                let p = a.bsums.as_ptr().add(16 * ((t0 + t) * nb + ib));
                bsums[t] = _mm256_loadu_si256(p.cast());
                dy[t] = *a.d.get_unchecked((t0 + t) * nb + ib);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let bp = w.add(r * wrow + ib * Self::BYTES);
                for off in [0, 64, 128, 192] {
                    _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(R * wrow + off).cast());
                }
                let xd = f16(bp.add(208));
                let scales = _mm_loadu_si128(bp.add(192).cast());
                let scales16 = _mm256_cvtepi8_epi16(scales);
                let mut sumi = [_mm256_setzero_si256(); N];
                for j in 0..2 {
                    let q4 = bp.add(64 * j);
                    let b1 = _mm256_loadu_si256(q4.cast());
                    let b2 = _mm256_loadu_si256(q4.add(32).cast());
                    let bh = _mm256_loadu_si256(bp.add(128 + 32 * j).cast());
                    let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(bh, m3));
                    let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(bh, _mm256_set1_epi8(12)));
                    let h2 = _mm256_and_si256(bh, _mm256_set1_epi8(48));
                    let h3 = _mm256_srli_epi16::<2>(_mm256_and_si256(bh, _mm256_set1_epi8(-64)));
                    let q = [
                        _mm256_or_si256(_mm256_and_si256(b1, m15), h0),
                        _mm256_or_si256(_mm256_and_si256(b2, m15), h1),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b1), m15), h2),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b2), m15), h3),
                    ];
                    let mut s = [_mm256_setzero_si256(); 4];
                    for (i, s) in s.iter_mut().enumerate() {
                        *s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, q6_shuffle(4 * j + i)));
                    }
                    for (t, sumi) in sumi.iter_mut().enumerate() {
                        let y = a.qs.as_ptr().add((t0 + t) * k + 256 * ib + 128 * j);
                        let mut p = [_mm256_setzero_si256(); 4];
                        for i in 0..4 {
                            let yv = _mm256_loadu_si256(y.add(32 * i).cast());
                            p[i] = _mm256_madd_epi16(s[i], _mm256_maddubs_epi16(q[i], yv));
                        }
                        *sumi = _mm256_add_epi32(*sumi, _mm256_add_epi32(p[0], p[1]));
                        *sumi = _mm256_add_epi32(*sumi, _mm256_add_epi32(p[2], p[3]));
                    }
                }
                for t in 0..N {
                    let sub = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bsums[t], scales16));
                    let s = _mm256_sub_epi32(sumi[t], sub);
                    let d = _mm256_set1_ps(dy[t] * xd);
                    acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[t]);
                }
            }
        }
        let mut out = [[0f32; N]; R];
        for r in 0..R {
            for t in 0..N {
                out[r][t] = hsum(acc[r][t]);
            }
        }
        out
    }
}

/// `out[t·m + j] = Σ_i w[j][i]·x[t][i]` (the quantized dot) for every row `j` in `rows` and
/// token `t < a.n`, `w` the `[m, a.k]` weight of block dtype `dtype` whose activation format
/// `a` has.
///
/// # Safety
/// [`available`]; `w.len() == m · row bytes`, `rows.end <= m`; `out` valid for `a.n · m` f32,
/// the entries in `rows` touched by no one else.
pub(crate) unsafe fn sums(
    dtype: StoredDtype,
    a: &Q8Acts,
    w: &[u8],
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
) {
    match dtype {
        StoredDtype::Q8_0 => run::<SmallKern<Q8_0>>(a, w, m, rows, out),
        StoredDtype::Q4_0 => run::<SmallKern<Q4_0>>(a, w, m, rows, out),
        StoredDtype::Q4_1 => run::<SmallKern<Q4_1>>(a, w, m, rows, out),
        StoredDtype::Q5_0 => run::<SmallKern<Q5_0>>(a, w, m, rows, out),
        StoredDtype::Q5_1 => run::<SmallKern<Q5_1>>(a, w, m, rows, out),
        StoredDtype::Q4_K => run::<K45<false>>(a, w, m, rows, out),
        StoredDtype::Q5_K => run::<K45<true>>(a, w, m, rows, out),
        StoredDtype::Q6_K => run::<K6>(a, w, m, rows, out),
        _ => unreachable!("block dtypes only"),
    }
}

/// [`sums`] for one kernel, compiled with AVX2, FMA and F16C: tiles of 4 rows (then single
/// rows) by 1-3 tokens.
///
/// # Safety
/// As [`sums`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run<K: Kern>(a: &Q8Acts, w: &[u8], m: usize, rows: Range<usize>, out: *mut f32) {
    let wrow = a.k / K::PER * K::BYTES;
    assert!(rows.end <= m && w.len() == m * wrow && a.k.is_multiple_of(K::PER));
    let put = |j: usize, t0: usize, v: &[f32]| {
        for (t, &v) in v.iter().enumerate() {
            *out.add((t0 + t) * m + j) = v;
        }
    };
    let mut j = rows.start;
    while j < rows.end {
        let four = rows.end - j >= 4;
        let wp = w.as_ptr().add(j * wrow);
        let mut t0 = 0;
        while t0 < a.n {
            let nt = (a.n - t0).min(3);
            macro_rules! tile {
                ($r:literal, $n:literal) => {
                    for (r, v) in K::tile::<$r, $n>(a, t0, wp, wrow).iter().enumerate() {
                        put(j + r, t0, v);
                    }
                };
            }
            match (four, nt) {
                (true, 1) => tile!(4, 1),
                (true, 2) => tile!(4, 2),
                (true, _) => tile!(4, 3),
                (false, 1) => tile!(1, 1),
                (false, 2) => tile!(1, 2),
                (false, _) => tile!(1, 3),
            }
            t0 += nt;
        }
        j += if four { 4 } else { 1 };
    }
}
