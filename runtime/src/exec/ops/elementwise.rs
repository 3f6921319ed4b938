//! Elementwise ops: sums and products, scaling (by a constant or IA3's learned vector),
//! activations and dropout.

use super::misrouted;
use crate::exec::dropout::dropout_scale;
use crate::exec::interpreter::Interpreter;
use crate::exec::kernels;
use crate::exec::value::V;
use crate::exec::{err, Dev, ExecError, Tape};
use dfdx::prelude::*;
use kiln_compiler::graph::{Act, Op};
use petgraph::graph::NodeIndex;

/// Computes node `n`, whose op is of this family.
pub(super) fn forward(it: &mut Interpreter<'_>, n: NodeIndex, op: Op) -> Result<V, ExecError> {
    match op {
        Op::Add | Op::Mul => {
            let inputs = it.g.inputs(n);
            // The same tensor on both sides of one op would break dfdx's backward.
            let same = inputs.first() == inputs.get(1);
            let add = matches!(op, Op::Add);
            match (it.input(n, 0)?.clone(), it.input(n, 1)?.clone()) {
                (V::R3(a), V::R3(b)) => {
                    let out = combine(a.put_tape(it.take_tape()), b, add, same);
                    Ok(it.keep3(out))
                }
                (V::R2(a), V::R2(b)) => {
                    let out = combine(a.put_tape(it.take_tape()), b, add, same);
                    Ok(it.keep2(out))
                }
                _ => err("add/mul of unlike tensors"),
            }
        }
        Op::Scale { factor } => {
            let x = it.input(n, 0)?.r3("x")?;
            let tape = it.take_tape();
            Ok(it.keep3(x.put_tape(tape) * factor as f32))
        }
        Op::ScaleBy { param } => {
            let x = it.input(n, 0)?.r3("x")?;
            let v = it.p1(param)?;
            let shape = *x.shape();
            let tape = it.take_tape();
            Ok(it.keep3(x.put_tape(tape) * v.broadcast_like::<_, Axes2<0, 1>>(&shape)))
        }
        Op::Activation { act } => match it.input(n, 0)?.clone() {
            V::R3(x) => {
                let y = activate(x.put_tape(it.take_tape()), act);
                Ok(it.keep3(y))
            }
            V::R2(x) => {
                let y = activate(x.put_tape(it.take_tape()), act);
                Ok(it.keep2(y))
            }
            _ => err("activation of an unsupported rank"),
        },
        Op::Dropout { p } => {
            let x = it.input(n, 0)?.r3("x")?;
            let (b, s, d) = *x.shape();
            // On a share of the sequence: this rank's positions of the whole rows.
            let first = if it.ops.sequence.contains(&n) {
                it.ops.rank * s
            } else {
                0
            };
            let Some(keep) = it.dropout_keep(p, b, first * d, s * d)? else {
                return Ok(V::R3(x));
            };
            let x = x.put_tape(it.take_tape());
            let out = kernels::dropout(x, keep, dropout_scale(p)).map_err(ExecError)?;
            Ok(it.keep3(out))
        }
        other => Err(misrouted("elementwise", &other)),
    }
}

fn activate<S: Shape>(x: Tensor<S, f32, Dev, Tape>, act: Act) -> Tensor<S, f32, Dev, Tape> {
    // On the CPU the GELUs and SiLU are one fused kernel each (value and derivative).
    use crate::exec::kernels::{activation, Activation};
    let fused = match act {
        Act::Gelu => Some(Activation::GeluErf),
        Act::GeluTanh => Some(Activation::GeluTanh),
        Act::Silu => Some(Activation::Silu),
        Act::Relu | Act::Tanh => None,
    };
    if let Some(fused) = fused {
        return activation(x, fused);
    }
    match act {
        Act::Gelu => exact_gelu(x),
        Act::GeluTanh => x.fast_gelu(),
        Act::Relu => x.relu(),
        Act::Tanh => x.tanh(),
        Act::Silu => {
            let (xs, tape) = x.split_tape();
            xs.clone().put_tape(tape).sigmoid() * xs
        }
    }
}

/// `a + b` or `a * b`; `same` when both are one tensor (dfdx's backward needs distinct operands).
fn combine<S: Shape>(
    a: Tensor<S, f32, Dev, Tape>,
    b: Tensor<S, f32, Dev>,
    add: bool,
    same: bool,
) -> Tensor<S, f32, Dev, Tape> {
    match (same, add) {
        (true, true) => a * 2.0,
        (true, false) => a.square(),
        (false, true) => a + b,
        (false, false) => a * b,
    }
}

/// The erf GELU. dfdx 0.13's `accurate_gelu` computes the right values but its derivative
/// drops a factor 1/√2 from the erf term; a term whose value is zero (e − stop(e), with
/// e = exp(−x²/2)) carries the missing −(1 − 1/√2)/√π · x·e of gradient.
fn exact_gelu<S: Shape>(x: Tensor<S, f32, Dev, Tape>) -> Tensor<S, f32, Dev, Tape> {
    let c = (1.0 - std::f32::consts::FRAC_1_SQRT_2) / std::f32::consts::PI.sqrt();
    let (xs, tape) = x.split_tape();
    let (gelu, tape) = xs.clone().put_tape(tape).accurate_gelu().split_tape();
    let held = (xs.clone().square() * -0.5).exp() * c;
    let live = (xs.put_tape(tape).square() * -0.5).exp() * c;
    live + gelu - held
}
