//! Linear layers: `x·W + b` for either stored layout of the weight, a tensor-parallel rank's
//! share of the outputs or of the partial sum, and a range of a fused weight's outputs; input
//! and output in the run's number format (the weight's working copy is in it already).

use super::misrouted;
use crate::exec::interpreter::Interpreter;
use crate::exec::kernels;
use crate::exec::value::V;
use crate::exec::ExecError;
use dfdx::prelude::*;
use kiln_compiler::graph::{Layout, Op, ParamRef};
use petgraph::graph::NodeIndex;

/// Computes node `n`, whose op is of this family.
pub(super) fn forward(it: &mut Interpreter<'_>, n: NodeIndex, op: Op) -> Result<V, ExecError> {
    match op {
        Op::Linear {
            weight,
            bias,
            layout,
            ..
        } => {
            let x = it.input(n, 0)?.clone();
            // A partial sum gets the bias once, from rank 0.
            let bias = bias.filter(|_| it.ops.rank == 0 || !it.ops.bias_once.contains(&n));
            let outputs = match weight.outputs {
                Some(_) => it
                    .ops
                    .slices
                    .get(&n)
                    .copied()
                    .or(weight.outputs.map(|(a, e)| (a as usize, e as usize))),
                None => None,
            };
            linear(it, x, weight.id, bias, layout, outputs)
        }
        other => Err(misrouted("linear", &other)),
    }
}

/// `x·W + b` (or `x·Wᵀ + b`); `outputs` takes a range of the product's features.
fn linear(
    it: &mut Interpreter<'_>,
    x: V,
    weight: usize,
    bias: Option<ParamRef>,
    layout: Layout,
    outputs: Option<(usize, usize)>,
) -> Result<V, ExecError> {
    // A pooled [b, d] input runs as [b, 1, d].
    let pooled = matches!(x, V::R2(_));
    let x = match x {
        V::R2(t) => {
            let (b, d) = *t.shape();
            let (t, tape) = t
                .put_tape(it.take_tape())
                .reshape_like(&(b, 1, d))
                .split_tape();
            it.tape = tape;
            t
        }
        other => other.r3("x")?,
    };
    let w = it.p2(weight)?;
    let x = it.rounded(x)?;
    let tape = it.take_tape();
    let x = x.put_tape(tape);
    let y = {
        let bias = match bias {
            Some(b) => Some(it.vector(b.id)?),
            None => None,
        };
        let w = kernels::Weight {
            w,
            out_in: matches!(layout, Layout::OutIn),
            trainable: it.g.params[weight].trainable,
        };
        let y = kernels::linear(x, w, bias, outputs).map_err(ExecError)?;
        kernels::rounded(y, it.format)
    };
    let b = y.shape().0;
    if pooled {
        let n = y.shape().2;
        return Ok(it.keep2(y.reshape_like(&(b, n))));
    }
    Ok(it.keep3(y))
}
