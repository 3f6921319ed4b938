//! One training step on a mesh of devices, as the plan places it: one thread per device, each
//! with its own copy of the parameters its pipeline stage holds (or, under ZeRO-3, its shard of
//! them), running its stage's schedule — forward and backward of microbatches, activations and
//! gradients sent between stages, gradients summed over the data-parallel group (bucketed
//! all-reduce, or reduce-scatter under ZeRO), tied parameters summed over the stages holding
//! them, global-norm clipping, the optimizer on what the device owns, and ZeRO's all-gather.
//!
//! Every device ends the step with the weights one device would have after the same
//! microbatches (within float tolerance): the tests check exactly that.
//!
//! This file holds the devices and what they keep between steps; a step's schedule runs in
//! `schedule`, its end (gradient sums, norm, optimizer) in `sync`, tensor-parallel conversions
//! in `convert`, and values crossing stage boundaries in `boundary`.

use crate::comm::world::World;
use crate::comm::{block_shard, cpu_ring, mailboxes, Collective, CollectiveError, Mailbox};
use crate::exec::{Batch, ExecError, Stats, STAT_NAMES};
use crate::gpu::Accelerator;
use crate::memory;
use crate::parallel::placement::Placement;
use crate::parallel::tensor_parallel::Shards;
use crate::tensor::{param_shape, HostTensor};
use crate::train::loss_scale::LossScale;
use crate::train::optim::State;
use kiln_compiler::graph::Graph;
use kiln_compiler::spec::Train;
use schedule::StepContext;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod boundary;
mod convert;
mod saved;
mod schedule;
mod sync;

pub use saved::DevicePieces;

/// What a step computed, the same on every device.
pub struct StepOutcome {
    /// Mean loss over the step's microbatches.
    pub loss: f32,
    /// Global gradient norm before clipping (0 when not needed: without clipping or loss
    /// scaling; infinite or NaN when the gradients overflowed).
    pub grad_norm: f64,
    /// Whether the gradients overflowed under fp16's loss scale: the step was skipped.
    pub overflowed: bool,
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
    tensor: Box<dyn Collective>,
    data: Box<dyn Collective>,
    across: Across,
    mail: Mailbox,
}

/// How a device reaches the other stages for tied parameters, the loss and the norm.
enum Across {
    /// The devices of the same data and tensor rank on every stage.
    Pipeline(Box<dyn Collective>),
    /// Every device of the mesh (stages on grids of their own).
    World(Box<dyn Collective>),
}

impl Links {
    fn busy(&self) -> std::time::Duration {
        let across = match &self.across {
            Across::Pipeline(ring) | Across::World(ring) => ring.busy(),
        };
        self.tensor.busy() + self.data.busy() + across + self.mail.busy()
    }

    /// Every device's links, in device order (tensor rank fastest, then data, then stage), for
    /// devices that are threads of this process.
    fn in_process(placement: &Placement, failed: &Arc<AtomicBool>) -> Vec<Links> {
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
        let mut world = cpu_ring(placement.devices()).into_iter();
        let mut mail = mailboxes(placement.devices(), failed).into_iter();
        let mut links = Vec::with_capacity(placement.devices());
        for (stage, rank, part) in placement.coordinates() {
            let t = placement.grids[stage].tensor.size;
            let end = |rings: &mut std::vec::IntoIter<_>| -> Box<dyn Collective> {
                Box::new(rings.next().expect("a ring end per device"))
            };
            let across = if placement.uniform {
                Across::Pipeline(end(&mut pipeline_rings[rank * t + part]))
            } else {
                Across::World(end(&mut world))
            };
            links.push(Links {
                tensor: end(&mut tensor_rings[stage][rank]),
                data: end(&mut data_rings[stage][part]),
                across,
                mail: mail.next().expect("a mailbox per device"),
            });
        }
        links
    }

    /// The links of device `me`, the one device of this process in an MPI job: each group an
    /// MPI communicator split off the job's (every process splits in the same order).
    #[cfg(feature = "mpi")]
    fn over_mpi(
        placement: &Placement,
        mpi: &crate::comm::mpi::MpiWorld,
        me: usize,
        failed: &Arc<AtomicBool>,
    ) -> Links {
        let (stage, rank, part) = placement.coordinates()[me];
        let t = placement.grids[stage].tensor.size;
        let tensor = mpi.group(placement.device(stage, rank, 0), part);
        let data = mpi.group(placement.device(stage, 0, part), rank);
        let across = if placement.uniform {
            Across::Pipeline(Box::new(mpi.group(rank * t + part, stage)))
        } else {
            Across::World(Box::new(mpi.group(0, me)))
        };
        Links {
            tensor: Box::new(tensor),
            data: Box::new(data),
            across,
            mail: mpi.mailbox(failed),
        }
    }
}

/// One device's state across steps.
struct Device {
    /// Its place in the mesh (tensor rank fastest, then data rank, then stage).
    index: usize,
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
    /// The GPU its microbatches' forward and backward run on (`None`: the CPU executor).
    accelerator: Option<Accelerator>,
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

/// The devices of a mesh this process hosts and the placement they follow: every device as a
/// thread of this process, or in an MPI job, the one device of this process.
pub struct Mesh {
    placement: Placement,
    devices: Vec<Device>,
    /// In a job of several processes, all of them: what `values` and `states` gather over.
    job: Option<Box<dyn Collective>>,
    /// fp16's dynamic loss scale, the same on every device and process (their steps agree on
    /// overflow); `None` in other formats.
    loss_scale: Option<LossScale>,
    /// Each hosted device's threads for its kernels, when this process hosts several devices
    /// of one stage: its share of the process's threads, so that devices sharing the cores
    /// compute side by side instead of each flooding every core (`None`: the process's own
    /// pool).
    pools: Vec<Option<rayon::ThreadPool>>,
    failed: Arc<AtomicBool>,
}

impl Mesh {
    /// Deals `values` and `states` (whole, as one device would hold them) out to the devices
    /// this process hosts in `world`. In an MPI job every process must build its mesh together
    /// with the others (its groups are split off the job's).
    pub fn new(
        g: &Graph,
        placement: Placement,
        values: &[HostTensor],
        states: &[Option<State>],
        world: &World,
    ) -> Self {
        let failed = Arc::new(AtomicBool::new(false));
        let (hosted, job): (Vec<(usize, Links)>, Option<Box<dyn Collective>>) = match world {
            World::Alone => (
                Links::in_process(&placement, &failed)
                    .into_iter()
                    .enumerate()
                    .collect(),
                None,
            ),
            #[cfg(feature = "mpi")]
            World::Mpi(mpi) => {
                let me = mpi.rank();
                let links = Links::over_mpi(&placement, mpi, me, &failed);
                let job: Box<dyn Collective> = Box::new(mpi.group(0, me));
                (vec![(me, links)], Some(job))
            }
        };
        let coordinates = placement.coordinates();
        let (zero3, sharded) = (placement.zero >= 3, placement.zero >= 1);
        let devices: Vec<Device> = hosted
            .into_iter()
            .map(|(index, links)| {
                let (stage, rank, part) = coordinates[index];
                let grid = &placement.grids[stage];
                let (d, t) = (grid.data, grid.tensor.size);
                let holds = &placement.holds[stage];
                let share = |len: usize| block_shard(len, d, rank);
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
                    .map(|(v, &held)| (zero3 && held).then(|| v.data[share(v.data.len())].to_vec()))
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
                let values = if zero3 {
                    vec![HostTensor::absent(); local.len()]
                } else {
                    local
                };
                Device {
                    index,
                    stage,
                    rank,
                    part,
                    values,
                    shards,
                    states,
                    links: Some(links),
                    peak_bytes: 0,
                    accelerator: None,
                }
            })
            .collect();
        // Stages of a pipeline idle in its bubbles: there a stage that computes is better off
        // with every core the others leave (measured on two cores: pipeline 2 is 10% slower on
        // a core each, data 2 and tensor 2 are 10-20% faster).
        let pools = match placement.pipeline {
            1 => device_pools(devices.len()),
            _ => devices.iter().map(|_| None).collect(),
        };
        Mesh {
            placement,
            devices,
            job,
            loss_scale: None,
            pools,
            failed,
        }
    }

    /// Runs each hosted device's microbatches on `accelerators` (one per hosted device, in
    /// order): their forward and backward, while gradient synchronisation and the optimizer
    /// stay on the host (`Placement::gpu_executable` says which plans).
    pub fn accelerate(&mut self, accelerators: Vec<Accelerator>) -> Result<(), String> {
        self.placement.gpu_executable()?;
        if accelerators.len() != self.devices.len() {
            return Err(format!(
                "{} GPUs for the {} devices of this process",
                accelerators.len(),
                self.devices.len()
            ));
        }
        for (device, accelerator) in self.devices.iter_mut().zip(accelerators) {
            device.accelerator = Some(accelerator);
        }
        Ok(())
    }

    /// The GPU of this process's first device, if it runs on one (evaluation runs there).
    pub fn accelerator(&self) -> Option<&Accelerator> {
        self.devices.first()?.accelerator.as_ref()
    }

    /// fp16's dynamic loss scale as it stands (to save with a checkpoint).
    pub fn loss_scale(&self) -> Option<&LossScale> {
        self.loss_scale.as_ref()
    }

    /// Scales losses dynamically from `scale` on (fp16), or not at all (`None`).
    pub fn scale_losses(&mut self, scale: Option<LossScale>) {
        self.loss_scale = scale;
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
            loss_scale: self.loss_scale.as_ref().map(|s| s.scale),
            updates: step_no.saturating_sub(1 + self.loss_scale.as_ref().map_or(0, |s| s.skipped)),
        };
        let failed = &self.failed;
        let hosted = self.devices.len();
        let mesh_devices = self.placement.devices();
        let results: Vec<Result<StepOutcome, Failure>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .devices
                .iter_mut()
                .zip(&shares)
                .zip(&self.pools)
                .map(|((device, mine), pool)| {
                    let links = device.links.take();
                    let ctx = &ctx;
                    scope.spawn(move || {
                        // A panic anywhere in the step raises the flag too, so that peers
                        // waiting on this device give up.
                        let _raise = RaiseOnPanic(failed);
                        let Some(mut links) = links else {
                            return Err(Failure::Own("the device failed earlier".into()));
                        };
                        // Memory is counted by the thread that runs the step.
                        let mut run = || {
                            let start = memory::start_peak();
                            let held = device.held_bytes();
                            let busy = links.busy();
                            let result = ctx.run(device, &mut links, mine).map(|mut outcome| {
                                outcome.collective_seconds = (links.busy() - busy).as_secs_f64();
                                outcome
                            });
                            let during = usize::try_from(memory::peak() - start).unwrap_or(0);
                            device.peak_bytes = device.peak_bytes.max(held + during);
                            result
                        };
                        let result = match pool {
                            Some(pool) => pool.install(run),
                            None => run(),
                        };
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
        for (device, result) in self.devices.iter().zip(results) {
            match result {
                Ok(mut r) => {
                    collective_seconds += r.collective_seconds / hosted as f64;
                    if stats.is_empty() {
                        stats = std::mem::take(&mut r.stats);
                    }
                    outcome = outcome.or(Some(r));
                }
                Err(Failure::Own(e)) if mesh_devices > 1 => {
                    return Err(format!("device {}: {e}", device.index))
                }
                Err(Failure::Own(e)) => return Err(e),
                Err(Failure::Peer(e)) => peer = peer.or(Some(e)),
            }
        }
        match (outcome, peer) {
            (_, Some(e)) => Err(e.0),
            (Some(r), None) => {
                if let Some(scale) = self.loss_scale.as_mut() {
                    scale.after(r.overflowed);
                }
                Ok(StepOutcome {
                    collective_seconds,
                    stats: self.stats_of_the_job(stats).map_err(|e| e.0)?,
                    ..r
                })
            }
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
            .map(|d| DeviceMemory {
                device: d.index,
                stage: d.stage,
                measured_bytes: d.peak_bytes,
                predicted_bytes: self.placement.memory.get(d.stage).map_or(0.0, |m| m.total),
            })
            .collect()
    }

    /// Whether each flag holds on any process of the job (this process's, when it is alone),
    /// all of them agreed in one all-reduce.
    pub fn anyone<const N: usize>(
        &mut self,
        flags: [bool; N],
    ) -> Result<[bool; N], CollectiveError> {
        let Some(job) = self.job.as_mut() else {
            return Ok(flags);
        };
        let mut counts = flags.map(|flag| f32::from(u8::from(flag)));
        job.all_reduce_sum(&mut counts)?;
        Ok(counts.map(|count| count > 0.0))
    }

    /// What the loss reported, on every process of a job: only the processes of the stage
    /// computing the loss have it, and the job adds theirs (data ranks already summed) to
    /// nothing from everyone else.
    fn stats_of_the_job(&mut self, stats: Stats) -> Result<Stats, CollectiveError> {
        let Some(job) = self.job.as_mut() else {
            return Ok(stats);
        };
        let reports = self
            .devices
            .iter()
            .any(|d| (d.stage, d.rank, d.part) == (self.placement.loss_stage, 0, 0));
        let mut sums: Vec<f32> = STAT_NAMES
            .iter()
            .flat_map(|name| match stats.get(name).filter(|_| reports) {
                Some(&x) => [1.0, x],
                None => [0.0, 0.0],
            })
            .collect();
        job.all_reduce_sum(&mut sums)?;
        Ok(STAT_NAMES
            .iter()
            .zip(sums.chunks(2))
            .filter(|(_, s)| s[0] > 0.0)
            .map(|(&name, s)| (name, s[1]))
            .collect())
    }

    /// Every parameter whole, as one device would hold it. In an MPI job every process must
    /// call this together with the others.
    pub fn values(&mut self, g: &Graph) -> Result<Vec<HostTensor>, CollectiveError> {
        let zero3 = self.placement.zero >= 3;
        let mut values: Vec<HostTensor> = (0..g.params.len())
            .map(|i| {
                let local = self.local_parts(g, i, zero3, |d| {
                    if zero3 {
                        d.shards[i].clone().unwrap_or_default()
                    } else {
                        d.values[i].data.clone()
                    }
                });
                self.unshard(g, i, local)
            })
            .collect();
        self.sum_over_job(values.iter_mut().map(|v| v.data.as_mut_slice()))?;
        Ok(values)
    }

    /// Every trainable parameter's optimizer state whole, gathered from the devices owning it.
    /// In an MPI job every process must call this together with the others.
    pub fn states(&mut self, g: &Graph) -> Result<Vec<Option<State>>, CollectiveError> {
        // Whether the devices of the stage first holding each parameter have its moments (the
        // optimizer has not updated a parameter yet, or it is frozen), counted over the job.
        let mut missing: Vec<f32> = (0..g.params.len())
            .map(|i| {
                let stage = self.first_holder(i);
                let hosted = self.devices.iter().filter(|d| d.stage == stage);
                hosted.filter(|d| d.states[i].is_none()).count() as f32
            })
            .collect();
        self.sum_over_job(std::iter::once(missing.as_mut_slice()))?;
        let sharded = self.placement.zero >= 1;
        let mut states: Vec<Option<State>> = (0..g.params.len())
            .map(|i| {
                if missing[i] > 0.0 {
                    return None;
                }
                let moment = |d: &Device, m: bool| {
                    d.states[i]
                        .as_ref()
                        .map(|s| if m { s.m.clone() } else { s.v.clone() })
                        .unwrap_or_default()
                };
                let m = self.local_parts(g, i, sharded, |d| moment(d, true));
                let v = self.local_parts(g, i, sharded, |d| moment(d, false));
                Some(State {
                    m: self.unshard(g, i, m).data,
                    v: self.unshard(g, i, v).data,
                })
            })
            .collect();
        self.sum_over_job(
            states
                .iter_mut()
                .flatten()
                .flat_map(|s| [s.m.as_mut_slice(), s.v.as_mut_slice()]),
        )?;
        Ok(states)
    }

    /// In a job of several processes, `buffer` becomes the sum of every process's (each filling
    /// in what it knows and leaving zeros elsewhere, it reaches them all).
    pub fn share_over_job(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        self.sum_over_job(std::iter::once(buffer))
    }

    /// In a job of several processes, each buffer becomes the sum of every process's: pieces
    /// each process filled in where it hosts their device, and left zero elsewhere.
    fn sum_over_job<'a>(
        &mut self,
        buffers: impl Iterator<Item = &'a mut [f32]>,
    ) -> Result<(), CollectiveError> {
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        let mut buffers: Vec<&mut [f32]> = buffers.collect();
        let mut flat: Vec<f32> = buffers.iter().flat_map(|b| b.iter().copied()).collect();
        job.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        for b in &mut buffers {
            let n = b.len();
            b.copy_from_slice(&flat[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// Each tensor-parallel rank's local copy of something about parameter `i` (read by
    /// `part_of` from the devices of the first stage holding it), reassembled from the
    /// data-parallel group's shares when `shared` (ZeRO), else read from data rank 0. Pieces
    /// of devices another process hosts are left zero.
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
        (0..t)
            .map(|part| {
                let local_shape = layout.local_shape(&param_shape(&g.params[i]), part, t);
                let len: usize = local_shape.iter().product();
                let mut data = vec![0.0; len];
                let ranks = if shared { 0..d } else { 0..1 };
                for rank in ranks {
                    let Some(device) = self.hosted(self.placement.device(stage, rank, part)) else {
                        continue;
                    };
                    let piece = part_of(device);
                    let into = if shared {
                        block_shard(len, d, rank)
                    } else {
                        0..len
                    };
                    data[into].copy_from_slice(&piece);
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

    /// Device `index` of the mesh, if this process hosts it.
    fn hosted(&self, index: usize) -> Option<&Device> {
        self.devices.iter().find(|d| d.index == index)
    }
}

/// A pool of threads for each of `hosted` devices sharing this process's threads (as many as
/// its own pool has: the cores, or `RAYON_NUM_THREADS`), an equal share each; none for one
/// device, which uses the process's pool whole. A pool that cannot be made (no thread to be
/// had) leaves its device on the process's pool.
fn device_pools(hosted: usize) -> Vec<Option<rayon::ThreadPool>> {
    if hosted <= 1 {
        return (0..hosted).map(|_| None).collect();
    }
    let share = (rayon::current_num_threads() / hosted).max(1);
    (0..hosted)
        .map(|d| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(share)
                .thread_name(move |i| format!("kiln-device-{d}-{i}"))
                .build()
                .ok()
        })
        .collect()
}

fn own(e: ExecError) -> Failure {
    Failure::Own(e.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny GPT-2 of `train` on cpu(2) with `parallel`, its parameters all 0.01.
    fn tiny(parallel: &str, train: &str) -> (Train, Graph, Placement, Vec<HostTensor>) {
        let src = format!(
            "import std.models.gpt2\nexperiment e {{ model = gpt2 {{ vocab = 64, positions = 16, hidden = 16, layers = 2, heads = 2 }}, parallel {{ mesh = cpu(2), {parallel} }}, train {{ batch = 2, micro_batch = 1, seq_len = 8{train} }} }}"
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
        (e.train, graph, placement, values)
    }

    fn labelled(rows: usize) -> Batch {
        let ids: Vec<Vec<i64>> = (0..rows)
            .map(|r| (1 + r as i64..9 + r as i64).collect())
            .collect();
        let mut b = Batch::default();
        b.ints.insert("input_ids".into(), ids.clone());
        b.ints.insert("labels".into(), ids);
        b
    }

    /// Under fp16, gradients that overflow at the loss scale skip the step on every device
    /// (weights and moments untouched, the norm reported infinite) and halve the scale; the
    /// next step at the smaller scale updates, and counts as the optimizer's first.
    #[test]
    fn an_overflow_under_fp16_skips_the_step_and_halves_the_scale() {
        let (train, graph, placement, values) = tiny("data = 2, zero = 1", ", precision = f16");
        let states = vec![None; values.len()];
        let mut mesh = Mesh::new(&graph, placement, &values, &states, &World::Alone);
        mesh.scale_losses(Some(LossScale::starting_at(f32::MAX)));
        let micros = [labelled(2)];
        let skipped = mesh.step(&graph, &train, &micros, 1e-3, 1).unwrap();
        assert!(skipped.overflowed && !skipped.grad_norm.is_finite());
        assert_eq!(mesh.values(&graph).unwrap(), values, "no weight moved");
        assert!(mesh.states(&graph).unwrap().iter().all(Option::is_none));
        let scale = mesh.loss_scale().unwrap().clone();
        assert_eq!((scale.scale, scale.skipped), (f32::MAX / 2.0, 1));

        let mut smaller = scale;
        smaller.scale = 1024.0;
        mesh.scale_losses(Some(smaller));
        let updated = mesh.step(&graph, &train, &micros, 1e-3, 2).unwrap();
        assert!(!updated.overflowed && updated.grad_norm.is_finite());
        assert_ne!(mesh.values(&graph).unwrap(), values);
        // Adam's first update moves each weight by about the learning rate, whatever the
        // gradient's size: bias correction counted one update, not two.
        let moved = mesh.values(&graph).unwrap();
        let wte = graph
            .params
            .iter()
            .position(|p| p.name.ends_with("wte.weight"))
            .unwrap();
        let step = (moved[wte].data[64] - values[wte].data[64]).abs();
        assert!((step - 1e-3).abs() < 1e-4, "{step}");

        // A scale of exactly 1 is still a scale: the norm that detects overflow is taken even
        // without clipping.
        let (train, graph, placement, values) =
            tiny("data = 2", ", precision = f16, grad_clip = false");
        let mut mesh = Mesh::new(&graph, placement, &values, &states, &World::Alone);
        mesh.scale_losses(Some(LossScale::starting_at(1.0)));
        let outcome = mesh.step(&graph, &train, &micros, 1e-3, 1).unwrap();
        assert!(!outcome.overflowed && outcome.grad_norm > 0.0);
    }

    /// A step whose devices run on (emulated) GPUs gives the weights a step on CPU threads
    /// gives, dropout included: data parallelism, and ZeRO-2's reduce-scatter as the GPU's
    /// gradients arrive.
    #[test]
    fn a_step_on_gpus_matches_the_step_on_the_cpu() {
        use crate::gpu::emulator::emulator;
        const LR: f64 = 1e-3;
        let mut batch = labelled(2);
        batch.dropout = Some(crate::exec::DropoutKey::new(5, 1, vec![0, 1]));
        let micros = [batch];
        for parallel in ["data = 2", "data = 2, zero = 2"] {
            let (train, graph, placement, values) = tiny(parallel, "");
            let states = vec![None; values.len()];
            let mut cpu = Mesh::new(&graph, placement.clone(), &values, &states, &World::Alone);
            let mut gpu = Mesh::new(&graph, placement, &values, &states, &World::Alone);
            let gpus = (0..2).map(|_| Accelerator::Emulated(emulator())).collect();
            gpu.accelerate(gpus).unwrap();
            let want = cpu.step(&graph, &train, &micros, LR, 1).unwrap();
            let got = gpu.step(&graph, &train, &micros, LR, 1).unwrap();
            let (loss, norm) = ((got.loss, want.loss), (got.grad_norm, want.grad_norm));
            assert!((loss.0 - loss.1).abs() < 1e-5, "{parallel}: {loss:?}");
            assert!(
                (norm.0 - norm.1).abs() < 1e-5 * norm.1,
                "{parallel}: {norm:?}"
            );
            // Adam moves a weight by about the learning rate whatever its gradient's size, so
            // gradients near zero (these weights are all alike) that differ in their last bits
            // move weights differently: a weight may differ by a small part of the step.
            let (got, want) = (gpu.values(&graph).unwrap(), cpu.values(&graph).unwrap());
            for ((g, w), p) in got.iter().zip(&want).zip(&graph.params) {
                let worst = g
                    .data
                    .iter()
                    .zip(&w.data)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    worst < 0.05 * LR as f32,
                    "{parallel}: `{}` differs by {worst}",
                    p.name
                );
            }
            // The next step reads the updated weights on both.
            let want = cpu.step(&graph, &train, &micros, LR, 2).unwrap().loss;
            let got = gpu.step(&graph, &train, &micros, LR, 2).unwrap().loss;
            assert!((got - want).abs() < 1e-5, "{parallel}: {got} vs {want}");
        }
    }

    /// Plans whose devices do not hold the whole graph are refused by the GPU executor, naming
    /// what it does not run yet.
    #[test]
    fn the_gpu_executor_refuses_what_it_does_not_run_yet() {
        use crate::gpu::emulator::emulator;
        for (parallel, what) in [
            ("pipeline = 2", "pipeline parallelism"),
            ("tensor = 2", "tensor parallelism"),
            ("data = 2, zero = 3", "ZeRO-3"),
            ("data = 2, recompute = full", "recomputation"),
        ] {
            let (_, graph, placement, values) = tiny(parallel, "");
            let states = vec![None; values.len()];
            let mut mesh = Mesh::new(&graph, placement, &values, &states, &World::Alone);
            let gpus = (0..2).map(|_| Accelerator::Emulated(emulator())).collect();
            let refused = mesh.accelerate(gpus).unwrap_err();
            assert!(refused.contains(what), "{parallel}: {refused}");
        }
    }

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
            let (train, graph, placement, values) = tiny(parallel, "");
            let states = vec![None; values.len()];
            let (done, finished) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut mesh = Mesh::new(&graph, placement, &values, &states, &World::Alone);
                done.send(mesh.step(&graph, &train, &micros, 1e-3, 1).err())
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
