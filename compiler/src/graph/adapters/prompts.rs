//! Virtual-token adapters. Prefix tuning (and P-tuning v2, its unprojected form) prepends
//! learned keys and values to every layer's attention; prompt tuning and P-tuning v1 prepend
//! learned embeddings to the input. Names and layouts as PEFT's `prompt_encoder`.

use super::Context;
use crate::graph::ir::*;
use crate::graph::lower::add_linear;
use crate::hf::Module;
use crate::spec::PromptEncoder;
use petgraph::graph::NodeIndex;

/// Marks every parameter added since `from` as a trainable adapter parameter.
fn adapter_params_since(g: &mut Graph, from: usize) {
    for p in &mut g.params[from..] {
        p.role = ParamRole::Adapter;
        p.trainable = true;
    }
}

/// `P` virtual tokens `[b, P, width]` from an embedding table, in the embedding layer.
fn virtual_tokens(g: &mut Graph, cx: &Context, tokens: u64, width: u64) -> NodeIndex {
    let layer = g.dag[cx.tokens].layer;
    let table = g.add_param(
        "prompt_encoder.embedding.weight",
        vec![tokens, width],
        ParamRole::Adapter,
        layer,
    );
    g.add(
        "prompt_encoder.embedding",
        Op::VirtualTokens { table },
        &[cx.tokens],
        layer,
    )
}

/// Prefix tuning: per-layer key/value prefixes, `[layer][key, value][kv features]` along the
/// last axis, optionally reparameterised by an MLP; real tokens' positions start at P.
pub fn prefix(g: &mut Graph, cx: &Context, tokens: u64, projection: Option<u64>) {
    let m = cx.model;
    let kv = m.kv_heads * (m.hidden / m.heads);
    let width = m.layers * 2 * kv;
    let layer = g.dag[cx.tokens].layer;
    let first = g.params.len();
    let all = match projection {
        None => virtual_tokens(g, cx, tokens, width),
        Some(hidden) => {
            let x = virtual_tokens(g, cx, tokens, m.hidden);
            let x = add_linear(
                g,
                "prompt_encoder.transform.0",
                x,
                m.hidden,
                hidden,
                true,
                Layout::OutIn,
                layer,
            );
            let x = g.add(
                "prompt_encoder.transform.1",
                Op::Activation { act: Act::Tanh },
                &[x],
                layer,
            );
            add_linear(
                g,
                "prompt_encoder.transform.2",
                x,
                hidden,
                width,
                true,
                Layout::OutIn,
                layer,
            )
        }
    };
    adapter_params_since(g, first);
    for i in 0..m.layers {
        let Some(core) = g.find(&format!("h.{i}.attn.core")) else {
            continue;
        };
        let block_layer = g.dag[core].layer;
        for (slot, part, offset) in [(1, "key", 2 * i * kv), (2, "value", (2 * i + 1) * kv)] {
            let own = g.inputs(core)[slot];
            let prefix = g.add(
                format!("h.{i}.attn.prefix_{part}"),
                Op::Slice {
                    start: offset,
                    len: kv,
                },
                &[all],
                block_layer,
            );
            let joined = g.add(
                format!("h.{i}.attn.{part}_with_prefix"),
                Op::Concat { axis: 1 },
                &[prefix, own],
                block_layer,
            );
            g.replace_input(core, slot, joined);
        }
    }
    shift_positions(g, tokens);
}

/// Real tokens follow the P virtual ones: learned and rotary positions start at P.
fn shift_positions(g: &mut Graph, by: u64) {
    let nodes: Vec<NodeIndex> = g
        .dag
        .node_indices()
        .filter(|&n| !g.dag[n].name.starts_with(REFERENCE_PREFIX))
        .collect();
    for n in nodes {
        match &mut g.dag[n].op {
            Op::PositionEmbedding { offset, .. } | Op::Rotary { offset, .. } => *offset += by,
            _ => {}
        }
    }
}

/// Prepends `[b, P, h]` virtual embeddings to the token embeddings, as PEFT's prompt tuning
/// and P-tuning do (peft 0.21.2, `peft/peft_model.py`: the `forward` of
/// `PeftModelForCausalLM`, `PeftModelForSequenceClassification` and
/// `PeftModelForTokenClassification`): `inputs_embeds = cat(prompts, word_embeddings(ids))`
/// goes to the base model in place of the ids, so the virtual tokens replace word embeddings
/// only and pass through everything after them — position embeddings (position_ids are
/// dropped, so the model numbers all P + s tokens from 0 and the real tokens' positions start
/// at P), token-type embeddings, BERT's embedding LayerNorm and dropout. The attention mask
/// gets P leading ones (here: keys before the batch's mask are visible), the labels P leading
/// −100s (`PeftModelForCausalLM`), and `token_type_ids` P leading zeros (the classification
/// models; CAUSAL_LM and FEATURE_EXTRACTION drop them instead, which would lose BERT's
/// segments). The data pipeline prepends those labels and types, so their inputs grow by P.
/// Positions the batch names among the real tokens (PET's [MASK], a reward's last token)
/// move P along; the pooler's first token stays the first virtual token, as in PEFT. (Given
/// embeddings rather than ids, transformers' sequence classifiers score the last position
/// even when it is padding; Kiln's reward keeps the last real token, the same without
/// padding.)
fn prepend(g: &mut Graph, cx: &Context, virtual_embeddings: NodeIndex, tokens: u64) {
    // The policy's token embedding (not a PPO reference copy's).
    let Some(embedding) = g.find(&cx.names.module(Module::TokenEmbedding, 0)) else {
        return;
    };
    let layer = g.dag[embedding].layer;
    let joined = g.add(
        "prompt_encoder.prepend",
        Op::Concat { axis: 1 },
        &[virtual_embeddings, embedding],
        layer,
    );
    g.redirect_consumers(embedding, joined, &[]);
    let nodes: Vec<NodeIndex> = g.dag.node_indices().collect();
    for n in nodes {
        match &mut g.dag[n].op {
            Op::Input {
                kind: InputKind::Labels | InputKind::Rollout | InputKind::TokenTypes,
            } => g.dag[n].out.shape[1] += tokens,
            Op::SelectToken {
                pick: Pick::Mask | Pick::Last,
                offset,
            } => *offset += tokens,
            _ => {}
        }
    }
    g.reinfer();
}

pub fn prompt(g: &mut Graph, cx: &Context, tokens: u64) {
    let first = g.params.len();
    let v = virtual_tokens(g, cx, tokens, cx.model.hidden);
    adapter_params_since(g, first);
    prepend(g, cx, v, tokens);
}

/// P-tuning v1: virtual embeddings through an MLP or a bidirectional LSTM encoder.
pub fn ptuning(g: &mut Graph, cx: &Context, tokens: u64, encoder: PromptEncoder, hidden: u64) {
    let h = cx.model.hidden;
    let layer = g.dag[cx.tokens].layer;
    let first = g.params.len();
    let x = virtual_tokens(g, cx, tokens, h);
    let out = match encoder {
        PromptEncoder::Mlp => {
            let x = add_linear(
                g,
                "prompt_encoder.mlp_head.0",
                x,
                h,
                hidden,
                true,
                Layout::OutIn,
                layer,
            );
            let x = g.add(
                "prompt_encoder.mlp_head.1",
                Op::Activation { act: Act::Relu },
                &[x],
                layer,
            );
            let x = add_linear(
                g,
                "prompt_encoder.mlp_head.2",
                x,
                hidden,
                hidden,
                true,
                Layout::OutIn,
                layer,
            );
            let x = g.add(
                "prompt_encoder.mlp_head.3",
                Op::Activation { act: Act::Relu },
                &[x],
                layer,
            );
            add_linear(
                g,
                "prompt_encoder.mlp_head.4",
                x,
                hidden,
                h,
                true,
                Layout::OutIn,
                layer,
            )
        }
        PromptEncoder::Lstm => {
            // torch.nn.LSTM(h, hidden, num_layers=2, bidirectional=True) parameter names.
            let mut params = Vec::new();
            for l in 0..2u64 {
                let input = if l == 0 { h } else { 2 * hidden };
                for suffix in ["", "_reverse"] {
                    let base = "prompt_encoder.lstm_head";
                    params.push(g.add_param(
                        format!("{base}.weight_ih_l{l}{suffix}"),
                        vec![4 * hidden, input],
                        ParamRole::Adapter,
                        layer,
                    ));
                    params.push(g.add_param(
                        format!("{base}.weight_hh_l{l}{suffix}"),
                        vec![4 * hidden, hidden],
                        ParamRole::Adapter,
                        layer,
                    ));
                    params.push(g.add_param(
                        format!("{base}.bias_ih_l{l}{suffix}"),
                        vec![4 * hidden],
                        ParamRole::Adapter,
                        layer,
                    ));
                    params.push(g.add_param(
                        format!("{base}.bias_hh_l{l}{suffix}"),
                        vec![4 * hidden],
                        ParamRole::Adapter,
                        layer,
                    ));
                }
            }
            let x = g.add(
                "prompt_encoder.lstm_head",
                Op::Lstm {
                    hidden,
                    layers: 2,
                    bidirectional: true,
                    params,
                },
                &[x],
                layer,
            );
            let x = add_linear(
                g,
                "prompt_encoder.mlp_head.0",
                x,
                2 * hidden,
                2 * hidden,
                true,
                Layout::OutIn,
                layer,
            );
            let x = g.add(
                "prompt_encoder.mlp_head.1",
                Op::Activation { act: Act::Relu },
                &[x],
                layer,
            );
            add_linear(
                g,
                "prompt_encoder.mlp_head.2",
                x,
                2 * hidden,
                h,
                true,
                Layout::OutIn,
                layer,
            )
        }
    };
    adapter_params_since(g, first);
    prepend(g, cx, out, tokens);
}
