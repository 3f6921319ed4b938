//! The prompt a virtual-token adapter feeds the model, as PEFT saves it: one tensor,
//! `prompt_embeddings`, the virtual-token table run through the adapter's encoder (prefix
//! tuning's projection MLP, P-tuning's MLP or LSTM), or the table itself where there is none.
//! PEFT loads it for inference as a plain table of that shape; the encoder's weights are not
//! saved and cannot be recovered from its output.

use crate::exec::precision::Format;
use crate::exec::{Batch, Params, Segment};
use crate::tensor::HostTensor;
use kiln_compiler::graph::{Graph, Op};
use kiln_compiler::plan::sharding::RankOps;
use petgraph::graph::NodeIndex;
use petgraph::Direction;
use std::collections::BTreeMap;

/// The key of PEFT's saved prompt.
pub const PEFT_KEY: &str = "prompt_embeddings";

/// A virtual-token adapter's prompt: its table and the nodes computing the prompt from it.
struct Encoder {
    /// The virtual-token table's parameter.
    table: usize,
    /// The virtual-token node, then the encoder's ops in order; the last computes the prompt.
    nodes: Vec<NodeIndex>,
}

impl Encoder {
    /// The graph's virtual-token adapter, if it has one.
    fn of(g: &Graph) -> Option<Encoder> {
        let (first, table) = g.dag.node_indices().find_map(|n| match g.dag[n].op {
            Op::VirtualTokens { table } => Some((n, table)),
            _ => None,
        })?;
        let mut nodes = vec![first];
        // The encoder is a chain; it ends where the prompt fans out into the layers' key/value
        // prefixes or joins the token embeddings.
        loop {
            let next = consumers(g, nodes[nodes.len() - 1]);
            match next.as_slice() {
                [n] if matches!(
                    g.dag[*n].op,
                    Op::Linear { .. } | Op::Activation { .. } | Op::Lstm { .. }
                ) =>
                {
                    nodes.push(*n)
                }
                _ => return Some(Encoder { table, nodes }),
            }
        }
    }

    fn output(&self) -> NodeIndex {
        self.nodes[self.nodes.len() - 1]
    }
}

fn consumers(g: &Graph, n: NodeIndex) -> Vec<NodeIndex> {
    let mut out: Vec<NodeIndex> = g.dag.neighbors_directed(n, Direction::Outgoing).collect();
    out.sort();
    out.dedup();
    out
}

/// The graph's prompt as PEFT saves it, `[tokens, width]`: the executor runs the encoder over
/// the virtual tokens with the parameter `values` (dropout off).
pub fn prompt_embeddings(g: &Graph, values: &[HostTensor]) -> Result<HostTensor, String> {
    let encoder = Encoder::of(g).ok_or("the experiment has no virtual-token adapter")?;
    // The virtual tokens read only the batch size from the token ids: one row is one prompt.
    let mut batch = Batch::default();
    for input in g.inputs(encoder.nodes[0]) {
        batch.ints.insert(g.dag[input].name.clone(), vec![vec![0]]);
    }
    let fail = |e: crate::exec::ExecError| format!("computing the prompt: {e}");
    let params = Params::new(g, values, Format::F32).map_err(fail)?;
    let whole = RankOps::default();
    let segment = Segment::forward(g, &params, &batch, &whole, &encoder.nodes, Vec::new(), None)
        .map_err(fail)?;
    let out = segment
        .value(encoder.output())
        .and_then(|v| v.to_host())
        .map_err(fail)?;
    match *out.shape.as_slice() {
        [1, tokens, width] => Ok(HostTensor {
            shape: vec![tokens, width],
            data: out.data,
        }),
        ref other => Err(format!("computing the prompt: a value of shape {other:?}")),
    }
}

/// An adapter file's tensors with PEFT's saved prompt named as the graph's virtual-token table,
/// which it is when no encoder sits between the table and the model. A prompt saved from an
/// encoder is refused: it is the encoder's output, and the graph would run the encoder on it.
pub fn from_peft(
    g: &Graph,
    mut tensors: BTreeMap<String, HostTensor>,
) -> Result<BTreeMap<String, HostTensor>, String> {
    let Some(prompt) = tensors.remove(PEFT_KEY) else {
        return Ok(tensors);
    };
    let encoder = Encoder::of(g).ok_or(format!(
        "it holds PEFT's saved prompt (`{PEFT_KEY}`), and the experiment has no virtual-token adapter to take it"
    ))?;
    if encoder.nodes.len() > 1 {
        let prefixes = consumers(g, encoder.output())
            .iter()
            .any(|&n| matches!(g.dag[n].op, Op::Slice { .. }));
        let plain = if prefixes { "prefix" } else { "prompt" };
        return Err(format!(
            "PEFT saves this adapter's prompt as its encoder's output ({:?}), without the encoder's weights, which cannot be recovered from it; load it as PEFT does for inference, as a plain table: `adapter = {plain} {{ tokens = {}, checkpoint = \"DIR\" }}`",
            prompt.shape,
            prompt.shape.first().copied().unwrap_or(0),
        ));
    }
    tensors.insert(g.params[encoder.table].name.clone(), prompt);
    Ok(tensors)
}
