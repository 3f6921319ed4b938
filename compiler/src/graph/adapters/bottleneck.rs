//! Bottleneck adapters (adapter-hub): `x + up(act(down(x)))` on a sublayer's output, before
//! its residual. Houlsby: after attention and after the FFN; Pfeiffer: after the FFN only.

use super::Context;
use crate::graph::ir::*;
use crate::graph::lower::add_linear;
use crate::hf::Module;
use crate::spec::{Activation, Placement};

pub fn apply(
    g: &mut Graph,
    cx: &Context,
    placement: Placement,
    reduction: u64,
    activation: Activation,
) {
    let h = cx.model.hidden;
    let width = h / reduction;
    let act = match activation {
        Activation::Gelu => Act::Gelu,
        Activation::GeluTanh => Act::GeluTanh,
        Activation::Relu => Act::Relu,
        Activation::Silu => Act::Silu,
    };
    let sites: &[Module] = match placement {
        Placement::Houlsby => &[Module::AttnOut, Module::FfnDown],
        Placement::Pfeiffer => &[Module::FfnDown],
    };
    for i in 0..cx.model.layers {
        for &site in sites {
            let module = cx.names.module(site, i);
            let Some(projection) = g.find(&module) else {
                continue;
            };
            // After the sublayer's dropout, as adapter-hub places it.
            let dropout = g
                .dag
                .neighbors_directed(projection, petgraph::Direction::Outgoing)
                .find(|&n| matches!(g.dag[n].op, Op::Dropout { .. }));
            let out = dropout.unwrap_or(projection);
            let layer = g.dag[out].layer;
            // adapter-hub names adapters after the sublayer's output module (`...output.adapters.NAME`).
            let parent = module.rsplit_once('.').map_or(module.as_str(), |(p, _)| p);
            let name = format!("{parent}.adapters.bottleneck");
            let down = add_linear(
                g,
                &format!("{name}.adapter_down.0"),
                out,
                h,
                width,
                true,
                Layout::OutIn,
                layer,
            );
            let act = g.add(
                format!("{name}.adapter_down.act"),
                Op::Activation { act },
                &[down],
                layer,
            );
            let up = add_linear(
                g,
                &format!("{name}.adapter_up"),
                act,
                width,
                h,
                true,
                Layout::OutIn,
                layer,
            );
            let residual = g.add(format!("{name}.residual"), Op::Add, &[out, up], layer);
            // The sublayer's consumers now read the adapted output; the adapter still reads it.
            g.redirect_consumers(out, residual, &[down]);
            for p in g.params.iter_mut().filter(|p| p.name.starts_with(&name)) {
                p.role = ParamRole::Adapter;
                p.trainable = true;
            }
        }
    }
}
