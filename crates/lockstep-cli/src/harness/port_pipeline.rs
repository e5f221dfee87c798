//! The port pipeline of `lockstep verify --port-trace`: traces written by another port (JAX, C++,
//! ...) against the Python reference run on the same ids in the trace's dtype.

use super::reference::{Reference, TraceJob};
use super::{
    create_work_dir, judge_stored_in_tier, op_level_phase, reference_output, short, show_ids,
    HarnessError, HarnessResult, OpsInput,
};
use lockstep_verify::{restrict, NamedComparison, Phase, PortTrace, Tier, VerifyOutcome};
use std::fmt::Write as _;
use std::path::PathBuf;

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
/// carry a `prompt`), weights (the traces' `model_fingerprint` against the checkpoint), then per
/// tier forward logits, layer-by-layer and attention weights. `producers` in the outcome's phases
/// name the port.
pub fn run_port_verify(
    opts: &PortVerifyOptions,
    reference: &mut dyn Reference,
    progress: &mut dyn FnMut(&str),
) -> HarnessResult<VerifyOutcome> {
    use lockstep_engine::weights::{Checkpoint, StoredDtype};

    create_work_dir(&opts.work_dir)?;
    progress("reading the port's traces");
    let ports = opts
        .traces
        .iter()
        .map(|p| PortTrace::read(p).map_err(HarnessError::from))
        .collect::<Result<Vec<_>, _>>()?;
    for port in &ports {
        if let Some(note) = port.tier_note() {
            progress(&format!("{}: {note}", port.path.display()));
        }
    }
    if ports.is_empty() {
        return Err(HarnessError::input("no port traces given"));
    }
    let config = lockstep_engine::ModelConfig::from_file(&opts.model.join("config.json"))?;
    let checkpoint = Checkpoint::open(&opts.model)?;
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
            return Err(HarnessError::input(format!(
                "{}: token id {bad} is outside the model's vocabulary ({} ids)",
                port.path.display(),
                config.vocab_size
            )));
        }
        if port.tier == Tier::BF16 && !stored_bf16 {
            return Err(HarnessError::input(format!(
                "{} is a bf16 trace, but {} is not stored in bf16: the bf16 tier's oracle must run on the very weights the bf16 run uses; verify against a bf16-stored copy of the checkpoint (examples/jax_qwen2/to_bf16.py writes one) and run the port on it",
                port.path.display(),
                opts.model.display()
            )));
        }
    }

    let mut phases = vec![];
    progress("phase 1: tokenization");
    phases.push(port_tokenization_phase(opts, &ports, reference));
    progress("phase 2: weights");
    phases.push(port_weights_phase(&checkpoint, &ports));

    // Reference traces: the oracle for every trace's ids, and the reference in the trace's dtype
    // (trace folders for a model the reference streams, as in `verify`).
    let folders = super::pyref::streamed(&opts.model, "f64");
    let path = |tokens: &[u32], dt: &str| {
        let mut h: u64 = 0xcbf29ce484222325;
        for t in tokens {
            for b in t.to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x100000001b3);
            }
        }
        let stem = format!("port-{h:016x}-{}-{dt}", tokens.len());
        reference_output(&opts.work_dir, &stem, folders)
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

    let mut producers: Vec<&str> = ports.iter().map(|p| p.producer.as_str()).collect();
    producers.sort_unstable();
    producers.dedup();
    let many = producers.len() > 1;
    let mut full = vec![];
    let mut local = vec![];
    for tier in [Tier::F64, Tier::F32, Tier::BF16] {
        let mine: Vec<&PortTrace> = ports.iter().filter(|p| p.tier == tier).collect();
        if mine.is_empty() {
            continue;
        }
        progress(&format!("comparing the {tier} trace(s)"));
        let mut comps = vec![];
        for port in &mine {
            // Judged a decoder layer at a time from the files: neither the port's trace nor the
            // reference's is ever whole in memory.
            let mut cmp = judge_stored_in_tier(tier, &port.path, &|dt| path(&port.tokens, dt))
                .map_err(|e| match e {
                    HarnessError::Policy(e) => {
                        HarnessError::input(format!("{}: {e}", port.path.display()))
                    }
                    e => e,
                })?;
            if let Some(note) = port.tier_note() {
                cmp.warnings.push(note);
            }
            let label = if many {
                format!("{} ({})", port.label, port.producer)
            } else {
                port.label.clone()
            };
            comps.push(NamedComparison::new(label, cmp));
        }
        let logits_only = super::is_logits_or_tokens;
        let attn_only = super::is_attention_probs_or_tokens;
        let mut logits = Phase::from_comparisons(
            format!("forward logits [{tier}]"),
            comps.iter().map(|c| restrict(c, &logits_only)).collect(),
        );
        for port in &mine {
            if let Some(note) = port.tier_note() {
                logits.summary = format!("{}; {}: {note}", logits.summary, port.label);
            }
        }
        phases.push(logits);
        phases.push(Phase::from_comparisons(
            format!("layer-by-layer [{tier}]"),
            comps.clone(),
        ));
        phases.push(Phase::from_comparisons(
            format!("attention weights [{tier}]"),
            comps.iter().map(|c| restrict(c, &attn_only)).collect(),
        ));
        let inputs = mine
            .iter()
            .zip(&comps)
            .map(|(port, c)| OpsInput {
                label: c.label.clone(),
                test: port.path.clone(),
                end_to_end: Some(c.comparison.clone()),
            })
            .collect();
        let (op_phase, items) = op_level_phase(
            reference,
            &opts.model,
            tier,
            inputs,
            &opts.work_dir,
            "port",
            progress,
        )?;
        phases.push(op_phase);
        if !items.is_empty() {
            local.push((tier, items));
        }
        full.push((tier, comps));
    }
    Ok(VerifyOutcome::new(phases, full).with_local(local))
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
    // GGUF blocks are checked as the float32 values they decode to (a copy of just those).
    let decoded: std::collections::BTreeMap<&String, Vec<u8>> = checkpoint
        .tensors
        .iter()
        .filter(|(_, t)| t.dtype.is_block())
        .map(|(n, t)| (n, t.to_f32_bytes()))
        .collect();
    let stored = checkpoint
        .tensors
        .iter()
        .map(|(n, t)| match decoded.get(n) {
            Some(b) => (n.clone(), "F32", t.shape.clone(), &b[..]),
            None => (n.clone(), t.dtype.name(), t.shape.clone(), t.bytes()),
        });
    if let Ok(ck) = lockstep_verify::port_weights::CheckpointWeights::new(stored) {
        let traces: Vec<(String, &std::collections::BTreeMap<String, String>)> = ports
            .iter()
            .map(|p| (p.path.display().to_string(), &p.metadata))
            .collect();
        if let Some(phase) = lockstep_verify::port_weights::weights_phase(&ck, &traces) {
            return phase;
        }
    }
    let with_fp: Vec<(&PortTrace, &String)> = ports
        .iter()
        .filter_map(|p| p.metadata.get("model_fingerprint").map(|f| (p, f)))
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
