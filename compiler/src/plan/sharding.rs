//! Tensor-parallel sharding, decided once for a graph and a group of `t` ranks: every
//! parameter's split (Megatron column/row, vocabulary-parallel embeddings and heads, LoRA's A
//! and B split so that no extra collective is needed) and, from it, the form every value takes
//! on a rank — whole, split along its last axis (by sections, so that GPT-2's fused q|k|v
//! splits head-wise), a partial sum, or a share of the sequence — which nodes compute on split
//! values, how each parameter is cut, and the collective every edge between split and whole
//! computation needs. The planner's report, the sanity pass and the runtime all read this one
//! decision ([`TensorLayout`]); nothing downstream works it out again.
//!
//! - a partial sum read by whole computation is all-reduced (Megatron's g; backward identity);
//! - a split value read by whole computation is all-gathered (backward: the rank's slice);
//! - a whole value read by a column-parallel linear goes in as is, and its gradient, a partial
//!   sum, is all-reduced (Megatron's f).
//!
//! A row-parallel bias is added by rank 0 alone (the sum adds it once); replicated parameters
//! read by split computation (that bias, LoRA B after a row-parallel A) get partial gradients,
//! all-reduced after the backward pass.
//!
//! With sequence parallelism (Korthikanti et al.) the per-token work between the split regions
//! (norms, dropout, residual adds, replicated linears) runs on a `1/t` share of the sequence:
//! g becomes a reduce-scatter along the sequence and f an all-gather (whose backward
//! reduce-scatters the partial gradients).

use super::types::TensorSplit;
use crate::graph::{Graph, LayerKind, Layout, Op};
use petgraph::graph::NodeIndex;
use petgraph::Direction;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

/// How a value lies on a rank of the tensor-parallel group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Form {
    Whole,
    /// The last axis split: each section's `1/t` share, sections concatenated.
    Split(Vec<usize>),
    /// This rank's addend of the value.
    Partial,
    /// The sequence axis split evenly: rank r holds the r-th `1/t` of the positions.
    Sequence,
    /// The same whole value on every rank, computed from split values (a loss taken from
    /// vocabulary-split logits): it joins its inputs' split computation, and whole computation
    /// reads it as it is.
    Replicated,
}

/// Where a node computes: on whole values, on tensor-split values (or partial sums), or on a
/// share of the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compute {
    Whole,
    Split,
    Sequence,
}

/// What happens on an edge from one piece of the graph into another.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Conversion {
    None,
    /// Forward all-reduce of a partial sum; backward identity.
    AllReduce,
    /// Forward all-gather of a split value (by its sections); backward the rank's slice.
    AllGather(Vec<usize>),
    /// Forward identity; backward all-reduce of the partial gradient.
    ReduceGradient,
    /// Forward all-gather along the sequence; backward the rank's share of the gradient,
    /// summed over the group first when the readers compute split (their gradients are partial).
    GatherSequence {
        partial_gradients: bool,
    },
    /// Forward reduce-scatter of a partial sum along the sequence; backward all-gather.
    ScatterSequence,
    /// Forward the rank's share of the sequence of a whole value; backward all-gather.
    SliceSequence,
    /// Forward the rank's part (by sections) of a whole value's last axis, for split
    /// computation that reads it as split (prefix tuning's key/value prefixes joining split
    /// keys); backward all-gather.
    ShardLast(Vec<usize>),
}

/// How a parameter is cut across the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamLayout {
    /// Every rank holds all of it.
    Replicate,
    /// Along `axis`, each section's `1/t` share.
    Shard { axis: usize, sections: Vec<usize> },
}

/// What a rank changes when running nodes on its shards.
#[derive(Clone, Debug, Default)]
pub struct RankOps {
    pub rank: usize,
    pub size: usize,
    /// Slices of split values (and ranges of split fused weights), in local coordinates.
    pub slices: BTreeMap<NodeIndex, (usize, usize)>,
    /// Linears whose outputs are partial sums: only rank 0 adds the (replicated) bias.
    pub bias_once: BTreeSet<NodeIndex>,
    /// Vocabulary-parallel embeddings: the rows `[lo, hi)` this rank's table holds.
    pub vocab_rows: BTreeMap<NodeIndex, (usize, usize)>,
    /// Nodes computing on this rank's share of the sequence (dropout draws the whole mask and
    /// keeps that share).
    pub sequence: BTreeSet<NodeIndex>,
    /// Cross-entropy losses and token log-probabilities computed from this rank's columns of
    /// vocabulary-split logits.
    pub vocab_parallel: BTreeMap<NodeIndex, VocabColumns>,
}

/// The columns of vocabulary-split logits a rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VocabColumns {
    /// Global vocabulary ids `[start, end)`.
    pub columns: Range<usize>,
    /// The whole vocabulary.
    pub vocab: usize,
}

/// The tensor-parallel layout of a graph for a group of `size` ranks.
#[derive(Clone, Debug)]
pub struct TensorLayout {
    pub size: usize,
    /// Per parameter: how tensor parallelism splits it (what the plan's sharding table shows);
    /// all `Replicated` on one rank.
    pub splits: Vec<TensorSplit>,
    /// Per node: its output's form (`Whole` for integer inputs).
    pub forms: Vec<Form>,
    pub params: Vec<ParamLayout>,
    /// Replicated trainable parameters read by split computation: gradients all-reduced.
    pub partial_grads: Vec<usize>,
    /// Split nodes that read whole inputs as this rank's part of them (by their sections).
    pub sharded_inputs: BTreeMap<NodeIndex, Vec<usize>>,
    /// Per rank.
    pub ranks: Vec<RankOps>,
}

#[derive(Clone, Debug)]
pub struct LayoutError(pub String);

fn fail<T>(message: impl Into<String>) -> Result<T, LayoutError> {
    Err(LayoutError(message.into()))
}

/// Tensor-parallel layout of every parameter (Megatron column/row splits, vocabulary-parallel
/// embeddings; LoRA A and B split so that no extra collective is needed).
pub fn tensor_split(g: &Graph) -> Vec<TensorSplit> {
    let mut out = vec![TensorSplit::Replicated; g.params.len()];
    let base_of = |name: &str| -> Option<TensorSplit> {
        let node = g.find(name)?;
        let input = g.inputs(node).first().copied()?;
        Some(if g.dag[input].cost.tensor_parallel {
            TensorSplit::Row
        } else {
            TensorSplit::Column
        })
    };
    for n in g.dag.node_indices() {
        let node = &g.dag[n];
        let kind = g.layers[node.layer].kind;
        match &node.op {
            Op::Embedding { table } if node.cost.tensor_parallel => {
                out[*table] = TensorSplit::Vocab
            }
            Op::Linear { weight, bias, .. } if node.cost.tensor_parallel => {
                let split = if kind == LayerKind::Head {
                    TensorSplit::Vocab
                } else if let Some(base) = node.name.strip_suffix(".lora_A") {
                    // Column W: A replicated; row W: A split on its input.
                    match base_of(base) {
                        Some(TensorSplit::Row) => TensorSplit::Row,
                        _ => TensorSplit::Replicated,
                    }
                } else if let Some(base) = node.name.strip_suffix(".lora_B") {
                    // Column W: B split on its output; row W: B replicated.
                    match base_of(base) {
                        Some(TensorSplit::Row) => TensorSplit::Replicated,
                        _ => TensorSplit::Column,
                    }
                } else {
                    let input = g.inputs(n).first().copied();
                    if input.is_some_and(|i| g.dag[i].cost.tensor_parallel) {
                        TensorSplit::Row
                    } else {
                        TensorSplit::Column
                    }
                };
                if out[weight.id] == TensorSplit::Replicated {
                    out[weight.id] = split;
                }
                if let Some(b) = bias {
                    // A row-parallel bias is added once, after the reduction.
                    out[b.id] = if split == TensorSplit::Row {
                        TensorSplit::Replicated
                    } else {
                        split
                    };
                }
            }
            Op::ScaleBy { param } if node.cost.tensor_parallel => out[*param] = TensorSplit::Column,
            _ => {}
        }
    }
    out
}

impl TensorLayout {
    /// The layout of `g` over a tensor-parallel group of `size` ranks (one: [`Self::whole`]).
    pub fn new(g: &Graph, size: usize, sequence_parallel: bool) -> Result<Self, LayoutError> {
        if size == 1 {
            return Ok(Self::whole(g));
        }
        let splits = tensor_split(g);
        if sequence_parallel && g.seq as usize % size != 0 {
            return fail(format!(
                "sequence parallelism needs the sequence length ({}) to divide by tensor = {size}",
                g.seq
            ));
        }
        let mut forms = vec![Form::Whole; g.dag.node_count()];
        let mut params = vec![ParamLayout::Replicate; g.params.len()];
        let mut partial_grads = BTreeSet::new();
        let mut slices: BTreeMap<NodeIndex, (usize, usize, Vec<usize>)> = BTreeMap::new();
        let mut bias_once = BTreeSet::new();
        let mut vocab: BTreeMap<NodeIndex, usize> = BTreeMap::new();
        let mut sharded_inputs: BTreeMap<NodeIndex, Vec<usize>> = BTreeMap::new();
        // Losses and log-probabilities reading vocabulary-split logits, with the vocabulary.
        let mut vocab_parallel: BTreeMap<NodeIndex, usize> = BTreeMap::new();
        let mut set_layout = |id: usize, layout: ParamLayout| -> Result<(), LayoutError> {
            match &params[id] {
                ParamLayout::Replicate => {
                    params[id] = layout;
                    Ok(())
                }
                same if *same == layout => Ok(()),
                _ => fail(format!("`{}` would be split two ways", g.params[id].name)),
            }
        };
        let split = |id: usize| splits[id];
        // Per-token work runs on a share of the sequence when sequence parallelism is on and
        // its input comes from (or is) a split region's result.
        let per_token = |ins: &[Form]| {
            let from_split = ins
                .iter()
                .any(|f| matches!(f, Form::Partial | Form::Sequence));
            // A value split by features is gathered whole: the node cannot take a share.
            let by_features = ins.iter().any(|f| matches!(f, Form::Split(_)));
            if sequence_parallel && from_split && !by_features {
                Form::Sequence
            } else {
                Form::Whole
            }
        };
        for n in g.topo_order() {
            let node = &g.dag[n];
            // A replicated value is read as a whole one (see `conversion`).
            let ins: Vec<Form> = g
                .inputs(n)
                .iter()
                .map(|i| match &forms[i.index()] {
                    Form::Replicated => Form::Whole,
                    form => form.clone(),
                })
                .collect();
            let unsupported = || {
                LayoutError(format!(
                    "tensor parallelism cannot split `{}` ({}): its inputs mix split and whole values (prefix tuning's key/value prefixes, for one, are whole)",
                    node.name,
                    node.op.kind()
                ))
            };
            let all_whole = ins.iter().all(|f| *f == Form::Whole);
            let form = match &node.op {
                Op::Input { .. } => Form::Whole,
                Op::Embedding { table } if split(*table) != TensorSplit::Replicated => {
                    let rows = g.params[*table].shape[0] as usize;
                    set_layout(
                        *table,
                        ParamLayout::Shard {
                            axis: 0,
                            sections: vec![rows],
                        },
                    )?;
                    vocab.insert(n, rows);
                    Form::Partial
                }
                Op::Linear {
                    weight,
                    bias,
                    layout,
                    ..
                } => match split(weight.id) {
                    TensorSplit::Column | TensorSplit::Vocab => {
                        if !matches!(ins[0], Form::Whole | Form::Sequence) {
                            return Err(unsupported());
                        }
                        let sections = weight_sections(g, weight.id)?;
                        set_layout(
                            weight.id,
                            ParamLayout::Shard {
                                axis: features_axis(*layout, true),
                                sections: sections.clone(),
                            },
                        )?;
                        if let Some(b) = bias {
                            set_layout(
                                b.id,
                                ParamLayout::Shard {
                                    axis: 0,
                                    sections: sections.clone(),
                                },
                            )?;
                        }
                        match weight.outputs {
                            Some((a, e)) => {
                                slices.insert(n, (a as usize, e as usize, sections));
                                Form::Split(vec![(e - a) as usize])
                            }
                            None => Form::Split(sections),
                        }
                    }
                    TensorSplit::Row => {
                        let Form::Split(sections) = &ins[0] else {
                            return Err(unsupported());
                        };
                        set_layout(
                            weight.id,
                            ParamLayout::Shard {
                                axis: features_axis(*layout, false),
                                sections: sections.clone(),
                            },
                        )?;
                        if let Some(b) = bias {
                            bias_once.insert(n);
                            partial_grads.insert(b.id);
                        }
                        Form::Partial
                    }
                    TensorSplit::Replicated => match &ins[0] {
                        Form::Whole | Form::Replicated => Form::Whole,
                        Form::Sequence => Form::Sequence,
                        Form::Partial => {
                            partial_grads.insert(weight.id);
                            if let Some(b) = bias {
                                bias_once.insert(n);
                                partial_grads.insert(b.id);
                            }
                            Form::Partial
                        }
                        Form::Split(_) => return Err(unsupported()),
                    },
                },
                Op::Slice { start, len } => match &ins[0] {
                    Form::Split(sections) => {
                        slices.insert(
                            n,
                            (*start as usize, (*start + *len) as usize, sections.clone()),
                        );
                        Form::Split(vec![*len as usize])
                    }
                    other => other.clone(),
                },
                // Keys and values after their prefixes: the prefixes (whole) enter as this rank's
                // heads.
                Op::Concat { .. } if !all_whole => {
                    let sections = ins.iter().find_map(|f| match f {
                        Form::Split(sections) => Some(sections.clone()),
                        _ => None,
                    });
                    let fits = ins.iter().all(|f| {
                        *f == Form::Whole || Some(f) == sections.clone().map(Form::Split).as_ref()
                    });
                    match sections {
                        Some(sections) if fits => {
                            sharded_inputs.insert(n, sections.clone());
                            Form::Split(sections)
                        }
                        _ => Form::Whole,
                    }
                }
                Op::Attention { .. } | Op::Rotary { .. } => {
                    if all_whole {
                        Form::Whole
                    } else if ins.iter().all(|f| matches!(f, Form::Split(_))) {
                        let width = node.out.shape.last().copied().unwrap_or(0) as usize;
                        Form::Split(vec![width])
                    } else {
                        return Err(unsupported());
                    }
                }
                Op::Add
                | Op::Mul
                | Op::Scale { .. }
                | Op::Dropout { .. }
                | Op::Activation { .. } => {
                    let first = ins.first().cloned().unwrap_or(Form::Whole);
                    let same = ins.iter().all(|f| *f == first);
                    let linear = matches!(node.op, Op::Add | Op::Scale { .. } | Op::Dropout { .. });
                    match first {
                        Form::Split(_) if same && matches!(node.op, Op::Dropout { .. }) => {
                            return Err(unsupported())
                        }
                        Form::Split(_) if same => first,
                        Form::Partial if same && linear => Form::Partial,
                        // Whole (or, with sequence parallelism, per-token) computation; split
                        // and partial inputs are gathered or scattered first.
                        _ => per_token(&ins),
                    }
                }
                Op::LayerNorm { .. } | Op::RmsNorm { .. } => per_token(&ins),
                Op::ScaleBy { param } => match (split(*param), &ins[0]) {
                    (TensorSplit::Replicated, Form::Whole) => Form::Whole,
                    (TensorSplit::Replicated, Form::Sequence) => Form::Sequence,
                    (TensorSplit::Column, Form::Split(sections)) => {
                        let shape = &g.params[*param].shape;
                        let axis = shape.iter().position(|&d| d != 1).unwrap_or(0);
                        set_layout(
                            *param,
                            ParamLayout::Shard {
                                axis,
                                sections: sections.clone(),
                            },
                        )?;
                        Form::Split(sections.clone())
                    }
                    _ => return Err(unsupported()),
                },
                // Picking positions leaves the features' split as it is (PET's mask logits).
                Op::SelectToken { .. } if matches!(ins[0], Form::Split(_)) => ins[0].clone(),
                // Logits split by vocabulary (one section): each rank works over its columns
                // and the group combines two numbers a row (the CPU kernels do).
                Op::CrossEntropy { .. } | Op::TokenLogProbs => match &ins[0] {
                    Form::Split(sections) if sections.len() == 1 => {
                        vocab_parallel.insert(n, sections[0]);
                        Form::Replicated
                    }
                    _ => Form::Whole,
                },
                Op::DoraRescale { .. } if size > 1 => {
                    return Err(LayoutError(format!(
                        "tensor parallelism does not run `{}` ({}) yet",
                        node.name,
                        node.op.kind()
                    )))
                }
                // Whole computation (norms, positions, prompts, pooling, losses).
                _ => Form::Whole,
            };
            if let Some(p) = node
                .op
                .params()
                .into_iter()
                .find(|&p| split(p) != TensorSplit::Replicated && form == Form::Whole)
            {
                return fail(format!(
                    "`{}` is split but `{}` computes on whole values",
                    g.params[p].name, node.name
                ));
            }
            if form == Form::Sequence {
                let positions = node.out.shape.get(1).copied().unwrap_or(0) as usize;
                if positions % size != 0 {
                    return fail(format!(
                        "sequence parallelism needs every sequence to divide by tensor = {size}; `{}` has {positions} positions (virtual tokens included)",
                        node.name
                    ));
                }
                // Each rank sees its share of the tokens: its gradient is a partial sum.
                partial_grads.extend(node.op.params());
            }
            forms[n.index()] = form;
        }
        let partial_grads = partial_grads
            .into_iter()
            .filter(|&p| g.params[p].trainable)
            .collect();
        let ranks = (0..size)
            .map(|rank| {
                let local = |a: usize, e: usize, sections: &[usize]| -> Result<_, LayoutError> {
                    let mut at = 0;
                    let mut local_at = 0;
                    for &s in sections {
                        if (a, e) == (at, at + s) {
                            return Ok((local_at, local_at + s / size));
                        }
                        at += s;
                        local_at += s / size;
                    }
                    fail(format!(
                        "the range {a}..{e} does not follow the split of its tensor"
                    ))
                };
                Ok(RankOps {
                    rank,
                    size,
                    slices: slices
                        .iter()
                        .map(|(&n, (a, e, sections))| Ok((n, local(*a, *e, sections)?)))
                        .collect::<Result<_, LayoutError>>()?,
                    bias_once: bias_once.clone(),
                    vocab_rows: vocab
                        .iter()
                        .map(|(&n, &rows)| (n, (rank * rows / size, (rank + 1) * rows / size)))
                        .collect(),
                    sequence: g
                        .dag
                        .node_indices()
                        .filter(|n| forms[n.index()] == Form::Sequence)
                        .collect(),
                    vocab_parallel: vocab_parallel
                        .iter()
                        .map(|(&n, &vocab)| {
                            let columns = section_ranges(&[vocab], rank, size).remove(0);
                            (n, VocabColumns { columns, vocab })
                        })
                        .collect(),
                })
            })
            .collect::<Result<Vec<_>, LayoutError>>()?;
        Ok(TensorLayout {
            size,
            splits,
            forms,
            params,
            partial_grads,
            sharded_inputs,
            ranks,
        })
    }

    /// One device: everything whole.
    pub fn whole(g: &Graph) -> Self {
        TensorLayout {
            size: 1,
            splits: vec![TensorSplit::Replicated; g.params.len()],
            forms: vec![Form::Whole; g.dag.node_count()],
            params: vec![ParamLayout::Replicate; g.params.len()],
            partial_grads: Vec::new(),
            sharded_inputs: BTreeMap::new(),
            ranks: vec![RankOps {
                rank: 0,
                size: 1,
                ..RankOps::default()
            }],
        }
    }

    /// The number of values of rank `part`'s shard of parameter `id`.
    pub fn local_len(&self, g: &Graph, id: usize, part: usize) -> usize {
        let shape: Vec<usize> = g.params[id].shape.iter().map(|&d| d as usize).collect();
        self.params[id]
            .local_shape(&shape, part, self.size)
            .iter()
            .product()
    }

    /// Where `n` computes.
    pub fn compute(&self, n: NodeIndex) -> Compute {
        match self.forms[n.index()] {
            Form::Whole => Compute::Whole,
            Form::Split(_) | Form::Partial | Form::Replicated => Compute::Split,
            Form::Sequence => Compute::Sequence,
        }
    }

    /// The collective on the edge from `producer` into node `consumer`, which computes as
    /// `compute`.
    pub fn conversion(
        &self,
        g: &Graph,
        producer: NodeIndex,
        consumer: NodeIndex,
        compute: Compute,
    ) -> Conversion {
        if self.size == 1 || matches!(g.dag[producer].op, Op::Input { .. }) {
            return Conversion::None;
        }
        // A replicated value is read as a whole one.
        let form = match &self.forms[producer.index()] {
            Form::Replicated => &Form::Whole,
            form => form,
        };
        if let (Form::Whole, Some(sections)) = (form, self.sharded_inputs.get(&consumer)) {
            return Conversion::ShardLast(sections.clone());
        }
        match (form, compute) {
            (Form::Whole, Compute::Split) => Conversion::ReduceGradient,
            (Form::Whole, Compute::Sequence) => Conversion::SliceSequence,
            (Form::Partial, Compute::Whole) => Conversion::AllReduce,
            (Form::Partial, Compute::Sequence) => Conversion::ScatterSequence,
            (Form::Split(sections), Compute::Whole | Compute::Sequence) => {
                Conversion::AllGather(sections.clone())
            }
            (Form::Sequence, Compute::Split) => Conversion::GatherSequence {
                partial_gradients: true,
            },
            (Form::Sequence, Compute::Whole) => Conversion::GatherSequence {
                partial_gradients: false,
            },
            _ => Conversion::None,
        }
    }
}

/// The axis of a linear weight that holds its output features (or its input features): Conv1D
/// weights are `[in, out]`, `nn.Linear` weights `[out, in]`.
fn features_axis(layout: Layout, outputs: bool) -> usize {
    match (layout, outputs) {
        (Layout::InOut, true) | (Layout::OutIn, false) => 1,
        (Layout::InOut, false) | (Layout::OutIn, true) => 0,
    }
}

/// The sections of a column-parallel weight's output: the ranges its readers take of it
/// (GPT-2's fused c_attn read as q, k, v), or the ranges sliced from its output downstream
/// of elementwise ops; one section when nothing slices it.
fn weight_sections(g: &Graph, weight: usize) -> Result<Vec<usize>, LayoutError> {
    let mut ranges: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut width = g.params[weight].shape[0];
    for n in g.dag.node_indices() {
        let Op::Linear {
            weight: w, layout, ..
        } = &g.dag[n].op
        else {
            continue;
        };
        if w.id != weight {
            continue;
        }
        width = g.params[weight].shape[features_axis(*layout, true)];
        match w.outputs {
            Some(r) => {
                ranges.insert(r);
            }
            None => {
                // Follow same-width elementwise ops down to slices.
                let mut frontier = vec![n];
                let mut seen = BTreeSet::new();
                while let Some(m) = frontier.pop() {
                    for c in g.dag.neighbors_directed(m, Direction::Outgoing) {
                        if !seen.insert(c) {
                            continue;
                        }
                        match g.dag[c].op {
                            Op::Slice { start, len } => {
                                ranges.insert((start, start + len));
                            }
                            Op::Add
                            | Op::Mul
                            | Op::Scale { .. }
                            | Op::Dropout { .. }
                            | Op::Activation { .. }
                            | Op::ScaleBy { .. } => frontier.push(c),
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    if ranges.is_empty() {
        return Ok(vec![width as usize]);
    }
    let mut at = 0;
    let mut sections = Vec::new();
    for (a, e) in ranges {
        if a != at {
            return fail(format!(
                "`{}` is read in ranges that do not tile it",
                g.params[weight].name
            ));
        }
        sections.push((e - a) as usize);
        at = e;
    }
    if at != width {
        return fail(format!(
            "`{}` is read in ranges that do not tile it",
            g.params[weight].name
        ));
    }
    Ok(sections)
}

/// The rank's share of each section along the last axis, as ranges of that axis.
pub fn section_ranges(sections: &[usize], rank: usize, size: usize) -> Vec<std::ops::Range<usize>> {
    let mut at = 0;
    sections
        .iter()
        .map(|&s| {
            let r = at + rank * s / size..at + (rank + 1) * s / size;
            at += s;
            r
        })
        .collect()
}

impl ParamLayout {
    /// The shape of rank `rank`'s shard of a parameter of shape `shape`.
    pub fn local_shape(&self, shape: &[usize], rank: usize, size: usize) -> Vec<usize> {
        let mut local = shape.to_vec();
        if let ParamLayout::Shard { axis, sections } = self {
            let axis = (*axis).min(shape.len().saturating_sub(1));
            local[axis] = section_ranges(sections, rank, size)
                .iter()
                .map(|r| r.len())
                .sum();
        }
        local
    }

    pub fn is_sharded(&self) -> bool {
        matches!(self, ParamLayout::Shard { .. })
    }
}

/// The layout of a value split evenly along its sequence axis.
pub fn sequence_axis(shape: &[usize]) -> ParamLayout {
    ParamLayout::Shard {
        axis: 1,
        sections: vec![shape.get(1).copied().unwrap_or(1)],
    }
}

/// The layout of a value split along its last axis by `sections`.
pub fn last_axis(shape: &[usize], sections: &[usize]) -> ParamLayout {
    ParamLayout::Shard {
        axis: shape.len().saturating_sub(1),
        sections: sections.to_vec(),
    }
}
