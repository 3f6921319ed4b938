//! Objectives: cross-entropy over the positions whose label is not −100 (shifted for causal
//! LM; over class logits `[b, classes]` as one position), from one pass of log Σ exp per row
//! and one of its gradient; and weighted sums of losses (on the host: they are scalars).

use super::{err, gpu, Grad, Saved as Kept, Step, Value};
use crate::exec::{position_targets, ExecError};
use crate::gpu::launch::TargetRows;
use crate::gpu::memory::Owned;
use crate::gpu::Device;
use kiln_compiler::graph::Op;
use petgraph::graph::NodeIndex;

/// What the cross-entropy's backward reads: the rows' targets (−1: none) and log Σ exp,
/// each row's weight (1 where labelled), what the sum is divided by, and the rows' geometry.
pub(in crate::gpu) struct Saved<'d, D: Device> {
    targets: Owned<'d, D, i64>,
    lse: Owned<'d, D, f32>,
    weights: Vec<f32>,
    count: f32,
    positions: usize,
    seq: usize,
    width: usize,
}

pub(super) fn forward<'d, D: Device>(
    step: &mut Step<'_, '_, 'd, D>,
    n: NodeIndex,
    op: &Op,
) -> Result<Value<'d, D>, ExecError> {
    match op {
        Op::CrossEntropy { shift } => {
            let logits = step.tensor(n, 0)?;
            let labels = step.ints(n, 1)?;
            let (b, s, width, shift) = match logits.shape[..] {
                [b, s, v] => (b, s, v, *shift),
                // Class logits: one position per row.
                [b, c] => (b, 1, c, false),
                _ => return err("cross-entropy of logits not [batch, positions, vocabulary]"),
            };
            let (positions, offset) = if shift {
                (s.saturating_sub(1), 1)
            } else {
                (s, 0)
            };
            let labelled = position_targets(labels, b, positions, offset, width)?;
            // −1: no target (the kernels skip the row).
            let targets: Vec<i64> = labelled
                .iter()
                .map(|t| t.map_or(-1, |t| t as i64))
                .collect();
            let weights: Vec<f32> = labelled
                .iter()
                .map(|t| f32::from(u8::from(t.is_some())))
                .collect();
            let count = match step.batch.label_counts.get(&n) {
                Some(&count) => count,
                None => weights.iter().sum(),
            };
            if count == 0.0 {
                return err("no position has a label");
            }
            let targets = Owned::upload(step.d, &targets).map_err(gpu)?;
            let lse = Owned::zeros(step.d, b * positions).map_err(gpu)?;
            let picked = Owned::<D, f32>::zeros(step.d, b * positions).map_err(gpu)?;
            let rows = TargetRows {
                logits: logits.buffer(),
                positions,
                seq: s,
                width,
                first: 0,
            };
            step.kernels()
                .softmax_statistics(rows, targets.buffer(), lse.buffer(), picked.buffer())
                .map_err(gpu)?;
            let (lses, picks) = (
                lse.download().map_err(gpu)?,
                picked.download().map_err(gpu)?,
            );
            let sum: f64 = weights
                .iter()
                .zip(lses.iter().zip(&picks))
                .map(|(&w, (&lse, &picked))| f64::from(w) * f64::from(lse - picked))
                .sum();
            step.saved[n.index()] = Kept::Loss(Saved {
                targets,
                lse,
                weights,
                count,
                positions,
                seq: s,
                width,
            });
            Ok(Value::Scalar((sum / f64::from(count)) as f32))
        }
        Op::WeightedSum { weights } => {
            let mut total = 0.0f32;
            for (slot, w) in weights.iter().enumerate() {
                match step.input(n, slot)? {
                    Value::Scalar(x) => total += *w as f32 * x,
                    _ => return err("a weighted sum of a value that is not a loss"),
                }
            }
            Ok(Value::Scalar(total))
        }
        _ => err("not a loss"),
    }
}

/// The loss's contribution to its inputs' gradients, `upstream` the gradient of the loss.
pub(super) fn backward<D: Device>(
    step: &mut Step<'_, '_, '_, D>,
    n: NodeIndex,
    op: &Op,
    upstream: f32,
) -> Result<(), ExecError> {
    match op {
        Op::CrossEntropy { .. } => {
            step.make_input_grads(n)?;
            let step = &*step;
            let Kept::Loss(saved) = &step.saved[n.index()] else {
                return err("the forward kept nothing");
            };
            let Some(grad) = step.made_grad(n, 0)? else {
                return Ok(());
            };
            let coef: Vec<f32> = saved
                .weights
                .iter()
                .map(|w| upstream * w / saved.count)
                .collect();
            let coef = Owned::upload(step.d, &coef).map_err(gpu)?;
            let rows = TargetRows {
                logits: step.tensor(n, 0)?.buffer(),
                positions: saved.positions,
                seq: saved.seq,
                width: saved.width,
                first: 0,
            };
            step.kernels()
                .softmax_target_backward(
                    rows,
                    saved.targets.buffer(),
                    saved.lse.buffer(),
                    coef.buffer(),
                    grad,
                )
                .map_err(gpu)
        }
        Op::WeightedSum { weights } => {
            for (slot, w) in weights.iter().enumerate() {
                let input = step.input_node(n, slot)?;
                let add = *w as f32 * upstream;
                let grad = &mut step.grads[input.index()];
                *grad = Some(Grad::Scalar(match grad {
                    Some(Grad::Scalar(g)) => *g + add,
                    _ => add,
                }));
            }
            Ok(())
        }
        _ => err("not a loss"),
    }
}
