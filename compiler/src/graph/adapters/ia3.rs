//! IA3: learned vectors (initialised to ones) that scale a targeted linear's output, or for
//! feed-forward modules its input. Shapes and names as PEFT's: `[out, 1]` and `[1, in]`.

use super::{target_node, Context};
use crate::graph::ir::*;
use crate::spec::Target;

pub fn apply(g: &mut Graph, cx: &Context, targets: &[Target], feedforward: &[Target]) {
    for i in 0..cx.model.layers {
        for &target in targets {
            let Some(linear) = target_node(g, cx.names, cx.qkv, target, i) else {
                continue;
            };
            let Op::Linear {
                in_features,
                out_features,
                ..
            } = g.dag[linear].op
            else {
                continue;
            };
            let module = g.dag[linear].name.clone();
            let layer = g.dag[linear].layer;
            if feedforward.contains(&target) {
                let v = g.add_param(
                    format!("{module}.ia3_l"),
                    vec![1, in_features],
                    ParamRole::Adapter,
                    layer,
                );
                g.insert_before(linear, 0, format!("{module}.ia3"), Op::ScaleBy { param: v });
            } else {
                let v = g.add_param(
                    format!("{module}.ia3_l"),
                    vec![out_features, 1],
                    ParamRole::Adapter,
                    layer,
                );
                g.insert_after(
                    linear,
                    format!("{module}.ia3"),
                    Op::ScaleBy { param: v },
                    &[],
                );
            }
        }
    }
}
