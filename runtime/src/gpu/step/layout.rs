//! Ops that move values: embedding lookups (token rows, learned positions, virtual tokens)
//! with their gradients summed back per table row in a fixed order, and column ranges
//! (slices of the last axis, concatenations).

use super::{err, gpu, Saved, Step, Tensor, Value};
use crate::exec::ExecError;
use crate::gpu::tensor_ops::{Columns, RowIndex};
use crate::gpu::Device;
use kiln_compiler::graph::Op;
use petgraph::graph::NodeIndex;

pub(super) fn forward<'d, D: Device>(
    step: &mut Step<'_, '_, 'd, D>,
    n: NodeIndex,
    op: &Op,
) -> Result<Value<'d, D>, ExecError> {
    match *op {
        Op::Embedding { table } => {
            let ids = step.ints(n, 0)?;
            let (b, s) = (ids.len(), ids.first().map_or(0, Vec::len));
            if ids.iter().any(|row| row.len() != s) {
                return err("token id rows of different lengths");
            }
            // Negative ids (padding) read row 0, as on the CPU; their positions are masked.
            let flat: Vec<i64> = ids.iter().flatten().map(|&i| i.max(0)).collect();
            lookup(step, n, table, &flat, &[b, s])
        }
        Op::PositionEmbedding { table, offset } => {
            let x = step.tensor(n, 0)?;
            let &[b, s, _] = &x.shape[..] else {
                return err("positions of a tensor not [batch, positions, features]");
            };
            let ids: Vec<i64> = (0..b)
                .flat_map(|_| (0..s).map(|j| (offset as usize + j) as i64))
                .collect();
            lookup(step, n, table, &ids, &[b, s])
        }
        Op::VirtualTokens { table } => {
            let b = match step.input(n, 0)? {
                Value::Ints(rows) => rows.len(),
                Value::Tensor(t) => t.shape.first().copied().unwrap_or(0),
                Value::Scalar(_) => return err("virtual tokens need the batch"),
            };
            let p = step.param(table)?.shape.first().copied().unwrap_or(0);
            let ids: Vec<i64> = (0..b).flat_map(|_| 0..p as i64).collect();
            lookup(step, n, table, &ids, &[b, p])
        }
        Op::Slice { start, len } => {
            let x = step.tensor(n, 0)?;
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("a tensor with a last axis") = len as usize;
            let y = Tensor::zeros(step.d, &shape).map_err(gpu)?;
            let columns = Columns {
                rows: x.rows(),
                cols: len as usize,
                src_stride: x.width(),
                src_at: start as usize,
                dst_stride: len as usize,
                dst_at: 0,
            };
            step.kernels()
                .add_columns(x.buffer(), y.buffer(), columns)
                .map_err(gpu)?;
            Ok(Value::Tensor(y))
        }
        Op::Concat { axis } => {
            let pieces = concat_pieces(step, n, axis)?;
            // The inputs' shape with their extents along `axis` summed (the microbatch's rows,
            // not the graph's whole batch).
            let mut shape = step.tensor(n, 0)?.shape.clone();
            shape[axis] = (0..pieces.len())
                .map(|slot| step.tensor(n, slot).map(|t| t.shape[axis]))
                .sum::<Result<usize, _>>()?;
            let y = Tensor::zeros(step.d, &shape).map_err(gpu)?;
            for (slot, columns) in pieces.into_iter().enumerate() {
                step.kernels()
                    .add_columns(step.tensor(n, slot)?.buffer(), y.buffer(), columns)
                    .map_err(gpu)?;
            }
            Ok(Value::Tensor(y))
        }
        _ => err("not a layout op"),
    }
}

/// Rows `ids` of parameter `table`, as a tensor of `shape` + [width].
fn lookup<'d, D: Device>(
    step: &mut Step<'_, '_, 'd, D>,
    n: NodeIndex,
    table: usize,
    ids: &[i64],
    shape: &[usize],
) -> Result<Value<'d, D>, ExecError> {
    let w = step.param(table)?;
    let &[rows, width] = &w.shape[..] else {
        return err(format!("a table of shape {:?}", w.shape));
    };
    let index = RowIndex::new(step.d, ids, rows).map_err(gpu)?;
    let mut out_shape = shape.to_vec();
    out_shape.push(width);
    let y = Tensor::zeros(step.d, &out_shape).map_err(gpu)?;
    step.kernels()
        .gather_rows(w.buffer(), &index, y.buffer(), width)
        .map_err(gpu)?;
    step.saved[n.index()] = Saved::Rows(index);
    Ok(Value::Tensor(y))
}

/// Where each input of a concatenation along `axis` lies in the output: the axes before it
/// are rows, each input's rest a range of columns of the output's row.
fn concat_pieces<D: Device>(
    step: &Step<'_, '_, '_, D>,
    n: NodeIndex,
    axis: usize,
) -> Result<Vec<Columns>, ExecError> {
    let inputs = step.g.inputs(n).len();
    let shapes: Vec<&Vec<usize>> = (0..inputs)
        .map(|slot| step.tensor(n, slot).map(|t| &t.shape))
        .collect::<Result<_, _>>()?;
    let Some(first) = shapes.first() else {
        return err("a concatenation of nothing");
    };
    if axis >= first.len()
        || shapes
            .iter()
            .any(|s| s.len() != first.len() || s[..axis] != first[..axis])
    {
        return err(format!("concatenating {shapes:?} along axis {axis}"));
    }
    let rows: usize = first[..axis].iter().product();
    let widths: Vec<usize> = shapes.iter().map(|s| s[axis..].iter().product()).collect();
    let total: usize = widths.iter().sum();
    let mut at = 0;
    Ok(widths
        .into_iter()
        .map(|cols| {
            let columns = Columns {
                rows,
                cols,
                src_stride: cols,
                src_at: 0,
                dst_stride: total,
                dst_at: at,
            };
            at += cols;
            columns
        })
        .collect())
}

/// The same columns, copied the other way (a gradient back to its input).
fn reversed(c: Columns) -> Columns {
    Columns {
        rows: c.rows,
        cols: c.cols,
        src_stride: c.dst_stride,
        src_at: c.dst_at,
        dst_stride: c.src_stride,
        dst_at: c.src_at,
    }
}

pub(super) fn backward<D: Device>(
    step: &Step<'_, '_, '_, D>,
    n: NodeIndex,
    op: &Op,
    dy: &Tensor<'_, D>,
) -> Result<(), ExecError> {
    let k = step.kernels();
    match *op {
        Op::Embedding { table }
        | Op::PositionEmbedding { table, .. }
        | Op::VirtualTokens { table } => {
            let Saved::Rows(index) = &step.saved[n.index()] else {
                return err("the forward kept nothing");
            };
            if let Some(dw) = step.param_grad(table) {
                k.scatter_rows(dy.buffer(), index, dw, dy.width())
                    .map_err(gpu)?;
            }
            Ok(())
        }
        Op::Slice { start, len } => {
            let x = step.tensor(n, 0)?;
            if let Some(dx) = step.made_grad(n, 0)? {
                let columns = Columns {
                    rows: x.rows(),
                    cols: len as usize,
                    src_stride: len as usize,
                    src_at: 0,
                    dst_stride: x.width(),
                    dst_at: start as usize,
                };
                k.add_columns(dy.buffer(), dx, columns).map_err(gpu)?;
            }
            Ok(())
        }
        Op::Concat { axis } => {
            for (slot, columns) in concat_pieces(step, n, axis)?.into_iter().enumerate() {
                if let Some(dx) = step.made_grad(n, slot)? {
                    k.add_columns(dy.buffer(), dx, reversed(columns))
                        .map_err(gpu)?;
                }
            }
            Ok(())
        }
        _ => err("not a layout op"),
    }
}
