//! The integer dot product of one block-quantized weight row with one row of quantized
//! activations ([`super::q8act`]), in plain Rust: llama.cpp's portable `ggml_vec_dot_*_q8_*`
//! (`_generic` in `ggml-cpu/quants.c`) operation for operation (the same integer sums, the same
//! f32 products in the same order, no FMA). The reference the SIMD kernels are tested against.

use super::q8act::{ActFormat, Q8Acts};
use crate::weights::StoredDtype;

/// The f16 at `b[0..2]` widened to f32 (exact).
#[inline(always)]
fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// `Σ_i w[i]·x[i]` for the weight row `w` (whole blocks of `dtype`) and activation row `t` of
/// `a`, as llama.cpp's generic `vec_dot` computes it.
///
/// # Panics
/// When `dtype` is not a block dtype, `a` is not its activation format, or the lengths differ.
pub fn dot(dtype: StoredDtype, w: &[u8], a: &Q8Acts, t: usize) -> f32 {
    let (per, bb) = super::block(dtype);
    assert!(
        ActFormat::for_weight(dtype) == Some(a.format) && t < a.n && w.len() == a.k / per * bb,
        "{dtype:?} row of {} bytes against {:?} activations of {}",
        w.len(),
        a.format,
        a.k
    );
    let nb = a.blocks_per_row();
    let d = &a.d[t * nb..(t + 1) * nb];
    let qs = &a.qs[t * a.k..(t + 1) * a.k];
    match dtype {
        StoredDtype::Q8_0 => q8_0(w, d, qs),
        StoredDtype::Q4_0 => q4_0(w, d, qs),
        StoredDtype::Q4_1 => q4_1(w, d, &a.s[t * nb..(t + 1) * nb], qs),
        StoredDtype::Q5_0 => q5_0(w, d, qs),
        StoredDtype::Q5_1 => q5_1(w, d, &a.s[t * nb..(t + 1) * nb], qs),
        StoredDtype::Q4_K => q45_k(w, false, d, qs, &a.bsums[16 * t * nb..16 * (t + 1) * nb]),
        StoredDtype::Q5_K => q45_k(w, true, d, qs, &a.bsums[16 * t * nb..16 * (t + 1) * nb]),
        StoredDtype::Q6_K => q6_k(w, d, qs),
        _ => unreachable!("block dtypes only"),
    }
}

/// `Σ_j x[j]·y[j]` of 32 small integers.
#[inline(always)]
fn isum(x: impl Iterator<Item = i32>, y: &[i8]) -> i32 {
    x.zip(y).map(|(x, &y)| x * y as i32).sum()
}

/// A 32-value block's nibbles: byte `j` holds value `j` (low) and `j + 16` (high).
#[inline(always)]
fn nibble(qs: &[u8], i: usize) -> i32 {
    if i < 16 {
        (qs[i] & 0x0F) as i32
    } else {
        (qs[i - 16] >> 4) as i32
    }
}

/// Q8_0 × Q8_0: `sumf += sumi·(dx·dy)`.
fn q8_0(w: &[u8], d: &[f32], qs: &[i8]) -> f32 {
    let mut sumf = 0f32;
    for ((b, &dy), y) in w.chunks_exact(34).zip(d).zip(qs.chunks_exact(32)) {
        let sumi = isum(b[2..34].iter().map(|&q| q as i8 as i32), y);
        sumf += sumi as f32 * (f16(&b[0..2]) * dy);
    }
    sumf
}

/// Q4_0 × Q8_0: `sumf += sumi·dx·dy` (left to right).
fn q4_0(w: &[u8], d: &[f32], qs: &[i8]) -> f32 {
    let mut sumf = 0f32;
    for ((b, &dy), y) in w.chunks_exact(18).zip(d).zip(qs.chunks_exact(32)) {
        let sumi = isum((0..32).map(|i| nibble(&b[2..18], i) - 8), y);
        sumf += sumi as f32 * f16(&b[0..2]) * dy;
    }
    sumf
}

/// Q4_1 × Q8_1: `sumf += (dx·dy)·sumi + m·s`.
fn q4_1(w: &[u8], d: &[f32], s: &[f32], qs: &[i8]) -> f32 {
    let mut sumf = 0f32;
    for (((b, &dy), &sy), y) in w.chunks_exact(20).zip(d).zip(s).zip(qs.chunks_exact(32)) {
        let sumi = isum((0..32).map(|i| nibble(&b[4..20], i)), y);
        sumf += (f16(&b[0..2]) * dy) * sumi as f32 + f16(&b[2..4]) * sy;
    }
    sumf
}

/// The 5-bit values of a Q5 block: nibble `i` plus bit `i` of `qh` as the fifth bit.
#[inline(always)]
fn five_bit(qh: &[u8], qs: &[u8], i: usize) -> i32 {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    nibble(qs, i) | ((((qh >> i) & 1) as i32) << 4)
}

/// Q5_0 × Q8_0: `sumf += (dx·dy)·sumi`.
fn q5_0(w: &[u8], d: &[f32], qs: &[i8]) -> f32 {
    let mut sumf = 0f32;
    for ((b, &dy), y) in w.chunks_exact(22).zip(d).zip(qs.chunks_exact(32)) {
        let sumi = isum((0..32).map(|i| five_bit(&b[2..6], &b[6..22], i) - 16), y);
        sumf += (f16(&b[0..2]) * dy) * sumi as f32;
    }
    sumf
}

/// Q5_1 × Q8_1: `sumf += (dx·dy)·sumi + m·s`.
fn q5_1(w: &[u8], d: &[f32], s: &[f32], qs: &[i8]) -> f32 {
    let mut sumf = 0f32;
    for (((b, &dy), &sy), y) in w.chunks_exact(24).zip(d).zip(s).zip(qs.chunks_exact(32)) {
        let sumi = isum((0..32).map(|i| five_bit(&b[4..8], &b[8..24], i)), y);
        sumf += (f16(&b[0..2]) * dy) * sumi as f32 + f16(&b[2..4]) * sy;
    }
    sumf
}

/// Q4_K/Q5_K × Q8_K: per block, 8 integer lanes `aux32[l]` sum `scale(e / 32)·q[e]·y[e]` over
/// the values `e ≡ l (mod 8)`, the f32 lanes `sums[l] += (dx·dy)·aux32[l]`; the mins enter as
/// `sumf -= (dmin·dy)·Σ_j bsums[j]·min[j / 2]`; at the end `sumf += sums[l]` in lane order.
fn q45_k(w: &[u8], five: bool, d: &[f32], qs: &[i8], bsums: &[i16]) -> f32 {
    let bb = if five { 176 } else { 144 };
    let mut sums = [0f32; 8];
    let mut sumf = 0f32;
    for (i, b) in w.chunks_exact(bb).enumerate() {
        let (sc, mins) = super::k_scale_min(&b[4..16]);
        let (qh, q4) = if five {
            (Some(&b[16..48]), &b[48..176])
        } else {
            (None, &b[16..144])
        };
        let y = &qs[256 * i..256 * i + 256];
        let mut aux32 = [0i32; 8];
        for e in 0..256 {
            let (j, l) = (e / 32, e % 32);
            let mut a = ((q4[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0F) as i32;
            if let Some(qh) = qh {
                a += (((qh[l] >> j) & 1) as i32) << 4;
            }
            aux32[e % 8] += sc[j] as i32 * (y[e] as i32 * a);
        }
        let sumi: i32 = (0..16)
            .map(|j| bsums[16 * i + j] as i32 * mins[j / 2] as i32)
            .sum();
        let dd = f16(&b[0..2]) * d[i];
        for l in 0..8 {
            sums[l] += dd * aux32[l] as f32;
        }
        let dmin = f16(&b[2..4]) * d[i];
        sumf -= dmin * sumi as f32;
    }
    for s in sums {
        sumf += s;
    }
    sumf
}

/// Q6_K × Q8_K: as [`q45_k`] with the 16 signed scales of 16 values and `q - 32`, no mins.
fn q6_k(w: &[u8], d: &[f32], qs: &[i8]) -> f32 {
    let mut sums = [0f32; 8];
    for (i, b) in w.chunks_exact(210).enumerate() {
        let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
        let y = &qs[256 * i..256 * i + 256];
        let mut aux32 = [0i32; 8];
        for e in 0..256 {
            let (h, r) = (e / 128, e % 128);
            let lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
            let hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
            let a = (lo | (hi << 4)) as i32 - 32;
            aux32[e % 8] += scales[e / 16] as i8 as i32 * (y[e] as i32 * a);
        }
        let dd = f16(&b[208..210]) * d[i];
        for l in 0..8 {
            sums[l] += dd * aux32[l] as f32;
        }
    }
    let mut sumf = 0f32;
    for s in sums {
        sumf += s;
    }
    sumf
}
