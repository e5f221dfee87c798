//! The mixture-of-experts settings of a Qwen3-MoE config.json, read as transformers 5.24's
//! `Qwen3MoeConfig` reads them (`configuration_qwen3_moe.py`, defaults included).

use super::ConfigError;
use serde_json::{Map, Value};

/// The sparse MLP settings of a Qwen3-MoE model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoeConfig {
    /// Experts per sparse layer (`num_experts`, saved by transformers as `num_local_experts`).
    pub num_experts: usize,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub top_k: usize,
    /// Whether the top-k routing probabilities are renormalised to sum to 1 (`norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// The intermediate size of each expert (`moe_intermediate_size`).
    pub moe_intermediate_size: usize,
    /// Per layer, whether its MLP is the sparse block (else the dense MLP with
    /// `intermediate_size`): not in `mlp_only_layers`, and `(layer + 1) % decoder_sparse_step == 0`.
    pub sparse_layers: Vec<bool>,
}

impl MoeConfig {
    /// Whether layer `l` runs the sparse (routed) MLP.
    pub fn is_sparse(&self, l: usize) -> bool {
        self.sparse_layers.get(l).copied().unwrap_or(false)
    }

    /// Number of sparse layers.
    pub fn num_sparse(&self) -> usize {
        self.sparse_layers.iter().filter(|&&s| s).count()
    }
}

/// The MoE settings of a `qwen3_moe` config object (`num_layers` decoder layers), or a one-line
/// message saying which key is wrong.
pub fn parse(obj: &Map<String, Value>, num_layers: usize) -> Result<MoeConfig, ConfigError> {
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let count = |k: &str, default: u64| -> Result<usize, ConfigError> {
        match get(k) {
            None => Ok(default as usize),
            Some(x) => x
                .as_u64()
                .filter(|&n| n > 0 && n <= 1 << 20)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    ConfigError::from(format!(
                        "'{k}' must be a positive integer (at most 2^20), got {x}"
                    ))
                }),
        }
    };
    // Qwen3MoeConfig's attribute_map sends num_experts to num_local_experts; released
    // checkpoints write num_experts.
    let num_experts = match get("num_experts") {
        Some(_) => count("num_experts", 128)?,
        None => count("num_local_experts", 128)?,
    };
    let top_k = count("num_experts_per_tok", 8)?;
    if top_k > num_experts {
        return Err(ConfigError::from(format!(
            "num_experts_per_tok ({top_k}) is larger than the number of experts ({num_experts})"
        )));
    }
    let norm_topk_prob = match get("norm_topk_prob") {
        None => false,
        Some(x) => x.as_bool().ok_or_else(|| {
            ConfigError::from(format!("'norm_topk_prob' must be true or false, got {x}"))
        })?,
    };
    let moe_intermediate_size = count("moe_intermediate_size", 768)?;
    let step = count("decoder_sparse_step", 1)?;
    let mlp_only: Vec<usize> = match get("mlp_only_layers") {
        None => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64().map(|n| n as usize).ok_or_else(|| {
                    ConfigError::from(format!(
                        "'mlp_only_layers' must be a list of layer indices, got {x}"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(x) => {
            return Err(ConfigError::from(format!(
                "'mlp_only_layers' must be a list of layer indices, got {x}"
            )))
        }
    };
    let sparse_layers = (0..num_layers)
        .map(|l| !mlp_only.contains(&l) && (l + 1) % step == 0)
        .collect();
    Ok(MoeConfig {
        num_experts,
        top_k,
        norm_topk_prob,
        moe_intermediate_size,
        sparse_layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn sparse_layers_as_transformers_decides() {
        let m = parse(&obj(r#"{"num_local_experts":8,"num_experts_per_tok":2,"moe_intermediate_size":32,"mlp_only_layers":[1]}"#), 3).unwrap();
        assert_eq!((m.num_experts, m.top_k, m.norm_topk_prob), (8, 2, false));
        assert_eq!(m.sparse_layers, [true, false, true]);
        let m = parse(
            &obj(r#"{"num_experts":16,"decoder_sparse_step":2,"norm_topk_prob":true}"#),
            4,
        )
        .unwrap();
        assert_eq!(
            (m.num_experts, m.top_k, m.moe_intermediate_size),
            (16, 8, 768)
        );
        assert!(m.norm_topk_prob);
        assert_eq!(m.sparse_layers, [false, true, false, true]);
        let e = parse(&obj(r#"{"num_experts":2,"num_experts_per_tok":3}"#), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_experts_per_tok"), "{e}");
        let e = parse(&obj(r#"{"num_experts":0}"#), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_experts"), "{e}");
        assert!(parse(&obj(r#"{"mlp_only_layers":"1"}"#), 1).is_err());
    }
}
