//! Shape inference: the output tensor of each op from its inputs and parameters. The builder
//! uses it to fill in shapes; the verifier re-runs it after every pass.

use super::ir::{DType, Op, Param, TensorMeta};

fn same(a: &TensorMeta) -> Result<TensorMeta, String> {
    Ok(a.clone())
}

fn last(t: &TensorMeta) -> u64 {
    t.shape.last().copied().unwrap_or(0)
}

fn with_last(t: &TensorMeta, n: u64) -> TensorMeta {
    let mut shape = t.shape.clone();
    if let Some(l) = shape.last_mut() {
        *l = n;
    }
    TensorMeta {
        shape,
        dtype: t.dtype,
    }
}

fn scalar(dtype: DType) -> TensorMeta {
    TensorMeta {
        shape: Vec::new(),
        dtype,
    }
}

/// The output of `op` applied to `inputs`, or why the shapes do not fit.
pub fn infer(
    op: &Op,
    inputs: &[&TensorMeta],
    params: &[Param],
    dtype: DType,
) -> Result<TensorMeta, String> {
    let arity = |n: usize| -> Result<(), String> {
        if inputs.len() == n {
            Ok(())
        } else {
            Err(format!(
                "{} takes {n} inputs, got {}",
                op.kind(),
                inputs.len()
            ))
        }
    };
    let param = |id: usize| {
        params
            .get(id)
            .ok_or_else(|| format!("unknown parameter #{id}"))
    };
    match op {
        Op::Input { .. } => Err("inputs have no inferred shape".into()),
        Op::Embedding { table } => {
            arity(1)?;
            let t = param(*table)?;
            let mut shape = inputs[0].shape.clone();
            shape.push(t.shape[1]);
            Ok(TensorMeta { shape, dtype })
        }
        Op::PositionEmbedding { table, offset } => {
            arity(1)?;
            let t = param(*table)?;
            let s = inputs[0].shape.get(1).copied().unwrap_or(0);
            if offset + s > t.shape[0] {
                return Err(format!(
                    "positions {offset}..{} exceed the table's {}",
                    offset + s,
                    t.shape[0]
                ));
            }
            Ok(TensorMeta {
                shape: vec![inputs[0].shape[0], s, t.shape[1]],
                dtype,
            })
        }
        Op::VirtualTokens { table } => {
            arity(1)?;
            let t = param(*table)?;
            Ok(TensorMeta {
                shape: vec![inputs[0].shape[0], t.shape[0], t.shape[1]],
                dtype,
            })
        }
        Op::Add | Op::Mul => {
            arity(2)?;
            if inputs[0].shape != inputs[1].shape {
                return Err(format!(
                    "{} of {:?} and {:?}",
                    op.kind(),
                    inputs[0].shape,
                    inputs[1].shape
                ));
            }
            same(inputs[0])
        }
        Op::DoraRescale { magnitude, .. } => {
            arity(1)?;
            if param(*magnitude)?.numel() != last(inputs[0]) {
                return Err(format!(
                    "DoRA magnitude of {} for features {}",
                    param(*magnitude)?.numel(),
                    last(inputs[0])
                ));
            }
            same(inputs[0])
        }
        Op::Scale { .. } | Op::Activation { .. } | Op::Dropout { .. } => {
            arity(1)?;
            same(inputs[0])
        }
        Op::ScaleBy { param: p } => {
            arity(1)?;
            if param(*p)?.numel() != last(inputs[0]) {
                return Err(format!(
                    "scale vector of {} for features {}",
                    param(*p)?.numel(),
                    last(inputs[0])
                ));
            }
            same(inputs[0])
        }
        Op::LayerNorm { weight, .. } | Op::RmsNorm { weight, .. } => {
            arity(1)?;
            if param(*weight)?.numel() != last(inputs[0]) {
                return Err(format!(
                    "norm of {} features over {}",
                    param(*weight)?.numel(),
                    last(inputs[0])
                ));
            }
            same(inputs[0])
        }
        Op::Linear {
            weight,
            in_features,
            out_features,
            layout,
            ..
        } => {
            arity(1)?;
            if last(inputs[0]) != *in_features {
                return Err(format!(
                    "linear of {in_features} inputs applied to {} features",
                    last(inputs[0])
                ));
            }
            let w = param(weight.id)?;
            let (rows_in, rows_out) = match layout {
                super::ir::Layout::OutIn => (w.shape[1], w.shape[0]),
                super::ir::Layout::InOut => (w.shape[0], w.shape[1]),
            };
            let width = weight.outputs.map_or(rows_out, |(a, b)| b - a);
            if rows_in != *in_features
                || width != *out_features
                || weight.outputs.is_some_and(|(_, b)| b > rows_out)
            {
                return Err(format!(
                    "weight {:?} does not map {in_features} to {out_features}",
                    w.shape
                ));
            }
            Ok(with_last(inputs[0], *out_features))
        }
        Op::Slice { start, len } => {
            arity(1)?;
            if start + len > last(inputs[0]) {
                return Err(format!(
                    "slice {start}+{len} of {} features",
                    last(inputs[0])
                ));
            }
            Ok(with_last(inputs[0], *len))
        }
        Op::Concat { axis } => {
            let first = inputs.first().ok_or("concat of nothing")?;
            let mut shape = first.shape.clone();
            if *axis >= shape.len() {
                return Err(format!("concat on axis {axis} of rank {}", shape.len()));
            }
            shape[*axis] = 0;
            for t in inputs {
                for (i, (a, b)) in t.shape.iter().zip(&first.shape).enumerate() {
                    if i != *axis && a != b {
                        return Err(format!("concat of {:?} and {:?}", first.shape, t.shape));
                    }
                }
                shape[*axis] += t.shape[*axis];
            }
            Ok(TensorMeta {
                shape,
                dtype: first.dtype,
            })
        }
        Op::Rotary { head_dim, .. } => {
            arity(1)?;
            if *head_dim == 0 || last(inputs[0]) % head_dim != 0 || head_dim % 2 != 0 {
                return Err(format!(
                    "rotary with head_dim {head_dim} over {} features",
                    last(inputs[0])
                ));
            }
            same(inputs[0])
        }
        Op::Attention {
            heads,
            kv_heads,
            head_dim,
            ..
        } => {
            arity(3)?;
            let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
            if last(q) != heads * head_dim
                || last(k) != kv_heads * head_dim
                || k.shape != v.shape
                || q.shape[0] != k.shape[0]
            {
                return Err(format!(
                    "attention of q {:?}, k {:?}, v {:?}",
                    q.shape, k.shape, v.shape
                ));
            }
            same(q)
        }
        Op::Lstm {
            hidden,
            bidirectional,
            ..
        } => {
            arity(1)?;
            Ok(with_last(
                inputs[0],
                if *bidirectional { 2 * hidden } else { *hidden },
            ))
        }
        Op::SelectToken { .. } => {
            arity(1)?;
            let s = &inputs[0].shape;
            if s.len() != 3 {
                return Err(format!("select a token of {s:?}"));
            }
            Ok(TensorMeta {
                shape: vec![s[0], s[2]],
                dtype: inputs[0].dtype,
            })
        }
        Op::GatherClasses { token_ids } => {
            arity(1)?;
            Ok(with_last(inputs[0], *token_ids as u64))
        }
        Op::CrossEntropy { .. } => {
            arity(2)?;
            let (logits, labels) = (inputs[0], inputs[1]);
            if logits.shape[..logits.shape.len().saturating_sub(1)] != labels.shape[..] {
                return Err(format!(
                    "cross-entropy of logits {:?} with labels {:?}",
                    logits.shape, labels.shape
                ));
            }
            Ok(scalar(DType::F32))
        }
        Op::WeightedSum { weights } => {
            if weights.len() != inputs.len() || inputs.iter().any(|t| !t.shape.is_empty()) {
                return Err("weighted sum takes one weight per scalar loss".into());
            }
            Ok(scalar(DType::F32))
        }
        Op::PairwiseLoss => {
            arity(1)?;
            Ok(scalar(DType::F32))
        }
        Op::TokenLogProbs => {
            arity(2)?;
            let (logits, labels) = (inputs[0], inputs[1]);
            if logits.shape[..logits.shape.len().saturating_sub(1)] != labels.shape[..] {
                return Err(format!(
                    "log-probabilities of logits {:?} for tokens {:?}",
                    logits.shape, labels.shape
                ));
            }
            Ok(TensorMeta {
                shape: inputs[1].shape.clone(),
                dtype: DType::F32,
            })
        }
        Op::PpoLoss { .. } => {
            arity(4)?;
            Ok(scalar(DType::F32))
        }
    }
}
