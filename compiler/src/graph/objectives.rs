//! Objective lowering: the output heads an objective trains through and its loss subgraph.
//! Definitions follow `shared/reference/adapters-objectives.md`.

use super::ir::*;
use super::lower::{add_linear, Lowered, Lowering};
use crate::hf::Module;
use crate::spec::{Family, Model, Objective};
use petgraph::graph::NodeIndex;

/// Builds heads and losses on top of a lowered model; returns the scalar loss.
pub fn lower_objective(
    low: &mut Lowering,
    base: &Lowered,
    objective: &Objective,
    reference: Option<&Lowered>,
) -> NodeIndex {
    let (b, s) = token_shape(low.g, base.tokens);
    let layer = base.head_layer;
    match objective {
        Objective::CausalLm | Objective::Sft { .. } => {
            // SFT is causal LM whose prompt labels are −100 (set by the data pipeline).
            let logits = lm_head(low, base);
            let labels = low
                .g
                .add_input("labels", InputKind::Labels, vec![b, s], layer);
            low.g.add(
                "loss",
                Op::CrossEntropy { shift: true },
                &[logits, labels],
                layer,
            )
        }
        Objective::Mlm(_) => mlm_loss(low, base, "loss", b, s),
        Objective::Nsp { .. } => nsp_loss(low, base, "loss", b),
        Objective::MlmNsp { .. } => {
            let mlm = mlm_loss(low, base, "mlm.loss", b, s);
            let nsp = nsp_loss(low, base, "nsp.loss", b);
            low.g.add(
                "loss",
                Op::WeightedSum {
                    weights: vec![1.0, 1.0],
                },
                &[mlm, nsp],
                layer,
            )
        }
        Objective::Pvp(pvp) => {
            // Class logits are the MLM logits of the verbalizer words at the mask.
            let logits = mlm_head(low, base);
            let at_mask = low.g.add(
                "pvp.mask_logits",
                Op::SelectToken {
                    pick: Pick::Mask,
                    offset: 0,
                },
                &[logits],
                layer,
            );
            let classes = low.g.add(
                "pvp.class_logits",
                Op::GatherClasses {
                    token_ids: pvp.verbalizer.len(),
                },
                &[at_mask],
                layer,
            );
            let labels = low
                .g
                .add_input("class_labels", InputKind::SequenceLabels, vec![b], layer);
            let ce = low.g.add(
                "pvp.loss",
                Op::CrossEntropy { shift: false },
                &[classes, labels],
                layer,
            );
            if pvp.mlm_weight > 0.0 {
                let mlm_labels =
                    low.g
                        .add_input("mlm_labels", InputKind::Labels, vec![b, s], layer);
                let mlm = low.g.add(
                    "mlm.loss",
                    Op::CrossEntropy { shift: false },
                    &[logits, mlm_labels],
                    layer,
                );
                let a = pvp.mlm_weight;
                low.g.add(
                    "loss",
                    Op::WeightedSum {
                        weights: vec![1.0 - a, a],
                    },
                    &[ce, mlm],
                    layer,
                )
            } else {
                ce
            }
        }
        Objective::Reward { .. } => {
            // Rows alternate chosen/rejected; the reward is the score at the last token.
            let name = low.names.module(Module::Score, 0);
            let h = low.model.hidden;
            let score = add_linear(low.g, &name, base.hidden, h, 1, false, Layout::OutIn, layer);
            mark_new_head(low.g, &name);
            let last = low.g.add(
                "reward.last_token",
                Op::SelectToken {
                    pick: Pick::Last,
                    offset: 0,
                },
                &[score],
                layer,
            );
            low.g.add("loss", Op::PairwiseLoss, &[last], layer)
        }
        Objective::Ppo(ppo) => {
            let logits = lm_head(low, base);
            let logits = tempered(low, logits, ppo.temperature, "ppo.");
            let taken = low
                .g
                .add_input("response_tokens", InputKind::Labels, vec![b, s], layer);
            let logp = low
                .g
                .add("ppo.log_probs", Op::TokenLogProbs, &[logits, taken], layer);
            let name = low.names.module(Module::ValueHead, 0);
            let h = low.model.hidden;
            let values = add_linear(low.g, &name, base.hidden, h, 1, true, Layout::OutIn, layer);
            mark_new_head(low.g, &name);
            let reference = reference.expect("PPO lowers a reference model");
            let ref_logits = lm_head_of(low, reference, REFERENCE_PREFIX);
            let ref_logits = tempered(low, ref_logits, ppo.temperature, "ppo.ref_");
            let ref_logp = low.g.add(
                "ppo.ref_log_probs",
                Op::TokenLogProbs,
                &[ref_logits, taken],
                layer,
            );
            // Advantages, returns, old log-probs and old values from the rollout.
            let rollout = low
                .g
                .add_input("rollout", InputKind::Rollout, vec![b, s, 4], layer);
            let op = Op::PpoLoss {
                kl: ppo.kl,
                clip: ppo.clip,
                value_clip: ppo.value_clip,
                value_coef: ppo.value_coef,
            };
            low.g
                .add("loss", op, &[logp, ref_logp, values, rollout], layer)
        }
    }
}

/// `logits` divided by `temperature` (the logits themselves at 1).
fn tempered(low: &mut Lowering, logits: NodeIndex, temperature: f64, prefix: &str) -> NodeIndex {
    if temperature == 1.0 {
        return logits;
    }
    let layer = low.g.dag[logits].layer;
    low.g.add(
        format!("{prefix}tempered_logits"),
        Op::Scale {
            factor: 1.0 / temperature,
        },
        &[logits],
        layer,
    )
}

fn mark_new_head(g: &mut Graph, module: &str) {
    for p in g.params.iter_mut().filter(|p| p.name.starts_with(module)) {
        p.role = ParamRole::NewHead;
    }
}

fn token_shape(g: &Graph, tokens: NodeIndex) -> (u64, u64) {
    let shape = &g.dag[tokens].out.shape;
    (shape[0], shape[1])
}

/// PPO compares its policy with a frozen copy of the initial model.
pub fn needs_reference(objective: &Objective) -> bool {
    matches!(objective, Objective::Ppo(_))
}

fn lm_head(low: &mut Lowering, base: &Lowered) -> NodeIndex {
    lm_head_of(low, base, "")
}

/// Logits over the vocabulary: the token embeddings transposed when tied, else `lm_head`.
fn lm_head_of(low: &mut Lowering, base: &Lowered, prefix: &str) -> NodeIndex {
    let m: &Model = low.model;
    let name = format!("{prefix}{}", low.names.module(Module::LmHead, 0));
    let weight = if m.tie_embeddings {
        base.wte
    } else {
        let id = low.g.add_param(
            format!("{name}.weight"),
            vec![m.vocab, m.hidden],
            ParamRole::Weight,
            base.head_layer,
        );
        if !prefix.is_empty() {
            low.g.params[id].trainable = false;
        }
        id
    };
    let op = Op::Linear {
        weight: ParamRef::whole(weight),
        bias: None,
        layout: Layout::OutIn,
        in_features: m.hidden,
        out_features: m.vocab,
    };
    low.g.add(name, op, &[base.hidden], base.head_layer)
}

/// BERT's MLM head: dense → activation → LayerNorm → decoder tied to the embeddings, with its
/// own bias. Other families predict masked tokens with their LM head.
fn mlm_head(low: &mut Lowering, base: &Lowered) -> NodeIndex {
    if low.model.family != Family::Bert {
        return lm_head(low, base);
    }
    let m = low.model;
    let layer = base.head_layer;
    let (h, v) = (m.hidden, m.vocab);
    let dense = low.names.module(Module::MlmTransform, 0);
    let x = add_linear(low.g, &dense, base.hidden, h, h, true, Layout::OutIn, layer);
    let act = match m.activation {
        crate::spec::Activation::Gelu => Act::Gelu,
        crate::spec::Activation::GeluTanh => Act::GeluTanh,
        crate::spec::Activation::Relu => Act::Relu,
        crate::spec::Activation::Silu => Act::Silu,
    };
    let x = low.g.add(
        "cls.predictions.transform.act",
        Op::Activation { act },
        &[x],
        layer,
    );
    let norm = low.names.module(Module::MlmTransformNorm, 0);
    let w = low
        .g
        .add_param(format!("{norm}.weight"), vec![h], ParamRole::Norm, layer);
    let eps = match m.norm {
        crate::spec::Norm::Layernorm { eps } | crate::spec::Norm::Rmsnorm { eps } => eps,
    };
    let nb = low
        .g
        .add_param(format!("{norm}.bias"), vec![h], ParamRole::NormBias, layer);
    let x = low.g.add(
        norm,
        Op::LayerNorm {
            weight: w,
            bias: Some(nb),
            eps,
        },
        &[x],
        layer,
    );
    let bias_name = low.names.module(Module::MlmBias, 0);
    let bias = low
        .g
        .add_param(format!("{bias_name}.bias"), vec![v], ParamRole::Bias, layer);
    let weight = if m.tie_embeddings {
        base.wte
    } else {
        low.g.add_param(
            "cls.predictions.decoder.weight",
            vec![v, h],
            ParamRole::Weight,
            layer,
        )
    };
    let op = Op::Linear {
        weight: ParamRef::whole(weight),
        bias: Some(ParamRef::whole(bias)),
        layout: Layout::OutIn,
        in_features: h,
        out_features: v,
    };
    low.g.add("cls.predictions.decoder", op, &[x], layer)
}

fn mlm_loss(low: &mut Lowering, base: &Lowered, name: &str, b: u64, s: u64) -> NodeIndex {
    let logits = mlm_head(low, base);
    let labels = low
        .g
        .add_input("mlm_labels", InputKind::Labels, vec![b, s], base.head_layer);
    low.g.add(
        name,
        Op::CrossEntropy { shift: false },
        &[logits, labels],
        base.head_layer,
    )
}

/// Next-sentence prediction: pooled [CLS] (dense + tanh) → 2-way classifier.
fn nsp_loss(low: &mut Lowering, base: &Lowered, name: &str, b: u64) -> NodeIndex {
    let layer = base.head_layer;
    let h = low.model.hidden;
    let cls = low.g.add(
        "pooler.first_token",
        Op::SelectToken {
            pick: Pick::First,
            offset: 0,
        },
        &[base.hidden],
        layer,
    );
    let pooler = low.names.module(Module::Pooler, 0);
    let pooled = add_linear(low.g, &pooler, cls, h, h, true, Layout::OutIn, layer);
    let pooled = low.g.add(
        "pooler.tanh",
        Op::Activation { act: Act::Tanh },
        &[pooled],
        layer,
    );
    let nsp = low.names.module(Module::Nsp, 0);
    let logits = add_linear(low.g, &nsp, pooled, h, 2, true, Layout::OutIn, layer);
    let labels = low.g.add_input(
        "next_sentence_labels",
        InputKind::SequenceLabels,
        vec![b],
        layer,
    );
    low.g.add(
        name,
        Op::CrossEntropy { shift: false },
        &[logits, labels],
        layer,
    )
}
