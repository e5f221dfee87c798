//! The engine pipeline of `lockstep verify`: lockstep's own engine against the Python reference,
//! phase by phase (the plan the old port's report never finished).
//!
//! 1. tokenization identity (plain text, special tokens, chat template);
//! 2. weights: every tensor bit-identical to what `transformers` loaded, parameter count, tied
//!    embeddings, q/k/v biases;
//! 3. single-token forward (the old report's "Hello", "The", "123");
//! 4. multi-token sequences (short and several hundred tokens);
//! 5. layer-by-layer: every tapped tensor, first divergence named;
//! 6. attention weights;
//! 7. bf16w (bf16 tier), q8dot (f32 tier, quantized GGUF), KV-cache decode per tier, greedy
//!    generation (f32 and bf16).
//!
//! Phases 3-6 run per precision tier; each comparison is
//! [`lockstep_verify::judge`](fn@lockstep_verify::judge)'s.

use super::checks::{tokenization_phase, weights_phase};
use super::generation::generation_phase;
use super::inputs::{Input, InputKind};
use super::q8dot_phase::{q8dot_model, q8dot_phase};
use super::reference::{Reference, TraceJob};
use super::{
    create_work_dir, judge_stored_in_tier, op_level_phase, reference_output, HarnessError,
    HarnessResult, OpsInput, StepClock,
};
use lockstep_engine::kernels::matmul::Kernel;
use lockstep_engine::trace_capture::trace_forward;
use lockstep_engine::{with_float, Fault, Model};
use lockstep_trace::TraceStore;
use lockstep_verify::nonfinite::{nonfinite_summary, NonFiniteWeight};
use lockstep_verify::{restrict, NamedComparison, Phase, Tier, TraceComparison, VerifyOutcome};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

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
    /// New tokens of the greedy generation phases (f32 and bf16 tiers; 0 skips them).
    pub generate_tokens: usize,
}

/// Runs every phase. `progress` receives a short message before each step; the outcome carries
/// the time each step took.
pub fn run_verify(
    opts: &VerifyOptions,
    reference: &mut dyn Reference,
    progress: &mut dyn FnMut(&str),
) -> HarnessResult<VerifyOutcome> {
    let mut clock = StepClock::default();
    let outcome = run_phases(opts, reference, &mut |msg: &str| {
        clock.step(msg);
        progress(msg)
    })?;
    Ok(outcome.with_timings(clock.finish()))
}

fn run_phases(
    opts: &VerifyOptions,
    reference: &mut dyn Reference,
    progress: &mut dyn FnMut(&str),
) -> HarnessResult<VerifyOutcome> {
    let mut phases = vec![];
    create_work_dir(&opts.work_dir)?;

    progress("loading the model");
    // The reference imports torch and transformers meanwhile (~7 s of one core), while the load
    // waits on the disk when the weights are not in the page cache.
    reference.warm_up();
    let mut model = Model::load_with_fault(&opts.model, opts.fault)?;
    // Verify computes in several types: a coding that replaced the stored matrices for the bf16
    // phases would have the f32 and bf16w phases read the stored bytes back beside it, both
    // held at once.
    model.code_bf16_instead = false;

    // 1. Tokenization.
    progress("phase 1: tokenization");
    let (phase, ids) = tokenization_phase(opts, &model, reference)?;
    phases.push(phase);

    // 2. Weights.
    progress("phase 2: weights");
    // Non-finite values per checkpoint tensor, as plain data for the verifier.
    let nonfinite_weights: Vec<NonFiniteWeight> = model
        .checkpoint
        .nonfinite_report()
        .into_iter()
        .map(|w| NonFiniteWeight {
            name: w.name,
            nan: w.nan,
            inf: w.inf,
            first_index: w.first_index,
        })
        .collect();
    phases.push(weights_phase(&model, reference, &nonfinite_weights)?);

    // A quantized GGUF in the f32 tier: lockstep's fast mode too (q8dot_phase.rs).
    let q8_model = if opts.tiers.contains(&Tier::F32) {
        q8dot_model(&model, &opts.model, opts.fault)?
    } else {
        None
    };

    // Reference traces: the pure-f64 oracle for every input, plus each lower tier's own run (and
    // the q8dot arithmetic's, where that phase runs).
    progress("running the reference (transformers)");
    let mut jobs = vec![];
    let folders = super::pyref::streamed(&opts.model, "f64");
    let path =
        |i: usize, dt: &str| reference_output(&opts.work_dir, &format!("ref-{i}-{dt}"), folders);
    for (i, tokens) in ids.iter().enumerate() {
        let mut dtypes = vec!["f64"];
        dtypes.extend(
            opts.tiers
                .iter()
                .filter(|t| **t != Tier::F64)
                .map(|t| t.as_str()),
        );
        if q8_model.is_some() {
            dtypes.push("q8dot");
        }
        for dt in dtypes {
            jobs.push(TraceJob {
                model: opts.model.clone(),
                tokens: tokens.clone(),
                dtype: dt.into(),
                out: path(i, dt),
            });
        }
    }
    reference.traces(&jobs)?;

    let mut full = vec![];
    let mut local = vec![];
    for &tier in &opts.tiers {
        progress(&format!("running lockstep in {tier} and comparing"));
        let mut comps = vec![];
        let mut ops_inputs = vec![];
        for (i, (input, tokens)) in opts.inputs.iter().zip(&ids).enumerate() {
            let text = Some(&input.text[..]);
            let ours = with_float!(tier, T => streamed(&mut model, |m| trace_forward::<T>(m, tokens, text)))?;
            // The comparisons and the op-level phase read traces, not weights: the weights'
            // pages leave our resident set meanwhile (they stay cached; the next pass maps them
            // again). At 7B the traces of the long input take ~7.6 GB; the pass itself streamed
            // the layers ([`streamed`]), and this also drops the embeddings and the head.
            model.checkpoint.release_pages();
            // Written first, then judged a layer at a time beside the reference's traces
            // ([`judge_stored_in_tier`]): our trace and theirs are never all in memory at once.
            let ours_path = write_and_free(
                ours,
                opts.work_dir.join(format!("ours-{i}-{tier}.safetensors")),
            )?;
            let cmp = judge_stored_in_tier(tier, &ours_path, &|dt| path(i, dt))?;
            ops_inputs.push(OpsInput {
                label: input.label.clone(),
                test: ours_path,
                end_to_end: Some(cmp.clone()),
            });
            comps.push((input.kind, NamedComparison::new(input.label.clone(), cmp)));
        }
        let pick = |kind: Option<InputKind>, keep: &dyn Fn(&str) -> bool| -> Vec<NamedComparison> {
            comps
                .iter()
                .filter(|(k, _)| kind.is_none_or(|x| x == *k))
                .map(|(_, c)| restrict(c, keep))
                .collect()
        };
        let logits_only = super::is_logits_or_tokens;
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
        let attn = pick(None, &super::is_attention_probs_or_tokens);
        phases.push(Phase::from_comparisons(
            format!("attention weights [{tier}]"),
            attn,
        ));
        full.push((tier, all));
        let (op_phase, items) = op_level_phase(
            reference,
            &opts.model,
            tier,
            ops_inputs,
            &opts.work_dir,
            "ours",
            progress,
        )?;
        phases.push(op_phase);
        if !items.is_empty() {
            local.push((tier, items));
        }
        if tier == Tier::BF16 {
            progress("running lockstep in bf16w (bf16 weights, f32 activations)");
            phases.push(streamed(&mut model, |m| bf16w_phase(m, opts, &ids, &path))?);
        }
        if let (Tier::F32, Some(q8)) = (tier, &q8_model) {
            progress("running lockstep in q8dot (8-bit activations, integer dot products)");
            phases.push(q8dot_phase(q8, &opts.inputs, &ids, &path)?);
        }
        progress(&format!("KV-cache decode in {tier}"));
        let bf16_yardstick = |i: usize| {
            let oracle = trace_logits(&path(i, "f64"))?;
            let noise = max_gap(&trace_logits(&path(i, "bf16"))?, &oracle);
            Ok(Some(Bf16Yardstick { noise, oracle }))
        };
        phases.push(kv_cache_phase(&model, tier, opts, &ids, &bf16_yardstick)?);
    }
    // Greedy generation in f32 and in bf16 (f64 has no generation phase: the reference would
    // generate in float64).
    for tier in [Tier::F32, Tier::BF16] {
        if !opts.tiers.contains(&tier) || opts.generate_tokens == 0 {
            continue;
        }
        progress(&format!(
            "greedy generation in {tier}, {} new tokens: the near-tie yardstick",
            opts.generate_tokens
        ));
        // Two tokens closer than this are a tie rounding may break: the f32 logits tolerance, or
        // the largest distance of PyTorch's bf16 logits from the f64 oracle over the inputs.
        let tie = match tier {
            Tier::BF16 => (0..ids.len()).try_fold(0.0, |m: f64, i| {
                Ok::<_, HarnessError>(m.max(bf16_logits_noise(&path(i, "bf16"), &path(i, "f64"))?))
            })?,
            _ => lockstep_verify::tolerance::F32_LOGITS_TOLERANCE,
        };
        phases.push(generation_phase(
            &model, opts, &ids, reference, tier, tie, progress,
        )?);
    }
    // Non-finite values: where they come from (the checkpoint?) and where they first appear.
    let all_cmps: Vec<&TraceComparison> = full
        .iter()
        .flat_map(|(_, v)| v.iter().map(|c| &c.comparison))
        .collect();
    if let Some(sentence) = nonfinite_summary(&nonfinite_weights, &all_cmps) {
        let at = phases
            .iter()
            .position(|p| p.name == "weights")
            .map_or(phases.len(), |i| i + 1);
        phases.insert(at, Phase::fail("non-finite values", sentence));
    }
    Ok(VerifyOutcome::new(phases, full).with_local(local))
}

/// Runs `pass` (traced forward passes) with the decoder layers streamed through the page cache
/// ([`Model::stream_layers`]: each layer's pages dropped from the mapping after it runs), then
/// puts the setting back. A trace holds every activation (1.9 GB for the 7B shape's 260-token
/// input), and with the whole mapping resident beside it the 7B plan peaked at 20.3 GB of RSS
/// in the bf16w step (`lockstep trace` of that input: 20.5 GB, 35.1 s; streamed: 5.6 GB,
/// 36.5 s; on the 0.5B shape 2.7 s either way). The KV-cache and generation phases, whose
/// one-token steps would map every layer again per token, keep the load's setting. Values
/// never change. `LOCKSTEP_STREAM_LAYERS=off` keeps the file mapped here too, as it does for
/// `lockstep trace` ([`lockstep_engine::streaming::stream_layers_for_one_pass`]; the load has
/// already refused a bad value).
fn streamed<R>(model: &mut Model, pass: impl FnOnce(&Model) -> R) -> R {
    let one_pass = lockstep_engine::streaming::stream_layers_for_one_pass().unwrap_or(true);
    let was = std::mem::replace(&mut model.stream_layers, one_pass);
    let out = pass(model);
    model.stream_layers = was;
    out
}

/// Writes our trace `ours` to `path` and frees its memory (back to the system: it is the
/// largest allocation of a traced pass); returns `path`.
fn write_and_free(ours: lockstep_trace::Trace, path: PathBuf) -> HarnessResult<PathBuf> {
    ours.write(&path)
        .map_err(|e| HarnessError::input(format!("cannot write {}: {e}", path.display())))?;
    drop(ours);
    lockstep_engine::allocator::release_freed_heap();
    Ok(path)
}

/// The logits of a reference trace as f64 (empty when it has none).
fn trace_logits(p: &Path) -> HarnessResult<Vec<f64>> {
    let t = TraceStore::open(p)
        .and_then(|s| s.load(&["logits"]))
        .map_err(|e| HarnessError::reference(format!("its trace is unreadable: {e}")))?;
    Ok(t.get("logits").map(|l| l.data.to_f64()).unwrap_or_default())
}

/// What a bf16 KV-cache decode is held to where the AMX kernel serves the prefill, for one
/// input: the f64 oracle's logits at every position, and PyTorch bf16's own distance from them.
struct Bf16Yardstick {
    /// max |PyTorch bf16 − f64 oracle| over the input's logits.
    noise: f64,
    /// The oracle's logits, `[positions][vocab]`.
    oracle: Vec<f64>,
}

/// How far PyTorch's own bf16 logits lie from the f64 oracle on one input: max |bf16 − f64| over
/// the logits of the two reference traces (only the logits are read); 0 when either has none.
fn bf16_logits_noise(bf16: &Path, f64: &Path) -> HarnessResult<f64> {
    Ok(max_gap(&trace_logits(bf16)?, &trace_logits(f64)?))
}

/// max |a − b| over the values both hold (0 when either is empty).
fn max_gap(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// How many leading positions a KV-cache decode must reproduce the full forward pass at: all,
/// except with `dynamic` RoPE, whose frequencies depend on the pass's length: past the original
/// length (`max_position_embeddings`) cached keys keep the frequencies of the pass that cached
/// them, in transformers as here, so the full forward is no yardstick there (the generation
/// phase checks those positions against transformers.generate).
fn decode_limit(model: &Model) -> usize {
    match model.config.rope_scaling {
        lockstep_engine::kernels::rope::RopeScaling::Dynamic {
            max_position_embeddings,
            ..
        } => max_position_embeddings,
        _ => usize::MAX,
    }
}

/// One-token decode steps at the end of each input in the KV-cache phase ([`cache_schedule`]).
const DECODE_STEPS: usize = 32;

/// How the KV-cache phase feeds an input of `len` tokens through the cache: chunks of 1, 2, 4, 8,
/// ... tokens (chunked prefill: each chunk's queries attend to every key cached before it and to
/// its own), the last one cut to fit, then the last [`DECODE_STEPS`] positions one token at a
/// time (the decode). Every position's logits are judged. Each token alone costs a read of every
/// weight: the 7B shape's 260-token input took 281 such steps, 154 s of the whole plan's ~13 min
/// (2026-12-02), where this schedule makes 8 chunks and 32 steps.
fn cache_schedule(len: usize) -> Vec<usize> {
    let prefix = len.saturating_sub(DECODE_STEPS);
    let mut chunks = vec![];
    let (mut done, mut size) = (0, 1);
    while done < prefix {
        let c = size.min(prefix - done);
        chunks.push(c);
        done += c;
        size *= 2;
    }
    chunks.extend(std::iter::repeat_n(1, len - prefix));
    chunks
}

/// KV-cache decoding, in the arithmetic of the tier: feeding the multi-token inputs through the
/// cache ([`cache_schedule`]: growing chunks, then one token at a time) must give the logits of
/// the full-sequence forward pass at every position (f64: 1e-9,
/// f32: 1e-4; bf16: bit-identical, 0, as measured on the bf16 fixtures), except where the AMX
/// kernel serves the bf16 prefill: its f32 sums run in another order than a one-token decode's,
/// so the two are two bf16 computations of the same logits, each with its own roundings. There
/// the decode is judged as the tier judges any bf16 run, against the f64 oracle: its logits at
/// every position no further from the oracle's than
/// [`BF16_NOISE_MULTIPLE`](lockstep_verify::tolerance::BF16_NOISE_MULTIPLE) × PyTorch bf16's
/// own distance on that input (`bf16_yardstick` gives both by input index); its distance from
/// the full forward is reported beside. (Held to PyTorch's distance itself, the full forward
/// and the decode of the 7B shape's 260-token input, each within the tier's rule, differed by
/// 2.11e-1 against 1.72e-1.)
fn kv_cache_phase(
    model: &Model,
    tier: Tier,
    opts: &VerifyOptions,
    ids: &[Vec<u32>],
    bf16_yardstick: &dyn Fn(usize) -> HarnessResult<Option<Bf16Yardstick>>,
) -> HarnessResult<Phase> {
    /// NaN/inf never agree (f64::max would drop a NaN difference).
    fn gap(a: f64, b: f64) -> f64 {
        if a.is_finite() && b.is_finite() {
            (a - b).abs()
        } else {
            f64::INFINITY
        }
    }
    /// max |decode − full forward| over the logits, max |decode − oracle| where `oracle` is
    /// given (`[positions][vocab]`; infinite when it is shorter than the tokens), and the
    /// arithmetic it ran in.
    fn run<T: lockstep_engine::Float>(
        model: &Model,
        tokens: &[u32],
        oracle: Option<&[f64]>,
    ) -> HarnessResult<(f64, f64, &'static str)> {
        // Both passes on the positions below the limit only: a full pass longer than dynamic
        // RoPE's original length scales every position's frequencies, the early ones included.
        let tokens = &tokens[..tokens.len().min(decode_limit(model))];
        let mut obs = lockstep_engine::NoObserver;
        let mut cache = lockstep_engine::KvCache::<T>::new(model.config.num_layers);
        let full = model.forward(tokens, &mut cache, &mut obs)?;
        let mut cache = lockstep_engine::KvCache::<T>::new(model.config.num_layers);
        let v = model.config.vocab_size;
        let (mut worst, mut worst_oracle) = (0.0f64, 0.0f64);
        let mut start = 0;
        for len in cache_schedule(tokens.len()) {
            let chunk = &tokens[start..start + len];
            let rows = model.forward(chunk, &mut cache, &mut obs)?;
            for (j, row) in rows.chunks_exact(v).enumerate() {
                let i = start + j;
                for (a, b) in row.iter().zip(&full[i * v..(i + 1) * v]) {
                    worst = worst.max(gap(a.to_f64(), b.to_f64()));
                }
                if let Some(o) = oracle {
                    match o.get(i * v..(i + 1) * v) {
                        Some(o) => {
                            for (a, &b) in row.iter().zip(o) {
                                worst_oracle = worst_oracle.max(gap(a.to_f64(), b));
                            }
                        }
                        None => worst_oracle = f64::INFINITY,
                    }
                }
            }
            start += len;
        }
        Ok((worst, worst_oracle, T::PRECISION.as_str()))
    }
    let name = format!("KV-cache decode [{tier}]");
    // bf16 on AMX: the decode judged against the oracle, by the tier's own rule.
    let against_oracle = tier == Tier::BF16 && Kernel::detect() == Kernel::Amx;
    let multiple = lockstep_verify::tolerance::BF16_NOISE_MULTIPLE;
    let mut tol_all = 0.0f64;
    let mut table = String::from(match against_oracle {
        true => "| input | tokens | max \\|decode − full forward\\| (logits) | max \\|decode − f64 oracle\\| | tolerance | status |\n|---|---:|---:|---:|---:|---|\n",
        false => "| input | tokens | max \\|decode − full forward\\| (logits) | tolerance | status |\n|---|---:|---:|---:|---|\n",
    });
    let mut all_ok = true;
    let (mut worst_all, mut worst_oracle_all) = (0.0f64, 0.0f64);
    let mut n = 0;
    let mut arithmetic = tier.as_str();
    for (i, (input, tokens)) in opts.inputs.iter().zip(ids).enumerate() {
        if input.kind != InputKind::Multi {
            continue;
        }
        let yardstick = match against_oracle {
            true => bf16_yardstick(i)?,
            false => None,
        };
        let oracle = yardstick.as_ref().map(|y| &y.oracle[..]);
        let (worst, worst_oracle);
        (worst, worst_oracle, arithmetic) =
            with_float!(tier, T => run::<T>(model, tokens, oracle)?);
        let positions = tokens.len().min(decode_limit(model));
        let row = match (tier, against_oracle, &yardstick) {
            (Tier::F64, ..) => (worst, lockstep_verify::tolerance::F64_TOLERANCE, None),
            (Tier::F32, ..) => (
                worst,
                lockstep_verify::tolerance::F32_LOGITS_TOLERANCE,
                None,
            ),
            // Without the reference there is no yardstick: nothing passes.
            (Tier::BF16, true, None) => (worst, f64::NAN, None),
            (Tier::BF16, true, Some(y)) => (worst_oracle, multiple * y.noise, Some(y.noise)),
            (Tier::BF16, false, _) => (worst, 0.0, None),
        };
        let (judged, tol, noise) = row;
        let ok = judged <= tol;
        all_ok &= ok;
        tol_all = tol_all.max(tol);
        worst_all = worst_all.max(worst);
        worst_oracle_all = worst_oracle_all.max(worst_oracle);
        n += 1;
        let status = if ok { "PASS" } else { "**FAIL**" };
        let _ = match (against_oracle, noise) {
            (true, Some(noise)) => writeln!(
                table,
                "| {} | {positions} | {worst:.2e} | {worst_oracle:.2e} | {tol:.2e}: {multiple} × PyTorch bf16's own {noise:.2e} | {status} |",
                input.label
            ),
            (true, None) => writeln!(
                table,
                "| {} | {positions} | {worst:.2e} | - | none: no reference | {status} |",
                input.label
            ),
            (false, _) => writeln!(
                table,
                "| {} | {positions} | {worst:.2e} | {} | {status} |",
                input.label,
                match tier {
                    Tier::BF16 => "0: bit-identical".to_string(),
                    _ => format!("{tol:.0e}"),
                }
            ),
        };
    }
    if n == 0 {
        return Ok(Phase::skip(name, "no multi-token input"));
    }
    let limit = match decode_limit(model) {
        usize::MAX => String::new(),
        l => format!(" (positions below {l}, dynamic RoPE's original length)"),
    };
    let head = format!(
        "each input through the KV cache (chunks of 1, 2, 4, ... tokens, then the last {DECODE_STEPS} positions one token at a time) vs the full forward pass, both in {arithmetic} arithmetic, on {n} sequence(s){limit}: max |Δlogits| {worst_all:.2e}"
    );
    let summary = match (against_oracle, tier) {
        (true, _) => format!(
            "{head}; the AMX prefill sums in another order than a decode step, so the decode is judged as any bf16 run, against the f64 oracle: max |decode − oracle| {worst_oracle_all:.2e} (tolerance {tol_all:.2e}: {multiple} × PyTorch bf16's own distance)"
        ),
        (false, Tier::BF16) => format!("{head} (tolerance 0: bit-identical)"),
        (false, _) => format!("{head} (tolerance {tol_all:.0e})"),
    };
    Ok(if all_ok {
        Phase::pass(name, summary)
    } else {
        Phase::fail(name, summary)
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
) -> HarnessResult<Phase> {
    let mut comps = vec![];
    let mut table = String::from(
        "| input | max \\|bf16w − oracle\\| (logits) | max \\|PyTorch bf16 − oracle\\| | closer by |\n|---|---:|---:|---:|\n",
    );
    let mut worst_factor = f64::INFINITY;
    for (i, (input, tokens)) in opts.inputs.iter().zip(ids).enumerate() {
        let mut ours = trace_forward::<f32>(model, tokens, Some(&input.text))?;
        model.checkpoint.release_pages(); // as in the tier's comparisons
        ours.metadata
            .insert("mode".into(), lockstep_engine::Dtype::Bf16w.name().into());
        // As in the tier's comparisons: written, dropped, then judged a layer at a time from the
        // files (at 7B the long input's trace is ~1.9 GB in f32 and the reference's ~5.8 GB).
        // Nothing else reads it: removed once judged.
        let ours_path = write_and_free(
            ours,
            opts.work_dir.join(format!("ours-{i}-bf16w.safetensors")),
        )?;
        let judged = judge_stored_in_tier(Tier::BF16, &ours_path, &|dt| path(i, dt));
        let _ = std::fs::remove_file(&ours_path);
        let cmp = judged?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::inputs::default_inputs;
    use lockstep_verify::PhaseStatus;

    /// The schedule covers every position once, in order: chunks doubling from one token, then
    /// one-token steps for the last `DECODE_STEPS` (all of a short input).
    #[test]
    fn cache_schedule_covers_every_position_and_ends_in_single_steps() {
        assert!(cache_schedule(0).is_empty());
        assert_eq!(cache_schedule(3), [1, 1, 1]);
        assert_eq!(
            cache_schedule(260)[..8],
            [1, 2, 4, 8, 16, 32, 64, 101],
            "228 positions in doubling chunks, the last cut to fit"
        );
        for len in [1, 21, 31, 32, 33, 40, 260, 1000] {
            let s = cache_schedule(len);
            assert_eq!(s.iter().sum::<usize>(), len, "len {len}");
            let tail = len.min(DECODE_STEPS);
            assert!(
                s[s.len() - tail..].iter().all(|&c| c == 1),
                "len {len}: {s:?}"
            );
            let head = &s[..s.len() - tail];
            for (i, &c) in head.iter().enumerate() {
                assert!(c >= 1 && c <= 1 << i, "len {len}: {s:?}");
            }
        }
    }

    /// KV-cache decode runs in the arithmetic of the tier it is named after (the bf16 phase ran
    /// f32 before), and decoding through the cache gives the full forward pass's logits within
    /// the phase's tolerance, on the default inputs (the long paragraph reaches ~300 positions):
    /// bit-identical in bf16 without AMX (measured: 0.0 on every bf16 fixture).
    #[test]
    #[cfg_attr(
        not(feature = "reference-tests"),
        ignore = "needs the fixtures: bash scripts/test.sh"
    )]
    fn kv_cache_decode_runs_in_the_tier_it_is_named_after() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models");
        for (name, tier) in [
            ("qwen2-gqa-bf16", Tier::BF16),
            ("llama-gqa-bf16", Tier::BF16),
            ("qwen2-default", Tier::F32),
            ("qwen2-default", Tier::F64),
        ] {
            let dir = root.join(name);
            assert!(
                dir.join("config.json").exists(),
                "fixture {} missing; run bash scripts/fixtures.sh",
                dir.display()
            );
            let model = Model::load(&dir).unwrap();
            let tok = lockstep_engine::Tokenizer::from_dir(&dir).unwrap();
            let inputs = default_inputs();
            // The default inputs' ids (folded into small fixtures' vocabularies).
            let vocab = model.config.vocab_size as u32;
            let ids: Vec<Vec<u32>> = inputs
                .iter()
                .map(|i| {
                    let ids = tok.encode(&i.text).unwrap();
                    ids.into_iter().map(|t| t % vocab).collect()
                })
                .collect();
            let opts = VerifyOptions {
                model: dir.clone(),
                tiers: vec![tier],
                inputs,
                fault: None,
                work_dir: std::env::temp_dir(),
                generate_tokens: 0,
            };
            // Without the reference there is no bf16 yardstick: where the AMX kernel serves the
            // prefill (the decode judged against the oracle) only the arithmetic is checked.
            let amx = Kernel::detect() == Kernel::Amx;
            let no_yardstick = |_: usize| -> HarnessResult<Option<Bf16Yardstick>> { Ok(None) };
            let phase = kv_cache_phase(&model, tier, &opts, &ids, &no_yardstick).unwrap();
            eprintln!("{name} [{tier}]: {}", phase.summary);
            assert!(
                phase
                    .summary
                    .contains(&format!("both in {tier} arithmetic")),
                "{}",
                phase.summary
            );
            if amx && tier == Tier::BF16 {
                continue;
            }
            assert_eq!(
                phase.status,
                PhaseStatus::Pass,
                "{name} [{tier}]: {}",
                phase.details.unwrap_or_default()
            );
        }
    }
}
