//! Dequantization of ggml blocks to f32 (bit-identical to `gguf-py`) and the Llama q/k row
//! un-permutation.

use super::error::GgufError;
use super::header::GgmlType;

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantizes whole blocks of `ty` from `src` into `out` (one f32 per element), with exactly the
/// float32 operations `gguf-py`'s numpy code performs (so the values match bit for bit):
///
/// | type | block | value |
/// |---|---|---|
/// | Q8_0 | f16 d, 32 × i8 q | `q * d` |
/// | Q4_0 | f16 d, 16 bytes of nibbles | `d * (q - 8)` |
/// | Q4_1 | f16 d, f16 m, 16 bytes of nibbles | `d * q + m` (two roundings, no FMA) |
/// | Q5_0 | f16 d, u32 high bits, 16 bytes of nibbles | `d * (q - 16)` |
/// | Q5_1 | f16 d, f16 m, u32 high bits, 16 bytes of nibbles | `d * q + m` |
///
/// | Q4_K | f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles (256 values) | `(d * sc) * q - dmin * m` per 32 |
/// | Q5_K | as Q4_K plus 32 bytes of fifth bits | the same with 5-bit q |
/// | Q6_K | 128 bytes low nibbles, 64 bytes high pairs, 16 × i8 scales, f16 d | `(d * sc) * (q - 32)` per 16 |
///
/// Nibbles: byte `j` holds element `j` in its low four bits and element `j + 16` in its high four;
/// Q5's fifth bit of element `i` is bit `i` of the little-endian u32. The K layouts follow
/// `gguf-py`'s `Q4_K`/`Q5_K`/`Q6_K.dequantize_blocks` index for index.
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) -> std::result::Result<(), GgufError> {
    let (per_block, block_bytes) = match ty {
        GgmlType::Q8_0
        | GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K => {
            let (e, b) = ty.block().expect("known");
            (e as usize, b as usize)
        }
        other => {
            return Err(GgufError::Unsupported(format!(
                "{other} is not a block type lockstep dequantizes"
            )))
        }
    };
    if !src.len().is_multiple_of(block_bytes) || out.len() != src.len() / block_bytes * per_block {
        return Err(GgufError::from(format!(
            "{ty}: {} bytes do not make {} values",
            src.len(),
            out.len()
        )));
    }
    let nibbles = |qs: &[u8], o: &mut [f32], f: &dyn Fn(u8) -> f32| {
        for j in 0..16 {
            o[j] = f(qs[j] & 0x0F);
            o[j + 16] = f(qs[j] >> 4);
        }
    };
    for (b, o) in src
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(per_block))
    {
        match ty {
            GgmlType::Q8_0 => {
                let d = f16(&b[0..2]);
                for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                    *o = (q as i8) as f32 * d;
                }
            }
            GgmlType::Q4_0 => {
                let d = f16(&b[0..2]);
                nibbles(&b[2..18], o, &|q| d * ((q as i8 - 8) as f32));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
                nibbles(&b[4..20], o, &|q| d * (q as f32) + m);
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let d = f16(&b[0..2]);
                let (m, qh, qs) = if ty == GgmlType::Q5_1 {
                    (f16(&b[2..4]), &b[4..8], &b[8..24])
                } else {
                    (0.0, &b[2..6], &b[6..22])
                };
                let qh = u32::from_le_bytes(qh.try_into().expect("4 bytes"));
                for (j, &byte) in qs.iter().enumerate() {
                    let lo = (byte & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                    let hi = (byte >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                    for (i, q) in [(j, lo), (j + 16, hi)] {
                        o[i] = if ty == GgmlType::Q5_1 {
                            d * (q as f32) + m
                        } else {
                            d * ((q as i8 - 16) as f32)
                        };
                    }
                }
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
                let (sc, mins) = k_scale_min(&b[4..16]);
                let (qh, qs) = if ty == GgmlType::Q5_K {
                    (Some(&b[16..48]), &b[48..176])
                } else {
                    (None, &b[16..144])
                };
                // Sub-block j (32 values) = nibble j % 2 of bytes 32·(j / 2)..; Q5_K's fifth bit
                // of its value i is bit j of qh[i].
                for j in 0..8 {
                    let dj = d * sc[j] as f32;
                    let mj = dmin * mins[j] as f32;
                    let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                    for i in 0..32 {
                        let mut q = (bytes[i] >> (4 * (j % 2))) & 0x0F;
                        if let Some(qh) = qh {
                            q |= ((qh[i] >> j) & 1) << 4;
                        }
                        o[32 * j + i] = dj * q as f32 - mj;
                    }
                }
            }
            GgmlType::Q6_K => {
                let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16(&b[208..210]);
                // Element e = 128·h + r: low nibble r / 64 of ql[64·h + r % 64], high pair r / 32
                // of qh[32·h + r % 32]; scale scales[e / 16].
                for h in 0..2 {
                    for r in 0..128 {
                        let lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
                        let hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
                        let q = ((lo | (hi << 4)) as i8 - 32) as f32;
                        let e = 128 * h + r;
                        let de = d * (scales[e / 16] as i8) as f32;
                        o[e] = de * q;
                    }
                }
            }
            _ => unreachable!(),
        }
    }
    Ok(())
}

/// The eight 6-bit scales and mins of a Q4_K/Q5_K block (`Q4_K.get_scale_min`).
fn k_scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (d, m, md) = (&s[0..4], &s[4..8], &s[8..12]);
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = d[j] & 0x3F;
        mn[j] = m[j] & 0x3F;
        sc[j + 4] = (md[j] & 0x0F) | ((d[j] >> 2) & 0x30);
        mn[j + 4] = (md[j] >> 4) | ((m[j] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Undoes llama.cpp's permutation of Llama q/k rows, as `transformers` does
/// (`reshape(n_head, dim, 2, ...).swapaxes(2, 1)`): within each head of `2·dim` rows, output row
/// `a·dim + b` is input row `2·b + a`. `data` is `rows` rows of `row_bytes` bytes each (a bias is
/// rows of one element).
pub fn unpermute_rows(
    data: &[u8],
    row_bytes: usize,
    n_head: usize,
) -> std::result::Result<Vec<u8>, GgufError> {
    let rows = data.len() / row_bytes.max(1);
    if row_bytes == 0
        || n_head == 0
        || !data.len().is_multiple_of(row_bytes)
        || !rows.is_multiple_of(2 * n_head)
    {
        return Err(GgufError::from(format!(
            "cannot undo the q/k permutation: {rows} rows do not split into {n_head} heads of pairs"
        )));
    }
    let dim = rows / n_head / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_head {
        for a in 0..2 {
            for b in 0..dim {
                let dst = (h * 2 * dim + a * dim + b) * row_bytes;
                let src = (h * 2 * dim + 2 * b + a) * row_bytes;
                out[dst..dst + row_bytes].copy_from_slice(&data[src..src + row_bytes]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::test_util::*;
    #[test]
    fn dequantizes_q8_0() {
        let mut b = h16(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 * 4 - 64) as u8));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut out).unwrap();
        for (i, &o) in out.iter().enumerate() {
            assert_eq!(o, (i as f32 * 4.0 - 64.0) * 0.5);
        }
        // -128 and 127 with a scale that is not a power of two.
        let mut b = h16(0.1).to_vec();
        b.extend([0x80, 0x7f]);
        b.extend([0u8; 30]);
        dequantize(GgmlType::Q8_0, &b, &mut out).unwrap();
        let d = half::f16::from_f32(0.1).to_f32();
        assert_eq!((out[0], out[1], out[2]), (-128.0 * d, 127.0 * d, 0.0));
    }

    /// 16 bytes of nibbles for elements `q[0..32]` (byte j: q[j] low, q[j+16] high).
    fn pack4(q: &[u8; 32]) -> Vec<u8> {
        (0..16).map(|j| q[j] | (q[j + 16] << 4)).collect()
    }

    fn ramp(mask: u8) -> [u8; 32] {
        std::array::from_fn(|i| (i as u8 * 7 + 3) & mask)
    }

    #[test]
    fn dequantizes_q4_0_and_q4_1() {
        let q = ramp(0x0F);
        let mut b = h16(2.0).to_vec();
        b.extend(pack4(&q));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_0, &b, &mut out).unwrap();
        for i in 0..32 {
            assert_eq!(out[i], 2.0 * (q[i] as f32 - 8.0), "{i}");
        }
        assert_eq!(out[0], 2.0 * (3.0 - 8.0));
        let mut b = h16(0.25).to_vec();
        b.extend(h16(-1.5));
        b.extend(pack4(&q));
        dequantize(GgmlType::Q4_1, &b, &mut out).unwrap();
        for i in 0..32 {
            assert_eq!(out[i], 0.25 * q[i] as f32 - 1.5, "{i}");
        }
        // Two blocks in a row.
        let mut two = b.clone();
        let mut b2 = h16(1.0).to_vec();
        b2.extend(h16(0.0));
        b2.extend(pack4(&[15; 32]));
        two.extend(b2);
        let mut out2 = [0f32; 64];
        dequantize(GgmlType::Q4_1, &two, &mut out2).unwrap();
        assert_eq!(&out2[..32], &out[..]);
        assert!(out2[32..].iter().all(|&x| x == 15.0));
        // Sizes must agree.
        assert!(dequantize(GgmlType::Q4_1, &two[..39], &mut out2).is_err());
        assert!(dequantize(GgmlType::F16, &two, &mut out2).is_err());
    }

    #[test]
    fn dequantizes_q5_0_and_q5_1() {
        let q = ramp(0x1F);
        let lo: [u8; 32] = std::array::from_fn(|i| q[i] & 0x0F);
        let qh: u32 = (0..32).map(|i| ((q[i] as u32 >> 4) & 1) << i).sum();
        let mut b = h16(0.5).to_vec();
        b.extend(qh.to_le_bytes());
        b.extend(pack4(&lo));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q5_0, &b, &mut out).unwrap();
        for i in 0..32 {
            assert_eq!(out[i], 0.5 * (q[i] as f32 - 16.0), "{i}");
        }
        assert!(q.iter().any(|&x| x >= 16) && q.iter().any(|&x| x < 16));
        let mut b = h16(0.125).to_vec();
        b.extend(h16(3.0));
        b.extend(qh.to_le_bytes());
        b.extend(pack4(&lo));
        dequantize(GgmlType::Q5_1, &b, &mut out).unwrap();
        for i in 0..32 {
            assert_eq!(out[i], 0.125 * q[i] as f32 + 3.0, "{i}");
        }
    }

    /// Packs eight 6-bit scales and mins as ggml's Q4_K/Q5_K do.
    fn pack_k_scales(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
        }
        s
    }

    #[test]
    fn dequantizes_q4_k_and_q5_k() {
        let sc = [1, 2, 63, 17, 32, 48, 5, 60];
        let mn = [0, 9, 33, 63, 16, 47, 1, 62];
        let scales = pack_k_scales(&sc, &mn);
        assert_eq!(k_scale_min(&scales), (sc, mn));
        let q: Vec<u8> = (0..256).map(|i| ((i * 37 + 11) % 32) as u8).collect();
        // Sub-block j: nibble j % 2 of bytes 32 (j / 2)..; fifth bit j of qh[i].
        let mut qs = [0u8; 128];
        let mut qh = [0u8; 32];
        for j in 0..8 {
            for i in 0..32 {
                let v = q[32 * j + i];
                qs[32 * (j / 2) + i] |= (v & 0x0F) << (4 * (j % 2));
                qh[i] |= (v >> 4) << j;
            }
        }
        let (d, dmin) = (0.5f32, 0.25f32);
        let mut b4 = [h16(d), h16(dmin)].concat();
        b4.extend(scales);
        let mut b5 = b4.clone();
        b4.extend(qs);
        b5.extend(qh);
        b5.extend(qs);
        let mut out = [0f32; 256];
        dequantize(GgmlType::Q4_K, &b4, &mut out).unwrap();
        for e in 0..256 {
            let j = e / 32;
            let want = d * sc[j] as f32 * (q[e] & 0x0F) as f32 - dmin * mn[j] as f32;
            assert_eq!(out[e], want, "Q4_K {e}");
        }
        dequantize(GgmlType::Q5_K, &b5, &mut out).unwrap();
        for e in 0..256 {
            let j = e / 32;
            let want = d * sc[j] as f32 * q[e] as f32 - dmin * mn[j] as f32;
            assert_eq!(out[e], want, "Q5_K {e}");
        }
    }

    #[test]
    fn dequantizes_q6_k() {
        let q: Vec<u8> = (0..256).map(|i| ((i * 29 + 7) % 64) as u8).collect();
        let scales: [i8; 16] = std::array::from_fn(|k| (k as i8 - 8) * 9);
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for (e, &v) in q.iter().enumerate() {
            let (h, r) = (e / 128, e % 128);
            ql[64 * h + r % 64] |= (v & 0x0F) << (4 * (r / 64));
            qh[32 * h + r % 32] |= (v >> 4) << (2 * (r / 32));
        }
        let d = 0.375f32;
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(scales.map(|x| x as u8));
        b.extend(h16(d));
        assert_eq!(b.len(), 210);
        let mut out = [0f32; 256];
        dequantize(GgmlType::Q6_K, &b, &mut out).unwrap();
        for e in 0..256 {
            let want = d * scales[e / 16] as f32 * (q[e] as f32 - 32.0);
            assert_eq!(out[e], want, "{e}");
        }
    }

    /// llama.cpp's converter: `w.reshape(n_head, 2, rows/n_head/2, ...).swapaxes(1, 2)`.
    fn llama_cpp_permute(rows: &[u32], n_head: usize) -> Vec<u32> {
        let dim = rows.len() / n_head / 2;
        let mut out = vec![0; rows.len()];
        for h in 0..n_head {
            for b in 0..dim {
                for a in 0..2 {
                    // output index (h, b, a) <- input index (h, a, b)
                    out[h * 2 * dim + b * 2 + a] = rows[h * 2 * dim + a * dim + b];
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpps_permutation() {
        let bytes = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        // One head of 4 rows: llama.cpp stores rows [0, 2, 1, 3]; undoing gives [0, 1, 2, 3].
        let out = unpermute_rows(&bytes(&[0, 2, 1, 3]), 4, 1).unwrap();
        assert_eq!(out, bytes(&[0, 1, 2, 3]));
        for (rows, heads) in [(64usize, 2usize), (192, 3), (576, 9), (24, 1)] {
            let hf: Vec<u32> = (0..rows as u32).collect();
            let stored = llama_cpp_permute(&hf, heads);
            assert_ne!(stored, hf);
            // Rows of 2 values each.
            let wide = |v: &[u32]| -> Vec<u8> {
                v.iter()
                    .flat_map(|x| [x * 2, x * 2 + 1])
                    .flat_map(|x| x.to_le_bytes())
                    .collect()
            };
            assert_eq!(unpermute_rows(&wide(&stored), 8, heads).unwrap(), wide(&hf));
            assert_eq!(
                unpermute_rows(&bytes(&stored), 4, heads).unwrap(),
                bytes(&hf)
            );
        }
        assert!(unpermute_rows(&[0; 12], 4, 2).is_err());
    }
}
