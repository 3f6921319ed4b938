//! GPT-2 as transformers has it (`GPT2Config`, `GPT2LMHeadModel`): the config.json keys
//! `hf("dir")` reads and `kiln export --merged` writes, its module names (Conv1D weights
//! stored `[in, out]`, query, key and value fused in `c_attn`), and PEFT's view of it.

use super::{HfFamily, Import, Names, Peft};
use crate::spec::{Block, Mlp, Model, Norm, Objective, Position, Target};
use serde_json::{json, Value as Json};

pub struct Gpt2;

const IMPORT: Import = Import {
    keys: &[
        ("vocab", &["vocab_size"]),
        ("positions", &["n_positions"]),
        ("hidden", &["n_embd"]),
        ("layers", &["n_layer"]),
        ("heads", &["n_head"]),
        ("dropout", &["resid_pdrop"]),
    ],
    // `n_inner: null` means 4 × n_embd.
    ffn_or_four_hidden: Some("n_inner"),
    norm: ("layernorm", "layer_norm_epsilon", 1e-5),
    activation: ("activation_function", "gelu_new"),
    mlp: "plain",
    block: "pre_norm",
    bias_key: None,
    tied: true,
    rope: None,
    heads: &["lm"],
};

const NAMES: Names = Names {
    base_model_prefix: "transformer",
    blocks: "transformer.h",
    token_embedding: "transformer.wte",
    position_embedding: "transformer.wpe",
    type_embedding: "transformer.wtt",
    embedding_norm: "transformer.ln_emb",
    final_norm: "transformer.ln_f",
    attn_norm: "ln_1",
    qkv: "attn.c_attn",
    query: "attn.c_attn",
    key: "attn.c_attn",
    value: "attn.c_attn",
    attn_out: "attn.c_proj",
    mlp_norm: "ln_2",
    ffn_up: "mlp.c_fc",
    ffn_gate: "mlp.c_gate",
    ffn_down: "mlp.c_proj",
    pooler: "pooler.dense",
    classifier: "score",
    conv1d: true,
};

/// PEFT adapts `c_attn` whole.
const PEFT: Peft = Peft {
    linears: &[Target::Qkv, Target::AttnOut, Target::FfnUp, Target::FfnDown],
    lora: &[Target::Qkv],
    ia3: (&[Target::Qkv, Target::FfnDown], &[Target::FfnDown]),
};

impl HfFamily for Gpt2 {
    fn model_type(&self) -> &'static str {
        "gpt2"
    }

    fn title(&self) -> &'static str {
        "GPT-2"
    }

    fn import(&self) -> &'static Import {
        &IMPORT
    }

    fn config_class(&self) -> &'static str {
        "GPT2Config"
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
            ("block", m.block == Block::PreNorm, "pre_norm"),
            ("bias", m.bias, "true"),
            ("kv_heads", m.kv_heads == m.heads, "heads"),
            ("type_vocab", m.type_vocab == 0, "0"),
        ]
    }

    fn architecture(&self, objective: &Objective) -> Result<(&'static str, Option<u64>), String> {
        Ok(match objective {
            Objective::Reward { .. } => ("GPT2ForSequenceClassification", Some(1)),
            _ => ("GPT2LMHeadModel", None),
        })
    }

    fn config_keys(&self, m: &Model, activation: &str, eps: f64) -> Json {
        let d = m.dropout;
        json!({
            "vocab_size": m.vocab, "n_positions": m.positions,
            "n_embd": m.hidden, "n_layer": m.layers, "n_head": m.heads, "n_inner": m.ffn,
            "activation_function": activation, "layer_norm_epsilon": eps,
            "resid_pdrop": d, "embd_pdrop": d, "attn_pdrop": d,
            // The tokenizer's special tokens are not the model's to know (GPT-2's defaults
            // name token 50256, outside a smaller vocabulary).
            "bos_token_id": null, "eos_token_id": null,
        })
    }

    fn names(&self) -> &'static Names {
        &NAMES
    }

    fn peft(&self) -> &'static Peft {
        &PEFT
    }
}
