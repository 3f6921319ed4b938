//! Taking tensors apart and putting them together: a range of features, a concatenation along
//! the sequence, one position per row.

use super::misrouted;
use crate::exec::interpreter::Interpreter;
use crate::exec::kernels;
use crate::exec::value::V;
use crate::exec::{err, Dev, ExecError, Tape};
use dfdx::prelude::*;
use kiln_compiler::graph::{Op, Pick};
use petgraph::graph::NodeIndex;

/// Computes node `n`, whose op is of this family.
pub(super) fn forward(it: &mut Interpreter<'_>, n: NodeIndex, op: Op) -> Result<V, ExecError> {
    match op {
        Op::Slice { start, len } => {
            let (start, end) = it
                .ops
                .slices
                .get(&n)
                .copied()
                .unwrap_or((start as usize, (start + len) as usize));
            match it.input(n, 0)?.clone() {
                V::R3(x) => {
                    let x = x.put_tape(it.take_tape());
                    let y = kernels::columns(x, start, end).map_err(ExecError)?;
                    Ok(it.keep3(y))
                }
                _ => err("slice of a non-rank-3 tensor"),
            }
        }
        Op::Concat { axis } => {
            let (a, b) = (it.input(n, 0)?.r3("a")?, it.input(n, 1)?.r3("b")?);
            if axis != 1 {
                return err("concatenation only along the sequence axis");
            }
            let tape = it.take_tape();
            let out: Tensor<(usize, usize, usize), f32, Dev, Tape> =
                (a.put_tape(tape), b).concat_along(Axis::<1>);
            Ok(it.keep3(out))
        }
        Op::SelectToken { pick, offset } => {
            let x = it.input(n, 0)?.r3("x")?;
            let (b, s, d) = *x.shape();
            let offset = offset as usize;
            // Positions among the real tokens, which follow `offset` virtual ones.
            let positions: Vec<usize> = match pick {
                Pick::First => vec![0; b],
                Pick::Mask => it
                    .batch
                    .mask_positions
                    .clone()
                    .ok_or_else(|| ExecError("the batch has no mask positions".into()))?,
                Pick::Last => match &it.batch.attention_mask {
                    Some(m) => m
                        .iter()
                        .map(|row| row.iter().rposition(|&v| v != 0).unwrap_or(0))
                        .collect(),
                    None => vec![s.saturating_sub(offset + 1); b],
                },
            };
            let positions: Vec<usize> = positions.iter().map(|p| p + offset).collect();
            if positions.len() != b || positions.iter().any(|&p| p >= s) {
                return err("token positions do not fit the batch");
            }
            // [b, s, d] → [b, d, s], then pick one position per row for every feature.
            let idx: Tensor<(usize, usize), usize, Dev> = it.dev.tensor_from_vec(
                positions
                    .iter()
                    .flat_map(|&p| std::iter::repeat_n(p, d))
                    .collect(),
                (b, d),
            );
            let tape = it.take_tape();
            let out: Tensor<(usize, usize), f32, Dev, Tape> =
                x.put_tape(tape).permute::<_, Axes3<0, 2, 1>>().select(idx);
            Ok(it.keep2(out))
        }
        other => Err(misrouted("shape", &other)),
    }
}
