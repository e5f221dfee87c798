//! Rotary position embeddings, `transformers`' default RoPE.
//!
//! `inv_freq[i] = 1 / theta^(2i / D)`, angle = position × inv_freq, and the rotate-half layout:
//! element `i` pairs with `i + D/2` (not interleaved pairs `2i, 2i+1`). In the f32 tier the table is
//! computed in float32 exactly where HF computes it in float32 (inv_freq, the position × inv_freq
//! product, cos and sin); in the f64 tier every step is float64.
//!
//! [`RopeRounding`] adds the bf16 rounding mistakes of ports (fault injection): positions rounded
//! to bf16, or inv_freq and the angles computed in bf16.
//!
//! [`RopeScaling`] is `rope_parameters.rope_type` (`linear`, `dynamic`, `yarn`, `llama3`), computed
//! as transformers 5.24's `modeling_rope_utils.py` does (see [`scaled_inv_freq`] for the dtype of
//! each step).

use super::{round_bf16, Float, Precision};

/// How the two halves of a head are paired by the rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// HF / Qwen2 / Llama: `x[i]` pairs with `x[i + D/2]` (`rotate_half`).
    RotateHalf,
    /// GPT-J style: `x[2i]` pairs with `x[2i+1]` (a classic porting mistake for these models).
    Interleaved,
}

/// Where the table rounds to bf16 beyond what HF does: the careful table, or a porting mistake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RopeRounding {
    /// HF's table, in the compute precision.
    #[default]
    Careful,
    /// Positions rounded to bf16 before the angle is taken (exact up to 256, wrong beyond).
    Bf16Positions,
    /// inv_freq computed in bf16 and the angles `position × inv_freq` rounded to bf16, as a port
    /// that builds the table in the model dtype does ([`inv_freq_bf16`]; in JAX an integer
    /// position array times a bf16 array is bf16); cos and sin of the rounded angle as careful.
    Bf16InvFreq,
}

/// RoPE scaling (`rope_parameters` / `rope_scaling` of config.json), one variant per
/// `rope_type` transformers 5.24 computes in `modeling_rope_utils.py`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RopeScaling {
    /// `default`: no scaling.
    #[default]
    None,
    /// `linear`: every inverse frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// `dynamic` (NTK): past `max_position_embeddings` the base grows with the sequence length
    /// (the largest position of the forward pass + 1), recomputed every forward pass.
    Dynamic {
        /// The scaling factor.
        factor: f64,
        /// config.json's `max_position_embeddings` (dynamic's original length).
        max_position_embeddings: usize,
    },
    /// `yarn`: a ramp between extrapolated and interpolated frequencies, and cos/sin multiplied by
    /// `attention_factor`.
    Yarn {
        /// The interpolation factor.
        factor: f64,
        /// The pretraining length the correction range is computed for.
        original_max_position_embeddings: usize,
        /// The factor on cos and sin (given, or `0.1 ln(factor) + 1` as transformers infers it).
        attention_factor: f64,
        /// Ramp boundary for extrapolation (default 32).
        beta_fast: f64,
        /// Ramp boundary for interpolation (default 1).
        beta_slow: f64,
        /// Floor/ceil the correction range (default true).
        truncate: bool,
    },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, the band between smoothed.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// `low_freq_factor` (1 in Llama 3.1).
        low_freq_factor: f64,
        /// `high_freq_factor` (4 in Llama 3.1).
        high_freq_factor: f64,
        /// The pretraining length (8192 in Llama 3.1).
        original_max_position_embeddings: usize,
    },
}

/// A deliberate porting mistake in the RoPE scaling (fault injection); `None` computes it as HF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScalingMistake {
    /// HF's computation.
    #[default]
    None,
    /// yarn's attention factor left out (cos and sin not multiplied by it).
    YarnNoAttentionFactor,
    /// llama3's medium band not smoothed: those frequencies kept unscaled.
    Llama3NoSmoothing,
}

/// `f32` power as torch computes `float ** float` on the CPU.
fn pow32(b: f32, e: f32) -> f32 {
    b.powf(e)
}

/// `1 / x` of a float32 tensor (torch's `scalar / tensor` is `tensor.reciprocal() * scalar`).
fn recip32(x: f32) -> f32 {
    1.0 / x
}

/// The inverse frequencies and the attention factor (the factor on cos and sin) of `scaling`
/// for a forward pass whose largest position is `seq_len - 1`, as transformers 5.24 computes
/// them: in the f32 and bf16 tiers every tensor step in float32 and every Python scalar step in
/// float64 exactly where `modeling_rope_utils.py` has them (`dynamic`'s new base is a float32
/// tensor in the forward pass, from the `seq_len` tensor; `scalar / tensor` is the reciprocal
/// times the scalar); in the f64 tier every step in float64. Returns the frequencies as f64
/// values of the tier's precision.
pub fn scaled_inv_freq(
    precision: Precision,
    theta: f64,
    head_dim: usize,
    scaling: RopeScaling,
    seq_len: usize,
    mistake: ScalingMistake,
) -> (Vec<f64>, f64) {
    let half = head_dim / 2;
    let f64_tier = precision == Precision::F64;
    // The default frequencies for a base (a Python float, or dynamic's float32 tensor).
    let default = |base: f64| -> Vec<f64> {
        (0..half)
            .map(|i| {
                if f64_tier {
                    1.0 / base.powf((2 * i) as f64 / head_dim as f64)
                } else {
                    let e = (2 * i) as f32 / head_dim as f32;
                    recip32(pow32(base as f32, e)) as f64
                }
            })
            .collect()
    };
    match scaling {
        RopeScaling::None => (default(theta), 1.0),
        RopeScaling::Linear { factor } => {
            let inv = default(theta);
            let inv = if f64_tier {
                inv.iter().map(|x| x / factor).collect()
            } else {
                inv.iter()
                    .map(|&x| (x as f32 / factor as f32) as f64)
                    .collect()
            };
            (inv, 1.0)
        }
        RopeScaling::Dynamic {
            factor,
            max_position_embeddings: max_pos,
        } => {
            let dim = head_dim as f64;
            let exponent = dim / (dim - 2.0);
            if seq_len <= max_pos {
                // The frequencies computed at init (seq_len = max_position_embeddings, Python
                // floats): HF keeps (or resets to) them while the sequence fits.
                let m = max_pos as f64;
                let base = theta * ((factor * m / m) - (factor - 1.0)).powf(exponent);
                (default(base), 1.0)
            } else if f64_tier {
                let s = seq_len as f64;
                let base = theta * ((factor * s / max_pos as f64) - (factor - 1.0)).powf(exponent);
                (default(base), 1.0)
            } else {
                // `factor * seq_len / max_pos - (factor - 1)` on an int64 tensor: float32.
                let t = (factor as f32 * seq_len as f32) / max_pos as f32 - (factor - 1.0) as f32;
                // `tensor ** python_float`: torch keeps the exponent in double.
                let base = theta as f32 * ((t as f64).powf(exponent) as f32);
                (default(base as f64), 1.0)
            }
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: orig,
            attention_factor,
            beta_fast,
            beta_slow,
            truncate,
        } => {
            let dim = head_dim as f64;
            let correction_dim = |rot: f64| {
                (dim * (orig as f64 / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
            if truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0);
            let mut high = high.min(dim - 1.0);
            if low == high {
                high += 0.001;
            }
            let inv = (0..half)
                .map(|i| {
                    if f64_tier {
                        let pos_freq = theta.powf((2 * i) as f64 / dim);
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (factor * pos_freq);
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extra = 1.0 - ramp;
                        interpolation * (1.0 - extra) + extrapolation * extra
                    } else {
                        let pos_freq = pow32(theta as f32, (2 * i) as f32 / head_dim as f32);
                        let extrapolation = recip32(pos_freq);
                        let interpolation = recip32(factor as f32 * pos_freq);
                        let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                        let extra = 1.0 - ramp;
                        (interpolation * (1.0 - extra) + extrapolation * extra) as f64
                    }
                })
                .collect();
            let attention = match mistake {
                ScalingMistake::YarnNoAttentionFactor => 1.0,
                _ => attention_factor,
            };
            (inv, attention)
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: lo,
            high_freq_factor: hi,
            original_max_position_embeddings: orig,
        } => {
            let old = orig as f64;
            let (low_wl, high_wl) = (old / lo, old / hi);
            let smooth_on = mistake != ScalingMistake::Llama3NoSmoothing;
            let inv = default(theta)
                .into_iter()
                .map(|inv| {
                    if f64_tier {
                        let wl = 2.0 * std::f64::consts::PI / inv;
                        let scaled = if wl > low_wl { inv / factor } else { inv };
                        let s = (old / wl - lo) / (hi - lo);
                        let smoothed = (1.0 - s) * scaled / factor + s * scaled;
                        let medium = wl >= high_wl && wl <= low_wl;
                        if medium && smooth_on {
                            smoothed
                        } else {
                            scaled
                        }
                    } else {
                        let inv = inv as f32;
                        let wl = recip32(inv) * (2.0 * std::f64::consts::PI) as f32;
                        let scaled = if wl > low_wl as f32 {
                            inv / factor as f32
                        } else {
                            inv
                        };
                        let s = (recip32(wl) * old as f32 - lo as f32) / (hi - lo) as f32;
                        let smoothed = (1.0 - s) * scaled / factor as f32 + s * scaled;
                        let medium = wl >= high_wl as f32 && wl <= low_wl as f32;
                        (if medium && smooth_on {
                            smoothed
                        } else {
                            scaled
                        }) as f64
                    }
                })
                .collect();
            (inv, 1.0)
        }
    }
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

/// The inverse frequencies as a port computing them in bf16 gets them, e.g. JAX's
/// `1.0 / (theta ** (jnp.arange(0, D, 2, dtype=jnp.bfloat16) / D))`: the exponent, theta (a
/// weakly typed Python scalar takes the array's dtype), the power and the quotient each rounded
/// to bf16 (each computed in the compute precision first, as XLA computes a bf16 op in float32).
pub fn inv_freq_bf16<T: Float>(theta: f64, head_dim: usize) -> Vec<T> {
    let theta = round_bf16(theta);
    (0..head_dim / 2)
        .map(|i| {
            let e = round_bf16((2 * i) as f64 / head_dim as f64);
            let p = match T::PRECISION {
                Precision::F64 => theta.powf(e),
                Precision::F32 | Precision::BF16 => (theta as f32).powf(e as f32) as f64,
            };
            round_bf16(T::ONE / round_bf16(T::from_f64(p)))
        })
        .collect()
}

impl<T: Float> RopeTable<T> {
    /// Builds the table for positions `start..start + len`. `rounding` lets a fault injection
    /// put a bf16 rounding mistake into the table.
    pub fn new(
        theta: f64,
        head_dim: usize,
        start: usize,
        len: usize,
        layout: RopeLayout,
        rounding: RopeRounding,
    ) -> Self {
        let positions: Vec<usize> = (start..start + len).collect();
        Self::at_positions(theta, head_dim, &positions, layout, rounding)
    }

    /// Builds the table for explicit positions, one per token (left-padded batches: each row's
    /// positions count only its real tokens, as transformers derives `position_ids` from the mask).
    pub fn at_positions(
        theta: f64,
        head_dim: usize,
        positions: &[usize],
        layout: RopeLayout,
        rounding: RopeRounding,
    ) -> Self {
        Self::scaled(
            theta,
            RopeScaling::None,
            ScalingMistake::None,
            head_dim,
            positions,
            layout,
            rounding,
        )
    }

    /// [`Self::at_positions`] with RoPE scaling: the frequencies of [`scaled_inv_freq`] for this
    /// pass (`dynamic` takes the largest position + 1 as the sequence length, as HF's
    /// `dynamic_rope_update` does from `position_ids`), cos and sin multiplied by the attention
    /// factor in the table's compute precision before the cast to the model dtype.
    pub fn scaled(
        theta: f64,
        scaling: RopeScaling,
        mistake: ScalingMistake,
        head_dim: usize,
        positions: &[usize],
        layout: RopeLayout,
        rounding: RopeRounding,
    ) -> Self {
        let half = head_dim / 2;
        let bf16_angles = rounding == RopeRounding::Bf16InvFreq;
        let seq_len = positions.iter().max().map_or(0, |&p| p + 1);
        let (inv, attention): (Vec<T>, f64) = if bf16_angles {
            (inv_freq_bf16::<T>(theta, head_dim), 1.0)
        } else {
            let (inv, a) =
                scaled_inv_freq(T::PRECISION, theta, head_dim, scaling, seq_len, mistake);
            (inv.into_iter().map(T::from_f64).collect(), a)
        };
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let mut pos = p as f64;
            if rounding == RopeRounding::Bf16Positions {
                pos = round_bf16(pos);
            }
            for f in &inv {
                match T::PRECISION {
                    Precision::F64 => {
                        let mut a = pos * f.to_f64();
                        if bf16_angles {
                            a = round_bf16(a);
                        }
                        cos.push(T::from_f64(a.cos() * attention));
                        sin.push(T::from_f64(a.sin() * attention));
                    }
                    Precision::F32 | Precision::BF16 => {
                        // cos/sin (times the attention factor) in float32, then cast to the
                        // model dtype.
                        let mut a = (pos as f32) * (f.to_f64() as f32);
                        if bf16_angles {
                            a = round_bf16(a);
                        }
                        let att = attention as f32;
                        cos.push(T::from_f64((a.cos() * att) as f64).to_act_dtype());
                        sin.push(T::from_f64((a.sin() * att) as f64).to_act_dtype());
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

    /// Rotates `x` (`[T][heads][D]`, token `t` at the table's `t`-th position) in place: a long
    /// prompt's tokens spread over threads, `TOKENS_PER_TASK` at a time (each token's rotation
    /// is its own).
    pub fn apply(&self, x: &mut [T], heads: usize) {
        let width = heads * self.head_dim;
        if width == 0 {
            return;
        }
        if x.len() / width >= 2 * TOKENS_PER_TASK {
            use rayon::prelude::*;
            x.par_chunks_mut(width * TOKENS_PER_TASK)
                .enumerate()
                .for_each(|(i, x)| self.rotate_widest(x, heads, i * TOKENS_PER_TASK));
        } else {
            self.rotate_widest(x, heads, 0)
        }
    }

    /// [`RopeTable::rotate_tokens`] with this CPU's widest vectors where it has them.
    fn rotate_widest(&self, x: &mut [T], heads: usize, t0: usize) {
        #[cfg(target_arch = "x86_64")]
        if super::as_f32(x).is_some()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU has the features the function is compiled with.
            return unsafe { self.rotate_tokens_avx512(x, heads, t0) };
        }
        self.rotate_tokens(x, heads, t0)
    }

    /// [`RopeTable::rotate_tokens`] compiled for AVX-512: the same element-wise operations on
    /// sixteen lanes (never fused or reordered, so the same bits).
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn rotate_tokens_avx512(&self, x: &mut [T], heads: usize, t0: usize) {
        self.rotate_tokens(x, heads, t0)
    }

    /// Rotates the tokens of `x` (`[T][heads][D]`), the first at the table's `t0`-th position.
    #[inline(always)]
    fn rotate_tokens(&self, x: &mut [T], heads: usize, t0: usize) {
        let d = self.head_dim;
        let half = d / 2;
        for (t, tok) in x.chunks_exact_mut(heads * d).enumerate() {
            let t = t0 + t;
            let cos = &self.cos[t * half..(t + 1) * half];
            let sin = &self.sin[t * half..(t + 1) * half];
            for head in tok.chunks_exact_mut(d) {
                match self.layout {
                    RopeLayout::RotateHalf => {
                        let (lo, hi) = head.split_at_mut(half);
                        for (((x1, x2), &c), &s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
                            (*x1, *x2) = rotate(*x1, *x2, c, s);
                        }
                    }
                    RopeLayout::Interleaved => {
                        for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                            (pair[0], pair[1]) = rotate(pair[0], pair[1], c, s);
                        }
                    }
                }
            }
        }
    }
}

/// Tokens of [`RopeTable::apply`] per task on the thread pool.
const TOKENS_PER_TASK: usize = 32;

/// One rotated pair: `q·cos + rotate_half(q)·sin` with `rotate_half(x) = (-x2, x1)`, each product
/// and the sum rounded to the activation dtype.
#[inline(always)]
fn rotate<T: Float>(x1: T, x2: T, cos: T, sin: T) -> (T, T) {
    (
        ((x1 * cos).to_act_dtype() + ((-x2) * sin).to_act_dtype()).to_act_dtype(),
        ((x2 * cos).to_act_dtype() + (x1 * sin).to_act_dtype()).to_act_dtype(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Bf16;

    /// [`RopeTable::apply`] (the AVX-512 build where the CPU has it) gives the plain
    /// element-by-element loop's bits, both layouts, f32 and bf16, values of mixed magnitude.
    #[test]
    fn apply_is_the_plain_loops_bits() {
        fn check<T: Float>(layout: RopeLayout) {
            let (d, heads, t) = (64, 3, 137);
            let table = RopeTable::<T>::new(10000.0, d, 100, t, layout, RopeRounding::Careful);
            let mut seed = 9u64;
            let x: Vec<T> = (0..t * heads * d)
                .map(|i| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let v = ((seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 8.0;
                    T::from_f64(if i % 17 == 0 { v * 1e3 } else { v }).to_act_dtype()
                })
                .collect();
            let mut fast = x.clone();
            table.apply(&mut fast, heads);
            let mut plain = x;
            let half = d / 2;
            for (t, tok) in plain.chunks_exact_mut(heads * d).enumerate() {
                for head in tok.chunks_exact_mut(d) {
                    for i in 0..half {
                        let (a, b) = match layout {
                            RopeLayout::RotateHalf => (i, i + half),
                            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                        };
                        let (c, s) = (table.cos[t * half + i], table.sin[t * half + i]);
                        (head[a], head[b]) = rotate(head[a], head[b], c, s);
                    }
                }
            }
            let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
            assert!(bits(&fast) == bits(&plain), "{:?} {layout:?}", T::PRECISION);
        }
        for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
            check::<f32>(layout);
            check::<Bf16>(layout);
        }
    }

    #[test]
    fn rotate_half_matches_complex_rotation() {
        let d = 8;
        let table = RopeTable::<f64>::new(
            10000.0,
            d,
            5,
            1,
            RopeLayout::RotateHalf,
            RopeRounding::Careful,
        );
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
        let t0 = RopeTable::<f64>::new(
            10000.0,
            d,
            0,
            1,
            RopeLayout::RotateHalf,
            RopeRounding::Careful,
        );
        let mut z = x.clone();
        t0.apply(&mut z, 1);
        assert_eq!(z, x);
        let n = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
        assert!((n(&x) - n(&y)).abs() < 1e-12);
    }

    #[test]
    fn bf16_positions_change_nothing_up_to_256() {
        let (d, theta) = (64, 1e6);
        let t = |r| RopeTable::<f32>::new(theta, d, 250, 20, RopeLayout::RotateHalf, r);
        let (careful, faulty) = (t(RopeRounding::Careful), t(RopeRounding::Bf16Positions));
        let half = d / 2;
        // Positions 250..=256 are bf16 values; 257 rounds to 256.
        assert_eq!(careful.cos[..7 * half], faulty.cos[..7 * half]);
        assert_ne!(
            careful.cos[7 * half..8 * half],
            faulty.cos[7 * half..8 * half]
        );
        assert_eq!(
            faulty.cos[6 * half..7 * half],
            faulty.cos[7 * half..8 * half]
        );
    }

    #[test]
    fn bf16_inv_freq_and_angles_in_every_tier() {
        let (d, theta) = (64, 1e6);
        // The frequencies: bf16 values, within bf16's rounding of the careful ones.
        let careful = inv_freq::<f64>(theta, d);
        let faulty = inv_freq_bf16::<f64>(theta, d);
        assert_eq!(faulty[0], 1.0);
        assert_ne!(careful, faulty);
        for (c, f) in careful.iter().zip(&faulty) {
            assert_eq!(round_bf16(*f), *f, "a bf16 value");
            // Two roundings of at most 2^-8 relative each (the exponent's is exact for D = 64),
            // and theta's (1e6 becomes 999424) moving theta^-e by at most 2^-8 × e.
            assert!(((f - c) / c).abs() <= 3.0 * 2f64.powi(-8), "{f} vs {c}");
        }
        // In f32 the power is taken in float32: the same value or one bf16 ulp off.
        let f32s: Vec<f64> = inv_freq_bf16::<f32>(theta, d)
            .iter()
            .map(|&x| x as f64)
            .collect();
        for (a, b) in f32s.iter().zip(&faulty) {
            assert!(((a - b) / b).abs() <= 2f64.powi(-7), "{a} vs {b}");
        }
        // Position 0 is untouched; later ones move by the angle's bf16 rounding (at most 1/32
        // below angle 16) plus position × the frequency's error: 0.025-0.027 at positions < 16.
        fn check<T: Float>(d: usize, theta: f64) {
            let t = |r| RopeTable::<T>::new(theta, d, 0, 16, RopeLayout::RotateHalf, r);
            let (careful, faulty) = (t(RopeRounding::Careful), t(RopeRounding::Bf16InvFreq));
            let half = d / 2;
            assert_eq!(careful.cos[..half], faulty.cos[..half], "position 0");
            let worst = careful
                .sin
                .iter()
                .zip(&faulty.sin)
                .map(|(a, b)| (a.to_f64() - b.to_f64()).abs())
                .fold(0.0, f64::max);
            assert!(worst > 0.01 && worst <= 0.05, "{worst}");
        }
        check::<f64>(d, theta);
        check::<f32>(d, theta);
        check::<Bf16>(d, theta);
    }

    #[test]
    fn f32_inv_freq_is_float32_math() {
        let f = inv_freq::<f32>(1e6, 64);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[3], 1.0f32 / 1e6f32.powf(6.0f32 / 64.0));
    }
}
