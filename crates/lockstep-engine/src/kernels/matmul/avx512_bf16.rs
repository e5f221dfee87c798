//! AVX512_BF16 kernel for [`super::linear`]: the faithful bf16 tier (bf16 activations × BF16
//! weights) with `vdpbf16ps`, which multiplies 32 pairs of bf16 and adds each lane's two
//! products into an f32 accumulator. Each product of two bf16 is exact in f32, so this is
//! PyTorch's bf16 matmul (bf16 × bf16 products summed in f32) up to the order of the sums, as
//! the AMX tiles are; it treats subnormal inputs as zero and flushes subnormal results (bf16
//! subnormals are below 1.2e-38, irrelevant to a model's activations and weights). Never used
//! for f32 or f64 compute: it would need their activations rounded to bf16.
//!
//! Used where it is the faster way. On AMD Zen 4/5 ([`preferred`]) for every bf16 product:
//! `vdpbf16ps` issues as often as an f32 FMA, so it does twice the work per instruction and
//! needs no widening of the weights (measured here, AMD EPYC with 2 cores: 0.127 ns per
//! `vdpbf16ps` against 0.115 ns per FMA, both on 512-bit vectors, 12 independent
//! accumulators). On Intel's Sapphire Rapids and later it issues once per cycle against two
//! FMAs, and the AMX tiles serve prefill; there it serves a decode pass's products
//! ([`super::Kernel::Amx`]), whose one-token steps read the 12-bit coding: rebuilt groups go
//! straight into `vdpbf16ps`, where the FMA kernel ([`super::avx512`]) must widen them first
//! (figures in [`super::coded_avx512::preferred`]).
//!
//! The activations are packed once per call as bf16 ([`Packed`], each token's row zero-padded
//! to a multiple of 32); the weights are read in place. A tile is `R` weight rows × `N` tokens
//! over a chunk of [`KC`] elements of `k`: per 32 elements one load of each weight row feeds
//! `N` products and one load of each token's activations feeds `R`. Each lane accumulates its
//! own strided partial sum over the chunk; the 16 lanes are then added in one fixed tree
//! ([`reduce4`]) and the chunks' sums in chunk order, so every output gets the same bits
//! whatever `R`, `N` and the loop order: a prefill and a one-token decode of the same token
//! agree exactly, as the bf16 tier's KV-cache check requires.
//!
//! A token's sums for four consecutive rows are stored as one vector ([`Out::rows4`]), and in
//! prefill the next token group's output lines are prefetched for writing while this group's
//! tiles run: a wide product's outputs (`[n][m]` f32, 20 MB for the 0.5B shape's gate/up at
//! 512 tokens) are far from cache, and each tile stored into six of them. Measured on the
//! 0.5B shape's four products at 512 tokens, 2 threads, 6 alternating rounds: 1.06× (median;
//! 0.98-1.19) over scalar stores without the prefetch.

use super::avx512::groups;
use super::coded_avx512::{each_tile_row, prefetch_start, Codes};
use crate::weights::bf16_coded::{Bf16Coded, GROUP, GROUP_BYTES, TILE_ROWS};
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

/// Elements of `k` per chunk: six tokens' activations (12 KiB) stay in L1.
const KC: usize = 1024;

/// bf16 elements per vector (16 lanes of pairs).
const PAIRS: usize = 32;

/// Tokens per prefill tile: 4 × 6 accumulators, 4 weight vectors and one activation vector
/// fit the 32 vector registers.
const NT: usize = 6;

/// Whether this CPU runs `vdpbf16ps` (AVX512_BF16, with AVX-512F/BW/VL): where this kernel
/// can run and its tests run; [`preferred`] and [`super::Kernel::Amx`] say where products use
/// it.
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| super::avx512::available() && is_x86_feature_detected!("avx512bf16"))
}

/// Whether this is the faster kernel for every bf16 product here, a prefill's too (AMD: see the
/// module docs): [`super::Kernel::detect`] picks it there.
pub(super) fn preferred() -> bool {
    available() && is_amd()
}

/// CPUID leaf 0's vendor string is "AuthenticAMD" (asked once: in a virtual machine each
/// `cpuid` exits to the host).
pub(super) fn is_amd() -> bool {
    static AMD: OnceLock<bool> = OnceLock::new();
    *AMD.get_or_init(|| {
        let r = __cpuid(0);
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &v == b"AuthenticAMD"
    })
}

/// The activations as bf16: token `t`'s `k` values at `t·stride`, zero-padded to `stride`
/// (`k` rounded up to a multiple of 32).
pub(super) struct Packed {
    data: Vec<u16>,
    stride: usize,
}

impl Packed {
    /// Packs `n` tokens of `k > 0` activations (bf16 values held in f32: the high half is
    /// exact).
    pub(super) fn new(x: &[f32], n: usize, k: usize) -> Packed {
        assert!(k > 0 && x.len() == n * k);
        let stride = k.next_multiple_of(PAIRS);
        let mut data = vec![0u16; n * stride];
        let pack = |(d, xt): (&mut [u16], &[f32])| {
            for (d, &v) in d.iter_mut().zip(xt) {
                debug_assert_eq!(v.to_bits() & 0xFFFF, 0, "activation not a bf16 value");
                *d = (v.to_bits() >> 16) as u16;
            }
        };
        // A long prompt's tokens are packed on every thread.
        if n >= 64 {
            use rayon::prelude::*;
            data.par_chunks_exact_mut(stride)
                .zip(x.par_chunks_exact(k))
                .with_min_len(16)
                .for_each(pack);
        } else {
            data.chunks_exact_mut(stride)
                .zip(x.chunks_exact(k))
                .for_each(pack);
        }
        Packed { data, stride }
    }
}

/// Raw sums `out[t·m + j] = Σ_i x[t][i]·w[j][i]` for every row `j` in `rows` and token `t` of
/// `p` (no bias, no rounding: the caller finishes those).
///
/// # Safety
/// [`available`]; `w` holds `m` BF16 rows of `k`; `p` packs `n` tokens of `k`; `out` is valid
/// for `n·m` f32 and nobody else touches the entries in `rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn sums(
    p: &Packed,
    n: usize,
    k: usize,
    w: &[u8],
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
) {
    assert!(
        w.len() == m * k * 2
            && rows.end <= m
            && p.data.len() == n * p.stride
            && p.stride == k.next_multiple_of(PAIRS)
    );
    // Rows in blocks whose chunk of weights (256 KiB) stays in L2 while every token group
    // passes over it (prefill); one-token decode streams the weights row group by row group.
    let block = (256 << 10) / (KC * 2);
    for b0 in rows.clone().step_by(block) {
        let b1 = (b0 + block).min(rows.end);
        if n >= 4 {
            for c0 in (0..k).step_by(KC) {
                for (t, nt) in token_groups(n) {
                    // The next group's outputs, so their first store finds them in cache.
                    prefetch_out(out, m, b0..b1, (t + NT)..(t + 2 * NT).min(n));
                    for (j, nr) in groups(b0..b1) {
                        tile_into(p, k, w, m, (j, nr), (t, nt), c0, out);
                    }
                }
            }
        } else if n == 1 {
            for j in b0..b1 {
                decode_row(p, k, w, j, out);
            }
        } else {
            for (j, nr) in groups(b0..b1) {
                for (t, nt) in token_groups(n) {
                    for c0 in (0..k).step_by(KC) {
                        tile_into(p, k, w, m, (j, nr), (t, nt), c0, out);
                    }
                }
            }
        }
    }
}

/// Asks for the cache lines of outputs `rows` of `tokens` to be brought in for writing.
///
/// # Safety
/// `out` is `[n][m]` with `rows` inside `0..m` (not empty) and `tokens` inside `0..n`.
#[inline(always)]
unsafe fn prefetch_out(out: *mut f32, m: usize, rows: Range<usize>, tokens: Range<usize>) {
    for t in tokens {
        let row = out.add(t * m);
        for r in (rows.start..rows.end).step_by(16) {
            _mm_prefetch::<_MM_HINT_ET0>(row.add(r).cast());
        }
        _mm_prefetch::<_MM_HINT_ET0>(row.add(rows.end - 1).cast());
    }
}

/// Groups of rows of the first of `sizes` (descending, ending in 1) that fits what is left,
/// in order: `(start, len)`.
pub(super) fn row_groups(
    r: Range<usize>,
    sizes: &'static [usize],
) -> impl Iterator<Item = (usize, usize)> {
    let mut j = r.start;
    std::iter::from_fn(move || {
        let left = r.end - j;
        let nr = sizes.iter().copied().find(|&g| g <= left)?;
        j += nr;
        Some((j - nr, nr))
    })
}

/// The sums of one token (packed alone in `p`) with row `j`, chunk by chunk, into `out`. One
/// row at a time, so that a thread reads its rows' bytes as one forward stream, which the
/// hardware prefetcher follows: on a 2-core AMD EPYC (2026-12-03, `lockstep bench --dtype bf16`
/// on the 0.5B shape with the 12-bit coding off, alternating builds) tiles of 12 rows read as
/// 12 streams decoded at 19.3-20.9 tok/s, of 4 rows at 19.7-21.4, one row at 27.8-35.0. (On
/// 2026-12-01, with twice the memory bandwidth, 12 rows had measured 40.3-41.0 against 4 rows'
/// 36.5-38.1; one row was not tried then.)
///
/// # Safety
/// As [`sums`], with `n = 1`.
#[inline(always)]
unsafe fn decode_row(p: &Packed, k: usize, w: &[u8], j: usize, out: *mut f32) {
    for c0 in (0..k).step_by(KC) {
        let len = KC.min(k - c0);
        let (xp, wp) = (p.data.as_ptr().add(c0), w.as_ptr().add((j * k + c0) * 2));
        let out = Out {
            ptr: out.add(j),
            token_stride: 0,
            first: c0 == 0,
        };
        out.one_row(tile::<1, 1>(xp, 0, len, wp, k * 2));
    }
}

pub(super) use super::CODED_MAX_TOKENS;

/// [`sums`] for `n` ≤ [`CODED_MAX_TOKENS`] tokens on the same matrix coded in 12 bits per value
/// ([`Bf16Coded`]): each group of 64 values is rebuilt as the exact bf16 vectors the stored
/// bytes hold before it is summed, so the sums are [`sums`]' to the bit, from 0.75 of the bytes.
/// One token runs on tiles of the coding's [`TILE_ROWS`] rows (each one forward stream of
/// bytes), two or three on 4-row tiles (12 accumulators at most, as [`sums`]' tiles).
///
/// # Safety
/// [`available`] and [`super::coded_avx512::readable`]; `c` codes the `m × k` matrix; `p`
/// packs `n` tokens of `k`; `out` is valid for `n·m` f32 and nobody else touches the entries
/// in `rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn sums_coded(
    p: &Packed,
    n: usize,
    k: usize,
    c: &Bf16Coded,
    rows: Range<usize>,
    out: *mut f32,
) {
    assert!(
        (1..=CODED_MAX_TOKENS).contains(&n)
            && c.k == k
            && rows.end <= c.m
            && p.data.len() == n * p.stride
            && p.stride == k.next_multiple_of(PAIRS)
    );
    prefetch_start(c, &rows);
    let codes = Codes::new(c);
    let (m, xs) = (c.m, p.stride);
    let sizes: &'static [usize] = if n == 1 { &[TILE_ROWS, 4, 1] } else { &[4, 1] };
    // Tile by tile of the coding (a kernel tile never straddles two: their groups are stored
    // interleaved), and within each the kernel's tiles.
    for (span, _) in c.tile_spans(rows) {
        for (j, nr) in row_groups(span, sizes) {
            let gs = c.group_step(j);
            for c0 in (0..k).step_by(KC) {
                let len = KC.min(k - c0);
                let xp = p.data.as_ptr().add(c0);
                let wp = c.group_ptr(j, c0 / GROUP);
                let at = (c, j, c0);
                let out = Out {
                    ptr: out.add(j),
                    token_stride: m,
                    first: c0 == 0,
                };
                macro_rules! run {
                    ($r:literal, $n:literal, $finish:ident) => {
                        out.$finish(tile_coded::<$r, $n>(xp, xs, len, wp, gs, &codes, at))
                    };
                }
                match (nr, n) {
                    (TILE_ROWS, 1) => run!(8, 1, rows4),
                    (4, 1) => run!(4, 1, rows4),
                    (1, 1) => run!(1, 1, one_row),
                    (4, 2) => run!(4, 2, rows4),
                    (1, 2) => run!(1, 2, one_row),
                    (4, 3) => run!(4, 3, rows4),
                    (1, 3) => run!(1, 3, one_row),
                    _ => unreachable!("tile of {nr} rows × {n} tokens"),
                }
            }
        }
    }
}

/// [`tile`] for `N` tokens (`xs` elements apart) on `R` rows of a [`Bf16Coded`] matrix, all in
/// one tile of its coding: `w` at the first row's group for this chunk, the rows' groups
/// [`GROUP_BYTES`] apart and a row's groups `gs` apart; `(c, j, c0)` the matrix, the first row
/// and the chunk's first column (for the side list). The same steps of 32 values as [`tile`],
/// two per group (the second skipped where the row has ended, as [`tile`] has no step there).
///
/// # Safety
/// As [`sums_coded`]; `x` valid for `N` rows of `len` rounded up to 32 elements.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_coded<const R: usize, const N: usize>(
    x: *const u16,
    xs: usize,
    len: usize,
    w: *const u8,
    gs: usize,
    codes: &Codes,
    (c, j, c0): (&Bf16Coded, usize, usize),
) -> [[__m512; N]; R] {
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    // One group: each token's two steps of 32 values, then row by row the group rebuilt and
    // summed at once, so only one row's values are live beside the accumulators (all rows
    // rebuilt first spilled them to the stack at 12 rows). The rows are spelled out so that each
    // accumulator stays a register. `$masked`: the row ends inside this group, so the values
    // past it are masked off as [`tile`] masks them, and a step wholly past it is skipped.
    // (Macros, not closures: a closure does not take this function's target features, and
    // its intrinsics become calls.)
    macro_rules! group {
        ($i:expr, $masked:expr) => {{
            let i = $i;
            let g = w.add(i / GROUP * gs);
            let check = c.band_escapes(j, (c0 + i) / GROUP);
            let steps = if !$masked || len - i > PAIRS { 2 } else { 1 };
            let mask = |half: usize| {
                let left = (len - i).saturating_sub(half * PAIRS);
                if !$masked || left >= PAIRS {
                    !0u32
                } else {
                    (1u32 << left) - 1
                }
            };
            let masks = [mask(0), mask(1)];
            // (Unaligned loads are plain reads, which a closure compiles as well as the kernel.)
            let xv: [[__m512bh; N]; 2] = std::array::from_fn(|half| {
                std::array::from_fn(|t| {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        x.add(t * xs + i + (half * PAIRS).min(len - 1 - i) / PAIRS * PAIRS)
                            .cast(),
                    ))
                })
            });
            macro_rules! sum_row {
                ($r:literal, $check:literal) => {
                    if $r < R {
                        let at = g.add($r * GROUP_BYTES);
                        codes.prefetch_row(at);
                        let v = codes.row::<$check>(at, (c, j + $r, c0 + i));
                        for half in 0..steps {
                            let v = if !$masked {
                                v[half]
                            } else {
                                _mm512_maskz_mov_epi16(masks[half], v[half])
                            };
                            let v = std::mem::transmute::<__m512i, __m512bh>(v);
                            for (a, &xv) in acc[$r].iter_mut().zip(&xv[half]) {
                                *a = _mm512_dpbf16_ps(*a, v, xv);
                            }
                        }
                    }
                };
            }
            const { assert!(R <= 8 && TILE_ROWS == 8) };
            // The band's escapes looked for only where it has some: one branch for its rows.
            each_tile_row!(sum_row, check);
        }};
    }
    let full = len / GROUP * GROUP;
    for i in (0..full).step_by(GROUP) {
        group!(i, false);
    }
    if full < len {
        group!(full, true);
    }
    acc
}

/// [`sums`] for any number of tokens on a matrix coded in 12 bits per value ([`Bf16Coded`])
/// whose stored bytes products no longer read: where the coding replaced them in memory
/// ([`crate::weights::Tensor::coding_replaces_stored`]), a prefill reads the coding too. The
/// loops are [`sums`]' prefill loops, block by block of rows and chunk by chunk of `k`; before
/// the tiles pass over a block's chunk, its rows are rebuilt from the coding into exact bf16 in
/// a buffer of [`KC`]-value rows (256 KiB, which stays in L2 while every token group passes
/// over it), and the tiles read the buffer instead of the stored rows. The same tiles in the
/// same order on the same values: [`sums`]' bits.
///
/// # Safety
/// [`available`] and [`super::coded_avx512::readable`]; `c` codes the `m × k` matrix; `p`
/// packs `n` tokens of `k`; `out` is valid for `n·m` f32 and nobody else touches the entries
/// in `rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn sums_rebuilt(
    p: &Packed,
    n: usize,
    k: usize,
    c: &Bf16Coded,
    rows: Range<usize>,
    out: *mut f32,
) {
    assert!(
        c.k == k
            && rows.end <= c.m
            && p.data.len() == n * p.stride
            && p.stride == k.next_multiple_of(PAIRS)
    );
    let (m, block) = (c.m, (256 << 10) / (KC * 2));
    let codes = Codes::new(c);
    let mut buf = vec![0u16; block.min(rows.len()) * KC];
    for b0 in rows.clone().step_by(block) {
        let b1 = (b0 + block).min(rows.end);
        for c0 in (0..k).step_by(KC) {
            let len = KC.min(k - c0);
            rebuild(c, &codes, b0..b1, c0..c0 + len, buf.as_mut_ptr());
            for (t, nt) in token_groups(n) {
                // The next group's outputs, so their first store finds them in cache.
                prefetch_out(out, m, b0..b1, (t + NT)..(t + 2 * NT).min(n));
                for (j, nr) in groups(b0..b1) {
                    let wp = buf.as_ptr().add((j - b0) * KC).cast();
                    tile_at(p, (wp, KC * 2), len, m, (j, nr), (t, nt), c0, out);
                }
            }
        }
    }
}

/// Rows `rows` of `c`, columns `cols` (whole groups from a multiple of [`GROUP`]), rebuilt as
/// the exact bf16 the stored matrix holds into `buf`, row `r` at `(r - rows.start)·KC`: tile by
/// tile of the coding, group by group, the tile's rows in turn (the coding's byte order).
/// Values past the row's end (its last group's padding) are written too, and never read: the
/// tiles mask them off.
///
/// # Safety
/// AVX-512F/BW present; `rows` inside `c`, `cols` inside `0..c.k` and at most [`KC`] long;
/// `buf` valid for `rows.len()` rows of [`KC`] values.
#[inline(always)]
unsafe fn rebuild(
    c: &Bf16Coded,
    codes: &Codes,
    rows: Range<usize>,
    cols: Range<usize>,
    buf: *mut u16,
) {
    let (g0, g1) = (cols.start / GROUP, cols.end.div_ceil(GROUP));
    for (span, _) in c.tile_spans(rows.clone()) {
        for g in g0..g1 {
            let at = c.group_ptr(span.start, g);
            let check = c.band_escapes(span.start, g);
            for (i, r) in span.clone().enumerate() {
                let src = at.add(i * GROUP_BYTES);
                let v = if check {
                    codes.row::<true>(src, (c, r, g * GROUP))
                } else {
                    codes.row::<false>(src, (c, r, g * GROUP))
                };
                let dst = buf.add((r - rows.start) * KC + (g - g0) * GROUP);
                _mm512_storeu_si512(dst.cast(), v[0]);
                _mm512_storeu_si512(dst.add(PAIRS).cast(), v[1]);
            }
        }
    }
}

/// Groups of [`NT`] tokens, then one group of the rest: `(start, len)`.
fn token_groups(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(NT).map(move |t| (t, NT.min(n - t)))
}

/// Adds the sums over chunk `c0..c0 + KC` of `k` for rows `j..j + nr` (`nr` 1 or 4) and
/// tokens `t..t + nt` (`nt` 1 to [`NT`]) into `out` (stores them for the first chunk).
///
/// # Safety
/// As [`sums`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_into(
    p: &Packed,
    k: usize,
    w: &[u8],
    m: usize,
    (j, nr): (usize, usize),
    (t, nt): (usize, usize),
    c0: usize,
    out: *mut f32,
) {
    let len = KC.min(k - c0);
    let wp = w.as_ptr().add((j * k + c0) * 2);
    tile_at(p, (wp, k * 2), len, m, (j, nr), (t, nt), c0, out)
}

/// [`tile_into`] on rows whose chunk starts at `wp`, `ws` bytes apart (the stored rows, or
/// [`sums_rebuilt`]'s buffer), `len` elements of it.
///
/// # Safety
/// As [`sums`]; `wp` valid for `nr` rows of `len` elements `ws` bytes apart.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_at(
    p: &Packed,
    (wp, ws): (*const u8, usize),
    len: usize,
    m: usize,
    (j, nr): (usize, usize),
    (t, nt): (usize, usize),
    c0: usize,
    out: *mut f32,
) {
    let xp = p.data.as_ptr().add(t * p.stride + c0);
    let xs = p.stride;
    let out = Out {
        ptr: out.add(t * m + j),
        token_stride: m,
        first: c0 == 0,
    };
    macro_rules! run {
        ($r:literal, $finish:ident, $($n:literal)*) => {
            match nt {
                $($n => out.$finish(tile::<$r, $n>(xp, xs, len, wp, ws)),)*
                _ => unreachable!("token group of {nt}"),
            }
        };
    }
    if nr == 4 {
        run!(4, rows4, 1 2 3 4 5 6)
    } else {
        run!(1, one_row, 1 2 3 4 5 6)
    }
}

/// Where a tile's sums go: row `r`, token `t` at `ptr[t·token_stride + r]`, stored for the
/// first chunk of `k` and added to what is there for the later ones.
struct Out {
    ptr: *mut f32,
    token_stride: usize,
    first: bool,
}

impl Out {
    /// Finishes a tile of `R` rows (a multiple of 4): each token's rows four at a time, their
    /// lanes added by [`reduce4`] and stored (or added) as one vector.
    ///
    /// # Safety
    /// AVX-512F present; the `R × N` outputs are valid and nobody else's.
    #[inline(always)]
    unsafe fn rows4<const R: usize, const N: usize>(&self, acc: [[__m512; N]; R]) {
        for (r, four) in acc.chunks_exact(4).enumerate() {
            let rows = four[0].iter().zip(&four[1]).zip(&four[2]).zip(&four[3]);
            for (t, (((&a, &b), &c), &d)) in rows.enumerate() {
                let s = reduce4(a, b, c, d);
                let o = self.ptr.add(t * self.token_stride + 4 * r);
                let s = if self.first {
                    s
                } else {
                    _mm_add_ps(_mm_loadu_ps(o), s)
                };
                _mm_storeu_ps(o, s);
            }
        }
    }

    /// Finishes a tile of one row: its tokens' lanes added by [`reduce4`] four at a time
    /// (zero vectors fill the last four; each sum uses its own lanes only).
    ///
    /// # Safety
    /// As [`Out::rows4`].
    #[inline(always)]
    unsafe fn one_row<const N: usize>(&self, acc: [[__m512; N]; 1]) {
        let z = _mm512_setzero_ps();
        let get = |t: usize| if t < N { acc[0][t] } else { z };
        for t0 in (0..N).step_by(4) {
            let mut s = [0f32; 4];
            _mm_storeu_ps(
                s.as_mut_ptr(),
                reduce4(get(t0), get(t0 + 1), get(t0 + 2), get(t0 + 3)),
            );
            for (t, &v) in (t0..N).zip(&s) {
                let o = self.ptr.add(t * self.token_stride);
                *o = if self.first { v } else { *o + v };
            }
        }
    }
}

/// The accumulators of `Σ_{i<len} x[t·xs + i]·w[r·ws/2 + i]` for `r < R`, `t < N`: lane `l` of
/// each adds elements `32s + 2l + 1` then `32s + 2l` (the instruction's order) for
/// `s = 0, 1, …`; [`Out`] then adds the lanes with [`reduce4`].
///
/// # Safety
/// AVX512_BF16 present; `x` valid for `N` rows of `len` rounded up to 32 elements, `xs` apart;
/// `w` for `R` rows of `len` bf16, `ws` bytes apart.
#[inline(always)]
unsafe fn tile<const R: usize, const N: usize>(
    x: *const u16,
    xs: usize,
    len: usize,
    w: *const u8,
    ws: usize,
) -> [[__m512; N]; R] {
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    let mut i = 0;
    while i + PAIRS <= len {
        step::<R, N>(&mut acc, x.add(i), xs, w.add(i * 2), ws, !0);
        i += PAIRS;
    }
    if i < len {
        let mask = (1u32 << (len - i)) - 1;
        step::<R, N>(&mut acc, x.add(i), xs, w.add(i * 2), ws, mask);
    }
    acc
}

/// One step of [`tile`]: the 32 elements under `mask` (1 bits: lanes read) of each row, and
/// the 32 at `x` of each token (zero where the row ends: the packing pads it).
///
/// # Safety
/// As [`tile`].
#[inline(always)]
unsafe fn step<const R: usize, const N: usize>(
    acc: &mut [[__m512; N]; R],
    x: *const u16,
    xs: usize,
    w: *const u8,
    ws: usize,
    mask: u32,
) {
    let xv: [__m512bh; N] = std::array::from_fn(|t| {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(x.add(t * xs).cast()))
    });
    for (r, a) in acc.iter_mut().enumerate() {
        let wp = w.add(r * ws);
        let wv = if mask == !0 {
            _mm512_loadu_si512(wp.cast())
        } else {
            _mm512_maskz_loadu_epi16(mask, wp.cast())
        };
        let wv = std::mem::transmute::<__m512i, __m512bh>(wv);
        for (a, &xv) in a.iter_mut().zip(&xv) {
            *a = _mm512_dpbf16_ps(*a, wv, xv);
        }
    }
}

/// The lane sums of four vectors, each in the same tree: `h_i = v_i + v_{i+8}` (i < 8), then
/// `q_i = h_i + h_{i+4}`, `e_i = q_i + q_{i+2}`, and `e_0 + e_1`.
///
/// # Safety
/// AVX-512F present.
#[inline(always)]
unsafe fn reduce4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
    // [a.h | b.h] and [c.h | d.h].
    let ab = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x44>(a, b),
        _mm512_shuffle_f32x4::<0xEE>(a, b),
    );
    let cd = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x44>(c, d),
        _mm512_shuffle_f32x4::<0xEE>(c, d),
    );
    // [a.q | b.q | c.q | d.q].
    let q = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(ab, cd),
        _mm512_shuffle_f32x4::<0xDD>(ab, cd),
    );
    let e = _mm512_add_ps(q, _mm512_permute_ps::<0b01_00_11_10>(q));
    let s = _mm512_add_ps(e, _mm512_permute_ps::<0b10_11_00_01>(e));
    _mm512_castps512_ps128(_mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        s,
    ))
}

/// The sums [`sums`] computes, in plain Rust: the instruction's per-lane order (the odd
/// element's product, then the even one's, each added with one rounding), [`reduce4`]'s tree,
/// chunks added in order. Subnormals are not flushed (the tests use none).
#[cfg(test)]
pub(super) fn sums_emulated(x: &[f32], n: usize, k: usize, w: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    for t in 0..n {
        for j in 0..m {
            let (xt, wj) = (&x[t * k..(t + 1) * k], &w[j * k..(j + 1) * k]);
            let mut total = 0f32;
            for c0 in (0..k).step_by(KC) {
                let len = KC.min(k - c0);
                let mut lanes = [0f32; 16];
                // Elements past the chunk's end are zero (the masked weight loads and the
                // packing's padding).
                let end = c0 + len;
                let prod = |i: usize| if i < end { xt[i] * wj[i] } else { 0.0 };
                for s in (0..len).step_by(PAIRS) {
                    for (l, acc) in lanes.iter_mut().enumerate() {
                        let i = c0 + s + 2 * l;
                        *acc += prod(i + 1);
                        *acc += prod(i);
                    }
                }
                let h: [f32; 8] = std::array::from_fn(|i| lanes[i] + lanes[i + 8]);
                let q: [f32; 4] = std::array::from_fn(|i| h[i] + h[i + 4]);
                let e: [f32; 2] = std::array::from_fn(|i| q[i] + q[i + 2]);
                let s = e[0] + e[1];
                total = if c0 == 0 { s } else { total + s };
            }
            out[t * m + j] = total;
        }
    }
    out
}
