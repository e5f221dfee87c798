//! Non-finite values (NaN, ±∞) in traces and weights: where each first appears, how many each side
//! holds, and what likely caused them. A non-finite value never passes (docs/numerics.md).

use std::fmt;

use lockstep_trace::{LayerTap, TapName, TensorData, Trace, TraceTensor};

use crate::compare::TraceComparison;
use crate::stats::unravel;
use serde::Serialize;

/// How many non-finite values (NaN or ±∞) one tensor holds on each side of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct NonFiniteCounts {
    /// In the test.
    pub test: usize,
    /// In the reference.
    pub reference: usize,
    /// In the oracle (counted only when the tier's rule uses the oracle; 0 otherwise).
    pub oracle: usize,
}

impl NonFiniteCounts {
    /// True when any side holds a non-finite value.
    pub fn any(&self) -> bool {
        self.test + self.reference + self.oracle > 0
    }

    /// The sides holding non-finite values, e.g. `the reference and the test`.
    pub fn sides(&self) -> String {
        let names: Vec<&str> = [
            (self.reference, "the reference"),
            (self.test, "the test"),
            (self.oracle, "the oracle"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(_, s)| s)
        .collect();
        match names.as_slice() {
            [] => "no side".into(),
            [one] => (*one).into(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        }
    }

    /// The counts per side, e.g. `8 in the reference, 8 in the test`.
    pub fn describe(&self) -> String {
        [
            (self.reference, "the reference"),
            (self.test, "the test"),
            (self.oracle, "the oracle"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, s)| format!("{n} in {s}"))
        .collect::<Vec<_>>()
        .join(", ")
    }
}

/// Where a trace first holds a non-finite value, in forward order: the tensor, and within it the
/// first element (row-major) that is NaN or ±∞.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NonFiniteSite {
    /// The tensor's canonical name, e.g. `layers.1.mlp_out`.
    pub tensor: String,
    /// Its layer, for `layers.{i}.*` tensors.
    pub layer: Option<usize>,
    /// The token position of the first non-finite element (its `T` index), when the tensor has
    /// one.
    pub token_position: Option<usize>,
    /// Multi-dimensional index of the first non-finite element.
    pub index: Vec<usize>,
    /// Its flat (row-major) index.
    pub flat_index: usize,
    /// The value there: `NaN`, `inf` or `-inf`.
    pub value: String,
    /// How many elements of the tensor are non-finite.
    pub count: usize,
}

impl fmt::Display for NonFiniteSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at `{}`{:?} (", self.value, self.tensor, self.index)?;
        if let Some(p) = self.token_position {
            write!(f, "token position {p}, ")?;
        }
        write!(
            f,
            "{} non-finite element{})",
            self.count,
            if self.count == 1 { "" } else { "s" }
        )
    }
}

/// `NaN`, `inf` or `-inf`.
fn nonfinite_name(v: f64) -> &'static str {
    if v.is_nan() {
        "NaN"
    } else if v > 0.0 {
        "inf"
    } else {
        "-inf"
    }
}

/// The token-position dimension of a canonical tensor: 2 for per-head tensors
/// (`[B, heads, T, ·]`), 1 for everything else (`[B, T, ·]`).
fn token_dim(name: &str) -> usize {
    match TapName::parse(name) {
        Some(TapName::Layer(
            _,
            LayerTap::Q
            | LayerTap::K
            | LayerTap::V
            | LayerTap::QNorm
            | LayerTap::KNorm
            | LayerTap::QRope
            | LayerTap::KRope
            | LayerTap::AttnProbs,
        )) => 2,
        _ => 1,
    }
}

/// Flat index and value of the first non-finite element, and how many there are (no copy).
fn scan_nonfinite(d: &TensorData) -> Option<(usize, f64, usize)> {
    fn go<X: Copy>(v: &[X], f: impl Fn(X) -> f64) -> Option<(usize, f64, usize)> {
        let first = v.iter().position(|&x| !f(x).is_finite())?;
        let count = v[first..].iter().filter(|&&x| !f(x).is_finite()).count();
        Some((first, f(v[first]), count))
    }
    match d {
        TensorData::F64(v) => go(v, |x| x),
        TensorData::F32(v) => go(v, f64::from),
        TensorData::BF16(v) => go(v, f64::from),
        TensorData::F16(v) => go(v, f64::from),
        TensorData::I64(_) => None,
    }
}

/// The first non-finite element of one tensor (`None` when all are finite, or the tensor holds
/// integers).
pub fn nonfinite_in(name: &str, tensor: &TraceTensor) -> Option<NonFiniteSite> {
    let (first, value, count) = scan_nonfinite(&tensor.data)?;
    let index = unravel(first, &tensor.shape);
    Some(NonFiniteSite {
        tensor: name.to_string(),
        layer: match TapName::parse(name) {
            Some(TapName::Layer(i, _)) => Some(i),
            _ => None,
        },
        token_position: index.get(token_dim(name)).copied(),
        index,
        flat_index: first,
        value: nonfinite_name(value).into(),
        count,
    })
}

/// Where `trace` first holds a non-finite value, scanning its tensors in forward order.
pub fn first_nonfinite(trace: &Trace) -> Option<NonFiniteSite> {
    let mut names: Vec<&str> = trace.names();
    lockstep_trace::sort_forward(&mut names);
    names
        .into_iter()
        .find_map(|n| trace.get(n).and_then(|t| nonfinite_in(n, t)))
}

/// The first non-finite value of each side of a comparison (`None` where that side is finite
/// throughout, or absent).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct FirstNonFinite {
    /// In the reference trace.
    pub reference: Option<NonFiniteSite>,
    /// In the test trace.
    pub test: Option<NonFiniteSite>,
    /// In the oracle trace.
    pub oracle: Option<NonFiniteSite>,
}

impl FirstNonFinite {
    /// True when any side holds a non-finite value.
    pub fn any(&self) -> bool {
        self.reference.is_some() || self.test.is_some() || self.oracle.is_some()
    }

    /// One line per side holding non-finite values, e.g. `reference: NaN at `layers.1.mlp_out`…`.
    pub fn lines(&self) -> Vec<String> {
        [
            ("reference", &self.reference),
            ("test", &self.test),
            ("oracle", &self.oracle),
        ]
        .into_iter()
        .filter_map(|(side, s)| s.as_ref().map(|s| format!("{side}: {s}")))
        .collect()
    }
}

/// One checkpoint tensor holding non-finite values, as plain data (the verifier does not read
/// checkpoints; the caller scans them, e.g. with the engine's `Checkpoint::nonfinite_report`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NonFiniteWeight {
    /// The checkpoint name, e.g. `model.layers.1.mlp.down_proj.weight`.
    pub name: String,
    /// NaN elements.
    pub nan: usize,
    /// +∞ or −∞ elements.
    pub inf: usize,
    /// Index of the first non-finite element, in the tensor's stored shape.
    pub first_index: Vec<usize>,
}

impl NonFiniteWeight {
    /// `` `model.layers.1.mlp.down_proj.weight`: 1 NaN, first at [5, 7] ``.
    pub fn describe(&self) -> String {
        let mut parts = vec![];
        if self.nan > 0 {
            parts.push(format!("{} NaN", self.nan));
        }
        if self.inf > 0 {
            parts.push(format!("{} infinite", self.inf));
        }
        format!(
            "`{}`: {}, first at {:?}",
            self.name,
            parts.join(" and "),
            self.first_index
        )
    }

    /// The layer a checkpoint name belongs to (`model.layers.{i}.…` or `layers.{i}.…`).
    pub fn layer(&self) -> Option<usize> {
        let rest = self
            .name
            .strip_prefix("model.layers.")
            .or_else(|| self.name.strip_prefix("layers."))?;
        rest.split('.').next()?.parse().ok()
    }
}

/// The overall sentence on non-finite values: where they come from and where they first appear,
/// e.g. `NaN in model.layers.1.mlp.down_proj.weight[5, 7] reaches layers.1.mlp_out on both
/// sides`. `None` when neither the checkpoint nor any comparison holds a non-finite value.
///
/// `weights` is the checkpoint scan (in checkpoint order); `comparisons` the trace comparisons of
/// a run (their first non-finite sites per side). The tensor named is the earliest in forward
/// order over all comparisons; "on both sides" when the reference and the test first turn
/// non-finite at the same tensor. Without a non-finite weight, the sentence says the checkpoint is
/// finite, so the run itself (overflow, a bug) produces them.
pub fn nonfinite_summary(
    weights: &[NonFiniteWeight],
    comparisons: &[&TraceComparison],
) -> Option<String> {
    let earliest = |pick: fn(&FirstNonFinite) -> &Option<NonFiniteSite>| {
        comparisons
            .iter()
            .filter_map(|c| pick(&c.first_nonfinite).as_ref())
            .min_by_key(|s| lockstep_trace::forward_rank(&s.tensor))
    };
    let r = earliest(|f| &f.reference);
    let t = earliest(|f| &f.test);
    let o = earliest(|f| &f.oracle);
    let reach = match (r, t) {
        (Some(r), Some(t)) if r.tensor == t.tensor => format!("{} on both sides", r.tensor),
        (Some(r), Some(t)) => format!("{} in the reference and {} in the test", r.tensor, t.tensor),
        (Some(r), None) => format!("{} in the reference only (the test stays finite)", r.tensor),
        (None, Some(t)) => format!("{} in the test only (the reference stays finite)", t.tensor),
        (None, None) => match o {
            Some(o) => format!("{} in the oracle only", o.tensor),
            None => String::new(),
        },
    };
    let reach = if reach.is_empty() { None } else { Some(reach) };
    match (weights.first(), reach) {
        (Some(w), Some(reach)) => {
            let more = if weights.len() > 1 {
                format!(" (and {} more non-finite weight tensor(s))", weights.len() - 1)
            } else {
                String::new()
            };
            let kind = if w.nan > 0 { "NaN" } else { "infinity" };
            Some(format!(
                "{kind} in {}{:?}{more} reaches {reach}",
                w.name, w.first_index
            ))
        }
        (Some(w), None) => Some(format!(
            "the checkpoint holds non-finite values ({}{}); no compared forward pass holds any",
            w.describe().replace('`', ""),
            if weights.len() > 1 {
                format!(" and {} more tensor(s)", weights.len() - 1)
            } else {
                String::new()
            }
        )),
        (None, Some(reach)) => Some(format!(
            "the checkpoint is finite; non-finite values first appear at {reach} (produced by the computation: overflow or a bug)"
        )),
        (None, None) => None,
    }
}

/// The likely cause when non-finite values first appear at tensor `name` (the inputs of its op
/// were finite): the weights the op reads, or an overflow in it.
pub fn nonfinite_cause(name: &str) -> String {
    format!(
        "non-finite values (NaN/inf) enter here: {}",
        nonfinite_source(name)
    )
}

/// Where NaN/inf entering at tensor `name` come from, e.g. `a NaN/inf in the down_proj weight`.
pub fn nonfinite_source(name: &str) -> &'static str {
    match TapName::parse(name) {
        Some(TapName::Tokens) => "token ids",
        Some(TapName::Embed) => "a NaN/inf in the embedding table (embed_tokens)",
        Some(TapName::FinalNorm) => {
            "a NaN/inf in the final norm weight, or an overflowing variance"
        }
        Some(TapName::Logits) => "a NaN/inf in lm_head (or the tied embedding table)",
        Some(TapName::Layer(_, tap)) => match tap {
            LayerTap::InputNorm | LayerTap::PostNorm => {
                "a NaN/inf in the RMSNorm weight, or an overflowing variance"
            }
            LayerTap::Q | LayerTap::K | LayerTap::V => {
                "a NaN/inf in the q/k/v projection weight or bias"
            }
            LayerTap::QNorm | LayerTap::KNorm => "a NaN/inf in the q_norm/k_norm weight",
            LayerTap::QRope | LayerTap::KRope => "non-finite RoPE cos/sin tables",
            LayerTap::AttnProbs => "overflowing attention scores (softmax of inf or NaN)",
            LayerTap::AttnOut => "non-finite attention probabilities or values",
            LayerTap::OProj => "a NaN/inf in the o_proj weight",
            LayerTap::ResidAttn | LayerTap::Out => "an overflowing residual add",
            LayerTap::MlpAct => {
                "a NaN/inf in the gate_proj/up_proj weights, or an overflowing activation"
            }
            LayerTap::MlpOut => "a NaN/inf in the down_proj weight (or an expert's)",
            LayerTap::RouterLogits => "a NaN/inf in the MoE router (mlp.gate) weight",
            LayerTap::RouterTopkIds | LayerTap::RouterTopkWeights => {
                "non-finite router logits (softmax of inf or NaN)"
            }
        },
        None => "a NaN/inf in the weights this tensor is computed from",
    }
}
