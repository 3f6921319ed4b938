//! Kiln's runtime: executes the compiler's execution plans with dfdx (CPU by default, CUDA
//! behind a feature), with data pipelines, checkpoints and collectives.
//!
//! It is empty until the graph IR it executes exists; see the project's issues.
