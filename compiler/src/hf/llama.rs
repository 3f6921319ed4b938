//! LLaMA as transformers has it (`LlamaConfig`, `LlamaForCausalLM`): the config.json keys
//! `hf("dir")` reads and `kiln export --merged` writes (RMSNorm, a gated MLP, rotary positions,
//! grouped-query attention), its module names, and PEFT's view of it.

use super::{HfFamily, Import, Names, Peft, Rope};
use crate::spec::{Block, Mlp, Model, Norm, Objective, Position, Target};
use serde_json::{json, Value as Json};

pub struct Llama;

/// transformers 4 writes `rope_theta` at the top, 5 nests it in `rope_parameters`.
const ROPE: Rope = Rope {
    key: "rope_theta",
    nested_in: "rope_parameters",
    default: 10000.0,
};

const IMPORT: Import = Import {
    keys: &[
        ("vocab", &["vocab_size"]),
        ("positions", &["max_position_embeddings"]),
        ("hidden", &["hidden_size"]),
        ("layers", &["num_hidden_layers"]),
        ("heads", &["num_attention_heads"]),
        ("kv_heads", &["num_key_value_heads"]),
        ("ffn", &["intermediate_size"]),
        ("dropout", &["attention_dropout"]),
    ],
    ffn_or_four_hidden: None,
    norm: ("rmsnorm", "rms_norm_eps", 1e-6),
    activation: ("hidden_act", "silu"),
    mlp: "gated",
    block: "pre_norm",
    bias_key: Some("attention_bias"),
    tied: false,
    rope: Some(ROPE),
    heads: &["lm"],
};

const NAMES: Names = Names {
    base_model_prefix: "model",
    blocks: "model.layers",
    token_embedding: "model.embed_tokens",
    position_embedding: "model.embed_positions",
    type_embedding: "model.embed_token_types",
    embedding_norm: "model.embed_norm",
    final_norm: "model.norm",
    attn_norm: "input_layernorm",
    qkv: "self_attn.q_proj",
    query: "self_attn.q_proj",
    key: "self_attn.k_proj",
    value: "self_attn.v_proj",
    attn_out: "self_attn.o_proj",
    mlp_norm: "post_attention_layernorm",
    ffn_up: "mlp.up_proj",
    ffn_gate: "mlp.gate_proj",
    ffn_down: "mlp.down_proj",
    pooler: "pooler.dense",
    classifier: "score",
    conv1d: false,
};

const PEFT: Peft = Peft {
    linears: &[
        Target::Query,
        Target::Key,
        Target::Value,
        Target::AttnOut,
        Target::FfnGate,
        Target::FfnUp,
        Target::FfnDown,
    ],
    lora: &[Target::Query, Target::Value],
    ia3: (
        &[Target::Key, Target::Value, Target::FfnDown],
        &[Target::FfnDown],
    ),
};

impl HfFamily for Llama {
    fn model_type(&self) -> &'static str {
        "llama"
    }

    fn title(&self) -> &'static str {
        "LLaMA"
    }

    fn import(&self) -> &'static Import {
        &IMPORT
    }

    fn config_class(&self) -> &'static str {
        "LlamaConfig"
    }

    /// LLaMA's attention_bias and mlp_bias express `bias` either way.
    fn fixed(&self, m: &Model) -> Vec<(&'static str, bool, &'static str)> {
        vec![
            ("norm", matches!(m.norm, Norm::Rmsnorm { .. }), "rmsnorm"),
            ("mlp", m.mlp != Mlp::Plain, "gated"),
            (
                "position",
                matches!(m.position, Position::Rotary { .. }),
                "rotary",
            ),
            ("block", m.block == Block::PreNorm, "pre_norm"),
            ("type_vocab", m.type_vocab == 0, "0"),
        ]
    }

    fn architecture(&self, objective: &Objective) -> Result<(&'static str, Option<u64>), String> {
        Ok(match objective {
            Objective::Reward { .. } => ("LlamaForSequenceClassification", Some(1)),
            _ => ("LlamaForCausalLM", None),
        })
    }

    fn config_keys(&self, m: &Model, activation: &str, eps: f64) -> Json {
        let d = m.dropout;
        let mut config = json!({
            "vocab_size": m.vocab, "max_position_embeddings": m.positions,
            "hidden_size": m.hidden, "num_hidden_layers": m.layers,
            "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads,
            "head_dim": m.hidden / m.heads.max(1), "intermediate_size": m.ffn,
            "hidden_act": activation, "rms_norm_eps": eps,
            "attention_bias": m.bias, "mlp_bias": m.bias, "attention_dropout": d,
            // The tokenizer's special tokens are not the model's to know.
            "bos_token_id": null, "eos_token_id": null,
        });
        if let Position::Rotary { theta } = m.position {
            // Both places, for transformers 4 and 5.
            let mut nested = serde_json::Map::new();
            nested.insert("rope_type".into(), json!("default"));
            nested.insert(ROPE.key.into(), json!(theta));
            let object = config.as_object_mut().expect("built as an object");
            object.insert(ROPE.key.into(), json!(theta));
            object.insert(ROPE.nested_in.into(), Json::Object(nested));
        }
        config
    }

    fn names(&self) -> &'static Names {
        &NAMES
    }

    fn peft(&self) -> &'static Peft {
        &PEFT
    }
}
