//! The faithful bf16 tier on an F32 checkpoint: each F32 matrix's values rounded to bf16 once,
//! when the model is first run in that tier, instead of on every use.
//!
//! `transformers`' bf16 tier holds the model cast to bfloat16: every F32 weight rounded to the
//! nearest bf16 (ties to even). lockstep's kernels can read the F32 bytes and round each weight
//! as they sum (`F32AsBf16W`), which gives those values but reads twice the bytes of a BF16
//! matrix and cannot use the kernels that multiply bf16 pairs (`vdpbf16ps`, AMX tiles) or the
//! 12-bit decode coding ([`super::bf16_coded`]). The copy made here holds exactly the rounded
//! values ([`crate::Float::decode`] into [`crate::Bf16`], the portable kernel's rounding, which
//! every fast reader matches bit for bit) as a BF16 matrix, so a bf16-compute product on it
//! computes what the same product computes on a BF16 checkpoint of those values; products in
//! f32 and f64 never read it.
//!
//! All of a model's copies share one region of anonymous memory that starts on a 2 MiB boundary
//! and asks for 2 MiB pages (as the codings do), and each F32 matrix's file pages are dropped
//! once copied (a later f32 or f64 product faults them back in from the file).

use super::{Storage, StoredDtype, Tensor};
use crate::{Bf16, Float};
use memmap2::UncheckedAdvice;
use rayon::prelude::*;
use std::sync::Arc;

/// The switch: `auto` (default), `on` or `off`.
pub const ENV: &str = "LOCKSTEP_BF16_COPY";

/// Values rounded per piece (a 64 KiB f32 piece becomes 32 KiB of bf16).
const PIECE: usize = 16 << 10;

/// Whether a model should make bf16 copies of its F32 matrices for the bf16 tier, as [`ENV`]
/// asks ([`auto`] when it does not); a bad value is a one-line error.
///
/// `mapped` is the model's mapped bytes, `f32_matrices` the bytes of its F32 matrices (each
/// layer's linears and the LM head), `available` the machine's free memory.
pub fn wanted(
    mapped: u64,
    f32_matrices: u64,
    available: Option<u64>,
) -> crate::error::Result<bool> {
    let switch = crate::switch::Switch::from_env(ENV)?;
    Ok(f32_matrices > 0 && switch.is_on(|| auto(mapped, f32_matrices, available)))
}

/// The `auto` rule: copy when the model has F32 matrices and the copies (half the F32 matrices'
/// bytes, made once and kept) fit beside the mapped weights within
/// [`crate::streaming::AUTO_FRACTION`] of the free memory. A model loaded for one pass streams
/// its layers (`Model::load_for_one_pass`) and still gets them when they fit, so that `trace`,
/// `generate` and `serve` compute the same bits; a model streamed because it does not fit gets
/// none.
pub fn auto(mapped: u64, f32_matrices: u64, available: Option<u64>) -> bool {
    let copy = f32_matrices as f64 * 0.5;
    f32_matrices > 0
        && available
            .is_some_and(|a| mapped as f64 + copy <= crate::streaming::AUTO_FRACTION * a as f64)
}

/// The bf16 copy of every 2-D F32 matrix in `ws`, in one region of 2 MiB pages (each copy at a
/// multiple of 64 bytes): the entry of each is its copy, or `None` where it is not a 2-D F32
/// matrix (all `None` when the memory is refused). The matrices are rounded in parallel.
pub fn round_together(ws: &[&Tensor]) -> Vec<Option<Tensor>> {
    let none = || ws.iter().map(|_| None).collect();
    let lens: Vec<usize> = ws
        .iter()
        .map(|w| match (w.dtype, w.shape.as_slice()) {
            (StoredDtype::F32, &[m, k]) => m * k * 2,
            _ => 0,
        })
        .collect();
    let Some((mut region, starts)) = super::huge_pages::shared_region(&lens) else {
        return none();
    };
    let parts = super::huge_pages::region_parts(&mut region, &starts, &lens);
    ws.par_iter()
        .zip(parts)
        .filter(|(_, part)| !part.is_empty())
        .for_each(|(w, part)| round_into(w, part));
    let Ok(region) = region.make_read_only().map(Arc::new) else {
        return none();
    };
    ws.iter()
        .zip(starts.into_iter().zip(lens))
        .map(|(w, (at, len))| {
            (len > 0).then(|| Tensor {
                storage: Storage::Resident(Arc::clone(&region)),
                start: at,
                end: at + len,
                dtype: StoredDtype::BF16,
                shape: w.shape.clone(),
                q8_dot: false,
                coded: Arc::default(),
                bf16_copy: Arc::default(),
                coding_replaces: Arc::default(),
                decoded: Arc::default(),
            })
        })
        .collect()
}

/// `w`'s F32 values rounded to bf16 into `dst` (2 bytes each), a piece at a time; each piece of
/// a file mapping is dropped from memory once copied.
fn round_into(w: &Tensor, dst: &mut [u8]) {
    let src = w.bytes();
    let mut vals = vec![Bf16::ZERO; PIECE];
    for (piece, out) in src.chunks(PIECE * 4).zip(dst.chunks_mut(PIECE * 2)) {
        let n = piece.len() / 4;
        Bf16::decode(StoredDtype::F32, piece, &mut vals[..n]);
        for (v, o) in vals[..n].iter().zip(out.chunks_exact_mut(2)) {
            // A Bf16 holds a bf16 value in an f32: its top 16 bits are the bf16, exactly.
            o.copy_from_slice(&((v.0.to_bits() >> 16) as u16).to_le_bytes());
        }
    }
    if let Storage::Mapped(map) = &w.storage {
        // SAFETY: MADV_DONTNEED on a read-only file mapping only unmaps the pages; a later read
        // (an f32 or f64 product) faults them back in from the file with the same bytes. The
        // range lies inside the map. Advice is a hint: an error changes nothing read.
        let _ = unsafe {
            map.unchecked_advise_range(UncheckedAdvice::DontNeed, w.start, w.end - w.start)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::{linear, linear_with, Kernel, PassKind};

    /// Random-looking f32 values with rounding ties both ways and subnormals among them.
    fn values(n: usize) -> Vec<f32> {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                match i % 97 {
                    0 => f32::from_bits(0x3f80_8000), // a tie, rounds to even (down)
                    1 => f32::from_bits(0x3f81_8000), // a tie, rounds up
                    2 => f32::from_bits(0x0000_8001), // a subnormal
                    _ => (s as i64 as f64 / i64::MAX as f64 * 0.05) as f32,
                }
            })
            .collect()
    }

    fn f32_tensor(m: usize, k: usize, vals: &[f32]) -> Tensor {
        let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_bytes(StoredDtype::F32, vec![m, k], bytes)
    }

    /// The copy holds `half`'s rounding of every value (the bf16 tier's rounding), NaN and
    /// infinities included, at 2 bytes each; non-F32 and non-2-D tensors get none.
    #[test]
    fn the_copy_holds_the_rounded_values() {
        let (m, k) = (37, 300);
        let mut vals = values(m * k);
        vals[5] = f32::NAN;
        vals[6] = f32::NEG_INFINITY;
        vals[7] = f32::MAX; // rounds to infinity
        let w = f32_tensor(m, k, &vals);
        let b = Tensor::from_bytes(StoredDtype::BF16, vec![2, 2], vec![0; 8]);
        let v = f32_tensor(1, 3, &[1.0, 2.0, 3.0]);
        let v1 = Tensor::from_bytes(StoredDtype::F32, vec![3], v.bytes().to_vec());
        let got = round_together(&[&w, &b, &v1]);
        assert!(got[1].is_none() && got[2].is_none());
        let c = got[0].as_ref().unwrap();
        assert_eq!(
            (c.dtype, c.shape.as_slice()),
            (StoredDtype::BF16, &[m, k][..])
        );
        let want: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        assert_eq!(c.bytes(), &want[..]);
        assert_eq!(c.bytes().as_ptr() as usize % 64, 0);
    }

    /// A bf16-compute product on the copy gives the bits the same product gives on a BF16
    /// tensor of those values, on every kernel this CPU runs and for 1 to 40 tokens; and it is
    /// within f32 reordering of the F32 tensor read and rounded per use.
    #[test]
    fn products_on_the_copy_are_those_of_a_bf16_checkpoint() {
        let (m, k) = (48, 896);
        let vals = values(m * k);
        let w = f32_tensor(m, k, &vals);
        let copy = round_together(&[&w]).pop().flatten().unwrap();
        let stored = Tensor::from_bytes(StoredDtype::BF16, vec![m, k], copy.bytes().to_vec());
        for n in [1, 3, 16, 40] {
            let x: Vec<Bf16> = values(n * k + 7)[7..]
                .iter()
                .map(|&v| Bf16(half::bf16::from_f32(v * 20.0).to_f32()))
                .collect();
            for kernel in Kernel::available() {
                let run = |w: &Tensor| {
                    let mut out = vec![Bf16::ZERO; n * m];
                    linear_with(kernel, PassKind::Prefill, &x, n, w, None, &mut out);
                    out.iter().map(|v| v.to_f64().to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(run(&copy), run(&stored), "{kernel:?}, {n} tokens");
            }
            // The F32 tensor read per use: the same values, summed perhaps in another order.
            let mut a = vec![Bf16::ZERO; n * m];
            let mut b = vec![Bf16::ZERO; n * m];
            linear(PassKind::Prefill, &x, n, &w, None, &mut a);
            linear(PassKind::Prefill, &x, n, &copy, None, &mut b);
            for (p, q) in a.iter().zip(&b) {
                let (p, q) = (p.to_f64(), q.to_f64());
                // Both rounded to bf16 from sums that differ by f32 reordering: at most one
                // bf16 step apart.
                assert!(
                    (p - q).abs() <= p.abs().max(q.abs()) / 128.0 + 1e-30,
                    "{p} vs {q}"
                );
            }
        }
    }

    #[test]
    fn auto_needs_f32_matrices_and_room() {
        let gb = 1u64 << 30;
        assert!(auto(gb, gb, Some(8 * gb)));
        assert!(!auto(gb, 0, Some(8 * gb)));
        assert!(!auto(4 * gb, 4 * gb, Some(6 * gb)));
        assert!(!auto(gb, gb, None));
    }
}
