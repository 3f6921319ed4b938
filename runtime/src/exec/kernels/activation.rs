//! Activations (GELU in both forms, SiLU) as one fused elementwise kernel each: value forward,
//! derivative from the input backward.

use super::buffer::{elements, row_major, vectorized};
use super::math::{erf, exp, tanh};
use super::{Taped, CHUNK};
use dfdx::prelude::*;
use rayon::prelude::*;

const GELU_C: f32 = 0.797_884_6; // √(2/π)
const GELU_K: f32 = 0.044_715;

/// The activations computed by [`activation`]: value and derivative of each.
#[derive(Clone, Copy)]
pub enum Activation {
    /// GPT-2's tanh GELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
    GeluTanh,
    /// BERT's GELU: 0.5·x·(1 + erf(x/√2)).
    GeluErf,
    /// LLaMA's SiLU: x·σ(x).
    Silu,
}

impl Activation {
    #[inline(always)]
    fn value(self, x: f32) -> f32 {
        match self {
            Activation::GeluTanh => 0.5 * x * (1.0 + tanh(GELU_C * (x + GELU_K * x * x * x))),
            Activation::GeluErf => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::Silu => x / (1.0 + exp(-x)),
        }
    }

    #[inline(always)]
    fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::GeluTanh => {
                let t = tanh(GELU_C * (x + GELU_K * x * x * x));
                let du = GELU_C * (1.0 + 3.0 * GELU_K * x * x);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
            }
            Activation::GeluErf => {
                // 1/√(2π)
                const PDF: f32 = 0.398_942_3;
                0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)) + x * PDF * exp(-0.5 * x * x)
            }
            Activation::Silu => {
                let sigmoid = 1.0 / (1.0 + exp(-x));
                sigmoid * (1.0 + x * (1.0 - sigmoid))
            }
        }
    }
}

/// An activation, elementwise; the backward recomputes what it needs from the input.
pub fn activation<S: Shape>(x: Taped<S>, act: Activation) -> Taped<S> {
    // One instance per activation: a loop over a fixed function vectorizes, one that matches
    // on the activation per element does not.
    match act {
        Activation::GeluTanh => elementwise(
            x,
            |v| Activation::GeluTanh.value(v),
            |v| Activation::GeluTanh.derivative(v),
        ),
        Activation::GeluErf => elementwise(
            x,
            |v| Activation::GeluErf.value(v),
            |v| Activation::GeluErf.derivative(v),
        ),
        Activation::Silu => elementwise(
            x,
            |v| Activation::Silu.value(v),
            |v| Activation::Silu.derivative(v),
        ),
    }
}

/// `value` of every element, with `derivative` for the backward.
fn elementwise<S: Shape>(
    x: Taped<S>,
    value: impl Fn(f32) -> f32 + Copy + Send + Sync + 'static,
    derivative: impl Fn(f32) -> f32 + Copy + Send + Sync + 'static,
) -> Taped<S> {
    let (x, mut tape) = row_major(x).split_tape();
    let shape = *x.shape();
    let mut y = vec![0.0f32; shape.num_elements()];
    {
        let xs = elements(&x);
        y.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                vectorized(|| {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = value(x);
                    }
                })
            });
    }
    let out = x.device().tensor_from_vec(y, shape);
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let xs = elements(&x);
        let gx = grads.get_or_alloc_mut(&x)?;
        gx.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(gx, (x, dy))| {
                vectorized(|| {
                    for ((g, &x), &dy) in gx.iter_mut().zip(x).zip(dy) {
                        *g += dy * derivative(x);
                    }
                })
            });
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    result.put_tape(tape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::kernels::testing::*;
    use crate::exec::kernels::R3;

    #[test]
    fn activations_match_their_definitions_in_dfdx_ops() {
        // Wide inputs: the tails saturate, the middle is where the approximations work.
        let x = Cpu::default().tensor_from_vec(
            values(3 * 50 * 41, 7).iter().map(|v| v * 12.0).collect(),
            (3, 50, 41),
        );
        let silu = |x: Taped<R3>| {
            let (xs, tape) = x.split_tape();
            xs.clone().put_tape(tape).sigmoid() * xs
        };
        type Reference<'a> = &'a dyn Fn(Taped<R3>) -> Taped<R3>;
        let cases: [(Activation, Reference); 2] = [
            (Activation::GeluTanh, &|x| x.fast_gelu()),
            (Activation::Silu, &silu),
        ];
        for (act, reference) in cases {
            let (fy, fg) = probe(activation(x.clone().leaky_traced(), act), 8);
            let (ry, rg) = probe(reference(x.clone().leaky_traced()), 8);
            close("y", &fy, &ry, 2e-6);
            close_grad("dx", &fg, &rg, &x, 2e-6);
        }
    }

    #[test]
    fn erf_gelu_matches_dfdx_values_and_the_normal_density() {
        let xs = values(4000, 9);
        let x = Cpu::default().tensor_from_vec(xs.iter().map(|v| v * 8.0).collect(), (4000,));
        let (fy, fg) = probe(
            activation(x.clone().leaky_traced(), Activation::GeluErf),
            10,
        );
        let want = x.clone().accurate_gelu().as_vec();
        close("y", &fy, &want, 2e-6);
        // GELU(x) = x·Φ(x), so GELU'(x) = Φ(x) + x·φ(x) = GELU(x)/x + x·φ(x).
        let upstream = values(4000, 10);
        let got = fg.get(&x).as_vec();
        for (i, &v) in x.as_vec().iter().enumerate() {
            if v.abs() < 1e-2 {
                continue;
            }
            let (v64, gelu) = (f64::from(v), f64::from(want[i]));
            let density = (-0.5 * v64 * v64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let slope = gelu / v64 + v64 * density;
            let expected = f64::from(upstream[i]) * slope;
            assert!(
                (f64::from(got[i]) - expected).abs() < 2e-6,
                "GELU'({v}) x upstream = {}, expected {expected}",
                got[i]
            );
        }
    }
}
