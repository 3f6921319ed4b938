//! The analytic cost model: time and memory of one training iteration for a strategy, from
//! the layer profiles and the cluster. Formulas and constants: shared/reference/cost-model.md;
//! calibration (matmul efficiency, achievable bandwidths, reserves) is data in the cluster spec.
//!
//! Longer than most files (~820 lines) because every time and memory term is a method of one
//! `Model` and they are reviewed together against the reference formulas.

use super::collective::{self, Collective, Collective::*, Group};
use super::profile::{Gemm, GemmSplit, LayerProfile};
use crate::graph::LayerKind;
use crate::spec::{Cluster, Offload, PipelineSchedule, Precision, Recompute, WeightGather};
use rayon::prelude::*;
use serde::Serialize;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::ops::Range;

/// One way to run the experiment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Strategy {
    pub data: u64,
    pub tensor: u64,
    pub pipeline: u64,
    /// Sequences per microbatch, per data-parallel replica.
    pub micro_batch: u64,
    /// Microbatches per iteration per pipeline.
    pub microbatches: u64,
    pub schedule: ScheduleChoice,
    pub zero: u8,
    pub recompute: RecomputeChoice,
    pub sequence_parallel: bool,
}

/// The devices of one pipeline stage, as a grid of data-parallel replicas of tensor-parallel
/// groups (rank order inside the stage: tensor fastest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Submesh {
    pub data: u64,
    pub tensor: u64,
    pub sequence_parallel: bool,
}

impl Submesh {
    pub fn devices(&self) -> u64 {
        self.data * self.tensor
    }
}

impl Strategy {
    /// The submesh every stage runs on when stages are uniform.
    pub fn submesh(&self) -> Submesh {
        Submesh {
            data: self.data,
            tensor: self.tensor,
            sequence_parallel: self.sequence_parallel,
        }
    }

    /// Sequences in one pipeline microbatch (every stage's replicas together).
    pub fn pipeline_microbatch(&self) -> u64 {
        self.data * self.micro_batch
    }

    /// What one stage runs: the same pipeline microbatch split over the stage's own submesh.
    pub fn on(&self, submesh: Submesh) -> Strategy {
        Strategy {
            data: submesh.data,
            tensor: submesh.tensor,
            sequence_parallel: submesh.sequence_parallel,
            micro_batch: self.pipeline_microbatch() / submesh.data,
            ..*self
        }
    }
}

/// A stage's layer ranges: one, or one per chunk when interleaved. Inline, because the search
/// builds one per stage of every candidate (allocation dominated the uniform path).
pub type LayerRanges = SmallVec<[Range<usize>; 4]>;

/// A pipeline stage before it is costed: its layer ranges (several chunks when interleaved)
/// and the submesh it runs on.
#[derive(Clone, Debug, PartialEq)]
pub struct StagePlace {
    pub layers: LayerRanges,
    pub submesh: Submesh,
}

/// Where a stage sits in its pipeline: how many microbatches' activations it keeps, and
/// whether it has send/receive buffers, depend on it.
#[derive(Clone, Copy, Debug)]
pub struct Position {
    pub index: u64,
    pub stages: u64,
}

/// Orderable mirrors of the spec enums (the search breaks ties by a stable order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleChoice {
    #[serde(rename = "1f1b")]
    OneFOneB,
    Interleaved(u64),
    Gpipe,
}

impl ScheduleChoice {
    pub fn from_spec(s: PipelineSchedule) -> Self {
        match s {
            PipelineSchedule::Gpipe => ScheduleChoice::Gpipe,
            PipelineSchedule::OneFOneB => ScheduleChoice::OneFOneB,
            PipelineSchedule::Interleaved { chunks } => ScheduleChoice::Interleaved(chunks),
        }
    }

    pub fn chunks(self) -> u64 {
        match self {
            ScheduleChoice::Interleaved(v) => v,
            _ => 1,
        }
    }
}

impl std::fmt::Display for ScheduleChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScheduleChoice::OneFOneB => f.write_str("1f1b"),
            ScheduleChoice::Interleaved(v) => write!(f, "interleaved({v})"),
            ScheduleChoice::Gpipe => f.write_str("gpipe"),
        }
    }
}

impl std::fmt::Display for RecomputeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecomputeChoice::None => "none",
            RecomputeChoice::Selective => "selective",
            RecomputeChoice::Full => "full",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecomputeChoice {
    None,
    Selective,
    Full,
}

impl RecomputeChoice {
    pub fn from_spec(r: Recompute) -> Self {
        match r {
            Recompute::None => RecomputeChoice::None,
            Recompute::Selective => RecomputeChoice::Selective,
            Recompute::Full => RecomputeChoice::Full,
        }
    }
}

/// Fixed inputs of the cost model.
pub struct Model<'a> {
    pub layers: &'a [LayerProfile],
    pub cluster: &'a Cluster,
    pub precision: Precision,
    /// Global batch (sequences) the profiles were computed for.
    pub batch: u64,
    pub offload: Offload,
    /// Whether gradient reduction overlaps the backward pass (`overlap_grad_sync`).
    pub overlap: bool,
    /// How ZeRO-3 gathers weights (`weight_gather`).
    pub weight_gather: WeightGather,
    /// Share of NCCL's bus bandwidth the framework's collectives reach.
    pub collective_efficiency: f64,
}

/// Seconds of one iteration, by cause.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TimeBreakdown {
    pub compute: f64,
    pub recompute: f64,
    pub tensor_comm: f64,
    pub pipeline_bubble: f64,
    pub p2p: f64,
    pub data_parallel: f64,
    /// The optimizer step: memory-bound reads and writes of the (ZeRO-sharded) states.
    pub optimizer: f64,
    pub total: f64,
}

/// Bytes on one device of a stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MemoryBreakdown {
    pub weights: f64,
    pub gradients: f64,
    pub optimizer: f64,
    pub activations: f64,
    pub buffers: f64,
    pub total: f64,
    pub capacity: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageCost {
    /// Layer ranges `[start, end)` into the profiles (several with an interleaved schedule).
    pub layers: SmallVec<[(usize, usize); 4]>,
    pub submesh: Submesh,
    /// Device ids `[start, end)`: stages hold consecutive ranges, in pipeline order.
    pub devices: (u64, u64),
    /// Seconds per microbatch: forward, backward, recompute, tensor-parallel communication.
    pub forward: f64,
    pub backward: f64,
    pub recompute: f64,
    pub tensor_comm: f64,
    /// Parameters and trainable parameters one device holds (tensor-split, before ZeRO).
    pub params: f64,
    pub trainable: f64,
    /// Modules owning parameters (what ZeRO-3 gathers one collective each).
    pub modules: f64,
    pub memory: MemoryBreakdown,
}

impl StageCost {
    pub fn per_microbatch(&self) -> f64 {
        self.forward + self.backward + self.recompute + self.tensor_comm
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evaluation {
    pub strategy: Strategy,
    pub stages: Vec<StageCost>,
    pub time: TimeBreakdown,
    /// FLOPs of the iteration including recompute (what Megatron's TF/s counts).
    pub hardware_flops: f64,
    /// FLOPs without recompute (what MFU counts).
    pub model_flops: f64,
    pub fits: bool,
}

impl Evaluation {
    pub fn peak_memory(&self) -> f64 {
        self.stages
            .iter()
            .map(|s| s.memory.total)
            .fold(0.0, f64::max)
    }

    /// Whether every stage runs on the strategy's submesh (what the executor can run).
    pub fn uniform(&self) -> bool {
        self.stages
            .iter()
            .all(|st| st.submesh == self.strategy.submesh())
    }
}

impl TimeBreakdown {
    /// The pipeline's part of the step: microbatches through the stages, bubble and transfers.
    pub fn pipeline(&self) -> f64 {
        self.compute + self.recompute + self.tensor_comm + self.pipeline_bubble + self.p2p
    }
}

/// Output tiles of a matrix product, 128 × 128 (cuBLAS's and CUTLASS's usual bf16 tile on
/// A100 and H100), as NVIDIA's "Matrix Multiplication Background User's Guide" models them.
const TILE: f64 = 128.0;

/// The work a `rows × cols` output wastes on `sms` multiprocessors, as a share of the useful
/// work: tile quantisation (partial tiles at the edges compute whole) and wave quantisation
/// (the last wave of tiles leaves multiprocessors idle) — the guide's two effects.
///
/// An output narrower than a tile on either side (a LoRA rank's products) is left out: cuBLAS
/// runs those with smaller tiles or split-K, and their FLOPs are a rounding error anyway.
pub fn wave_waste(rows: f64, cols: f64, sms: f64) -> f64 {
    if rows < TILE || cols < TILE {
        return 0.0;
    }
    let tiles = (rows / TILE).ceil() * (cols / TILE).ceil();
    let computed = (tiles / sms).ceil() * sms * TILE * TILE;
    computed / (rows * cols) - 1.0
}

/// FLOPs a device's matrix products waste to quantisation in one microbatch of
/// `micro_batch` sequences on `t`-way tensor parallelism: forward, and backward (input and
/// weight gradients, each its own output shape).
fn wave_losses(gemms: &[Gemm], micro_batch: f64, t: f64, sms: f64) -> (f64, f64) {
    let (mut fwd, mut bwd) = (0.0, 0.0);
    for g in gemms {
        let m = micro_batch * g.rows_per_sequence;
        let (k, n) = match g.split {
            GemmSplit::N => (g.k, g.n / t),
            GemmSplit::K => (g.k / t, g.n),
            GemmSplit::None => (g.k, g.n),
        };
        let flops = 2.0 * m * k * n;
        fwd += flops * wave_waste(m, n, sms);
        if g.input_grad {
            bwd += flops * wave_waste(m, k, sms);
        }
        if g.weight_grad {
            bwd += flops * wave_waste(k, n, sms);
        }
    }
    (fwd, bwd)
}

impl Model<'_> {
    pub fn element_bytes(&self) -> f64 {
        match self.precision {
            Precision::F32 | Precision::Tf32 => 4.0,
            Precision::Bf16 | Precision::F16 => 2.0,
        }
    }

    fn flop_rate(&self) -> f64 {
        self.peak_flops() * self.cluster.node.device.matmul_efficiency
    }

    /// What a fused attention kernel achieves: FlashAttention-2 reaches 50-73% of an A100's
    /// peak (Dao 2023) but about 35% of an H100's (Shah et al. 2024, FlashAttention-3).
    fn attention_rate(&self) -> f64 {
        self.peak_flops() * self.cluster.node.device.attention_efficiency
    }

    pub fn peak_flops(&self) -> f64 {
        let device = &self.cluster.node.device;
        device
            .peak
            .get(&self.precision)
            .or_else(|| device.peak.values().next())
            .copied()
            .unwrap_or(1.0)
    }

    /// Achievable bandwidth and latency of a point-to-point link: NVLink inside a node; across
    /// nodes the sending device's own network adapter.
    fn link(&self, same_node: bool) -> (f64, f64) {
        let node = &self.cluster.node;
        if same_node {
            (node.intra_bandwidth, node.intra_latency)
        } else {
            let bw = (node.inter_bandwidth / node.devices as f64).min(node.intra_bandwidth);
            (bw, node.inter_latency)
        }
    }

    /// The ranks of a collective: `n` of them `stride` apart in a stage's rank order (tensor
    /// fastest, then data).
    fn group(&self, n: u64, stride: u64) -> Group {
        Group::strided(n, stride, self.cluster.node.devices)
    }

    /// Seconds of collective `c` over `bytes` in `group` (see [`collective`]),
    /// at the framework's `collective_efficiency`.
    fn collective(&self, c: Collective, bytes: f64, group: Group) -> f64 {
        collective::seconds(
            &self.cluster.node,
            c,
            bytes,
            group,
            self.collective_efficiency,
        )
    }

    /// Seconds to move one microbatch's boundary activation (or its gradient) from a stage on
    /// devices `start..start + from` to the next stage of `to` devices: the side with fewer
    /// devices carries the largest share; inside a node when both stages are in one.
    pub fn transfer(&self, s: &Strategy, start: u64, from: u64, to: u64) -> f64 {
        let bytes = self.layers.first().map_or(0.0, |l| l.boundary_bytes)
            * s.pipeline_microbatch() as f64
            / self.batch as f64
            / from.min(to) as f64;
        let node = self.cluster.node.devices;
        let (bw, lat) = self.link(start / node == (start + from + to - 1) / node);
        bytes / bw + lat
    }

    /// Layers of each stage for `p` stages: blocks as even as possible, the embedding with the
    /// first stage and the head with the last.
    pub fn balanced_stages(&self, p: u64) -> Vec<Range<usize>> {
        let n = self.layers.len();
        let blocks: Vec<usize> = (0..n)
            .filter(|&i| self.layers[i].kind == Some(LayerKind::Block))
            .collect();
        let (first_block, nblocks) = (blocks.first().copied().unwrap_or(1), blocks.len());
        let p = p as usize;
        let mut out = Vec::with_capacity(p);
        let mut start = 0;
        for i in 0..p {
            let end_block = first_block + nblocks * (i + 1) / p;
            let end = if i + 1 == p { n } else { end_block };
            out.push(start..end);
            start = end;
        }
        out
    }

    /// Per-layer terms of a strategy, as prefix sums: any stage's cost is then O(1).
    fn prefix(&self, s: &Strategy) -> Vec<Terms> {
        let f = s.micro_batch as f64 / self.batch as f64;
        let t = s.tensor as f64;
        let rate = self.flop_rate();
        let attention_rate = self.attention_rate();
        let hbm = self.cluster.node.device.hbm_bandwidth;
        let repl_div = if s.sequence_parallel { t } else { 1.0 };
        let tensor_group = self.group(s.tensor, 1);
        let mut out = vec![Terms::default()];
        let sms = self.cluster.node.device.multiprocessors;
        for l in self.layers {
            let mem = (l.mem_split / t + l.mem_repl / repl_div) * f / hbm;
            let (waves_fwd, waves_bwd) = match sms {
                Some(sms) => wave_losses(&l.gemms, s.micro_batch as f64, t, sms as f64),
                None => (0.0, 0.0),
            };
            let forward = (l.flops_fwd / t * f + waves_fwd) / rate
                + l.flash_flops_fwd / t * f / attention_rate
                + mem;
            let backward = (l.flops_bwd / t * f + waves_bwd) / rate
                + l.flash_flops_bwd / t * f / attention_rate
                + if l.has_backward { 2.0 * mem } else { 0.0 };
            let block = l.kind == Some(LayerKind::Block);
            let recompute = match s.recompute {
                RecomputeChoice::Full if block => forward,
                RecomputeChoice::Selective if block => {
                    (l.attn_flops_fwd / rate + l.attn_mem / hbm) / t * f
                }
                _ => 0.0,
            };
            let layer_saved = (l.saved_split / t + l.saved_repl / repl_div) * f;
            let saved = match s.recompute {
                RecomputeChoice::Full if block => 0.0,
                RecomputeChoice::Selective if block => layer_saved - l.selective / t * f,
                _ => layer_saved,
            };
            let kept = if s.recompute == RecomputeChoice::Full && block {
                l.boundary_bytes * f / repl_div
            } else {
                0.0
            };
            // Megatron: two all-reduces of the hidden state forward and two backward per block
            // (two more when full recompute repeats the forward); one for the vocabulary-parallel
            // embedding.
            let collectives = match l.kind {
                Some(LayerKind::Block) => {
                    4.0 + if s.recompute == RecomputeChoice::Full {
                        2.0
                    } else {
                        0.0
                    }
                }
                Some(LayerKind::Embedding) => 1.0,
                _ => 0.0,
            };
            let term = Terms {
                forward,
                backward,
                recompute,
                tensor_comm: collectives
                    * self.collective(AllReduce, l.boundary_bytes * f, tensor_group),
                params: l.params_split / t + l.params_repl,
                trainable: l.trainable_split / t + l.trainable_repl,
                modules: l.modules,
                saved,
                kept,
                largest: layer_saved,
            };
            let last = *out.last().unwrap_or(&Terms::default());
            out.push(last.plus(&term));
        }
        out
    }

    /// Prefix sums for every distinct per-layer setting among `strategies`, computed in
    /// parallel.
    pub fn prefixes<'s>(&self, strategies: impl IntoIterator<Item = &'s Strategy>) -> Prefixes {
        let mut keyed: Vec<(PrefixKey, &Strategy)> =
            strategies.into_iter().map(|s| (prefix_key(s), s)).collect();
        keyed.sort_by_key(|(k, _)| *k);
        keyed.dedup_by_key(|(k, _)| *k);
        keyed
            .par_iter()
            .map(|(k, s)| (*k, self.prefix(s)))
            .collect()
    }

    /// The stage layout of a strategy: blocks as even as possible; with an interleaved
    /// schedule the model is cut into p·v chunks and rank i holds chunks i, i+p, i+2p, ...
    pub fn layout(&self, s: &Strategy) -> Vec<StagePlace> {
        let place = |layers| StagePlace {
            layers,
            submesh: s.submesh(),
        };
        match s.schedule {
            ScheduleChoice::Interleaved(v) if s.pipeline > 1 => {
                let chunks = self.balanced_stages(s.pipeline * v);
                let p = s.pipeline as usize;
                (0..p)
                    .map(|i| place(chunks.iter().skip(i).step_by(p).cloned().collect()))
                    .collect()
            }
            _ => self
                .balanced_stages(s.pipeline)
                .into_iter()
                .map(|r| place(std::iter::once(r).collect()))
                .collect(),
        }
    }

    /// The cost of one stage (its layer ranges) from prefix sums; `s` is the stage's own
    /// strategy (see [`Strategy::on`]).
    pub fn stage(
        &self,
        s: &Strategy,
        prefix: &[Terms],
        ranges: &[Range<usize>],
        at: Position,
    ) -> StageCost {
        let sum = ranges.iter().fold(Terms::default(), |acc, r| {
            acc.plus(&prefix[r.end].minus(&prefix[r.start]))
        });
        let (p, i) = (at.stages, at.index);
        // Microbatches whose activations are alive at once on this stage: all of them under
        // GPipe; p − i under 1F1B; interleaved, the warmup of 2(p−i−1) + (v−1)p chunks plus
        // one, each 1/v of a microbatch (stage 0: p·(1 + (p−1)/(p·v)), as in Korthikanti).
        let in_flight = match s.schedule {
            ScheduleChoice::Gpipe => s.microbatches as f64,
            ScheduleChoice::OneFOneB => (p - i).min(s.microbatches) as f64,
            ScheduleChoice::Interleaved(v) => {
                let chunks = (2 * (p - i - 1) + (v - 1) * p + 1).min(s.microbatches * v);
                chunks as f64 / v as f64
            }
        };
        let activations = if s.recompute == RecomputeChoice::Full {
            // The largest single layer's activations are live while full recompute rebuilds it.
            let largest = ranges
                .iter()
                .flat_map(|r| r.start..r.end)
                .map(|l| prefix[l + 1].largest - prefix[l].largest)
                .fold(0.0, f64::max);
            (sum.kept + sum.saved) * in_flight + largest
        } else {
            sum.saved * in_flight
        } * self.cluster.node.device.activation_overhead;
        let boundary = self.layers.first().map_or(0.0, |l| l.boundary_bytes) * s.micro_batch as f64
            / self.batch as f64;
        let memory = self.memory(s, sum.params, sum.trainable, activations, boundary, p > 1);
        StageCost {
            layers: ranges.iter().map(|r| (r.start, r.end)).collect(),
            submesh: s.submesh(),
            // From device 0 until [`Model::evaluate_with`] places the stage after the others.
            devices: (0, s.submesh().devices()),
            forward: sum.forward,
            backward: sum.backward,
            recompute: sum.recompute,
            tensor_comm: sum.tensor_comm,
            params: sum.params,
            trainable: sum.trainable,
            modules: sum.modules,
            memory,
        }
    }

    /// Model states (ZeRO, Rajbhandari et al. 2020) plus activations and, between pipeline
    /// stages, send/receive buffers.
    fn memory(
        &self,
        s: &Strategy,
        params: f64,
        trainable: f64,
        activations: f64,
        boundary: f64,
        pipelined: bool,
    ) -> MemoryBreakdown {
        let (weights, gradients, optimizer) =
            model_states(params, trainable, s.zero, s.data, self.precision);
        let weights = weights * self.cluster.node.device.weight_copies;
        let (weights, optimizer) = match self.offload {
            Offload::None => (weights, optimizer),
            Offload::Optimizer => (weights, 0.0),
            Offload::All => (0.0, 0.0),
        };
        // Send/receive buffers for the stage boundary, both directions.
        let buffers = if pipelined { 2.0 * boundary } else { 0.0 };
        let device = &self.cluster.node.device;
        let total = weights + gradients + optimizer + activations + buffers;
        MemoryBreakdown {
            weights,
            gradients,
            optimizer,
            activations,
            buffers,
            total,
            capacity: device.memory - device.memory_reserve,
        }
    }

    /// Time and memory of a strategy with the given stages.
    pub fn evaluate(&self, s: &Strategy, layout: &[StagePlace]) -> Evaluation {
        let stage_strategies: Vec<Strategy> = layout.iter().map(|st| s.on(st.submesh)).collect();
        self.evaluate_with(s, layout, &self.prefixes(&stage_strategies))
    }

    /// [`Model::evaluate`] with the stages' prefix sums already computed.
    pub fn evaluate_with(
        &self,
        s: &Strategy,
        layout: &[StagePlace],
        prefixes: &Prefixes,
    ) -> Evaluation {
        let p = layout.len() as u64;
        let mut next_device = 0;
        // Stages on one submesh share their prefix sums: looked up once.
        let mut prefix: Option<(PrefixKey, &[Terms])> = None;
        let stages: Vec<StageCost> = layout
            .iter()
            .enumerate()
            .map(|(i, place)| {
                let on = s.on(place.submesh);
                let key = prefix_key(&on);
                let terms = match prefix {
                    Some((k, terms)) if k == key => terms,
                    _ => &prefixes[&key],
                };
                prefix = Some((key, terms));
                let at = Position {
                    index: i as u64,
                    stages: p,
                };
                let mut st = self.stage(&on, terms, &place.layers, at);
                st.devices = (next_device, next_device + place.submesh.devices());
                next_device = st.devices.1;
                st
            })
            .collect();
        let slowest = stages
            .iter()
            .max_by(|a, b| a.per_microbatch().total_cmp(&b.per_microbatch()));
        let of_slowest = |f: fn(&StageCost) -> f64| slowest.map_or(0.0, f);
        let longest = of_slowest(StageCost::per_microbatch);
        let m = s.microbatches as f64;
        let v = s.schedule.chunks() as f64;
        // A synchronous pipeline takes Σ t_i + (m − 1)·max t_j (Alpa §5; Narayanan et al. 2021
        // Eq. 1 for equal stages), each term 1/v of a stage per chunk when interleaved.
        let all: f64 = stages.iter().map(StageCost::per_microbatch).sum();
        let bubble = (all - longest) / v;
        // Stage boundaries: an activation forward and its gradient back per microbatch, on
        // the critical path once per chunk; the slowest boundary sets the pace.
        let p2p = stages
            .windows(2)
            .map(|w| {
                let from = w[0].submesh.devices();
                self.transfer(s, w[0].devices.0, from, w[1].submesh.devices())
            })
            .reduce(f64::max)
            .map_or(0.0, |x| 2.0 * v * (m + p as f64 - 1.0) * x);
        // Each stage synchronises its own gradients over its own data-parallel group.
        let data_parallel = stages
            .iter()
            .map(|st| self.sync(&s.on(st.submesh), st))
            .fold(0.0, f64::max);
        let optimizer = stages
            .iter()
            .map(|st| self.optimizer_step(&s.on(st.submesh), st))
            .fold(0.0, f64::max);
        let time = TimeBreakdown {
            compute: m * of_slowest(|st| st.forward + st.backward),
            recompute: m * of_slowest(|st| st.recompute),
            tensor_comm: m * of_slowest(|st| st.tensor_comm),
            pipeline_bubble: bubble,
            p2p,
            data_parallel,
            optimizer,
            total: m * longest + bubble + p2p + data_parallel + optimizer,
        };
        let fits = stages
            .iter()
            .all(|st| st.memory.total <= st.memory.capacity);
        let model_flops: f64 = self
            .layers
            .iter()
            .map(|l| l.counted.fwd + l.counted.bwd)
            .sum();
        let recompute_flops: f64 = match s.recompute {
            RecomputeChoice::None => 0.0,
            RecomputeChoice::Selective => self
                .layers
                .iter()
                .filter(|l| l.kind == Some(LayerKind::Block))
                .map(|l| l.counted.attn_fwd)
                .sum(),
            RecomputeChoice::Full => self
                .layers
                .iter()
                .filter(|l| l.kind == Some(LayerKind::Block))
                .map(|l| l.counted.fwd)
                .sum(),
        };
        Evaluation {
            strategy: *s,
            stages,
            time,
            hardware_flops: model_flops + recompute_flops,
            model_flops,
            fits,
        }
    }

    /// Seconds of one stage's optimizer step (and, offloaded, of what moves to and from the
    /// host); `s` is the stage's own strategy. Adam reads and writes fp32 master weights and
    /// both moments, reads the gradient and writes the working copy: about 28 bytes per
    /// trainable parameter a device owns, through its HBM. Offloaded (ZeRO-Offload, Ren et al.
    /// 2021), each device sends its owned gradients to the host and takes the updated working
    /// copy back over its host link, and the host's memory streams the 28 bytes for every
    /// device of the node. Offloading the weights as well (ZeRO-Infinity) also streams the
    /// weights a device holds in from the host for the forward and the backward of every
    /// microbatch.
    pub fn optimizer_step(&self, s: &Strategy, stage: &StageCost) -> f64 {
        let node = &self.cluster.node;
        let owners = if s.zero >= 1 { s.data as f64 } else { 1.0 };
        let owned = stage.trainable / owners;
        if self.offload == Offload::None {
            return 28.0 * owned / node.device.hbm_bandwidth;
        }
        // Planning refuses offload on a node that does not describe its host (`plan::mod`).
        let link = node.host_bandwidth.unwrap_or(f64::INFINITY);
        let host = node.host_memory_bandwidth.unwrap_or(f64::INFINITY);
        let bytes = self.element_bytes();
        let mut seconds = 2.0 * bytes * owned / link + 28.0 * owned * node.devices as f64 / host;
        if self.offload == Offload::All {
            let held = stage.params / if s.zero >= 3 { s.data as f64 } else { 1.0 };
            seconds += 2.0 * s.microbatches as f64 * bytes * held / link;
        }
        seconds
    }

    /// Seconds to synchronise one stage's gradients of trainable parameters over its
    /// data-parallel group (see [`SyncTime`]); `s` is the stage's own strategy.
    pub fn sync(&self, s: &Strategy, stage: &StageCost) -> f64 {
        self.sync_parts(s, stage).total()
    }

    /// [`Model::sync`] by collective. ZeRO-3 reduce-scatters gradients and all-gathers every
    /// weight (frozen ones too) for the forward and again for the backward of each microbatch
    /// (DeepSpeed and FSDP free a module's gathered weights after use): 3Ψ instead of 2Ψ for
    /// full training in one microbatch, (2m + 1)Ψ in m; [`Model::zero3_gathers`] says which of
    /// those gathers the step waits for.
    ///
    /// With `overlap` (DeepSpeed's `overlap_comm`, its default under ZeRO-3), the gradient
    /// reduction runs as the last microbatch's backward produces the gradients and only what
    /// outlasts that backward is on the critical path; ZeRO-1/2's weight all-gather after the
    /// update stays on it.
    pub fn sync_parts(&self, s: &Strategy, stage: &StageCost) -> SyncTime {
        let grad_bytes = stage.trainable * self.element_bytes();
        let group = self.group(s.data, s.tensor);
        // The backward the gradient reduction may hide under, less what ZeRO-3's own gathers
        // keep the links busy for.
        let mut window = stage.backward + stage.recompute;
        let (reduce, gather) = match s.zero {
            0 => (self.collective(AllReduce, grad_bytes, group), 0.0),
            1 | 2 => {
                let half = self.collective(AllGather, grad_bytes, group);
                (half, half)
            }
            _ => {
                let gathers = self.zero3_gathers(s, stage);
                window -= gathers.backward_busy;
                (
                    self.collective(AllGather, grad_bytes, group),
                    gathers.exposed,
                )
            }
        };
        let reduce = if self.overlap {
            (reduce - window.max(0.0)).max(0.0)
        } else {
            reduce
        };
        SyncTime { reduce, gather }
    }

    /// ZeRO-3's weight all-gathers in one iteration of a stage, and the seconds of them the
    /// step waits for.
    ///
    /// - `prefetch` (FSDP): one gather per layer that holds weights (FSDP wraps each block as
    ///   one flat parameter; the embedding and head are units of their own), and the next
    ///   unit's gather runs while the current unit computes (`forward_prefetch`,
    ///   `BACKWARD_PRE`: one unit ahead). Each pass through a chunk of layers (one per chunk
    ///   when interleaved) waits for its first gather; every later gather is hidden by the
    ///   compute of the unit before it, up to that unit's share of the compute.
    /// - `on_demand`: one gather per module, each on the critical path; at a thousand ranks
    ///   their ring latency, not the bytes, is what grows with the group (Megatron 2021 Table
    ///   2's DeepSpeed ZeRO-3 rows).
    pub fn zero3_gathers(&self, s: &Strategy, stage: &StageCost) -> Zero3Gathers {
        let layers = || stage.layers.iter().flat_map(|&(a, b)| &self.layers[a..b]);
        let units = match self.weight_gather {
            WeightGather::Prefetch => layers()
                .filter(|l| l.params_split + l.params_repl > 0.0)
                .count() as f64,
            WeightGather::OnDemand => stage.modules,
        }
        .max(1.0);
        let bytes = stage.params * self.element_bytes() / units;
        let one = self.collective(AllGather, bytes, self.group(s.data, s.tensor));
        let m = s.microbatches as f64;
        let exposed = match self.weight_gather {
            WeightGather::OnDemand => 2.0 * m * units * one,
            WeightGather::Prefetch => {
                let chunks = (stage.layers.len() as f64).min(units);
                let pass = |compute: f64| {
                    chunks * one + (units - chunks) * (one - compute / units).max(0.0)
                };
                m * (pass(stage.forward) + pass(stage.backward + stage.recompute))
            }
        };
        Zero3Gathers {
            count: 2.0 * m * units,
            bytes,
            exposed,
            backward_busy: units * one,
        }
    }
}

/// ZeRO-3's weight all-gathers of one iteration of a stage (see [`Model::zero3_gathers`]).
pub struct Zero3Gathers {
    pub count: f64,
    /// Bytes of each.
    pub bytes: f64,
    /// Seconds of them on the critical path.
    pub exposed: f64,
    /// Seconds the network spends on one microbatch's backward gathers: the gradient
    /// reduction overlapping that backward shares the same links.
    pub backward_busy: f64,
}

/// A stage's data-parallel synchronisation, seconds on the critical path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyncTime {
    /// Gradient reduction: DDP's all-reduce, ZeRO's reduce-scatter (what overlap can hide).
    pub reduce: f64,
    /// Weight all-gathers: ZeRO-1/2's after the update, ZeRO-3's before each module's use.
    pub gather: f64,
}

impl SyncTime {
    pub fn total(&self) -> f64 {
        self.reduce + self.gather
    }
}

/// Per-layer terms depend only on these choices of a (stage's) strategy: tensor degree,
/// sequences per microbatch, recompute, sequence parallelism.
pub type PrefixKey = (u64, u64, RecomputeChoice, bool);

pub fn prefix_key(s: &Strategy) -> PrefixKey {
    (s.tensor, s.micro_batch, s.recompute, s.sequence_parallel)
}

/// Prefix sums by the setting they were computed for.
pub type Prefixes = HashMap<PrefixKey, Vec<Terms>>;

/// Additive per-layer quantities of a strategy (per microbatch, per device).
#[derive(Clone, Copy, Debug, Default)]
pub struct Terms {
    pub forward: f64,
    pub backward: f64,
    pub recompute: f64,
    pub tensor_comm: f64,
    pub params: f64,
    pub trainable: f64,
    pub modules: f64,
    /// Activations kept per microbatch (without full recompute's block inputs).
    pub saved: f64,
    /// Block inputs kept under full recompute.
    pub kept: f64,
    /// Running sum of each layer's full activations (differences give one layer's).
    pub largest: f64,
}

impl Terms {
    fn plus(&self, o: &Terms) -> Terms {
        Terms {
            forward: self.forward + o.forward,
            backward: self.backward + o.backward,
            recompute: self.recompute + o.recompute,
            tensor_comm: self.tensor_comm + o.tensor_comm,
            params: self.params + o.params,
            trainable: self.trainable + o.trainable,
            modules: self.modules + o.modules,
            saved: self.saved + o.saved,
            kept: self.kept + o.kept,
            largest: self.largest + o.largest,
        }
    }

    fn minus(&self, o: &Terms) -> Terms {
        Terms {
            forward: self.forward - o.forward,
            backward: self.backward - o.backward,
            recompute: self.recompute - o.recompute,
            tensor_comm: self.tensor_comm - o.tensor_comm,
            params: self.params - o.params,
            trainable: self.trainable - o.trainable,
            modules: self.modules - o.modules,
            saved: self.saved - o.saved,
            kept: self.kept - o.kept,
            largest: self.largest - o.largest,
        }
    }
}

/// Bytes of weights, gradients and optimizer state per device (Rajbhandari et al. 2020):
/// mixed precision keeps 2-byte weights and gradients and K = 12 bytes of fp32 master weights
/// and Adam moments per trainable parameter; fp32 training 4 + 4 + 8. Frozen parameters carry
/// weights only. ZeRO-1 shards the optimizer state over `d`, ZeRO-2 also gradients, ZeRO-3 also
/// weights.
pub fn model_states(
    params: f64,
    trainable: f64,
    zero: u8,
    d: u64,
    precision: Precision,
) -> (f64, f64, f64) {
    let (w, g, k) = match precision {
        Precision::Bf16 | Precision::F16 => (2.0, 2.0, 12.0),
        Precision::F32 | Precision::Tf32 => (4.0, 4.0, 8.0),
    };
    let d = d as f64;
    let weights = w * params / if zero >= 3 { d } else { 1.0 };
    let gradients = g * trainable / if zero >= 2 { d } else { 1.0 };
    let optimizer = k * trainable / if zero >= 1 { d } else { 1.0 };
    (weights, gradients, optimizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fused attention kernel's FLOPs run at the device's attention efficiency and the
    /// layer's other products at its GEMM ceiling: one layer of 1 TFLOP each, forward and
    /// backward, on a 1 PFLOP/s device at 0.8 and 0.4 takes 1.25 + 2.5 ms forward.
    #[test]
    fn flash_attention_runs_at_the_attention_efficiency() {
        let mut node = crate::plan::unit_node();
        node.device.peak = [(Precision::Bf16, 1e15)].into();
        node.device.matmul_efficiency = 0.8;
        node.device.attention_efficiency = 0.4;
        let cluster = Cluster {
            name: "unit".into(),
            nodes: 1,
            node,
        };
        let layers = [LayerProfile {
            flops_fwd: 1e12,
            flops_bwd: 1e12,
            flash_flops_fwd: 1e12,
            flash_flops_bwd: 1e12,
            ..Default::default()
        }];
        let model = Model {
            layers: &layers,
            cluster: &cluster,
            precision: Precision::Bf16,
            batch: 1,
            offload: Offload::None,
            overlap: false,
            weight_gather: WeightGather::Prefetch,
            collective_efficiency: 1.0,
        };
        let strategy = Strategy {
            data: 1,
            tensor: 1,
            pipeline: 1,
            micro_batch: 1,
            microbatches: 1,
            schedule: ScheduleChoice::OneFOneB,
            zero: 0,
            recompute: RecomputeChoice::None,
            sequence_parallel: false,
        };
        let terms = model.prefix(&strategy);
        let expected = 1e12 / 0.8e15 + 1e12 / 0.4e15;
        assert!(
            (terms[1].forward - expected).abs() < 1e-15,
            "{}",
            terms[1].forward
        );
        assert!(
            (terms[1].backward - expected).abs() < 1e-15,
            "{}",
            terms[1].backward
        );
    }

    /// NVIDIA's "Matrix Multiplication Background User's Guide": on A100's 108 SMs, 108 output
    /// tiles make one full wave, 109 make two with the second nearly idle (about half the
    /// computed work wasted); an output one row past a tile computes a whole row of tiles more.
    #[test]
    fn tiles_and_waves_quantise_as_the_guide_describes() {
        let tile = 128.0;
        assert_eq!(wave_waste(108.0 * tile, tile, 108.0), 0.0);
        let two_waves = wave_waste(109.0 * tile, tile, 108.0);
        assert!((two_waves - (216.0 / 109.0 - 1.0)).abs() < 1e-12);
        // 2 × 54 tiles instead of 1 × 54 for one row past the tile: the same wave, twice the
        // work computed for 129/128 of the output.
        let edge = wave_waste(129.0, 54.0 * tile, 108.0);
        assert!((edge - (2.0 * 128.0 / 129.0 - 1.0)).abs() < 1e-12);
        // Large outputs waste little.
        assert!(wave_waste(8192.0, 8192.0, 108.0) < 0.05);
    }
}
