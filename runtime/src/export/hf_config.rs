//! A Hugging Face `config.json` for a model defined in Kiln (`gpt2 { hidden = 256 }` rather
//! than `hf("dir")`): the fields transformers' GPT2Config, BertConfig and LlamaConfig read, so
//! that `from_pretrained` builds the model Kiln trained (the inverse of the compiler's `hf()`).
//! A knob the family's config cannot express is an error naming it.

use kiln_compiler::spec::{Activation, Block, Family, Mlp, Model, Norm, Objective, Position};
use serde_json::{json, Value};

/// The transformers class holding exactly the heads Kiln trains for `objective`, and the number
/// of labels of a sequence classifier.
fn architecture(
    family: Family,
    objective: &Objective,
) -> Result<(&'static str, Option<u64>), String> {
    Ok(match (family, objective) {
        (Family::Gpt2, Objective::Reward { .. }) => ("GPT2ForSequenceClassification", Some(1)),
        (Family::Llama, Objective::Reward { .. }) => ("LlamaForSequenceClassification", Some(1)),
        (Family::Gpt2, _) => ("GPT2LMHeadModel", None),
        (Family::Llama, _) => ("LlamaForCausalLM", None),
        (Family::Bert, Objective::Mlm(_) | Objective::Pvp(_)) => ("BertForMaskedLM", None),
        (Family::Bert, Objective::Nsp { .. }) => ("BertForNextSentencePrediction", None),
        (Family::Bert, Objective::MlmNsp { .. }) => ("BertForPreTraining", None),
        (Family::Bert, _) => {
            return Err(
                "the heads Kiln trains on BERT for this objective are not those of a transformers BERT class (MLM, NSP or both are)"
                    .into(),
            )
        }
    })
}

/// What a family's config fixes: (knob, whether the model agrees, the value the family has).
fn fixed(m: &Model) -> Vec<(&'static str, bool, &'static str)> {
    let layernorm = matches!(m.norm, Norm::Layernorm { .. });
    let learned = m.position == Position::Learned;
    let pre_norm = m.block == Block::PreNorm;
    let plain = m.mlp == Mlp::Plain;
    let all_heads = m.kv_heads == m.heads;
    match m.family {
        Family::Gpt2 => vec![
            ("norm", layernorm, "layernorm"),
            ("mlp", plain, "plain"),
            ("position", learned, "learned"),
            ("block", pre_norm, "pre_norm"),
            ("bias", m.bias, "true"),
            ("kv_heads", all_heads, "heads"),
            ("type_vocab", m.type_vocab == 0, "0"),
        ],
        Family::Bert => vec![
            ("norm", layernorm, "layernorm"),
            ("mlp", plain, "plain"),
            ("position", learned, "learned"),
            ("block", !pre_norm, "post_norm"),
            ("bias", m.bias, "true"),
            ("kv_heads", all_heads, "heads"),
            ("type_vocab", m.type_vocab > 0, "at least 1"),
        ],
        // LLaMA's attention_bias and mlp_bias express `bias` either way.
        Family::Llama => vec![
            ("norm", !layernorm, "rmsnorm"),
            ("mlp", !plain, "gated"),
            (
                "position",
                matches!(m.position, Position::Rotary { .. }),
                "rotary",
            ),
            ("block", pre_norm, "pre_norm"),
            ("type_vocab", m.type_vocab == 0, "0"),
        ],
    }
}

/// `config.json` for model `m` trained with `objective`.
pub fn config_json(m: &Model, objective: &Objective) -> Result<Value, String> {
    let class = match m.family {
        Family::Gpt2 => "GPT2Config",
        Family::Bert => "BertConfig",
        Family::Llama => "LlamaConfig",
    };
    if let Some((knob, _, want)) = fixed(m).into_iter().find(|(_, agrees, _)| !agrees) {
        return Err(format!(
            "--merged writes a Hugging Face checkpoint, and transformers' {class} cannot describe this model's `{knob}` (it has {knob} = {want}); use --peft, or keep {knob} as the family has it"
        ));
    }
    let (arch, labels) = architecture(m.family, objective)?;
    let eps = match m.norm {
        Norm::Layernorm { eps } | Norm::Rmsnorm { eps } => eps,
    };
    let act = match m.activation {
        Activation::Gelu => "gelu",
        Activation::GeluTanh => "gelu_new",
        Activation::Relu => "relu",
        Activation::Silu => "silu",
    };
    let d = m.dropout;
    let mut config = match m.family {
        Family::Gpt2 => json!({
            "model_type": "gpt2", "vocab_size": m.vocab, "n_positions": m.positions,
            "n_embd": m.hidden, "n_layer": m.layers, "n_head": m.heads, "n_inner": m.ffn,
            "activation_function": act, "layer_norm_epsilon": eps,
            "resid_pdrop": d, "embd_pdrop": d, "attn_pdrop": d,
        }),
        Family::Bert => json!({
            "model_type": "bert", "vocab_size": m.vocab, "max_position_embeddings": m.positions,
            "hidden_size": m.hidden, "num_hidden_layers": m.layers, "num_attention_heads": m.heads,
            "intermediate_size": m.ffn, "hidden_act": act, "layer_norm_eps": eps,
            "type_vocab_size": m.type_vocab,
            "hidden_dropout_prob": d, "attention_probs_dropout_prob": d,
        }),
        Family::Llama => json!({
            "model_type": "llama", "vocab_size": m.vocab, "max_position_embeddings": m.positions,
            "hidden_size": m.hidden, "num_hidden_layers": m.layers,
            "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads,
            "head_dim": m.hidden / m.heads.max(1), "intermediate_size": m.ffn,
            "hidden_act": act, "rms_norm_eps": eps,
            "attention_bias": m.bias, "mlp_bias": m.bias, "attention_dropout": d,
        }),
    };
    let object = config.as_object_mut().expect("built as an object");
    object.insert("architectures".into(), json!([arch]));
    object.insert("tie_word_embeddings".into(), json!(m.tie_embeddings));
    if m.family != Family::Bert {
        // The tokenizer's special tokens are not the model's to know (GPT-2's defaults name
        // token 50256, outside a smaller vocabulary).
        object.insert("bos_token_id".into(), Value::Null);
        object.insert("eos_token_id".into(), Value::Null);
    }
    if let Position::Rotary { theta } = m.position {
        // transformers 4 reads `rope_theta`, 5 reads `rope_parameters`.
        object.insert("rope_theta".into(), json!(theta));
        object.insert(
            "rope_parameters".into(),
            json!({ "rope_type": "default", "rope_theta": theta }),
        );
    }
    if let Some(n) = labels {
        let id2label: serde_json::Map<String, Value> = (0..n)
            .map(|i| (i.to_string(), json!(format!("LABEL_{i}"))))
            .collect();
        let label2id: serde_json::Map<String, Value> =
            (0..n).map(|i| (format!("LABEL_{i}"), json!(i))).collect();
        object.insert("id2label".into(), Value::Object(id2label));
        object.insert("label2id".into(), Value::Object(label2id));
    }
    Ok(config)
}
