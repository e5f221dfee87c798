//! Text generation: prefill, KV-cache decode, the next-token choice of [`crate::sampling`], stop
//! conditions, and UTF-8-safe streaming detokenization.
//!
//! Greedy decoding here is what `transformers.generate(do_sample=False)` does: the logits of the
//! last position (cast to float32), the repetition penalty if any, then argmax; an EOS id ends the
//! generation and is part of the returned ids.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kernels::Float;
use crate::model::{BatchKvCache, KvCache, LogitsFor, Model, PaddedBatch};
use crate::observer::{Observer, TapView};
use crate::sampling::SamplingParams;
use crate::sequence::Sequence;
use crate::tokenizer::Tokenizer;
use serde_json::Value;
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
        if !dir.is_dir() {
            // A single-file checkpoint (GGUF): no generation_config.json.
            return Ok(Self::from_model_config(config));
        }
        let path = dir.join("generation_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_json_str(&text, config).map_err(|msg| EngineError::Config {
                path: path.clone(),
                msg,
            }),
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
    pub fn from_json_str(text: &str, config: &ModelConfig) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let obj = v.as_object().ok_or("expected a JSON object")?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let num = |k: &str| -> std::result::Result<Option<f64>, String> {
            get(k)
                .map(|x| {
                    x.as_f64()
                        .ok_or_else(|| format!("'{k}' must be a number, got {x}"))
                })
                .transpose()
        };
        let count = |k: &str| -> std::result::Result<Option<usize>, String> {
            get(k)
                .map(|x| {
                    x.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| format!("'{k}' must be a non-negative integer, got {x}"))
                })
                .transpose()
        };
        let mut s = SamplingParams::default();
        if let Some(x) = get("do_sample") {
            s.do_sample = x
                .as_bool()
                .ok_or_else(|| format!("'do_sample' must be true or false, got {x}"))?;
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
            Some(v) => (
                crate::config::token_ids(Some(v)).map_err(|m| format!("'eos_token_id' {m}"))?,
                "generation_config.json",
            ),
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

/// Incremental detokenization that never prints half a character.
///
/// It decodes a small window of the growing id list (the ids of the last printed piece plus the
/// new ones), prints only the text beyond what the window's first part decodes to, and holds the
/// text back while it ends in U+FFFD (a multi-byte character split across tokens). The window keeps
/// decoders that treat the first token specially (SentencePiece's leading space) consistent.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the newly complete text (possibly empty).
    pub fn push(&mut self, id: u32, decode: &impl Fn(&[u32]) -> Result<String>) -> Result<String> {
        self.ids.push(id);
        self.step(decode, false)
    }

    /// Everything not yet returned, including a trailing U+FFFD that will never complete.
    pub fn finish(&mut self, decode: &impl Fn(&[u32]) -> Result<String>) -> Result<String> {
        self.step(decode, true)
    }

    fn step(&mut self, decode: &impl Fn(&[u32]) -> Result<String>, flush: bool) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        // A character is at most 4 bytes, so more pending tokens than that can never complete
        // one: print them (with U+FFFD) instead of re-decoding a window that grows forever.
        if !flush
            && full.ends_with('\u{FFFD}')
            && self.ids.len() - self.read_offset <= MAX_PENDING_IDS
        {
            return Ok(String::new());
        }
        let new = if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            full[prefix.len()..].to_string()
        } else if full.len() <= prefix.len() {
            // Nothing visible yet (e.g. a skipped special token): keep the window.
            if flush {
                self.read_offset = self.ids.len();
            }
            return Ok(String::new());
        } else {
            // The prefix decodes differently inside the longer window: print from the first
            // differing character.
            let common = full
                .char_indices()
                .zip(prefix.chars())
                .find(|((_, a), b)| a != b)
                .map(|((i, _), _)| i)
                .unwrap_or(prefix.len().min(full.len()));
            full[common..].to_string()
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(new)
    }
}

/// Tokens [`StreamDecoder`] holds back while their text ends in an incomplete character.
const MAX_PENDING_IDS: usize = 8;

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
    opts.sampling.validate().map_err(EngineError::Input)?;
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
fn nonfinite_logits_error<T: Float>(
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

    /// A byte-level "tokenizer": each id is one byte; decoding is lossy UTF-8 like byte-level BPE.
    fn bytes(ids: &[u32]) -> Result<String> {
        let b: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

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

    #[test]
    fn stream_decoder_never_splits_a_character() {
        let text = "né 😀 日本";
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        let mut pieces = vec![];
        for b in text.bytes() {
            let piece = d.push(b as u32, &bytes).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            out.push_str(&piece);
            pieces.push(piece);
        }
        out.push_str(&d.finish(&bytes).unwrap());
        assert_eq!(out, text);
        // The emoji's 4 bytes come out as one piece, on its last byte.
        assert!(pieces.contains(&"😀".to_string()), "{pieces:?}");
    }

    #[test]
    fn stream_decoder_flushes_an_incomplete_tail() {
        let mut d = StreamDecoder::new();
        assert_eq!(d.push(b'a' as u32, &bytes).unwrap(), "a");
        assert_eq!(d.push(0xE6, &bytes).unwrap(), "");
        assert_eq!(d.finish(&bytes).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn stream_decoder_stays_linear_on_text_that_never_completes_a_character() {
        // 0xFF is never valid UTF-8: every window ends in U+FFFD. Count the bytes decoded.
        let decoded = std::cell::Cell::new(0usize);
        let counting = |ids: &[u32]| {
            decoded.set(decoded.get() + ids.len());
            bytes(ids)
        };
        let mut d = StreamDecoder::new();
        let n = 20_000;
        let mut out = String::new();
        for _ in 0..n {
            out.push_str(&d.push(0xFF, &counting).unwrap());
        }
        out.push_str(&d.finish(&counting).unwrap());
        assert_eq!(out.chars().filter(|&c| c == '\u{FFFD}').count(), n);
        assert!(
            decoded.get() < 4 * MAX_PENDING_IDS * n,
            "{} ids decoded",
            decoded.get()
        );
    }

    /// A SentencePiece-like decoder: "▁" is a space, and a leading space of the text is dropped.
    fn spm(ids: &[u32]) -> Result<String> {
        let vocab = ["▁Hello", "▁world", "!", "▁again"];
        let s: String = ids.iter().map(|&i| vocab[i as usize]).collect();
        let s = s.replace('▁', " ");
        Ok(s.strip_prefix(' ').unwrap_or(&s).to_string())
    }

    #[test]
    fn stream_decoder_keeps_spaces_of_sentencepiece_pieces() {
        let mut d = StreamDecoder::new();
        let out: String = [0, 1, 2, 3]
            .iter()
            .map(|&i| d.push(i, &spm).unwrap())
            .collect();
        assert_eq!(out, "Hello world! again");
    }

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
                .contains("temperature")
        );
    }
}
