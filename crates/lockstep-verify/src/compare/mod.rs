//! Tensor-by-tensor comparison of two traces (reference and test), optionally with the pure-f64
//! oracle, each tensor judged by the [`TolerancePolicy`] of its precision tier.

mod cause;
mod stream;
mod tensor;

pub use cause::{failure_cause, likely_cause};
pub use stream::{compare_stores, policy_for_stores, StreamCompareError};
pub use tensor::{compare_tensors, sci, Against, AppliedTolerance, Status, TensorComparison};

use std::fmt;

use lockstep_trace::{TensorData, Trace};
use serde::Serialize;

#[cfg(doc)]
use crate::nonfinite::first_nonfinite;
use crate::nonfinite::{nonfinite_in, nonfinite_source, FirstNonFinite};
use crate::tolerance::{Tier, TolerancePolicy};
use rayon::prelude::*;
use std::collections::HashMap;

/// The overall verdict on a trace comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Verdict {
    /// Everything within tolerance, and either the f64 tier (exact math, ≤ 1e-9) or bit-identical.
    Match,
    /// Everything within tolerance in the f32 or bf16 tier: the differences are rounding.
    DriftWithinNoise,
    /// A tensor is out of tolerance: the first one in forward order, and its likely cause.
    Bug {
        /// The first failing tensor.
        tensor: String,
        /// What probably causes it.
        cause: String,
    },
    /// Nothing failed, but not everything could be judged.
    Inconclusive {
        /// Why.
        reason: String,
    },
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Match => f.write_str("match"),
            Verdict::DriftWithinNoise => f.write_str("rounding drift within noise"),
            Verdict::Bug { tensor, cause } => {
                write!(f, "bug: first divergence at {tensor}: {cause}")
            }
            Verdict::Inconclusive { reason } => write!(f, "inconclusive: {reason}"),
        }
    }
}

/// Per-layer summary of a comparison: the largest differences over the layer's tensors.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerError {
    /// Layer index.
    pub layer: usize,
    /// Largest max|ours − ref| over the layer's tensors.
    pub ours_vs_ref: f64,
    /// The tensor it occurs in (`None` when every tensor of the layer is identical).
    pub worst_tensor: Option<String>,
    /// The reference's own noise floor: largest max|ref − oracle| (when an oracle was given).
    pub ref_vs_oracle: Option<f64>,
    /// Largest max|ours − oracle| (when an oracle was given).
    pub ours_vs_oracle: Option<f64>,
    /// True when every tensor of the layer passed.
    pub passed: bool,
}

/// The comparison of two whole traces.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceComparison {
    /// The tier it was judged in.
    pub tier: Tier,
    /// Whether an oracle trace took part.
    pub has_oracle: bool,
    /// True when every tensor (token ids included) was judged and passed.
    pub passed: bool,
    /// The first failing tensor in forward order (`tokens` when the ids differ).
    pub first_divergence: Option<String>,
    /// Where each trace first holds a non-finite value (NaN/±∞), in forward order.
    pub first_nonfinite: FirstNonFinite,
    /// The reference's token ids (flattened), when known.
    pub token_ids: Option<Vec<i64>>,
    /// The reference's `tokens` shape ([B, T]), when present.
    pub token_shape: Option<Vec<usize>>,
    /// Every tensor in either trace, forward order, `tokens` first.
    pub tensors: Vec<TensorComparison>,
    /// Notes: how the tier was chosen, fingerprint differences, ...
    pub warnings: Vec<String>,
    /// The reference's `producer` metadata.
    pub reference_producer: Option<String>,
    /// The test's `producer` metadata.
    pub test_producer: Option<String>,
    /// The oracle's `producer` metadata.
    pub oracle_producer: Option<String>,
}

impl TraceComparison {
    /// Looks a tensor's comparison up by name.
    pub fn get(&self, name: &str) -> Option<&TensorComparison> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The first failing tensor in forward order.
    pub fn first_failure(&self) -> Option<&TensorComparison> {
        self.tensors.iter().find(|t| t.status.is_failure())
    }

    /// Number of tokens (T, the last dimension of `tokens`), when known.
    pub fn num_tokens(&self) -> Option<usize> {
        self.token_shape
            .as_ref()
            .and_then(|s| s.last().copied())
            .or(self.token_ids.as_ref().map(Vec::len))
    }

    /// The judged tensor furthest from its tolerance (largest measured/threshold ratio).
    pub fn worst(&self) -> Option<&TensorComparison> {
        self.tensors
            .iter()
            .filter(|t| t.tolerance.is_some())
            .max_by(|a, b| {
                let (x, y) = (
                    a.tolerance_ratio().unwrap_or(0.0),
                    b.tolerance_ratio().unwrap_or(0.0),
                );
                x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal)
            })
    }

    /// The verdict: match, rounding drift within noise, bug (with the first divergence and its
    /// likely cause), or inconclusive.
    pub fn verdict(&self) -> Verdict {
        if let Some(t) = self.first_failure() {
            return Verdict::Bug {
                tensor: t.name.clone(),
                cause: self.cause_of(t),
            };
        }
        let unjudged = self
            .tensors
            .iter()
            .filter(|t| t.status == Status::Unjudged)
            .count();
        if unjudged > 0 {
            return Verdict::Inconclusive {
                reason: format!("{unjudged} tensor(s) could not be judged (no oracle copy)"),
            };
        }
        if !self.passed {
            return Verdict::Inconclusive {
                reason: "no tensors were compared".into(),
            };
        }
        let identical = self
            .tensors
            .iter()
            .all(|t| t.stats.as_ref().is_none_or(|s| s.max_abs == 0.0));
        if self.tier == Tier::F64 || identical {
            Verdict::Match
        } else {
            Verdict::DriftWithinNoise
        }
    }

    /// The likely cause of failing tensor `t` ([`failure_cause`]); for a non-finite tensor whose
    /// NaN/inf first appear at an earlier tensor of the trace (a comparison restricted to some
    /// tensors, e.g. the logits), it names that tensor instead.
    pub fn cause_of(&self, t: &TensorComparison) -> String {
        self.nonfinite_cause_of(t)
            .unwrap_or_else(|| failure_cause(t))
    }

    /// The cause the reports print beside a first divergence: [`Self::cause_of`] for a
    /// non-finite tensor, else the usual suspects of its kind ([`likely_cause`]).
    pub fn headline_cause(&self, t: &TensorComparison) -> String {
        if t.status == Status::NonFinite {
            self.cause_of(t)
        } else {
            likely_cause(&t.name).to_string()
        }
    }

    /// [`Self::cause_of`] for a non-finite tensor carried from an earlier one.
    fn nonfinite_cause_of(&self, t: &TensorComparison) -> Option<String> {
        if t.status == Status::NonFinite {
            let upstream = [&self.first_nonfinite.reference, &self.first_nonfinite.test]
                .into_iter()
                .flatten()
                .min_by_key(|s| lockstep_trace::forward_rank(&s.tensor));
            if let Some(s) = upstream.filter(|s| s.tensor != t.name) {
                let sides = t.nonfinite.map_or("the test".into(), |n| n.sides());
                return Some(format!(
                    "non-finite values (NaN/inf) in {sides}, carried from `{}` where they first appear ({})",
                    s.tensor,
                    nonfinite_source(&s.tensor)
                ));
            }
        }
        None
    }

    /// The per-layer error table, by ascending layer index.
    pub fn per_layer(&self) -> Vec<LayerError> {
        let mut rows: Vec<LayerError> = Vec::new();
        for t in &self.tensors {
            let (Some(layer), Some(s)) = (t.layer(), t.stats.as_ref()) else {
                continue;
            };
            let row = match rows.iter_mut().find(|r| r.layer == layer) {
                Some(r) => r,
                None => {
                    rows.push(LayerError {
                        layer,
                        ours_vs_ref: 0.0,
                        worst_tensor: None,
                        ref_vs_oracle: None,
                        ours_vs_oracle: None,
                        passed: true,
                    });
                    rows.last_mut().expect("just pushed")
                }
            };
            if s.max_abs > row.ours_vs_ref || (s.max_abs.is_nan() && !row.ours_vs_ref.is_nan()) {
                row.ours_vs_ref = s.max_abs;
                row.worst_tensor = Some(t.name.clone());
            }
            if let Some(o) = &t.ref_vs_oracle {
                row.ref_vs_oracle = Some(row.ref_vs_oracle.map_or(o.max_abs, |v| v.max(o.max_abs)));
            }
            if let Some(o) = &t.test_vs_oracle {
                row.ours_vs_oracle =
                    Some(row.ours_vs_oracle.map_or(o.max_abs, |v| v.max(o.max_abs)));
            }
        }
        for t in &self.tensors {
            if let Some(layer) = t.layer() {
                if let Some(r) = rows.iter_mut().find(|r| r.layer == layer) {
                    r.passed &= t.status == Status::Pass;
                }
            }
        }
        rows.sort_by_key(|r| r.layer);
        rows
    }
}

/// Compares two whole traces, tensor by tensor in forward order, each judged by `policy`.
///
/// Every tensor present in either trace gets a record. `tokens` is not compared numerically:
/// the ids must be identical (reference vs test, and reference vs oracle when given), else the
/// record is [`Status::TokenMismatch`], which comes first in forward order. When neither trace
/// holds `tokens`, the `token_ids` metadata is compared instead (the integers in it). A
/// differing `model_fingerprint` is a warning (the weights may still be the same values).
pub fn compare_traces(
    reference: &Trace,
    test: &Trace,
    oracle: Option<&Trace>,
    policy: &TolerancePolicy,
) -> TraceComparison {
    let mut warnings = policy.notes.clone();
    let mut names: Vec<String> = reference
        .names()
        .into_iter()
        .chain(test.names())
        .map(str::to_string)
        .collect();
    lockstep_trace::sort_forward(&mut names);
    names.dedup();

    let mut tensors = Vec::with_capacity(names.len());
    let token_ids = reference
        .get("tokens")
        .map(|t| t.data.to_f64().iter().map(|&v| v as i64).collect())
        .or_else(|| reference.metadata.get("token_ids").map(|s| parse_ids(s)));
    let token_shape = reference.get("tokens").map(|t| t.shape.clone());
    if let Some(t) = check_tokens(reference, test, oracle) {
        tensors.push(t);
    }
    // Tensors are compared in parallel (each record depends on its own tensors only), then
    // kept in forward order; a router's top-k ids are re-judged after, in order, from the
    // records before them (their layer's router logits among them).
    let records: Vec<TensorComparison> = names
        .par_iter()
        .filter(|n| n.as_str() != "tokens")
        .map(|name| match (reference.get(name), test.get(name)) {
            (Some(r), Some(t)) => {
                let tol = policy.tolerance_for(name);
                compare_tensors(name, r, t, oracle.and_then(|o| o.get(name)), &tol)
            }
            (r, t) => {
                let mut c = TensorComparison::bare(name, Status::Missing);
                c.ref_shape = r.map(|x| x.shape.clone());
                c.test_shape = t.map(|x| x.shape.clone());
                c.note = Some(format!(
                    "present only in the {} trace",
                    if r.is_some() { "reference" } else { "test" }
                ));
                c
            }
        })
        .collect();
    for mut c in records {
        let name = c.name.clone();
        let in_both = reference.get(&name).is_some() && test.get(&name).is_some();
        if in_both && crate::router::is_topk_ids(&name) {
            let tol = policy.tolerance_for(&name);
            crate::router::judge_topk_ids(&mut c, &name, reference, test, &tensors, tol);
        }
        tensors.push(c);
    }

    for (side, other) in [("test", Some(test)), ("oracle", oracle)] {
        let (Some(a), Some(b)) = (
            reference.metadata.get("model_fingerprint"),
            other.and_then(|o| o.metadata.get("model_fingerprint")),
        ) else {
            continue;
        };
        if a != b {
            warnings.push(format!(
                "model_fingerprint differs between the reference and the {side} trace"
            ));
        }
    }
    let numeric = tensors.iter().filter(|t| t.name != "tokens").count();
    if numeric == 0 {
        warnings.push("no tensors to compare".into());
    }
    let first_divergence = tensors
        .iter()
        .find(|t| t.status.is_failure())
        .map(|t| t.name.clone());
    let passed = numeric > 0 && tensors.iter().all(|t| t.status == Status::Pass);
    let producer = |t: &Trace| t.metadata.get("producer").cloned();
    TraceComparison {
        tier: policy.tier,
        has_oracle: oracle.is_some(),
        passed,
        first_divergence,
        first_nonfinite: first_nonfinite_sites(&tensors, reference, test, oracle),
        token_ids,
        token_shape,
        tensors,
        warnings,
        reference_producer: producer(reference),
        test_producer: producer(test),
        oracle_producer: oracle.and_then(producer),
    }
}

/// Where each trace first holds a non-finite value, as [`first_nonfinite`] finds it, without
/// scanning again the tensors whose statistics in `records` already counted no non-finite value
/// on that side (every one, in the common case).
fn first_nonfinite_sites(
    records: &[TensorComparison],
    reference: &Trace,
    test: &Trace,
    oracle: Option<&Trace>,
) -> FirstNonFinite {
    let counted: HashMap<&str, &TensorComparison> =
        records.iter().map(|c| (c.name.as_str(), c)).collect();
    let stats_of = |name: &str| counted.get(name).and_then(|c| c.stats.as_ref());
    let first = |trace: &Trace, finite: &dyn Fn(&str) -> bool| {
        // As `first_nonfinite`: the first tensor in forward order holding one.
        let names = trace.names();
        names
            .into_iter()
            .find_map(|n| (!finite(n)).then(|| trace.get(n).and_then(|t| nonfinite_in(n, t)))?)
    };
    let ((r, t), o) = rayon::join(
        || {
            rayon::join(
                || {
                    first(reference, &|n| {
                        stats_of(n).is_some_and(|s| s.expected_nonfinite == 0)
                    })
                },
                || {
                    first(test, &|n| {
                        stats_of(n).is_some_and(|s| s.actual_nonfinite == 0)
                    })
                },
            )
        },
        || {
            oracle.and_then(|o| {
                first(o, &|n| {
                    counted
                        .get(n)
                        .and_then(|c| c.ref_vs_oracle.as_ref())
                        .is_some_and(|s| s.expected_nonfinite == 0)
                })
            })
        },
    );
    FirstNonFinite {
        reference: r,
        test: t,
        oracle: o,
    }
}

/// The integers in a `token_ids` metadata string such as `[9707, 11, 1879]`.
fn parse_ids(s: &str) -> Vec<i64> {
    s.split(|c: char| !(c.is_ascii_digit() || c == '-'))
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// The ids of a trace: its `tokens` tensor, else its `token_ids` metadata.
fn ids_of(t: &Trace) -> Option<(Vec<usize>, Vec<i64>)> {
    match t.get("tokens") {
        Some(x) => Some((
            x.shape.clone(),
            match &x.data {
                TensorData::I64(v) => v.clone(),
                d => d.to_f64().iter().map(|&v| v as i64).collect(),
            },
        )),
        None => t.metadata.get("token_ids").map(|s| {
            let v = parse_ids(s);
            (vec![v.len()], v)
        }),
    }
}

/// The `tokens` record: `None` when neither side knows its ids.
fn check_tokens(
    reference: &Trace,
    test: &Trace,
    oracle: Option<&Trace>,
) -> Option<TensorComparison> {
    let r = ids_of(reference);
    let t = ids_of(test);
    if r.is_none() && t.is_none() {
        return None;
    }
    let mut c = TensorComparison::bare("tokens", Status::Pass);
    c.ref_shape = r.as_ref().map(|x| x.0.clone());
    c.test_shape = t.as_ref().map(|x| x.0.clone());
    let (Some((_, r)), Some((_, t))) = (&r, &t) else {
        c.status = Status::Missing;
        c.note = Some(format!(
            "token ids present only in the {} trace",
            if r.is_some() { "reference" } else { "test" }
        ));
        return Some(c);
    };
    let describe = |a: &[i64], b: &[i64], other: &str| {
        let at = a
            .iter()
            .zip(b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        format!(
            "{other} token ids differ from the reference at position {at} (reference {} ids, {other} {} ids; reference {:?}, {other} {:?} there)",
            a.len(),
            b.len(),
            a.get(at),
            b.get(at)
        )
    };
    if r != t {
        c.status = Status::TokenMismatch;
        c.note = Some(describe(r, t, "test"));
    } else if let Some((_, o)) = oracle.and_then(ids_of) {
        if *r != o {
            c.status = Status::TokenMismatch;
            c.note = Some(describe(r, &o, "oracle"));
        }
    }
    Some(c)
}
