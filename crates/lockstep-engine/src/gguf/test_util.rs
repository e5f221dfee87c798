//! Builders of GGUF files for the unit tests.

use super::header::{GgmlType, MAGIC};

/// A metadata value to write: (type id, payload bytes).
pub(crate) fn kv(ty: u32, payload: Vec<u8>) -> (u32, Vec<u8>) {
    (ty, payload)
}

pub(crate) fn string_bytes(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s.as_bytes());
    b
}

pub(crate) fn u32v(x: u32) -> (u32, Vec<u8>) {
    kv(4, x.to_le_bytes().to_vec())
}

pub(crate) fn f32v(x: f32) -> (u32, Vec<u8>) {
    kv(6, x.to_le_bytes().to_vec())
}

pub(crate) fn strv(s: &str) -> (u32, Vec<u8>) {
    kv(8, string_bytes(s))
}

/// A whole GGUF v3 file: metadata, then tensors (name, dims fastest-first, type, data) laid
/// out at `alignment`.
pub(crate) fn file(
    kvs: &[(&str, (u32, Vec<u8>))],
    tensors: &[(&str, Vec<u64>, GgmlType, Vec<u8>)],
    alignment: usize,
) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for (k, (ty, payload)) in kvs {
        b.extend(string_bytes(k));
        b.extend(ty.to_le_bytes());
        b.extend(payload);
    }
    let mut offset = 0usize;
    let mut offsets = vec![];
    for (name, dims, ty, data) in tensors {
        b.extend(string_bytes(name));
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.0.to_le_bytes());
        b.extend((offset as u64).to_le_bytes());
        offsets.push(offset);
        offset += data.len().div_ceil(alignment) * alignment;
    }
    while !b.len().is_multiple_of(alignment) {
        b.push(0);
    }
    let base = b.len();
    for ((_, _, _, data), off) in tensors.iter().zip(offsets) {
        b.resize(base + off, 0);
        b.extend(data);
    }
    b
}

pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub(crate) fn h16(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}
