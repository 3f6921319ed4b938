//! Linear layers, `x·W (+ b)` for either stored layout of the weight and a range of a fused
//! weight's outputs (GPT-2's c_attn read as q, k, v), as matrix products on the device; the
//! input and the output rounded to the run's number format, as the CPU rounds them.

use super::{err, gpu, Saved as Kept, Step, Tensor, Value};
use crate::exec::ExecError;
use crate::gpu::gemm::{Operand, Product};
use crate::gpu::memory::Owned;
use crate::gpu::tensor_ops::column_sums_scratch;
use crate::gpu::Device;
use kiln_compiler::graph::{Layout, Op};
use petgraph::graph::NodeIndex;

/// What the backward reads: the input as the product read it (rounded), when it differs
/// from the input's value.
pub(in crate::gpu) struct Saved<'d, D: Device> {
    rounded_input: Option<Tensor<'d, D>>,
}

/// The product's geometry: rows of the input, its width, the weight's outputs and the range
/// of them computed, and where that block lies in the weight as stored.
struct Geometry {
    m: usize,
    k: usize,
    all: usize,
    first: usize,
    n: usize,
    out_in: bool,
}

impl Geometry {
    /// The weight's block as the product's B operand (`[k, n]`), whichever way it is stored.
    fn weight(&self) -> Operand {
        match self.out_in {
            // [all, k]: rows first..first + n, read transposed.
            true => Operand {
                offset: self.first * self.k,
                stride: self.k,
                transposed: true,
            },
            // [k, all]: columns first..first + n.
            false => Operand {
                offset: self.first,
                stride: self.all,
                transposed: false,
            },
        }
    }
}

fn geometry<D: Device>(
    step: &Step<'_, '_, '_, D>,
    n: NodeIndex,
    op: &Op,
) -> Result<Geometry, ExecError> {
    let Op::Linear { weight, layout, .. } = op else {
        return err("not a linear layer");
    };
    let x = step.tensor(n, 0)?;
    let w = step.param(weight.id)?;
    let out_in = matches!(layout, Layout::OutIn);
    let [rows, cols] = w.shape[..] else {
        return err(format!("a weight of shape {:?}", w.shape));
    };
    let (k, all) = if out_in { (cols, rows) } else { (rows, cols) };
    if x.width() != k {
        return err(format!(
            "an input of width {} meets a weight of [{rows}, {cols}]",
            x.width()
        ));
    }
    let (first, end) = weight
        .outputs
        .map_or((0, all), |(a, e)| (a as usize, e as usize));
    if first >= end || end > all {
        return err(format!("outputs {first}..{end} of a weight with {all}"));
    }
    Ok(Geometry {
        m: x.rows(),
        k,
        all,
        first,
        n: end - first,
        out_in,
    })
}

pub(super) fn forward<'d, D: Device>(
    step: &mut Step<'_, '_, 'd, D>,
    n: NodeIndex,
    op: &Op,
) -> Result<Value<'d, D>, ExecError> {
    let Op::Linear { weight, bias, .. } = op else {
        return err("not a linear layer");
    };
    let geo = geometry(step, n, op)?;
    let x = step.tensor(n, 0)?;
    let rounded_input = step.rounded(x)?;
    let input = rounded_input.as_ref().unwrap_or(x);
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("a tensor with a last axis") = geo.n;
    let y = Tensor::zeros(step.d, &shape).map_err(gpu)?;
    if let Some(bias) = bias {
        let b = step.param(bias.id)?;
        if b.len() != geo.all {
            return err(format!("a bias of {} for {} outputs", b.len(), geo.all));
        }
        let used = b.buffer().range(geo.first, geo.n).expect("checked length");
        step.kernels()
            .add_scaled(used, y.buffer(), 1.0)
            .map_err(gpu)?;
    }
    let product = Product {
        m: geo.m,
        n: geo.n,
        k: geo.k,
        a: Operand::plain(geo.k),
        b: geo.weight(),
        c: Operand::plain(geo.n),
        accumulate: bias.is_some(),
    };
    step.d
        .gemm(
            product,
            input.buffer(),
            step.param(weight.id)?.buffer(),
            y.buffer(),
        )
        .map_err(gpu)?;
    let y = step.rounded(&y)?.unwrap_or(y);
    step.saved[n.index()] = Kept::Dense(Saved { rounded_input });
    Ok(Value::Tensor(y))
}

pub(super) fn backward<D: Device>(
    step: &Step<'_, '_, '_, D>,
    n: NodeIndex,
    op: &Op,
    dy: &Tensor<'_, D>,
) -> Result<(), ExecError> {
    let Op::Linear { weight, bias, .. } = op else {
        return err("not a linear layer");
    };
    let geo = geometry(step, n, op)?;
    // The output's rounding: the gradient rounded like the value.
    let rounded_dy = step.rounded(dy)?;
    let dy = rounded_dy.as_ref().unwrap_or(dy);
    let Kept::Dense(saved) = &step.saved[n.index()] else {
        return err("the forward kept nothing");
    };
    let x = step.tensor(n, 0)?;
    let input = saved.rounded_input.as_ref().unwrap_or(x);
    if let Some(dx) = step.made_grad(n, 0)? {
        // dx += dy·Bᵀ, rounded like the input's value.
        let weight_t = Operand {
            transposed: !geo.weight().transposed,
            ..geo.weight()
        };
        let product = Product {
            m: geo.m,
            n: geo.k,
            k: geo.n,
            a: Operand::plain(geo.n),
            b: weight_t,
            c: Operand::plain(geo.k),
            accumulate: true,
        };
        let w = step.param(weight.id)?.buffer();
        step.add_rounded_product(product, dy.buffer(), w, dx)?;
    }
    if let Some(dw) = step.param_grad(weight.id) {
        // dW's block += xᵀ·dy, as the weight is stored.
        let product = match geo.out_in {
            // [n, k] block: dyᵀ·x.
            true => Product {
                m: geo.n,
                n: geo.k,
                k: geo.m,
                a: Operand::transposed(geo.n),
                b: Operand::plain(geo.k),
                c: Operand {
                    offset: geo.first * geo.k,
                    stride: geo.k,
                    transposed: false,
                },
                accumulate: true,
            },
            // [k, n] block of rows `all` wide: xᵀ·dy.
            false => Product {
                m: geo.k,
                n: geo.n,
                k: geo.m,
                a: Operand::transposed(geo.k),
                b: Operand::plain(geo.n),
                c: Operand {
                    offset: geo.first,
                    stride: geo.all,
                    transposed: false,
                },
                accumulate: true,
            },
        };
        let (a, b) = match geo.out_in {
            true => (dy.buffer(), input.buffer()),
            false => (input.buffer(), dy.buffer()),
        };
        step.d.gemm(product, a, b, dw).map_err(gpu)?;
    }
    if let Some(db) = bias.and_then(|b| step.param_grad(b.id)) {
        let used = db
            .range(geo.first, geo.n)
            .ok_or_else(|| ExecError(format!("a bias of {} for {} outputs", db.len(), geo.all)))?;
        let scratch =
            Owned::<D, f32>::zeros(step.d, column_sums_scratch(geo.m, geo.n)).map_err(gpu)?;
        step.kernels()
            .column_sums(dy.buffer(), used, scratch.buffer())
            .map_err(gpu)?;
    }
    Ok(())
}
