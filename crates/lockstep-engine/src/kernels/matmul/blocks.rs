//! [`super::linear`] on ggml block weights with the SIMD kernels: a group of weight rows is
//! decoded into an f32 buffer ([`crate::kernels::quant::decode_blocks`], exactly the values the
//! full dequantization gives) and summed by the F32-weight kernels of the same ISA, so the result
//! equals `linear` on the dequantized F32 tensor bit for bit (the SIMD sums do not depend on how
//! the rows are grouped). Each weight byte is decoded once per call, whatever the token count.
//!
//! Fewer than `avx2::PN` tokens (decode) skip the buffer: [`super::blocks_avx2`] decodes each 8
//! weights in a register and sums them at once, with the AVX2 kernel's bits, and on AVX-512
//! [`super::blocks_avx512`] does the same for two rows per register, with the same bits. Decode
//! streams the stored bytes, and the buffer path ran at 0.27x the fused one's speed on AVX-512
//! (Q8_0, 0.5B shape: 9.4 against 34 tok/s), so on AVX-512 a decode step sums in the AVX2
//! kernel's order, not the AVX-512 one's (both exact f32).

use super::{avx2, avx512, blocks_avx2, blocks_avx512};
use crate::kernels::quant;
use crate::weights::Tensor;
use std::ops::Range;

/// f32 values of decoded weights per group (128 KiB: stays in L2 while the tiles pass over it).
const GROUP_ELEMS: usize = 32 << 10;

/// Raw sums `out[t·m + j] = Σ_i x[t·k + i]·w[j][i]` for every row `j` in `rows`, `w` a block
/// dtype: on the AVX2 kernels when `avx2`, else the AVX-512 ones; the weights rounded to bf16 (as
/// F32 weights are for bf16 compute) when `bf16`.
///
/// # Safety
/// The chosen ISA is available; `w` is `[m, k]` of whole blocks, `x` holds `n` rows of `k`;
/// `out` is valid for `n·m` f32 and nobody else touches the entries in `rows`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sums(
    avx2: bool,
    bf16: bool,
    x: &[f32],
    n: usize,
    k: usize,
    w: &Tensor,
    rows: Range<usize>,
    out: *mut f32,
) {
    let m = w.shape[0];
    let row = w.dtype.bytes_for(k).expect("rows of whole blocks");
    assert!(rows.end <= m && w.bytes().len() == m * row);
    if n < avx2::PN && !avx2 && blocks_avx512::available() {
        // Decode: each 8 weights of two rows decoded in a register and summed at once (the
        // same bits as the AVX2 path below).
        return blocks_avx512::sums(w.dtype, bf16, x, n, k, w.bytes(), m, rows, out);
    }
    if n < avx2::PN && blocks_avx2::available() {
        // Decode: each 8 weights decoded in a register and summed at once (the same bits).
        return blocks_avx2::sums(w.dtype, bf16, x, n, k, w.bytes(), m, rows, out);
    }
    // Groups of a multiple of four rows (the decode tile).
    let g = (GROUP_ELEMS / k.max(1)).max(4) / 4 * 4;
    let mut buf = vec![0f32; g.min(rows.len()) * k];
    let bytes = w.bytes();
    for g0 in rows.clone().step_by(g) {
        let nr = g.min(rows.end - g0);
        let vals = &mut buf[..nr * k];
        quant::decode_blocks(w.dtype, &bytes[g0 * row..(g0 + nr) * row], vals);
        let wb = std::slice::from_raw_parts(vals.as_ptr().cast::<u8>(), nr * k * 4);
        // The buffer's row r is weight row g0 + r: its outputs start at `out + g0`.
        let o = out.add(g0);
        match (avx2, bf16) {
            (true, false) => avx2::sums_fma::<avx2::F32W>(x, n, k, wb, m, 0..nr, o),
            (true, true) => avx2::sums_fma::<avx2::F32AsBf16W>(x, n, k, wb, m, 0..nr, o),
            (false, false) => avx512::sums_fma::<avx512::F32W>(x, n, k, wb, m, 0..nr, o),
            (false, true) => avx512::sums_fma::<avx512::F32AsBf16W>(x, n, k, wb, m, 0..nr, o),
        }
    }
}
