//! Op-level judgement ("teacher forcing"): every traced op judged on the test side's own inputs.
//!
//! End-to-end comparison judges a tensor after all the rounding accumulated before it, so a
//! mistake smaller than that noise (a softmax or an RMSNorm variance computed in bf16, RoPE
//! frequencies rounded to bf16) passes, or shows several ops after it entered. Here each op of the
//! test trace is recomputed from the test's *own* copies of that op's inputs, twice, by the
//! reference (`python -m lockstep_reference ops-batch`):
//!
//! - the **exact** op: transformers' modules in pure float64 on those inputs;
//! - the **reference** op: transformers' modules in the tier's dtype on those inputs (its own
//!   kernels' rounding; absent in the f64 tier, where the reference is the exact op).
//!
//! The test's *local error* is `test − exact`; the reference's is `reference − exact`. An op is
//! fine when the test's local error has the size and the kind of the reference's own (statistics
//! in [`LocalStats`], rule in [`LocalRule`]; docs/numerics.md has the calibration). The first op
//! that is not is where a difference is *made*; every tensor after it may only *inherit* it.
//!
//! The yardstick comes only from the reference: the exact op and the reference's rounding of it.

use lockstep_trace::{LayerTap, TapName, TensorData, Trace, TraceError, TraceStore};
use rayon::prelude::*;
use serde::Serialize;
use std::borrow::Cow;
use std::fmt::Write as _;

use crate::compare::{likely_cause, TraceComparison};
use crate::tolerance::Tier;

/// Significand bits (with the implicit one) of a tier's dtype: a value `x` has an ulp of
/// `2^(floor(log2 |x|) − (P − 1))`.
pub fn significand_bits(tier: Tier) -> i32 {
    match tier {
        Tier::F64 => 53,
        Tier::F32 => 24,
        Tier::BF16 => 8,
    }
}

/// The statistics of one side's local error on one op, in units of the tier's ulp.
///
/// Each element's error is measured in ulps of `max(|exact|, rms(row)/16)`, a row being the last
/// dimension: ulps of the value itself, floored so that elements which are near zero only through
/// cancellation (a dot product of many larger terms) are measured against their row's scale.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalStats {
    /// Elements compared.
    pub elements: usize,
    /// Root mean square of the per-element error in ulps: the error's size.
    pub rms_ulps: f64,
    /// Largest per-element error in ulps: the error's tail.
    pub max_ulps: f64,
    /// Multi-dimensional index of the largest error.
    pub max_position: Vec<usize>,
    /// Mean over rows of `|mean(e / x)|` over the row's elements with `|x| ≥ rms(row)/16`, in ulps
    /// of 1: the error's systematic part, a relative scale error shared by the row. Rounding is
    /// unbiased and averages out over a row; a statistic computed at a lower precision (an RMSNorm
    /// variance in bf16) scales a whole row and does not. Every element weighs the same, so a row
    /// dominated by one outlier channel still averages over all of its elements.
    pub bias_ulps: f64,
    /// Largest absolute error.
    pub max_abs: f64,
    /// Elements where the side is not finite (never judged equal to anything).
    pub nonfinite: usize,
}

/// Computes [`LocalStats`] of `side` against `exact` (same length, row-major, rows of `row`).
///
/// The side is read in its own stored type (`f64`, `f32`, `bf16`, `f16`), each value widened to
/// `f64` exactly as it is used: a 7B trace's ops are ~470M values a side, and a widened copy of
/// each op was a third of judging them.
pub fn local_stats<S: Copy + Into<f64>>(
    exact: &[f64],
    side: &[S],
    shape: &[usize],
    tier: Tier,
) -> LocalStats {
    let p = significand_bits(tier);
    let row = shape.last().copied().unwrap_or(1).max(1);
    let n = exact.len().min(side.len());
    let (mut sum_sq, mut max_ulps, mut max_i, mut max_abs) = (0.0f64, 0.0f64, 0usize, 0.0f64);
    let (mut bias_sum, mut rows, mut nonfinite) = (0.0f64, 0usize, 0usize);
    let tiny = 2f64.powi(-1022);
    for start in (0..n).step_by(row) {
        let end = (start + row).min(n);
        let xs = &exact[start..end];
        let rms = (xs.iter().map(|x| x * x).sum::<f64>() / xs.len() as f64).sqrt();
        let (mut rel_sum, mut rel_n) = (0.0f64, 0usize);
        for i in start..end {
            let (x, s) = (exact[i], side[i].into());
            if !x.is_finite() || !s.is_finite() {
                nonfinite += 1;
                continue;
            }
            let e = s - x;
            let scale = x.abs().max(rms / 16.0).max(tiny);
            let u = e.abs() / ulp_at(scale, p);
            sum_sq += u * u;
            if u > max_ulps {
                max_ulps = u;
                max_i = i;
            }
            max_abs = max_abs.max(e.abs());
            if x != 0.0 && x.abs() >= rms / 16.0 {
                rel_sum += e / x;
                rel_n += 1;
            }
        }
        if rel_n > 0 {
            bias_sum += (rel_sum / rel_n as f64).abs() / 2f64.powi(1 - p);
            rows += 1;
        }
    }
    LocalStats {
        elements: n,
        rms_ulps: if n > 0 {
            (sum_sq / n as f64).sqrt()
        } else {
            0.0
        },
        max_ulps,
        max_position: crate::stats::unravel(max_i, shape),
        bias_ulps: if rows > 0 {
            bias_sum / rows as f64
        } else {
            0.0
        },
        max_abs,
        nonfinite,
    }
}

/// The ulp `2^(floor(log2 scale) − (p − 1))` of a value of magnitude `scale` (positive, at least
/// the smallest normal `f64`) with `p` significand bits, from `scale`'s exponent bits: exact,
/// where `log2` rounds a value just below a power of two up to it (and costs ~20 times as much).
/// Infinite for an infinite `scale`.
pub fn ulp_at(scale: f64, p: i32) -> f64 {
    if !scale.is_finite() {
        return f64::INFINITY;
    }
    let k = ((scale.to_bits() >> 52) & 0x7ff) as i32 - 1023 - (p - 1);
    match k {
        -1022.. => f64::from_bits(((k + 1023) as u64) << 52),
        // Below the normal range: a subnormal power of two.
        -1074..=-1023 => f64::from_bits(1u64 << (k + 1074)),
        _ => 0.0,
    }
}

/// The rule an op's local error is judged by, per tier. `k` factors multiply the reference's own
/// statistic, `floor`s are added to it (in ulps); calibrated in docs/numerics.md.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LocalRule {
    /// The test's RMS error may be at most `k_rms ×` the reference's, plus `floor_rms`.
    pub k_rms: f64,
    /// Floor of the RMS rule, in ulps.
    pub floor_rms: f64,
    /// The test's largest error may be at most `k_max ×` the reference's, plus `floor_max`.
    pub k_max: f64,
    /// Floor of the max rule, in ulps.
    pub floor_max: f64,
    /// The test's row bias may be at most `k_bias ×` the reference's, plus `floor_bias`.
    pub k_bias: f64,
    /// Floor of the bias rule, in ulps.
    pub floor_bias: f64,
    /// f64 tier only: the largest error may be at most this times `max(1, max|exact|)` (the f64
    /// tier's end-to-end bound: above it, a difference is a bug, never rounding).
    pub f64_rel: f64,
}

impl LocalRule {
    /// The rule of a tier.
    ///
    /// bf16: a careful bf16 implementation rounds where transformers does, so its local error is
    /// the reference's to the bit (measured: lockstep's engine, the JAX example and PyTorch's own
    /// bf16 trace all have ratio 1.00 on every op); the factors leave room for an implementation
    /// that rounds differently but no worse, and are below what the upcast mistakes give at their
    /// entry op (softmax in bf16: RMS 1.9×, max 2.3×; RMSNorm variance in bf16: bias 3.3×).
    /// f32: accumulation orders differ between careful kernels (measured: lockstep against PyTorch
    /// up to 2.2× on RMSNorm's RMS; the JAX example's XLA dots against PyTorch's up to 3.4× RMS and
    /// 6.9× max on a one-token q/k); the upcast mistakes are RMS 51-10⁵ ulp against ~1.
    pub fn for_tier(tier: Tier) -> Self {
        match tier {
            Tier::BF16 => LocalRule {
                k_rms: 1.25,
                floor_rms: 0.05,
                k_max: 1.5,
                floor_max: 0.5,
                k_bias: 2.0,
                floor_bias: 1.0 / 32.0,
                f64_rel: 0.0,
            },
            Tier::F32 => LocalRule {
                k_rms: 6.0,
                floor_rms: 1.0,
                k_max: 8.0,
                floor_max: 4.0,
                k_bias: 4.0,
                // One rounding of a row's normalizing factor (`1/sqrt`: up to ~1 ulp) is no
                // mistake; with one dominant channel (SmolLM2's 22,568 at index 507) every row's
                // factor is about the same number and the reference's own bias can be ~0 by luck.
                floor_bias: 1.0,
                f64_rel: 0.0,
            },
            Tier::F64 => LocalRule {
                k_rms: 0.0,
                floor_rms: 0.0,
                k_max: 0.0,
                floor_max: 0.0,
                k_bias: 0.0,
                floor_bias: 0.0,
                f64_rel: crate::tolerance::F64_TOLERANCE,
            },
        }
    }
}

/// The verdict on one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpStatus {
    /// The test's local error is of the reference's size and kind.
    Pass,
    /// It is not: the difference is made at this op.
    Fail,
    /// Non-finite values on the test side, in the reference's op or in the exact op.
    NonFinite,
    /// The op's output is missing from the test trace, or its shape differs from the exact op's.
    Missing,
    /// The test trace lacks the op's inputs, so the op could not be recomputed.
    Unjudged,
}

impl OpStatus {
    /// True for every status that means the op does not compute what the reference does.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            OpStatus::Fail | OpStatus::NonFinite | OpStatus::Missing
        )
    }

    /// Upper-case label for reports.
    pub fn label(self) -> &'static str {
        match self {
            OpStatus::Pass => "PASS",
            OpStatus::Fail => "FAIL",
            OpStatus::NonFinite => "NON-FINITE",
            OpStatus::Missing => "MISSING",
            OpStatus::Unjudged => "UNJUDGED",
        }
    }
}

/// One op judged on its own inputs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpJudgement {
    /// Trace name of the op's output.
    pub name: String,
    /// The verdict.
    pub status: OpStatus,
    /// The test's local error.
    pub test: Option<LocalStats>,
    /// The reference's local error (None in the f64 tier, where the reference is the exact op).
    pub reference: Option<LocalStats>,
    /// Largest ratio of a test statistic to its allowance (≤ 1 passes).
    pub ratio: f64,
    /// Which statistics exceeded their allowance, in words.
    pub reasons: Vec<String>,
}

/// Every op of one test trace judged on its own inputs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalComparison {
    /// The tier (decides the dtype whose ulps measure errors, and the rule).
    pub tier: Tier,
    /// The rule applied.
    pub rule: LocalRule,
    /// Ops in forward order.
    pub ops: Vec<OpJudgement>,
    /// The first op whose local error is not the reference's kind: where a difference is made.
    pub first_divergence: Option<String>,
    /// No op failed and at least one was judged.
    pub passed: bool,
}

/// The exact op's shape and values as `f64` (borrowed when stored in `f64`, as the reference
/// writes them).
fn exact_values<'a>(t: &'a Trace, name: &str) -> Option<(&'a [usize], Cow<'a, [f64]>)> {
    t.get(name).map(|x| {
        let v = match &x.data {
            TensorData::F64(v) => Cow::Borrowed(&v[..]),
            other => Cow::Owned(other.to_f64()),
        };
        (&x.shape[..], v)
    })
}

/// [`local_stats`] of a side's tensor, read in its stored type.
fn side_stats(exact: &[f64], side: &TensorData, shape: &[usize], tier: Tier) -> LocalStats {
    match side {
        TensorData::F64(v) => local_stats(exact, v, shape, tier),
        TensorData::F32(v) => local_stats(exact, v, shape, tier),
        TensorData::BF16(v) => local_stats(exact, v, shape, tier),
        TensorData::F16(v) => local_stats(exact, v, shape, tier),
        TensorData::I64(_) => local_stats(exact, &side.to_f64(), shape, tier),
    }
}

/// Judges every op of `test` on its own inputs. `exact` holds the pure-f64 ops recomputed on the
/// test's inputs, `reference` the reference's ops in the tier's dtype (required unless the tier is
/// f64). Ops are those of `exact`, in its order (`tokens` is input, not an op).
pub fn judge_local(
    test: &Trace,
    reference: Option<&Trace>,
    exact: &Trace,
    tier: Tier,
) -> LocalComparison {
    let rule = LocalRule::for_tier(tier);
    // Ops are independent: judged on every core, kept in the exact trace's order.
    let ops: Vec<OpJudgement> = exact
        .names()
        .into_par_iter()
        .filter(|name| *name != "tokens")
        .map(|name| judge_op(name, test, reference, exact, tier, &rule))
        .collect();
    LocalComparison::from_ops(tier, ops)
}

/// Which trace of an op-level judgement on disk could not be read ([`judge_local_stored`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalSide {
    /// The test trace.
    Test,
    /// The reference's ops in the tier's dtype.
    Reference,
    /// The exact (pure-f64) ops.
    Exact,
}

/// [`judge_local`] of traces on disk, one part of them in memory at a time (the tensors before the
/// layers, each decoder layer's, those after: [`lockstep_trace::Part`]), with the same judgements in the same
/// order. At the 7B shape a 260-token input's three traces are 7.6 GB decoded; a layer's ~0.2 GB.
pub fn judge_local_stored(
    test: &TraceStore,
    reference: Option<&TraceStore>,
    exact: &TraceStore,
    tier: Tier,
) -> Result<LocalComparison, (LocalSide, TraceError)> {
    let mut ops = vec![];
    for part in exact.parts() {
        let x = exact.load_part(part).map_err(|e| (LocalSide::Exact, e))?;
        let names = x.names();
        let t = test.load(&names).map_err(|e| (LocalSide::Test, e))?;
        let r = reference
            .map(|r| r.load(&names))
            .transpose()
            .map_err(|e| (LocalSide::Reference, e))?;
        ops.extend(judge_local(&t, r.as_ref(), &x, tier).ops);
    }
    Ok(LocalComparison::from_ops(tier, ops))
}

impl LocalComparison {
    /// The comparison of these judged ops (in forward order): the first failure is the first
    /// divergence; it passes when nothing failed and at least one op passed.
    fn from_ops(tier: Tier, ops: Vec<OpJudgement>) -> LocalComparison {
        let first_divergence = ops
            .iter()
            .find(|o| o.status.is_failure())
            .map(|o| o.name.clone());
        let passed = first_divergence.is_none() && ops.iter().any(|o| o.status == OpStatus::Pass);
        LocalComparison {
            tier,
            rule: LocalRule::for_tier(tier),
            ops,
            first_divergence,
            passed,
        }
    }
}

fn judge_op(
    name: &str,
    test: &Trace,
    reference: Option<&Trace>,
    exact: &Trace,
    tier: Tier,
    rule: &LocalRule,
) -> OpJudgement {
    let mut j = OpJudgement {
        name: name.to_string(),
        status: OpStatus::Unjudged,
        test: None,
        reference: None,
        ratio: 0.0,
        reasons: vec![],
    };
    let Some((shape, x)) = exact_values(exact, name) else {
        return j;
    };
    let Some(t) = test.get(name) else {
        j.status = OpStatus::Missing;
        j.reasons.push("absent from the test trace".into());
        return j;
    };
    if t.shape != shape {
        j.status = OpStatus::Missing;
        j.reasons
            .push(format!("test shape {:?}, the op gives {shape:?}", t.shape));
        return j;
    }
    let ts = side_stats(&x, &t.data, shape, tier);
    let exact_bad = x.iter().filter(|v| !v.is_finite()).count();
    let rs = match (tier, reference) {
        (Tier::F64, _) => None,
        (_, Some(r)) => match r.get(name) {
            Some(rt) if rt.shape == shape => Some(side_stats(&x, &rt.data, shape, tier)),
            _ => {
                j.reasons
                    .push("the reference's op is missing: cannot judge".into());
                j.test = Some(ts);
                return j;
            }
        },
        (_, None) => {
            j.reasons
                .push("no reference op trace for this tier: cannot judge".into());
            j.test = Some(ts);
            return j;
        }
    };
    if ts.nonfinite > 0 || exact_bad > 0 || rs.as_ref().is_some_and(|r| r.nonfinite > 0) {
        j.status = OpStatus::NonFinite;
        j.reasons.push(format!(
            "non-finite values: {} in the test, {exact_bad} in the exact op, {} in the reference's op",
            ts.nonfinite,
            rs.as_ref().map_or(0, |r| r.nonfinite)
        ));
        j.ratio = f64::INFINITY;
        j.test = Some(ts);
        j.reference = rs;
        return j;
    }
    let mut worst = 0.0f64;
    match &rs {
        None => {
            let mag = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let allowed = rule.f64_rel * mag.max(1.0);
            let r = ts.max_abs / allowed;
            worst = r;
            if r > 1.0 {
                j.reasons.push(format!(
                    "max |test − exact| {:.3e} > {:.0e}·max(1,|x|) = {allowed:.3e}",
                    ts.max_abs, rule.f64_rel
                ));
            }
        }
        Some(r) => {
            let checks = [
                (
                    "RMS error",
                    ts.rms_ulps,
                    r.rms_ulps,
                    rule.k_rms,
                    rule.floor_rms,
                ),
                (
                    "max error",
                    ts.max_ulps,
                    r.max_ulps,
                    rule.k_max,
                    rule.floor_max,
                ),
                (
                    "row bias",
                    ts.bias_ulps,
                    r.bias_ulps,
                    rule.k_bias,
                    rule.floor_bias,
                ),
            ];
            for (what, t, reference, k, floor) in checks {
                let allowed = k * reference + floor;
                let ratio = t / allowed;
                worst = worst.max(ratio);
                if ratio > 1.0 {
                    j.reasons.push(format!(
                        "{what} {t:.3} ulp > {k}× the reference's {reference:.3} + {floor} ulp"
                    ));
                }
            }
        }
    }
    j.ratio = worst;
    j.status = if j.reasons.is_empty() {
        OpStatus::Pass
    } else {
        OpStatus::Fail
    };
    j.test = Some(ts);
    j.reference = rs;
    j
}

impl LocalComparison {
    /// The judgement of one op.
    pub fn get(&self, name: &str) -> Option<&OpJudgement> {
        self.ops.iter().find(|o| o.name == name)
    }

    /// The first failing op, if any.
    pub fn first_failure(&self) -> Option<&OpJudgement> {
        self.ops.iter().find(|o| o.status.is_failure())
    }

    /// One line: where the first difference is made, and why, or that every op is within the
    /// reference's own local error.
    pub fn verdict(&self) -> String {
        match self.first_failure() {
            None if self.passed => format!(
                "every op within the reference's own local error ({} ops judged on their own inputs)",
                self.ops
                    .iter()
                    .filter(|o| o.status == OpStatus::Pass)
                    .count()
            ),
            None => "no op could be judged".into(),
            Some(o) => format!(
                "first difference made at `{}` ({}): {}; likely cause: {}",
                o.name,
                o.status.label(),
                o.reasons.join("; "),
                likely_cause(&o.name)
            ),
        }
    }

    /// Markdown: per layer, the worst local ratio (made here) next to the end-to-end one
    /// (inherited + made), then every failing op.
    pub fn markdown(&self, end_to_end: Option<&TraceComparison>) -> String {
        let mut out = String::from(
            "| where | worst op (local) | local error / allowance | end-to-end error / tolerance |\n|---|---|---:|---:|\n",
        );
        let mut groups: Vec<(Option<usize>, Vec<&OpJudgement>)> = vec![];
        for o in &self.ops {
            let layer = TapName::parse(&o.name).and_then(|t| match t {
                TapName::Layer(i, _) => Some(i),
                _ => None,
            });
            match groups.last_mut() {
                Some((l, v)) if *l == layer => v.push(o),
                _ => groups.push((layer, vec![o])),
            }
        }
        for (layer, ops) in &groups {
            let worst = ops
                .iter()
                .max_by(|a, b| a.ratio.total_cmp(&b.ratio))
                .expect("non-empty group");
            let where_ = layer.map_or_else(|| ops[0].name.clone(), |i| format!("layer {i}"));
            let names: Vec<&str> = ops.iter().map(|o| o.name.as_str()).collect();
            let e2e_ratio = end_to_end
                .and_then(|c| {
                    c.tensors
                        .iter()
                        .filter(|t| names.contains(&t.name.as_str()))
                        .filter_map(|t| t.tolerance_ratio())
                        .reduce(f64::max)
                })
                .map_or_else(|| "—".to_string(), |r| format!("{r:.2}"));
            let short = worst
                .name
                .rsplit('.')
                .next()
                .unwrap_or(&worst.name)
                .to_string();
            let mark = if worst.status.is_failure() {
                format!("**{short} {}**", worst.status.label())
            } else {
                short
            };
            let _ = writeln!(
                out,
                "| {where_} | {mark} | {:.2} | {e2e_ratio} |",
                worst.ratio
            );
        }
        for o in self.ops.iter().filter(|o| o.status.is_failure()) {
            let _ = writeln!(
                out,
                "\n- `{}` {}: {}",
                o.name,
                o.status.label(),
                o.reasons.join("; ")
            );
        }
        out
    }
}

/// The layer tap of a trace name, if it is one (`layers.3.q` → `(3, Q)`).
pub fn layer_tap(name: &str) -> Option<(usize, LayerTap)> {
    match TapName::parse(name)? {
        TapName::Layer(i, t) => Some((i, t)),
        _ => None,
    }
}

/// One input's op-level judgement, labelled, with its end-to-end comparison beside it.
#[derive(Debug, Clone)]
pub struct NamedLocal {
    /// Label of the input.
    pub label: String,
    /// The op-level judgement.
    pub local: LocalComparison,
    /// The end-to-end comparison of the same test trace (for the made-vs-inherited table).
    pub end_to_end: Option<TraceComparison>,
}

/// The phase "op-level (each op on its own inputs) \[tier\]": passes when every input's ops pass; a
/// phase that judged no op fails. The details show, per input, the made-vs-inherited table.
pub fn local_phase(name: impl Into<String>, items: &[NamedLocal]) -> crate::report::Phase {
    use crate::report::Phase;
    let n = items.len();
    let ok = items.iter().filter(|i| i.local.passed).count();
    let judged: usize = items
        .iter()
        .map(|i| {
            i.local
                .ops
                .iter()
                .filter(|o| o.status != OpStatus::Unjudged)
                .count()
        })
        .sum();
    let first_bad = items.iter().find(|i| !i.local.passed);
    let verdict = match first_bad {
        Some(i) if n > 1 => format!("{}: {}", i.label, i.local.verdict()),
        Some(i) => i.local.verdict(),
        None => format!("every op within the reference's own local error ({judged} ops judged)"),
    };
    let summary = format!("{ok}/{n} input(s) pass; {verdict}");
    let mut details = String::new();
    for i in items {
        let _ = writeln!(
            details,
            "\n**{}**: {}\n\n{}",
            i.label,
            i.local.verdict(),
            i.local.markdown(i.end_to_end.as_ref())
        );
    }
    let phase = if n > 0 && judged > 0 && first_bad.is_none() {
        Phase::pass(name, summary)
    } else if n == 0 || judged == 0 {
        Phase::fail(
            name,
            "no op was judged: the op-level check compared nothing",
        )
    } else {
        Phase::fail(name, summary)
    };
    phase.with_details(details)
}

/// The op-level judgements as JSON: per tier and input, `passed`, `first_divergence` (where a
/// difference is made) and every op with its status, ratio, reasons and both sides' statistics.
pub fn local_json(local: &[(Tier, Vec<NamedLocal>)]) -> serde_json::Value {
    serde_json::Value::Array(
        local
            .iter()
            .flat_map(|(tier, items)| {
                items.iter().map(move |i| {
                    serde_json::json!({
                        "tier": tier,
                        "input": i.label,
                        "passed": i.local.passed,
                        "first_divergence": i.local.first_divergence,
                        "verdict": i.local.verdict(),
                        "rule": i.local.rule,
                        "ops": i.local.ops,
                    })
                })
            })
            .collect(),
    )
}

#[cfg(test)]
#[path = "local_tests.rs"]
mod tests;
