//! AVX2 + FMA kernels for [`super::linear`], for x86-64 CPUs without AVX-512: the same sums as
//! [`super::avx512`] (activations in f32, weight rows read straight from their stored bytes,
//! one f32 FMA per product) on 8-lane vectors.
//!
//! - [`sums_fma`]: f32 activations; F32 weights as stored ([`F32W`]), BF16 weights widened exactly
//!   (`bits << 16`, [`Bf16W`]), or F32 weights rounded to bf16 the way `half` does
//!   ([`F32AsBf16W`], for bf16 compute on an f32 checkpoint).
//!
//! A tile is `R` weight rows × `N` tokens over a chunk of [`KC`] elements of `k`. With 16 vector
//! registers, prefill uses 2 rows × 4 tokens (8 accumulators, two weight vectors, one activation)
//! and decode 4 rows × 1 token. The `k` tail is read with `_mm256_maskload_ps` for f32 bytes and
//! through a small zero-padded copy for bf16 ones (masked-off lanes add zero). Each lane
//! accumulates its own strided partial sum, reduced in a fixed order at the end of the chunk, and
//! the chunks' sums are added in order: the same arithmetic whatever `R`, `N` and the loop order.

use std::arch::x86_64::*;
use std::ops::Range;

/// Elements of `k` per chunk: four tokens' activations (8 KiB) stay in L1.
pub(super) const KC: usize = 512;

/// f32 lanes per vector.
const LANES: usize = 8;

/// Weight rows per prefill tile.
const PR: usize = 2;
/// Tokens per prefill tile (and the fewest tokens for the prefill loop order).
pub(super) const PN: usize = 4;
/// Weight rows per decode tile.
const DR: usize = 4;

/// Whether this CPU runs [`sums_fma`].
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// How 8 stored weights become one f32 vector.
pub(super) trait Weights {
    /// Bytes per stored element.
    const SIZE: usize;
    /// Loads the first `len.min(8)` elements at `p` (the other lanes zero).
    ///
    /// # Safety
    /// AVX2 and FMA present; `p` valid for `len.min(8)` elements.
    unsafe fn load(p: *const u8, len: usize) -> __m256;
}

/// F32 weights, used as stored.
pub(super) struct F32W;
/// BF16 weights, widened exactly to f32.
pub(super) struct Bf16W;
/// F32 weights rounded to bf16 (nearest-even; NaN kept quiet), as `half::bf16::from_f32`.
pub(super) struct F32AsBf16W;

/// Lanes `< len` all ones, the others zero (the mask `_mm256_maskload_ps` reads).
#[inline(always)]
unsafe fn mask8(len: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(len.min(LANES) as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// The first `len.min(8)` f32 (or their bits) at `p`, a full load when `len >= 8`.
#[inline(always)]
unsafe fn load_f32(p: *const f32, len: usize) -> __m256 {
    if len >= LANES {
        _mm256_loadu_ps(p)
    } else {
        _mm256_maskload_ps(p, mask8(len))
    }
}

impl Weights for F32W {
    const SIZE: usize = 4;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const u8, len: usize) -> __m256 {
        load_f32(p.cast(), len)
    }
}

impl Weights for Bf16W {
    const SIZE: usize = 2;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const u8, len: usize) -> __m256 {
        let h = if len >= LANES {
            _mm_loadu_si128(p.cast())
        } else {
            // The tail: a zero-padded copy (no masked 16-bit loads before AVX-512).
            let mut pad = [0u16; LANES];
            std::ptr::copy_nonoverlapping(p, pad.as_mut_ptr().cast::<u8>(), len * 2);
            _mm_loadu_si128(pad.as_ptr().cast())
        };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

impl Weights for F32AsBf16W {
    const SIZE: usize = 4;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const u8, len: usize) -> __m256 {
        to_bf16(load_f32(p.cast(), len))
    }
}

/// `v` rounded to bf16 (nearest-even; NaN kept quiet) and widened back, as
/// `half::bf16::from_f32(v).to_f32()` per lane.
///
/// # Safety
/// AVX2 present.
#[inline(always)]
pub(super) unsafe fn to_bf16(v: __m256) -> __m256 {
    let b = _mm256_castps_si256(v);
    // Nearest-even at bit 16: add 0x7FFF plus the lowest kept bit, drop the low half.
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
    let r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    let abs = _mm256_and_si256(b, _mm256_set1_epi32(0x7FFF_FFFF));
    // Both sides non-negative as i32, so the signed compare is the unsigned one.
    let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
    let quiet = _mm256_or_si256(b, _mm256_set1_epi32(0x0040_0000));
    let r = _mm256_blendv_epi8(r, quiet, nan);
    _mm256_castsi256_ps(_mm256_and_si256(
        r,
        _mm256_set1_epi32(0xFFFF_0000u32 as i32),
    ))
}

/// The sum of a vector's 8 lanes in a fixed order: `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`.
#[inline(always)]
pub(super) unsafe fn reduce(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// `acc[r][t] = Σ_{i<k} x[t·xrow + i]·w[r·wrow/WSIZE + i]` for `r < R`, `t < N`.
///
/// `inline(always)` without target features of its own: it is compiled into the callers
/// ([`sums_fma`]) with theirs.
///
/// # Safety
/// The CPU has AVX2 and FMA; `x` is valid for `N` rows of `k` elements `xrow` elements apart,
/// `w` for `R` rows of `k` elements `wrow` bytes apart.
#[inline(always)]
unsafe fn tile<W: Weights, const R: usize, const N: usize>(
    x: *const f32,
    xrow: usize,
    k: usize,
    w: *const u8,
    wrow: usize,
) -> [[f32; N]; R] {
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    // Full vectors, then the masked tail.
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
            *s = reduce(a);
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
    acc: &mut [[__m256; N]; R],
    x: *const f32,
    xrow: usize,
    w: *const u8,
    wrow: usize,
    len: usize,
) {
    let wv: [__m256; R] = std::array::from_fn(|r| {
        let wp = w.add(r * wrow);
        if N == 1 {
            // Decode: the next tile's rows follow these; start fetching them (short rows end
            // before the hardware prefetcher gets going). Past the end it reads nothing.
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(R * wrow).cast());
        }
        W::load(wp, len)
    });
    for t in 0..N {
        let xv = load_f32(x.add(t * xrow), len);
        for (a, &wv) in acc.iter_mut().zip(&wv) {
            a[t] = _mm256_fmadd_ps(wv, xv, a[t]);
        }
    }
}

/// [`sums`] for weights stored as `W`, compiled with AVX2 and FMA.
///
/// # Safety
/// As [`sums`], with [`available`].
#[target_feature(enable = "avx2,fma")]
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
/// The CPU has AVX2 and FMA; `w` holds at least `rows.end` rows (of `m`) of `k` elements
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
    let block = ((256 << 10) / (KC * W::SIZE)).max(DR);
    for b0 in rows.clone().step_by(block) {
        let b1 = (b0 + block).min(rows.end);
        if n >= PN {
            // Prefill: each chunk of weights is reused by every token group from the caches.
            for c0 in (0..k).step_by(KC) {
                for (t, nt) in groups(0..n, PN) {
                    for (j, nr) in groups(b0..b1, PR) {
                        tile_into::<W>(x, n, k, w, m, (j, nr), (t, nt), c0, out);
                    }
                }
            }
        } else {
            // Decode: stream the weights row group by row group.
            for (j, nr) in groups(b0..b1, DR) {
                for t in 0..n {
                    for c0 in (0..k).step_by(KC) {
                        tile_into::<W>(x, n, k, w, m, (j, nr), (t, 1), c0, out);
                    }
                }
            }
        }
    }
}

/// Groups of `size` (then single ones) covering `r`: `(start, len)`.
pub(super) fn groups(r: Range<usize>, size: usize) -> impl Iterator<Item = (usize, usize)> {
    let full = r.start + (r.end - r.start) / size * size;
    (r.start..full)
        .step_by(size)
        .map(move |j| (j, size))
        .chain((full..r.end).map(|j| (j, 1)))
}

/// Adds the sums over chunk `c0..c0 + KC` of `k` for rows `j..j + nr` and tokens `t..t + nt`
/// (`(nr, nt)` a prefill or decode tile, or a row or token tail of one) into `out` (stores
/// them for the first chunk).
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
        (PR, PN) => each(tile::<W, PR, PN>(xp, k, len, wp, wrow), &mut add),
        (PR, _) => each(tile::<W, PR, 1>(xp, k, len, wp, wrow), &mut add),
        (DR, _) => each(tile::<W, DR, 1>(xp, k, len, wp, wrow), &mut add),
        (_, PN) => each(tile::<W, 1, PN>(xp, k, len, wp, wrow), &mut add),
        _ => each(tile::<W, 1, 1>(xp, k, len, wp, wrow), &mut add),
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
