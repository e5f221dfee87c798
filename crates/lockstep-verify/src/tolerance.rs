//! Precision tiers and the tolerance each tier applies to each tensor.
//!
//! A fixed tolerance cannot tell a bug from rounding: the old JAX port's bf16 logits were 0.14 to
//! 3.32 off PyTorch against a 1e-4 tolerance, and PyTorch bf16 is itself 0.13 to 0.40 off its own
//! float64 run (docs/numerics.md, "The three tiers"). So every tier is judged against the yardstick that
//! fits it:
//!
//! | tier | judged distance | threshold |
//! |---|---|---|
//! | f64 | `max|ours − ref|` | `1e-9 · max(1, max|ref|)`; logits `1e-9` |
//! | f32 | `max|ours − ref|`, or `max|ours − oracle|` when only that is within the threshold | logits `max(1e-4, 3 · max|ref − oracle|)`; other tensors `max(3 · max|ref − oracle|, 64 · ε_f32 · max(1, max|ref|))`, or `2e-4 · max(1, max|ref|)` (against the reference) without an oracle |
//! | bf16 | `max|ours − oracle|` | `max(2 · max|ref − oracle|, bf16 half-ulp of max|oracle|)`; logits also need top-1 agreement with the oracle ≥ the reference's − 0.02 |
//!
//! "oracle" is the pure-float64 reference run (RMSNorm, RoPE tables and softmax lifted to f64) on
//! the same weights and tokens.
//!
//! Non-finite values are outside every rule: a NaN or infinity in the test, the reference, or
//! the oracle a rule measures against fails the tensor ([`crate::compare::Status::NonFinite`]),
//! and a non-finite `max|ref − oracle|` never widens a threshold ([`finite_noise`]).

use lockstep_trace::Precision;
use lockstep_trace::{TapName, TensorData, Trace};
use serde::Serialize;

/// f64 tier: the scale-aware tolerance factor on every tensor, and the absolute one on logits.
///
/// docs/numerics.md: a pure-f64 reference agrees with an independent numpy f64 implementation to 1e-14 on
/// logits at 300 tokens, so in this tier any difference above ~1e-9 is a bug, never rounding.
pub const F64_TOLERANCE: f64 = 1e-9;

/// f32 tier: absolute tolerance on logits (the old report's own threshold, fit for logits of
/// order 10). docs/numerics.md records PyTorch f32 against its f64 run at 1e-5 to 2e-5 on random models
/// and 3e-5 to 7e-5 on real SmolLM2 weights.
pub const F32_LOGITS_TOLERANCE: f64 = 1e-4;

/// f32 tier: how many times the reference's own distance from the oracle ours may be
/// (docs/numerics.md: "a multiple of the reference's own f32 noise (e.g. 3 × |ref_f32 − oracle|)").
pub const F32_NOISE_MULTIPLE: f64 = 3.0;

/// f32 tier: the floor under the noise multiple, in units of f32 epsilon (1.19e-7 = 2⁻²³) times
/// `max(1, max|ref|)`: 64 to 128 f32 ulps of that magnitude (an f32 ulp at `m` is between
/// `ε·m/2` and `ε·m`). It keeps tensors the reference computes (almost) exactly, such as the
/// embedding rows, from demanding bit-identity from a different summation order.
pub const F32_FLOOR_EPSILONS: f64 = 64.0;

/// f32 tier without an oracle: the bound relative to `max(1, max|ref|)`. Twice the logits
/// tolerance at scale 1; it only catches gross errors, which is why an oracle is recommended.
pub const F32_NO_ORACLE_REL: f64 = 2e-4;

/// bf16 tier: how many times the reference's distance from the oracle ours may be (docs/numerics.md:
/// "ours passes when its distance from the oracle is no worse than the reference's own (≤ 2×)").
pub const BF16_NOISE_MULTIPLE: f64 = 2.0;

/// bf16 tier: how far ours' top-1 agreement with the oracle may fall below the reference's
/// (docs/numerics.md: PyTorch bf16 top-1 agreement of 0.90 to 1.0), or one position where that
/// is more ([`bf16_top1_slack`]).
pub const BF16_TOP1_SLACK: f64 = 0.02;

/// The bf16 tier's top-1 slack over `positions` positions: [`BF16_TOP1_SLACK`], or one position
/// (`1 / positions`) where that is more, the resolution of the statistic. On a short input two
/// bf16 runs as good as each other part from the oracle on different near-ties, so one more
/// parting than the reference's is no evidence (seen on a 21-token input of a random 0.5B
/// model: PyTorch bf16 2 partings, lockstep 3, every tensor within 0.54× its bound). The q8dot
/// phase's rule has the same floor.
pub fn bf16_top1_slack(positions: usize) -> f64 {
    BF16_TOP1_SLACK.max(1.0 / positions.max(1) as f64)
}

/// Endpoint verification (`verify --endpoint`): the bound on the KL divergence over a server's
/// returned top-k, as a multiple of the square of the tier's |Δ logprob| bound `b`. When every
/// log-probability is within `b` of the reference's, the log-ratio of the two renormalised
/// distributions spans at most `2b`, and Hoeffding's lemma bounds their KL by `(2b)²/8 = b²/2`;
/// a KL above it means the returned distribution is shaped differently, not just shifted.
pub const ENDPOINT_KL_FACTOR: f64 = 0.5;

/// The precision tier a comparison is judged in, from the traces' compute dtype: the shared
/// [`Precision`] (`F64 < F32 < BF16`, most precise first).
///
/// - `F64`: both sides in float64 against a pure-f64 reference: exact math, 1e-9.
/// - `F32`: both sides in float32: small multiples of the reference's own f32 noise.
/// - `BF16`: judged against the pure-f64 oracle, no worse than 2× the reference's distance.
pub type Tier = Precision;

/// The rule each tier is judged by, stated for reports.
pub trait TierRule {
    /// One paragraph stating the tier's rule, for reports.
    fn rule_description(self) -> &'static str;
}

impl TierRule for Tier {
    fn rule_description(self) -> &'static str {
        match self {
            Tier::F64 => {
                "f64 tier (exact math): every tensor within 1e-9 · max(1, max|ref|) of the \
                 reference, logits within 1e-9. A pure-f64 reference agrees with an independent \
                 f64 implementation to ~1e-14, so anything above 1e-9 is a bug, not rounding."
            }
            Tier::F32 => {
                "f32 tier: logits within max(1e-4, 3 × max|ref − oracle|) of the reference; every \
                 other tensor within max(3 × max|ref − oracle|, 64·ε_f32·max(1, max|ref|)) when the \
                 f64 oracle is given, else within 2e-4 · max(1, max|ref|). With the oracle, a tensor \
                 over that bound from the reference still passes when it is within the same bound \
                 of the oracle (the reference's own error is in |ours − ref|)."
            }
            Tier::BF16 => {
                "bf16 tier: bit-level agreement with PyTorch bf16 is out of reach, so ours is \
                 judged against the pure-f64 oracle: max|ours − oracle| ≤ max(2 × max|ref − \
                 oracle|, bf16 half-ulp of max|oracle|) on every tensor; on logits ours' top-1 \
                 agreement with the oracle must also be at least the reference's minus 0.02 (or minus one \
                 position, when that is more)."
            }
        }
    }
}

/// Why a policy could not be chosen for a set of traces. Each renders as one line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// A trace names no compute dtype and holds no float logits to infer it from.
    #[error("cannot tell the compute dtype of the {side} trace: no `dtype` metadata and no float `logits` tensor")]
    MissingDtype {
        /// `reference`, `test` or `oracle`.
        side: &'static str,
    },
    /// A trace's `dtype` metadata names no known tier.
    #[error("the {side} trace has compute dtype '{dtype}', which no precision tier covers (f64, f32, bf16)")]
    UnknownDtype {
        /// `reference`, `test` or `oracle`.
        side: &'static str,
        /// The dtype as written.
        dtype: String,
    },
    /// The test trace is less precise than the reference, so neither tier's yardstick applies.
    #[error("the test trace is {test} but the reference is {reference}: compare against a reference run in {test}, or choose the tier explicitly")]
    TierMismatch {
        /// The reference's tier.
        reference: Tier,
        /// The test's tier.
        test: Tier,
    },
    /// The bf16 tier was chosen but no oracle trace was given.
    #[error("the bf16 tier judges against the pure-f64 oracle: pass an f64 oracle trace of the same model and tokens")]
    OracleRequired,
    /// The oracle trace is not a float64 run.
    #[error("the oracle trace must be a pure float64 run, but its dtype is {dtype}")]
    OracleNotF64 {
        /// The oracle's dtype as written or inferred.
        dtype: String,
    },
}

/// A bound relative to a tensor's magnitude: `max(abs, rel · max(1, magnitude))`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bound {
    /// Absolute part.
    pub abs: f64,
    /// Part relative to `max(1, magnitude)`.
    pub rel: f64,
}

impl Bound {
    /// The bound for a tensor whose largest finite |value| is `magnitude`.
    pub fn resolve(&self, magnitude: f64) -> f64 {
        self.abs.max(self.rel * magnitude.max(1.0))
    }

    /// Human-readable form, e.g. `1e-9·max(1,|ref|)`.
    pub fn describe(&self) -> String {
        match (self.abs > 0.0, self.rel > 0.0) {
            (true, false) => format!("{:.0e}", self.abs),
            (false, true) => format!("{:.2e}·max(1,|ref|)", self.rel),
            (true, true) => format!("max({:.0e}, {:.2e}·max(1,|ref|))", self.abs, self.rel),
            (false, false) => "0".into(),
        }
    }
}

/// The rule one tensor is judged by. [`crate::compare::compare_tensors`] turns it into a number
/// from the data (the tensor's magnitude and the reference's distance from the oracle).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Tolerance {
    /// `max|ours − ref| ≤ bound` (f64 tier; also any fixed bound).
    Fixed {
        /// The bound.
        bound: Bound,
    },
    /// `max|ours − ref| ≤ max(k · max|ref − oracle|, floor)` when the oracle holds the tensor,
    /// else `≤ without_oracle` (f32 tier). With the oracle, a tensor over that bound passes when
    /// `max|ours − oracle|` is within the same bound: `|ours − ref|` also holds the reference's
    /// own error, which can point the other way (docs/numerics.md, "f32").
    NoiseMultiple {
        /// The multiple of the reference's own noise.
        k: f64,
        /// The floor under the noise multiple.
        floor: Bound,
        /// The bound used when no oracle tensor is available.
        without_oracle: Bound,
    },
    /// `max|ours − oracle| ≤ max(k · max|ref − oracle|, half-ulp_bf16(max|oracle|))` (bf16 tier).
    /// Without an oracle tensor the tensor cannot be judged.
    OracleRelative {
        /// The multiple of the reference's distance from the oracle.
        k: f64,
        /// On logits: ours' top-1 agreement with the oracle may be at most this much below the
        /// reference's.
        top1_slack: Option<f64>,
    },
}

/// Chooses the [`Tolerance`] for every tensor of a comparison, by tier.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TolerancePolicy {
    /// The tier the comparison is judged in.
    pub tier: Tier,
    /// How the tier was chosen, and anything a reader should know (e.g. an inferred dtype).
    pub notes: Vec<String>,
}

impl TolerancePolicy {
    /// The policy for an explicitly chosen tier.
    pub fn new(tier: Tier) -> Self {
        Self {
            tier,
            notes: Vec::new(),
        }
    }

    /// Chooses the tier from the traces' `dtype` metadata (see [`Self::for_traces_with_tier`]).
    pub fn for_traces(
        reference: &Trace,
        test: &Trace,
        oracle: Option<&Trace>,
    ) -> Result<Self, PolicyError> {
        Self::for_traces_with_tier(reference, test, oracle, None)
    }

    /// Chooses the tier, or takes `tier` when given (an explicit override).
    ///
    /// Without an override the tier is the reference's compute dtype (metadata `dtype`; when
    /// absent, inferred from the storage dtype of `logits`, noted in [`Self::notes`] because a
    /// bf16 run may store f32 logits). A test trace more precise than the reference is judged in
    /// the reference's tier (e.g. bf16 weights with f32 activations against PyTorch bf16); a
    /// less precise one is an error. The bf16 tier requires an oracle, and an oracle must be f64.
    pub fn for_traces_with_tier(
        reference: &Trace,
        test: &Trace,
        oracle: Option<&Trace>,
        tier: Option<Tier>,
    ) -> Result<Self, PolicyError> {
        let mut notes = Vec::new();
        if let Some(o) = oracle {
            match trace_tier(o, "oracle", &mut notes) {
                Ok(Tier::F64) => {}
                Ok(t) => {
                    return Err(PolicyError::OracleNotF64 {
                        dtype: t.to_string(),
                    })
                }
                Err(PolicyError::UnknownDtype { dtype, .. }) => {
                    return Err(PolicyError::OracleNotF64 { dtype })
                }
                Err(e) => return Err(e),
            }
        }
        let tier = match tier {
            Some(t) => {
                notes.push(format!("tier {t} chosen explicitly"));
                t
            }
            None => {
                let r = trace_tier(reference, "reference", &mut notes)?;
                let t = trace_tier(test, "test", &mut notes)?;
                if t > r {
                    return Err(PolicyError::TierMismatch {
                        reference: r,
                        test: t,
                    });
                }
                if t != r {
                    notes.push(format!(
                        "test trace is {t}, reference is {r}: judged in the reference's {r} tier"
                    ));
                }
                r
            }
        };
        if tier == Tier::BF16 && oracle.is_none() {
            return Err(PolicyError::OracleRequired);
        }
        Ok(Self { tier, notes })
    }

    /// The rule for the tensor `name` in this policy's tier.
    pub fn tolerance_for(&self, name: &str) -> Tolerance {
        let logits = TapName::parse(name) == Some(TapName::Logits);
        match self.tier {
            Tier::F64 => Tolerance::Fixed {
                bound: if logits {
                    Bound {
                        abs: F64_TOLERANCE,
                        rel: 0.0,
                    }
                } else {
                    Bound {
                        abs: 0.0,
                        rel: F64_TOLERANCE,
                    }
                },
            },
            Tier::F32 if logits => {
                let b = Bound {
                    abs: F32_LOGITS_TOLERANCE,
                    rel: 0.0,
                };
                Tolerance::NoiseMultiple {
                    k: F32_NOISE_MULTIPLE,
                    floor: b,
                    without_oracle: b,
                }
            }
            Tier::F32 => Tolerance::NoiseMultiple {
                k: F32_NOISE_MULTIPLE,
                floor: Bound {
                    abs: 0.0,
                    rel: F32_FLOOR_EPSILONS * f32::EPSILON as f64,
                },
                without_oracle: Bound {
                    abs: 0.0,
                    rel: F32_NO_ORACLE_REL,
                },
            },
            Tier::BF16 => Tolerance::OracleRelative {
                k: BF16_NOISE_MULTIPLE,
                top1_slack: logits.then_some(BF16_TOP1_SLACK),
            },
        }
    }
}

/// The reference's noise `max|ref − oracle|` as a tolerance may use it: `None` when it is not a
/// finite number (a NaN or infinity on either side would otherwise make `k × noise` infinite and
/// let anything pass).
pub fn finite_noise(noise: f64) -> Option<f64> {
    noise.is_finite().then_some(noise)
}

/// Half a bf16 unit in the last place at magnitude `m` (bf16 keeps 8 significant bits): the
/// smallest difference a bf16 computation can be expected to resolve there. 0 for `m ≤ 0`.
pub fn bf16_half_ulp(m: f64) -> f64 {
    if m > 0.0 && m.is_finite() {
        2f64.powi(m.log2().floor() as i32 - 8)
    } else {
        0.0
    }
}

/// The tier of one trace: its `dtype` metadata, else the storage dtype of its `logits`.
fn trace_tier(t: &Trace, side: &'static str, notes: &mut Vec<String>) -> Result<Tier, PolicyError> {
    if let Some(d) = t.metadata.get("dtype") {
        return Tier::from_dtype(d).ok_or_else(|| PolicyError::UnknownDtype {
            side,
            dtype: d.clone(),
        });
    }
    let inferred = match t.get("logits").map(|l| &l.data) {
        Some(TensorData::F64(_)) => Tier::F64,
        Some(TensorData::F32(_)) => Tier::F32,
        Some(TensorData::BF16(_)) => Tier::BF16,
        _ => return Err(PolicyError::MissingDtype { side }),
    };
    notes.push(format!(
        "the {side} trace has no `dtype` metadata: {inferred} inferred from its logits storage"
    ));
    Ok(inferred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_ulp() {
        assert_eq!(bf16_half_ulp(1.0), 2f64.powi(-8));
        assert_eq!(bf16_half_ulp(1.5), 2f64.powi(-8));
        assert_eq!(bf16_half_ulp(8.0), 2f64.powi(-5));
        assert_eq!(bf16_half_ulp(0.0), 0.0);
    }

    #[test]
    fn non_finite_noise_never_widens() {
        assert_eq!(finite_noise(1e-5), Some(1e-5));
        assert_eq!(finite_noise(f64::INFINITY), None);
        assert_eq!(finite_noise(f64::NAN), None);
    }

    #[test]
    fn dtype_names() {
        assert_eq!(Tier::from_dtype("torch.bfloat16"), Some(Tier::BF16));
        assert_eq!(Tier::from_dtype("F32"), Some(Tier::F32));
        assert_eq!(Tier::from_dtype("float64"), Some(Tier::F64));
        assert_eq!(Tier::from_dtype("f16"), None);
    }
}
