//! Module names in a family's Hugging Face implementation, so that checkpoint tensors map onto
//! graph parameters one to one (`transformer.h.0.attn.c_attn.weight`,
//! `bert.encoder.layer.0.attention.self.query.weight`, `model.layers.0.self_attn.q_proj.weight`):
//! what each family names (its [`Names`]) and the task heads the families share.

use crate::spec::Target;

/// A module inside a transformer block, or at the model's ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Module {
    TokenEmbedding,
    PositionEmbedding,
    TypeEmbedding,
    EmbeddingNorm,
    AttnNorm,
    Qkv,
    Query,
    Key,
    Value,
    AttnOut,
    MlpNorm,
    FfnUp,
    FfnGate,
    FfnDown,
    FinalNorm,
    LmHead,
    MlmTransform,
    MlmTransformNorm,
    /// The MLM decoder's own bias (its weight is tied to the token embeddings).
    MlmBias,
    Pooler,
    Nsp,
    Classifier,
    Score,
    ValueHead,
}

/// A family's module paths. Block modules are named relative to their block
/// (`{blocks}.{layer}.{path}`); the others in full. Modules the family's transformers class
/// lacks (GPT-2's token types, LLaMA's learned positions) get names in its style.
pub struct Names {
    /// What the family's task models put before the base model's names (transformers'
    /// `base_model_prefix`): a checkpoint of the bare model (`GPT2Model`, `BertModel`,
    /// `LlamaModel`) stores its tensors without it.
    pub base_model_prefix: &'static str,
    /// The blocks' path, before the block's number.
    pub blocks: &'static str,
    pub token_embedding: &'static str,
    pub position_embedding: &'static str,
    pub type_embedding: &'static str,
    pub embedding_norm: &'static str,
    pub final_norm: &'static str,
    pub attn_norm: &'static str,
    /// The fused query/key/value projection; where there is none, the query's.
    pub qkv: &'static str,
    pub query: &'static str,
    pub key: &'static str,
    pub value: &'static str,
    pub attn_out: &'static str,
    pub mlp_norm: &'static str,
    pub ffn_up: &'static str,
    pub ffn_gate: &'static str,
    pub ffn_down: &'static str,
    pub pooler: &'static str,
    /// A sequence classifier's head.
    pub classifier: &'static str,
    /// Whether linear weights are stored `[in, out]` (GPT-2's Conv1D) rather than `[out, in]`;
    /// PEFT's `fan_in_fan_out`.
    pub conv1d: bool,
}

impl Names {
    /// The module path of `module` (in block `layer` for block modules).
    pub fn module(&self, module: Module, layer: u64) -> String {
        use Module::*;
        let path = match module {
            TokenEmbedding => self.token_embedding,
            PositionEmbedding => self.position_embedding,
            TypeEmbedding => self.type_embedding,
            EmbeddingNorm => self.embedding_norm,
            AttnNorm => return self.in_block(layer, self.attn_norm),
            Qkv => return self.in_block(layer, self.linear(Target::Qkv)),
            Query => return self.in_block(layer, self.linear(Target::Query)),
            Key => return self.in_block(layer, self.linear(Target::Key)),
            Value => return self.in_block(layer, self.linear(Target::Value)),
            AttnOut => return self.in_block(layer, self.linear(Target::AttnOut)),
            MlpNorm => return self.in_block(layer, self.mlp_norm),
            FfnUp => return self.in_block(layer, self.linear(Target::FfnUp)),
            FfnGate => return self.in_block(layer, self.linear(Target::FfnGate)),
            FfnDown => return self.in_block(layer, self.linear(Target::FfnDown)),
            FinalNorm => self.final_norm,
            // The task heads: transformers' names, shared by the families.
            LmHead => "lm_head",
            MlmTransform => "cls.predictions.transform.dense",
            MlmTransformNorm => "cls.predictions.transform.LayerNorm",
            MlmBias => "cls.predictions",
            Pooler => self.pooler,
            Nsp => "cls.seq_relationship",
            Classifier => self.classifier,
            Score => "score",
            ValueHead => "v_head.summary",
        };
        path.to_string()
    }

    /// The path of block linear `target` inside its block (`attn.c_attn`).
    pub fn linear(&self, target: Target) -> &'static str {
        match target {
            Target::Qkv => self.qkv,
            Target::Query => self.query,
            Target::Key => self.key,
            Target::Value => self.value,
            Target::AttnOut => self.attn_out,
            Target::FfnUp => self.ffn_up,
            Target::FfnGate => self.ffn_gate,
            Target::FfnDown => self.ffn_down,
        }
    }

    fn in_block(&self, layer: u64, path: &str) -> String {
        format!("{}.{layer}.{path}", self.blocks)
    }
}
