//! Where a run's parameters start: the finished run of the stage it starts from (`init`),
//! pretrained weights (`hf("dir")`), trained adapters (`peft("dir")`), over fresh initial
//! values. Nothing is invented silently: a parameter a named checkpoint should hold and does not
//! stops the run, unless `init_missing` allows starting it fresh; a task head the checkpoint
//! does not have starts fresh as transformers starts it. Both are listed to the user.

use crate::store::run_dir::latest_checkpoint;
use crate::store::safetensors::{bind, read_hf_weights, read_safetensors};
use crate::store::sharded::saved_weights;
use crate::tensor::HostTensor;
use crate::train::checkpoint::{Progress, STATE_FILE};
use crate::train::ppo::Source;
use crate::train::{initialise, RunError};
use kiln_compiler::graph::{Graph, LayerKind, Param, ParamRole};
use kiln_compiler::hf;
use kiln_compiler::spec::Experiment;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The weights of a stage's finished run under `runs` (its final checkpoint's trainable
/// tensors, and the frozen ones of a model defined in Kiln); `user` says who needs them and how ("`rlhf_ppo` uses the reward model
/// of"), for the errors that name the stage to run or finish first.
pub(crate) fn stage_weights(
    runs: &Path,
    stage: &str,
    user: &str,
) -> Result<(PathBuf, BTreeMap<String, HostTensor>), RunError> {
    let run_dir = runs.join(stage);
    let checkpoint = latest_checkpoint(&run_dir)?.ok_or_else(|| {
        RunError(format!(
            "{user} `{stage}`, which has no checkpoint yet ({} has none): run that stage first (`kiln run FILE --experiment {stage}`)",
            run_dir.display()
        ))
    })?;
    let progress: Progress =
        serde_json::from_slice(checkpoint.file(STATE_FILE)?).map_err(|err| {
            RunError(format!(
                "{}: {err}",
                checkpoint.dir.join(STATE_FILE).display()
            ))
        })?;
    if progress.total.is_some_and(|total| progress.step < total) {
        return Err(RunError(format!(
            "{user} `{stage}`, whose run stopped at step {} of {}: finish it first (`kiln run FILE --experiment {stage} --resume`)",
            progress.step,
            progress.total.unwrap_or_default()
        )));
    }
    let tensors = saved_weights(&checkpoint)?;
    Ok((checkpoint.dir, tensors))
}

/// The checkpoints `e` names, first match winning when two hold a tensor: the stage it starts
/// from, the pretrained model, the adapters.
pub(crate) fn named_checkpoints(
    e: &Experiment,
    graph: &Graph,
    runs: &Path,
) -> Result<Vec<Source>, RunError> {
    let mut files = Vec::new();
    if let Some(stage) = &e.init {
        files.push(stage_weights(
            runs,
            stage,
            &format!("`{}` starts from", e.name),
        )?);
    }
    if let Some(dir) = &e.model.checkpoint {
        let prefix = base_prefix(e);
        files.push(
            read_hf_weights(Path::new(dir), prefix).map_err(|err| RunError(err.to_string()))?,
        );
    }
    for path in e
        .adapter_weights
        .iter()
        .map(|dir| Path::new(dir).join("adapter_model.safetensors"))
    {
        let tensors = read_safetensors(&path).map_err(|err| RunError(err.to_string()))?;
        // A virtual-token adapter's file holds its prompt under PEFT's name.
        let tensors = crate::exec::prompt::from_peft(graph, tensors)
            .map_err(|err| RunError(format!("{}: {err}", path.display())))?;
        files.push((path, tensors));
    }
    Ok(files)
}

fn base_prefix(e: &Experiment) -> &'static str {
    hf::of(e.model.family).names().base_model_prefix
}

/// What a named checkpoint owes a parameter.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owed {
    /// It must hold it (the model's body from `hf`, the adapter from `peft`).
    Required,
    /// A task head of the model (MLM, NSP, pooler, LM or classification head) that a bare
    /// model's checkpoint lacks: started fresh when absent, as transformers does.
    Head,
    /// Nothing (no checkpoint is named for it, a new head, PPO's reference copy).
    Nothing,
}

/// The kind of adapter a parameter belongs to, by PEFT's names (one kind per PEFT file).
fn adapter_kind(name: &str) -> &'static str {
    if name.contains(".lora_") {
        "lora"
    } else if name.contains("ia3_l") {
        "ia3"
    } else if name.starts_with("prompt_encoder") {
        "virtual tokens"
    } else {
        "bottleneck"
    }
}

fn owed(e: &Experiment, graph: &Graph, p: &Param, peft_kinds: &BTreeSet<&str>) -> Owed {
    // PPO's frozen reference copy is filled from the policy (or its stage) afterwards.
    if p.is_reference_copy() {
        return Owed::Nothing;
    }
    match p.role {
        ParamRole::NewHead => Owed::Nothing,
        ParamRole::Adapter if peft_kinds.contains(adapter_kind(&p.name)) => Owed::Required,
        ParamRole::Adapter => Owed::Nothing,
        _ if e.model.checkpoint.is_none() => Owed::Nothing,
        _ => {
            let head_layer = graph
                .layers
                .get(p.layer)
                .is_some_and(|l| l.kind == LayerKind::Head);
            // The final norm sits in the head layer but belongs to the base model.
            let final_norm = matches!(p.role, ParamRole::Norm | ParamRole::NormBias)
                && p.name.starts_with(&format!("{}.", base_prefix(e)));
            if head_layer && !final_norm {
                Owed::Head
            } else {
                Owed::Required
            }
        }
    }
}

/// Every parameter's starting value, and the names of those that started fresh though a
/// checkpoint was named (heads it lacks; with `init_missing`, anything it lacks).
pub(crate) fn starting_values(
    e: &Experiment,
    graph: &Graph,
    files: &[Source],
) -> Result<(Vec<HostTensor>, Vec<String>), RunError> {
    // The kinds of adapter the PEFT files hold; a file that holds none of the experiment's
    // adapter tensors (empty, or another model's) would otherwise leave them silently fresh.
    let adapter_params: BTreeSet<&str> = graph
        .params
        .iter()
        .filter(|p| p.role == ParamRole::Adapter)
        .map(|p| p.name.as_str())
        .collect();
    let mut peft_kinds = BTreeSet::new();
    for (path, tensors) in &files[files.len() - e.adapter_weights.len()..] {
        let kinds: BTreeSet<&str> = tensors
            .keys()
            .filter(|k| adapter_params.contains(k.as_str()))
            .map(|k| adapter_kind(k))
            .collect();
        if kinds.is_empty() {
            return Err(RunError(format!(
                "{} holds none of `{}`'s adapter tensors (it has {} tensors): is it an adapter of this model and adapter type?",
                path.display(),
                e.name,
                tensors.len()
            )));
        }
        peft_kinds.extend(kinds);
    }
    let mut values = initialise(graph, e.train.seed);
    let bound = bind(graph, files).map_err(|err| RunError(err.to_string()))?;
    let (mut fresh, mut missing) = (Vec::new(), Vec::new());
    for ((slot, p), value) in values.iter_mut().zip(&graph.params).zip(bound) {
        match (value, owed(e, graph, p, &peft_kinds)) {
            (Some(t), _) => *slot = t,
            (None, Owed::Head) => fresh.push(p.name.clone()),
            (None, Owed::Required) => missing.push(p.name.clone()),
            (None, Owed::Nothing) => {}
        }
    }
    if !missing.is_empty() && !e.train.init_missing {
        let sources: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
        const SHOWN: usize = 8;
        let mut names = missing[..missing.len().min(SHOWN)].join(", ");
        if missing.len() > SHOWN {
            names.push_str(&format!(", and {} more", missing.len() - SHOWN));
        }
        let required = graph
            .params
            .iter()
            .filter(|p| owed(e, graph, p, &peft_kinds) == Owed::Required)
            .count();
        return Err(RunError(format!(
            "{} of the {required} parameters `{}` expects from its checkpoint are not in {}: {names}. Is it the checkpoint of the model the experiment describes? To start the missing ones from fresh initial values, set `train {{ init_missing = true }}`",
            missing.len(),
            e.name,
            sources.join(" or ")
        )));
    }
    fresh.extend(missing);
    Ok((values, fresh))
}
