//! Module names of each family's Hugging Face implementation, so that checkpoint tensors map
//! onto graph parameters one to one (`transformer.h.0.attn.c_attn.weight`,
//! `bert.encoder.layer.0.attention.self.query.weight`, `model.layers.0.self_attn.q_proj.weight`).

use crate::spec::Family;

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

pub struct Names {
    pub family: Family,
}

impl Names {
    /// The module path of `module` (in block `layer` for block modules).
    pub fn module(&self, module: Module, layer: u64) -> String {
        use Family::*;
        use Module::*;
        let block = match self.family {
            Gpt2 => format!("transformer.h.{layer}"),
            Bert => format!("bert.encoder.layer.{layer}"),
            Llama => format!("model.layers.{layer}"),
        };
        let path = match (self.family, module) {
            (Gpt2, TokenEmbedding) => "transformer.wte",
            (Gpt2, PositionEmbedding) => "transformer.wpe",
            (Gpt2, TypeEmbedding) => "transformer.wtt",
            (Gpt2, EmbeddingNorm) => "transformer.ln_emb",
            (Gpt2, AttnNorm) => return format!("{block}.ln_1"),
            (Gpt2, Qkv | Query | Key | Value) => return format!("{block}.attn.c_attn"),
            (Gpt2, AttnOut) => return format!("{block}.attn.c_proj"),
            (Gpt2, MlpNorm) => return format!("{block}.ln_2"),
            (Gpt2, FfnUp) => return format!("{block}.mlp.c_fc"),
            (Gpt2, FfnGate) => return format!("{block}.mlp.c_gate"),
            (Gpt2, FfnDown) => return format!("{block}.mlp.c_proj"),
            (Gpt2, FinalNorm) => "transformer.ln_f",
            (Bert, TokenEmbedding) => "bert.embeddings.word_embeddings",
            (Bert, PositionEmbedding) => "bert.embeddings.position_embeddings",
            (Bert, TypeEmbedding) => "bert.embeddings.token_type_embeddings",
            (Bert, EmbeddingNorm) => "bert.embeddings.LayerNorm",
            (Bert, Query | Qkv) => return format!("{block}.attention.self.query"),
            (Bert, Key) => return format!("{block}.attention.self.key"),
            (Bert, Value) => return format!("{block}.attention.self.value"),
            (Bert, AttnOut) => return format!("{block}.attention.output.dense"),
            (Bert, AttnNorm) => return format!("{block}.attention.output.LayerNorm"),
            (Bert, FfnUp) => return format!("{block}.intermediate.dense"),
            (Bert, FfnGate) => return format!("{block}.intermediate.gate"),
            (Bert, FfnDown) => return format!("{block}.output.dense"),
            (Bert, MlpNorm) => return format!("{block}.output.LayerNorm"),
            (Bert, FinalNorm) => "bert.encoder.LayerNorm",
            (Llama, TokenEmbedding) => "model.embed_tokens",
            (Llama, PositionEmbedding) => "model.embed_positions",
            (Llama, TypeEmbedding) => "model.embed_token_types",
            (Llama, EmbeddingNorm) => "model.embed_norm",
            (Llama, AttnNorm) => return format!("{block}.input_layernorm"),
            (Llama, Query | Qkv) => return format!("{block}.self_attn.q_proj"),
            (Llama, Key) => return format!("{block}.self_attn.k_proj"),
            (Llama, Value) => return format!("{block}.self_attn.v_proj"),
            (Llama, AttnOut) => return format!("{block}.self_attn.o_proj"),
            (Llama, MlpNorm) => return format!("{block}.post_attention_layernorm"),
            (Llama, FfnUp) => return format!("{block}.mlp.up_proj"),
            (Llama, FfnGate) => return format!("{block}.mlp.gate_proj"),
            (Llama, FfnDown) => return format!("{block}.mlp.down_proj"),
            (Llama, FinalNorm) => "model.norm",
            (_, LmHead) => "lm_head",
            (_, MlmTransform) => "cls.predictions.transform.dense",
            (_, MlmTransformNorm) => "cls.predictions.transform.LayerNorm",
            (_, MlmBias) => "cls.predictions",
            (Bert, Pooler) => "bert.pooler.dense",
            (_, Pooler) => "pooler.dense",
            (_, Nsp) => "cls.seq_relationship",
            (Bert, Classifier) => "classifier",
            (_, Classifier) => "score",
            (_, Score) => "score",
            (_, ValueHead) => "v_head.summary",
        };
        path.to_string()
    }

    /// What the family's task models put before the base model's names (transformers'
    /// `base_model_prefix`): a checkpoint of the bare model (`GPT2Model`, `BertModel`,
    /// `LlamaModel`) stores its tensors without it.
    pub fn base_model_prefix(&self) -> &'static str {
        match self.family {
            Family::Gpt2 => "transformer",
            Family::Bert => "bert",
            Family::Llama => "model",
        }
    }

    /// Whether linear weights are stored `[in, out]` (GPT-2's Conv1D) rather than `[out, in]`.
    pub fn conv1d(&self) -> bool {
        self.family == Family::Gpt2
    }
}
