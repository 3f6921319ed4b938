//! Per-layer cost profiles: the graph's costs summed per layer (embedding, blocks, head) and
//! split into what tensor parallelism divides and what it does not, so that the planner can
//! cost any (tensor degree, microbatch, recompute) choice in O(1) per layer.

use crate::graph::{Graph, LayerKind, Op, ParamRole};

#[derive(Clone, Debug, Default)]
pub struct LayerProfile {
    pub name: String,
    pub kind: Option<LayerKind>,
    /// Parameters (elements) divided by tensor parallelism, and replicated (norms).
    pub params_split: f64,
    pub params_repl: f64,
    pub trainable_split: f64,
    pub trainable_repl: f64,
    /// Modules owning parameters (a linear with its bias, a norm, an embedding table, an
    /// adapter's matrix): ZeRO-3 gathers each one's weights as its own collective before it
    /// runs, as DeepSpeed's `fetch_sub_module` does.
    pub modules: f64,
    /// Compute-bound FLOPs (GEMMs, attention) for the whole batch.
    pub flops_fwd: f64,
    pub flops_bwd: f64,
    /// Memory-bound traffic in bytes (elementwise ops, attention scores), split / replicated.
    pub mem_split: f64,
    pub mem_repl: f64,
    /// Whether a backward pass runs through memory-bound ops here (twice the forward traffic).
    pub has_backward: bool,
    /// The attention cores alone (what selective recompute repeats).
    pub attn_flops_fwd: f64,
    pub attn_mem: f64,
    /// Activations kept for backward: divided by tensor parallelism, replicated (divided too
    /// under sequence parallelism), and the part selective recompute drops.
    pub saved_split: f64,
    pub saved_repl: f64,
    pub selective: f64,
    /// The hidden state leaving the layer (`b·s·h` elements): what crosses a stage boundary
    /// and what full recompute keeps.
    pub boundary_bytes: f64,
}

/// One profile per graph layer, in order.
pub fn profile(g: &Graph) -> Vec<LayerProfile> {
    let mut out: Vec<LayerProfile> = g
        .layers
        .iter()
        .map(|l| LayerProfile {
            name: l.name.clone(),
            kind: Some(l.kind),
            ..Default::default()
        })
        .collect();
    for p in &g.params {
        let split = !matches!(p.role, ParamRole::Norm | ParamRole::NormBias);
        let l = &mut out[p.layer];
        let n = p.numel() as f64;
        // A bias travels with its linear's or norm's weight.
        if !matches!(p.role, ParamRole::Bias | ParamRole::NormBias) {
            l.modules += 1.0;
        }
        if split {
            l.params_split += n;
        } else {
            l.params_repl += n;
        }
        if p.trainable {
            if split {
                l.trainable_split += n;
            } else {
                l.trainable_repl += n;
            }
        }
    }
    let hidden_bytes = g.batch as f64 * g.seq as f64 * g.dtype.bytes() as f64;
    for n in g.dag.node_indices() {
        let node = &g.dag[n];
        let c = &node.cost;
        let l = &mut out[node.layer];
        l.flops_fwd += c.flops_fwd;
        l.flops_bwd += c.flops_bwd_input + c.flops_bwd_weight;
        let memory_bound = c.flops_fwd == 0.0 && !matches!(node.op, Op::Input { .. });
        if let Op::Attention { .. } = node.op {
            l.attn_flops_fwd += c.flops_fwd;
            // Score traffic only (inputs and output are counted with their producers).
            let io: f64 = node.out.bytes() as f64 * 4.0;
            l.attn_mem += (c.bytes - io).max(0.0);
            l.mem_split += (c.bytes - io).max(0.0);
        } else if memory_bound {
            if c.tensor_parallel {
                l.mem_split += c.bytes;
            } else {
                l.mem_repl += c.bytes;
            }
        }
        l.has_backward |= c.saved_bytes > 0.0 || c.flops_bwd_input > 0.0;
        l.saved_split += c.saved_split;
        l.saved_repl += c.saved_bytes - c.saved_split;
        l.selective += c.selective_bytes;
    }
    // The hidden width: the first block's residual stream, or the embedding output.
    let width = g.params.first().map_or(0.0, |wte| wte.shape[1] as f64);
    for l in &mut out {
        l.boundary_bytes = hidden_bytes * width;
    }
    out
}
