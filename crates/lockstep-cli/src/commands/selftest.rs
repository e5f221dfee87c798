//! `lockstep selftest`: inject every fault into the engine, in every precision tier, and show that
//! the verifier detects each and names the op where it enters — or says, from the op-level
//! statistics, that the fault is invisible at that precision.
//!
//! Per tier the reference runs once (its traces are cached), the engine runs once per fault, and
//! one op-level reference run recomputes every op of every faulted trace on its own inputs. The f64
//! tier uses the default inputs' sequences (up to ~300 tokens, so a fault beyond position 256
//! shows); f32 and bf16 use one sentence of at most 16 tokens, where only op-level judgement can
//! see the upcast mistakes. bf16 runs on a bf16-stored copy of the model (its oracle must run on the
//! very weights bf16 uses).

use super::verify::open_session;
use crate::cli_error::{CliError, CliResult};
use crate::harness::inputs::{default_inputs, InputKind};
use crate::harness::pyref::PythonReference;
use crate::harness::reference::{Reference, TraceJob};
use crate::harness::{judge_in_tier, judge_ops, read_reference_trace, OpsInput};
use lockstep_engine::resources::config_of;
use lockstep_engine::source::ModelSource;
use lockstep_engine::trace_capture::trace_forward;
use lockstep_engine::{with_float, Fault, Model};
use lockstep_trace::{forward_rank, Trace};
use lockstep_verify::local::NamedLocal;
use lockstep_verify::{Tier, TraceComparison};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `selftest`.
#[derive(clap::Args)]
pub struct Args {
    /// Model folder (default: the built-in default model). Must be an untied GQA Qwen2 model
    /// for every fault to be observable.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Run only these faults (comma-separated names, e.g. `--faults qk-norm-skipped,window-off-by-one`);
    /// each must apply to the model. Default: every fault that applies.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(Fault))]
    faults: Vec<Fault>,
}

/// The f32/bf16 input: one sentence, cut to at most [`SHORT_MAX_TOKENS`] tokens.
const SHORT_TEXT: &str = "The quick brown fox jumps over the lazy dog, and 12 of";

/// The most tokens of the f32/bf16 input (the bound: upcast mistakes must be visible on
/// short inputs, where accumulated noise is small).
const SHORT_MAX_TOKENS: usize = 16;

/// One row of a tier's table.
struct Row {
    fault: Fault,
    /// Where the fault enters on this model ([`Fault::enters_at_in`]).
    entry: String,
    /// Whether the first divergence is a tap where the fault is made ([`Fault::is_made_at`]).
    made_at_first: bool,
    detected: bool,
    first: Option<String>,
    visible: bool,
}

impl Row {
    fn localized(&self) -> bool {
        self.made_at_first
    }
}

/// The engine's trace of `tokens` in `tier`.
fn engine_trace(model: &Model, tier: Tier, tokens: &[u32]) -> CliResult<Trace> {
    Ok(with_float!(tier, T => trace_forward::<T>(model, tokens, None))?)
}

/// Runs one tier: the clean engine and every fault, judged end to end and op by op.
fn run_tier(
    tier: Tier,
    model_dir: &Path,
    texts: &[String],
    reference: &mut PythonReference,
    work: &Path,
    only: &[Fault],
) -> CliResult<(bool, Vec<Row>)> {
    let mut ids = reference.tokenize(model_dir, texts)?;
    if tier != Tier::F64 {
        for v in &mut ids {
            v.truncate(SHORT_MAX_TOKENS);
        }
    }
    let dir = work.join(format!("selftest-{tier}"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::input(format!("cannot create {}: {e}", dir.display())))?;
    let ref_path = |i: usize, dt: &str| dir.join(format!("ref-{i}-{dt}.safetensors"));
    let mut jobs = vec![];
    for (i, t) in ids.iter().enumerate() {
        for dt in ["f64", tier.as_str()] {
            if jobs.iter().any(|j: &TraceJob| j.out == ref_path(i, dt)) {
                continue;
            }
            jobs.push(TraceJob {
                model: model_dir.to_path_buf(),
                tokens: t.clone(),
                dtype: dt.into(),
                out: ref_path(i, dt),
            });
        }
    }
    let steps = crate::progress::Steps::quiet();
    steps.step(&format!(
        "selftest [{tier}]: {} reference trace(s) (transformers)",
        jobs.len()
    ));
    reference.traces(&jobs)?;

    // The config as the engine reads it (a folder or a GGUF file; no weights loaded); faults
    // that cannot change this model (a window off by one without a window, a RoPE-scaling fault without that
    // scaling) are left out.
    let config = config_of(&ModelSource::resolve(model_dir)?)?;
    let variants: Vec<Option<Fault>> = std::iter::once(None)
        .chain(
            Fault::ALL
                .iter()
                .copied()
                .filter(|f| f.applies_to(&config) && (only.is_empty() || only.contains(f)))
                .map(Some),
        )
        .collect();
    let mut e2e: Vec<Vec<TraceComparison>> = vec![];
    let mut ops_inputs = vec![];
    for (v, fault) in variants.iter().enumerate() {
        steps.step(&format!(
            "selftest [{tier}]: engine with fault {} ({}/{})",
            fault.map_or("none", |f| f.name()),
            v + 1,
            variants.len()
        ));
        let model = Model::load_with_fault(model_dir, *fault)?;
        let mut cmps = vec![];
        for (i, t) in ids.iter().enumerate() {
            let ours = engine_trace(&model, tier, t)?;
            let cmp = judge_in_tier(tier, &ours, &|dt| read_reference_trace(&ref_path(i, dt)))?;
            let p = dir.join(format!("ours-{v}-{i}.safetensors"));
            ours.write(&p)
                .map_err(|e| CliError::input(format!("cannot write {}: {e}", p.display())))?;
            ops_inputs.push(OpsInput {
                label: format!("{}#{i}", fault.map_or("none", |f| f.name())),
                test: p,
                end_to_end: None,
            });
            cmps.push(cmp);
        }
        e2e.push(cmps);
    }
    eprintln!(
        "selftest [{tier}]: op-level reference on {} traces",
        ops_inputs.len()
    );
    steps.step(&format!("selftest [{tier}]: op-level judgement"));
    let local = judge_ops(reference, model_dir, tier, ops_inputs, &dir, "selftest")?;
    drop(steps);
    let per: Vec<&[NamedLocal]> = local.chunks(ids.len()).collect();

    let clean_ok = e2e[0].iter().all(|c| c.passed) && per[0].iter().all(|l| l.local.passed);
    if !clean_ok {
        let why = per[0]
            .iter()
            .find(|l| !l.local.passed)
            .map(|l| l.local.verdict())
            .or_else(|| {
                e2e[0]
                    .iter()
                    .find(|c| !c.passed)
                    .map(|c| c.verdict().to_string())
            })
            .unwrap_or_default();
        eprintln!("selftest [{tier}]: the engine without faults does not pass: {why}");
    }
    let rows = variants
        .iter()
        .enumerate()
        .skip(1)
        .map(|(v, fault)| {
            let made = per[v]
                .iter()
                .filter_map(|l| l.local.first_divergence.clone())
                .min_by_key(|n| forward_rank(n));
            let e2e_first = e2e[v]
                .iter()
                .filter_map(|c| c.first_divergence.clone())
                .min_by_key(|n| forward_rank(n));
            let fault = fault.expect("faults after the clean run");
            let first = made.clone().or(e2e_first);
            Row {
                fault,
                entry: fault.enters_at_in(&config),
                made_at_first: first
                    .as_deref()
                    .is_some_and(|t| fault.is_made_at(t, &config)),
                detected: made.is_some() || e2e[v].iter().any(|c| !c.passed),
                visible: made.is_some(),
                first,
            }
        })
        .collect();
    Ok((clean_ok, rows))
}

/// Runs every fault in every tier and prints one table per tier; exit 0 when the clean engine
/// passes every tier, every fault is detected and localized in f64, and in f32 and bf16 every
/// fault the op-level statistics call visible is localized at its entry tensor.
pub fn run(a: Args) -> CliResult<ExitCode> {
    let (model, work, mut reference) = open_session(a.model.as_deref())?;
    if !a.faults.is_empty() {
        let config = config_of(&ModelSource::resolve(&model)?)?;
        if let Some(f) = a.faults.iter().find(|f| !f.applies_to(&config)) {
            return Err(CliError::input(format!(
                "--faults: {f} cannot change this model ({}), so selftest cannot show it",
                model.display()
            )));
        }
    }
    let bf16_model = work.join("selftest-bf16-model");
    reference.bf16_copy(&model, &bf16_model)?;
    let long: Vec<String> = default_inputs()
        .into_iter()
        .filter(|i| i.kind == InputKind::Multi)
        .map(|i| i.text)
        .collect();
    let short = vec![SHORT_TEXT.to_string()];
    let mut all_ok = true;
    let mut counts = vec![];
    for (tier, dir, texts) in [
        (Tier::F64, &model, &long),
        (Tier::F32, &model, &short),
        (Tier::BF16, &bf16_model, &short),
    ] {
        let (clean_ok, rows) = run_tier(tier, dir, texts, &mut reference, &work, &a.faults)?;
        all_ok &= clean_ok;
        println!(
            "\n### {tier} ({})\n",
            if tier == Tier::F64 {
                "the default sequences, up to ~300 tokens".to_string()
            } else {
                format!("one sentence, at most {SHORT_MAX_TOKENS} tokens")
            }
        );
        println!("| fault | detected | first divergence | enters at | localized |");
        println!("|---|---|---|---|---|");
        let (mut visible, mut localized) = (0, 0);
        for r in &rows {
            let ok = if tier == Tier::F64 {
                r.detected && r.localized()
            } else {
                !r.visible || r.localized()
            };
            all_ok &= ok;
            visible += r.visible as usize;
            localized += (r.visible && r.localized()) as usize;
            let where_ = if r.visible || tier == Tier::F64 {
                if r.localized() {
                    "yes"
                } else {
                    "NO"
                }
            } else {
                "invisible at this precision"
            };
            println!(
                "| {} | {} | {} | {} | {where_} |",
                r.fault,
                if r.detected { "yes" } else { "no" },
                r.first.as_deref().unwrap_or("-"),
                r.entry,
            );
        }
        for f in Fault::ALL {
            if rows.iter().any(|r| r.fault == f) {
                continue;
            }
            if a.faults.is_empty() {
                println!("| {f} | - | - | - | not applicable to this model |");
            } else {
                println!("| {f} | - | - | - | not run (--faults) |");
            }
        }
        println!(
            "\n{tier}: clean engine {}; {visible}/{} faults visible to the op-level statistics, {localized} of them localized at their entry tensor",
            if clean_ok { "passes" } else { "FAILS" },
            rows.len()
        );
        counts.push(format!("{tier} {localized}/{visible} visible localized"));
    }
    println!(
        "\n{}",
        if all_ok {
            format!(
                "selftest: every visible fault detected and localized ({})",
                counts.join(", ")
            )
        } else {
            "selftest: FAILED".to_string()
        }
    );
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
