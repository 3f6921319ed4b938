//! LoRA: `y = W·x + b + s·B·A·dropout(x)` on each targeted linear, with A `[r, in]`,
//! B `[out, r]`, s = α/r (α/√r with rsLoRA); DoRA rescales the sum by a learned magnitude.

use super::{target_node, Context};
use crate::graph::ir::*;
use crate::spec::{Lora, LoraBias};

pub fn apply(g: &mut Graph, cx: &Context, lora: &Lora) {
    let scaling = if lora.rslora {
        lora.alpha / (lora.rank as f64).sqrt()
    } else {
        lora.alpha / lora.rank as f64
    };
    for i in 0..cx.model.layers {
        for &target in &lora.targets {
            let Some(linear) = target_node(g, cx.names, cx.qkv, target, i) else {
                continue;
            };
            let Op::Linear {
                weight,
                bias,
                layout,
                in_features,
                out_features,
            } = g.dag[linear].op.clone()
            else {
                continue;
            };
            let module = g.dag[linear].name.clone();
            let layer = g.dag[linear].layer;
            let input = g.inputs(linear)[0];
            let x = if lora.dropout > 0.0 {
                g.add(
                    format!("{module}.lora_dropout"),
                    Op::Dropout { p: lora.dropout },
                    &[input],
                    layer,
                )
            } else {
                input
            };
            let a = g.add_param(
                format!("{module}.lora_A.weight"),
                vec![lora.rank, in_features],
                ParamRole::Adapter,
                layer,
            );
            let b = g.add_param(
                format!("{module}.lora_B.weight"),
                vec![out_features, lora.rank],
                ParamRole::Adapter,
                layer,
            );
            let down = Op::Linear {
                weight: ParamRef::whole(a),
                bias: None,
                layout: Layout::OutIn,
                in_features,
                out_features: lora.rank,
            };
            let down = g.add(format!("{module}.lora_A"), down, &[x], layer);
            let up = Op::Linear {
                weight: ParamRef::whole(b),
                bias: None,
                layout: Layout::OutIn,
                in_features: lora.rank,
                out_features,
            };
            let up = g.add(format!("{module}.lora_B"), up, &[down], layer);
            let scaled = g.add(
                format!("{module}.lora_scale"),
                Op::Scale { factor: scaling },
                &[up],
                layer,
            );
            let sum = g.insert_after(linear, format!("{module}.lora_add"), Op::Add, &[scaled]);
            if lora.dora {
                let m = g.add_param(
                    format!("{module}.lora_magnitude_vector"),
                    vec![out_features],
                    ParamRole::Adapter,
                    layer,
                );
                let op = Op::DoraRescale {
                    magnitude: m,
                    weight,
                    bias,
                    lora_a: a,
                    lora_b: b,
                    scaling,
                    layout,
                };
                g.insert_after(sum, format!("{module}.dora"), op, &[]);
            }
            if lora.bias == LoraBias::LoraOnly {
                if let Some(b) = bias {
                    g.params[b.id].trainable = true;
                }
            }
        }
    }
    if lora.bias == LoraBias::All {
        for p in g
            .params
            .iter_mut()
            .filter(|p| matches!(p.role, ParamRole::Bias | ParamRole::NormBias))
        {
            p.trainable = true;
        }
    }
}
