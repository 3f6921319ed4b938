//! BERT as transformers has it (`BertConfig`, `BertForPreTraining` and its parts): the
//! config.json keys `hf("dir")` reads and `kiln export --merged` writes, its module names
//! (post-norm blocks, a pooler before the NSP head), and PEFT's view of it.

use super::{HfFamily, Import, Names, Peft};
use crate::spec::{Block, Mlp, Model, Norm, Objective, Position, Target};
use serde_json::{json, Value as Json};

pub struct Bert;

const IMPORT: Import = Import {
    keys: &[
        ("vocab", &["vocab_size"]),
        ("positions", &["max_position_embeddings"]),
        ("hidden", &["hidden_size"]),
        ("layers", &["num_hidden_layers"]),
        ("heads", &["num_attention_heads"]),
        ("ffn", &["intermediate_size"]),
        ("type_vocab", &["type_vocab_size"]),
        ("dropout", &["hidden_dropout_prob"]),
    ],
    ffn_or_four_hidden: None,
    norm: ("layernorm", "layer_norm_eps", 1e-12),
    activation: ("hidden_act", "gelu"),
    mlp: "plain",
    block: "post_norm",
    bias_key: None,
    tied: true,
    rope: None,
    heads: &["mlm", "nsp"],
};

const NAMES: Names = Names {
    base_model_prefix: "bert",
    blocks: "bert.encoder.layer",
    token_embedding: "bert.embeddings.word_embeddings",
    position_embedding: "bert.embeddings.position_embeddings",
    type_embedding: "bert.embeddings.token_type_embeddings",
    embedding_norm: "bert.embeddings.LayerNorm",
    final_norm: "bert.encoder.LayerNorm",
    attn_norm: "attention.output.LayerNorm",
    qkv: "attention.self.query",
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    attn_out: "attention.output.dense",
    mlp_norm: "output.LayerNorm",
    ffn_up: "intermediate.dense",
    ffn_gate: "intermediate.gate",
    ffn_down: "output.dense",
    pooler: "bert.pooler.dense",
    classifier: "classifier",
    conv1d: false,
};

const PEFT: Peft = Peft {
    linears: &[
        Target::Query,
        Target::Key,
        Target::Value,
        Target::AttnOut,
        Target::FfnUp,
        Target::FfnDown,
    ],
    lora: &[Target::Query, Target::Value],
    ia3: (
        &[Target::Key, Target::Value, Target::AttnOut, Target::FfnDown],
        &[Target::AttnOut, Target::FfnDown],
    ),
};

impl HfFamily for Bert {
    fn model_type(&self) -> &'static str {
        "bert"
    }

    fn title(&self) -> &'static str {
        "BERT"
    }

    fn import(&self) -> &'static Import {
        &IMPORT
    }

    fn config_class(&self) -> &'static str {
        "BertConfig"
    }

    fn fixed(&self, m: &Model) -> Vec<(&'static str, bool, &'static str)> {
        vec![
            (
                "norm",
                matches!(m.norm, Norm::Layernorm { .. }),
                "layernorm",
            ),
            ("mlp", m.mlp == Mlp::Plain, "plain"),
            ("position", m.position == Position::Learned, "learned"),
            ("block", m.block != Block::PreNorm, "post_norm"),
            ("bias", m.bias, "true"),
            ("kv_heads", m.kv_heads == m.heads, "heads"),
            ("type_vocab", m.type_vocab > 0, "at least 1"),
        ]
    }

    fn architecture(&self, objective: &Objective) -> Result<(&'static str, Option<u64>), String> {
        Ok(match objective {
            Objective::Mlm(_) | Objective::Pvp(_) => ("BertForMaskedLM", None),
            Objective::Nsp { .. } => ("BertForNextSentencePrediction", None),
            Objective::MlmNsp { .. } => ("BertForPreTraining", None),
            _ => {
                return Err(
                    "the heads Kiln trains on BERT for this objective are not those of a transformers BERT class (MLM, NSP or both are)"
                        .into(),
                )
            }
        })
    }

    fn config_keys(&self, m: &Model, activation: &str, eps: f64) -> Json {
        let d = m.dropout;
        json!({
            "vocab_size": m.vocab, "max_position_embeddings": m.positions,
            "hidden_size": m.hidden, "num_hidden_layers": m.layers, "num_attention_heads": m.heads,
            "intermediate_size": m.ffn, "hidden_act": activation, "layer_norm_eps": eps,
            "type_vocab_size": m.type_vocab,
            "hidden_dropout_prob": d, "attention_probs_dropout_prob": d,
        })
    }

    fn names(&self) -> &'static Names {
        &NAMES
    }

    fn peft(&self) -> &'static Peft {
        &PEFT
    }
}
