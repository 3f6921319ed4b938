//! Adapter passes: each rewrites the lowered graph (IR → IR) to add its parameters and ops,
//! then trainability is settled as PEFT does — a parameter-efficient adapter freezes the base
//! model except for new heads; `freeze` only freezes what it names.

mod bottleneck;
mod freeze;
mod ia3;
mod lora;
mod prompts;

use super::ir::*;
use super::lower::QkvLayout;
use crate::hf::{Module, Names};
use crate::spec::{Adapter, Model, Target};
use petgraph::graph::NodeIndex;

/// The block linear a target names in layer `i`, if the model has it.
fn target_node(
    g: &Graph,
    names: &Names,
    qkv: QkvLayout,
    target: Target,
    i: u64,
) -> Option<NodeIndex> {
    let module = match target {
        Target::Qkv => Module::Qkv,
        Target::Query => Module::Query,
        Target::Key => Module::Key,
        Target::Value => Module::Value,
        Target::AttnOut => Module::AttnOut,
        Target::FfnUp => Module::FfnUp,
        Target::FfnGate => Module::FfnGate,
        Target::FfnDown => Module::FfnDown,
    };
    let base = names.module(module, i);
    let name = match (names.conv1d, qkv, target) {
        (true, QkvLayout::Split, Target::Query) => format!("{base}.q"),
        (true, QkvLayout::Split, Target::Key) => format!("{base}.k"),
        (true, QkvLayout::Split, Target::Value) => format!("{base}.v"),
        _ => base,
    };
    g.find(&name)
        .filter(|&n| matches!(g.dag[n].op, Op::Linear { .. }))
}

/// Whether GPT-2's fused projection must be read as three linears: an adapter targets query,
/// key or value on their own.
pub fn qkv_layout(adapters: &[Adapter]) -> QkvLayout {
    let split = adapters.iter().any(|a| {
        let targets: &[Target] = match a {
            Adapter::Lora(l) => &l.targets,
            Adapter::Ia3 { targets, .. } => targets,
            _ => &[],
        };
        targets
            .iter()
            .any(|t| matches!(t, Target::Query | Target::Key | Target::Value))
    });
    if split {
        QkvLayout::Split
    } else {
        QkvLayout::Fused
    }
}

pub struct Context<'a> {
    pub model: &'a Model,
    pub names: &'static Names,
    pub qkv: QkvLayout,
    pub tokens: NodeIndex,
}

/// Applies every adapter, then trainability.
pub fn apply(g: &mut Graph, cx: &Context, adapters: &[Adapter]) {
    let parameter_efficient = adapters.iter().any(|a| !matches!(a, Adapter::Freeze(_)));
    if parameter_efficient {
        // Everything that exists before the adapters is the pretrained model.
        for p in &mut g.params {
            p.trainable = p.role == ParamRole::NewHead;
        }
    }
    // Bottleneck adapters wrap a sublayer's whole output, so they go in first: passes that
    // rewrite the projection itself (LoRA, IA3) then stay inside what the bottleneck reads.
    let (wrapping, rest): (Vec<&Adapter>, Vec<&Adapter>) = adapters
        .iter()
        .partition(|a| matches!(a, Adapter::Bottleneck { .. }));
    for adapter in wrapping.into_iter().chain(rest) {
        match adapter {
            Adapter::Lora(l) => lora::apply(g, cx, l),
            Adapter::Ia3 {
                targets,
                feedforward,
            } => ia3::apply(g, cx, targets, feedforward),
            Adapter::Prefix { tokens, projection } => prompts::prefix(g, cx, *tokens, *projection),
            Adapter::PtuningV2 { tokens } => prompts::prefix(g, cx, *tokens, None),
            Adapter::Prompt { tokens, .. } => prompts::prompt(g, cx, *tokens),
            Adapter::Ptuning {
                tokens,
                encoder,
                hidden,
            } => prompts::ptuning(g, cx, *tokens, *encoder, *hidden),
            Adapter::Bottleneck {
                placement,
                reduction,
                activation,
            } => bottleneck::apply(g, cx, *placement, *reduction, *activation),
            Adapter::Freeze(f) => freeze::apply(g, f),
        }
    }
    // PPO's reference policy is never trained.
    for p in g.params.iter_mut().filter(|p| p.is_reference_copy()) {
        p.trainable = false;
    }
}
