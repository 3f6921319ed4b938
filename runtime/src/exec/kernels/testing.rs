//! What the kernels' tests and the GPU kernels' parity checks (`gpu::parity`) share:
//! deterministic inputs, and comparisons of values and gradients against a reference.

use super::{Taped, R3};
use dfdx::prelude::*;
use dfdx::tensor::{Cpu, Gradients};

pub(crate) type T1 = Tensor<(usize,), f32, Cpu>;
#[cfg(test)]
pub(crate) type T2 = Tensor<(usize, usize), f32, Cpu>;
pub(crate) type T3 = Tensor<R3, f32, Cpu>;

/// Deterministic values in [-1, 1).
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

pub(crate) fn t1(n: usize, seed: u64) -> T1 {
    Cpu::default().tensor_from_vec(values(n, seed), (n,))
}
#[cfg(test)]
pub(crate) fn t2(a: usize, b: usize, seed: u64) -> T2 {
    Cpu::default().tensor_from_vec(values(a * b, seed), (a, b))
}
pub(crate) fn t3(shape: R3, seed: u64) -> T3 {
    Cpu::default().tensor_from_vec(values(shape.0 * shape.1 * shape.2, seed), shape)
}

/// Whether `got` is within `tol` of `want`, relative to `want`'s largest magnitude; else the
/// first value that is not.
pub(crate) fn within(what: &str, got: &[f32], want: &[f32], tol: f32) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
    match got
        .iter()
        .zip(want)
        .position(|(g, w)| !((g - w).abs() <= tol * scale))
    {
        Some(i) => Err(format!(
            "{what}[{i}]: {} vs {} (scale {scale}, tolerance {tol})",
            got[i], want[i]
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
pub(crate) fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    within(what, got, want, tol).unwrap_or_else(|e| panic!("{e}"));
}

/// The gradients two runs gave `t`, compared.
#[cfg(test)]
pub(crate) fn close_grad<S: Shape>(
    what: &str,
    got: &Gradients<f32, Cpu>,
    want: &Gradients<f32, Cpu>,
    t: &Tensor<S, f32, Cpu>,
    tol: f32,
) {
    close(what, &got.get(t).as_vec(), &want.get(t).as_vec(), tol);
}

/// Σ out ∘ r for a fixed random r, so every output element has its own upstream gradient.
pub(crate) fn probe<S: Shape>(out: Taped<S>, seed: u64) -> (Vec<f32>, Gradients<f32, Cpu>) {
    let value = out.as_vec();
    let shape = *out.shape();
    let r = Cpu::default().tensor_from_vec(values(shape.num_elements(), seed), shape);
    (value, (out * r).sum::<(), _>().backward())
}
