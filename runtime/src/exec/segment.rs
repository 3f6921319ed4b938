//! A segment: a part of the graph run forward on one device, holding its tape until its
//! backward (the whole graph, a pipeline stage's layers, or a piece recomputed in the backward
//! pass); and one batch's forward and backward over the whole graph.

use super::interpreter::Interpreter;
use super::ops;
use super::precision::Format;
use super::value::{Params, Value, P, V};
use super::{err, Batch, Dev, ExecError, Stats, Tape, T0};
use crate::comm::Collective;
use crate::parallel::tensor_parallel::VocabShard;
use crate::tensor::HostTensor;
use dfdx::prelude::*;
use kiln_compiler::graph::{Graph, Op};
use kiln_compiler::plan::sharding::RankOps;
use petgraph::graph::NodeIndex;

/// The loss and the gradient of every trainable parameter (`None` for frozen ones).
pub struct Outcome {
    pub loss: f32,
    pub grads: Vec<Option<Vec<f32>>>,
    /// Per-row class scores, for objectives that classify (PET), to measure accuracy.
    pub class_logits: Option<Vec<Vec<f32>>>,
    pub stats: Stats,
}

/// Runs forward and backward for one batch over the whole graph on one device.
pub fn forward_backward(
    g: &Graph,
    values: &[HostTensor],
    batch: &Batch,
    format: Format,
) -> Result<Outcome, ExecError> {
    let Some(loss_node) = g.loss else {
        return err("the graph has no loss");
    };
    let whole = RankOps::default();
    let params = Params::new(g, values, format)?;
    let segment = Segment::forward(g, &params, batch, &whole, &g.topo_order(), Vec::new(), None)?;
    let loss = segment.loss()?;
    if !loss.is_finite() {
        return err(format!("the loss is {loss}"));
    }
    let class_logits = segment.class_logits();
    let stats = segment.stats();
    let grads = segment.backward(&[(loss_node, Value::scalar(1.0))])?;
    let mut out: Vec<Option<Vec<f32>>> = vec![None; g.params.len()];
    for (id, grad) in grads.params {
        out[id] = Some(grad);
    }
    Ok(Outcome {
        loss,
        grads: out,
        class_logits,
        stats,
    })
}

/// A part of the graph run forward on one device, holding its tape until its backward: the
/// whole graph, a pipeline stage's layers, or a piece recomputed in the backward pass.
pub struct Segment<'g> {
    it: Interpreter<'g>,
    /// Values that came from other segments, whose gradients the backward returns.
    received: Vec<NodeIndex>,
}

/// What a segment's backward yields: gradients of the trainable parameters it read, and of the
/// values it received.
pub struct SegmentGrads {
    pub params: Vec<(usize, Vec<f32>)>,
    pub received: Vec<(NodeIndex, Value)>,
}

impl<'g> Segment<'g> {
    /// Runs `nodes` (in topological order) forward. Values of other nodes they read come from
    /// `received`, except integer inputs, which every device reads from its batch. Parameters
    /// not read here may be left empty in `params`. `group` is the tensor-parallel group, for
    /// what this rank computes from its columns of the vocabulary (`ops.vocab_parallel`).
    pub fn forward(
        g: &'g Graph,
        params: &Params,
        batch: &'g Batch,
        ops: &'g RankOps,
        nodes: &[NodeIndex],
        received: Vec<(NodeIndex, Value)>,
        mut group: Option<&mut dyn Collective>,
    ) -> Result<Self, ExecError> {
        let mut used = vec![false; g.params.len()];
        for &n in nodes {
            for id in g.dag[n].op.params() {
                used[id] = true;
            }
        }
        // The segment shares the device's parameter tensors (no copy).
        let format = params.format;
        let params = params
            .tensors
            .iter()
            .zip(used)
            .map(|(p, used)| if used { p.clone() } else { None })
            .collect();
        let mut it = Interpreter::new(g, params, format, batch, ops);
        let mut ids = Vec::with_capacity(received.len());
        for (n, v) in received {
            it.values[n.index()] = Some(v.0);
            ids.push(n);
        }
        for &n in nodes {
            for i in g.inputs(n) {
                if it.values[i.index()].is_none() && matches!(g.dag[i].op, Op::Input { .. }) {
                    it.compute(i)?;
                }
            }
            match ops.vocab_parallel.get(&n) {
                Some(at) => {
                    let group = group.as_deref_mut().ok_or_else(|| {
                        ExecError(format!(
                            "{}: vocabulary-parallel computation needs its tensor-parallel group",
                            g.dag[n].name
                        ))
                    })?;
                    let shard = VocabShard { at, group };
                    it.compute_with(n, |it| ops::loss::forward_sharded(it, n, shard))?;
                }
                None => it.compute(n)?,
            }
        }
        Ok(Segment { it, received: ids })
    }

    /// The value a node computed here (or received), for other segments.
    pub fn value(&self, n: NodeIndex) -> Result<Value, ExecError> {
        match &self.it.values[n.index()] {
            Some(V::Ints(_)) => err(format!(
                "{}: integer inputs are read from the batch, not sent",
                self.it.g.dag[n].name
            )),
            Some(v) => Ok(Value(v.clone())),
            None => err(format!("{}: not computed here", self.it.g.dag[n].name)),
        }
    }

    /// The training loss, when this segment computed it.
    pub fn loss(&self) -> Result<f32, ExecError> {
        let loss = self
            .it
            .g
            .loss
            .ok_or_else(|| ExecError("the graph has no loss".into()))?;
        match &self.it.values[loss.index()] {
            Some(V::S(t)) => Ok(t.array()),
            _ => err("the loss is not computed on this device"),
        }
    }

    /// Drops the values of nodes other than `keep` and the received ones: what the backward
    /// needs, the tape holds; a value held here as well would live until the backward for
    /// nothing.
    pub fn retain_values(&mut self, keep: impl Fn(NodeIndex) -> bool) {
        let received = &self.received;
        for (i, v) in self.it.values.iter_mut().enumerate() {
            let n = NodeIndex::new(i);
            if !keep(n) && !received.contains(&n) {
                *v = None;
            }
        }
    }

    /// Per-row class scores, when this segment computed them (PET's verbalizer logits).
    pub fn class_logits(&self) -> Option<Vec<Vec<f32>>> {
        ops::loss::class_logits(self.it.g, &self.it.values)
    }

    /// What the loss computed here reported beside its value.
    pub fn stats(&self) -> Stats {
        self.it.stats.clone()
    }

    /// Backpropagates `upstream` (the gradient of the loss with respect to some of this
    /// segment's values; 1 for the loss itself) through the segment: the gradient of
    /// Σ ⟨value, upstream⟩, whose derivative is exactly the upstream gradient.
    pub fn backward(mut self, upstream: &[(NodeIndex, Value)]) -> Result<SegmentGrads, ExecError> {
        let mut tape = self.it.take_tape();
        // Gradients of the received values and parameters exist even where nothing flows
        // into them (zero), so that reading them back cannot fail.
        for &n in &self.received {
            match &self.it.values[n.index()] {
                Some(V::S(t)) => alloc_grad(&mut tape, t.clone()),
                Some(V::R2(t)) => alloc_grad(&mut tape, t.clone()),
                Some(V::R3(t)) => alloc_grad(&mut tape, t.clone()),
                _ => {}
            }
        }
        for (p, meta) in self.it.params.iter().zip(&self.it.g.params) {
            match p {
                Some(P::R1(t)) if meta.trainable => alloc_grad(&mut tape, t.clone()),
                Some(P::R2(t)) if meta.trainable => alloc_grad(&mut tape, t.clone()),
                _ => {}
            }
        }
        let mut total: Option<T0> = None;
        for (n, g) in upstream {
            let name = &self.it.g.dag[*n].name;
            let term = match (&self.it.values[n.index()], &g.0) {
                (Some(V::S(t)), V::S(g)) => t.clone().put_tape(tape) * g.array(),
                (Some(V::R2(t)), V::R2(g)) if t.shape() == g.shape() => {
                    (t.clone().put_tape(tape) * g.clone()).sum::<(), _>()
                }
                (Some(V::R3(t)), V::R3(g)) if t.shape() == g.shape() => {
                    (t.clone().put_tape(tape) * g.clone()).sum::<(), _>()
                }
                (None, _) => return err(format!("{name}: no value to backpropagate through")),
                _ => return err(format!("{name}: the gradient's shape does not match")),
            };
            let term = match total.take() {
                Some(sum) => term + sum,
                None => term,
            };
            let (sum, rest) = term.split_tape();
            total = Some(sum);
            tape = rest;
        }
        let Some(total) = total else {
            return err("nothing to backpropagate");
        };
        let grads = total.put_tape(tape).backward();
        let params = self
            .it
            .params
            .iter()
            .zip(&self.it.g.params)
            .enumerate()
            .filter_map(|(id, (p, meta))| match p {
                Some(P::R1(t)) if meta.trainable => Some((id, grads.get(t).as_vec())),
                Some(P::R2(t)) if meta.trainable => Some((id, grads.get(t).as_vec())),
                _ => None,
            })
            .collect();
        let received = self
            .received
            .iter()
            .filter_map(|&n| {
                let grad = match &self.it.values[n.index()] {
                    Some(V::S(t)) => V::S(grads.get(t)),
                    Some(V::R2(t)) => V::R2(grads.get(t)),
                    Some(V::R3(t)) => V::R3(grads.get(t)),
                    _ => return None,
                };
                Some((n, Value(grad)))
            })
            .collect();
        Ok(SegmentGrads { params, received })
    }
}

/// Makes sure `t` has a gradient after the backward pass (zero if nothing reaches it).
fn alloc_grad<S: Shape>(tape: &mut Tape, t: Tensor<S, f32, Dev>) {
    dfdx::tensor::Tape::add_backward_op(tape, move |grads| grads.try_alloc_for(&t));
}
