//! RoPE parameters of config.json, read as transformers 5.24's `RotaryEmbeddingConfigMixin`
//! standardizes them (`convert_rope_params_to_dict`, `standardize_rope_params`) and its rope init
//! functions read them (`modeling_rope_utils.py`).

use super::ConfigError;
use crate::kernels::rope::RopeScaling;
use serde_json::{Map, Value};

/// The RoPE parameters of a config: the base and the scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// `rope_theta` (10000 when absent).
    pub theta: f64,
    /// The scaling `rope_type` asks for.
    pub scaling: RopeScaling,
}

/// Reads `rope_theta`, `rope_parameters` (v5) and `rope_scaling` (v4) of a config object.
/// `rope_scaling`, when non-empty, replaces `rope_parameters`, as in transformers.
pub fn parse(
    obj: &Map<String, Value>,
    max_position_embeddings: usize,
) -> Result<RopeConfig, ConfigError> {
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let mut theta =
        match get("rope_theta") {
            None => None,
            Some(x) => Some(x.as_f64().ok_or_else(|| {
                ConfigError::from(format!("'rope_theta' must be a number, got {x}"))
            })?),
        };
    let mut params: Option<(&str, &Map<String, Value>)> = None;
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(p) = get(key) {
            let p = p
                .as_object()
                .ok_or_else(|| ConfigError::from(format!("'{key}' must be an object or null")))?;
            if !p.is_empty() || params.is_none() {
                params = Some((key, p));
            }
        }
    }
    let Some((key, p)) = params else {
        return Ok(RopeConfig {
            theta: theta.unwrap_or(10000.0),
            scaling: RopeScaling::None,
        });
    };
    let pget = |k: &str| p.get(k).filter(|v| !v.is_null());
    let num = |k: &str| -> Result<Option<f64>, ConfigError> {
        match pget(k) {
            None => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| ConfigError::from(format!("'{key}.{k}' must be a number, got {x}"))),
        }
    };
    if let Some(t) = num("rope_theta")? {
        theta = Some(t);
    }
    let theta = theta.unwrap_or(10000.0);
    if let Some(f) = num("partial_rotary_factor")? {
        if f != 1.0 {
            return Err(ConfigError::from(format!(
                "'{key}.partial_rotary_factor' {f} is not implemented (only 1.0)"
            )));
        }
    }
    let rope_type = match pget("rope_type").or_else(|| pget("type")) {
        None => "default".to_string(),
        Some(t) => t
            .as_str()
            .ok_or_else(|| {
                ConfigError::from(format!("'{key}.rope_type' must be a string, got {t}"))
            })?
            .to_string(),
    };
    let factor = |required: bool| -> Result<Option<f64>, ConfigError> {
        match num("factor")? {
            Some(f) if f.is_finite() && f > 0.0 => Ok(Some(f)),
            Some(f) => Err(ConfigError::from(format!(
                "'{key}.factor' must be positive, got {f}"
            ))),
            None if required => Err(ConfigError::from(format!(
                "rope type '{rope_type}' needs '{key}.factor', which is missing"
            ))),
            None => Ok(None),
        }
    };
    // llama3 and yarn: a top-level original_max_position_embeddings wins (Phi3's layout), then
    // the parameters', then max_position_embeddings.
    let original = || -> Result<usize, ConfigError> {
        let v = get("original_max_position_embeddings")
            .or_else(|| pget("original_max_position_embeddings"));
        match v {
            None => Ok(max_position_embeddings),
            Some(x) => x
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    ConfigError::from(format!(
                        "'original_max_position_embeddings' must be a positive integer, got {x}"
                    ))
                }),
        }
    };
    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: factor(true)?.unwrap_or(1.0),
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor(true)?.unwrap_or(1.0),
            max_position_embeddings,
        },
        "llama3" => {
            let need = |k: &str| {
                num(k)?.ok_or_else(|| ConfigError::from(format!("rope type 'llama3' needs '{key}.{k}', which is missing")))
            };
            let (lo, hi) = (need("low_freq_factor")?, need("high_freq_factor")?);
            if !(lo > 0.0 && hi > lo) {
                return Err(ConfigError::from(format!(
                    "llama3 needs 0 < low_freq_factor < high_freq_factor, got {lo} and {hi}"
                )));
            }
            RopeScaling::Llama3 {
                factor: factor(true)?.unwrap_or(1.0),
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: original()?,
            }
        }
        "yarn" => {
            let orig = original()?;
            let factor = factor(false)?
                .unwrap_or(max_position_embeddings as f64 / orig as f64);
            let mscale_of = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match num("attention_factor")? {
                Some(a) => a,
                None => match (num("mscale")?, num("mscale_all_dim")?) {
                    // Python truthiness: both present and non-zero.
                    (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        mscale_of(factor, m) / mscale_of(factor, all)
                    }
                    _ => mscale_of(factor, 1.0),
                },
            };
            // `rope_parameters.get("beta_fast") or 32`: absent, null or 0 takes the default.
            let beta = |k: &str, default: f64| -> Result<f64, ConfigError> {
                Ok(num(k)?.filter(|&b| b != 0.0).unwrap_or(default))
            };
            let truncate = match p.get("truncate") {
                None => true,
                Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(x) => return Err(ConfigError::from(format!("'{key}.truncate' must be true or false, got {x}"))),
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig,
                attention_factor,
                beta_fast: beta("beta_fast", 32.0)?,
                beta_slow: beta("beta_slow", 1.0)?,
                truncate,
            }
        }
        t => {
            return Err(ConfigError::from(format!(
                "rope type '{t}' is not implemented (default, linear, dynamic, yarn and llama3 are); refusing to compute something else"
            )))
        }
    };
    Ok(RopeConfig { theta, scaling })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::rope::{scaled_inv_freq, ScalingMistake};
    use crate::kernels::Precision;

    /// transformers' own float32 values (its `ROPE_INIT_FUNCTIONS`; dynamic through the forward
    /// pass's tensor `seq_len`) and the reference's float64 ones, written by
    /// `python -m lockstep_reference.rope_scaling`.
    const TABLE: &str = include_str!("../kernels/rope_hf_table.json");

    #[test]
    fn scaled_inv_freq_matches_transformers() {
        let rows: Vec<Value> = serde_json::from_str(TABLE).unwrap();
        assert!(rows.len() >= 13);
        let mut kinds = std::collections::BTreeSet::new();
        for row in rows {
            let name = row["name"].as_str().unwrap();
            let cfg = row["config"].as_object().unwrap();
            let max_pos = cfg
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(2048) as usize;
            let rope = parse(cfg, max_pos).unwrap();
            kinds.insert(
                format!("{:?}", rope.scaling)
                    .split(' ')
                    .next()
                    .unwrap()
                    .to_string(),
            );
            let d = row["head_dim"].as_u64().unwrap() as usize;
            let s = row["seq_len"].as_u64().unwrap() as usize;
            let want = |k: &str| -> Vec<f64> {
                row[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            };
            let m = ScalingMistake::None;
            let (f32s, a32) = scaled_inv_freq(Precision::F32, rope.theta, d, rope.scaling, s, m);
            let (f64s, a64) = scaled_inv_freq(Precision::F64, rope.theta, d, rope.scaling, s, m);
            // serde_json parses a decimal to within an ulp (0.707 here), not always exactly.
            let hf = row["attention_factor"].as_f64().unwrap();
            assert!(
                (a32 - hf).abs() <= 4e-16 * hf,
                "{name}: {a32} vs transformers {hf}"
            );
            let a = row["attention_factor_f64"].as_f64().unwrap();
            assert!((a64 - a).abs() <= 4e-16 * a, "{name}: {a64} vs {a}");
            for (i, (got, hf)) in f32s.iter().zip(want("inv_freq_f32")).enumerate() {
                // float32 values, within one float32 ulp of transformers' (the float32 `pow`
                // of libm and of torch may differ in the last bit).
                assert_eq!(*got as f32 as f64, *got);
                let ulp = (hf as f32).to_bits().abs_diff((*got as f32).to_bits());
                assert!(ulp <= 1, "{name} seq {s} [{i}]: {got} vs transformers {hf}");
            }
            for (i, (got, r)) in f64s.iter().zip(want("inv_freq_f64")).enumerate() {
                assert!(
                    ((got - r) / r).abs() <= 4e-16,
                    "{name} seq {s} [{i}]: {got} vs {r}"
                );
            }
            assert_eq!(f32s.len(), d / 2);
        }
        assert_eq!(kinds.len(), 4, "{kinds:?}");
    }

    #[test]
    fn dynamic_changes_only_past_the_original_length() {
        let cfg = serde_json::json!({"rope_scaling": {"type": "dynamic", "factor": 4.0}});
        let rope = parse(cfg.as_object().unwrap(), 64).unwrap();
        let at = |s| {
            scaled_inv_freq(
                Precision::F64,
                rope.theta,
                32,
                rope.scaling,
                s,
                ScalingMistake::None,
            )
            .0
        };
        let plain = scaled_inv_freq(
            Precision::F64,
            10000.0,
            32,
            RopeScaling::None,
            1,
            ScalingMistake::None,
        )
        .0;
        assert_eq!(at(1), plain);
        assert_eq!(at(64), plain);
        assert!(at(65)[1] < plain[1] && at(300)[1] < at(65)[1]);
        assert_eq!(at(300)[0], 1.0);
    }

    #[test]
    fn refuses_what_it_does_not_compute() {
        for (json, needle) in [
            (
                r#"{"rope_scaling":{"type":"longrope","factor":2.0}}"#,
                "longrope",
            ),
            (r#"{"rope_scaling":{"type":"linear"}}"#, "factor"),
            (
                r#"{"rope_scaling":{"type":"llama3","factor":8.0,"low_freq_factor":1.0}}"#,
                "high_freq_factor",
            ),
            (
                r#"{"rope_parameters":{"rope_type":"linear","factor":2.0,"partial_rotary_factor":0.5}}"#,
                "partial_rotary_factor",
            ),
            (
                r#"{"rope_scaling":{"type":"yarn","factor":4.0,"truncate":"no"}}"#,
                "truncate",
            ),
            (
                r#"{"rope_scaling":{"type":"linear","factor":-2.0}}"#,
                "positive",
            ),
        ] {
            let v: Value = serde_json::from_str(json).unwrap();
            let e = parse(v.as_object().unwrap(), 4096).unwrap_err().to_string();
            assert!(e.contains(needle), "{json}: {e}");
        }
        // rope_scaling replaces rope_parameters (transformers' convert_rope_params_to_dict).
        let v: Value = serde_json::from_str(
            r#"{"rope_theta":5.0,"rope_parameters":{"rope_type":"default","rope_theta":7.0},
                "rope_scaling":{"type":"linear","factor":2.0}}"#,
        )
        .unwrap();
        let r = parse(v.as_object().unwrap(), 4096).unwrap();
        assert_eq!(r.scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(r.theta, 5.0);
    }
}
