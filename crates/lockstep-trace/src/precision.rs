//! The one name table for compute precisions: the engine computes in a [`Precision`], the
//! verifier judges in one (its tier), traces name one in their `dtype` metadata, and the command
//! line chooses a [`Dtype`] (a precision, or bf16 weights with f32 activations).

use serde::Serialize;

/// Which floating-point arithmetic a forward pass computes in (the verifier's precision tier).
///
/// Ordered from the most precise to the least: `F64 < F32 < BF16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE binary64 everywhere: no float32 step anywhere (the exact tier).
    F64,
    /// IEEE binary32, rounding where `transformers` rounds in float32.
    F32,
    /// bfloat16 activations, rounded at the points where `transformers`' bf16 forward rounds
    /// (float32 inside matmul accumulation, norms and softmax, as PyTorch does).
    BF16,
}

impl Precision {
    /// Every precision, most precise first.
    pub const ALL: [Precision; 3] = [Precision::F64, Precision::F32, Precision::BF16];

    /// The short name used on the command line, in trace metadata and in reports: `f64`, `f32`
    /// or `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F64 => "f64",
            Precision::F32 => "f32",
            Precision::BF16 => "bf16",
        }
    }

    /// The precision whose [`Precision::as_str`] is exactly `s`.
    pub fn from_name(s: &str) -> Option<Precision> {
        Precision::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Parses a compute dtype as written in trace metadata: `f64`/`float64`/`torch.float64`,
    /// `f32`/`float32`, `bf16`/`bfloat16` (case-insensitive). `None` for anything else.
    pub fn from_dtype(s: &str) -> Option<Precision> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_prefix("torch.").unwrap_or(&s);
        match s {
            "float64" | "double" => Some(Precision::F64),
            "float32" | "float" => Some(Precision::F32),
            "bfloat16" => Some(Precision::BF16),
            short => Precision::from_name(short),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a run computes in, as `--dtype` chooses it: a [`Precision`], `bf16w`, or `q8dot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// float64 everywhere (the exact tier).
    F64,
    /// float32, rounding where transformers does.
    F32,
    /// bf16 weights and activations, rounded where transformers' bf16 forward rounds.
    Bf16,
    /// bf16 weights as stored, float32 activations (faster and more accurate than bf16).
    Bf16w,
    /// float32, except that a matmul with a ggml block-quantized weight (GGUF) rounds its input
    /// to 8-bit blocks and sums with integer dot products, as llama.cpp's CPU backend does:
    /// faster than exact dequantized math, and not equal to it.
    Q8dot,
}

impl Dtype {
    /// Every choice, in the order the command line lists them.
    pub const ALL: [Dtype; 5] = [
        Dtype::F64,
        Dtype::F32,
        Dtype::Bf16,
        Dtype::Bf16w,
        Dtype::Q8dot,
    ];

    /// The arithmetic the forward pass runs in (`bf16w` and `q8dot` compute in float32).
    pub fn precision(self) -> Precision {
        match self {
            Dtype::F64 => Precision::F64,
            Dtype::F32 | Dtype::Bf16w | Dtype::Q8dot => Precision::F32,
            Dtype::Bf16 => Precision::BF16,
        }
    }

    /// The command-line (and trace `mode`) name: the precision's name, `bf16w` or `q8dot`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bf16w => "bf16w",
            Dtype::Q8dot => "q8dot",
            d => d.precision().as_str(),
        }
    }

    /// One line saying what the choice computes in (the command line's help).
    pub fn help(self) -> &'static str {
        match self {
            Dtype::F64 => "float64 everywhere (the exact tier)",
            Dtype::F32 => "float32, rounding where transformers does",
            Dtype::Bf16 => {
                "bf16 weights and activations, rounded where transformers' bf16 forward rounds"
            }
            Dtype::Bf16w => {
                "bf16 weights as stored, float32 activations (faster and more accurate than bf16)"
            }
            Dtype::Q8dot => {
                "quantized GGUF: float32, matmul inputs rounded to 8 bits for integer dot products, as llama.cpp's CPU backend (fast, not exact)"
            }
        }
    }

    /// Bytes of one activation value.
    pub fn activation_bytes(self) -> usize {
        match self.precision() {
            Precision::F64 => 8,
            Precision::F32 => 4,
            Precision::BF16 => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Precision::ALL {
            assert_eq!(Precision::from_name(p.as_str()), Some(p));
            assert_eq!(Precision::from_dtype(&p.as_str().to_uppercase()), Some(p));
        }
        assert_eq!(
            Precision::from_dtype("torch.bfloat16"),
            Some(Precision::BF16)
        );
        assert_eq!(Precision::from_dtype("f16"), None);
        assert_eq!(Precision::from_name("float32"), None);
        let names: Vec<_> = Dtype::ALL.iter().map(|d| d.name()).collect();
        assert_eq!(names, ["f64", "f32", "bf16", "bf16w", "q8dot"]);
        assert_eq!(Dtype::Bf16w.precision(), Precision::F32);
        assert!(Precision::F64 < Precision::F32 && Precision::F32 < Precision::BF16);
    }
}
