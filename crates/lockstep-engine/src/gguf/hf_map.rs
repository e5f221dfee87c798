//! The mapping from llama.cpp to Hugging Face: tensor names and the config.json a GGUF's
//! metadata implies.

use super::error::GgufError;
use super::header::{GgmlType, Header, Value};
use crate::config::ModelConfig;

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

/// The Hugging Face shape the config implies for a tensor under its Hugging Face name, `None` for
/// a name the model does not have (a layer beyond `num_hidden_layers`, an unknown module).
pub fn expected_shape(hf: &str, c: &ModelConfig) -> Option<Vec<usize>> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let qd = c.num_heads.checked_mul(c.head_dim)?;
    let kvd = c.num_kv_heads.checked_mul(c.head_dim)?;
    match hf {
        "model.embed_tokens.weight" | "lm_head.weight" => return Some(vec![c.vocab_size, h]),
        "model.norm.weight" => return Some(vec![h]),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    if layer.parse::<usize>().ok()? >= c.num_layers {
        return None;
    }
    Some(match module {
        "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
        "self_attn.q_proj.weight" => vec![qd, h],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kvd, h],
        "self_attn.q_proj.bias" => vec![qd],
        "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![kvd],
        "self_attn.o_proj.weight" => vec![h, qd],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![i, h],
        "mlp.down_proj.weight" => vec![h, i],
        _ => return None,
    })
}

/// The config.json text a GGUF's metadata implies, read as `transformers` reads it (its
/// `GGUF_CONFIG_MAPPING`), for [`ModelConfig::from_json_str`] to validate. `file` is the whole
/// file (for `rope_freqs.weight`, see [`llama3_rope_parameters`]). Refuses what the engine does
/// not compute (other architectures, RoPE scaling types in the metadata).
pub fn config_json(h: &Header, file: &[u8]) -> std::result::Result<String, GgufError> {
    let arch = h
        .get("general.architecture")
        .ok_or("no general.architecture in the metadata")?
        .as_str()
        .ok_or("general.architecture is not a string")?;
    let (class, model_type) = match arch {
        "llama" => ("LlamaForCausalLM", "llama"),
        "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
        other => {
            return Err(GgufError::from(format!(
            "architecture '{other}' is not supported (lockstep reads llama and qwen2 GGUF files)"
        )))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| -> std::result::Result<Option<u64>, GgufError> {
        match h.get(&key(k)) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                GgufError::from(format!(
                    "{} must be a non-negative integer, got {v:?}",
                    key(k)
                ))
            }),
        }
    };
    let need = |k: &str| -> std::result::Result<u64, GgufError> {
        int(k)?.ok_or_else(|| GgufError::from(format!("missing metadata {}", key(k))))
    };
    let float = |k: &str| -> std::result::Result<Option<f64>, GgufError> {
        match h.get(&key(k)) {
            None => Ok(None),
            // A NaN or infinity would become JSON null, i.e. the default, silently.
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| {
                    GgufError::from(format!("{} must be a finite number, got {v:?}", key(k)))
                }),
        }
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = int("attention.head_count_kv")?.unwrap_or(heads);
    if let Some(t) = h.get(&key("rope.scaling.type")) {
        if t.as_str() != Some("none") {
            return Err(GgufError::from(format!(
                "rope scaling {t:?} ({}) is not implemented (only the default RoPE)",
                key("rope.scaling.type")
            )));
        }
    }
    // transformers maps llama's rope.dimension_count to head_dim and ignores it for qwen2.
    let head_dim = match (arch, int("rope.dimension_count")?) {
        ("llama", Some(d)) => d,
        _ if heads > 0 => hidden / heads,
        _ => 0,
    };
    if let Some(k) = int("attention.key_length")? {
        if k != head_dim {
            return Err(GgufError::from(format!(
                "{} is {k} but the head size is {head_dim}; not supported",
                key("attention.key_length")
            )));
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
    let theta = float("rope.freq_base")?.unwrap_or(10000.0);
    let rope_parameters = match h.tensor("rope_freqs.weight") {
        None => None,
        Some(_) if arch != "llama" => {
            return Err(GgufError::from(format!(
                "rope_freqs.weight in a {arch} file is not supported (only Llama 3 scaling)"
            )))
        }
        Some(t) => {
            let freqs = f32_tensor(h, t, file)?;
            let original = int("rope.scaling.original_context_length")?;
            let factor = float("rope.scaling.factor")?;
            llama3_rope_parameters(&freqs, theta, head_dim as usize, factor, original)?
        }
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
        "rope_theta": theta,
        "tie_word_embeddings": h.tensor("output.weight").is_none(),
    });
    let obj = cfg.as_object_mut().expect("object");
    if let Some(mut p) = rope_parameters {
        p["rope_theta"] = theta.into();
        obj.insert("rope_parameters".into(), p);
    }
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

/// The values of a 1-D F32 tensor of the file.
fn f32_tensor(
    h: &Header,
    t: &super::header::TensorInfo,
    file: &[u8],
) -> std::result::Result<Vec<f32>, GgufError> {
    if t.ty != GgmlType::F32 || t.dims.len() != 1 {
        return Err(GgufError::from(format!(
            "{} must be a 1-D F32 tensor, got {} with dims {:?}",
            t.name, t.ty, t.dims
        )));
    }
    let start = h.data_start.saturating_add(t.offset) as usize;
    let end = start.saturating_add(t.nbytes()? as usize);
    let bytes = file.get(start..end).ok_or_else(|| {
        GgufError::from(format!(
            "{}: its data lies past the end of the file",
            t.name
        ))
    })?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect())
}

/// The converter's defaults for `llama3` scaling: `low_freq_factor`, `high_freq_factor` and the
/// original context length (`LlamaModel.generate_extra_tensors` of llama.cpp's
/// `convert_hf_to_gguf.py`; those of every Llama 3.x release).
const LLAMA3_DEFAULTS: (f64, f64, u64) = (1.0, 4.0, 8192);

/// The per-frequency divisors llama.cpp's converter writes as `rope_freqs.weight` for Llama 3
/// scaling with these parameters, computed as it computes them (float32 tensors).
pub fn llama3_rope_freqs(
    theta: f64,
    head_dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    original: u64,
) -> Vec<f32> {
    let old = original as f32;
    let (low_wavelen, high_wavelen) = (original as f64 / low, original as f64 / high);
    (0..head_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / head_dim as f32;
            let freq = 1.0 / (theta as f32).powf(e);
            // `2 * math.pi / freq`: a scalar over a float32 tensor.
            let wavelen = (1.0 / freq) * (2.0 * std::f64::consts::PI) as f32;
            if (wavelen as f64) < high_wavelen {
                1.0
            } else if wavelen as f64 > low_wavelen {
                factor as f32
            } else {
                let smooth = ((1.0 / wavelen) * old - low as f32) / (high - low) as f32;
                1.0 / ((1.0 - smooth) / factor as f32 + smooth)
            }
        })
        .collect()
}

/// The `rope_parameters` (type `llama3`) a `rope_freqs.weight` of llama.cpp's converter stands
/// for. The converter writes no scaling metadata for Llama 3, only these divisors, computed with
/// `low_freq_factor` 1, `high_freq_factor` 4 and an original context of 8192 (its defaults);
/// the factor is the largest divisor (`{arch}.rope.scaling.factor` and
/// `.original_context_length` win where a file has them). The divisors are then recomputed from
/// those parameters and must match the file's (relative 1e-5, float32 rounding), else the file is
/// refused rather than run with a RoPE it does not describe. All divisors 1: no scaling (`None`).
/// `transformers` 5.24's GGUF loader drops the tensor (it rebuilds no scaling for llama files).
pub fn llama3_rope_parameters(
    freqs: &[f32],
    theta: f64,
    head_dim: usize,
    factor: Option<f64>,
    original: Option<u64>,
) -> std::result::Result<Option<serde_json::Value>, GgufError> {
    if freqs.len() != head_dim / 2 {
        return Err(GgufError::from(format!(
            "rope_freqs.weight has {} values but the head size {head_dim} needs {}",
            freqs.len(),
            head_dim / 2
        )));
    }
    if let Some(bad) = freqs.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
        return Err(GgufError::from(format!(
            "rope_freqs.weight holds {bad}; its values must be positive"
        )));
    }
    if factor.is_none() && freqs.iter().all(|&f| f == 1.0) {
        return Ok(None);
    }
    let (low, high, default_original) = LLAMA3_DEFAULTS;
    let original = original.unwrap_or(default_original);
    let factor = factor.unwrap_or_else(|| freqs.iter().fold(0f32, |a, &b| a.max(b)) as f64);
    let want = llama3_rope_freqs(theta, head_dim, factor, low, high, original);
    for (i, (&got, &w)) in freqs.iter().zip(&want).enumerate() {
        if ((got - w) as f64).abs() > 1e-5 * (w as f64).abs() {
            return Err(GgufError::from(format!(
                "rope_freqs.weight[{i}] is {got} but Llama 3 scaling (factor {factor}, \
                 low_freq_factor {low}, high_freq_factor {high}, original context {original}) \
                 gives {w}; other per-frequency RoPE factors are not supported"
            )));
        }
    }
    Ok(Some(serde_json::json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::test_util::*;
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

    /// config_json of a file with these metadata entries and 1-D F32 tensors.
    fn json_with(
        kvs: &[(String, (u32, Vec<u8>))],
        tensors: &[(&str, Vec<f32>)],
    ) -> std::result::Result<String, GgufError> {
        let kvs: Vec<(&str, (u32, Vec<u8>))> =
            kvs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let ts: Vec<(&str, Vec<u64>, GgmlType, Vec<u8>)> = tensors
            .iter()
            .map(|(n, v)| (*n, vec![v.len() as u64], GgmlType::F32, f32_bytes(v)))
            .collect();
        let bytes = file(&kvs, &ts, 32);
        config_json(&Header::parse(&bytes).unwrap(), &bytes)
    }

    /// config_json of a file with these metadata entries and one-value tensors of these names.
    fn json(
        kvs: &[(String, (u32, Vec<u8>))],
        tensors: &[&str],
    ) -> std::result::Result<String, GgufError> {
        let ts: Vec<(&str, Vec<f32>)> = tensors.iter().map(|n| (*n, vec![0.0])).collect();
        json_with(kvs, &ts)
    }

    #[test]
    fn config_from_metadata() {
        let j = json(&smollm2_like("llama"), &["token_embd.weight"]);
        let c = ModelConfig::from_json_str(&j.unwrap()).unwrap();
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
        let j = json(&smollm2_like("qwen2"), &["output.weight"]);
        let c = ModelConfig::from_json_str(&j.unwrap()).unwrap();
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
        let c = ModelConfig::from_json_str(&json(&kvs, &[]).unwrap()).unwrap();
        assert_eq!(c.vocab_size, 3);
    }

    #[test]
    fn llama3_scaling_from_rope_freqs() {
        // Llama 3.2's scaling as the converter writes it: factors 1 (high frequencies), 32 (low)
        // and the smoothed band between.
        let freqs = llama3_rope_freqs(100000.0, 64, 32.0, 1.0, 4.0, 8192);
        assert_eq!(freqs[0], 1.0);
        assert_eq!(freqs[31], 32.0);
        assert!(freqs.iter().any(|&f| f > 1.0 && f < 32.0));
        let j = json_with(
            &smollm2_like("llama"),
            &[("rope_freqs.weight", freqs.clone())],
        );
        let c = ModelConfig::from_json_str(&j.unwrap()).unwrap();
        assert_eq!(
            c.rope_scaling,
            crate::kernels::rope::RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }
        );
        assert_eq!(c.rope_theta, 100000.0);
        // All divisors 1: no scaling.
        let j = json_with(
            &smollm2_like("llama"),
            &[("rope_freqs.weight", vec![1.0; 32])],
        );
        let c = ModelConfig::from_json_str(&j.unwrap()).unwrap();
        assert_eq!(c.rope_scaling, crate::kernels::rope::RopeScaling::None);
        // Divisors Llama 3's formula does not give, the wrong count, non-positive values, a
        // Qwen2 file: refused with the reason.
        let mid = freqs.iter().position(|&f| f > 1.0 && f < 32.0).unwrap();
        let mut odd = freqs.clone();
        odd[mid] *= 1.001;
        let at = format!("rope_freqs.weight[{mid}]");
        for (f, needle) in [
            (odd, at.as_str()),
            (freqs[..16].to_vec(), "16 values"),
            (vec![0.0; 32], "positive"),
        ] {
            let e = json_with(&smollm2_like("llama"), &[("rope_freqs.weight", f)])
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
        let e = json_with(&smollm2_like("qwen2"), &[("rope_freqs.weight", freqs)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("qwen2"), "{e}");
    }

    #[test]
    fn refuses_what_the_engine_does_not_compute() {
        let e = json(&smollm2_like("gemma"), &[]).unwrap_err().to_string();
        assert!(e.contains("'gemma'"), "{e}");
        let mut kvs = smollm2_like("llama");
        kvs.push(("llama.rope.scaling.type".into(), strv("yarn")));
        assert!(json(&kvs, &[]).unwrap_err().to_string().contains("yarn"));
        let e = json(&smollm2_like("llama"), &["rope_freqs.weight"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_freqs"), "{e}");
        let mut kvs = smollm2_like("llama");
        kvs.retain(|(k, _)| k != "llama.block_count");
        let e = json(&kvs, &[]).unwrap_err().to_string();
        assert!(e.contains("missing metadata llama.block_count"), "{e}");
        let mut kvs = smollm2_like("llama");
        kvs.push(("llama.attention.key_length".into(), u32v(128)));
        assert!(json(&kvs, &[])
            .unwrap_err()
            .to_string()
            .contains("key_length"));
        for bad in [f32::NAN, f32::INFINITY] {
            for key in [
                "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon",
            ] {
                let mut kvs = smollm2_like("llama");
                kvs.retain(|(k, _)| k != key);
                kvs.push((key.into(), f32v(bad)));
                let e = json(&kvs, &[]).unwrap_err().to_string();
                assert!(e.contains(key) && e.contains("finite"), "{e}");
            }
        }
    }
}
