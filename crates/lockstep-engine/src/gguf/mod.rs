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
//!   engine's own config parser validates it. Llama 3 RoPE scaling, which llama.cpp's converter
//!   stores only as a `rope_freqs.weight` of per-frequency divisors, becomes `rope_parameters` of
//!   type `llama3` ([`llama3_rope_parameters`]; `transformers` drops that tensor).
//! - **Tensors**: llama.cpp names become Hugging Face names ([`hf_name`]); dims are stored
//!   fastest-first, so the HF shape is the reverse. Every tensor stays memory-mapped in its stored
//!   dtype: F32, F16, BF16, and the ggml blocks Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K,
//!   which the kernels decode ([`crate::kernels::quant`]) to exactly the float32 values
//!   [`dequantize`] gives (the operations of `gguf-py`, which `transformers` calls), so the values
//!   match bit for bit. Other types (Q2_K, Q3_K, IQ*, ...) are refused by name.
//! - **Llama q/k**: llama.cpp's converter permutes the rows of Llama's `q_proj`/`k_proj` (weights
//!   and biases) for its RoPE layout; [`unpermute_rows`] undoes it exactly as `transformers`'
//!   `LlamaTensorProcessor._reverse_permute_weights` does, moving stored rows (whole blocks for a
//!   quantized tensor) into a copy of just those tensors. Qwen2 files are not permuted.
//! - **Tokenizer**: a `tokenizer.json` beside the `.gguf` wins; without one, the byte-level BPE
//!   tokenizer the metadata describes is built as `transformers` builds it ([`tokenizer_json`]).
//!   `tokenizer.chat_template` is exposed by [`chat_template`].
//!
//! Damaged files (bad magic, truncation anywhere, impossible counts, unknown tensor types) are
//! one-line errors naming the file and the problem.

mod dequant;
mod error;
mod header;
mod hf_map;
#[cfg(test)]
pub(crate) mod test_util;
mod tokenizer_meta;

pub use dequant::{dequantize, unpermute_rows};
pub use error::GgufError;
pub use header::{GgmlType, Header, TensorInfo, Value, DEFAULT_ALIGNMENT, MAGIC};
pub use hf_map::{config_json, expected_shape, hf_name, llama3_rope_freqs, llama3_rope_parameters};
pub use tokenizer_meta::{chat_template, tokenizer, tokenizer_config, tokenizer_json};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::weights::{Checkpoint, StoredDtype, Tensor};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// llama.cpp's tensor of per-frequency RoPE divisors (Llama 3 scaling).
const ROPE_FREQS: &str = "rope_freqs.weight";
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
    let header = Header::parse(&map).map_err(|e| match e {
        GgufError::NotGguf(_) => bad(path, e.to_string()),
        e => bad(path, format!("invalid GGUF file: {e}")),
    })?;
    Ok((Arc::new(map), header))
}

fn bad(path: &Path, msg: String) -> EngineError {
    EngineError::Config {
        path: path.to_path_buf(),
        msg,
    }
}

/// The stored dtype a supported ggml type is kept in (`None` for the others).
pub fn stored_dtype(ty: GgmlType) -> Option<StoredDtype> {
    Some(match ty {
        GgmlType::F32 => StoredDtype::F32,
        GgmlType::F16 => StoredDtype::F16,
        GgmlType::BF16 => StoredDtype::BF16,
        GgmlType::Q8_0 => StoredDtype::Q8_0,
        GgmlType::Q4_0 => StoredDtype::Q4_0,
        GgmlType::Q4_1 => StoredDtype::Q4_1,
        GgmlType::Q5_0 => StoredDtype::Q5_0,
        GgmlType::Q5_1 => StoredDtype::Q5_1,
        GgmlType::Q4_K => StoredDtype::Q4_K,
        GgmlType::Q5_K => StoredDtype::Q5_K,
        GgmlType::Q6_K => StoredDtype::Q6_K,
        _ => return None,
    })
}

/// Opens a GGUF checkpoint: the config its metadata implies and every tensor under its Hugging
/// Face name (see the module docs). Every tensor in the file must be one the model uses.
pub fn load(path: &Path) -> Result<(ModelConfig, Checkpoint)> {
    let (map, h) = read(path)?;
    let json = config_json(&h, &map).map_err(|m| bad(path, format!("GGUF metadata: {m}")))?;
    let config =
        ModelConfig::from_json_str(&json).map_err(|m| bad(path, format!("GGUF metadata: {m}")))?;
    let llama = h.get("general.architecture").and_then(Value::as_str) == Some("llama");
    // rope_freqs.weight became the config's RoPE scaling; it is no weight of the model.
    let weights: Vec<&TensorInfo> = h.tensors.iter().filter(|t| t.name != ROPE_FREQS).collect();
    for t in &weights {
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
        let Some(name) = hf_name(&t.name) else {
            return Err(bad(
                path,
                format!(
                    "tensor '{}' has no counterpart in a Hugging Face {:?} model",
                    t.name, config.arch
                ),
            ));
        };
        // Before anything is dequantized or copied: a damaged table must not turn into an
        // allocation the model could never use.
        let want = expected_shape(&name, &config).ok_or_else(|| {
            bad(
                path,
                format!(
                    "tensor '{}' ({name}) is not part of a model of {} layers",
                    t.name, config.num_layers
                ),
            )
        })?;
        if t.shape() != want {
            return Err(bad(
                path,
                format!(
                    "tensor '{}' ({name}) has shape {:?} but the metadata implies {want:?}",
                    t.name,
                    t.dims.iter().rev().collect::<Vec<_>>()
                ),
            ));
        }
    }
    let loaded: Result<Vec<(String, Tensor)>> = weights
        .par_iter()
        .map(|t| {
            let name = hf_name(&t.name).expect("checked");
            let shape = t.shape();
            let start = (h.data_start + t.offset) as usize;
            let end = start + t.nbytes().map_err(|e| bad(path, e.to_string()))? as usize;
            let raw = &map[start..end];
            let dtype = stored_dtype(t.ty).expect("supported types checked above");
            // Rows of whole blocks (the header check refused any other row length).
            let row = dtype
                .row_bytes(shape.last().copied().unwrap_or(1))
                .map_err(|m| bad(path, format!("tensor '{}': {m}", t.name)))?;
            let n_head = if !llama {
                None
            } else if t.name.contains(".attn_q.") {
                Some(config.num_heads)
            } else if t.name.contains(".attn_k.") {
                Some(config.num_kv_heads)
            } else {
                None
            };
            let tensor = match n_head {
                // Stored rows (of whole blocks for a quantized tensor) move; nothing is decoded.
                Some(n) => {
                    let out = unpermute_rows(raw, row, n)
                        .map_err(|m| bad(path, format!("tensor '{}': {m}", t.name)))?;
                    Tensor::from_bytes(dtype, shape, out)
                }
                None => Tensor::mapped(map.clone(), start, end, dtype, shape),
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
        stream_pages: false,
    };
    Ok((config, ck))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::test_util::*;
    use crate::kernels::Float;
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
            // q: kept as Q8_0 blocks (row r holds (r - 32)/64 in stored order), its rows moved
            // per head of 32 rows: HF row a*16 + b is stored row 2b + a.
            let qp = &m.layers[0].q_proj;
            assert_eq!(
                (qp.dtype, qp.shape.clone(), qp.is_mapped()),
                (StoredDtype::Q8_0, vec![64, 64], false)
            );
            assert_eq!(qp.bytes().len(), 64 * 2 * 34);
            for hf_row in 0..64 {
                let (head, within) = (hf_row / 32, hf_row % 32);
                let (a, b) = (within / 16, within % 16);
                let stored = head * 32 + 2 * b + a;
                let mut row = [0f32; 64];
                f32::decode(qp.dtype, qp.row_bytes(hf_row), &mut row);
                assert!(row.iter().all(|&v| v == q_rows[stored]), "row {hf_row}");
            }
            // k: F16 kept as F16, reordered in memory of its own; v: F32 as the file stores it
            // (mapped, or its bytes copied into 2 MiB pages at load).
            let (k, v) = (&m.layers[0].k_proj, &m.layers[0].v_proj);
            assert_eq!(k.dtype, StoredDtype::F16);
            assert!(!k.is_mapped() && !k.in_huge_pages() && !qp.in_huge_pages());
            assert!(v.is_mapped() || v.in_huge_pages());
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
