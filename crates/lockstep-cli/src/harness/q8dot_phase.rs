//! The `q8dot` phase of `lockstep verify` on a quantized GGUF (f32 tier): lockstep's fast mode
//! (each quantized matmul's input rounded to llama.cpp's 8-bit activation blocks, integer dot
//! products) against the reference's run of the same arithmetic (transformers in float32 with
//! the inputs of the quantized matmuls rounded as llama.cpp rounds them, `q8act.py`) and the f64
//! oracle (exact math on the dequantized weights).
//!
//! Two judgements, both with yardsticks from the reference:
//! - **distance from exact math**: every tensor by the oracle-relative rule of the bf16 tier,
//!   `|ours − oracle| ≤ 2 × |reference − oracle|` (top-1 agreement with the oracle at most 2 points
//!   below the reference's); the table gives KL and top-1 against the oracle for both sides;
//! - **the mode computes what it claims**: on the logits, `|ours − reference|` must be at most
//!   [`SAME_ARITHMETIC_SHARE`] of `|reference − oracle|`. Exact f32 math (the flag ignored) sits
//!   as far from the reference as the oracle does, and fails it.

use super::inputs::Input;
use super::{read_reference_trace, HarnessResult};
use lockstep_engine::trace_capture::trace_forward;
use lockstep_engine::{Dtype, Fault, Model};
use lockstep_verify::{judge, NamedComparison, Phase, PhaseStatus, Tier};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Largest `max|ours − reference| / max|reference − oracle|` on the logits: the share of the
/// 8-bit rounding's own error that summation order and the odd activation rounded the other way
/// (a one-ulp difference before rounding) may account for.
pub const SAME_ARITHMETIC_SHARE: f64 = 0.5;

/// The model marked for `q8dot` when its checkpoint has block-quantized matrices (a GGUF), else
/// `None` (the phase does not apply). Loaded again (the same mapped files) with the same fault.
pub fn q8dot_model(
    loaded: &Model,
    path: &Path,
    fault: Option<Fault>,
) -> HarnessResult<Option<Model>> {
    if !loaded
        .checkpoint
        .tensors
        .values()
        .any(|t| t.dtype.is_block())
    {
        return Ok(None);
    }
    let mut model = Model::load_with_fault(path, fault)?;
    model.use_dtype(Dtype::Q8dot)?;
    Ok(Some(model))
}

/// Runs lockstep in `q8dot` on every input and judges it (see the module docs); `path(i, dt)` is
/// the reference trace of input `i` in `dt` (`q8dot` and `f64` are read).
pub fn q8dot_phase(
    model: &Model,
    inputs: &[Input],
    ids: &[Vec<u32>],
    path: &dyn Fn(usize, &str) -> PathBuf,
) -> HarnessResult<Phase> {
    let read = read_reference_trace;
    let mut comps = vec![];
    let mut table = String::from(
        "| input | KL(oracle‖ours) | top-1 ours | KL(oracle‖PyTorch q8) | top-1 PyTorch q8 | max \\|ours − PyTorch q8\\| | max \\|PyTorch q8 − oracle\\| | share | status |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    let mut worst_share = 0.0f64;
    let mut all_same = true;
    for (i, (input, tokens)) in inputs.iter().zip(ids).enumerate() {
        let mut ours = trace_forward::<f32>(model, tokens, Some(&input.text))?;
        ours.metadata
            .insert("mode".into(), Dtype::Q8dot.name().into());
        let (reference, oracle) = (read(&path(i, "q8dot"))?, read(&path(i, "f64"))?);
        let cmp = judge(&reference, &ours, Some(&oracle), Tier::BF16)?;
        if let Some(l) = cmp.get("logits") {
            let (Some(d), Some(n)) = (&l.stats, &l.ref_vs_oracle) else {
                continue;
            };
            // NaN shares (a non-finite side) never pass.
            let share = d.max_abs / n.max_abs.max(f64::MIN_POSITIVE);
            let same = share <= SAME_ARITHMETIC_SHARE;
            all_same &= same;
            worst_share = if share.is_nan() {
                f64::NAN
            } else {
                worst_share.max(share)
            };
            let kl = |s: &Option<lockstep_verify::stats::LogitStats>| {
                s.as_ref()
                    .map_or("–".into(), |s| format!("{:.2e}", s.kl_mean))
            };
            let top1 = |s: &Option<lockstep_verify::stats::LogitStats>| {
                s.as_ref()
                    .map_or("–".into(), |s| format!("{:.3}", s.top1_agreement))
            };
            let _ = writeln!(
                table,
                "| {} | {} | {} | {} | {} | {:.2e} | {:.2e} | {share:.3} | {} |",
                input.label,
                kl(&l.test_vs_oracle_logits),
                top1(&l.test_vs_oracle_logits),
                kl(&l.ref_vs_oracle_logits),
                top1(&l.ref_vs_oracle_logits),
                d.max_abs,
                n.max_abs,
                if same { "PASS" } else { "**FAIL**" }
            );
        }
        comps.push(NamedComparison::new(input.label.clone(), cmp));
    }
    let mut phase = Phase::from_comparisons(
        "q8dot: 8-bit activations, integer dot products [f32, fast mode]",
        comps,
    );
    phase.summary = if all_same {
        format!(
            "{}; the same arithmetic as the reference's q8 run: max |ours − PyTorch q8| ≤ {worst_share:.3} × max |PyTorch q8 − oracle| (at most {SAME_ARITHMETIC_SHARE})",
            phase.summary
        )
    } else {
        phase.status = PhaseStatus::Fail;
        format!(
            "not llama.cpp's arithmetic: max |ours − PyTorch q8| is {worst_share:.3} × max |PyTorch q8 − oracle| (at most {SAME_ARITHMETIC_SHARE}); distance from exact math: {}",
            phase.summary
        )
    };
    Ok(phase.with_details(table))
}
