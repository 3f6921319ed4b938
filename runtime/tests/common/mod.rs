//! Helpers shared by the runtime's integration tests (each test crate uses some of them).
#![allow(dead_code)]

use kiln_runtime::comm::world::World;
use kiln_runtime::store::safetensors::safetensors_bytes;
use kiln_runtime::tensor::HostTensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// ‖got − want‖ / ‖want‖, the measure the Hugging Face comparisons use for tensors.
pub fn relative_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (num, den) = got
        .iter()
        .zip(want)
        .fold((0.0f64, 0.0f64), |(n, d), (g, w)| {
            (n + f64::from(g - w).powi(2), d + f64::from(*w).powi(2))
        });
    num.sqrt() / den.sqrt().max(1e-30)
}

/// `tensors` as safetensors bytes (f32).
pub fn tensor_bytes(tensors: &BTreeMap<String, HostTensor>) -> Vec<u8> {
    safetensors_bytes(
        tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone(), t.data.as_slice()))
            .collect(),
        &[],
    )
    .unwrap()
}

/// Eight short causal-LM records and a 100-token WordPiece tokenizer trained on them, in `dir`,
/// made once (so that the runs of one test see the same token ids): (data, tokenizer).
pub fn tiny_corpus(dir: &Path) -> (PathBuf, PathBuf) {
    let (data, tokenizer) = (dir.join("d.jsonl"), dir.join("tokenizer.json"));
    if tokenizer.exists() {
        return (data, tokenizer);
    }
    let lines: Vec<String> = (0..8)
        .map(|i| format!("{{\"text\": \"the river {i} flows north and the basin is large\"}}"))
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    kiln_runtime::data::train_tokenizer(
        std::slice::from_ref(&data),
        100,
        &tokenizer,
        kiln_runtime::data::TokenizerKind::WordPiece,
        &[],
    )
    .unwrap();
    (data, tokenizer)
}

/// Compiles `e` as `kiln run` does, then trains it; what stops compilation comes back as the
/// run's error (the diagnostics' messages, as the CLI would print them without the source).
pub fn run(
    e: &kiln_compiler::spec::Experiment,
    runs: &Path,
    steps: Option<u64>,
    start: kiln_runtime::train::Start,
    on_event: impl FnMut(&kiln_runtime::train::Event) -> kiln_runtime::train::Control,
) -> Result<kiln_runtime::train::RunSummary, kiln_runtime::train::RunError> {
    let program = program(e).map_err(kiln_runtime::train::RunError)?;
    kiln_runtime::train::run(
        &program,
        &World::Alone,
        kiln_runtime::train::Devices::Planned,
        runs,
        steps,
        start,
        on_event,
    )
}

/// `e` compiled for the runtime, or its diagnostics' messages with their help.
pub fn program(e: &kiln_compiler::spec::Experiment) -> Result<kiln_compiler::Program, String> {
    kiln_compiler::compile(e).map_err(|d| {
        let messages: Vec<String> = d
            .items
            .iter()
            .map(|item| {
                let help = item.help.iter().map(|h| format!(" (help: {h})"));
                std::iter::once(item.message.clone()).chain(help).collect()
            })
            .collect();
        messages.join("; ")
    })
}
