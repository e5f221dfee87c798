//! `lockstep generate --model DIR (--prompt TEXT [--chat] | --tokens 1,2,3) [sampling flags] [--json]`.
//!
//! Streams the generated text to stdout as it is produced; prefill and decode speed go to stderr
//! at the end. With `--json` the last stdout line is one JSON object describing the run.
//!
//! Several `--prompt` (or `--tokens`) flags generate a batch: the prompts are left-padded into
//! one batch with an attention mask and run together; each row's text is printed when the batch
//! is done, and with `--json` the last line is one object whose `rows` hold one object per prompt.
//!
//! Exit codes: 0 done, 2 bad input, 1 when the logits of a step are not finite (NaN/inf): the
//! run stops with one line naming the first non-finite tensor of the forward pass and any
//! non-finite checkpoint tensors, instead of choosing tokens from garbage.

use super::common::{parse_token_list, DtypeArg};
use crate::cli_error::{CliError, CliResult};
use lockstep_engine::chat::{ChatTemplate, Message};
use lockstep_engine::generate::{
    generate, generate_batch, GenerateOptions, Generation, GenerationDefaults,
};
use lockstep_engine::resources::{self, MemoryEstimate, RunShape};
use lockstep_engine::sampling::SamplingParams;
use lockstep_engine::source::ModelSource;
use lockstep_engine::{with_float, Model, ModelConfig, Tokenizer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// New tokens when neither the command line nor generation_config.json says (transformers'
/// global default, `max_length` 20 including the prompt, is too short to be useful here).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

/// Sampling and stopping flags shared by `generate` and `chat`.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most new tokens [default: generation_config.json's max_new_tokens, else 256].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Softmax temperature; 0 is greedy, > 0 samples [default: generation_config.json (greedy unless it sets do_sample)].
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens when sampling; 0 turns it off [default: generation_config.json, else 50].
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the most likely tokens holding this probability mass, (0, 1] [default: generation_config.json, else 1].
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than this fraction of the most likely one, [0, 1] [default: generation_config.json, else off].
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Repetition penalty (> 0, 1 is off; applies to greedy decoding too) [default: generation_config.json, else 1].
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler's random stream (same seed, same output) [default: from the clock, printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep generating through end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Stop when the text contains this string (repeatable); the output ends before it.
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Compute precision (f32 matches transformers' float32 generate token for token).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Run even when the memory estimate (weights, KV cache, activations) exceeds the available
    /// memory.
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `generate`.
#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json) or a llama.cpp .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text, tokenized with the model's tokenizer (repeat for a batch).
    #[arg(long, required_unless_present = "tokens")]
    prompt: Vec<String>,
    /// Prompt as comma-separated token ids (repeat for a batch).
    #[arg(long, conflicts_with_all = ["prompt", "chat"])]
    tokens: Vec<String>,
    /// Wrap the prompt as a user message in the checkpoint's chat template (with the generation prompt).
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// A system message before the prompt (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object as the last stdout line (prompt_tokens, generated_tokens, text, speeds, ...).
    #[arg(long)]
    json: bool,
}

/// A seed from the clock, for runs that give none.
fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl SamplingArgs {
    /// The generation options: command line over generation_config.json over transformers'
    /// defaults. Notes about ignored flags go to stderr.
    pub fn options(
        &self,
        defaults: &GenerationDefaults,
        prompt_len: usize,
    ) -> CliResult<GenerateOptions> {
        let mut s: SamplingParams = defaults.sampling.clone();
        match self.temperature {
            Some(t) if t.is_nan() || t < 0.0 => {
                return Err(CliError::input(format!(
                    "--temperature must be 0 (greedy) or positive, got {t}"
                )))
            }
            Some(0.0) => s.do_sample = false,
            Some(t) => {
                s.do_sample = true;
                s.temperature = t;
            }
            None => {}
        }
        if let Some(k) = self.top_k {
            s.top_k = k;
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(CliError::input(format!(
                    "--top-p must lie in (0, 1], got {p}"
                )));
            }
            s.top_p = p;
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(CliError::input(format!(
                    "--min-p must lie in [0, 1], got {p}"
                )));
            }
            s.min_p = Some(p);
        }
        if let Some(r) = self.repetition_penalty {
            if !(r > 0.0 && r.is_finite()) {
                return Err(CliError::input(format!(
                    "--repetition-penalty must be a positive number, got {r}"
                )));
            }
            s.repetition_penalty = r;
        }
        s.validate()
            .map_err(|e| CliError::input(format!("generation settings: {e}")))?;
        if !s.do_sample {
            let ignored: Vec<&str> = [
                (self.top_k.is_some(), "--top-k"),
                (self.top_p.is_some(), "--top-p"),
                (self.min_p.is_some(), "--min-p"),
                (self.seed.is_some(), "--seed"),
            ]
            .into_iter()
            .filter_map(|(given, name)| given.then_some(name))
            .collect();
            if !ignored.is_empty() {
                eprintln!(
                    "note: greedy decoding ignores {} (give --temperature > 0 to sample)",
                    ignored.join(", ")
                );
            }
        }
        Ok(GenerateOptions {
            max_new_tokens: self.max_new_tokens(defaults, prompt_len),
            eos_token_ids: defaults.eos_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            stop: self.stop.clone(),
            sampling: s,
            seed: self.seed.unwrap_or_else(clock_seed),
        })
    }
}

impl SamplingArgs {
    /// `--max-new-tokens`, else generation_config.json's `max_new_tokens`, else its `max_length`
    /// less the prompt, else [`DEFAULT_MAX_NEW_TOKENS`].
    pub fn max_new_tokens(&self, defaults: &GenerationDefaults, prompt_len: usize) -> usize {
        match (
            self.max_new_tokens,
            defaults.max_new_tokens,
            defaults.max_length,
        ) {
            (Some(n), _, _) => n,
            (None, Some(n), _) => n,
            (None, None, Some(len)) => len.saturating_sub(prompt_len),
            (None, None, None) => DEFAULT_MAX_NEW_TOKENS,
        }
    }
}

/// A model with its weights loaded, its tokenizer and generation defaults.
pub struct LoadedModel {
    /// The model.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// generation_config.json.
    pub defaults: GenerationDefaults,
    /// Seconds to load.
    pub load_s: f64,
}

/// Everything of a model but its weights: read first, so that a run can be sized (and refused)
/// before anything is mapped or allocated.
pub struct Preloaded {
    dir: PathBuf,
    /// Where its files are, resolved once.
    source: ModelSource,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its config.
    pub config: ModelConfig,
    /// generation_config.json.
    pub defaults: GenerationDefaults,
    t0: Instant,
}

/// Reads tokenizer, config and generation defaults (no weights).
pub fn preload(dir: &Path) -> CliResult<Preloaded> {
    let t0 = Instant::now();
    let source = ModelSource::resolve(dir)?;
    let tokenizer = Tokenizer::from_source(&source)?;
    let config = resources::config_of(&source)?;
    let defaults = GenerationDefaults::from_source(&source, &config)?;
    Ok(Preloaded {
        dir: dir.to_path_buf(),
        source,
        tokenizer,
        config,
        defaults,
        t0,
    })
}

impl Preloaded {
    /// Refuses a run whose memory estimate exceeds the available memory (a warning with
    /// `force`). `context` is the most tokens a row may reach (prompt plus new tokens).
    pub fn check_memory(
        &self,
        dtype: DtypeArg,
        batch: usize,
        prompt_len: usize,
        context: usize,
        force: bool,
    ) -> CliResult<()> {
        let act_bytes = dtype.activation_bytes();
        let (weights, streamed) = resources::held_weight_bytes(&self.source, &self.config)?;
        let run = RunShape {
            batch,
            prompt_len,
            context,
            act_bytes,
        };
        let mut estimate = MemoryEstimate::new(&self.config, weights, run);
        estimate.weights_streamed = streamed;
        // A bf16 checkpoint decoded in bf16 or f32 compute may code its matrices.
        let bf16 = self.config.declared_dtype.as_deref() == Some("bfloat16");
        let reads_coding = matches!(
            *dtype,
            lockstep_engine::Dtype::Bf16
                | lockstep_engine::Dtype::Bf16w
                | lockstep_engine::Dtype::F32
        );
        if bf16 && reads_coding {
            estimate = estimate.with_coded_copy(resources::available_memory())?;
        }
        // An f32 checkpoint in bf16 compute may round its matrices to bf16 copies.
        let f32_stored = self.config.declared_dtype.as_deref() == Some("float32");
        if f32_stored && *dtype == lockstep_engine::Dtype::Bf16 {
            estimate = estimate.with_bf16_copies(resources::available_memory())?;
        }
        super::common::enforce_memory_estimate(&estimate, &self.dir, force)
    }

    /// Maps (or loads) the weights, prepared for computing in `dtype`.
    pub fn load_model(self, dtype: DtypeArg) -> CliResult<LoadedModel> {
        let dir = &self.dir;
        let source = &self.source;
        // The dtype's preparation (the 12-bit codings, which a large model's first run makes
        // and writes to the cache: a minute at 7B) under the same spinner.
        let model = crate::progress::with_spinner(format!("loading {}", dir.display()), || {
            let mut model = Model::load_source(source, None)?;
            model.use_dtype(*dtype).map(|()| model)
        })?;
        use lockstep_engine::weights::coded_cache::CacheUse;
        match model.coded_cache.get() {
            Some(CacheUse::Written(p)) => eprintln!(
                "coded the matrices in 12 bits per value into {} ({:.1} GB, kept for later runs; \
                 LOCKSTEP_CODED_CACHE chooses the folder)",
                p.display(),
                std::fs::metadata(p).map_or(0.0, |m| m.len() as f64 / 1e9)
            ),
            Some(CacheUse::Skipped(why)) => eprintln!(
                "coded the matrices in 12 bits per value in memory, no cache file ({why}): \
                 every run codes them again"
            ),
            _ => {}
        }
        Ok(LoadedModel {
            model,
            tokenizer: self.tokenizer,
            defaults: self.defaults,
            load_s: self.t0.elapsed().as_secs_f64(),
        })
    }
}

/// The chat template of a model folder, or a one-line error saying it has none.
pub fn chat_template(dir: &Path) -> CliResult<ChatTemplate> {
    ChatTemplate::from_dir(dir)?.ok_or_else(|| {
        CliError::input(format!(
            "{} has no chat template (neither chat_template.jinja nor a chat_template in tokenizer_config.json); drop --chat",
            dir.display()
        ))
    })
}

/// Runs one generation in the chosen precision, streaming text through `on_text`.
pub fn run_generation(
    loaded: &LoadedModel,
    dtype: DtypeArg,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: impl FnMut(&str),
) -> CliResult<Generation> {
    Ok(with_float!(dtype.precision(), T => {
        generate::<T>(&loaded.model, &loaded.tokenizer, prompt, opts, on_text)?
    }))
}

/// Prints text to stdout at once.
pub fn print_flush(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

/// The stderr summary line of a generation.
pub fn speed_line(g: &Generation) -> String {
    format!(
        "prefill: {} tokens in {:.3} s ({:.1} tok/s); decode: {} tokens in {:.3} s ({:.1} tok/s); {} generated, finish: {}",
        g.prompt.len(),
        g.prefill_s,
        g.prefill_tok_s(),
        g.decode_steps,
        g.decode_s,
        g.decode_tok_s(),
        g.generated.len(),
        g.finish.name()
    )
}

/// The JSON object of one generation (the `--json` line, or one row of a batch's).
fn generation_json(g: &Generation) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": g.prompt.len(),
        "prompt_ids": g.prompt,
        "generated_tokens": g.generated,
        "text": g.text,
        "finish_reason": g.finish.name(),
        "prefill_tok_s": g.prefill_tok_s(),
        "decode_tok_s": g.decode_tok_s(),
        "prefill_s": g.prefill_s,
        "decode_s": g.decode_s,
    })
}

/// Runs `generate`.
pub fn run(a: Args) -> CliResult<ExitCode> {
    // Cheap argument checks before loading anything.
    let token_prompts = a
        .tokens
        .iter()
        .map(|t| parse_token_list(t))
        .collect::<CliResult<Vec<_>>>()?;
    let template = if a.chat {
        Some(chat_template(&a.model)?)
    } else {
        None
    };
    let pre = preload(&a.model)?;
    let prompts = if token_prompts.is_empty() {
        let mut prompts = Vec::new();
        for p in &a.prompt {
            let text = match &template {
                Some(t) => {
                    let mut msgs = vec![];
                    if let Some(s) = &a.system {
                        msgs.push(Message::new("system", s));
                    }
                    msgs.push(Message::new("user", p));
                    t.render(&msgs, true, None)?
                }
                None => p.clone(),
            };
            let ids = pre.tokenizer.encode(&text)?;
            if ids.is_empty() {
                return Err(CliError::input(format!(
                    "the prompt {p:?} tokenizes to no tokens"
                )));
            }
            prompts.push(ids);
        }
        prompts
    } else {
        token_prompts
    };
    if prompts.is_empty() {
        return Err(CliError::input("give --prompt or --tokens"));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let opts = a.sampling.options(&pre.defaults, longest)?;
    // Generation stops when the context is full, so that bounds what a row can reach.
    let context = longest
        .saturating_add(opts.max_new_tokens)
        .min(pre.config.max_position_embeddings);
    pre.check_memory(
        a.sampling.dtype,
        prompts.len(),
        longest,
        context,
        a.sampling.force,
    )?;
    let loaded = pre.load_model(a.sampling.dtype)?;
    for ids in &prompts {
        loaded.model.check_tokens(ids, 0)?;
    }
    let lens: Vec<String> = prompts.iter().map(|p| p.len().to_string()).collect();
    eprintln!(
        "loaded {} in {:.2} s ({} layers, {}); {} prompt tokens; {}",
        a.model.display(),
        loaded.load_s,
        loaded.model.config.num_layers,
        a.sampling.dtype.name(),
        if prompts.len() == 1 {
            lens[0].clone()
        } else {
            format!(
                "a batch of {} prompts of {}",
                prompts.len(),
                lens.join(", ")
            )
        },
        describe(&opts)
    );
    if prompts.len() > 1 {
        return run_batch(&a, &loaded, &prompts, &opts);
    }
    let g = run_generation(&loaded, a.sampling.dtype, &prompts[0], &opts, print_flush)?;
    // With --json the text is always followed by one newline, so everything before the JSON line
    // is exactly the text.
    if a.json || !g.text.ends_with('\n') {
        print_flush("\n");
    }
    eprintln!("{}", speed_line(&g));
    if a.json {
        let mut obj = generation_json(&g);
        obj["load_s"] = loaded.load_s.into();
        obj["dtype"] = a.sampling.dtype.name().into();
        obj["seed"] = opts.seed.into();
        obj["sampling"] = sampling_json(&opts);
        println!("{obj}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The decoding settings as JSON.
fn sampling_json(opts: &GenerateOptions) -> serde_json::Value {
    let s = &opts.sampling;
    serde_json::json!({
        "do_sample": s.do_sample,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "repetition_penalty": s.repetition_penalty,
        "max_new_tokens": opts.max_new_tokens,
        "eos_token_ids": if opts.ignore_eos { vec![] } else { opts.eos_token_ids.clone() },
    })
}

/// One batch generation of `prompts` in `dtype` (no streaming): each row's [`Generation`].
pub fn generate_rows(
    loaded: &LoadedModel,
    dtype: DtypeArg,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> CliResult<Vec<Generation>> {
    Ok(with_float!(dtype.precision(), T => {
        generate_batch::<T>(&loaded.model, &loaded.tokenizer, prompts, opts, |_, _| {})?
    }))
}

/// Generates a batch of prompts together and prints each row's text when all are done.
fn run_batch(
    a: &Args,
    loaded: &LoadedModel,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> CliResult<ExitCode> {
    let rows = generate_rows(loaded, a.sampling.dtype, prompts, opts)?;
    if !a.json {
        for (i, g) in rows.iter().enumerate() {
            println!("[{i}] {}", g.text);
        }
    }
    let (prefill_s, decode_s) = (rows[0].prefill_s, rows[0].decode_s);
    let prompt_tokens: usize = rows.iter().map(|g| g.prompt.len()).sum();
    let decoded: usize = rows.iter().map(|g| g.decode_steps).sum();
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    eprintln!(
        "batch of {}: prefill: {} tokens in {:.3} s ({:.1} tok/s); decode: {} tokens in {:.3} s ({:.1} tok/s); finish: {}",
        rows.len(),
        prompt_tokens,
        prefill_s,
        rate(prompt_tokens, prefill_s),
        decoded,
        decode_s,
        rate(decoded, decode_s),
        rows.iter().map(|g| g.finish.name()).collect::<Vec<_>>().join(", ")
    );
    if a.json {
        let obj = serde_json::json!({
            "rows": rows.iter().map(generation_json).collect::<Vec<_>>(),
            "prefill_tok_s": rate(prompt_tokens, prefill_s),
            "decode_tok_s": rate(decoded, decode_s),
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "load_s": loaded.load_s,
            "dtype": a.sampling.dtype.name(),
            "seed": opts.seed,
            "sampling": sampling_json(opts),
        });
        println!("{obj}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A short description of the decoding settings for stderr.
pub fn describe(o: &GenerateOptions) -> String {
    let s = &o.sampling;
    let mut parts = vec![if s.do_sample {
        format!("sampling (seed {}, temperature {}", o.seed, s.temperature)
    } else {
        "greedy (".to_string()
    }];
    if s.do_sample {
        if s.top_k != 0 {
            parts.push(format!(", top-k {}", s.top_k));
        }
        if s.top_p < 1.0 {
            parts.push(format!(", top-p {}", s.top_p));
        }
        if let Some(m) = s.min_p {
            parts.push(format!(", min-p {m}"));
        }
    }
    if s.repetition_penalty != 1.0 {
        parts.push(format!(
            "{}repetition penalty {}",
            if s.do_sample { ", " } else { "" },
            s.repetition_penalty
        ));
    }
    parts.push(format!(
        "{}max {} new tokens, eos {})",
        if s.do_sample || s.repetition_penalty != 1.0 {
            ", "
        } else {
            ""
        },
        o.max_new_tokens,
        if o.ignore_eos {
            "ignored".to_string()
        } else {
            format!("{:?}", o.eos_token_ids)
        }
    ));
    parts.concat()
}
