//! GGUF checkpoints (llama.cpp's format) for the Llama and Qwen2 architectures, loaded so that
//! every tensor is bit-identical to what `transformers` loads with
//! `from_pretrained(dir, gguf_file=..., dtype=torch.float32)`.
//!
//! - **Where**: `--model` may name a `.gguf` file, or a folder holding exactly one `.gguf` and no
//!   safetensors ([`locate`]).
//! - **Config**: a GGUF has no config.json; [`config_json`] writes the one its metadata implies
//!   (`general.architecture`, `{arch}.embedding_length`, `.block_count`, `.feed_forward_length`,
//!   `.attention.head_count(_kv)`, `.rope.freq_base`, `.attention.layer_norm_rms_epsilon`,
//!   `.context_length`, the vocabulary size, tied when there is no `output.weight`) and the
//!   engine's own config parser validates it.
//! - **Tensors**: llama.cpp names become Hugging Face names ([`hf_name`]); dims are stored
//!   fastest-first, so the HF shape is the reverse. F32, F16 and BF16 tensors stay memory-mapped in
//!   their stored dtype; Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K blocks are dequantized
//!   to F32 at load with the exact float32 operations of `gguf-py` (which `transformers` calls), so
//!   the values match bit for bit. Other types (Q2_K, Q3_K, IQ*, ...) are refused by name.
//! - **Llama q/k**: llama.cpp's converter permutes the rows of Llama's `q_proj`/`k_proj` (weights
//!   and biases) for its RoPE layout; [`unpermute_rows`] undoes it exactly as `transformers`'
//!   `LlamaTensorProcessor._reverse_permute_weights` does. Qwen2 files are not permuted.
//! - **Tokenizer**: a `tokenizer.json` beside the `.gguf` wins; without one, the byte-level BPE
//!   tokenizer the metadata describes is built as `transformers` builds it ([`tokenizer_json`]).
//!   `tokenizer.chat_template` is exposed by [`chat_template`].
//!
//! Damaged files (bad magic, truncation anywhere, impossible counts, unknown tensor types) are
//! one-line errors naming the file and the problem.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::weights::{Checkpoint, StoredDtype, Tensor};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    pub fn nbytes(&self) -> std::result::Result<u64, String> {
        let (per_block, block_bytes) = self.ty.block().ok_or_else(|| {
            format!(
                "tensor '{}' has unknown ggml type id {}",
                self.name, self.ty.0
            )
        })?;
        let row = self.dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(per_block) {
            return Err(format!(
                "tensor '{}': its row length {row} is not a multiple of the {} block size {per_block}",
                self.name, self.ty
            ));
        }
        self.numel()
            .and_then(|n| (n / per_block).checked_mul(block_bytes))
            .ok_or_else(|| format!("tensor '{}': dims {:?} overflow", self.name, self.dims))
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
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &str) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() as u64 {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {} but the file ends at {}",
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn bytes_of_string(&mut self, what: &str) -> std::result::Result<&'a [u8], String> {
        let n = self.u64(what)?;
        self.take(n, what)
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> std::result::Result<Value, String> {
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
                    return Err(format!(
                        "{what}: bool byte {b} is neither 0 nor 1 (corrupt)"
                    ))
                }
            },
            8 => Value::String(String::from_utf8_lossy(self.bytes_of_string(what)?).into_owned()),
            9 => {
                if depth >= 4 {
                    return Err(format!("{what}: arrays nested too deep (corrupt)"));
                }
                let elem = self.u32(what)?;
                let count = self.u64(what)?;
                // Every element takes at least one byte: a count beyond what is left is damage,
                // and must not become an allocation.
                if count > self.remaining() as u64 {
                    return Err(format!(
                        "{what}: an array of {count} elements cannot fit in the {} bytes left (truncated or corrupt)",
                        self.remaining()
                    ));
                }
                let mut v = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    v.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(format!("{what}: unknown metadata value type {t} (corrupt)")),
        })
    }
}

impl Header {
    /// Parses the header of a GGUF file held in `buf` and checks that every tensor of a type
    /// lockstep reads lies inside the file. The error is one line without the path.
    pub fn parse(buf: &[u8]) -> std::result::Result<Header, String> {
        if buf.len() < 4 {
            return Err(format!(
                "the file is only {} bytes, too short for the GGUF magic (truncated, or not a GGUF file)",
                buf.len()
            ));
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
            return Err(format!(
                "not a GGUF file: it starts with {shown}, not the magic \"GGUF\" (a model is a Hugging Face folder or a .gguf file)"
            ));
        }
        let mut r = Reader { buf, pos: 4 };
        let version = r.u32("the version")?;
        if version != 2 && version != 3 {
            return Err(format!(
                "GGUF version {version} is not supported (2 and 3 are{})",
                if version.swap_bytes() <= 3 {
                    "; this looks like a big-endian file"
                } else {
                    ""
                }
            ));
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        // A metadata entry takes at least 13 bytes, a tensor entry at least 24.
        if n_kv.saturating_mul(13) > r.remaining() as u64 {
            return Err(format!(
                "metadata count {n_kv} cannot fit in a {}-byte file (truncated or corrupt)",
                buf.len()
            ));
        }
        if n_tensors.saturating_mul(24) > r.remaining() as u64 {
            return Err(format!(
                "tensor count {n_tensors} cannot fit in a {}-byte file (truncated or corrupt)",
                buf.len()
            ));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.bytes_of_string(&format!("metadata key #{i}"))?;
            let key = std::str::from_utf8(key)
                .map_err(|_| format!("metadata key #{i} is not UTF-8 (corrupt)"))?
                .to_string();
            let what = format!("metadata '{key}'");
            let ty = r.u32(&what)?;
            let v = r.value(ty, &what, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(format!("metadata key '{key}' appears twice (corrupt)"));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(format!(
                        "general.alignment {v:?} is not a positive power of two"
                    ))
                }
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = r.bytes_of_string(&format!("the name of tensor #{i}"))?;
            let name = String::from_utf8_lossy(name).into_owned();
            let what = format!("tensor '{name}'");
            let n_dims = r.u32(&what)?;
            if n_dims > 8 {
                return Err(format!("{what} claims {n_dims} dimensions (corrupt)"));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let ty = GgmlType(r.u32(&what)?);
            let offset = r.u64(&what)?;
            if !names.insert(name.clone()) {
                return Err(format!(
                    "tensor '{name}' appears twice in the tensor table (corrupt)"
                ));
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
            return Err(format!(
                "truncated: the tensor data should start at offset {data_start} but the file ends at {len}"
            ));
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
                    return Err(format!(
                        "truncated: tensor '{}' ({} {:?}) needs bytes {start}..{} of the file but it ends at {len}",
                        t.name,
                        t.ty,
                        t.shape(),
                        start.saturating_add(n)
                    ))
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

/// Whether `path` names a GGUF checkpoint: a file named `*.gguf` or starting with the GGUF magic,
/// or a folder holding exactly one `*.gguf` and neither `model.safetensors` nor
/// `model.safetensors.index.json`. `Ok(None)`: not GGUF (a Hugging Face folder, nothing there, or
/// some other file, which the caller reports as not being a model folder).
pub fn locate(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        let named = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let mut magic = [0u8; 4];
        let starts = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok_and(|()| &magic == MAGIC);
        return Ok((named || starts).then(|| path.to_path_buf()));
    }
    if !path.is_dir()
        || path.join("model.safetensors").exists()
        || path.join("model.safetensors.index.json").exists()
    {
        return Ok(None);
    }
    let entries = std::fs::read_dir(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        n => Err(EngineError::Config {
            path: path.to_path_buf(),
            msg: format!(
                "{n} .gguf files and no safetensors; pass the one to load ({})",
                found
                    .iter()
                    .filter_map(|p| p.file_name()?.to_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Maps a GGUF file and parses its header.
pub fn read(path: &Path) -> Result<(Arc<Mmap>, Header)> {
    let map = crate::weights::map_readonly(path)?;
    let header = Header::parse(&map).map_err(|msg| {
        if msg.starts_with("not a GGUF file") {
            bad(path, msg)
        } else {
            bad(path, format!("invalid GGUF file: {msg}"))
        }
    })?;
    Ok((Arc::new(map), header))
}

fn bad(path: &Path, msg: String) -> EngineError {
    EngineError::Config {
        path: path.to_path_buf(),
        msg,
    }
}

/// The Hugging Face name of a llama.cpp tensor of a Llama / Qwen2 model, `None` when it has none.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    match kind {
        "weight" => {}
        "bias" if module.starts_with("self_attn.") && module != "self_attn.o_proj" => {}
        _ => return None,
    }
    Some(format!("model.layers.{layer}.{module}.{kind}"))
}

/// The config.json text a GGUF's metadata implies, read as `transformers` reads it (its
/// `GGUF_CONFIG_MAPPING`), for [`ModelConfig::from_json_str`] to validate. Refuses what the
/// engine does not compute (other architectures, RoPE scaling, Llama-3 `rope_freqs`).
pub fn config_json(h: &Header) -> std::result::Result<String, String> {
    let arch = h
        .get("general.architecture")
        .ok_or("no general.architecture in the metadata")?
        .as_str()
        .ok_or("general.architecture is not a string")?;
    let (class, model_type) = match arch {
        "llama" => ("LlamaForCausalLM", "llama"),
        "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
        other => {
            return Err(format!(
            "architecture '{other}' is not supported (lockstep reads llama and qwen2 GGUF files)"
        ))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| -> std::result::Result<Option<u64>, String> {
        match h.get(&key(k)) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{} must be a non-negative integer, got {v:?}", key(k))),
        }
    };
    let need = |k: &str| -> std::result::Result<u64, String> {
        int(k)?.ok_or_else(|| format!("missing metadata {}", key(k)))
    };
    let float = |k: &str| -> std::result::Result<Option<f64>, String> {
        match h.get(&key(k)) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("{} must be a number, got {v:?}", key(k))),
        }
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = int("attention.head_count_kv")?.unwrap_or(heads);
    if let Some(t) = h.get(&key("rope.scaling.type")) {
        if t.as_str() != Some("none") {
            return Err(format!(
                "rope scaling {t:?} ({}) is not implemented (only the default RoPE)",
                key("rope.scaling.type")
            ));
        }
    }
    if h.tensor("rope_freqs.weight").is_some() {
        return Err(
            "the file has rope_freqs.weight (Llama-3 RoPE scaling), which is not implemented"
                .into(),
        );
    }
    // transformers maps llama's rope.dimension_count to head_dim and ignores it for qwen2.
    let head_dim = match (arch, int("rope.dimension_count")?) {
        ("llama", Some(d)) => d,
        _ if heads > 0 => hidden / heads,
        _ => 0,
    };
    if let Some(k) = int("attention.key_length")? {
        if k != head_dim {
            return Err(format!(
                "{} is {k} but the head size is {head_dim}; not supported",
                key("attention.key_length")
            ));
        }
    }
    let vocab = match int("vocab_size")? {
        Some(v) => v,
        None => match h.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
            Some(t) => t.len() as u64,
            None => h
                .tensor("token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .ok_or(
                    "cannot tell the vocabulary size (no vocab_size, no tokenizer.ggml.tokens)",
                )?,
        },
    };
    let tok_id = |k: &str| -> Option<u64> { h.get(&format!("tokenizer.ggml.{k}"))?.as_u64() };
    let mut cfg = serde_json::json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "rms_norm_eps": float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
        "rope_theta": float("rope.freq_base")?.unwrap_or(10000.0),
        "tie_word_embeddings": h.tensor("output.weight").is_none(),
    });
    let obj = cfg.as_object_mut().expect("object");
    if let Some(n) = int("context_length")? {
        obj.insert("max_position_embeddings".into(), n.into());
    }
    if arch == "llama" {
        obj.insert(
            "attention_bias".into(),
            h.tensor("blk.0.attn_q.bias").is_some().into(),
        );
    } else {
        obj.insert("use_sliding_window".into(), false.into());
    }
    if let Some(b) = tok_id("bos_token_id") {
        obj.insert("bos_token_id".into(), b.into());
    }
    if let Some(e) = tok_id("eos_token_id") {
        obj.insert("eos_token_id".into(), e.into());
    }
    // transformers' rule (GgufHeader.dtype): no dtype when anything is quantized; otherwise the
    // half type when there is one (the norms of a half file are F32), else float32.
    let types: Vec<GgmlType> = h.tensors.iter().map(|t| t.ty).collect();
    let float_types = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];
    if !types.is_empty() && types.iter().all(|t| float_types.contains(t)) {
        let d = if types.contains(&GgmlType::BF16) {
            "bfloat16"
        } else if types.contains(&GgmlType::F16) {
            "float16"
        } else {
            "float32"
        };
        obj.insert("dtype".into(), d.into());
    }
    Ok(serde_json::to_string_pretty(&cfg).expect("JSON"))
}

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
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) -> std::result::Result<(), String> {
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
        other => return Err(format!("{other} is not a block type lockstep dequantizes")),
    };
    if !src.len().is_multiple_of(block_bytes) || out.len() != src.len() / block_bytes * per_block {
        return Err(format!(
            "{ty}: {} bytes do not make {} values",
            src.len(),
            out.len()
        ));
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
) -> std::result::Result<Vec<u8>, String> {
    let rows = data.len() / row_bytes.max(1);
    if row_bytes == 0
        || n_head == 0
        || !data.len().is_multiple_of(row_bytes)
        || !rows.is_multiple_of(2 * n_head)
    {
        return Err(format!(
            "cannot undo the q/k permutation: {rows} rows do not split into {n_head} heads of pairs"
        ));
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

/// Opens a GGUF checkpoint: the config its metadata implies and every tensor under its Hugging
/// Face name (see the module docs). Every tensor in the file must be one the model uses.
pub fn load(path: &Path) -> Result<(ModelConfig, Checkpoint)> {
    let (map, h) = read(path)?;
    let json = config_json(&h).map_err(|m| bad(path, format!("GGUF metadata: {m}")))?;
    let config =
        ModelConfig::from_json_str(&json).map_err(|m| bad(path, format!("GGUF metadata: {m}")))?;
    let llama = h.get("general.architecture").and_then(Value::as_str) == Some("llama");
    for t in &h.tensors {
        if !t.ty.is_supported() {
            return Err(bad(
                path,
                format!(
                    "tensor '{}' is stored as {}, which lockstep does not read (supported: {})",
                    t.name,
                    t.ty,
                    GgmlType::SUPPORTED.map(|t| t.name()).join(", ")
                ),
            ));
        }
        if hf_name(&t.name).is_none() {
            return Err(bad(
                path,
                format!(
                    "tensor '{}' has no counterpart in a Hugging Face {:?} model",
                    t.name, config.arch
                ),
            ));
        }
    }
    let loaded: Result<Vec<(String, Tensor)>> = h
        .tensors
        .par_iter()
        .map(|t| {
            let name = hf_name(&t.name).expect("checked");
            let shape = t.shape();
            let start = (h.data_start + t.offset) as usize;
            let end = start + t.nbytes().map_err(|m| bad(path, m))? as usize;
            let raw = &map[start..end];
            let (dtype, owned): (StoredDtype, Option<Vec<u8>>) = match t.ty {
                GgmlType::F32 => (StoredDtype::F32, None),
                GgmlType::F16 => (StoredDtype::F16, None),
                GgmlType::BF16 => (StoredDtype::BF16, None),
                ty => {
                    let mut vals = vec![0f32; t.numel().expect("checked") as usize];
                    dequantize(ty, raw, &mut vals).map_err(|m| bad(path, m))?;
                    let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
                    (StoredDtype::F32, Some(bytes))
                }
            };
            let n_head = if !llama {
                None
            } else if t.name.contains(".attn_q.") {
                Some(config.num_heads)
            } else if t.name.contains(".attn_k.") {
                Some(config.num_kv_heads)
            } else {
                None
            };
            let tensor = match (n_head, owned) {
                (Some(n), owned) => {
                    let data = owned.as_deref().unwrap_or(raw);
                    let row = *shape.get(1).unwrap_or(&1) * dtype.size();
                    let out = unpermute_rows(data, row, n)
                        .map_err(|m| bad(path, format!("tensor '{}': {m}", t.name)))?;
                    Tensor::from_bytes(dtype, shape, out)
                }
                (None, Some(bytes)) => Tensor::from_bytes(dtype, shape, bytes),
                (None, None) => Tensor::mapped(map.clone(), start, end, dtype, shape),
            };
            Ok((name, tensor))
        })
        .collect();
    let tensors: BTreeMap<String, Tensor> = loaded?.into_iter().collect();
    let ck = Checkpoint {
        dir: path.to_path_buf(),
        tensors,
        files: vec![path.to_path_buf()],
        config_json: Some(json),
    };
    Ok((config, ck))
}

/// Split patterns `transformers` puts before the byte-level step, by `tokenizer.ggml.pre`
/// (its `GGUF_PRE_TOKENIZER_SPLITS`); any other value keeps GPT-2's own byte-level regex.
fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// GPT-2's reversible byte-to-character map (`bytes_to_unicode`).
fn byte_alphabet() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).expect("latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("BMP")
        };
    }
    map
}

/// The `tokenizer.json` text of the byte-level BPE tokenizer a GGUF's metadata describes
/// (`tokenizer.ggml.model = "gpt2"`), built as `transformers` builds it
/// (`integrations/gguf/gguf_tokenizer_mapping.py`): vocabulary spelled in GPT-2's byte alphabet,
/// the file's merges, control tokens (type 3) as special added tokens and user-defined ones
/// (type 4) as plain added tokens, the split regex its `tokenizer.ggml.pre` calls for, and a BOS
/// prepended only when `tokenizer.ggml.add_bos_token` says so.
pub fn tokenizer_json(h: &Header) -> std::result::Result<String, String> {
    use serde_json::{json, Map, Value as J};
    let model = h
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or("no tokenizer in its metadata (tokenizer.ggml.model)")?;
    if model != "gpt2" {
        return Err(format!(
            "its tokenizer is '{model}'; lockstep builds only byte-level BPE ('gpt2') tokenizers from GGUF metadata"
        ));
    }
    let strings = |key: &str| -> std::result::Result<Vec<&str>, String> {
        h.get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| format!("no {key} in its metadata"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| format!("{key} holds a non-string"))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = h
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0) as i64).collect())
        .unwrap_or_default();
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::new();
    for (id, t) in tokens.iter().enumerate() {
        let spelled: String = if in_alphabet(t) {
            t.to_string()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(spelled, id.into());
    }
    let merges: Vec<J> = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m, ""));
            json!([a, b])
        })
        .collect();
    let added = |id: usize, t: &str, special: bool| {
        json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": special})
    };
    let mut added_tokens = vec![];
    for (id, (t, ty)) in tokens.iter().zip(&types).enumerate() {
        if *ty == 3 && in_alphabet(t) {
            added_tokens.push(added(id, t, true));
        }
    }
    for (id, (t, ty)) in tokens.iter().zip(&types).enumerate() {
        if *ty == 4 && vocab.contains_key(*t) {
            added_tokens.push(added(id, t, false));
        }
    }
    let pre = h
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("");
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre_tokenizer = match pre_tokenizer_split(pre) {
        Some(re) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        None => byte_level(true),
    };
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let add_bos = h.get("tokenizer.ggml.add_bos_token") == Some(&Value::Bool(true));
    let bos = h
        .get("tokenizer.ggml.bos_token_id")
        .and_then(Value::as_u64)
        .and_then(|i| Some((i, *tokens.get(i as usize)?)));
    let post_processor = match (add_bos, bos) {
        (true, Some((id, t))) => {
            let special = |type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
            json!({"type": "TemplateProcessing",
                   "single": [special(0), seq("A", 0)],
                   "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
                   "special_tokens": {t: {"id": t, "ids": [id], "tokens": [t]}}})
        }
        _ => json!({"type": "TemplateProcessing", "single": [seq("A", 0)],
                    "pair": [seq("A", 0), seq("B", 1)], "special_tokens": {}}),
    };
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    Ok(tj.to_string())
}

/// The tokenizer of a GGUF checkpoint: `tokenizer.json` beside the file when there is one (it
/// wins), else the one its metadata describes ([`tokenizer_json`]).
pub fn tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let beside = path
        .parent()
        .unwrap_or(Path::new("."))
        .join("tokenizer.json");
    if beside.exists() {
        return tokenizers::Tokenizer::from_file(&beside)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", beside.display())));
    }
    let (_, h) = read(path)?;
    let json = tokenizer_json(&h).map_err(|m| {
        EngineError::Tokenizer(format!(
            "{}: no tokenizer.json beside it, and {m}",
            path.display()
        ))
    })?;
    json.parse::<tokenizers::Tokenizer>()
        .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
}

/// The chat template a GGUF carries (`tokenizer.chat_template`), if any.
pub fn chat_template(h: &Header) -> Option<&str> {
    h.get("tokenizer.chat_template").and_then(Value::as_str)
}

/// The `tokenizer_config.json` content `transformers` derives from a GGUF's metadata: its
/// `chat_template` and the text of its special tokens (`bos_token`, `eos_token`, `unk_token`,
/// `pad_token` from the `tokenizer.ggml.*_token_id` ids), for code that reads a model folder's
/// tokenizer_config.json (chat templates) to read from a GGUF instead.
pub fn tokenizer_config(h: &Header) -> serde_json::Value {
    let mut cfg = serde_json::Map::new();
    if let Some(t) = chat_template(h) {
        cfg.insert("chat_template".into(), t.into());
    }
    let tokens = h.get("tokenizer.ggml.tokens").and_then(Value::as_array);
    for (name, key) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        let text = h
            .get(&format!("tokenizer.ggml.{key}"))
            .and_then(Value::as_u64)
            .and_then(|id| tokens?.get(id as usize)?.as_str());
        if let Some(t) = text {
            cfg.insert(name.into(), t.into());
        }
    }
    serde_json::Value::Object(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A metadata value to write: (type id, payload bytes).
    fn kv(ty: u32, payload: Vec<u8>) -> (u32, Vec<u8>) {
        (ty, payload)
    }

    fn string_bytes(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend(s.as_bytes());
        b
    }

    fn u32v(x: u32) -> (u32, Vec<u8>) {
        kv(4, x.to_le_bytes().to_vec())
    }

    fn f32v(x: f32) -> (u32, Vec<u8>) {
        kv(6, x.to_le_bytes().to_vec())
    }

    fn strv(s: &str) -> (u32, Vec<u8>) {
        kv(8, string_bytes(s))
    }

    /// A whole GGUF v3 file: metadata, then tensors (name, dims fastest-first, type, data) laid
    /// out at `alignment`.
    fn file(
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

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn h16(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_le_bytes()
    }

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
            let e = Header::parse(&bytes[..cut]).unwrap_err();
            assert!(e.contains("truncated") || e.contains("only"), "{cut}: {e}");
            assert!(!e.contains('\n'));
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(Header::parse(&bad).unwrap_err().contains("not a GGUF file"));
        let mut big_endian = bytes.clone();
        big_endian[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(Header::parse(&big_endian)
            .unwrap_err()
            .contains("big-endian"));
        // A string length far beyond the file.
        let mut long = bytes.clone();
        long[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Header::parse(&long).unwrap_err().contains("truncated"));
        // An array count beyond the file.
        let mut payload = 4u32.to_le_bytes().to_vec();
        payload.extend((1u64 << 40).to_le_bytes());
        let arr = file(&[("a", kv(9, payload))], &[], 32);
        assert!(Header::parse(&arr).unwrap_err().contains("cannot fit"));
        // A row that does not fill whole blocks.
        let odd = file(&[], &[("q", vec![40], GgmlType::Q8_0, vec![0; 68])], 32);
        assert!(Header::parse(&odd).unwrap_err().contains("not a multiple"));
    }

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

    #[test]
    fn maps_llama_cpp_names_to_hugging_face() {
        for (g, hf) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.12.ffn_norm.weight",
                "model.layers.12.post_attention_layernorm.weight",
            ),
            (
                "blk.3.attn_q.weight",
                "model.layers.3.self_attn.q_proj.weight",
            ),
            ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
            ("blk.3.attn_k.bias", "model.layers.3.self_attn.k_proj.bias"),
            (
                "blk.3.attn_v.weight",
                "model.layers.3.self_attn.v_proj.weight",
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.3.ffn_gate.weight",
                "model.layers.3.mlp.gate_proj.weight",
            ),
            ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
            (
                "blk.3.ffn_down.weight",
                "model.layers.3.mlp.down_proj.weight",
            ),
        ] {
            assert_eq!(hf_name(g).as_deref(), Some(hf), "{g}");
        }
        for g in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.0.attn_output.bias",
            "blk.0.ffn_norm.bias",
            "blk.0.attn_qkv.weight",
        ] {
            assert_eq!(hf_name(g), None, "{g}");
        }
    }

    fn smollm2_like(arch: &str) -> Vec<(String, (u32, Vec<u8>))> {
        let k = |s: &str| format!("{arch}.{s}");
        vec![
            ("general.architecture".into(), strv(arch)),
            (k("block_count"), u32v(30)),
            (k("context_length"), u32v(8192)),
            (k("embedding_length"), u32v(576)),
            (k("feed_forward_length"), u32v(1536)),
            (k("attention.head_count"), u32v(9)),
            (k("attention.head_count_kv"), u32v(3)),
            (k("rope.freq_base"), f32v(100000.0)),
            (k("attention.layer_norm_rms_epsilon"), f32v(1e-5)),
            (k("vocab_size"), u32v(49152)),
            (k("rope.dimension_count"), u32v(64)),
            ("tokenizer.ggml.bos_token_id".into(), u32v(1)),
            ("tokenizer.ggml.eos_token_id".into(), u32v(2)),
        ]
    }

    fn header(kvs: &[(String, (u32, Vec<u8>))], tensors: &[&str]) -> Header {
        let kvs: Vec<(&str, (u32, Vec<u8>))> =
            kvs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let ts: Vec<(&str, Vec<u64>, GgmlType, Vec<u8>)> = tensors
            .iter()
            .map(|n| (*n, vec![1], GgmlType::F32, vec![0; 4]))
            .collect();
        Header::parse(&file(&kvs, &ts, 32)).unwrap()
    }

    #[test]
    fn config_from_metadata() {
        let h = header(&smollm2_like("llama"), &["token_embd.weight"]);
        let c = ModelConfig::from_json_str(&config_json(&h).unwrap()).unwrap();
        assert_eq!(c.arch, crate::Architecture::Llama);
        assert_eq!(
            (
                c.num_layers,
                c.hidden_size,
                c.intermediate_size,
                c.vocab_size
            ),
            (30, 576, 1536, 49152)
        );
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
        assert_eq!(c.rms_norm_eps, 1e-5f32 as f64);
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.max_position_embeddings, 8192);
        assert!(c.tie_word_embeddings && !c.qkv_bias);
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(1), vec![2])
        );
        assert_eq!(c.declared_dtype.as_deref(), Some("float32"));
        assert_eq!(c.parameter_count(), 134_515_008);
        // Untied with output.weight; Qwen2 has biases and ignores rope.dimension_count.
        let h = header(&smollm2_like("qwen2"), &["output.weight"]);
        let c = ModelConfig::from_json_str(&config_json(&h).unwrap()).unwrap();
        assert_eq!(c.arch, crate::Architecture::Qwen2);
        assert!(c.qkv_bias && !c.tie_word_embeddings);
        assert_eq!(c.head_dim, 64);
        // Vocabulary from the token list when there is no vocab_size.
        let mut kvs = smollm2_like("llama");
        kvs.retain(|(k, _)| k != "llama.vocab_size");
        let mut tokens = 8u32.to_le_bytes().to_vec();
        tokens.extend(3u64.to_le_bytes());
        for t in ["a", "b", "c"] {
            tokens.extend(string_bytes(t));
        }
        kvs.push(("tokenizer.ggml.tokens".into(), kv(9, tokens)));
        let c = ModelConfig::from_json_str(&config_json(&header(&kvs, &[])).unwrap()).unwrap();
        assert_eq!(c.vocab_size, 3);
    }

    #[test]
    fn refuses_what_the_engine_does_not_compute() {
        let e = config_json(&header(&smollm2_like("gemma"), &[])).unwrap_err();
        assert!(e.contains("'gemma'"), "{e}");
        let mut kvs = smollm2_like("llama");
        kvs.push(("llama.rope.scaling.type".into(), strv("yarn")));
        assert!(config_json(&header(&kvs, &[]))
            .unwrap_err()
            .contains("yarn"));
        let e = config_json(&header(&smollm2_like("llama"), &["rope_freqs.weight"])).unwrap_err();
        assert!(e.contains("rope_freqs"), "{e}");
        let mut kvs = smollm2_like("llama");
        kvs.retain(|(k, _)| k != "llama.block_count");
        let e = config_json(&header(&kvs, &[])).unwrap_err();
        assert!(e.contains("missing metadata llama.block_count"), "{e}");
        let mut kvs = smollm2_like("llama");
        kvs.push(("llama.attention.key_length".into(), u32v(128)));
        assert!(config_json(&header(&kvs, &[]))
            .unwrap_err()
            .contains("key_length"));
    }

    /// A tiny Llama GGUF: hidden 64, 2 heads of 32 / 1 kv head, vocab 8, intermediate 32, one layer;
    /// q in Q8_0, k in F16, the rest F32; tied.
    fn tiny_llama() -> (Vec<u8>, Vec<f32>) {
        let (h, v, f, kvd) = (64u64, 8u64, 32u64, 32u64);
        let k = |s: &str| format!("llama.{s}");
        let kvs: Vec<(String, (u32, Vec<u8>))> = vec![
            ("general.architecture".into(), strv("llama")),
            (k("block_count"), u32v(1)),
            (k("embedding_length"), u32v(h as u32)),
            (k("feed_forward_length"), u32v(f as u32)),
            (k("attention.head_count"), u32v(2)),
            (k("attention.head_count_kv"), u32v(1)),
            (k("vocab_size"), u32v(v as u32)),
        ];
        let ramp = |n: u64, s: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * s).sin()).collect() };
        // q: 64 rows of 64, Q8_0 with d = 1/64 and q[i] = row - 32 (one value per row).
        let mut q = vec![];
        let mut q_vals = vec![];
        for r in 0..h {
            for _ in 0..2 {
                q.extend(h16(1.0 / 64.0));
                q.extend([(r as i8 - 32) as u8; 32]);
            }
            q_vals.push((r as f32 - 32.0) / 64.0);
        }
        let k_f16: Vec<u8> = ramp(kvd * h, 0.01)
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let t = |n: &'static str, dims: Vec<u64>, s: f32| {
            let numel = dims.iter().product();
            (n, dims, GgmlType::F32, f32_bytes(&ramp(numel, s)))
        };
        let tensors = vec![
            t("token_embd.weight", vec![h, v], 0.1),
            t("blk.0.attn_norm.weight", vec![h], 0.2),
            ("blk.0.attn_q.weight", vec![h, h], GgmlType::Q8_0, q),
            ("blk.0.attn_k.weight", vec![h, kvd], GgmlType::F16, k_f16),
            t("blk.0.attn_v.weight", vec![h, kvd], 0.3),
            t("blk.0.attn_output.weight", vec![h, h], 0.4),
            t("blk.0.ffn_norm.weight", vec![h], 0.5),
            t("blk.0.ffn_gate.weight", vec![h, f], 0.6),
            t("blk.0.ffn_up.weight", vec![h, f], 0.7),
            t("blk.0.ffn_down.weight", vec![f, h], 0.8),
            t("output_norm.weight", vec![h], 0.9),
        ];
        let kvs: Vec<(&str, (u32, Vec<u8>))> =
            kvs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        (file(&kvs, &tensors, 32), q_vals)
    }

    #[test]
    fn loads_a_tiny_llama_through_model_load() {
        let d = tempfile::tempdir().unwrap();
        let (bytes, q_rows) = tiny_llama();
        let p = d.path().join("tiny.gguf");
        std::fs::write(&p, &bytes).unwrap();
        for path in [p.clone(), d.path().to_path_buf()] {
            let m = crate::Model::load(&path).unwrap();
            assert!(m.config.tie_word_embeddings);
            assert_eq!(m.lm_head.bytes().as_ptr(), m.embed_tokens.bytes().as_ptr());
            // q: dequantized (row r holds (r - 32)/64 in stored order), then unpermuted per head
            // of 32 rows: HF row a*16 + b is stored row 2b + a.
            let qp = &m.layers[0].q_proj;
            assert_eq!(
                (qp.dtype, qp.shape.clone(), qp.is_mapped()),
                (StoredDtype::F32, vec![64, 64], false)
            );
            for hf_row in 0..64 {
                let (head, within) = (hf_row / 32, hf_row % 32);
                let (a, b) = (within / 16, within % 16);
                let stored = head * 32 + 2 * b + a;
                let row = qp.row_bytes(hf_row);
                let v = f32::from_le_bytes(row[..4].try_into().unwrap());
                assert_eq!(v, q_rows[stored], "row {hf_row}");
            }
            // k: F16 kept as F16, reordered in memory; v: F32 mapped.
            assert_eq!(m.layers[0].k_proj.dtype, StoredDtype::F16);
            assert!(!m.layers[0].k_proj.is_mapped());
            assert!(m.layers[0].v_proj.is_mapped());
            assert_eq!(m.checkpoint.tensors.len(), 11);
            assert!(m.checkpoint.fingerprint().unwrap().len() == 64);
            let mut cache = crate::KvCache::<f64>::new(1);
            let logits = m
                .forward(&[1, 2, 3], &mut cache, &mut crate::NoObserver)
                .unwrap();
            assert_eq!(logits.len(), 3 * 8);
            assert!(logits.iter().all(|x| x.is_finite()));
        }
        // Checkpoint::open understands the file and its folder too.
        let c = Checkpoint::open(&p).unwrap();
        assert!(c.contains("model.layers.0.self_attn.q_proj.weight"));
        assert_eq!(c.files, vec![p.clone()]);
        // A folder with safetensors is not GGUF, whatever else it holds.
        std::fs::write(d.path().join("model.safetensors"), b"").unwrap();
        assert_eq!(locate(d.path()).unwrap(), None);
    }
}
