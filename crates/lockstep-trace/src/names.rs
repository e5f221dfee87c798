//! Canonical trace tensor names and their forward order.

use std::fmt;

/// Per-layer taps, in forward order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerTap {
    /// Input RMSNorm output, [B, T, H].
    InputNorm,
    /// Query projection after bias, before RoPE, [B, heads, T, D].
    Q,
    /// Key projection after bias, before RoPE, [B, kv_heads, T, D].
    K,
    /// Value projection after bias, [B, kv_heads, T, D].
    V,
    /// Query after the per-head RMSNorm `q_norm` (Qwen3 only), before RoPE, [B, heads, T, D].
    QNorm,
    /// Key after the per-head RMSNorm `k_norm` (Qwen3 only), before RoPE, [B, kv_heads, T, D].
    KNorm,
    /// Query after RoPE.
    QRope,
    /// Key after RoPE.
    KRope,
    /// Softmax output, [B, heads, T, S].
    AttnProbs,
    /// Attention output before o_proj, [B, T, heads*D].
    AttnOut,
    /// After o_proj, [B, T, H].
    OProj,
    /// Residual + attention, [B, T, H].
    ResidAttn,
    /// Post-attention RMSNorm output, [B, T, H].
    PostNorm,
    /// The MoE router's logits (sparse layers of Qwen3-MoE), [B, T, experts].
    RouterLogits,
    /// The experts each token is routed to, by descending routing probability (sparse layers),
    /// [B, T, top_k] int64.
    RouterTopkIds,
    /// The routing weights of those experts (after `norm_topk_prob`'s renormalisation, in the
    /// model dtype), [B, T, top_k].
    RouterTopkWeights,
    /// silu(gate) * up, [B, T, I] (dense MLP layers only).
    MlpAct,
    /// After down_proj, [B, T, H]; in sparse layers the weighted sum of the routed experts.
    MlpOut,
    /// Layer output, [B, T, H].
    Out,
}

impl LayerTap {
    /// All layer taps in forward order.
    pub const ALL: [LayerTap; 19] = [
        LayerTap::InputNorm,
        LayerTap::Q,
        LayerTap::K,
        LayerTap::V,
        LayerTap::QNorm,
        LayerTap::KNorm,
        LayerTap::QRope,
        LayerTap::KRope,
        LayerTap::AttnProbs,
        LayerTap::AttnOut,
        LayerTap::OProj,
        LayerTap::ResidAttn,
        LayerTap::PostNorm,
        LayerTap::RouterLogits,
        LayerTap::RouterTopkIds,
        LayerTap::RouterTopkWeights,
        LayerTap::MlpAct,
        LayerTap::MlpOut,
        LayerTap::Out,
    ];

    /// The suffix after `layers.{i}.`.
    pub fn suffix(self) -> &'static str {
        match self {
            LayerTap::InputNorm => "input_norm",
            LayerTap::Q => "q",
            LayerTap::K => "k",
            LayerTap::V => "v",
            LayerTap::QNorm => "q_norm",
            LayerTap::KNorm => "k_norm",
            LayerTap::QRope => "q_rope",
            LayerTap::KRope => "k_rope",
            LayerTap::AttnProbs => "attn_probs",
            LayerTap::AttnOut => "attn_out",
            LayerTap::OProj => "o_proj",
            LayerTap::ResidAttn => "resid_attn",
            LayerTap::PostNorm => "post_norm",
            LayerTap::RouterLogits => "router_logits",
            LayerTap::RouterTopkIds => "router_topk_ids",
            LayerTap::RouterTopkWeights => "router_topk_weights",
            LayerTap::MlpAct => "mlp_act",
            LayerTap::MlpOut => "mlp_out",
            LayerTap::Out => "out",
        }
    }

    /// Parses a suffix.
    pub fn from_suffix(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.suffix() == s)
    }
}

/// A canonical trace name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TapName {
    /// `tokens`, [B, T] int64.
    Tokens,
    /// `embed`, [B, T, H].
    Embed,
    /// `layers.{i}.{tap}`.
    Layer(usize, LayerTap),
    /// `final_norm`, [B, T, H].
    FinalNorm,
    /// `logits`, [B, T, V].
    Logits,
}

impl fmt::Display for TapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TapName::Tokens => f.write_str("tokens"),
            TapName::Embed => f.write_str("embed"),
            TapName::Layer(i, t) => write!(f, "layers.{i}.{}", t.suffix()),
            TapName::FinalNorm => f.write_str("final_norm"),
            TapName::Logits => f.write_str("logits"),
        }
    }
}

impl TapName {
    /// Parses a canonical name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tokens" => Some(TapName::Tokens),
            "embed" => Some(TapName::Embed),
            "final_norm" => Some(TapName::FinalNorm),
            "logits" => Some(TapName::Logits),
            _ => {
                let rest = s.strip_prefix("layers.")?;
                let (i, suffix) = rest.split_once('.')?;
                let i: usize = i.parse().ok()?;
                Some(TapName::Layer(i, LayerTap::from_suffix(suffix)?))
            }
        }
    }
}

/// Sort key of a name in forward order: canonical names by position, others after, by name.
pub fn forward_rank(name: &str) -> (u8, usize, usize, String) {
    match TapName::parse(name) {
        Some(TapName::Tokens) => (0, 0, 0, String::new()),
        Some(TapName::Embed) => (1, 0, 0, String::new()),
        Some(TapName::Layer(i, t)) => (
            2,
            i,
            LayerTap::ALL.iter().position(|x| *x == t).unwrap_or(0),
            String::new(),
        ),
        Some(TapName::FinalNorm) => (3, 0, 0, String::new()),
        Some(TapName::Logits) => (4, 0, 0, String::new()),
        None => (5, 0, 0, name.to_string()),
    }
}

/// Sorts names into forward order.
pub fn sort_forward<S: AsRef<str>>(names: &mut [S]) {
    names.sort_by_cached_key(|n| forward_rank(n.as_ref()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip_and_order() {
        for t in LayerTap::ALL {
            let n = TapName::Layer(12, t).to_string();
            assert_eq!(TapName::parse(&n), Some(TapName::Layer(12, t)));
        }
        let mut v = vec![
            "logits",
            "layers.10.q",
            "layers.2.out",
            "layers.2.q",
            "zzz",
            "embed",
            "tokens",
            "final_norm",
        ];
        sort_forward(&mut v);
        assert_eq!(
            v,
            vec![
                "tokens",
                "embed",
                "layers.2.q",
                "layers.2.out",
                "layers.10.q",
                "final_norm",
                "logits",
                "zzz"
            ]
        );
        assert_eq!(TapName::parse("layers.x.q"), None);
        assert_eq!(TapName::parse("layers.1.nope"), None);
    }
}
