//! Checkpoints in safetensors format: Hugging Face model files (`model.safetensors`) and PEFT
//! adapter files (`adapter_model.safetensors`), read into host tensors and bound by name to the
//! parameters of an operator graph.

use crate::tensor::{param_shape, HostTensor};
use kiln_compiler::graph::{Graph, Param};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A checkpoint that cannot be used, with the file it came from.
#[derive(Debug)]
pub struct CheckpointError {
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for CheckpointError {}

/// PEFT prefixes every key of a wrapped model with this.
const PEFT_PREFIX: &str = "base_model.model.";

/// Reads every tensor of a safetensors file, converting 16-bit floats to f32.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError {
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })?;
    parse_safetensors(&bytes, path)
}

/// The tensors of safetensors bytes that came from `path` (named in errors).
pub fn parse_safetensors(
    bytes: &[u8],
    path: &Path,
) -> Result<BTreeMap<String, HostTensor>, CheckpointError> {
    let fail = |message: String| CheckpointError {
        path: path.to_path_buf(),
        message,
    };
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| fail(format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(fail(format!(
                    "tensor `{name}` has dtype {other:?}; Kiln reads F32, BF16 and F16"
                )))
            }
        };
        let shape = view.shape().to_vec();
        if data.len() != shape.iter().product::<usize>() {
            return Err(fail(format!(
                "tensor `{name}` holds {} values for shape {shape:?}",
                data.len()
            )));
        }
        out.insert(
            name.strip_prefix(PEFT_PREFIX).unwrap_or(&name).to_string(),
            HostTensor { shape, data },
        );
    }
    Ok(out)
}

/// The string metadata (`__metadata__`) of safetensors bytes that came from `path`.
pub fn safetensors_metadata(
    bytes: &[u8],
    path: &Path,
) -> Result<std::collections::HashMap<String, String>, CheckpointError> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file: {e}"),
    })?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// The weights of a Hugging Face model directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists (as `save_pretrained` splits a large model). A bare
/// model's checkpoint (`GPT2Model`, not `GPT2LMHeadModel`) names its tensors without the
/// family's `base_prefix`; they get it, as transformers does on loading. Returns the file to
/// name in errors (the single file or the index) with the tensors.
pub fn read_hf_weights(
    dir: &Path,
    base_prefix: &str,
) -> Result<(PathBuf, BTreeMap<String, HostTensor>), CheckpointError> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let (path, tensors) = if single.exists() {
        let tensors = read_safetensors(&single)?;
        (single, tensors)
    } else if index.exists() {
        let tensors = read_shards(dir, &index)?;
        (index, tensors)
    } else {
        let pickled = ["pytorch_model.bin", "pytorch_model.bin.index.json"]
            .iter()
            .any(|f| dir.join(f).exists());
        let message = if pickled {
            "has PyTorch pickle weights (pytorch_model.bin) but no model.safetensors; Kiln reads safetensors only (pickles can run code on loading): convert with transformers, `AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
        } else {
            "has neither model.safetensors nor model.safetensors.index.json"
        };
        return Err(CheckpointError {
            path: dir.to_path_buf(),
            message: message.into(),
        });
    };
    let prefixed = format!("{base_prefix}.");
    let bare = !tensors.keys().any(|k| k.starts_with(&prefixed));
    let tensors = if bare {
        tensors
            .into_iter()
            .map(|(k, v)| (format!("{prefixed}{k}"), v))
            .collect()
    } else {
        tensors
    };
    Ok((path, tensors))
}

/// Every tensor of a sharded checkpoint; each tensor must be in the shard the index names.
fn read_shards(
    dir: &Path,
    index_path: &Path,
) -> Result<BTreeMap<String, HostTensor>, CheckpointError> {
    let fail = |message: String| CheckpointError {
        path: index_path.to_path_buf(),
        message,
    };
    let text =
        std::fs::read_to_string(index_path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| fail(format!("not valid JSON: {e}")))?;
    let map = index["weight_map"]
        .as_object()
        .ok_or_else(|| fail("has no `weight_map` object".into()))?;
    let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .filter(|s| !s.contains('/') && !s.contains('\\') && !s.starts_with('.'))
            .ok_or_else(|| {
                fail(format!(
                    "`{tensor}` maps to {shard}, not a file name beside the index"
                ))
            })?;
        by_shard.entry(shard).or_default().push(tensor);
    }
    let mut out = BTreeMap::new();
    for (shard, names) in by_shard {
        let path = dir.join(shard);
        let mut tensors = read_safetensors(&path)?;
        for name in names {
            let tensor = tensors.remove(name).ok_or_else(|| CheckpointError {
                path: path.clone(),
                message: format!("has no `{name}`, which the index places there"),
            })?;
            out.insert(name.to_string(), tensor);
        }
    }
    Ok(out)
}

/// Values for the graph's parameters, in parameter order; `None` where no file provided one
/// (new adapter parameters, fresh heads), for the caller to initialise.
pub fn bind(
    graph: &Graph,
    files: &[(PathBuf, BTreeMap<String, HostTensor>)],
) -> Result<Vec<Option<HostTensor>>, CheckpointError> {
    let mut out = Vec::with_capacity(graph.params.len());
    for p in &graph.params {
        let found = files
            .iter()
            .find_map(|(path, tensors)| tensors.get(&p.name).map(|t| (path, t)));
        match found {
            Some((path, t)) => {
                check_shape(p, t, path)?;
                out.push(Some(t.clone()));
            }
            None => out.push(None),
        }
    }
    Ok(out)
}

/// `t`, read from `path` for parameter `p`, must have its shape.
fn check_shape(p: &Param, t: &HostTensor, path: &Path) -> Result<(), CheckpointError> {
    let expected = param_shape(p);
    // PEFT stores IA3 vectors as [out, 1] / [1, in]; the graph keeps the same shapes.
    if t.shape == expected {
        return Ok(());
    }
    Err(CheckpointError {
        path: path.to_path_buf(),
        message: format!(
            "`{}` has shape {:?}, the model needs {:?}",
            p.name, t.shape, expected
        ),
    })
}

/// Every tensor of `tensors` (from `path`) that names a parameter of `graph` has its shape;
/// with `only_params`, every tensor must name one (a run's checkpoint of another experiment
/// would otherwise be written out, or scored with, as a broken model).
pub fn check_tensors(
    graph: &Graph,
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    only_params: bool,
) -> Result<(), CheckpointError> {
    let params: BTreeMap<&str, &Param> =
        graph.params.iter().map(|p| (p.name.as_str(), p)).collect();
    for (name, t) in tensors {
        match params.get(name.as_str()) {
            Some(p) => check_shape(p, t, path)?,
            None if only_params => {
                return Err(CheckpointError {
                    path: path.to_path_buf(),
                    message: format!("holds `{name}`, which is not a parameter of the experiment; was it saved by another experiment?"),
                })
            }
            None => {}
        }
    }
    Ok(())
}

/// Writes `bytes` to a temporary file beside `path`, flushed to disk, and renames it over
/// `path`: a reader finds the old file or the new one, never half of one. The temporary file is
/// named by the process, so that two writers never share it, and removed when the write fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(|e| format!("{}: {e}", tmp.display()))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display())));
    if written.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    written
}

/// f32 tensors as a safetensors file, with PyTorch's `format: pt` metadata and `metadata`.
pub fn safetensors_bytes(
    tensors: Vec<(String, Vec<usize>, &[f32])>,
    metadata: &[(&str, &str)],
) -> Result<Vec<u8>, String> {
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, shape, data)| {
            (
                n,
                shape,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot write tensors: {e}"))?;
    let meta = std::iter::once(("format", "pt"))
        .chain(metadata.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize(views, &Some(meta)).map_err(|e| format!("cannot write tensors: {e}"))
}
