//! Exporting a trained adapter in PEFT's format (`adapter_config.json` + an
//! `adapter_model.safetensors` whose keys are `base_model.model.<module>.<tensor>`), so that
//! `PeftModel.from_pretrained` loads it; or the base model with LoRA merged in, as a Hugging Face
//! checkpoint `from_pretrained` loads without PEFT.

use crate::checkpoint::{safetensors_bytes, write_atomic, HostTensor};
use kiln_compiler::graph::{Graph, Layout, Op, ParamRole};
use kiln_compiler::spec::{Adapter, Experiment, LoraBias, Objective, PromptInit};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;

#[derive(Debug)]
pub struct ExportError(pub String);

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ExportError {}

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

/// PEFT's `adapter_config.json` for the experiment's adapter.
pub fn peft_config(g: &Graph, e: &Experiment) -> Result<Value, ExportError> {
    let peft: Vec<&Adapter> = e
        .adapters
        .iter()
        .filter(|a| !matches!(a, Adapter::Freeze(_)))
        .collect();
    let [adapter] = peft.as_slice() else {
        return Err(ExportError(format!(
            "PEFT files hold one adapter; this experiment has {}",
            peft.len()
        )));
    };
    let task = match e.objective {
        Objective::CausalLm | Objective::Sft { .. } | Objective::Ppo(_) => json!("CAUSAL_LM"),
        Objective::Reward { .. } => json!("SEQ_CLS"),
        _ => Value::Null,
    };
    let base = json!(e
        .model
        .checkpoint
        .clone()
        .unwrap_or_else(|| e.model.name.clone()));
    let layers = e.model.layers;
    let heads = e.model.heads;
    let mut config = match adapter {
        Adapter::Lora(l) => json!({
            "peft_type": "LORA", "r": l.rank, "lora_alpha": l.alpha, "lora_dropout": l.dropout,
            "target_modules": modules_with(g, ".lora_A.weight", |_| true),
            "bias": match l.bias { LoraBias::None => "none", LoraBias::All => "all", LoraBias::LoraOnly => "lora_only" },
            "fan_in_fan_out": e.model.family == kiln_compiler::spec::Family::Gpt2,
            "use_rslora": l.rslora, "use_dora": l.dora, "init_lora_weights": true,
            "layers_to_transform": null, "layers_pattern": null, "rank_pattern": {}, "alpha_pattern": {},
        }),
        Adapter::Ia3 { .. } => json!({
            "peft_type": "IA3",
            "target_modules": modules_with(g, ".ia3_l", |_| true),
            // Feed-forward vectors scale the input: PEFT stores them as [1, in].
            "feedforward_modules": modules_with(g, ".ia3_l", |shape| shape.first() == Some(&1)),
            "fan_in_fan_out": e.model.family == kiln_compiler::spec::Family::Gpt2, "init_ia3_weights": true,
        }),
        Adapter::Prompt { tokens, init } => json!({
            "peft_type": "PROMPT_TUNING", "num_virtual_tokens": tokens, "token_dim": e.model.hidden,
            "num_layers": layers, "num_attention_heads": heads, "num_transformer_submodules": 1,
            "prompt_tuning_init": match init { PromptInit::Random => "RANDOM", PromptInit::Vocab => "SAMPLE_VOCAB", PromptInit::Text(_) => "TEXT" },
            "prompt_tuning_init_text": match init { PromptInit::Text(t) => json!(t), _ => Value::Null },
        }),
        Adapter::Prefix { tokens, projection: None } | Adapter::PtuningV2 { tokens } => json!({
            "peft_type": "PREFIX_TUNING", "num_virtual_tokens": tokens, "token_dim": e.model.hidden,
            "num_layers": layers, "num_attention_heads": heads, "num_transformer_submodules": 1,
            "prefix_projection": false, "encoder_hidden_size": e.model.hidden,
        }),
        other => return Err(ExportError(format!("exporting `{}` needs its encoder's output computed; only the stored table is written so far", other.name()))),
    };
    let object = config.as_object_mut().expect("built as an object");
    object.insert("task_type".into(), task);
    object.insert("base_model_name_or_path".into(), base);
    object.insert("inference_mode".into(), json!(true));
    object.insert("modules_to_save".into(), Value::Null);
    object.insert("revision".into(), Value::Null);
    Ok(config)
}

/// Writes `adapter_config.json` (sorted keys) and `adapter_model.safetensors` into `out`.
pub fn write_peft(
    g: &Graph,
    values: &[HostTensor],
    e: &Experiment,
    out: &Path,
) -> Result<(), ExportError> {
    let config = peft_config(g, e)?;
    let prompt = matches!(
        config["peft_type"].as_str(),
        Some("PROMPT_TUNING" | "PREFIX_TUNING")
    );
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for (p, v) in g.params.iter().zip(values) {
        if p.role != ParamRole::Adapter {
            continue;
        }
        // Prompt methods store one tensor: the virtual tokens (the table, with no encoder).
        let name = if prompt {
            "prompt_embeddings".to_string()
        } else {
            format!("{PREFIX}{}", p.name)
        };
        tensors.push((name, v.shape.clone(), &v.data));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = safetensors_bytes(tensors).map_err(ExportError)?;
    std::fs::create_dir_all(out).map_err(|err| ExportError(format!("{}: {err}", out.display())))?;
    // serde_json's maps are ordered here; sort the keys as PEFT writes them.
    let sorted: std::collections::BTreeMap<String, Value> = config
        .as_object()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let text = serde_json::to_string_pretty(&sorted).map_err(|err| ExportError(err.to_string()))?;
    for (file, content) in [
        ("adapter_model.safetensors", bytes),
        ("adapter_config.json", text.into_bytes()),
    ] {
        write_atomic(&out.join(file), &content).map_err(ExportError)?;
    }
    Ok(())
}

/// Exports the adapter of a finished (or checkpointed) run of `e` from `runs/<name>/checkpoint`.
pub fn export_run(e: &Experiment, runs: &Path, out: &Path) -> Result<(), ExportError> {
    let g = kiln_compiler::graph::compile_graph(e)
        .map_err(|d| ExportError(format!("{:?}", d.items)))?;
    let path = runs
        .join(&e.name)
        .join("checkpoint")
        .join("trainable.safetensors");
    let trained = crate::checkpoint::read_safetensors(&path)
        .map_err(|err| ExportError(format!("{err}; run `kiln run` first")))?;
    let bound = crate::checkpoint::bind(&g, &[(path.clone(), trained)])
        .map_err(|err| ExportError(err.to_string()))?;
    let values: Vec<HostTensor> = bound
        .into_iter()
        .zip(&g.params)
        .map(|(v, p)| match v {
            Some(v) => Ok(v),
            // Only adapter tensors are written; the frozen model is not in a run's checkpoint.
            None if p.role != ParamRole::Adapter => Ok(HostTensor {
                shape: Vec::new(),
                data: Vec::new(),
            }),
            None => Err(ExportError(format!(
                "{} has no `{}`",
                path.display(),
                p.name
            ))),
        })
        .collect::<Result<_, _>>()?;
    write_peft(&g, &values, e, out)
}

/// Writes `<run>`'s model with every LoRA update merged into its weight (W += s·B·A, on the
/// output rows a split target owns) and every other trained parameter in place, as
/// `model.safetensors` (f32) beside the base checkpoint's `config.json`: a plain Hugging Face
/// model directory.
pub fn export_merged(e: &Experiment, runs: &Path, out: &Path) -> Result<(), ExportError> {
    let Some(base) = &e.model.checkpoint else {
        return Err(ExportError(
            "--merged writes the base model as a Hugging Face checkpoint, and this model was not loaded from one (`model = hf(\"dir\")` keeps its config.json); use --peft".into(),
        ));
    };
    let mut lora = None;
    for a in &e.adapters {
        match a {
            Adapter::Lora(l) if !l.dora && lora.is_none() => lora = Some(l),
            Adapter::Freeze(_) => {}
            other => {
                return Err(ExportError(format!(
                    "only one plain LoRA adapter merges into the base weights; this experiment has {}{}",
                    other.name(),
                    if matches!(other, Adapter::Lora(_)) { " (DoRA, or a second LoRA)" } else { "" }
                )))
            }
        }
    }
    let g = kiln_compiler::graph::compile_graph(e)
        .map_err(|d| ExportError(format!("{:?}", d.items)))?;
    let read = |path: &Path| {
        crate::checkpoint::read_safetensors(path).map_err(|err| ExportError(err.to_string()))
    };
    let base = Path::new(base);
    // Everything the base checkpoint holds is written back, trained parameters updated.
    let mut tensors = read(&base.join("model.safetensors"))?;
    let run = runs
        .join(&e.name)
        .join("checkpoint")
        .join("trainable.safetensors");
    let trained = crate::checkpoint::read_safetensors(&run)
        .map_err(|err| ExportError(format!("{err}; run `kiln run` first")))?;
    for (name, t) in &trained {
        if tensors.contains_key(name) {
            tensors.insert(name.clone(), t.clone());
        }
    }
    if let Some(l) = lora {
        let scaling = if l.rslora {
            l.alpha / (l.rank as f64).sqrt()
        } else {
            l.alpha / l.rank as f64
        } as f32;
        for n in g.dag.node_indices() {
            let node = &g.dag[n];
            let Op::Linear {
                weight,
                layout,
                in_features,
                out_features,
                ..
            } = &node.op
            else {
                continue;
            };
            let (Some(a), Some(b)) = (
                trained.get(&format!("{}.lora_A.weight", node.name)),
                trained.get(&format!("{}.lora_B.weight", node.name)),
            ) else {
                continue;
            };
            let (rows, cols, r) = (
                *out_features as usize,
                *in_features as usize,
                l.rank as usize,
            );
            if a.shape != [r, cols] || b.shape != [rows, r] {
                return Err(ExportError(format!(
                    "{}: `{}`'s LoRA tensors are {:?} and {:?}, the experiment's rank {r} needs [{r}, {cols}] and [{rows}, {r}]; was the run trained with another rank?",
                    run.display(),
                    node.name,
                    a.shape,
                    b.shape
                )));
            }
            let name = &g.params[weight.id].name;
            let w = tensors.get_mut(name).ok_or_else(|| {
                ExportError(format!("{}: no `{name}` to merge into", base.display()))
            })?;
            let start = weight.outputs.map_or(0, |(s, _)| s as usize);
            // Rows of the whole parameter: a split target owns `start..start + rows` of them.
            let total = w.data.len() / cols;
            for o in 0..rows {
                for i in 0..cols {
                    let delta: f32 = (0..r)
                        .map(|k| b.data[o * r + k] * a.data[k * cols + i])
                        .sum();
                    let at = match layout {
                        Layout::OutIn => (start + o) * cols + i,
                        Layout::InOut => i * total + start + o,
                    };
                    w.data[at] += scaling * delta;
                }
            }
        }
    }
    // BTreeMap order: sorted names.
    let model = safetensors_bytes(
        tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone(), t.data.as_slice()))
            .collect(),
    )
    .map_err(ExportError)?;
    let config = std::fs::read(base.join("config.json"))
        .map_err(|err| ExportError(format!("{}: {err}", base.join("config.json").display())))?;
    std::fs::create_dir_all(out).map_err(|err| ExportError(format!("{}: {err}", out.display())))?;
    for (file, content) in [("model.safetensors", model), ("config.json", config)] {
        write_atomic(&out.join(file), &content).map_err(ExportError)?;
    }
    Ok(())
}
