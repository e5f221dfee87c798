//! Deliberate bugs, to prove the verifier catches them (`lockstep verify --inject`).
//!
//! Each fault is a classic porting mistake. It is applied by changing the model's settings at load
//! time (never by branching inside the forward pass), so the model code stays the math; the
//! settings select a kernel variant where the mistake is in the arithmetic (the upcast mistakes:
//! softmax, RMSNorm variance, RoPE table or residual adds in the wrong dtype).

use crate::config::ModelConfig;
use crate::kernels::attention::GqaMapping;
use crate::kernels::norm::RmsNormMath;
use crate::kernels::rope::{RopeLayout, RopeRounding, RopeScaling, ScalingMistake};
use crate::kernels::ResidualDtype;
use crate::model::{QkNorm, Settings};
use std::fmt;
use std::str::FromStr;

/// A deliberate bug injected into the engine. Each variant's doc says where it enters (the trace
/// tensor it first changes, [`Fault::enters_at`]); every fault acts in every compute precision
/// (f64, f32, bf16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Drop the q/k/v biases. Enters at `layers.0.q`.
    NoQkvBias,
    /// Use the wrong RoPE base (10000 ↔ 1e6). Enters at `layers.0.q_rope`.
    RopeTheta,
    /// Rotate interleaved pairs (2i, 2i+1) instead of rotate_half. Enters at `layers.0.q_rope`.
    RopeInterleaved,
    /// Map query head h to kv head h % kv_heads instead of h / group. Enters at
    /// `layers.0.attn_probs`.
    GqaOrder,
    /// Use a 10× larger RMSNorm epsilon. Enters at `layers.0.input_norm`.
    NormEps,
    /// Skip the final RMSNorm. Enters at `final_norm`.
    NoFinalNorm,
    /// Let every token attend to future tokens. Enters at `layers.0.attn_probs`.
    CausalMaskOff,
    /// Use the wrong matrix as LM head (embeddings for an untied model, and vice versa). Enters
    /// at `logits`.
    UntiedHead,
    /// Round RoPE positions to bf16 (wrong beyond position 256). Enters at `layers.0.q_rope`.
    Bf16Positions,
    /// The attention softmax computed in bf16 instead of float32: `s - max`, each exp, the sum
    /// and each quotient rounded to bf16. Enters at `layers.0.attn_probs` (from the second
    /// token: one key gets probability 1 either way).
    SoftmaxBf16,
    /// RMSNorm's variance computed in bf16, as a port that forgets to upcast does: each x² and
    /// mean(x²) rounded to bf16 (every norm). Enters at `layers.0.input_norm`.
    NormVarianceBf16,
    /// RoPE inverse frequencies computed in bf16 (exponent, power and quotient rounded) and the
    /// angles position × inv_freq rounded to bf16. Enters at `layers.0.q_rope` (from the second
    /// token: position 0 is not rotated).
    RopeBf16InvFreq,
    /// RMSNorm as `x / (sqrt(mean(x²)) + eps)` instead of `x * rsqrt(mean(x²) + eps)` (every
    /// norm). A relative change of about eps / (2 mean(x²)) - eps / rms: the smaller the
    /// activations, the larger (1e-6 at rms 1 with eps 1e-6, 1e-3 at rms 0.02).
    /// Enters at `layers.0.input_norm`.
    NormEpsOutsideSqrt,
    /// The residual adds in the wrong dtype. In the f64 and f32 tiers each residual sum is rounded
    /// to bf16 (a port whose residual stream stays in bf16 while the rest computes in float32);
    /// in the bf16 tier no residual sum is rounded (a port whose residual stream is float32,
    /// its embeddings or first sum upcast and never cast back). Enters at `layers.0.resid_attn`.
    ResidualBf16,
    /// The sliding window one key too wide: the query at `i` also sees key `i - w`
    /// (`kv_idx >= q_idx - w` instead of `>`). Enters at the first windowed layer's `attn_probs`
    /// ([`Fault::enters_at_in`]) once a sequence is longer than the window; only models with a
    /// sliding window ([`Fault::applies_to`]).
    WindowOffByOne,
    /// yarn RoPE without its attention factor: cos and sin not multiplied by it (only for models
    /// with yarn scaling). Enters at `layers.0.q_rope`.
    YarnNoAttentionFactor,
    /// llama3 RoPE with the medium band not smoothed (those frequencies left unscaled; only for
    /// models with llama3 scaling). Enters at `layers.0.q_rope` (from the second token).
    Llama3NoSmoothing,
    /// Qwen3's per-head q/k RMSNorm (`q_norm`, `k_norm`) left out. Enters at `layers.0.q_norm`.
    QkNormSkipped,
    /// Qwen3's per-head q/k RMSNorm applied after RoPE instead of before. Enters at
    /// `layers.0.q_norm` (which then still holds the unnormalized projection).
    QkNormAfterRope,
    /// The MoE router's top-k weights normalised the wrong way: renormalised to sum to 1 when
    /// `norm_topk_prob` is false, left as probabilities when it is true (only for models with
    /// experts). Enters at the first sparse layer's `router_topk_weights`.
    TopkNormWrong,
    /// The MoE router's softmax taken over the top-k logits instead of over every expert before
    /// the top-k (only for models with experts and `norm_topk_prob` false: with it true both
    /// orders give the same weights). Enters at the first sparse layer's `router_topk_weights`.
    SoftmaxAfterTopk,
}

impl Fault {
    /// Every fault, in the order `lockstep selftest` runs them.
    pub const ALL: [Fault; 21] = [
        Fault::NoQkvBias,
        Fault::RopeTheta,
        Fault::RopeInterleaved,
        Fault::GqaOrder,
        Fault::NormEps,
        Fault::NoFinalNorm,
        Fault::CausalMaskOff,
        Fault::UntiedHead,
        Fault::Bf16Positions,
        Fault::SoftmaxBf16,
        Fault::NormVarianceBf16,
        Fault::RopeBf16InvFreq,
        Fault::NormEpsOutsideSqrt,
        Fault::ResidualBf16,
        Fault::WindowOffByOne,
        Fault::YarnNoAttentionFactor,
        Fault::Llama3NoSmoothing,
        Fault::QkNormSkipped,
        Fault::QkNormAfterRope,
        Fault::TopkNormWrong,
        Fault::SoftmaxAfterTopk,
    ];

    /// Makes `settings` (those `config` asks for) wrong the way this fault is. Faults in the
    /// weights themselves (dropped biases, the wrong head) are applied where weights load.
    pub fn apply(self, settings: &mut Settings, config: &ModelConfig) {
        let s = settings;
        match self {
            Fault::NormEps => s.rms_norm_eps = config.rms_norm_eps * 10.0,
            Fault::RopeTheta if config.rope_theta == 10000.0 => s.rope_theta = 1e6,
            Fault::RopeTheta => s.rope_theta = 10000.0,
            Fault::RopeInterleaved => s.rope_layout = RopeLayout::Interleaved,
            Fault::Bf16Positions => s.rope_rounding = RopeRounding::Bf16Positions,
            Fault::RopeBf16InvFreq => s.rope_rounding = RopeRounding::Bf16InvFreq,
            Fault::NormVarianceBf16 => s.norm_math = RmsNormMath::VarianceBf16,
            Fault::NormEpsOutsideSqrt => s.norm_math = RmsNormMath::EpsOutsideSqrt,
            Fault::SoftmaxBf16 => s.softmax_bf16 = true,
            Fault::ResidualBf16 => s.residual = ResidualDtype::Wrong,
            Fault::GqaOrder => s.gqa = GqaMapping::RoundRobin,
            Fault::CausalMaskOff => s.causal = false,
            Fault::NoFinalNorm => s.final_norm = false,
            Fault::WindowOffByOne => {
                for w in s.windows.iter_mut().flatten() {
                    *w += 1;
                }
            }
            Fault::YarnNoAttentionFactor => s.rope_mistake = ScalingMistake::YarnNoAttentionFactor,
            Fault::Llama3NoSmoothing => s.rope_mistake = ScalingMistake::Llama3NoSmoothing,
            Fault::QkNormSkipped => s.qk_norm = QkNorm::Skipped,
            Fault::QkNormAfterRope => s.qk_norm = QkNorm::AfterRope,
            Fault::TopkNormWrong => s.router.normalize = !s.router.normalize,
            Fault::SoftmaxAfterTopk => s.router.softmax_after_topk = true,
            Fault::NoQkvBias | Fault::UntiedHead => {}
        }
    }

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
            Fault::SoftmaxBf16 => "softmax-bf16",
            Fault::NormVarianceBf16 => "norm-variance-bf16",
            Fault::RopeBf16InvFreq => "rope-bf16-inv-freq",
            Fault::NormEpsOutsideSqrt => "norm-eps-outside-sqrt",
            Fault::ResidualBf16 => "residual-bf16",
            Fault::WindowOffByOne => "window-off-by-one",
            Fault::YarnNoAttentionFactor => "yarn-no-attention-factor",
            Fault::Llama3NoSmoothing => "llama3-no-smoothing",
            Fault::QkNormSkipped => "qk-norm-skipped",
            Fault::QkNormAfterRope => "qk-norm-after-rope",
            Fault::TopkNormWrong => "topk-norm-wrong",
            Fault::SoftmaxAfterTopk => "softmax-after-topk",
        }
    }

    /// One line saying what the fault does (the porting mistake it stands for).
    pub fn description(self) -> &'static str {
        match self {
            Fault::NoQkvBias => "q/k/v projection biases dropped",
            Fault::RopeTheta => "wrong RoPE base (10000 and 1e6 swapped)",
            Fault::RopeInterleaved => "RoPE rotating interleaved pairs instead of rotate_half",
            Fault::GqaOrder => "query head h reads kv head h % kv_heads instead of h / group",
            Fault::NormEps => "RMSNorm epsilon 10x too large",
            Fault::NoFinalNorm => "final RMSNorm skipped",
            Fault::CausalMaskOff => "no causal mask: tokens attend to future tokens",
            Fault::UntiedHead => "wrong LM head matrix (tied vs untied)",
            Fault::Bf16Positions => "RoPE positions rounded to bf16",
            Fault::SoftmaxBf16 => "attention softmax in bf16 instead of float32",
            Fault::NormVarianceBf16 => "RMSNorm variance (x², mean) rounded to bf16",
            Fault::RopeBf16InvFreq => "RoPE inv_freq and angles computed in bf16",
            Fault::NormEpsOutsideSqrt => "RMSNorm as x / (sqrt(mean(x²)) + eps)",
            Fault::ResidualBf16 => {
                "residual adds in the wrong dtype (bf16 in the f32/f64 tiers, float32 in bf16)"
            }
            Fault::WindowOffByOne => "sliding window one key too wide (kv_idx >= q_idx - window)",
            Fault::YarnNoAttentionFactor => "yarn RoPE without its attention factor on cos/sin",
            Fault::Llama3NoSmoothing => "llama3 RoPE with the medium band not smoothed",
            Fault::QkNormSkipped => "per-head q/k RMSNorm (q_norm, k_norm) skipped",
            Fault::QkNormAfterRope => "per-head q/k RMSNorm applied after RoPE instead of before",
            Fault::TopkNormWrong => {
                "MoE top-k weights normalised the wrong way (norm_topk_prob inverted)"
            }
            Fault::SoftmaxAfterTopk => {
                "MoE router softmax over the top-k logits instead of before the top-k"
            }
        }
    }

    /// The tensor (suffix of `layers.0.` or a top-level name) where the fault first enters: the
    /// first trace tap (in forward order) it changes.
    pub fn enters_at(self) -> &'static str {
        match self {
            Fault::NoQkvBias => "layers.0.q",
            Fault::RopeTheta
            | Fault::RopeInterleaved
            | Fault::Bf16Positions
            | Fault::RopeBf16InvFreq => "layers.0.q_rope",
            Fault::GqaOrder | Fault::CausalMaskOff | Fault::SoftmaxBf16 | Fault::WindowOffByOne => {
                "layers.0.attn_probs"
            }
            Fault::NormEps | Fault::NormVarianceBf16 | Fault::NormEpsOutsideSqrt => {
                "layers.0.input_norm"
            }
            Fault::ResidualBf16 => "layers.0.resid_attn",
            Fault::YarnNoAttentionFactor | Fault::Llama3NoSmoothing => "layers.0.q_rope",
            Fault::QkNormSkipped | Fault::QkNormAfterRope => "layers.0.q_norm",
            Fault::TopkNormWrong | Fault::SoftmaxAfterTopk => "layers.0.router_topk_weights",
            Fault::NoFinalNorm => "final_norm",
            Fault::UntiedHead => "logits",
        }
    }
}

impl Fault {
    /// Whether the fault can change anything on a model configured like `config` (a fault that
    /// cannot is left out of `selftest`): a window off by one needs a sliding window, the
    /// RoPE-scaling faults their scaling type, the q/k-norm faults a q/k norm, dropping the q/k/v
    /// biases a model that has them, the router faults a model with experts (a softmax after the
    /// top-k only without `norm_topk_prob`); every other fault applies to every model.
    pub fn applies_to(self, config: &ModelConfig) -> bool {
        match self {
            Fault::NoQkvBias => config.qkv_bias,
            Fault::QkNormSkipped | Fault::QkNormAfterRope => config.arch.has_qk_norm(),
            Fault::WindowOffByOne => config.sliding_windows.iter().any(Option::is_some),
            Fault::YarnNoAttentionFactor => {
                matches!(config.rope_scaling, RopeScaling::Yarn { attention_factor, .. } if attention_factor != 1.0)
            }
            Fault::Llama3NoSmoothing => matches!(config.rope_scaling, RopeScaling::Llama3 { .. }),
            Fault::TopkNormWrong => config.moe.as_ref().is_some_and(|m| m.num_sparse() > 0),
            // k = 1 with norm_topk_prob false still changes (p becomes 1).
            Fault::SoftmaxAfterTopk => config
                .moe
                .as_ref()
                .is_some_and(|m| m.num_sparse() > 0 && !m.norm_topk_prob),
            _ => true,
        }
    }

    /// [`Fault::enters_at`] on a model configured like `config`: the window fault enters at the
    /// first layer that has a window (Qwen2's first layers can be full).
    pub fn enters_at_in(self, config: &ModelConfig) -> String {
        match self {
            Fault::WindowOffByOne => {
                let first = config.sliding_windows.iter().position(Option::is_some);
                format!("layers.{}.attn_probs", first.unwrap_or(0))
            }
            Fault::TopkNormWrong | Fault::SoftmaxAfterTopk => {
                let first = config
                    .moe
                    .as_ref()
                    .and_then(|m| m.sparse_layers.iter().position(|&s| s));
                format!("layers.{}.router_topk_weights", first.unwrap_or(0))
            }
            _ => self.enters_at().to_string(),
        }
    }
}

impl Fault {
    /// Whether the fault is made at `tap` on a model configured like `config`: its entry
    /// ([`Self::enters_at_in`]), or, for a mistake in the RMSNorm arithmetic, any RMSNorm (input,
    /// Qwen3's per-head q/k norms, post-attention, final): the same mistake is made in each, so
    /// where one is lost in the tier's rounding the op-level judgement rightly names the next.
    pub fn is_made_at(self, tap: &str, config: &ModelConfig) -> bool {
        use lockstep_trace::{LayerTap, TapName};
        if tap == self.enters_at_in(config) {
            return true;
        }
        match self {
            Fault::NormEps | Fault::NormVarianceBf16 | Fault::NormEpsOutsideSqrt => matches!(
                TapName::parse(tap),
                Some(
                    TapName::Layer(
                        _,
                        LayerTap::InputNorm
                            | LayerTap::QNorm
                            | LayerTap::KNorm
                            | LayerTap::PostNorm
                    ) | TapName::FinalNorm
                )
            ),
            _ => false,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fault name that names no fault; the message lists the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown fault '{name}' (known: {})", Fault::ALL.map(|f| f.name()).join(", "))]
pub struct UnknownFault {
    /// The name given.
    pub name: String,
}

impl FromStr for Fault {
    type Err = UnknownFault;
    fn from_str(s: &str) -> Result<Self, UnknownFault> {
        Fault::ALL
            .iter()
            .copied()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFault { name: s.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_norm_mistake_is_made_at_every_rmsnorm_and_others_only_at_their_entry() {
        let c = ModelConfig::from_json_str(
            r#"{"architectures":["Qwen3ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
            "head_dim":16}"#,
        )
        .unwrap();
        for tap in [
            "layers.0.input_norm",
            "layers.0.q_norm",
            "layers.1.k_norm",
            "layers.0.post_norm",
            "final_norm",
        ] {
            assert!(Fault::NormVarianceBf16.is_made_at(tap, &c), "{tap}");
        }
        for tap in ["layers.0.q_rope", "layers.0.mlp_out", "logits", "nonsense"] {
            assert!(!Fault::NormVarianceBf16.is_made_at(tap, &c), "{tap}");
        }
        assert!(Fault::QkNormSkipped.is_made_at("layers.0.q_norm", &c));
        assert!(!Fault::QkNormSkipped.is_made_at("layers.0.k_norm", &c));
        assert!(!Fault::SoftmaxBf16.is_made_at("layers.0.input_norm", &c));
    }

    #[test]
    fn names_round_trip_and_are_unique() {
        for f in Fault::ALL {
            assert_eq!(f.name().parse::<Fault>(), Ok(f));
            assert!(!f.description().is_empty());
            assert!(
                f.enters_at().starts_with("layers.0.")
                    || ["final_norm", "logits"].contains(&f.enters_at()),
                "{f}"
            );
        }
        let mut names: Vec<_> = Fault::ALL.iter().map(|f| f.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Fault::ALL.len());
        assert!("softmax-f16"
            .parse::<Fault>()
            .unwrap_err()
            .to_string()
            .contains("softmax-bf16"));
    }
}
