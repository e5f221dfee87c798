//! Checkpoint tensors: `model.safetensors` or the shards of `model.safetensors.index.json`,
//! memory-mapped and kept in their stored dtype (F32, BF16, F16, F64); kernels decode rows on
//! the fly. At load the weights are put in 2 MiB pages, which memory streams faster: the page
//! cache's own where the kernel can, else a copy, bytes unchanged, when the model fits with room
//! to spare ([`huge_pages`]).
//!
//! A GGUF file (llama.cpp) opens into the same [`Checkpoint`] with Hugging Face tensor names (see
//! [`crate::gguf`]): its tensors stay memory-mapped in their stored dtype, quantized ones as ggml
//! blocks the kernels decode ([`crate::kernels::quant`]).

use crate::error::{EngineError, Result};
use crate::kernels::Float;
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

mod advice;
pub mod bf16_coded;
pub mod bf16_copy;
pub mod coded_cache;
pub mod huge_pages;
mod nonfinite;
pub mod page_cache;
mod safetensors_files;
mod view;

pub use advice::{advise_all, PageAdvice};
pub use nonfinite::NonFiniteTensor;
pub(crate) use safetensors_files::map_readonly;
use safetensors_files::{map_file, read_json, shard_files};

/// Storage dtype of a checkpoint tensor: an IEEE/bfloat format, or a ggml block format (GGUF
/// tensors kept quantized; the kernels decode their blocks, see [`crate::kernels::quant`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum StoredDtype {
    /// IEEE float32.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE float16.
    F16,
    /// IEEE float64.
    F64,
    /// ggml Q8_0: blocks of 32 values, 34 bytes.
    Q8_0,
    /// ggml Q4_0: blocks of 32 values, 18 bytes.
    Q4_0,
    /// ggml Q4_1: blocks of 32 values, 20 bytes.
    Q4_1,
    /// ggml Q5_0: blocks of 32 values, 22 bytes.
    Q5_0,
    /// ggml Q5_1: blocks of 32 values, 24 bytes.
    Q5_1,
    /// ggml Q4_K: blocks of 256 values, 144 bytes.
    Q4_K,
    /// ggml Q5_K: blocks of 256 values, 176 bytes.
    Q5_K,
    /// ggml Q6_K: blocks of 256 values, 210 bytes.
    Q6_K,
}

impl StoredDtype {
    /// Bytes per element of a float dtype; for a block dtype, bytes per block (of
    /// [`Self::block_len`] elements). [`Self::bytes_for`] covers both.
    pub fn size(self) -> usize {
        crate::kernels::quant::block(self).1
    }

    /// Elements per block: 1 for the float dtypes, 32 or 256 for the block ones.
    pub fn block_len(self) -> usize {
        crate::kernels::quant::block(self).0
    }

    /// True for the ggml block dtypes.
    pub fn is_block(self) -> bool {
        self.block_len() > 1
    }

    /// Bytes `n` elements take, `None` when `n` is not a whole number of blocks (or overflows).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (per, bytes) = crate::kernels::quant::block(self);
        n.is_multiple_of(per)
            .then(|| (n / per).checked_mul(bytes))
            .flatten()
    }

    /// Bytes of a row of `cols` elements, or a one-line reason when the row is not a whole
    /// number of blocks.
    pub fn row_bytes(self, cols: usize) -> std::result::Result<usize, String> {
        self.bytes_for(cols).ok_or_else(|| {
            format!(
                "a row of {cols} elements is not a whole number of {} blocks of {}",
                self.name(),
                self.block_len()
            )
        })
    }

    /// The safetensors name (ggml's for the block dtypes).
    pub fn name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "F32",
            StoredDtype::BF16 => "BF16",
            StoredDtype::F16 => "F16",
            StoredDtype::F64 => "F64",
            StoredDtype::Q8_0 => "Q8_0",
            StoredDtype::Q4_0 => "Q4_0",
            StoredDtype::Q4_1 => "Q4_1",
            StoredDtype::Q5_0 => "Q5_0",
            StoredDtype::Q5_1 => "Q5_1",
            StoredDtype::Q4_K => "Q4_K",
            StoredDtype::Q5_K => "Q5_K",
            StoredDtype::Q6_K => "Q6_K",
        }
    }
}

/// The bytes a tensor lives in: a memory-mapped file, or memory of its own (a GGUF tensor
/// dequantized or reordered at load; a whole file copied into 2 MiB pages, see
/// [`huge_pages`]).
#[derive(Clone)]
enum Storage {
    Mapped(Arc<Mmap>),
    Owned(Arc<Vec<u8>>),
    /// A file's bytes copied into anonymous memory (never advised: dropping its pages would
    /// zero them).
    Resident(Arc<Mmap>),
}

impl Storage {
    fn as_slice(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) | Storage::Resident(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// One tensor of the checkpoint: a view into a memory-mapped file, or bytes of its own.
#[derive(Clone)]
pub struct Tensor {
    storage: Storage,
    start: usize,
    end: usize,
    /// Stored dtype.
    pub dtype: StoredDtype,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// For a ggml block dtype: `linear` in f32 rounds its input to 8-bit blocks and sums with
    /// integer dot products, as llama.cpp's CPU backend does ([`crate::Dtype::Q8dot`], set by
    /// [`crate::Model::use_dtype`]). False (exact dequantized math) unless asked for; ignored
    /// for other dtypes and other compute precisions.
    pub q8_dot: bool,
    /// The matrix coded in 12 bits per value for the one-token bf16 decode
    /// ([`bf16_coded`]), once [`Tensor::code_bf16`] made it; shared by clones (a tied LM head
    /// and its embeddings).
    coded: Arc<OnceLock<Option<bf16_coded::Bf16Coded>>>,
    /// This F32 matrix's values rounded to bf16, for products in bf16 compute
    /// ([`bf16_copy`]), once [`Tensor::round_to_bf16_together`] made it; shared by clones.
    bf16_copy: Arc<OnceLock<Option<Tensor>>>,
    /// Set once the coding replaced the stored bytes in memory
    /// ([`Tensor::replace_stored_by_coding`]); shared by clones.
    coding_replaces: Arc<AtomicBool>,
    /// This tensor's values decoded to each compute precision, once [`Tensor::decoded`] was
    /// asked for them; shared by clones.
    decoded: Arc<Decoded>,
}

/// A tensor's values decoded to each compute precision ([`Tensor::decoded`]), in the order of
/// [`Decoded::slot`]: `f64`, `f32`, bf16.
#[derive(Default)]
pub(crate) struct Decoded([OnceLock<Box<[f64]>>; 3]);

impl Decoded {
    /// The slot of `T`'s values.
    fn slot<T: Float>() -> usize {
        match T::PRECISION {
            crate::kernels::Precision::F64 => 0,
            crate::kernels::Precision::F32 => 1,
            crate::kernels::Precision::BF16 => 2,
        }
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.dtype, self.shape)
    }
}

impl Tensor {
    /// A tensor holding `bytes` (little-endian values of `dtype`) in memory of its own.
    ///
    /// # Panics
    /// When `bytes` is not exactly the size of `shape`'s elements in `dtype` (for a block dtype,
    /// when the row length is not a whole number of blocks).
    pub fn from_bytes(dtype: StoredDtype, shape: Vec<usize>, bytes: Vec<u8>) -> Tensor {
        let cols = *shape.last().unwrap_or(&1);
        let rows = shape.iter().product::<usize>() / cols.max(1);
        let want = dtype.row_bytes(cols).map(|r| r * rows);
        assert_eq!(Ok(bytes.len()), want, "{dtype:?} tensor of shape {shape:?}");
        Tensor {
            start: 0,
            end: bytes.len(),
            storage: Storage::Owned(Arc::new(bytes)),
            dtype,
            shape,
            q8_dot: false,
            coded: Arc::default(),
            bf16_copy: Arc::default(),
            coding_replaces: Arc::default(),
            decoded: Arc::default(),
        }
    }

    /// This tensor's values as `T`, as [`crate::kernels::decode_vec`] gives them, decoded at the
    /// first call for `T` and kept (with the tensor's clones): for the small vectors a forward
    /// pass reads at every layer of every step (norm weights, biases), whose decoding into a
    /// new vector each time cost a 0.5B-shape decode step ~2 µs a layer of the leader's serial
    /// work (the q/k/v biases 1.8-2.5 µs, 0.47 µs since).
    pub fn decoded<T: Float>(&self) -> &[T] {
        let n = self.numel();
        let size = std::mem::size_of::<T>();
        // Every `Float` is `f64`, `f32` or `Bf16` (an `f32`, `repr(transparent)`).
        assert!(
            (size == 4 || size == 8) && std::mem::align_of::<T>() <= 8,
            "a Float is 4 or 8 bytes"
        );
        let words = self.decoded.0[Decoded::slot::<T>()].get_or_init(|| {
            let mut words = vec![0f64; (n * size).div_ceil(8)].into_boxed_slice();
            // SAFETY: `words` holds at least `n * size` bytes, aligned to 8 ≥ `T`'s alignment;
            // every bit pattern is a valid `T` (a float).
            let values = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), n) };
            T::decode(self.dtype, self.bytes(), values);
            words
        });
        // SAFETY: as above: the slot of `T` holds `n` values of `T`, written by `T::decode`.
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), n) }
    }

    /// A view of bytes `start..end` of a memory-mapped file (the caller checked the range).
    pub(crate) fn mapped(
        map: Arc<Mmap>,
        start: usize,
        end: usize,
        dtype: StoredDtype,
        shape: Vec<usize>,
    ) -> Tensor {
        debug_assert!(start <= end && end <= map.len());
        Tensor {
            storage: Storage::Mapped(map),
            start,
            end,
            dtype,
            shape,
            q8_dot: false,
            coded: Arc::default(),
            bf16_copy: Arc::default(),
            coding_replaces: Arc::default(),
            decoded: Arc::default(),
        }
    }

    /// Makes the 12-bit coding of this BF16 matrix for one-token decode ([`bf16_coded`]) if it
    /// was not made yet; a tensor that is not a 2-D BF16 matrix (or whose copy memory refused)
    /// gets none. Returns whether it has one.
    pub fn code_bf16(&self) -> bool {
        self.coded
            .get_or_init(|| bf16_coded::Bf16Coded::new(self))
            .is_some()
    }

    /// [`Tensor::code_bf16`] for each of `ts` not tried yet, all coded into one region of 2 MiB
    /// pages ([`bf16_coded::code_together`]); a tensor listed twice, or sharing its coding
    /// with another listed (a clone), is coded once.
    pub fn code_bf16_together(ts: &[&Tensor]) {
        let mut seen = std::collections::HashSet::new();
        let todo: Vec<&Tensor> = ts
            .iter()
            .copied()
            .filter(|t| !t.code_bf16_tried() && seen.insert(Arc::as_ptr(&t.coded)))
            .collect();
        for (t, c) in todo.iter().zip(bf16_coded::code_together(&todo)) {
            // Another thread may have coded it meanwhile: then its coding stays.
            let _ = t.coded.set(c);
        }
    }

    /// Whether [`Tensor::code_bf16`] ran (made a coding or found it could not).
    pub fn code_bf16_tried(&self) -> bool {
        self.coded.get().is_some()
    }

    /// [`bf16_copy`] for each of `ts` not tried yet, all into one region of 2 MiB pages
    /// ([`bf16_copy::round_together`]); a tensor listed twice, or sharing its copy with
    /// another listed (a clone), is rounded once. Tensors that are not 2-D F32 matrices get
    /// none.
    pub fn round_to_bf16_together(ts: &[&Tensor]) {
        let mut seen = std::collections::HashSet::new();
        let todo: Vec<&Tensor> = ts
            .iter()
            .copied()
            .filter(|t| t.bf16_copy.get().is_none() && seen.insert(Arc::as_ptr(&t.bf16_copy)))
            .collect();
        for (t, c) in todo.iter().zip(bf16_copy::round_together(&todo)) {
            // Another thread may have made it meanwhile: then its copy stays.
            let _ = t.bf16_copy.set(c);
        }
    }

    /// Whether [`Tensor::round_to_bf16_together`] ran on this tensor (made a copy or found it
    /// could not).
    pub fn round_to_bf16_tried(&self) -> bool {
        self.bf16_copy.get().is_some()
    }

    /// This F32 matrix rounded to bf16 ([`bf16_copy`]), if [`Tensor::round_to_bf16_together`]
    /// made the copy: what bf16-compute products read instead of rounding the F32 values on
    /// each use.
    pub fn bf16_copy(&self) -> Option<&Tensor> {
        self.bf16_copy.get().and_then(Option::as_ref)
    }

    /// Makes the coding what every bf16-compute product of this matrix reads, a prefill's too
    /// (`kernels::matmul`), and drops the stored bytes from this process's memory: a mapped
    /// file's pages leave the mapping ([`PageAdvice::DontNeed`]; they stay in the page cache
    /// while memory allows, and a product in another compute type reads them back, the same
    /// bytes); bytes held in memory of their own stay. For a model whose coding fits in memory
    /// but not beside its stored matrices ([`crate::Model::code_bf16_instead`]). Returns
    /// whether it did (false where the matrix has no coding).
    pub fn replace_stored_by_coding(&self) -> bool {
        if self.coded().is_none() {
            return false;
        }
        self.coding_replaces.store(true, Ordering::Relaxed);
        self.advise(PageAdvice::DontNeed);
        true
    }

    /// Gives this matrix `coding` (read back from a file, [`coded_cache`]) where it has none
    /// yet; returns whether it took it.
    pub fn set_coding(&self, coding: bf16_coded::Bf16Coded) -> bool {
        self.coded.set(Some(coding)).is_ok()
    }

    /// Whether [`Tensor::replace_stored_by_coding`] made the coding what bf16-compute products
    /// read.
    pub fn coding_replaces_stored(&self) -> bool {
        self.coding_replaces.load(Ordering::Relaxed)
    }

    /// The 12-bit coding [`Tensor::code_bf16`] made, if it did.
    pub fn coded(&self) -> Option<&bf16_coded::Bf16Coded> {
        self.coded.get().and_then(Option::as_ref)
    }

    /// True when the bytes are a view of a memory-mapped file (false: held in memory).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped(_))
    }

    /// True when the bytes are a memory-mapped file's copied into 2 MiB pages at load
    /// ([`huge_pages`]).
    pub fn in_huge_pages(&self) -> bool {
        matches!(self.storage, Storage::Resident(_))
    }

    /// Bytes of the tensor that live in a memory-mapped file (0 when held in memory).
    pub fn mapped_bytes(&self) -> usize {
        if self.is_mapped() {
            self.end - self.start
        } else {
            0
        }
    }

    /// The raw little-endian bytes as stored.
    pub fn bytes(&self) -> &[u8] {
        &self.storage.as_slice()[self.start..self.end]
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of row `r` of a 2-D tensor (or element range of a 1-D one when `r == 0`); for a
    /// block dtype, the row's whole blocks.
    pub fn row_bytes(&self, r: usize) -> &[u8] {
        let cols = *self.shape.last().unwrap_or(&1);
        let w = self.dtype.bytes_for(cols).expect("rows of whole blocks");
        &self.bytes()[r * w..(r + 1) * w]
    }

    /// sha256 of the stored bytes, hex.
    pub fn sha256_hex(&self) -> String {
        hex(&Sha256::digest(self.bytes()))
    }

    /// sha256 of the values as little-endian float32 (what `transformers` holds after loading in
    /// `dtype=torch.float32`): the stored bytes for F32, F16/BF16 widened (exactly), F64 rounded
    /// to nearest, ggml blocks dequantized (exactly as [`crate::gguf::dequantize`]).
    pub fn sha256_f32_hex(&self) -> String {
        if self.dtype == StoredDtype::F32 {
            return self.sha256_hex();
        }
        let mut h = Sha256::new();
        let mut vals = Vec::new();
        let mut buf = Vec::new();
        for chunk in self.element_chunks() {
            vals.resize(chunk.1, 0f32);
            f32::decode(self.dtype, chunk.0, &mut vals);
            buf.clear();
            buf.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
            h.update(&buf);
        }
        hex(&h.finalize())
    }

    /// The values as little-endian float32 bytes (as [`Self::sha256_f32_hex`] hashes them): a
    /// copy, for the few readers that need a block tensor's values as F32.
    pub fn to_f32_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.numel() * 4);
        let mut vals = Vec::new();
        for (b, n) in self.element_chunks() {
            vals.resize(n, 0f32);
            f32::decode(self.dtype, b, &mut vals);
            out.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
        }
        out
    }

    /// sha256 hex of the tensor as loaded, what the model fingerprint and the weights check hash:
    /// the stored bytes, except for ggml blocks, whose float32 values it hashes (what
    /// `transformers` loads from a GGUF; fingerprints stay as when blocks were dequantized at load).
    pub fn sha256_as_loaded_hex(&self) -> String {
        if self.dtype.is_block() {
            self.sha256_f32_hex()
        } else {
            self.sha256_hex()
        }
    }

    /// The stored bytes in consecutive pieces of whole rows (about 64 Ki elements each), with
    /// their element counts.
    fn element_chunks(&self) -> impl Iterator<Item = (&[u8], usize)> {
        let cols = (*self.shape.last().unwrap_or(&1)).max(1);
        let row = self.dtype.bytes_for(cols).expect("rows of whole blocks");
        let rows = (65536 / cols).max(1);
        self.bytes()
            .chunks(row.max(1) * rows)
            .map(move |b| (b, b.len() / row.max(1) * cols))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// All tensors of a checkpoint folder, by name.
pub struct Checkpoint {
    /// Model folder (for a GGUF checkpoint: the .gguf file).
    pub dir: PathBuf,
    /// Tensors by name (sorted).
    pub tensors: BTreeMap<String, Tensor>,
    /// The safetensors (or GGUF) files that were mapped.
    pub files: Vec<PathBuf>,
    /// For a GGUF checkpoint, the config.json text its metadata implies (there is no config.json
    /// to read); `None` for a Hugging Face folder.
    pub(crate) config_json: Option<String>,
    /// Drop each tensor's pages from the mapping once a pass over the whole checkpoint (the
    /// fingerprint, the non-finite scan) has read it, so such a pass holds one tensor at a time
    /// instead of the whole file ([`PageAdvice::DontNeed`]). Set at load when the forward pass
    /// streams the layers ([`crate::model::Model::stream_layers`]); false when opened alone.
    pub stream_pages: bool,
}

impl Checkpoint {
    /// Maps `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    ///
    /// `dir` may also be a `.gguf` file, or a folder holding exactly one `.gguf` and no
    /// safetensors: the GGUF's tensors then come under their Hugging Face names
    /// ([`crate::gguf::load`]).
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_source(&crate::source::ModelSource::resolve(dir)?)
    }

    /// [`Self::open`] for a resolved source.
    pub fn open_source(source: &crate::source::ModelSource) -> Result<Self> {
        let dir = match source {
            crate::source::ModelSource::Gguf { file, .. } => return Ok(crate::gguf::load(file)?.1),
            crate::source::ModelSource::Folder(dir) => dir.as_path(),
        };
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            shard_files(&index)?
        } else {
            return Err(EngineError::MissingFile {
                path: single,
                what: "weights: neither model.safetensors nor model.safetensors.index.json exists"
                    .into(),
            });
        };
        let mut tensors = BTreeMap::new();
        for f in &files {
            for (name, t) in map_file(f)? {
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(EngineError::Safetensors {
                        path: f.clone(),
                        msg: format!("tensor '{name}' appears in more than one shard"),
                    });
                }
            }
        }
        if index.exists() && files.len() > 1 {
            // Every tensor the index promises must be present.
            let v = read_json(&index)?;
            if let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) {
                for name in map.keys() {
                    if !tensors.contains_key(name) {
                        return Err(EngineError::MissingTensor { name: name.clone() });
                    }
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            tensors,
            files,
            config_json: None,
            stream_pages: false,
        })
    }

    /// A tensor that must exist with exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor { name: name.into() })?;
        if t.shape != shape {
            return Err(EngineError::TensorShape {
                name: name.into(),
                got: t.shape.clone(),
                want: shape.to_vec(),
            });
        }
        Ok(t.clone())
    }

    /// Every tensor holding NaN or infinity, in name order, with its counts and the index of its
    /// first non-finite element: one pass over every stored value (memory bandwidth bound; GGUF
    /// tensors dequantized at load are scanned as the F32 values the engine computes with).
    pub fn nonfinite_report(&self) -> Vec<NonFiniteTensor> {
        self.tensors
            .iter()
            .filter_map(|(name, t)| {
                let found = t.nonfinite();
                self.done_with(t);
                let (nan, inf, first) = found?;
                Some(NonFiniteTensor {
                    name: name.clone(),
                    nan,
                    inf,
                    first_index: unravel(first, &t.shape),
                })
            })
            .collect()
    }

    /// After a whole-checkpoint pass has read `t`: drops its pages when [`Self::stream_pages`]
    /// is set (a no-op otherwise).
    pub fn done_with(&self, t: &Tensor) {
        if self.stream_pages {
            t.advise(PageAdvice::DontNeed);
        }
    }

    /// Takes every mapped tensor's pages out of this process's mapping
    /// ([`PageAdvice::DontNeed`]): they stop counting in its resident set and stay in the page
    /// cache while memory allows, and the next read maps them again with the same bytes. For the
    /// steps of a run that hold large data of their own and do not read the weights (`verify`
    /// comparing traces of a 7B model).
    pub fn release_pages(&self) {
        advice::advise_all(self.tensors.values(), PageAdvice::DontNeed);
    }

    /// True when the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The model fingerprint shared with the Python reference tracer: sha256 hex of
    /// `name:sha256(bytes)` lines over tensors in sorted-name order, joined by `\n`, followed by
    /// `\n` and sha256 hex of the config.json bytes (for a GGUF checkpoint: of the config.json
    /// text its metadata implies).
    pub fn fingerprint(&self) -> Result<String> {
        let cfg = match &self.config_json {
            Some(text) => text.as_bytes().to_vec(),
            None => {
                let cfg_path = self.dir.join("config.json");
                std::fs::read(&cfg_path).map_err(|source| EngineError::Io {
                    path: cfg_path,
                    source,
                })?
            }
        };
        let lines: Vec<String> = self
            .tensors
            .iter()
            .map(|(n, t)| {
                let line = format!("{n}:{}", t.sha256_as_loaded_hex());
                self.done_with(t);
                line
            })
            .collect();
        let mut s = lines.join("\n");
        s.push('\n');
        s.push_str(&hex(&Sha256::digest(&cfg)));
        Ok(hex(&Sha256::digest(s.as_bytes())))
    }
}

/// The row-major multi-dimensional index of flat index `i` in `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut pos = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        if n > 0 {
            pos[d] = i % n;
            i /= n;
        }
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_st(path: &Path, tensors: &[(&str, Vec<usize>)]) {
        let bufs: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, s)| vec![0u8; s.iter().product::<usize>() * 4])
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&bufs)
            .map(|((n, s), b)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    /// A tensor of `dtype` holding `values` (given as f64, converted to the storage format).
    fn tensor_of(dtype: StoredDtype, shape: Vec<usize>, values: &[f64]) -> Tensor {
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| match dtype {
                StoredDtype::F32 => (v as f32).to_le_bytes().to_vec(),
                StoredDtype::F64 => v.to_le_bytes().to_vec(),
                StoredDtype::BF16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
                StoredDtype::F16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
                _ => unreachable!("float dtypes only"),
            })
            .collect();
        Tensor::from_bytes(dtype, shape, bytes)
    }

    /// `decoded` gives `decode_vec`'s values bit for bit, in each precision, from each float
    /// storage dtype (odd lengths: the f32 slots end inside a word), decoded once and shared by
    /// the tensor's clones.
    #[test]
    fn decoded_values_are_decode_vecs_kept() {
        use crate::kernels::{decode_vec, Bf16};
        fn same<T: Float>(t: &Tensor) {
            let want: Vec<u64> = decode_vec::<T>(t)
                .iter()
                .map(|v| v.to_f64().to_bits())
                .collect();
            let got: Vec<u64> = t
                .decoded::<T>()
                .iter()
                .map(|v| v.to_f64().to_bits())
                .collect();
            assert_eq!(got, want, "{:?} as {:?}", t.dtype, T::PRECISION);
            let clone = t.clone();
            assert!(
                std::ptr::eq(t.decoded::<T>(), clone.decoded::<T>()),
                "kept and shared"
            );
        }
        for dtype in [
            StoredDtype::F32,
            StoredDtype::BF16,
            StoredDtype::F16,
            StoredDtype::F64,
        ] {
            for n in [1, 7, 896] {
                // Values that bf16 cannot hold, so a rounding that went missing would show.
                let v: Vec<f64> = (0..n)
                    .map(|i| (i as f64 * 0.7311 - 3.1).sin() * 1.0e-3 + 0.1234567)
                    .collect();
                let t = tensor_of(dtype, vec![n], &v);
                same::<f64>(&t);
                same::<f32>(&t);
                same::<Bf16>(&t);
            }
        }
    }

    #[test]
    fn nonfinite_values_are_counted_in_every_storage_dtype() {
        for dtype in [
            StoredDtype::F32,
            StoredDtype::BF16,
            StoredDtype::F16,
            StoredDtype::F64,
        ] {
            let mut v = vec![0.5; 6 * 9];
            assert_eq!(tensor_of(dtype, vec![6, 9], &v).nonfinite(), None);
            // Large finite values (f16's max, bf16's max) are finite.
            v[0] = if dtype == StoredDtype::F16 {
                65504.0
            } else {
                3.0e38
            };
            v[1] = -v[0];
            assert_eq!(
                tensor_of(dtype, vec![6, 9], &v).nonfinite(),
                None,
                "{dtype:?}"
            );
            v[5 * 9 + 7] = f64::NAN;
            v[5 * 9 + 8] = f64::NEG_INFINITY;
            v[2 * 9 + 3] = f64::INFINITY;
            let t = tensor_of(dtype, vec![6, 9], &v);
            assert_eq!(t.nonfinite(), Some((1, 2, 2 * 9 + 3)), "{dtype:?}");
        }
        // A tensor larger than one parallel chunk: the first index is global.
        let mut v = vec![1.0f64; (1 << 20) * 2 + 10];
        v[(1 << 20) + 3] = f64::NAN;
        v[(1 << 21) + 1] = f64::NAN;
        let n = v.len();
        let t = tensor_of(StoredDtype::BF16, vec![n], &v);
        assert_eq!(t.nonfinite(), Some((2, 0, (1 << 20) + 3)));
    }

    #[test]
    fn nonfinite_report_names_tensors_and_first_index() {
        let d = tempfile::tempdir().unwrap();
        let mut a = vec![0.25f32; 8 * 10];
        a[5 * 10 + 7] = f32::NAN;
        a[6 * 10] = f32::INFINITY;
        let b = vec![1.0f32; 4];
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (ab, bb) = (bytes(&a), bytes(&b));
        let views = vec![
            (
                "model.layers.1.mlp.down_proj.weight".to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![8, 10], &ab)
                    .unwrap(),
            ),
            (
                "model.norm.weight".to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &bb)
                    .unwrap(),
            ),
        ];
        safetensors::serialize_to_file(views, None, &d.path().join("model.safetensors")).unwrap();
        let c = Checkpoint::open(d.path()).unwrap();
        let r = c.nonfinite_report();
        assert_eq!(
            r,
            vec![NonFiniteTensor {
                name: "model.layers.1.mlp.down_proj.weight".into(),
                nan: 1,
                inf: 1,
                first_index: vec![5, 7],
            }]
        );
        assert_eq!(r[0].count(), 2);
        assert_eq!(
            r[0].to_string(),
            "model.layers.1.mlp.down_proj.weight (1 NaN and 1 infinite, first at [5, 7])"
        );
    }

    #[test]
    fn opens_and_checks_shapes() {
        let d = tempfile::tempdir().unwrap();
        write_st(&d.path().join("model.safetensors"), &[("a", vec![2, 3])]);
        let c = Checkpoint::open(d.path()).unwrap();
        assert_eq!(c.get("a", &[2, 3]).unwrap().bytes().len(), 24);
        let e = c.get("a", &[3, 2]).unwrap_err().to_string();
        assert!(e.contains("shape [2, 3]"), "{e}");
        let e = c.get("b", &[1]).unwrap_err().to_string();
        assert!(e.contains("missing tensor 'b'"), "{e}");
    }

    #[test]
    fn truncated_and_corrupt_files_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        write_st(&p, &[("a", vec![4, 4])]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        let e = Checkpoint::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("invalid safetensors"), "{e}");
        let mut corrupt = bytes.clone();
        corrupt[8] = b'!';
        std::fs::write(&p, &corrupt).unwrap();
        assert!(Checkpoint::open(d.path()).is_err());
        std::fs::write(&p, b"abc").unwrap();
        assert!(Checkpoint::open(d.path()).is_err());
    }

    #[test]
    fn damage_is_explained() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        write_st(&p, &[("a", vec![4, 4]), ("b", vec![2])]);
        let good = std::fs::read(&p).unwrap();
        let err = |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            Checkpoint::open(d.path()).err().unwrap().to_string()
        };
        let e = err(&good[..good.len() - 5]);
        assert!(
            e.contains("72 bytes") && e.contains("67") && e.contains("truncated"),
            "{e}"
        );
        let mut longer = good.clone();
        longer.extend_from_slice(b"xyz");
        assert!(err(&longer).contains("trailing bytes"));
        assert!(err(&good[..5]).contains("only 5 bytes"));
        assert!(err(&good[..20]).contains("runs past the end"));
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&huge).contains("100 MB"));
        // Tensor 'b' claims 12 bytes for 2 floats.
        let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&good[8..8 + n]).unwrap();
        let bad_header = header.replace("[64,72]", "[64,76]");
        assert_ne!(header, bad_header, "{header}");
        let mut bad = (bad_header.len() as u64).to_le_bytes().to_vec();
        bad.extend_from_slice(bad_header.as_bytes());
        bad.extend_from_slice(&good[8 + n..]);
        bad.extend_from_slice(&[0; 4]);
        let e = err(&bad);
        assert!(
            e.contains("tensor 'b'") && e.contains("data_offsets"),
            "{e}"
        );
    }

    #[test]
    fn reads_shards_through_the_index() {
        let d = tempfile::tempdir().unwrap();
        write_st(&d.path().join("s1.safetensors"), &[("a", vec![2])]);
        write_st(&d.path().join("s2.safetensors"), &[("b", vec![3])]);
        std::fs::write(
            d.path().join("model.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#,
        )
        .unwrap();
        let c = Checkpoint::open(d.path()).unwrap();
        assert!(c.contains("a") && c.contains("b"));
        std::fs::remove_file(d.path().join("s2.safetensors")).unwrap();
        let e = Checkpoint::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("s2.safetensors"), "{e}");
    }
}
