//! [`super::linear`] on ggml block weights against `linear` on the same weights dequantized to
//! F32 by [`crate::gguf::dequantize`]: bit for bit, every block type, kernel, compute type, token
//! count and bias (decode on AVX-512 against the AVX2 kernel, whose fused path it takes), on shapes of several blocks per row and several row groups and tasks.

use super::tests::pseudo;
use super::*;
use crate::gguf::dequantize;
use crate::kernels::quant::tests::{random_blocks, BLOCK_TYPES};
use crate::kernels::Bf16;

/// `(quantized, dequantized F32)` tensors of shape `[m, k]` holding random blocks of `dtype`.
fn pair(
    dtype: StoredDtype,
    ty: crate::gguf::GgmlType,
    m: usize,
    k: usize,
    seed: u64,
) -> (Tensor, Tensor) {
    let per = dtype.block_len();
    let b = random_blocks(dtype, m * k / per, seed, 0.5);
    let mut vals = vec![0f32; m * k];
    dequantize(ty, &b, &mut vals).unwrap();
    let f32b = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    (
        Tensor::from_bytes(dtype, vec![m, k], b),
        Tensor::from_bytes(StoredDtype::F32, vec![m, k], f32b),
    )
}

fn same_bits<T: Float>(a: &[T], b: &[T]) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits())
}

fn check<T: Float>() {
    for (dtype, ty) in BLOCK_TYPES {
        let per = dtype.block_len();
        // Two blocks or more per row; one row group, several groups, several rayon tasks.
        let shapes = if per == 32 {
            [(37, 64), (37, 1280), (300, 1280)]
        } else {
            [(9, 512), (37, 1280), (300, 1280)]
        };
        for (si, &(m, k)) in shapes.iter().enumerate() {
            let (q, f) = pair(dtype, ty, m, k, 11 + si as u64);
            let b: Vec<T> = pseudo(m, 3)
                .iter()
                .map(|&v| T::from_f64(v as f64).to_act_dtype())
                .collect();
            for n in [1, 2, 3, 17] {
                let x: Vec<T> = pseudo(n * k, 2 + n as u64)
                    .iter()
                    .map(|&v| T::from_f64(v as f64).to_act_dtype())
                    .collect();
                for bias in [None, Some(&b[..])] {
                    for kernel in Kernel::available() {
                        // Decode on AVX-512 takes the fused AVX2 path (blocks.rs): its bits are
                        // the AVX2 kernel's on the dequantized weights.
                        let fused = kernel != Kernel::Portable && n < avx2::PN;
                        let f32_kernel = if fused { Kernel::Avx2 } else { kernel };
                        let mut want = vec![T::ZERO; n * m];
                        linear_with(f32_kernel, PassKind::Prefill, &x, n, &f, bias, &mut want);
                        let mut got = vec![T::NEG_INFINITY; n * m];
                        linear_with(kernel, PassKind::Prefill, &x, n, &q, bias, &mut got);
                        assert!(
                            same_bits(&got, &want),
                            "{kernel:?} {dtype:?} {:?} m={m} k={k} n={n} bias={}",
                            T::PRECISION,
                            bias.is_some()
                        );
                        assert!(want.iter().any(|v| v.to_f64() != 0.0));
                    }
                }
            }
            // Embedding rows: a decoded row of the blocks is the F32 row, in this compute type.
            for r in [0, m / 2, m - 1] {
                let mut got = vec![T::ZERO; k];
                let mut want = vec![T::NEG_INFINITY; k];
                T::decode(q.dtype, q.row_bytes(r), &mut got);
                T::decode(f.dtype, f.row_bytes(r), &mut want);
                assert!(same_bits(&got, &want), "{dtype:?} row {r}");
            }
        }
    }
}

#[test]
fn block_linear_is_dequantized_linear_f32() {
    check::<f32>();
}

#[test]
fn block_linear_is_dequantized_linear_f64() {
    check::<f64>();
}

#[test]
fn block_linear_is_dequantized_linear_bf16() {
    check::<Bf16>();
}

/// What the weights check and the fingerprint see of a block tensor: its dequantized F32 values
/// (sha256 of the float32 bytes, non-finite scan).
#[test]
fn block_tensors_hash_and_scan_as_their_f32_values() {
    for (dtype, ty) in BLOCK_TYPES {
        let (q, f) = pair(dtype, ty, 12, 512, 5);
        assert_eq!(q.sha256_f32_hex(), f.sha256_hex(), "{dtype:?}");
        assert_eq!(q.sha256_as_loaded_hex(), f.sha256_hex(), "{dtype:?}");
        assert_ne!(q.sha256_hex(), f.sha256_hex());
        assert_eq!(q.nonfinite(), None);
        // A NaN scale in the third block of row 5 (flat index 5·512 + 2·per).
        let mut b = q.bytes().to_vec();
        let per = dtype.block_len();
        let at = dtype.bytes_for(5 * 512 + 2 * per).unwrap();
        let d = if dtype == StoredDtype::Q6_K { 208 } else { 0 };
        b[at + d..at + d + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
        let nan = Tensor::from_bytes(dtype, vec![12, 512], b);
        let (n, inf, first) = nan.nonfinite().unwrap();
        assert_eq!((inf, first), (0, 5 * 512 + 2 * per), "{dtype:?}");
        assert!(n > 0 && n <= per, "{dtype:?}: {n}");
    }
}

/// Rows that are not whole blocks are refused with a reason; block views start on a block.
#[test]
fn partial_blocks_are_refused() {
    let e = StoredDtype::Q4_K.row_bytes(300).unwrap_err();
    assert!(
        e.contains("300") && e.contains("Q4_K") && e.contains("256"),
        "{e}"
    );
    assert_eq!(StoredDtype::Q8_0.row_bytes(64), Ok(68));
    let (q, _) = pair(StoredDtype::Q8_0, crate::gguf::GgmlType::Q8_0, 4, 64, 1);
    assert!(q.matrix_view(64, 2, 64).is_some());
    assert!(q.matrix_view(16, 2, 64).is_none());
    assert!(q.matrix_view(0, 2, 48).is_none());
}
