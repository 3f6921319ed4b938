//! Elementwise ops: sums and products, scaling (by a constant or IA3's learned vector),
//! activations, and dropout with the CPU's masks.

use super::{err, gpu, Saved, Step, Tensor, Value};
use crate::exec::ExecError;
use crate::gpu::launch::Activation;
use crate::gpu::memory::Owned;
use crate::gpu::tensor_ops::column_sums_scratch;
use crate::gpu::Device;
use kiln_compiler::graph::{Act, Op};
use petgraph::graph::NodeIndex;

fn kernel(act: Act) -> Result<Activation, ExecError> {
    match act {
        Act::Gelu => Ok(Activation::GeluErf),
        Act::GeluTanh => Ok(Activation::GeluTanh),
        Act::Silu => Ok(Activation::Silu),
        // `family` refuses these before anything runs.
        Act::Relu | Act::Tanh => err(format!("no {act:?} kernel")),
    }
}

pub(super) fn forward<'d, D: Device>(
    step: &mut Step<'_, '_, 'd, D>,
    n: NodeIndex,
    op: &Op,
) -> Result<Value<'d, D>, ExecError> {
    let x = step.tensor(n, 0)?;
    let y = Tensor::zeros(step.d, &x.shape).map_err(gpu)?;
    let k = step.kernels();
    match *op {
        Op::Add | Op::Mul => {
            let b = step.tensor(n, 1)?;
            if b.shape != x.shape {
                return err(format!("{:?} and {:?} combined", x.shape, b.shape));
            }
            match op {
                Op::Add => k
                    .add_scaled(x.buffer(), y.buffer(), 1.0)
                    .and_then(|()| k.add_scaled(b.buffer(), y.buffer(), 1.0)),
                _ => k.add_product(x.buffer(), b.buffer(), y.buffer()),
            }
        }
        Op::Scale { factor } => k.add_scaled(x.buffer(), y.buffer(), factor as f32),
        Op::ScaleBy { param } => {
            let v = step.param(param)?;
            if v.len() != x.width() {
                return err(format!(
                    "a vector of {} scaling rows of {}",
                    v.len(),
                    x.width()
                ));
            }
            k.add_product(x.buffer(), v.buffer(), y.buffer())
        }
        Op::Activation { act } => k.activation_forward(x.buffer(), y.buffer(), kernel(act)?),
        Op::Dropout { p } => {
            let rows = x.shape.first().copied().unwrap_or(1);
            let factors = match step.dropout(n, p, rows)? {
                Some(keys) => {
                    let factors = Owned::zeros(step.d, x.len()).map_err(gpu)?;
                    k.dropout_factors(keys.draw(0), factors.buffer(), x.len() / rows.max(1))
                        .map_err(gpu)?;
                    k.add_product(x.buffer(), factors.buffer(), y.buffer())
                        .map_err(gpu)?;
                    Some(factors)
                }
                None => {
                    k.add_scaled(x.buffer(), y.buffer(), 1.0).map_err(gpu)?;
                    None
                }
            };
            step.saved[n.index()] = Saved::Dropout(factors);
            Ok(())
        }
        _ => return err("not an elementwise op"),
    }
    .map_err(gpu)?;
    Ok(Value::Tensor(y))
}

pub(super) fn backward<D: Device>(
    step: &Step<'_, '_, '_, D>,
    n: NodeIndex,
    op: &Op,
    dy: &Tensor<'_, D>,
) -> Result<(), ExecError> {
    let k = step.kernels();
    let x = step.tensor(n, 0)?;
    let dx = step.made_grad(n, 0)?;
    match *op {
        Op::Add => {
            for slot in 0..2 {
                if let Some(d) = step.made_grad(n, slot)? {
                    k.add_scaled(dy.buffer(), d, 1.0).map_err(gpu)?;
                }
            }
        }
        Op::Mul => {
            let b = step.tensor(n, 1)?;
            if let Some(dx) = dx {
                k.add_product(dy.buffer(), b.buffer(), dx).map_err(gpu)?;
            }
            if let Some(db) = step.made_grad(n, 1)? {
                k.add_product(dy.buffer(), x.buffer(), db).map_err(gpu)?;
            }
        }
        Op::Scale { factor } => {
            if let Some(dx) = dx {
                k.add_scaled(dy.buffer(), dx, factor as f32).map_err(gpu)?;
            }
        }
        Op::ScaleBy { param } => {
            if let Some(dx) = dx {
                k.add_product(dy.buffer(), step.param(param)?.buffer(), dx)
                    .map_err(gpu)?;
            }
            if let Some(dv) = step.param_grad(param) {
                let products = Owned::<D, f32>::zeros(step.d, x.len()).map_err(gpu)?;
                k.add_product(dy.buffer(), x.buffer(), products.buffer())
                    .map_err(gpu)?;
                let scratch =
                    Owned::<D, f32>::zeros(step.d, column_sums_scratch(x.rows(), x.width()))
                        .map_err(gpu)?;
                k.column_sums(products.buffer(), dv, scratch.buffer())
                    .map_err(gpu)?;
            }
        }
        Op::Activation { act } => {
            if let Some(dx) = dx {
                k.activation_backward(x.buffer(), dy.buffer(), dx, kernel(act)?)
                    .map_err(gpu)?;
            }
        }
        Op::Dropout { .. } => {
            let Saved::Dropout(factors) = &step.saved[n.index()] else {
                return err("the forward kept nothing");
            };
            if let Some(dx) = dx {
                match factors {
                    Some(f) => k.add_product(dy.buffer(), f.buffer(), dx),
                    None => k.add_scaled(dy.buffer(), dx, 1.0),
                }
                .map_err(gpu)?;
            }
        }
        _ => return err(format!("no backward for `{}`", op.kind())),
    }
    Ok(())
}
