//! The SwiGLU activation of the MLP: `silu(gate) * up`.

use super::Float;

/// SiLU: `x * sigmoid(x)`, computed as `x / (1 + e^-x)` like PyTorch.
pub fn silu<T: Float>(x: T) -> T {
    x / (T::ONE + (-x).exp())
}

/// `gate[i] = silu(gate[i]) * up[i]`, in place: [`silu`] rounded to the activation dtype, times
/// `up`, rounded again. Long inputs are split over threads, and for `f32` and [`Bf16`](super::Bf16)
/// the exps of a chunk go through [`super::expf::exp_in_place`] (the scalar call's bits), so
/// every element gets exactly what [`silu_mul_reference`] gives it.
pub fn silu_mul_in_place<T: Float>(gate: &mut [T], up: &[T]) {
    assert_eq!(gate.len(), up.len());
    let chunk = |(g, u): (&mut [T], &[T])| {
        #[cfg(target_arch = "x86_64")]
        if super::as_f32(g).is_some()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU has the features the function is compiled with.
            return unsafe { silu_mul_chunk_avx512(g, u) };
        }
        silu_mul_chunk(g, u)
    };
    if gate.len() >= 16 * CHUNK {
        let (len, g) = (gate.len(), crate::team::SendPtr(gate.as_mut_ptr()));
        crate::team::for_each(len.div_ceil(CHUNK), |i| {
            let (start, n) = (i * CHUNK, CHUNK.min(len - i * CHUNK));
            // SAFETY: chunk `i` of `gate`, in bounds and no other iteration's.
            chunk((unsafe { g.slice(start, n) }, &up[start..start + n]))
        });
    } else {
        gate.chunks_mut(CHUNK).zip(up.chunks(CHUNK)).for_each(chunk);
    }
}

/// Elements per chunk of [`silu_mul_in_place`] (its exps are formed a chunk at a time).
const CHUNK: usize = 1 << 10;

/// One chunk (at most [`CHUNK`] elements) of [`silu_mul_in_place`].
#[inline(always)]
fn silu_mul_chunk<T: Float>(g: &mut [T], u: &[T]) {
    let mut e = [0f32; CHUNK];
    match super::as_f32(g) {
        Some(gf) => {
            let e = &mut e[..gf.len()];
            for (e, &g) in e.iter_mut().zip(gf) {
                *e = -g;
            }
            super::expf::exp_in_place(e);
            for ((g, &u), &e) in g.iter_mut().zip(u).zip(e.iter()) {
                // `e` is `(-g).exp()` as the compute type (f32 arithmetic in both).
                let s = (*g / (T::ONE + T::from_f64(e as f64))).to_act_dtype();
                *g = (s * u).to_act_dtype();
            }
        }
        None => silu_mul_reference(g, u),
    }
}

/// [`silu_mul_chunk`] compiled for AVX-512: the same element-wise operations on sixteen lanes
/// (never fused or reordered, so the same bits).
///
/// # Safety
/// The CPU has AVX-512F/BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn silu_mul_chunk_avx512<T: Float>(g: &mut [T], u: &[T]) {
    silu_mul_chunk(g, u)
}

/// [`silu_mul_in_place`] one element at a time (the reference).
pub fn silu_mul_reference<T: Float>(gate: &mut [T], up: &[T]) {
    assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = (silu(*g).to_act_dtype() * u).to_act_dtype();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_values() {
        assert_eq!(silu(0.0f64), 0.0);
        let x = 1.3f64;
        assert!((silu(x) - x / (1.0 + (-x).exp())).abs() < 1e-15);
        assert!((silu(-40.0f64)).abs() < 1e-15);
        let mut g = [1.0f64, -2.0];
        silu_mul_in_place(&mut g, &[2.0, 3.0]);
        assert!((g[0] - 2.0 * silu(1.0)).abs() < 1e-15);
        assert!((g[1] - 3.0 * silu(-2.0)).abs() < 1e-15);
    }

    /// The chunked, threaded, vector-exp version gives the reference's bits in every compute
    /// type, on an input long enough to be split over threads, with large and special values.
    #[test]
    fn silu_mul_is_the_references_bits() {
        fn check<T: Float>() {
            let n = 40_000 + 13;
            let mut seed = 3u64;
            let mut next = || {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 30.0
            };
            let mut g: Vec<T> = (0..n).map(|_| T::from_f64(next()).to_act_dtype()).collect();
            let u: Vec<T> = (0..n).map(|_| T::from_f64(next()).to_act_dtype()).collect();
            for (i, v) in [
                0.0,
                -0.0,
                100.0,
                -100.0,
                89.0,
                -89.0,
                f64::INFINITY,
                f64::NAN,
            ]
            .into_iter()
            .enumerate()
            {
                g[i * 997] = T::from_f64(v);
            }
            let mut want = g.clone();
            silu_mul_reference(&mut want, &u);
            silu_mul_in_place(&mut g, &u);
            for (i, (a, b)) in g.iter().zip(&want).enumerate() {
                assert_eq!(
                    a.to_f64().to_bits(),
                    b.to_f64().to_bits(),
                    "{:?} [{i}]",
                    T::PRECISION
                );
            }
        }
        check::<f64>();
        check::<f32>();
        check::<super::super::Bf16>();
    }
}
