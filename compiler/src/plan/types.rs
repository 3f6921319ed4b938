//! The execution plan: data, not behaviour. Deterministic for the same input (ordered
//! collections, rounded floats, no paths or timestamps), so that plans snapshot-test well.

use super::cost::{MemoryBreakdown, Submesh, TimeBreakdown};
use serde::Serialize;

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
    pub recompute: String,
    pub schedule: String,
    /// Sequences per microbatch per data-parallel replica; 0 when stages differ.
    pub micro_batch: u64,
    pub microbatches: u64,
    pub global_batch: u64,
    pub offload: String,
    /// Gradient reduction overlaps the backward pass; written only when it does.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub overlap_grad_sync: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    pub index: u64,
    /// Layer names, runs of blocks folded (`block.0-11`).
    pub layers: Vec<String>,
    /// Device ids (rank order: tensor fastest, then data, then pipeline), as ranges.
    pub devices: String,
    /// The stage's devices as data-parallel replicas of tensor-parallel groups.
    pub submesh: Submesh,
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
    pub group: String,
    pub group_size: u64,
    /// Bytes per call, per device.
    pub bytes: f64,
    pub per_iteration: u64,
    /// Seconds per iteration, all calls.
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct StageSchedule {
    pub stage: u64,
    /// One iteration of one device of the stage: `F3` forward of microbatch 3 (`F3.1` chunk
    /// 1 when interleaved), `B3` its backward, `R`/`S` receive/send at the stage boundary, then
    /// the gradient synchronisation and the optimizer step.
    pub steps: String,
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
