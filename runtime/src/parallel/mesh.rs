//! One training step on a mesh of devices, as the plan places it: one thread per device, each
//! with its own copy of the parameters its pipeline stage holds (or, under ZeRO-3, its shard of
//! them), running its stage's schedule — forward and backward of microbatches, activations and
//! gradients sent between stages, gradients summed over the data-parallel group (bucketed
//! all-reduce, or reduce-scatter under ZeRO), tied parameters summed over the stages holding
//! them, global-norm clipping, the optimizer on what the device owns, and ZeRO's all-gather.
//!
//! Every device ends the step with the weights one device would have after the same
//! microbatches (within float tolerance): the tests check exactly that.

use crate::exec::{Batch, ExecError, Params, Segment, Stats, Value};
use crate::memory;
use crate::parallel::collective::{
    cpu_ring, mailboxes, ring_shard, Collective, CollectiveError, CpuRing, Mailbox, Payload,
};
use crate::parallel::placement::{Piece, Placement};
use crate::parallel::tensor_parallel::Shards;
use crate::tensor::{param_shape, HostTensor};
use crate::train::optim::{clip_factor, step, State};
use boundary::Crossing;
use kiln_compiler::graph::Graph;
use kiln_compiler::plan::sharding::{last_axis, sequence_axis, Conversion, ParamLayout};
use kiln_compiler::plan::Action;
use kiln_compiler::spec::Train;
use petgraph::graph::NodeIndex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod boundary;

/// Gradients are all-reduced in buckets of about this many values (4 MiB), so that no single
/// message holds the whole model.
const BUCKET_VALUES: usize = 1 << 20;

/// What a step computed, the same on every device.
pub struct StepOutcome {
    /// Mean loss over the step's microbatches.
    pub loss: f32,
    /// Global gradient norm before clipping (0 without clipping).
    pub grad_norm: f64,
    /// Seconds a device spent in collectives and transfers this step (mean over devices),
    /// waiting for its peers included.
    pub collective_seconds: f64,
    /// What the loss reported beside its value, averaged over the step's microbatches.
    pub stats: Stats,
}

/// Why a device's step failed: its own error, or a collective broken by another device's.
enum Failure {
    Own(String),
    Peer(CollectiveError),
}

impl From<CollectiveError> for Failure {
    fn from(e: CollectiveError) -> Self {
        Failure::Peer(e)
    }
}

/// A device's links: its tensor-parallel group (same stage and data rank), its data-parallel
/// group (same stage and tensor rank), and its mailbox to every device of the mesh. When every
/// stage has the same grid, also its pipeline group (same data and tensor rank: tied
/// parameters, the global loss and norm); otherwise those go over the whole mesh (`world`).
struct Links {
    tensor: CpuRing,
    data: CpuRing,
    across: Across,
    mail: Mailbox,
}

/// How a device reaches the other stages for tied parameters, the loss and the norm.
enum Across {
    /// The devices of the same data and tensor rank on every stage.
    Pipeline(CpuRing),
    /// Every device of the mesh (stages on grids of their own).
    World(CpuRing),
}

impl Links {
    fn busy(&self) -> std::time::Duration {
        let across = match &self.across {
            Across::Pipeline(ring) | Across::World(ring) => ring.busy(),
        };
        self.tensor.busy() + self.data.busy() + across + self.mail.busy()
    }
}

/// One device's state across steps.
struct Device {
    stage: usize,
    /// Data-parallel rank.
    rank: usize,
    /// Tensor-parallel rank.
    part: usize,
    /// The parameters it holds (its tensor-parallel shard of them; absent: another stage's,
    /// or sharded under ZeRO-3).
    values: Vec<HostTensor>,
    /// ZeRO-3: its share (over the data-parallel group) of each parameter its stage holds.
    shards: Vec<Option<Vec<f32>>>,
    /// Optimizer state of what it updates: its parameters, or its shares under ZeRO.
    states: Vec<Option<State>>,
    /// Taken by the step's thread, which drops them if the device fails so that its peers'
    /// collectives fail instead of waiting.
    links: Option<Links>,
    /// The most memory it has used in a step: what it holds between steps plus its thread's
    /// peak allocation during the step (zero without the counting allocator).
    peak_bytes: usize,
}

impl Device {
    /// Bytes of the state it keeps between steps: parameters, ZeRO shares, optimizer moments.
    fn held_bytes(&self) -> usize {
        let values: usize = self.values.iter().map(|v| v.data.len()).sum();
        let shards: usize = self.shards.iter().flatten().map(Vec::len).sum();
        let states: usize = self
            .states
            .iter()
            .flatten()
            .map(|s| s.m.len() + s.v.len())
            .sum();
        (values + shards + states) * std::mem::size_of::<f32>()
    }
}

/// One device's measured peak next to the plan's prediction for its stage.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceMemory {
    pub device: usize,
    pub stage: usize,
    pub measured_bytes: usize,
    pub predicted_bytes: f64,
}

/// Raises the mesh's failure flag if dropped while its thread panics.
struct RaiseOnPanic<'a>(&'a AtomicBool);

impl Drop for RaiseOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// The devices of a mesh and the placement they follow.
pub struct Mesh {
    placement: Placement,
    devices: Vec<Device>,
    failed: Arc<AtomicBool>,
}

impl Mesh {
    /// Deals `values` and `states` (whole, as one device would hold them) out to the devices.
    pub fn new(
        g: &Graph,
        placement: Placement,
        values: &[HostTensor],
        states: &[Option<State>],
    ) -> Self {
        let failed = Arc::new(AtomicBool::new(false));
        let n = placement.devices();
        // Ring ends handed out in device order (tensor rank fastest, then data, then stage).
        let mut tensor_rings: Vec<Vec<_>> = placement
            .grids
            .iter()
            .map(|grid| {
                (0..grid.data)
                    .map(|_| cpu_ring(grid.tensor.size).into_iter())
                    .collect()
            })
            .collect();
        let mut data_rings: Vec<Vec<_>> = placement
            .grids
            .iter()
            .map(|grid| {
                (0..grid.tensor.size)
                    .map(|_| cpu_ring(grid.data).into_iter())
                    .collect()
            })
            .collect();
        let (d0, t0) = (placement.grids[0].data, placement.grids[0].tensor.size);
        let mut pipeline_rings: Vec<_> = (0..d0 * t0)
            .map(|_| cpu_ring(placement.pipeline).into_iter())
            .collect();
        let mut world = cpu_ring(n).into_iter();
        let mut mail = mailboxes(n, &failed).into_iter();
        let (zero3, sharded) = (placement.zero >= 3, placement.zero >= 1);
        let mut devices = Vec::with_capacity(n);
        for (stage, grid) in placement.grids.iter().enumerate() {
            let (d, t) = (grid.data, grid.tensor.size);
            for rank in 0..d {
                for part in 0..t {
                    let holds = &placement.holds[stage];
                    let share = |len: usize| ring_shard(len, d, rank);
                    let local: Vec<HostTensor> = values
                        .iter()
                        .zip(&grid.tensor.params)
                        .zip(holds)
                        .map(|((v, layout), &held)| {
                            if held {
                                layout.shard(v, part, t)
                            } else {
                                HostTensor::absent()
                            }
                        })
                        .collect();
                    let shards = local
                        .iter()
                        .zip(holds)
                        .map(|(v, &held)| {
                            (zero3 && held).then(|| v.data[share(v.data.len())].to_vec())
                        })
                        .collect();
                    let states = states
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let s = s.as_ref().filter(|_| holds[i] && g.params[i].trainable)?;
                            let layout = &grid.tensor.params[i];
                            let cut = |x: &[f32]| {
                                let whole = HostTensor {
                                    shape: values[i].shape.clone(),
                                    data: x.to_vec(),
                                };
                                let mine = layout.shard(&whole, part, t).data;
                                if sharded {
                                    mine[share(mine.len())].to_vec()
                                } else {
                                    mine
                                }
                            };
                            Some(State {
                                m: cut(&s.m),
                                v: cut(&s.v),
                            })
                        })
                        .collect();
                    let across = if placement.uniform {
                        Across::Pipeline(
                            pipeline_rings[rank * t + part].next().expect("a ring end"),
                        )
                    } else {
                        Across::World(world.next().expect("a ring end"))
                    };
                    let links = Links {
                        tensor: tensor_rings[stage][rank].next().expect("a ring end"),
                        data: data_rings[stage][part].next().expect("a ring end"),
                        across,
                        mail: mail.next().expect("a mailbox"),
                    };
                    let values = if zero3 {
                        vec![HostTensor::absent(); local.len()]
                    } else {
                        local
                    };
                    devices.push(Device {
                        stage,
                        rank,
                        part,
                        values,
                        shards,
                        states,
                        links: Some(links),
                        peak_bytes: 0,
                    });
                }
            }
        }
        Mesh {
            placement,
            devices,
            failed,
        }
    }

    /// Microbatches per step, each of `rows_per_microbatch` rows.
    pub fn microbatches(&self) -> usize {
        self.placement.microbatches
    }

    /// One step over `micros`, the pipeline's microbatches (each stage's data rank r computes
    /// the r-th share of every one's rows); every device runs its schedule in its own thread.
    /// Fails with the first device's own error, if any.
    pub fn step(
        &mut self,
        g: &Graph,
        train: &Train,
        micros: &[Batch],
        lr: f64,
        step_no: u64,
    ) -> Result<StepOutcome, String> {
        if micros.len() != self.microbatches() {
            return Err(format!(
                "the plan runs {} microbatches per step; the step has {}",
                self.microbatches(),
                micros.len()
            ));
        }
        // Each device's rows of every microbatch.
        let shares: Vec<Vec<Batch>> = self
            .devices
            .iter()
            .map(|device| {
                let rows = self.placement.grids[device.stage].rows(device.rank);
                micros.iter().map(|b| b.rows(rows.clone())).collect()
            })
            .collect::<Result<_, ExecError>>()
            .map_err(|e| e.0)?;
        // Each share's weight in the step's mean loss: every share of the stage computing the
        // loss is one part of it, and the gradients every stage computes follow from there.
        let loss_grid = &self.placement.grids[self.placement.loss_stage];
        let ctx = StepContext {
            g,
            placement: &self.placement,
            train,
            lr,
            step_no,
            scale: 1.0 / (micros.len() * loss_grid.data) as f32,
        };
        let failed = &self.failed;
        let devices = self.devices.len();
        let results: Vec<Result<StepOutcome, Failure>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .devices
                .iter_mut()
                .zip(&shares)
                .map(|(device, mine)| {
                    let links = device.links.take();
                    let ctx = &ctx;
                    scope.spawn(move || {
                        // A panic anywhere in the step raises the flag too, so that peers
                        // waiting on this device give up.
                        let _raise = RaiseOnPanic(failed);
                        let Some(mut links) = links else {
                            return Err(Failure::Own("the device failed earlier".into()));
                        };
                        let start = memory::start_peak();
                        let held = device.held_bytes();
                        let busy = links.busy();
                        let result = ctx.run(device, &mut links, mine).map(|mut outcome| {
                            outcome.collective_seconds = (links.busy() - busy).as_secs_f64();
                            outcome
                        });
                        let during = usize::try_from(memory::peak() - start).unwrap_or(0);
                        device.peak_bytes = device.peak_bytes.max(held + during);
                        match result {
                            Ok(_) => device.links = Some(links),
                            Err(_) => failed.store(true, Ordering::SeqCst),
                        }
                        result
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        failed.store(true, Ordering::SeqCst);
                        Err(Failure::Own(format!("panicked during step {step_no}")))
                    })
                })
                .collect()
        });
        let mut outcome: Option<StepOutcome> = None;
        let mut peer = None;
        let mut collective_seconds = 0.0;
        // Only the stage computing the loss has its figures.
        let mut stats = Stats::new();
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(mut r) => {
                    collective_seconds += r.collective_seconds / devices as f64;
                    if stats.is_empty() {
                        stats = std::mem::take(&mut r.stats);
                    }
                    outcome = outcome.or(Some(r));
                }
                Err(Failure::Own(e)) if devices > 1 => return Err(format!("device {i}: {e}")),
                Err(Failure::Own(e)) => return Err(e),
                Err(Failure::Peer(e)) => peer = peer.or(Some(e)),
            }
        }
        match (outcome, peer) {
            (_, Some(e)) => Err(e.0),
            (Some(r), None) => Ok(StepOutcome {
                collective_seconds,
                stats,
                ..r
            }),
            (None, None) => Err("the mesh has no device".into()),
        }
    }

    /// Each device's measured peak memory so far, with the plan's prediction; empty when the
    /// program does not count allocations.
    pub fn memory(&self) -> Vec<DeviceMemory> {
        if !memory::installed() {
            return Vec::new();
        }
        self.devices
            .iter()
            .enumerate()
            .map(|(i, d)| DeviceMemory {
                device: i,
                stage: d.stage,
                measured_bytes: d.peak_bytes,
                predicted_bytes: self.placement.memory.get(d.stage).map_or(0.0, |m| m.total),
            })
            .collect()
    }

    /// Every parameter whole, as one device would hold it.
    pub fn values(&self, g: &Graph) -> Vec<HostTensor> {
        (0..g.params.len())
            .map(|i| {
                let zero3 = self.placement.zero >= 3;
                let local = self.local_parts(g, i, zero3, |d| {
                    if zero3 {
                        d.shards[i].clone().unwrap_or_default()
                    } else {
                        d.values[i].data.clone()
                    }
                });
                self.unshard(g, i, local)
            })
            .collect()
    }

    /// Every trainable parameter's optimizer state whole, gathered from the devices owning it.
    pub fn states(&self, g: &Graph) -> Vec<Option<State>> {
        (0..g.params.len())
            .map(|i| {
                let holder = self.first_holder(i);
                let group = self.stage_devices(holder);
                if group.iter().any(|d| d.states[i].is_none()) {
                    return None;
                }
                let sharded = self.placement.zero >= 1;
                let m = self.local_parts(g, i, sharded, |d| {
                    d.states[i]
                        .as_ref()
                        .map(|s| s.m.clone())
                        .unwrap_or_default()
                });
                let v = self.local_parts(g, i, sharded, |d| {
                    d.states[i]
                        .as_ref()
                        .map(|s| s.v.clone())
                        .unwrap_or_default()
                });
                Some(State {
                    m: self.unshard(g, i, m).data,
                    v: self.unshard(g, i, v).data,
                })
            })
            .collect()
    }

    /// Each tensor-parallel rank's local copy of something about parameter `i` (read by
    /// `part_of` from the devices of the first stage holding it), reassembled from the
    /// data-parallel group's shares when `shared` (ZeRO), else read from data rank 0.
    fn local_parts(
        &self,
        g: &Graph,
        i: usize,
        shared: bool,
        part_of: impl Fn(&Device) -> Vec<f32>,
    ) -> Vec<HostTensor> {
        let stage = self.first_holder(i);
        let grid = &self.placement.grids[stage];
        let (t, d) = (grid.tensor.size, grid.data);
        let layout = &grid.tensor.params[i];
        let group = self.stage_devices(stage);
        (0..t)
            .map(|part| {
                let local_shape = layout.local_shape(&param_shape(&g.params[i]), part, t);
                let len: usize = local_shape.iter().product();
                let mut data = vec![0.0; len];
                if shared {
                    for rank in 0..d {
                        let piece = part_of(&group[rank * t + part]);
                        data[ring_shard(len, d, rank)].copy_from_slice(&piece);
                    }
                } else {
                    data.copy_from_slice(&part_of(&group[part]));
                }
                HostTensor {
                    shape: local_shape,
                    data,
                }
            })
            .collect()
    }

    fn unshard(&self, g: &Graph, i: usize, parts: Vec<HostTensor>) -> HostTensor {
        let refs: Vec<&HostTensor> = parts.iter().collect();
        let grid = &self.placement.grids[self.first_holder(i)];
        let mut whole = grid.tensor.params[i].unshard(&refs);
        whole.shape = param_shape(&g.params[i]);
        whole
    }

    fn first_holder(&self, param: usize) -> usize {
        self.placement.first_holder(param)
    }

    /// The devices of a stage, in order (data rank, then tensor rank).
    fn stage_devices(&self, stage: usize) -> &[Device] {
        let first = self.placement.device(stage, 0, 0);
        &self.devices[first..first + self.placement.grids[stage].devices()]
    }
}

/// What every device's thread shares during a step.
struct StepContext<'a> {
    g: &'a Graph,
    placement: &'a Placement,
    train: &'a Train,
    lr: f64,
    step_no: u64,
    /// Each microbatch's share of the step's mean loss.
    scale: f32,
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
type Grads = Vec<Option<Vec<f32>>>;

impl<'c> StepContext<'c> {
    fn run(
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
        // (kept in the thread: device tensors need not be `Send`).
        let mut tensors = Params::new(g, &device.values).map_err(own)?;
        let mut loss = 0.0f32;
        let mut stats = Stats::new();
        let mut grad_norm = 0.0;
        let mut flight: BTreeMap<(usize, usize), InFlight> = BTreeMap::new();
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
                    grad_norm = self.optimize(device, links, &mut grads, &mut loss)?;
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
            collective_seconds: 0.0,
            stats,
        })
    }

    /// Whether gradients are reduce-scattered as backward produces them (ZeRO-2 and 3 over a
    /// data-parallel group), not accumulated whole.
    fn partitioned_gradients(&self, stage: usize) -> bool {
        self.placement.zero >= 2 && self.placement.grids[stage].data > 1
    }

    fn check_finite(&self, loss: f32) -> Result<(), Failure> {
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
                    let v = convert_forward(&mut links.tensor, conversion, raw)?;
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
            Some(&mut links.tensor),
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
                entry.upstream.insert(l, Value::scalar(1.0));
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
            for (id, mut grad) in out.params {
                let Some(acc) = grads[id].as_mut() else {
                    continue;
                };
                let share = if self.partitioned_gradients(device.stage) {
                    // Reduced as soon as backward produces it (DeepSpeed's ZeRO-2), so that no
                    // device keeps a whole gradient across microbatches.
                    links.data.reduce_scatter_sum(&mut grad)?;
                    &grad[links.data.shard(grad.len())]
                } else {
                    &grad[..]
                };
                acc.iter_mut()
                    .zip(share)
                    .for_each(|(a, g)| *a += g * self.scale);
            }
            for (n, conversion) in &piece.inputs {
                // Every input of a piece that ran backward has a gradient (zero if nothing
                // reached it), on every rank alike, so the collectives stay matched.
                let Some(at) = received.iter().position(|(m, _)| m == n) else {
                    continue;
                };
                let grad = received.swap_remove(at).1;
                let grad = convert_backward(&mut links.tensor, conversion, grad)?;
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

    /// Sums gradients (and the loss) over the data-parallel group: a bucketed all-reduce, or
    /// under ZeRO a reduce-scatter leaving each device its shard. Returns the summed loss.
    fn sync_gradients(
        &self,
        stage: usize,
        links: &mut Links,
        grads: &mut Grads,
        loss: f32,
    ) -> Result<f32, Failure> {
        if self.placement.zero == 0 {
            return Ok(all_reduce_gradients(&mut links.data, grads, loss)?);
        }
        if !self.partitioned_gradients(stage) {
            // ZeRO-1: last parameters first, as backward finishes them.
            for g in grads.iter_mut().rev().flatten() {
                links.data.reduce_scatter_sum(g)?;
                let mine = links.data.shard(g.len());
                *g = g[mine].to_vec();
            }
        }
        let mut total = [loss];
        links.data.all_reduce_sum(&mut total)?;
        Ok(total[0])
    }

    /// Finishes the gradients (tied parameters summed over the stages holding them, the loss
    /// and global norm over the pipeline), clips, and updates what this device owns. Returns the
    /// norm before clipping.
    fn optimize(
        &self,
        device: &mut Device,
        links: &mut Links,
        grads: &mut Grads,
        loss: &mut f32,
    ) -> Result<f64, Failure> {
        let g = self.g;
        let tensor = &self.placement.grids[device.stage].tensor;
        // Replicated parameters read by split computation have partial gradients.
        if tensor.size > 1 {
            for &i in &tensor.partial_grads {
                if let Some(gr) = grads[i].as_mut() {
                    links.tensor.all_reduce_sum(gr)?;
                }
            }
        }
        if self.placement.pipeline > 1 {
            self.sum_over_stages(device, links, grads, loss)?;
        }
        self.check_finite(*loss)?;
        let grad_norm = match self.train.grad_clip {
            None => 0.0,
            Some(max) => {
                let norm = self.global_norm(device, links, grads)?;
                let factor = clip_factor(norm, max);
                if factor != 1.0 {
                    for gr in grads.iter_mut().flatten() {
                        gr.iter_mut().for_each(|x| *x *= factor);
                    }
                }
                norm
            }
        };
        // The optimizer works on the weights in place (moved out and back, not copied): whole
        // parameters, or under ZeRO this device's shard of each.
        let zero = self.placement.zero;
        let mut flat: Vec<Vec<f32>> = (0..g.params.len())
            .map(|i| match (zero, grads[i].is_some()) {
                (_, false) => Vec::new(),
                (0, true) => std::mem::take(&mut device.values[i].data),
                (1 | 2, true) => {
                    let r = links.data.shard(device.values[i].data.len());
                    device.values[i].data[r].to_vec()
                }
                _ => device.shards[i].take().unwrap_or_default(),
            })
            .collect();
        step(
            &self.train.optimizer,
            self.lr,
            self.step_no,
            &mut flat,
            grads,
            &mut device.states,
        );
        for (i, updated) in flat.into_iter().enumerate() {
            match (zero, grads[i].is_some()) {
                (_, false) => {}
                (0, true) => device.values[i].data = updated,
                (1 | 2, true) => {
                    let r = links.data.shard(device.values[i].data.len());
                    device.values[i].data[r].copy_from_slice(&updated);
                }
                _ => device.shards[i] = Some(updated),
            }
        }
        Ok(grad_norm)
    }

    /// Parameters used by several stages (tied embeddings) get the sum of their gradients, and
    /// every device the step's loss (computed on one stage).
    fn sum_over_stages(
        &self,
        device: &Device,
        links: &mut Links,
        grads: &mut Grads,
        loss: &mut f32,
    ) -> Result<(), Failure> {
        let g = self.g;
        let holds = &self.placement.holds;
        let shared: Vec<usize> = (0..g.params.len())
            .filter(|&i| g.params[i].trainable && holds.iter().filter(|h| h[i]).count() > 1)
            .collect();
        let tensor = &self.placement.grids[device.stage].tensor;
        let zero = self.placement.zero >= 1;
        let Links { data, across, .. } = links;
        match across {
            // Devices pair up stage to stage: their shards of a shared parameter match, and
            // stages without it add zeros.
            Across::Pipeline(ring) => {
                let len = |i: usize| {
                    let n = tensor.local_len(g, i, device.part);
                    if zero {
                        data.shard(n).len()
                    } else {
                        n
                    }
                };
                let mut buf: Vec<f32> = Vec::new();
                for &i in &shared {
                    match &grads[i] {
                        Some(gr) => buf.extend_from_slice(gr),
                        None => buf.extend(std::iter::repeat_n(0.0, len(i))),
                    }
                }
                buf.push(*loss);
                ring.all_reduce_sum(&mut buf)?;
                *loss = buf.pop().unwrap_or_default();
                let mut at = 0;
                for &i in &shared {
                    let n = len(i);
                    if let Some(gr) = grads[i].as_mut() {
                        gr.copy_from_slice(&buf[at..at + n]);
                    }
                    at += n;
                }
            }
            // Stages on grids of their own shard differently: each device adds what it holds
            // alone in whole coordinates (its tensor shard, its ZeRO share within it; a
            // replicated gradient once per group, a replica's once per stage unless sharded),
            // and takes its own part of the sum.
            Across::World(ring) => {
                let whole_len = |i: usize| g.params[i].shape.iter().product::<u64>() as usize;
                let mut buf: Vec<f32> = Vec::new();
                for &i in &shared {
                    let layout = &tensor.params[i];
                    let adds =
                        (zero || device.rank == 0) && (layout.is_split() || device.part == 0);
                    match grads[i].as_ref().filter(|_| adds) {
                        Some(gr) => {
                            let shape = param_shape(&g.params[i]);
                            let local_shape = layout.local_shape(&shape, device.part, tensor.size);
                            let mut local = vec![0.0; local_shape.iter().product()];
                            let mine = if zero {
                                data.shard(local.len())
                            } else {
                                0..local.len()
                            };
                            local[mine].copy_from_slice(gr);
                            let local = HostTensor {
                                shape: local_shape,
                                data: local,
                            };
                            buf.extend(layout.place(&local, device.part, tensor.size).data);
                        }
                        None => buf.extend(std::iter::repeat_n(0.0, whole_len(i))),
                    }
                }
                let first =
                    (device.stage, device.rank, device.part) == (self.placement.loss_stage, 0, 0);
                buf.push(if first { *loss } else { 0.0 });
                ring.all_reduce_sum(&mut buf)?;
                *loss = buf.pop().unwrap_or_default();
                let mut at = 0;
                for &i in &shared {
                    let n = whole_len(i);
                    if let Some(gr) = grads[i].as_mut() {
                        let whole = HostTensor {
                            shape: param_shape(&g.params[i]),
                            data: buf[at..at + n].to_vec(),
                        };
                        let local = tensor.params[i]
                            .shard(&whole, device.part, tensor.size)
                            .data;
                        *gr = if zero {
                            local[data.shard(local.len())].to_vec()
                        } else {
                            local
                        };
                    }
                    at += n;
                }
            }
        }
        Ok(())
    }

    /// The global gradient norm, each value counted once: a shared parameter on the first stage
    /// holding it, a replicated one on tensor rank 0, a ZeRO share on the device owning it.
    fn global_norm(
        &self,
        device: &Device,
        links: &mut Links,
        grads: &Grads,
    ) -> Result<f64, Failure> {
        let tensor = &self.placement.grids[device.stage].tensor;
        let mut sq: f64 = grads
            .iter()
            .enumerate()
            .filter(|&(i, _)| self.placement.first_holder(i) == device.stage)
            .filter(|&(i, _)| tensor.params[i].is_split() || device.part == 0)
            .filter_map(|(_, gr)| gr.as_ref())
            .flat_map(|gr| gr.iter())
            .map(|&x| f64::from(x).powi(2))
            .sum();
        let zero = self.placement.zero >= 1;
        if let Across::World(_) = links.across {
            // Summed over every device at once: whole gradients once per stage.
            if !zero && device.rank != 0 {
                sq = 0.0;
            }
        }
        // Summed as an f32 pair (value and rounding error) to keep f64 precision.
        let high = sq as f32;
        let mut total = [high, (sq - f64::from(high)) as f32];
        match &mut links.across {
            Across::Pipeline(ring) => {
                if tensor.size > 1 {
                    links.tensor.all_reduce_sum(&mut total)?;
                }
                if zero {
                    links.data.all_reduce_sum(&mut total)?;
                }
                if self.placement.pipeline > 1 {
                    ring.all_reduce_sum(&mut total)?;
                }
            }
            Across::World(ring) => ring.all_reduce_sum(&mut total)?,
        }
        Ok((f64::from(total[0]) + f64::from(total[1])).sqrt())
    }
}

fn microbatch(micros: &[Batch], mb: usize) -> Result<&Batch, Failure> {
    micros.get(mb).ok_or_else(|| {
        Failure::Own(format!(
            "the schedule names microbatch {mb}, which the step does not have"
        ))
    })
}

fn own(e: ExecError) -> Failure {
    Failure::Own(e.0)
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

/// A value on its way into a piece that computes differently from its producer (see
/// [`Conversion`]): gathered, reduced, scattered or sliced over the tensor-parallel group.
fn convert_forward(
    ring: &mut CpuRing,
    conversion: &Conversion,
    value: &Value,
) -> Result<Value, Failure> {
    if matches!(conversion, Conversion::None | Conversion::ReduceGradient) {
        return Ok(value.clone());
    }
    let (rank, size) = (ring.rank(), ring.size());
    let host = value.to_host().map_err(own)?;
    let converted = match conversion {
        Conversion::AllGather(sections) => gathered(ring, last_axis(&host.shape, sections), &host)?,
        Conversion::GatherSequence { .. } => gathered(ring, sequence_of(&host, size), &host)?,
        Conversion::ScatterSequence => {
            let whole = summed(ring, host)?;
            sequence_axis(&whole.shape).shard(&whole, rank, size)
        }
        Conversion::SliceSequence => sequence_axis(&host.shape).shard(&host, rank, size),
        Conversion::ShardLast(sections) => {
            last_axis(&host.shape, sections).shard(&host, rank, size)
        }
        _ => summed(ring, host)?,
    };
    Value::from_host(converted).map_err(own)
}

/// The gradient of a converted value, back in its producer's form.
fn convert_backward(
    ring: &mut CpuRing,
    conversion: &Conversion,
    grad: Value,
) -> Result<Value, Failure> {
    if matches!(conversion, Conversion::None | Conversion::AllReduce) {
        return Ok(grad);
    }
    let (rank, size) = (ring.rank(), ring.size());
    let host = grad.to_host().map_err(own)?;
    let converted = match conversion {
        Conversion::AllGather(sections) => {
            last_axis(&host.shape, sections).shard(&host, rank, size)
        }
        Conversion::GatherSequence { partial_gradients } => {
            let host = if *partial_gradients {
                summed(ring, host)?
            } else {
                host
            };
            sequence_axis(&host.shape).shard(&host, rank, size)
        }
        Conversion::ScatterSequence | Conversion::SliceSequence => {
            gathered(ring, sequence_of(&host, size), &host)?
        }
        Conversion::ShardLast(sections) => gathered(ring, last_axis(&host.shape, sections), &host)?,
        _ => summed(ring, host)?,
    };
    Value::from_host(converted).map_err(own)
}

fn summed(ring: &mut CpuRing, mut t: HostTensor) -> Result<HostTensor, CollectiveError> {
    ring.all_reduce_sum(&mut t.data)?;
    Ok(t)
}

/// Every rank's part of a value laid out by `layout`, whole on every rank: each rank places
/// its part in a whole-sized buffer and the buffers are summed (parts of a vocabulary that does
/// not divide evenly differ in size).
fn gathered(
    ring: &mut CpuRing,
    layout: ParamLayout,
    part: &HostTensor,
) -> Result<HostTensor, CollectiveError> {
    let whole = layout.place(part, ring.rank(), ring.size());
    summed(ring, whole)
}

/// The sequence layout of a value of which `part` is one rank's share.
fn sequence_of(part: &HostTensor, size: usize) -> ParamLayout {
    let mut shape = part.shape.clone();
    if let Some(s) = shape.get_mut(1) {
        *s *= size;
    }
    sequence_axis(&shape)
}

/// Sums every device's gradients (and losses) in place, bucket by bucket, last parameters first
/// (the order backward finishes them in, as DDP buckets them); returns the summed loss.
fn all_reduce_gradients(
    ring: &mut dyn Collective,
    grads: &mut [Option<Vec<f32>>],
    loss: f32,
) -> Result<f32, CollectiveError> {
    let order: Vec<usize> = (0..grads.len())
        .rev()
        .filter(|&i| grads[i].is_some())
        .collect();
    let mut bucket: Vec<f32> = Vec::new();
    let mut members: Vec<usize> = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        bucket.extend_from_slice(grads[i].as_deref().unwrap_or_default());
        members.push(i);
        if bucket.len() < BUCKET_VALUES && k + 1 < order.len() {
            continue;
        }
        // The loss rides in the last bucket.
        let last = k + 1 == order.len();
        if last {
            bucket.push(loss);
        }
        ring.all_reduce_sum(&mut bucket)?;
        let mut at = 0;
        for m in members.drain(..) {
            if let Some(g) = grads[m].as_mut() {
                let n = g.len();
                g.copy_from_slice(&bucket[at..at + n]);
                at += n;
            }
        }
        if last {
            return Ok(bucket[at]);
        }
        bucket.clear();
    }
    let mut alone = [loss];
    ring.all_reduce_sum(&mut alone)?;
    Ok(alone[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device failing alone must stop the step on every device with its own error, not
    /// leave the others waiting: in a data-parallel all-reduce (device 1's row has a label
    /// outside the vocabulary) and in a pipeline waiting for gradients (the last stage's batch
    /// has no labels).
    #[test]
    fn a_device_failing_alone_stops_the_step_without_hanging() {
        let ids = vec![(1..9).collect::<Vec<i64>>()];
        let mut good = Batch::default();
        good.ints.insert("input_ids".into(), ids.clone());
        good.ints.insert("labels".into(), ids.clone());
        let mut unlabelled = Batch::default();
        unlabelled.ints.insert("input_ids".into(), ids.clone());
        let mut second_row_bad = Batch::default();
        second_row_bad
            .ints
            .insert("input_ids".into(), vec![ids[0].clone(), ids[0].clone()]);
        let outside = ids[0].iter().map(|_| 1000).collect();
        second_row_bad
            .ints
            .insert("labels".into(), vec![ids[0].clone(), outside]);
        for (parallel, micros, culprit) in [
            ("data = 2", vec![second_row_bad], "device 1"),
            (
                "pipeline = 2, schedule = 1f1b",
                vec![good.clone(), unlabelled],
                "device 1",
            ),
        ] {
            let src = format!(
                "import std.models.gpt2\nexperiment e {{ model = gpt2 {{ vocab = 64, positions = 16, hidden = 16, layers = 2, heads = 2 }}, parallel {{ mesh = cpu(2), {parallel} }}, train {{ batch = 2, micro_batch = 1, seq_len = 8 }} }}"
            );
            let checked = kiln_compiler::check_source("t.kiln", &src, None);
            assert!(checked.is_ok(), "{}", checked.render_errors());
            let kiln_compiler::Program {
                experiment: e,
                graph,
                plan,
                ..
            } = kiln_compiler::compile(&checked.module.experiments[0].value).unwrap();
            let placement = Placement::from_plan(&graph, &plan).unwrap();
            let values: Vec<HostTensor> = graph
                .params
                .iter()
                .map(|p| {
                    let shape = param_shape(p);
                    let n = shape.iter().product();
                    HostTensor {
                        shape,
                        data: vec![0.01; n],
                    }
                })
                .collect();
            let states = vec![None; values.len()];
            let (done, finished) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut mesh = Mesh::new(&graph, placement, &values, &states);
                done.send(mesh.step(&graph, &e.train, &micros, 1e-3, 1).err())
                    .ok();
            });
            let err = finished
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("the step returned instead of hanging")
                .expect("the step failed");
            assert!(err.starts_with(culprit), "{parallel}: {err}");
            assert!(
                !err.contains("stopped"),
                "{parallel}: the cause, not its echo: {err}"
            );
        }
    }
}
