//! AVX-512 kernels for [`super::linear`]: raw dot-product sums of activations with weight rows
//! read straight from their stored little-endian bytes, accumulated in f32.
//!
//! - [`sums_fma`]: f32 activations; F32 weights as stored ([`F32W`]), BF16 weights widened exactly
//!   (`bits << 16`, [`Bf16W`]), or F32 weights rounded to bf16 the way `half` does
//!   ([`F32AsBf16W`], for bf16 compute on an f32 checkpoint); one f32 FMA per product.
//!
//! `vdpbf16ps` (AVX512_BF16) for bf16 activations × BF16 weights: on Intel's Sapphire Rapids it
//! issues one per cycle (two f32 FMAs do as much work) and measured slower than widening + FMA;
//! on AMD Zen 4/5 it issues as often as an FMA and [`super::avx512_bf16`] uses it.
//!
//! A tile is `R` weight rows × `N` tokens over a chunk of [`KC`] elements of `k`: one load of a
//! weight vector feeds `N` multiply-adds and one load of an activation vector feeds `R`, so
//! prefill (many tokens) is compute-bound while decode (one token) streams each weight once.
//! The `k` tail is handled with masked loads (masked-off lanes read nothing and add zero). Each
//! lane accumulates its own strided partial sum, reduced at the end of the chunk, and the
//! chunks' sums are added in order: the same arithmetic whatever `R`, `N` and the loop order.

use super::coded_avx512::{each_tile_row, prefetch_start, Codes};
use super::CODED_MAX_TOKENS;
use crate::kernels::simd512::{mask16, round_bf16_x16};
use crate::weights::bf16_coded::{Bf16Coded, GROUP, GROUP_BYTES, TILE_ROWS};
use std::arch::x86_64::*;
use std::ops::Range;

/// Elements of `k` per chunk: four tokens' activations (8 KiB) stay in L1.
const KC: usize = 512;

/// f32 lanes per vector.
const LANES: usize = 16;

/// Whether this CPU runs [`sums_fma`].
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

/// How 16 stored weights become one f32 vector.
pub(super) trait Weights {
    /// Bytes per stored element.
    const SIZE: usize;
    /// Loads the first `len.min(16)` elements at `p` (the other lanes zero).
    ///
    /// # Safety
    /// AVX-512F/BW/VL present; `p` valid for `len.min(16)` elements.
    unsafe fn load(p: *const u8, len: usize) -> __m512;
}

/// F32 weights, used as stored.
pub(super) struct F32W;
/// BF16 weights, widened exactly to f32.
pub(super) struct Bf16W;
/// F32 weights rounded to bf16 (nearest-even; NaN kept quiet), as `half::bf16::from_f32`.
pub(super) struct F32AsBf16W;

impl Weights for F32W {
    const SIZE: usize = 4;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load(p: *const u8, len: usize) -> __m512 {
        _mm512_maskz_loadu_ps(mask16(len), p.cast())
    }
}

impl Weights for Bf16W {
    const SIZE: usize = 2;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load(p: *const u8, len: usize) -> __m512 {
        let h = _mm256_maskz_loadu_epi16(mask16(len), p.cast());
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

impl Weights for F32AsBf16W {
    const SIZE: usize = 4;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load(p: *const u8, len: usize) -> __m512 {
        round_bf16_x16(_mm512_castsi512_ps(_mm512_maskz_loadu_epi32(
            mask16(len),
            p.cast(),
        )))
    }
}

/// `acc[r][t] = Σ_{i<k} x[t·xrow + i]·w[r·wrow/WSIZE + i]` for `r < R`, `t < N`.
///
/// `inline(always)` without target features of its own: it is compiled into the callers
/// ([`sums_fma`]) with theirs.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `x` is valid for `N` rows of `k` elements `xrow` elements
/// apart, `w` for `R` rows of `k` elements `wrow` bytes apart.
#[inline(always)]
unsafe fn tile<W: Weights, const R: usize, const N: usize>(
    x: *const f32,
    xrow: usize,
    k: usize,
    w: *const u8,
    wrow: usize,
) -> [[f32; N]; R] {
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    // Full vectors (constant masks), then the masked tail.
    let mut i = 0;
    while i + LANES <= k {
        step::<W, R, N>(&mut acc, x.add(i), xrow, w.add(i * W::SIZE), wrow, LANES);
        i += LANES;
    }
    if i < k {
        step::<W, R, N>(&mut acc, x.add(i), xrow, w.add(i * W::SIZE), wrow, k - i);
    }
    let mut sums = [[0.0; N]; R];
    for (s, a) in sums.iter_mut().zip(&acc) {
        for (s, &a) in s.iter_mut().zip(a) {
            *s = _mm512_reduce_add_ps(a);
        }
    }
    sums
}

/// One step of [`tile`]: `len.min(LANES)` elements of each row and token.
///
/// # Safety
/// As [`tile`].
#[inline(always)]
unsafe fn step<W: Weights, const R: usize, const N: usize>(
    acc: &mut [[__m512; N]; R],
    x: *const f32,
    xrow: usize,
    w: *const u8,
    wrow: usize,
    len: usize,
) {
    let xv: [__m512; N] =
        std::array::from_fn(|t| _mm512_maskz_loadu_ps(mask16(len), x.add(t * xrow)));
    for (r, a) in acc.iter_mut().enumerate() {
        let wp = w.add(r * wrow);
        if N == 1 {
            // Decode: the next tile's rows follow these; start fetching them (short rows end
            // before the hardware prefetcher gets going). Past the end it reads nothing.
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(R * wrow).cast());
        }
        let wv = W::load(wp, len);
        for (a, &xv) in a.iter_mut().zip(&xv) {
            *a = _mm512_fmadd_ps(wv, xv, *a);
        }
    }
}

/// [`sums`] for weights stored as `W`, compiled with AVX-512.
///
/// # Safety
/// As [`sums`], with [`available`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sums_fma<W: Weights>(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[u8],
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
) {
    sums::<W>(x, n, k, w, m, rows, out)
}

/// Raw sums `out[t·m + j] = Σ_i x[t·k + i]·w[j][i]` for every row `j` in `rows` and token `t`
/// (no bias, no rounding: the caller finishes those).
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `w` holds at least `rows.end` rows (of `m`) of `k` elements
/// stored as `W` (the block path passes a buffer of the rows it decoded, with `out` offset to
/// match); `x` holds `n` rows of `k`; `out` is valid for `n·m` f32 and nobody else touches the
/// entries in `rows`.
#[inline(always)]
unsafe fn sums<W: Weights>(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[u8],
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
) {
    assert!(x.len() == n * k && w.len() >= rows.end * k * W::SIZE && rows.end <= m);
    // Rows in blocks whose chunk of weights (≤ 256 KiB) stays in L2; `k` in chunks of KC, so
    // that four tokens' chunk of activations stays in L1 while the tiles pass over the block.
    // Each output adds its chunks' sums in chunk order, whatever the loop order.
    let block = ((256 << 10) / (KC * W::SIZE)).max(4);
    for b0 in rows.clone().step_by(block) {
        let b1 = (b0 + block).min(rows.end);
        if n >= 4 {
            // Prefill: each chunk of weights is reused by every token group from the caches.
            for c0 in (0..k).step_by(KC) {
                for (t, nt) in groups(0..n) {
                    for (j, nr) in groups(b0..b1) {
                        tile_into::<W>(x, n, k, w, m, (j, nr), (t, nt), c0, out);
                    }
                }
            }
        } else {
            // Decode: stream the weights row group by row group.
            for (j, nr) in groups(b0..b1) {
                for (t, nt) in groups(0..n) {
                    for c0 in (0..k).step_by(KC) {
                        tile_into::<W>(x, n, k, w, m, (j, nr), (t, nt), c0, out);
                    }
                }
            }
        }
    }
}

/// [`sums`] for `n` ≤ [`CODED_MAX_TOKENS`] tokens on a BF16 matrix coded in 12 bits per value
/// ([`Bf16Coded`]): each group of 64 values rebuilt as the stored bf16 ([`Codes::row`]),
/// widened as [`Bf16W`] widens them, in the same steps of 16 and the same order, so the sums
/// are `sums::<Bf16W>`' to the bit, from 0.75 of the bytes. One token runs on the coding's
/// whole tiles ([`TILE_ROWS`] rows, one forward stream), two or three on 4-row tiles.
///
/// # Safety
/// [`super::coded_avx512::readable`]; `c` codes the `m × k`
/// matrix; `x` holds `n` rows of `k`; `out` is valid for `n·m` f32 and nobody else touches the
/// entries in `rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn sums_coded(
    x: &[f32],
    n: usize,
    k: usize,
    c: &Bf16Coded,
    rows: Range<usize>,
    out: *mut f32,
) {
    assert!((1..=CODED_MAX_TOKENS).contains(&n) && x.len() == n * k && c.k == k && rows.end <= c.m);
    prefetch_start(c, &rows);
    let codes = Codes::new(c);
    let m = c.m;
    // Tile by tile of the coding (a kernel tile never straddles two: their groups are stored
    // interleaved), and within each the kernel's tiles.
    for (span, _) in c.tile_spans(rows) {
        // One token: whole tiles of the coding at once (a 4-row kernel tile would read half of
        // each group band and skip the other half, which the prefetcher follows badly).
        let sizes: &'static [usize] = if n == 1 { &[TILE_ROWS, 4, 1] } else { &[4, 1] };
        for (j, nr) in super::avx512_bf16::row_groups(span, sizes) {
            let gs = c.group_step(j);
            for c0 in (0..k).step_by(KC) {
                let len = KC.min(k - c0);
                let xp = x.as_ptr().add(c0);
                let wp = c.group_ptr(j, c0 / GROUP);
                let at = (c, j, c0);
                let mut add = |r: usize, t: usize, v: f32| {
                    let o = out.add(t * m + j + r);
                    *o = if c0 == 0 { v } else { *o + v };
                };
                macro_rules! run {
                    ($r:literal, $n:literal) => {
                        each(
                            tile_coded::<$r, $n>(xp, k, len, wp, gs, &codes, at),
                            &mut add,
                        )
                    };
                }
                match (nr, n) {
                    (TILE_ROWS, 1) => run!(8, 1),
                    (4, 1) => run!(4, 1),
                    (4, 2) => run!(4, 2),
                    (4, 3) => run!(4, 3),
                    (1, 1) => run!(1, 1),
                    (1, 2) => run!(1, 2),
                    (1, 3) => run!(1, 3),
                    _ => unreachable!("tile of {nr} rows × {n} tokens"),
                }
            }
        }
    }
}

/// [`tile`] for `N` tokens (`xrow` elements apart) on `R` rows of a [`Bf16Coded`] matrix, all
/// in one tile of its coding: `w` at the first row's group for this chunk of `len` columns,
/// the rows' groups [`GROUP_BYTES`] apart and a row's groups `gs` apart; `(c, j, c0)` the
/// matrix, the first row and the chunk's first column.
///
/// # Safety
/// As [`sums_coded`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_coded<const R: usize, const N: usize>(
    x: *const f32,
    xrow: usize,
    len: usize,
    w: *const u8,
    gs: usize,
    codes: &Codes,
    (c, j, c0): (&Bf16Coded, usize, usize),
) -> [[f32; N]; R] {
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    for i in (0..len).step_by(GROUP) {
        let g = w.add(i / GROUP * gs);
        let check = c.band_escapes(j, (c0 + i) / GROUP);
        // [`tile`]'s steps of 16: the masked one where the chunk ends, none past it; each
        // token's values for them.
        let steps = (len - i).div_ceil(LANES).min(GROUP / LANES);
        let masks: [__mmask16; GROUP / LANES] =
            std::array::from_fn(|q| mask16((len - i).saturating_sub(q * LANES)));
        let mut xv = [[_mm512_setzero_ps(); N]; GROUP / LANES];
        for (q, xq) in xv.iter_mut().enumerate().take(steps) {
            for (t, v) in xq.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(masks[q], x.add(t * xrow + i + q * LANES));
            }
        }
        // Row by row: rebuilt, then summed at once, each accumulator a register (the rows
        // spelled out; macros, not closures, which would not take the target features).
        macro_rules! sum_row {
            ($r:literal, $check:literal) => {
                if $r < R {
                    let at = g.add($r * GROUP_BYTES);
                    codes.prefetch_row(at);
                    let v = codes.row::<$check>(at, (c, j + $r, c0 + i));
                    for q in 0..steps {
                        let half = v[q / 2];
                        let h = if q % 2 == 0 {
                            _mm512_castsi512_si256(half)
                        } else {
                            _mm512_extracti64x4_epi64::<1>(half)
                        };
                        // As `Bf16W::load`: masked lanes zero, widened exactly.
                        let h = _mm256_maskz_mov_epi16(masks[q], h);
                        let wf =
                            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
                        for (a, &xv) in acc[$r].iter_mut().zip(&xv[q]) {
                            *a = _mm512_fmadd_ps(wf, xv, *a);
                        }
                    }
                }
            };
        }
        const { assert!(R <= 8 && TILE_ROWS == 8) };
        // The band's escapes looked for only where it has some: one branch for its rows.
        each_tile_row!(sum_row, check);
    }
    let mut sums = [[0.0; N]; R];
    for (s, a) in sums.iter_mut().zip(&acc) {
        for (s, &a) in s.iter_mut().zip(a) {
            *s = _mm512_reduce_add_ps(a);
        }
    }
    sums
}

/// Groups of four (then single ones) covering `r`: `(start, len)`.
pub(super) fn groups(r: Range<usize>) -> impl Iterator<Item = (usize, usize)> {
    let four = r.start + (r.end - r.start) / 4 * 4;
    (r.start..four)
        .step_by(4)
        .map(|j| (j, 4))
        .chain((four..r.end).map(|j| (j, 1)))
}

/// Adds the sums over chunk `c0..c0 + KC` of `k` for rows `j..j + nr` and tokens `t..t + nt`
/// (`nr`, `nt` in {1, 4}) into `out` (stores them for the first chunk).
///
/// # Safety
/// As [`sums`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_into<W: Weights>(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[u8],
    m: usize,
    (j, nr): (usize, usize),
    (t, nt): (usize, usize),
    c0: usize,
    out: *mut f32,
) {
    debug_assert!(t + nt <= n);
    let len = KC.min(k - c0);
    let wrow = k * W::SIZE;
    let xp = x.as_ptr().add(t * k + c0);
    let wp = w.as_ptr().add(j * wrow + c0 * W::SIZE);
    let mut add = |r: usize, tt: usize, v: f32| {
        let o = out.add((t + tt) * m + j + r);
        *o = if c0 == 0 { v } else { *o + v };
    };
    match (nr, nt) {
        (4, 4) => each(tile::<W, 4, 4>(xp, k, len, wp, wrow), &mut add),
        (4, _) => each(tile::<W, 4, 1>(xp, k, len, wp, wrow), &mut add),
        (_, 4) => each(tile::<W, 1, 4>(xp, k, len, wp, wrow), &mut add),
        _ => each(tile::<W, 1, 1>(xp, k, len, wp, wrow), &mut add),
    }
}

/// Calls `f(row, token, value)` for every entry of a tile.
#[inline(always)]
pub(super) fn each<const R: usize, const N: usize>(
    acc: [[f32; N]; R],
    f: &mut impl FnMut(usize, usize, f32),
) {
    for (r, a) in acc.iter().enumerate() {
        for (t, &v) in a.iter().enumerate() {
            f(r, t, v);
        }
    }
}
