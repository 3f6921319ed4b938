//! Kiln's runtime: executes the compiler's execution plans with dfdx (CPU by default, CUDA
//! behind a feature): the graph interpreter (`exec`), the plan's placement (`placement`,
//! `tensor_parallel`) run on a mesh of device threads (`mesh`) over collectives
//! (`collective`), data pipelines, PPO's rollouts (`ppo`), optimizers, checkpoints and
//! measured memory.

pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod exec;
pub mod export;
mod host;
#[cfg(not(feature = "cuda"))]
mod kernels;
pub mod memory;
pub mod mesh;
pub mod mlm;
pub mod optim;
pub mod pet;
pub mod placement;
pub mod plot;
pub mod ppo;
pub mod prompt;
mod rng;
pub mod run_dir;
mod starting_weights;
pub mod tensor_parallel;
pub mod train;
