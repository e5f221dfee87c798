//! Text generation: prefill, KV-cache decode, the next-token choice of [`crate::sampling`], stop
//! conditions, and UTF-8-safe streaming detokenization.
//!
//! Greedy decoding here is what `transformers.generate(do_sample=False)` does: the logits of the
//! last position (cast to float32), the repetition penalty if any, then argmax; an EOS id ends the
//! generation and is part of the returned ids.

mod nonfinite;
mod stream;

pub use nonfinite::{first_nonfinite_tap, NonFiniteTap};
pub use stream::StreamDecoder;

use nonfinite::nonfinite_logits_error;

use crate::config::{ConfigError, Fields, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kernels::Float;
use crate::model::{BatchKvCache, LogitsFor, Model, PaddedBatch};
use crate::sampling::SamplingParams;
use crate::sequence::Sequence;
use crate::tokenizer::Tokenizer;
use std::path::Path;
use std::time::Instant;

/// The generation defaults of a checkpoint, read the way transformers reads them:
/// `generation_config.json` if present (else the model's config.json), over transformers' global
/// defaults (greedy, temperature 1, top_k 50, top_p 1, no min_p, repetition penalty 1).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDefaults {
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// `max_new_tokens`, if the file sets it.
    pub max_new_tokens: Option<usize>,
    /// `max_length` (prompt + new tokens), if the file sets it.
    pub max_length: Option<usize>,
    /// End-of-sequence ids: generation_config.json's `eos_token_id`, else config.json's.
    pub eos_token_ids: Vec<u32>,
    /// Where they came from (for messages): "generation_config.json" or "config.json".
    pub source: &'static str,
}

impl GenerationDefaults {
    /// Reads `generation_config.json` of a model folder (falls back to `config`).
    pub fn from_dir(dir: &Path, config: &ModelConfig) -> Result<Self> {
        Self::from_source(&crate::source::ModelSource::resolve(dir)?, config)
    }

    /// [`Self::from_dir`] for a resolved source: a GGUF named as a file has no
    /// generation_config.json, so `config`'s defaults apply.
    pub fn from_source(source: &crate::source::ModelSource, config: &ModelConfig) -> Result<Self> {
        let Some(dir) = source.generation_config_folder() else {
            return Ok(Self::from_model_config(config));
        };
        let path = dir.join("generation_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                Self::from_json_str(&text, config).map_err(|source| EngineError::ConfigFile {
                    path: path.clone(),
                    source,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Self::from_model_config(config))
            }
            Err(source) => Err(EngineError::Io { path, source }),
        }
    }

    /// transformers' defaults with the model config's EOS ids (what `GenerationConfig.from_model_config` gives).
    pub fn from_model_config(config: &ModelConfig) -> Self {
        GenerationDefaults {
            sampling: SamplingParams::default(),
            max_new_tokens: None,
            max_length: None,
            eos_token_ids: config.eos_token_ids.clone(),
            source: "config.json",
        }
    }

    /// Parses generation_config.json text; unset or null keys keep transformers' defaults.
    pub fn from_json_str(
        text: &str,
        config: &ModelConfig,
    ) -> std::result::Result<Self, ConfigError> {
        let v = crate::config::json::parse(text)?;
        let fields = Fields::of(&v)?;
        let get = |k: &str| fields.get(k);
        let num = |k: &str| fields.number(k);
        let count = |k: &str| fields.count(k);
        let mut s = SamplingParams::default();
        if let Some(x) = fields.flag("do_sample")? {
            s.do_sample = x;
        }
        if let Some(t) = num("temperature")? {
            s.temperature = t as f32;
        }
        if let Some(k) = count("top_k")? {
            s.top_k = k;
        }
        if let Some(p) = num("top_p")? {
            s.top_p = p as f32;
        }
        s.min_p = num("min_p")?.map(|p| p as f32);
        if let Some(r) = num("repetition_penalty")? {
            s.repetition_penalty = r as f32;
        }
        let (eos_token_ids, source) = match get("eos_token_id") {
            Some(_) => (fields.token_ids("eos_token_id")?, "generation_config.json"),
            None => (config.eos_token_ids.clone(), "config.json"),
        };
        Ok(GenerationDefaults {
            sampling: s,
            max_new_tokens: count("max_new_tokens")?,
            max_length: count("max_length")?,
            eos_token_ids,
            source,
        })
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence id was generated.
    Eos,
    /// `max_new_tokens` were generated.
    Length,
    /// A stop string appeared in the text.
    Stop,
    /// The model's context (`max_position_embeddings`) is full.
    Context,
}

impl FinishReason {
    /// Lower-case name for JSON.
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Context => "context",
        }
    }
}

/// What to generate and when to stop.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// How many new tokens at most.
    pub max_new_tokens: usize,
    /// End-of-sequence ids (ignored with `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// Keep generating through EOS ids.
    pub ignore_eos: bool,
    /// Stop when the generated text contains one of these (the text returned ends before it).
    pub stop: Vec<String>,
    /// Next-token choice.
    pub sampling: SamplingParams,
    /// Seed of the random stream (sampling only).
    pub seed: u64,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The prompt's ids.
    pub prompt: Vec<u32>,
    /// The generated ids (an EOS that ended the generation included, as transformers returns it).
    pub generated: Vec<u32>,
    /// The generated text (special tokens skipped, cut before a stop string).
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Seconds spent on the prompt's forward pass.
    pub prefill_s: f64,
    /// Seconds spent on the decode forward passes.
    pub decode_s: f64,
    /// Number of decode forward passes (one per generated token after the first).
    pub decode_steps: usize,
}

impl Generation {
    /// Prompt tokens per second of the prefill.
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prompt.len(), self.prefill_s)
    }

    /// Tokens per second of the decode steps.
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_s)
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if n == 0 || s <= 0.0 {
        0.0
    } else {
        n as f64 / s
    }
}

/// Text of generated ids as a user sees it: special tokens skipped.
pub fn decode_visible(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer
        .inner()
        .decode(ids, true)
        .map_err(|e| EngineError::Tokenizer(e.to_string()))
}

/// Generates from `prompt`, calling `on_text` with each newly complete piece of text as it is
/// produced (never half a character, never a possible start of a stop string).
pub fn generate<T: Float>(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let mut rows = generate_batch::<T>(model, tokenizer, &[prompt.to_vec()], opts, |_, t| {
        on_text(t)
    })?;
    Ok(rows.remove(0))
}

/// Generates from several prompts at once: they are left-padded to one length with an attention
/// mask (as `transformers.generate` batches), every matmul runs over all rows together, and each
/// row computes what it would alone (its own positions, padding hidden). A row that finishes
/// leaves the batch. `on_text(row, piece)` gets each row's text as it becomes printable. Every
/// row samples from its own random stream seeded with `opts.seed`, so a row's output does not
/// depend on the rest of the batch.
pub fn generate_batch<T: Float>(
    model: &Model,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    opts.sampling.validate()?;
    if prompts.is_empty() {
        return Err(EngineError::Input("no prompts to generate from".into()));
    }
    for p in prompts {
        model.check_tokens(p, 0)?;
    }
    let max_ctx = model.config.context_length();
    let decode = |ids: &[u32]| decode_visible(tokenizer, ids);
    let mut rows: Vec<Sequence> = prompts
        .iter()
        .map(|p| Sequence::new(p.clone(), opts))
        .collect();
    let vocab = model.config.vocab_size;
    let mut prefill_s = 0.0;
    let mut decode_s = 0.0;
    let mut decode_steps = 0;

    if opts.max_new_tokens > 0 {
        // The padding id is never seen (the mask hides it); 0 is in every vocabulary.
        let batch = PaddedBatch::left_padded(prompts, 0);
        let mut cache = BatchKvCache::<T>::new(model.config.num_layers, prompts.len());
        let t0 = Instant::now();
        let mut logits =
            model.forward_batch::<T>(&batch.tokens, &batch.mask, &mut cache, LogitsFor::Last)?;
        prefill_s = t0.elapsed().as_secs_f64();
        // `active[slot]` is the row whose logits are at `slot` in the batch.
        let mut active: Vec<usize> = (0..rows.len()).collect();
        loop {
            for (slot, &r) in active.iter().enumerate() {
                let row_logits = &logits[slot * vocab..(slot + 1) * vocab];
                if let Some(bad) = row_logits.iter().find(|x| !x.to_f64().is_finite()) {
                    let row = &rows[r];
                    return Err(nonfinite_logits_error::<T>(
                        model,
                        row.context(),
                        row.generated().len(),
                        bad.to_f64(),
                    ));
                }
                let piece = rows[r].step(row_logits, opts, max_ctx, &decode)?;
                if !piece.is_empty() {
                    on_text(r, &piece);
                }
            }
            let keep: Vec<bool> = active.iter().map(|&r| rows[r].finish().is_none()).collect();
            cache.keep_rows(&keep);
            active.retain(|&r| rows[r].finish().is_none());
            if active.is_empty() {
                break;
            }
            let next: Vec<u32> = active
                .iter()
                .map(|&r| *rows[r].context().last().unwrap())
                .collect();
            let t = Instant::now();
            logits = model.forward_batch::<T>(
                &next,
                &vec![true; next.len()],
                &mut cache,
                LogitsFor::Last,
            )?;
            decode_s += t.elapsed().as_secs_f64();
            decode_steps += 1;
        }
    }
    Ok(rows
        .into_iter()
        .map(|r| {
            let decoded = r.generated().len().saturating_sub(1);
            let (prompt, generated, text, finish) = r.into_parts();
            Generation {
                prompt,
                generated,
                text,
                finish,
                prefill_s,
                decode_s,
                decode_steps: decode_steps.min(decoded),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10,"eos_token_id":[2,3]}"#,
        )
        .unwrap()
    }

    #[test]
    fn generation_config_over_transformers_defaults() {
        let d = GenerationDefaults::from_json_str(
            r#"{"do_sample": true, "temperature": 0.7, "top_p": 0.9, "eos_token_id": 5, "max_new_tokens": 12, "top_k": null}"#,
            &cfg(),
        )
        .unwrap();
        assert!(d.sampling.do_sample);
        assert_eq!(d.sampling.temperature, 0.7);
        assert_eq!(d.sampling.top_p, 0.9);
        assert_eq!(d.sampling.top_k, 50);
        assert_eq!(d.sampling.min_p, None);
        assert_eq!(d.eos_token_ids, vec![5]);
        assert_eq!(d.max_new_tokens, Some(12));
        // No eos_token_id: config.json's.
        let d = GenerationDefaults::from_json_str(r#"{"bos_token_id": 1}"#, &cfg()).unwrap();
        assert_eq!(d.eos_token_ids, vec![2, 3]);
        assert!(!d.sampling.do_sample);
        assert_eq!(d.source, "config.json");
        assert!(
            GenerationDefaults::from_json_str(r#"{"temperature": "hot"}"#, &cfg())
                .unwrap_err()
                .to_string()
                .contains("temperature")
        );
    }
}
