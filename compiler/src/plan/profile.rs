//! Per-layer cost profiles: the graph's costs summed per layer (embedding, blocks, head) and
//! split into what tensor parallelism divides and what it does not, so that the planner can
//! cost any (tensor degree, microbatch, recompute) choice in O(1) per layer.

use crate::graph::{Graph, LayerKind, Op, ParamRole};
use crate::plan::TensorSplit;

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
    /// Compute-bound FLOPs (GEMMs, attention) for the whole batch, as the kernels do them.
    pub flops_fwd: f64,
    pub flops_bwd: f64,
    /// FLOPs as the published formulas count them (full attention, backward twice the
    /// forward), whatever the kernel skips or recomputes: what TFLOP/s and MFU report.
    pub counted: Counted,
    /// Memory-bound traffic in bytes (elementwise ops, attention scores), split / replicated.
    pub mem_split: f64,
    pub mem_repl: f64,
    /// Whether a backward pass runs through memory-bound ops here (twice the forward traffic).
    pub has_backward: bool,
    /// FLOPs of fused (flash) attention kernels, forward and backward: they run at the
    /// device's attention efficiency, not its GEMM efficiency.
    pub flash_flops_fwd: f64,
    pub flash_flops_bwd: f64,
    /// The attention cores alone (what selective recompute repeats; nothing under flash
    /// attention, whose backward recomputes the scores already).
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
    /// Its matrix products, by shape: what wave quantisation costs depends on it.
    pub gemms: Vec<Gemm>,
}

/// A linear layer's matrix product `(tokens × k)·(k × n)`, and the products its backward runs.
#[derive(Clone, Debug)]
pub struct Gemm {
    /// Rows per sequence (its length, or 1 for a pooled input).
    pub rows_per_sequence: f64,
    pub k: f64,
    pub n: f64,
    /// Which of k and n tensor parallelism divides.
    pub split: GemmSplit,
    pub input_grad: bool,
    pub weight_grad: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmSplit {
    None,
    /// Column-parallel (and vocabulary-parallel): the outputs.
    N,
    /// Row-parallel: the inputs.
    K,
}

#[derive(Clone, Debug, Default)]
pub struct Counted {
    pub fwd: f64,
    pub bwd: f64,
    /// The attention cores' forward, when selective recompute repeats them.
    pub attn_fwd: f64,
}

/// FlashAttention's tiles: query and key blocks of 128 (FlashAttention-2's forward on
/// A100/H100 uses 128 × 64 to 128 × 128; the causal saving depends on the count of tiles
/// along the diagonal, not on their exact width).
const TILE: u64 = 128;

/// The share of the `s × s_kv` score tiles a causal flash kernel computes: for each block of
/// queries, the key blocks up to the last key its last query sees (query i sees keys up to
/// i + s_kv − s, the keys before the sequence being prefixes); every tile when not causal.
pub fn computed_tiles(s: u64, s_kv: u64, causal: bool) -> f64 {
    let (q_tiles, k_tiles) = (s.div_ceil(TILE), s_kv.div_ceil(TILE));
    if !causal || q_tiles == 0 || k_tiles == 0 {
        return 1.0;
    }
    let past = s_kv.saturating_sub(s);
    let computed: u64 = (0..q_tiles)
        .map(|q| {
            let last_query = ((q + 1) * TILE).min(s) - 1;
            let last_key = (last_query + past).min(s_kv - 1);
            last_key / TILE + 1
        })
        .sum();
    computed as f64 / (q_tiles * k_tiles) as f64
}

/// One profile per graph layer, in order, its attention costed as `flash` attention or not.
pub fn profile(g: &Graph, flash: bool) -> Vec<LayerProfile> {
    let splits = crate::plan::sharding::tensor_split(g);
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
        l.counted.fwd += c.flops_fwd;
        l.counted.bwd += c.flops_bwd_input + c.flops_bwd_weight;
        let memory_bound = c.flops_fwd == 0.0 && !matches!(node.op, Op::Input { .. });
        if let Op::Linear {
            weight,
            in_features,
            out_features,
            ..
        } = node.op
        {
            let input = g.inputs(n)[0];
            let rows = g.dag[input].out.numel() as f64 / in_features as f64;
            l.gemms.push(Gemm {
                rows_per_sequence: rows / g.batch as f64,
                k: in_features as f64,
                n: out_features as f64,
                split: match splits[weight.id] {
                    TensorSplit::Column | TensorSplit::Vocab => GemmSplit::N,
                    TensorSplit::Row => GemmSplit::K,
                    TensorSplit::Replicated => GemmSplit::None,
                },
                input_grad: c.flops_bwd_input > 0.0,
                weight_grad: c.flops_bwd_weight > 0.0,
            });
        }
        match node.op {
            Op::Attention { heads, causal, .. } if flash => {
                // Tiles above the diagonal skipped; the backward runs five products of the
                // forward's size (QKᵀ recomputed, then dV, dP, dQ, dK) where eager runs four.
                // Only the softmax statistics (one f32 per query and head) and the output are
                // saved (the output counted here unless a later node keeps it anyway), and no
                // score reaches memory.
                let inputs = g.inputs(n);
                let (q, k) = (&g.dag[inputs[0]].out.shape, &g.dag[inputs[1]].out.shape);
                let fwd = c.flops_fwd * computed_tiles(q[1], k[1], causal);
                l.flash_flops_fwd += fwd;
                if c.flops_bwd_input > 0.0 {
                    l.flash_flops_bwd += 2.5 * fwd;
                }
                let backward = c.flops_bwd_input > 0.0;
                let statistics = match backward {
                    true => (q[0] * heads * q[1]) as f64 * 4.0,
                    false => 0.0,
                };
                let output = match backward && !c.output_kept {
                    true => node.out.bytes() as f64,
                    false => 0.0,
                };
                l.has_backward |= c.saved_bytes > 0.0 || backward;
                l.saved_split += c.saved_split - c.selective_bytes + statistics + output;
                l.saved_repl += c.saved_bytes - c.saved_split;
                continue;
            }
            Op::Attention { .. } => {
                l.attn_flops_fwd += c.flops_fwd;
                l.counted.attn_fwd += c.flops_fwd;
                // Score traffic only (inputs and output are counted with their producers).
                let io: f64 = node.out.bytes() as f64 * 4.0;
                l.attn_mem += (c.bytes - io).max(0.0);
                l.mem_split += (c.bytes - io).max(0.0);
            }
            _ if memory_bound && c.tensor_parallel => l.mem_split += c.bytes,
            _ if memory_bound => l.mem_repl += c.bytes,
            _ => {}
        }
        l.flops_fwd += c.flops_fwd;
        l.flops_bwd += c.flops_bwd_input + c.flops_bwd_weight;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_causal_flash_kernel_computes_the_tiles_on_and_below_the_diagonal() {
        // 16 × 16 tiles: 136 of 256, n(n + 1)/2 of n².
        assert_eq!(computed_tiles(2048, 2048, true), 136.0 / 256.0);
        assert_eq!(computed_tiles(2048, 2048, false), 1.0);
        // One tile: nothing to skip.
        assert_eq!(computed_tiles(100, 100, true), 1.0);
        // A prefix of 128 keys every query sees: one more key tile per query tile.
        assert_eq!(computed_tiles(256, 384, true), (2.0 + 3.0) / 6.0);
        // Long sequences approach one half.
        assert!((computed_tiles(1 << 17, 1 << 17, true) - 0.5).abs() < 1e-3);
    }

    /// GPT-2 124M-shaped blocks at s = 1024: flash attention halves the attention products
    /// (causal), runs 2.5x of them backward in its own kernels, keeps no score traffic or saved softmax, and
    /// reports the same model FLOPs as eager.
    #[test]
    fn flash_attention_skips_masked_tiles_scores_traffic_and_saved_scores() {
        let src = "import std.models.gpt2\nexperiment e { model = gpt2 { vocab = 1024, positions = 1024, hidden = 768, layers = 2, heads = 12, dropout = 0.0 }, train { batch = 4, seq_len = 1024 } }";
        let checked = crate::check_source("t.kiln", src, None);
        assert!(checked.is_ok(), "{}", checked.render_errors());
        let graph = crate::graph::compile_graph(&checked.module.experiments[0].value).unwrap();
        let (eager, flash) = (profile(&graph, false), profile(&graph, true));
        let block = |p: &[LayerProfile]| {
            p.iter()
                .find(|l| l.kind == Some(LayerKind::Block))
                .cloned()
                .unwrap()
        };
        let (e, f) = (block(&eager), block(&flash));
        let (b, s, h, heads) = (4.0, 1024.0, 768.0, 12.0);
        let attention = 4.0 * b * s * s * h;
        assert_eq!(e.attn_flops_fwd, attention);
        let skipped = attention * (1.0 - computed_tiles(1024, 1024, true));
        // The kernel's products are its own (costed at the attention efficiency), the rest
        // are the eager products less attention's.
        assert_eq!(f.flash_flops_fwd, attention - skipped);
        assert_eq!(f.flash_flops_bwd, 2.5 * (attention - skipped));
        assert_eq!(f.flops_fwd, e.flops_fwd - attention);
        assert_eq!(f.flops_bwd, e.flops_bwd - 2.0 * attention);
        assert_eq!((f.attn_flops_fwd, f.attn_mem, f.selective), (0.0, 0.0, 0.0));
        assert_eq!(f.mem_split, e.mem_split - e.attn_mem);
        // The saved softmax output (one element of the graph's dtype per score) gives way to
        // one f32 statistic per query and head.
        let scores = b * heads * s * s;
        let saved_scores = e.selective;
        assert_eq!(saved_scores, scores * graph.dtype.bytes() as f64);
        assert_eq!(
            f.saved_split,
            e.saved_split - saved_scores + b * heads * s * 4.0
        );
        assert_eq!(
            (f.counted.fwd, f.counted.bwd),
            (e.counted.fwd, e.counted.bwd)
        );
    }

    /// With LoRA on the fused QKV alone, the output projection is frozen and keeps nothing for
    /// its backward: eager attention saves no output, while the flash kernel's backward needs
    /// its own output (`b·s·h` elements) and saves it.
    #[test]
    fn flash_attention_saves_its_output_when_nothing_else_does() {
        let src = "import std.models.gpt2\nexperiment e { model = gpt2 { vocab = 1024, positions = 256, hidden = 256, layers = 2, heads = 4, dropout = 0.0 }, adapter = lora { rank = 4, targets = [c_attn] }, train { batch = 2, seq_len = 256 } }";
        let checked = crate::check_source("t.kiln", src, None);
        assert!(checked.is_ok(), "{}", checked.render_errors());
        let graph = crate::graph::compile_graph(&checked.module.experiments[0].value).unwrap();
        let block = |flash| {
            profile(&graph, flash)
                .into_iter()
                .find(|l| l.kind == Some(LayerKind::Block))
                .unwrap()
        };
        let (e, f) = (block(false), block(true));
        let (b, s, h, heads) = (2.0, 256.0, 256.0, 4.0);
        let output = b * s * h * graph.dtype.bytes() as f64;
        let statistics = b * heads * s * 4.0;
        assert_eq!(
            f.saved_split,
            e.saved_split - e.selective + statistics + output
        );
    }
}
