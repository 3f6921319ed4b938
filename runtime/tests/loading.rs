//! Loading never invents weights: every parameter a named checkpoint (`hf`, `peft`) should
//! hold comes from it, or the run stops naming what is missing (`init_missing` starts those
//! fresh, listing them). Sharded and bare-model Hugging Face checkpoints load as transformers
//! loads them; pickles are refused with the way to convert them; a run's checkpoint exported
//! against another experiment is refused.

use kiln_runtime::store::safetensors::read_safetensors;
use kiln_runtime::tensor::HostTensor;
use kiln_runtime::train::{Control, Event, Start};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;
use common::{run, tensor_bytes, tiny_corpus};

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-loading-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the GPT-2 fixture's config in `dir`, with `tensors` as its weights file(s).
fn model_dir(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(
        fixtures().join("gpt2_tiny/config.json"),
        model.join("config.json"),
    )
    .unwrap();
    model
}

fn write_tensors(path: &Path, tensors: &BTreeMap<String, HostTensor>) {
    std::fs::write(path, tensor_bytes(tensors)).unwrap();
}

fn fixture_weights() -> BTreeMap<String, HostTensor> {
    read_safetensors(&fixtures().join("gpt2_tiny/model.safetensors")).unwrap()
}

/// Experiment `e` on the model in `model`, with `extra` fields (an adapter) and `train` fields.
fn experiment(
    dir: &Path,
    model: &Path,
    extra: &str,
    train: &str,
) -> kiln_compiler::spec::Experiment {
    let (data, tokenizer) = tiny_corpus(dir);
    let src = format!(
        "experiment e {{ model = hf(\"{}\"), {extra} \
         data {{ train = \"{}\", tokenizer = \"{}\" }}, \
         train {{ batch = 2, seq_len = 16 {train} }} }}",
        model.display(),
        data.display(),
        tokenizer.display()
    );
    let checked = kiln_compiler::check_source("loading.kiln", &src, Some(dir));
    assert!(checked.is_ok(), "{}", checked.render_errors());
    checked.module.experiments[0].value.clone()
}

/// One step of `e` under `dir/runs`; the parameters `init_missing` started fresh.
fn one_step(dir: &Path, e: &kiln_compiler::spec::Experiment) -> Result<Vec<String>, String> {
    let mut initialised = Vec::new();
    run(e, &dir.join("runs"), Some(1), Start::Restart, |event| {
        if let Event::Started {
            initialised: names, ..
        } = event
        {
            initialised = names.to_vec();
        }
        Control::Continue
    })
    .map_err(|err| err.0)?;
    Ok(initialised)
}

#[test]
fn a_checkpoint_missing_tensors_stops_the_run_naming_them() {
    let dir = scratch("missing");
    let model = model_dir(&dir);
    let mut weights = fixture_weights();
    weights.retain(|name, _| !name.starts_with("transformer.h.1."));
    write_tensors(&model.join("model.safetensors"), &weights);
    let err = one_step(&dir, &experiment(&dir, &model, "", "")).unwrap_err();
    assert!(
        err.contains("transformer.h.1.attn.c_attn.weight") && err.contains("init_missing"),
        "{err}"
    );
    assert!(
        !dir.join("runs/e/checkpoints").exists(),
        "nothing trained, nothing saved"
    );
    // Asked for, the missing ones start fresh and are listed.
    let e = experiment(&dir, &model, "", ", init_missing = true");
    let initialised = one_step(&dir, &e).unwrap();
    assert!(!initialised.is_empty());
    assert!(initialised
        .iter()
        .all(|n| n.starts_with("transformer.h.1.")));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_empty_peft_adapter_is_refused() {
    let dir = scratch("empty-peft");
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::copy(
        fixtures().join("gpt2_tiny/clm_lora/adapter_config.json"),
        adapter.join("adapter_config.json"),
    )
    .unwrap();
    let e = experiment(
        &dir,
        &fixtures().join("gpt2_tiny"),
        &format!("adapter = peft(\"{}\"),", adapter.display()),
        "",
    );
    write_tensors(&adapter.join("adapter_model.safetensors"), &BTreeMap::new());
    let err = one_step(&dir, &e).unwrap_err();
    assert!(err.contains("holds none of `e`'s adapter tensors"), "{err}");
    // Half an adapter: the missing half is named.
    let mut tensors =
        read_safetensors(&fixtures().join("gpt2_tiny/clm_lora/adapter_model.safetensors")).unwrap();
    tensors.retain(|name, _| !name.contains("lora_A"));
    write_tensors(&adapter.join("adapter_model.safetensors"), &tensors);
    let err = one_step(&dir, &e).unwrap_err();
    assert!(
        err.contains("lora_A") && err.contains("adapter_model.safetensors"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The weights a one-step run with a vanishing learning rate saved (what it started from).
fn started_from(dir: &Path, model: &Path) -> BTreeMap<String, HostTensor> {
    let e = experiment(
        dir,
        model,
        "",
        ", optimizer = sgd { lr = 1e-30 }, schedule = constant",
    );
    one_step(dir, &e).unwrap();
    let newest = kiln_runtime::store::run_dir::latest_checkpoint(&dir.join("runs/e"))
        .unwrap()
        .unwrap();
    kiln_runtime::store::sharded::saved_weights(&newest).unwrap()
}

/// The same tensors, by name (named in the failure, not printed).
fn same(got: &BTreeMap<String, HostTensor>, want: &BTreeMap<String, HostTensor>, what: &str) {
    let names = |m: &BTreeMap<String, HostTensor>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}");
    for (name, t) in want {
        assert!(got[name] == *t, "{what}: `{name}` differs");
    }
}

#[test]
fn sharded_and_bare_model_checkpoints_load_like_the_single_file() {
    let dir = scratch("shards");
    let weights = fixture_weights();
    let want = started_from(&dir, &fixtures().join("gpt2_tiny"));

    // Two shards and transformers' index.
    let sharded = model_dir(&dir.join("sharded"));
    let (first, second): (BTreeMap<_, _>, BTreeMap<_, _>) = weights
        .clone()
        .into_iter()
        .partition(|(name, _)| name.contains(".h.0.") || name.contains("wte"));
    write_tensors(&sharded.join("model-00001-of-00002.safetensors"), &first);
    write_tensors(&sharded.join("model-00002-of-00002.safetensors"), &second);
    let map: serde_json::Map<String, serde_json::Value> = first
        .keys()
        .map(|k| (k.clone(), "model-00001-of-00002.safetensors".into()))
        .chain(
            second
                .keys()
                .map(|k| (k.clone(), "model-00002-of-00002.safetensors".into())),
        )
        .collect();
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": map }).to_string(),
    )
    .unwrap();
    same(&started_from(&dir, &sharded), &want, "sharded");

    // A bare `GPT2Model` checkpoint: names without `transformer.`.
    let bare = model_dir(&dir.join("bare"));
    let renamed = weights
        .iter()
        .map(|(k, v)| {
            (
                k.strip_prefix("transformer.").unwrap_or(k).to_string(),
                v.clone(),
            )
        })
        .collect();
    write_tensors(&bare.join("model.safetensors"), &renamed);
    same(&started_from(&dir, &bare), &want, "bare model names");

    // Only a pickle: refused, with the conversion.
    let pickled = model_dir(&dir.join("pickled"));
    std::fs::write(pickled.join("pytorch_model.bin"), b"not read").unwrap();
    let err = one_step(&dir, &experiment(&dir, &pickled, "", "")).unwrap_err();
    assert!(
        err.contains("pytorch_model.bin") && err.contains("safe_serialization=True"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn exporting_a_run_of_another_shape_is_refused() {
    let dir = scratch("export-shape");
    let e = experiment(&dir, &fixtures().join("gpt2_tiny"), "", "");
    one_step(&dir, &e).unwrap();
    // The same name, another width: the run's weights do not fit it.
    let mut other = e.clone();
    other.model.hidden *= 2;
    let out = dir.join("merged");
    let err = kiln_runtime::export::export_merged(
        &common::program(&other).unwrap(),
        &dir.join("runs"),
        &out,
    )
    .unwrap_err();
    assert!(err.0.contains("shape"), "{}", err.0);
    assert!(!out.join("model.safetensors").exists());
    std::fs::remove_dir_all(&dir).ok();
}
