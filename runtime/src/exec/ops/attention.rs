//! Attention: scaled dot-product attention with causal and padding masks over grouped-query
//! heads (a tensor-parallel rank's share of them), and LLaMA's rotary position embedding.

use super::misrouted;
use crate::exec::interpreter::Interpreter;
use crate::exec::value::V;
use crate::exec::{err, kernels};
use crate::exec::{ExecError, T2, T3};
use dfdx::prelude::*;
use kiln_compiler::graph::Op;
use petgraph::graph::NodeIndex;

/// HF's mask value: the most negative finite f32, so fully masked rows stay finite.
const MASKED: f32 = f32::MIN;

/// Computes node `n`, whose op is of this family.
pub(super) fn forward(it: &mut Interpreter<'_>, n: NodeIndex, op: Op) -> Result<V, ExecError> {
    match op {
        Op::Rotary {
            theta,
            head_dim,
            offset,
        } => {
            let x = it.input(n, 0)?.r3("x")?;
            rotary(it, x, theta, head_dim as usize, offset as usize)
        }
        Op::Attention {
            head_dim,
            causal,
            dropout,
            ..
        } => {
            // The products' operands, in the run's number format.
            let q = it.input(n, 0)?.r3("q")?;
            let q = it.rounded(q)?;
            let k = it.input(n, 1)?.r3("k")?;
            let k = it.rounded(k)?;
            let v = it.input(n, 2)?.r3("v")?;
            let v = it.rounded(v)?;
            attention(it, q, k, v, head_dim as usize, causal, dropout)
        }
        other => Err(misrouted("attention", &other)),
    }
}

/// LLaMA's rotary embedding: x·cos + rotate_half(x)·sin per head, positions from `offset`.
/// rotate_half is a product with a fixed [d, d] matrix (−x₂, x₁), which keeps the backward
/// to matmuls and elementwise products.
fn rotary(
    it: &mut Interpreter<'_>,
    x: T3,
    theta: f64,
    d: usize,
    offset: usize,
) -> Result<V, ExecError> {
    let (b, s, width) = *x.shape();
    let h = width / d;
    let half = d / 2;
    // One table for every row of the batch (broadcast, not copied).
    let mut cos = Vec::with_capacity(s * width);
    let mut sin = Vec::with_capacity(s * width);
    for pos in offset..offset + s {
        for _ in 0..h {
            for j in 0..d {
                let angle = pos as f64 / theta.powf((2 * (j % half)) as f64 / d as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let mut turn = vec![0.0f32; d * d];
    for j in 0..half {
        turn[(j + half) * d + j] = -1.0;
        turn[j * d + j + half] = 1.0;
    }
    let rows = (b, s * h, d);
    let cos: T3 = it
        .dev
        .tensor_from_vec(cos, (s * h, d))
        .broadcast_like::<_, Axis<0>>(&rows);
    let sin: T3 = it
        .dev
        .tensor_from_vec(sin, (s * h, d))
        .broadcast_like::<_, Axis<0>>(&rows);
    let turn: T2 = it.dev.tensor_from_vec(turn, (d, d));
    let (x, tape) = x.put_tape(it.take_tape()).reshape_like(&rows).split_tape();
    let (turned, tape) = (x.clone().put_tape(tape).matmul(turn) * sin).split_tape();
    let y = (x.put_tape(tape) * cos + turned).reshape_like(&(b, s, width));
    Ok(it.keep3(y))
}

/// Scaled dot-product attention with causal and padding masks over heads of `d` features.
fn attention(
    it: &mut Interpreter<'_>,
    q: T3,
    k: T3,
    v: T3,
    d: usize,
    causal: bool,
    dropout: f64,
) -> Result<V, ExecError> {
    let (b, s, width) = *q.shape();
    let skv = k.shape().1;
    // The heads this rank holds (all of them without tensor parallelism).
    let (heads, kv_heads) = (width / d, k.shape().2 / d);
    // Keys without a query of their own (prefixes) come first: query i sees keys up to i + P.
    let past = skv - s;
    let mut mask = vec![0.0f32; b * s * skv];
    let padding = it.batch.attention_mask.clone();
    for r in 0..b {
        for i in 0..s {
            for j in 0..skv {
                let future = causal && j > i + past;
                // The batch mask covers the last keys (the real tokens); keys before them
                // (prefixes, virtual tokens) are always visible.
                let pad = padding.as_ref().is_some_and(|m| {
                    let real = j as i64 - (skv - m[r].len().min(skv)) as i64;
                    real >= 0 && m[r][real as usize] == 0
                });
                if future || pad {
                    mask[(r * s + i) * skv + j] = MASKED;
                }
            }
        }
    }
    // A rank holding some of the heads drops what one device would in those heads: the
    // rows' elements from its first head's on.
    let first = it.ops.rank * heads;
    let plane = s * skv;
    let dropout = it.dropout_values(dropout, b, first * plane, heads * plane)?;
    if kv_heads == 0 || heads % kv_heads != 0 {
        return err(format!(
            "{heads} query heads over {kv_heads} key/value heads"
        ));
    }
    let dims = kernels::Heads {
        heads,
        kv_heads,
        dim: d,
    };
    let q = q.put_tape(it.take_tape());
    let out = kernels::attention(q, k, v, dims, mask, dropout).map_err(ExecError)?;
    Ok(it.keep3(kernels::rounded(out, it.format)))
}
