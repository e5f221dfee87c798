//! The `q8dot` phase of `lockstep verify` on a quantized GGUF (f32 tier): lockstep's fast mode
//! (each quantized matmul's input rounded to llama.cpp's 8-bit activation blocks, integer dot
//! products) against the reference's run of the same arithmetic (transformers in float32 with
//! the inputs of the quantized matmuls rounded as llama.cpp rounds them, `q8act.py`) and the f64
//! oracle (exact math on the dequantized weights).
//!
//! Two judgements, both with yardsticks from the reference:
//! - **distance from exact math**, per tensor: `mean|ours − oracle| ≤` [`Q8_NOISE_MULTIPLE`] `×
//!   mean|reference − oracle|` (plus a floor of 64 f32 ulps of the tensor's magnitude, for tensors
//!   both compute almost exactly); logits with each position's mean difference taken out (the
//!   shift softmax ignores), and ours' top-1 agreement with the oracle at most
//!   [`Q8_TOP1_SLACK`] (or one position, when that is more) below the reference's. The *mean*,
//!   not the maximum: once one activation rounds the other way, two faithful 8-bit runs are two
//!   independent draws of the same noise, and the largest of a few hundred draws differs by more
//!   than 2× between draws (measured on SmolLM2 Q4_1, verify's five inputs: by the largest
//!   difference 4 of 5 inputs fail somewhere, e.g. `layers.29.out` on "The"; by the mean every
//!   tensor is within 1.42× the reference's). The table gives KL and top-1 against the oracle for
//!   both sides;
//! - **the mode computes what it claims**, where it can be seen: at the first quantized matmul
//!   (`layers.0.q`, whose input both sides compute in f32 to the same rounding), a position agrees
//!   when `|ours − reference|` is at most [`SAME_ARITHMETIC_SHARE`] of the reference's own 8-bit
//!   error there, `|reference − oracle|`; at least [`MIN_AGREEING_POSITIONS`] of them must. An
//!   activation within an ulp of a rounding tie can round the other way (measured on SmolLM2 Q4_1:
//!   17 positions of 286), and from there on two faithful runs part by the 8-bit noise itself, so
//!   the end-to-end tensors cannot show it; exact f32 math (the mode ignored) agrees nowhere.
//!
//! A non-finite value in ours, or a tensor of the reference's that ours lacks or shapes
//! differently, fails the input.

use super::inputs::Input;
use super::{read_reference_trace, HarnessResult};
use lockstep_engine::trace_capture::trace_forward;
use lockstep_engine::{Dtype, Fault, Model};
use lockstep_trace::{TensorData, Trace};
use lockstep_verify::stats::{logit_stats, LogitStats};
use lockstep_verify::tolerance::F32_FLOOR_EPSILONS;
use lockstep_verify::Phase;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Largest `max|ours − reference| / max|reference − oracle|` at one position of `layers.0.q` for
/// it to agree (f32 summation order gives ~1e-4 of the 8-bit error there: measured 9.5e-7 against
/// 1.6e-2 on SmolLM2 Q4_1).
pub const SAME_ARITHMETIC_SHARE: f64 = 0.01;

/// How many times the reference's mean distance from the oracle ours may be, per tensor (the
/// bf16 tier's multiple, applied to the mean: see the module docs).
pub const Q8_NOISE_MULTIPLE: f64 = 2.0;

/// How far ours' top-1 agreement with the oracle may fall below the reference's (the bf16 tier's
/// slack), or one position where that is more.
pub const Q8_TOP1_SLACK: f64 = 0.02;

/// Fewest positions of `layers.0.q`, as a fraction, that must agree (see the module docs).
pub const MIN_AGREEING_POSITIONS: f64 = 0.5;

/// The first quantized matmul's output, where the same-arithmetic check looks.
const FIRST_MATMUL: &str = "layers.0.q";

/// Per position of `FIRST_MATMUL` (`[1, heads, positions, dim]` or `[1, positions, features]`):
/// whether `|ours − reference| ≤ SAME_ARITHMETIC_SHARE × |reference − oracle|` (max over the
/// position's values; a non-finite value never agrees). `None` without that tensor.
fn agreeing_positions(ours: &Trace, reference: &Trace, oracle: &Trace) -> Option<(usize, usize)> {
    let (a, r, o) = (
        ours.get(FIRST_MATMUL)?,
        reference.get(FIRST_MATMUL)?,
        oracle.get(FIRST_MATMUL)?,
    );
    if a.shape != r.shape || r.shape != o.shape {
        return None;
    }
    let (outer, positions, inner) = match r.shape.as_slice() {
        [1, heads, p, d] => (*heads, *p, *d),
        [1, p, f] => (1, *p, *f),
        _ => return None,
    };
    let (a, r, o) = (a.data.to_f64(), r.data.to_f64(), o.data.to_f64());
    let mut worst = vec![(0.0f64, 0.0f64); positions];
    for h in 0..outer {
        for (p, w) in worst.iter_mut().enumerate() {
            for i in 0..inner {
                let at = (h * positions + p) * inner + i;
                let (d, n) = ((a[at] - r[at]).abs(), (r[at] - o[at]).abs());
                w.0 = if d.is_nan() {
                    f64::INFINITY
                } else {
                    w.0.max(d)
                };
                w.1 = w.1.max(n);
            }
        }
    }
    let agree = worst
        .iter()
        .filter(|(d, n)| *d <= SAME_ARITHMETIC_SHARE * n)
        .count();
    Some((agree, positions))
}

/// The model marked for `q8dot` when its matmuls include block-quantized ones (a GGUF), else
/// `None` (the phase does not apply). Loaded again (the same mapped files) with the same fault.
pub fn q8dot_model(
    loaded: &Model,
    path: &Path,
    fault: Option<Fault>,
) -> HarnessResult<Option<Model>> {
    if !loaded.has_block_matmuls() {
        return Ok(None);
    }
    let mut model = Model::load_with_fault(path, fault)?;
    model.use_dtype(Dtype::Q8dot)?;
    Ok(Some(model))
}

/// Mean |a − b| (NaN when either side holds a non-finite value there).
fn mean_abs(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len().max(1) as f64
}

/// Mean |(a − b) − c| over rows of `width`, `c` being the row's mean of `a − b`: the distance of
/// logits with the shift softmax ignores taken out (a row of logits moved by a constant is the
/// same distribution; an 8-bit run moves whole rows by ~0.3 on SmolLM2 where its KL is no worse).
fn mean_abs_centred(a: &[f64], b: &[f64], width: usize) -> f64 {
    let width = width.max(1);
    let mut sum = 0.0;
    for (ra, rb) in a.chunks(width).zip(b.chunks(width)) {
        let shift = ra.iter().zip(rb).map(|(x, y)| x - y).sum::<f64>() / ra.len() as f64;
        sum += ra
            .iter()
            .zip(rb)
            .map(|(x, y)| (x - y - shift).abs())
            .sum::<f64>();
    }
    sum / a.len().max(1) as f64
}

/// One input's judgement by the module's rules.
struct InputJudgement {
    /// The first failing tensor (forward order) and why, if any.
    failure: Option<(String, String)>,
    /// The tensor whose `mean|ours − oracle| / bound` is largest, with that ratio.
    worst: (String, f64),
    /// Tensors judged.
    judged: usize,
    /// Logit statistics against the oracle: ours, the reference's.
    logits: (Option<LogitStats>, Option<LogitStats>),
}

fn judge_input(ours: &Trace, reference: &Trace, oracle: &Trace) -> InputJudgement {
    let mut j = InputJudgement {
        failure: None,
        worst: (String::new(), 0.0),
        judged: 0,
        logits: (None, None),
    };
    let fail = |name: &str, why: String, j: &mut InputJudgement| {
        if j.failure.is_none() {
            j.failure = Some((name.to_string(), why));
        }
    };
    for name in reference.names() {
        let (Some(r), Some(o)) = (reference.get(name), oracle.get(name)) else {
            continue;
        };
        if matches!(r.data, TensorData::I64(_)) {
            continue;
        }
        let Some(a) = ours
            .get(name)
            .filter(|a| a.shape == r.shape && o.shape == r.shape)
        else {
            fail(
                name,
                "missing from ours, or shaped differently".into(),
                &mut j,
            );
            continue;
        };
        let vocab = r.shape.last().copied().unwrap_or(1);
        let (a, r, o) = (a.data.to_f64(), r.data.to_f64(), o.data.to_f64());
        j.judged += 1;
        if a.iter().any(|v| !v.is_finite()) {
            fail(name, "non-finite values".into(), &mut j);
            continue;
        }
        let magnitude = o.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let floor = F32_FLOOR_EPSILONS * f32::EPSILON as f64 * magnitude;
        let (d_ours, d_ref) = if name == "logits" {
            (
                mean_abs_centred(&a, &o, vocab),
                mean_abs_centred(&r, &o, vocab),
            )
        } else {
            (mean_abs(&a, &o), mean_abs(&r, &o))
        };
        // A non-finite reference or oracle never widens the bound.
        let bound = if d_ref.is_finite() {
            Q8_NOISE_MULTIPLE * d_ref + floor
        } else {
            floor
        };
        let ratio = d_ours / bound;
        if ratio > j.worst.1 {
            j.worst = (name.to_string(), ratio);
        }
        if ratio > 1.0 {
            fail(
                name,
                format!("mean distance from the oracle {d_ours:.2e} > {Q8_NOISE_MULTIPLE} × the reference's {d_ref:.2e} (+ floor {floor:.1e})"),
                &mut j,
            );
        }
        if name == "logits" {
            let (ls_ours, ls_ref) = (logit_stats(&o, &a, vocab), logit_stats(&o, &r, vocab));
            if let (Some(lo), Some(lr)) = (&ls_ours, &ls_ref) {
                let slack = Q8_TOP1_SLACK.max(1.0 / lo.positions.max(1) as f64);
                if lo.top1_agreement < lr.top1_agreement - slack - 1e-12 {
                    fail(
                        name,
                        format!(
                            "top-1 agreement with the oracle {:.3} < the reference's {:.3} − {slack:.3}",
                            lo.top1_agreement, lr.top1_agreement
                        ),
                        &mut j,
                    );
                }
            }
            j.logits = (ls_ours, ls_ref);
        }
    }
    if j.judged == 0 && j.failure.is_none() {
        j.failure = Some(("-".into(), "no tensors to compare".into()));
    }
    j
}

/// Runs lockstep in `q8dot` on every input and judges it (see the module docs); `path(i, dt)` is
/// the reference trace of input `i` in `dt` (`q8dot` and `f64` are read).
pub fn q8dot_phase(
    model: &Model,
    inputs: &[Input],
    ids: &[Vec<u32>],
    path: &dyn Fn(usize, &str) -> PathBuf,
) -> HarnessResult<Phase> {
    const NAME: &str = "q8dot: 8-bit activations, integer dot products [f32, fast mode]";
    let read = read_reference_trace;
    let mut table = String::from(
        "| input | tensors | worst mean distance / bound | KL(oracle‖ours) | top-1 ours | KL(oracle‖PyTorch q8) | top-1 PyTorch q8 | positions of `layers.0.q` agreeing with PyTorch q8 | status |\n|---|---:|---|---:|---:|---:|---:|---:|---|\n",
    );
    let (mut agree_all, mut positions_all) = (0usize, 0usize);
    let mut failures = vec![];
    for (i, (input, tokens)) in inputs.iter().zip(ids).enumerate() {
        let mut ours = trace_forward::<f32>(model, tokens, Some(&input.text))?;
        ours.metadata
            .insert("mode".into(), Dtype::Q8dot.name().into());
        let (reference, oracle) = (read(&path(i, "q8dot"))?, read(&path(i, "f64"))?);
        let j = judge_input(&ours, &reference, &oracle);
        let (agree, positions) = agreeing_positions(&ours, &reference, &oracle).unwrap_or((0, 0));
        agree_all += agree;
        positions_all += positions;
        let kl = |s: &Option<LogitStats>| {
            s.as_ref()
                .map_or("–".into(), |s| format!("{:.2e}", s.kl_mean))
        };
        let top1 = |s: &Option<LogitStats>| {
            s.as_ref()
                .map_or("–".into(), |s| format!("{:.3}", s.top1_agreement))
        };
        let status = match &j.failure {
            None => "PASS".to_string(),
            Some((name, why)) => {
                failures.push(format!("input {}: `{name}`: {why}", input.label));
                format!("**FAIL at `{name}`**: {why}")
            }
        };
        let _ = writeln!(
            table,
            "| {} | {} | {:.2} (`{}`) | {} | {} | {} | {} | {agree}/{positions} | {status} |",
            input.label,
            j.judged,
            j.worst.1,
            j.worst.0,
            kl(&j.logits.0),
            top1(&j.logits.0),
            kl(&j.logits.1),
            top1(&j.logits.1),
        );
    }
    let passed_inputs = inputs.len() - failures.len();
    let share = agree_all as f64 / positions_all.max(1) as f64;
    let same = positions_all > 0 && share >= MIN_AGREEING_POSITIONS;
    let arithmetic = if same {
        format!("llama.cpp's arithmetic: {agree_all}/{positions_all} positions of {FIRST_MATMUL} agree with the reference's q8 run to f32 rounding")
    } else {
        format!(
            "not llama.cpp's arithmetic: only {agree_all}/{positions_all} positions of {FIRST_MATMUL} agree with the reference's q8 run (at least {:.0}% must, each within {SAME_ARITHMETIC_SHARE} × its 8-bit error)",
            MIN_AGREEING_POSITIONS * 100.0
        )
    };
    let distance = format!(
        "{passed_inputs}/{} input(s) within {Q8_NOISE_MULTIPLE} × PyTorch q8's mean distance from exact math on every tensor",
        inputs.len()
    );
    let phase = if same && failures.is_empty() && !inputs.is_empty() {
        Phase::pass(NAME, format!("{distance}; {arithmetic}"))
    } else {
        let first = failures
            .first()
            .map_or(String::new(), |f| format!(" (first: {f})"));
        Phase::fail(NAME, format!("{distance}{first}; {arithmetic}"))
    };
    Ok(phase.with_details(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trace of `logits` `[1, 2, 8]` and `layers.0.out` `[1, 2, 4]` holding `values` (12).
    fn trace(logits: &[f64], hidden: &[f64]) -> Trace {
        let mut t = Trace::new();
        t.insert("tokens", vec![1, 2], TensorData::I64(vec![5, 7]))
            .unwrap();
        t.insert(
            "layers.0.out",
            vec![1, 2, 4],
            TensorData::F64(hidden.to_vec()),
        )
        .unwrap();
        t.insert("logits", vec![1, 2, 8], TensorData::F64(logits.to_vec()))
            .unwrap();
        t
    }

    /// Deterministic noise of amplitude `a` (alternating signs, varying sizes).
    fn noisy(base: &[f64], a: f64, seed: usize) -> Vec<f64> {
        base.iter()
            .enumerate()
            .map(|(i, v)| {
                let k = ((i + seed) * 7919 % 13) as f64 / 13.0 + 0.5;
                v + if (i + seed).is_multiple_of(2) {
                    a * k
                } else {
                    -a * k
                }
            })
            .collect()
    }

    fn oracle() -> Trace {
        let logits: Vec<f64> = (0..16).map(|i| (i as f64 * 0.37).sin() * 4.0).collect();
        let hidden: Vec<f64> = (0..8).map(|i| (i as f64 * 0.9).cos()).collect();
        trace(&logits, &hidden)
    }

    fn noisy_trace(a: f64, seed: usize, shift: f64) -> Trace {
        let o = oracle();
        let logits: Vec<f64> = noisy(&o.get("logits").unwrap().data.to_f64(), a, seed)
            .into_iter()
            .map(|v| v + shift)
            .collect();
        trace(
            &logits,
            &noisy(&o.get("layers.0.out").unwrap().data.to_f64(), a, seed),
        )
    }

    #[test]
    fn same_noise_passes_and_a_shift_of_whole_logit_rows_is_ignored() {
        let (o, r) = (oracle(), noisy_trace(0.01, 0, 0.0));
        let j = judge_input(&noisy_trace(0.012, 3, 0.0), &r, &o);
        assert!(j.failure.is_none(), "{:?}", j.failure);
        assert_eq!(j.judged, 2);
        let shifted = judge_input(&noisy_trace(0.012, 3, 0.5), &r, &o);
        assert!(shifted.failure.is_none(), "{:?}", shifted.failure);
    }

    #[test]
    fn noise_beyond_twice_the_references_fails_at_the_first_tensor() {
        let (o, r) = (oracle(), noisy_trace(0.01, 0, 0.0));
        let j = judge_input(&noisy_trace(0.03, 3, 0.0), &r, &o);
        let (name, why) = j.failure.expect("3x the noise must fail");
        assert_eq!(name, "layers.0.out", "{why}");
        assert!(why.contains("> 2 × the reference's"), "{why}");
    }

    #[test]
    fn non_finite_and_missing_tensors_fail() {
        let (o, r) = (oracle(), noisy_trace(0.01, 0, 0.0));
        let mut nan = noisy_trace(0.01, 3, 0.0)
            .get("logits")
            .unwrap()
            .data
            .to_f64();
        nan[5] = f64::NAN;
        let ours = trace(&nan, &o.get("layers.0.out").unwrap().data.to_f64());
        let j = judge_input(&ours, &r, &o);
        assert_eq!(
            j.failure.unwrap(),
            ("logits".into(), "non-finite values".into())
        );
        let mut missing = Trace::new();
        missing
            .insert("tokens", vec![1, 2], TensorData::I64(vec![5, 7]))
            .unwrap();
        let j = judge_input(&missing, &r, &o);
        assert_eq!(j.failure.unwrap().0, "layers.0.out");
    }
}
