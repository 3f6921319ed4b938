//! The analytic cost model: time and memory of one training iteration for a strategy, from
//! the layer profiles and the cluster. Formulas and constants: shared/reference/cost-model.md;
//! calibration (matmul efficiency, achievable bandwidths, reserves) is data in the cluster spec.

use super::profile::LayerProfile;
use crate::graph::LayerKind;
use crate::spec::{Cluster, Offload, PipelineSchedule, Precision, Recompute};
use serde::Serialize;
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

    pub fn name(self) -> String {
        match self {
            ScheduleChoice::OneFOneB => "1f1b".into(),
            ScheduleChoice::Interleaved(v) => format!("interleaved({v})"),
            ScheduleChoice::Gpipe => "gpipe".into(),
        }
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
    /// Layer indices `[start, end)` into the profiles.
    /// Layer ranges `[start, end)` into the profiles (several with an interleaved schedule).
    pub layers: Vec<(usize, usize)>,
    /// Seconds per microbatch: forward, backward, recompute, tensor-parallel communication.
    pub forward: f64,
    pub backward: f64,
    pub recompute: f64,
    pub tensor_comm: f64,
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
}

/// Ring all-gather or reduce-scatter: (n−1)/n · S/B plus n−1 latency steps.
pub fn all_gather(bytes: f64, n: u64, bandwidth: f64, latency: f64) -> f64 {
    all_reduce(bytes, n, bandwidth, latency) / 2.0
}

/// Ring all-reduce: 2(n−1)/n · S/B plus 2(n−1) latency steps.
pub fn all_reduce(bytes: f64, n: u64, bandwidth: f64, latency: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let n = n as f64;
    2.0 * (n - 1.0) / n * bytes / bandwidth + 2.0 * (n - 1.0) * latency
}

impl Model<'_> {
    pub fn element_bytes(&self) -> f64 {
        match self.precision {
            Precision::F32 | Precision::Tf32 => 4.0,
            Precision::Bf16 | Precision::F16 => 2.0,
        }
    }

    fn flop_rate(&self) -> f64 {
        let device = &self.cluster.node.device;
        let peak = device
            .peak
            .get(&self.precision)
            .or_else(|| device.peak.values().next())
            .copied()
            .unwrap_or(1.0);
        peak * device.matmul_efficiency
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

    /// Achievable bandwidth of a group of `n` ranks with stride `stride` in the rank order
    /// (tensor fastest, then data, then pipeline): inside a node NVLink; across nodes the
    /// node's network links, shared by the node's concurrent groups.
    fn group_bandwidth(&self, n: u64, stride: u64) -> (f64, f64) {
        let node = &self.cluster.node;
        if n * stride <= node.devices {
            return (node.intra_bandwidth, node.intra_latency);
        }
        // Each device's traffic leaves the node through its own share of the node's links.
        let bw = (node.inter_bandwidth / node.devices as f64).min(node.intra_bandwidth);
        (bw, node.inter_latency)
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
    pub fn prefix(&self, s: &Strategy) -> Vec<Terms> {
        let f = s.micro_batch as f64 / self.batch as f64;
        let t = s.tensor as f64;
        let rate = self.flop_rate();
        let hbm = self.cluster.node.device.hbm_bandwidth;
        let repl_div = if s.sequence_parallel { t } else { 1.0 };
        let (bw, lat) = self.group_bandwidth(s.tensor, 1);
        let mut out = vec![Terms::default()];
        for l in self.layers {
            let mem = (l.mem_split / t + l.mem_repl / repl_div) * f / hbm;
            let forward = l.flops_fwd / t * f / rate + mem;
            let backward =
                l.flops_bwd / t * f / rate + if l.has_backward { 2.0 * mem } else { 0.0 };
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
                tensor_comm: collectives * all_reduce(l.boundary_bytes * f, s.tensor, bw, lat),
                params: l.params_split / t + l.params_repl,
                trainable: l.trainable_split / t + l.trainable_repl,
                saved,
                kept,
                largest: layer_saved,
            };
            let last = *out.last().unwrap_or(&Terms::default());
            out.push(last.plus(&term));
        }
        out
    }

    /// The stage layout of a strategy: blocks as even as possible; with an interleaved
    /// schedule the model is cut into p·v chunks and rank i holds chunks i, i+p, i+2p, ...
    pub fn layout(&self, s: &Strategy) -> Vec<Vec<Range<usize>>> {
        match s.schedule {
            ScheduleChoice::Interleaved(v) if s.pipeline > 1 => {
                let chunks = self.balanced_stages(s.pipeline * v);
                let p = s.pipeline as usize;
                (0..p)
                    .map(|i| chunks.iter().skip(i).step_by(p).cloned().collect())
                    .collect()
            }
            _ => self
                .balanced_stages(s.pipeline)
                .into_iter()
                .map(|r| vec![r])
                .collect(),
        }
    }

    /// The cost of one stage (its layer ranges) from prefix sums.
    pub fn stage(
        &self,
        s: &Strategy,
        prefix: &[Terms],
        ranges: &[Range<usize>],
        stage_index: u64,
    ) -> StageCost {
        let sum = ranges.iter().fold(Terms::default(), |acc, r| {
            acc.plus(&prefix[r.end].minus(&prefix[r.start]))
        });
        // The largest single layer's activations (live while full recompute rebuilds it).
        let largest = ranges
            .iter()
            .flat_map(|r| r.start..r.end)
            .map(|i| prefix[i + 1].largest - prefix[i].largest)
            .fold(0.0, f64::max);
        let p = s.pipeline;
        // Microbatches whose activations are alive at once on this stage.
        // Microbatches whose activations are alive at once on this stage: all of them under
        // GPipe; p − i under 1F1B; interleaved, the warmup of 2(p−i−1) + (v−1)p chunks plus
        // one, each 1/v of a microbatch (stage 0: p·(1 + (p−1)/(p·v)), as in Korthikanti).
        let in_flight = match s.schedule {
            ScheduleChoice::Gpipe => s.microbatches as f64,
            ScheduleChoice::OneFOneB => (p - stage_index).min(s.microbatches) as f64,
            ScheduleChoice::Interleaved(v) => {
                let chunks = (2 * (p - stage_index - 1) + (v - 1) * p + 1).min(s.microbatches * v);
                chunks as f64 / v as f64
            }
        };
        let activations = if s.recompute == RecomputeChoice::Full {
            (sum.kept + sum.saved) * in_flight + largest
        } else {
            sum.saved * in_flight
        } * self.cluster.node.device.activation_overhead;
        let boundary = self.layers.first().map_or(0.0, |l| l.boundary_bytes) * s.micro_batch as f64
            / self.batch as f64;
        let memory = self.memory(s, sum.params, sum.trainable, activations, boundary);
        StageCost {
            layers: ranges.iter().map(|r| (r.start, r.end)).collect(),
            forward: sum.forward,
            backward: sum.backward,
            recompute: sum.recompute,
            tensor_comm: sum.tensor_comm,
            memory,
        }
    }

    /// Model states (ZeRO, Rajbhandari et al. 2020) plus activations and buffers.
    fn memory(
        &self,
        s: &Strategy,
        params: f64,
        trainable: f64,
        activations: f64,
        boundary: f64,
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
        let buffers = if s.pipeline > 1 { 2.0 * boundary } else { 0.0 };
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

    /// Time and memory of a strategy with the given stage layout.
    pub fn evaluate(&self, s: &Strategy, layout: &[Vec<Range<usize>>]) -> Evaluation {
        self.evaluate_with(s, layout, &self.prefix(s))
    }

    /// [`Model::evaluate`] with the strategy's prefix sums already computed.
    pub fn evaluate_with(
        &self,
        s: &Strategy,
        layout: &[Vec<Range<usize>>],
        prefix: &[Terms],
    ) -> Evaluation {
        let stages: Vec<StageCost> = layout
            .iter()
            .enumerate()
            .map(|(i, r)| self.stage(s, prefix, r, i as u64))
            .collect();
        let slowest = stages
            .iter()
            .max_by(|a, b| a.per_microbatch().total_cmp(&b.per_microbatch()))
            .cloned()
            .unwrap_or(StageCost {
                layers: Vec::new(),
                forward: 0.0,
                backward: 0.0,
                recompute: 0.0,
                tensor_comm: 0.0,
                memory: MemoryBreakdown::default(),
            });
        let m = s.microbatches as f64;
        let v = s.schedule.chunks() as f64;
        let p = s.pipeline as f64;
        // (m + (p−1)/v) · t_stage (Narayanan et al. 2021, Eq. 1 generalised to interleaving).
        let bubble = (p - 1.0) / v * slowest.per_microbatch();
        // Stage boundaries: an activation forward and its gradient back per microbatch, on
        // the critical path once per chunk.
        let p2p = if s.pipeline > 1 {
            let bytes = self.layers.first().map_or(0.0, |l| l.boundary_bytes)
                * s.micro_batch as f64
                / self.batch as f64;
            let bytes = if s.tensor > 1 {
                bytes / s.tensor as f64
            } else {
                bytes
            };
            let (bw, lat) = self.group_bandwidth(2, s.data * s.tensor);
            2.0 * v * (m + p - 1.0) * (bytes / bw + lat)
        } else {
            0.0
        };
        // Gradient synchronisation of trainable parameters across data-parallel replicas
        // (ZeRO-3 adds the parameter all-gather: 3Ψ instead of 2Ψ).
        let grad_bytes = stages
            .iter()
            .map(|st| self.stage_trainable(s, &st.layers))
            .fold(0.0, f64::max)
            * self.element_bytes();
        let (bw, lat) = self.group_bandwidth(s.data, s.tensor);
        // ZeRO-3 reduce-scatters gradients and all-gathers every weight (frozen ones too) for
        // the forward and again for the backward: 3Ψ for full training.
        let data_parallel = if s.zero == 3 {
            let weight_bytes = stages
                .iter()
                .map(|st| self.stage_params(s, &st.layers))
                .fold(0.0, f64::max)
                * self.element_bytes();
            all_gather(grad_bytes, s.data, bw, lat)
                + 2.0 * all_gather(weight_bytes, s.data, bw, lat)
        } else {
            all_reduce(grad_bytes, s.data, bw, lat)
        };
        // Adam reads and writes fp32 master weights and both moments, reads the gradient and
        // writes the working copy: about 28 bytes per trainable parameter it owns.
        let owned = stages
            .iter()
            .map(|st| self.stage_trainable(s, &st.layers))
            .fold(0.0, f64::max)
            / if s.zero >= 1 { s.data as f64 } else { 1.0 };
        let optimizer = if self.offload == Offload::None {
            28.0 * owned / self.cluster.node.device.hbm_bandwidth
        } else {
            0.0
        };
        let time = TimeBreakdown {
            compute: m * (slowest.forward + slowest.backward),
            recompute: m * slowest.recompute,
            tensor_comm: m * slowest.tensor_comm,
            pipeline_bubble: bubble,
            p2p,
            data_parallel,
            optimizer,
            total: m * slowest.per_microbatch() + bubble + p2p + data_parallel + optimizer,
        };
        let fits = stages
            .iter()
            .all(|st| st.memory.total <= st.memory.capacity);
        let model_flops: f64 = self.layers.iter().map(|l| l.flops_fwd + l.flops_bwd).sum();
        let recompute_flops: f64 = match s.recompute {
            RecomputeChoice::None => 0.0,
            RecomputeChoice::Selective => self
                .layers
                .iter()
                .filter(|l| l.kind == Some(LayerKind::Block))
                .map(|l| l.attn_flops_fwd)
                .sum(),
            RecomputeChoice::Full => self
                .layers
                .iter()
                .filter(|l| l.kind == Some(LayerKind::Block))
                .map(|l| l.flops_fwd)
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

    fn stage_trainable(&self, s: &Strategy, layers: &[(usize, usize)]) -> f64 {
        layers
            .iter()
            .flat_map(|&(a, b)| &self.layers[a..b])
            .map(|l| l.trainable_split / s.tensor as f64 + l.trainable_repl)
            .sum()
    }

    fn stage_params(&self, s: &Strategy, layers: &[(usize, usize)]) -> f64 {
        layers
            .iter()
            .flat_map(|&(a, b)| &self.layers[a..b])
            .map(|l| l.params_split / s.tensor as f64 + l.params_repl)
            .sum()
    }
}

/// Additive per-layer quantities of a strategy (per microbatch, per device).
#[derive(Clone, Copy, Debug, Default)]
pub struct Terms {
    pub forward: f64,
    pub backward: f64,
    pub recompute: f64,
    pub tensor_comm: f64,
    pub params: f64,
    pub trainable: f64,
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
