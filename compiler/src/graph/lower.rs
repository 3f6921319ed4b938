//! Lowering a model spec to the graph: embeddings and transformer blocks, from the model's
//! knobs alone (no per-family forward code: the family only names the modules).

use super::ir::*;
use crate::hf::{Module, Names};
use crate::spec::{Activation, Block, Family, Mlp, Model, Norm, Position};
use petgraph::graph::NodeIndex;

/// Where the pieces of a lowered model are, for the passes that attach to them.
pub struct Lowered {
    pub tokens: NodeIndex,
    /// The token-embedding table (tied output heads read it).
    pub wte: ParamId,
    /// The final hidden states `[b, s, h]` (after the final norm for pre-norm models).
    pub hidden: NodeIndex,
    pub head_layer: LayerId,
}

/// How each block's query/key/value projections are built.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// One projection whose output is sliced (GPT-2's `c_attn`, adapted whole as PEFT does).
    Fused,
    /// Three projections (GPT-2's `c_attn` read as three column slices when an adapter
    /// targets query, key or value alone, as the LoRA paper did).
    Split,
}

/// A linear layer `in → out` with new weight (and bias) parameters named after `module`.
#[allow(clippy::too_many_arguments)]
pub fn add_linear(
    g: &mut Graph,
    module: &str,
    x: NodeIndex,
    inp: u64,
    out: u64,
    bias: bool,
    layout: Layout,
    layer: LayerId,
) -> NodeIndex {
    let shape = match layout {
        Layout::InOut => vec![inp, out],
        Layout::OutIn => vec![out, inp],
    };
    let w = g.add_param(format!("{module}.weight"), shape, ParamRole::Weight, layer);
    let b = bias.then(|| g.add_param(format!("{module}.bias"), vec![out], ParamRole::Bias, layer));
    let op = Op::Linear {
        weight: ParamRef::whole(w),
        bias: b.map(ParamRef::whole),
        layout,
        in_features: inp,
        out_features: out,
    };
    g.add(module, op, &[x], layer)
}

pub struct Lowering<'a> {
    pub g: &'a mut Graph,
    pub model: &'a Model,
    pub names: &'static Names,
    /// Prepended to every module name: `ref.` for PPO's frozen reference copy.
    pub prefix: String,
    pub qkv: QkvLayout,
}

impl<'a> Lowering<'a> {
    /// Lowers `model` into `g`, every module name prefixed by `prefix`.
    pub fn new(g: &'a mut Graph, model: &'a Model, prefix: &str, qkv: QkvLayout) -> Self {
        Lowering {
            g,
            model,
            names: crate::hf::of(model.family).names(),
            prefix: prefix.into(),
            qkv,
        }
    }

    fn name(&self, module: Module, layer: u64) -> String {
        format!("{}{}", self.prefix, self.names.module(module, layer))
    }

    fn act(a: Activation) -> Act {
        match a {
            Activation::Gelu => Act::Gelu,
            Activation::GeluTanh => Act::GeluTanh,
            Activation::Relu => Act::Relu,
            Activation::Silu => Act::Silu,
        }
    }

    /// How this family stores the linear weights inside its blocks.
    fn block_layout(&self) -> Layout {
        if self.names.conv1d {
            Layout::InOut
        } else {
            Layout::OutIn
        }
    }

    /// A block linear layer `in → out` named after `module`, with its parameters.
    fn linear(
        &mut self,
        module: &str,
        x: NodeIndex,
        inp: u64,
        out: u64,
        bias: bool,
        layer: LayerId,
    ) -> NodeIndex {
        let layout = self.block_layout();
        add_linear(self.g, module, x, inp, out, bias, layout, layer)
    }

    fn norm(&mut self, module: &str, x: NodeIndex, layer: LayerId) -> NodeIndex {
        let h = self.model.hidden;
        let w = self
            .g
            .add_param(format!("{module}.weight"), vec![h], ParamRole::Norm, layer);
        let op = match self.model.norm {
            Norm::Layernorm { eps } => {
                let b = self.g.add_param(
                    format!("{module}.bias"),
                    vec![h],
                    ParamRole::NormBias,
                    layer,
                );
                Op::LayerNorm {
                    weight: w,
                    bias: Some(b),
                    eps,
                }
            }
            Norm::Rmsnorm { eps } => Op::RmsNorm { weight: w, eps },
        };
        self.g.add(module, op, &[x], layer)
    }

    fn dropout(&mut self, name: String, x: NodeIndex, layer: LayerId) -> NodeIndex {
        if self.model.dropout > 0.0 {
            self.g.add(
                name,
                Op::Dropout {
                    p: self.model.dropout,
                },
                &[x],
                layer,
            )
        } else {
            x
        }
    }

    /// Embeddings, blocks and the final norm.
    /// `emb_layer` holds the inputs; block and head layers are created by the first lowering
    /// and shared by a reference copy.
    pub fn model(
        &mut self,
        tokens: NodeIndex,
        token_types: Option<NodeIndex>,
        emb_layer: LayerId,
    ) -> Lowered {
        let m = self.model;
        let tok_name = self.name(Module::TokenEmbedding, 0);
        let wte = self.g.add_param(
            format!("{tok_name}.weight"),
            vec![m.vocab, m.hidden],
            ParamRole::Embedding,
            emb_layer,
        );
        let mut x = self
            .g
            .add(tok_name, Op::Embedding { table: wte }, &[tokens], emb_layer);
        if m.position == Position::Learned {
            let name = self.name(Module::PositionEmbedding, 0);
            let wpe = self.g.add_param(
                format!("{name}.weight"),
                vec![m.positions, m.hidden],
                ParamRole::Embedding,
                emb_layer,
            );
            let pos = self.g.add(
                name.clone(),
                Op::PositionEmbedding {
                    table: wpe,
                    offset: 0,
                },
                &[x],
                emb_layer,
            );
            x = self
                .g
                .add(format!("{name}.add"), Op::Add, &[x, pos], emb_layer);
        }
        if let (true, Some(types)) = (m.type_vocab > 0, token_types) {
            let name = self.name(Module::TypeEmbedding, 0);
            let wtt = self.g.add_param(
                format!("{name}.weight"),
                vec![m.type_vocab, m.hidden],
                ParamRole::Embedding,
                emb_layer,
            );
            let t = self.g.add(
                name.clone(),
                Op::Embedding { table: wtt },
                &[types],
                emb_layer,
            );
            x = self
                .g
                .add(format!("{name}.add"), Op::Add, &[x, t], emb_layer);
        }
        if m.block == Block::PostNorm {
            // Post-norm models (BERT) normalise the embeddings; pre-norm ones the output.
            let name = self.name(Module::EmbeddingNorm, 0);
            x = self.norm(&name, x, emb_layer);
        }
        x = self.dropout(format!("{}embedding.dropout", self.prefix), x, emb_layer);

        for i in 0..m.layers {
            let layer = if self.prefix.is_empty() {
                self.g.add_layer(format!("block.{i}"), LayerKind::Block)
            } else {
                (i + 1) as LayerId
            };
            x = self.block(x, i, layer);
        }
        let head_layer = if self.prefix.is_empty() {
            self.g.add_layer("head", LayerKind::Head)
        } else {
            self.g.layers.len() - 1
        };
        if m.block == Block::PreNorm {
            let name = self.name(Module::FinalNorm, 0);
            x = self.norm(&name, x, head_layer);
        }
        Lowered {
            tokens,
            wte,
            hidden: x,
            head_layer,
        }
    }

    fn block(&mut self, x: NodeIndex, i: u64, layer: LayerId) -> NodeIndex {
        let m = self.model;
        let pre = m.block == Block::PreNorm;
        let attn_in = if pre {
            self.norm(&self.name(Module::AttnNorm, i), x, layer)
        } else {
            x
        };
        let attn = self.attention(attn_in, i, layer);
        let attn = self.dropout(
            format!("{}.dropout", self.name(Module::AttnOut, i)),
            attn,
            layer,
        );
        let mut x = self.g.add(
            format!("{}h.{i}.attn.residual", self.prefix),
            Op::Add,
            &[x, attn],
            layer,
        );
        if !pre {
            x = self.norm(&self.name(Module::AttnNorm, i), x, layer);
        }
        let mlp_in = if pre {
            self.norm(&self.name(Module::MlpNorm, i), x, layer)
        } else {
            x
        };
        let mlp = self.mlp(mlp_in, i, layer);
        let mlp = self.dropout(
            format!("{}.dropout", self.name(Module::FfnDown, i)),
            mlp,
            layer,
        );
        let mut x = self.g.add(
            format!("{}h.{i}.mlp.residual", self.prefix),
            Op::Add,
            &[x, mlp],
            layer,
        );
        if !pre {
            x = self.norm(&self.name(Module::MlpNorm, i), x, layer);
        }
        x
    }

    fn attention(&mut self, x: NodeIndex, i: u64, layer: LayerId) -> NodeIndex {
        let m = self.model;
        let head_dim = m.hidden / m.heads;
        let (q_dim, kv_dim) = (m.heads * head_dim, m.kv_heads * head_dim);
        let (mut q, mut k, v) = if self.names.conv1d {
            // GPT-2: one Conv1D `[h, 3h]`, read whole or as three column ranges.
            let name = self.name(Module::Qkv, i);
            let total = q_dim + 2 * kv_dim;
            let w = self.g.add_param(
                format!("{name}.weight"),
                vec![m.hidden, total],
                ParamRole::Weight,
                layer,
            );
            let b = m.bias.then(|| {
                self.g
                    .add_param(format!("{name}.bias"), vec![total], ParamRole::Bias, layer)
            });
            let ranges = [
                ("q", 0, q_dim),
                ("k", q_dim, kv_dim),
                ("v", q_dim + kv_dim, kv_dim),
            ];
            match self.qkv {
                QkvLayout::Fused => {
                    let whole = Op::Linear {
                        weight: ParamRef::whole(w),
                        bias: b.map(ParamRef::whole),
                        layout: Layout::InOut,
                        in_features: m.hidden,
                        out_features: total,
                    };
                    let fused = self.g.add(name.clone(), whole, &[x], layer);
                    let [q, k, v] = ranges.map(|(part, start, len)| {
                        self.g.add(
                            format!("{name}.{part}"),
                            Op::Slice { start, len },
                            &[fused],
                            layer,
                        )
                    });
                    (q, k, v)
                }
                QkvLayout::Split => {
                    let [q, k, v] = ranges.map(|(part, start, len)| {
                        let slice = |id| ParamRef {
                            id,
                            outputs: Some((start, start + len)),
                        };
                        let op = Op::Linear {
                            weight: slice(w),
                            bias: b.map(slice),
                            layout: Layout::InOut,
                            in_features: m.hidden,
                            out_features: len,
                        };
                        self.g.add(format!("{name}.{part}"), op, &[x], layer)
                    });
                    (q, k, v)
                }
            }
        } else {
            let q = self.linear(
                &self.name(Module::Query, i),
                x,
                m.hidden,
                q_dim,
                m.bias,
                layer,
            );
            let k = self.linear(
                &self.name(Module::Key, i),
                x,
                m.hidden,
                kv_dim,
                m.bias,
                layer,
            );
            let v = self.linear(
                &self.name(Module::Value, i),
                x,
                m.hidden,
                kv_dim,
                m.bias,
                layer,
            );
            (q, k, v)
        };
        if let Position::Rotary { theta } = m.position {
            q = self.g.add(
                format!("{}h.{i}.attn.rotary_q", self.prefix),
                Op::Rotary {
                    theta,
                    head_dim,
                    offset: 0,
                },
                &[q],
                layer,
            );
            k = self.g.add(
                format!("{}h.{i}.attn.rotary_k", self.prefix),
                Op::Rotary {
                    theta,
                    head_dim,
                    offset: 0,
                },
                &[k],
                layer,
            );
        }
        let causal = m.family != Family::Bert;
        let op = Op::Attention {
            heads: m.heads,
            kv_heads: m.kv_heads,
            head_dim,
            causal,
            dropout: m.dropout,
        };
        let core = self.g.add(
            format!("{}h.{i}.attn.core", self.prefix),
            op,
            &[q, k, v],
            layer,
        );
        let out = self.name(Module::AttnOut, i);
        self.linear(&out, core, q_dim, m.hidden, m.bias, layer)
    }

    fn mlp(&mut self, x: NodeIndex, i: u64, layer: LayerId) -> NodeIndex {
        let m = self.model;
        let up = self.linear(
            &self.name(Module::FfnUp, i),
            x,
            m.hidden,
            m.ffn,
            m.bias,
            layer,
        );
        let act = Op::Activation {
            act: Self::act(m.activation),
        };
        let hidden = match m.mlp {
            Mlp::Plain => self
                .g
                .add(format!("{}h.{i}.mlp.act", self.prefix), act, &[up], layer),
            Mlp::Gated => {
                let gate = self.linear(
                    &self.name(Module::FfnGate, i),
                    x,
                    m.hidden,
                    m.ffn,
                    m.bias,
                    layer,
                );
                let gate = self
                    .g
                    .add(format!("{}h.{i}.mlp.act", self.prefix), act, &[gate], layer);
                self.g.add(
                    format!("{}h.{i}.mlp.gated", self.prefix),
                    Op::Mul,
                    &[gate, up],
                    layer,
                )
            }
        };
        self.linear(
            &self.name(Module::FfnDown, i),
            hidden,
            m.ffn,
            m.hidden,
            m.bias,
            layer,
        )
    }
}
