//! Kiln's runtime: executes the compiler's execution plans with dfdx (CPU by default, CUDA
//! behind a feature), with data pipelines, checkpoints and collectives.
//!
//! So far: reading Hugging Face and PEFT safetensors checkpoints and binding their tensors to
//! the parameters of an operator graph (`checkpoint`). The executor comes next.

pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod exec;
pub mod export;
pub mod mesh;
pub mod mlm;
pub mod optim;
pub mod pet;
pub mod placement;
pub mod plot;
mod rng;
pub mod tensor_parallel;
pub mod train;
