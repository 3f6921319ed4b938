//! A trained adapter in PEFT's format (`adapter_config.json` + an `adapter_model.safetensors`
//! whose keys are `base_model.model.<module>.<tensor>`, or the one `prompt_embeddings` of a
//! virtual-token adapter), so that `PeftModel.from_pretrained` loads it.

use super::{sorted_json, trained, write_dir, ExportError};
use crate::exec::prompt::{prompt_embeddings, PEFT_KEY};
use crate::store::safetensors::safetensors_bytes;
use crate::tensor::HostTensor;
use kiln_compiler::graph::{Graph, ParamRole};
use kiln_compiler::hf;
use kiln_compiler::spec::{Adapter, Experiment, LoraBias, Objective, PromptEncoder, PromptInit};
use kiln_compiler::Program;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;

const PREFIX: &str = "base_model.model.";

/// A module path without its block prefix (`transformer.h.0.attn.c_attn` → `attn.c_attn`),
/// the suffix PEFT matches target names against.
fn after_block(module: &str) -> String {
    let parts: Vec<&str> = module.split('.').collect();
    match parts.iter().position(|s| s.parse::<u64>().is_ok()) {
        Some(i) => parts[i + 1..].join("."),
        None => module.to_string(),
    }
}

/// The modules carrying a parameter named `<module><suffix>` (optionally only those `which`
/// accepts), as PEFT target names.
fn modules_with(g: &Graph, suffix: &str, which: impl Fn(&[u64]) -> bool) -> Vec<String> {
    let set: BTreeSet<String> = g
        .params
        .iter()
        .filter(|p| which(&p.shape))
        .filter_map(|p| p.name.strip_suffix(suffix))
        .map(after_block)
        .collect();
    set.into_iter().collect()
}

/// The experiment's one PEFT adapter (`freeze` is not one).
fn the_adapter(e: &Experiment) -> Result<&Adapter, ExportError> {
    let peft: Vec<&Adapter> = e
        .adapters
        .iter()
        .filter(|a| !matches!(a, Adapter::Freeze(_)))
        .collect();
    match peft.as_slice() {
        [adapter] => Ok(adapter),
        _ => Err(ExportError(format!(
            "PEFT files hold one adapter; this experiment has {}",
            peft.len()
        ))),
    }
}

/// PEFT's prefix-tuning config. PEFT sizes the prefixes by the key/value heads (fewer than the
/// query heads under grouped-query attention).
fn prefix_config(e: &Experiment, tokens: u64, projection: Option<u64>) -> Value {
    let m = &e.model;
    let kv_width = m.kv_heads * (m.hidden / m.heads);
    json!({
        "peft_type": "PREFIX_TUNING", "num_virtual_tokens": tokens, "token_dim": kv_width,
        "num_layers": m.layers, "num_attention_heads": m.kv_heads, "num_transformer_submodules": 1,
        "prefix_projection": projection.is_some(), "encoder_hidden_size": projection.unwrap_or(kv_width),
    })
}

/// PEFT's `adapter_config.json` for the experiment's adapter.
pub fn peft_config(g: &Graph, e: &Experiment) -> Result<Value, ExportError> {
    let adapter = the_adapter(e)?;
    let task = match e.objective {
        Objective::CausalLm | Objective::Sft { .. } | Objective::Ppo(_) => json!("CAUSAL_LM"),
        Objective::Reward { .. } => json!("SEQ_CLS"),
        // PEFT has no masked-LM task type, and without one `PeftModel` runs the base model
        // alone: a prompt would load and never be used. TOKEN_CLS prepends it and gives the
        // virtual tokens type 0 beside the real tokens' types, as Kiln trained it.
        _ if adapter.virtual_tokens().is_some() => json!("TOKEN_CLS"),
        _ => Value::Null,
    };
    let base = json!(e
        .model
        .checkpoint
        .clone()
        .unwrap_or_else(|| e.model.name.clone()));
    let layers = e.model.layers;
    let heads = e.model.heads;
    // GPT-2's Conv1D weights are stored [in, out].
    let fan_in_fan_out = hf::of(e.model.family).names().conv1d;
    let mut config = match adapter {
        Adapter::Lora(l) => json!({
            "peft_type": "LORA", "r": l.rank, "lora_alpha": l.alpha, "lora_dropout": l.dropout,
            "target_modules": modules_with(g, ".lora_A.weight", |_| true),
            "bias": match l.bias { LoraBias::None => "none", LoraBias::All => "all", LoraBias::LoraOnly => "lora_only" },
            "fan_in_fan_out": fan_in_fan_out,
            "use_rslora": l.rslora, "use_dora": l.dora, "init_lora_weights": true,
            "layers_to_transform": null, "layers_pattern": null, "rank_pattern": {}, "alpha_pattern": {},
        }),
        Adapter::Ia3 { .. } => json!({
            "peft_type": "IA3",
            "target_modules": modules_with(g, ".ia3_l", |_| true),
            // Feed-forward vectors scale the input: PEFT stores them as [1, in].
            "feedforward_modules": modules_with(g, ".ia3_l", |shape| shape.first() == Some(&1)),
            "fan_in_fan_out": fan_in_fan_out, "init_ia3_weights": true,
        }),
        Adapter::Prompt { tokens, init } => json!({
            "peft_type": "PROMPT_TUNING", "num_virtual_tokens": tokens, "token_dim": e.model.hidden,
            "num_layers": layers, "num_attention_heads": heads, "num_transformer_submodules": 1,
            "prompt_tuning_init": match init { PromptInit::Random => "RANDOM", PromptInit::Vocab => "SAMPLE_VOCAB", PromptInit::Text(_) => "TEXT" },
            "prompt_tuning_init_text": match init { PromptInit::Text(t) => json!(t), _ => Value::Null },
        }),
        Adapter::Prefix { tokens, projection } => prefix_config(e, *tokens, *projection),
        Adapter::PtuningV2 { tokens } => prefix_config(e, *tokens, None),
        // Kiln's LSTM encoder has PEFT's default two layers and no dropout.
        Adapter::Ptuning {
            tokens,
            encoder,
            hidden,
        } => json!({
            "peft_type": "P_TUNING", "num_virtual_tokens": tokens, "token_dim": e.model.hidden,
            "num_layers": layers, "num_attention_heads": heads, "num_transformer_submodules": 1,
            "encoder_reparameterization_type": match encoder { PromptEncoder::Mlp => "MLP", PromptEncoder::Lstm => "LSTM" },
            "encoder_hidden_size": hidden, "encoder_num_layers": 2, "encoder_dropout": 0.0,
        }),
        Adapter::Bottleneck { .. } | Adapter::Freeze(_) => {
            return Err(ExportError(format!(
                "PEFT has no `{}` adapter to export to",
                adapter.name()
            )))
        }
    };
    let object = config.as_object_mut().expect("built as an object");
    object.insert("task_type".into(), task);
    object.insert("base_model_name_or_path".into(), base);
    // As PEFT saves: loading builds the adapter for inference (a prompt as a plain table).
    object.insert("inference_mode".into(), json!(true));
    object.insert("modules_to_save".into(), Value::Null);
    object.insert("revision".into(), Value::Null);
    Ok(config)
}

/// Writes `adapter_config.json` (sorted keys) and `adapter_model.safetensors` into `out`.
/// Virtual-token adapters are saved as PEFT saves them: the prompt their encoder computes from
/// `values`, not the encoder.
pub fn write_peft(
    g: &Graph,
    values: &[HostTensor],
    e: &Experiment,
    out: &Path,
) -> Result<(), ExportError> {
    let config = peft_config(g, e)?;
    let prompt = if the_adapter(e)?.prepends_tokens() {
        Some(prompt_embeddings(g, values).map_err(ExportError)?)
    } else {
        None
    };
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = match &prompt {
        Some(p) => vec![(PEFT_KEY.to_string(), p.shape.clone(), &p.data)],
        None => g
            .params
            .iter()
            .zip(values)
            .filter(|(p, _)| p.role == ParamRole::Adapter)
            .map(|(p, v)| (format!("{PREFIX}{}", p.name), v.shape.clone(), &v.data[..]))
            .collect(),
    };
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = safetensors_bytes(tensors, &[]).map_err(ExportError)?;
    write_dir(
        out,
        vec![
            ("adapter_model.safetensors", bytes),
            ("adapter_config.json", sorted_json(config)?),
        ],
    )
}

/// Exports the adapter of the finished run of `e` (its final checkpoint).
pub fn export_run(program: &Program, runs: &Path, out: &Path) -> Result<(), ExportError> {
    let (e, g) = (&program.experiment, &program.graph);
    let (path, tensors) = trained(e, runs)?;
    crate::store::safetensors::check_tensors(&g, &path, &tensors, true)
        .map_err(|err| ExportError(err.to_string()))?;
    let bound = crate::store::safetensors::bind(&g, &[(path.clone(), tensors)])
        .map_err(|err| ExportError(err.to_string()))?;
    let values: Vec<HostTensor> = bound
        .into_iter()
        .zip(&g.params)
        .map(|(v, p)| match v {
            Some(v) => Ok(v),
            // Only adapter tensors are written; the frozen model is not in a run's checkpoint.
            None if p.role != ParamRole::Adapter => Ok(HostTensor::absent()),
            None => Err(ExportError(format!(
                "{} has no `{}`",
                path.display(),
                p.name
            ))),
        })
        .collect::<Result<_, _>>()?;
    write_peft(&g, &values, e, out)
}
