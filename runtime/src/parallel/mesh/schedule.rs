//! One device's step: its stage's schedule run action by action — microbatches forward and
//! backward piece by piece (recomputed pieces again before their backward), values crossing
//! tensor-parallel pieces through their collectives, ZeRO-3's gathered parameters, and the
//! gradient synchronisation and optimizer step where the schedule puts them.

use super::boundary::Crossing;
use super::convert::{convert_backward, convert_forward};
use super::{own, Device, Failure, Links, StepOutcome};
use crate::comm::Payload;
use crate::exec::precision::Format;
use crate::exec::{Batch, Params, Segment, Stats, Value};
use crate::parallel::placement::{Piece, Placement};
use crate::tensor::{param_shape, HostTensor};
use kiln_compiler::graph::Graph;
use kiln_compiler::plan::sharding::Conversion;
use kiln_compiler::plan::Action;
use kiln_compiler::spec::Train;
use petgraph::graph::NodeIndex;
use std::collections::BTreeMap;

/// What every device's thread shares during a step.
pub(super) struct StepContext<'a> {
    pub(super) g: &'a Graph,
    pub(super) placement: &'a Placement,
    pub(super) train: &'a Train,
    pub(super) lr: f64,
    pub(super) step_no: u64,
    /// Each microbatch's share of the step's mean loss.
    pub(super) scale: f32,
    /// Under fp16, the loss scale the backward pass starts from (else it starts from 1).
    pub(super) loss_scale: Option<f32>,
    /// Updates the optimizer has made before this step (steps skipped on overflow do not
    /// count), for its bias correction.
    pub(super) updates: u64,
}

/// A microbatch in flight through one virtual stage of a device: the values it received or
/// computes for others, the pieces whose tapes it keeps, and the gradients flowing back.
#[derive(Default)]
struct InFlight<'a> {
    values: BTreeMap<NodeIndex, Value>,
    /// Values as converted for pieces that compute differently (reduced, gathered, scattered or
    /// sliced over the tensor-parallel group), kept for a recomputation.
    converted: BTreeMap<(NodeIndex, Conversion), Value>,
    kept: Vec<Option<Segment<'a>>>,
    upstream: BTreeMap<NodeIndex, Value>,
}

/// The gradient of a parameter on one device: whole, or (after a ZeRO reduce-scatter) the
/// device's shard.
pub(super) type Grads = Vec<Option<Vec<f32>>>;

impl<'c> StepContext<'c> {
    pub(super) fn run(
        &self,
        device: &mut Device,
        links: &mut Links,
        micros: &'c [Batch],
    ) -> Result<StepOutcome, Failure> {
        let g = self.g;
        let holds = &self.placement.holds[device.stage];
        let tensor = &self.placement.grids[device.stage].tensor;
        let mut grads: Grads = g
            .params
            .iter()
            .zip(holds)
            .enumerate()
            .map(|(i, (p, &held))| {
                let len = tensor.local_len(g, i, device.part);
                // ZeRO-2 and 3 accumulate only this device's share of each gradient.
                let len = if self.partitioned_gradients(device.stage) {
                    links.data.shard(len).len()
                } else {
                    len
                };
                (p.trainable && held).then(|| vec![0.0; len])
            })
            .collect();
        // Its parameters as tensors on the device, shared by every piece it runs this step
        // (kept in the thread: device tensors need not be `Send`). A GPU reads them from the
        // host values itself.
        let format = Format::of(self.train.precision);
        let mut tensors = match device.accelerator {
            Some(_) => Params::none(g, format),
            None => Params::new(g, &device.values, format).map_err(own)?,
        };
        let mut loss = 0.0f32;
        let mut stats = Stats::new();
        let mut grad_norm = 0.0;
        let mut overflowed = false;
        let mut flight: BTreeMap<(usize, usize), InFlight> = BTreeMap::new();
        let mut accelerated = false;
        for &action in &self.placement.schedules[device.stage] {
            match action {
                Action::Recv { mb, chunk } => {
                    let k = self.virtual_stage(device.stage, chunk)?;
                    let entry = flight.entry((mb, k)).or_default();
                    for &(n, from) in &self.placement.virtual_stages[k].needs {
                        let crossing = Crossing::new(Payload::Activation, mb, n, from, k);
                        let value = self.receive(device, links, crossing)?;
                        entry
                            .values
                            .insert(n, Value::from_host(value).map_err(own)?);
                    }
                }
                // A GPU runs every microbatch's forward and backward at the first forward (one
                // stage: nothing is sent between them), with the weights uploaded once.
                Action::Forward { .. } | Action::Backward { .. }
                    if device.accelerator.is_some() =>
                {
                    if !accelerated {
                        loss += self.accelerated(device, links, micros, &mut grads)?;
                        accelerated = true;
                    }
                }
                Action::Forward { mb, chunk } => {
                    let k = self.virtual_stage(device.stage, chunk)?;
                    let batch = microbatch(micros, mb)?;
                    let entry = flight.entry((mb, k)).or_default();
                    if let Some((l, s)) =
                        self.forward(device, &mut tensors, links, batch, k, entry)?
                    {
                        loss += l * self.scale;
                        for (name, x) in s {
                            *stats.entry(name).or_default() += x * self.scale;
                        }
                    }
                }
                Action::Send { mb, chunk } => {
                    let k = self.virtual_stage(device.stage, chunk)?;
                    let entry = self.in_flight(&mut flight, mb, k)?;
                    for (n, readers) in &self.placement.virtual_stages[k].feeds {
                        let value = entry.values.get(n).ok_or_else(|| {
                            Failure::Own(format!("`{}` was not computed", g.dag[*n].name))
                        })?;
                        let value = value.to_host().map_err(own)?;
                        for &r in readers {
                            let crossing = Crossing::new(Payload::Activation, mb, *n, k, r);
                            self.send(device, links, crossing, &value)?;
                        }
                    }
                }
                Action::RecvGrad { mb, chunk } => {
                    let k = self.virtual_stage(device.stage, chunk)?;
                    let entry = self.in_flight(&mut flight, mb, k)?;
                    for (n, readers) in &self.placement.virtual_stages[k].feeds {
                        for &r in readers {
                            let crossing = Crossing::new(Payload::Gradient, mb, *n, r, k);
                            let grad = self.receive(device, links, crossing)?;
                            let grad = Value::from_host(grad).map_err(own)?;
                            accumulate(&mut entry.upstream, *n, grad)?;
                        }
                    }
                }
                Action::Backward { mb, chunk } => {
                    let k = self.virtual_stage(device.stage, chunk)?;
                    let batch = microbatch(micros, mb)?;
                    let mut entry = flight.remove(&(mb, k)).ok_or_else(|| {
                        Failure::Own(format!("backward of microbatch {mb} before its forward"))
                    })?;
                    self.backward(
                        device,
                        &mut tensors,
                        links,
                        batch,
                        k,
                        &mut entry,
                        &mut grads,
                    )?;
                    if !self.placement.virtual_stages[k].needs.is_empty() {
                        // Kept for the send of the gradients of what it received.
                        flight.insert((mb, k), entry);
                    }
                }
                Action::SendGrad { mb, chunk } => {
                    let k = self.virtual_stage(device.stage, chunk)?;
                    let mut entry = flight.remove(&(mb, k)).ok_or_else(|| {
                        Failure::Own(format!("no gradients of microbatch {mb} to send"))
                    })?;
                    for &(n, from) in &self.placement.virtual_stages[k].needs {
                        let grad = match entry.upstream.remove(&n) {
                            Some(grad) => grad,
                            None => entry
                                .values
                                .get(&n)
                                .ok_or_else(|| {
                                    Failure::Own(format!("`{}` was not received", g.dag[n].name))
                                })?
                                .zeros_like(),
                        };
                        let grad = grad.to_host().map_err(own)?;
                        let crossing = Crossing::new(Payload::Gradient, mb, n, k, from);
                        self.send(device, links, crossing, &grad)?;
                    }
                }
                Action::AllReduceGrads | Action::ReduceScatterGrads => {
                    loss = self.sync_gradients(device.stage, links, &mut grads, loss)?;
                }
                Action::Optimizer => {
                    tensors.clear();
                    (grad_norm, overflowed) =
                        self.optimize(device, links, &mut grads, &mut loss)?;
                }
                Action::GatherWeights => {
                    for (i, held) in holds.iter().enumerate() {
                        if *held && g.params[i].trainable {
                            links.data.all_gather(&mut device.values[i].data)?;
                        }
                    }
                }
            }
        }
        if self.placement.grids[device.stage].data > 1 && !stats.is_empty() {
            // Every data rank of the loss's stage has the same figures to sum.
            let mut sums: Vec<f32> = stats.values().copied().collect();
            links.data.all_reduce_sum(&mut sums)?;
            stats.values_mut().zip(sums).for_each(|(x, sum)| *x = sum);
        }
        Ok(StepOutcome {
            loss,
            grad_norm,
            overflowed,
            collective_seconds: 0.0,
            stats,
        })
    }

    /// Whether gradients are reduce-scattered as backward produces them (ZeRO-2 and 3 over a
    /// data-parallel group), not accumulated whole.
    pub(super) fn partitioned_gradients(&self, stage: usize) -> bool {
        self.placement.zero >= 2 && self.placement.grids[stage].data > 1
    }

    pub(super) fn check_finite(&self, loss: f32) -> Result<(), Failure> {
        if loss.is_finite() {
            return Ok(());
        }
        Err(Failure::Own(format!(
            "the loss became {loss} at step {}; the last checkpoint is unchanged",
            self.step_no
        )))
    }

    fn virtual_stage(&self, stage: usize, chunk: usize) -> Result<usize, Failure> {
        self.placement
            .virtual_stage(stage, chunk)
            .ok_or_else(|| Failure::Own(format!("stage {stage} has no chunk {chunk}")))
    }

    fn in_flight<'f, 'a>(
        &self,
        flight: &'f mut BTreeMap<(usize, usize), InFlight<'a>>,
        mb: usize,
        k: usize,
    ) -> Result<&'f mut InFlight<'a>, Failure> {
        flight
            .get_mut(&(mb, k))
            .ok_or_else(|| Failure::Own(format!("microbatch {mb} is not in flight here")))
    }

    /// Runs one piece forward: its inputs (through the tensor-parallel collective each edge
    /// needs, done once and kept for a recomputation) and, under ZeRO-3, its parameters
    /// gathered for the occasion.
    fn run_piece(
        &self,
        device: &mut Device,
        tensors: &mut Params,
        links: &mut Links,
        batch: &'c Batch,
        piece: &Piece,
        entry: &mut InFlight<'c>,
    ) -> Result<Segment<'c>, Failure> {
        let g = self.g;
        let tensor = &self.placement.grids[device.stage].tensor;
        let mut received = Vec::with_capacity(piece.inputs.len());
        for (n, conversion) in &piece.inputs {
            let raw = entry.values.get(n).ok_or_else(|| {
                Failure::Own(format!(
                    "`{}` is needed but was not received",
                    g.dag[*n].name
                ))
            })?;
            let key = (*n, conversion.clone());
            let value = match (conversion, entry.converted.get(&key)) {
                (Conversion::None | Conversion::ReduceGradient, _) => raw.clone(),
                (_, Some(done)) => done.clone(),
                _ => {
                    let v = convert_forward(&mut *links.tensor, conversion, raw)?;
                    entry.converted.insert(key, v.clone());
                    v
                }
            };
            received.push((*n, value));
        }
        let gathered = self.gather_parameters(device, tensors, links, &piece.nodes)?;
        let ops = &tensor.ranks[device.part];
        let segment = Segment::forward(
            g,
            tensors,
            batch,
            ops,
            &piece.nodes,
            received,
            Some(&mut *links.tensor),
        );
        for i in gathered {
            tensors.release(i);
        }
        segment.map_err(|e| Failure::Own(format!("step {}: {e}", self.step_no)))
    }

    /// ZeRO-3: all-gathers the parameters `nodes` read from the data-parallel group's shards;
    /// returns which, to release them after use.
    fn gather_parameters(
        &self,
        device: &mut Device,
        tensors: &mut Params,
        links: &mut Links,
        nodes: &[NodeIndex],
    ) -> Result<Vec<usize>, Failure> {
        if self.placement.zero < 3 {
            return Ok(Vec::new());
        }
        let mut ids: Vec<usize> = nodes
            .iter()
            .flat_map(|&n| self.g.dag[n].op.params())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for &i in &ids {
            let tensor = &self.placement.grids[device.stage].tensor;
            let shape = tensor.params[i].local_shape(
                &param_shape(&self.g.params[i]),
                device.part,
                tensor.size,
            );
            let len = shape.iter().product();
            let mut data = vec![0.0; len];
            let mine = links.data.shard(len);
            data[mine].copy_from_slice(device.shards[i].as_deref().unwrap_or_default());
            links.data.all_gather(&mut data)?;
            tensors
                .set(self.g, i, &HostTensor { shape, data })
                .map_err(own)?;
        }
        Ok(ids)
    }

    /// Forward through virtual stage `k`: each piece in turn, keeping what later pieces and
    /// stages read; returns the loss and its figures if this is where it is computed.
    fn forward(
        &self,
        device: &mut Device,
        tensors: &mut Params,
        links: &mut Links,
        batch: &'c Batch,
        k: usize,
        entry: &mut InFlight<'c>,
    ) -> Result<Option<(f32, Stats)>, Failure> {
        let mut loss = None;
        for piece in &self.placement.virtual_stages[k].pieces {
            let segment = self.run_piece(device, tensors, links, batch, piece, entry)?;
            for &n in &piece.outputs {
                let v = segment.value(n).map_err(|e| Failure::Own(e.0))?;
                entry.values.insert(n, v);
            }
            if self.g.loss.is_some_and(|l| piece.nodes.contains(&l)) {
                let l = segment.loss().map_err(own)?;
                self.check_finite(l)?;
                loss = Some((l, segment.stats()));
            }
            let mut segment = segment;
            segment.retain_values(|n| piece.outputs.contains(&n) || self.g.loss == Some(n));
            entry.kept.push((!piece.recompute).then_some(segment));
        }
        // Kept pieces hold their inputs themselves: keep only what is sent on, what a recomputed
        // piece reads again, and what was received (its shape, for the gradient sent back).
        let stage = &self.placement.virtual_stages[k];
        let recomputed = |n: &NodeIndex| {
            stage
                .pieces
                .iter()
                .any(|p| p.recompute && p.inputs.iter().any(|(m, _)| m == n))
        };
        entry.values.retain(|n, _| {
            recomputed(n)
                || stage.feeds.iter().any(|(m, _)| m == n)
                || stage.needs.iter().any(|(m, _)| m == n)
        });
        entry.converted.retain(|(n, _), _| recomputed(n));
        Ok(loss)
    }

    /// Backward through virtual stage `k`, pieces in reverse (recomputed ones run forward
    /// again first); parameter gradients are added to `grads`, scaled by the microbatch's
    /// share; the gradients of each piece's inputs go back through their edges' collectives.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        device: &mut Device,
        tensors: &mut Params,
        links: &mut Links,
        batch: &'c Batch,
        k: usize,
        entry: &mut InFlight<'c>,
        grads: &mut Grads,
    ) -> Result<(), Failure> {
        let pieces = &self.placement.virtual_stages[k].pieces;
        if let Some(l) = self.g.loss {
            if pieces.iter().any(|p| p.nodes.contains(&l)) {
                entry
                    .upstream
                    .insert(l, Value::scalar(self.loss_scale.unwrap_or(1.0)));
            }
        }
        for (i, piece) in pieces.iter().enumerate().rev() {
            let upstream: Vec<(NodeIndex, Value)> = piece
                .nodes
                .iter()
                .filter_map(|n| entry.upstream.remove(n).map(|g| (*n, g)))
                .collect();
            let kept = entry.kept.get_mut(i).and_then(Option::take);
            // Nothing reaches this piece (the same on every rank, so collectives stay matched).
            if upstream.is_empty() {
                continue;
            }
            let segment = match kept {
                Some(s) => s,
                None => self.run_piece(device, tensors, links, batch, piece, entry)?,
            };
            let out = segment
                .backward(&upstream)
                .map_err(|e| Failure::Own(format!("step {}: {e}", self.step_no)))?;
            let mut received = out.received;
            self.add_param_grads(device, links, grads, out.params)?;
            for (n, conversion) in &piece.inputs {
                // Every input of a piece that ran backward has a gradient (zero if nothing
                // reached it), on every rank alike, so the collectives stay matched.
                let Some(at) = received.iter().position(|(m, _)| m == n) else {
                    continue;
                };
                let grad = received.swap_remove(at).1;
                let grad = convert_backward(&mut *links.tensor, conversion, grad)?;
                accumulate(&mut entry.upstream, *n, grad)?;
            }
        }
        // Only the values received from other stages are still needed (their shapes, for the
        // gradients sent back).
        let needs = &self.placement.virtual_stages[k].needs;
        entry
            .values
            .retain(|n, _| needs.iter().any(|(m, _)| m == n));
        entry.kept.clear();
        entry.converted.clear();
        Ok(())
    }
}

impl StepContext<'_> {
    /// Every microbatch's forward and backward over the whole graph on the device's GPU: their
    /// share of the step's loss; the parameters' gradients (summed on the GPU) added to
    /// `grads`.
    fn accelerated(
        &self,
        device: &Device,
        links: &mut Links,
        micros: &[Batch],
        grads: &mut Grads,
    ) -> Result<f32, Failure> {
        let Some(accelerator) = &device.accelerator else {
            return Err(Failure::Own("the device has no GPU".into()));
        };
        let format = Format::of(self.train.precision);
        let upstream = self.loss_scale.unwrap_or(1.0);
        let out = accelerator
            .forward_backward(self.g, &device.values, micros, format, upstream)
            .map_err(|e| Failure::Own(format!("step {}: {e}", self.step_no)))?;
        for &loss in &out.losses {
            self.check_finite(loss)?;
        }
        let params = out
            .grads
            .into_iter()
            .enumerate()
            .filter_map(|(id, grad)| Some((id, grad?)))
            .collect();
        self.add_param_grads(device, links, grads, params)?;
        Ok(out.losses.iter().map(|l| l * self.scale).sum())
    }

    /// Adds a microbatch's parameter gradients to the step's, scaled by its share; under
    /// ZeRO-2 each is reduce-scattered first (as soon as backward produces it, as DeepSpeed
    /// does, so that no device keeps a whole gradient across microbatches).
    fn add_param_grads(
        &self,
        device: &Device,
        links: &mut Links,
        grads: &mut Grads,
        params: Vec<(usize, Vec<f32>)>,
    ) -> Result<(), Failure> {
        for (id, mut grad) in params {
            let Some(acc) = grads[id].as_mut() else {
                continue;
            };
            let share = if self.partitioned_gradients(device.stage) {
                links.data.reduce_scatter_sum(&mut grad)?;
                &grad[links.data.shard(grad.len())]
            } else {
                &grad[..]
            };
            acc.iter_mut()
                .zip(share)
                .for_each(|(a, g)| *a += g * self.scale);
        }
        Ok(())
    }
}

fn microbatch(micros: &[Batch], mb: usize) -> Result<&Batch, Failure> {
    micros.get(mb).ok_or_else(|| {
        Failure::Own(format!(
            "the schedule names microbatch {mb}, which the step does not have"
        ))
    })
}

/// Adds a gradient to what the value's other readers contributed.
fn accumulate(
    into: &mut BTreeMap<NodeIndex, Value>,
    n: NodeIndex,
    grad: Value,
) -> Result<(), Failure> {
    let sum = match into.get(&n) {
        Some(acc) => acc.add(&grad).map_err(own)?,
        None => grad,
    };
    into.insert(n, sum);
    Ok(())
}
