//! The typed, resolved experiment: what the rest of the compiler consumes.
//!
//! Every field has a value (defaults filled in). Quantities are in SI base units: bytes,
//! bytes per second, FLOP per second, seconds. Where each value came from is kept beside the
//! spec in [`super::Origins`], keyed by the field's dotted path.

use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Clone, Debug, Serialize)]
pub struct Experiment {
    pub name: String,
    /// The stage this one starts from inside a pipeline (its output checkpoint).
    pub init: Option<String>,
    pub model: Model,
    pub data: Data,
    pub objective: Objective,
    pub adapters: Vec<Adapter>,
    /// Directories of trained adapter weights (`adapter = peft("dir")` sets it), which `kiln run`
    /// loads to continue training or evaluate.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub adapter_weights: Vec<String>,
    pub parallel: Parallel,
    pub train: Train,
    /// Where each value came from, so that later stages (lowering, planning) can point their
    /// errors at the source.
    #[serde(skip)]
    pub origins: super::Origins,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Gpt2,
    Bert,
    Llama,
}

#[derive(Clone, Debug, Serialize)]
pub struct Model {
    pub name: String,
    pub family: Family,
    pub vocab: u64,
    pub positions: u64,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub ffn: u64,
    pub norm: Norm,
    pub activation: Activation,
    pub mlp: Mlp,
    pub position: Position,
    pub block: Block,
    pub bias: bool,
    pub tie_embeddings: bool,
    pub type_vocab: u64,
    pub output_heads: Vec<OutputHead>,
    pub dropout: f64,
    /// A Hugging Face directory holding the pretrained weights (`model.safetensors`); set by
    /// `hf("dir")`. Without one, training starts from a random initialisation.
    pub checkpoint: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Norm {
    Layernorm { eps: f64 },
    Rmsnorm { eps: f64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Gelu,
    GeluTanh,
    Relu,
    Silu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mlp {
    Plain,
    Gated,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Position {
    Learned,
    Rotary { theta: f64 },
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Block {
    PreNorm,
    PostNorm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutputHead {
    Lm,
    Mlm,
    Nsp,
    Classifier { labels: u64 },
    Reward,
    Value,
}

impl OutputHead {
    pub fn name(&self) -> &'static str {
        match self {
            OutputHead::Lm => "lm",
            OutputHead::Mlm => "mlm",
            OutputHead::Nsp => "nsp",
            OutputHead::Classifier { .. } => "classifier",
            OutputHead::Reward => "reward",
            OutputHead::Value => "value",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Data {
    /// Paths as written, relative to the experiment file.
    pub train: Option<String>,
    pub eval: Option<String>,
    pub tokenizer: Option<String>,
    /// Logical field name → key in each JSONL record.
    pub fields: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Objective {
    CausalLm,
    Mlm(Mlm),
    Nsp { random_next: f64 },
    MlmNsp { mlm: Mlm, random_next: f64 },
    Pvp(Pvp),
    Sft { prompt: String, response: String },
    Reward { chosen: String, rejected: String },
    Ppo(Ppo),
}

#[derive(Clone, Debug, Serialize)]
pub struct Mlm {
    pub prob: f64,
    pub strategy: MaskStrategy,
    /// Of the chosen positions: replaced by [MASK], by a random token, kept.
    pub replace: [f64; 3],
    pub max_predictions: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskStrategy {
    Token,
    WholeWord,
    Entity,
    Span,
}

#[derive(Clone, Debug, Serialize)]
pub struct Pvp {
    pub pattern: String,
    /// Label → verbalizer word, in the order written.
    pub verbalizer: Vec<(String, String)>,
    pub mlm_weight: f64,
}

/// TRL's default horizon of the adaptive KL controller.
pub const DEFAULT_KL_HORIZON: u64 = 10_000;

fn is_default_kl_horizon(h: &u64) -> bool {
    *h == DEFAULT_KL_HORIZON
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

#[derive(Clone, Debug, Serialize)]
pub struct Ppo {
    /// The KL penalty's coefficient (the first one, with an adaptive controller).
    pub kl: f64,
    /// Ziegler et al.'s adaptive controller (TRL's `AdaptiveKLController`): the KL the
    /// coefficient steers towards, and the horizon (in sequences) of its steering. Fields
    /// added after the first PPO runs are left out of the serialised spec at their defaults,
    /// so those runs' checkpoints keep their fingerprint and resume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_target: Option<f64>,
    #[serde(skip_serializing_if = "is_default_kl_horizon")]
    pub kl_horizon: u64,
    pub clip: f64,
    pub value_clip: f64,
    pub gamma: f64,
    pub lambda: f64,
    pub epochs: u64,
    pub value_coef: f64,
    /// The most tokens a rollout samples after each prompt (fewer where `seq_len` ends first).
    pub response_length: u64,
    /// The policy's and the reference's logits are divided by it, for sampling and for the
    /// log-probabilities PPO trains on (TRL's `temperature`).
    #[serde(skip_serializing_if = "is_one")]
    pub temperature: f64,
    /// Name of the experiment (pipeline stage) whose output is the reward model.
    pub reward_model: String,
    /// Name of the experiment whose output is the frozen reference policy.
    pub reference: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Adapter {
    Lora(Lora),
    Prefix {
        tokens: u64,
        projection: Option<u64>,
    },
    Prompt {
        tokens: u64,
        init: PromptInit,
    },
    Ptuning {
        tokens: u64,
        encoder: PromptEncoder,
        hidden: u64,
    },
    PtuningV2 {
        tokens: u64,
    },
    Bottleneck {
        placement: Placement,
        reduction: u64,
        activation: Activation,
    },
    Ia3 {
        targets: Vec<Target>,
        feedforward: Vec<Target>,
    },
    Freeze(Freeze),
}

impl Adapter {
    pub fn name(&self) -> &'static str {
        match self {
            Adapter::Lora(_) => "lora",
            Adapter::Prefix { .. } => "prefix",
            Adapter::Prompt { .. } => "prompt",
            Adapter::Ptuning { .. } => "ptuning",
            Adapter::PtuningV2 { .. } => "ptuning_v2",
            Adapter::Bottleneck { .. } => "bottleneck",
            Adapter::Ia3 { .. } => "ia3",
            Adapter::Freeze(_) => "freeze",
        }
    }

    /// Adapters that prepend virtual tokens; at most one per experiment.
    pub fn prepends_tokens(&self) -> bool {
        self.virtual_tokens().is_some()
    }

    /// How many virtual tokens the adapter places before the sequence: as learned keys and
    /// values (prefix, P-tuning v2) or as input embeddings (prompt, P-tuning). Either way the
    /// real tokens' positions start after them.
    pub fn virtual_tokens(&self) -> Option<u64> {
        match self {
            Adapter::Prefix { tokens, .. }
            | Adapter::Prompt { tokens, .. }
            | Adapter::Ptuning { tokens, .. }
            | Adapter::PtuningV2 { tokens } => Some(*tokens),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Lora {
    pub rank: u64,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Target>,
    pub rslora: bool,
    pub dora: bool,
    pub bias: LoraBias,
}

/// A linear layer inside a transformer block, in Kiln's family-independent names.
/// `Qkv` is GPT-2's fused projection, adapted as one module (as PEFT does for `c_attn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Qkv,
    Query,
    Key,
    Value,
    AttnOut,
    FfnUp,
    FfnGate,
    FfnDown,
}

impl Target {
    /// Kiln's name for the module, as written in `targets = [...]`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Qkv => "qkv",
            Target::Query => "query",
            Target::Key => "key",
            Target::Value => "value",
            Target::AttnOut => "attn_out",
            Target::FfnUp => "ffn_up",
            Target::FfnGate => "ffn_gate",
            Target::FfnDown => "ffn_down",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    None,
    All,
    LoraOnly,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", content = "text", rename_all = "snake_case")]
pub enum PromptInit {
    Random,
    Vocab,
    Text(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptEncoder {
    Mlp,
    Lstm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    Houlsby,
    Pfeiffer,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Freeze {
    /// Freeze the first N transformer blocks (train the last `layers - N`).
    pub layers: u64,
    /// Train only biases (BitFit).
    pub biases_only: bool,
    /// Train only normalisation parameters.
    pub norms_only: bool,
    /// Freeze the token/position embeddings.
    pub embeddings: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Parallel {
    pub mesh: Cluster,
    pub plan: Plan,
    pub sequence_parallel: bool,
    pub zero: u8,
    pub recompute: Recompute,
    pub schedule: PipelineSchedule,
    /// `None`: the planner chooses.
    pub microbatches: Option<u64>,
    pub offload: Offload,
    /// Gradient reduction runs during the backward pass (DDP's buckets, DeepSpeed's
    /// `overlap_comm`) rather than after it.
    pub overlap_grad_sync: bool,
    /// How ZeRO-3 gathers weights before their use.
    pub weight_gather: WeightGather,
    /// Share of NCCL's bus bandwidth the framework's collectives (tensor- and data-parallel,
    /// ZeRO) reach (1: NCCL's own); pipeline sends are point-to-point and not scaled.
    pub collective_efficiency: f64,
}

/// How ZeRO-3 gathers sharded weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightGather {
    /// One gather per block (FSDP's flat parameter per wrapped block), the next block's
    /// issued while the current one computes (FSDP's forward and backward prefetch).
    Prefetch,
    /// Each module's weights gathered when it runs, on the critical path.
    OnDemand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Plan {
    Auto,
    Manual {
        data: u64,
        tensor: u64,
        pipeline: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    None,
    Selective,
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PipelineSchedule {
    Gpipe,
    #[serde(rename = "1f1b")]
    OneFOneB,
    Interleaved {
        chunks: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Offload {
    None,
    Optimizer,
    All,
}

#[derive(Clone, Debug, Serialize)]
pub struct Cluster {
    pub name: String,
    pub nodes: u64,
    pub node: Node,
}

impl Cluster {
    pub fn devices(&self) -> u64 {
        self.nodes.saturating_mul(self.node.devices)
    }

    /// Its devices as a person names them: "8 h100 GPUs", "4 CPU devices", "a GPU of the
    /// machine it runs on" (`gpu(1)`).
    pub fn describe_devices(&self) -> String {
        let n = self.devices();
        match (self.node.device.name.as_str(), n) {
            ("cpu", 1) => "a CPU device".into(),
            ("cpu", n) => format!("{n} CPU devices"),
            ("gpu", 1) => "a GPU of the machine it runs on".into(),
            ("gpu", n) => format!("{n} GPUs of the machine it runs on"),
            (device, 1) => format!("a {device} GPU"),
            (device, n) => format!("{n} {device} GPUs"),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Node {
    pub name: String,
    pub device: Device,
    pub devices: u64,
    /// Between devices of one node (NVLink): achievable bus bandwidth, bytes/s.
    pub intra_bandwidth: f64,
    pub intra_latency: f64,
    /// Between nodes (InfiniBand): bytes/s per node.
    pub inter_bandwidth: f64,
    pub inter_latency: f64,
    /// What offloading moves through and computes on: bytes/s between each device and host
    /// memory (its PCIe link, one direction), and the node's host memory bandwidth, which the
    /// CPU optimizer shares among the node's devices. `None`: not described (no offload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_bandwidth: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_memory_bandwidth: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Device {
    pub name: String,
    /// Peak dense FLOP/s by precision.
    pub peak: BTreeMap<Precision, f64>,
    /// Fraction of peak that large matmuls achieve (measured ceiling ÷ datasheet peak).
    pub matmul_efficiency: f64,
    /// Fraction of peak a fused (flash) attention kernel achieves; the matmul efficiency
    /// where the device does not say.
    pub attention_efficiency: f64,
    pub memory: f64,
    /// Memory kept free for the framework, fragmentation and buffers.
    pub memory_reserve: f64,
    pub hbm_bandwidth: f64,
    /// Bytes the runtime keeps per byte of the saved-activation model (Korthikanti et al.),
    /// measured: 1 for fused GPU kernels as published, more for an executor that keeps every
    /// op's intermediates.
    pub activation_overhead: f64,
    /// Copies of the weights the runtime keeps (2 for an executor that computes on its own
    /// copy of a master copy).
    pub weight_copies: f64,
    /// Whether attention runs as a fused, tiled kernel on it (FlashAttention-2): what
    /// `train.attention = auto` costs.
    pub flash_attention: bool,
    /// Streaming multiprocessors, which run a matrix product's output tiles in waves (`None`:
    /// not a GPU, no wave quantisation).
    pub multiprocessors: Option<u64>,
}

/// How attention is computed, for the cost model (Dao 2023, "FlashAttention-2").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKernel {
    /// What the device runs (`flash_attention` in its profile).
    Auto,
    /// Fused and tiled: the score matrix never reaches memory nor is saved for backward (the
    /// backward recomputes it), and causal attention skips the tiles wholly above the diagonal.
    Flash,
    /// Unfused: scores written, softmax read and written, read by the product with V, and the
    /// softmax output saved for backward (the Megatron 2021 and Korthikanti 2022 measurements).
    Eager,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    Tf32,
    Bf16,
    F16,
}

#[derive(Clone, Debug, Serialize)]
pub struct Train {
    pub optimizer: Optimizer,
    pub schedule: LrSchedule,
    /// Global batch, in sequences.
    pub batch: u64,
    /// Sequences per device per forward; `None`: chosen by the planner.
    pub micro_batch: Option<u64>,
    pub length: Length,
    pub seq_len: u64,
    pub precision: Precision,
    pub attention: AttentionKernel,
    pub grad_clip: Option<f64>,
    pub seed: u64,
    /// Evaluate on `data.eval` every this many steps (and at the end).
    pub eval_every: Option<u64>,
    /// Save a checkpoint every this many steps, besides the time-based ones.
    pub checkpoint_every: Option<u64>,
    /// Save a checkpoint when this many minutes have passed since the last one (so that a
    /// killed run loses at most that much), and always at the end or on an interrupt.
    pub checkpoint_minutes: f64,
    /// Complete checkpoints kept on disk, newest first.
    pub keep_checkpoints: u64,
    /// Start parameters a named checkpoint (`hf`, `peft`) lacks from fresh initial values,
    /// listing them, instead of refusing to run.
    pub init_missing: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Optimizer {
    Adamw {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    Sgd {
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub warmup: u64,
    /// Final learning rate as a fraction of the peak (linear and cosine decay).
    pub min_lr_ratio: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
    /// Linear warmup, then constant.
    Warmup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Length {
    Steps(u64),
    Epochs(u64),
}

#[derive(Clone, Debug, Serialize)]
pub struct Pipeline {
    pub name: String,
    /// Each stage starts from the previous stage's output unless it names its own `init`.
    pub stages: Vec<Experiment>,
}
