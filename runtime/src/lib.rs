//! Kiln's runtime: the back end that executes a compiled [`kiln_compiler::Program`] with dfdx
//! (CPU by default, CUDA behind a feature). By concern:
//!
//! - `exec`: the graph interpreter and its CPU kernels (one device, one segment of the graph);
//! - `parallel`: the plan's placement run on a mesh of devices — pipeline schedules,
//!   tensor-parallel shards, gradient synchronisation and ZeRO, stage boundaries;
//! - `comm`: how devices talk — the `Collective` trait and pipeline mailboxes, over threads of
//!   one process or over MPI between processes — and which process of a job this is;
//! - `data`: tokenizers, JSONL records, and each objective's examples and batches behind one
//!   trait (`TaskData`);
//! - `train`: the training loop, evaluation, PPO's rollouts and updates, optimizers,
//!   initialisation, checkpoints and the loss plot;
//! - `store`: what lives on disk — safetensors files, run directories and their checkpoints,
//!   the weights a run starts from;
//! - `export`: PEFT adapters and merged Hugging Face models;
//! - `gpu`: the kernels for NVIDIA GPUs, in CUDA C compiled at run time, tested on the host.

pub mod comm;
pub mod data;
pub mod exec;
pub mod export;
pub mod gpu;
mod host;
pub mod memory;
pub mod parallel;
mod rng;
pub mod store;
pub mod tensor;
pub mod train;
