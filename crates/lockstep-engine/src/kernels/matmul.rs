//! `y = x · Wᵀ (+ b)`: the linear layers, with `W` kept in its stored dtype.
//!
//! [`linear`] decodes blocks of weight rows once and reuses them for every token, spread over
//! threads with rayon; [`linear_reference`] is the plain triple loop it is tested against.

use super::{Float, Precision};
use crate::weights::{StoredDtype, Tensor};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_bf16;
#[cfg(target_arch = "x86_64")]
mod blocks;
#[cfg(target_arch = "x86_64")]
mod blocks_avx2;
#[cfg(target_arch = "x86_64")]
mod blocks_avx512;
#[cfg(target_arch = "x86_64")]
mod coded_avx512;
mod q8dot;
mod shares;

/// What kind of forward pass a product belongs to, which decides, once for the whole pass,
/// whether its bf16 products may run on AMX tiles ([`Kernel::Amx`]), whose f32 sums run in
/// another order than the row kernels'. Never decided per product from its token count: a
/// token's bits would then depend on how many tokens share the product (a batch's rows, the
/// tokens routed to an expert, each row's last logits against every position's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    /// More than one new position per row (a prefill): on AMX, the tiles, for any number of
    /// tokens (AMX against AVX-512, 2 cores, 896×4864 / 3584×18944 BF16 weights: 2 tokens 0.84× /
    /// 1.9×, 4 tokens 1.2× / 2.8×, 8 tokens 1.7× / 3.9×, 16 tokens 2.8× / 4.5×).
    Prefill,
    /// One new position per row (a decode step, or prompts of one token): the row kernels,
    /// whose sums do not depend on the other rows, so that a row decodes the same in any batch.
    /// (One token on the tiles decoded 15% slower than on AVX-512: 22.9-24.3 against
    /// 27.0-28.2 tok/s on the 0.5B shape, four runs each in turns, 2026-12-06.)
    Decode,
}

impl PassKind {
    /// The kind of a pass computing `new_per_row` new positions in each row (padding included).
    pub fn of(new_per_row: usize) -> PassKind {
        if new_per_row > 1 {
            PassKind::Prefill
        } else {
            PassKind::Decode
        }
    }
}

/// Dot product with eight independent accumulators (vectorizes, and keeps rounding error low).
#[inline]
pub fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if let (Some(a), Some(b)) = (super::as_f32(a), super::as_f32(b)) {
        if is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX; T holds one f32 (`as_f32`), so the result is a T.
            return unsafe { std::mem::transmute_copy::<f32, T>(&dot_f32_avx(a, b)) };
        }
    }
    dot_plain(a, b)
}

/// [`dot`] in plain Rust (any `T`; the reference of the f32 AVX version).
#[inline]
fn dot_plain<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = T::ZERO;
    for (&x, &y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// [`dot`] on f32 with the eight accumulators in one AVX register: the same multiplies, adds
/// and final order, so the same bits (the compiler's own vectorization of the generic loop
/// shuffles lanes and runs at a third of the speed).
///
/// # Safety
/// The CPU has AVX; `a.len() == b.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn dot_f32_avx(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let whole = a.len() / 8 * 8;
    let mut tail = 0f32;
    for (&x, &y) in a[whole..].iter().zip(&b[whole..]) {
        tail += x * y;
    }
    let mut l = [0f32; 4];
    _mm_storeu_ps(
        l.as_mut_ptr(),
        dot_lane_pairs(a.as_ptr(), b.as_ptr(), whole),
    );
    (l[0] + l[1]) + (l[2] + l[3]) + tail
}

/// [`dot`]'s eight accumulators over the first `whole` (a multiple of 8) elements at `a` and
/// `b`, in one AVX register (`acc[l] += a[i]·b[i]` for `i ≡ l (mod 8)`, in order), folded to
/// `[l0+l4, l1+l5, l2+l6, l3+l7]`: what is left of the final sum is `(p0+p1) + (p2+p3) + tail`.
///
/// # Safety
/// The CPU has AVX; `a` and `b` valid for `whole` f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
pub(crate) unsafe fn dot_lane_pairs(
    a: *const f32,
    b: *const f32,
    whole: usize,
) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    for i in (0..whole).step_by(8) {
        acc = _mm256_add_ps(
            acc,
            _mm256_mul_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i))),
        );
    }
    _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc))
}

/// `out[n][m] = x[n][k] · w[m][k] + bias[m]` for a `[m, k]` weight in any stored dtype.
///
/// Computes what [`linear_reference`] computes up to the order of the f32 (f64) summation:
/// weight rows are split over threads, and each thread reads the stored weight bytes in place
/// (no per-call copy of the weights) with the fastest kernel this CPU has (see [`Kernel`]) for
/// a pass of kind `kind` ([`PassKind`]: on AMX, the tiles for a prefill's bf16 products only).
///
/// A block weight marked [`Tensor::q8_dot`] in f32 compute runs [`linear_q8dot`] instead
/// (llama.cpp's 8-bit arithmetic, not exact; `--dtype q8dot`).
pub fn linear<T: Float>(
    kind: PassKind,
    x: &[T],
    n: usize,
    w: &Tensor,
    bias: Option<&[T]>,
    out: &mut [T],
) {
    if w.q8_dot && w.dtype.is_block() && T::PRECISION == Precision::F32 {
        if let (Some(xf), Some(of)) = (T::as_f32s(x), T::f32_ptr(out.as_mut_ptr())) {
            // SAFETY: an f32-compute type holds exactly one f32 per value (`f32_ptr`).
            let of = unsafe { std::slice::from_raw_parts_mut(of, out.len()) };
            let bias = bias.map(|b| T::as_f32s(b).expect("f32 compute"));
            return linear_q8dot(xf, n, w, bias, of);
        }
    }
    linear_with(Kernel::detect(), kind, x, n, w, bias, out)
}

/// `out[t·m + j] = Σ_i x[t·k + i]·w[j][i]` on AMX-BF16 tiles, raw f32 sums (no rounding), for
/// `n` rows of bf16 values held in f32 (`x`, `n·k`) and `m` rows of BF16 weights `wrow` bytes
/// apart (`w`); `m` a multiple of 16. The products are exact and summed in f32 in the tiles'
/// order. Returns `false`, touching nothing, where AMX does not run ([`Kernel::Amx`] not
/// available). For attention's bf16 prefill ([`super::attention`]), where each call is one
/// task of a parallel loop: it runs on the calling thread alone.
pub(crate) fn amx_sums(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[u8],
    wrow: usize,
    m: usize,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if amx::available() {
        assert!(m.is_multiple_of(16) && x.len() == n * k && out.len() == n * m);
        let p = amx::Packed::here(x, n, k);
        // SAFETY: AMX available (and with it AVX-512F/BW); the shapes are checked here and
        // by the kernel; `out` is this caller's alone.
        let raw = amx::Finish::Raw;
        let rest = unsafe { amx::sums_strided(&p, n, k, w, wrow, m, 0..m, out.as_mut_ptr(), raw) };
        debug_assert!(rest.is_empty());
        return true;
    }
    let _ = (x, n, k, w, wrow, m, out);
    false
}

/// Whether this CPU's kernels can sum a BF16 matrix's 12-bit coding
/// ([`crate::weights::bf16_coded`], made by [`Tensor::code_bf16`]) in a decode step's products:
/// where `LOCKSTEP_CODED_BF16=1` has a model code its matrices.
pub fn reads_coded() -> bool {
    #[cfg(target_arch = "x86_64")]
    return coded_avx512::readable();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether a model codes its BF16 matrices for decode when `LOCKSTEP_CODED_BF16` does not say
/// (and they fit, [`crate::weights::bf16_coded::auto`]): on the CPUs where reading the coding
/// was measured faster than reading the stored bytes, those whose bf16 decode runs on
/// `vdpbf16ps` ([`Kernel::decodes_in_pairs`]: AMD Zen 4/5, Intel with AMX; a subset of
/// [`reads_coded`]).
pub fn codes_by_default() -> bool {
    #[cfg(target_arch = "x86_64")]
    return coded_avx512::preferred();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether a model whose codings fit in memory only in place of its BF16 matrices gets them so
/// by default ([`crate::weights::bf16_coded::auto`]): where [`codes_by_default`] and a prefill
/// sums with `vdpbf16ps` too ([`Kernel::Avx512Bf16`] picked for every product: AMD Zen 4/5),
/// so that rebuilding the coding costs the prefill little. Not on AMX, whose tiles read stored
/// bytes: there a prefill on codings in place would run on `vdpbf16ps`, 5.8× the tiles' time
/// on the 7B shape's gate matrix at 128 tokens (`examples/bench_linear`, stored bytes: 113.2
/// against 19.4 ms, a 2-core Xeon, 2026-12-06), while that shape's decode was no faster for the
/// coding (`lockstep bench`, one repeat each in turns: 1.47 and 1.84 tok/s coded against 1.80
/// and 1.57 stored).
pub fn codes_in_place_by_default() -> bool {
    codes_by_default() && Kernel::detect() == Kernel::Avx512Bf16
}

/// Most tokens a product reads a coded matrix for ([`reads_coded`]): a decode step of up to
/// three sequences; more read the stored bytes.
pub const CODED_MAX_TOKENS: usize = 3;

/// The inner loops [`linear`] can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust for every dtype and compute type: weights decoded a chunk at a time into a
    /// stack buffer ([`Float::decode`], so exactly the values the reference uses), then [`dot`].
    Portable,
    /// AVX2 + FMA (x86-64 without AVX-512): the sums of [`Kernel::Avx512`] on 8-lane vectors,
    /// for `f32` and `Bf16` compute on F32 or BF16 weights, and on GGUF block weights (a group
    /// of rows decoded to f32, then summed as F32 weights; for decode's few tokens each 8
    /// weights decoded in a register and summed at once, the same bits); the rest as
    /// [`Kernel::Portable`].
    Avx2,
    /// AVX-512F/BW/VL (x86-64): f32 FMA on F32 or BF16 weights read from the stored bytes, for
    /// `f32` and `Bf16` compute, and GGUF block weights as [`Kernel::Avx2`] decodes them (not
    /// run on an AVX-512 machine yet); f64 compute and F16/F64 weights as [`Kernel::Portable`].
    Avx512,
    /// AVX512_BF16: [`Bf16`](super::Bf16) compute on BF16 weights summed with `vdpbf16ps`
    /// (bf16×bf16 products summed in f32, as PyTorch's bf16 matmul, in another order than
    /// [`Kernel::Avx512`]'s) for any number of tokens, with the same bits whatever the batch;
    /// everything else as [`Kernel::Avx512`]. [`Kernel::detect`] picks it where it is the
    /// faster way for every product (AMD Zen 4/5); on Intel it runs a decode pass of
    /// [`Kernel::Amx`].
    Avx512Bf16,
    /// AMX-BF16 tiles (x86-64, Linux) for prefill in the faithful bf16 tier:
    /// [`Bf16`](super::Bf16) compute on BF16 weights in a [`PassKind::Prefill`] pass, any
    /// number of tokens (bf16×bf16 products summed in f32, as PyTorch's bf16 matmul). A
    /// [`PassKind::Decode`] pass's products of the same kind run as [`Kernel::Avx512Bf16`]
    /// (every AMX CPU has AVX512_BF16), one-token steps on the 12-bit coding where the model
    /// made it; everything else as [`Kernel::Avx512`]. The tiles add their sums in another
    /// order than `vdpbf16ps`, so there a prefill and a one-token decode of the same token may
    /// differ in the last bit of a sum (both within f32 reordering error).
    Amx,
}

impl Kernel {
    /// The fastest kernel this CPU runs (found once: every product of a decode step asks):
    /// the last of [`Kernel::available`], but [`Kernel::Avx512Bf16`] only where it is the faster
    /// way for every product (AMD Zen 4/5; elsewhere [`Kernel::Avx512`] before it, or
    /// [`Kernel::Amx`] after it, which runs it for decode).
    pub fn detect() -> Kernel {
        static FASTEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *FASTEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            let pairs_first = avx512_bf16::preferred();
            #[cfg(not(target_arch = "x86_64"))]
            let pairs_first = false;
            let usable = |k: &Kernel| *k != Kernel::Avx512Bf16 || pairs_first;
            *Kernel::available().iter().rfind(|k| usable(k)).unwrap()
        })
    }

    /// Whether this kernel sums a [`PassKind::Decode`] pass's bf16-compute products on BF16
    /// weights with `vdpbf16ps` ([`Kernel::Avx512Bf16`] itself, and [`Kernel::Amx`] where the
    /// CPU has AVX512_BF16).
    pub fn decodes_in_pairs(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return match self {
            Kernel::Avx512Bf16 => true,
            Kernel::Amx => avx512_bf16::available(),
            _ => false,
        };
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Every kernel this CPU runs, slowest first.
    pub fn available() -> Vec<Kernel> {
        [
            Kernel::Portable,
            Kernel::Avx2,
            Kernel::Avx512,
            Kernel::Avx512Bf16,
            Kernel::Amx,
        ]
        .into_iter()
        .filter(|k| k.runs_here())
        .collect()
    }

    /// Whether this CPU runs this kernel (one of [`Kernel::available`], without making the list).
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        let runs = match self {
            Kernel::Portable => true,
            Kernel::Avx2 => avx2::available(),
            Kernel::Avx512 => avx512::available(),
            // (It checks AVX-512F/BW/VL itself.)
            Kernel::Avx512Bf16 => avx512_bf16::available(),
            Kernel::Amx => avx512::available() && amx::available(),
        };
        #[cfg(not(target_arch = "x86_64"))]
        let runs = self == Kernel::Portable;
        runs
    }
}

/// [`linear`] on a chosen kernel (tests and benchmarks force [`Kernel::Portable`] with it).
///
/// # Panics
/// When the lengths do not match `w`'s shape, or `kernel` is not available on this CPU.
pub fn linear_with<T: Float>(
    kernel: Kernel,
    kind: PassKind,
    x: &[T],
    n: usize,
    w: &Tensor,
    bias: Option<&[T]>,
    out: &mut [T],
) {
    let mut one = [Product { w, bias, out }];
    linear_many_with(kernel, kind, x, n, &mut one)
}

/// One product of [`linear_many`]: `out[n][m] = x · wᵀ (+ bias)`.
pub struct Product<'a, T> {
    /// The `[m, k]` weight.
    pub w: &'a Tensor,
    /// `[m]`, added before the rounding to the activation dtype.
    pub bias: Option<&'a [T]>,
    /// `[n][m]`.
    pub out: &'a mut [T],
}

/// [`linear`] for several weights applied to the same input (q/k/v, gate/up) in one parallel
/// region: one wake-up of the threads instead of one per weight, and the activations packed
/// once. Each output gets exactly what [`linear`] gives it (the tasks only split rows).
pub fn linear_many<T: Float>(kind: PassKind, x: &[T], n: usize, products: &mut [Product<'_, T>]) {
    let q8 = |w: &Tensor| w.q8_dot && w.dtype.is_block() && T::PRECISION == Precision::F32;
    if products.iter().any(|p| q8(p.w)) {
        for p in products {
            linear(kind, x, n, p.w, p.bias, p.out);
        }
        return;
    }
    linear_many_with(Kernel::detect(), kind, x, n, products)
}

/// The MLP's gated activation: `act[t][j] = silu(x·gateᵀ)[t][j] · (x·upᵀ)[t][j]`, each product
/// rounded to the activation dtype and the activation computed as
/// [`silu_mul_in_place`](super::activation::silu_mul_in_place) does, into `act` (`n·m`); `up_out`
/// (`n·m`) is scratch for the up product. In the faithful bf16 tier on AMX (a
/// [`PassKind::Prefill`] pass, BF16 weights, `m` a multiple of 16) the two products and the activation run in one
/// pass, each 16 × 16 block's gate and up sums meeting in registers (`amx::swiglu_sums`): the
/// same bits, without writing both products out and reading them back (`up_out` is then left
/// as it was). Elsewhere [`linear_many`], then the activation.
pub fn linear_swiglu<T: Float>(
    kind: PassKind,
    x: &[T],
    n: usize,
    gate: &Tensor,
    up: &Tensor,
    act: &mut [T],
    up_out: &mut [T],
) {
    let (gate, up) = (weights_for::<T>(gate), weights_for::<T>(up));
    #[cfg(target_arch = "x86_64")]
    if swiglu_amx(kind, x, n, gate, up, act) {
        return;
    }
    linear_many(
        kind,
        x,
        n,
        &mut [
            Product {
                w: gate,
                bias: None,
                out: act,
            },
            Product {
                w: up,
                bias: None,
                out: up_out,
            },
        ],
    );
    super::activation::silu_mul_in_place(act, up_out);
}

/// [`linear_swiglu`]'s single pass on AMX; `false`, touching nothing, where it does not apply.
#[cfg(target_arch = "x86_64")]
fn swiglu_amx<T: Float>(
    kind: PassKind,
    x: &[T],
    n: usize,
    gate: &Tensor,
    up: &Tensor,
    act: &mut [T],
) -> bool {
    let (m, k) = (gate.shape[0], gate.shape[1]);
    let applies = amx_rule::<T>(Kernel::detect(), kind, n, k)
        && gate.dtype == StoredDtype::BF16
        && up.dtype == StoredDtype::BF16
        && replacing_coding(gate).is_none()
        && replacing_coding(up).is_none()
        && gate.shape == up.shape
        && m.is_multiple_of(16);
    let (Some(xf), Some(out)) = (T::as_f32s(x), T::f32_ptr(act.as_mut_ptr())) else {
        return false;
    };
    if !applies {
        return false;
    }
    assert_eq!(x.len(), n * k, "linear_swiglu: input length");
    assert_eq!(act.len(), n * m, "linear_swiglu: output length");
    let p = amx::Packed::new(xf, n, k);
    let per = task_rows(m, 2 * k * 2, AMX_SWIGLU_TASKS_PER_THREAD);
    let dst = crate::team::SendPtr(out);
    crate::team::for_each(m.div_ceil(per), |t| {
        let rows = t * per..((t + 1) * per).min(m);
        // SAFETY: AMX available (`Kernel::Amx`); both weights are `m` BF16 rows of `k`, `p`
        // packs `n` tokens of `k`, and `act` holds `n·m` f32 (`f32_ptr`); each task writes its
        // own rows' entries.
        let rest =
            unsafe { amx::swiglu_sums(&p, n, k, gate.bytes(), up.bytes(), m, rows, dst.get()) };
        debug_assert!(rest.is_empty(), "m is a multiple of 16");
    });
    true
}

/// The tensor a product in compute type `T` reads: in bf16 compute an F32 matrix's bf16 copy
/// when the model made one ([`Tensor::bf16_copy`]: exactly the values the F32 ones round to), so
/// that the BF16 kernels run; else `w`.
fn weights_for<T: Float>(w: &Tensor) -> &Tensor {
    match w.bf16_copy() {
        Some(c) if T::PRECISION == Precision::BF16 => c,
        _ => w,
    }
}

/// Whether the AMX kernel serves `n` tokens of `k` on `kernel` in compute type `T` (on BF16
/// weights, which the callers check): the faithful bf16 tier only (never f32/f64, whose
/// activations it would round to bf16), in a [`PassKind::Prefill`] pass.
/// [`linear_many_with`] and [`linear_swiglu`] decide by it.
#[cfg(target_arch = "x86_64")]
fn amx_rule<T: Float>(kernel: Kernel, kind: PassKind, n: usize, k: usize) -> bool {
    kernel == Kernel::Amx
        && T::PRECISION == Precision::BF16
        && kind == PassKind::Prefill
        && n > 0
        && k > 0
}

/// [`linear_with`] for several weights of the same `k` at once (see [`linear_many`]).
fn linear_many_with<T: Float>(
    kernel: Kernel,
    kind: PassKind,
    x: &[T],
    n: usize,
    products: &mut [Product<'_, T>],
) {
    assert!(
        kernel.runs_here(),
        "{kernel:?} is not available on this CPU"
    );
    for p in products.iter_mut() {
        p.w = weights_for::<T>(p.w);
    }
    let Some(first) = products.first() else {
        return;
    };
    let k = first.w.shape[1];
    assert_eq!(x.len(), n * k, "linear: input length");
    // Per product: its output, and its rows' size (the tasks are cut from them below).
    let mut sizes = Vec::with_capacity(products.len());
    let mut dsts = Vec::with_capacity(products.len());
    for p in products.iter_mut() {
        let (m, wk) = (p.w.shape[0], p.w.shape[1]);
        assert_eq!(wk, k, "linear_many: weights of different input sizes");
        assert_eq!(p.out.len(), n * m, "linear: output length");
        if let Some(b) = p.bias {
            assert_eq!(b.len(), m);
        }
        let row_bytes =
            p.w.dtype
                .row_bytes(k)
                .unwrap_or_else(|e| panic!("linear: {e}"));
        assert_eq!(p.w.bytes().len(), m * row_bytes, "linear: weight bytes");
        dsts.push(Dst {
            ptr: p.out.as_mut_ptr(),
            row_len: m,
        });
        // Block rows are sized by their decoded f32 (decoding them is the work, not reading
        // them).
        let task_bytes = if p.w.dtype.is_block() {
            k * 4
        } else {
            row_bytes
        };
        sizes.push((if n == 0 { 0 } else { m }, task_bytes));
    }
    if sizes.iter().all(|&(m, _)| m == 0) {
        return;
    }
    let bf16_weights = products.iter().any(|p| p.w.dtype == StoredDtype::BF16);
    // AMX: Bf16 compute (never f32/f64: it would round their activations), BF16 weights,
    // enough tokens; the activations are packed once for every task.
    #[cfg(target_arch = "x86_64")]
    let packed = (amx_rule::<T>(kernel, kind, n, k) && bf16_weights)
        .then(|| T::as_f32s(x).map(|x| amx::Packed::new(x, n, k)))
        .flatten();
    // AVX512_BF16: Bf16 compute on BF16 weights, any number of tokens; on AMX a decode pass,
    // and any pass on a coding that replaced the stored bytes (the tiles read stored bytes).
    #[cfg(target_arch = "x86_64")]
    let pairs = kernel.decodes_in_pairs()
        && (kernel == Kernel::Avx512Bf16
            || kind == PassKind::Decode
            || products.iter().any(|p| replacing_coding(p.w).is_some()));
    #[cfg(target_arch = "x86_64")]
    let paired = (pairs && T::PRECISION == Precision::BF16 && bf16_weights && k > 0)
        .then(|| T::as_f32s(x).map(|x| avx512_bf16::Packed::new(x, n, k)))
        .flatten();
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kind, bf16_weights);
    let products = &*products;
    let run = |i: usize, rows: std::ops::Range<usize>| {
        let (w, bias, dst) = (products[i].w, products[i].bias, dsts[i]);
        let m = w.shape[0];
        // SAFETY: tasks own disjoint row ranges of one product each, so each output entry is
        // written by one task (the `&mut` outputs are not touched while the tasks run).
        unsafe {
            // The rows whose sums the kernel below leaves raw (AMX finishes its own).
            let mut raw = rows.clone();
            #[cfg(target_arch = "x86_64")]
            let rest = match (&packed, &paired, T::f32_ptr(dst.ptr)) {
                (Some(p), _, Some(out))
                    if w.dtype == StoredDtype::BF16 && replacing_coding(w).is_none() =>
                {
                    // Bf16 compute (the packing's condition): bias and rounding in the kernel.
                    let bias = bias.map(|b| T::as_f32s(b).expect("Bf16 holds f32"));
                    let finish = amx::Finish::Bf16 { bias };
                    let rest = amx::sums(p, n, k, w.bytes(), m, rows.clone(), out, finish);
                    raw = rest.clone();
                    rest
                }
                (_, Some(p), Some(out)) if w.dtype == StoredDtype::BF16 => {
                    // A decode step on a matrix coded in 12 bits: the same sums from fewer
                    // bytes; a prefill on one whose coding replaced the stored bytes, the
                    // coding rebuilt block by block.
                    match (decode_coding(w, n), replacing_coding(w)) {
                        (Some(c), _) => avx512_bf16::sums_coded(p, n, k, c, rows.clone(), out),
                        (None, Some(c)) => avx512_bf16::sums_rebuilt(p, n, k, c, rows.clone(), out),
                        (None, None) => avx512_bf16::sums(p, n, k, w.bytes(), m, rows.clone(), out),
                    }
                    rows.end..rows.end
                }
                _ => rows.clone(),
            };
            #[cfg(not(target_arch = "x86_64"))]
            let rest = rows.clone();
            // The kernel's rows (or the rows not filling an AMX tile, on AVX-512).
            sums(kernel, x, n, k, w, rest, dst);
            let bias = bias.map(|b| &b[raw.clone()]);
            for t in 0..n {
                T::add_bias_to_act_dtype(dst.row(t, raw.clone()), bias);
            }
        }
    };
    if n <= CODED_MAX_TOKENS {
        // A decode step: each thread streams one share of the rows (see `shares`).
        // Where the next product's bytes begin: after the last product's coding, where the
        // step reads coded matrices (laid out in the order it reads them; bf16 and f32 compute).
        #[cfg(target_arch = "x86_64")]
        let next = (products.last())
            .filter(|_| matches!(T::PRECISION, Precision::BF16 | Precision::F32))
            .and_then(|p| decode_coding(p.w, n))
            .map(|c| c.group_ptr(0, 0).wrapping_add(c.bytes()));
        #[cfg(not(target_arch = "x86_64"))]
        let next = None;
        shares::Shares::new(&sizes, rayon::current_num_threads(), next).run(run);
    } else {
        #[cfg(target_arch = "x86_64")]
        let per_thread = match packed {
            Some(_) => AMX_LINEAR_TASKS_PER_THREAD,
            None => TASKS_PER_THREAD,
        };
        #[cfg(not(target_arch = "x86_64"))]
        let per_thread = TASKS_PER_THREAD;
        let tasks: Vec<(usize, std::ops::Range<usize>)> = (sizes.iter().enumerate())
            .flat_map(|(i, &(m, bytes))| {
                let per = task_rows(m, bytes, per_thread);
                (0..m.div_ceil(per)).map(move |t| (i, t * per..((t + 1) * per).min(m)))
            })
            .collect();
        crate::team::for_each(tasks.len(), |t| run(tasks[t].0, tasks[t].1.clone()));
    }
}

/// The 12-bit coding of `w` that a product of `n` tokens reads instead of its stored bytes: a
/// decode step's ([`CODED_MAX_TOKENS`] tokens at most) where this CPU's kernels sum codings and
/// `w` has one.
#[cfg(target_arch = "x86_64")]
fn decode_coding(w: &Tensor, n: usize) -> Option<&crate::weights::bf16_coded::Bf16Coded> {
    w.coded()
        .filter(|_| n <= CODED_MAX_TOKENS && coded_avx512::readable())
}

/// The 12-bit coding of `w` that a bf16-compute product of any number of tokens reads: where
/// it replaced the stored bytes in memory ([`Tensor::replace_stored_by_coding`]) and this CPU's
/// kernels sum codings.
#[cfg(target_arch = "x86_64")]
fn replacing_coding(w: &Tensor) -> Option<&crate::weights::bf16_coded::Bf16Coded> {
    w.coded()
        .filter(|_| w.coding_replaces_stored() && coded_avx512::readable())
}

/// Rows per rayon task of a product of more than [`CODED_MAX_TOKENS`] tokens (a decode step's
/// products split their rows by [`shares`]): `per_thread` tasks per thread (load balance;
/// [`TASKS_PER_THREAD`], or on AMX tiles [`AMX_SWIGLU_TASKS_PER_THREAD`] and
/// [`AMX_LINEAR_TASKS_PER_THREAD`]) of at least ~64 KiB of weights (to amortize scheduling), a multiple of the 16-row AMX tiles (and of the 4-row
/// AVX-512 ones).
fn task_rows(m: usize, row_bytes: usize, per_thread: usize) -> usize {
    let balanced = m.div_ceil(per_thread * rayon::current_num_threads());
    let min = (64usize << 10).div_ceil(row_bytes.max(1));
    balanced.max(min).next_multiple_of(16)
}

/// Tasks per thread that [`task_rows`] cuts a product of more than [`CODED_MAX_TOKENS`] tokens
/// into (a prefill, a batch's decode step). Each task passes every token's activations over its
/// rows' weights, a block of rows at a time, so every task, and every partial block a task ends
/// with, reads all the activations once more: fewer tasks read them fewer times, more balance
/// the threads' loads better. Whole 0.5B-shape bf16 prefills, the counts in turns in one process
/// (2 cores of an AMD EPYC Zen 5, AVX512_BF16, 2026-12-05, medians of the ratios): 4 against 8,
/// 0.98-0.99× the time at 512 tokens (12 and 20 rounds), 0.95× at 2048 (8 rounds), 0.99-1.00×
/// at 128 (30 rounds); at 2048, against 4, 2 took 1.03×, 1 1.02×, 8 1.05× (8 rounds); at 512,
/// against 8, 3 took 1.01×, 1 1.00×, 16 1.02-1.03×. A batch's decode (`lockstep bench --batch`,
/// three pairs in turns): 4 rows 143.5, 165.0, 164.2 → 159.3, 173.8, 165.6 tok/s, 8 rows 242.8,
/// 242.2, 241.8 → 241.6, 253.1, 256.7. On AMX tiles: [`AMX_SWIGLU_TASKS_PER_THREAD`] and
/// [`AMX_LINEAR_TASKS_PER_THREAD`].
const TASKS_PER_THREAD: usize = 4;

/// [`TASKS_PER_THREAD`] for the MLP's gate and up products on AMX tiles (`amx::swiglu_sums`;
/// the plain products: [`AMX_LINEAR_TASKS_PER_THREAD`]). Each task passes every token pair's
/// packed activations over all of its rows' weights, so a task whose weights do not stay in L2
/// beside them reads its weights again from further out for every pair of token groups: the 0.5B shape's gate and up rows of
/// a four-task share are 2.2 MB, of an eight-task share 1.1 MB (2 MiB of L2 a core here).
/// Whole 0.5B-shape bf16 prefills, 2 cores of an Intel Xeon with AMX (2026-12-05,
/// `prefill_profile`, the counts in turns): 8 against 4 took 0.86-0.95× the time at 512 tokens
/// (7 rounds; the gate/up/SwiGLU step 0.82-0.96×), 0.83-0.92× at 128 (2), 0.90-0.94× at 2048
/// (2); 16 and 32 made the down product slower again at 512 (1.07-1.23× and 1.39-1.57× the
/// time of 8 on it, 3 rounds). Those were measured before the products ran in panels
/// (`amx::run`); with them, 1, 2 and 4 measured within the noise of 8 on the gate/up step
/// (2026-12-06, 137-178 against 141-162 ms a pass, 2 rounds each).
const AMX_SWIGLU_TASKS_PER_THREAD: usize = 8;

/// [`TASKS_PER_THREAD`] for the plain products on AMX tiles (`amx::sums`: q/k/v, o, down; the
/// gate and up products run as one with [`AMX_SWIGLU_TASKS_PER_THREAD`]). Since the products run in
/// blocks of `k` with the panels of a task inside each block (`amx::run`), a task reads all the
/// tokens' packed activations once per block of `k` from further out than L2 and then serves
/// every panel of its rows from L2: the fewer tasks, the fewer such reads. The down product's
/// `k` of 4864 is five blocks at 512 tokens, 5 MB of activations per task. 0.5B shape,
/// 2 cores of an Intel Xeon with AMX (2026-12-06, `prefill_profile`, in turns): the down product
/// 98-109 ms a pass with 8 against 87-91 with 2 or 4 (512 tokens, 4 rounds), 399-420 against
/// 366-370 with 2 (2048 tokens; q/k/v 104-105 against 93-95); 128 tokens alike.
const AMX_LINEAR_TASKS_PER_THREAD: usize = 2;

/// The output `[n][m]` shared by the tasks, each writing its own rows.
#[derive(Clone, Copy)]
struct Dst<T> {
    /// Start of the `n·m` outputs.
    ptr: *mut T,
    /// `m`: the outputs per token.
    row_len: usize,
}
// SAFETY: tasks write disjoint entries (see `linear_with`).
unsafe impl<T: Send> Send for Dst<T> {}
unsafe impl<T: Sync> Sync for Dst<T> {}

impl<T> Dst<T> {
    /// Token `t`'s outputs for `rows`.
    ///
    /// # Safety
    /// No other live reference to these entries.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, t: usize, rows: std::ops::Range<usize>) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.ptr.add(t * self.row_len + rows.start), rows.len())
    }
}

/// Raw sums (no bias, no rounding) into `dst` for `rows` and every token.
///
/// # Safety
/// `kernel` is available; `dst` is `[n][m]`, and no one else accesses its entries in `rows`.
unsafe fn sums<T: Float>(
    kernel: Kernel,
    x: &[T],
    n: usize,
    k: usize,
    w: &Tensor,
    rows: std::ops::Range<usize>,
    dst: Dst<T>,
) {
    #[cfg(target_arch = "x86_64")]
    if let (Some(xf), Some(out)) = (T::as_f32s(x), T::f32_ptr(dst.ptr)) {
        // ggml blocks: decoded a group of rows at a time into f32, then summed as F32 weights.
        if w.dtype.is_block() && kernel != Kernel::Portable {
            let bf16 = T::PRECISION == Precision::BF16;
            return blocks::sums(kernel == Kernel::Avx2, bf16, xf, n, k, w, rows, out);
        }
        let (m, bytes) = (w.shape[0], w.bytes());
        // Which stored-weight reader: BF16 as stored, F32 rounded to bf16 for bf16 compute
        // (as `half` rounds it), F32 as stored; anything else runs portable.
        enum Reader {
            Bf16,
            F32AsBf16,
            F32,
        }
        let reader = match (w.dtype, T::PRECISION) {
            (StoredDtype::BF16, _) => Some(Reader::Bf16),
            (StoredDtype::F32, Precision::BF16) => Some(Reader::F32AsBf16),
            (StoredDtype::F32, _) => Some(Reader::F32),
            _ => None,
        };
        match (kernel, reader) {
            (_, None) | (Kernel::Portable, _) => {}
            (Kernel::Avx2, Some(r)) => {
                use avx2::{sums_fma as run, Bf16W, F32AsBf16W, F32W};
                return match r {
                    Reader::Bf16 => run::<Bf16W>(xf, n, k, bytes, m, rows, out),
                    Reader::F32AsBf16 => run::<F32AsBf16W>(xf, n, k, bytes, m, rows, out),
                    Reader::F32 => run::<F32W>(xf, n, k, bytes, m, rows, out),
                };
            }
            (Kernel::Avx512 | Kernel::Avx512Bf16 | Kernel::Amx, Some(r)) => {
                use avx512::{sums_fma as run, Bf16W, F32AsBf16W, F32W};
                // A decode step on a matrix coded in 12 bits: the same sums from fewer bytes.
                if let (Reader::Bf16, Some(c)) = (&r, decode_coding(w, n)) {
                    return avx512::sums_coded(xf, n, k, c, rows, out);
                }
                return match r {
                    Reader::Bf16 => run::<Bf16W>(xf, n, k, bytes, m, rows, out),
                    Reader::F32AsBf16 => run::<F32AsBf16W>(xf, n, k, bytes, m, rows, out),
                    Reader::F32 => run::<F32W>(xf, n, k, bytes, m, rows, out),
                };
            }
        }
    }
    let _ = kernel;
    sums_portable(x, n, k, w, rows, dst)
}

/// Portable sums: for four rows at a time, decode a chunk of each row into a stack buffer and
/// dot it with every token's matching chunk, accumulating the chunks' sums in `dst`.
///
/// # Safety
/// As [`sums`].
unsafe fn sums_portable<T: Float>(
    x: &[T],
    n: usize,
    k: usize,
    w: &Tensor,
    rows: std::ops::Range<usize>,
    dst: Dst<T>,
) {
    const ROWS: usize = 4;
    const CHUNK: usize = 256;
    // A chunk is whole blocks of every block dtype (32 or 256 elements), as is `k`.
    let (per, sz) = (w.dtype.block_len(), w.dtype.size());
    let (row, bytes) = (k / per * sz, w.bytes());
    let mut buf = [T::ZERO; ROWS * CHUNK];
    for r0 in rows.clone().step_by(ROWS) {
        let group = r0..(r0 + ROWS).min(rows.end);
        for c0 in (0..k).step_by(CHUNK) {
            let len = CHUNK.min(k - c0);
            for (b, j) in buf.chunks_exact_mut(CHUNK).zip(group.clone()) {
                let at = j * row + c0 / per * sz;
                T::decode(w.dtype, &bytes[at..at + len / per * sz], &mut b[..len]);
            }
            for t in 0..n {
                let xt = &x[t * k + c0..t * k + c0 + len];
                for (o, b) in dst
                    .row(t, group.clone())
                    .iter_mut()
                    .zip(buf.chunks_exact(CHUNK))
                {
                    let s = dot(xt, &b[..len]);
                    *o = if c0 == 0 { s } else { *o + s };
                }
            }
        }
    }
}

/// `out[n][m] = x[n][k] · w[m][k] + bias[m]` in the fast `q8dot` mode, llama.cpp's CPU
/// arithmetic, for a block-quantized (GGUF) `w`: each activation row is quantized once to the
/// 8-bit format llama.cpp pairs with `w`'s type ([`super::quant::q8act`]) and dotted with the
/// stored weight quants in integers ([`super::quant::dot_scalar`]; AVX2 kernels where the CPU
/// has them), rows split over threads as in [`linear`]; the bias is added in f32. Not exact: the
/// activations lose up to half a quantization step each.
///
/// # Panics
/// When `w` is not a block dtype, or the lengths do not match `w`'s shape.
pub fn linear_q8dot(x: &[f32], n: usize, w: &Tensor, bias: Option<&[f32]>, out: &mut [f32]) {
    q8dot::linear(true, x, n, w, bias, out)
}

/// Plain reference: decode the whole weight, triple loop, sequential sums.
pub fn linear_reference<T: Float>(x: &[T], n: usize, w: &Tensor, bias: Option<&[T]>) -> Vec<T> {
    let (m, k) = (w.shape[0], w.shape[1]);
    let mut wd = vec![T::ZERO; m * k];
    T::decode(w.dtype, w.bytes(), &mut wd);
    let mut out = vec![T::ZERO; n * m];
    for t in 0..n {
        for j in 0..m {
            let mut s = T::ZERO;
            for i in 0..k {
                s += x[t * k + i] * wd[j * k + i];
            }
            out[t * m + j] = (s + bias.map_or(T::ZERO, |b| b[j])).to_act_dtype();
        }
    }
    out
}

#[cfg(test)]
mod block_tests;
#[cfg(all(test, target_arch = "x86_64"))]
mod fused_tests;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::Bf16;
    use crate::weights::Checkpoint;

    /// Writes a one-tensor checkpoint and returns the tensor (kept alive by its map).
    pub(crate) fn tensor_from(
        vals: &[f32],
        shape: Vec<usize>,
        dtype: safetensors::Dtype,
    ) -> (tempfile::TempDir, Tensor) {
        let bytes: Vec<u8> = match dtype {
            safetensors::Dtype::BF16 => vals
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            safetensors::Dtype::F16 => vals
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            safetensors::Dtype::F64 => vals
                .iter()
                .flat_map(|&v| (v as f64).to_le_bytes())
                .collect(),
            _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let d = tempfile::tempdir().unwrap();
        let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), &bytes).unwrap();
        safetensors::serialize_to_file(
            vec![("w".to_string(), view)],
            None,
            &d.path().join("model.safetensors"),
        )
        .unwrap();
        let c = Checkpoint::open(d.path()).unwrap();
        let t = c.get("w", &shape).unwrap();
        (d, t)
    }

    /// `dot` on f32 (the AVX version where the CPU has it) is the plain loop bit for bit, at
    /// every length (whole vectors, tails, empty), with values of mixed magnitude, signed
    /// zeros, infinities and NaN.
    #[test]
    fn f32_dot_is_the_plain_loops_bits() {
        for len in (0..40).chain([64, 127, 128, 896]) {
            for seed in 0..4 {
                let a: Vec<f32> = pseudo(len, seed)
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| match (i + seed as usize) % 7 {
                        0 => v * 1e6,
                        1 => v * 1e-6,
                        2 => -0.0,
                        _ => v,
                    })
                    .collect();
                let b = pseudo(len, seed + 100);
                let (got, want) = (dot(&a, &b), dot_plain(&a, &b));
                assert_eq!(got.to_bits(), want.to_bits(), "len {len} seed {seed}");
            }
        }
        for special in [f32::INFINITY, f32::NAN] {
            let mut a = pseudo(20, 1);
            a[13] = special;
            let b = pseudo(20, 2);
            let (got, want) = (dot(&a, &b), dot_plain(&a, &b));
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()));
        }
    }

    /// `Σ |x_i·w_i| + |bias|`: the magnitude a reordered dot product's error scales with.
    fn abs_sum<T: Float>(x: &[T], w: &[f64], bias: Option<T>) -> f64 {
        x.iter()
            .zip(w)
            .map(|(a, b)| (a.to_f64() * b).abs())
            .sum::<f64>()
            + bias.map_or(0.0, |b| b.to_f64().abs())
    }

    /// `n` deterministic pseudo-random values in [-0.5, 0.5) from `seed` (an LCG): the test
    /// inputs of the matmul kernels' tests.
    pub(crate) fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Every kernel × stored dtype × `n` × bias on shapes with row and `k` tails (rows not a
    /// multiple of 4; `k` odd, not a multiple of 16, above the portable and AVX-512 chunks),
    /// against [`linear_reference`].
    fn check_all<T: Float>(rel: f64) {
        let kernels = Kernel::available();
        for dtype in [
            safetensors::Dtype::F32,
            safetensors::Dtype::BF16,
            safetensors::Dtype::F16,
            safetensors::Dtype::F64,
        ] {
            for (m, k) in [(37, 29), (9, 301), (6, 1037), (5, 1)] {
                let (_d, w) = tensor_from(&pseudo(m * k, 1), vec![m, k], dtype);
                let mut wd = vec![0f64; m * k];
                f64::decode(w.dtype, w.bytes(), &mut wd);
                let b: Vec<T> = pseudo(m, 3)
                    .iter()
                    .map(|&v| T::from_f64(v as f64).to_act_dtype())
                    .collect();
                for n in [1, 3, 17] {
                    let x: Vec<T> = pseudo(n * k, 2)
                        .iter()
                        .map(|&v| T::from_f64(v as f64).to_act_dtype())
                        .collect();
                    for bias in [None, Some(&b[..])] {
                        let r = linear_reference(&x, n, &w, bias);
                        for &kernel in &kernels {
                            let mut out = vec![T::ZERO; n * m];
                            linear_with(kernel, PassKind::Prefill, &x, n, &w, bias, &mut out);
                            for (i, (a, c)) in out.iter().zip(&r).enumerate() {
                                let (t, j) = (i / m, i % m);
                                // Error bound of a reordered sum, plus one output rounding.
                                let scale = abs_sum(
                                    &x[t * k..(t + 1) * k],
                                    &wd[j * k..(j + 1) * k],
                                    bias.map(|b| b[j]),
                                );
                                let tol = rel * scale
                                    + (c.to_f64() - c.to_act_dtype().to_f64()).abs()
                                    + if T::PRECISION == Precision::BF16 {
                                        c.to_f64().abs() / 128.0
                                    } else {
                                        0.0
                                    };
                                let (a, c) = (a.to_f64(), c.to_f64());
                                assert!(
                                    (a - c).abs() <= tol,
                                    "{kernel:?} {dtype:?} {:?} m={m} k={k} n={n} [{t}][{j}]: {a} vs {c}",
                                    T::PRECISION
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn linear_matches_reference_f64() {
        check_all::<f64>(1e-14);
    }

    #[test]
    fn linear_matches_reference_f32() {
        check_all::<f32>(1e-5);
    }

    #[test]
    fn linear_matches_reference_bf16() {
        check_all::<Bf16>(1e-5);
    }

    /// Bf16 compute rounds F32 weights to bf16 exactly like `half` (nearest-even ties, overflow
    /// to infinity, NaN stays NaN): one-hot activations pick each weight out unchanged.
    #[test]
    fn bf16_compute_rounds_f32_weights_like_half() {
        let e = f32::EPSILON; // 2^-23; bf16 keeps 7 fraction bits
        let special = [
            1.0 + e * 65536.0, // tie, odd last kept bit: rounds up
            1.0 + e * 32768.0, // tie, even: rounds down
            1.0 + e * 32769.0,
            -(1.0 + e * 98304.0),
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::NAN,
            -0.0,
            3.0e-3,
        ];
        let k = 17;
        let mut vals = vec![0.0f32; special.len() * k];
        for (j, &v) in special.iter().enumerate() {
            vals[j * k] = v;
        }
        let (_d, w) = tensor_from(&vals, vec![special.len(), k], safetensors::Dtype::F32);
        let mut x = vec![Bf16(0.0); k];
        x[0] = Bf16(1.0);
        let r = linear_reference(&x, 1, &w, None);
        for kernel in Kernel::available() {
            let mut out = vec![Bf16(0.0); special.len()];
            linear_with(kernel, PassKind::Prefill, &x, 1, &w, None, &mut out);
            for (a, c) in out.iter().zip(&r) {
                assert!(
                    a.0.to_bits() == c.0.to_bits() || (a.0.is_nan() && c.0.is_nan()),
                    "{kernel:?}: {a:?} vs {c:?}"
                );
            }
        }
    }

    /// The AMX path (a prefill's, so from one token) against [`linear_reference`], Bf16 compute on BF16
    /// weights, with row, token and `k` tails (m, n, k not multiples of 16/16/32) and `k` over
    /// several chunks: raw sums within f32 reordering error, so after the bf16 `.to_act_dtype()` one
    /// bf16 ulp at most (plus the reordering error near a rounding boundary).
    #[test]
    fn amx_matches_reference() {
        if !Kernel::available().contains(&Kernel::Amx) {
            eprintln!("amx_matches_reference: skipped, no AMX-BF16 on this CPU/OS");
            return;
        }
        let shapes = [
            (16, 32),
            (37, 29),
            (48, 96),
            (33, 301),
            (70, 1037),
            (5, 64),
            (64, 896),
        ];
        for (m, k) in shapes {
            let (_d, w) = tensor_from(&pseudo(m * k, 1), vec![m, k], safetensors::Dtype::BF16);
            let mut wd = vec![0f64; m * k];
            f64::decode(w.dtype, w.bytes(), &mut wd);
            let b: Vec<Bf16> = pseudo(m, 3)
                .iter()
                .map(|&v| Bf16(v).to_act_dtype())
                .collect();
            for n in [1, 3, 16, 17, 33, 64] {
                let x: Vec<Bf16> = pseudo(n * k, 2)
                    .iter()
                    .map(|&v| Bf16(v).to_act_dtype())
                    .collect();
                for bias in [None, Some(&b[..])] {
                    let r = linear_reference(&x, n, &w, bias);
                    let mut out = vec![Bf16(f32::NAN); n * m];
                    linear_with(Kernel::Amx, PassKind::Prefill, &x, n, &w, bias, &mut out);
                    for (i, (a, c)) in out.iter().zip(&r).enumerate() {
                        let (t, j) = (i / m, i % m);
                        let scale = abs_sum(
                            &x[t * k..(t + 1) * k],
                            &wd[j * k..(j + 1) * k],
                            bias.map(|b| b[j]),
                        );
                        // One bf16 ulp of the result (8 significant bits) plus reordering.
                        let ulp = c.0.abs().max(a.0.abs()) as f64 / 128.0;
                        let tol = 1e-5 * scale + ulp;
                        let (a, c) = (a.to_f64(), c.to_f64());
                        assert!(
                            (a - c).abs() <= tol,
                            "AMX m={m} k={k} n={n} [{t}][{j}]: {a} vs {c} (tol {tol})"
                        );
                    }
                }
            }
        }
    }

    /// The AMX path's raw f32 sums (no bias, no `.to_act_dtype()`: f32 compute on the same bf16
    /// values would differ, so this compares the packed sums directly) within 1e-5 of the
    /// magnitude of the dot.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_raw_sums_match_f64() {
        if !Kernel::available().contains(&Kernel::Amx) {
            eprintln!("amx_raw_sums_match_f64: skipped, no AMX-BF16 on this CPU/OS");
            return;
        }
        for (m, k, n) in [(37, 29, 17), (48, 1037, 33), (32, 64, 16)] {
            let (_d, w) = tensor_from(&pseudo(m * k, 5), vec![m, k], safetensors::Dtype::BF16);
            let mut wd = vec![0f64; m * k];
            f64::decode(w.dtype, w.bytes(), &mut wd);
            let x: Vec<f32> = pseudo(n * k, 6)
                .iter()
                .map(|&v| Bf16(v).to_act_dtype().0)
                .collect();
            let p = amx::Packed::new(&x, n, k);
            let mut out = vec![f32::NAN; n * m];
            // SAFETY: AMX available; shapes as `amx::sums` requires; one caller.
            let raw = amx::Finish::Raw;
            let rest = unsafe { amx::sums(&p, n, k, w.bytes(), m, 0..m, out.as_mut_ptr(), raw) };
            assert_eq!(rest, m / 16 * 16..m);
            for t in 0..n {
                for j in 0..rest.start {
                    let (mut s, mut scale) = (0f64, 0f64);
                    for i in 0..k {
                        let p = x[t * k + i] as f64 * wd[j * k + i];
                        s += p;
                        scale += p.abs();
                    }
                    let a = out[t * m + j] as f64;
                    assert!(
                        (a - s).abs() <= 1e-5 * scale,
                        "m={m} k={k} n={n} [{t}][{j}]: {a} vs {s}"
                    );
                }
            }
        }
    }

    /// The AVX512_BF16 path's raw f32 sums bit for bit against
    /// [`avx512_bf16::sums_emulated`] (the instruction's documented per-lane order and the
    /// kernel's reduction tree in plain Rust), with row, token and `k` tails, `k` over several
    /// chunks, and within 1e-5 of the magnitude of the exact (f64) dot.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_bf16_sums_match_emulation() {
        if !Kernel::available().contains(&Kernel::Avx512Bf16) {
            eprintln!("avx512_bf16_sums_match_emulation: skipped, not used on this CPU");
            return;
        }
        for (m, k, n) in [
            (37, 29, 17),
            (48, 1037, 13),
            (8, 2100, 7),
            (5, 64, 1),
            (25, 2100, 1),
            (12, 896, 6),
            (9, 100, 70),
        ] {
            let (_d, w) = tensor_from(&pseudo(m * k, 5), vec![m, k], safetensors::Dtype::BF16);
            let mut wd = vec![0f32; m * k];
            f32::decode(w.dtype, w.bytes(), &mut wd);
            let x: Vec<f32> = pseudo(n * k, 6)
                .iter()
                .map(|&v| Bf16(v).to_act_dtype().0)
                .collect();
            let p = avx512_bf16::Packed::new(&x, n, k);
            let mut out = vec![f32::NAN; n * m];
            // SAFETY: the kernel is available; shapes as `avx512_bf16::sums` requires; one caller.
            unsafe { avx512_bf16::sums(&p, n, k, w.bytes(), m, 0..m, out.as_mut_ptr()) };
            let want = avx512_bf16::sums_emulated(&x, n, k, &wd, m);
            for t in 0..n {
                for j in 0..m {
                    let (a, e) = (out[t * m + j], want[t * m + j]);
                    assert_eq!(
                        a.to_bits(),
                        e.to_bits(),
                        "m={m} k={k} n={n} [{t}][{j}]: {a} vs {e}"
                    );
                    let (mut s, mut scale) = (0f64, 0f64);
                    for i in 0..k {
                        let p = x[t * k + i] as f64 * wd[j * k + i] as f64;
                        s += p;
                        scale += p.abs();
                    }
                    assert!(
                        (a as f64 - s).abs() <= 1e-5 * scale,
                        "[{t}][{j}]: {a} vs {s}"
                    );
                }
            }
        }
    }

    /// One to three tokens' sums from the 12-bit coded matrix ([`crate::weights::bf16_coded`]),
    /// in bf16 and in f32 compute, are the stored matrix's bit for bit: every decode row group (12, 8, 4, 1), `k` tails, several
    /// chunks, and values whose high byte is outside the table (huge, tiny, infinite), whose
    /// sums must come out the same too; and `linear` takes the coded path once it exists.
    /// `linear_with` on a coded matrix `w` and its uncoded copy `fresh`, on every kernel choice
    /// with a decode path (`vdpbf16ps` on AMD, the widening FMA kernel elsewhere), `n` tokens of
    /// `x`: the same bits; returns the coded outputs of the last such kernel.
    fn coded_as_stored<T: Float + Default>(
        x: &[T],
        n: usize,
        (w, fresh): (&Tensor, &Tensor),
        label: &str,
    ) -> Vec<T> {
        let m = w.shape[0];
        let bits = |v: &[T]| v.iter().map(|v| v.to_f64().to_bits()).collect::<Vec<_>>();
        let mut last = Vec::new();
        for kernel in Kernel::available() {
            if matches!(kernel, Kernel::Portable | Kernel::Avx2) {
                continue;
            }
            let (mut a, mut b) = (vec![T::default(); n * m], vec![T::default(); n * m]);
            linear_with(kernel, PassKind::Prefill, x, n, w, None, &mut a);
            linear_with(kernel, PassKind::Prefill, x, n, fresh, None, &mut b);
            assert_eq!(bits(&a), bits(&b), "{label} {kernel:?} n={n}");
            last = a;
        }
        last
    }

    /// Where escapes are rare, most bands of the coding have none and the kernels skip looking
    /// for them ([`crate::weights::bf16_coded::Bf16Coded::band_escapes`]): the sums are still
    /// the stored matrix's, in the bands with an escape and in those without, bf16 and f32
    /// compute, one to three tokens.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn coded_sums_skip_looking_for_escapes_only_where_there_are_none() {
        if !coded_avx512::readable() {
            eprintln!("coded_sums_skip_looking_for_escapes: skipped, not used on this CPU");
            return;
        }
        let (m, k) = (40, 1000);
        // Values of exactly 15 high bytes (sign and the exponent's first 7 bits: 8 pairs of
        // binades positive, 7 negative), all in the table, then three escapes.
        let mut vals: Vec<f32> = pseudo(m * k, 31)
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let pair = (i * 7 + (v.abs() * 1e4) as usize) % 15;
                let (sign, pair) = if pair < 8 {
                    (1.0, pair)
                } else {
                    (-1.0, pair - 8)
                };
                let exp = 2 * pair as i32 - 7 + (i % 2) as i32;
                sign * 2f32.powi(exp) * (1.0 + 0.99 * v.abs().fract())
            })
            .collect();
        for (at, v) in [
            (5, 3.0e30f32),
            (8 * k + 700, -1.0e-30),
            (37 * k + 999, 7.0e20),
        ] {
            vals[at] = v;
        }
        let (_d, w) = tensor_from(&vals, vec![m, k], safetensors::Dtype::BF16);
        let (_d2, fresh) = tensor_from(&vals, vec![m, k], safetensors::Dtype::BF16);
        assert!(w.code_bf16());
        let c = w.coded().unwrap();
        assert_eq!(c.escapes(), 3);
        let flagged = (0..m)
            .step_by(8)
            .flat_map(|r| (0..c.groups()).map(move |g| (r, g)))
            .filter(|&(r, g)| c.band_escapes(r, g))
            .count();
        assert_eq!(flagged, 3);
        for n in 1..=CODED_MAX_TOKENS {
            let x: Vec<f32> = pseudo(n * k, 40 + n as u64);
            let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(Bf16(v).to_act_dtype().0)).collect();
            coded_as_stored(&xb, n, (&w, &fresh), "bf16");
            let a = coded_as_stored(&x, n, (&w, &fresh), "f32");
            // The escapes reach the outputs: rows 0 and 37 are huge there.
            assert!(a[37].abs() > 1e15 && a[0].abs() > 1e25, "n={n}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn coded_bf16_sums_are_the_stored_sums() {
        if !coded_avx512::readable() {
            eprintln!("coded_bf16_sums_are_the_stored_sums: skipped, not used on this CPU");
            return;
        }
        for (m, k) in [
            (25, 2100),
            (37, 29),
            (13, 896),
            (1, 32),
            (44, 1056),
            (9, 4864),
        ] {
            let mut vals = pseudo(m * k, 11);
            for (i, v) in vals.iter_mut().enumerate() {
                match i % 53 {
                    // 40 binades from 2^-20 to 2^19, each rare: outside the table.
                    0 => {
                        *v = 2f32.powi((i / 53 % 40) as i32 - 20)
                            * if i % 2 == 0 { 1.0 } else { -1.0 }
                    }
                    1 if i % 2 == 0 => *v = -1.0e-30,
                    2 if i % 7 == 0 => *v = f32::INFINITY,
                    _ => {}
                }
            }
            let (_d, w) = tensor_from(&vals, vec![m, k], safetensors::Dtype::BF16);
            let (_d2, fresh) = tensor_from(&vals, vec![m, k], safetensors::Dtype::BF16);
            assert!(w.code_bf16());
            let c = w.coded().unwrap();
            assert!(c.escapes() > 0 || m * k < 2000, "m={m} k={k}: no escapes");
            for n in 1..=avx512_bf16::CODED_MAX_TOKENS {
                let x: Vec<f32> = pseudo(n * k, 12 + n as u64)
                    .iter()
                    .map(|&v| Bf16(v).to_act_dtype().0)
                    .collect();
                let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(v)).collect();
                if avx512_bf16::available() {
                    let p = avx512_bf16::Packed::new(&x, n, k);
                    let (mut plain, mut coded) = (vec![f32::NAN; n * m], vec![f32::NAN; n * m]);
                    // SAFETY: the kernels are available; shapes as they require; one caller.
                    unsafe {
                        avx512_bf16::sums(&p, n, k, w.bytes(), m, 0..m, plain.as_mut_ptr());
                        avx512_bf16::sums_coded(&p, n, k, c, 0..m, coded.as_mut_ptr());
                    }
                    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&coded), bits(&plain), "m={m} k={k} n={n}");
                    assert!(plain.iter().any(|v| !v.is_finite()) || k < 100);
                    // Rows in pieces, some starting and ending inside a tile of the coding:
                    // the same sums.
                    let mut pieces = vec![f32::NAN; n * m];
                    let cuts = [0, 5.min(m), 21.min(m), 32.min(m), m];
                    for r in cuts
                        .windows(2)
                        .map(|c| c[0]..c[1])
                        .filter(|r| !r.is_empty())
                    {
                        // SAFETY: as above; the pieces are disjoint.
                        unsafe { avx512_bf16::sums_coded(&p, n, k, c, r, pieces.as_mut_ptr()) };
                    }
                    assert_eq!(bits(&pieces), bits(&plain), "pieces m={m} k={k} n={n}");
                }
                // Through `linear` (the coded path for a decode step's few tokens) in bf16
                // compute: the same outputs as an uncoded copy.
                let a = coded_as_stored(&xb, n, (&w, &fresh), &format!("bf16 m={m} k={k}"));
                assert!(a.iter().any(|v| !v.0.is_finite()) || k < 100);
                // f32 compute (the f32 and bf16w tiers) reads the coding through the widening
                // FMA kernel, on either kernel choice that runs it: the stored matrix's bits.
                let xf = pseudo(n * k, 20 + n as u64);
                coded_as_stored(&xf, n, (&w, &fresh), &format!("f32 m={m} k={k}"));
                // Its rows in pieces, some starting and ending inside a tile of the coding.
                let mut plain = vec![f32::NAN; n * m];
                let mut pieces = vec![f32::NAN; n * m];
                let cuts = [0, 5.min(m), 21.min(m), 32.min(m), m];
                // SAFETY: AVX-512 is present where the coding is read; shapes as the kernels
                // require; the pieces are disjoint; one caller.
                unsafe {
                    avx512::sums_fma::<avx512::Bf16W>(
                        &xf,
                        n,
                        k,
                        w.bytes(),
                        m,
                        0..m,
                        plain.as_mut_ptr(),
                    );
                    for r in cuts
                        .windows(2)
                        .map(|c| c[0]..c[1])
                        .filter(|r| !r.is_empty())
                    {
                        avx512::sums_coded(&xf, n, k, c, r, pieces.as_mut_ptr());
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&pieces), bits(&plain), "f32 pieces m={m} k={k} n={n}");
            }
        }
    }

    /// A prefill on a matrix whose coding replaced its stored bytes
    /// ([`Tensor::replace_stored_by_coding`]) rebuilds the coding block by block
    /// (`avx512_bf16::sums_rebuilt`): the stored sums bit for bit, for one token to more than a
    /// token group, rows past one 128-row block and in pieces, `k` tails and several chunks,
    /// escaped values. And `linear` reads the coding once it replaces the bytes: with the file's
    /// bytes overwritten by zeros after coding, a prefill still gives the matrix's outputs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_prefill_on_a_coding_that_replaced_the_bytes_gives_the_stored_sums() {
        if !avx512_bf16::available() {
            eprintln!(
                "a_prefill_on_a_coding_that_replaced_the_bytes: skipped, not this CPU's kernel"
            );
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (m, k) in [(300, 2100), (37, 29), (131, 896), (9, 4864), (4, 64)] {
            let mut vals = pseudo(m * k, 17 + m as u64);
            for (i, v) in vals.iter_mut().enumerate().filter(|(i, _)| i % 61 == 0) {
                // 40 binades from 2^-20 to 2^19, each rare: outside the table.
                *v = 2f32.powi((i / 61 % 40) as i32 - 20);
            }
            let (dir, w) = tensor_from(&vals, vec![m, k], safetensors::Dtype::BF16);
            let (_d2, fresh) = tensor_from(&vals, vec![m, k], safetensors::Dtype::BF16);
            assert!(w.code_bf16());
            let c = w.coded().unwrap();
            assert!(c.escapes() > 0 || m * k < 2000, "m={m} k={k}: no escapes");
            for n in [1, 2, 4, 7, 13] {
                let x: Vec<f32> = pseudo(n * k, 30 + n as u64)
                    .iter()
                    .map(|&v| Bf16(v).to_act_dtype().0)
                    .collect();
                let p = avx512_bf16::Packed::new(&x, n, k);
                let mut plain = vec![f32::NAN; n * m];
                let mut rebuilt = vec![f32::NAN; n * m];
                let mut pieces = vec![f32::NAN; n * m];
                let cuts = [0, 5.min(m), 130.min(m), 131.min(m), m];
                // SAFETY: the kernels are available; shapes as they require; the pieces are
                // disjoint; one caller.
                unsafe {
                    avx512_bf16::sums(&p, n, k, w.bytes(), m, 0..m, plain.as_mut_ptr());
                    avx512_bf16::sums_rebuilt(&p, n, k, c, 0..m, rebuilt.as_mut_ptr());
                    for r in cuts
                        .windows(2)
                        .map(|c| c[0]..c[1])
                        .filter(|r| !r.is_empty())
                    {
                        avx512_bf16::sums_rebuilt(&p, n, k, c, r, pieces.as_mut_ptr());
                    }
                }
                assert_eq!(bits(&rebuilt), bits(&plain), "m={m} k={k} n={n}");
                assert_eq!(bits(&pieces), bits(&plain), "pieces m={m} k={k} n={n}");
                assert!(plain.iter().any(|v| v.is_finite() && *v != 0.0));
            }
            // The coding replaces the bytes; then the file's bytes (the single tensor's, at the
            // file's end) are overwritten with zeros: a product reading them would sum zeros.
            assert!(w.replace_stored_by_coding() && w.coding_replaces_stored());
            let path = dir.path().join("model.safetensors");
            let len = std::fs::metadata(&path).unwrap().len();
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            use std::io::{Seek, Write};
            f.seek(std::io::SeekFrom::Start(len - (m * k * 2) as u64))
                .unwrap();
            f.write_all(&vec![0u8; m * k * 2]).unwrap();
            drop(f);
            assert!(
                w.bytes().iter().all(|&b| b == 0),
                "the mapping sees the zeros"
            );
            for n in [5, 16] {
                let xb: Vec<Bf16> = pseudo(n * k, 50 + n as u64)
                    .iter()
                    .map(|&v| Bf16(Bf16(v).to_act_dtype().0))
                    .collect();
                let (mut a, mut b) = (vec![Bf16::default(); n * m], vec![Bf16::default(); n * m]);
                linear_with(
                    Kernel::Avx512Bf16,
                    PassKind::Prefill,
                    &xb,
                    n,
                    &w,
                    None,
                    &mut a,
                );
                linear_with(
                    Kernel::Avx512Bf16,
                    PassKind::Prefill,
                    &xb,
                    n,
                    &fresh,
                    None,
                    &mut b,
                );
                let b64 = |v: &[Bf16]| v.iter().map(|v| v.0.to_bits()).collect::<Vec<_>>();
                assert_eq!(b64(&a), b64(&b), "linear m={m} k={k} n={n}");
                assert!(b.iter().any(|v| v.0 != 0.0));
                // On AMX, whose tiles read stored bytes, a prefill on the replaced matrix
                // rebuilds the coding as well (the zeros would give zeros).
                if Kernel::Amx.runs_here() {
                    let mut c = vec![Bf16::default(); n * m];
                    linear_with(Kernel::Amx, PassKind::Prefill, &xb, n, &w, None, &mut c);
                    assert_eq!(b64(&c), b64(&b), "AMX linear m={m} k={k} n={n}");
                }
            }
        }
    }

    /// On AMX, a decode pass's bf16 products are `vdpbf16ps`'s ([`Kernel::Avx512Bf16`]) bit for
    /// bit, on the stored bytes for any number of tokens and on the 12-bit coding for one to
    /// three, while a prefill's stay on the tiles. Each row's second half is its first negated
    /// and each token's halves alike, so every exact dot is 0 and an output is what the
    /// kernel's order of adding leaves over: another order (the tiles', the FMA kernel's) shows
    /// in the bf16 outputs, where a last-bit difference of a sum of normal size would mostly
    /// round away.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_decode_pass_on_amx_sums_in_pairs() {
        if !Kernel::Amx.runs_here() {
            eprintln!("a_decode_pass_on_amx_sums_in_pairs: skipped, no AMX on this CPU");
            return;
        }
        assert!(Kernel::Amx.decodes_in_pairs());
        let b64 = |v: &[Bf16]| v.iter().map(|v| v.0.to_bits()).collect::<Vec<_>>();
        // `v`'s rows of `k` with each second half the first half times `sign`.
        let halves = |v: Vec<f32>, k: usize, sign: f32| -> Vec<f32> {
            let mut v = v;
            for row in v.chunks_mut(k) {
                let (a, b) = row.split_at_mut(k / 2);
                for (b, a) in b.iter_mut().zip(a.iter()) {
                    *b = sign * *a;
                }
            }
            v
        };
        for (m, k) in [(37, 1030), (131, 896), (20, 2100)] {
            let vals = halves(pseudo(m * k, 61 + m as u64), k, -1.0);
            let (_d, stored) = tensor_from(&vals, vec![m, k], safetensors::Dtype::BF16);
            let (_d2, coded) = tensor_from(&vals, vec![m, k], safetensors::Dtype::BF16);
            assert!(coded.code_bf16());
            let mut tiles_differ = false;
            for n in [1, 2, 3, 4, 12] {
                let x: Vec<Bf16> = halves(pseudo(n * k, 70 + n as u64), k, 1.0)
                    .iter()
                    .map(|&v| Bf16(Bf16(v).to_act_dtype().0))
                    .collect();
                let run = |kernel, kind, w: &Tensor| {
                    let mut out = vec![Bf16::default(); n * m];
                    linear_with(kernel, kind, &x, n, w, None, &mut out);
                    b64(&out)
                };
                let pairs = run(Kernel::Avx512Bf16, PassKind::Decode, &stored);
                let what = format!("m={m} k={k} n={n}");
                assert_eq!(run(Kernel::Amx, PassKind::Decode, &stored), pairs, "{what}");
                assert_eq!(
                    run(Kernel::Amx, PassKind::Decode, &coded),
                    pairs,
                    "coded {what}"
                );
                assert_ne!(
                    run(Kernel::Avx512, PassKind::Decode, &stored),
                    pairs,
                    "{what}"
                );
                if n > 1 {
                    tiles_differ |= run(Kernel::Amx, PassKind::Prefill, &stored) != pairs;
                }
            }
            assert!(tiles_differ, "m={m} k={k}: the tiles gave vdpbf16ps's bits");
        }
    }

    /// The SIMD kernels' sums do not depend on the tile shape or loop order: every token of a
    /// product of several tokens (tiles of several tokens, the prefill loop order) gets bit for
    /// bit what it gets alone (one-token tiles, the decode order), on row, token and `k` tails,
    /// in either kind of pass (on AMX: the tiles for a prefill's, whatever its token count).
    #[test]
    fn simd_sums_do_not_depend_on_batch() {
        let kernels: Vec<Kernel> = Kernel::available()
            .into_iter()
            .filter(|k| {
                matches!(
                    k,
                    Kernel::Avx2 | Kernel::Avx512 | Kernel::Avx512Bf16 | Kernel::Amx
                )
            })
            .collect();
        assert!(
            cfg!(not(target_arch = "x86_64")) || !kernels.is_empty(),
            "an x86-64 CPU without AVX2: no SIMD kernel to check"
        );
        for dtype in [safetensors::Dtype::F32, safetensors::Dtype::BF16] {
            for (m, k) in [(37, 29), (9, 301), (11, 1037)] {
                let (_d, w) = tensor_from(&pseudo(m * k, 8), vec![m, k], dtype);
                let n = 17;
                let x: Vec<f32> = pseudo(n * k, 9);
                let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(v).to_act_dtype()).collect();
                let runs = kernels
                    .iter()
                    .flat_map(|&k| [(k, PassKind::Prefill), (k, PassKind::Decode)]);
                for (kernel, kind) in runs {
                    let mut all = vec![0f32; n * m];
                    linear_with(kernel, kind, &x, n, &w, None, &mut all);
                    let mut allb = vec![Bf16(0.0); n * m];
                    linear_with(kernel, kind, &xb, n, &w, None, &mut allb);
                    for t in 0..n {
                        let (x1, xb1) = (&x[t * k..(t + 1) * k], &xb[t * k..(t + 1) * k]);
                        let mut one = vec![0f32; m];
                        linear_with(kernel, kind, x1, 1, &w, None, &mut one);
                        let mut oneb = vec![Bf16(0.0); m];
                        linear_with(kernel, kind, xb1, 1, &w, None, &mut oneb);
                        for j in 0..m {
                            let (a, b) = (all[t * m + j], one[j]);
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{kernel:?} {kind:?} {dtype:?} m={m} k={k} [{t}][{j}]"
                            );
                            let (a, b) = (allb[t * m + j].0, oneb[j].0);
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{kernel:?} {kind:?} {dtype:?} bf16 m={m} k={k} [{t}][{j}]"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Several weights in one call (q/k/v-like shapes, with and without biases, BF16 and F32
    /// weights mixed) give each output exactly what its own `linear` call gives, in every
    /// compute type, for prefill and one-token shapes.
    #[test]
    fn linear_many_is_each_linear() {
        fn check<T: Float>() {
            let k = 96;
            let shapes = [
                (70, safetensors::Dtype::BF16),
                (16, safetensors::Dtype::F32),
                (5, safetensors::Dtype::BF16),
            ];
            let ws: Vec<_> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(m, dt))| tensor_from(&pseudo(m * k, 20 + i as u64), vec![m, k], dt))
                .collect();
            let biases: Vec<Vec<T>> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(m, _))| {
                    pseudo(m, 30 + i as u64)
                        .iter()
                        .map(|&v| T::from_f64(v as f64).to_act_dtype())
                        .collect()
                })
                .collect();
            let runs = [1, 9]
                .into_iter()
                .flat_map(|n| [(n, PassKind::Prefill), (n, PassKind::Decode)]);
            for (n, kind) in runs {
                let x: Vec<T> = pseudo(n * k, 40)
                    .iter()
                    .map(|&v| T::from_f64(v as f64).to_act_dtype())
                    .collect();
                let mut outs: Vec<Vec<T>> =
                    shapes.iter().map(|&(m, _)| vec![T::ZERO; n * m]).collect();
                let mut products: Vec<Product<'_, T>> = outs
                    .iter_mut()
                    .zip(&ws)
                    .zip(&biases)
                    .enumerate()
                    .map(|(i, ((out, (_d, w)), b))| Product {
                        w,
                        bias: (i != 1).then_some(&b[..]),
                        out,
                    })
                    .collect();
                linear_many(kind, &x, n, &mut products);
                for (i, ((_d, w), out)) in ws.iter().zip(&outs).enumerate() {
                    let mut one = vec![T::ZERO; out.len()];
                    linear(kind, &x, n, w, (i != 1).then_some(&biases[i][..]), &mut one);
                    let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
                    let what = format!("{:?} {kind:?} n={n} weight {i}", T::PRECISION);
                    assert_eq!(bits(out), bits(&one), "{what}");
                }
            }
        }
        check::<f64>();
        check::<f32>();
        check::<Bf16>();
    }

    /// The fused gate/up/SwiGLU gives exactly what the two products and the activation give
    /// apart, in every compute type (the single AMX pass in bf16 where this CPU has AMX), on
    /// prefill and one-token shapes, `k` with and without a tail, a NaN input included.
    #[test]
    fn linear_swiglu_is_the_products_then_the_activation() {
        fn check<T: Float>() {
            for (k, m) in [(96, 48), (109, 32), (64, 40)] {
                let (_dg, gate) =
                    tensor_from(&pseudo(m * k, 50), vec![m, k], safetensors::Dtype::BF16);
                let (_du, up) =
                    tensor_from(&pseudo(m * k, 51), vec![m, k], safetensors::Dtype::BF16);
                let runs = [1, 9, 40]
                    .into_iter()
                    .flat_map(|n| [(n, PassKind::Prefill), (n, PassKind::Decode)]);
                for (n, kind) in runs {
                    let mut x: Vec<T> = pseudo(n * k, 52)
                        .iter()
                        .map(|&v| T::from_f64(30.0 * v as f64).to_act_dtype())
                        .collect();
                    x[(n / 2) * k + 3] = T::from_f64(f64::NAN);
                    // NaN where nothing was written, so an output left out shows.
                    let nan = T::from_f64(f64::NAN);
                    let (mut act, mut up_out) = (vec![nan; n * m], vec![T::ZERO; n * m]);
                    linear_swiglu(kind, &x, n, &gate, &up, &mut act, &mut up_out);
                    for (t, row) in act.chunks_exact(m).enumerate() {
                        assert!(
                            t == n / 2 || row.iter().all(|v| v.to_f64().is_finite()),
                            "{:?} {kind:?} k={k} m={m} n={n}: token {t} has an output not written",
                            T::PRECISION
                        );
                    }
                    let (mut g, mut u) = (vec![T::ZERO; n * m], vec![T::ZERO; n * m]);
                    linear(kind, &x, n, &gate, None, &mut g);
                    linear(kind, &x, n, &up, None, &mut u);
                    crate::kernels::activation::silu_mul_reference(&mut g, &u);
                    let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
                    assert!(
                        act[(n / 2) * m].to_f64().is_nan(),
                        "the NaN reaches its token"
                    );
                    let what = format!("{:?} {kind:?} k={k} m={m} n={n}", T::PRECISION);
                    assert_eq!(bits(&act), bits(&g), "{what}");
                }
            }
        }
        check::<f64>();
        check::<f32>();
        check::<Bf16>();
    }

    #[test]
    fn linear_handles_empty_inputs() {
        let (_d, w) = tensor_from(&pseudo(6, 1), vec![3, 2], safetensors::Dtype::BF16);
        let mut out: Vec<f32> = vec![];
        linear(PassKind::Prefill, &[], 0, &w, None, &mut out);
    }
}
