//! Checkpoints in safetensors format: Hugging Face model files (`model.safetensors`) and PEFT
//! adapter files (`adapter_model.safetensors`), read into host tensors and bound by name to the
//! parameters of an operator graph.

use kiln_compiler::graph::{Graph, Param};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A tensor in host memory, row-major, as f32 (what the CPU executor computes in).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A parameter's shape as host tensors index it.
pub fn param_shape(p: &Param) -> Vec<usize> {
    p.shape.iter().map(|&d| d as usize).collect()
}

impl HostTensor {
    /// A rank-0 tensor.
    pub fn scalar(value: f32) -> Self {
        HostTensor {
            shape: Vec::new(),
            data: vec![value],
        }
    }

    /// Bytes it holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.data.capacity() * std::mem::size_of::<f32>()
            + self.shape.capacity() * std::mem::size_of::<usize>()
    }

    /// No value: a parameter this device does not hold.
    pub fn absent() -> Self {
        HostTensor {
            shape: Vec::new(),
            data: Vec::new(),
        }
    }
}

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
    let fail = |message: String| CheckpointError {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let file = SafeTensors::deserialize(&bytes)
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
                let expected = param_shape(p);
                // PEFT stores IA3 vectors as [out, 1] / [1, in]; the graph keeps the same shapes.
                if t.shape != expected {
                    return Err(CheckpointError {
                        path: path.clone(),
                        message: format!(
                            "`{}` has shape {:?}, the model needs {:?}",
                            p.name, t.shape, expected
                        ),
                    });
                }
                out.push(Some(t.clone()));
            }
            None => out.push(None),
        }
    }
    Ok(out)
}

/// Writes `bytes` to a temporary file beside `path` and renames it over `path`: a reader finds
/// the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// f32 tensors as a safetensors file, with PyTorch's `format: pt` metadata.
pub fn safetensors_bytes(tensors: Vec<(String, Vec<usize>, &[f32])>) -> Result<Vec<u8>, String> {
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
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, &Some(meta)).map_err(|e| format!("cannot write tensors: {e}"))
}
