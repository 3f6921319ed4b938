//! The training step on a device against the CPU executor (`exec::forward_backward`), on tiny
//! models of each family with random weights: two microbatches' losses and every parameter's
//! gradient summed over them. Run
//! under the host emulation in the tests and on a GPU by `kiln gpu-check`.

use super::{forward_backward, losses};
use crate::exec::kernels::testing::{values, within};
use crate::exec::precision::Format;
use crate::exec::{self, Batch, DropoutKey};
use crate::gpu::Device;
use crate::tensor::{param_shape, HostTensor};
use kiln_compiler::graph::{compile_graph, Graph, Op};

/// GPT-2: fused q/k/v read as slices, tanh-GELU, tied embeddings, a LoRA adapter on the
/// attention's projection, dropout everywhere, a left-padded row; in f32.
pub(in crate::gpu) fn gpt2_with_lora<D: Device>(d: &D) -> Result<(), String> {
    compare(
        d,
        "model = gpt2_tiny { dropout = 0.1 }, objective = causal_lm, adapter = lora { rank = 4, alpha = 8, dropout = 0.1 }",
        Format::F32,
        1e-4,
    )
}

/// LLaMA: rotary positions, grouped-query heads, SwiGLU and RMS norm, every weight trained; in
/// bf16, rounded where the CPU rounds.
pub(in crate::gpu) fn llama_bf16<D: Device>(d: &D) -> Result<(), String> {
    compare(
        d,
        "model = llama_tiny, objective = causal_lm",
        Format::Bf16,
        2e-2,
    )
}

/// GPT-2 in fp16 (rounded where the CPU rounds, to fp16's 11 bits), dropout on. A value on
/// the other side of a rounding boundary moves by 2^-11: measured 2e-4 of the largest
/// gradient, checked at 2e-3.
pub(in crate::gpu) fn gpt2_f16<D: Device>(d: &D) -> Result<(), String> {
    compare(
        d,
        "model = gpt2_tiny { dropout = 0.1 }, objective = causal_lm",
        Format::F16,
        2e-3,
    )
}

/// GPT-2 with prompt tuning and with prefix tuning: virtual tokens concatenated before the
/// real ones (as embeddings, or as every layer's keys and values); in f32.
pub(in crate::gpu) fn gpt2_prompt_and_prefix<D: Device>(d: &D) -> Result<(), String> {
    for adapter in ["prompt { tokens = 4 }", "prefix { tokens = 4 }"] {
        let body = format!("model = gpt2_tiny, objective = causal_lm, adapter = {adapter}");
        compare(d, &body, Format::F32, 1e-4).map_err(|e| format!("{adapter}: {e}"))?;
    }
    Ok(())
}

/// BERT: token types, bidirectional attention over padding, erf-GELU, the masked-LM head; in
/// f32.
pub(in crate::gpu) fn bert_mlm<D: Device>(d: &D) -> Result<(), String> {
    compare(
        d,
        "model = bert_micro { dropout = 0.1 }, objective = mlm",
        Format::F32,
        1e-4,
    )
}

/// Rows of each microbatch; the graph is compiled for a step of two (so that every op reads
/// a microbatch's rows, not the graph's batch).
const BATCH: usize = 2;
const SEQ: usize = 8;

fn compare<D: Device>(d: &D, body: &str, format: Format, tolerance: f32) -> Result<(), String> {
    let src = format!(
        "import std.models.tiny\nexperiment e {{ {body}, train {{ batch = {}, seq_len = {SEQ} }} }}",
        2 * BATCH
    );
    let checked = kiln_compiler::check_source("check.kiln", &src, None);
    if !checked.is_ok() {
        return Err(checked.render_errors());
    }
    let g = compile_graph(&checked.module.experiments[0].value)
        .map_err(|e| format!("{:?}", e.items))?;
    let params = random_params(&g);
    // Two microbatches, their gradients summed on the device: the second draws other dropout
    // masks.
    let batches = [batch(&g, 3), batch(&g, 4)];
    let got = forward_backward(d, &g, &params, &batches, format, 1.0).map_err(|e| e.0)?;
    let mut want_losses = Vec::new();
    let mut want_grads: Vec<Option<Vec<f32>>> = vec![None; g.params.len()];
    for b in &batches {
        let out = exec::forward_backward(&g, &params, b, format).map_err(|e| e.0)?;
        want_losses.push(out.loss);
        for (sum, grad) in want_grads.iter_mut().zip(out.grads) {
            *sum = match (sum.take(), grad) {
                (Some(sum), Some(grad)) => Some(sum.iter().zip(grad).map(|(a, b)| a + b).collect()),
                (sum, grad) => sum.or(grad),
            };
        }
    }
    within("the losses", &got.losses, &want_losses, tolerance / 10.0)?;
    // Evaluation runs the same forward, without the backward.
    let evaluated = losses(d, &g, &params, &batches, format).map_err(|e| e.0)?;
    if evaluated != got.losses {
        return Err(format!(
            "evaluation's losses {evaluated:?} differ from training's {:?}",
            got.losses
        ));
    }
    for (id, (got, want)) in got.grads.iter().zip(&want_grads).enumerate() {
        let name = &g.params[id].name;
        match (got, want) {
            (Some(got), Some(want)) => {
                within(&format!("the gradient of `{name}`"), got, want, tolerance)?
            }
            (None, None) => {}
            _ => return Err(format!("`{name}`: a gradient on one side only")),
        }
    }
    Ok(())
}

/// Weights in [−0.2, 0.2), norms' scales near 1 (so that the blocks are neither silent nor
/// saturated).
fn random_params(g: &Graph) -> Vec<HostTensor> {
    let mut scales = vec![false; g.params.len()];
    for n in g.dag.node_indices() {
        if let Op::LayerNorm { weight, .. } | Op::RmsNorm { weight, .. } = g.dag[n].op {
            scales[weight] = true;
        }
    }
    g.params
        .iter()
        .enumerate()
        .map(|(id, p)| {
            let shape = param_shape(p);
            let n = shape.iter().product();
            let centre = if scales[id] { 1.0 } else { 0.0 };
            let data = values(n, 101 + id as u64)
                .into_iter()
                .map(|v| centre + 0.2 * v)
                .collect();
            HostTensor { shape, data }
        })
        .collect()
}

/// Token ids, a left-padded last row (its padding unlabelled), labels for every objective the
/// checks use (masked-LM ones at every third position), token types, and dropout's key (of
/// training step `step`).
fn batch(g: &Graph, step: u64) -> Batch {
    let vocab = g.params.first().map_or(2, |p| param_shape(p)[0]).max(2) as i64;
    let padding = 3;
    let padded = |r: usize, j: usize| r == BATCH - 1 && j < padding;
    let ids: Vec<Vec<i64>> = (0..BATCH)
        .map(|r| {
            (0..SEQ)
                .map(|j| (1 + r as i64 * 7 + j as i64 * 5) % vocab)
                .collect()
        })
        .collect();
    let labels = |keep: &dyn Fn(usize, usize) -> bool| -> Vec<Vec<i64>> {
        (0..BATCH)
            .map(|r| {
                (0..SEQ)
                    .map(|j| if keep(r, j) { ids[r][j] } else { -100 })
                    .collect()
            })
            .collect()
    };
    let mut b = Batch::default();
    b.ints
        .insert("labels".into(), labels(&|r, j| !padded(r, j)));
    b.ints.insert(
        "mlm_labels".into(),
        labels(&|r, j| !padded(r, j) && (j + r) % 3 == 0),
    );
    b.ints.insert(
        "token_type_ids".into(),
        (0..BATCH)
            .map(|_| (0..SEQ).map(|j| i64::from(j >= SEQ / 2)).collect())
            .collect(),
    );
    b.ints.insert("input_ids".into(), ids);
    b.attention_mask = Some(
        (0..BATCH)
            .map(|r| (0..SEQ).map(|j| i64::from(!padded(r, j))).collect())
            .collect(),
    );
    b.dropout = Some(DropoutKey::new(11, step, (0..BATCH as u64).collect()));
    b
}
