//! AVX-512 kernels for [`super::linear`]: raw dot-product sums of activations with weight rows
//! read straight from their stored little-endian bytes, accumulated in f32.
//!
//! - [`Fma`]: f32 activations; F32 weights as stored ([`F32W`]), BF16 weights widened exactly
//!   (`bits << 16`, [`Bf16W`]), or F32 weights rounded to bf16 the way `half` does
//!   ([`F32AsBf16W`], for bf16 compute on an f32 checkpoint); one f32 FMA per product.
//! - [`Dp`] (AVX512_BF16): bf16 activations × BF16 weights with `vdpbf16ps`, two products per
//!   lane per instruction. A bf16×bf16 product is exact in f32, so this is f32 accumulation of
//!   the exact products like [`Fma`], in another order, except that `vdpbf16ps` treats
//!   subnormal inputs and results as zero (values below 1.2e-38, which real weights and
//!   activations do not reach).
//!
//! A tile is `R` weight rows × `N` tokens over the full `k`: one load of a weight vector feeds
//! `N` multiply-adds and one load of an activation vector feeds `R`, so prefill (many tokens) is
//! compute-bound while decode (one token) streams each weight once. The `k` tail is handled with
//! masked loads (masked-off lanes read nothing and add zero). Each lane accumulates its own
//! strided partial sum, reduced at the end, in the same order whatever `R` and `N` are.

use std::arch::x86_64::*;
use std::ops::Range;

/// Whether this CPU runs [`Fma`].
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

/// Whether this CPU runs [`Dp`] too.
pub(super) fn available_bf16() -> bool {
    available() && is_x86_feature_detected!("avx512bf16")
}

/// One step of a dot-product tile: a vector of activations and one of weights, multiplied and
/// added into f32 lanes.
pub(super) trait Step {
    /// The activation element read.
    type X;
    /// What a load gives.
    type V: Copy;
    /// Elements per vector.
    const LANES: usize;
    /// Bytes per stored weight element.
    const WSIZE: usize;
    /// Loads the first `len.min(LANES)` activations at `p` (other lanes zero).
    ///
    /// # Safety
    /// The CPU has this step's features; `p` is valid for `len.min(LANES)` elements.
    unsafe fn x(p: *const Self::X, len: usize) -> Self::V;
    /// Loads the first `len.min(LANES)` weights at `p` (other lanes zero).
    ///
    /// # Safety
    /// As [`Step::x`].
    unsafe fn w(p: *const u8, len: usize) -> Self::V;
    /// `acc + w·x`, lane by lane.
    ///
    /// # Safety
    /// The CPU has this step's features.
    unsafe fn madd(acc: __m512, w: Self::V, x: Self::V) -> __m512;
}

/// How 16 stored weights become one f32 vector, for [`Fma`].
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

#[inline]
fn mask16(len: usize) -> __mmask16 {
    if len >= 16 {
        !0
    } else {
        ((1u32 << len) - 1) as __mmask16
    }
}

#[inline]
fn mask32(len: usize) -> __mmask32 {
    if len >= 32 {
        !0
    } else {
        ((1u64 << len) - 1) as __mmask32
    }
}

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
        let b = _mm512_maskz_loadu_epi32(mask16(len), p.cast());
        let one = _mm512_set1_epi32(1);
        // Nearest-even at bit 16: add 0x7FFF plus the lowest kept bit, drop the low half.
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), one);
        let r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
        let abs = _mm512_and_si512(b, _mm512_set1_epi32(0x7FFF_FFFF));
        let nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
        let r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(b, _mm512_set1_epi32(0x0040_0000)));
        _mm512_castsi512_ps(_mm512_and_si512(
            r,
            _mm512_set1_epi32(0xFFFF_0000u32 as i32),
        ))
    }
}

/// f32 activations, weights through `W`, one FMA per product.
pub(super) struct Fma<W>(std::marker::PhantomData<W>);

impl<W: Weights> Step for Fma<W> {
    type X = f32;
    type V = __m512;
    const LANES: usize = 16;
    const WSIZE: usize = W::SIZE;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn x(p: *const f32, len: usize) -> __m512 {
        _mm512_maskz_loadu_ps(mask16(len), p)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn w(p: *const u8, len: usize) -> __m512 {
        W::load(p, len)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn madd(acc: __m512, w: __m512, x: __m512) -> __m512 {
        _mm512_fmadd_ps(w, x, acc)
    }
}

/// bf16 activations (their bit patterns) × BF16 weights, `vdpbf16ps`: two products per lane.
pub(super) struct Dp;

impl Step for Dp {
    type X = u16;
    type V = __m512i;
    const LANES: usize = 32;
    const WSIZE: usize = 2;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn x(p: *const u16, len: usize) -> __m512i {
        _mm512_maskz_loadu_epi16(mask32(len), p.cast())
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn w(p: *const u8, len: usize) -> __m512i {
        _mm512_maskz_loadu_epi16(mask32(len), p.cast())
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn madd(acc: __m512, w: __m512i, x: __m512i) -> __m512 {
        // SAFETY: __m512i and __m512bh are both 64 bytes of lanes.
        let (w, x) = (
            std::mem::transmute::<__m512i, __m512bh>(w),
            std::mem::transmute::<__m512i, __m512bh>(x),
        );
        _mm512_dpbf16_ps(acc, w, x)
    }
}

/// `acc[r][t] = Σ_i x[t·k + i]·w[r·wrow/WSIZE + i]` for `r < R`, `t < N`.
///
/// `inline(always)` without target features of its own: it is compiled into the callers
/// ([`sums_fma`], [`sums_dp`]) with theirs.
///
/// # Safety
/// The CPU has `S`'s features; `x` is valid for `N·k` elements, `w` for `R` rows of `k`
/// elements `wrow` bytes apart.
#[inline(always)]
unsafe fn tile<S: Step, const R: usize, const N: usize>(
    x: *const S::X,
    k: usize,
    w: *const u8,
    wrow: usize,
) -> [[f32; N]; R] {
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    let mut i = 0;
    while i < k {
        let len = k - i;
        let xv: [S::V; N] = std::array::from_fn(|t| S::x(x.add(t * k + i), len));
        for (r, a) in acc.iter_mut().enumerate() {
            let wv = S::w(w.add(r * wrow + i * S::WSIZE), len);
            for (a, &xv) in a.iter_mut().zip(&xv) {
                *a = S::madd(*a, wv, xv);
            }
        }
        i += S::LANES;
    }
    let mut sums = [[0.0; N]; R];
    for (s, a) in sums.iter_mut().zip(&acc) {
        for (s, &a) in s.iter_mut().zip(a) {
            *s = _mm512_reduce_add_ps(a);
        }
    }
    sums
}

/// [`sums`] with [`Fma`] steps.
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
    sums::<Fma<W>>(x, n, k, w, m, rows, out)
}

/// [`sums`] with [`Dp`] steps.
///
/// # Safety
/// As [`sums`], with [`available_bf16`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn sums_dp(
    x: &[u16],
    n: usize,
    k: usize,
    w: &[u8],
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
) {
    sums::<Dp>(x, n, k, w, m, rows, out)
}

/// Raw sums `out[t·m + j] = Σ_i x[t·k + i]·w[j][i]` for every row `j` in `rows` and token `t`
/// (no bias, no rounding: the caller finishes those).
///
/// # Safety
/// The CPU has `S`'s features; `w` holds `m` rows of `k` elements in `S`'s format, `x` holds
/// `n` rows of `k`; `out` is valid for `n·m` f32 and nobody else touches the entries in `rows`.
#[inline(always)]
unsafe fn sums<S: Step>(
    x: &[S::X],
    n: usize,
    k: usize,
    w: &[u8],
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
) {
    assert!(x.len() == n * k && w.len() == m * k * S::WSIZE && rows.end <= m);
    let wrow = k * S::WSIZE;
    // Four rows at a time (one row for the last few), four tokens at a time (then one).
    let mut j = rows.start;
    while j < rows.end {
        let r = if rows.end - j >= 4 { 4 } else { 1 };
        let wp = w.as_ptr().add(j * wrow);
        let mut t = 0;
        while t < n {
            let xp = x.as_ptr().add(t * k);
            let nt = if n - t >= 4 { 4 } else { 1 };
            let mut store = |rr: usize, tt: usize, v: f32| *out.add((t + tt) * m + j + rr) = v;
            match (r, nt) {
                (4, 4) => each(tile::<S, 4, 4>(xp, k, wp, wrow), &mut store),
                (4, _) => each(tile::<S, 4, 1>(xp, k, wp, wrow), &mut store),
                (_, 4) => each(tile::<S, 1, 4>(xp, k, wp, wrow), &mut store),
                _ => each(tile::<S, 1, 1>(xp, k, wp, wrow), &mut store),
            }
            t += nt;
        }
        j += r;
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
