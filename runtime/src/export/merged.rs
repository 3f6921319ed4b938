//! The run's model with its LoRA update merged into the weights, as a Hugging Face checkpoint
//! (`config.json` + `model.safetensors`, f32) that transformers loads without PEFT.

use super::{sorted_json, trained, write_dir, ExportError};
use crate::store::safetensors::{check_tensors, read_hf_weights, safetensors_bytes};
use crate::tensor::HostTensor;
use kiln_compiler::graph::{Graph, Layout, Op, ParamRole};
use kiln_compiler::hf;
use kiln_compiler::spec::{Adapter, Experiment, Lora};
use kiln_compiler::Program;
use std::collections::BTreeMap;
use std::path::Path;

/// The experiment's LoRA adapter, if any, when it is the only thing to merge.
fn mergeable_lora(e: &Experiment) -> Result<Option<&Lora>, ExportError> {
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
    Ok(lora)
}

/// The model before training, by name, and its `config.json`: the base checkpoint's files for
/// `hf("dir")` models; for models defined in Kiln, the run's initialisation from its seed (which
/// is what a run's frozen weights stay) and a config transformers reads as the same model.
fn base_model(
    e: &Experiment,
    g: &Graph,
) -> Result<(BTreeMap<String, HostTensor>, Vec<u8>), ExportError> {
    if let Some(dir) = &e.model.checkpoint {
        let dir = Path::new(dir);
        let prefix = hf::of(e.model.family).names().base_model_prefix;
        let (path, tensors) =
            read_hf_weights(dir, prefix).map_err(|err| ExportError(err.to_string()))?;
        check_tensors(g, &path, &tensors, false).map_err(|err| ExportError(err.to_string()))?;
        let config = std::fs::read(dir.join("config.json"))
            .map_err(|err| ExportError(format!("{}: {err}", dir.join("config.json").display())))?;
        return Ok((tensors, config));
    }
    let config = hf::of(e.model.family)
        .to_config(&e.model, &e.objective)
        .map_err(ExportError)?;
    let tensors = g
        .params
        .iter()
        .zip(crate::train::initialise(g, e.train.seed))
        // Neither adapters nor PPO's frozen reference copy are part of the model.
        .filter(|(p, _)| p.role != ParamRole::Adapter && !p.is_reference_copy())
        .map(|(p, v)| (p.name.clone(), v))
        .collect();
    Ok((tensors, sorted_json(config)?))
}

/// Adds s·B·A to every weight the run's LoRA adapted (on the output rows a split target owns).
fn merge_lora(
    g: &Graph,
    l: &Lora,
    trained: &BTreeMap<String, HostTensor>,
    run: &Path,
    tensors: &mut BTreeMap<String, HostTensor>,
) -> Result<(), ExportError> {
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
        let w = tensors
            .get_mut(name)
            .ok_or_else(|| ExportError(format!("the base model has no `{name}` to merge into")))?;
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
    Ok(())
}

/// Writes `<run>`'s model with every LoRA update merged into its weight (W += s·B·A) and every
/// other trained parameter in place, as `model.safetensors` (f32) and `config.json`: a plain
/// Hugging Face model directory.
pub fn export_merged(program: &Program, runs: &Path, out: &Path) -> Result<(), ExportError> {
    let (e, g) = (&program.experiment, &program.graph);
    let lora = mergeable_lora(e)?;
    let (run, trained) = trained(e, runs)?;
    check_tensors(&g, &run, &trained, true).map_err(|err| ExportError(err.to_string()))?;
    let (mut tensors, config) = base_model(e, &g)?;
    for (name, t) in &trained {
        if let Some(slot) = tensors.get_mut(name) {
            *slot = t.clone();
        }
    }
    if let Some(l) = lora {
        merge_lora(&g, l, &trained, &run, &mut tensors)?;
    }
    // BTreeMap order: sorted names.
    let model = safetensors_bytes(
        tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone(), t.data.as_slice()))
            .collect(),
        &[],
    )
    .map_err(ExportError)?;
    write_dir(
        out,
        vec![("model.safetensors", model), ("config.json", config)],
    )
}
