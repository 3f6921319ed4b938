//! The operator graph: what the planner partitions and the runtime executes.
//!
//! Nodes are operators with one output tensor each; edges carry that tensor (shape and dtype)
//! to each consumer input slot. Parameters live in a table beside the graph, named as in the
//! Hugging Face checkpoint of the model's family, and marked trainable or frozen. Nodes are
//! grouped into layers (embedding, block 0..N-1, head), the units of pipeline partitioning.

use petgraph::graph::NodeIndex;
use petgraph::stable_graph::StableDiGraph;
use serde::Serialize;

pub type ParamId = usize;
pub type LayerId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    F32,
    Bf16,
    F16,
    /// Token ids, labels.
    I64,
}

impl DType {
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::I64 => 8,
            _ => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TensorMeta {
    pub shape: Vec<u64>,
    pub dtype: DType,
}

impl TensorMeta {
    pub fn numel(&self) -> u64 {
        element_count(&self.shape)
    }

    pub fn bytes(&self) -> u64 {
        self.numel().saturating_mul(self.dtype.bytes())
    }
}

/// The elements of a shape. The spec's size limits keep every count exact; saturating is the
/// guard that keeps a count beyond them from overflowing.
fn element_count(shape: &[u64]) -> u64 {
    shape.iter().fold(1, |n, &d| n.saturating_mul(d))
}

/// What a parameter is, for freezing rules (BitFit trains biases, LayerNorm tuning norms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamRole {
    Weight,
    Bias,
    Norm,
    NormBias,
    Embedding,
    /// Introduced by an adapter (LoRA A/B, prefixes, prompts, IA3 vectors, bottlenecks).
    Adapter,
    /// A head initialised for this objective (reward score, value head): trained even when
    /// an adapter freezes the model, as PEFT's `modules_to_save`.
    NewHead,
}

#[derive(Clone, Debug, Serialize)]
pub struct Param {
    /// Name in the family's Hugging Face checkpoint (or PEFT's adapter file).
    pub name: String,
    pub shape: Vec<u64>,
    pub role: ParamRole,
    pub trainable: bool,
    pub layer: LayerId,
}

/// The name prefix of PPO's frozen reference copy of the policy (`ref.transformer.h.0...`).
pub const REFERENCE_PREFIX: &str = "ref.";

impl Param {
    pub fn numel(&self) -> u64 {
        element_count(&self.shape)
    }

    /// Whether this is a parameter of PPO's frozen reference copy: filled from the policy (or
    /// a stage's run), never stored, trained or exported as a parameter of its own.
    pub fn is_reference_copy(&self) -> bool {
        self.name.starts_with(REFERENCE_PREFIX)
    }
}

/// A view of a parameter: all of it, or a range of its output features (GPT-2's fused
/// `c_attn` is one tensor read by the query, key and value projections).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ParamRef {
    pub id: ParamId,
    /// Output-feature range `[start, end)`; `None` for the whole parameter.
    pub outputs: Option<(u64, u64)>,
}

impl ParamRef {
    pub fn whole(id: ParamId) -> Self {
        ParamRef { id, outputs: None }
    }
}

/// How a linear weight is stored: PyTorch `nn.Linear` is `[out, in]`, GPT-2's Conv1D `[in, out]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    OutIn,
    InOut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    Gelu,
    GeluTanh,
    Relu,
    Silu,
    Tanh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    TokenIds,
    TokenTypes,
    /// Per-token targets, −100 where no loss is taken.
    Labels,
    /// One class per sequence (NSP, PET).
    SequenceLabels,
    AttentionMask,
    /// PPO: `[b, s, 4]` per position: advantage, return, log-probability and value at
    /// sampling time (read where the policy's taken token is not −100).
    Rollout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pick {
    /// The first token ([CLS]).
    First,
    /// The last non-padding token.
    Last,
    /// The [MASK] position (PET).
    Mask,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Input {
        kind: InputKind,
    },
    /// Rows of `table` for integer ids: `[b, s]` → `[b, s, d]`.
    Embedding {
        table: ParamId,
    },
    /// Learned positions `offset..offset+s` (prefix and prompt tuning shift real tokens by P).
    PositionEmbedding {
        table: ParamId,
        offset: u64,
    },
    /// `P` virtual-token rows of `table`, broadcast over the batch: → `[b, P, d]`.
    VirtualTokens {
        table: ParamId,
    },
    Add,
    Mul,
    Scale {
        factor: f64,
    },
    /// Elementwise product with a learned vector over the last axis (IA3).
    ScaleBy {
        param: ParamId,
    },
    LayerNorm {
        weight: ParamId,
        bias: Option<ParamId>,
        eps: f64,
    },
    RmsNorm {
        weight: ParamId,
        eps: f64,
    },
    /// `y = x·Wᵀ + b` over the last axis.
    Linear {
        weight: ParamRef,
        bias: Option<ParamRef>,
        layout: Layout,
        in_features: u64,
        out_features: u64,
    },
    /// A range of the last axis (splitting a fused projection, one layer's prefix).
    Slice {
        start: u64,
        len: u64,
    },
    Concat {
        axis: usize,
    },
    Rotary {
        theta: f64,
        head_dim: u64,
        offset: u64,
    },
    /// Scaled dot-product attention: inputs query `[b, s, H·d]`, key and value
    /// `[b, s_kv, H_kv·d]`; softmax(QKᵀ/√d + mask)·V with causal and padding masks.
    Attention {
        heads: u64,
        kv_heads: u64,
        head_dim: u64,
        causal: bool,
        dropout: f64,
    },
    Activation {
        act: Act,
    },
    Dropout {
        p: f64,
    },
    /// A bidirectional LSTM over the virtual tokens (P-tuning's encoder).
    Lstm {
        hidden: u64,
        layers: u64,
        bidirectional: bool,
        params: Vec<ParamId>,
    },
    /// One position per sequence: `[b, s, d]` → `[b, d]`, `offset` after the position `pick`
    /// names (the batch gives `Mask` and `Last` among the real tokens; virtual tokens
    /// prepended to the input shift them).
    SelectToken {
        pick: Pick,
        offset: u64,
    },
    /// The logits of the verbalizer tokens: `[b, V]` → `[b, classes]`.
    GatherClasses {
        token_ids: usize,
    },
    /// Mean cross-entropy over positions whose label is not −100; `shift` predicts t+1 from t.
    CrossEntropy {
        shift: bool,
    },
    /// `Σ wᵢ·lossᵢ` of scalar losses.
    WeightedSum {
        weights: Vec<f64>,
    },
    /// −log σ(r_chosen − r_rejected) over a batch of chosen/rejected pairs.
    PairwiseLoss,
    /// Per-token log-probabilities of the taken tokens: `[b, s, V]` → `[b, s]`.
    TokenLogProbs,
    /// DoRA: `(m / ‖W + s·B·A‖_row) ⊙ (y − b) + b` for the LoRA sum `y = W·x + b + s·B·A·x`.
    DoraRescale {
        magnitude: ParamId,
        weight: ParamRef,
        bias: Option<ParamRef>,
        lora_a: ParamId,
        lora_b: ParamId,
        scaling: f64,
        layout: Layout,
    },
    /// Clipped PPO objective and clipped value loss (× `value_coef`) over response tokens;
    /// inputs: policy log-probs, reference log-probs, values, rollout. The KL penalty against
    /// the reference (coefficient `kl`) is in the rewards behind the rollout's advantages and
    /// returns (InstructGPT); the reference's log-probs sit in the same graph so that one
    /// forward pass scores a rollout.
    PpoLoss {
        kl: f64,
        clip: f64,
        value_clip: f64,
        value_coef: f64,
    },
}

impl Op {
    /// Short name for tables and DOT labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Embedding { .. } => "embedding",
            Op::PositionEmbedding { .. } => "position_embedding",
            Op::VirtualTokens { .. } => "virtual_tokens",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Scale { .. } => "scale",
            Op::ScaleBy { .. } => "scale_by",
            Op::LayerNorm { .. } => "layernorm",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::Linear { .. } => "linear",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Rotary { .. } => "rotary",
            Op::Attention { .. } => "attention",
            Op::Activation { .. } => "activation",
            Op::Dropout { .. } => "dropout",
            Op::Lstm { .. } => "lstm",
            Op::SelectToken { .. } => "select_token",
            Op::GatherClasses { .. } => "gather_classes",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::WeightedSum { .. } => "weighted_sum",
            Op::PairwiseLoss => "pairwise_loss",
            Op::TokenLogProbs => "token_log_probs",
            Op::PpoLoss { .. } => "ppo_loss",
            Op::DoraRescale { .. } => "dora_rescale",
        }
    }

    /// Parameters the op reads.
    pub fn params(&self) -> Vec<ParamId> {
        match self {
            Op::Embedding { table }
            | Op::PositionEmbedding { table, .. }
            | Op::VirtualTokens { table } => vec![*table],
            Op::ScaleBy { param } => vec![*param],
            Op::LayerNorm { weight, bias, .. } => std::iter::once(*weight).chain(*bias).collect(),
            Op::RmsNorm { weight, .. } => vec![*weight],
            Op::Linear { weight, bias, .. } => std::iter::once(weight.id)
                .chain(bias.map(|b| b.id))
                .collect(),
            Op::Lstm { params, .. } => params.clone(),
            Op::DoraRescale {
                magnitude,
                weight,
                bias,
                lora_a,
                lora_b,
                ..
            } => [*magnitude, weight.id, *lora_a, *lora_b]
                .into_iter()
                .chain(bias.map(|b| b.id))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Costs of one node for one training step of the whole batch. FLOPs count multiply-adds as
/// two and only matrix products (GEMMs and attention), as the Megatron formulas do;
/// elementwise work is memory-bound and costed by `bytes`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Cost {
    pub flops_fwd: f64,
    /// Backward FLOPs for the gradient of the inputs (0 when nothing upstream trains).
    pub flops_bwd_input: f64,
    /// Backward FLOPs for the gradient of the weights (0 when they are frozen).
    pub flops_bwd_weight: f64,
    /// Memory traffic of the forward (inputs, output, parameters).
    pub bytes: f64,
    /// Activation bytes kept for the backward pass (none when no gradient flows through).
    pub saved_bytes: f64,
    /// Part of `saved_bytes` that selective recompute drops and recomputes (attention's
    /// softmax output and dropout mask).
    pub selective_bytes: f64,
    /// Whether Megatron tensor parallelism divides this node's work (GEMMs, attention, the
    /// MLP's inner activations, vocabulary-parallel embedding, head and loss) across the group.
    pub tensor_parallel: bool,
    /// Part of `saved_bytes` held in tensors that tensor parallelism divides.
    pub saved_split: f64,
    /// Whether a later node keeps this node's output for the backward pass (counted there):
    /// a fused attention kernel needs its own output in its backward either way.
    pub output_kept: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Node {
    /// Module path in the family's naming (`transformer.h.0.attn.c_attn`), or a Kiln name
    /// for nodes with no module (`h.0.attn.core`).
    pub name: String,
    #[serde(flatten)]
    pub op: Op,
    pub layer: LayerId,
    pub out: TensorMeta,
    pub cost: Cost,
}

#[derive(Clone, Debug, Serialize)]
pub struct Edge {
    /// Which input of the consumer this tensor is.
    pub slot: usize,
    pub tensor: TensorMeta,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    Embedding,
    Block,
    Head,
}

#[derive(Clone, Debug, Serialize)]
pub struct Layer {
    pub name: String,
    pub kind: LayerKind,
}

#[derive(Clone, Debug)]
pub struct Graph {
    /// Stable indices: passes remove and re-add edges while holding indices.
    pub dag: StableDiGraph<Node, Edge>,
    pub params: Vec<Param>,
    pub layers: Vec<Layer>,
    /// Sequences and tokens per sequence the shapes are built for (the global batch).
    pub batch: u64,
    pub seq: u64,
    pub dtype: DType,
    /// The scalar training loss.
    pub loss: Option<NodeIndex>,
    /// Shape errors met while building or rewriting: compiler bugs, reported rather than
    /// panicking.
    pub(crate) problems: Vec<String>,
}

impl Graph {
    pub fn node(&self, id: NodeIndex) -> &Node {
        &self.dag[id]
    }

    /// Inputs of a node in slot order.
    pub fn inputs(&self, id: NodeIndex) -> Vec<NodeIndex> {
        let mut ins: Vec<(usize, NodeIndex)> = self
            .dag
            .edges_directed(id, petgraph::Direction::Incoming)
            .map(|e| {
                (
                    petgraph::visit::EdgeRef::weight(&e).slot,
                    petgraph::visit::EdgeRef::source(&e),
                )
            })
            .collect();
        ins.sort();
        ins.into_iter().map(|(_, n)| n).collect()
    }

    pub fn total_params(&self) -> u64 {
        self.params.iter().map(Param::numel).sum()
    }

    pub fn trainable_params(&self) -> u64 {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(Param::numel)
            .sum()
    }

    /// Nodes in a topological order that is stable for the same input (insertion order
    /// among independent nodes).
    pub fn topo_order(&self) -> Vec<NodeIndex> {
        let mut indegree: Vec<usize> = self
            .dag
            .node_indices()
            .map(|n| {
                self.dag
                    .neighbors_directed(n, petgraph::Direction::Incoming)
                    .count()
            })
            .collect();
        let mut ready: std::collections::BTreeSet<usize> = self
            .dag
            .node_indices()
            .filter(|n| indegree[n.index()] == 0)
            .map(|n| n.index())
            .collect();
        let mut order = Vec::with_capacity(self.dag.node_count());
        while let Some(n) = ready.pop_first() {
            order.push(NodeIndex::new(n));
            for m in self
                .dag
                .neighbors_directed(NodeIndex::new(n), petgraph::Direction::Outgoing)
            {
                indegree[m.index()] -= 1;
                if indegree[m.index()] == 0 {
                    ready.insert(m.index());
                }
            }
        }
        order
    }
}
