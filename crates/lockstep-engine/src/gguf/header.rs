//! The GGUF header: metadata values, ggml tensor types, the tensor table, and the
//! bounds-checked reader that parses them.

use super::error::GgufError;
use std::collections::BTreeMap;

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";

/// Alignment of the tensor data when `general.alignment` does not say.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// uint8
    U8(u8),
    /// int8
    I8(i8),
    /// uint16
    U16(u16),
    /// int16
    I16(i16),
    /// uint32
    U32(u32),
    /// int32
    I32(i32),
    /// float32
    F32(f32),
    /// bool
    Bool(bool),
    /// UTF-8 string (invalid UTF-8 is replaced, never an error)
    String(String),
    /// uint64
    U64(u64),
    /// int64
    I64(i64),
    /// float64
    F64(f64),
    /// array of values of one type
    Array(Vec<Value>),
}

impl Value {
    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x.into()),
            Value::U16(x) => Some(x.into()),
            Value::U32(x) => Some(x.into()),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// A number of any kind, as f64 (float32 values widen exactly).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x.into()),
            Value::F64(x) => Some(x),
            Value::I8(x) => Some(x.into()),
            Value::I16(x) => Some(x.into()),
            Value::I32(x) => Some(x.into()),
            Value::I64(x) => Some(x as f64),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A ggml tensor type id (`GGMLQuantizationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

#[allow(missing_docs)]
impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q4_1: Self = Self(3);
    pub const Q5_0: Self = Self(6);
    pub const Q5_1: Self = Self(7);
    pub const Q8_0: Self = Self(8);
    pub const Q4_K: Self = Self(12);
    pub const Q5_K: Self = Self(13);
    pub const Q6_K: Self = Self(14);
    pub const BF16: Self = Self(30);

    /// The types lockstep reads.
    pub const SUPPORTED: [GgmlType; 11] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
    ];

    /// ggml's name, (elements, bytes) per block; `None` for an id ggml does not define.
    fn info(self) -> Option<(&'static str, u64, u64)> {
        const K: u64 = 256;
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 40),
            10 => ("Q2_K", K, 2 + 2 + K / 16 + K / 4),
            11 => ("Q3_K", K, 2 + K / 4 + K / 8 + 12),
            12 => ("Q4_K", K, 2 + 2 + K / 2 + 12),
            13 => ("Q5_K", K, 2 + 2 + K / 2 + K / 8 + 12),
            14 => ("Q6_K", K, 2 + K / 2 + K / 4 + K / 16),
            15 => ("Q8_K", K, 4 + K + K / 8),
            16 => ("IQ2_XXS", K, 2 + K / 4),
            17 => ("IQ2_XS", K, 2 + K / 4 + K / 32),
            18 => ("IQ3_XXS", K, 2 + K / 4 + K / 8),
            19 => ("IQ1_S", K, 2 + K / 8 + K / 16),
            20 => ("IQ4_NL", 32, 18),
            21 => ("IQ3_S", K, 2 + K / 4 + K / 8 + K / 32 + 4),
            22 => ("IQ2_S", K, 2 + K / 4 + K / 16),
            23 => ("IQ4_XS", K, 2 + 2 + K / 2 + K / 64),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", K, K / 8 + K / 16 + K / 32),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", K, 2 + 4 * 13),
            35 => ("TQ2_0", K, 2 + 64),
            39 => ("MXFP4", 32, 17),
            40 => ("NVFP4", 64, 36),
            41 => ("Q1_0", 128, 18),
            _ => return None,
        })
    }

    /// ggml's name of the type, e.g. `Q4_1`, or `type 99` for an unknown id.
    pub fn name(self) -> String {
        match self.info() {
            Some((n, _, _)) => n.to_string(),
            None => format!("type {}", self.0),
        }
    }

    /// (elements, bytes) of one block, when the type is known.
    pub fn block(self) -> Option<(u64, u64)> {
        self.info().map(|(_, e, b)| (e, b))
    }

    /// True when lockstep can read tensors of this type.
    pub fn is_supported(self) -> bool {
        Self::SUPPORTED.contains(&self)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// llama.cpp's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions as stored: fastest-moving first (`ne[0]` is the row length).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The shape in PyTorch / Hugging Face order (the stored dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements (`None` on overflow).
    pub fn numel(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    }

    /// Bytes of data, when the type is known and the row length fills whole blocks.
    pub fn nbytes(&self) -> std::result::Result<u64, GgufError> {
        let (per_block, block_bytes) = self.ty.block().ok_or_else(|| {
            GgufError::Unsupported(format!(
                "tensor '{}' has unknown ggml type id {}",
                self.name, self.ty.0
            ))
        })?;
        let row = self.dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(per_block) {
            return Err(GgufError::from(format!(
                "tensor '{}': its row length {row} is not a multiple of the {} block size {per_block}",
                self.name, self.ty
            )));
        }
        self.numel()
            .and_then(|n| (n / per_block).checked_mul(block_bytes))
            .ok_or_else(|| {
                GgufError::from(format!(
                    "tensor '{}': dims {:?} overflow",
                    self.name, self.dims
                ))
            })
    }
}

/// Everything before the tensor data: version, metadata, tensor table, where the data starts.
#[derive(Debug, Clone)]
pub struct Header {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// The tensor table, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section (`general.alignment`, default 32).
    pub alignment: u64,
    /// File offset where the tensor data starts.
    pub data_start: u64,
}

/// Bounds-checked little-endian reads with one-line errors.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Bytes of memory the parsed metadata may still take ([`METADATA_MEMORY_LIMIT`]).
    budget: u64,
}

/// Longest metadata key or tensor name accepted (llama.cpp's own names are under 64 bytes).
pub const MAX_NAME_BYTES: u64 = 1 << 16;

/// Longest metadata string value accepted (chat templates are tens of kilobytes).
pub const MAX_STRING_BYTES: u64 = 16 << 20;

/// Memory the parsed metadata may take in all (each value costs its in-memory size plus its
/// text): a real vocabulary of 256k tokens and its merges take ~25 MiB. One corrupted count in a
/// large file must not become a reservation of many times the file's size.
pub const METADATA_MEMORY_LIMIT: u64 = 512 << 20;

/// Smallest encoding of one element of metadata type `ty` (unknown types: 1).
fn min_value_bytes(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &str) -> std::result::Result<&'a [u8], GgufError> {
        if n > self.remaining() as u64 {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                need: n,
                offset: self.pos,
                len: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], GgufError> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn bytes_of_string(
        &mut self,
        what: &str,
        cap: u64,
    ) -> std::result::Result<&'a [u8], GgufError> {
        let n = self.u64(what)?;
        if n > cap {
            return Err(GgufError::Limit(format!(
                "{what}: a string of {n} bytes is longer than the {cap} accepted (corrupt)"
            )));
        }
        self.charge(n, what)?;
        self.take(n, what)
    }

    /// Takes `n` bytes from the metadata memory budget.
    fn charge(&mut self, n: u64, what: &str) -> std::result::Result<(), GgufError> {
        self.budget = self.budget.checked_sub(n).ok_or_else(|| {
            GgufError::Limit(format!(
                "{what}: the metadata would take more than {} MiB of memory (corrupt or hostile)",
                METADATA_MEMORY_LIMIT >> 20
            ))
        })?;
        Ok(())
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> std::result::Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufError::from(format!(
                        "{what}: bool byte {b} is neither 0 nor 1 (corrupt)"
                    )))
                }
            },
            8 => Value::String(
                String::from_utf8_lossy(self.bytes_of_string(what, MAX_STRING_BYTES)?).into_owned(),
            ),
            9 => {
                if depth >= 4 {
                    return Err(GgufError::from(format!(
                        "{what}: arrays nested too deep (corrupt)"
                    )));
                }
                let elem = self.u32(what)?;
                let count = self.u64(what)?;
                // Every element takes at least its smallest encoding: a count beyond what is left
                // is damage, and must not become an allocation. Each parsed element also costs
                // its in-memory size, charged to the budget before anything is reserved.
                if count.saturating_mul(min_value_bytes(elem)) > self.remaining() as u64 {
                    return Err(GgufError::Limit(format!(
                        "{what}: an array of {count} elements cannot fit in the {} bytes left (truncated or corrupt)",
                        self.remaining()
                    )));
                }
                self.charge(
                    count.saturating_mul(std::mem::size_of::<Value>() as u64),
                    what,
                )?;
                let mut v = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    v.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => {
                return Err(GgufError::from(format!(
                    "{what}: unknown metadata value type {t} (corrupt)"
                )))
            }
        })
    }
}

impl Header {
    /// Parses the header of a GGUF file held in `buf` and checks that every tensor of a type
    /// lockstep reads lies inside the file. The error is one line without the path.
    pub fn parse(buf: &[u8]) -> std::result::Result<Header, GgufError> {
        if buf.len() < 4 {
            return Err(GgufError::from(format!(
                "the file is only {} bytes, too short for the GGUF magic (truncated, or not a GGUF file)",
                buf.len()
            )));
        }
        if &buf[..4] != MAGIC {
            let head = &buf[..4];
            let shown = if head.iter().all(|b| b.is_ascii_graphic()) {
                format!("\"{}\"", String::from_utf8_lossy(head))
            } else {
                head.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            return Err(GgufError::NotGguf(format!(
                "not a GGUF file: it starts with {shown}, not the magic \"GGUF\" (a model is a Hugging Face folder or a .gguf file)"
            )));
        }
        let mut r = Reader {
            buf,
            pos: 4,
            budget: METADATA_MEMORY_LIMIT,
        };
        let version = r.u32("the version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::Unsupported(format!(
                "GGUF version {version} is not supported (2 and 3 are{})",
                if version.swap_bytes() <= 3 {
                    "; this looks like a big-endian file"
                } else {
                    ""
                }
            )));
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        // A metadata entry takes at least 13 bytes, a tensor entry at least 24.
        if n_kv.saturating_mul(13) > r.remaining() as u64 {
            return Err(GgufError::Limit(format!(
                "metadata count {n_kv} cannot fit in a {}-byte file (truncated or corrupt)",
                buf.len()
            )));
        }
        if n_tensors.saturating_mul(24) > r.remaining() as u64 {
            return Err(GgufError::Limit(format!(
                "tensor count {n_tensors} cannot fit in a {}-byte file (truncated or corrupt)",
                buf.len()
            )));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.bytes_of_string(&format!("metadata key #{i}"), MAX_NAME_BYTES)?;
            let key = std::str::from_utf8(key)
                .map_err(|_| GgufError::from(format!("metadata key #{i} is not UTF-8 (corrupt)")))?
                .to_string();
            let what = format!("metadata '{key}'");
            r.charge(std::mem::size_of::<Value>() as u64 + 64, &what)?;
            let ty = r.u32(&what)?;
            let v = r.value(ty, &what, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(GgufError::from(format!(
                    "metadata key '{key}' appears twice (corrupt)"
                )));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::from(format!(
                        "general.alignment {v:?} is not a positive power of two"
                    )))
                }
            },
        };
        r.charge(
            n_tensors.saturating_mul(std::mem::size_of::<TensorInfo>() as u64 + 64),
            "the tensor table",
        )?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = r.bytes_of_string(&format!("the name of tensor #{i}"), MAX_NAME_BYTES)?;
            let name = String::from_utf8_lossy(name).into_owned();
            let what = format!("tensor '{name}'");
            let n_dims = r.u32(&what)?;
            if n_dims > 8 {
                return Err(GgufError::from(format!(
                    "{what} claims {n_dims} dimensions (corrupt)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let ty = GgmlType(r.u32(&what)?);
            let offset = r.u64(&what)?;
            if !names.insert(name.clone()) {
                return Err(GgufError::from(format!(
                    "tensor '{name}' appears twice in the tensor table (corrupt)"
                )));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let len = buf.len() as u64;
        if data_start > len && !tensors.is_empty() {
            return Err(GgufError::from(format!(
                "truncated: the tensor data should start at offset {data_start} but the file ends at {len}"
            )));
        }
        for t in &tensors {
            if !t.ty.is_supported() {
                continue; // refused when loaded, with the type named
            }
            let n = t.nbytes()?;
            let start = data_start.saturating_add(t.offset);
            match start.checked_add(n) {
                Some(end) if end <= len => {}
                _ => {
                    return Err(GgufError::from(format!(
                        "truncated: tensor '{}' ({} {:?}) needs bytes {start}..{} of the file but it ends at {len}",
                        t.name,
                        t.ty,
                        t.shape(),
                        start.saturating_add(n)
                    )))
                }
            }
        }
        Ok(Header {
            version,
            metadata,
            tensors,
            alignment,
            data_start,
        })
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The tensor named `name` (llama.cpp's name).
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::test_util::*;
    #[test]
    fn parses_every_value_type_and_the_layout() {
        let mut arr = 8u32.to_le_bytes().to_vec();
        arr.extend(2u64.to_le_bytes());
        arr.extend(string_bytes("a b"));
        arr.extend(string_bytes("Ġ t"));
        let mut nested = 9u32.to_le_bytes().to_vec();
        nested.extend(1u64.to_le_bytes());
        nested.extend(5u32.to_le_bytes());
        nested.extend(2u64.to_le_bytes());
        nested.extend((-3i32).to_le_bytes());
        nested.extend(4i32.to_le_bytes());
        let kvs = vec![
            ("u8", kv(0, vec![200])),
            ("i8", kv(1, vec![0xff])),
            ("u16", kv(2, 65535u16.to_le_bytes().to_vec())),
            ("i16", kv(3, (-2i16).to_le_bytes().to_vec())),
            ("u32", u32v(7)),
            ("i32", kv(5, (-9i32).to_le_bytes().to_vec())),
            ("f32", f32v(1e-5)),
            ("bool", kv(7, vec![1])),
            ("str", strv("llama")),
            ("arr", kv(9, arr)),
            ("u64", kv(10, u64::MAX.to_le_bytes().to_vec())),
            ("i64", kv(11, (-1i64).to_le_bytes().to_vec())),
            ("f64", kv(12, 0.1f64.to_le_bytes().to_vec())),
            ("nested", kv(9, nested)),
            ("general.alignment", u32v(64)),
        ];
        let a = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let q = vec![0u8; 34 * 2];
        let bytes = file(
            &kvs,
            &[
                ("a", vec![3, 2], GgmlType::F32, a.clone()),
                ("q", vec![64], GgmlType::Q8_0, q),
            ],
            64,
        );
        let h = Header::parse(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.alignment, 64);
        assert_eq!(h.data_start % 64, 0);
        let m = &h.metadata;
        assert_eq!(m["u8"], Value::U8(200));
        assert_eq!(m["i8"], Value::I8(-1));
        assert_eq!(m["u16"].as_u64(), Some(65535));
        assert_eq!(m["i16"], Value::I16(-2));
        assert_eq!(m["i16"].as_u64(), None);
        assert_eq!(m["u32"].as_u64(), Some(7));
        assert_eq!(m["i32"].as_f64(), Some(-9.0));
        assert_eq!(m["f32"].as_f64(), Some(1e-5f32 as f64));
        assert_eq!(m["bool"], Value::Bool(true));
        assert_eq!(m["str"].as_str(), Some("llama"));
        let arr = m["arr"].as_array().unwrap();
        assert_eq!(arr[1].as_str(), Some("Ġ t"));
        assert_eq!(m["u64"].as_u64(), Some(u64::MAX));
        assert_eq!(m["i64"], Value::I64(-1));
        assert_eq!(m["f64"].as_f64(), Some(0.1));
        assert_eq!(
            m["nested"],
            Value::Array(vec![Value::Array(vec![Value::I32(-3), Value::I32(4)])])
        );
        let t = h.tensor("a").unwrap();
        assert_eq!(
            (t.shape(), t.ty, t.nbytes().unwrap()),
            (vec![2, 3], GgmlType::F32, 24)
        );
        let start = (h.data_start + t.offset) as usize;
        assert_eq!(&bytes[start..start + 24], &a[..]);
        let q = h.tensor("q").unwrap();
        assert_eq!((q.offset, q.nbytes().unwrap()), (64, 68));
    }

    #[test]
    fn every_damaged_prefix_is_an_error_never_a_panic() {
        let bytes = file(
            &[("general.architecture", strv("llama")), ("x", u32v(1))],
            &[("a", vec![4], GgmlType::F32, f32_bytes(&[1.0; 4]))],
            32,
        );
        assert!(Header::parse(&bytes).is_ok());
        for cut in 0..bytes.len() {
            let e = Header::parse(&bytes[..cut]).unwrap_err().to_string();
            assert!(e.contains("truncated") || e.contains("only"), "{cut}: {e}");
            assert!(!e.contains('\n'));
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(Header::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("not a GGUF file"));
        let mut big_endian = bytes.clone();
        big_endian[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(Header::parse(&big_endian)
            .unwrap_err()
            .to_string()
            .contains("big-endian"));
        // A string length far beyond the file.
        let mut long = bytes.clone();
        long[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Header::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("longer than"));
        // A string within the cap but beyond the file.
        long[24..32].copy_from_slice(&(1u64 << 12).to_le_bytes());
        assert!(Header::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        // An array count beyond the file.
        let mut payload = 4u32.to_le_bytes().to_vec();
        payload.extend((1u64 << 40).to_le_bytes());
        let arr = file(&[("a", kv(9, payload))], &[], 32);
        assert!(Header::parse(&arr)
            .unwrap_err()
            .to_string()
            .contains("cannot fit"));
        // A row that does not fill whole blocks.
        let odd = file(&[], &[("q", vec![40], GgmlType::Q8_0, vec![0; 68])], 32);
        assert!(Header::parse(&odd)
            .unwrap_err()
            .to_string()
            .contains("not a multiple"));
    }

    #[test]
    fn counts_are_bounded_by_bytes_left_and_memory() {
        // 1000 u64 elements need 8000 bytes; the file holds far fewer.
        let mut payload = 10u32.to_le_bytes().to_vec();
        payload.extend(1000u64.to_le_bytes());
        payload.extend([0u8; 1000]);
        let arr = file(&[("a", kv(9, payload))], &[], 32);
        assert!(Header::parse(&arr)
            .unwrap_err()
            .to_string()
            .contains("cannot fit"));
        // Elements of one byte each, but more of them than the memory budget allows: refused
        // before anything is reserved.
        let n = METADATA_MEMORY_LIMIT / std::mem::size_of::<Value>() as u64 + 1;
        let mut payload = 0u32.to_le_bytes().to_vec();
        payload.extend(n.to_le_bytes());
        payload.resize(payload.len() + n as usize, 0);
        let arr = file(&[("a", kv(9, payload))], &[], 32);
        let e = Header::parse(&arr).unwrap_err().to_string();
        assert!(e.contains("MiB of memory"), "{e}");
        // A key longer than the name cap.
        let mut b = MAGIC.to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend((MAX_NAME_BYTES + 1).to_le_bytes());
        b.resize(b.len() + MAX_NAME_BYTES as usize + 16, b'k');
        assert!(Header::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("longer than"));
    }
}
