//! Rotary position embeddings, `transformers`' default RoPE.
//!
//! `inv_freq[i] = 1 / theta^(2i / D)`, angle = position × inv_freq, and the rotate-half layout:
//! element `i` pairs with `i + D/2` (not interleaved pairs `2i, 2i+1`). In the f32 tier the table is
//! computed in float32 exactly where HF computes it in float32 (inv_freq, the position × inv_freq
//! product, cos and sin); in the f64 tier every step is float64.

use super::{Float, Precision};

/// How the two halves of a head are paired by the rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// HF / Qwen2 / Llama: `x[i]` pairs with `x[i + D/2]` (`rotate_half`).
    RotateHalf,
    /// GPT-J style: `x[2i]` pairs with `x[2i+1]` (a classic porting mistake for these models).
    Interleaved,
}

/// cos/sin tables for a list of positions (one per token).
#[derive(Debug, Clone)]
pub struct RopeTable<T> {
    /// Head dimension D.
    pub head_dim: usize,
    /// cos, `[positions][D/2]`.
    pub cos: Vec<T>,
    /// sin, `[positions][D/2]`.
    pub sin: Vec<T>,
    /// Pairing layout.
    pub layout: RopeLayout,
}

/// The inverse frequencies, computed as HF does for the given precision.
pub fn inv_freq<T: Float>(theta: f64, head_dim: usize) -> Vec<T> {
    (0..head_dim / 2)
        .map(|i| match T::PRECISION {
            Precision::F64 => T::from_f64(1.0 / theta.powf((2 * i) as f64 / head_dim as f64)),
            Precision::F32 | Precision::BF16 => {
                let e = (2 * i) as f32 / head_dim as f32;
                T::from_f64((1.0f32 / (theta as f32).powf(e)) as f64)
            }
        })
        .collect()
}

impl<T: Float> RopeTable<T> {
    /// Builds the table for positions `start..start + len`. `position_round` lets a fault
    /// injection round positions (e.g. to bf16) before the angle is taken.
    pub fn new(
        theta: f64,
        head_dim: usize,
        start: usize,
        len: usize,
        layout: RopeLayout,
        position_round: Option<fn(f64) -> f64>,
    ) -> Self {
        let positions: Vec<usize> = (start..start + len).collect();
        Self::at_positions(theta, head_dim, &positions, layout, position_round)
    }

    /// Builds the table for explicit positions, one per token (left-padded batches: each row's
    /// positions count only its real tokens, as transformers derives `position_ids` from the mask).
    pub fn at_positions(
        theta: f64,
        head_dim: usize,
        positions: &[usize],
        layout: RopeLayout,
        position_round: Option<fn(f64) -> f64>,
    ) -> Self {
        let half = head_dim / 2;
        let inv = inv_freq::<T>(theta, head_dim);
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let mut pos = p as f64;
            if let Some(r) = position_round {
                pos = r(pos);
            }
            for f in &inv {
                match T::PRECISION {
                    Precision::F64 => {
                        let a = pos * f.to_f64();
                        cos.push(T::from_f64(a.cos()));
                        sin.push(T::from_f64(a.sin()));
                    }
                    Precision::F32 | Precision::BF16 => {
                        // cos/sin in float32, then cast to the model dtype.
                        let a = (pos as f32) * (f.to_f64() as f32);
                        cos.push(T::from_f64(a.cos() as f64).round());
                        sin.push(T::from_f64(a.sin() as f64).round());
                    }
                }
            }
        }
        RopeTable {
            head_dim,
            cos,
            sin,
            layout,
        }
    }

    /// Rotates `x` (`[T][heads][D]`, token `t` at the table's `t`-th position) in place.
    pub fn apply(&self, x: &mut [T], heads: usize) {
        let d = self.head_dim;
        let half = d / 2;
        for (t, tok) in x.chunks_exact_mut(heads * d).enumerate() {
            let cos = &self.cos[t * half..(t + 1) * half];
            let sin = &self.sin[t * half..(t + 1) * half];
            for head in tok.chunks_exact_mut(d) {
                for i in 0..half {
                    let (a, b) = match self.layout {
                        RopeLayout::RotateHalf => (i, i + half),
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (x1, x2) = (head[a], head[b]);
                    // q*cos + rotate_half(q)*sin, rotate_half(x) = (-x2, x1).
                    head[a] = ((x1 * cos[i]).round() + ((-x2) * sin[i]).round()).round();
                    head[b] = ((x2 * cos[i]).round() + (x1 * sin[i]).round()).round();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_half_matches_complex_rotation() {
        let d = 8;
        let table = RopeTable::<f64>::new(10000.0, d, 5, 1, RopeLayout::RotateHalf, None);
        let x: Vec<f64> = (0..d).map(|i| i as f64 * 0.3 - 1.0).collect();
        let mut y = x.clone();
        table.apply(&mut y, 1);
        for i in 0..d / 2 {
            let a = 5.0 * 10000f64.powf(-(2.0 * i as f64) / d as f64);
            let (c, s) = (a.cos(), a.sin());
            let (x1, x2) = (x[i], x[i + d / 2]);
            assert!((y[i] - (x1 * c - x2 * s)).abs() < 1e-15);
            assert!((y[i + d / 2] - (x2 * c + x1 * s)).abs() < 1e-15);
        }
        // Position 0 is the identity; the rotation keeps the norm.
        let t0 = RopeTable::<f64>::new(10000.0, d, 0, 1, RopeLayout::RotateHalf, None);
        let mut z = x.clone();
        t0.apply(&mut z, 1);
        assert_eq!(z, x);
        let n = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
        assert!((n(&x) - n(&y)).abs() < 1e-12);
    }

    #[test]
    fn f32_inv_freq_is_float32_math() {
        let f = inv_freq::<f32>(1e6, 64);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[3], 1.0f32 / 1e6f32.powf(6.0f32 / 64.0));
    }
}
