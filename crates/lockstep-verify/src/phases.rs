//! The phased verification of `lockstep verify`: the plan the old port's report never finished.
//!
//! 1. tokenization identity (plain text, special tokens);
//! 2. weights: every tensor bit-identical to what `transformers` loaded, parameter count, tied
//!    embeddings, q/k/v biases;
//! 3. single-token forward (the old report's "Hello", "The", "123");
//! 4. multi-token sequences (short and several hundred tokens);
//! 5. layer-by-layer: every tapped tensor, first divergence named;
//! 6. attention weights.
//!
//! Phases 3-6 run per precision tier. The reference side is abstract ([`Reference`]): the CLI
//! implements it with the project's Python tracer; tests can run it the same way.

use crate::compare::compare_traces;
use crate::report::{NamedComparison, Phase};
use crate::tolerance::{Tier, TolerancePolicy};
use lockstep_engine::chat::{ChatTemplate, Message};
use lockstep_engine::tracing::trace_forward;
use lockstep_engine::{Bf16, Fault, Model, Tokenizer};
use lockstep_trace::Trace;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One reference trace to produce.
#[derive(Debug, Clone)]
pub struct TraceJob {
    /// Model folder.
    pub model: PathBuf,
    /// Input ids (batch 1).
    pub tokens: Vec<u32>,
    /// `f64` (pure float64), `f32` or `bf16`.
    pub dtype: String,
    /// Where to write the trace.
    pub out: PathBuf,
}

/// What the reference loaded, for the weights phase.
#[derive(Debug, Clone, Default)]
pub struct ReferenceWeights {
    /// sha256 of each loaded tensor's bytes, in its loaded dtype, by checkpoint name.
    pub checksums: BTreeMap<String, String>,
    /// Parameters counted by the reference (tied matrices once).
    pub parameter_count: u64,
    /// Whether lm_head and the embeddings are the same tensor in the reference.
    pub tied: bool,
    /// Whether the reference's attention has q/k/v biases.
    pub qkv_bias: bool,
    /// The dtype the reference loaded the weights in.
    pub dtype: String,
}

/// One greedy generation for the reference to run (float32, eager attention, the checkpoint's
/// EOS ids, no repetition penalty): one prompt alone, or several as one left-padded batch.
#[derive(Debug, Clone)]
pub struct GenerateJob {
    /// Model folder.
    pub model: PathBuf,
    /// The prompts' ids; more than one is a batch (left padding and an attention mask).
    pub prompts: Vec<Vec<u32>>,
    /// New tokens at most.
    pub max_new_tokens: usize,
}

/// The reference implementation, as seen by the verifier.
pub trait Reference {
    /// Token ids of each text (no special tokens added).
    fn tokenize(&mut self, model: &Path, texts: &[String]) -> Result<Vec<Vec<u32>>, String>;
    /// Each conversation (`[{"messages": [...], "tools": [...]|null}]`) rendered by
    /// `apply_chat_template(..., add_generation_prompt=True)`, with its ids.
    fn chat(
        &mut self,
        model: &Path,
        conversations: &serde_json::Value,
    ) -> Result<Vec<(String, Vec<u32>)>, String>;
    /// Checksums and facts of the weights as the reference loaded them (in the stored dtype).
    fn weights(&mut self, model: &Path) -> Result<ReferenceWeights, String>;
    /// Writes every requested trace.
    fn traces(&mut self, jobs: &[TraceJob]) -> Result<(), String>;
    /// Runs each greedy generation; per job, per prompt, the new ids (as `generate` returns them:
    /// a batch row that ended keeps being padded after its EOS) and the reference's best tokens
    /// with their scores at each step (for judging a parting a near-tie from its own logits).
    fn generate(
        &mut self,
        jobs: &[GenerateJob],
    ) -> Result<Vec<Vec<crate::near_tie::GeneratedRow>>, String>;
}

/// Which phase an input belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A prompt of the single-token forward phase (the old report's prompts).
    Single,
    /// A multi-token sequence.
    Multi,
}

/// One input of the forward phases.
#[derive(Debug, Clone)]
pub struct Input {
    /// Short label for tables.
    pub label: String,
    /// The text.
    pub text: String,
    /// The phase it belongs to.
    pub kind: InputKind,
}

/// A paragraph long enough (about 300 tokens) to exercise positions beyond 256, where bf16
/// positions and RoPE errors show.
pub const LONG_TEXT: &str = "In the spring of that year the observatory on the hill received a new \
instrument, a refracting telescope with a lens ground by hand over eleven months. The astronomers \
who worked there kept careful notebooks: the date, the time to the second, the temperature of the \
dome, the humidity, and the position of every object they measured. They compared each night's \
numbers with the tables published by other observatories, and when two values disagreed they did \
not simply average them. They asked which instrument had drifted, which clock had gained a few \
seconds, which observer had copied a digit wrongly. Most differences turned out to be rounding: the \
last decimal place of a measurement that no instrument could resolve. A few were real mistakes, and \
those were the ones that mattered, because a mistake repeated in every table grows into a false \
discovery. So they wrote down, for every quantity, how precisely it could be known, and they judged \
each disagreement against that precision rather than against a fixed number chosen in advance. By \
the end of the decade their catalogue of 4,217 stars was trusted more than any other, not because \
it was never wrong, but because every entry said how wrong it could be, and every error that was \
found could be traced back to the step where it first entered the calculation.";

/// The default inputs: the old report's three prompts, a short sentence and a long paragraph.
pub fn default_inputs() -> Vec<Input> {
    let mut v: Vec<Input> = ["Hello", "The", "123"]
        .iter()
        .map(|p| Input {
            label: format!("{p:?}"),
            text: p.to_string(),
            kind: InputKind::Single,
        })
        .collect();
    v.push(Input {
        label: "short sentence".into(),
        text: "The quick brown fox jumps over the lazy dog, and 12 of 15 wizards agree.".into(),
        kind: InputKind::Multi,
    });
    v.push(Input {
        label: "long paragraph".into(),
        text: LONG_TEXT.into(),
        kind: InputKind::Multi,
    });
    v
}

/// Strings with special tokens, checked in the tokenization phase when the tokenizer knows them.
const SPECIAL_TEXTS: [&str; 2] = [
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "Hello<|endoftext|>",
];

/// Conversations of the chat-template check: a single turn, system + multi-turn, and a tools list.
fn chat_conversations() -> serde_json::Value {
    serde_json::json!([
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "tools": null},
        {"messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi. What do you need?"},
            {"role": "user", "content": "Two plus two, please."}
        ], "tools": null},
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Current weather <for> a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
        ]}
    ])
}

const CHAT_LABELS: [&str; 3] = ["single turn", "system + multi-turn", "tools list"];

/// Options of one verification.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Model folder.
    pub model: PathBuf,
    /// Tiers to run, in order (the f64 oracle is always computed).
    pub tiers: Vec<Tier>,
    /// Inputs of the forward phases.
    pub inputs: Vec<Input>,
    /// A deliberate bug to inject into our engine.
    pub fault: Option<Fault>,
    /// Scratch folder for traces.
    pub work_dir: PathBuf,
    /// New tokens of the greedy generation phase (f32 tier; 0 skips the phase).
    pub generate_tokens: usize,
}

/// The outcome: the phases in order, and the full per-input comparisons (for plots and JSON).
#[derive(Debug)]
pub struct VerifyOutcome {
    /// Phases in order.
    pub phases: Vec<Phase>,
    /// Full comparisons per tier, labelled "input [tier]".
    pub full: Vec<(Tier, Vec<NamedComparison>)>,
    /// True when no phase failed.
    pub passed: bool,
}

/// Runs every phase. `progress` receives a short message before each step.
pub fn run_verify(
    opts: &VerifyOptions,
    reference: &mut dyn Reference,
    progress: &mut dyn FnMut(&str),
) -> Result<VerifyOutcome, String> {
    let mut phases = vec![];
    std::fs::create_dir_all(&opts.work_dir)
        .map_err(|e| format!("cannot create {}: {e}", opts.work_dir.display()))?;

    progress("loading the model");
    let model = Model::load_with_fault(&opts.model, opts.fault).map_err(|e| e.to_string())?;

    // 1. Tokenization.
    progress("phase 1: tokenization");
    let (phase, ids) = tokenization_phase(opts, &model, reference)?;
    phases.push(phase);

    // 2. Weights.
    progress("phase 2: weights");
    phases.push(weights_phase(&model, reference)?);

    // Reference traces: the pure-f64 oracle for every input, plus each lower tier's own run.
    progress("running the reference (transformers)");
    let mut jobs = vec![];
    let path = |i: usize, dt: &str| opts.work_dir.join(format!("ref-{i}-{dt}.safetensors"));
    for (i, tokens) in ids.iter().enumerate() {
        jobs.push(TraceJob {
            model: opts.model.clone(),
            tokens: tokens.clone(),
            dtype: "f64".into(),
            out: path(i, "f64"),
        });
        for t in &opts.tiers {
            if *t != Tier::F64 {
                jobs.push(TraceJob {
                    model: opts.model.clone(),
                    tokens: tokens.clone(),
                    dtype: t.as_str().into(),
                    out: path(i, t.as_str()),
                });
            }
        }
    }
    reference.traces(&jobs)?;
    let read = |p: &Path| Trace::read(p).map_err(|e| e.to_string());

    let mut full = vec![];
    for &tier in &opts.tiers {
        progress(&format!("running lockstep in {tier} and comparing"));
        let mut comps = vec![];
        for (i, (input, tokens)) in opts.inputs.iter().zip(&ids).enumerate() {
            let oracle = read(&path(i, "f64"))?;
            let ours = match tier {
                Tier::F64 => trace_forward::<f64>(&model, tokens, Some(&input.text)),
                Tier::F32 => trace_forward::<f32>(&model, tokens, Some(&input.text)),
                Tier::BF16 => trace_forward::<Bf16>(&model, tokens, Some(&input.text)),
            }
            .map_err(|e| e.to_string())?;
            let (reference_trace, oracle) = if tier == Tier::F64 {
                (oracle, None)
            } else {
                (read(&path(i, tier.as_str()))?, Some(oracle))
            };
            let policy = TolerancePolicy::for_traces_with_tier(
                &reference_trace,
                &ours,
                oracle.as_ref(),
                Some(tier),
            )
            .map_err(|e| e.to_string())?;
            let cmp = compare_traces(&reference_trace, &ours, oracle.as_ref(), &policy);
            comps.push((input.kind, NamedComparison::new(input.label.clone(), cmp)));
        }
        let pick = |kind: Option<InputKind>, keep: &dyn Fn(&str) -> bool| -> Vec<NamedComparison> {
            comps
                .iter()
                .filter(|(k, _)| kind.is_none_or(|x| x == *k))
                .map(|(_, c)| restrict(c, keep))
                .collect()
        };
        let logits_only = |n: &str| n == "tokens" || n == "logits";
        let single = pick(Some(InputKind::Single), &logits_only);
        if !single.is_empty() {
            phases.push(Phase::from_comparisons(
                format!("single-token forward [{tier}]"),
                single,
            ));
        }
        let multi = pick(Some(InputKind::Multi), &logits_only);
        if !multi.is_empty() {
            phases.push(Phase::from_comparisons(
                format!("multi-token sequences [{tier}]"),
                multi,
            ));
        }
        let all: Vec<NamedComparison> = comps.iter().map(|(_, c)| c.clone()).collect();
        phases.push(Phase::from_comparisons(
            format!("layer-by-layer [{tier}]"),
            all.clone(),
        ));
        let attn = pick(None, &|n: &str| n == "tokens" || n.ends_with(".attn_probs"));
        phases.push(Phase::from_comparisons(
            format!("attention weights [{tier}]"),
            attn,
        ));
        full.push((tier, all));
        if tier == Tier::BF16 {
            progress("running lockstep in bf16w (bf16 weights, f32 activations)");
            phases.push(bf16w_phase(&model, opts, &ids, &path)?);
        }
        progress(&format!("KV-cache decode in {tier}"));
        phases.push(kv_cache_phase(&model, tier, opts, &ids)?);
    }
    if opts.tiers.contains(&Tier::F32) && opts.generate_tokens > 0 {
        progress(&format!(
            "greedy generation, {} new tokens (lockstep and transformers.generate)",
            opts.generate_tokens
        ));
        phases.push(generation_phase(&model, opts, &ids, reference)?);
    }
    let passed = phases
        .iter()
        .all(|p| p.status != crate::report::PhaseStatus::Fail);
    Ok(VerifyOutcome {
        phases,
        full,
        passed,
    })
}

/// The same comparison restricted to some tensors (verdict and first divergence recomputed).
fn restrict(c: &NamedComparison, keep: &dyn Fn(&str) -> bool) -> NamedComparison {
    let mut cmp = c.comparison.clone();
    cmp.tensors.retain(|t| keep(&t.name));
    cmp.first_divergence = cmp
        .tensors
        .iter()
        .find(|t| t.status.is_failure())
        .map(|t| t.name.clone());
    cmp.passed = cmp.tensors.iter().all(|t| !t.status.is_failure())
        && !cmp
            .tensors
            .iter()
            .any(|t| t.status == crate::compare::Status::Unjudged);
    NamedComparison::new(c.label.clone(), cmp)
}

/// Ids for a table cell: the list when short, else the count.
fn show_ids(v: &[u32]) -> String {
    if v.len() <= 8 {
        format!("{v:?}")
    } else {
        format!("{} ids", v.len())
    }
}

fn short(text: &str) -> String {
    let one = text.replace('\n', "\\n");
    if one.chars().count() > 40 {
        format!("{}…", one.chars().take(40).collect::<String>())
    } else {
        one
    }
}

/// Phase 1: our tokenizer against the reference's on every input and on special-token strings.
/// Returns the ids the forward phases use (the reference's, so both sides see the same input).
fn tokenization_phase(
    opts: &VerifyOptions,
    model: &Model,
    reference: &mut dyn Reference,
) -> Result<(Phase, Vec<Vec<u32>>), String> {
    let name = "tokenization";
    let tok = match Tokenizer::from_dir(&opts.model) {
        Ok(t) => t,
        Err(e) => return Err(e.to_string()),
    };
    let mut texts: Vec<String> = opts.inputs.iter().map(|i| i.text.clone()).collect();
    let n_inputs = texts.len();
    if tok.token_to_id("<|im_start|>").is_some() {
        texts.extend(SPECIAL_TEXTS.iter().map(|s| s.to_string()));
    }
    let theirs = reference.tokenize(&opts.model, &texts)?;
    let mut ok = 0;
    let mut table = String::from(
        "| text | tokens (ours) | tokens (transformers) | identical |\n|---|---|---|---|\n",
    );
    for (text, r) in texts.iter().zip(&theirs) {
        let ours = tok.encode(text).map_err(|e| e.to_string())?;
        let same = &ours == r;
        ok += same as usize;
        let _ = writeln!(
            table,
            "| `{}` | {} | {} | {} |",
            short(text),
            show_ids(&ours),
            show_ids(r),
            if same { "yes" } else { "**NO**" }
        );
    }
    // The chat template, when the model has one: rendered text and ids must both be identical.
    let mut n_chat = 0;
    if let Some(template) = ChatTemplate::from_dir(&opts.model).map_err(|e| e.to_string())? {
        let convs = chat_conversations();
        let theirs_chat = reference.chat(&opts.model, &convs)?;
        for ((label, conv), (their_text, their_ids)) in CHAT_LABELS
            .iter()
            .zip(convs.as_array().unwrap())
            .zip(&theirs_chat)
        {
            let messages: Vec<Message> =
                serde_json::from_value(conv["messages"].clone()).map_err(|e| e.to_string())?;
            let tools = conv.get("tools").filter(|t| !t.is_null());
            let (same_text, ours_n) = match template.render(&messages, true, tools) {
                Ok(text) => {
                    let ids = tok.encode(&text).map_err(|e| e.to_string())?;
                    (text == *their_text && ids == *their_ids, ids.len())
                }
                Err(e) => {
                    let _ = writeln!(table, "| chat: {label} | error: {e} | | **NO** |");
                    n_chat += 1;
                    continue;
                }
            };
            n_chat += 1;
            ok += same_text as usize;
            let _ = writeln!(
                table,
                "| chat template: {label} | {ours_n} ids | {} ids | {} |",
                their_ids.len(),
                if same_text {
                    "yes (text and ids)"
                } else {
                    "**NO**"
                }
            );
        }
    }
    let total = texts.len() + n_chat;
    let ids: Vec<Vec<u32>> = theirs[..n_inputs].to_vec();
    for (i, v) in ids.iter().enumerate() {
        if v.is_empty() {
            return Err(format!(
                "input {:?} tokenizes to no tokens",
                opts.inputs[i].text
            ));
        }
        model.check_tokens(v, 0).map_err(|e| e.to_string())?;
    }
    let summary = format!(
        "{ok}/{total} texts tokenize identically (incl. {} with special tokens, {n_chat} chat-template renderings)",
        texts.len() - n_inputs
    );
    let phase = if ok == total {
        Phase::pass(name, summary)
    } else {
        Phase::fail(name, summary)
    };
    Ok((phase.with_details(table), ids))
}

/// Phase 2: every tensor we use bit-identical to what the reference loaded.
fn weights_phase(model: &Model, reference: &mut dyn Reference) -> Result<Phase, String> {
    let name = "weights";
    let theirs = reference.weights(&model.checkpoint.dir)?;
    let c = &model.config;
    let mut problems = vec![];
    let mut checked = 0;
    let mut ours_count: u64 = 0;
    for (n, t) in &model.checkpoint.tensors {
        if n == "lm_head.weight" && c.tie_word_embeddings {
            continue;
        }
        ours_count += t.numel() as u64;
        match theirs.checksums.get(n) {
            Some(h) if *h == t.sha256_hex() => checked += 1,
            Some(_) => problems.push(format!("`{n}` differs from what transformers loaded")),
            None => problems.push(format!("`{n}` was not loaded by transformers")),
        }
    }
    for n in theirs.checksums.keys() {
        let aliased = n == "lm_head.weight" && c.tie_word_embeddings;
        if !model.checkpoint.contains(n) && !aliased {
            problems.push(format!("transformers has `{n}`, the checkpoint does not"));
        }
    }
    let expected = c.parameter_count() as u64;
    if ours_count != expected || theirs.parameter_count != expected {
        problems.push(format!(
            "parameter count: config implies {expected}, lockstep loaded {ours_count}, transformers {}",
            theirs.parameter_count
        ));
    }
    // Tied head: ours must be the embedding matrix exactly when the reference's is.
    let ours_tied = model.lm_head.bytes().as_ptr() == model.embed_tokens.bytes().as_ptr();
    if ours_tied != theirs.tied {
        problems.push(format!(
            "tied embeddings: lockstep {ours_tied}, transformers {}",
            theirs.tied
        ));
    }
    let ours_bias = model.layers.iter().all(|l| l.qkv_bias.is_some());
    if ours_bias != theirs.qkv_bias {
        problems.push(format!(
            "q/k/v biases: lockstep {}, transformers {}",
            if ours_bias { "present" } else { "absent" },
            if theirs.qkv_bias { "present" } else { "absent" }
        ));
    }
    let details = format!(
        "| check | result |\n|---|---|\n| tensors bit-identical (sha256, {} dtype) | {checked}/{} |\n| parameters | {ours_count} (transformers {}, config {expected}) |\n| tied embeddings | lockstep {ours_tied}, transformers {} |\n| q/k/v biases | lockstep {ours_bias}, transformers {} |\n{}",
        theirs.dtype,
        theirs.checksums.len(),
        theirs.parameter_count,
        theirs.tied,
        theirs.qkv_bias,
        problems.iter().map(|p| format!("\n- {p}")).collect::<String>()
    );
    let summary = format!(
        "{checked} tensors bit-identical, {ours_count} parameters{}",
        if problems.is_empty() {
            String::new()
        } else {
            format!("; {} problem(s): {}", problems.len(), problems[0])
        }
    );
    Ok(if problems.is_empty() {
        Phase::pass(name, summary)
    } else {
        Phase::fail(name, summary)
    }
    .with_details(details))
}

/// KV-cache decoding: feeding the multi-token inputs one token at a time through the cache must
/// give the logits of the full-sequence forward pass (f64: 1e-9, f32: 1e-4).
fn kv_cache_phase(
    model: &Model,
    tier: Tier,
    opts: &VerifyOptions,
    ids: &[Vec<u32>],
) -> Result<Phase, String> {
    fn run<T: lockstep_engine::Float>(model: &Model, tokens: &[u32]) -> Result<f64, String> {
        let mut obs = lockstep_engine::NoObserver;
        let mut cache = lockstep_engine::KvCache::<T>::new(model.config.num_layers);
        let full = model
            .forward(tokens, &mut cache, &mut obs)
            .map_err(|e| e.to_string())?;
        let mut cache = lockstep_engine::KvCache::<T>::new(model.config.num_layers);
        let v = model.config.vocab_size;
        let mut worst = 0.0f64;
        for (i, t) in tokens.iter().enumerate() {
            let step = model
                .forward(std::slice::from_ref(t), &mut cache, &mut obs)
                .map_err(|e| e.to_string())?;
            for (a, b) in step.iter().zip(&full[i * v..(i + 1) * v]) {
                worst = worst.max((a.to_f64() - b.to_f64()).abs());
            }
        }
        Ok(worst)
    }
    let name = format!("KV-cache decode [{tier}]");
    let tol = match tier {
        Tier::F64 => 1e-9,
        _ => 1e-4,
    };
    let mut table = String::from(
        "| input | tokens | max \\|decode − full forward\\| (logits) | tolerance | status |\n|---|---:|---:|---:|---|\n",
    );
    let mut all_ok = true;
    let mut worst_all = 0.0f64;
    let mut n = 0;
    for (input, tokens) in opts.inputs.iter().zip(ids) {
        if input.kind != InputKind::Multi {
            continue;
        }
        let worst = match tier {
            Tier::F64 => run::<f64>(model, tokens)?,
            _ => run::<f32>(model, tokens)?,
        };
        let ok = worst <= tol;
        all_ok &= ok;
        worst_all = worst_all.max(worst);
        n += 1;
        let _ = writeln!(
            table,
            "| {} | {} | {worst:.2e} | {tol:.0e} | {} |",
            input.label,
            tokens.len(),
            if ok { "PASS" } else { "**FAIL**" }
        );
    }
    if n == 0 {
        return Ok(Phase::skip(name, "no multi-token input"));
    }
    let summary = format!(
        "token-by-token decoding through the KV cache vs the full forward pass on {n} sequence(s): max |Δlogits| {worst_all:.2e} (tolerance {tol:.0e})"
    );
    Ok(if all_ok {
        Phase::pass(name, summary)
    } else {
        Phase::fail(name, summary)
    }
    .with_details(table))
}

/// Greedy generation in f32: our `generate` against `transformers.generate`, token for token, on
/// the first single-token prompt, the multi-token inputs and (when the checkpoint has a chat
/// template) a chat-formatted question; then all of them again as one left-padded batch. Where
/// the two part, it is a near-tie (rounding decides) only when the two tokens are within the f32
/// logits tolerance in the reference's own logits and in ours ([`crate::near_tie`]); otherwise a
/// real difference.
fn generation_phase(
    model: &Model,
    opts: &VerifyOptions,
    ids: &[Vec<u32>],
    reference: &mut dyn Reference,
) -> Result<Phase, String> {
    use lockstep_engine::generate::{generate_batch, GenerateOptions, GenerationDefaults};
    let name = "greedy generation [f32]";
    let err = |e: lockstep_engine::EngineError| e.to_string();
    let tok = Tokenizer::from_dir(&opts.model).map_err(err)?;
    let mut prompts: Vec<(String, Vec<u32>)> = vec![];
    let mut singles = opts
        .inputs
        .iter()
        .zip(ids)
        .filter(|(i, _)| i.kind == InputKind::Single);
    if let Some((input, t)) = singles.next() {
        prompts.push((input.label.clone(), t.clone()));
    }
    for (input, t) in opts.inputs.iter().zip(ids) {
        if input.kind == InputKind::Multi {
            prompts.push((input.label.clone(), t.clone()));
        }
    }
    if let Some(template) = ChatTemplate::from_dir(&opts.model).map_err(err)? {
        let text = template
            .render(
                &[Message::new("user", "What is the capital of France?")],
                true,
                None,
            )
            .map_err(err)?;
        prompts.push((
            "chat: capital of France".into(),
            tok.encode(&text).map_err(err)?,
        ));
    }
    if prompts.is_empty() {
        return Ok(Phase::skip(name, "no prompt"));
    }
    let defaults = GenerationDefaults::from_dir(&opts.model, &model.config).map_err(err)?;
    let gen_opts = GenerateOptions {
        max_new_tokens: opts.generate_tokens,
        eos_token_ids: defaults.eos_token_ids.clone(),
        ignore_eos: false,
        stop: vec![],
        sampling: lockstep_engine::sampling::SamplingParams::greedy(),
        seed: 0,
    };
    let rows: Vec<Vec<u32>> = prompts.iter().map(|(_, p)| p.clone()).collect();
    let mut jobs: Vec<GenerateJob> = rows
        .iter()
        .map(|p| GenerateJob {
            model: opts.model.clone(),
            prompts: vec![p.clone()],
            max_new_tokens: opts.generate_tokens,
        })
        .collect();
    if rows.len() > 1 {
        jobs.push(GenerateJob {
            model: opts.model.clone(),
            prompts: rows.clone(),
            max_new_tokens: opts.generate_tokens,
        });
    }
    let theirs = reference.generate(&jobs)?;
    let ours_alone: Vec<Vec<u32>> = rows
        .iter()
        .map(|p| {
            generate_batch::<f32>(model, &tok, std::slice::from_ref(p), &gen_opts, |_, _| {})
                .map(|mut g| g.remove(0).generated)
        })
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let ours_batch: Vec<Vec<u32>> = if rows.len() > 1 {
        generate_batch::<f32>(model, &tok, &rows, &gen_opts, |_, _| {})
            .map_err(err)?
            .into_iter()
            .map(|g| g.generated)
            .collect()
    } else {
        vec![]
    };
    // The f32 logits tolerance: two tokens closer than this are a tie rounding may break.
    let tie = 1e-4;
    let mut table = String::from(
        "| prompt | run | prompt tokens | lockstep | transformers | identical | verdict |\n|---|---|---:|---:|---:|---:|---|\n",
    );
    let (mut identical, mut ties, mut bugs) = (0, 0, vec![]);
    let mut check = |label: &str,
                     run: &str,
                     prompt: &[u32],
                     ours: &[u32],
                     theirs: &crate::near_tie::GeneratedRow|
     -> Result<(), String> {
        let (theirs, theirs_top) = (&theirs.ids[..], &theirs.top);
        // transformers pads a batch row that ended (EOS) until the batch ends: cut after its EOS.
        let theirs = match theirs
            .iter()
            .position(|t| gen_opts.eos_token_ids.contains(t))
        {
            Some(e) if run == "batched" => &theirs[..=e],
            _ => theirs,
        };
        let same = ours.iter().zip(theirs).take_while(|(a, b)| a == b).count();
        let verdict = if ours == theirs {
            identical += 1;
            "PASS".to_string()
        } else if same < ours.len() && same < theirs.len() {
            // Our own logits at the step where the two part, and the reference's own.
            let mut context = prompt.to_vec();
            context.extend_from_slice(&ours[..same]);
            let mut cache = lockstep_engine::KvCache::<f32>::new(model.config.num_layers);
            let logits = model.forward_last(&context, &mut cache).map_err(err)?;
            let top = theirs_top.get(same).map_or(&[][..], |t| &t[..]);
            let p = crate::near_tie::judge_parting(ours[same], theirs[same], top, &logits, tie);
            if p.near_tie {
                ties += 1;
                format!("near-tie at token {same}: lockstep {} vs transformers {}: {} (both ≤ {tie:.0e}): rounding decides, not a bug", ours[same], theirs[same], p.describe())
            } else {
                bugs.push(format!("{label} ({run}) at token {same}"));
                format!("**FAIL** at token {same}: lockstep {} vs transformers {}: {} (a near-tie needs both ≤ {tie:.0e})", ours[same], theirs[same], p.describe())
            }
        } else {
            bugs.push(format!(
                "{label} ({run}): lengths {} vs {}",
                ours.len(),
                theirs.len()
            ));
            format!(
                "**FAIL**: same first {same} tokens, then one side stops ({} vs {})",
                ours.len(),
                theirs.len()
            )
        };
        let _ = writeln!(
            table,
            "| {label} | {run} | {} | {} | {} | {same}/{} | {verdict} |",
            prompt.len(),
            ours.len(),
            theirs.len(),
            ours.len().max(theirs.len())
        );
        Ok(())
    };
    for (i, (label, prompt)) in prompts.iter().enumerate() {
        check(label, "alone", prompt, &ours_alone[i], &theirs[i][0])?;
    }
    for (i, (label, prompt)) in prompts.iter().enumerate().filter(|_| rows.len() > 1) {
        check(
            label,
            "batched",
            prompt,
            &ours_batch[i],
            &theirs[rows.len()][i],
        )?;
    }
    let runs = rows.len() + if rows.len() > 1 { rows.len() } else { 0 };
    let summary = format!(
        "greedy {} new tokens on {} prompt(s), alone and as one left-padded batch, vs transformers.generate: {identical}/{runs} identical{}",
        opts.generate_tokens,
        rows.len(),
        if ties > 0 { format!(", {ties} parted on a near-tie (rounding)") } else { String::new() }
    );
    Ok(if bugs.is_empty() {
        Phase::pass(name, summary)
    } else {
        Phase::fail(name, format!("{summary}; differs: {}", bugs.join(", ")))
    }
    .with_details(table))
}

/// bf16w: the bf16 weights as stored with float32 activations, judged like the bf16 tier against
/// the oracle; the summary says how much closer to exact math it lands than PyTorch bf16.
fn bf16w_phase(
    model: &Model,
    opts: &VerifyOptions,
    ids: &[Vec<u32>],
    path: &dyn Fn(usize, &str) -> PathBuf,
) -> Result<Phase, String> {
    let read = |p: &Path| Trace::read(p).map_err(|e| e.to_string());
    let mut comps = vec![];
    let mut table = String::from(
        "| input | max \\|bf16w − oracle\\| (logits) | max \\|PyTorch bf16 − oracle\\| | closer by |\n|---|---:|---:|---:|\n",
    );
    let mut worst_factor = f64::INFINITY;
    for (i, (input, tokens)) in opts.inputs.iter().zip(ids).enumerate() {
        let oracle = read(&path(i, "f64"))?;
        let reference_trace = read(&path(i, "bf16"))?;
        let mut ours =
            trace_forward::<f32>(model, tokens, Some(&input.text)).map_err(|e| e.to_string())?;
        ours.metadata.insert("mode".into(), "bf16w".into());
        let policy = TolerancePolicy::for_traces_with_tier(
            &reference_trace,
            &ours,
            Some(&oracle),
            Some(Tier::BF16),
        )
        .map_err(|e| e.to_string())?;
        let cmp = compare_traces(&reference_trace, &ours, Some(&oracle), &policy);
        if let Some(l) = cmp.get("logits") {
            if let (Some(t), Some(r)) = (&l.test_vs_oracle, &l.ref_vs_oracle) {
                let factor = r.max_abs / t.max_abs.max(f64::MIN_POSITIVE);
                worst_factor = worst_factor.min(factor);
                let _ = writeln!(
                    table,
                    "| {} | {:.2e} | {:.2e} | {:.0}× |",
                    input.label, t.max_abs, r.max_abs, factor
                );
            }
        }
        comps.push(NamedComparison::new(input.label.clone(), cmp));
    }
    let mut phase = Phase::from_comparisons("bf16w: bf16 weights, f32 activations [bf16]", comps);
    phase.summary = format!(
        "{}; at least {worst_factor:.0}× closer to the f64 oracle than PyTorch bf16 on logits",
        phase.summary
    );
    Ok(phase.with_details(table))
}

// ---------------------------------------------------------------------------------------------------
// Traces from other ports (`lockstep verify --port-trace FILE...`)

/// A trace written by another port (JAX, C++, ... e.g. through `lockstep_reference.writer`), with
/// what the verifier needs from its metadata.
#[derive(Debug)]
pub struct PortTrace {
    /// The file.
    pub path: PathBuf,
    /// Label for tables: the prompt when the trace names one, else the file name.
    pub label: String,
    /// The `producer` metadata (the port's name).
    pub producer: String,
    /// The precision tier, from the `dtype` metadata.
    pub tier: Tier,
    /// The input ids (`token_ids` metadata, else the `tokens` tensor).
    pub tokens: Vec<u32>,
    /// The `prompt` metadata, when the ids came from a text.
    pub prompt: Option<String>,
    /// The tensors.
    pub trace: Trace,
}

impl PortTrace {
    /// Reads a port's trace; the error names the file and what is missing.
    pub fn read(path: &Path) -> Result<Self, String> {
        let p = path.display();
        let trace = Trace::read(path).map_err(|e| e.to_string())?;
        let producer = trace
            .metadata
            .get("producer")
            .cloned()
            .unwrap_or_else(|| "unnamed port".into());
        let tier = match trace.metadata.get("dtype") {
            Some(d) => Tier::from_dtype(d).ok_or_else(|| {
                format!("{p}: dtype '{d}' names no precision tier (f64, f32 or bf16)")
            })?,
            None => {
                return Err(format!(
                    "{p}: no `dtype` metadata: the verifier runs the reference in the port's compute dtype (f64, f32 or bf16)"
                ))
            }
        };
        let from_meta: Option<Vec<i64>> = match trace.metadata.get("token_ids") {
            Some(s) => Some(serde_json::from_str(s).map_err(|e| {
                format!("{p}: token_ids metadata is not a JSON array of ids ({e})")
            })?),
            None => None,
        };
        let from_tensor: Option<Vec<i64>> = trace
            .get("tokens")
            .map(|t| t.data.to_f64().iter().map(|&v| v as i64).collect());
        let ids = match (from_meta, from_tensor) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "{p}: token_ids metadata and the tokens tensor disagree"
                ))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(format!(
                    "{p}: no token ids (neither `token_ids` metadata nor a `tokens` tensor)"
                ))
            }
        };
        if ids.is_empty() {
            return Err(format!("{p}: the trace has no tokens"));
        }
        let tokens = ids
            .iter()
            .map(|&i| u32::try_from(i).map_err(|_| format!("{p}: token id {i} is not valid")))
            .collect::<Result<Vec<u32>, String>>()?;
        let prompt = trace.metadata.get("prompt").cloned();
        let label = match &prompt {
            Some(t) => format!("{:?}", t.chars().take(30).collect::<String>()),
            None => path
                .file_name()
                .map_or_else(|| p.to_string(), |f| f.to_string_lossy().into_owned()),
        };
        Ok(PortTrace {
            path: path.to_path_buf(),
            label,
            producer,
            tier,
            tokens,
            prompt,
            trace,
        })
    }
}

/// Options of verifying other ports' traces.
#[derive(Debug, Clone)]
pub struct PortVerifyOptions {
    /// The checkpoint folder the port ran.
    pub model: PathBuf,
    /// The port's trace files.
    pub traces: Vec<PathBuf>,
    /// Scratch folder for the reference traces.
    pub work_dir: PathBuf,
}

/// Verifies traces written by another port: for each, the reference runs on the trace's own ids in
/// the trace's dtype (plus the pure-f64 oracle), and the trace is compared tensor by tensor in its
/// tier. Phases: tokenization (the port's ids against the reference tokenizer, when the traces
/// carry a `prompt`), weights (the port's recorded parameters against the checkpoint's tensors,
/// [`crate::port_weights`]; with only a `model_fingerprint`, skipped), then per
/// tier forward logits, layer-by-layer and attention weights. `producers` in the outcome's phases
/// name the port.
pub fn run_port_verify(
    opts: &PortVerifyOptions,
    reference: &mut dyn Reference,
    progress: &mut dyn FnMut(&str),
) -> Result<VerifyOutcome, String> {
    use lockstep_engine::weights::{Checkpoint, StoredDtype};

    std::fs::create_dir_all(&opts.work_dir)
        .map_err(|e| format!("cannot create {}: {e}", opts.work_dir.display()))?;
    progress("reading the port's traces");
    let ports = opts
        .traces
        .iter()
        .map(|p| PortTrace::read(p))
        .collect::<Result<Vec<_>, _>>()?;
    if ports.is_empty() {
        return Err("no port traces given".into());
    }
    let config = lockstep_engine::ModelConfig::from_file(&opts.model.join("config.json"))
        .map_err(|e| e.to_string())?;
    let checkpoint = Checkpoint::open(&opts.model).map_err(|e| e.to_string())?;
    let stored_bf16 = !checkpoint.tensors.is_empty()
        && checkpoint
            .tensors
            .values()
            .all(|t| t.dtype == StoredDtype::BF16);
    for port in &ports {
        if let Some(bad) = port
            .tokens
            .iter()
            .find(|&&t| t as usize >= config.vocab_size)
        {
            return Err(format!(
                "{}: token id {bad} is outside the model's vocabulary ({} ids)",
                port.path.display(),
                config.vocab_size
            ));
        }
        if port.tier == Tier::BF16 && !stored_bf16 {
            return Err(format!(
                "{} is a bf16 trace, but {} is not stored in bf16: the bf16 tier's oracle must run on the very weights the bf16 run uses; verify against a bf16-stored copy of the checkpoint (examples/jax_qwen2/to_bf16.py writes one) and run the port on it",
                port.path.display(),
                opts.model.display()
            ));
        }
    }

    let mut phases = vec![];
    progress("phase 1: tokenization");
    phases.push(port_tokenization_phase(opts, &ports, reference));
    progress("phase 2: weights");
    phases.push(port_weights_phase(&checkpoint, &ports));

    // Reference traces: the oracle for every trace's ids, and the reference in the trace's dtype.
    let path = |tokens: &[u32], dt: &str| {
        let mut h: u64 = 0xcbf29ce484222325;
        for t in tokens {
            for b in t.to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x100000001b3);
            }
        }
        opts.work_dir
            .join(format!("port-{h:016x}-{}-{dt}.safetensors", tokens.len()))
    };
    let mut jobs: Vec<TraceJob> = vec![];
    for port in &ports {
        for dt in ["f64", port.tier.as_str()] {
            let out = path(&port.tokens, dt);
            if !jobs.iter().any(|j| j.out == out) {
                jobs.push(TraceJob {
                    model: opts.model.clone(),
                    tokens: port.tokens.clone(),
                    dtype: dt.into(),
                    out,
                });
            }
        }
    }
    progress("running the reference (transformers) on the port's ids");
    reference.traces(&jobs)?;
    let read = |p: &Path| Trace::read(p).map_err(|e| e.to_string());

    let mut producers: Vec<&str> = ports.iter().map(|p| p.producer.as_str()).collect();
    producers.sort_unstable();
    producers.dedup();
    let many = producers.len() > 1;
    let mut full = vec![];
    for tier in [Tier::F64, Tier::F32, Tier::BF16] {
        let mine: Vec<&PortTrace> = ports.iter().filter(|p| p.tier == tier).collect();
        if mine.is_empty() {
            continue;
        }
        progress(&format!("comparing the {tier} trace(s)"));
        let mut comps = vec![];
        for port in mine {
            let oracle = read(&path(&port.tokens, "f64"))?;
            let (reference_trace, oracle) = if tier == Tier::F64 {
                (oracle, None)
            } else {
                (read(&path(&port.tokens, tier.as_str()))?, Some(oracle))
            };
            let policy = TolerancePolicy::for_traces_with_tier(
                &reference_trace,
                &port.trace,
                oracle.as_ref(),
                Some(tier),
            )
            .map_err(|e| format!("{}: {e}", port.path.display()))?;
            let cmp = compare_traces(&reference_trace, &port.trace, oracle.as_ref(), &policy);
            let label = if many {
                format!("{} ({})", port.label, port.producer)
            } else {
                port.label.clone()
            };
            comps.push(NamedComparison::new(label, cmp));
        }
        let logits_only = |n: &str| n == "tokens" || n == "logits";
        let attn_only = |n: &str| n == "tokens" || n.ends_with(".attn_probs");
        phases.push(Phase::from_comparisons(
            format!("forward logits [{tier}]"),
            comps.iter().map(|c| restrict(c, &logits_only)).collect(),
        ));
        phases.push(Phase::from_comparisons(
            format!("layer-by-layer [{tier}]"),
            comps.clone(),
        ));
        phases.push(Phase::from_comparisons(
            format!("attention weights [{tier}]"),
            comps.iter().map(|c| restrict(c, &attn_only)).collect(),
        ));
        full.push((tier, comps));
    }
    let passed = phases
        .iter()
        .all(|p| p.status != crate::report::PhaseStatus::Fail);
    Ok(VerifyOutcome {
        phases,
        full,
        passed,
    })
}

/// The port's token ids against the reference tokenizer, for traces that carry their prompt.
fn port_tokenization_phase(
    opts: &PortVerifyOptions,
    ports: &[PortTrace],
    reference: &mut dyn Reference,
) -> Phase {
    let name = "tokenization";
    let with_prompt: Vec<&PortTrace> = ports.iter().filter(|p| p.prompt.is_some()).collect();
    if with_prompt.is_empty() {
        return Phase::skip(
            name,
            "the port's traces carry token ids, no prompt: the reference runs on those same ids (the port's tokenizer is not under test)",
        );
    }
    let texts: Vec<String> = with_prompt
        .iter()
        .map(|p| p.prompt.clone().unwrap_or_default())
        .collect();
    let theirs = match reference.tokenize(&opts.model, &texts) {
        Ok(v) => v,
        Err(e) => return Phase::skip(name, format!("the reference could not tokenize: {e}")),
    };
    let mut table = String::from(
        "| prompt | ids (port) | ids (transformers) | identical |\n|---|---|---|---|\n",
    );
    let mut ok = 0;
    for (port, r) in with_prompt.iter().zip(&theirs) {
        let same = port.tokens == *r;
        ok += same as usize;
        let _ = writeln!(
            table,
            "| `{}` | {} | {} | {} |",
            short(port.prompt.as_deref().unwrap_or_default()),
            show_ids(&port.tokens),
            show_ids(r),
            if same { "yes" } else { "**NO**" }
        );
    }
    let n = with_prompt.len();
    let without = ports.len() - n;
    let summary = format!(
        "{ok}/{n} prompt(s): the port's ids equal transformers' tokenization{}",
        if without > 0 {
            format!(" ({without} trace(s) without a prompt: ids taken as given)")
        } else {
            String::new()
        }
    );
    if ok == n {
        Phase::pass(name, summary)
    } else {
        Phase::fail(name, summary)
    }
    .with_details(table)
}

/// The traces' `model_fingerprint` against the checkpoint's: were they made from these weights?
fn port_weights_phase(
    checkpoint: &lockstep_engine::weights::Checkpoint,
    ports: &[PortTrace],
) -> Phase {
    let name = "weights";
    // The parameters the port computes with, when its writer was given them (port_weights.rs).
    let stored = checkpoint
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dtype.name(), t.shape.clone(), t.bytes()));
    if let Ok(ck) = crate::port_weights::CheckpointWeights::new(stored) {
        let traces: Vec<(String, &BTreeMap<String, String>)> = ports
            .iter()
            .map(|p| (p.path.display().to_string(), &p.trace.metadata))
            .collect();
        if let Some(phase) = crate::port_weights::weights_phase(&ck, &traces) {
            return phase;
        }
    }
    let with_fp: Vec<(&PortTrace, &String)> = ports
        .iter()
        .filter_map(|p| p.trace.metadata.get("model_fingerprint").map(|f| (p, f)))
        .collect();
    if with_fp.is_empty() {
        return Phase::skip(
            name,
            "no model_fingerprint in the port's traces: the port's weights are not visible to lockstep (a wrong or missing weight shows as a divergence in the tensors below)",
        );
    }
    let ours = match checkpoint.fingerprint() {
        Ok(f) => f,
        Err(e) => return Phase::skip(name, format!("cannot fingerprint the checkpoint: {e}")),
    };
    let bad: Vec<String> = with_fp
        .iter()
        .filter(|(_, f)| **f != ours)
        .map(|(p, _)| p.path.display().to_string())
        .collect();
    let n = with_fp.len();
    if bad.is_empty() {
        Phase::skip(
            name,
            format!(
                "{n}/{} trace(s) written next to this checkpoint (model_fingerprint identical), but the weights the port computes with are not recorded: give its parameters to the writer (TraceWriter.save(..., weights=params))",
                ports.len()
            ),
        )
    } else {
        Phase::fail(
            name,
            format!(
                "{} of {n} trace(s) made from other weights or another config (model_fingerprint differs): {}",
                bad.len(),
                bad.join(", ")
            ),
        )
    }
}
