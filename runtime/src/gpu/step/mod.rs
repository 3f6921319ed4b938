//! One batch's forward and backward over the whole graph on one device, with Kiln's kernels:
//! what `exec::forward_backward` computes on the CPU, with the same numbers up to summation
//! order (so that the training loop can run either). The forward runs the nodes in
//! topological order and keeps every value (as the CPU's tape does); the backward runs them in
//! reverse, each op adding its inputs' and parameters' gradients from its output's. In bf16 or
//! fp16 the products' operands and results, and the gradients flowing into them, are rounded
//! where the CPU rounds them (`exec::precision`).
//!
//! By family, each with its forward and backward: `dense` (linear layers), `attention`
//! (attention core and rotary embedding), `norm`, `elementwise`, `layout` (embeddings,
//! slices, concatenations), `loss`.

mod attention;
pub(super) mod checks;
mod dense;
mod elementwise;
mod layout;
mod loss;
mod norm;

use super::gemm::Product;
use super::launch::{Buffer, DropoutDraw, Kernels};
use super::memory::Owned;
use super::{Device, GpuError};
use crate::exec::precision::Format;
use crate::exec::{dropout_scale, dropout_threshold, integer_input, Batch, ExecError};
use crate::tensor::HostTensor;
use kiln_compiler::graph::{Act, Graph, InputKind, Op};
use petgraph::graph::NodeIndex;

/// A tensor on the device: its values, row-major, and its shape.
pub(super) struct Tensor<'d, D: Device> {
    data: Owned<'d, D, f32>,
    shape: Vec<usize>,
}

impl<'d, D: Device> Tensor<'d, D> {
    fn zeros(d: &'d D, shape: &[usize]) -> Result<Self, GpuError> {
        Ok(Tensor {
            data: Owned::zeros(d, shape.iter().product())?,
            shape: shape.to_vec(),
        })
    }

    fn upload(d: &'d D, shape: &[usize], values: &[f32]) -> Result<Self, GpuError> {
        Ok(Tensor {
            data: Owned::upload(d, values)?,
            shape: shape.to_vec(),
        })
    }

    fn buffer(&self) -> Buffer<'_, f32> {
        self.data.buffer()
    }

    fn len(&self) -> usize {
        self.data.len()
    }

    /// The last axis's extent (1 for a scalar).
    fn width(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Rows of the last axis.
    fn rows(&self) -> usize {
        self.len().checked_div(self.width()).unwrap_or(0)
    }
}

/// A node's value: a tensor on the device, a batch's integers (on the host until an op
/// uploads what it reads), or a scalar loss (on the host: the step reports it).
pub(super) enum Value<'d, D: Device> {
    Tensor(Tensor<'d, D>),
    Ints(Vec<Vec<i64>>),
    Scalar(f32),
}

/// A node's gradient: of a tensor, or of a scalar.
pub(super) enum Grad<'d, D: Device> {
    Tensor(Tensor<'d, D>),
    Scalar(f32),
}

/// Each batch row's dropout key for one node, on the device, and the mask's probability.
pub(super) struct RowKeys<'d, D: Device> {
    keys: Owned<'d, D, u64>,
    threshold: u64,
    scale: f32,
}

impl<D: Device> RowKeys<'_, D> {
    /// The draw of elements from `offset` on in each row.
    fn draw(&self, offset: u64) -> DropoutDraw<'_> {
        DropoutDraw {
            row_keys: self.keys.buffer(),
            threshold: self.threshold,
            offset,
            scale: self.scale,
        }
    }
}

/// What a node's backward needs beyond its inputs' values and its output's gradient (each
/// family's own).
pub(super) enum Saved<'d, D: Device> {
    Nothing,
    Dense(dense::Saved<'d, D>),
    Attention(Box<attention::Saved<'d, D>>),
    Rotary(attention::RotaryTables<'d, D>),
    Norm(Owned<'d, D, f32>),
    Dropout(Option<Owned<'d, D, f32>>),
    Rows(super::tensor_ops::RowIndex<'d, D>),
    Loss(loss::Saved<'d, D>),
}

/// The parameters on the device for a step's microbatches: those the graph reads, in the
/// run's number format (the working copies of the f32 masters), and the trainable ones'
/// gradients, summed over the microbatches in f32.
struct Weights<'d, D: Device> {
    params: Vec<Option<Tensor<'d, D>>>,
    grads: Vec<Option<Tensor<'d, D>>>,
}

impl<'d, D: Device> Weights<'d, D> {
    /// The weights, with zero gradients for the trainable ones when `train`.
    fn upload(
        d: &'d D,
        g: &Graph,
        values: &[HostTensor],
        format: Format,
        train: bool,
    ) -> Result<Self, GpuError> {
        let mut read = vec![false; g.params.len()];
        for n in g.dag.node_indices() {
            for id in g.dag[n].op.params() {
                read[id] = true;
            }
        }
        let mut params = Vec::with_capacity(g.params.len());
        let mut grads = Vec::with_capacity(g.params.len());
        for (id, meta) in g.params.iter().enumerate() {
            let host = values.get(id).filter(|v| read[id] && !v.data.is_empty());
            let Some(host) = host else {
                if read[id] {
                    return Err(GpuError(format!("parameter `{}` has no values", meta.name)));
                }
                params.push(None);
                grads.push(None);
                continue;
            };
            let mut data = host.data.clone();
            format.round_all(&mut data);
            params.push(Some(Tensor::upload(d, &host.shape, &data)?));
            grads.push(match meta.trainable && train {
                true => Some(Tensor::zeros(d, &host.shape)?),
                false => None,
            });
        }
        Ok(Weights { params, grads })
    }
}

/// One microbatch's state: the graph, the batch, the weights on the device, each node's
/// value, what its backward needs, and the gradients so far.
pub(super) struct Step<'g, 'w, 'd, D: Device> {
    d: &'d D,
    g: &'g Graph,
    batch: &'g Batch,
    format: Format,
    weights: &'w Weights<'d, D>,
    values: Vec<Option<Value<'d, D>>>,
    saved: Vec<Saved<'d, D>>,
    grads: Vec<Option<Grad<'d, D>>>,
    /// Whether a node's gradient reaches a trainable parameter.
    needs_grad: Vec<bool>,
}

/// What a step's microbatches computed: each one's loss, in order (the last not finite where
/// they stopped), and the parameters' gradients summed over them.
pub struct Microbatches {
    pub losses: Vec<f32>,
    pub grads: Vec<Option<Vec<f32>>>,
}

/// Runs forward and backward of each of `batches` in turn over the whole graph on `d`, the
/// parameters uploaded once and their gradients summed on the device, each backward from
/// `upstream` as the loss's gradient (1, or fp16's loss scale). Stops at a loss that is not
/// finite, without its backward: the caller says what it means for the run.
pub fn forward_backward<D: Device>(
    d: &D,
    g: &Graph,
    values: &[HostTensor],
    batches: &[Batch],
    format: Format,
    upstream: f32,
) -> Result<Microbatches, ExecError> {
    let weights = Weights::upload(d, g, values, format, true).map_err(gpu)?;
    let mut losses = Vec::with_capacity(batches.len());
    for batch in batches {
        let loss = Step::new(d, g, batch, format, &weights).run(Some(upstream))?;
        losses.push(loss);
        if !loss.is_finite() {
            break;
        }
    }
    let grads = weights
        .grads
        .iter()
        .map(|grad| grad.as_ref().map(|t| t.data.download()).transpose())
        .collect::<Result<_, _>>()
        .map_err(gpu)?;
    Ok(Microbatches { losses, grads })
}

/// The loss of each of `batches` over the whole graph on `d`, forward only (evaluation), the
/// parameters uploaded once.
pub fn losses<D: Device>(
    d: &D,
    g: &Graph,
    values: &[HostTensor],
    batches: &[Batch],
    format: Format,
) -> Result<Vec<f32>, ExecError> {
    let weights = Weights::upload(d, g, values, format, false).map_err(gpu)?;
    batches
        .iter()
        .map(|batch| Step::new(d, g, batch, format, &weights).run(None))
        .collect()
}

/// The module that computes an op, forward and backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Input,
    Dense,
    Attention,
    Norm,
    Elementwise,
    Layout,
    Loss,
}

/// The family of `op`, or why the GPU executor does not run it yet.
fn family(op: &Op) -> Result<Family, String> {
    Ok(match op {
        Op::Input { kind } if *kind != InputKind::Rollout => Family::Input,
        Op::Linear { .. } => Family::Dense,
        Op::Attention { .. } | Op::Rotary { .. } => Family::Attention,
        Op::LayerNorm { .. } | Op::RmsNorm { .. } => Family::Norm,
        Op::Activation {
            act: Act::Relu | Act::Tanh,
        } => {
            return Err(
                "the GPU executor has no ReLU or tanh kernel yet (GELU and SiLU only)".into(),
            )
        }
        Op::Add
        | Op::Mul
        | Op::Scale { .. }
        | Op::ScaleBy { .. }
        | Op::Activation { .. }
        | Op::Dropout { .. } => Family::Elementwise,
        Op::Embedding { .. }
        | Op::PositionEmbedding { .. }
        | Op::VirtualTokens { .. }
        | Op::Slice { .. }
        | Op::Concat { .. } => Family::Layout,
        Op::CrossEntropy { .. } | Op::WeightedSum { .. } => Family::Loss,
        other => {
            return Err(format!(
                "the GPU executor does not run `{}` yet",
                other.kind()
            ))
        }
    })
}

/// Whether the GPU executor runs every op of `g` (else, the first it does not, by name).
pub fn executable(g: &Graph) -> Result<(), String> {
    for n in g.topo_order() {
        family(&g.dag[n].op).map_err(|why| format!("{} (`{}`)", why, g.dag[n].name))?;
    }
    Ok(())
}

fn gpu(e: GpuError) -> ExecError {
    ExecError(e.0)
}

fn err<T>(message: impl Into<String>) -> Result<T, ExecError> {
    Err(ExecError(message.into()))
}

impl<'g, 'w, 'd, D: Device> Step<'g, 'w, 'd, D> {
    fn new(
        d: &'d D,
        g: &'g Graph,
        batch: &'g Batch,
        format: Format,
        weights: &'w Weights<'d, D>,
    ) -> Self {
        let nodes = g.dag.node_count();
        let mut needs_grad = vec![false; nodes];
        for n in g.topo_order() {
            let op = &g.dag[n].op;
            needs_grad[n.index()] = op.params().into_iter().any(|id| g.params[id].trainable)
                || g.inputs(n).iter().any(|i| needs_grad[i.index()]);
        }
        Step {
            d,
            g,
            batch,
            format,
            weights,
            values: (0..nodes).map(|_| None).collect(),
            saved: (0..nodes).map(|_| Saved::Nothing).collect(),
            grads: (0..nodes).map(|_| None).collect(),
            needs_grad,
        }
    }

    /// The batch's forward, then (for a finite loss, with an `upstream` gradient) its backward
    /// from `upstream`, adding to the weights' gradients; returns the loss.
    fn run(mut self, upstream: Option<f32>) -> Result<f32, ExecError> {
        let g = self.g;
        let Some(loss_node) = g.loss else {
            return err("the graph has no loss");
        };
        let order = g.topo_order();
        for &n in &order {
            let value = self
                .forward(n)
                .map_err(|e| ExecError(format!("{}: {}", g.dag[n].name, e.0)))?;
            self.values[n.index()] = Some(value);
        }
        let loss = match &self.values[loss_node.index()] {
            Some(Value::Scalar(loss)) => *loss,
            _ => return err("the loss is not a scalar"),
        };
        let Some(upstream) = upstream.filter(|_| loss.is_finite()) else {
            return Ok(loss);
        };
        self.grads[loss_node.index()] = Some(Grad::Scalar(upstream));
        for &n in order.iter().rev() {
            if !self.needs_grad[n.index()] {
                continue;
            }
            // Each gradient is complete once every reader of the node has run its backward,
            // and is not needed after the node's own.
            let Some(grad) = self.grads[n.index()].take() else {
                continue;
            };
            self.backward(n, grad)
                .map_err(|e| ExecError(format!("{} (backward): {}", g.dag[n].name, e.0)))?;
        }
        Ok(loss)
    }

    fn kernels(&self) -> Kernels<'_, D> {
        Kernels(self.d)
    }

    /// Computes node `n`'s value, keeping what its backward needs.
    fn forward(&mut self, n: NodeIndex) -> Result<Value<'d, D>, ExecError> {
        let op = self.g.dag[n].op.clone();
        match family(&op).map_err(ExecError)? {
            Family::Input => Ok(Value::Ints(integer_input(self.g, n, self.batch)?)),
            Family::Dense => dense::forward(self, n, &op),
            Family::Attention => attention::forward(self, n, &op),
            Family::Norm => norm::forward(self, n, &op),
            Family::Elementwise => elementwise::forward(self, n, &op),
            Family::Layout => layout::forward(self, n, &op),
            Family::Loss => loss::forward(self, n, &op),
        }
    }

    /// Adds node `n`'s contribution to its inputs' and parameters' gradients.
    fn backward(&mut self, n: NodeIndex, grad: Grad<'d, D>) -> Result<(), ExecError> {
        let op = self.g.dag[n].op.clone();
        let family = family(&op).map_err(ExecError)?;
        let dy = match (family, grad) {
            (Family::Loss, Grad::Scalar(upstream)) => {
                return loss::backward(self, n, &op, upstream)
            }
            (Family::Input, _) => return Ok(()),
            (Family::Loss, _) | (_, Grad::Scalar(_)) => return err("a gradient of the wrong kind"),
            (_, Grad::Tensor(dy)) => dy,
        };
        // The inputs' gradients exist before the family's backward borrows them all.
        self.make_input_grads(n)?;
        let step = &*self;
        match family {
            Family::Dense => dense::backward(step, n, &op, &dy),
            Family::Attention => attention::backward(step, n, &op, &dy),
            Family::Norm => norm::backward(step, n, &op, &dy),
            Family::Elementwise => elementwise::backward(step, n, &op, &dy),
            Family::Layout => layout::backward(step, n, &op, &dy),
            Family::Input | Family::Loss => err("a gradient of the wrong kind"),
        }
    }

    /// The value of node `n`'s input `slot`.
    fn input(&self, n: NodeIndex, slot: usize) -> Result<&Value<'d, D>, ExecError> {
        let i = self.input_node(n, slot)?;
        self.values[i.index()]
            .as_ref()
            .ok_or_else(|| ExecError("input not computed".into()))
    }

    fn input_node(&self, n: NodeIndex, slot: usize) -> Result<NodeIndex, ExecError> {
        self.g
            .inputs(n)
            .get(slot)
            .copied()
            .ok_or_else(|| ExecError(format!("no input {slot}")))
    }

    /// Node `n`'s input `slot` as a tensor.
    fn tensor(&self, n: NodeIndex, slot: usize) -> Result<&Tensor<'d, D>, ExecError> {
        match self.input(n, slot)? {
            Value::Tensor(t) => Ok(t),
            _ => err(format!("input {slot} is not a tensor")),
        }
    }

    /// Node `n`'s input `slot` as integers.
    fn ints(&self, n: NodeIndex, slot: usize) -> Result<&Vec<Vec<i64>>, ExecError> {
        match self.input(n, slot)? {
            Value::Ints(v) => Ok(v),
            _ => err(format!("input {slot} is not the batch's integers")),
        }
    }

    /// Parameter `id` on the device.
    fn param(&self, id: usize) -> Result<&Tensor<'d, D>, ExecError> {
        self.weights.params[id].as_ref().ok_or_else(|| {
            ExecError(format!(
                "parameter `{}` is not on the device",
                self.g.params[id].name
            ))
        })
    }

    /// The gradient of parameter `id`, when it is trained.
    fn param_grad(&self, id: usize) -> Option<Buffer<'_, f32>> {
        self.weights.grads[id].as_ref().map(Tensor::buffer)
    }

    /// The gradient of node `n`'s input `slot`, made (zeros) if none has reached it yet;
    /// `None` when no trainable parameter lies behind the input.
    fn input_grad(
        &mut self,
        n: NodeIndex,
        slot: usize,
    ) -> Result<Option<Buffer<'_, f32>>, ExecError> {
        let i = self.input_node(n, slot)?;
        if !self.needs_grad[i.index()] {
            return Ok(None);
        }
        if self.grads[i.index()].is_none() {
            let shape = match &self.values[i.index()] {
                Some(Value::Tensor(t)) => t.shape.clone(),
                _ => return err(format!("input {slot} has no tensor to take a gradient of")),
            };
            let zeros = Tensor::zeros(self.d, &shape).map_err(gpu)?;
            self.grads[i.index()] = Some(Grad::Tensor(zeros));
        }
        match &self.grads[i.index()] {
            Some(Grad::Tensor(t)) => Ok(Some(t.buffer())),
            _ => err(format!("input {slot}'s gradient is not a tensor")),
        }
    }

    /// Makes sure the gradients of node `n`'s tensor inputs exist (see `input_grad`), so that
    /// a backward can then borrow them all at once.
    fn make_input_grads(&mut self, n: NodeIndex) -> Result<(), ExecError> {
        for slot in 0..self.g.inputs(n).len() {
            if matches!(self.input(n, slot)?, Value::Tensor(_)) {
                self.input_grad(n, slot)?;
            }
        }
        Ok(())
    }

    /// The gradient of input `slot`, after `make_input_grads`.
    fn made_grad(&self, n: NodeIndex, slot: usize) -> Result<Option<Buffer<'_, f32>>, ExecError> {
        let i = self.input_node(n, slot)?;
        match &self.grads[i.index()] {
            Some(Grad::Tensor(t)) => Ok(Some(t.buffer())),
            _ if !self.needs_grad[i.index()] => Ok(None),
            _ => err(format!("input {slot}'s gradient was not made")),
        }
    }

    /// The keys dropout with probability `p` draws node `n`'s masks from, for a value of
    /// `rows` batch rows (`None`: dropout is off for this batch, or `p` is zero).
    fn dropout(
        &self,
        n: NodeIndex,
        p: f64,
        rows: usize,
    ) -> Result<Option<RowKeys<'d, D>>, ExecError> {
        let Some(key) = self.batch.dropout_key(p, rows)? else {
            return Ok(None);
        };
        let keys: Vec<u64> = key.row_keys(n).into_iter().map(|k| k.value()).collect();
        Ok(Some(RowKeys {
            keys: Owned::upload(self.d, &keys).map_err(gpu)?,
            threshold: dropout_threshold(p),
            scale: dropout_scale(p),
        }))
    }

    /// `x` rounded to the run's number format (`None` in f32: `x` as it is).
    fn rounded(&self, x: &Tensor<'d, D>) -> Result<Option<Tensor<'d, D>>, ExecError> {
        if self.format == Format::F32 {
            return Ok(None);
        }
        let y = Tensor::zeros(self.d, &x.shape).map_err(gpu)?;
        self.kernels()
            .round_to_format(x.buffer(), y.buffer(), self.format)
            .map_err(gpu)?;
        Ok(Some(y))
    }

    /// dx += the product's result, rounded like `add_rounded` (the product computed into
    /// dx directly in f32).
    fn add_rounded_product(
        &self,
        product: Product,
        a: Buffer<'_, f32>,
        b: Buffer<'_, f32>,
        dx: Buffer<'_, f32>,
    ) -> Result<(), ExecError> {
        if self.format == Format::F32 {
            return self.d.gemm(product, a, b, dx).map_err(gpu);
        }
        let part = Owned::<D, f32>::zeros(self.d, dx.len()).map_err(gpu)?;
        let product = Product {
            accumulate: false,
            ..product
        };
        self.d.gemm(product, a, b, part.buffer()).map_err(gpu)?;
        self.add_rounded(part.buffer(), dx)
    }

    /// dx += the rounded `dy` (a rounding's backward, the gradient rounded like the value);
    /// in f32, dx += dy.
    fn add_rounded(&self, dy: Buffer<'_, f32>, dx: Buffer<'_, f32>) -> Result<(), ExecError> {
        let k = self.kernels();
        if self.format == Format::F32 {
            return k.add_scaled(dy, dx, 1.0).map_err(gpu);
        }
        let rounded = Owned::<D, f32>::zeros(self.d, dy.len()).map_err(gpu)?;
        k.round_to_format(dy, rounded.buffer(), self.format)
            .map_err(gpu)?;
        k.add_scaled(rounded.buffer(), dx, 1.0).map_err(gpu)
    }
}
