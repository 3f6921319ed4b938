//! Hugging Face checkpoints map onto the graph one to one: every tensor of the fixture models
//! binds to a parameter of the lowered graph with the same shape, and every pretrained
//! parameter of the graph finds its tensor.

use kiln_compiler::graph::{compile_graph, ParamRole};
use kiln_runtime::store::safetensors::{bind, read_safetensors};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

fn experiment(model: &str, objective: &str) -> kiln_compiler::spec::Experiment {
    let src = format!("experiment e {{ model = hf(\"{model}\"), objective = {objective}, train {{ batch = 2, seq_len = 12 }} }}");
    let checked = kiln_compiler::check_source("bind.kiln", &src, Some(&fixtures()));
    assert!(checked.is_ok(), "{}", checked.render_errors());
    checked.module.experiments[0].value.clone()
}

#[test]
fn fixture_checkpoints_bind_one_to_one() {
    for (model, objective) in [
        ("gpt2_tiny", "causal_lm"),
        ("bert_tiny", "mlm + nsp"),
        ("llama_tiny", "causal_lm"),
    ] {
        let path = fixtures().join(model).join("model.safetensors");
        let tensors = read_safetensors(&path).unwrap();
        let graph = compile_graph(&experiment(model, objective)).unwrap();
        let bound = bind(&graph, &[(path, tensors.clone())]).unwrap();
        for (p, value) in graph.params.iter().zip(&bound) {
            assert!(
                value.is_some() || p.role == ParamRole::NewHead,
                "{model}: no tensor for `{}`",
                p.name
            );
        }
        let graph_names: Vec<&str> = graph.params.iter().map(|p| p.name.as_str()).collect();
        for name in tensors.keys() {
            assert!(
                graph_names.contains(&name.as_str()),
                "{model}: checkpoint tensor `{name}` has no parameter"
            );
        }
    }
}

#[test]
fn peft_adapters_bind_after_removing_the_wrapper_prefix() {
    let case = fixtures().join("gpt2_tiny/clm_lora");
    let src = "experiment e { model = hf(\"gpt2_tiny\"), adapter = peft(\"gpt2_tiny/clm_lora\"), train { batch = 2, seq_len = 12 } }";
    let checked = kiln_compiler::check_source("bind.kiln", src, Some(&fixtures()));
    let graph = compile_graph(&checked.module.experiments[0].value).unwrap();
    let base = read_safetensors(&fixtures().join("gpt2_tiny/model.safetensors")).unwrap();
    let adapter = read_safetensors(&case.join("adapter_model.safetensors")).unwrap();
    let bound = bind(
        &graph,
        &[
            (PathBuf::from("model"), base),
            (PathBuf::from("adapter"), adapter),
        ],
    )
    .unwrap();
    assert!(
        bound.iter().all(Option::is_some),
        "every parameter, LoRA A and B included, has a value"
    );
}

#[test]
fn corrupt_and_mismatched_checkpoints_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("kiln-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corrupt = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x08\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let err = read_safetensors(&corrupt).unwrap_err();
    assert!(
        err.to_string().contains("not a valid safetensors file"),
        "{err}"
    );
    let err = read_safetensors(&dir.join("missing.safetensors")).unwrap_err();
    assert!(err.to_string().contains("cannot read"), "{err}");
    std::fs::remove_dir_all(&dir).ok();

    // A GPT-2 checkpoint bound to a graph of another width.
    let tensors = read_safetensors(&fixtures().join("gpt2_tiny/model.safetensors")).unwrap();
    let src = "experiment e { model = hf(\"gpt2_tiny\") { hidden = 64 }, train { batch = 1, seq_len = 8 } }";
    let checked = kiln_compiler::check_source("bind.kiln", src, Some(&fixtures()));
    let graph = compile_graph(&checked.module.experiments[0].value).unwrap();
    let err = bind(&graph, &[(PathBuf::from("model.safetensors"), tensors)]).unwrap_err();
    assert!(err.to_string().contains("the model needs"), "{err}");
}
