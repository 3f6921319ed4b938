//! Freezing, BitFit and LayerNorm tuning: trainability masks over the existing parameters.

use crate::graph::ir::*;
use crate::spec::Freeze;

pub fn apply(g: &mut Graph, f: &Freeze) {
    let frozen_blocks: Vec<LayerId> = g
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.kind == LayerKind::Block)
        .take(f.layers as usize)
        .map(|(i, _)| i)
        .collect();
    for p in g
        .params
        .iter_mut()
        .filter(|p| p.role != ParamRole::Adapter && p.role != ParamRole::NewHead)
    {
        let keep = (!f.biases_only || matches!(p.role, ParamRole::Bias | ParamRole::NormBias))
            && (!f.norms_only || matches!(p.role, ParamRole::Norm | ParamRole::NormBias))
            && (!f.embeddings || p.role != ParamRole::Embedding)
            && !frozen_blocks.contains(&p.layer);
        p.trainable &= keep;
    }
}
