//! The execution plan: data, not behaviour. Deterministic for the same input (ordered
//! collections, rounded floats, no paths or timestamps), so that plans snapshot-test well.

use super::cost::{MemoryBreakdown, RecomputeChoice, ScheduleChoice, Submesh, TimeBreakdown};
use super::sharding::TensorLayout;
use crate::spec::WeightGather;
use serde::{Serialize, Serializer};
use std::fmt;
use std::ops::Range;

#[derive(Clone, Debug, Serialize)]
pub struct ExecutionPlan {
    pub experiment: String,
    pub mesh: Mesh,
    pub strategy: StrategySummary,
    pub stages: Vec<Stage>,
    pub sharding: Vec<Sharding>,
    pub collectives: Vec<Collective>,
    pub schedule: Vec<StageSchedule>,
    pub time: TimeBreakdown,
    pub throughput: Throughput,
    pub params: ParamCounts,
    /// For `plan = auto`: the next best strategies and why they lost.
    pub alternatives: Vec<Alternative>,
    /// How many strategies the planner costed.
    pub considered: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Mesh {
    pub cluster: String,
    pub nodes: u64,
    pub devices_per_node: u64,
    pub devices: u64,
    pub device: String,
    /// Dense peak FLOP/s of one device at the training precision.
    pub peak_flops: f64,
    pub memory_per_device: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StrategySummary {
    pub chosen_by: String,
    /// Data and tensor degree (and `micro_batch`), the same on every stage; 0 when stages run
    /// on different submeshes (the stage table has each stage's).
    pub data: u64,
    pub tensor: u64,
    pub pipeline: u64,
    /// On some stage.
    pub sequence_parallel: bool,
    pub zero: u8,
    pub recompute: RecomputeChoice,
    #[serde(serialize_with = "as_text")]
    pub schedule: ScheduleChoice,
    /// Sequences per microbatch per data-parallel replica; 0 when stages differ.
    pub micro_batch: u64,
    pub microbatches: u64,
    pub global_batch: u64,
    pub offload: String,
    /// How attention is costed: `flash` (fused, tiled, causal tiles skipped) or `eager`.
    pub attention: String,
    /// Gradient reduction overlaps the backward pass; written only when it does.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub overlap_grad_sync: bool,
    /// How ZeRO-3 gathers weights; written only under ZeRO-3.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_gather: Option<WeightGather>,
    /// Share of NCCL's bus bandwidth the collectives are costed at; written only below 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collective_efficiency: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    pub index: u64,
    /// The stage's layers in graph order, runs of consecutive blocks together.
    pub layers: Vec<LayerRun>,
    /// Device ids (rank order: tensor fastest, then data, then pipeline).
    #[serde(serialize_with = "device_range")]
    pub devices: Range<u64>,
    /// The stage's devices as data-parallel replicas of tensor-parallel groups.
    pub submesh: Submesh,
    /// How tensor parallelism lays out every parameter and value on the stage's groups (all
    /// whole when `submesh.tensor` is 1): the runtime executes this, the sharding table
    /// renders it.
    #[serde(skip)]
    pub layout: TensorLayout,
    /// Sequences per microbatch on each of the stage's replicas.
    pub micro_batch: u64,
    /// Seconds per microbatch.
    pub forward: f64,
    pub backward: f64,
    pub recompute: f64,
    pub tensor_comm: f64,
    /// Bytes per device.
    pub memory: MemoryBreakdown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorSplit {
    Replicated,
    /// Split along the output features (Megatron column-parallel).
    Column,
    /// Split along the input features (row-parallel).
    Row,
    /// Split along the vocabulary (embedding and LM head).
    Vocab,
}

/// How one parameter (or the same parameter of a run of identical blocks) is laid out.
#[derive(Clone, Debug, Serialize)]
pub struct Sharding {
    /// The parameter name, with the block index replaced by `*` when it repeats.
    pub name: String,
    /// Blocks it appears in (`0-95`), or empty for parameters outside blocks.
    pub blocks: String,
    pub shape: Vec<u64>,
    pub trainable: bool,
    pub tensor: TensorSplit,
    /// What ZeRO shards over the data-parallel group: optimizer state, gradients, weights.
    pub zero: String,
    pub stages: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Collective {
    pub kind: String,
    pub group: Group,
    pub group_size: u64,
    /// Bytes per call, per device.
    pub bytes: f64,
    pub per_iteration: u64,
    /// Seconds per iteration, all calls.
    pub seconds: f64,
}

/// Consecutive layers of one stage: indices into the graph's `layers`, and the name the
/// report gives them (`embedding`, `block.0-11`, `head`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRun {
    pub layers: Range<usize>,
    pub name: String,
}

impl Serialize for LayerRun {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

/// One iteration of one device of a stage, in order.
#[derive(Clone, Debug)]
pub struct StageSchedule {
    pub stage: u64,
    pub actions: Vec<Action>,
    /// Chunks per device (interleaved schedules); actions name theirs when above one.
    pub chunks: u64,
}

impl StageSchedule {
    /// The actions as `kiln plan` prints them: `F3` forward of microbatch 3 (`F3.1` chunk 1
    /// when interleaved), `B3` its backward, `R`/`S` receive/send at the stage boundary
    /// (primed for gradients), then the gradient synchronisation and the optimizer step.
    pub fn steps(&self) -> String {
        let words: Vec<String> = self
            .actions
            .iter()
            .map(|a| a.render(self.chunks > 1))
            .collect();
        words.join(" ")
    }
}

impl Serialize for StageSchedule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("StageSchedule", 2)?;
        st.serialize_field("stage", &self.stage)?;
        st.serialize_field("steps", &self.steps())?;
        st.end()
    }
}

/// One entry of a stage's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Receive the activations of microbatch `mb` for chunk `chunk`.
    Recv {
        mb: usize,
        chunk: usize,
    },
    Forward {
        mb: usize,
        chunk: usize,
    },
    Send {
        mb: usize,
        chunk: usize,
    },
    /// Receive the gradients of the chunk's outputs.
    RecvGrad {
        mb: usize,
        chunk: usize,
    },
    Backward {
        mb: usize,
        chunk: usize,
    },
    SendGrad {
        mb: usize,
        chunk: usize,
    },
    /// Sum gradients over the data-parallel group.
    AllReduceGrads,
    /// ZeRO: each device keeps the sum of its share of the gradients.
    ReduceScatterGrads,
    Optimizer,
    /// ZeRO 1-2: every device gathers the parameters the others updated.
    GatherWeights,
}

impl Action {
    fn render(self, name_chunk: bool) -> String {
        let id = |mb: usize, chunk: usize| {
            if name_chunk {
                format!("{mb}.{chunk}")
            } else {
                mb.to_string()
            }
        };
        match self {
            Action::Recv { mb, chunk } => format!("R{}", id(mb, chunk)),
            Action::Forward { mb, chunk } => format!("F{}", id(mb, chunk)),
            Action::Send { mb, chunk } => format!("S{}", id(mb, chunk)),
            Action::RecvGrad { mb, chunk } => format!("R'{}", id(mb, chunk)),
            Action::Backward { mb, chunk } => format!("B{}", id(mb, chunk)),
            Action::SendGrad { mb, chunk } => format!("S'{}", id(mb, chunk)),
            Action::AllReduceGrads => "AllReduce(grads)".into(),
            Action::ReduceScatterGrads => "ReduceScatter(grads)".into(),
            Action::Optimizer => "Optimizer".into(),
            Action::GatherWeights => "AllGather(weights)".into(),
        }
    }
}

/// The devices a collective runs among: the stages' tensor-parallel groups, their data-parallel
/// replicas, or two neighbouring stages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub axis: GroupAxis,
    /// The stages whose groups these are, when not every stage's (their submeshes differ).
    pub stages: Option<Vec<u64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupAxis {
    Tensor,
    Data,
    Pipeline,
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.axis {
            GroupAxis::Tensor => "tensor",
            GroupAxis::Data => "data",
            GroupAxis::Pipeline => "pipeline",
        })?;
        match &self.stages {
            Some(stages) => write!(f, ", stages {}", render_ranges(stages)),
            None => Ok(()),
        }
    }
}

impl Serialize for Group {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Sorted numbers as runs: `0-3,7`.
pub(crate) fn render_ranges(items: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let mut j = i;
        while j + 1 < items.len() && items[j + 1] == items[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            items[i].to_string()
        } else {
            format!("{}-{}", items[i], items[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// `0-7`, or `3` for one device.
fn device_range<S: Serializer>(r: &Range<u64>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&render_range(r))
}

pub fn render_range(r: &Range<u64>) -> String {
    match r.end - r.start {
        0 | 1 => r.start.to_string(),
        _ => format!("{}-{}", r.start, r.end - 1),
    }
}

fn as_text<T: fmt::Display, S: Serializer>(x: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(x)
}

#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub tokens_per_second: f64,
    /// Achieved FLOP/s per device, counting recompute (as Megatron reports).
    pub tflops_per_device: f64,
    /// Model FLOPs utilisation: FLOPs without recompute over peak.
    pub mfu: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ParamCounts {
    pub total: u64,
    pub trainable: u64,
    pub frozen: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Alternative {
    pub strategy: String,
    pub step_time: f64,
    pub peak_memory: f64,
    pub why: String,
}
