//! The mapping from llama.cpp to Hugging Face: tensor names and the config.json a GGUF's
//! metadata implies.

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
            // A NaN or infinity would become JSON null, i.e. the default, silently.
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| format!("{} must be a finite number, got {v:?}", key(k))),
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
        for bad in [f32::NAN, f32::INFINITY] {
            for key in [
                "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon",
            ] {
                let mut kvs = smollm2_like("llama");
                kvs.retain(|(k, _)| k != key);
                kvs.push((key.into(), f32v(bad)));
                let e = config_json(&header(&kvs, &[])).unwrap_err();
                assert!(e.contains(key) && e.contains("finite"), "{e}");
            }
        }
    }
}
