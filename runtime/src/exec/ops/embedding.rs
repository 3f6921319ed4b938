//! Embeddings: token rows of a table (a rank's rows of a vocabulary-parallel one), learned
//! positions, and the virtual tokens of prompt and prefix tuning.

use super::misrouted;
use crate::exec::interpreter::Interpreter;
use crate::exec::value::V;
use crate::exec::{err, Dev, ExecError, T3Taped, T2, T3};
use dfdx::prelude::*;
use kiln_compiler::graph::Op;
use petgraph::graph::NodeIndex;

/// Computes node `n`, whose op is of this family.
pub(super) fn forward(it: &mut Interpreter<'_>, n: NodeIndex, op: Op) -> Result<V, ExecError> {
    match op {
        Op::Embedding { table } => {
            let ids = it.input(n, 0)?.ints("ids")?.clone();
            let (b, s) = (ids.len(), ids.first().map_or(0, Vec::len));
            let w = it.p2(table)?;
            let tape = it.take_tape();
            let Some(&(lo, hi)) = it.ops.vocab_rows.get(&n) else {
                let flat: Vec<usize> = ids.iter().flatten().map(|&i| i.max(0) as usize).collect();
                let idx: Tensor<(usize, usize), usize, Dev> = it.dev.tensor_from_vec(flat, (b, s));
                let out: T3Taped = w.put_tape(tape).gather(idx);
                return Ok(it.keep3(out));
            };
            // Vocabulary-parallel: this rank's rows, zeros for ids another rank holds (the
            // all-reduce that follows adds the right row).
            let local = |i: i64| (i.max(0) as usize).checked_sub(lo).filter(|&r| r < hi - lo);
            let flat: Vec<usize> = ids
                .iter()
                .flatten()
                .map(|&i| local(i).unwrap_or(0))
                .collect();
            let held: Vec<f32> = ids
                .iter()
                .flatten()
                .map(|&i| if local(i).is_some() { 1.0 } else { 0.0 })
                .collect();
            let idx: Tensor<(usize, usize), usize, Dev> = it.dev.tensor_from_vec(flat, (b, s));
            let d = w.shape().1;
            let held: T2 = it.dev.tensor_from_vec(held, (b, s));
            let out: T3Taped = w.put_tape(tape).gather(idx);
            Ok(it.keep3(out * held.broadcast_like::<_, Axis<2>>(&(b, s, d))))
        }
        Op::PositionEmbedding { table, offset } => {
            let x = it.input(n, 0)?.r3("x")?;
            let (b, s, d) = *x.shape();
            let w = it.p2(table)?;
            let tape = it.take_tape();
            let rows = w
                .put_tape(tape)
                .slice((offset as usize..offset as usize + s, ..))
                .reshape_like(&(s, d));
            let out = rows.broadcast_like::<_, Axis<0>>(&(b, s, d));
            Ok(it.keep3(out))
        }
        Op::VirtualTokens { table } => {
            let x = it.input(n, 0)?;
            let b = match x {
                V::Ints(v) => v.len(),
                V::R3(t) => t.shape().0,
                _ => return err("virtual tokens need the batch"),
            };
            let w = it.p2(table)?;
            let p = w.shape().0;
            // Repeated over the batch as I·w per row: a product, whose backward sums the
            // rows' gradients into the table (a broadcast consumed by several slices did not).
            let mut eye = vec![0.0f32; b * p * p];
            for r in 0..b {
                for i in 0..p {
                    eye[(r * p + i) * p + i] = 1.0;
                }
            }
            let eye: T3 = it.dev.tensor_from_vec(eye, (b, p, p));
            let tape = it.take_tape();
            let out = eye.put_tape(tape).matmul(w);
            Ok(it.keep3(out))
        }
        other => Err(misrouted("embedding", &other)),
    }
}
