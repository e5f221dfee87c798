//! The JSON protocol with the Python reference (`reference/lockstep_reference/protocol.py`): one
//! serde struct per request and per answer. Answers are read strictly (every field required,
//! unknown fields refused), so a reference that changed its output fails loudly instead of
//! filling a report with defaults; the Python side parses requests as strictly.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// One trace for `trace-batch` (Python `TraceJob`).
#[derive(Debug, Serialize)]
pub struct TraceRequest<'a> {
    /// Model folder or GGUF file.
    pub model: &'a Path,
    /// Input ids.
    pub tokens: &'a [u32],
    /// `f64`, `f32` or `bf16`.
    pub dtype: &'a str,
    /// Where the trace is written.
    pub out: &'a Path,
    /// The trace computed layer by layer (for models too big for memory in `dtype`).
    pub streamed: bool,
}

/// One op-level job for `ops-batch` (Python `OpsJob`).
#[derive(Debug, Serialize)]
pub struct OpsRequest<'a> {
    /// Model folder or GGUF file.
    pub model: &'a Path,
    /// The test trace whose ops are recomputed.
    pub test: &'a Path,
    /// The tier's dtype.
    pub dtype: &'a str,
    /// Where the pure-f64 ops are written.
    pub out_exact: &'a Path,
    /// Where transformers' own ops in `dtype` are written (none for f64).
    pub out_reference: Option<&'a Path>,
    /// The ops computed layer by layer (for models whose float64 copy does not fit in memory).
    pub streamed: bool,
}

/// One greedy generation for `generate-batch` (Python `GenerateJob`): one prompt (`tokens`) or a
/// left-padded batch (`token_batch`).
#[derive(Debug, Serialize)]
pub struct GenerateRequest<'a> {
    /// Model folder or GGUF file.
    pub model: &'a Path,
    /// The dtype the model is loaded in: `f32` or `bf16`.
    pub dtype: &'a str,
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// Generate exactly `max_new_tokens` (no EOS).
    pub ignore_eos: bool,
    /// List per step every token within this of the best (see `GenerateJob::tie_within`).
    pub tie_within: f64,
    /// One prompt's ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<&'a [u32]>,
    /// Several prompts, generated as one batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_batch: Option<&'a [Vec<u32>]>,
}

/// One rendered conversation from `chat-batch` (Python `ChatAnswer`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatAnswer {
    /// The template's text.
    pub text: String,
    /// Its ids (no special tokens added).
    pub ids: Vec<u32>,
}

/// One generation from `generate-batch` (Python `GenerateAnswer`). For a batch job each of
/// `prompt_ids`, `generated`, `top_ids` and `top_logits` holds a list of rows, for a one-prompt
/// job that row itself; which one is known from the request, so they stay JSON values here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateAnswer {
    /// The prompt ids the reference generated from.
    pub prompt_ids: serde_json::Value,
    /// The new ids (an EOS that ended generation included; later rows padded after it).
    pub generated: serde_json::Value,
    /// The EOS ids this generation used (empty with `ignore_eos`).
    #[allow(dead_code)]
    // in the answer for other readers (the tests); the verifier cuts at none
    pub eos_token_ids: Vec<u32>,
    /// The padding id this generation used.
    #[allow(dead_code)] // as `eos_token_ids`
    pub pad_token_id: u32,
    /// Per step, the reference's best ids.
    pub top_ids: serde_json::Value,
    /// Per step, their scores (null for a non-finite one).
    pub top_logits: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::reference::ReferenceWeights;

    #[test]
    fn answers_refuse_missing_and_unknown_fields() {
        let full = r#"{"checksums":{"a":"00"},"parameter_count":3,"tied":true,"qkv_bias":false,"dtype":"f32"}"#;
        let w: ReferenceWeights = serde_json::from_str(full).unwrap();
        assert_eq!(
            (w.parameter_count, w.tied, w.dtype.as_str()),
            (3, true, "f32")
        );
        let missing = r#"{"checksums":{},"tied":true,"qkv_bias":false,"dtype":"f32"}"#;
        let e = serde_json::from_str::<ReferenceWeights>(missing).unwrap_err();
        assert!(e.to_string().contains("parameter_count"), "{e}");
        let unknown = r#"{"text":"x","ids":[1],"extra":0}"#;
        assert!(serde_json::from_str::<ChatAnswer>(unknown).is_err());
    }

    #[test]
    fn generate_request_names_one_prompt_source() {
        let p = [vec![1u32, 2]];
        let one = GenerateRequest {
            model: Path::new("m"),
            dtype: "bf16",
            max_new_tokens: 4,
            ignore_eos: false,
            tie_within: 0.0,
            tokens: Some(&p[0]),
            token_batch: None,
        };
        let v = serde_json::to_value(&one).unwrap();
        assert_eq!(v["tokens"], serde_json::json!([1, 2]));
        assert!(v.get("token_batch").is_none());
        assert_eq!(v["dtype"], "bf16");
    }
}
