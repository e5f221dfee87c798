//! The sliding attention window of each layer, read from config.json the way transformers 5.24's
//! Mistral, Qwen2, Qwen3 and Qwen3-MoE config classes derive it.

use super::ConfigError;
use serde_json::Value;

/// The attention window of every layer, as transformers 5.24 derives it from config.json:
/// `Some(w)` where a query at position `i` sees only keys `j` with `i - w < j <= i`
/// (`masking_utils.sliding_window_overlay`: `kv_idx > q_idx - sliding_window`), `None` for full
/// causal attention.
///
/// - Mistral (`model_type` "mistral"): every layer gets `sliding_window` (4096 when the key is
///   absent, none when it is null); `layer_types` is ignored, as `MistralConfig` ignores it.
/// - Qwen3-MoE ("qwen3_moe"): every layer gets `sliding_window` when `use_sliding_window` is true.
/// - Qwen2 / Qwen3 ("qwen2", "qwen3"): `sliding_window` counts only when `use_sliding_window` is
///   true; the layers are those `layer_types` marks "sliding_attention", or, without
///   `layer_types`, the layers from `max_window_layers` (default 28) on.
/// - Anything else (Llama): no window; a `layer_types` other than full attention is refused.
///
/// A "sliding_attention" layer without a window (transformers fails there too), a layer type
/// lockstep does not implement, or a `layer_types` of the wrong length is an error.
pub fn layer_windows(
    config: &Value,
    num_layers: usize,
) -> std::result::Result<Vec<Option<usize>>, ConfigError> {
    let obj = config.as_object().ok_or("expected a JSON object")?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let model_type = get("model_type").and_then(Value::as_str).unwrap_or("");
    let archs: Vec<&str> = get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let family = match archs.first().copied() {
        Some("MistralForCausalLM") => "mistral",
        Some("Qwen2ForCausalLM") => "qwen2",
        Some("Qwen3ForCausalLM") => "qwen3",
        Some("Qwen3MoeForCausalLM") => "qwen3_moe",
        _ => model_type,
    };
    let use_sliding = match get("use_sliding_window") {
        None => false,
        Some(x) => x.as_bool().ok_or_else(|| {
            ConfigError::from(format!(
                "'use_sliding_window' must be true or false, got {x}"
            ))
        })?,
    };
    // `sliding_window` as the config class stores it: the class default when absent, None when null.
    let window = match obj.get("sliding_window") {
        None => Some(4096),
        Some(Value::Null) => None,
        Some(x) => Some(
            x.as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    ConfigError::from(format!(
                        "'sliding_window' must be a positive integer or null, got {x}"
                    ))
                })?,
        ),
    };
    let layer_types: Option<Vec<String>> = match get("layer_types") {
        None => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|t| {
                    t.as_str()
                        // transformers' legacy name for full attention.
                        .map(|t| {
                            if t == "attention" {
                                "full_attention"
                            } else {
                                t
                            }
                            .to_string()
                        })
                        .ok_or_else(|| {
                            ConfigError::from(format!(
                                "'layer_types' entries must be strings, got {t}"
                            ))
                        })
                })
                .collect::<std::result::Result<_, _>>()?,
        ),
        Some(x) => {
            return Err(ConfigError::from(format!(
                "'layer_types' must be a list, got {x}"
            )))
        }
    };
    if let Some(types) = &layer_types {
        if types.len() != num_layers {
            return Err(ConfigError::from(format!(
                "layer_types has {} entries for num_hidden_layers {num_layers}",
                types.len()
            )));
        }
        if let Some(t) = types
            .iter()
            .find(|t| !["full_attention", "sliding_attention"].contains(&t.as_str()))
        {
            return Err(ConfigError::from(format!(
                "layer type \"{t}\" is not implemented (only full_attention and sliding_attention)"
            )));
        }
    }
    match family {
        "mistral" => Ok(vec![window; num_layers]),
        "qwen3_moe" => Ok(vec![window.filter(|_| use_sliding); num_layers]),
        "qwen2" | "qwen3" => {
            let window = window.filter(|_| use_sliding);
            let types = match layer_types {
                Some(types) => types,
                None => {
                    let first = match get("max_window_layers") {
                        None => 28,
                        Some(x) => x.as_u64().map(|n| n as usize).ok_or_else(|| {
                            ConfigError::from(format!(
                                "'max_window_layers' must be a non-negative integer, got {x}"
                            ))
                        })?,
                    };
                    (0..num_layers)
                        .map(|i| {
                            if window.is_some() && i >= first {
                                "sliding_attention"
                            } else {
                                "full_attention"
                            }
                            .to_string()
                        })
                        .collect()
                }
            };
            types
                .iter()
                .map(|t| match (t.as_str(), window) {
                    ("sliding_attention", None) => Err(ConfigError::from(
                        "layer_types has sliding_attention layers but no sliding window (use_sliding_window is false or sliding_window is null)"
                            .to_string(),
                    )),
                    ("sliding_attention", w) => Ok(w),
                    _ => Ok(None),
                })
                .collect()
        }
        _ => {
            if layer_types.is_some_and(|t| t.iter().any(|t| t != "full_attention")) {
                return Err(ConfigError::from(
                    "layer_types other than \"full_attention\" (sliding window) are not implemented for this architecture",
                ));
            }
            Ok(vec![None; num_layers])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_families_share_the_window_rules() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let q3 = r#"{"model_type":"qwen3","use_sliding_window":true,"sliding_window":8,"max_window_layers":1}"#;
        assert_eq!(layer_windows(&v(q3), 3).unwrap(), [None, Some(8), Some(8)]);
        let moe = r#"{"model_type":"qwen3_moe","use_sliding_window":true,"sliding_window":8,"max_window_layers":1}"#;
        assert_eq!(layer_windows(&v(moe), 2).unwrap(), [Some(8), Some(8)]);
        let llama =
            r#"{"model_type":"llama","sliding_window":8,"layer_types":["sliding_attention"]}"#;
        assert!(layer_windows(&v(llama), 1)
            .unwrap_err()
            .to_string()
            .contains("not implemented"));
    }
}
