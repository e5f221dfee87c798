//! ggml block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) decoded inside the
//! kernels, so a quantized GGUF tensor stays as stored (memory-mapped) and is never copied to f32.
//!
//! - **Format** ([`block`]): elements and bytes of one block of each type; a row of `k` elements
//!   is `k / elements` whole blocks.
//! - **Block math** (`scalar`): one block to its 32 or 256 f32 values with exactly the float32
//!   operations of [`crate::gguf::dequantize`] (which matches `gguf-py` bit for bit), the
//!   reference these are tested against.
//! - **Per ISA**: `avx2` decodes 8 values at a time with the same float32 operations;
//!   [`decode_blocks`] picks the fastest decoder this CPU has (every one gives the same bits).
//!
//! - **Fast `q8dot` mode**: [`q8act`] quantizes activations to llama.cpp's 8-bit formats,
//!   [`dot_scalar`] is the reference integer dot of a weight row with them (llama.cpp's
//!   generic `vec_dot`s), `dot_avx2` the AVX2 kernels tested against it. Not exact: it is
//!   llama.cpp's arithmetic, used only when asked for.
//!
//! The matmul kernels decode a group of weight rows into an f32 buffer (or, on AVX2 for a few
//! tokens, each 8 weights into a register with the same operations) and sum it exactly as they
//! sum an F32 weight, so `linear` on a quantized tensor equals `linear` on its dequantized F32
//! copy bit for bit (f32, f64 and bf16 compute).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod dot_avx2;
pub mod dot_scalar;
#[cfg(all(test, target_arch = "x86_64"))]
mod dot_tests;
pub mod q8act;
mod scalar;

pub(crate) use scalar::k_scale_min;

use crate::weights::StoredDtype;

/// Elements and bytes of one block of `dtype` (`(1, size)` for the float dtypes).
pub fn block(dtype: StoredDtype) -> (usize, usize) {
    match dtype {
        StoredDtype::F32 => (1, 4),
        StoredDtype::BF16 | StoredDtype::F16 => (1, 2),
        StoredDtype::F64 => (1, 8),
        StoredDtype::Q8_0 => (32, 34),
        StoredDtype::Q4_0 => (32, 18),
        StoredDtype::Q4_1 => (32, 20),
        StoredDtype::Q5_0 => (32, 22),
        StoredDtype::Q5_1 => (32, 24),
        StoredDtype::Q4_K => (256, 144),
        StoredDtype::Q5_K => (256, 176),
        StoredDtype::Q6_K => (256, 210),
    }
}

/// Decodes whole blocks of the block dtype `dtype` from `bytes` into `out` (one f32 per element):
/// bit for bit the values [`crate::gguf::dequantize`] gives.
///
/// # Panics
/// When `dtype` is not a block dtype, or the lengths do not make whole blocks.
pub fn decode_blocks(dtype: StoredDtype, bytes: &[u8], out: &mut [f32]) {
    let (per, bb) = block(dtype);
    assert!(
        dtype.is_block() && bytes.len().is_multiple_of(bb) && out.len() == bytes.len() / bb * per,
        "{dtype:?}: {} bytes do not decode to {} values",
        bytes.len(),
        out.len()
    );
    decode_with(dtype, bytes, out, true);
}

/// [`decode_blocks`] (lengths checked) with the AVX2 decoders when `simd` and this CPU has them,
/// else the plain ones (the same bits either way).
fn decode_with(dtype: StoredDtype, bytes: &[u8], out: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd && avx2::available() {
        // SAFETY: AVX2 and F16C are present; whole blocks, checked by the callers.
        return unsafe { avx2::decode(dtype, bytes, out) };
    }
    let _ = simd;
    let (per, bb) = block(dtype);
    let f: fn(&[u8], &mut [f32]) = match dtype {
        StoredDtype::Q8_0 => scalar::q8_0,
        StoredDtype::Q4_0 => scalar::q4_0,
        StoredDtype::Q4_1 => scalar::q4_1,
        StoredDtype::Q5_0 => scalar::q5_0,
        StoredDtype::Q5_1 => scalar::q5_1,
        StoredDtype::Q4_K => scalar::q4_k,
        StoredDtype::Q5_K => scalar::q5_k,
        StoredDtype::Q6_K => scalar::q6_k,
        _ => unreachable!("block dtypes only"),
    };
    for (b, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(per)) {
        f(b, o);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gguf::{dequantize, GgmlType};

    /// The block dtypes with their ggml type.
    pub(crate) const BLOCK_TYPES: [(StoredDtype, GgmlType); 8] = [
        (StoredDtype::Q8_0, GgmlType::Q8_0),
        (StoredDtype::Q4_0, GgmlType::Q4_0),
        (StoredDtype::Q4_1, GgmlType::Q4_1),
        (StoredDtype::Q5_0, GgmlType::Q5_0),
        (StoredDtype::Q5_1, GgmlType::Q5_1),
        (StoredDtype::Q4_K, GgmlType::Q4_K),
        (StoredDtype::Q5_K, GgmlType::Q5_K),
        (StoredDtype::Q6_K, GgmlType::Q6_K),
    ];

    /// `nblocks` random blocks of `dtype`: random quant bytes, and every f16 scale (d, m, dmin)
    /// a random finite value of either sign below `scale` in magnitude.
    pub(crate) fn random_blocks(
        dtype: StoredDtype,
        nblocks: usize,
        seed: u64,
        scale: f32,
    ) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let (_, bb) = block(dtype);
        // Offsets of the f16 scales within a block.
        let halves: &[usize] = match dtype {
            StoredDtype::Q8_0 | StoredDtype::Q4_0 | StoredDtype::Q5_0 => &[0],
            StoredDtype::Q4_1 | StoredDtype::Q5_1 | StoredDtype::Q4_K | StoredDtype::Q5_K => {
                &[0, 2]
            }
            StoredDtype::Q6_K => &[208],
            _ => unreachable!(),
        };
        let mut out = Vec::with_capacity(nblocks * bb);
        for _ in 0..nblocks {
            let mut b: Vec<u8> = (0..bb).map(|_| next() as u8).collect();
            for &h in halves {
                let u = (next() >> 11) as f32 / (1u64 << 53) as f32;
                let v = (2.0 * u - 1.0) * scale;
                b[h..h + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
            out.extend(b);
        }
        out
    }

    /// The byte ranges of a block that are not quants (scales, mins).
    fn scale_bytes(dtype: StoredDtype) -> std::ops::Range<usize> {
        match dtype {
            StoredDtype::Q8_0 | StoredDtype::Q4_0 | StoredDtype::Q5_0 => 0..2,
            StoredDtype::Q4_1 | StoredDtype::Q5_1 => 0..4,
            StoredDtype::Q4_K | StoredDtype::Q5_K => 0..16,
            StoredDtype::Q6_K => 192..210,
            _ => unreachable!(),
        }
    }

    /// The blocks with every quant byte zeroed (scales and mins kept).
    pub(crate) fn zero_quants(dtype: StoredDtype, b: &[u8]) -> Vec<u8> {
        let (_, bb) = block(dtype);
        let keep = scale_bytes(dtype);
        b.iter()
            .enumerate()
            .map(|(i, &v)| if keep.contains(&(i % bb)) { v } else { 0 })
            .collect()
    }

    /// `[n][k]` activations of varied magnitude per block (and some exact zeros).
    pub(crate) fn activations(n: usize, k: usize, seed: u64) -> Vec<f32> {
        crate::kernels::matmul::tests::pseudo(n * k, seed)
            .iter()
            .enumerate()
            .map(|(i, &v)| match (i / 32) % 5 {
                0 => v * 8.0,
                1 => v * 0.01,
                2 if i % 3 == 0 => 0.0,
                _ => v,
            })
            .collect()
    }

    /// Every block type, random blocks (scales of every size, including tiny and large ones, and
    /// raw random bytes whose scales may be NaN or infinite): the same bits as `dequantize`.
    #[test]
    fn blocks_decode_to_dequantizes_bits() {
        for (dtype, ty) in BLOCK_TYPES {
            let (per, bb) = block(dtype);
            assert_eq!(ty.block(), Some((per as u64, bb as u64)), "{dtype:?}");
            for (seed, scale) in [(1, 1.0f32), (2, 1e-4), (3, 60000.0)] {
                let b = random_blocks(dtype, 37, seed, scale);
                let mut want = vec![0f32; 37 * per];
                dequantize(ty, &b, &mut want).unwrap();
                for simd in [false, true] {
                    let mut got = vec![f32::NAN; 37 * per];
                    decode_with(dtype, &b, &mut got, simd);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{dtype:?} simd {simd} seed {seed} [{i}]"
                        );
                    }
                }
                assert!(want.iter().any(|&v| v != 0.0));
            }
            // Raw random bytes: NaN/infinite/subnormal scales decode the same way too.
            let mut s = 7u32;
            let raw: Vec<u8> = (0..bb * 64)
                .map(|_| {
                    s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (s >> 16) as u8
                })
                .collect();
            let mut want = vec![0f32; 64 * per];
            dequantize(ty, &raw, &mut want).unwrap();
            for simd in [false, true] {
                let mut got = vec![0f32; 64 * per];
                decode_with(dtype, &raw, &mut got, simd);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{dtype:?} simd {simd} raw [{i}]: {g} vs {w}"
                    );
                }
            }
            let mut all = vec![0f32; 64 * per];
            decode_blocks(dtype, &raw, &mut all);
            assert!(all
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())));
        }
    }

    #[test]
    #[should_panic(expected = "do not decode")]
    fn partial_blocks_are_refused() {
        let mut out = [0f32; 32];
        decode_blocks(StoredDtype::Q8_0, &[0u8; 33], &mut out);
    }
}
