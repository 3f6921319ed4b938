//! Exporting a run: its adapter in PEFT's format (`peft`), or its model with LoRA merged in as
//! a Hugging Face checkpoint (`merged`; the compiler's `hf` module describes a model defined in
//! Kiln the way transformers' config classes do).

mod merged;
mod peft;

pub use merged::export_merged;
pub use peft::{export_run, peft_config, write_peft};

use crate::store::safetensors::write_atomic;
use crate::tensor::HostTensor;
use kiln_compiler::spec::Experiment;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct ExportError(pub String);

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ExportError {}

/// The trained parameters of `e`'s run (its newest checkpoint's), by name, with the file they
/// came from.
fn trained(
    e: &Experiment,
    runs: &Path,
) -> Result<(PathBuf, BTreeMap<String, HostTensor>), ExportError> {
    crate::store::starting_weights::stage_weights(runs, &e.name, "exporting")
        .map_err(|err| ExportError(err.0))
}

/// Writes `files` (name, bytes) into the directory `out`, each atomically.
fn write_dir(out: &Path, files: Vec<(&str, Vec<u8>)>) -> Result<(), ExportError> {
    std::fs::create_dir_all(out).map_err(|err| ExportError(format!("{}: {err}", out.display())))?;
    for (file, content) in files {
        write_atomic(&out.join(file), &content).map_err(ExportError)?;
    }
    Ok(())
}

/// JSON text with its object keys sorted, as Hugging Face libraries write their configs.
fn sorted_json(mut value: serde_json::Value) -> Result<Vec<u8>, ExportError> {
    value.sort_all_objects();
    serde_json::to_vec_pretty(&value).map_err(|err| ExportError(err.to_string()))
}
