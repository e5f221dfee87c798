//! The fused AVX2 block decode ([`super::blocks_avx2`]) against its reference, the buffer path
//! (`quant::decode_blocks`, then `avx2::sums_fma` on the f32 values): bit for bit, every block
//! type, f32 and bf16-rounded weights, every decode token count (1..PN), row ranges with tails
//! and not starting at 0, `k` of one block, of whole chunks plus a tail, and scales tiny,
//! ordinary and large; then through [`linear_with`] against `linear` on the dequantized F32.

use super::tests::pseudo;
use super::*;
use crate::kernels::quant::decode_blocks;
use crate::kernels::quant::tests::{random_blocks, BLOCK_TYPES};
use crate::kernels::Bf16;

/// `(m, k)` shapes for blocks of `per` elements: one block per row; a chunk plus one block;
/// two chunks plus a partial one (rows not a multiple of the 4- or 2-row tiles).
fn shapes(per: usize) -> [(usize, usize); 3] {
    if per == 32 {
        [(7, 32), (9, avx2::KC + 32), (13, 2 * avx2::KC + 96)]
    } else {
        [(7, 256), (9, avx2::KC + 256), (6, 2 * avx2::KC + 256)]
    }
}

#[test]
fn fused_block_sums_are_the_buffer_paths_bits() {
    assert!(blocks_avx2::available(), "this CPU lacks AVX2/FMA/F16C");
    for (dtype, _) in BLOCK_TYPES {
        let per = dtype.block_len();
        for (si, (m, k)) in shapes(per).into_iter().enumerate() {
            for (ci, scale) in [0.5f32, 1e-4, 60000.0].into_iter().enumerate() {
                let b = random_blocks(dtype, m * k / per, 31 + (3 * si + ci) as u64, scale);
                let mut vals = vec![0f32; m * k];
                decode_blocks(dtype, &b, &mut vals);
                let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
                for n in 1..avx2::PN {
                    let x = pseudo(n * k, 5 + n as u64);
                    for bf16 in [false, true] {
                        for rows in [0..m, 1..m - 1] {
                            let mut want = vec![f32::NAN; n * m];
                            let mut got = vec![f32::NAN; n * m];
                            // SAFETY: AVX2/FMA/F16C checked; `[m, k]` weights, `n` tokens.
                            unsafe {
                                let (r, o) = (rows.clone(), want.as_mut_ptr());
                                if bf16 {
                                    avx2::sums_fma::<avx2::F32AsBf16W>(&x, n, k, &f32b, m, r, o);
                                } else {
                                    avx2::sums_fma::<avx2::F32W>(&x, n, k, &f32b, m, r, o);
                                }
                                let o = got.as_mut_ptr();
                                blocks_avx2::sums(dtype, bf16, &x, n, k, &b, m, rows.clone(), o);
                            }
                            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                                assert_eq!(
                                    g.to_bits(),
                                    w.to_bits(),
                                    "{dtype:?} m={m} k={k} scale={scale} n={n} bf16={bf16} \
                                     rows={rows:?} [{i}]: {g} vs {w}"
                                );
                            }
                            assert!(want.iter().any(|v| v.is_finite() && *v != 0.0));
                        }
                    }
                }
            }
        }
    }
}

/// `linear` on block weights with 1..PN tokens on the AVX2 kernel (the fused path), f32 and
/// bf16 compute, with and without bias: the bits of `linear` on the dequantized F32 tensor.
fn linear_check<T: Float>() {
    for (dtype, _) in BLOCK_TYPES {
        let per = dtype.block_len();
        let (m, k) = (37, 2 * avx2::KC + per);
        let b = random_blocks(dtype, m * k / per, 77, 0.5);
        let mut vals = vec![0f32; m * k];
        decode_blocks(dtype, &b, &mut vals);
        let q = Tensor::from_bytes(dtype, vec![m, k], b);
        let f32b = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f = Tensor::from_bytes(StoredDtype::F32, vec![m, k], f32b);
        let bias: Vec<T> = pseudo(m, 3)
            .iter()
            .map(|&v| T::from_f64(v as f64))
            .collect();
        for n in 1..avx2::PN {
            let x: Vec<T> = pseudo(n * k, 9 + n as u64)
                .iter()
                .map(|&v| T::from_f64(v as f64).to_act_dtype())
                .collect();
            for bias in [None, Some(&bias[..])] {
                let mut want = vec![T::ZERO; n * m];
                linear_with(Kernel::Avx2, PassKind::Prefill, &x, n, &f, bias, &mut want);
                let mut got = vec![T::NEG_INFINITY; n * m];
                linear_with(Kernel::Avx2, PassKind::Prefill, &x, n, &q, bias, &mut got);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_f64().to_bits() == w.to_f64().to_bits()),
                    "{dtype:?} {:?} n={n} bias={}",
                    T::PRECISION,
                    bias.is_some()
                );
            }
        }
    }
}

#[test]
fn fused_block_linear_is_dequantized_linear() {
    assert!(
        Kernel::available().contains(&Kernel::Avx2),
        "this CPU lacks AVX2/FMA"
    );
    linear_check::<f32>();
    linear_check::<Bf16>();
}
