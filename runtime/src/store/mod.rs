//! What a run keeps on disk: tensors in safetensors files (Hugging Face and PEFT checkpoints
//! included, `safetensors`), run directories with their verified checkpoints and metrics
//! (`run_dir`), the tensors of a checkpoint as each device saved its pieces of them
//! (`sharded`), and the weights a run starts from (`starting_weights`).

pub mod run_dir;
pub mod safetensors;
pub mod sharded;
pub(crate) mod starting_weights;
