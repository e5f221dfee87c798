//! What a failing tensor most likely means: the usual suspects by tensor kind.

use lockstep_trace::{LayerTap, TapName};

use super::{Status, TensorComparison};
use crate::nonfinite::nonfinite_cause;

/// The cause shown for a failing tensor: its status-specific reason and the likely cause
/// (for a non-finite tensor, where NaN/inf come from, never the tap's numeric suspects).
pub fn failure_cause(t: &TensorComparison) -> String {
    let cause = likely_cause(&t.name);
    match t.status {
        Status::Missing => format!(
            "tensor absent from the {} trace",
            if t.ref_shape.is_none() {
                "reference"
            } else {
                "test"
            }
        ),
        Status::ShapeMismatch => format!(
            "shape {:?} vs reference {:?} ({cause})",
            t.test_shape.as_deref().unwrap_or(&[]),
            t.ref_shape.as_deref().unwrap_or(&[])
        ),
        Status::NonFinite => {
            let sides = t.nonfinite.map_or("the test".into(), |n| n.sides());
            format!("{} (in {sides})", nonfinite_cause(&t.name))
        }
        _ => cause.to_string(),
    }
}

/// The usual suspects when the tensor `name` is the first to diverge, by tensor kind.
pub fn likely_cause(name: &str) -> &'static str {
    match TapName::parse(name) {
        Some(TapName::Tokens) => "tokenizer, chat template or prompt ids",
        Some(TapName::Embed) => "wrong embedding table / token ids",
        Some(TapName::FinalNorm) => "RMSNorm eps or weight, statistics dtype",
        Some(TapName::Logits) => "lm_head (tied vs untied embeddings), final norm",
        Some(TapName::Layer(_, tap)) => match tap {
            LayerTap::InputNorm | LayerTap::PostNorm => "RMSNorm eps or weight, statistics dtype",
            LayerTap::Q | LayerTap::K | LayerTap::V => {
                "missing or wrong q/k/v bias, projection weight transposed or swapped"
            }
            LayerTap::QNorm | LayerTap::KNorm => {
                "per-head q/k RMSNorm skipped, applied after RoPE, wrong weight or eps"
            }
            LayerTap::QRope | LayerTap::KRope => {
                "RoPE: theta, rotate_half vs interleaved layout, position ids, cos/sin dtype"
            }
            LayerTap::AttnProbs => {
                "causal mask, scaling (head_dim^-0.5), GQA head mapping, softmax dtype"
            }
            LayerTap::AttnOut => "GQA kv-head mapping, head order when merging",
            LayerTap::OProj => "o_proj weight",
            LayerTap::ResidAttn | LayerTap::Out => "residual connection",
            LayerTap::MlpAct => "activation (SiLU), gate/up swapped",
            LayerTap::MlpOut => "down_proj",
            LayerTap::RouterLogits => "MoE router (mlp.gate) weight",
            LayerTap::RouterTopkIds => {
                "router softmax dtype or order (softmax before the top-k), top-k tie-breaking"
            }
            LayerTap::RouterTopkWeights => {
                "top-k normalisation (norm_topk_prob), softmax before vs after the top-k, router dtype"
            }
        },
        None => "not a canonical tensor: check what the producer tapped",
    }
}
