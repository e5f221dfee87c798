//! Numeric kernels of the forward pass, each small and testable on its own, with a plain
//! reference version beside each optimized one (in the spirit of llama2.c).
//!
//! Kernels are generic over the compute type [`Float`] (`f32` or `f64`). Weights stay in their
//! stored dtype ([`crate::weights::Tensor`]) and are decoded row by row inside the kernels, so a
//! faster bf16 kernel can replace a plain one without touching the model code.

pub mod activation;
pub mod attention;
pub mod expf;
pub mod line_aligned;
pub mod matmul;
pub mod norm;
pub mod quant;
pub mod rope;
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd512;

use crate::weights::StoredDtype;
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

pub use lockstep_trace::Precision;

/// Runs `$body` with the type alias `$T` set to the compute type of a [`Precision`] (`f64`,
/// `f32` or [`Bf16`]): the one place a precision chosen at run time becomes a [`Float`] type.
///
/// ```
/// use lockstep_engine::{with_float, Float, Precision};
/// fn zero<T: Float>() -> f64 {
///     T::ZERO.to_f64()
/// }
/// assert_eq!(with_float!(Precision::BF16, T => zero::<T>()), 0.0);
/// ```
#[macro_export]
macro_rules! with_float {
    ($precision:expr, $T:ident => $body:expr) => {
        match $precision {
            $crate::Precision::F64 => {
                type $T = f64;
                $body
            }
            $crate::Precision::F32 => {
                type $T = f32;
                $body
            }
            $crate::Precision::BF16 => {
                type $T = $crate::Bf16;
                $body
            }
        }
    };
}

/// A compute type for the kernels: `f32`, `f64`, or [`Bf16`] (bf16 activations).
pub trait Float:
    Copy
    + Send
    + Sync
    + Default
    + Debug
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    /// The precision this type computes in.
    const PRECISION: Precision;
    /// How a KV cache holds this type's keys and values: the type itself, or for [`Bf16`] the
    /// bf16 value alone (half the bytes; [`attention::KvElement`]).
    type Kv: attention::KvElement<Self>;
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Negative infinity.
    const NEG_INFINITY: Self;
    /// Converts from f64 (rounding to nearest for f32).
    fn from_f64(x: f64) -> Self;
    /// Widens to f64 (exact).
    fn to_f64(self) -> f64;
    /// e^self.
    fn exp(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Rounds to the activation dtype: bf16 for [`Bf16`], the identity otherwise. Kernels call it
    /// exactly where PyTorch materializes a tensor in the model dtype.
    #[inline(always)]
    fn to_act_dtype(self) -> Self {
        self
    }
    /// Decodes little-endian values stored as `dtype` into `out` (`out.len()` elements).
    fn decode(dtype: StoredDtype, bytes: &[u8], out: &mut [Self]);
    /// Writes values into a trace tensor of this precision.
    fn to_trace(v: Vec<Self>) -> lockstep_trace::TensorData;
    /// The `f32` values a slice of this type holds, for the SIMD matmul kernels: `Some` for
    /// `f32` and [`Bf16`] (an `f32` inside), `None` for `f64`.
    #[inline(always)]
    fn as_f32s(_x: &[Self]) -> Option<&[f32]> {
        None
    }
    /// `p` as a pointer to the `f32` it holds, when this type is `f32` or [`Bf16`] (as
    /// [`Float::as_f32s`]); `None` for `f64`.
    #[inline(always)]
    fn f32_ptr(_p: *mut Self) -> Option<*mut f32> {
        None
    }
    /// `o[j] = (o[j] + bias[j]).to_act_dtype()` for a whole row of matmul outputs (types may
    /// override it with a faster loop computing the same values).
    #[inline]
    fn add_bias_to_act_dtype(o: &mut [Self], bias: Option<&[Self]>) {
        match bias {
            Some(b) => o
                .iter_mut()
                .zip(b)
                .for_each(|(o, &b)| *o = (*o + b).to_act_dtype()),
            None => o.iter_mut().for_each(|o| *o = o.to_act_dtype()),
        }
    }
}

impl Float for f64 {
    const PRECISION: Precision = Precision::F64;
    type Kv = f64;
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn decode(dtype: StoredDtype, bytes: &[u8], out: &mut [Self]) {
        decode_with(dtype, bytes, out, |x| x as f64, |x| x)
    }
    fn to_trace(v: Vec<Self>) -> lockstep_trace::TensorData {
        lockstep_trace::TensorData::F64(v)
    }
}

impl Float for f32 {
    const PRECISION: Precision = Precision::F32;
    type Kv = f32;
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn decode(dtype: StoredDtype, bytes: &[u8], out: &mut [Self]) {
        decode_with(dtype, bytes, out, |x| x, |x| x as f32)
    }
    fn to_trace(v: Vec<Self>) -> lockstep_trace::TensorData {
        lockstep_trace::TensorData::F32(v)
    }
    #[inline(always)]
    fn as_f32s(x: &[Self]) -> Option<&[f32]> {
        Some(x)
    }
    #[inline(always)]
    fn f32_ptr(p: *mut Self) -> Option<*mut f32> {
        Some(p)
    }
}

/// bf16 activations: values held in an `f32` (arithmetic in f32, as PyTorch's bf16 kernels
/// accumulate in f32) and rounded to bf16 by [`Float::to_act_dtype`] at the model's rounding points.
///
/// `repr(transparent)`: a `[Bf16]` may be read as the `[f32]` it holds (the matmul kernels do).
#[derive(Debug, Clone, Copy, Default, PartialEq, PartialOrd)]
#[repr(transparent)]
pub struct Bf16(pub f32);

macro_rules! bf16_op {
    ($tr:ident, $f:ident, $op:tt) => {
        impl $tr for Bf16 {
            type Output = Bf16;
            #[inline(always)]
            fn $f(self, o: Bf16) -> Bf16 {
                Bf16(self.0 $op o.0)
            }
        }
    };
}
bf16_op!(Add, add, +);
bf16_op!(Sub, sub, -);
bf16_op!(Mul, mul, *);
bf16_op!(Div, div, /);

impl Neg for Bf16 {
    type Output = Bf16;
    #[inline(always)]
    fn neg(self) -> Bf16 {
        Bf16(-self.0)
    }
}

impl AddAssign for Bf16 {
    #[inline(always)]
    fn add_assign(&mut self, o: Bf16) {
        self.0 += o.0;
    }
}

impl Float for Bf16 {
    const PRECISION: Precision = Precision::BF16;
    type Kv = half::bf16;
    const ZERO: Self = Bf16(0.0);
    const ONE: Self = Bf16(1.0);
    const NEG_INFINITY: Self = Bf16(f32::NEG_INFINITY);
    fn from_f64(x: f64) -> Self {
        Bf16(x as f32)
    }
    fn to_f64(self) -> f64 {
        self.0 as f64
    }
    fn exp(self) -> Self {
        Bf16(self.0.exp())
    }
    fn sqrt(self) -> Self {
        Bf16(self.0.sqrt())
    }
    #[inline(always)]
    fn to_act_dtype(self) -> Self {
        // `half::bf16::from_f32(v).to_f32()`, bit for bit (tested), without its branches.
        Bf16(round_bf16_branch_free(self.0))
    }
    fn decode(dtype: StoredDtype, bytes: &[u8], out: &mut [Self]) {
        // Weights are used as stored; an f32/f64 checkpoint is rounded to bf16 like
        // `from_pretrained(dtype=torch.bfloat16)` does (BF16 ones are bf16 values already).
        let from32 = match dtype {
            StoredDtype::BF16 => Bf16,
            _ => |x| Bf16(x).to_act_dtype(),
        };
        decode_with(dtype, bytes, out, from32, |x| Bf16(x as f32).to_act_dtype())
    }
    fn to_trace(v: Vec<Self>) -> lockstep_trace::TensorData {
        lockstep_trace::TensorData::F32(v.into_iter().map(|x| x.0).collect())
    }
    #[inline(always)]
    fn as_f32s(x: &[Self]) -> Option<&[f32]> {
        Some(Bf16::slice_as_f32(x))
    }
    #[inline(always)]
    fn f32_ptr(p: *mut Self) -> Option<*mut f32> {
        Some(p.cast())
    }
    /// A branch-free copy of [`Float::to_act_dtype`] that vectorizes (the scalar `half` call
    /// took longer than the AMX sums themselves).
    #[inline]
    fn add_bias_to_act_dtype(o: &mut [Self], bias: Option<&[Self]>) {
        let (o, b) = (Bf16::slice_as_f32_mut(o), bias.map(Bf16::slice_as_f32));
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has the features the function is compiled with.
            return unsafe { add_bias_round_bf16_avx512(o, b) };
        }
        add_bias_round_bf16(o, b)
    }
}

/// `o[i] = round_bf16(o[i] + bias[i])` (or of `o[i]` alone), element by element.
#[inline(always)]
fn add_bias_round_bf16(o: &mut [f32], bias: Option<&[f32]>) {
    match bias {
        Some(b) => o
            .iter_mut()
            .zip(b)
            .for_each(|(o, &b)| *o = round_bf16_branch_free(*o + b)),
        None => o.iter_mut().for_each(|o| *o = round_bf16_branch_free(*o)),
    }
}

/// [`add_bias_round_bf16`] compiled for AVX-512 (sixteen lanes, the same operations).
///
/// # Safety
/// The CPU has AVX-512F/BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn add_bias_round_bf16_avx512(o: &mut [f32], bias: Option<&[f32]>) {
    add_bias_round_bf16(o, bias)
}

impl Bf16 {
    /// The `f32` values a `[Bf16]` holds, read in place.
    #[inline(always)]
    fn slice_as_f32(x: &[Bf16]) -> &[f32] {
        // SAFETY: Bf16 is a repr(transparent) f32, so the slices have the same layout.
        unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) }
    }

    /// [`Bf16::slice_as_f32`], writable.
    #[inline(always)]
    fn slice_as_f32_mut(x: &mut [Bf16]) -> &mut [f32] {
        // SAFETY: as `slice_as_f32`; the borrow of `x` moves to the result.
        unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len()) }
    }
}

/// `half::bf16::from_f32(v).to_f32()` without branches: nearest-even at bit 16 (overflow to
/// infinity), a NaN kept NaN with its quiet bit set.
#[inline(always)]
pub(crate) fn round_bf16_branch_free(v: f32) -> f32 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1));
    let nan = b & 0x7FFF_FFFF > 0x7F80_0000;
    f32::from_bits(if nan { b | 0x0040_0000 } else { rounded } & 0xFFFF_0000)
}

/// Shared decoding: 16-bit and 32-bit formats go through f32 (exact), f64 through `from64`.
fn decode_with<T>(
    dtype: StoredDtype,
    bytes: &[u8],
    out: &mut [T],
    from32: impl Fn(f32) -> T,
    from64: impl Fn(f64) -> T,
) {
    assert_eq!(
        Some(bytes.len()),
        dtype.bytes_for(out.len()),
        "decode length mismatch"
    );
    match dtype {
        d if d.is_block() => {
            // Whole blocks through an f32 buffer (exactly the values a GGUF dequantized to F32
            // holds), then as F32 weights are.
            let (per, bb) = quant::block(d);
            let mut vals = [0f32; 256];
            for (b, o) in bytes.chunks(bb * (256 / per)).zip(out.chunks_mut(256)) {
                quant::decode_blocks(d, b, &mut vals[..o.len()]);
                for (o, &v) in o.iter_mut().zip(&vals) {
                    *o = from32(v);
                }
            }
        }
        StoredDtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = from32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
        }
        StoredDtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = from32(f32::from_bits(
                    (u16::from_le_bytes([c[0], c[1]]) as u32) << 16,
                ));
            }
        }
        StoredDtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = from32(half::f16::from_le_bytes([c[0], c[1]]).to_f32());
            }
        }
        StoredDtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = from64(f64::from_le_bytes(c.try_into().unwrap()));
            }
        }
        _ => unreachable!("block dtypes above"),
    }
}

/// Decodes a whole 1-D weight (norm weights, biases) into the compute type.
pub fn decode_vec<T: Float>(t: &crate::weights::Tensor) -> Vec<T> {
    let mut v = vec![T::ZERO; t.numel()];
    T::decode(t.dtype, t.bytes(), &mut v);
    v
}

/// Elementwise `a += b` (residual connections), rounded to the activation dtype.
pub fn add_in_place<T: Float>(a: &mut [T], b: &[T]) {
    assert_eq!(a.len(), b.len());
    let add = |a: &mut [T], b: &[T]| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature the function is compiled with.
            return unsafe { add_rounded_avx512(a, b) };
        }
        add_rounded(a, b)
    };
    // A prefill's residual stream (458,752 values at 512 tokens of the 0.5B shape) in chunks on
    // the threads; each value's sum is its own, so the same bits.
    if a.len() >= 2 * ADD_CHUNK {
        crate::team::for_each_chunk_mut(a, ADD_CHUNK, |i, a| {
            add(a, &b[i * ADD_CHUNK..][..a.len()])
        });
    } else {
        add(a, b)
    }
}

/// `a += b` element by element, each sum rounded to the activation dtype (the body of
/// [`add_in_place`]).
#[inline(always)]
fn add_rounded<T: Float>(a: &mut [T], b: &[T]) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x = (*x + y).to_act_dtype();
    }
}

/// [`add_rounded`] compiled for AVX-512: the same element-wise operations on sixteen lanes, so
/// the same bits. A decode step's two residual adds a layer (896 values at the 0.5B shape in
/// bf16) took ~0.9 µs each on x86-64's baseline SSE2 and ~0.6 µs so (by timers that cost ~0.3
/// µs themselves), of ~15 µs of serial work a layer between the step's loops.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_rounded_avx512<T: Float>(a: &mut [T], b: &[T]) {
    add_rounded(a, b)
}

/// Values per task of [`add_in_place`] on the thread pool (128 KiB of f32).
const ADD_CHUNK: usize = 1 << 15;

/// Rounds `x` to the nearest bfloat16 (ties to even) whatever the compute type: a port computing
/// a step in bf16 where it should not (the upcast mistakes of [`crate::faults`]).
#[inline]
pub fn round_bf16<T: Float>(x: T) -> T {
    T::from_f64(half::bf16::from_f64(x.to_f64()).to_f64())
}

/// The dtype a residual add is kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResidualDtype {
    /// The activation dtype, as `transformers` does ([`add_in_place`]).
    Model,
    /// The wrong one, a porting mistake (fault `residual-bf16`): in the f32 and f64 tiers every
    /// residual add is rounded to bf16 (a port whose residual stream stays in bf16 while the rest
    /// computes in float32); in the bf16 tier no residual add is rounded (a port whose residual
    /// stream is float32: its embedding or first sum was upcast and never cast back).
    Wrong,
}

/// The residual add `a += b` in the dtype `dtype` names.
pub fn residual_add<T: Float>(a: &mut [T], b: &[T], dtype: ResidualDtype) {
    match dtype {
        ResidualDtype::Model => add_in_place(a, b),
        ResidualDtype::Wrong => {
            assert_eq!(a.len(), b.len());
            let bf16_tier = T::PRECISION == Precision::BF16;
            for (x, &y) in a.iter_mut().zip(b) {
                *x = if bf16_tier {
                    *x + y
                } else {
                    round_bf16(*x + y)
                };
            }
        }
    }
}

/// Whether `T` holds exactly one `f32` with f32 arithmetic: `f32` itself, or [`Bf16`] (whose
/// `+ - * /` are the f32 operations; only [`Float::to_act_dtype`] rounds).
#[inline(always)]
fn is_f32_inside<T: Float>() -> bool {
    use std::any::TypeId;
    TypeId::of::<T>() == TypeId::of::<f32>() || TypeId::of::<T>() == TypeId::of::<Bf16>()
}

/// `s` as the f32 values it holds when `T` is `f32` or [`Bf16`], for kernels with an f32 fast
/// path of pure f32 arithmetic (the same bits for both types; no rounding to bf16 inside).
#[inline(always)]
pub(crate) fn as_f32<T: Float>(s: &[T]) -> Option<&[f32]> {
    is_f32_inside::<T>()
        // SAFETY: T is f32 or the repr(transparent) Bf16: the layout of f32.
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) })
}

/// [`as_f32`] for a mutable slice.
#[inline(always)]
pub(crate) fn as_f32_mut<T: Float>(s: &mut [T]) -> Option<&mut [f32]> {
    is_f32_inside::<T>()
        // SAFETY: as `as_f32`.
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_stored_dtype_exactly() {
        let vals = [1.5f32, -0.25, 3.0];
        let f32b: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let f16b: Vec<u8> = vals
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let f64b: Vec<u8> = vals
            .iter()
            .flat_map(|&x| (x as f64).to_le_bytes())
            .collect();
        for (dt, b) in [
            (StoredDtype::F32, &f32b),
            (StoredDtype::BF16, &bf),
            (StoredDtype::F16, &f16b),
            (StoredDtype::F64, &f64b),
        ] {
            let mut o = [0f64; 3];
            f64::decode(dt, b, &mut o);
            assert_eq!(o, [1.5, -0.25, 3.0], "{dt:?}");
            let mut o = [0f32; 3];
            f32::decode(dt, b, &mut o);
            assert_eq!(o, vals, "{dt:?}");
        }
    }

    #[test]
    fn residual_in_the_wrong_dtype() {
        // 1 + 2^-10 is not a bf16 value (8 significand bits): it rounds to 1.
        let (a0, b) = ([1.0f64, 0.5], [2f64.powi(-10), 0.25]);
        let mut a = a0;
        residual_add(&mut a, &b, ResidualDtype::Model);
        assert_eq!(a, [1.0 + 2f64.powi(-10), 0.75], "f64: exact");
        let mut a = a0;
        residual_add(&mut a, &b, ResidualDtype::Wrong);
        assert_eq!(a, [1.0, 0.75], "f64 with the fault: rounded to bf16");
        let mut a = a0.map(|x| x as f32);
        residual_add(&mut a, &b.map(|x| x as f32), ResidualDtype::Wrong);
        assert_eq!(a, [1.0, 0.75], "f32 with the fault: rounded to bf16");
        // The bf16 tier: careful rounds to bf16, the fault keeps float32.
        let (a0, b) = (a0.map(|x| Bf16(x as f32)), b.map(|x| Bf16(x as f32)));
        let mut a = a0;
        residual_add(&mut a, &b, ResidualDtype::Model);
        assert_eq!(a, [Bf16(1.0), Bf16(0.75)]);
        let mut a = a0;
        residual_add(&mut a, &b, ResidualDtype::Wrong);
        assert_eq!(a, [Bf16(1.0 + 2f32.powi(-10)), Bf16(0.75)]);
        // round_bf16: ties to even, any compute type.
        assert_eq!(round_bf16(1.0f64 + 2f64.powi(-8)), 1.0);
        assert_eq!(
            round_bf16(1.0f32 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        );
    }

    /// [`round_bf16_branch_free`] is `half`'s rounding, bit for bit (ties, overflow, NaNs, subnormals).
    #[test]
    fn branch_free_bf16_rounding_is_halfs() {
        for b in (0..=u32::MAX)
            .step_by(997)
            .chain([0x3F80_8000, 0x3F81_8000, 0x7F7F_FFFF])
        {
            let v = f32::from_bits(b);
            let h = half::bf16::from_f32(v).to_f32();
            assert_eq!(round_bf16_branch_free(v).to_bits(), h.to_bits(), "{b:#x}");
        }
    }

    /// A residual add in the bf16 tier (the vector build where the CPU has AVX-512) is `half`'s
    /// rounding of each f32 sum, and in f32 the plain sum, bit for bit, over lengths that leave
    /// a remainder after sixteen lanes (NaNs, infinities and ties among the values).
    #[test]
    fn residual_adds_round_as_half_does() {
        let bits = |i: usize| (i as u32).wrapping_mul(2_654_435_761);
        for n in [1, 15, 896, 16 * 4096 + 7] {
            let a: Vec<f32> = (0..n).map(|i| f32::from_bits(bits(i))).collect();
            let b: Vec<f32> = (0..n).map(|i| f32::from_bits(bits(i + n))).collect();
            let mut ab: Vec<Bf16> = a.iter().map(|&x| Bf16(x)).collect();
            let bb: Vec<Bf16> = b.iter().map(|&x| Bf16(x)).collect();
            add_in_place(&mut ab, &bb);
            let mut af = a.clone();
            add_in_place(&mut af, &b);
            for i in 0..n {
                let sum = a[i] + b[i];
                let h = half::bf16::from_f32(sum).to_f32();
                assert_eq!(ab[i].0.to_bits(), h.to_bits(), "bf16 [{i}] of {n}");
                assert_eq!(af[i].to_bits(), sum.to_bits(), "f32 [{i}] of {n}");
            }
        }
    }

    /// A matmul's finish in the bf16 tier (the vector build where the CPU has AVX-512) is
    /// `half`'s rounding of each sum, with and without a bias, bit for bit, over a length that
    /// leaves a remainder after sixteen lanes.
    #[test]
    fn bf16_bias_and_rounding_is_halfs() {
        let n = 16 * 70_001 + 7;
        let bits = |i: usize| (i as u32).wrapping_mul(2_654_435_761);
        let sums: Vec<Bf16> = (0..n).map(|i| Bf16(f32::from_bits(bits(i)))).collect();
        let bias: Vec<Bf16> = (0..n).map(|i| Bf16(f32::from_bits(bits(i + n)))).collect();
        for with_bias in [false, true] {
            let mut o = sums.clone();
            Bf16::add_bias_to_act_dtype(&mut o, with_bias.then_some(&bias[..]));
            for (i, (o, s)) in o.iter().zip(&sums).enumerate() {
                let v = if with_bias { s.0 + bias[i].0 } else { s.0 };
                let h = half::bf16::from_f32(v).to_f32();
                assert_eq!(o.0.to_bits(), h.to_bits(), "[{i}] bias {with_bias}");
            }
        }
    }
}
