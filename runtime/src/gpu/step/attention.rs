//! Attention: the FlashAttention-style core over causal, padding and prefix masks and
//! grouped-query heads, with dropout drawn in the kernel as the CPU draws it; and LLaMA's
//! rotary position embedding. The core's operands and result are rounded to the run's number
//! format, as the CPU rounds them.

use super::{err, gpu, RowKeys, Saved as Kept, Step, Tensor, Value};
use crate::exec::ExecError;
use crate::gpu::launch::{AttentionGradients, AttentionShape, AttentionTensors};
use crate::gpu::memory::Owned;
use crate::gpu::tensor_ops::{RotaryShape, Turn};
use crate::gpu::Device;
use kiln_compiler::graph::Op;
use petgraph::graph::NodeIndex;

/// What the core's backward reads beyond its inputs.
pub(in crate::gpu) struct Saved<'d, D: Device> {
    shape: AttentionShape,
    /// q, k, v as the core read them, where rounding changed them.
    rounded: [Option<Tensor<'d, D>>; 3],
    /// The core's output before rounding, where rounding changed it.
    unrounded_output: Option<Tensor<'d, D>>,
    stats: Owned<'d, D, f32>,
    key_keep: Option<Owned<'d, D, f32>>,
    dropout: Option<RowKeys<'d, D>>,
}

/// The rotary embedding's cosines and sines `[seq, d/2]`, as the CPU computes them.
pub(in crate::gpu) struct RotaryTables<'d, D: Device> {
    cos: Owned<'d, D, f32>,
    sin: Owned<'d, D, f32>,
    shape: RotaryShape,
}

pub(super) fn forward<'d, D: Device>(
    step: &mut Step<'_, '_, 'd, D>,
    n: NodeIndex,
    op: &Op,
) -> Result<Value<'d, D>, ExecError> {
    match *op {
        Op::Rotary {
            theta,
            head_dim,
            offset,
        } => {
            let x = step.tensor(n, 0)?;
            let tables = rotary_tables(step, x, theta, head_dim as usize, offset as usize)?;
            let y = Tensor::zeros(step.d, &x.shape).map_err(gpu)?;
            step.kernels()
                .rotary(
                    x.buffer(),
                    tables.cos.buffer(),
                    tables.sin.buffer(),
                    y.buffer(),
                    tables.shape,
                    Turn::Forward,
                )
                .map_err(gpu)?;
            step.saved[n.index()] = Kept::Rotary(tables);
            Ok(Value::Tensor(y))
        }
        Op::Attention {
            head_dim,
            causal,
            dropout,
            ..
        } => {
            let (q, k, v) = (step.tensor(n, 0)?, step.tensor(n, 1)?, step.tensor(n, 2)?);
            let d = head_dim as usize;
            let (&[b, s, width], &[kb, skv, kv_width]) = (&q.shape[..], &k.shape[..]) else {
                return err("attention over tensors not [batch, positions, features]");
            };
            if kb != b
                || v.shape != k.shape
                || d == 0
                || !width.is_multiple_of(d)
                || !kv_width.is_multiple_of(d)
            {
                return err(format!(
                    "attention of queries {:?} over keys {:?} and values {:?}, heads of {d}",
                    q.shape, k.shape, v.shape
                ));
            }
            let count = |x: usize| {
                u32::try_from(x).map_err(|_| ExecError(format!("{x} is too large for the kernels")))
            };
            let shape = AttentionShape {
                batch: count(b)?,
                s: count(s)?,
                s_kv: count(skv)?,
                heads: count(width / d)?,
                kv_heads: count(kv_width / d)?,
                d: count(d)?,
                causal,
            };
            let rounded = [step.rounded(q)?, step.rounded(k)?, step.rounded(v)?];
            let [rq, rk, rv] = &rounded;
            let key_keep = match key_keep(step, b, skv)? {
                Some(keep) => Some(Owned::upload(step.d, &keep).map_err(gpu)?),
                None => None,
            };
            let y = Tensor::zeros(step.d, &q.shape).map_err(gpu)?;
            let stats = Owned::zeros(step.d, b * (width / d) * s * 2).map_err(gpu)?;
            let dropout = step.dropout(n, dropout, b)?;
            let tensors = AttentionTensors {
                q: rq.as_ref().unwrap_or(q).buffer(),
                k: rk.as_ref().unwrap_or(k).buffer(),
                v: rv.as_ref().unwrap_or(v).buffer(),
                key_keep: key_keep.as_ref().map(Owned::buffer),
                y: y.buffer(),
                stats: stats.buffer(),
            };
            step.kernels()
                .attention_forward(shape, tensors, dropout.as_ref().map(|keys| keys.draw(0)))
                .map_err(gpu)?;
            let (output, unrounded_output) = match step.rounded(&y)? {
                Some(rounded) => (rounded, Some(y)),
                None => (y, None),
            };
            step.saved[n.index()] = Kept::Attention(Box::new(Saved {
                shape,
                rounded,
                unrounded_output,
                stats,
                key_keep,
                dropout,
            }));
            Ok(Value::Tensor(output))
        }
        _ => err("not an attention op"),
    }
}

/// 1 where a key may be attended to, `[b, s_kv]`, from the batch's padding mask, which
/// covers the last keys (the real tokens; keys before them, prefixes and virtual tokens, are
/// always visible); `None` without a mask.
fn key_keep<D: Device>(
    step: &Step<'_, '_, '_, D>,
    b: usize,
    skv: usize,
) -> Result<Option<Vec<f32>>, ExecError> {
    let Some(mask) = &step.batch.attention_mask else {
        return Ok(None);
    };
    if mask.len() != b {
        return err(format!("a padding mask of {} rows for {b}", mask.len()));
    }
    let mut keep = vec![1.0f32; b * skv];
    for (r, row) in mask.iter().enumerate() {
        let first_real = skv - row.len().min(skv);
        for j in first_real..skv {
            if row[j - first_real] == 0 {
                keep[r * skv + j] = 0.0;
            }
        }
    }
    Ok(Some(keep))
}

fn rotary_tables<'d, D: Device>(
    step: &Step<'_, '_, 'd, D>,
    x: &Tensor<'_, D>,
    theta: f64,
    d: usize,
    offset: usize,
) -> Result<RotaryTables<'d, D>, ExecError> {
    let &[_, seq, width] = &x.shape[..] else {
        return err("a rotary embedding of a tensor not [batch, positions, features]");
    };
    if d == 0 || !d.is_multiple_of(2) || !width.is_multiple_of(d) {
        return err(format!(
            "a rotary embedding of width {width} in heads of {d}"
        ));
    }
    let half = d / 2;
    let mut cos = Vec::with_capacity(seq * half);
    let mut sin = Vec::with_capacity(seq * half);
    for position in offset..offset + seq {
        for j in 0..half {
            let angle = position as f64 / theta.powf((2 * j) as f64 / d as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok(RotaryTables {
        cos: Owned::upload(step.d, &cos).map_err(gpu)?,
        sin: Owned::upload(step.d, &sin).map_err(gpu)?,
        shape: RotaryShape {
            seq,
            heads: width / d,
            d,
        },
    })
}

pub(super) fn backward<D: Device>(
    step: &Step<'_, '_, '_, D>,
    n: NodeIndex,
    op: &Op,
    dy: &Tensor<'_, D>,
) -> Result<(), ExecError> {
    match (op, &step.saved[n.index()]) {
        (Op::Rotary { .. }, Kept::Rotary(tables)) => {
            if let Some(dx) = step.made_grad(n, 0)? {
                step.kernels()
                    .rotary(
                        dy.buffer(),
                        tables.cos.buffer(),
                        tables.sin.buffer(),
                        dx,
                        tables.shape,
                        Turn::Back,
                    )
                    .map_err(gpu)?;
            }
            Ok(())
        }
        (Op::Attention { .. }, Kept::Attention(saved)) => {
            let inputs = [step.tensor(n, 0)?, step.tensor(n, 1)?, step.tensor(n, 2)?];
            let read: Vec<&Tensor<'_, D>> = saved
                .rounded
                .iter()
                .zip(inputs)
                .map(|(rounded, input)| rounded.as_ref().unwrap_or(input))
                .collect();
            let y = match (&saved.unrounded_output, &step.values[n.index()]) {
                (Some(y), _) => y,
                (None, Some(Value::Tensor(y))) => y,
                _ => return err("the forward's output is gone"),
            };
            // The output's rounding: the gradient rounded like the value.
            let rounded_dy = step.rounded(dy)?;
            let dy = rounded_dy.as_ref().unwrap_or(dy);
            let grads: Vec<Tensor<'_, D>> = read
                .iter()
                .map(|t| Tensor::zeros(step.d, &t.shape))
                .collect::<Result<_, _>>()
                .map_err(gpu)?;
            let delta = Owned::<D, f32>::zeros(step.d, saved.stats.len() / 2).map_err(gpu)?;
            let tensors = AttentionTensors {
                q: read[0].buffer(),
                k: read[1].buffer(),
                v: read[2].buffer(),
                key_keep: saved.key_keep.as_ref().map(Owned::buffer),
                y: y.buffer(),
                stats: saved.stats.buffer(),
            };
            let gradients = AttentionGradients {
                dy: dy.buffer(),
                dq: grads[0].buffer(),
                dk: grads[1].buffer(),
                dv: grads[2].buffer(),
                delta: delta.buffer(),
            };
            let dropout = saved.dropout.as_ref().map(|keys| keys.draw(0));
            step.kernels()
                .attention_backward(saved.shape, tensors, gradients, dropout)
                .map_err(gpu)?;
            for (slot, grad) in grads.iter().enumerate() {
                if let Some(d) = step.made_grad(n, slot)? {
                    step.add_rounded(grad.buffer(), d)?;
                }
            }
            Ok(())
        }
        _ => err("the forward kept nothing"),
    }
}
