//! What a run keeps on disk: tensors in safetensors files (Hugging Face and PEFT checkpoints
//! included, `safetensors`), run directories with their verified checkpoints and metrics
//! (`run_dir`), and the weights a run starts from (`starting_weights`).

pub mod run_dir;
pub mod safetensors;
pub(crate) mod starting_weights;
