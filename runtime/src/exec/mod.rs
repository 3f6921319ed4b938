//! The CPU executor: interprets the operator graph with dfdx. Values live in a table of
//! tape-less tensors (one per node); a single gradient tape is threaded through the ops in
//! topological order (put on the left operand, split off the result), and `backward` on the
//! loss yields gradients for every parameter the ops touched.

#[cfg(not(feature = "cuda"))]
mod kernels;
pub mod prompt;

use crate::parallel::collective::Collective;
use crate::parallel::tensor_parallel::VocabShard;
use crate::rng::{Key, Purpose};
use crate::tensor::HostTensor;
use dfdx::prelude::*;
use kiln_compiler::graph::{Act, Graph, InputKind, Layout, Op, ParamRef, Pick};
use kiln_compiler::plan::sharding::RankOps;
use petgraph::graph::NodeIndex;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

/// The device the executor computes on: the CPU, or with the `cuda` feature an NVIDIA GPU
/// through dfdx's CUDA backend (the same ops, kernels compiled by nvcc).
#[cfg(not(feature = "cuda"))]
pub type Dev = Cpu;
#[cfg(feature = "cuda")]
pub type Dev = dfdx::tensor::Cuda;

type Tape = OwnedTape<f32, Dev>;
type T0 = Tensor<(), f32, Dev>;
type T1 = Tensor<(usize,), f32, Dev>;
type T2 = Tensor<(usize, usize), f32, Dev>;
type T3 = Tensor<(usize, usize, usize), f32, Dev>;
#[cfg(feature = "cuda")]
type T4 = Tensor<(usize, usize, usize, usize), f32, Dev>;
type T3Taped = Tensor<(usize, usize, usize), f32, Dev, Tape>;

/// HF's mask value: the most negative finite f32, so fully masked rows stay finite.
const MASKED: f32 = f32::MIN;

/// One batch: integer inputs by the graph's input names (`input_ids`, `labels`, ...), plus what
/// the objective reads outside the graph's inputs.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// `[rows][positions]` integers per input name; labels use −100 for "no loss".
    pub ints: BTreeMap<String, Vec<Vec<i64>>>,
    /// Real-valued inputs by name (PPO's `rollout`).
    pub floats: BTreeMap<String, HostTensor>,
    /// 1 for real tokens, 0 for padding; all ones when absent.
    pub attention_mask: Option<Vec<Vec<i64>>>,
    /// The [MASK] position of each row (PET).
    pub mask_positions: Option<Vec<usize>>,
    /// Token ids of each class's verbalizer word (PET).
    pub class_token_ids: Option<Vec<usize>>,
    /// What this step's dropout masks are drawn from; `None` runs without dropout (evaluation).
    pub dropout: Option<DropoutKey>,
    /// What each cross-entropy node divides its sum by instead of this batch's count of
    /// labelled positions (`label_counts`): this batch's share of the count over every batch of
    /// the loss, so that the loss is the mean over all of their positions however they are cut
    /// into batches.
    pub label_counts: BTreeMap<NodeIndex, f32>,
}

/// The coordinates of a batch's dropout masks beside the element: the run's seed, the step,
/// and each row's place in the step (see `rng`), so that a row's masks are the same whichever
/// microbatch, data-parallel replica or tensor-parallel rank computes it.
#[derive(Clone, Debug)]
pub struct DropoutKey {
    step: Key,
    /// The global row of each of the batch's rows: its index among the step's rows, in the
    /// order they were drawn.
    rows: Vec<u64>,
}

impl DropoutKey {
    pub fn new(seed: u64, step: u64, rows: Vec<u64>) -> Self {
        DropoutKey {
            step: Key::of(seed, Purpose::Dropout).fold(step),
            rows,
        }
    }
}

impl Batch {
    /// Rows `rows` of the batch: what one data-parallel replica computes of a microbatch. Its
    /// cross-entropies divide by its share of the microbatch's count, so that the replicas'
    /// losses add up to the microbatch's.
    pub fn rows(&self, rows: Range<usize>) -> Result<Batch, ExecError> {
        let total = self
            .ints
            .values()
            .map(Vec::len)
            .chain(self.attention_mask.as_ref().map(Vec::len))
            .chain(
                self.floats
                    .values()
                    .filter_map(|t| t.shape.first().copied()),
            )
            .max()
            .unwrap_or(0);
        if rows == (0..total) {
            return Ok(self.clone());
        }
        let out_of_range = || {
            ExecError(format!(
                "rows {}..{} of a batch of {total} rows",
                rows.start, rows.end
            ))
        };
        let pick = |v: &Vec<Vec<i64>>| {
            v.get(rows.clone())
                .map(<[_]>::to_vec)
                .ok_or_else(out_of_range)
        };
        let ints = self
            .ints
            .iter()
            .map(|(name, v)| Ok((name.clone(), pick(v)?)))
            .collect::<Result<_, ExecError>>()?;
        let floats = self
            .floats
            .iter()
            .map(|(name, t)| {
                let per_row: usize = t.shape.iter().skip(1).product();
                let data = t
                    .data
                    .get(rows.start * per_row..rows.end * per_row)
                    .ok_or_else(out_of_range)?
                    .to_vec();
                let mut shape = t.shape.clone();
                shape[0] = rows.len();
                Ok((name.clone(), HostTensor { shape, data }))
            })
            .collect::<Result<_, ExecError>>()?;
        let share = rows.len() as f32 / total as f32;
        Ok(Batch {
            ints,
            floats,
            attention_mask: self.attention_mask.as_ref().map(pick).transpose()?,
            mask_positions: match &self.mask_positions {
                Some(m) => Some(m.get(rows.clone()).ok_or_else(out_of_range)?.to_vec()),
                None => None,
            },
            class_token_ids: self.class_token_ids.clone(),
            dropout: match &self.dropout {
                Some(key) => Some(DropoutKey {
                    step: key.step,
                    rows: key
                        .rows
                        .get(rows.clone())
                        .ok_or_else(out_of_range)?
                        .to_vec(),
                }),
                None => None,
            },
            label_counts: self
                .label_counts
                .iter()
                .map(|(&n, &count)| (n, count * share))
                .collect(),
        })
    }
}

#[derive(Debug)]
pub struct ExecError(pub String);

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ExecError {}

fn err<T>(message: impl Into<String>) -> Result<T, ExecError> {
    Err(ExecError(message.into()))
}

/// Figures a loss reports beside its value, by name (PPO: its policy and value losses and how
/// often each was clipped).
pub type Stats = BTreeMap<&'static str, f32>;

/// The loss and the gradient of every trainable parameter (`None` for frozen ones).
pub struct Outcome {
    pub loss: f32,
    pub grads: Vec<Option<Vec<f32>>>,
    /// Per-row class scores, for objectives that classify (PET), to measure accuracy.
    pub class_logits: Option<Vec<Vec<f32>>>,
    pub stats: Stats,
}

#[derive(Clone)]
enum V {
    S(T0),
    R2(T2),
    R3(T3),
    /// Integer input `[b, s]` (or `[b]` as `[b, 1]`).
    Ints(Vec<Vec<i64>>),
}

impl V {
    fn r3(&self, what: &str) -> Result<T3, ExecError> {
        match self {
            V::R3(t) => Ok(t.clone()),
            _ => err(format!("{what}: expected a rank-3 tensor")),
        }
    }
    fn r2(&self, what: &str) -> Result<T2, ExecError> {
        match self {
            V::R2(t) => Ok(t.clone()),
            _ => err(format!("{what}: expected a rank-2 tensor")),
        }
    }
    fn scalar(&self, what: &str) -> Result<T0, ExecError> {
        match self {
            V::S(t) => Ok(t.clone()),
            _ => err(format!("{what}: expected a scalar")),
        }
    }
    fn ints(&self, what: &str) -> Result<&Vec<Vec<i64>>, ExecError> {
        match self {
            V::Ints(v) => Ok(v),
            _ => err(format!("{what}: expected integer input")),
        }
    }
}

/// A value computed by one segment and read by another: a tensor on the device (no copy between
/// segments of one device), or moved through the host to another device.
#[derive(Clone)]
pub struct Value(V);

impl Value {
    pub fn from_host(t: HostTensor) -> Result<Value, ExecError> {
        let dev = Dev::default();
        match *t.shape.as_slice() {
            [] if t.data.len() == 1 => Ok(Value(V::S(dev.tensor(t.data[0])))),
            [a, b] => Ok(Value(V::R2(dev.tensor_from_vec(t.data, (a, b))))),
            [a, b, c] => Ok(Value(V::R3(dev.tensor_from_vec(t.data, (a, b, c))))),
            ref other => err(format!("a value of shape {other:?}")),
        }
    }

    pub fn to_host(&self) -> Result<HostTensor, ExecError> {
        Ok(match &self.0 {
            V::S(t) => HostTensor::scalar(t.array()),
            V::R2(t) => HostTensor {
                shape: vec![t.shape().0, t.shape().1],
                data: t.as_vec(),
            },
            V::R3(t) => HostTensor {
                shape: vec![t.shape().0, t.shape().1, t.shape().2],
                data: t.as_vec(),
            },
            V::Ints(_) => return err("integer inputs are read from the batch, not sent"),
        })
    }

    pub fn scalar(x: f32) -> Value {
        Value(V::S(Dev::default().tensor(x)))
    }

    /// Zeros of the same shape (the gradient of a value nothing depended on).
    pub fn zeros_like(&self) -> Value {
        let dev = Dev::default();
        Value(match &self.0 {
            V::S(t) => V::S(dev.zeros_like(t)),
            V::R2(t) => V::R2(dev.zeros_like(t)),
            V::R3(t) => V::R3(dev.zeros_like(t)),
            V::Ints(v) => V::Ints(v.clone()),
        })
    }

    /// The element-wise sum (gradients from several readers).
    pub fn add(&self, other: &Value) -> Result<Value, ExecError> {
        Ok(Value(match (&self.0, &other.0) {
            (V::S(a), V::S(b)) => V::S(a.clone() + b.clone()),
            (V::R2(a), V::R2(b)) if a.shape() == b.shape() => V::R2(a.clone() + b.clone()),
            (V::R3(a), V::R3(b)) if a.shape() == b.shape() => V::R3(a.clone() + b.clone()),
            _ => return err("adding gradients of different shapes"),
        }))
    }
}

/// A parameter as a tape-less tensor of its own rank.
#[derive(Clone)]
enum P {
    R1(T1),
    R2(T2),
}

/// The parameters a device holds, as tensors on it, shared by every segment it runs (one copy
/// however many microbatches are in flight).
pub struct Params(Vec<Option<P>>);

impl Params {
    /// From host values; absent ones (held by other devices) stay absent.
    pub fn new(g: &Graph, values: &[HostTensor]) -> Result<Params, ExecError> {
        let mut params = Params(vec![None; g.params.len()]);
        for (id, v) in values.iter().enumerate() {
            if !v.data.is_empty() {
                params.set(g, id, v)?;
            }
        }
        Ok(params)
    }

    /// Puts parameter `id` on the device (a ZeRO-3 gather).
    pub fn set(&mut self, g: &Graph, id: usize, v: &HostTensor) -> Result<(), ExecError> {
        let dev = Dev::default();
        self.0[id] = Some(match v.shape.as_slice() {
            [n] => P::R1(dev.tensor_from_vec(v.data.clone(), (*n,))),
            [a, b] => P::R2(dev.tensor_from_vec(v.data.clone(), (*a, *b))),
            other => {
                return err(format!(
                    "parameter `{}` has rank {}",
                    g.params[id].name,
                    other.len()
                ))
            }
        });
        Ok(())
    }

    /// Drops the device's tensor of parameter `id` (segments holding it keep theirs).
    pub fn release(&mut self, id: usize) {
        self.0[id] = None;
    }

    /// Drops every tensor (before the optimizer updates the host copies).
    pub fn clear(&mut self) {
        self.0.iter_mut().for_each(|p| *p = None);
    }
}

struct Interpreter<'g> {
    g: &'g Graph,
    /// The node being computed: dropout masks are drawn from a stream of their own per node,
    /// so they do not depend on how the graph is split across devices.
    current: NodeIndex,
    dev: Dev,
    tape: Tape,
    /// The parameters this part of the graph reads (`None`: held by another device).
    params: Vec<Option<P>>,
    values: Vec<Option<V>>,
    batch: &'g Batch,
    /// What this tensor-parallel rank does differently (nothing on one device).
    ops: &'g RankOps,
    stats: Stats,
}

/// Runs forward and backward for one batch over the whole graph on one device.
pub fn forward_backward(
    g: &Graph,
    values: &[HostTensor],
    batch: &Batch,
) -> Result<Outcome, ExecError> {
    let Some(loss_node) = g.loss else {
        return err("the graph has no loss");
    };
    let whole = RankOps::default();
    let params = Params::new(g, values)?;
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
        let dev = Dev::default();
        let mut used = vec![false; g.params.len()];
        for &n in nodes {
            for id in g.dag[n].op.params() {
                used[id] = true;
            }
        }
        // The segment shares the device's parameter tensors (no copy).
        let params = params
            .0
            .iter()
            .zip(used)
            .map(|(p, used)| if used { p.clone() } else { None })
            .collect();
        let mut it = Interpreter {
            g,
            current: NodeIndex::new(0),
            dev,
            tape: Tape::default(),
            params,
            values: vec![None; g.dag.node_count()],
            batch,
            ops,
            stats: Stats::new(),
        };
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
                    it.compute_with(n, |it| match g.dag[n].op {
                        Op::TokenLogProbs => it.token_log_probs(n, Some(shard)),
                        _ => it.cross_entropy(n, Some(shard)),
                    })?;
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
        let g = self.it.g;
        g.dag
            .node_indices()
            .find(|&n| matches!(g.dag[n].op, Op::GatherClasses { .. }))
            .and_then(|n| match &self.it.values[n.index()] {
                Some(V::R2(t)) => {
                    let (_, classes) = *t.shape();
                    Some(t.as_vec().chunks(classes).map(<[f32]>::to_vec).collect())
                }
                _ => None,
            })
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

fn activate<S: Shape>(x: Tensor<S, f32, Dev, Tape>, act: Act) -> Tensor<S, f32, Dev, Tape> {
    // On the CPU the GELUs and SiLU are one fused kernel each (value and derivative).
    #[cfg(not(feature = "cuda"))]
    {
        use crate::exec::kernels::{activation, Activation};
        let fused = match act {
            Act::Gelu => Some(Activation::GeluErf),
            Act::GeluTanh => Some(Activation::GeluTanh),
            Act::Silu => Some(Activation::Silu),
            Act::Relu | Act::Tanh => None,
        };
        if let Some(fused) = fused {
            return activation(x, fused);
        }
    }
    match act {
        Act::Gelu => exact_gelu(x),
        Act::GeluTanh => x.fast_gelu(),
        Act::Relu => x.relu(),
        Act::Tanh => x.tanh(),
        Act::Silu => {
            let (xs, tape) = x.split_tape();
            xs.clone().put_tape(tape).sigmoid() * xs
        }
    }
}

/// `a + b` or `a * b`; `same` when both are one tensor (dfdx's backward needs distinct operands).
fn combine<S: Shape>(
    a: Tensor<S, f32, Dev, Tape>,
    b: Tensor<S, f32, Dev>,
    add: bool,
    same: bool,
) -> Tensor<S, f32, Dev, Tape> {
    match (same, add) {
        (true, true) => a * 2.0,
        (true, false) => a.square(),
        (false, true) => a + b,
        (false, false) => a * b,
    }
}

/// The erf GELU. dfdx 0.13's `accurate_gelu` computes the right values but its derivative
/// drops a factor 1/√2 from the erf term; a term whose value is zero (e − stop(e), with
/// e = exp(−x²/2)) carries the missing −(1 − 1/√2)/√π · x·e of gradient.
fn exact_gelu<S: Shape>(x: Tensor<S, f32, Dev, Tape>) -> Tensor<S, f32, Dev, Tape> {
    let c = (1.0 - std::f32::consts::FRAC_1_SQRT_2) / std::f32::consts::PI.sqrt();
    let (xs, tape) = x.split_tape();
    let (gelu, tape) = xs.clone().put_tape(tape).accurate_gelu().split_tape();
    let held = (xs.clone().square() * -0.5).exp() * c;
    let live = (xs.put_tape(tape).square() * -0.5).exp() * c;
    live + gelu - held
}

/// The clipping ranges of PPO's policy ratio and value, and the value loss's weight.
struct PpoKnobs {
    clip: f32,
    value_clip: f32,
    value_coef: f32,
}

/// What inverted dropout multiplies kept values by.
fn dropout_scale(p: f64) -> f32 {
    1.0 / (1.0 - p) as f32
}

/// An inverted-dropout mask's values (0 or 1/(1−p)) from which elements are kept.
fn dropout_factors(keep: Vec<bool>, p: f64) -> Vec<f32> {
    let scale = dropout_scale(p);
    keep.into_iter()
        .map(|k| if k { scale } else { 0.0 })
        .collect()
}

/// The label a cross-entropy over `positions` positions of `rows` rows reads at each: the
/// row's from `offset` on (the next token's under a shift; a class's at 0), −100 (none) past
/// its end.
fn position_labels(
    labels: &[Vec<i64>],
    rows: usize,
    positions: usize,
    offset: usize,
) -> impl Iterator<Item = i64> + '_ {
    labels.iter().take(rows).flat_map(move |row| {
        (0..positions).map(move |t| row.get(t + offset).copied().unwrap_or(-100))
    })
}

/// How many labelled positions each cross-entropy node of `g` averages over in `batch` (what
/// it divides by unless the batch says otherwise: `Batch::label_counts`).
pub fn label_counts(g: &Graph, batch: &Batch) -> Result<BTreeMap<NodeIndex, f64>, ExecError> {
    let mut counts = BTreeMap::new();
    for n in g.dag.node_indices() {
        let Op::CrossEntropy { shift } = g.dag[n].op else {
            continue;
        };
        let &[logits, labels] = g.inputs(n).as_slice() else {
            return err(format!(
                "`{}` does not read logits and labels",
                g.dag[n].name
            ));
        };
        let name = &g.dag[labels].name;
        let Some(labels) = batch.ints.get(name) else {
            return err(format!("the batch has no `{name}`"));
        };
        // Token logits `[b, s, vocab]` (shifted for causal LM), or class logits `[b, classes]`.
        let (positions, offset) = match g.dag[logits].out.shape[..] {
            [_, s, _] if shift => (s as usize - 1, 1),
            [_, s, _] => (s as usize, 0),
            _ => (1, 0),
        };
        let labelled = position_labels(labels, labels.len(), positions, offset)
            .filter(|&l| l >= 0)
            .count();
        counts.insert(n, labelled as f64);
    }
    Ok(counts)
}

impl Interpreter<'_> {
    /// The values of this node's inverted-dropout mask (0 or 1/(1−p)); see `dropout_keep`.
    fn dropout_values(
        &self,
        p: f64,
        rows: usize,
        offset: usize,
        len: usize,
    ) -> Result<Option<Vec<f32>>, ExecError> {
        Ok(self
            .dropout_keep(p, rows, offset, len)?
            .map(|keep| dropout_factors(keep, p)))
    }

    /// Which elements dropout keeps of this node's value of `rows` rows, of which this device
    /// holds `len` elements a row from element `offset` of the whole value's row on (a share of
    /// the sequence, or of the heads). An element's bit depends on the batch's key, the node,
    /// the row's global index and the element's index in the whole row alone. `None` when
    /// dropout is off for this batch or `p` is zero.
    fn dropout_keep(
        &self,
        p: f64,
        rows: usize,
        offset: usize,
        len: usize,
    ) -> Result<Option<Vec<bool>>, ExecError> {
        let Some(key) = &self.batch.dropout else {
            return Ok(None);
        };
        if p <= 0.0 {
            return Ok(None);
        }
        if key.rows.len() != rows {
            return err(format!(
                "dropout over {rows} rows with the global rows of {}",
                key.rows.len()
            ));
        }
        let node = key.step.fold(self.current.index() as u64);
        let threshold = (p * u64::MAX as f64) as u64;
        Ok(Some(
            key.rows
                .iter()
                .flat_map(|&row| {
                    let row = node.fold(row);
                    (offset..offset + len).map(move |i| row.bits(i as u64) >= threshold)
                })
                .collect(),
        ))
    }

    fn input(&self, n: NodeIndex, slot: usize) -> Result<&V, ExecError> {
        let i = *self
            .g
            .inputs(n)
            .get(slot)
            .ok_or_else(|| ExecError(format!("no input {slot}")))?;
        self.values[i.index()]
            .as_ref()
            .ok_or_else(|| ExecError("input not computed".into()))
    }

    /// Computes node `n` and keeps its value.
    fn compute(&mut self, n: NodeIndex) -> Result<(), ExecError> {
        self.compute_with(n, |it| it.node(n))
    }

    /// Computes node `n` with `run` and keeps its value.
    fn compute_with(
        &mut self,
        n: NodeIndex,
        run: impl FnOnce(&mut Self) -> Result<V, ExecError>,
    ) -> Result<(), ExecError> {
        self.current = n;
        let v = run(self).map_err(|e| ExecError(format!("{}: {}", self.g.dag[n].name, e.0)))?;
        self.values[n.index()] = Some(v);
        Ok(())
    }

    fn param(&self, id: usize) -> Result<&P, ExecError> {
        self.params[id].as_ref().ok_or_else(|| {
            ExecError(format!(
                "parameter `{}` is not on this device",
                self.g.params[id].name
            ))
        })
    }

    fn p1(&self, id: usize) -> Result<T1, ExecError> {
        match self.param(id)? {
            P::R1(t) => Ok(t.clone()),
            P::R2(t) => {
                // IA3 vectors are stored [n, 1] or [1, n]: read them flat (same values).
                let (a, b) = *t.shape();
                Ok(t.clone().reshape_like(&(a * b,)))
            }
        }
    }

    /// A vector parameter for the CPU kernels, with whether it is trained.
    #[cfg(not(feature = "cuda"))]
    fn vector(&self, id: usize) -> Result<crate::exec::kernels::Vector, ExecError> {
        Ok(crate::exec::kernels::Vector {
            v: self.p1(id)?,
            trainable: self.g.params[id].trainable,
        })
    }

    fn p2(&self, id: usize) -> Result<T2, ExecError> {
        match self.param(id)? {
            P::R2(t) => Ok(t.clone()),
            P::R1(_) => err(format!(
                "parameter `{}` is not a matrix",
                self.g.params[id].name
            )),
        }
    }

    fn take_tape(&mut self) -> Tape {
        std::mem::take(&mut self.tape)
    }

    /// Puts the result's tape back and keeps its value.
    fn keep3(&mut self, t: Tensor<(usize, usize, usize), f32, Dev, Tape>) -> V {
        let (v, tape) = t.split_tape();
        self.tape = tape;
        V::R3(v)
    }
    fn keep2(&mut self, t: Tensor<(usize, usize), f32, Dev, Tape>) -> V {
        let (v, tape) = t.split_tape();
        self.tape = tape;
        V::R2(v)
    }
    fn keep0(&mut self, t: Tensor<(), f32, Dev, Tape>) -> V {
        let (v, tape) = t.split_tape();
        self.tape = tape;
        V::S(v)
    }

    fn node(&mut self, n: NodeIndex) -> Result<V, ExecError> {
        let node = &self.g.dag[n];
        let op = node.op.clone();
        match op {
            Op::Input {
                kind: InputKind::Rollout,
            } => match self.batch.floats.get(&node.name) {
                Some(t) if t.shape.len() == 3 => Ok(Value::from_host(t.clone())?.0),
                Some(t) => err(format!("a rollout of shape {:?}, not [b, s, 4]", t.shape)),
                None => err(format!("the batch has no `{}`", node.name)),
            },
            Op::Input { kind } => {
                let name = node.name.clone();
                let ints = match self.batch.ints.get(&name) {
                    Some(v) => v.clone(),
                    None if kind == InputKind::TokenTypes => {
                        vec![vec![0; self.g.seq as usize]; self.g.batch as usize]
                    }
                    None => return err(format!("the batch has no `{name}`")),
                };
                // Labels made longer by prompt tuning take P leading −100 labels (rows may be
                // shorter than `seq`: PPO's batches are as wide as their longest sequence).
                let virtual_tokens = match (kind, node.out.shape.get(1)) {
                    (InputKind::Labels, Some(&len)) => len.saturating_sub(self.g.seq) as usize,
                    _ => 0,
                };
                let padded = ints
                    .into_iter()
                    .map(|row| {
                        std::iter::repeat_n(-100, virtual_tokens)
                            .chain(row)
                            .collect()
                    })
                    .collect();
                Ok(V::Ints(padded))
            }
            Op::Embedding { table } => {
                let ids = self.input(n, 0)?.ints("ids")?.clone();
                let (b, s) = (ids.len(), ids.first().map_or(0, Vec::len));
                let w = self.p2(table)?;
                let tape = self.take_tape();
                let Some(&(lo, hi)) = self.ops.vocab_rows.get(&n) else {
                    let flat: Vec<usize> =
                        ids.iter().flatten().map(|&i| i.max(0) as usize).collect();
                    let idx: Tensor<(usize, usize), usize, Dev> =
                        self.dev.tensor_from_vec(flat, (b, s));
                    let out: T3Taped = w.put_tape(tape).gather(idx);
                    return Ok(self.keep3(out));
                };
                // Vocabulary-parallel: this rank's rows, zeros for ids another rank holds (the
                // all-reduce that follows adds the right row).
                let local = |i: i64| (i.max(0) as usize).checked_sub(lo).filter(|&r| r < hi - lo);
                let flat: Vec<usize> = ids
                    .iter()
                    .flatten()
                    .map(|&i| local(i).unwrap_or(0))
                    .collect();
                let held: Vec<f32> = ids
                    .iter()
                    .flatten()
                    .map(|&i| if local(i).is_some() { 1.0 } else { 0.0 })
                    .collect();
                let idx: Tensor<(usize, usize), usize, Dev> =
                    self.dev.tensor_from_vec(flat, (b, s));
                let d = w.shape().1;
                let held: T2 = self.dev.tensor_from_vec(held, (b, s));
                let out: T3Taped = w.put_tape(tape).gather(idx);
                Ok(self.keep3(out * held.broadcast_like::<_, Axis<2>>(&(b, s, d))))
            }
            Op::PositionEmbedding { table, offset } => {
                let x = self.input(n, 0)?.r3("x")?;
                let (b, s, d) = *x.shape();
                let w = self.p2(table)?;
                let tape = self.take_tape();
                let rows = w
                    .put_tape(tape)
                    .slice((offset as usize..offset as usize + s, ..))
                    .reshape_like(&(s, d));
                let out = rows.broadcast_like::<_, Axis<0>>(&(b, s, d));
                Ok(self.keep3(out))
            }
            Op::VirtualTokens { table } => {
                let x = self.input(n, 0)?;
                let b = match x {
                    V::Ints(v) => v.len(),
                    V::R3(t) => t.shape().0,
                    _ => return err("virtual tokens need the batch"),
                };
                let w = self.p2(table)?;
                let p = w.shape().0;
                // Repeated over the batch as I·w per row: a product, whose backward sums the
                // rows' gradients into the table (a broadcast consumed by several slices did not).
                let mut eye = vec![0.0f32; b * p * p];
                for r in 0..b {
                    for i in 0..p {
                        eye[(r * p + i) * p + i] = 1.0;
                    }
                }
                let eye: T3 = self.dev.tensor_from_vec(eye, (b, p, p));
                let tape = self.take_tape();
                let out = eye.put_tape(tape).matmul(w);
                Ok(self.keep3(out))
            }
            Op::Add | Op::Mul => {
                let inputs = self.g.inputs(n);
                // The same tensor on both sides of one op would break dfdx's backward.
                let same = inputs.first() == inputs.get(1);
                let add = matches!(op, Op::Add);
                match (self.input(n, 0)?.clone(), self.input(n, 1)?.clone()) {
                    (V::R3(a), V::R3(b)) => {
                        let out = combine(a.put_tape(self.take_tape()), b, add, same);
                        Ok(self.keep3(out))
                    }
                    (V::R2(a), V::R2(b)) => {
                        let out = combine(a.put_tape(self.take_tape()), b, add, same);
                        Ok(self.keep2(out))
                    }
                    _ => err("add/mul of unlike tensors"),
                }
            }
            Op::Scale { factor } => {
                let x = self.input(n, 0)?.r3("x")?;
                let tape = self.take_tape();
                Ok(self.keep3(x.put_tape(tape) * factor as f32))
            }
            Op::ScaleBy { param } => {
                let x = self.input(n, 0)?.r3("x")?;
                let v = self.p1(param)?;
                let shape = *x.shape();
                let tape = self.take_tape();
                Ok(self.keep3(x.put_tape(tape) * v.broadcast_like::<_, Axes2<0, 1>>(&shape)))
            }
            Op::LayerNorm { weight, bias, eps } => {
                let x = self.input(n, 0)?.r3("x")?;
                let w = self.p1(weight)?;
                let tape = self.take_tape();
                #[cfg(not(feature = "cuda"))]
                {
                    let bias = match bias {
                        Some(b) => Some(self.vector(b)?),
                        None => None,
                    };
                    let w = crate::exec::kernels::Vector {
                        v: w,
                        trainable: self.g.params[weight].trainable,
                    };
                    let y = crate::exec::kernels::layer_norm(x.put_tape(tape), w, bias, eps as f32)
                        .map_err(ExecError)?;
                    Ok(self.keep3(y))
                }
                #[cfg(feature = "cuda")]
                {
                    let shape = *x.shape();
                    let mut y = x.put_tape(tape).normalize::<Axis<2>>(eps as f32)
                        * w.broadcast_like::<_, Axes2<0, 1>>(&shape);
                    if let Some(b) = bias {
                        y = y + self.p1(b)?.broadcast_like::<_, Axes2<0, 1>>(&shape);
                    }
                    Ok(self.keep3(y))
                }
            }
            Op::RmsNorm { weight, eps } => {
                let x = self.input(n, 0)?.r3("x")?;
                let shape = *x.shape();
                let w = self.p1(weight)?;
                let tape = self.take_tape();
                let x = x.put_tape(tape);
                let (xs, tape) = x.split_tape();
                let ms = xs
                    .clone()
                    .put_tape(tape)
                    .square()
                    .mean::<(usize, usize), Axis<2>>();
                let inv = (ms + eps as f32)
                    .sqrt()
                    .recip()
                    .broadcast_like::<_, Axis<2>>(&shape);
                let y = inv * xs * w.broadcast_like::<_, Axes2<0, 1>>(&shape);
                Ok(self.keep3(y))
            }
            Op::Linear {
                weight,
                bias,
                layout,
                ..
            } => {
                let x = self.input(n, 0)?.clone();
                // A partial sum gets the bias once, from rank 0.
                let bias = bias.filter(|_| self.ops.rank == 0 || !self.ops.bias_once.contains(&n));
                let outputs = match weight.outputs {
                    Some(_) => self
                        .ops
                        .slices
                        .get(&n)
                        .copied()
                        .or(weight.outputs.map(|(a, e)| (a as usize, e as usize))),
                    None => None,
                };
                self.linear(x, weight.id, bias, layout, outputs)
            }
            Op::Slice { start, len } => {
                let (start, end) = self
                    .ops
                    .slices
                    .get(&n)
                    .copied()
                    .unwrap_or((start as usize, (start + len) as usize));
                match self.input(n, 0)?.clone() {
                    V::R3(x) => {
                        let x = x.put_tape(self.take_tape());
                        #[cfg(not(feature = "cuda"))]
                        let y = crate::exec::kernels::columns(x, start, end).map_err(ExecError)?;
                        #[cfg(feature = "cuda")]
                        let y = x.slice((.., .., start..end)).realize();
                        Ok(self.keep3(y))
                    }
                    _ => err("slice of a non-rank-3 tensor"),
                }
            }
            Op::Concat { axis } => {
                let (a, b) = (self.input(n, 0)?.r3("a")?, self.input(n, 1)?.r3("b")?);
                if axis != 1 {
                    return err("concatenation only along the sequence axis");
                }
                let tape = self.take_tape();
                let out: Tensor<(usize, usize, usize), f32, Dev, Tape> =
                    (a.put_tape(tape), b).concat_along(Axis::<1>);
                Ok(self.keep3(out))
            }
            Op::Rotary {
                theta,
                head_dim,
                offset,
            } => {
                let x = self.input(n, 0)?.r3("x")?;
                self.rotary(x, theta, head_dim as usize, offset as usize)
            }
            Op::Attention {
                head_dim,
                causal,
                dropout,
                ..
            } => {
                let (q, k, v) = (
                    self.input(n, 0)?.r3("q")?,
                    self.input(n, 1)?.r3("k")?,
                    self.input(n, 2)?.r3("v")?,
                );
                self.attention(q, k, v, head_dim as usize, causal, dropout)
            }
            Op::Lstm {
                hidden,
                layers,
                bidirectional,
                params,
            } => {
                let x = self.input(n, 0)?.r3("x")?;
                self.lstm(x, hidden as usize, layers as usize, bidirectional, &params)
            }
            Op::Activation { act } => match self.input(n, 0)?.clone() {
                V::R3(x) => {
                    let y = activate(x.put_tape(self.take_tape()), act);
                    Ok(self.keep3(y))
                }
                V::R2(x) => {
                    let y = activate(x.put_tape(self.take_tape()), act);
                    Ok(self.keep2(y))
                }
                _ => err("activation of an unsupported rank"),
            },
            Op::Dropout { p } => {
                let x = self.input(n, 0)?.r3("x")?;
                let (b, s, d) = *x.shape();
                // On a share of the sequence: this rank's positions of the whole rows.
                let first = if self.ops.sequence.contains(&n) {
                    self.ops.rank * s
                } else {
                    0
                };
                let Some(keep) = self.dropout_keep(p, b, first * d, s * d)? else {
                    return Ok(V::R3(x));
                };
                let x = x.put_tape(self.take_tape());
                #[cfg(not(feature = "cuda"))]
                let out =
                    crate::exec::kernels::dropout(x, keep, dropout_scale(p)).map_err(ExecError)?;
                #[cfg(feature = "cuda")]
                let out = {
                    x * self
                        .dev
                        .tensor_from_vec(dropout_factors(keep, p), (b, s, d))
                };
                Ok(self.keep3(out))
            }
            Op::SelectToken { pick } => {
                let x = self.input(n, 0)?.r3("x")?;
                let (b, s, d) = *x.shape();
                let positions: Vec<usize> = match pick {
                    Pick::First => vec![0; b],
                    Pick::Mask => self
                        .batch
                        .mask_positions
                        .clone()
                        .ok_or_else(|| ExecError("the batch has no mask positions".into()))?,
                    Pick::Last => match &self.batch.attention_mask {
                        Some(m) => m
                            .iter()
                            .map(|row| row.iter().rposition(|&v| v != 0).unwrap_or(0))
                            .collect(),
                        None => vec![s - 1; b],
                    },
                };
                if positions.len() != b || positions.iter().any(|&p| p >= s) {
                    return err("token positions do not fit the batch");
                }
                // [b, s, d] → [b, d, s], then pick one position per row for every feature.
                let idx: Tensor<(usize, usize), usize, Dev> = self.dev.tensor_from_vec(
                    positions
                        .iter()
                        .flat_map(|&p| std::iter::repeat_n(p, d))
                        .collect(),
                    (b, d),
                );
                let tape = self.take_tape();
                let out: Tensor<(usize, usize), f32, Dev, Tape> =
                    x.put_tape(tape).permute::<_, Axes3<0, 2, 1>>().select(idx);
                Ok(self.keep2(out))
            }
            Op::GatherClasses { .. } => {
                let x = self.input(n, 0)?.r2("logits")?;
                let ids = self
                    .batch
                    .class_token_ids
                    .clone()
                    .ok_or_else(|| ExecError("the batch has no verbalizer token ids".into()))?;
                let c = ids.len();
                let idx: Tensor<(usize,), usize, Dev> = self.dev.tensor_from_vec(ids, (c,));
                let tape = self.take_tape();
                let picked: Tensor<(usize, usize), f32, Dev, Tape> =
                    x.put_tape(tape).permute::<_, Axes2<1, 0>>().gather(idx);
                Ok(self.keep2(picked.permute::<_, Axes2<1, 0>>()))
            }
            Op::CrossEntropy { .. } => self.cross_entropy(n, None),
            Op::WeightedSum { weights } => {
                let mut parts = Vec::new();
                for (i, w) in weights.iter().enumerate() {
                    parts.push((self.input(n, i)?.scalar("loss")?, *w as f32));
                }
                let mut iter = parts.into_iter();
                let Some((first, w0)) = iter.next() else {
                    return err("empty weighted sum");
                };
                let mut total = first.put_tape(self.take_tape()) * w0;
                for (t, w) in iter {
                    // The tape goes on the left of every product, so each term is recorded.
                    let (sum, tape) = total.split_tape();
                    total = t.put_tape(tape) * w + sum;
                }
                Ok(self.keep0(total))
            }
            Op::PairwiseLoss => {
                // Rows alternate chosen, rejected: −log σ(r_chosen − r_rejected), averaged.
                let rewards = self.input(n, 0)?.r2("rewards")?;
                let rows = rewards.shape().0;
                if rows % 2 != 0 {
                    return err("a reward batch holds chosen/rejected pairs: it needs an even number of rows");
                }
                let pairs = rows / 2;
                let (x, tape) = rewards
                    .put_tape(self.take_tape())
                    .reshape_like(&(pairs, 2))
                    .split_tape();
                let (chosen, tape) = x
                    .clone()
                    .put_tape(tape)
                    .slice((.., 0..1))
                    .realize::<(usize, usize)>()
                    .split_tape();
                let (rejected, tape) = x
                    .put_tape(tape)
                    .slice((.., 1..2))
                    .realize::<(usize, usize)>()
                    .split_tape();
                let margin = chosen.put_tape(tape) - rejected;
                let loss = (margin.negate().exp() + 1.0).ln().mean::<(), _>();
                Ok(self.keep0(loss))
            }
            Op::TokenLogProbs => self.token_log_probs(n, None),
            Op::PpoLoss {
                clip,
                value_clip,
                value_coef,
                ..
            } => {
                let logp = self.input(n, 0)?.r2("log-probs")?;
                let values = self.input(n, 2)?.r3("values")?;
                let rollout = self.input(n, 3)?.r3("rollout")?;
                // Response tokens are where the policy's log-probs have a taken token.
                let taken = self.g.inputs(self.g.inputs(n)[0])[1];
                if self.values[taken.index()].is_none() {
                    self.compute(taken)?;
                }
                let response: Vec<bool> = self.values[taken.index()]
                    .as_ref()
                    .ok_or_else(|| ExecError("the taken tokens are not computed".into()))?
                    .ints("tokens")?
                    .iter()
                    .flatten()
                    .map(|&t| t >= 0)
                    .collect();
                let knobs = PpoKnobs {
                    clip: clip as f32,
                    value_clip: value_clip as f32,
                    value_coef: value_coef as f32,
                };
                self.ppo_loss(logp, values, rollout, &response, knobs)
            }
            other => err(format!(
                "the CPU executor does not run `{}` yet",
                other.kind()
            )),
        }
    }

    /// `x·W + b` (or `x·Wᵀ + b`); `outputs` takes a range of the product's features.
    fn linear(
        &mut self,
        x: V,
        weight: usize,
        bias: Option<ParamRef>,
        layout: Layout,
        outputs: Option<(usize, usize)>,
    ) -> Result<V, ExecError> {
        // A pooled [b, d] input runs as [b, 1, d].
        let pooled = matches!(x, V::R2(_));
        let x = match x {
            V::R2(t) => {
                let (b, d) = *t.shape();
                let (t, tape) = t
                    .put_tape(self.take_tape())
                    .reshape_like(&(b, 1, d))
                    .split_tape();
                self.tape = tape;
                t
            }
            other => other.r3("x")?,
        };
        let w = self.p2(weight)?;
        let tape = self.take_tape();
        let x = x.put_tape(tape);
        #[cfg(not(feature = "cuda"))]
        let y = {
            let bias = match bias {
                Some(b) => Some(self.vector(b.id)?),
                None => None,
            };
            let w = crate::exec::kernels::Weight {
                w,
                out_in: matches!(layout, Layout::OutIn),
                trainable: self.g.params[weight].trainable,
            };
            crate::exec::kernels::linear(x, w, bias, outputs).map_err(ExecError)?
        };
        #[cfg(feature = "cuda")]
        let y = {
            let (b, s, _) = *x.shape();
            let y = match layout {
                Layout::InOut => x.matmul(w),
                Layout::OutIn => x.matmul(w.permute::<_, Axes2<1, 0>>()),
            };
            let n = y.shape().2;
            let y = match bias {
                Some(bias) => {
                    y + self
                        .p1(bias.id)?
                        .broadcast_like::<_, Axes2<0, 1>>(&(b, s, n))
                }
                None => y,
            };
            // A range of a fused weight (GPT-2's c_attn read as q, k, v): the full product,
            // sliced.
            match outputs {
                Some((a, e)) => y.slice((.., .., a..e)).realize(),
                None => y,
            }
        };
        let b = y.shape().0;
        if pooled {
            let n = y.shape().2;
            return Ok(self.keep2(y.reshape_like(&(b, n))));
        }
        Ok(self.keep3(y))
    }

    /// LLaMA's rotary embedding: x·cos + rotate_half(x)·sin per head, positions from `offset`.
    /// rotate_half is a product with a fixed [d, d] matrix (−x₂, x₁), which keeps the backward
    /// to matmuls and elementwise products.
    fn rotary(&mut self, x: T3, theta: f64, d: usize, offset: usize) -> Result<V, ExecError> {
        let (b, s, width) = *x.shape();
        let h = width / d;
        let half = d / 2;
        // One table for every row of the batch (broadcast, not copied).
        let mut cos = Vec::with_capacity(s * width);
        let mut sin = Vec::with_capacity(s * width);
        for pos in offset..offset + s {
            for _ in 0..h {
                for j in 0..d {
                    let angle = pos as f64 / theta.powf((2 * (j % half)) as f64 / d as f64);
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let mut turn = vec![0.0f32; d * d];
        for j in 0..half {
            turn[(j + half) * d + j] = -1.0;
            turn[j * d + j + half] = 1.0;
        }
        let rows = (b, s * h, d);
        let cos: T3 = self
            .dev
            .tensor_from_vec(cos, (s * h, d))
            .broadcast_like::<_, Axis<0>>(&rows);
        let sin: T3 = self
            .dev
            .tensor_from_vec(sin, (s * h, d))
            .broadcast_like::<_, Axis<0>>(&rows);
        let turn: T2 = self.dev.tensor_from_vec(turn, (d, d));
        let (x, tape) = x
            .put_tape(self.take_tape())
            .reshape_like(&rows)
            .split_tape();
        let (turned, tape) = (x.clone().put_tape(tape).matmul(turn) * sin).split_tape();
        let y = (x.put_tape(tape) * cos + turned).reshape_like(&(b, s, width));
        Ok(self.keep3(y))
    }

    /// torch.nn.LSTM (batch first, zero initial state) over `x`: per layer and direction, the
    /// gates i, f, g, o = x·W_ihᵀ + b_ih + h·W_hhᵀ + b_hh; c = σ(f)·c + σ(i)·tanh(g);
    /// h = σ(o)·tanh(c). A bidirectional layer's output is both directions' h side by side;
    /// `params` are PyTorch's (weight_ih, weight_hh, bias_ih, bias_hh) per layer and direction.
    fn lstm(
        &mut self,
        x: T3,
        hidden: usize,
        layers: usize,
        bidirectional: bool,
        params: &[usize],
    ) -> Result<V, ExecError> {
        let (b, steps, _) = *x.shape();
        let directions = if bidirectional { 2 } else { 1 };
        if params.len() != 4 * layers * directions {
            return err("the LSTM's parameters do not match its layers");
        }
        let mut input = x;
        for layer in 0..layers {
            let mut outputs: Vec<T3> = Vec::with_capacity(directions);
            for direction in 0..directions {
                let at = 4 * (layer * directions + direction);
                let w_ih = self.p2(params[at])?;
                let w_hh = self.p2(params[at + 1])?;
                let b_ih = self.p1(params[at + 2])?;
                let b_hh = self.p1(params[at + 3])?;
                let gates_shape = (b, steps, 4 * hidden);
                // The input's part of every step's gates at once.
                let tape = self.take_tape();
                let xw = input
                    .clone()
                    .put_tape(tape)
                    .matmul(w_ih.permute::<_, Axes2<1, 0>>())
                    + b_ih.broadcast_like::<_, Axes2<0, 1>>(&gates_shape)
                    + b_hh.broadcast_like::<_, Axes2<0, 1>>(&gates_shape);
                let (xw, tape) = xw.split_tape();
                self.tape = tape;
                let order: Vec<usize> = if direction == 0 {
                    (0..steps).collect()
                } else {
                    (0..steps).rev().collect()
                };
                let (mut h, mut c): (Option<T3>, Option<T3>) = (None, None);
                let mut states = Vec::with_capacity(steps);
                for t in order {
                    let tape = self.take_tape();
                    let step = xw
                        .clone()
                        .put_tape(tape)
                        .slice((.., t..t + 1, ..))
                        .realize();
                    let gates = match &h {
                        Some(prev) => {
                            let (step, tape) = step.split_tape();
                            prev.clone()
                                .put_tape(tape)
                                .matmul(w_hh.clone().permute::<_, Axes2<1, 0>>())
                                + step
                        }
                        None => step,
                    };
                    let (gates, tape) = gates.split_tape();
                    let gate = |k: usize, tape: Tape| -> T3Taped {
                        gates
                            .clone()
                            .put_tape(tape)
                            .slice((.., .., k * hidden..(k + 1) * hidden))
                            .realize()
                    };
                    let (i, tape) = gate(0, tape).sigmoid().split_tape();
                    let (f, tape) = gate(1, tape).sigmoid().split_tape();
                    let (g, tape) = gate(2, tape).tanh().split_tape();
                    let (o, tape) = gate(3, tape).sigmoid().split_tape();
                    let cell = i.put_tape(tape) * g;
                    let cell = match c.take() {
                        Some(prev) => {
                            let (ig, tape) = cell.split_tape();
                            f.put_tape(tape) * prev + ig
                        }
                        None => cell,
                    };
                    let (cell, tape) = cell.split_tape();
                    let (squashed, tape) = cell.clone().put_tape(tape).tanh().split_tape();
                    let (state, tape) = (o.put_tape(tape) * squashed).split_tape();
                    self.tape = tape;
                    states.push(state.clone());
                    h = Some(state);
                    c = Some(cell);
                }
                if direction == 1 {
                    states.reverse();
                }
                let tape = self.take_tape();
                let mut states = states.into_iter();
                let first = states
                    .next()
                    .ok_or_else(|| ExecError("an LSTM over no steps".into()))?;
                let mut sequence: T3Taped = first.put_tape(tape);
                for state in states {
                    sequence = (sequence, state).concat_along(Axis::<1>);
                }
                let (sequence, tape) = sequence.split_tape();
                self.tape = tape;
                outputs.push(sequence);
            }
            let mut outputs = outputs.into_iter();
            let forward = outputs
                .next()
                .ok_or_else(|| ExecError("an LSTM layer with no direction".into()))?;
            input = match outputs.next() {
                Some(backward) => {
                    let tape = self.take_tape();
                    let (both, tape) = (forward.put_tape(tape), backward)
                        .concat_along(Axis::<2>)
                        .split_tape();
                    self.tape = tape;
                    both
                }
                None => forward,
            };
        }
        Ok(V::R3(input))
    }

    /// Scaled dot-product attention with causal and padding masks over heads of `d` features.
    fn attention(
        &mut self,
        q: T3,
        k: T3,
        v: T3,
        d: usize,
        causal: bool,
        dropout: f64,
    ) -> Result<V, ExecError> {
        let (b, s, width) = *q.shape();
        let skv = k.shape().1;
        // The heads this rank holds (all of them without tensor parallelism).
        let (heads, kv_heads) = (width / d, k.shape().2 / d);
        // Keys without a query of their own (prefixes) come first: query i sees keys up to i + P.
        let past = skv - s;
        let mut mask = vec![0.0f32; b * s * skv];
        let padding = self.batch.attention_mask.clone();
        for r in 0..b {
            for i in 0..s {
                for j in 0..skv {
                    let future = causal && j > i + past;
                    // The batch mask covers the last keys (the real tokens); keys before them
                    // (prefixes, virtual tokens) are always visible.
                    let pad = padding.as_ref().is_some_and(|m| {
                        let real = j as i64 - (skv - m[r].len().min(skv)) as i64;
                        real >= 0 && m[r][real as usize] == 0
                    });
                    if future || pad {
                        mask[(r * s + i) * skv + j] = MASKED;
                    }
                }
            }
        }
        // A rank holding some of the heads drops what one device would in those heads: the
        // rows' elements from its first head's on.
        let first = self.ops.rank * heads;
        let plane = s * skv;
        let dropout = self.dropout_values(dropout, b, first * plane, heads * plane)?;
        #[cfg(not(feature = "cuda"))]
        {
            if kv_heads == 0 || heads % kv_heads != 0 {
                return err(format!(
                    "{heads} query heads over {kv_heads} key/value heads"
                ));
            }
            let dims = crate::exec::kernels::Heads {
                heads,
                kv_heads,
                dim: d,
            };
            let q = q.put_tape(self.take_tape());
            let out =
                crate::exec::kernels::attention(q, k, v, dims, mask, dropout).map_err(ExecError)?;
            Ok(self.keep3(out))
        }
        #[cfg(feature = "cuda")]
        {
            let group = heads / kv_heads.max(1);
            let mask: T4 = self
                .dev
                .tensor_from_vec(mask, (b, s, skv))
                .broadcast_like::<_, Axis<1>>(&(b, heads, s, skv));
            let tape = self.take_tape();
            let q = q
                .put_tape(tape)
                .reshape_like(&(b, s, heads, d))
                .permute::<_, Axes4<0, 2, 1, 3>>();
            let (q, tape) = q.split_tape();
            // Keys and values to [b, heads, s_kv, d], each key/value head serving `group` query
            // heads (head h reads key/value head h / group): a gather over the head axis, on the tape.
            let dev = self.dev.clone();
            let expand = |t: T3, tape: Tape| -> (T4, Tape) {
                let t = t.put_tape(tape).reshape_like(&(b, skv, kv_heads, d));
                if group == 1 {
                    return t.permute::<_, Axes4<0, 2, 1, 3>>().split_tape();
                }
                let by_head = t
                    .permute::<_, Axes4<2, 0, 1, 3>>()
                    .reshape_like(&(kv_heads, b * skv * d));
                let idx: Tensor<(usize,), usize, Dev> =
                    dev.tensor_from_vec((0..heads).map(|h| h / group).collect(), (heads,));
                let repeated: Tensor<(usize, usize), f32, Dev, Tape> = by_head.gather(idx);
                repeated
                    .reshape_like(&(heads, b, skv, d))
                    .permute::<_, Axes4<1, 0, 2, 3>>()
                    .split_tape()
            };
            let (k, tape) = expand(k, tape);
            let (v, tape) = expand(v, tape);
            let scores =
                q.put_tape(tape).matmul(k.permute::<_, Axes4<0, 1, 3, 2>>()) / (d as f32).sqrt();
            let probs = (scores + mask).softmax::<Axis<3>>();
            let probs = match dropout {
                Some(m) => probs * self.dev.tensor_from_vec(m, (b, heads, s, skv)),
                None => probs,
            };
            let out = probs
                .matmul(v)
                .permute::<_, Axes4<0, 2, 1, 3>>()
                .reshape_like(&(b, s, heads * d));
            Ok(self.keep3(out))
        }
    }

    /// Cross-entropy node `n`: over every position of `[b, s, vocab]` logits (shifted for
    /// causal LM), or over `[b, classes]` logits; with a shard, of this rank's columns of the
    /// vocabulary (see [`VocabShard`]).
    fn cross_entropy(&mut self, n: NodeIndex, shard: Option<VocabShard>) -> Result<V, ExecError> {
        let Op::CrossEntropy { shift } = self.g.dag[n].op else {
            return err("not a cross-entropy");
        };
        let labels = self.input(n, 1)?.ints("labels")?.clone();
        let count = self.batch.label_counts.get(&n).copied();
        match self.input(n, 0)?.clone() {
            V::R3(logits) => self.token_cross_entropy(logits, &labels, shift, count, shard),
            V::R2(logits) => {
                let (b, c) = *logits.shape();
                // Reshaping may copy: do it on the tape so the gradient reaches `logits`.
                let (logits, tape) = logits
                    .put_tape(self.take_tape())
                    .reshape_like(&(b, 1, c))
                    .split_tape();
                self.tape = tape;
                self.token_cross_entropy(logits, &labels, false, count, shard)
            }
            _ => err("cross-entropy of an unsupported rank"),
        }
    }

    /// Cross-entropy summed over positions whose label is not −100, divided by `count` (by
    /// their number when `None`).
    fn token_cross_entropy(
        &mut self,
        logits: T3,
        labels: &[Vec<i64>],
        shift: bool,
        count: Option<f32>,
        shard: Option<VocabShard>,
    ) -> Result<V, ExecError> {
        let (b, s, width) = *logits.shape();
        let vocab = shard.as_ref().map_or(width, |sh| sh.at.vocab);
        let (positions, offset) = if shift { (s - 1, 1) } else { (s, 0) };
        let mut targets = Vec::with_capacity(b * positions);
        let mut weights = Vec::with_capacity(b * positions);
        for label in position_labels(labels, b, positions, offset) {
            if label >= vocab as i64 {
                return err(format!(
                    "label {label} is outside the vocabulary of {vocab}"
                ));
            }
            targets.push(label.max(0) as usize);
            weights.push(if label < 0 { 0.0 } else { 1.0 });
        }
        let count = count.unwrap_or_else(|| weights.iter().sum());
        if count == 0.0 {
            return err("no position has a label");
        }
        #[cfg(not(feature = "cuda"))]
        {
            let logits = logits.put_tape(self.take_tape());
            let loss = crate::exec::kernels::cross_entropy(
                logits, positions, targets, weights, count, shard,
            )
            .map_err(ExecError)?;
            Ok(self.keep0(loss))
        }
        #[cfg(feature = "cuda")]
        {
            // The tensor-parallel layout splits no loss by vocabulary in this build.
            if shard.is_some() {
                return err("vocabulary-parallel cross-entropy runs on the CPU kernels only");
            }
            let targets: Tensor<(usize, usize), usize, Dev> =
                self.dev.tensor_from_vec(targets, (b, positions));
            let weights: T2 = self.dev.tensor_from_vec(weights, (b, positions));
            let tape = self.take_tape();
            let logits = logits.put_tape(tape);
            let logits = if shift {
                logits
                    .slice((.., 0..positions, ..))
                    .realize::<(usize, usize, usize)>()
            } else {
                logits
            };
            let picked: Tensor<(usize, usize), f32, Dev, Tape> =
                logits.log_softmax::<Axis<2>>().select(targets);
            let loss = (picked * weights).sum::<(), _>().negate() / count;
            Ok(self.keep0(loss))
        }
    }

    /// `log softmax(logits)[token]` at each position, 0 where the token is −100.
    fn token_log_probs(&mut self, n: NodeIndex, shard: Option<VocabShard>) -> Result<V, ExecError> {
        let logits = self.input(n, 0)?.r3("logits")?;
        let taken = self.input(n, 1)?.ints("tokens")?.clone();
        let (b, s, width) = *logits.shape();
        let vocab = shard.as_ref().map_or(width, |sh| sh.at.vocab);
        if taken.len() != b || taken.iter().any(|row| row.len() != s) {
            return err("the taken tokens do not match the logits' positions");
        }
        let mut targets = Vec::with_capacity(b * s);
        for &t in taken.iter().flatten() {
            if t >= vocab as i64 {
                return err(format!("token {t} is outside the vocabulary of {vocab}"));
            }
            targets.push(usize::try_from(t).ok());
        }
        let logits = logits.put_tape(self.take_tape());
        #[cfg(not(feature = "cuda"))]
        let out =
            crate::exec::kernels::token_log_probs(logits, targets, shard).map_err(ExecError)?;
        #[cfg(feature = "cuda")]
        let out = {
            // The tensor-parallel layout splits no log-probabilities by vocabulary here.
            if shard.is_some() {
                return err("vocabulary-parallel log-probabilities run on the CPU kernels only");
            }
            let ids = targets.iter().map(|t| t.unwrap_or(0)).collect();
            let used = targets
                .iter()
                .map(|t| if t.is_some() { 1.0 } else { 0.0 })
                .collect();
            let ids: Tensor<(usize, usize), usize, Dev> = self.dev.tensor_from_vec(ids, (b, s));
            let used: T2 = self.dev.tensor_from_vec(used, (b, s));
            let picked: Tensor<(usize, usize), f32, Dev, Tape> =
                logits.log_softmax::<Axis<2>>().select(ids);
            picked * used
        };
        Ok(self.keep2(out))
    }

    /// TRL's PPO loss over the response tokens (`response`, `[b·s]`), as means over them:
    /// max(−A·r, −A·clip(r, 1 ± ε)) with r = exp(log π − log π_old), plus `value_coef` ·
    /// ½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²). The branch each max takes is
    /// decided here from the forward values: the gradient of the max is the gradient of that
    /// branch, and a clipped branch is constant in the parameters, so the taped loss is the
    /// unclipped terms where they win plus constants (same value, same gradient, plain ops on
    /// either device).
    fn ppo_loss(
        &mut self,
        logp: T2,
        values: T3,
        rollout: T3,
        response: &[bool],
        knobs: PpoKnobs,
    ) -> Result<V, ExecError> {
        let (b, s) = *logp.shape();
        if *values.shape() != (b, s, 1) || *rollout.shape() != (b, s, 4) || response.len() != b * s
        {
            return err(format!(
                "log-probs {:?}, values {:?} and rollout {:?} do not match",
                logp.shape(),
                values.shape(),
                rollout.shape()
            ));
        }
        let tokens = response.iter().filter(|&&r| r).count();
        if tokens == 0 {
            return err("the batch has no response token");
        }
        let n = tokens as f32;
        let (lp, v, roll) = (logp.as_vec(), values.as_vec(), rollout.as_vec());
        let PpoKnobs {
            clip,
            value_clip,
            value_coef,
        } = knobs;
        // Per token: the old log-prob, the return, and each unclipped term's weight where it
        // is the max (0 elsewhere); the clipped terms that win add constants.
        let (mut old, mut ret) = (vec![0.0f32; b * s], vec![0.0f32; b * s]);
        let (mut policy_w, mut value_w) = (vec![0.0f32; b * s], vec![0.0f32; b * s]);
        let (mut constant, mut policy, mut value, mut kl) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        let (mut clipped, mut value_clipped) = (0usize, 0usize);
        for i in (0..b * s).filter(|&i| response[i]) {
            let [adv, target, old_lp, old_v] = [0, 1, 2, 3].map(|c| roll[4 * i + c]);
            (old[i], ret[i]) = (old_lp, target);
            let ratio = (lp[i] - old_lp).exp();
            let (free, held) = (-adv * ratio, -adv * ratio.clamp(1.0 - clip, 1.0 + clip));
            if held > free {
                clipped += 1;
                constant += f64::from(held) / f64::from(n);
            } else {
                policy_w[i] = -adv / n;
            }
            policy += f64::from(free.max(held));
            let v_held = old_v + (v[i] - old_v).clamp(-value_clip, value_clip);
            let (free, held) = ((v[i] - target).powi(2), (v_held - target).powi(2));
            if held > free {
                value_clipped += 1;
                constant += f64::from(value_coef * 0.5 * held / n);
            } else {
                value_w[i] = value_coef * 0.5 / n;
            }
            value += f64::from(free.max(held));
            kl += f64::from((lp[i] - old_lp).powi(2));
        }
        let tokens = tokens as f64;
        self.stats = Stats::from([
            ("policy_loss", (policy / tokens) as f32),
            ("value_loss", (0.5 * value / tokens) as f32),
            ("clip_fraction", (clipped as f64 / tokens) as f32),
            (
                "value_clip_fraction",
                (value_clipped as f64 / tokens) as f32,
            ),
            // TRL's `approxkl` between the sampling policy and this one.
            ("approx_kl", (0.5 * kl / tokens) as f32),
        ]);
        let tensor = |data: Vec<f32>| -> T2 { self.dev.tensor_from_vec(data, (b, s)) };
        let (old, ret, policy_w, value_w) =
            (tensor(old), tensor(ret), tensor(policy_w), tensor(value_w));
        let tape = self.take_tape();
        let (policy, tape) = ((logp.put_tape(tape) - old).exp() * policy_w)
            .sum::<(), _>()
            .split_tape();
        let values = values.put_tape(tape).reshape_like(&(b, s));
        let value = ((values - ret).square() * value_w).sum::<(), _>();
        Ok(self.keep0(value + policy + constant as f32))
    }
}
