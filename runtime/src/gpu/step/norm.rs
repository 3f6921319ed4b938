//! Layer norm and RMS norm over the last axis, one kernel pair for both (RMS norm: no
//! centring, no bias), in f32 whatever the run's number format.

use super::{err, gpu, Saved, Step, Tensor, Value};
use crate::exec::ExecError;
use crate::gpu::launch::norm_backward_scratch;
use crate::gpu::memory::Owned;
use crate::gpu::Device;
use kiln_compiler::graph::Op;
use petgraph::graph::NodeIndex;

/// A norm's parameters and kind.
struct Norm {
    weight: usize,
    bias: Option<usize>,
    eps: f32,
    centred: bool,
}

fn norm(op: &Op) -> Result<Norm, ExecError> {
    match *op {
        Op::LayerNorm { weight, bias, eps } => Ok(Norm {
            weight,
            bias,
            eps: eps as f32,
            centred: true,
        }),
        Op::RmsNorm { weight, eps } => Ok(Norm {
            weight,
            bias: None,
            eps: eps as f32,
            centred: false,
        }),
        _ => err("not a norm"),
    }
}

pub(super) fn forward<'d, D: Device>(
    step: &mut Step<'_, '_, 'd, D>,
    n: NodeIndex,
    op: &Op,
) -> Result<Value<'d, D>, ExecError> {
    let norm = norm(op)?;
    let x = step.tensor(n, 0)?;
    let y = Tensor::zeros(step.d, &x.shape).map_err(gpu)?;
    let stats = Owned::zeros(step.d, 2 * x.rows()).map_err(gpu)?;
    let bias = match norm.bias {
        Some(b) => Some(step.param(b)?.buffer()),
        None => None,
    };
    step.kernels()
        .norm_forward(
            x.buffer(),
            step.param(norm.weight)?.buffer(),
            bias,
            y.buffer(),
            stats.buffer(),
            x.width(),
            norm.eps,
            norm.centred,
        )
        .map_err(gpu)?;
    step.saved[n.index()] = Saved::Norm(stats);
    Ok(Value::Tensor(y))
}

pub(super) fn backward<D: Device>(
    step: &Step<'_, '_, '_, D>,
    n: NodeIndex,
    op: &Op,
    dy: &Tensor<'_, D>,
) -> Result<(), ExecError> {
    let norm = norm(op)?;
    let Saved::Norm(stats) = &step.saved[n.index()] else {
        return err("the forward kept nothing");
    };
    let x = step.tensor(n, 0)?;
    // The kernel adds to the input's gradient: a scratch one where none is wanted.
    let unwanted;
    let dx = match step.made_grad(n, 0)? {
        Some(dx) => dx,
        None => {
            unwanted = Owned::<D, f32>::zeros(step.d, x.len()).map_err(gpu)?;
            unwanted.buffer()
        }
    };
    let scratch =
        Owned::<D, f32>::zeros(step.d, norm_backward_scratch(x.rows(), x.width())).map_err(gpu)?;
    step.kernels()
        .norm_backward(
            x.buffer(),
            step.param(norm.weight)?.buffer(),
            stats.buffer(),
            dy.buffer(),
            dx,
            step.param_grad(norm.weight),
            norm.bias.and_then(|b| step.param_grad(b)),
            scratch.buffer(),
            x.width(),
            norm.centred,
        )
        .map_err(gpu)
}
