//! The SwiGLU activation of the MLP: `silu(gate) * up`.

use super::Float;

/// SiLU: `x * sigmoid(x)`, computed as `x / (1 + e^-x)` like PyTorch.
pub fn silu<T: Float>(x: T) -> T {
    x / (T::ONE + (-x).exp())
}

/// `gate[i] = silu(gate[i]) * up[i]`, in place (the reference and only version: it is
/// bandwidth-trivial next to the matmuls).
pub fn silu_mul_in_place<T: Float>(gate: &mut [T], up: &[T]) {
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
}
