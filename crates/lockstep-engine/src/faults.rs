//! Deliberate bugs, to prove the verifier catches them (`lockstep verify --inject`).
//!
//! Each fault is a classic porting mistake. It is applied by changing the model's settings at load
//! time (never by branching inside the forward pass), so the model code stays the math.

use std::fmt;
use std::str::FromStr;

/// A deliberate bug injected into the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Drop the q/k/v biases.
    NoQkvBias,
    /// Use the wrong RoPE base (10000 ↔ 1e6).
    RopeTheta,
    /// Rotate interleaved pairs (2i, 2i+1) instead of rotate_half.
    RopeInterleaved,
    /// Map query head h to kv head h % kv_heads instead of h / group.
    GqaOrder,
    /// Use a 10× larger RMSNorm epsilon.
    NormEps,
    /// Skip the final RMSNorm.
    NoFinalNorm,
    /// Let every token attend to future tokens.
    CausalMaskOff,
    /// Use the wrong matrix as LM head (embeddings for an untied model, and vice versa).
    UntiedHead,
    /// Round RoPE positions to bf16 (wrong beyond position 256).
    Bf16Positions,
}

impl Fault {
    /// Every fault, in the order `lockstep selftest` runs them.
    pub const ALL: [Fault; 9] = [
        Fault::NoQkvBias,
        Fault::RopeTheta,
        Fault::RopeInterleaved,
        Fault::GqaOrder,
        Fault::NormEps,
        Fault::NoFinalNorm,
        Fault::CausalMaskOff,
        Fault::UntiedHead,
        Fault::Bf16Positions,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Fault::NoQkvBias => "no-qkv-bias",
            Fault::RopeTheta => "rope-theta",
            Fault::RopeInterleaved => "rope-interleaved",
            Fault::GqaOrder => "gqa-order",
            Fault::NormEps => "norm-eps",
            Fault::NoFinalNorm => "no-final-norm",
            Fault::CausalMaskOff => "causal-mask-off",
            Fault::UntiedHead => "untied-head",
            Fault::Bf16Positions => "bf16-positions",
        }
    }

    /// The tensor (suffix of `layers.0.` or a top-level name) where the fault first enters.
    pub fn enters_at(self) -> &'static str {
        match self {
            Fault::NoQkvBias => "layers.0.q",
            Fault::RopeTheta | Fault::RopeInterleaved | Fault::Bf16Positions => "layers.0.q_rope",
            Fault::GqaOrder | Fault::CausalMaskOff => "layers.0.attn_probs",
            Fault::NormEps => "layers.0.input_norm",
            Fault::NoFinalNorm => "final_norm",
            Fault::UntiedHead => "logits",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Fault::ALL
            .iter()
            .copied()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Fault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown fault '{s}' (known: {})", names.join(", "))
            })
    }
}
