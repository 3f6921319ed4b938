//! Every stdlib module and every example checks clean, and the stdlib's published shapes are
//! what the papers say.

use kiln::compiler::spec::{Experiment, Model, Objective, Plan};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Checks source text that imports `module`, returning its models.
fn models_of(module: &str) -> Vec<Model> {
    let src = format!("import {module}\n");
    let checked = kiln::compiler::check_source("probe.kiln", &src, Some(root()));
    assert!(checked.is_ok(), "{module}:\n{}", checked.render_errors());
    // The probe defines nothing; check the module's own definitions directly.
    let program = &checked.program;
    let id = program
        .modules
        .iter()
        .position(|m| m.name == kiln::compiler::stdlib::display_name(module))
        .expect("module loaded");
    let ev = kiln::compiler::resolve::Evaluator::new(program);
    let out = kiln::compiler::spec::check_module(&ev, kiln::compiler::resolve::ModuleId(id));
    let errors = program
        .diagnostics
        .borrow()
        .sorted()
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    let refs: Vec<_> = errors.iter().collect();
    assert!(
        errors.is_empty(),
        "{module}:\n{}",
        kiln::compiler::diagnostics::render_plain(&program.sources.borrow(), &refs)
    );
    out.models.into_iter().map(|m| m.value).collect()
}

#[test]
fn every_stdlib_module_checks_clean() {
    for module in kiln::compiler::stdlib::module_names() {
        models_of(module);
    }
}

#[test]
fn every_stdlib_file_is_embedded() {
    let mut on_disk = Vec::new();
    let mut stack = vec![root().join("stdlib")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "kiln") {
                let rel = path
                    .strip_prefix(root().join("stdlib"))
                    .unwrap()
                    .with_extension("");
                on_disk.push(format!("std.{}", rel.to_string_lossy().replace('/', ".")));
            }
        }
    }
    on_disk.sort();
    let mut embedded: Vec<String> = kiln::compiler::stdlib::module_names()
        .map(String::from)
        .collect();
    embedded.sort();
    assert_eq!(
        on_disk, embedded,
        "stdlib/ and compiler/src/stdlib.rs list different modules"
    );
}

fn examples() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kiln"))
        .map(|p| p.strip_prefix(root()).unwrap().to_path_buf())
        .collect();
    out.sort();
    out
}

fn check_example(path: &Path) -> Vec<Experiment> {
    let checked = kiln::compiler::check_file(path);
    assert!(
        checked.is_ok(),
        "{}:\n{}",
        path.display(),
        checked.render_errors()
    );
    checked
        .module
        .experiments
        .into_iter()
        .map(|e| e.value)
        .collect()
}

#[test]
fn every_example_checks_clean() {
    let all = examples();
    assert!(
        all.len() >= 10,
        "expected the ten example kinds, found {}",
        all.len()
    );
    for path in all {
        check_example(&path);
    }
}

fn model(models: &[Model], name: &str) -> Model {
    models
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("no model {name}"))
        .clone()
}

#[test]
fn published_shapes() {
    let gpt2 = models_of("std.models.gpt2");
    let m = model(&gpt2, "gpt2_medium");
    assert_eq!(
        (m.hidden, m.layers, m.heads, m.ffn, m.vocab),
        (1024, 24, 16, 4096, 50257),
        "ffn follows hidden through inheritance"
    );
    let m = model(&gpt2, "gpt2_xl");
    assert_eq!((m.hidden, m.layers, m.heads, m.ffn), (1600, 48, 25, 6400));

    let bert = models_of("std.models.bert");
    let m = model(&bert, "bert_base");
    assert_eq!(
        (m.hidden, m.layers, m.heads, m.ffn, m.type_vocab, m.vocab),
        (768, 12, 12, 3072, 2, 30522)
    );

    let llama = models_of("std.models.llama");
    let m = model(&llama, "llama_70b");
    assert_eq!(
        (m.hidden, m.layers, m.heads, m.kv_heads, m.ffn),
        (8192, 80, 64, 8, 28672),
        "LLaMA-2 70B uses GQA with 8 KV heads"
    );
    let m = model(&llama, "llama_7b");
    assert_eq!(
        (m.hidden, m.layers, m.ffn, m.tie_embeddings),
        (4096, 32, 11008, false)
    );

    let gpt3 = models_of("std.models.gpt3");
    let m = model(&gpt3, "gpt3_175b");
    assert_eq!(
        (m.hidden, m.layers, m.heads, m.positions),
        (12288, 96, 96, 2048)
    );
}

#[test]
fn gpt3_plan_example_targets_a_1024_gpu_cluster() {
    let exps = check_example(Path::new("examples/gpt3_175b_plan.kiln"));
    let e = &exps[0];
    assert_eq!(e.parallel.mesh.devices(), 1024);
    assert_eq!(e.parallel.plan, Plan::Auto);
    assert_eq!(e.parallel.mesh.node.device.memory, 80e9);
}

#[test]
fn bert_pretraining_example_combines_mlm_and_nsp() {
    let exps = check_example(Path::new("examples/bert_wwm_nsp.kiln"));
    assert!(
        matches!(exps[0].objective, Objective::MlmNsp { .. }),
        "{:?}",
        exps[0].objective
    );
}
