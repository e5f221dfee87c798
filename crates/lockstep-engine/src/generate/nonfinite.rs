//! Locating the first non-finite value of a forward pass (for the error of a generation whose
//! logits are NaN or infinite).

use crate::error::{EngineError, Result};
use crate::kernels::Float;
use crate::model::{KvCache, Model};
use crate::observer::{Observer, TapView};

/// Where a forward pass first produces a non-finite value ([`first_nonfinite_tap`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NonFiniteTap {
    /// The canonical tap name, e.g. `layers.1.mlp_out`.
    pub tensor: String,
    /// Index of the first non-finite element in the tap's canonical trace shape (`[1, T, ·]`,
    /// or `[1, heads, T, ·]` for per-head tensors), row-major.
    pub index: Vec<usize>,
    /// The token position of that element.
    pub token_position: usize,
    /// The value there (NaN, +∞ or −∞).
    pub value: f64,
}

impl std::fmt::Display for NonFiniteTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = if self.value.is_nan() {
            "NaN"
        } else if self.value > 0.0 {
            "inf"
        } else {
            "-inf"
        };
        write!(
            f,
            "{v} at {}{:?} (token position {})",
            self.tensor, self.index, self.token_position
        )
    }
}

/// An observer that keeps the first tap holding a non-finite value (taps come in forward order).
#[derive(Debug, Default)]
struct FirstNonFinite {
    found: Option<NonFiniteTap>,
}

impl<T: Float> Observer<T> for FirstNonFinite {
    fn tap(&mut self, name: lockstep_trace::TapName, view: TapView<'_, T>) {
        if self.found.is_some() {
            return;
        }
        let bad = |x: &T| !x.to_f64().is_finite();
        // (index in the canonical shape, token position, value) of the first non-finite element.
        let hit = match view {
            TapView::Tokens(_) | TapView::Ids { .. } => None,
            TapView::Rows { data, cols } => data.iter().position(bad).map(|i| {
                let (t, c) = (i / cols.max(1), i % cols.max(1));
                (vec![0, t, c], t, data[i].to_f64())
            }),
            TapView::Heads {
                data,
                heads,
                head_dim,
            } => {
                // Stored [T][heads][D], traced [1, heads, T, D]: the first in traced order.
                data.iter()
                    .enumerate()
                    .filter(|(_, x)| bad(x))
                    .map(|(i, x)| {
                        let (t, h, d) =
                            (i / (heads * head_dim), (i / head_dim) % heads, i % head_dim);
                        (vec![0, h, t, d], t, x.to_f64())
                    })
                    .min_by(|a, b| a.0.cmp(&b.0))
            }
            TapView::Probs { data, heads, keys } => data.iter().position(bad).map(|i| {
                let t_len = data.len() / (heads * keys).max(1);
                let (h, t, s) = (i / (t_len * keys), (i / keys) % t_len, i % keys);
                (vec![0, h, t, s], t, data[i].to_f64())
            }),
        };
        if let Some((index, token_position, value)) = hit {
            self.found = Some(NonFiniteTap {
                tensor: name.to_string(),
                index,
                token_position,
                value,
            });
        }
    }

    fn wants_attention_probs(&self) -> bool {
        true
    }
}

/// Runs one forward pass over `tokens` in precision `T`, watching every tap, and returns where a
/// non-finite value first appears (`None` when the whole pass is finite).
pub fn first_nonfinite_tap<T: Float>(
    model: &Model,
    tokens: &[u32],
) -> Result<Option<NonFiniteTap>> {
    let mut obs = FirstNonFinite::default();
    let mut cache = KvCache::<T>::new(model.config.num_layers);
    model.forward(tokens, &mut cache, &mut obs)?;
    Ok(obs.found)
}

/// The one-line error of a generation step whose logits are not finite: the first tensor of the
/// forward pass over the same context that is non-finite, and any non-finite checkpoint tensors.
pub(super) fn nonfinite_logits_error<T: Float>(
    model: &Model,
    context: &[u32],
    step: usize,
    value: f64,
) -> EngineError {
    let what = if value.is_nan() { "NaN" } else { "infinite" };
    let located = match first_nonfinite_tap::<T>(model, context) {
        Ok(Some(tap)) => format!("first non-finite tensor: {tap}"),
        Ok(None) => {
            "a single forward pass over the same ids is finite (the batched/cached path differs)"
                .into()
        }
        Err(e) => format!("could not re-run the forward pass to locate it: {e}"),
    };
    let weights = model.checkpoint.nonfinite_report();
    let weights = match weights.split_first() {
        Some((w, [])) => {
            format!("; the checkpoint holds non-finite weights: {w}")
        }
        Some((w, rest)) => format!(
            "; the checkpoint holds non-finite weights: {w} and {} more tensor(s)",
            rest.len()
        ),
        None => String::new(),
    };
    EngineError::NonFinite(format!(
        "the logits at generation step {step} are {what} ({} context tokens): {located}{weights}",
        context.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny random Llama (hidden 8, 2 layers, vocab 10) in a temporary folder, with one NaN at
    /// `[5, 7]` of layer 1's down_proj when `nan` is set.
    fn tiny_model(nan: bool) -> (tempfile::TempDir, Model) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config.json"),
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,
            "vocab_size":10,"rms_norm_eps":1e-6,"tie_word_embeddings":false,
            "max_position_embeddings":64}"#,
        )
        .unwrap();
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![10, 8]),
            ("model.norm.weight".into(), vec![8]),
            ("lm_head.weight".into(), vec![10, 8]),
        ];
        for i in 0..2 {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            shapes.extend([
                (p("input_layernorm.weight"), vec![8]),
                (p("post_attention_layernorm.weight"), vec![8]),
                (p("self_attn.q_proj.weight"), vec![8, 8]),
                (p("self_attn.k_proj.weight"), vec![4, 8]),
                (p("self_attn.v_proj.weight"), vec![4, 8]),
                (p("self_attn.o_proj.weight"), vec![8, 8]),
                (p("mlp.gate_proj.weight"), vec![16, 8]),
                (p("mlp.up_proj.weight"), vec![16, 8]),
                (p("mlp.down_proj.weight"), vec![8, 16]),
            ]);
        }
        let bufs: Vec<Vec<u8>> = shapes
            .iter()
            .enumerate()
            .map(|(k, (name, s))| {
                let n: usize = s.iter().product();
                let mut v: Vec<f32> = (0..n)
                    .map(|i| ((i * 7 + k * 13) as f32 * 0.37).sin() * 0.5)
                    .collect();
                if nan && name == "model.layers.1.mlp.down_proj.weight" {
                    v[5 * 16 + 7] = f32::NAN;
                }
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = shapes
            .iter()
            .zip(&bufs)
            .map(|((n, s), b)| {
                let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
                (n.clone(), v.unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &d.path().join("model.safetensors")).unwrap();
        let m = Model::load(d.path()).unwrap();
        (d, m)
    }

    #[test]
    fn the_first_nonfinite_tap_is_where_the_nan_weight_enters() {
        let (_d, clean) = tiny_model(false);
        assert_eq!(
            first_nonfinite_tap::<f32>(&clean, &[1, 2, 3]).unwrap(),
            None
        );
        let (_d, m) = tiny_model(true);
        for tap in [
            first_nonfinite_tap::<f32>(&m, &[1, 2, 3]).unwrap(),
            first_nonfinite_tap::<f64>(&m, &[1, 2, 3]).unwrap(),
            first_nonfinite_tap::<crate::Bf16>(&m, &[1, 2, 3]).unwrap(),
        ] {
            let tap = tap.unwrap();
            assert_eq!(tap.tensor, "layers.1.mlp_out");
            // Row 5 of down_proj is hidden column 5 of every position; the first is token 0.
            assert_eq!((tap.index.clone(), tap.token_position), (vec![0, 0, 5], 0));
            assert!(tap.value.is_nan());
            assert_eq!(
                tap.to_string(),
                "NaN at layers.1.mlp_out[0, 0, 5] (token position 0)"
            );
        }
        let e = nonfinite_logits_error::<f32>(&m, &[1, 2, 3], 0, f64::NAN).to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("generation step 0 are NaN"), "{e}");
        assert!(
            e.contains("first non-finite tensor: NaN at layers.1.mlp_out[0, 0, 5]"),
            "{e}"
        );
        assert!(
            e.contains("model.layers.1.mlp.down_proj.weight (1 NaN, first at [5, 7])"),
            "{e}"
        );
    }
}
