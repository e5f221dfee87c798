//! Memory a run will need, estimated from the config before anything is mapped or allocated,
//! against what the machine has (`MemAvailable` in `/proc/meminfo`).
//!
//! The estimate is deliberately simple and errs high: weights as they will be held (memory-mapped
//! files at their size, GGUF blocks at their stored size), the KV cache for the whole requested
//! context of every row, and the largest activations of a prefill (every row's hidden states,
//! MLP intermediates and attention scores at once, and one row of logits each).
//!
//! When the forward pass streams the layers through the page cache ([`crate::streaming`]), the
//! mapped weights count as held only in part ([`held_weight_bytes`]): the embeddings, the LM head
//! and three layers (the one running, the one read ahead, the one being dropped), so a checkpoint
//! larger than memory is no longer refused.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::source::ModelSource;

/// What a run will hold, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Weights as held.
    pub weights: u64,
    /// True when `weights` counts a forward pass streaming the layers
    /// ([`streamed_weight_bytes`]), not the whole file.
    pub weights_streamed: bool,
    /// Keys and values of every layer for the requested context and batch.
    pub kv_cache: u64,
    /// The largest activations of a prefill.
    pub activations: u64,
    /// Traces held at once by `verify` (0 for other runs).
    pub traces: u64,
    /// The Python reference's process (its model, as `verify` runs it; 0 for other runs). It
    /// runs in its own phases, so [`Self::total`] counts the larger of it and lockstep's side.
    pub reference: u64,
    /// The decode's copy of the BF16 matrices coded in 12 bits per value
    /// ([`crate::weights::bf16_coded`]), when the run will make it ([`Self::with_coded_copy`]);
    /// 0 otherwise.
    pub coded: u64,
    /// The bf16 copies of an f32 checkpoint's matrices for a bf16-compute run
    /// ([`crate::weights::bf16_copy`]), when the run will make them
    /// ([`Self::with_bf16_copies`]); 0 otherwise.
    pub bf16_copies: u64,
}

/// What a run asks for, besides the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunShape {
    /// Rows generated together.
    pub batch: usize,
    /// Longest prompt, in tokens.
    pub prompt_len: usize,
    /// Tokens each row may reach (prompt plus new tokens; capped by the context length).
    pub context: usize,
    /// Bytes of one value of the compute dtype (8 for f64, 4 for f32, 2 for bf16): what the KV
    /// cache holds a key or value in. Activations are held in at least 4 (bf16 values in f32).
    pub act_bytes: usize,
}

impl MemoryEstimate {
    /// The estimate for `config` run as `run`, with `weights` bytes of weights.
    pub fn new(config: &ModelConfig, weights: u64, run: RunShape) -> Self {
        let c = config;
        let kv_bytes = run.act_bytes as u128;
        // The bf16 tier holds its activations in f32 (`Bf16`), its KV cache in bf16.
        let s = kv_bytes.max(4);
        let batch = run.batch as u128;
        let ctx = run.context.min(c.max_position_embeddings) as u128;
        let prompt = run.prompt_len as u128;
        let kvd = (c.num_kv_heads as u128) * (c.head_dim as u128);
        let qd = (c.num_heads as u128) * (c.head_dim as u128);
        let kv_cache = 2 * (c.num_layers as u128) * kvd * ctx * batch * kv_bytes;
        let per_token = 4 * c.hidden_size as u128 + 3 * c.intermediate_size as u128 + qd + 2 * kvd;
        let activations = batch * prompt * per_token * s
            + batch * (c.num_heads as u128) * prompt * prompt * s
            + 2 * batch * (c.vocab_size as u128) * s;
        let clamp = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
        MemoryEstimate {
            weights,
            weights_streamed: false,
            kv_cache: clamp(kv_cache),
            activations: clamp(activations),
            traces: 0,
            reference: 0,
            coded: 0,
            bf16_copies: 0,
        }
    }

    /// The estimate with the decode's coded copy of the matrices, for a run on a bf16 checkpoint
    /// that computes in bf16 or f32: 0.75 of the weights (erring high: embeddings and norms are not coded) when
    /// [`crate::weights::bf16_coded::wanted`] will have the model make one with `available`
    /// bytes free (the weights in place of its BF16 matrices, which it learns at load). Where
    /// the coding will replace the matrices instead ([`crate::weights::bf16_coded::Place`]),
    /// nothing is added: the weights' bytes bound what is held then (0.75 of the matrices and
    /// the rest as mapped).
    ///
    /// # Errors
    /// A bad `LOCKSTEP_CODED_BF16` (one line).
    pub fn with_coded_copy(mut self, available: Option<u64>) -> Result<Self> {
        let (w, streamed) = (self.weights, self.weights_streamed);
        if crate::weights::bf16_coded::wanted(w, w, available, streamed)? {
            self.coded = w / 4 * 3;
        }
        Ok(self)
    }

    /// The estimate with the bf16 copies of the matrices, for a bf16-compute run on an f32
    /// checkpoint: half the weights (erring high: embeddings and norms are not copied) when
    /// [`crate::weights::bf16_copy::wanted`] will have the model make them with `available`
    /// bytes free, and their 12-bit coding for decode (0.75 of the copies) when
    /// [`crate::weights::bf16_coded::wanted`] will code them.
    ///
    /// # Errors
    /// A bad `LOCKSTEP_BF16_COPY` or `LOCKSTEP_CODED_BF16` (one line).
    pub fn with_bf16_copies(mut self, available: Option<u64>) -> Result<Self> {
        let (w, streamed) = (self.weights, self.weights_streamed);
        if crate::weights::bf16_copy::wanted(w, w, available)? {
            self.bf16_copies = w / 2;
            if crate::weights::bf16_coded::wanted(w + w / 2, w / 2, available, streamed)? {
                self.coded = w / 2 / 4 * 3;
            }
        }
        Ok(self)
    }

    /// The estimate for `lockstep verify` on `config` run as `run` (its longest input, the
    /// finest tier's value size): the engine's run, plus every tap of that input (hidden states,
    /// q/k/v and their norms and rotations, the MLP's activation, the attention probabilities and
    /// the logits of every position) at `trace_bytes` per value: the traces compared together,
    /// lockstep's in its tier, the reference's in that tier and the f64 oracle's (16 for f64 and
    /// f32, 2 + 2 + 8 = 12 for bf16); plus the Python reference's model
    /// (`reference_bytes_per_param` bytes per parameter: 4 for the f32 reference, 2 for bf16;
    /// the f64 oracle streams one layer at a time and adds one layer at 8 bytes).
    pub fn for_verify(
        config: &ModelConfig,
        weights: u64,
        run: RunShape,
        reference_bytes_per_param: u64,
        trace_bytes: u64,
    ) -> Self {
        let c = config;
        let mut e = Self::new(config, weights, run);
        let pos = run.prompt_len as u128;
        let qd = (c.num_heads as u128) * (c.head_dim as u128);
        let kvd = (c.num_kv_heads as u128) * (c.head_dim as u128);
        let h = c.hidden_size as u128;
        // input_norm, o_proj, resid_attn, post_norm, mlp_out, out; q, q_norm, q_rope, attn_out;
        // k, k_norm, k_rope, v; mlp_act; one row of attention probabilities per head.
        let per_layer =
            6 * h + 4 * qd + 4 * kvd + c.intermediate_size as u128 + (c.num_heads as u128) * pos;
        // Every layer, the embeddings, the final norm and the logits.
        let per_position = (c.num_layers as u128) * per_layer + 2 * h + c.vocab_size as u128;
        let clamp = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
        e.traces = clamp(trace_bytes as u128 * per_position * pos);
        let params = c.parameter_count() as u128;
        let one_layer = params / (c.num_layers as u128).max(1);
        e.reference = clamp(params * reference_bytes_per_param as u128 + 8 * one_layer);
        e
    }

    /// The estimate with the Python reference streamed layer by layer (what it does when the
    /// whole model in its dtype would not fit, `reference/lockstep_reference/streamed.py`): the LM
    /// head and two decoder layers at `reference_bytes_per_param`, plus the f64 oracle's layer at
    /// 8 bytes, instead of the whole model.
    pub fn with_streamed_reference(
        mut self,
        config: &ModelConfig,
        reference_bytes_per_param: u64,
    ) -> Self {
        let c = config;
        let params = c.parameter_count() as u128;
        let head = (c.vocab_size as u128) * (c.hidden_size as u128);
        let embed = if c.tie_word_embeddings { 0 } else { head };
        let one_layer = params.saturating_sub(head + embed) / (c.num_layers as u128).max(1);
        let held =
            (head + 2 * one_layer).min(params) * reference_bytes_per_param as u128 + 8 * one_layer;
        self.reference = u64::try_from(held).unwrap_or(u64::MAX);
        self
    }

    /// Everything held at once: lockstep's side (weights, KV cache, activations, traces, the
    /// coded matrices, the bf16 copies), or the
    /// Python reference's model when that is larger (`verify` runs the reference in its own phases,
    /// not while lockstep's engine computes, so the two are not added).
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.kv_cache)
            .saturating_add(self.activations)
            .saturating_add(self.traces)
            .saturating_add(self.coded)
            .saturating_add(self.bf16_copies)
            .max(self.reference)
    }

    /// One line: the total and its parts, in GiB.
    pub fn describe(&self) -> String {
        let mut parts = format!(
            "weights {}{}, KV cache {}, activations {}",
            gib(self.weights),
            if self.weights_streamed {
                " (streamed by layer)"
            } else {
                ""
            },
            gib(self.kv_cache),
            gib(self.activations)
        );
        if self.bf16_copies > 0 {
            parts.push_str(&format!(
                ", f32 matrices rounded to bf16 copies {}",
                gib(self.bf16_copies)
            ));
        }
        if self.coded > 0 {
            parts.push_str(&format!(
                ", bf16 matrices coded for decode {}",
                gib(self.coded)
            ));
        }
        if self.traces > 0 || self.reference > 0 {
            parts.push_str(&format!(
                ", traces {}, the Python reference {}",
                gib(self.traces),
                gib(self.reference)
            ));
        }
        format!("{} ({parts})", gib(self.total()))
    }

    /// Refuses (one line, with the numbers) when the estimate exceeds `available` bytes.
    pub fn check(&self, available: u64) -> std::result::Result<(), OutOfMemory> {
        if self.total() > available {
            return Err(OutOfMemory {
                needed: *self,
                available,
            });
        }
        Ok(())
    }
}

/// A run refused because its estimate exceeds the memory available; renders as one line with the
/// numbers and what to change.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "this run needs about {} but only {} is available (MemAvailable); lower --max-new-tokens or the batch, use a smaller dtype, or pass --force to try anyway",
    needed.describe(),
    gib(*available)
)]
pub struct OutOfMemory {
    /// The estimate.
    pub needed: MemoryEstimate,
    /// Bytes available.
    pub available: u64,
}

fn gib(b: u64) -> String {
    let g = b as f64 / (1u64 << 30) as f64;
    if g >= 1e6 {
        format!("{g:.3e} GiB")
    } else {
        format!("{g:.2} GiB")
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (`None` where there is no such file).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Bytes the weights of the checkpoint at `source` will take as held: the size of its safetensors
/// files (memory-mapped), or for a GGUF file its size (quantized tensors stay as their stored
/// blocks) plus the copy of a Llama file's q/k tensors whose rows are reordered.
pub fn weight_bytes(source: &ModelSource, config: &ModelConfig) -> Result<u64> {
    let size = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .map_err(|source| EngineError::Io {
                path: p.to_path_buf(),
                source,
            })
    };
    if let Some(file) = source.gguf() {
        let (_, h) = crate::gguf::read(file)?;
        // Every tensor stays mapped at its stored size (quantized ones as their blocks); a Llama
        // file's q/k rows are reordered into a copy of those tensors.
        let llama = h
            .get("general.architecture")
            .and_then(crate::gguf::Value::as_str)
            == Some("llama");
        let copied: u64 = h
            .tensors
            .iter()
            .filter(|t| llama && (t.name.contains(".attn_q.") || t.name.contains(".attn_k.")))
            // A tensor of unknown type or size is refused with its reason at load.
            .filter_map(|t| t.nbytes().ok())
            .fold(0, u64::saturating_add);
        return Ok(size(file)?.saturating_add(copied));
    }
    let dir = source.side_folder();
    let single = dir.join("model.safetensors");
    if single.exists() {
        return size(&single);
    }
    // Shards: every *.safetensors in the folder (the index is validated when the model loads);
    // without any, the parameter count at 4 bytes.
    let mut total = 0u64;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                total = total.saturating_add(size(&p)?);
            }
        }
    }
    if total == 0 {
        total = (config.parameter_count() as u64).saturating_mul(4);
    }
    Ok(total)
}

/// Bytes of weights a run holds: [`weight_bytes`], or, when the forward pass will stream the
/// layers ([`crate::streaming::stream_layers`] decides on the file's bytes against
/// `MemAvailable`), [`streamed_weight_bytes`] of it. Also returns whether it streams.
pub fn held_weight_bytes(source: &ModelSource, config: &ModelConfig) -> Result<(u64, bool)> {
    let file = weight_bytes(source, config)?;
    let stream = crate::streaming::stream_layers(file, available_memory())?;
    Ok(if stream {
        (streamed_weight_bytes(config, file), true)
    } else {
        (file, false)
    })
}

/// Of `file` bytes of weights, those a streaming forward pass holds at once: the embeddings, the
/// LM head when untied, and three decoder layers, each counted at the file's average bytes per
/// parameter (exact for a single-dtype checkpoint, an approximation for a mixed GGUF). Never more
/// than `file`.
pub fn streamed_weight_bytes(config: &ModelConfig, file: u64) -> u64 {
    let c = config;
    let params = c.parameter_count() as u128;
    let embed = (c.vocab_size as u128) * (c.hidden_size as u128);
    let head = if c.tie_word_embeddings { 0 } else { embed };
    let layers = params.saturating_sub(embed + head + c.hidden_size as u128);
    let one_layer = layers / (c.num_layers as u128).max(1);
    let held_params = embed + head + c.hidden_size as u128 + 3 * one_layer;
    let held = (file as u128) * held_params.min(params) / params.max(1);
    u64::try_from(held).unwrap_or(u64::MAX).min(file)
}

/// The config of the model at `source` (a Hugging Face folder or a GGUF checkpoint), read without
/// mapping or loading any weights.
pub fn config_of(source: &ModelSource) -> Result<ModelConfig> {
    match source {
        ModelSource::Gguf { file, .. } => {
            let (map, h) = crate::gguf::read(file)?;
            let json = crate::gguf::config_json(&h, &map).map_err(|m| EngineError::Config {
                path: file.clone(),
                msg: format!("GGUF metadata: {m}"),
            })?;
            ModelConfig::from_json_str(&json).map_err(|m| EngineError::Config {
                path: file.clone(),
                msg: format!("GGUF metadata: {m}"),
            })
        }
        ModelSource::Folder(dir) => ModelConfig::from_file(&dir.join("config.json")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 GiB of weights for a small Qwen2 config, an 8-token prompt in 16 positions, values of
    /// `act_bytes`: (1 GiB, the estimate).
    fn one_gib_estimate(act_bytes: usize) -> (u64, MemoryEstimate) {
        let c = ModelConfig::from_json_str(
            r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "max_position_embeddings": 128}"#,
        )
        .unwrap();
        let run = RunShape {
            batch: 1,
            prompt_len: 8,
            context: 16,
            act_bytes,
        };
        let gib = 1u64 << 30;
        (gib, MemoryEstimate::new(&c, gib, run))
    }

    /// The coded copy counts on lockstep's side when the model will make it (this CPU sums coded
    /// matrices and they fit), never when free memory is unknown or the layers are streamed.
    #[test]
    fn the_coded_copy_counts_where_it_will_be_made() {
        let (gib, plain) = one_gib_estimate(4);
        let free = plain.with_coded_copy(Some(16 * gib)).unwrap();
        if crate::kernels::matmul::codes_by_default() {
            assert_eq!(free.coded, gib / 4 * 3);
            assert_eq!(free.total(), plain.total() + gib / 4 * 3);
            assert!(free.describe().contains("coded"), "{}", free.describe());
        } else {
            assert_eq!(free, plain);
        }
        assert_eq!(plain.with_coded_copy(None).unwrap().coded, 0);
        let mut streamed = plain;
        streamed.weights_streamed = true;
        assert_eq!(streamed.with_coded_copy(Some(16 * gib)).unwrap().coded, 0);
    }

    /// An f32 checkpoint's bf16 copies count (half the weights, and their coding where this CPU
    /// reads it) when they fit; none without room or when free memory is unknown.
    #[test]
    fn the_bf16_copies_count_where_they_will_be_made() {
        let (gib, plain) = one_gib_estimate(2);
        let free = plain.with_bf16_copies(Some(16 * gib)).unwrap();
        assert_eq!(free.bf16_copies, gib / 2);
        let coded = if crate::kernels::matmul::codes_by_default() {
            gib / 2 / 4 * 3
        } else {
            0
        };
        assert_eq!(free.coded, coded);
        assert_eq!(free.total(), plain.total() + gib / 2 + coded);
        assert!(
            free.describe().contains("bf16 copies"),
            "{}",
            free.describe()
        );
        assert_eq!(plain.with_bf16_copies(None).unwrap(), plain);
        assert_eq!(plain.with_bf16_copies(Some(gib)).unwrap(), plain);
    }

    /// A quantized GGUF counts at its file size (plus Llama's reordered q/k copy), not as f32.
    #[test]
    fn gguf_weights_count_at_their_stored_size() {
        use crate::gguf::test_util::*;
        use crate::gguf::GgmlType;
        let d = tempfile::tempdir().unwrap();
        let kvs = |arch: &str| {
            vec![
                ("general.architecture", strv(arch)),
                ("x.block_count", u32v(1)),
            ]
        };
        // 64 x 64 Q4_0 (18 bytes per 32) for q, 64 x 256 Q8_0 for another tensor.
        let tensors = vec![
            (
                "blk.0.attn_q.weight",
                vec![64u64, 64],
                GgmlType::Q4_0,
                vec![0u8; 64 * 2 * 18],
            ),
            (
                "blk.0.ffn_up.weight",
                vec![64u64, 256],
                GgmlType::Q8_0,
                vec![0u8; 256 * 2 * 34],
            ),
        ];
        for (arch, copy) in [("qwen2", 0u64), ("llama", 64 * 2 * 18)] {
            let p = d.path().join(format!("{arch}.gguf"));
            std::fs::write(&p, file(&kvs(arch), &tensors, 32)).unwrap();
            let src = ModelSource::resolve(&p).unwrap();
            let c = ModelConfig::from_json_str(
                r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":64,"intermediate_size":256,
                "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"vocab_size":100}"#,
            )
            .unwrap();
            let len = std::fs::metadata(&p).unwrap().len();
            assert_eq!(weight_bytes(&src, &c).unwrap(), len + copy, "{arch}");
            // Well under the f32 size of the weights (4 bytes x 20480 values).
            assert!(len + copy < 4 * 20480);
        }
    }

    /// Streaming holds the embeddings and three layers: a 0.5B-shape checkpoint of 24 layers
    /// counts well under its file, a model of three layers or fewer at its whole file.
    #[test]
    fn streamed_weights_count_embeddings_and_three_layers() {
        let cfg = |layers: usize, tied: bool| {
            ModelConfig::from_json_str(&format!(
                r#"{{"architectures":["Qwen2ForCausalLM"],"hidden_size":896,"intermediate_size":4864,
                "num_hidden_layers":{layers},"num_attention_heads":14,"num_key_value_heads":2,
                "vocab_size":151936,"tie_word_embeddings":{tied}}}"#
            ))
            .unwrap()
        };
        let c = cfg(24, true);
        let params = c.parameter_count() as u64;
        let file = 2 * params;
        let embed = 2 * 151936 * 896;
        let layer = (file - embed - 2 * 896) / 24;
        let held = streamed_weight_bytes(&c, file);
        // The embeddings, the final norm and three layers.
        assert!(held.abs_diff(embed + 2 * 896 + 3 * layer) < 64, "{held}");
        assert!(held < file / 2, "{held} of {file}");
        // An untied head counts too.
        let u = cfg(24, false);
        let held_u = streamed_weight_bytes(&u, 2 * u.parameter_count() as u64);
        assert!(
            held_u.abs_diff(2 * embed + 2 * 896 + 3 * layer) < 64,
            "{held_u}"
        );
        // Few layers: the whole file, never more.
        let small = cfg(2, true);
        let f = 2 * small.parameter_count() as u64;
        assert_eq!(streamed_weight_bytes(&small, f), f);
        // The estimate with streamed weights fits where the whole file would not.
        let run = RunShape {
            batch: 1,
            prompt_len: 16,
            context: 64,
            act_bytes: 4,
        };
        let avail = file * 3 / 4;
        assert!(MemoryEstimate::new(&c, file, run).check(avail).is_err());
        let mut streamed = MemoryEstimate::new(&c, held, run);
        streamed.weights_streamed = true;
        assert!(streamed.check(avail).is_ok());
        assert!(streamed.describe().contains("streamed by layer"));
    }

    #[test]
    fn reads_memavailable() {
        let t = "MemTotal:       131072000 kB\nMemFree:  1 kB\nMemAvailable:   1024 kB\n";
        assert_eq!(parse_meminfo(t), Some(1024 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn kv_cache_of_a_long_context_is_refused_with_the_numbers() {
        let c = ModelConfig::from_json_str(
            r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
            "max_position_embeddings":1000000000000}"#,
        )
        .unwrap();
        let run = |context| RunShape {
            batch: 2,
            prompt_len: 10,
            context,
            act_bytes: 8,
        };
        let small = MemoryEstimate::new(&c, 1000, run(100));
        // 2 (k, v) x 2 layers x 2 heads x 16 x 100 positions x 2 rows x 8 bytes.
        assert_eq!(small.kv_cache, 2 * 2 * 32 * 100 * 2 * 8);
        assert!(small.check(1 << 30).is_ok());
        let huge = MemoryEstimate::new(&c, 1000, run(usize::MAX));
        let e = huge.check(1 << 30).unwrap_err().to_string();
        assert!(e.contains("KV cache") && e.contains("--force"), "{e}");
    }

    #[test]
    fn verify_counts_traces_and_the_larger_of_the_two_sides() {
        let c = ModelConfig::from_json_str(
            r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100}"#,
        )
        .unwrap();
        let run = |prompt_len| RunShape {
            batch: 2,
            prompt_len,
            context: prompt_len + 8,
            act_bytes: 8,
        };
        let plain = MemoryEstimate::new(&c, 1000, run(10));
        let v = MemoryEstimate::for_verify(&c, 1000, run(10), 4, 16);
        assert_eq!(
            (v.weights, v.kv_cache, v.activations),
            (plain.weights, plain.kv_cache, plain.activations)
        );
        // 16 bytes x 10 positions x (2 layers x (6 x 64 + 4 x 64 + 4 x 32 + 128 + 4 heads x 10)
        // + 2 x 64 + 100).
        assert_eq!(
            v.traces,
            16 * 10 * (2 * (384 + 256 + 128 + 128 + 40) + 128 + 100)
        );
        let params = c.parameter_count() as u64;
        assert_eq!(v.reference, 4 * params + 8 * (params / 2));
        assert_eq!(v.total(), (plain.total() + v.traces).max(v.reference));
        assert!(v.describe().contains("traces") && !plain.describe().contains("traces"));
        // A streamed reference holds the head and two layers, not the model.
        let s = MemoryEstimate::for_verify(&c, 1000, run(10), 4, 16).with_streamed_reference(&c, 4);
        let layer = (params - 2 * 6400) / 2;
        assert_eq!(s.reference, 4 * (6400 + 2 * layer) + 8 * layer);
        assert!(s.reference < v.reference);
        // Attention probabilities grow with the square of the prompt: a million-token input is refused.
        let long = MemoryEstimate::for_verify(&c, 1000, run(1 << 20), 4, 16);
        assert!(long.check(64 << 30).is_err());
    }
}
