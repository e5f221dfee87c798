//! One block of each ggml type to f32, in plain Rust: the float32 operations of
//! [`crate::gguf::dequantize`] (same order, no FMA), so the same bits.

#[inline(always)]
fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Q8_0: f16 d, 32 × i8 q; `q * d`.
pub(super) fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = f16(&b[0..2]);
    for (o, &q) in o[..32].iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

/// Byte `j` of `qs` holds element `j` (low nibble) and `j + 16` (high nibble).
#[inline(always)]
fn nibbles(qs: &[u8], o: &mut [f32], f: impl Fn(u8) -> f32) {
    for j in 0..16 {
        o[j] = f(qs[j] & 0x0F);
        o[j + 16] = f(qs[j] >> 4);
    }
}

/// Q4_0: f16 d, 16 bytes of nibbles; `d * (q - 8)`.
pub(super) fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16(&b[0..2]);
    nibbles(&b[2..18], o, |q| d * ((q as i8 - 8) as f32));
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles; `d * q + m` (two roundings).
pub(super) fn q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
    nibbles(&b[4..20], o, |q| d * (q as f32) + m);
}

/// The 5-bit values of a Q5 block: nibbles plus bit `i` of `qh` as element `i`'s fifth bit.
#[inline(always)]
fn five_bit(qh: &[u8], qs: &[u8], f: impl Fn(u8) -> f32, o: &mut [f32]) {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    for (j, &byte) in qs[..16].iter().enumerate() {
        let lo = (byte & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        let hi = (byte >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
        o[j] = f(lo);
        o[j + 16] = f(hi);
    }
}

/// Q5_0: f16 d, u32 fifth bits, 16 bytes of nibbles; `d * (q - 16)`.
pub(super) fn q5_0(b: &[u8], o: &mut [f32]) {
    let d = f16(&b[0..2]);
    five_bit(&b[2..6], &b[6..22], |q| d * ((q as i8 - 16) as f32), o);
}

/// Q5_1: f16 d, f16 m, u32 fifth bits, 16 bytes of nibbles; `d * q + m`.
pub(super) fn q5_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
    five_bit(&b[4..8], &b[8..24], |q| d * (q as f32) + m, o);
}

/// The eight 6-bit scales and mins of a Q4_K/Q5_K block (`Q4_K.get_scale_min`).
#[inline(always)]
pub(crate) fn k_scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
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

/// Q4_K and Q5_K: sub-block `j` (32 values) is nibble `j % 2` of bytes `32·(j / 2)..` (plus, for
/// Q5_K, bit `j` of `qh[i]` as value `i`'s fifth bit); `(d * sc) * q - dmin * m`.
#[inline(always)]
fn q45_k(b: &[u8], qh: Option<&[u8]>, qs: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
    let (sc, mins) = k_scale_min(&b[4..16]);
    for j in 0..8 {
        let dj = d * sc[j] as f32;
        let mj = dmin * mins[j] as f32;
        let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let shift = 4 * (j % 2);
        let o = &mut o[32 * j..32 * j + 32];
        match qh {
            Some(qh) => {
                for i in 0..32 {
                    let q = ((bytes[i] >> shift) & 0x0F) | (((qh[i] >> j) & 1) << 4);
                    o[i] = dj * q as f32 - mj;
                }
            }
            None => {
                for i in 0..32 {
                    o[i] = dj * ((bytes[i] >> shift) & 0x0F) as f32 - mj;
                }
            }
        }
    }
}

/// Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles (256 values).
pub(super) fn q4_k(b: &[u8], o: &mut [f32]) {
    q45_k(b, None, &b[16..144], o);
}

/// Q5_K: as Q4_K with 32 bytes of fifth bits before the nibbles.
pub(super) fn q5_k(b: &[u8], o: &mut [f32]) {
    q45_k(b, Some(&b[16..48]), &b[48..176], o);
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of high pairs, 16 × i8 scales, f16 d; element
/// `e = 128·h + r` is low nibble `r / 64` of `ql[64·h + r % 64]` with high pair `r / 32` of
/// `qh[32·h + r % 32]`; `(d * sc[e / 16]) * (q - 32)`.
pub(super) fn q6_k(b: &[u8], o: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16(&b[208..210]);
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
