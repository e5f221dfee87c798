//! `config.json` of a Hugging Face Qwen2 / Llama checkpoint, read the way `transformers` 5.x reads it.
//!
//! Both the v4 keys (`rope_theta`, `rope_scaling`) and the v5 `rope_parameters` are understood.
//! Options the engine does not implement are refused with a clear message, never approximated.

use crate::error::{EngineError, Result};
use crate::kernels::rope::RopeScaling;
use serde_json::Value;
use std::path::Path;

pub mod json;
pub use json::{ConfigError, Fields};
mod windows;
pub use windows::layer_windows;
mod moe;
mod rope;
pub use moe::MoeConfig;

/// The supported model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `Qwen2ForCausalLM`: q/k/v projections always carry a bias.
    Qwen2,
    /// `LlamaForCausalLM`: q/k/v biases only when `attention_bias` is true.
    Llama,
    /// `MistralForCausalLM`: Llama's layout without biases, every layer's attention limited to
    /// `sliding_window` keys when that is set.
    Mistral,
    /// `Qwen3ForCausalLM`: no q/k/v bias, RMSNorm per head on q and k before RoPE (`q_norm`,
    /// `k_norm`), `head_dim` 128 unless config.json gives it.
    Qwen3,
    /// `Qwen3MoeForCausalLM`: Qwen3's attention (q/k norm, no bias; `head_dim` from config.json
    /// or hidden_size / heads) with a routed mixture of experts as the MLP of its sparse layers
    /// ([`MoeConfig`]).
    Qwen3Moe,
}

impl Architecture {
    /// The `architectures` entry in config.json.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// The `model_type` transformers gives this family.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "qwen2",
            Architecture::Llama => "llama",
            Architecture::Qwen3 => "qwen3",
            Architecture::Mistral => "mistral",
            Architecture::Qwen3Moe => "qwen3_moe",
        }
    }

    /// Whether q and k get a per-head RMSNorm (`self_attn.q_norm` / `k_norm`) before RoPE.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Architecture::Qwen3 | Architecture::Qwen3Moe)
    }
}

/// Everything the forward pass needs from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Model family.
    pub arch: Architecture,
    /// Vocabulary size (rows of the embedding table).
    pub vocab_size: usize,
    /// Hidden size H.
    pub hidden_size: usize,
    /// MLP intermediate size I.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (GQA when fewer than query heads).
    pub num_kv_heads: usize,
    /// Per-head dimension D.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE scaling (`rope_type` linear, dynamic, yarn or llama3).
    pub rope_scaling: RopeScaling,
    /// Whether the LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have biases.
    pub qkv_bias: bool,
    /// Longest sequence the model accepts.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token id, if any.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint declares (`dtype` / `torch_dtype`), if any.
    pub declared_dtype: Option<String>,
    /// Per layer, the sliding attention window (a query sees itself and the `w - 1` keys before
    /// it), or `None` for full causal attention; see [`layer_windows`].
    pub sliding_windows: Vec<Option<usize>>,
    /// The mixture-of-experts settings (Qwen3-MoE), `None` for dense models.
    pub moe: Option<MoeConfig>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                EngineError::MissingFile {
                    path: path.to_path_buf(),
                    what: "the model's config.json".into(),
                }
            } else {
                EngineError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Self::from_json_str(&text).map_err(|source| EngineError::ConfigFile {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses and validates config.json text; the error is one line.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, ConfigError> {
        let v = json::parse(text)?;
        let fields = Fields::of(&v)?;
        let get = |k: &str| fields.get(k);
        let usize_key = |k: &str| fields.positive(k);
        let f64_key = |k: &str| fields.number(k);
        let bool_key = |k: &str, default: bool| fields.flag_or(k, default);

        let model_type = get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let arch = if archs.contains(&"Qwen2ForCausalLM")
            || (archs.is_empty() && model_type == "qwen2")
        {
            Architecture::Qwen2
        } else if archs.contains(&"LlamaForCausalLM") || (archs.is_empty() && model_type == "llama")
        {
            Architecture::Llama
        } else if archs.contains(&"Qwen3ForCausalLM") || (archs.is_empty() && model_type == "qwen3")
        {
            Architecture::Qwen3
        } else if archs.contains(&"Qwen3MoeForCausalLM")
            || (archs.is_empty() && model_type == "qwen3_moe")
        {
            Architecture::Qwen3Moe
        } else if archs.contains(&"MistralForCausalLM")
            || (archs.is_empty() && model_type == "mistral")
        {
            Architecture::Mistral
        } else {
            return Err(ConfigError::from(format!(
                "unsupported architecture {archs:?} (model_type '{model_type}'); lockstep supports Qwen2ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen3ForCausalLM and Qwen3MoeForCausalLM"
            )));
        };

        let hidden_size = usize_key("hidden_size")?;
        let num_heads = usize_key("num_attention_heads")?;
        let num_kv_heads = match get("num_key_value_heads") {
            None => num_heads,
            Some(_) => usize_key("num_key_value_heads")?,
        };
        if num_heads % num_kv_heads != 0 {
            return Err(ConfigError::from(format!(
                "num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match get("head_dim") {
            // Qwen3Config's default, whatever hidden_size / num_attention_heads is.
            None if arch == Architecture::Qwen3 => 128,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(ConfigError::from(format!(
                        "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads}) and no head_dim is given"
                    )));
                }
                hidden_size / num_heads
            }
            Some(_) => usize_key("head_dim")?,
        };
        if head_dim % 2 != 0 {
            return Err(ConfigError::from(format!(
                "head_dim must be even for RoPE, got {head_dim}"
            )));
        }

        if let Some(act) = get("hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(ConfigError::from(format!(
                    "hidden_act {act} is not supported (only \"silu\")"
                )));
            }
        }

        // RoPE: v5 `rope_parameters`, v4 `rope_theta` + `rope_scaling`.
        let max_position_embeddings = match get("max_position_embeddings") {
            None => 32768,
            Some(_) => usize_key("max_position_embeddings")?,
        };
        let rope = rope::parse(fields.map(), max_position_embeddings)?;
        let rope_theta = rope.theta;
        // Below 1 the inverse frequencies exceed 1 and grow without bound (1e-300 gives inf and
        // NaN angles); real checkpoints use 1e4 to 1e8.
        if !(ROPE_THETA_RANGE.0..=ROPE_THETA_RANGE.1).contains(&rope_theta) {
            return Err(ConfigError::from(format!(
                "rope_theta must be a finite number in [{:e}, {:e}], got {rope_theta:e}",
                ROPE_THETA_RANGE.0, ROPE_THETA_RANGE.1
            )));
        }
        let rms_norm_eps = f64_key("rms_norm_eps")?.unwrap_or(1e-6);
        // 0 makes an all-zero row 0 * inf = NaN; real checkpoints use 1e-6 or 1e-5.
        if !(rms_norm_eps > 0.0 && rms_norm_eps <= 1.0) {
            return Err(ConfigError::from(format!(
                "rms_norm_eps must be a finite number in (0, 1], got {rms_norm_eps}"
            )));
        }

        let num_layers = usize_key("num_hidden_layers")?;
        if bool_key("mlp_bias", false)? {
            return Err(ConfigError::from("mlp_bias: true is not implemented"));
        }
        let qkv_bias = match arch {
            Architecture::Qwen2 => true,
            Architecture::Llama => bool_key("attention_bias", false)?,
            Architecture::Mistral => false,
            Architecture::Qwen3 | Architecture::Qwen3Moe => {
                if bool_key("attention_bias", false)? {
                    return Err(ConfigError::from("Qwen3 with attention_bias: true (biases on q/k/v and o_proj) is not implemented"));
                }
                false
            }
        };
        if arch == Architecture::Llama
            && get("pretraining_tp").and_then(Value::as_u64).unwrap_or(1) != 1
        {
            // pretraining_tp > 1 only changes summation order in HF; accepted.
        }

        let ids = |k: &str| fields.token_ids(k);

        let mut cfg = ModelConfig {
            arch,
            vocab_size: usize_key("vocab_size")?,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling: rope.scaling,
            tie_word_embeddings: bool_key("tie_word_embeddings", false)?,
            qkv_bias,
            max_position_embeddings,
            bos_token_id: ids("bos_token_id")?.first().copied(),
            eos_token_ids: ids("eos_token_id")?,
            declared_dtype: get("dtype")
                .or_else(|| get("torch_dtype"))
                .and_then(Value::as_str)
                .map(str::to_string),
            sliding_windows: Vec::new(),
            moe: None,
        };
        // Sizes whose products overflow would otherwise wrap (or make allocations panic) before
        // any tensor is compared against them.
        if cfg.checked_parameter_count().is_none() {
            return Err(ConfigError::from(format!(
                "sizes are impossibly large: the parameter count they imply overflows (num_hidden_layers {}, hidden_size {hidden_size}, intermediate_size {}, num_attention_heads {num_heads}, head_dim {head_dim}, vocab_size {})",
                cfg.num_layers, cfg.intermediate_size, cfg.vocab_size
            )));
        }
        // Per-layer settings are held per layer: bound the count by any real model's first.
        if num_layers > MAX_LAYERS {
            return Err(ConfigError::from(format!(
                "num_hidden_layers {num_layers} is beyond any real model (at most {MAX_LAYERS} accepted)"
            )));
        }
        cfg.sliding_windows = layer_windows(&v, num_layers)?;
        if arch == Architecture::Qwen3Moe {
            cfg.moe = Some(moe::parse(fields.map(), num_layers)?);
            if cfg.checked_parameter_count().is_none() {
                return Err(
                    "sizes are impossibly large: the experts' parameter count overflows".into(),
                );
            }
        }
        Ok(cfg)
    }

    /// [`Self::parameter_count`] with overflow checks.
    fn checked_parameter_count(&self) -> Option<usize> {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_heads.checked_mul(d)?;
        let kv = self.num_kv_heads.checked_mul(d)?;
        let bias = if self.qkv_bias {
            q.checked_add(kv.checked_mul(2)?)?
        } else {
            0
        };
        let layer = [
            h.checked_mul(q)?,
            h.checked_mul(kv)?.checked_mul(2)?,
            bias,
            q.checked_mul(h)?,
            h.checked_mul(2)?,
            if self.arch.has_qk_norm() { d * 2 } else { 0 },
        ]
        .into_iter()
        .try_fold(0usize, usize::checked_add)?;
        let dense_mlp = h.checked_mul(i)?.checked_mul(3)?;
        // Sparse layers: the router [E, H] and E experts of 3 [moe_I, H] matrices, no dense MLP.
        let (sparse, sparse_mlp) = match &self.moe {
            Some(m) => (
                m.num_sparse(),
                m.num_experts.checked_mul(
                    h.checked_mul(m.moe_intermediate_size)?
                        .checked_mul(3)?
                        .checked_add(h)?,
                )?,
            ),
            None => (0, 0),
        };
        let mlps = (self.num_layers - sparse)
            .checked_mul(dense_mlp)?
            .checked_add(sparse.checked_mul(sparse_mlp)?)?;
        let embed = self.vocab_size.checked_mul(h)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        self.num_layers
            .checked_mul(layer)?
            .checked_add(mlps)?
            .checked_add(embed)?
            .checked_add(h)?
            .checked_add(head)
    }

    /// The longest sequence the engine accepts: `max_position_embeddings`, except for `dynamic`
    /// RoPE, where that is the original length the scaling extends by `factor`.
    pub fn context_length(&self) -> usize {
        match self.rope_scaling {
            RopeScaling::Dynamic { factor, .. } if factor > 1.0 => {
                (self.max_position_embeddings as f64 * factor) as usize
            }
            _ => self.max_position_embeddings,
        }
    }

    /// Number of query heads sharing one key/value head.
    pub fn kv_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Parameter count implied by the config (tied head counted once).
    pub fn parameter_count(&self) -> usize {
        // Validated configs never overflow; one built by hand saturates.
        self.checked_parameter_count().unwrap_or(usize::MAX)
    }
}

/// The most decoder layers a config may declare (the largest real models have ~130): per-layer
/// settings are allocated per layer, so the count is bounded before anything is.
pub const MAX_LAYERS: usize = 1 << 16;

/// The range of `rope_theta` accepted: finite, at least 1 (no inverse frequency above 1) and
/// at most 1e15.
pub const ROPE_THETA_RANGE: (f64, f64) = (1.0, 1e15);

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (fuzz/artifacts config_json crash-7b12fad5): a model_type holding
    /// newlines made the unsupported-architecture error span several lines.
    #[test]
    fn errors_stay_one_line_whatever_the_file_holds() {
        for (k, v) in [
            ("model_type", r"llan\n0000\r\n"),
            ("hidden_act", r"silu\nyy"),
        ] {
            let text = QWEN.replace("\"architectures\":[\"Qwen2ForCausalLM\"],", "");
            let text = text.replacen(
                &format!("\"{k}\":"),
                &format!("\"{k}\":\"{v}\",\"x_{k}\":"),
                1,
            );
            let e = ModelConfig::from_json_str(&text).unwrap_err().to_string();
            assert!(!e.contains('\n') && !e.contains('\r'), "{k}: {e}");
            assert!(e.contains("\\n"), "{k}: {e}");
        }
    }

    const QWEN: &str = r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":896,
      "intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,
      "vocab_size":151936,"rms_norm_eps":1e-6,"rope_theta":1000000.0,"tie_word_embeddings":true,
      "max_position_embeddings":32768,"use_sliding_window":false,"sliding_window":32768,"hidden_act":"silu",
      "eos_token_id":151643}"#;

    #[test]
    fn parses_qwen2_05b_and_counts_parameters() {
        let c = ModelConfig::from_json_str(QWEN).unwrap();
        assert_eq!(c.arch, Architecture::Qwen2);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.kv_group(), 7);
        assert!(c.qkv_bias && c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.eos_token_ids, vec![151643]);
        // Qwen2.5-0.5B has 494,032,768 parameters.
        assert_eq!(c.parameter_count(), 494_032_768);
    }

    #[test]
    fn qwen25_7b_parameter_count() {
        let s = QWEN
            .replace("896", "3584")
            .replace("4864", "18944")
            .replace("\"num_hidden_layers\":24", "\"num_hidden_layers\":28")
            .replace("\"num_attention_heads\":14", "\"num_attention_heads\":28")
            .replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":4")
            .replace("151936", "152064")
            .replace(
                "\"tie_word_embeddings\":true",
                "\"tie_word_embeddings\":false",
            );
        let c = ModelConfig::from_json_str(&s).unwrap();
        assert_eq!(c.parameter_count(), 7_615_616_512);
    }

    #[test]
    fn reads_v5_rope_parameters() {
        let s = QWEN.replace(
            "\"rope_theta\":1000000.0",
            "\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":500000.0}",
        );
        assert_eq!(ModelConfig::from_json_str(&s).unwrap().rope_theta, 500000.0);
    }

    #[test]
    fn refuses_unsupported_options() {
        for (from, to, needle) in [
            (
                "Qwen2ForCausalLM",
                "GPT2LMHeadModel",
                "unsupported architecture",
            ),
            (
                "\"rope_theta\":1000000.0",
                "\"rope_scaling\":{\"type\":\"longrope\",\"factor\":4.0}",
                "longrope",
            ),
            (
                "\"num_key_value_heads\":2",
                "\"num_key_value_heads\":3",
                "multiple",
            ),
            (
                "\"hidden_size\":896",
                "\"hidden_size\":-1",
                "positive integer",
            ),
            ("\"hidden_act\":\"silu\"", "\"hidden_act\":\"gelu\"", "gelu"),
            (
                "\"num_hidden_layers\":24",
                "\"num_hidden_layers\":4611686018427387903",
                "overflows",
            ),
        ] {
            let s = QWEN.replace(from, to);
            let e = ModelConfig::from_json_str(&s).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        assert!(ModelConfig::from_json_str("{")
            .unwrap_err()
            .to_string()
            .contains("JSON"));
        let e = ModelConfig::from_json_str(&QWEN.replace("\"vocab_size\":151936,", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vocab_size"), "{e}");
    }

    #[test]
    fn qwen3_has_qk_norm_no_bias_and_head_dim_128_by_default() {
        let s = QWEN
            .replace("Qwen2ForCausalLM", "Qwen3ForCausalLM")
            .replace("\"model_type\":\"qwen2\"", "\"model_type\":\"qwen3\"");
        let c = ModelConfig::from_json_str(&s).unwrap();
        assert_eq!(c.arch, Architecture::Qwen3);
        assert!(c.arch.has_qk_norm() && !c.qkv_bias);
        assert_eq!(c.head_dim, 128, "Qwen3Config's default, not 896 / 14");
        let with = s.replace("\"hidden_act\"", "\"head_dim\":32,\"hidden_act\"");
        assert_eq!(ModelConfig::from_json_str(&with).unwrap().head_dim, 32);
        let e = ModelConfig::from_json_str(
            &s.replace("\"hidden_act\"", "\"attention_bias\":true,\"hidden_act\""),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("attention_bias"), "{e}");
        // Qwen3's sliding window: Qwen2's keys (layers from max_window_layers).
        let windowed = s
            .replace(
                "\"use_sliding_window\":false",
                "\"use_sliding_window\":true",
            )
            .replace(
                "\"sliding_window\":32768",
                "\"sliding_window\":16,\"max_window_layers\":20",
            );
        let w = ModelConfig::from_json_str(&windowed)
            .unwrap()
            .sliding_windows;
        let mut expected = vec![None; 20];
        expected.extend([Some(16); 4]);
        assert_eq!(w, expected);
    }

    #[test]
    fn llama_bias_follows_attention_bias() {
        let s = QWEN.replace("Qwen2ForCausalLM", "LlamaForCausalLM");
        assert!(!ModelConfig::from_json_str(&s).unwrap().qkv_bias);
        let s = s.replace("\"hidden_act\"", "\"attention_bias\":true,\"hidden_act\"");
        assert!(ModelConfig::from_json_str(&s).unwrap().qkv_bias);
    }

    #[test]
    fn qwen2_windows_from_max_window_layers_and_layer_types() {
        let on = QWEN
            .replace(
                "\"use_sliding_window\":false",
                "\"use_sliding_window\":true",
            )
            .replace(
                "\"sliding_window\":32768",
                "\"sliding_window\":24,\"max_window_layers\":22",
            );
        let c = ModelConfig::from_json_str(&on).unwrap();
        let mut expected = vec![None; 22];
        expected.extend([Some(24), Some(24)]);
        assert_eq!(c.sliding_windows, expected);
        // Without max_window_layers: transformers' default 28, past the 24 layers: all full.
        let c = ModelConfig::from_json_str(&on.replace(",\"max_window_layers\":22", "")).unwrap();
        assert_eq!(c.sliding_windows, vec![None; 24]);
        // The window off (Qwen2.5's configs): all full, whatever sliding_window says.
        let c = ModelConfig::from_json_str(QWEN).unwrap();
        assert_eq!(c.sliding_windows, vec![None; 24]);
        // v5 layer_types wins over max_window_layers; "attention" is the legacy full name.
        let types: Vec<&str> = (0..24)
            .map(|i| match i % 3 {
                0 => "\"sliding_attention\"",
                1 => "\"full_attention\"",
                _ => "\"attention\"",
            })
            .collect();
        let typed = on.replace(
            "\"hidden_act\"",
            &format!("\"layer_types\":[{}],\"hidden_act\"", types.join(",")),
        );
        let c = ModelConfig::from_json_str(&typed).unwrap();
        let w: Vec<Option<usize>> = (0..24).map(|i| (i % 3 == 0).then_some(24)).collect();
        assert_eq!(c.sliding_windows, w);
        // Sliding layers with the window off: transformers fails building their mask.
        let e = ModelConfig::from_json_str(&typed.replace(
            "\"use_sliding_window\":true",
            "\"use_sliding_window\":false",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("no sliding window"), "{e}");
        for (from, to, needle) in [
            (
                "\"sliding_attention\"",
                "\"chunked_attention\"",
                "chunked_attention",
            ),
            ("[\"sliding_attention\",", "[", "23 entries"),
            (
                "\"sliding_window\":24",
                "\"sliding_window\":0",
                "positive integer",
            ),
        ] {
            let e = ModelConfig::from_json_str(&typed.replacen(from, to, 1))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn mistral_windows_every_layer_and_has_no_bias() {
        let m = QWEN
            .replace("Qwen2ForCausalLM", "MistralForCausalLM")
            .replace("\"model_type\":\"qwen2\"", "\"model_type\":\"mistral\"")
            .replace(
                "\"sliding_window\":32768",
                "\"sliding_window\":16,\"head_dim\":32",
            );
        let c = ModelConfig::from_json_str(&m).unwrap();
        assert_eq!(c.arch, Architecture::Mistral);
        assert!(!c.qkv_bias);
        assert_eq!(c.head_dim, 32, "explicit head_dim");
        // use_sliding_window and layer_types mean nothing to Mistral.
        assert_eq!(c.sliding_windows, vec![Some(16); 24]);
        let null = m.replace("\"sliding_window\":16", "\"sliding_window\":null");
        assert_eq!(
            ModelConfig::from_json_str(&null).unwrap().sliding_windows,
            vec![None; 24]
        );
        // Absent: MistralConfig's default, 4096.
        let absent = m.replace("\"sliding_window\":16,", "");
        assert_eq!(
            ModelConfig::from_json_str(&absent).unwrap().sliding_windows,
            vec![Some(4096); 24]
        );
    }

    #[test]
    fn refuses_floats_and_ids_that_would_compute_garbage() {
        let with = |k: &str, v: &str| {
            let mut j: serde_json::Value = serde_json::from_str(QWEN).unwrap();
            j[k] = serde_json::from_str(v).unwrap();
            ModelConfig::from_json_str(&j.to_string())
        };
        for (k, v, says) in [
            ("rms_norm_eps", "0", "rms_norm_eps"),
            ("rms_norm_eps", "-1e-6", "rms_norm_eps"),
            ("rms_norm_eps", "1e300", "rms_norm_eps"),
            ("rope_theta", "1e-300", "rope_theta"),
            ("rope_theta", "0.5", "rope_theta"),
            ("rope_theta", "1e300", "rope_theta"),
            ("eos_token_id", "4294967298", "not a token id"),
            ("eos_token_id", "[1, -2]", "not a token id"),
            ("bos_token_id", "\"<s>\"", "not a token id"),
        ] {
            let e = with(k, v).unwrap_err().to_string();
            assert!(e.contains(says), "{k}={v}: {e}");
        }
        assert_eq!(
            with("eos_token_id", "[4294967295, null]")
                .unwrap()
                .eos_token_ids,
            vec![u32::MAX]
        );
    }
}
