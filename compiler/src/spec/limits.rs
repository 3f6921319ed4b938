//! Kiln's size limits: the largest value each size field accepts, and why.
//!
//! Every limit is far above published practice, so no real experiment meets one; they exist so
//! that a typo (`layers = 1000000000`) is an error at `kiln check` rather than a graph that
//! does not fit in memory, a planner search that does not end or an integer that overflows in
//! `kiln graph`, `kiln plan` or `kiln run`. Within them every tensor's element count, parameter
//! count and device count stays exact in 64 bits (graph and plan arithmetic saturates beyond).

use crate::diagnostics::{Code, Diagnostic};

/// The largest value a size field accepts, and the reason shown with the error.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    /// The field, as written in `.kiln` files.
    pub field: &'static str,
    pub max: u64,
    pub why: &'static str,
}

impl Limit {
    /// The error for `value` if it is above the limit (the caller points it at the value).
    pub fn exceeded_by(self, value: u64) -> Option<Diagnostic> {
        (value > self.max).then(|| {
            Diagnostic::new(
                Code::Range,
                format!(
                    "{} = {value} is above Kiln's limit of {}",
                    self.field, self.max
                ),
            )
            .note(self.why)
        })
    }
}

// ----- the model -----------------------------------------------------------------------------

pub const LAYERS: Limit = Limit {
    field: "layers",
    max: 1024,
    why: "the graph holds every block and the planner's stage search grows with the square of \
          the layers; 1024 is 8x the deepest published language models (GPT-3: 96 blocks, \
          Megatron-LM's 1T model: 128)",
};

pub const HIDDEN: Limit = Limit {
    field: "hidden",
    max: 1 << 18,
    why: "262144 is 10x the widest published models (Megatron-LM's 1T model: hidden 25600)",
};

pub const HEADS: Limit = Limit {
    field: "heads",
    why: "each attention head has at least one of the hidden features",
    ..HIDDEN
};

pub const KV_HEADS: Limit = Limit {
    field: "kv_heads",
    ..HEADS
};

pub const FFN: Limit = Limit {
    field: "ffn",
    max: 4 * HIDDEN.max,
    why: "1048576 is 4x Kiln's largest hidden width, 10x the widest published feed-forward \
          layers (Megatron-LM's 1T model: 102400)",
};

pub const VOCAB: Limit = Limit {
    field: "vocab",
    max: 1 << 24,
    why: "16777216 is over 60x the largest published vocabularies (Gemma: 256000)",
};

pub const TYPE_VOCAB: Limit = Limit {
    field: "type_vocab",
    ..VOCAB
};

/// The labels of `classifier(n)`.
pub const LABELS: Limit = Limit {
    field: "labels",
    why: "a classifier head is at most as wide as Kiln's largest vocabulary",
    ..VOCAB
};

pub const POSITIONS: Limit = Limit {
    field: "positions",
    max: 1 << 24,
    why: "16777216 is beyond the longest published context windows (10 million tokens)",
};

// ----- adapters ------------------------------------------------------------------------------

/// With [`TOKENS_PER_STEP`], bounds the sequences the model attends over (virtual tokens and
/// real ones) so that every tensor's size stays exact.
pub const VIRTUAL_TOKENS: Limit = Limit {
    field: "tokens",
    max: 1 << 16,
    why: "65536 virtual tokens are hundreds of times the longest in the prefix- and \
          prompt-tuning papers (200)",
};

const ADAPTER_WIDTH: &str = "an adapter is at most as wide as Kiln's widest model";

pub const LORA_RANK: Limit = Limit {
    field: "rank",
    why: ADAPTER_WIDTH,
    ..HIDDEN
};

pub const PREFIX_PROJECTION: Limit = Limit {
    field: "projection",
    why: ADAPTER_WIDTH,
    ..HIDDEN
};

pub const PROMPT_ENCODER_HIDDEN: Limit = Limit {
    field: "hidden",
    why: ADAPTER_WIDTH,
    ..HIDDEN
};

// ----- training ------------------------------------------------------------------------------

pub const SEQ_LEN: Limit = Limit {
    field: "seq_len",
    why: "a sequence is at most Kiln's largest number of positions",
    ..POSITIONS
};

pub const BATCH: Limit = Limit {
    field: "batch",
    max: 1 << 20,
    why: "1048576 sequences is 16x the largest published batches (LAMB's 65536 BERT \
          sequences); the plan lists every microbatch of a step",
};

pub const MICRO_BATCH: Limit = Limit {
    field: "micro_batch",
    why: "a microbatch is part of the batch",
    ..BATCH
};

pub const MICROBATCHES: Limit = Limit {
    field: "microbatches",
    why: "each microbatch holds at least one sequence of the batch",
    ..BATCH
};

/// `batch × seq_len`: with [`VIRTUAL_TOKENS`] and each width within its limit, every tensor's
/// size in bytes (tokens times a width, at most the vocabulary, times 8) stays exact in 64 bits.
pub const TOKENS_PER_STEP: Limit = Limit {
    field: "batch × seq_len",
    max: 1 << 32,
    why: "4294967296 tokens per step is 256x the largest published batches (Llama 3: 16M \
          tokens), and keeps the size of every tensor exact",
};

pub const STEPS: Limit = Limit {
    field: "steps",
    max: 1 << 32,
    why: "4294967296 steps is thousands of times the longest published runs (about a million \
          steps)",
};

pub const EPOCHS: Limit = Limit {
    field: "epochs",
    max: 1 << 20,
    why: "1048576 epochs are thousands of times the longest published fine-tuning runs, and a \
          run's step count (epochs times the batches of an epoch) must stay countable",
};

pub const MAX_PREDICTIONS: Limit = Limit {
    field: "max_predictions",
    why: "predictions are made at positions of one sequence",
    ..POSITIONS
};

pub const RESPONSE_LENGTH: Limit = Limit {
    field: "response_length",
    why: "a response is part of one sequence",
    ..POSITIONS
};

// ----- hardware and parallelism --------------------------------------------------------------

pub const NODE_DEVICES: Limit = Limit {
    field: "devices",
    max: 1024,
    why: "the largest NVLink domains announced hold 576 GPUs (NVL576), and `cpu(n)` runs a \
          thread per device",
};

pub const NODES: Limit = Limit {
    field: "nodes",
    max: 1 << 16,
    why: "65536 nodes of 8 GPUs are over twice the largest training clusters built (about \
          200000 GPUs)",
};

/// Microbatches per replica × pipeline stages (× interleaved chunks): the steps the plan's
/// schedule lists one by one, and `kiln run` reads back.
pub const SCHEDULE: Limit = Limit {
    field: "microbatches × pipeline stages",
    max: 1 << 22,
    why: "the plan lists every microbatch on every stage; 4194304 is over 100x Megatron-LM's \
          1T-parameter run (512 microbatches through 64 stages)",
};

/// The model chunks per device of `interleaved(chunks)`.
pub const CHUNKS: Limit = Limit {
    field: "chunks",
    why: "each interleaved chunk holds at least one layer",
    ..LAYERS
};
