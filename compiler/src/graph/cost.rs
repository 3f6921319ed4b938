//! Costs: FLOPs (forward, input-gradient, weight-gradient), memory traffic and saved
//! activations of every node, from the final graph and its trainability.
//!
//! Conventions (shared/reference/cost-model.md): a GEMM (m×k)·(k×n) is 2mkn FLOPs; only
//! GEMMs and attention count as FLOPs; backward through a frozen weight computes only the input
//! gradient, and nothing computes gradients below the lowest trainable parameter. Saved
//! activations follow Korthikanti et al. (2022): each tensor kept for backward is counted once,
//! plus attention's softmax output and dropout masks (one byte per element).

use super::ir::*;
use petgraph::graph::NodeIndex;
use petgraph::Direction;
use std::collections::BTreeSet;

/// Fills in every node's [`Cost`].
pub fn annotate(g: &mut Graph) {
    let order = g.topo_order();
    // Whether a gradient flows out of each node's output.
    let mut requires_grad = vec![false; g.dag.node_count()];
    for &n in &order {
        let own = g.dag[n].op.params().iter().any(|&p| g.params[p].trainable);
        let upstream = g
            .dag
            .neighbors_directed(n, Direction::Incoming)
            .any(|i| requires_grad[i.index()]);
        requires_grad[n.index()] = own || upstream;
    }
    let split: Vec<bool> = g
        .dag
        .node_indices()
        .map(|n| tensor_parallel(g, n))
        .collect();
    let mut saved: BTreeSet<usize> = BTreeSet::new();
    let elem = g.dtype.bytes() as f64;
    for &n in &order {
        let inputs = g.inputs(n);
        let input_grad = inputs.iter().any(|i| requires_grad[i.index()]);
        let node = &g.dag[n];
        // Lookups read only the rows they gather, not the whole table.
        let param_bytes: f64 = match node.op {
            Op::Embedding { .. } | Op::PositionEmbedding { .. } | Op::VirtualTokens { .. } => {
                node.out.bytes() as f64
            }
            _ => node
                .op
                .params()
                .iter()
                .map(|&p| g.params[p].numel() as f64 * elem)
                .sum(),
        };
        let in_bytes: f64 = inputs.iter().map(|&i| g.dag[i].out.bytes() as f64).sum();
        let mut cost = Cost {
            bytes: in_bytes + node.out.bytes() as f64 + param_bytes,
            tensor_parallel: split[n.index()],
            ..Cost::default()
        };
        let mut keep: Vec<NodeIndex> = Vec::new();
        let numel = |i: NodeIndex| g.dag[i].out.numel() as f64;
        match &node.op {
            Op::Linear {
                weight,
                in_features,
                out_features,
                ..
            } => {
                let tokens = numel(inputs[0]) / *in_features as f64;
                let gemm = 2.0 * tokens * *in_features as f64 * *out_features as f64;
                cost.flops_fwd = gemm;
                if input_grad {
                    cost.flops_bwd_input = gemm;
                }
                if g.params[weight.id].trainable {
                    cost.flops_bwd_weight = gemm;
                    keep.push(inputs[0]);
                }
            }
            Op::Attention {
                heads,
                head_dim,
                dropout,
                ..
            } => {
                let (q, k) = (&g.dag[inputs[0]].out.shape, &g.dag[inputs[1]].out.shape);
                let (b, s, s_kv) = (q[0] as f64, q[1] as f64, k[1] as f64);
                let width = (*heads * *head_dim) as f64;
                // QKᵀ and the product with V, 2·b·s·s_kv·width each.
                cost.flops_fwd = 4.0 * b * s * s_kv * width;
                if input_grad {
                    cost.flops_bwd_input = 2.0 * cost.flops_fwd;
                    keep.extend([inputs[0], inputs[1], inputs[2]]);
                    let scores = b * *heads as f64 * s * s_kv;
                    // Softmax output; with dropout also its mask and output.
                    let internal = if *dropout > 0.0 {
                        scores * (2.0 * elem + 1.0)
                    } else {
                        scores * elem
                    };
                    cost.saved_bytes += internal;
                    cost.saved_split += internal;
                    cost.selective_bytes = internal;
                }
                // Unfused attention (as in the Megatron measurements) materialises the scores:
                // written, softmax read and written, read by the product with V; dropout adds a
                // read, a write and a mask.
                let scores = b * *heads as f64 * s * s_kv;
                let passes = if *dropout > 0.0 {
                    6.0 * elem + 1.0
                } else {
                    4.0 * elem
                };
                cost.bytes += scores * passes;
            }
            Op::Lstm {
                hidden,
                layers,
                bidirectional,
                ..
            } => {
                let x = &g.dag[inputs[0]].out.shape;
                let steps = (x[0] * x[1]) as f64;
                let dirs = if *bidirectional { 2.0 } else { 1.0 };
                let (h, d) = (*hidden as f64, x[2] as f64);
                // Four gates, input and recurrent products, per step and direction.
                let first = 2.0 * 4.0 * h * (d + h);
                let rest = 2.0 * 4.0 * h * (dirs * h + h);
                cost.flops_fwd = steps * dirs * (first + rest * (*layers as f64 - 1.0));
                cost.flops_bwd_input = 2.0 * cost.flops_fwd;
                keep.push(inputs[0]);
            }
            Op::LayerNorm { .. }
            | Op::RmsNorm { .. }
            | Op::Activation { .. }
            | Op::ScaleBy { .. }
            | Op::Rotary { .. }
            | Op::DoraRescale { .. }
                if requires_grad[n.index()] =>
            {
                keep.push(inputs[0]);
            }
            Op::Mul if requires_grad[n.index()] => keep.extend(inputs.iter().copied()),
            Op::Dropout { .. } if requires_grad[n.index()] => cost.saved_bytes += numel(n),
            Op::CrossEntropy { .. } | Op::TokenLogProbs if requires_grad[n.index()] => {
                // The softmax over the vocabulary, in fp32.
                cost.saved_bytes += g.dag[inputs[0]].out.numel() as f64 * 4.0;
            }
            _ => {}
        }
        if matches!(node.op, Op::CrossEntropy { .. } | Op::TokenLogProbs) {
            cost.saved_split = cost.saved_bytes;
        }
        for t in keep {
            if saved.insert(t.index()) {
                let bytes = g.dag[t].out.bytes() as f64;
                cost.saved_bytes += bytes;
                if split[t.index()] {
                    cost.saved_split += bytes;
                }
            }
        }
        g.dag[n].cost = cost;
    }
    for i in saved {
        g.dag[NodeIndex::new(i)].cost.output_kept = true;
    }
}

/// Whether tensor parallelism divides a node's work: inside blocks the GEMMs and what lies
/// between a column- and a row-parallel GEMM; the vocabulary-parallel embedding, LM head and
/// loss. Norms, residual adds and dropout on the hidden stream stay whole (unless sequence
/// parallelism splits them, which the planner applies).
fn tensor_parallel(g: &Graph, n: NodeIndex) -> bool {
    let node = &g.dag[n];
    match g.layers[node.layer].kind {
        LayerKind::Block => matches!(
            node.op,
            Op::Linear { .. }
                | Op::Attention { .. }
                | Op::Activation { .. }
                | Op::Mul
                | Op::Rotary { .. }
                | Op::Slice { .. }
                | Op::ScaleBy { .. }
                | Op::Scale { .. }
                | Op::Concat { .. }
                | Op::DoraRescale { .. }
        ),
        LayerKind::Embedding => matches!(node.op, Op::Embedding { .. }),
        // The vocabulary projection and the loss over it.
        LayerKind::Head => match &node.op {
            // The token embedding is the graph's first parameter: its rows are the vocabulary.
            Op::Linear { out_features, .. } => g
                .params
                .first()
                .is_some_and(|wte| wte.shape[0] == *out_features),
            Op::CrossEntropy { .. } | Op::TokenLogProbs => true,
            _ => false,
        },
    }
}

/// Totals over a set of nodes.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Totals {
    pub flops_fwd: f64,
    pub flops_bwd: f64,
    pub saved_bytes: f64,
    pub selective_bytes: f64,
    pub bytes: f64,
}

impl Graph {
    pub fn totals(&self, filter: impl Fn(&Node) -> bool) -> Totals {
        let mut t = Totals::default();
        for n in self.dag.node_weights().filter(|n| filter(n)) {
            t.flops_fwd += n.cost.flops_fwd;
            t.flops_bwd += n.cost.flops_bwd_input + n.cost.flops_bwd_weight;
            t.saved_bytes += n.cost.saved_bytes;
            t.selective_bytes += n.cost.selective_bytes;
            t.bytes += n.cost.bytes;
        }
        t
    }

    /// FLOPs of one training step: forward and backward, plus the forward of every block
    /// again under full recompute (attention cores only under selective recompute).
    pub fn training_flops(&self, recompute: crate::spec::Recompute) -> f64 {
        let all = self.totals(|_| true);
        let extra = match recompute {
            crate::spec::Recompute::None => 0.0,
            crate::spec::Recompute::Full => {
                self.totals(|n| self.layers[n.layer].kind == LayerKind::Block)
                    .flops_fwd
            }
            crate::spec::Recompute::Selective => {
                self.totals(|n| {
                    self.layers[n.layer].kind == LayerKind::Block
                        && matches!(n.op, Op::Attention { .. })
                })
                .flops_fwd
            }
        };
        all.flops_fwd + all.flops_bwd + extra
    }
}
